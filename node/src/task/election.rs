//! Election: who fetches the origin for a task that no provider holds.
//!
//! 1. A seed asked to download a task itself is its producer (unless the request forbids the
//!    origin to it: a preheat's copy comes from the task's owner).
//! 2. Else the connected seeds the trust check admits, XOR-closest to the task key first
//!    ([`super::owners::owner_order`]), are asked in turn to start the task; the first that accepts
//!    answers with the signed header once the origin responded.
//! 3. No seed took it (and the request allows the origin): the connected peers, this node among
//!    them, ranked the same way. Ranking the connected peers rather than asking the DHT means the
//!    nodes of one swarm rank the same set and agree; reaching this node in the ranking makes it
//!    the producer.
//!
//! An answer that settles the task for everyone (the origin's status, changed content, a bad
//! request) ends the election at once; a refusal or an unreachable candidate moves on to the next.
//! A candidate has [`ASK_TIMEOUT`] to accept (it opens the origin first). A request that fails
//! within [`RETRY_IF_FASTER`] (its connection was replaced under it, e.g. while both sides dialed
//! each other) is sent again, up to [`ASK_ATTEMPTS`] times; one that timed out is not.

use std::collections::HashSet;
use std::future::Future;
use std::ops::ControlFlow;
use std::time::Duration;

use df_protocols::control::{ControlRequest, ControlResponse};
use df_protocols::manifest::SignedHeader;
use df_protocols::task::TaskKey;
use libp2p::PeerId;

use super::TaskError;
use crate::config::Role;
use crate::network::{NetworkClient, NetworkError};

/// How long a candidate producer may take to accept a task (it opens the origin first).
pub(crate) const ASK_TIMEOUT: Duration = Duration::from_secs(20);
/// A candidate whose request fails within [`RETRY_IF_FASTER`] is asked up to this many times.
const ASK_ATTEMPTS: u32 = 3;
const RETRY_IF_FASTER: Duration = Duration::from_secs(2);
const RETRY_PAUSE: Duration = Duration::from_millis(300);

/// How an election ended.
#[derive(Debug)]
pub(crate) enum Election {
    /// A peer accepted and answered with the header.
    Started {
        producer: PeerId,
        header: Box<SignedHeader>,
    },
    /// This node should fetch the origin itself.
    Local,
    Failed(TaskError),
}

/// What an election needs of the network.
pub(crate) trait Electorate: Send + Sync {
    fn connected_peers(&self) -> Vec<PeerId>;
    /// The seeds this node knows of.
    fn seeds(&self) -> Vec<PeerId>;
    fn ask(
        &self,
        peer: PeerId,
        req: ControlRequest,
    ) -> impl Future<Output = Result<ControlResponse, NetworkError>> + Send;
}

impl Electorate for NetworkClient {
    fn connected_peers(&self) -> Vec<PeerId> {
        self.state().connected_peers()
    }

    fn seeds(&self) -> Vec<PeerId> {
        self.state().seeds()
    }

    async fn ask(
        &self,
        peer: PeerId,
        req: ControlRequest,
    ) -> Result<ControlResponse, NetworkError> {
        self.request(peer, req).await.map(|(answer, _)| answer)
    }
}

/// Who an election may ask.
pub(crate) struct Candidates {
    /// Producers that failed, vanished, were banned or whose header was rejected.
    pub(crate) exclude: HashSet<PeerId>,
    /// The trust check: only peers it admits are asked.
    pub(crate) may_ask: Box<dyn Fn(&PeerId) -> bool + Send>,
}

impl Candidates {
    fn admits(&self, p: &PeerId) -> bool {
        !self.exclude.contains(p) && (self.may_ask)(p)
    }
}

/// One election's question and rules.
pub(crate) struct Ballot {
    pub(crate) key: TaskKey,
    pub(crate) me: PeerId,
    pub(crate) role: Role,
    /// The `StartTask` request a candidate is asked.
    pub(crate) start: ControlRequest,
    pub(crate) candidates: Candidates,
    /// This node may fetch the origin itself.
    pub(crate) local_ok: bool,
    /// Peers (not only seeds) may be asked, the request allowing the origin.
    pub(crate) seedless_ok: bool,
}

