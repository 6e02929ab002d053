//! The piece store: the [`PieceStore`] trait, the node's [`RocksStore`] (RocksDB with one column family
//! per kind of record, and a content file per task) and an in-memory [`MemStore`].
//!
//! | column family | key | value |
//! |---|---|---|
//! | `tasks` | task | JSON [`TaskRecord`]: signed header, completion, last access |
//! | `hashes` | task ‖ index | JSON: producer + signed piece hash |
//! | `pieces` | task ‖ index | read only: pieces of stores written before content files (below) |
//! | `have` | task ‖ index | the piece is stored: offset ‖ length in the content file (u64 BE each; empty in stores written before content files) |
//!
//! `task` is the task key's CID bytes prefixed by their length, so one task's records are a prefix range.
//!
//! A task's bytes are one file, `<store>/content/<task>`, each piece written in place at its
//! offset in the content, not RocksDB values: as values every byte went through a memtable and a
//! flush, and on a 1 GiB one-hop download RocksDB stopped writes ~130 times waiting for those
//! flushes ("Stopping writes because we have 2 immutable memtables"). RocksDB indexes the file:
//! a piece's `have` marker holds where its bytes lie (offset and length, written after the
//! bytes). One file per task (not one per piece) lets `df get -o` on the same filesystem make
//! the output a hard link to it instead of writing every byte a second time. A complete task's
//! record keeps the file's modification time: a file changed since (through such a link) is
//! dropped instead of served, and the task fetched again. `have` markers are written without the
//! write-ahead log: a crash loses at most markers of pieces that are then fetched again.
//! Everything else goes through the WAL.
//!
//! "Complete" is durable: [`RocksStore::flush`] fsyncs the content files written since the last
//! flush, then RocksDB's memtables, before a task is marked complete, and [`PieceStore::reopen_incomplete`] reopens at start any task marked
//! complete whose pieces are not all held (a crash before that flush, a damaged store), so it is
//! fetched again instead of failing every later download.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use df_protocols::PeerId;
use df_protocols::manifest::{PieceHashBatch, SignedHeader, SignedPieceHash};
use df_protocols::piece::Bitfield;
use df_protocols::task::TaskKey;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DB, DBCompressionType, Direction,
    IteratorMode, Options, WriteBatch, WriteOptions,
};
use serde::{Deserialize, Serialize};

use crate::config::StorageConfig;

const CF_TASKS: &str = "tasks";
const CF_HASHES: &str = "hashes";
const CF_PIECES: &str = "pieces";
const CF_HAVE: &str = "have";

/// Errors of the piece store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no space left on device for the piece store")]
    NoSpace,
    #[error("piece store I/O error: {0}")]
    Io(String),
    #[error("corrupt record in the piece store: {0}")]
    Corrupt(String),
}

impl From<rocksdb::Error> for StoreError {
    fn from(e: rocksdb::Error) -> Self {
        let msg = e.into_string();
        if msg.contains("No space left") || msg.contains("NoSpace") {
            StoreError::NoSpace
        } else {
            StoreError::Io(msg)
        }
    }
}

/// What the store keeps about a task.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskRecord {
    pub header: SignedHeader,
    pub complete: bool,
    /// Seconds since the Unix epoch of the last download or upload of this task.
    pub last_access: u64,
    /// Set by the store when the task is stored complete: the content file's modification time
    /// (ns since the Unix epoch) after its last piece. A file whose time differs has been
    /// changed since (e.g. through a `df get -o` output linked to it) and is not served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_mtime: Option<u64>,
}

#[derive(Clone, Serialize, Deserialize)]
struct StoredHash {
    producer: PeerId,
    #[serde(flatten)]
    hash: SignedPieceHash,
}

