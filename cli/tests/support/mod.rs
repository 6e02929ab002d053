//! What the CLI's integration tests share: the binary, child processes that die with the test,
//! free ports.

#![allow(dead_code, clippy::unwrap_used)]

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

pub(crate) const DF: &str = env!("CARGO_BIN_EXE_df");

/// A child process, killed and reaped when dropped (a failing test leaves no node behind).
pub(crate) struct Daemon(pub(crate) Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A TCP port on 127.0.0.1 free a moment ago.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `df node` on loopback with its data in `data_dir` and its API at `api` (HOST:PORT or a socket
/// path), warnings only, written to [`daemon_log`].
pub(crate) fn start_node(data_dir: &Path, api: impl AsRef<OsStr>) -> Daemon {
    start_daemon("node", data_dir, api)
}

/// Where [`start_daemon`] writes a daemon's warnings and errors: `<data dir>.log`.
pub(crate) fn daemon_log(data_dir: &Path) -> String {
    std::fs::read_to_string(data_dir.with_extension("log")).unwrap_or_default()
}

/// `df node` or `df seed` on loopback with ephemeral ports, its API at `api`; its standard error
/// goes to [`daemon_log`].
pub(crate) fn start_daemon(role: &str, data_dir: &Path, api: impl AsRef<OsStr>) -> Daemon {
    let log = std::fs::File::create(data_dir.with_extension("log")).unwrap();
    Daemon(
        Command::new(DF)
            .args([role, "--data-dir"])
            .arg(data_dir)
            .args([
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--data-listen",
                "127.0.0.1:0",
            ])
            .arg("--api")
            .arg(api)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

/// `df get URL -o OUT --api API --no-progress`, with the default log filter.
pub(crate) fn get(url: &str, out: &Path, api: &str) -> Output {
    Command::new(DF)
        .args(["get", url, "-o"])
        .arg(out)
        .args(["--api", api, "--no-progress"])
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}
