//! Node configuration: a serde struct whose `Default` is the documented default of every key.
//! The CLI reads it from TOML (`--config FILE`) and lays its flags over it.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use bytesize::ByteSize;
use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};

/// What a node is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A long-running peer (`df node`): downloads for its host, serves what it holds, and fetches
    /// origins for the swarm when no seed is responsible.
    Node,
    /// A seed (`df seed`): fetches origins for the swarm and caches what it fetched.
    Seed,
    /// The short-lived node `df get` runs when no daemon is listening: serves while it downloads,
    /// never fetches origins for others.
    Ephemeral,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Node => "node",
            Role::Seed => "seed",
            Role::Ephemeral => "ephemeral",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "node" => Ok(Role::Node),
            "seed" => Ok(Role::Seed),
            "ephemeral" => Ok(Role::Ephemeral),
            other => Err(format!("unknown role {other:?}")),
        }
    }
}

/// Where the local API listens: a unix socket path or `HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiAddr {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl ApiAddr {
    /// The default API socket for a data directory: `<data_dir>/api.sock`.
    pub fn default_for(data_dir: &Path) -> ApiAddr {
        ApiAddr::Unix(data_dir.join("api.sock"))
    }
}

impl fmt::Display for ApiAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiAddr::Unix(p) => write!(f, "{}", p.display()),
            ApiAddr::Tcp(a) => write!(f, "{a}"),
        }
    }
}

impl FromStr for ApiAddr {
    type Err = String;

    /// `HOST:PORT` (IP literal or `localhost`) is TCP; anything containing `/` is a socket path.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            return Ok(ApiAddr::Unix(PathBuf::from(path)));
        }
        if s.contains('/') {
            return Ok(ApiAddr::Unix(PathBuf::from(s)));
        }
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(ApiAddr::Tcp(a));
        }
        if let Some(port) = s.strip_prefix("localhost:")
            && let Ok(port) = port.parse::<u16>()
        {
            return Ok(ApiAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], port))));
        }
        Err(format!(
            "invalid API address {s:?}: expected HOST:PORT or a unix socket path"
        ))
    }
}

impl Serialize for ApiAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ApiAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// The default data directory: `$DF_DATA_DIR`, else `$XDG_DATA_HOME/df`, else
/// `$HOME/.local/share/df`, else `./df-data`.
pub fn default_data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("DF_DATA_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(d).join("df");
    }
    if let Some(h) = std::env::var_os("HOME") {
        return PathBuf::from(h).join(".local/share/df");
    }
    PathBuf::from("df-data")
}

