//! What a download still has to tell the swarm and its own store: the pieces it gained since its
//! last `have`, the piece hashes it produced and has not gossiped yet, and the hashes (its own and
//! its producers') not yet written to the store. The runner owns one and flushes it after each
//! message and on its tick; this part decides what goes out when.
//!
//! * Hashes this node produced go out at the next flush: they are what lets peers ask for a
//!   fresh piece.
//! * Haves: a seed sends each at once (its fresh pieces start the swarm); a peer batches its haves
//!   and sends them every [`PEER_HAVE_INTERVAL`], except its first, its last (complete, failing or
//!   exiting), and a piece no other peer is known to hold (the rest of the swarm can get that one
//!   only from this peer), which go out at the next flush.
//!
//! Every method takes the time as an argument, so the rules are tested without waiting.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use df_protocols::have::MAX_HAVE_PIECES_PER_FRAME as MAX_HAVE_PIECES;
use df_protocols::manifest::{PieceHashBatch, SignedPieceHash};
use libp2p::PeerId;

/// How often a peer (not a seed) sends the pieces it gained. When every have was gossiped, 100 ms
/// haves from every peer of an 8-peer bench cost a node 30 % of its CPU (perf); direct haves
/// (`/df/have/1`) are cheaper, but each still wakes every peer on the task.
pub(crate) const PEER_HAVE_INTERVAL: Duration = Duration::from_millis(400);

#[derive(Default)]
pub(crate) struct Announcements {
    /// Pieces gained since the last `have`, in the order they were gained.
    pending_have: Vec<u32>,
    /// When this node last sent a `have`.
    last_have_sent: Option<Instant>,
    /// A pending piece no other peer is known to hold: it goes out at the next flush.
    urgent: bool,
    /// Hashes this node produced and has not gossiped yet.
    unannounced: Vec<SignedPieceHash>,
    /// Hashes (with their producer) not yet written to the store.
    unpersisted: Vec<(PeerId, SignedPieceHash)>,
    /// This node registered as a DHT provider of the task.
    providing: bool,
}

/// How a node sends its haves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HavePace {
    /// At once, due or not (a seed, a peer that is complete, failing or exiting, or a flush of
    /// everything pending).
    Now,
    /// Batched every [`PEER_HAVE_INTERVAL`] (a downloading peer).
    Batched,
}

/// A `have` to gossip.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct HaveBatch {
    /// At most [`MAX_HAVE_PIECES`] indices per batch.
    pub(crate) chunks: Vec<Vec<u32>>,
    /// This is the first `have` this node sends for the task: it registers as a DHT provider
    /// with it.
    pub(crate) first: bool,
}

impl Announcements {
    /// A piece was verified and stored. `urgent`: its have goes out at the next flush (a piece
    /// from a peer that no other peer is known to hold).
    pub(crate) fn gained(&mut self, index: u32, urgent: bool) {
        self.pending_have.push(index);
        self.urgent |= urgent;
    }

    /// This node produced a piece (fetched it from origin) and signed its hash.
    pub(crate) fn produced(&mut self, me: PeerId, signed: SignedPieceHash) {
        self.unpersisted.push((me, signed.clone()));
        self.unannounced.push(signed);
    }

    /// A hash learned from `producer` (by gossip or a probe answer), to be stored.
    pub(crate) fn learned(&mut self, producer: PeerId, signed: SignedPieceHash) {
        self.unpersisted.push((producer, signed));
    }

    /// Forgets everything pending: the task's content is going away (or starting over), and
    /// nothing of it may be announced or written back.
    pub(crate) fn clear(&mut self) {
        self.pending_have.clear();
        self.urgent = false;
        self.unannounced.clear();
        self.unpersisted.clear();
    }

    /// The hashes to gossip now, in batches that each fit a gossip message.
    pub(crate) fn take_hashes(&mut self, me: PeerId) -> Vec<PieceHashBatch> {
        if self.unannounced.is_empty() {
            return Vec::new();
        }
        let batch = PieceHashBatch {
            producer: me,
            hashes: std::mem::take(&mut self.unannounced),
        };
        batch.chunks_for_gossip().collect()
    }

    /// The `have` to gossip now, if one is due at `now`.
    pub(crate) fn take_have(&mut self, pace: HavePace, now: Instant) -> Option<HaveBatch> {
        if self.pending_have.is_empty() {
            return None;
        }
        let due = pace == HavePace::Now
            || self.urgent
            || self
                .last_have_sent
                .is_none_or(|t| now.saturating_duration_since(t) >= PEER_HAVE_INTERVAL);
        if !due {
            return None;
        }
        self.last_have_sent = Some(now);
        self.urgent = false;
        let first = !std::mem::replace(&mut self.providing, true);
        let pieces = std::mem::take(&mut self.pending_have);
        Some(HaveBatch {
            chunks: pieces
                .chunks(MAX_HAVE_PIECES)
                .map(<[u32]>::to_vec)
                .collect(),
            first,
        })
    }

    pub(crate) fn has_unpersisted(&self) -> bool {
        !self.unpersisted.is_empty()
    }