/// Adds a stored hash to the batch of its producer (grouping a task's hashes by producer).
fn add_to_batches(batches: &mut Vec<PieceHashBatch>, s: StoredHash) {
    match batches.iter_mut().find(|b| b.producer == s.producer) {
        Some(b) => b.hashes.push(s.hash),
        None => batches.push(PieceHashBatch {
            producer: s.producer,
            hashes: vec![s.hash],
        }),
    }
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A task's records and piece bytes: what a node keeps. [`RocksStore`] is the node's (RocksDB
/// for records, a file per piece); [`MemStore`] keeps everything in memory, for tests and for
/// code that needs a store without a disk. Every method may block: call them from
/// `spawn_blocking` in async code.
pub trait PieceStore: Send + Sync + 'static {
    /// Stores (or replaces) a task's record.
    fn put_task(&self, rec: &TaskRecord) -> Result<(), StoreError>;
    fn task(&self, task: &TaskKey) -> Result<Option<TaskRecord>, StoreError>;
    /// Every task record (unparseable ones are skipped and logged).
    fn tasks(&self) -> Result<Vec<TaskRecord>, StoreError>;
    /// Stores signed piece hashes of `producer` (a later hash of the same piece replaces one).
    fn put_hashes(
        &self,
        task: &TaskKey,
        producer: PeerId,
        hashes: &[SignedPieceHash],
    ) -> Result<(), StoreError>;
    /// All stored piece hashes of a task, grouped by producer.
    fn hashes(&self, task: &TaskKey) -> Result<Vec<PieceHashBatch>, StoreError>;
    /// Stores a piece (already verified by the caller) whose bytes lie at `offset` in the
    /// content, and marks it held. A piece already held is not written again.
    fn put_piece(
        &self,
        task: &TaskKey,
        index: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), StoreError>;
    fn piece(&self, task: &TaskKey, index: u32) -> Result<Option<Vec<u8>>, StoreError>;
    /// A piece's bytes for sending: an open file where the store keeps pieces in files (read a
    /// chunk at a time, never whole), else the bytes.
    fn piece_data(&self, task: &TaskKey, index: u32) -> Result<Option<PieceData>, StoreError> {
        Ok(self.piece(task, index)?.map(PieceData::Bytes))
    }
    /// The file holding a stored piece and where in it, for a reader on this host that copies
    /// the bytes itself (`copy_file_range`, a hard link) instead of taking them through the API;
    /// `None` when the store keeps the piece elsewhere (in memory, as a RocksDB value) or does
    /// not hold it. A held piece's bytes are never rewritten.
    fn piece_file(&self, task: &TaskKey, index: u32) -> Result<Option<FileSpan>, StoreError> {
        let _ = (task, index);
        Ok(None)
    }
    /// Which of a task's `count` pieces are stored.
    fn bitfield(&self, task: &TaskKey, count: u32) -> Result<Bitfield, StoreError>;
    /// How many pieces of a task are stored.
    fn held_count(&self, task: &TaskKey) -> Result<usize, StoreError>;
    /// Forgets a piece (its marker and bytes), e.g. after finding it missing or corrupt.
    fn drop_piece(&self, task: &TaskKey, index: u32) -> Result<(), StoreError>;
    /// Removes everything stored for a task.
    fn delete_task(&self, task: &TaskKey) -> Result<(), StoreError>;
    /// Bytes the store uses.
    fn disk_usage(&self) -> u64;
    /// Makes what is stored durable.
    fn flush(&self) -> Result<(), StoreError>;
    /// Brings the store back after a full disk (see [`RocksStore`]).
    fn recover(&self) -> Result<(), StoreError>;
    /// Closes the store for good before the process exits; later operations fail.
    fn close(&self);

    /// Marks a task not complete (it keeps what it holds), so the next download fetches what is
    /// missing. Returns whether it was marked complete.
    fn reopen(&self, task: &TaskKey) -> Result<bool, StoreError> {
        match self.task(task)? {
            Some(mut rec) if rec.complete => {
                rec.complete = false;
                self.put_task(&rec)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Reopens every task marked complete that does not hold all its pieces; returns their keys.
    fn reopen_incomplete(&self) -> Result<Vec<TaskKey>, StoreError> {
        let mut out = Vec::new();
        for rec in self.tasks()? {
            if !rec.complete {
                continue;
            }
            let key = rec.header.header.task;
            let n = rec.header.header.layout().piece_count();
            if !self.bitfield(&key, n)?.is_complete() {
                self.reopen(&key)?;
                out.push(key);
            }
        }
        Ok(out)
    }
}

/// Where a stored piece's bytes lie: `offset` in the file at `path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSpan {
    pub path: PathBuf,
    pub offset: u64,
}

/// A stored piece's bytes, as [`PieceStore::piece_data`] hands them out.
#[derive(Debug)]
pub enum PieceData {
    /// The file holding the piece, open for reading and positioned at the piece's first byte
    /// (`offset`); the piece is the `len` bytes from there.
    File {
        file: std::fs::File,
        offset: u64,
        len: u64,
    },
    Bytes(Vec<u8>),
}

impl PieceData {
    pub fn len(&self) -> u64 {
        match self {
            PieceData::File { len, .. } => *len,
            PieceData::Bytes(b) => b.len() as u64,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The store a node uses; cheap to clone.
pub type Store = Arc<dyn PieceStore>;

/// The node's store: RocksDB for records and markers, a file per piece (see the module docs).
/// Cheap to clone. All methods block: call them from `spawn_blocking`.
#[derive(Clone)]
pub struct RocksStore {
    inner: Arc<StoreInner>,
}

struct StoreInner {
    /// The open database; replaced by [`RocksStore::recover`] after a full disk (`None` only
    /// when reopening it failed).
    db: RwLock<Option<Arc<DB>>>,
    /// Times the database was reopened: a writer that failed on a full disk reopens it only if
    /// nobody did since its write began.
    generation: std::sync::atomic::AtomicU64,
    /// Set by [`RocksStore::close`]: nothing opens or uses the database again.
    closed: std::sync::atomic::AtomicBool,
    dir: PathBuf,
    cfg: StorageConfig,
    /// Where content files live: `<dir>/content`.
    content: PathBuf,
    /// Bytes in content files, kept as pieces are written and tasks removed (read off the disk
    /// at open), so that [`RocksStore::disk_usage`] does not walk the directory.
    file_bytes: std::sync::atomic::AtomicU64,
    /// Content files open for writing, by task (see [`ContentFile`]).
    open_files: std::sync::Mutex<std::collections::HashMap<TaskKey, Arc<ContentFile>>>,
    /// Content files (and the content directory) written since the last [`RocksStore::flush`].
    unsynced: std::sync::Mutex<std::collections::HashSet<PathBuf>>,
}

/// Content files kept open for writing at most (an unused one is closed to make room).
const OPEN_FILES: usize = 64;

/// A task's content file, open for writing pieces into.
struct ContentFile {
    file: std::fs::File,
    /// False once the task was deleted (or its file dropped). A writer holds the read lock from
    /// its write to its `have` marker, so a deletion waits for writes under way, and a write that
    /// took this handle before the deletion adds nothing after it.
    live: RwLock<bool>,
    /// The file's modification time after the store's last write to it (ns since the epoch).
    written: std::sync::Mutex<Option<u64>>,
    /// Pieces being written now: a second writer of one (an endgame duplicate) waits for the
    /// first, then finds it held.
    writing: std::sync::Mutex<std::collections::HashSet<u32>>,
    written_one: std::sync::Condvar,
}

impl ContentFile {
    /// Claims piece `index` for writing; waits while another writer has it.
    fn claim(&self, index: u32) -> Claim<'_> {
        let mut w = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        while w.contains(&index) {
            w = self.written_one.wait(w).unwrap_or_else(|p| p.into_inner());
        }
        w.insert(index);
        Claim { file: self, index }
    }
}

/// A piece being written (see [`ContentFile::claim`]); released when dropped.
struct Claim<'a> {
    file: &'a ContentFile,
    index: u32,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut w = self.file.writing.lock().unwrap_or_else(|p| p.into_inner());
        w.remove(&self.index);
        self.file.written_one.notify_all();
    }
}

/// A file's modification time in ns since the Unix epoch.
fn mtime_ns(m: &std::fs::Metadata) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let s = u64::try_from(m.mtime()).ok()?;
    let ns = u64::try_from(m.mtime_nsec()).ok()?;
    s.checked_mul(1_000_000_000)?.checked_add(ns)
}

/// Bytes a file takes on disk (content files are sparse until complete).
fn allocated(m: &std::fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    (m.blocks() * 512).min(m.len().next_multiple_of(4096))
}

/// Bytes a piece of `len` bytes adds on disk.
fn piece_blocks(len: usize) -> u64 {
    (len as u64).next_multiple_of(4096)
}

/// A `have` marker's value: where the piece lies in the content file.
fn span_value(offset: u64, len: u64) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&offset.to_be_bytes());
    v[8..].copy_from_slice(&len.to_be_bytes());
    v
}

/// A marker's span; `None` for an empty marker (a store written before content files).
fn parse_span(v: &[u8]) -> Result<Option<(u64, u64)>, StoreError> {
    match v.len() {
        0 => Ok(None),
        16 => {
            let (o, l) = v.split_at(8);
            let o: [u8; 8] = o
                .try_into()
                .map_err(|_| StoreError::Corrupt("marker".into()))?;
            let l: [u8; 8] = l
                .try_into()
                .map_err(|_| StoreError::Corrupt("marker".into()))?;
            Ok(Some((u64::from_be_bytes(o), u64::from_be_bytes(l))))
        }
        n => Err(StoreError::Corrupt(format!("a have marker of {n} bytes"))),
    }
}

/// Sums the content files under `content`; returns the names of directories found there (a store
/// written before content files kept a directory of piece files per task).
fn scan_content(content: &Path) -> (u64, Vec<PathBuf>) {
    let mut total = 0;
    let mut dirs = Vec::new();
    for f in std::fs::read_dir(content).into_iter().flatten().flatten() {
        match f.metadata() {
            Ok(m) if m.is_dir() => dirs.push(f.path()),
            Ok(m) => total += allocated(&m),
            Err(_) => {}
        }
    }
    (total, dirs)
}

fn io_error(e: std::io::Error) -> StoreError {
    if e.kind() == std::io::ErrorKind::StorageFull || e.raw_os_error() == Some(28) {
        StoreError::NoSpace
    } else {
        StoreError::Io(e.to_string())
    }
}

fn cf<'a>(db: &'a DB, name: &str) -> Result<&'a rocksdb::ColumnFamily, StoreError> {
    db.cf_handle(name)
        .ok_or_else(|| StoreError::Corrupt(format!("column family {name} missing")))
}

fn task_prefix(task: &TaskKey) -> Vec<u8> {
    let b = task.to_bytes();
    let mut out = Vec::with_capacity(1 + b.len() + 4);
    out.push(b.len() as u8);
    out.extend(b);
    out
}

fn piece_key(task: &TaskKey, index: u32) -> Vec<u8> {
    let mut k = task_prefix(task);
    k.extend(index.to_be_bytes());
    k
}

