//! The registry mirror against a real registry (Debian's `docker-registry`), real clients
//! (`ctr` with its own containerd, `skopeo`) and an in-process swarm. `bash .ci/run` installs the
//! programs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use df_proxy::{Mirror, MirrorConfig};
use df_testnet::registry::{self, Image, Registry, require_programs};
use df_testnet::{Swarm, TestNode, init_test_logs};
use futures::StreamExt;
use sha2::{Digest, Sha256};

async fn mirror_on(node: &TestNode, tweak: impl FnOnce(&mut MirrorConfig)) -> Mirror {
    let mut cfg = MirrorConfig {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        ..MirrorConfig::default()
    };
    tweak(&mut cfg);
    Mirror::start(cfg, Arc::new(node.node.clone()))
        .await
        .unwrap()
}

/// A containerd of the test's own (root, state and socket in a temp dir).
struct Containerd {
    dir: tempfile::TempDir,
    _child: tokio::process::Child,
}

impl Containerd {
    async fn start() -> Result<Containerd> {
        require_programs(&["containerd", "ctr"])?;
        let dir = tempfile::Builder::new().prefix("ctd").tempdir_in("/tmp")?;
        let d = dir.path();
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{ttrpc}"
[debug]
  address = ""
[metrics]
  address = ""
"#,
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = d.join("c.sock").display(),
            ttrpc = d.join("t.sock").display(),
        );
        std::fs::write(d.join("config.toml"), config)?;
        let log = std::fs::File::create(d.join("containerd.log"))?;
        let child = tokio::process::Command::new("containerd")
            .arg("--config")
            .arg(d.join("config.toml"))
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting containerd")?;
        let c = Containerd { dir, _child: child };
        for _ in 0..200 {
            if c.ctr(&["version"]).await.is_ok() {
                return Ok(c);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "containerd did not start: {}",
            std::fs::read_to_string(c.dir.path().join("containerd.log")).unwrap_or_default()
        )
    }

    async fn ctr(&self, args: &[&str]) -> Result<String> {
        registry::run(
            tokio::process::Command::new("ctr")
                .arg("--address")
                .arg(self.dir.path().join("c.sock"))
                .args(["--namespace", "df-test"])
                .args(args),
        )
        .await
    }

    /// Pulls `reference` (on `registry`) with a `hosts.toml` that sends it to `mirror`.
    async fn pull_through(&self, reference: &str, registry: &str, mirror: &str) -> Result<()> {
        let hosts = self.dir.path().join("hosts").join(registry);
        std::fs::create_dir_all(&hosts)?;
        std::fs::write(
            hosts.join("hosts.toml"),
            format!(
                "server = \"http://{registry}\"\n\n[host.\"http://{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
            ),
        )?;
        let hosts_dir = self.dir.path().join("hosts");
        self.ctr(&[
            "images",
            "pull",
            "--hosts-dir",
            hosts_dir.to_str().unwrap(),
            "--snapshotter",
            "native",
            reference,
        ])
        .await?;
        Ok(())
    }
}

/// `skopeo copy` of `reference` into an OCI layout, through `mirror` set in a registries.conf.
async fn skopeo_through(
    work: &Path,
    reg: &Registry,
    mirror: &str,
    reference: &str,
    creds: Option<&str>,
) -> Result<PathBuf> {
    let conf = work.join(format!("registries-{}.conf", mirror.replace(':', "_")));
    std::fs::write(
        &conf,
        format!(
            "[[registry]]\nlocation = \"{}\"\ninsecure = true\n\n[[registry.mirror]]\nlocation = \"{mirror}\"\ninsecure = true\n",
            reg.host
        ),
    )?;
    let out_dir = work.join(format!("out-{}", mirror.replace(':', "_")));
    let mut cmd = tokio::process::Command::new("skopeo");
    cmd.arg("--registries-conf")
        .arg(&conf)
        .args(["copy", "--src-tls-verify=false"]);
    if let Some(c) = creds {
        // containers/image looks credentials up by the host it talks to, so the mirror's host has
        // an entry (as after `podman login` to it); `--src-creds` would reach the registry only.
        let auth = base64(c.as_bytes());
        let file = work.join("auth.json");
        std::fs::write(
            &file,
            format!(
                r#"{{"auths": {{"{}": {{"auth": "{auth}"}}, "{mirror}": {{"auth": "{auth}"}}}}}}"#,
                reg.host
            ),
        )?;
        cmd.arg("--src-authfile").arg(&file);
    }
    registry::run(
        cmd.arg(format!("docker://{reference}"))
            .arg(format!("oci:{}:pulled", out_dir.display())),
    )
    .await?;
    Ok(out_dir)
}

