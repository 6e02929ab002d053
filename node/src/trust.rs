//! Who is trusted for what.
//!
//! * **Membership** — a private swarm (the default) is the set of peers holding its swarm key: the
//!   libp2p `pnet` pre-shared key (IPFS `swarm.key` format) wraps every libp2p connection, so a
//!   peer without it cannot connect, gossip, ask for tasks or receive data-plane access at all.
//!   [`SwarmAccess::resolve`] finds the key (`[network] swarm_key`, else `<data_dir>/swarm.key`),
//!   creates one where a new swarm starts (a seed, or a node without bootstrap peers), and refuses
//!   to join a swarm without one unless `open_swarm` is set explicitly.
//! * **Producers** — [`TrustPolicy`]: the peers whose signed task headers and piece hashes a node
//!   accepts for URL tasks, and the only peers it asks to fetch an origin (and so the only ones
//!   that see the request's credentials). `[trust] producers` when set; otherwise every member of
//!   the private swarm; in an open swarm, nobody but the node itself. A peer's claimed role (its
//!   identify agent string, a provider record) never makes it trusted.
//! * **Digest tasks** — the whole-content digest is known in advance, so headers and piece hashes
//!   from any connected peer are usable: wrong bytes fail the digest and ban the producer.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use libp2p::PeerId;
use libp2p::pnet::PreSharedKey;

use crate::config::{NodeConfig, Role};

/// File name of the swarm key in a data directory.
pub const SWARM_KEY_FILE: &str = "swarm.key";

/// Errors finding or creating the swarm key.
#[derive(Debug, thiserror::Error)]
pub enum SwarmKeyError {
    #[error("swarm key {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("writing swarm key {path}: {reason}")]
    Write { path: String, reason: String },
    #[error(
        "no swarm key: this node joins a swarm (bootstrap peers are configured) but has no key. \
         Copy a seed's {SWARM_KEY_FILE} (in its data directory) here and pass --swarm-key FILE \
         (config: [network] swarm_key), or run every member with --open-swarm"
    )]
    Missing,
    #[error("--open-swarm and a swarm key were both given: choose one")]
    Conflict,
}

/// How this node's libp2p connections are admitted.
#[derive(Clone)]
pub enum SwarmAccess {
    /// Only peers holding this key can connect.
    Private(PreSharedKey),
    /// Anyone can connect (explicitly configured).
    Open,
}

impl std::fmt::Debug for SwarmAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // The fingerprint identifies the key without revealing it.
            SwarmAccess::Private(k) => write!(f, "Private({})", k.fingerprint()),
            SwarmAccess::Open => f.write_str("Open"),
        }
    }
}

impl SwarmAccess {
    pub fn is_private(&self) -> bool {
        matches!(self, SwarmAccess::Private(_))
    }

    /// The swarm access a node starts with (see the module docs). May create
    /// `<data_dir>/swarm.key`.
    pub fn resolve(cfg: &NodeConfig) -> Result<SwarmAccess, SwarmKeyError> {
        let net = &cfg.network;
        if net.open_swarm {
            if net.swarm_key.is_some() {
                return Err(SwarmKeyError::Conflict);
            }
            tracing::warn!(
                "open swarm: any host that can reach this node may connect, ask it for tasks and \
                 be asked for pieces; only [trust] producers are trusted with URL tasks"
            );
            return Ok(SwarmAccess::Open);
        }
        if let Some(path) = &net.swarm_key {
            return load(path).map(SwarmAccess::Private);
        }
        let default = cfg.data_dir.join(SWARM_KEY_FILE);
        if default.exists() {
            return load(&default).map(SwarmAccess::Private);
        }
        match cfg.role {
            // `df get` without a daemon and without a swarm to join: a swarm of one.
            Role::Ephemeral if cfg.bootstrap.is_empty() => {
                Ok(SwarmAccess::Private(PreSharedKey::new(rand::random())))
            }
            Role::Seed | Role::Node if cfg.role == Role::Seed || cfg.bootstrap.is_empty() => {
                let key = create(&default)?;
                tracing::warn!(
                    path = %default.display(),
                    fingerprint = %key.fingerprint(),
                    "created a new swarm key: give this file to every node of the swarm \
                     (--swarm-key FILE); peers without it cannot connect"
                );
                Ok(SwarmAccess::Private(key))
            }
            _ => Err(SwarmKeyError::Missing),
        }
    }
}

/// A new random key.
pub fn generate() -> PreSharedKey {
    PreSharedKey::new(rand::random())
}

