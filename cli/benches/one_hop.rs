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
//! byte crosses the A→B data plane, is hashed and stored by B, and is written to FILE by the CLI.
//! The baseline is `curl -o FILE` from nginx (sendfile), on the same disk, followed by `sync FILE`
//! (df fsyncs its output before renaming it into place, so both sync); the ratio is df / that.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DF: &str = env!("CARGO_BIN_EXE_df");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGTERM, so nginx's master stops its workers too.
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

/// Peak resident set size (VmHWM) of a process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

fn write_file(path: &Path, size: u64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for chunk in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    f.flush().unwrap();
}

fn start_nginx(dir: &Path, root: &Path, port: u16) -> Proc {
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nworker_processes 1;\npid {pid};\nerror_log {err};\n\
             events {{ worker_connections 64; }}\n\
             http {{ access_log off; sendfile on; tcp_nopush on;\n\
               client_body_temp_path {t}; proxy_temp_path {t}; fastcgi_temp_path {t};\n\
               uwsgi_temp_path {t}; scgi_temp_path {t};\n\
               server {{ listen 127.0.0.1:{port}; root {root}; }} }}\n",
            pid = dir.join("nginx.pid").display(),
            err = dir.join("nginx.err").display(),
            t = dir.display(),
            root = root.display(),
        ),
    )
    .unwrap();
    let child = Command::new("nginx")
        .args(["-c", conf.to_str().unwrap(), "-p", dir.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx not found: apt-get install nginx-light");
    wait_http(&format!("http://127.0.0.1:{port}/file.bin"));
    Proc(child)
}

/// Polls `cmd` every 50 ms until it succeeds (a server coming up has no event to wait on).
fn wait_until_ok(cmd: &mut Command, tries: usize, what: &str) {
    for _ in 0..tries {
        let ok = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not come up");
}

fn wait_http(url: &str) {
    wait_until_ok(Command::new("curl").args(["-sfI", url]), 100, url);
}

fn wait_api(api: &str) {
    wait_until_ok(
        Command::new(DF).args(["status", "--api", api]),
        200,
        &format!("df API {api}"),
    );
}

fn status(api: &str) -> serde_json::Value {
    let o = Command::new(DF)
        .args(["status", "--api", api])
        .output()
        .unwrap();
    serde_json::from_slice(&o.stdout).unwrap()
}

fn start_df(
    role: &str,
    dir: &Path,
    api: &str,
    bootstrap: Option<&str>,
    config: Option<&str>,
) -> Proc {
    let mut cmd = Command::new(DF);
    cmd.arg(role)
        .args(["--data-dir", dir.to_str().unwrap()])
        .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
        .args(["--data-listen", "127.0.0.1:0"])
        .args(["--api", api])
        .env("RUST_LOG", "warn")
        .stderr(Stdio::null());
    if let Some(b) = bootstrap {
        cmd.args(["--bootstrap", b]);
    }
    // Every df of the bench is a member of one private swarm.
    let key = dir.with_file_name("swarm.key");
    if !key.exists() {
        let ok = Command::new(DF)
            .args(["swarm-key", key.to_str().unwrap()])
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(ok.success(), "df swarm-key failed");
    }
    cmd.args(["--swarm-key", key.to_str().unwrap()]);
    if let Some(c) = config {
        let path = dir.with_extension("toml");
        std::fs::write(&path, c).unwrap();
        cmd.args(["--config", path.to_str().unwrap()]);
    }
    let p = Proc(cmd.spawn().unwrap());
    wait_api(api);
    p
}

fn timed(cmd: &mut Command) -> Duration {
    let t = Instant::now();
    let s = cmd.stdout(Stdio::null()).status().unwrap();
    assert!(s.success(), "{cmd:?} failed");
    t.elapsed()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn mbps(size: u64, d: Duration) -> f64 {
    size as f64 / d.as_secs_f64() / 1e6
}

fn main() {
    // `cargo bench` passes --bench; ignore arguments.
    let size_mib: u64 = std::env::var("DF_BENCH_SIZE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let runs: usize = std::env::var("DF_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let size = size_mib << 20;
    let work = tempfile::Builder::new()
        .prefix("df-bench-")
        .tempdir_in(bench_dir())
        .unwrap();
    let w = work.path();
    let www = w.join("www");
    std::fs::create_dir_all(&www).unwrap();
    write_file(&www.join("file.bin"), size);
    let port = free_port();
    let _nginx = start_nginx(w, &www, port);
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
    println!("df B  <- df A  (-O - > file)     : {df_stream:8.0} MB/s");
    println!("one-hop ratio df / curl : {:8.2}", df / curl);
    println!("stream ratio (-O -) / (-o) : {:5.2}", df_stream / df);
    println!("peak RSS, receiving node B: {:6.0} MiB", rss_b / 1048576.0);
    println!(
        "peak RSS, serving seed A  : {:6.0} MiB (it also fetched the file from nginx)",
        rss_a as f64 / 1048576.0
    );
}

/// Where the benchmark's files go: `DF_BENCH_DIR`, else the system temp dir.
fn bench_dir() -> PathBuf {
    std::env::var_os("DF_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
}
