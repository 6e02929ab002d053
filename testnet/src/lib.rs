//! Test and measurement harness for `df`.
//!
//! | module | what |
//! |---|---|
//! | [`origin`] | a local HTTP origin that counts the bytes it serves and can misbehave |
//! | [`swarm`] | an in-process swarm of seeds and nodes on 127.0.0.1 |
//! | [`registry`] | a real OCI registry (`docker-registry`) and locally built images |

pub mod origin;
pub mod registry;
pub mod swarm;

pub use origin::TestOrigin;
pub use swarm::{
    Swarm, TestNode, content, finished_preheat, init_test_logs, sha256_hex, url_task_key,
};
