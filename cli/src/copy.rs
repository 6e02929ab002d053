//! `df get -o FILE` and `-O -` beside its node: the node lists each verified piece with the file
//! holding it (`GET /v1/tasks/{id}/files`). For `-o`, when the node keeps the whole content in one
//! file that this user owns on the output's filesystem, the output becomes a hard link to it, made
//! at the first piece and kept once every piece has been listed in that file: no byte is written a
//! second time (the node notices a later change to the file and stops serving it). Otherwise the
//! CLI copies each piece into the output at its offset with `copy_file_range` — in the kernel, a
//! reflink where the filesystem shares extents — as the pieces arrive, in any order, so the copy
//! overlaps the download. For `-O -` it
//! asks for the pieces in index order and sends each to standard output with `sendfile`. Either
//! way no byte goes through the API's socket a second time. A piece whose file this process
//! cannot read (another user's store, a store that keeps pieces elsewhere, a file evicted
//! meanwhile) is fetched as a byte range through the API instead; an output the kernel cannot
//! copy into gets a plain read and write.

use std::fs::File;
use std::io::ErrorKind;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use df_node::ApiAddr;
use df_node::api::client::{ApiClient, ApiError, PieceFileStream};
use df_node::content::{ListOrder, PieceFile};
use futures::StreamExt;
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};

use crate::get::io_error;

/// Whether the API runs on this host, so the files it names are (maybe) ours to read.
pub(crate) fn api_is_local(addr: &ApiAddr) -> bool {
    match addr {
        ApiAddr::Unix(_) => true,
        ApiAddr::Tcp(a) => a.ip().is_loopback(),
    }
}

/// What copying pieces came to.
pub(crate) enum Copied {
    /// The whole content is in the output: so many pieces copied from the node's files, so
    /// many taken through the API — or, with `linked`, all in the node's file linked beside the
    /// output (nothing was copied; commit the link instead of the output).
    All {
        from_files: u32,
        through_api: u32,
        linked: Option<Linked>,
    },
    /// The node does not list piece files (an older node): stream the content instead.
    Unsupported,
}

/// Opens the node's listing of task `id` in `order`; `None` when the node has no such route.
async fn open_listing(
    api: &ApiClient,
    id: &str,
    total: u64,
    order: ListOrder,
) -> Result<Option<PieceFileStream>> {
    let (len, pieces) = match api.content_files(id, order).await {
        Ok(l) => l,
        Err(ApiError::Http { status, .. })
            if status == http::StatusCode::NOT_FOUND
                || status == http::StatusCode::METHOD_NOT_ALLOWED =>
        {
            return Ok(None);
        }
        Err(e) => return Err(crate::get::describe(e)),
    };
    if len != total {
        bail!("the node announced {total} bytes but lists {len}");
    }
    Ok(Some(pieces))
}

/// The next listed piece, checked against the content (in range, not listed before); `None`
/// after the last. A broken listing is reported with the node's reason.
async fn next_piece(
    api: &ApiClient,
    id: &str,
    total: u64,
    pieces: &mut PieceFileStream,
    seen: &mut std::collections::HashSet<u32>,
) -> Result<Option<PieceFile>> {
    let piece = match pieces.next().await {
        None => return Ok(None),
        Some(Ok(p)) => p,
        // The listing broke: the node knows why (the task failed, or restarted).
        Some(Err(e)) => {
            let why = api.failure(id, Duration::from_secs(30)).await;
            return Err(why
                .map(|w| anyhow!("{w}"))
                .unwrap_or_else(|| crate::get::describe(e)));
        }
    };
    let end = piece.offset.checked_add(piece.length);
    if end.is_none_or(|e| e > total) || !seen.insert(piece.index) {
        bail!(
            "the node listed piece {} at {}+{} of a {total}-byte content twice or out of range",
            piece.index,
            piece.offset,
            piece.length
        );
    }
    Ok(Some(piece))
}

