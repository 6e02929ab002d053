//! Production: fetching a task's pieces from its origin, hashing and storing them.
//!
//! With range support, pieces are fetched with range requests, `origin.concurrency` in flight,
//! started in index order; each transient failure is retried with backoff. Without range support the
//! body is read once, in order, and cut into pieces (a failure re-reads from the start, skipping
//! pieces already stored). Every finished piece is reported to the task's runner, which signs and
//! announces it. Memory: at most `concurrency` pieces are buffered, fewer when they would exceed
//! `download.max_inflight_bytes`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use df_protocols::limits::MIN_PIECE_LENGTH;
use df_protocols::manifest::Validators;
use df_protocols::piece::{PieceHash, PieceLayout};
use df_protocols::task::TaskKey;
use futures::{StreamExt, stream};
use tokio::sync::mpsc;

use super::{RunnerMsg, TaskContext};
use crate::origin::{ByteStream, OriginError, OriginSpec};
use crate::store::StoreError;

/// Why producing a piece failed.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum ProduceError {
    #[error(transparent)]
    Origin(#[from] OriginError),
    #[error("origin sent different bytes for piece {0} than the swarm's hash: content changed")]
    HashMismatch(u32),
    #[error("{0}")]
    Store(String),
}

impl From<StoreError> for ProduceError {
    fn from(e: StoreError) -> Self {
        ProduceError::Store(e.to_string())
    }
}

/// The open request's body: the first `len` bytes of piece `index` (the whole content, from
/// piece 0, when the origin ignores ranges).
pub(crate) struct FirstBody {
    pub index: u32,
    pub len: u64,
    pub body: ByteStream,
}

pub(crate) struct ProductionJob {
    pub ctx: Arc<TaskContext>,
    /// The task's own bucket (`limit_rate`), drawn beside the node's origin bucket.
    pub task_limit: crate::limits::Limiter,
    pub key: TaskKey,
    pub spec: OriginSpec,
    pub layout: PieceLayout,
    pub validators: Validators,
    /// Pieces to produce, ascending.
    pub pieces: Vec<u32>,
    /// Hashes the swarm already has for some of them: the origin's bytes must match.
    pub known: HashMap<u32, PieceHash>,
    pub ranged: bool,
    pub tx: mpsc::UnboundedSender<RunnerMsg>,
}

/// How many of the content's first bytes are fetched again at the end of a ranged production
/// from an origin without validators.
const HEAD_CHECK_BYTES: usize = 64 << 10;

async fn collect(
    mut body: ByteStream,
    len: usize,
    read_timeout: Duration,
    limits: [&crate::limits::Limiter; 2],
) -> Result<BytesMut, OriginError> {
    let mut buf = BytesMut::with_capacity(len);
    loop {
        let next = tokio::time::timeout(read_timeout, body.next())
            .await
            .map_err(|_| OriginError::Body(format!("no data for {}s", read_timeout.as_secs())))?;
        match next {
            Some(Ok(chunk)) => {
                if buf.len() + chunk.len() > len {
                    return Err(OriginError::Protocol(format!(
                        "origin sent more than the {len} bytes asked for"
                    )));
                }
                buf.extend_from_slice(&chunk);
                for l in limits {
                    l.take(chunk.len()).await;
                }
            }
            Some(Err(e)) => return Err(e),
            None => break,
        }
    }
    if buf.len() != len {
        return Err(OriginError::Body(format!(
            "origin sent {} of {len} bytes",
            buf.len()
        )));
    }
    Ok(buf)
}

impl ProductionJob {
    /// Range requests in flight: `origin.concurrency`, fewer for pieces so large that they would
    /// buffer more than `download.max_inflight_bytes`.
    fn concurrency(&self) -> usize {
        let cfg = &self.ctx.config;
        cfg.origin
            .concurrency
            .clamp(1, cfg.download.pieces_in_flight(self.layout.piece_length))
    }

    /// Produces the pieces; `first` is the open response's body.
    pub(crate) async fn run(mut self, first: FirstBody) {
        if self.ranged {
            self.run_ranged(first).await;
        } else {
            self.run_sequential(first.body).await;
        }
        let _ = self.tx.send(RunnerMsg::ProductionDone);
    }

