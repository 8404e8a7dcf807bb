//! Timeline history files, as PostgreSQL writes them (`0000000N.history`).
//!
//! Each line is `parentTLI<TAB>switchpoint<TAB>reason`: timeline `parentTLI` ended at
//! `switchpoint`, where its child began. The file of timeline N lists every ancestor of N,
//! oldest first; blank lines and lines starting with `#` are comments. History files come
//! from the network, so they are parsed with limits and never trusted to be sorted.

use crate::lsn::Lsn;
use crate::segment::TimelineId;

/// Largest history file accepted (PostgreSQL's are a line per promotion).
pub const MAX_HISTORY_LEN: usize = 1 << 20;

/// Reads a history file from disk, refusing one larger than [`MAX_HISTORY_LEN`] before
/// reading more than that.
pub fn read_history_file(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut content = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_HISTORY_LEN as u64 + 1)
        .read_to_end(&mut content)?;
    if content.len() > MAX_HISTORY_LEN {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} is larger than {MAX_HISTORY_LEN} bytes", path.display()),
        ));
    }
    Ok(content)
}

/// One ancestor in a timeline's history: `timeline` ended at `end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ancestor {
    pub timeline: TimelineId,
    pub end: Lsn,
}

/// The parsed history of timeline `of`: its ancestors, oldest first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct History {
    pub of: TimelineId,
    pub ancestors: Vec<Ancestor>,
}

impl History {
    /// Parses the content of `of`'s history file. Ancestors must be older timelines than
    /// `of`, in increasing timeline and switch-point order.
    pub fn parse(of: TimelineId, content: &[u8]) -> Result<History, String> {
        if content.len() > MAX_HISTORY_LEN {
            return Err(format!(
                "history file of timeline {} is {} bytes, more than {MAX_HISTORY_LEN}",
                of.0,
                content.len()
            ));
        }
        let text = std::str::from_utf8(content)
            .map_err(|_| format!("history file of timeline {} is not text", of.0))?;
        let mut ancestors: Vec<Ancestor> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |why: &str| {
                format!(
                    "history file of timeline {}, line {}: {why}: {line:?}",
                    of.0,
                    n + 1
                )
            };
            let mut fields = line.split_whitespace();
            let tli: u32 = fields
                .next()
                .and_then(|f| f.parse().ok())
                .ok_or_else(|| bad("no timeline number"))?;
            let end: Lsn = fields
                .next()
                .and_then(|f| f.parse().ok())
                .ok_or_else(|| bad("no switch point"))?;
            if tli == 0 || tli >= of.0 {
                return Err(bad("timeline is not older than the file's own"));
            }
            if let Some(prev) = ancestors.last() {
                if tli <= prev.timeline.0 || end < prev.end {
                    return Err(bad("timelines or switch points go backwards"));
                }
            }
            ancestors.push(Ancestor {
                timeline: TimelineId(tli),
                end,
            });
        }
        Ok(History { of, ancestors })
    }

    /// Where `tli` ended in this history, and the timeline that followed it. `None` when
    /// `tli` is not an ancestor of this history's timeline.
    pub fn switch_from(&self, tli: TimelineId) -> Option<(Lsn, TimelineId)> {
        let i = self.ancestors.iter().position(|a| a.timeline == tli)?;
        let next = self
            .ancestors
            .get(i + 1)
            .map(|a| a.timeline)
            .unwrap_or(self.of);
        Some((self.ancestors[i].end, next))
    }

    /// The timeline that holds `lsn` in this history: the first ancestor that ended after
    /// it, or the history's own timeline.
    pub fn timeline_of(&self, lsn: Lsn) -> TimelineId {
        self.ancestors
            .iter()
            .find(|a| lsn < a.end)
            .map(|a| a.timeline)
            .unwrap_or(self.of)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_postgres_history_files() {
        let h = History::parse(
            TimelineId(3),
            b"1\t0/23023FA0\tno recovery target specified\n\n# comment\n2\t0/3A000000\tbefore 2026-11-26\n",
        )
        .unwrap();
        assert_eq!(h.ancestors.len(), 2);
        assert_eq!(
            h.switch_from(TimelineId(1)),
            Some((Lsn(0x23023FA0), TimelineId(2)))
        );
        assert_eq!(
            h.switch_from(TimelineId(2)),
            Some((Lsn(0x3A000000), TimelineId(3)))
        );
        assert_eq!(h.switch_from(TimelineId(3)), None);
        assert_eq!(h.switch_from(TimelineId(4)), None);
        assert_eq!(h.timeline_of(Lsn(0x23023F9F)), TimelineId(1));
        assert_eq!(h.timeline_of(Lsn(0x23023FA0)), TimelineId(2));
        assert_eq!(h.timeline_of(Lsn(0x3A000000)), TimelineId(3));
    }

    #[test]
    fn refuses_bad_history_files() {
        for bad in [
            &b"x\t0/1\tr\n"[..],
            b"1\tnope\tr\n",
            b"2\t0/1\tr\n",
            b"0\t0/1\tr\n",
            b"1\t0/5\tr\n1\t0/6\tr\n",
            b"\xff\n",
        ] {
            assert!(History::parse(TimelineId(2), bad).is_err(), "{bad:?}");
        }
        assert!(History::parse(TimelineId(2), &vec![b'#'; MAX_HISTORY_LEN + 1]).is_err());
    }
}
