//! The walship frame: how every message travels between wal-sender and wal-receiver.
//!
//! ```text
//! offset size field
//!  0     2    magic     b"WS"
//!  2     1    kind      message kind (see protocol::Kind)
//!  3     1    flags     bit 0: payload is zstd-compressed; other bits must be zero
//!  4     4    raw_len   length of the uncompressed payload, u32 little-endian
//!  8     4    wire_len  length of the payload bytes that follow, u32 little-endian
//! 12     4    data_crc  CRC32 (IEEE) of the uncompressed payload
//! 16     4    frame_crc CRC32 (IEEE) of header bytes 0..16, then of the wire payload
//! 20     wire_len       payload
//! ```
//!
//! Invariants:
//! - Both lengths are checked against [`MAX_RAW_LEN`] / [`MAX_WIRE_LEN`] before anything is
//!   allocated; an uncompressed frame must have `wire_len == raw_len`.
//! - A compressed payload is decompressed into a buffer of exactly `raw_len` bytes; a payload
//!   that would produce more or fewer bytes is rejected, so decompression can never produce
//!   more than the frame announces.
//! - `frame_crc` covers the header and the bytes as sent, so a flipped bit anywhere in a frame
//!   is detected before the decompressor sees it; `data_crc` then checks the decompressed
//!   payload end to end.
//! - Compressed payloads of one direction of one connection form a single zstd stream: each
//!   frame is a flushed block of it, so the compression context (the window of earlier WAL)
//!   carries across messages. A decoder is therefore tied to one connection; after any error
//!   the connection is dropped and both sides start a new stream.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};
use zstd::stream::raw::{Decoder as ZDecoder, Encoder as ZEncoder, InBuffer, Operation, OutBuffer};

pub const MAGIC: [u8; 2] = *b"WS";
pub const HEADER_LEN: usize = 20;
/// The largest payload a frame may carry once decompressed.
pub const MAX_RAW_LEN: u32 = 4 << 20;
/// The largest payload a frame may carry on the wire (zstd's bound for `MAX_RAW_LEN`, rounded).
pub const MAX_WIRE_LEN: u32 = MAX_RAW_LEN + (64 << 10);
pub const FLAG_COMPRESSED: u8 = 0x01;
/// The zstd window the decoder accepts (8 MiB): a peer cannot make us allocate more.
const MAX_WINDOW_LOG: u32 = 23;

/// Why a frame was rejected. Every variant ends the connection that produced it.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed in the middle of a frame ({got} of {want} bytes)")]
    Truncated { got: usize, want: usize },
    #[error("bad frame magic {0:02x?}: the peer does not speak the walship protocol")]
    BadMagic([u8; 2]),
    #[error("frame {what} {len} exceeds the limit of {max} bytes")]
    TooLarge {
        what: &'static str,
        len: u32,
        max: u32,
    },
    #[error("frame has unknown flags {0:#04x}")]
    BadFlags(u8),
    #[error("uncompressed frame has wire length {wire_len} but raw length {raw_len}")]
    LengthMismatch { raw_len: u32, wire_len: u32 },
    #[error("frame payload decompresses to a different length than the {raw_len} bytes announced")]
    DecompressedLength { raw_len: u32 },
    #[error("frame payload does not decompress: {0}")]
    Decompress(String),
    #[error("frame checksum mismatch (computed {computed:08x}, frame says {expected:08x}): corrupted in transit")]
    Checksum { computed: u32, expected: u32 },
    #[error("frame payload of {0} bytes exceeds the limit of {MAX_RAW_LEN} bytes")]
    PayloadTooLarge(usize),
    #[error("compression failed: {0}")]
    Compress(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// A frame whose checksum and lengths have been verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub payload: Vec<u8>,
    /// Bytes this frame took on the wire, header included.
    pub wire_bytes: u64,
}

/// A parsed, length-checked frame header.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    pub kind: u8,
    pub flags: u8,
    pub raw_len: u32,
    pub wire_len: u32,
    pub data_crc: u32,
    pub frame_crc: u32,
}

