//! A client of the local API, for front ends (the CLI, the registry mirror, tests).

use std::ops::Range;
use std::pin::Pin;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, BodyStream, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::token::ApiToken;
use super::{ErrorBody, NodeStatus, Refusal, RefusalBody, TaskInfo};
use crate::config::ApiAddr;
use crate::content::{ListOrder, PieceFile};
use crate::task::{DownloadRequest, TaskError};

/// Errors talking to the local API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot reach the df API at {addr}: {source}")]
    Unreachable {
        addr: String,
        source: std::io::Error,
    },
    /// The node answered with a task error.
    #[error("{0}")]
    Task(TaskError),
    /// The node refused the request (missing or wrong token, foreign `Host` or `Origin`, …).
    #[error("the df API refused the request: {0}")]
    Refused(Refusal),
    #[error("the df API answered {status}: {body}")]
    Http { status: StatusCode, body: String },
    #[error("talking to the df API failed: {0}")]
    Protocol(String),
}

/// A stream of content bytes.
pub type ContentStream = Pin<Box<dyn Stream<Item = Result<Bytes, ApiError>> + Send>>;

/// Client of one node's API. Each call opens its own connection.
#[derive(Debug, Clone)]
pub struct ApiClient {
    addr: ApiAddr,
    token: Option<ApiToken>,
}

impl ApiClient {
    pub fn new(addr: ApiAddr) -> ApiClient {
        ApiClient { addr, token: None }
    }

    /// Sends `Authorization: Bearer <token>` with every request (needed by a TCP API on a
    /// non-loopback address).
    pub fn with_token(mut self, token: Option<ApiToken>) -> ApiClient {
        self.token = token;
        self
    }

