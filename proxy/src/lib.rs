//! The OCI registry mirror: docker, containerd, podman and skopeo pull images through the local
//! node.
//!
//! | module | what |
//! |---|---|
//! | [`config`] | [`MirrorConfig`], the `[proxy]` config section |
//! | [`oci`] | request paths, names, references, OCI JSON errors |
//! | [`source`] | [`BlobSource`]: the node as the mirror sees it |
//! | [`mirror`] | [`Mirror`]: the HTTP server and handlers |
//! | `upstream` | the registry client's redirect policy and DNS guard |
//! | `cache` | the in-memory manifest cache |
//!
//! Manifests, tags and the `/v2/` check go to the upstream registry with the client's `Accept`
//! and `Authorization` headers; a 401 comes back with the registry's `WWW-Authenticate`, so the
//! client runs its normal token flow through the mirror. Manifests are cached in memory by digest
//! (and briefly by tag), per credentials. Blobs go through the node as digest tasks: whichever
//! node or seed holds the pieces serves them, one node fetches from the registry (with the
//! requesting client's credentials, for that request only), and the client receives the blob in
//! order while it arrives — verified against its digest, or the response is aborted.
//!
//! The mirror talks only to its `upstream` and the registries mapped for `?ns=` (unless
//! `allow_unmapped`), and follows a registry's redirects only to HTTPS or within the registry,
//! never to a loopback, link-local or cloud-metadata address other than the registry's own.
//!
//! Any client of a mirror can fetch any blob the swarm holds if it knows its digest (as with
//! Dragonfly, Kraken and Spegel): run the mirror for one trust domain.

mod cache;
pub mod config;
pub mod mirror;
pub mod oci;
pub mod source;
mod upstream;

pub use config::MirrorConfig;
pub use mirror::{Mirror, MirrorError, MirrorStats};
pub use source::BlobSource;
