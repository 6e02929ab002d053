//! `df get` as a user runs it: the real binary, a local origin, with and without a daemon.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

use df_node::{ApiAddr, Role};
use df_testnet::{TestNode, TestOrigin, content, sha256_hex};

const MIB: usize = 1 << 20;

/// Runs `df` with an empty default data dir, so no daemon is found unless `--api` is given.
fn df(args: &[&str], data_home: &Path) -> Output {
    df_env(args, data_home, &[])
}

/// [`df`] with extra environment variables.
fn df_env(args: &[&str], data_home: &Path, env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_df"))
        .args(args)
        .env("DF_DATA_DIR", data_home)
        .env_remove("RUST_LOG")
        .env_remove("DF_API_TOKEN")
        .envs(env.iter().copied())
        .output()
        .expect("running df")
}

/// [`df_env`] off the async runtime (the test's servers keep running), with a fresh data home.
async fn df_blocking(args: &[&str], env: &[(&str, &str)]) -> Output {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let home = tempfile::tempdir().unwrap();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        df_env(&args, home.path(), &env)
    })
    .await
    .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Files in `dir` other than `keep`.
fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn get_without_a_daemon_writes_the_file() {
    let origin = TestOrigin::start().await.unwrap();
    let data = content(9 * MIB + 3, 1);
    origin.put("/file.bin", data.clone());
    let home = tempfile::tempdir().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("file.bin");
    let url = origin.url("/file.bin");
    let o = tokio::task::spawn_blocking({
        let (out, home) = (out.clone(), home.path().to_owned());
        move || {
            df(
                &["get", &url, "-o", out.to_str().unwrap(), "--no-progress"],
                &home,
            )
        }
    })
    .await
    .unwrap();
    assert!(o.status.success(), "df failed: {}", stderr(&o));
    assert_eq!(sha256_hex(&std::fs::read(&out).unwrap()), sha256_hex(&data));
    assert_eq!(leftovers(out_dir.path()), vec!["file.bin".to_owned()]);
}

/// `-O -` beside a daemon: the pieces go in order from the node's files to standard output (a
/// pipe here), none through the API.
#[tokio::test(flavor = "multi_thread")]
async fn get_to_stdout_streams_in_order_through_a_daemon() {
    let origin = TestOrigin::start().await.unwrap();
    let data = content(2 * 4 * MIB + 17, 2);
    origin.put("/s", data.clone());
    let node = TestNode::start(Role::Node, vec![], |_| {}).await.unwrap();
    let api = node.node.api_addr().to_string();
    let url = origin.url("/s");
    let o = df_blocking(
        &["get", &url, "-O", "-", "--api", &api, "--no-progress"],
        &[("RUST_LOG", "df=debug")],
    )
    .await;
    let err = stderr(&o);
    assert!(o.status.success(), "df failed: {err}");
    assert_eq!(o.stdout.len(), data.len());
    assert_eq!(sha256_hex(&o.stdout), sha256_hex(&data));
    let line = err
        .lines()
        .find(|l| l.contains("pieces sent to standard output beside the node"))
        .unwrap_or_else(|| panic!("the content was not sent from the node's files: {err}"));
    assert!(line.contains("through_api=0"), "{line}");
    // `df status` prints the daemon's status JSON.
    let api = node.node.api_addr().to_string();
    let home = tempfile::tempdir().unwrap();
    let s = tokio::task::spawn_blocking(move || df(&["status", "--api", &api], home.path()))
        .await
        .unwrap();
    assert!(s.status.success(), "{}", stderr(&s));
    let v: serde_json::Value = serde_json::from_slice(&s.stdout).unwrap();
    assert_eq!(v["peer_id"], node.node.peer_id().to_string());
    assert!(v["bytes"]["from_origin"].as_u64().unwrap() >= data.len() as u64);
}

