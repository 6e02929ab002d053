//! A running node: the network loop, the request/gossip dispatcher, the data server, the API
//! server and the task runners, wired together. [`Node::start`] returns once all of them listen.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use df_protocols::control::{
    ControlError, ControlRequest, ControlResponse, DataAccess, ErrorCode, TaskState,
};
use df_protocols::gossip::ClusterMessage;
use df_protocols::manifest::SignedHeader;
use df_protocols::task::TaskKey;
use libp2p::gossipsub::MessageAcceptance;
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{self, NodeStatus, PurgeScope};
use crate::config::{ApiAddr, NodeConfig, Role};
use crate::content::{Content, ContentError};
use crate::metrics::{Gauges, Metrics};
use crate::network::{self, NetworkEvent, NetworkSettings};
use crate::origin::{Origin, Requester};
use crate::store::{RocksStore, Store, StoreError};
use crate::task::{
    DownloadRequest, Phase, Progress, RunnerMsg, TaskContext, TaskError, TaskRegistry,
};
use crate::transfer::{DataClient, DataServer, ServeMode, TokenIssuer};
use crate::trust::{SwarmAccess, TrustPolicy};

/// Errors starting a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("identity key {path}: {reason}")]
    Identity { path: String, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Network(#[from] network::NetworkError),
    #[error(transparent)]
    SwarmKey(#[from] crate::trust::SwarmKeyError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
}

struct NodeInner {
    ctx: Arc<TaskContext>,
    tokens: TokenIssuer,
    data_addr: SocketAddr,
    api_addr: ApiAddr,
    metrics_addr: Option<std::net::SocketAddr>,
    ui_addr: Option<std::net::SocketAddr>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    preheats: Arc<crate::preheat::Preheats>,
}

/// A running node; cheap to clone.
#[derive(Clone)]
pub struct Node {
    inner: Arc<NodeInner>,
}

/// Loads the node's identity from `path`, creating it on first start.
pub fn load_or_create_identity(path: &Path) -> Result<Keypair, NodeError> {
    let err = |reason: String| NodeError::Identity {
        path: path.display().to_string(),
        reason,
    };
    match std::fs::read(path) {
        Ok(bytes) => Keypair::from_protobuf_encoding(&bytes).map_err(|e| err(e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Keypair::generate_ed25519();
            let bytes = key.to_protobuf_encoding().map_err(|e| err(e.to_string()))?;
            let tmp = path.with_extension("tmp");
            write_private(&tmp, &bytes).map_err(|e| err(e.to_string()))?;
            std::fs::rename(&tmp, path).map_err(|e| err(e.to_string()))?;
            Ok(key)
        }
        Err(e) => Err(err(e.to_string())),
    }
}

/// Creates `dir` (and parents) private to this user (0700): it holds the identity and swarm keys,
/// the API socket and token, and the cache. An existing directory is left as the operator made it
/// (it may be shared, e.g. `.`), with a warning when others can read it.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let existed = dir.exists();
    std::fs::create_dir_all(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if !existed {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        } else if std::fs::metadata(dir)?.permissions().mode() & 0o077 != 0 {
            tracing::warn!(dir = %dir.display(), "the data directory is open to other users (it holds keys): chmod 700 it");
        }
    }
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

impl Node {
    /// Starts a node: opens the store, starts listening (libp2p, data plane, API) and joins the swarm.
    pub async fn start(config: NodeConfig, origin: Arc<dyn Origin>) -> Result<Node, NodeError> {
        config.storage.validate().map_err(NodeError::Config)?;
        crate::config::validate_cluster(&config.cluster).map_err(NodeError::Config)?;
        if !(1..=crate::config::MAX_REPLICAS).contains(&config.replicas) {
            return Err(NodeError::Config(format!(
                "replicas = {}: use 1 (no replicas) to {}",
                config.replicas,
                crate::config::MAX_REPLICAS
            )));
        }
        let dir = &config.data_dir;
        create_private_dir(dir).map_err(|e| NodeError::DataDir {
            path: dir.display().to_string(),
            source: e,
        })?;
        let keypair = load_or_create_identity(&dir.join("identity.key"))?;
        let peer_id = keypair.public().to_peer_id();
        let access = SwarmAccess::resolve(&config)?;
        let trust = TrustPolicy::new(peer_id, &config.trust.producers, &access);
        let store = {
            let path = dir.join("store");
            let cfg = config.storage.clone();
            let rocks = tokio::task::spawn_blocking(move || RocksStore::open(&path, &cfg))
                .await
                .map_err(|e| StoreError::Io(e.to_string()))??;
            Arc::new(rocks) as Store
        };
        let data_listener =
            TcpListener::bind(config.data_listen)
                .await
                .map_err(|e| NodeError::Listen {
                    addr: config.data_listen.to_string(),
                    source: e,
                })?;
        let data_addr = data_listener.local_addr().map_err(|e| NodeError::Listen {
            addr: config.data_listen.to_string(),
            source: e,
        })?;

        let metrics = Arc::new(Metrics::new());
        let (net, events, event_loop) = network::spawn(NetworkSettings {
            cluster: config.cluster.clone(),
            metrics: metrics.clone(),
            keypair: keypair.clone(),
            role: config.role,
            listen: config.listen.clone(),
            bootstrap: config.bootstrap.clone(),
            idle_timeout: config.network.idle_timeout,
            request_timeout: config.network.request_timeout,
            access,
        })
        .await?;

        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let tokens = TokenIssuer::random();
        let activity = Arc::new(crate::activity::Activity::default());
        let limits = crate::limits::Limiters::new(&config.limits);
        let ctx = Arc::new(TaskContext {
            config: config.clone(),
            keypair,
            peer_id,
            net: net.clone(),
            store: store.clone(),
            data: DataClient::new(peer_id)
                .with_read_timeout(config.download.read_timeout)
                .with_limit(limits.download.clone()),
            origin_limit: limits.origin.clone(),
            origin,
            metrics: metrics.clone(),
            activity: activity.clone(),
            registry: TaskRegistry::default(),
            trust,
            shutdown: shutdown.child_token(),
        });

        tracker.spawn(event_loop.run(shutdown.clone()));
        let server = DataServer::new(
            data_listener,
            store.clone(),
            tokens.clone(),
            &config.upload,
            metrics,
            activity,
            ServeMode {
                super_seed: config.role == Role::Seed && config.upload.super_seed,
                upload_limit: limits.upload.clone(),
                corrupt: config.faults.corrupt_uploads,
                stall_after: config.faults.stall_uploads_after,
            },
        );
        tracker.spawn(server.run(shutdown.clone()));
        if config.role == Role::Seed {
            let _ = net.start_providing(network::SEEDS_KEY.to_vec()).await;
        }
        let api_listener = api::server::ApiListener::bind_config(&config)
            .await
            .map_err(|e| NodeError::Listen {
                addr: config.api_addr().to_string(),
                source: e,
            })?;
        let api_addr = api_listener.local_addr();
        let (metrics_listener, metrics_addr) = bind_extra(config.metrics_listen, |a| {
            api::server::ApiListener::bind_metrics(a, &config)
        })
        .await?;
        let (ui_listener, ui_addr) = bind_extra(config.ui_listen, |a| {
            api::server::ApiListener::bind_ui(a, &config)
        })
        .await?;

        let node = Node {
            inner: Arc::new(NodeInner {
                ctx,
                tokens,
                data_addr,
                api_addr,
                metrics_addr,
                ui_addr,
                shutdown: shutdown.clone(),
                tracker: tracker.clone(),
                preheats: Arc::default(),
            }),
        };
        tracker.spawn(dispatch(node.clone(), events, shutdown.clone()));
        tracker.spawn(api::server::serve(
            api_listener,
            Arc::new(node.clone()),
            shutdown.clone(),
        ));
        if let Some(l) = ui_listener {
            tracing::info!(addr = ?ui_addr, public = config.ui_public, "serving the status page");
            tracker.spawn(api::server::serve(
                l,
                Arc::new(node.clone()),
                shutdown.clone(),
            ));
        }
        if let Some(l) = metrics_listener {
            tracing::info!(addr = ?metrics_addr, "serving /metrics, /healthz and /readyz");
            tracker.spawn(api::server::serve(
                l,
                Arc::new(node.clone()),
                shutdown.clone(),
            ));
        }
        if config.storage.task_ttl.as_secs() > 0 || config.storage.quota.as_u64() > 0 {
            tracker.spawn(crate::gc::run(node.inner.ctx.clone(), shutdown));
        }
        // Announce what the store already holds (provider records do not survive a restart),
        // after reopening tasks marked complete whose pieces did not all survive.
        let (store2, net2) = (store.clone(), net.clone());
        tracker.spawn(async move {
            let tasks = tokio::task::spawn_blocking(move || {
                match store2.reopen_incomplete() {
                    Ok(keys) => {
                        for k in keys {
                            tracing::warn!(task = %k, "task was marked complete but lost pieces; reopened, it will be fetched again");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "checking complete tasks failed"),
                }
                store2.tasks()
            })
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            for rec in tasks.into_iter().filter(|r| r.complete) {
                let _ = net2
                    .start_providing(rec.header.header.task.to_bytes())
                    .await;
            }
        });
        tracing::info!(%peer_id, role = %config.role, data = %data_addr, api = %node.inner.api_addr, "node started");
        Ok(node)
    }

    pub(crate) fn ctx(&self) -> &Arc<TaskContext> {
        &self.inner.ctx
    }

    /// The node's metrics (front ends running in its process count their requests here).
    pub fn metrics(&self) -> &Metrics {
        &self.inner.ctx.metrics
    }

    pub fn peer_id(&self) -> PeerId {
        self.inner.ctx.peer_id
    }

    pub fn config(&self) -> &NodeConfig {
        &self.inner.ctx.config
    }

    /// libp2p listen addresses, each with `/p2p/<peer id>`: what others bootstrap from.
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.inner
            .ctx
            .net
            .state()
            .listen_addrs()
            .into_iter()
            .map(|a| a.with_p2p(self.peer_id()).unwrap_or_else(|a| a))
            .collect()
    }

    pub fn data_addr(&self) -> SocketAddr {
        self.inner.data_addr
    }

    /// The address the API actually listens on (port 0 resolved).
    pub fn api_addr(&self) -> ApiAddr {
        self.inner.api_addr.clone()
    }

    /// The node's data directory (its store, keys and `api-token`).
    pub fn data_dir(&self) -> &Path {
        &self.inner.ctx.config.data_dir
    }

    /// The `ui_listen` listener's address, if configured.
    pub fn ui_addr(&self) -> Option<std::net::SocketAddr> {
        self.inner.ui_addr
    }

    /// The `metrics_listen` listener's address, if configured.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.inner.metrics_addr
    }

    /// The status without the store report (`GET /v1/status` adds it, read off the async threads).
    pub fn status(&self) -> NodeStatus {
        let ctx = &self.inner.ctx;
        NodeStatus {
            peer_id: self.peer_id().to_string(),
            role: ctx.config.role,
            listen_addrs: self
                .listen_addrs()
                .iter()
                .map(ToString::to_string)
                .collect(),
            data_addr: self.inner.data_addr.to_string(),
            connected_peers: ctx.net.state().connected_peers().len(),
            known_seeds: ctx.net.state().seeds().len(),
            connected_seeds: ctx.net.state().connected_seeds(),
            active_tasks: ctx.registry.active_count(),
            bytes: ctx.metrics.bytes(),
            storage: None,
        }
    }

    /// `/readyz`: the store is open (it is while the node runs), the node listens, and when
    /// bootstrap addresses are configured it has joined at least one peer or seed.
    pub fn readiness(&self) -> Result<(), String> {
        let ctx = &self.inner.ctx;
        if self.inner.shutdown.is_cancelled() {
            return Err("shutting down".into());
        }
        if ctx.net.state().listen_addrs().is_empty() {
            return Err("not listening for peers yet".into());
        }
        if !ctx.config.bootstrap.is_empty() && ctx.net.state().connected_peers().is_empty() {
            return Err("joined no peer or seed yet (bootstrap addresses are configured)".into());
        }
        Ok(())
    }

    /// `/metrics`: Prometheus text 0.0.4, or OpenMetrics text when `openmetrics`.
    pub fn metrics_text(&self, openmetrics: bool) -> String {
        let ctx = &self.inner.ctx;
        let g = Gauges {
            connected_peers: ctx.net.state().connected_peers().len(),
            known_seeds: ctx.net.state().seeds().len(),
            active_tasks: ctx.registry.active_count(),
            store_bytes: ctx.store.disk_usage(),
            store_quota: ctx.config.storage.quota.as_u64(),
        };
        if openmetrics {
            ctx.metrics.render_openmetrics(&g)
        } else {
            ctx.metrics.render(&g)
        }
    }

    /// Starts (or joins) the download of a task; returns once its header is known, or the error
    /// that prevents it (origin status, no source, …).
    pub async fn download(
        &self,
        req: DownloadRequest,
    ) -> Result<(TaskKey, SignedHeader), TaskError> {
        crate::task::download(&self.inner.ctx, req).await
    }

    /// The progress of a live or recently finished task (complete tasks in the store included).
    pub async fn progress(&self, key: &TaskKey) -> Option<watch::Receiver<Progress>> {
        crate::task::progress(&self.inner.ctx, key).await
    }

    /// Every task the node knows now (live and recently finished).
    pub fn tasks(&self) -> Vec<(TaskKey, Progress)> {
        crate::task::tasks(&self.inner.ctx)
    }

    /// Removes a finished task from the store (it must not be running).
    pub async fn delete_task(&self, key: &TaskKey) -> Result<bool, TaskError> {
        crate::task::delete_task(&self.inner.ctx, key).await
    }

    /// Deletes a task here for a purge: a finished task whose runner is still winding down is
    /// deleted once it has exited (a download in progress is not: that is an error).
    async fn purge_here(&self, key: &TaskKey) -> Result<bool, TaskError> {
        let ctx = &self.inner.ctx;
        if ctx.registry.live(key).is_some()
            && let Some(mut rx) = self.progress(key).await
        {
            // Wait while it winds down (all pieces held, or finished); the runner drops its end of
            // the progress channel as it exits.
            let _ = tokio::time::timeout(PURGE_WAIT, async {
                loop {
                    let winding_down = {
                        let p = rx.borrow();
                        matches!(
                            p.phase,
                            Phase::Verified | Phase::Complete | Phase::Failed(_)
                        ) || (!p.have.is_empty() && p.have.count() == p.have.len())
                    };
                    if !winding_down || rx.changed().await.is_err() {
                        break;
                    }
                }
            })
            .await;
        }
        crate::task::delete_task(ctx, key).await
    }

    /// Removes a task here and, with `scope`, on the cluster's seeds or on every member that holds
    /// it (the seeds, the connected peers and the task's DHT providers): one line per host.
    pub async fn purge(&self, key: &TaskKey, scope: PurgeScope) -> Vec<api::PurgeHost> {
        let ctx = &self.inner.ctx;
        let me = self.peer_id();
        let outcome = |r: Result<bool, TaskError>| match r {
            Ok(true) => ("deleted".to_owned(), None),
            Ok(false) => ("absent".to_owned(), None),
            Err(e) => ("failed".to_owned(), Some(e.to_string())),
        };
        let (o, error) = outcome(self.purge_here(key).await);
        let mut hosts = vec![api::PurgeHost {
            peer: me.to_string(),
            role: Some(ctx.config.role),
            outcome: o,
            error,
        }];
        let mut targets: HashSet<PeerId> = ctx.net.state().seeds().into_iter().collect();
        if scope == PurgeScope::AllPeers {
            targets.extend(ctx.net.state().connected_peers());
            if let Ok(p) =
                tokio::time::timeout(PURGE_WAIT, ctx.net.get_providers(key.to_bytes())).await
            {
                targets.extend(p.unwrap_or_default());
            }
        }
        targets.remove(&me);
        if scope == PurgeScope::Local {
            targets.clear();
        }
        let asks = targets.into_iter().map(|peer| {
            let net = ctx.net.clone();
            let role = ctx.net.state().peer(&peer).and_then(|p| p.role);
            async move {
                let r = tokio::time::timeout(
                    PURGE_WAIT * 2,
                    net.request(peer, ControlRequest::Purge { task: *key }),
                )
                .await;
                let (outcome, error) = match r {
                    Ok(Ok((ControlResponse::Purged { deleted }, _))) => {
                        (if deleted { "deleted" } else { "absent" }.to_owned(), None)
                    }
                    Ok(Ok((ControlResponse::Error(e), _))) if e.code == ErrorCode::Refused => {
                        ("refused".to_owned(), Some(e.message))
                    }
                    Ok(Ok((ControlResponse::Error(e), _))) => {
                        ("failed".to_owned(), Some(e.message))
                    }
                    Ok(Ok((other, _))) => (
                        "failed".to_owned(),
                        Some(format!("unexpected answer {other:?}")),
                    ),
                    Ok(Err(e)) => ("unreachable".to_owned(), Some(e.to_string())),
                    Err(_) => (
                        "unreachable".to_owned(),
                        Some("no answer in time".to_owned()),
                    ),
                };
                api::PurgeHost {
                    peer: peer.to_string(),
                    role,
                    outcome,
                    error,
                }
            }
        });
        hosts.extend(futures::future::join_all(asks).await);
        hosts
    }

    /// Waits for the task's header, then streams `range` of its content (given as an HTTP `Range`
    /// header value; `None` for the whole content) as its pieces arrive. The task itself must have
    /// been started (see [`Node::download`]) or be complete in the store; dropping the stream
    /// does not stop it.
    pub async fn content(
        &self,
        key: &TaskKey,
        range: Option<&str>,
    ) -> Result<Content, ContentError> {
        crate::content::open(&self.inner.ctx, key, range).await
    }

    /// Lists a task's pieces as they are verified, with the files holding them, for a reader on
    /// this host (see [`crate::content::PieceFiles`]).
    pub async fn content_files(
        &self,
        key: &TaskKey,
        order: crate::content::ListOrder,
    ) -> Result<crate::content::PieceFiles, ContentError> {
        crate::content::open_files(&self.inner.ctx, key, order).await
    }

    /// Stops everything and flushes the store.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        self.inner.tracker.close();
        self.inner.tracker.wait().await;
        let store = self.inner.ctx.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.flush()).await;
        if let ApiAddr::Unix(p) = &self.inner.api_addr {
            let _ = std::fs::remove_file(p);
        }
    }

    /// After [`Node::shutdown`], just before the process exits: closes the store, so no thread
    /// is inside RocksDB while the process tears down. The node is unusable afterwards.
    pub async fn release_for_exit(&self) {
        let store = self.inner.ctx.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.close()).await;
    }

    /// Waits until `n` peers are connected and identified; false after `timeout`.
    pub async fn wait_for_peers(&self, n: usize, timeout: std::time::Duration) -> bool {
        self.inner.ctx.net.state().wait_identified(n, timeout).await
    }

    /// Starts a preheat job (`POST /v1/preheat`); the job reports its progress through
    /// [`Node::preheat_job`].
    pub fn preheat(
        &self,
        req: crate::preheat::PreheatRequest,
    ) -> Result<crate::preheat::PreheatJob, TaskError> {
        crate::preheat::start(&self.inner.ctx, &self.inner.preheats, req)
    }

    /// A preheat job's report, while the node keeps it (the last 256 jobs).
    pub fn preheat_job(&self, id: &str) -> Option<crate::preheat::PreheatJob> {
        self.inner.preheats.get(id)
    }

    /// Waits until `n` seeds are connected and identified; false after `timeout`.
    pub async fn wait_for_seeds(&self, n: usize, timeout: std::time::Duration) -> bool {
        self.inner.ctx.net.state().wait_for_seeds(n, timeout).await
    }

    /// Resolves when the node has been asked to stop.
    pub async fn stopped(&self) {
        self.inner.shutdown.cancelled().await;
    }

    fn task_state_from_store(&self, key: &TaskKey) -> TaskState {
        let store = &self.inner.ctx.store;
        let Ok(Some(rec)) = store.task(key) else {
            return TaskState::default();
        };
        let n = rec.header.header.layout().piece_count();
        let hashes = store.hashes(key).unwrap_or_default();
        let bitfield = store.bitfield(key, n).ok().filter(|b| b.count() > 0);
        TaskState {
            header: Some(rec.header),
            hashes,
            bitfield,
            producing: false,
            data: None,
        }
    }

    async fn handle_request(&self, peer: PeerId, request: ControlRequest) -> ControlResponse {
        let ctx = &self.inner.ctx;
        match request {
            ControlRequest::Purge { task } => {
                if !ctx.trust.trusts_producer(&peer) {
                    tracing::warn!(%peer, %task, "purge refused: the asker is not a trusted member");
                    return ControlResponse::Error(ControlError {
                        code: ErrorCode::Refused,
                        message: "purge refused: not a trusted member".into(),
                        origin_status: None,
                    });
                }
                match self.purge_here(&task).await {
                    Ok(deleted) => {
                        tracing::info!(%peer, %task, deleted, "purged on a member's request");
                        ControlResponse::Purged { deleted }
                    }
                    Err(e) => ControlResponse::Error(e.to_control()),
                }
            }
            ControlRequest::GetTask { task } => {
                let mut state = match ctx.registry.live(&task) {
                    Some(h) => {
                        let (tx, rx) = oneshot::channel();
                        let _ = h.tx.send(RunnerMsg::GetState { reply: tx });
                        match rx.await {
                            Ok(s) => s,
                            Err(_) => self.state_blocking(task).await,
                        }
                    }
                    None => self.state_blocking(task).await,
                };
                // Data access goes with every answer about a task this node has or is fetching,
                // not only once it holds a piece: the grant is bound to the asker, not to the
                // task (a requester with a grant from any answer may ask for any piece), so
                // withholding it before the first piece protected nothing and cost a second
                // probe round trip (after the first `Have`) before the first request.
                if state.header.is_some() || state.producing || state.bitfield.is_some() {
                    let grant = self.inner.tokens.grant_for(&peer);
                    state.data = Some(DataAccess {
                        port: self.inner.data_addr.port(),
                        token: grant.token,
                        expires: grant.expires,
                    });
                }
                ControlResponse::Task(state)
            }
            ControlRequest::Preheat { task, origin } => {
                crate::preheat::on_request(&self.inner.ctx, peer, task, origin).await
            }
            ControlRequest::Replicate {
                task,
                origin,
                header,
            } => {
                let answer = self.replicate_here(peer, task, origin, header).await;
                let outcome = match &answer {
                    ControlResponse::Replicating => "accepted",
                    ControlResponse::Error(e) if e.code == ErrorCode::Refused => "refused",
                    ControlResponse::Error(e) if e.code == ErrorCode::Declined => "declined",
                    _ => "failed",
                };
                ctx.metrics.replica_request(outcome);
                answer
            }
            ControlRequest::StartTask {
                task,
                origin,
                missing,
            } => {
                if ctx.config.role == Role::Ephemeral || !ctx.config.download.back_to_source {
                    return ControlResponse::Error(ControlError {
                        code: ErrorCode::Declined,
                        message: "this node does not fetch origins for others".into(),
                        origin_status: None,
                    });
                }
                // A runner that finishes (the task complete) just as this request reaches it
                // drops the request: answer from the store then, or ask a fresh runner, rather
                // than decline (the asker would fetch the origin a second time).
                let requester = Requester::peer_at(ctx.net.state().peer(&peer).and_then(|p| p.ip));
                for _ in 0..3 {
                    if ctx.registry.live(&task).is_none()
                        && let Some(rec) = complete_in_store(ctx, task).await
                    {
                        return ControlResponse::Started { header: rec.header };
                    }
                    let Some(runner) = ctx.registry.get_or_start_for(ctx, task, Some(peer)) else {
                        return too_many_tasks();
                    };
                    let (tx, rx) = oneshot::channel();
                    let sent = runner.tx.send(RunnerMsg::StartTask {
                        origin: origin.clone(),
                        missing: missing.clone(),
                        requester,
                        reply: tx,
                    });
                    if sent.is_ok()
                        && let Ok(answer) = rx.await
                    {
                        return answer;
                    }
                }
                ControlResponse::Error(TaskError::internal("task stopped").to_control())
            }
        }
    }

    /// A task's first owner asks this node to hold a replica (`ControlRequest::Replicate`).
    async fn replicate_here(
        &self,
        peer: PeerId,
        task: TaskKey,
        origin: df_protocols::control::OriginRequest,
        header: Box<SignedHeader>,
    ) -> ControlResponse {
        let ctx = &self.inner.ctx;
        if ctx.config.role != Role::Seed {
            return ControlResponse::Error(ControlError {
                code: ErrorCode::Declined,
                message: "only seeds hold replicas".into(),
                origin_status: None,
            });
        }
        // The asker hands over origin credentials and wants this seed to take over its
        // origin fetch: only a trusted producer may, and only for its own header.
        if !ctx.trust.trusts_producer(&peer) || header.header.producer != peer {
            tracing::warn!(%peer, %task, "replica request refused: the asker is not a trusted producer of this task");
            return ControlResponse::Error(ControlError {
                code: ErrorCode::Refused,
                message: "replica refused: not a trusted member, or not the header's producer"
                    .into(),
                origin_status: None,
            });
        }
        let requester = Requester::peer_at(ctx.net.state().peer(&peer).and_then(|p| p.ip));
        if complete_in_store(ctx, task).await.is_some() {
            return ControlResponse::Replicating;
        }
        let Some(runner) = ctx.registry.get_or_start_for(ctx, task, Some(peer)) else {
            return too_many_tasks();
        };
        let (tx, rx) = oneshot::channel();
        let sent = runner.tx.send(RunnerMsg::Replicate {
            origin,
            header: *header,
            from: peer,
            requester,
            reply: tx,
        });
        if sent.is_ok()
            && let Ok(answer) = rx.await
        {
            return answer;
        }
        // The runner ended just as the request reached it: complete, or failed.
        match complete_in_store(ctx, task).await {
            Some(_) => ControlResponse::Replicating,
            None => ControlResponse::Error(TaskError::internal("task stopped").to_control()),
        }
    }

    async fn state_blocking(&self, task: TaskKey) -> TaskState {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.task_state_from_store(&task))
            .await
            .unwrap_or_default()
    }
}

