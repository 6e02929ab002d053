//! Task identity.
//!
//! A *task* is one piece of content to distribute. Its key, [`TaskKey`], is a CIDv1:
//!
//! * **Digest task** — when the whole content's digest is known in advance (an OCI blob `sha256:…`, or
//!   `df get --digest`), the key is the content's own CID: codec `raw` (0x55) over the digest's multihash.
//!   The same bytes fetched from any URL or registry are therefore one swarm.
//! * **URL task** — otherwise the key names a canonical JSON descriptor `{"v":1,"url":…,"tag":…}`:
//!   codec `json` (0x0200) over the descriptor's sha2-256. The URL is canonicalised by
//!   [`canonical_url`]: userinfo and fragment dropped, filtered query parameters removed and the rest
//!   sorted.
//!
//! The canonical URL is also the task header's `source_url`, which every peer receives, stores and
//! shows. So besides the caller's `--filtered-query-param`s, the query parameters that carry
//! credentials, signatures or expiry times of signed URLs are removed by default (see
//! [`is_filtered_by_default`]):
//!
//! | origin | parameters removed |
//! |---|---|
//! | AWS S3 (SigV4 / SigV2) | every `X-Amz-*`; `AWSAccessKeyId`, `Signature`, `Expires` |
//! | Google Cloud Storage (V4 / V2) | every `X-Goog-*`; `GoogleAccessId`, `Signature`, `Expires` |
//! | Google Cloud CDN signed URLs | `Expires`, `KeyName`, `Signature`, `URLPrefix` |
//! | Amazon CloudFront | `Policy`, `Signature`, `Expires`, `Key-Pair-Id` |
//! | Alibaba OSS (V1 / V4) | `OSSAccessKeyId`, `Signature`, `Expires`, `security-token`, `x-oss-signature-version`, `x-oss-credential`, `x-oss-date`, `x-oss-expires`, `x-oss-signature`, `x-oss-additional-headers`, `x-oss-security-token` |
//! | Volcengine TOS | `X-Tos-Algorithm`, `X-Tos-Credential`, `X-Tos-Date`, `X-Tos-Expires`, `X-Tos-SignedHeaders`, `X-Tos-Signature`, `X-Tos-Security-Token` |
//! | Tencent COS | `q-sign-algorithm`, `q-ak`, `q-sign-time`, `q-key-time`, `q-header-list`, `q-url-param-list`, `q-signature`, `x-cos-security-token` |
//! | Huawei OBS | `AccessKeyId`, `Signature`, `Expires`, `x-obs-security-token` |
//! | Akamai token auth | `__token__`, `hdnts`, `hdnea` |
//! | bearer tokens and API keys | `token`, `access_token`, `id_token`, `refresh_token`, `private_token`, `job_token`, `api_key`, `apikey`, `client_secret` |
//! | Azure Blob SAS, **only when the query has a `sig`** | `sv`, `ss`, `srt`, `sp`, `se`, `st`, `spr`, `sip`, `sig`, `sr`, `si`, `sdd`, `ses`, `skoid`, `sktid`, `skt`, `ske`, `sks`, `skv`, `saoid`, `suoid`, `scid` |
//!
//! Names are matched case-insensitively. Alibaba OSS and Volcengine TOS parameters are listed one by
//! one rather than as `x-oss-*` / `x-tos-*`, because `x-oss-process` / `x-tos-process` (image
//! processing) change the content and must stay in the key. The Azure names are short enough to
//! name content on other sites (`?sp=2`), so they are only removed from a URL that is a SAS, i.e.
//! has the signature `sig`. Parameters that name content (`?version=2`) stay.
//!
//! Credentials never enter a key: they are not part of the canonical URL.

use std::fmt;
use std::str::FromStr;

use cid::Cid;
use multihash::Multihash;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256, Sha512};
use url::Url;

use crate::limits::MAX_TASK_KEY_BYTES;

/// Multicodec `raw`: the key is the content's own CID.
pub const CODEC_RAW: u64 = 0x55;
/// Multicodec `json`: the key names a canonical JSON task descriptor.
pub const CODEC_JSON: u64 = 0x0200;
/// Multihash code of sha2-256.
pub const MH_SHA2_256: u64 = 0x12;
/// Multihash code of sha2-512.
pub const MH_SHA2_512: u64 = 0x13;

