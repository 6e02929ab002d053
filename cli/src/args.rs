//! Command-line arguments, and the pure function that turns them (and a config file) into a
//! [`NodeConfig`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use df_node::Multiaddr;
use df_node::api::client::ApiClient;
use df_node::api::token::{ApiToken, TOKEN_FILE};
use df_node::config::default_data_dir;
use df_node::{ApiAddr, NodeConfig, Role};
use df_proxy::MirrorConfig;

/// Peer-to-peer distribution of files and container images.
#[derive(Debug, Parser)]
#[command(name = "df", version, about, long_about = None)]
pub(crate) struct Cli {
    /// Log line format on standard error: `text` (coloured only on a terminal) or `json` (one
    /// object per line, for log shippers). `RUST_LOG` sets the level filter.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t = LogFormat::Text,
        env = "DF_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Download a URL through the swarm (like wget / dfget).
    Get(GetArgs),
    /// Run a node: download for this host, serve peers, and (with `--mirror-listen`) a registry mirror.
    Node(ServeArgs),
    /// Run a seed: fetch origins for the swarm and cache what it fetched.
    Seed(ServeArgs),
    /// Print a node's status as JSON.
    Status(StatusArgs),
    /// Remove a task (e.g. a bad artifact) from this node and, with --scope, from the cluster's
    /// seeds or every member holding it; prints one line per host.
    Purge(PurgeArgs),
    /// Put a file or an image into the cluster's caches before anyone asks for it: the task's
    /// owning seeds fetch it (with --scope, every seed or every member too). Prints the job ID, or
    /// with --wait follows it with a progress bar and exits non-zero if it fails.
    Preheat(PreheatArgs),
    /// Open the node's status page in a local browser: relays a loopback port to the node's API
    /// (read-only routes only). For remote viewing, run the node with --ui-listen instead.
    Ui(UiArgs),
    /// Write a new swarm key (the pre-shared key members of a private swarm share).
    SwarmKey(SwarmKeyArgs),
}

/// Which swarm a node joins (`df node`, `df seed`, and `df get`'s embedded node).
#[derive(Debug, Args, Default, Clone)]
pub(crate) struct SwarmArgs {
    /// The swarm key file (IPFS `swarm.key` format). Default: `<data dir>/swarm.key`, created by
    /// a seed (or the first node of a new swarm) on first start.
    #[arg(
        long,
        value_name = "FILE",
        env = "DF_SWARM_KEY",
        conflicts_with = "open_swarm"
    )]
    pub swarm_key: Option<PathBuf>,
    /// Run without a swarm key: anyone who can reach this node may connect (only listed
    /// `[trust] producers` are trusted then).
    #[arg(long)]
    pub open_swarm: bool,
    /// The cluster to join (config key `cluster`, default `default`): members of other clusters
    /// are never seeds or sources of this node.
    #[arg(long, value_name = "NAME", env = "DF_CLUSTER")]
    pub cluster: Option<String>,
}

impl SwarmArgs {
    /// Lays the flags over `cfg`.
    pub(crate) fn apply(&self, cfg: &mut NodeConfig) {
        if let Some(k) = &self.swarm_key {
            cfg.network.swarm_key = Some(k.clone());
            cfg.network.open_swarm = false;
        }
        if self.open_swarm {
            cfg.network.open_swarm = true;
            cfg.network.swarm_key = None;
        }
        if let Some(c) = &self.cluster {
            cfg.cluster = c.clone();
        }
    }
}

