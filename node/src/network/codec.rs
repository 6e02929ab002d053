//! The `/df/control/1` codec: big-endian u32 length + JSON, lengths checked before reading.
//!
//! A body is read in chunks of at most [`READ_CHUNK`] bytes, each allocated only once the previous
//! one is full: a peer that announces a large frame and sends little makes this side hold what it
//! sent plus one chunk, not the announced length.

use std::io;

use df_protocols::control::{
    self, CONTROL_PROTOCOL, ControlCodecError, ControlRequest, ControlResponse,
};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;

#[derive(Clone, Default)]
pub(crate) struct ControlCodec;

pub(crate) const PROTOCOL: StreamProtocol = StreamProtocol::new(CONTROL_PROTOCOL);

fn invalid(e: ControlCodecError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Most bytes of a frame body allocated ahead of their arrival.
const READ_CHUNK: usize = 64 << 10;

async fn read_frame<T: AsyncRead + Unpin + Send>(io: &mut T) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = control::check_length(u32::from_be_bytes(len)).map_err(invalid)?;
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    let mut remaining = len;
    while remaining > 0 {
        let mut chunk = vec![0u8; remaining.min(READ_CHUNK)];
        io.read_exact(&mut chunk).await?;
        remaining -= chunk.len();
        chunks.push(chunk);
    }
    // The whole announced body has arrived: one allocation of exactly its size.
    if chunks.len() <= 1 {
        return Ok(chunks.pop().unwrap_or_default());
    }
    Ok(chunks.concat())
}

async fn write_frame<T: AsyncWrite + Unpin + Send>(io: &mut T, body: &[u8]) -> io::Result<()> {
    let len = u32::try_from(body.len()).map_err(|_| io::Error::other("frame too large"))?;
    io.write_all(&len.to_be_bytes()).await?;
    io.write_all(body).await?;
    io.close().await
}

impl libp2p::request_response::Codec for ControlCodec {
    type Protocol = StreamProtocol;
    type Request = ControlRequest;
    type Response = ControlResponse;

    async fn read_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<ControlRequest>
    where
        T: AsyncRead + Unpin + Send,
    {
        control::decode_request(&read_frame(io).await?).map_err(invalid)
    }

    async fn read_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<ControlResponse>
    where
        T: AsyncRead + Unpin + Send,
    {
        control::decode_response(&read_frame(io).await?).map_err(invalid)
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: ControlRequest,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &control::encode(&req).map_err(invalid)?).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        resp: ControlResponse,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &control::encode(&resp).map_err(invalid)?).await
    }
}

/// The counting test allocator shared with protocols/tests/decoders.rs (declared here, at file
/// level, so that the path is relative to this file's directory).
#[cfg(test)]
#[allow(unsafe_code)]
#[path = "../../../protocols/tests/support/counting.rs"]
mod counting;

#[cfg(test)]
mod tests {
    use super::*;
    use df_protocols::control::OriginRequest;
    use df_protocols::limits::MAX_CONTROL_MESSAGE;
    use df_protocols::task::{TaskKey, parse_url};
    use futures::executor::block_on;
    use futures::io::Cursor;
    use libp2p::request_response::Codec;
    use proptest::prelude::*;

    /// This test binary's allocator: the system allocator, counting per thread the bytes live and
    /// their peak, so a test can check how much a piece of code allocated.
    #[global_allocator]
    static ALLOCATOR: counting::Counting = counting::Counting;

    use super::counting;

    /// Allowance for small allocations beside the body (the chunk list, an error).
    const SLACK: usize = 4 << 10;

    fn frame(announced: u32, body: &[u8]) -> Vec<u8> {
        let mut out = announced.to_be_bytes().to_vec();
        out.extend_from_slice(body);
        out
    }

    fn key() -> TaskKey {
        TaskKey::for_url(&parse_url("http://h/f").unwrap(), "")
    }

    #[test]
    fn oversized_length_prefix_is_rejected_without_allocating() {
        let mut io = Cursor::new(u32::MAX.to_be_bytes().to_vec());
        let (res, peak) =
            counting::peak_during(|| block_on(ControlCodec.read_request(&PROTOCOL, &mut io)));
        assert_eq!(res.unwrap_err().kind(), io::ErrorKind::InvalidData);
        assert!(peak <= SLACK, "allocated {peak} bytes");
    }