    /// The hashes to write to the store, one batch per producer.
    pub(crate) fn take_unpersisted(&mut self) -> Vec<PieceHashBatch> {
        let mut by_producer: HashMap<PeerId, Vec<SignedPieceHash>> = HashMap::new();
        for (p, h) in self.unpersisted.drain(..) {
            by_producer.entry(p).or_default().push(h);
        }
        by_producer
            .into_iter()
            .map(|(producer, hashes)| PieceHashBatch { producer, hashes })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use df_protocols::limits::MAX_HASHES_PER_GOSSIP;
    use df_protocols::piece::PieceHash;
    use df_protocols::task::{TaskKey, parse_url};
    use libp2p::identity::Keypair;

    fn signed(key: &Keypair, index: u32) -> SignedPieceHash {
        let task = TaskKey::for_url(&parse_url("http://o/f").unwrap(), "");
        SignedPieceHash::sign(&task, index, PieceHash::of(&index.to_le_bytes()), key).unwrap()
    }

    #[test]
    fn a_peer_sends_its_first_have_at_once_then_batches_for_the_interval() {
        let t0 = Instant::now();
        let mut a = Announcements::default();
        assert_eq!(a.take_have(HavePace::Batched, t0), None, "nothing pending");
        a.gained(0, false);
        let first = a
            .take_have(HavePace::Batched, t0)
            .expect("the first goes out");
        assert_eq!(first.chunks, vec![vec![0]]);
        assert!(first.first);
        a.gained(1, false);
        a.gained(2, false);
        let almost = t0 + PEER_HAVE_INTERVAL - Duration::from_millis(1);
        assert_eq!(a.take_have(HavePace::Batched, almost), None);
        let due = a
            .take_have(HavePace::Batched, t0 + PEER_HAVE_INTERVAL)
            .expect("due after the interval");
        assert_eq!(due.chunks, vec![vec![1, 2]]);
        assert!(!due.first, "only the first have registers the provider");
        assert_eq!(
            a.take_have(HavePace::Now, t0 + PEER_HAVE_INTERVAL * 9),
            None
        );
    }

    #[test]
    fn a_piece_no_other_peer_holds_goes_out_at_the_next_flush() {
        let t0 = Instant::now();
        let mut a = Announcements::default();
        a.gained(0, false);
        a.take_have(HavePace::Batched, t0).unwrap();
        a.gained(1, false);
        assert_eq!(a.take_have(HavePace::Batched, t0), None);
        a.gained(2, true);
        let b = a.take_have(HavePace::Batched, t0).expect("urgent");
        assert_eq!(b.chunks, vec![vec![1, 2]]);
        // The urgency went out with it: the next piece waits for the interval again.
        a.gained(3, false);
        assert_eq!(a.take_have(HavePace::Batched, t0), None);
        assert!(a.take_have(HavePace::Now, t0).is_some(), "all: due or not");
    }

    #[test]
    fn a_seed_or_a_finishing_peer_sends_every_have_at_once_in_bounded_messages() {
        let t0 = Instant::now();
        let mut a = Announcements::default();
        a.gained(0, false);
        a.take_have(HavePace::Now, t0).unwrap();
        let n = MAX_HAVE_PIECES as u32 + 5;
        for i in 1..=n {
            a.gained(i, false);
        }
        let b = a
            .take_have(HavePace::Now, t0)
            .expect("a seed does not wait");
        assert_eq!(b.chunks.len(), 2);
        assert_eq!(b.chunks[0].len(), MAX_HAVE_PIECES);
        assert_eq!(b.chunks.concat(), (1..=n).collect::<Vec<_>>());
    }

    #[test]
    fn hashes_are_gossiped_once_in_fitting_batches_and_persisted_per_producer() {
        let me = Keypair::generate_ed25519();
        let other = Keypair::generate_ed25519();
        let (me_id, other_id) = (me.public().to_peer_id(), other.public().to_peer_id());
        let mut a = Announcements::default();
        let n = MAX_HASHES_PER_GOSSIP as u32 + 1;
        for i in 0..n {
            a.produced(me_id, signed(&me, i));
        }
        a.learned(other_id, signed(&other, n));
        let out = a.take_hashes(me_id);
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|b| b.producer == me_id));
        assert_eq!(
            out.iter().map(|b| b.hashes.len()).sum::<usize>(),
            n as usize
        );
        assert!(a.take_hashes(me_id).is_empty(), "gossiped once");

        assert!(a.has_unpersisted());
        let mut stored = a.take_unpersisted();
        stored.sort_by_key(|b| b.hashes.len());
        assert_eq!(stored.len(), 2);
        assert_eq!((stored[0].producer, stored[0].hashes.len()), (other_id, 1));
        assert_eq!(
            (stored[1].producer, stored[1].hashes.len()),
            (me_id, n as usize)
        );
        assert!(!a.has_unpersisted());
    }

    #[test]
    fn clearing_drops_what_was_pending_and_its_urgency() {
        let t0 = Instant::now();
        let me = Keypair::generate_ed25519();
        let me_id = me.public().to_peer_id();
        let mut a = Announcements::default();
        a.gained(0, false);
        a.take_have(HavePace::Batched, t0).unwrap();
        a.gained(1, true);
        a.produced(me_id, signed(&me, 1));
        a.clear();
        assert!(a.take_hashes(me_id).is_empty());
        assert!(!a.has_unpersisted());
        assert_eq!(a.take_have(HavePace::Now, t0), None);
        a.gained(2, false);
        assert_eq!(
            a.take_have(HavePace::Batched, t0),
            None,
            "the cleared piece's urgency is gone"
        );
    }
}
