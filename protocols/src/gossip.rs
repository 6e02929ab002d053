//! Gossip: one gossipsub topic per task, `/df/task/2/<task CID>` ([`TaskKey::topic`]).
//!
//! Messages are JSON, at most [`MAX_GOSSIP_MESSAGE`] bytes, and signed by gossipsub with the author's
//! libp2p key, so the author is known. Every message is validated by the node before gossipsub
//! forwards it (size and list limits here in [`GossipMessage::decode`]; header and hash signatures
//! and index ranges by the node, which knows the task); rejected messages are not forwarded.
//!
//! | message | sent by | meaning |
//! |---|---|---|
//! | `header` | producer | the task's signed header, as soon as the origin answered |
//! | `hashes` | producer | signed hashes of pieces just fetched from origin |
//! | `have` | any holder | "I now hold these pieces" (batched); `complete` when it holds all |
//!
//! One more topic, [`CLUSTER_TOPIC`], carries requests to every member of the cluster (the
//! cluster's name is part of gossipsub's protocol name, so other clusters never hear them):
//!
//! | message | sent by | meaning |
//! |---|---|---|
//! | `preheat` | a preheat job's node (scope `all_peers`) | "download this task into your cache from the swarm" — as the control request `preheat`, for members the asker is not connected to. Never carries origin headers (credentials are not broadcast); honoured and forwarded only from trusted members (others are ignored, not rejected: a relay may trust the author) |

use libp2p_identity::PeerId;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};

use crate::control::OriginRequest;
use crate::limits::{
    MAX_GOSSIP_MESSAGE, MAX_HASHES_PER_GOSSIP, MAX_PIECES, some_at_most_max_pieces,
};
use crate::manifest::{PieceHashBatch, Signature, SignedHeader, SignedPieceHash, TaskHeader};
use crate::task::TaskKey;

/// The gossipsub topic of requests to every member of the cluster ([`ClusterMessage`]).
pub const CLUSTER_TOPIC: &str = "/df/cluster/1";

/// Longest preheat job ID a cluster message may carry.
pub const MAX_JOB_ID: usize = 64;

/// Why a gossip message was rejected.
#[derive(Debug, thiserror::Error)]
pub enum GossipCodecError {
    #[error("gossip message of {0} bytes exceeds the limit of {MAX_GOSSIP_MESSAGE}")]
    TooLarge(usize),
    #[error("malformed gossip message: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("invalid gossip message: {0}")]
    Invalid(&'static str),
}

/// A message on a task topic: a JSON object whose `type` names the variant, beside the variant's
/// fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum GossipMessage {
    Header(Box<SignedHeader>),
    Hashes(PieceHashBatch),
    Have {
        pieces: Vec<u32>,
        /// Absent means `false`.
        complete: bool,
    },
}

// Parsed through a struct holding every variant's fields rather than serde's internally tagged enum
// support, which first buffers the whole message as an untyped tree (tens of bytes per JSON value)
// to find its tag. Lists stop at their limit while they are parsed.

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum GossipKind {
    Header,
    Hashes,
    Have,
}

#[derive(Deserialize)]
struct GossipWire {
    #[serde(rename = "type")]
    kind: GossipKind,
    #[serde(default)]
    header: Option<TaskHeader>,
    #[serde(default)]
    signature: Option<Signature>,
    #[serde(default)]
    producer: Option<PeerId>,
    #[serde(default, deserialize_with = "some_at_most_max_pieces")]
    hashes: Option<Vec<SignedPieceHash>>,
    #[serde(default, deserialize_with = "some_at_most_max_pieces")]
    pieces: Option<Vec<u32>>,
    #[serde(default)]
    complete: bool,
}

impl<'de> Deserialize<'de> for GossipMessage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = GossipWire::deserialize(d)?;
        let missing = |field| D::Error::missing_field(field);
        Ok(match w.kind {
            GossipKind::Header => GossipMessage::Header(Box::new(SignedHeader {
                header: w.header.ok_or_else(|| missing("header"))?,
                signature: w.signature.ok_or_else(|| missing("signature"))?,
            })),
            GossipKind::Hashes => GossipMessage::Hashes(PieceHashBatch {
                producer: w.producer.ok_or_else(|| missing("producer"))?,
                hashes: w.hashes.ok_or_else(|| missing("hashes"))?,
            }),
            GossipKind::Have => GossipMessage::Have {
                pieces: w.pieces.ok_or_else(|| missing("pieces"))?,
                complete: w.complete,
            },
        })
    }
}

/// `msg` as JSON, at most [`MAX_GOSSIP_MESSAGE`] bytes.
fn encode_bounded(msg: &impl Serialize) -> Result<Vec<u8>, GossipCodecError> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_GOSSIP_MESSAGE {
        return Err(GossipCodecError::TooLarge(body.len()));
    }
    Ok(body)
}

/// Parses JSON of at most [`MAX_GOSSIP_MESSAGE`] bytes.
fn decode_bounded<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, GossipCodecError> {
    if body.len() > MAX_GOSSIP_MESSAGE {
        return Err(GossipCodecError::TooLarge(body.len()));
    }
    Ok(serde_json::from_slice(body)?)
}

