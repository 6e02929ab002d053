//! The data plane: piece bytes over plain TCP.
//!
//! Why not a libp2p protocol: on these machines libp2p's noise + yamux moved 4 MiB pieces at 0.3–0.6 ×
//! curl's speed (ChaCha20 and the muxer dominate the CPU), while a plain TCP copy runs at 1.4 ×.
//! Pieces are checked against their producer-signed sha2-256 hashes on arrival, so the data plane needs
//! no integrity protection of its own; access to it is granted over the authenticated control protocol
//! (see [`Grant`]). Content on this plane is not encrypted (as with Dragonfly's upload server).
//!
//! # Access: grants and the `DFX2` handshake
//!
//! A `get_task` answer over the control protocol (which authenticates both peers) carries a
//! [`Grant`] for the requester: an expiry `expires` (unix seconds; serving nodes issue them for an
//! hour) and `token = HMAC-SHA256(server secret, "df-grant-v2" | u8 n | n bytes: requester peer ID |
//! u64 BE: expires)`. Only the server knows its secret, so it recomputes the token from the peer ID
//! and expiry the client names instead of storing grants. The token itself never crosses the data
//! plane: the client proves it holds it by MACing a fresh server nonce with it.
//!
//! ```text
//! server → client   "DFX2" | 32 bytes: nonce                       (sent at once on accept)
//! client → server   "DFX2" | u8 n | n bytes: requester peer ID | u64 BE: expires | 32 bytes: proof
//!                   proof = HMAC-SHA256(key = token, "df-proof-v2" | nonce | u8 n | peer ID | u64 BE: expires)
//! server → client   u8 handshake status (0 = accepted, 1 = denied, 2 = busy: too many connections)
//! ```
//!
//! The server accepts when `expires` is still in the future by its own clock and the proof matches
//! (compared in constant time). What this gives:
//! - **Replay-proof**: a handshake captured on the wire is useless on a new connection, which gets a
//!   new nonce; the token cannot be derived from it.
//! - **Peer-bound**: a token is only valid together with the peer ID it was issued to; naming another
//!   peer ID makes the server derive a different token.
//! - **Short-lived**: after `expires` new handshakes with the grant are denied and established
//!   connections are closed before their next request; the requester asks `get_task` again for a
//!   fresh grant.
//! - A grant covers every task the server holds: `get_task` hands one to any peer that asks about a
//!   task the server has or is fetching (from the first answer on, before it holds a piece, so the
//!   first request needs no second round trip), so binding it to a task would not narrow who can
//!   read what.
//!
//! Not covered (out of scope): after the handshake the stream is neither encrypted nor
//! authenticated. An on-path attacker can read the pieces and could hijack the TCP stream to send
//! requests of its own on the requester's connection (or corrupt answers, which the piece hashes
//! catch). Peer IDs are cheap to mint, so per-peer limits bound a single identity, not a Sybil.
//!
//! # Requests
//!
//! After an accepted handshake, repeated (one request at a time per connection):
//!
//! ```text
//! client → server   u8 n | n bytes: task key (CID bytes) | u32 BE: piece index
//! server → client   u8 status | u32 BE: length | length bytes of piece (status 0 only)
//! ```
//!
//! A response longer than [`MAX_PIECE_LENGTH`], an unknown status or a short read ends the
//! connection; the requester then treats the source as failed for that piece.
//!
//! # Server limits
//!
//! Every read and write has a deadline: the handshake must complete within a short window, a
//! request may idle until its first byte and must then arrive quickly, and a piece is written in
//! chunks of [`WRITE_CHUNK`] bytes, each of which must drain within a stall timeout — a requester
//! that stops reading loses its upload slot and its connection. Connections in total, connections
//! per peer, connections still in the handshake and uploads per peer are capped; an upload beyond
//! a cap is answered [`PieceStatus::Busy`], a connection beyond the per-peer cap gets handshake
//! status 2.
//!
//! # Decoders
//!
//! Every decoder here takes a byte slice and either returns the message or an error, never panics,
//! and never asks the caller to read (and so allocate) more than [`MAX_HANDSHAKE_LEN`] or
//! [`MAX_REQUEST_LEN`] bytes, or to accept a piece longer than [`MAX_PIECE_LENGTH`].

use std::fmt;

