//! The progress bar of `df get`: bytes, rate, ETA and the share received from peers.

use std::time::Duration;

use df_node::api::client::ApiClient;
use indicatif::{ProgressBar, ProgressStyle};

pub(crate) struct Progress {
    bar: ProgressBar,
    poller: tokio::task::JoinHandle<()>,
}

impl Progress {
    /// Draws a bar on standard error and polls the task for its sources every half second.
    pub(crate) fn start(api: ApiClient, task: String, total: u64) -> Progress {
        let bar = ProgressBar::new(total);
        let style = ProgressStyle::with_template(
            "{bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.enable_steady_tick(Duration::from_millis(200));
        let b = bar.clone();
        let poller = tokio::spawn(async move {
            loop {
                if let Ok(t) = api.task(&task).await {
                    let got = t.from_peers + t.from_origin;
                    if got > 0 {
                        b.set_message(format!(
                            "{:.0}% from peers, {} sources",
                            100.0 * t.from_peers as f64 / got as f64,
                            t.sources
                        ));
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        Progress { bar, poller }
    }

    pub(crate) fn set(&self, done: u64) {
        self.bar.set_position(done);
    }

    pub(crate) fn finish(&self) {
        self.poller.abort();
        self.bar.finish_and_clear();
    }
}
