//! The mirror's HTTP server and its request handlers.

use std::convert::Infallible;
use std::error::Error as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use df_node::origin::Requester;
use df_node::{ContentError, DownloadRequest, TaskError};
use df_protocols::task::ContentDigest;
use futures::StreamExt;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::cache::{CacheKey, CachedManifest, ManifestCache};
use crate::config::MirrorConfig;
use crate::oci::{ErrorCode, OciError, Reference, Route, parse_path};
use crate::source::BlobSource;
use crate::upstream::{self, GuardedResolver, InternalOnly};

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

const API_VERSION: HeaderName = HeaderName::from_static("docker-distribution-api-version");
const CONTENT_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");
/// Upstream response headers relayed to the client.
const RELAYED: [HeaderName; 7] = [
    header::CONTENT_TYPE,
    header::CONTENT_LENGTH,
    CONTENT_DIGEST,
    header::ETAG,
    header::WWW_AUTHENTICATE,
    header::LINK,
    header::LAST_MODIFIED,
];
/// The largest upstream error body relayed.
const MAX_ERROR_BODY: usize = 64 << 10;

/// Errors starting the mirror.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("the mirror has no listen address")]
    NoListen,
    #[error("the mirror's header_timeout must be more than zero")]
    ZeroHeaderTimeout,
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("building the registry client failed: {0}")]
    Client(#[from] reqwest::Error),
    #[error(transparent)]
    CaBundle(#[from] df_node::http_client::HttpClientError),
}

/// Counters of what the mirror has done since it started.
#[derive(Debug, Default)]
pub struct MirrorStats {
    pub requests: AtomicU64,
    pub manifests_from_cache: AtomicU64,
    pub manifests_from_upstream: AtomicU64,
    /// Manifests served from the swarm because the registry could not be reached (a preheated
    /// image pulls with its registry down).
    pub manifests_from_swarm: AtomicU64,
    pub blobs_served: AtomicU64,
    pub blob_bytes_sent: AtomicU64,
    pub rejected_busy: AtomicU64,
    /// Connections closed at once because `max_connections` were open.
    pub rejected_connections: AtomicU64,
}

/// A running mirror. Dropping it does not stop it; call [`Mirror::shutdown`].
pub struct Mirror {
    addr: SocketAddr,
    stats: Arc<MirrorStats>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

struct Ctx {
    cfg: MirrorConfig,
    source: Arc<dyn BlobSource>,
    client: reqwest::Client,
    cache: ManifestCache,
    limit: Arc<Semaphore>,
    stats: Arc<MirrorStats>,
}

impl Mirror {
    /// Binds `cfg.listen` and serves the registry API, fetching blobs through `source`.
    pub async fn start(
        cfg: MirrorConfig,
        source: Arc<dyn BlobSource>,
    ) -> Result<Mirror, MirrorError> {
        let addr = cfg.listen.ok_or(MirrorError::NoListen)?;
        if cfg.header_timeout.is_zero() {
            return Err(MirrorError::ZeroHeaderTimeout);
        }
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| MirrorError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| MirrorError::Bind { addr, source })?;
        let client = df_node::http_client::client_builder(&cfg.ca_bundle, cfg.insecure)?
            .user_agent(concat!("df-mirror/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(cfg.connect_timeout)
            .timeout(cfg.request_timeout)
            .redirect(upstream::redirect_policy())
            .dns_resolver(GuardedResolver::new(&cfg))
            .build()?;
        let stats = Arc::new(MirrorStats::default());
        let ctx = Arc::new(Ctx {
            cache: ManifestCache::new(cfg.manifest_cache.as_u64()),
            limit: Arc::new(Semaphore::new(cfg.max_concurrent_requests.max(1))),
            cfg,
            source,
            client,
            stats: stats.clone(),
        });
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(listener, ctx, shutdown.clone()));
        tracing::info!(%addr, "registry mirror listening");
        Ok(Mirror {
            addr,
            stats,
            shutdown,
            task,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stats(&self) -> &MirrorStats {
        &self.stats
    }

    /// Stops accepting and closes open connections.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

async fn serve(listener: TcpListener, ctx: Arc<Ctx>, shutdown: CancellationToken) {
    let connections = Arc::new(Semaphore::new(ctx.cfg.max_connections.max(1)));
    let busy = busy_response();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "mirror accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            ctx.stats
                .rejected_connections
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, "mirror connection refused: max_connections open");
            // Best effort, without waiting: a fresh socket's send buffer takes this whole.
            let _ = stream.try_write(&busy);
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve_connection(
            stream,
            ctx.clone(),
            shutdown.clone(),
            permit,
        ));
    }
}

/// Serves one client connection; `_permit` is its place among `max_connections`.
async fn serve_connection(
    stream: TcpStream,
    ctx: Arc<Ctx>,
    shutdown: CancellationToken,
    _permit: tokio::sync::OwnedSemaphorePermit,
) {
    let header_timeout = ctx.cfg.header_timeout;
    let svc = service_fn(move |req: Request<Incoming>| {
        let ctx = ctx.clone();
        async move {
            let (method, path) = (req.method().clone(), req.uri().path().to_owned());
            let auth = req.headers().contains_key(header::AUTHORIZATION);
            let resp = handle(ctx, req).await;
            tracing::debug!(%method, %path, auth, status = resp.status().as_u16(), "mirror request");
            Ok::<_, Infallible>(resp)
        }
    });
    // The header timeout also runs while a kept-alive connection waits for its next request, so
    // idle and trickling connections give their place back.
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(stream), svc);
    tokio::select! {
        _ = shutdown.cancelled() => {}
        r = conn => if let Err(e) = r {
            tracing::debug!(error = %e, "mirror connection ended");
        }
    }
}

/// The whole HTTP response sent to a connection over `max_connections` before closing it.
fn busy_response() -> Bytes {
    let body = OciError::new(
        ErrorCode::TooManyRequests,
        "mirror has too many connections open, retry later",
    )
    .body();
    Bytes::from(format!(
        "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         docker-distribution-api-version: registry/2.0\r\nconnection: close\r\n\r\n{body}",
        body.len()
    ))
}

fn empty() -> Body {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn respond(status: StatusCode, headers: HeaderMap, body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    *r.headers_mut() = headers;
    r.headers_mut()
        .insert(API_VERSION, HeaderValue::from_static("registry/2.0"));
    r
}

fn oci_error(e: &OciError, head: bool) -> Response<Body> {
    let body = e.body();
    let mut h = HeaderMap::new();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    respond(e.status, h, if head { empty() } else { full(body) })
}

fn query_param<'a>(req: &'a Request<Incoming>, name: &str) -> Option<String> {
    let q: &'a str = req.uri().query()?;
    url::form_urlencoded::parse(q.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

async fn handle(ctx: Arc<Ctx>, req: Request<Incoming>) -> Response<Body> {
    ctx.stats.requests.fetch_add(1, Ordering::Relaxed);
    let head = req.method() == Method::HEAD;
    let route = match parse_path(req.uri().path()) {
        Ok(Some(r)) => r,
        Ok(None) => {
            ctx.source.answered("other", 404);
            return oci_error(
                &OciError::new(ErrorCode::NotFound, "not a registry API path"),
                head,
            );
        }
        Err(e) => {
            let r = oci_error(&e, head);
            ctx.source.answered("other", r.status().as_u16());
            return r;
        }
    };
    let label = route.label();
    let resp = handle_route(&ctx, req, route, head).await;
    ctx.source.answered(label, resp.status().as_u16());
    resp
}

async fn handle_route(
    ctx: &Arc<Ctx>,
    req: Request<Incoming>,
    route: Route,
    head: bool,
) -> Response<Body> {
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        return oci_error(
            &OciError::new(
                ErrorCode::Unsupported,
                "this is a pull-through mirror: pushes and deletes are not supported",
            ),
            head,
        );
    }
    let Ok(permit) = ctx.limit.clone().try_acquire_owned() else {
        ctx.stats.rejected_busy.fetch_add(1, Ordering::Relaxed);
        return oci_error(
            &OciError::new(ErrorCode::TooManyRequests, "mirror busy, retry later"),
            head,
        );
    };
    let ns = query_param(&req, "ns");
    let upstream = resolve(&ctx.cfg, ns.as_deref());
    let resp = match (route, upstream) {
        (Route::Upload, _) => oci_error(
            &OciError::new(
                ErrorCode::Unsupported,
                "this mirror does not accept uploads",
            ),
            head,
        ),
        (Route::Base, Err(_)) => base_ok(),
        (Route::Base, Ok(u)) => base(ctx, &req, &u).await,
        (_, Err(e)) => oci_error(&e, head),
        (Route::Manifest { name, reference }, Ok(u)) => {
            manifest(ctx, &req, &u, &name, &reference, head).await
        }
        (Route::Blob { name, digest }, Ok(u)) => {
            return blob(ctx, &req, &u, &name, digest, head, permit).await;
        }
        (r @ (Route::Tags { .. } | Route::Referrers { .. } | Route::Catalog), Ok(u)) => {
            passthrough(ctx, &req, &u, &r, head).await
        }
    };
    drop(permit);
    resp
}

/// The registry a request goes to.
struct Upstream {
    /// Base URL without a trailing slash.
    base: String,
}

impl Upstream {
    fn new(u: &url::Url) -> Upstream {
        Upstream {
            base: u.as_str().trim_end_matches('/').to_owned(),
        }
    }
}

/// `HOST[:PORT]` of a URL, as containerd's `?ns=` names it (no port when it is the default).
fn authority(u: &url::Url) -> Option<String> {
    let host = u.host_str()?;
    Some(match u.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_owned(),
    })
}

/// The registry for a request: `upstream` without `?ns=`, else the mapped registry (or
/// `upstream` when `ns` names it). An unmapped host is refused unless `allow_unmapped`.
fn resolve(cfg: &MirrorConfig, ns: Option<&str>) -> Result<Upstream, OciError> {
    let Some(host) = ns else {
        return cfg.upstream.as_ref().map(Upstream::new).ok_or_else(|| {
            OciError::new(
                ErrorCode::NameUnknown,
                "this mirror has no default upstream (set --mirror-upstream, or use containerd's ?ns=)",
            )
        });
    };
    if let Some(u) = cfg.registries.get(host) {
        return Ok(Upstream::new(u));
    }
    if let Some(u) = &cfg.upstream
        && authority(u).is_some_and(|a| a.eq_ignore_ascii_case(host))
    {
        return Ok(Upstream::new(u));
    }
    if host == "docker.io" {
        return Err(OciError::new(
            ErrorCode::NameUnknown,
            "no registry configured for docker.io: map it with --mirror-registry docker.io=URL",
        ));
    }
    if !cfg.allow_unmapped {
        return Err(OciError::new(
            ErrorCode::Denied,
            format!(
                "this mirror does not serve registry {host}: map it with --mirror-registry {host}=URL \
                 ([proxy.registries]), or set allow_unmapped"
            ),
        ));
    }
    let invalid = || OciError::new(ErrorCode::NameInvalid, format!("invalid ns {host:?}"));
    let u = url::Url::parse(&format!("https://{host}")).map_err(|_| invalid())?;
    if u.path() != "/" || u.query().is_some() || u.fragment().is_some() || !u.username().is_empty()
    {
        return Err(invalid());
    }
    let ip = match u.host() {
        Some(url::Host::Ipv4(a)) => Some(IpAddr::V4(a)),
        Some(url::Host::Ipv6(a)) => Some(IpAddr::V6(a)),
        Some(url::Host::Domain(_)) => None,
        None => return Err(invalid()),
    };
    if ip.is_some_and(upstream::is_internal) {
        return Err(OciError::new(
            ErrorCode::Denied,
            format!("registry {host} is a loopback, link-local or cloud-metadata address"),
        ));
    }
    Ok(Upstream::new(&u))
}

fn base_ok() -> Response<Body> {
    let mut h = HeaderMap::new();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(2));
    respond(StatusCode::OK, h, full("{}"))
}

/// `e` and its sources, `: `-separated.
fn error_chain(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let more = s.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        src = s.source();
    }
    text
}

