//! Where valid WAL ends in a segment, found the way PostgreSQL's recovery finds it.
//!
//! The store records its flush position in `state`, but fdatasyncs that file only when the
//! position enters a new segment (see [`crate::store`]). After a crash the recorded position
//! may lag behind WAL that was fsynced and acknowledged. [`valid_end`] walks the segment's
//! records from its first page and returns the end of the last record that is whole and
//! valid:
//!
//! - every page header has the magic of the store's PostgreSQL major version, the page's own
//!   address (`xlp_pageaddr`), a plausible timeline, never lower than an earlier page's, and
//!   the continuation flag and length a record spanning pages needs;
//! - the first page's long header names the store's system identifier, segment size and a
//!   sane page size;
//! - every record has a sane length, points back at the record before it (`xl_prev`), and
//!   matches its CRC-32C.
//!
//! The walker stops at the first thing that does not hold: zeros past the written end, a
//! torn write, the old pages of a recycled segment file. Its answer is only ever used to move
//! the position *forward* from what `state` recorded, so stopping early is always safe.
//! It reads one page at a time, so memory does not grow with the segment size, and it never
//! reads past the segment.
//!
//! PostgreSQL 15 to 18 lay out pages, record headers and transaction end records the same
//! way; only the page magic (`XLOG_PAGE_MAGIC`) changes with each major version. WAL of a
//! version not in [`MAJORS`] is refused ([`UnknownFormat`]) rather than read by guesswork.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use walship_common::{Lsn, TimelineId};

/// The PostgreSQL major versions whose WAL format this module reads.
pub const MAJORS: std::ops::RangeInclusive<u32> = 15..=18;

/// `XLOG_PAGE_MAGIC` (`src/include/access/xlog_internal.h`) of each major version in
/// [`MAJORS`]: the first two bytes of every WAL page.
const PAGE_MAGICS: [(u32, u16); 4] = [(15, 0xD110), (16, 0xD113), (17, 0xD116), (18, 0xD118)];

/// The page magic of PostgreSQL `major`'s WAL, if this module knows that format.
pub fn page_magic(major: u32) -> Option<u16> {
    PAGE_MAGICS
        .iter()
        .find(|&&(m, _)| m == major)
        .map(|&(_, magic)| magic)
}

/// Whether this module reads the WAL of PostgreSQL `major` (0, a store that did not record
/// its version, is not known).
pub fn knows(major: u32) -> bool {
    page_magic(major).is_some()
}

/// The error for WAL of a PostgreSQL major version this module does not read.
#[derive(Debug, thiserror::Error)]
#[error("{}", unknown_format_message(*major))]
pub struct UnknownFormat {
    /// The major version recorded for the WAL (0 when none was).
    pub major: u32,
}

fn unknown_format_message(major: u32) -> String {
    let known = format!(
        "this wal-receiver reads the WAL of PostgreSQL {} to {}",
        MAJORS.start(),
        MAJORS.end()
    );
    if major == 0 {
        format!("the store does not record which PostgreSQL version its WAL is of (it was made by an older wal-receiver); {known}")
    } else {
        format!("the WAL is PostgreSQL {major}'s, whose format is not known; {known}")
    }
}

const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
const XLP_LONG_HEADER: u16 = 0x0002;
const XLP_FIRST_IS_OVERWRITE_CONTRECORD: u16 = 0x0008;
const XLP_ALL_FLAGS: u16 = 0x000F;
const SHORT_HEADER: u64 = 24;
const LONG_HEADER: u64 = 40;
const RECORD_HEADER: u64 = 24;
/// Bytes of the record header the CRC covers (all but `xl_crc`).
const RECORD_HEADER_CRC: usize = 20;
const RM_XLOG_ID: u8 = 0;
const XLOG_SWITCH: u8 = 0x40;
const XLOG_OVERWRITE_CONTRECORD: u8 = 0xD0;
const RM_XACT_ID: u8 = 1;
const XLOG_XACT_OPMASK: u8 = 0x70;
/// `XLOG_XACT_COMMIT`, `_ABORT`, `_COMMIT_PREPARED` and `_ABORT_PREPARED`: the records a
/// recovery target time is compared with (`recoveryStopsBefore`).
const XACT_ENDS: [u8; 4] = [0x00, 0x20, 0x30, 0x40];
/// Transaction end records longer than this are not inspected for their time. Commit
/// records are short unless they carry thousands of subtransactions or dropped relations.
const XACT_INSPECT_MAX: u64 = 64 * 1024;

/// Where the walker reads a segment's bytes from.
pub trait SegmentSource {
    /// Fills `buf` with the bytes at `offset`; `Ok(false)` if the source ends before.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<bool>;
}

impl<T: SegmentSource + ?Sized> SegmentSource for &mut T {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<bool> {
        (**self).read_at(offset, buf)
    }
}

