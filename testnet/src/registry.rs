//! A real OCI registry for tests and benchmarks: Debian's `docker-registry` (CNCF distribution)
//! on 127.0.0.1, its access log parsed to count what it served, and images built locally with
//! `umoci` and pushed with `skopeo` (no registry needed to make them).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rand::{RngCore, SeedableRng};

/// Fails with a clear message when a program the tests need is missing.
pub fn require_programs(names: &[&str]) -> Result<()> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for n in names {
        if !std::env::split_paths(&path).any(|d| d.join(n).is_file()) {
            bail!("`{n}` is not installed; `bash .ci/run` installs the registry test tools");
        }
    }
    Ok(())
}

/// A free TCP port on 127.0.0.1 (for programs that cannot report the port they bound).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// One access-log line of a request the registry answered.
#[derive(Debug, Clone)]
pub struct Served {
    pub method: String,
    pub path: String,
    pub status: u16,
    pub bytes: u64,
    pub user_agent: String,
}

/// A running `docker-registry`, stopped on drop.
pub struct Registry {
    /// `127.0.0.1:PORT`.
    pub host: String,
    pub url: String,
    dir: tempfile::TempDir,
    _child: tokio::process::Child,
}

impl Registry {
    /// Starts a registry; with `htpasswd` = (user, password), it requires basic auth.
    pub async fn start(htpasswd: Option<(&str, &str)>) -> Result<Registry> {
        require_programs(&["docker-registry"])?;
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let host = format!("127.0.0.1:{port}");
        let mut auth = String::new();
        if let Some((user, pass)) = htpasswd {
            require_programs(&["htpasswd"])?;
            let out = std::process::Command::new("htpasswd")
                .args(["-Bbn", user, pass])
                .output()
                .context("running htpasswd")?;
            if !out.status.success() {
                bail!("htpasswd failed");
            }
            let file = dir.path().join("htpasswd");
            std::fs::write(&file, &out.stdout)?;
            auth = format!(
                "auth:\n  htpasswd:\n    realm: df-test\n    path: {}\n",
                file.display()
            );
        }
        let config = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: {host}\n{auth}",
            dir.path().join("data").display()
        );
        let cfg_path = dir.path().join("config.yml");
        std::fs::write(&cfg_path, config)?;
        let log = std::fs::File::create(dir.path().join("registry.log"))?;
        let child = tokio::process::Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg_path)
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting docker-registry")?;
        let reg = Registry {
            url: format!("http://{host}"),
            host,
            dir,
            _child: child,
        };
        reg.wait_ready().await?;
        Ok(reg)
    }

    async fn wait_ready(&self) -> Result<()> {
        let addr = self.host.clone();
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(&addr).await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "docker-registry did not start; its log:\n{}",
            std::fs::read_to_string(self.log_path()).unwrap_or_default()
        )
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    /// Every request in the access log so far.
    pub fn served(&self) -> Result<Vec<Served>> {
        let text = std::fs::read_to_string(self.log_path())?;
        Ok(text.lines().filter_map(parse_access_line).collect())
    }

    /// Bytes sent per blob digest by successful GETs of blobs, and how many such GETs.
    pub fn blob_gets(&self) -> Result<HashMap<String, (u32, u64)>> {
        let mut m: HashMap<String, (u32, u64)> = HashMap::new();
        for s in self.served()? {
            if s.method != "GET" || !(200..300).contains(&s.status) {
                continue;
            }
            if let Some(i) = s.path.rfind("/blobs/") {
                let d = s.path[i + 7..]
                    .split('?')
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                let e = m.entry(d).or_default();
                e.0 += 1;
                e.1 += s.bytes;
            }
        }
        Ok(m)
    }
}