    async fn store_piece(&self, index: u32, data: Bytes) -> Result<PieceHash, ProduceError> {
        let store = self.ctx.store.clone();
        let key = self.key;
        let expected = self.known.get(&index).copied();
        tokio::task::spawn_blocking(move || {
            let hash = PieceHash::of(&data);
            if expected.is_some_and(|e| e != hash) {
                return Err(ProduceError::HashMismatch(index));
            }
            store.put_piece(&key, index, &data)?;
            Ok(hash)
        })
        .await
        .map_err(|e| ProduceError::Store(e.to_string()))?
    }

    fn report(&self, index: u32, result: Result<PieceHash, ProduceError>) {
        let len = self.layout.piece_len(index);
        let _ = self.tx.send(RunnerMsg::Produced { index, len, result });
    }

    async fn fetch_range_with_retries(
        &self,
        start: u64,
        end: u64,
    ) -> Result<BytesMut, OriginError> {
        let cfg = &self.ctx.config.origin;
        let mut attempt = 0;
        loop {
            let res = async {
                let body = self
                    .ctx
                    .origin
                    .range(
                        &self.spec,
                        start..end,
                        self.layout.content_length,
                        &self.validators,
                    )
                    .await?;
                collect(
                    body,
                    (end - start) as usize,
                    cfg.read_timeout,
                    [&self.ctx.origin_limit, &self.task_limit],
                )
                .await
            }
            .await;
            match res {
                Ok(b) => return Ok(b),
                Err(e) if e.is_transient() && attempt < cfg.retries => {
                    attempt += 1;
                    let backoff = Duration::from_millis(200 * (1 << attempt.min(5)));
                    tracing::debug!(task = %self.key, start, error = %e, attempt, "retrying origin range");
                    tokio::time::sleep(backoff).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn produce_piece(
        &self,
        index: u32,
        first: Option<FirstBody>,
    ) -> Result<PieceHash, ProduceError> {
        let range = self.layout.piece_range(index);
        let mut head = BytesMut::new();
        if let Some(first) = first {
            let first_len = first.len.min(range.end - range.start) as usize;
            match collect(
                first.body,
                first_len,
                self.ctx.config.origin.read_timeout,
                [&self.ctx.origin_limit, &self.task_limit],
            )
            .await
            {
                Ok(b) => {
                    self.ctx.metrics.add_from_origin(b.len() as u64);
                    head = b;
                }
                Err(e) => {
                    tracing::debug!(task = %self.key, error = %e, "first origin response failed; refetching")
                }
            }
        }
        let start = range.start + head.len() as u64;
        let data = if start < range.end {
            let rest = self.fetch_range_with_retries(start, range.end).await?;
            self.ctx.metrics.add_from_origin(rest.len() as u64);
            if head.is_empty() {
                rest
            } else {
                head.extend_from_slice(&rest);
                head
            }
        } else {
            head
        };
        self.store_piece(index, data.freeze()).await
    }

    /// Whether the origin named a version (a strong ETag or a Last-Modified) that every range
    /// request is checked against (`If-Range`).
    fn has_validators(&self) -> bool {
        self.validators
            .etag
            .as_ref()
            .is_some_and(|e| !e.starts_with("W/"))
            || self.validators.last_modified.is_some()
    }

    /// Fetches the content's first bytes again and compares them with the stored piece 0: an
    /// origin without validators whose file was replaced (same length) would otherwise give a
    /// task made of two versions. Skipped when this node does not hold piece 0.
    async fn head_unchanged(&self) -> Result<(), ProduceError> {
        let store = self.ctx.store.clone();
        let key = self.key;
        let stored = tokio::task::spawn_blocking(move || store.piece(&key, 0))
            .await
            .map_err(|e| ProduceError::Store(e.to_string()))??;
        let Some(stored) = stored else {
            return Ok(());
        };
        let n = stored.len().min(HEAD_CHECK_BYTES);
        if n == 0 {
            return Ok(());
        }
        let now = self.fetch_range_with_retries(0, n as u64).await?;
        self.ctx.metrics.add_from_origin(now.len() as u64);
        if now[..] != stored[..n] {
            return Err(OriginError::Changed(
                "origin content changed during the download (its first bytes differ now, and it \
                 sends no ETag or Last-Modified to tell versions apart)"
                    .into(),
            )
            .into());
        }
        Ok(())
    }

    async fn run_ranged(&mut self, first: FirstBody) {
        let mut first = Some(first);
        let pieces = std::mem::take(&mut self.pieces);
        let total = pieces.len();
        let this = &*self;
        let jobs = pieces.into_iter().map(|index| {
            let first = if first.as_ref().is_some_and(|f| f.index == index) {
                first.take()
            } else {
                None
            };
            async move { (index, this.produce_piece(index, first).await) }
        });
        let mut results = stream::iter(jobs).buffer_unordered(self.concurrency());
        let mut done = 0;
        while let Some((index, mut result)) = results.next().await {
            done += 1;
            if done == total
                && result.is_ok()
                && this.layout.piece_count() > 1
                && !this.has_validators()
            {
                // Before the last piece completes the task: nothing tells whether the origin
                // changed while the pieces were fetched, but its first bytes must still match.
                if let Err(e) = this.head_unchanged().await {
                    result = Err(e);
                }
            }
            let failed = result.is_err();
            self.report(index, result);
            if failed {
                // One piece failing for good fails the production; the runner decides what next.
                return;
            }
        }
    }

    async fn run_sequential(&mut self, body: ByteStream) {
        let wanted: std::collections::BTreeSet<u32> = self.pieces.iter().copied().collect();
        let mut body = Some(body);
        let mut attempt = 0;
        let mut next_index = 0u32;
        let count = self.layout.piece_count();
        while next_index < count {
            let stream = match body.take() {
                Some(s) => s,
                None => match self
                    .ctx
                    .origin
                    .open(&self.spec, 0..u64::from(MIN_PIECE_LENGTH))
                    .await
                {
                    Ok(resp) => resp.body,
                    Err(e) => {
                        self.report(next_index, Err(e.into()));
                        return;
                    }
                },
            };
            match self.read_sequential(stream, &mut next_index, &wanted).await {
                Ok(()) => break,
                Err(ProduceError::Origin(e))
                    if e.is_transient() && attempt < self.ctx.config.origin.retries =>
                {
                    attempt += 1;
                    tracing::debug!(task = %self.key, error = %e, "origin body failed; re-reading from the start");
                    tokio::time::sleep(Duration::from_millis(200 * (1 << attempt.min(5)))).await;
                }
                Err(e) => {
                    self.report(next_index, Err(e));
                    return;
                }
            }
        }
    }

    /// Reads a whole-content body, producing pieces from `*next` on (earlier ones are skipped).
    async fn read_sequential(
        &self,
        mut body: ByteStream,
        next: &mut u32,
        wanted: &std::collections::BTreeSet<u32>,
    ) -> Result<(), ProduceError> {
        let read_timeout = self.ctx.config.origin.read_timeout;
        let count = self.layout.piece_count();
        let mut offset = 0u64;
        let mut buf = BytesMut::new();
        while *next < count {
            let range = self.layout.piece_range(*next);
            let piece_len = (range.end - range.start) as usize;
            while buf.len() < piece_len {
                let chunk = tokio::time::timeout(read_timeout, body.next())
                    .await
                    .map_err(|_| OriginError::Body("origin stalled".into()))?;
                match chunk {
                    Some(Ok(c)) => {
                        // Skip bytes of pieces produced before a restart.
                        let skip = (range.start.saturating_sub(offset) as usize).min(c.len());
                        offset += c.len() as u64;
                        self.ctx.metrics.add_from_origin(c.len() as u64);
                        buf.extend_from_slice(&c[skip..]);
                        self.ctx.origin_limit.take(c.len()).await;
                        self.task_limit.take(c.len()).await;
                    }
                    Some(Err(e)) => return Err(e.into()),
                    None => {
                        return Err(OriginError::Protocol(format!(
                            "origin body ended at {} of {} bytes",
                            offset, self.layout.content_length
                        ))
                        .into());
                    }
                }
            }
            let rest = buf.split_off(piece_len);
            let piece = std::mem::replace(&mut buf, rest).freeze();
            if wanted.contains(next) {
                let r = self.store_piece(*next, piece).await;
                let failed = r.is_err();
                self.report(*next, r);
                if failed {
                    return Ok(());
                }
            }
            *next += 1;
        }
        Ok(())
    }
}