#[derive(Debug, Args)]
pub(crate) struct SwarmKeyArgs {
    /// Where to write it (mode 0600; an existing file is never overwritten), or `-` for
    /// standard output.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

#[derive(Debug, Args)]
pub(crate) struct GetArgs {
    /// The URL to download (http or https).
    pub url: String,
    /// Write to FILE (through a temporary file beside it, renamed on success).
    #[arg(
        short = 'o',
        long = "output",
        value_name = "FILE",
        conflicts_with = "output_document"
    )]
    pub output: Option<PathBuf>,
    /// Write to FILE, or to standard output with `-O -`.
    #[arg(short = 'O', long = "output-document", value_name = "FILE")]
    pub output_document: Option<PathBuf>,
    /// The node's API (HOST:PORT or a unix socket path). Default: the local node's socket, and an
    /// embedded node for this one download when nothing listens there.
    #[arg(long, value_name = "ADDR")]
    pub api: Option<String>,
    /// File holding the node's API token, needed by a TCP API on a non-loopback address.
    /// Default: `$DF_API_TOKEN` (the token itself), else `<data dir>/api-token` for a loopback
    /// `--api HOST:PORT` when that file exists.
    #[arg(long, value_name = "FILE")]
    pub api_token: Option<PathBuf>,
    /// Extra request header for the origin, `Name: value` (repeatable).
    #[arg(short = 'H', long = "header", value_name = "HEADER")]
    pub headers: Vec<String>,
    /// Expected digest of the content, `sha256:HEX` or `sha512:HEX`. The digest alone names the
    /// task, so the same bytes at two URLs are one swarm.
    #[arg(long)]
    pub digest: Option<String>,
    /// Tag separating tasks of the same URL.
    #[arg(long, default_value = "")]
    pub tag: String,
    /// Query parameter ignored when naming the task (repeatable), e.g. a signature.
    #[arg(long = "filtered-query-param", value_name = "NAME")]
    pub filtered_query_params: Vec<String>,
    /// Give up after this long (e.g. `30s`, `10m`).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
    /// Never fetch from the origin (only peers and seeds serve).
    #[arg(long)]
    pub disable_back_to_source: bool,
    /// Download at most RATE bytes per second (as wget's flag), e.g. `500KiB`, `2MiB`, `1MB`
    /// (KB/MB are powers of 1000, KiB/MiB of 1024).
    #[arg(long, value_name = "RATE")]
    pub limit_rate: Option<df_node::limits::Rate>,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// For the embedded node: peers to join (repeatable).
    #[arg(long, value_name = "MULTIADDR")]
    pub bootstrap: Vec<Multiaddr>,
    #[command(flatten)]
    pub swarm: SwarmArgs,
}

#[derive(Debug, Args, Default)]
pub(crate) struct ServeArgs {
    /// TOML config file; flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Data directory (identity key, piece store, API socket).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// libp2p listen address (repeatable).
    #[arg(long, value_name = "MULTIADDR")]
    pub listen: Vec<Multiaddr>,
    /// Peer to join through, with or without /p2p/<peer id> (repeatable).
    #[arg(long, value_name = "MULTIADDR")]
    pub bootstrap: Vec<Multiaddr>,
    /// Local API address: HOST:PORT or a unix socket path.
    #[arg(long, value_name = "ADDR")]
    pub api: Option<String>,
    /// Data-plane (piece transfer) listen address, HOST:PORT.
    #[arg(long, value_name = "ADDR")]
    pub data_listen: Option<SocketAddr>,
    /// Serve `/metrics`, `/healthz` and `/readyz` (read-only, no token) on HOST:PORT, for
    /// Prometheus and Kubernetes probes.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// Serve the status page (`GET /`) and the read-only JSON it reads on HOST:PORT, for remote
    /// viewing; the browser asks for the API token (any user name) unless --ui-public.
    #[arg(long, value_name = "ADDR")]
    pub ui_listen: Option<SocketAddr>,
    /// Serve --ui-listen without the API token.
    #[arg(long)]
    pub ui_public: bool,
    /// Seeds owning each task (a seed reads it): the first fetches the origin, the others hold
    /// replicas and take over if it dies (config key `replicas`, default 2; 1 = no replicas).
    #[arg(long, value_name = "N")]
    pub replicas: Option<usize>,
    /// Serve a registry mirror (OCI pull API) on HOST:PORT.
    #[arg(long, value_name = "ADDR")]
    pub mirror_listen: Option<SocketAddr>,
    /// The mirror's registry for requests without containerd's `?ns=`.
    #[arg(long, value_name = "URL")]
    pub mirror_upstream: Option<url::Url>,
    /// Where the mirror sends `?ns=HOST` requests, HOST=URL (repeatable).
    #[arg(long, value_name = "HOST=URL", value_parser = df_proxy::config::parse_registry_mapping)]
    pub mirror_registry: Vec<(String, url::Url)>,
    /// Let the mirror serve `?ns=HOST` for hosts not mapped with --mirror-registry (from
    /// https://HOST).
    #[arg(long)]
    pub mirror_allow_unmapped: bool,
    /// Extra CA certificates (PEM) for HTTPS registries and origins (repeatable).
    #[arg(long, value_name = "FILE")]
    pub mirror_ca_bundle: Vec<PathBuf>,
    /// Accept any TLS certificate from registries and origins (test setups only).
    #[arg(long)]
    pub mirror_insecure: bool,
    #[command(flatten)]
    pub swarm: SwarmArgs,
}

