//! Size limits for everything read from the network. A message over its limit is rejected before it
//! is parsed; values inside a parsed message are checked against these bounds before use.

/// Smallest piece length df chooses for its own tasks (4 MiB). Peers may announce smaller ones.
pub const MIN_PIECE_LENGTH: u32 = 4 << 20;
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
