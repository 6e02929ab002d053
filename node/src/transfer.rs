//! The data plane (wire format and access scheme in [`df_protocols::transfer`]): a TCP server that
//! serves stored pieces to peers holding a [`Grant`], and a client with a per-address connection
//! pool.
//!
//! The server bounds everything a peer can hold (see `[upload]` in [`UploadConfig`]):
//! - connections: `max_connections` in total (beyond it a new connection is closed at once) and
//!   `max_connections_per_peer` per authenticated peer (beyond it the handshake answers "busy");
//! - handshakes: each must finish within `handshake_timeout`; at most `max_handshakes` may be in
//!   progress, and when a new connection arrives at that limit the *oldest* one still in its
//!   handshake is closed. Rejecting the newcomer instead would let an attacker that keeps
//!   `max_handshakes` idle connections open lock every honest peer out; evicting the oldest means
//!   it must open connections faster than an honest peer answers its challenge (one round trip);
//! - requests: a connection may idle `idle_timeout` until a request's first byte, and the rest of
//!   the request must follow within `handshake_timeout`;
//! - uploads: `max_concurrent` in total, `max_per_peer` per peer, `max_per_piece` per piece and one
//!   per piece and peer; beyond any of them the request is answered "busy" (so a peer that never
//!   reads can hold at most one of a piece's `max_per_piece` slots, and only until `write_timeout`). A piece is written in chunks of
//!   [`transfer::WRITE_CHUNK`] bytes and each must drain within `write_timeout`: a requester that
//!   stops reading loses its upload slot and its connection.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use df_protocols::task::TaskKey;
use df_protocols::transfer::{
    self, AccessToken, CHALLENGE_LEN, Grant, HANDSHAKE_HEAD_LEN, HandshakeStatus,
    MAX_HANDSHAKE_LEN, MAX_REQUEST_LEN, Nonce, PieceStatus, RESPONSE_HEADER_LEN, TransferError,
};
use hmac::{KeyInit, Mac};
use libp2p::PeerId;
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::activity::Activity;
use crate::config::UploadConfig;
use crate::limits::Limiter;
use crate::metrics::Metrics;
use crate::store::{PieceData, Store, now_unix};
use crate::superseed::{Claim, SuperSeed};

type HmacSha256 = hmac::Hmac<Sha256>;

const MAX_IDLE_PER_ADDR: usize = 8;
/// How long a grant handed out in a `get_task` answer stays valid.
pub const GRANT_LIFETIME: Duration = Duration::from_secs(3600);

/// Issues data-plane grants and derives their tokens:
/// `HMAC-SHA256(secret, "df-grant-v2" | u8 n | peer ID | u64 BE expires)`.
#[derive(Clone)]
pub struct TokenIssuer {
    secret: [u8; 32],
}

impl TokenIssuer {
    pub fn random() -> TokenIssuer {
        TokenIssuer {
            secret: rand::random(),
        }
    }

    /// The token of a grant for `peer_id` (its bytes) until `expires`; `None` for a peer ID
    /// longer than the wire allows.
    fn token(&self, peer_id: &[u8], expires: u64) -> Option<AccessToken> {
        let message = transfer::grant_message(peer_id, expires).ok()?;
        let mut mac = match <HmacSha256 as KeyInit>::new_from_slice(&self.secret) {
            Ok(m) => m,
            Err(_) => unreachable!("HMAC takes keys of any length"),
        };
        mac.update(&message);
        Some(AccessToken(mac.finalize().into_bytes().into()))
    }

    /// A grant for `peer` valid until `expires` (unix seconds).
    pub fn grant_until(&self, peer: &PeerId, expires: u64) -> Grant {
        let token = self
            .token(&peer.to_bytes(), expires)
            // libp2p peer IDs (at most 42 bytes) always fit; a longer one could not handshake
            // anyway, as the server derives no token for it, so this placeholder is never accepted.
            .unwrap_or(AccessToken([0; transfer::TOKEN_LEN]));
        Grant { token, expires }
    }

    /// A grant for `peer`, valid for [`GRANT_LIFETIME`].
    pub fn grant_for(&self, peer: &PeerId) -> Grant {
        self.grant_until(peer, now_unix().saturating_add(GRANT_LIFETIME.as_secs()))
    }

