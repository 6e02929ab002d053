//! Reading a task's content in order while it downloads: what the API's content endpoint and the
//! registry mirror send to their clients.
//!
//! A [`Content`] stream yields the requested byte range piece by piece as pieces arrive. Pieces
//! are verified before they are stored, so every byte it yields has been checked against the
//! task's signed piece hashes. When the task has a whole-content digest, the last piece is held
//! back until the digest has been verified, so a consumer that reads to the end has received
//! exactly the digested bytes — or an error, never wrong bytes presented as complete.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use df_protocols::manifest::SignedHeader;
use df_protocols::piece::PieceLayout;
use df_protocols::task::TaskKey;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use tokio::sync::watch;

use crate::store::{PieceData, PieceStore};
use crate::task::{Phase, Progress, TaskContext, TaskError};

/// Why content cannot be served.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ContentError {
    /// The node does not know this task (neither running nor stored).
    #[error("unknown task")]
    UnknownTask,
    /// The task failed before its header was known.
    #[error(transparent)]
    Task(#[from] TaskError),
    /// The requested range lies outside the content (`content_length` is its length).
    #[error("range not satisfiable (content is {content_length} bytes)")]
    RangeNotSatisfiable { content_length: u64 },
}

/// A byte range of a task's content, streamed in order.
pub struct Content {
    pub header: SignedHeader,
    /// The whole content's length.
    pub content_length: u64,
    /// The bytes `stream` yields (the whole content when no range was asked for).
    pub range: Range<u64>,
    /// A range was asked for and is being served (HTTP 206).
    pub partial: bool,
    pub stream: BoxStream<'static, Result<Bytes, std::io::Error>>,
}

/// A `Range` header that selects no byte of the content (HTTP 416).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsatisfiable;

/// Parses the value of an HTTP `Range` header (a single `bytes=` range) against a content length.
/// `Ok(None)`: no usable range (absent, another unit, or several ranges — serve the whole content,
/// as RFC 9110 allows).
pub fn parse_range(value: Option<&str>, len: u64) -> Result<Option<Range<u64>>, Unsatisfiable> {
    let Some(v) = value else {
        return Ok(None);
    };
    let Some(spec) = v.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(Unsatisfiable)?;
    let (a, b) = (a.trim(), b.trim());
    let range = if a.is_empty() {
        let n: u64 = b.parse().map_err(|_| Unsatisfiable)?;
        if n == 0 {
            return Err(Unsatisfiable);
        }
        len.saturating_sub(n)..len
    } else {
        let start: u64 = a.parse().map_err(|_| Unsatisfiable)?;
        let end = if b.is_empty() {
            len
        } else {
            b.parse::<u64>()
                .map_err(|_| Unsatisfiable)?
                .saturating_add(1)
                .min(len)
        };
        if start >= len || start >= end {
            return Err(Unsatisfiable);
        }
        start..end
    };
    Ok(Some(range))
}

/// Waits for the task's header, then streams `range` of its content (given as an HTTP `Range`
/// header value; `None` for the whole content) as its pieces arrive. The task itself must have
/// been started or be complete in the store; dropping the stream does not stop it.
pub(crate) async fn open(
    ctx: &Arc<TaskContext>,
    key: &TaskKey,
    range: Option<&str>,
) -> Result<Content, ContentError> {
    let (header, progress) = header_of(ctx, key).await?;
    let len = header.header.content_length;
    let (partial, range) = match parse_range(range, len) {
        Ok(None) => (false, 0..len),
        Ok(Some(r)) => (true, r),
        Err(Unsatisfiable) => {
            return Err(ContentError::RangeNotSatisfiable {
                content_length: len,
            });
        }
    };
    let gate_last = gates_last_piece(key, &header);
    let reader = ctx.registry.shared(key);
    let stream = piece_stream(StreamState {
        reader,
        ctx: ctx.clone(),
        key: *key,
        progress,
        layout: header.header.layout(),
        offset: range.start,
        end: range.end,
        gate_last,
        done: false,
    })
    .boxed();
    Ok(Content {
        header,
        content_length: len,
        range,
        partial,
        stream,
    })
}