/// Asks `peer` to take the task. `Break`: the election ends with this outcome (it took the task,
/// or answered what holds for every candidate: the origin's status, changed content, a bad
/// request). `Continue`: on to the next candidate, with the reason when it declined or could not
/// be reached (another failure is kept in `last_error`).
async fn canvass<N: Electorate>(
    net: &N,
    peer: PeerId,
    start: &ControlRequest,
    last_error: &mut Option<TaskError>,
) -> ControlFlow<Election, Option<String>> {
    match ask(net, peer, start).await {
        Ok(ControlResponse::Started { header }) => ControlFlow::Break(Election::Started {
            producer: peer,
            header: Box::new(header),
        }),
        Ok(ControlResponse::Error(e)) => match TaskError::from_control(&e) {
            Some(
                err @ (TaskError::OriginStatus { .. }
                | TaskError::ContentChanged { .. }
                | TaskError::BadRequest { .. }),
            ) => ControlFlow::Break(Election::Failed(err)),
            Some(err) => {
                *last_error = Some(err);
                ControlFlow::Continue(None)
            }
            None => ControlFlow::Continue(Some(e.message)),
        },
        Ok(other) => ControlFlow::Continue(Some(format!("unexpected answer {other:?}"))),
        Err(e) => ControlFlow::Continue(Some(e.to_string())),
    }
}