/// The keys of every record of a task: `start..end`.
fn task_range(task: &TaskKey) -> (Vec<u8>, Vec<u8>) {
    let start = task_prefix(task);
    let mut end = start.clone();
    end.extend([0xff; 5]);
    (start, end)
}

fn index_of(key: &[u8], prefix_len: usize) -> Option<u32> {
    let b: [u8; 4] = key.get(prefix_len..prefix_len + 4)?.try_into().ok()?;
    Some(u32::from_be_bytes(b))
}

impl RocksStore {
    /// Opens (creating if needed) the store in `dir`.
    pub fn open(dir: &Path, cfg: &StorageConfig) -> Result<RocksStore, StoreError> {
        let db = Self::open_db(dir, cfg)?;
        let content = dir.join("content");
        std::fs::create_dir_all(&content).map_err(io_error)?;
        let (file_bytes, legacy) = scan_content(&content);
        let store = RocksStore {
            inner: Arc::new(StoreInner {
                db: RwLock::new(Some(Arc::new(db))),
                generation: std::sync::atomic::AtomicU64::new(0),
                closed: std::sync::atomic::AtomicBool::new(false),
                dir: dir.to_path_buf(),
                cfg: cfg.clone(),
                content,
                file_bytes: std::sync::atomic::AtomicU64::new(file_bytes),
                open_files: Default::default(),
                unsynced: Default::default(),
            }),
        };
        for d in legacy {
            store.drop_legacy_dir(&d)?;
        }
        Ok(store)
    }

    /// Drops a directory of piece files (a store written before content files) and the `have`
    /// markers of its task: those pieces are fetched again. Reading them where they are would
    /// keep two layouts alive for a cache's worth of bytes.
    fn drop_legacy_dir(&self, dir: &Path) -> Result<(), StoreError> {
        let task = dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<TaskKey>().ok());
        if let Some(task) = task {
            self.clear_markers(&task)?;
            self.reopen(&task)?;
        }
        tracing::info!(dir = %dir.display(), "dropping piece files of an older store layout; they are fetched again");
        match std::fs::remove_dir_all(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_error(e)),
            _ => Ok(()),
        }
    }

    /// Removes every `have` marker of a task.
    fn clear_markers(&self, task: &TaskKey) -> Result<(), StoreError> {
        let (start, end) = task_range(task);
        self.write_recovering(|db| {
            let mut batch = WriteBatch::default();
            batch.delete_range_cf(cf(db, CF_HAVE)?, &start, &end);
            Ok(db.write(batch)?)
        })
    }

    fn open_db(dir: &Path, cfg: &StorageConfig) -> Result<DB, StoreError> {
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_atomic_flush(true);
        db_opts.set_max_background_jobs(2);
        db_opts.set_keep_log_file_num(4);
        db_opts.set_max_total_wal_size(64 << 20);
        db_opts.set_db_write_buffer_size(cfg.memtable_budget.as_u64() as usize);

        let cache = Cache::new_lru_cache(8 << 20);
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&cache);

        let mut small = Options::default();
        small.set_block_based_table_factory(&table);
        small.set_write_buffer_size(4 << 20);

        let mut pieces = Options::default();
        pieces.set_block_based_table_factory(&table);
        pieces.set_enable_blob_files(true);
        pieces.set_min_blob_size(64 << 10);
        pieces.set_blob_file_size(256 << 20);
        pieces.set_blob_compression_type(DBCompressionType::None);
        // No blob GC: it rewrites live pieces during compactions (measured: a third of a node's
        // CPU while downloading). Pieces are deleted a task at a time, and a blob file is removed
        // once no SST references it; `delete_task` compacts the task's range to get there.
        pieces.set_enable_blob_gc(false);
        pieces.set_write_buffer_size((cfg.memtable_budget.as_u64() / 2) as usize);
        pieces.set_max_write_buffer_number(2);

        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_TASKS, small.clone()),
            ColumnFamilyDescriptor::new(CF_HASHES, small.clone()),
            ColumnFamilyDescriptor::new(CF_PIECES, pieces),
            ColumnFamilyDescriptor::new(CF_HAVE, small),
        ];
        Ok(DB::open_cf_descriptors(&db_opts, dir, cfs)?)
    }

    /// The open database (a reference; the store may replace it in [`RocksStore::recover`]).
    fn db(&self) -> Result<Arc<DB>, StoreError> {
        if self.inner.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Io("the piece store is closed".into()));
        }
        self.inner
            .db
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| StoreError::Io("the piece store could not be reopened".into()))
    }

    fn generation(&self) -> u64 {
        self.inner
            .generation
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Reopens the database unless that happened since `generation`.
    fn recover_since(&self, generation: u64) -> Result<(), StoreError> {
        let mut slot = self.inner.db.write().unwrap_or_else(|p| p.into_inner());
        if self.inner.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Io("the piece store is closed".into()));
        }
        if self.generation() != generation {
            return Ok(());
        }
        if let Some(old) = slot.take() {
            // Operations still using the old handle finish first, so that it really closes.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while Arc::strong_count(&old) > 1 && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            if Arc::strong_count(&old) > 1 {
                *slot = Some(old);
                return Err(StoreError::Io("piece store busy; not reopened".into()));
            }
            old.cancel_all_background_work(true);
            drop(old);
        }
        *slot = Some(Arc::new(Self::open_db(&self.inner.dir, &self.inner.cfg)?));
        self.inner
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tracing::warn!("piece store reopened after a full disk");
        Ok(())
    }

    /// Runs a write; after a full disk (which leaves RocksDB refusing every write until it is
    /// reopened) reopens the store and tries once more, so one full-disk event does not fail
    /// every later write once space is back.
    fn write_recovering(
        &self,
        write: impl Fn(&DB) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let generation = self.generation();
        let first = {
            let db = self.db()?;
            write(&db)
        };
        match first {
            Err(StoreError::NoSpace) => {
                if let Err(e) = self.recover_since(generation) {
                    tracing::warn!(error = %e, "reopening the piece store failed");
                    return Err(StoreError::NoSpace);
                }
                let db = self.db()?;
                write(&db)
            }
            other => other,
        }
    }

    fn add_file_bytes(&self, added: u64, removed: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let _ = self.inner.file_bytes.fetch_update(Relaxed, Relaxed, |v| {
            Some(v.saturating_add(added).saturating_sub(removed))
        });
    }

    /// A task's content file.
    fn content_path(&self, task: &TaskKey) -> PathBuf {
        self.inner.content.join(task.to_string())
    }

    /// The task's content file, open for writing (created when missing).
    fn content_file(&self, task: &TaskKey) -> Result<Arc<ContentFile>, StoreError> {
        let mut open = self
            .inner
            .open_files
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(f) = open.get(task) {
            return Ok(f.clone());
        }
        if open.len() >= OPEN_FILES {
            open.retain(|_, f| Arc::strong_count(f) > 1);
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.content_path(task))
            .map_err(io_error)?;
        let f = Arc::new(ContentFile {
            file,
            live: RwLock::new(true),
            written: Default::default(),
            writing: Default::default(),
            written_one: Default::default(),
        });
        open.insert(*task, f.clone());
        if let Ok(mut u) = self.inner.unsynced.lock() {
            u.insert(self.inner.content.clone());
        }
        Ok(f)
    }

    /// Unlinks a task's content file (a hard-linked output keeps its bytes) and stops counting
    /// them.
    fn remove_content_file(&self, task: &TaskKey) -> Result<(), StoreError> {
        let path = self.content_path(task);
        let len = std::fs::metadata(&path).map(|m| allocated(&m)).unwrap_or(0);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_error(e)),
            _ => {
                self.add_file_bytes(0, len);
                Ok(())
            }
        }
    }

    /// Closes a task's content file for writing; waits for writes under way, and refuses the
    /// later ones of whoever still holds the handle.
    fn forget_file(&self, task: &TaskKey) {
        let f = self
            .inner
            .open_files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(task);
        if let Some(f) = f {
            *f.live.write().unwrap_or_else(|p| p.into_inner()) = false;
        }
    }

    /// A piece's `have` marker: `None` when not held; `Some(None)` for a piece of a store
    /// written before content files; else where it lies.
    fn marker(
        &self,
        db: &DB,
        task: &TaskKey,
        index: u32,
    ) -> Result<Option<Option<(u64, u64)>>, StoreError> {
        match db.get_pinned_cf(cf(db, CF_HAVE)?, piece_key(task, index))? {
            None => Ok(None),
            Some(v) => Ok(Some(parse_span(&v)?)),
        }
    }

    /// A piece held as a RocksDB value (stores written before piece files).
    fn legacy_piece(
        &self,
        db: &DB,
        task: &TaskKey,
        index: u32,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(db
            .get_pinned_cf(cf(db, CF_PIECES)?, piece_key(task, index))?
            .map(|v| v.to_vec()))
    }

    /// Where a held piece lies in its content file; `None` when it is not held in one, or when
    /// the file of a complete task was changed since (it is dropped then: see [`Self::sealed`]).
    fn located(
        &self,
        db: &DB,
        task: &TaskKey,
        index: u32,
    ) -> Result<Option<(u64, u64)>, StoreError> {
        let Some(Some(span)) = self.marker(db, task, index)? else {
            return Ok(None);
        };
        match self.record(db, task)? {
            Some(rec) if !self.sealed(&rec)? => Ok(None),
            _ => Ok(Some(span)),
        }
    }

    /// A task's record as stored.
    fn record(&self, db: &DB, task: &TaskKey) -> Result<Option<TaskRecord>, StoreError> {
        match db.get_pinned_cf(cf(db, CF_TASKS)?, task_prefix(task))? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| StoreError::Corrupt(format!("task {task}: {e}"))),
        }
    }

    /// Whether a task's content file is as the store left it: for a complete task, its
    /// modification time is the one recorded at completion. A file changed since (its bytes
    /// written through a hard link, e.g. a `df get -o` output the user edited) is dropped — its
    /// name, its markers, the task's completion — so it is fetched again instead of served.
    fn sealed(&self, rec: &TaskRecord) -> Result<bool, StoreError> {
        let (true, Some(want)) = (rec.complete, rec.content_mtime) else {
            return Ok(true);
        };
        let task = &rec.header.header.task;
        let path = self.content_path(task);
        let now = match std::fs::metadata(&path) {
            Ok(m) => mtime_ns(&m),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(true),
            Err(e) => return Err(io_error(e)),
        };
        if now == Some(want) {
            return Ok(true);
        }
        tracing::warn!(task = %task, file = %path.display(), "a complete task's content file was changed since it was stored (through a hard link?); dropping it to fetch it again");
        self.forget_file(task);
        self.remove_content_file(task)?;
        self.clear_markers(task)?;
        let mut open = rec.clone();
        open.complete = false;
        self.put_task(&open)?;
        Ok(false)
    }

    /// The modification time to seal a task's content file with: after the store's own last
    /// write where it has seen one, else the file's.
    fn written_mtime(&self, task: &TaskKey) -> Option<u64> {
        let cached = self
            .inner
            .open_files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(task)
            .and_then(|f| *f.written.lock().unwrap_or_else(|p| p.into_inner()));
        cached.or_else(|| {
            std::fs::metadata(self.content_path(task))
                .ok()
                .and_then(|m| mtime_ns(&m))
        })
    }
}

