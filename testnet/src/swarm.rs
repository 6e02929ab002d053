//! An in-process swarm: seeds and nodes on 127.0.0.1 with ephemeral ports, RocksDB in temporary
//! directories, talking to each other over real sockets.

use anyhow::{Context, Result, bail};
use df_node::api::client::{ApiClient, ApiError};
use df_node::{DownloadRequest, Multiaddr, Node, NodeConfig, Origin, Role};
use futures::StreamExt;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// One node of a test swarm.
pub struct TestNode {
    pub node: Node,
    pub api: ApiClient,
    _dir: tempfile::TempDir,
}

impl TestNode {
    /// Starts a node with `role`, joining through `bootstrap`; `tweak` adjusts its config.
    pub async fn start(
        role: Role,
        bootstrap: Vec<Multiaddr>,
        tweak: impl FnOnce(&mut NodeConfig),
    ) -> Result<TestNode> {
        Self::launch(role, bootstrap, None, tweak).await
    }

    /// The node's data directory (its store, and a place on the same filesystem).
    pub fn dir(&self) -> &std::path::Path {
        self._dir.path()
    }

    /// Like [`TestNode::start`], with `origin` instead of HTTP for back-to-source.
    pub async fn start_with_origin(
        role: Role,
        bootstrap: Vec<Multiaddr>,
        origin: Arc<dyn Origin>,
        tweak: impl FnOnce(&mut NodeConfig),
    ) -> Result<TestNode> {
        Self::launch(role, bootstrap, Some(origin), tweak).await
    }

    async fn launch(
        role: Role,
        bootstrap: Vec<Multiaddr>,
        origin: Option<Arc<dyn Origin>>,
        tweak: impl FnOnce(&mut NodeConfig),
    ) -> Result<TestNode> {
        let dir = tempfile::tempdir()?;
        let mut cfg = NodeConfig::local(dir.path(), role);
        cfg.bootstrap = bootstrap;
        cfg.network.swarm_key = Some(swarm_key_file()?);
        // Tests detect stalls quickly.
        cfg.download.stall_timeout = Duration::from_secs(2);
        tweak(&mut cfg);
        let origin = match origin {
            Some(o) => o,
            None => Arc::new(df_seed::HttpOrigin::new(&cfg.origin)?),
        };
        let node = Node::start(cfg, origin).await.context("starting node")?;
        let api = ApiClient::new(node.api_addr());
        Ok(TestNode {
            node,
            api,
            _dir: dir,
        })
    }

    /// Downloads `url` through this node; returns (length, sha256 hex) of what the API streamed.
    pub async fn fetch(&self, req: DownloadRequest) -> Result<(u64, String)> {
        let info = self.api.create_task(&req).await?;
        let (len, mut stream) = self.api.content(&info.id, None).await?;
        // The creation answer already carries the length (the CLI sizes its output by it).
        if info.content_length != Some(len) {
            bail!(
                "task creation announced {:?} bytes, the content stream {len}",
                info.content_length
            );
        }
        let mut h = Sha256::new();
        let mut n = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                // The node aborted the stream: report why.
                Err(e) => match self.api.failure(&info.id, Duration::from_secs(30)).await {
                    Some(t) => return Err(ApiError::Task(t).into()),
                    None => return Err(e.into()),
                },
            };
            n += chunk.len() as u64;
            h.update(&chunk);
        }
        if n != len {
            bail!("streamed {n} of {len} bytes");
        }
        Ok((n, hex::encode(h.finalize())))
    }

    pub async fn fetch_url(&self, url: &str) -> Result<(u64, String)> {
        self.fetch(DownloadRequest {
            url: url.to_owned(),
            ..DownloadRequest::default()
        })
        .await
    }

    pub fn bootstrap_addr(&self) -> Multiaddr {
        self.node
            .listen_addrs()
            .into_iter()
            .next()
            .unwrap_or_else(Multiaddr::empty)
    }

    pub async fn stop(self) {
        self.node.shutdown().await;
    }
}

/// Seeds and nodes joined through the first of them.
pub struct Swarm {
    pub seeds: Vec<TestNode>,
    pub nodes: Vec<TestNode>,
}

impl Swarm {
    /// Starts `seeds` seeds and `nodes` nodes; every member joins through the first one started.
    /// Returns once each has identified at least one peer.
    pub async fn start(
        seeds: usize,
        nodes: usize,
        tweak: impl Fn(&mut NodeConfig),
    ) -> Result<Swarm> {
        let mut bootstrap: Vec<Multiaddr> = Vec::new();
        let mut s = Vec::new();
        for _ in 0..seeds {
            let n = TestNode::start(Role::Seed, bootstrap.clone(), &tweak).await?;
            if bootstrap.is_empty() {
                bootstrap.push(n.bootstrap_addr());
            }
            s.push(n);
        }
        let mut v = Vec::new();
        for _ in 0..nodes {
            let n = TestNode::start(Role::Node, bootstrap.clone(), &tweak).await?;
            if bootstrap.is_empty() {
                bootstrap.push(n.bootstrap_addr());
            }
            v.push(n);
        }
        let swarm = Swarm { seeds: s, nodes: v };
        if seeds + nodes > 1 {
            for m in swarm.all() {
                if !m.node.wait_for_peers(1, Duration::from_secs(10)).await {
                    bail!("a swarm member did not connect within 10 s");
                }
            }
        }
        Ok(swarm)
    }

    pub fn all(&self) -> impl Iterator<Item = &TestNode> {
        self.seeds.iter().chain(self.nodes.iter())
    }

    /// Sum of `bytes.uploaded` over the nodes (seeds excluded), from `/v1/status`.
    pub async fn nodes_uploaded(&self) -> Result<u64> {
        let mut total = 0;
        for n in &self.nodes {
            total += n.api.status().await?.bytes.uploaded;
        }
        Ok(total)
    }

    pub async fn stop(self) {
        for n in self.seeds.into_iter().chain(self.nodes) {
            n.stop().await;
        }
    }
}

/// The swarm key file every harness node uses (one per test process, so all nodes a test starts
/// are members of one private swarm unless it gives one another key).
pub fn swarm_key_file() -> Result<PathBuf> {
    static KEY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    KEY.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("df-test-swarm-{}.key", std::process::id()));
        if !path.exists() {
            df_node::trust::create(&path).map_err(|e| e.to_string())?;
        }
        Ok(path)
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// A fresh swarm key file in `dir` (for an outsider's swarm).
pub fn other_swarm_key(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("other-swarm.key");
    df_node::trust::create(&path)?;
    Ok(path)
}

/// Deterministic pseudo-random content.
pub fn content(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// sha256 hex of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Logs of a test, filtered by `RUST_LOG` (default `warn`), captured per test.
pub fn init_test_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Polls preheat job `id` on `api` (the job API has no event to wait on) until it ends; an error
/// after `within`.
pub async fn finished_preheat(
    api: &ApiClient,
    id: &str,
    within: Duration,
) -> Result<df_node::preheat::PreheatJob> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let job = api.preheat_job(id).await?;
        if job.state.is_finished() {
            return Ok(job);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("preheat job not finished after {within:?}: {job:#?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The task key of a plain `df get URL` (no tag, no filtered query parameters).
pub fn url_task_key(url: &str) -> Result<df_protocols::task::TaskKey> {
    use df_protocols::task::{TaskKey, canonical_url, parse_url};
    Ok(TaskKey::for_url(&canonical_url(&parse_url(url)?, &[]), ""))
}
