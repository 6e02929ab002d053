//! The control protocol, `/df/control/1`: small request/response exchanges between two peers over
//! their authenticated libp2p connection.
//!
//! Framing: each message is a big-endian `u32` length followed by that many bytes of JSON. A length
//! above [`MAX_CONTROL_MESSAGE`] is rejected before reading ([`check_length`]); a list longer than
//! its limit is rejected while the JSON is parsed, and a parsed message is then checked by
//! [`ControlRequest::validate`] / [`ControlResponse::validate`].
//!
//! | request | response | meaning |
//! |---|---|---|
//! | `get_task` | `task` | what the peer knows of a task (header, signed piece hashes), which pieces it holds, whether it is fetching the origin now, and how to fetch pieces from it on the data plane |
//! | `start_task` | `started` or `error` | "you are responsible for this task: fetch it from its origin". Answered once the origin's first response arrived (so origin errors such as 404 come back here). `missing` asks a producer taking over from a vanished one for just those pieces. |
//! | `replicate` | `replicating` or `error` | from a seed that fetches a task's origin to the task's other owners (the next seeds in the task's owner order): "hold a copy of this task: fetch it from me and the swarm, not from the origin, and take over the origin fetch if I vanish". Carries the producer's signed header and the origin request. Honoured only by seeds, and only from trusted members. |
//! | `purge` | `purged` or `error` | delete the task's content and metadata. Honoured only from trusted members. |
//! | `preheat` | `started` or `error` | "download this task into your cache from the swarm" (a preheat job with scope `all_seeds` or `all_peers`, sent once the task's owner has it). The receiver never fetches the origin for it (a seed may take over from a vanished owner as usual). Honoured only from trusted members; the origin headers are sent only to members the sender trusts as producers. Answered once the receiver knows the task's header. |
//!
//! Credentials in `start_task` (the origin URL and headers) are used for that origin fetch only and
//! never stored, logged or gossiped.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};

use crate::limits::{
    MAX_CONTROL_MESSAGE, MAX_ERROR_MESSAGE, MAX_ORIGIN_HEADER_BYTES, MAX_ORIGIN_HEADERS,
    MAX_PIECES, MAX_URL_LEN, at_most_max_origin_headers, at_most_max_pieces,
};
use crate::manifest::{PieceHashBatch, SignedHeader};
use crate::piece::Bitfield;
use crate::task::{ContentDigest, TaskKey};
use crate::transfer::{AccessToken, Grant};

/// Protocol name of the control protocol.
pub const CONTROL_PROTOCOL: &str = "/df/control/1";

/// Why a control message was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ControlCodecError {
    #[error("control message of {0} bytes exceeds the limit of {MAX_CONTROL_MESSAGE}")]
    TooLarge(usize),
    #[error("malformed control message: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("invalid control message: {0}")]
    Invalid(&'static str),
}

/// What an origin fetch needs: everything the requester was given, credentials included.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginRequest {
    pub url: String,
    #[serde(default, deserialize_with = "at_most_max_origin_headers")]
    pub headers: Vec<(String, String)>,
    #[serde(default)]
    pub tag: String,
    #[serde(default, deserialize_with = "at_most_max_origin_headers")]
    pub filtered_query_params: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<ContentDigest>,
}

impl OriginRequest {
    /// Checks the request's lengths against the protocol's limits.
    pub fn validate(&self) -> Result<(), ControlCodecError> {
        if self.url.len() > MAX_URL_LEN {
            return Err(ControlCodecError::Invalid("url too long"));
        }
        if self.headers.len() > MAX_ORIGIN_HEADERS {
            return Err(ControlCodecError::Invalid("too many headers"));
        }
        let bytes: usize = self.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        if bytes > MAX_ORIGIN_HEADER_BYTES {
            return Err(ControlCodecError::Invalid("headers too large"));
        }
        if self.filtered_query_params.len() > MAX_ORIGIN_HEADERS {
            return Err(ControlCodecError::Invalid("too many filtered query params"));
        }
        Ok(())
    }
}

