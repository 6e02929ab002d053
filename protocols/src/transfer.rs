//! The data plane: piece bytes over plain TCP.
//!
//! Why not a libp2p protocol: on these machines libp2p's noise + yamux moved 4 MiB pieces at 0.3–0.6 ×
//! curl's speed (ChaCha20 and the muxer dominate the CPU), while a plain TCP copy runs at 1.4 ×.
//! Pieces are checked against their producer-signed sha2-256 hashes on arrival, so the data plane needs
//! no integrity protection of its own; access to it is granted over the authenticated control protocol
//! (see [`AccessToken`]). Content on this plane is not encrypted (as with Dragonfly's upload server).
//!
//! A connection is:
//!
//! ```text
//! client → server   "DFX1" | u8 n | n bytes: requester peer ID | 32 bytes: access token
//! server → client   u8 handshake status (0 = accepted, 1 = denied)
//! then, repeated (one request at a time per connection):
//! client → server   u8 n | n bytes: task key (CID bytes) | u32 BE: piece index
//! server → client   u8 status | u32 BE: length | length bytes of piece (status 0 only)
//! ```
//!
//! A response longer than [`MAX_PIECE_LENGTH`], an unknown status or a short read ends the
//! connection; the requester then treats the source as failed for that piece.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::limits::{MAX_PIECE_LENGTH, MAX_TASK_KEY_BYTES};

/// Magic bytes opening a data-plane connection.
pub const MAGIC: &[u8; 4] = b"DFX1";
/// Length of an access token.
pub const TOKEN_LEN: usize = 32;
/// Longest peer ID accepted in a handshake.
pub const MAX_PEER_ID_BYTES: usize = 64;

/// Handshake answers.
pub const HANDSHAKE_ACCEPTED: u8 = 0;
pub const HANDSHAKE_DENIED: u8 = 1;

/// Errors in data-plane framing.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TransferError {
    #[error("bad magic in data-plane handshake")]
    BadMagic,
    #[error("field {0} exceeds its size limit")]
    Oversized(&'static str),
    #[error("unknown response status {0}")]
    UnknownStatus(u8),
}

/// A capability to fetch pieces from one peer: `HMAC-SHA256(peer secret, requester peer ID)`, handed
/// out in a `get_task` answer over the authenticated control protocol. Hex on the wire.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct AccessToken(pub [u8; TOKEN_LEN]);

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AccessToken(…)")
    }
}

impl Serialize for AccessToken {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(self.0))
    }
}

impl<'de> Deserialize<'de> for AccessToken {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let mut out = [0u8; TOKEN_LEN];
        hex::decode_to_slice(&s, &mut out).map_err(serde::de::Error::custom)?;
        Ok(AccessToken(out))
    }
}

/// Status of a piece response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceStatus {
    /// The piece follows.
    Ok,
    /// The server does not hold that piece.
    NotFound,
    /// The server is at its upload limit; ask elsewhere or later.
    Busy,
    /// The server failed reading it.
    Error,
}

impl PieceStatus {
    pub fn to_byte(self) -> u8 {
        match self {
            PieceStatus::Ok => 0,
            PieceStatus::NotFound => 1,
            PieceStatus::Busy => 2,
            PieceStatus::Error => 3,
        }
    }

    pub fn from_byte(b: u8) -> Result<PieceStatus, TransferError> {
        Ok(match b {
            0 => PieceStatus::Ok,
            1 => PieceStatus::NotFound,
            2 => PieceStatus::Busy,
            3 => PieceStatus::Error,
            other => return Err(TransferError::UnknownStatus(other)),
        })
    }
}

/// Encodes the client's handshake.
pub fn encode_handshake(peer_id: &[u8], token: &AccessToken) -> Result<Vec<u8>, TransferError> {
    if peer_id.len() > MAX_PEER_ID_BYTES {
        return Err(TransferError::Oversized("peer id"));
    }
    let mut out = Vec::with_capacity(4 + 1 + peer_id.len() + TOKEN_LEN);
    out.extend_from_slice(MAGIC);
    out.push(peer_id.len() as u8);
    out.extend_from_slice(peer_id);
    out.extend_from_slice(&token.0);
    Ok(out)
}

/// Checks a peer-ID length byte of a handshake.
pub fn check_peer_id_len(n: u8) -> Result<usize, TransferError> {
    let n = n as usize;
    if n == 0 || n > MAX_PEER_ID_BYTES {
        return Err(TransferError::Oversized("peer id"));
    }
    Ok(n)
}

/// Encodes one piece request.
pub fn encode_request(task_key: &[u8], index: u32) -> Result<Vec<u8>, TransferError> {
    if task_key.len() > MAX_TASK_KEY_BYTES {
        return Err(TransferError::Oversized("task key"));
    }
    let mut out = Vec::with_capacity(1 + task_key.len() + 4);
    out.push(task_key.len() as u8);
    out.extend_from_slice(task_key);
    out.extend_from_slice(&index.to_be_bytes());
    Ok(out)
}

/// Checks a task-key length byte of a request.
pub fn check_task_key_len(n: u8) -> Result<usize, TransferError> {
    let n = n as usize;
    if n == 0 || n > MAX_TASK_KEY_BYTES {
        return Err(TransferError::Oversized("task key"));
    }
    Ok(n)
}

/// Encodes a response header (status and length); the piece bytes follow for [`PieceStatus::Ok`].
pub fn encode_response_header(status: PieceStatus, len: u32) -> [u8; 5] {
    let mut out = [0u8; 5];
    out[0] = status.to_byte();
    out[1..].copy_from_slice(&len.to_be_bytes());
    out
}

/// Parses a response header, bounding the length.
pub fn decode_response_header(buf: [u8; 5]) -> Result<(PieceStatus, u32), TransferError> {
    let status = PieceStatus::from_byte(buf[0])?;
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len > MAX_PIECE_LENGTH {
        return Err(TransferError::Oversized("piece"));
    }
    Ok((status, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_header_round_trips_and_bounds() {
        let h = encode_response_header(PieceStatus::Ok, 4 << 20);
        assert_eq!(
            decode_response_header(h).unwrap(),
            (PieceStatus::Ok, 4 << 20)
        );
        let too_big = encode_response_header(PieceStatus::Ok, MAX_PIECE_LENGTH + 1);
        assert!(decode_response_header(too_big).is_err());
        assert!(decode_response_header([9, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn request_and_handshake_bounds() {
        assert!(encode_request(&[0; MAX_TASK_KEY_BYTES + 1], 0).is_err());
        assert!(check_task_key_len(0).is_err());
        assert!(check_peer_id_len(200).is_err());
        let hs = encode_handshake(&[1, 2, 3], &AccessToken([7; TOKEN_LEN])).unwrap();
        assert_eq!(&hs[..4], MAGIC);
        assert_eq!(hs.len(), 4 + 1 + 3 + TOKEN_LEN);
    }
}