/// `-O -` into a regular file (`> FILE`, sendfile's file-to-file path) and into one opened for
/// appending (`>> FILE`, where sendfile refuses and plain writes take over): the same bytes,
/// after what the file held.
#[tokio::test(flavor = "multi_thread")]
async fn get_to_stdout_into_a_file_and_an_appended_file() {
    let origin = TestOrigin::start().await.unwrap();
    let data = content(3 * MIB + 11, 12);
    origin.put("/redirect.bin", data.clone());
    let node = TestNode::start(Role::Node, vec![], |_| {}).await.unwrap();
    let api = node.node.api_addr().to_string();
    let url = origin.url("/redirect.bin");
    let dir = tempfile::tempdir().unwrap();
    for append in [false, true] {
        let path = dir.path().join(format!("out-{append}"));
        std::fs::write(&path, b"head").unwrap();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .append(append)
            .truncate(!append)
            .open(&path)
            .unwrap();
        let (url, api, home) = (url.clone(), api.clone(), tempfile::tempdir().unwrap());
        let o = tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_df"))
                .args(["get", &url, "-O", "-", "--api", &api, "--no-progress"])
                .env("DF_DATA_DIR", home.path())
                .env_remove("DF_API_TOKEN")
                .env("RUST_LOG", "df=debug")
                .stdout(file)
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let err = stderr(&o);
        assert!(o.status.success(), "append={append}: df failed: {err}");
        assert!(err.contains("through_api=0"), "append={append}: {err}");
        let got = std::fs::read(&path).unwrap();
        let expected: Vec<u8> = if append {
            b"head".iter().chain(&data).copied().collect()
        } else {
            data.clone()
        };
        assert_eq!(got.len(), expected.len(), "append={append}");
        assert!(got == expected, "append={append}: the bytes differ");
    }
}

/// `-o FILE` beside its node, on the node's filesystem: the output is a hard link to the node's
/// content file (nothing written twice), whole and exact, with nothing else left beside it; a
/// second download of the cached task does the same. An output edited afterwards is not served
/// by the node (its file changed): the next download fetches the content again, into a new file,
/// and the edited output stays as its user left it.
#[tokio::test(flavor = "multi_thread")]
async fn get_beside_a_daemon_links_the_nodes_content_file() {
    use std::os::unix::fs::MetadataExt;
    let origin = TestOrigin::start().await.unwrap();
    let data = content(9 * MIB + 3, 7);
    origin.put("/copy.bin", data.clone());
    let node = TestNode::start(Role::Node, vec![], |_| {}).await.unwrap();
    let api = node.node.api_addr().to_string();
    let url = origin.url("/copy.bin");
    let out_dir = tempfile::tempdir_in(node.dir()).unwrap();
    let get = |out: std::path::PathBuf| {
        let (url, api) = (url.clone(), api.clone());
        async move {
            df_blocking(
                &[
                    "get",
                    &url,
                    "-o",
                    out.to_str().unwrap(),
                    "--api",
                    &api,
                    "--no-progress",
                ],
                &[("RUST_LOG", "df=debug")],
            )
            .await
        }
    };
    let mut first = None;
    for round in 0..2 {
        let name = format!("copy{round}.bin");
        let out = out_dir.path().join(&name);
        let o = get(out.clone()).await;
        let err = stderr(&o);
        assert!(o.status.success(), "round {round}: df failed: {err}");
        assert_eq!(sha256_hex(&std::fs::read(&out).unwrap()), sha256_hex(&data));
        let line = err
            .lines()
            .find(|l| l.contains("pieces copied beside the node"))
            .unwrap_or_else(|| panic!("round {round}: the content was not copied: {err}"));
        assert!(line.contains("through_api=0"), "{line}");
        assert!(line.contains("linked=true"), "{line}");
        let m = std::fs::metadata(&out).unwrap();
        // The node's file and each output so far.
        assert_eq!(m.nlink(), round + 2, "round {round}");
        first.get_or_insert(out);
    }
    let mut names = leftovers(out_dir.path());
    names.sort();
    assert_eq!(names, vec!["copy0.bin".to_owned(), "copy1.bin".to_owned()]);
    // The second round came from the node's cache: the origin sent the file once.
    let sent = origin.bytes_sent();
    assert!(
        sent >= data.len() as u64 && sent <= data.len() as u64 * 102 / 100,
        "origin sent {sent} bytes for {}",
        data.len()
    );

    // The user edits an output in place: the node's file changes with it.
    let edited = first.unwrap();
    // Past the filesystem's timestamp tick, as a user's edit comes after the download.
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&edited)
        .and_then(|f| std::os::unix::fs::FileExt::write_all_at(&f, b"EDITED", 4096))
        .unwrap();
    let out = out_dir.path().join("again.bin");
    let o = get(out.clone()).await;
    assert!(o.status.success(), "df failed: {}", stderr(&o));
    assert_eq!(sha256_hex(&std::fs::read(&out).unwrap()), sha256_hex(&data));
    let kept = std::fs::read(&edited).unwrap();
    assert_eq!(&kept[4096..4102], b"EDITED");
    assert_ne!(
        std::fs::metadata(&out).unwrap().ino(),
        std::fs::metadata(&edited).unwrap().ino()
    );
    assert!(origin.bytes_sent() >= 2 * data.len() as u64);
}

