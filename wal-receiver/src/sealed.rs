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

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

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
            failed: false,
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

/// A sealed file that is not what it must be: not a sealed segment, damaged or truncated.
/// Unlike an I/O error, reading it again cannot help: the store is corrupt (exit 5).
#[derive(Clone, Debug, thiserror::Error)]
#[error("{}: {why}: the sealed segment is corrupt", path.display())]
pub struct Corrupt {
    pub path: PathBuf,
    pub why: String,
    /// Found so before, by [`Verdicts`], and not read again: already reported.
    pub known: bool,
}

fn corrupt(path: &Path, why: String) -> anyhow::Error {
    Corrupt {
        path: path.to_owned(),
        why,
        known: false,
    }
    .into()
}

/// The [`Corrupt`] error in `e`'s chain, if there is one.
pub fn corruption(e: &anyhow::Error) -> Option<&Corrupt> {
    e.chain().find_map(|c| c.downcast_ref::<Corrupt>())
}

/// Whether `e` says that a sealed file is corrupt (rather than, say, unreadable).
pub fn is_corrupt(e: &anyhow::Error) -> bool {
    corruption(e).is_some()
}

/// What identifies a file's content without reading it: a file replaced, rewritten or
/// repaired gets another inode, size or modification time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

impl FileId {
    fn of(path: &Path) -> Option<FileId> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(FileId {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        })
    }
}

/// Sealed files found corrupt, each with the identity it had then, shared by the readers
/// of one process (the standby served by `follow` asks again and again for a segment it
/// cannot get). A file found corrupt is not decompressed again until it changes.
#[derive(Clone, Default)]
pub struct Verdicts(Arc<Mutex<HashMap<PathBuf, (FileId, String)>>>);

/// Files remembered at most: a store with more corrupt files than this has bigger problems,
/// and those beyond it are only read again.
const VERDICTS_MAX: usize = 64;

impl Verdicts {
    /// [`read_sealed`], unless `path` was found corrupt before and has not changed since;
    /// then that verdict again, a [`Corrupt`] error marked `known`, without reading it.
    pub fn read_sealed(&self, path: &Path, seg_len: u64, out: &mut impl Write) -> Result<u32> {
        let id = FileId::of(path);
        let mut known = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let (Some(id), Some((was, why))) = (id, known.get(path)) {
            if *was == id {
                return Err(Corrupt {
                    path: path.to_owned(),
                    why: why.clone(),
                    known: true,
                }
                .into());
            }
        }
        known.remove(path);
        drop(known);
        let result = read_sealed(path, seg_len, out);
        if let (Err(e), Some(id)) = (&result, id) {
            if let Some(c) = corruption(e) {
                let mut known = self.0.lock().unwrap_or_else(|p| p.into_inner());
                if known.len() < VERDICTS_MAX {
                    known.insert(path.to_owned(), (id, c.why.clone()));
                }
            }
        }
        result
    }
}

/// A sealed segment's content as a stream, after its header is checked: the decoder, and
/// the checksum the header records. The caller must check that checksum before it uses a
/// byte (as [`read_sealed`] does) or have checked it on an earlier pass.
pub fn open_sealed(path: &Path, seg_len: u64) -> Result<(SealedReader, u32)> {
    let f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut r = BufReader::new(f);
    let mut h = [0u8; HEADER_LEN];
    r.read_exact(&mut h).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            corrupt(path, "shorter than its header".into())
        } else {
            anyhow::Error::new(e).context(format!("read header of {}", path.display()))
        }
    })?;
    let word = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
    if word(0) != SKIPPABLE_MAGIC || word(4) != 24 || h[8..16] != META_MAGIC {
        return Err(corrupt(path, "not a walship sealed segment".into()));
    }
    if crc32c::crc32c(&h[8..28]) != word(28) {
        return Err(corrupt(path, "metadata checksum mismatch".into()));
    }
    let len = u64::from_le_bytes(h[16..24].try_into().expect("8 bytes"));
    if len != seg_len {
        return Err(corrupt(
            path,
            format!("holds {len} bytes, expected a {seg_len}-byte segment"),
        ));
    }
    let mut dec = zstd::stream::read::Decoder::with_buffer(r).context("start decompression")?;
    dec.window_log_max(27).context("configure decompression")?;
    Ok((dec, word(24)))
}

/// A sealed segment's decompressed content (see [`open_sealed`]).
pub type SealedReader = zstd::stream::read::Decoder<'static, BufReader<File>>;

