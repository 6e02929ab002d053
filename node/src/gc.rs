//! Cache eviction: tasks not used for `storage.task_ttl` are deleted, and when the store exceeds
//! `storage.quota` the least recently used tasks are deleted until it is under 90 % of the quota.
//! Partial and failed tasks (no live runner, not complete) expire the same way, so interrupted
//! downloads can resume within the TTL but do not hold disk forever. Tasks with a live runner
//! (downloading, producing) are never evicted.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use df_protocols::task::TaskKey;
use tokio_util::sync::CancellationToken;

use crate::node::Node;
use crate::store::now_unix;

const INTERVAL: Duration = Duration::from_secs(30);

/// When tasks were last served to peers (seconds since the epoch), kept in memory.
#[derive(Default)]
pub struct Activity {
    served: Mutex<HashMap<TaskKey, u64>>,
}

impl Activity {
    pub fn touch(&self, key: &TaskKey) {
        if let Ok(mut m) = self.served.lock() {
            m.insert(*key, now_unix());
        }
    }

    fn last(&self, key: &TaskKey) -> u64 {
        self.served
            .lock()
            .ok()
            .and_then(|m| m.get(key).copied())
            .unwrap_or(0)
    }
}

/// Eviction candidates, least recently used first: (key, last use, content length).
fn candidates(node: &Node) -> Vec<(TaskKey, u64, u64)> {
    let ctx = node.ctx();
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

/// Runs one eviction pass; returns the evicted tasks.
pub async fn collect(node: &Node) -> Vec<TaskKey> {
    let cfg = node.config().storage.clone();
    let n = node.clone();
    let list = tokio::task::spawn_blocking(move || (candidates(&n), n.store().disk_usage()))
        .await
        .unwrap_or_default();
    let (list, mut usage) = list;
    let now = now_unix();
    let ttl = cfg.task_ttl.as_secs();
    let quota = cfg.quota.as_u64();
    let over_quota = quota > 0 && usage > quota;
    let target = quota / 10 * 9;
    let mut evicted = Vec::new();
    for (key, used, len) in list {
        let expired = ttl > 0 && now.saturating_sub(used) > ttl;
        let for_space = over_quota && usage > target;
        if !(expired || for_space) {
            continue;
        }
        match node.delete_task(&key).await {
            Ok(_) => {
                tracing::info!(task = %key, expired, "evicted task from the cache");
                usage = usage.saturating_sub(len);
                evicted.push(key);
            }
            Err(e) => tracing::warn!(task = %key, error = %e, "eviction failed"),
        }
    }
    evicted
}

pub(crate) async fn run(node: Node, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(INTERVAL);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => { collect(&node).await; }
        }
    }
}