/// The first error of type `T` among `e`'s causes.
fn cause<T: std::error::Error + 'static>(e: &reqwest::Error) -> Option<&T> {
    let mut src = e.source();
    while let Some(s) = src {
        if let Some(t) = s.downcast_ref::<T>() {
            return Some(t);
        }
        src = s.source();
    }
    None
}

/// The response to a failed registry request: a refused redirect or internal address, a
/// timeout, or an unreachable registry.
fn unavailable(u: &Upstream, e: &reqwest::Error) -> Response<Body> {
    let reason = error_chain(e);
    let internal = cause::<InternalOnly>(e);
    // A name other than the registry's own was refused: one a redirect pointed at.
    let redirected = internal
        .is_some_and(|i| url::Url::parse(&u.base).is_ok_and(|b| b.host_str() != Some(i.host())));
    let internal = internal.is_some();
    if e.is_redirect() || redirected {
        tracing::warn!(registry = %u.base, error = %reason, "registry redirect refused");
        return oci_error(
            &OciError::new(
                ErrorCode::Unknown,
                format!(
                    "registry {} sent a redirect the mirror does not follow: {reason}",
                    u.base
                ),
            ),
            false,
        );
    }
    if internal {
        tracing::warn!(registry = %u.base, error = %reason, "registry refused");
        return oci_error(
            &OciError::new(
                ErrorCode::Denied,
                format!("registry {} refused: {reason}", u.base),
            ),
            false,
        );
    }
    let what = if e.is_timeout() {
        "timed out"
    } else {
        "unreachable"
    };
    tracing::warn!(registry = %u.base, error = %reason, "registry {what}");
    oci_error(
        &OciError::new(
            ErrorCode::Unavailable,
            format!("registry {} {what}: {reason}", u.base),
        ),
        false,
    )
}

