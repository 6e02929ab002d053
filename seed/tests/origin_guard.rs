//! The origin guard on real sockets: a node fetches for a peer only what that peer could fetch
//! itself.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use df_node::config::OriginConfig;
use df_node::origin::{Origin, OriginError, OriginSpec, Requester};
use df_seed::HttpOrigin;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A loopback HTTP server: `/secret` answers a secret, `/redirect` redirects to `location`.
/// Counts the requests it answered.
async fn server(location: String) -> (u16, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = Arc::new(AtomicU64::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (h, location) = (h.clone(), location.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).into_owned();
                h.fetch_add(1, Ordering::SeqCst);
                let resp = if req.starts_with("GET /redirect") {
                    format!(
                        "HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n"
                    )
                } else {
                    "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecret".to_owned()
                };
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    (port, hits)
}

fn origin() -> HttpOrigin {
    HttpOrigin::new(&OriginConfig {
        retries: 0,
        connect_timeout: Duration::from_secs(2),
        ..OriginConfig::default()
    })
    .unwrap()
}

fn spec(url: &str, requester: Requester) -> OriginSpec {
    OriginSpec {
        url: url.parse().unwrap(),
        headers: vec![],
        requester,
    }
}

fn refused(r: Result<df_node::OriginResponse, OriginError>) -> bool {
    matches!(r, Err(OriginError::Status { status: 403, .. }))
}

#[tokio::test]
async fn a_peer_on_another_host_cannot_make_this_node_fetch_its_loopback() {
    let (port, hits) = server(String::new()).await;
    let o = origin();
    for url in [
        format!("http://127.0.0.1:{port}/secret"),
        format!("http://2130706433:{port}/secret"),
        format!("http://0x7f.1:{port}/secret"),
        format!("http://localhost:{port}/secret"),
        format!("http://0.0.0.0:{port}/secret"),
    ] {
        let r = o.open(&spec(&url, Requester::Peer), 0..6).await;
        assert!(refused(r), "{url} was not refused");
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "the loopback service was reached"
    );
    // The node's own user, and a peer on this very host, may.
    for who in [Requester::Local, Requester::PeerOnLoopback] {
        let url = format!("http://127.0.0.1:{port}/secret");
        assert!(o.open(&spec(&url, who), 0..6).await.is_ok(), "{who:?}");
    }
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn redirects_to_metadata_or_link_local_are_not_followed_for_peers() {
    let (port, hits) = server("http://169.254.169.254/latest/meta-data/".into()).await;
    let o = origin();
    let url = format!("http://127.0.0.1:{port}/redirect");
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        o.open(&spec(&url, Requester::PeerOnLoopback), 0..6),
    )
    .await
    .expect("a refused redirect must fail at once, not try to connect");
    assert!(refused(r), "the redirect was followed");
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    // A peer on this host may follow a redirect to another loopback service.
    let (inner, inner_hits) = server(String::new()).await;
    let (outer, _) = server(format!("http://localhost:{inner}/secret")).await;
    let r = o
        .open(
            &spec(
                &format!("http://127.0.0.1:{outer}/redirect"),
                Requester::PeerOnLoopback,
            ),
            0..6,
        )
        .await;
    assert!(r.is_ok(), "a same-host peer may follow a loopback redirect");
    assert_eq!(inner_hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn allow_and_deny_lists_narrow_peer_fetches_only() {
    let (port, hits) = server(String::new()).await;
    let o = HttpOrigin::new(&OriginConfig {
        retries: 0,
        deny: vec!["127.0.0.0/8".into()],
        ..OriginConfig::default()
    })
    .unwrap();
    let url = format!("http://127.0.0.1:{port}/secret");
    assert!(refused(
        o.open(&spec(&url, Requester::PeerOnLoopback), 0..6).await
    ));
    assert_eq!(hits.load(Ordering::SeqCst), 0);
    assert!(o.open(&spec(&url, Requester::Local), 0..6).await.is_ok());
    assert!(
        HttpOrigin::new(&OriginConfig {
            allow: vec!["*".into()],
            ..OriginConfig::default()
        })
        .is_err()
    );
}

#[tokio::test]
async fn a_registrys_blob_redirect_reaches_only_https_or_the_registry_itself() {
    let (secret, secret_hits) = server(String::new()).await;
    let (registry, _) = server(format!("http://127.0.0.1:{secret}/secret")).await;
    let o = origin();
    // The mirror's registry is reached as configured (here on loopback)...
    let direct = format!("http://127.0.0.1:{registry}/secret");
    assert!(
        o.open(&spec(&direct, Requester::Registry), 0..6)
            .await
            .is_ok()
    );
    // ...but its redirect to another plain-http service on this host is not followed.
    let r = o
        .open(
            &spec(
                &format!("http://127.0.0.1:{registry}/redirect"),
                Requester::Registry,
            ),
            0..6,
        )
        .await;
    assert!(
        refused(r),
        "the registry's redirect to a local service was followed"
    );
    assert_eq!(secret_hits.load(Ordering::SeqCst), 0);
    // The same registry redirecting to one of its own paths is followed.
    let same = server_redirecting_to_itself().await;
    let r = o
        .open(
            &spec(
                &format!("http://127.0.0.1:{same}/redirect"),
                Requester::Registry,
            ),
            0..6,
        )
        .await;
    assert!(r.is_ok(), "a registry's redirect to itself was refused");
}

/// A server whose `/redirect` sends the client to its own `/secret`.
async fn server_redirecting_to_itself() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let resp = if buf[..n].starts_with(b"GET /redirect") {
                    format!(
                        "HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:{port}/secret\r\nContent-Length: 0\r\n\r\n"
                    )
                } else {
                    "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecret".to_owned()
                };
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    port
}
