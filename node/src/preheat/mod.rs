//! Preheat jobs: put a file or an image into the cluster's caches before anyone asks for it
//! (`POST /v1/preheat`, `df preheat`).
//!
//! A job resolves its target to tasks (one for a file; for an image the tag's manifest, the
//! manifests by digest, each platform's config and layers: the task IDs a mirror pull uses), then
//! for each task:
//! 1. **the owners**: the first live trusted seed in the task's owner order
//!    ([`crate::task::owners`]) fetches the origin (`start_task`; this node itself when it is that
//!    seed), and replicates it to the next `replicas - 1` as for any task;
//! 2. **the others** the scope names (`all_seeds`: every connected seed; `all_peers`: every
//!    connected member and this node) are sent `preheat` and download it from the swarm, never
//!    from the origin. For `all_peers` the request also goes to every member on the cluster's
//!    gossipsub topic ([`ClusterMessage::Preheat`], without origin headers), which reaches the
//!    members this node has no connection to; the job learns of them as the task's providers in
//!    the DHT (a member provides a task once it holds a piece) and adds them to its hosts;
//! 3. **progress** is read from each host (`get_task`) until every one holds the whole task, or
//!    fails, or the job's deadline passes. An `all_peers` job ends only after two provider
//!    queries in a row found no new host, so a member still starting is waited for; one that
//!    refuses a request it heard on the topic (it does not trust this node) logs it and is not
//!    listed. The DHT keeps at most 20 providers per key, so a job in a large cluster lists the
//!    connected members and up to that many others; the rest download unlisted.
//!
//! Only trusted producers are sent the origin's credentials; members that are not get the request
//! without its headers (they need none: they fetch from the swarm).

pub mod image;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use df_protocols::control::{ControlRequest, ControlResponse};
use df_protocols::gossip::ClusterMessage;
use df_protocols::task::{ContentDigest, TaskKey};
use futures::StreamExt;
use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use crate::config::Role;
use crate::origin::{Requester, display_url};
use crate::task::{DownloadRequest, TaskContext, TaskError};

/// Jobs kept for `GET /v1/preheat/{id}`; the oldest finished ones go first.
const MAX_JOBS: usize = 256;
/// Tasks of one job placed at once.
const TASKS_AT_ONCE: usize = 4;
/// How long a job may run before its unfinished hosts are reported as timed out.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);
/// Control requests one job task has in flight at once (preheat asks, progress questions).
const REQUESTS_AT_ONCE: usize = 32;
/// How often hosts are asked for their progress (less often past 64 hosts).
const POLL_EVERY: Duration = Duration::from_millis(500);
/// A host that does not answer progress questions for this long has failed.
const HOST_SILENCE: Duration = Duration::from_secs(30);
/// An owner may take this long to answer `start_task` (it opens the origin first).
const OWNER_ASK_TIMEOUT: Duration = Duration::from_secs(60);
/// How often an `all_peers` job looks for the task's providers in the DHT, and how long one
/// look may take.
const DISCOVER_EVERY: Duration = Duration::from_secs(2);
/// Provider queries in a row that found no new host before an `all_peers` job may end.
const QUIET_DISCOVERIES: u32 = 2;

/// `POST /v1/preheat`.
#[derive(Clone, Serialize, Deserialize)]
pub struct PreheatRequest {
    #[serde(flatten)]
    pub target: PreheatTarget,
    #[serde(default)]
    pub scope: PreheatScope,
    /// Seconds the job may take (default 3600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
}

/// What to preheat: `{"type": "file", …}` or `{"type": "image", …}`.
#[derive(Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PreheatTarget {
    File {
        url: String,
        /// Origin request headers, `[["Authorization", "…"]]` (as in `POST /v1/tasks`).
        #[serde(default)]
        headers: Vec<(String, String)>,
        #[serde(default)]
        tag: String,
        #[serde(default)]
        filtered_query_params: Vec<String>,
        #[serde(default)]
        digest: Option<ContentDigest>,
    },
    Image {
        /// `REGISTRY/REPO:TAG` or `REGISTRY/REPO@DIGEST`; `http://REGISTRY/…` for plain HTTP.
        image: String,
        /// `os/arch[/variant]`; every platform of an index when absent.
        #[serde(default)]
        platform: Option<String>,
        #[serde(default)]
        username: Option<String>,
        #[serde(default)]
        password: Option<String>,
    },
}

