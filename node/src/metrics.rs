//! The node's metrics: a `prometheus-client` registry served at `/metrics` (and on
//! `metrics_listen`), with the byte counters also reported as JSON in `/v1/status`.
//!
//! Names follow Prometheus conventions (`df_` prefix, `_total`, `_bytes`, `_seconds`). No label
//! carries a URL, a task ID or a peer ID: every label value comes from a short fixed list, so the
//! number of series is bounded and nothing secret is exported. libp2p's own metrics (Kademlia,
//! gossipsub, identify, ping, connections) are registered under `libp2p_`.
//!
//! `/metrics` answers in the Prometheus text format 0.0.4 unless the scraper asks for OpenMetrics
//! (`Accept: application/openmetrics-text`), which is what `prometheus-client` writes natively.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use serde::Serialize;

/// Content type of the Prometheus text format 0.0.4.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Content type of OpenMetrics text.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Where verified bytes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteSource {
    Origin,
    Seed,
    Peer,
}

impl ByteSource {
    fn label(self) -> &'static str {
        match self {
            ByteSource::Origin => "origin",
            ByteSource::Seed => "seed",
            ByteSource::Peer => "peer",
        }
    }
}

/// What a task is for: a file (`df get`, the API) or an image blob (the registry mirror).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskKind {
    File,
    ImageBlob,
}

impl TaskKind {
    fn label(self) -> &'static str {
        match self {
            TaskKind::File => "file",
            TaskKind::ImageBlob => "image_blob",
        }
    }
}

type Labels1 = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];
type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn duration_buckets() -> Histogram {
    // 5 ms … ~11 min.
    Histogram::new(exponential_buckets(0.005, 2.5, 14))
}

fn piece_buckets() -> Histogram {
    // 1 ms … ~16 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// The outcomes of a replica request (`df_replica_requests_total{outcome}`).
pub const REPLICA_OUTCOMES: [&str; 4] = ["accepted", "refused", "declined", "failed"];

/// What happened to a have frame sent or received on a direct stream (`df_direct_haves_total{event}`):
/// `sent` (queued for a peer's stream), `received` (read from a peer's stream), `dropped` (a peer's
/// queue was full, or the node was too far behind to take one in).
pub const DIRECT_HAVE_EVENTS: [&str; 3] = ["sent", "received", "dropped"];

/// Every metric the node exports, registered once at start.
pub struct Metrics {
    registry: Registry,
    uploaded: Counter,
    received: Family<Labels1, Counter>,
    pieces_verified: Counter,
    pieces_corrupt: Counter,
    sources_banned: Counter,
    requests_stalled: Counter,
    requests_busy: Counter,
    tasks: Family<Labels2, Counter>,
    task_duration: HistogramFamily<Labels1>,
    first_byte: HistogramFamily<Labels1>,
    piece_transfer: HistogramFamily<Labels1>,
    evictions: Counter,
    evicted_bytes: Counter,
    mirror_requests: Family<Labels2, Counter>,
    replica_requests: Family<Labels1, Counter>,
    direct_haves: Family<Labels1, Counter>,
    piece_requests_in_flight: Gauge,
    uploads_in_flight: Gauge,
    data_connections: Gauge,
    connected_peers: Gauge,
    known_seeds: Gauge,
    active_tasks: Gauge,
    store_bytes: Gauge,
    store_quota: Gauge,
    libp2p: libp2p::metrics::Metrics,
    /// Byte totals for `/v1/status` (a counter family cannot be summed cheaply by label).
    from_peers: AtomicU64,
    from_origin: AtomicU64,
}

/// Byte counters as reported in `/v1/status`.
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize, PartialEq, Eq, Default)]
pub struct ByteCounters {
    pub uploaded: u64,
    pub from_peers: u64,
    pub from_origin: u64,
}

/// Gauges read at render time.
pub struct Gauges {
    pub connected_peers: usize,
    pub known_seeds: usize,
    pub active_tasks: usize,
    pub store_bytes: u64,
    /// `storage.quota`; 0 when unlimited.
    pub store_quota: u64,
}

