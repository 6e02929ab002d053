//! The API server (routes in the [module docs](super)).

use std::convert::Infallible;
use std::path::PathBuf;

use bytes::Bytes;
use df_protocols::task::TaskKey;
use futures::StreamExt;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;

use super::{ErrorBody, TaskInfo};
use crate::config::ApiAddr;
use crate::content::ContentError;
use crate::node::Node;
use crate::task::{DownloadRequest, TaskError};

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

const MAX_REQUEST_BODY: usize = 1 << 20;

/// A bound API listener.
pub(crate) enum ApiListener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl ApiListener {
    pub(crate) async fn bind(addr: &ApiAddr) -> std::io::Result<ApiListener> {
        match addr {
            ApiAddr::Tcp(a) => Ok(ApiListener::Tcp(TcpListener::bind(a).await?)),
            ApiAddr::Unix(path) => {
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
                Ok(ApiListener::Unix(l, path.clone()))
            }
        }
    }

    pub(crate) fn local_addr(&self) -> ApiAddr {
        match self {
            ApiListener::Tcp(l) => l
                .local_addr()
                .map(ApiAddr::Tcp)
                .unwrap_or_else(|_| ApiAddr::Tcp(([127, 0, 0, 1], 0).into())),
            ApiListener::Unix(_, p) => ApiAddr::Unix(p.clone()),
        }
    }
}

/// Serves the API until `shutdown`.
pub(crate) async fn serve(listener: ApiListener, node: Node, shutdown: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = async {
                match &listener {
                    ApiListener::Tcp(l) => l.accept().await.map(|(s, _)| Either::Tcp(s)),
                    ApiListener::Unix(l, _) => l.accept().await.map(|(s, _)| Either::Unix(s)),
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
        let node = node.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let node = node.clone();
                async move { Ok::<_, Infallible>(route(node, req).await) }
            });
            let conn = async {
                let r = match stream {
                    Either::Tcp(s) => {
                        hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(s), svc)
                            .await
                    }
                    Either::Unix(s) => {
                        hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(s), svc)
                            .await
                    }
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

async fn route(node: Node, req: Request<Incoming>) -> Response<Body> {
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
        (Method::POST, ["v1", "tasks"]) => create_task(node, req).await,
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

async fn create_task(node: Node, req: Request<Incoming>) -> Response<Body> {
    let body = match Limited::new(req.into_body(), MAX_REQUEST_BODY)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => return error(TaskError::bad_request(format!("reading request body: {e}"))),
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
        Ok((key, _)) => match node.progress(&key).await {
            Some(p) => json(StatusCode::OK, &TaskInfo::from_progress(&key, &p.borrow())),
            None => error(TaskError::internal("task vanished")),
        },
        Err(e) => error(e),
    }
}

async fn content(
    node: Node,
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
