//! Sources that stop mid-piece or are slow, and the host-wide rate limits (`[limits]`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use anyhow::Result;
use df_node::limits::Rate;
use df_node::{DownloadRequest, Role};
use df_testnet::{TestNode, TestOrigin, content, init_test_logs, sha256_hex, url_task_key};
use futures::future::join_all;

const MIB: usize = 1 << 20;

/// Fetches `url` through `n`: the result and how long it took.
async fn timed(n: &TestNode, url: String) -> (Result<(u64, String)>, Duration) {
    let t = Instant::now();
    let r = n.fetch_url(&url).await;
    (r, t.elapsed())
}

/// A peer that sends the first 64 KiB of every piece and then nothing (holding the connection
/// open) is given up on after `download.read_timeout`, not after `piece_timeout`: the pieces come
/// from elsewhere and every output is right. Peers are asked before seeds, so the staller, the
/// only peer holding the file when the others start, is asked first by each of them.
/// (`df_piece_requests_stalled_total` tells a request given up on by the read timeout from one
/// overtaken by an endgame duplicate.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_that_stops_mid_piece_is_given_up_on_within_the_read_timeout() -> Result<()> {
    init_test_logs();
    let origin = TestOrigin::start().await?;
    let data = content(16 * MIB, 21);
    origin.put("/stall", data.clone());
    let url = origin.url("/stall");
    let piece_timeout = Duration::from_secs(120);
    let tweak = |c: &mut df_node::NodeConfig| {
        c.download.piece_timeout = piece_timeout;
        c.download.read_timeout = Duration::from_secs(1);
    };
    let seed = TestNode::start(Role::Seed, vec![], tweak).await?;
    let boot = vec![seed.bootstrap_addr()];
    let staller = TestNode::start(Role::Node, boot.clone(), |c| {
        tweak(c);
        c.faults.stall_uploads_after = Some(64 << 10);
    })
    .await?;
    assert!(
        staller
            .node
            .wait_for_peers(1, Duration::from_secs(10))
            .await
    );
    staller.fetch_url(&url).await?;
    // The downloads take a few seconds (4 MiB/s each), longer than the read timeout: otherwise
    // the endgame's duplicate requests would overtake the stalled ones first.
    let mut good = Vec::new();
    for _ in 0..3 {
        let n = TestNode::start(Role::Node, boot.clone(), |c| {
            tweak(c);
            c.limits.download_rate = Some(Rate(4 * MIB as u64));
        })
        .await?;
        assert!(n.node.wait_for_peers(1, Duration::from_secs(10)).await);
        good.push(n);
    }
    let started = Instant::now();
    let results = join_all(good.iter().map(|n| n.fetch_url(&url))).await;
    let took = started.elapsed();
    for (i, r) in results.into_iter().enumerate() {
        let (len, digest) = r.unwrap_or_else(|e| panic!("node {i} failed: {e:#}"));
        assert_eq!(len, data.len() as u64);
        assert_eq!(digest, sha256_hex(&data), "node {i} content");
    }
    // Waiting out the piece timeout on the staller's first requests would take 120 s.
    assert!(
        took < piece_timeout / 2,
        "the downloads took {took:?}: the stalled requests waited for the piece timeout"
    );
    // Given up on by the read timeout (not merely overtaken by an endgame duplicate).
    let stalled: u64 = good
        .iter()
        .map(|n| {
            let text = n.node.metrics_text(false);
            text.lines()
                .find_map(|l| l.strip_prefix("df_piece_requests_stalled_total "))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum();
    assert!(
        stalled >= 1,
        "no request to the staller hit the read timeout"
    );
    let staller_id = staller.node.peer_id().to_string();
    for n in &good {
        let info = n.api.task(&url_task_key(&url)?.to_string()).await?;
        assert!(
            info.received_from
                .iter()
                .all(|s| s.peer != staller_id || s.bytes == 0),
            "a piece was counted from the staller: {:?}",
            info.received_from
        );
    }
    for n in good {
        n.stop().await;
    }
    staller.stop().await;
    seed.stop().await;
    Ok(())
}

/// With a slow peer (its uplink capped at 1 MiB/s) beside a fast one holding the same file, a
/// new node gets nearly everything from the fast one: requests go to the source with the least
/// expected wait, and the slow one's last pieces are asked again of the fast one at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_peer_beside_a_fast_one_carries_little_of_the_load() -> Result<()> {
    init_test_logs();
    let origin = TestOrigin::start().await?;
    let data = content(32 * MIB, 22);
    origin.put("/slowfast", data.clone());
    let url = origin.url("/slowfast");
    let seed = TestNode::start(Role::Seed, vec![], |_| {}).await?;
    let boot = vec![seed.bootstrap_addr()];
    let slow = TestNode::start(Role::Node, boot.clone(), |c| {
        c.limits.upload_rate = Some(Rate(MIB as u64));
    })
    .await?;
    let fast = TestNode::start(Role::Node, boot.clone(), |_| {}).await?;
    for n in [&slow, &fast] {
        assert!(n.node.wait_for_peers(1, Duration::from_secs(10)).await);
        n.fetch_url(&url).await?;
    }
    let fresh = TestNode::start(Role::Node, boot.clone(), |_| {}).await?;
    assert!(fresh.node.wait_for_peers(2, Duration::from_secs(10)).await);
    let (len, digest) = fresh.fetch_url(&url).await?;
    assert_eq!(len, data.len() as u64);
    assert_eq!(digest, sha256_hex(&data));
    let info = fresh.api.task(&url_task_key(&url)?.to_string()).await?;
    let from = |n: &TestNode| {
        let id = n.node.peer_id().to_string();
        info.received_from
            .iter()
            .find(|s| s.peer == id)
            .map_or(0, |s| s.bytes)
    };
    let (from_slow, from_fast) = (from(&slow), from(&fast));
    assert!(
        from_fast >= 4 * from_slow.max(MIB as u64 / 4),
        "fast peer sent {from_fast} bytes, slow peer {from_slow}: {:?}",
        info.received_from
    );
    assert!(
        from_fast * 2 >= data.len() as u64,
        "the fast peer sent only {from_fast} of {} bytes: {:?}",
        data.len(),
        info.received_from
    );
    for n in [fresh, fast, slow, seed] {
        n.stop().await;
    }
    Ok(())
}