/// Copies every piece of task `id` (`total` bytes) into `out` (open at `out_path`, named in
/// errors) as the node lists them — or links the node's content file beside `out_path` when every
/// piece is listed in it (see the module docs); calls `progress` with the bytes in place so far.
/// On error the output holds an unknown part.
pub(crate) async fn copy_pieces(
    api: &ApiClient,
    id: &str,
    total: u64,
    out: Arc<File>,
    out_path: &Path,
    progress: impl Fn(u64),
) -> Result<Copied> {
    let Some(mut pieces) = open_listing(api, id, total, ListOrder::AsVerified).await? else {
        return Ok(Copied::Unsupported);
    };
    let sized = out.clone();
    tokio::task::spawn_blocking(move || sized.set_len(total))
        .await?
        .map_err(|e| io_error(e, out_path))?;
    let mut seen = std::collections::HashSet::new();
    let mut tally = Tally::default();
    // The node's content file linked beside the output, and the pieces listed in it so far.
    let mut link: Option<(Linked, Vec<PieceFile>)> = None;
    let mut may_link = true;
    while let Some(piece) = next_piece(api, id, total, &mut pieces, &mut seen).await? {
        if let Some((l, mut listed)) = link.take() {
            if l.holds(&piece) {
                progress(tally.linked(piece.length));
                listed.push(piece);
                link = Some((l, listed));
                continue;
            }
            // A piece elsewhere: copy after all, the pieces linked so far first.
            drop(l);
            for p in listed {
                copy_piece(api, id, &p, &out, out_path).await?;
            }
        } else if may_link && tally.written == 0 {
            may_link = false;
            let at = out_path.with_extension("link");
            let p = piece.clone();
            if let Some(l) =
                tokio::task::spawn_blocking(move || Linked::try_make(&p, total, at)).await?
            {
                progress(tally.linked(piece.length));
                link = Some((l, vec![piece]));
                continue;
            }
        }
        let from_file = copy_piece(api, id, &piece, &out, out_path).await?;
        progress(tally.add(piece.length, from_file));
    }
    if let Some((l, listed)) = link {
        let (l, kept) = tokio::task::spawn_blocking(move || {
            let kept = l.still_the_nodes(total);
            (l, kept)
        })
        .await?;
        if kept {
            return tally.finish(total, Some(l));
        }
        // The node's file was replaced meanwhile: copy from what it lists now.
        drop(l);
        tally = Tally::default();
        for p in listed {
            let from_file = copy_piece(api, id, &p, &out, out_path).await?;
            tally.add(p.length, from_file);
        }
    }
    tally.finish(total, None)
}

/// Puts one listed piece into `out`: from its file where this process can read it (`true`),
/// else through the API.
async fn copy_piece(
    api: &ApiClient,
    id: &str,
    piece: &PieceFile,
    out: &Arc<File>,
    out_path: &Path,
) -> Result<bool> {
    if let Some(path) = piece.path.clone() {
        let (out, out_path) = (out.clone(), out_path.to_owned());
        let (at, offset, length) = (piece.path_offset, piece.offset, piece.length);
        let copied = tokio::task::spawn_blocking(move || {
            copy_file(&path, at, length, &out, &out_path, offset)
        })
        .await??;
        if copied {
            return Ok(true);
        }
    }
    let (out, out_path) = (out.clone(), out_path.to_owned());
    fetch_range(api, id, piece, move |at, chunk| {
        out.write_all_at(&chunk, at)
            .map_err(|e| io_error(e, &out_path))
    })
    .await?;
    Ok(false)
}

/// The node's content file hard-linked beside the output (removed again unless committed).
pub(crate) struct Linked {
    /// The node's file.
    src: std::path::PathBuf,
    /// The link.
    path: std::path::PathBuf,
    /// Device and inode of the file linked.
    id: (u64, u64),
    committed: bool,
}

impl Linked {
    /// Links the file holding `first` (the first piece listed) at `at`, if it holds the whole
    /// content at its offsets, this user owns it (a file of another user, e.g. a node running
    /// as root, would give the output an owner who may change it later), and it is on the same
    /// filesystem. `None`: copy instead.
    fn try_make(first: &PieceFile, total: u64, at: std::path::PathBuf) -> Option<Linked> {
        use std::os::unix::fs::MetadataExt;
        let src = first.path.clone()?;
        if first.path_offset != first.offset {
            return None;
        }
        let m = std::fs::metadata(&src).ok()?;
        if !m.is_file() || m.uid() != nix::unistd::geteuid().as_raw() || m.len() > total {
            return None;
        }
        match std::fs::hard_link(&src, &at) {
            Ok(()) => Some(Linked {
                src,
                path: at,
                id: (m.dev(), m.ino()),
                committed: false,
            }),
            Err(e) => {
                tracing::debug!(error = %e, "not linking the node's file; copying");
                None
            }
        }
    }