/// Decompresses a sealed segment into `out`, checking its length against `seg_len` and its
/// checksum. Returns the checksum. Never writes more than `seg_len` bytes; on any error the
/// bytes already written to `out` must be discarded by the caller. A file that is not an
/// intact sealed segment is a [`Corrupt`] error; failures to read it or to write `out` are
/// not.
pub fn read_sealed(path: &Path, seg_len: u64, out: &mut impl Write) -> Result<u32> {
    let (mut dec, want_crc) = open_sealed(path, seg_len)?;
    let mut hashing = CrcWriter {
        inner: out,
        crc: 0,
        len: 0,
        failed: false,
    };
    if let Err(e) = io::copy(&mut (&mut dec).take(seg_len + 1), &mut hashing) {
        // The decoder reports damaged or truncated data as errors of its own, without an
        // OS error code; a failed read of the file, or of `out`, carries one.
        if hashing.failed || e.raw_os_error().is_some() {
            return Err(e).with_context(|| format!("decompress {}", path.display()));
        }
        return Err(corrupt(path, format!("cannot be decompressed: {e}")));
    }
    if hashing.len != seg_len {
        return Err(corrupt(
            path,
            format!("decompresses to {} bytes, expected {seg_len}", hashing.len),
        ));
    }
    if hashing.crc != want_crc {
        return Err(corrupt(
            path,
            format!(
                "checksum mismatch (computed {:08x}, recorded {want_crc:08x})",
                hashing.crc
            ),
        ));
    }
    Ok(want_crc)
}

struct CrcWriter<'a, W: Write> {
    inner: &'a mut W,
    crc: u32,
    len: u64,
    /// Set when `inner` refused a write: the error is the writer's, not the file's.
    failed: bool,
}

impl<W: Write> Write for CrcWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf).inspect_err(|_| self.failed = true)?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush().inspect_err(|_| self.failed = true)
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

#[cfg(test)]
mod corruption_tests {
    use super::tests::{segment_bytes, state_1m};
    use super::*;

    /// A sealed copy of a segment, in a directory of its own.
    fn sealed_file(tag: &str) -> (PathBuf, PathBuf, Vec<u8>) {
        let dir =
            std::env::temp_dir().join(format!("walship-corrupt-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let state = state_1m();
        let data = segment_bytes(7);
        std::fs::write(
            segment_path(&dir, &state, SegmentNo(1), PARTIAL_SUFFIX),
            &data,
        )
        .unwrap();
        seal_segment(&dir, &state, SegmentNo(1)).unwrap();
        let path = segment_path(&dir, &state, SegmentNo(1), SEALED_SUFFIX);
        (dir, path, data)
    }

    #[test]
    fn damage_is_corruption_and_a_failed_write_is_not() {
        let (dir, path, data) = sealed_file("kinds");
        let good = std::fs::read(&path).unwrap();
        let len = data.len() as u64;
        let damaged = |bytes: &[u8]| {
            std::fs::write(&path, bytes).unwrap();
            let e = read_sealed(&path, len, &mut io::sink()).unwrap_err();
            assert!(is_corrupt(&e), "not taken for corruption: {e:#}");
            assert!(format!("{e:#}").contains("corrupt"), "{e:#}");
        };
        // A flipped byte in the compressed data, in the header, and a cut file.
        let mut flipped = good.clone();
        flipped[good.len() / 2] ^= 0x40;
        damaged(&flipped);
        let mut header = good.clone();
        header[20] ^= 1;
        damaged(&header);
        damaged(&good[..good.len() - 100]);
        damaged(&good[..10]);
        damaged(b"not a sealed segment at all, but long enough for a header");
        // The intact file, into a writer that fails: an error, but not corruption.
        std::fs::write(&path, &good).unwrap();
        struct Full;
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from_raw_os_error(nix::libc::ENOSPC))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let e = read_sealed(&path, len, &mut Full).unwrap_err();
        assert!(!is_corrupt(&e), "a full disk taken for corruption: {e:#}");
        // A file that is not there is not corruption either.
        let e = read_sealed(&dir.join("missing.zst"), len, &mut io::sink()).unwrap_err();
        assert!(!is_corrupt(&e), "{e:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_corrupt_file_is_not_read_again_until_it_changes() {
        let (dir, path, data) = sealed_file("verdicts");
        let good = std::fs::read(&path).unwrap();
        let len = data.len() as u64;
        let mut bad = good.clone();
        bad[good.len() / 2] ^= 0x40;
        std::fs::write(&path, &bad).unwrap();
        let verdicts = Verdicts::default();
        let first = verdicts
            .read_sealed(&path, len, &mut io::sink())
            .unwrap_err();
        assert!(!corruption(&first).unwrap().known, "{first:#}");
        // Asked again, by another reader sharing the verdicts: answered from them, which is
        // what `known` says, without decompressing the file again.
        let second = verdicts
            .clone()
            .read_sealed(&path, len, &mut io::sink())
            .unwrap_err();
        let c = corruption(&second).unwrap();
        assert!(c.known, "read again: {second:#}");
        assert_eq!(c.why, corruption(&first).unwrap().why);
        // Repaired (another inode, size or time): read again, and served.
        let repaired = dir.join("repaired");
        std::fs::write(&repaired, &good).unwrap();
        std::fs::rename(&repaired, &path).unwrap();
        let mut out = Vec::new();
        verdicts.read_sealed(&path, len, &mut out).unwrap();
        assert_eq!(out, data);
        // Damaged again: a fresh verdict, reported anew.
        std::fs::write(&repaired, &bad).unwrap();
        std::fs::rename(&repaired, &path).unwrap();
        let again = verdicts
            .read_sealed(&path, len, &mut io::sink())
            .unwrap_err();
        assert!(!corruption(&again).unwrap().known, "{again:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