    pub fn addr(&self) -> &ApiAddr {
        &self.addr
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        headers: &[(header::HeaderName, String)],
    ) -> Result<http::Response<Incoming>, ApiError> {
        let unreachable = |e: std::io::Error| ApiError::Unreachable {
            addr: self.addr.to_string(),
            source: e,
        };
        let proto = |e: hyper::Error| ApiError::Protocol(e.to_string());
        // `Host` names the address the connection reached, as the server checks it.
        let build = |host: String| {
            let mut builder = Request::builder()
                .method(method)
                .uri(path)
                .header(header::HOST, host);
            for (k, v) in headers {
                builder = builder.header(k, v);
            }
            if let Some(t) = &self.token {
                builder = builder.header(header::AUTHORIZATION, format!("Bearer {}", t.as_str()));
            }
            if body.is_some() {
                builder = builder.header(header::CONTENT_TYPE, "application/json");
            }
            builder
                .body(Full::new(Bytes::from(body.unwrap_or_default())))
                .map_err(|e| ApiError::Protocol(e.to_string()))
        };
        match &self.addr {
            ApiAddr::Tcp(a) => {
                let s = tokio::net::TcpStream::connect(a)
                    .await
                    .map_err(unreachable)?;
                let host = s.peer_addr().unwrap_or(*a).to_string();
                let req = build(host)?;
                let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
                    .await
                    .map_err(proto)?;
                tokio::spawn(conn);
                send.send_request(req).await.map_err(proto)
            }
            ApiAddr::Unix(p) => {
                let s = tokio::net::UnixStream::connect(p)
                    .await
                    .map_err(unreachable)?;
                let req = build("df".to_owned())?;
                let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
                    .await
                    .map_err(proto)?;
                tokio::spawn(conn);
                send.send_request(req).await.map_err(proto)
            }
        }
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ApiError> {
        let resp = self.send(method, path, body, &[]).await?;
        let status = resp.status();
        let bytes = body_bytes(resp).await?;
        if !status.is_success() {
            return Err(error_from(status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|e| ApiError::Protocol(e.to_string()))
    }

    /// `GET path`, the answer as it came (for a front end that relays it, e.g. `df ui`).
    pub async fn get_raw(&self, path: &str) -> Result<http::Response<Incoming>, ApiError> {
        self.send(Method::GET, path, None, &[]).await
    }

    /// `GET /healthz` (answered without token or `Host` checks).
    pub async fn healthz(&self) -> Result<(), ApiError> {
        let resp = self.send(Method::GET, "/healthz", None, &[]).await?;
        if resp.status() == StatusCode::OK {
            Ok(())
        } else {
            Err(ApiError::Http {
                status: resp.status(),
                body: String::new(),
            })
        }
    }

    /// `DELETE /v1/tasks/{id}?scope=…`: a purge here and on other members, one line per host.
    pub async fn purge(
        &self,
        id: &str,
        scope: crate::api::PurgeScope,
    ) -> Result<Vec<super::PurgeHost>, ApiError> {
        let scope = match scope {
            crate::api::PurgeScope::Local => "local",
            crate::api::PurgeScope::AllSeeds => "all_seeds",
            crate::api::PurgeScope::AllPeers => "all_peers",
        };
        self.json(
            Method::DELETE,
            &format!("/v1/tasks/{id}?scope={scope}"),
            None,
        )
        .await
    }

    /// `DELETE /v1/tasks/{id}`: evicts a finished task; false when the node did not have it.
    pub async fn delete_task(&self, id: &str) -> Result<bool, ApiError> {
        let resp = self
            .send(Method::DELETE, &format!("/v1/tasks/{id}"), None, &[])
            .await?;
        let status = resp.status();
        if status == StatusCode::NO_CONTENT {
            return Ok(true);
        }
        let bytes = body_bytes(resp).await?;
        match error_from(status, &bytes) {
            ApiError::Task(TaskError::NotFound { .. }) => Ok(false),
            e => Err(e),
        }
    }

    /// `GET /v1/status` as raw JSON (printed by `df status`).
    pub async fn status_json(&self) -> Result<serde_json::Value, ApiError> {
        self.json(Method::GET, "/v1/status", None).await
    }

    /// `GET /v1/status`.
    pub async fn status(&self) -> Result<NodeStatus, ApiError> {
        self.json(Method::GET, "/v1/status", None).await
    }

    /// `POST /v1/tasks`: starts or joins a download.
    pub async fn create_task(&self, req: &DownloadRequest) -> Result<TaskInfo, ApiError> {
        let body = serde_json::to_vec(req).map_err(|e| ApiError::Protocol(e.to_string()))?;
        self.json(Method::POST, "/v1/tasks", Some(body)).await
    }

    /// `POST /v1/preheat`: starts a preheat job.
    pub async fn preheat(
        &self,
        req: &crate::preheat::PreheatRequest,
    ) -> Result<crate::preheat::PreheatJob, ApiError> {
        let body = serde_json::to_vec(req).map_err(|e| ApiError::Protocol(e.to_string()))?;
        self.json(Method::POST, "/v1/preheat", Some(body)).await
    }

    /// `GET /v1/preheat/{id}`.
    pub async fn preheat_job(&self, id: &str) -> Result<crate::preheat::PreheatJob, ApiError> {
        self.json(Method::GET, &format!("/v1/preheat/{id}"), None)
            .await
    }

    /// `GET /v1/tasks/{id}`.
    pub async fn task(&self, id: &str) -> Result<TaskInfo, ApiError> {
        self.json(Method::GET, &format!("/v1/tasks/{id}"), None)
            .await
    }

    /// Why a task's content stream broke: waits (up to `within`) until the task has failed or
    /// completed and returns its error, if it failed. A stream also breaks when the content
    /// failed its digest and the task started over without that producer; the task's final
    /// outcome is then the answer.
    pub async fn failure(&self, id: &str, within: std::time::Duration) -> Option<TaskError> {
        let deadline = tokio::time::Instant::now() + within;
        let mut pause = std::time::Duration::from_millis(20);
        loop {
            let info = self.task(id).await.ok()?;
            if info.error.is_some() || info.state == "complete" {
                return info.error;
            }
            if tokio::time::Instant::now() + pause > deadline {
                return None;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(std::time::Duration::from_millis(500));
        }
    }

    /// `GET /v1/tasks/{id}/content`: the content (or `range` of it), streamed in order.
    /// Returns the number of bytes to expect and the stream.
    pub async fn content(
        &self,
        id: &str,
        range: Option<Range<u64>>,
    ) -> Result<(u64, ContentStream), ApiError> {
        let mut headers = Vec::new();
        if let Some(r) = &range {
            headers.push((
                header::RANGE,
                format!("bytes={}-{}", r.start, r.end.saturating_sub(1)),
            ));
        }
        let resp = self
            .send(
                Method::GET,
                &format!("/v1/tasks/{id}/content"),
                None,
                &headers,
            )
            .await?;
        let status = resp.status();
        if !status.is_success() {
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| ApiError::Protocol(e.to_string()))?
                .to_bytes();
            return Err(error_from(status, &bytes));
        }
        let len = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| ApiError::Protocol("content response without a length".into()))?;
        let stream = BodyStream::new(resp.into_body()).filter_map(|frame| async move {
            match frame {
                Ok(f) => f.into_data().ok().map(Ok),
                Err(e) => Some(Err(ApiError::Protocol(format!(
                    "content stream broken: {e}"
                )))),
            }
        });
        Ok((len, Box::pin(stream)))
    }

    /// `GET /v1/tasks/{id}/files`: the task's pieces as they are verified (or in index order),
    /// each with the file holding it (see [`PieceFile`]). Returns the content length and the
    /// listing; a node without the route answers [`ApiError::Http`] 404 or 405.
    pub async fn content_files(
        &self,
        id: &str,
        order: ListOrder,
    ) -> Result<(u64, PieceFileStream), ApiError> {
        let query = match order {
            ListOrder::AsVerified => "",
            ListOrder::ByIndex => "?order=index",
        };
        let resp = self
            .send(
                Method::GET,
                &format!("/v1/tasks/{id}/files{query}"),
                None,
                &[],
            )
            .await?;
        let status = resp.status();
        if !status.is_success() {
            let bytes = body_bytes(resp).await?;
            return Err(error_from(status, &bytes));
        }
        let len = resp
            .headers()
            .get("x-df-content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| ApiError::Protocol("piece listing without a content length".into()))?;
        let lines = LineReader {
            body: BodyStream::new(resp.into_body()),
            buf: Vec::new(),
            done: false,
        };
        Ok((
            len,
            Box::pin(futures::stream::unfold(lines, next_piece_file)),
        ))
    }
}

/// The pieces of a task as `GET /v1/tasks/{id}/files` lists them.
pub type PieceFileStream = Pin<Box<dyn Stream<Item = Result<PieceFile, ApiError>> + Send>>;

/// Longest listing line accepted (a line is a piece's index, offset, length and path).
const MAX_LINE: usize = 16 << 10;

struct LineReader {
    body: BodyStream<Incoming>,
    buf: Vec<u8>,
    done: bool,
}

async fn next_piece_file(mut r: LineReader) -> Option<(Result<PieceFile, ApiError>, LineReader)> {
    if r.done {
        return None;
    }
    let fail = |mut r: LineReader, msg: String| {
        r.done = true;
        Some((Err(ApiError::Protocol(msg)), r))
    };
    loop {
        if let Some(end) = r.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = r.buf.drain(..=end).collect();
            let line = &line[..end];
            if let Ok(p) = serde_json::from_slice::<PieceFile>(line) {
                return Some((Ok(p), r));
            }
            #[derive(serde::Deserialize)]
            struct Failed {
                error: String,
            }
            return match serde_json::from_slice::<Failed>(line) {
                Ok(f) => fail(r, f.error),
                Err(e) => fail(r, format!("malformed piece listing line: {e}")),
            };
        }
        if r.buf.len() > MAX_LINE {
            return fail(
                r,
                format!("a piece listing line longer than {MAX_LINE} bytes"),
            );
        }
        match r.body.next().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    r.buf.extend_from_slice(&data);
                }
            }
            Some(Err(e)) => return fail(r, format!("piece listing broken: {e}")),
            None if r.buf.is_empty() => return None,
            None => return fail(r, "piece listing ended mid-line".to_owned()),
        }
    }
}

fn error_from(status: StatusCode, body: &[u8]) -> ApiError {
    if let Ok(e) = serde_json::from_slice::<ErrorBody>(body) {
        return ApiError::Task(e.error);
    }
    if let Ok(r) = serde_json::from_slice::<RefusalBody>(body) {
        return ApiError::Refused(r.error);
    }
    ApiError::Http {
        status,
        body: String::from_utf8_lossy(body).chars().take(500).collect(),
    }
}
/// The whole body of a (small, JSON) API answer.
async fn body_bytes(resp: http::Response<Incoming>) -> Result<Bytes, ApiError> {
    Ok(resp
        .into_body()
        .collect()
        .await
        .map_err(|e| ApiError::Protocol(e.to_string()))?
        .to_bytes())
}
