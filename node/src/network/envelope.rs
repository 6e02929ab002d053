//! Gossip envelopes: a task topic's messages are signed by their publisher at the application
//! layer, and checked once per message instead of once per copy.
//!
//! gossipsub's own signatures (`MessageAuthenticity::Signed` with strict validation) are checked
//! in its codec, for every copy a node receives, before duplicates are dropped: with flood
//! publishing and a mesh of 4, each message arrived about 5 times, and Ed25519 verification took
//! 14.5 % of all CPU in a 16-peer testnet bench (`perf`). So df publishes with
//! `MessageAuthenticity::Author` (the source's peer ID and a random sequence number, unsigned),
//! and puts its own signature in the message data:
//!
//! ```text
//! data = signature (64 bytes, Ed25519) | body (a GossipMessage)
//! signature over "df-gossip-v2" | u16 BE topic length | topic | body
//! ```
//!
//! The node checks it when gossipsub hands the message over, which happens once per message ID,
//! after duplicates are dropped. That is only safe because message IDs are derived from the
//! content ([`message_id`]: a hash over source, sequence number, topic and data): with the
//! default IDs (source and sequence number only), a member could send a forged copy under a
//! genuine message's ID first, have it rejected, and so make every node drop the genuine one as
//! a duplicate. With content IDs a forgery has an ID of its own and is rejected alone (its
//! sender loses gossipsub score), and the genuine message still gets through.
//!
//! A member can re-publish another's sealed message under a new sequence number (a replay).
//! That tells nothing new: a `Have` only ever adds pieces the source held, and headers and
//! piece hashes carry their producer's own signatures and are idempotent.

use libp2p::PeerId;
use libp2p::gossipsub::{self, MessageId};
use libp2p::identity::{Keypair, PublicKey};
use sha2::{Digest, Sha256};

const DOMAIN: &[u8] = b"df-gossip-v2";
/// Length of an Ed25519 signature, the envelope's head.
pub(crate) const SIGNATURE_LEN: usize = 64;

/// Why an envelope could not be made.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SealError {
    #[error("signing gossip failed: {0}")]
    Sign(String),
    #[error("the node's key makes {0}-byte signatures; gossip envelopes need Ed25519 (64)")]
    KeyType(usize),
}

fn signed_bytes(topic: &str, body: &[u8]) -> Vec<u8> {
    let topic = topic.as_bytes();
    let mut b = Vec::with_capacity(DOMAIN.len() + 2 + topic.len() + body.len());
    b.extend_from_slice(DOMAIN);
    // Topics are task topics (`/df/task/2/<key>`), far below 64 KiB.
    b.extend_from_slice(&(topic.len().min(usize::from(u16::MAX)) as u16).to_be_bytes());
    b.extend_from_slice(topic);
    b.extend_from_slice(body);
    b
}

/// The data to publish on `topic` for `body`, signed with `key`.
pub(crate) fn seal(key: &Keypair, topic: &str, body: &[u8]) -> Result<Vec<u8>, SealError> {
    let signature = key
        .sign(&signed_bytes(topic, body))
        .map_err(|e| SealError::Sign(e.to_string()))?;
    if signature.len() != SIGNATURE_LEN {
        return Err(SealError::KeyType(signature.len()));
    }
    let mut data = Vec::with_capacity(SIGNATURE_LEN + body.len());
    data.extend_from_slice(&signature);
    data.extend_from_slice(body);
    Ok(data)
}

/// The public key a peer ID inlines (every Ed25519 key's does), if any: the ID's bytes are then
/// an identity multihash (code 0, a one-byte length) of the protobuf-encoded key.
fn inlined_key(peer: &PeerId) -> Option<PublicKey> {
    let b = peer.to_bytes();
    match b.as_slice() {
        [0x00, len, key @ ..] if *len < 0x80 && key.len() == usize::from(*len) => {
            PublicKey::try_decode_protobuf(key).ok()
        }
        _ => None,
    }
}

