//! A seed cluster: task owners in XOR order, replicas fetched from the first owner and the swarm,
//! failover to the next owner, seeds joining without moving old tasks.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::{Context, Result, bail};
use df_node::task::owners::owners;
use df_node::{Node, PeerId, Phase, Progress, Role};
use df_protocols::task::TaskKey;
use df_testnet::{Swarm, TestNode, TestOrigin, content, init_test_logs, sha256_hex, url_task_key};
use futures::future::join_all;

const MIB: usize = 1 << 20;

/// Waits until every seed of `swarm` is connected to every other seed and knows it as a seed.
async fn seeds_meshed(swarm: &Swarm) -> Result<()> {
    let ids: Vec<PeerId> = swarm.seeds.iter().map(|s| s.node.peer_id()).collect();
    for s in &swarm.seeds {
        let others = ids.iter().filter(|p| **p != s.node.peer_id()).count();
        if !s.node.wait_for_seeds(others, Duration::from_secs(40)).await {
            bail!(
                "seed {} is connected to {} of {others} other seeds",
                s.node.peer_id(),
                s.node.status().known_seeds
            );
        }
    }
    Ok(())
}

/// The progress of `key` on `node`, once the node knows the task.
async fn progress_of(node: &Node, key: &TaskKey) -> tokio::sync::watch::Receiver<Progress> {
    loop {
        if let Some(p) = node.progress(key).await {
            return p;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn complete(node: &Node, key: &TaskKey, within: Duration) -> Result<Progress> {
    let mut p = tokio::time::timeout(within, progress_of(node, key))
        .await
        .context("the task never appeared")?;
    let done = tokio::time::timeout(within, p.wait_for(|p| p.phase == Phase::Complete))
        .await
        .with_context(|| format!("not complete within {within:?}"))??
        .clone();
    Ok(done)
}

fn seed_by_id(swarm: &Swarm, id: PeerId) -> &TestNode {
    swarm
        .seeds
        .iter()
        .find(|s| s.node.peer_id() == id)
        .expect("a seed of the swarm")
}

/// Three seeds, two owners per task: the first owner fetches the origin once, the second holds a
/// whole copy that came from the first owner and the swarm, the third holds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_second_owner_holds_a_replica_without_fetching_the_origin() -> Result<()> {
    init_test_logs();
    let origin = TestOrigin::start().await?;
    let data = content(24 * MIB, 51);
    origin.put("/replicated", data.clone());
    let url = origin.url("/replicated");
    let key = url_task_key(&url)?;
    let swarm = Swarm::start(3, 2, |_| {}).await?;
    seeds_meshed(&swarm).await?;
    let ids: Vec<PeerId> = swarm.seeds.iter().map(|s| s.node.peer_id()).collect();
    let order = owners(&key, &ids, 3);

    let results = join_all(swarm.nodes.iter().map(|n| n.fetch_url(&url))).await;
    for r in results {
        assert_eq!(r?.1, sha256_hex(&data));
    }
    let first = complete(
        &seed_by_id(&swarm, order[0]).node,
        &key,
        Duration::from_secs(30),
    )
    .await?;
    let second = complete(
        &seed_by_id(&swarm, order[1]).node,
        &key,
        Duration::from_secs(30),
    )
    .await?;
    assert_eq!(
        first.from_origin,
        data.len() as u64,
        "the first owner fetched the origin"
    );
    assert_eq!(second.from_origin, 0, "the replica fetched the origin");
    assert_eq!(second.from_peers, data.len() as u64);
    assert!(
        seed_by_id(&swarm, order[2])
            .node
            .progress(&key)
            .await
            .is_none(),
        "the third seed, no owner, holds the task"
    );
    assert_eq!(origin.bytes_sent(), data.len() as u64, "origin egress");
    swarm.stop().await;
    Ok(())
}

/// 3 seeds + 6 nodes, 96 MiB: the first owner is killed when it holds 40 %. Every node finishes
/// with the right bytes, the second owner takes over the origin fetch for what nobody holds and
/// ends with the whole task, and the origin sends at most 1.1 x the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_first_owner_killed_at_40_percent_the_next_owner_finishes_the_task() -> Result<()> {
    init_test_logs();
    let origin = TestOrigin::start().await?;
    let data = content(96 * MIB, 52);
    origin.put("/failover", data.clone());
    // About 16 MiB/s in all (4 ranges): the first owner needs ~6 s for the file.
    origin.set_rate(4 * MIB as u64);
    let url = origin.url("/failover");
    let key = url_task_key(&url)?;
    let swarm = Swarm::start(3, 6, |_| {}).await?;
    seeds_meshed(&swarm).await?;
    let ids: Vec<PeerId> = swarm.seeds.iter().map(|s| s.node.peer_id()).collect();
    let order = owners(&key, &ids, 3);
    let Swarm { mut seeds, nodes } = swarm;
    let first_at = seeds
        .iter()
        .position(|s| s.node.peer_id() == order[0])
        .unwrap();
    let first = seeds.remove(first_at);

    let downloads = tokio::spawn({
        let reqs: Vec<_> = nodes
            .iter()
            .map(|n| {
                let api = n.api.clone();
                let url = url.clone();
                async move {
                    let info = api
                        .create_task(&df_node::DownloadRequest {
                            url,
                            ..Default::default()
                        })
                        .await?;
                    let (len, mut stream) = api.content(&info.id, None).await?;
                    let mut h = <sha2::Sha256 as sha2::Digest>::new();
                    let mut n = 0u64;
                    use futures::StreamExt;
                    while let Some(c) = stream.next().await {
                        let c = c?;
                        n += c.len() as u64;
                        sha2::Digest::update(&mut h, &c);
                    }
                    anyhow::ensure!(n == len, "streamed {n} of {len}");
                    anyhow::Ok((n, hex::encode(sha2::Digest::finalize(h))))
                }
            })
            .collect();
        join_all(reqs)
    });
    let mut p = progress_of(&first.node, &key).await;
    p.wait_for(|p| p.bytes_done() * 10 >= data.len() as u64 * 4)
        .await?;
    let at_kill = origin.bytes_sent();
    first.stop().await;
    tracing::info!(at_kill, "first owner stopped");

    let results = tokio::time::timeout(Duration::from_secs(240), downloads).await??;
    for (i, r) in results.into_iter().enumerate() {
        let (n, digest) = r.with_context(|| format!("node {i}"))?;
        assert_eq!(n, data.len() as u64, "node {i}");
        assert_eq!(digest, sha256_hex(&data), "node {i}");
    }
    let second = seeds.iter().find(|s| s.node.peer_id() == order[1]).unwrap();
    let done = complete(&second.node, &key, Duration::from_secs(60)).await?;
    assert_eq!(
        done.have.count(),
        done.have.len(),
        "the second owner is missing pieces"
    );
    let sent = origin.bytes_sent();
    println!(
        "failover: origin egress {:.3} x S ({:.3} x S before the kill)",
        sent as f64 / data.len() as f64,
        at_kill as f64 / data.len() as f64
    );
    assert!(
        sent * 10 <= data.len() as u64 * 11,
        "origin sent {sent} bytes for a {} byte file ({at_kill} before the kill)",
        data.len()
    );
    for n in seeds.into_iter().chain(nodes) {
        n.stop().await;
    }
    Ok(())
}

/// A seed that joins later owns the new tasks it ranks first for; an old task keeps its owners and
/// is served from the swarm without another origin fetch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_seed_added_later_takes_new_tasks_without_moving_old_ones() -> Result<()> {
    init_test_logs();
    let origin = TestOrigin::start().await?;
    let old = content(3 * MIB, 53);
    origin.put("/old", old.clone());
    let old_url = origin.url("/old");
    let old_key = url_task_key(&old_url)?;
    let mut swarm = Swarm::start(2, 1, |_| {}).await?;
    seeds_meshed(&swarm).await?;
    assert_eq!(
        swarm.nodes[0].fetch_url(&old_url).await?.1,
        sha256_hex(&old)
    );
    for s in &swarm.seeds {
        complete(&s.node, &old_key, Duration::from_secs(30)).await?;
    }

    let boot = vec![swarm.seeds[0].bootstrap_addr()];
    let newcomer = TestNode::start(Role::Seed, boot.clone(), |_| {}).await?;
    let new_id = newcomer.node.peer_id();
    swarm.seeds.push(newcomer);
    seeds_meshed(&swarm).await?;
    assert!(
        swarm.nodes[0]
            .node
            .wait_for_seeds(3, Duration::from_secs(40))
            .await,
        "the node did not connect to the new seed"
    );
    let ids: Vec<PeerId> = swarm.seeds.iter().map(|s| s.node.peer_id()).collect();
    // A new file the newcomer ranks first for.
    let (new_url, new_key, fresh) = (0..)
        .find_map(|i| {
            let path = format!("/new-{i}");
            let url = origin.url(&path);
            let key = url_task_key(&url).ok()?;
            (owners(&key, &ids, 1) == [new_id]).then(|| {
                let d = content(2 * MIB, 54 + i);
                origin.put(&path, d.clone());
                (url, key, d)
            })
        })
        .unwrap();
    let before = origin.bytes_sent();
    assert_eq!(
        swarm.nodes[0].fetch_url(&new_url).await?.1,
        sha256_hex(&fresh)
    );
    let on_new = complete(&swarm.seeds[2].node, &new_key, Duration::from_secs(30)).await?;
    assert_eq!(
        on_new.from_origin,
        fresh.len() as u64,
        "the newcomer fetched the new task"
    );
    assert_eq!(
        on_new.header.as_ref().map(|h| h.header.producer),
        Some(new_id)
    );
    assert_eq!(origin.bytes_sent() - before, fresh.len() as u64);

    // The old task did not move: a new node gets it from its owners, not the origin, and the
    // newcomer holds nothing of it.
    let late = TestNode::start(Role::Node, boot, |_| {}).await?;
    assert!(late.node.wait_for_peers(1, Duration::from_secs(10)).await);
    let before = origin.bytes_sent();
    assert_eq!(late.fetch_url(&old_url).await?.1, sha256_hex(&old));
    assert_eq!(
        origin.bytes_sent(),
        before,
        "the old task went to the origin again"
    );
    assert!(
        swarm.seeds[2].node.progress(&old_key).await.is_none(),
        "the newcomer took over an old task"
    );
    late.stop().await;
    swarm.stop().await;
    Ok(())
}