fn assert_layers_in_layout(layout: &Path, image: &Image) {
    for (d, size) in &image.layers {
        let p = layout.join("blobs").join(d.replace(':', "/"));
        let data = std::fs::read(&p).unwrap_or_else(|_| panic!("{d} missing from {layout:?}"));
        assert_eq!(data.len() as u64, *size);
        assert_eq!(format!("sha256:{}", hex::encode(Sha256::digest(&data))), *d);
    }
}

/// Each layer blob left the registry at most once — its bytes sent, summed over the producer's
/// ranged requests, are at most its size — and only to a df node, never to a client that went
/// around its mirror.
fn assert_layers_served_once(reg: &Registry, image: &Image) {
    let gets = reg.blob_gets().unwrap();
    let served = reg.served().unwrap();
    for (d, size) in &image.layers {
        let (_, bytes) = gets.get(d).copied().unwrap_or_default();
        assert!(
            bytes <= *size,
            "layer {d} ({size} bytes): the registry sent {bytes} bytes of it: {:?}",
            served
                .iter()
                .filter(|s| s.path.ends_with(d.as_str()))
                .collect::<Vec<_>>()
        );
        for s in served
            .iter()
            .filter(|s| s.method == "GET" && s.path.ends_with(d.as_str()))
        {
            assert!(
                s.user_agent.starts_with("df/"),
                "layer {d} fetched by {:?}, not through the mirror",
                s.user_agent
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn containerd_and_skopeo_pull_through_two_mirrors_and_each_layer_leaves_the_registry_once()
-> Result<()> {
    init_test_logs();
    let work = tempfile::tempdir()?;
    let reg = Registry::start(None).await?;
    // Layers of several pieces, one of one piece, one tiny.
    let image = registry::build_and_push(
        work.path(),
        &reg,
        "test/app",
        "v1",
        &[9 << 20, 3 << 20, 20_000],
        1,
        None,
    )
    .await?;
    // The default stall timeout: the harness's 2 s can, on a loaded 2-core host, declare the seed
    // gone mid-pull and have a node fetch a layer from the registry a second time.
    let swarm = Swarm::start(1, 2, |c| c.download.stall_timeout = Duration::from_secs(5)).await?;
    let reg_url: url::Url = reg.url.parse()?;
    let host = reg.host.clone();
    let ma = mirror_on(&swarm.nodes[0], |c| {
        c.registries.insert(host, reg_url.clone());
    })
    .await;
    let mb = mirror_on(&swarm.nodes[1], |c| c.upstream = Some(reg_url.clone())).await;
    let ctd = Containerd::start().await?;

    // Both pulls at the same moment: the cold case.
    let (a_addr, b_addr) = (ma.local_addr().to_string(), mb.local_addr().to_string());
    let (a, b) = tokio::join!(
        ctd.pull_through(&image.reference, &reg.host, &a_addr),
        skopeo_through(work.path(), &reg, &b_addr, &image.reference, None),
    );
    a?;
    let layout = b?;

    assert!(
        ctd.ctr(&["images", "ls", "-q"])
            .await?
            .contains(&image.reference)
    );
    assert_layers_in_layout(&layout, &image);
    assert_layers_served_once(&reg, &image);
    let layer_bytes: u64 = image.layers.iter().map(|(_, s)| s).sum();
    for m in [&ma, &mb] {
        let sent = m.stats().blob_bytes_sent.load(Ordering::Relaxed);
        assert!(
            sent >= layer_bytes,
            "mirror {} sent {sent} blob bytes, the layers are {layer_bytes}",
            m.local_addr()
        );
    }
    // The registry sent the layers about once in all (config blob and manifests aside).
    let registry_blob_bytes: u64 = reg.blob_gets()?.values().map(|(_, b)| b).sum();
    assert!(
        registry_blob_bytes <= image.total_blob_bytes,
        "registry sent {registry_blob_bytes} blob bytes for {} bytes of blobs",
        image.total_blob_bytes
    );
    ma.shutdown().await;
    mb.shutdown().await;
    swarm.stop().await;
    Ok(())
}

async fn get(c: &reqwest::Client, url: &str) -> reqwest::Response {
    c.get(url).send().await.unwrap()
}

async fn oci_code(r: reqwest::Response) -> (u16, String) {
    let status = r.status().as_u16();
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    (
        status,
        v["errors"][0]["code"].as_str().unwrap_or("").to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_pull_api_passes_manifests_through_and_serves_blobs_with_ranges() -> Result<()> {
    init_test_logs();
    let work = tempfile::tempdir()?;
    let reg = Registry::start(None).await?;
    let image =
        registry::build_and_push(work.path(), &reg, "lib/one", "v1", &[5 << 20], 2, None).await?;
    let swarm = Swarm::start(0, 1, |_| {}).await?;
    let reg_url: url::Url = reg.url.parse()?;
    let m = mirror_on(&swarm.nodes[0], |c| c.upstream = Some(reg_url.clone())).await;
    let base = format!("http://{}", m.local_addr());
    let c = reqwest::Client::new();
    const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    const INDEX: &str = "application/vnd.oci.image.index.v1+json";

    let r = get(&c, &format!("{base}/v2/")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["docker-distribution-api-version"],
        "registry/2.0"
    );

    // Manifest by tag: same bytes, type and digest as the registry's.
    let direct = c
        .get(format!("{}/v2/lib/one/manifests/v1", reg.url))
        .header("Accept", MANIFEST)
        .send()
        .await?;
    let direct_digest = direct.headers()["docker-content-digest"].clone();
    let direct_body = direct.bytes().await?;
    for _ in 0..2 {
        // The second time from the cache.
        let r = c
            .get(format!("{base}/v2/lib/one/manifests/v1"))
            .header("Accept", MANIFEST)
            .send()
            .await?;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], MANIFEST);
        assert_eq!(r.headers()["docker-content-digest"], direct_digest);
        assert_eq!(r.bytes().await?, direct_body);
    }
    assert_eq!(m.stats().manifests_from_cache.load(Ordering::Relaxed), 1);
    let digest = direct_digest.to_str()?.to_owned();
    let r = c
        .head(format!("{base}/v2/lib/one/manifests/{digest}"))
        .header("Accept", MANIFEST)
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-length"].to_str()?,
        direct_body.len().to_string()
    );

    // A multi-arch index passes through untouched.
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": INDEX,
        "manifests": [{
            "mediaType": MANIFEST, "digest": digest, "size": direct_body.len(),
            "platform": {"architecture": "amd64", "os": "linux"}
        }, {
            "mediaType": MANIFEST, "digest": digest, "size": direct_body.len(),
            "platform": {"architecture": "arm64", "os": "linux"}
        }]
    });
    let index_bytes = serde_json::to_vec(&index)?;
    let put = c
        .put(format!("{}/v2/lib/one/manifests/multi", reg.url))
        .header("Content-Type", INDEX)
        .body(index_bytes.clone())
        .send()
        .await?;
    assert_eq!(put.status(), 201, "{:?}", put.text().await);
    let r = c
        .get(format!("{base}/v2/lib/one/manifests/multi"))
        .header("Accept", INDEX)
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], INDEX);
    assert_eq!(
        r.headers()["docker-content-digest"].to_str()?,
        format!("sha256:{}", hex::encode(Sha256::digest(&index_bytes)))
    );
    assert_eq!(r.bytes().await?.as_ref(), index_bytes.as_slice());

    // Blobs: whole, HEAD, range.
    let (layer, size) = image.layers[0].clone();
    let blob_url = format!("{base}/v2/lib/one/blobs/{layer}");
    let r = get(&c, &blob_url).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"].to_str()?, layer);
    assert_eq!(r.headers()["content-length"].to_str()?, size.to_string());
    let whole = r.bytes().await?;
    assert_eq!(
        format!("sha256:{}", hex::encode(Sha256::digest(&whole))),
        layer
    );
    let r = c.head(&blob_url).send().await?;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"].to_str()?, size.to_string());
    let r = c
        .get(&blob_url)
        .header("Range", "bytes=1000-1999999")
        .send()
        .await?;
    assert_eq!(r.status(), 206);
    assert_eq!(
        r.headers()["content-range"].to_str()?,
        format!("bytes 1000-1999999/{size}")
    );
    assert_eq!(r.bytes().await?, whole.slice(1000..2_000_000));
    let r = c
        .get(&blob_url)
        .header("Range", format!("bytes={size}-"))
        .send()
        .await?;
    assert_eq!(r.status(), 416);

    // A client that goes away mid-blob does not disturb another pull of the same blob.
    let (layer2, _) = {
        let img2 =
            registry::build_and_push(work.path(), &reg, "lib/two", "v1", &[12 << 20], 3, None)
                .await?;
        img2.layers[0].clone()
    };
    let url2 = format!("{base}/v2/lib/two/blobs/{layer2}");
    let mut quitter = get(&c, &url2).await.bytes_stream();
    let first = quitter.next().await.unwrap()?;
    assert!(!first.is_empty());
    drop(quitter);
    let full = get(&c, &url2).await.bytes().await?;
    assert_eq!(
        format!("sha256:{}", hex::encode(Sha256::digest(&full))),
        layer2
    );

    // Errors, in the OCI format.
    let missing = format!("sha256:{}", "0".repeat(64));
    assert_eq!(
        oci_code(get(&c, &format!("{base}/v2/lib/one/blobs/{missing}")).await).await,
        (404, "BLOB_UNKNOWN".into())
    );
    assert_eq!(
        oci_code(get(&c, &format!("{base}/v2/lib/one/manifests/nosuchtag")).await).await,
        (404, "MANIFEST_UNKNOWN".into())
    );
    assert_eq!(
        oci_code(get(&c, &format!("{base}/v2/Bad/manifests/v1")).await).await,
        (400, "NAME_INVALID".into())
    );
    assert_eq!(
        oci_code(get(&c, &format!("{base}/v2/lib/one/blobs/sha256:xyz")).await).await,
        (400, "DIGEST_INVALID".into())
    );
    let push = c
        .post(format!("{base}/v2/lib/one/blobs/uploads/"))
        .send()
        .await?;
    assert_eq!(oci_code(push).await, (405, "UNSUPPORTED".into()));
    let put = c
        .put(format!("{base}/v2/lib/one/manifests/v2"))
        .body("{}")
        .send()
        .await?;
    assert_eq!(oci_code(put).await, (405, "UNSUPPORTED".into()));
    let del = c.delete(&blob_url).send().await?;
    assert_eq!(oci_code(del).await, (405, "UNSUPPORTED".into()));

    // An unreachable upstream: 503 with a message.
    let dead_port = registry::free_port()?;
    let dead = mirror_on(&swarm.nodes[0], |c| {
        c.upstream = Some(format!("http://127.0.0.1:{dead_port}").parse().unwrap());
    })
    .await;
    let r = get(
        &c,
        &format!("http://{}/v2/lib/one/manifests/v1", dead.local_addr()),
    )
    .await;
    assert_eq!(oci_code(r).await, (503, "UNAVAILABLE".into()));
    let r = get(
        &c,
        &format!(
            "http://{}/v2/lib/x/blobs/sha256:{}",
            dead.local_addr(),
            "1".repeat(64)
        ),
    )
    .await;
    assert_eq!(oci_code(r).await, (503, "UNAVAILABLE".into()));
    // `?ns=docker.io` with no mapping: a clear error, not a guess.
    let r = get(
        &c,
        &format!("{base}/v2/library/alpine/manifests/3?ns=docker.io"),
    )
    .await;
    assert_eq!(oci_code(r).await.0, 404);

    dead.shutdown().await;
    m.shutdown().await;
    swarm.stop().await;
    Ok(())
}

