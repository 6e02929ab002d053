//! The per-task state machine.
//!
//! A runner owns everything about one task on this node and is driven by its mailbox
//! ([`RunnerMsg`]): requests from the API and from peers, gossip, and the results of the jobs it
//! spawns (DHT queries, probes, piece fetches, origin production). It never blocks: disk and hashing
//! work runs in `spawn_blocking` jobs.
//!
//! Life of a download:
//! 1. **Discovery**: subscribe to the task topic; ask the DHT for providers; probe each (`get_task`)
//!    for the header, signed piece hashes, its bitfield and data-plane access.
//! 2. **Election** ([`super::election`]), when no provider answered: ask the responsible producer
//!    to fetch the origin — the seeds in XOR order of distance to the task key, else (no seed took
//!    it) the peers closest to the key, this node among them. Whoever accepts answers once the
//!    origin responded, with the header (or the origin's error).
//! 3. **Transfer**: rarest-first piece picking ([`super::picker`]) over the sources' bitfields
//!    ([`super::source`]), kept current by haves (sent on each peer's connection, the first and
//!    last also gossiped); every piece is checked against its
//!    producer-signed hash before it is stored and announced ([`super::announce`]). A source
//!    sending a bad piece is banned for the task.
//! 4. **Stall recovery**: with no progress for `stall_timeout`, re-probe; if pieces remain that no
//!    live source can serve and no producer is fetching them, elect a new producer for just those.
//! 5. **Completion**: verify the whole-content digest when one is known, mark the task complete,
//!    announce it, and exit (the store and the data server keep serving it).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use df_protocols::control::{ControlRequest, ControlResponse, OriginRequest, TaskState};
use df_protocols::gossip::GossipMessage;
use df_protocols::have::HaveFrame;
use df_protocols::limits::{MAX_PIECES, MIN_PIECE_LENGTH};
use df_protocols::manifest::{
    PieceHashBatch, SignedHeader, SignedPieceHash, TaskHeader, Validators,
};
use df_protocols::piece::{Bitfield, PieceHash, PieceLayout};
use df_protocols::task::{TaskKey, canonical_url, parse_url};
use libp2p::PeerId;
use libp2p::gossipsub::MessageAcceptance;
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::AbortHandle;

use super::announce::{Announcements, HavePace};
use super::election::{self, Ballot, Candidates, Election};
use super::picker::{self, PickInput, SourceView};
use super::produce::{FirstBody, ProduceError, ProductionJob};
use super::source::{AfterFailure, Source};
use super::{DownloadRequest, Phase, PieceMark, Progress, RunnerMsg, TaskContext, TaskError};
use crate::config::Role;
use crate::metrics::{ByteSource, TaskKind};
use crate::origin::Requester;
use crate::store::TaskRecord;
use crate::transfer::FetchError;

const TICK: Duration = Duration::from_millis(100);
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
const PROVIDERS_TIMEOUT: Duration = Duration::from_secs(3);
/// Connected peers asked directly when the DHT names no provider for a task.
const MAX_DIRECT_PROBES: usize = 64;
/// After a stall, how long probes get to answer before the producer question is decided.
const STALL_SETTLE: Duration = Duration::from_secs(1);
/// Producers whose content failed its digest, each banned in turn, before the task fails.
const MAX_DIGEST_RESTARTS: u32 = 3;

/// Why fetching a piece from a source failed.
#[derive(Debug)]
pub(crate) enum FetchFailure {
    /// The bytes did not match the piece's hash.
    Corrupt,
    Transfer(FetchError),
    Store(crate::store::StoreError),
}

#[derive(Clone)]
struct HashEntry {
    hash: PieceHash,
    producer: PeerId,
    signature: df_protocols::manifest::Signature,
}

pub(crate) struct Runner {
    /// What the node sees of this runner without a message: its gossip backlog (the dispatcher
    /// ignores more than a bound) and where a local reader is.
    shared: Arc<super::RunnerShared>,
    ctx: Arc<TaskContext>,
    key: TaskKey,
    id: u64,
    rx: mpsc::UnboundedReceiver<RunnerMsg>,
    tx: mpsc::UnboundedSender<RunnerMsg>,
    progress: watch::Sender<Progress>,
    phase: Phase,
    header: Option<SignedHeader>,
    layout: PieceLayout,
    hashes: Vec<Option<HashEntry>>,
    hash_known: Bitfield,
    early_hashes: Vec<PieceHashBatch>,
    have: Bitfield,
    /// A local consumer wants the whole content.
    wanted: bool,
    /// The origin request (credentials included; memory only).
    request: Option<DownloadRequest>,
    sources: HashMap<PeerId, Source>,
    probing: HashSet<PeerId>,
    /// Haves heard from peers whose probe is on its way (the answer may predate them).
    early_haves: HashMap<PeerId, Bitfield>,
    banned: HashSet<PeerId>,
    inflight: HashMap<u32, Vec<(PeerId, AbortHandle)>>,
    header_waiters: Vec<oneshot::Sender<Result<SignedHeader, TaskError>>>,
    start_waiters: Vec<oneshot::Sender<ControlResponse>>,
    /// Pieces being fetched from origin by this node, and how many production jobs run.
    producing: Option<Bitfield>,
    /// Held while `producing` is set: counts this task among the node's origin fetches.
    origin_fetch: Option<crate::activity::OriginFetch>,
    production_jobs: usize,
    production_handles: Vec<AbortHandle>,
    opening: bool,
    discovering: bool,
    awaiting_probes: usize,
    /// Connected peers were asked directly (when the DHT named no provider).
    probed_connected: bool,
    electing: bool,
    /// Producers that failed or vanished: not asked again.
    failed_producers: HashSet<PeerId>,
    /// Producers this node asked to fetch the origin and that accepted.
    elected: HashSet<PeerId>,
    producer: Option<PeerId>,
    /// This node holds a replica for this producer (it asked with `replicate`).
    replica_of: Option<PeerId>,
    /// The producer disconnected: the stall path runs without waiting for `stall_timeout`.
    producer_lost: bool,
    /// Peers that said they are fetching from origin, and when.
    live_producers: HashMap<PeerId, Instant>,
    /// Haves and hashes not yet gossiped or stored.
    announce: Announcements,
    last_progress: Instant,
    stall_since: Option<Instant>,
    from_peers: u64,
    from_origin: u64,
    /// The task's own bucket: the lowest `limit_rate` of its requests (unlimited when none).
    task_limit: crate::limits::Limiter,
    /// Verified bytes received per source (kept after the source is dropped).
    received_from: HashMap<PeerId, u64>,
    digest_checking: bool,
    /// Times the content failed its digest and the task started over without its producer.
    restarts: u32,
    rng: StdRng,
    /// When this runner started (task duration and time to first byte are measured from it).
    started: Instant,
    /// Whether the first verified piece has been counted.
    first_byte_counted: bool,
}

impl Runner {
    pub(crate) fn new(
        ctx: Arc<TaskContext>,
        key: TaskKey,
        id: u64,
        rx: mpsc::UnboundedReceiver<RunnerMsg>,
        tx: mpsc::UnboundedSender<RunnerMsg>,
        progress: watch::Sender<Progress>,
        shared: Arc<super::RunnerShared>,
    ) -> Runner {
        Runner {
            shared,
            ctx,
            key,
            id,
            rx,
            tx,
            progress,
            phase: Phase::Starting,
            header: None,
            layout: PieceLayout {
                content_length: 0,
                piece_length: MIN_PIECE_LENGTH,
            },
            hashes: Vec::new(),
            hash_known: Bitfield::new(0),
            early_hashes: Vec::new(),
            have: Bitfield::new(0),
            wanted: false,
            request: None,
            sources: HashMap::new(),
            probing: HashSet::new(),
            early_haves: HashMap::new(),
            banned: HashSet::new(),
            inflight: HashMap::new(),
            header_waiters: Vec::new(),
            start_waiters: Vec::new(),
            producing: None,
            origin_fetch: None,
            production_jobs: 0,
            production_handles: Vec::new(),
            opening: false,
            discovering: false,
            awaiting_probes: 0,
            probed_connected: false,
            electing: false,
            failed_producers: HashSet::new(),
            elected: HashSet::new(),
            producer: None,
            replica_of: None,
            producer_lost: false,
            live_producers: HashMap::new(),
            announce: Announcements::default(),
            last_progress: Instant::now(),
            started: Instant::now(),
            first_byte_counted: false,
            stall_since: None,
            from_peers: 0,
            from_origin: 0,
            received_from: HashMap::new(),
            task_limit: crate::limits::Limiter::default(),
            digest_checking: false,
            restarts: 0,
            rng: StdRng::from_os_rng(),
        }
    }

