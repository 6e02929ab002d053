//! One-hop benchmark: how fast does a file move from one df peer to another on loopback, compared
//! with curl fetching the same file from nginx in the same run; and how much memory do the two
//! df processes use while moving it.
//!
//! Run: `cargo bench -p df-cli --bench one_hop` (needs `nginx` and `curl`: `apt-get install
//! nginx-light curl`). `DF_BENCH_SIZE` sets the file size in MiB (default 1024), `DF_BENCH_RUNS`
//! the repetitions (default 3; medians are reported).
//!
//! Setup: nginx serves the file; seed A fetches it once (`df get` through A); then, per run, a fresh
//! node B with `back_to_source = false` joins A and `df get -o FILE --api B` downloads it — every
//! byte crosses the A→B data plane, is hashed and stored by B into its content file, and FILE
//! becomes a hard link to that file (same filesystem; the CLI copies the pieces where it cannot
//! link). `-O - > FILE` (each piece sent in order from B's file to standard output, then `sync
//! FILE`) is timed from another fresh node.
//! The baseline is `curl -o FILE` from nginx (sendfile), on the same disk, followed by `sync FILE`
//! (df fsyncs its output before renaming it into place, so both sync); the ratio is df / that.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::{Duration, Instant};

mod support;

use support::*;

fn main() {
    // `cargo bench` passes --bench; ignore arguments.
    let size_mib = env_u64("DF_BENCH_SIZE", 1024);
    let runs = env_u64("DF_BENCH_RUNS", 3) as usize;
    let size = size_mib << 20;
    let served = serve_file(size);
    let (w, port) = (served.work.path(), served.port);
    let url = format!("http://127.0.0.1:{port}/file.bin");
    println!("one-hop benchmark: {size_mib} MiB, {runs} runs, medians");

    // Baseline: curl from nginx to a file on the same disk, then `sync FILE`: `df get -o` fsyncs
    // its output before renaming it into place, so both make the file durable (fsync parity).
    // curl without the sync is printed too.
    let out = w.join("curl.out");
    let (curl, curl_nosync): (Vec<f64>, Vec<f64>) = (0..runs)
        .map(|_| {
            let t = Instant::now();
            let fetched =
                timed(Command::new("curl").args(["-s", "-o", out.to_str().unwrap(), &url]));
            timed(Command::new("sync").arg(&out));
            let d = t.elapsed();
            let _ = std::fs::remove_file(&out);
            (mbps(size, d), mbps(size, fetched))
        })
        .unzip();
    let (curl, curl_nosync) = (median(curl), median(curl_nosync));

    // Seed A holds the file.
    let api_a = format!("127.0.0.1:{}", free_port());
    let a = start_df("seed", &w.join("a"), &api_a, None, None);
    assert!(
        Command::new(DF)
            .args([
                "get",
                &url,
                "-O",
                "/dev/null",
                "--api",
                &api_a,
                "--no-progress"
            ])
            .status()
            .unwrap()
            .success()
    );
    let boot = status(&api_a)["listen_addrs"][0]
        .as_str()
        .unwrap()
        .to_owned();

    // A fresh node B (nothing cached, no origin) joined to A.
    let fresh_b = |name: &str| {
        let api_b = format!("127.0.0.1:{}", free_port());
        let dir_b = w.join(name);
        let b = start_df(
            "node",
            &dir_b,
            &api_b,
            Some(&boot),
            Some("[download]\nback_to_source = false\n"),
        );
        // Let B join A before timing.
        for _ in 0..100 {
            if status(&api_b)["connected_peers"].as_u64().unwrap_or(0) > 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (b, api_b, dir_b)
    };

    let mut df = Vec::new();
    let mut df_stream = Vec::new();
    let mut rss_b = Vec::new();
    for run in 0..runs {
        let (b, api_b, dir_b) = fresh_b(&format!("b{run}"));
        let out = w.join("df.out");
        let d = timed(Command::new(DF).args([
            "get",
            &url,
            "-o",
            out.to_str().unwrap(),
            "--api",
            &api_b,
            "--no-progress",
            "--disable-back-to-source",
        ]));
        let got = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
        assert_eq!(got, size, "df wrote {got} bytes");
        let st = status(&api_b);
        assert_eq!(
            st["bytes"]["from_origin"].as_u64(),
            Some(0),
            "B went to origin"
        );
        df.push(mbps(size, d));
        rss_b.push(peak_rss(b.0.id()) as f64);
        let _ = std::fs::remove_file(&out);
        drop(b);
        let _ = std::fs::remove_dir_all(&dir_b);

        // The same from a fresh B, streamed in order to standard output (`-O - > FILE`).
        let (b, api_b, dir_b) = fresh_b(&format!("s{run}"));
        let file = std::fs::File::create(&out).unwrap();
        let t = Instant::now();
        let ok = Command::new(DF)
            .args([
                "get",
                &url,
                "-O",
                "-",
                "--api",
                &api_b,
                "--no-progress",
                "--disable-back-to-source",
            ])
            .stdout(file)
            .status()
            .unwrap();
        // Synced as `-o` syncs its output (fsync parity).
        timed(Command::new("sync").arg(&out));
        let d = t.elapsed();
        assert!(ok.success(), "df get -O - failed");
        let got = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
        assert_eq!(got, size, "df streamed {got} bytes");
        df_stream.push(mbps(size, d));
        let _ = std::fs::remove_file(&out);
        drop(b);
        let _ = std::fs::remove_dir_all(&dir_b);
    }
    let df_stream = median(df_stream);
    let df = median(df);
    let rss_a = peak_rss(a.0.id());
    let rss_b = median(rss_b);
    println!("curl  <- nginx (to file, no sync): {curl_nosync:8.0} MB/s");
    println!("curl  <- nginx (to file, + sync) : {curl:8.0} MB/s");
    println!("df B  <- df A  (to file, fsynced): {df:8.0} MB/s");
    println!("df B  <- df A  (-O - > file, sync): {df_stream:8.0} MB/s");
    println!("one-hop ratio df / curl : {:8.2}", df / curl);
    println!("stream ratio (-O -) / (-o) : {:5.2}", df_stream / df);
    println!("peak RSS, receiving node B: {:6.0} MiB", rss_b / 1048576.0);
    println!(
        "peak RSS, serving seed A  : {:6.0} MiB (it also fetched the file from nginx)",
        rss_a as f64 / 1048576.0
    );
}
