//! Direct haves, `/df/have/1`: "I now hold these pieces of this task", sent by a node straight to
//! each connected peer on the task's topic, on one long-lived libp2p stream per peer pair.
//!
//! Why besides gossip: a have on the task topic is signed by its author, checked by every receiver
//! and relayed along the mesh, so each costs an Ed25519 signature, one verification per node, and a
//! send (with its timer) per mesh link. The libp2p connection already authenticates its peer (noise)
//! and admits only swarm members (the swarm key), so a have sent on it needs no signature, and a
//! node sends each have once per interested peer instead of once per mesh link. Gossip keeps the
//! task's first have and its last (`complete`), so peers that are not connected still learn of a
//! new holder (and connect to it).
//!
//! The stream carries only frames, one direction (opener → acceptor), no answers:
//!
//! ```text
//! u32 BE: frame length L (at most MAX_HAVE_FRAME)
//! u8 n | n bytes: task key (CID bytes)
//! u8 flags: bit 0 = complete (the sender holds every piece); other bits 0
//! L − 2 − n bytes: piece indexes, u32 BE each (at most MAX_HAVE_PIECES_PER_FRAME)
//! ```
//!
//! A frame that breaks a rule ends the stream. Haves are hints: a receiver checks the indexes
//! against the task's piece count, and every piece fetched is checked against its producer-signed
//! hash whoever announced it, so a false have costs the liar its requesters, not anyone's data.

use crate::limits::MAX_TASK_KEY_BYTES;
use crate::task::TaskKey;

/// Protocol name of the direct-have stream.
pub const HAVE_PROTOCOL: &str = "/df/have/1";

/// Most piece indexes in one frame.
pub const MAX_HAVE_PIECES_PER_FRAME: usize = 8192;

/// Largest frame body (after its length prefix).
pub const MAX_HAVE_FRAME: usize = 2 + MAX_TASK_KEY_BYTES + 4 * MAX_HAVE_PIECES_PER_FRAME;

const FLAG_COMPLETE: u8 = 1;

/// Why a have frame was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HaveCodecError {
    #[error("have frame of {0} bytes exceeds the limit of {MAX_HAVE_FRAME}")]
    TooLarge(usize),
    #[error("invalid have frame: {0}")]
    Invalid(&'static str),
}

/// One direct have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaveFrame {
    pub task: TaskKey,
    pub pieces: Vec<u32>,
    /// The sender holds every piece of the task.
    pub complete: bool,
}

/// The body length a frame's prefix announces, if it is within [`MAX_HAVE_FRAME`] (checked before
/// the body is read).
pub fn check_length(prefix: [u8; 4]) -> Result<usize, HaveCodecError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_HAVE_FRAME {
        return Err(HaveCodecError::TooLarge(len));
    }
    Ok(len)
}

impl HaveFrame {
    /// The frame with its length prefix, ready to be written.
    pub fn encode(&self) -> Result<Vec<u8>, HaveCodecError> {
        if self.pieces.len() > MAX_HAVE_PIECES_PER_FRAME {
            return Err(HaveCodecError::Invalid("too many pieces"));
        }
        let key = self.task.to_bytes();
        if key.len() > MAX_TASK_KEY_BYTES {
            return Err(HaveCodecError::Invalid("task key too long"));
        }
        let body_len = 2 + key.len() + 4 * self.pieces.len();
        let mut out = Vec::with_capacity(4 + body_len);
        out.extend_from_slice(&(body_len as u32).to_be_bytes());
        out.push(key.len() as u8);
        out.extend_from_slice(&key);
        out.push(if self.complete { FLAG_COMPLETE } else { 0 });
        for i in &self.pieces {
            out.extend_from_slice(&i.to_be_bytes());
        }
        Ok(out)
    }