/// The task's record when the store holds it complete.
async fn complete_in_store(
    ctx: &Arc<TaskContext>,
    task: TaskKey,
) -> Option<crate::store::TaskRecord> {
    let store = ctx.store.clone();
    match tokio::task::spawn_blocking(move || store.task(&task)).await {
        Ok(Ok(Some(rec))) if rec.complete => Some(rec),
        _ => None,
    }
}

/// The answer to a peer that has started too many runners here.
fn too_many_tasks() -> ControlResponse {
    ControlResponse::Error(ControlError {
        code: ErrorCode::Declined,
        message: "too many tasks started by this peer".into(),
        origin_status: None,
    })
}

/// How long a purge waits for a finishing runner, for the DHT's providers, and (twice this) for
/// each host's answer.
const PURGE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Binds an optional extra HTTP listener (`metrics_listen`, `ui_listen`); returns it and the
/// address it got.
async fn bind_extra<F, Fut>(
    addr: Option<SocketAddr>,
    bind: F,
) -> Result<(Option<api::server::ApiListener>, Option<SocketAddr>), NodeError>
where
    F: FnOnce(SocketAddr) -> Fut,
    Fut: std::future::Future<Output = std::io::Result<api::server::ApiListener>>,
{
    let Some(a) = addr else {
        return Ok((None, None));
    };
    let l = bind(a).await.map_err(|e| NodeError::Listen {
        addr: a.to_string(),
        source: e,
    })?;
    let at = match l.local_addr() {
        ApiAddr::Tcp(a) => Some(a),
        ApiAddr::Unix(_) => None,
    };
    Ok((Some(l), at))
}