/// Query parameters removed from every URL before it names a task: they carry credentials,
/// signatures or expiry times of signed URLs and change on every request for the same bytes. Matched
/// case-insensitively. See the module docs for which origin uses which.
pub const DEFAULT_FILTERED_QUERY_PARAMS: &[&str] = &[
    // AWS S3 SigV2, Huawei OBS, Google Cloud Storage V2, Alibaba OSS V1, CloudFront, Cloud CDN.
    "AWSAccessKeyId",
    "AccessKeyId",
    "GoogleAccessId",
    "OSSAccessKeyId",
    "Signature",
    "Expires",
    // Amazon CloudFront signed URLs.
    "Policy",
    "Key-Pair-Id",
    // Google Cloud CDN signed URLs and signed URL prefixes.
    "KeyName",
    "URLPrefix",
    // Alibaba OSS: STS token (V1) and the V4 signature.
    "security-token",
    "x-oss-signature-version",
    "x-oss-credential",
    "x-oss-date",
    "x-oss-expires",
    "x-oss-signature",
    "x-oss-additional-headers",
    "x-oss-security-token",
    // Volcengine TOS.
    "X-Tos-Algorithm",
    "X-Tos-Credential",
    "X-Tos-Date",
    "X-Tos-Expires",
    "X-Tos-SignedHeaders",
    "X-Tos-Signature",
    "X-Tos-Security-Token",
    // Tencent COS.
    "q-sign-algorithm",
    "q-ak",
    "q-sign-time",
    "q-key-time",
    "q-header-list",
    "q-url-param-list",
    "q-signature",
    "x-cos-security-token",
    // Huawei OBS STS token.
    "x-obs-security-token",
    // Akamai token authentication.
    "__token__",
    "hdnts",
    "hdnea",
    // Bearer tokens and API keys passed in the query (OAuth 2.0, GitLab, GitHub raw, CDNs).
    "token",
    "access_token",
    "id_token",
    "refresh_token",
    "private_token",
    "job_token",
    "api_key",
    "apikey",
    "client_secret",
];

/// Name prefixes of query parameters removed from every URL, matched case-insensitively: every
/// `X-Amz-*` parameter of an S3 SigV4 presigned URL and every `X-Goog-*` parameter of a GCS V4
/// signed URL belongs to the signature or its credentials, never to the object's name.
pub const DEFAULT_FILTERED_QUERY_PREFIXES: &[&str] = &["X-Amz-", "X-Goog-"];

/// The fields of an Azure Storage shared access signature (service, account and user-delegation
/// SAS). Removed, case-insensitively, only from a URL whose query has the signature [`AZURE_SAS_SIGNATURE`]:
/// on their own these short names may name content elsewhere.
pub const AZURE_SAS_QUERY_PARAMS: &[&str] = &[
    "sv", "ss", "srt", "sp", "se", "st", "spr", "sip", "sig", "sr", "si", "sdd", "ses", "skoid",
    "sktid", "skt", "ske", "sks", "skv", "saoid", "suoid", "scid",
];

/// The query parameter that marks an Azure SAS URL: its signature.
pub const AZURE_SAS_SIGNATURE: &str = "sig";

/// Whether query parameter `name` is removed from a URL by default (see the module docs).
/// `is_azure_sas` tells whether the URL's query has an [`AZURE_SAS_SIGNATURE`] parameter.
pub fn is_filtered_by_default(name: &str, is_azure_sas: bool) -> bool {
    let eq = |d: &&str| d.eq_ignore_ascii_case(name);
    DEFAULT_FILTERED_QUERY_PARAMS.iter().any(eq)
        || DEFAULT_FILTERED_QUERY_PREFIXES.iter().any(|p| {
            name.get(..p.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(p))
        })
        || (is_azure_sas && AZURE_SAS_QUERY_PARAMS.iter().any(eq))
}

/// Errors in task identity input.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TaskKeyError {
    #[error("malformed URL {url:?}: {reason}")]
    MalformedUrl { url: String, reason: String },
    #[error("unsupported URL scheme {0:?} (only http and https)")]
    UnsupportedScheme(String),
    #[error("malformed digest {0:?}: expected ALGORITHM:HEX with algorithm sha256 or sha512")]
    MalformedDigest(String),
    #[error("malformed task key {0:?}")]
    MalformedKey(String),
}

/// Parses and checks a download URL: absolute, http or https, with a host.
pub fn parse_url(raw: &str) -> Result<Url, TaskKeyError> {
    let url = Url::parse(raw).map_err(|e| TaskKeyError::MalformedUrl {
        url: raw.to_owned(),
        reason: e.to_string(),
    })?;
    match url.scheme() {
        "http" | "https" => {}
        other => return Err(TaskKeyError::UnsupportedScheme(other.to_owned())),
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(TaskKeyError::MalformedUrl {
            url: raw.to_owned(),
            reason: "no host".to_owned(),
        });
    }
    Ok(url)
}

