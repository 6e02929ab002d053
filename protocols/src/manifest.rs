//! What a producer (whoever fetched the origin: normally a seed) says about a task, and how peers
//! check it.
//!
//! * [`TaskHeader`]: key, source URL (canonical: no userinfo, no fragment, and none of the query
//!   parameters [`canonical_url`] removes), content length, piece length,
//!   whole-content digest when known, origin validators (ETag, Last-Modified), producer's peer ID.
//!   Published once, as soon as the origin's first response arrives.
//! * [`SignedPieceHash`]: one piece's sha2-256, published as soon as the producer has fetched that
//!   piece, so peers start before the producer has finished. Each is signed on its own, so a late
//!   joiner can check a partial manifest piece by piece, and a second producer taking over a task
//!   whose first producer died adds hashes under its own key.
//!
//! Signatures are ed25519 by the producer's libp2p identity; the public key is recovered from the
//! peer ID (ed25519 peer IDs inline their key). Signed bytes are domain-separated:
//! `"df/header/v1\0" ‖ JSON(header)` and `"df/piece/v1\0" ‖ task key ‖ index (u32 BE) ‖ hash`.
//! Whether a producer is *trusted* is the node's policy, not this module's.
//!
//! [`canonical_url`]: crate::task::canonical_url

use std::fmt;

use libp2p_identity::{Keypair, PeerId, PublicKey};
use serde::{Deserialize, Serialize};

use crate::limits::{MAX_HASHES_PER_GOSSIP, MAX_PIECES, MAX_URL_LEN, at_most_max_pieces};
use crate::piece::{LayoutError, PieceHash, PieceLayout};
use crate::task::{ContentDigest, TaskKey};

const HEADER_DOMAIN: &[u8] = b"df/header/v1\0";
const PIECE_DOMAIN: &[u8] = b"df/piece/v1\0";
const MAX_SIGNATURE: usize = 128;
const MAX_VALIDATOR: usize = 512;

/// Errors checking what a producer published.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("producer {0} has no inline public key")]
    NoPublicKey(PeerId),
    #[error("bad signature from {0}")]
    BadSignature(PeerId),
    #[error("header is for task {got}, expected {expected}")]
    WrongTask { expected: String, got: String },
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("piece index {index} out of range (task has {count} pieces)")]
    IndexOutOfRange { index: u32, count: u32 },
    #[error("field {0} exceeds its size limit")]
    Oversized(&'static str),
    #[error("signing failed: {0}")]
    Signing(String),
}

/// A signature (ed25519: 64 bytes), hex on the wire.
#[derive(Clone, PartialEq, Eq)]
pub struct Signature(pub Vec<u8>);

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Signature({}…)",
            hex::encode(self.0.get(..4).unwrap_or(&[]))
        )
    }
}

impl Serialize for Signature {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Signature {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.len() > 2 * MAX_SIGNATURE {
            return Err(serde::de::Error::custom("signature too long"));
        }
        hex::decode(&s)
            .map(Signature)
            .map_err(serde::de::Error::custom)
    }
}

/// Origin validators: a changed ETag or Last-Modified means the origin's content changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Validators {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_modified: Option<String>,
}

/// The producer's description of a task (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskHeader {
    pub task: TaskKey,
    pub source_url: String,
    pub content_length: u64,
    pub piece_length: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_digest: Option<ContentDigest>,
    #[serde(default)]
    pub validators: Validators,
    pub producer: PeerId,
}

impl TaskHeader {
    pub fn layout(&self) -> PieceLayout {
        PieceLayout {
            content_length: self.content_length,
            piece_length: self.piece_length,
        }
    }

    fn signing_bytes(&self) -> Vec<u8> {
        let mut out = HEADER_DOMAIN.to_vec();
        // A struct of strings and integers always serialises.
        out.extend(serde_json::to_vec(self).unwrap_or_default());
        out
    }

    pub fn sign(self, key: &Keypair) -> Result<SignedHeader, ManifestError> {
        let sig = key
            .sign(&self.signing_bytes())
            .map_err(|e| ManifestError::Signing(e.to_string()))?;
        Ok(SignedHeader {
            header: self,
            signature: Signature(sig),
        })
    }
}