async fn dispatch(
    node: Node,
    mut events: mpsc::Receiver<NetworkEvent>,
    shutdown: CancellationToken,
) {
    let ctx = node.ctx().clone();
    // Preheats heard on the cluster topic and not yet answered (each waits for its task's header).
    let cluster_preheats = Arc::new(tokio::sync::Semaphore::new(MAX_CLUSTER_PREHEATS));
    loop {
        let ev = tokio::select! {
            _ = shutdown.cancelled() => break,
            ev = events.recv() => match ev { Some(ev) => ev, None => break },
        };
        match ev {
            NetworkEvent::Gossip {
                task,
                source,
                propagation_source,
                message_id,
                message,
            } => {
                let sent = ctx.registry.live(&task).is_some_and(|h| {
                    h.send_bounded(RunnerMsg::Gossip {
                        source,
                        propagation_source,
                        message_id: message_id.clone(),
                        message,
                    })
                });
                // No runner, or one this far behind: not forwarded, not penalised.
                if !sent {
                    ctx.net
                        .report_validation(
                            message_id,
                            propagation_source,
                            MessageAcceptance::Ignore,
                        )
                        .await;
                }
            }
            NetworkEvent::Request {
                peer,
                request,
                reply,
            } => {
                let node = node.clone();
                tokio::spawn(async move {
                    let resp = node.handle_request(peer, request).await;
                    let _ = reply.send(resp);
                });
            }
            NetworkEvent::Cluster {
                source,
                propagation_source,
                message_id,
                message,
            } => {
                let verdict = on_cluster_message(&ctx, &cluster_preheats, source, message);
                ctx.net
                    .report_validation(message_id, propagation_source, verdict)
                    .await;
            }
            // Not (or no longer) a task here: nothing to learn from it. Bounded as gossip is: a
            // runner this far behind loses haves, not memory.
            NetworkEvent::Have { peer, frame } => {
                if let Some(h) = ctx.registry.live(&frame.task)
                    && !h.send_bounded(RunnerMsg::Have {
                        peer,
                        pieces: frame.pieces,
                        complete: frame.complete,
                    })
                {
                    ctx.metrics.direct_have("dropped");
                }
            }
            NetworkEvent::PeerSubscribed { peer, task } => {
                if let Some(h) = ctx.registry.live(&task) {
                    let _ = h.tx.send(RunnerMsg::PeerSubscribed(peer));
                }
            }
            NetworkEvent::PeerDisconnected(peer) => {
                for tx in ctx.registry.all_live() {
                    let _ = tx.send(RunnerMsg::PeerDisconnected(peer));
                }
            }
            NetworkEvent::PeerConnected(_) => {}
        }
    }
}

