//! `df preheat --wait`: a seed preheats a file and the command exits 0 with one line per task; a
//! 404 exits 1 naming the origin's answer; an unknown job is an error.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use df_testnet::{TestOrigin, content};

mod support;

use support::{DF, daemon_log, start_daemon};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preheat_wait_exits_zero_when_the_file_is_held_and_one_when_the_origin_says_404() {
    let origin = TestOrigin::start().await.unwrap();
    origin.put("/release.tar", content(3 << 20, 61));
    origin.fail("/gone.tar", 404);
    let dir = tempfile::tempdir().unwrap();
    // A socket, not a TCP port picked beforehand (which another bind may take meanwhile).
    let api = dir.path().join("api.sock").to_str().unwrap().to_owned();
    let _seed = start_daemon("seed", &dir.path().join("seed"), &api);
    let df = |args: &[&str]| {
        Command::new(DF)
            .args(args)
            .args(["--api", &api])
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !df(&["status"]).status.success() {
        assert!(
            Instant::now() < deadline,
            "the seed did not start: {}",
            daemon_log(&dir.path().join("seed"))
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let ok = df(&["preheat", &origin.url("/release.tar"), "--wait"]);
    let out = String::from_utf8_lossy(&ok.stdout);
    let err = String::from_utf8_lossy(&ok.stderr);
    assert!(ok.status.success(), "{out}{err}");
    assert!(err.contains("preheat job"), "{err}");
    assert!(out.starts_with("ok") && out.contains("hosts 1/1"), "{out}");
    assert_eq!(origin.bytes_sent(), 3 << 20);

    let bad = df(&["preheat", &origin.url("/gone.tar"), "--wait"]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(1), "{err}");
    assert!(err.contains("failed") && err.contains("404"), "{err}");

    let unknown = df(&["preheat", "--job", "0123456789abcdef"]);
    let err = String::from_utf8_lossy(&unknown.stderr);
    assert_eq!(unknown.status.code(), Some(1), "{err}");
    assert!(
        err.contains("not found") || err.contains("preheat job"),
        "{err}"
    );
}