    /// Whether the linked file holds `piece` at its offset.
    fn holds(&self, piece: &PieceFile) -> bool {
        piece.path.as_deref() == Some(self.src.as_path()) && piece.path_offset == piece.offset
    }

    /// After the last piece: whether the node's file is still the one linked and the content's
    /// length (it was not replaced by a fresh one while the pieces were listed).
    fn still_the_nodes(&self, total: u64) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (std::fs::metadata(&self.src), std::fs::metadata(&self.path)) {
            (Ok(a), Ok(b)) => {
                (a.dev(), a.ino()) == self.id && (b.dev(), b.ino()) == self.id && b.len() == total
            }
            _ => false,
        }
    }

    /// Makes the linked content durable, gives it the mode a file this user creates gets (the
    /// node creates its files 0600), and renames it to `target`.
    pub(crate) fn commit(mut self, target: &Path) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let f = File::open(&self.path).map_err(|e| io_error(e, &self.path))?;
        f.set_permissions(std::fs::Permissions::from_mode(0o666 & !current_umask()))
            .and_then(|()| f.sync_all())
            .map_err(|e| io_error(e, &self.path))?;
        std::fs::rename(&self.path, target).map_err(|e| io_error(e, target))?;
        self.committed = true;
        Ok(())
    }
}

/// This process's umask (read by setting it and back: the CLI does not create files meanwhile).
fn current_umask() -> u32 {
    use nix::sys::stat::{Mode, umask};
    let old = umask(Mode::from_bits_truncate(0o022));
    umask(old);
    old.bits()
}

impl Drop for Linked {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// `-O -` beside the node: the pieces in index order (the node's picker favours the next ones, as
/// for a content stream), each sent from the node's file to standard output with `sendfile` —
/// one kernel copy, where the content stream takes the bytes through the API's socket and this
/// process's buffers. A piece whose file this process cannot read is taken through the API.
pub(crate) async fn stream_pieces(
    api: &ApiClient,
    id: &str,
    total: u64,
    progress: impl Fn(u64),
) -> Result<Copied> {
    let Some(mut pieces) = open_listing(api, id, total, ListOrder::ByIndex).await? else {
        return Ok(Copied::Unsupported);
    };
    let mut seen = std::collections::HashSet::new();
    let mut tally = Tally::default();
    while let Some(piece) = next_piece(api, id, total, &mut pieces, &mut seen).await? {
        if piece.offset != tally.written {
            bail!(
                "the node listed piece {} at {} where the stream is at {}",
                piece.index,
                piece.offset,
                tally.written
            );
        }
        let sent = match piece.path.clone() {
            Some(path) => {
                let (at, length) = (piece.path_offset, piece.length);
                tokio::task::spawn_blocking(move || send_file(&path, at, length)).await??
            }
            None => false,
        };
        if !sent {
            fetch_range(api, id, &piece, |_, chunk| write_stdout(&chunk)).await?;
        }
        progress(tally.add(piece.length, sent));
    }
    tally.finish(total, None)
}

/// How a failed write to standard output reads.
pub(crate) fn stdout_error(e: std::io::Error) -> anyhow::Error {
    if e.raw_os_error() == Some(28) {
        anyhow!("no space left on device writing standard output")
    } else {
        anyhow!("writing standard output: {e}")
    }
}

/// Writes all of `data` to standard output (a pipe left non-blocking by another process is
/// waited on, not spun on).
fn write_stdout(data: &[u8]) -> Result<()> {
    let out = std::io::stdout();
    let fd = out.as_fd();
    let mut at = 0;
    while at < data.len() {
        match nix::unistd::write(fd, &data[at..]) {
            Ok(0) => return Err(stdout_error(ErrorKind::WriteZero.into())),
            Ok(n) => at += n,
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => wait_writable(fd)?,
            Err(e) => return Err(stdout_error(e.into())),
        }
    }
    Ok(())
}

fn wait_writable(fd: std::os::fd::BorrowedFd<'_>) -> Result<()> {
    let mut fds = [PollFd::new(fd, PollFlags::POLLOUT)];
    match nix::poll::poll(&mut fds, PollTimeout::NONE) {
        Ok(_) | Err(Errno::EINTR) => Ok(()),
        Err(e) => Err(stdout_error(e.into())),
    }
}

/// Sends a piece (`length` bytes at `at` in the file at `path`) to standard output. `Ok(false)`:
/// the file is not there for this process (gone, unreadable, too short) and nothing was written:
/// take the bytes from the API.
fn send_file(path: &Path, at: u64, length: u64) -> Result<bool> {
    let Some(src) = open_piece(path, at, length)? else {
        return Ok(false);
    };
    let out = std::io::stdout();
    let fd = out.as_fd();
    let end = at + length;
    let mut off = i64::try_from(at)?;
    while (off as u64) < end {
        let chunk = (end - off as u64).min(1 << 30) as usize;
        match nix::sys::sendfile::sendfile64(fd, &src, Some(&mut off), chunk) {
            Ok(0) => bail!("{} ended before its {length} bytes", path.display()),
            Ok(_) => {}
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => wait_writable(fd)?,
            // An output sendfile cannot write to (e.g. opened for appending): plain writes.
            Err(Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP) => {
                let mut buf = vec![0u8; (end - off as u64).min(1 << 20) as usize];
                while (off as u64) < end {
                    let n = (end - off as u64).min(buf.len() as u64) as usize;
                    src.read_exact_at(&mut buf[..n], off as u64)
                        .map_err(|e| anyhow!("reading {}: {e}", path.display()))?;
                    write_stdout(&buf[..n])?;
                    off += n as i64;
                }
                return Ok(true);
            }
            Err(e) => return Err(stdout_error(e.into())),
        }
    }
    Ok(true)
}

/// The file holding a piece if this process can read it and it holds `at..at + length`.
fn open_piece(path: &Path, at: u64, length: u64) -> Result<Option<File>> {
    let src = match File::open(path) {
        Ok(f) => f,
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::PermissionDenied) => {
            return Ok(None);
        }
        Err(e) => bail!("opening {}: {e}", path.display()),
    };
    match src.metadata() {
        Ok(m) if at.checked_add(length).is_some_and(|end| m.len() >= end) => Ok(Some(src)),
        _ => Ok(None),
    }
}