use hmac::{KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::limits::{MAX_PIECE_LENGTH, MAX_TASK_KEY_BYTES};

type HmacSha256 = hmac::Hmac<Sha256>;

/// Magic bytes opening both directions of a data-plane connection.
pub const MAGIC: &[u8; 4] = b"DFX2";
/// Length of an access token and of a handshake proof.
pub const TOKEN_LEN: usize = 32;
/// Length of the server's handshake nonce.
pub const NONCE_LEN: usize = 32;
/// Longest peer ID accepted in a handshake.
pub const MAX_PEER_ID_BYTES: usize = 64;
/// Length of the server's challenge: magic and nonce.
pub const CHALLENGE_LEN: usize = 4 + NONCE_LEN;
/// Length of the fixed start of a handshake (magic and peer-ID length) that tells its full length.
pub const HANDSHAKE_HEAD_LEN: usize = 5;
/// Longest client handshake.
pub const MAX_HANDSHAKE_LEN: usize = HANDSHAKE_HEAD_LEN + MAX_PEER_ID_BYTES + 8 + TOKEN_LEN;
/// Longest piece request.
pub const MAX_REQUEST_LEN: usize = 1 + MAX_TASK_KEY_BYTES + 4;
/// Length of a response header.
pub const RESPONSE_HEADER_LEN: usize = 5;
/// Servers write pieces in chunks of this size, each under a stall timeout.
pub const WRITE_CHUNK: usize = 256 << 10;

/// Domain separation of grant tokens (see the module docs).
pub const GRANT_LABEL: &[u8] = b"df-grant-v2";
/// Domain separation of handshake proofs (see the module docs).
pub const PROOF_LABEL: &[u8] = b"df-proof-v2";

/// Errors in data-plane framing.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TransferError {
    #[error("bad magic in data-plane handshake")]
    BadMagic,
    #[error("field {0} exceeds its size limit")]
    Oversized(&'static str),
    #[error("unknown response status {0}")]
    UnknownStatus(u8),
    #[error("unknown handshake status {0}")]
    UnknownHandshakeStatus(u8),
    #[error("{what} needs {need} bytes, got {got}")]
    Truncated {
        what: &'static str,
        need: usize,
        got: usize,
    },
    #[error("{what} has {extra} trailing bytes")]
    TrailingBytes { what: &'static str, extra: usize },
}

/// A capability to fetch pieces from one peer, bound to the requester's peer ID and an expiry (see
/// the module docs). Hex on the wire; never sent on the data plane.
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

/// What a requester holds to open data-plane connections to one peer: the token and the expiry
/// (unix seconds) it was issued with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub token: AccessToken,
    pub expires: u64,
}

/// The server's per-connection random challenge.
pub type Nonce = [u8; NONCE_LEN];

fn hmac_with(key: &[u8]) -> HmacSha256 {
    match <HmacSha256 as KeyInit>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    }
}

/// The input MACed into a grant token: `"df-grant-v2" | u8 n | peer ID | u64 BE expires`. Servers
/// compute `HMAC-SHA256(secret, this)`.
pub fn grant_message(peer_id: &[u8], expires: u64) -> Result<Vec<u8>, TransferError> {
    if peer_id.is_empty() || peer_id.len() > MAX_PEER_ID_BYTES {
        return Err(TransferError::Oversized("peer id"));
    }
    let mut m = Vec::with_capacity(GRANT_LABEL.len() + 1 + peer_id.len() + 8);
    m.extend_from_slice(GRANT_LABEL);
    m.push(peer_id.len() as u8);
    m.extend_from_slice(peer_id);
    m.extend_from_slice(&expires.to_be_bytes());
    Ok(m)
}

fn proof_mac(token: &AccessToken, nonce: &Nonce, peer_id: &[u8], expires: u64) -> HmacSha256 {
    let mut mac = hmac_with(&token.0);
    mac.update(PROOF_LABEL);
    mac.update(nonce);
    // Peer IDs are bounded by the callers (encoders and decoders) to MAX_PEER_ID_BYTES < 256.
    mac.update(&[peer_id.len().min(u8::MAX as usize) as u8]);
    mac.update(peer_id);
    mac.update(&expires.to_be_bytes());
    mac
}

/// The client's proof of holding `token`: `HMAC-SHA256(token, "df-proof-v2" | nonce | u8 n | peer
/// ID | u64 BE expires)`.
pub fn handshake_proof(
    token: &AccessToken,
    nonce: &Nonce,
    peer_id: &[u8],
    expires: u64,
) -> [u8; TOKEN_LEN] {
    proof_mac(token, nonce, peer_id, expires)
        .finalize()
        .into_bytes()
        .into()
}

/// Checks a handshake proof against the token the server derived, in constant time.
pub fn verify_handshake_proof(
    token: &AccessToken,
    nonce: &Nonce,
    peer_id: &[u8],
    expires: u64,
    proof: &[u8; TOKEN_LEN],
) -> bool {
    proof_mac(token, nonce, peer_id, expires)
        .verify_slice(proof)
        .is_ok()
}

fn exact_len(what: &'static str, buf: &[u8], need: usize) -> Result<(), TransferError> {
    if buf.len() < need {
        return Err(TransferError::Truncated {
            what,
            need,
            got: buf.len(),
        });
    }
    if buf.len() > need {
        return Err(TransferError::TrailingBytes {
            what,
            extra: buf.len() - need,
        });
    }
    Ok(())
}