/// A [`TaskHeader`] with its producer's signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedHeader {
    pub header: TaskHeader,
    pub signature: Signature,
}

impl SignedHeader {
    /// Checks the signature, the layout and field sizes, and that it is for `task`.
    pub fn verify(&self, task: &TaskKey) -> Result<(), ManifestError> {
        let h = &self.header;
        if &h.task != task {
            return Err(ManifestError::WrongTask {
                expected: task.to_string(),
                got: h.task.to_string(),
            });
        }
        if h.source_url.len() > MAX_URL_LEN {
            return Err(ManifestError::Oversized("source_url"));
        }
        let v = &h.validators;
        if v.etag.as_ref().is_some_and(|s| s.len() > MAX_VALIDATOR)
            || v.last_modified
                .as_ref()
                .is_some_and(|s| s.len() > MAX_VALIDATOR)
        {
            return Err(ManifestError::Oversized("validators"));
        }
        h.layout().validate()?;
        verify_signature(&h.producer, &h.signing_bytes(), &self.signature)
    }
}

/// One piece's hash, signed by its producer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedPieceHash {
    pub index: u32,
    pub hash: PieceHash,
    pub signature: Signature,
}

fn piece_signing_bytes(task: &TaskKey, index: u32, hash: &PieceHash) -> Vec<u8> {
    let mut out = PIECE_DOMAIN.to_vec();
    out.extend(task.to_bytes());
    out.extend(index.to_be_bytes());
    out.extend(hash.0);
    out
}

impl SignedPieceHash {
    pub fn sign(
        task: &TaskKey,
        index: u32,
        hash: PieceHash,
        key: &Keypair,
    ) -> Result<SignedPieceHash, ManifestError> {
        let sig = key
            .sign(&piece_signing_bytes(task, index, &hash))
            .map_err(|e| ManifestError::Signing(e.to_string()))?;
        Ok(SignedPieceHash {
            index,
            hash,
            signature: Signature(sig),
        })
    }

    pub fn verify(&self, task: &TaskKey, producer: &PeerId) -> Result<(), ManifestError> {
        verify_signature(
            producer,
            &piece_signing_bytes(task, self.index, &self.hash),
            &self.signature,
        )
    }
}

/// Piece hashes signed by one producer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PieceHashBatch {
    pub producer: PeerId,
    #[serde(deserialize_with = "at_most_max_pieces")]
    pub hashes: Vec<SignedPieceHash>,
}

impl PieceHashBatch {
    /// Checks every signature and that every index is below `piece_count`.
    pub fn verify(&self, task: &TaskKey, piece_count: u32) -> Result<(), ManifestError> {
        self.verify_unknown(task, piece_count, |_| None)
    }

    /// As [`PieceHashBatch::verify`], but skips the signature of a hash that `known` already gives
    /// for its piece (it was checked when it became known); every index is still checked, and a
    /// different hash for a known piece is checked too.
    pub fn verify_unknown(
        &self,
        task: &TaskKey,
        piece_count: u32,
        known: impl Fn(u32) -> Option<PieceHash>,
    ) -> Result<(), ManifestError> {
        if self.hashes.len() > MAX_PIECES as usize {
            return Err(ManifestError::Oversized("hashes"));
        }
        for h in &self.hashes {
            if h.index >= piece_count {
                return Err(ManifestError::IndexOutOfRange {
                    index: h.index,
                    count: piece_count,
                });
            }
            if known(h.index) != Some(h.hash) {
                h.verify(task, &self.producer)?;
            }
        }
        Ok(())
    }

    /// Splits into batches small enough for one gossip message.
    pub fn chunks_for_gossip(&self) -> impl Iterator<Item = PieceHashBatch> + '_ {
        self.hashes
            .chunks(MAX_HASHES_PER_GOSSIP)
            .map(|c| PieceHashBatch {
                producer: self.producer,
                hashes: c.to_vec(),
            })
    }
}