// Credentials never reach a log line.
impl std::fmt::Debug for PreheatTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PreheatTarget::File { url, headers, .. } => f
                .debug_struct("File")
                .field("url", &shown_url(url))
                .field(
                    "headers",
                    &headers.iter().map(|(k, _)| k).collect::<Vec<_>>(),
                )
                .finish_non_exhaustive(),
            PreheatTarget::Image {
                image,
                platform,
                username,
                ..
            } => f
                .debug_struct("Image")
                .field("image", image)
                .field("platform", platform)
                .field("with_credentials", &username.is_some())
                .finish_non_exhaustive(),
        }
    }
}

impl std::fmt::Debug for PreheatRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreheatRequest")
            .field("target", &self.target)
            .field("scope", &self.scope)
            .finish()
    }
}

/// Who should hold the content when the job succeeds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PreheatScope {
    /// The task's owners: its first live seed and `replicas - 1` more.
    #[default]
    Seed,
    /// Every connected seed.
    AllSeeds,
    /// Every connected member, and this node.
    AllPeers,
}

impl std::str::FromStr for PreheatScope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "seed" => Ok(PreheatScope::Seed),
            "all_seeds" => Ok(PreheatScope::AllSeeds),
            "all_peers" => Ok(PreheatScope::AllPeers),
            _ => Err(format!("scope {s:?}: use seed, all_seeds or all_peers")),
        }
    }
}

/// Where a job, a task or a host stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Pending,
    Running,
    Succeeded,
    Failed,
}

impl JobState {
    pub fn is_finished(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed)
    }
}

/// `GET /v1/preheat/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PreheatJob {
    pub id: String,
    pub state: JobState,
    pub scope: PreheatScope,
    /// The file's URL (no query) or the image reference.
    pub target: String,
    /// Unix seconds.
    pub created: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<u64>,
    /// Why the job failed, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub tasks: Vec<PreheatTask>,
}

/// One task of a job.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PreheatTask {
    /// The task ID (`GET /v1/tasks/{id}` on a host).
    pub id: String,
    /// `file`, `tag …`, `index`, `manifest`, `config`, `layer N`, with the platform where one
    /// applies.
    pub what: String,
    pub url: String,
    pub state: JobState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_length: Option<u64>,
    /// The seed that fetched the origin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub hosts: Vec<PreheatHost>,
}

/// One host's part in one task.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PreheatHost {
    pub peer: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    pub state: JobState,
    pub pieces_done: u32,
    pub pieces_total: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl PreheatJob {
    /// Pieces held and wanted over every task and host (for a progress bar).
    pub fn pieces(&self) -> (u64, u64) {
        self.tasks
            .iter()
            .flat_map(|t| &t.hosts)
            .fold((0, 0), |(d, t), h| {
                (d + u64::from(h.pieces_done), t + u64::from(h.pieces_total))
            })
    }
}

/// The node's jobs.
#[derive(Default)]
pub struct Preheats {
    jobs: Mutex<JobTable>,
}

#[derive(Default)]
struct JobTable {
    by_id: HashMap<String, Arc<Mutex<PreheatJob>>>,
    /// IDs, oldest first.
    order: VecDeque<String>,
}

impl Preheats {
    pub fn get(&self, id: &str) -> Option<PreheatJob> {
        let jobs = self.jobs.lock().ok()?;
        let job = jobs.by_id.get(id)?.lock().ok()?.clone();
        Some(job)
    }

