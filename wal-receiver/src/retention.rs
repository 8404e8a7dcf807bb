//! Retention of a follower's WAL store: `follow --keep-wal SIZE|DURATION`.
//!
//! After each segment is sealed, the sealer thread removes the oldest *sealed* segments
//! beyond the store's limit: while the sealed files total more than SIZE bytes on disk
//! (compressed, as they fill the disk), or while they are older than DURATION (by their
//! modification time, that is when they were sealed). Removals are made durable by one
//! directory fsync per batch, logged once per batch, and the outcome is recorded in
//! `retention.json` for `status`.
//!
//! Invariants: never removed are `.partial` files (the segment being written, and complete
//! segments not yet sealed), history files, and every segment at or after the one holding
//! the served standby's last reported replay position. While `--serve-standby` is given and
//! no standby has reported yet (now or in an earlier run, recorded in `standby.json`),
//! nothing is removed. A store inside a backup repository is never trimmed here: `prune`
//! decides what its backups need; that is checked again before every pass, as the first
//! backup may create the repository around a store that `follow` already keeps.

use std::fs;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use walship_common::durable::{self, DurableError};
use walship_common::{Lsn, WalSegSize};

use crate::store::StoreFile;

/// Where `status` finds the retention setting and the last pass's outcome.
pub const RETENTION_FILE: &str = "retention.json";
/// The default limit never exceeds this many bytes of sealed WAL.
pub const DEFAULT_MAX_BYTES: u64 = 16 << 30;
/// The default limit is at most this fraction (in percent) of the store's file system.
pub const DEFAULT_FS_PERCENT: u64 = 10;

/// How much sealed WAL a store keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeepWal {
    /// Every segment (`all`, `unlimited` or `0`).
    All,
    /// At most this many bytes of sealed files.
    Size(u64),
    /// Sealed files younger than this.
    Age(Duration),
}

impl FromStr for KeepWal {
    type Err = String;
    /// `all`/`unlimited`/`0`, a duration (`7d`, `12h`: humantime), or a size with a unit
    /// (`64MB` = 64 000 000 bytes, `2GiB`; a bare number is bytes).
    fn from_str(s: &str) -> Result<KeepWal, String> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("all") || t.eq_ignore_ascii_case("unlimited") || t == "0" {
            return Ok(KeepWal::All);
        }
        if let Ok(d) = humantime::parse_duration(t) {
            if d.is_zero() {
                return Ok(KeepWal::All);
            }
            return Ok(KeepWal::Age(d));
        }
        match t.parse::<bytesize::ByteSize>() {
            Ok(b) if b.as_u64() == 0 => Ok(KeepWal::All),
            Ok(b) => Ok(KeepWal::Size(b.as_u64())),
            Err(_) => Err(format!(
                "'{s}' is neither a size (64MB, 2GiB), a duration (7d, 12h) nor 'all'"
            )),
        }
    }
}

impl std::fmt::Display for KeepWal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeepWal::All => write!(f, "all"),
            KeepWal::Size(b) => write!(f, "{} ({b} bytes)", bytesize::ByteSize::b(*b)),
            KeepWal::Age(d) => write!(f, "{}", humantime::format_duration(*d)),
        }
    }
}

/// The default limit for a store in `dir`: the smaller of [`DEFAULT_FS_PERCENT`] of its file
/// system and [`DEFAULT_MAX_BYTES`].
pub fn default_keep(dir: &Path) -> KeepWal {
    let fs_bytes = nix::sys::statvfs::statvfs(dir)
        .map(|s| s.blocks().saturating_mul(s.fragment_size()))
        .unwrap_or(u64::MAX);
    KeepWal::Size((fs_bytes / 100 * DEFAULT_FS_PERCENT).clamp(1, DEFAULT_MAX_BYTES))
}

/// Whether `wal_dir` is a backup repository's WAL archive (its parent holds `backups/`).
pub fn in_repository(wal_dir: &Path) -> bool {
    std::path::absolute(wal_dir)
        .ok()
        .and_then(|d| {
            d.parent()
                .map(|p| p.join(crate::backup::BACKUPS_DIR).is_dir())
        })
        .unwrap_or(false)
}

