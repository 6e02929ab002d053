//! The local API that front ends (the CLI, the registry mirror) use: HTTP/1.1 with JSON, on a unix
//! socket by default or `HOST:PORT`.
//!
//! | method and path | what |
//! |---|---|
//! | `GET /healthz` | `200 ok` once the node serves |
//! | `GET /v1/status` | [`NodeStatus`] JSON |
//! | `GET /metrics` | Prometheus text 0.0.4; OpenMetrics when `Accept` asks for `application/openmetrics-text` |
//! | `GET /readyz` | `200 ready` once the node can serve: store open, listening, and (with bootstrap addresses configured) joined at least one peer; else `503` with the reason |
//! | `POST /v1/tasks` | body: [`DownloadRequest`](crate::task::DownloadRequest) JSON; starts or joins the task and answers [`TaskInfo`] once its length is known, or `{"error": {"code": …}}` |
//! | `GET /v1/tasks` | every live and recently finished task, [`TaskInfo`] each |
//! | `GET /v1/tasks/{id}` | one task's [`TaskInfo`] (progress, sources, error) |
//! | `GET`/`HEAD /v1/tasks/{id}/content` | the content, in order, streamed as pieces arrive; `Range: bytes=…` supported. A task that fails mid-stream aborts the response. |
//! | `GET /v1/tasks/{id}/files` | the task's pieces as they are verified, one [`PieceFile`](crate::content::PieceFile) JSON line each (`application/x-ndjson`), lowest ready index first (`?order=index`: in index order), with the file holding it and where in it (`path`, `path_offset`) where the store keeps one: a client on this host links that file as its output, or copies the pieces into it itself (`df get -o`). A line `{"error": …}` ends a failed listing. |
//! | `DELETE /v1/tasks/{id}` | evicts a finished task from the cache |
//! | `DELETE /v1/tasks/{id}?scope=all_seeds\|all_peers` | purges it here and on the seeds / every member holding it; answers [`PurgeHost`] per host |
//! | `POST /v1/preheat` | body: [`PreheatRequest`](crate::preheat::PreheatRequest); starts a job, answers `202` with its [`PreheatJob`](crate::preheat::PreheatJob) |
//! | `GET /v1/preheat/{id}` | the job: state, per task and per host progress, errors in words |
//!
//! The unix socket (mode 0600) is guarded by its file mode alone. A TCP API checks every request
//! but `GET /healthz` and `GET /readyz`: the `Host` header must name the listener, an `Origin` header
//! must be the API's own, a request with a body must be `application/json`, and on a non-loopback
//! address `Authorization: Bearer <token>` must carry the [`token`] from `<data dir>/api-token`.
//! Refusals are `{"error": {"code": "unauthorized" | "forbidden" | …}}` ([`Refusal`]).

pub(crate) mod access;
pub mod client;
pub mod server;
pub mod token;

use df_protocols::task::TaskKey;
use http::StatusCode;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::config::Role;
use crate::content::{Content, ContentError, ListOrder, PieceFiles};
use crate::metrics::ByteCounters;
use crate::task::{DownloadRequest, Phase, Progress, TaskError};