/// Parses a combined-log-format line: `IP - - [date] "GET /path HTTP/1.1" 200 123 "ref" "ua"`.
fn parse_access_line(line: &str) -> Option<Served> {
    let q1 = line.find('"')?;
    let rest = &line[q1 + 1..];
    let q2 = rest.find('"')?;
    let mut req = rest[..q2].split(' ');
    let method = req.next()?.to_owned();
    let path = req.next()?.to_owned();
    if method.is_empty()
        || !method.bytes().all(|b| b.is_ascii_uppercase())
        || !path.starts_with('/')
    {
        return None;
    }
    let mut after = rest[q2 + 1..].split_whitespace();
    let status = after.next()?.parse().ok()?;
    let bytes = after.next()?.parse().unwrap_or(0);
    let ua = rest[q2 + 1..]
        .rsplit('"')
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    Some(Served {
        method,
        path,
        status,
        bytes,
        user_agent: ua,
    })
}

/// An image built locally: its layers' digests and sizes (compressed, as stored).
#[derive(Debug, Clone)]
pub struct Image {
    pub reference: String,
    pub layers: Vec<(String, u64)>,
    /// Config and layer blobs together.
    pub total_blob_bytes: u64,
}

/// Runs a program to its end; its standard output, or an error with everything it printed.
pub async fn run(cmd: &mut tokio::process::Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Builds an image whose layers hold `layer_sizes` bytes of incompressible data each (seeded by
/// `seed`, so different seeds give different blobs) and pushes it to `registry` as `repo:tag`.
pub async fn build_and_push(
    work: &Path,
    registry: &Registry,
    repo: &str,
    tag: &str,
    layer_sizes: &[usize],
    seed: u64,
    creds: Option<(&str, &str)>,
) -> Result<Image> {
    require_programs(&["umoci", "skopeo"])?;
    let layout = work.join(format!("layout-{seed}"));
    let bundle = work.join(format!("bundle-{seed}"));
    let image = format!("{}:{tag}", layout.display());
    run(tokio::process::Command::new("umoci")
        .args(["init", "--layout"])
        .arg(&layout))
    .await?;
    run(tokio::process::Command::new("umoci").args(["new", "--image", &image])).await?;
    run(tokio::process::Command::new("umoci")
        .args(["unpack", "--image", &image])
        .arg(&bundle))
    .await?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for (i, size) in layer_sizes.iter().enumerate() {
        let mut data = vec![0u8; *size];
        rng.fill_bytes(&mut data);
        std::fs::write(bundle.join("rootfs").join(format!("layer{i}.bin")), data)?;
        run(tokio::process::Command::new("umoci")
            .args(["repack", "--refresh-bundle", "--image", &image])
            .arg(&bundle))
        .await?;
    }
    let dest = format!("docker://{}/{repo}:{tag}", registry.host);
    let mut push = tokio::process::Command::new("skopeo");
    push.args(["copy", "--dest-tls-verify=false"]);
    if let Some((u, p)) = creds {
        push.arg("--dest-creds").arg(format!("{u}:{p}"));
    }
    run(push.arg(format!("oci:{image}")).arg(&dest)).await?;
    // Read the manifest back from the layout to learn the blobs.
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
    let mdigest = index["manifests"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        })
        .and_then(|m| m["digest"].as_str())
        .context("manifest not in the layout")?
        .to_owned();
    let blob = |d: &str| layout.join("blobs").join(d.replace(':', "/"));
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(blob(&mdigest))?)?;
    let mut layers = Vec::new();
    for l in manifest["layers"].as_array().context("no layers")? {
        let d = l["digest"].as_str().context("layer digest")?.to_owned();
        let s = l["size"].as_u64().context("layer size")?;
        layers.push((d, s));
    }
    let config_size = manifest["config"]["size"].as_u64().unwrap_or(0);
    let total_blob_bytes = config_size + layers.iter().map(|(_, s)| s).sum::<u64>();
    Ok(Image {
        reference: format!("{}/{repo}:{tag}", registry.host),
        layers,
        total_blob_bytes,
    })
}

/// One platform's image inside an [`IndexImage`]: digests and sizes as stored in the layout.
#[derive(Debug, Clone)]
pub struct PlatformImage {
    /// `os/architecture`, e.g. `linux/amd64`.
    pub platform: String,
    /// The platform's image manifest digest (`sha256:…`).
    pub manifest: String,
    /// Config blob digest and size.
    pub config: (String, u64),
    /// Layer blob digests and sizes (compressed, as stored).
    pub layers: Vec<(String, u64)>,
}

