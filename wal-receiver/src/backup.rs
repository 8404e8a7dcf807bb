//! Backup repositories: base backups plus a continuous WAL archive, restore to any point in
//! time, retention and verification.
//!
//! ```text
//! <repo>/
//!   wal/                          a WAL store, as `follow --wal-dir <repo>/wal` keeps it
//!   backups/<id>/backup.json      the backup's record, written last: a backup without it is
//!                                 incomplete and ignored (and removed by the next backup)
//!   backups/<id>/backup_manifest  PostgreSQL's format, for pg_verifybackup
//!   backups/<id>/files/<path>.zst every file of the data directory, zstd-compressed; its
//!                                 size and CRC-32C are in backup.json
//!   backups/<id>.staging/         while a backup runs: the snapshot, uncompressed
//!   verified.json                 what `verify` has read and found intact (its cache)
//! ```
//!
//! A backup is a snapshot taken exactly as `bootstrap` takes one (the sender's snapshot
//! service), into a staging directory, with the WAL through its stop position stored in the
//! repository's WAL store. It is then packed file by file.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use tracing::{info, warn};
use walship_common::timeline::{read_history_file, History};
use walship_common::{durable, pgtime};
use walship_common::{Lsn, SegmentNo, WalFileName};

use crate::bootstrap::{self, BootstrapConfig};
use crate::pgconf::{self, ServerSettings};
use crate::store::{
    read_recorded_state, read_state, StoreFile, StoreState, PARTIAL_SUFFIX, SEALED_SUFFIX,
};
use crate::walread::{StoreSegment, WalReader};
use crate::{exit, sealed, walcheck, Fatal};

pub const WAL_DIR: &str = "wal";
pub const BACKUPS_DIR: &str = "backups";
const RECORD: &str = "backup.json";
const MANIFEST: &str = "backup_manifest";
const FILES_DIR: &str = "files";
const STAGING_SUFFIX: &str = ".staging";
const VERIFIED: &str = "verified.json";
/// zstd level for backup files: bulk data, where speed pays.
const PACK_LEVEL: i32 = 3;

/// One stored file of a backup.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FileRecord {
    /// Relative to the data directory, `/`-separated.
    pub path: String,
    pub size: u64,
    pub crc32c: u32,
    /// Modification time, seconds since the Unix epoch.
    pub mtime: i64,
}

/// `backup.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackupRecord {
    pub id: String,
    pub system_identifier: String,
    pub timeline: u32,
    pub start_lsn: String,
    pub stop_lsn: String,
    /// RFC 3339, UTC.
    pub start_time: String,
    /// When the WAL through `stop_lsn` was stored: every commit before the stop position
    /// happened before it.
    pub stop_time: String,
    pub pg_version: u32,
    pub bytes: u64,
    pub stored_bytes: u64,
    pub dirs: Vec<String>,
    pub files: Vec<FileRecord>,
    /// CRC-32C of this record as written with `checksum` 0.
    #[serde(default)]
    pub checksum: u32,
}

/// Largest `backup.json` read (a record lists every file of a data directory).
const MAX_RECORD_LEN: u64 = 256 << 20;

impl BackupRecord {
    /// The record as stored, with its checksum.
    fn encode(&self) -> Result<String> {
        let mut r = self.clone();
        r.checksum = 0;
        let crc = crc32c::crc32c(serde_json::to_string_pretty(&r)?.as_bytes());
        r.checksum = crc;
        Ok(serde_json::to_string_pretty(&r)?)
    }

    /// Reads and checks the record of the backup directory `dir`: size, JSON, checksum, and
    /// an id that is the directory's own name.
    fn load(dir: &Path) -> Result<BackupRecord> {
        let path = dir.join(RECORD);
        let f = File::open(&path).with_context(|| format!("open {}", path.display()))?;
        let mut text = Vec::new();
        f.take(MAX_RECORD_LEN + 1).read_to_end(&mut text)?;
        if text.len() as u64 > MAX_RECORD_LEN {
            bail!("{} is larger than {MAX_RECORD_LEN} bytes", path.display());
        }
        let r: BackupRecord = serde_json::from_slice(&text)
            .with_context(|| format!("{} is not a backup record", path.display()))?;
        if r.encode()?.as_bytes() != text.as_slice() {
            bail!(
                "{} does not match its checksum: it was changed or damaged",
                path.display()
            );
        }
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
        if name.as_deref() != Some(r.id.as_str()) {
            bail!(
                "{} names backup {:?}, not its directory's name",
                path.display(),
                r.id
            );
        }
        Ok(r)
    }

