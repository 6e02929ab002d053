//! The API server (routes in the [module docs](super)).

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use df_protocols::task::TaskKey;
use futures::StreamExt;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::access::Access;
use super::token::{ApiToken, TOKEN_FILE, TokenVerifier};
use super::{ErrorBody, NodeApi, Refusal, RefusalBody, TaskInfo};
use crate::config::{ApiAddr, NodeConfig};
use crate::content::ContentError;
use crate::task::{DownloadRequest, TaskError};

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

const MAX_REQUEST_BODY: usize = 1 << 20;

/// A bound API listener, with the policy its connections are served under.
pub(crate) struct ApiListener {
    socket: Socket,
    /// The TCP checks; `None` on the unix socket.
    access: Option<Arc<Access>>,
    header_read_timeout: Duration,
    max_connections: usize,
}

enum Socket {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl ApiListener {
    /// Binds `config`'s API address. A TCP address that is not loopback gets the bearer token of
    /// `<data_dir>/api-token`, created if missing.
    pub(crate) async fn bind_config(config: &NodeConfig) -> std::io::Result<ApiListener> {
        let socket = match config.api_addr() {
            ApiAddr::Tcp(a) => Socket::Tcp(TcpListener::bind(a).await?),
            ApiAddr::Unix(path) => Socket::Unix(bind_unix(&path).await?, path),
        };
        let access = match &socket {
            Socket::Unix(..) => None,
            Socket::Tcp(l) => {
                let ip = l.local_addr()?.ip().to_canonical();
                let token = if ip.is_loopback() {
                    None
                } else {
                    let path = config.data_dir.join(TOKEN_FILE);
                    let token = ApiToken::load_or_create(&path).map_err(std::io::Error::other)?;
                    tracing::info!(%ip, token_file = %path.display(), "the API is not on loopback: requests need its bearer token");
                    Some(TokenVerifier::new(&token))
                };
                Some(Arc::new(Access::new(
                    token,
                    &config.local_api.allowed_hosts,
                )))
            }
        };
        Ok(ApiListener {
            socket,
            access,
            header_read_timeout: config.local_api.header_read_timeout,
            max_connections: config
                .local_api
                .max_connections
                .clamp(1, Semaphore::MAX_PERMITS),
        })
    }

    pub(crate) fn local_addr(&self) -> ApiAddr {
        match &self.socket {
            Socket::Tcp(l) => l
                .local_addr()
                .map(ApiAddr::Tcp)
                .unwrap_or_else(|_| ApiAddr::Tcp(([127, 0, 0, 1], 0).into())),
            Socket::Unix(_, p) => ApiAddr::Unix(p.clone()),
        }
    }
}

async fn bind_unix(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another df node is already listening on this socket",
            ));
        }
        std::fs::remove_file(path)?;
    }
    let l = UnixListener::bind(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(l)
}

/// Serves the API until `shutdown`: at most `max_connections` connections at once (more are
/// answered 503 and closed), each closed when a request's headers take longer than
/// `header_read_timeout`.
pub(crate) async fn serve(
    listener: ApiListener,
    node: Arc<dyn NodeApi>,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(listener.max_connections));
    let read_timeout = listener.header_read_timeout;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = async {
                match &listener.socket {
                    Socket::Tcp(l) => l.accept().await.map(|(s, _)| Either::Tcp(s)),
                    Socket::Unix(l, _) => l.accept().await.map(|(s, _)| Either::Unix(s)),
                }
            } => a,
        };
        let stream = match accepted {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "API accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!("too many API connections: answering 503");
            stream.refuse_busy();
            continue;
        };
        // The TCP checks need the address this connection reached.
        let access = match (&listener.access, &stream) {
            (Some(a), Either::Tcp(s)) => match s.local_addr() {
                Ok(local) => Some((a.clone(), local)),
                Err(e) => {
                    tracing::debug!(error = %e, "API connection without a local address");
                    continue;
                }
            },
            _ => None,
        };
        let node = node.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = service_fn(move |req| {
                let node = node.clone();
                let access = access.clone();
                async move {
                    if let Some((a, local)) = &access
                        && !is_probe(&req)
                        && let Err(r) = a.check(&req, *local)
                    {
                        return Ok::<_, Infallible>(refused(r));
                    }
                    Ok::<_, Infallible>(route(node, req, read_timeout).await)
                }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(read_timeout);
            let conn = async {
                let r = match stream {
                    Either::Tcp(s) => builder.serve_connection(TokioIo::new(s), svc).await,
                    Either::Unix(s) => builder.serve_connection(TokioIo::new(s), svc).await,
                };
                if let Err(e) = r {
                    tracing::debug!(error = %e, "API connection ended");
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = conn => {}
            }
        });
    }
}

