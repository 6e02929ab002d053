//! Who a node trusts: the swarm key keeps outsiders out, only trusted producers are asked to
//! fetch origins (and see credentials), and their word is the only one taken for URL tasks.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use async_trait::async_trait;
use bytes::Bytes;
use df_node::origin::{ByteStream, OriginSpec};
use df_node::{DownloadRequest, Origin, OriginError, OriginResponse, Role};
use df_protocols::manifest::Validators;
use df_testnet::swarm::other_swarm_key;
use df_testnet::{TestNode, TestOrigin, content, init_test_logs, sha256_hex};

const MIB: usize = 1 << 20;

/// A request an origin received: URL and headers.
type Seen = (String, Vec<(String, String)>);

/// An attacker's origin: answers every URL with its own bytes and records what it was sent.
#[derive(Default)]
struct EvilOrigin {
    seen: Mutex<Vec<Seen>>,
}

const EVIL_LEN: u64 = 3 * MIB as u64;

impl EvilOrigin {
    fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn bytes(range: Range<u64>) -> ByteStream {
        let end = range.end.min(EVIL_LEN);
        let len = end.saturating_sub(range.start) as usize;
        Box::pin(futures::stream::once(async move {
            Ok(Bytes::from(vec![0xEE; len]))
        }))
    }
}

#[async_trait]
impl Origin for EvilOrigin {
    async fn open(
        &self,
        spec: &OriginSpec,
        first: Range<u64>,
    ) -> Result<OriginResponse, OriginError> {
        self.seen
            .lock()
            .unwrap()
            .push((spec.url.to_string(), spec.headers.clone()));
        Ok(OriginResponse {
            content_length: EVIL_LEN,
            validators: Validators::default(),
            ranged: true,
            body: Self::bytes(first),
        })
    }

    async fn range(
        &self,
        spec: &OriginSpec,
        range: Range<u64>,
        _content_length: u64,
        _validators: &Validators,
    ) -> Result<ByteStream, OriginError> {
        self.seen
            .lock()
            .unwrap()
            .push((spec.url.to_string(), spec.headers.clone()));
        Ok(Self::bytes(range))
    }
}

