//! Logs for files and log shippers: no terminal colour codes when standard error is a file, one
//! JSON object per line with `--log-format json`, and each task's lines carry its task ID.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use df_protocols::task::{TaskKey, canonical_url, parse_url};
use df_testnet::{TestOrigin, content};

mod support;

use support::{DF, Daemon, free_port, get};

/// Runs a node with `format` logging to `log`, downloads `url` through it, stops it; returns the
/// log's text.
fn node_log_of_a_download(dir: &Path, format: &str, url: &str) -> String {
    let api = format!("127.0.0.1:{}", free_port());
    let log = dir.join(format!("{format}.log"));
    let child = Command::new(DF)
        .args(["--log-format", format, "node", "--data-dir"])
        .arg(dir.join(format))
        .args([
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--data-listen",
            "127.0.0.1:0",
        ])
        .args(["--api", &api])
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
        .spawn()
        .unwrap();
    let node = Daemon(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let up = Command::new(DF)
            .args(["status", "--api", &api])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success();
        if up {
            break;
        }
        assert!(Instant::now() < deadline, "df node did not answer on {api}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = dir.join(format!("{format}.out"));
    let got = get(url, &out, &api);
    assert!(
        got.status.success(),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
    // The runner logs "task complete" as it exits; wait for the line rather than a fixed time.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("task complete")
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(node);
    std::fs::read_to_string(&log).unwrap()
}

fn task_id(url: &str) -> String {
    TaskKey::for_url(&canonical_url(&parse_url(url).unwrap(), &[]), "").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_in_a_file_have_no_colour_and_name_the_task() {
    let origin = TestOrigin::start().await.unwrap();
    origin.put("/logged", content(300_000, 3));
    let url = origin.url("/logged");
    let dir = tempfile::tempdir().unwrap();
    let (d, u) = (dir.path().to_path_buf(), url.clone());
    let text = tokio::task::spawn_blocking(move || node_log_of_a_download(&d, "text", &u))
        .await
        .unwrap();
    assert!(
        !text.contains('\u{1b}'),
        "colour codes in a log file:\n{text}"
    );
    let id = task_id(&url);
    let line = text
        .lines()
        .find(|l| l.contains("task complete"))
        .unwrap_or_else(|| panic!("no 'task complete' line:\n{text}"));
    assert!(line.contains(&format!("task{{id={id}}}")), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_with_the_task_id() {
    let origin = TestOrigin::start().await.unwrap();
    origin.put("/logged.json", content(300_000, 4));
    let url = origin.url("/logged.json");
    let dir = tempfile::tempdir().unwrap();
    let (d, u) = (dir.path().to_path_buf(), url.clone());
    let text = tokio::task::spawn_blocking(move || node_log_of_a_download(&d, "json", &u))
        .await
        .unwrap();
    let id = task_id(&url);
    let mut lines = 0;
    let mut with_task = 0;
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON object ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
        assert!(v["fields"].is_object(), "{line}");
        lines += 1;
        if v["fields"]["message"] == "task complete" {
            assert_eq!(v["span"]["name"], "task", "{line}");
            assert_eq!(v["span"]["id"], id.as_str(), "{line}");
            with_task += 1;
        }
    }
    assert!(lines >= 3, "{text}");
    assert_eq!(with_task, 1, "{text}");
}
