//! The mirror's client for registries: which redirects it follows and which addresses it
//! connects to.
//!
//! A registry's redirect is followed only to an `https` URL or to the registry's own scheme, host
//! and port, and never to a loopback, link-local or cloud-metadata address unless the registry
//! itself is on that very host. Host names other than the configured registries' are resolved with
//! those addresses removed, so neither a redirect nor an unmapped `?ns=` reaches them through DNS.
//! Registries that send blobs to HTTPS object storage keep working.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use url::{Host, Url};

use crate::config::MirrorConfig;

/// Redirects followed for one request before giving up.
pub(crate) const MAX_REDIRECTS: usize = 10;

pub(crate) use df_node::origin::is_internal;

/// Why a registry's redirect was not followed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RedirectRefused {
    #[error(
        "redirect to {0} refused: only https, or the registry's own scheme, host and port, is followed"
    )]
    Scheme(Url),
    #[error("redirect to {0} refused: a loopback, link-local or cloud-metadata address")]
    Internal(Url),
    #[error("more than {} redirects", MAX_REDIRECTS)]
    TooMany,
}

/// The IP address of a URL whose host is an IP literal.
fn ip_literal(u: &Url) -> Option<IpAddr> {
    match u.host()? {
        Host::Ipv4(a) => Some(IpAddr::V4(a)),
        Host::Ipv6(a) => Some(IpAddr::V6(a)),
        Host::Domain(_) => None,
    }
}

/// Whether a redirect from a request to `origin` (the registry URL first asked) may go to
/// `target`. Host names are checked when they are resolved ([`GuardedResolver`]).
pub(crate) fn check_redirect(origin: &Url, target: &Url) -> Result<(), RedirectRefused> {
    let same_host = origin.host() == target.host();
    let same_origin = same_host
        && origin.scheme() == target.scheme()
        && origin.port_or_known_default() == target.port_or_known_default();
    if target.scheme() != "https" && !same_origin {
        return Err(RedirectRefused::Scheme(target.clone()));
    }
    if let Some(ip) = ip_literal(target)
        && is_internal(ip)
        && !same_host
    {
        return Err(RedirectRefused::Internal(target.clone()));
    }
    Ok(())
}

/// The redirect policy of the mirror's registry client ([`check_redirect`]).
pub(crate) fn redirect_policy() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        if attempt.previous().len() > MAX_REDIRECTS {
            return attempt.error(RedirectRefused::TooMany);
        }
        let verdict = match attempt.previous().first() {
            Some(origin) => check_redirect(origin, attempt.url()),
            None => Ok(()),
        };
        match verdict {
            Ok(()) => attempt.follow(),
            Err(e) => {
                tracing::warn!(error = %e, "registry redirect not followed");
                attempt.error(e)
            }
        }
    })
}

/// A host name that resolved to internal addresses only.
#[derive(Debug, thiserror::Error)]
#[error("{0} resolves only to loopback, link-local or cloud-metadata addresses, which are refused")]
pub(crate) struct InternalOnly(String);

impl InternalOnly {
    /// The name that was refused.
    pub(crate) fn host(&self) -> &str {
        &self.0
    }
}

/// The registry client's DNS: the configured registries' host names resolve as usual (the
/// operator chose them, `localhost` included); every other name loses its internal addresses.
#[derive(Debug)]
pub(crate) struct GuardedResolver {
    trusted: HashSet<String>,
}

impl GuardedResolver {
    pub(crate) fn new(cfg: &MirrorConfig) -> GuardedResolver {
        let trusted = cfg
            .upstream
            .iter()
            .chain(cfg.registries.values())
            .filter_map(|u| match u.host()? {
                Host::Domain(d) => Some(d.trim_end_matches('.').to_ascii_lowercase()),
                Host::Ipv4(_) | Host::Ipv6(_) => None,
            })
            .collect();
        GuardedResolver { trusted }
    }

    fn trusts(&self, host: &str) -> bool {
        self.trusted
            .contains(host.trim_end_matches('.').to_ascii_lowercase().as_str())
    }
}