#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// The node's API (HOST:PORT or a unix socket path).
    #[arg(long, value_name = "ADDR")]
    pub api: Option<String>,
    /// File holding the node's API token, needed by a TCP API on a non-loopback address.
    /// Default: `$DF_API_TOKEN` (the token itself), else `<data dir>/api-token` for a loopback
    /// `--api HOST:PORT` when that file exists.
    #[arg(long, value_name = "FILE")]
    pub api_token: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct PurgeArgs {
    /// The task: its ID (as `df status` and the API show it), or the URL `df get` fetched it by.
    pub task: String,
    /// Where: local, all_seeds or all_peers.
    #[arg(long, default_value = "all_peers", value_parser = parse_scope)]
    pub scope: df_node::api::PurgeScope,
    #[command(flatten)]
    pub node: StatusArgs,
}

fn parse_scope(s: &str) -> Result<df_node::api::PurgeScope, String> {
    s.parse()
}

#[derive(Debug, Args)]
pub(crate) struct PreheatArgs {
    /// The file's URL (http or https).
    #[arg(required_unless_present_any = ["image", "job"], conflicts_with_all = ["image", "job"])]
    pub url: Option<String>,
    /// An image instead: REGISTRY/REPO:TAG or REGISTRY/REPO@DIGEST (http://REGISTRY/… for a
    /// plain-HTTP registry). Its manifests, config and layers become the tasks a mirror pull uses.
    #[arg(long, value_name = "IMAGE", conflicts_with = "job")]
    pub image: Option<String>,
    /// The image's platform, OS/ARCH[/VARIANT]; every platform of an index when absent.
    #[arg(long, value_name = "PLATFORM")]
    pub platform: Option<String>,
    /// Registry user name for a private image (the password from $DF_REGISTRY_PASSWORD).
    #[arg(long, value_name = "NAME")]
    pub username: Option<String>,
    /// Extra request header for the file's origin, `Name: value` (repeatable).
    #[arg(
        short = 'H',
        long = "header",
        value_name = "HEADER",
        conflicts_with = "image"
    )]
    pub headers: Vec<String>,
    /// Expected digest of the file (`sha256:HEX`): the digest names the task.
    #[arg(long, conflicts_with = "image")]
    pub digest: Option<String>,
    /// Tag separating tasks of the same URL (as `df get --tag`).
    #[arg(long, default_value = "", conflicts_with = "image")]
    pub tag: String,
    /// Query parameter ignored when naming the task (repeatable), as `df get`'s.
    #[arg(
        long = "filtered-query-param",
        value_name = "NAME",
        conflicts_with = "image"
    )]
    pub filtered_query_params: Vec<String>,
    /// Who holds it afterwards: seed (the task's owners), all_seeds or all_peers.
    #[arg(long, default_value = "seed")]
    pub scope: String,
    /// Follow the job to its end with a progress bar; exit 1 if it fails.
    #[arg(long)]
    pub wait: bool,
    /// Report on (or with --wait, follow) an existing job instead of starting one.
    #[arg(long, value_name = "ID")]
    pub job: Option<String>,
    /// Give up after this many seconds (the job's deadline). Default: 3600.
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<u64>,
    #[command(flatten)]
    pub node: StatusArgs,
}

#[derive(Debug, Args)]
pub(crate) struct UiArgs {
    #[command(flatten)]
    pub node: StatusArgs,
    /// Where the page is served (loopback only).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
}

