//! The `/df/control/1` codec: big-endian u32 length + JSON, lengths checked before reading.

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

async fn read_frame<T: AsyncRead + Unpin + Send>(io: &mut T) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = control::check_length(u32::from_be_bytes(len)).map_err(invalid)?;
    let mut body = vec![0u8; len];
    io.read_exact(&mut body).await?;
    Ok(body)
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

#[cfg(test)]
mod tests {
    use super::*;
    use df_protocols::task::{TaskKey, parse_url};
    use futures::io::Cursor;
    use libp2p::request_response::Codec;

    #[tokio::test]
    async fn oversized_length_prefix_is_rejected_without_allocating() {
        let mut io = Cursor::new(u32::MAX.to_be_bytes().to_vec());
        let err = ControlCodec
            .read_request(&PROTOCOL, &mut io)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn request_round_trips_and_truncation_fails() {
        let req = ControlRequest::GetTask {
            task: TaskKey::for_url(&parse_url("http://h/f").unwrap(), ""),
        };
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
}
