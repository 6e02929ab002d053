//! Wire types of `df`: what peers say to each other, and the limits on what they accept.
//!
//! This crate has no runtime and no swarm; its module docs are the wire specification.
//!
//! | module | what |
//! |---|---|
//! | [`task`] | task keys (CIDs) from a canonical URL + tag or from a content digest |
//! | [`piece`] | piece layout, piece hashes (sha2-256, raw CIDs), bitfields |
//! | [`manifest`] | the producer's signed task header and signed piece hashes |
//! | [`control`] | `/df/control/1` request/response messages (task state, start a task) |
//! | [`gossip`] | per-task gossipsub topic messages (header, hashes, have) |
//! | [`have`] | `/df/have/1`: haves sent straight to connected peers on a task |
//! | [`transfer`] | the data plane: piece bytes over plain TCP, access tokens |
//! | [`limits`] | size limits for everything read from the network |

pub mod control;
pub mod gossip;
pub mod have;
pub mod limits;
pub mod manifest;
pub mod piece;
pub mod task;
pub mod transfer;

pub use libp2p_identity::{Keypair, PeerId};