/// Each host-wide bucket holds: a node capped at R cannot move S bytes much faster than S / R.
/// (The floor is what a cap guarantees; how close to R a capped node gets is the testnet's to
/// measure.) Upload: a node serves a file at 4 MiB/s; download: a node receives at 4 MiB/s from an
/// uncapped one; origin: a node fetches the origin at 4 MiB/s.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upload_download_and_origin_rates_cap_what_a_node_moves() -> Result<()> {
    init_test_logs();
    let origin = TestOrigin::start().await?;
    let size = 8 * MIB;
    let rate = Rate(4 * MIB as u64);
    // Each bucket may start full (1/20 s of its rate): the floor allows for one bucket.
    let floor = Duration::from_secs_f64((size as f64 - rate.0 as f64 / 20.0) / rate.0 as f64);

    // Origin: a lone node, capped, fetches the origin itself.
    let data = content(size, 31);
    origin.put("/o", data.clone());
    let capped_origin =
        TestNode::start(Role::Node, vec![], |c| c.limits.origin_rate = Some(rate)).await?;
    let (r, took) = timed(&capped_origin, origin.url("/o")).await;
    assert_eq!(r?.1, sha256_hex(&data));
    assert!(
        took >= floor,
        "origin fetch of 8 MiB at 4 MiB/s took {took:?}"
    );

    // Upload: an uncapped node fetches a file only the upload-capped one holds.
    let data = content(size, 32);
    origin.put("/u", data.clone());
    let capped_up =
        TestNode::start(Role::Node, vec![], |c| c.limits.upload_rate = Some(rate)).await?;
    capped_up.fetch_url(&origin.url("/u")).await?;
    let boot = vec![capped_up.bootstrap_addr()];
    let receiver = TestNode::start(Role::Node, boot.clone(), |c| {
        c.download.back_to_source = false;
    })
    .await?;
    assert!(
        receiver
            .node
            .wait_for_peers(1, Duration::from_secs(10))
            .await
    );
    let (r, took) = timed(&receiver, origin.url("/u")).await;
    assert_eq!(r?.1, sha256_hex(&data));
    assert!(took >= floor, "8 MiB served at 4 MiB/s took {took:?}");

    // Download: a download-capped node fetches a file only an uncapped node holds.
    let data = content(size, 33);
    origin.put("/d", data.clone());
    let holder = TestNode::start(Role::Node, boot.clone(), |_| {}).await?;
    assert!(holder.node.wait_for_peers(1, Duration::from_secs(10)).await);
    holder.fetch_url(&origin.url("/d")).await?;
    let capped_down = TestNode::start(Role::Node, vec![holder.bootstrap_addr()], |c| {
        c.download.back_to_source = false;
        c.limits.download_rate = Some(rate);
    })
    .await?;
    assert!(
        capped_down
            .node
            .wait_for_peers(1, Duration::from_secs(10))
            .await
    );
    let (r, took) = timed(&capped_down, origin.url("/d")).await;
    assert_eq!(r?.1, sha256_hex(&data));
    assert!(took >= floor, "8 MiB received at 4 MiB/s took {took:?}");

    for n in [capped_origin, capped_up, receiver, holder, capped_down] {
        n.stop().await;
    }
    Ok(())
}