impl PieceStore for RocksStore {
    /// Brings the store back after a full disk: RocksDB stops all writes after a failed flush
    /// ("no space") and stays read-only until reopened. Closes and reopens the database (pieces
    /// of unfinished tasks still in memory are lost, and their `have` markers with them, so
    /// nothing claims them). Call once space may have been freed, e.g. after evicting.
    fn recover(&self) -> Result<(), StoreError> {
        self.recover_since(self.generation())
    }

    /// Stores a task's record; a complete one is sealed with its content file's modification
    /// time (see [`TaskRecord::content_mtime`]).
    fn put_task(&self, rec: &TaskRecord) -> Result<(), StoreError> {
        let mut rec = rec.clone();
        if !rec.complete {
            rec.content_mtime = None;
        } else if rec.content_mtime.is_none() {
            rec.content_mtime = self.written_mtime(&rec.header.header.task);
        }
        let v = serde_json::to_vec(&rec).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let key = task_prefix(&rec.header.header.task);
        self.write_recovering(|db| Ok(db.put_cf(cf(db, CF_TASKS)?, &key, &v)?))
    }

    /// A task's record; a complete task whose content file was changed behind the store is
    /// dropped first and comes back not complete (see [`RocksStore::sealed`]).
    fn task(&self, task: &TaskKey) -> Result<Option<TaskRecord>, StoreError> {
        let db = self.db()?;
        match self.record(&db, task)? {
            Some(rec) if !self.sealed(&rec)? => self.record(&db, task),
            rec => Ok(rec),
        }
    }

    /// Every task record (unparseable ones are skipped and logged).
    fn tasks(&self) -> Result<Vec<TaskRecord>, StoreError> {
        let db = self.db()?;
        let mut out = Vec::new();
        for item in db.iterator_cf(cf(&db, CF_TASKS)?, IteratorMode::Start) {
            let (k, v) = item?;
            match serde_json::from_slice::<TaskRecord>(&v) {
                Ok(rec) => out.push(rec),
                Err(e) => {
                    tracing::warn!(key = %hex::encode(&k), error = %e, "skipping corrupt task record")
                }
            }
        }
        Ok(out)
    }

    fn put_hashes(
        &self,
        task: &TaskKey,
        producer: PeerId,
        hashes: &[SignedPieceHash],
    ) -> Result<(), StoreError> {
        let mut values = Vec::with_capacity(hashes.len());
        for h in hashes {
            let v = serde_json::to_vec(&StoredHash {
                producer,
                hash: h.clone(),
            })
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            values.push((piece_key(task, h.index), v));
        }
        self.write_recovering(|db| {
            let hashes_cf = cf(db, CF_HASHES)?;
            let mut batch = WriteBatch::default();
            for (k, v) in &values {
                batch.put_cf(hashes_cf, k, v);
            }
            Ok(db.write(batch)?)
        })
    }

    /// All stored piece hashes of a task, grouped by producer.
    fn hashes(&self, task: &TaskKey) -> Result<Vec<PieceHashBatch>, StoreError> {
        let db = self.db()?;
        let prefix = task_prefix(task);
        let mut out: Vec<PieceHashBatch> = Vec::new();
        let iter = db.iterator_cf(
            cf(&db, CF_HASHES)?,
            IteratorMode::From(&prefix, Direction::Forward),
        );
        for item in iter {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            let s: StoredHash = serde_json::from_slice(&v)
                .map_err(|e| StoreError::Corrupt(format!("hash of {task}: {e}")))?;
            add_to_batches(&mut out, s);
        }
        Ok(out)
    }

