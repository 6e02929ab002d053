//! The data plane (wire format in [`df_protocols::transfer`]): a TCP server that serves stored
//! pieces to peers holding an access token, and a client with a per-address connection pool.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use df_protocols::task::TaskKey;
use df_protocols::transfer::{
    self, AccessToken, HANDSHAKE_ACCEPTED, HANDSHAKE_DENIED, MAGIC, PieceStatus, TOKEN_LEN,
    TransferError,
};
use hmac::{KeyInit, Mac};
use libp2p::PeerId;
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::UploadConfig;
use crate::gc::Activity;
use crate::metrics::Metrics;
use crate::store::PieceStore;

type HmacSha256 = hmac::Hmac<Sha256>;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_IDLE_PER_ADDR: usize = 8;

/// Issues and checks data-plane access tokens: `HMAC-SHA256(secret, requester peer ID)`.
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

    fn mac(&self) -> HmacSha256 {
        // HMAC accepts keys of any length.
        match <HmacSha256 as KeyInit>::new_from_slice(&self.secret) {
            Ok(m) => m,
            Err(_) => unreachable!("HMAC takes keys of any length"),
        }
    }

    pub fn token_for(&self, peer: &PeerId) -> AccessToken {
        let mut mac = self.mac();
        mac.update(&peer.to_bytes());
        AccessToken(mac.finalize().into_bytes().into())
    }

    fn check(&self, peer_bytes: &[u8], token: &[u8]) -> bool {
        let mut mac = self.mac();
        mac.update(peer_bytes);
        mac.verify_slice(token).is_ok()
    }
}

/// One upload of a piece in progress; released on drop.
struct PieceSlot {
    map: Arc<Mutex<HashMap<(TaskKey, u32), usize>>>,
    key: (TaskKey, u32),
}

impl PieceSlot {
    fn take(
        map: &Arc<Mutex<HashMap<(TaskKey, u32), usize>>>,
        key: (TaskKey, u32),
        max: usize,
    ) -> Option<PieceSlot> {
        let mut m = map.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(key).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(PieceSlot {
            map: map.clone(),
            key,
        })
    }
}

