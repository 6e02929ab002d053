//! The bearer token a TCP API on a non-loopback address requires: 32 random bytes, hex, in
//! `<data dir>/api-token` (mode 0600), created on the first start that needs it and re-used after.

use std::io::Write;
use std::path::Path;

use hmac::{KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = hmac::Hmac<Sha256>;

/// The token file's name in the data directory.
pub const TOKEN_FILE: &str = "api-token";

/// Errors reading, parsing or creating an API token.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("API token file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("API token file {path} is empty")]
    Empty { path: String },
    #[error("the API token from {from} holds characters other than visible ASCII")]
    Invalid { from: String },
}

/// An API token. Its `Debug` form never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiToken(String);

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiToken(…)")
    }
}

impl ApiToken {
    /// A new random token: 32 random bytes, hex.
    pub fn generate() -> ApiToken {
        ApiToken(hex::encode(rand::random::<[u8; 32]>()))
    }

    /// A token given as text (`from` names where it came from, for errors); surrounding
    /// whitespace is dropped.
    pub fn parse(text: &str, from: &str) -> Result<ApiToken, TokenError> {
        let t = text.trim();
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenError::Invalid { from: from.into() });
        }
        Ok(ApiToken(t.to_owned()))
    }

    /// Reads the token from `path`.
    pub fn read(path: &Path) -> Result<ApiToken, TokenError> {
        let text = std::fs::read_to_string(path).map_err(|e| TokenError::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        if text.trim().is_empty() {
            return Err(TokenError::Empty {
                path: path.display().to_string(),
            });
        }
        ApiToken::parse(&text, &path.display().to_string())
    }

    /// Reads the token from `path`, or creates the file (mode 0600) with a new token.
    pub fn load_or_create(path: &Path) -> Result<ApiToken, TokenError> {
        let io = |e: std::io::Error| TokenError::Io {
            path: path.display().to_string(),
            source: e,
        };
        match ApiToken::read(path) {
            Err(TokenError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            }
            Ok(token) => {
                warn_if_readable_by_others(path);
                return Ok(token);
            }
            Err(e) => return Err(e),
        }
        let token = ApiToken::generate();
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        match opts.open(path) {
            Ok(mut f) => {
                f.write_all(format!("{}\n", token.0).as_bytes())
                    .map_err(io)?;
                f.sync_all().map_err(io)?;
                tracing::info!(path = %path.display(), "created the API token file");
                Ok(token)
            }
            // Another process created it meanwhile: use theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => ApiToken::read(path),
            Err(e) => Err(io(e)),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn warn_if_readable_by_others(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(path)
            && m.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{:o}", m.permissions().mode() & 0o777),
                "the API token file is readable by other users; chmod 600 it"
            );
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

/// Checks presented tokens against the expected one in constant time: both are compared as
/// HMACs under a random key, so neither the content nor the length of the token leaks through
/// timing.
pub(crate) struct TokenVerifier {
    key: [u8; 32],
    expected: Vec<u8>,
}

impl TokenVerifier {
    pub(crate) fn new(token: &ApiToken) -> TokenVerifier {
        let key: [u8; 32] = rand::random();
        let mut mac = mac(&key);
        mac.update(token.as_str().as_bytes());
        TokenVerifier {
            key,
            expected: mac.finalize().into_bytes().to_vec(),
        }
    }

    pub(crate) fn verify(&self, presented: &[u8]) -> bool {
        let mut mac = mac(&self.key);
        mac.update(presented);
        mac.verify_slice(&self.expected).is_ok()
    }
}

fn mac(key: &[u8; 32]) -> HmacSha256 {
    match <HmacSha256 as KeyInit>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn created_once_with_mode_0600_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(TOKEN_FILE);
        let t = ApiToken::load_or_create(&path).unwrap();
        assert_eq!(t.as_str().len(), 64);
        assert!(t.as_str().bytes().all(|b| b.is_ascii_hexdigit()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "token file mode {mode:o}");
        }
        assert_eq!(ApiToken::load_or_create(&path).unwrap(), t);
        assert_eq!(ApiToken::read(&path).unwrap(), t);
        assert_ne!(ApiToken::generate(), t);
    }

    #[test]
    fn bad_token_files_are_errors_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        assert!(matches!(
            ApiToken::load_or_create(&empty),
            Err(TokenError::Empty { .. })
        ));
        assert_eq!(std::fs::read_to_string(&empty).unwrap(), "\n");
        assert!(matches!(
            ApiToken::read(&dir.path().join("missing")),
            Err(TokenError::Io { .. })
        ));
        assert!(ApiToken::parse("a b", "env").is_err());
        assert_eq!(ApiToken::parse(" abc\n", "env").unwrap().as_str(), "abc");
        assert!(!format!("{:?}", ApiToken::parse("secret", "x").unwrap()).contains("secret"));
    }

    #[test]
    fn verifier_accepts_only_the_token() {
        let t = ApiToken::parse("0123abcd", "test").unwrap();
        let v = TokenVerifier::new(&t);
        assert!(v.verify(b"0123abcd"));
        assert!(!v.verify(b"0123abce"));
        assert!(!v.verify(b"0123abc"));
        assert!(!v.verify(b""));
    }
}
