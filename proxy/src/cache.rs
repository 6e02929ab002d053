//! The in-memory manifest cache: entries keyed by registry, repository, reference, the client's
//! `Accept` and a hash of its credentials (so one client's authorised manifest is never served to
//! another), bounded in bytes, least recently used evicted first. Tag entries expire after the
//! tag TTL; digest entries are immutable and live until evicted. Nothing is written to disk.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest, Sha256};

/// What identifies a cached manifest response.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct CacheKey {
    registry: String,
    name: String,
    reference: String,
    accept: String,
    auth: [u8; 32],
}

impl CacheKey {
    pub(crate) fn new(
        registry: &str,
        name: &str,
        reference: &str,
        accept: &str,
        authorization: Option<&[u8]>,
    ) -> CacheKey {
        let auth = match authorization {
            Some(a) => {
                let mut h = [0u8; 32];
                h.copy_from_slice(&Sha256::digest(a));
                h
            }
            None => [0; 32],
        };
        CacheKey {
            registry: registry.to_owned(),
            name: name.to_owned(),
            reference: reference.to_owned(),
            accept: accept.to_owned(),
            auth,
        }
    }
}

/// A cached manifest: its media type, digest and bytes.
#[derive(Debug, Clone)]
pub(crate) struct CachedManifest {
    pub(crate) content_type: String,
    pub(crate) digest: String,
    pub(crate) body: Bytes,
}

struct Entry {
    value: CachedManifest,
    expires: Option<Instant>,
    used: u64,
}

pub(crate) struct ManifestCache {
    inner: Mutex<Inner>,
    capacity: u64,
}

struct Inner {
    map: HashMap<CacheKey, Entry>,
    bytes: u64,
    clock: u64,
}

fn cost(k: &CacheKey, v: &CachedManifest) -> u64 {
    (v.body.len() + v.content_type.len() + v.digest.len() + k.name.len() + k.reference.len() + 128)
        as u64
}

impl ManifestCache {
    pub(crate) fn new(capacity: u64) -> ManifestCache {
        ManifestCache {
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                bytes: 0,
                clock: 0,
            }),
            capacity,
        }
    }

    pub(crate) fn get(&self, k: &CacheKey) -> Option<CachedManifest> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let inner = &mut *g;
        inner.clock += 1;
        let now = Instant::now();
        let expired = match inner.map.get_mut(k) {
            None => return None,
            Some(e) if e.expires.is_some_and(|t| t <= now) => true,
            Some(e) => {
                e.used = inner.clock;
                return Some(e.value.clone());
            }
        };
        if expired && let Some(e) = inner.map.remove(k) {
            inner.bytes -= cost(k, &e.value);
        }
        None
    }

    /// Stores `v`; `ttl` `None` for immutable (by-digest) entries.
    pub(crate) fn put(&self, k: CacheKey, v: CachedManifest, ttl: Option<Duration>) {
        let c = cost(&k, &v);
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let inner = &mut *g;
        inner.clock += 1;
        // The new value supersedes the old one, even when the new one is not kept.
        if let Some(old) = inner.map.remove(&k) {
            inner.bytes -= cost(&k, &old.value);
        }
        if c > self.capacity / 4 || ttl.is_some_and(|t| t.is_zero()) {
            return;
        }
        while inner.bytes + c > self.capacity {
            let Some(victim) = inner
                .map
                .iter()
                .min_by_key(|(_, e)| e.used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some(e) = inner.map.remove(&victim) {
                inner.bytes -= cost(&victim, &e.value);
            }
        }
        inner.bytes += c;
        let used = inner.clock;
        inner.map.insert(
            k,
            Entry {
                value: v,
                expires: ttl.map(|t| Instant::now() + t),
                used,
            },
        );
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().unwrap().map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(n: usize) -> CachedManifest {
        CachedManifest {
            content_type: "t".into(),
            digest: "d".into(),
            body: Bytes::from(vec![0u8; n]),
        }
    }

    #[test]
    fn credentials_separate_entries() {
        let c = ManifestCache::new(1 << 20);
        let a = CacheKey::new("r", "n", "latest", "*", Some(b"Bearer a"));
        let b = CacheKey::new("r", "n", "latest", "*", Some(b"Bearer b"));
        let anon = CacheKey::new("r", "n", "latest", "*", None);
        c.put(a.clone(), m(10), None);
        assert!(c.get(&a).is_some());
        assert!(c.get(&b).is_none());
        assert!(c.get(&anon).is_none());
    }

    #[test]
    fn ttl_expires() {
        let c = ManifestCache::new(1 << 20);
        let k = CacheKey::new("r", "n", "latest", "*", None);
        c.put(k.clone(), m(10), Some(Duration::from_millis(1)));
        std::thread::sleep(Duration::from_millis(5));
        assert!(c.get(&k).is_none());
        assert_eq!(c.len(), 0);
        c.put(k.clone(), m(10), Some(Duration::ZERO));
        assert!(c.get(&k).is_none());
    }

    #[test]
    fn evicts_least_recently_used() {
        // Each entry costs 832 bytes here: four fit, the fifth evicts.
        let c = ManifestCache::new(3400);
        let k = |i: usize| CacheKey::new("r", "n", &i.to_string(), "*", None);
        for i in 1..=4 {
            c.put(k(i), m(700), None);
        }
        assert_eq!(c.len(), 4);
        assert!(c.get(&k(1)).is_some()); // 1 is now more recent than 2
        c.put(k(5), m(700), None);
        assert_eq!(c.len(), 4);
        assert!(c.get(&k(2)).is_none());
        assert!(c.get(&k(1)).is_some());
        assert!(c.get(&k(5)).is_some());
        // Too large for the cache: not stored.
        c.put(k(5), m(3000), None);
        assert!(c.get(&k(5)).is_none());
    }
}