/// Builds an upstream request carrying the client's `Accept` and `Authorization` only.
fn upstream_request(
    ctx: &Ctx,
    req: &Request<Incoming>,
    method: Method,
    url: &str,
) -> reqwest::RequestBuilder {
    let mut rb = ctx.client.request(method, url);
    for v in req.headers().get_all(header::ACCEPT) {
        rb = rb.header(header::ACCEPT, v.clone());
    }
    if let Some(a) = req.headers().get(header::AUTHORIZATION) {
        rb = rb.header(header::AUTHORIZATION, a.clone());
    }
    rb
}

/// `/v2/`: 200 unless the registry wants credentials, in which case its challenge is relayed so
/// the client starts its token flow.
async fn base(ctx: &Ctx, req: &Request<Incoming>, u: &Upstream) -> Response<Body> {
    let url = format!("{}/v2/", u.base);
    match upstream_request(ctx, req, Method::GET, &url).send().await {
        Ok(r) if r.status() == StatusCode::UNAUTHORIZED => {
            relay_limited(r, req.method() == Method::HEAD).await
        }
        Ok(_) => base_ok(),
        // The registry is down: the mirror still serves what the swarm holds (preheated images).
        Err(e) => {
            tracing::info!(registry = %u.base, error = %error_chain(&e), "registry unreachable; answering the API check itself");
            base_ok()
        }
    }
}