/// Encodes the server's challenge.
pub fn encode_challenge(nonce: &Nonce) -> [u8; CHALLENGE_LEN] {
    let mut out = [0u8; CHALLENGE_LEN];
    out[..4].copy_from_slice(MAGIC);
    out[4..].copy_from_slice(nonce);
    out
}

/// Decodes the server's challenge (exactly [`CHALLENGE_LEN`] bytes).
pub fn decode_challenge(buf: &[u8]) -> Result<Nonce, TransferError> {
    exact_len("challenge", buf, CHALLENGE_LEN)?;
    if &buf[..4] != MAGIC {
        return Err(TransferError::BadMagic);
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&buf[4..]);
    Ok(nonce)
}

/// A client's handshake, borrowed from the bytes it was decoded from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handshake<'a> {
    pub peer_id: &'a [u8],
    pub expires: u64,
    pub proof: [u8; TOKEN_LEN],
}

/// Encodes the client's handshake answering `nonce` with `grant`.
pub fn encode_handshake(
    peer_id: &[u8],
    grant: &Grant,
    nonce: &Nonce,
) -> Result<Vec<u8>, TransferError> {
    check_peer_id_len(peer_id.len())?;
    let proof = handshake_proof(&grant.token, nonce, peer_id, grant.expires);
    let mut out = Vec::with_capacity(HANDSHAKE_HEAD_LEN + peer_id.len() + 8 + TOKEN_LEN);
    out.extend_from_slice(MAGIC);
    out.push(peer_id.len() as u8);
    out.extend_from_slice(peer_id);
    out.extend_from_slice(&grant.expires.to_be_bytes());
    out.extend_from_slice(&proof);
    Ok(out)
}

fn check_peer_id_len(n: usize) -> Result<usize, TransferError> {
    if n == 0 || n > MAX_PEER_ID_BYTES {
        return Err(TransferError::Oversized("peer id"));
    }
    Ok(n)
}

/// The full length of a handshake from its first [`HANDSHAKE_HEAD_LEN`] bytes (at most
/// [`MAX_HANDSHAKE_LEN`]).
pub fn handshake_len(head: &[u8]) -> Result<usize, TransferError> {
    if head.len() < HANDSHAKE_HEAD_LEN {
        return Err(TransferError::Truncated {
            what: "handshake head",
            need: HANDSHAKE_HEAD_LEN,
            got: head.len(),
        });
    }
    if &head[..4] != MAGIC {
        return Err(TransferError::BadMagic);
    }
    let n = check_peer_id_len(head[4] as usize)?;
    Ok(HANDSHAKE_HEAD_LEN + n + 8 + TOKEN_LEN)
}

/// Decodes a whole handshake (exactly [`handshake_len`] bytes).
pub fn decode_handshake(buf: &[u8]) -> Result<Handshake<'_>, TransferError> {
    let len = handshake_len(buf)?;
    exact_len("handshake", buf, len)?;
    let n = len - HANDSHAKE_HEAD_LEN - 8 - TOKEN_LEN;
    let (peer_id, rest) = buf[HANDSHAKE_HEAD_LEN..].split_at(n);
    let (expires, proof) = rest.split_at(8);
    let mut e = [0u8; 8];
    e.copy_from_slice(expires);
    let mut p = [0u8; TOKEN_LEN];
    p.copy_from_slice(proof);
    Ok(Handshake {
        peer_id,
        expires: u64::from_be_bytes(e),
        proof: p,
    })
}

/// The server's answer to a handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeStatus {
    Accepted,
    /// Bad proof, unknown peer or expired grant: get a fresh grant.
    Denied,
    /// Too many connections from this peer; use the ones already open or try later.
    Busy,
}

impl HandshakeStatus {
    pub fn to_byte(self) -> u8 {
        match self {
            HandshakeStatus::Accepted => 0,
            HandshakeStatus::Denied => 1,
            HandshakeStatus::Busy => 2,
        }
    }