    /// Parses a frame body (without its length prefix).
    pub fn decode(body: &[u8]) -> Result<HaveFrame, HaveCodecError> {
        if body.len() > MAX_HAVE_FRAME {
            return Err(HaveCodecError::TooLarge(body.len()));
        }
        let (&n, rest) = body
            .split_first()
            .ok_or(HaveCodecError::Invalid("empty frame"))?;
        let n = n as usize;
        if n == 0 || n > MAX_TASK_KEY_BYTES || rest.len() < n + 1 {
            return Err(HaveCodecError::Invalid("bad task key length"));
        }
        let task =
            TaskKey::from_bytes(&rest[..n]).map_err(|_| HaveCodecError::Invalid("bad task key"))?;
        let flags = rest[n];
        if flags & !FLAG_COMPLETE != 0 {
            return Err(HaveCodecError::Invalid("unknown flags"));
        }
        let indexes = &rest[n + 1..];
        if indexes.len() % 4 != 0 {
            return Err(HaveCodecError::Invalid(
                "piece list not a multiple of 4 bytes",
            ));
        }
        let pieces = indexes
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(HaveFrame {
            task,
            pieces,
            complete: flags & FLAG_COMPLETE != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> TaskKey {
        let url = crate::task::parse_url("http://origin.test/file").expect("url");
        TaskKey::for_url(&url, "")
    }

    fn split(frame: &[u8]) -> (usize, &[u8]) {
        let len = check_length(frame[..4].try_into().expect("prefix")).expect("length");
        (len, &frame[4..])
    }

    #[test]
    fn frames_round_trip_with_their_length_prefix() {
        for (pieces, complete) in [(vec![], true), (vec![0, 7, u32::MAX], false)] {
            let f = HaveFrame {
                task: key(),
                pieces,
                complete,
            };
            let wire = f.encode().expect("encode");
            let (len, body) = split(&wire);
            assert_eq!(len, body.len());
            assert_eq!(HaveFrame::decode(body), Ok(f));
        }
    }

    #[test]
    fn the_largest_frame_fits_and_one_piece_more_does_not() {
        let mut f = HaveFrame {
            task: key(),
            pieces: (0..MAX_HAVE_PIECES_PER_FRAME as u32).collect(),
            complete: false,
        };
        let wire = f.encode().expect("a full frame encodes");
        assert!(wire.len() - 4 <= MAX_HAVE_FRAME);
        assert_eq!(
            HaveFrame::decode(&wire[4..]).expect("decodes").pieces.len(),
            8192
        );
        f.pieces.push(1);
        assert!(f.encode().is_err());
    }

    #[test]
    fn oversized_lengths_are_refused_before_the_body_is_read() {
        let too_big = (MAX_HAVE_FRAME as u32 + 1).to_be_bytes();
        assert_eq!(
            check_length(too_big),
            Err(HaveCodecError::TooLarge(MAX_HAVE_FRAME + 1))
        );
        assert!(check_length(u32::MAX.to_be_bytes()).is_err());
        assert_eq!(
            HaveFrame::decode(&vec![0; MAX_HAVE_FRAME + 1]),
            Err(HaveCodecError::TooLarge(MAX_HAVE_FRAME + 1))
        );
    }

    #[test]
    fn malformed_bodies_are_errors_not_panics() {
        let good = HaveFrame {
            task: key(),
            pieces: vec![1, 2],
            complete: false,
        }
        .encode()
        .expect("encode");
        let body = &good[4..];
        let n = body[0] as usize;
        // Empty, a zero-length key, a key longer than the body, a truncated index, unknown flags,
        // and a key that is no CID.
        let mut unknown_flag = body.to_vec();
        unknown_flag[1 + n] = 2;
        let mut not_a_cid = body.to_vec();
        not_a_cid[1..1 + n].fill(0xff);
        let cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![0, 0],
            vec![200, 1, 2, 3],
            body[..body.len() - 1].to_vec(),
            body[..1 + n].to_vec(),
            unknown_flag,
            not_a_cid,
        ];
        for c in cases {
            assert!(
                matches!(HaveFrame::decode(&c), Err(HaveCodecError::Invalid(_))),
                "{c:?} was accepted"
            );
        }
        // Every truncation of a good body is refused or, cut on an index boundary, a shorter list.
        for cut in 0..body.len() {
            if let Ok(f) = HaveFrame::decode(&body[..cut]) {
                assert!(f.pieces.len() < 2);
            }
        }
    }
}