fn relayed_headers(from: &HeaderMap) -> HeaderMap {
    let mut h = HeaderMap::new();
    for name in RELAYED {
        for v in from.get_all(&name) {
            h.append(name.clone(), v.clone());
        }
    }
    h
}

/// Relays an upstream response whose body is small (errors, challenges), read into memory.
async fn relay_limited(r: reqwest::Response, head: bool) -> Response<Body> {
    let status = r.status();
    let mut h = relayed_headers(r.headers());
    let mut body = BytesMut::new();
    if !head {
        let mut s = r.bytes_stream();
        while let Some(Ok(chunk)) = s.next().await {
            body.extend_from_slice(&chunk);
            if body.len() > MAX_ERROR_BODY {
                body.truncate(MAX_ERROR_BODY);
                break;
            }
        }
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    respond(status, h, if head { empty() } else { full(body.freeze()) })
}

/// Relays an upstream response, streaming its body.
fn relay_stream(r: reqwest::Response, head: bool) -> Response<Body> {
    let status = r.status();
    let h = relayed_headers(r.headers());
    let body = if head {
        empty()
    } else {
        let s = r
            .bytes_stream()
            .map(|c| c.map(Frame::data).map_err(std::io::Error::other));
        BodyExt::boxed_unsync(StreamBody::new(s))
    };
    respond(status, h, body)
}

/// The query string for the registry (with its `?`, or empty): the client's, without the
/// mirror's own `ns` parameter.
fn upstream_query(req: &Request<Incoming>) -> String {
    let Some(q) = req.uri().query() else {
        return String::new();
    };
    let kept: Vec<(String, String)> = url::form_urlencoded::parse(q.as_bytes())
        .filter(|(k, _)| k != "ns")
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if kept.is_empty() {
        return String::new();
    }
    let q = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(kept)
        .finish();
    format!("?{q}")
}

async fn passthrough(
    ctx: &Ctx,
    req: &Request<Incoming>,
    u: &Upstream,
    route: &Route,
    head: bool,
) -> Response<Body> {
    let Some(path) = route.upstream_path() else {
        return oci_error(
            &OciError::new(ErrorCode::NotFound, "unknown registry endpoint"),
            head,
        );
    };
    let url = format!("{}{path}{}", u.base, upstream_query(req));
    let method = if head { Method::HEAD } else { Method::GET };
    match upstream_request(ctx, req, method, &url).send().await {
        Ok(r) => relay_stream(r, head),
        Err(e) => unavailable(u, &e),
    }
}

fn manifest_response(m: &CachedManifest, head: bool) -> Response<Body> {
    let mut h = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&m.content_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    if let Ok(v) = HeaderValue::from_str(&m.digest) {
        h.insert(CONTENT_DIGEST, v.clone());
        if let Ok(etag) = HeaderValue::from_str(&format!("\"{}\"", m.digest)) {
            h.insert(header::ETAG, etag);
        }
    }
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(m.body.len()));
    respond(
        StatusCode::OK,
        h,
        if head { empty() } else { full(m.body.clone()) },
    )
}

