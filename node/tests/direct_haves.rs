//! Direct haves (`/df/have/1`) between real swarms on 127.0.0.1: who gets them, and what a peer that
//! breaks the framing or the stream limits gets back.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use df_node::config::Role;
use df_node::metrics::Metrics;
use df_node::network::{self, NetworkClient, NetworkEvent, NetworkSettings};
use df_node::trust::SwarmAccess;
use df_protocols::have::{HAVE_PROTOCOL, HaveFrame, MAX_HAVE_FRAME};
use df_protocols::task::{TaskKey, parse_url};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

struct Member {
    net: NetworkClient,
    events: mpsc::Receiver<NetworkEvent>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
}

impl Drop for Member {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Member {
    async fn start(cluster: &str, bootstrap: Vec<Multiaddr>) -> Result<Member> {
        let metrics = Arc::new(Metrics::new());
        let (net, events, event_loop) = network::spawn(NetworkSettings {
            keypair: libp2p::identity::Keypair::generate_ed25519(),
            role: Role::Node,
            cluster: cluster.to_owned(),
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse()?],
            bootstrap,
            idle_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(10),
            access: SwarmAccess::Open,
            metrics: metrics.clone(),
        })
        .await?;
        let shutdown = CancellationToken::new();
        tokio::spawn(event_loop.run(shutdown.clone()));
        Ok(Member {
            net,
            events,
            metrics,
            shutdown,
        })
    }

    fn addr(&self) -> Result<Multiaddr> {
        let a = self
            .net
            .state()
            .listen_addrs()
            .into_iter()
            .next()
            .context("no listen address")?;
        Ok(a.with(libp2p::multiaddr::Protocol::P2p(self.net.local_peer_id())))
    }

    /// The next event `pick` takes, skipping the others.
    async fn next<T>(&mut self, mut pick: impl FnMut(NetworkEvent) -> Option<T>) -> Result<T> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let ev = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .context("no such event in time")?
                .context("event loop stopped")?;
            if let Some(t) = pick(ev) {
                return Ok(t);
            }
        }
    }

    async fn next_have(&mut self) -> Result<(PeerId, HaveFrame)> {
        self.next(|ev| match ev {
            NetworkEvent::Have { peer, frame } => Some((peer, frame)),
            _ => None,
        })
        .await
    }
}

fn task(n: u32) -> TaskKey {
    // A fixed URL of that shape always parses.
    match parse_url(&format!("http://origin.test/file-{n}")) {
        Ok(url) => TaskKey::for_url(&url, ""),
        Err(e) => panic!("test URL: {e}"),
    }
}

fn frame(n: u32, pieces: Vec<u32>) -> HaveFrame {
    HaveFrame {
        task: task(n),
        pieces,
        complete: false,
    }
}

#[tokio::test]
async fn haves_go_straight_to_the_connected_peers_on_the_task_and_no_others() -> Result<()> {
    let mut a = Member::start("default", vec![]).await?;
    let mut b = Member::start("default", vec![a.addr()?]).await?;
    // C is connected too, but on no task.
    let c = Member::start("default", vec![a.addr()?]).await?;
    anyhow::ensure!(
        a.net.state().wait_identified(2, WAIT).await,
        "peers not identified"
    );
    a.net.subscribe(task(1)).await?;
    b.net.subscribe(task(1)).await?;
    let b_id = b.net.local_peer_id();
    a.next(|ev| match ev {
        NetworkEvent::PeerSubscribed { peer, .. } if peer == b_id => Some(()),
        _ => None,
    })
    .await?;

    let sent = frame(1, vec![0, 5, 9]);
    let needs_gossip = a.net.send_have(&sent).await?;
    assert!(!needs_gossip, "every peer on the topic takes direct haves");
    let (from, got) = b.next_have().await?;
    assert_eq!(from, a.net.local_peer_id());
    assert_eq!(got, sent);
    // A second have rides the same stream.
    let second = HaveFrame {
        complete: true,
        ..frame(1, vec![1])
    };
    a.net.send_have(&second).await?;
    assert_eq!(b.next_have().await?.1, second);
    assert_eq!(
        a.metrics.direct_haves("sent"),
        2,
        "queued for B only, not C"
    );
    assert_eq!(b.metrics.direct_haves("received"), 2);
    assert_eq!(c.metrics.direct_haves("received"), 0);

    // A task nobody else is on: nobody to send to, nothing to gossip.
    a.net.subscribe(task(2)).await?;
    assert!(!a.net.send_have(&frame(2, vec![3])).await?);
    assert_eq!(a.metrics.direct_haves("sent"), 2);
    Ok(())
}

