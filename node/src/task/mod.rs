//! Tasks: one [`runner`] per active task (downloading it for a local consumer, producing it from
//! origin for the swarm, or both), a [`TaskRegistry`] of them, and the types the API sees.
//!
//! | module | what |
//! |---|---|
//! | [`runner`] | the per-task state machine: discovery, producer election, piece scheduling, verification, announcements, stall recovery |
//! | [`picker`] | rarest-first piece picking and source choice (pure) |
//! | [`source`] | one source's bookkeeping: measured rate, failures and pauses, busy pieces |
//! | [`produce`] | fetching pieces from origin (ranges, retries), hashing and storing them |
//! | [`owners`] | which seeds own a task (XOR order), for elections and replicas |

pub(crate) mod announce;
pub(crate) mod election;
pub mod owners;
pub(crate) mod picker;
pub(crate) mod produce;
pub(crate) mod runner;
pub(crate) mod source;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use df_protocols::control::{ControlError, ControlResponse, ErrorCode, OriginRequest, TaskState};
use df_protocols::gossip::GossipMessage;
use df_protocols::manifest::SignedHeader;
use df_protocols::piece::Bitfield;
use df_protocols::task::{self, ContentDigest, TaskKey};
use libp2p::PeerId;
use libp2p::gossipsub::MessageId;
use libp2p::identity::Keypair;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::NodeConfig;
use crate::metrics::Metrics;
use crate::network::NetworkClient;
use crate::origin::{Origin, OriginError, OriginSpec, Requester};
use crate::store::{Store, StoreError};
use crate::transfer::DataClient;

/// How long finished tasks' progress stays visible in the API.
const FINISHED_RETENTION: Duration = Duration::from_secs(600);

/// Why a task failed. Serialised into API error bodies as `{"code": …, …}`.
#[derive(Debug, Clone, thiserror::Error, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "code", rename_all = "snake_case")]
pub enum TaskError {
    #[error("{message}")]
    BadRequest { message: String },
    #[error("{message}")]
    OriginStatus { status: u16, message: String },
    #[error("{message}")]
    OriginUnreachable { message: String },
    #[error("{message}")]
    OriginFailed { message: String },
    #[error("{message}")]
    ContentChanged { message: String },
    #[error("digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch { expected: String, actual: String },
    #[error("{message}")]
    NoSource { message: String },
    #[error("no space left on device ({message})")]
    NoSpace { message: String },
    #[error("{message}")]
    Storage { message: String },
    #[error("{message}")]
    NotFound { message: String },
    #[error("{message}")]
    Internal { message: String },
}

impl TaskError {
    pub fn bad_request(m: impl Into<String>) -> TaskError {
        TaskError::BadRequest { message: m.into() }
    }

    pub fn internal(m: impl Into<String>) -> TaskError {
        TaskError::Internal { message: m.into() }
    }

    /// Rewrites the error's free text with `f` (e.g. to take secrets out of URLs in it).
    pub fn scrub_message(&mut self, f: impl Fn(&str) -> String) {
        match self {
            TaskError::BadRequest { message }
            | TaskError::OriginStatus { message, .. }
            | TaskError::OriginUnreachable { message }
            | TaskError::OriginFailed { message }
            | TaskError::ContentChanged { message }
            | TaskError::NoSource { message }
            | TaskError::NoSpace { message }
            | TaskError::Storage { message }
            | TaskError::NotFound { message }
            | TaskError::Internal { message } => *message = f(message),
            TaskError::DigestMismatch { .. } => {}
        }
    }