/// The media type of a manifest whose registry sent no `Content-Type`: its `mediaType` field.
fn media_type_of(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct M {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
    }
    serde_json::from_slice::<M>(body)
        .ok()
        .and_then(|m| m.media_type)
        .unwrap_or_else(|| "application/vnd.oci.image.manifest.v1+json".to_owned())
}

async fn manifest(
    ctx: &Ctx,
    req: &Request<Incoming>,
    u: &Upstream,
    name: &str,
    reference: &Reference,
    head: bool,
) -> Response<Body> {
    let accept = req
        .headers()
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",");
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    let key = CacheKey::new(&u.base, name, &reference.to_string(), &accept, auth);
    if let Some(m) = ctx.cache.get(&key) {
        ctx.stats
            .manifests_from_cache
            .fetch_add(1, Ordering::Relaxed);
        return manifest_response(&m, head);
    }
    let url = format!("{}/v2/{name}/manifests/{reference}", u.base);
    let method = if head { Method::HEAD } else { Method::GET };
    let r = match upstream_request(ctx, req, method, &url).send().await {
        Ok(r) if r.status().is_server_error() => {
            if let Some(m) = from_swarm(ctx, &url, reference).await {
                return serve_from_swarm(ctx, key, m, reference, head);
            }
            r
        }
        Ok(r) => r,
        Err(e) => {
            if let Some(m) = from_swarm(ctx, &url, reference).await {
                return serve_from_swarm(ctx, key, m, reference, head);
            }
            return unavailable(u, &e);
        }
    };
    ctx.stats
        .manifests_from_upstream
        .fetch_add(1, Ordering::Relaxed);
    if !r.status().is_success() || head {
        return relay_limited(r, head).await;
    }
    let content_type = r
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let upstream_digest = r
        .headers()
        .get(CONTENT_DIGEST)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<ContentDigest>().ok());
    let max = ctx.cfg.max_manifest_size.as_u64() as usize;
    let mut body = BytesMut::new();
    let mut s = r.bytes_stream();
    while let Some(chunk) = s.next().await {
        match chunk {
            Ok(c) => {
                body.extend_from_slice(&c);
                if body.len() > max {
                    return oci_error(
                        &OciError::new(
                            ErrorCode::ManifestInvalid,
                            format!("registry sent a manifest larger than {max} bytes"),
                        )
                        .with_status(StatusCode::BAD_GATEWAY),
                        head,
                    );
                }
            }
            Err(e) => return unavailable(u, &e),
        }
    }
    let body = body.freeze();
    // The digest that names these bytes: the one asked for, else the registry's, else sha256.
    let expected = match reference {
        Reference::Digest(d) => Some(d.clone()),
        Reference::Tag(_) => upstream_digest,
    };
    let alg = expected
        .as_ref()
        .map(|d| d.algorithm())
        .unwrap_or(df_protocols::task::DigestAlgorithm::Sha256);
    let mut hasher = alg.hasher();
    hasher.update(&body);
    let actual = hasher.finish();
    if let Some(exp) = &expected
        && *exp != actual
    {
        tracing::warn!(registry = %u.base, %name, expected = %exp, actual = %actual, "manifest digest mismatch");
        return oci_error(
            &OciError::new(
                ErrorCode::DigestInvalid,
                format!("registry sent a manifest with digest {actual}, expected {exp}"),
            )
            .with_status(StatusCode::BAD_GATEWAY),
            head,
        );
    }
    let m = CachedManifest {
        content_type: content_type.unwrap_or_else(|| media_type_of(&body)),
        digest: actual.to_string(),
        body,
    };
    let ttl = match reference {
        Reference::Tag(_) => Some(ctx.cfg.tag_ttl),
        Reference::Digest(_) => None,
    };
    // A tag's manifest is also the manifest of its digest: clients usually ask again by digest.
    if matches!(reference, Reference::Tag(_)) {
        let by_digest = CacheKey::new(&u.base, name, &m.digest, &accept, auth);
        ctx.cache.put(by_digest, m.clone(), None);
    }
    ctx.cache.put(key, m.clone(), ttl);
    manifest_response(&m, head)
}