    fn insert(&self, job: PreheatJob) -> Arc<Mutex<PreheatJob>> {
        let id = job.id.clone();
        let cell = Arc::new(Mutex::new(job));
        if let Ok(mut jobs) = self.jobs.lock() {
            let JobTable { by_id: map, order } = &mut *jobs;
            while map.len() >= MAX_JOBS {
                // The oldest finished job; with none finished, the oldest.
                let done = order.iter().position(|id| {
                    map.get(id)
                        .and_then(|j| j.lock().ok().map(|j| j.state.is_finished()))
                        .unwrap_or(true)
                });
                let Some(old) = order.remove(done.unwrap_or(0)) else {
                    break;
                };
                map.remove(&old);
            }
            map.insert(id.clone(), cell.clone());
            order.push_back(id);
        }
        cell
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn shown_url(url: &str) -> String {
    df_protocols::task::parse_url(url)
        .map(|u| display_url(&u))
        .unwrap_or_else(|_| "(invalid URL)".to_owned())
}

/// Checks a request and starts its job; returns the job as first reported.
pub(crate) fn start(
    ctx: &Arc<TaskContext>,
    jobs: &Arc<Preheats>,
    req: PreheatRequest,
) -> Result<PreheatJob, TaskError> {
    let target = match &req.target {
        PreheatTarget::File {
            url,
            headers,
            tag,
            filtered_query_params,
            digest,
        } => {
            file_request(url, headers, tag, filtered_query_params, digest)?;
            shown_url(url)
        }
        PreheatTarget::Image {
            image, platform, ..
        } => {
            let r = image::ImageRef::parse(image).map_err(TaskError::bad_request)?;
            if let Some(p) = platform {
                image::Platform::parse(p).map_err(TaskError::bad_request)?;
            }
            r.to_string()
        }
    };
    let id = hex::encode(rand::random::<[u8; 8]>());
    let job = PreheatJob {
        id: id.clone(),
        state: JobState::Pending,
        scope: req.scope,
        target,
        created: now_unix(),
        finished: None,
        error: None,
        tasks: Vec::new(),
    };
    let cell = jobs.insert(job.clone());
    tracing::info!(job = %id, request = ?req, "preheat job started");
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let shutdown = ctx.shutdown.clone();
        tokio::select! {
            _ = run(ctx, cell.clone(), req) => {}
            _ = shutdown.cancelled() => finish(&cell, Some("the node stopped".into())),
        }
    });
    Ok(job)
}

fn file_request(
    url: &str,
    headers: &[(String, String)],
    tag: &str,
    filtered_query_params: &[String],
    digest: &Option<ContentDigest>,
) -> Result<DownloadRequest, TaskError> {
    let r = DownloadRequest {
        url: url.to_owned(),
        headers: headers.to_vec(),
        tag: tag.to_owned(),
        filtered_query_params: filtered_query_params.to_vec(),
        digest: digest.clone(),
        requester: Requester::Local,
        ..DownloadRequest::default()
    };
    r.task_key()?;
    Ok(r)
}

fn update(cell: &Mutex<PreheatJob>, f: impl FnOnce(&mut PreheatJob)) {
    if let Ok(mut j) = cell.lock() {
        f(&mut j);
    }
}

fn finish(cell: &Mutex<PreheatJob>, error: Option<String>) {
    update(cell, |j| {
        if j.state.is_finished() {
            return;
        }
        let failed_task = j
            .tasks
            .iter()
            .find(|t| t.state == JobState::Failed)
            .map(|t| {
                let e = t.error.clone().unwrap_or_default();
                // Origin errors name the URL already.
                if e.contains(&t.url) {
                    format!("{}: {e}", t.what)
                } else {
                    format!("{} ({}): {e}", t.what, t.url)
                }
            });
        j.error = error.or(failed_task);
        j.state = if j.error.is_some() {
            JobState::Failed
        } else {
            JobState::Succeeded
        };
        j.finished = Some(now_unix());
    });
}