    /// The error to give a peer that asked us to start this task.
    pub(crate) fn to_control(&self) -> ControlError {
        let (code, origin_status) = match self {
            TaskError::BadRequest { .. } => (ErrorCode::BadRequest, None),
            TaskError::OriginStatus { status, .. } => (ErrorCode::OriginStatus, Some(*status)),
            TaskError::OriginUnreachable { .. } | TaskError::OriginFailed { .. } => {
                (ErrorCode::OriginUnreachable, None)
            }
            TaskError::ContentChanged { .. } | TaskError::DigestMismatch { .. } => {
                (ErrorCode::ContentChanged, None)
            }
            TaskError::NoSource { .. } => (ErrorCode::Declined, None),
            _ => (ErrorCode::Internal, None),
        };
        let mut message = self.to_string();
        message.truncate(df_protocols::limits::MAX_ERROR_MESSAGE);
        ControlError {
            code,
            message,
            origin_status,
        }
    }

    /// An error a peer reported, as a task error; `None` when the peer merely declined.
    pub(crate) fn from_control(e: &ControlError) -> Option<TaskError> {
        let message = e.message.clone();
        Some(match e.code {
            ErrorCode::OriginStatus => TaskError::OriginStatus {
                status: e.origin_status.unwrap_or(0),
                message,
            },
            ErrorCode::OriginUnreachable => TaskError::OriginUnreachable { message },
            ErrorCode::ContentChanged => TaskError::ContentChanged { message },
            ErrorCode::BadRequest => TaskError::BadRequest { message },
            ErrorCode::Declined | ErrorCode::Internal | ErrorCode::Refused => return None,
        })
    }
}

impl From<OriginError> for TaskError {
    fn from(e: OriginError) -> Self {
        let message = e.to_string();
        match e {
            OriginError::Status { status, .. } => TaskError::OriginStatus { status, message },
            OriginError::Unreachable { .. } => TaskError::OriginUnreachable { message },
            OriginError::Changed(_) => TaskError::ContentChanged { message },
            OriginError::Body(_) | OriginError::Protocol(_) => TaskError::OriginFailed { message },
        }
    }
}

impl From<StoreError> for TaskError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NoSpace => TaskError::NoSpace {
                message: "piece store".into(),
            },
            other => TaskError::Storage {
                message: other.to_string(),
            },
        }
    }
}

/// A request to download a task for a local consumer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct DownloadRequest {
    pub url: String,
    /// Request headers for the origin (e.g. `Authorization`); used for origin fetches only.
    pub headers: Vec<(String, String)>,
    pub digest: Option<ContentDigest>,
    pub tag: String,
    pub filtered_query_params: Vec<String>,
    /// Never fetch from origin for this request, not even through a peer; only seeds may.
    pub disable_back_to_source: bool,
    /// Bytes per second this task may download (from peers, seeds and, when this node fetches
    /// it, the origin), beside the node's `[limits]`. Requests joining a task share it; the
    /// lowest rate any of them asked for holds. `None`: no task limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_rate: Option<crate::limits::Rate>,
    /// Who asked: this node's user, or a peer (never taken from the API body).
    #[serde(skip)]
    pub requester: Requester,
}

impl DownloadRequest {
    /// Checks the request and returns its task key.
    pub fn task_key(&self) -> Result<TaskKey, TaskError> {
        let url = task::parse_url(&self.url).map_err(|e| TaskError::bad_request(e.to_string()))?;
        if self.url.len() > df_protocols::limits::MAX_URL_LEN {
            return Err(TaskError::bad_request("URL too long"));
        }
        for (k, v) in &self.headers {
            if http::HeaderName::from_bytes(k.as_bytes()).is_err()
                || http::HeaderValue::from_str(v).is_err()
            {
                return Err(TaskError::bad_request(format!("invalid header {k:?}")));
            }
        }
        Ok(TaskKey::for_request(
            &url,
            &self.tag,
            &self.filtered_query_params,
            self.digest.as_ref(),
        ))
    }

