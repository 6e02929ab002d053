//! Back-to-source over HTTP(S) with reqwest.
//!
//! * `open`: `GET` with `Range: bytes=a-b`. `206` gives the total length from `Content-Range`;
//!   `200` means the origin ignores ranges (the body is then the whole content and must carry a
//!   `Content-Length`); `416` with `bytes */0` is an empty file. Validators (`ETag`, `Last-Modified`)
//!   are recorded.
//! * `range`: `GET` with `Range` and `If-Range` (the strong ETag, else Last-Modified), so a changed
//!   origin answers `200` instead of `206` and the change is detected; the total length and the
//!   validators of every answer are checked too.
//! * Transient failures of `open` (connection errors, 408, 429, 5xx) are retried with backoff; the
//!   producer retries ranges itself.

use std::error::Error as _;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use df_node::config::OriginConfig;
use df_node::http_client::{HttpClientError, client_builder};
use df_node::origin::{
    ByteStream, GuardError, Origin, OriginError, OriginGuard, OriginResponse, OriginSpec,
    Requester, display_url,
};
use df_protocols::manifest::Validators;
use futures::StreamExt;
use reqwest::StatusCode;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::{
    CONTENT_LENGTH, CONTENT_RANGE, ETAG, HeaderMap, HeaderName, HeaderValue, IF_RANGE,
    LAST_MODIFIED, RANGE,
};

/// Errors building the HTTP client.
#[derive(Debug, thiserror::Error)]
pub enum HttpOriginError {
    #[error("building the HTTP client failed: {0}")]
    Client(#[from] reqwest::Error),
    #[error(transparent)]
    Tls(#[from] HttpClientError),
    #[error("[origin] allow/deny: {0}")]
    Guard(#[from] GuardError),
}

/// Redirects followed per request.
const MAX_REDIRECTS: usize = 10;

/// The HTTP(S) origin. One client per [`Requester`]: fetches on a peer's behalf resolve names
/// through the [`OriginGuard`] and check every redirect against it.
#[derive(Clone)]
pub struct HttpOrigin {
    local: reqwest::Client,
    peer_on_loopback: reqwest::Client,
    peer: reqwest::Client,
    registry: reqwest::Client,
    guard: Arc<OriginGuard>,
    retries: u32,
}

/// Resolves names for fetches on a peer's behalf, keeping only addresses the guard allows: a
/// name that resolves only to forbidden addresses fails, and the check happens at connect time,
/// so DNS rebinding between a check and the connection is not possible.
struct GuardedResolver {
    guard: Arc<OriginGuard>,
    requester: Requester,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let guard = self.guard.clone();
        let requester = self.requester;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refused = None;
            let allowed: Vec<SocketAddr> = found
                .into_iter()
                .filter(|a| match guard.check_ip(a.ip(), requester) {
                    Ok(()) => true,
                    Err(e) => {
                        refused = Some(e);
                        false
                    }
                })
                .collect();
            match (allowed.is_empty(), refused) {
                (true, Some(e)) => Err(Box::new(e) as Box<dyn std::error::Error + Send + Sync>),
                _ => Ok(Box::new(allowed.into_iter()) as Addrs),
            }
        })
    }
}

