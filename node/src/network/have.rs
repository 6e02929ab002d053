//! Direct haves on `/df/have/1` (the wire format is [`df_protocols::have`]).
//!
//! Sending: [`HaveWriters`], owned by the event loop, keeps one queue per peer and a task that opens
//! one stream to that peer and writes what is queued, coalescing what piled up into one write. The
//! task closes its stream after [`IDLE`] without a have (the connection can then idle out) and when
//! a write does not drain within [`WRITE_TIMEOUT`]; the next have opens a new one. A full queue drops
//! the have: haves are hints (the task's first and last go by gossip too, and a probe answers with
//! the whole bitfield).
//!
//! Receiving: one task per stream a peer opened, at most [`MAX_STREAMS_PER_PEER`] per peer and
//! [`MAX_STREAMS`] in all. A frame's length is checked before its body is read, the body must
//! arrive within [`FRAME_TIMEOUT`], a stream silent for [`READ_IDLE`] is closed, and a malformed
//! frame ends the stream. Only members reach this: the connection is authenticated by noise and,
//! in a private swarm, admitted by the swarm key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use df_protocols::have::{HaveFrame, check_length};
use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::{PeerId, Stream, StreamProtocol};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::NetworkEvent;
use crate::metrics::Metrics;

/// A writer closes its stream after this long without a have to send.
const IDLE: Duration = Duration::from_secs(30);
/// How long opening a stream may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one write (all that was queued) may take to drain.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Have frames queued for one peer; more are dropped.
const QUEUE: usize = 64;
/// A write gathers queued frames up to about this many bytes.
const COALESCE: usize = 64 << 10;

/// A reader closes a stream silent for this long (writers close theirs after [`IDLE`]).
const READ_IDLE: Duration = Duration::from_secs(90);
/// How long a frame's body may take once its length arrived.
const FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// Inbound have streams one peer may hold open; more are refused (closed at once).
pub(super) const MAX_STREAMS_PER_PEER: usize = 2;
/// Inbound have streams open in all.
pub(super) const MAX_STREAMS: usize = 1024;

/// The event loop's senders: one queue (and writer task) per peer it sent haves to lately.
pub(super) struct HaveWriters {
    control: libp2p_stream::Control,
    protocol: StreamProtocol,
    queues: HashMap<PeerId, mpsc::Sender<Arc<[u8]>>>,
    metrics: Arc<Metrics>,
}

impl HaveWriters {
    pub(super) fn new(
        control: libp2p_stream::Control,
        protocol: StreamProtocol,
        metrics: Arc<Metrics>,
    ) -> HaveWriters {
        HaveWriters {
            control,
            protocol,
            queues: HashMap::new(),
            metrics,
        }
    }

    /// Queues an encoded frame for `peer`, starting its writer if it has none (or its last one
    /// ended).
    pub(super) fn send(&mut self, peer: PeerId, frame: Arc<[u8]>) {
        let frame = match self.queues.get(&peer).map(|q| q.try_send(frame.clone())) {
            Some(Ok(())) => {
                self.metrics.direct_have("sent");
                return;
            }
            Some(Err(mpsc::error::TrySendError::Full(_))) => {
                tracing::debug!(%peer, "have queue full; dropping a have");
                self.metrics.direct_have("dropped");
                return;
            }
            Some(Err(mpsc::error::TrySendError::Closed(f))) => f,
            None => frame,
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        if tx.try_send(frame).is_ok() {
            self.metrics.direct_have("sent");
        }
        tokio::spawn(write_haves(
            self.control.clone(),
            peer,
            self.protocol.clone(),
            rx,
        ));
        self.queues.insert(peer, tx);
    }

    /// The peer is gone: its writer sends what is queued (if it still can) and ends.
    pub(super) fn forget(&mut self, peer: &PeerId) {
        self.queues.remove(peer);
    }
}

async fn write_haves(
    mut control: libp2p_stream::Control,
    peer: PeerId,
    protocol: StreamProtocol,
    mut rx: mpsc::Receiver<Arc<[u8]>>,
) {
    let mut stream =
        match tokio::time::timeout(OPEN_TIMEOUT, control.open_stream(peer, protocol)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "cannot open a have stream");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "opening a have stream timed out");
                return;
            }
        };
    let mut buf = Vec::new();
    loop {
        let first = match tokio::time::timeout(IDLE, rx.recv()).await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            // Idle: take no more (the event loop then starts a new writer), but send what slipped in.
            Err(_) => {
                rx.close();
                match rx.try_recv() {
                    Ok(f) => f,
                    Err(_) => break,
                }
            }
        };
        buf.clear();
        buf.extend_from_slice(&first);
        while buf.len() < COALESCE {
            match rx.try_recv() {
                Ok(f) => buf.extend_from_slice(&f),
                Err(_) => break,
            }
        }
        let wrote = tokio::time::timeout(WRITE_TIMEOUT, async {
            stream.write_all(&buf).await?;
            stream.flush().await
        })
        .await;
        match wrote {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "have stream failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "have stream stalled; closing it");
                return;
            }
        }
    }
    let _ = tokio::time::timeout(WRITE_TIMEOUT, stream.close()).await;
}