/// Copies a piece (`length` bytes at `at` in the file at `path`) into `out` at `offset`.
/// `Ok(false)`: the file is not there for this process (gone, unreadable, too short): take the
/// bytes from the API.
fn copy_file(
    path: &Path,
    at: u64,
    length: u64,
    out: &File,
    out_path: &Path,
    offset: u64,
) -> Result<bool> {
    let Some(src) = open_piece(path, at, length)? else {
        return Ok(false);
    };
    let (mut off_in, mut off_out) = (i64::try_from(at)?, i64::try_from(offset)?);
    let mut left = length;
    while left > 0 {
        let chunk = left.min(1 << 30) as usize;
        match nix::fcntl::copy_file_range(&src, Some(&mut off_in), out, Some(&mut off_out), chunk) {
            Ok(0) => return Ok(false),
            Ok(n) => left -= n as u64,
            Err(Errno::EINTR) => {}
            // Filesystems (or kernels) that cannot copy between these two files.
            Err(
                Errno::EXDEV | Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP | Errno::EPERM,
            ) => {
                plain_copy(&src, off_in as u64, out, off_out as u64, left)
                    .map_err(|e| io_error(e, out_path))?;
                break;
            }
            Err(e) => return Err(io_error(e.into(), out_path)),
        }
    }
    df_node::store::start_writeback(out, offset, length);
    Ok(true)
}

fn plain_copy(
    src: &File,
    mut from: u64,
    out: &File,
    mut at: u64,
    mut left: u64,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; (left.min(1 << 20)) as usize];
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        src.read_exact_at(&mut buf[..n], from)?;
        out.write_all_at(&buf[..n], at)?;
        (from, at, left) = (from + n as u64, at + n as u64, left - n as u64);
    }
    Ok(())
}

/// A piece's bytes through the API, each chunk handed to `write` (with its offset in the
/// content) on a blocking thread, in order.
async fn fetch_range<W>(api: &ApiClient, id: &str, piece: &PieceFile, write: W) -> Result<()>
where
    W: Fn(u64, bytes::Bytes) -> Result<()> + Clone + Send + 'static,
{
    let range = piece.offset..piece.offset + piece.length;
    let (len, mut stream) = api
        .content(id, Some(range.clone()))
        .await
        .map_err(crate::get::describe)?;
    if len != piece.length {
        bail!(
            "the node streams {len} bytes of piece {} ({} listed)",
            piece.index,
            piece.length
        );
    }
    let mut at = range.start;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(crate::get::describe)?;
        if at + chunk.len() as u64 > range.end {
            bail!("the node streamed more than piece {}", piece.index);
        }
        let n = chunk.len() as u64;
        let write = write.clone();
        tokio::task::spawn_blocking(move || write(at, chunk)).await??;
        at += n;
    }
    if at != range.end {
        bail!(
            "piece {} ended after {} of {} bytes",
            piece.index,
            at - range.start,
            piece.length
        );
    }
    Ok(())
}