/// What `follow` keeps in `wal_dir`, given `--keep-wal` (`None`: the default) and whether it
/// serves a standby. `Ok(None)`: everything is kept (a store inside a repository, which
/// `prune` trims, or no `--keep-wal` and no served standby). An error is a usage error.
pub fn resolve(
    wal_dir: &Path,
    keep: Option<KeepWal>,
    serves_standby: bool,
) -> Result<Option<Retention>, String> {
    if in_repository(wal_dir) {
        return match keep {
            Some(_) => Err(format!(
                "--keep-wal cannot be used on {}: it is a backup repository's WAL archive, whose WAL 'wal-receiver prune' removes once no kept backup needs it",
                wal_dir.display()
            )),
            None => Ok(None),
        };
    }
    let (keep, setting) = match keep {
        Some(k) => (k, format!("--keep-wal {k}")),
        // Without --serve-standby, a standby may read the store through restore_command,
        // whose position the receiver never learns: a default limit could remove WAL it
        // still needs, a silent gap. Such a store keeps everything unless told otherwise.
        None if !serves_standby => return Ok(None),
        None => {
            // The nearest existing directory tells the file system the store will be on.
            let mut at = std::path::absolute(wal_dir).unwrap_or_else(|_| wal_dir.to_owned());
            while !at.exists() {
                match at.parent() {
                    Some(p) => at = p.to_owned(),
                    None => break,
                }
            }
            let k = default_keep(&at);
            (
                k,
                format!("default {k} (the smaller of {DEFAULT_FS_PERCENT}% of the file system and 16 GiB)"),
            )
        }
    };
    Ok(Some(Retention {
        keep,
        setting,
        standby: serves_standby.then(|| Arc::new(Mutex::new(None))),
    }))
}

/// The replay position of the standby that `follow --serve-standby` serves, as last
/// reported; `None` until one has reported.
pub type StandbyReplay = Arc<Mutex<Option<Lsn>>>;

/// What a follower keeps, and what it must keep for its standby.
#[derive(Clone, Debug)]
pub struct Retention {
    pub keep: KeepWal,
    /// How the setting came about, for `status` ("--keep-wal 64MB", "default ...").
    pub setting: String,
    /// Some when a standby is served: segments from its replay position on are kept.
    pub standby: Option<StandbyReplay>,
}

/// The record `retention.json` holds.
#[derive(Debug, Serialize, Deserialize)]
pub struct RetentionStatus {
    /// The limit, as the follower resolved it.
    pub setting: String,
    /// The oldest sealed segment kept after the last pass.
    pub oldest_kept: Option<String>,
    /// Why that one is the oldest.
    pub reason: String,
    /// Bytes of sealed segments kept after the last pass.
    pub sealed_bytes: u64,
    /// When the last pass ran, in seconds since the Unix epoch.
    pub updated: u64,
}

struct Sealed {
    key: (u64, u32),
    name: String,
    len: u64,
    mtime: SystemTime,
}

