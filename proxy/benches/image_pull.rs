//! Image-pull benchmark: N hosts pull one image at the same moment, (a) straight from the registry
//! and (b) each through its own df node's mirror (1 seed + N nodes), in one run. Prints, for each,
//! the time until every pull finished, the median pull, and the registry's served blob bytes
//! divided by the image's blob bytes.
//!
//! Run: `cargo bench -p df-proxy --bench image_pull` (needs `docker-registry`, `skopeo`, `umoci`).
//! `DF_BENCH_PEERS` (default 4), `DF_BENCH_LAYERS_MIB` (comma-separated layer sizes, default
//! `64,32,16,4`), `DF_BENCH_TIMELINE=1` (also print, every 100 ms of the df pulls, what the nodes
//! had received and finished and what their mirrors had sent).
//!
//! The clients are `skopeo copy docker://… dir:…` processes (they verify every blob's digest). On
//! loopback nothing is shaped, so the time comparison shows the mirror's overhead; the registry
//! bytes show what the swarm saves.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use df_proxy::{Mirror, MirrorConfig};
use df_testnet::Swarm;
use df_testnet::registry::{self, Registry};

async fn skopeo_pull(reference: &str, dest: &Path, conf: Option<&Path>) -> Result<Duration> {
    let t = Instant::now();
    let mut cmd = tokio::process::Command::new("skopeo");
    if let Some(c) = conf {
        cmd.arg("--registries-conf").arg(c);
    }
    registry::run(
        cmd.args(["copy", "--src-tls-verify=false"])
            .arg(format!("docker://{reference}"))
            .arg(format!("dir:{}", dest.display())),
    )
    .await?;
    Ok(t.elapsed())
}

fn summary(times: &mut [Duration]) -> (f64, f64) {
    times.sort();
    let max = times.last().map(|d| d.as_secs_f64()).unwrap_or(0.0);
    let p50 = times[times.len() / 2].as_secs_f64();
    (max, p50)
}

/// One sample of the df pulls: seconds since they began, bytes the nodes had received (from any
/// source), blob tasks they had finished, bytes their mirrors had sent to the clients.
type Sample = (f64, f64, f64, f64);

/// The value of a Prometheus sample line after its metric name and `{`.
fn metric_value(rest: &str) -> f64 {
    rest.rsplit_once(' ')
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0.0)
}

/// Blob bytes the mirrors have sent to their clients.
fn mirrors_sent(mirrors: &[Mirror]) -> u64 {
    mirrors
        .iter()
        .map(|m| {
            m.stats()
                .blob_bytes_sent
                .load(std::sync::atomic::Ordering::Relaxed)
        })
        .sum()
}

