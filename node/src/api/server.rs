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
use crate::content::{ContentError, ListOrder};
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
    kind: ListenerKind,
}

/// What a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ListenerKind {
    /// The API.
    Api,
    /// `metrics_listen`: `/metrics`, `/healthz` and `/readyz` only.
    Scrape,
    /// `ui_listen`: the status page and the read-only JSON it reads, query strings removed.
    Ui,
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
        Ok(ApiListener::new(socket, access, config, ListenerKind::Api))
    }

    /// A listener under the API's connection cap and header timeout.
    fn new(
        socket: Socket,
        access: Option<Arc<Access>>,
        config: &NodeConfig,
        kind: ListenerKind,
    ) -> ApiListener {
        ApiListener {
            socket,
            access,
            header_read_timeout: config.local_api.header_read_timeout,
            max_connections: config
                .local_api
                .max_connections
                .clamp(1, Semaphore::MAX_PERMITS),
            kind,
        }
    }

    /// Binds `addr` for scrapers and probes: read-only routes that reveal no URL, task or peer,
    /// so no token and no `Host` check; the API's connection cap and header timeout apply.
    pub(crate) async fn bind_metrics(
        addr: std::net::SocketAddr,
        config: &NodeConfig,
    ) -> std::io::Result<ApiListener> {
        let socket = Socket::Tcp(TcpListener::bind(addr).await?);
        Ok(ApiListener::new(socket, None, config, ListenerKind::Scrape))
    }

    /// Binds `ui_listen`: the status page, read-only, with the API's `Host`/`Origin` checks and,
    /// unless `ui_public`, the API token (as a bearer token, or as the password of HTTP Basic,
    /// which a browser asks its user for).
    pub(crate) async fn bind_ui(
        addr: std::net::SocketAddr,
        config: &NodeConfig,
    ) -> std::io::Result<ApiListener> {
        let token = if config.ui_public {
            None
        } else {
            let path = config.data_dir.join(TOKEN_FILE);
            let token = ApiToken::load_or_create(&path).map_err(std::io::Error::other)?;
            Some(TokenVerifier::new(&token))
        };
        let socket = Socket::Tcp(TcpListener::bind(addr).await?);
        let access = Arc::new(Access::new(token, &config.local_api.allowed_hosts));
        Ok(ApiListener::new(
            socket,
            Some(access),
            config,
            ListenerKind::Ui,
        ))
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
    let kind = listener.kind;
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
                        let mut resp = refused(r);
                        if kind == ListenerKind::Ui && resp.status() == StatusCode::UNAUTHORIZED {
                            // A browser asks its user for the token (any user name).
                            resp.headers_mut().insert(
                                header::WWW_AUTHENTICATE,
                                header::HeaderValue::from_static(
                                    "Basic realm=\"df status page: the API token is the password\"",
                                ),
                            );
                        }
                        return Ok::<_, Infallible>(resp);
                    }
                    Ok::<_, Infallible>(match kind {
                        ListenerKind::Api => route(node, req, read_timeout).await,
                        ListenerKind::Scrape => scrape_route(node.as_ref(), &req),
                        ListenerKind::Ui => ui_route(node.as_ref(), &req).await,
                    })
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