/// The URL that names a task: no userinfo, no fragment, query parameters filtered and sorted.
///
/// `filtered` names are matched exactly; the default ones ([`is_filtered_by_default`])
/// case-insensitively. Pairs are sorted by name, then value.
pub fn canonical_url(url: &Url, filtered: &[String]) -> Url {
    let mut out = url.clone();
    // Setting these on an http(s) URL cannot fail.
    let _ = out.set_username("");
    let _ = out.set_password(None);
    out.set_fragment(None);
    let is_azure_sas = url
        .query_pairs()
        .any(|(k, _)| k.eq_ignore_ascii_case(AZURE_SAS_SIGNATURE));
    let mut pairs: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| {
            !filtered.iter().any(|f| f == k) && !is_filtered_by_default(k, is_azure_sas)
        })
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    pairs.sort();
    if pairs.is_empty() {
        out.set_query(None);
    } else {
        out.query_pairs_mut().clear().extend_pairs(pairs);
    }
    out
}

/// Most characters of a rejected input quoted in an error.
const MAX_ERROR_EXCERPT: usize = 80;

/// The start of a rejected input, for an error message: errors never copy unbounded input.
fn excerpt(s: &str) -> String {
    let mut out: String = s.chars().take(MAX_ERROR_EXCERPT).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

/// A digest algorithm df can verify whole content with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DigestAlgorithm {
    Sha256,
    Sha512,
}

impl DigestAlgorithm {
    fn multihash_code(self) -> u64 {
        match self {
            DigestAlgorithm::Sha256 => MH_SHA2_256,
            DigestAlgorithm::Sha512 => MH_SHA2_512,
        }
    }

    fn len(self) -> usize {
        match self {
            DigestAlgorithm::Sha256 => 32,
            DigestAlgorithm::Sha512 => 64,
        }
    }

    fn name(self) -> &'static str {
        match self {
            DigestAlgorithm::Sha256 => "sha256",
            DigestAlgorithm::Sha512 => "sha512",
        }
    }

    /// A streaming hasher for this algorithm.
    pub fn hasher(self) -> ContentHasher {
        match self {
            DigestAlgorithm::Sha256 => ContentHasher::Sha256(Sha256::new()),
            DigestAlgorithm::Sha512 => ContentHasher::Sha512(Sha512::new()),
        }
    }
}

/// Incremental whole-content hasher matching a [`ContentDigest`]'s algorithm.
#[derive(Clone)]
pub enum ContentHasher {
    Sha256(Sha256),
    Sha512(Sha512),
}

impl ContentHasher {
    pub fn update(&mut self, data: &[u8]) {
        match self {
            ContentHasher::Sha256(h) => h.update(data),
            ContentHasher::Sha512(h) => h.update(data),
        }
    }

    pub fn finish(self) -> ContentDigest {
        match self {
            ContentHasher::Sha256(h) => ContentDigest {
                algorithm: DigestAlgorithm::Sha256,
                bytes: h.finalize().to_vec(),
            },
            ContentHasher::Sha512(h) => ContentDigest {
                algorithm: DigestAlgorithm::Sha512,
                bytes: h.finalize().to_vec(),
            },
        }
    }
}

/// An OCI manifest reference, a tag or a digest: what the registry mirror is asked for and what
/// an image preheat starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestReference {
    Tag(String),
    Digest(ContentDigest),
}

impl fmt::Display for ManifestReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ManifestReference::Tag(t) => f.write_str(t),
            ManifestReference::Digest(d) => write!(f, "{d}"),
        }
    }
}

/// A whole-content digest, written `sha256:<64 hex>` (the OCI form) or `sha512:<128 hex>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ContentDigest {
    algorithm: DigestAlgorithm,
    bytes: Vec<u8>,
}

impl ContentDigest {
    pub fn algorithm(&self) -> DigestAlgorithm {
        self.algorithm
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The digest as a multihash.
    pub fn multihash(&self) -> Multihash<64> {
        // Lengths are checked on construction, so wrapping cannot fail; fall back to an empty
        // multihash rather than panic if that invariant were ever broken.
        Multihash::wrap(self.algorithm.multihash_code(), &self.bytes).unwrap_or_default()
    }
}

impl fmt::Display for ContentDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.name(), hex::encode(&self.bytes))
    }
}

