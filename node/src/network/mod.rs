//! The libp2p side of a node.
//!
//! [`spawn`] builds the swarm (TCP + noise + yamux and QUIC, DNS; identify, ping, Kademlia,
//! gossipsub with validation, the `/df/control/1` request-response protocol, and `/df/have/1` streams
//! for direct haves, see [`have`]) and returns a
//! cloneable [`NetworkClient`], a stream of curated [`NetworkEvent`]s, and the [`EventLoop`] that alone
//! owns the `Swarm`. Raw swarm events never leave this module. Read-mostly facts (connected peers and
//! their addresses, listen addresses, known seeds) are published in [`NetState`].

mod codec;
mod envelope;
mod have;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use df_protocols::control::{ControlRequest, ControlResponse};
use df_protocols::gossip::{CLUSTER_TOPIC, ClusterMessage, GossipMessage};
use df_protocols::have::{HAVE_PROTOCOL, HaveFrame};
use df_protocols::limits::MAX_GOSSIP_MESSAGE;
use df_protocols::task::TaskKey;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use libp2p::core::ConnectedPoint;
use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance, MessageId, TopicHash};
use libp2p::kad::{self, QueryId, QueryResult, RecordKey};
use libp2p::metrics::Recorder;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, identify, noise, ping, tcp, yamux};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::config::Role;
use crate::trust::SwarmAccess;
use codec::ControlCodec;
use libp2p::core::Transport as _;
use libp2p::core::upgrade;
use libp2p::pnet::PnetConfig;

/// How often connections are pinged, and how long a ping may take before the connection is
/// closed (a vanished peer sends no FIN; requests to it would otherwise wait their full timeout).
const PING_INTERVAL: Duration = Duration::from_secs(5);
const PING_TIMEOUT: Duration = Duration::from_secs(10);

/// Network events waiting for the node; beyond this, gossip is ignored and requests dropped.
const MAX_PENDING_EVENTS: usize = 4096;

/// Kademlia key under which seeds register as providers.
pub const SEEDS_KEY: &[u8] = b"/df/seeds/1";
const KAD_PROTOCOL: &str = "/df/kad/1.0.0";
/// gossipsub's protocol names are `PREFIX/1.1.0` etc.; its default prefix is `/meshsub`.
const GOSSIP_PREFIX: &str = "/df/meshsub";
const IDENTIFY_PROTOCOL: &str = "/df/id/1.0.0";

/// Errors of the network layer.
#[derive(Debug, thiserror::Error, Clone)]
pub enum NetworkError {
    #[error("building the swarm failed: {0}")]
    Build(String),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: Multiaddr, reason: String },
    #[error("cannot dial {addr}: {reason}")]
    Dial { addr: Multiaddr, reason: String },
    #[error("request to {peer} failed: {reason}")]
    Request { peer: PeerId, reason: String },
    #[error("publishing failed: {0}")]
    Publish(String),
    #[error("the network event loop has stopped")]
    Stopped,
}

/// What the network settings a node starts with.
#[derive(Clone)]
pub struct NetworkSettings {
    pub keypair: libp2p::identity::Keypair,
    pub role: Role,
    /// The cluster (see [`crate::config::NodeConfig::cluster`]): part of every df protocol name.
    pub cluster: String,
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    pub idle_timeout: Duration,
    pub request_timeout: Duration,
    /// Who may connect: a private swarm (pnet key) or an open one.
    pub access: SwarmAccess,
    /// The node's metrics (libp2p's own are recorded here).
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// A connected peer as seen by this node.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub ip: Option<IpAddr>,
    pub role: Option<Role>,
    connections: usize,
    /// It takes direct haves (`/df/have/1` in its identify protocols).
    direct_haves: bool,
}

/// Read-mostly network facts, updated by the event loop.
pub struct NetState {
    peers: RwLock<HashMap<PeerId, PeerInfo>>,
    listen_addrs: RwLock<Vec<Multiaddr>>,
    seeds: RwLock<HashSet<PeerId>>,
    /// Number of connected peers that completed identify.
    identified: watch::Sender<usize>,
    /// Number of connected peers that identified as seeds.
    connected_seeds: watch::Sender<usize>,
}

impl Default for NetState {
    fn default() -> Self {
        NetState {
            peers: RwLock::default(),
            listen_addrs: RwLock::default(),
            seeds: RwLock::default(),
            identified: watch::channel(0).0,
            connected_seeds: watch::channel(0).0,
        }
    }
}

impl NetState {
    /// Waits until at least `n` connected peers have identified themselves; false on timeout.
    pub async fn wait_identified(&self, n: usize, timeout: Duration) -> bool {
        let mut rx = self.identified.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|&c| c >= n))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Seeds connected and identified now.
    pub fn connected_seeds(&self) -> usize {
        *self.connected_seeds.borrow()
    }

    /// Waits until at least `n` seeds are connected and identified; false on timeout.
    pub async fn wait_for_seeds(&self, n: usize, timeout: Duration) -> bool {
        let mut rx = self.connected_seeds.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|&c| c >= n))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    fn update_identified(&self) {
        let (n, seeds) = self
            .peers
            .read()
            .map(|p| {
                let n = p.values().filter(|i| i.role.is_some()).count();
                let s = p.values().filter(|i| i.role == Some(Role::Seed)).count();
                (n, s)
            })
            .unwrap_or((0, 0));
        self.identified.send_replace(n);
        self.connected_seeds.send_replace(seeds);
    }

    pub fn connected_peers(&self) -> Vec<PeerId> {
        self.peers
            .read()
            .map(|p| p.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Every connected peer.
    pub fn peers(&self) -> Vec<(PeerId, PeerInfo)> {
        self.peers
            .read()
            .map(|p| p.iter().map(|(k, v)| (*k, v.clone())).collect())
            .unwrap_or_default()
    }

    pub fn peer(&self, peer: &PeerId) -> Option<PeerInfo> {
        self.peers.read().ok()?.get(peer).cloned()
    }

    pub fn is_connected(&self, peer: &PeerId) -> bool {
        self.peers.read().is_ok_and(|p| p.contains_key(peer))
    }

    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.listen_addrs
            .read()
            .map(|a| a.clone())
            .unwrap_or_default()
    }

    /// Seeds learned from identify or the seed provider records.
    pub fn seeds(&self) -> Vec<PeerId> {
        self.seeds
            .read()
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }

    fn add_seed(&self, peer: PeerId) {
        if let Ok(mut s) = self.seeds.write() {
            s.insert(peer);
        }
    }
}