impl HttpOrigin {
    pub fn new(cfg: &OriginConfig) -> Result<HttpOrigin, HttpOriginError> {
        let guard = Arc::new(OriginGuard::new(&cfg.allow, &cfg.deny)?);
        let client = |requester: Requester| -> Result<reqwest::Client, HttpOriginError> {
            let mut b = client_builder(&cfg.ca_bundle, cfg.insecure)?
                .user_agent(concat!("df/", env!("CARGO_PKG_VERSION")))
                .connect_timeout(cfg.connect_timeout)
                .read_timeout(cfg.read_timeout);
            if matches!(requester, Requester::Peer | Requester::PeerOnLoopback) {
                b = b.dns_resolver(Arc::new(GuardedResolver {
                    guard: guard.clone(),
                    requester,
                }));
            }
            let g = guard.clone();
            b = b.redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= MAX_REDIRECTS {
                    return attempt.error("too many redirects");
                }
                let checked = match attempt.previous().first() {
                    Some(first) => g.check_redirect(first, attempt.url(), requester),
                    None => g.check_url(attempt.url(), requester),
                };
                match checked {
                    Ok(()) => attempt.follow(),
                    Err(e) => attempt.error(e),
                }
            }));
            Ok(b.build()?)
        };
        Ok(HttpOrigin {
            local: client(Requester::Local)?,
            peer_on_loopback: client(Requester::PeerOnLoopback)?,
            peer: client(Requester::Peer)?,
            registry: client(Requester::Registry)?,
            guard,
            retries: cfg.retries,
        })
    }

    fn request(
        &self,
        spec: &OriginSpec,
        range: &Range<u64>,
    ) -> Result<reqwest::RequestBuilder, OriginError> {
        // IP literals and host patterns are checked here; names again as they are resolved.
        self.guard
            .check_url(&spec.url, spec.requester)
            .map_err(|e| refused(spec, &e))?;
        let mut headers = HeaderMap::new();
        for (k, v) in &spec.headers {
            if let (Ok(k), Ok(v)) = (
                HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_str(v),
            ) {
                headers.append(k, v);
            }
        }
        if let Ok(v) = HeaderValue::from_str(&format!(
            "bytes={}-{}",
            range.start,
            range.end.saturating_sub(1)
        )) {
            headers.insert(RANGE, v);
        }
        let client = match spec.requester {
            Requester::Local => &self.local,
            Requester::PeerOnLoopback => &self.peer_on_loopback,
            Requester::Peer => &self.peer,
            Requester::Registry => &self.registry,
        };
        Ok(client.get(spec.url.clone()).headers(headers))
    }

    async fn send(
        &self,
        spec: &OriginSpec,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, OriginError> {
        let resp = req.send().await.map_err(|e| unreachable(spec, &e))?;
        let status = resp.status();
        if status.is_success() || status == StatusCode::RANGE_NOT_SATISFIABLE {
            return Ok(resp);
        }
        let challenge = (status == StatusCode::UNAUTHORIZED)
            .then(|| resp.headers().get(reqwest::header::WWW_AUTHENTICATE))
            .flatten()
            .and_then(|v| v.to_str().ok())
            .map(|v| v.chars().take(1024).collect());
        Err(OriginError::Status {
            status: status.as_u16(),
            reason: status.canonical_reason().unwrap_or("").to_owned(),
            url: display_url(&spec.url),
            challenge,
        })
    }
}

/// A fetch the guard refused: reported like a client error status, so the asking peer fails at
/// once instead of retrying elsewhere.
fn refused(spec: &OriginSpec, e: &GuardError) -> OriginError {
    OriginError::Status {
        status: 403,
        reason: format!("refused: {e}"),
        url: display_url(&spec.url),
        challenge: None,
    }
}

fn unreachable(spec: &OriginSpec, e: &reqwest::Error) -> OriginError {
    let mut reason = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        // The guard refused a resolved address or a redirect: final, not worth a retry.
        if let Some(g) = s.downcast_ref::<GuardError>() {
            return refused(spec, g);
        }
        reason = s.to_string();
        src = s.source();
    }
    if e.is_timeout() {
        reason = format!("timed out ({reason})");
    }
    OriginError::Unreachable {
        url: display_url(&spec.url),
        reason,
    }
}

fn header_str(h: &HeaderMap, name: HeaderName) -> Option<String> {
    h.get(name)?.to_str().ok().map(str::to_owned)
}

fn validators_of(h: &HeaderMap) -> Validators {
    Validators {
        etag: header_str(h, ETAG),
        last_modified: header_str(h, LAST_MODIFIED),
    }
}

/// `Content-Range: bytes a-b/total`: the span (first, last) and total, each possibly `*`.
type ContentRange = (Option<(u64, u64)>, Option<u64>);

/// Parses `Content-Range: bytes a-b/total` (or `bytes */total`).
fn content_range(h: &HeaderMap) -> Option<ContentRange> {
    let v = header_str(h, CONTENT_RANGE)?;
    let rest = v.trim().strip_prefix("bytes ")?;
    let (span, total) = rest.split_once('/')?;
    let total = if total == "*" {
        None
    } else {
        Some(total.parse().ok()?)
    };
    let span = if span == "*" {
        None
    } else {
        let (a, b) = span.split_once('-')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    };
    Some((span, total))
}

fn body_stream(resp: reqwest::Response) -> ByteStream {
    Box::pin(
        resp.bytes_stream()
            .map(|r| r.map_err(|e| OriginError::Body(e.to_string()))),
    )
}

fn changed(v: &Validators, expected: &Validators) -> bool {
    (expected.etag.is_some() && v.etag.is_some() && v.etag != expected.etag)
        || (expected.last_modified.is_some()
            && v.last_modified.is_some()
            && v.last_modified != expected.last_modified)
}

