//! Small-file latency: how long a whole `df get` process takes for a fresh 1 KiB task through a
//! running node and seed, against curl fetching the same bytes from nginx, in the same run.
//!
//! Run: `cargo bench -p df-cli --bench small_get` (needs `nginx` and `curl`). `DF_BENCH_RUNS` sets
//! the number of downloads per method (default 21; medians and 90th percentiles are reported),
//! `DF_BENCH_SMALL` the file size in bytes (default 1024).
//!
//! Setup: nginx serves the file; seed A and node B run, B joined to A. Each run asks for a new URL
//! (`?run=N`, so a new task): `df get -o FILE --api B` makes B create the task, find A as its owner,
//! have A fetch the origin, and fetch the piece from A; the CLI then writes and fsyncs FILE and
//! renames it into place. The baseline is `curl -o FILE URL` followed by `sync FILE` (fsync parity).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

mod support;

use support::*;

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let runs = env_u64("DF_BENCH_RUNS", 21) as usize;
    let size = env_u64("DF_BENCH_SMALL", 1024);
    let served = serve_file(size);
    let (w, port) = (served.work.path(), served.port);
    println!("small-file benchmark: {size} bytes, {runs} runs per method");

    let api_a = format!("127.0.0.1:{}", free_port());
    let _a = start_df("seed", &w.join("a"), &api_a, None, None);
    let boot = status(&api_a)["listen_addrs"][0]
        .as_str()
        .unwrap()
        .to_owned();
    let api_b = format!("127.0.0.1:{}", free_port());
    let _b = start_df("node", &w.join("b"), &api_b, Some(&boot), None);
    for _ in 0..250 {
        if status(&api_b)["connected_seeds"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        status(&api_b)["connected_seeds"].as_u64().unwrap_or(0) > 0,
        "node B never connected to seed A"
    );

    let out = w.join("out.bin");
    let url = |run: usize, who: &str| format!("http://127.0.0.1:{port}/file.bin?{who}={run}");
    let curl_get = |run: usize| {
        let mut c = Command::new("curl");
        c.args(["-sf", "-o", out.to_str().unwrap(), &url(run, "c")]);
        c
    };
    let df_get = |run: usize| {
        let mut c = Command::new(DF);
        c.args(["get", &url(run, "d"), "-o", out.to_str().unwrap()])
            .args(["--api", &api_b, "--no-progress"]);
        c
    };
    // One warm-up of each, untimed: the first process start pays for page-cache misses.
    timed(&mut curl_get(usize::MAX));
    timed(&mut df_get(usize::MAX));

    let mut curl = Vec::new();
    let mut df = Vec::new();
    // Interleaved, so both see the same machine load.
    for run in 0..runs {
        let t = std::time::Instant::now();
        timed(&mut curl_get(run));
        timed(Command::new("sync").arg(&out));
        curl.push(ms(t.elapsed()));
        assert_eq!(std::fs::metadata(&out).unwrap().len(), size);
        std::fs::remove_file(&out).unwrap();

        let d = timed(&mut df_get(run));
        df.push(ms(d));
        assert_eq!(std::fs::metadata(&out).unwrap().len(), size);
        std::fs::remove_file(&out).unwrap();
    }
    let st = status(&api_b);
    assert_eq!(
        st["bytes"]["from_origin"].as_u64(),
        Some(0),
        "node B fetched the origin itself instead of through seed A"
    );
    let (c50, c90) = (percentile(curl.clone(), 0.5), percentile(curl, 0.9));
    let (d50, d90) = (percentile(df.clone(), 0.5), percentile(df, 0.9));
    println!("curl <- nginx, + sync        : p50 {c50:6.1} ms  p90 {c90:6.1} ms");
    println!("df get via node B + seed A   : p50 {d50:6.1} ms  p90 {d90:6.1} ms");
    println!("df - curl (p50)              : {:6.1} ms", d50 - c50);
}