    pub fn from_byte(b: u8) -> Result<HandshakeStatus, TransferError> {
        Ok(match b {
            0 => HandshakeStatus::Accepted,
            1 => HandshakeStatus::Denied,
            2 => HandshakeStatus::Busy,
            other => return Err(TransferError::UnknownHandshakeStatus(other)),
        })
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

/// A piece request, borrowed from the bytes it was decoded from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PieceRequest<'a> {
    pub task_key: &'a [u8],
    pub index: u32,
}

/// Encodes one piece request.
pub fn encode_request(task_key: &[u8], index: u32) -> Result<Vec<u8>, TransferError> {
    check_task_key_len(task_key.len())?;
    let mut out = Vec::with_capacity(1 + task_key.len() + 4);
    out.push(task_key.len() as u8);
    out.extend_from_slice(task_key);
    out.extend_from_slice(&index.to_be_bytes());
    Ok(out)
}

fn check_task_key_len(n: usize) -> Result<usize, TransferError> {
    if n == 0 || n > MAX_TASK_KEY_BYTES {
        return Err(TransferError::Oversized("task key"));
    }
    Ok(n)
}

/// The full length of a request from its first byte (at most [`MAX_REQUEST_LEN`]).
pub fn request_len(first: u8) -> Result<usize, TransferError> {
    Ok(1 + check_task_key_len(first as usize)? + 4)
}

/// Decodes a whole request (exactly [`request_len`] bytes).
pub fn decode_request(buf: &[u8]) -> Result<PieceRequest<'_>, TransferError> {
    let Some(&first) = buf.first() else {
        return Err(TransferError::Truncated {
            what: "request",
            need: 1,
            got: 0,
        });
    };
    let len = request_len(first)?;
    exact_len("request", buf, len)?;
    let (task_key, index) = buf[1..].split_at(len - 5);
    let mut i = [0u8; 4];
    i.copy_from_slice(index);
    Ok(PieceRequest {
        task_key,
        index: u32::from_be_bytes(i),
    })
}

/// Encodes a response header (status and length); the piece bytes follow for [`PieceStatus::Ok`].
pub fn encode_response_header(status: PieceStatus, len: u32) -> [u8; RESPONSE_HEADER_LEN] {
    let mut out = [0u8; RESPONSE_HEADER_LEN];
    out[0] = status.to_byte();
    out[1..].copy_from_slice(&len.to_be_bytes());
    out
}

/// Parses a response header (exactly [`RESPONSE_HEADER_LEN`] bytes), bounding the length.
pub fn decode_response_header(buf: &[u8]) -> Result<(PieceStatus, u32), TransferError> {
    exact_len("response header", buf, RESPONSE_HEADER_LEN)?;
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
            decode_response_header(&h).unwrap(),
            (PieceStatus::Ok, 4 << 20)
        );
        let too_big = encode_response_header(PieceStatus::Ok, MAX_PIECE_LENGTH + 1);
        assert!(decode_response_header(&too_big).is_err());
        assert!(decode_response_header(&[9, 0, 0, 0, 0]).is_err());
        assert!(decode_response_header(&h[..4]).is_err());
    }

    #[test]
    fn request_round_trips_and_bounds() {
        assert!(encode_request(&[0; MAX_TASK_KEY_BYTES + 1], 0).is_err());
        assert!(request_len(0).is_err());
        let r = encode_request(&[1, 2, 3], 77).unwrap();
        assert_eq!(request_len(r[0]).unwrap(), r.len());
        assert_eq!(
            decode_request(&r).unwrap(),
            PieceRequest {
                task_key: &[1, 2, 3],
                index: 77
            }
        );
    }

    #[test]
    fn handshake_round_trips_and_proves_the_token() {
        let grant = Grant {
            token: AccessToken([7; TOKEN_LEN]),
            expires: 1_900_000_000,
        };
        let nonce = [3u8; NONCE_LEN];
        let c = encode_challenge(&nonce);
        assert_eq!(decode_challenge(&c).unwrap(), nonce);
        let hs = encode_handshake(&[1, 2, 3], &grant, &nonce).unwrap();
        assert_eq!(&hs[..4], MAGIC);
        assert_eq!(handshake_len(&hs[..HANDSHAKE_HEAD_LEN]).unwrap(), hs.len());
        let d = decode_handshake(&hs).unwrap();
        assert_eq!(d.peer_id, &[1, 2, 3]);
        assert_eq!(d.expires, grant.expires);
        assert!(verify_handshake_proof(
            &grant.token,
            &nonce,
            d.peer_id,
            d.expires,
            &d.proof
        ));
        // Another nonce, token, peer or expiry does not verify.
        assert!(!verify_handshake_proof(
            &grant.token,
            &[4; NONCE_LEN],
            d.peer_id,
            d.expires,
            &d.proof
        ));
        assert!(!verify_handshake_proof(
            &AccessToken([8; TOKEN_LEN]),
            &nonce,
            d.peer_id,
            d.expires,
            &d.proof
        ));
        assert!(!verify_handshake_proof(
            &grant.token,
            &nonce,
            &[1, 2, 4],
            d.expires,
            &d.proof
        ));
        assert!(!verify_handshake_proof(
            &grant.token,
            &nonce,
            d.peer_id,
            d.expires + 1,
            &d.proof
        ));
        assert!(handshake_len(&[0xffu8; 5]).is_err());
        assert!(encode_handshake(&[0; MAX_PEER_ID_BYTES + 1], &grant, &nonce).is_err());
        assert!(grant_message(&[], 0).is_err());
    }
}
