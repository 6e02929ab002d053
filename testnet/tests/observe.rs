//! What infra teams see: `/metrics` as a real `promtool` reads it, the scrape listener's limits,
//! and the readiness probe.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use df_node::Role;
use df_testnet::{Swarm, TestNode, TestOrigin, content, init_test_logs, url_task_key};

const MIB: usize = 1 << 20;

fn scrape_listener(c: &mut df_node::NodeConfig) {
    c.metrics_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
}

async fn get(url: &str) -> Result<(u16, String, String)> {
    let r = reqwest::get(url).await?;
    let status = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    Ok((status, ct, r.text().await?))
}

/// Runs `promtool check metrics` on `text`; returns its verdict.
fn promtool_check(text: &str) -> Result<()> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running promtool (Debian's `prometheus` package; .ci/run installs it)")?;
    child
        .stdin
        .take()
        .context("promtool stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "promtool check metrics failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The value of the sample `name{labels}` (labels exactly as written), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_after_a_download_pass_promtool_and_carry_no_ids() -> Result<()> {
    init_test_logs();
    let origin = TestOrigin::start().await?;
    let data = content(6 * MIB, 7);
    origin.put("/xfile-7q", data.clone());
    let swarm = Swarm::start(1, 2, scrape_listener).await?;
    let url = origin.url("/xfile-7q?token=SECRET");
    let id = url_task_key(&url)?.to_string();
    for n in &swarm.nodes {
        n.fetch_url(&url).await?;
        // The stream ends with the last piece; the task is counted once the runner marks it
        // complete, a moment later.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while n.api.task(&id).await?.state != "complete" {
            assert!(tokio::time::Instant::now() < deadline, "task not complete");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let node = &swarm.nodes[1];
    let addr = node.node.metrics_addr().context("no metrics listener")?;
    let (status, ct, text) = get(&format!("http://{addr}/metrics")).await?;
    assert_eq!(status, 200);
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    promtool_check(&text)?;

    // The second node got the file from the seed and the first node, none from the origin.
    let from = |s: &str| sample(&text, &format!("df_received_bytes_total{{source=\"{s}\"}}"));
    let (seed, peer, orig) = (from("seed"), from("peer"), from("origin"));
    assert_eq!(orig, Some(0.0), "{text}");
    assert_eq!(
        seed.unwrap_or(0.0) + peer.unwrap_or(0.0),
        data.len() as f64,
        "{text}"
    );
    assert_eq!(
        sample(&text, "df_tasks_total{kind=\"file\",result=\"completed\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "df_task_duration_seconds_count{kind=\"file\"}"),
        Some(1.0)
    );
    assert!(
        sample(&text, "df_piece_transfer_seconds_count{source=\"seed\"}").unwrap_or(0.0)
            + sample(&text, "df_piece_transfer_seconds_count{source=\"peer\"}").unwrap_or(0.0)
            >= 6.0,
        "{text}"
    );
    assert!(sample(&text, "df_connected_peers").unwrap_or(0.0) >= 1.0);
    assert_eq!(sample(&text, "df_piece_requests_in_flight"), Some(0.0));
    // libp2p's own metrics are there.
    assert!(text.contains("libp2p_identify_"), "no identify metrics");
    assert!(text.contains("libp2p_kad_"), "no Kademlia metrics");
    assert!(text.contains("libp2p_swarm_"), "no swarm metrics");

    // No label or value names the URL, the task or a peer.
    let task = id.clone();
    for m in swarm.all() {
        let (_, _, t) = get(&format!(
            "http://{}/metrics",
            m.node.metrics_addr().context("metrics listener")?
        ))
        .await?;
        for secret in [
            "SECRET",
            "xfile-7q",
            task.as_str(),
            &m.node.peer_id().to_string(),
        ] {
            assert!(
                !t.contains(secret),
                "the metrics show {secret}: {:?}",
                t.lines().filter(|l| l.contains(secret)).collect::<Vec<_>>()
            );
        }
        for other in swarm.all() {
            assert!(!t.contains(&other.node.peer_id().to_string()));
        }
    }

    // The seed fetched the origin and served the pieces.
    let seed_addr = swarm.seeds[0]
        .node
        .metrics_addr()
        .context("seed listener")?;
    let (_, _, st) = get(&format!("http://{seed_addr}/metrics")).await?;
    promtool_check(&st)?;
    assert_eq!(
        sample(&st, "df_received_bytes_total{source=\"origin\"}"),
        Some(data.len() as f64)
    );
    assert!(sample(&st, "df_uploaded_bytes_total").unwrap_or(0.0) >= data.len() as f64);

    // Every series the shipped dashboard and alert rules query exists.
    assert_deploy_queries_exist(&text);

    // OpenMetrics for scrapers that ask for it.
    let r = reqwest::Client::new()
        .get(format!("http://{addr}/metrics"))
        .header("accept", "application/openmetrics-text; version=1.0.0")
        .send()
        .await?;
    assert!(
        r.headers()["content-type"]
            .to_str()?
            .starts_with("application/openmetrics-text")
    );
    assert!(r.text().await?.ends_with("# EOF\n"));
    swarm.stop().await;
    Ok(())
}

/// The metric names in deploy/grafana/df-dashboard.json and deploy/prometheus/alerts.yml are all
/// families of `scrape` (a renamed metric must not leave a dead panel or an alert that never fires).
fn assert_deploy_queries_exist(scrape: &str) {
    let declared: std::collections::HashSet<&str> = scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for file in [
        "deploy/grafana/df-dashboard.json",
        "deploy/prometheus/alerts.yml",
    ] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let mut names = Vec::new();
        for prefix in ["df_", "libp2p_"] {
            let mut rest = text.as_str();
            while let Some(i) = rest.find(prefix) {
                let before = rest[..i].chars().last();
                let tail = &rest[i..];
                let end = tail
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(tail.len());
                if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                    names.push(&tail[..end]);
                }
                rest = &tail[end..];
            }
        }
        assert!(names.len() >= 5, "{file}: found only {names:?}");
        for n in names {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| n.strip_suffix(s).filter(|f| declared.contains(f)))
                .unwrap_or(n);
            assert!(
                declared.contains(family),
                "{file} queries {n}, which no node exports"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scrape_listener_serves_nothing_else() -> Result<()> {
    init_test_logs();
    let n = TestNode::start(Role::Node, Vec::new(), scrape_listener).await?;
    let addr = n.node.metrics_addr().context("no metrics listener")?;
    let c = reqwest::Client::new();
    // The API's routes are not there: no status, no tasks, no way to start a download.
    for path in ["/v1/status", "/v1/tasks", "/"] {
        let r = c.get(format!("http://{addr}{path}")).send().await?;
        assert_eq!(r.status().as_u16(), 404, "{path}");
    }
    let r = c
        .post(format!("http://{addr}/v1/tasks"))
        .header("content-type", "application/json")
        .body(r#"{"url": "http://127.0.0.1:1/x"}"#)
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 405);
    assert!(n.node.tasks().is_empty(), "a task started");
    let r = c.delete(format!("http://{addr}/metrics")).send().await?;
    assert_eq!(r.status().as_u16(), 405);
    // A client that never sends its headers is cut off (the API's header timeout applies).
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    tokio::io::AsyncWriteExt::write_all(&mut s, b"GET /metrics HTTP/1.1\r\n").await?;
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::io::AsyncReadExt::read(&mut s, &mut buf),
    )
    .await;
    assert!(
        matches!(closed, Ok(Ok(_)) | Ok(Err(_))),
        "a stalled request was kept open"
    );
    n.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_waits_for_a_peer_when_bootstraps_are_configured() -> Result<()> {
    init_test_logs();
    // A bootstrap address nobody listens on: alive, but not ready.
    let nowhere: df_node::Multiaddr = "/ip4/127.0.0.1/tcp/9".parse()?;
    let lonely = TestNode::start(Role::Node, vec![nowhere], scrape_listener).await?;
    let addr = lonely.node.metrics_addr().context("no metrics listener")?;
    let (s, _, body) = get(&format!("http://{addr}/healthz")).await?;
    assert_eq!((s, body.as_str()), (200, "ok\n"));
    let (s, _, body) = get(&format!("http://{addr}/readyz")).await?;
    assert_eq!(s, 503, "{body}");
    assert!(body.contains("joined no peer"), "{body}");
    lonely.stop().await;

    // A member that joined its swarm is ready.
    let swarm = Swarm::start(1, 1, scrape_listener).await?;
    for m in swarm.all() {
        let addr = m.node.metrics_addr().context("no metrics listener")?;
        let (s, _, body) = get(&format!("http://{addr}/readyz")).await?;
        assert_eq!((s, body.as_str()), (200, "ready\n"));
    }
    // A node without bootstraps (the first of a swarm) is ready on its own.
    let first = TestNode::start(Role::Seed, Vec::new(), scrape_listener).await?;
    let addr = first.node.metrics_addr().context("no metrics listener")?;
    assert_eq!(get(&format!("http://{addr}/readyz")).await?.0, 200);
    first.stop().await;
    swarm.stop().await;
    Ok(())
}
