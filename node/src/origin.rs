//! Back-to-source, as the node sees it: the [`Origin`] trait. The HTTP implementation (reqwest: ranges,
//! validators, retries) lives in the `df-seed` crate; tests use in-memory origins.
//!
//! A producer first [`Origin::open`]s the content, asking for its first bytes with a range request,
//! which tells it the length, the validators and whether ranges work. It then fetches the remaining
//! pieces with [`Origin::range`], several in flight, each response checked against the validators.

use std::net::IpAddr;
use std::ops::Range;
use std::pin::Pin;

use async_trait::async_trait;
use bytes::Bytes;
use df_protocols::manifest::Validators;
use futures::Stream;
use url::Url;

/// A stream of body chunks.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, OriginError>> + Send>>;

/// What to fetch, credentials included. Lives in memory for the duration of a fetch only.
#[derive(Clone)]
pub struct OriginSpec {
    pub url: Url,
    pub headers: Vec<(String, String)>,
    /// On whose behalf: decides which addresses the fetch may reach ([`OriginGuard`]).
    pub requester: Requester,
}

impl std::fmt::Debug for OriginSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print header values or the query: they may carry credentials.
        let mut u = self.url.clone();
        u.set_query(None);
        let _ = u.set_password(None);
        f.debug_struct("OriginSpec")
            .field("url", &u.as_str())
            .field("requester", &self.requester)
            .field(
                "headers",
                &self.headers.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// The origin's first answer.
pub struct OriginResponse {
    pub content_length: u64,
    pub validators: Validators,
    /// The origin honours range requests.
    pub ranged: bool,
    /// The requested `first` range (clamped to the content) when ranged, else the whole content.
    pub body: ByteStream,
}

/// Errors fetching from an origin. Messages name the URL without its query (which may be signed).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum OriginError {
    #[error("origin returned {status} {reason} for {url}")]
    Status {
        status: u16,
        reason: String,
        url: String,
        /// A 401's `WWW-Authenticate` challenge (a registry names its token service there).
        challenge: Option<String>,
    },
    #[error("cannot reach origin {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("origin content changed during the download: {0}")]
    Changed(String),
    #[error("reading from origin failed: {0}")]
    Body(String),
    #[error("origin answered incorrectly: {0}")]
    Protocol(String),
}

impl OriginError {
    /// Worth retrying: connection problems, timeouts, 408, 429 and 5xx.
    pub fn is_transient(&self) -> bool {
        match self {
            OriginError::Status { status, .. } => {
                *status == 408 || *status == 429 || *status >= 500
            }
            OriginError::Unreachable { .. } | OriginError::Body(_) => true,
            OriginError::Changed(_) | OriginError::Protocol(_) => false,
        }
    }
}

/// An origin the node can fetch content from.
#[async_trait]
pub trait Origin: Send + Sync + 'static {
    /// Starts fetching `spec`, asking for bytes `first` (clamped to the content's length).
    async fn open(
        &self,
        spec: &OriginSpec,
        first: Range<u64>,
    ) -> Result<OriginResponse, OriginError>;

    /// Fetches `range` of content whose validators and length must still be `validators` and
    /// `content_length`; a mismatch is [`OriginError::Changed`].
    async fn range(
        &self,
        spec: &OriginSpec,
        range: Range<u64>,
        content_length: u64,
        validators: &Validators,
    ) -> Result<ByteStream, OriginError>;
}

/// A URL as it may appear in messages: no credentials, no query.
pub fn display_url(url: &Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.set_query(None);
    u.set_fragment(None);
    u.to_string()
}

/// On whose behalf an origin is fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Requester {
    /// This node's own user (its API, `df get`, the registry mirror): whatever the host reaches.
    #[default]
    Local,
    /// A peer connected over loopback: it runs on this host and could fetch loopback itself.
    PeerOnLoopback,
    /// A peer on another host.
    Peer,
    /// The registry mirror, for a blob of a registry the operator configured: the registry itself
    /// is reached as configured, its redirects (registries send blobs to object storage) only to
    /// `https` hosts the guard allows for a remote peer, or back to the registry itself.
    Registry,
}

impl Requester {
    /// The requester for a peer reached at `ip` (unknown: treated as remote).
    pub fn peer_at(ip: Option<IpAddr>) -> Requester {
        match ip {
            Some(ip) if ip.to_canonical().is_loopback() => Requester::PeerOnLoopback,
            _ => Requester::Peer,
        }
    }
}

