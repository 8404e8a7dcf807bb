//! Timelines, WAL segments and the names PostgreSQL gives their files.
//!
//! A segment file is named `TTTTTTTTXXXXXXXXYYYYYYYY`: the timeline, then the segment number
//! split into "xlogid" (`segno / segments_per_xlogid`) and the segment inside it. The segment
//! size is fixed when a cluster is created (`initdb --wal-segsize`) and is any power of two
//! from 1 MiB to 1 GiB; it always comes from the server, never from an assumption.
//! [`WalFileName`] is the one place that builds and parses these names, so a name from the
//! network or from a command line is accepted only if it is exactly one of them.

use std::fmt;

use crate::lsn::Lsn;

/// A PostgreSQL timeline id. Timeline 0 does not exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TimelineId(pub u32);

impl fmt::Display for TimelineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The number of a WAL segment since the start of the log (`lsn / segment size`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentNo(pub u64);

/// A WAL segment size the server may use: a power of two from 1 MiB to 1 GiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalSegSize(u64);

impl WalSegSize {
    pub const MIN: u64 = 1 << 20;
    pub const MAX: u64 = 1 << 30;
    /// PostgreSQL's default, 16 MiB.
    pub const DEFAULT: WalSegSize = WalSegSize(16 << 20);

    /// Accepts only the sizes PostgreSQL allows.
    pub fn new(bytes: u64) -> Option<WalSegSize> {
        (bytes.is_power_of_two() && (Self::MIN..=Self::MAX).contains(&bytes))
            .then_some(WalSegSize(bytes))
    }

    pub fn bytes(self) -> u64 {
        self.0
    }

    /// Segments per "xlogid", the middle part of a segment file name.
    pub fn segments_per_xlogid(self) -> u64 {
        0x1_0000_0000 / self.0
    }

    /// The segment that holds `lsn`.
    pub fn segment_of(self, lsn: Lsn) -> SegmentNo {
        SegmentNo(lsn.0 / self.0)
    }

    /// The position where segment `segno` starts.
    pub fn segment_start(self, segno: SegmentNo) -> Lsn {
        Lsn(segno.0 * self.0)
    }

    /// Parses a size as PostgreSQL's `SHOW wal_segment_size` prints it (`16MB`, `1GB`).
    pub fn parse_setting(s: &str) -> Option<WalSegSize> {
        let s = s.trim();
        let (num, mult) = if let Some(n) = s.strip_suffix("GB") {
            (n, 1 << 30)
        } else if let Some(n) = s.strip_suffix("MB") {
            (n, 1 << 20)
        } else if let Some(n) = s.strip_suffix("kB") {
            (n, 1 << 10)
        } else {
            (s, 1)
        };
        let n: u64 = num.trim().parse().ok()?;
        WalSegSize::new(n.checked_mul(mult)?)
    }
}

/// The name of a file in a WAL directory: a segment or a timeline history file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalFileName {
    Segment {
        timeline: TimelineId,
        segno: SegmentNo,
    },
    History(TimelineId),
}

impl WalFileName {
    /// Builds the name the way PostgreSQL does.
    pub fn to_name(self, seg_size: WalSegSize) -> String {
        match self {
            WalFileName::Segment { timeline, segno } => {
                let per = seg_size.segments_per_xlogid();
                format!(
                    "{:08X}{:08X}{:08X}",
                    timeline.0,
                    segno.0 / per,
                    segno.0 % per
                )
            }
            WalFileName::History(timeline) => format!("{:08X}.history", timeline.0),
        }
    }