/// What a copy has moved so far.
#[derive(Default)]
struct Tally {
    written: u64,
    from_files: u32,
    through_api: u32,
}

impl Tally {
    /// A piece of `length` bytes is in the linked file.
    fn linked(&mut self, length: u64) -> u64 {
        self.from_files += 1;
        self.written += length;
        self.written
    }

    /// A piece of `length` bytes is in place, from the node's file or through the API.
    fn add(&mut self, length: u64, from_file: bool) -> u64 {
        if from_file {
            self.from_files += 1;
        } else {
            self.through_api += 1;
        }
        self.written += length;
        self.written
    }

    fn finish(self, total: u64, linked: Option<Linked>) -> Result<Copied> {
        if self.written != total {
            bail!("the node listed {} of {total} bytes", self.written);
        }
        Ok(Copied::All {
            from_files: self.from_files,
            through_api: self.through_api,
            linked,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_piece_file_lands_at_its_offset_and_a_missing_one_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let piece = dir.path().join("3");
        std::fs::write(&piece, b"world").unwrap();
        let out = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.path().join("out"))
            .unwrap();
        out.set_len(11).unwrap();
        out.write_all_at(b"hello ", 0).unwrap();
        assert!(copy_file(&piece, 0, 5, &out, &dir.path().join("out"), 6).unwrap());
        assert_eq!(
            std::fs::read(dir.path().join("out")).unwrap(),
            b"hello world"
        );
        // A piece further in a file: from its offset there.
        assert!(copy_file(&piece, 1, 3, &out, &dir.path().join("out"), 0).unwrap());
        assert_eq!(
            std::fs::read(dir.path().join("out")).unwrap(),
            b"orllo world"
        );
        out.write_all_at(b"hel", 0).unwrap();
        // Gone, or shorter than listed: the caller takes the API instead.
        assert!(
            !copy_file(
                &dir.path().join("4"),
                0,
                5,
                &out,
                &dir.path().join("out"),
                0
            )
            .unwrap()
        );
        assert!(!copy_file(&piece, 0, 6, &out, &dir.path().join("out"), 0).unwrap());
        assert!(!copy_file(&piece, 3, 3, &out, &dir.path().join("out"), 0).unwrap());
        assert_eq!(
            std::fs::read(dir.path().join("out")).unwrap(),
            b"hello world"
        );
    }

    #[test]
    fn a_piece_file_not_there_for_stdout_leaves_it_to_the_api_writing_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let piece = dir.path().join("3");
        std::fs::write(&piece, b"world").unwrap();
        // Gone, or shorter than listed: nothing is written, the caller takes the API.
        assert!(!send_file(&dir.path().join("4"), 0, 5).unwrap());
        assert!(!send_file(&piece, 0, 6).unwrap());
        assert!(!send_file(&piece, 2, 4).unwrap());
    }

    #[test]
    fn the_plain_copy_fallback_moves_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.path().join("src"), &data).unwrap();
        let src = File::open(dir.path().join("src")).unwrap();
        let out = File::create(dir.path().join("out")).unwrap();
        plain_copy(&src, 1000, &out, 7, 2_500_000).unwrap();
        let got = std::fs::read(dir.path().join("out")).unwrap();
        assert_eq!(got.len(), 2_500_007);
        assert_eq!(&got[7..], &data[1000..2_501_000]);
    }

    #[test]
    fn only_an_api_on_this_host_is_local() {
        assert!(api_is_local(&ApiAddr::Unix("/d/api.sock".into())));
        assert!(api_is_local(&ApiAddr::Tcp(
            "127.0.0.1:65000".parse().unwrap()
        )));
        assert!(api_is_local(&ApiAddr::Tcp("[::1]:65000".parse().unwrap())));
        assert!(!api_is_local(&ApiAddr::Tcp(
            "10.0.0.2:65000".parse().unwrap()
        )));
    }
}