impl Header {
    /// Parses and checks a header. Nothing is allocated for a header that fails.
    pub fn parse(buf: &[u8; HEADER_LEN]) -> Result<Header, FrameError> {
        if buf[0..2] != MAGIC {
            return Err(FrameError::BadMagic([buf[0], buf[1]]));
        }
        let word = |at: usize| u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
        let h = Header {
            kind: buf[2],
            flags: buf[3],
            raw_len: word(4),
            wire_len: word(8),
            data_crc: word(12),
            frame_crc: word(16),
        };
        if h.flags & !FLAG_COMPRESSED != 0 {
            return Err(FrameError::BadFlags(h.flags));
        }
        if h.raw_len > MAX_RAW_LEN {
            return Err(FrameError::TooLarge {
                what: "raw length",
                len: h.raw_len,
                max: MAX_RAW_LEN,
            });
        }
        if h.wire_len > MAX_WIRE_LEN {
            return Err(FrameError::TooLarge {
                what: "wire length",
                len: h.wire_len,
                max: MAX_WIRE_LEN,
            });
        }
        if h.flags & FLAG_COMPRESSED == 0 && h.wire_len != h.raw_len {
            return Err(FrameError::LengthMismatch {
                raw_len: h.raw_len,
                wire_len: h.wire_len,
            });
        }
        Ok(h)
    }

    /// The header as sent: the layout [`Header::parse`] reads.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..2].copy_from_slice(&MAGIC);
        b[2] = self.kind;
        b[3] = self.flags;
        let words = [self.raw_len, self.wire_len, self.data_crc, self.frame_crc];
        for (at, w) in (4..HEADER_LEN).step_by(4).zip(words) {
            b[at..at + 4].copy_from_slice(&w.to_le_bytes());
        }
        b
    }
}

fn frame_crc(header16: &[u8], body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(header16);
    h.update(body);
    h.finalize()
}

/// Encodes frames for one direction of one connection.
pub struct FrameEncoder {
    zstd: ZEncoder<'static>,
}

impl FrameEncoder {
    /// `level` is the zstd level used for compressed frames.
    pub fn new(level: i32) -> Result<FrameEncoder, FrameError> {
        let zstd = ZEncoder::new(level).map_err(|e| FrameError::Compress(e.to_string()))?;
        Ok(FrameEncoder { zstd })
    }

    /// Appends one frame carrying `payload` to `out`. With `compress`, the payload goes
    /// through this connection's zstd stream and is flushed, so the peer can decode it now.
    pub fn encode(
        &mut self,
        kind: u8,
        payload: &[u8],
        compress: bool,
        out: &mut Vec<u8>,
    ) -> Result<(), FrameError> {
        if payload.len() > MAX_RAW_LEN as usize {
            return Err(FrameError::PayloadTooLarge(payload.len()));
        }
        // The header goes first with its lengths and checksums left blank; the payload is
        // compressed straight into `out` behind it, then the header is filled in.
        let start = out.len();
        let body_start = start + HEADER_LEN;
        out.resize(body_start, 0);
        let flags = if compress {
            out.reserve(zstd::zstd_safe::compress_bound(payload.len()) + 64);
            if let Err(e) = self.compress_into(payload, out) {
                out.truncate(start);
                return Err(e);
            }
            FLAG_COMPRESSED
        } else {
            out.extend_from_slice(payload);
            0
        };
        let wire_len = out.len() - body_start;
        if wire_len > MAX_WIRE_LEN as usize {
            out.truncate(start);
            return Err(FrameError::PayloadTooLarge(wire_len));
        }
        let mut h = Header {
            kind,
            flags,
            raw_len: payload.len() as u32,
            wire_len: wire_len as u32,
            data_crc: crc32fast::hash(payload),
            frame_crc: 0,
        };
        let (header, body) = out[start..].split_at_mut(HEADER_LEN);
        h.frame_crc = frame_crc(&h.to_bytes()[..16], body);
        header.copy_from_slice(&h.to_bytes());
        Ok(())
    }

