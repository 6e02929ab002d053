//! Resolving an image for a preheat: the reference, the registry's auth challenge, and the walk
//! from a tag through an OCI index or Docker manifest list to each platform's manifest, config
//! and layers. Every blob becomes a digest task with the URL the registry mirror uses, so a pull
//! through any node's mirror later joins the same swarm.

use std::sync::Arc;

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use df_protocols::task::{ContentDigest, parse_url};
use futures::StreamExt;
use serde::Deserialize;
use url::Url;

use crate::origin::{OriginError, OriginResponse, OriginSpec, Requester, display_url};
use crate::task::{DownloadRequest, TaskContext};

/// The largest manifest or index read (the mirror's default `max_manifest_size` too).
pub const MAX_MANIFEST: u64 = 4 << 20;
/// How many platform manifests an index may name.
const MAX_PLATFORMS: usize = 64;
/// How many blobs one manifest may name.
const MAX_LAYERS: usize = 1024;

/// What a manifest request accepts: indexes and lists first, then single-image manifests.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json";

/// `REGISTRY/REPO:TAG` or `REGISTRY/REPO@DIGEST`, with `http://` for a plain-HTTP registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// `scheme://host[:port]`, no trailing slash: the same base the mirror builds URLs from.
    pub base: String,
    pub repo: String,
    pub reference: Reference,
}

pub use df_protocols::task::ManifestReference as Reference;

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sep = match self.reference {
            Reference::Tag(_) => ':',
            Reference::Digest(_) => '@',
        };
        write!(f, "{}/{}{sep}{}", self.base, self.repo, self.reference)
    }
}

impl ImageRef {
    pub fn parse(s: &str) -> Result<ImageRef, String> {
        let bad = |why: &str| format!("image {s:?}: {why}");
        let (scheme, rest) = match s.split_once("://") {
            Some(("http", r)) => ("http", r),
            Some(("https", r)) => ("https", r),
            Some(_) => return Err(bad("only http:// and https:// registries")),
            None => ("https", s),
        };
        let (host, path) = rest
            .split_once('/')
            .ok_or_else(|| bad("name the registry and the repository (REGISTRY/REPO:TAG)"))?;
        if !(host.contains('.') || host.contains(':') || host == "localhost") {
            return Err(bad(
                "name the registry host first (REGISTRY/REPO:TAG): a bare Docker Hub name is \
                 ambiguous",
            ));
        }
        let base = format!("{scheme}://{host}");
        let parsed = Url::parse(&base).map_err(|e| bad(&format!("registry: {e}")))?;
        if parsed.host_str().is_none() || parsed.path() != "/" {
            return Err(bad("registry is not a host[:port]"));
        }
        let (repo, reference) = if let Some((repo, digest)) = path.split_once('@') {
            let d = digest
                .parse::<ContentDigest>()
                .map_err(|e| bad(&e.to_string()))?;
            // `repo:tag@digest`: the digest wins, as docker does.
            let repo = match repo.rsplit_once(':') {
                Some((r, t)) if !t.contains('/') => r,
                _ => repo,
            };
            (repo, Reference::Digest(d))
        } else {
            match path.rsplit_once(':') {
                Some((repo, tag)) if !tag.contains('/') => (repo, Reference::Tag(tag.to_owned())),
                _ => (path, Reference::Tag("latest".to_owned())),
            }
        };
        let repo_ok = !repo.is_empty()
            && repo.len() <= 255
            && repo.split('/').all(|c| {
                !c.is_empty()
                    && c.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)
                    })
            });
        if !repo_ok {
            return Err(bad(
                "repository names are lowercase letters, digits, '.', '_', '-' and '/'",
            ));
        }
        if let Reference::Tag(t) = &reference {
            let tag_ok = !t.is_empty()
                && t.len() <= 128
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !tag_ok {
                return Err(bad("a tag is 1-128 letters, digits, '.', '_' or '-'"));
            }
        }
        Ok(ImageRef {
            base,
            repo: repo.to_owned(),
            reference,
        })
    }

    pub fn manifest_url(&self, reference: &str) -> String {
        format!("{}/v2/{}/manifests/{reference}", self.base, self.repo)
    }

    pub fn blob_url(&self, digest: &ContentDigest) -> String {
        format!("{}/v2/{}/blobs/{digest}", self.base, self.repo)
    }
}