/// Everything a node is started with.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Default: `node`. Set by the subcommand (`df node`, `df seed`), not usually in the file.
    pub role: Role,
    /// The cluster this node belongs to (1-64 of `A-Z a-z 0-9 . _ -`). Members of other clusters
    /// are never used as seeds or sources, even with the same swarm key: the cluster is part of
    /// the names of df's libp2p protocols (DHT, control, gossip), so they cannot talk. Default:
    /// `default`.
    pub cluster: String,
    /// How many seeds own each task (a seed reads it). A task's owners are the live seeds in XOR
    /// order of distance to the task key; the first fetches the origin and asks the next
    /// `replicas - 1` to hold a copy, which they fetch from it and the swarm (never the origin)
    /// and from which they take over the origin fetch if the first owner vanishes. `1`: no
    /// replicas. Default: `2`.
    pub replicas: usize,
    /// Default: see [`default_data_dir`]. Holds the identity key, the RocksDB store, the API socket.
    pub data_dir: PathBuf,
    /// libp2p listen addresses. Default: `/ip4/0.0.0.0/tcp/4001` and `/ip4/0.0.0.0/udp/4001/quic-v1`.
    pub listen: Vec<Multiaddr>,
    /// Peers to join through, with or without `/p2p/<peer id>`. Default: none.
    pub bootstrap: Vec<Multiaddr>,
    /// Local API address. Default: `<data_dir>/api.sock`.
    pub api: Option<ApiAddr>,
    /// How the local API guards itself.
    pub local_api: LocalApiConfig,
    /// Data-plane (piece transfer) listen address. Default: `0.0.0.0:4002`.
    pub data_listen: SocketAddr,
    /// An extra HTTP listener for scrapers and probes: `GET /metrics`, `/healthz` and `/readyz`
    /// only, no token (it exports no URL, task or peer ID). Default: none.
    pub metrics_listen: Option<SocketAddr>,
    /// An extra HTTP listener for the status page (`GET /`) and the read-only JSON it reads, for
    /// remote viewing: nothing that changes state, no query string of any URL. Default: none.
    pub ui_listen: Option<SocketAddr>,
    /// Serve `ui_listen` without the API token. Default: `false` (the browser asks for it: any
    /// user name, the token from `<data_dir>/api-token` as the password).
    pub ui_public: bool,
    pub network: NetworkConfig,
    pub download: DownloadConfig,
    pub upload: UploadConfig,
    pub origin: OriginConfig,
    pub storage: StorageConfig,
    pub trust: TrustConfig,
    /// Host-wide byte rates for uploads, downloads and origin fetches (default: no limits).
    pub limits: crate::limits::LimitsConfig,
    /// Deliberate misbehaviour for tests of the swarm's defences. Never read from a file.
    #[serde(skip)]
    pub faults: FaultInjection,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            role: Role::Node,
            cluster: DEFAULT_CLUSTER.to_owned(),
            replicas: DEFAULT_REPLICAS,
            data_dir: default_data_dir(),
            listen: vec![
                "/ip4/0.0.0.0/tcp/4001"
                    .parse()
                    .unwrap_or_else(|_| Multiaddr::empty()),
                "/ip4/0.0.0.0/udp/4001/quic-v1"
                    .parse()
                    .unwrap_or_else(|_| Multiaddr::empty()),
            ],
            bootstrap: Vec::new(),
            api: None,
            local_api: LocalApiConfig::default(),
            data_listen: SocketAddr::from(([0, 0, 0, 0], 4002)),
            metrics_listen: None,
            ui_listen: None,
            ui_public: false,
            network: NetworkConfig::default(),
            download: DownloadConfig::default(),
            upload: UploadConfig::default(),
            origin: OriginConfig::default(),
            storage: StorageConfig::default(),
            trust: TrustConfig::default(),
            limits: crate::limits::LimitsConfig::default(),
            faults: FaultInjection::default(),
        }
    }
}

/// Seeds owning each task unless `replicas` says otherwise.
pub const DEFAULT_REPLICAS: usize = 2;
/// The most owners a task can have (each replica is a full copy).
pub const MAX_REPLICAS: usize = 16;

/// The cluster of a node that names none.
pub const DEFAULT_CLUSTER: &str = "default";

/// Checks a cluster name: 1-64 characters of `A-Z a-z 0-9 . _ -`.
pub fn validate_cluster(name: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "cluster {name:?}: use 1 to 64 letters, digits, '.', '_' or '-'"
        ))
    }
}

impl NodeConfig {
    /// The API address in effect.
    pub fn api_addr(&self) -> ApiAddr {
        self.api
            .clone()
            .unwrap_or_else(|| ApiAddr::default_for(&self.data_dir))
    }

    /// A config for tests and embedded use: loopback, ephemeral ports, everything under `dir`.
    pub fn local(dir: &Path, role: Role) -> NodeConfig {
        NodeConfig {
            role,
            data_dir: dir.to_path_buf(),
            listen: vec![
                "/ip4/127.0.0.1/tcp/0"
                    .parse()
                    .unwrap_or_else(|_| Multiaddr::empty()),
            ],
            api: Some(ApiAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 0)))),
            data_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..NodeConfig::default()
        }
    }
}

/// The local API's limits and the host names it answers to. (A TCP API on a non-loopback address
/// also requires the bearer token in `<data_dir>/api-token`: see [`crate::api`].)
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LocalApiConfig {
    /// A client must send a request's headers (and, on a kept-alive connection, its next
    /// request's) within this long, else the connection is closed. Default: `10s`.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// API connections served at once; more are answered `503` and closed. Default: `64`.
    pub max_connections: usize,
    /// Host names a TCP API answers to besides its IP literal (and `localhost` on loopback), in
    /// `Host` and `Origin` headers, e.g. this machine's DNS name. Default: none.
    pub allowed_hosts: Vec<String>,
}

impl Default for LocalApiConfig {
    fn default() -> Self {
        LocalApiConfig {
            header_read_timeout: Duration::from_secs(10),
            max_connections: 64,
            allowed_hosts: Vec::new(),
        }
    }
}

