//! `df get`: download through the local node's API, or through an embedded node when none runs.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use df_node::api::Refusal;
use df_node::api::client::{ApiClient, ApiError};
use df_node::{ApiAddr, DownloadRequest, Node, NodeConfig, Role};
use df_protocols::task::{ContentDigest, parse_url};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use crate::args::{API_TOKEN_ENV, ClientApi, GetArgs, parse_header};
use crate::progress::Progress;

/// Where the bytes go.
enum Output {
    Stdout,
    /// A regular file (new or replaced): written beside it under a temporary name, synced, and
    /// renamed into place.
    File(PathBuf),
    /// Something that exists and is not a regular file (`/dev/null`, a FIFO, a terminal):
    /// written in place, as wget and curl do. Never replaced.
    Device(PathBuf),
}

/// The node serving this download: a running daemon, or one embedded for this download.
struct Backend {
    api: ApiClient,
    embedded: Option<(Node, tempfile::TempDir)>,
}

impl Backend {
    async fn shutdown(self) {
        if let Some((node, dir)) = self.embedded {
            node.shutdown().await;
            node.release_for_exit().await;
            drop(dir);
        }
    }
}

async fn backend(args: &GetArgs) -> Result<Backend> {
    let target = ClientApi::from_env(args.api.as_deref(), args.api_token.as_deref())?;
    let api = target.client()?;
    match api.healthz().await {
        Ok(()) => {
            return Ok(Backend {
                api,
                embedded: None,
            });
        }
        Err(e) if target.explicit => return Err(e.into()),
        Err(_) => {}
    }
    // No daemon: run a node for this download only.
    let dir = tempfile::Builder::new()
        .prefix("df-get-")
        .tempdir()
        .context("creating a temporary directory for the embedded node")?;
    let mut cfg = NodeConfig::local(dir.path(), Role::Ephemeral);
    cfg.api = Some(ApiAddr::Unix(dir.path().join("api.sock")));
    if !args.bootstrap.is_empty() {
        // Reachable by the swarm while it downloads, so peers can fetch from it too.
        cfg.listen = vec!["/ip4/0.0.0.0/tcp/0".parse()?];
        cfg.data_listen = "0.0.0.0:0".parse()?;
        cfg.bootstrap = args.bootstrap.clone();
    }
    args.swarm.apply(&mut cfg);
    cfg.storage.task_ttl = Duration::ZERO;
    let node = df_seed::start(cfg)
        .await
        .context("starting the embedded node")?;
    if !args.bootstrap.is_empty() && !node.wait_for_peers(1, Duration::from_secs(10)).await {
        tracing::warn!("no bootstrap peer answered within 10 s; continuing alone");
    }
    let api = ApiClient::new(node.api_addr());
    Ok(Backend {
        api,
        embedded: Some((node, dir)),
    })
}

fn request(args: &GetArgs) -> Result<DownloadRequest> {
    parse_url(&args.url).map_err(|e| anyhow!("{e}"))?;
    let headers = args
        .headers
        .iter()
        .map(|h| parse_header(h))
        .collect::<Result<Vec<_>>>()?;
    let digest = args
        .digest
        .as_deref()
        .map(|d| d.parse::<ContentDigest>().map_err(|e| anyhow!("{e}")))
        .transpose()?;
    Ok(DownloadRequest {
        url: args.url.clone(),
        headers,
        digest,
        tag: args.tag.clone(),
        filtered_query_params: args.filtered_query_params.clone(),
        disable_back_to_source: args.disable_back_to_source,
        limit_rate: args.limit_rate,
        ..DownloadRequest::default()
    })
}

fn output(args: &GetArgs) -> Result<Output> {
    let path = match (&args.output, &args.output_document) {
        (None, Some(p)) if p.as_os_str() == "-" => return Ok(Output::Stdout),
        (Some(p), None) | (None, Some(p)) => p,
        _ => bail!("say where to write: -o FILE, or -O - for standard output"),
    };
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => bail!("{} is a directory", path.display()),
        Ok(m) if !m.is_file() => Ok(Output::Device(path.clone())),
        // An existing file, maybe through symbolic links: the file they lead to is replaced, and
        // the links stay.
        Ok(_) => Ok(Output::File(
            std::fs::canonicalize(path).unwrap_or_else(|_| path.clone()),
        )),
        Err(_) => Ok(Output::File(path.clone())),
    }
}

/// A temporary file beside the output, removed unless committed.
struct TempOutput {
    path: PathBuf,
    file: Option<tokio::fs::File>,
    committed: bool,
}