/// Builds a node's config: defaults, then the config file's text (if any), then the flags.
/// Its `[proxy]` section is the mirror's ([`mirror_config`]).
pub(crate) fn node_config(role: Role, file: Option<&str>, args: &ServeArgs) -> Result<NodeConfig> {
    let mut cfg: NodeConfig = match file {
        Some(text) => {
            let mut table: toml::Table = toml::from_str(text).context("invalid config file")?;
            table.remove("proxy");
            toml::Value::Table(table)
                .try_into()
                .context("invalid config file")?
        }
        None => NodeConfig::default(),
    };
    cfg.role = role;
    if let Some(d) = &args.data_dir {
        cfg.data_dir = d.clone();
    }
    if !args.listen.is_empty() {
        cfg.listen = args.listen.clone();
    }
    if !args.bootstrap.is_empty() {
        cfg.bootstrap = args.bootstrap.clone();
    }
    if let Some(a) = &args.api {
        cfg.api = Some(a.parse::<ApiAddr>().map_err(anyhow::Error::msg)?);
    }
    if let Some(a) = args.data_listen {
        cfg.data_listen = a;
    }
    if let Some(a) = args.metrics_listen {
        cfg.metrics_listen = Some(a);
    }
    if let Some(a) = args.ui_listen {
        cfg.ui_listen = Some(a);
    }
    if let Some(n) = args.replicas {
        cfg.replicas = n;
    }
    if args.ui_public {
        cfg.ui_public = true;
    }
    args.swarm.apply(&mut cfg);
    if cfg.listen.is_empty() {
        bail!("no listen address: give --listen or `listen` in the config file");
    }
    // The mirror's blobs are fetched by the node, so its TLS settings apply to origins too.
    let mirror = mirror_config(file, args)?;
    cfg.origin.ca_bundle.extend(mirror.ca_bundle);
    cfg.origin.insecure |= mirror.insecure;
    Ok(cfg)
}

/// Builds the registry mirror's config: defaults, the file's `[proxy]` section, then the flags.
pub(crate) fn mirror_config(file: Option<&str>, args: &ServeArgs) -> Result<MirrorConfig> {
    let mut cfg = match file {
        Some(text) => {
            let mut table: toml::Table = toml::from_str(text).context("invalid config file")?;
            match table.remove("proxy") {
                Some(v) => v.try_into().context("invalid [proxy] section")?,
                None => MirrorConfig::default(),
            }
        }
        None => MirrorConfig::default(),
    };
    if let Some(a) = args.mirror_listen {
        cfg.listen = Some(a);
    }
    if let Some(u) = &args.mirror_upstream {
        cfg.upstream = Some(u.clone());
    }
    for (host, url) in &args.mirror_registry {
        cfg.registries.insert(host.clone(), url.clone());
    }
    cfg.ca_bundle.extend(args.mirror_ca_bundle.iter().cloned());
    cfg.insecure |= args.mirror_insecure;
    cfg.allow_unmapped |= args.mirror_allow_unmapped;
    Ok(cfg)
}

/// The environment variable holding an API token (the token itself, not a file).
pub(crate) const API_TOKEN_ENV: &str = "DF_API_TOKEN";

/// The node API a client command talks to.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ClientApi {
    pub addr: ApiAddr,
    /// Whether `--api` named it (else it is the default node's socket).
    pub explicit: bool,
    pub token: TokenSource,
}

/// Where a client command's API token comes from.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum TokenSource {
    None,
    /// `--api-token FILE`: must be readable.
    File(PathBuf),
    /// `$DF_API_TOKEN`.
    Env(String),
    /// The default node's `api-token`, used when it exists.
    DefaultFile(PathBuf),
}