/// A bare libp2p member: it answers pings (members close connections whose pings fail) and can open
/// any stream.
#[derive(libp2p::swarm::NetworkBehaviour)]
struct Raw {
    stream: libp2p_stream::Behaviour,
    ping: libp2p::ping::Behaviour,
}

/// A bare libp2p swarm that can open any stream: a member that ignores df's rules.
/// Returns its stream control, the peer it dialled and its own peer ID.
async fn raw_peer(to: Multiaddr) -> Result<(libp2p_stream::Control, PeerId, PeerId)> {
    let mut swarm: Swarm<Raw> = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default(),
            libp2p::noise::Config::new,
            libp2p::yamux::Config::default,
        )?
        .with_behaviour(|_| Raw {
            stream: libp2p_stream::Behaviour::new(),
            ping: libp2p::ping::Behaviour::default(),
        })?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    let control = swarm.behaviour().stream.new_control();
    let me = *swarm.local_peer_id();
    let peer = match to.iter().last() {
        Some(libp2p::multiaddr::Protocol::P2p(p)) => p,
        _ => bail!("no peer ID in {to}"),
    };
    swarm.dial(to)?;
    tokio::time::timeout(WAIT, async {
        loop {
            if let libp2p::swarm::SwarmEvent::ConnectionEstablished { .. } =
                swarm.select_next_some().await
            {
                break;
            }
        }
    })
    .await
    .context("raw peer did not connect")?;
    tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });
    Ok((control, peer, me))
}

/// Whether the other end closed `stream` (EOF or reset) within [`WAIT`].
async fn closed_by_remote(stream: &mut libp2p::Stream) -> bool {
    let mut buf = [0u8; 16];
    matches!(
        tokio::time::timeout(WAIT, stream.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test]
async fn a_peer_breaking_the_framing_or_the_stream_limit_loses_that_stream_only() -> Result<()> {
    let mut b = Member::start("default", vec![]).await?;
    let (mut raw, b_id, raw_id) = raw_peer(b.addr()?).await?;
    let proto = StreamProtocol::new(HAVE_PROTOCOL);

    // A length over the limit: the stream is closed before any body is read.
    let mut bad = raw
        .open_stream(b_id, proto.clone())
        .await
        .context("opening a stream")?;
    bad.write_all(&(MAX_HAVE_FRAME as u32 + 1).to_be_bytes())
        .await?;
    bad.flush().await?;
    assert!(
        closed_by_remote(&mut bad).await,
        "oversized frame kept open"
    );
    // A body that is no frame (unknown flags): the same.
    let mut garbled = frame(1, vec![2]).encode()?;
    let flags_at = 4 + 1 + garbled[4] as usize;
    garbled[flags_at] = 0x80;
    let mut bad = raw
        .open_stream(b_id, proto.clone())
        .await
        .context("a second stream after a bad one")?;
    bad.write_all(&garbled).await?;
    bad.flush().await?;
    assert!(closed_by_remote(&mut bad).await, "garbled frame kept open");

    // Two streams per peer at most: a third is closed at once, the first two still work.
    let mut first = raw
        .open_stream(b_id, proto.clone())
        .await
        .context("the first of two streams")?;
    let mut second = raw
        .open_stream(b_id, proto.clone())
        .await
        .context("the second of two streams")?;
    // An empty have on each: both streams are read.
    for s in [&mut first, &mut second] {
        s.write_all(&frame(1, vec![]).encode()?).await?;
        s.flush().await?;
    }
    for _ in 0..2 {
        b.next_have().await?;
    }
    let mut third = raw
        .open_stream(b_id, proto.clone())
        .await
        .context("a third stream (refused after it opens)")?;
    third.write_all(&frame(1, vec![]).encode()?).await?;
    third.flush().await?;
    assert!(
        closed_by_remote(&mut third).await,
        "a third stream kept open"
    );
    let sent = frame(1, vec![7]);
    second.write_all(&sent.encode()?).await?;
    second.flush().await?;
    let (from, got) = b.next_have().await?;
    assert_eq!(from, raw_id);
    assert_eq!(got, sent);
    Ok(())
}

#[tokio::test]
async fn members_of_another_cluster_cannot_open_a_have_stream() -> Result<()> {
    let b = Member::start("eu-1", vec![]).await?;
    let (mut raw, b_id, _) = raw_peer(b.addr()?).await?;
    let r = raw
        .open_stream(b_id, StreamProtocol::new(HAVE_PROTOCOL))
        .await;
    assert!(
        matches!(
            r,
            Err(libp2p_stream::OpenStreamError::UnsupportedProtocol(_))
        ),
        "the default cluster's have protocol was accepted in eu-1: {r:?}"
    );
    Ok(())
}