/// Whether a reader gets the last piece only once the whole-content digest has been verified:
/// for a task that has such a digest.
fn gates_last_piece(key: &TaskKey, header: &SignedHeader) -> bool {
    key.content_digest().is_some() || header.header.content_digest.is_some()
}

/// Why a read of a task breaks off when it restarted without its producer.
const RESTARTED: &str = "content failed its digest; the task restarted without its producer, retry";

/// Waits for a task's header; returns it with the task's progress.
async fn header_of(
    ctx: &Arc<TaskContext>,
    key: &TaskKey,
) -> Result<(SignedHeader, watch::Receiver<Progress>), ContentError> {
    let mut progress = crate::task::progress(ctx, key)
        .await
        .ok_or(ContentError::UnknownTask)?;
    loop {
        let p = progress.borrow().clone();
        if let Phase::Failed(e) = p.phase {
            return Err(e.into());
        }
        if let Some(h) = p.header {
            return Ok((h, progress));
        }
        if progress.changed().await.is_err() {
            return Err(TaskError::internal("task stopped before it started").into());
        }
    }
}

/// One verified piece of a task, where a reader on this host finds its bytes:
/// `GET /v1/tasks/{id}/files` sends one per piece, as JSON lines, in the order pieces arrive.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PieceFile {
    pub index: u32,
    /// Where the piece's bytes lie in the content.
    pub offset: u64,
    pub length: u64,
    /// The file holding the piece's bytes (see [`PieceStore::piece_file`]), at `path_offset`;
    /// `None` when the store keeps them elsewhere: read `offset..offset + length` from the
    /// content. The node's content file holds the whole content, each piece at its offset in
    /// it (`path_offset == offset`), so a reader that sees every piece listed in one file may
    /// take that file (a hard link) instead of copying the pieces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<std::path::PathBuf>,
    /// Where in `path` the piece starts (0, as from nodes that kept a file per piece, when absent).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub path_offset: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Every piece of a task as it becomes readable: what `df get -o FILE` (or `-O -`) copies from
/// when it runs on the node's host, instead of taking the bytes through the API a second time.
pub struct PieceFiles {
    pub content_length: u64,
    /// Each piece once, in the [`ListOrder`] asked for; ends after the last piece. With a
    /// whole-content digest the last piece comes only after the digest has been verified, as in
    /// [`Content`].
    pub stream: BoxStream<'static, Result<PieceFile, std::io::Error>>,
}

/// The order of a piece listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ListOrder {
    /// Each piece as soon as it is verified, lowest ready index first: for a reader that writes
    /// at offsets (`-o FILE`).
    #[default]
    AsVerified,
    /// Piece 0, 1, 2, …, each when it is verified: for a reader that writes a stream (`-O -`).
    /// The task's picker favours the pieces this reader waits for, as it does for a content
    /// stream.
    ByIndex,
}

/// Waits for the task's header, then lists its pieces as they are verified and stored.
pub(crate) async fn open_files(
    ctx: &Arc<TaskContext>,
    key: &TaskKey,
    order: ListOrder,
) -> Result<PieceFiles, ContentError> {
    let (header, progress) = header_of(ctx, key).await?;
    let layout = header.header.layout();
    let count = layout.piece_count();
    let gate_last = gates_last_piece(key, &header);
    let st = FilesState {
        reader: match order {
            ListOrder::ByIndex => ctx.registry.shared(key),
            ListOrder::AsVerified => None,
        },
        in_order: order == ListOrder::ByIndex,
        ctx: ctx.clone(),
        key: *key,
        progress,
        layout,
        listed: vec![false; count as usize],
        left: count,
        gate_last,
        done: false,
    };
    Ok(PieceFiles {
        content_length: header.header.content_length,
        stream: futures::stream::unfold(st, next_file).boxed(),
    })
}

