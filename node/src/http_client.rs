//! The HTTP client settings every outbound HTTP fetch of df shares (the origin fetcher in `df-seed`,
//! the registry mirror in `df-proxy`): no proxy taken from the environment, extra CA bundles, and
//! the `insecure` switch for test setups.

/// Errors building an HTTP client.
#[derive(Debug, thiserror::Error)]
pub enum HttpClientError {
    #[error("reading CA bundle {path}: {reason}")]
    CaBundle { path: String, reason: String },
}

/// An HTTP client builder for origins and registries: no proxy from the environment, the extra CA
/// certificates of `ca_bundle` (PEM files) trusted beside the system's, and every certificate
/// accepted when `insecure`.
pub fn client_builder(
    ca_bundle: &[std::path::PathBuf],
    insecure: bool,
) -> Result<reqwest::ClientBuilder, HttpClientError> {
    Ok(reqwest::Client::builder()
        .no_proxy()
        .tls_danger_accept_invalid_certs(insecure)
        .tls_certs_merge(load_ca_bundles(ca_bundle)?))
}

/// Reads PEM CA bundles (each file may hold several certificates).
pub fn load_ca_bundles(
    paths: &[std::path::PathBuf],
) -> Result<Vec<reqwest::Certificate>, HttpClientError> {
    let mut out = Vec::new();
    for p in paths {
        let err = |reason: String| HttpClientError::CaBundle {
            path: p.display().to_string(),
            reason,
        };
        let pem = std::fs::read(p).map_err(|e| err(e.to_string()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| err(e.to_string()))?;
        if certs.is_empty() {
            return Err(err("no PEM certificate in it".into()));
        }
        out.extend(certs);
    }
    Ok(out)
}