/// Curated events for the node.
#[derive(Debug)]
pub enum NetworkEvent {
    /// A decoded gossip message on a subscribed task topic. The node must answer with
    /// [`NetworkClient::report_validation`].
    Gossip {
        task: TaskKey,
        source: Option<PeerId>,
        propagation_source: PeerId,
        message_id: MessageId,
        message: GossipMessage,
    },
    /// A control request; answer on `reply` (dropping it fails the request).
    Request {
        peer: PeerId,
        request: ControlRequest,
        reply: oneshot::Sender<ControlResponse>,
    },
    /// A decoded request to every member of the cluster ([`CLUSTER_TOPIC`]), signed by
    /// `source`. The node must answer with [`NetworkClient::report_validation`].
    Cluster {
        source: PeerId,
        propagation_source: PeerId,
        message_id: MessageId,
        message: ClusterMessage,
    },
    /// A have sent straight to this node on `peer`'s authenticated connection (`/df/have/1`).
    Have {
        peer: PeerId,
        frame: HaveFrame,
    },
    /// A peer subscribed to a task topic.
    PeerSubscribed {
        peer: PeerId,
        task: TaskKey,
    },
    PeerConnected(PeerId),
    PeerDisconnected(PeerId),
}

type Reply<T> = oneshot::Sender<T>;
type RequestReply = Reply<Result<(ControlResponse, Option<IpAddr>), NetworkError>>;

enum Command {
    Dial(Multiaddr, Reply<Result<(), NetworkError>>),
    Subscribe(TaskKey),
    Unsubscribe(TaskKey),
    Publish(TaskKey, Vec<u8>, Reply<Result<(), NetworkError>>),
    SendHave(TaskKey, Arc<[u8]>, Reply<bool>),
    PublishCluster(Vec<u8>, Reply<Result<(), NetworkError>>),
    ReportValidation(MessageId, PeerId, MessageAcceptance),
    StartProviding(Vec<u8>),
    StopProviding(Vec<u8>),
    GetProviders(Vec<u8>, Reply<HashSet<PeerId>>),
    Request(PeerId, Box<ControlRequest>, RequestReply),
}

/// Cloneable handle to the network event loop.
#[derive(Clone)]
pub struct NetworkClient {
    commands: mpsc::Sender<Command>,
    state: Arc<NetState>,
    local_peer_id: PeerId,
    /// Signs what this node gossips (see [`envelope`]).
    keypair: libp2p::identity::Keypair,
}

impl NetworkClient {
    pub fn local_peer_id(&self) -> PeerId {
        self.local_peer_id
    }

    pub fn state(&self) -> &NetState {
        &self.state
    }

    async fn send(&self, cmd: Command) -> Result<(), NetworkError> {
        self.commands
            .send(cmd)
            .await
            .map_err(|_| NetworkError::Stopped)
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, NetworkError> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx)).await?;
        rx.await.map_err(|_| NetworkError::Stopped)
    }

    pub async fn dial(&self, addr: Multiaddr) -> Result<(), NetworkError> {
        self.call(|r| Command::Dial(addr, r)).await?
    }

    pub async fn subscribe(&self, task: TaskKey) -> Result<(), NetworkError> {
        self.send(Command::Subscribe(task)).await
    }

    pub async fn unsubscribe(&self, task: TaskKey) -> Result<(), NetworkError> {
        self.send(Command::Unsubscribe(task)).await
    }

    pub async fn publish(&self, task: TaskKey, msg: &GossipMessage) -> Result<(), NetworkError> {
        let body = msg
            .encode()
            .map_err(|e| NetworkError::Publish(e.to_string()))?;
        let data = envelope::seal(&self.keypair, &task.topic(), &body)
            .map_err(|e| NetworkError::Publish(e.to_string()))?;
        self.call(|r| Command::Publish(task, data, r)).await?
    }

    /// Sends a have straight to every connected peer on the task's topic that takes direct haves,
    /// on its authenticated connection (unsigned: see [`df_protocols::have`]). Returns whether some
    /// peer on the topic does not take them (or has not identified yet), so the have must be
    /// gossiped as well.
    pub async fn send_have(&self, frame: &HaveFrame) -> Result<bool, NetworkError> {
        let data: Arc<[u8]> = frame
            .encode()
            .map_err(|e| NetworkError::Publish(e.to_string()))?
            .into();
        self.call(|r| Command::SendHave(frame.task, data, r)).await
    }

    /// Sends `msg` to every member of the cluster (gossipsub on [`CLUSTER_TOPIC`]). Members
    /// reached: unknown here; `Ok` with nobody on the topic.
    pub async fn publish_cluster(&self, msg: &ClusterMessage) -> Result<(), NetworkError> {
        let body = msg
            .encode()
            .map_err(|e| NetworkError::Publish(e.to_string()))?;
        let data = envelope::seal(&self.keypair, CLUSTER_TOPIC, &body)
            .map_err(|e| NetworkError::Publish(e.to_string()))?;
        self.call(|r| Command::PublishCluster(data, r)).await?
    }

    pub async fn report_validation(
        &self,
        id: MessageId,
        propagation_source: PeerId,
        verdict: MessageAcceptance,
    ) {
        let _ = self
            .send(Command::ReportValidation(id, propagation_source, verdict))
            .await;
    }

    pub async fn start_providing(&self, key: Vec<u8>) -> Result<(), NetworkError> {
        self.send(Command::StartProviding(key)).await
    }

    pub async fn stop_providing(&self, key: Vec<u8>) -> Result<(), NetworkError> {
        self.send(Command::StopProviding(key)).await
    }

    /// Providers of `key` found by a DHT query (local records included).
    pub async fn get_providers(&self, key: Vec<u8>) -> Result<HashSet<PeerId>, NetworkError> {
        self.call(|r| Command::GetProviders(key, r)).await
    }

    /// Sends a control request; returns the response and the IP the peer was reached at.
    pub async fn request(
        &self,
        peer: PeerId,
        req: ControlRequest,
    ) -> Result<(ControlResponse, Option<IpAddr>), NetworkError> {
        self.call(|r| Command::Request(peer, Box::new(req), r))
            .await?
    }
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    kad: kad::Behaviour<kad::store::MemoryStore>,
    gossipsub: gossipsub::Behaviour,
    control: request_response::Behaviour<ControlCodec>,
    stream: libp2p_stream::Behaviour,
}