/// `-o FILE` on another filesystem than the node's store (tmpfs here): no link is possible, so
/// the CLI copies the node's verified pieces into the output (`copy_file_range`) instead of taking
/// every byte through the API.
#[tokio::test(flavor = "multi_thread")]
async fn get_beside_a_daemon_on_another_filesystem_copies_the_pieces() {
    use std::os::unix::fs::MetadataExt;
    let origin = TestOrigin::start().await.unwrap();
    let data = content(9 * MIB + 3, 8);
    origin.put("/copy.bin", data.clone());
    let node = TestNode::start(Role::Node, vec![], |_| {}).await.unwrap();
    let shm = std::path::Path::new("/dev/shm");
    let node_dev = std::fs::metadata(node.dir()).unwrap().dev();
    if std::fs::metadata(shm).map_or(true, |m| m.dev() == node_dev) {
        eprintln!("no second filesystem (/dev/shm) here: the copy path is covered by -O - tests");
        return;
    }
    let out_dir = tempfile::tempdir_in(shm).unwrap();
    let out = out_dir.path().join("copy.bin");
    let o = df_blocking(
        &[
            "get",
            &origin.url("/copy.bin"),
            "-o",
            out.to_str().unwrap(),
            "--api",
            &node.node.api_addr().to_string(),
            "--no-progress",
        ],
        &[("RUST_LOG", "df=debug")],
    )
    .await;
    let err = stderr(&o);
    assert!(o.status.success(), "df failed: {err}");
    assert_eq!(sha256_hex(&std::fs::read(&out).unwrap()), sha256_hex(&data));
    assert_eq!(leftovers(out_dir.path()), vec!["copy.bin".to_owned()]);
    let line = err
        .lines()
        .find(|l| l.contains("pieces copied beside the node"))
        .unwrap_or_else(|| panic!("the content was not copied: {err}"));
    assert!(line.contains("through_api=0"), "{line}");
    assert!(line.contains("linked=false"), "{line}");
    assert!(!line.contains("from_files=0"), "{line}");
    assert_eq!(std::fs::metadata(&out).unwrap().nlink(), 1);
}

/// An output that exists and is not a regular file (a FIFO here; `/dev/null` the same way) is
/// written in place, as wget writes it, never replaced by a file; a symbolic link keeps pointing
/// at the file it names, which gets the content; a directory is refused.
#[tokio::test(flavor = "multi_thread")]
async fn a_fifo_is_written_in_place_and_a_symlink_stays() {
    let origin = TestOrigin::start().await.unwrap();
    let data = content(2 * MIB + 5, 9);
    origin.put("/pipe.bin", data.clone());
    let url = origin.url("/pipe.bin");
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("pipe");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let reader = std::thread::spawn({
        let fifo = fifo.clone();
        move || std::fs::read(fifo).unwrap()
    });
    let o = df_blocking(
        &["get", &url, "-O", fifo.to_str().unwrap(), "--no-progress"],
        &[],
    )
    .await;
    assert!(o.status.success(), "df failed: {}", stderr(&o));
    // (Checked before waiting for the reader, which a replaced FIFO would leave blocked.)
    use std::os::unix::fs::FileTypeExt;
    assert!(
        std::fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo()
    );
    assert_eq!(sha256_hex(&reader.join().unwrap()), sha256_hex(&data));
    assert_eq!(leftovers(dir.path()), vec!["pipe".to_owned()]);

    let real = dir.path().join("real.bin");
    std::fs::write(&real, b"old").unwrap();
    let link = dir.path().join("link.bin");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let o = df_blocking(
        &["get", &url, "-o", link.to_str().unwrap(), "--no-progress"],
        &[],
    )
    .await;
    assert!(o.status.success(), "df failed: {}", stderr(&o));
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(
        sha256_hex(&std::fs::read(&real).unwrap()),
        sha256_hex(&data)
    );

    let target = dir.path().to_str().unwrap();
    let o = df_blocking(&["get", &url, "-o", target, "--no-progress"], &[]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("is a directory"), "{}", stderr(&o));
}