    /// Whether the request carries anything secret: origin headers (e.g. `Authorization`, a
    /// registry token), URL userinfo, or query parameters that [`task::canonical_url`] filters
    /// (signatures, tokens). Such a request goes only to trusted producers.
    pub(crate) fn carries_credentials(&self) -> bool {
        if !self.headers.is_empty() {
            return true;
        }
        match task::parse_url(&self.url) {
            Ok(u) => {
                !u.username().is_empty()
                    || u.password().is_some()
                    || u.query_pairs().count()
                        != task::canonical_url(&u, &self.filtered_query_params)
                            .query_pairs()
                            .count()
            }
            // Unparseable: never sent anywhere.
            Err(_) => true,
        }
    }

    pub(crate) fn origin_request(&self) -> OriginRequest {
        OriginRequest {
            url: self.url.clone(),
            headers: self.headers.clone(),
            tag: self.tag.clone(),
            filtered_query_params: self.filtered_query_params.clone(),
            digest: self.digest.clone(),
        }
    }

    /// The request a peer sent with `start_task`.
    pub(crate) fn from_origin_request(o: &OriginRequest, requester: Requester) -> DownloadRequest {
        DownloadRequest {
            url: o.url.clone(),
            headers: o.headers.clone(),
            digest: o.digest.clone(),
            tag: o.tag.clone(),
            filtered_query_params: o.filtered_query_params.clone(),
            disable_back_to_source: false,
            // A peer's rate limit is its own business: it is not sent with `start_task`.
            limit_rate: None,
            requester,
        }
    }

    pub(crate) fn origin_spec(&self) -> Result<OriginSpec, TaskError> {
        let url = task::parse_url(&self.url).map_err(|e| TaskError::bad_request(e.to_string()))?;
        Ok(OriginSpec {
            url,
            headers: self.headers.clone(),
            requester: self.requester,
        })
    }
}

/// Where a task stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Looking for the header (peers, seeds, origin).
    Starting,
    Running,
    /// Every piece is here and verified, with the whole-content digest when there is one: a
    /// reader may take all of it. The node is making it durable before it says `Complete`.
    Verified,
    Complete,
    Failed(TaskError),
}

impl Phase {
    /// Whether a reader may take every piece, the last one included (see [`Phase::Verified`]).
    pub fn content_final(&self) -> bool {
        matches!(self, Phase::Verified | Phase::Complete)
    }
}

/// A task's progress, published by its runner.
#[derive(Debug, Clone)]
pub struct Progress {
    pub phase: Phase,
    pub header: Option<SignedHeader>,
    pub have: Bitfield,
    pub from_peers: u64,
    pub from_origin: u64,
    pub sources: usize,
    pub banned: Vec<PeerId>,
    pub producing: bool,
    /// Verified bytes received from each source (peer or seed) so far, most first.
    pub received_from: Vec<(PeerId, u64)>,
}

impl Progress {
    pub(crate) fn starting() -> Progress {
        Progress {
            phase: Phase::Starting,
            header: None,
            have: Bitfield::new(0),
            from_peers: 0,
            from_origin: 0,
            sources: 0,
            banned: Vec::new(),
            producing: false,
            received_from: Vec::new(),
        }
    }

    /// Progress of a task found complete in the store.
    pub(crate) fn complete(header: SignedHeader) -> Progress {
        let n = header.header.layout().piece_count();
        Progress {
            phase: Phase::Complete,
            header: Some(header),
            have: Bitfield::full(n),
            ..Progress::starting()
        }
    }

    /// Bytes of the content held.
    pub fn bytes_done(&self) -> u64 {
        match &self.header {
            None => 0,
            Some(h) => {
                let l = h.header.layout();
                self.have
                    .iter_set()
                    .map(|i| u64::from(l.piece_len(i)))
                    .sum()
            }
        }
    }
}