/// A seed that does not trust the first owner refuses its replica request (and keeps nothing);
/// the task is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_request_from_an_untrusted_producer_is_refused() -> Result<()> {
    init_test_logs();
    let origin = TestOrigin::start().await?;
    let data = content(2 * MIB, 55);
    origin.put("/guarded", data.clone());
    let url = origin.url("/guarded");
    let key = url_task_key(&url)?;
    let producer = TestNode::start(Role::Seed, Vec::new(), |_| {}).await?;
    let boot = vec![producer.bootstrap_addr()];
    // The wary seed trusts only a peer that does not exist.
    let stranger = PeerId::random();
    let wary = TestNode::start(Role::Seed, boot.clone(), move |c| {
        c.trust.producers = vec![stranger]
    })
    .await?;
    assert!(wary.node.wait_for_seeds(1, Duration::from_secs(20)).await);
    assert!(
        producer
            .node
            .wait_for_seeds(1, Duration::from_secs(20))
            .await
    );
    // The producer downloads the task itself: it is its first owner (the only one it trusts).
    let (_, got) = producer.fetch_url(&url).await?;
    assert_eq!(got, sha256_hex(&data));
    assert_eq!(
        producer.node.metrics().replica_requests("refused"),
        0,
        "nothing refused yet on the producer"
    );
    // The refusal is counted on the wary seed once the request arrived.
    let refused = async {
        while wary.node.metrics().replica_requests("refused") == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), refused)
        .await
        .context("the wary seed never saw the replica request")?;
    assert!(
        wary.node.progress(&key).await.is_none(),
        "the wary seed holds a task an untrusted producer asked it to replicate"
    );
    wary.stop().await;
    producer.stop().await;
    Ok(())
}