/// What the API serves. The node implements it; the server sees only this trait (as the registry
/// mirror sees its blob source), so a test can serve the API from a fake.
#[async_trait::async_trait]
pub trait NodeApi: Send + Sync + 'static {
    /// `GET /v1/status`.
    async fn status(&self) -> NodeStatus;
    /// `GET /metrics`: Prometheus text 0.0.4, or OpenMetrics text when `openmetrics`.
    fn metrics_text(&self, openmetrics: bool) -> String;
    /// `GET /readyz`: `Err(reason)` while the node cannot serve yet.
    fn readiness(&self) -> Result<(), String>;
    /// `DELETE /v1/tasks/{id}?scope=all_seeds|all_peers`: a purge here and on other members.
    async fn purge(&self, key: &TaskKey, scope: PurgeScope) -> Vec<PurgeHost>;
    /// `GET /v1/peers`: the peers connected now.
    fn peers(&self) -> Vec<PeerView>;
    /// `GET /v1/tasks/{id}/pieces`: one [`PieceMark`](crate::task::PieceMark) character per piece.
    async fn piece_map(&self, key: &TaskKey) -> Option<String>;
    /// Every live and recently finished task.
    fn tasks(&self) -> Vec<(TaskKey, Progress)>;
    /// A task's progress, if the node knows it (running, recently finished or complete in the store).
    async fn progress(&self, key: &TaskKey) -> Option<watch::Receiver<Progress>>;
    /// Starts or joins a download; returns once its header is known.
    async fn download(&self, req: DownloadRequest) -> Result<TaskKey, TaskError>;
    /// Evicts a finished task; `false` if there was none.
    async fn delete_task(&self, key: &TaskKey) -> Result<bool, TaskError>;
    /// A byte range of a task's content (an HTTP `Range` value; `None`: all of it), in order.
    async fn content(&self, key: &TaskKey, range: Option<&str>) -> Result<Content, ContentError>;
    /// `GET /v1/tasks/{id}/files[?order=index]`: the task's pieces as they are verified (or in
    /// index order), with their files.
    async fn content_files(
        &self,
        key: &TaskKey,
        order: ListOrder,
    ) -> Result<PieceFiles, ContentError>;
    /// `POST /v1/preheat`: starts a job.
    fn preheat(
        &self,
        req: crate::preheat::PreheatRequest,
    ) -> Result<crate::preheat::PreheatJob, TaskError>;
    /// `GET /v1/preheat/{id}`.
    fn preheat_job(&self, id: &str) -> Option<crate::preheat::PreheatJob>;
}

/// `GET /v1/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    pub peer_id: String,
    pub role: Role,
    pub listen_addrs: Vec<String>,
    pub data_addr: String,
    pub connected_peers: usize,
    pub known_seeds: usize,
    /// Seeds connected now (elections and task owners rank these).
    #[serde(default)]
    pub connected_seeds: usize,
    pub active_tasks: usize,
    pub bytes: ByteCounters,
    /// The store: use, quota, disk watermarks, next eviction candidates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<crate::gc::StorageReport>,
}

/// A task as the API reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TaskInfo {
    /// The task key (a CID).
    pub id: String,
    /// `starting`, `running`, `complete` or `failed`.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_length: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub piece_length: Option<u32>,
    pub pieces_total: u32,
    pub pieces_done: u32,
    pub bytes_done: u64,
    /// Bytes of this task this node received from peers and seeds.
    pub from_peers: u64,
    /// Bytes of this task this node fetched from the origin itself.
    pub from_origin: u64,
    /// Sources (peers and seeds) known for this task now.
    pub sources: usize,
    /// Peers dropped from this task for sending corrupt pieces.
    pub banned_peers: Vec<String>,
    /// Verified bytes this node received from each peer or seed, most first.
    #[serde(default)]
    pub received_from: Vec<SourceBytes>,
    /// Whether this node is fetching the origin for this task now.
    pub producing: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TaskError>,
}

/// Where a purge applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PurgeScope {
    /// This node only.
    Local,
    /// This node and every seed it knows.
    AllSeeds,
    /// This node, the seeds, the connected peers and every provider of the task.
    AllPeers,
}

impl std::str::FromStr for PurgeScope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "local" => Ok(PurgeScope::Local),
            "all_seeds" => Ok(PurgeScope::AllSeeds),
            "all_peers" => Ok(PurgeScope::AllPeers),
            _ => Err(format!("scope {s:?}: use local, all_seeds or all_peers")),
        }
    }
}