/// The body of `data` received on `topic` from `source`, if `source` signed it.
pub(crate) fn open<'a>(source: &PeerId, topic: &str, data: &'a [u8]) -> Option<&'a [u8]> {
    if data.len() < SIGNATURE_LEN {
        return None;
    }
    let (signature, body) = data.split_at(SIGNATURE_LEN);
    let key = inlined_key(source)?;
    key.verify(&signed_bytes(topic, body), signature)
        .then_some(body)
}

/// gossipsub message IDs: the first 20 bytes of SHA-256 over the source, the sequence number,
/// the topic and the data (see the module notes for why not source and sequence number alone).
pub(crate) fn message_id(m: &gossipsub::Message) -> MessageId {
    let mut h = Sha256::new();
    match &m.source {
        Some(p) => {
            let b = p.to_bytes();
            h.update([1u8, b.len() as u8]);
            h.update(&b);
        }
        None => h.update([0u8]),
    }
    h.update(m.sequence_number.unwrap_or(0).to_be_bytes());
    let topic = m.topic.as_str().as_bytes();
    h.update((topic.len() as u64).to_be_bytes());
    h.update(topic);
    h.update(&m.data);
    MessageId::from(&h.finalize()[..20])
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOPIC: &str = "/df/task/2/abc";

    #[test]
    fn a_sealed_body_opens_for_its_source_topic_and_bytes_only() {
        let alice = Keypair::generate_ed25519();
        let mallory = Keypair::generate_ed25519();
        let a = alice.public().to_peer_id();
        let data = seal(&alice, TOPIC, b"{\"have\":1}").unwrap();
        assert_eq!(open(&a, TOPIC, &data), Some(&b"{\"have\":1}"[..]));
        // Claimed by someone else (a member forging alice's haves, or alice's as its own).
        let forged = seal(&mallory, TOPIC, b"{\"have\":1}").unwrap();
        assert_eq!(open(&a, TOPIC, &forged), None);
        assert_eq!(open(&mallory.public().to_peer_id(), TOPIC, &data), None);
        // Moved to another task's topic.
        assert_eq!(open(&a, "/df/task/2/abd", &data), None);
        // A byte of the body or of the signature changed.
        let mut bad = data.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(open(&a, TOPIC, &bad), None);
        let mut bad = data.clone();
        bad[3] ^= 1;
        assert_eq!(open(&a, TOPIC, &bad), None);
        // Too short to hold a signature; unsigned.
        assert_eq!(open(&a, TOPIC, &data[..SIGNATURE_LEN - 1]), None);
        assert_eq!(open(&a, TOPIC, b"{\"have\":1}"), None);
        // An empty body is still signed.
        let empty = seal(&alice, TOPIC, b"").unwrap();
        assert_eq!(open(&a, TOPIC, &empty), Some(&b""[..]));
    }

    #[test]
    fn a_peer_id_without_an_inlined_key_opens_nothing() {
        let alice = Keypair::generate_ed25519();
        let data = seal(&alice, TOPIC, b"x").unwrap();
        // A peer ID that is a SHA-256 multihash (as for RSA keys) names no key to check with.
        let mut sha = vec![0x12, 0x20];
        sha.extend_from_slice(&[7u8; 32]);
        let hashed = PeerId::from_bytes(&sha).unwrap();
        assert_eq!(open(&hashed, TOPIC, &data), None);
    }

    #[test]
    fn message_ids_follow_the_content() {
        let p = PeerId::random();
        let msg = |data: &[u8], seq| gossipsub::Message {
            source: Some(p),
            data: data.to_vec(),
            sequence_number: Some(seq),
            topic: gossipsub::TopicHash::from_raw(TOPIC),
        };
        let id = message_id(&msg(b"a", 1));
        assert_eq!(id, message_id(&msg(b"a", 1)), "a copy is a duplicate");
        // A forgery under the same source and sequence number is another message.
        assert_ne!(id, message_id(&msg(b"b", 1)));
        assert_ne!(id, message_id(&msg(b"a", 2)));
        let mut other_topic = msg(b"a", 1);
        other_topic.topic = gossipsub::TopicHash::from_raw("/df/task/2/abd");
        assert_ne!(id, message_id(&other_topic));
    }
}
