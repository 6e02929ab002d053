//! Gossip: one gossipsub topic per task, `/df/task/1/<task CID>` ([`TaskKey::topic`]).
//!
//! Messages are JSON, at most [`MAX_GOSSIP_MESSAGE`] bytes, and signed by gossipsub with the author's
//! libp2p key, so the author is known. Every message is validated by the node before gossipsub
//! forwards it (header and hash signatures, index ranges); an invalid one is rejected and lowers the
//! forwarder's score.
//!
//! | message | sent by | meaning |
//! |---|---|---|
//! | `header` | producer | the task's signed header, as soon as the origin answered |
//! | `hashes` | producer | signed hashes of pieces just fetched from origin |
//! | `have` | any holder | "I now hold these pieces" (batched); `complete` when it holds all |

use serde::{Deserialize, Serialize};

use crate::limits::{MAX_GOSSIP_MESSAGE, MAX_HASHES_PER_GOSSIP, MAX_PIECES};
use crate::manifest::{PieceHashBatch, SignedHeader};
#[cfg(doc)]
use crate::task::TaskKey;

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

/// A message on a task topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum GossipMessage {
    Header(Box<SignedHeader>),
    Hashes(PieceHashBatch),
    Have {
        pieces: Vec<u32>,
        #[serde(default)]
        complete: bool,
    },
}

impl GossipMessage {
    pub fn encode(&self) -> Result<Vec<u8>, GossipCodecError> {
        let body = serde_json::to_vec(self)?;
        if body.len() > MAX_GOSSIP_MESSAGE {
            return Err(GossipCodecError::TooLarge(body.len()));
        }
        Ok(body)
    }

    /// Parses and bounds-checks a message (signatures are checked by the node, which knows the task).
    pub fn decode(body: &[u8]) -> Result<GossipMessage, GossipCodecError> {
        if body.len() > MAX_GOSSIP_MESSAGE {
            return Err(GossipCodecError::TooLarge(body.len()));
        }
        let msg: GossipMessage = serde_json::from_slice(body)?;
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

#[cfg(test)]
mod tests {
    use super::*;

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