    pub(crate) async fn run(mut self) {
        if let Err(e) = self.ctx.net.subscribe(self.key).await {
            self.fail(TaskError::internal(e.to_string()));
        }
        // Resume what the store already holds of this task.
        if let Ok(Ok(Some(rec))) = {
            let store = self.ctx.store.clone();
            let key = self.key;
            tokio::task::spawn_blocking(move || store.task(&key)).await
        } {
            self.accept_header(rec.header, None).await;
        }
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = self.rx.recv() => match msg {
                    Some(m) => {
                        self.on_msg(m).await;
                        // What is due goes out now, not on the next tick: a fresh piece's hash
                        // and have are what let peers ask for it (the 100 ms tick delayed each
                        // by 50 ms on average while the seed's uplink waited for requests).
                        self.flush_announcements(false).await;
                    }
                    None => break,
                },
                _ = tick.tick() => self.on_tick().await,
                _ = self.ctx.shutdown.cancelled() => break,
            }
            if self.should_exit() {
                break;
            }
        }
        self.finish().await;
    }

    /// Aborts every open piece request.
    fn abort_requests(&mut self) {
        for (_, reqs) in self.inflight.drain() {
            for (_, h) in reqs {
                h.abort();
            }
        }
    }

    /// Whether some source holds a piece (sources are known from their first answer on).
    fn any_holder(&self) -> bool {
        self.sources.values().any(Source::holds_any)
    }

    fn should_exit(&self) -> bool {
        match self.phase {
            Phase::Failed(_) => true,
            Phase::Complete => self.producing.is_none() && !self.opening,
            _ => false,
        }
    }

    async fn finish(&mut self) {
        // No new request joins a runner on its way out (a sender sees the mailbox closed and
        // starts a fresh runner); the ones already queued are answered below.
        self.rx.close();
        self.flush_announcements(true).await;
        self.persist_hashes_now().await;
        self.abort_requests();
        // Only a stopping node ends a runner with production jobs left.
        for h in self.production_handles.drain(..) {
            h.abort();
        }
        let err = match &self.phase {
            Phase::Failed(e) => e.clone(),
            _ => TaskError::internal("task stopped"),
        };
        for w in self.header_waiters.drain(..) {
            let _ = w.send(Err(err.clone()));
        }
        for w in self.start_waiters.drain(..) {
            let _ = w.send(ControlResponse::Error(err.to_control()));
        }
        // Requests that were queued when the runner decided to exit get its outcome, not a
        // dropped reply ("task runner stopped" told a user nothing of why the task ended).
        while let Ok(msg) = self.rx.try_recv() {
            match msg {
                RunnerMsg::Download { reply, .. } => {
                    let _ = reply.send(match (&self.phase, &self.header) {
                        (Phase::Complete, Some(h)) => Ok(h.clone()),
                        _ => Err(err.clone()),
                    });
                }
                RunnerMsg::StartTask { reply, .. } | RunnerMsg::Replicate { reply, .. }
                    if matches!(self.phase, Phase::Failed(_)) =>
                {
                    let _ = reply.send(ControlResponse::Error(err.to_control()));
                }
                _ => {}
            }
        }
        self.publish_progress();
        if self.ctx.registry.finished(&self.key, self.id) {
            let _ = self.ctx.net.unsubscribe(self.key).await;
        }
        tracing::debug!(task = %self.key, phase = ?self.phase, "runner exits");
    }

    /// Sets the pieces being fetched from origin (`None`: none), and counts the task among the
    /// node's origin fetches while there are some.
    fn set_producing(&mut self, marks: Option<Bitfield>) {
        if marks.is_some() != self.origin_fetch.is_some() {
            self.origin_fetch = marks.as_ref().map(|_| self.ctx.activity.origin_fetch());
        }
        self.producing = marks;
    }

    fn publish_progress(&self) {
        let p = Progress {
            phase: self.phase.clone(),
            header: self.header.clone(),
            have: self.have.clone(),
            from_peers: self.from_peers,
            from_origin: self.from_origin,
            sources: self.sources.values().filter(|s| s.holds_any()).count(),
            banned: self.banned.iter().copied().collect(),
            producing: self.producing.is_some() || self.opening,
            received_from: {
                let mut v: Vec<(PeerId, u64)> =
                    self.received_from.iter().map(|(p, b)| (*p, *b)).collect();
                v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
                v
            },
        };
        self.progress.send_replace(p);
    }

    /// What the task is for, as the metrics label it.
    fn kind(&self) -> TaskKind {
        // The mirror's own requests, and (on the seed that fetches for it) a digest task of a
        // registry blob URL.
        match &self.request {
            Some(r)
                if r.requester == Requester::Registry
                    || (r.digest.is_some()
                        && r.url.contains("/v2/")
                        && r.url.contains("/blobs/")) =>
            {
                TaskKind::ImageBlob
            }
            _ => TaskKind::File,
        }
    }

    fn fail(&mut self, e: TaskError) {
        if matches!(self.phase, Phase::Failed(_) | Phase::Complete) {
            return;
        }
        tracing::warn!(task = %self.key, error = %e, "task failed");
        self.ctx
            .metrics
            .task_finished(self.kind(), false, self.started.elapsed());
        let free = matches!(
            e,
            TaskError::NoSpace { .. } | TaskError::ContentChanged { .. }
        );
        if free {
            // What this task holds is what filled the disk, or pieces of an origin version that
            // is gone: free it, so that the store (which reopens itself on the next write) has
            // room for the next download and the next request starts from the origin afresh.
            // Nothing of it is announced or persisted on the way out either: hashes written
            // back after the deletion made the next download of the same URL on this node
            // meet the gone version's hashes (and refuse the new version's pieces as corrupt).
            self.announce.clear();
            self.abort_requests();
        }
        // The failure is published before the data goes: a reader streaming the task then finds
        // a missing piece only after the progress already says why.
        self.phase = Phase::Failed(e);
        self.publish_progress();
        if free {
            let (store, key) = (self.ctx.store.clone(), self.key);
            tokio::task::spawn_blocking(move || {
                if let Err(e) = store.delete_task(&key) {
                    tracing::warn!(task = %key, error = %e, "freeing a failed task's data failed");
                }
            });
        }
    }

    /// Whether the task's content digest is known in advance: then any connected peer's header
    /// and hashes are usable, since wrong bytes fail the digest (and ban their producer).
    fn digest_task(&self) -> bool {
        self.key.content_digest().is_some()
    }

    /// Whose header this node accepts: a trusted producer (see [`crate::trust`]); for a digest
    /// task, any producer not banned for it.
    fn trusted(&self, producer: &PeerId) -> bool {
        if *producer == self.ctx.peer_id {
            return true;
        }
        if self.banned.contains(producer) {
            return false;
        }
        self.ctx.trust.trusts_producer(producer) || self.digest_task()
    }

    /// Whose piece hashes this node accepts: configured producers; else the header's producer and
    /// the producers this node itself asked to take over, if they are trusted (or the task has a
    /// digest). Anyone else could otherwise sign bogus hashes for pieces not produced yet and serve
    /// matching bogus bytes.
    fn trusted_for_hashes(&self, producer: &PeerId) -> bool {
        if *producer == self.ctx.peer_id {
            return true;
        }
        // A listed producer's hashes are taken whoever it took over from.
        if self.ctx.trust.has_producer_list() && self.ctx.trust.trusts_producer(producer) {
            return true;
        }
        let pinned = self.elected.contains(producer)
            || self
                .header
                .as_ref()
                .is_some_and(|h| h.header.producer == *producer);
        pinned && self.trusted(producer)
    }

    fn piece_count(&self) -> u32 {
        if self.header.is_some() {
            self.layout.piece_count()
        } else {
            0
        }
    }

    async fn on_msg(&mut self, msg: RunnerMsg) {
        match msg {
            RunnerMsg::Download { req, reply } => self.on_download(req, reply),
            RunnerMsg::StartTask {
                origin,
                missing,
                requester,
                reply,
            } => self.on_start_task(origin, missing, requester, reply),
            RunnerMsg::Replicate {
                origin,
                header,
                from,
                requester,
                reply,
            } => {
                let answer = self.on_replicate(origin, header, from, requester).await;
                let _ = reply.send(answer);
            }
            RunnerMsg::GetState { reply } => {
                let _ = reply.send(self.state());
            }
            RunnerMsg::Gossip {
                source,
                propagation_source,
                message_id,
                message,
            } => {
                self.shared.pending_gossip.fetch_sub(1, Ordering::Relaxed);
                let verdict = self.on_gossip(source, message).await;
                self.ctx
                    .net
                    .report_validation(message_id, propagation_source, verdict)
                    .await;
            }
            RunnerMsg::Have {
                peer,
                pieces,
                complete,
            } => {
                self.shared.pending_gossip.fetch_sub(1, Ordering::Relaxed);
                if self.on_have(peer, pieces, complete) == MessageAcceptance::Reject {
                    tracing::debug!(task = %self.key, %peer, "direct have names pieces the task does not have");
                }
            }
            RunnerMsg::PeerSubscribed(peer) => {
                self.probe(peer);
            }
            RunnerMsg::PeerDisconnected(peer) => {
                self.live_producers.remove(&peer);
                // The producer is gone: look for the pieces it was fetching now rather than
                // after `stall_timeout` without progress (the stall path re-probes, waits
                // STALL_SETTLE for answers, then elects a producer for what nobody holds).
                let was_producing = self.producer == Some(peer)
                    || self.replica_of == Some(peer)
                    || self
                        .header
                        .as_ref()
                        .is_some_and(|h| h.header.producer == peer);
                if was_producing && self.wanted && !self.have.is_complete() {
                    tracing::info!(task = %self.key, producer = %peer, "producer disconnected");
                    self.producer_lost = true;
                    self.stall_since = Some(Instant::now());
                    self.reprobe();
                }
            }
            RunnerMsg::Providers(peers) => self.on_providers(peers),
            RunnerMsg::Probed { peer, result } => self.on_probed(peer, result).await,
            RunnerMsg::Elected(e) => self.on_elected(e).await,
            RunnerMsg::Opened(result, missing, first) => {
                self.on_opened(result, missing, first).await
            }
            RunnerMsg::Fetched {
                index,
                peer,
                result,
            } => self.on_fetched(index, peer, result).await,
            RunnerMsg::Produced { index, len, result } => {
                self.on_produced(index, len, result).await
            }
            RunnerMsg::ProductionDone => {
                self.production_jobs = self.production_jobs.saturating_sub(1);
                if self.production_jobs == 0 {
                    self.set_producing(None);
                }
                self.publish_progress();
                self.check_complete();
            }
            RunnerMsg::DigestChecked(r) => self.on_digest_checked(r).await,
            RunnerMsg::HashesPersisted(r) => {
                if let Err(e) = r {
                    self.fail(e.into());
                }
            }
        }
        self.schedule();
    }

    // ---- requests ------------------------------------------------------------------------

    fn on_download(
        &mut self,
        req: DownloadRequest,
        reply: oneshot::Sender<Result<SignedHeader, TaskError>>,
    ) {
        self.wanted = true;
        if let Some(rate) = req.limit_rate
            && self.task_limit.rate().is_none_or(|r| rate.0 < r.0)
        {
            self.task_limit = crate::limits::Limiter::new(Some(rate));
        }
        if self.request.is_none() || self.request.as_ref().is_some_and(|r| r.headers.is_empty()) {
            self.request = Some(req);
        }
        if let Some(h) = self.header.clone() {
            if matches!(self.phase, Phase::Starting) {
                self.phase = Phase::Running;
                self.publish_progress();
            }
            let _ = reply.send(Ok(h));
            self.last_progress = Instant::now();
            self.check_complete();
            if !self.have.is_complete() && !self.any_holder() {
                // Resuming a partial task: find holders now rather than after a stall.
                self.discover();
            }
            return;
        }
        self.header_waiters.push(reply);
        self.discover();
    }

    fn on_start_task(
        &mut self,
        origin: OriginRequest,
        missing: Vec<u32>,
        requester: Requester,
        reply: oneshot::Sender<ControlResponse>,
    ) {
        let req = DownloadRequest::from_origin_request(&origin, requester);
        match req.task_key() {
            Ok(k) if k == self.key => {}
            Ok(_) => {
                let e = TaskError::bad_request("origin request does not match the task key");
                let _ = reply.send(ControlResponse::Error(e.to_control()));
                return;
            }
            Err(e) => {
                let _ = reply.send(ControlResponse::Error(e.to_control()));
                return;
            }
        }
        if self.request.is_none() {
            self.request = Some(req);
        }
        match self.header.clone() {
            Some(h) => {
                let _ = reply.send(ControlResponse::Started { header: h });
                // A replica whose producer is still connected fetches the whole task from it:
                // an asker that did not reach that producer (its election ranked this seed
                // first) makes it a second origin fetcher only for pieces nobody can serve.
                let producer_alive = self
                    .replica_of
                    .is_some_and(|p| self.ctx.net.state().is_connected(&p));
                if missing.is_empty() && producer_alive {
                    return;
                }
                self.start_production(missing);
            }
            None => {
                self.start_waiters.push(reply);
                if !self.opening {
                    // A producer taking over asks for just the pieces nobody holds.
                    self.start_production(missing);
                }
            }
        }
    }

    /// A task owner asks this seed to hold a replica: adopt its header, fetch the content from
    /// it and the swarm, and keep the origin request for a takeover (the stall path elects this
    /// seed when the producer vanishes with pieces nobody holds).
    async fn on_replicate(
        &mut self,
        origin: OriginRequest,
        header: SignedHeader,
        from: PeerId,
        requester: Requester,
    ) -> ControlResponse {
        let req = DownloadRequest::from_origin_request(&origin, requester);
        match req.task_key() {
            Ok(k) if k == self.key => {}
            Ok(_) => {
                return ControlResponse::Error(
                    TaskError::bad_request("origin request does not match the task key")
                        .to_control(),
                );
            }
            Err(e) => return ControlResponse::Error(e.to_control()),
        }
        if header.header.producer != from || !self.accept_header(header, Some(from)).await {
            return ControlResponse::Error(
                TaskError::bad_request("the replica's header is not the asker's or is invalid")
                    .to_control(),
            );
        }
        // An owner may take over the origin fetch: its request must allow the origin (a
        // preheat's copy, asked for first, does not).
        if self
            .request
            .as_ref()
            .is_none_or(|r| r.disable_back_to_source)
        {
            self.request = Some(req);
        }
        if self.have.is_complete() {
            return ControlResponse::Replicating;
        }
        tracing::info!(task = %self.key, producer = %from, "holding a replica");
        self.replica_of = Some(from);
        self.wanted = true;
        if matches!(self.phase, Phase::Starting) {
            self.phase = Phase::Running;
            self.publish_progress();
        }
        self.producer = Some(from);
        self.elected.insert(from);
        self.live_producers.insert(from, Instant::now());
        self.last_progress = Instant::now();
        self.probing.remove(&from);
        self.probe(from);
        ControlResponse::Replicating
    }

    /// As the task's producer, asks the next `replicas - 1` owners (the live trusted seeds in
    /// XOR order of distance to the task key) to hold a replica.
    fn replicate(&self, header: &SignedHeader) {
        let extra = self.ctx.config.replicas.saturating_sub(1);
        if self.ctx.config.role != Role::Seed || extra == 0 {
            return;
        }
        let Some(req) = &self.request else {
            return;
        };
        let owners: Vec<PeerId> =
            super::owners::live_trusted_seeds(self.ctx.net.state(), &self.ctx.trust, &self.key)
                .into_iter()
                .filter(|s| *s != self.ctx.peer_id && !self.banned.contains(s))
                .take(extra)
                .collect();
        if owners.is_empty() {
            tracing::debug!(task = %self.key, "no other live seed to hold a replica");
            return;
        }
        let msg = ControlRequest::Replicate {
            task: self.key,
            origin: req.origin_request(),
            header: Box::new(header.clone()),
        };
        for peer in owners {
            let net = self.ctx.net.clone();
            let msg = msg.clone();
            let key = self.key;
            tokio::spawn(async move {
                match tokio::time::timeout(election::ASK_TIMEOUT, net.request(peer, msg)).await {
                    Ok(Ok((ControlResponse::Replicating, _))) => {
                        tracing::debug!(task = %key, seed = %peer, "replica owner accepted");
                    }
                    Ok(Ok((other, _))) => {
                        tracing::info!(task = %key, seed = %peer, answer = ?other, "replica owner declined");
                    }
                    Ok(Err(e)) => {
                        tracing::info!(task = %key, seed = %peer, error = %e, "replica owner unreachable");
                    }
                    Err(_) => {
                        tracing::info!(task = %key, seed = %peer, "replica owner did not answer in time");
                    }
                }
            });
        }
    }

    fn state(&self) -> TaskState {
        let mut by_producer: HashMap<PeerId, Vec<SignedPieceHash>> = HashMap::new();
        for (i, e) in self.hashes.iter().enumerate() {
            if let Some(e) = e {
                by_producer
                    .entry(e.producer)
                    .or_default()
                    .push(SignedPieceHash {
                        index: i as u32,
                        hash: e.hash,
                        signature: e.signature.clone(),
                    });
            }
        }
        TaskState {
            header: self.header.clone(),
            hashes: by_producer
                .into_iter()
                .map(|(producer, hashes)| PieceHashBatch { producer, hashes })
                .collect(),
            bitfield: (self.have.count() > 0).then(|| self.have.clone()),
            producing: self.producing.is_some() || self.opening,
            data: None,
        }
    }

    // ---- discovery and election ----------------------------------------------------------

    fn discover(&mut self) {
        if self.discovering {
            return;
        }
        self.discovering = true;
        let net = self.ctx.net.clone();
        let key = self.key;
        let tx = self.tx.clone();
        let me = self.ctx.peer_id;
        tokio::spawn(async move {
            let found = tokio::time::timeout(PROVIDERS_TIMEOUT, net.get_providers(key.to_bytes()))
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            let peers = found.into_iter().filter(|p| *p != me).collect();
            let _ = tx.send(RunnerMsg::Providers(peers));
        });
    }

    fn on_providers(&mut self, peers: Vec<PeerId>) {
        self.discovering = false;
        let mut n = 0;
        for p in peers {
            if self.probe(p) {
                n += 1;
            }
        }
        if n == 0 && self.header.is_none() && !self.probed_connected {
            // Provider records take a moment to spread: a peer we are connected to may hold the
            // task already. Ask them before electing (or failing, without back-to-source).
            self.probed_connected = true;
            let mut connected = self.ctx.net.state().connected_peers();
            connected.truncate(MAX_DIRECT_PROBES);
            for p in connected {
                if self.probe(p) {
                    n += 1;
                }
            }
        }
        self.awaiting_probes += n;
        if self.awaiting_probes == 0 {
            if self.header.is_none() {
                self.elect(Vec::new());
            } else if self.wanted
                && !self.any_holder()
                && self.producing.is_none()
                && !self.someone_producing()
            {
                let missing = self.unreachable_pieces();
                if !missing.is_empty() {
                    self.elect(missing);
                }
            }
        }
    }

    /// Asks `peer` for its view of the task. Returns whether a probe was sent.
    fn probe(&mut self, peer: PeerId) -> bool {
        if peer == self.ctx.peer_id || self.banned.contains(&peer) || !self.probing.insert(peer) {
            return false;
        }
        let net = self.ctx.net.clone();
        let tx = self.tx.clone();
        let key = self.key;
        tokio::spawn(async move {
            let result = match tokio::time::timeout(
                PROBE_TIMEOUT,
                net.request(peer, ControlRequest::GetTask { task: key }),
            )
            .await
            {
                Err(_) => Err("timed out".to_owned()),
                Ok(Err(e)) => Err(e.to_string()),
                Ok(Ok((ControlResponse::Task(state), ip))) => Ok((state, ip)),
                Ok(Ok((other, _))) => Err(format!("unexpected answer {other:?}")),
            };
            let _ = tx.send(RunnerMsg::Probed { peer, result });
        });
        true
    }

    fn may_fetch_origin_locally(&self) -> bool {
        self.ctx.config.download.back_to_source
            && !self
                .request
                .as_ref()
                .is_some_and(|r| r.disable_back_to_source)
    }

    fn elect(&mut self, missing: Vec<u32>) {
        if self.electing || self.opening || (self.producing.is_some() && missing.is_empty()) {
            return;
        }
        let Some(req) = self.request.clone() else {
            return;
        };
        self.electing = true;
        let net = self.ctx.net.clone();
        let key = self.key;
        let me = self.ctx.peer_id;
        let role = self.ctx.config.role;
        let local_ok = self.may_fetch_origin_locally();
        let seedless_ok = !req.disable_back_to_source;
        let mut exclude = self.failed_producers.clone();
        exclude.extend(self.banned.iter().copied());
        // Only trusted producers are asked (they see the request's credentials, and only their
        // headers are accepted); for a digest task without credentials, any member may fetch.
        let trust = self.ctx.trust.clone();
        let anyone = self.digest_task() && !req.carries_credentials();
        let may_ask = move |p: &PeerId| anyone || trust.trusts_producer(p);
        let tx = self.tx.clone();
        let ballot = Ballot {
            key,
            me,
            role,
            start: ControlRequest::StartTask {
                task: key,
                origin: req.origin_request(),
                missing,
            },
            candidates: Candidates {
                exclude,
                may_ask: Box::new(may_ask),
            },
            local_ok,
            seedless_ok,
        };
        tokio::spawn(async move {
            let outcome = election::run(&net, ballot).await;
            let _ = tx.send(RunnerMsg::Elected(outcome));
        });
    }

    async fn on_elected(&mut self, outcome: Election) {
        self.electing = false;
        match outcome {
            Election::Started { producer, header } => {
                tracing::debug!(task = %self.key, %producer, "producer accepted");
                if self.header.is_none() && !self.accept_header(*header, Some(producer)).await {
                    // Out of this task's elections: asking it again would loop.
                    tracing::info!(task = %self.key, %producer, "producer's header rejected; asking the next");
                    self.failed_producers.insert(producer);
                    if !matches!(self.phase, Phase::Failed(_)) {
                        self.elect(Vec::new());
                    }
                    return;
                }
                self.producer = Some(producer);
                self.elected.insert(producer);
                self.live_producers.insert(producer, Instant::now());
                self.last_progress = Instant::now();
                self.probing.remove(&producer);
                self.probe(producer);
            }
            Election::Local => {
                tracing::debug!(task = %self.key, "fetching from origin locally");
                if self.header.is_some() {
                    let missing = self.unreachable_pieces();
                    if !missing.is_empty() {
                        self.start_production(missing);
                    }
                } else {
                    self.start_production(Vec::new());
                }
            }
            Election::Failed(e) => {
                if self.header.is_none() || self.wanted {
                    self.fail(e);
                }
            }
        }
    }

    // ---- headers, hashes, gossip ---------------------------------------------------------

    /// Adopts a header (or checks it against the one adopted). Returns whether it is consistent.
    async fn accept_header(&mut self, h: SignedHeader, from: Option<PeerId>) -> bool {
        if let Some(cur) = &self.header {
            let (a, b) = (&cur.header, &h.header);
            return a.content_length == b.content_length
                && a.piece_length == b.piece_length
                && a.validators == b.validators;
        }
        if h.verify(&self.key).is_err() || !self.trusted(&h.header.producer) {
            tracing::debug!(task = %self.key, ?from, "ignoring untrusted or invalid header");
            return false;
        }
        let layout = h.header.layout();
        let n = layout.piece_count();
        self.layout = layout;
        self.hashes = vec![None; n as usize];
        self.hash_known = Bitfield::new(n);
        let store = self.ctx.store.clone();
        let key = self.key;
        let stored = tokio::task::spawn_blocking(move || {
            let have = store.bitfield(&key, n)?;
            let hashes = store.hashes(&key)?;
            let rec = store.task(&key)?;
            Ok::<_, crate::store::StoreError>((have, hashes, rec))
        })
        .await;
        let (have, stored_hashes, rec) = match stored {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                self.fail(e.into());
                return false;
            }
            Err(e) => {
                self.fail(TaskError::internal(e.to_string()));
                return false;
            }
        };
        self.have = have;
        self.shared.reset_pieces(&self.have);
        self.header = Some(h.clone());
        if rec.is_none() {
            let store = self.ctx.store.clone();
            let record = TaskRecord {
                header: h.clone(),
                complete: false,
                last_access: crate::store::now_unix(),
                content_mtime: None,
            };
            match tokio::task::spawn_blocking(move || store.put_task(&record)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => self.fail(e.into()),
                Err(e) => self.fail(TaskError::internal(e.to_string())),
            }
        }
        for batch in stored_hashes {
            self.apply_hashes(batch, false);
        }
        for batch in std::mem::take(&mut self.early_hashes) {
            self.apply_hashes(batch, true);
        }
        if matches!(self.phase, Phase::Starting) {
            self.phase = Phase::Running;
        }
        self.last_progress = Instant::now();
        // Publish first: a waiter that reads the progress next must see the header.
        self.publish_progress();
        for w in self.header_waiters.drain(..) {
            let _ = w.send(Ok(h.clone()));
        }
        for w in self.start_waiters.drain(..) {
            let _ = w.send(ControlResponse::Started { header: h.clone() });
        }
        self.check_complete();
        true
    }

    /// Records piece hashes after checking them; `persist` when they are new to the store (hashes
    /// loaded from the store were checked before they were stored).
    fn apply_hashes(&mut self, batch: PieceHashBatch, persist: bool) -> Applied {
        let n = self.piece_count();
        if self.header.is_none() {
            // Kept until the header names the producer; bounded by one task's worth of hashes.
            let held: usize = self.early_hashes.iter().map(|b| b.hashes.len()).sum();
            if held + batch.hashes.len() > MAX_PIECES as usize || !self.trusted(&batch.producer) {
                return Applied::Refused;
            }
            self.early_hashes.push(batch);
            return Applied::Kept;
        }
        // The trust check is a set lookup; signatures are checked only for a trusted producer.
        if (persist && !self.trusted_for_hashes(&batch.producer))
            || batch.hashes.len() > MAX_PIECES as usize
        {
            return Applied::Refused;
        }
        let producer = batch.producer;
        let Some(fresh) = new_hashes(&self.hashes, &self.key, n, batch) else {
            tracing::debug!(task = %self.key, %producer, "piece hashes out of range or badly signed");
            return Applied::Bad;
        };
        let added = !fresh.is_empty();
        for h in fresh {
            if self.hashes[h.index as usize].is_some() {
                continue; // named twice in the batch
            }
            self.hash_known.set(h.index);
            self.hashes[h.index as usize] = Some(HashEntry {
                hash: h.hash,
                producer,
                signature: h.signature.clone(),
            });
            if persist {
                self.announce.learned(producer, h);
            }
        }
        if added {
            self.last_progress = Instant::now();
        }
        Applied::Kept
    }

    async fn on_gossip(&mut self, source: Option<PeerId>, msg: GossipMessage) -> MessageAcceptance {
        match msg {
            GossipMessage::Header(h) => {
                if self.header.is_none() && !self.trusted(&h.header.producer) {
                    return MessageAcceptance::Ignore;
                }
                if h.verify(&self.key).is_err() {
                    return MessageAcceptance::Reject;
                }
                if self.accept_header(*h, source).await {
                    MessageAcceptance::Accept
                } else {
                    MessageAcceptance::Ignore
                }
            }
            GossipMessage::Hashes(batch) => {
                // Trust first (a lookup), signatures only for a producer this node would accept.
                let trusted = if self.header.is_some() {
                    self.trusted_for_hashes(&batch.producer)
                } else {
                    self.trusted(&batch.producer)
                };
                if !trusted {
                    return MessageAcceptance::Ignore;
                }
                // With the header known, `apply_hashes` checks the bounds and each new hash's
                // signature (a batch it refuses is rejected); before it, the batch is kept until
                // the header comes, so it is checked whole now.
                if self.header.is_none() && batch.verify(&self.key, MAX_PIECES).is_err() {
                    return MessageAcceptance::Reject;
                }
                match self.apply_hashes(batch, true) {
                    Applied::Kept => MessageAcceptance::Accept,
                    Applied::Refused => MessageAcceptance::Ignore,
                    Applied::Bad => MessageAcceptance::Reject,
                }
            }
            GossipMessage::Have { pieces, complete } => match source {
                Some(peer) => self.on_have(peer, pieces, complete),
                None => MessageAcceptance::Reject,
            },
        }
    }

    /// `peer` holds `pieces` (every piece when `complete`), heard by gossip or on its connection.
    /// A peer that is not a source yet is probed; what it says meanwhile is kept for the answer.
    fn on_have(&mut self, peer: PeerId, pieces: Vec<u32>, complete: bool) -> MessageAcceptance {
        if peer == self.ctx.peer_id {
            return MessageAcceptance::Ignore;
        }
        if self.header.is_some() {
            let n = self.piece_count();
            if pieces.iter().any(|&i| i >= n) {
                return MessageAcceptance::Reject;
            }
            let add = |have: &mut Bitfield| {
                if complete {
                    *have = Bitfield::full(n);
                }
                for i in pieces {
                    have.set(i);
                }
            };
            if let Some(s) = self.sources.get_mut(&peer) {
                add(&mut s.have);
                return MessageAcceptance::Accept;
            }
            if self.probing.contains(&peer) {
                add(self
                    .early_haves
                    .entry(peer)
                    .or_insert_with(|| Bitfield::new(n)));
            }
        }
        self.probe(peer);
        MessageAcceptance::Accept
    }

    async fn on_probed(
        &mut self,
        peer: PeerId,
        result: Result<(TaskState, Option<IpAddr>), String>,
    ) {
        self.probing.remove(&peer);
        self.awaiting_probes = self.awaiting_probes.saturating_sub(1);
        let early = self.early_haves.remove(&peer);
        match result {
            Err(e) => {
                tracing::debug!(task = %self.key, %peer, error = %e, "probe failed");
                self.live_producers.remove(&peer);
            }
            Ok((state, ip)) => {
                if let Some(h) = state.header {
                    self.accept_header(h, Some(peer)).await;
                }
                for batch in state.hashes {
                    self.apply_hashes(batch, true);
                }
                if state.producing {
                    self.live_producers.insert(peer, Instant::now());
                } else {
                    self.live_producers.remove(&peer);
                }
                if let (Some(data), Some(ip), true) = (state.data, ip, self.header.is_some()) {
                    let n = self.piece_count();
                    let mut have = state
                        .bitfield
                        .filter(|b| b.len() == n)
                        .unwrap_or_else(|| Bitfield::new(n));
                    // Haves can overtake the answer (they come on another stream), and pieces are
                    // only ever added: what it said before or since the answer stands (a piece it
                    // no longer holds is cleared by its "not found").
                    let heard = early.iter().chain(self.sources.get(&peer).map(|s| &s.have));
                    for b in heard.filter(|b| b.len() == n) {
                        for i in b.iter_set() {
                            have.set(i);
                        }
                    }
                    let is_seed = self.ctx.net.state().seeds().contains(&peer)
                        || self
                            .header
                            .as_ref()
                            .is_some_and(|h| h.header.producer == peer)
                        || state.producing;
                    let addr = SocketAddr::new(ip, data.port);
                    match self.sources.get_mut(&peer) {
                        Some(s) => {
                            s.have = have;
                            s.addr = addr;
                            s.token = data.grant();
                            s.is_seed = is_seed;
                        }
                        None => {
                            self.sources
                                .insert(peer, Source::new(addr, data.grant(), have, is_seed));
                        }
                    }
                    self.publish_progress();
                }
            }
        }
        if self.header.is_none() && self.awaiting_probes == 0 && !self.discovering {
            self.elect(Vec::new());
        }
    }

    // ---- production ----------------------------------------------------------------------

    /// Starts fetching pieces from origin: `pieces`, or everything not held when empty. Pieces
    /// held or already being fetched from origin are skipped.
    fn start_production(&mut self, pieces: Vec<u32>) {
        if self.opening {
            return;
        }
        let pieces = if self.header.is_some() {
            let all: Vec<u32> = if pieces.is_empty() {
                (0..self.piece_count()).collect()
            } else {
                pieces
            };
            let todo: Vec<u32> = all
                .into_iter()
                .filter(|&i| i < self.piece_count() && !self.have.get(i))
                .filter(|&i| self.producing.as_ref().is_none_or(|p| !p.get(i)))
                .collect();
            if todo.is_empty() {
                return;
            }
            todo
        } else {
            pieces
        };
        let Some(req) = &self.request else {
            return;
        };
        let spec = match req.origin_spec() {
            Ok(s) => s,
            Err(e) => {
                self.fail(e);
                return;
            }
        };
        self.opening = true;
        self.publish_progress();
        let first = match (&self.header, pieces.first()) {
            (Some(_), Some(&i)) => self.layout.piece_range(i),
            (Some(_), None) => {
                let i = (0..self.piece_count())
                    .find(|&i| !self.have.get(i))
                    .unwrap_or(0);
                self.layout.piece_range(i)
            }
            (None, _) => 0..u64::from(MIN_PIECE_LENGTH),
        };
        let origin = self.ctx.origin.clone();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let r = origin.open(&spec, first.clone()).await;
            let _ = tx.send(RunnerMsg::Opened(r, pieces, first));
        });
    }

    async fn on_opened(
        &mut self,
        result: Result<crate::origin::OriginResponse, crate::origin::OriginError>,
        requested: Vec<u32>,
        first: std::ops::Range<u64>,
    ) {
        self.opening = false;
        let resp = match result {
            Ok(r) => r,
            Err(e) => {
                let e = TaskError::from(e);
                for w in self.start_waiters.drain(..) {
                    let _ = w.send(ControlResponse::Error(e.to_control()));
                }
                if self.wanted || self.header.is_none() {
                    self.fail(e);
                }
                self.publish_progress();
                return;
            }
        };
        if self.header.is_none() {
            let layout = PieceLayout::for_length(resp.content_length);
            if let Err(e) = layout.validate() {
                self.fail(TaskError::OriginFailed {
                    message: format!("content too large: {e}"),
                });
                return;
            }
            let source_url = self
                .request
                .as_ref()
                .and_then(|r| parse_url(&r.url).ok())
                .map(|u| {
                    canonical_url(
                        &u,
                        &self
                            .request
                            .as_ref()
                            .map(|r| r.filtered_query_params.clone())
                            .unwrap_or_default(),
                    )
                    .to_string()
                })
                .unwrap_or_default();
            let header = TaskHeader {
                task: self.key,
                source_url,
                content_length: resp.content_length,
                piece_length: layout.piece_length,
                content_digest: self.key.content_digest(),
                validators: resp.validators.clone(),
                producer: self.ctx.peer_id,
            };
            let signed = match header.sign(&self.ctx.keypair) {
                Ok(s) => s,
                Err(e) => {
                    self.fail(TaskError::internal(e.to_string()));
                    return;
                }
            };
            if !self.accept_header(signed.clone(), None).await {
                return;
            }
            self.replicate(&signed);
            let _ = self
                .ctx
                .net
                .publish(self.key, &GossipMessage::Header(Box::new(signed)))
                .await;
        } else if let Err(e) = self.check_unchanged(resp.content_length, &resp.validators) {
            self.fail(e);
            return;
        }
        let n = self.piece_count();
        let pieces: Vec<u32> = if requested.is_empty() {
            (0..n).collect()
        } else {
            requested
        };
        let mut pieces: Vec<u32> = pieces
            .into_iter()
            .filter(|&i| i < n && !self.have.get(i))
            .collect();
        pieces.sort_unstable();
        pieces.dedup();
        let mut marks = self.producing.clone().unwrap_or_else(|| Bitfield::new(n));
        for &i in &pieces {
            marks.set(i);
        }
        // The open response carried bytes `first` (or, without range support, the whole content).
        let first = if resp.ranged {
            FirstBody {
                index: self.layout.piece_at(first.start),
                len: first
                    .end
                    .min(self.layout.content_length)
                    .saturating_sub(first.start),
                body: resp.body,
            }
        } else {
            FirstBody {
                index: 0,
                len: self.layout.content_length,
                body: resp.body,
            }
        };
        let job = ProductionJob {
            ctx: self.ctx.clone(),
            task_limit: self.task_limit.clone(),
            key: self.key,
            spec: match self.request.as_ref().map(DownloadRequest::origin_spec) {
                Some(Ok(s)) => s,
                _ => return,
            },
            layout: self.layout,
            validators: self
                .header
                .as_ref()
                .map(|h| h.header.validators.clone())
                .unwrap_or_default(),
            known: pieces
                .iter()
                .filter_map(|&i| self.hashes[i as usize].as_ref().map(|e| (i, e.hash)))
                .collect(),
            pieces,
            ranged: resp.ranged,
            tx: self.tx.clone(),
        };
        self.set_producing(Some(marks));
        self.production_jobs += 1;
        self.publish_progress();
        self.production_handles.retain(|h| !h.is_finished());
        self.production_handles
            .push(tokio::spawn(job.run(first)).abort_handle());
    }

    fn check_unchanged(&self, len: u64, v: &Validators) -> Result<(), TaskError> {
        let Some(h) = &self.header else {
            return Ok(());
        };
        let hv = &h.header.validators;
        let etag_changed = hv.etag.is_some() && v.etag.is_some() && hv.etag != v.etag;
        let lm_changed = hv.last_modified.is_some()
            && v.last_modified.is_some()
            && hv.last_modified != v.last_modified;
        if len != h.header.content_length || etag_changed || lm_changed {
            return Err(TaskError::ContentChanged {
                message:
                    "origin content changed since the task started (length or validators differ)"
                        .into(),
            });
        }
        Ok(())
    }

    async fn on_produced(&mut self, index: u32, len: u32, result: Result<PieceHash, ProduceError>) {
        match result {
            Ok(hash) => {
                if let Some(p) = &mut self.producing {
                    p.clear(index);
                }
                let signed = match SignedPieceHash::sign(&self.key, index, hash, &self.ctx.keypair)
                {
                    Ok(s) => s,
                    Err(e) => {
                        self.fail(TaskError::internal(e.to_string()));
                        return;
                    }
                };
                if self.hashes[index as usize].is_none() {
                    self.hash_known.set(index);
                    self.hashes[index as usize] = Some(HashEntry {
                        hash,
                        producer: self.ctx.peer_id,
                        signature: signed.signature.clone(),
                    });
                    self.announce.produced(self.ctx.peer_id, signed);
                }
                self.from_origin += u64::from(len);
                tracing::debug!(target: "df_piece", task = %self.key, index, len, from = "origin", "piece");
                self.piece_held(index, PieceMark::FromOrigin, false);
            }
            Err(e) => {
                tracing::warn!(task = %self.key, index, error = %e, "origin production failed");
                self.set_producing(None);
                let err = match e {
                    ProduceError::Origin(o) => TaskError::from(o),
                    ProduceError::HashMismatch(_) => TaskError::ContentChanged {
                        message: e.to_string(),
                    },
                    ProduceError::Store(m) if m.contains("no space") => {
                        TaskError::NoSpace { message: m }
                    }
                    ProduceError::Store(m) => TaskError::Storage { message: m },
                };
                self.fail(err);
            }
        }
    }

    // ---- transfer ------------------------------------------------------------------------

    fn piece_held(&mut self, index: u32, mark: PieceMark, urgent: bool) {
        if self.have.set(index) {
            self.announce.gained(index, urgent);
            self.shared.mark_piece(index, mark);
        }
        if !self.first_byte_counted {
            self.first_byte_counted = true;
            self.ctx
                .metrics
                .task_first_byte(self.kind(), self.started.elapsed());
        }
        self.last_progress = Instant::now();
        self.stall_since = None;
        self.publish_progress();
        self.check_complete();
    }

    fn schedule(&mut self) {
        if !self.wanted || self.header.is_none() || !matches!(self.phase, Phase::Running) {
            return;
        }
        let max = self
            .ctx
            .config
            .download
            .pieces_in_flight(self.layout.piece_length);
        let per_source = self
            .ctx
            .config
            .download
            .max_inflight_per_source
            .clamp(1, max);
        let per_seed = self.ctx.config.download.max_inflight_per_seed.max(1);
        let empty = Bitfield::new(self.piece_count());
        let n = self.piece_count();
        let reader_at = Some(self.shared.reader_at.load(Ordering::Relaxed)).filter(|&i| i < n);
        loop {
            // Runs after every message: the cheap budget check first. A spent budget still lets
            // a seed's free slot be filled (with a piece only seeds hold): pieces enter the swarm
            // through the seeds' uplinks, which must not idle while requests to peers fill it.
            let total: usize = self.inflight.values().map(Vec::len).sum();
            let seed_slot_only = total >= max;
            if seed_slot_only
                && !self
                    .sources
                    .values()
                    .any(|s| s.is_seed && s.inflight < per_seed)
            {
                break;
            }
            let endgame = self.hash_known.is_complete()
                && (0..n).all(|i| self.have.get(i) || self.inflight.contains_key(&i));
            let now = Instant::now();
            let views: Vec<SourceView<'_>> = self
                .sources
                .iter()
                .map(|(peer, s)| s.view(*peer, now))
                .collect();
            let inflight = &self.inflight;
            let busy = |i: u32| {
                inflight
                    .get(&i)
                    .map(|v| v.iter().map(|(p, _)| *p).collect())
                    .unwrap_or_default()
            };
            let input = PickInput {
                have: &self.have,
                hash_known: &self.hash_known,
                excluded: self.producing.as_ref().unwrap_or(&empty),
                inflight: &busy,
                sources: &views,
                per_source,
                per_seed,
                endgame,
                reader_at,
                seed_slot_only,
            };
            let Some((index, peer)) = picker::pick(&input, &mut self.rng) else {
                break;
            };
            self.spawn_fetch(index, peer);
        }
    }

    fn spawn_fetch(&mut self, index: u32, peer: PeerId) {
        let (Some(source), Some(Some(entry))) =
            (self.sources.get_mut(&peer), self.hashes.get(index as usize))
        else {
            return;
        };
        source.inflight += 1;
        let (addr, token) = (source.addr, source.token);
        let expected = entry.hash;
        let len = self.layout.piece_len(index);
        let offset = self.layout.piece_range(index).start;
        let key = self.key;
        let data = self
            .ctx
            .data
            .clone()
            .with_task_limit(self.task_limit.clone());
        let store = self.ctx.store.clone();
        let timeout = self.ctx.config.download.piece_timeout;
        let tx = self.tx.clone();
        let metrics = self.ctx.metrics.clone();
        let handle = tokio::spawn(async move {
            // Counted while the request is open (an aborted endgame duplicate included).
            let _open = metrics.piece_request();
            let started = Instant::now();
            let result = match data.fetch(addr, &token, &key, index, len, timeout).await {
                Err(e) => Err(FetchFailure::Transfer(e)),
                Ok(bytes) => {
                    let (r, bytes) =
                        verify_and_store(store, key, (index, offset), bytes, expected).await;
                    if let Some(b) = bytes {
                        data.recycle(b);
                    }
                    r
                }
            };
            let result = result.map(|()| (len, started.elapsed()));
            let _ = tx.send(RunnerMsg::Fetched {
                index,
                peer,
                result,
            });
        });
        self.inflight
            .entry(index)
            .or_default()
            .push((peer, handle.abort_handle()));
        self.shared.mark_piece(index, PieceMark::InFlight);
    }

    async fn on_fetched(
        &mut self,
        index: u32,
        peer: PeerId,
        result: Result<(u32, Duration), FetchFailure>,
    ) {
        if let Some(v) = self.inflight.get_mut(&index) {
            v.retain(|(p, _)| *p != peer);
            if v.is_empty() {
                self.inflight.remove(&index);
                if !self.have.get(index) && result.is_err() {
                    self.shared.mark_piece(index, PieceMark::Missing);
                }
            }
        }
        if let Some(s) = self.sources.get_mut(&peer) {
            s.request_ended();
        }
        match result {
            Ok((len, elapsed)) => {
                if let Some(s) = self.sources.get_mut(&peer) {
                    s.delivered(len, elapsed);
                }
                if self.have.get(index) {
                    return;
                }
                // The first answer wins; cancel duplicate (endgame) requests.
                if let Some(others) = self.inflight.remove(&index) {
                    for (p, h) in others {
                        h.abort();
                        if let Some(s) = self.sources.get_mut(&p) {
                            s.request_ended();
                        }
                    }
                }
                self.from_peers += u64::from(len);
                *self.received_from.entry(peer).or_default() += u64::from(len);
                let (from, mark) = match self.ctx.net.state().peer(&peer).and_then(|p| p.role) {
                    Some(Role::Seed) => (ByteSource::Seed, PieceMark::FromSeed),
                    _ => (ByteSource::Peer, PieceMark::FromPeer),
                };
                self.ctx
                    .metrics
                    .piece_received(from, u64::from(len), elapsed);
                // A piece no other peer is known to hold: the rest of the swarm can get it only
                // from this node, so its have does not wait for the batch.
                let urgent = !self.held_by_other_peer(index, &peer);
                tracing::debug!(target: "df_piece", task = %self.key, index, len, from = %peer, "piece");
                self.piece_held(index, mark, urgent);
            }
            Err(FetchFailure::Corrupt) => {
                self.ctx.metrics.piece_corrupt();
                self.ban(peer, index);
            }
            Err(FetchFailure::Store(e)) => self.fail(e.into()),
            Err(FetchFailure::Transfer(e)) => {
                tracing::debug!(task = %self.key, %peer, index, error = %e, "piece fetch failed");
                let max_failures = self.ctx.config.download.max_source_failures;
                let Some(s) = self.sources.get_mut(&peer) else {
                    return;
                };
                if matches!(e, FetchError::Stalled(_)) {
                    self.ctx.metrics.request_stalled();
                }
                match e {
                    FetchError::NotFound => s.have.clear(index),
                    // Busy with this piece: ask for others meanwhile (and for this one elsewhere).
                    FetchError::Busy => {
                        self.ctx.metrics.request_busy();
                        s.busy(index, Instant::now());
                    }
                    _ => {
                        self.ctx.data.forget(s.addr);
                        if s.failed(Instant::now(), max_failures) == AfterFailure::Drop {
                            tracing::info!(task = %self.key, %peer, "dropping unresponsive source");
                            self.sources.remove(&peer);
                            self.publish_progress();
                        }
                    }
                }
                // Denied: the grant expired (or the source restarted with a new secret); a fresh
                // `get_task` answer carries a new one.
                if matches!(e, FetchError::Denied(_)) {
                    self.probe(peer);
                }
            }
        }
    }

    fn ban(&mut self, peer: PeerId, index: u32) {
        tracing::warn!(task = %self.key, %peer, index, "source sent a corrupt piece: banned for this task");
        self.ctx.metrics.source_banned();
        self.banned.insert(peer);
        if let Some(s) = self.sources.remove(&peer) {
            self.ctx.data.forget(s.addr);
        }
        for reqs in self.inflight.values_mut() {
            reqs.retain(|(p, h)| {
                if *p == peer {
                    h.abort();
                    false
                } else {
                    true
                }
            });
        }
        self.inflight.retain(|_, v| !v.is_empty());
        self.publish_progress();
    }

    // ---- completion ----------------------------------------------------------------------

    fn check_complete(&mut self) {
        if self.header.is_none()
            || !self.have.is_complete()
            || matches!(
                self.phase,
                Phase::Verified | Phase::Complete | Phase::Failed(_)
            )
            || self.digest_checking
        {
            return;
        }
        let expected = self.key.content_digest().or_else(|| {
            self.header
                .as_ref()
                .and_then(|h| h.header.content_digest.clone())
        });
        let Some(expected) = expected else {
            self.tx_self(RunnerMsg::DigestChecked(Ok(())));
            self.digest_checking = true;
            return;
        };
        self.digest_checking = true;
        let store = self.ctx.store.clone();
        let key = self.key;
        let n = self.piece_count();
        let tx = self.tx.clone();
        tokio::task::spawn_blocking(move || {
            let mut h = expected.algorithm().hasher();
            for i in 0..n {
                match store.piece(&key, i) {
                    Ok(Some(p)) => h.update(&p),
                    Ok(None) => {
                        let _ = tx.send(RunnerMsg::DigestChecked(Err(TaskError::Storage {
                            message: format!("piece {i} vanished from the store"),
                        })));
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(RunnerMsg::DigestChecked(Err(e.into())));
                        return;
                    }
                }
            }
            let actual = h.finish();
            let r = if actual == expected {
                Ok(())
            } else {
                Err(TaskError::DigestMismatch {
                    expected: expected.to_string(),
                    actual: actual.to_string(),
                })
            };
            let _ = tx.send(RunnerMsg::DigestChecked(r));
        });
    }

    fn tx_self(&self, msg: RunnerMsg) {
        let _ = self.tx.send(msg);
    }

    async fn on_digest_checked(&mut self, r: Result<(), TaskError>) {
        self.digest_checking = false;
        if let Err(e) = r {
            if matches!(e, TaskError::DigestMismatch { .. }) {
                let store = self.ctx.store.clone();
                let key = self.key;
                let _ = tokio::task::spawn_blocking(move || store.delete_task(&key)).await;
                self.have = Bitfield::new(self.piece_count());
                let producer = self.header.as_ref().map(|h| h.header.producer);
                if let Some(p) = producer.filter(|p| *p != self.ctx.peer_id)
                    && self.wanted
                    && self.restarts < MAX_DIGEST_RESTARTS
                {
                    tracing::warn!(task = %self.key, producer = %p, error = %e, "content failed its digest: producer banned for this task; starting over");
                    self.restart_without(p);
                    return;
                }
            }
            self.fail(e);
            return;
        }
        // Readers (a mirror's client, `df get`) may take the last piece now: they need not wait
        // while this node makes its store durable (fsyncs of the content files written since the
        // last flush, then RocksDB's memtables).
        self.phase = Phase::Verified;
        self.publish_progress();
        self.persist_hashes_now().await;
        if let Some(h) = self.header.clone() {
            let store = self.ctx.store.clone();
            let rec = TaskRecord {
                header: h,
                complete: true,
                last_access: crate::store::now_unix(),
                content_mtime: None,
            };
            // The pieces skip the write-ahead log: make them durable before the record that says
            // they are all here, or a crash would leave a "complete" task without its pieces.
            match tokio::task::spawn_blocking(move || {
                store.flush()?;
                store.put_task(&rec)
            })
            .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    self.fail(e.into());
                    return;
                }
                Err(e) => {
                    self.fail(TaskError::internal(e.to_string()));
                    return;
                }
            }
        }
        self.phase = Phase::Complete;
        self.ctx
            .metrics
            .task_finished(self.kind(), true, self.started.elapsed());
        tracing::info!(task = %self.key, from_peers = self.from_peers, from_origin = self.from_origin, "task complete");
        self.flush_announcements(true).await;
        self.publish_progress();
    }

    /// Forgets everything learnt under the current header (whose content failed its digest),
    /// bans its producer for this task, and looks for the content again.
    fn restart_without(&mut self, producer: PeerId) {
        self.restarts += 1;
        self.ctx.metrics.source_banned();
        self.banned.insert(producer);
        self.failed_producers.insert(producer);
        self.abort_requests();
        for s in self.sources.values() {
            self.ctx.data.forget(s.addr);
        }
        self.sources.clear();
        self.early_haves.clear();
        self.header = None;
        self.layout = PieceLayout {
            content_length: 0,
            piece_length: MIN_PIECE_LENGTH,
        };
        self.hashes.clear();
        self.hash_known = Bitfield::new(0);
        self.have = Bitfield::new(0);
        self.shared.reset_pieces(&self.have);
        self.early_hashes.clear();
        self.announce.clear();
        self.producer = None;
        self.elected.clear();
        self.live_producers.clear();
        self.probed_connected = false;
        self.awaiting_probes = 0;
        self.stall_since = None;
        self.last_progress = Instant::now();
        self.phase = Phase::Starting;
        self.publish_progress();
        self.discover();
    }

    // ---- periodic work -------------------------------------------------------------------

    async fn on_tick(&mut self) {
        self.flush_announcements(false).await;
        self.persist_hashes();
        self.check_stall();
        self.schedule();
    }

    /// Gossips new hashes, and sends new haves when due (`all`: every pending have, due or not):
    /// straight to the connected peers on the task, and by gossip too when it is the first or the
    /// last (so peers not connected here learn of this holder) or some peer on the topic takes no
    /// direct haves.
    async fn flush_announcements(&mut self, all: bool) {
        for chunk in self.announce.take_hashes(self.ctx.peer_id) {
            if let Err(e) = self
                .ctx
                .net
                .publish(self.key, &GossipMessage::Hashes(chunk))
                .await
            {
                tracing::debug!(task = %self.key, error = %e, "announcing hashes failed");
            }
        }
        // A seed's fresh pieces start the swarm; a peer batches its haves until it is complete
        // (or failing, or exiting).
        let pace = if all
            || self.ctx.config.role == Role::Seed
            || !matches!(self.phase, Phase::Running)
            || self.have.is_complete()
        {
            HavePace::Now
        } else {
            HavePace::Batched
        };
        let Some(batch) = self.announce.take_have(pace, Instant::now()) else {
            return;
        };
        if batch.first {
            let _ = self.ctx.net.start_providing(self.key.to_bytes()).await;
        }
        let complete = self.have.is_complete();
        for pieces in batch.chunks {
            let frame = HaveFrame {
                task: self.key,
                pieces,
                complete,
            };
            let gossip = batch.first
                || complete
                || match self.ctx.net.send_have(&frame).await {
                    Ok(others) => others,
                    Err(e) => {
                        tracing::debug!(task = %self.key, error = %e, "sending haves failed");
                        true
                    }
                };
            if !gossip {
                continue;
            }
            let msg = GossipMessage::Have {
                pieces: frame.pieces,
                complete,
            };
            if let Err(e) = self.ctx.net.publish(self.key, &msg).await {
                tracing::debug!(task = %self.key, error = %e, "announcing pieces failed");
            }
        }
    }

    /// Whether a source other than `from`, and not a seed, is known to hold piece `index`.
    fn held_by_other_peer(&self, index: u32, from: &PeerId) -> bool {
        self.sources
            .iter()
            .any(|(p, s)| p != from && !s.is_seed && s.have.get(index))
    }

    fn persist_hashes(&mut self) {
        if !self.announce.has_unpersisted() {
            return;
        }
        let batches = self.announce.take_unpersisted();
        let store = self.ctx.store.clone();
        let key = self.key;
        let tx = self.tx.clone();
        tokio::task::spawn_blocking(move || {
            let r = batches
                .iter()
                .try_for_each(|b| store.put_hashes(&key, b.producer, &b.hashes));
            if r.is_err() {
                let _ = tx.send(RunnerMsg::HashesPersisted(r));
            }
        });
    }

    async fn persist_hashes_now(&mut self) {
        if !self.announce.has_unpersisted() {
            return;
        }
        let batches = self.announce.take_unpersisted();
        let store = self.ctx.store.clone();
        let key = self.key;
        let r = tokio::task::spawn_blocking(move || {
            batches
                .iter()
                .try_for_each(|b| store.put_hashes(&key, b.producer, &b.hashes))
        })
        .await;
        if let Ok(Err(e)) = r {
            self.fail(e.into());
        }
    }

    /// Pieces not held that no live source can serve (hash unknown or no holder).
    /// Asks every source and producer again for what it holds, and the DHT for more holders.
    fn reprobe(&mut self) {
        let peers: Vec<PeerId> = self
            .sources
            .keys()
            .copied()
            .chain(self.producer)
            .chain(self.live_producers.keys().copied())
            .collect();
        for p in peers {
            self.probe(p);
        }
        self.discover();
    }

    /// A peer said lately (within 2 × STALL_SETTLE) that it is fetching the origin.
    fn someone_producing(&self) -> bool {
        let now = Instant::now();
        self.live_producers
            .values()
            .any(|t| now.duration_since(*t) < STALL_SETTLE * 2)
    }

    fn unreachable_pieces(&self) -> Vec<u32> {
        (0..self.piece_count())
            .filter(|&i| !self.have.get(i))
            .filter(|&i| !self.producing.as_ref().is_some_and(|p| p.get(i)))
            .filter(|&i| !self.hash_known.get(i) || !self.sources.values().any(|s| s.have.get(i)))
            .collect()
    }

    fn check_stall(&mut self) {
        if !self.wanted
            || !matches!(self.phase, Phase::Running)
            || self.producing.is_some()
            || self.opening
            || self.electing
            || self.digest_checking
        {
            return;
        }
        let now = Instant::now();
        // A producer that disconnected is looked for at once (it was re-probed then): pieces
        // still trading between peers would keep postponing a stall.
        if !self.producer_lost
            && now.duration_since(self.last_progress) < self.ctx.config.download.stall_timeout
        {
            return;
        }
        match self.stall_since {
            None => {
                tracing::info!(task = %self.key, "no progress; re-probing sources and producers");
                self.stall_since = Some(now);
                self.reprobe();
            }
            Some(t) if now.duration_since(t) >= STALL_SETTLE => {
                // A producer still connected whose answer to the re-probe has not come back is
                // slow (a loaded seed), not gone: wait for it, up to the probe's own timeout,
                // rather than ask another seed to fetch the same pieces from the origin.
                if let Some(p) = self.producer
                    && self.probing.contains(&p)
                    && self.ctx.net.state().is_connected(&p)
                    && now.duration_since(t) < PROBE_TIMEOUT
                {
                    return;
                }
                self.stall_since = None;
                self.producer_lost = false;
                self.last_progress = now;
                let missing = self.unreachable_pieces();
                if missing.is_empty() || self.someone_producing() {
                    return;
                }
                if let Some(p) = self.producer.take() {
                    tracing::info!(task = %self.key, producer = %p, "producer is gone; electing another");
                    // Out of this task's elections only: the seed may serve other tasks well
                    // (an unreachable one is not connected, and elections ask connected seeds).
                    self.failed_producers.insert(p);
                }
                if let Some(h) = &self.header
                    && h.header.producer != self.ctx.peer_id
                    && !self.live_producers.contains_key(&h.header.producer)
                {
                    self.failed_producers.insert(h.header.producer);
                }
                tracing::info!(task = %self.key, pieces = missing.len(), "pieces unreachable; electing a producer");
                self.elect(missing);
            }
            Some(_) => {}
        }
    }
}