    /// Appends `payload` to `out` through this connection's zstd stream, flushed.
    fn compress_into(&mut self, payload: &[u8], out: &mut Vec<u8>) -> Result<(), FrameError> {
        let mut input = InBuffer::around(payload);
        while input.pos < payload.len() {
            self.run_into(out, |z, o| z.run(&mut input, o).map(|_| ()))?;
        }
        loop {
            let mut remaining = 0;
            self.run_into(out, |z, o| z.flush(o).map(|r| remaining = r))?;
            if remaining == 0 {
                return Ok(());
            }
        }
    }

    /// Runs one zstd step that appends its output to `out`, with room for it made first.
    fn run_into(
        &mut self,
        out: &mut Vec<u8>,
        f: impl FnOnce(&mut ZEncoder<'static>, &mut OutBuffer<'_, Vec<u8>>) -> io::Result<()>,
    ) -> Result<(), FrameError> {
        if out.capacity() - out.len() < 1024 {
            out.reserve(64 << 10);
        }
        let pos = out.len();
        let mut o = OutBuffer::around_pos(out, pos);
        f(&mut self.zstd, &mut o).map_err(|e| FrameError::Compress(e.to_string()))
    }
}

/// Decodes frames for one direction of one connection.
pub struct FrameDecoder {
    zstd: ZDecoder<'static>,
}

impl FrameDecoder {
    pub fn new() -> Result<FrameDecoder, FrameError> {
        let mut zstd = ZDecoder::new().map_err(|e| FrameError::Decompress(e.to_string()))?;
        zstd.set_parameter(zstd::stream::raw::DParameter::WindowLogMax(MAX_WINDOW_LOG))
            .map_err(|e| FrameError::Decompress(e.to_string()))?;
        Ok(FrameDecoder { zstd })
    }

    /// Turns a checked header and its wire payload into a verified frame.
    pub fn decode(
        &mut self,
        header: &Header,
        header_bytes: &[u8; HEADER_LEN],
        body: &[u8],
    ) -> Result<Frame, FrameError> {
        debug_assert_eq!(body.len(), header.wire_len as usize);
        let computed = frame_crc(&header_bytes[..16], body);
        if computed != header.frame_crc {
            return Err(FrameError::Checksum {
                computed,
                expected: header.frame_crc,
            });
        }
        let raw_len = header.raw_len as usize;
        let payload = if header.flags & FLAG_COMPRESSED != 0 {
            // One byte of headroom shows a payload that decompresses to more than announced.
            let mut payload = vec![0u8; raw_len + 1];
            let mut input = InBuffer::around(body);
            let mut produced = 0;
            loop {
                let mut out = OutBuffer::around(&mut payload[produced..]);
                self.zstd
                    .run(&mut input, &mut out)
                    .map_err(|e| FrameError::Decompress(e.to_string()))?;
                let made = out.pos();
                produced += made;
                if produced > raw_len {
                    return Err(FrameError::DecompressedLength {
                        raw_len: header.raw_len,
                    });
                }
                if made == 0 && input.pos == body.len() {
                    break;
                }
            }
            if produced != raw_len {
                return Err(FrameError::DecompressedLength {
                    raw_len: header.raw_len,
                });
            }
            payload.truncate(raw_len);
            payload
        } else {
            body.to_vec()
        };
        let computed = crc32fast::hash(&payload);
        if computed != header.data_crc {
            return Err(FrameError::Checksum {
                computed,
                expected: header.data_crc,
            });
        }
        Ok(Frame {
            kind: header.kind,
            payload,
            wire_bytes: (HEADER_LEN + body.len()) as u64,
        })
    }

    /// Decodes one frame from a complete buffer (used by tests and fuzzing).
    pub fn decode_buf(&mut self, buf: &[u8]) -> Result<Frame, FrameError> {
        if buf.len() < HEADER_LEN {
            return Err(FrameError::Truncated {
                got: buf.len(),
                want: HEADER_LEN,
            });
        }
        let hdr: [u8; HEADER_LEN] = buf[..HEADER_LEN].try_into().expect("length checked");
        let header = Header::parse(&hdr)?;
        let want = HEADER_LEN + header.wire_len as usize;
        if buf.len() < want {
            return Err(FrameError::Truncated {
                got: buf.len(),
                want,
            });
        }
        self.decode(&header, &hdr, &buf[HEADER_LEN..want])
    }
}

