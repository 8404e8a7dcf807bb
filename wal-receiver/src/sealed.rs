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
use std::os::unix::fs::FileExt;
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

/// Bytes read from a `.partial` at a time while sealing: the sealer's memory does not grow
/// with the segment size (up to 1 GiB).
const SEAL_CHUNK: usize = 1 << 20;

/// Seals the complete `.partial` of `segno`, then removes the `.partial`. The segment is
/// read in chunks and compressed as a stream.
pub fn seal_segment(dir: &Path, state: &StoreState, segno: SegmentNo) -> Result<()> {
    let partial = segment_path(dir, state, segno, PARTIAL_SUFFIX);
    let sealed = segment_path(dir, state, segno, SEALED_SUFFIX);
    let seg_len = state.seg_size.bytes();
    let src = File::open(&partial).with_context(|| format!("open {}", partial.display()))?;
    let len = src
        .metadata()
        .with_context(|| format!("stat {}", partial.display()))?
        .len();
    if len != seg_len {
        bail!("{} has {len} bytes, expected {seg_len}", partial.display());
    }
    if sealed.exists() {
        // Sealed before (a crash came between sealing and recycling): accepted only if
        // it holds exactly these bytes. read_sealed checks its own checksum too.
        let mut same = SameAs {
            file: &src,
            offset: 0,
        };
        read_sealed(&sealed, seg_len, &mut same).with_context(|| {
            format!(
                "sealed segment {} already exists with different content than the WAL received; refusing to overwrite it",
                sealed.display()
            )
        })?;
    } else {
        let tmp = durable::temp_path(&sealed);
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .with_context(|| format!("create {}", tmp.display()))?;
        // The header records the checksum of the whole segment: it is written last, in
        // the room left for it here.
        let mut out = io::BufWriter::new(&f);
        out.write_all(&[0u8; HEADER_LEN])
            .with_context(|| format!("write {}", tmp.display()))?;
        let mut enc =
            zstd::stream::write::Encoder::new(out, SEAL_LEVEL).context("start compression")?;
        enc.set_pledged_src_size(Some(seg_len))
            .context("configure compression")?;
        enc.include_contentsize(true)
            .context("configure compression")?;
        let mut hashing = CrcWriter {
            inner: &mut enc,
            crc: 0,
            len: 0,
        };
        let mut chunks = BufReader::with_capacity(SEAL_CHUNK, (&src).take(seg_len));
        io::copy(&mut chunks, &mut hashing)
            .with_context(|| format!("compress {} into {}", partial.display(), tmp.display()))?;
        let crc = hashing.crc;
        if hashing.len != seg_len {
            bail!(
                "{} ended after {} bytes, expected {seg_len}",
                partial.display(),
                hashing.len
            );
        }
        enc.finish()
            .and_then(|mut out| out.flush())
            .with_context(|| format!("write {}", tmp.display()))?;
        f.write_all_at(&header(seg_len, crc), 0)
            .with_context(|| format!("write {}", tmp.display()))?;
        durable::fsync_file(&f, &tmp)?;
        drop(f);
        durable::publish(&tmp, &sealed)?;
    }
    recycle(dir, state, segno, &partial)?;
    tracing::debug!(segment = %sealed.display(), "sealed");
    Ok(())
}

/// A writer that accepts only the bytes `file` holds at the same offsets.
struct SameAs<'a> {
    file: &'a File,
    offset: u64,
}

impl Write for SameAs<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut here = vec![0u8; buf.len()];
        self.file.read_exact_at(&mut here, self.offset)?;
        if here != buf {
            return Err(io::Error::other(format!(
                "the bytes at offset {} differ",
                self.offset
            )));
        }
        self.offset += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
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

/// A sealed segment's content as a stream, after its header is checked: the decoder, and
/// the checksum the header records. The caller must check that checksum before it uses a
/// byte (as [`read_sealed`] does) or have checked it on an earlier pass.
pub fn open_sealed(path: &Path, seg_len: u64) -> Result<(SealedReader, u32)> {
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
    let mut dec = zstd::stream::read::Decoder::with_buffer(r).context("start decompression")?;
    dec.window_log_max(27).context("configure decompression")?;
    Ok((dec, word(24)))
}

/// A sealed segment's decompressed content (see [`open_sealed`]).
pub type SealedReader = zstd::stream::read::Decoder<'static, BufReader<File>>;

/// Decompresses a sealed segment into `out`, checking its length against `seg_len` and its
/// checksum. Returns the checksum. Never writes more than `seg_len` bytes; on any error the
/// bytes already written to `out` must be discarded by the caller.
pub fn read_sealed(path: &Path, seg_len: u64, out: &mut impl Write) -> Result<u32> {
    let (mut dec, want_crc) = open_sealed(path, seg_len)?;
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use walship_common::{Lsn, TimelineId, WalSegSize};

    pub(crate) fn state_1m() -> StoreState {
        StoreState {
            system_id: 1,
            timeline: TimelineId(1),
            seg_size: WalSegSize::new(1 << 20).unwrap(),
            pg_version: 15,
            flush_lsn: Lsn(3 << 20),
            raw_bytes: 0,
            wire_bytes: 0,
        }
    }

    /// A megabyte that compresses, but not to nothing.
    pub(crate) fn segment_bytes(seed: u32) -> Vec<u8> {
        (0..1u32 << 20)
            .map(|i| ((i / 7).wrapping_mul(2654435761).wrapping_add(seed) >> 24) as u8 & 0x3f)
            .collect()
    }

    #[test]
    fn sealing_streams_and_refuses_other_content() {
        let dir = std::env::temp_dir().join(format!("walship-sealed-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let state = state_1m();
        let seg_len = state.seg_size.bytes();
        let partial = segment_path(&dir, &state, SegmentNo(1), PARTIAL_SUFFIX);
        let sealed = segment_path(&dir, &state, SegmentNo(1), SEALED_SUFFIX);
        let data = segment_bytes(1);
        std::fs::write(&partial, &data).unwrap();
        seal_segment(&dir, &state, SegmentNo(1)).unwrap();
        assert!(!partial.exists(), "the .partial was not recycled");
        let mut back = Vec::new();
        let crc = read_sealed(&sealed, seg_len, &mut back).unwrap();
        assert_eq!(back, data);
        assert_eq!(crc, crc32c::crc32c(&data));
        let on_disk = std::fs::read(&sealed).unwrap();
        assert!(on_disk.len() < data.len() / 2, "not compressed");

        // The same bytes again (a crash between sealing and recycling): accepted.
        std::fs::write(&partial, &data).unwrap();
        seal_segment(&dir, &state, SegmentNo(1)).unwrap();
        // Other bytes, even one: refused, and the sealed file stays as it was.
        let mut other = data.clone();
        other[700_000] ^= 1;
        std::fs::write(&partial, &other).unwrap();
        let e = seal_segment(&dir, &state, SegmentNo(1)).unwrap_err();
        assert!(format!("{e:#}").contains("different content"), "{e:#}");
        assert_eq!(std::fs::read(&sealed).unwrap(), on_disk);
        // A short .partial is not sealed.
        std::fs::write(&partial, &data[..1000]).unwrap();
        assert!(seal_segment(&dir, &state, SegmentNo(1)).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