fn agent_version(role: Role, cluster: &str) -> String {
    format!(
        "df/{} {} cluster={cluster}",
        env!("CARGO_PKG_VERSION"),
        role.as_str()
    )
}

/// The cluster a df agent string names (`default` for agents that name none).
fn cluster_from_agent(agent: &str) -> Option<&str> {
    let rest = agent.strip_prefix("df/")?;
    Some(
        rest.split_whitespace()
            .find_map(|w| w.strip_prefix("cluster="))
            .unwrap_or(crate::config::DEFAULT_CLUSTER),
    )
}

/// A df protocol's name in `cluster`: `/df/NAME/…` as it always was in the default cluster,
/// `/df/CLUSTER/NAME/…` in another, so that members of different clusters share no protocol
/// but identify (and ping).
fn cluster_protocol(base: &str, cluster: &str) -> Result<StreamProtocol, NetworkError> {
    let name = if cluster == crate::config::DEFAULT_CLUSTER {
        base.to_owned()
    } else {
        let rest = base.strip_prefix("/df/").unwrap_or(base);
        format!("/df/{cluster}/{rest}")
    };
    StreamProtocol::try_from_owned(name).map_err(|e| NetworkError::Build(e.to_string()))
}

fn role_from_agent(agent: &str) -> Option<Role> {
    let rest = agent.strip_prefix("df/")?;
    let role = rest.split_whitespace().nth(1)?;
    role.parse().ok()
}

fn behaviour(
    key: &libp2p::identity::Keypair,
    role: Role,
    cluster: &str,
    request_timeout: Duration,
) -> Result<Behaviour, Box<dyn std::error::Error + Send + Sync>> {
    let peer_id = key.public().to_peer_id();
    let identify = identify::Behaviour::new(
        identify::Config::new(IDENTIFY_PROTOCOL.to_owned(), key.public())
            .with_agent_version(agent_version(role, cluster)),
    );
    let mut kad_cfg = kad::Config::new(cluster_protocol(KAD_PROTOCOL, cluster)?);
    kad_cfg.set_query_timeout(Duration::from_secs(20));
    kad_cfg.set_periodic_bootstrap_interval(Some(Duration::from_secs(120)));
    kad_cfg.set_provider_publication_interval(Some(Duration::from_secs(600)));
    kad_cfg.set_provider_record_ttl(Some(Duration::from_secs(1800)));
    let mut kad =
        kad::Behaviour::with_config(peer_id, kad::store::MemoryStore::new(peer_id), kad_cfg);
    kad.set_mode(Some(if role == Role::Ephemeral {
        kad::Mode::Client
    } else {
        kad::Mode::Server
    }));
    let mut gossip_builder = gossipsub::ConfigBuilder::default();
    if cluster != crate::config::DEFAULT_CLUSTER {
        gossip_builder.protocol_id_prefix(cluster_protocol(GOSSIP_PREFIX, cluster)?.to_string());
    }
    let gossip_cfg = gossip_builder
        .validate_messages()
        // Authored, not signed by gossipsub: df signs the data itself and checks each message
        // once, not each copy (see `envelope`); IDs follow the content.
        .validation_mode(gossipsub::ValidationMode::Permissive)
        .message_id_fn(envelope::message_id)
        .max_transmit_size(MAX_GOSSIP_MESSAGE + envelope::SIGNATURE_LEN + 4096)
        .heartbeat_interval(Duration::from_millis(500))
        // Every copy of a message is decoded before deduplication, so a node's gossip CPU grows
        // with its mesh degree: 4 (default 6) still reaches a swarm of hundreds in a few hops.
        .mesh_n(4)
        .mesh_n_low(3)
        .mesh_n_high(8)
        .mesh_outbound_min(2)
        .build()
        .map_err(|e| e.to_string())?;
    let mut gossipsub = gossipsub::Behaviour::new(
        gossipsub::MessageAuthenticity::Author(key.public().to_peer_id()),
        gossip_cfg,
    )?;
    gossipsub.with_peer_score(peer_score_params(), peer_score_thresholds())?;
    let control = request_response::Behaviour::with_codec(
        ControlCodec,
        [(
            cluster_protocol(codec::PROTOCOL.as_ref(), cluster)?,
            ProtocolSupport::Full,
        )],
        request_response::Config::default().with_request_timeout(request_timeout),
    );
    Ok(Behaviour {
        identify,
        // Peers whose container or host vanished send no FIN: pings find them out.
        ping: ping::Behaviour::new(
            ping::Config::new()
                .with_interval(PING_INTERVAL)
                .with_timeout(PING_TIMEOUT),
        ),
        kad,
        gossipsub,
        control,
        stream: libp2p_stream::Behaviour::new(),
    })
}