/// Preheats heard on the cluster topic that one node starts at once; more are not forwarded.
const MAX_CLUSTER_PREHEATS: usize = 64;

/// A request to every member, heard on the cluster topic: honoured (and forwarded) only when its
/// author is a trusted member; a preheat starts a download from the swarm. A request from an
/// author this node does not trust is ignored, not rejected: the member that relayed it may trust
/// the author (trust lists can differ), and a rejection would cost that relay gossipsub score on
/// every topic it shares with this node.
fn on_cluster_message(
    ctx: &Arc<TaskContext>,
    running: &Arc<tokio::sync::Semaphore>,
    source: PeerId,
    message: ClusterMessage,
) -> MessageAcceptance {
    let ClusterMessage::Preheat { job, task, origin } = message;
    if !ctx.trust.trusts_producer(&source) {
        tracing::warn!(peer = %source, %task, %job, "cluster preheat refused: the asker is not a trusted member");
        return MessageAcceptance::Ignore;
    }
    let Ok(permit) = running.clone().try_acquire_owned() else {
        tracing::info!(peer = %source, %task, %job, "cluster preheat ignored: {MAX_CLUSTER_PREHEATS} already starting");
        return MessageAcceptance::Ignore;
    };
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let answer = crate::preheat::on_request(&ctx, source, task, origin).await;
        if let ControlResponse::Error(e) = answer {
            tracing::info!(peer = %source, %task, %job, error = %e.message, "cluster preheat failed");
        }
        drop(permit);
    });
    MessageAcceptance::Accept
}

