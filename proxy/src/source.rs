//! [`BlobSource`]: what the mirror needs from the local node — fetch a blob as a digest task and
//! stream it in order. Implemented for [`df_node::Node`] (the mirror runs inside `df node` and
//! `df seed`); tests may implement it over anything.

use async_trait::async_trait;
use df_node::{Content, ContentError, DownloadRequest, Node};
use df_protocols::task::{ContentDigest, TaskKey};

#[async_trait]
pub trait BlobSource: Send + Sync + 'static {
    /// Starts (or joins) the download `req` (a digest task) and streams `range` (an HTTP `Range`
    /// header value) of it as it arrives.
    async fn fetch(
        &self,
        req: DownloadRequest,
        range: Option<&str>,
    ) -> Result<Content, ContentError>;

    /// The length of a blob this node holds or is fetching, if known, without starting anything.
    async fn known_length(&self, digest: &ContentDigest) -> Option<u64>;

    /// Counts an answered mirror request (`route`: one of a fixed few, see [`crate::oci::Route`]).
    fn answered(&self, route: &'static str, status: u16);
}

#[async_trait]
impl BlobSource for Node {
    async fn fetch(
        &self,
        req: DownloadRequest,
        range: Option<&str>,
    ) -> Result<Content, ContentError> {
        let (key, _) = self.download(req).await?;
        self.content(&key, range).await
    }

    async fn known_length(&self, digest: &ContentDigest) -> Option<u64> {
        let key = TaskKey::for_digest(digest);
        let p = self.progress(&key).await?;
        p.borrow().header.as_ref().map(|h| h.header.content_length)
    }

    fn answered(&self, route: &'static str, status: u16) {
        self.metrics().mirror_request(route, status);
    }
}
