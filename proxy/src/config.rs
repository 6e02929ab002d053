//! [`MirrorConfig`]: the `[proxy]` section of the node's config file (and the `--mirror-*` flags).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};
use url::Url;

/// The registry mirror's settings. Every field has a default; the mirror runs only when `listen`
/// is set.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MirrorConfig {
    /// Where the mirror serves the registry API, `HOST:PORT`. Default: none (mirror off).
    pub listen: Option<SocketAddr>,
    /// The registry for requests without containerd's `?ns=` parameter (docker's
    /// `registry-mirrors`, podman and skopeo mirrors), e.g. `https://registry.example:5000`.
    /// Default: none (such requests get 404 `NAME_UNKNOWN` with an explanation).
    #[serde(with = "url_serde::option")]
    pub upstream: Option<Url>,
    /// Where requests with `?ns=HOST` go, `HOST = URL`. `?ns=` naming the `upstream`'s own
    /// `HOST[:PORT]` goes to `upstream`. Any other host is refused (403 `DENIED`) unless
    /// `allow_unmapped` is set. Default: empty.
    #[serde(with = "url_serde::map")]
    pub registries: BTreeMap<String, Url>,
    /// Serve `?ns=HOST` for hosts not in `registries` too, from `https://HOST` (never a loopback,
    /// link-local or cloud-metadata address; `docker.io` still needs an entry, since Docker Hub's
    /// API is served by another host). This makes the mirror a proxy to any HTTPS registry its
    /// clients name. Default: `false`.
    pub allow_unmapped: bool,
    /// How long a manifest looked up by tag is reused before asking the registry again. Manifests
    /// by digest are immutable and kept until evicted. Default: `10s`.
    #[serde(with = "humantime_serde")]
    pub tag_ttl: Duration,
    /// Memory for cached manifests. Default: `64MiB`.
    pub manifest_cache: ByteSize,
    /// Largest manifest accepted from a registry. Default: `8MiB`.
    pub max_manifest_size: ByteSize,
    /// Requests served at once; more get 429 `TOOMANYREQUESTS`. Default: `512`.
    pub max_concurrent_requests: usize,
    /// Client connections open at once, idle or busy; more are answered 429 `TOOMANYREQUESTS`
    /// and closed. Default: `1024`.
    pub max_connections: usize,
    /// How long a client has to send a request's headers, counted from the connection's start
    /// or the end of its previous response; a connection that takes longer (or sits idle that
    /// long) is closed. Must be more than zero. Default: `10s`.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// PEM files of extra CA certificates trusted for HTTPS registries. They also apply to the
    /// node's origin fetches, since blobs are fetched by the node. Default: none.
    pub ca_bundle: Vec<PathBuf>,
    /// Accept any TLS certificate from registries (test setups only). Default: `false`.
    pub insecure: bool,
    /// Timeout for connecting to a registry. Default: `10s`.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Timeout for a registry's answer to a manifest or ping request. Default: `60s`.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

impl Default for MirrorConfig {
    fn default() -> Self {
        MirrorConfig {
            listen: None,
            upstream: None,
            registries: BTreeMap::new(),
            allow_unmapped: false,
            tag_ttl: Duration::from_secs(10),
            manifest_cache: ByteSize::mib(64),
            max_manifest_size: ByteSize::mib(8),
            max_concurrent_requests: 512,
            max_connections: 1024,
            header_timeout: Duration::from_secs(10),
            ca_bundle: Vec::new(),
            insecure: false,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
        }
    }
}

/// URLs in the config file as strings (checked: http or https).
mod url_serde {
    use serde::de::Error;
    use url::Url;

    fn parse<E: Error>(s: &str) -> Result<Url, E> {
        let u = Url::parse(s).map_err(|e| E::custom(format!("invalid URL {s:?}: {e}")))?;
        if !matches!(u.scheme(), "http" | "https") {
            return Err(E::custom(format!(
                "registry URL must be http or https: {s}"
            )));
        }
        Ok(u)
    }

    pub(super) mod option {
        use serde::{Deserialize, Deserializer, Serializer};
        use url::Url;

        pub(crate) fn serialize<S: Serializer>(u: &Option<Url>, s: S) -> Result<S::Ok, S::Error> {
            match u {
                Some(u) => s.serialize_some(u.as_str()),
                None => s.serialize_none(),
            }
        }

        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<Url>, D::Error> {
            Option::<String>::deserialize(d)?
                .map(|s| super::parse(&s))
                .transpose()
        }
    }

    pub(super) mod map {
        use std::collections::BTreeMap;

        use serde::{Deserialize, Deserializer, Serializer};
        use url::Url;

        pub(crate) fn serialize<S: Serializer>(
            m: &BTreeMap<String, Url>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            s.collect_map(m.iter().map(|(k, v)| (k, v.as_str())))
        }

        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<BTreeMap<String, Url>, D::Error> {
            BTreeMap::<String, String>::deserialize(d)?
                .into_iter()
                .map(|(k, v)| Ok((k, super::parse(&v)?)))
                .collect()
        }
    }
}

/// Parses a `--mirror-registry HOST=URL` flag.
pub fn parse_registry_mapping(s: &str) -> Result<(String, Url), String> {
    let (host, url) = s
        .split_once('=')
        .ok_or_else(|| format!("expected HOST=URL, got {s:?}"))?;
    let host = host.trim();
    if host.is_empty() || host.contains('/') {
        return Err(format!("invalid registry host {host:?}"));
    }
    let url = Url::parse(url.trim()).map_err(|e| format!("invalid registry URL {url:?}: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("registry URL must be http or https: {url}"));
    }
    Ok((host.to_owned(), url))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_toml() {
        let c: MirrorConfig = toml::from_str(
            r#"
            listen = "127.0.0.1:5001"
            upstream = "http://127.0.0.1:5000"
            tag_ttl = "2s"
            [registries]
            "docker.io" = "https://hub.example"
            "#,
        )
        .unwrap();
        assert_eq!(c.listen, Some("127.0.0.1:5001".parse().unwrap()));
        assert_eq!(c.tag_ttl, Duration::from_secs(2));
        assert_eq!(c.registries["docker.io"].as_str(), "https://hub.example/");
        assert_eq!(c.max_concurrent_requests, 512);
        assert!(!c.allow_unmapped);
        assert_eq!(c.max_connections, 1024);
        assert_eq!(c.header_timeout, Duration::from_secs(10));
        let c: MirrorConfig =
            toml::from_str("allow_unmapped = true\nheader_timeout = \"1s\"\nmax_connections = 8")
                .unwrap();
        assert!(c.allow_unmapped);
        assert_eq!(c.header_timeout, Duration::from_secs(1));
        assert_eq!(c.max_connections, 8);
        assert!(toml::from_str::<MirrorConfig>("bogus = 1").is_err());
        assert!(toml::from_str::<MirrorConfig>("upstream = \"ftp://x\"").is_err());
        assert!(toml::from_str::<MirrorConfig>("upstream = \"not a url\"").is_err());
    }

    #[test]
    fn registry_flags() {
        let (h, u) = parse_registry_mapping("127.0.0.1:5000=http://127.0.0.1:5000").unwrap();
        assert_eq!(h, "127.0.0.1:5000");
        assert_eq!(u.as_str(), "http://127.0.0.1:5000/");
        assert!(parse_registry_mapping("nohost").is_err());
        assert!(parse_registry_mapping("=http://x").is_err());
        assert!(parse_registry_mapping("h=ftp://x").is_err());
    }
}