impl SegmentSource for &[u8] {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<bool> {
        let src = usize::try_from(offset)
            .ok()
            .and_then(|o| self.get(o..o.checked_add(buf.len())?));
        match src {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

impl SegmentSource for &File {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<bool> {
        match self.read_exact_at(buf, offset) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// What the segment must belong to.
#[derive(Clone, Copy, Debug)]
pub struct Expect {
    /// LSN of the segment's first byte.
    pub start: Lsn,
    pub seg_size: u64,
    pub system_id: u64,
    /// The store's timeline: no page may carry a later one.
    pub timeline: TimelineId,
    /// The PostgreSQL major version the store records: it decides the page magic.
    pub pg_major: u32,
}

/// The end of the last whole, valid record that starts in the segment (with its alignment
/// padding, if that is zero, as PostgreSQL counts it), or `None` if there is none (or the
/// first page is not this segment's). A record that continues into the
/// next segment is not counted. An `XLOG_SWITCH` record ends the walk: the rest of the
/// segment is padding. WAL of a major version not in [`MAJORS`] is an error of kind
/// `Unsupported` that wraps [`UnknownFormat`].
pub fn valid_end(src: impl SegmentSource, expect: Expect) -> io::Result<Option<Lsn>> {
    Ok(scan(src, expect, None)?.end)
}

/// The time of a transaction's end, as its commit or abort record carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XactTime {
    /// Microseconds since 2000-01-01 00:00:00 UTC (PostgreSQL's `TimestampTz`).
    At(i64),
    /// The record was too long, or not laid out as expected, to read the time from.
    Unknown,
}

/// The last transaction end (commit or abort, prepared or not) found in a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XactEnd {
    /// Where its record starts.
    pub lsn: Lsn,
    pub time: XactTime,
}

/// What a walk over a segment found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Scan {
    /// As [`valid_end`] returns it.
    pub end: Option<Lsn>,
    /// The last transaction end among the records walked.
    pub last_xact: Option<XactEnd>,
}

/// Walks the segment as [`valid_end`] does, and also notes its last transaction end.
/// With `limit`, records that end past it are not walked (WAL not yet fsynced).
pub fn scan(src: impl SegmentSource, expect: Expect, limit: Option<Lsn>) -> io::Result<Scan> {
    match Walker::new(src, expect)? {
        Some(mut w) => w.walk(limit),
        None => Ok(Scan::default()),
    }
}

/// The `xact_time` of a transaction end record, from its bytes after the 24-byte header:
/// optional origin and top-level xid headers, the main data header, then the main data
/// (`xl_xact_commit` or `xl_xact_abort`, both starting with `xact_time`). `None` if the
/// record is not laid out that way (a transaction end has no block references).
fn xact_time(body: &[u8]) -> Option<i64> {
    let mut i = 0usize;
    let main_len = loop {
        match *body.get(i)? {
            // XLR_BLOCK_ID_DATA_SHORT: one length byte.
            255 => {
                i += 2;
                break *body.get(i - 1)? as usize;
            }
            // XLR_BLOCK_ID_DATA_LONG: a four-byte length.
            254 => {
                i += 5;
                break u32_at(body.get(i - 4..i)?, 0) as usize;
            }
            // XLR_BLOCK_ID_ORIGIN (a RepOriginId), XLR_BLOCK_ID_TOPLEVEL_XID (an xid).
            253 => i += 3,
            252 => i += 5,
            _ => return None,
        }
    };
    if body.len().checked_sub(main_len)? != i || main_len < 8 {
        return None;
    }
    Some(u64_at(body, i) as i64)
}

struct Walker<S> {
    src: S,
    expect: Expect,
    magic: u16,
    blcksz: u64,
    page: Vec<u8>,
    /// Offset of the page in `page`, once one is loaded.
    loaded: Option<u64>,
    /// The offset and timeline of the furthest page whose header was found valid.
    latest_page: Option<(u64, u32)>,
}

/// How a walk over one record's bytes ended.
enum Span {
    /// At this offset, whole.
    End(u64),
    /// At a page that abandons the record (`XLP_FIRST_IS_OVERWRITE_CONTRECORD`); WAL goes
    /// on at this offset.
    Abandoned(u64),
    /// At something that does not continue it, or at the end of the segment.
    Broken,
}

enum Record {
    Valid {
        end: u64,
        rmid: u8,
        info: u8,
        xact: Option<XactTime>,
    },
    Abandoned(u64),
    Invalid,
}

/// What a page header says, once checked.
struct PageHeader {
    info: u16,
    rem_len: u32,
    len: u64,
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"))
}

fn maxalign(x: u64) -> u64 {
    (x + 7) & !7
}

impl<S: SegmentSource> Walker<S> {
    /// Checks the long header of the first page; `None` if it is not this segment's.
    fn new(mut src: S, expect: Expect) -> io::Result<Option<Walker<S>>> {
        let magic = page_magic(expect.pg_major).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::Unsupported,
                UnknownFormat {
                    major: expect.pg_major,
                },
            )
        })?;
        let mut long = [0u8; LONG_HEADER as usize];
        if !src.read_at(0, &mut long)? {
            return Ok(None);
        }
        let blcksz = u32_at(&long, 36) as u64;
        if u64_at(&long, 24) != expect.system_id
            || u32_at(&long, 32) as u64 != expect.seg_size
            || !blcksz.is_power_of_two()
            || !(1024..=65536).contains(&blcksz)
            || !expect.seg_size.is_multiple_of(blcksz)
        {
            return Ok(None);
        }
        Ok(Some(Walker {
            src,
            expect,
            magic,
            blcksz,
            // Bounded by the check above: at most 64 KiB.
            page: vec![0; blcksz as usize],
            loaded: None,
            latest_page: None,
        }))
    }

    /// `len` bytes at `off`, which must not cross a page boundary; `None` past the end.
    fn bytes(&mut self, off: u64, len: u64) -> io::Result<Option<&[u8]>> {
        let page_off = off - off % self.blcksz;
        if off + len > page_off + self.blcksz || page_off >= self.expect.seg_size {
            return Ok(None);
        }
        if self.loaded != Some(page_off) {
            self.loaded = None;
            if !self.src.read_at(page_off, &mut self.page)? {
                return Ok(None);
            }
            self.loaded = Some(page_off);
        }
        let i = (off - page_off) as usize;
        Ok(Some(&self.page[i..i + len as usize]))
    }

    /// The header of the page at `off` (a page boundary), if it is valid for this segment.
    fn page_header(&mut self, off: u64) -> io::Result<Option<PageHeader>> {
        let (expect, magic) = (self.expect, self.magic);
        let latest_page = self.latest_page;
        let long = off == 0;
        let len = if long { LONG_HEADER } else { SHORT_HEADER };
        let Some(h) = self.bytes(off, len)? else {
            return Ok(None);
        };
        let info = u16_at(h, 2);
        let tli = u32_at(h, 4);
        let rem_len = u32_at(h, 16);
        // A child timeline always has a higher id than its parent: going on, the timeline
        // never goes back (PostgreSQL's "out-of-sequence timeline ID").
        let in_sequence = match latest_page {
            Some((latest, latest_tli)) if off > latest => tli >= latest_tli,
            _ => true,
        };
        let valid = u16_at(h, 0) == magic
            && info & !XLP_ALL_FLAGS == 0
            && (info & XLP_LONG_HEADER != 0) == long
            && tli != 0
            && tli <= expect.timeline.0
            && in_sequence
            && u64_at(h, 8) == expect.start.0 + off;
        if valid && latest_page.is_none_or(|(latest, _)| off > latest) {
            self.latest_page = Some((off, tli));
        }
        Ok(valid.then_some(PageHeader { info, rem_len, len }))
    }

    fn walk(&mut self, limit: Option<Lsn>) -> io::Result<Scan> {
        let seg_size = self.expect.seg_size;
        let mut found = Scan::default();
        let Some(first) = self.page_header(0)? else {
            return Ok(found);
        };
        let mut pos = first.len;
        if first.info & XLP_FIRST_IS_CONTRECORD != 0 {
            // The tail of a record that began in the previous segment: skip it.
            pos = match self.span(pos, first.rem_len as u64, |_| {})? {
                Span::End(tail_end) => maxalign(tail_end),
                Span::Abandoned(next) => next,
                Span::Broken => return Ok(found),
            };
        }
        let mut prev: Option<u64> = None;
        // After an abandoned record, the next must say so (XLOG_OVERWRITE_CONTRECORD).
        let mut abandoned = false;
        while pos < seg_size {
            if pos.is_multiple_of(self.blcksz) {
                match self.page_header(pos)? {
                    // A record begins here, so the page must not claim to continue one.
                    Some(h) if h.info & XLP_FIRST_IS_CONTRECORD == 0 => pos += h.len,
                    _ => break,
                }
            }
            let (rec_end, rmid, info, xact) = match self.record(pos, prev)? {
                Record::Valid {
                    end,
                    rmid,
                    info,
                    xact,
                } if !abandoned
                    || (rmid == RM_XLOG_ID && info & 0xF0 == XLOG_OVERWRITE_CONTRECORD) =>
                {
                    (end, rmid, info, xact)
                }
                Record::Valid { .. } | Record::Invalid => break,
                // The primary crashed in the middle of this record, and on restart wrote
                // over the rest: WAL goes on at the page that says so, with a record that
                // points back at the one before the abandoned record.
                Record::Abandoned(next) if !abandoned => {
                    pos = next;
                    abandoned = true;
                    continue;
                }
                Record::Abandoned(_) => break,
            };
            if limit.is_some_and(|l| self.expect.start.0 + rec_end > l.0) {
                break;
            }
            abandoned = false;
            if let Some(time) = xact {
                found.last_xact = Some(XactEnd {
                    lsn: Lsn(self.expect.start.0 + pos),
                    time,
                });
            }
            // PostgreSQL's positions count the zero padding up to the next record's aligned
            // start; so does this, where the padding is there.
            let aligned = maxalign(rec_end);
            let padded = aligned > rec_end
                && self
                    .bytes(rec_end, aligned - rec_end)?
                    .is_some_and(|pad| pad.iter().all(|&b| b == 0));
            found.end = Some(Lsn(
                self.expect.start.0 + if padded { aligned } else { rec_end }
            ));
            if rmid == RM_XLOG_ID && info & 0xF0 == XLOG_SWITCH {
                break;
            }
            prev = Some(self.expect.start.0 + pos);
            pos = maxalign(rec_end);
        }
        Ok(found)
    }

    fn page_end(&self, pos: u64) -> u64 {
        pos - pos % self.blcksz + self.blcksz
    }

    /// Walks `len` bytes of one record from `pos`, across the headers of the pages that
    /// continue it, handing each piece to `visit`.
    fn span(&mut self, mut pos: u64, len: u64, mut visit: impl FnMut(&[u8])) -> io::Result<Span> {
        let mut remaining = len;
        loop {
            let take = remaining.min(self.page_end(pos) - pos);
            let Some(chunk) = self.bytes(pos, take)? else {
                return Ok(Span::Broken);
            };
            visit(chunk);
            pos += take;
            remaining -= take;
            if remaining == 0 {
                return Ok(Span::End(pos));
            }
            if pos >= self.expect.seg_size {
                return Ok(Span::Broken);
            }
            let flags = XLP_FIRST_IS_CONTRECORD | XLP_FIRST_IS_OVERWRITE_CONTRECORD;
            match self.page_header(pos)? {
                Some(h)
                    if h.info & flags == XLP_FIRST_IS_CONTRECORD
                        && h.rem_len as u64 == remaining =>
                {
                    pos += h.len
                }
                Some(h) if h.info & flags == XLP_FIRST_IS_OVERWRITE_CONTRECORD => {
                    return Ok(Span::Abandoned(pos + h.len))
                }
                _ => return Ok(Span::Broken),
            }
        }
    }

    /// The record starting at `pos` (MAXALIGNed, past any page header): its end offset,
    /// resource manager and info, if it is whole inside the segment and valid.
    fn record(&mut self, pos: u64, prev: Option<u64>) -> io::Result<Record> {
        // Records are 8-aligned and so are page headers: the length is on this page.
        let Some(b) = self.bytes(pos, 4)? else {
            return Ok(Record::Invalid);
        };
        let tot_len = u32_at(b, 0) as u64;
        if tot_len < RECORD_HEADER || tot_len > self.expect.seg_size {
            return Ok(Record::Invalid);
        }
        let mut header = [0u8; RECORD_HEADER as usize];
        let mut have = 0usize;
        let mut crc = 0u32;
        // The body of a short transaction end record, kept to read its time from.
        let mut xact_body: Option<Vec<u8>> = None;
        // The header first (it may span pages too), then the body into the CRC.
        let visit = |chunk: &[u8]| {
            let h = (header.len().saturating_sub(have)).min(chunk.len());
            if h > 0 {
                header[have..have + h].copy_from_slice(&chunk[..h]);
                if have + h == header.len() && is_xact_end(header[17], header[16]) {
                    // Bounded: tot_len was checked against XACT_INSPECT_MAX.
                    xact_body = (tot_len <= XACT_INSPECT_MAX)
                        .then(|| Vec::with_capacity((tot_len - RECORD_HEADER) as usize));
                }
            }
            crc = crc32c::crc32c_append(crc, &chunk[h..]);
            if let Some(body) = xact_body.as_mut() {
                body.extend_from_slice(&chunk[h..]);
            }
            have += chunk.len();
        };
        let p = match self.span(pos, tot_len, visit)? {
            Span::End(p) => p,
            Span::Abandoned(next) => return Ok(Record::Abandoned(next)),
            Span::Broken => return Ok(Record::Invalid),
        };
        let crc = crc32c::crc32c_append(crc, &header[..RECORD_HEADER_CRC]);
        let xl_prev = u64_at(&header, 8);
        let start = self.expect.start.0 + pos;
        let prev_ok = match prev {
            Some(prev) => xl_prev == prev,
            None => xl_prev < start,
        };
        if crc != u32_at(&header, 20) || !prev_ok {
            return Ok(Record::Invalid);
        }
        let (rmid, info) = (header[17], header[16]);
        let xact = is_xact_end(rmid, info).then(|| {
            xact_body
                .as_deref()
                .and_then(xact_time)
                .map_or(XactTime::Unknown, XactTime::At)
        });
        Ok(Record::Valid {
            end: p,
            rmid,
            info,
            xact,
        })
    }
}

