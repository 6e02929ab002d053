//! What the node is busy with, shared by its tasks and its data server:
//! - when tasks were last used by peers: serving a piece refreshes its task's last use, which the
//!   cache eviction ([`crate::gc`]) reads beside the store's own access times, so a task hot on
//!   the data plane does not age out;
//! - how many tasks it is fetching from their origins: while any is, a super-seed keeps its
//!   uplink for their fresh pieces (see [`crate::superseed`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use df_protocols::task::TaskKey;

use crate::store::now_unix;

/// When tasks were last served to peers (seconds since the epoch), and the origin fetches under
/// way, kept in memory.
#[derive(Default)]
pub struct Activity {
    served: Mutex<HashMap<TaskKey, u64>>,
    origin_fetches: Arc<AtomicUsize>,
}

/// One task fetching from its origin, counted in [`Activity::origin_fetches`] until dropped.
pub struct OriginFetch(Arc<AtomicUsize>);

impl Drop for OriginFetch {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Activity {
    pub fn touch(&self, key: &TaskKey) {
        if let Ok(mut m) = self.served.lock() {
            m.insert(*key, now_unix());
        }
    }

    /// Counts a task fetching from its origin while the returned guard lives.
    pub fn origin_fetch(&self) -> OriginFetch {
        self.origin_fetches.fetch_add(1, Ordering::Relaxed);
        OriginFetch(self.origin_fetches.clone())
    }

    /// Tasks this node is fetching from their origins now.
    pub fn origin_fetches(&self) -> usize {
        self.origin_fetches.load(Ordering::Relaxed)
    }

    pub(crate) fn last(&self, key: &TaskKey) -> u64 {
        self.served
            .lock()
            .ok()
            .and_then(|m| m.get(key).copied())
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_fetches_are_counted_while_their_guards_live() {
        let a = Activity::default();
        assert_eq!(a.origin_fetches(), 0);
        let first = a.origin_fetch();
        let second = a.origin_fetch();
        assert_eq!(a.origin_fetches(), 2);
        drop(first);
        assert_eq!(a.origin_fetches(), 1);
        drop(second);
        assert_eq!(a.origin_fetches(), 0);
    }
}
