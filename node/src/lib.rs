//! The `df` peer: everything a node runs.
//!
//! | module | what |
//! |---|---|
//! | [`node`] | [`Node`]: starts and wires the parts below; answers peers' control requests |
//! | [`network`] | the libp2p swarm's event loop and its [`network::NetworkClient`] handle |
//! | [`task`] | per-task runners: discovery, producer election, piece scheduling, verification, production |
//! | [`transfer`] | the data plane: piece server and client over TCP |
//! | [`store`] | the [`store::PieceStore`] trait: RocksDB (the node's) and in-memory stores |
//! | [`superseed`] | a seed sends each piece once before any twice |
//! | [`origin`] | the back-to-source trait (the HTTP implementation is in `df-seed`) |
//! | [`api`] | the local HTTP API server and its client |
//! | [`content`] | a task's content as an in-order byte stream while it downloads |
//! | [`config`] | [`NodeConfig`] and its documented defaults |
//! | [`metrics`] | counters for `/v1/status` and `/metrics` |
//! | [`gc`] | cache eviction by TTL, quota and disk watermarks |
//! | [`activity`] | when peers last used each task (read by [`gc`]) |
//! | [`http_client`] | the reqwest client settings shared by origin fetches and the registry mirror |
//! | [`limits`] | host-wide token buckets for upload, download and origin bytes |
//! | [`trust`] | the swarm key (who may connect) and the trust policy (who may produce tasks) |

pub mod activity;
pub mod api;
pub mod config;
pub mod content;
pub mod gc;
pub mod http_client;
pub mod limits;
pub mod metrics;
pub mod network;
pub mod node;
pub mod origin;
pub mod preheat;
pub mod store;
pub mod superseed;
pub mod task;
pub mod transfer;
pub mod trust;

pub use api::NodeStatus;
pub use config::{ApiAddr, NodeConfig, Role};
pub use content::{Content, ContentError};
pub use libp2p::{Multiaddr, PeerId};
pub use node::{Node, NodeError};
pub use origin::{Origin, OriginError, OriginResponse, OriginSpec};
pub use task::{DownloadRequest, Phase, Progress, TaskError};