struct FilesState {
    /// For a listing by index: where it is, told to the task's runner (see
    /// [`crate::task::RunnerShared`]).
    reader: Option<Arc<crate::task::RunnerShared>>,
    in_order: bool,
    ctx: Arc<TaskContext>,
    key: TaskKey,
    progress: watch::Receiver<Progress>,
    layout: PieceLayout,
    /// Pieces already listed.
    listed: Vec<bool>,
    left: u32,
    gate_last: bool,
    done: bool,
}

impl Drop for FilesState {
    fn drop(&mut self) {
        if let Some(r) = &self.reader {
            r.reader_at.store(u32::MAX, Ordering::Relaxed);
        }
    }
}

/// The piece that may be listed now — the lowest ready one, or for a listing by index piece
/// `next` once it is ready; `Err` when the task failed or restarted.
fn ready_piece(
    listed: &[bool],
    gate_last: bool,
    next: Option<u32>,
    p: &Progress,
) -> Result<Option<u32>, std::io::Error> {
    if let Phase::Failed(e) = &p.phase {
        return Err(std::io::Error::other(e.to_string()));
    }
    // A task that restarted (its content failed the digest, and it started over without that
    // producer) dropped what it held: what was listed before is not to be trusted, even when a
    // new header has come meanwhile.
    let dropped = p.have.len() as usize != listed.len()
        || listed
            .iter()
            .enumerate()
            .any(|(i, &l)| l && !p.have.get(i as u32));
    if p.header.is_none() || dropped {
        return Err(std::io::Error::other(RESTARTED));
    }
    let last = (listed.len() as u32).saturating_sub(1);
    let complete = p.phase.content_final();
    let may_list = |i: u32| {
        !listed.get(i as usize).copied().unwrap_or(true) && (!gate_last || i != last || complete)
    };
    if let Some(i) = next {
        return Ok((p.have.get(i) && may_list(i)).then_some(i));
    }
    Ok(p.have.iter_set().find(|&i| may_list(i)))
}

async fn next_file(mut st: FilesState) -> Option<(Result<PieceFile, std::io::Error>, FilesState)> {
    if st.done || st.left == 0 {
        return None;
    }
    // A listing by index has listed pieces 0..next.
    let next = st.in_order.then(|| st.listed.len() as u32 - st.left);
    if let (Some(r), Some(i)) = (&st.reader, next) {
        r.reader_at.store(i, Ordering::Relaxed);
    }
    let index = loop {
        let ready = {
            let p = st.progress.borrow_and_update();
            ready_piece(&st.listed, st.gate_last, next, &p)
        };
        match ready {
            Ok(Some(i)) => break i,
            Ok(None) => {}
            Err(e) => {
                st.done = true;
                return Some((Err(e), st));
            }
        }
        if st.progress.changed().await.is_err() {
            // The runner is gone: what it left in the progress is final.
            let ready = ready_piece(&st.listed, st.gate_last, next, &st.progress.borrow());
            let why = match ready {
                Ok(Some(_)) => continue,
                Ok(None) => "task stopped".to_owned(),
                Err(e) => e.to_string(),
            };
            st.done = true;
            return Some((Err(std::io::Error::other(why)), st));
        }
    };
    if let Some(l) = st.listed.get_mut(index as usize) {
        *l = true;
    }
    st.left -= 1;
    // A reader copying the task is a use of it, as serving a peer is (eviction reads this).
    st.ctx.activity.touch(&st.key);
    let (store, key) = (st.ctx.store.clone(), st.key);
    let at = tokio::task::spawn_blocking(move || store.piece_file(&key, index)).await;
    let at = match at {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            st.done = true;
            return Some((Err(std::io::Error::other(e.to_string())), st));
        }
        Err(e) => {
            st.done = true;
            return Some((Err(std::io::Error::other(e.to_string())), st));
        }
    };
    let range = st.layout.piece_range(index);
    let file = PieceFile {
        index,
        offset: range.start,
        length: range.end - range.start,
        path_offset: at.as_ref().map_or(0, |a| a.offset),
        path: at.map(|a| a.path),
    };
    Some((Ok(file), st))
}