    fn start(&self) -> Result<Lsn> {
        self.start_lsn.parse().map_err(|e| anyhow!("{e}"))
    }
    fn stop(&self) -> Result<Lsn> {
        self.stop_lsn.parse().map_err(|e| anyhow!("{e}"))
    }
    fn stop_at(&self) -> Result<SystemTime> {
        humantime::parse_rfc3339_weak(&self.stop_time)
            .with_context(|| format!("backup {}: bad stop_time", self.id))
    }
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// Settings of `wal-receiver backup`.
pub struct BackupConfig {
    pub repo: PathBuf,
    /// The senders to choose from, as for `follow`.
    pub senders: Vec<String>,
    /// The repository's receiver name (slot `walship_<name>`).
    pub name: String,
    pub tls: Option<crate::follow::TlsClient>,
    pub keep: Option<usize>,
}

/// Takes a base backup into the repository. Returns its record.
pub async fn backup(cfg: BackupConfig) -> Result<BackupRecord> {
    walship_common::protocol::validate_name(&cfg.name).map_err(|m| Fatal {
        code: exit::USAGE,
        message: m,
    })?;
    let repo = std::path::absolute(&cfg.repo)?;
    let backups = repo.join(BACKUPS_DIR);
    fs::create_dir_all(&backups).with_context(|| format!("create {}", backups.display()))?;
    let wal_dir = repo.join(WAL_DIR);
    // One backup at a time per repository: the lock is held until this function returns.
    let lock_path = backups.join(".lock");
    let _lock = crate::store::try_lock_exclusive(&lock_path)?.ok_or_else(|| Fatal {
        code: exit::STORE_LOCKED,
        message: format!(
            "another backup of {} is running (lock {} is held)",
            repo.display(),
            lock_path.display()
        ),
    })?;
    // Leftovers of an interrupted backup.
    for e in fs::read_dir(&backups)? {
        let p = e?.path();
        if p == lock_path {
            continue;
        }
        if p.extension().is_some_and(|x| x == "staging") || (p.is_dir() && !p.join(RECORD).exists())
        {
            warn!(dir = %p.display(), "removing an unfinished backup");
            fs::remove_dir_all(&p).with_context(|| format!("remove {}", p.display()))?;
        }
    }
    let start_time = now_rfc3339();
    let id = start_time.replace(['-', ':'], "");
    if backups.join(&id).exists() {
        bail!("a backup {id} exists already; backups are named by their start second, try again in a second");
    }
    let staging = backups.join(format!("{id}{STAGING_SUFFIX}"));
    let pgdata = staging.join("pgdata");
    let started = Instant::now();
    let scfg = BootstrapConfig {
        senders: cfg.senders,
        name: cfg.name,
        pgdata: pgdata.clone(),
        wal_dir: wal_dir.clone(),
        tablespace_mapping: Vec::new(),
        tablespace_root: Some(staging.join("tablespaces")),
        // Only a bootstrap's recovery settings name it; a backup writes none.
        restore_bin: PathBuf::new(),
        tls: cfg.tls,
        serve: None,
        server: ServerSettings::default(),
    };
    let snap = bootstrap::snapshot_with_wal(&scfg, &pgdata, &wal_dir).await?;
    if !snap.tablespaces.is_empty() {
        fs::remove_dir_all(&staging).ok();
        return Err(Fatal {
            code: exit::USAGE,
            message: "the primary has tablespaces; backups of clusters with tablespaces are not supported yet (use bootstrap)".into(),
        }
        .into());
    }
    // Rounded up, and a second later: a target time before it may lie inside the backup,
    // which recovery cannot stop in.
    let stop_time =
        humantime::format_rfc3339_seconds(SystemTime::now() + std::time::Duration::from_secs(2))
            .to_string();
    let state = read_state(&wal_dir)
        .map_err(crate::follow::store_fatal)?
        .ok_or_else(|| anyhow!("the repository's WAL store has no state"))?;
    // The labels go in as files of the backup, pg_control under its own name.
    durable::write_atomic(&pgdata.join("backup_label"), snap.backup_label.as_bytes())?;
    fs::rename(
        pgdata.join(bootstrap::PG_CONTROL_STAGED),
        pgdata.join(bootstrap::PG_CONTROL),
    )
    .context("name pg_control")?;
    let _ = fs::remove_file(pgdata.join(bootstrap::MARKER));
    let dir = backups.join(&id);
    let record = tokio::task::spawn_blocking({
        let (pgdata, dir, id) = (pgdata.clone(), dir.clone(), id.clone());
        let meta = (snap.start_lsn, snap.stop_lsn, snap.timeline, snap.system_id);
        move || pack(&pgdata, &dir, &id, meta, &state, start_time, stop_time)
    })
    .await??;
    fs::remove_dir_all(&staging).with_context(|| format!("remove {}", staging.display()))?;
    info!(
        id = %record.id, start_lsn = %record.start_lsn, stop_lsn = %record.stop_lsn,
        bytes = record.bytes, stored_bytes = record.stored_bytes, files = record.files.len(),
        seconds = started.elapsed().as_secs_f64(), "backup complete"
    );
    if let Some(keep) = cfg.keep {
        prune(&repo, keep)?;
    }
    Ok(record)
}

/// Packs the staged data directory into the backup directory `dir`, then writes its
/// manifest and, last, its record.
fn pack(
    pgdata: &Path,
    dir: &Path,
    id: &str,
    (start_lsn, stop_lsn, timeline, system_id): (Lsn, Lsn, u32, u64),
    state: &StoreState,
    start_time: String,
    stop_time: String,
) -> Result<BackupRecord> {
    let files_dir = dir.join(FILES_DIR);
    fs::create_dir_all(&files_dir)?;
    let mut dirs = Vec::new();
    let mut files = Vec::new();
    let mut stack = vec![String::new()];
    let (mut bytes, mut stored) = (0u64, 0u64);
    while let Some(rel) = stack.pop() {
        let here = if rel.is_empty() {
            pgdata.to_owned()
        } else {
            pgdata.join(&rel)
        };
        let mut entries: Vec<_> = fs::read_dir(&here)?.collect::<std::io::Result<_>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name().to_string_lossy().into_owned();
            let path = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            let ft = e.file_type()?;
            if ft.is_dir() {
                dirs.push(path.clone());
                fs::create_dir_all(files_dir.join(&path))?;
                stack.push(path);
            } else if ft.is_file() {
                let src = e.path();
                let out_path = files_dir.join(format!("{path}.zst"));
                let out = File::create(&out_path)
                    .with_context(|| format!("create {}", out_path.display()))?;
                let mut enc = zstd::stream::write::Encoder::new(out, PACK_LEVEL)?;
                let mut input =
                    File::open(&src).with_context(|| format!("read {}", src.display()))?;
                let mut buf = vec![0u8; 1 << 20];
                let (mut crc, mut size) = (0u32, 0u64);
                loop {
                    let n = input
                        .read(&mut buf)
                        .with_context(|| format!("read {}", src.display()))?;
                    if n == 0 {
                        break;
                    }
                    crc = crc32c::crc32c_append(crc, &buf[..n]);
                    size += n as u64;
                    enc.write_all(&buf[..n])?;
                }
                let out = enc.finish()?;
                durable::fsync_file(&out, &out_path)?;
                bytes += size;
                stored += out.metadata()?.len();
                files.push(FileRecord {
                    path,
                    size,
                    crc32c: crc,
                    mtime: e.metadata()?.mtime(),
                });
            }
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    let mut all_dirs: Vec<PathBuf> = dirs.iter().map(|d| files_dir.join(d)).collect();
    all_dirs.push(files_dir.clone());
    for d in all_dirs.iter().rev() {
        durable::fsync_dir(d)?;
    }
    let record = BackupRecord {
        id: id.to_owned(),
        system_identifier: system_id.to_string(),
        timeline,
        start_lsn: start_lsn.to_string(),
        stop_lsn: stop_lsn.to_string(),
        start_time,
        stop_time,
        pg_version: state.pg_version,
        bytes,
        stored_bytes: stored,
        dirs,
        files,
        checksum: 0,
    };
    durable::write_atomic(&dir.join(MANIFEST), manifest(&record).as_bytes())?;
    durable::write_atomic(&dir.join(RECORD), record.encode()?.as_bytes())?;
    durable::fsync_dir(dir)?;
    if let Some(parent) = dir.parent() {
        durable::fsync_dir(parent)?;
    }
    Ok(record)
}

/// The backup's `backup_manifest` in PostgreSQL's format (version 1): every file with its
/// size and CRC-32C, the WAL range, and the SHA-256 of everything before its last line.
pub fn manifest(r: &BackupRecord) -> String {
    let mut m = String::from("{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n\"Files\": [\n");
    for (i, f) in r.files.iter().enumerate() {
        let modified = humantime::format_rfc3339_seconds(
            SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(f.mtime.max(0) as u64),
        )
        .to_string()
        .replace('T', " ")
        .replace('Z', " GMT");
        m.push_str(&format!(
            "{{ \"Path\": {}, \"Size\": {}, \"Last-Modified\": \"{modified}\", \"Checksum-Algorithm\": \"CRC32C\", \"Checksum\": \"{}\" }}{}\n",
            serde_json::Value::String(f.path.clone()),
            f.size,
            // PostgreSQL writes the checksum's bytes as they lie in memory: little-endian.
            f.crc32c
                .to_le_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>(),
            if i + 1 < r.files.len() { "," } else { "" }
        ));
    }
    m.push_str("],\n\"WAL-Ranges\": [\n");
    m.push_str(&format!(
        "{{ \"Timeline\": {}, \"Start-LSN\": \"{}\", \"End-LSN\": \"{}\" }}\n",
        r.timeline, r.start_lsn, r.stop_lsn
    ));
    m.push_str("],\n");
    let sum = sha2::Sha256::digest(m.as_bytes());
    let hex: String = sum.iter().map(|b| format!("{b:02x}")).collect();
    m.push_str(&format!("\"Manifest-Checksum\": \"{hex}\"}}\n"));
    m
}

/// Checks a backup_manifest's `Manifest-Checksum`: the SHA-256 of everything before its
/// last line.
fn check_manifest(m: &[u8]) -> Result<()> {
    let body_end = m
        .strip_suffix(b"\n")
        .and_then(|b| b.iter().rposition(|&c| c == b'\n'))
        .ok_or_else(|| anyhow!("backup_manifest: no last line"))?
        + 1;
    let last = std::str::from_utf8(&m[body_end..]).unwrap_or_default();
    let want = last
        .split('"')
        .nth(3)
        .ok_or_else(|| anyhow!("backup_manifest: no Manifest-Checksum"))?;
    let got: String = sha2::Sha256::digest(&m[..body_end])
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if got != want {
        bail!("backup_manifest: checksum {got} instead of {want}");
    }
    Ok(())
}

/// Every complete backup of the repository, oldest first. A record that cannot be trusted
/// is left out, and named in the second list.
pub fn list_checked(repo: &Path) -> Result<(Vec<BackupRecord>, Vec<String>)> {
    let dir = repo.join(BACKUPS_DIR);
    let (mut out, mut problems) = (Vec::new(), Vec::new());
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((out, problems)),
        Err(e) => return Err(e).with_context(|| format!("list {}", dir.display())),
    };
    for e in entries {
        let p = e?.path();
        if !p.join(RECORD).exists() {
            continue;
        }
        match BackupRecord::load(&p) {
            Ok(r) => out.push(r),
            Err(e) => problems.push(format!("{e:#}")),
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok((out, problems))
}

/// [`list_checked`], warning about the records left out.
pub fn list(repo: &Path) -> Result<Vec<BackupRecord>> {
    let (out, problems) = list_checked(repo)?;
    for p in problems {
        warn!("ignoring a backup: {p}");
    }
    Ok(out)
}

/// What `backups` prints.
#[derive(Serialize)]
pub struct Listing {
    pub backups: Vec<ListedBackup>,
    /// The earliest time a restore can target (the oldest backup's stop time).
    pub restorable_from_time: Option<String>,
    /// The end of the WAL archive: a restore without a target replays to here.
    pub restorable_to_lsn: Option<String>,
}

#[derive(Serialize)]
pub struct ListedBackup {
    pub id: String,
    pub timeline: u32,
    pub start_lsn: String,
    pub stop_lsn: String,
    pub start_time: String,
    pub stop_time: String,
    pub bytes: u64,
    pub stored_bytes: u64,
    pub files: usize,
}

pub fn listing(repo: &Path) -> Result<Listing> {
    let backups = list(repo)?;
    let flush = read_state(&repo.join(WAL_DIR))
        .map_err(crate::store::reader_error)?
        .map(|s| s.flush_lsn.to_string());
    Ok(Listing {
        restorable_from_time: backups.first().map(|b| b.stop_time.clone()),
        restorable_to_lsn: flush.filter(|_| !backups.is_empty()),
        backups: backups
            .into_iter()
            .map(|b| ListedBackup {
                files: b.files.len(),
                id: b.id,
                timeline: b.timeline,
                start_lsn: b.start_lsn,
                stop_lsn: b.stop_lsn,
                start_time: b.start_time,
                stop_time: b.stop_time,
                bytes: b.bytes,
                stored_bytes: b.stored_bytes,
            })
            .collect(),
    })
}

impl std::fmt::Display for Listing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{:<18} {:>3} {:>12} {:>12} {:<21} {:>10} {:>10}",
            "backup", "tl", "start", "stop", "stopped at (UTC)", "size", "stored"
        )?;
        for b in &self.backups {
            writeln!(
                f,
                "{:<18} {:>3} {:>12} {:>12} {:<21} {:>9}M {:>9}M",
                b.id,
                b.timeline,
                b.start_lsn,
                b.stop_lsn,
                b.stop_time,
                b.bytes >> 20,
                b.stored_bytes >> 20
            )?;
        }
        match (&self.restorable_from_time, &self.restorable_to_lsn) {
            (Some(from), Some(to)) => write!(
                f,
                "restorable: from {from} to the end of the WAL archive at {to}"
            ),
            _ => write!(f, "no backups: nothing is restorable"),
        }
    }
}