/// Runs a failing `df get -o FILE` and returns its stderr, checking it left nothing behind.
async fn fails(args: Vec<String>) -> String {
    let home = tempfile::tempdir().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("out");
    let mut full = args.clone();
    full.extend([
        "-o".into(),
        out.to_str().unwrap().into(),
        "--no-progress".into(),
    ]);
    let o = tokio::task::spawn_blocking({
        let home = home.path().to_owned();
        move || df(&full.iter().map(String::as_str).collect::<Vec<_>>(), &home)
    })
    .await
    .unwrap();
    assert_eq!(o.status.code(), Some(1), "expected failure: {}", stderr(&o));
    assert!(leftovers(out_dir.path()).is_empty(), "left files behind");
    let err = stderr(&o);
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    err
}

/// `--limit-rate` (wget's flag): the download keeps to it, and a value that is not a rate is
/// refused before anything starts.
#[tokio::test(flavor = "multi_thread")]
async fn limit_rate_holds_and_nonsense_is_refused() {
    let origin = TestOrigin::start().await.unwrap();
    let data = content(3 * MIB, 5);
    origin.put("/slow.bin", data.clone());
    let home = tempfile::tempdir().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("slow.bin");
    let url = origin.url("/slow.bin");
    let (o, took) = tokio::task::spawn_blocking({
        let (out, home, url) = (out.clone(), home.path().to_owned(), url.clone());
        move || {
            let t = std::time::Instant::now();
            let o = df(
                &[
                    "get",
                    &url,
                    "-o",
                    out.to_str().unwrap(),
                    "--no-progress",
                    "--limit-rate",
                    "2MiB",
                ],
                &home,
            );
            (o, t.elapsed())
        }
    })
    .await
    .unwrap();
    assert!(o.status.success(), "df failed: {}", stderr(&o));
    assert_eq!(sha256_hex(&std::fs::read(&out).unwrap()), sha256_hex(&data));
    // 3 MiB at 2 MiB/s, the bucket's first 1/20 s aside.
    assert!(
        took.as_secs_f64() >= (3.0 - 0.1) / 2.0,
        "3 MiB at 2 MiB/s took {took:?}"
    );

    let o = df(&["get", &url, "--limit-rate", "fast"], home.path());
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("is not a rate"), "{}", stderr(&o));
}