/// Why the origin guard refused a fetch.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum GuardError {
    #[error("{addr} is not fetched on a peer's behalf ({why})")]
    Address { addr: IpAddr, why: &'static str },
    #[error("host {host:?} is not fetched on a peer's behalf ({why})")]
    Host { host: String, why: &'static str },
    #[error("invalid host pattern {0:?}: expected HOST, *.DOMAIN, an IP address or ADDRESS/PREFIX")]
    Pattern(String),
}

/// One `[origin] allow` / `deny` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Exact(String),
    /// `*.domain`: any name below `domain`.
    Suffix(String),
    Net(IpAddr, u8),
}

impl HostPattern {
    fn parse(p: &str) -> Result<HostPattern, GuardError> {
        let bad = || GuardError::Pattern(p.to_owned());
        let p = p.trim();
        if let Some(rest) = p.strip_prefix("*.") {
            if rest.is_empty() || rest.contains('*') {
                return Err(bad());
            }
            return Ok(HostPattern::Suffix(format!(
                ".{}",
                rest.to_ascii_lowercase()
            )));
        }
        if let Some((addr, prefix)) = p.split_once('/') {
            let addr: IpAddr = addr.parse().map_err(|_| bad())?;
            let prefix: u8 = prefix.parse().map_err(|_| bad())?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            if prefix > max {
                return Err(bad());
            }
            return Ok(HostPattern::Net(addr.to_canonical(), prefix));
        }
        if let Ok(ip) = p.trim_matches(['[', ']']).parse::<IpAddr>() {
            let max = if ip.is_ipv4() { 32 } else { 128 };
            return Ok(HostPattern::Net(ip.to_canonical(), max));
        }
        if p.is_empty() || p.contains(['*', '/', ':']) {
            return Err(bad());
        }
        Ok(HostPattern::Exact(p.to_ascii_lowercase()))
    }

    fn matches_name(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(h) => h == host,
            HostPattern::Suffix(s) => host.ends_with(s.as_str()),
            HostPattern::Net(..) => false,
        }
    }

    fn matches_ip(&self, ip: IpAddr) -> bool {
        let HostPattern::Net(net, prefix) = self else {
            return false;
        };
        match (ip.to_canonical(), net) {
            (IpAddr::V4(a), IpAddr::V4(n)) => prefix_eq(&a.octets(), &n.octets(), *prefix),
            (IpAddr::V6(a), IpAddr::V6(n)) => prefix_eq(&a.octets(), &n.octets(), *prefix),
            _ => false,
        }
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let bits = usize::from(bits);
    let (full, rest) = (bits / 8, bits % 8);
    if a.get(..full) != b.get(..full) {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    match (a.get(full), b.get(full)) {
        (Some(x), Some(y)) => x & mask == y & mask,
        _ => false,
    }
}

/// Where an internal address leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Internal {
    /// This host: loopback, unspecified ("this host", 0.0.0.0/8, `::`).
    Loopback,
    /// Link-local (which holds 169.254.169.254) or a cloud metadata service.
    LinkLocal,
}

/// Alibaba Cloud's metadata service.
const ALIBABA_METADATA: std::net::Ipv4Addr = std::net::Ipv4Addr::new(100, 100, 100, 200);
/// AWS's metadata service over IPv6.
const AWS_METADATA_V6: std::net::Ipv6Addr =
    std::net::Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254);

/// Whether `ip` is internal (this host, link-local, a cloud metadata service), and which kind;
/// IPv4 addresses written as IPv6 (mapped, compatible or NAT64) count as themselves.
pub fn internal_kind(ip: IpAddr) -> Option<Internal> {
    match ip {
        IpAddr::V4(v4) => {
            if v4.is_loopback() || v4.octets()[0] == 0 {
                Some(Internal::Loopback)
            } else if v4.is_link_local() || v4 == ALIBABA_METADATA {
                Some(Internal::LinkLocal)
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            if v6.is_loopback() || v6.is_unspecified() {
                return Some(Internal::Loopback);
            }
            if (s[0] & 0xffc0) == 0xfe80 || v6 == AWS_METADATA_V6 {
                return Some(Internal::LinkLocal);
            }
            let embedded = if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let [.., a, b, c, d] = v6.octets();
                Some(std::net::Ipv4Addr::new(a, b, c, d))
            } else {
                v6.to_ipv4()
            };
            embedded.and_then(|v4| internal_kind(IpAddr::V4(v4)))
        }
    }
}

/// Loopback, unspecified, link-local or cloud metadata (see [`internal_kind`]).
pub fn is_internal(ip: IpAddr) -> bool {
    internal_kind(ip).is_some()
}