/// Asks `peer` to start the task, again if the request failed at once.
async fn ask<N: Electorate>(
    net: &N,
    peer: PeerId,
    start: &ControlRequest,
) -> Result<ControlResponse, NetworkError> {
    let mut attempt = 0;
    loop {
        let began = tokio::time::Instant::now();
        let r = tokio::time::timeout(ASK_TIMEOUT, net.ask(peer, start.clone()))
            .await
            .unwrap_or_else(|_| {
                Err(NetworkError::Request {
                    peer,
                    reason: "no answer in time".into(),
                })
            });
        attempt += 1;
        match r {
            Err(e) if attempt < ASK_ATTEMPTS && began.elapsed() < RETRY_IF_FASTER => {
                tracing::debug!(%peer, error = %e, "asking again");
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            r => return r,
        }
    }
}

/// Runs an election (see the module's documentation).
pub(crate) async fn run<N: Electorate>(net: &N, ballot: Ballot) -> Election {
    let Ballot {
        key,
        me,
        role,
        start,
        candidates,
        local_ok,
        seedless_ok,
    } = ballot;
    // Only peers we are connected to can take the task (the DHT remembers departed ones).
    let connected: HashSet<PeerId> = net.connected_peers().into_iter().collect();
    let mut last_error: Option<TaskError> = None;

    // 1. Seeds, closest first.
    let mut seeds: Vec<PeerId> = net
        .seeds()
        .into_iter()
        .filter(|s| *s != me && candidates.admits(s) && connected.contains(s))
        .collect();
    super::owners::owner_order(&key, &mut seeds);
    let seeds_asked = seeds.len();
    let mut seed_refusal: Option<String> = None;
    if role == Role::Seed && local_ok && !candidates.exclude.contains(&me) {
        return Election::Local;
    }
    for s in seeds {
        match canvass(net, s, &start, &mut last_error).await {
            ControlFlow::Break(outcome) => return outcome,
            ControlFlow::Continue(Some(reason)) => {
                tracing::info!(%key, seed = %s, %reason, "seed did not take the task");
                seed_refusal = Some(reason);
            }
            ControlFlow::Continue(None) => {}
        }
    }

    // 2. No seed took it: the connected peers XOR-closest to the key, this node among them.
    if seedless_ok {
        let mut ranked: Vec<PeerId> = connected
            .iter()
            .copied()
            .filter(|p| *p != me && candidates.admits(p))
            .collect();
        if local_ok && role != Role::Ephemeral {
            ranked.push(me);
        }
        super::owners::owner_order(&key, &mut ranked);
        for c in ranked {
            if c == me {
                return Election::Local;
            }
            match canvass(net, c, &start, &mut last_error).await {
                ControlFlow::Break(outcome) => return outcome,
                ControlFlow::Continue(Some(reason)) => {
                    tracing::debug!(%key, peer = %c, %reason, "peer did not take the task");
                }
                ControlFlow::Continue(None) => {}
            }
        }
        if local_ok {
            return Election::Local;
        }
    }
    Election::Failed(last_error.unwrap_or_else(|| {
        let why = match (seeds_asked, seed_refusal) {
            (0, _) => "no trusted seed is connected".to_owned(),
            (n, Some(r)) => format!("{n} seed(s) asked; the last answered: {r}"),
            (n, None) => format!("{n} seed(s) asked"),
        };
        TaskError::NoSource {
            message: format!(
                "no seed or peer has this content or could fetch it, and back-to-source is \
                 disabled ({why})"
            ),
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use df_protocols::control::{ControlError, ErrorCode, OriginRequest};
    use df_protocols::manifest::TaskHeader;
    use df_protocols::task::parse_url;
    use libp2p::identity::Keypair;
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// How a fake candidate answers each request, in turn (the last one repeats).
    #[derive(Clone)]
    enum Reply {
        Accept,
        Decline,
        Status(u16),
        Unreachable,
        /// Fails after this long.
        FailAfter(Duration),
        Silent,
    }

    struct FakeNet {
        connected: Vec<PeerId>,
        seeds: Vec<PeerId>,
        replies: HashMap<PeerId, Vec<Reply>>,
        /// Who was asked, in order.
        asked: Mutex<Vec<PeerId>>,
        key: TaskKey,
    }

    impl FakeNet {
        fn asked(&self) -> Vec<PeerId> {
            self.asked.lock().unwrap().clone()
        }
    }

    fn header(key: TaskKey, producer: &Keypair) -> SignedHeader {
        TaskHeader {
            task: key,
            source_url: "http://o/f".into(),
            content_length: 1,
            piece_length: df_protocols::limits::MIN_PIECE_LENGTH,
            content_digest: None,
            validators: Default::default(),
            producer: producer.public().to_peer_id(),
        }
        .sign(producer)
        .unwrap()
    }

    impl Electorate for FakeNet {
        fn connected_peers(&self) -> Vec<PeerId> {
            self.connected.clone()
        }

        fn seeds(&self) -> Vec<PeerId> {
            self.seeds.clone()
        }

        async fn ask(
            &self,
            peer: PeerId,
            req: ControlRequest,
        ) -> Result<ControlResponse, NetworkError> {
            assert!(matches!(req, ControlRequest::StartTask { .. }));
            let n = {
                let mut asked = self.asked.lock().unwrap();
                asked.push(peer);
                asked.iter().filter(|p| **p == peer).count()
            };
            let replies = &self.replies[&peer];
            let reply = replies[(n - 1).min(replies.len() - 1)].clone();
            let refused = |message: &str| {
                Ok(ControlResponse::Error(ControlError {
                    code: ErrorCode::Declined,
                    message: message.into(),
                    origin_status: None,
                }))
            };
            match reply {
                Reply::Accept => Ok(ControlResponse::Started {
                    header: header(self.key, &Keypair::generate_ed25519()),
                }),
                Reply::Decline => refused("busy"),
                Reply::Status(status) => Ok(ControlResponse::Error(ControlError {
                    code: ErrorCode::OriginStatus,
                    message: "not found".into(),
                    origin_status: Some(status),
                })),
                Reply::Unreachable => Err(NetworkError::Request {
                    peer,
                    reason: "connection closed".into(),
                }),
                Reply::FailAfter(d) => {
                    tokio::time::sleep(d).await;
                    Err(NetworkError::Request {
                        peer,
                        reason: "connection reset".into(),
                    })
                }
                Reply::Silent => std::future::pending().await,
            }
        }
    }

    fn key() -> TaskKey {
        TaskKey::for_url(&parse_url("http://o/f").unwrap(), "")
    }

    fn peers(n: usize) -> Vec<PeerId> {
        let mut v: Vec<PeerId> = (0..n).map(|_| PeerId::random()).collect();
        super::super::owners::owner_order(&key(), &mut v);
        v
    }

    fn ballot(me: PeerId, role: Role, local_ok: bool, seedless_ok: bool) -> Ballot {
        Ballot {
            key: key(),
            me,
            role,
            start: ControlRequest::StartTask {
                task: key(),
                origin: OriginRequest {
                    url: "http://o/f".into(),
                    headers: Vec::new(),
                    tag: String::new(),
                    filtered_query_params: Vec::new(),
                    digest: None,
                },
                missing: Vec::new(),
            },
            candidates: Candidates {
                exclude: HashSet::new(),
                may_ask: Box::new(|_| true),
            },
            local_ok,
            seedless_ok,
        }
    }

    fn net(connected: &[PeerId], seeds: &[PeerId], replies: &[(PeerId, Vec<Reply>)]) -> FakeNet {
        FakeNet {
            connected: connected.to_vec(),
            seeds: seeds.to_vec(),
            replies: replies.iter().cloned().collect(),
            asked: Mutex::new(Vec::new()),
            key: key(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn seeds_are_asked_closest_first_and_the_first_that_accepts_produces() {
        let s = peers(3);
        let me = PeerId::random();
        let n = net(
            &s,
            &s,
            &[
                (s[0], vec![Reply::Decline]),
                (s[1], vec![Reply::Accept]),
                (s[2], vec![Reply::Accept]),
            ],
        );
        match run(&n, ballot(me, Role::Node, true, true)).await {
            Election::Started { producer, .. } => assert_eq!(producer, s[1]),
            _ => panic!("the second seed accepted"),
        }
        assert_eq!(n.asked(), vec![s[0], s[1]]);
    }

    #[tokio::test(start_paused = true)]
    async fn untrusted_excluded_and_unconnected_seeds_are_not_asked() {
        let s = peers(4);
        let me = PeerId::random();
        // s[3] is a seed this node is not connected to.
        let n = net(
            &s[..3],
            &s,
            &[
                (s[0], vec![Reply::Accept]),
                (s[1], vec![Reply::Accept]),
                (s[2], vec![Reply::Accept]),
            ],
        );
        let mut b = ballot(me, Role::Node, false, false);
        b.candidates.exclude.insert(s[0]);
        let untrusted = s[1];
        b.candidates.may_ask = Box::new(move |p| *p != untrusted);
        match run(&n, b).await {
            Election::Started { producer, .. } => assert_eq!(producer, s[2]),
            _ => panic!("only s[2] may be asked"),
        }
        assert_eq!(n.asked(), vec![s[2]]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_origin_status_ends_the_election_at_once() {
        let s = peers(2);
        let n = net(
            &s,
            &s,
            &[
                (s[0], vec![Reply::Status(404)]),
                (s[1], vec![Reply::Accept]),
            ],
        );
        match run(&n, ballot(PeerId::random(), Role::Node, true, true)).await {
            Election::Failed(TaskError::OriginStatus { status, .. }) => assert_eq!(status, 404),
            _ => panic!("the origin's 404 is everyone's answer"),
        }
        assert_eq!(n.asked(), vec![s[0]]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_fails_at_once_is_sent_again_one_that_fails_late_is_not() {
        let s = peers(2);
        let n = net(
            &s,
            &s,
            &[
                (
                    s[0],
                    vec![Reply::Unreachable, Reply::Unreachable, Reply::Accept],
                ),
                (s[1], vec![Reply::Accept]),
            ],
        );
        match run(&n, ballot(PeerId::random(), Role::Node, true, true)).await {
            Election::Started { producer, .. } => assert_eq!(producer, s[0]),
            _ => panic!("the third attempt was accepted"),
        }
        assert_eq!(n.asked(), vec![s[0], s[0], s[0]]);

        // Fails after more than RETRY_IF_FASTER: the next seed is asked instead.
        let n = net(
            &s,
            &s,
            &[
                (
                    s[0],
                    vec![
                        Reply::FailAfter(RETRY_IF_FASTER + Duration::from_millis(1)),
                        Reply::Accept,
                    ],
                ),
                (s[1], vec![Reply::Accept]),
            ],
        );
        match run(&n, ballot(PeerId::random(), Role::Node, true, true)).await {
            Election::Started { producer, .. } => assert_eq!(producer, s[1]),
            _ => panic!("s[1] was next"),
        }
        assert_eq!(n.asked(), vec![s[0], s[1]]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_seed_is_given_up_after_the_timeout() {
        let s = peers(2);
        let n = net(
            &s,
            &s,
            &[(s[0], vec![Reply::Silent]), (s[1], vec![Reply::Accept])],
        );
        let began = tokio::time::Instant::now();
        match run(&n, ballot(PeerId::random(), Role::Node, true, true)).await {
            Election::Started { producer, .. } => assert_eq!(producer, s[1]),
            _ => panic!("s[1] was next"),
        }
        assert_eq!(began.elapsed(), ASK_TIMEOUT, "one timeout, no retry");
        assert_eq!(n.asked(), vec![s[0], s[1]]);
    }

    #[tokio::test(start_paused = true)]
    async fn with_no_seed_the_closest_connected_peer_or_this_node_produces() {
        let p = peers(3);
        // This node ranks between p[0] and p[2] for some identity; find one that ranks second.
        let me = loop {
            let me = PeerId::random();
            let mut all = vec![p[0], p[2], me];
            super::super::owners::owner_order(&key(), &mut all);
            if all == [p[0], me, p[2]] {
                break me;
            }
        };
        let n = net(
            &[p[0], p[2]],
            &[],
            &[(p[0], vec![Reply::Decline]), (p[2], vec![Reply::Accept])],
        );
        assert!(matches!(
            run(&n, ballot(me, Role::Node, true, true)).await,
            Election::Local
        ));
        assert_eq!(n.asked(), vec![p[0]], "p[2] ranks after this node");

        // An ephemeral node (the CLI's own) never produces: p[2] is asked.
        let n = net(
            &[p[0], p[2]],
            &[],
            &[(p[0], vec![Reply::Decline]), (p[2], vec![Reply::Accept])],
        );
        match run(&n, ballot(me, Role::Ephemeral, true, true)).await {
            Election::Started { producer, .. } => assert_eq!(producer, p[2]),
            _ => panic!("p[2] accepted"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_seed_produces_itself_and_without_the_origin_nobody_does() {
        let s = peers(1);
        let n = net(&s, &s, &[(s[0], vec![Reply::Accept])]);
        assert!(matches!(
            run(&n, ballot(PeerId::random(), Role::Seed, true, true)).await,
            Election::Local
        ));
        assert!(n.asked().is_empty());

        // Back-to-source disabled and the only seed declines: a clear failure naming why.
        let n = net(&s, &s, &[(s[0], vec![Reply::Decline])]);
        match run(&n, ballot(PeerId::random(), Role::Node, false, false)).await {
            Election::Failed(TaskError::NoSource { message }) => {
                assert!(
                    message.contains("1 seed(s) asked; the last answered: busy"),
                    "{message}"
                )
            }
            _ => panic!("nobody may fetch the origin"),
        }
        let n = net(&[], &[], &[]);
        match run(&n, ballot(PeerId::random(), Role::Node, false, false)).await {
            Election::Failed(TaskError::NoSource { message }) => {
                assert!(
                    message.contains("no trusted seed is connected"),
                    "{message}"
                )
            }
            _ => panic!("nobody may fetch the origin"),
        }
    }
}
