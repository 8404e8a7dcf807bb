//! The WAL store: where a receiver keeps WAL, durably.
//!
//! ```text
//! <wal-dir>/
//!   state                              StoreState: system id, timeline, segment size, flush LSN
//!   LOCK                               flock held by the one receiver that writes this store
//!   000000010000000000000012.zst       sealed segments (see crate::sealed)
//!   000000010000000000000013.partial   the segment being written, preallocated
//! ```
//!
//! Positions: `durable_flush <= state.flush_lsn <= write_lsn`. Bytes below `write_lsn` are
//! written to segment files; bytes below `state.flush_lsn` are fdatasynced *and then*
//! recorded in `state`, rewritten in place. Only `state.flush_lsn` is ever acknowledged or
//! served. `state` itself is fdatasynced only when the flush position enters another segment
//! (`durable_flush` is what its last fdatasync recorded), as PostgreSQL syncs `pg_control`
//! only at checkpoints: other processes read the current record from the page cache, and
//! after a crash the position on disk may lag, but never leave the segment that holds the
//! acknowledged one. [`Store::open`] then walks that segment's records past it
//! ([`crate::walcheck`]) and takes up every whole, valid record it finds, so every
//! acknowledged byte survives a crash. Bytes past that are garbage and are overwritten when
//! the stream resumes; readers never serve them.
//!
//! A `.partial` whose segment lies wholly below `state.flush_lsn` is complete and durable. A
//! background thread seals it into `.zst` and only then removes the `.partial`; a crash in
//! between leaves both, and the next start seals again (idempotently).

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use nix::fcntl::{Flock, FlockArg};
use walship_common::durable::{self, DurableError};
use walship_common::{Lsn, SegmentNo, TimelineId, WalFileName, WalSegSize};

use crate::retention::Retention;
use crate::{sealed, walcheck};

pub const STATE_FILE: &str = "state";
pub const LOCK_FILE: &str = "LOCK";
pub const PARTIAL_SUFFIX: &str = ".partial";
pub const SEALED_SUFFIX: &str = ".zst";

const STATE_MAGIC: [u8; 8] = *b"WSSTATE\0";
const STATE_VERSION: u32 = 1;
/// The state file is one 512-byte sector, rewritten in place, like PostgreSQL's pg_control:
/// a single-sector write cannot be torn, so one fdatasync per flush suffices (a temp file,
/// rename and directory fsync per flush tripled the cost of every acknowledgement).
pub const STATE_LEN: usize = 512;
/// Bytes of the state record that carry data; the rest of the sector is zero.
const STATE_RECORD_LEN: usize = 64;

/// Errors of the store. All are fatal for a follower: the store, not the network, is wrong.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the WAL store {dir} is in use by another wal-receiver (lock {dir}/LOCK is held)")]
    Locked { dir: PathBuf },
    #[error("the WAL store's state file {path} is corrupt ({why}); refusing to trust it. Restore it from a backup or start a new store with 'wal-receiver bootstrap'")]
    CorruptState { path: PathBuf, why: String },
    #[error("the WAL store {dir} is inconsistent: {why}")]
    Inconsistent { dir: PathBuf, why: String },
    #[error("cannot use {} as a WAL store: {what}: {error}. Give a --wal-dir that the user running wal-receiver can create and write", dir.display())]
    Unusable {
        dir: PathBuf,
        what: &'static str,
        error: std::io::Error,
    },
    #[error("sealing a segment failed: {0}")]
    Seal(String),
    #[error(transparent)]
    Durable(#[from] DurableError),
}

/// What `state` records. Layout (little-endian; the file is 512 bytes, zero after byte 64):
/// ```text
///  0  8  magic "WSSTATE\0"
///  8  4  version (1)
/// 12  4  timeline
/// 16  8  system identifier
/// 24  4  WAL segment size in bytes
/// 28  4  PostgreSQL major version of the primary (0 in stores made before it was kept)
/// 32  8  flush LSN: every byte below it is fsynced in this store
/// 40  8  WAL bytes received (raw)
/// 48  8  bytes those took on the wire (frames, compressed)
/// 56  4  CRC-32C of bytes 0..56
/// 60  4  zero
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreState {
    pub system_id: u64,
    pub timeline: TimelineId,
    pub seg_size: WalSegSize,
    /// PostgreSQL major version of the primary (15); 0 in stores made before it was kept.
    pub pg_version: u32,
    pub flush_lsn: Lsn,
    pub raw_bytes: u64,
    pub wire_bytes: u64,
}

impl StoreState {
    /// What segment `segno` of this store must hold, for the record walker.
    pub fn segment_expect(&self, segno: SegmentNo) -> walcheck::Expect {
        walcheck::Expect {
            start: self.seg_size.segment_start(segno),
            seg_size: self.seg_size.bytes(),
            system_id: self.system_id,
            timeline: self.timeline,
            pg_major: self.pg_version,
        }
    }

