//! What a download knows of one source (a peer or seed holding pieces of the task): where it
//! is, what it holds, how fast it has been, and whether to ask it now. The runner owns one per
//! source; the picker reads them through [`Source::view`].
//!
//! * Rate: bytes per second of its deliveries, exponentially weighted (0.7 old, 0.3 new).
//! * Failures: a failed request (error, stall, timeout) pauses the source for [`FAILURE_PAUSE`];
//!   `max_failures` in a row drop it for the task. A delivery clears the count.
//! * Busy: a source that answers "busy" for a piece (it is sending it to others) is not asked
//!   for that piece for [`BUSY_PAUSE`], and is asked for other pieces meanwhile.
//!
//! Every method takes the time as an argument, so the rules are tested without waiting.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use df_protocols::piece::Bitfield;
use df_protocols::transfer::Grant;
use libp2p::PeerId;

use super::picker::SourceView;

/// How long a source that answered "busy" for a piece is not asked for it again.
pub(crate) const BUSY_PAUSE: Duration = Duration::from_millis(200);
/// How long a source is not asked after a failed request.
pub(crate) const FAILURE_PAUSE: Duration = Duration::from_millis(500);

pub(crate) struct Source {
    pub(crate) addr: SocketAddr,
    pub(crate) token: Grant,
    pub(crate) have: Bitfield,
    /// Requests in flight to it.
    pub(crate) inflight: usize,
    /// A seed or the task's producer.
    pub(crate) is_seed: bool,
    failures: u32,
    /// Bytes per second, exponentially weighted (0 until its first delivery).
    rate: f64,
    paused_until: Option<Instant>,
    /// Pieces it answered "busy" for, until when.
    busy_pieces: HashMap<u32, Instant>,
}

/// What to do with a source after a failed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AfterFailure {
    /// Paused for a while; asked again later.
    Paused,
    /// Failed `max_failures` times in a row: drop it for this task.
    Drop,
}

impl Source {
    pub(crate) fn new(addr: SocketAddr, token: Grant, have: Bitfield, is_seed: bool) -> Source {
        Source {
            addr,
            token,
            have,
            inflight: 0,
            is_seed,
            failures: 0,
            rate: 0.0,
            paused_until: None,
            busy_pieces: HashMap::new(),
        }
    }

    /// Holds at least one piece (a source is known, with data access, from its first answer on,
    /// before it holds anything).
    pub(crate) fn holds_any(&self) -> bool {
        self.have.count() > 0
    }

    pub(crate) fn paused(&self, now: Instant) -> bool {
        self.paused_until.is_some_and(|t| t > now)
    }

    /// The picker's view of it at `now`.
    pub(crate) fn view(&self, peer: PeerId, now: Instant) -> SourceView<'_> {
        SourceView {
            peer,
            have: &self.have,
            inflight: self.inflight,
            is_seed: self.is_seed,
            rate: self.rate,
            paused: self.paused(now),
            busy_pieces: &self.busy_pieces,
            now,
        }
    }

    /// A request to it ended (either way).
    pub(crate) fn request_ended(&mut self) {
        self.inflight = self.inflight.saturating_sub(1);
    }

    /// It delivered a piece of `len` bytes in `elapsed`.
    pub(crate) fn delivered(&mut self, len: u32, elapsed: Duration) {
        let r = f64::from(len) / elapsed.as_secs_f64().max(1e-6);
        self.rate = if self.rate == 0.0 {
            r
        } else {
            0.7 * self.rate + 0.3 * r
        };
        self.failures = 0;
    }

    /// It answered "busy" for piece `index` at `now`.
    pub(crate) fn busy(&mut self, index: u32, now: Instant) {
        self.busy_pieces.retain(|_, t| *t > now);
        self.busy_pieces.insert(index, now + BUSY_PAUSE);
    }

    /// A request failed at `now`.
    pub(crate) fn failed(&mut self, now: Instant, max_failures: u32) -> AfterFailure {
        self.failures += 1;
        self.paused_until = Some(now + FAILURE_PAUSE);
        if self.failures >= max_failures {
            AfterFailure::Drop
        } else {
            AfterFailure::Paused
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(pieces: u32) -> Source {
        let token = Grant {
            expires: 0,
            token: df_protocols::transfer::AccessToken([0; 32]),
        };
        Source::new(
            "127.0.0.1:9".parse().unwrap(),
            token,
            Bitfield::full(pieces),
            false,
        )
    }

    #[test]
    fn the_rate_follows_deliveries_with_weight_on_the_past() {
        let mut s = source(4);
        assert_eq!(s.rate, 0.0);
        s.delivered(1 << 20, Duration::from_secs(1));
        assert_eq!(s.rate, f64::from(1u32 << 20));
        // A delivery four times as fast moves the estimate 30 % of the way.
        s.delivered(1 << 20, Duration::from_millis(250));
        let want = 0.7 * f64::from(1u32 << 20) + 0.3 * f64::from(4u32 << 20);
        assert!((s.rate - want).abs() < 1.0, "{} != {want}", s.rate);
        // A zero duration does not divide by zero.
        s.delivered(1, Duration::ZERO);
        assert!(s.rate.is_finite());
    }

    #[test]
    fn failures_pause_then_drop_and_a_delivery_forgives_them() {
        let t0 = Instant::now();
        let mut s = source(4);
        assert!(!s.paused(t0));
        assert_eq!(s.failed(t0, 3), AfterFailure::Paused);
        assert!(s.paused(t0 + FAILURE_PAUSE / 2));
        assert!(s.view(PeerId::random(), t0).paused);
        assert!(!s.paused(t0 + FAILURE_PAUSE));
        assert_eq!(s.failed(t0, 3), AfterFailure::Paused);
        // A delivery in between: the count starts over.
        s.delivered(1000, Duration::from_millis(1));
        assert_eq!(s.failed(t0, 3), AfterFailure::Paused);
        assert_eq!(s.failed(t0, 3), AfterFailure::Paused);
        assert_eq!(s.failed(t0, 3), AfterFailure::Drop);
    }

    #[test]
    fn a_busy_piece_is_skipped_for_a_while_and_others_are_not() {
        let t0 = Instant::now();
        let mut s = source(4);
        s.busy(2, t0);
        let v = s.view(PeerId::random(), t0 + BUSY_PAUSE / 2);
        assert!(v.busy_pieces.get(&2).is_some_and(|t| *t > v.now));
        assert!(v.busy_pieces.get(&1).is_none());
        assert!(!v.paused, "busy with one piece is not a pause");
        // Expired entries are dropped when the next one is recorded.
        s.busy(3, t0 + BUSY_PAUSE * 2);
        assert!(!s.busy_pieces.contains_key(&2));
        assert!(s.busy_pieces.contains_key(&3));
    }

    #[test]
    fn request_counts_do_not_underflow() {
        let mut s = source(1);
        s.inflight = 1;
        s.request_ended();
        s.request_ended();
        assert_eq!(s.inflight, 0);
    }
}