impl Retention {
    /// Removes what the limit lets go of and records the outcome. Only a failed fsync is an
    /// error; a file that cannot be removed is logged and kept.
    pub fn apply(&self, dir: &Path, seg_size: WalSegSize) -> Result<(), DurableError> {
        // A repository may be made around the store after `follow` started (its first
        // backup creates `backups/`): from then on `prune` decides.
        if in_repository(dir) {
            return Ok(());
        }
        let mut sealed = Vec::new();
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!("retention: cannot list {}: {e}", dir.display());
                return Ok(());
            }
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(StoreFile::Sealed { timeline, segno }) = StoreFile::parse(&name, seg_size)
            else {
                continue;
            };
            let Ok(md) = entry.metadata() else { continue };
            sealed.push(Sealed {
                key: (segno.0, timeline.0),
                name,
                len: md.len(),
                mtime: md.modified().unwrap_or_else(|_| SystemTime::now()),
            });
        }
        sealed.sort_by_key(|s| s.key);
        let mut total: u64 = sealed.iter().map(|s| s.len).sum();
        // The first segment that must stay for the standby; None: no limit from a standby.
        let (protect, waiting) = match &self.standby {
            None => (None, false),
            Some(r) => match *r.lock().unwrap_or_else(|p| p.into_inner()) {
                Some(lsn) => (Some(seg_size.segment_of(lsn).0), false),
                None => (Some(0), true),
            },
        };
        let now = SystemTime::now();
        let over = |s: &Sealed, total: u64| match self.keep {
            KeepWal::All => false,
            KeepWal::Size(max) => total > max,
            KeepWal::Age(age) => now.duration_since(s.mtime).is_ok_and(|d| d > age),
        };
        let mut removed = Vec::new();
        let mut held = false;
        for s in &sealed {
            if !over(s, total) {
                break;
            }
            if protect.is_some_and(|p| s.key.0 >= p) {
                held = true;
                break;
            }
            match fs::remove_file(dir.join(&s.name)) {
                Ok(()) => {
                    total -= s.len;
                    removed.push(s.name.clone());
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => total -= s.len,
                Err(e) => {
                    tracing::warn!(
                        "retention: cannot remove {}: {e}",
                        dir.join(&s.name).display()
                    );
                    held = true;
                    break;
                }
            }
        }
        if !removed.is_empty() {
            durable::fsync_dir(dir)?;
            tracing::info!(
                count = removed.len(),
                first = %removed[0],
                last = %removed[removed.len() - 1],
                keep_wal = %self.keep,
                "removed the oldest sealed segments beyond the retention limit"
            );
        }
        let oldest = sealed.get(removed.len());
        let reason = match (self.keep, held) {
            (KeepWal::All, _) => "everything is kept (--keep-wal all)".to_string(),
            (_, true) if waiting => {
                "no standby has reported yet: everything is kept until one does".to_string()
            }
            (_, true) => match self
                .standby
                .as_ref()
                .and_then(|r| *r.lock().unwrap_or_else(|p| p.into_inner()))
            {
                Some(lsn) => {
                    format!("the standby's replay position {lsn} needs it (beyond the limit)")
                }
                None => "a segment could not be removed".to_string(),
            },
            (KeepWal::Size(max), false) => {
                format!("size limit: the sealed segments total {total} of at most {max} bytes")
            }
            (KeepWal::Age(age), false) => format!(
                "age limit: it is younger than {}",
                humantime::format_duration(age)
            ),
        };
        let record = RetentionStatus {
            setting: self.setting.clone(),
            oldest_kept: oldest.map(|s| {
                s.name
                    .trim_end_matches(crate::store::SEALED_SUFFIX)
                    .to_string()
            }),
            reason,
            sealed_bytes: total,
            updated: now
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        let json = serde_json::to_vec(&record).unwrap_or_default();
        if let Err(e) = durable::write_atomic(&dir.join(RETENTION_FILE), &json) {
            if e.is_fsync() {
                return Err(e);
            }
            tracing::warn!("retention: {e}");
        }
        Ok(())
    }
}