/// One host's part in a purge (`DELETE /v1/tasks/{id}?scope=…`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PurgeHost {
    pub peer: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// `deleted`, `absent` (it held nothing of the task), `refused` (it does not trust the asker),
    /// `failed` (e.g. a download of the task in progress there) or `unreachable`.
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A connected peer (`GET /v1/peers`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerView {
    pub peer_id: String,
    /// `seed` or `node`, once the peer identified itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
}

/// `GET /v1/tasks/{id}/pieces`: each piece's state, one character per piece: `.` missing, `f` in
/// flight, `o` from the origin (fetched by this node), `s` from a seed, `p` from a peer, `h` held
/// before this download.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PieceMap {
    pub id: String,
    pub pieces: String,
}

/// `url` without its query string and fragment (they may carry tokens).
pub fn without_query(url: &str) -> String {
    let end = url.find(['?', '#']).unwrap_or(url.len());
    url[..end].to_owned()
}

/// `text` with the query string and fragment of every URL in it removed.
fn scrub_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        // The URL runs from its scheme to the next space or quote.
        let start = rest[..i]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '+' || c == '-' || c == '.'))
            .map_or(0, |j| j + 1);
        let end = rest[i..]
            .find(|c: char| c.is_whitespace() || c == '"' || c == '\'' || c == '>')
            .map_or(rest.len(), |j| i + j);
        out.push_str(&rest[..start]);
        out.push_str(&without_query(&rest[start..end]));
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// Bytes of a task received from one source.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SourceBytes {
    /// The source's peer ID.
    pub peer: String,
    pub bytes: u64,
}

impl TaskInfo {
    /// For viewers who may not see secrets: no query string or fragment in any URL (source URL,
    /// error message).
    pub fn redacted(mut self) -> TaskInfo {
        self.source_url = self.source_url.as_deref().map(without_query);
        if let Some(e) = &mut self.error {
            e.scrub_message(scrub_urls);
        }
        self
    }

    pub fn from_progress(key: &TaskKey, p: &Progress) -> TaskInfo {
        let (state, error) = match &p.phase {
            Phase::Starting => ("starting", None),
            // Verified: the bytes are all here and checked, not yet durable.
            Phase::Running | Phase::Verified => ("running", None),
            Phase::Complete => ("complete", None),
            Phase::Failed(e) => ("failed", Some(e.clone())),
        };
        let h = p.header.as_ref().map(|h| &h.header);
        TaskInfo {
            id: key.to_string(),
            state: state.to_owned(),
            source_url: h.map(|h| h.source_url.clone()),
            content_length: h.map(|h| h.content_length),
            piece_length: h.map(|h| h.piece_length),
            pieces_total: p.have.len(),
            pieces_done: p.have.count(),
            bytes_done: p.bytes_done(),
            from_peers: p.from_peers,
            from_origin: p.from_origin,
            sources: p.sources,
            banned_peers: p.banned.iter().map(ToString::to_string).collect(),
            received_from: p
                .received_from
                .iter()
                .map(|(peer, bytes)| SourceBytes {
                    peer: peer.to_string(),
                    bytes: *bytes,
                })
                .collect(),
            producing: p.producing,
            error,
        }
    }
}

/// An error answer: `{"error": {"code": …, "message": …}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: TaskError,
}

/// Why the API refused a request before serving it. Serialised like a [`TaskError`]:
/// `{"error": {"code": "unauthorized", "message": …}}` ([`RefusalBody`]).
#[derive(Debug, Clone, thiserror::Error, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "code", rename_all = "snake_case")]
pub enum Refusal {
    /// 401: a bearer token is needed and was missing or wrong.
    #[error("{message}")]
    Unauthorized { message: String },
    /// 403: the `Host` or `Origin` header names something other than this API.
    #[error("{message}")]
    Forbidden { message: String },
    /// 415: a request body that is not `application/json`.
    #[error("{message}")]
    UnsupportedMediaType { message: String },
    /// 503: too many API connections at once.
    #[error("{message}")]
    Unavailable { message: String },
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            Refusal::Forbidden { .. } => StatusCode::FORBIDDEN,
            Refusal::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Refusal::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// A refusal answer: `{"error": {"code": …, "message": …}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RefusalBody {
    pub error: Refusal,
}