/// Samples the df pulls every 100 ms until `done`.
async fn sample(
    swarm: &Swarm,
    mirrors: &[Mirror],
    done: &std::sync::atomic::AtomicBool,
) -> Vec<Sample> {
    let t0 = Instant::now();
    let mut rows = Vec::new();
    while !done.load(std::sync::atomic::Ordering::Relaxed) {
        let (mut received, mut finished) = (0.0, 0.0);
        for n in &swarm.nodes {
            for l in n.node.metrics_text(false).lines() {
                if let Some(v) = l.strip_prefix("df_received_bytes_total{") {
                    received += metric_value(v);
                } else if let Some(v) = l.strip_prefix("df_task_duration_seconds_count{") {
                    finished += metric_value(v);
                }
            }
        }
        let sent = mirrors_sent(mirrors);
        rows.push((t0.elapsed().as_secs_f64(), received, finished, sent as f64));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    rows
}

fn registry_blob_bytes(reg: &Registry) -> u64 {
    reg.blob_gets().unwrap().values().map(|(_, b)| b).sum()
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let peers: usize = std::env::var("DF_BENCH_PEERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let layers: Vec<usize> = std::env::var("DF_BENCH_LAYERS_MIB")
        .unwrap_or_else(|_| "64,32,16,4".into())
        .split(',')
        .filter_map(|s| s.trim().parse::<usize>().ok())
        .map(|m| m << 20)
        .collect();
    let work = tempfile::tempdir()?;
    let reg = Registry::start(None).await?;
    let image =
        registry::build_and_push(work.path(), &reg, "bench/app", "v1", &layers, 7, None).await?;
    let size = image.total_blob_bytes;
    println!(
        "image: {} layers, {:.1} MiB of blobs; {peers} hosts pull it at once",
        image.layers.len(),
        size as f64 / 1048576.0
    );

    // (a) Direct.
    let before = registry_blob_bytes(&reg);
    let mut jobs = Vec::new();
    for i in 0..peers {
        let dest = work.path().join(format!("direct-{i}"));
        let r = image.reference.clone();
        jobs.push(tokio::spawn(
            async move { skopeo_pull(&r, &dest, None).await },
        ));
    }
    let mut direct = Vec::new();
    for j in jobs {
        direct.push(j.await??);
    }
    let direct_bytes = registry_blob_bytes(&reg) - before;

    // (b) Through df: one seed and one node (with its mirror) per host.
    let swarm = Swarm::start(1, peers, |_| {}).await?;
    let mut mirrors = Vec::new();
    for n in &swarm.nodes {
        let cfg = MirrorConfig {
            listen: Some("127.0.0.1:0".parse()?),
            upstream: Some(reg.url.parse()?),
            ..MirrorConfig::default()
        };
        mirrors.push(Mirror::start(cfg, Arc::new(n.node.clone())).await?);
    }
    let before = registry_blob_bytes(&reg);
    let mut jobs = Vec::new();
    for (i, m) in mirrors.iter().enumerate() {
        let conf = work.path().join(format!("registries-{i}.conf"));
        std::fs::write(
            &conf,
            format!(
                "[[registry]]\nlocation = \"{}\"\ninsecure = true\n[[registry.mirror]]\nlocation = \"{}\"\ninsecure = true\n",
                reg.host,
                m.local_addr()
            ),
        )?;
        let dest = work.path().join(format!("df-{i}"));
        let r = image.reference.clone();
        jobs.push(tokio::spawn(async move {
            skopeo_pull(&r, &dest, Some(&conf)).await
        }));
    }
    let pulls_done = std::sync::atomic::AtomicBool::new(false);
    let wait = async {
        let mut times = Vec::new();
        for j in jobs {
            times.push(j.await??);
        }
        pulls_done.store(true, std::sync::atomic::Ordering::Relaxed);
        anyhow::Ok(times)
    };
    let timeline = std::env::var("DF_BENCH_TIMELINE").is_ok_and(|v| v == "1");
    let (via_df, rows) = if timeline {
        tokio::join!(wait, sample(&swarm, &mirrors, &pulls_done))
    } else {
        (wait.await, Vec::new())
    };
    let mut via_df = via_df?;
    let df_bytes = registry_blob_bytes(&reg) - before;
    let served_by_mirrors = mirrors_sent(&mirrors);

    let (dmax, dp50) = summary(&mut direct);
    let (fmax, fp50) = summary(&mut via_df);
    println!();
    println!("| method | all done (s) | p50 (s) | registry blob bytes / image |");
    println!("|---|---|---|---|");
    println!(
        "| direct from registry | {dmax:.2} | {dp50:.2} | {:.2} |",
        direct_bytes as f64 / size as f64
    );
    println!(
        "| through df mirrors | {fmax:.2} | {fp50:.2} | {:.2} |",
        df_bytes as f64 / size as f64
    );
    println!();
    println!(
        "df / direct time: {:.2} (all done), {:.2} (p50); registry egress saved: {:.1} %; mirrors sent {:.1} MiB of blobs to clients",
        fmax / dmax,
        fp50 / dp50,
        100.0 * (1.0 - df_bytes as f64 / direct_bytes.max(1) as f64),
        served_by_mirrors as f64 / 1048576.0
    );
    // Where the df pulls' time went, from the nodes' own metrics: mean time from a blob task's
    // start to its first verified piece and to its end, and mean piece transfer time by source.
    let mut sums: std::collections::BTreeMap<String, (f64, f64)> = Default::default();
    for n in &swarm.nodes {
        let text = n.node.metrics_text(false);
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, v)) = l.rsplit_once(' ') else {
                continue;
            };
            let v: f64 = v.parse().unwrap_or(0.0);
            for (family, what) in [
                (
                    "df_task_first_byte_seconds",
                    "blob task: start to first piece",
                ),
                ("df_task_duration_seconds", "blob task: start to end"),
                ("df_piece_transfer_seconds", "piece transfer"),
            ] {
                let label = series
                    .split_once('{')
                    .map(|(_, l)| l.trim_end_matches('}').to_owned())
                    .unwrap_or_default();
                if series.starts_with(&format!("{family}_sum")) {
                    sums.entry(format!("{what} {{{label}}}")).or_default().0 += v;
                } else if series.starts_with(&format!("{family}_count")) {
                    sums.entry(format!("{what} {{{label}}}")).or_default().1 += v;
                }
            }
        }
    }
    for (what, (sum, count)) in sums.iter().filter(|(_, (_, c))| *c > 0.0) {
        println!("{what}: mean {:.0} ms over {count}", 1000.0 * sum / count);
    }
    if !rows.is_empty() {
        println!();
        println!(
            "timeline (DF_BENCH_TIMELINE=1): s | MiB received by the nodes | blob tasks done | MiB sent to the clients"
        );
        for (t, received, finished, sent) in &rows {
            println!(
                "{t:5.1} | {:7.1} | {finished:3} | {:7.1}",
                received / 1048576.0,
                sent / 1048576.0
            );
        }
    }
    for m in mirrors {
        m.shutdown().await;
    }
    swarm.stop().await;
    Ok(())
}