#[tokio::test(flavor = "multi_thread")]
async fn failures_print_one_clear_line_and_leave_no_file() {
    let origin = TestOrigin::start().await.unwrap();
    for status in [404u16, 403, 500] {
        let path = format!("/e{status}");
        origin.fail(&path, status);
        let err = fails(vec!["get".into(), origin.url(&path)]).await;
        assert!(err.contains(&status.to_string()), "status {status}: {err}");
    }
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let err = fails(vec!["get".into(), format!("http://{closed}/x")]).await;
    assert!(err.contains("cannot reach origin"), "{err}");

    let err = fails(vec!["get".into(), "no-scheme/path".into()]).await;
    assert!(err.contains("malformed URL"), "{err}");

    origin.put("/d", content(1000, 3));
    let err = fails(vec![
        "get".into(),
        origin.url("/d"),
        "--digest".into(),
        format!("sha256:{}", "ab".repeat(32)),
    ])
    .await;
    assert!(err.contains("digest mismatch"), "{err}");

    let sock = tempfile::tempdir().unwrap();
    let api = sock.path().join("nobody.sock");
    let err = fails(vec![
        "get".into(),
        origin.url("/d"),
        "--api".into(),
        api.to_str().unwrap().into(),
    ])
    .await;
    assert!(err.contains("cannot reach the df API"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_is_reported_and_leaves_nothing() {
    // A 1 MiB tmpfs: root is needed to mount it (CI runs as root).
    let mnt = tempfile::tempdir().unwrap();
    let ok = Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=1m",
            "tmpfs",
            mnt.path().to_str().unwrap(),
        ])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "mounting a tmpfs failed: this test needs root");
    let origin = TestOrigin::start().await.unwrap();
    origin.put("/big", content(3 * MIB, 4));
    let home = tempfile::tempdir().unwrap();
    let out = mnt.path().join("big");
    let url = origin.url("/big");
    let o = tokio::task::spawn_blocking({
        let (out, home) = (out.clone(), home.path().to_owned());
        move || {
            df(
                &["get", &url, "-o", out.to_str().unwrap(), "--no-progress"],
                &home,
            )
        }
    })
    .await
    .unwrap();
    let listing = leftovers(mnt.path());
    let _ = Command::new("umount").arg(mnt.path()).status();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no space left"), "{}", stderr(&o));
    assert!(listing.is_empty(), "left {listing:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn get_without_a_daemon_joins_the_swarm_given_bootstrap() {
    let origin = TestOrigin::start().await.unwrap();
    let data = content(6 * MIB + 1, 5);
    origin.put("/p", data.clone());
    let seed = TestNode::start(Role::Seed, vec![], |_| {}).await.unwrap();
    seed.fetch_url(&origin.url("/p")).await.unwrap();
    // The origin breaks: only the swarm can serve the file now.
    origin.fail("/p", 500);
    let boot = seed.bootstrap_addr().to_string();
    let key = df_testnet::swarm::swarm_key_file().unwrap();
    let home = tempfile::tempdir().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("p");
    let url = origin.url("/p");
    let o = tokio::task::spawn_blocking({
        let (out, home, key) = (out.clone(), home.path().to_owned(), key.clone());
        move || {
            df(
                &[
                    "get",
                    &url,
                    "-o",
                    out.to_str().unwrap(),
                    "--bootstrap",
                    &boot,
                    "--swarm-key",
                    key.to_str().unwrap(),
                    "--no-progress",
                ],
                &home,
            )
        }
    })
    .await
    .unwrap();
    assert!(o.status.success(), "df failed: {}", stderr(&o));
    assert_eq!(sha256_hex(&std::fs::read(&out).unwrap()), sha256_hex(&data));
}

#[tokio::test(flavor = "multi_thread")]
async fn get_and_status_with_the_token_of_a_non_loopback_api() {
    let origin = TestOrigin::start().await.unwrap();
    let data = content(3 * MIB + 5, 6);
    origin.put("/t", data.clone());
    let node = TestNode::start(Role::Node, vec![], |c| {
        c.api = Some("0.0.0.0:0".parse().unwrap());
    })
    .await
    .unwrap();
    let ApiAddr::Tcp(bound) = node.node.api_addr() else {
        panic!("not a TCP API")
    };
    let api = format!("127.0.0.1:{}", bound.port());
    let data_dir = node.node.config().data_dir.clone();
    let token_file = data_dir.join("api-token");
    let token = std::fs::read_to_string(&token_file).unwrap();
    let url = origin.url("/t");

    // Without a token: refused, with a hint.
    let err = fails(vec!["get".into(), url.clone(), "--api".into(), api.clone()]).await;
    assert!(err.contains("--api-token"), "{err}");

    // `--api-token FILE`.
    let o = tokio::task::spawn_blocking({
        let (url, api, token_file) = (url.clone(), api.clone(), token_file.clone());
        move || {
            let home = tempfile::tempdir().unwrap();
            df(
                &[
                    "get",
                    &url,
                    "-O",
                    "-",
                    "--api",
                    &api,
                    "--api-token",
                    token_file.to_str().unwrap(),
                    "--no-progress",
                ],
                home.path(),
            )
        }
    })
    .await
    .unwrap();
    assert!(o.status.success(), "df failed: {}", stderr(&o));
    assert_eq!(sha256_hex(&o.stdout), sha256_hex(&data));

    // `DF_API_TOKEN`; a wrong one is refused.
    let peer_id = node.node.peer_id().to_string();
    let (good, bad) = tokio::task::spawn_blocking({
        let (api, token) = (api.clone(), token.clone());
        move || {
            let home = tempfile::tempdir().unwrap();
            let run = |t: &str| {
                df_env(
                    &["status", "--api", &api],
                    home.path(),
                    &[("DF_API_TOKEN", t)],
                )
            };
            (run(token.trim()), run("wrong"))
        }
    })
    .await
    .unwrap();
    assert!(good.status.success(), "{}", stderr(&good));
    let v: serde_json::Value = serde_json::from_slice(&good.stdout).unwrap();
    assert_eq!(v["peer_id"], peer_id);
    assert_eq!(bad.status.code(), Some(1));
    assert!(stderr(&bad).contains("wrong API token"), "{}", stderr(&bad));

    // On the node's own host, its data directory's token is found without being named.
    let own = tokio::task::spawn_blocking(move || df(&["status", "--api", &api], &data_dir))
        .await
        .unwrap();
    assert!(own.status.success(), "{}", stderr(&own));
}