/// Checks a fetched piece (its index and offset in the content) against its hash and stores it;
/// gives the bytes back for reuse.
async fn verify_and_store(
    store: crate::store::Store,
    key: TaskKey,
    (index, offset): (u32, u64),
    bytes: Bytes,
    expected: PieceHash,
) -> (Result<(), FetchFailure>, Option<Bytes>) {
    let done = tokio::task::spawn_blocking(move || {
        let r = if PieceHash::of(&bytes) != expected {
            Err(FetchFailure::Corrupt)
        } else {
            store
                .put_piece(&key, index, offset, &bytes)
                .map_err(FetchFailure::Store)
        };
        (r, bytes)
    })
    .await;
    match done {
        Ok((r, bytes)) => (r, Some(bytes)),
        Err(e) => (
            Err(FetchFailure::Store(crate::store::StoreError::Io(
                e.to_string(),
            ))),
            None,
        ),
    }
}

/// The hashes of `batch` not known yet, each checked against its producer's signature. A hash
/// already known is skipped unchecked ([`PieceHashBatch::verify_unknown`]): every probe answer
/// repeats all the hashes a peer knows, and checking each again cost an ed25519 verification per
/// piece per answer (with the gossip copy checked twice besides, 40 % of the node's signature work
/// in the `image_pull` bench). A different hash for a known piece is checked, then ignored with a
/// warning. `None`: an index at or past `count`, or a bad signature (the sender misbehaves;
/// nothing of the batch is used).
fn new_hashes(
    known: &[Option<HashEntry>],
    key: &TaskKey,
    count: u32,
    batch: PieceHashBatch,
) -> Option<Vec<SignedPieceHash>> {
    let had = |i: u32| {
        known
            .get(i as usize)
            .and_then(|e| e.as_ref().map(|e| e.hash))
    };
    batch.verify_unknown(key, count, had).ok()?;
    let mut fresh = Vec::new();
    for h in batch.hashes {
        match had(h.index) {
            None => fresh.push(h),
            Some(x) if x != h.hash => {
                tracing::warn!(task = %key, index = h.index, producer = %batch.producer, "conflicting piece hash ignored");
            }
            Some(_) => {}
        }
    }
    Some(fresh)
}