/// Peer scoring: a peer whose gossip this node rejects (bad signature, malformed, invalid for the
/// task) loses score on that topic; below the thresholds its gossip is ignored, then its messages
/// are dropped and it is pruned from meshes. Nothing else is scored: df's topics are short-lived
/// and mesh-delivery statistics would only punish slow links.
fn peer_score_params() -> gossipsub::PeerScoreParams {
    gossipsub::PeerScoreParams {
        // IP colocation scoring would punish the many nodes of one test host or NAT.
        ip_colocation_factor_weight: 0.0,
        behaviour_penalty_weight: -10.0,
        behaviour_penalty_threshold: 6.0,
        behaviour_penalty_decay: 0.9,
        ..gossipsub::PeerScoreParams::default()
    }
}

/// Score parameters of one task topic (set on subscribe).
pub(crate) fn topic_score_params() -> gossipsub::TopicScoreParams {
    gossipsub::TopicScoreParams {
        topic_weight: 1.0,
        time_in_mesh_weight: 0.0,
        first_message_deliveries_weight: 0.0,
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        invalid_message_deliveries_weight: -20.0,
        invalid_message_deliveries_decay: 0.9,
        ..gossipsub::TopicScoreParams::default()
    }
}

fn peer_score_thresholds() -> gossipsub::PeerScoreThresholds {
    gossipsub::PeerScoreThresholds {
        // One invalid message (-20 × 1²) already takes the gossip threshold; three lead to
        // graylisting (everything from the peer is ignored until its score decays).
        gossip_threshold: -10.0,
        publish_threshold: -50.0,
        graylist_threshold: -150.0,
        accept_px_threshold: 10.0,
        opportunistic_graft_threshold: 5.0,
    }
}

/// How long a new libp2p connection may take to become usable (pnet, noise and yamux).
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(20);

fn build_swarm(s: &NetworkSettings) -> Result<Swarm<Behaviour>, NetworkError> {
    let role = s.role;
    let cluster = s.cluster.clone();
    let request_timeout = s.request_timeout;
    let build = |e: String| NetworkError::Build(e);
    let builder = libp2p::SwarmBuilder::with_existing_identity(s.keypair.clone()).with_tokio();
    let swarm = match &s.access {
        // pnet wraps TCP before noise: a peer without the key fails the noise handshake. QUIC
        // brings its own TLS and cannot carry pnet, so a private swarm speaks TCP only.
        SwarmAccess::Private(psk) => {
            let psk = *psk;
            builder
                .with_other_transport(|key| {
                    let noise = noise::Config::new(key)?;
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                        tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                            .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
                            .upgrade(upgrade::Version::V1Lazy)
                            .authenticate(noise)
                            .multiplex(yamux::Config::default())
                            .timeout(UPGRADE_TIMEOUT),
                    )
                })
                .map_err(|e| build(e.to_string()))?
                .with_dns()
                .map_err(|e| build(e.to_string()))?
                .with_behaviour(|key| behaviour(key, role, &cluster, request_timeout))
                .map_err(|e| build(e.to_string()))?
                .with_swarm_config(|c| c.with_idle_connection_timeout(s.idle_timeout))
                .build()
        }
        SwarmAccess::Open => builder
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )
            .map_err(|e| build(e.to_string()))?
            .with_quic()
            .with_dns()
            .map_err(|e| build(e.to_string()))?
            .with_behaviour(|key| behaviour(key, role, &cluster, request_timeout))
            .map_err(|e| build(e.to_string()))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(s.idle_timeout))
            .build(),
    };
    Ok(swarm)
}

/// Whether `addr` can be used with `access` (a private swarm has no QUIC).
fn usable_with(addr: &Multiaddr, access: &SwarmAccess) -> bool {
    !(access.is_private()
        && addr
            .iter()
            .any(|p| matches!(p, Protocol::QuicV1 | Protocol::Quic)))
}

/// Builds the swarm and starts listening. Returns once every listener has an address.
pub async fn spawn(
    settings: NetworkSettings,
) -> Result<(NetworkClient, mpsc::Receiver<NetworkEvent>, EventLoop), NetworkError> {
    let mut swarm = build_swarm(&settings)?;
    let local_peer_id = *swarm.local_peer_id();
    let listen: Vec<Multiaddr> = settings
        .listen
        .iter()
        .filter(|a| {
            let ok = usable_with(a, &settings.access);
            if !ok {
                tracing::debug!(addr = %a, "not listening on QUIC: a private swarm uses TCP only");
            }
            ok
        })
        .cloned()
        .collect();
    if listen.is_empty() {
        return Err(NetworkError::Build(
            "no usable listen address (a private swarm listens on TCP only)".into(),
        ));
    }
    for addr in &listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| NetworkError::Listen {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
    }
    let have_protocol = cluster_protocol(HAVE_PROTOCOL, &settings.cluster)?;
    let mut streams = swarm.behaviour().stream.new_control();
    let have_incoming = streams
        .accept(have_protocol.clone())
        .map_err(|e| NetworkError::Build(e.to_string()))?;
    let (cmd_tx, cmd_rx) = mpsc::channel(256);
    let (ev_tx, ev_rx) = mpsc::channel(MAX_PENDING_EVENTS);
    let state = Arc::new(NetState::default());
    let mut ev_loop = EventLoop {
        swarm,
        commands: cmd_rx,
        events: ev_tx,
        state: state.clone(),
        role: settings.role,
        topics: HashMap::new(),
        cluster_topic: IdentTopic::new(CLUSTER_TOPIC).hash(),
        conn_ips: HashMap::new(),
        pending_requests: HashMap::new(),
        pending_providers: HashMap::new(),
        seed_queries: HashSet::new(),
        inbound_replies: FuturesUnordered::new(),
        bootstrapped: false,
        bootstrap: Vec::new(),
        have_writers: have::HaveWriters::new(
            streams,
            have_protocol.clone(),
            settings.metrics.clone(),
        ),
        have_readers: have::HaveReaders::default(),
        have_incoming,
        have_protocol,
        metrics: settings.metrics.clone(),
        cluster: settings.cluster.clone(),
    };
    ev_loop.await_listeners(listen.len()).await?;
    ev_loop.subscribe_cluster()?;
    let client = NetworkClient {
        commands: cmd_tx,
        state,
        local_peer_id,
        keypair: settings.keypair.clone(),
    };
    ev_loop.bootstrap = settings
        .bootstrap
        .into_iter()
        .filter(|a| usable_with(a, &settings.access))
        .collect();
    ev_loop.dial_bootstrap();
    Ok((client, ev_rx, ev_loop))
}

