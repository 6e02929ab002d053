//! The status page: what a browser shows after a download through a 1-seed + 3-node swarm
//! (headless Chromium from Debian's `chromium`), and what `ui_listen` refuses.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};
use df_node::Role;
use df_testnet::{Swarm, TestNode, TestOrigin, content, init_test_logs, url_task_key};

const MIB: usize = 1 << 20;

fn ui_listener(public: bool) -> impl Fn(&mut df_node::NodeConfig) {
    move |c| {
        c.ui_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        c.ui_public = public;
    }
}

/// Runs headless Chromium on `url` with `args` (e.g. `--dump-dom`); returns its standard output.
fn chromium(url: &str, args: &[&str]) -> Result<String> {
    // One browser at a time: two at once on a 2-core host starve each other (and the timing
    // test below measured the other browser, not the page).
    static ONE_BROWSER: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_BROWSER.lock().unwrap_or_else(|p| p.into_inner());
    let profile = tempfile::tempdir()?;
    let out = Command::new("chromium")
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            "--window-size=1280,1100",
            // Scripts run (and refresh once a second) until the page has been idle this long.
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .output()
        .context("running chromium (Debian's `chromium` package; testnet/deps.sh installs it)")?;
    if !out.status.success() {
        bail!(
            "chromium failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `GET url` with the bearer token, as JSON.
async fn get_json(c: &reqwest::Client, url: &str, token: &str) -> Result<serde_json::Value> {
    let text = c.get(url).bearer_auth(token).send().await?.text().await?;
    Ok(serde_json::from_str(&text)?)
}

/// The value of attribute `name` on the element with `id` in `dom`.
fn attr(dom: &str, id: &str, name: &str) -> Option<String> {
    let at = dom.find(&format!("id=\"{id}\""))?;
    let tag_start = dom[..at].rfind('<')?;
    let tag = &dom[tag_start..tag_start + dom[tag_start..].find('>')?];
    let v = tag.split(&format!("{name}=\"")).nth(1)?;
    Some(v[..v.find('"')?].to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_browser_sees_every_piece_verified_after_a_swarm_download() -> Result<()> {
    init_test_logs();
    let origin = TestOrigin::start().await?;
    let data = content(6 * MIB, 21);
    origin.put("/shown.bin", data.clone());
    let url = origin.url("/shown.bin?secret=HIDE-ME");
    let swarm = Swarm::start(1, 3, ui_listener(true)).await?;
    let results = futures::future::join_all(swarm.nodes.iter().map(|n| n.fetch_url(&url))).await;
    for r in results {
        r?;
    }
    let id = url_task_key(&url)?.to_string();
    // The page of a node the seed sent bytes to (the seed sends each piece to one node first, and
    // the others may take everything from the nodes), so "(seed)" is among its senders.
    let seed_id = swarm.seeds[0].node.peer_id().to_string();
    let mut fed_by_seed = None;
    for (i, n) in swarm.nodes.iter().enumerate() {
        let api = df_node::api::client::ApiClient::new(n.node.api_addr());
        let task = api.task(&id).await?;
        if task.received_from.iter().any(|s| s.peer == seed_id) {
            fed_by_seed = Some(i);
            break;
        }
    }
    let at = fed_by_seed.context("no node received bytes from the seed")?;
    let node = &swarm.nodes[at];
    let ui = node.node.ui_addr().context("no ui listener")?;
    let page = format!("http://{ui}/#task={id}");

    let dom = tokio::task::spawn_blocking({
        let page = page.clone();
        move || chromium(&page, &["--dump-dom"])
    })
    .await??;
    let total = attr(&dom, "piece-summary", "data-total");
    let verified = attr(&dom, "piece-summary", "data-verified");
    let pieces = df_protocols::piece::PieceLayout::for_length(data.len() as u64).piece_count();
    let want = pieces.to_string();
    assert_eq!(total.as_deref(), Some(&*want), "the grid's pieces:\n{dom}");
    assert_eq!(verified.as_deref(), Some(&*want), "verified pieces:\n{dom}");
    assert_eq!(
        dom.matches("title=\"piece ").count(),
        pieces as usize,
        "grid cells"
    );
    assert!(!dom.contains("cannot read the node's API"), "{dom}");
    // The page shows the task, its peers and who sent the bytes, never the query string.
    assert!(dom.contains("/shown.bin"), "the task's URL is not shown");
    assert!(
        !dom.contains("HIDE-ME") && !dom.contains("secret="),
        "the query string is shown"
    );
    assert!(dom.contains("(seed)"), "no seed among the senders:\n{dom}");
    let others = swarm
        .nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != at)
        .map(|(_, n)| n);
    for m in swarm.seeds.iter().chain(others) {
        assert!(
            dom.contains(&m.node.peer_id().to_string()),
            "peer {} is not listed",
            m.node.peer_id()
        );
    }

    // A screenshot, kept with the test's output.
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("df-status-page.png");
    let _ = std::fs::remove_file(&shot);
    let arg = format!("--screenshot={}", shot.display());
    tokio::task::spawn_blocking(move || chromium(&page, &[&arg])).await??;
    let png = std::fs::read(&shot).context("no screenshot")?;
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "screenshot"
    );
    eprintln!("status page screenshot: {}", shot.display());
    swarm.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ui_listener_wants_the_token_and_changes_nothing() -> Result<()> {
    init_test_logs();
    let origin = TestOrigin::start().await?;
    origin.put("/seen", content(300_000, 22));
    let n = TestNode::start(Role::Seed, Vec::new(), ui_listener(false)).await?;
    let url = origin.url("/seen?token=S3CRET");
    n.fetch_url(&url).await?;
    let ui = n.node.ui_addr().context("no ui listener")?;
    let token = std::fs::read_to_string(n.node.data_dir().join("api-token"))?;
    let token = token.trim();
    let c = reqwest::Client::new();

    // Without the token: 401, and the browser is asked for it.
    let r = c.get(format!("http://{ui}/")).send().await?;
    assert_eq!(r.status().as_u16(), 401);
    assert!(
        r.headers()["www-authenticate"]
            .to_str()?
            .starts_with("Basic "),
        "{:?}",
        r.headers()
    );
    let r = c
        .get(format!("http://{ui}/v1/tasks"))
        .basic_auth("anyone", Some("wrong"))
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 401);
    // With it (as a browser sends it, or as a bearer token): the page and its JSON.
    let r = c
        .get(format!("http://{ui}/"))
        .basic_auth("anyone", Some(token))
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 200);
    assert!(
        r.headers()["content-security-policy"]
            .to_str()?
            .contains("default-src 'none'")
    );
    assert!(r.text().await?.contains("ui.js"));
    let tasks = get_json(&c, &format!("http://{ui}/v1/tasks"), token).await?;
    let shown = tasks.to_string();
    assert!(shown.contains("/seen"), "{shown}");
    assert!(
        !shown.contains("S3CRET"),
        "the query string is shown: {shown}"
    );
    // Read-only, even with the token: no downloads, deletes or content.
    let id = url_task_key(&url)?.to_string();
    let r = c
        .post(format!("http://{ui}/v1/tasks"))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(serde_json::json!({"url": origin.url("/other")}).to_string())
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 405);
    let r = c
        .delete(format!("http://{ui}/v1/tasks/{id}"))
        .bearer_auth(token)
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 405);
    let r = c
        .get(format!("http://{ui}/v1/tasks/{id}/content"))
        .bearer_auth(token)
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 404);
    assert!(n.node.progress(&url_task_key(&url)?).await.is_some());
    // `df status` (the API's status) shows the store: its use, the disk, what goes first.
    // (A task is a candidate once its runner has exited, a moment after it completed.)
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let storage = loop {
        let st = n.api.status().await?;
        let storage = st.storage.context("no storage in the status")?;
        if !storage.eviction_candidates.is_empty() || tokio::time::Instant::now() > deadline {
            break storage;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(storage.bytes >= 300_000, "{storage:?}");
    assert!(storage.filesystem_total > 0 && storage.filesystem_used > 0);
    assert_eq!(storage.disk_high_watermark, 90.0);
    let next: Vec<&str> = storage
        .eviction_candidates
        .iter()
        .map(|c| c.id.as_str())
        .collect();
    assert_eq!(next, [id.as_str()], "{storage:?}");
    assert_eq!(storage.eviction_candidates[0].bytes, 300_000);
    assert_eq!(n.node.tasks().len(), 1, "a task was started");
    // A page from another site (DNS rebinding) is refused even with the token.
    let r = c
        .get(format!("http://{ui}/v1/status"))
        .header("host", format!("evil.example:{}", ui.port()))
        .bearer_auth(token)
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 403);
    // The piece map of the finished task: every piece fetched from the origin by this seed.
    let map = get_json(&c, &format!("http://{ui}/v1/tasks/{id}/pieces"), token).await?;
    let pieces = map["pieces"].as_str().unwrap_or_default();
    assert!(
        !pieces.is_empty() && pieces.chars().all(|c| c == 'o'),
        "{map}"
    );
    n.stop().await;
    Ok(())
}