/// A manifest the swarm holds (a preheat puts the tag's manifest there as a URL task and each
/// manifest as a digest task), for when the registry cannot be reached. Never fetches the
/// registry itself: `None` when no member holds it.
async fn from_swarm(ctx: &Ctx, url: &str, reference: &Reference) -> Option<CachedManifest> {
    let dreq = DownloadRequest {
        url: url.to_owned(),
        digest: match reference {
            Reference::Digest(d) => Some(d.clone()),
            Reference::Tag(_) => None,
        },
        disable_back_to_source: true,
        requester: Requester::Registry,
        ..DownloadRequest::default()
    };
    let content = match ctx.source.fetch(dreq, None).await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(%url, error = %e, "manifest not in the swarm either");
            return None;
        }
    };
    let max = ctx.cfg.max_manifest_size.as_u64();
    if content.content_length > max {
        tracing::warn!(%url, len = content.content_length, "swarm manifest too large");
        return None;
    }
    let mut body = BytesMut::new();
    let mut s = content.stream;
    while let Some(chunk) = s.next().await {
        body.extend_from_slice(&chunk.ok()?);
    }
    let body = body.freeze();
    let digest = match reference {
        // A digest task's content was checked against its digest by the node.
        Reference::Digest(d) => d.clone(),
        Reference::Tag(_) => {
            let mut hasher = df_protocols::task::DigestAlgorithm::Sha256.hasher();
            hasher.update(&body);
            hasher.finish()
        }
    };
    Some(CachedManifest {
        content_type: media_type_of(&body),
        digest: digest.to_string(),
        body,
    })
}

fn serve_from_swarm(
    ctx: &Ctx,
    key: CacheKey,
    m: CachedManifest,
    reference: &Reference,
    head: bool,
) -> Response<Body> {
    tracing::info!(reference = %reference, "registry unreachable: manifest served from the swarm");
    ctx.stats
        .manifests_from_swarm
        .fetch_add(1, Ordering::Relaxed);
    let ttl = match reference {
        Reference::Tag(_) => Some(ctx.cfg.tag_ttl),
        Reference::Digest(_) => None,
    };
    ctx.cache.put(key, m.clone(), ttl);
    manifest_response(&m, head)
}

fn blob_headers(digest: &ContentDigest, len: u64) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::from_str(&digest.to_string()) {
        h.insert(CONTENT_DIGEST, v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("\"{digest}\"")) {
        h.insert(header::ETAG, v);
    }
    h
}

