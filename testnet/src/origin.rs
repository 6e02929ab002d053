//! A local HTTP origin for tests and benchmarks: serves in-memory files with Range, ETag and
//! Last-Modified, counts the body bytes it sends, and can misbehave on request (fixed error
//! statuses, no range support, a bandwidth limit, bodies cut off mid-way).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

type Body = BoxBody<Bytes, std::io::Error>;

#[derive(Default)]
struct State {
    files: HashMap<String, Bytes>,
    statuses: HashMap<String, u16>,
    no_ranges: bool,
    /// Bytes per second per response; 0 = unlimited.
    rate: u64,
    required_header: Option<(String, String)>,
    /// No ETag or Last-Modified in answers.
    no_validators: bool,
    /// (path, after this many requests for it, new content).
    replace: Option<(String, u64, Bytes)>,
    served: HashMap<String, u64>,
    /// (path, body bytes, answers left): that many answers for `path` longer than the given
    /// bytes end after them with a broken connection.
    cut: Option<(String, u64, u32)>,
}

/// A running test origin; stops when dropped.
pub struct TestOrigin {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    sent: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl Drop for TestOrigin {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl TestOrigin {
    /// Starts an origin on 127.0.0.1 with an ephemeral port.
    pub async fn start() -> std::io::Result<TestOrigin> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let sent = Arc::new(AtomicU64::new(0));
        let requests = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let (st, se, rq, sp) = (state.clone(), sent.clone(), requests.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = sp.cancelled() => break,
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                };
                let (st, se, rq, sp) = (st.clone(), se.clone(), rq.clone(), sp.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let (st, se, rq) = (st.clone(), se.clone(), rq.clone());
                        async move { Ok::<_, Infallible>(handle(req, st, se, rq)) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc);
                    tokio::select! {
                        _ = sp.cancelled() => {}
                        _ = conn => {}
                    }
                });
            }
        });
        Ok(TestOrigin {
            addr,
            state,
            sent,
            requests,
            stop,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL of `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Serves `data` at `path`.
    pub fn put(&self, path: &str, data: impl Into<Bytes>) {
        if let Ok(mut s) = self.state.lock() {
            s.files.insert(path.to_owned(), data.into());
        }
    }

    /// Answers every request for `path` with `status`.
    pub fn fail(&self, path: &str, status: u16) {
        if let Ok(mut s) = self.state.lock() {
            s.statuses.insert(path.to_owned(), status);
        }
    }

    /// Ignore Range headers (answer 200 with the whole file).
    pub fn disable_ranges(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.no_ranges = true;
        }
    }

    /// Limits every response to `bytes_per_sec`.
    pub fn set_rate(&self, bytes_per_sec: u64) {
        if let Ok(mut s) = self.state.lock() {
            s.rate = bytes_per_sec;
        }
    }

    /// Answers 401 unless the request carries header `name: value`.
    pub fn require_header(&self, name: &str, value: &str) {
        if let Ok(mut s) = self.state.lock() {
            s.required_header = Some((name.to_owned(), value.to_owned()));
        }
    }

    /// Body bytes sent so far.
    pub fn bytes_sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Answers without ETag and Last-Modified (so range requests cannot name a version).
    pub fn drop_validators(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.no_validators = true;
        }
    }

    /// Replaces `path`'s content once `after` requests for it have been answered.
    pub fn replace_after(&self, path: &str, after: u64, data: impl Into<Bytes>) {
        if let Ok(mut s) = self.state.lock() {
            s.replace = Some((path.to_owned(), after, data.into()));
        }
    }

    /// Breaks the connection of the next `times` answers for `path` after `bytes` body bytes
    /// (answers no longer than that are whole).
    pub fn cut_after(&self, path: &str, bytes: u64, times: u32) {
        if let Ok(mut s) = self.state.lock() {
            s.cut = Some((path.to_owned(), bytes, times));
        }
    }

    /// Cut-off answers still to give (see [`TestOrigin::cut_after`]).
    pub fn cuts_left(&self) -> u32 {
        self.state
            .lock()
            .ok()
            .and_then(|s| s.cut.as_ref().map(|c| c.2))
            .unwrap_or(0)
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

fn simple(status: StatusCode) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::new()).map_err(|n| match n {}).boxed());
    *r.status_mut() = status;
    r
}

fn handle(
    req: Request<hyper::body::Incoming>,
    state: Arc<Mutex<State>>,
    sent: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
) -> Response<Body> {
    requests.fetch_add(1, Ordering::Relaxed);
    let path = req.uri().path().to_owned();
    let (data, status, no_ranges, rate, required, no_validators, cut) = {
        let Ok(mut s) = state.lock() else {
            return simple(StatusCode::INTERNAL_SERVER_ERROR);
        };
        let n = {
            let n = s.served.entry(path.clone()).or_insert(0);
            *n += 1;
            *n
        };
        if let Some((p, after, _)) = &s.replace
            && *p == path
            && n > *after
            && let Some((p, _, data)) = s.replace.take()
        {
            s.files.insert(p, data);
        }
        let cut = match &mut s.cut {
            Some((p, bytes, times)) if *p == path && *times > 0 => Some((*bytes, times)),
            _ => None,
        }
        .map(|(bytes, times)| {
            // Decided below, once the answer's length is known; undone if it is not cut.
            *times -= 1;
            bytes
        });
        (
            s.files.get(&path).cloned(),
            s.statuses.get(&path).copied(),
            s.no_ranges,
            s.rate,
            s.required_header.clone(),
            s.no_validators,
            cut,
        )
    };
    if let Some(st) = status {
        return simple(StatusCode::from_u16(st).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR));
    }
    if let Some((k, v)) = required
        && req.headers().get(&k).and_then(|h| h.to_str().ok()) != Some(v.as_str())
    {
        return simple(StatusCode::UNAUTHORIZED);
    }
    let Some(data) = data else {
        return simple(StatusCode::NOT_FOUND);
    };
    let len = data.len() as u64;
    let etag = format!("\"{:x}-{len}\"", fxhash(&data));
    let range = if no_ranges {
        None
    } else {
        req.headers()
            .get(header::RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("bytes="))
            .and_then(|v| v.split_once('-'))
            .map(|(a, b)| (a.parse::<u64>().ok(), b.parse::<u64>().ok()))
    };
    let if_range_ok = req
        .headers()
        .get(header::IF_RANGE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| v == etag);
    let (status, start, end) = match range {
        Some((Some(a), b)) if if_range_ok => {
            if a >= len {
                let mut r = simple(StatusCode::RANGE_NOT_SATISFIABLE);
                if let Ok(v) = header::HeaderValue::from_str(&format!("bytes */{len}")) {
                    r.headers_mut().insert(header::CONTENT_RANGE, v);
                }
                return r;
            }
            let end = b.map(|b| (b + 1).min(len)).unwrap_or(len);
            (StatusCode::PARTIAL_CONTENT, a, end)
        }
        _ => (StatusCode::OK, 0, len),
    };
    let mut body_bytes = data.slice(start as usize..end as usize);
    let cut = match cut {
        Some(n) if n < body_bytes.len() as u64 => {
            body_bytes.truncate(n as usize);
            true
        }
        Some(_) => {
            if let Ok(mut s) = state.lock()
                && let Some((_, _, times)) = &mut s.cut
            {
                *times += 1;
            }
            false
        }
        None => false,
    };
    let body: Body = if rate == 0 && !cut {
        sent.fetch_add(body_bytes.len() as u64, Ordering::Relaxed);
        Full::new(body_bytes).map_err(|n| match n {}).boxed()
    } else {
        // 64 KiB chunks, paced to the rate; bytes are counted as they go out; a cut answer ends
        // with an error (hyper then closes the connection mid-body).
        let chunk = 64 << 10;
        let stream = futures::stream::unfold(Some((body_bytes, sent)), move |state| async move {
            let (rest, sent) = state?;
            if rest.is_empty() {
                if !cut {
                    return None;
                }
                // Pending for a moment, so that hyper flushes what it holds before the break.
                tokio::time::sleep(Duration::from_millis(20)).await;
                let e = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "cut");
                return Some((Err(e), None));
            }
            let n = chunk.min(rest.len());
            if rate > 0 {
                tokio::time::sleep(Duration::from_secs_f64(n as f64 / rate as f64)).await;
            }
            sent.fetch_add(n as u64, Ordering::Relaxed);
            let c = rest.slice(..n);
            Some((Ok(Frame::data(c)), Some((rest.slice(n..), sent))))
        });
        StreamBody::new(stream).boxed()
    };
    let mut r = Response::new(body);
    *r.status_mut() = status;
    let h = r.headers_mut();
    let mut set = |k: header::HeaderName, v: String| {
        if let Ok(v) = header::HeaderValue::from_str(&v) {
            h.insert(k, v);
        }
    };
    set(header::CONTENT_LENGTH, (end - start).to_string());
    if !no_validators {
        set(header::ETAG, etag);
        set(
            header::LAST_MODIFIED,
            "Wed, 21 Oct 2015 07:28:00 GMT".into(),
        );
    }
    if !no_ranges {
        set(header::ACCEPT_RANGES, "bytes".into());
    }
    if status == StatusCode::PARTIAL_CONTENT {
        set(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{len}", end.saturating_sub(1)),
        );
    }
    r
}

/// A cheap content fingerprint for ETags.
fn fxhash(d: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for chunk in d.chunks(4096).step_by(16).take(4096) {
        for &b in chunk.iter().take(64) {
            h = (h ^ u64::from(b)).wrapping_mul(0x100000001b3);
        }
    }
    h ^ d.len() as u64
}
