//! Piece and source picking, as a pure function of the download's state.
//!
//! * Pieces: rarest first among pieces whose hash is known and that some usable source holds, random
//!   tie-break (so peers starting together fetch different pieces from the seed and then trade).
//! * Sources: peers before seeds/producers (the seed's uplink is the scarce one), then the least
//!   loaded relative to its measured throughput, random tie-break; at most `per_source` requests
//!   each, and at most `per_seed` from a seed while peers are sources too.
//! * In-order window: while a local reader streams the content, the first pickable of the
//!   [`IN_ORDER_WINDOW`] pieces from the one it waits for goes first, when that costs the swarm
//!   nothing: a peer (not a seed) holds it, or every source is a seed (one hop: nobody to trade
//!   with). Download and streaming then overlap instead of the stream waiting for piece 0 while
//!   random pieces arrive. Fresh pieces (only seeds hold them) are then picked among the
//!   [`FRESH_AHEAD_OF_READER`] nearest ahead of the reader, not from the whole content.
//! * Endgame: once every missing piece has been requested, a piece in flight from one source is
//!   requested from a second one; the first answer wins. (Not earlier: while the producer is still
//!   publishing hashes, duplicates would only waste the seed's uplink.)

use df_protocols::piece::Bitfield;
use libp2p::PeerId;
use rand::Rng;

/// What the picker needs to know about a source.
#[derive(Debug, Clone)]
pub(crate) struct SourceView<'a> {
    pub peer: PeerId,
    pub have: &'a Bitfield,
    pub inflight: usize,
    /// A seed or the task's producer: used when no peer has the piece.
    pub is_seed: bool,
    /// Bytes per second measured so far (0 when unknown).
    pub rate: f64,
    /// Temporarily unusable (backing off after failures).
    pub paused: bool,
    /// Pieces the source is busy with (sending them to others), until when.
    pub busy_pieces: &'a std::collections::HashMap<u32, std::time::Instant>,
    pub now: std::time::Instant,
}

impl SourceView<'_> {
    /// Holds piece `i` and is not busy with it.
    fn offers(&self, i: u32) -> bool {
        self.have.get(i) && self.busy_pieces.get(&i).is_none_or(|t| *t <= self.now)
    }
}

/// The download's state as far as picking is concerned.
pub(crate) struct PickInput<'a> {
    pub have: &'a Bitfield,
    pub hash_known: &'a Bitfield,
    /// Pieces not to request (being produced from origin locally).
    pub excluded: &'a Bitfield,
    /// For each piece, the sources it is being fetched from now.
    pub inflight: &'a dyn Fn(u32) -> Vec<PeerId>,
    pub sources: &'a [SourceView<'a>],
    pub per_source: usize,
    /// The cap for seeds while some peer is a source too (`per_source` otherwise).
    pub per_seed: usize,
    /// Every missing piece is already requested: duplicates are allowed.
    pub endgame: bool,
    /// The piece a local reader waits for, if one streams the content.
    pub reader_at: Option<u32>,
    /// The in-flight budget is spent: only a seed's free slot may still be filled, with a piece
    /// no peer holds.
    pub seed_slot_only: bool,
}

/// Pieces ahead of a local reader fetched in order.
pub(crate) const IN_ORDER_WINDOW: u32 = 8;

/// While a local reader streams, the fresh pieces (only seeds hold them) asked for are the first
/// this many ahead of it, picked at random among them: peers starting together still ask the seed
/// for different pieces and trade them, but near the reader, so the stream keeps pace with the
/// download (4 mirrors streaming a 64 MiB blob had received a fifth of what their nodes held when
/// fresh pieces were picked from the whole blob).
pub(crate) const FRESH_AHEAD_OF_READER: usize = 2 * IN_ORDER_WINDOW as usize;

/// Requests each kind of source may have in flight now.
#[derive(Clone, Copy)]
struct Caps {
    per_source: usize,
    per_seed: usize,
    /// Some source is a peer, not a seed.
    peers_too: bool,
}