    /// Writes a piece into its task's content file at its offset, then marks it held (the
    /// marker says where it lies). A piece already held is left as it is: its bytes are never
    /// rewritten while a reader (or a hard-linked output) may see them.
    fn put_piece(
        &self,
        task: &TaskKey,
        index: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), StoreError> {
        use std::os::unix::fs::FileExt;
        if self.marker(&*self.db()?, task, index)?.is_some() {
            return Ok(());
        }
        let f = self.content_file(task)?;
        let _claim = f.claim(index);
        let live = f.live.read().unwrap_or_else(|p| p.into_inner());
        if !*live {
            return Err(StoreError::Io(format!(
                "task {task} was removed while piece {index} was being stored"
            )));
        }
        // Written by another writer while this one waited for its claim.
        if self.marker(&*self.db()?, task, index)?.is_some() {
            return Ok(());
        }
        f.file.write_all_at(data, offset).map_err(io_error)?;
        start_writeback(&f.file, offset, data.len() as u64);
        if let Ok(m) = f.file.metadata() {
            *f.written.lock().unwrap_or_else(|p| p.into_inner()) = mtime_ns(&m);
        }
        self.add_file_bytes(piece_blocks(data.len()), 0);
        if let Ok(mut u) = self.inner.unsynced.lock() {
            u.insert(self.content_path(task));
        }
        let key = piece_key(task, index);
        let value = span_value(offset, data.len() as u64);
        self.write_recovering(|db| {
            let mut wo = WriteOptions::default();
            wo.disable_wal(true);
            Ok(db.put_cf_opt(cf(db, CF_HAVE)?, &key, value, &wo)?)
        })
    }

    fn piece_data(&self, task: &TaskKey, index: u32) -> Result<Option<PieceData>, StoreError> {
        use std::io::{Seek, SeekFrom};
        let db = self.db()?;
        let Some((offset, len)) = self.located(&db, task, index)? else {
            return Ok(self.legacy_piece(&db, task, index)?.map(PieceData::Bytes));
        };
        match std::fs::File::open(self.content_path(task)) {
            Ok(mut file) => {
                file.seek(SeekFrom::Start(offset)).map_err(io_error)?;
                Ok(Some(PieceData::File { file, offset, len }))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error(e)),
        }
    }

    fn piece_file(&self, task: &TaskKey, index: u32) -> Result<Option<FileSpan>, StoreError> {
        let db = self.db()?;
        let Some((offset, _)) = self.located(&db, task, index)? else {
            return Ok(None);
        };
        let path = self.content_path(task);
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => Ok(Some(FileSpan { path, offset })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error(e)),
        }
    }

    fn piece(&self, task: &TaskKey, index: u32) -> Result<Option<Vec<u8>>, StoreError> {
        use std::os::unix::fs::FileExt;
        let db = self.db()?;
        let Some((offset, len)) = self.located(&db, task, index)? else {
            return self.legacy_piece(&db, task, index);
        };
        let len = usize::try_from(len)
            .map_err(|_| StoreError::Corrupt(format!("piece {index} of {len} bytes")))?;
        let file = match std::fs::File::open(self.content_path(task)) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error(e)),
        };
        let mut buf = vec![0u8; len];
        match file.read_exact_at(&mut buf, offset) {
            Ok(()) => Ok(Some(buf)),
            // A file shorter than its markers say (damaged): the piece is not there.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
            Err(e) => Err(io_error(e)),
        }
    }

    /// Which of a task's `count` pieces are stored.
    fn bitfield(&self, task: &TaskKey, count: u32) -> Result<Bitfield, StoreError> {
        let db = self.db()?;
        let prefix = task_prefix(task);
        let mut bf = Bitfield::new(count);
        let iter = db.iterator_cf(
            cf(&db, CF_HAVE)?,
            IteratorMode::From(&prefix, Direction::Forward),
        );
        for item in iter {
            let (k, _) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            if let Some(i) = index_of(&k, prefix.len()) {
                bf.set(i);
            }
        }
        Ok(bf)
    }

    /// How many pieces of a task are stored.
    fn held_count(&self, task: &TaskKey) -> Result<usize, StoreError> {
        let db = self.db()?;
        let prefix = task_prefix(task);
        let mut n = 0;
        for item in db.iterator_cf(
            cf(&db, CF_HAVE)?,
            IteratorMode::From(&prefix, Direction::Forward),
        ) {
            let (k, _) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            n += 1;
        }
        Ok(n)
    }

    /// Closes the database for good before the process exits: waits (up to 10 s) for operations
    /// in flight, stops RocksDB's background threads and closes it, so no thread is inside
    /// RocksDB while the process tears down (that aborted it: "pthread lock: Invalid argument").
    /// Every later operation fails with "closed".
    fn close(&self) {
        self.inner
            .closed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.inner
            .open_files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        let mut slot = self.inner.db.write().unwrap_or_else(|p| p.into_inner());
        let Some(db) = slot.take() else {
            return;
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while Arc::strong_count(&db) > 1 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        db.cancel_all_background_work(true);
        if Arc::strong_count(&db) > 1 {
            tracing::warn!("piece store still in use at exit; leaving it open");
            *slot = Some(db);
        }
    }

    /// Forgets a piece (its `have` marker), e.g. after finding it missing or corrupt; its bytes
    /// in the content file are written again when it is fetched again.
    fn drop_piece(&self, task: &TaskKey, index: u32) -> Result<(), StoreError> {
        let db = self.db()?;
        let key = piece_key(task, index);
        let mut batch = WriteBatch::default();
        batch.delete_cf(cf(&db, CF_HAVE)?, &key);
        batch.delete_cf(cf(&db, CF_PIECES)?, &key);
        Ok(db.write(batch)?)
    }

    /// Removes everything stored for a task. A piece write under way finishes first; one that
    /// took the task's file before and writes after is refused.
    fn delete_task(&self, task: &TaskKey) -> Result<(), StoreError> {
        self.forget_file(task);
        let (start, end) = task_range(task);
        self.write_recovering(|db| {
            let mut batch = WriteBatch::default();
            batch.delete_cf(cf(db, CF_TASKS)?, &start);
            for name in [CF_HASHES, CF_PIECES, CF_HAVE] {
                batch.delete_range_cf(cf(db, name)?, &start, &end);
            }
            Ok(db.write(batch)?)
        })?;
        let path = self.content_path(task);
        if let Ok(mut u) = self.inner.unsynced.lock() {
            u.remove(&path);
        }
        self.remove_content_file(task)?;
        // Drop the range's SST entries now, so blob files holding only this task's pieces (in
        // stores written before piece files) become unreferenced and are deleted.
        let db = self.db()?;
        db.compact_range_cf(cf(&db, CF_PIECES)?, Some(&start), Some(&end));
        Ok(())
    }

    /// Bytes on disk used by the store's piece files and RocksDB's SST and blob files.
    fn disk_usage(&self) -> u64 {
        let Ok(db) = self.db() else {
            return Default::default();
        };
        self.inner
            .file_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
            + [CF_TASKS, CF_HASHES, CF_PIECES, CF_HAVE]
                .iter()
                .filter_map(|n| {
                    let cf = db.cf_handle(n)?;
                    let sst = db
                        .property_int_value_cf(cf, "rocksdb.total-sst-files-size")
                        .ok()
                        .flatten()
                        .unwrap_or(0);
                    let blob = db
                        .property_int_value_cf(cf, "rocksdb.total-blob-file-size")
                        .ok()
                        .flatten()
                        .unwrap_or(0);
                    let mem = db
                        .property_int_value_cf(cf, "rocksdb.cur-size-all-mem-tables")
                        .ok()
                        .flatten()
                        .unwrap_or(0);
                    Some(sst + blob + mem)
                })
                .sum::<u64>()
    }

    /// Makes what is stored durable: fsyncs the content files (and their directory) written
    /// since the last flush, then flushes RocksDB's memtables (`have` markers skip the WAL).
    fn flush(&self) -> Result<(), StoreError> {
        let db = self.db()?;
        let pending: Vec<PathBuf> = self
            .inner
            .unsynced
            .lock()
            .map(|mut u| u.drain().collect())
            .unwrap_or_default();
        for (i, p) in pending.iter().enumerate() {
            let synced = std::fs::File::open(p).and_then(|f| f.sync_all());
            match synced {
                Ok(()) => {}
                // Deleted since (the task was dropped): nothing to keep.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    if let Ok(mut u) = self.inner.unsynced.lock() {
                        u.extend(pending[i..].iter().cloned());
                    }
                    return Err(io_error(e));
                }
            }
        }
        let cfs: Vec<&rocksdb::ColumnFamily> = [CF_TASKS, CF_HASHES, CF_PIECES, CF_HAVE]
            .iter()
            .filter_map(|n| db.cf_handle(n))
            .collect();
        db.flush_cfs_opt(&cfs, &rocksdb::FlushOptions::default())?;
        Ok(())
    }
}

