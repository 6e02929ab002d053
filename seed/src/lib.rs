//! The seed role and back-to-source.
//!
//! | module | what |
//! |---|---|
//! | [`http_origin`] | [`HttpOrigin`]: fetching origins over HTTP(S) with ranges, validators and retries |
//!
//! A seed is a [`df_node::Node`] started with [`Role::Seed`]: it registers under the seeds key in
//! the DHT and announces itself through identify, so peers ask it (the seed XOR-closest to a task's
//! key first) to fetch origins; it fetches with range requests, several pieces in flight, stores and
//! signs every piece, and announces each on the task's topic as soon as it has it. Nodes use the
//! same back-to-source code when no seed takes a task.

pub mod http_origin;

use std::sync::Arc;

pub use http_origin::{HttpOrigin, HttpOriginError};

use df_node::{Node, NodeConfig, NodeError, Role};

/// Errors starting a node or seed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Origin(#[from] HttpOriginError),
    #[error(transparent)]
    Node(#[from] NodeError),
}

/// Starts a node (any role) that goes back to source over HTTP.
pub async fn start(config: NodeConfig) -> Result<Node, StartError> {
    let origin = HttpOrigin::new(&config.origin)?;
    Ok(Node::start(config, Arc::new(origin)).await?)
}

/// Starts a seed: `config` with its role set to [`Role::Seed`].
pub async fn start_seed(mut config: NodeConfig) -> Result<Node, StartError> {
    config.role = Role::Seed;
    start(config).await
}