impl TempOutput {
    async fn create(target: &Path) -> Result<TempOutput> {
        let dir = match target.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = target
            .file_name()
            .ok_or_else(|| anyhow!("output path {} names no file", target.display()))?
            .to_string_lossy()
            .into_owned();
        let path = dir.join(format!(".{name}.df-{:08x}.part", rand::random::<u32>()));
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .await
            .map_err(|e| io_error(e, &path))?;
        Ok(TempOutput {
            path,
            file: Some(file),
            committed: false,
        })
    }

    async fn commit(mut self, target: &Path) -> Result<()> {
        if let Some(f) = self.file.take() {
            f.sync_all().await.map_err(|e| io_error(e, &self.path))?;
        }
        tokio::fs::rename(&self.path, target)
            .await
            .map_err(|e| io_error(e, target))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for TempOutput {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

pub(crate) fn io_error(e: std::io::Error, path: &Path) -> anyhow::Error {
    if e.raw_os_error() == Some(28) {
        anyhow!("no space left on device writing {}", path.display())
    } else {
        anyhow!("writing {}: {e}", path.display())
    }
}

enum Sink {
    Stdout(tokio::io::Stdout),
    File(TempOutput),
    Device(tokio::fs::File, PathBuf),
}

impl Sink {
    async fn write(&mut self, data: &[u8]) -> Result<()> {
        match self {
            Sink::Stdout(s) => s.write_all(data).await.map_err(crate::copy::stdout_error),
            Sink::File(t) => {
                let path = t.path.clone();
                let f = t.file.as_mut().ok_or_else(|| anyhow!("output closed"))?;
                f.write_all(data).await.map_err(|e| io_error(e, &path))
            }
            Sink::Device(f, path) => f.write_all(data).await.map_err(|e| io_error(e, path)),
        }
    }
}

/// Runs `df get`; returns an error whose message is the one line to print.
pub(crate) async fn run(args: GetArgs) -> Result<()> {
    let out = output(&args)?;
    let req = request(&args)?;
    let started = Instant::now();
    let backend = backend(&args).await?;
    let work = download(&args, &backend.api, &req, &out, started);
    let result = match args.timeout {
        Some(t) => match tokio::time::timeout(t, work).await {
            Ok(r) => r,
            Err(_) => Err(anyhow!("timed out after {}", humantime::format_duration(t))),
        },
        None => work.await,
    };
    backend.shutdown().await;
    result
}

async fn download(
    args: &GetArgs,
    api: &ApiClient,
    req: &DownloadRequest,
    out: &Output,
    started: Instant,
) -> Result<()> {
    let info = api.create_task(req).await.map_err(describe)?;
    let total = info.content_length.unwrap_or(0);
    let show = !args.no_progress && std::io::stderr().is_terminal();
    if let Output::File(target) = out
        && crate::copy::api_is_local(api.addr())
        && copy_beside_node(api, &info.id, total, target, show).await?
    {
        report(api, &info.id, out, total, started, show).await;
        return Ok(());
    }
    if let Output::Stdout = out
        && crate::copy::api_is_local(api.addr())
        && stream_beside_node(api, &info.id, total, show).await?
    {
        report(api, &info.id, out, total, started, show).await;
        return Ok(());
    }
    let (len, mut stream) = api.content(&info.id, None).await.map_err(describe)?;
    if len != total {
        bail!("the node announced {total} bytes but streams {len}");
    }
    let mut sink = match out {
        Output::Stdout => Sink::Stdout(tokio::io::stdout()),
        Output::File(p) => Sink::File(TempOutput::create(p).await?),
        Output::Device(p) => Sink::Device(
            tokio::fs::OpenOptions::new()
                .write(true)
                .open(p)
                .await
                .map_err(|e| io_error(e, p))?,
            p.clone(),
        ),
    };
    let progress = show.then(|| Progress::start(api.clone(), info.id.clone(), total));
    let mut hasher = req.digest.as_ref().map(|d| d.algorithm().hasher());
    let mut written = 0u64;
    let outcome: Result<()> = async {
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    // The node aborted the stream: ask it why.
                    let why = api
                        .failure(&info.id, Duration::from_secs(30))
                        .await
                        .map(|e| e.to_string())
                        .unwrap_or_else(|| e.to_string());
                    bail!("{why}");
                }
            };
            if let Some(h) = hasher.as_mut() {
                h.update(&chunk);
            }
            sink.write(&chunk).await?;
            written += chunk.len() as u64;
            if let Some(p) = &progress {
                p.set(written);
            }
        }
        if written != total {
            bail!("download ended after {written} of {total} bytes");
        }
        if let (Some(h), Some(expected)) = (hasher.take(), req.digest.as_ref()) {
            let actual = h.finish();
            if &actual != expected {
                bail!("digest mismatch: expected {expected}, got {actual}");
            }
        }
        Ok(())
    }
    .await;
    if let Some(p) = &progress {
        p.finish();
    }
    outcome?;
    match (sink, out) {
        (Sink::File(t), Output::File(target)) => t.commit(target).await?,
        (Sink::Stdout(mut s), _) => s.flush().await.context("flushing standard output")?,
        (Sink::Device(mut f, p), _) => f.flush().await.map_err(|e| io_error(e, &p))?,
        _ => {}
    }
    report(api, &info.id, out, total, started, show).await;
    Ok(())
}