fn is_xact_end(rmid: u8, info: u8) -> bool {
    rmid == RM_XACT_ID && XACT_ENDS.contains(&(info & XLOG_XACT_OPMASK))
}

#[cfg(test)]
pub mod tests {
    use super::*;

    pub const BLCKSZ: u64 = 8192;

    /// Lays out WAL the way PostgreSQL writes it, for tests: returns the segment's bytes
    /// (zero after the last record) and the end offset of each record.
    #[derive(Clone)]
    pub struct WalBuilder {
        pub start: u64,
        pub seg_size: u64,
        pub system_id: u64,
        pub tli: u32,
        pub pg_major: u32,
        pub bytes: Vec<u8>,
        pub pos: u64,
        prev: u64,
        pub starts: Vec<u64>,
        pub ends: Vec<u64>,
    }

    impl WalBuilder {
        /// A segment of PostgreSQL 15 WAL at `start` whose first `cont` bytes finish a record
        /// of the previous one.
        pub fn new(start: u64, seg_size: u64, system_id: u64, cont: u32) -> WalBuilder {
            WalBuilder::of(15, start, seg_size, system_id, cont)
        }

        /// [`WalBuilder::new`] for PostgreSQL `pg_major`.
        pub fn of(
            pg_major: u32,
            start: u64,
            seg_size: u64,
            system_id: u64,
            cont: u32,
        ) -> WalBuilder {
            let mut b = WalBuilder {
                start,
                seg_size,
                system_id,
                tli: 1,
                pg_major,
                bytes: vec![0; seg_size as usize],
                pos: 0,
                prev: start.saturating_sub(64),
                starts: Vec::new(),
                ends: Vec::new(),
            };
            b.page_header(0, cont);
            b.pos = LONG_HEADER;
            let mut left = cont as u64;
            while left > 0 {
                let take = left.min(b.page_end() - b.pos);
                b.pos += take;
                left -= take;
                if left > 0 {
                    b.page_header(b.pos, left as u32);
                    b.pos += SHORT_HEADER;
                }
            }
            b.pos = maxalign(b.pos);
            b
        }