/// `addrs` without internal addresses, unless `trusted`; an error if nothing is left.
fn filter_addrs(
    host: &str,
    addrs: Vec<SocketAddr>,
    trusted: bool,
) -> Result<Vec<SocketAddr>, InternalOnly> {
    if trusted {
        return Ok(addrs);
    }
    let kept: Vec<SocketAddr> = addrs.into_iter().filter(|a| !is_internal(a.ip())).collect();
    if kept.is_empty() {
        return Err(InternalOnly(host.to_owned()));
    }
    Ok(kept)
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_owned();
        let trusted = self.trusts(&host);
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let kept = filter_addrs(&host, addrs, trusted).inspect_err(|e| {
                tracing::warn!(error = %e, "registry host refused");
            })?;
            Ok::<Addrs, Box<dyn std::error::Error + Send + Sync>>(Box::new(kept.into_iter()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn internal_addresses() {
        for ip in [
            "127.0.0.1",
            "127.1.2.3",
            "0.0.0.0",
            "169.254.169.254",
            "169.254.0.1",
            "100.100.100.200",
            "::1",
            "::",
            "fe80::1",
            "febf::1",
            "fd00:ec2::254",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert!(is_internal(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "10.0.0.1",
            "192.168.1.1",
            "8.8.8.8",
            "100.100.100.201",
            "2001:db8::1",
            "fec0::1",
            "fd00:ec2::253",
            "::ffff:8.8.8.8",
        ] {
            assert!(!is_internal(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn redirects_go_to_https_or_the_same_origin() {
        let reg = url("https://reg.example/v2/x/manifests/1");
        let ok = [
            "https://objects.example/blob?sig=1",
            "https://reg.example:8443/v2/y",
            "https://10.0.0.5/blob",
        ];
        for t in ok {
            assert!(check_redirect(&reg, &url(t)).is_ok(), "{t}");
        }
        let refused = [
            "http://reg.example/v2/y",
            "http://objects.example/blob",
            "ftp://reg.example/x",
            "https://127.0.0.1/secret",
            "https://127.0.0.1:5000/secret",
            "https://[::1]/secret",
            "https://169.254.169.254/latest/meta-data/",
            "https://[fd00:ec2::254]/latest/meta-data/",
            "https://100.100.100.200/latest/meta-data/",
            "https://[fe80::1]/x",
            "https://[::ffff:127.0.0.1]/x",
            "https://0.0.0.0/x",
        ];
        for t in refused {
            assert!(check_redirect(&reg, &url(t)).is_err(), "{t}");
        }
        // A plain-http registry may redirect within itself, not elsewhere over http.
        let plain = url("http://reg.example:5000/v2/x/tags/list");
        assert!(check_redirect(&plain, &url("http://reg.example:5000/v2/y")).is_ok());
        assert!(check_redirect(&plain, &url("http://reg.example:5001/v2/y")).is_err());
        assert!(check_redirect(&plain, &url("http://reg.example/v2/y")).is_err());
        // A registry on loopback: its own host, yes; another loopback address or port over
        // http, no.
        let local = url("http://127.0.0.1:5000/v2/x/manifests/1");
        assert!(check_redirect(&local, &url("http://127.0.0.1:5000/v2/y")).is_ok());
        assert!(check_redirect(&local, &url("https://127.0.0.1:5443/v2/y")).is_ok());
        assert!(check_redirect(&local, &url("http://127.0.0.1:6000/secret")).is_err());
        assert!(check_redirect(&local, &url("https://127.0.0.2/secret")).is_err());
        assert!(check_redirect(&local, &url("https://169.254.169.254/")).is_err());
    }

    #[test]
    fn only_configured_names_may_resolve_to_internal_addresses() {
        let cfg = MirrorConfig {
            upstream: Some(url("http://LocalHost:5000")),
            registries: [("r".to_owned(), url("https://reg.internal"))].into(),
            ..MirrorConfig::default()
        };
        let r = GuardedResolver::new(&cfg);
        assert!(r.trusts("localhost"));
        assert!(r.trusts("reg.internal."));
        assert!(!r.trusts("evil.example"));
        let lo: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let md: SocketAddr = "169.254.169.254:0".parse().unwrap();
        let public: SocketAddr = "203.0.113.7:0".parse().unwrap();
        assert_eq!(filter_addrs("localhost", vec![lo], true).unwrap(), [lo]);
        assert!(filter_addrs("evil.example", vec![lo, md], false).is_err());
        assert_eq!(
            filter_addrs("mixed.example", vec![lo, public, md], false).unwrap(),
            [public]
        );
    }
}
