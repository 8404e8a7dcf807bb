//! Sealed segments: a complete WAL segment compressed at rest with its checksum recorded.
//!
//! A sealed file is a valid `.zst` file (`zstd -d` reads it): a zstd *skippable* frame that
//! carries walship's metadata, followed by one zstd frame holding the segment.
//!
//! ```text
//!  0  4  0x184D2A5B (skippable frame magic, little-endian)
//!  4  4  24 (metadata length)
//!  8  8  "WSSEAL1\0"
//! 16  8  segment length in bytes
//! 24  4  CRC-32C of the uncompressed segment
//! 28  4  CRC-32C of bytes 8..28
//! 32  .. zstd frame
//! ```
//!
//! Invariants: a sealed file is written to a temporary name, fsynced, renamed and the
//! directory fsynced before the `.partial` it replaces is removed. An existing sealed file is
//! never replaced: sealing again is accepted only if the content is identical.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use walship_common::durable;
use walship_common::SegmentNo;

use crate::store::{segment_path, StoreState, PARTIAL_SUFFIX, SEALED_SUFFIX};

const SKIPPABLE_MAGIC: u32 = 0x184D_2A5B;
const META_MAGIC: [u8; 8] = *b"WSSEAL1\0";
const HEADER_LEN: usize = 32;
/// zstd level for WAL at rest.
const SEAL_LEVEL: i32 = 3;

/// Seals the complete `.partial` of `segno`, then removes the `.partial`.
pub fn seal_segment(dir: &Path, state: &StoreState, segno: SegmentNo) -> Result<()> {
    let partial = segment_path(dir, state, segno, PARTIAL_SUFFIX);
    let sealed = segment_path(dir, state, segno, SEALED_SUFFIX);
    let seg_len = state.seg_size.bytes();
    let data = std::fs::read(&partial).with_context(|| format!("read {}", partial.display()))?;
    if data.len() as u64 != seg_len {
        bail!(
            "{} has {} bytes, expected {seg_len}",
            partial.display(),
            data.len()
        );
    }
    let crc = crc32c::crc32c(&data);
    if sealed.exists() {
        let mut existing = Vec::with_capacity(data.len());
        let existing_crc = read_sealed(&sealed, seg_len, &mut existing)
            .with_context(|| format!("verify existing sealed segment {}", sealed.display()))?;
        if existing_crc != crc || existing != data {
            bail!(
                "sealed segment {} already exists with different content than the WAL received; refusing to overwrite it",
                sealed.display()
            );
        }
    } else {
        let tmp = durable::temp_path(&sealed);
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .with_context(|| format!("create {}", tmp.display()))?;
        f.write_all(&header(seg_len, crc))
            .with_context(|| format!("write {}", tmp.display()))?;
        let compressed = zstd::bulk::compress(&data, SEAL_LEVEL).context("compress segment")?;
        f.write_all(&compressed)
            .with_context(|| format!("write {}", tmp.display()))?;
        durable::fsync_file(&f, &tmp)?;
        drop(f);
        durable::publish(&tmp, &sealed)?;
    }
    recycle(dir, state, segno, &partial)?;
    tracing::debug!(segment = %sealed.display(), "sealed");
    Ok(())
}

/// How far ahead a sealed segment's file may be recycled.
const RECYCLE_AHEAD: u64 = 4;

/// Renames the `.partial` of a sealed segment to a future segment's name that does not
/// exist yet, as PostgreSQL recycles WAL segments; removes it when none is free.
///
/// A recycled file has its blocks allocated and written, so the writer's flushes into it
/// overwrite blocks in place and fdatasync journals no extent conversion. Its old content
/// past the flush position is never served (restore-wal zero-pads past the flush position),
/// and a segment is sealed only once every byte of it was written anew. The rename never
/// replaces a file: the writer may have created that segment itself meanwhile.
fn recycle(dir: &Path, state: &StoreState, segno: SegmentNo, partial: &Path) -> Result<()> {
    for ahead in 1..=RECYCLE_AHEAD {
        let future = segment_path(dir, state, SegmentNo(segno.0 + ahead), PARTIAL_SUFFIX);
        if segment_path(dir, state, SegmentNo(segno.0 + ahead), SEALED_SUFFIX).exists() {
            continue;
        }
        match nix::fcntl::renameat2(
            None,
            partial,
            None,
            &future,
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        ) {
            Ok(()) => {
                durable::fsync_dir(dir)?;
                return Ok(());
            }
            Err(nix::errno::Errno::EEXIST) => continue,
            // Filesystems without RENAME_NOREPLACE: fall back to removing.
            Err(_) => break,
        }
    }
    durable::remove_durable(partial)?;
    Ok(())
}

fn header(seg_len: u64, crc: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&SKIPPABLE_MAGIC.to_le_bytes());
    h[4..8].copy_from_slice(&24u32.to_le_bytes());
    h[8..16].copy_from_slice(&META_MAGIC);
    h[16..24].copy_from_slice(&seg_len.to_le_bytes());
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    let meta_crc = crc32c::crc32c(&h[8..28]);
    h[28..32].copy_from_slice(&meta_crc.to_le_bytes());
    h
}

/// Decompresses a sealed segment into `out`, checking its length against `seg_len` and its
/// checksum. Returns the checksum. Never writes more than `seg_len` bytes; on any error the
/// bytes already written to `out` must be discarded by the caller.
pub fn read_sealed(path: &Path, seg_len: u64, out: &mut impl Write) -> Result<u32> {
    let f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut r = BufReader::new(f);
    let mut h = [0u8; HEADER_LEN];
    r.read_exact(&mut h)
        .with_context(|| format!("read header of {}", path.display()))?;
    let word = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
    if word(0) != SKIPPABLE_MAGIC || word(4) != 24 || h[8..16] != META_MAGIC {
        bail!("{} is not a walship sealed segment", path.display());
    }
    if crc32c::crc32c(&h[8..28]) != word(28) {
        bail!("{}: metadata checksum mismatch", path.display());
    }
    let len = u64::from_le_bytes(h[16..24].try_into().expect("8 bytes"));
    if len != seg_len {
        bail!(
            "{} holds {len} bytes, expected a {seg_len}-byte segment",
            path.display()
        );
    }
    let want_crc = word(24);
    let mut dec = zstd::stream::read::Decoder::with_buffer(r).context("start decompression")?;
    dec.window_log_max(27).context("configure decompression")?;
    let mut hashing = CrcWriter {
        inner: out,
        crc: 0,
        len: 0,
    };
    io::copy(&mut (&mut dec).take(seg_len + 1), &mut hashing)
        .with_context(|| format!("decompress {}", path.display()))?;
    if hashing.len != seg_len {
        bail!(
            "{} decompresses to {} bytes, expected {seg_len}",
            path.display(),
            hashing.len
        );
    }
    if hashing.crc != want_crc {
        bail!("{}: checksum mismatch (computed {:08x}, recorded {want_crc:08x}): the sealed segment is corrupt", path.display(), hashing.crc);
    }
    Ok(want_crc)
}

struct CrcWriter<'a, W: Write> {
    inner: &'a mut W,
    crc: u32,
    len: u64,
}

impl<W: Write> Write for CrcWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
