//! `df`: the command-line front end.
//!
//! | module | what |
//! |---|---|
//! | [`args`] | clap definitions; args + config file → `NodeConfig` (pure) |
//! | [`get`] | `df get` (daemon or embedded node; temp file + rename; digest check) |
//! | [`progress`] | the progress bar |
//! | [`ui`] | `df ui`: the status page through a loopback relay to the API socket |
//!
//! Exit codes: 0 success, 1 failure (one line on standard error), 2 usage error.

mod args;
mod copy;
mod get;
mod preheat;
mod progress;
mod ui;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use df_node::{DownloadRequest, Role};

use args::{
    Cli, ClientApi, Command, LogFormat, PurgeArgs, ServeArgs, StatusArgs, SwarmKeyArgs,
    mirror_config, node_config,
};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Logs to standard error: `RUST_LOG` if set, else `default`; colour only on a terminal (and not
/// with `NO_COLOR`); JSON lines with `--log-format json`.
fn init_logging(default: &str, format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
            .try_init(),
    };
}

/// glibc gives every thread that allocates under contention its own malloc arena (up to 8 per
/// core) and keeps freed piece buffers in each: measured on the 512 MiB one-hop bench, limiting
/// it to 2 arenas took the serving seed's peak RSS from 242 to 196 MiB and the receiver's from
/// 196 to 174 MiB at the same speed. Set before any thread starts.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn limit_malloc_arenas() {
    // SAFETY: mallopt only adjusts the allocator's tunables; called once, before threads exist.
    #[allow(unsafe_code)]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}

/// mimalloc's `purge_delay` option (`mi_option_purge_delay` in its `mi_option_e`, the same index
/// in the v2 and v3 sources `libmimalloc-sys` bundles; `mimalloc_options_are_where_we_think`
/// checks it against its documented default).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

#[allow(unsafe_code)]
unsafe extern "C" {
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// A node's piece buffers (up to 48 MiB in flight while a seed fetches 16 MiB pieces) come and go
/// all the time; by default mimalloc (v3, as `mimalloc` builds it) returns freed memory to the OS
/// only a second later, so a node fetching or serving keeps a second's worth of freed buffers.
/// Returning it at once took a seed's peak RSS fetching 4 GiB from 151 to 118–120 MiB (1 GiB:
/// from 104–112 to 83–86 MiB).
fn return_freed_memory_promptly() {
    // SAFETY: mi_option_set only stores an option value; the index is checked by a test.
    #[allow(unsafe_code)]
    unsafe {
        mi_option_set(MI_OPTION_PURGE_DELAY, 0);
    }
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    return_freed_memory_promptly();
    let cli = Cli::parse();
    let log_format = cli.log_format;
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("df: error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Get(a) => {
                // The embedded node's warnings repeat what df prints itself: keep stderr to one line.
                init_logging("error", log_format);
                tokio::select! {
                    r = get::run(a) => r,
                    _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
                }
            }
            Command::Node(a) => {
                init_logging("info", log_format);
                serve(Role::Node, a).await
            }
            Command::Seed(a) => {
                init_logging("info", log_format);
                serve(Role::Seed, a).await
            }
            Command::Status(a) => {
                init_logging("warn", log_format);
                status(a).await
            }
            Command::Purge(a) => {
                init_logging("warn", log_format);
                purge(a).await
            }
            Command::Preheat(a) => {
                init_logging("warn", log_format);
                preheat::run(a).await
            }
            Command::Ui(a) => {
                init_logging("warn", log_format);
                let api = ClientApi::from_env(a.node.api.as_deref(), a.node.api_token.as_deref())?
                    .client()?;
                tokio::select! {
                    r = ui::run(api, a.listen) => r,
                    _ = tokio::signal::ctrl_c() => Ok(()),
                }
            }
            Command::SwarmKey(a) => swarm_key(a),
        }
    });
    // Dropping the runtime would wait for blocking tasks (e.g. a stuck stdin): don't.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("df: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(role: Role, args: ServeArgs) -> Result<()> {
    // What the node writes (the RocksDB store, its keys and tokens) is for this user alone.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let file = match &args.config {
        Some(p) => {
            Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
        }
        None => None,
    };
    let cfg = node_config(role, file.as_deref(), &args)?;
    let mirror_cfg = mirror_config(file.as_deref(), &args)?;
    let node = df_seed::start(cfg).await?;
    for a in node.listen_addrs() {
        tracing::info!(addr = %a, "bootstrap others with");
    }
    tracing::info!(api = %node.api_addr(), data = %node.data_addr(), "serving");
    let mirror = match mirror_cfg.listen {
        Some(_) => match df_proxy::Mirror::start(mirror_cfg, Arc::new(node.clone())).await {
            Ok(m) => Some(m),
            Err(e) => {
                node.shutdown().await;
                return Err(e.into());
            }
        },
        None => None,
    };
    wait_for_signal().await;
    tracing::info!("shutting down");
    if let Some(m) = mirror {
        m.shutdown().await;
    }
    node.shutdown().await;
    node.release_for_exit().await;
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

async fn status(args: StatusArgs) -> Result<()> {
    let api = ClientApi::from_env(args.api.as_deref(), args.api_token.as_deref())?.client()?;
    let v = api.status_json().await.map_err(get::describe)?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

async fn purge(args: PurgeArgs) -> Result<()> {
    let id = if args.task.contains("://") {
        DownloadRequest {
            url: args.task.clone(),
            ..DownloadRequest::default()
        }
        .task_key()
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .to_string()
    } else {
        args.task.clone()
    };
    let api =
        ClientApi::from_env(args.node.api.as_deref(), args.node.api_token.as_deref())?.client()?;
    let hosts = api.purge(&id, args.scope).await.map_err(get::describe)?;
    let mut bad = 0;
    for h in &hosts {
        let role = h.role.map(|r| r.to_string()).unwrap_or_else(|| "?".into());
        match &h.error {
            Some(e) => println!("{:<11} {} ({role}): {e}", h.outcome, h.peer),
            None => println!("{:<11} {} ({role})", h.outcome, h.peer),
        }
        if !matches!(h.outcome.as_str(), "deleted" | "absent") {
            bad += 1;
        }
    }
    if bad > 0 {
        anyhow::bail!("{bad} of {} hosts did not purge task {id}", hosts.len());
    }
    Ok(())
}

fn swarm_key(args: SwarmKeyArgs) -> Result<()> {
    let key = df_node::trust::generate();
    if args.file.as_os_str() == "-" {
        print!("{}", key.to_key_file());
    } else {
        df_node::trust::write(&args.file, key)?;
        eprintln!(
            "wrote swarm key {} (fingerprint {}): give it to every member with --swarm-key FILE",
            args.file.display(),
            key.fingerprint()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(unsafe_code)]
    unsafe extern "C" {
        fn mi_option_get(option: std::ffi::c_int) -> std::ffi::c_long;
    }

    #[test]
    fn mimalloc_options_are_where_we_think() {
        // SAFETY: reading and setting an option value.
        #[allow(unsafe_code)]
        let (default, after) = unsafe {
            let default = mi_option_get(MI_OPTION_PURGE_DELAY);
            return_freed_memory_promptly();
            (default, mi_option_get(MI_OPTION_PURGE_DELAY))
        };
        // purge_delay's defaults: 1000 ms in mimalloc v3, 10 ms in v2 (unless the environment
        // set it).
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            assert!(
                default == 1000 || default == 10,
                "index {MI_OPTION_PURGE_DELAY} is not purge_delay: it holds {default}"
            );
        }
        assert_eq!(after, 0);
    }
}
