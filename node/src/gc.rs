//! Cache eviction: tasks not used for `storage.task_ttl` are deleted, and when the store exceeds
//! `storage.quota` the least recently used tasks are deleted until it is under 90 % of the quota.
//! Independently of the quota, when the filesystem holding the data directory is fuller than
//! `storage.disk_high_watermark` percent (by anyone's files), least recently used tasks are
//! deleted until about `disk_low_watermark` percent, so a node never fills its host's disk.
//! Partial and failed tasks (no live runner, not complete) expire the same way, so interrupted
//! downloads can resume within the TTL but do not hold disk forever. Tasks with a live runner
//! (downloading, producing) are never evicted.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use df_protocols::task::TaskKey;
use tokio_util::sync::CancellationToken;

use crate::config::StorageConfig;
use crate::store::now_unix;
use crate::task::TaskContext;

const INTERVAL: Duration = Duration::from_secs(30);

/// Eviction candidates, least recently used first: (key, last use, content length).
fn candidates(ctx: &TaskContext) -> Vec<(TaskKey, u64, u64)> {
    let Ok(records) = ctx.store.tasks() else {
        return Vec::new();
    };
    let mut out: Vec<(TaskKey, u64, u64)> = records
        .into_iter()
        .map(|r| {
            let k = r.header.header.task;
            let used = r.last_access.max(ctx.activity.last(&k));
            (k, used, r.header.header.content_length)
        })
        .filter(|(k, _, _)| ctx.registry.live(k).is_none())
        .collect();
    out.sort_by_key(|(_, used, _)| *used);
    out
}

/// How full the filesystem holding `dir` is: (bytes used, bytes usable by this process in all).
fn filesystem_use(dir: &Path) -> Option<(u64, u64)> {
    let st = nix::sys::statvfs::statvfs(dir).ok()?;
    let frag = st.fragment_size();
    let used = (st.blocks() as u64).saturating_sub(st.blocks_free() as u64) * frag;
    let avail = st.blocks_available() as u64 * frag;
    Some((used, used + avail))
}

/// The store as `df status` shows it: use, limits, and what would go first.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct StorageReport {
    /// Bytes the piece store holds.
    pub bytes: u64,
    /// `storage.quota` (0: none).
    pub quota: u64,
    /// The data directory's filesystem: bytes used (by anyone) and in all.
    pub filesystem_used: u64,
    pub filesystem_total: u64,
    /// `storage.disk_high_watermark` / `disk_low_watermark`, percent.
    pub disk_high_watermark: f64,
    pub disk_low_watermark: f64,
    /// `storage.task_ttl` in seconds (0: keep).
    pub task_ttl_secs: u64,
    /// The next tasks eviction would remove, least recently used first (at most 5).
    pub eviction_candidates: Vec<EvictionCandidate>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct EvictionCandidate {
    pub id: String,
    pub bytes: u64,
    /// Seconds since it was last downloaded or served.
    pub idle_secs: u64,
}

/// What `df status` reports of the store (reads the task records: call off the async threads).
pub(crate) fn report(ctx: &TaskContext) -> StorageReport {
    let cfg = &ctx.config.storage;
    let (filesystem_used, filesystem_total) =
        filesystem_use(&ctx.config.data_dir).unwrap_or((0, 0));
    let now = now_unix();
    StorageReport {
        bytes: ctx.store.disk_usage(),
        quota: cfg.quota.as_u64(),
        filesystem_used,
        filesystem_total,
        disk_high_watermark: cfg.disk_high_watermark,
        disk_low_watermark: cfg.disk_low_watermark,
        task_ttl_secs: cfg.task_ttl.as_secs(),
        eviction_candidates: candidates(ctx)
            .into_iter()
            .take(5)
            .map(|(k, used, len)| EvictionCandidate {
                id: k.to_string(),
                bytes: len,
                idle_secs: now.saturating_sub(used),
            })
            .collect(),
    }
}

/// What one pass must free, from the cache's size and the filesystem's fill.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Pressure {
    /// Evict until the cache is at most this big (`u64::MAX`: no limit).
    cache_target: u64,
    /// Bytes to free for the filesystem's low watermark (0: none).
    disk_to_free: u64,
}

fn pressure(cfg: &StorageConfig, cache: u64, fs: Option<(u64, u64)>) -> Pressure {
    let quota = cfg.quota.as_u64();
    let cache_target = if quota > 0 && cache > quota {
        quota / 10 * 9
    } else {
        u64::MAX
    };
    let disk_to_free = match fs {
        Some((used, total)) if cfg.disk_high_watermark > 0.0 && total > 0 => {
            let share = used as f64 / total as f64 * 100.0;
            if share > cfg.disk_high_watermark {
                let low = (total as f64 * cfg.disk_low_watermark / 100.0) as u64;
                used.saturating_sub(low)
            } else {
                0
            }
        }
        _ => 0,
    };
    Pressure {
        cache_target,
        disk_to_free,
    }
}