    /// Whether `hs` answers `nonce` with a grant this issuer made and that has not expired.
    fn verify(&self, hs: &transfer::Handshake<'_>, nonce: &Nonce) -> bool {
        if hs.expires <= now_unix() {
            return false;
        }
        let Some(token) = self.token(hs.peer_id, hs.expires) else {
            return false;
        };
        transfer::verify_handshake_proof(&token, nonce, hs.peer_id, hs.expires, &hs.proof)
    }
}

/// Counts of something in progress per key, each held by a [`Slot`].
struct Counts<K: Eq + Hash + Clone>(Arc<Mutex<HashMap<K, usize>>>);

impl<K: Eq + Hash + Clone> Counts<K> {
    fn new() -> Counts<K> {
        Counts(Arc::new(Mutex::new(HashMap::new())))
    }

    /// Takes one of `max` slots of `key`, or `None` when all are held.
    fn take(&self, key: K, max: usize) -> Option<Slot<K>> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(key.clone()).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Slot {
            map: self.0.clone(),
            key,
        })
    }
}

/// One unit of a [`Counts`] key; released on drop.
struct Slot<K: Eq + Hash + Clone> {
    map: Arc<Mutex<HashMap<K, usize>>>,
    key: K,
}

impl<K: Eq + Hash + Clone> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

/// Connections still in their handshake, oldest first; at the limit a newcomer evicts the oldest.
struct Handshakes {
    max: usize,
    pending: Mutex<(u64, BTreeMap<u64, CancellationToken>)>,
}

/// A connection's place among the pending handshakes; cancelled when evicted, released on drop.
struct HandshakeTicket {
    owner: Arc<Handshakes>,
    id: u64,
    evicted: CancellationToken,
}

impl Handshakes {
    fn enter(self: &Arc<Self>) -> HandshakeTicket {
        let mut guard = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let (next, pending) = &mut *guard;
        let id = *next;
        *next += 1;
        while pending.len() >= self.max {
            match pending.pop_first() {
                Some((_, oldest)) => oldest.cancel(),
                None => break,
            }
        }
        let evicted = CancellationToken::new();
        pending.insert(id, evicted.clone());
        HandshakeTicket {
            owner: self.clone(),
            id,
            evicted,
        }
    }
}

impl Drop for HandshakeTicket {
    fn drop(&mut self) {
        let mut guard = self.owner.pending.lock().unwrap_or_else(|p| p.into_inner());
        guard.1.remove(&self.id);
    }
}

/// How a [`DataServer`] behaves beyond its limits.
#[derive(Debug, Clone, Default)]
pub struct ServeMode {
    /// Super-seeding (see [`crate::superseed`]): for a seed with `upload.super_seed`.
    pub super_seed: bool,
    /// The node's upload bucket (`limits.upload_rate`), shared by every connection.
    pub upload_limit: Limiter,
    /// Fault injection for tests: flip the first byte of every piece served.
    pub corrupt: bool,
    /// Fault injection for tests: send this many bytes of a piece, then stop writing.
    pub stall_after: Option<usize>,
}

/// Serves pieces from the store.
pub struct DataServer {
    listener: TcpListener,
    store: Store,
    tokens: TokenIssuer,
    /// Piece uploads in progress, capped at `max_concurrent`.
    permits: Arc<Semaphore>,
    /// Open connections, capped at `max_connections`.
    connections: Arc<Semaphore>,
    handshakes: Arc<Handshakes>,
    /// Uploads in progress per (task, piece), capped at `per_piece`.
    uploading: Counts<(TaskKey, u32)>,
    /// Uploads in progress per requester, capped at `per_peer`.
    peer_uploads: Counts<PeerId>,
    /// Uploads in progress per (task, piece, requester), capped at 1.
    peer_pieces: Counts<(TaskKey, u32, PeerId)>,
    /// Authenticated connections per requester, capped at `conns_per_peer`.
    peer_connections: Counts<PeerId>,
    per_piece: usize,
    per_peer: usize,
    conns_per_peer: usize,
    idle_timeout: Duration,
    handshake_timeout: Duration,
    write_timeout: Duration,
    metrics: Arc<Metrics>,
    activity: Arc<Activity>,
    corrupt: bool,
    stall_after: Option<usize>,
    upload_limit: Limiter,
    /// On a seed with `upload.super_seed`: each piece leaves once before any leaves twice.
    super_seed: Option<SuperSeed>,
    /// Chunk buffers of finished uploads, for the next ones.
    chunks: ChunkPool,
}

