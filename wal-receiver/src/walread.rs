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
use std::io;
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

/// Reads WAL of one timeline from a store, keeping the last sealed segment it decompressed.
pub struct WalReader {
    dir: PathBuf,
    timeline: TimelineId,
    seg_size: WalSegSize,
    sealed: Option<(SegmentNo, Vec<u8>)>,
}

impl WalReader {
    pub fn new(dir: &Path, timeline: TimelineId, seg_size: WalSegSize) -> WalReader {
        WalReader {
            dir: dir.to_owned(),
            timeline,
            seg_size,
            sealed: None,
        }
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
        if let Some((cached, bytes)) = &self.sealed {
            if *cached == segno {
                return Ok(Some(bytes[offset as usize..offset as usize + len].to_vec()));
            }
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
        let mut whole = Vec::with_capacity(self.seg_size.bytes() as usize);
        sealed::read_sealed(&sealed_path, self.seg_size.bytes(), &mut whole)?;
        let out = whole[offset as usize..offset as usize + len].to_vec();
        self.sealed = Some((segno, whole));
        Ok(Some(out))
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
