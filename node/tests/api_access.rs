//! The TCP API's guards, against a real node: the bearer token on a non-loopback address, the
//! `Host`, `Origin` and content-type checks, the header timeout and the connection cap.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use df_node::api::Refusal;
use df_node::api::client::{ApiClient, ApiError};
use df_node::api::token::{ApiToken, TOKEN_FILE};
use df_node::origin::{ByteStream, Origin, OriginError, OriginResponse, OriginSpec};
use df_node::{ApiAddr, DownloadRequest, Node, NodeConfig, Role};
use df_protocols::manifest::Validators;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An origin that counts how often it is asked and is never reachable: a request that gets
/// through the API's checks shows up here.
#[derive(Default)]
struct CountingOrigin {
    opened: AtomicUsize,
}

#[async_trait]
impl Origin for CountingOrigin {
    async fn open(
        &self,
        spec: &OriginSpec,
        _first: Range<u64>,
    ) -> Result<OriginResponse, OriginError> {
        self.opened.fetch_add(1, Ordering::SeqCst);
        Err(OriginError::Unreachable {
            url: spec.url.to_string(),
            reason: "test origin".into(),
        })
    }

    async fn range(
        &self,
        spec: &OriginSpec,
        _range: Range<u64>,
        _content_length: u64,
        _validators: &Validators,
    ) -> Result<ByteStream, OriginError> {
        Err(OriginError::Unreachable {
            url: spec.url.to_string(),
            reason: "test origin".into(),
        })
    }
}

