//! Rate-limit benchmark: does a node capped at R move R? For each bucket (`[limits] upload_rate`,
//! `download_rate`, `origin_rate`) and for a task's own limit (`df get --limit-rate`), one file
//! crosses loopback through a capped df and the rate it moved at is printed beside R.
//!
//! Run: `cargo bench -p df-cli --bench rate_limits` (needs `nginx` and `curl`). `DF_BENCH_SIZE`
//! sets the file size in MiB (default 256), `DF_BENCH_RATE` R in MiB/s (default 20). The time is
//! that of the whole `df get` (its start-up included), so a rate a little above R is the bucket's
//! first burst (1/20 s of R).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::*;

/// Starts a node with `config`; returns it, its API and its first listen address.
fn node(dir: &std::path::Path, boot: Option<&str>, config: &str) -> (Proc, String, String) {
    let api = format!("127.0.0.1:{}", free_port());
    let p = start_df("node", dir, &api, boot, Some(config));
    let addr = status(&api)["listen_addrs"][0].as_str().unwrap().to_owned();
    if boot.is_some() {
        for _ in 0..100 {
            if status(&api)["connected_peers"].as_u64().unwrap_or(0) > 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    (p, api, addr)
}

fn get(api: &str, url: &str, extra: &[&str]) -> Duration {
    let t = Instant::now();
    let ok = Command::new(DF)
        .args(["get", url, "-O", "/dev/null", "--api", api, "--no-progress"])
        .args(extra)
        .status()
        .unwrap();
    assert!(ok.success(), "df get {url} failed");
    t.elapsed()
}

fn main() {
    let size_mib = env_u64("DF_BENCH_SIZE", 256);
    let rate_mib = env_u64("DF_BENCH_RATE", 20);
    let size = size_mib << 20;
    let work = tempfile::Builder::new()
        .prefix("df-bench-rate-")
        .tempdir_in(bench_dir())
        .unwrap();
    let w = work.path();
    let www = w.join("www");
    std::fs::create_dir_all(&www).unwrap();
    for name in ["file.bin", "up.bin", "down.bin", "origin.bin", "task.bin"] {
        write_file(&www.join(name), size);
    }
    let port = free_port();
    let _nginx = start_nginx(w, &www, port);
    let url = |name: &str| format!("http://127.0.0.1:{port}/{name}");
    let no_origin = "[download]\nback_to_source = false\n";
    let cap = |key: &str| format!("[limits]\n{key} = \"{rate_mib}MiB/s\"\n");
    let mut rows = Vec::new();

    // Upload: a capped node fetches the file from the origin; an uncapped one fetches it from it.
    let (_a, api_a, addr_a) = node(&w.join("up-a"), None, &cap("upload_rate"));
    get(&api_a, &url("up.bin"), &[]);
    let (_b, api_b, _) = node(&w.join("up-b"), Some(&addr_a), no_origin);
    rows.push(("upload_rate", get(&api_b, &url("up.bin"), &[])));

    // Download: an uncapped node holds the file; a download-capped one fetches it from it.
    let (_c, api_c, addr_c) = node(&w.join("down-c"), None, "");
    get(&api_c, &url("down.bin"), &[]);
    let down = format!("{no_origin}{}", cap("download_rate"));
    let (_d, api_d, _) = node(&w.join("down-d"), Some(&addr_c), &down);
    rows.push(("download_rate", get(&api_d, &url("down.bin"), &[])));

    // Origin: a lone origin-capped node fetches the origin.
    let (_e, api_e, _) = node(&w.join("origin-e"), None, &cap("origin_rate"));
    rows.push(("origin_rate", get(&api_e, &url("origin.bin"), &[])));

    // A task's own limit, on an uncapped lone node.
    let (_f, api_f, _) = node(&w.join("task-f"), None, "");
    let flag = format!("{rate_mib}MiB");
    rows.push((
        "df get --limit-rate",
        get(&api_f, &url("task.bin"), &["--limit-rate", &flag]),
    ));

    println!("rate-limit benchmark: {size_mib} MiB per transfer, R = {rate_mib} MiB/s");
    println!("| limit | moved (MiB/s) | vs R |");
    println!("|---|---|---|");
    for (what, d) in rows {
        let moved = size as f64 / d.as_secs_f64() / 1048576.0;
        let off = (moved / rate_mib as f64 - 1.0) * 100.0;
        println!("| {what} | {moved:.2} | {off:+.1} % |");
    }
}