#[async_trait]
impl Origin for HttpOrigin {
    async fn open(
        &self,
        spec: &OriginSpec,
        first: Range<u64>,
    ) -> Result<OriginResponse, OriginError> {
        let mut attempt = 0;
        let resp = loop {
            match self.send(spec, self.request(spec, &first)?).await {
                Ok(r) => break r,
                Err(e) if e.is_transient() && attempt < self.retries => {
                    attempt += 1;
                    tracing::debug!(url = %display_url(&spec.url), error = %e, attempt, "retrying origin");
                    tokio::time::sleep(Duration::from_millis(200 << attempt.min(5))).await;
                }
                Err(e) => return Err(e),
            }
        };
        let headers = resp.headers().clone();
        let validators = validators_of(&headers);
        match resp.status() {
            StatusCode::PARTIAL_CONTENT => {
                let Some((Some((a, _)), Some(total))) = content_range(&headers) else {
                    return Err(OriginError::Protocol(
                        "206 answer without a usable Content-Range".into(),
                    ));
                };
                if a != first.start {
                    return Err(OriginError::Protocol(format!(
                        "asked for bytes from {}, got from {a}",
                        first.start
                    )));
                }
                Ok(OriginResponse {
                    content_length: total,
                    validators,
                    ranged: true,
                    body: body_stream(resp),
                })
            }
            StatusCode::RANGE_NOT_SATISFIABLE => match content_range(&headers) {
                Some((_, Some(0))) => Ok(OriginResponse {
                    content_length: 0,
                    validators,
                    ranged: true,
                    body: Box::pin(futures::stream::empty()),
                }),
                Some((_, Some(total))) => Err(OriginError::Changed(format!(
                    "origin content is {total} bytes, shorter than expected"
                ))),
                _ => Err(OriginError::Protocol("416 answer without a length".into())),
            },
            _ => {
                let len = header_str(&headers, CONTENT_LENGTH)
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or_else(|| {
                        OriginError::Protocol(
                            "origin ignores range requests and sent no Content-Length".into(),
                        )
                    })?;
                Ok(OriginResponse {
                    content_length: len,
                    validators,
                    ranged: false,
                    body: body_stream(resp),
                })
            }
        }
    }

    async fn range(
        &self,
        spec: &OriginSpec,
        range: Range<u64>,
        content_length: u64,
        validators: &Validators,
    ) -> Result<ByteStream, OriginError> {
        let mut req = self.request(spec, &range)?;
        let if_range = validators
            .etag
            .as_ref()
            .filter(|e| !e.starts_with("W/"))
            .or(validators.last_modified.as_ref());
        if let Some(v) = if_range.and_then(|v| HeaderValue::from_str(v).ok()) {
            req = req.header(IF_RANGE, v);
        }
        let resp = self.send(spec, req).await?;
        let headers = resp.headers();
        if resp.status() != StatusCode::PARTIAL_CONTENT {
            return Err(OriginError::Changed(format!(
                "origin answered {} to a range request",
                resp.status()
            )));
        }
        match content_range(headers) {
            Some((Some((a, b)), Some(total)))
                if a == range.start && b + 1 == range.end && total == content_length => {}
            Some((_, Some(total))) if total != content_length => {
                return Err(OriginError::Changed(format!(
                    "origin length is now {total}, was {content_length}"
                )));
            }
            _ => {
                return Err(OriginError::Protocol(format!(
                    "unexpected Content-Range for bytes {}-{}",
                    range.start,
                    range.end - 1
                )));
            }
        }
        if changed(&validators_of(headers), validators) {
            return Err(OriginError::Changed("origin validators changed".into()));
        }
        Ok(body_stream(resp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hm(k: HeaderName, v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(k, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn content_range_forms() {
        assert_eq!(
            content_range(&hm(CONTENT_RANGE, "bytes 0-9/100")),
            Some((Some((0, 9)), Some(100)))
        );
        assert_eq!(
            content_range(&hm(CONTENT_RANGE, "bytes */0")),
            Some((None, Some(0)))
        );
        assert_eq!(
            content_range(&hm(CONTENT_RANGE, "bytes 0-9/*")),
            Some((Some((0, 9)), None))
        );
        assert_eq!(content_range(&hm(CONTENT_RANGE, "items 0-9/10")), None);
    }

    #[tokio::test]
    async fn names_resolving_to_forbidden_addresses_are_refused_for_remote_peers() {
        let resolver = |requester| GuardedResolver {
            guard: Arc::new(OriginGuard::default()),
            requester,
        };
        let name = |s: &str| s.parse::<Name>().unwrap();
        let r = resolver(Requester::Peer).resolve(name("localhost")).await;
        let err = r.err().expect("localhost resolved for a remote peer");
        assert!(err.downcast_ref::<GuardError>().is_some(), "{err}");
        let addrs: Vec<SocketAddr> = resolver(Requester::PeerOnLoopback)
            .resolve(name("localhost"))
            .await
            .unwrap()
            .collect();
        assert!(!addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback()));
    }

    #[test]
    fn validator_change_detection() {
        let a = Validators {
            etag: Some("\"a\"".into()),
            last_modified: None,
        };
        let b = Validators {
            etag: Some("\"b\"".into()),
            last_modified: None,
        };
        assert!(changed(&b, &a));
        assert!(!changed(&a, &a));
        assert!(!changed(&Validators::default(), &a));
    }
}
