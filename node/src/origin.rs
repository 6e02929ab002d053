//! Back-to-source, as the node sees it: the [`Origin`] trait. The HTTP implementation (reqwest: ranges,
//! validators, retries) lives in the `df-seed` crate; tests use in-memory origins.
//!
//! A producer first [`Origin::open`]s the content, asking for its first bytes with a range request,
//! which tells it the length, the validators and whether ranges work. It then fetches the remaining
//! pieces with [`Origin::range`], several in flight, each response checked against the validators.

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
}

impl std::fmt::Debug for OriginSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print header values or the query: they may carry credentials.
        let mut u = self.url.clone();
        u.set_query(None);
        let _ = u.set_password(None);
        f.debug_struct("OriginSpec")
            .field("url", &u.as_str())
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
