//! Every data-plane decoder against random, truncated and extended input: no panics, no lengths
//! above the caps, and valid encodings round-trip.

use df_protocols::limits::{MAX_PIECE_LENGTH, MAX_TASK_KEY_BYTES};
use df_protocols::transfer::{
    AccessToken, CHALLENGE_LEN, Grant, HANDSHAKE_HEAD_LEN, HandshakeStatus, MAX_HANDSHAKE_LEN,
    MAX_PEER_ID_BYTES, MAX_REQUEST_LEN, NONCE_LEN, PieceStatus, RESPONSE_HEADER_LEN, TOKEN_LEN,
    TransferError, decode_challenge, decode_handshake, decode_request, decode_response_header,
    encode_challenge, encode_handshake, encode_request, encode_response_header, handshake_len,
    request_len, verify_handshake_proof,
};
use proptest::prelude::*;

fn any_grant() -> impl Strategy<Value = Grant> {
    (any::<[u8; TOKEN_LEN]>(), any::<u64>()).prop_map(|(t, expires)| Grant {
        token: AccessToken(t),
        expires,
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_challenges_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..100)) {
        let r = decode_challenge(&buf);
        if buf.len() != CHALLENGE_LEN {
            prop_assert!(r.is_err());
        }
    }

    #[test]
    fn challenges_round_trip_and_truncations_fail(nonce in any::<[u8; NONCE_LEN]>(), cut in 0..CHALLENGE_LEN) {
        let c = encode_challenge(&nonce);
        prop_assert_eq!(decode_challenge(&c), Ok(nonce));
        let truncated = matches!(decode_challenge(&c[..cut]), Err(TransferError::Truncated { .. }));
        prop_assert!(truncated);
    }

    #[test]
    fn random_handshakes_never_panic_nor_ask_beyond_the_cap(
        buf in proptest::collection::vec(any::<u8>(), 0..(MAX_HANDSHAKE_LEN + 20)),
        magic in any::<bool>(),
    ) {
        let mut buf = buf;
        if magic && buf.len() >= 4 {
            buf[..4].copy_from_slice(b"DFX2");
        }
        if let Ok(n) = handshake_len(&buf) {
            prop_assert!(n <= MAX_HANDSHAKE_LEN);
            prop_assert!(n > HANDSHAKE_HEAD_LEN);
        }
        if let Ok(h) = decode_handshake(&buf) {
            prop_assert!(!h.peer_id.is_empty() && h.peer_id.len() <= MAX_PEER_ID_BYTES);
            prop_assert_eq!(handshake_len(&buf), Ok(buf.len()));
        }
    }

    #[test]
    fn handshakes_round_trip_and_truncations_fail(
        peer in proptest::collection::vec(any::<u8>(), 1..=MAX_PEER_ID_BYTES),
        grant in any_grant(),
        nonce in any::<[u8; NONCE_LEN]>(),
        cut in any::<prop::sample::Index>(),
        extra in proptest::collection::vec(any::<u8>(), 1..8),
    ) {
        let hs = encode_handshake(&peer, &grant, &nonce).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(handshake_len(&hs[..HANDSHAKE_HEAD_LEN]), Ok(hs.len()));
        let d = decode_handshake(&hs).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(d.peer_id, &peer[..]);
        prop_assert_eq!(d.expires, grant.expires);
        prop_assert!(verify_handshake_proof(&grant.token, &nonce, d.peer_id, d.expires, &d.proof));
        let cut = cut.index(hs.len());
        prop_assert!(decode_handshake(&hs[..cut]).is_err());
        let mut longer = hs.clone();
        longer.extend_from_slice(&extra);
        let trailing = matches!(decode_handshake(&longer), Err(TransferError::TrailingBytes { .. }));
        prop_assert!(trailing);
    }

    #[test]
    fn random_requests_never_panic_nor_ask_beyond_the_cap(
        buf in proptest::collection::vec(any::<u8>(), 0..(MAX_REQUEST_LEN + 20)),
        first in any::<u8>(),
    ) {
        if let Ok(n) = request_len(first) {
            prop_assert!(n <= MAX_REQUEST_LEN);
        }
        if let Ok(r) = decode_request(&buf) {
            prop_assert!(!r.task_key.is_empty() && r.task_key.len() <= MAX_TASK_KEY_BYTES);
            prop_assert_eq!(request_len(buf[0]), Ok(buf.len()));
        }
    }

    #[test]
    fn requests_round_trip_and_truncations_fail(
        key in proptest::collection::vec(any::<u8>(), 1..=MAX_TASK_KEY_BYTES),
        index in any::<u32>(),
        cut in any::<prop::sample::Index>(),
    ) {
        let r = encode_request(&key, index).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(request_len(r[0]), Ok(r.len()));
        let d = decode_request(&r).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(d.task_key, &key[..]);
        prop_assert_eq!(d.index, index);
        prop_assert!(decode_request(&r[..cut.index(r.len())]).is_err());
    }

    #[test]
    fn random_response_headers_never_panic_nor_exceed_the_piece_cap(
        buf in proptest::collection::vec(any::<u8>(), 0..12),
    ) {
        if let Ok((_, len)) = decode_response_header(&buf) {
            prop_assert_eq!(buf.len(), RESPONSE_HEADER_LEN);
            prop_assert!(len <= MAX_PIECE_LENGTH);
        }
    }

    #[test]
    fn response_headers_round_trip(status in 0u8..4, len in 0..=MAX_PIECE_LENGTH, cut in 0..RESPONSE_HEADER_LEN) {
        let status = PieceStatus::from_byte(status).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let h = encode_response_header(status, len);
        prop_assert_eq!(decode_response_header(&h), Ok((status, len)));
        prop_assert!(decode_response_header(&h[..cut]).is_err());
    }

    #[test]
    fn status_bytes_never_panic(b in any::<u8>()) {
        match PieceStatus::from_byte(b) {
            Ok(s) => prop_assert_eq!(s.to_byte(), b),
            Err(e) => prop_assert_eq!(e, TransferError::UnknownStatus(b)),
        }
        match HandshakeStatus::from_byte(b) {
            Ok(s) => prop_assert_eq!(s.to_byte(), b),
            Err(e) => prop_assert_eq!(e, TransferError::UnknownHandshakeStatus(b)),
        }
    }
}
