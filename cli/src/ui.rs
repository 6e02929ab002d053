//! `df ui`: the node's status page in a local browser when its API is a unix socket. A loopback
//! port relays the page's read-only requests to the API, and nothing else: only `GET` of the
//! page's files and JSON, only with a `Host` naming the port (a DNS-rebinding page arrives with
//! its own name), query strings dropped.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use df_node::api::client::ApiClient;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

type Body = UnsyncBoxBody<Bytes, hyper::Error>;

/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 32;
/// A browser must send a request's headers within this long.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether `path` is one the status page reads.
pub(crate) fn page_path(path: &str) -> bool {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segments.as_slice() {
        [""] | ["ui.js"] | ["ui.css"] | ["healthz"] | ["readyz"] => true,
        ["v1", "status"] | ["v1", "peers"] | ["v1", "tasks"] => true,
        ["v1", "tasks", id] | ["v1", "tasks", id, "pieces"] => {
            !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric())
        }
        _ => false,
    }
}

/// Whether `host` (a `Host` header) names the relay's own address.
pub(crate) fn names_relay(host: &str, local: SocketAddr) -> bool {
    let port = local.port();
    host == format!("127.0.0.1:{port}") || host == format!("localhost:{port}")
}

fn plain(status: StatusCode, text: &str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(text.to_owned()))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn relay(api: &ApiClient, req: Request<Incoming>, local: SocketAddr) -> Response<Body> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !names_relay(host, local) {
        return plain(
            StatusCode::FORBIDDEN,
            &format!("open http://{local}/ (Host {host:?} does not name this page)\n"),
        );
    }
    if req.method() != Method::GET {
        return plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "the status page is read-only\n",
        );
    }
    let path = req.uri().path();
    if !page_path(path) {
        return plain(StatusCode::NOT_FOUND, "not a page of the status page\n");
    }
    match api.get_raw(path).await {
        Ok(resp) => resp.map(BodyExt::boxed_unsync),
        Err(e) => plain(
            StatusCode::BAD_GATEWAY,
            &format!("the node's API did not answer: {e}\n"),
        ),
    }
}

/// Serves the relay on `listen` until interrupted.
pub(crate) async fn run(api: ApiClient, listen: SocketAddr) -> Result<()> {
    if !listen.ip().is_loopback() {
        anyhow::bail!(
            "df ui listens on loopback only (it relays the API's socket); for remote viewing run \
             the node with --ui-listen"
        );
    }
    api.healthz()
        .await
        .with_context(|| format!("the node's API at {} does not answer", api.addr()))?;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let local = listener.local_addr()?;
    println!("df status page: http://{local}/ (Ctrl-C to stop)");
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = slots.clone().acquire_owned().await?;
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let api = api.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = service_fn(move |req| {
                let api = api.clone();
                async move { Ok::<_, Infallible>(relay(&api, req, local).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_pages_reads_are_relayed() {
        for ok in [
            "/",
            "/ui.js",
            "/ui.css",
            "/v1/status",
            "/v1/peers",
            "/v1/tasks",
            "/v1/tasks/bafk2bzaceabc",
            "/v1/tasks/bafk2bzaceabc/pieces",
            "/readyz",
        ] {
            assert!(page_path(ok), "{ok}");
        }
        for bad in [
            "/v1/tasks/bafk/content",
            "/v1/tasks/../status",
            "/v1/tasks//pieces",
            "/metrics",
            "/v2/",
            "/ui.js/x",
        ] {
            assert!(!page_path(bad), "{bad}");
        }
    }

    #[test]
    fn host_must_name_the_relay() {
        let local: SocketAddr = "127.0.0.1:7777".parse().unwrap();
        assert!(names_relay("127.0.0.1:7777", local));
        assert!(names_relay("localhost:7777", local));
        assert!(!names_relay("evil.example:7777", local));
        assert!(!names_relay("127.0.0.1:7778", local));
        assert!(!names_relay("", local));
    }
}
