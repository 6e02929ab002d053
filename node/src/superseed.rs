//! Super-seeding: a seed's uplink sends each piece once before it sends any piece twice.
//!
//! When a seed fetches a file from its origin while peers download it, the seed's uplink is the
//! scarce link: every byte it sends twice is a byte of a piece nobody has yet that it does not
//! send. Requesters pick the rarest piece, but peers that start together (or that all wait on the
//! next piece the seed produced) often ask for the same one. So, while this node holds a piece of
//! the task it has not sent to anybody yet, a request for a piece it is sending now, or finished
//! sending less than [`SETTLE`] ago, is answered "busy": the requester asks for another piece and
//! gets this one from the peer that has it (which announces it within a gossip round).
//! The data server also answers such a request "busy" while the node still fetches the task, or
//! any other task, from its origin: the next fresh piece is coming (with an image's layers
//! fetched at once, second copies of the layers finished first took uplink from the fresh pieces
//! of the others).
//!
//! The rule never idles the uplink for long: once every held piece has left at least once, any
//! request is served; a first send still running after [`STALLED_SEND`] (a slow or stuck
//! receiver) no longer blocks a second one; and a send that fails makes the piece fresh again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use df_protocols::task::TaskKey;

/// After a piece's first send completes, the time its receiver gets to announce it and others to
/// fetch it from there (1 s let ~13 % of a seed's uplink go to second copies in an 8-peer bench; 3 s,
/// ~5 %).
pub const SETTLE: Duration = Duration::from_secs(3);
/// A first send running longer than this does not keep a second one waiting.
pub const STALLED_SEND: Duration = Duration::from_secs(5);
/// A task with no send for this long is forgotten (its pieces count as fresh again).
const FORGET_AFTER: Duration = Duration::from_secs(600);
/// Tasks tracked at most; beyond it the longest idle one is forgotten.
const MAX_TASKS: usize = 4096;

#[derive(Default)]
struct PieceSends {
    first_started: Option<Instant>,
    active: usize,
    done_at: Option<Instant>,
}

#[derive(Default)]
struct TaskSends {
    /// Pieces sent in full at least once, or being sent now.
    pieces: HashMap<u32, PieceSends>,
    last: Option<Instant>,
}

/// The sends of one node's data server, per task and piece.
#[derive(Clone, Default)]
pub struct SuperSeed {
    tasks: Arc<Mutex<HashMap<TaskKey, TaskSends>>>,
}

/// What [`SuperSeed::claim`] says of a request.
pub enum Claim {
    /// Serve it: the piece has not left, or its first send no longer blocks a second. The send
    /// is recorded from now on (under the same lock as the check, so two requests arriving
    /// together cannot both take a first send).
    Granted(SendGuard),
    /// A first send of the piece is under way or just ended: serve it only if the node has
    /// nothing fresher to send (`sent` pieces of the task have left already; see
    /// [`SuperSeed::start`]), else answer "busy".
    Blocked { sent: usize },
}

impl SuperSeed {
    /// Checks a request for `index` of `task` at `now` and, when it may be served, records the
    /// start of its send.
    pub fn claim(&self, task: TaskKey, index: u32, now: Instant) -> Claim {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = tasks.get(&task)
            && let Some(p) = t.pieces.get(&index)
        {
            let blocking = match (p.done_at, p.first_started) {
                (Some(done), _) => now.saturating_duration_since(done) < SETTLE,
                (None, Some(started)) if p.active > 0 => {
                    now.saturating_duration_since(started) < STALLED_SEND
                }
                _ => false,
            };
            if blocking {
                return Claim::Blocked {
                    sent: t.pieces.len(),
                };
            }
        }
        Claim::Granted(self.start_locked(&mut tasks, task, index, now))
    }

    /// Records the start of a send the caller decided to make although [`SuperSeed::claim`]
    /// said `Blocked`; the returned guard records its end.
    pub fn start(&self, task: TaskKey, index: u32, now: Instant) -> SendGuard {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        self.start_locked(&mut tasks, task, index, now)
    }

    fn start_locked(
        &self,
        tasks: &mut HashMap<TaskKey, TaskSends>,
        task: TaskKey,
        index: u32,
        now: Instant,
    ) -> SendGuard {
        if tasks.len() >= MAX_TASKS && !tasks.contains_key(&task) {
            tasks.retain(|_, t| {
                t.last
                    .is_some_and(|l| now.saturating_duration_since(l) < FORGET_AFTER)
            });
            if tasks.len() >= MAX_TASKS
                && let Some(oldest) = tasks.iter().min_by_key(|(_, t)| t.last).map(|(k, _)| *k)
            {
                tasks.remove(&oldest);
            }
        }
        let t = tasks.entry(task).or_default();
        t.last = Some(now);
        let p = t.pieces.entry(index).or_default();
        p.first_started.get_or_insert(now);
        p.active += 1;
        SendGuard {
            owner: self.clone(),
            task,
            index,
            done: false,
        }
    }

