//! The mirror refuses to be an open proxy: unmapped `?ns=` hosts, redirects to plain HTTP or
//! internal addresses, path traversal, and clients that hold connections open without sending a
//! request. Stub registries on 127.0.0.1 (a few lines of raw HTTP) stand in for real ones, so
//! these tests need neither root nor registry programs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use df_node::{Content, ContentError, DownloadRequest};
use df_protocols::task::ContentDigest;
use df_proxy::{BlobSource, Mirror, MirrorConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const SECRET: &str = "TOP-SECRET-internal-service-body";

/// The mirror's blob source in these tests: blobs are not what they are about.
struct NoBlobs;

#[async_trait]
impl BlobSource for NoBlobs {
    async fn fetch(
        &self,
        _req: DownloadRequest,
        _range: Option<&str>,
    ) -> Result<Content, ContentError> {
        Err(ContentError::UnknownTask)
    }

    async fn known_length(&self, _digest: &ContentDigest) -> Option<u64> {
        None
    }

    fn answered(&self, _route: &'static str, _status: u16) {}
}

async fn mirror(tweak: impl FnOnce(&mut MirrorConfig)) -> Mirror {
    let mut cfg = MirrorConfig {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        connect_timeout: Duration::from_secs(3),
        request_timeout: Duration::from_secs(10),
        ..MirrorConfig::default()
    };
    tweak(&mut cfg);
    Mirror::start(cfg, Arc::new(NoBlobs)).await.unwrap()
}

/// A raw HTTP/1.1 response with `Connection: close`.
fn reply(status: u16, headers: &[(&str, &str)], body: &str) -> String {
    let mut r = format!("HTTP/1.1 {status} X\r\nconnection: close\r\n");
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str(&format!("content-length: {}\r\n\r\n{body}", body.len()));
    r
}

type Handler = Arc<dyn Fn(&str) -> String + Send + Sync>;

/// A one-request-per-connection HTTP server that records the connections it accepts and the
/// request targets it reads.
struct Stub {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    paths: Arc<Mutex<Vec<String>>>,
}

impl Stub {
    async fn start(handler: impl Fn(&str) -> String + Send + Sync + 'static) -> Stub {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let paths = Arc::new(Mutex::new(Vec::new()));
        let handler: Handler = Arc::new(handler);
        let (conns, seen) = (connections.clone(), paths.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                conns.fetch_add(1, Ordering::SeqCst);
                let (handler, seen) = (handler.clone(), seen.clone());
                tokio::spawn(async move {
                    let Some(head) = read_head(&mut s).await else {
                        return;
                    };
                    let target = head.split(' ').nth(1).unwrap_or("").to_owned();
                    seen.lock().unwrap().push(target.clone());
                    let _ = s.write_all(handler(&target).as_bytes()).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        Stub {
            addr,
            connections,
            paths,
        }
    }

    fn url(&self) -> url::Url {
        format!("http://{}", self.addr).parse().unwrap()
    }

    fn paths(&self) -> Vec<String> {
        self.paths.lock().unwrap().clone()
    }
}

/// Reads up to the end of a request's headers.
async fn read_head(s: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 || buf.len() > 64 << 10 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8(buf).ok()
}

/// Sends `GET target` byte for byte (no client-side URL normalization) and returns the status
/// and body.
async fn raw_get(addr: SocketAddr, target: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {target} HTTP/1.1\r\nhost: mirror\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("mirror answered in time")
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The first OCI error's code and message.
fn oci_error(body: &str) -> (String, String) {
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: not JSON: {body:?}"));
    (
        v["errors"][0]["code"].as_str().unwrap_or("").to_owned(),
        v["errors"][0]["message"].as_str().unwrap_or("").to_owned(),
    )
}

async fn get(url: &str) -> (u16, String) {
    let r = reqwest::Client::new()
        .get(url)
        .header("Accept", MANIFEST_TYPE)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn manifest_body() -> String {
    serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": format!("sha256:{}", "a".repeat(64)), "size": 2},
        "layers": []
    })
    .to_string()
}

/// A registry stub that serves one manifest for any manifest request and `{}` otherwise.
async fn plain_registry() -> Stub {
    let manifest = manifest_body();
    Stub::start(move |path| {
        if path.contains("/manifests/") {
            reply(200, &[("content-type", MANIFEST_TYPE)], &manifest)
        } else {
            reply(200, &[("content-type", "application/json")], "{}")
        }
    })
    .await
}

#[tokio::test]
async fn unmapped_ns_hosts_are_refused_unless_allow_unmapped() {
    let reg = plain_registry().await;
    let other = plain_registry().await;
    let m = mirror(|c| {
        c.upstream = Some(reg.url());
        c.registries.insert("mapped.example".into(), reg.url());
    })
    .await;
    let base = format!("http://{}", m.local_addr());
    let manifest = format!("{base}/v2/lib/app/manifests");

    // Mapped hosts, and the upstream named by its own HOST:PORT, are served.
    assert_eq!(
        get(&format!("{manifest}/v1?ns=mapped.example")).await.0,
        200
    );
    assert_eq!(get(&format!("{manifest}/v2?ns={}", reg.addr)).await.0, 200);
    let served = reg.paths().len();
    assert_eq!(served, 2);

    // Anything else is refused with a message that says how to map it, and nothing is fetched.
    for ns in [
        "evil.example".to_owned(),
        "registry.invalid".to_owned(),
        other.addr.to_string(),
        "169.254.169.254".to_owned(),
    ] {
        for path in [
            "/v2/lib/app/manifests/v1",
            "/v2/lib/app/tags/list",
            "/v2/_catalog",
        ] {
            let (status, body) = get(&format!("{base}{path}?ns={ns}")).await;
            let (code, message) = oci_error(&body);
            assert_eq!((status, code.as_str()), (403, "DENIED"), "{path}?ns={ns}");
            assert!(
                message.contains(&format!("--mirror-registry {ns}=URL")),
                "{message}"
            );
        }
    }
    assert!(other.paths().is_empty(), "{:?}", other.paths());
    assert_eq!(reg.paths().len(), served);
    m.shutdown().await;

    // With allow_unmapped, an unmapped host is tried (over https) — but never an internal
    // address, by IP literal or by a name that resolves to one.
    let m = mirror(|c| c.allow_unmapped = true).await;
    let base = format!("http://{}", m.local_addr());
    let (status, body) = get(&format!(
        "{base}/v2/lib/app/manifests/v1?ns=registry.invalid"
    ))
    .await;
    let (code, message) = oci_error(&body);
    assert_eq!((status, code.as_str()), (503, "UNAVAILABLE"), "{message}");
    assert!(message.contains("https://registry.invalid"), "{message}");
    for ns in [
        other.addr.to_string(),
        format!("[::ffff:127.0.0.1]:{}", other.addr.port()),
    ] {
        let (status, body) = get(&format!("{base}/v2/lib/app/manifests/v1?ns={ns}")).await;
        assert_eq!(
            (status, oci_error(&body).0.as_str()),
            (403, "DENIED"),
            "{ns}"
        );
    }
    let (status, body) = get(&format!(
        "{base}/v2/lib/app/manifests/v1?ns=localhost:{}",
        other.addr.port()
    ))
    .await;
    let (code, message) = oci_error(&body);
    assert_eq!((status, code.as_str()), (403, "DENIED"), "{message}");
    assert!(message.contains("resolves only to loopback"), "{message}");
    assert_eq!(other.connections.load(Ordering::SeqCst), 0);
    m.shutdown().await;
}

#[tokio::test]
async fn redirects_to_plain_http_or_internal_addresses_are_not_followed() {
    // An internal service the registry's redirects point at: its body must never come back.
    let secret = Stub::start(|_| reply(200, &[("content-type", MANIFEST_TYPE)], SECRET)).await;
    let s = secret.addr;
    let manifest = manifest_body();
    let blob = format!("sha256:{}", "b".repeat(64));
    let reg = Stub::start(move |path| {
        let to = |location: String| reply(302, &[("location", location.as_str())], "");
        match path {
            "/v2/lib/app/manifests/v1" => to(format!("http://127.0.0.1:{}/secret", s.port())),
            "/v2/lib/app/manifests/v2" => to(format!("http://localhost:{}/secret", s.port())),
            "/v2/lib/app/manifests/v3" => to(format!("https://localhost:{}/secret", s.port())),
            "/v2/lib/app/manifests/v4" => to("https://169.254.169.254/latest/meta-data/".into()),
            "/v2/lib/app/manifests/v5" => to("https://[fd00:ec2::254]/latest/meta-data/".into()),
            "/v2/lib/app/tags/list" => to(format!("http://127.0.0.1:{}/tags", s.port())),
            "/v2/_catalog" => to(format!("https://localhost:{}/catalog", s.port())),
            p if p.starts_with("/v2/lib/app/blobs/") => {
                to(format!("http://127.0.0.1:{}/blob", s.port()))
            }
            // Within the registry itself: followed.
            "/v2/lib/app/manifests/moved" => to("/v2/lib/app/manifests/real".into()),
            "/v2/lib/app/manifests/real" => {
                reply(200, &[("content-type", MANIFEST_TYPE)], &manifest)
            }
            _ => reply(404, &[], ""),
        }
    })
    .await;
    let m = mirror(|c| c.upstream = Some(reg.url())).await;
    let base = format!("http://{}", m.local_addr());

    for path in [
        "/v2/lib/app/manifests/v1",
        "/v2/lib/app/manifests/v1",
        "/v2/lib/app/manifests/v2",
        "/v2/lib/app/manifests/v3",
        "/v2/lib/app/manifests/v4",
        "/v2/lib/app/manifests/v5",
        "/v2/lib/app/tags/list",
        "/v2/_catalog",
    ] {
        let (status, body) = get(&format!("{base}{path}")).await;
        assert!(!body.contains(SECRET), "{path}: the secret came back");
        let (code, message) = oci_error(&body);
        assert_eq!(
            (status, code.as_str()),
            (502, "UNKNOWN"),
            "{path}: {message}"
        );
        assert!(message.contains("redirect"), "{path}: {message}");
    }
    let r = reqwest::Client::new()
        .head(format!("{base}/v2/lib/app/blobs/{blob}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(
        secret.connections.load(Ordering::SeqCst),
        0,
        "the internal service was reached: {:?}",
        secret.paths()
    );

    // A redirect within the registry is followed.
    let (status, body) = get(&format!("{base}/v2/lib/app/manifests/moved")).await;
    assert_eq!((status, body), (200, manifest_body()));
    m.shutdown().await;
}

#[tokio::test]
async fn dot_segments_and_encoded_separators_are_refused_before_reaching_the_registry() {
    let reg = plain_registry().await;
    let m = mirror(|c| c.upstream = Some(reg.url())).await;
    for target in [
        "/v2/_catalog/../../secret",
        "/v2/lib/app/tags/list/../../../../secret",
        "/v2/lib/app/tags/list/../../../../secret?ns=127.0.0.1",
        "/v2/lib/../../secret/tags/list",
        "/v2/./lib/app/tags/list",
        "/v2/lib/app/manifests/../../../../secret",
        "/v2/lib/app/referrers/../../../../secret",
        "/v2/_catalog/%2e%2e/%2e%2e/secret",
        "/v2/_catalog/%2E./%2e%2E/secret",
        "/v2/_catalog/.%2e/.%2E/secret",
        "/v2/lib/app/tags/list/%2e%2e%2f%2e%2e%2f%2e%2e%2fsecret",
        "/v2/lib%2f..%2f..%2fsecret/tags/list",
        "/v2/lib%2Fapp/tags/list",
        "/v2/lib%5c..%5csecret/tags/list",
        "/v2/lib/%2e/tags/list",
        "/v2/lib%252e%252e/tags/list",
    ] {
        let (status, body) = raw_get(m.local_addr(), target).await;
        let (code, _) = oci_error(&body);
        assert_eq!((status, code.as_str()), (400, "NAME_INVALID"), "{target}");
    }
    // Nothing else after an endpoint either.
    for target in [
        "/v2/_catalog/x",
        "/v2/_catalogue",
        "/v2/lib/app/tags/list/x",
    ] {
        let (status, body) = raw_get(m.local_addr(), target).await;
        assert_eq!(
            (status, oci_error(&body).0.as_str()),
            (404, "NOT_FOUND"),
            "{target}"
        );
    }
    assert!(
        reg.paths().is_empty(),
        "reached the registry: {:?}",
        reg.paths()
    );

    // The endpoints themselves still reach it, as the path the mirror rebuilt.
    assert_eq!(
        raw_get(m.local_addr(), "/v2/lib/app/tags/list?n=5").await.0,
        200
    );
    assert_eq!(raw_get(m.local_addr(), "/v2/_catalog").await.0, 200);
    assert_eq!(reg.paths(), ["/v2/lib/app/tags/list?n=5", "/v2/_catalog"]);
    m.shutdown().await;
}

/// Reads until the mirror closes the connection, for at most `limit`: how long that took, and
/// what was read.
async fn until_closed(s: &mut TcpStream, limit: Duration) -> (Duration, Vec<u8>) {
    let start = Instant::now();
    let mut out = Vec::new();
    let mut chunk = [0u8; 1024];
    let closed = tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "connection still open after {limit:?}");
    (start.elapsed(), out)
}

#[tokio::test]
async fn a_connection_stalling_in_its_headers_is_closed_after_header_timeout() {
    let m = mirror(|c| c.header_timeout = Duration::from_secs(1)).await;
    let mut half = TcpStream::connect(m.local_addr()).await.unwrap();
    half.write_all(b"GET /v2/ HTTP/1.1\r\nhost: mirror\r\n")
        .await
        .unwrap();
    let mut idle = TcpStream::connect(m.local_addr()).await.unwrap();
    let (took, _) = until_closed(&mut half, Duration::from_secs(5)).await;
    assert!(took >= Duration::from_millis(900), "closed after {took:?}");
    let (took, _) = until_closed(&mut idle, Duration::from_secs(5)).await;
    assert!(took < Duration::from_secs(5));

    // A client that sends its request in time is served.
    let (status, _) = raw_get(m.local_addr(), "/v2/").await;
    assert_eq!(status, 200);
    m.shutdown().await;
}

#[tokio::test]
async fn connections_over_max_connections_are_answered_429_and_closed() {
    let m = mirror(|c| c.max_connections = 2).await;
    let first = TcpStream::connect(m.local_addr()).await.unwrap();
    let _second = TcpStream::connect(m.local_addr()).await.unwrap();
    let mut third = TcpStream::connect(m.local_addr()).await.unwrap();
    let (_, out) = until_closed(&mut third, Duration::from_secs(5)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 429 "), "{text:?}");
    assert!(text.contains("TOOMANYREQUESTS"), "{text:?}");
    assert_eq!(m.stats().rejected_connections.load(Ordering::Relaxed), 1);

    // A closed connection gives its place back (once the mirror has seen it close).
    drop(first);
    let mut served = false;
    for _ in 0..200 {
        let mut s = TcpStream::connect(m.local_addr()).await.unwrap();
        // A refused connection may be reset before or after the request is written.
        let _ = s
            .write_all(b"GET /v2/ HTTP/1.1\r\nhost: mirror\r\nconnection: close\r\n\r\n")
            .await;
        let (_, out) = until_closed(&mut s, Duration::from_secs(5)).await;
        if out.starts_with(b"HTTP/1.1 200 ") {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(served, "no place freed after a client left");
    m.shutdown().await;
}