    #[test]
    fn announced_length_is_not_allocated_before_it_arrives() {
        let sent = 100 << 10;
        let announced = u32::try_from(MAX_CONTROL_MESSAGE).unwrap();
        let mut io = Cursor::new(frame(announced, &vec![b' '; sent]));
        let (res, peak) = counting::peak_during(|| block_on(read_frame(&mut io)));
        assert_eq!(res.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        assert!(
            peak <= sent + READ_CHUNK + SLACK,
            "allocated {peak} bytes for {sent} received"
        );
    }

    #[test]
    fn multi_chunk_frames_are_read_whole() {
        let body: Vec<u8> = (0..3 * READ_CHUNK + 17).map(|i| (i % 251) as u8).collect();
        let announced = u32::try_from(body.len()).unwrap();
        let got = block_on(read_frame(&mut Cursor::new(frame(announced, &body)))).unwrap();
        assert_eq!(got, body);
    }

    #[tokio::test]
    async fn request_round_trips_and_truncation_fails() {
        let req = ControlRequest::GetTask { task: key() };
        let mut buf = Cursor::new(Vec::new());
        ControlCodec
            .write_request(&PROTOCOL, &mut buf, req.clone())
            .await
            .unwrap();
        let bytes = buf.into_inner();
        let got = ControlCodec
            .read_request(&PROTOCOL, &mut Cursor::new(bytes.clone()))
            .await
            .unwrap();
        assert_eq!(got, req);
        let truncated = bytes[..bytes.len() - 3].to_vec();
        assert!(
            ControlCodec
                .read_request(&PROTOCOL, &mut Cursor::new(truncated))
                .await
                .is_err()
        );
    }

    fn announced_len() -> impl Strategy<Value = u32> {
        prop_oneof![
            0..(3 * READ_CHUNK as u32),
            (MAX_CONTROL_MESSAGE as u32 - 2)..(MAX_CONTROL_MESSAGE as u32 + 2),
            any::<u32>(),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Whatever arrives, a frame is the announced bytes (when they all arrived and the length is
        /// within the cap) or an error; and no more is allocated than arrived plus one chunk.
        #[test]
        fn frames_from_random_input(
            announced in announced_len(),
            body in proptest::collection::vec(any::<u8>(), 0..(2 * READ_CHUNK + 100)),
        ) {
            let input = frame(announced, &body);
            let received = input.len();
            let (res, peak) =
                counting::peak_during(|| block_on(read_frame(&mut Cursor::new(input))));
            let len = announced as usize;
            match res {
                Ok(got) => {
                    prop_assert!(len <= MAX_CONTROL_MESSAGE);
                    prop_assert_eq!(&got[..], &body[..len]);
                    // The chunks and the body they are joined into.
                    prop_assert!(peak <= 2 * len + SLACK, "allocated {} bytes for {}", peak, len);
                }
                Err(e) => {
                    if len > MAX_CONTROL_MESSAGE {
                        prop_assert_eq!(e.kind(), io::ErrorKind::InvalidData);
                    } else {
                        prop_assert!(body.len() < len, "complete frame rejected: {}", e);
                        prop_assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
                    }
                    prop_assert!(
                        peak <= received + READ_CHUNK + SLACK,
                        "allocated {} bytes for {} received", peak, received
                    );
                }
            }
        }

        /// Random bytes, and strict prefixes of encoded messages, are errors, never panics.
        #[test]
        fn truncated_and_random_messages_are_errors(
            url in "http://[a-z]{1,12}/[a-z0-9/]{0,40}",
            missing in proptest::collection::vec(any::<u32>(), 0..50),
            cut in any::<prop::sample::Index>(),
            garbage in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let req = ControlRequest::StartTask {
                task: key(),
                origin: OriginRequest {
                    url,
                    headers: vec![("Authorization".into(), "Bearer x".into())],
                    tag: String::new(),
                    filtered_query_params: vec![],
                    digest: None,
                },
                missing,
            };
            let mut buf = Cursor::new(Vec::new());
            block_on(ControlCodec.write_request(&PROTOCOL, &mut buf, req.clone())).unwrap();
            let bytes = buf.into_inner();
            let got = block_on(ControlCodec.read_request(&PROTOCOL, &mut Cursor::new(bytes.clone())));
            prop_assert_eq!(got.unwrap(), req);
            let cut = cut.index(bytes.len());
            let truncated = bytes[..cut].to_vec();
            prop_assert!(block_on(ControlCodec.read_request(&PROTOCOL, &mut Cursor::new(truncated))).is_err());
            // Garbage after a valid length prefix, and garbage alone.
            let framed = frame(garbage.len() as u32, &garbage);
            let _ = block_on(ControlCodec.read_request(&PROTOCOL, &mut Cursor::new(framed.clone())));
            let _ = block_on(ControlCodec.read_response(&PROTOCOL, &mut Cursor::new(framed)));
            let _ = block_on(ControlCodec.read_response(&PROTOCOL, &mut Cursor::new(garbage)));
        }
    }
}