/// The page with a 10 000-piece task (40 GiB at 4 MiB pieces): its drawing code fed fake data
/// (testnet/tests/page/perf.js) in headless Chromium. A refresh must leave the page responsive:
/// well under the one second between refreshes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_stays_responsive_with_a_ten_thousand_piece_task() -> Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let ui = root.join("node/src/api/ui").canonicalize()?;
    let perf = root.join("testnet/tests/page/perf.js").canonicalize()?;
    let html = std::fs::read_to_string(ui.join("index.html"))?;
    let script = r#"<script src="ui.js" defer></script>"#;
    assert!(
        html.contains(script),
        "index.html no longer loads ui.js as the test expects"
    );
    let html = html
        .replace(
            script,
            &format!(
                r#"<script src="file://{}" defer></script><script src="file://{}" defer></script>"#,
                ui.join("ui.js").display(),
                perf.display()
            ),
        )
        .replace(
            r#"href="ui.css""#,
            &format!(r#"href="file://{}""#, ui.join("ui.css").display()),
        );
    let dir = tempfile::tempdir()?;
    let page = dir.path().join("perf.html");
    std::fs::write(&page, html)?;
    let url = format!("file://{}", page.display());
    let dom = tokio::task::spawn_blocking(move || chromium(&url, &["--dump-dom"])).await??;
    let get = |name: &str| attr(&dom, "perf", name).unwrap_or_default();
    let (first, max, mean) = (get("data-first"), get("data-max"), get("data-mean"));
    eprintln!("10 000 pieces: first draw {first} ms, redraw mean {mean} ms, max {max} ms");
    assert_eq!(get("data-cells"), "10000", "{dom}");
    assert_eq!(get("data-summary"), "10000");
    assert_eq!(
        get("data-shown"),
        "http://origin.example/big.iso",
        "query string shown"
    );
    let ms = |v: &str| v.parse::<f64>().unwrap_or(f64::MAX);
    assert!(ms(&first) < 1500.0, "the first draw took {first} ms");
    // Responsive: a refresh takes a small share of the second between refreshes on average, and
    // never the whole second (single redraws vary with whatever else the host runs).
    assert!(
        ms(&mean) < 250.0,
        "a refresh took {mean} ms on average of the second between refreshes"
    );
    assert!(
        ms(&max) < 1000.0,
        "a refresh took {max} ms: longer than the refresh period"
    );
    Ok(())
}
