//! `df purge`: the task named by its URL goes, one line per host, and a second purge finds nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use df_testnet::{TestOrigin, content};

mod support;

use support::{DF, daemon_log, get, start_node};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_by_url_removes_the_task_and_reports_each_host() {
    let origin = TestOrigin::start().await.unwrap();
    origin.put("/purged", content(200_000, 5));
    let url = origin.url("/purged");
    let dir = tempfile::tempdir().unwrap();
    // A socket, not a TCP port picked beforehand (which another bind may take meanwhile).
    let api = dir.path().join("api.sock").to_str().unwrap().to_owned();
    let _node = start_node(&dir.path().join("node"), &api);
    let df = move |args: &[&str]| {
        let mut c = Command::new(DF);
        c.args(args);
        c
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !df(&["status", "--api", &api])
        .output()
        .unwrap()
        .status
        .success()
    {
        assert!(
            Instant::now() < deadline,
            "the node did not start: {}",
            daemon_log(&dir.path().join("node"))
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = dir.path().join("out");
    let got = get(&url, &out, &api);
    assert!(
        got.status.success(),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );

    let purge = |scope: &str| {
        df(&["purge", &url, "--scope", scope, "--api", &api])
            .output()
            .unwrap()
    };
    let first = purge("local");
    let text = String::from_utf8_lossy(&first.stdout);
    assert!(
        first.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(text.starts_with("deleted"), "{text}");
    assert_eq!(text.lines().count(), 1, "{text}");
    let again = purge("all_peers");
    let text = String::from_utf8_lossy(&again.stdout);
    assert!(again.status.success());
    assert!(text.starts_with("absent"), "{text}");
    let bad = purge("everywhere");
    assert_eq!(bad.status.code(), Some(2), "a bad scope is a usage error");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("all_seeds"));
}