#[allow(clippy::too_many_arguments)]
async fn blob(
    ctx: &Arc<Ctx>,
    req: &Request<Incoming>,
    u: &Upstream,
    name: &str,
    digest: ContentDigest,
    head: bool,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Response<Body> {
    let url = format!("{}/v2/{name}/blobs/{digest}", u.base);
    if head {
        if let Some(len) = ctx.source.known_length(&digest).await {
            return respond(StatusCode::OK, blob_headers(&digest, len), empty());
        }
        return match upstream_request(ctx, req, Method::HEAD, &url).send().await {
            Ok(r) => relay_limited(r, true).await,
            Err(e) => unavailable(u, &e),
        };
    }
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let dreq = DownloadRequest {
        url: url.clone(),
        // The client's credentials travel with this request only (to whichever node fetches
        // from the registry); they are never stored or announced.
        headers: auth
            .map(|a| vec![("Authorization".to_owned(), a.to_owned())])
            .unwrap_or_default(),
        digest: Some(digest.clone()),
        // A configured registry: its redirects go only to https hosts the origin guard allows.
        requester: Requester::Registry,
        ..DownloadRequest::default()
    };
    let range = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok());
    let content = match ctx.source.fetch(dreq, range).await {
        Ok(c) => c,
        Err(ContentError::RangeNotSatisfiable { content_length }) => {
            let mut r = oci_error(
                &OciError::new(ErrorCode::Unknown, "range not satisfiable")
                    .with_status(StatusCode::RANGE_NOT_SATISFIABLE),
                false,
            );
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{content_length}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return r;
        }
        Err(ContentError::UnknownTask) => {
            return oci_error(
                &OciError::new(ErrorCode::Unknown, "the node lost the blob's task"),
                false,
            );
        }
        Err(ContentError::Task(e)) => return task_error(ctx, req, u, &url, &digest, e).await,
    };
    let mut h = blob_headers(&digest, content.range.end - content.range.start);
    let status = if content.partial {
        let r = &content.range;
        if let Ok(v) = HeaderValue::from_str(&format!(
            "bytes {}-{}/{}",
            r.start,
            r.end.saturating_sub(1),
            content.content_length
        )) {
            h.insert(header::CONTENT_RANGE, v);
        }
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    };
    ctx.stats.blobs_served.fetch_add(1, Ordering::Relaxed);
    let stats = ctx.stats.clone();
    let shown = digest.to_string();
    let stream = content.stream.map(move |chunk| {
        // The permit lives as long as the body: a slow client holds its slot.
        let _held = &permit;
        match chunk {
            Ok(b) => {
                stats
                    .blob_bytes_sent
                    .fetch_add(b.len() as u64, Ordering::Relaxed);
                Ok(Frame::data(b))
            }
            Err(e) => {
                // Aborting the body (the connection) is how a client learns the bytes are bad.
                tracing::warn!(digest = %shown, error = %e, "blob stream aborted");
                Err(e)
            }
        }
    });
    respond(status, h, BodyExt::boxed_unsync(StreamBody::new(stream)))
}