fn with_credentials(url: &str) -> DownloadRequest {
    DownloadRequest {
        url: url.to_owned(),
        headers: vec![("Authorization".into(), "Bearer member-secret".into())],
        ..DownloadRequest::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outsider_without_the_swarm_key_cannot_connect_or_serve() -> Result<()> {
    init_test_logs();
    let origin = TestOrigin::start().await?;
    let data = content(5 * MIB, 21);
    origin.put("/f", data.clone());
    let member = TestNode::start(Role::Node, vec![], |_| {}).await?;
    let keydir = tempfile::tempdir()?;
    let other_key = other_swarm_key(keydir.path())?;
    let evil = Arc::new(EvilOrigin::default());
    // A stock seed with its own origin for the same URL, bootstrapping to the member.
    let outsider = TestNode::start_with_origin(
        Role::Seed,
        vec![member.bootstrap_addr()],
        evil.clone(),
        |c| c.network.swarm_key = Some(other_key.clone()),
    )
    .await?;
    assert!(
        !outsider
            .node
            .wait_for_peers(1, Duration::from_secs(3))
            .await,
        "a peer with another swarm key connected"
    );
    assert_eq!(member.api.status().await?.connected_peers, 0);
    let (len, digest) = member.fetch(with_credentials(&origin.url("/f"))).await?;
    assert_eq!((len, digest), (data.len() as u64, sha256_hex(&data)));
    assert!(
        evil.requests().is_empty(),
        "the outsider was asked to fetch"
    );
    outsider.stop().await;
    member.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_an_open_swarm_an_unlisted_seed_is_never_asked_and_serves_nothing() -> Result<()> {
    init_test_logs();
    let origin = TestOrigin::start().await?;
    let evil = Arc::new(EvilOrigin::default());
    let outsider = TestNode::start_with_origin(Role::Seed, vec![], evil.clone(), |c| {
        c.network.swarm_key = None;
        c.network.open_swarm = true;
    })
    .await?;
    let member = TestNode::start(Role::Node, vec![outsider.bootstrap_addr()], |c| {
        c.network.swarm_key = None;
        c.network.open_swarm = true;
    })
    .await?;
    assert!(member.node.wait_for_peers(1, Duration::from_secs(10)).await);
    // Several fresh tasks: before, the outsider seed won every election and its bytes were
    // delivered as success.
    for i in 0..4 {
        let data = content(2 * MIB + i * 1000, 30 + i as u64);
        let path = format!("/open{i}");
        origin.put(&path, data.clone());
        let (len, digest) = member.fetch(with_credentials(&origin.url(&path))).await?;
        assert_eq!(
            (len, digest),
            (data.len() as u64, sha256_hex(&data)),
            "download {i} was served by the untrusted seed"
        );
    }
    let seen = evil.requests();
    assert!(
        seen.is_empty(),
        "an untrusted seed was asked to fetch (credentials included): {seen:?}"
    );
    assert_eq!(member.api.status().await?.bytes.from_peers, 0);
    member.stop().await;
    outsider.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_trust_producers_only_listed_seeds_see_credentials() -> Result<()> {
    init_test_logs();
    let origin = TestOrigin::start().await?;
    origin.require_header("Authorization", "Bearer member-secret");
    let good = TestNode::start(Role::Seed, vec![], |_| {}).await?;
    let evil = Arc::new(EvilOrigin::default());
    // A member of the swarm, but not a listed producer.
    let rogue = TestNode::start_with_origin(
        Role::Seed,
        vec![good.bootstrap_addr()],
        evil.clone(),
        |_| {},
    )
    .await?;
    let listed = good.node.peer_id();
    let node = TestNode::start(Role::Node, vec![good.bootstrap_addr()], |c| {
        c.trust.producers = vec![listed];
    })
    .await?;
    assert!(node.node.wait_for_peers(2, Duration::from_secs(10)).await);
    // Many task keys: the rogue seed is XOR-closer than the listed one for about half of them.
    for i in 0..6 {
        let data = content(MIB + i * 777, 40 + i as u64);
        let path = format!("/cred{i}");
        origin.put(&path, data.clone());
        let (len, digest) = tokio::time::timeout(
            Duration::from_secs(60),
            node.fetch(with_credentials(&origin.url(&path))),
        )
        .await??;
        assert_eq!(
            (len, digest),
            (data.len() as u64, sha256_hex(&data)),
            "download {i}"
        );
    }
    let seen = evil.requests();
    assert!(
        seen.is_empty(),
        "an unlisted producer received a request: {seen:?}"
    );
    node.stop().await;
    rogue.stop().await;
    good.stop().await;
    Ok(())
}

/// A purge reaches every member holding the task, each reports, and the next download goes to the
/// origin again; a member that does not trust the asker refuses it and keeps the task.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_purge_is_carried_out_by_members_that_trust_the_asker() -> Result<()> {
    use df_node::api::PurgeScope;
    use df_testnet::url_task_key;
    init_test_logs();
    let origin = TestOrigin::start().await?;
    let data = content(3 * MIB, 41);
    origin.put("/bad-artifact", data.clone());
    let url = origin.url("/bad-artifact");
    let id = url_task_key(&url)?.to_string();
    let seed = TestNode::start(Role::Seed, Vec::new(), |_| {}).await?;
    let boot = vec![seed.bootstrap_addr()];
    let seed_id = seed.node.peer_id();
    // `a` trusts only the seed; `b` trusts every member (the default).
    let a = TestNode::start(Role::Node, boot.clone(), move |c| {
        c.trust.producers = vec![seed_id]
    })
    .await?;
    let b = TestNode::start(Role::Node, boot, |_| {}).await?;
    for n in [&a, &b] {
        assert!(n.node.wait_for_peers(1, Duration::from_secs(10)).await);
        assert_eq!(n.fetch_url(&url).await?.1, sha256_hex(&data));
    }
    assert_eq!(origin.bytes_sent(), data.len() as u64);

    // b asks everyone: the seed and b itself delete; a does not trust b and refuses.
    let hosts = b.api.purge(&id, PurgeScope::AllPeers).await?;
    let outcome = |peer: df_node::PeerId| {
        hosts
            .iter()
            .find(|h| h.peer == peer.to_string())
            .map(|h| h.outcome.clone())
    };
    assert_eq!(
        outcome(b.node.peer_id()).as_deref(),
        Some("deleted"),
        "{hosts:?}"
    );
    assert_eq!(outcome(seed_id).as_deref(), Some("deleted"), "{hosts:?}");
    assert_eq!(
        outcome(a.node.peer_id()).as_deref(),
        Some("refused"),
        "{hosts:?}"
    );
    assert_eq!(a.api.task(&id).await?.state, "complete", "a lost the task");
    assert!(b.api.task(&id).await.is_err(), "b still has the task");

    // The seed (trusted by a) purges everywhere; then a download fetches the origin again.
    let hosts = seed.api.purge(&id, PurgeScope::AllPeers).await?;
    assert!(
        hosts
            .iter()
            .all(|h| matches!(h.outcome.as_str(), "deleted" | "absent")),
        "{hosts:?}"
    );
    assert_eq!(
        hosts.iter().filter(|h| h.outcome == "deleted").count(),
        1,
        "only a still held it: {hosts:?}"
    );
    assert!(a.api.task(&id).await.is_err(), "a still has the task");
    assert_eq!(b.fetch_url(&url).await?.1, sha256_hex(&data));
    assert_eq!(origin.bytes_sent(), 2 * data.len() as u64);
    for n in [a, b, seed] {
        n.stop().await;
    }
    Ok(())
}