/// How much a [`FrameReader`] asks the stream for at a time, at least.
const READ_CHUNK: usize = 64 << 10;

/// Reads frames from one direction of a connection, through a buffer.
///
/// `read_frame` is cancellation-safe: bytes already read stay in the buffer when its future
/// is dropped, so a loop may wait for the next frame in a `select!` beside other work, on
/// its own task, without a reader task and a channel between. A whole buffered frame is
/// decoded without waiting, and one read takes in as many frames as the stream holds.
///
/// The buffer holds at most one frame's length (checked by [`Header::parse`] before the
/// buffer grows for it) plus one [`READ_CHUNK`].
pub struct FrameReader<R> {
    r: R,
    dec: FrameDecoder,
    buf: Vec<u8>,
    /// Where the bytes not yet decoded start in `buf`.
    pos: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(r: R) -> Result<FrameReader<R>, FrameError> {
        Ok(FrameReader {
            r,
            dec: FrameDecoder::new()?,
            buf: Vec::new(),
            pos: 0,
        })
    }

    /// Reads one frame. A clean end of stream before a frame starts is `Ok(None)`; an end
    /// inside a frame is [`FrameError::Truncated`]. Cancellation-safe.
    ///
    /// TLS reports a peer that closed without `close_notify` as `UnexpectedEof`. That is an
    /// end of stream like any other here: frames delimit themselves, so a cut inside a frame
    /// is still caught as truncation, and a cut between frames is a plain close.
    pub async fn read_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        loop {
            let want = match self.buffered()? {
                Buffered::Frame(f) => return Ok(Some(f)),
                Buffered::Needs(want) => want,
            };
            if self.pos > 0 {
                self.buf.drain(..self.pos);
                self.pos = 0;
            }
            let target = want.max(self.buf.len() + READ_CHUNK);
            self.buf.reserve_exact(target - self.buf.len());
            let n = match self.r.read_buf(&mut self.buf).await {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => 0,
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                return match self.buf.len() {
                    0 => Ok(None),
                    got => Err(FrameError::Truncated { got, want }),
                };
            }
        }
    }

    /// A frame that is already whole in the buffer, or `None` without waiting when none is
    /// (then [`read_frame`](Self::read_frame) waits for the next).
    pub fn next_buffered(&mut self) -> Result<Option<Frame>, FrameError> {
        match self.buffered()? {
            Buffered::Frame(f) => Ok(Some(f)),
            Buffered::Needs(_) => Ok(None),
        }
    }

    /// Decodes the next frame if the buffer holds all of it; otherwise says how many bytes
    /// it needs in all, header included. The header is checked before that length is used.
    fn buffered(&mut self) -> Result<Buffered, FrameError> {
        let avail = &self.buf[self.pos..];
        let Some(hdr) = avail.first_chunk::<HEADER_LEN>() else {
            return Ok(Buffered::Needs(HEADER_LEN));
        };
        let hdr = *hdr;
        let header = Header::parse(&hdr)?;
        let end = HEADER_LEN + header.wire_len as usize;
        if avail.len() < end {
            return Ok(Buffered::Needs(end));
        }
        let frame = self.dec.decode(&header, &hdr, &avail[HEADER_LEN..end])?;
        self.pos += end;
        Ok(Buffered::Frame(frame))
    }
}

enum Buffered {
    Frame(Frame),
    Needs(usize),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wal_like(n: usize, seed: u64) -> Vec<u8> {
        // Compressible but not trivial: repeating records with a varying counter.
        let mut v = Vec::with_capacity(n);
        let mut x = seed;
        while v.len() < n {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            v.extend_from_slice(b"INSERT pgbench_history tid=");
            v.extend_from_slice(&(x >> 60).to_le_bytes());
        }
        v.truncate(n);
        v
    }