/// `limit_rate` (`df get --limit-rate`) holds one task to its rate while another task of the same
/// node downloads at full speed: the limit is the task's, not the node's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_rate_limit_slows_that_task_only() -> Result<()> {
    init_test_logs();
    let origin = TestOrigin::start().await?;
    let size = 8 * MIB;
    let rate = Rate(4 * MIB as u64);
    let floor = Duration::from_secs_f64((size as f64 - rate.0 as f64 / 20.0) / rate.0 as f64);
    let (slow_data, fast_data) = (content(size, 41), content(size, 42));
    origin.put("/limited", slow_data.clone());
    origin.put("/free", fast_data.clone());
    let holder = TestNode::start(Role::Node, vec![], |_| {}).await?;
    holder.fetch_url(&origin.url("/limited")).await?;
    holder.fetch_url(&origin.url("/free")).await?;
    let node = TestNode::start(Role::Node, vec![holder.bootstrap_addr()], |c| {
        c.download.back_to_source = false;
    })
    .await?;
    assert!(node.node.wait_for_peers(1, Duration::from_secs(10)).await);
    let limited = async {
        let t = Instant::now();
        let r = node
            .fetch(DownloadRequest {
                url: origin.url("/limited"),
                limit_rate: Some(rate),
                ..DownloadRequest::default()
            })
            .await;
        (r, t.elapsed())
    };
    let free = timed(&node, origin.url("/free"));
    let ((r_limited, took_limited), (r_free, took_free)) = tokio::join!(limited, free);
    assert_eq!(r_limited?.1, sha256_hex(&slow_data));
    assert_eq!(r_free?.1, sha256_hex(&fast_data));
    assert!(
        took_limited >= floor,
        "8 MiB limited to 4 MiB/s took {took_limited:?}"
    );
    assert!(
        took_free < took_limited,
        "the task without a limit ({took_free:?}) was held back like the limited one ({took_limited:?})"
    );
    node.stop().await;
    holder.stop().await;
    Ok(())
}

/// A source with one upload slot answers a requester's other pieces in flight "busy": the
/// requester counts each such answer (`df_piece_requests_busy_total`), asks again later and still
/// gets every byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn busy_answers_are_counted_and_the_download_still_completes() -> Result<()> {
    init_test_logs();
    let origin = TestOrigin::start().await?;
    let data = content(8 * MIB, 23);
    origin.put("/busy", data.clone());
    let url = origin.url("/busy");
    let seed = TestNode::start(Role::Seed, vec![], |c| {
        c.upload.max_concurrent = 1;
        c.limits.upload_rate = Some(Rate(4 * MIB as u64));
    })
    .await?;
    seed.fetch_url(&url).await?;
    let n = TestNode::start(Role::Node, vec![seed.bootstrap_addr()], |_| {}).await?;
    assert!(n.node.wait_for_peers(1, Duration::from_secs(10)).await);
    let (len, digest) = n.fetch_url(&url).await?;
    assert_eq!(len, data.len() as u64);
    assert_eq!(digest, sha256_hex(&data));
    let text = n.node.metrics_text(false);
    let busy = text
        .lines()
        .find_map(|l| l.strip_prefix("df_piece_requests_busy_total "))
        .and_then(|v| v.trim().parse::<u64>().ok());
    // Up to `download.max_inflight_per_source` (4) requests go to the only source at once.
    assert!(
        busy.is_some_and(|b| b >= 1),
        "busy answers counted: {busy:?}"
    );
    n.stop().await;
    seed.stop().await;
    Ok(())
}