/// The API serves what the node implements here ([`api::NodeApi`]); it does not import the node.
#[async_trait::async_trait]
impl api::NodeApi for Node {
    async fn status(&self) -> NodeStatus {
        let mut status = Node::status(self);
        // The store report reads every task record and the filesystem: off the async threads.
        let ctx = self.inner.ctx.clone();
        status.storage = tokio::task::spawn_blocking(move || crate::gc::report(&ctx))
            .await
            .ok();
        status
    }

    fn metrics_text(&self, openmetrics: bool) -> String {
        Node::metrics_text(self, openmetrics)
    }

    fn readiness(&self) -> Result<(), String> {
        Node::readiness(self)
    }

    async fn purge(&self, key: &TaskKey, scope: PurgeScope) -> Vec<api::PurgeHost> {
        Node::purge(self, key, scope).await
    }

    fn peers(&self) -> Vec<api::PeerView> {
        let mut v: Vec<api::PeerView> = self
            .inner
            .ctx
            .net
            .state()
            .peers()
            .into_iter()
            .map(|(id, info)| api::PeerView {
                peer_id: id.to_string(),
                role: info.role,
                ip: info.ip.map(|ip| ip.to_string()),
            })
            .collect();
        v.sort_by(|a, b| {
            (a.role != Some(Role::Seed), &a.peer_id).cmp(&(b.role != Some(Role::Seed), &b.peer_id))
        });
        v
    }

