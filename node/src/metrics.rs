//! Node counters, exposed as JSON in `/v1/status` and in Prometheus text format at `/metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Counters since the node started.
#[derive(Default)]
pub struct Metrics {
    uploaded: AtomicU64,
    from_peers: AtomicU64,
    from_origin: AtomicU64,
    pieces_verified: AtomicU64,
    pieces_corrupt: AtomicU64,
    sources_banned: AtomicU64,
    requests_stalled: AtomicU64,
    tasks_completed: AtomicU64,
    tasks_failed: AtomicU64,
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
    pub active_tasks: usize,
    pub store_bytes: u64,
}

impl Metrics {
    pub fn add_uploaded(&self, n: u64) {
        self.uploaded.fetch_add(n, Ordering::Relaxed);
    }
    pub fn add_from_peers(&self, n: u64) {
        self.from_peers.fetch_add(n, Ordering::Relaxed);
    }
    pub fn add_from_origin(&self, n: u64) {
        self.from_origin.fetch_add(n, Ordering::Relaxed);
    }
    pub fn piece_verified(&self) {
        self.pieces_verified.fetch_add(1, Ordering::Relaxed);
    }
    pub fn piece_corrupt(&self) {
        self.pieces_corrupt.fetch_add(1, Ordering::Relaxed);
    }
    pub fn source_banned(&self) {
        self.sources_banned.fetch_add(1, Ordering::Relaxed);
    }
    pub fn request_stalled(&self) {
        self.requests_stalled.fetch_add(1, Ordering::Relaxed);
    }
    pub fn task_completed(&self) {
        self.tasks_completed.fetch_add(1, Ordering::Relaxed);
    }
    pub fn task_failed(&self) {
        self.tasks_failed.fetch_add(1, Ordering::Relaxed);
    }

    pub fn bytes(&self) -> ByteCounters {
        ByteCounters {
            uploaded: self.uploaded.load(Ordering::Relaxed),
            from_peers: self.from_peers.load(Ordering::Relaxed),
            from_origin: self.from_origin.load(Ordering::Relaxed),
        }
    }

    /// Prometheus text exposition format.
    pub fn render(&self, g: &Gauges) -> String {
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
        };
        counter(
            "df_uploaded_bytes_total",
            "Piece bytes served to peers.",
            &self.uploaded,
        );
        counter(
            "df_downloaded_from_peers_bytes_total",
            "Verified piece bytes received from peers and seeds.",
            &self.from_peers,
        );
        counter(
            "df_downloaded_from_origin_bytes_total",
            "Bytes fetched from origins by this node.",
            &self.from_origin,
        );
        counter(
            "df_pieces_verified_total",
            "Pieces whose hash matched.",
            &self.pieces_verified,
        );
        counter(
            "df_pieces_corrupt_total",
            "Pieces received whose hash did not match.",
            &self.pieces_corrupt,
        );
        counter(
            "df_sources_banned_total",
            "Sources dropped from a task for sending bad data.",
            &self.sources_banned,
        );
        counter(
            "df_piece_requests_stalled_total",
            "Piece requests given up on because the source sent nothing for download.read_timeout.",
            &self.requests_stalled,
        );
        counter(
            "df_tasks_completed_total",
            "Tasks finished by this node.",
            &self.tasks_completed,
        );
        counter(
            "df_tasks_failed_total",
            "Tasks that failed on this node.",
            &self.tasks_failed,
        );
        let mut gauge = |name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(
            "df_connected_peers",
            "libp2p peers connected now.",
            g.connected_peers as u64,
        );
        gauge(
            "df_active_tasks",
            "Tasks in progress.",
            g.active_tasks as u64,
        );
        gauge(
            "df_store_bytes",
            "Bytes used by the piece store.",
            g.store_bytes,
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_is_prometheus_text() {
        let m = Metrics::default();
        m.add_uploaded(5);
        let text = m.render(&Gauges {
            connected_peers: 2,
            active_tasks: 1,
            store_bytes: 9,
        });
        assert!(
            text.contains("# TYPE df_uploaded_bytes_total counter\ndf_uploaded_bytes_total 5\n")
        );
        assert!(text.contains("df_connected_peers 2\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let mut parts = line.split(' ');
            let (name, value) = (parts.next().unwrap(), parts.next().unwrap());
            assert!(name.starts_with("df_"));
            value.parse::<u64>().unwrap();
        }
    }
}
