//! Which seeds own a task: the live seeds in XOR order of distance between their peer IDs and the
//! task key (Kademlia's metric). The first owner fetches the origin; the next `replicas - 1` hold
//! replicas fetched from it and the swarm, and take over in that order when it vanishes.
//!
//! Every node ranks the seeds it sees the same way, without coordination. A seed that joins ranks
//! before the others only for the tasks it is closest to; one that leaves moves only the tasks it
//! owned (to their next owner): like rendezvous hashing, and unlike a modulo or a ring walk, no
//! other task changes hands.

use df_protocols::task::TaskKey;
use libp2p::PeerId;
use libp2p::kad::KBucketKey;

/// Sorts `peers` by XOR distance to `key`, closest first.
pub fn owner_order(key: &TaskKey, peers: &mut [PeerId]) {
    let target = KBucketKey::new(key.to_bytes());
    peers.sort_by_key(|p| KBucketKey::from(*p).distance(&target));
}

/// The seeds a node is connected to and trusts as producers, in `key`'s owner order: whom it
/// asks to fetch an origin or to hold a replica.
pub(crate) fn live_trusted_seeds(
    state: &crate::network::NetState,
    trust: &crate::trust::TrustPolicy,
    key: &TaskKey,
) -> Vec<PeerId> {
    let connected: std::collections::HashSet<PeerId> =
        state.connected_peers().into_iter().collect();
    let mut seeds: Vec<PeerId> = state
        .seeds()
        .into_iter()
        .filter(|s| connected.contains(s) && trust.trusts_producer(s))
        .collect();
    owner_order(key, &mut seeds);
    seeds
}

/// The first `n` owners of `key` among `seeds`, in order.
pub fn owners(key: &TaskKey, seeds: &[PeerId], n: usize) -> Vec<PeerId> {
    let mut v = seeds.to_vec();
    owner_order(key, &mut v);
    v.dedup();
    v.truncate(n);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use df_protocols::task::parse_url;

    fn key(i: usize) -> TaskKey {
        TaskKey::for_url(&parse_url(&format!("http://origin/file-{i}")).unwrap(), "")
    }

    fn seeds(n: usize) -> Vec<PeerId> {
        (0..n).map(|_| PeerId::random()).collect()
    }

    #[test]
    fn every_node_ranks_the_same_owners_whatever_order_it_learned_the_seeds_in() {
        let s = seeds(5);
        let mut rev = s.clone();
        rev.reverse();
        for i in 0..50 {
            assert_eq!(owners(&key(i), &s, 2), owners(&key(i), &rev, 2));
        }
        assert_eq!(owners(&key(0), &s, 9).len(), 5);
    }

    #[test]
    fn a_joining_seed_takes_only_tasks_it_becomes_an_owner_of() {
        let before = seeds(3);
        let newcomer = PeerId::random();
        let mut after = before.clone();
        after.push(newcomer);
        let mut taken = 0;
        for i in 0..400 {
            let (old, new) = (owners(&key(i), &before, 2), owners(&key(i), &after, 2));
            if new.contains(&newcomer) {
                taken += 1;
                // The other owners keep their relative order.
                let rest: Vec<_> = new.iter().filter(|p| **p != newcomer).copied().collect();
                assert_eq!(rest, old[..rest.len()]);
            } else {
                assert_eq!(old, new, "task {i} moved between old seeds");
            }
        }
        // With 4 seeds and 2 owners each, the newcomer owns about half the tasks.
        assert!((120..=280).contains(&taken), "newcomer owns {taken} of 400");
    }

    #[test]
    fn a_leaving_seed_moves_only_its_tasks_to_their_next_owner() {
        let all = seeds(4);
        let gone = all[0];
        let rest: Vec<_> = all[1..].to_vec();
        for i in 0..400 {
            let full = owners(&key(i), &all, 4);
            let after = owners(&key(i), &rest, 3);
            let expect: Vec<_> = full.into_iter().filter(|p| *p != gone).collect();
            assert_eq!(after, expect, "task {i}");
        }
    }
}
