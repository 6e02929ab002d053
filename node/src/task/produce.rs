//! Production: fetching a task's pieces from its origin, hashing and storing them.
//!
//! With range support, the pieces to produce are cut into `origin.concurrency` spans of
//! consecutive pieces (fewer when their buffers would exceed `download.max_inflight_bytes`), and
//! each span is streamed with one range request and cut into pieces as its bytes arrive: no gap
//! between requests, no slow start per piece. A transient failure resumes the span at the first
//! byte not yet read, with backoff. Without range support the body is read once, in order, and cut
//! into pieces (a failure re-reads from the start, skipping pieces already stored). Every finished
//! piece is hashed and stored while the next is read, then reported to the task's runner, which
//! signs and announces it. Memory: per span, the piece being read and the one being stored.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
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

/// Why a span's production stopped.
#[derive(Debug)]
enum Halted {
    /// The origin failed; not reported yet (a transient failure may be retried).
    Origin(OriginError),
    /// A piece failed for good and was reported to the runner.
    Reported,
}

/// A finished piece being hashed and stored.
struct Storing {
    index: u32,
    handle: tokio::task::JoinHandle<Result<PieceHash, ProduceError>>,
}

/// Cuts the bytes of a span of consecutive pieces, arriving in order, into pieces.
struct Assembler {
    layout: PieceLayout,
    /// The piece being filled.
    next: u32,
    end: u32,
    buf: BytesMut,
    /// The content offset of the next byte expected.
    offset: u64,
}

impl Assembler {
    fn new(layout: PieceLayout, span: Range<u32>) -> Assembler {
        Assembler {
            layout,
            next: span.start,
            end: span.end,
            buf: BytesMut::new(),
            offset: layout.piece_range(span.start).start,
        }
    }

    /// Takes bytes from `data` until a piece completes (returned) or `data` is used up (None).
    /// Bytes beyond the span's last piece are left in `data`.
    fn feed(&mut self, data: &mut &[u8]) -> Option<(u32, Bytes)> {
        while self.next < self.end && !data.is_empty() {
            let len = self.layout.piece_len(self.next) as usize;
            if self.buf.capacity() < len {
                self.buf.reserve(len - self.buf.len());
            }
            let take = (len - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            *data = &data[take..];
            self.offset += take as u64;
            if self.buf.len() == len {
                let index = self.next;
                self.next += 1;
                return Some((index, self.buf.split().freeze()));
            }
        }
        None
    }
}

/// Cuts ascending piece indexes into spans of consecutive pieces, each at most
/// ceil(count / `streams`) long, so that `streams` requests share the pieces evenly.
fn spans(pieces: &[u32], streams: usize) -> Vec<Range<u32>> {
    let per = pieces.len().div_ceil(streams.max(1)).max(1);
    let mut out = Vec::new();
    let mut i = 0;
    while i < pieces.len() {
        let first = pieces[i];
        let mut n = 1;
        while i + n < pieces.len()
            && n < per
            && u64::from(pieces[i + n]) == u64::from(first) + n as u64
        {
            n += 1;
        }
        out.push(first..first + n as u32);
        i += n;
    }
    out
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

/// The body's next chunk (`None` at its end); a body that sends nothing for `read_timeout`
/// fails.
async fn next_chunk(
    body: &mut ByteStream,
    read_timeout: Duration,
) -> Result<Option<Bytes>, OriginError> {
    tokio::time::timeout(read_timeout, body.next())
        .await
        .map_err(|_| OriginError::Body(format!("no data for {}s", read_timeout.as_secs())))?
        .transpose()
}

/// The pause before retry `attempt` (1, 2, …) of a transient origin failure.
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(200 * (1 << attempt.min(5)))
}

async fn collect(
    mut body: ByteStream,
    len: usize,
    read_timeout: Duration,
    limits: [&crate::limits::Limiter; 2],
) -> Result<BytesMut, OriginError> {
    let mut buf = BytesMut::with_capacity(len);
    while let Some(chunk) = next_chunk(&mut body, read_timeout).await? {
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
    if buf.len() != len {
        return Err(OriginError::Body(format!(
            "origin sent {} of {len} bytes",
            buf.len()
        )));
    }
    Ok(buf)
}

impl ProductionJob {
    /// Range requests in flight: `origin.concurrency`, fewer for pieces so large that their
    /// buffers (two pieces per stream: one read, one stored) would exceed
    /// `download.max_inflight_bytes`.
    fn concurrency(&self) -> usize {
        let cfg = &self.ctx.config;
        let by_memory = (cfg.download.pieces_in_flight(self.layout.piece_length) / 2).max(1);
        cfg.origin.concurrency.clamp(1, by_memory)
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
        self.spawn_store(index, data)
            .handle
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
                let body = self.range_body(start, end).await?;
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
                    tracing::debug!(task = %self.key, start, error = %e, attempt, "retrying origin range");
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err(e) => return Err(e),
            }
        }
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
        let pieces = std::mem::take(&mut self.pieces);
        let streams = self.concurrency();
        let done = AtomicUsize::new(0);
        let (this, done, total) = (&*self, &done, pieces.len());
        let mut spans = spans(&pieces, streams);
        // The open response's body goes to the span it starts, which goes first. The other spans
        // start once those bytes are in: sharing the link with them from the start would slow the
        // first piece, which the swarm waits for.
        let (head_in, head_in_rx) = tokio::sync::watch::channel(false);
        let mut first = match spans.iter().position(|s| s.start == first.index) {
            Some(i) => {
                spans[..=i].rotate_right(1);
                Some((first, Some(head_in)))
            }
            None => {
                let _ = head_in.send(true);
                None
            }
        };
        let jobs = spans.into_iter().map(|span| {
            let head = first.take_if(|(f, _)| f.index == span.start);
            let mut wait = head.is_none().then(|| head_in_rx.clone());
            async move {
                if let Some(w) = &mut wait {
                    // An error means the head's span ended early (its sender dropped): go on.
                    let _ = w.wait_for(|&v| v).await;
                }
                this.produce_span(span, head, done, total).await
            }
        });
        let mut results = stream::iter(jobs).buffer_unordered(streams);
        while let Some(r) = results.next().await {
            if r.is_err() {
                // One piece failing for good fails the production; the runner decides what next.
                return;
            }
        }
    }