enum Either {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl Either {
    /// Answers 503 without waiting (a fresh socket's send buffer takes it), then closes.
    fn refuse_busy(self) {
        let body = serde_json::to_string(&RefusalBody {
            error: Refusal::Unavailable {
                message: "too many API connections".into(),
            },
        })
        .unwrap_or_default();
        let answer = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = match &self {
            Either::Tcp(s) => s.try_write(answer.as_bytes()),
            Either::Unix(s) => s.try_write(answer.as_bytes()),
        };
    }
}

/// `GET /healthz` answers without checks, for probes.
fn is_probe<B>(req: &Request<B>) -> bool {
    req.method() == Method::GET && req.uri().path() == "/healthz"
}

fn refused(r: Refusal) -> Response<Body> {
    let mut resp = json(r.status(), &RefusalBody { error: r });
    if resp.status() == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
    }
    resp
}

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    if let Ok(v) = header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

fn json<T: serde::Serialize>(status: StatusCode, v: &T) -> Response<Body> {
    match serde_json::to_vec(v) {
        Ok(b) => full(status, "application/json", b),
        Err(e) => full(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            e.to_string(),
        ),
    }
}

fn error_status(e: &TaskError) -> StatusCode {
    match e {
        TaskError::BadRequest { .. } => StatusCode::BAD_REQUEST,
        TaskError::OriginStatus { .. }
        | TaskError::OriginUnreachable { .. }
        | TaskError::OriginFailed { .. } => StatusCode::BAD_GATEWAY,
        TaskError::ContentChanged { .. } | TaskError::DigestMismatch { .. } => StatusCode::CONFLICT,
        TaskError::NoSource { .. } | TaskError::NotFound { .. } => StatusCode::NOT_FOUND,
        TaskError::NoSpace { .. } => StatusCode::INSUFFICIENT_STORAGE,
        TaskError::Storage { .. } | TaskError::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn error(e: TaskError) -> Response<Body> {
    json(error_status(&e), &ErrorBody { error: e })
}

fn not_found(what: &str) -> Response<Body> {
    error(TaskError::NotFound {
        message: format!("{what} not found"),
    })
}

async fn route(
    node: Arc<dyn NodeApi>,
    req: Request<Incoming>,
    read_timeout: Duration,
) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method().clone(), segments.as_slice()) {
        (Method::GET, ["healthz"]) => full(StatusCode::OK, "text/plain", "ok\n"),
        (Method::GET, ["metrics"]) => full(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            node.metrics_text(),
        ),
        (Method::GET, ["v1", "status"]) => json(StatusCode::OK, &node.status()),
        (Method::GET, ["v1", "tasks"]) => {
            let list: Vec<TaskInfo> = node
                .tasks()
                .iter()
                .map(|(k, p)| TaskInfo::from_progress(k, p))
                .collect();
            json(StatusCode::OK, &list)
        }
        (Method::POST, ["v1", "tasks"]) => create_task(node, req, read_timeout).await,
        (method, ["v1", "tasks", id, rest @ ..]) => {
            let Ok(key) = id.parse::<TaskKey>() else {
                return error(TaskError::bad_request(format!("malformed task id {id:?}")));
            };
            match (method, rest) {
                (Method::GET, []) => match node.progress(&key).await {
                    Some(p) => json(StatusCode::OK, &TaskInfo::from_progress(&key, &p.borrow())),
                    None => not_found("task"),
                },
                (Method::DELETE, []) => match node.delete_task(&key).await {
                    Ok(true) => full(StatusCode::NO_CONTENT, "text/plain", ""),
                    Ok(false) => not_found("task"),
                    Err(e) => error(e),
                },
                (m @ (Method::GET | Method::HEAD), ["content"]) => {
                    content(node, key, &req, m == Method::HEAD).await
                }
                _ => full(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "text/plain",
                    "method not allowed\n",
                ),
            }
        }
        _ => not_found("route"),
    }
}

async fn create_task(
    node: Arc<dyn NodeApi>,
    req: Request<Incoming>,
    read_timeout: Duration,
) -> Response<Body> {
    // A body trickled in slowly must not hold the connection longer than slow headers could.
    let read = Limited::new(req.into_body(), MAX_REQUEST_BODY).collect();
    let body = match tokio::time::timeout(read_timeout, read).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) => return error(TaskError::bad_request(format!("reading request body: {e}"))),
        Err(_) => {
            return error(TaskError::bad_request(format!(
                "the request body took longer than {read_timeout:?}"
            )));
        }
    };
    let dl: DownloadRequest = match serde_json::from_slice(&body) {
        Ok(d) => d,
        Err(e) => {
            return error(TaskError::bad_request(format!(
                "malformed task request: {e}"
            )));
        }
    };
    match node.download(dl).await {
        // The runner publishes its progress before it answers, so the header is in it.
        Ok(key) => match node.progress(&key).await {
            Some(p) => json(StatusCode::OK, &TaskInfo::from_progress(&key, &p.borrow())),
            None => error(TaskError::internal("task vanished")),
        },
        Err(e) => error(e),
    }
}