/// Removes the oldest backups beyond `keep`, and the sealed WAL that no kept backup needs.
/// WAL from the oldest kept backup's start on is never removed, nor the segment being
/// written, nor history files.
pub fn prune(repo: &Path, keep: usize) -> Result<()> {
    if keep == 0 {
        return Err(Fatal {
            code: exit::USAGE,
            message: "--keep must be at least 1".into(),
        }
        .into());
    }
    let backups = list(repo)?;
    let n = backups.len().saturating_sub(keep);
    for b in &backups[..n] {
        let dir = repo.join(BACKUPS_DIR).join(&b.id);
        // Without its record the backup no longer counts, whatever happens next.
        durable::remove_durable(&dir.join(RECORD))?;
        fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
        info!(id = %b.id, "removed backup");
    }
    let Some(oldest) = backups.get(n) else {
        return Ok(());
    };
    let wal_dir = repo.join(WAL_DIR);
    // Only the segment size and timeline are needed: the recorded state will do.
    let Some(state) = read_recorded_state(&wal_dir).map_err(crate::follow::store_fatal)? else {
        return Ok(());
    };
    let first_needed = state.seg_size.segment_of(oldest.start()?);
    let mut removed = 0;
    for e in fs::read_dir(&wal_dir)? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if let Some(StoreFile::Sealed { segno, .. }) = StoreFile::parse(&name, state.seg_size) {
            if segno < first_needed {
                durable::remove_durable(&wal_dir.join(&name))?;
                removed += 1;
            }
        }
    }
    info!(
        kept = backups.len() - n,
        removed_backups = n,
        removed_segments = removed,
        "retention applied"
    );
    Ok(())
}

/// The segments of the store from `from` through `to` that are missing. Each segment must
/// be there under the timeline the store's history gives it (the newest timeline holding
/// its last byte, as PostgreSQL asks for it): sealed, or, on the store's timeline, the
/// `.partial` being written below the flush position.
fn wal_chain(wal_dir: &Path, state: &StoreState, from: Lsn, to: Lsn) -> Result<Vec<String>> {
    let history = if state.timeline.0 > 1 {
        let path = wal_dir.join(WalFileName::History(state.timeline).to_name(state.seg_size));
        let content =
            read_history_file(&path).with_context(|| format!("read {}", path.display()))?;
        Some(History::parse(state.timeline, &content).map_err(|e| anyhow!(e))?)
    } else {
        None
    };
    let seg = state.seg_size;
    let mut missing = Vec::new();
    let last = seg.segment_of(Lsn(to.0.saturating_sub(1)).max(from));
    for segno in seg.segment_of(from).0..=last.0 {
        let end = seg.segment_start(SegmentNo(segno + 1));
        let timeline = history
            .as_ref()
            .map_or(state.timeline, |h| h.timeline_of(Lsn(end.0 - 1)));
        let name = WalFileName::Segment {
            timeline,
            segno: SegmentNo(segno),
        }
        .to_name(seg);
        let sealed = wal_dir.join(format!("{name}{SEALED_SUFFIX}")).exists();
        let partial = timeline == state.timeline
            && seg.segment_start(SegmentNo(segno)) < state.flush_lsn
            && wal_dir.join(format!("{name}{PARTIAL_SUFFIX}")).exists();
        if !sealed && !partial {
            missing.push(name);
        }
    }
    Ok(missing)
}

