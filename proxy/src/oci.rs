//! The OCI distribution API as the mirror sees it: request paths, names, references and the JSON
//! error format.

use df_protocols::task::ContentDigest;
use http::StatusCode;
use serde::Serialize;

/// A parsed `/v2/...` request path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/v2/`: the API version check (and the auth challenge).
    Base,
    /// `/v2/<name>/manifests/<reference>`.
    Manifest { name: String, reference: Reference },
    /// `/v2/<name>/blobs/<digest>`.
    Blob { name: String, digest: ContentDigest },
    /// `/v2/<name>/blobs/uploads/...`: pushes, which a pull mirror refuses.
    Upload,
    /// `/v2/<name>/tags/list`: passed through.
    Tags { name: String },
    /// `/v2/<name>/referrers/<digest>`: passed through.
    Referrers { name: String, digest: ContentDigest },
    /// `/v2/_catalog`: passed through.
    Catalog,
}

impl Route {
    /// The route's name as a metrics label.
    pub fn label(&self) -> &'static str {
        match self {
            Route::Base => "base",
            Route::Manifest { .. } => "manifest",
            Route::Blob { .. } => "blob",
            Route::Upload => "upload",
            Route::Tags { .. } => "tags",
            Route::Referrers { .. } => "referrers",
            Route::Catalog => "catalog",
        }
    }

    /// The path asked of the registry, rebuilt from the checked parts (never the client's text).
    /// `None` for routes the mirror answers itself.
    pub fn upstream_path(&self) -> Option<String> {
        match self {
            Route::Base | Route::Upload => None,
            Route::Manifest { name, reference } => {
                Some(format!("/v2/{name}/manifests/{reference}"))
            }
            Route::Blob { name, digest } => Some(format!("/v2/{name}/blobs/{digest}")),
            Route::Tags { name } => Some(format!("/v2/{name}/tags/list")),
            Route::Referrers { name, digest } => Some(format!("/v2/{name}/referrers/{digest}")),
            Route::Catalog => Some("/v2/_catalog".to_owned()),
        }
    }
}

/// A manifest reference: a tag or a digest.
pub use df_protocols::task::ManifestReference as Reference;

/// Parses a request path. `Err` is the error response to send (path under `/v2/` but malformed).
/// `Ok(None)`: not a registry path at all.
///
/// The path is percent-decoded segment by segment first; a `.` or `..` segment, or a segment
/// that decodes to something holding `/`, `\`, `%` or a control character, is `NAME_INVALID`:
/// the registry URL is built from these parts, and URL parsing would resolve such segments
/// (`/v2/_catalog/../../x` is `/x` on the registry).
pub fn parse_path(path: &str) -> Result<Option<Route>, OciError> {
    let Some(rest) = path.strip_prefix("/v2") else {
        return Ok(None);
    };
    if rest.is_empty() || rest == "/" {
        return Ok(Some(Route::Base));
    }
    let Some(rest) = rest.strip_prefix('/') else {
        return Ok(None);
    };
    let rest = decode_segments(rest)?;
    let rest = rest.as_str();
    if rest == "_catalog" {
        return Ok(Some(Route::Catalog));
    }
    if let Some(name) = rest.strip_suffix("/tags/list") {
        check_name(name)?;
        return Ok(Some(Route::Tags {
            name: name.to_owned(),
        }));
    }
    if let Some(i) = rest.rfind("/manifests/") {
        let (name, reference) = (&rest[..i], &rest[i + "/manifests/".len()..]);
        check_name(name)?;
        return Ok(Some(Route::Manifest {
            name: name.to_owned(),
            reference: parse_reference(reference)?,
        }));
    }
    if let Some(i) = rest.find("/blobs/uploads") {
        check_name(&rest[..i])?;
        return Ok(Some(Route::Upload));
    }
    if let Some(i) = rest.rfind("/blobs/") {
        let (name, digest) = (&rest[..i], &rest[i + "/blobs/".len()..]);
        check_name(name)?;
        return Ok(Some(Route::Blob {
            name: name.to_owned(),
            digest: parse_digest(digest)?,
        }));
    }
    if let Some(i) = rest.rfind("/referrers/") {
        let (name, digest) = (&rest[..i], &rest[i + "/referrers/".len()..]);
        check_name(name)?;
        return Ok(Some(Route::Referrers {
            name: name.to_owned(),
            digest: parse_digest(digest)?,
        }));
    }
    Err(OciError::new(
        ErrorCode::NotFound,
        "unknown registry endpoint",
    ))
}

fn parse_digest(s: &str) -> Result<ContentDigest, OciError> {
    s.parse::<ContentDigest>()
        .map_err(|_| OciError::new(ErrorCode::DigestInvalid, "invalid digest"))
}