/// Polls a preheat job on `api` until it ends.
async fn finished_job(
    api: &df_node::api::client::ApiClient,
    id: &str,
) -> Result<df_node::preheat::PreheatJob> {
    df_testnet::finished_preheat(api, id, Duration::from_secs(90)).await
}

fn file_preheat(
    url: &str,
    scope: df_node::preheat::PreheatScope,
) -> df_node::preheat::PreheatRequest {
    df_node::preheat::PreheatRequest {
        target: df_node::preheat::PreheatTarget::File {
            url: url.to_owned(),
            headers: Vec::new(),
            tag: String::new(),
            filtered_query_params: Vec::new(),
            digest: None,
        },
        scope,
        timeout_secs: None,
    }
}

/// A file preheated through a node's API is held by its two owners; with the origin down, a node
/// gets it with --disable-back-to-source and the origin sees no request. Failures are in words.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_preheated_file_is_served_with_the_origin_down() -> Result<()> {
    use df_node::preheat::{JobState, PreheatScope};
    init_test_logs();
    let origin = TestOrigin::start().await?;
    let data = content(8 * MIB, 56);
    origin.put("/preheated", data.clone());
    let url = origin.url("/preheated");
    let key = url_task_key(&url)?;
    let swarm = Swarm::start(3, 2, |_| {}).await?;
    seeds_meshed(&swarm).await?;
    assert!(
        swarm.nodes[0]
            .node
            .wait_for_seeds(3, Duration::from_secs(40))
            .await
    );
    let ids: Vec<PeerId> = swarm.seeds.iter().map(|s| s.node.peer_id()).collect();
    let order = owners(&key, &ids, 3);

    let api = &swarm.nodes[0].api;
    let started = api.preheat(&file_preheat(&url, PreheatScope::Seed)).await?;
    let job = finished_job(api, &started.id).await?;
    assert_eq!(job.state, JobState::Succeeded, "{job:#?}");
    let task = &job.tasks[0];
    assert_eq!(task.id, key.to_string());
    assert_eq!(task.owner.as_deref(), Some(order[0].to_string().as_str()));
    let held: Vec<&str> = task.hosts.iter().map(|h| h.peer.as_str()).collect();
    assert_eq!(
        held,
        vec![order[0].to_string(), order[1].to_string()],
        "the owners hold it"
    );
    assert!(
        task.hosts
            .iter()
            .all(|h| h.state == JobState::Succeeded && h.pieces_done == h.pieces_total)
    );
    assert_eq!(origin.bytes_sent(), data.len() as u64);
    assert!(
        swarm.nodes[0].node.progress(&key).await.is_none(),
        "scope seed left a copy on the asking node"
    );

    // The origin goes down: the file still arrives, from the seeds.
    origin.fail("/preheated", 503);
    let requests = origin.requests();
    let (n, digest) = swarm.nodes[1]
        .fetch(df_node::DownloadRequest {
            url: url.clone(),
            disable_back_to_source: true,
            ..Default::default()
        })
        .await?;
    assert_eq!((n, digest), (data.len() as u64, sha256_hex(&data)));
    assert_eq!(origin.requests(), requests, "the origin was asked");

    // A 404 fails the job with the origin's answer; so does a node with no live seed.
    origin.fail("/missing", 404);
    let job = finished_job(
        api,
        &api.preheat(&file_preheat(&origin.url("/missing"), PreheatScope::Seed))
            .await?
            .id,
    )
    .await?;
    assert_eq!(job.state, JobState::Failed);
    let e = job.error.unwrap_or_default();
    assert!(e.contains("404"), "{e}");
    let alone = TestNode::start(Role::Node, Vec::new(), |_| {}).await?;
    let job = finished_job(
        &alone.api,
        &alone
            .api
            .preheat(&file_preheat(&url, PreheatScope::Seed))
            .await?
            .id,
    )
    .await?;
    let e = job.error.unwrap_or_default();
    assert!(e.contains("no live seed"), "{e}");
    alone.stop().await;
    swarm.stop().await;
    Ok(())
}