/// Decrements its gauge when dropped: an in-flight count that stays right when the future holding
/// it is aborted.
pub struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let libp2p = libp2p::metrics::Metrics::new(&mut registry);
        let r = registry.sub_registry_with_prefix("df");

        let build_info = Family::<Labels1, Gauge>::default();
        build_info
            .get_or_create(&[("version", env!("CARGO_PKG_VERSION"))])
            .set(1);
        r.register(
            "build_info",
            "Build of this node (always 1; the version is a label)",
            build_info,
        );

        let uploaded = Counter::default();
        r.register_with_unit(
            "uploaded",
            "Piece bytes served to peers",
            Unit::Bytes,
            uploaded.clone(),
        );
        let received = Family::<Labels1, Counter>::default();
        for s in [ByteSource::Origin, ByteSource::Seed, ByteSource::Peer] {
            let _ = received.get_or_create(&[("source", s.label())]);
        }
        r.register_with_unit(
            "received",
            "Verified bytes this node got, by source: origin (fetched itself), seed, peer",
            Unit::Bytes,
            received.clone(),
        );
        let counter = |r: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            r.register(name, help, c.clone());
            c
        };
        let pieces_verified = counter(r, "pieces_verified", "Pieces whose hash matched");
        let pieces_corrupt = counter(
            r,
            "pieces_corrupt",
            "Pieces received whose hash did not match",
        );
        let sources_banned = counter(
            r,
            "sources_banned",
            "Sources dropped from a task for sending bad data",
        );
        let requests_stalled = counter(
            r,
            "piece_requests_stalled",
            "Piece requests given up on because the source sent nothing for download.read_timeout",
        );
        let requests_busy = counter(
            r,
            "piece_requests_busy",
            "Piece requests a source answered busy (its upload slots full, or a fresher piece goes first)",
        );
        let tasks = Family::<Labels2, Counter>::default();
        for k in [TaskKind::File, TaskKind::ImageBlob] {
            for res in ["completed", "failed"] {
                let _ = tasks.get_or_create(&[("kind", k.label()), ("result", res)]);
            }
        }
        r.register(
            "tasks",
            "Downloads this node finished, by kind (file, image_blob) and result (completed, failed)",
            tasks.clone(),
        );
        let task_duration: HistogramFamily<Labels1> =
            Family::new_with_constructor(duration_buckets);
        r.register_with_unit(
            "task_duration",
            "Time from a download's start on this node to its end, by kind",
            Unit::Seconds,
            task_duration.clone(),
        );
        let first_byte: HistogramFamily<Labels1> = Family::new_with_constructor(duration_buckets);
        r.register_with_unit(
            "task_first_byte",
            "Time from a download's start on this node to its first verified piece, by kind",
            Unit::Seconds,
            first_byte.clone(),
        );
        let piece_transfer: HistogramFamily<Labels1> = Family::new_with_constructor(piece_buckets);
        r.register_with_unit(
            "piece_transfer",
            "Time to fetch one piece from a source, request to last byte, by source (seed, peer)",
            Unit::Seconds,
            piece_transfer.clone(),
        );
        let evictions = counter(
            r,
            "store_evictions",
            "Cached tasks removed by the garbage collector (TTL, quota, disk watermark)",
        );
        let evicted_bytes = Counter::default();
        r.register_with_unit(
            "store_evicted",
            "Bytes freed by the garbage collector",
            Unit::Bytes,
            evicted_bytes.clone(),
        );
        let mirror_requests = Family::<Labels2, Counter>::default();
        // The commonest series exist from the start (at 0), so that queries of a node without
        // traffic yet find the family.
        for route in ["base", "manifest", "blob"] {
            let _ = mirror_requests.get_or_create(&[("route", route), ("status", "200")]);
        }
        r.register(
            "mirror_requests",
            "Registry mirror requests answered, by route (base, manifest, blob, tags, other) and status code",
            mirror_requests.clone(),
        );
        let replica_requests = Family::<Labels1, Counter>::default();
        for outcome in REPLICA_OUTCOMES {
            let _ = replica_requests.get_or_create(&[("outcome", outcome)]);
        }
        r.register(
            "replica_requests",
            "Requests from a task's first owner to hold a replica, by outcome (accepted; refused: \
             the asker is not a trusted producer; declined: not a seed, or too many tasks; failed)",
            replica_requests.clone(),
        );
        let direct_haves = Family::<Labels1, Counter>::default();
        for event in DIRECT_HAVE_EVENTS {
            let _ = direct_haves.get_or_create(&[("event", event)]);
        }
        r.register(
            "direct_haves",
            "Have frames on direct peer streams (/df/have/1), by event (sent: queued for a peer; \
             received; dropped: a peer's queue full, or this node too far behind)",
            direct_haves.clone(),
        );
        let gauge = |r: &mut Registry, name: &str, help: &str, unit: Option<Unit>| {
            let g = Gauge::default();
            match unit {
                Some(u) => r.register_with_unit(name, help, u, g.clone()),
                None => r.register(name, help, g.clone()),
            }
            g
        };
        let piece_requests_in_flight = gauge(
            r,
            "piece_requests_in_flight",
            "Piece requests this node has open to seeds and peers",
            None,
        );
        let uploads_in_flight = gauge(
            r,
            "uploads_in_flight",
            "Pieces this node is sending to peers now",
            None,
        );
        let data_connections = gauge(
            r,
            "data_connections",
            "Authenticated inbound data-plane connections open now",
            None,
        );
        let connected_peers = gauge(r, "connected_peers", "libp2p peers connected now", None);
        let known_seeds = gauge(r, "known_seeds", "Seeds this node knows of", None);
        let active_tasks = gauge(r, "active_tasks", "Tasks in progress", None);
        let store_bytes = gauge(
            r,
            "store",
            "Bytes used by the piece store",
            Some(Unit::Bytes),
        );
        let store_quota = gauge(
            r,
            "store_quota",
            "storage.quota (0: no quota)",
            Some(Unit::Bytes),
        );

        Metrics {
            registry,
            uploaded,
            received,
            pieces_verified,
            pieces_corrupt,
            sources_banned,
            requests_stalled,
            requests_busy,
            tasks,
            task_duration,
            first_byte,
            piece_transfer,
            evictions,
            evicted_bytes,
            mirror_requests,
            replica_requests,
            direct_haves,
            piece_requests_in_flight,
            uploads_in_flight,
            data_connections,
            connected_peers,
            known_seeds,
            active_tasks,
            store_bytes,
            store_quota,
            libp2p,
            from_peers: AtomicU64::new(0),
            from_origin: AtomicU64::new(0),
        }
    }

    /// libp2p's recorder, for the network event loop.
    pub fn libp2p(&self) -> &libp2p::metrics::Metrics {
        &self.libp2p
    }

    pub fn add_uploaded(&self, n: u64) {
        self.uploaded.inc_by(n);
    }

    pub fn add_from_origin(&self, n: u64) {
        self.from_origin.fetch_add(n, Ordering::Relaxed);
        self.received
            .get_or_create(&[("source", ByteSource::Origin.label())])
            .inc_by(n);
    }

    /// A piece fetched from a seed or a peer passed its hash check.
    pub fn piece_received(&self, from: ByteSource, len: u64, took: Duration) {
        self.from_peers.fetch_add(len, Ordering::Relaxed);
        self.received
            .get_or_create(&[("source", from.label())])
            .inc_by(len);
        self.pieces_verified.inc();
        self.piece_transfer
            .get_or_create(&[("source", from.label())])
            .observe(took.as_secs_f64());
    }

    pub fn piece_corrupt(&self) {
        self.pieces_corrupt.inc();
    }
    pub fn source_banned(&self) {
        self.sources_banned.inc();
    }
    pub fn request_stalled(&self) {
        self.requests_stalled.inc();
    }
    pub fn request_busy(&self) {
        self.requests_busy.inc();
    }

    /// A download on this node ended.
    pub fn task_finished(&self, kind: TaskKind, ok: bool, took: Duration) {
        let result = if ok { "completed" } else { "failed" };
        self.tasks
            .get_or_create(&[("kind", kind.label()), ("result", result)])
            .inc();
        self.task_duration
            .get_or_create(&[("kind", kind.label())])
            .observe(took.as_secs_f64());
    }

    /// A download's first verified piece.
    pub fn task_first_byte(&self, kind: TaskKind, took: Duration) {
        self.first_byte
            .get_or_create(&[("kind", kind.label())])
            .observe(took.as_secs_f64());
    }

    pub fn evicted(&self, bytes: u64) {
        self.evictions.inc();
        self.evicted_bytes.inc_by(bytes);
    }

    /// A registry mirror answer. `route` is one of a fixed few; the status is a number.
    pub fn mirror_request(&self, route: &'static str, status: u16) {
        self.mirror_requests
            .get_or_create(&[("route", route), ("status", status_label(status))])
            .inc();
    }

    /// A replica request answered; `outcome` is one of [`REPLICA_OUTCOMES`].
    pub fn replica_request(&self, outcome: &'static str) {
        self.replica_requests
            .get_or_create(&[("outcome", outcome)])
            .inc();
    }

    /// Replica requests answered with `outcome` so far.
    pub fn replica_requests(&self, outcome: &'static str) -> u64 {
        self.replica_requests
            .get_or_create(&[("outcome", outcome)])
            .get()
    }

    /// A have frame on a direct stream; `event` is one of [`DIRECT_HAVE_EVENTS`].
    pub fn direct_have(&self, event: &'static str) {
        self.direct_haves.get_or_create(&[("event", event)]).inc();
    }

    /// Have frames with `event` so far.
    pub fn direct_haves(&self, event: &'static str) -> u64 {
        self.direct_haves.get_or_create(&[("event", event)]).get()
    }

    /// Counts a piece request until the returned guard is dropped.
    pub fn piece_request(&self) -> InFlight {
        self.piece_requests_in_flight.inc();
        InFlight(self.piece_requests_in_flight.clone())
    }

    /// Counts an upload until the returned guard is dropped.
    pub fn upload(&self) -> InFlight {
        self.uploads_in_flight.inc();
        InFlight(self.uploads_in_flight.clone())
    }

    /// Counts an inbound data connection until the returned guard is dropped.
    pub fn data_connection(&self) -> InFlight {
        self.data_connections.inc();
        InFlight(self.data_connections.clone())
    }

    pub fn bytes(&self) -> ByteCounters {
        ByteCounters {
            uploaded: self.uploaded.get(),
            from_peers: self.from_peers.load(Ordering::Relaxed),
            from_origin: self.from_origin.load(Ordering::Relaxed),
        }
    }

    /// OpenMetrics text, with the gauges read now.
    pub fn render_openmetrics(&self, g: &Gauges) -> String {
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.connected_peers.set(clamp(g.connected_peers as u64));
        self.known_seeds.set(clamp(g.known_seeds as u64));
        self.active_tasks.set(clamp(g.active_tasks as u64));
        self.store_bytes.set(clamp(g.store_bytes));
        self.store_quota.set(clamp(g.store_quota));
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        out
    }

    /// Prometheus text format 0.0.4, with the gauges read now.
    pub fn render(&self, g: &Gauges) -> String {
        openmetrics_to_text(&self.render_openmetrics(g))
    }
}