/// Picks what to evict from `candidates` (least recently used first): expired tasks, then as
/// many more as the quota and the disk watermark need.
fn plan(
    cfg: &StorageConfig,
    candidates: Vec<(TaskKey, u64, u64)>,
    now: u64,
    cache: u64,
    fs: Option<(u64, u64)>,
) -> Vec<(TaskKey, u64)> {
    let p = pressure(cfg, cache, fs);
    let ttl = cfg.task_ttl.as_secs();
    let (mut cache, mut freed) = (cache, 0u64);
    let mut out = Vec::new();
    for (key, used, len) in candidates {
        let expired = ttl > 0 && now.saturating_sub(used) > ttl;
        let for_space = cache > p.cache_target || freed < p.disk_to_free;
        if expired || for_space {
            cache = cache.saturating_sub(len);
            freed = freed.saturating_add(len);
            out.push((key, len));
        }
    }
    out
}

/// Runs one eviction pass; returns the evicted tasks.
pub(crate) async fn collect(ctx: &Arc<TaskContext>) -> Vec<TaskKey> {
    let cfg = ctx.config.storage.clone();
    let dir = ctx.config.data_dir.clone();
    let c = ctx.clone();
    let (list, cache, fs) = tokio::task::spawn_blocking(move || {
        (candidates(&c), c.store.disk_usage(), filesystem_use(&dir))
    })
    .await
    .unwrap_or_default();
    let p = pressure(&cfg, cache, fs);
    if p.disk_to_free > 0 {
        tracing::warn!(
            to_free = p.disk_to_free,
            high_watermark = cfg.disk_high_watermark,
            "the data directory's filesystem is above its high watermark: evicting cached tasks"
        );
    }
    let mut evicted = Vec::new();
    for (key, len) in plan(&cfg, list, now_unix(), cache, fs) {
        match crate::task::delete_task(ctx, &key).await {
            Ok(_) => {
                ctx.metrics.evicted(len);
                tracing::info!(task = %key, bytes = len, "evicted task from the cache");
                evicted.push(key);
            }
            Err(e) => tracing::warn!(task = %key, error = %e, "eviction failed"),
        }
    }
    evicted
}

pub(crate) async fn run(ctx: Arc<TaskContext>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(INTERVAL);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => { collect(&ctx).await; }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytesize::ByteSize;
    use std::time::Duration;

    fn key(i: u8) -> TaskKey {
        let d: df_protocols::task::ContentDigest = format!("sha256:{}", hex::encode([i; 32]))
            .parse()
            .expect("a digest");
        TaskKey::for_digest(&d)
    }

    fn cands() -> Vec<(TaskKey, u64, u64)> {
        // Least recently used first (at t = 1000: 300 s, 200 s, 100 s ago); 10, 20, 30 bytes.
        vec![(key(1), 700, 10), (key(2), 800, 20), (key(3), 900, 30)]
    }

    fn cfg() -> StorageConfig {
        StorageConfig {
            task_ttl: Duration::ZERO,
            ..StorageConfig::default()
        }
    }

    #[test]
    fn nothing_is_evicted_below_every_limit() {
        assert!(plan(&cfg(), cands(), 1000, 60, Some((50, 100))).is_empty());
        assert!(plan(&cfg(), cands(), 1000, 60, None).is_empty());
    }

    #[test]
    fn above_the_high_watermark_lru_tasks_go_until_the_low_one() {
        // 95 of 100 bytes used; low watermark 70 %: 25 bytes to free -> the first two (10 + 20).
        let out = plan(&cfg(), cands(), 1000, 60, Some((95, 100)));
        assert_eq!(out, vec![(key(1), 10), (key(2), 20)]);
        // At exactly the high watermark nothing happens.
        assert!(plan(&cfg(), cands(), 1000, 60, Some((90, 100))).is_empty());
        // Turned off.
        let off = StorageConfig {
            disk_high_watermark: 0.0,
            ..cfg()
        };
        assert!(plan(&off, cands(), 1000, 60, Some((99, 100))).is_empty());
    }

    #[test]
    fn over_quota_evicts_down_to_ninety_percent_of_it() {
        let c = StorageConfig {
            quota: ByteSize::b(50),
            ..cfg()
        };
        // 60 bytes cached, quota 50 -> target 45: evicting 10 (-> 50) is not enough, 20 more is.
        let out = plan(&c, cands(), 1000, 60, Some((10, 100)));
        assert_eq!(out, vec![(key(1), 10), (key(2), 20)]);
    }

    #[test]
    fn expired_tasks_go_whatever_the_space() {
        let c = StorageConfig {
            task_ttl: Duration::from_secs(150),
            ..cfg()
        };
        // Used 300 s, 200 s and 100 s ago: the two older than 150 s expire.
        let out = plan(&c, cands(), 1000, 60, Some((10, 100)));
        assert_eq!(out, vec![(key(1), 10), (key(2), 20)]);
    }

    #[test]
    fn watermarks_are_checked() {
        let bad = StorageConfig {
            disk_high_watermark: 60.0,
            disk_low_watermark: 80.0,
            ..cfg()
        };
        assert!(bad.validate().is_err());
        let bad = StorageConfig {
            disk_high_watermark: 120.0,
            ..cfg()
        };
        assert!(bad.validate().is_err());
        assert!(cfg().validate().is_ok());
    }

    #[test]
    fn the_filesystem_is_measured() {
        let (used, total) = filesystem_use(Path::new("/")).expect("statvfs /");
        assert!(total > 0 && used <= total);
    }
}