/// Percent-decodes each `/`-separated segment of `path`, refusing dot segments, encoded
/// separators, double encoding and control characters.
fn decode_segments(path: &str) -> Result<String, OciError> {
    let invalid = || {
        OciError::new(
            ErrorCode::NameInvalid,
            "invalid path: '.' and '..' segments, encoded '/' or '\\' and control characters are not allowed",
        )
    };
    let mut out = String::with_capacity(path.len());
    for (i, seg) in path.split('/').enumerate() {
        let decoded = percent_decode(seg).ok_or_else(invalid)?;
        if decoded == "." || decoded == ".." {
            return Err(invalid());
        }
        if decoded
            .chars()
            .any(|c| matches!(c, '/' | '\\' | '%') || c.is_control())
        {
            return Err(invalid());
        }
        if i > 0 {
            out.push('/');
        }
        out.push_str(&decoded);
    }
    Ok(out)
}

/// `%XX` escapes decoded; `None` for a malformed escape or bytes that are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    if !s.contains('%') {
        return Some(s.to_owned());
    }
    let hex = |b: u8| (b as char).to_digit(16);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hi = hex(*b.get(i + 1)?)?;
            let lo = hex(*b.get(i + 2)?)?;
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn parse_reference(s: &str) -> Result<Reference, OciError> {
    if s.contains(':') {
        return s
            .parse::<ContentDigest>()
            .map(Reference::Digest)
            .map_err(|_| OciError::new(ErrorCode::DigestInvalid, "invalid manifest digest"));
    }
    // Tags: [a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.bytes().enumerate().all(|(i, b)| {
            b.is_ascii_alphanumeric() || b == b'_' || (i > 0 && (b == b'.' || b == b'-'))
        });
    if ok {
        Ok(Reference::Tag(s.to_owned()))
    } else {
        Err(OciError::new(ErrorCode::ManifestInvalid, "invalid tag"))
    }
}

/// Repository names: path components of `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*` joined by `/`.
fn check_name(name: &str) -> Result<(), OciError> {
    let invalid = || OciError::new(ErrorCode::NameInvalid, "invalid repository name");
    if name.is_empty() || name.len() > 255 {
        return Err(invalid());
    }
    for comp in name.split('/') {
        let b = comp.as_bytes();
        let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
        if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
            return Err(invalid());
        }
        let mut i = 0;
        while i < b.len() {
            if alnum(b[i]) {
                i += 1;
                continue;
            }
            // A separator run: ".", "_", "__" or "-+", between alphanumerics.
            let start = i;
            while i < b.len() && !alnum(b[i]) {
                i += 1;
            }
            let sep = &comp[start..i];
            let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|c| c == b'-');
            if !ok {
                return Err(invalid());
            }
        }
    }
    Ok(())
}

/// OCI error codes (distribution-spec), plus the registry's own `UNAVAILABLE`/`UNKNOWN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BlobUnknown,
    DigestInvalid,
    ManifestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    Unauthorized,
    Denied,
    Unsupported,
    TooManyRequests,
    NotFound,
    Unavailable,
    Unknown,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BlobUnknown => "BLOB_UNKNOWN",
            ErrorCode::DigestInvalid => "DIGEST_INVALID",
            ErrorCode::ManifestInvalid => "MANIFEST_INVALID",
            ErrorCode::ManifestUnknown => "MANIFEST_UNKNOWN",
            ErrorCode::NameInvalid => "NAME_INVALID",
            ErrorCode::NameUnknown => "NAME_UNKNOWN",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::Denied => "DENIED",
            ErrorCode::Unsupported => "UNSUPPORTED",
            ErrorCode::TooManyRequests => "TOOMANYREQUESTS",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::Unknown => "UNKNOWN",
        }
    }

    /// The status a response with only this error gets.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::BlobUnknown
            | ErrorCode::ManifestUnknown
            | ErrorCode::NameUnknown
            | ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::DigestInvalid | ErrorCode::ManifestInvalid | ErrorCode::NameInvalid => {
                StatusCode::BAD_REQUEST
            }
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Denied => StatusCode::FORBIDDEN,
            ErrorCode::Unsupported => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unknown => StatusCode::BAD_GATEWAY,
        }
    }
}

/// One error response: a status and the OCI JSON body `{"errors":[{"code","message"}]}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
}