/// A control request: a JSON object whose `type` names the variant, beside the variant's fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum ControlRequest {
    GetTask {
        task: TaskKey,
    },
    StartTask {
        task: TaskKey,
        origin: OriginRequest,
        /// Pieces nobody can serve; empty (or absent) means the whole task.
        missing: Vec<u32>,
    },
    /// Delete the task's content and metadata (a cluster-wide purge of, e.g., a bad artifact).
    /// Honoured only from trusted members.
    Purge {
        task: TaskKey,
    },
    /// Download the task into the receiver's cache from the swarm (see the module docs).
    Preheat {
        task: TaskKey,
        origin: OriginRequest,
    },
    /// Hold a replica of the task (see the module docs). `header` is signed by the sender.
    Replicate {
        task: TaskKey,
        origin: OriginRequest,
        header: Box<SignedHeader>,
    },
}

// Messages are parsed through a struct holding every variant's fields rather than serde's
// internally tagged enum support, which first buffers the whole message as an untyped tree (tens of
// bytes per JSON value, so a 32 MiB message of small numbers would take a GiB) to find its tag.
// Parsing into typed fields allocates about what the input holds, and lists stop at their limit.

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum RequestKind {
    GetTask,
    StartTask,
    Purge,
    Replicate,
    Preheat,
}

#[derive(Deserialize)]
struct RequestWire {
    #[serde(rename = "type")]
    kind: RequestKind,
    task: TaskKey,
    #[serde(default)]
    origin: Option<OriginRequest>,
    #[serde(default, deserialize_with = "at_most_max_pieces")]
    missing: Vec<u32>,
    #[serde(default)]
    header: Option<Box<SignedHeader>>,
}

impl<'de> Deserialize<'de> for ControlRequest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = RequestWire::deserialize(d)?;
        Ok(match w.kind {
            RequestKind::GetTask => ControlRequest::GetTask { task: w.task },
            RequestKind::Purge => ControlRequest::Purge { task: w.task },
            RequestKind::StartTask => ControlRequest::StartTask {
                task: w.task,
                origin: w.origin.ok_or_else(|| D::Error::missing_field("origin"))?,
                missing: w.missing,
            },
            RequestKind::Preheat => ControlRequest::Preheat {
                task: w.task,
                origin: w.origin.ok_or_else(|| D::Error::missing_field("origin"))?,
            },
            RequestKind::Replicate => ControlRequest::Replicate {
                task: w.task,
                origin: w.origin.ok_or_else(|| D::Error::missing_field("origin"))?,
                header: w.header.ok_or_else(|| D::Error::missing_field("header"))?,
            },
        })
    }
}

impl ControlRequest {
    pub fn validate(&self) -> Result<(), ControlCodecError> {
        match self {
            ControlRequest::GetTask { .. } | ControlRequest::Purge { .. } => Ok(()),
            ControlRequest::StartTask {
                origin, missing, ..
            } => {
                if missing.len() > MAX_PIECES as usize {
                    return Err(ControlCodecError::Invalid("too many missing pieces"));
                }
                origin.validate()
            }
            ControlRequest::Preheat { origin, .. } => origin.validate(),
            ControlRequest::Replicate {
                task,
                origin,
                header,
            } => {
                if header.header.task != *task {
                    return Err(ControlCodecError::Invalid("header is for another task"));
                }
                origin.validate()
            }
        }
    }
}

/// Where and how to fetch pieces from the answering peer on the data plane. The address is the
/// one the requester reached the peer at, with this port; `token` and `expires` (unix seconds) are
/// a [`Grant`] bound to the requester's peer ID (see [`crate::transfer`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataAccess {
    pub port: u16,
    pub token: AccessToken,
    pub expires: u64,
}

impl DataAccess {
    /// The grant this answer carries.
    pub fn grant(&self) -> Grant {
        Grant {
            token: self.token,
            expires: self.expires,
        }
    }
}

/// A peer's view of one task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct TaskState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<SignedHeader>,
    #[serde(default, deserialize_with = "at_most_max_pieces")]
    pub hashes: Vec<PieceHashBatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitfield: Option<Bitfield>,
    /// The peer is fetching this task's origin right now.
    #[serde(default)]
    pub producing: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<DataAccess>,
}

