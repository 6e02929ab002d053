//! A multi-platform image (an OCI image index over linux/amd64 and linux/arm64) built locally and
//! pushed to a password-protected registry (Debian's `docker-registry`). `bash .ci/run` installs
//! the programs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;

use anyhow::Result;
use df_testnet::init_test_logs;
use df_testnet::registry::{self, Registry, run};

const USER: &str = "alice";
const PASS: &str = "secret";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_platform_index_is_pushed_to_a_private_registry() -> Result<()> {
    init_test_logs();
    let work = tempfile::tempdir()?;
    let reg = Registry::start(Some((USER, PASS))).await?;
    let image = registry::build_and_push_index(
        work.path(),
        &reg,
        "multi/app",
        "v1",
        &[("linux", "amd64"), ("linux", "arm64")],
        &[300_000, 200_000],
        7,
        Some((USER, PASS)),
    )
    .await?;
    assert_eq!(image.reference, format!("{}/multi/app:v1", reg.host));
    assert_eq!(image.platforms.len(), 2);
    assert_eq!(image.platforms[0].platform, "linux/amd64");
    assert_eq!(image.platforms[1].platform, "linux/arm64");
    for p in &image.platforms {
        assert_eq!(p.layers.len(), 2, "{p:?}");
    }
    // Every platform has layers of its own, and a config of its own.
    let layers: HashSet<_> = image
        .platforms
        .iter()
        .flat_map(|p| p.layers.iter().map(|(d, _)| d.clone()))
        .collect();
    assert_eq!(layers.len(), 4);
    assert_ne!(image.platforms[0].config.0, image.platforms[1].config.0);
    assert_ne!(image.platforms[0].manifest, image.platforms[1].manifest);

    // The registry serves the index, listing both platforms with their manifests.
    let dest = format!("docker://{}", image.reference);
    let raw = run(tokio::process::Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false", "--creds"])
        .arg(format!("{USER}:{PASS}"))
        .arg(&dest))
    .await?;
    let index: serde_json::Value = serde_json::from_str(&raw)?;
    assert_eq!(
        index["mediaType"], "application/vnd.oci.image.index.v1+json",
        "{raw}"
    );
    assert_eq!(index["schemaVersion"], 2);
    let listed: Vec<(String, String, String)> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["platform"]["os"].as_str().unwrap().to_owned(),
                m["platform"]["architecture"].as_str().unwrap().to_owned(),
                m["digest"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected: Vec<(String, String, String)> = image
        .platforms
        .iter()
        .map(|p| {
            let (os, arch) = p.platform.split_once('/').unwrap();
            (os.to_owned(), arch.to_owned(), p.manifest.clone())
        })
        .collect();
    assert_eq!(listed, expected);
    assert_eq!(
        image.index_digest,
        format!("sha256:{}", df_testnet::sha256_hex(raw.as_bytes()))
    );

    // Each platform's manifest is served by digest, with the right config.
    for p in &image.platforms {
        let (os, arch) = p.platform.split_once('/').unwrap();
        let config = run(tokio::process::Command::new("skopeo")
            .args([
                "inspect",
                "--config",
                "--raw",
                "--tls-verify=false",
                "--creds",
            ])
            .arg(format!("{USER}:{PASS}"))
            .arg(format!("docker://{}/multi/app@{}", reg.host, p.manifest)))
        .await?;
        let config: serde_json::Value = serde_json::from_str(&config)?;
        assert_eq!(config["os"], os);
        assert_eq!(config["architecture"], arch);
    }

    // Anonymous clients are turned away: the registry is private.
    let anonymous = run(tokio::process::Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(&dest))
    .await;
    let err = anonymous.expect_err("an anonymous inspect of a private image succeeded");
    assert!(
        format!("{err:#}").to_lowercase().contains("unauthorized")
            || format!("{err:#}").contains("401"),
        "{err:#}"
    );
    Ok(())
}