struct StreamState {
    /// Where this stream is, told to the task's runner (see [`crate::task::RunnerShared`]).
    reader: Option<Arc<crate::task::RunnerShared>>,
    ctx: Arc<TaskContext>,
    key: TaskKey,
    progress: watch::Receiver<Progress>,
    layout: PieceLayout,
    offset: u64,
    end: u64,
    /// Hold the last piece back until the whole-content digest has been verified.
    gate_last: bool,
    done: bool,
}

impl Drop for StreamState {
    fn drop(&mut self) {
        if let Some(r) = &self.reader {
            r.reader_at.store(u32::MAX, Ordering::Relaxed);
        }
    }
}

fn piece_stream(st: StreamState) -> impl Stream<Item = Result<Bytes, std::io::Error>> {
    futures::stream::unfold(st, next_chunk)
}

/// Waits until piece `index` may be sent; `Err` when the task failed or stopped.
async fn wait_for_piece(st: &mut StreamState, index: u32) -> Result<(), std::io::Error> {
    let last = st.layout.piece_count().saturating_sub(1);
    loop {
        {
            let p = st.progress.borrow();
            if let Phase::Failed(e) = &p.phase {
                return Err(std::io::Error::other(e.to_string()));
            }
            if p.header.is_none() {
                // The content failed its digest and the task started over with another producer:
                // what was streamed so far is not to be trusted.
                return Err(std::io::Error::other(RESTARTED));
            }
            let complete = p.phase.content_final();
            if p.have.get(index) && (!st.gate_last || index != last || complete) {
                return Ok(());
            }
        }
        if st.progress.changed().await.is_err() {
            let p = st.progress.borrow();
            if p.phase.content_final() {
                return Ok(());
            }
            return Err(std::io::Error::other(match &p.phase {
                Phase::Failed(e) => e.to_string(),
                _ => "task stopped".to_owned(),
            }));
        }
    }
}

async fn next_chunk(mut st: StreamState) -> Option<(Result<Bytes, std::io::Error>, StreamState)> {
    if st.done || st.offset >= st.end {
        return None;
    }
    let index = st.layout.piece_at(st.offset);
    if let Some(r) = &st.reader {
        r.reader_at.store(index, Ordering::Relaxed);
    }
    if let Err(e) = wait_for_piece(&mut st, index).await {
        st.done = true;
        return Some((Err(e), st));
    }
    let store = st.ctx.store.clone();
    let key = st.key;
    let fail = |mut st: StreamState, msg: String| {
        st.done = true;
        Some((Err(std::io::Error::other(msg)), st))
    };
    // At most CONTENT_CHUNK bytes per item, read from the store's file where it keeps one: a
    // large piece (16 MiB for a 4 GiB file) is never held whole for the reader.
    let pr = st.layout.piece_range(index);
    let from = st.offset - pr.start;
    let to = (st.end.min(pr.end) - pr.start).min(from + CONTENT_CHUNK);
    let read =
        tokio::task::spawn_blocking(move || read_range(&*store, &key, index, from, to)).await;
    let chunk = match read {
        Ok(Ok(Some(c))) => c,
        Ok(Ok(None)) => {
            // A task that failed over a changed origin or a full disk frees its data: the piece
            // is gone because of that failure, which is what the reader is told (reopening the
            // task here would also forget the failure the client asks for next).
            let gone = why_gone(&st.progress.borrow());
            if let Some(why) = gone {
                return fail(st, why);
            }
            // A complete task lost a piece (damaged store): reopen it so the next download
            // fetches what is missing instead of failing here forever.
            let store = st.ctx.store.clone();
            let reopened = tokio::task::spawn_blocking(move || {
                store.drop_piece(&key, index)?;
                store.reopen(&key)
            })
            .await;
            crate::task::forget_finished(&st.ctx, &key);
            tracing::warn!(task = %key, index, ?reopened, "piece missing from the store; task reopened");
            return fail(
                st,
                format!("piece {index} missing from the store; the task was reopened, retry"),
            );
        }
        Ok(Err(e)) => return fail(st, e.to_string()),
        Err(e) => return fail(st, e.to_string()),
    };
    st.offset += chunk.len() as u64;
    Some((Ok(chunk), st))
}