/// Every file under `dir`, read whole.
fn all_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(data) = std::fs::read(&p) {
                out.push((p, data));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_password_protected_registry_is_pulled_with_the_clients_credentials() -> Result<()> {
    init_test_logs();
    const USER: &str = "puller";
    const PASS: &str = "s3cret-df-test-pw";
    let work = tempfile::tempdir()?;
    let reg = Registry::start(Some((USER, PASS))).await?;
    let image = registry::build_and_push(
        work.path(),
        &reg,
        "private/app",
        "v1",
        &[6 << 20, 10_000],
        4,
        Some((USER, PASS)),
    )
    .await?;
    let swarm = Swarm::start(1, 1, |_| {}).await?;
    let reg_url: url::Url = reg.url.parse()?;
    let m = mirror_on(&swarm.nodes[0], |c| c.upstream = Some(reg_url.clone())).await;
    let base = format!("http://{}", m.local_addr());
    let c = reqwest::Client::new();

    // Without credentials: the registry's challenge comes back, for the ping and for a blob.
    let r = get(&c, &format!("{base}/v2/")).await;
    assert_eq!(r.status(), 401);
    assert!(
        r.headers()["www-authenticate"]
            .to_str()?
            .starts_with("Basic realm=\"df-test\"")
    );
    let r = get(
        &c,
        &format!("{base}/v2/private/app/blobs/{}", image.layers[0].0),
    )
    .await;
    assert_eq!(r.status(), 401);
    assert!(r.headers().contains_key("www-authenticate"));
    assert_eq!(oci_code(r).await.1, "UNAUTHORIZED");
    let r = get(&c, &format!("{base}/v2/private/app/manifests/v1")).await;
    assert_eq!(r.status(), 401);

    // With them, the manifest comes through.
    let r = c
        .get(format!("{base}/v2/private/app/manifests/v1"))
        .basic_auth(USER, Some(PASS))
        .header("Accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await?;
    assert_eq!(r.status(), 200, "{:?}", r.text().await);

    // And skopeo pulls through the mirror.
    let creds = format!("{USER}:{PASS}");
    let layout = skopeo_through(
        work.path(),
        &reg,
        &m.local_addr().to_string(),
        &image.reference,
        Some(&creds),
    )
    .await?;
    assert_layers_in_layout(&layout, &image);
    assert_layers_served_once(&reg, &image);
    assert!(m.stats().blob_bytes_sent.load(Ordering::Relaxed) >= image.layers[0].1);

    // The credentials were used, never stored: not in any node's or seed's data dir, in plain
    // or in the `Authorization: Basic` form.
    let basic = base64(creds.as_bytes());
    for member in swarm.all() {
        for (p, data) in all_files(&member.node.config().data_dir) {
            for needle in [PASS.as_bytes(), basic.as_bytes()] {
                assert!(
                    !data.windows(needle.len()).any(|w| w == needle),
                    "credentials found in {p:?}"
                );
            }
        }
    }
    m.shutdown().await;
    swarm.stop().await;
    Ok(())
}

fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn base64_encodes() {
    assert_eq!(base64(b"user:pass"), "dXNlcjpwYXNz");
    assert_eq!(base64(b"ab"), "YWI=");
    assert_eq!(base64(b"a"), "YQ==");
}

/// Starts a preheat job and polls it until it ends.
async fn preheat_to_end(
    api: &df_node::api::client::ApiClient,
    req: df_node::preheat::PreheatRequest,
) -> Result<df_node::preheat::PreheatJob> {
    let id = api.preheat(&req).await?.id;
    df_testnet::finished_preheat(api, &id, Duration::from_secs(120)).await
}

fn image_preheat(
    image: &str,
    platform: Option<&str>,
    creds: Option<(&str, &str)>,
) -> df_node::preheat::PreheatRequest {
    df_node::preheat::PreheatRequest {
        target: df_node::preheat::PreheatTarget::Image {
            image: image.to_owned(),
            platform: platform.map(str::to_owned),
            username: creds.map(|c| c.0.to_owned()),
            password: creds.map(|c| c.1.to_owned()),
        },
        scope: df_node::preheat::PreheatScope::Seed,
        timeout_secs: None,
    }
}

/// A private two-platform image (OCI index) is preheated through a node's API; the registry is
/// then stopped, and skopeo still pulls the arm64 image through the node's mirror: the tag's
/// index, the platform manifest, config and layers all come from the swarm.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_preheated_private_multi_platform_image_is_pulled_with_the_registry_stopped() -> Result<()>
{
    use df_node::preheat::JobState;
    init_test_logs();
    const USER: &str = "preheater";
    const PASS: &str = "s3cret-preheat-pw";
    let work = tempfile::tempdir()?;
    let reg = Registry::start(Some((USER, PASS))).await?;
    let image = registry::build_and_push_index(
        work.path(),
        &reg,
        "private/multi",
        "v1",
        &[("linux", "amd64"), ("linux", "arm64")],
        &[3 << 20, 10_000],
        8,
        Some((USER, PASS)),
    )
    .await?;
    let swarm = Swarm::start(2, 1, |_| {}).await?;
    for m in swarm.all() {
        assert!(m.node.wait_for_seeds(1, Duration::from_secs(40)).await);
    }
    let api = &swarm.nodes[0].api;
    let name = format!("http://{}/private/multi:v1", reg.host);

    // Errors in words: no credentials for a private image, a platform the image lacks.
    let job = preheat_to_end(api, image_preheat(&name, None, None)).await?;
    assert_eq!(job.state, JobState::Failed);
    let e = job.error.unwrap_or_default();
    assert!(e.contains("private") && e.contains("password"), "{e}");
    let job = preheat_to_end(
        api,
        image_preheat(&name, Some("linux/s390x"), Some((USER, PASS))),
    )
    .await?;
    let e = job.error.unwrap_or_default();
    assert!(
        e.contains("linux/s390x") && e.contains("linux/amd64, linux/arm64"),
        "{e}"
    );

    // Every platform: the tag, the index, 2 manifests, 2 configs, 4 layers.
    let job = preheat_to_end(api, image_preheat(&name, None, Some((USER, PASS)))).await?;
    assert_eq!(job.state, JobState::Succeeded, "{job:#?}");
    assert_eq!(job.tasks.len(), 10, "{:#?}", job.tasks);
    let ids: Vec<&str> = job.tasks.iter().map(|t| t.id.as_str()).collect();
    let arm = image
        .platforms
        .iter()
        .find(|p| p.platform == "linux/arm64")
        .context("no arm64 image")?;
    for d in arm
        .layers
        .iter()
        .map(|l| &l.0)
        .chain([&arm.config.0, &arm.manifest])
    {
        let key = df_protocols::task::TaskKey::for_digest(&d.parse()?).to_string();
        assert!(ids.contains(&key.as_str()), "{d} not preheated");
    }

    // The registry goes away; the mirror pulls from the swarm.
    let reg_url: url::Url = reg.url.parse()?;
    let host = reg.host.clone();
    drop(reg);
    let m = mirror_on(&swarm.nodes[0], |c| c.upstream = Some(reg_url.clone())).await;
    let mirror = m.local_addr().to_string();
    let conf = work.path().join("registries.conf");
    std::fs::write(
        &conf,
        format!(
            "[[registry]]\nlocation = \"{host}\"\ninsecure = true\n\n[[registry.mirror]]\nlocation = \"{mirror}\"\ninsecure = true\n"
        ),
    )?;
    let auth = base64(format!("{USER}:{PASS}").as_bytes());
    let authfile = work.path().join("auth.json");
    std::fs::write(
        &authfile,
        format!(
            r#"{{"auths": {{"{host}": {{"auth": "{auth}"}}, "{mirror}": {{"auth": "{auth}"}}}}}}"#
        ),
    )?;
    let out = work.path().join("pulled");
    registry::run(
        tokio::process::Command::new("skopeo")
            .arg("--registries-conf")
            .arg(&conf)
            .args(["--override-os", "linux", "--override-arch", "arm64"])
            .args(["copy", "--src-tls-verify=false", "--src-authfile"])
            .arg(&authfile)
            .arg(format!("docker://{host}/private/multi:v1"))
            .arg(format!("oci:{}:pulled", out.display())),
    )
    .await?;
    for (d, size) in arm.layers.iter().chain([&arm.config]) {
        let p = out.join("blobs").join(d.replace(':', "/"));
        let data = std::fs::read(&p).with_context(|| format!("{d} missing from the pull"))?;
        assert_eq!(data.len() as u64, *size);
        assert_eq!(format!("sha256:{}", hex::encode(Sha256::digest(&data))), *d);
    }
    assert!(
        m.stats().manifests_from_swarm.load(Ordering::Relaxed) >= 2,
        "the tag's index and the platform manifest came from the swarm"
    );
    m.shutdown().await;
    swarm.stop().await;
    Ok(())
}