/// Messages to a runner. Each is moved once through an unbounded channel, so variant sizes matter
/// little; boxing the large ones would only add allocations.
#[allow(clippy::large_enum_variant)]
pub(crate) enum RunnerMsg {
    Download {
        req: DownloadRequest,
        reply: oneshot::Sender<Result<SignedHeader, TaskError>>,
    },
    StartTask {
        origin: OriginRequest,
        missing: Vec<u32>,
        requester: Requester,
        reply: oneshot::Sender<ControlResponse>,
    },
    /// Hold a replica of the task; `from` produces it (see `ControlRequest::Replicate`).
    Replicate {
        origin: OriginRequest,
        header: SignedHeader,
        from: PeerId,
        requester: Requester,
        reply: oneshot::Sender<ControlResponse>,
    },
    GetState {
        reply: oneshot::Sender<TaskState>,
    },
    Gossip {
        source: Option<PeerId>,
        propagation_source: PeerId,
        message_id: MessageId,
        message: GossipMessage,
    },
    /// A have sent straight to this node on `peer`'s connection (`/df/have/1`).
    Have {
        peer: PeerId,
        pieces: Vec<u32>,
        complete: bool,
    },
    PeerSubscribed(PeerId),
    PeerDisconnected(PeerId),
    // Results of the runner's own jobs.
    Providers(Vec<PeerId>),
    Probed {
        peer: PeerId,
        result: Result<(TaskState, Option<std::net::IpAddr>), String>,
    },
    Elected(election::Election),
    Opened(
        Result<crate::origin::OriginResponse, OriginError>,
        Vec<u32>,
        std::ops::Range<u64>,
    ),
    Fetched {
        index: u32,
        peer: PeerId,
        result: Result<(u32, Duration), runner::FetchFailure>,
    },
    Produced {
        index: u32,
        len: u32,
        result: Result<df_protocols::piece::PieceHash, produce::ProduceError>,
    },
    ProductionDone,
    DigestChecked(Result<(), TaskError>),
    HashesPersisted(Result<(), StoreError>),
}

/// What runners share: the node's parts.
pub(crate) struct TaskContext {
    pub config: NodeConfig,
    pub keypair: Keypair,
    pub peer_id: PeerId,
    pub net: NetworkClient,
    pub store: Store,
    pub data: DataClient,
    pub origin: Arc<dyn Origin>,
    /// The node's origin bucket (`limits.origin_rate`).
    pub origin_limit: crate::limits::Limiter,
    pub metrics: Arc<Metrics>,
    pub activity: Arc<crate::activity::Activity>,
    pub registry: TaskRegistry,
    pub trust: crate::trust::TrustPolicy,
    /// Cancelled when the node stops: runners end and abort their origin and peer fetches.
    pub shutdown: tokio_util::sync::CancellationToken,
}

/// Live runners one peer may have started on this node with `start_task`.
const MAX_RUNNERS_PER_PEER: usize = 64;
/// Gossip messages and direct haves waiting in one runner's mailbox; more are ignored (gossip is
/// then not forwarded).
pub(crate) const MAX_PENDING_GOSSIP: usize = 1024;

struct Entry {
    id: u64,
    tx: Option<mpsc::UnboundedSender<RunnerMsg>>,
    progress: watch::Receiver<Progress>,
    finished_at: Option<Instant>,
    /// The peer whose `start_task` started this runner (none: this node's own download).
    started_by: Option<PeerId>,
    shared: Arc<RunnerShared>,
}

/// What a runner shares with the rest of the node without a message.
#[derive(Debug)]
pub(crate) struct RunnerShared {
    /// Gossip messages and direct haves sent to it and not handled yet (bounded by
    /// [`MAX_PENDING_GOSSIP`]).
    pub pending_gossip: AtomicUsize,
    /// The piece a local reader (an API content stream) waits for next; `u32::MAX`: none. The
    /// picker fetches the pieces from there on in order when that costs the swarm nothing.
    pub reader_at: std::sync::atomic::AtomicU32,
    /// Each piece's state for the status page, one [`PieceMark`] byte per piece.
    pieces: Mutex<Vec<u8>>,
}

impl Default for RunnerShared {
    fn default() -> Self {
        RunnerShared {
            pending_gossip: AtomicUsize::new(0),
            reader_at: std::sync::atomic::AtomicU32::new(u32::MAX),
            pieces: Mutex::new(Vec::new()),
        }
    }
}