impl Caps {
    fn new(input: &PickInput<'_>) -> Caps {
        let peers_too = input.sources.iter().any(|o| !o.is_seed);
        Caps {
            peers_too,
            per_source: input.per_source,
            per_seed: if peers_too {
                input.per_seed
            } else {
                input.per_source
            },
        }
    }

    fn usable(self, s: &SourceView<'_>) -> bool {
        let cap = if s.is_seed {
            self.per_seed
        } else {
            self.per_source
        };
        !s.paused && s.inflight < cap
    }
}

/// Picks the next (piece, source) to request, or `None` when nothing can be requested now.
pub(crate) fn pick(input: &PickInput<'_>, rng: &mut impl Rng) -> Option<(u32, PeerId)> {
    let caps = Caps::new(input);
    let n = input.have.len();
    if let Some(at) = input.reader_at.filter(|_| !input.seed_slot_only) {
        let only_seeds = input.sources.iter().all(|s| s.is_seed);
        for i in at..at.saturating_add(IN_ORDER_WINDOW).min(n) {
            if input.have.get(i) || !input.hash_known.get(i) || input.excluded.get(i) {
                continue;
            }
            let busy = (input.inflight)(i);
            if !busy.is_empty() {
                continue;
            }
            let from_peer = input.sources.iter().any(|s| !s.is_seed && s.have.get(i));
            if !(only_seeds || from_peer) {
                continue;
            }
            if let Some(source) = pick_source(input, caps, i, &busy, rng) {
                return Some((i, source));
            }
        }
    }
    if let Some(fresh) = pick_fresh(input, caps, rng) {
        return Some(fresh);
    }
    if input.seed_slot_only {
        return None;
    }
    let mut best: Vec<u32> = Vec::new();
    let mut best_count = usize::MAX;
    let mut endgame: Vec<u32> = Vec::new();
    for i in 0..n {
        if input.have.get(i) || !input.hash_known.get(i) || input.excluded.get(i) {
            continue;
        }
        let busy = (input.inflight)(i);
        let holders = input.sources.iter().filter(|s| s.have.get(i)).count();
        if holders == 0 {
            continue;
        }
        let free = input
            .sources
            .iter()
            .any(|s| s.offers(i) && caps.usable(s) && !busy.contains(&s.peer));
        if !free {
            continue;
        }
        if !busy.is_empty() {
            if input.endgame && busy.len() == 1 {
                endgame.push(i);
            }
            continue;
        }
        match holders.cmp(&best_count) {
            std::cmp::Ordering::Less => {
                best_count = holders;
                best.clear();
                best.push(i);
            }
            std::cmp::Ordering::Equal => best.push(i),
            std::cmp::Ordering::Greater => {}
        }
    }
    let piece = if !best.is_empty() {
        best[rng.random_range(0..best.len())]
    } else if !endgame.is_empty() {
        endgame[rng.random_range(0..endgame.len())]
    } else {
        return None;
    };
    let busy = (input.inflight)(piece);
    let source = pick_source(input, caps, piece, &busy, rng)?;
    Some((piece, source))
}

/// A seed's free slot goes to a piece only seeds hold (a fresh one, while the seed fetches the
/// origin), before any piece a peer can send: pieces reach the swarm only through the seeds'
/// uplinks, so those must never wait while the requester's budget goes to pieces peers hold. Only
/// while peers are sources too (from seeds alone, rarity and the reader's window decide).
fn pick_fresh(input: &PickInput<'_>, caps: Caps, rng: &mut impl Rng) -> Option<(u32, PeerId)> {
    if !caps.peers_too || !input.sources.iter().any(|s| s.is_seed && caps.usable(s)) {
        return None;
    }
    // A local reader streams: only the fresh pieces nearest ahead of it, so the stream keeps pace
    // with the download instead of waiting for pieces the seed sent out in random order.
    let from = input.reader_at.unwrap_or(0);
    let fresh: Vec<u32> = (from..input.have.len())
        .filter(|&i| {
            !input.have.get(i)
                && input.hash_known.get(i)
                && !input.excluded.get(i)
                && !input.sources.iter().any(|s| !s.is_seed && s.have.get(i))
                && input
                    .sources
                    .iter()
                    .any(|s| s.is_seed && caps.usable(s) && s.offers(i))
                && (input.inflight)(i).is_empty()
        })
        .take(if input.reader_at.is_some() {
            FRESH_AHEAD_OF_READER
        } else {
            usize::MAX
        })
        .collect();
    if fresh.is_empty() {
        return None;
    }
    let piece = fresh[rng.random_range(0..fresh.len())];
    let source = pick_source(input, caps, piece, &[], rng)?;
    Some((piece, source))
}