impl GossipMessage {
    pub fn encode(&self) -> Result<Vec<u8>, GossipCodecError> {
        encode_bounded(self)
    }

    /// Parses and bounds-checks a message (signatures are checked by the node, which knows the task).
    pub fn decode(body: &[u8]) -> Result<GossipMessage, GossipCodecError> {
        let msg: GossipMessage = decode_bounded(body)?;
        match &msg {
            GossipMessage::Hashes(b) if b.hashes.len() > MAX_HASHES_PER_GOSSIP => {
                Err(GossipCodecError::Invalid("too many hashes"))
            }
            GossipMessage::Have { pieces, .. } if pieces.len() > MAX_PIECES as usize => {
                Err(GossipCodecError::Invalid("too many pieces"))
            }
            _ => Ok(msg),
        }
    }
}

/// A message on [`CLUSTER_TOPIC`]: a JSON object whose `type` names the variant, beside its
/// fields (parsed through [`ClusterWire`], as [`GossipMessage`] is).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum ClusterMessage {
    /// Download `task` from the swarm, never from its origin (a preheat job `job` of scope
    /// `all_peers`). `origin` names the task (its key is derived from it) and has no headers.
    Preheat {
        job: String,
        task: TaskKey,
        origin: OriginRequest,
    },
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum ClusterKind {
    Preheat,
}

#[derive(Deserialize)]
struct ClusterWire {
    #[serde(rename = "type")]
    kind: ClusterKind,
    job: String,
    task: TaskKey,
    origin: OriginRequest,
}

impl<'de> Deserialize<'de> for ClusterMessage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = ClusterWire::deserialize(d)?;
        Ok(match w.kind {
            ClusterKind::Preheat => ClusterMessage::Preheat {
                job: w.job,
                task: w.task,
                origin: w.origin,
            },
        })
    }
}

impl ClusterMessage {
    pub fn encode(&self) -> Result<Vec<u8>, GossipCodecError> {
        self.check()?;
        encode_bounded(self)
    }

    /// Parses and bounds-checks a message (the author's trust is checked by the node).
    pub fn decode(body: &[u8]) -> Result<ClusterMessage, GossipCodecError> {
        let msg: ClusterMessage = decode_bounded(body)?;
        msg.check()?;
        Ok(msg)
    }

    fn check(&self) -> Result<(), GossipCodecError> {
        match self {
            ClusterMessage::Preheat { job, origin, .. } => {
                if job.is_empty() || job.len() > MAX_JOB_ID {
                    return Err(GossipCodecError::Invalid("job id empty or too long"));
                }
                if !origin.headers.is_empty() {
                    return Err(GossipCodecError::Invalid(
                        "origin headers are never broadcast",
                    ));
                }
                origin
                    .validate()
                    .map_err(|_| GossipCodecError::Invalid("origin request out of bounds"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn preheat(job: &str, headers: Vec<(String, String)>) -> ClusterMessage {
        let url = "https://origin.test/f".to_owned();
        ClusterMessage::Preheat {
            job: job.to_owned(),
            task: TaskKey::for_url(&url::Url::parse(&url).unwrap(), ""),
            origin: OriginRequest {
                url,
                headers,
                tag: String::new(),
                filtered_query_params: Vec::new(),
                digest: None,
            },
        }
    }

    #[test]
    fn a_cluster_preheat_round_trips_and_never_carries_credentials() {
        let m = preheat("job-1", Vec::new());
        let body = m.encode().unwrap();
        assert_eq!(ClusterMessage::decode(&body).unwrap(), m);
        // Headers (credentials) are refused both ways.
        let with = preheat("job-1", vec![("Authorization".into(), "Bearer x".into())]);
        assert!(with.encode().is_err());
        let raw = serde_json::to_vec(&with).unwrap();
        assert!(ClusterMessage::decode(&raw).is_err());
        // A job ID out of bounds, an unknown type, garbage.
        assert!(preheat("", Vec::new()).encode().is_err());
        assert!(
            preheat(&"j".repeat(MAX_JOB_ID + 1), Vec::new())
                .encode()
                .is_err()
        );
        let other = String::from_utf8(body).unwrap().replace("preheat", "purge");
        assert!(ClusterMessage::decode(other.as_bytes()).is_err());
        assert!(ClusterMessage::decode(b"\x00").is_err());
        assert!(ClusterMessage::decode(&vec![b' '; MAX_GOSSIP_MESSAGE + 1]).is_err());
    }

    #[test]
    fn have_round_trips_and_garbage_is_rejected() {
        let m = GossipMessage::Have {
            pieces: vec![1, 5],
            complete: false,
        };
        assert_eq!(GossipMessage::decode(&m.encode().unwrap()).unwrap(), m);
        assert!(GossipMessage::decode(b"\x00\x01").is_err());
        assert!(GossipMessage::decode(&vec![b' '; MAX_GOSSIP_MESSAGE + 1]).is_err());
    }
}
