//! Tests that need a second network position: a peer in its own network namespace (created by
//! the test, joined to this host by a veth pair) asks this host's seed to fetch URLs. Needs root
//! and iproute2 (CI runs as root).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use df_node::Role;
use df_testnet::TestNode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const DF: &str = env!("CARGO_BIN_EXE_df");

/// A network namespace with a veth link to this host: host side `.1`, namespace side `.2`.
struct Netns {
    name: String,
    host_ip: String,
}

fn ip(args: &[&str]) {
    let o = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        o.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

impl Netns {
    fn create(tag: &str) -> Netns {
        let id = std::process::id() % 200 + 20;
        let name = format!("df{tag}{id}");
        let (host, inner) = (format!("dh{tag}{id}"), format!("dn{tag}{id}"));
        let net = format!("10.213.{id}");
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let ns = Netns {
            name: name.clone(),
            host_ip: format!("{net}.1"),
        };
        ip(&["link", "add", &host, "type", "veth", "peer", "name", &inner]);
        ip(&["link", "set", &inner, "netns", &name]);
        ip(&["addr", "add", &format!("{net}.1/24"), "dev", &host]);
        ip(&["link", "set", &host, "up"]);
        ip(&[
            "netns",
            "exec",
            &name,
            "ip",
            "addr",
            "add",
            &format!("{net}.2/24"),
            "dev",
            &inner,
        ]);
        ip(&["netns", "exec", &name, "ip", "link", "set", &inner, "up"]);
        ip(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"]);
        ns
    }

    fn run(&self, cmd: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(cmd)
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth pair.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A service on this host's loopback that must never be reachable from another host.
async fn loopback_secret() -> (u16, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = Arc::new(AtomicU64::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            h.fetch_add(1, Ordering::SeqCst);
            let mut buf = [0u8; 2048];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\n\r\ninternal-token")
                .await;
        }
    });
    (port, hits)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_on_another_host_cannot_make_the_seed_fetch_the_seeds_loopback() {
    assert!(
        is_root(),
        "this test creates network namespaces: run it as root"
    );
    let ns = Netns::create("g");
    let (port, hits) = loopback_secret().await;
    let host_ip = ns.host_ip.clone();
    let seed = TestNode::start(Role::Seed, vec![], |c| {
        c.listen = vec![format!("/ip4/{host_ip}/tcp/0").parse().unwrap()];
        c.data_listen = format!("{host_ip}:0").parse().unwrap();
    })
    .await
    .unwrap();
    let boot = seed.bootstrap_addr().to_string();
    let key = df_testnet::swarm::swarm_key_file().unwrap();
    let out = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{port}/secret");
    let o = tokio::task::spawn_blocking({
        let out = out.path().join("stolen");
        move || {
            ns.run(&[
                DF,
                "get",
                &url,
                "-o",
                out.to_str().unwrap(),
                "--bootstrap",
                &boot,
                "--swarm-key",
                key.to_str().unwrap(),
                "--no-progress",
                "--timeout",
                "60s",
            ])
        }
    })
    .await
    .unwrap();
    assert!(
        !o.status.success(),
        "the peer obtained the seed's loopback service"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("refused") || err.contains("403"),
        "unexpected error: {err}"
    );
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "the seed fetched its own loopback for a peer"
    );
    assert!(!out.path().join("stolen").exists());
    seed.stop().await;
}
