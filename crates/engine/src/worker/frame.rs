//! Frames: a 5-byte header (payload length as u32 big-endian, then a kind byte) and the payload.
//!
//! Kinds: [`CALL`] (engine to worker: a pickled `(function, args, kwargs)`, or `(args, kwargs)` after a
//! [`FUNCTION`]), [`SETUP`] and [`FUNCTION`] (engine to worker, before a `CALL`: the call's setup function, and its
//! function pickled alone), [`YIELDED`] (worker to engine: one item of a generator, as it is produced),
//! [`RETURNED`] (worker to engine: the pickled return value), [`RAISED`] (worker to engine: the pickled description
//! of an exception). `agent.py` says what the worker does with each. The engine never looks inside payloads.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub(crate) const CALL: u8 = 1;
pub(crate) const RETURNED: u8 = 2;
pub(crate) const RAISED: u8 = 3;
pub(crate) const YIELDED: u8 = 4;
pub(crate) const SETUP: u8 = 5;
pub(crate) const FUNCTION: u8 = 6;
const HEADER_LEN: usize = 5;
/// Below this size a frame is written with one system call, header and payload copied together.
const COALESCE_BELOW: usize = 64 * 1024;

#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Frame {
    pub kind: u8,
    pub payload: Vec<u8>,
}

pub(crate) async fn write_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    kind: u8,
    payload: &[u8],
) -> std::io::Result<()> {
    let len = u32::try_from(payload.len()).map_err(|_| std::io::Error::other("frame payload over 4 GiB"))?;
    let mut header = [0u8; HEADER_LEN];
    header[..4].copy_from_slice(&len.to_be_bytes());
    header[4] = kind;
    if payload.len() < COALESCE_BELOW {
        let mut buf = Vec::with_capacity(HEADER_LEN + payload.len());
        buf.extend_from_slice(&header);
        buf.extend_from_slice(payload);
        writer.write_all(&buf).await
    } else {
        writer.write_all(&header).await?;
        writer.write_all(payload).await
    }
}

/// The buffer a frame's payload starts with; it doubles as bytes arrive, up to the size the header gave.
const FIRST_BUFFER: usize = 64 * 1024;

/// Reads frames; cancel-safe, so it can sit in a `select!` beside the output pipes: what was read is kept.
///
/// A payload's buffer grows with the bytes that came, not with what the header claims: a peer that announces a
/// GiB and sends nothing holds 64 KiB of the engine's memory, not a GiB.
#[derive(Debug)]
pub(crate) struct FrameReader {
    max_payload: usize,
    header: [u8; HEADER_LEN],
    header_filled: usize,
    /// The frame being read: its kind, what came of its payload, and the payload's size.
    body: Option<(u8, Vec<u8>, usize)>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum FrameError {
    #[error("the peer closed the connection in the middle of a frame")]
    Truncated,
    #[error("a frame of {size} bytes is over the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl FrameReader {
    pub fn new(max_payload: usize) -> Self {
        Self { max_payload, header: [0; HEADER_LEN], header_filled: 0, body: None }
    }

    /// The next frame, or `None` at a clean end of stream (between frames).
    pub async fn next<R: AsyncRead + Unpin>(&mut self, reader: &mut R) -> Result<Option<Frame>, FrameError> {
        loop {
            if let Some((kind, body, size)) = &mut self.body {
                let missing = *size - body.len();
                if missing == 0 {
                    let kind = *kind;
                    let payload = std::mem::take(body);
                    self.body = None;
                    return Ok(Some(Frame { kind, payload }));
                }
                if body.len() == body.capacity() {
                    body.reserve_exact(missing.min(body.len().max(FIRST_BUFFER)));
                }
                let room = missing.min(body.capacity() - body.len());
                // `take` keeps the read within this frame; `read_buf` fills the spare capacity, cancel-safely.
                match (&mut *reader).take(room as u64).read_buf(body).await? {
                    0 => return Err(FrameError::Truncated),
                    _ => continue,
                }
            }
            match reader.read(&mut self.header[self.header_filled..]).await? {
                0 if self.header_filled == 0 => return Ok(None),
                0 => return Err(FrameError::Truncated),
                n => self.header_filled += n,
            }
            if self.header_filled == HEADER_LEN {
                self.header_filled = 0;
                let size =
                    u32::from_be_bytes([self.header[0], self.header[1], self.header[2], self.header[3]]) as usize;
                if size > self.max_payload {
                    return Err(FrameError::TooLarge { size, limit: self.max_payload });
                }
                self.body = Some((self.header[4], Vec::new(), size));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn round_trip(payloads: &[(u8, Vec<u8>)], chunk: usize) -> Vec<Frame> {
        let mut wire = Vec::new();
        for (kind, payload) in payloads {
            write_frame(&mut wire, *kind, payload).await.unwrap();
        }
        // Deliver the bytes `chunk` at a time, as a socket may.
        let (mut tx, mut rx) = tokio::io::duplex(chunk);
        let writer = tokio::spawn(async move {
            for piece in wire.chunks(chunk) {
                tx.write_all(piece).await.unwrap();
            }
        });
        let mut reader = FrameReader::new(1 << 30);
        let mut frames = Vec::new();
        while let Some(frame) = reader.next(&mut rx).await.unwrap() {
            frames.push(frame);
        }
        writer.await.unwrap();
        frames
    }

    #[tokio::test]
    async fn frames_survive_any_chunking() {
        let payloads = vec![(CALL, b"hello".to_vec()), (RETURNED, vec![]), (RAISED, vec![7; 200_000])];
        for chunk in [1, 3, 5, 4096] {
            let frames = round_trip(&payloads, chunk).await;
            let got: Vec<(u8, Vec<u8>)> = frames.into_iter().map(|f| (f.kind, f.payload)).collect();
            assert_eq!(got, payloads, "chunk size {chunk}");
        }
    }

    #[tokio::test]
    async fn oversized_and_truncated_frames_are_errors() {
        let mut wire = Vec::new();
        write_frame(&mut wire, CALL, &[0; 100]).await.unwrap();
        let mut reader = FrameReader::new(99);
        assert!(matches!(reader.next(&mut wire.as_slice()).await, Err(FrameError::TooLarge { size: 100, limit: 99 })));
        let mut reader = FrameReader::new(1000);
        assert!(matches!(reader.next(&mut &wire[..50]).await, Err(FrameError::Truncated)));
        assert!(matches!(FrameReader::new(1000).next(&mut &wire[..0]).await, Ok(None)));
    }

    #[tokio::test]
    async fn a_frame_claiming_a_gib_holds_only_what_came() {
        let (mut tx, mut rx) = tokio::io::duplex(1 << 16);
        let mut header = [0u8; HEADER_LEN];
        header[..4].copy_from_slice(&(1u32 << 30).to_be_bytes());
        header[4] = RETURNED;
        tx.write_all(&header).await.unwrap();
        tx.write_all(&[1; 1000]).await.unwrap();
        let mut reader = FrameReader::new(1 << 31);
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(50), reader.next(&mut rx)).await;
        assert!(waiting.is_err(), "the rest of the frame never comes");
        let (_, body, size) = reader.body.as_ref().unwrap();
        assert_eq!((body.len(), *size), (1000, 1 << 30));
        assert!(body.capacity() <= FIRST_BUFFER, "{} bytes held for 1000 received", body.capacity());
    }
}