/// Reads what the last retention pass recorded; `None` if there is none.
pub fn read_status(dir: &Path) -> Option<RetentionStatus> {
    fs::read(dir.join(RETENTION_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

/// The standby's last reported replay position in `standby.json`, if any and not 0/0.
pub fn recorded_standby_replay(dir: &Path) -> Option<Lsn> {
    let b = fs::read(dir.join(crate::follow::STANDBY_FILE)).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&b).ok()?;
    let lsn: Lsn = v.get("replay_lsn")?.as_str()?.parse().ok()?;
    (lsn != Lsn::default()).then_some(lsn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_limit_applies_only_to_a_store_that_serves_its_standby() {
        let dir = std::env::temp_dir().join(format!("walship-retention-{}", std::process::id()));
        // No served standby: a restore_command standby's needs are unknown, keep it all.
        assert!(resolve(&dir, None, false).unwrap().is_none());
        let served = resolve(&dir, None, true).unwrap().expect("a default limit");
        assert!(
            matches!(served.keep, KeepWal::Size(n) if n > 0),
            "{:?}",
            served.keep
        );
        assert!(served.setting.starts_with("default"), "{}", served.setting);
        // An explicit limit applies either way.
        let given = resolve(&dir, Some(KeepWal::Size(1 << 30)), false).unwrap();
        assert_eq!(given.map(|r| r.keep), Some(KeepWal::Size(1 << 30)));
    }

    #[test]
    fn keep_wal_parses_sizes_durations_and_all() {
        assert_eq!("64MB".parse(), Ok(KeepWal::Size(64_000_000)));
        assert_eq!("2GiB".parse(), Ok(KeepWal::Size(2 << 30)));
        assert_eq!(
            "7d".parse(),
            Ok(KeepWal::Age(Duration::from_secs(7 * 86400)))
        );
        assert_eq!("all".parse(), Ok(KeepWal::All));
        assert_eq!("0".parse(), Ok(KeepWal::All));
        assert_eq!("unlimited".parse(), Ok(KeepWal::All));
        assert!("lots".parse::<KeepWal>().is_err());
    }

    /// A store directory with sealed segments 1..=n of `len` bytes each, a partial and a
    /// history file.
    fn store_with(tag: &str, n: u64, len: usize) -> (std::path::PathBuf, WalSegSize) {
        let dir =
            std::env::temp_dir().join(format!("walship-retention-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let seg = WalSegSize::new(1 << 20).unwrap();
        for segno in 1..=n {
            let name = walship_common::WalFileName::Segment {
                timeline: walship_common::TimelineId(1),
                segno: walship_common::SegmentNo(segno),
            }
            .to_name(seg);
            fs::write(dir.join(format!("{name}.zst")), vec![0u8; len]).unwrap();
            if segno == 1 {
                fs::write(dir.join(format!("{name}.partial")), b"x").unwrap();
            }
        }
        fs::write(dir.join("00000002.history"), b"1\t0/1000000\tno reason\n").unwrap();
        (dir, seg)
    }

    fn sealed_left(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".zst"))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn the_oldest_sealed_segments_go_beyond_the_size_and_nothing_else() {
        let (dir, seg) = store_with("size", 10, 1000);
        let r = Retention {
            keep: KeepWal::Size(4500),
            setting: "--keep-wal 4500".into(),
            standby: None,
        };
        r.apply(&dir, seg).unwrap();
        let left = sealed_left(&dir);
        assert_eq!(left.len(), 4, "{left:?}");
        assert!(left[0].starts_with("000000010000000000000007"), "{left:?}");
        // The partial and the history file stay.
        assert!(dir.join("000000010000000000000001.partial").exists());
        assert!(dir.join("00000002.history").exists());
        let st = read_status(&dir).unwrap();
        assert_eq!(st.oldest_kept.as_deref(), Some("000000010000000000000007"));
        assert!(st.reason.starts_with("size limit"), "{}", st.reason);
        assert_eq!(st.sealed_bytes, 4000);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_standbys_replay_position_holds_segments_past_the_limit() {
        let (dir, seg) = store_with("standby", 10, 1000);
        let replay: StandbyReplay = Arc::new(Mutex::new(None));
        let r = Retention {
            keep: KeepWal::Size(2000),
            setting: "--keep-wal 2000".into(),
            standby: Some(replay.clone()),
        };
        // No report yet: everything stays.
        r.apply(&dir, seg).unwrap();
        assert_eq!(sealed_left(&dir).len(), 10);
        assert!(read_status(&dir).unwrap().reason.contains("no standby"));
        // Replayed into segment 4: segments 4 on stay.
        *replay.lock().unwrap() = seg
            .segment_start(walship_common::SegmentNo(4))
            .checked_add(100);
        r.apply(&dir, seg).unwrap();
        assert_eq!(sealed_left(&dir).len(), 7);
        assert!(read_status(&dir)
            .unwrap()
            .reason
            .contains("replay position"));
        // Caught up: back to the limit.
        *replay.lock().unwrap() = Some(seg.segment_start(walship_common::SegmentNo(11)));
        r.apply(&dir, seg).unwrap();
        assert_eq!(sealed_left(&dir).len(), 2);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn age_limit_and_all() {
        let (dir, seg) = store_with("age", 3, 10);
        let mut r = Retention {
            keep: KeepWal::All,
            setting: "all".into(),
            standby: None,
        };
        r.apply(&dir, seg).unwrap();
        assert_eq!(sealed_left(&dir).len(), 3);
        r.keep = KeepWal::Age(Duration::from_secs(3600));
        r.apply(&dir, seg).unwrap();
        assert_eq!(sealed_left(&dir).len(), 3);
        std::thread::sleep(Duration::from_millis(20));
        r.keep = KeepWal::Age(Duration::from_millis(1));
        r.apply(&dir, seg).unwrap();
        assert_eq!(sealed_left(&dir).len(), 0);
        fs::remove_dir_all(&dir).unwrap();
    }
}