        fn page_end(&self) -> u64 {
            self.pos - self.pos % BLCKSZ + BLCKSZ
        }

        fn page_header(&mut self, off: u64, rem_len: u32) {
            let mut info: u16 = if rem_len > 0 {
                XLP_FIRST_IS_CONTRECORD
            } else {
                0
            };
            if off == 0 {
                info |= XLP_LONG_HEADER;
            }
            let h = &mut self.bytes[off as usize..];
            let magic = page_magic(self.pg_major).expect("a known major");
            h[0..2].copy_from_slice(&magic.to_le_bytes());
            h[2..4].copy_from_slice(&info.to_le_bytes());
            h[4..8].copy_from_slice(&self.tli.to_le_bytes());
            h[8..16].copy_from_slice(&(self.start + off).to_le_bytes());
            h[16..20].copy_from_slice(&rem_len.to_le_bytes());
            if off == 0 {
                h[24..32].copy_from_slice(&self.system_id.to_le_bytes());
                h[32..36].copy_from_slice(&(self.seg_size as u32).to_le_bytes());
                h[36..40].copy_from_slice(&(BLCKSZ as u32).to_le_bytes());
            }
        }

        /// Appends a record with `body` (rmid 1 unless `switch`); false if it does not fit.
        pub fn record(&mut self, body: &[u8], switch: bool) -> bool {
            if switch {
                self.record_of(RM_XLOG_ID, XLOG_SWITCH, body)
            } else {
                self.record_of(1, 0x10, body)
            }
        }