/// A multi-platform image: an OCI image index over one image per platform.
#[derive(Debug, Clone)]
pub struct IndexImage {
    /// `host/repo:tag`.
    pub reference: String,
    /// Digest of the index as the registry serves it for `tag` (`sha256:…`).
    pub index_digest: String,
    pub platforms: Vec<PlatformImage>,
}

/// Builds one image per `(os, architecture)` in `platforms` (layers of `layer_sizes` bytes of
/// incompressible data each, different contents per platform, all derived from `seed`), ties them
/// together with an OCI image index (`application/vnd.oci.image.index.v1+json`) and pushes it all to
/// `registry` as `repo:tag` with `skopeo copy --all`.
///
/// The index is written by hand into the layout's blobs and referenced from its `index.json` under
/// `tag`; `skopeo` pushes it unchanged, so `index_digest` is the sha256 of the bytes written here
/// (the registry's answer is checked to be the same index before returning).
#[allow(clippy::too_many_arguments)]
pub async fn build_and_push_index(
    work: &Path,
    registry: &Registry,
    repo: &str,
    tag: &str,
    platforms: &[(&str, &str)],
    layer_sizes: &[usize],
    seed: u64,
    creds: Option<(&str, &str)>,
) -> Result<IndexImage> {
    use sha2::{Digest, Sha256};

    require_programs(&["umoci", "skopeo"])?;
    if platforms.is_empty() {
        bail!("an index needs at least one platform");
    }
    let layout = work.join(format!("index-layout-{seed}"));
    run(tokio::process::Command::new("umoci")
        .args(["init", "--layout"])
        .arg(&layout))
    .await?;
    let blob = |d: &str| layout.join("blobs").join(d.replace(':', "/"));
    let read_json = |p: &Path| -> Result<serde_json::Value> {
        serde_json::from_slice(&std::fs::read(p).with_context(|| format!("reading {p:?}"))?)
            .with_context(|| format!("parsing {p:?}"))
    };
    let mut built = Vec::new();
    let mut descriptors = Vec::new();
    for (i, (os, arch)) in platforms.iter().enumerate() {
        let ptag = format!("{tag}-{os}-{arch}").replace(['/', ':'], "-");
        let image = format!("{}:{ptag}", layout.display());
        let bundle = work.join(format!("index-bundle-{seed}-{i}"));
        run(tokio::process::Command::new("umoci").args(["new", "--image", &image])).await?;
        run(tokio::process::Command::new("umoci").args([
            "config",
            "--no-history",
            "--os",
            os,
            "--architecture",
            arch,
            "--image",
            &image,
        ]))
        .await?;
        run(tokio::process::Command::new("umoci")
            .args(["unpack", "--image", &image])
            .arg(&bundle))
        .await?;
        // A seed of its own per platform, so no two platforms share a layer.
        let pseed = seed ^ ((i as u64 + 1) << 40);
        let mut rng = rand::rngs::StdRng::seed_from_u64(pseed);
        for (j, size) in layer_sizes.iter().enumerate() {
            let mut data = vec![0u8; *size];
            rng.fill_bytes(&mut data);
            std::fs::write(bundle.join("rootfs").join(format!("layer{j}.bin")), data)?;
            run(tokio::process::Command::new("umoci")
                .args(["repack", "--refresh-bundle", "--image", &image])
                .arg(&bundle))
            .await?;
        }
        let index = read_json(&layout.join("index.json"))?;
        let desc = index["manifests"]
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == ptag)
            })
            .context("platform manifest not in the layout")?;
        let mdigest = desc["digest"]
            .as_str()
            .context("manifest digest")?
            .to_owned();
        let msize = desc["size"].as_u64().context("manifest size")?;
        let media_type = desc["mediaType"]
            .as_str()
            .unwrap_or("application/vnd.oci.image.manifest.v1+json")
            .to_owned();
        let manifest = read_json(&blob(&mdigest))?;
        let config = (
            manifest["config"]["digest"]
                .as_str()
                .context("config digest")?
                .to_owned(),
            manifest["config"]["size"].as_u64().context("config size")?,
        );
        let cfg = read_json(&blob(&config.0))?;
        if cfg["os"] != *os || cfg["architecture"] != *arch {
            bail!(
                "umoci wrote os {} / architecture {} for {os}/{arch}",
                cfg["os"],
                cfg["architecture"]
            );
        }
        let mut layers = Vec::new();
        for l in manifest["layers"].as_array().context("no layers")? {
            let d = l["digest"].as_str().context("layer digest")?.to_owned();
            let s = l["size"].as_u64().context("layer size")?;
            layers.push((d, s));
        }
        descriptors.push(serde_json::json!({
            "mediaType": media_type,
            "digest": mdigest,
            "size": msize,
            "platform": { "architecture": arch, "os": os },
        }));
        built.push(PlatformImage {
            platform: format!("{os}/{arch}"),
            manifest: mdigest,
            config,
            layers,
        });
    }

    // The index itself: a blob of the layout, referenced from `index.json` under `tag`.
    const INDEX_TYPE: &str = "application/vnd.oci.image.index.v1+json";
    let index_bytes = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": INDEX_TYPE,
        "manifests": descriptors,
    }))?;
    let index_digest = format!("sha256:{}", hex::encode(Sha256::digest(&index_bytes)));
    std::fs::write(blob(&index_digest), &index_bytes)?;
    let mut top = read_json(&layout.join("index.json"))?;
    let entries = top["manifests"]
        .as_array_mut()
        .context("layout index.json has no manifests")?;
    entries.retain(|m| m["annotations"]["org.opencontainers.image.ref.name"] != tag);
    entries.push(serde_json::json!({
        "mediaType": INDEX_TYPE,
        "digest": index_digest,
        "size": index_bytes.len(),
        "annotations": { "org.opencontainers.image.ref.name": tag },
    }));
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&top)?)?;

    let dest = format!("docker://{}/{repo}:{tag}", registry.host);
    let mut push = tokio::process::Command::new("skopeo");
    push.args(["copy", "--all", "--dest-tls-verify=false"]);
    if let Some((u, p)) = creds {
        push.arg("--dest-creds").arg(format!("{u}:{p}"));
    }
    run(push
        .arg(format!("oci:{}:{tag}", layout.display()))
        .arg(&dest))
    .await?;

    // What the registry now serves for `tag` must be this very index.
    let mut inspect = tokio::process::Command::new("skopeo");
    inspect.args(["inspect", "--raw", "--tls-verify=false"]);
    if let Some((u, p)) = creds {
        inspect.arg("--creds").arg(format!("{u}:{p}"));
    }
    let served = run(inspect.arg(&dest)).await?;
    let served_digest = format!("sha256:{}", hex::encode(Sha256::digest(served.as_bytes())));
    if served_digest != index_digest {
        bail!(
            "the registry serves {served_digest} for {repo}:{tag}, not the index {index_digest} pushed:\n{served}"
        );
    }
    Ok(IndexImage {
        reference: format!("{}/{repo}:{tag}", registry.host),
        index_digest,
        platforms: built,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_lines() {
        let l = r#"127.0.0.1 - - [29/Nov/2026:08:10:00 +0000] "GET /v2/test/app/blobs/sha256:ab HTTP/1.1" 200 12345 "" "df/0.1.0""#;
        let s = parse_access_line(l).unwrap();
        assert_eq!(s.method, "GET");
        assert_eq!(s.path, "/v2/test/app/blobs/sha256:ab");
        assert_eq!(s.status, 200);
        assert_eq!(s.bytes, 12345);
        assert_eq!(s.user_agent, "df/0.1.0");
        assert!(parse_access_line("time=x level=info msg=hello").is_none());
        assert!(
            parse_access_line(r#"time="2026-11-29T08:10:00Z" level=info msg="response completed""#)
                .is_none()
        );
    }
}