/// Machine-readable error kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The origin answered with an error status (see `origin_status`).
    OriginStatus,
    /// The origin could not be reached.
    OriginUnreachable,
    /// The origin's content changed while the task was being fetched.
    ContentChanged,
    /// The request is malformed or does not match its task key.
    BadRequest,
    /// The peer does not fetch origins for others.
    Declined,
    /// Anything else (storage, internal).
    Internal,
    /// The asker may not ask this (e.g. a purge from a member this peer does not trust).
    Refused,
}

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlError {
    pub code: ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin_status: Option<u16>,
}

/// A control response: a JSON object whose `type` names the variant, beside the variant's fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum ControlResponse {
    Task(TaskState),
    Started {
        header: SignedHeader,
    },
    Error(ControlError),
    /// A purge was carried out: whether this peer held anything of the task.
    Purged {
        deleted: bool,
    },
    /// The peer holds (or is fetching) a replica of the task.
    Replicating,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum ResponseKind {
    Task,
    Started,
    Error,
    Purged,
    Replicating,
}

#[derive(Deserialize)]
struct ResponseWire {
    #[serde(rename = "type")]
    kind: ResponseKind,
    #[serde(default)]
    header: Option<SignedHeader>,
    #[serde(default, deserialize_with = "at_most_max_pieces")]
    hashes: Vec<PieceHashBatch>,
    #[serde(default)]
    bitfield: Option<Bitfield>,
    #[serde(default)]
    producing: bool,
    #[serde(default)]
    data: Option<DataAccess>,
    #[serde(default)]
    code: Option<ErrorCode>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    origin_status: Option<u16>,
    #[serde(default)]
    deleted: bool,
}

impl<'de> Deserialize<'de> for ControlResponse {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = ResponseWire::deserialize(d)?;
        Ok(match w.kind {
            ResponseKind::Task => ControlResponse::Task(TaskState {
                header: w.header,
                hashes: w.hashes,
                bitfield: w.bitfield,
                producing: w.producing,
                data: w.data,
            }),
            ResponseKind::Started => ControlResponse::Started {
                header: w.header.ok_or_else(|| D::Error::missing_field("header"))?,
            },
            ResponseKind::Error => ControlResponse::Error(ControlError {
                code: w.code.ok_or_else(|| D::Error::missing_field("code"))?,
                message: w
                    .message
                    .ok_or_else(|| D::Error::missing_field("message"))?,
                origin_status: w.origin_status,
            }),
            ResponseKind::Purged => ControlResponse::Purged { deleted: w.deleted },
            ResponseKind::Replicating => ControlResponse::Replicating,
        })
    }
}

impl ControlResponse {
    pub fn validate(&self) -> Result<(), ControlCodecError> {
        match self {
            ControlResponse::Error(e) if e.message.len() > MAX_ERROR_MESSAGE => {
                Err(ControlCodecError::Invalid("error message too long"))
            }
            ControlResponse::Task(t)
                if t.hashes.len() > MAX_PIECES as usize
                    || t.hashes.iter().map(|b| b.hashes.len()).sum::<usize>()
                        > MAX_PIECES as usize =>
            {
                Err(ControlCodecError::Invalid("too many hashes"))
            }
            _ => Ok(()),
        }
    }
}

/// Encodes a message body (without the length prefix).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, ControlCodecError> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_CONTROL_MESSAGE {
        return Err(ControlCodecError::TooLarge(body.len()));
    }
    Ok(body)
}

/// Checks a length prefix before the body is read.
pub fn check_length(len: u32) -> Result<usize, ControlCodecError> {
    let len = len as usize;
    if len > MAX_CONTROL_MESSAGE {
        return Err(ControlCodecError::TooLarge(len));
    }
    Ok(len)
}

pub fn decode_request(body: &[u8]) -> Result<ControlRequest, ControlCodecError> {
    check_length(body.len().try_into().unwrap_or(u32::MAX))?;
    let req: ControlRequest = serde_json::from_slice(body)?;
    req.validate()?;
    Ok(req)
}