impl DataServer {
    pub fn new(
        listener: TcpListener,
        store: Store,
        tokens: TokenIssuer,
        upload: &UploadConfig,
        metrics: Arc<Metrics>,
        activity: Arc<Activity>,
        mode: ServeMode,
    ) -> DataServer {
        DataServer {
            listener,
            store,
            tokens,
            permits: Arc::new(Semaphore::new(upload.max_concurrent.max(1))),
            connections: Arc::new(Semaphore::new(upload.max_connections.max(1))),
            handshakes: Arc::new(Handshakes {
                max: upload.max_handshakes.max(1),
                pending: Mutex::new((0, BTreeMap::new())),
            }),
            uploading: Counts::new(),
            peer_uploads: Counts::new(),
            peer_pieces: Counts::new(),
            peer_connections: Counts::new(),
            per_piece: upload.max_per_piece.max(1),
            per_peer: upload.max_per_peer.max(1),
            conns_per_peer: upload.max_connections_per_peer.max(1),
            idle_timeout: upload.idle_timeout,
            handshake_timeout: upload.handshake_timeout,
            write_timeout: upload.write_timeout,
            metrics,
            activity,
            corrupt: mode.corrupt,
            stall_after: mode.stall_after,
            upload_limit: mode.upload_limit,
            super_seed: mode.super_seed.then(SuperSeed::default),
            chunks: ChunkPool::default(),
        }
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub async fn run(self, shutdown: CancellationToken) {
        let this = Arc::new(self);
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                a = this.listener.accept() => a,
            };
            match accepted {
                Ok((stream, remote)) => {
                    let Ok(permit) = this.connections.clone().try_acquire_owned() else {
                        tracing::debug!(%remote, "data plane at its connection limit: closing");
                        drop(stream);
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let ticket = this.handshakes.enter();
                    let this = this.clone();
                    let shutdown = shutdown.clone();
                    tokio::spawn(async move {
                        let _permit = permit;
                        tokio::select! {
                            _ = shutdown.cancelled() => {}
                            r = this.serve_connection(stream, ticket) => if let Err(e) = r {
                                tracing::debug!(%remote, error = %e, "data connection ended");
                            }
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "data-plane accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Writes `buf` unless the peer stops reading for `write_timeout`.
    async fn write(&self, stream: &mut TcpStream, buf: &[u8]) -> Result<(), ServeError> {
        tokio::time::timeout(self.write_timeout, stream.write_all(buf))
            .await
            .map_err(|_| ServeError::WriteStalled)??;
        Ok(())
    }

    /// Sends the first `len` bytes of a piece, a chunk at a time, read from its file as they go
    /// (a 16 MiB piece is never held whole), drawing each from the upload bucket.
    async fn send_body(
        &self,
        stream: &mut TcpStream,
        data: PieceData,
        len: u64,
    ) -> Result<(), ServeError> {
        let step = self.upload_limit.step(transfer::WRITE_CHUNK).max(1);
        let (file, offset) = match data {
            PieceData::Bytes(mut b) => {
                b.truncate(usize::try_from(len).unwrap_or(usize::MAX));
                if self.corrupt
                    && let Some(first) = b.first_mut()
                {
                    *first ^= 0xff;
                }
                for chunk in b.chunks(step) {
                    self.upload_limit.take(chunk.len()).await;
                    self.write(stream, chunk).await?;
                }
                return Ok(());
            }
            PieceData::File { file, offset, .. } => (Arc::new(file), offset),
        };
        // One buffer for the whole piece, from the pool: a fresh one per upload made the kernel
        // fault in and zero its pages each time, since freed memory goes back to the system.
        let mut buf = self.chunks.take(step);
        let mut sent = 0u64;
        while sent < len {
            let want = ((len - sent) as usize).min(step);
            let at = offset + sent;
            // From the page cache on this thread when it is there (a piece stored moments ago),
            // else the rest on a blocking thread.
            let cached = crate::store::read_cached_at(&file, &mut buf[..want], at)?;
            if cached < want {
                let f = file.clone();
                let (b, read) = tokio::task::spawn_blocking(move || {
                    use std::os::unix::fs::FileExt;
                    let r = f.read_exact_at(&mut buf[cached..want], at + cached as u64);
                    (buf, r)
                })
                .await
                .map_err(|e| ServeError::Io(std::io::Error::other(e)))?;
                buf = b;
                read?;
            }
            if self.corrupt && sent == 0 && want > 0 {
                buf[0] ^= 0xff;
            }
            self.upload_limit.take(want).await;
            self.write(stream, &buf[..want]).await?;
            sent += want as u64;
        }
        self.chunks.give(buf);
        Ok(())
    }

    async fn respond(&self, stream: &mut TcpStream, status: PieceStatus) -> Result<(), ServeError> {
        self.write(stream, &transfer::encode_response_header(status, 0))
            .await
    }

    async fn serve_connection(
        &self,
        mut stream: TcpStream,
        ticket: HandshakeTicket,
    ) -> Result<(), ServeError> {
        let (peer, expires) = tokio::select! {
            _ = ticket.evicted.cancelled() => return Err(ServeError::Evicted),
            r = tokio::time::timeout(self.handshake_timeout, self.handshake(&mut stream)) => {
                r.map_err(|_| ServeError::Timeout("handshake"))??
            }
        };
        drop(ticket);
        let _counted = self.metrics.data_connection();
        let Some(_connection) = self.peer_connections.take(peer, self.conns_per_peer) else {
            self.write(&mut stream, &[HandshakeStatus::Busy.to_byte()])
                .await?;
            return Err(ServeError::TooManyConnections(peer));
        };
        self.write(&mut stream, &[HandshakeStatus::Accepted.to_byte()])
            .await?;
        let mut buf = [0u8; MAX_REQUEST_LEN];
        loop {
            match tokio::time::timeout(self.idle_timeout, stream.read_exact(&mut buf[..1])).await {
                Err(_) => return Ok(()),
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Ok(r) => r?,
            };
            let len = transfer::request_len(buf[0])?;
            tokio::time::timeout(self.handshake_timeout, stream.read_exact(&mut buf[1..len]))
                .await
                .map_err(|_| ServeError::Timeout("request"))??;
            let request = transfer::decode_request(&buf[..len])?;
            if expires <= now_unix() {
                return Err(ServeError::Expired(peer));
            }
            let index = request.index;
            let Ok(task) = TaskKey::from_bytes(request.task_key) else {
                self.respond(&mut stream, PieceStatus::NotFound).await?;
                continue;
            };
            let (Ok(_permit), Some(_peer_slot), Some(_own_slot), Some(_piece_slot)) = (
                self.permits.clone().try_acquire_owned(),
                self.peer_uploads.take(peer, self.per_peer),
                // One upload of a piece per peer: with `max_per_piece` ≥ 2, a peer that asks
                // for pieces and never reads them cannot hold every slot of any piece.
                self.peer_pieces.take((task, index, peer), 1),
                self.uploading.take((task, index), self.per_piece),
            ) else {
                self.respond(&mut stream, PieceStatus::Busy).await?;
                continue;
            };
            // Super-seeding: a piece that just left (or is leaving) waits while a fresh one is
            // held, or while this node still fetches the task.
            let (sending, sent_already) = match &self.super_seed {
                Some(s) => match s.claim(task, index, std::time::Instant::now()) {
                    Claim::Granted(g) => (Some(g), None),
                    Claim::Blocked { sent } => (None, Some(sent)),
                },
                None => (None, None),
            };
            let store = self.store.clone();
            // While this node fetches any task from its origin, its uplink is for their fresh
            // pieces: with several tasks at once (an image's layers), a second copy of a piece
            // of a task it finished fetching took uplink from the fresh pieces of the others
            // (the seed sent 1.17 × the image's bytes).
            let fetching_elsewhere = self.activity.origin_fetches() > 0;
            let piece = tokio::task::spawn_blocking(move || {
                if let Some(sent) = sent_already {
                    // While this node still fetches the task, a second copy waits even when no
                    // fresh piece is held: the next fresh one is coming, and a second copy would
                    // share the uplink with it.
                    let fetching =
                        fetching_elsewhere || store.task(&task)?.is_some_and(|r| !r.complete);
                    if fetching || store.held_count(&task)? > sent {
                        return Ok(Err(PieceStatus::Busy));
                    }
                }
                store.piece_data(&task, index).map(Ok)
            })
            .await
            .map_err(|e| ServeError::Io(std::io::Error::other(e)))?;
            match piece {
                Ok(Err(status)) => {
                    tracing::trace!(%peer, %task, index, "super-seeding: a fresher piece goes first");
                    self.respond(&mut stream, status).await?;
                }
                Ok(Ok(Some(data))) => {
                    let sending = match (sending, sent_already, &self.super_seed) {
                        (None, Some(_), Some(s)) => {
                            Some(s.start(task, index, std::time::Instant::now()))
                        }
                        (sending, _, _) => sending,
                    };
                    let _uploading = self.metrics.upload();
                    let len = data.len();
                    let Ok(len32) = u32::try_from(len) else {
                        self.respond(&mut stream, PieceStatus::Error).await?;
                        continue;
                    };
                    self.write(
                        &mut stream,
                        &transfer::encode_response_header(PieceStatus::Ok, len32),
                    )
                    .await?;
                    let body_len = self.stall_after.map_or(len, |n| (n as u64).min(len));
                    self.send_body(&mut stream, data, body_len).await?;
                    if self.stall_after.is_some() {
                        tracing::debug!(%peer, %task, index, "fault injection: upload stalls");
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        return Ok(());
                    }
                    if let Some(sending) = sending {
                        sending.done();
                    }
                    self.metrics.add_uploaded(len);
                    self.activity.touch(&task);
                    tracing::trace!(%peer, %task, index, "served piece");
                }
                Ok(Ok(None)) => self.respond(&mut stream, PieceStatus::NotFound).await?,
                Err(e) => {
                    tracing::warn!(%task, index, error = %e, "reading piece failed");
                    self.respond(&mut stream, PieceStatus::Error).await?;
                }
            }
        }
    }

    /// Runs the `DFX2` handshake up to (not including) the status byte of an accepted one.
    /// Returns the authenticated peer and its grant's expiry.
    async fn handshake(&self, stream: &mut TcpStream) -> Result<(PeerId, u64), ServeError> {
        let nonce: Nonce = rand::random();
        stream
            .write_all(&transfer::encode_challenge(&nonce))
            .await?;
        let mut buf = [0u8; MAX_HANDSHAKE_LEN];
        stream.read_exact(&mut buf[..HANDSHAKE_HEAD_LEN]).await?;
        let len = transfer::handshake_len(&buf[..HANDSHAKE_HEAD_LEN])?;
        stream.read_exact(&mut buf[HANDSHAKE_HEAD_LEN..len]).await?;
        let hs = transfer::decode_handshake(&buf[..len])?;
        match PeerId::from_bytes(hs.peer_id) {
            Ok(peer) if self.tokens.verify(&hs, &nonce) => Ok((peer, hs.expires)),
            _ => {
                let _ = stream.write_all(&[HandshakeStatus::Denied.to_byte()]).await;
                Err(ServeError::Denied)
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ServeError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Protocol(#[from] TransferError),
    #[error("{0} timed out")]
    Timeout(&'static str),
    #[error("the peer stopped reading: write stalled")]
    WriteStalled,
    #[error("closed in the handshake to make room for a newer connection")]
    Evicted,
    #[error("handshake denied: bad proof or expired grant")]
    Denied,
    #[error("{0} has too many connections open")]
    TooManyConnections(PeerId),
    #[error("the grant of {0} expired")]
    Expired(PeerId),
}

/// Why a piece fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("connecting to {0} failed: {1}")]
    Connect(SocketAddr, std::io::Error),
    #[error("access denied by {0}")]
    Denied(SocketAddr),
    #[error("source does not hold the piece")]
    NotFound,
    #[error("source is busy")]
    Busy,
    #[error("source failed to read the piece")]
    SourceError,
    #[error("piece has {got} bytes, expected {expected}")]
    WrongLength { expected: u32, got: u32 },
    #[error("data-plane protocol error: {0}")]
    Protocol(#[from] TransferError),
    #[error("data-plane I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("timed out")]
    Timeout,
    #[error("the source sent nothing for {0:?}")]
    Stalled(Duration),
}

/// Fetches pieces, reusing connections per address.
#[derive(Clone)]
pub struct DataClient {
    local_peer: Vec<u8>,
    idle: Arc<Mutex<HashMap<SocketAddr, Vec<TcpStream>>>>,
    /// A source silent this long while a request is open is given up on (`download.read_timeout`).
    read_timeout: Duration,
    /// The node's download bucket (`limits.download_rate`).
    limit: Limiter,
    /// A task's own bucket (`df get --limit-rate`), on the clone a task's runner uses.
    task_limit: Limiter,
    buffers: BufferPool,
}

/// Most bytes of piece buffers kept for reuse.
const POOL_BYTES: usize = 32 << 20;

/// Upload chunk buffers kept for reuse, at most this many.
const MAX_POOLED_CHUNKS: usize = 8;

/// Chunk buffers of finished uploads (see [`DataServer::send_body`]); a failed upload's buffer
/// is dropped, so the pool never holds more than [`MAX_POOLED_CHUNKS`].
#[derive(Default)]
struct ChunkPool {
    free: Mutex<Vec<Vec<u8>>>,
}

impl ChunkPool {
    /// A buffer of exactly `len` bytes (zeroed only when newly allocated).
    fn take(&self, len: usize) -> Vec<u8> {
        let reused = self.free.lock().ok().and_then(|mut free| free.pop());
        match reused {
            Some(mut b) => {
                b.resize(len, 0);
                b
            }
            None => vec![0u8; len],
        }
    }

    fn give(&self, buf: Vec<u8>) {
        if let Ok(mut free) = self.free.lock()
            && free.len() < MAX_POOLED_CHUNKS
        {
            free.push(buf);
        }
    }
}

/// Piece buffers given back after their piece was verified and stored, for the next fetch: a
/// fresh buffer for every piece made the kernel fault in and zero new pages for each received
/// byte (8 % of a one-hop download's CPU), because the allocator hands freed memory back to the
/// system at once (which keeps the peak RSS low).
#[derive(Clone, Default)]
struct BufferPool {
    free: Arc<Mutex<Vec<BytesMut>>>,
}

impl BufferPool {
    /// An empty buffer for at least `len` bytes.
    fn take(&self, len: usize) -> BytesMut {
        let reused = self.free.lock().ok().and_then(|mut free| {
            let at = free.iter().position(|b| b.capacity() >= len)?;
            Some(free.swap_remove(at))
        });
        reused.unwrap_or_else(|| BytesMut::with_capacity(len))
    }

    /// Keeps `bytes`' buffer if nothing else holds it and the pool has room.
    fn give(&self, bytes: Bytes) {
        let Ok(mut b) = bytes.try_into_mut() else {
            return;
        };
        b.clear();
        if let Ok(mut free) = self.free.lock() {
            let held: usize = free.iter().map(BytesMut::capacity).sum();
            if held + b.capacity() <= POOL_BYTES {
                free.push(b);
            }
        }
    }
}

impl DataClient {
    /// A client with `download.read_timeout`'s default and no rate limit.
    pub fn new(local_peer: PeerId) -> DataClient {
        DataClient {
            local_peer: local_peer.to_bytes(),
            idle: Arc::default(),
            read_timeout: crate::config::DownloadConfig::default().read_timeout,
            limit: Limiter::default(),
            task_limit: Limiter::default(),
            buffers: BufferPool::default(),
        }
    }

    /// Gives a fetched piece's buffer back once its bytes are stored, for a later fetch.
    pub fn recycle(&self, bytes: Bytes) {
        self.buffers.give(bytes);
    }

    /// Gives up on a request when the source sends nothing for `d`.
    pub fn with_read_timeout(mut self, d: Duration) -> DataClient {
        self.read_timeout = d;
        self
    }

    /// Draws every byte received from `limit`.
    pub fn with_limit(mut self, limit: Limiter) -> DataClient {
        self.limit = limit;
        self
    }

    /// Also draws every byte received from a task's own bucket (the connection pool is shared).
    pub fn with_task_limit(mut self, limit: Limiter) -> DataClient {
        self.task_limit = limit;
        self
    }

    /// Runs `io` unless the source stays silent for the read timeout.
    async fn within<T>(
        &self,
        io: impl std::future::Future<Output = std::io::Result<T>>,
    ) -> Result<T, FetchError> {
        match tokio::time::timeout(self.read_timeout, io).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(FetchError::Stalled(self.read_timeout)),
        }
    }

    fn take_idle(&self, addr: SocketAddr) -> Option<TcpStream> {
        self.idle.lock().ok()?.get_mut(&addr)?.pop()
    }

    fn put_idle(&self, addr: SocketAddr, s: TcpStream) {
        if let Ok(mut idle) = self.idle.lock() {
            let v = idle.entry(addr).or_default();
            if v.len() < MAX_IDLE_PER_ADDR {
                v.push(s);
            }
        }
    }

    /// Drops pooled connections to `addr` (after the source misbehaved or vanished).
    pub fn forget(&self, addr: SocketAddr) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.remove(&addr);
        }
    }

    /// Opens a connection to `addr` and runs the `DFX2` handshake with `grant`.
    async fn connect(&self, addr: SocketAddr, grant: &Grant) -> Result<TcpStream, FetchError> {
        let mut s = match tokio::time::timeout(self.read_timeout, TcpStream::connect(addr)).await {
            Ok(r) => r.map_err(|e| FetchError::Connect(addr, e))?,
            Err(_) => return Err(FetchError::Stalled(self.read_timeout)),
        };
        let _ = s.set_nodelay(true);
        let mut challenge = [0u8; CHALLENGE_LEN];
        self.within(s.read_exact(&mut challenge)).await?;
        let nonce = transfer::decode_challenge(&challenge)?;
        let hello = transfer::encode_handshake(&self.local_peer, grant, &nonce)?;
        self.within(s.write_all(&hello)).await?;
        let mut status = [0u8; 1];
        self.within(s.read_exact(&mut status)).await?;
        match HandshakeStatus::from_byte(status[0])? {
            HandshakeStatus::Accepted => Ok(s),
            HandshakeStatus::Denied => Err(FetchError::Denied(addr)),
            HandshakeStatus::Busy => Err(FetchError::Busy),
        }
    }

    /// Fetches one piece of `expected_len` bytes, within `timeout`.
    pub async fn fetch(
        &self,
        addr: SocketAddr,
        grant: &Grant,
        task: &TaskKey,
        index: u32,
        expected_len: u32,
        timeout: Duration,
    ) -> Result<Bytes, FetchError> {
        tokio::time::timeout(timeout, async {
            // A pooled connection may have been closed by the server meanwhile (idle, or its grant
            // expired): retry once fresh.
            if let Some(s) = self.take_idle(addr)
                && let Ok(b) = self.fetch_on(addr, s, task, index, expected_len).await
            {
                return Ok(b);
            }
            let s = self.connect(addr, grant).await?;
            self.fetch_on(addr, s, task, index, expected_len).await
        })
        .await
        .map_err(|_| FetchError::Timeout)?
    }

    async fn fetch_on(
        &self,
        addr: SocketAddr,
        mut s: TcpStream,
        task: &TaskKey,
        index: u32,
        expected_len: u32,
    ) -> Result<Bytes, FetchError> {
        let request = transfer::encode_request(&task.to_bytes(), index)?;
        self.within(s.write_all(&request)).await?;
        let mut head = [0u8; RESPONSE_HEADER_LEN];
        self.within(s.read_exact(&mut head)).await?;
        let (status, len) = transfer::decode_response_header(&head)?;
        match status {
            PieceStatus::Ok => {}
            other => {
                self.put_idle(addr, s);
                return Err(match other {
                    PieceStatus::NotFound => FetchError::NotFound,
                    PieceStatus::Busy => FetchError::Busy,
                    _ => FetchError::SourceError,
                });
            }
        }
        if len != expected_len {
            return Err(FetchError::WrongLength {
                expected: expected_len,
                got: len,
            });
        }
        let len = len as usize;
        let mut buf = self.buffers.take(len);
        let step = self.limit.step(self.task_limit.step(len));
        // Wake for the body only once a batch of it is queued, not for every segment: on a
        // paced link (100 Mbit/s delivers a segment every 120 µs) each wake-up of a task costs
        // more CPU than copying the segment. The last part of the body waits for all of it.
        let mut low_water = LOW_WATER.min(len);
        set_recv_low_water(&s, low_water);
        while buf.len() < len {
            let left = len - buf.len();
            if left < low_water {
                low_water = left;
                set_recv_low_water(&s, low_water);
            }
            let want = left.min(step);
            let mut room = (&mut buf).limit(want);
            let n = match tokio::time::timeout(self.read_timeout, s.read_buf(&mut room)).await {
                Ok(r) => r?,
                // Bytes are queued but fewer than the low-water mark: the source is slow (a low
                // upload limit), not silent. Wake for every byte from now on.
                Err(_) if queued_bytes(&s) > 0 => {
                    low_water = 1;
                    set_recv_low_water(&s, low_water);
                    continue;
                }
                Err(_) => return Err(FetchError::Stalled(self.read_timeout)),
            };
            if n == 0 {
                return Err(FetchError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            self.limit.take(n).await;
            self.task_limit.take(n).await;
        }
        // A pooled connection's next response header must wake its reader at once.
        set_recv_low_water(&s, 1);
        self.put_idle(addr, s);
        Ok(buf.freeze())
    }
}

/// Bytes received on the socket and not read yet (`FIONREAD`); 0 when that cannot be told.
#[allow(unsafe_code)]
fn queued_bytes(s: &TcpStream) -> usize {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: the descriptor is the stream's open socket, and FIONREAD writes one c_int.
    let r = unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &raw mut n) };
    if r == 0 {
        usize::try_from(n).unwrap_or(0)
    } else {
        0
    }
}

/// Bytes of a piece body queued in the kernel before its reader is woken (`SO_RCVLOWAT`).
const LOW_WATER: usize = 128 << 10;

/// Sets the socket's receive low-water mark (`SO_RCVLOWAT`): epoll reports it readable, and the
/// kernel wakes its reader, only once `bytes` are queued (or the peer closed it). A failure only
/// costs wake-ups, so it is ignored.
#[allow(unsafe_code)]
fn set_recv_low_water(s: &TcpStream, bytes: usize) {
    use std::os::fd::AsRawFd;
    let value = libc::c_int::try_from(bytes.max(1)).unwrap_or(libc::c_int::MAX);
    // SAFETY: the descriptor is the stream's open socket, and the option value is a c_int of
    // the length passed.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw const value).cast::<libc::c_void>(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_chunks_are_reused_and_the_pool_stays_bounded() {
        let pool = ChunkPool::default();
        let first = pool.take(1000);
        let at = first.as_ptr();
        pool.give(first);
        let again = pool.take(800);
        assert_eq!((again.as_ptr(), again.len()), (at, 800));
        for _ in 0..20 {
            pool.give(vec![1; 10]);
        }
        assert_eq!(pool.free.lock().unwrap().len(), MAX_POOLED_CHUNKS);
    }

    #[test]
    fn a_given_back_buffer_is_reused_and_the_pool_stays_bounded() {
        let pool = BufferPool::default();
        let mut b = pool.take(1 << 20);
        b.extend_from_slice(&[7u8; 1 << 20]);
        let at = b.as_ptr();
        pool.give(b.freeze());
        // The same memory comes back, empty, also for a shorter piece.
        let again = pool.take(1000);
        assert_eq!(again.as_ptr(), at);
        assert!(again.is_empty());
        // A buffer something else still holds is not taken.
        let shared = Bytes::from(vec![1u8; 4096]);
        let other = shared.clone();
        pool.give(shared);
        assert!(pool.free.lock().unwrap().is_empty());
        drop(other);
        // Never more than POOL_BYTES kept.
        for _ in 0..(POOL_BYTES / (4 << 20)) + 3 {
            pool.give(Bytes::from(vec![0u8; 4 << 20]));
        }
        let held: usize = pool
            .free
            .lock()
            .unwrap()
            .iter()
            .map(BytesMut::capacity)
            .sum();
        assert!(held <= POOL_BYTES && held > 0, "{held}");
    }
}