/// Scope all_peers: every member fetches the file from the swarm (the origin sends it once); a
/// member that does not trust the asker refuses, and the job says so; a member the asker sends
/// no direct request (as one it has no connection to in a large cluster) hears of the job on the
/// cluster topic, and the job finds it as a provider and reports its progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn preheat_to_all_peers_reaches_every_member_that_trusts_the_asker() -> Result<()> {
    use df_node::preheat::{JobState, PreheatScope};
    init_test_logs();
    let origin = TestOrigin::start().await?;
    let data = content(6 * MIB, 57);
    origin.put("/everywhere", data.clone());
    let url = origin.url("/everywhere");
    let key = url_task_key(&url)?;
    let swarm = Swarm::start(2, 1, |_| {}).await?;
    seeds_meshed(&swarm).await?;
    let boot = vec![swarm.seeds[0].bootstrap_addr()];
    let stranger = PeerId::random();
    let wary = TestNode::start(Role::Node, boot.clone(), move |c| {
        c.trust.producers = vec![stranger]
    })
    .await?;
    assert!(wary.node.wait_for_seeds(2, Duration::from_secs(40)).await);
    let distant = TestNode::start(Role::Node, boot.clone(), |_| {}).await?;
    let distant_id = distant.node.peer_id();
    let asker = TestNode::start(Role::Node, boot, move |c| {
        c.faults.unconnected_for_preheat = vec![distant_id]
    })
    .await?;
    assert!(asker.node.wait_for_peers(5, Duration::from_secs(40)).await);

    let started = asker
        .api
        .preheat(&file_preheat(&url, PreheatScope::AllPeers))
        .await?;
    let job = finished_job(&asker.api, &started.id).await?;
    assert_eq!(job.state, JobState::Failed, "the wary node cannot succeed");
    let hosts = &job.tasks[0].hosts;
    // Two seeds, the swarm's node, the wary node, the asker, and the distant node found later.
    assert_eq!(hosts.len(), 6, "{hosts:#?}");
    assert!(
        hosts.iter().any(|h| h.peer == distant_id.to_string()),
        "{hosts:#?}"
    );
    for h in hosts {
        if h.peer == wary.node.peer_id().to_string() {
            assert_eq!(h.state, JobState::Failed);
            assert!(
                h.error.as_deref().unwrap_or("").contains("refused"),
                "{h:?}"
            );
        } else {
            assert_eq!(h.state, JobState::Succeeded, "{h:?}");
        }
    }
    for m in swarm.all().chain([&asker, &distant]) {
        let p = complete(&m.node, &key, Duration::from_secs(10)).await?;
        assert_eq!(p.have.count(), p.have.len());
    }
    assert!(wary.node.progress(&key).await.is_none());
    assert_eq!(origin.bytes_sent(), data.len() as u64);
    for n in [wary, distant, asker] {
        n.stop().await;
    }
    swarm.stop().await;
    Ok(())
}