impl FromStr for ContentDigest {
    type Err = TaskKeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || TaskKeyError::MalformedDigest(excerpt(s));
        let (alg, hex_part) = s.split_once(':').ok_or_else(bad)?;
        let algorithm = if alg.eq_ignore_ascii_case("sha256") {
            DigestAlgorithm::Sha256
        } else if alg.eq_ignore_ascii_case("sha512") {
            DigestAlgorithm::Sha512
        } else {
            return Err(bad());
        };
        // The length is checked before decoding, so nothing is allocated for oversized input.
        if hex_part.len() != 2 * algorithm.len() {
            return Err(bad());
        }
        let mut bytes = vec![0; algorithm.len()];
        hex::decode_to_slice(hex_part, &mut bytes).map_err(|_| bad())?;
        Ok(ContentDigest { algorithm, bytes })
    }
}

impl Serialize for ContentDigest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ContentDigest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The key of a task: a CIDv1 (see the module docs).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskKey(Cid);

#[derive(Serialize)]
struct UrlDescriptor<'a> {
    v: u32,
    url: &'a str,
    tag: &'a str,
}

impl TaskKey {
    /// The key of a digest task: the content's CID.
    pub fn for_digest(digest: &ContentDigest) -> TaskKey {
        TaskKey(Cid::new_v1(CODEC_RAW, digest.multihash()))
    }

    /// The key of a URL task. `url` must already be canonical ([`canonical_url`]).
    pub fn for_url(canonical: &Url, tag: &str) -> TaskKey {
        let descriptor = UrlDescriptor {
            v: 1,
            url: canonical.as_str(),
            tag,
        };
        // Serialising a struct of strings to JSON cannot fail.
        let json = serde_json::to_vec(&descriptor).unwrap_or_default();
        let digest = Sha256::digest(&json);
        TaskKey(Cid::new_v1(
            CODEC_JSON,
            Multihash::wrap(MH_SHA2_256, &digest).unwrap_or_default(),
        ))
    }

    /// The key for a download request: the digest alone when given, else the canonical URL and tag.
    pub fn for_request(
        url: &Url,
        tag: &str,
        filtered: &[String],
        digest: Option<&ContentDigest>,
    ) -> TaskKey {
        match digest {
            Some(d) => TaskKey::for_digest(d),
            None => TaskKey::for_url(&canonical_url(url, filtered), tag),
        }
    }

    /// The whole-content digest named by a digest task's key.
    pub fn content_digest(&self) -> Option<ContentDigest> {
        if self.0.codec() != CODEC_RAW {
            return None;
        }
        let mh = self.0.hash();
        let algorithm = match mh.code() {
            MH_SHA2_256 => DigestAlgorithm::Sha256,
            MH_SHA2_512 => DigestAlgorithm::Sha512,
            _ => return None,
        };
        Some(ContentDigest {
            algorithm,
            bytes: mh.digest().to_vec(),
        })
    }

    pub fn cid(&self) -> &Cid {
        &self.0
    }

    /// Binary form: the CID's bytes. Used as the Kademlia key and on the data plane.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.to_bytes()
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<TaskKey, TaskKeyError> {
        if bytes.len() > MAX_TASK_KEY_BYTES {
            return Err(TaskKeyError::MalformedKey(format!("{} bytes", bytes.len())));
        }
        let cid = Cid::try_from(bytes).map_err(|e| TaskKeyError::MalformedKey(e.to_string()))?;
        // `Cid::try_from` ignores bytes after the CID: one key must have one binary form.
        if cid.encoded_len() != bytes.len() {
            return Err(TaskKeyError::MalformedKey(format!(
                "{} bytes after the CID",
                bytes.len() - cid.encoded_len().min(bytes.len())
            )));
        }
        TaskKey::from_cid(cid)
    }

    fn from_cid(cid: Cid) -> Result<TaskKey, TaskKeyError> {
        let ok_codec = cid.codec() == CODEC_RAW || cid.codec() == CODEC_JSON;
        let ok_hash = matches!(cid.hash().code(), MH_SHA2_256 | MH_SHA2_512);
        if cid.version() != cid::Version::V1 || !ok_codec || !ok_hash {
            return Err(TaskKeyError::MalformedKey(cid.to_string()));
        }
        Ok(TaskKey(cid))
    }

    /// The gossipsub topic on which a task's availability is announced.
    pub fn topic(&self) -> String {
        format!("/df/task/2/{}", self.0)
    }
}