async fn run(ctx: Arc<TaskContext>, cell: Arc<Mutex<PreheatJob>>, req: PreheatRequest) {
    update(&cell, |j| j.state = JobState::Running);
    let deadline = tokio::time::Instant::now()
        + req
            .timeout_secs
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_TIMEOUT);
    let tasks: Vec<(String, DownloadRequest)> = match &req.target {
        PreheatTarget::File {
            url,
            headers,
            tag,
            filtered_query_params,
            digest,
        } => match file_request(url, headers, tag, filtered_query_params, digest) {
            Ok(r) => vec![("file".to_owned(), r)],
            Err(e) => return finish(&cell, Some(e.to_string())),
        },
        PreheatTarget::Image {
            image,
            platform,
            username,
            password,
        } => {
            let resolved = async {
                let r = image::ImageRef::parse(image)?;
                let p = platform
                    .as_deref()
                    .map(image::Platform::parse)
                    .transpose()?;
                let creds = username.clone().zip(password.clone());
                let mut reader = image::RegistryReader::new(ctx.clone(), r, creds);
                reader.resolve(p.as_ref()).await
            };
            match tokio::time::timeout_at(deadline, resolved).await {
                Ok(Ok(t)) => t.into_iter().map(|t| (t.what, t.request)).collect(),
                Ok(Err(e)) => return finish(&cell, Some(e)),
                Err(_) => return finish(&cell, Some("timed out resolving the image".into())),
            }
        }
    };
    update(&cell, |j| {
        j.tasks = tasks
            .iter()
            .map(|(what, r)| PreheatTask {
                id: r.task_key().map(|k| k.to_string()).unwrap_or_default(),
                what: what.clone(),
                url: shown_url(&r.url),
                state: JobState::Pending,
                content_length: None,
                owner: None,
                error: None,
                hosts: Vec::new(),
            })
            .collect();
    });
    let scope = req.scope;
    futures::stream::iter(tasks.into_iter().enumerate())
        .for_each_concurrent(TASKS_AT_ONCE, |(i, (_, r))| {
            let ctx = ctx.clone();
            let cell = cell.clone();
            async move {
                let result =
                    tokio::time::timeout_at(deadline, preheat_task(&ctx, &cell, i, scope, r))
                        .await
                        .unwrap_or_else(|_| Err("timed out".to_owned()));
                update(&cell, |j| {
                    let t = &mut j.tasks[i];
                    match result {
                        Ok(()) => t.state = JobState::Succeeded,
                        Err(e) => {
                            t.state = JobState::Failed;
                            t.error = Some(e);
                            for h in &mut t.hosts {
                                if !h.state.is_finished() {
                                    h.state = JobState::Failed;
                                    h.error.get_or_insert_with(|| "timed out".to_owned());
                                }
                            }
                        }
                    }
                });
            }
        })
        .await;
    finish(&cell, None);
    if let Ok(j) = cell.lock() {
        tracing::info!(job = %j.id, state = ?j.state, error = ?j.error, "preheat job finished");
    }
}

/// The live seeds this node may ask to fetch an origin (trusted producers, connected, this node
/// when it is a seed), in the task's owner order.
fn owners(ctx: &TaskContext, key: &TaskKey) -> Vec<PeerId> {
    let mut seeds = crate::task::owners::live_trusted_seeds(ctx.net.state(), &ctx.trust, key);
    if ctx.config.role == Role::Seed {
        seeds.push(ctx.peer_id);
        crate::task::owners::owner_order(key, &mut seeds);
    }
    seeds
}