/// A piece's state on the status page's map (the byte is the character the API sends).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PieceMark {
    Missing = b'.',
    InFlight = b'f',
    FromOrigin = b'o',
    FromSeed = b's',
    FromPeer = b'p',
    /// Held before this download started (from the store).
    Held = b'h',
}

impl RunnerShared {
    /// Starts the map over: `have`'s pieces held, the rest missing.
    pub(crate) fn reset_pieces(&self, have: &df_protocols::piece::Bitfield) {
        if let Ok(mut m) = self.pieces.lock() {
            *m = (0..have.len())
                .map(|i| {
                    if have.get(i) {
                        PieceMark::Held as u8
                    } else {
                        PieceMark::Missing as u8
                    }
                })
                .collect();
        }
    }

    pub(crate) fn mark_piece(&self, index: u32, mark: PieceMark) {
        if let Ok(mut m) = self.pieces.lock()
            && let Some(b) = m.get_mut(index as usize)
        {
            *b = mark as u8;
        }
    }

    /// The map as the API sends it: one character per piece.
    pub(crate) fn piece_map(&self) -> String {
        self.pieces
            .lock()
            .map(|m| String::from_utf8_lossy(&m).into_owned())
            .unwrap_or_default()
    }
}

/// The node's tasks: live runners and recently finished ones.
#[derive(Clone, Default)]
pub(crate) struct TaskRegistry {
    inner: Arc<Mutex<RegistryInner>>,
}

#[derive(Default)]
struct RegistryInner {
    next_id: u64,
    entries: HashMap<TaskKey, Entry>,
}

/// A live runner's mailbox.
pub(crate) struct RunnerHandle {
    pub tx: mpsc::UnboundedSender<RunnerMsg>,
    pub shared: Arc<RunnerShared>,
}

impl RunnerHandle {
    /// Sends gossip or a direct have unless [`MAX_PENDING_GOSSIP`] such messages already wait
    /// (the runner decrements the count as it takes each). False when not sent: the runner is this
    /// far behind, or gone.
    pub(crate) fn send_bounded(&self, msg: RunnerMsg) -> bool {
        if self.shared.pending_gossip.load(Ordering::Relaxed) >= MAX_PENDING_GOSSIP {
            return false;
        }
        self.shared.pending_gossip.fetch_add(1, Ordering::Relaxed);
        if self.tx.send(msg).is_err() {
            self.shared.pending_gossip.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        true
    }
}

impl TaskRegistry {
    /// The live runner of `key`, if any.
    pub(crate) fn live(&self, key: &TaskKey) -> Option<RunnerHandle> {
        let inner = self.inner.lock().ok()?;
        Self::live_in(&inner, key)
    }

    fn live_in(inner: &RegistryInner, key: &TaskKey) -> Option<RunnerHandle> {
        let e = inner.entries.get(key)?;
        let tx = e.tx.as_ref()?;
        // A runner that has failed is on its way out: a new request must not join it (it would
        // inherit the failure), but start a fresh one.
        if tx.is_closed() || matches!(e.progress.borrow().phase, Phase::Failed(_)) {
            return None;
        }
        Some(RunnerHandle {
            tx: tx.clone(),
            shared: e.shared.clone(),
        })
    }

    /// What the runner of `key` (live or recently finished) shares.
    pub(crate) fn shared(&self, key: &TaskKey) -> Option<Arc<RunnerShared>> {
        let inner = self.inner.lock().ok()?;
        inner.entries.get(key).map(|e| e.shared.clone())
    }

    /// The latest progress of a live or recently finished task.
    pub(crate) fn progress(&self, key: &TaskKey) -> Option<watch::Receiver<Progress>> {
        let inner = self.inner.lock().ok()?;
        inner.entries.get(key).map(|e| e.progress.clone())
    }