/// The response for a blob task that failed before any byte was sent.
async fn task_error(
    ctx: &Ctx,
    req: &Request<Incoming>,
    u: &Upstream,
    url: &str,
    digest: &ContentDigest,
    e: TaskError,
) -> Response<Body> {
    let msg = e.to_string();
    let err = match &e {
        TaskError::OriginStatus { status, .. } if *status == 401 || *status == 403 => {
            // Relay the registry's challenge so the client can authenticate and retry.
            let (code, status) = if *status == 401 {
                (ErrorCode::Unauthorized, StatusCode::UNAUTHORIZED)
            } else {
                (ErrorCode::Denied, StatusCode::FORBIDDEN)
            };
            let mut r = oci_error(&OciError::new(code, msg).with_status(status), false);
            if let Ok(up) = upstream_request(ctx, req, Method::HEAD, url).send().await {
                for v in up.headers().get_all(header::WWW_AUTHENTICATE) {
                    r.headers_mut().append(header::WWW_AUTHENTICATE, v.clone());
                }
            }
            return r;
        }
        TaskError::OriginStatus { status: 404, .. } => OciError::new(
            ErrorCode::BlobUnknown,
            format!("blob {digest} unknown to the registry"),
        ),
        TaskError::OriginStatus { status: 429, .. } => {
            OciError::new(ErrorCode::TooManyRequests, msg)
        }
        TaskError::OriginStatus { .. } | TaskError::OriginFailed { .. } => {
            OciError::new(ErrorCode::Unknown, msg)
        }
        TaskError::OriginUnreachable { .. } | TaskError::NoSource { .. } => {
            OciError::new(ErrorCode::Unavailable, msg)
        }
        TaskError::DigestMismatch { .. } | TaskError::ContentChanged { .. } => {
            OciError::new(ErrorCode::DigestInvalid, msg).with_status(StatusCode::BAD_GATEWAY)
        }
        TaskError::NoSpace { .. } | TaskError::Storage { .. } => OciError::new(
            ErrorCode::Unavailable,
            format!("the node cannot store the blob: {msg}"),
        ),
        TaskError::BadRequest { .. } => OciError::new(ErrorCode::DigestInvalid, msg),
        TaskError::NotFound { .. } => OciError::new(ErrorCode::BlobUnknown, msg),
        TaskError::Internal { .. } => {
            OciError::new(ErrorCode::Unknown, msg).with_status(StatusCode::INTERNAL_SERVER_ERROR)
        }
    };
    tracing::info!(registry = %u.base, %digest, error = %err.message, "blob request failed");
    oci_error(&err, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_upstreams() {
        let mut cfg = MirrorConfig::default();
        let code = |cfg: &MirrorConfig, ns: Option<&str>| resolve(cfg, ns).err().map(|e| e.code);
        let base = |cfg: &MirrorConfig, ns: Option<&str>| resolve(cfg, ns).ok().map(|u| u.base);
        assert_eq!(code(&cfg, None), Some(ErrorCode::NameUnknown));
        assert_eq!(code(&cfg, Some("docker.io")), Some(ErrorCode::NameUnknown));
        // Unmapped hosts are refused, with the way to map them in the message.
        let e = resolve(&cfg, Some("reg.example:5000")).err().unwrap();
        assert_eq!(
            (e.code, e.status),
            (ErrorCode::Denied, StatusCode::FORBIDDEN)
        );
        assert!(
            e.message.contains("--mirror-registry reg.example:5000=URL"),
            "{}",
            e.message
        );
        cfg.upstream = Some("http://127.0.0.1:5000/".parse().unwrap());
        cfg.registries
            .insert("docker.io".into(), "https://hub.example".parse().unwrap());
        assert_eq!(base(&cfg, None), Some("http://127.0.0.1:5000".to_owned()));
        assert_eq!(
            base(&cfg, Some("docker.io")),
            Some("https://hub.example".to_owned())
        );
        // `ns` naming the upstream goes to the upstream (containerd names the registry).
        assert_eq!(
            base(&cfg, Some("127.0.0.1:5000")),
            Some("http://127.0.0.1:5000".to_owned())
        );
        assert_eq!(code(&cfg, Some("127.0.0.1:5001")), Some(ErrorCode::Denied));
        assert_eq!(code(&cfg, Some("127.0.0.1")), Some(ErrorCode::Denied));

        // allow_unmapped: any https registry, but not internal addresses.
        cfg.allow_unmapped = true;
        assert_eq!(
            base(&cfg, Some("reg.example:5000")),
            Some("https://reg.example:5000".to_owned())
        );
        for internal in [
            "127.0.0.1:5001",
            "localhost.:1@127.0.0.1",
            "169.254.169.254",
            "100.100.100.200",
            "[::1]:5000",
            "[fd00:ec2::254]",
            "[::ffff:127.0.0.1]",
            "0.0.0.0:80",
        ] {
            assert!(resolve(&cfg, Some(internal)).is_err(), "{internal}");
        }
        assert_eq!(code(&cfg, Some("169.254.169.254")), Some(ErrorCode::Denied));
        for bad in ["a/b", "a?b", "a#b", "u@host", ""] {
            assert_eq!(
                code(&cfg, Some(bad)),
                Some(ErrorCode::NameInvalid),
                "{bad:?}"
            );
        }
        assert_eq!(code(&cfg, Some("docker.io")), None);
        cfg.registries.clear();
        assert_eq!(code(&cfg, Some("docker.io")), Some(ErrorCode::NameUnknown));
    }

    #[test]
    fn media_type_fallback() {
        assert_eq!(
            media_type_of(br#"{"mediaType":"application/vnd.oci.image.index.v1+json"}"#),
            "application/vnd.oci.image.index.v1+json"
        );
        assert_eq!(
            media_type_of(b"{}"),
            "application/vnd.oci.image.manifest.v1+json"
        );
    }
}