pub fn decode_response(body: &[u8]) -> Result<ControlResponse, ControlCodecError> {
    check_length(body.len().try_into().unwrap_or(u32::MAX))?;
    let resp: ControlResponse = serde_json::from_slice(body)?;
    resp.validate()?;
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::parse_url;

    fn key() -> TaskKey {
        TaskKey::for_url(&parse_url("http://h/f").unwrap(), "")
    }

    #[test]
    fn requests_round_trip() {
        let req = ControlRequest::StartTask {
            task: key(),
            origin: OriginRequest {
                url: "http://h/f".into(),
                headers: vec![("Authorization".into(), "Bearer x".into())],
                tag: String::new(),
                filtered_query_params: vec![],
                digest: None,
            },
            missing: vec![1, 2],
        };
        let body = encode(&req).unwrap();
        assert_eq!(decode_request(&body).unwrap(), req);
        let purge = ControlRequest::Purge { task: key() };
        assert_eq!(decode_request(&encode(&purge).unwrap()).unwrap(), purge);
        let preheat = ControlRequest::Preheat {
            task: key(),
            origin: OriginRequest {
                url: "http://h/f".into(),
                headers: vec![],
                tag: String::new(),
                filtered_query_params: vec![],
                digest: None,
            },
        };
        assert_eq!(decode_request(&encode(&preheat).unwrap()).unwrap(), preheat);
        assert!(decode_request(br#"{"type":"preheat","task":"x"}"#).is_err());
        for r in [
            ControlResponse::Purged { deleted: true },
            ControlResponse::Purged { deleted: false },
            ControlResponse::Replicating,
        ] {
            assert_eq!(decode_response(&encode(&r).unwrap()).unwrap(), r);
        }
    }

    fn origin() -> OriginRequest {
        OriginRequest {
            url: "http://h/f".into(),
            headers: vec![],
            tag: String::new(),
            filtered_query_params: vec![],
            digest: None,
        }
    }

    fn signed_header(task: TaskKey) -> SignedHeader {
        let key = libp2p_identity::Keypair::generate_ed25519();
        crate::manifest::TaskHeader {
            task,
            source_url: "http://h/f".into(),
            content_length: 10,
            piece_length: 4 << 20,
            content_digest: None,
            validators: Default::default(),
            producer: key.public().to_peer_id(),
        }
        .sign(&key)
        .unwrap()
    }

    #[test]
    fn replicate_round_trips_and_needs_its_tasks_header() {
        let req = ControlRequest::Replicate {
            task: key(),
            origin: origin(),
            header: Box::new(signed_header(key())),
        };
        assert_eq!(decode_request(&encode(&req).unwrap()).unwrap(), req);
        // A header for another task is refused while parsing, before the node sees it.
        let other = TaskKey::for_url(&parse_url("http://h/other").unwrap(), "");
        let req = ControlRequest::Replicate {
            task: key(),
            origin: origin(),
            header: Box::new(signed_header(other)),
        };
        assert!(matches!(
            decode_request(&serde_json::to_vec(&req).unwrap()),
            Err(ControlCodecError::Invalid(_))
        ));
        // Without its header or origin it does not parse.
        let body = format!(
            r#"{{"type":"replicate","task":{}}}"#,
            serde_json::to_string(&key()).unwrap()
        );
        assert!(decode_request(body.as_bytes()).is_err());
    }

    #[test]
    fn garbage_and_oversized_messages_are_rejected() {
        assert!(decode_request(b"{").is_err());
        assert!(decode_request(b"{\"type\":\"nope\"}").is_err());
        assert!(decode_response(&[0xff; 100]).is_err());
        assert!(check_length(u32::MAX).is_err());
        let req = ControlRequest::StartTask {
            task: key(),
            origin: OriginRequest {
                url: "x".repeat(MAX_URL_LEN + 1),
                headers: vec![],
                tag: String::new(),
                filtered_query_params: vec![],
                digest: None,
            },
            missing: vec![],
        };
        let body = serde_json::to_vec(&req).unwrap();
        assert!(matches!(
            decode_request(&body),
            Err(ControlCodecError::Invalid(_))
        ));
    }
}
