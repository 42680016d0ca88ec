//! Length-prefixed framing: a 4-byte big-endian length, then that many bytes of one prost message.
//!
//! The length is checked against a hard limit before any allocation, so a peer cannot make either
//! side reserve more than [`MAX_FRAME_LEN`] bytes per frame.

use bytes::{Bytes, BytesMut};
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Size of the length prefix.
pub const HEADER_LEN: usize = 4;

/// The largest frame body either side accepts. Output chunks are at most [`MAX_CHUNK_LEN`], so this
/// leaves room for the envelope and for large stdin writes or init requests.
pub const MAX_FRAME_LEN: usize = 4 << 20;

/// The largest output chunk envd puts in one `Data` event.
pub const MAX_CHUNK_LEN: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes is larger than the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("truncated frame: header announced {expected} bytes, connection ended after {got}")]
    Truncated { expected: usize, got: usize },
    #[error("truncated frame header: connection ended after {got} of {HEADER_LEN} bytes")]
    TruncatedHeader { got: usize },
    #[error("malformed message: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

impl FrameError {
    /// Whether the byte stream is still aligned on a frame boundary after this error, so that the
    /// connection can go on (a body that decodes badly still had a valid length).
    pub fn is_recoverable(&self) -> bool {
        matches!(self, FrameError::Decode(_))
    }
}

/// Encodes `msg` as one frame (header and body).
pub fn encode_frame<M: Message>(msg: &M) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::with_capacity(HEADER_LEN + msg.encoded_len());
    encode_frame_into(msg, &mut out)?;
    Ok(out)
}

/// Appends `msg` as one frame to `out`, so that several frames can go out in one write.
pub fn encode_frame_into<M: Message>(msg: &M, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let len = msg.encoded_len();
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    out.reserve(HEADER_LEN + len);
    // The limit above keeps `len` well inside u32.
    out.extend_from_slice(&(len as u32).to_be_bytes());
    msg.encode(out)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(())
}

/// Parses the frame at the start of `buf` without I/O. Returns the body and the number of bytes the
/// frame occupies, or `None` when `buf` does not hold a whole frame yet.
pub fn split_frame(buf: &[u8]) -> Result<Option<(&[u8], usize)>, FrameError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let len = body_len(header)?;
    Ok(buf
        .get(HEADER_LEN..HEADER_LEN + len)
        .map(|body| (body, HEADER_LEN + len)))
}

/// Decodes one message from a frame body.
pub fn decode_body<M: Message + Default>(body: &[u8]) -> Result<M, FrameError> {
    Ok(M::decode(body)?)
}

fn body_len(header: &[u8]) -> Result<usize, FrameError> {
    let mut len_bytes = [0u8; HEADER_LEN];
    len_bytes.copy_from_slice(header);
    let len = u32::from_be_bytes(len_bytes) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    Ok(len)
}

/// Reads one frame body. Returns `Ok(None)` on a clean end of stream at a frame boundary.
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Option<Bytes>, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        let n = reader.read(&mut header[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(FrameError::TruncatedHeader { got })
            };
        }
        got += n;
    }
    let len = body_len(&header)?;
    let mut body = BytesMut::zeroed(len);
    let mut got = 0;
    while got < len {
        let n = reader.read(&mut body[got..]).await?;
        if n == 0 {
            return Err(FrameError::Truncated { expected: len, got });
        }
        got += n;
    }
    Ok(Some(body.freeze()))
}

/// Reads and decodes one message. Returns `Ok(None)` on a clean end of stream.
pub async fn read_message<M, R>(reader: &mut R) -> Result<Option<M>, FrameError>
where
    M: Message + Default,
    R: AsyncRead + Unpin,
{
    match read_frame(reader).await? {
        Some(body) => Ok(Some(M::decode(body)?)),
        None => Ok(None),
    }
}

/// Encodes and writes one message as a frame (without flushing buffered writers).
pub async fn write_message<M, W>(writer: &mut W, msg: &M) -> Result<(), FrameError>
where
    M: Message,
    W: AsyncWrite + Unpin,
{
    let frame = encode_frame(msg)?;
    writer.write_all(&frame).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb;

    fn health_request(id: u64) -> pb::Request {
        pb::Request {
            id,
            token: String::new(),
            kind: Some(pb::request::Kind::Health(pb::HealthRequest {})),
        }
    }

    #[test]
    fn encode_then_split_round_trips() {
        let frame = encode_frame(&health_request(7)).unwrap();
        let (body, used) = split_frame(&frame).unwrap().unwrap();
        assert_eq!(used, frame.len());
        let back: pb::Request = decode_body(body).unwrap();
        assert_eq!(back, health_request(7));
    }

    #[test]
    fn split_waits_for_a_whole_frame() {
        let frame = encode_frame(&health_request(1)).unwrap();
        for cut in 0..frame.len() {
            assert!(
                split_frame(&frame[..cut]).unwrap().is_none(),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn oversized_length_is_refused_before_reading_the_body() {
        let header = ((MAX_FRAME_LEN + 1) as u32).to_be_bytes();
        match split_frame(&header) {
            Err(FrameError::TooLarge { len, max }) => {
                assert_eq!(len, MAX_FRAME_LEN + 1);
                assert_eq!(max, MAX_FRAME_LEN);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn garbage_body_is_a_decode_error() {
        let mut frame = vec![0, 0, 0, 3];
        frame.extend_from_slice(&[0xff, 0xff, 0xff]);
        let (body, _) = split_frame(&frame).unwrap().unwrap();
        let err = decode_body::<pb::Request>(body).unwrap_err();
        assert!(matches!(err, FrameError::Decode(_)));
        assert!(err.is_recoverable());
    }

    #[tokio::test]
    async fn read_frame_reports_truncation_and_clean_eof() {
        let frame = encode_frame(&health_request(3)).unwrap();
        let mut whole: &[u8] = &frame;
        assert!(read_frame(&mut whole).await.unwrap().is_some());
        assert!(read_frame(&mut whole).await.unwrap().is_none());

        let mut body_cut: &[u8] = &frame[..frame.len() - 1];
        match read_frame(&mut body_cut).await {
            Err(FrameError::Truncated { expected, got }) => {
                assert_eq!(expected, frame.len() - HEADER_LEN);
                assert_eq!(got, expected - 1);
            }
            other => panic!("expected Truncated, got {other:?}"),
        }

        let mut header_cut: &[u8] = &frame[..2];
        assert!(matches!(
            read_frame(&mut header_cut).await,
            Err(FrameError::TruncatedHeader { got: 2 })
        ));
    }
}