/// libp2p settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// Close a connection idle for this long. Default: `5m`.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Timeout of one control request (includes the origin's first answer for `start_task`).
    /// Default: `60s`.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// The swarm key file (libp2p `pnet` pre-shared key, IPFS `swarm.key` format). Peers without
    /// the same key cannot connect at all. Default: `<data_dir>/swarm.key`; a seed (or a node with
    /// no `bootstrap`, i.e. the first of a new swarm) creates it there on first start.
    pub swarm_key: Option<PathBuf>,
    /// Run without a swarm key: anyone who can reach the node may connect. Only listed
    /// `[trust] producers` are then trusted with URL tasks and credentials. Default: `false`.
    pub open_swarm: bool,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            idle_timeout: Duration::from_secs(300),
            request_timeout: Duration::from_secs(60),
            swarm_key: None,
            open_swarm: false,
        }
    }
}

/// How a node downloads.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DownloadConfig {
    /// Pieces in flight per task. Default: `8`.
    pub max_inflight_pieces: usize,
    /// Bytes of pieces in flight per task (each is buffered whole until verified): with large
    /// pieces (16 MiB for a 4 GiB file) fewer than `max_inflight_pieces` are requested at once,
    /// at least one. Bounds a producer's origin range requests the same way. 48 MiB kept a
    /// receiving node at 119 MiB peak RSS on a 4 GiB one-hop download (64 MiB: 133). Default: `48MiB`.
    pub max_inflight_bytes: ByteSize,
    /// Pieces in flight from one source. Default: `4`.
    pub max_inflight_per_source: usize,
    /// Pieces in flight from one seed (or the producer) while other peers are sources too. Fewer
    /// requests at once let the seed finish each piece sooner, so peers hold distinct pieces early
    /// and trade them instead of all waiting on the seed's uplink. Default: `1`.
    pub max_inflight_per_seed: usize,
    /// Give up on one piece request after this long and ask elsewhere. Default: `30s`.
    #[serde(with = "humantime_serde")]
    pub piece_timeout: Duration,
    /// Give up on a piece request when the source sends nothing for this long: no answer to the
    /// request, or no byte of the piece while it is half sent (a peer that stops mid-piece). The
    /// source counts a failure and pauses, and the piece is asked of another. Default: `5s`.
    #[serde(with = "humantime_serde")]
    pub read_timeout: Duration,
    /// With pieces still missing and no progress for this long, check the producer is alive and
    /// otherwise ask the next responsible peer to fetch the missing pieces. Default: `5s`.
    #[serde(with = "humantime_serde")]
    pub stall_timeout: Duration,
    /// Consecutive failures after which a source is dropped for a task. Default: `3`.
    pub max_source_failures: u32,
    /// Whether this node may fetch origins itself (for its own downloads and, in a swarm without
    /// seeds, for peers). Default: `true`.
    pub back_to_source: bool,
}

impl DownloadConfig {
    /// Pieces of `piece_len` bytes that may be in flight per task: `max_inflight_pieces`, fewer
    /// when they would exceed `max_inflight_bytes`, at least 1.
    pub fn pieces_in_flight(&self, piece_len: u32) -> usize {
        let by_bytes = self.max_inflight_bytes.as_u64() / u64::from(piece_len.max(1));
        (by_bytes.min(self.max_inflight_pieces as u64) as usize).max(1)
    }
}

impl Default for DownloadConfig {
    fn default() -> Self {
        DownloadConfig {
            max_inflight_pieces: 8,
            max_inflight_bytes: ByteSize::mib(48),
            max_inflight_per_source: 4,
            max_inflight_per_seed: 1,
            piece_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(5),
            stall_timeout: Duration::from_secs(5),
            max_source_failures: 3,
            back_to_source: true,
        }
    }
}