/// A node fetches for a peer only what that peer could fetch itself: never link-local or cloud
/// metadata addresses, loopback only for a peer on this host, and within the operator's
/// `[origin] allow` / `deny` host patterns. Checked on the URL, on every resolved address (so a
/// name that resolves to a forbidden address is refused) and again on every redirect. Private
/// ranges stay allowed: internal registries and artifact stores live there, and the swarm key
/// keeps outsiders from asking. Fetches for the node's own user are not restricted.
#[derive(Debug, Clone, Default)]
pub struct OriginGuard {
    allow: Vec<HostPattern>,
    deny: Vec<HostPattern>,
}

impl OriginGuard {
    pub fn new(allow: &[String], deny: &[String]) -> Result<OriginGuard, GuardError> {
        let parse = |v: &[String]| -> Result<Vec<HostPattern>, GuardError> {
            v.iter().map(|p| HostPattern::parse(p)).collect()
        };
        Ok(OriginGuard {
            allow: parse(allow)?,
            deny: parse(deny)?,
        })
    }

    /// May `ip` be connected to on behalf of `who`?
    pub fn check_ip(&self, ip: IpAddr, who: Requester) -> Result<(), GuardError> {
        if matches!(who, Requester::Local | Requester::Registry) {
            return Ok(());
        }
        let ip = ip.to_canonical();
        let refuse = |why| Err(GuardError::Address { addr: ip, why });
        match internal_kind(ip) {
            Some(Internal::LinkLocal) => return refuse("link-local or cloud metadata address"),
            // 0.0.0.0 and :: reach this host's own services too.
            Some(Internal::Loopback) if who != Requester::PeerOnLoopback => {
                return refuse("this host's loopback, and the peer is on another host");
            }
            _ => {}
        }
        if ip.is_multicast() || matches!(ip, IpAddr::V4(v4) if v4.is_broadcast()) {
            return refuse("multicast or broadcast address");
        }
        if self.deny.iter().any(|p| p.matches_ip(ip)) {
            return refuse("denied by [origin] deny");
        }
        if !self.allow.is_empty()
            && !self.allow.iter().any(|p| p.matches_ip(ip))
            && self.allow.iter().all(|p| matches!(p, HostPattern::Net(..)))
        {
            return refuse("not in [origin] allow");
        }
        Ok(())
    }

    /// Checks a URL's host (before resolution; IP literals are checked as addresses).
    pub fn check_url(&self, url: &Url, who: Requester) -> Result<(), GuardError> {
        if matches!(who, Requester::Local | Requester::Registry) {
            return Ok(());
        }
        let host = match url.host() {
            Some(url::Host::Ipv4(ip)) => return self.check_literal(IpAddr::V4(ip), who),
            Some(url::Host::Ipv6(ip)) => return self.check_literal(IpAddr::V6(ip), who),
            Some(url::Host::Domain(d)) => d.trim_end_matches('.').to_ascii_lowercase(),
            None => {
                return Err(GuardError::Host {
                    host: String::new(),
                    why: "no host",
                });
            }
        };
        let refuse = |why| {
            Err(GuardError::Host {
                host: host.clone(),
                why,
            })
        };
        if (host == "localhost" || host.ends_with(".localhost")) && who != Requester::PeerOnLoopback
        {
            return refuse("this host's loopback, and the peer is on another host");
        }
        if self.deny.iter().any(|p| p.matches_name(&host)) {
            return refuse("denied by [origin] deny");
        }
        if self.allows_names() && !self.allow.iter().any(|p| p.matches_name(&host)) {
            return refuse("not in [origin] allow");
        }
        Ok(())
    }

    /// May a fetch for `who` that started at `first` follow a redirect to `target`?
    pub fn check_redirect(
        &self,
        first: &Url,
        target: &Url,
        who: Requester,
    ) -> Result<(), GuardError> {
        match who {
            Requester::Local => Ok(()),
            Requester::Registry => {
                let same_origin = first.scheme() == target.scheme()
                    && first.host() == target.host()
                    && first.port_or_known_default() == target.port_or_known_default();
                if same_origin {
                    return Ok(());
                }
                if target.scheme() != "https" {
                    return Err(GuardError::Host {
                        host: target.host_str().unwrap_or_default().to_owned(),
                        why: "a registry's redirect is followed only to https",
                    });
                }
                self.check_url(target, Requester::Peer)
            }
            Requester::Peer | Requester::PeerOnLoopback => self.check_url(target, who),
        }
    }

    /// Whether `allow` names hosts (not only address ranges): then only those hosts, and
    /// addresses in its ranges, may be fetched for peers.
    fn allows_names(&self) -> bool {
        self.allow
            .iter()
            .any(|p| !matches!(p, HostPattern::Net(..)))
    }