/// The WAL chain from the newest backup's start to the end of the archive (for `check`).
#[derive(Debug)]
pub struct NewestChain {
    pub backup: String,
    pub from: Lsn,
    /// The end of the archive: its store's flush position.
    pub to: Lsn,
    /// The segments missing between them (see `wal_chain`).
    pub missing: Vec<String>,
}

/// The chain [`NewestChain`] describes; `None` when the repository has no backup or no WAL
/// archive yet.
pub fn newest_chain(repo: &Path) -> Result<Option<NewestChain>> {
    let backups = list(repo)?;
    let Some(newest) = backups.last() else {
        return Ok(None);
    };
    let wal_dir = repo.join(WAL_DIR);
    let Some(state) = read_state(&wal_dir).map_err(crate::store::reader_error)? else {
        return Ok(None);
    };
    let from = newest.start()?;
    Ok(Some(NewestChain {
        backup: newest.id.clone(),
        from,
        to: state.flush_lsn,
        missing: wal_chain(&wal_dir, &state, from, state.flush_lsn)?,
    }))
}

/// A recovery target.
#[derive(Clone, Debug, Default)]
pub struct Target {
    pub time: Option<String>,
    pub lsn: Option<Lsn>,
    pub xid: Option<String>,
    pub name: Option<String>,
    /// pause, promote or shutdown.
    pub action: Option<String>,
}

impl Target {
    /// Checks the target as given: at most one of the four, and a time that names its
    /// zone. Returns the time as a PostgreSQL timestamp. Errors are usage errors (exit 2).
    pub fn check(&self) -> Result<Option<i64>> {
        if self.given() > 1 {
            return Err(Fatal {
                code: exit::USAGE,
                message:
                    "give at most one of --target-time, --target-lsn, --target-xid, --target-name"
                        .into(),
            }
            .into());
        }
        if let Some(xid) = &self.xid {
            // A transaction ID as PostgreSQL reads recovery_target_xid: a number (32-bit, or
            // 64-bit with its epoch). Anything else would make the server refuse to start.
            if !xid.bytes().all(|b| b.is_ascii_digit()) || xid.parse::<u64>().is_err() {
                return Err(Fatal {
                    code: exit::USAGE,
                    message: format!(
                        "--target-xid must be a transaction ID (digits only), got {xid:?}"
                    ),
                }
                .into());
            }
        }
        if let Some(name) = &self.name {
            if name.is_empty() || name.len() >= 64 || name.chars().any(char::is_control) {
                return Err(Fatal {
                    code: exit::USAGE,
                    message: format!(
                        "--target-name must be a restore point name of 1 to 63 bytes without control characters, got {name:?}"
                    ),
                }
                .into());
            }
        }
        let Some(time) = &self.time else {
            return Ok(None);
        };
        let at = pgtime::parse(time).map_err(|e| Fatal {
            code: exit::USAGE,
            message: format!("--target-time {e}"),
        })?;
        Ok(Some(at))
    }

    /// `recovery_target_time` as written for PostgreSQL: in UTC with an explicit `+00`, so
    /// that the server's `TimeZone` cannot change what it means.
    fn recovery_target_time(&self) -> Result<Option<String>> {
        let Some(at) = self.check()? else {
            return Ok(None);
        };
        let written = pgtime::to_postgres(at)
            .ok_or_else(|| anyhow!("--target-time {at} cannot be written for PostgreSQL"))?;
        Ok(Some(written))
    }

    /// How many of the four recovery targets are given: `restore` accepts at most one.
    fn given(&self) -> usize {
        [
            self.time.is_some(),
            self.lsn.is_some(),
            self.xid.is_some(),
            self.name.is_some(),
        ]
        .into_iter()
        .filter(|&given| given)
        .count()
    }
}

/// Settings of `wal-receiver restore`.
pub struct RestoreConfig {
    pub repo: PathBuf,
    pub pgdata: PathBuf,
    pub target: Target,
    pub backup: Option<String>,
    pub restore_bin: PathBuf,
    /// Where the restored server listens: written into its `postgresql.auto.conf`.
    pub server: ServerSettings,
}

/// Refuses a `--repo` that is not a backup repository (exit 2): one that does not exist,
/// or holds neither `backups/` nor `wal/`.
fn check_is_repository(repo: &Path) -> Result<()> {
    let why = match fs::metadata(repo) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "it does not exist".to_owned(),
        Err(e) => format!("it cannot be read: {e}"),
        Ok(m) if !m.is_dir() => "it is not a directory".to_owned(),
        Ok(_) if repo.join(BACKUPS_DIR).is_dir() || repo.join(WAL_DIR).is_dir() => return Ok(()),
        Ok(_) => format!("it holds neither {BACKUPS_DIR}/ nor {WAL_DIR}/"),
    };
    Err(Fatal {
        code: exit::USAGE,
        message: format!(
            "no repository at {}: {why}. Give the --repo that 'wal-receiver backup' wrote to",
            repo.display()
        ),
    }
    .into())
}

fn refuse(message: String) -> anyhow::Error {
    Fatal {
        code: exit::MISMATCH,
        message,
    }
    .into()
}

/// Refuses a target time that replay from `start` cannot reach. PostgreSQL stops before the
/// first commit or abort later than the target (`recovery_target_inclusive` is on); with
/// none in the archive it replays to the end and fails with "recovery ended before
/// configured recovery target was reached", on a directory already written. The last
/// transaction end in the archive tells beforehand.
fn time_reachable(
    wal_dir: &Path,
    state: &StoreState,
    start: Lsn,
    time: &str,
    target: i64,
) -> Result<()> {
    match last_xact_end(wal_dir, state, start)? {
        LastXact::Unknown => Ok(()),
        LastXact::At(x) => match x.time {
            walcheck::XactTime::Unknown => Ok(()),
            walcheck::XactTime::At(t) => {
                let ended = pgtime::to_rfc3339(t);
                if t <= target {
                    return Err(refuse(format!(
                        "target {time} is not before the last transaction in the WAL archive (it ended at {ended}, record at {}): replay would reach the end of the archive without reaching the target. Give an earlier time, or restore without a target to replay the whole archive",
                        x.lsn
                    )));
                }
                info!(
                    last_transaction_end = %ended,
                    record = %x.lsn,
                    "the WAL archive holds a transaction that ended after the target time"
                );
                Ok(())
            }
        },
        LastXact::None => Err(refuse(format!(
            "target {time} cannot be reached: the WAL archive holds no committed or aborted transaction from {start} to its end at {}. Restore without a target to replay the whole archive",
            state.flush_lsn
        ))),
    }
}