    /// All tasks with their progress (live ones first).
    pub(crate) fn list(&self) -> Vec<(TaskKey, Progress, bool)> {
        let Ok(inner) = self.inner.lock() else {
            return Vec::new();
        };
        inner
            .entries
            .iter()
            .map(|(k, e)| (*k, e.progress.borrow().clone(), e.tx.is_some()))
            .collect()
    }

    pub(crate) fn active_count(&self) -> usize {
        self.inner
            .lock()
            .map(|i| i.entries.values().filter(|e| e.tx.is_some()).count())
            .unwrap_or(0)
    }

    /// Returns the live runner of `key`, starting one if there is none.
    pub(crate) fn get_or_start(
        &self,
        ctx: &Arc<TaskContext>,
        key: TaskKey,
    ) -> Option<RunnerHandle> {
        self.get_or_start_for(ctx, key, None)
    }

    /// Like [`TaskRegistry::get_or_start`] for a peer's `start_task`: `None` when that peer
    /// already started [`MAX_RUNNERS_PER_PEER`] live runners here.
    pub(crate) fn get_or_start_for(
        &self,
        ctx: &Arc<TaskContext>,
        key: TaskKey,
        peer: Option<PeerId>,
    ) -> Option<RunnerHandle> {
        // Checked and started under one lock: two requests for a new task at the same moment
        // (two peers asking a seed) must join one runner, not start two that both fetch the
        // origin.
        let mut inner = self.inner.lock().ok()?;
        if let Some(h) = Self::live_in(&inner, &key) {
            return Some(h);
        }
        let now = Instant::now();
        inner.entries.retain(|_, e| {
            e.finished_at
                .is_none_or(|t| now.duration_since(t) < FINISHED_RETENTION)
        });
        if let Some(p) = peer {
            let started = inner
                .entries
                .values()
                .filter(|e| e.tx.is_some() && e.started_by == Some(p))
                .count();
            if started >= MAX_RUNNERS_PER_PEER {
                return None;
            }
        }
        inner.next_id += 1;
        let id = inner.next_id;
        let (tx, rx) = mpsc::unbounded_channel();
        let (ptx, prx) = watch::channel(Progress::starting());
        let shared = Arc::new(RunnerShared::default());
        inner.entries.insert(
            key,
            Entry {
                id,
                tx: Some(tx.clone()),
                progress: prx.clone(),
                finished_at: None,
                started_by: peer,
                shared: shared.clone(),
            },
        );
        let runner = runner::Runner::new(ctx.clone(), key, id, rx, tx.clone(), ptx, shared.clone());
        // Every line the runner logs carries its task ID (as a span field in JSON logs).
        tokio::spawn(tracing::Instrument::instrument(
            runner.run(),
            tracing::info_span!("task", id = %key),
        ));
        Some(RunnerHandle { tx, shared })
    }

    /// Called by a runner as it exits; returns whether it was still the registered one.
    pub(crate) fn finished(&self, key: &TaskKey, id: u64) -> bool {
        let Ok(mut inner) = self.inner.lock() else {
            return false;
        };
        match inner.entries.get_mut(key) {
            Some(e) if e.id == id => {
                e.tx = None;
                e.finished_at = Some(Instant::now());
                true
            }
            _ => false,
        }
    }

    /// Records a finished task's progress (e.g. one found complete in the store).
    pub(crate) fn remember(&self, key: TaskKey, progress: Progress) -> watch::Receiver<Progress> {
        let (_tx, rx) = watch::channel(progress);
        if let Ok(mut inner) = self.inner.lock() {
            inner.next_id += 1;
            let id = inner.next_id;
            inner.entries.insert(
                key,
                Entry {
                    id,
                    tx: None,
                    progress: rx.clone(),
                    finished_at: Some(Instant::now()),
                    started_by: None,
                    shared: Arc::default(),
                },
            );
        }
        rx
    }