fn pick_source(
    input: &PickInput<'_>,
    caps: Caps,
    piece: u32,
    busy: &[PeerId],
    rng: &mut impl Rng,
) -> Option<PeerId> {
    let candidates: Vec<&SourceView<'_>> = input
        .sources
        .iter()
        .filter(|s| s.offers(piece) && caps.usable(s) && !busy.contains(&s.peer))
        .collect();
    let peers: Vec<&SourceView<'_>> = candidates.iter().copied().filter(|s| !s.is_seed).collect();
    let pool = if peers.is_empty() { candidates } else { peers };
    // Expected wait: requests queued at the source divided by its speed. Unknown speeds rank as the
    // best known one, so new sources get tried.
    let max_rate = pool.iter().map(|s| s.rate).fold(0.0, f64::max).max(1.0);
    let cost = |s: &SourceView<'_>| {
        let rate = if s.rate > 0.0 { s.rate } else { max_rate };
        (s.inflight as f64 + 1.0) / rate
    };
    let min = pool.iter().map(|s| cost(s)).fold(f64::INFINITY, f64::min);
    let best: Vec<&SourceView<'_>> = pool
        .into_iter()
        .filter(|s| cost(s) <= min * 1.0001)
        .collect();
    if best.is_empty() {
        return None;
    }
    Some(best[rng.random_range(0..best.len())].peer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn bf(len: u32, set: &[u32]) -> Bitfield {
        let mut b = Bitfield::new(len);
        for &i in set {
            b.set(i);
        }
        b
    }

    struct Fixture {
        have: Bitfield,
        known: Bitfield,
        excluded: Bitfield,
        inflight: HashMap<u32, Vec<PeerId>>,
        endgame: bool,
        reader_at: Option<u32>,
        seed_slot_only: bool,
    }

    impl Fixture {
        fn new(n: u32) -> Fixture {
            Fixture {
                have: Bitfield::new(n),
                known: Bitfield::full(n),
                excluded: Bitfield::new(n),
                inflight: HashMap::new(),
                endgame: true,
                reader_at: None,
                seed_slot_only: false,
            }
        }

        fn pick(&self, sources: &[SourceView<'_>], seed: u64) -> Option<(u32, PeerId)> {
            use rand::SeedableRng;
            let inflight = |i: u32| self.inflight.get(&i).cloned().unwrap_or_default();
            let input = PickInput {
                have: &self.have,
                hash_known: &self.known,
                excluded: &self.excluded,
                inflight: &inflight,
                sources,
                per_source: 2,
                per_seed: 1,
                endgame: self.endgame,
                reader_at: self.reader_at,
                seed_slot_only: self.seed_slot_only,
            };
            pick(&input, &mut rand::rngs::StdRng::seed_from_u64(seed))
        }
    }

    fn src<'a>(peer: PeerId, have: &'a Bitfield, is_seed: bool) -> SourceView<'a> {
        SourceView {
            peer,
            have,
            inflight: 0,
            is_seed,
            rate: 0.0,
            paused: false,
            busy_pieces: Box::leak(Box::default()),
            now: std::time::Instant::now(),
        }
    }

    #[test]
    fn a_piece_the_source_is_busy_with_is_asked_elsewhere_or_skipped() {
        let f = Fixture::new(2);
        let (a, b) = (PeerId::random(), PeerId::random());
        let all = bf(2, &[0, 1]);
        let now = std::time::Instant::now();
        let busy0: &HashMap<u32, std::time::Instant> = Box::leak(Box::new(HashMap::from([(
            0,
            now + std::time::Duration::from_secs(5),
        )])));
        let a_busy = SourceView {
            busy_pieces: busy0,
            now,
            ..src(a, &all, false)
        };
        // Alone: piece 1 from a (a is busy with 0, not paused).
        for seed in 0..10 {
            assert_eq!(f.pick(std::slice::from_ref(&a_busy), seed), Some((1, a)));
        }
        // With b: piece 0 may come from b only.
        for seed in 0..20 {
            let (piece, who) = f
                .pick(&[a_busy.clone(), src(b, &all, false)], seed)
                .unwrap();
            if piece == 0 {
                assert_eq!(who, b);
            }
        }
    }

    #[test]
    fn a_seed_gets_fewer_requests_while_peers_are_sources() {
        let f = Fixture::new(4);
        let (seed, peer) = (PeerId::random(), PeerId::random());
        let all = bf(4, &[0, 1, 2, 3]);
        let none = bf(4, &[]);
        let busy_seed = |inflight| SourceView {
            inflight,
            ..src(seed, &all, true)
        };
        // Alone, the seed takes up to per_source (2) requests.
        assert!(f.pick(&[busy_seed(1)], 1).is_some());
        assert!(f.pick(&[busy_seed(2)], 1).is_none());
        // With a peer in the task (even one holding nothing yet), one at a time.
        assert!(
            f.pick(&[busy_seed(0), src(peer, &none, false)], 1)
                .is_some()
        );
        assert!(
            f.pick(&[busy_seed(1), src(peer, &none, false)], 1)
                .is_none()
        );
    }

    #[test]
    fn rarest_piece_first() {
        let f = Fixture::new(3);
        let (a, b) = (PeerId::random(), PeerId::random());
        let ha = bf(3, &[0, 1, 2]);
        let hb = bf(3, &[0, 2]);
        for seed in 0..20 {
            let (piece, who) = f
                .pick(&[src(a, &ha, false), src(b, &hb, false)], seed)
                .unwrap();
            assert_eq!(piece, 1);
            assert_eq!(who, a);
        }
    }

    #[test]
    fn peers_are_preferred_over_seeds() {
        let f = Fixture::new(2);
        let (seed, peer) = (PeerId::random(), PeerId::random());
        let all = bf(2, &[0, 1]);
        for s in 0..20 {
            let (_, who) = f
                .pick(&[src(seed, &all, true), src(peer, &all, false)], s)
                .unwrap();
            assert_eq!(who, peer);
        }
    }

    #[test]
    fn seed_is_used_when_only_it_has_the_piece() {
        let f = Fixture::new(2);
        let (seed, peer) = (PeerId::random(), PeerId::random());
        let all = bf(2, &[0, 1]);
        let some = bf(2, &[0]);
        let mut f2 = f;
        f2.have.set(0);
        let (piece, who) = f2
            .pick(&[src(seed, &all, true), src(peer, &some, false)], 1)
            .unwrap();
        assert_eq!((piece, who), (1, seed));
    }

    #[test]
    fn nothing_without_hash_or_holder_or_capacity() {
        let mut f = Fixture::new(2);
        let a = PeerId::random();
        let h = bf(2, &[0, 1]);
        f.known = bf(2, &[1]);
        f.have.set(1);
        assert!(
            f.pick(&[src(a, &h, false)], 0).is_none(),
            "piece 0 has no hash"
        );
        let mut f = Fixture::new(2);
        let none = bf(2, &[]);
        assert!(
            f.pick(&[src(a, &none, false)], 0).is_none(),
            "nobody holds anything"
        );
        let mut full = src(a, &h, false);
        full.inflight = 2;
        f.known = Bitfield::full(2);
        assert!(f.pick(&[full], 0).is_none(), "source at capacity");
    }

    #[test]
    fn endgame_duplicates_to_a_second_source_only() {
        let mut f = Fixture::new(1);
        let (a, b) = (PeerId::random(), PeerId::random());
        let h = bf(1, &[0]);
        f.inflight.insert(0, vec![a]);
        let (piece, who) = f.pick(&[src(a, &h, false), src(b, &h, false)], 3).unwrap();
        assert_eq!((piece, who), (0, b));
        f.inflight.insert(0, vec![a, b]);
        assert!(f.pick(&[src(a, &h, false), src(b, &h, false)], 3).is_none());
        f.inflight.insert(0, vec![a]);
        f.endgame = false;
        assert!(
            f.pick(&[src(a, &h, false), src(b, &h, false)], 3).is_none(),
            "no duplicates before the endgame"
        );
    }

    #[test]
    fn faster_source_gets_more_load() {
        let f = Fixture::new(4);
        let (slow, fast) = (PeerId::random(), PeerId::random());
        let h = bf(4, &[0, 1, 2, 3]);
        let mut s = src(slow, &h, false);
        s.rate = 1e6;
        let mut q = src(fast, &h, false);
        q.rate = 1e8;
        q.inflight = 1;
        let (_, who) = f.pick(&[s, q], 9).unwrap();
        assert_eq!(who, fast);
    }

    #[test]
    fn a_reader_gets_its_next_pieces_in_order_from_a_lone_seed() {
        let mut f = Fixture::new(20);
        let seed = PeerId::random();
        let all = Bitfield::full(20);
        f.reader_at = Some(3);
        f.have = bf(20, &[0, 1, 2, 4]);
        f.inflight.insert(3, vec![seed]);
        // 3 is in flight and 4 held: 5 is next, whatever the random seed.
        for r in 0..20 {
            let s = [src(seed, &all, true)];
            assert_eq!(f.pick(&s, r), Some((5, seed)));
        }
        // Without a reader the pick is random among equally rare pieces.
        f.reader_at = None;
        let s = [src(seed, &all, true)];
        let picks: std::collections::HashSet<u32> =
            (0..40).filter_map(|r| f.pick(&s, r)).map(|p| p.0).collect();
        assert!(picks.len() > 3, "{picks:?}");
    }

    #[test]
    fn a_reader_does_not_pull_seed_pieces_out_of_rarity_order_in_a_swarm() {
        let mut f = Fixture::new(20);
        let (seed, peer) = (PeerId::random(), PeerId::random());
        let all = Bitfield::full(20);
        let peer_has = bf(20, &[9]);
        f.reader_at = Some(0);
        // Pieces 0..8 only the seed has: in a swarm they stay rarest-first (random) ...
        let s = [src(seed, &all, true), src(peer, &peer_has, false)];
        let picks: std::collections::HashSet<u32> =
            (0..40).filter_map(|r| f.pick(&s, r)).map(|p| p.0).collect();
        assert!(picks.len() > 3, "{picks:?}");
        // ... but a piece in the window that a peer holds is taken first, from the peer.
        f.reader_at = Some(5);
        for r in 0..20 {
            assert_eq!(f.pick(&s, r), Some((9, peer)));
        }
    }

    #[test]
    fn a_reader_in_a_swarm_gets_fresh_pieces_near_it_spread_among_peers() {
        let n = 200;
        let mut f = Fixture::new(n);
        let (seed, peer) = (PeerId::random(), PeerId::random());
        let all = Bitfield::full(n);
        let peer_has = bf(n, &[199]);
        f.have = bf(n, &(0..50).collect::<Vec<_>>());
        let s = [src(seed, &all, true), src(peer, &peer_has, false)];
        let picks = |f: &Fixture| -> Vec<u32> {
            (0..100)
                .filter_map(|r| f.pick(&s, r))
                .filter(|p| p.1 == seed)
                .map(|p| p.0)
                .collect()
        };
        // No reader: fresh pieces come from anywhere in the content.
        let anywhere = picks(&f);
        assert!(
            anywhere
                .iter()
                .any(|&i| i >= 50 + FRESH_AHEAD_OF_READER as u32)
        );
        // A reader waits for piece 50: fresh pieces come from just ahead of it, still at random
        // among those (peers starting together ask the seed for different ones).
        f.reader_at = Some(50);
        let near = picks(&f);
        assert_eq!(near.len(), 100);
        assert!(
            near.iter()
                .all(|&i| (50..50 + FRESH_AHEAD_OF_READER as u32).contains(&i)),
            "{near:?}"
        );
        let distinct: std::collections::HashSet<u32> = near.into_iter().collect();
        assert!(distinct.len() > FRESH_AHEAD_OF_READER / 2, "{distinct:?}");
    }
}
