//! What the benchmarks share: nginx as the origin, df processes on loopback, timing helpers.

#![allow(dead_code, unreachable_pub)]

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const DF: &str = env!("CARGO_BIN_EXE_df");

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Proc(pub Child);

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
pub fn peak_rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

pub fn write_file(path: &Path, size: u64) {
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

/// What a bench downloads: a work directory under [`bench_dir`] holding `www/file.bin` (`size`
/// bytes), served by nginx on 127.0.0.1:`port`.
pub struct Served {
    pub nginx: Proc,
    pub port: u16,
    pub work: tempfile::TempDir,
}

pub fn serve_file(size: u64) -> Served {
    let work = tempfile::Builder::new()
        .prefix("df-bench-")
        .tempdir_in(bench_dir())
        .unwrap();
    let www = work.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    write_file(&www.join("file.bin"), size);
    let port = free_port();
    let nginx = start_nginx(work.path(), &www, port);
    Served { nginx, port, work }
}

pub fn start_nginx(dir: &Path, root: &Path, port: u16) -> Proc {
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
pub fn wait_until_ok(cmd: &mut Command, tries: usize, what: &str) {
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

pub fn wait_http(url: &str) {
    wait_until_ok(Command::new("curl").args(["-sfI", url]), 100, url);
}

pub fn wait_api(api: &str) {
    wait_until_ok(
        Command::new(DF).args(["status", "--api", api]),
        200,
        &format!("df API {api}"),
    );
}

pub fn status(api: &str) -> serde_json::Value {
    let o = Command::new(DF)
        .args(["status", "--api", api])
        .output()
        .unwrap();
    serde_json::from_slice(&o.stdout).unwrap()
}

pub fn start_df(
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

pub fn timed(cmd: &mut Command) -> Duration {
    let t = Instant::now();
    let s = cmd.stdout(Stdio::null()).status().unwrap();
    assert!(s.success(), "{cmd:?} failed");
    t.elapsed()
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn mbps(size: u64, d: Duration) -> f64 {
    size as f64 / d.as_secs_f64() / 1e6
}

/// Where the benchmark's files go: `DF_BENCH_DIR`, else the system temp dir.
pub fn bench_dir() -> PathBuf {
    std::env::var_os("DF_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
}

/// A numeric setting from the environment, or `default`.
pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