    /// Produces the pieces of `span` from one range request (more after transient failures, each
    /// resuming at the first byte not yet read), storing each piece while the next is read.
    /// `head`, the open response's body, starts at the span's first byte.
    async fn produce_span(
        &self,
        span: Range<u32>,
        head: Option<(FirstBody, Option<tokio::sync::watch::Sender<bool>>)>,
        done: &AtomicUsize,
        total: usize,
    ) -> Result<(), Halted> {
        let start = self.layout.piece_range(span.start).start;
        let end = self.layout.piece_range(span.end - 1).end;
        let mut asm = Assembler::new(self.layout, span);
        let mut storing = None;
        if let Some((head, head_in)) = head {
            // Then the rest on the same (kept-alive) connection: asking for it while the head
            // arrives would halve the first piece's rate.
            let head_end = (start + head.len).min(end);
            let read = self
                .pump(head.body, head_end, &mut asm, &mut storing, done, total)
                .await;
            if let Some(tx) = head_in {
                let _ = tx.send(true);
            }
            match read {
                Ok(()) => {}
                Err(Halted::Origin(e)) => {
                    tracing::debug!(task = %self.key, error = %e, "first origin response broke; fetching its rest again")
                }
                Err(h) => return Err(h),
            }
        }
        let mut attempt = 0;
        let mut failed_at = None;
        while asm.offset < end {
            let body = self.range_body(asm.offset, end).await;
            let res = match body {
                Ok(body) => {
                    self.pump(body, end, &mut asm, &mut storing, done, total)
                        .await
                }
                Err(e) => Err(Halted::Origin(e)),
            };
            match res {
                Ok(()) => {}
                Err(Halted::Origin(e)) => {
                    if failed_at != Some(asm.offset) {
                        // Bytes arrived since the last failure: a fresh set of retries.
                        attempt = 0;
                    }
                    failed_at = Some(asm.offset);
                    if !e.is_transient() || attempt >= self.ctx.config.origin.retries {
                        self.settle(&mut storing, done, total).await?;
                        self.report(asm.next, Err(e.into()));
                        return Err(Halted::Reported);
                    }
                    attempt += 1;
                    tracing::debug!(task = %self.key, offset = asm.offset, error = %e, attempt, "resuming origin range");
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err(h) => return Err(h),
            }
        }
        self.settle(&mut storing, done, total).await
    }

    /// A range request's body for bytes `start..end` of the content.
    async fn range_body(&self, start: u64, end: u64) -> Result<ByteStream, OriginError> {
        self.ctx
            .origin
            .range(
                &self.spec,
                start..end,
                self.layout.content_length,
                &self.validators,
            )
            .await
    }

    /// Reads `body` until the assembler reaches content byte `upto`, storing each completed piece
    /// (the one before is settled first: one piece is stored while the next is read).
    async fn pump(
        &self,
        mut body: ByteStream,
        upto: u64,
        asm: &mut Assembler,
        storing: &mut Option<Storing>,
        done: &AtomicUsize,
        total: usize,
    ) -> Result<(), Halted> {
        let read_timeout = self.ctx.config.origin.read_timeout;
        while asm.offset < upto {
            let chunk = match next_chunk(&mut body, read_timeout)
                .await
                .map_err(Halted::Origin)?
            {
                Some(chunk) => chunk,
                None => {
                    return Err(Halted::Origin(OriginError::Body(format!(
                        "origin body ended at byte {} of {upto}",
                        asm.offset
                    ))));
                }
            };
            if chunk.len() as u64 > upto - asm.offset {
                return Err(Halted::Origin(OriginError::Protocol(format!(
                    "origin sent more than the bytes up to {upto} asked for"
                ))));
            }
            self.ctx.metrics.add_from_origin(chunk.len() as u64);
            for l in [&self.ctx.origin_limit, &self.task_limit] {
                l.take(chunk.len()).await;
            }
            let mut rest = &chunk[..];
            while let Some((index, piece)) = asm.feed(&mut rest) {
                self.settle(storing, done, total).await?;
                *storing = Some(self.spawn_store(index, piece));
            }
        }
        Ok(())
    }

    /// Hashes and stores a finished piece off the runtime.
    fn spawn_store(&self, index: u32, data: Bytes) -> Storing {
        let store = self.ctx.store.clone();
        let key = self.key;
        let expected = self.known.get(&index).copied();
        let offset = self.layout.piece_range(index).start;
        let handle = tokio::task::spawn_blocking(move || {
            let hash = PieceHash::of(&data);
            if expected.is_some_and(|e| e != hash) {
                return Err(ProduceError::HashMismatch(index));
            }
            store.put_piece(&key, index, offset, &data)?;
            Ok(hash)
        });
        Storing { index, handle }
    }

    /// Waits for the piece being stored and reports it. Before the production's last piece is
    /// reported, an origin without validators must still send the same first bytes: nothing else
    /// tells whether it changed while the pieces were fetched.
    async fn settle(
        &self,
        storing: &mut Option<Storing>,
        done: &AtomicUsize,
        total: usize,
    ) -> Result<(), Halted> {
        let Some(Storing { index, handle }) = storing.take() else {
            return Ok(());
        };
        let mut result = handle
            .await
            .map_err(|e| ProduceError::Store(e.to_string()))
            .and_then(|r| r);
        let last = done.fetch_add(1, Ordering::SeqCst) + 1 == total;
        if last
            && result.is_ok()
            && self.layout.piece_count() > 1
            && !self.has_validators()
            && let Err(e) = self.head_unchanged().await
        {
            result = Err(e);
        }
        let failed = result.is_err();
        self.report(index, result);
        if failed {
            Err(Halted::Reported)
        } else {
            Ok(())
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
                    tokio::time::sleep(backoff(attempt)).await;
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
                match next_chunk(&mut body, read_timeout).await? {
                    Some(c) => {
                        // Skip bytes of pieces produced before a restart.
                        let skip = (range.start.saturating_sub(offset) as usize).min(c.len());
                        offset += c.len() as u64;
                        self.ctx.metrics.add_from_origin(c.len() as u64);
                        buf.extend_from_slice(&c[skip..]);
                        self.ctx.origin_limit.take(c.len()).await;
                        self.task_limit.take(c.len()).await;
                    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_split_runs_of_consecutive_pieces_evenly() {
        assert_eq!(spans(&[], 4), Vec::<Range<u32>>::new());
        assert_eq!(spans(&[0, 1, 2, 3, 4, 5, 6, 7], 1), vec![0..8]);
        assert_eq!(
            spans(&[0, 1, 2, 3, 4, 5, 6, 7], 4),
            vec![0..2, 2..4, 4..6, 6..8]
        );
        assert_eq!(spans(&[0, 1, 2, 3, 4, 5, 6], 2), vec![0..4, 4..7]);
        // A gap ends a span: its bytes are not fetched.
        assert_eq!(spans(&[0, 1, 3, 4, 5, 9], 1), vec![0..2, 3..6, 9..10]);
        assert_eq!(spans(&[2, 3], 8), vec![2..3, 3..4]);
    }

    #[test]
    fn the_assembler_cuts_chunks_at_piece_boundaries() {
        // 2.5 pieces of 1 MiB: the last piece is short.
        let layout = PieceLayout::for_length(5 * (MIN_PIECE_LENGTH as u64) / 2);
        assert_eq!(layout.piece_length, MIN_PIECE_LENGTH);
        let content: Vec<u8> = (0..layout.content_length)
            .map(|i| (i % 251) as u8)
            .collect();
        for chunk in [1usize, 4096, 333_333, 1 << 20, 3 << 20] {
            let mut asm = Assembler::new(layout, 1..3);
            let mut got = Vec::new();
            for c in content[MIN_PIECE_LENGTH as usize..].chunks(chunk) {
                let mut c = c;
                while let Some((i, p)) = asm.feed(&mut c) {
                    got.push((i, p));
                }
                assert!(c.is_empty());
            }
            assert_eq!(asm.offset, layout.content_length);
            let want: Vec<(u32, Bytes)> = (1..3)
                .map(|i| {
                    let r = layout.piece_range(i);
                    (
                        i,
                        Bytes::copy_from_slice(&content[r.start as usize..r.end as usize]),
                    )
                })
                .collect();
            assert_eq!(got, want, "chunk {chunk}");
        }
        // Bytes past the span's last piece stay with the caller.
        let mut asm = Assembler::new(layout, 0..1);
        let mut c = &content[..];
        assert_eq!(
            asm.feed(&mut c).map(|(i, p)| (i, p.len())),
            Some((0, MIN_PIECE_LENGTH as usize))
        );
        assert_eq!(asm.feed(&mut c), None);
        assert_eq!(c.len(), content.len() - MIN_PIECE_LENGTH as usize);
    }
}