        /// Appends a record of resource manager `rmid` with `info`.
        pub fn record_of(&mut self, rmid: u8, info: u8, body: &[u8]) -> bool {
            let tot = RECORD_HEADER + body.len() as u64;
            let mut rec = vec![0u8; tot as usize];
            rec[0..4].copy_from_slice(&(tot as u32).to_le_bytes());
            rec[4..8].copy_from_slice(&7u32.to_le_bytes());
            rec[8..16].copy_from_slice(&self.prev.to_le_bytes());
            rec[16] = info;
            rec[17] = rmid;
            rec[24..].copy_from_slice(body);
            let crc = crc32c::crc32c_append(crc32c::crc32c(&rec[24..]), &rec[..20]);
            rec[20..24].copy_from_slice(&crc.to_le_bytes());
            let start = self.pos;
            let mut at = 0usize;
            let mut p = self.pos;
            while at < rec.len() {
                if p.is_multiple_of(BLCKSZ) {
                    if p >= self.seg_size {
                        return false;
                    }
                    self.page_header(p, (rec.len() - at) as u32);
                    p += SHORT_HEADER;
                }
                let take = (rec.len() - at).min((p - p % BLCKSZ + BLCKSZ - p) as usize);
                self.bytes[p as usize..p as usize + take].copy_from_slice(&rec[at..at + take]);
                at += take;
                p += take as u64;
            }
            self.prev = self.start + start;
            self.starts.push(start);
            self.ends.push(p);
            self.pos = maxalign(p);
            if self.pos.is_multiple_of(BLCKSZ) && self.pos < self.seg_size {
                self.page_header(self.pos, 0);
                self.pos += SHORT_HEADER;
            }
            true
        }

