//! Log sequence numbers.
//!
//! An [`Lsn`] is a byte position in PostgreSQL's write-ahead log. It displays and parses the
//! way PostgreSQL shows it (`16/B374D848`: the high and low 32 bits in hex). Arithmetic is
//! checked: a position never wraps silently.

use std::fmt;
use std::str::FromStr;

use crate::segment::WalSegSize;

/// A position in the write-ahead log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The invalid position, `0/0`, which PostgreSQL uses for "unknown".
    pub const INVALID: Lsn = Lsn(0);

    pub fn is_valid(self) -> bool {
        self.0 != 0
    }

    /// `self + bytes`, or `None` on overflow.
    pub fn checked_add(self, bytes: u64) -> Option<Lsn> {
        self.0.checked_add(bytes).map(Lsn)
    }

    /// The number of bytes from `earlier` to `self`, or `None` if `earlier` is later.
    pub fn checked_sub(self, earlier: Lsn) -> Option<u64> {
        self.0.checked_sub(earlier.0)
    }

    /// The distance to `earlier`, zero if `earlier` is not earlier.
    pub fn saturating_sub(self, earlier: Lsn) -> u64 {
        self.0.saturating_sub(earlier.0)
    }

    /// The start of the segment that holds this position.
    pub fn segment_start(self, seg_size: WalSegSize) -> Lsn {
        Lsn(self.0 - self.segment_offset(seg_size))
    }

    /// The offset of this position inside its segment.
    pub fn segment_offset(self, seg_size: WalSegSize) -> u64 {
        self.0 & (seg_size.bytes() - 1)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// The reason a string is not an LSN.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid LSN {0:?}: expected two hexadecimal numbers of at most 8 digits, as in 16/B374D848"
)]
pub struct ParseLsnError(String);

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseLsnError(s.chars().take(64).collect());
        let (hi, lo) = s.split_once('/').ok_or_else(bad)?;
        let part = |p: &str| -> Result<u64, ParseLsnError> {
            if p.is_empty() || p.len() > 8 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            u64::from_str_radix(p, 16).map_err(|_| bad())
        };
        Ok(Lsn((part(hi)? << 32) | part(lo)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_parse_round_trip() {
        for v in [0u64, 1, 0x16_B374_D848, u64::MAX, 0x1_0000_0000] {
            let lsn = Lsn(v);
            assert_eq!(lsn.to_string().parse::<Lsn>().unwrap(), lsn);
        }
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
        assert_eq!("0/0".parse::<Lsn>().unwrap(), Lsn::INVALID);
        assert_eq!("a/b".parse::<Lsn>().unwrap(), Lsn(0xA_0000_000B));
    }

    #[test]
    fn rejects_malformed() {
        for s in [
            "",
            "/",
            "1/",
            "/1",
            "1",
            "1/2/3",
            "g/0",
            "123456789/0",
            "0/-1",
            " 0/1",
            "0/+1",
        ] {
            assert!(s.parse::<Lsn>().is_err(), "{s:?} parsed");
        }
    }

    #[test]
    fn segment_math() {
        let seg = WalSegSize::new(16 * 1024 * 1024).unwrap();
        let lsn: Lsn = "0/23004A50".parse().unwrap();
        assert_eq!(lsn.segment_start(seg), "0/23000000".parse().unwrap());
        assert_eq!(lsn.segment_offset(seg), 0x4A50);
        assert_eq!(Lsn(5).checked_sub(Lsn(7)), None);
        assert_eq!(Lsn(u64::MAX).checked_add(1), None);
    }
}