async fn content(
    node: Arc<dyn NodeApi>,
    key: TaskKey,
    req: &Request<Incoming>,
    head_only: bool,
) -> Response<Body> {
    let range = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok());
    let c = match node.content(&key, range).await {
        Ok(c) => c,
        Err(ContentError::UnknownTask) => return not_found("task"),
        Err(ContentError::Task(e)) => return error(e),
        Err(ContentError::RangeNotSatisfiable { content_length }) => {
            let mut r = full(StatusCode::RANGE_NOT_SATISFIABLE, "text/plain", "");
            if let Ok(v) = header::HeaderValue::from_str(&format!("bytes */{content_length}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return r;
        }
    };
    let (len, range) = (c.content_length, c.range.clone());
    let status = if c.partial {
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    };
    let body: Body = if head_only {
        Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed_unsync()
    } else {
        BodyExt::boxed_unsync(StreamBody::new(c.stream.map(|r| r.map(Frame::data))))
    };
    let mut r = Response::new(body);
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(
        header::ACCEPT_RANGES,
        header::HeaderValue::from_static("bytes"),
    );
    if let Ok(v) = header::HeaderValue::from_str(&(range.end - range.start).to_string()) {
        h.insert(header::CONTENT_LENGTH, v);
    }
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) = header::HeaderValue::from_str(&format!(
            "bytes {}-{}/{len}",
            range.start,
            range.end.saturating_sub(1)
        ))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    if let Ok(v) = header::HeaderValue::from_str(&key.to_string()) {
        h.insert("x-df-task", v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::NodeStatus;
    use crate::api::client::{ApiClient, ApiError};
    use crate::config::Role;
    use crate::metrics::ByteCounters;
    use crate::task::Progress;
    use df_protocols::task::{canonical_url, parse_url};
    use tokio::sync::watch;

    fn key(url: &str) -> TaskKey {
        TaskKey::for_url(&canonical_url(&parse_url(url).unwrap(), &[]), "")
    }

    /// An API backend with no node behind it: one task it knows, downloads refused.
    struct Fake {
        known: TaskKey,
        progress: watch::Sender<Progress>,
    }

    #[async_trait::async_trait]
    impl NodeApi for Fake {
        fn status(&self) -> NodeStatus {
            NodeStatus {
                peer_id: "fake".into(),
                role: Role::Node,
                listen_addrs: Vec::new(),
                data_addr: "127.0.0.1:9".into(),
                connected_peers: 3,
                known_seeds: 1,
                active_tasks: 1,
                bytes: ByteCounters::default(),
            }
        }
        fn metrics_text(&self) -> String {
            "df_fake_total 1\n".into()
        }
        fn tasks(&self) -> Vec<(TaskKey, Progress)> {
            vec![(self.known, self.progress.borrow().clone())]
        }
        async fn progress(&self, key: &TaskKey) -> Option<watch::Receiver<Progress>> {
            (*key == self.known).then(|| self.progress.subscribe())
        }
        async fn download(&self, _req: DownloadRequest) -> Result<TaskKey, TaskError> {
            Err(TaskError::bad_request("this backend refuses downloads"))
        }
        async fn delete_task(&self, key: &TaskKey) -> Result<bool, TaskError> {
            if *key == self.known {
                Err(TaskError::bad_request("task is in progress"))
            } else {
                Ok(false)
            }
        }
        async fn content(
            &self,
            _key: &TaskKey,
            _range: Option<&str>,
        ) -> Result<crate::content::Content, ContentError> {
            Err(ContentError::UnknownTask)
        }
    }

    #[tokio::test]
    async fn the_api_serves_any_backend_and_maps_its_answers() {
        let dir = tempfile::tempdir().unwrap();
        let config = NodeConfig {
            data_dir: dir.path().into(),
            api: Some(ApiAddr::Tcp("127.0.0.1:0".parse().unwrap())),
            ..NodeConfig::default()
        };
        let listener = ApiListener::bind_config(&config).await.unwrap();
        let client = ApiClient::new(listener.local_addr());
        let known = key("http://127.0.0.1:9/known");
        let other = key("http://127.0.0.1:9/other");
        let (progress, _) = watch::channel(Progress::starting());
        let shutdown = CancellationToken::new();
        tokio::spawn(serve(
            listener,
            Arc::new(Fake { known, progress }),
            shutdown.clone(),
        ));

        assert_eq!(client.status().await.unwrap().connected_peers, 3);
        assert_eq!(
            client.task(&known.to_string()).await.unwrap().state,
            "starting"
        );
        assert!(matches!(
            client.task(&other.to_string()).await,
            Err(ApiError::Task(TaskError::NotFound { .. }))
        ));
        match client.task("not-a-cid").await {
            Err(ApiError::Task(TaskError::BadRequest { message })) => {
                assert!(message.contains("malformed task id"), "{message}")
            }
            r => panic!("a malformed id answered {r:?}"),
        }
        let req = DownloadRequest {
            url: "http://127.0.0.1:9/x".into(),
            ..DownloadRequest::default()
        };
        match client.create_task(&req).await {
            Err(ApiError::Task(TaskError::BadRequest { message })) => {
                assert_eq!(message, "this backend refuses downloads")
            }
            r => panic!("a refused download answered {r:?}"),
        }
        assert!(matches!(
            client.delete_task(&known.to_string()).await,
            Err(ApiError::Task(TaskError::BadRequest { .. }))
        ));
        assert!(!client.delete_task(&other.to_string()).await.unwrap());
        shutdown.cancel();
    }
}