/// `GET /healthz` and `GET /readyz` answer without checks, for probes (they tell nothing but
/// whether the node is up).
fn is_probe<B>(req: &Request<B>) -> bool {
    req.method() == Method::GET && matches!(req.uri().path(), "/healthz" | "/readyz")
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

/// The status page's files (no build step, no CDN: served from the binary).
const UI_HTML: &str = include_str!("ui/index.html");
const UI_JS: &str = include_str!("ui/ui.js");
const UI_CSS: &str = include_str!("ui/ui.css");

/// A file of the status page, with headers that keep it to itself: scripts and styles from this
/// origin only, requests to this origin only, no framing, nothing cached.
fn ui_file(content_type: &str, body: &'static str) -> Response<Body> {
    let mut r = full(StatusCode::OK, content_type, body);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
             img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        header::HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    r
}

/// The read-only routes the status page uses, shared by the API and `ui_listen`. `None`: not one
/// of them. With `redact`, query strings are removed from URLs (`ui_listen`).
async fn read_only_route(
    node: &dyn NodeApi,
    method: &Method,
    segments: &[&str],
    redact: bool,
) -> Option<Response<Body>> {
    if method != Method::GET {
        return None;
    }
    let info = |key: &TaskKey, p: &crate::task::Progress| {
        let i = TaskInfo::from_progress(key, p);
        if redact { i.redacted() } else { i }
    };
    Some(match segments {
        [""] => ui_file("text/html; charset=utf-8", UI_HTML),
        ["ui.js"] => ui_file("text/javascript; charset=utf-8", UI_JS),
        ["ui.css"] => ui_file("text/css; charset=utf-8", UI_CSS),
        ["v1", "status"] => json(StatusCode::OK, &node.status().await),
        ["v1", "peers"] => json(StatusCode::OK, &node.peers()),
        ["v1", "tasks"] => {
            let list: Vec<TaskInfo> = node.tasks().iter().map(|(k, p)| info(k, p)).collect();
            json(StatusCode::OK, &list)
        }
        ["v1", "tasks", id, rest @ ..] if rest.is_empty() || rest == ["pieces"] => {
            let Ok(key) = id.parse::<TaskKey>() else {
                return Some(error(TaskError::bad_request(format!(
                    "malformed task id {id:?}"
                ))));
            };
            if rest.is_empty() {
                match node.progress(&key).await {
                    Some(p) => json(StatusCode::OK, &info(&key, &p.borrow())),
                    None => not_found("task"),
                }
            } else {
                match node.piece_map(&key).await {
                    Some(pieces) => json(
                        StatusCode::OK,
                        &super::PieceMap {
                            id: key.to_string(),
                            pieces,
                        },
                    ),
                    None => not_found("task"),
                }
            }
        }
        _ => return None,
    })
}

/// The routes of a `ui_listen` listener: the read-only ones, nothing else.
async fn ui_route<B>(node: &dyn NodeApi, req: &Request<B>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segments.as_slice() {
        ["healthz"] if req.method() == Method::GET => full(StatusCode::OK, "text/plain", "ok\n"),
        ["readyz"] if req.method() == Method::GET => readyz(node),
        _ => match read_only_route(node, req.method(), &segments, true).await {
            Some(r) => r,
            None if req.method() == Method::GET => not_found("route"),
            None => full(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "this listener is read-only\n",
            ),
        },
    }
}

/// The routes of a `metrics_listen` listener.
fn scrape_route<B>(node: &dyn NodeApi, req: &Request<B>) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => metrics(node, req),
        (&Method::GET, "/healthz") => full(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::GET, "/readyz") => readyz(node),
        (&Method::GET, _) => not_found("route"),
        _ => full(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "this listener is read-only\n",
        ),
    }
}

fn readyz(node: &dyn NodeApi) -> Response<Body> {
    match node.readiness() {
        Ok(()) => full(StatusCode::OK, "text/plain", "ready\n"),
        Err(why) => full(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            format!("not ready: {why}\n"),
        ),
    }
}

/// `GET /metrics`, in the format the scraper asked for.
fn metrics<B>(node: &dyn NodeApi, req: &Request<B>) -> Response<Body> {
    let openmetrics = req
        .headers()
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let content_type = if openmetrics {
        crate::metrics::OPENMETRICS_CONTENT_TYPE
    } else {
        crate::metrics::TEXT_CONTENT_TYPE
    };
    full(StatusCode::OK, content_type, node.metrics_text(openmetrics))
}

