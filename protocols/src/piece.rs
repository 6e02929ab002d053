//! Pieces: fixed-size slices of a task's content, each named by the sha2-256 of its bytes.
//!
//! The piece length is chosen by whoever fetches the origin ([`piece_length_for`]) and fixed in the
//! task's header: 512 KiB, or larger for big files so that a task has about 1000 pieces at most,
//! up to 64 MiB. The last piece may be short. A 0-byte task has no pieces.
//!
//! Why small pieces: a piece is forwarded only once it is whole and verified, so each hop costs a
//! piece's transfer time, and every peer's lag behind the seed grows with it. On the testnet bench
//! (4 peers, 32 MiB, 100 Mbit/s links, T* = 2.68 s) 4 MiB pieces gave df p50 8.0 s / max 8.3 s,
//! 1 MiB pieces 4.7 s / 4.9 s (aria2 BitTorrent in the same runs: 7.7-7.8 s), and on a later main
//! 1 MiB 4.26 s / 4.29 s, 512 KiB 3.77-3.86 s / 3.83-3.88 s, 256 KiB 3.51 s / 3.51 s. For 256 MiB
//! to 8 peers, 1 MiB, 512 KiB and 256 KiB pieces all ended within noise (p50 26.9, 26.5, 27.1 s),
//! the last with 1.5 x the peers' CPU: hence about 1000 pieces, not more.
//!
//! Why not smaller than 512 KiB: on unshaped loopback, where a piece's transfer is short and its
//! fixed costs (request, hash announcement, store record, wake-ups of the readers) are not, the
//! `image_pull` bench (4 hosts, layers of 64/32/16/4 MiB; one build, [`MIN_PIECE_LENGTH`] the only
//! difference) took 1.67-1.74 x direct with 1 MiB pieces, 1.89-2.23 x with 512 KiB and
//! 2.22-2.52 x with 256 KiB. 512 KiB keeps the shaped 32 MiB bench within 1.5 T* and costs the
//! unshaped pull the least of the two that do.

use std::fmt;
use std::ops::Range;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::limits::{MAX_PIECE_LENGTH, MAX_PIECES, MIN_PIECE_LENGTH};
use crate::task::{CODEC_RAW, MH_SHA2_256};

/// The piece length for content of `content_length` bytes:
/// clamp(next power of two of length/1000, 512 KiB, 64 MiB).
pub fn piece_length_for(content_length: u64) -> u32 {
    let target = (content_length / 1000).max(1).next_power_of_two();
    target.clamp(u64::from(MIN_PIECE_LENGTH), u64::from(MAX_PIECE_LENGTH)) as u32
}

/// The geometry of a task's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PieceLayout {
    pub content_length: u64,
    pub piece_length: u32,
}

/// Why a layout is not acceptable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("piece length {0} is outside the accepted range")]
    PieceLength(u32),
    #[error("{0} pieces exceed the limit of {MAX_PIECES}")]
    TooManyPieces(u64),
}

impl PieceLayout {
    /// The layout df uses for content of this length.
    pub fn for_length(content_length: u64) -> PieceLayout {
        PieceLayout {
            content_length,
            piece_length: piece_length_for(content_length),
        }
    }

    /// Checks a layout received from a peer.
    pub fn validate(&self) -> Result<(), LayoutError> {
        if self.piece_length == 0 || self.piece_length > MAX_PIECE_LENGTH {
            return Err(LayoutError::PieceLength(self.piece_length));
        }
        let n = self.content_length.div_ceil(u64::from(self.piece_length));
        if n > u64::from(MAX_PIECES) {
            return Err(LayoutError::TooManyPieces(n));
        }
        Ok(())
    }

    /// Number of pieces (0 for empty content). Only meaningful for a validated layout.
    pub fn piece_count(&self) -> u32 {
        if self.piece_length == 0 {
            return 0;
        }
        self.content_length
            .div_ceil(u64::from(self.piece_length))
            .min(u64::from(u32::MAX)) as u32
    }

    /// Byte range of piece `index` within the content.
    pub fn piece_range(&self, index: u32) -> Range<u64> {
        let start = u64::from(index) * u64::from(self.piece_length);
        let end = (start + u64::from(self.piece_length)).min(self.content_length);
        start.min(end)..end
    }

    /// Length of piece `index`.
    pub fn piece_len(&self, index: u32) -> u32 {
        let r = self.piece_range(index);
        (r.end - r.start) as u32
    }

    /// The piece holding byte `offset`.
    pub fn piece_at(&self, offset: u64) -> u32 {
        if self.piece_length == 0 {
            return 0;
        }
        (offset / u64::from(self.piece_length)).min(u64::from(u32::MAX)) as u32
    }
}

/// sha2-256 of a piece's bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PieceHash(pub [u8; 32]);

impl PieceHash {
    pub fn of(data: &[u8]) -> PieceHash {
        PieceHash(Sha256::digest(data).into())
    }

    /// The piece's CID (v1, raw, sha2-256): how a piece is named in logs and on the wire spec.
    pub fn cid(&self) -> cid::Cid {
        cid::Cid::new_v1(
            CODEC_RAW,
            multihash::Multihash::wrap(MH_SHA2_256, &self.0).unwrap_or_default(),
        )
    }
}

impl fmt::Debug for PieceHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PieceHash({})", hex::encode(&self.0[..8]))
    }
}

impl Serialize for PieceHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(self.0))
    }
}

impl<'de> Deserialize<'de> for PieceHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(&s, &mut out).map_err(serde::de::Error::custom)?;
        Ok(PieceHash(out))
    }
}

/// Which pieces of a task a peer holds. Serialised as `{"len":N,"bits":"<hex>"}`, bit i of byte i/8
/// (most significant first) set when piece i is held.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Bitfield {
    len: u32,
    bits: Vec<u8>,
}