impl Drop for PieceSlot {
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

/// Serves pieces from the store.
pub struct DataServer {
    listener: TcpListener,
    store: PieceStore,
    tokens: TokenIssuer,
    permits: Arc<Semaphore>,
    /// Uploads in progress per (task, piece), capped at `per_piece`.
    uploading: Arc<Mutex<HashMap<(TaskKey, u32), usize>>>,
    per_piece: usize,
    idle_timeout: Duration,
    metrics: Arc<Metrics>,
    activity: Arc<Activity>,
    corrupt: bool,
}

impl DataServer {
    pub fn new(
        listener: TcpListener,
        store: PieceStore,
        tokens: TokenIssuer,
        upload: &UploadConfig,
        metrics: Arc<Metrics>,
        activity: Arc<Activity>,
        corrupt: bool,
    ) -> DataServer {
        DataServer {
            listener,
            store,
            tokens,
            permits: Arc::new(Semaphore::new(upload.max_concurrent.max(1))),
            uploading: Arc::new(Mutex::new(HashMap::new())),
            per_piece: upload.max_per_piece.max(1),
            idle_timeout: upload.idle_timeout,
            metrics,
            activity,
            corrupt,
        }
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
                    let _ = stream.set_nodelay(true);
                    let this = this.clone();
                    let shutdown = shutdown.clone();
                    tokio::spawn(async move {
                        tokio::select! {
                            _ = shutdown.cancelled() => {}
                            r = this.serve_connection(stream) => if let Err(e) = r {
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

    async fn serve_connection(&self, mut stream: TcpStream) -> Result<(), ServeError> {
        let peer = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.handshake(&mut stream))
            .await
            .map_err(|_| ServeError::Timeout)??;
        loop {
            let mut n = [0u8; 1];
            match tokio::time::timeout(self.idle_timeout, stream.read_exact(&mut n)).await {
                Err(_) => return Ok(()),
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Ok(r) => r?,
            };
            let n = transfer::check_task_key_len(n[0])?;
            let mut key = vec![0u8; n + 4];
            stream.read_exact(&mut key).await?;
            let index = u32::from_be_bytes([key[n], key[n + 1], key[n + 2], key[n + 3]]);
            let Ok(task) = TaskKey::from_bytes(&key[..n]) else {
                stream
                    .write_all(&transfer::encode_response_header(PieceStatus::NotFound, 0))
                    .await?;
                continue;
            };
            let (Ok(_permit), Some(_slot)) = (
                self.permits.clone().try_acquire_owned(),
                PieceSlot::take(&self.uploading, (task, index), self.per_piece),
            ) else {
                stream
                    .write_all(&transfer::encode_response_header(PieceStatus::Busy, 0))
                    .await?;
                continue;
            };
            let store = self.store.clone();
            let piece = tokio::task::spawn_blocking(move || store.piece(&task, index))
                .await
                .map_err(|e| ServeError::Io(std::io::Error::other(e)))?;
            match piece {
                Ok(Some(mut data)) => {
                    if self.corrupt && !data.is_empty() {
                        data[0] ^= 0xff;
                    }
                    let len = data.len() as u32;
                    stream
                        .write_all(&transfer::encode_response_header(PieceStatus::Ok, len))
                        .await?;
                    stream.write_all(&data).await?;
                    self.metrics.add_uploaded(data.len() as u64);
                    self.activity.touch(&task);
                    tracing::trace!(%peer, %task, index, "served piece");
                }
                Ok(None) => {
                    stream
                        .write_all(&transfer::encode_response_header(PieceStatus::NotFound, 0))
                        .await?;
                }
                Err(e) => {
                    tracing::warn!(%task, index, error = %e, "reading piece failed");
                    stream
                        .write_all(&transfer::encode_response_header(PieceStatus::Error, 0))
                        .await?;
                }
            }
        }
    }

    async fn handshake(&self, stream: &mut TcpStream) -> Result<PeerId, ServeError> {
        let mut head = [0u8; 5];
        stream.read_exact(&mut head).await?;
        if &head[..4] != MAGIC {
            return Err(TransferError::BadMagic.into());
        }
        let n = transfer::check_peer_id_len(head[4])?;
        let mut rest = vec![0u8; n + TOKEN_LEN];
        stream.read_exact(&mut rest).await?;
        let (peer_bytes, token) = rest.split_at(n);
        let peer = PeerId::from_bytes(peer_bytes).ok();
        match peer {
            Some(peer) if self.tokens.check(peer_bytes, token) => {
                stream.write_all(&[HANDSHAKE_ACCEPTED]).await?;
                Ok(peer)
            }
            _ => {
                let _ = stream.write_all(&[HANDSHAKE_DENIED]).await;
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
    #[error("handshake timed out")]
    Timeout,
    #[error("access token rejected")]
    Denied,
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
}

/// Fetches pieces, reusing connections per address.
#[derive(Clone)]
pub struct DataClient {
    local_peer: Vec<u8>,
    idle: Arc<Mutex<HashMap<SocketAddr, Vec<TcpStream>>>>,
}

impl DataClient {
    pub fn new(local_peer: PeerId) -> DataClient {
        DataClient {
            local_peer: local_peer.to_bytes(),
            idle: Arc::default(),
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

    async fn connect(
        &self,
        addr: SocketAddr,
        token: &AccessToken,
    ) -> Result<TcpStream, FetchError> {
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(|e| FetchError::Connect(addr, e))?;
        let _ = s.set_nodelay(true);
        s.write_all(&transfer::encode_handshake(&self.local_peer, token)?)
            .await?;
        let mut status = [0u8; 1];
        s.read_exact(&mut status).await?;
        if status[0] != HANDSHAKE_ACCEPTED {
            return Err(FetchError::Denied(addr));
        }
        Ok(s)
    }

    /// Fetches one piece of `expected_len` bytes, within `timeout`.
    pub async fn fetch(
        &self,
        addr: SocketAddr,
        token: &AccessToken,
        task: &TaskKey,
        index: u32,
        expected_len: u32,
        timeout: Duration,
    ) -> Result<Bytes, FetchError> {
        tokio::time::timeout(timeout, async {
            // A pooled connection may have been closed by the server meanwhile: retry once fresh.
            if let Some(s) = self.take_idle(addr)
                && let Ok(b) = self.fetch_on(addr, s, task, index, expected_len).await
            {
                return Ok(b);
            }
            let s = self.connect(addr, token).await?;
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
        s.write_all(&transfer::encode_request(&task.to_bytes(), index)?)
            .await?;
        let mut head = [0u8; 5];
        s.read_exact(&mut head).await?;
        let (status, len) = transfer::decode_response_header(head)?;
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
        let mut buf = BytesMut::with_capacity(len);
        while buf.len() < len {
            let want = len - buf.len();
            let n = s.read_buf(&mut (&mut buf).limit(want)).await?;
            if n == 0 {
                return Err(FetchError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
        self.put_idle(addr, s);
        Ok(buf.freeze())
    }
}