    async fn piece_map(&self, key: &TaskKey) -> Option<String> {
        let have = self.progress(key).await?.borrow().have.clone();
        let map = self
            .inner
            .ctx
            .registry
            .shared(key)
            .map(|s| s.piece_map())
            .unwrap_or_default();
        if map.len() == have.len() as usize {
            return Some(map);
        }
        // No runner kept a map (a task found complete in the store): what is held, from before.
        Some(
            (0..have.len())
                .map(|i| {
                    if have.get(i) {
                        crate::task::PieceMark::Held as u8 as char
                    } else {
                        crate::task::PieceMark::Missing as u8 as char
                    }
                })
                .collect(),
        )
    }

    fn tasks(&self) -> Vec<(TaskKey, Progress)> {
        Node::tasks(self)
    }

    async fn progress(&self, key: &TaskKey) -> Option<watch::Receiver<Progress>> {
        Node::progress(self, key).await
    }

    async fn download(&self, req: DownloadRequest) -> Result<TaskKey, TaskError> {
        Node::download(self, req).await.map(|(key, _)| key)
    }

    async fn delete_task(&self, key: &TaskKey) -> Result<bool, TaskError> {
        Node::delete_task(self, key).await
    }

    async fn content(&self, key: &TaskKey, range: Option<&str>) -> Result<Content, ContentError> {
        Node::content(self, key, range).await
    }

    async fn content_files(
        &self,
        key: &TaskKey,
        order: crate::content::ListOrder,
    ) -> Result<crate::content::PieceFiles, ContentError> {
        Node::content_files(self, key, order).await
    }

    fn preheat(
        &self,
        req: crate::preheat::PreheatRequest,
    ) -> Result<crate::preheat::PreheatJob, TaskError> {
        Node::preheat(self, req)
    }

    fn preheat_job(&self, id: &str) -> Option<crate::preheat::PreheatJob> {
        Node::preheat_job(self, id)
    }
}