impl Bitfield {
    pub fn new(len: u32) -> Bitfield {
        Bitfield {
            len,
            bits: vec![0; (len as usize).div_ceil(8)],
        }
    }

    pub fn full(len: u32) -> Bitfield {
        let mut b = Bitfield::new(len);
        for i in 0..len {
            b.set(i);
        }
        b
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, i: u32) -> bool {
        i < self.len && self.bits[(i / 8) as usize] & (0x80 >> (i % 8)) != 0
    }

    /// Sets bit `i`; returns whether it was newly set. Out-of-range indexes are ignored.
    pub fn set(&mut self, i: u32) -> bool {
        if i >= self.len {
            return false;
        }
        let byte = &mut self.bits[(i / 8) as usize];
        let mask = 0x80 >> (i % 8);
        let new = *byte & mask == 0;
        *byte |= mask;
        new
    }

    pub fn clear(&mut self, i: u32) {
        if i < self.len {
            self.bits[(i / 8) as usize] &= !(0x80 >> (i % 8));
        }
    }

    pub fn count(&self) -> u32 {
        self.bits.iter().map(|b| b.count_ones()).sum()
    }

    pub fn is_complete(&self) -> bool {
        self.count() == self.len
    }

    pub fn iter_set(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.len).filter(|&i| self.get(i))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bits
    }

    /// Rebuilds a bitfield from its bytes; `None` when the sizes disagree or padding bits are set.
    pub fn from_bytes(len: u32, bits: Vec<u8>) -> Option<Bitfield> {
        if bits.len() != (len as usize).div_ceil(8) {
            return None;
        }
        if !len.is_multiple_of(8) {
            let last = *bits.last()?;
            if last & (0xff >> (len % 8)) != 0 {
                return None;
            }
        }
        Some(Bitfield { len, bits })
    }
}

impl fmt::Debug for Bitfield {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bitfield({}/{})", self.count(), self.len)
    }
}

#[derive(Serialize, Deserialize)]
struct BitfieldWire {
    len: u32,
    bits: String,
}

impl Serialize for Bitfield {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        BitfieldWire {
            len: self.len,
            bits: hex::encode(&self.bits),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Bitfield {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = BitfieldWire::deserialize(d)?;
        if w.len > MAX_PIECES {
            return Err(serde::de::Error::custom("bitfield too long"));
        }
        // Checked before decoding: the decoded bytes are never more than `len` calls for.
        if w.bits.len() != 2 * (w.len as usize).div_ceil(8) {
            return Err(serde::de::Error::custom(
                "bitfield bits do not match its length",
            ));
        }
        let bits = hex::decode(&w.bits).map_err(serde::de::Error::custom)?;
        Bitfield::from_bytes(w.len, bits).ok_or_else(|| serde::de::Error::custom("bad bitfield"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn piece_length_is_clamped_power_of_two() {
        assert_eq!(piece_length_for(0), 512 << 10);
        assert_eq!(piece_length_for(32 * MIB), 512 << 10);
        assert_eq!(piece_length_for(250 * MIB), 512 << 10);
        assert_eq!(piece_length_for(256 * MIB), 512 << 10);
        assert_eq!(piece_length_for(500 * MIB), 512 << 10);
        assert_eq!(piece_length_for(513 * MIB), 1 << 20);
        assert_eq!(piece_length_for(600 * MIB), 1 << 20);
        assert_eq!(piece_length_for(1024 * MIB), 2 << 20);
        assert_eq!(piece_length_for(4000 * MIB), 4 << 20);
        assert_eq!(piece_length_for(1 << 50), 64 << 20);
    }

    #[test]
    fn layout_boundaries() {
        let p = u64::from(MIN_PIECE_LENGTH);
        for (len, count, last) in [
            (0u64, 0u32, 0u32),
            (1, 1, 1),
            (p - 1, 1, (p - 1) as u32),
            (p, 1, p as u32),
            (p + 1, 2, 1),
        ] {
            let l = PieceLayout::for_length(len);
            assert_eq!(l.piece_count(), count, "len {len}");
            if count > 0 {
                assert_eq!(l.piece_len(count - 1), last, "len {len}");
                assert_eq!(l.piece_range(count - 1).end, len);
            }
        }
    }

    #[test]
    fn layout_validation_rejects_hostile_values() {
        assert!(
            PieceLayout {
                content_length: 10,
                piece_length: 0
            }
            .validate()
            .is_err()
        );
        assert!(
            PieceLayout {
                content_length: u64::MAX,
                piece_length: 1
            }
            .validate()
            .is_err()
        );
        assert!(PieceLayout::for_length(1 << 40).validate().is_ok());
    }

    #[test]
    fn bitfield_set_get_and_wire_round_trip() {
        let mut b = Bitfield::new(11);
        assert!(b.set(0));
        assert!(!b.set(0));
        assert!(b.set(10));
        assert!(!b.set(11));
        assert_eq!(b.iter_set().collect::<Vec<_>>(), vec![0, 10]);
        let json = serde_json::to_string(&b).unwrap();
        let back: Bitfield = serde_json::from_str(&json).unwrap();
        assert_eq!(back, b);
        assert!(Bitfield::full(11).is_complete());
        // padding bits set: rejected
        assert!(serde_json::from_str::<Bitfield>(r#"{"len":1,"bits":"ff"}"#).is_err());
        assert!(serde_json::from_str::<Bitfield>(r#"{"len":9,"bits":"ff"}"#).is_err());
    }

    #[test]
    fn piece_hash_is_sha256_and_names_a_raw_cid() {
        let h = PieceHash::of(b"");
        assert_eq!(
            hex::encode(h.0),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(h.cid().codec(), CODEC_RAW);
    }
}