        /// Turns the last record, which must span a page boundary, into one the primary
        /// abandoned by crashing: the page where it continues is written over, flagged
        /// `XLP_FIRST_IS_OVERWRITE_CONTRECORD`, as PostgreSQL 15 does on restart. Returns
        /// that page's offset.
        pub fn abandon_last(&mut self) -> u64 {
            let start = self.starts.pop().expect("a record");
            self.ends.pop();
            // The record that follows points back at the one before the abandoned record.
            self.prev = self.start + self.starts.last().copied().unwrap_or(0);
            let page = start - start % BLCKSZ + BLCKSZ;
            assert!(page < self.pos, "the record spans a page");
            self.bytes[page as usize..].fill(0);
            self.page_header(page, 0);
            self.bytes[page as usize + 2..page as usize + 4]
                .copy_from_slice(&XLP_FIRST_IS_OVERWRITE_CONTRECORD.to_le_bytes());
            self.pos = page + SHORT_HEADER;
            page
        }

        pub fn expect(&self) -> Expect {
            Expect {
                start: Lsn(self.start),
                seg_size: self.seg_size,
                system_id: self.system_id,
                timeline: TimelineId(self.tli),
                pg_major: self.pg_major,
            }
        }

        /// Where record `i` ends, with its (zero) alignment padding.
        pub fn end_of(&self, i: usize) -> Option<Lsn> {
            Some(Lsn(self.start + maxalign(self.ends[i])))
        }
    }

    const SEG: u64 = 1 << 20;
    const START: u64 = 5 << 20;

    /// Bodies of varied sizes: small, spanning one page boundary, spanning several.
    fn body(i: usize) -> Vec<u8> {
        let len = [40usize, 3, 9000, 117, 20000, 0, 8150, 64][i % 8];
        (0..len).map(|j| (i * 31 + j) as u8).collect()
    }

    fn built(cont: u32, n: usize) -> WalBuilder {
        let mut b = WalBuilder::new(START, SEG, 42, cont);
        for i in 0..n {
            assert!(b.record(&body(i), false));
        }
        b
    }

    fn end(bytes: &[u8], e: Expect) -> Option<Lsn> {
        valid_end(bytes, e).unwrap()
    }

    #[test]
    fn finds_the_end_of_the_last_record() {
        for cont in [0, 100, 8000, 20000] {
            let b = built(cont, 40);
            assert_eq!(end(&b.bytes, b.expect()), b.end_of(39), "cont {cont}");
        }
    }

    #[test]
    fn each_known_major_is_read_with_its_own_page_magic_only() {
        for major in MAJORS {
            let mut b = WalBuilder::of(major, START, SEG, 42, 100);
            for i in 0..20 {
                assert!(b.record(&body(i), false));
            }
            assert_eq!(
                end(&b.bytes, b.expect()),
                b.end_of(19),
                "PostgreSQL {major}"
            );
            // The same bytes taken for another version's WAL hold nothing valid.
            for other in MAJORS.filter(|&m| m != major) {
                let e = Expect {
                    pg_major: other,
                    ..b.expect()
                };
                assert_eq!(end(&b.bytes, e), None, "{major}'s WAL read as {other}'s");
            }
        }
    }

