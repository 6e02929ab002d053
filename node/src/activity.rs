//! When tasks were last used by peers: serving a piece refreshes its task's last use, which the
//! cache eviction ([`crate::gc`]) reads beside the store's own access times, so a task hot on the
//! data plane does not age out.

use std::collections::HashMap;
use std::sync::Mutex;

use df_protocols::task::TaskKey;

use crate::store::now_unix;

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

    pub(crate) fn last(&self, key: &TaskKey) -> u64 {
        self.served
            .lock()
            .ok()
            .and_then(|m| m.get(key).copied())
            .unwrap_or(0)
    }
}