/// `-o FILE` with the node on this host: the pieces copied from the node's files into the
/// output (see [`crate::copy`]). `Ok(false)`: the node does not offer that; stream instead.
///
/// No hash is taken here: with `--digest` the task is a digest task, whose node lists its last
/// piece only after the whole content has matched the digest.
async fn copy_beside_node(
    api: &ApiClient,
    id: &str,
    total: u64,
    target: &Path,
    show: bool,
) -> Result<bool> {
    let temp = TempOutput::create(target).await?;
    let file = match temp.file.as_ref() {
        Some(f) => f.try_clone().await.map_err(|e| io_error(e, &temp.path))?,
        None => bail!("output closed"),
    };
    let file = std::sync::Arc::new(file.into_std().await);
    let progress = show.then(|| Progress::start(api.clone(), id.to_owned(), total));
    let copied = crate::copy::copy_pieces(api, id, total, file, &temp.path, |n| {
        if let Some(p) = &progress {
            p.set(n);
        }
    })
    .await;
    if let Some(p) = &progress {
        p.finish();
    }
    match copied {
        Ok(crate::copy::Copied::All {
            from_files,
            through_api,
            linked,
        }) => {
            tracing::debug!(
                task = id,
                from_files,
                through_api,
                linked = linked.is_some(),
                "pieces copied beside the node"
            );
            match linked {
                Some(l) => {
                    let target = target.to_owned();
                    tokio::task::spawn_blocking(move || l.commit(&target)).await??;
                }
                None => temp.commit(target).await?,
            }
            Ok(true)
        }
        // `temp` goes, and the content is streamed into a new one.
        Ok(crate::copy::Copied::Unsupported) => Ok(false),
        Err(e) => Err(e),
    }
}

/// `-O -` with the node on this host: the pieces sent in order from the node's files to
/// standard output (see [`crate::copy::stream_pieces`]). `Ok(false)`: the node does not offer
/// that and nothing was written; stream instead. As with `-o`, a digest task's node lists its
/// last piece only after the whole content has matched.
async fn stream_beside_node(api: &ApiClient, id: &str, total: u64, show: bool) -> Result<bool> {
    let progress = show.then(|| Progress::start(api.clone(), id.to_owned(), total));
    let sent = crate::copy::stream_pieces(api, id, total, |n| {
        if let Some(p) = &progress {
            p.set(n);
        }
    })
    .await;
    if let Some(p) = &progress {
        p.finish();
    }
    match sent? {
        crate::copy::Copied::All {
            from_files,
            through_api,
            ..
        } => {
            tracing::debug!(
                task = id,
                from_files,
                through_api,
                "pieces sent to standard output beside the node"
            );
            Ok(true)
        }
        crate::copy::Copied::Unsupported => Ok(false),
    }
}

/// The closing line on a terminal: where the bytes went, how fast, and from whom.
async fn report(api: &ApiClient, id: &str, out: &Output, total: u64, started: Instant, show: bool) {
    if show {
        let secs = started.elapsed().as_secs_f64().max(1e-3);
        let share = api
            .task(id)
            .await
            .ok()
            .map(|t| {
                let got = t.from_peers + t.from_origin;
                if got == 0 {
                    "served from the local cache".to_owned()
                } else {
                    format!(
                        "{:.0} % from peers",
                        100.0 * t.from_peers as f64 / got as f64
                    )
                }
            })
            .unwrap_or_default();
        let dest = match out {
            Output::File(p) | Output::Device(p) => p.display().to_string(),
            Output::Stdout => "standard output".to_owned(),
        };
        let _ = writeln!(
            std::io::stderr(),
            "df: saved {dest} ({total} bytes in {secs:.1} s, {:.1} MB/s, {share})",
            total as f64 / secs / 1e6
        );
    }
}

/// Turns API errors into the one line the user sees.
pub(crate) fn describe(e: ApiError) -> anyhow::Error {
    match e {
        ApiError::Task(t) => anyhow!("{t}"),
        ApiError::Refused(r @ Refusal::Unauthorized { .. }) => anyhow!(
            "the df API refused the request: {r} (give the node's api-token file with \
             --api-token FILE, or the token itself in ${API_TOKEN_ENV})"
        ),
        other => anyhow!("{other}"),
    }
}