/// Starts writing bytes `offset..offset + len` of `f` (`len` 0: to the end) to disk without
/// waiting for them (`sync_file_range` with `SYNC_FILE_RANGE_WRITE`): the fsync that makes a
/// completed task (or `df get`'s output) durable then finds them written already, instead of
/// writing everything at once while the user waits (8 peers each completing 256 MiB at once spent
/// 2.5-3 s there). Advisory: a failure shows at that fsync.
pub fn start_writeback(f: &std::fs::File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: sync_file_range takes a descriptor and integers and touches no memory of ours; the
    // descriptor is open for the call's duration (borrowed from `f`).
    #[allow(unsafe_code)]
    let _ =
        unsafe { libc::sync_file_range(f.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE) };
}

/// Reads into `buf` at `offset` what the page cache holds there, without waiting for the disk
/// (`preadv2` with `RWF_NOWAIT`): the bytes read, from 0 (nothing cached, or a kernel or file
/// system without the flag) to `buf.len()`. The caller reads the rest with a blocking read off the
/// async threads. Pieces a node uploads were mostly written moments ago, so this saves the hand-off
/// to a blocking thread (two wake-ups) for each chunk. End of file is an error.
pub fn read_cached_at(f: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let mut done = 0usize;
    while done < buf.len() {
        let Ok(at) = i64::try_from(offset + done as u64) else {
            return Ok(done);
        };
        let rest = &mut buf[done..];
        let iov = libc::iovec {
            iov_base: rest.as_mut_ptr().cast::<libc::c_void>(),
            iov_len: rest.len(),
        };
        // SAFETY: one iovec over `rest`, which is valid for writes of its length and outlives
        // the call; the descriptor is open for the call's duration (borrowed from `f`).
        #[allow(unsafe_code)]
        let n = unsafe { libc::preadv2(f.as_raw_fd(), &raw const iov, 1, at, libc::RWF_NOWAIT) };
        match n {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n if n > 0 => done += n as usize,
            _ => {
                let e = std::io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::EAGAIN | libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS) => Ok(done),
                    Some(libc::EINTR) => continue,
                    _ => Err(e),
                };
            }
        }
    }
    Ok(done)
}

/// A store in memory: the same behaviour as [`RocksStore`] without a disk (durability aside), for
/// tests and for code that needs a store and no directory.
#[derive(Default)]
pub struct MemStore {
    state: std::sync::Mutex<MemState>,
    closed: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct MemState {
    tasks: std::collections::HashMap<TaskKey, TaskRecord>,
    /// Per task, per piece: the producer and its signed hash (a later one replaces).
    hashes: std::collections::HashMap<TaskKey, std::collections::BTreeMap<u32, StoredHash>>,
    pieces: std::collections::HashMap<TaskKey, std::collections::BTreeMap<u32, Vec<u8>>>,
}

impl MemStore {
    pub fn new() -> MemStore {
        MemStore::default()
    }