    #[test]
    fn round_trip_compressed_and_plain_across_messages() {
        let mut enc = FrameEncoder::new(1).unwrap();
        let mut dec = FrameDecoder::new().unwrap();
        let mut wire = Vec::new();
        let msgs: Vec<Vec<u8>> = (0..50)
            .map(|i| wal_like(i * 997 % 20000, i as u64))
            .collect();
        for (i, m) in msgs.iter().enumerate() {
            enc.encode(5, m, i % 3 != 0, &mut wire).unwrap();
        }
        let mut pos = 0;
        for m in &msgs {
            let f = dec.decode_buf(&wire[pos..]).unwrap();
            assert_eq!(&f.payload, m);
            pos += f.wire_bytes as usize;
        }
        assert_eq!(pos, wire.len());
    }

    #[test]
    fn context_carries_across_messages() {
        // The same incompressible 8 KiB message twice: the second frame should be tiny.
        let mut enc = FrameEncoder::new(1).unwrap();
        let mut x = 99u64;
        let m: Vec<u8> = (0..8192)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 56) as u8
            })
            .collect();
        let mut first = Vec::new();
        enc.encode(5, &m, true, &mut first).unwrap();
        let mut second = Vec::new();
        enc.encode(5, &m, true, &mut second).unwrap();
        assert!(
            second.len() < first.len() / 4,
            "{} vs {}",
            second.len(),
            first.len()
        );
    }

    #[test]
    fn every_flipped_bit_is_rejected() {
        let mut enc = FrameEncoder::new(1).unwrap();
        let mut wire = Vec::new();
        enc.encode(5, &wal_like(3000, 1), true, &mut wire).unwrap();
        for byte in 0..wire.len() {
            for bit in 0..8 {
                let mut bad = wire.clone();
                bad[byte] ^= 1 << bit;
                let mut dec = FrameDecoder::new().unwrap();
                assert!(
                    dec.decode_buf(&bad).is_err(),
                    "flip at byte {byte} bit {bit} accepted"
                );
            }
        }
        let mut wire = Vec::new();
        enc.encode(2, b"plain control message", false, &mut wire)
            .unwrap();
        for byte in 0..wire.len() {
            let mut bad = wire.clone();
            bad[byte] ^= 0x10;
            let mut dec = FrameDecoder::new().unwrap();
            assert!(
                dec.decode_buf(&bad).is_err(),
                "flip at byte {byte} accepted"
            );
        }
    }

    #[test]
    fn truncated_frames_are_rejected() {
        let mut enc = FrameEncoder::new(1).unwrap();
        let mut wire = Vec::new();
        enc.encode(5, &wal_like(5000, 2), true, &mut wire).unwrap();
        for cut in 0..wire.len() {
            let mut dec = FrameDecoder::new().unwrap();
            assert!(
                matches!(
                    dec.decode_buf(&wire[..cut]),
                    Err(FrameError::Truncated { .. })
                ),
                "cut {cut}"
            );
        }
    }

    #[tokio::test]
    async fn async_reader_distinguishes_clean_end_from_truncation() {
        let mut enc = FrameEncoder::new(1).unwrap();
        let mut wire = Vec::new();
        enc.encode(5, b"hello", true, &mut wire).unwrap();
        let mut r = FrameReader::new(&wire[..]).unwrap();
        assert_eq!(r.read_frame().await.unwrap().unwrap().payload, b"hello");
        assert!(r.read_frame().await.unwrap().is_none());
        let mut r = FrameReader::new(&wire[..wire.len() - 1]).unwrap();
        assert!(matches!(
            r.read_frame().await,
            Err(FrameError::Truncated { .. })
        ));
    }

    #[tokio::test]
    async fn a_cancelled_read_loses_nothing() {
        // Frames trickle in a few bytes at a time while every read races a yield, so most
        // reads are dropped part-way through a frame. Every frame must still arrive whole.
        let mut enc = FrameEncoder::new(1).unwrap();
        let payloads: Vec<Vec<u8>> = (0..40).map(|i| wal_like(1 + i * 997, i as u64)).collect();
        let mut wire = Vec::new();
        for p in &payloads {
            enc.encode(7, p, true, &mut wire).unwrap();
        }
        let (mut tx, rx) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for chunk in wire.chunks(13) {
                tx.write_all(chunk).await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        let mut r = FrameReader::new(rx).unwrap();
        let (mut got, mut cancelled) = (Vec::new(), 0);
        loop {
            tokio::select! {
                f = r.read_frame() => match f.unwrap() {
                    Some(f) => got.push(f.payload),
                    None => break,
                },
                _ = tokio::task::yield_now() => cancelled += 1,
            }
        }
        writer.await.unwrap();
        assert!(cancelled > 0, "no read was cancelled");
        assert_eq!(got, payloads);
    }

    #[test]
    fn header_bytes_round_trip() {
        let h = Header {
            kind: 7,
            flags: FLAG_COMPRESSED,
            raw_len: 1000,
            wire_len: 300,
            data_crc: 0xdead_beef,
            frame_crc: 0x0123_4567,
        };
        let b = h.to_bytes();
        assert_eq!(b[0..2], MAGIC);
        assert_eq!(b[16..20], 0x0123_4567u32.to_le_bytes());
        let p = Header::parse(&b).unwrap();
        assert_eq!(
            (
                p.kind,
                p.flags,
                p.raw_len,
                p.wire_len,
                p.data_crc,
                p.frame_crc
            ),
            (7, FLAG_COMPRESSED, 1000, 300, 0xdead_beef, 0x0123_4567)
        );
    }

    #[test]
    fn oversized_lengths_are_rejected_before_allocation() {
        let mut hdr = [0u8; HEADER_LEN];
        hdr[0..2].copy_from_slice(&MAGIC);
        hdr[3] = FLAG_COMPRESSED;
        hdr[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        hdr[8..12].copy_from_slice(&10u32.to_le_bytes());
        assert!(matches!(
            Header::parse(&hdr),
            Err(FrameError::TooLarge {
                what: "raw length",
                ..
            })
        ));
        hdr[4..8].copy_from_slice(&10u32.to_le_bytes());
        hdr[8..12].copy_from_slice(&(MAX_WIRE_LEN + 1).to_le_bytes());
        assert!(matches!(
            Header::parse(&hdr),
            Err(FrameError::TooLarge {
                what: "wire length",
                ..
            })
        ));
        hdr[3] = 0;
        hdr[8..12].copy_from_slice(&11u32.to_le_bytes());
        assert!(matches!(
            Header::parse(&hdr),
            Err(FrameError::LengthMismatch { .. })
        ));
        hdr[3] = 0x80;
        assert!(matches!(
            Header::parse(&hdr),
            Err(FrameError::BadFlags(0x80))
        ));
        let mut enc = FrameEncoder::new(1).unwrap();
        let mut out = Vec::new();
        let big = vec![0u8; MAX_RAW_LEN as usize + 1];
        assert!(matches!(
            enc.encode(5, &big, true, &mut out),
            Err(FrameError::PayloadTooLarge(_))
        ));
    }

    #[test]
    fn decompression_bomb_is_rejected() {
        // A frame that announces 100 bytes but whose zstd payload expands to 1 MiB.
        let mut enc = FrameEncoder::new(1).unwrap();
        let mut wire = Vec::new();
        let zeros = vec![0u8; 1 << 20];
        enc.encode(5, &zeros, true, &mut wire).unwrap();
        wire[4..8].copy_from_slice(&100u32.to_le_bytes());
        // A hostile peer computes a valid frame checksum for its lie.
        let crc = frame_crc(&wire[..16], &wire[HEADER_LEN..]);
        wire[16..20].copy_from_slice(&crc.to_le_bytes());
        let mut dec = FrameDecoder::new().unwrap();
        assert!(matches!(
            dec.decode_buf(&wire),
            Err(FrameError::DecompressedLength { raw_len: 100 })
        ));
    }

    #[test]
    fn random_garbage_never_panics() {
        let mut x = 0x12345678u64;
        for _ in 0..2000 {
            let mut buf = vec![0u8; (x % 300) as usize];
            for b in buf.iter_mut() {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                *b = (x >> 56) as u8;
            }
            if buf.len() >= 2 && x.is_multiple_of(2) {
                buf[0..2].copy_from_slice(&MAGIC);
            }
            let mut dec = FrameDecoder::new().unwrap();
            let _ = dec.decode_buf(&buf);
        }
    }
}