async fn route(
    node: Arc<dyn NodeApi>,
    req: Request<Incoming>,
    read_timeout: Duration,
) -> Response<Body> {
    let path = req.uri().path().to_owned();
    if let Some(r) = read_only_route(
        node.as_ref(),
        req.method(),
        &path.trim_matches('/').split('/').collect::<Vec<_>>(),
        false,
    )
    .await
    {
        return r;
    }
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method().clone(), segments.as_slice()) {
        (Method::GET, ["healthz"]) => full(StatusCode::OK, "text/plain", "ok\n"),
        (Method::GET, ["metrics"]) => metrics(node.as_ref(), &req),
        (Method::GET, ["readyz"]) => readyz(node.as_ref()),
        (Method::POST, ["v1", "tasks"]) => create_task(node, req, read_timeout).await,
        (Method::POST, ["v1", "preheat"]) => create_preheat(node, req, read_timeout).await,
        (Method::GET, ["v1", "preheat", id]) => match node.preheat_job(id) {
            Some(job) => json(StatusCode::OK, &job),
            None => not_found("preheat job"),
        },
        (method, ["v1", "tasks", id, rest @ ..]) => {
            let Ok(key) = id.parse::<TaskKey>() else {
                return error(TaskError::bad_request(format!("malformed task id {id:?}")));
            };
            match (method, rest) {
                (Method::DELETE, []) => {
                    let scope = req.uri().query().and_then(|q| {
                        url::form_urlencoded::parse(q.as_bytes())
                            .find(|(k, _)| k == "scope")
                            .map(|(_, v)| v.into_owned())
                    });
                    match scope.as_deref().map(str::parse::<crate::api::PurgeScope>) {
                        None => match node.delete_task(&key).await {
                            Ok(true) => full(StatusCode::NO_CONTENT, "text/plain", ""),
                            Ok(false) => not_found("task"),
                            Err(e) => error(e),
                        },
                        Some(Ok(scope)) => json(StatusCode::OK, &node.purge(&key, scope).await),
                        Some(Err(e)) => error(TaskError::bad_request(e)),
                    }
                }
                (m @ (Method::GET | Method::HEAD), ["content"]) => {
                    content(node, key, &req, m == Method::HEAD).await
                }
                (Method::GET, ["files"]) => {
                    let order = req.uri().query().and_then(|q| {
                        url::form_urlencoded::parse(q.as_bytes())
                            .find(|(k, _)| k == "order")
                            .map(|(_, v)| v.into_owned())
                    });
                    match order.as_deref() {
                        None | Some("verified") => files(node, key, ListOrder::AsVerified).await,
                        Some("index") => files(node, key, ListOrder::ByIndex).await,
                        Some(o) => error(TaskError::bad_request(format!(
                            "unknown order {o:?} (index, verified)"
                        ))),
                    }
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

/// Reads a JSON request body within [`MAX_REQUEST_BODY`] and `read_timeout`.
async fn read_body(req: Request<Incoming>, read_timeout: Duration) -> Result<Bytes, TaskError> {
    // A body trickled in slowly must not hold the connection longer than slow headers could.
    let read = Limited::new(req.into_body(), MAX_REQUEST_BODY).collect();
    match tokio::time::timeout(read_timeout, read).await {
        Ok(Ok(b)) => Ok(b.to_bytes()),
        Ok(Err(e)) => Err(TaskError::bad_request(format!("reading request body: {e}"))),
        Err(_) => Err(TaskError::bad_request(format!(
            "the request body took longer than {read_timeout:?}"
        ))),
    }
}

async fn create_preheat(
    node: Arc<dyn NodeApi>,
    req: Request<Incoming>,
    read_timeout: Duration,
) -> Response<Body> {
    let body = match read_body(req, read_timeout).await {
        Ok(b) => b,
        Err(e) => return error(e),
    };
    match serde_json::from_slice::<crate::preheat::PreheatRequest>(&body) {
        Ok(r) => match node.preheat(r) {
            Ok(job) => json(StatusCode::ACCEPTED, &job),
            Err(e) => error(e),
        },
        Err(e) => error(TaskError::bad_request(format!(
            "malformed preheat request: {e}"
        ))),
    }
}

async fn create_task(
    node: Arc<dyn NodeApi>,
    req: Request<Incoming>,
    read_timeout: Duration,
) -> Response<Body> {
    let body = match read_body(req, read_timeout).await {
        Ok(b) => b,
        Err(e) => return error(e),
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

/// `GET /v1/tasks/{id}/files`: a JSON line per piece as it becomes readable; a failure ends the
/// listing with a line `{"error": "…"}` (the status line has gone out long before).
/// `?order=index` lists piece 0, 1, 2, … for a reader that writes a stream.
async fn files(node: Arc<dyn NodeApi>, key: TaskKey, order: ListOrder) -> Response<Body> {
    let f = match node.content_files(&key, order).await {
        Ok(f) => f,
        Err(ContentError::UnknownTask) => return not_found("task"),
        Err(ContentError::Task(e)) => return error(e),
        Err(e @ ContentError::RangeNotSatisfiable { .. }) => {
            return error(TaskError::internal(e.to_string()));
        }
    };
    let lines = f.stream.scan(false, |failed, item| {
        if *failed {
            return futures::future::ready(None);
        }
        let mut line = match item {
            Ok(piece) => serde_json::to_vec(&piece).unwrap_or_default(),
            Err(e) => {
                *failed = true;
                serde_json::to_vec(&serde_json::json!({ "error": e.to_string() }))
                    .unwrap_or_default()
            }
        };
        line.push(b'\n');
        futures::future::ready(Some(Ok::<_, std::io::Error>(Frame::data(Bytes::from(
            line,
        )))))
    });
    let mut r = Response::new(BodyExt::boxed_unsync(StreamBody::new(lines)));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/x-ndjson"),
    );
    if let Ok(v) = header::HeaderValue::from_str(&f.content_length.to_string()) {
        h.insert("x-df-content-length", v);
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
        async fn status(&self) -> NodeStatus {
            NodeStatus {
                peer_id: "fake".into(),
                role: Role::Node,
                listen_addrs: Vec::new(),
                data_addr: "127.0.0.1:9".into(),
                connected_peers: 3,
                known_seeds: 1,
                connected_seeds: 1,
                active_tasks: 1,
                bytes: ByteCounters::default(),
                storage: None,
            }
        }
        fn metrics_text(&self, openmetrics: bool) -> String {
            if openmetrics {
                "# TYPE df_fake counter\ndf_fake_total 1\n# EOF\n".into()
            } else {
                "# TYPE df_fake_total counter\ndf_fake_total 1\n".into()
            }
        }
        fn readiness(&self) -> Result<(), String> {
            Ok(())
        }
        fn peers(&self) -> Vec<crate::api::PeerView> {
            Vec::new()
        }
        async fn purge(
            &self,
            _key: &TaskKey,
            _scope: crate::api::PurgeScope,
        ) -> Vec<crate::api::PurgeHost> {
            Vec::new()
        }
        async fn piece_map(&self, key: &TaskKey) -> Option<String> {
            (*key == self.known).then(|| "hs.".to_owned())
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
        async fn content_files(
            &self,
            _key: &TaskKey,
            _order: crate::content::ListOrder,
        ) -> Result<crate::content::PieceFiles, ContentError> {
            Err(ContentError::UnknownTask)
        }
        fn preheat(
            &self,
            _req: crate::preheat::PreheatRequest,
        ) -> Result<crate::preheat::PreheatJob, TaskError> {
            Err(TaskError::NoSource {
                message: "no live seed".into(),
            })
        }
        fn preheat_job(&self, _id: &str) -> Option<crate::preheat::PreheatJob> {
            None
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
