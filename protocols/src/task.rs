//! Task identity.
//!
//! A *task* is one piece of content to distribute. Its key, [`TaskKey`], is a CIDv1:
//!
//! * **Digest task** — when the whole content's digest is known in advance (an OCI blob `sha256:…`, or
//!   `df get --digest`), the key is the content's own CID: codec `raw` (0x55) over the digest's multihash.
//!   The same bytes fetched from any URL or registry are therefore one swarm.
//! * **URL task** — otherwise the key names a canonical JSON descriptor `{"v":1,"url":…,"tag":…}`:
//!   codec `json` (0x0200) over the descriptor's sha2-256. The URL is canonicalised by
//!   [`canonical_url`]: credentials and fragment dropped, filtered query parameters (the caller's and
//!   the well-known signed-URL parameters of S3, GCS and OSS) removed and the rest sorted.
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

/// Query parameters removed from every URL before it names a task: they carry signatures, expiry times
/// or credentials of signed URLs (S3, GCS, Alibaba OSS) and change on every request for the same bytes.
/// Matched case-insensitively.
pub const DEFAULT_FILTERED_QUERY_PARAMS: &[&str] = &[
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
    "X-Amz-Security-Token",
    "AWSAccessKeyId",
    "OSSAccessKeyId",
    "GoogleAccessId",
    "X-Goog-Algorithm",
    "X-Goog-Credential",
    "X-Goog-Date",
    "X-Goog-Expires",
    "X-Goog-SignedHeaders",
    "X-Goog-Signature",
    "Signature",
    "Expires",
    "security-token",
];

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
/// `filtered` names are matched exactly; [`DEFAULT_FILTERED_QUERY_PARAMS`] case-insensitively.
pub fn canonical_url(url: &Url, filtered: &[String]) -> Url {
    let mut out = url.clone();
    // Setting these on an http(s) URL cannot fail.
    let _ = out.set_username("");
    let _ = out.set_password(None);
    out.set_fragment(None);
    let mut pairs: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| {
            !filtered.iter().any(|f| f == k)
                && !DEFAULT_FILTERED_QUERY_PARAMS
                    .iter()
                    .any(|d| d.eq_ignore_ascii_case(k))
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
        let bad = || TaskKeyError::MalformedDigest(s.to_owned());
        let (alg, hex_part) = s.split_once(':').ok_or_else(bad)?;
        let algorithm = match alg.to_ascii_lowercase().as_str() {
            "sha256" => DigestAlgorithm::Sha256,
            "sha512" => DigestAlgorithm::Sha512,
            _ => return Err(bad()),
        };
        let bytes = hex::decode(hex_part).map_err(|_| bad())?;
        if bytes.len() != algorithm.len() {
            return Err(bad());
        }
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
        format!("/df/task/1/{}", self.0)
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
            return Err(TaskKeyError::MalformedKey(s.chars().take(64).collect()));
        }
        let cid = Cid::from_str(s).map_err(|_| TaskKeyError::MalformedKey(s.to_owned()))?;
        TaskKey::from_cid(cid)
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
    fn filtered_query_params_do_not_change_the_key() {
        let a = url("http://h/f?token=1&x=y");
        let b = url("http://h/f?x=y&token=2");
        let filtered = vec!["token".to_owned()];
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