    fn check_literal(&self, ip: IpAddr, who: Requester) -> Result<(), GuardError> {
        self.check_ip(ip, who)?;
        if self.allows_names() && !self.allow.iter().any(|p| p.matches_ip(ip)) {
            return Err(GuardError::Address {
                addr: ip,
                why: "not in [origin] allow",
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn peers_never_reach_link_local_metadata_or_a_remote_loopback() {
        let g = OriginGuard::default();
        for u in [
            "http://169.254.169.254/latest/meta-data/",
            "http://[fd00:ec2::254]/",
            "http://100.100.100.200/",
            "http://[fe80::1]/",
            "http://0.0.0.0:8080/",
        ] {
            assert!(g.check_url(&url(u), Requester::Peer).is_err(), "{u}");
            assert!(g.check_url(&url(u), Requester::Local).is_ok(), "{u}");
        }
        // Loopback spelled in every way the URL parser normalises (decimal, hex, short forms).
        for u in [
            "http://127.0.0.1/",
            "http://2130706433/",
            "http://0x7f.1/",
            "http://127.1/",
            "http://[::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://localhost:8080/",
            "http://LOCALHOST./",
        ] {
            assert!(g.check_url(&url(u), Requester::Peer).is_err(), "{u}");
            assert!(
                g.check_url(&url(u), Requester::PeerOnLoopback).is_ok(),
                "{u}"
            );
        }
        assert!(
            g.check_url(&url("http://169.254.169.254/"), Requester::PeerOnLoopback)
                .is_err()
        );
        // Private ranges and public names stay allowed.
        for u in [
            "http://10.1.2.3/f",
            "https://registry.internal:5000/v2/",
            "http://[fd12::1]/",
        ] {
            assert!(g.check_url(&url(u), Requester::Peer).is_ok(), "{u}");
        }
        for ip in [
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "::169.254.169.254",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(g.check_ip(ip, Requester::PeerOnLoopback).is_err(), "{ip}");
        }
        for ip in ["0.1.2.3", "64:ff9b::7f00:1"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(g.check_ip(ip, Requester::Peer).is_err(), "{ip}");
            assert!(g.check_ip(ip, Requester::PeerOnLoopback).is_ok(), "{ip}");
        }
    }

    #[test]
    fn a_registrys_redirects_go_to_https_hosts_that_pass_the_guard_or_back_to_it() {
        let g = OriginGuard::default();
        let first = url("http://127.0.0.1:5000/v2/r/blobs/sha256:aa");
        let ok = |t: &str| {
            g.check_redirect(&first, &url(t), Requester::Registry)
                .is_ok()
        };
        assert!(g.check_url(&first, Requester::Registry).is_ok());
        assert!(ok("http://127.0.0.1:5000/v2/r/blobs/uploads/x"));
        assert!(ok("https://bucket.s3.example/blob?sig=x"));
        assert!(!ok("http://bucket.s3.example/blob"));
        assert!(!ok("https://169.254.169.254/latest/meta-data/"));
        assert!(!ok("https://127.0.0.1:6000/secret"));
        assert!(!ok("https://localhost/secret"));
        assert!(!ok("http://127.0.0.1:6000/secret"));
    }

    #[test]
    fn allow_and_deny_narrow_what_peers_may_ask_for() {
        let g = OriginGuard::new(
            &[
                "artifacts.corp".into(),
                "*.cdn.corp".into(),
                "10.9.0.0/16".into(),
            ],
            &["secret.cdn.corp".into(), "10.9.9.0/24".into()],
        )
        .unwrap();
        let ok = |u: &str| g.check_url(&url(u), Requester::Peer).is_ok();
        assert!(ok("https://artifacts.corp/a"));
        assert!(ok("https://x.cdn.corp/a"));
        assert!(!ok("https://cdn.corp/a"));
        assert!(!ok("https://secret.cdn.corp/a"));
        assert!(!ok("https://elsewhere.example/a"));
        assert!(ok("http://10.9.1.1/a"));
        assert!(!ok("http://10.9.9.1/a"));
        assert!(!ok("http://10.8.0.1/a"));
        assert!(
            g.check_ip("10.9.9.9".parse().unwrap(), Requester::Peer)
                .is_err()
        );
        assert!(
            g.check_url(&url("https://elsewhere.example/a"), Requester::Local)
                .is_ok()
        );
        for bad in ["*", "a/b", "*.", "1.2.3.4/40", "a*b"] {
            assert!(OriginGuard::new(&[bad.into()], &[]).is_err(), "{bad}");
        }
    }
}
