//! Size limits for everything read from the network. A message over its limit is rejected before it
//! is parsed; a list inside a message is rejected while it is parsed, as soon as it has more
//! elements than its limit; other values inside a parsed message are checked against these bounds
//! before use.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserialize, Deserializer, Error as _, SeqAccess, Visitor};

/// Smallest piece length df chooses for its own tasks (512 KiB). Peers may announce smaller ones.
pub const MIN_PIECE_LENGTH: u32 = 512 << 10;
/// Largest piece length accepted from anyone (64 MiB); also bounds one data-plane response.
pub const MAX_PIECE_LENGTH: u32 = 64 << 20;
/// Most pieces a task may have (with 64 MiB pieces: 4 TiB of content).
pub const MAX_PIECES: u32 = 1 << 16;
/// Longest binary task key (a CIDv1 with a sha2-512 multihash is 68 bytes).
pub const MAX_TASK_KEY_BYTES: usize = 80;
/// Largest control request or response (a full task state with [`MAX_PIECES`] signed hashes).
pub const MAX_CONTROL_MESSAGE: usize = 32 << 20;
/// Largest gossipsub message.
pub const MAX_GOSSIP_MESSAGE: usize = 1 << 20;
/// Most signed piece hashes in one gossip message.
pub const MAX_HASHES_PER_GOSSIP: usize = 2048;
/// Longest origin URL accepted.
pub const MAX_URL_LEN: usize = 8 << 10;
/// Most request headers forwarded to an origin.
pub const MAX_ORIGIN_HEADERS: usize = 64;
/// Largest total size of the headers forwarded to an origin.
pub const MAX_ORIGIN_HEADER_BYTES: usize = 64 << 10;
/// Longest error message carried in a control response.
pub const MAX_ERROR_MESSAGE: usize = 4 << 10;

/// Deserialises a list that fails as soon as it has more than `max` elements, so a hostile message
/// cannot make it grow past its limit before it is validated.
struct BoundedVec<T> {
    max: usize,
    what: &'static str,
    element: PhantomData<T>,
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for BoundedVec<T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a list of at most {} {}", self.max, self.what)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let mut out = Vec::new();
        while let Some(x) = seq.next_element()? {
            if out.len() == self.max {
                return Err(A::Error::custom(format_args!(
                    "more than {} {}",
                    self.max, self.what
                )));
            }
            out.push(x);
        }
        Ok(out)
    }
}

fn bounded_vec<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
    max: usize,
    what: &'static str,
) -> Result<Vec<T>, D::Error> {
    d.deserialize_seq(BoundedVec {
        max,
        what,
        element: PhantomData,
    })
}

/// A list with at most [`MAX_PIECES`] elements (piece indexes, piece hashes, hash batches).
pub(crate) fn at_most_max_pieces<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Vec<T>, D::Error> {
    bounded_vec(d, MAX_PIECES as usize, "pieces")
}

/// [`at_most_max_pieces`] for an optional field (`#[serde(default)]` makes an absent one `None`).
pub(crate) fn some_at_most_max_pieces<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Vec<T>>, D::Error> {
    at_most_max_pieces(d).map(Some)
}

/// A list with at most [`MAX_ORIGIN_HEADERS`] elements (origin headers, filtered query parameters).
pub(crate) fn at_most_max_origin_headers<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Vec<T>, D::Error> {
    bounded_vec(d, MAX_ORIGIN_HEADERS, "entries")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    struct Pieces {
        #[serde(deserialize_with = "at_most_max_pieces")]
        p: Vec<u32>,
    }

    fn json_with(n: usize) -> String {
        format!("{{\"p\":[{}]}}", vec!["7"; n].join(","))
    }

    #[test]
    fn bounded_lists_accept_their_limit_and_reject_one_more() {
        let ok: Pieces = serde_json::from_str(&json_with(MAX_PIECES as usize)).unwrap();
        assert_eq!(ok.p.len(), MAX_PIECES as usize);
        let err = serde_json::from_str::<Pieces>(&json_with(MAX_PIECES as usize + 1)).unwrap_err();
        assert!(err.to_string().contains("more than"), "{err}");
        assert!(serde_json::from_str::<Pieces>(r#"{"p":"no"}"#).is_err());
    }
}