    #[test]
    fn wal_of_an_unknown_major_is_refused_not_guessed() {
        let b = built(0, 5);
        for major in [0, 14, 19] {
            let e = Expect {
                pg_major: major,
                ..b.expect()
            };
            let err = valid_end(b.bytes.as_slice(), e).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::Unsupported);
            let msg = err.to_string();
            assert!(msg.contains("PostgreSQL 15 to 18"), "{msg}");
            if major != 0 {
                assert!(msg.contains(&format!("PostgreSQL {major}'s")), "{msg}");
            }
            assert!(scan(b.bytes.as_slice(), e, None).is_err());
            assert!(!knows(major));
        }
    }

    #[test]
    fn a_record_header_split_across_pages_is_read() {
        let mut b = WalBuilder::new(START, SEG, 42, 0);
        // Fill the first page up to 8 bytes before its end, then a record whose header
        // spans the boundary.
        let first = (BLCKSZ - 8 - LONG_HEADER - RECORD_HEADER) as usize;
        assert!(b.record(&vec![1u8; first], false));
        assert_eq!(b.pos, BLCKSZ - 8);
        assert!(b.record(b"spans", false));
        assert!(b.record(b"after", false));
        assert_eq!(end(&b.bytes, b.expect()), b.end_of(2));
    }

    #[test]
    fn stops_at_damage_zeros_and_foreign_pages() {
        let b = built(0, 40);
        // A flipped byte in record 10's body: the end is record 9's.
        let rec10 = maxalign(b.ends[9]) as usize;
        let mut bad = b.bytes.clone();
        bad[rec10 + 30] ^= 0x40;
        assert_eq!(end(&bad, b.expect()), b.end_of(9));
        // Zeros from the middle of record 20: a torn tail.
        let mut torn = b.bytes.clone();
        let mid = (b.ends[19] + b.ends[20]) as usize / 2;
        torn[mid..].fill(0);
        assert_eq!(end(&torn, b.expect()), b.end_of(19));
        // A page of another segment (a recycled file's old bytes) where record 30 spans.
        let page = (b.ends[30] - b.ends[30] % BLCKSZ) as usize;
        assert!(page as u64 > maxalign(b.ends[29]), "record 30 spans a page");
        let mut foreign = b.bytes.clone();
        let addr = u64_at(&foreign, page + 8) - SEG;
        foreign[page + 8..page + 16].copy_from_slice(&addr.to_le_bytes());
        assert_eq!(end(&foreign, b.expect()), b.end_of(29));
        // Padding that is not zero is not counted.
        let b3 = built(0, 34);
        assert_ne!(b3.ends[33] % 8, 0, "record 33 needs padding");
        let mut dirty = b3.bytes.clone();
        dirty[b3.ends[33] as usize] = 0xFF;
        assert_eq!(end(&dirty, b3.expect()), Some(Lsn(START + b3.ends[33])));
        // A wrong xl_prev (the record is otherwise valid: its CRC covers the header).
        let mut b2 = built(0, 5);
        b2.prev += 8;
        assert!(b2.record(b"bad link", false));
        assert_eq!(end(&b2.bytes, b2.expect()), b2.end_of(4));
    }

    #[test]
    fn the_first_page_must_be_this_segments() {
        let b = built(0, 3);
        let other = Expect {
            start: Lsn(START + SEG),
            ..b.expect()
        };
        assert_eq!(end(&b.bytes, other), None);
        let other = Expect {
            system_id: 43,
            ..b.expect()
        };
        assert_eq!(end(&b.bytes, other), None);
        let other = Expect {
            timeline: TimelineId(0),
            ..b.expect()
        };
        assert_eq!(end(&b.bytes, other), None);
        assert_eq!(end(&[0u8; 30], b.expect()), None);
        let garbage: Vec<u8> = (0..SEG).map(|i| (i % 251) as u8).collect();
        assert_eq!(end(&garbage, b.expect()), None);
    }

    #[test]
    fn a_record_running_into_the_next_segment_is_not_counted() {
        let mut b = WalBuilder::new(START, SEG, 42, 0);
        let mut i = 0;
        while b.record(&body(i), false) {
            i += 1;
        }
        let whole = b.ends.len() - 1;
        assert_eq!(end(&b.bytes, b.expect()), b.end_of(whole));
    }

    #[test]
    fn a_record_abandoned_by_a_primary_crash_is_skipped() {
        let mut b = built(0, 3);
        assert!(b.record(&[9u8; 9000], false));
        let page = b.abandon_last() as usize;
        let mut other = b.clone();
        assert!(b.record_of(RM_XLOG_ID, XLOG_OVERWRITE_CONTRECORD, b"overwritten lsn"));
        assert!(b.record(b"more", false));
        assert_eq!(b.ends.len(), 5);
        assert_eq!(end(&b.bytes, b.expect()), b.end_of(4));
        // Any other record where the overwrite record belongs ends the walk.
        assert!(other.record(b"not an overwrite record", false));
        assert_eq!(end(&other.bytes, other.expect()), other.end_of(2));
        // Without the flag, the page neither continues the record nor abandons it.
        let mut plain = b.bytes.clone();
        plain[page + 2..page + 4].fill(0);
        assert_eq!(end(&plain, b.expect()), b.end_of(2));
        // Both flags at once is not a page PostgreSQL writes.
        let both = XLP_FIRST_IS_OVERWRITE_CONTRECORD | XLP_FIRST_IS_CONTRECORD;
        plain[page + 2..page + 4].copy_from_slice(&both.to_le_bytes());
        assert_eq!(end(&plain, b.expect()), b.end_of(2));
    }

    #[test]
    fn a_switch_record_ends_the_walk() {
        let mut b = built(0, 3);
        assert!(b.record(b"", true));
        // Whatever follows a switch is padding, even if it looks like records.
        assert!(b.record(b"after the switch", false));
        assert_eq!(end(&b.bytes, b.expect()), b.end_of(3));
    }

    #[test]
    fn a_timeline_going_back_ends_the_walk() {
        let b = built(0, 24);
        let cut = 3 * BLCKSZ;
        assert!(
            b.pos > cut + BLCKSZ,
            "the WAL goes past the page where it is cut"
        );
        // Pages before `cut` on timeline 2, the rest on timeline 1 (as if a page of the
        // parent timeline followed): the walk ends at `cut`.
        let mut bytes = b.bytes.clone();
        let mut e = b.expect();
        e.timeline = TimelineId(2);
        for page in (0..cut).step_by(BLCKSZ as usize) {
            bytes[page as usize + 4..page as usize + 8].copy_from_slice(&2u32.to_le_bytes());
        }
        let whole = b.ends.iter().rposition(|&end| end <= cut).unwrap();
        assert_eq!(end(&bytes, e), b.end_of(whole));
        // The same WAL all on timeline 1, or going up from 1 to 2, is walked to its end.
        assert_eq!(end(&b.bytes, e), b.end_of(b.ends.len() - 1));
        let mut up = b.bytes.clone();
        for page in (cut..SEG).step_by(BLCKSZ as usize) {
            up[page as usize + 4..page as usize + 8].copy_from_slice(&2u32.to_le_bytes());
        }
        assert_eq!(end(&up, e), b.end_of(b.ends.len() - 1));
    }

    /// The body of a commit record: optional origin, the main data header, `xl_xact_commit`.
    fn commit_body(time: i64, origin: bool) -> Vec<u8> {
        let mut b = Vec::new();
        if origin {
            b.extend_from_slice(&[253, 1, 0]);
        }
        b.extend_from_slice(&[255, 12]);
        b.extend_from_slice(&time.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b
    }

    #[test]
    fn the_last_transaction_end_and_its_time_are_found() {
        let mut b = built(0, 3);
        assert!(b.record_of(1, 0x00, &commit_body(1_000, false)));
        // XLOG_XACT_COMMIT with XLOG_XACT_HAS_INFO (0x80).
        assert!(b.record_of(1, 0x80, &commit_body(2_000, true)));
        let abort_at = b.pos;
        assert!(b.record_of(1, 0x20, &commit_body(3_000, false)));
        // A PREPARE (0x10) and other resource managers are not transaction ends.
        assert!(b.record_of(1, 0x10, &commit_body(9_000, false)));
        assert!(b.record_of(2, 0x00, &commit_body(9_000, false)));
        let e = b.expect();
        let found = scan(b.bytes.as_slice(), e, None).unwrap();
        assert_eq!(found.end, b.end_of(b.ends.len() - 1));
        assert_eq!(
            found.last_xact,
            Some(XactEnd {
                lsn: Lsn(START + abort_at),
                time: XactTime::At(3_000)
            })
        );
        // A limit before the abort's end leaves the commit before it as the last.
        let limit = Lsn(START + abort_at + 10);
        let found = scan(b.bytes.as_slice(), e, Some(limit)).unwrap();
        assert_eq!(found.last_xact.map(|x| x.time), Some(XactTime::At(2_000)));
        assert!(found.end.unwrap() <= limit);
        // None in a segment without transaction ends.
        let plain = built(0, 5);
        assert_eq!(
            scan(plain.bytes.as_slice(), e, None).unwrap().last_xact,
            None
        );
    }

    #[test]
    fn a_transaction_end_that_cannot_be_read_has_an_unknown_time() {
        // Longer than the inspection limit (spans pages), with a long main data header.
        let mut long = vec![254];
        long.extend_from_slice(&70_000u32.to_le_bytes());
        long.extend_from_slice(&5_000i64.to_le_bytes());
        long.resize(5 + 70_000, 7);
        // A block reference where a transaction end has none.
        let mut blocks = vec![0u8, 0x10];
        blocks.extend_from_slice(&commit_body(6_000, false));
        for body in [long, blocks] {
            let mut b = built(0, 2);
            assert!(b.record_of(1, 0x00, &body));
            let found = scan(b.bytes.as_slice(), b.expect(), None).unwrap();
            assert_eq!(found.last_xact.map(|x| x.time), Some(XactTime::Unknown));
        }
        assert_eq!(
            xact_time(&[255, 4, 1, 2, 3, 4]),
            None,
            "too short for a time"
        );
        assert_eq!(xact_time(&[255, 12, 1]), None, "cut short");
        assert_eq!(
            xact_time(&[254, 255, 255, 255, 255]),
            None,
            "length past the end"
        );
        assert_eq!(xact_time(&[252, 1]), None);
        assert_eq!(xact_time(&[]), None);
    }

    #[test]
    fn arbitrary_damage_never_panics_and_never_extends() {
        let b = built(300, 40);
        let full = end(&b.bytes, b.expect()).unwrap();
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..300 {
            let mut bad = b.bytes.clone();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = (x % (b.ends[39] + 64)) as usize;
                bad[i] = (x >> 32) as u8;
            }
            if let Some(e) = end(&bad, b.expect()) {
                assert!(e <= full);
            }
            // Truncated sources too.
            let cut = (x % SEG) as usize;
            let _ = end(&bad[..cut], b.expect());
        }
    }
}