    fn state(&self) -> Result<std::sync::MutexGuard<'_, MemState>, StoreError> {
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Io("the piece store is closed".into()));
        }
        Ok(self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl PieceStore for MemStore {
    fn put_task(&self, rec: &TaskRecord) -> Result<(), StoreError> {
        self.state()?
            .tasks
            .insert(rec.header.header.task, rec.clone());
        Ok(())
    }

    fn task(&self, task: &TaskKey) -> Result<Option<TaskRecord>, StoreError> {
        Ok(self.state()?.tasks.get(task).cloned())
    }

    fn tasks(&self) -> Result<Vec<TaskRecord>, StoreError> {
        Ok(self.state()?.tasks.values().cloned().collect())
    }

    fn put_hashes(
        &self,
        task: &TaskKey,
        producer: PeerId,
        hashes: &[SignedPieceHash],
    ) -> Result<(), StoreError> {
        let mut st = self.state()?;
        let m = st.hashes.entry(*task).or_default();
        for h in hashes {
            m.insert(
                h.index,
                StoredHash {
                    producer,
                    hash: h.clone(),
                },
            );
        }
        Ok(())
    }

    fn hashes(&self, task: &TaskKey) -> Result<Vec<PieceHashBatch>, StoreError> {
        let st = self.state()?;
        let mut out: Vec<PieceHashBatch> = Vec::new();
        for s in st.hashes.get(task).into_iter().flat_map(|m| m.values()) {
            add_to_batches(&mut out, s.clone());
        }
        Ok(out)
    }

    fn put_piece(
        &self,
        task: &TaskKey,
        index: u32,
        _offset: u64,
        data: &[u8],
    ) -> Result<(), StoreError> {
        self.state()?
            .pieces
            .entry(*task)
            .or_default()
            .entry(index)
            .or_insert_with(|| data.to_vec());
        Ok(())
    }

    fn piece(&self, task: &TaskKey, index: u32) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .state()?
            .pieces
            .get(task)
            .and_then(|m| m.get(&index))
            .cloned())
    }

    fn bitfield(&self, task: &TaskKey, count: u32) -> Result<Bitfield, StoreError> {
        let mut bf = Bitfield::new(count);
        for i in self
            .state()?
            .pieces
            .get(task)
            .into_iter()
            .flat_map(|m| m.keys())
        {
            if *i < count {
                bf.set(*i);
            }
        }
        Ok(bf)
    }

    fn held_count(&self, task: &TaskKey) -> Result<usize, StoreError> {
        Ok(self.state()?.pieces.get(task).map_or(0, |m| m.len()))
    }

    fn drop_piece(&self, task: &TaskKey, index: u32) -> Result<(), StoreError> {
        if let Some(m) = self.state()?.pieces.get_mut(task) {
            m.remove(&index);
        }
        Ok(())
    }

    fn delete_task(&self, task: &TaskKey) -> Result<(), StoreError> {
        let mut st = self.state()?;
        st.tasks.remove(task);
        st.hashes.remove(task);
        st.pieces.remove(task);
        Ok(())
    }

    fn disk_usage(&self) -> u64 {
        self.state().map_or(0, |st| {
            st.pieces
                .values()
                .flat_map(|m| m.values())
                .map(|p| p.len() as u64)
                .sum()
        })
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.state().map(|_| ())
    }

    fn recover(&self) -> Result<(), StoreError> {
        self.state().map(|_| ())
    }

    fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use df_protocols::Keypair;
    use df_protocols::manifest::{TaskHeader, Validators};
    use df_protocols::piece::PieceHash;
    use df_protocols::task::parse_url;

    fn header(key: &Keypair, url: &str) -> SignedHeader {
        let u = parse_url(url).unwrap();
        TaskHeader {
            task: TaskKey::for_url(&u, ""),
            source_url: u.to_string(),
            content_length: 10,
            piece_length: 4,
            content_digest: None,
            validators: Validators::default(),
            producer: key.public().to_peer_id(),
        }
        .sign(key)
        .unwrap()
    }

    /// A fresh RocksStore in a temporary directory and a task header for `url`.
    fn fresh(url: &str) -> (tempfile::TempDir, RocksStore, SignedHeader, TaskKey) {
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path(), &StorageConfig::default()).unwrap();
        let h = header(&Keypair::generate_ed25519(), url);
        let t = h.header.task;
        (dir, store, h, t)
    }

    #[test]
    fn cached_reads_give_what_was_just_written_and_report_the_end_of_the_file() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("content");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&data)
            .unwrap();
        let f = std::fs::File::open(&path).unwrap();
        // Written moments ago, so in the page cache (or the file system lacks RWF_NOWAIT: then
        // nothing is read, and the caller reads it all blocking).
        let mut buf = vec![0u8; 100_000];
        let n = read_cached_at(&f, &mut buf, 150_000).unwrap();
        assert!(n == 0 || n == buf.len(), "{n}");
        assert_eq!(buf[..n], data[150_000..150_000 + n]);
        let mut past = vec![0u8; 10];
        let end = read_cached_at(&f, &mut past, 299_995);
        if n > 0 {
            let e = end.unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
            assert_eq!(past[..5], data[299_995..]);
        }
        assert!(read_cached_at(&f, &mut [], 0).is_ok_and(|n| n == 0));
    }

    /// A task's record as the runner stores it (last used at 1).
    fn record(h: &SignedHeader, complete: bool) -> TaskRecord {
        TaskRecord {
            header: h.clone(),
            complete,
            last_access: 1,
            content_mtime: None,
        }
    }

    #[test]
    fn pieces_land_at_their_offsets_in_one_file_that_goes_with_its_task() {
        let (dir, store, _, t) = fresh("http://h/files");
        let mib = 1usize << 20;
        let piece = |i: u8| vec![i; mib];
        // Eight writers of the same piece (endgame duplicates) at once: written once, whole.
        std::thread::scope(|sc| {
            for _ in 0..8 {
                let store = store.clone();
                sc.spawn(move || {
                    for _ in 0..5 {
                        store.put_piece(&t, 3, 3 * mib as u64, &piece(3)).unwrap();
                    }
                });
            }
        });
        assert_eq!(store.piece(&t, 3).unwrap().unwrap(), piece(3));
        let at = store.piece_file(&t, 3).unwrap().expect("a content file");
        assert_eq!(at.path, store.content_path(&t));
        assert_eq!(at.offset, 3 * mib as u64);
        let whole = std::fs::read(&at.path).unwrap();
        assert_eq!(
            whole.len(),
            4 * mib,
            "the file ends where its last written piece does"
        );
        assert_eq!(&whole[3 * mib..], &piece(3)[..]);
        assert!(store.bitfield(&t, 4).unwrap().get(3));
        // Nothing else in the content directory; the usage counts the piece once.
        let files: Vec<_> = std::fs::read_dir(&store.inner.content).unwrap().collect();
        assert_eq!(files.len(), 1);
        let files = |s: &RocksStore| {
            s.inner
                .file_bytes
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        assert_eq!(files(&store), mib as u64);
        // A piece already held is not written again (a reader may be copying it).
        store.put_piece(&t, 3, 3 * mib as u64, &piece(9)).unwrap();
        assert_eq!(store.piece(&t, 3).unwrap().unwrap(), piece(3));
        // The count survives a restart (read off the disk), and goes with the task.
        store.put_piece(&t, 0, 0, &[7; 1000]).unwrap();
        store.flush().unwrap();
        assert_eq!(files(&store), mib as u64 + 4096);
        store.close();
        let store = RocksStore::open(dir.path(), &StorageConfig::default()).unwrap();
        assert_eq!(files(&store), mib as u64 + 4096);
        assert_eq!(store.piece(&t, 0).unwrap().unwrap(), vec![7; 1000]);
        store.drop_piece(&t, 0).unwrap();
        assert_eq!(store.piece(&t, 0).unwrap(), None);
        // A write that took the file before the task was removed adds nothing after it.
        let held = store.content_file(&t).unwrap();
        store.delete_task(&t).unwrap();
        assert!(!*held.live.read().unwrap());
        assert_eq!(files(&store), 0);
        assert!(!store.content_path(&t).exists());
        assert_eq!(store.piece(&t, 3).unwrap(), None);
        assert!(!store.bitfield(&t, 4).unwrap().get(3));
    }

    #[test]
    fn a_complete_tasks_file_changed_behind_the_store_is_dropped_not_served() {
        let (dir, store, h, t) = fresh("http://h/linked");
        for (i, p) in [&b"abcd"[..], b"efgh", b"ij"].iter().enumerate() {
            store.put_piece(&t, i as u32, 4 * i as u64, p).unwrap();
        }
        store.flush().unwrap();
        store.put_task(&record(&h, true)).unwrap();
        assert!(store.task(&t).unwrap().unwrap().content_mtime.is_some());
        // A user's output hard-linked to the file, then edited.
        let out = dir.path().join("out");
        std::fs::hard_link(store.content_path(&t), &out).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"abcdefghij");
        // Past the filesystem's timestamp tick (a few ms), as a user's edit comes after the
        // download: an edit within the same tick is not seen (a documented limit).
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&out)
            .and_then(|f| std::os::unix::fs::FileExt::write_all_at(&f, b"XX", 0))
            .unwrap();
        // Not served: dropped, its task reopened; the user's file stays theirs.
        assert_eq!(store.piece(&t, 1).unwrap(), None);
        assert!(store.piece_data(&t, 0).unwrap().is_none());
        assert!(!store.content_path(&t).exists());
        assert!(!store.task(&t).unwrap().unwrap().complete);
        assert_eq!(store.bitfield(&t, 3).unwrap().count(), 0);
        assert_eq!(std::fs::read(&out).unwrap(), b"XXcdefghij");
        // Fetched again into a new file, not into the user's.
        store.put_piece(&t, 0, 0, b"abcd").unwrap();
        assert_eq!(store.piece(&t, 0).unwrap().unwrap(), b"abcd");
        assert_eq!(std::fs::read(&out).unwrap(), b"XXcdefghij");
    }

    #[test]
    fn piece_files_of_an_older_store_are_dropped_at_open_and_fetched_again() {
        let dir = tempfile::tempdir().unwrap();
        let key = Keypair::generate_ed25519();
        let h = header(&key, "http://h/old");
        let t = h.header.task;
        {
            let store = RocksStore::open(dir.path(), &StorageConfig::default()).unwrap();
            store.put_task(&record(&h, true)).unwrap();
            // The old layout: a directory of piece files and empty markers.
            let old = store.content_path(&t);
            std::fs::create_dir_all(&old).unwrap();
            std::fs::write(old.join("0"), b"abcd").unwrap();
            let db = store.db().unwrap();
            db.put_cf(cf(&db, CF_HAVE).unwrap(), piece_key(&t, 0), [])
                .unwrap();
            store.flush().unwrap();
        }
        let store = RocksStore::open(dir.path(), &StorageConfig::default()).unwrap();
        assert!(!store.content_path(&t).exists());
        assert_eq!(store.bitfield(&t, 3).unwrap().count(), 0);
        assert!(!store.task(&t).unwrap().unwrap().complete);
        store.put_piece(&t, 0, 0, b"abcd").unwrap();
        assert_eq!(store.piece(&t, 0).unwrap().unwrap(), b"abcd");
    }

    #[test]
    fn a_closed_store_refuses_everything() {
        each_store(|store| {
            let key = Keypair::generate_ed25519();
            let t = header(&key, "http://h/c").header.task;
            store.put_piece(&t, 0, 0, b"abcd").unwrap();
            store.close();
            let e = store.piece(&t, 0).unwrap_err();
            assert!(e.to_string().contains("closed"), "{e}");
            assert!(store.put_piece(&t, 1, 4, b"efgh").is_err());
            assert!(store.recover().is_err());
            assert!(store.task(&t).is_err());
            assert!(store.flush().is_err());
        });
    }

    #[test]
    fn a_closed_rocks_store_is_not_reopened() {
        let (dir, store, _, t) = fresh("http://h/c");
        store.put_piece(&t, 0, 0, b"abcd").unwrap();
        let other = store.clone();
        store.close();
        assert!(other.recover().is_err());
        assert!(other.piece(&t, 0).is_err());
        // The database really is closed: another handle can open the same directory.
        let again = RocksStore::open(dir.path(), &StorageConfig::default()).unwrap();
        assert_eq!(again.piece(&t, 0).unwrap().as_deref(), Some(&b"abcd"[..]));
    }

    /// Runs a store test against both stores.
    fn each_store(test: impl Fn(&dyn PieceStore)) {
        test(&MemStore::new());
        let dir = tempfile::tempdir().unwrap();
        test(&RocksStore::open(dir.path(), &StorageConfig::default()).unwrap());
    }

    #[test]
    fn pieces_hashes_and_tasks_round_trip_and_stay_separate() {
        each_store(round_trip);
    }

    fn round_trip(store: &dyn PieceStore) {
        let key = Keypair::generate_ed25519();
        let a = header(&key, "http://h/a");
        let b = header(&key, "http://h/b");
        let (ta, tb) = (a.header.task, b.header.task);
        for h in [&a, &b] {
            store.put_task(&record(h, false)).unwrap();
        }
        store.put_piece(&ta, 0, 0, b"abcd").unwrap();
        store.put_piece(&ta, 2, 8, b"ij").unwrap();
        store.put_piece(&tb, 1, 4, b"zzzz").unwrap();
        assert_eq!(store.piece(&ta, 0).unwrap().unwrap(), b"abcd");
        assert!(store.piece(&ta, 1).unwrap().is_none());
        // The same bytes for sending (a file on RocksStore, read as it goes).
        let data = store.piece_data(&ta, 2).unwrap().unwrap();
        assert_eq!(data.len(), 2);
        let bytes = match data {
            PieceData::File { file, len, .. } => {
                let mut v = Vec::new();
                std::io::Read::read_to_end(&mut std::io::Read::take(file, len), &mut v).unwrap();
                v
            }
            PieceData::Bytes(b) => b,
        };
        assert_eq!(bytes, b"ij");
        assert!(store.piece_data(&ta, 1).unwrap().is_none());
        // The file holding a piece, where the store keeps one, has it at the offset given.
        if let Some(at) = store.piece_file(&ta, 2).unwrap() {
            let f = std::fs::read(at.path).unwrap();
            assert_eq!(&f[at.offset as usize..][..2], b"ij");
        }
        assert!(store.piece_file(&ta, 1).unwrap().is_none());
        assert_eq!(
            store
                .bitfield(&ta, 3)
                .unwrap()
                .iter_set()
                .collect::<Vec<_>>(),
            vec![0, 2]
        );
        assert_eq!(
            store
                .bitfield(&tb, 3)
                .unwrap()
                .iter_set()
                .collect::<Vec<_>>(),
            vec![1]
        );
        assert_eq!(store.held_count(&ta).unwrap(), 2);
        assert_eq!(store.held_count(&tb).unwrap(), 1);

        let sh = SignedPieceHash::sign(&ta, 0, PieceHash::of(b"abcd"), &key).unwrap();
        store
            .put_hashes(&ta, key.public().to_peer_id(), std::slice::from_ref(&sh))
            .unwrap();
        let got = store.hashes(&ta).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].hashes, vec![sh]);
        assert!(store.hashes(&tb).unwrap().is_empty());
        assert_eq!(store.tasks().unwrap().len(), 2);

        store.delete_task(&ta).unwrap();
        assert!(store.task(&ta).unwrap().is_none());
        assert!(store.piece(&ta, 0).unwrap().is_none());
        assert!(store.piece_file(&ta, 2).unwrap().is_none());
        assert_eq!(store.bitfield(&ta, 3).unwrap().count(), 0);
        assert_eq!(store.held_count(&ta).unwrap(), 0);
        assert_eq!(store.piece(&tb, 1).unwrap().unwrap(), b"zzzz");
    }

    #[test]
    fn a_complete_task_missing_pieces_is_reopened() {
        each_store(reopened);
    }

    fn reopened(store: &dyn PieceStore) {
        let key = Keypair::generate_ed25519();
        // 10 bytes in pieces of 4: three pieces.
        let (whole, lossy) = (
            header(&key, "http://h/whole"),
            header(&key, "http://h/lossy"),
        );
        for h in [&whole, &lossy] {
            let t = h.header.task;
            store.put_piece(&t, 0, 0, b"abcd").unwrap();
            store.put_piece(&t, 1, 4, b"efgh").unwrap();
            if h.header.task == whole.header.task {
                store.put_piece(&t, 2, 8, b"ij").unwrap();
            }
            store.put_task(&record(h, true)).unwrap();
        }
        assert_eq!(store.reopen_incomplete().unwrap(), vec![lossy.header.task]);
        assert!(!store.task(&lossy.header.task).unwrap().unwrap().complete);
        assert!(store.task(&whole.header.task).unwrap().unwrap().complete);
        // What it held stays: only the missing piece is fetched again.
        assert_eq!(store.bitfield(&lossy.header.task, 3).unwrap().count(), 2);
        assert!(store.reopen_incomplete().unwrap().is_empty());
    }

    #[test]
    fn large_pieces_survive_flush_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let key = Keypair::generate_ed25519();
        let h = header(&key, "http://h/big");
        let t = h.header.task;
        let big: Vec<u8> = (0..(4 << 20)).map(|i| (i % 251) as u8).collect();
        {
            let store = RocksStore::open(dir.path(), &StorageConfig::default()).unwrap();
            for i in 0..3 {
                store
                    .put_piece(&t, i, u64::from(i) * (4 << 20), &big)
                    .unwrap();
            }
            store.flush().unwrap();
        }
        let store = RocksStore::open(dir.path(), &StorageConfig::default()).unwrap();
        assert_eq!(store.bitfield(&t, 3).unwrap().count(), 3);
        assert_eq!(store.piece(&t, 2).unwrap().unwrap(), big);
        assert!(store.disk_usage() >= 3 * (4 << 20));
    }
}
