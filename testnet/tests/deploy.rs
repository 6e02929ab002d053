//! The files in deploy/ checked offline: Kubernetes manifests against the API schemas
//! (`kubernetes-validate --strict`, from PyPI) and against each other, the alert rules and scrape
//! config with `promtool`, the runtime configs against the node's mirror (deploy/check.py). That
//! the TOML in the ConfigMap is a valid df config is checked in the CLI's own tests.

use std::process::Command;

#[test]
fn deploy_manifests_validate_offline() {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/check.py");
    let out = Command::new("python3")
        .arg(&script)
        .output()
        .expect("running python3 deploy/check.py (needs kubernetes-validate and PyYAML: .ci/run installs them)");
    assert!(
        out.status.success(),
        "deploy/check.py failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