/// `os/architecture[/variant]`, as docker's `--platform`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    pub fn parse(s: &str) -> Result<Platform, String> {
        let parts: Vec<&str> = s.split('/').collect();
        let ok = |p: &&str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric());
        match parts.as_slice() {
            [os, arch] if ok(os) && ok(arch) => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: None,
            }),
            [os, arch, v] if ok(os) && ok(arch) && ok(v) => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: Some(v.to_string()),
            }),
            _ => Err(format!(
                "platform {s:?}: use OS/ARCHITECTURE[/VARIANT], e.g. linux/amd64"
            )),
        }
    }

    fn matches(&self, p: &WirePlatform) -> bool {
        self.os == p.os
            && self.architecture == p.architecture
            && (self.variant.is_none() || self.variant == p.variant)
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
struct WireManifest {
    #[serde(rename = "schemaVersion", default)]
    schema_version: u32,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

#[derive(Debug, Deserialize)]
struct Descriptor {
    digest: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    platform: Option<WirePlatform>,
}

#[derive(Debug, Deserialize)]
struct WirePlatform {
    os: String,
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

impl WirePlatform {
    fn label(&self) -> String {
        match &self.variant {
            Some(v) => format!("{}/{}/{v}", self.os, self.architecture),
            None => format!("{}/{}", self.os, self.architecture),
        }
    }
}

/// What a manifest names.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// An index or manifest list: the platform manifests chosen, with their platforms.
    Index(Vec<(ContentDigest, String)>),
    /// An image manifest: its config and layers, with sizes.
    Image {
        config: (ContentDigest, Option<u64>),
        layers: Vec<(ContentDigest, Option<u64>)>,
    },
}

/// Parses a manifest body; for an index, keeps the manifests of `platform` (all when `None`).
pub fn parse_manifest(body: &[u8], platform: Option<&Platform>) -> Result<Parsed, String> {
    let m: WireManifest =
        serde_json::from_slice(body).map_err(|e| format!("not a manifest: {e}"))?;
    let digest = |d: &Descriptor| {
        d.digest
            .parse::<ContentDigest>()
            .map_err(|e| format!("manifest names a bad digest: {e}"))
    };
    if let Some(list) = m.manifests {
        if list.len() > MAX_PLATFORMS {
            return Err(format!(
                "the index names {} manifests (at most {MAX_PLATFORMS})",
                list.len()
            ));
        }
        let mut chosen = Vec::new();
        for d in &list {
            let label = d
                .platform
                .as_ref()
                .map(WirePlatform::label)
                .unwrap_or_else(|| "unknown".to_owned());
            let keep = match (platform, &d.platform) {
                (None, _) => true,
                (Some(want), Some(p)) => want.matches(p),
                (Some(_), None) => false,
            };
            if keep {
                chosen.push((digest(d)?, label));
            }
        }
        if chosen.is_empty() {
            let have: Vec<String> = list
                .iter()
                .filter_map(|d| d.platform.as_ref().map(WirePlatform::label))
                .collect();
            return Err(format!(
                "platform {} is not in the image (it has {})",
                platform.map(|p| p.to_string()).unwrap_or_default(),
                if have.is_empty() {
                    "no platform".to_owned()
                } else {
                    have.join(", ")
                }
            ));
        }
        return Ok(Parsed::Index(chosen));
    }
    if m.schema_version == 1 {
        return Err("Docker schema 1 manifests are not supported".into());
    }
    let config = m
        .config
        .ok_or_else(|| "the manifest names no config".to_owned())?;
    let layers = m.layers.unwrap_or_default();
    if layers.len() > MAX_LAYERS {
        return Err(format!(
            "the manifest names {} layers (at most {MAX_LAYERS})",
            layers.len()
        ));
    }
    Ok(Parsed::Image {
        config: (digest(&config)?, config.size),
        layers: layers
            .iter()
            .map(|d| Ok((digest(d)?, d.size)))
            .collect::<Result<_, String>>()?,
    })
}

/// One task a preheat of an image creates.
pub(crate) struct ImageTask {
    /// `index`, `manifest`, `config` or `layer`, and the platform where one applies.
    pub what: String,
    pub request: DownloadRequest,
}

/// Reads manifests from a registry as this node's user would (the origin guard applies), with
/// the registry's auth challenge answered from the preheat's credentials.
pub(crate) struct RegistryReader {
    ctx: Arc<TaskContext>,
    image: ImageRef,
    creds: Option<(String, String)>,
    /// The `Authorization` value in use (none until the registry asked for one).
    auth: Option<String>,
}

impl RegistryReader {
    pub(crate) fn new(
        ctx: Arc<TaskContext>,
        image: ImageRef,
        creds: Option<(String, String)>,
    ) -> RegistryReader {
        RegistryReader {
            ctx,
            image,
            creds,
            auth: None,
        }
    }

    /// The headers every task of this image is fetched with.
    pub(crate) fn headers(&self) -> Vec<(String, String)> {
        self.auth
            .iter()
            .map(|a| ("Authorization".to_owned(), a.clone()))
            .collect()
    }

    /// Resolves the image to its tasks: the manifests (by digest, and the tag's as a URL task
    /// the mirror falls back to when the registry is down), each platform's config and layers.
    pub(crate) async fn resolve(
        &mut self,
        platform: Option<&Platform>,
    ) -> Result<Vec<ImageTask>, String> {
        let top_ref = self.image.reference.to_string();
        let top = self.manifest(&top_ref, None).await?;
        let top_digest = digest_of(&top, self.image.reference.clone());
        let mut tasks = Vec::new();
        let mut images: Vec<(ContentDigest, Bytes, String)> = Vec::new();
        let top_kind;
        match parse_manifest(&top, platform)? {
            Parsed::Index(list) => {
                top_kind = "index";
                for (d, label) in list {
                    let body = self.manifest(&d.to_string(), Some(&d)).await?;
                    images.push((d, body, label));
                }
            }
            Parsed::Image { .. } => {
                top_kind = "manifest";
                images.push((top_digest.clone(), top.clone(), String::new()));
            }
        }
        if let Reference::Tag(tag) = &self.image.reference {
            let mut headers = self.headers();
            headers.push(("Accept".to_owned(), MANIFEST_ACCEPT.to_owned()));
            tasks.push(ImageTask {
                what: format!("tag {tag}"),
                request: DownloadRequest {
                    url: self.image.manifest_url(tag),
                    headers,
                    requester: Requester::Registry,
                    ..DownloadRequest::default()
                },
            });
        }
        tasks.push(self.digest_task(top_kind.to_owned(), &top_digest, true));
        for (d, body, label) in images {
            let suffix = if label.is_empty() {
                String::new()
            } else {
                format!(" ({label})")
            };
            if d != top_digest {
                tasks.push(self.digest_task(format!("manifest{suffix}"), &d, true));
            }
            match parse_manifest(&body, None)? {
                Parsed::Image { config, layers } => {
                    tasks.push(self.digest_task(format!("config{suffix}"), &config.0, false));
                    for (i, (l, _)) in layers.iter().enumerate() {
                        tasks.push(self.digest_task(format!("layer {i}{suffix}"), l, false));
                    }
                }
                Parsed::Index(_) => {
                    return Err(format!("{d}: an index inside an index is not supported"));
                }
            }
        }
        // A layer shared by two platforms is one task.
        let mut seen = std::collections::HashSet::new();
        tasks.retain(|t| seen.insert(t.request.task_key().ok()));
        Ok(tasks)
    }

    fn digest_task(&self, what: String, digest: &ContentDigest, manifest: bool) -> ImageTask {
        let mut headers = self.headers();
        let url = if manifest {
            headers.push(("Accept".to_owned(), MANIFEST_ACCEPT.to_owned()));
            self.image.manifest_url(&digest.to_string())
        } else {
            self.image.blob_url(digest)
        };
        ImageTask {
            what,
            request: DownloadRequest {
                url,
                headers,
                digest: Some(digest.clone()),
                requester: Requester::Registry,
                ..DownloadRequest::default()
            },
        }
    }

    /// GETs a manifest, answering one auth challenge; checks the digest when one is expected.
    async fn manifest(
        &mut self,
        reference: &str,
        expect: Option<&ContentDigest>,
    ) -> Result<Bytes, String> {
        let url = self.image.manifest_url(reference);
        let body = match self.get(&url, MANIFEST_ACCEPT).await {
            Err(OriginError::Status {
                status: 401,
                challenge,
                ..
            }) if self.auth.is_none() => {
                self.authorize(challenge.as_deref()).await?;
                self.get(&url, MANIFEST_ACCEPT).await
            }
            other => other,
        };
        let body = body.map_err(|e| match e {
            OriginError::Status { status: 404, .. } => {
                format!("{}: not found in the registry (404)", self.image)
            }
            OriginError::Status { status: 401, .. } | OriginError::Status { status: 403, .. } => {
                format!("{}: the registry refused the credentials ({e})", self.image)
            }
            e => format!("{}: {e}", self.image),
        })?;
        if let Some(want) = expect {
            let mut h = want.algorithm().hasher();
            h.update(&body);
            let got = h.finish();
            if got != *want {
                return Err(format!(
                    "{url}: the registry sent a manifest with digest {got}, expected {want}"
                ));
            }
        }
        Ok(body)
    }

    async fn get(&self, url: &str, accept: &str) -> Result<Bytes, OriginError> {
        let parsed = parse_url(url).map_err(|e| OriginError::Protocol(e.to_string()))?;
        let mut headers = vec![("Accept".to_owned(), accept.to_owned())];
        headers.extend(self.headers());
        let spec = OriginSpec {
            url: parsed,
            headers,
            requester: Requester::Local,
        };
        let resp = self.ctx.origin.open(&spec, 0..MAX_MANIFEST).await?;
        read_small(resp, &spec.url).await
    }

    /// Answers a 401: Basic with the credentials, or a Bearer token from the registry's token
    /// service (asked with the credentials when there are some).
    async fn authorize(&mut self, challenge: Option<&str>) -> Result<(), String> {
        let basic = self.creds.as_ref().map(|(u, p)| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        });
        let no_creds = || {
            format!(
                "{}: the image is private: give the registry's username and password",
                self.image
            )
        };
        let challenge = challenge.unwrap_or("Basic");
        let (scheme, params) = challenge.split_once(' ').unwrap_or((challenge, ""));
        if scheme.eq_ignore_ascii_case("basic") {
            self.auth = Some(basic.ok_or_else(no_creds)?);
            return Ok(());
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(format!(
                "{}: the registry asks for {scheme} authentication, which df does not speak",
                self.image
            ));
        }
        let p = challenge_params(params);
        let realm = p
            .iter()
            .find(|(k, _)| k == "realm")
            .map(|(_, v)| v.clone())
            .ok_or_else(|| {
                format!(
                    "{}: the registry's Bearer challenge names no realm",
                    self.image
                )
            })?;
        let mut token_url =
            Url::parse(&realm).map_err(|e| format!("token service {realm:?}: {e}"))?;
        {
            let mut q = token_url.query_pairs_mut();
            if let Some((_, s)) = p.iter().find(|(k, _)| k == "service") {
                q.append_pair("service", s);
            }
            q.append_pair("scope", &format!("repository:{}:pull", self.image.repo));
        }
        let spec = OriginSpec {
            url: token_url.clone(),
            headers: basic
                .iter()
                .map(|b| ("Authorization".to_owned(), b.clone()))
                .collect(),
            requester: Requester::Local,
        };
        let resp = self
            .ctx
            .origin
            .open(&spec, 0..MAX_MANIFEST)
            .await
            .map_err(|e| match e {
                OriginError::Status { status: 401, .. } if self.creds.is_none() => no_creds(),
                e => format!("{}: token service: {e}", self.image),
            })?;
        let body = read_small(resp, &token_url)
            .await
            .map_err(|e| format!("{}: token service: {e}", self.image))?;
        #[derive(Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let t: Token = serde_json::from_slice(&body)
            .map_err(|e| format!("{}: token service answered {e}", self.image))?;
        let token = t
            .token
            .or(t.access_token)
            .ok_or_else(|| format!("{}: token service sent no token", self.image))?;
        self.auth = Some(format!("Bearer {token}"));
        Ok(())
    }
}

/// Reads an answer of at most [`MAX_MANIFEST`] bytes (a manifest, a token) into memory.
async fn read_small(resp: OriginResponse, url: &Url) -> Result<Bytes, OriginError> {
    let too_large =
        || OriginError::Protocol(format!("{} is over {MAX_MANIFEST} bytes", display_url(url)));
    if resp.content_length > MAX_MANIFEST {
        return Err(too_large());
    }
    let mut body = BytesMut::new();
    let mut s = resp.body;
    while let Some(chunk) = s.next().await {
        body.extend_from_slice(&chunk?);
        if body.len() as u64 > MAX_MANIFEST {
            return Err(too_large());
        }
    }
    Ok(body.freeze())
}

/// The digest naming `body`: the reference's when it is one, else sha256 of the bytes.
fn digest_of(body: &[u8], reference: Reference) -> ContentDigest {
    match reference {
        Reference::Digest(d) => d,
        Reference::Tag(_) => {
            let mut h = df_protocols::task::DigestAlgorithm::Sha256.hasher();
            h.update(body);
            h.finish()
        }
    }
}

/// `realm="…",service="…"` → pairs (quoted values may hold commas).
fn challenge_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let Some((k, v)) = rest.split_once('=') else {
            break;
        };
        let k = k.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let v = v.trim_start();
        let (val, after) = if let Some(q) = v.strip_prefix('"') {
            match q.find('"') {
                Some(end) => (&q[..end], &q[end + 1..]),
                None => (q, ""),
            }
        } else {
            match v.find(',') {
                Some(end) => (&v[..end], &v[end..]),
                None => (v, ""),
            }
        };
        out.push((k, val.to_owned()));
        rest = after.trim_start_matches(',').trim();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";
    const D3: &str = "sha256:3333333333333333333333333333333333333333333333333333333333333333";

    #[test]
    fn image_references_parse_like_docker_and_name_their_registry() {
        let r = ImageRef::parse("registry.example:5000/team/app:1.2").unwrap();
        assert_eq!(r.base, "https://registry.example:5000");
        assert_eq!(r.repo, "team/app");
        assert_eq!(r.reference, Reference::Tag("1.2".into()));
        assert_eq!(
            r.manifest_url("1.2"),
            "https://registry.example:5000/v2/team/app/manifests/1.2"
        );
        let r = ImageRef::parse("http://127.0.0.1:5000/app").unwrap();
        assert_eq!(r.base, "http://127.0.0.1:5000");
        assert_eq!(r.reference, Reference::Tag("latest".into()));
        let r = ImageRef::parse(&format!("localhost/app:old@{D1}")).unwrap();
        assert_eq!(r.repo, "app");
        assert_eq!(r.reference, Reference::Digest(D1.parse().unwrap()));
        for bad in [
            "ubuntu:22.04",
            "ftp://h.example/app",
            "h.example/App",
            "h.example/app:",
            "h.example/app@sha256:12",
            "h.example/",
            "h.example/a//b",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn platforms_parse_and_bad_ones_say_how_to_write_them() {
        assert_eq!(
            Platform::parse("linux/arm64/v8").unwrap().to_string(),
            "linux/arm64/v8"
        );
        let e = Platform::parse("amd64").unwrap_err();
        assert!(e.contains("linux/amd64"), "{e}");
    }

    fn index() -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[
            {{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{D1}","size":10,"platform":{{"os":"linux","architecture":"amd64"}}}},
            {{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{D2}","size":10,"platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}}]}}"#
        )
    }

    #[test]
    fn an_index_is_walked_to_the_platform_asked_for_or_to_all() {
        let all = parse_manifest(index().as_bytes(), None).unwrap();
        assert_eq!(
            all,
            Parsed::Index(vec![
                (D1.parse().unwrap(), "linux/amd64".into()),
                (D2.parse().unwrap(), "linux/arm64/v8".into())
            ])
        );
        let arm = parse_manifest(
            index().as_bytes(),
            Some(&Platform::parse("linux/arm64").unwrap()),
        )
        .unwrap();
        assert_eq!(
            arm,
            Parsed::Index(vec![(D2.parse().unwrap(), "linux/arm64/v8".into())])
        );
        let e = parse_manifest(
            index().as_bytes(),
            Some(&Platform::parse("linux/s390x").unwrap()),
        )
        .unwrap_err();
        assert!(
            e.contains("linux/s390x") && e.contains("linux/amd64, linux/arm64/v8"),
            "{e}"
        );
    }

    #[test]
    fn an_image_manifest_names_its_config_and_layers() {
        let m = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{D1}","size":5}},"layers":[{{"digest":"{D2}","size":7}},{{"digest":"{D3}"}}]}}"#
        );
        assert_eq!(
            parse_manifest(m.as_bytes(), None).unwrap(),
            Parsed::Image {
                config: (D1.parse().unwrap(), Some(5)),
                layers: vec![(D2.parse().unwrap(), Some(7)), (D3.parse().unwrap(), None)],
            }
        );
        assert!(
            parse_manifest(br#"{"schemaVersion":1,"fsLayers":[]}"#, None)
                .unwrap_err()
                .contains("schema 1")
        );
        assert!(parse_manifest(b"<html>", None).is_err());
        let bad = r#"{"schemaVersion":2,"config":{"digest":"md5:00"},"layers":[]}"#;
        assert!(parse_manifest(bad.as_bytes(), None).is_err());
    }

    #[test]
    fn bearer_challenges_are_split_into_their_parameters() {
        let p = challenge_params(
            r#"realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(
            p,
            vec![
                ("realm".into(), "https://auth.example/token".into()),
                ("service".into(), "registry.example".into()),
                ("scope".into(), "repository:a/b:pull,push".into()),
            ]
        );
        assert!(challenge_params("").is_empty());
        assert_eq!(challenge_params("realm=x").len(), 1);
    }
}