/// How a node serves pieces (see [`crate::transfer`] for how the limits work together).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UploadConfig {
    /// Piece responses being sent at once; more requests are answered "busy". Default: `32`.
    pub max_concurrent: usize,
    /// Responses of the same piece being sent at once; more requests for it are answered "busy",
    /// so that peers asking together spread over different pieces and then fetch this one from
    /// whoever got it first instead of splitting this node's uplink N ways. One peer holds at most
    /// one of them, so with 2 a peer that asks and never reads cannot block a piece. Default: `2`.
    pub max_per_piece: usize,
    /// Piece responses being sent to one requesting peer at once; more of its requests are
    /// answered "busy", so one peer cannot take every upload slot. Default: `4`.
    pub max_per_peer: usize,
    /// Open data-plane connections in total; a connection beyond it is closed at once. Keeps a
    /// flood of connections from using up the node's file descriptors. Default: `512`.
    pub max_connections: usize,
    /// Authenticated data-plane connections from one peer; a handshake beyond it is answered
    /// "busy". Default: `8`.
    pub max_connections_per_peer: usize,
    /// Connections still in their handshake; at the limit a new connection closes the oldest of
    /// them. Default: `64`.
    pub max_handshakes: usize,
    /// Time a new connection has to complete its handshake, and a request to arrive in full once
    /// its first byte did. Default: `5s`.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// A piece is written in 256 KiB chunks; a chunk the requester does not take within this long
    /// frees the upload slot and closes the connection. Default: `10s`.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Close a data-plane connection idle for this long. Default: `60s`.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Super-seeding, on a seed (other roles ignore it): while the seed holds a piece of a task
    /// that it has not sent to anybody yet, a request for a piece it is sending or sent less than
    /// a second ago is answered "busy", so its uplink carries each piece once before any twice and
    /// peers trade the rest. Default: `true`.
    pub super_seed: bool,
}

impl Default for UploadConfig {
    fn default() -> Self {
        UploadConfig {
            max_concurrent: 32,
            max_per_piece: 2,
            max_per_peer: 4,
            max_connections: 512,
            max_connections_per_peer: 8,
            max_handshakes: 64,
            handshake_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            super_seed: true,
        }
    }
}

/// How a producer fetches origins.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OriginConfig {
    /// Range requests streaming one task's content from its origin at once: the pieces to fetch
    /// are cut into this many spans of consecutive pieces, each streamed with one request.
    /// Default: `4`.
    pub concurrency: usize,
    /// Retries of one range request after a transient failure (connection error, 5xx, 429).
    /// Default: `3`.
    pub retries: u32,
    /// Connect timeout. Default: `10s`.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// A response body that delivers no bytes for this long fails (and is retried). Default: `30s`.
    #[serde(with = "humantime_serde")]
    pub read_timeout: Duration,
    /// PEM files of extra CA certificates trusted for HTTPS origins (besides the system's).
    /// Default: none.
    pub ca_bundle: Vec<PathBuf>,
    /// Accept any TLS certificate from origins. Only for test registries. Default: `false`.
    pub insecure: bool,
    /// Host patterns this node fetches on a peer's behalf (`host`, `*.domain`, or an IP address);
    /// empty allows every host the built-in guard allows. Fetches for the node's own user are not
    /// narrowed. Default: `[]`.
    pub allow: Vec<String>,
    /// Host patterns never fetched on a peer's behalf (same forms as `allow`). Default: `[]`.
    pub deny: Vec<String>,
}

impl Default for OriginConfig {
    fn default() -> Self {
        OriginConfig {
            concurrency: 4,
            retries: 3,
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            ca_bundle: Vec::new(),
            insecure: false,
            allow: Vec::new(),
            deny: Vec::new(),
        }
    }
}

/// The piece store.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// RocksDB memtable memory, all column families together. Default: `32MiB`.
    pub memtable_budget: ByteSize,
    /// Disk space for cached tasks; above it, least recently used finished tasks are evicted down
    /// to 90 % of it. `0` means no limit. Default: `0`.
    pub quota: ByteSize,
    /// Evict finished tasks not downloaded or uploaded for this long. `0s` keeps them forever.
    /// Default: `24h` (`0s` on seeds is common).
    #[serde(with = "humantime_serde")]
    pub task_ttl: Duration,
    /// When the filesystem holding the data directory is fuller than this (percent of its
    /// size, whoever filled it), least recently used finished tasks are evicted until it is down
    /// to `disk_low_watermark` or nothing evictable is left. `0` turns it off. Default: `90`.
    pub disk_high_watermark: f64,
    /// Where eviction for disk space stops, in percent of the filesystem. Default: `70`.
    pub disk_low_watermark: f64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            memtable_budget: ByteSize::mib(32),
            quota: ByteSize::b(0),
            task_ttl: Duration::from_secs(24 * 3600),
            disk_high_watermark: 90.0,
            disk_low_watermark: 70.0,
        }
    }
}

