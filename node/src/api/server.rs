//! The API server (routes in the [module docs](super)).

use std::convert::Infallible;
use std::ops::Range;
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
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{ErrorBody, TaskInfo};
use crate::config::ApiAddr;
use crate::node::Node;
use crate::task::{DownloadRequest, Phase, Progress, TaskError};

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
        Ok((key, _)) => match node.progress(&key).await {
            Some(p) => json(StatusCode::OK, &TaskInfo::from_progress(&key, &p.borrow())),
            None => error(TaskError::internal("task vanished")),
        },
        Err(e) => error(e),
    }
}

/// Parses a single `bytes=` range against a content length. `Ok(None)`: no (usable) Range header.
fn parse_range(h: Option<&header::HeaderValue>, len: u64) -> Result<Option<Range<u64>>, ()> {
    let Some(v) = h.and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    let Some(spec) = v.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        // Multiple ranges: serve the whole content, as RFC 9110 allows.
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (a, b) = (a.trim(), b.trim());
    let range = if a.is_empty() {
        let n: u64 = b.parse().map_err(|_| ())?;
        if n == 0 {
            return Err(());
        }
        len.saturating_sub(n)..len
    } else {
        let start: u64 = a.parse().map_err(|_| ())?;
        let end = if b.is_empty() {
            len
        } else {
            b.parse::<u64>().map_err(|_| ())?.saturating_add(1).min(len)
        };
        if start >= len || start >= end {
            return Err(());
        }
        start..end
    };
    Ok(Some(range))
}

async fn content(
    node: Node,
    key: TaskKey,
    req: &Request<Incoming>,
    head_only: bool,
) -> Response<Body> {
    let Some(mut progress) = node.progress(&key).await else {
        return not_found("task");
    };
    // Wait for the header (the task may still be starting).
    let header = loop {
        let p = progress.borrow().clone();
        if let Phase::Failed(e) = p.phase {
            return error(e);
        }
        if let Some(h) = p.header {
            break h;
        }
        if progress.changed().await.is_err() {
            return error(TaskError::internal("task stopped before it started"));
        }
    };
    let len = header.header.content_length;
    let (status, range) = match parse_range(req.headers().get(header::RANGE), len) {
        Ok(None) => (StatusCode::OK, 0..len),
        Ok(Some(r)) => (StatusCode::PARTIAL_CONTENT, r),
        Err(()) => {
            let mut r = full(StatusCode::RANGE_NOT_SATISFIABLE, "text/plain", "");
            if let Ok(v) = header::HeaderValue::from_str(&format!("bytes */{len}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return r;
        }
    };
    let body: Body = if head_only {
        Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed_unsync()
    } else {
        let gate_last = key.content_digest().is_some() || header.header.content_digest.is_some();
        content_stream(
            node,
            key,
            progress,
            header.header.layout(),
            range.clone(),
            gate_last,
        )
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

struct StreamState {
    node: Node,
    key: TaskKey,
    progress: watch::Receiver<Progress>,
    layout: df_protocols::piece::PieceLayout,
    offset: u64,
    end: u64,
    /// Hold the last piece back until the whole-content digest has been verified.
    gate_last: bool,
    done: bool,
}

/// Waits until piece `index` may be sent; `Err` when the task failed or stopped.
async fn wait_for_piece(st: &mut StreamState, index: u32) -> Result<(), std::io::Error> {
    let last = st.layout.piece_count().saturating_sub(1);
    loop {
        {
            let p = st.progress.borrow();
            if let Phase::Failed(e) = &p.phase {
                return Err(std::io::Error::other(e.to_string()));
            }
            let complete = p.phase == Phase::Complete;
            if p.have.get(index) && (!st.gate_last || index != last || complete) {
                return Ok(());
            }
        }
        if st.progress.changed().await.is_err() {
            let p = st.progress.borrow();
            if p.phase == Phase::Complete {
                return Ok(());
            }
            return Err(std::io::Error::other(match &p.phase {
                Phase::Failed(e) => e.to_string(),
                _ => "task stopped".to_owned(),
            }));
        }
    }
}

async fn next_chunk(
    mut st: StreamState,
) -> Option<(Result<Frame<Bytes>, std::io::Error>, StreamState)> {
    if st.done || st.offset >= st.end {
        return None;
    }
    let index = st.layout.piece_at(st.offset);
    if let Err(e) = wait_for_piece(&mut st, index).await {
        st.done = true;
        return Some((Err(e), st));
    }
    let store = st.node.store().clone();
    let key = st.key;
    let piece = tokio::task::spawn_blocking(move || store.piece(&key, index)).await;
    let piece = match piece {
        Ok(Ok(Some(p))) => Bytes::from(p),
        Ok(Ok(None)) => {
            st.done = true;
            return Some((
                Err(std::io::Error::other(format!(
                    "piece {index} missing from the store"
                ))),
                st,
            ));
        }
        Ok(Err(e)) => {
            st.done = true;
            return Some((Err(std::io::Error::other(e.to_string())), st));
        }
        Err(e) => {
            st.done = true;
            return Some((Err(std::io::Error::other(e.to_string())), st));
        }
    };
    let pr = st.layout.piece_range(index);
    let from = (st.offset - pr.start) as usize;
    let to = (st.end.min(pr.end) - pr.start) as usize;
    if to > piece.len() || from > to {
        st.done = true;
        return Some((
            Err(std::io::Error::other(format!(
                "piece {index} has the wrong length"
            ))),
            st,
        ));
    }
    st.offset += (to - from) as u64;
    Some((Ok(Frame::data(piece.slice(from..to))), st))
}

fn content_stream(
    node: Node,
    key: TaskKey,
    progress: watch::Receiver<Progress>,
    layout: df_protocols::piece::PieceLayout,
    range: Range<u64>,
    gate_last: bool,
) -> Body {
    let st = StreamState {
        node,
        key,
        progress,
        layout,
        offset: range.start,
        end: range.end,
        gate_last,
        done: false,
    };
    let stream = futures::stream::unfold(st, next_chunk).boxed();
    BodyExt::boxed_unsync(StreamBody::new(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hv(s: &str) -> header::HeaderValue {
        header::HeaderValue::from_str(s).unwrap()
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 10), Ok(None));
        assert_eq!(parse_range(Some(&hv("bytes=0-4")), 10), Ok(Some(0..5)));
        assert_eq!(parse_range(Some(&hv("bytes=5-")), 10), Ok(Some(5..10)));
        assert_eq!(parse_range(Some(&hv("bytes=-3")), 10), Ok(Some(7..10)));
        assert_eq!(parse_range(Some(&hv("bytes=8-100")), 10), Ok(Some(8..10)));
        assert_eq!(parse_range(Some(&hv("bytes=10-")), 10), Err(()));
        assert_eq!(parse_range(Some(&hv("bytes=5-2")), 10), Err(()));
        assert_eq!(parse_range(Some(&hv("bytes=x-2")), 10), Err(()));
        assert_eq!(parse_range(Some(&hv("bytes=0-1,4-5")), 10), Ok(None));
        assert_eq!(parse_range(Some(&hv("items=0-1")), 10), Ok(None));
    }
}