/// Why a piece the progress listed is no longer stored, when the task itself says so: it failed
/// (a failure over a changed origin or a full disk deletes the task's data) or started over.
fn why_gone(p: &Progress) -> Option<String> {
    match &p.phase {
        Phase::Failed(e) => Some(e.to_string()),
        _ if p.header.is_none() => Some(RESTARTED.to_owned()),
        _ => None,
    }
}

/// Bytes a content stream yields at most at once.
const CONTENT_CHUNK: u64 = 1 << 20;

/// Bytes `from..to` of a stored piece; `None` when the piece is not stored.
fn read_range(
    store: &dyn PieceStore,
    key: &TaskKey,
    index: u32,
    from: u64,
    to: u64,
) -> Result<Option<Bytes>, String> {
    use std::io::{Read, Seek, SeekFrom};
    let Some(data) = store.piece_data(key, index).map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    if to > data.len() || from > to {
        return Err(format!("piece {index} has the wrong length"));
    }
    match data {
        PieceData::Bytes(b) => Ok(Some(Bytes::from(b).slice(from as usize..to as usize))),
        PieceData::File {
            mut file, offset, ..
        } => {
            let mut buf = vec![0u8; (to - from) as usize];
            file.seek(SeekFrom::Start(offset + from))
                .and_then(|_| file.read_exact(&mut buf))
                .map_err(|e| format!("reading piece {index}: {e}"))?;
            Ok(Some(Bytes::from(buf)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(have: &[u32], count: u32, phase: Phase) -> Progress {
        use df_protocols::manifest::{TaskHeader, Validators};
        let key = libp2p::identity::Keypair::generate_ed25519();
        let u = df_protocols::task::parse_url("http://h/x").unwrap();
        let header = TaskHeader {
            task: TaskKey::for_url(&u, ""),
            source_url: u.to_string(),
            content_length: u64::from(count) * 4,
            piece_length: 4,
            content_digest: None,
            validators: Validators::default(),
            producer: key.public().to_peer_id(),
        }
        .sign(&key)
        .unwrap();
        let mut bits = df_protocols::piece::Bitfield::new(count);
        for &i in have {
            bits.set(i);
        }
        let mut p = Progress::complete(header);
        p.have = bits;
        p.phase = phase;
        p
    }

    #[test]
    fn pieces_are_listed_lowest_ready_first_the_gated_last_at_the_end() {
        let mut listed = vec![false; 4];
        let running = progress(&[3, 1], 4, Phase::Running);
        assert_eq!(
            ready_piece(&listed, false, None, &running).unwrap(),
            Some(1)
        );
        // With a digest the last piece waits for the task to be complete.
        listed[1] = true;
        assert_eq!(ready_piece(&listed, true, None, &running).unwrap(), None);
        assert_eq!(
            ready_piece(&listed, false, None, &running).unwrap(),
            Some(3)
        );
        let done = progress(&[0, 1, 2, 3], 4, Phase::Complete);
        assert_eq!(ready_piece(&listed, true, None, &done).unwrap(), Some(0));
    }

    #[test]
    fn a_listing_by_index_waits_for_the_next_piece() {
        let mut listed = vec![false; 4];
        let running = progress(&[3, 1], 4, Phase::Running);
        assert_eq!(
            ready_piece(&listed, false, Some(0), &running).unwrap(),
            None
        );
        let more = progress(&[0, 1, 3], 4, Phase::Running);
        assert_eq!(
            ready_piece(&listed, false, Some(0), &more).unwrap(),
            Some(0)
        );
        listed[0] = true;
        assert_eq!(
            ready_piece(&listed, false, Some(1), &more).unwrap(),
            Some(1)
        );
        listed[1] = true;
        // Piece 3 is there but 2 is not: a stream waits.
        assert_eq!(ready_piece(&listed, false, Some(2), &more).unwrap(), None);
        let all = progress(&[0, 1, 2, 3], 4, Phase::Running);
        assert_eq!(ready_piece(&listed, false, Some(2), &all).unwrap(), Some(2));
        listed[2] = true;
        assert_eq!(ready_piece(&listed, false, Some(3), &all).unwrap(), Some(3));
        // The gated last piece still waits for the digest, not for the store's durability.
        assert_eq!(ready_piece(&listed, true, Some(3), &all).unwrap(), None);
        let verified = progress(&[0, 1, 2, 3], 4, Phase::Verified);
        assert_eq!(
            ready_piece(&listed, true, Some(3), &verified).unwrap(),
            Some(3)
        );
    }

    #[test]
    fn a_task_that_dropped_a_listed_piece_ends_the_listing() {
        let listed = vec![true, false, false, false];
        // Restarted: its pieces are gone, even though a header is there again.
        let restarted = progress(&[2], 4, Phase::Running);
        assert!(ready_piece(&listed, false, None, &restarted).is_err());
        let resized = progress(&[0], 5, Phase::Running);
        assert!(ready_piece(&listed, false, None, &resized).is_err());
        let mut no_header = progress(&[0], 4, Phase::Running);
        no_header.header = None;
        assert!(ready_piece(&listed, false, None, &no_header).is_err());
        let failed = progress(&[0], 4, Phase::Failed(TaskError::internal("boom")));
        assert!(ready_piece(&listed, false, None, &failed).is_err());
    }

    #[test]
    fn a_piece_gone_with_a_failed_task_reports_the_failure_not_a_damaged_store() {
        let failed = progress(
            &[0, 1],
            4,
            Phase::Failed(TaskError::internal("origin changed")),
        );
        assert!(why_gone(&failed).is_some_and(|w| w.contains("origin changed")));
        let mut restarted = progress(&[0], 4, Phase::Running);
        restarted.header = None;
        assert_eq!(why_gone(&restarted).as_deref(), Some(RESTARTED));
        // Only a task that still claims the piece has a damaged store (and is reopened).
        assert_eq!(why_gone(&progress(&[0, 1, 2, 3], 4, Phase::Complete)), None);
        assert_eq!(why_gone(&progress(&[0], 4, Phase::Running)), None);
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 10), Ok(None));
        assert_eq!(parse_range(Some("bytes=0-4"), 10), Ok(Some(0..5)));
        assert_eq!(parse_range(Some("bytes=5-"), 10), Ok(Some(5..10)));
        assert_eq!(parse_range(Some("bytes=-3"), 10), Ok(Some(7..10)));
        assert_eq!(parse_range(Some("bytes=8-100"), 10), Ok(Some(8..10)));
        assert_eq!(parse_range(Some("bytes=10-"), 10), Err(Unsatisfiable));
        assert_eq!(parse_range(Some("bytes=5-2"), 10), Err(Unsatisfiable));
        assert_eq!(parse_range(Some("bytes=x-2"), 10), Err(Unsatisfiable));
        assert_eq!(parse_range(Some("bytes=0-1,4-5"), 10), Ok(None));
        assert_eq!(parse_range(Some("items=0-1"), 10), Ok(None));
    }
}