    pub fn encode(&self) -> [u8; STATE_LEN] {
        let mut b = [0u8; STATE_LEN];
        b[0..8].copy_from_slice(&STATE_MAGIC);
        b[8..12].copy_from_slice(&STATE_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.timeline.0.to_le_bytes());
        b[16..24].copy_from_slice(&self.system_id.to_le_bytes());
        b[24..28].copy_from_slice(&(self.seg_size.bytes() as u32).to_le_bytes());
        b[28..32].copy_from_slice(&self.pg_version.to_le_bytes());
        b[32..40].copy_from_slice(&self.flush_lsn.0.to_le_bytes());
        b[40..48].copy_from_slice(&self.raw_bytes.to_le_bytes());
        b[48..56].copy_from_slice(&self.wire_bytes.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..56]);
        b[56..60].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<StoreState, String> {
        if b.len() != STATE_LEN {
            return Err(format!("{} bytes instead of {STATE_LEN}", b.len()));
        }
        if b[0..8] != STATE_MAGIC {
            return Err("bad magic".into());
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let crc = crc32c::crc32c(&b[0..56]);
        if b[STATE_RECORD_LEN - 4..].iter().any(|&x| x != 0) {
            return Err("non-zero bytes after the record".into());
        }
        if crc != u32_at(56) {
            return Err(format!(
                "checksum mismatch (computed {crc:08x}, stored {:08x})",
                u32_at(56)
            ));
        }
        if u32_at(8) != STATE_VERSION {
            return Err(format!("unknown version {}", u32_at(8)));
        }
        let seg_size = WalSegSize::new(u32_at(24) as u64)
            .ok_or_else(|| format!("invalid segment size {}", u32_at(24)))?;
        let timeline = u32_at(12);
        if timeline == 0 {
            return Err("timeline 0".into());
        }
        Ok(StoreState {
            system_id: u64_at(16),
            timeline: TimelineId(timeline),
            seg_size,
            pg_version: u32_at(28),
            flush_lsn: Lsn(u64_at(32)),
            raw_bytes: u64_at(40),
            wire_bytes: u64_at(48),
        })
    }
}

/// Reads `state` as a reader should see it, without taking the lock (for readers such as
/// restore-wal, restore and status). `Ok(None)` means the store has never been initialised.
///
/// After the machine restarted, until a writer has opened the store again, the flush
/// position includes the whole, valid records past the recorded one, which the writer's
/// next start-up takes up: `state` on disk may lag behind fsynced, acknowledged WAL (see
/// the module comment), and a restore run before `follow` starts again must still find
/// that WAL. Without a restart the recorded `state`, read through the page cache, is
/// current, and bytes past it may be WAL a writer wrote but never synced: they are not
/// counted.
pub fn read_state(dir: &Path) -> Result<Option<StoreState>, StoreError> {
    read_recorded_state(dir)?
        .map(|state| with_wal_past(dir, state))
        .transpose()
}

/// `state`, read as recorded, as [`read_state`] gives it.
pub fn with_wal_past(dir: &Path, mut state: StoreState) -> Result<StoreState, StoreError> {
    if walcheck::knows(state.pg_version)
        && restarted_since_writer(dir)
        && lock_holder(dir) == Some(false)
    {
        if let Some(end) = wal_end_past(&flush_segment_path(dir, &state), &state)? {
            // A writer that started meanwhile may have written WAL it has not synced yet.
            if lock_holder(dir) != Some(false) {
                return Ok(read_recorded_state(dir)?.unwrap_or(state));
            }
            state.flush_lsn = end;
        }
    }
    Ok(state)
}

/// This boot of the machine, as Linux names it; `None` where it cannot be read.
pub fn boot_id() -> Option<String> {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_owned())
}

/// Whether the machine may have restarted since a writer last opened the store: `LOCK`
/// holds the boot id of the last writer. Only across a restart can `state` on disk lag
/// behind the WAL its writer synced; within one boot, the page cache holds every rewrite.
/// Where the boot id cannot be read, a restart is assumed.
fn restarted_since_writer(dir: &Path) -> bool {
    let mut recorded = String::new();
    let read = File::open(dir.join(LOCK_FILE)).and_then(|f| {
        std::io::Read::read_to_string(&mut std::io::Read::take(f, 64), &mut recorded)
    });
    match (boot_id(), read) {
        (Some(now), Ok(_)) => recorded.trim() != now,
        _ => true,
    }
}

/// Opens `path` (creating it) and takes an exclusive `flock` on it without waiting.
/// `Ok(None)` when another open file holds a lock on it.
pub fn try_lock_exclusive(path: &Path) -> Result<Option<Flock<File>>, DurableError> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(crate::access::file_mode())
        .open(path)
        .map_err(|e| DurableError::io("open", path, e))?;
    Ok(Flock::lock(file, FlockArg::LockExclusiveNonblock).ok())
}

/// Whether a writer holds the store's lock: `None` when that cannot be known (`LOCK` exists
/// but cannot be opened). A missing `LOCK` means no writer.
fn lock_holder(dir: &Path) -> Option<bool> {
    match File::open(dir.join(LOCK_FILE)) {
        Ok(f) => Some(Flock::lock(f, FlockArg::LockSharedNonblock).is_err()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(false),
        Err(_) => None,
    }
}

/// The `.partial` of the segment that holds `state.flush_lsn`.
fn flush_segment_path(dir: &Path, state: &StoreState) -> PathBuf {
    segment_path(
        dir,
        state,
        state.seg_size.segment_of(state.flush_lsn),
        PARTIAL_SUFFIX,
    )
}

/// The end of the whole, valid WAL records past `state.flush_lsn` in `path`, the segment
/// that holds it, if there are any. None for WAL of a PostgreSQL version the walker does not
/// read: such a store syncs `state` on every flush, so nothing lies past it.
fn wal_end_past(path: &Path, state: &StoreState) -> Result<Option<Lsn>, StoreError> {
    if !walcheck::knows(state.pg_version) {
        return Ok(None);
    }
    let segno = state.seg_size.segment_of(state.flush_lsn);
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(DurableError::io("open", path, e).into()),
    };
    let end = walcheck::valid_end(&file, state.segment_expect(segno))
        .map_err(|e| DurableError::io("read", path, e))?;
    Ok(end.filter(|&end| end > state.flush_lsn))
}

/// Reads `state` as recorded, without taking the lock. `Ok(None)` means the store has
/// never been initialised.
pub fn read_recorded_state(dir: &Path) -> Result<Option<StoreState>, StoreError> {
    let path = dir.join(STATE_FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(DurableError::io("read", &path, e).into()),
    };
    StoreState::decode(&bytes)
        .map(Some)
        .map_err(|why| StoreError::CorruptState { path, why })
}

/// Whether a writer (`follow`) holds the store's lock right now.
pub fn writer_running(dir: &Path) -> bool {
    lock_holder(dir) == Some(true)
}

/// The nice value of the sealer thread.
const SEALER_NICE: i32 = 10;