/// Writes a new random key to `path` (mode 0600); refuses to overwrite an existing file.
pub fn create(path: &Path) -> Result<PreSharedKey, SwarmKeyError> {
    let key = generate();
    write(path, key)?;
    Ok(key)
}

/// Writes `key` to `path` in the IPFS `swarm.key` format, mode 0600, never overwriting.
pub fn write(path: &Path, key: PreSharedKey) -> Result<(), SwarmKeyError> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let err = |e: std::io::Error| SwarmKeyError::Write {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts.open(path).map_err(err)?;
    f.write_all(key.to_key_file().as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)
}

/// Reads a key file.
pub fn load(path: &PathBuf) -> Result<PreSharedKey, SwarmKeyError> {
    let err = |reason: String| SwarmKeyError::Read {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    // The parser slices the hex line by bytes: only ASCII is safe to hand it.
    if !text.is_ascii() {
        return Err(err("not a swarm key (non-ASCII text)".into()));
    }
    text.trim_end()
        .parse::<PreSharedKey>()
        .map_err(|e| err(format!("not a swarm key ({e})")))
}

/// Whom a node trusts to produce URL tasks (and to see origin credentials).
#[derive(Debug, Clone)]
pub struct TrustPolicy {
    local: PeerId,
    producers: HashSet<PeerId>,
    private: bool,
}

impl TrustPolicy {
    pub fn new(local: PeerId, producers: &[PeerId], access: &SwarmAccess) -> TrustPolicy {
        TrustPolicy {
            local,
            producers: producers.iter().copied().collect(),
            private: access.is_private(),
        }
    }

    /// May `peer` produce URL tasks for this node: be asked to fetch an origin (with the request's
    /// credentials), and have its headers and piece hashes accepted?
    pub fn trusts_producer(&self, peer: &PeerId) -> bool {
        *peer == self.local
            || if self.producers.is_empty() {
                self.private
            } else {
                self.producers.contains(peer)
            }
    }

    /// Whether producers are named explicitly (`[trust] producers`).
    pub fn has_producer_list(&self) -> bool {
        !self.producers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_round_trip_and_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k/swarm.key");
        let key = create(&path).unwrap();
        assert!(load(&path).unwrap() == key);
        assert!(
            create(&path).is_err(),
            "an existing key is never overwritten"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(dir.path().join("bad"), "not a key").unwrap();
        assert!(load(&dir.path().join("bad")).is_err());
        // 64 bytes of hex line with multi-byte characters must not panic the parser.
        let tricky = format!("/key/swarm/psk/1.0.0/\n/base16/\n{}\n", "é".repeat(32));
        std::fs::write(dir.path().join("tricky"), tricky).unwrap();
        assert!(load(&dir.path().join("tricky")).is_err());
    }

    #[test]
    fn a_joining_node_without_a_key_is_refused_and_a_seed_creates_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = NodeConfig::local(dir.path(), Role::Node);
        cfg.bootstrap = vec!["/ip4/127.0.0.1/tcp/1".parse().unwrap()];
        assert!(matches!(
            SwarmAccess::resolve(&cfg),
            Err(SwarmKeyError::Missing)
        ));
        cfg.role = Role::Seed;
        assert!(SwarmAccess::resolve(&cfg).unwrap().is_private());
        assert!(dir.path().join(SWARM_KEY_FILE).exists());
        // The node now finds the key in its data directory.
        cfg.role = Role::Node;
        assert!(SwarmAccess::resolve(&cfg).unwrap().is_private());
        cfg.network.open_swarm = true;
        assert!(!SwarmAccess::resolve(&cfg).unwrap().is_private());
        cfg.network.swarm_key = Some(dir.path().join(SWARM_KEY_FILE));
        assert!(matches!(
            SwarmAccess::resolve(&cfg),
            Err(SwarmKeyError::Conflict)
        ));
    }

    #[test]
    fn producers_are_trusted_only_as_configured() {
        let me = PeerId::random();
        let other = PeerId::random();
        let listed = PeerId::random();
        let private = SwarmAccess::Private(generate());
        let members = TrustPolicy::new(me, &[], &private);
        assert!(members.trusts_producer(&other) && members.trusts_producer(&me));
        let listed_only = TrustPolicy::new(me, &[listed], &private);
        assert!(listed_only.trusts_producer(&listed));
        assert!(!listed_only.trusts_producer(&other));
        let open = TrustPolicy::new(me, &[], &SwarmAccess::Open);
        assert!(!open.trusts_producer(&other));
        assert!(open.trusts_producer(&me));
    }
}