struct TestApi {
    node: Node,
    origin: Arc<CountingOrigin>,
    /// Where to connect (127.0.0.1 and the API's port).
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl TestApi {
    async fn start(api: &str, tweak: impl FnOnce(&mut NodeConfig)) -> TestApi {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = NodeConfig::local(dir.path(), Role::Node);
        cfg.api = Some(api.parse().unwrap());
        tweak(&mut cfg);
        let origin = Arc::new(CountingOrigin::default());
        let node = Node::start(cfg, origin.clone()).await.unwrap();
        let ApiAddr::Tcp(bound) = node.api_addr() else {
            panic!("not a TCP API")
        };
        TestApi {
            node,
            origin,
            addr: SocketAddr::from(([127, 0, 0, 1], bound.port())),
            dir,
        }
    }

    fn host(&self) -> String {
        self.addr.to_string()
    }

    fn client(&self) -> ApiClient {
        ApiClient::new(ApiAddr::Tcp(self.addr))
    }

    fn token(&self) -> ApiToken {
        ApiToken::read(&self.dir.path().join(TOKEN_FILE)).unwrap()
    }
}

/// An answer read to the end: status, head, body.
struct Answer {
    status: u16,
    head: String,
    body: String,
}

/// Sends `request` (it should say `Connection: close`) and reads the answer to its end.
async fn raw(addr: SocketAddr, request: &str) -> Answer {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("the API did not answer")
        .unwrap();
    parse(&buf)
}

fn parse(buf: &[u8]) -> Answer {
    let text = String::from_utf8_lossy(buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    Answer {
        status,
        head: head.to_ascii_lowercase(),
        body: body.to_owned(),
    }
}

/// A request with `headers` (each `Name: value`) and an optional body.
fn request(method: &str, path: &str, headers: &[String], body: &str) -> String {
    let mut r = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    for h in headers {
        r.push_str(h);
        r.push_str("\r\n");
    }
    if !body.is_empty() || method == "POST" {
        r.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    r.push_str("\r\n");
    r.push_str(body);
    r
}

fn error_code(a: &Answer) -> String {
    let v: serde_json::Value =
        serde_json::from_str(&a.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", a.body));
    v["error"]["code"].as_str().unwrap_or_default().to_owned()
}

const TASK: &str = r#"{"url": "http://127.0.0.1:1/secret"}"#;

#[tokio::test(flavor = "multi_thread")]
async fn non_loopback_api_requires_its_token() {
    // Bound to every address: not loopback, even when reached through 127.0.0.1.
    let api = TestApi::start("0.0.0.0:0", |_| {}).await;
    let path = api.dir.path().join(TOKEN_FILE);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "token file mode {mode:o}");
    }
    let token = api.token();
    let host = format!("Host: {}", api.host());

    let none = raw(
        api.addr,
        &request("GET", "/v1/tasks", std::slice::from_ref(&host), ""),
    )
    .await;
    assert_eq!(none.status, 401, "{}", none.body);
    assert_eq!(error_code(&none), "unauthorized");
    assert!(
        none.head.contains("www-authenticate: bearer"),
        "{}",
        none.head
    );

    let wrong = raw(
        api.addr,
        &request(
            "GET",
            "/v1/tasks",
            &[
                host.clone(),
                format!("Authorization: Bearer {}x", token.as_str()),
            ],
            "",
        ),
    )
    .await;
    assert_eq!(wrong.status, 401);
    assert_eq!(error_code(&wrong), "unauthorized");

    let bearer = format!("Authorization: Bearer {}", token.as_str());
    let right = raw(
        api.addr,
        &request("GET", "/v1/tasks", &[host.clone(), bearer.clone()], ""),
    )
    .await;
    assert_eq!(right.status, 200, "{}", right.body);

    // Writes without the token never reach the origin (no SSRF) nor the store.
    let post = raw(
        api.addr,
        &request(
            "POST",
            "/v1/tasks",
            &[host.clone(), "Content-Type: application/json".into()],
            TASK,
        ),
    )
    .await;
    assert_eq!(post.status, 401);
    let task: DownloadRequest = serde_json::from_str(TASK).unwrap();
    let key = &task.task_key().unwrap().to_string();
    let delete = raw(
        api.addr,
        &request(
            "DELETE",
            &format!("/v1/tasks/{key}"),
            std::slice::from_ref(&host),
            "",
        ),
    )
    .await;
    assert_eq!(delete.status, 401);
    assert_eq!(api.origin.opened.load(Ordering::SeqCst), 0);

    // The token does not lift the Host check.
    let rebound = raw(
        api.addr,
        &request(
            "GET",
            "/v1/tasks",
            &[format!("Host: evil.example:{}", api.addr.port()), bearer],
            "",
        ),
    )
    .await;
    assert_eq!(rebound.status, 403);

    // Probes need nothing.
    let health = raw(api.addr, &request("GET", "/healthz", &[], "")).await;
    assert_eq!(health.status, 200);

    // The client: refused without the token, served with it.
    match api.client().status().await {
        Err(ApiError::Refused(Refusal::Unauthorized { .. })) => {}
        other => panic!("expected a refusal, got {other:?}"),
    }
    let client = api.client().with_token(Some(token.clone()));
    assert_eq!(
        client.status().await.unwrap().peer_id,
        api.node.peer_id().to_string()
    );
    assert!(!client.delete_task(key).await.unwrap());
    let e = client.create_task(&task).await.unwrap_err();
    assert!(matches!(e, ApiError::Task(_)), "{e:?}");
    assert_eq!(api.origin.opened.load(Ordering::SeqCst), 1);

    api.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn loopback_api_refuses_foreign_hosts_origins_and_form_posts() {
    let api = TestApi::start("127.0.0.1:0", |_| {}).await;
    assert!(
        !api.dir.path().join(TOKEN_FILE).exists(),
        "a loopback API needs no token"
    );
    let host = format!("Host: {}", api.host());
    let json = "Content-Type: application/json".to_owned();

    let ok = raw(
        api.addr,
        &request("GET", "/v1/status", std::slice::from_ref(&host), ""),
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    let localhost = raw(
        api.addr,
        &request(
            "GET",
            "/v1/status",
            &[format!("Host: localhost:{}", api.addr.port())],
            "",
        ),
    )
    .await;
    assert_eq!(localhost.status, 200);

    // DNS rebinding: the page's host name arrives in Host.
    for bad in [
        format!("Host: evil.example:{}", api.addr.port()),
        "Host: evil.example".into(),
        format!("Host: 127.0.0.1:{}", api.addr.port() ^ 1),
    ] {
        let a = raw(
            api.addr,
            &request("GET", "/v1/tasks", std::slice::from_ref(&bad), ""),
        )
        .await;
        assert_eq!(a.status, 403, "{bad}: {}", a.body);
        assert_eq!(error_code(&a), "forbidden");
    }

    // A foreign page's fetch carries its Origin.
    let foreign = raw(
        api.addr,
        &request(
            "POST",
            "/v1/tasks",
            &[
                host.clone(),
                json.clone(),
                "Origin: http://evil.example".into(),
            ],
            TASK,
        ),
    )
    .await;
    assert_eq!(foreign.status, 403, "{}", foreign.body);
    let delete = raw(
        api.addr,
        &request(
            "DELETE",
            &format!(
                "/v1/tasks/{}",
                serde_json::from_str::<DownloadRequest>(TASK)
                    .unwrap()
                    .task_key()
                    .unwrap()
            ),
            &[host.clone(), "Origin: http://evil.example".into()],
            "",
        ),
    )
    .await;
    assert_eq!(delete.status, 403);

    // A cross-site form posts text/plain (no preflight): refused even with a JSON body.
    for ct in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ] {
        let form = raw(
            api.addr,
            &request(
                "POST",
                "/v1/tasks",
                &[host.clone(), format!("Content-Type: {ct}")],
                TASK,
            ),
        )
        .await;
        assert_eq!(form.status, 415, "{ct}: {}", form.body);
        assert_eq!(error_code(&form), "unsupported_media_type");
    }
    assert_eq!(
        api.origin.opened.load(Ordering::SeqCst),
        0,
        "a refused request reached the origin"
    );

    // The API's own origin and a JSON body get through (to the unreachable origin).
    let own = raw(
        api.addr,
        &request(
            "POST",
            "/v1/tasks",
            &[
                host.clone(),
                json.clone(),
                format!("Origin: http://{}", api.host()),
            ],
            TASK,
        ),
    )
    .await;
    assert_eq!(own.status, 502, "{}", own.body);
    assert_eq!(api.origin.opened.load(Ordering::SeqCst), 1);

    // Probes need no Host check.
    let probe = raw(
        api.addr,
        &request(
            "GET",
            "/healthz",
            &[format!("Host: evil.example:{}", api.addr.port())],
            "",
        ),
    )
    .await;
    assert_eq!(probe.status, 200);
    // The client names the listener as the checks want.
    assert!(api.client().status().await.is_ok());
    api.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn allowed_host_names_pass_the_host_check() {
    let api = TestApi::start("127.0.0.1:0", |c| {
        c.local_api.allowed_hosts = vec!["df.internal".into()];
    })
    .await;
    let port = api.addr.port();
    let a = raw(
        api.addr,
        &request(
            "GET",
            "/v1/status",
            &[format!("Host: DF.internal:{port}")],
            "",
        ),
    )
    .await;
    assert_eq!(a.status, 200);
    let b = raw(
        api.addr,
        &request(
            "GET",
            "/v1/status",
            &[format!("Host: other.internal:{port}")],
            "",
        ),
    )
    .await;
    assert_eq!(b.status, 403);
    api.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn half_sent_headers_are_cut_off() {
    let timeout = Duration::from_millis(300);
    let api = TestApi::start("127.0.0.1:0", |c| {
        c.local_api.header_read_timeout = timeout;
    })
    .await;
    let mut s = TcpStream::connect(api.addr).await.unwrap();
    let started = Instant::now();
    s.write_all(format!("GET /v1/status HTTP/1.1\r\nHost: {}\r\n", api.host()).as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    assert!(
        closed.is_ok(),
        "a connection with half-sent headers stayed open"
    );
    assert!(started.elapsed() >= timeout, "closed before the timeout");
    assert!(
        !String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"),
        "answered a half-sent request"
    );
    // Whole requests are still served.
    let ok = raw(
        api.addr,
        &request("GET", "/v1/status", &[format!("Host: {}", api.host())], ""),
    )
    .await;
    assert_eq!(ok.status, 200);
    api.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_beyond_the_cap_are_answered_503() {
    let api = TestApi::start("127.0.0.1:0", |c| {
        c.local_api.max_connections = 1;
    })
    .await;
    // One kept-alive connection, known to be served (so it holds the only slot).
    let mut held = TcpStream::connect(api.addr).await.unwrap();
    held.write_all(format!("GET /healthz HTTP/1.1\r\nHost: {}\r\n\r\n", api.host()).as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    while !String::from_utf8_lossy(&got).ends_with("ok\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), held.read(&mut chunk))
            .await
            .expect("no answer")
            .unwrap();
        assert!(n > 0, "closed early");
        got.extend_from_slice(&chunk[..n]);
    }

    // The next one is answered 503 at once and closed, without sending anything.
    let mut extra = TcpStream::connect(api.addr).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), extra.read_to_end(&mut buf))
        .await
        .expect("an excess connection stayed open")
        .unwrap();
    let a = parse(&buf);
    assert_eq!(a.status, 503);
    assert_eq!(error_code(&a), "unavailable");

    // Closing the held connection frees its slot (once the server has seen it close).
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = request("GET", "/v1/status", &[format!("Host: {}", api.host())], "");
    loop {
        let mut s = TcpStream::connect(api.addr).await.unwrap();
        let mut buf = Vec::new();
        // A refused connection may be reset under the request it did not read: try again.
        let answered = match s.write_all(status.as_bytes()).await {
            Ok(()) => tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
                .await
                .expect("no answer")
                .is_ok(),
            Err(_) => false,
        };
        if answered && buf.starts_with(b"HTTP/1.1 200") {
            break;
        }
        assert!(
            !answered || buf.is_empty() || buf.starts_with(b"HTTP/1.1 503"),
            "unexpected {:?}",
            String::from_utf8_lossy(&buf)
        );
        assert!(Instant::now() < deadline, "the slot was never freed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    api.node.shutdown().await;
}