impl fmt::Display for TaskKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Debug for TaskKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TaskKey({})", self.0)
    }
}

impl FromStr for TaskKey {
    type Err = TaskKeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > 2 * MAX_TASK_KEY_BYTES {
            return Err(TaskKeyError::MalformedKey(excerpt(s)));
        }
        // A multibase string of the binary form. Decoded here rather than by `Cid::from_str`, which
        // also accepts `…/ipfs/<cid>` paths and ignores bytes after the CID.
        let (_, bytes) =
            cid::multibase::decode(s).map_err(|_| TaskKeyError::MalformedKey(excerpt(s)))?;
        TaskKey::from_bytes(&bytes).map_err(|_| TaskKeyError::MalformedKey(excerpt(s)))
    }
}

impl Serialize for TaskKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TaskKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        parse_url(s).unwrap()
    }

    #[test]
    fn canonical_url_drops_credentials_fragment_and_sorts_query() {
        let u = url("https://user:pw@example.com/a/b?z=1&a=2&X-Amz-Signature=abc#frag");
        assert_eq!(
            canonical_url(&u, &[]).as_str(),
            "https://example.com/a/b?a=2&z=1"
        );
    }

    #[test]
    fn every_default_filtered_param_is_removed_in_any_case() {
        let names = DEFAULT_FILTERED_QUERY_PARAMS
            .iter()
            .map(|s| s.to_string())
            .chain(
                [
                    "X-Amz-Anything",
                    "x-amz-credential",
                    "X-GOOG-Whatever",
                    "x-goog-",
                ]
                .map(String::from),
            );
        for name in names {
            for variant in [
                name.clone(),
                name.to_ascii_lowercase(),
                name.to_ascii_uppercase(),
            ] {
                let u = url(&format!("https://h/f?version=2&{variant}=secret&a=1"));
                assert_eq!(
                    canonical_url(&u, &[]).as_str(),
                    "https://h/f?a=1&version=2",
                    "{variant}"
                );
            }
        }
    }

    #[test]
    fn azure_sas_fields_are_removed_from_a_sas_url_only() {
        for name in AZURE_SAS_QUERY_PARAMS {
            let u = url(&format!(
                "https://acct.blob.core.windows.net/c/b?version=2&{name}=x&SIG=abc"
            ));
            assert_eq!(
                canonical_url(&u, &[]).as_str(),
                "https://acct.blob.core.windows.net/c/b?version=2",
                "{name}"
            );
            if *name != AZURE_SAS_SIGNATURE {
                let u = url(&format!("https://h/f?{name}=2"));
                assert_eq!(canonical_url(&u, &[]), u, "{name}");
            }
        }
        let sas = url(
            "https://acct.blob.core.windows.net/c/blob.tar?sv=2022-11-02&ss=b&srt=o&sp=r\
             &se=2030-01-01T00:00:00Z&st=2024-01-01T00:00:00Z&spr=https&sig=c2lnbmF0dXJl%3D",
        );
        assert_eq!(
            canonical_url(&sas, &[]).as_str(),
            "https://acct.blob.core.windows.net/c/blob.tar"
        );
    }

    #[test]
    fn signed_urls_of_known_origins_lose_their_credentials_but_not_their_content_names() {
        for (raw, canonical) in [
            (
                "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256\
                 &X-Amz-Credential=AKIA%2F20240101%2Fus-east-1%2Fs3%2Faws4_request\
                 &X-Amz-Date=20240101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host\
                 &X-Amz-Security-Token=tok&X-Amz-Signature=abc&versionId=3&x-id=GetObject",
                "https://b.s3.amazonaws.com/k?versionId=3&x-id=GetObject",
            ),
            (
                "https://d.cloudfront.net/f?Policy=eyJTdGF0ZW1lbnQiOltd&Signature=abc\
                 &Key-Pair-Id=K2JCJMDEHXQW5F",
                "https://d.cloudfront.net/f",
            ),
            (
                "https://d.cloudfront.net/f?Expires=1700000000&Signature=abc&Key-Pair-Id=K2",
                "https://d.cloudfront.net/f",
            ),
            (
                "https://b.oss-cn-hangzhou.aliyuncs.com/o.jpg?OSSAccessKeyId=LTAI&Expires=1\
                 &Signature=abc&security-token=sts&x-oss-process=image%2Fresize%2Cw_100",
                "https://b.oss-cn-hangzhou.aliyuncs.com/o.jpg?x-oss-process=image%2Fresize%2Cw_100",
            ),
            (
                "https://b.oss-cn-hangzhou.aliyuncs.com/o?x-oss-signature-version=OSS4-HMAC-SHA256\
                 &x-oss-credential=LTAI%2F20240101%2Fcn-hangzhou%2Foss%2Faliyun_v4_request\
                 &x-oss-date=20240101T000000Z&x-oss-expires=3600&x-oss-signature=abc",
                "https://b.oss-cn-hangzhou.aliyuncs.com/o",
            ),
            (
                "https://b.tos-cn-beijing.volces.com/o?X-Tos-Algorithm=TOS4-HMAC-SHA256\
                 &X-Tos-Credential=AK&X-Tos-Date=1&X-Tos-Expires=3600&X-Tos-SignedHeaders=host\
                 &X-Tos-Signature=abc&x-tos-process=image%2Finfo",
                "https://b.tos-cn-beijing.volces.com/o?x-tos-process=image%2Finfo",
            ),
            (
                "https://storage.googleapis.com/b/o?X-Goog-Algorithm=GOOG4-RSA-SHA256\
                 &X-Goog-Credential=sa&X-Goog-Date=1&X-Goog-Expires=900\
                 &X-Goog-SignedHeaders=host&X-Goog-Signature=abc&generation=7",
                "https://storage.googleapis.com/b/o?generation=7",
            ),
            (
                "https://gitlab.example/api/v4/projects/1/packages/generic/p/1.0/f.tgz\
                 ?private_token=glpat-x&job_token=j",
                "https://gitlab.example/api/v4/projects/1/packages/generic/p/1.0/f.tgz",
            ),
            (
                "https://h/f?token=t&access_token=a&version=2",
                "https://h/f?version=2",
            ),
        ] {
            assert_eq!(canonical_url(&url(raw), &[]).as_str(), canonical, "{raw}");
        }
    }

    #[test]
    fn filtered_query_params_do_not_change_the_key() {
        let a = url("http://h/f?ticket=1&x=y");
        let b = url("http://h/f?x=y&ticket=2");
        let filtered = vec!["ticket".to_owned()];
        assert_eq!(
            TaskKey::for_request(&a, "", &filtered, None),
            TaskKey::for_request(&b, "", &filtered, None)
        );
        assert_ne!(
            TaskKey::for_request(&a, "", &[], None),
            TaskKey::for_request(&b, "", &[], None)
        );
    }

    #[test]
    fn tag_separates_tasks() {
        let a = url("http://h/f");
        assert_ne!(TaskKey::for_url(&a, ""), TaskKey::for_url(&a, "t"));
    }

    #[test]
    fn digest_alone_names_the_task() {
        let d: ContentDigest = format!("sha256:{}", "ab".repeat(32)).parse().unwrap();
        let a = TaskKey::for_request(&url("http://one/x"), "", &[], Some(&d));
        let b = TaskKey::for_request(&url("https://two/y"), "tag", &[], Some(&d));
        assert_eq!(a, b);
        assert_eq!(a.content_digest(), Some(d));
    }

    #[test]
    fn key_round_trips_through_text_and_bytes() {
        let k = TaskKey::for_url(&url("http://h/f"), "");
        assert_eq!(k.to_string().parse::<TaskKey>().unwrap(), k);
        assert_eq!(TaskKey::from_bytes(&k.to_bytes()).unwrap(), k);
        assert!(k.content_digest().is_none());
    }

    #[test]
    fn malformed_inputs_are_errors() {
        assert!(matches!(
            parse_url("not a url"),
            Err(TaskKeyError::MalformedUrl { .. })
        ));
        assert_eq!(
            parse_url("ftp://h/f"),
            Err(TaskKeyError::UnsupportedScheme("ftp".into()))
        );
        assert!("sha256:zz".parse::<ContentDigest>().is_err());
        assert!("md5:00".parse::<ContentDigest>().is_err());
        assert!("sha256:abcd".parse::<ContentDigest>().is_err());
        assert!("bafy-nonsense".parse::<TaskKey>().is_err());
        assert!(TaskKey::from_bytes(&[0xff; 10]).is_err());
        assert!(TaskKey::from_bytes(&[1; 1000]).is_err());
    }

    #[test]
    fn content_hasher_matches_digest_text() {
        let mut h = DigestAlgorithm::Sha256.hasher();
        h.update(b"hello");
        assert_eq!(
            h.finish().to_string(),
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
    }
}