/// The API a client command uses: `--api`, else the default node's socket in `data_dir`; its token
/// from `--api-token FILE`, else `$DF_API_TOKEN` (`env_token`), else — for a loopback TCP address
/// only, so that it never goes to another host — `<data_dir>/api-token` if it exists.
pub(crate) fn client_api(
    api: Option<&str>,
    token_file: Option<&Path>,
    env_token: Option<&str>,
    data_dir: &Path,
) -> Result<ClientApi> {
    let (addr, explicit) = match api {
        Some(a) => (a.parse::<ApiAddr>().map_err(anyhow::Error::msg)?, true),
        None => (ApiAddr::default_for(data_dir), false),
    };
    let token = match (token_file, env_token.filter(|t| !t.trim().is_empty())) {
        (Some(f), _) => TokenSource::File(f.to_path_buf()),
        (None, Some(t)) => TokenSource::Env(t.to_owned()),
        (None, None) => match &addr {
            ApiAddr::Tcp(a) if a.ip().to_canonical().is_loopback() => {
                TokenSource::DefaultFile(data_dir.join(TOKEN_FILE))
            }
            _ => TokenSource::None,
        },
    };
    Ok(ClientApi {
        addr,
        explicit,
        token,
    })
}

impl ClientApi {
    /// The client command's environment: `$DF_API_TOKEN` and the default data directory.
    pub(crate) fn from_env(api: Option<&str>, token_file: Option<&Path>) -> Result<ClientApi> {
        let env = std::env::var(API_TOKEN_ENV).ok();
        client_api(api, token_file, env.as_deref(), &default_data_dir())
    }

    /// A client for this API, with its token read.
    pub(crate) fn client(&self) -> Result<ApiClient> {
        let token = match &self.token {
            TokenSource::None => None,
            TokenSource::File(p) => Some(ApiToken::read(p)?),
            TokenSource::Env(t) => Some(ApiToken::parse(t, API_TOKEN_ENV)?),
            // Unreadable (another user's node, say): go without; a node that needs it says so.
            TokenSource::DefaultFile(p) => ApiToken::read(p).ok(),
        };
        Ok(ApiClient::new(self.addr.clone()).with_token(token))
    }
}