impl StorageConfig {
    /// Checks the watermarks: `0 <= low <= high <= 100`.
    pub fn validate(&self) -> Result<(), String> {
        let (hi, lo) = (self.disk_high_watermark, self.disk_low_watermark);
        if !(0.0..=100.0).contains(&hi) || !(0.0..=100.0).contains(&lo) {
            return Err(format!(
                "storage.disk_high_watermark ({hi}) and disk_low_watermark ({lo}) are percentages, 0 to 100"
            ));
        }
        if hi > 0.0 && lo > hi {
            return Err(format!(
                "storage.disk_low_watermark ({lo}) is above disk_high_watermark ({hi})"
            ));
        }
        Ok(())
    }
}

/// Whose task headers and piece hashes a node accepts, and whom it sends origin credentials.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrustConfig {
    /// Peer IDs trusted to produce URL tasks (normally the seeds): only they are asked to fetch
    /// origins, receive credentials, and have their headers and piece hashes accepted. Empty
    /// (default): every member of the private swarm (every peer holding the swarm key); in an
    /// open swarm, nobody but this node. Digest tasks are accepted from any connected peer (the
    /// digest guards the bytes).
    pub producers: Vec<PeerId>,
}

/// Test-only misbehaviour.
#[derive(Debug, Clone, Default)]
pub struct FaultInjection {
    /// Flip a byte in every piece this node uploads.
    pub corrupt_uploads: bool,
    /// Send only this many bytes of every piece this node uploads, then hold the connection open
    /// without writing (a peer that stops mid-piece).
    pub stall_uploads_after: Option<usize>,
    /// Members this node's preheat jobs treat as not connected: no direct `preheat` request,
    /// as in a cluster larger than one node's connections (they hear of the job on the cluster
    /// topic only).
    pub unconnected_for_preheat: Vec<libp2p::PeerId>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_names_are_short_and_plain() {
        for ok in ["default", "eu-1", "A.b_c", &"x".repeat(64)] {
            assert!(validate_cluster(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "a/b", "ü", &"x".repeat(65)] {
            assert!(validate_cluster(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn pieces_in_flight_keep_to_the_byte_budget() {
        let d = DownloadConfig::default();
        assert_eq!(d.pieces_in_flight(1 << 20), 8);
        assert_eq!(d.pieces_in_flight(4 << 20), 8);
        assert_eq!(d.pieces_in_flight(16 << 20), 3);
        assert_eq!(d.pieces_in_flight(64 << 20), 1);
        let tiny = DownloadConfig {
            max_inflight_bytes: ByteSize::b(0),
            ..DownloadConfig::default()
        };
        assert_eq!(tiny.pieces_in_flight(1 << 20), 1);
        assert_eq!(d.pieces_in_flight(0), 8);
    }

    #[test]
    fn api_addr_parses_tcp_and_unix() {
        assert_eq!(
            "127.0.0.1:65000".parse::<ApiAddr>().unwrap(),
            ApiAddr::Tcp("127.0.0.1:65000".parse().unwrap())
        );
        assert_eq!(
            "localhost:8080".parse::<ApiAddr>().unwrap(),
            ApiAddr::Tcp("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            "/run/df/api.sock".parse::<ApiAddr>().unwrap(),
            ApiAddr::Unix("/run/df/api.sock".into())
        );
        assert!("nonsense".parse::<ApiAddr>().is_err());
    }

    #[test]
    fn toml_overrides_only_what_it_names() {
        let cfg: NodeConfig = toml::from_str(
            r#"
            bootstrap = ["/ip4/10.0.0.1/tcp/4001"]
            [download]
            stall_timeout = "2s"
            [storage]
            quota = "10GiB"
            "#,
        )
        .unwrap();
        assert_eq!(cfg.download.stall_timeout, Duration::from_secs(2));
        assert_eq!(cfg.download.max_inflight_pieces, 8);
        assert_eq!(cfg.storage.quota, ByteSize::gib(10));
        assert_eq!(cfg.bootstrap.len(), 1);
        assert!(toml::from_str::<NodeConfig>("unknown_key = 1").is_err());
    }
}
