//! `df ui`: the status page on a loopback port, relayed to a node's API socket — the page's reads
//! only.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod support;

use support::{DF, Daemon, start_node};

/// Sends one raw HTTP/1.1 request; returns the status code and the body.
fn request(addr: &str, method: &str, path: &str, host: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (status, body)
}

#[test]
fn df_ui_relays_the_pages_reads_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let _node = start_node(&dir.path().join("node"), &sock);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sock.exists() {
        assert!(
            Instant::now() < deadline,
            "the node's API socket did not appear"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut ui = Daemon(
        Command::new(DF)
            .arg("ui")
            .arg("--api")
            .arg(&sock)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(ui.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    // "df status page: http://127.0.0.1:PORT/ (Ctrl-C to stop)"
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_owned();
    let host = addr.as_str();

    let (status, body) = request(host, "GET", "/", host);
    assert_eq!(status, 200);
    assert!(body.contains("ui.js"), "{body}");
    let (status, body) = request(host, "GET", "/v1/status", host);
    assert_eq!(status, 200);
    assert!(body.contains("peer_id"), "{body}");
    let (status, _) = request(host, "GET", "/v1/peers", host);
    assert_eq!(status, 200);
    // Everything else of the API stays behind the socket.
    let (status, _) = request(host, "POST", "/v1/tasks", host);
    assert_eq!(status, 405);
    let (status, _) = request(host, "DELETE", "/v1/tasks/bafkabc", host);
    assert_eq!(status, 405);
    let (status, _) = request(host, "GET", "/v1/tasks/bafkabc/content", host);
    assert_eq!(status, 404);
    let (status, _) = request(host, "GET", "/metrics", host);
    assert_eq!(status, 404);
    // A page of another site that resolved its name to 127.0.0.1 (DNS rebinding) is refused.
    let port = addr.rsplit(':').next().unwrap();
    let (status, _) = request(host, "GET", "/v1/status", &format!("evil.example:{port}"));
    assert_eq!(status, 403);
    let (status, _) = request(host, "GET", "/", &format!("localhost:{port}"));
    assert_eq!(status, 200);
}

#[test]
fn df_ui_stays_on_loopback() {
    let out = Command::new(DF)
        .args([
            "ui",
            "--api",
            "/nonexistent/api.sock",
            "--listen",
            "0.0.0.0:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("loopback only"), "{err}");
}