/// The public key inlined in an ed25519 peer ID.
pub fn public_key_of(peer: &PeerId) -> Option<PublicKey> {
    let mh: &multihash::Multihash<64> = peer.as_ref();
    if mh.code() != 0 {
        return None;
    }
    PublicKey::try_decode_protobuf(mh.digest()).ok()
}

fn verify_signature(peer: &PeerId, msg: &[u8], sig: &Signature) -> Result<(), ManifestError> {
    let key = public_key_of(peer).ok_or(ManifestError::NoPublicKey(*peer))?;
    if key.verify(msg, &sig.0) {
        Ok(())
    } else {
        Err(ManifestError::BadSignature(*peer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::parse_url;

    fn header(key: &Keypair) -> TaskHeader {
        let url = parse_url("http://origin/file").unwrap();
        TaskHeader {
            task: TaskKey::for_url(&url, ""),
            source_url: url.to_string(),
            content_length: 10 << 20,
            piece_length: 4 << 20,
            content_digest: None,
            validators: Validators {
                etag: Some("\"abc\"".into()),
                last_modified: None,
            },
            producer: key.public().to_peer_id(),
        }
    }

    #[test]
    fn verify_unknown_skips_only_hashes_already_known_as_they_are() {
        let key = Keypair::generate_ed25519();
        let task = header(&key).task;
        let sign = |i: u32, h: &[u8]| SignedPieceHash::sign(&task, i, PieceHash::of(h), &key);
        let mut known_bad = sign(0, b"a").unwrap();
        known_bad.signature.0[0] ^= 1;
        let batch = PieceHashBatch {
            producer: key.public().to_peer_id(),
            hashes: vec![known_bad, sign(1, b"b").unwrap()],
        };
        let known = |i: u32| (i == 0).then(|| PieceHash::of(b"a"));
        // Piece 0's hash is known as it is: its (broken) signature is not checked.
        assert!(batch.verify_unknown(&task, 2, known).is_ok());
        assert!(batch.verify(&task, 2).is_err());
        // Known as another hash: checked, and the broken signature is caught.
        assert!(
            batch
                .verify_unknown(&task, 2, |i| (i == 0).then(|| PieceHash::of(b"z")))
                .is_err()
        );
        // Indexes are checked whatever is known.
        assert!(batch.verify_unknown(&task, 1, known).is_err());
    }

    #[test]
    fn signed_header_verifies_and_tampering_is_caught() {
        let key = Keypair::generate_ed25519();
        let signed = header(&key).sign(&key).unwrap();
        let task = signed.header.task;
        signed.verify(&task).unwrap();

        let mut tampered = signed.clone();
        tampered.header.content_length += 1;
        assert!(matches!(
            tampered.verify(&task),
            Err(ManifestError::BadSignature(_))
        ));

        let other = Keypair::generate_ed25519();
        let mut forged = signed.clone();
        forged.header.producer = other.public().to_peer_id();
        assert!(forged.verify(&task).is_err());

        let wrong_task = TaskKey::for_url(&parse_url("http://x/y").unwrap(), "");
        assert!(matches!(
            signed.verify(&wrong_task),
            Err(ManifestError::WrongTask { .. })
        ));
    }

    #[test]
    fn piece_hashes_verify_per_piece() {
        let key = Keypair::generate_ed25519();
        let h = header(&key);
        let task = h.task;
        let batch = PieceHashBatch {
            producer: h.producer,
            hashes: (0..3)
                .map(|i| SignedPieceHash::sign(&task, i, PieceHash::of(&[i as u8]), &key).unwrap())
                .collect(),
        };
        batch.verify(&task, 3).unwrap();
        assert!(matches!(
            batch.verify(&task, 2),
            Err(ManifestError::IndexOutOfRange { .. })
        ));
        let mut bad = batch.clone();
        bad.hashes[1].hash = PieceHash::of(b"evil");
        assert!(bad.verify(&task, 3).is_err());
        let json = serde_json::to_string(&batch).unwrap();
        assert_eq!(
            serde_json::from_str::<PieceHashBatch>(&json).unwrap(),
            batch
        );
    }
}