/// Runs the calling thread (the sealer) at a low CPU priority. Sealing is background
/// work with no one waiting on it, while on the same cores PostgreSQL's backends, the
/// stream and the standby wait on every wake-up; at nice 10 the scheduler lets them preempt
/// the sealer's compression. Failure only costs that, so it is logged, not fatal.
fn lower_sealer_priority() {
    let tid = nix::unistd::gettid().as_raw();
    // SAFETY: setpriority takes plain integers and touches no memory of this process; on
    // Linux, PRIO_PROCESS with a thread id changes the nice value of that thread only.
    let rc = unsafe {
        nix::libc::setpriority(nix::libc::PRIO_PROCESS, tid as nix::libc::id_t, SEALER_NICE)
    };
    if rc != 0 {
        tracing::debug!(
            "could not lower the sealer's priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The file of segment `segno` of the store's timeline, with `suffix` (`.partial`, `.zst`).
pub fn segment_path(dir: &Path, state: &StoreState, segno: SegmentNo, suffix: &str) -> PathBuf {
    timeline_segment_path(dir, state.timeline, state.seg_size, segno, suffix)
}

/// The file of segment `segno` of `timeline` in the store in `dir`, with `suffix`.
pub fn timeline_segment_path(
    dir: &Path,
    timeline: TimelineId,
    seg_size: WalSegSize,
    segno: SegmentNo,
    suffix: &str,
) -> PathBuf {
    let name = WalFileName::Segment { timeline, segno }.to_name(seg_size);
    dir.join(format!("{name}{suffix}"))
}

/// How a reader of a store (`status`, `restore-wal`) ends on a store error: exit 5 for a
/// corrupt or inconsistent store, as `follow` would; any other error (a file it cannot
/// read) is a plain error, exit 1, since a reader writes nothing to the disk.
pub fn reader_error(e: StoreError) -> anyhow::Error {
    match e {
        StoreError::CorruptState { .. } | StoreError::Inconsistent { .. } => crate::Fatal {
            code: crate::exit::STORE_CORRUPT,
            message: e.to_string(),
        }
        .into(),
        e => e.into(),
    }
}

/// An error from setting up the store's directory: [`StoreError::Unusable`] when it comes
/// from how the directory was given (a file in its path, no permission, a read-only file
/// system, a name too long), which the operator must fix; a disk error otherwise.
fn unusable_or_io(dir: &Path, what: &'static str, error: std::io::Error) -> StoreError {
    use nix::libc::{EACCES, EEXIST, EISDIR, ELOOP, ENAMETOOLONG, ENOTDIR, EPERM, EROFS};
    match error.raw_os_error() {
        Some(EACCES | EPERM | EROFS | ENOTDIR | EEXIST | EISDIR | ELOOP | ENAMETOOLONG) => {
            StoreError::Unusable {
                dir: dir.to_owned(),
                what,
                error,
            }
        }
        _ => DurableError::io(what, dir, error).into(),
    }
}

/// A file of a store's directory that holds WAL, known by its name. The one parser of the
/// names found in a store: every reader of the directory calls it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreFile {
    /// `<segment>.zst`: a sealed segment (see [`crate::sealed`]).
    Sealed {
        timeline: TimelineId,
        segno: SegmentNo,
    },
    /// `<segment>.partial`: a segment being written, or complete and not yet sealed.
    Partial {
        timeline: TimelineId,
        segno: SegmentNo,
    },
    /// `<timeline>.history`: a timeline history file.
    History(TimelineId),
}

impl StoreFile {
    /// What `name` names in a store whose segments are `seg_size` bytes. `None` for any
    /// other name: `state`, `LOCK`, temporary files, and anything unknown (which may be any
    /// string: only ASCII names are ever accepted).
    pub fn parse(name: &str, seg_size: WalSegSize) -> Option<StoreFile> {
        let segment = |base: &str| match WalFileName::parse(base, seg_size)? {
            WalFileName::Segment { timeline, segno } => Some((timeline, segno)),
            WalFileName::History(_) => None,
        };
        if let Some(base) = name.strip_suffix(SEALED_SUFFIX) {
            let (timeline, segno) = segment(base)?;
            Some(StoreFile::Sealed { timeline, segno })
        } else if let Some(base) = name.strip_suffix(PARTIAL_SUFFIX) {
            let (timeline, segno) = segment(base)?;
            Some(StoreFile::Partial { timeline, segno })
        } else {
            match WalFileName::parse(name, seg_size)? {
                WalFileName::History(t) => Some(StoreFile::History(t)),
                WalFileName::Segment { .. } => None,
            }
        }
    }
}

/// Work for the sealer thread.
enum SealJob {
    Seal(StoreState, SegmentNo),
    /// Apply the retention limit now (it also runs after each seal once set).
    Retain(StoreState),
    /// Answered once every job queued before it is done.
    Barrier(mpsc::Sender<()>),
}

struct OpenSegment {
    segno: SegmentNo,
    file: File,
    path: PathBuf,
}

/// The writer's handle on a store. Holds the lock for as long as it lives.
pub struct Store {
    dir: PathBuf,
    /// Taken before anything else; stored once the store is recovered.
    _lock: Option<Flock<File>>,
    state: Option<StoreState>,
    /// `state`, open for in-place rewrites once the store is initialised.
    state_file: Option<File>,
    /// The flush position of the last fdatasynced `state`.
    durable_flush: Lsn,
    write_lsn: Lsn,
    current: Option<OpenSegment>,
    /// Complete segments written since the last flush, to fdatasync and then seal.
    completed: Vec<OpenSegment>,
    dir_dirty: bool,
    pending_raw: u64,
    pending_wire: u64,
    seal_tx: Option<mpsc::Sender<SealJob>>,
    seal_thread: Option<std::thread::JoinHandle<()>>,
    seal_error: Arc<Mutex<Option<String>>>,
    /// What the sealer removes after each seal (see [`crate::retention`]); `None` keeps all.
    retention: Arc<Mutex<Option<Retention>>>,
}

impl Store {
    /// Opens (creating if needed) the store in `dir`, takes its lock, checks its state and
    /// queues any complete segment that is not yet sealed.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        // Private as PostgreSQL's data directory (the umask makes its files so, too).
        fs::DirBuilder::new()
            .recursive(true)
            .mode(crate::access::dir_mode())
            .create(dir)
            .map_err(|e| unusable_or_io(dir, "create the directory", e))?;
        let lock_path = dir.join(LOCK_FILE);
        // A reader (status, restore-wal) may hold a shared lock for a moment: wait a little
        // before calling the store taken.
        let mut tries = 0;
        let lock = loop {
            match try_lock_exclusive(&lock_path).map_err(|e| match e {
                DurableError::Io { source, .. } => {
                    unusable_or_io(dir, "open its LOCK file", source)
                }
                e => e.into(),
            })? {
                Some(lock) => break lock,
                None if tries < 50 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                None => {
                    return Err(StoreError::Locked {
                        dir: dir.to_owned(),
                    })
                }
            }
        };
        let restarted = restarted_since_writer(dir);
        let state = read_recorded_state(dir)?;
        let seal_error = Arc::new(Mutex::new(None));
        let (seal_tx, seal_rx) = mpsc::channel::<SealJob>();
        let seal_dir = dir.to_owned();
        let seal_err = seal_error.clone();
        let retention: Arc<Mutex<Option<Retention>>> = Arc::new(Mutex::new(None));
        let seal_retention = retention.clone();
        let seal_thread = std::thread::Builder::new()
            .name("sealer".into())
            .spawn(move || {
                lower_sealer_priority();
                for job in seal_rx {
                    let state = match job {
                        SealJob::Seal(state, segno) => {
                            if let Err(e) = sealed::seal_segment(&seal_dir, &state, segno) {
                                tracing::error!("{e:#}");
                                *seal_err.lock().unwrap_or_else(|p| p.into_inner()) =
                                    Some(format!("{e:#}"));
                                return;
                            }
                            state
                        }
                        SealJob::Retain(state) => state,
                        SealJob::Barrier(done) => {
                            let _ = done.send(());
                            continue;
                        }
                    };
                    let policy = seal_retention
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone();
                    if let Some(r) = policy {
                        // A failed fsync of the directory is fatal, as for sealing.
                        if let Err(e) = r.apply(&seal_dir, state.seg_size) {
                            tracing::error!("{e:#}");
                            *seal_err.lock().unwrap_or_else(|p| p.into_inner()) =
                                Some(format!("{e:#}"));
                            return;
                        }
                    }
                }
            })
            .map_err(|e| DurableError::io("start sealer thread for", dir, e))?;
        let flush_lsn = state.as_ref().map(|s| s.flush_lsn).unwrap_or_default();
        let mut store = Store {
            dir: dir.to_owned(),
            _lock: None,
            write_lsn: flush_lsn,
            state_file: None,
            durable_flush: flush_lsn,
            state,
            current: None,
            completed: Vec::new(),
            dir_dirty: false,
            pending_raw: 0,
            pending_wire: 0,
            seal_tx: Some(seal_tx),
            seal_thread: Some(seal_thread),
            seal_error,
            retention,
        };
        if let Some(state) = store.state.clone() {
            store.open_state_file()?;
            // What was read may be a rewrite a crash kept from the disk: make it durable
            // before anything (sealing, say) relies on it.
            store.persist_state(&state, true)?;
        }
        store.recover(restarted)?;
        // From now on `state` in the page cache is current for this boot.
        if let Some(id) = boot_id() {
            lock.set_len(0)
                .and_then(|()| lock.write_all_at(id.as_bytes(), 0))
                .map_err(|e| DurableError::io("write", &lock_path, e))?;
        }
        store._lock = Some(lock);
        Ok(store)
    }

    /// Removes leftovers of interrupted writes and queues complete unsealed segments. After
    /// a restart of the machine (`restarted`), also takes up fsynced WAL past `state`.
    fn recover(&mut self, restarted: bool) -> Result<(), StoreError> {
        let entries =
            fs::read_dir(&self.dir).map_err(|e| DurableError::io("list", &self.dir, e))?;
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| DurableError::io("list", &self.dir, e))?;
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
        for name in &names {
            if name.ends_with(".tmp") {
                durable::remove_durable(&self.dir.join(name))?;
            }
        }
        let Some(state) = self.state.clone() else {
            if names
                .iter()
                .any(|n| n.ends_with(PARTIAL_SUFFIX) || n.ends_with(SEALED_SUFFIX))
            {
                return Err(StoreError::Inconsistent {
                    dir: self.dir.clone(),
                    why: "it holds WAL segments but no state file; refusing to guess its position"
                        .into(),
                });
            }
            return Ok(());
        };
        let partial = flush_segment_path(&self.dir, &state);
        if state.flush_lsn.segment_offset(state.seg_size) != 0 && !partial.exists() {
            return Err(StoreError::Inconsistent {
                dir: self.dir.clone(),
                why: format!(
                    "state says WAL is stored up to {}, but the segment holding it ({}) is missing",
                    state.flush_lsn,
                    partial.display()
                ),
            });
        }
        let state = if restarted {
            self.recover_flushed_wal(state, &partial)?
        } else {
            state
        };
        let flush_seg = state.seg_size.segment_of(state.flush_lsn);
        let mut to_seal = Vec::new();
        for name in &names {
            if let Some(StoreFile::Partial { timeline, segno }) =
                StoreFile::parse(name, state.seg_size)
            {
                if timeline == state.timeline && segno < flush_seg {
                    to_seal.push(segno);
                }
            }
        }
        to_seal.sort();
        for segno in to_seal {
            self.queue_seal(segno)?;
        }
        Ok(())
    }

    /// Takes up the WAL past `state.flush_lsn` that a crash left unrecorded: `state` may
    /// lag behind fsynced (and acknowledged) WAL, but only inside one segment, the one that
    /// holds its position. Every whole, valid record there counts; the new position is
    /// recorded and fdatasynced before anything is acknowledged.
    fn recover_flushed_wal(
        &mut self,
        mut state: StoreState,
        path: &Path,
    ) -> Result<StoreState, StoreError> {
        let Some(end) = wal_end_past(path, &state)? else {
            return Ok(state);
        };
        tracing::info!(
            recorded = %state.flush_lsn,
            recovered = %end,
            "took up whole, valid WAL records past the recorded flush position (left by a crash)"
        );
        // The bytes may still be only in the page cache: make them durable before recording
        // them.
        let file = File::open(path).map_err(|e| DurableError::io("open", path, e))?;
        durable::fdatasync_file(&file, path)?;
        state.flush_lsn = end;
        self.persist_state(&state, true)?;
        self.state = Some(state.clone());
        self.write_lsn = end;
        Ok(state)
    }

    fn open_state_file(&mut self) -> Result<(), StoreError> {
        let path = self.dir.join(STATE_FILE);
        let f = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| DurableError::io("open", &path, e))?;
        self.state_file = Some(f);
        Ok(())
    }

    /// Rewrites `state` in place, and fdatasyncs it if `sync`.
    fn persist_state(&mut self, state: &StoreState, sync: bool) -> Result<(), StoreError> {
        let path = self.dir.join(STATE_FILE);
        let f = self
            .state_file
            .as_ref()
            .expect("state file open once initialised");
        f.write_all_at(&state.encode(), 0)
            .map_err(|e| DurableError::io("write", &path, e))?;
        if sync {
            durable::fdatasync_file(f, &path)?;
            self.durable_flush = state.flush_lsn;
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn state(&self) -> Option<&StoreState> {
        self.state.as_ref()
    }

    /// Every byte below this is fsynced and recorded.
    pub fn flush_lsn(&self) -> Lsn {
        self.state.as_ref().map(|s| s.flush_lsn).unwrap_or_default()
    }

    /// Every byte below this is written (not necessarily fsynced).
    pub fn write_lsn(&self) -> Lsn {
        self.write_lsn
    }

    /// Initialises an empty store at `start_lsn` (a segment start) and persists that.
    pub fn init(
        &mut self,
        system_id: u64,
        timeline: TimelineId,
        seg_size: WalSegSize,
        pg_version: u32,
        start_lsn: Lsn,
    ) -> Result<(), StoreError> {
        assert!(self.state.is_none(), "init on an initialised store");
        let state = StoreState {
            system_id,
            timeline,
            seg_size,
            pg_version,
            flush_lsn: start_lsn,
            raw_bytes: 0,
            wire_bytes: 0,
        };
        // Created whole under a temporary name, so the file never exists half-written.
        durable::write_atomic(&self.dir.join(STATE_FILE), &state.encode())?;
        self.open_state_file()?;
        self.write_lsn = start_lsn;
        self.durable_flush = start_lsn;
        self.state = Some(state);
        Ok(())
    }

    /// Writes WAL that continues exactly at `write_lsn`. `wire_bytes` is what it cost on the
    /// wire. Nothing is durable until [`Store::flush`].
    pub fn write(
        &mut self,
        start_lsn: Lsn,
        data: &[u8],
        wire_bytes: u64,
    ) -> Result<(), StoreError> {
        let state = self.state.clone().expect("write to an initialised store");
        if start_lsn != self.write_lsn {
            return Err(StoreError::Inconsistent {
                dir: self.dir.clone(),
                why: format!(
                    "WAL at {start_lsn} does not continue the store, which ends at {}",
                    self.write_lsn
                ),
            });
        }
        let seg = state.seg_size.bytes();
        let mut pos = start_lsn;
        let mut rest = data;
        while !rest.is_empty() {
            let segno = state.seg_size.segment_of(pos);
            let offset = pos.segment_offset(state.seg_size);
            let n = rest.len().min((seg - offset) as usize);
            if self.current.as_ref().map(|c| c.segno) != Some(segno) {
                self.open_segment(&state, segno)?;
            }
            let cur = self.current.as_ref().expect("segment just opened");
            cur.file
                .write_all_at(&rest[..n], offset)
                .map_err(|e| DurableError::io("write", &cur.path, e))?;
            rest = &rest[n..];
            pos = Lsn(pos.0 + n as u64);
            if offset + n as u64 == seg {
                let done = self.current.take().expect("segment open");
                self.completed.push(done);
            }
        }
        self.write_lsn = pos;
        self.pending_raw += data.len() as u64;
        self.pending_wire += wire_bytes;
        Ok(())
    }

    fn open_segment(&mut self, state: &StoreState, segno: SegmentNo) -> Result<(), StoreError> {
        if let Some(prev) = self.current.take() {
            // A segment left before its end cannot happen with contiguous writes; keep it
            // for the next fdatasync all the same.
            self.completed.push(prev);
        }
        let path = segment_path(&self.dir, state, segno, PARTIAL_SUFFIX);
        let existed = path.exists();
        // Whoever created the file (this writer, or the sealer recycling an old segment a
        // moment ago), its directory entry must be durable before WAL in it is acknowledged.
        self.dir_dirty = true;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(crate::access::file_mode())
            .open(&path)
            .map_err(|e| DurableError::io("open segment", &path, e))?;
        if !existed {
            nix::fcntl::posix_fallocate(
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
                state.seg_size.bytes() as i64,
            )
            .map_err(|e| DurableError::io("preallocate segment", &path, e.into()))?;
        }
        self.current = Some(OpenSegment { segno, file, path });
        Ok(())
    }

    /// Makes everything written durable and records it; returns the new flush position.
    /// Complete segments are then handed to the sealer.
    pub fn flush(&mut self) -> Result<Lsn, StoreError> {
        self.flush_notify(|_| {})
    }

    /// [`Store::flush`], calling `synced` with the new position as soon as the WAL bytes
    /// are fdatasynced, before `state` records it. A standby may be sent WAL from then on:
    /// the bytes are durable, and after a crash before `state` is written the stream
    /// resumes at the older position and writes the same bytes again.
    pub fn flush_notify(&mut self, synced: impl FnOnce(Lsn)) -> Result<Lsn, StoreError> {
        if let Some(e) = self.seal_failure() {
            return Err(StoreError::Seal(e));
        }
        let Some(mut state) = self.state.clone() else {
            return Ok(Lsn::INVALID);
        };
        if self.write_lsn == state.flush_lsn && self.pending_wire == 0 {
            return Ok(state.flush_lsn);
        }
        for seg in self.completed.iter().chain(self.current.iter()) {
            durable::fdatasync_file(&seg.file, &seg.path)?;
        }
        if self.dir_dirty {
            durable::fsync_dir(&self.dir)?;
            self.dir_dirty = false;
        }
        synced(self.write_lsn);
        state.flush_lsn = self.write_lsn;
        state.raw_bytes += self.pending_raw;
        state.wire_bytes += self.pending_wire;
        // Synced when the position leaves the segment of the last synced one: recovery
        // walks only that segment, and a segment is sealed only once `state` is past it.
        // The walker knows the WAL of PostgreSQL 15 to 18 only; with another (or unrecorded)
        // version `state` is synced on every flush.
        let sync = !walcheck::knows(state.pg_version)
            || state.seg_size.segment_of(state.flush_lsn)
                != state.seg_size.segment_of(self.durable_flush);
        self.persist_state(&state, sync)?;
        self.state = Some(state);
        self.pending_raw = 0;
        self.pending_wire = 0;
        for seg in std::mem::take(&mut self.completed) {
            self.queue_seal(seg.segno)?;
        }
        Ok(self.flush_lsn())
    }

    fn queue_seal(&mut self, segno: SegmentNo) -> Result<(), StoreError> {
        let state = self.state.clone().expect("initialised");
        let tx = self.seal_tx.as_ref().expect("sealer running");
        tx.send(SealJob::Seal(state, segno))
            .map_err(|_| self.sealer_stopped())
    }

    /// Sets what the sealer removes after each seal, and applies it once now.
    pub fn set_retention(&mut self, retention: Retention) -> Result<(), StoreError> {
        *self.retention.lock().unwrap_or_else(|p| p.into_inner()) = Some(retention);
        let Some(state) = self.state.clone() else {
            return Ok(());
        };
        let tx = self.seal_tx.as_ref().expect("sealer running");
        tx.send(SealJob::Retain(state))
            .map_err(|_| self.sealer_stopped())
    }

    /// What made the sealer stop, if it failed.
    fn seal_failure(&self) -> Option<String> {
        self.seal_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The error for a sealer that no longer takes work.
    fn sealer_stopped(&self) -> StoreError {
        StoreError::Seal(
            self.seal_failure()
                .unwrap_or_else(|| "sealer thread stopped".into()),
        )
    }

    /// Waits until every segment queued so far is sealed.
    fn wait_sealed(&mut self) -> Result<(), StoreError> {
        let (done_tx, done_rx) = mpsc::channel();
        let sent = self
            .seal_tx
            .as_ref()
            .is_some_and(|tx| tx.send(SealJob::Barrier(done_tx)).is_ok());
        if !sent || done_rx.recv().is_err() {
            return Err(self.sealer_stopped());
        }
        Ok(())
    }

    /// Stores timeline `tli`'s history file durably. An existing file must have the same
    /// content: a history file is never overwritten with another.
    pub fn save_history(&mut self, tli: TimelineId, content: &[u8]) -> Result<(), StoreError> {
        let name = WalFileName::History(tli).to_name(
            self.state
                .as_ref()
                .map(|s| s.seg_size)
                .unwrap_or(WalSegSize::DEFAULT),
        );
        let path = self.dir.join(&name);
        match walship_common::timeline::read_history_file(&path) {
            Ok(existing) if existing == content => return Ok(()),
            Ok(_) => {
                return Err(StoreError::Inconsistent {
                    dir: self.dir.clone(),
                    why: format!(
                        "it holds a history file {name} with other content than the sender's; refusing to overwrite it (the two servers have different histories)"
                    ),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(DurableError::io("read", &path, e).into()),
        }
        durable::write_atomic(&path, content)?;
        Ok(())
    }

    /// Ends the store's timeline at `switch_lsn`, where timeline `next` begins; the store
    /// must hold exactly the WAL up to `switch_lsn`, flushed, and `next`'s history file
    /// must be saved already. The old timeline's last segment stays as its `.partial`, as
    /// PostgreSQL keeps it; the part of that segment before the switch point is copied
    /// into `next`'s segment, as PostgreSQL does when it starts a timeline.
    pub fn switch_timeline(&mut self, next: TimelineId, switch_lsn: Lsn) -> Result<(), StoreError> {
        let mut state = self.state.clone().expect("switch on an initialised store");
        if next.0 <= state.timeline.0
            || self.write_lsn != switch_lsn
            || state.flush_lsn != switch_lsn
        {
            return Err(StoreError::Inconsistent {
                dir: self.dir.clone(),
                why: format!(
                    "cannot switch from timeline {} at {} (written to {}) to timeline {} at {switch_lsn}",
                    state.timeline.0, state.flush_lsn, self.write_lsn, next.0
                ),
            });
        }
        let history = self
            .dir
            .join(WalFileName::History(next).to_name(state.seg_size));
        if !history.exists() {
            return Err(StoreError::Inconsistent {
                dir: self.dir.clone(),
                why: format!("the history file of timeline {} is missing", next.0),
            });
        }
        // Every complete segment of the old timeline is sealed before the new one starts,
        // so the sealer never recycles a file into an old-timeline name.
        self.wait_sealed()?;
        self.current = None;
        let offset = switch_lsn.segment_offset(state.seg_size);
        let segno = state.seg_size.segment_of(switch_lsn);
        if offset != 0 {
            let old = segment_path(&self.dir, &state, segno, PARTIAL_SUFFIX);
            let src = File::open(&old).map_err(|e| DurableError::io("open", &old, e))?;
            let new_state = StoreState {
                timeline: next,
                ..state.clone()
            };
            self.open_segment(&new_state, segno)?;
            let cur = self.current.as_ref().expect("segment just opened");
            // A MiB at a time: segments may be up to 1 GiB.
            let mut buf = vec![0u8; (1 << 20).min(offset as usize)];
            let mut at = 0u64;
            while at < offset {
                let n = buf.len().min((offset - at) as usize);
                src.read_exact_at(&mut buf[..n], at)
                    .map_err(|e| DurableError::io("read", &old, e))?;
                cur.file
                    .write_all_at(&buf[..n], at)
                    .map_err(|e| DurableError::io("write", &cur.path, e))?;
                at += n as u64;
            }
            durable::fdatasync_file(&cur.file, &cur.path)?;
        }
        durable::fsync_dir(&self.dir)?;
        self.dir_dirty = false;
        state.timeline = next;
        self.persist_state(&state, true)?;
        self.state = Some(state);
        Ok(())
    }

    /// Records the flush position durably and waits for queued segments to be sealed (used
    /// at shutdown and by tests).
    pub fn close(mut self) -> Result<(), StoreError> {
        if let Some(state) = self.state.clone() {
            if state.flush_lsn != self.durable_flush {
                self.persist_state(&state, true)?;
            }
        }
        self.seal_tx.take();
        if let Some(t) = self.seal_thread.take() {
            let _ = t.join();
        }
        match self.seal_failure() {
            Some(e) => Err(StoreError::Seal(e)),
            None => Ok(()),
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.seal_tx.take();
        if let Some(t) = self.seal_thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("walship-store-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn seg1m() -> WalSegSize {
        WalSegSize::new(1 << 20).unwrap()
    }

    #[test]
    fn state_round_trip_and_corruption() {
        let s = StoreState {
            system_id: 7712431528347405820,
            timeline: TimelineId(3),
            seg_size: seg1m(),
            pg_version: 15,
            flush_lsn: Lsn(0x23004A50),
            raw_bytes: 10,
            wire_bytes: 3,
        };
        let b = s.encode();
        assert_eq!(StoreState::decode(&b).unwrap(), s);
        for i in 0..STATE_LEN {
            let mut bad = b;
            bad[i] ^= 0x04;
            assert!(StoreState::decode(&bad).is_err(), "flip at {i} accepted");
        }
        assert!(StoreState::decode(&b[..STATE_LEN - 1]).is_err());
    }

    #[test]
    fn writes_flushes_seals_and_reopens() {
        let dir = tmpdir("cycle");
        let mut st = Store::open(&dir).unwrap();
        st.init(42, TimelineId(1), seg1m(), 15, Lsn(1 << 20))
            .unwrap();
        let data: Vec<u8> = (0..(1 << 20) + 5000).map(|i| (i % 251) as u8).collect();
        st.write(Lsn(1 << 20), &data[..1000], 100).unwrap();
        assert_eq!(st.flush_lsn(), Lsn(1 << 20));
        assert_eq!(st.flush().unwrap(), Lsn((1 << 20) + 1000));
        // Inside the segment `state` is rewritten, not synced; entering the next syncs it.
        assert_eq!(st.durable_flush, Lsn(1 << 20));
        st.write(Lsn((1 << 20) + 1000), &data[1000..], 100).unwrap();
        let flush = st.flush().unwrap();
        assert_eq!(flush, Lsn((1 << 20) + data.len() as u64));
        assert_eq!(st.durable_flush, flush);
        assert!(st.write(Lsn(5), b"x", 1).is_err(), "gap accepted");
        st.close().unwrap();
        let state = read_state(&dir).unwrap().unwrap();
        assert_eq!(state.flush_lsn, flush);
        assert!(segment_path(&dir, &state, SegmentNo(1), SEALED_SUFFIX).exists());
        assert!(!segment_path(&dir, &state, SegmentNo(1), PARTIAL_SUFFIX).exists());
        assert!(segment_path(&dir, &state, SegmentNo(2), PARTIAL_SUFFIX).exists());
        let mut out = Vec::new();
        sealed::read_sealed(
            &segment_path(&dir, &state, SegmentNo(1), SEALED_SUFFIX),
            seg1m().bytes(),
            &mut out,
        )
        .unwrap();
        assert_eq!(&out[..], &data[..1 << 20]);
        // Reopen: resumes at the persisted position.
        let st = Store::open(&dir).unwrap();
        assert_eq!(st.write_lsn(), flush);
        // A second writer is refused while the first holds the lock.
        assert!(matches!(Store::open(&dir), Err(StoreError::Locked { .. })));
        drop(st);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn timeline_switch_keeps_the_old_partial_and_copies_its_head() {
        let dir = tmpdir("switch");
        let mut st = Store::open(&dir).unwrap();
        st.init(42, TimelineId(1), seg1m(), 15, Lsn(1 << 20))
            .unwrap();
        let data: Vec<u8> = (0..(1 << 20) + 3000).map(|i| (i % 253) as u8).collect();
        st.write(Lsn(1 << 20), &data, 10).unwrap();
        let switch = st.flush().unwrap();
        // The history file first; then the switch.
        assert!(
            st.switch_timeline(TimelineId(2), switch).is_err(),
            "switched without history"
        );
        st.save_history(TimelineId(2), b"1\t0/200BB8\tr\n").unwrap();
        st.save_history(TimelineId(2), b"1\t0/200BB8\tr\n").unwrap();
        assert!(
            st.save_history(TimelineId(2), b"1\t0/200BB9\tr\n").is_err(),
            "history overwritten"
        );
        assert!(st
            .switch_timeline(TimelineId(2), Lsn(switch.0 - 1))
            .is_err());
        st.switch_timeline(TimelineId(2), switch).unwrap();
        assert_eq!(st.state().unwrap().timeline, TimelineId(2));
        assert_eq!(st.flush_lsn(), switch);
        st.write(switch, b"new timeline", 1).unwrap();
        st.flush().unwrap();
        st.close().unwrap();
        let name = |tl: u32| {
            dir.join(format!(
                "{}{PARTIAL_SUFFIX}",
                WalFileName::Segment {
                    timeline: TimelineId(tl),
                    segno: SegmentNo(2)
                }
                .to_name(seg1m())
            ))
        };
        let old = fs::read(name(1)).unwrap();
        let new = fs::read(name(2)).unwrap();
        assert_eq!(&old[..3000], &data[1 << 20..]);
        assert_eq!(&new[..3000], &data[1 << 20..]);
        assert_eq!(&new[3000..3012], b"new timeline");
        // Reopening leaves the old timeline's .partial alone.
        let st = Store::open(&dir).unwrap();
        assert_eq!(st.state().unwrap().timeline, TimelineId(2));
        drop(st);
        assert!(name(1).exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn timeline_switch_copies_a_head_of_several_chunks() {
        let dir = tmpdir("switchbig");
        let seg = WalSegSize::new(4 << 20).unwrap();
        let mut st = Store::open(&dir).unwrap();
        st.init(42, TimelineId(1), seg, 15, Lsn(4 << 20)).unwrap();
        // 2.5 MiB into the segment: the head is copied in three pieces.
        let data: Vec<u8> = (0..5u32 << 19).map(|i| (i % 251) as u8).collect();
        st.write(Lsn(4 << 20), &data, 10).unwrap();
        let switch = st.flush().unwrap();
        st.save_history(TimelineId(2), b"1\t0/680000\tr\n").unwrap();
        st.switch_timeline(TimelineId(2), switch).unwrap();
        st.close().unwrap();
        let new = WalFileName::Segment {
            timeline: TimelineId(2),
            segno: SegmentNo(1),
        }
        .to_name(seg);
        let new = fs::read(dir.join(format!("{new}{PARTIAL_SUFFIX}"))).unwrap();
        assert_eq!(&new[..data.len()], &data[..]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn wal_past_a_lagging_state_is_taken_up_and_the_position_never_moves_back() {
        use crate::walcheck::tests::WalBuilder;
        let dir = tmpdir("lag");
        let start = 1u64 << 20;
        let mut wal = WalBuilder::new(start, 1 << 20, 42, 0);
        for i in 0..30 {
            assert!(wal.record(&vec![i as u8; 3000 + i * 50], false));
        }
        let mut st = Store::open(&dir).unwrap();
        st.init(42, TimelineId(1), seg1m(), 15, Lsn(start)).unwrap();
        // Acknowledged in three flushes, the last in the middle of record 29.
        let cuts = [wal.ends[10], wal.ends[20] + 100, wal.ends[29] - 10];
        let mut at = 0;
        for cut in cuts {
            st.write(Lsn(start + at), &wal.bytes[at as usize..cut as usize], 1)
                .unwrap();
            st.flush().unwrap();
            at = cut;
        }
        let acked = st.flush_lsn();
        assert_eq!(acked, Lsn(start + cuts[2]));
        drop(st);
        let recorded = read_state(&dir).unwrap().unwrap();
        assert_eq!(recorded.flush_lsn, acked);
        // Reopened: the recorded position stands (it is not moved back to record 28's end).
        let st = Store::open(&dir).unwrap();
        assert_eq!(st.flush_lsn(), acked);
        drop(st);
        // A crash lost the in-place rewrites of `state` since the segment began.
        let lost = StoreState {
            flush_lsn: Lsn(start),
            ..recorded.clone()
        };
        fs::write(dir.join(STATE_FILE), lost.encode()).unwrap();
        // Within the same boot nothing is taken up: bytes past `state` may never have been
        // synced (a writer killed, or stopped by a failed fsync, before its flush).
        assert_eq!(read_state(&dir).unwrap().unwrap(), lost);
        let st = Store::open(&dir).unwrap();
        assert_eq!(st.flush_lsn(), Lsn(start));
        drop(st);
        // After a restart of the machine, it is.
        let restart = || fs::write(dir.join(LOCK_FILE), "a boot before this one").unwrap();
        restart();
        // Readers see the WAL before a writer starts again; the record stays as it is.
        assert_eq!(
            read_state(&dir).unwrap().unwrap().flush_lsn,
            wal.end_of(28).unwrap()
        );
        assert_eq!(read_recorded_state(&dir).unwrap().unwrap(), lost);
        let st = Store::open(&dir).unwrap();
        assert_eq!(st.flush_lsn(), wal.end_of(28).unwrap());
        assert_eq!(st.write_lsn(), st.flush_lsn());
        assert_eq!(read_state(&dir).unwrap().unwrap().flush_lsn, st.flush_lsn());
        drop(st);
        // A torn write inside record 25: only the records before it count.
        let lost = StoreState {
            flush_lsn: Lsn(start + wal.ends[3]),
            ..recorded
        };
        fs::write(dir.join(STATE_FILE), lost.encode()).unwrap();
        restart();
        let partial = segment_path(&dir, &lost, SegmentNo(1), PARTIAL_SUFFIX);
        let f = OpenOptions::new().write(true).open(&partial).unwrap();
        f.write_all_at(&[0u8; 64], wal.ends[24] + 200).unwrap();
        let st = Store::open(&dir).unwrap();
        assert_eq!(st.flush_lsn(), wal.end_of(24).unwrap());
        drop(st);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn corrupt_state_is_refused() {
        let dir = tmpdir("corrupt");
        let mut st = Store::open(&dir).unwrap();
        st.init(42, TimelineId(1), seg1m(), 15, Lsn(1 << 20))
            .unwrap();
        drop(st);
        let p = dir.join(STATE_FILE);
        let mut b = fs::read(&p).unwrap();
        b[33] ^= 1;
        fs::write(&p, &b).unwrap();
        assert!(matches!(
            Store::open(&dir),
            Err(StoreError::CorruptState { .. })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_directory_that_cannot_be_a_store_is_a_usage_error() {
        let dir = tmpdir("unusable");
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("a-file");
        fs::write(&file, b"").unwrap();
        // Under a file, and a file itself.
        for wal_dir in [file.join("wal"), file.clone()] {
            let e = Store::open(&wal_dir).err().expect("opened");
            assert!(matches!(e, StoreError::Unusable { .. }), "{e}");
            assert!(e.to_string().contains("--wal-dir"), "{e}");
            let e = crate::follow::store_fatal(e);
            let code = e.downcast_ref::<crate::Fatal>().map(|f| f.code);
            assert_eq!(code, Some(crate::exit::USAGE), "{e:#}");
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_the_names_of_a_stores_files_are_known() {
        let seg = seg1m();
        let (t1, t2) = (TimelineId(1), TimelineId(2));
        for (name, want) in [
            (
                "000000010000000000000003.zst",
                Some(StoreFile::Sealed {
                    timeline: t1,
                    segno: SegmentNo(3),
                }),
            ),
            (
                "0000000200000001000000FF.partial",
                Some(StoreFile::Partial {
                    timeline: t2,
                    // 4096 segments of 1 MiB per "xlogid".
                    segno: SegmentNo(0x10FF),
                }),
            ),
            ("00000002.history", Some(StoreFile::History(t2))),
            ("000000010000000000000003", None),
            ("00000002.history.zst", None),
            ("00000002.history.partial", None),
            ("000000010000000000000003.zst.tmp", None),
            ("state", None),
            (LOCK_FILE, None),
            ("standby.json", None),
            // 24 bytes with a multi-byte character across a field boundary.
            ("0000000\u{e9}000000000000023.partial", None),
            ("000000010000000\u{20ac}000023.zst", None),
            ("0000000100000000000000\u{e9}", None),
        ] {
            assert_eq!(StoreFile::parse(name, seg), want, "{name:?}");
        }
    }
}