/// What [`Runner::apply_hashes`] did with a batch of piece hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Applied {
    /// Recorded (or kept until the header comes; hashes already known are skipped).
    Kept,
    /// Not taken: an untrusted producer, or too many held before the header.
    Refused,
    /// An index out of range or a bad signature: the sender misbehaves.
    Bad,
}

#[cfg(test)]
mod tests {
    use super::*;
    use df_protocols::piece::PieceHash;
    use libp2p::identity::Keypair;

    fn entry(hash: PieceHash, producer: PeerId) -> Option<HashEntry> {
        Some(HashEntry {
            hash,
            producer,
            signature: df_protocols::manifest::Signature(vec![0; 64]),
        })
    }

    #[test]
    fn new_hashes_checks_what_is_new_and_refuses_a_forgery_or_a_bad_index() {
        let key = TaskKey::for_url(&df_protocols::task::parse_url("http://o/f").unwrap(), "");
        let producer = Keypair::generate_ed25519();
        let pid = producer.public().to_peer_id();
        let h = |i: u8| PieceHash::of(&[i]);
        let signed = |i: u32| SignedPieceHash::sign(&key, i, h(i as u8), &producer).unwrap();
        let known = vec![entry(h(0), pid), None, None, entry(h(9), pid)];
        let batch = |hashes: Vec<SignedPieceHash>| PieceHashBatch {
            producer: pid,
            hashes,
        };

        // Piece 0 is known with this hash: skipped, its (here broken) signature unchecked.
        let mut unchecked = signed(0);
        unchecked.signature.0[0] ^= 1;
        // Piece 3 is known with another hash: checked, then left out.
        let conflicting = signed(3);
        let fresh = new_hashes(
            &known,
            &key,
            4,
            batch(vec![unchecked, signed(1), conflicting]),
        )
        .expect("a well-signed batch");
        assert_eq!(fresh.iter().map(|h| h.index).collect::<Vec<_>>(), vec![1]);

        // A new hash with a bad signature, or one signed by someone else, spoils the batch.
        let mut forged = signed(2);
        forged.signature.0[5] ^= 1;
        assert!(new_hashes(&known, &key, 4, batch(vec![signed(1), forged])).is_none());
        let other = Keypair::generate_ed25519();
        let by_other = SignedPieceHash::sign(&key, 2, h(2), &other).unwrap();
        assert!(new_hashes(&known, &key, 4, batch(vec![by_other])).is_none());
        // A conflicting hash with a bad signature too.
        let mut bad_conflict = signed(3);
        bad_conflict.signature.0[1] ^= 1;
        assert!(new_hashes(&known, &key, 4, batch(vec![bad_conflict])).is_none());
        // An index past the task's pieces.
        assert!(new_hashes(&known, &key, 4, batch(vec![signed(4)])).is_none());
    }
}