/// Publishes `data` on `topic`.
fn publish(b: &mut Behaviour, topic: IdentTopic, data: Vec<u8>) -> Result<(), NetworkError> {
    match b.gossipsub.publish(topic, data) {
        Ok(_) => Ok(()),
        // Nobody else is on the topic yet: nothing to tell, not an error.
        Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => Ok(()),
        Err(gossipsub::PublishError::Duplicate) => Ok(()),
        Err(e) => Err(NetworkError::Publish(e.to_string())),
    }
}

type InboundReply = futures::future::BoxFuture<
    'static,
    (ResponseChannel<ControlResponse>, Option<ControlResponse>),
>;

/// Owns the swarm; run it with [`EventLoop::run`].
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<NetworkEvent>,
    state: Arc<NetState>,
    role: Role,
    topics: HashMap<TopicHash, TaskKey>,
    /// [`CLUSTER_TOPIC`]'s hash (subscribed from the start).
    cluster_topic: TopicHash,
    conn_ips: HashMap<ConnectionId, IpAddr>,
    pending_requests: HashMap<OutboundRequestId, RequestReply>,
    pending_providers: HashMap<QueryId, (HashSet<PeerId>, Reply<HashSet<PeerId>>)>,
    seed_queries: HashSet<QueryId>,
    inbound_replies: FuturesUnordered<InboundReply>,
    bootstrapped: bool,
    /// Bootstrap addresses, redialled while no peer is connected.
    bootstrap: Vec<Multiaddr>,
    have_writers: have::HaveWriters,
    have_readers: have::HaveReaders,
    have_incoming: libp2p_stream::IncomingStreams,
    have_protocol: StreamProtocol,
    metrics: Arc<crate::metrics::Metrics>,
    cluster: String,
}

fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        Protocol::P2p(id) => Some(id),
        _ => None,
    })
}

impl EventLoop {
    async fn await_listeners(&mut self, n: usize) -> Result<(), NetworkError> {
        let deadline = tokio::time::sleep(Duration::from_secs(10));
        tokio::pin!(deadline);
        let mut seen = HashSet::new();
        while seen.len() < n {
            tokio::select! {
                _ = &mut deadline => return Err(NetworkError::Build("listeners did not start within 10 s".into())),
                ev = self.swarm.select_next_some() => {
                    if let SwarmEvent::NewListenAddr { listener_id, .. } = &ev {
                        seen.insert(*listener_id);
                    }
                    if let SwarmEvent::ListenerClosed { addresses, reason, .. } = &ev {
                        return Err(NetworkError::Listen {
                            addr: addresses.first().cloned().unwrap_or_else(Multiaddr::empty),
                            reason: format!("{reason:?}"),
                        });
                    }
                    self.on_swarm_event(ev);
                }
            }
        }
        Ok(())
    }

    fn dial_bootstrap(&mut self) {
        for addr in self.bootstrap.clone() {
            if let Err(e) = self.dial(addr) {
                tracing::warn!(error = %e, "bootstrap dial failed");
            }
        }
    }

    fn dial(&mut self, addr: Multiaddr) -> Result<(), NetworkError> {
        if let Some(peer) = peer_of(&addr) {
            let mut without = addr.clone();
            if matches!(without.iter().last(), Some(Protocol::P2p(_))) {
                without.pop();
            }
            self.swarm.behaviour_mut().kad.add_address(&peer, without);
        }
        self.swarm
            .dial(addr.clone())
            .map_err(|e| NetworkError::Dial {
                addr,
                reason: e.to_string(),
            })
    }

    /// Joins [`CLUSTER_TOPIC`], scored as a task topic (a member sending invalid requests there
    /// loses score).
    fn subscribe_cluster(&mut self) -> Result<(), NetworkError> {
        let topic = IdentTopic::new(CLUSTER_TOPIC);
        let g = &mut self.swarm.behaviour_mut().gossipsub;
        g.set_topic_params(topic.clone(), topic_score_params())
            .map_err(|e| NetworkError::Build(format!("cluster topic scoring: {e}")))?;
        g.subscribe(&topic)
            .map_err(|e| NetworkError::Build(format!("cluster topic: {e}")))?;
        Ok(())
    }