/// Parses `Name: value`.
pub(crate) fn parse_header(h: &str) -> Result<(String, String)> {
    let (k, v) = h
        .split_once(':')
        .with_context(|| format!("malformed header {h:?}: expected 'Name: value'"))?;
    let k = k.trim();
    if k.is_empty() || k.contains(char::is_whitespace) {
        bail!("malformed header {h:?}: expected 'Name: value'");
    }
    Ok((k.to_owned(), v.trim().to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The TOML files embedded in deploy/k8s/configmap.yaml (`name.toml: |` blocks), unindented.
    fn configmap_files() -> Vec<(String, String)> {
        let yaml = include_str!("../../deploy/k8s/configmap.yaml");
        let mut out: Vec<(String, String)> = Vec::new();
        for line in yaml.lines() {
            if let Some(name) = line.trim().strip_suffix(": |")
                && name.ends_with(".toml")
            {
                out.push((name.to_owned(), String::new()));
            } else if let Some((_, body)) = out.last_mut()
                && (line.starts_with("    ") || line.trim().is_empty())
            {
                body.push_str(line.strip_prefix("    ").unwrap_or(""));
                body.push('\n');
            }
        }
        out
    }

    #[test]
    fn the_kubernetes_manifests_run_valid_commands() {
        for (yaml, want) in [
            (include_str!("../../deploy/k8s/seed.yaml"), "seed"),
            (include_str!("../../deploy/k8s/node.yaml"), "node"),
        ] {
            let line = yaml
                .lines()
                .find_map(|l| l.trim().strip_prefix("args: "))
                .expect("an args: line");
            let args: Vec<String> = serde_json::from_str(line).expect("args as a JSON list");
            let cli = Cli::try_parse_from(std::iter::once("df".to_owned()).chain(args))
                .unwrap_or_else(|e| panic!("{want}: {e}"));
            assert_eq!(cli.log_format, LogFormat::Json);
            match (cli.command, want) {
                (Command::Seed(a), "seed") | (Command::Node(a), "node") => assert_eq!(
                    a.config.as_deref(),
                    Some(std::path::Path::new(&format!("/etc/df/config/{want}.toml")))
                ),
                (other, _) => panic!("{want}: runs {other:?}"),
            }
        }
    }

    #[test]
    fn the_kubernetes_configmap_is_a_valid_config() {
        let files = configmap_files();
        assert_eq!(files.len(), 2, "{files:?}");
        for (name, text) in files {
            let role = if name.starts_with("seed") {
                Role::Seed
            } else {
                Role::Node
            };
            let cfg = node_config(role, Some(&text), &ServeArgs::default())
                .unwrap_or_else(|e| panic!("{name}: {e:#}"));
            let mirror = mirror_config(Some(&text), &ServeArgs::default())
                .unwrap_or_else(|e| panic!("{name}: {e:#}"));
            assert_eq!(cfg.bootstrap.len(), 3, "{name}");
            assert!(cfg.metrics_listen.is_some(), "{name}");
            assert_eq!(
                cfg.network.swarm_key.as_deref(),
                Some(std::path::Path::new("/etc/df/swarm.key"))
            );
            // Nodes serve the mirror on loopback; seeds do not run one.
            assert_eq!(
                mirror.listen.map(|a| a.ip().is_loopback()),
                (role == Role::Node).then_some(true),
                "{name}"
            );
        }
    }

    #[test]
    fn flags_override_the_file_and_defaults_fill_the_rest() {
        let args = ServeArgs {
            data_dir: Some("/tmp/x".into()),
            bootstrap: vec!["/ip4/127.0.0.1/tcp/4001".parse().unwrap()],
            api: Some("127.0.0.1:7000".into()),
            ..ServeArgs::default()
        };
        let file = r#"
            data_dir = "/var/lib/df"
            listen = ["/ip4/0.0.0.0/tcp/5001"]
            [download]
            max_inflight_pieces = 3
        "#;
        let cfg = node_config(Role::Seed, Some(file), &args).unwrap();
        assert_eq!(cfg.role, Role::Seed);
        assert_eq!(cfg.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(
            cfg.listen,
            vec!["/ip4/0.0.0.0/tcp/5001".parse::<Multiaddr>().unwrap()]
        );
        assert_eq!(cfg.bootstrap.len(), 1);
        assert_eq!(
            cfg.api,
            Some(ApiAddr::Tcp("127.0.0.1:7000".parse().unwrap()))
        );
        assert_eq!(cfg.download.max_inflight_pieces, 3);
        assert_eq!(cfg.download.max_inflight_per_source, 4);
        assert_eq!(cfg.replicas, 2, "the default owner count");
        let args = ServeArgs {
            replicas: Some(3),
            ..ServeArgs::default()
        };
        let cfg = node_config(Role::Seed, Some("replicas = 1"), &args).unwrap();
        assert_eq!(cfg.replicas, 3, "the flag wins over the file");
        let cfg = node_config(Role::Seed, Some("replicas = 1"), &ServeArgs::default()).unwrap();
        assert_eq!(cfg.replicas, 1);
    }

    #[test]
    fn proxy_section_and_mirror_flags() {
        let file = r#"
            listen = ["/ip4/0.0.0.0/tcp/5001"]
            [proxy]
            listen = "127.0.0.1:65001"
            upstream = "http://127.0.0.1:5000"
            insecure = true
            [proxy.registries]
            "a.example" = "http://127.0.0.1:5002"
        "#;
        let cli = Cli::try_parse_from([
            "df",
            "node",
            "--mirror-registry",
            "b.example=https://b.example:8443",
            "--mirror-listen",
            "127.0.0.1:65002",
            "--mirror-allow-unmapped",
        ])
        .unwrap();
        let Command::Node(args) = cli.command else {
            panic!("not node")
        };
        let m = mirror_config(Some(file), &args).unwrap();
        assert_eq!(m.listen, Some("127.0.0.1:65002".parse().unwrap()));
        assert_eq!(m.upstream.unwrap().as_str(), "http://127.0.0.1:5000/");
        assert_eq!(m.registries.len(), 2);
        assert!(m.insecure);
        assert!(m.allow_unmapped);
        assert!(
            !mirror_config(Some(file), &ServeArgs::default())
                .unwrap()
                .allow_unmapped
        );
        let n = node_config(Role::Node, Some(file), &args).unwrap();
        assert!(
            n.origin.insecure,
            "the mirror's TLS switch reaches the node's origin"
        );
        assert!(mirror_config(Some("[proxy]\nbogus = 1"), &args).is_err());
        assert!(Cli::try_parse_from(["df", "node", "--mirror-registry", "nourl"]).is_err());
    }

    #[test]
    fn bad_file_and_bad_flags_are_errors() {
        assert!(node_config(Role::Node, Some("listen = 5"), &ServeArgs::default()).is_err());
        let args = ServeArgs {
            api: Some("not an address".into()),
            ..ServeArgs::default()
        };
        assert!(node_config(Role::Node, None, &args).is_err());
    }

    #[test]
    fn api_token_comes_from_the_flag_then_the_env_then_the_local_file() {
        let dir = Path::new("/d");
        let c = client_api(None, None, None, dir).unwrap();
        assert_eq!(c.addr, ApiAddr::Unix("/d/api.sock".into()));
        assert!(!c.explicit);
        assert_eq!(c.token, TokenSource::None);

        let tcp = Some("127.0.0.1:7000");
        let c = client_api(tcp, Some(Path::new("/t")), Some("envtok"), dir).unwrap();
        assert!(c.explicit);
        assert_eq!(c.token, TokenSource::File("/t".into()));
        let c = client_api(tcp, None, Some("envtok"), dir).unwrap();
        assert_eq!(c.token, TokenSource::Env("envtok".into()));
        let c = client_api(tcp, None, Some(" "), dir).unwrap();
        assert_eq!(c.token, TokenSource::DefaultFile("/d/api-token".into()));
        // The local node's token never goes to another address on its own.
        let c = client_api(Some("10.0.0.5:7000"), None, None, dir).unwrap();
        assert_eq!(c.token, TokenSource::None);
        let c = client_api(Some("10.0.0.5:7000"), None, Some("t"), dir).unwrap();
        assert_eq!(c.token, TokenSource::Env("t".into()));
        assert!(client_api(Some("nonsense"), None, None, dir).is_err());

        let cli =
            Cli::try_parse_from(["df", "status", "--api", "127.0.0.1:1", "--api-token", "/f"])
                .unwrap();
        let Command::Status(s) = cli.command else {
            panic!("not status")
        };
        assert_eq!(s.api_token, Some(PathBuf::from("/f")));
    }

    #[test]
    fn token_sources_are_read_when_the_client_is_made() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tok");
        std::fs::write(&file, "abc\n").unwrap();
        let tcp = Some("127.0.0.1:7000");
        assert!(
            client_api(tcp, Some(&file), None, dir.path())
                .unwrap()
                .client()
                .is_ok()
        );
        let missing = dir.path().join("missing");
        assert!(
            client_api(tcp, Some(&missing), None, dir.path())
                .unwrap()
                .client()
                .is_err()
        );
        assert!(
            client_api(tcp, None, Some("a b"), dir.path())
                .unwrap()
                .client()
                .is_err()
        );
        // An absent default file is no error.
        assert!(
            client_api(tcp, None, None, dir.path())
                .unwrap()
                .client()
                .is_ok()
        );
    }

    #[test]
    fn headers() {
        assert_eq!(
            parse_header("Authorization: Bearer a:b").unwrap(),
            ("Authorization".into(), "Bearer a:b".into())
        );
        assert!(parse_header("nocolon").is_err());
        assert!(parse_header(": x").is_err());
    }

    #[test]
    fn cli_parses_dfget_style_flags() {
        let cli = Cli::try_parse_from([
            "df",
            "get",
            "http://h/f",
            "-O",
            "-",
            "-H",
            "A: b",
            "--digest",
            "sha256:00",
            "--filtered-query-param",
            "sig",
            "--timeout",
            "30s",
            "--no-progress",
        ])
        .unwrap();
        let Command::Get(g) = cli.command else {
            panic!()
        };
        assert_eq!(g.output_document, Some(PathBuf::from("-")));
        assert_eq!(g.timeout, Some(Duration::from_secs(30)));
        assert!(Cli::try_parse_from(["df", "get", "u", "-o", "a", "-O", "b"]).is_err());
    }
}