enum LastXact {
    At(walcheck::XactEnd),
    /// No transaction ends between the start and the end of the archive.
    None,
    /// Not found out: a segment is not on the store's current timeline, or a sealed
    /// segment is larger than 64 MiB.
    Unknown,
}

/// The last transaction end in the archive at or after `from`, searched from the flush
/// position backwards a segment at a time.
fn last_xact_end(wal_dir: &Path, state: &StoreState, from: Lsn) -> Result<LastXact> {
    if !walcheck::knows(state.pg_version) {
        return Err(refuse(format!(
            "cannot check the target time against the WAL archive: {}. Restore to a --target-lsn, --target-xid or --target-name instead",
            walcheck::UnknownFormat {
                major: state.pg_version
            }
        )));
    }
    let seg = state.seg_size;
    if state.flush_lsn <= from {
        return Ok(LastXact::None);
    }
    let first = seg.segment_of(from);
    let mut segno = seg.segment_of(Lsn(state.flush_lsn.0 - 1));
    let mut reader = WalReader::new(wal_dir, state.timeline, seg);
    loop {
        let sealed_path = crate::store::segment_path(wal_dir, state, segno, SEALED_SUFFIX);
        // Sealed segments `WalReader` does not keep whole are not searched (the answer is
        // `Unknown`): the search may walk back through many, and each would be read twice,
        // once to check its checksum and once as a stream.
        if seg.bytes() > crate::walread::WHOLE_MAX && sealed_path.exists() {
            return Ok(LastXact::Unknown);
        }
        // Through the reader, which checks that a `.partial` was not recycled by a running
        // follower while it was read (and then reads the sealed copy).
        let mut src = StoreSegment::new(&mut reader, segno);
        let found = walcheck::scan(&mut src, state.segment_expect(segno), Some(state.flush_lsn))
            .with_context(|| {
                let name = WalFileName::Segment {
                    timeline: state.timeline,
                    segno,
                };
                format!(
                    "read WAL segment {} in {}",
                    name.to_name(seg),
                    wal_dir.display()
                )
            })?;
        if src.missing {
            return Ok(LastXact::Unknown);
        }
        match found.last_xact {
            Some(x) if x.lsn >= from => return Ok(LastXact::At(x)),
            Some(_) => return Ok(LastXact::None),
            None if segno.0 <= first.0 => return Ok(LastXact::None),
            None => segno = SegmentNo(segno.0 - 1),
        }
    }
}

/// The newest of `backups` (oldest first) that `ended` accepts.
fn newest_ended_by(
    backups: &[BackupRecord],
    ended: impl Fn(&BackupRecord) -> Result<bool>,
) -> Result<Option<&BackupRecord>> {
    let mut newest = None;
    for b in backups {
        if ended(b)? {
            newest = Some(b);
        }
    }
    Ok(newest)
}

/// Restores a backup into a new data directory, set up to replay the archive to the target.
pub fn restore(cfg: &RestoreConfig) -> Result<BackupRecord> {
    cfg.server.check().map_err(|message| Fatal {
        code: exit::USAGE,
        message,
    })?;
    let repo = std::path::absolute(&cfg.repo)?;
    let pgdata = std::path::absolute(&cfg.pgdata)?;
    // The arguments first, then the repository.
    let t = &cfg.target;
    let target_at = t.check()?;
    if fs::read_dir(&pgdata).is_ok_and(|mut rd| rd.next().is_some()) {
        return Err(Fatal {
            code: exit::TARGET_NOT_EMPTY,
            message: format!(
                "{} is not empty; restore into a new or empty directory",
                pgdata.display()
            ),
        }
        .into());
    }
    check_is_repository(&repo)?;
    let wal_dir = repo.join(WAL_DIR);
    let backups = list(&repo)?;
    if backups.is_empty() {
        return Err(refuse(format!(
            "{} holds no complete backup",
            repo.display()
        )));
    }
    let state = read_state(&wal_dir)
        .map_err(crate::store::reader_error)?
        .ok_or_else(|| refuse("the repository has no WAL archive".into()))?;
    let chosen = match &cfg.backup {
        Some(id) => backups
            .iter()
            .find(|b| &b.id == id)
            .ok_or_else(|| refuse(format!("there is no backup {id}")))?,
        None => {
            if let Some(lsn) = t.lsn {
                if lsn > state.flush_lsn {
                    return Err(refuse(format!(
                        "target {lsn} is past the end of the WAL archive ({}); no backup plus archive reaches it",
                        state.flush_lsn
                    )));
                }
                newest_ended_by(&backups, |b| Ok(b.stop()? <= lsn))?.ok_or_else(|| {
                    refuse(format!(
                        "target {lsn} is before the end of the oldest backup ({} ends at {}); no backup can reach it",
                        backups[0].id, backups[0].stop_lsn
                    ))
                })?
            } else if let (Some(time), Some(at)) = (&t.time, target_at) {
                newest_ended_by(&backups, |b| Ok(pgtime::from_system(b.stop_at()?) <= at))?.ok_or_else(|| {
                    refuse(format!(
                        "target {time} is before the oldest backup ended ({} at {}); no backup can reach it",
                        backups[0].id, backups[0].stop_time
                    ))
                })?
            } else if t.xid.is_some() || t.name.is_some() {
                // Where a transaction or a restore point lies is known only by replaying:
                // the oldest backup reaches every one the archive holds.
                &backups[0]
            } else {
                backups.last().expect("not empty")
            }
        }
    };
    let start = chosen.start()?;
    if let (Some(time), Some(at)) = (&t.time, target_at) {
        time_reachable(&wal_dir, &state, start, time, at)?;
    }
    let end = t.lsn.unwrap_or(state.flush_lsn);
    let missing = wal_chain(&wal_dir, &state, start, end)?;
    if !missing.is_empty() {
        return Err(refuse(format!(
            "the WAL archive has a gap: {} segment(s) missing between backup {}'s start {start} and {end}, first {}; this backup cannot be restored to the target. Run 'wal-receiver verify'",
            missing.len(),
            chosen.id,
            missing[0]
        )));
    }
    info!(backup = %chosen.id, start_lsn = %chosen.start_lsn, stop_lsn = %chosen.stop_lsn, "restoring");
    let existed = pgdata.exists();
    let result = unpack(&repo, chosen, &pgdata).and_then(|()| {
        write_recovery(
            &pgdata,
            &wal_dir,
            &cfg.restore_bin,
            t,
            chosen.pg_version,
            &cfg.server,
        )
    });
    if let Err(e) = result {
        // Never leave a directory PostgreSQL could be started on: remove what was written
        // (and the directory, if this restore created it).
        if existed {
            for entry in fs::read_dir(&pgdata).into_iter().flatten().flatten() {
                let p = entry.path();
                let _ = if p.is_dir() {
                    fs::remove_dir_all(&p)
                } else {
                    fs::remove_file(&p)
                };
            }
        } else {
            let _ = fs::remove_dir_all(&pgdata);
        }
        return Err(e);
    }
    Ok(chosen.clone())
}