async fn preheat_task(
    ctx: &Arc<TaskContext>,
    cell: &Arc<Mutex<PreheatJob>>,
    i: usize,
    scope: PreheatScope,
    req: DownloadRequest,
) -> Result<(), String> {
    let key = req.task_key().map_err(|e| e.to_string())?;
    let job_id = cell.lock().map(|j| j.id.clone()).unwrap_or_default();
    update(cell, |j| j.tasks[i].state = JobState::Running);
    let owners = owners(ctx, &key);
    if owners.is_empty() {
        return Err(format!(
            "no live seed in cluster {:?}: a preheat needs a connected seed it trusts",
            ctx.config.cluster
        ));
    }
    // 1. The first owner that takes it fetches the origin.
    let mut first = None;
    let mut last_error = String::new();
    for &o in &owners {
        let answer = if o == ctx.peer_id {
            crate::task::download(ctx, req.clone())
                .await
                .map(|(_, h)| h)
        } else {
            let ask = ControlRequest::StartTask {
                task: key,
                origin: req.origin_request(),
                missing: Vec::new(),
            };
            match tokio::time::timeout(OWNER_ASK_TIMEOUT, ctx.net.request(o, ask)).await {
                Ok(Ok((ControlResponse::Started { header }, _))) => Ok(header),
                Ok(Ok((ControlResponse::Error(e), _))) => Err(TaskError::from_control(&e)
                    .unwrap_or(TaskError::NoSource { message: e.message })),
                Ok(Ok(_)) => Err(TaskError::internal("unexpected answer")),
                Ok(Err(e)) => Err(TaskError::internal(e.to_string())),
                Err(_) => Err(TaskError::internal("no answer in time")),
            }
        };
        match answer {
            Ok(h) => {
                first = Some((o, h));
                break;
            }
            // The origin's own answer (404, 401, changed content) is the same from any seed.
            Err(
                e @ (TaskError::OriginStatus { .. }
                | TaskError::ContentChanged { .. }
                | TaskError::BadRequest { .. }
                | TaskError::DigestMismatch { .. }),
            ) => return Err(e.to_string()),
            Err(e) => {
                tracing::info!(task = %key, seed = %o, error = %e, "preheat: seed did not take the task");
                last_error = format!("seed {o}: {e}");
            }
        }
    }
    let Some((first, header)) = first else {
        return Err(format!(
            "{} live seed(s) asked, none took the task; the last: {last_error}",
            owners.len()
        ));
    };
    let total = header.header.layout().piece_count();
    update(cell, |j| {
        let t = &mut j.tasks[i];
        t.content_length = Some(header.header.content_length);
        t.owner = Some(first.to_string());
    });
    // 2. Who must hold it, and the others asked to fetch it from the swarm.
    let state = ctx.net.state();
    let mut hosts: Vec<PeerId> = match scope {
        PreheatScope::Seed => owners
            .iter()
            .copied()
            .take(ctx.config.replicas.max(1))
            .collect(),
        PreheatScope::AllSeeds => owners.clone(),
        PreheatScope::AllPeers => {
            let mut h = owners.clone();
            for p in state.connected_peers() {
                if !h.contains(&p) && !ctx.config.faults.unconnected_for_preheat.contains(&p) {
                    h.push(p);
                }
            }
            if !h.contains(&ctx.peer_id) {
                h.push(ctx.peer_id);
            }
            h
        }
    };
    // The first owner first, whatever its rank.
    hosts.retain(|h| *h != first);
    hosts.insert(0, first);
    let role_of = |p: &PeerId| {
        if *p == ctx.peer_id {
            Some(ctx.config.role)
        } else {
            state.peer(p).and_then(|i| i.role)
        }
    };
    update(cell, |j| {
        j.tasks[i].hosts = hosts
            .iter()
            .map(|p| PreheatHost {
                peer: p.to_string(),
                role: role_of(p),
                state: JobState::Running,
                pieces_done: 0,
                pieces_total: total,
                error: None,
            })
            .collect();
    });
    // Replica owners also hear from the first owner, but only when it fetches the task now:
    // one that already held it replicates nothing, so every other host is asked here.
    {
        let asks: Vec<(usize, PeerId)> = hosts.iter().copied().enumerate().skip(1).collect();
        let ctx = ctx.clone();
        let cell = cell.clone();
        let req = req.clone();
        tokio::spawn(async move {
            let asks: Vec<_> = asks
                .into_iter()
                .map(|(n, h)| {
                    let (ctx, cell, mut req) = (ctx.clone(), cell.clone(), req.clone());
                    async move {
                        if let Err(e) = ask_to_preheat(&ctx, h, key, &mut req).await {
                            update(&cell, |j| {
                                let host = &mut j.tasks[i].hosts[n];
                                host.state = JobState::Failed;
                                host.error = Some(e);
                            });
                        }
                    }
                })
                .collect();
            futures::stream::iter(asks)
                .buffer_unordered(REQUESTS_AT_ONCE)
                .for_each(|()| async {})
                .await;
        });
    }
    // The members this node is not connected to hear of it on the cluster topic.
    if scope == PreheatScope::AllPeers {
        let mut origin = req.origin_request();
        origin.headers.clear();
        let msg = ClusterMessage::Preheat {
            job: job_id,
            task: key,
            origin,
        };
        if let Err(e) = ctx.net.publish_cluster(&msg).await {
            tracing::warn!(task = %key, error = %e, "preheat: cannot tell the cluster");
        }
    }
    // 3. Progress, until every host holds it or failed (and, for `all_peers`, no new host turned
    // up in the DHT for a while).
    let mut silent_since: HashMap<PeerId, tokio::time::Instant> = HashMap::new();
    let mut discovery = (scope == PreheatScope::AllPeers).then(|| Discovery {
        next: tokio::time::Instant::now() + DISCOVER_EVERY,
        quiet: 0,
    });
    loop {
        if let Some(d) = discovery.as_mut()
            && tokio::time::Instant::now() >= d.next
        {
            let found = discover_hosts(ctx, cell, i, key).await;
            let added = update_hosts(cell, i, found, total);
            d.quiet = if added > 0 { 0 } else { d.quiet + 1 };
            d.next = tokio::time::Instant::now() + DISCOVER_EVERY;
            if added > 0 {
                tracing::info!(task = %key, added, "preheat: more members hold the task");
            }
        }
        let pending: Vec<(usize, PeerId)> = {
            let Ok(j) = cell.lock() else {
                return Err("job state lost".into());
            };
            j.tasks[i]
                .hosts
                .iter()
                .enumerate()
                .filter(|(_, h)| !h.state.is_finished())
                .filter_map(|(n, h)| h.peer.parse().ok().map(|p| (n, p)))
                .collect()
        };
        let settled = discovery
            .as_ref()
            .is_none_or(|d| d.quiet >= QUIET_DISCOVERIES);
        if pending.is_empty() && settled {
            break;
        }
        let asks: Vec<_> = pending
            .iter()
            .map(|&(n, p)| {
                let ctx = ctx.clone();
                async move { (n, p, held(&ctx, p, key).await) }
            })
            .collect();
        let answers: Vec<_> = futures::stream::iter(asks)
            .buffer_unordered(REQUESTS_AT_ONCE)
            .collect()
            .await;
        let hosts_left = answers.len();
        update(cell, |j| {
            for (n, p, a) in answers {
                let host = &mut j.tasks[i].hosts[n];
                match a {
                    Ok(done) => {
                        silent_since.remove(&p);
                        host.pieces_done = done;
                        if done >= total {
                            host.state = JobState::Succeeded;
                        }
                    }
                    Err(e) => {
                        let since = *silent_since
                            .entry(p)
                            .or_insert_with(tokio::time::Instant::now);
                        if since.elapsed() >= HOST_SILENCE {
                            host.state = JobState::Failed;
                            host.error = Some(e);
                        }
                    }
                }
            }
        });
        // Half a second for a few hosts; a large cluster is asked less often (each round asks
        // every unfinished host once).
        let rounds = u32::try_from(hosts_left / 64).unwrap_or(u32::MAX).min(20);
        tokio::time::sleep(POLL_EVERY * (1 + rounds)).await;
    }
    let failed: Vec<String> = cell
        .lock()
        .map(|j| {
            j.tasks[i]
                .hosts
                .iter()
                .filter(|h| h.state == JobState::Failed)
                .map(|h| {
                    format!(
                        "{}: {}",
                        h.peer,
                        h.error.clone().unwrap_or_else(|| "failed".into())
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("not preheated on {}", failed.join("; ")))
    }
}

/// When an `all_peers` job next looks for providers, and how many looks in a row found none new.
struct Discovery {
    next: tokio::time::Instant,
    quiet: u32,
}

/// A host found in the DHT, with its role where known and the pieces it holds.
struct Found {
    peer: PeerId,
    role: Option<Role>,
    held: u32,
}

/// The members the DHT names as providers of `key` (within [`DISCOVER_EVERY`]) that task `i`
/// does not list yet and that answer a progress question: a provider record outlives its member
/// by up to the record's TTL, and a member that is gone is no host of the job.
async fn discover_hosts(
    ctx: &Arc<TaskContext>,
    cell: &Mutex<PreheatJob>,
    i: usize,
    key: TaskKey,
) -> Vec<Found> {
    let providers =
        match tokio::time::timeout(DISCOVER_EVERY, ctx.net.get_providers(key.to_bytes())).await {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                tracing::debug!(task = %key, error = %e, "preheat: no providers query");
                return Vec::new();
            }
            Err(_) => return Vec::new(),
        };
    let listed: std::collections::HashSet<String> = cell
        .lock()
        .map(|j| j.tasks[i].hosts.iter().map(|h| h.peer.clone()).collect())
        .unwrap_or_default();
    let new = providers
        .into_iter()
        .filter(|p| *p != ctx.peer_id && !listed.contains(&p.to_string()))
        .map(|p| async move {
            let held = held(ctx, p, key).await.ok()?;
            let role = ctx.net.state().peer(&p).and_then(|i| i.role);
            Some(Found {
                peer: p,
                role,
                held,
            })
        });
    futures::stream::iter(new)
        .buffer_unordered(REQUESTS_AT_ONCE)
        .filter_map(|f| async move { f })
        .collect()
        .await
}

/// Adds the hosts of `found` that task `i` does not list yet (they have started on it); returns
/// how many.
fn update_hosts(cell: &Mutex<PreheatJob>, i: usize, found: Vec<Found>, total: u32) -> usize {
    let mut added = 0;
    update(cell, |j| {
        let hosts = &mut j.tasks[i].hosts;
        for f in found {
            let peer = f.peer.to_string();
            if hosts.iter().any(|h| h.peer == peer) {
                continue;
            }
            hosts.push(PreheatHost {
                peer,
                role: f.role,
                state: if f.held >= total {
                    JobState::Succeeded
                } else {
                    JobState::Running
                },
                pieces_done: f.held,
                pieces_total: total,
                error: None,
            });
            added += 1;
        }
    });
    added
}

/// Asks `host` to download the task from the swarm (this node itself: a local download).
async fn ask_to_preheat(
    ctx: &Arc<TaskContext>,
    host: PeerId,
    key: TaskKey,
    req: &mut DownloadRequest,
) -> Result<(), String> {
    req.disable_back_to_source = true;
    if host == ctx.peer_id {
        return crate::task::download(ctx, req.clone())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string());
    }
    let mut origin = req.origin_request();
    if !ctx.trust.trusts_producer(&host) {
        origin.headers.clear();
    }
    let ask = ControlRequest::Preheat { task: key, origin };
    match tokio::time::timeout(OWNER_ASK_TIMEOUT, ctx.net.request(host, ask)).await {
        Ok(Ok((ControlResponse::Started { .. }, _))) => Ok(()),
        Ok(Ok((ControlResponse::Error(e), _))) => Err(e.message),
        Ok(Ok(_)) => Err("unexpected answer".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer in time".into()),
    }
}

/// Pieces of `key` that `host` holds.
async fn held(ctx: &Arc<TaskContext>, host: PeerId, key: TaskKey) -> Result<u32, String> {
    if host == ctx.peer_id {
        let p = crate::task::progress(ctx, &key)
            .await
            .ok_or_else(|| "the task is gone".to_owned())?;
        let p = p.borrow();
        if let crate::task::Phase::Failed(e) = &p.phase {
            return Err(e.to_string());
        }
        return Ok(p.have.count());
    }
    match tokio::time::timeout(
        POLL_EVERY * 4,
        ctx.net.request(host, ControlRequest::GetTask { task: key }),
    )
    .await
    {
        Ok(Ok((ControlResponse::Task(t), _))) => Ok(t.bitfield.map(|b| b.count()).unwrap_or(0)),
        Ok(Ok(_)) => Err("unexpected answer".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer".into()),
    }
}

/// A member asked this node to preheat a task (`ControlRequest::Preheat`): download it from the
/// swarm. Answers once the header is known.
pub(crate) async fn on_request(
    ctx: &Arc<TaskContext>,
    peer: PeerId,
    task: TaskKey,
    origin: df_protocols::control::OriginRequest,
) -> ControlResponse {
    use df_protocols::control::{ControlError, ErrorCode};
    if !ctx.trust.trusts_producer(&peer) {
        tracing::warn!(%peer, %task, "preheat refused: the asker is not a trusted member");
        return ControlResponse::Error(ControlError {
            code: ErrorCode::Refused,
            message: "preheat refused: not a trusted member".into(),
            origin_status: None,
        });
    }
    let requester = Requester::peer_at(ctx.net.state().peer(&peer).and_then(|p| p.ip));
    let mut req = DownloadRequest::from_origin_request(&origin, requester);
    req.disable_back_to_source = true;
    match req.task_key() {
        Ok(k) if k == task => {}
        Ok(_) => {
            return ControlResponse::Error(
                TaskError::bad_request("origin request does not match the task key").to_control(),
            );
        }
        Err(e) => return ControlResponse::Error(e.to_control()),
    }
    tracing::info!(%peer, %task, "preheating on a member's request");
    match tokio::time::timeout(OWNER_ASK_TIMEOUT, crate::task::download(ctx, req)).await {
        Ok(Ok((_, header))) => ControlResponse::Started { header },
        Ok(Err(e)) => ControlResponse::Error(e.to_control()),
        Err(_) => ControlResponse::Error(TaskError::internal("no header in time").to_control()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_from_the_documented_json() {
        let r: PreheatRequest = serde_json::from_str(
            r#"{"type":"file","url":"https://h/f?sig=1","headers":[["Authorization","Bearer s3cret"]],"scope":"all_peers"}"#,
        )
        .unwrap();
        assert_eq!(r.scope, PreheatScope::AllPeers);
        assert!(matches!(r.target, PreheatTarget::File { .. }));
        // No credential in the Debug form that logs use.
        let shown = format!("{r:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("sig=1"),
            "{shown}"
        );
        let r: PreheatRequest = serde_json::from_str(
            r#"{"type":"image","image":"reg.example/app:1","platform":"linux/amd64","username":"u","password":"hunter2"}"#,
        )
        .unwrap();
        assert_eq!(r.scope, PreheatScope::Seed);
        assert!(!format!("{r:?}").contains("hunter2"));
        assert!(serde_json::from_str::<PreheatRequest>(r#"{"type":"tarball","url":"x"}"#).is_err());
        assert!(
            serde_json::from_str::<PreheatRequest>(
                r#"{"type":"file","url":"x","scope":"everyone"}"#
            )
            .is_err()
        );
    }

    fn job(id: usize, state: JobState) -> PreheatJob {
        PreheatJob {
            id: id.to_string(),
            state,
            scope: PreheatScope::Seed,
            target: String::new(),
            created: 0,
            finished: None,
            error: None,
            tasks: Vec::new(),
        }
    }

    #[test]
    fn the_job_table_is_bounded_and_drops_finished_jobs_first() {
        let jobs = Preheats::default();
        jobs.insert(job(0, JobState::Running));
        for i in 1..MAX_JOBS + 10 {
            jobs.insert(job(i, JobState::Succeeded));
        }
        assert!(jobs.get("0").is_some(), "a running job was dropped");
        assert!(jobs.get("1").is_none());
        assert!(jobs.get(&(MAX_JOBS + 9).to_string()).is_some());
        let n = jobs.jobs.lock().unwrap().by_id.len();
        assert_eq!(n, MAX_JOBS);
    }

    #[test]
    fn a_job_fails_with_its_first_failed_task_in_words() {
        let cell = Mutex::new(job(1, JobState::Running));
        update(&cell, |j| {
            j.tasks.push(PreheatTask {
                id: "t".into(),
                what: "layer 0 (linux/arm64)".into(),
                url: "https://r/v2/a/blobs/sha256:00".into(),
                state: JobState::Failed,
                content_length: None,
                owner: None,
                error: Some("origin returned 404".into()),
                hosts: Vec::new(),
            })
        });
        finish(&cell, None);
        let j = cell.lock().unwrap();
        assert_eq!(j.state, JobState::Failed);
        assert!(
            j.error
                .as_deref()
                .unwrap()
                .contains("layer 0 (linux/arm64)")
                && j.error.as_deref().unwrap().contains("404"),
            "{:?}",
            j.error
        );
    }
}