    pub(crate) fn forget(&self, key: &TaskKey) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.entries.remove(key);
        }
    }

    /// Mailboxes of every live runner.
    pub(crate) fn all_live(&self) -> Vec<mpsc::UnboundedSender<RunnerMsg>> {
        self.inner
            .lock()
            .map(|i| i.entries.values().filter_map(|e| e.tx.clone()).collect())
            .unwrap_or_default()
    }
}

// The task table's operations, for the API (through the node) and the cache eviction.

/// Starts (or joins) the download of a task; returns once its header is known, or the error
/// that prevents it (origin status, no source, …).
pub(crate) async fn download(
    ctx: &Arc<TaskContext>,
    req: DownloadRequest,
) -> Result<(TaskKey, SignedHeader), TaskError> {
    let key = req.task_key()?;
    let store = ctx.store.clone();
    let rec = tokio::task::spawn_blocking(move || store.task(&key))
        .await
        .map_err(|e| TaskError::internal(e.to_string()))??;
    if let Some(rec) = rec
        && rec.complete
    {
        if ctx.registry.live(&key).is_none() {
            ctx.registry
                .remember(key, Progress::complete(rec.header.clone()));
        }
        return Ok((key, rec.header));
    }
    // A runner may close its mailbox between being found and being asked (it was finishing):
    // then the request goes to a fresh one. A runner that ends answers what it had queued.
    let mut req = Some(req);
    for _ in 0..2 {
        let runner = ctx
            .registry
            .get_or_start(ctx, key)
            .ok_or_else(|| TaskError::internal("task registry unavailable"))?;
        let (tx, rx) = oneshot::channel();
        let Some(r) = req.take() else { break };
        if let Err(mpsc::error::SendError(msg)) =
            runner.tx.send(RunnerMsg::Download { req: r, reply: tx })
        {
            if let RunnerMsg::Download { req: r, .. } = msg {
                req = Some(r);
            }
            continue;
        }
        let header = rx
            .await
            .map_err(|_| TaskError::internal("task runner stopped"))??;
        return Ok((key, header));
    }
    Err(TaskError::internal("task runner stopped"))
}

/// The progress of a live or recently finished task (complete tasks in the store included).
pub(crate) async fn progress(
    ctx: &Arc<TaskContext>,
    key: &TaskKey,
) -> Option<watch::Receiver<Progress>> {
    if let Some(p) = ctx.registry.progress(key) {
        return Some(p);
    }
    let store = ctx.store.clone();
    let k = *key;
    let rec = tokio::task::spawn_blocking(move || store.task(&k))
        .await
        .ok()?
        .ok()
        .flatten()?;
    rec.complete
        .then(|| ctx.registry.remember(*key, Progress::complete(rec.header)))
}

/// Every task the node knows now (live and recently finished).
pub(crate) fn tasks(ctx: &TaskContext) -> Vec<(TaskKey, Progress)> {
    ctx.registry
        .list()
        .into_iter()
        .map(|(k, p, _)| (k, p))
        .collect()
}

/// Forgets a finished task's remembered progress (not its stored data), so the next
/// download reads the store again.
pub(crate) fn forget_finished(ctx: &TaskContext, key: &TaskKey) {
    if ctx.registry.live(key).is_none() {
        ctx.registry.forget(key);
    }
}

/// Removes a finished task from the store (it must not be running).
pub(crate) async fn delete_task(ctx: &TaskContext, key: &TaskKey) -> Result<bool, TaskError> {
    if ctx.registry.live(key).is_some() {
        return Err(TaskError::bad_request("task is in progress"));
    }
    let store = ctx.store.clone();
    let k = *key;
    let existed = tokio::task::spawn_blocking(move || {
        let existed = store.task(&k)?.is_some();
        store.delete_task(&k)?;
        Ok::<_, StoreError>(existed)
    })
    .await
    .map_err(|e| TaskError::internal(e.to_string()))??;
    ctx.registry.forget(key);
    let _ = ctx.net.stop_providing(key.to_bytes()).await;
    Ok(existed)
}