/// Decompresses every file of `b` into `pgdata`, checking each one's size and CRC-32C, on
/// as many threads as there are cores; then makes it all durable with one `syncfs`.
fn unpack(repo: &Path, b: &BackupRecord, pgdata: &Path) -> Result<()> {
    let src = repo.join(BACKUPS_DIR).join(&b.id);
    fs::create_dir_all(pgdata)?;
    fs::set_permissions(
        pgdata,
        fs::Permissions::from_mode(crate::access::dir_mode()),
    )?;
    // Opened before any write, so that the `syncfs` through it reports every writeback
    // error of the files written after.
    let dir = File::open(pgdata).with_context(|| format!("open {}", pgdata.display()))?;
    for d in &b.dirs {
        let p = safe_join(pgdata, d)?;
        fs::create_dir_all(&p)?;
        fs::set_permissions(&p, fs::Permissions::from_mode(crate::access::dir_mode()))?;
    }
    // Largest first, so that the threads finish together.
    let mut order: Vec<&FileRecord> = b.files.iter().collect();
    order.sort_by_key(|f| std::cmp::Reverse(f.size));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failed = std::sync::atomic::AtomicBool::new(false);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().min(8));
    let errors: Vec<anyhow::Error> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    use std::sync::atomic::Ordering::Relaxed;
                    while !failed.load(Relaxed) {
                        let Some(f) = order.get(next.fetch_add(1, Relaxed)) else {
                            return Ok(());
                        };
                        if let Err(e) = unpack_file(&src, f, pgdata) {
                            failed.store(true, Relaxed);
                            return Err(e);
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        workers
            .into_iter()
            .filter_map(|w| match w.join() {
                Ok(r) => r.err(),
                Err(_) => Some(anyhow!("an unpacking thread panicked")),
            })
            .collect()
    });
    if let Some(e) = errors.into_iter().next() {
        return Err(e);
    }
    let manifest = fs::read(src.join(MANIFEST))?;
    check_manifest(&manifest).map_err(|e| Fatal {
        code: exit::STORE_CORRUPT,
        message: format!("the backup is damaged: {e:#}; refusing to restore it"),
    })?;
    fs::write(pgdata.join(MANIFEST), manifest)?;
    // One syncfs makes every file and directory entry durable at once: an fsync per file
    // cost more than the decompression.
    nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(&dir))
        .map_err(|e| durable::DurableError::io("syncfs", pgdata, e.into()))?;
    Ok(())
}

fn unpack_file(src: &Path, f: &FileRecord, pgdata: &Path) -> Result<()> {
    let out = safe_join(pgdata, &f.path)?;
    let file = std::os::unix::fs::OpenOptionsExt::mode(
        fs::OpenOptions::new().write(true).create_new(true),
        crate::access::file_mode(),
    )
    .open(&out)
    .with_context(|| format!("create {}", out.display()))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, EarlyWriteback::new(file));
    copy_packed(src, f, &mut w).map_err(|e| match e.downcast::<Damaged>() {
        Ok(d) => Fatal {
            code: exit::STORE_CORRUPT,
            message: format!("the backup is damaged: {d}; refusing to restore it"),
        }
        .into(),
        Err(e) => e.context(format!("write {}", out.display())),
    })?;
    w.flush()
        .with_context(|| format!("write {}", out.display()))?;
    w.get_mut().start_writeback();
    Ok(())
}

/// A file being written, whose writeback the kernel is asked to start for every 8 MiB
/// written, as PostgreSQL's `pg_flush_data` does: by the final `syncfs` most of the data
/// is on its way to the disk, instead of all of it waiting for that call.
struct EarlyWriteback {
    file: File,
    written: u64,
    started: u64,
}

impl EarlyWriteback {
    const EVERY: u64 = 8 << 20;

    fn new(file: File) -> EarlyWriteback {
        EarlyWriteback {
            file,
            written: 0,
            started: 0,
        }
    }

    /// Starts writeback of what was written since the last call. A hint only: with the
    /// pages dirty, `POSIX_FADV_DONTNEED` starts their writeback and drops none of them;
    /// errors are left to the `syncfs` that follows.
    fn start_writeback(&mut self) {
        let len = self.written - self.started;
        if len > 0 {
            let _ = nix::fcntl::posix_fadvise(
                std::os::fd::AsRawFd::as_raw_fd(&self.file),
                self.started as i64,
                len as i64,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
            );
            self.started = self.written;
        }
    }
}

impl Write for EarlyWriteback {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        if self.written - self.started >= Self::EVERY {
            self.start_writeback();
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// `root/rel` for a relative path from a backup record, refused if it could leave `root`.
fn safe_join(root: &Path, rel: &str) -> Result<PathBuf> {
    let parts = crate::paths::components(rel)?;
    let mut p = root.to_owned();
    for c in parts {
        p.push(c);
    }
    Ok(p)
}

/// A stored file that does not match its record.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Damaged(String);

/// Streams a stored file, decompressed, into `out`, and checks it against its record: its
/// size (reading stops one byte past it) and its CRC-32C. On an error, what was written to
/// `out` must be discarded.
fn copy_packed(dir: &Path, f: &FileRecord, out: &mut impl Write) -> Result<()> {
    let damaged = |e: anyhow::Error| -> anyhow::Error { Damaged(format!("{e:#}")).into() };
    let path = safe_join(&dir.join(FILES_DIR), &format!("{}.zst", f.path))?;
    let file = File::open(&path).map_err(|_| damaged(anyhow!("{}: missing", f.path)))?;
    let mut dec = zstd::stream::read::Decoder::new(file)?.take(f.size.saturating_add(1));
    let mut buf = vec![0u8; 1 << 20];
    let (mut crc, mut len) = (0u32, 0u64);
    loop {
        let n = match dec.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(damaged(anyhow!(
                    "{}: cannot be decompressed (truncated or damaged): {e}",
                    f.path
                )))
            }
        };
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        len += n as u64;
        out.write_all(&buf[..n])?;
    }
    if len != f.size {
        return Err(damaged(anyhow!(
            "{}: {len} bytes instead of {}",
            f.path,
            f.size
        )));
    }
    if crc != f.crc32c {
        return Err(damaged(anyhow!(
            "{}: checksum {crc:08x} instead of {:08x}",
            f.path,
            f.crc32c
        )));
    }
    Ok(())
}

/// The PostgreSQL major versions whose restore promotes at the end of the archive: their
/// standbys honour a promotion request made the way `pg_ctl promote` makes it (the
/// `promote` file, then SIGUSR1 to the postmaster), and walship is tested on each. Others
/// replay the archive by archive recovery.
const PROMOTE_AT_END_MAJORS: std::ops::RangeInclusive<u32> = 15..=18;