    fn finish(&self, task: &TaskKey, index: u32, ok: bool, now: Instant) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        let Some(t) = tasks.get_mut(task) else {
            return;
        };
        let Some(p) = t.pieces.get_mut(&index) else {
            return;
        };
        p.active = p.active.saturating_sub(1);
        if ok {
            p.done_at.get_or_insert(now);
        } else if p.active == 0 && p.done_at.is_none() {
            // Nobody received it: it is fresh again.
            t.pieces.remove(&index);
        }
    }
}

/// One send in progress; counts as failed unless [`SendGuard::done`] is called.
pub struct SendGuard {
    owner: SuperSeed,
    task: TaskKey,
    index: u32,
    done: bool,
}

impl SendGuard {
    /// The piece went out in full.
    pub fn done(mut self) {
        self.done = true;
        self.owner
            .finish(&self.task, self.index, true, Instant::now());
    }
}

impl Drop for SendGuard {
    fn drop(&mut self) {
        if !self.done {
            self.owner
                .finish(&self.task, self.index, false, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> TaskKey {
        key_n(b as u64)
    }

    fn key_n(i: u64) -> TaskKey {
        let mut b = [0u8; 32];
        b[..8].copy_from_slice(&i.to_be_bytes());
        let d: df_protocols::task::ContentDigest = format!("sha256:{}", hex::encode(b))
            .parse()
            .expect("a digest");
        TaskKey::for_digest(&d)
    }

    fn blocked(c: Claim) -> Option<usize> {
        match c {
            Claim::Granted(_) => None,
            Claim::Blocked { sent } => Some(sent),
        }
    }

    fn granted(c: Claim) -> SendGuard {
        match c {
            Claim::Granted(g) => g,
            Claim::Blocked { sent } => panic!("blocked ({sent} sent)"),
        }
    }

    #[test]
    fn a_piece_being_sent_blocks_a_second_send_only_until_it_stalls() {
        let s = SuperSeed::default();
        let t0 = Instant::now();
        let g = granted(s.claim(key(1), 0, t0));
        assert_eq!(
            blocked(s.claim(key(1), 0, t0 + Duration::from_millis(10))),
            Some(1)
        );
        // Other pieces and other tasks are not affected.
        let _g1 = granted(s.claim(key(1), 1, t0));
        let _g2 = granted(s.claim(key(2), 0, t0));
        // A first send that takes longer than STALLED_SEND lets a second one through.
        let _g3 = granted(s.claim(key(1), 0, t0 + STALLED_SEND));
        drop(g);
    }

    #[test]
    fn of_two_requests_claiming_a_fresh_piece_together_one_gets_it() {
        let s = SuperSeed::default();
        let t0 = Instant::now();
        let mut guards = Vec::new();
        let mut refused = 0;
        std::thread::scope(|scope| {
            let hs: Vec<_> = (0..8)
                .map(|_| scope.spawn(|| s.claim(key(1), 7, t0)))
                .collect();
            for h in hs {
                match h.join().expect("claim thread") {
                    Claim::Granted(g) => guards.push(g),
                    Claim::Blocked { .. } => refused += 1,
                }
            }
        });
        assert_eq!((guards.len(), refused), (1, 7));
    }

    #[test]
    fn a_sent_piece_blocks_for_the_settle_time_after_it_went_out() {
        let s = SuperSeed::default();
        let t0 = Instant::now();
        granted(s.claim(key(1), 0, t0)).done();
        granted(s.claim(key(1), 1, t0)).done();
        let done = Instant::now();
        assert_eq!(blocked(s.claim(key(1), 0, done)), Some(2));
        granted(s.claim(key(1), 0, done + SETTLE)).done();
    }

    #[test]
    fn a_failed_send_makes_the_piece_fresh_again() {
        let s = SuperSeed::default();
        let t0 = Instant::now();
        drop(granted(s.claim(key(1), 3, t0)));
        let _g = granted(s.claim(key(1), 3, t0));
        // Nor is it counted as sent.
        let _g4 = granted(s.claim(key(1), 4, t0));
        assert_eq!(blocked(s.claim(key(1), 4, t0)), Some(2));
    }

    #[test]
    fn a_failed_second_send_keeps_the_first_delivery() {
        let s = SuperSeed::default();
        let t0 = Instant::now();
        granted(s.claim(key(1), 0, t0)).done();
        // A second send the server makes anyway (nothing fresher held) fails.
        drop(s.start(key(1), 0, Instant::now()));
        assert_eq!(
            blocked(s.claim(key(1), 0, Instant::now())),
            Some(1),
            "the first delivery still counts"
        );
    }

    #[test]
    fn tracked_tasks_are_bounded() {
        let s = SuperSeed::default();
        let t0 = Instant::now();
        for i in 0..(MAX_TASKS + 10) {
            s.start(key_n(i as u64), 0, t0 + Duration::from_millis(i as u64))
                .done();
        }
        let n = s.tasks.lock().map(|t| t.len()).unwrap_or(0);
        assert!(n <= MAX_TASKS, "{n} tasks tracked");
    }
}