impl OciError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> OciError {
        OciError {
            status: code.status(),
            code,
            message: message.into(),
        }
    }

    pub fn with_status(mut self, status: StatusCode) -> OciError {
        self.status = status;
        self
    }

    pub fn body(&self) -> String {
        #[derive(Serialize)]
        struct Item<'a> {
            code: &'a str,
            message: &'a str,
        }
        #[derive(Serialize)]
        struct Errors<'a> {
            errors: [Item<'a>; 1],
        }
        serde_json::to_string(&Errors {
            errors: [Item {
                code: self.code.as_str(),
                message: &self.message,
            }],
        })
        .unwrap_or_else(|_| r#"{"errors":[{"code":"UNKNOWN","message":""}]}"#.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn paths() {
        assert_eq!(parse_path("/v2/").unwrap(), Some(Route::Base));
        assert_eq!(parse_path("/v2").unwrap(), Some(Route::Base));
        assert_eq!(parse_path("/healthz").unwrap(), None);
        assert_eq!(
            parse_path("/v2/library/alpine/manifests/3.19").unwrap(),
            Some(Route::Manifest {
                name: "library/alpine".into(),
                reference: Reference::Tag("3.19".into())
            })
        );
        match parse_path(&format!("/v2/a/b/c/manifests/{D}")).unwrap() {
            Some(Route::Manifest {
                name,
                reference: Reference::Digest(d),
            }) => {
                assert_eq!(name, "a/b/c");
                assert_eq!(d.to_string(), D);
            }
            other => panic!("{other:?}"),
        }
        match parse_path(&format!("/v2/x/blobs/{D}")).unwrap() {
            Some(Route::Blob { name, digest }) => {
                assert_eq!(name, "x");
                assert_eq!(digest.to_string(), D);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse_path("/v2/x/blobs/uploads/").unwrap(),
            Some(Route::Upload)
        );
        assert_eq!(
            parse_path("/v2/x/tags/list").unwrap(),
            Some(Route::Tags { name: "x".into() })
        );
        assert_eq!(parse_path("/v2/_catalog").unwrap(), Some(Route::Catalog));
        match parse_path(&format!("/v2/a/b/referrers/{D}")).unwrap() {
            Some(r @ Route::Referrers { .. }) => {
                assert_eq!(r.upstream_path().unwrap(), format!("/v2/a/b/referrers/{D}"));
            }
            other => panic!("{other:?}"),
        }
        // An escaped ':' in a digest is decoded, and the registry gets the plain form.
        let escaped = D.replace(':', "%3A");
        let r = parse_path(&format!("/v2/x/blobs/{escaped}"))
            .unwrap()
            .unwrap();
        assert_eq!(r.upstream_path().unwrap(), format!("/v2/x/blobs/{D}"));
        // Only the exact endpoints: nothing after `tags/list` or `_catalog`.
        for p in [
            "/v2/_catalogue",
            "/v2/_catalog/x",
            "/v2/x/tags/list/more",
            "/v2/x/tags/listing",
        ] {
            assert!(
                matches!(parse_path(p), Err(ref e) if e.code == ErrorCode::NotFound),
                "{p}: {:?}",
                parse_path(p)
            );
        }
        assert_eq!(
            parse_path("/v2/x/blobs/sha256:abc").unwrap_err().code,
            ErrorCode::DigestInvalid
        );
        assert_eq!(
            parse_path("/v2/UPPER/manifests/latest").unwrap_err().code,
            ErrorCode::NameInvalid
        );
        assert_eq!(
            parse_path("/v2/x/manifests/-bad").unwrap_err().code,
            ErrorCode::ManifestInvalid
        );
        assert_eq!(
            parse_path("/v2/x/whatever").unwrap_err().code,
            ErrorCode::NotFound
        );
    }

    #[test]
    fn dot_segments_and_encoded_separators_are_name_invalid() {
        for p in [
            "/v2/_catalog/../../secret",
            "/v2/x/tags/list/../../secret",
            "/v2/x/tags/list/../../../admin",
            "/v2/../secret",
            "/v2/./x/tags/list",
            "/v2/x/./tags/list",
            "/v2/x/manifests/..",
            "/v2/x/referrers/..",
            "/v2/_catalog/%2e%2e/%2e%2e/secret",
            "/v2/_catalog/%2E./%2e%2E/secret",
            "/v2/_catalog/.%2e/.%2E/secret",
            "/v2/x/tags/list/%2e%2e%2f%2e%2e%2fsecret",
            "/v2/x%2fy/tags/list",
            "/v2/x%2F..%2F..%2Fsecret/tags/list",
            "/v2/x%5c..%5csecret/tags/list",
            "/v2/x/%2e/tags/list",
            "/v2/x%252e%252e/tags/list",
            "/v2/x%00/tags/list",
            "/v2/x%/tags/list",
            "/v2/x%2/tags/list",
            "/v2/x%zz/tags/list",
            "/v2/x%ff/tags/list",
        ] {
            match parse_path(p) {
                Err(e) => {
                    assert_eq!(e.code, ErrorCode::NameInvalid, "{p}");
                    assert_eq!(e.status, StatusCode::BAD_REQUEST, "{p}");
                }
                Ok(r) => panic!("{p} accepted as {r:?}"),
            }
        }
    }

    #[test]
    fn names() {
        for ok in [
            "a", "a/b", "my-app", "my--app", "a.b", "a_b", "a__b", "0/1/2",
        ] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "A", "a/", "/a", "a//b", "-a", "a-", "a..b", "a___b", "a/../b",
        ] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn error_body() {
        let e = OciError::new(ErrorCode::Unsupported, "pushes are not supported");
        assert_eq!(e.status, StatusCode::METHOD_NOT_ALLOWED);
        let v: serde_json::Value = serde_json::from_str(&e.body()).unwrap();
        assert_eq!(v["errors"][0]["code"], "UNSUPPORTED");
        assert_eq!(v["errors"][0]["message"], "pushes are not supported");
    }
}