/// Recovery settings: restore_command from the repository, the target, where the server
/// listens (when given), and the signal file.
///
/// With a target, `recovery.signal`: archive recovery stops at the target and takes the
/// target action. Without one, on PostgreSQL 15 to 18, the server replays as a standby
/// (`standby.signal`) and promotes itself once it has replayed the end of the archive:
/// restore_command requests the promotion when it is asked for the last segment (see
/// [`crate::restore::restore_wal`]; `promote_trigger_file`, which did this through 15,
/// would stop 16 and later from starting). A promoted standby writes an end-of-recovery
/// record and checkpoints in the background, so it accepts writes without waiting for the
/// checkpoint that ends archive recovery (a write of every page replay dirtied).
fn write_recovery(
    pgdata: &Path,
    wal_dir: &Path,
    restore_bin: &Path,
    t: &Target,
    pg_version: u32,
    server: &ServerSettings,
) -> Result<()> {
    let auto = pgdata.join("postgresql.auto.conf");
    let mut conf = fs::read_to_string(&auto).unwrap_or_default();
    if !conf.is_empty() && !conf.ends_with('\n') {
        conf.push('\n');
    }
    let q = pgconf::quote;
    let promote_at_end = t.given() == 0 && PROMOTE_AT_END_MAJORS.contains(&pg_version);
    let restore = format!(
        "{} restore-wal --wal-dir {}{} %f %p",
        bootstrap::shell_quote(&restore_bin.display().to_string()),
        bootstrap::shell_quote(&wal_dir.display().to_string()),
        if promote_at_end {
            " --promote-at-end"
        } else {
            ""
        }
    );
    conf.push_str("# Added by wal-receiver restore: replay the repository's WAL archive.\n");
    conf.push_str(&format!("restore_command = '{}'\n", q(&restore)));
    if promote_at_end {
        conf.push_str(
            "# Replay as a standby; restore-wal requests the promotion at the end of the archive.\n",
        );
    }
    // A restored server must not stream from, or act for, the cluster it was copied from.
    conf.push_str("primary_conninfo = ''\n");
    if let Some(pg_time) = t.recovery_target_time()? {
        conf.push_str(&format!("recovery_target_time = '{pg_time}'\n"));
    }
    if let Some(v) = t.lsn {
        conf.push_str(&format!("recovery_target_lsn = '{v}'\n"));
    }
    if let Some(v) = &t.xid {
        conf.push_str(&format!("recovery_target_xid = '{}'\n", q(v)));
    }
    if let Some(v) = &t.name {
        conf.push_str(&format!("recovery_target_name = '{}'\n", q(v)));
    }
    if let Some(v) = &t.action {
        conf.push_str(&format!("recovery_target_action = '{}'\n", q(v)));
    }
    conf.push_str(&server.conf_lines());
    durable::write_atomic(&auto, conf.as_bytes())?;
    if promote_at_end {
        let armed = pgdata.join(crate::restore::PROMOTE_ARMED);
        if let Some(dir) = armed.parent() {
            fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        durable::write_atomic(&armed, b"")?;
        durable::write_atomic(&pgdata.join("standby.signal"), b"")?;
    } else {
        durable::write_atomic(&pgdata.join("recovery.signal"), b"")?;
    }
    Ok(())
}

/// What `verify` found.
#[derive(Default, Serialize)]
pub struct Verified {
    pub backups: usize,
    pub files_read: usize,
    pub files_skipped: usize,
    pub segments_read: usize,
    pub segments_skipped: usize,
    pub problems: Vec<String>,
}

/// The cache of `verify`: files found intact, by path, with the size and modification time
/// they had. A file whose size or time changed is read again.
#[derive(Default, Serialize, Deserialize)]
struct Cache {
    intact: BTreeMap<String, (u64, i64)>,
}

fn stamp(path: &Path) -> Option<(u64, i64)> {
    fs::metadata(path)
        .ok()
        .map(|m| (m.size(), m.mtime_nsec() + m.mtime() * 1_000_000_000))
}

/// Runs `check` on `path` unless the cache says it was found intact with the same size and
/// time. `None`: skipped. What is intact goes into `next`.
fn cached_check(
    cache: &Cache,
    next: &mut Cache,
    key: String,
    path: &Path,
    check: impl FnOnce() -> Result<()>,
) -> Option<Result<()>> {
    let st = stamp(path);
    if let Some(st) = st.filter(|s| cache.intact.get(&key) == Some(s)) {
        next.intact.insert(key, st);
        return None;
    }
    let r = check();
    if let (Ok(()), Some(st)) = (&r, st) {
        next.intact.insert(key, st);
    }
    Some(r)
}

/// Checks every stored file and the WAL chain from each backup's start to the end of the
/// archive. With `full`, also what the cache says was intact.
pub fn verify(repo: &Path, full: bool) -> Result<Verified> {
    let cache_path = repo.join(VERIFIED);
    let mut cache: Cache = if full {
        Cache::default()
    } else {
        fs::read(&cache_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    };
    let mut v = Verified::default();
    let mut next = Cache::default();
    let (backups, bad) = list_checked(repo)?;
    v.problems.extend(bad);
    v.backups = backups.len();
    for b in &backups {
        let dir = repo.join(BACKUPS_DIR).join(&b.id);
        match fs::read(dir.join(MANIFEST)) {
            Ok(m) => {
                if let Err(e) = check_manifest(&m) {
                    v.problems.push(format!("backup {}: {e:#}", b.id));
                }
            }
            Err(_) => v
                .problems
                .push(format!("backup {}: backup_manifest is missing", b.id)),
        }
        for f in &b.files {
            let key = format!("{}/{FILES_DIR}/{}.zst", b.id, f.path);
            let path = dir.join(FILES_DIR).join(format!("{}.zst", f.path));
            let check = || copy_packed(&dir, f, &mut std::io::sink());
            match cached_check(&cache, &mut next, key, &path, check) {
                None => v.files_skipped += 1,
                Some(r) => {
                    v.files_read += 1;
                    if let Err(e) = r {
                        v.problems.push(format!("backup {}: {e:#}", b.id));
                    }
                }
            }
        }
    }
    let wal_dir = repo.join(WAL_DIR);
    if let (Some(state), Some(oldest)) = (
        read_state(&wal_dir).map_err(crate::store::reader_error)?,
        backups.first(),
    ) {
        for b in &backups {
            for name in wal_chain(&wal_dir, &state, b.start()?, state.flush_lsn)? {
                v.problems.push(format!(
                    "WAL segment {name} is missing: backup {} cannot be restored past it",
                    b.id
                ));
            }
        }
        v.problems.sort();
        v.problems.dedup();
        // Every sealed segment from the oldest backup's start on.
        let first = state.seg_size.segment_of(oldest.start()?);
        let mut names: BTreeSet<String> = BTreeSet::new();
        for e in fs::read_dir(&wal_dir)? {
            names.insert(e?.file_name().to_string_lossy().into_owned());
        }
        for name in names {
            let Some(StoreFile::Sealed { segno, .. }) = StoreFile::parse(&name, state.seg_size)
            else {
                continue;
            };
            if segno < first {
                continue;
            }
            let key = format!("{WAL_DIR}/{name}");
            let path = wal_dir.join(&name);
            let check = || {
                sealed::read_sealed(&path, state.seg_size.bytes(), &mut std::io::sink()).map(drop)
            };
            match cached_check(&cache, &mut next, key, &path, check) {
                None => v.segments_skipped += 1,
                Some(r) => {
                    v.segments_read += 1;
                    if let Err(e) = r {
                        v.problems.push(format!("WAL segment {name}: {e:#}"));
                    }
                }
            }
        }
    }
    cache = next;
    durable::write_atomic(&cache_path, serde_json::to_string(&cache)?.as_bytes())?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("walship-restore-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn config(repo: &Path, pgdata: &Path, time: Option<&str>) -> RestoreConfig {
        RestoreConfig {
            repo: repo.to_owned(),
            pgdata: pgdata.to_owned(),
            target: Target {
                time: time.map(str::to_owned),
                ..Target::default()
            },
            backup: None,
            restore_bin: PathBuf::from("wal-receiver"),
            server: crate::pgconf::ServerSettings::default(),
        }
    }

    /// The exit code and message `restore` ends with.
    fn refusal(cfg: &RestoreConfig) -> (u8, String) {
        let e = restore(cfg).expect_err("restore succeeded");
        let code = e.downcast_ref::<Fatal>().map_or(exit::ERROR, |f| f.code);
        (code, format!("{e:#}"))
    }

    #[test]
    fn restore_checks_its_arguments_before_the_repository() {
        let dir = tmpdir("args");
        let missing = dir.join("no-such-repo");
        let pgdata = dir.join("pgdata");
        // A time without a zone: a usage error, whatever the repository.
        let (code, msg) = refusal(&config(&missing, &pgdata, Some("2026-12-02 10:36:22")));
        assert_eq!(code, exit::USAGE, "{msg}");
        assert!(msg.contains("no time zone"), "{msg}");
        // Two targets.
        let mut two = config(&missing, &pgdata, Some("2026-12-02 10:36:22Z"));
        two.target.lsn = Some(Lsn(1));
        let (code, msg) = refusal(&two);
        assert_eq!(code, exit::USAGE, "{msg}");
        assert!(msg.contains("at most one"), "{msg}");
        // A data directory that is not empty.
        fs::create_dir_all(&pgdata).unwrap();
        fs::write(pgdata.join("PG_VERSION"), "15\n").unwrap();
        let (code, msg) = refusal(&config(&missing, &pgdata, None));
        assert_eq!(code, exit::TARGET_NOT_EMPTY, "{msg}");
        fs::remove_file(pgdata.join("PG_VERSION")).unwrap();
        // Then the repository: missing, a file, a directory that is no repository.
        let (code, msg) = refusal(&config(&missing, &pgdata, Some("2026-12-02 10:36:22+02")));
        assert_eq!(code, exit::USAGE, "{msg}");
        assert!(
            msg.contains("no repository at") && msg.contains("does not exist"),
            "{msg}"
        );
        let file = dir.join("a-file");
        fs::write(&file, b"").unwrap();
        let (code, msg) = refusal(&config(&file, &pgdata, None));
        assert_eq!(code, exit::USAGE, "{msg}");
        assert!(msg.contains("not a directory"), "{msg}");
        let (code, msg) = refusal(&config(&pgdata, &pgdata.join("x"), None));
        assert_eq!(code, exit::USAGE, "{msg}");
        assert!(msg.contains("neither backups/ nor wal/"), "{msg}");
        // A repository without a backup: refused as before (exit 4).
        fs::create_dir_all(dir.join("repo").join(BACKUPS_DIR)).unwrap();
        let (code, msg) = refusal(&config(&dir.join("repo"), &pgdata, None));
        assert_eq!(code, exit::MISMATCH, "{msg}");
        assert!(msg.contains("no complete backup"), "{msg}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_target_time_is_written_in_utc() {
        let t = |time: &str| Target {
            time: Some(time.into()),
            ..Target::default()
        };
        for given in [
            "2026-12-02T08:36:22Z",
            "2026-12-02 10:36:22+02",
            "2026-12-02 10:36:22 +02:00",
            "2026-12-02 08:36:22 UTC",
        ] {
            assert_eq!(
                t(given).recovery_target_time().unwrap().as_deref(),
                Some("2026-12-02 08:36:22+00"),
                "{given}"
            );
        }
        assert_eq!(
            t("2026-12-02 10:36:22.123456+02:00")
                .recovery_target_time()
                .unwrap()
                .as_deref(),
            Some("2026-12-02 08:36:22.123456+00")
        );
        assert_eq!(Target::default().recovery_target_time().unwrap(), None);
    }

    #[test]
    fn an_xid_or_restore_point_that_postgresql_would_not_read_is_refused() {
        let usage = |t: Target| {
            let e = t.check().unwrap_err();
            e.downcast_ref::<Fatal>().map(|f| f.code)
        };
        let xid = |x: &str| Target {
            xid: Some(x.into()),
            ..Target::default()
        };
        let name = |n: &str| Target {
            name: Some(n.into()),
            ..Target::default()
        };
        for bad in [
            "",
            "12\n",
            "12 34",
            "-5",
            "+5",
            "0x10",
            "18446744073709551616",
        ] {
            assert_eq!(usage(xid(bad)), Some(exit::USAGE), "{bad:?}");
        }
        assert!(xid("1234").check().is_ok());
        for bad in ["", "a\nb", &"n".repeat(64)] {
            assert_eq!(usage(name(bad)), Some(exit::USAGE), "{bad:?}");
        }
        assert!(name("before 'the' change").check().is_ok());
    }

    #[test]
    fn without_a_target_each_supported_major_promotes_by_request_at_the_end() {
        let dir = tmpdir("promote-at-end");
        let write = |name: &str, major: u32, t: &Target| {
            let pgdata = dir.join(name);
            fs::create_dir_all(&pgdata).unwrap();
            let (wal, bin) = (Path::new("/wal"), Path::new("/bin/wal-receiver"));
            write_recovery(&pgdata, wal, bin, t, major, &ServerSettings::default()).unwrap();
            let conf = fs::read_to_string(pgdata.join("postgresql.auto.conf")).unwrap();
            (pgdata, conf)
        };
        for major in [0, 14, 15, 16, 17, 18, 19] {
            let (pgdata, conf) = write(&format!("pg{major}"), major, &Target::default());
            // PostgreSQL 16 and later refuse to start with it.
            assert!(!conf.contains("promote_trigger_file"), "{major}: {conf}");
            let at_end = PROMOTE_AT_END_MAJORS.contains(&major);
            assert_eq!(
                conf.contains(" --promote-at-end "),
                at_end,
                "{major}: {conf}"
            );
            assert_eq!(pgdata.join("standby.signal").exists(), at_end, "{major}");
            assert_eq!(
                pgdata.join(crate::restore::PROMOTE_ARMED).exists(),
                at_end,
                "{major}"
            );
            assert_eq!(pgdata.join("recovery.signal").exists(), !at_end, "{major}");
        }
        // A target is reached by archive recovery, on every version.
        let lsn = Target {
            lsn: Some(Lsn(0x300_0000)),
            ..Target::default()
        };
        let (pgdata, conf) = write("target", 18, &lsn);
        assert!(!conf.contains("--promote-at-end"), "{conf}");
        assert!(pgdata.join("recovery.signal").exists());
        assert!(!pgdata.join(crate::restore::PROMOTE_ARMED).exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
