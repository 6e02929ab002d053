//! Multi-node behaviour on real sockets: seeds, nodes, a counting origin.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::Result;
use df_node::api::client::ApiError;
use df_node::{DownloadRequest, Phase, Role, TaskError};
use df_testnet::{Swarm, TestNode, TestOrigin, content, init_test_logs, sha256_hex, url_task_key};
use futures::future::join_all;

const MIB: usize = 1 << 20;
/// The piece length df picks for the files these tests use (under 500 MiB).
const PIECE: usize = MIB;

async fn fetch_all(nodes: &[&TestNode], url: &str) -> Vec<Result<(u64, String)>> {
    join_all(nodes.iter().map(|n| n.fetch_url(url))).await
}

fn assert_all_ok(results: Vec<Result<(u64, String)>>, want: &str, len: usize) {
    for (i, r) in results.into_iter().enumerate() {
        let (n, digest) = r.unwrap_or_else(|e| panic!("node {i} failed: {e:#}"));
        assert_eq!(n, len as u64, "node {i} length");
        assert_eq!(digest, want, "node {i} content");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seed_and_eight_nodes_fetch_the_origin_once_and_trade_pieces() -> Result<()> {
    init_test_logs();
    let origin = TestOrigin::start().await?;
    let data = content(64 * MIB, 1);
    origin.put("/big", data.clone());
    let swarm = Swarm::start(1, 8, |_| {}).await?;
    let nodes: Vec<&TestNode> = swarm.nodes.iter().collect();
    let results = fetch_all(&nodes, &origin.url("/big")).await;
    assert_all_ok(results, &sha256_hex(&data), data.len());
    let sent = origin.bytes_sent();
    assert!(
        sent as f64 <= 1.1 * data.len() as f64,
        "origin sent {sent} bytes for a {} byte file",
        data.len()
    );
    let uploaded = swarm.nodes_uploaded().await?;
    eprintln!("nodes uploaded {uploaded} bytes to each other");
    // Measured alone: 1.7 to 3.3 x the file; with the other tests on the same 2 cores it once
    // fell just under 1 x (the unshaped seed then serves more itself). Half the file still shows
    // that nodes trade pieces rather than all queueing at the seed.
    assert!(
        uploaded >= data.len() as u64 / 2,
        "nodes uploaded only {uploaded} bytes to each other"
    );
    swarm.stop().await;
    Ok(())
}

/// Nodes asking a seed for the same new task at the same moment join one runner there: each small
/// file leaves the origin once (a race in the task table once started two runners, and two origin
/// fetches, for two simultaneous requests).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn simultaneous_requests_for_new_tasks_fetch_each_origin_once() -> Result<()> {
    init_test_logs();
    let origin = TestOrigin::start().await?;
    let swarm = Swarm::start(1, 4, |_| {}).await?;
    let mut total = 0u64;
    for round in 0..8u8 {
        let data = content(20_000 + usize::from(round) * 1_000, 100 + u64::from(round));
        let path = format!("/small-{round}");
        origin.put(&path, data.clone());
        total += data.len() as u64;
        let nodes: Vec<&TestNode> = swarm.nodes.iter().collect();
        let results = fetch_all(&nodes, &origin.url(&path)).await;
        assert_all_ok(results, &sha256_hex(&data), data.len());
        let sent = origin.bytes_sent();
        assert!(
            sent <= total,
            "round {round}: the origin sent {sent} bytes for {total} bytes of files"
        );
    }
    swarm.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_nodes_without_seed_fetch_the_origin_once() -> Result<()> {
    init_test_logs();
    let origin = TestOrigin::start().await?;
    let data = content(64 * MIB, 2);
    origin.put("/f", data.clone());
    let swarm = Swarm::start(0, 4, |_| {}).await?;
    let nodes: Vec<&TestNode> = swarm.nodes.iter().collect();
    let results = fetch_all(&nodes, &origin.url("/f")).await;
    assert_all_ok(results, &sha256_hex(&data), data.len());
    let sent = origin.bytes_sent();
    assert!(
        sent as f64 <= 1.1 * data.len() as f64,
        "origin sent {sent} bytes for a {} byte file",
        data.len()
    );
    let uploaded = swarm.nodes_uploaded().await?;
    assert!(
        uploaded >= data.len() as u64,
        "nodes uploaded only {uploaded}"
    );
    swarm.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seed_stopped_halfway_every_node_still_completes() -> Result<()> {
    init_test_logs();
    let origin = TestOrigin::start().await?;
    let data = content(64 * MIB, 3);
    origin.put("/slow", data.clone());
    // 64 MiB at 24 MiB/s per response, 4 ranges in flight: the seed needs about a second.
    origin.set_rate(6 * MIB as u64);
    let swarm = Swarm::start(1, 4, |_| {}).await?;
    let url = origin.url("/slow");
    let key = url_task_key(&url)?;
    let Swarm { mut seeds, nodes } = swarm;
    let seed = seeds.remove(0);
    let downloads = tokio::spawn({
        let reqs: Vec<_> = nodes
            .iter()
            .map(|n| {
                let api = n.api.clone();
                let url = url.clone();
                async move {
                    let info = api
                        .create_task(&DownloadRequest {
                            url,
                            ..DownloadRequest::default()
                        })
                        .await?;
                    collect(&api, &info.id).await
                }
            })
            .collect();
        join_all(reqs)
    });
    // Wait until the seed holds half of the file, then stop it.
    let mut progress = loop {
        if let Some(p) = seed.node.progress(&key).await {
            break p;
        }
        tokio::task::yield_now().await;
    };
    progress
        .wait_for(|p| p.bytes_done() >= (data.len() / 2) as u64)
        .await?;
    seed.stop().await;
    let results = downloads.await?;
    for (i, r) in results.into_iter().enumerate() {
        let (n, digest) = r.unwrap_or_else(|e| panic!("node {i} failed: {e:#}"));
        assert_eq!(n, data.len() as u64);
        assert_eq!(digest, sha256_hex(&data), "node {i}");
    }
    for n in nodes {
        n.stop().await;
    }
    Ok(())
}

async fn collect(api: &df_node::api::client::ApiClient, id: &str) -> Result<(u64, String)> {
    use futures::StreamExt;
    use sha2::Digest;
    let (_, mut s) = api.content(id, None).await?;
    let mut h = sha2::Sha256::new();
    let mut n = 0u64;
    while let Some(c) = s.next().await {
        let c = c?;
        n += c.len() as u64;
        h.update(&c);
    }
    Ok((n, hex::encode(h.finalize())))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_serving_corrupt_pieces_is_banned_and_outputs_stay_correct() -> Result<()> {
    init_test_logs();
    let origin = TestOrigin::start().await?;
    let data = content(32 * MIB, 4);
    origin.put("/c", data.clone());
    let url = origin.url("/c");
    let seed = TestNode::start(Role::Seed, vec![], |_| {}).await?;
    let boot = vec![seed.bootstrap_addr()];
    let bad = TestNode::start(Role::Node, boot.clone(), |c| {
        c.faults.corrupt_uploads = true
    })
    .await?;
    assert!(bad.node.wait_for_peers(1, Duration::from_secs(10)).await);
    // The bad node gets the file first, so it is a source everyone is offered.
    bad.fetch_url(&url).await?;
    let mut good = Vec::new();
    for _ in 0..4 {
        let n = TestNode::start(Role::Node, boot.clone(), |_| {}).await?;
        assert!(n.node.wait_for_peers(1, Duration::from_secs(10)).await);
        good.push(n);
    }
    let refs: Vec<&TestNode> = good.iter().collect();
    assert_all_ok(fetch_all(&refs, &url).await, &sha256_hex(&data), data.len());
    let key = url_task_key(&url)?;
    let bad_id = bad.node.peer_id().to_string();
    let mut banned_by = 0;
    for n in &good {
        let info = n.api.task(&key.to_string()).await?;
        assert!(
            info.banned_peers.iter().all(|p| *p == bad_id),
            "an honest peer was banned: {:?}",
            info.banned_peers
        );
        if info.banned_peers.contains(&bad_id) {
            banned_by += 1;
        }
    }
    assert!(banned_by >= 1, "no node banned the corrupting peer");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn boundary_sizes_arrive_intact() -> Result<()> {
    init_test_logs();
    let origin = TestOrigin::start().await?;
    let swarm = Swarm::start(1, 2, |_| {}).await?;
    for (i, len) in [0, 1, PIECE - 1, PIECE, PIECE + 1, 3 * PIECE + 7]
        .into_iter()
        .enumerate()
    {
        let data = content(len, 10 + i as u64);
        let path = format!("/size{len}");
        origin.put(&path, data.clone());
        let nodes: Vec<&TestNode> = swarm.nodes.iter().collect();
        let results = fetch_all(&nodes, &origin.url(&path)).await;
        assert_all_ok(results, &sha256_hex(&data), len);
    }
    swarm.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn origin_without_range_support_still_works() -> Result<()> {
    init_test_logs();
    let origin = TestOrigin::start().await?;
    origin.disable_ranges();
    let data = content(3 * PIECE + 5, 20);
    origin.put("/nr", data.clone());
    let swarm = Swarm::start(1, 2, |_| {}).await?;
    let nodes: Vec<&TestNode> = swarm.nodes.iter().collect();
    assert_all_ok(
        fetch_all(&nodes, &origin.url("/nr")).await,
        &sha256_hex(&data),
        data.len(),
    );
    swarm.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_origin_body_cut_off_mid_piece_is_resumed_where_it_broke() -> Result<()> {
    init_test_logs();
    let origin = TestOrigin::start().await?;
    let data = content(7 * PIECE + 5, 21);
    origin.put("/cut", data.clone());
    // Three answers longer than half a piece break off there.
    let cut = (PIECE / 2) as u64;
    origin.cut_after("/cut", cut, 3);
    let swarm = Swarm::start(1, 1, |_| {}).await?;
    let nodes: Vec<&TestNode> = swarm.nodes.iter().collect();
    assert_all_ok(
        fetch_all(&nodes, &origin.url("/cut")).await,
        &sha256_hex(&data),
        data.len(),
    );
    assert_eq!(origin.cuts_left(), 0, "the origin never cut an answer off");
    // Each break resumes at the first byte not yet received: at most the last 64 KiB chunk the
    // origin counted as sent is lost per break (re-fetching the broken piece would cost more).
    let sent = origin.bytes_sent();
    assert!(
        sent <= data.len() as u64 + 3 * (64 << 10),
        "origin sent {sent} bytes for {} (the broken pieces were fetched again)",
        data.len()
    );
    swarm.stop().await;
    Ok(())
}

fn task_error(r: Result<(u64, String)>) -> TaskError {
    match r {
        Err(e) => match e.downcast::<ApiError>() {
            Ok(ApiError::Task(t)) => t,
            Ok(other) => panic!("expected a task error, got {other}"),
            Err(e) => panic!("expected a task error, got {e:#}"),
        },
        Ok(_) => panic!("download unexpectedly succeeded"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failures_are_reported_with_their_cause() -> Result<()> {
    init_test_logs();
    let origin = TestOrigin::start().await?;
    for (path, status) in [("/e404", 404u16), ("/e403", 403), ("/e500", 500)] {
        origin.fail(path, status);
    }
    origin.put("/ok", content(1000, 5));
    let swarm = Swarm::start(1, 1, |_| {}).await?;
    let node = &swarm.nodes[0];
    for status in [404u16, 403, 500] {
        let e = task_error(node.fetch_url(&origin.url(&format!("/e{status}"))).await);
        match &e {
            TaskError::OriginStatus { status: s, message } => {
                assert_eq!(*s, status);
                assert!(message.contains(&status.to_string()), "{message}");
            }
            other => panic!("status {status}: unexpected {other:?}"),
        }
    }
    // Unreachable origin (a port nothing listens on).
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let e = task_error(node.fetch_url(&format!("http://{closed}/x")).await);
    assert!(
        matches!(e, TaskError::OriginUnreachable { .. }),
        "unexpected {e:?}"
    );
    // Malformed URL.
    let e = task_error(node.fetch_url("not a url").await);
    assert!(
        matches!(e, TaskError::BadRequest { .. }),
        "unexpected {e:?}"
    );
    // Digest mismatch.
    let e = task_error(
        node.fetch(DownloadRequest {
            url: origin.url("/ok"),
            digest: Some(format!("sha256:{}", "00".repeat(32)).parse()?),
            ..DownloadRequest::default()
        })
        .await,
    );
    assert!(
        matches!(e, TaskError::DigestMismatch { .. }),
        "unexpected {e:?}"
    );
    // And the node still works.
    node.fetch_url(&origin.url("/ok")).await?;
    swarm.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disable_back_to_source_without_a_seed_is_a_clear_error() -> Result<()> {
    init_test_logs();
    let origin = TestOrigin::start().await?;
    origin.put("/x", content(1000, 6));
    let swarm = Swarm::start(0, 2, |_| {}).await?;
    let e = task_error(
        swarm.nodes[0]
            .fetch(DownloadRequest {
                url: origin.url("/x"),
                disable_back_to_source: true,
                ..DownloadRequest::default()
            })
            .await,
    );
    assert!(matches!(e, TaskError::NoSource { .. }), "unexpected {e:?}");
    assert_eq!(origin.bytes_sent(), 0);
    // Once a peer holds it, the same request succeeds from the peer alone.
    swarm.nodes[1].fetch_url(&origin.url("/x")).await?;
    let sent = origin.bytes_sent();
    swarm.nodes[0]
        .fetch(DownloadRequest {
            url: origin.url("/x"),
            disable_back_to_source: true,
            ..DownloadRequest::default()
        })
        .await?;
    assert_eq!(origin.bytes_sent(), sent);
    swarm.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn same_digest_at_two_urls_is_one_swarm() -> Result<()> {
    init_test_logs();
    let origin = TestOrigin::start().await?;
    let data = content(2 * PIECE + 3, 7);
    origin.put("/a", data.clone());
    origin.put("/b", data.clone());
    let digest = format!("sha256:{}", sha256_hex(&data));
    let swarm = Swarm::start(1, 2, |_| {}).await?;
    swarm.nodes[0]
        .fetch(DownloadRequest {
            url: origin.url("/a"),
            digest: Some(digest.parse()?),
            ..DownloadRequest::default()
        })
        .await?;
    let sent = origin.bytes_sent();
    let (_, got) = swarm.nodes[1]
        .fetch(DownloadRequest {
            url: origin.url("/b"),
            digest: Some(digest.parse()?),
            ..DownloadRequest::default()
        })
        .await?;
    assert_eq!(got, sha256_hex(&data));
    assert_eq!(origin.bytes_sent(), sent, "the second URL went to origin");
    swarm.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_on_the_data_plane_does_not_hurt_the_node() -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    init_test_logs();
    let origin = TestOrigin::start().await?;
    origin.put("/g", content(1000, 8));
    let swarm = Swarm::start(0, 1, |_| {}).await?;
    let node = &swarm.nodes[0];
    for junk in [
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        b"DFX1\xff".to_vec(),
        vec![0xffu8; 100_000],
        b"DFX1\x05abcde".to_vec(),
    ] {
        let mut s = tokio::net::TcpStream::connect(node.node.data_addr()).await?;
        let _ = s.write_all(&junk).await;
        let mut buf = [0u8; 16];
        // The node answers "denied" or closes; it must not hang or crash.
        let _ = tokio::time::timeout(Duration::from_secs(15), s.read(&mut buf)).await?;
    }
    node.fetch_url(&origin.url("/g")).await?;
    assert_eq!(node.api.status().await?.role, Role::Node);
    let _ = Phase::Complete;
    swarm.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_started_before_its_bootstrap_peer_joins_when_it_appears() -> Result<()> {
    init_test_logs();
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr: df_node::Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}").parse()?;
    let node = TestNode::start(Role::Node, vec![addr.clone()], |_| {}).await?;
    let seed = TestNode::start(Role::Seed, vec![], |c| c.listen = vec![addr]).await?;
    assert!(
        node.node.wait_for_peers(1, Duration::from_secs(15)).await,
        "the node never joined its bootstrap peer"
    );
    node.stop().await;
    seed.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_seed_joined_by_dns_name_serves_pieces() -> Result<()> {
    // A connection dialed by name carries no IP; the node must still reach the seed's data plane
    // (in docker-compose, peers join `/dns4/seed/tcp/4001`).
    init_test_logs();
    let origin = TestOrigin::start().await?;
    let data = content(3 * PIECE + 5, 9);
    origin.put("/named", data.clone());
    let seed = TestNode::start(Role::Seed, vec![], |_| {}).await?;
    let addr = seed.bootstrap_addr().to_string();
    let port = addr
        .split("/tcp/")
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap();
    let by_name: df_node::Multiaddr = format!("/dns4/localhost/tcp/{port}").parse()?;
    let node = TestNode::start(Role::Node, vec![by_name], |c| {
        c.download.back_to_source = false;
    })
    .await?;
    assert!(node.node.wait_for_peers(1, Duration::from_secs(10)).await);
    let r = tokio::time::timeout(
        Duration::from_secs(60),
        node.fetch_url(&origin.url("/named")),
    )
    .await
    .expect("download stalled: the seed's data plane was not reached")?;
    assert_eq!(r, (data.len() as u64, sha256_hex(&data)));
    assert_eq!(origin.bytes_sent(), data.len() as u64);
    node.stop().await;
    seed.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_origin_replaced_mid_download_without_validators_never_gives_a_mixed_file() -> Result<()>
{
    // The origin sends no ETag or Last-Modified, and its file is replaced (same length) after
    // the first few range requests: the seed's pieces would be half old, half new.
    init_test_logs();
    let origin = TestOrigin::start().await?;
    origin.drop_validators();
    let old = content(6 * PIECE, 31);
    let new = content(6 * PIECE, 32);
    origin.put("/swapped", old.clone());
    origin.replace_after("/swapped", 3, new.clone());
    let swarm = Swarm::start(1, 1, |_| {}).await?;
    let node = &swarm.nodes[0];
    let url = origin.url("/swapped");
    match node.fetch_url(&url).await {
        // Either the change is reported ...
        Err(e) => {
            let e = task_error(Err(e));
            assert!(
                matches!(e, TaskError::ContentChanged { .. }),
                "unexpected {e:?}"
            );
            // ... and a later download gets the new file whole. (The next request can still meet
            // the old version's hashes held by a runner on its way out and fail the same way
            // once more: a known rough edge, so up to three tries.)
            let mut last = None;
            for _ in 0..3 {
                match node.fetch_url(&url).await {
                    Ok(r) => {
                        last = Some(r);
                        break;
                    }
                    Err(e) => {
                        let e = task_error(Err(e));
                        assert!(
                            matches!(e, TaskError::ContentChanged { .. }),
                            "unexpected {e:?}"
                        );
                    }
                }
            }
            assert_eq!(last, Some((new.len() as u64, sha256_hex(&new))));
        }
        // ... or the file arrives whole, in one version.
        Ok(r) => assert!(
            r == (new.len() as u64, sha256_hex(&new)) || r == (old.len() as u64, sha256_hex(&old)),
            "a file made of two origin versions was delivered"
        ),
    }
    swarm.stop().await;
    Ok(())
}

/// A node of cluster "b" joined through a seed of cluster "a" (same swarm key): it uses neither the
/// seed nor cluster a's nodes, and fetches the origin itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn members_of_another_cluster_are_not_seeds_or_sources() -> Result<()> {
    init_test_logs();
    let origin = TestOrigin::start().await?;
    let data = content(3 * MIB, 31);
    origin.put("/clustered", data.clone());
    let url = origin.url("/clustered");
    let in_cluster =
        |name: &'static str| move |c: &mut df_node::NodeConfig| c.cluster = name.into();
    let seed = TestNode::start(Role::Seed, Vec::new(), in_cluster("a")).await?;
    let boot = vec![seed.bootstrap_addr()];
    let a1 = TestNode::start(Role::Node, boot.clone(), in_cluster("a")).await?;
    let b1 = TestNode::start(Role::Node, boot, in_cluster("b")).await?;
    assert!(a1.node.wait_for_peers(1, Duration::from_secs(10)).await);
    assert_all_ok(
        vec![a1.fetch_url(&url).await],
        &sha256_hex(&data),
        data.len(),
    );
    assert_eq!(origin.bytes_sent(), data.len() as u64);

    // b1 reached the seed, learnt its cluster and dropped it: it identifies no peer.
    assert!(
        !b1.node.wait_for_peers(1, Duration::from_secs(3)).await,
        "a member of another cluster counts as a peer"
    );
    let st = b1.api.status().await?;
    assert_eq!((st.known_seeds, st.connected_peers), (0, 0), "{st:?}");
    // Without the origin it has no source at all...
    let e = task_error(
        b1.fetch(DownloadRequest {
            url: url.clone(),
            disable_back_to_source: true,
            ..DownloadRequest::default()
        })
        .await,
    );
    assert!(matches!(e, TaskError::NoSource { .. }), "unexpected {e:?}");
    // ...and with it, it fetches the origin itself: nothing from cluster a.
    assert_all_ok(
        vec![b1.fetch_url(&url).await],
        &sha256_hex(&data),
        data.len(),
    );
    assert_eq!(origin.bytes_sent(), 2 * data.len() as u64);
    assert_eq!(b1.api.status().await?.bytes.from_peers, 0);
    // A name that cannot be part of a protocol name is refused at start.
    let bad = TestNode::start(Role::Node, Vec::new(), in_cluster("a/b")).await;
    assert!(
        bad.as_ref()
            .err()
            .is_some_and(|e| format!("{e:#}").contains("cluster")),
        "a bad cluster name was accepted"
    );
    for n in [b1, a1, seed] {
        n.stop().await;
    }
    Ok(())
}