/// Inbound have streams open, per peer.
#[derive(Clone, Default)]
pub(super) struct HaveReaders {
    open: Arc<Mutex<HashMap<PeerId, usize>>>,
}

/// One open inbound stream, counted until dropped.
struct ReaderSlot {
    readers: HaveReaders,
    peer: PeerId,
}

impl Drop for ReaderSlot {
    fn drop(&mut self) {
        if let Ok(mut open) = self.readers.open.lock()
            && let Some(n) = open.get_mut(&self.peer)
        {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.peer);
            }
        }
    }
}

impl HaveReaders {
    fn claim(&self, peer: PeerId) -> Option<ReaderSlot> {
        let mut open = self.open.lock().ok()?;
        let total: usize = open.values().sum();
        let n = open.entry(peer).or_insert(0);
        if *n >= MAX_STREAMS_PER_PEER || total >= MAX_STREAMS {
            if *n == 0 {
                open.remove(&peer);
            }
            return None;
        }
        *n += 1;
        Some(ReaderSlot {
            readers: self.clone(),
            peer,
        })
    }

    /// Reads `stream`'s frames and hands each to the node until the stream ends, breaks a rule, or
    /// `shutdown` is cancelled. A stream over the limits is closed at once.
    pub(super) fn accept(
        &self,
        peer: PeerId,
        mut stream: Stream,
        events: mpsc::Sender<NetworkEvent>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) {
        let Some(slot) = self.claim(peer) else {
            tracing::debug!(%peer, "too many have streams; refusing one");
            tokio::spawn(async move {
                let _ = tokio::time::timeout(FRAME_TIMEOUT, stream.close()).await;
            });
            return;
        };
        tokio::spawn(async move {
            let _slot = slot;
            tokio::select! {
                _ = shutdown.cancelled() => {}
                r = read_haves(peer, &mut stream, &events, &metrics) => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "have stream ended");
                    }
                }
            }
        });
    }
}

#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("silent for {0:?}")]
    Idle(Duration),
    #[error("frame body not received within {0:?}")]
    Slow(Duration),
    #[error(transparent)]
    Frame(#[from] df_protocols::have::HaveCodecError),
}

async fn read_haves(
    peer: PeerId,
    stream: &mut Stream,
    events: &mpsc::Sender<NetworkEvent>,
    metrics: &Metrics,
) -> Result<(), ReadError> {
    let mut body = Vec::new();
    loop {
        let mut prefix = [0u8; 4];
        match tokio::time::timeout(READ_IDLE, stream.read_exact(&mut prefix)).await {
            Err(_) => return Err(ReadError::Idle(READ_IDLE)),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(r) => r?,
        }
        let len = check_length(prefix)?;
        body.resize(len, 0);
        tokio::time::timeout(FRAME_TIMEOUT, stream.read_exact(&mut body))
            .await
            .map_err(|_| ReadError::Slow(FRAME_TIMEOUT))??;
        let frame = HaveFrame::decode(&body)?;
        metrics.direct_have("received");
        // As with gossip: a node this far behind drops haves rather than queue without bound.
        if events.try_send(NetworkEvent::Have { peer, frame }).is_err() {
            metrics.direct_have("dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbound_streams_are_bounded_per_peer_and_freed_when_they_end() {
        let readers = HaveReaders::default();
        let (a, b) = (PeerId::random(), PeerId::random());
        let first = readers.claim(a).expect("first stream");
        let second = readers.claim(a).expect("second stream");
        assert!(readers.claim(a).is_none(), "a third stream from one peer");
        let other = readers
            .claim(b)
            .expect("another peer is not limited by the first");
        drop(first);
        let again = readers.claim(a).expect("a slot freed by a stream's end");
        drop((second, other, again));
        assert!(readers.open.lock().expect("lock").is_empty());
    }
}
