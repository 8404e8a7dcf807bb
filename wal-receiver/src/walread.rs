//! Reading WAL back out of a store while `follow` writes it.
//!
//! A segment is in one of two places: its `.partial` file while it is written (and until it
//! is sealed), or its sealed `.zst` file. The sealer may seal a complete `.partial` at any
//! moment and then *recycle* its file: rename it to a future segment's name and let the
//! writer fill it with that segment's WAL. A reader that opened the `.partial` before the
//! rename could then read another segment's bytes. So a read from a `.partial` is trusted
//! only if, after the bytes were read, the path still names the same file: the rename comes
//! before any new byte is written into the file, so if the path is unchanged after the read,
//! no byte of the read can have been overwritten. Otherwise the read is done again from the
//! sealed copy.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use walship_common::{Lsn, SegmentNo, TimelineId, WalSegSize};

use crate::store::{PARTIAL_SUFFIX, SEALED_SUFFIX};
use crate::{sealed, walcheck};

/// Reads `len` bytes at `offset` of a `.partial` file, if the file is there and is still the
/// same file once they are read. `Ok(None)`: not there, or renamed away meanwhile.
pub fn read_partial(path: &Path, offset: u64, len: usize) -> io::Result<Option<Vec<u8>>> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let ino = f.metadata()?.ino();
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset)?;
    match fs::metadata(path) {
        Ok(m) if m.ino() == ino => Ok(Some(buf)),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Sealed segments up to this size are decompressed whole and kept for the reads that
/// follow; larger ones (segments may be up to 1 GiB) are read as a stream, so that memory
/// does not grow with the segment size.
pub const WHOLE_MAX: u64 = 64 << 20;

/// The sealed segment a reader read last.
enum SealedCache {
    Whole(SegmentNo, Vec<u8>),
    /// Positioned at `pos`; the segment's checksum was checked on a pass before.
    Stream {
        segno: SegmentNo,
        dec: Box<sealed::SealedReader>,
        pos: u64,
    },
}

/// Reads WAL of one timeline from a store, keeping the last sealed segment it decompressed
/// (or, for large segments, a stream positioned in it).
pub struct WalReader {
    dir: PathBuf,
    timeline: TimelineId,
    seg_size: WalSegSize,
    sealed: Option<SealedCache>,
    /// The large sealed segment whose checksum was last checked.
    verified: Option<SegmentNo>,
    whole_max: u64,
    /// Sealed files found corrupt: not decompressed again until they change.
    verdicts: sealed::Verdicts,
}

impl WalReader {
    pub fn new(dir: &Path, timeline: TimelineId, seg_size: WalSegSize) -> WalReader {
        WalReader {
            dir: dir.to_owned(),
            timeline,
            seg_size,
            sealed: None,
            verified: None,
            whole_max: WHOLE_MAX,
            verdicts: sealed::Verdicts::default(),
        }
    }

    /// Shares `verdicts` with other readers, so that a sealed file one of them found
    /// corrupt is not decompressed again by the next.
    pub fn with_verdicts(mut self, verdicts: sealed::Verdicts) -> WalReader {
        self.verdicts = verdicts;
        self
    }

    fn path(&self, segno: SegmentNo, suffix: &str) -> PathBuf {
        crate::store::timeline_segment_path(&self.dir, self.timeline, self.seg_size, segno, suffix)
    }

    /// Up to `max` bytes of WAL from `lsn`, never past `flush` (the store's persisted flush
    /// position) nor past the end of `lsn`'s segment. `Ok(None)`: the store does not hold
    /// that segment.
    pub fn read(&mut self, lsn: Lsn, max: usize, flush: Lsn) -> Result<Option<Vec<u8>>> {
        let segno = self.seg_size.segment_of(lsn);
        let offset = lsn.segment_offset(self.seg_size);
        let seg_end = self.seg_size.segment_start(SegmentNo(segno.0 + 1));
        let len = (max as u64)
            .min(flush.saturating_sub(lsn))
            .min(seg_end.saturating_sub(lsn)) as usize;
        if len == 0 {
            return Ok(Some(Vec::new()));
        }
        match &self.sealed {
            Some(SealedCache::Whole(cached, bytes)) if *cached == segno => {
                return Ok(Some(bytes[offset as usize..offset as usize + len].to_vec()));
            }
            Some(SealedCache::Stream { segno: s, pos, .. }) if *s == segno && *pos <= offset => {
                return self.read_stream(offset, len).map(Some);
            }
            _ => {}
        }
        let partial = self.path(segno, PARTIAL_SUFFIX);
        if let Some(bytes) = read_partial(&partial, offset, len)
            .with_context(|| format!("read {}", partial.display()))?
        {
            return Ok(Some(bytes));
        }
        let sealed_path = self.path(segno, SEALED_SUFFIX);
        if !sealed_path.exists() {
            return Ok(None);
        }
        let seg_len = self.seg_size.bytes();
        if seg_len > self.whole_max {
            // Checked whole on a first pass, read on a second: no byte is used before the
            // checksum is. Sealed files are never rewritten with other content.
            if self.verified != Some(segno) {
                self.sealed = None;
                self.verdicts
                    .read_sealed(&sealed_path, seg_len, &mut io::sink())?;
                self.verified = Some(segno);
            }
            let (dec, _) = sealed::open_sealed(&sealed_path, seg_len)?;
            self.sealed = Some(SealedCache::Stream {
                segno,
                dec: Box::new(dec),
                pos: 0,
            });
            return self.read_stream(offset, len).map(Some);
        }
        let mut whole = Vec::with_capacity(seg_len as usize);
        self.verdicts
            .read_sealed(&sealed_path, seg_len, &mut whole)?;
        let out = whole[offset as usize..offset as usize + len].to_vec();
        self.sealed = Some(SealedCache::Whole(segno, whole));
        Ok(Some(out))
    }

    /// `len` bytes at `offset` from the stream in `self.sealed`, which is at or before it.
    fn read_stream(&mut self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let Some(SealedCache::Stream { dec, pos, .. }) = &mut self.sealed else {
            unreachable!("read_stream without a stream");
        };
        let read = (|| -> io::Result<Vec<u8>> {
            let skip = offset - *pos;
            if io::copy(&mut (&mut **dec).take(skip), &mut io::sink())? != skip {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let mut out = vec![0u8; len];
            dec.read_exact(&mut out)?;
            *pos = offset + len as u64;
            Ok(out)
        })();
        if read.is_err() {
            self.sealed = None;
        }
        read.context("read a sealed segment")
    }
}

/// One segment of a store, read through a [`WalReader`] for the record walker: a `.partial`
/// the sealer recycles meanwhile is read from its sealed copy instead.
pub struct StoreSegment<'a> {
    reader: &'a mut WalReader,
    start: Lsn,
    /// Set when the store does not hold the segment.
    pub missing: bool,
}

impl<'a> StoreSegment<'a> {
    pub fn new(reader: &'a mut WalReader, segno: SegmentNo) -> StoreSegment<'a> {
        let start = reader.seg_size.segment_start(segno);
        StoreSegment {
            reader,
            start,
            missing: false,
        }
    }
}

impl walcheck::SegmentSource for StoreSegment<'_> {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<bool> {
        let lsn = Lsn(self.start.0 + offset);
        // Up to the segment's end: the walker itself leaves out records past the flush
        // position, but needs the whole page that holds it.
        let seg_end = Lsn(self.start.0 + self.reader.seg_size.bytes());
        match self.reader.read(lsn, buf.len(), seg_end) {
            Ok(Some(bytes)) if bytes.len() == buf.len() => {
                buf.copy_from_slice(&bytes);
                Ok(true)
            }
            Ok(Some(_)) => Ok(false),
            Ok(None) => {
                self.missing = true;
                Ok(false)
            }
            Err(e) => Err(io::Error::other(format!("{e:#}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sealed::tests::{segment_bytes, state_1m};
    use crate::store::segment_path;

    /// Reads a sealed segment whole (`whole_max` above it) and as a stream (below it):
    /// forwards, backwards, and across a corrupt copy.
    #[test]
    fn sealed_segments_read_whole_or_streamed() {
        let dir = std::env::temp_dir().join(format!("walship-walread-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let state = state_1m();
        let data = segment_bytes(2);
        fs::write(
            segment_path(&dir, &state, SegmentNo(1), PARTIAL_SUFFIX),
            &data,
        )
        .unwrap();
        sealed::seal_segment(&dir, &state, SegmentNo(1)).unwrap();
        let start = state.seg_size.segment_start(SegmentNo(1)).0;
        let flush = Lsn(start + (1 << 20));
        for whole_max in [WHOLE_MAX, 0] {
            let mut r = WalReader::new(&dir, state.timeline, state.seg_size);
            r.whole_max = whole_max;
            for &(off, len) in &[
                (0u64, 8192usize),
                (8192, 100_000),
                (500_000, 4096),
                (4096, 8192),
            ] {
                let got = r.read(Lsn(start + off), len, flush).unwrap().unwrap();
                assert_eq!(
                    got,
                    &data[off as usize..off as usize + len],
                    "at {off}, whole_max {whole_max}"
                );
            }
            let streamed = matches!(r.sealed, Some(SealedCache::Stream { .. }));
            assert_eq!(streamed, whole_max == 0);
        }
        // A damaged sealed file: its checksum is checked before any byte is returned.
        let sealed_path = segment_path(&dir, &state, SegmentNo(1), SEALED_SUFFIX);
        let mut bytes = fs::read(&sealed_path).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 0x10;
        fs::write(&sealed_path, &bytes).unwrap();
        for whole_max in [WHOLE_MAX, 0] {
            let mut r = WalReader::new(&dir, state.timeline, state.seg_size);
            r.whole_max = whole_max;
            assert!(
                r.read(Lsn(start), 8192, flush).is_err(),
                "whole_max {whole_max}"
            );
        }
        fs::remove_dir_all(&dir).unwrap();
    }
}