/// HTTP status codes as label values (static strings: a label set holds no allocation).
fn status_label(status: u16) -> &'static str {
    const KNOWN: [&str; 25] = [
        "200", "201", "202", "204", "206", "301", "302", "304", "307", "308", "400", "401", "403",
        "404", "405", "406", "409", "413", "416", "429", "500", "502", "503", "504", "507",
    ];
    let text = status.to_string();
    if let Some(k) = KNOWN.iter().find(|k| **k == text) {
        return k;
    }
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Rewrites OpenMetrics text as Prometheus text 0.0.4, which every scraper and `promtool` read:
/// a counter family's metadata names its `_total` samples, `info` becomes a gauge named `_info`,
/// `unknown` becomes `untyped`; `# UNIT`, `# EOF`, `_created` samples and exemplars are dropped.
pub fn openmetrics_to_text(om: &str) -> String {
    use std::collections::HashMap;
    // Family name -> (type as written in 0.0.4, the name its samples carry).
    let mut kinds: HashMap<&str, &str> = HashMap::new();
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            kinds.insert(name, kind);
            let (name, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "info" => (format!("{name}_info"), "gauge"),
                "unknown" | "stateset" => (name.to_owned(), "untyped"),
                "gaugehistogram" => (name.to_owned(), "histogram"),
                k => (name.to_owned(), k),
            };
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            // HELP precedes TYPE in prometheus-client's output: look ahead is not possible in one
            // pass, so the suffix is decided when the TYPE line arrives (see below).
            out.push_str(&format!("\u{0}HELP {name} {help}\n"));
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        // A sample: drop exemplars and `_created` series.
        let sample = line.split(" # ").next().unwrap_or(line);
        let name_end = sample.find(['{', ' ']).unwrap_or(sample.len());
        if let Some(base) = sample[..name_end].strip_suffix("_created")
            && kinds
                .get(base)
                .is_some_and(|k| *k == "counter" || *k == "histogram")
        {
            continue;
        }
        out.push_str(sample);
        out.push('\n');
    }
    // Second pass: give each HELP line the name its TYPE line settled on.
    let mut fixed = String::with_capacity(out.len());
    for line in out.lines() {
        if let Some(rest) = line.strip_prefix("\u{0}HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            let name = match kinds.get(name) {
                Some(&"counter") => format!("{name}_total"),
                Some(&"info") => format!("{name}_info"),
                _ => name.to_owned(),
            };
            fixed.push_str(&format!("# HELP {name} {help}\n"));
        } else {
            fixed.push_str(line);
            fixed.push('\n');
        }
    }
    fixed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauges() -> Gauges {
        Gauges {
            connected_peers: 2,
            known_seeds: 1,
            active_tasks: 1,
            store_bytes: 9,
            store_quota: 0,
        }
    }

    #[test]
    fn text_format_names_counters_by_their_samples() {
        let m = Metrics::new();
        m.add_uploaded(5);
        m.piece_received(ByteSource::Seed, 100, Duration::from_millis(3));
        m.add_from_origin(7);
        m.task_finished(TaskKind::ImageBlob, true, Duration::from_secs(2));
        m.mirror_request("blob", 206);
        let text = m.render(&gauges());
        assert!(
            text.contains(
                "# HELP df_uploaded_bytes_total Piece bytes served to peers.\n\
                 # TYPE df_uploaded_bytes_total counter\ndf_uploaded_bytes_total 5\n"
            ),
            "{text}"
        );
        assert!(text.contains("df_received_bytes_total{source=\"seed\"} 100\n"));
        assert!(text.contains("df_received_bytes_total{source=\"origin\"} 7\n"));
        assert!(text.contains("df_received_bytes_total{source=\"peer\"} 0\n"));
        assert!(text.contains("df_tasks_total{kind=\"image_blob\",result=\"completed\"} 1\n"));
        assert!(text.contains("df_mirror_requests_total{route=\"blob\",status=\"206\"} 1\n"));
        assert!(text.contains("df_connected_peers 2\n"));
        assert!(text.contains("df_task_duration_seconds_count{kind=\"image_blob\"} 1\n"));
        assert!(text.contains("df_build_info{version=\""));
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"));
        // Every sample belongs to a family declared by a TYPE line.
        let declared: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = &line[..line.find(['{', ' ']).unwrap_or(line.len())];
            assert!(
                declared.iter().any(|d| name == *d
                    || name
                        .strip_prefix(*d)
                        .is_some_and(|s| { ["_bucket", "_sum", "_count"].contains(&s) })),
                "sample {name} has no TYPE"
            );
        }
        let bytes = m.bytes();
        assert_eq!(
            (bytes.uploaded, bytes.from_peers, bytes.from_origin),
            (5, 100, 7)
        );
    }

    #[test]
    fn openmetrics_keeps_its_own_form() {
        let m = Metrics::new();
        let om = m.render_openmetrics(&gauges());
        assert!(om.ends_with("# EOF\n"));
        assert!(om.contains("# TYPE df_uploaded_bytes counter\n"));
        assert!(om.contains("# UNIT df_uploaded_bytes bytes\n"));
    }

    #[test]
    fn in_flight_guards_count_down_when_dropped() {
        let m = Metrics::new();
        let a = m.piece_request();
        let b = m.piece_request();
        assert!(
            m.render(&gauges())
                .contains("df_piece_requests_in_flight 2\n")
        );
        drop(a);
        drop(b);
        assert!(
            m.render(&gauges())
                .contains("df_piece_requests_in_flight 0\n")
        );
    }

    #[test]
    fn conversion_handles_info_created_and_exemplars() {
        let om = "# HELP x An info.\n# TYPE x info\nx_info{a=\"b\"} 1\n\
                  # HELP c A counter.\n# TYPE c counter\nc_total 3 # {t=\"1\"} 1.0\nc_created 1.5\n# EOF\n";
        assert_eq!(
            openmetrics_to_text(om),
            "# HELP x_info An info.\n# TYPE x_info gauge\nx_info{a=\"b\"} 1\n\
             # HELP c_total A counter.\n# TYPE c_total counter\nc_total 3\n"
        );
    }

    #[test]
    fn status_labels_are_bounded() {
        assert_eq!(status_label(404), "404");
        assert_eq!(status_label(418), "4xx");
        assert_eq!(status_label(599), "5xx");
        assert_eq!(status_label(0), "5xx");
    }
}