    /// Runs until `shutdown` is cancelled or every client handle is dropped.
    pub async fn run(mut self, shutdown: CancellationToken) {
        // Every member ranks the seeds it is connected to: learn of (and dial) new seeds soon.
        let mut seeds_tick = tokio::time::interval(Duration::from_secs(10));
        seeds_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Alone (bootstrap peers not up yet, or all gone): redial them, backing off to a minute.
        let mut redial_every = Duration::from_secs(1);
        let redial = tokio::time::sleep(redial_every);
        tokio::pin!(redial);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                ev = self.swarm.select_next_some() => self.on_swarm_event(ev),
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => self.on_command(cmd),
                    None => break,
                },
                Some((channel, resp)) = self.inbound_replies.next(), if !self.inbound_replies.is_empty() => {
                    if let Some(resp) = resp {
                        let _ = self.swarm.behaviour_mut().control.send_response(channel, resp);
                    }
                }
                Some((peer, stream)) = self.have_incoming.next() => {
                    self.have_readers.accept(
                        peer,
                        stream,
                        self.events.clone(),
                        self.metrics.clone(),
                        shutdown.child_token(),
                    );
                }
                _ = seeds_tick.tick() => self.refresh_seeds(),
                _ = &mut redial => {
                    if self.state.connected_peers().is_empty() && !self.bootstrap.is_empty() {
                        tracing::info!("no peers connected; redialling bootstrap peers");
                        self.dial_bootstrap();
                        redial_every = (redial_every * 2).min(Duration::from_secs(60));
                    } else {
                        redial_every = Duration::from_secs(1);
                    }
                    redial.as_mut().reset(tokio::time::Instant::now() + redial_every);
                }
            }
        }
        tracing::debug!("network event loop stopped");
    }

    fn refresh_seeds(&mut self) {
        let kad = &mut self.swarm.behaviour_mut().kad;
        if self.role == Role::Seed
            && let Err(e) = kad.start_providing(RecordKey::new(&SEEDS_KEY))
        {
            tracing::warn!(error = %e, "cannot register as seed provider");
        }
        if self.state.connected_peers().is_empty() {
            return;
        }
        let id = kad.get_providers(RecordKey::new(&SEEDS_KEY));
        self.seed_queries.insert(id);
        // Elections and replicas use connected seeds only, and every node must rank the same
        // set: keep a connection to each known seed (a dead one fails to dial and stays out).
        for s in self.state.seeds() {
            self.dial_seed(s);
        }
    }

    /// Dials a known seed that is not connected (by peer ID: the DHT has its addresses).
    fn dial_seed(&mut self, peer: PeerId) {
        if peer == *self.swarm.local_peer_id() || self.state.is_connected(&peer) {
            return;
        }
        let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
            .condition(libp2p::swarm::dial_opts::PeerCondition::DisconnectedAndNotDialing)
            .build();
        if let Err(e) = self.swarm.dial(opts) {
            tracing::debug!(%peer, error = %e, "cannot dial a known seed");
        }
    }

    fn on_command(&mut self, cmd: Command) {
        let b = self.swarm.behaviour_mut();
        match cmd {
            Command::Dial(addr, reply) => {
                let _ = reply.send(self.dial(addr));
            }
            Command::Subscribe(task) => {
                let topic = IdentTopic::new(task.topic());
                self.topics.insert(topic.hash(), task);
                if let Err(e) = b
                    .gossipsub
                    .set_topic_params(topic.clone(), topic_score_params())
                {
                    tracing::warn!(%task, error = %e, "topic scoring not set");
                }
                if let Err(e) = b.gossipsub.subscribe(&topic) {
                    tracing::warn!(%task, error = %e, "subscribe failed");
                }
            }
            Command::Unsubscribe(task) => {
                let topic = IdentTopic::new(task.topic());
                self.topics.remove(&topic.hash());
                b.gossipsub.unsubscribe(&topic);
            }
            Command::Publish(task, data, reply) => {
                let _ = reply.send(publish(b, IdentTopic::new(task.topic()), data));
            }
            Command::SendHave(task, data, reply) => {
                let _ = reply.send(self.send_have(task, data));
            }
            Command::PublishCluster(data, reply) => {
                let _ = reply.send(publish(b, IdentTopic::new(CLUSTER_TOPIC), data));
            }
            Command::ReportValidation(id, source, verdict) => {
                b.gossipsub
                    .report_message_validation_result(&id, &source, verdict);
            }
            Command::StartProviding(key) => {
                if let Err(e) = b.kad.start_providing(RecordKey::new(&key)) {
                    tracing::warn!(error = %e, "start_providing failed");
                }
            }
            Command::StopProviding(key) => b.kad.stop_providing(&RecordKey::new(&key)),
            Command::GetProviders(key, reply) => {
                let id = b.kad.get_providers(RecordKey::new(&key));
                self.pending_providers.insert(id, (HashSet::new(), reply));
            }
            Command::Request(peer, req, reply) => {
                let id = b.control.send_request(&peer, *req);
                self.pending_requests.insert(id, reply);
            }
        }
    }

    /// Queues a have for every connected peer on `task`'s topic that takes direct haves; true when
    /// some peer on the topic does not (or has not identified yet).
    fn send_have(&mut self, task: TaskKey, data: Arc<[u8]>) -> bool {
        let topic = IdentTopic::new(task.topic()).hash();
        let Ok(peers) = self.state.peers.read() else {
            return true;
        };
        let mut direct = Vec::new();
        let mut others = false;
        for (peer, topics) in self.swarm.behaviour().gossipsub.all_peers() {
            if !topics.contains(&&topic) {
                continue;
            }
            match peers.get(peer) {
                Some(info) if info.direct_haves => direct.push(*peer),
                _ => others = true,
            }
        }
        drop(peers);
        for peer in direct {
            self.have_writers.send(peer, data.clone());
        }
        others
    }

    /// Hands an event to the node. When the node is this far behind, gossip is ignored (not
    /// forwarded) and requests are dropped (their peers see the stream close), so a flood cannot
    /// grow memory without bound.
    fn emit(&mut self, ev: NetworkEvent) {
        match self.events.try_send(ev) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(ev)) => {
                tracing::debug!("node is behind on network events; dropping one");
                if let NetworkEvent::Gossip {
                    propagation_source,
                    message_id,
                    ..
                }
                | NetworkEvent::Cluster {
                    propagation_source,
                    message_id,
                    ..
                } = ev
                {
                    self.swarm
                        .behaviour_mut()
                        .gossipsub
                        .report_message_validation_result(
                            &message_id,
                            &propagation_source,
                            MessageAcceptance::Ignore,
                        );
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    fn on_swarm_event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        self.metrics.libp2p().record(&ev);
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
                if let Ok(mut a) = self.state.listen_addrs.write() {
                    a.push(address);
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                if let Ok(mut a) = self.state.listen_addrs.write() {
                    a.retain(|x| x != &address);
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                let remote = match &endpoint {
                    ConnectedPoint::Dialer { address, .. } => address,
                    ConnectedPoint::Listener { send_back_addr, .. } => send_back_addr,
                };
                let ip = ip_of(remote);
                if let Some(ip) = ip {
                    self.conn_ips.insert(connection_id, ip);
                }
                let new = {
                    let Ok(mut peers) = self.state.peers.write() else {
                        return;
                    };
                    let e = peers.entry(peer_id).or_insert(PeerInfo {
                        ip,
                        role: None,
                        connections: 0,
                        direct_haves: false,
                    });
                    e.connections += 1;
                    if e.ip.is_none() {
                        e.ip = ip;
                    }
                    e.connections == 1
                };
                if new {
                    tracing::debug!(%peer_id, "peer connected");
                    self.emit(NetworkEvent::PeerConnected(peer_id));
                }
                if !self.bootstrapped {
                    self.bootstrapped = true;
                    let _ = self.swarm.behaviour_mut().kad.bootstrap();
                    self.refresh_seeds();
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => {
                self.conn_ips.remove(&connection_id);
                if num_established == 0 {
                    if let Ok(mut peers) = self.state.peers.write() {
                        peers.remove(&peer_id);
                    }
                    self.state.update_identified();
                    self.have_writers.forget(&peer_id);
                    tracing::debug!(%peer_id, "peer disconnected");
                    self.emit(NetworkEvent::PeerDisconnected(peer_id));
                } else if let Ok(mut peers) = self.state.peers.write()
                    && let Some(p) = peers.get_mut(&peer_id)
                {
                    p.connections = num_established as usize;
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(?peer_id, %error, "outgoing connection failed");
            }
            SwarmEvent::Behaviour(ev) => self.on_behaviour_event(ev),
            _ => {}
        }
    }

    fn on_behaviour_event(&mut self, ev: BehaviourEvent) {
        let m = self.metrics.libp2p();
        match &ev {
            BehaviourEvent::Ping(e) => m.record(e),
            BehaviourEvent::Identify(e) => m.record(e),
            BehaviourEvent::Kad(e) => m.record(e),
            BehaviourEvent::Gossipsub(e) => m.record(e),
            BehaviourEvent::Control(_) | BehaviourEvent::Stream(()) => {}
        }
        match ev {
            BehaviourEvent::Ping(ping::Event {
                peer,
                connection,
                result: Err(e),
            }) => {
                tracing::debug!(%peer, error = %e, "ping failed; closing the connection");
                self.swarm.close_connection(connection);
            }
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                let cluster = cluster_from_agent(&info.agent_version);
                if cluster.is_some_and(|c| c != self.cluster) {
                    // Same swarm key, another cluster: no df protocol in common. Not a seed, not a
                    // source, not in the routing table.
                    tracing::info!(%peer_id, cluster = ?cluster, ours = %self.cluster, "peer of another cluster: disconnecting");
                    self.swarm.behaviour_mut().kad.remove_peer(&peer_id);
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                    return;
                }
                let role = role_from_agent(&info.agent_version);
                let conn_ip = self
                    .state
                    .peers
                    .read()
                    .ok()
                    .and_then(|p| p.get(&peer_id).and_then(|i| i.ip));
                // A peer's loopback addresses are ours too unless we reach it over loopback: never
                // route the DHT to them (in containers that dials ourselves).
                // Dialed by DNS name (e.g. a compose service) the connection has no IP: then
                // loopback is usable only if the peer lists nothing else.
                let only_loopback = info
                    .listen_addrs
                    .iter()
                    .filter_map(ip_of)
                    .all(|ip| ip.is_loopback() || ip.is_unspecified());
                let usable = |a: &Multiaddr| match ip_of(a) {
                    Some(ip) if ip.is_unspecified() => false,
                    Some(ip) if ip.is_loopback() => match conn_ip {
                        Some(c) => c.is_loopback(),
                        None => only_loopback,
                    },
                    _ => true,
                };
                let addrs: Vec<Multiaddr> = info.listen_addrs.into_iter().filter(usable).collect();
                // Without a connection IP, the data plane's IP is one the peer listens on.
                let listed_ip = addrs.iter().filter_map(ip_of).next();
                for addr in addrs {
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                }
                if role == Some(Role::Seed) {
                    self.state.add_seed(peer_id);
                }
                if let Ok(mut peers) = self.state.peers.write()
                    && let Some(p) = peers.get_mut(&peer_id)
                {
                    p.role = role.or(Some(Role::Node));
                    p.direct_haves = info.protocols.contains(&self.have_protocol);
                    if p.ip.is_none() {
                        p.ip = listed_ip;
                    }
                }
                self.state.update_identified();
            }
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id, result, step, ..
            }) => self.on_kad_result(id, result, step.last),
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => {
                let verdict_ignore = |s: &mut Self, v| {
                    s.swarm
                        .behaviour_mut()
                        .gossipsub
                        .report_message_validation_result(&message_id, &propagation_source, v);
                };
                let cluster = message.topic == self.cluster_topic;
                let task = self.topics.get(&message.topic).copied();
                if task.is_none() && !cluster {
                    verdict_ignore(self, MessageAcceptance::Ignore);
                    return;
                }
                // Checked here, once per message (gossipsub has dropped duplicates): signed by
                // the source it names, for this topic.
                let body = message
                    .source
                    .as_ref()
                    .and_then(|src| envelope::open(src, message.topic.as_str(), &message.data));
                let Some(body) = body else {
                    tracing::debug!(%propagation_source, source = ?message.source, "rejecting gossip: not signed by its source");
                    verdict_ignore(self, MessageAcceptance::Reject);
                    return;
                };
                let Some(task) = task else {
                    // `body` is signed by `source`, so the source is there.
                    match (message.source, ClusterMessage::decode(body)) {
                        (Some(source), Ok(msg)) => self.emit(NetworkEvent::Cluster {
                            source,
                            propagation_source,
                            message_id,
                            message: msg,
                        }),
                        (_, r) => {
                            tracing::debug!(%propagation_source, error = ?r.err(), "rejecting cluster gossip");
                            verdict_ignore(self, MessageAcceptance::Reject);
                        }
                    }
                    return;
                };
                match GossipMessage::decode(body) {
                    Ok(msg) => self.emit(NetworkEvent::Gossip {
                        task,
                        source: message.source,
                        propagation_source,
                        message_id,
                        message: msg,
                    }),
                    Err(e) => {
                        tracing::debug!(%propagation_source, error = %e, "rejecting gossip");
                        verdict_ignore(self, MessageAcceptance::Reject);
                    }
                }
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Subscribed { peer_id, topic }) => {
                if let Some(task) = self.topics.get(&topic).copied() {
                    self.emit(NetworkEvent::PeerSubscribed {
                        peer: peer_id,
                        task,
                    });
                }
            }
            BehaviourEvent::Control(ev) => self.on_control_event(ev),
            _ => {}
        }
    }

    fn on_kad_result(&mut self, id: QueryId, result: QueryResult, last: bool) {
        let QueryResult::GetProviders(res) = result else {
            return;
        };
        let found = match res {
            Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) => providers,
            _ => HashSet::new(),
        };
        if self.seed_queries.contains(&id) {
            let me = *self.swarm.local_peer_id();
            for p in found {
                if p != me {
                    self.state.add_seed(p);
                    self.dial_seed(p);
                }
            }
            if last {
                self.seed_queries.remove(&id);
            }
            return;
        }
        if let Some((acc, _)) = self.pending_providers.get_mut(&id) {
            acc.extend(found);
        }
        if last && let Some((acc, reply)) = self.pending_providers.remove(&id) {
            let _ = reply.send(acc);
        }
    }

    fn on_control_event(&mut self, ev: request_response::Event<ControlRequest, ControlResponse>) {
        match ev {
            request_response::Event::Message {
                peer,
                connection_id,
                message,
            } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    let (tx, rx) = oneshot::channel();
                    self.inbound_replies
                        .push(Box::pin(async move { (channel, rx.await.ok()) }));
                    self.emit(NetworkEvent::Request {
                        peer,
                        request,
                        reply: tx,
                    });
                }
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    let ip = self.conn_ips.get(&connection_id).copied().or_else(|| {
                        // A connection dialed by DNS name: the IP learnt from identify.
                        self.state
                            .peers
                            .read()
                            .ok()
                            .and_then(|p| p.get(&peer).and_then(|i| i.ip))
                    });
                    if let Some(reply) = self.pending_requests.remove(&request_id) {
                        let _ = reply.send(Ok((response, ip)));
                    }
                }
            },
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if let Some(reply) = self.pending_requests.remove(&request_id) {
                    let _ = reply.send(Err(NetworkError::Request {
                        peer,
                        reason: error.to_string(),
                    }));
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "inbound control request failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_version_carries_the_role() {
        assert_eq!(
            role_from_agent(&agent_version(Role::Seed, "default")),
            Some(Role::Seed)
        );
        assert_eq!(
            role_from_agent(&agent_version(Role::Node, "default")),
            Some(Role::Node)
        );
        assert_eq!(role_from_agent("rust-libp2p/0.1"), None);
    }

    #[test]
    fn the_cluster_is_in_the_agent_and_in_every_protocol_name() {
        assert_eq!(
            cluster_from_agent(&agent_version(Role::Seed, "eu-1")),
            Some("eu-1")
        );
        // A df agent that names no cluster is in the default one; other agents are not df.
        assert_eq!(cluster_from_agent("df/0.1.0 node"), Some("default"));
        assert_eq!(cluster_from_agent("rust-libp2p/0.1"), None);
        assert_eq!(
            cluster_protocol(KAD_PROTOCOL, "default").unwrap().as_ref(),
            "/df/kad/1.0.0"
        );
        assert_eq!(
            cluster_protocol(KAD_PROTOCOL, "eu-1").unwrap().as_ref(),
            "/df/eu-1/kad/1.0.0"
        );
        assert_eq!(
            cluster_protocol(codec::PROTOCOL.as_ref(), "eu-1")
                .unwrap()
                .as_ref(),
            "/df/eu-1/control/1"
        );
        assert_eq!(
            cluster_protocol(GOSSIP_PREFIX, "eu-1").unwrap().as_ref(),
            "/df/eu-1/meshsub"
        );
    }
}