    /// Parses exactly a segment or history file name (upper-case hex, no path, no suffix).
    /// Anything else, including names that would point outside a directory, is `None`.
    ///
    /// Names come from directories and command lines, so any string is handled: only ASCII
    /// bytes are looked at, and a name is cut into its fields as bytes, never as `str`
    /// (which panics inside a multi-byte character).
    pub fn parse(name: &str, seg_size: WalSegSize) -> Option<WalFileName> {
        let hex = |s: &[u8]| -> Option<u64> {
            if s.len() == 8
                && s.iter()
                    .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(b))
            {
                // Eight hex digits: at most u32::MAX.
                s.iter().try_fold(0u64, |acc, &b| {
                    Some(acc << 4 | u64::from((b as char).to_digit(16)?))
                })
            } else {
                None
            }
        };
        let name = name.as_bytes();
        if let Some(tli) = name.strip_suffix(b".history") {
            let tli = hex(tli)?;
            return (tli != 0).then_some(WalFileName::History(TimelineId(tli as u32)));
        }
        if name.len() != 24 {
            return None;
        }
        let tli = hex(&name[0..8])?;
        let log = hex(&name[8..16])?;
        let seg = hex(&name[16..24])?;
        let per = seg_size.segments_per_xlogid();
        if tli == 0 || seg >= per {
            return None;
        }
        let segno = log.checked_mul(per)?.checked_add(seg)?;
        // The segment must start at a representable position.
        segno.checked_mul(seg_size.bytes())?;
        Some(WalFileName::Segment {
            timeline: TimelineId(tli as u32),
            segno: SegmentNo(segno),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB16: u64 = 16 << 20;

    #[test]
    fn sizes() {
        assert!(WalSegSize::new(MB16).is_some());
        assert!(WalSegSize::new(1 << 20).is_some());
        assert!(WalSegSize::new(1 << 30).is_some());
        assert!(WalSegSize::new(1 << 19).is_none());
        assert!(WalSegSize::new(1 << 31).is_none());
        assert!(WalSegSize::new(3 << 20).is_none());
        assert_eq!(WalSegSize::parse_setting("16MB").unwrap().bytes(), MB16);
        assert_eq!(WalSegSize::parse_setting("1GB").unwrap().bytes(), 1 << 30);
        assert!(WalSegSize::parse_setting("17MB").is_none());
    }

    #[test]
    fn names_as_postgres_builds_them() {
        let s16 = WalSegSize::new(MB16).unwrap();
        let lsn: Lsn = "0/23000000".parse().unwrap();
        let name = WalFileName::Segment {
            timeline: TimelineId(1),
            segno: s16.segment_of(lsn),
        };
        assert_eq!(name.to_name(s16), "000000010000000000000023");
        let lsn: Lsn = "16/B374D848".parse().unwrap();
        let name = WalFileName::Segment {
            timeline: TimelineId(2),
            segno: s16.segment_of(lsn),
        };
        assert_eq!(name.to_name(s16), "0000000200000016000000B3");
        let s1g = WalSegSize::new(1 << 30).unwrap();
        let name = WalFileName::Segment {
            timeline: TimelineId(1),
            segno: s1g.segment_of(lsn),
        };
        assert_eq!(name.to_name(s1g), "000000010000001600000002");
        assert_eq!(
            WalFileName::History(TimelineId(10)).to_name(s16),
            "0000000A.history"
        );
    }

    #[test]
    fn parse_round_trips_every_size() {
        let mut size = WalSegSize::MIN;
        while size <= WalSegSize::MAX {
            let seg = WalSegSize::new(size).unwrap();
            for segno in [
                0,
                1,
                seg.segments_per_xlogid() - 1,
                seg.segments_per_xlogid() * 7 + 3,
            ] {
                let f = WalFileName::Segment {
                    timeline: TimelineId(3),
                    segno: SegmentNo(segno),
                };
                assert_eq!(WalFileName::parse(&f.to_name(seg), seg), Some(f));
            }
            size <<= 1;
        }
    }

    #[test]
    fn parse_rejects_other_names() {
        let s16 = WalSegSize::new(MB16).unwrap();
        for bad in [
            "",
            "00000001000000000000002",
            "0000000100000000000000230",
            "000000010000000000000100", // segment 0x100 does not exist with 16 MiB
            "000000000000000000000023", // timeline 0
            "00000001000000000000002g",
            "000000010000000000000023.partial",
            "../00000001000000000023",
            "/etc/passwd",
            "00000000.history",
            "0000001.history",
            "0000000a.history",
            // 24 bytes with a multi-byte character across a field boundary (byte 8, 16).
            "0000000\u{e9}000000000000023",
            "000000010000000\u{20ac}000023",
            "0000000100000000000000\u{e9}",
            "0000000\u{e9}.history",
            "000000010000000000000023\u{e9}.partial",
            "\u{1f600}\u{1f600}\u{1f600}\u{1f600}\u{1f600}\u{1f600}",
        ] {
            assert_eq!(WalFileName::parse(bad, s16), None, "{bad:?}");
        }
        assert_eq!(
            WalFileName::parse("00000002.history", s16),
            Some(WalFileName::History(TimelineId(2)))
        );
    }
}
