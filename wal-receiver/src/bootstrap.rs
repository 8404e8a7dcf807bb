//! `wal-receiver bootstrap`: a new standby from a live primary.
//!
//! 1. The target directory is created (mode 0700) holding a marker file, or an unfinished
//!    bootstrap in it is resumed. Any other non-empty directory is refused.
//! 2. On resume, every staged file is read and its chunk checksums are sent to the sender,
//!    which then sends `FileSame` instead of the bytes of each unchanged chunk.
//! 3. The snapshot arrives: directories, files in checksummed chunks, `pg_control` last
//!    (staged as `global/pg_control.walship-partial`), then the stop LSN and labels.
//! 4. Files the new snapshot does not contain are removed; every file and directory is
//!    fsynced.
//! 5. WAL from the start LSN through the stop LSN is stored in the WAL store, as `follow`
//!    stores it.
//! 6. Only then `backup_label`, `tablespace_map`, `standby.signal` and the recovery settings
//!    are written, `pg_control` is renamed into place and the marker removed.
//!
//! Invariant: until step 6 ends, the directory has no `global/pg_control`, so PostgreSQL
//! refuses to start from it.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tracing::{info, warn};
use walship_common::durable;
use walship_common::protocol::{
    chunk_sum, validate_name, Message, Mode, CHUNK_LEN, MAX_SUMS_PER_MESSAGE,
};
use walship_common::{Lsn, WalFileName};

use crate::follow::{self, check_same_cluster, sender_error, Connection, FollowConfig};
use crate::paths::{Target, UnsafePath};
use crate::pgconf::{self, ServerSettings};
use crate::store::read_state;
use crate::{exit, Fatal};

/// Present in the target while a bootstrap is unfinished.
pub const MARKER: &str = "walship-bootstrap.incomplete";
pub(crate) const PG_CONTROL: &str = "global/pg_control";
pub(crate) const PG_CONTROL_STAGED: &str = "global/pg_control.walship-partial";
/// The sender sends at least this often while copying; silence longer means a dead link.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// A failed snapshot attempt is resumed this many times before the bootstrap gives up.
const MAX_ATTEMPTS: u32 = 10;
const RETRY_BACKOFF_MIN: Duration = Duration::from_millis(500);
const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(15);
/// The retry interval written for the standby: how often it asks restore_command again.
const RETRY_INTERVAL: &str = "200ms";

pub struct BootstrapConfig {
    /// The senders to choose from, as for `follow`.
    pub senders: Vec<String>,
    pub name: String,
    pub pgdata: PathBuf,
    pub wal_dir: PathBuf,
    /// (location on the primary, location here)
    pub tablespace_mapping: Vec<(PathBuf, PathBuf)>,
    /// Where an unmapped tablespace goes (`<root>/<oid>`); `None`: its primary's location.
    pub tablespace_root: Option<PathBuf>,
    /// The wal-receiver binary restore_command runs.
    pub restore_bin: PathBuf,
    /// TLS to the sender; `None` is plaintext.
    pub tls: Option<follow::TlsClient>,
    /// Where `follow --serve-standby` will serve the standby: written as its
    /// `primary_conninfo`. `None` feeds it through `restore_command` only.
    pub serve: Option<crate::serve::ServeAddr>,
    /// Where the standby listens (port, socket directory, addresses): written into its
    /// `postgresql.auto.conf`. What is not given stays as the primary's configuration says.
    pub server: ServerSettings,
}

/// What the snapshot said about itself.
pub(crate) struct Snapshot {
    pub(crate) start_lsn: Lsn,
    pub(crate) stop_lsn: Lsn,
    pub(crate) timeline: u32,
    pub(crate) system_id: u64,
    pub(crate) backup_label: String,
    pub(crate) tablespace_map: String,
    /// oid -> directory here
    pub(crate) tablespaces: HashMap<u32, PathBuf>,
    pub(crate) received: HashSet<PathBuf>,
    pub(crate) bytes: u64,
    pub(crate) skipped: u64,
    pub(crate) wire: u64,
}

pub async fn bootstrap(cfg: BootstrapConfig) -> Result<()> {
    validate_name(&cfg.name).map_err(|m| Fatal {
        code: exit::USAGE,
        message: m,
    })?;
    check_server_settings(&cfg.server, cfg.serve.as_ref())?;
    let pgdata = std::path::absolute(&cfg.pgdata)?;
    let wal_dir = std::path::absolute(&cfg.wal_dir)?;
    let started = Instant::now();
    let snap = snapshot_with_wal(&cfg, &pgdata, &wal_dir).await?;
    let stream_from = cfg.serve.as_ref().map(|a| (a, cfg.name.as_str()));
    finish(
        &pgdata,
        &wal_dir,
        &snap,
        &cfg.restore_bin,
        stream_from,
        &cfg.server,
    )?;
    if let Some(left) = cfg.server.inherited() {
        info!("the standby keeps the primary's {left} (not given with --port, --socket-dir, --listen-addresses)");
    }
    info!(
        pgdata = %pgdata.display(), stop_lsn = %snap.stop_lsn, skipped_bytes = snap.skipped,
        seconds = started.elapsed().as_secs_f64(),
        "bootstrap complete: start the standby with pg_ctl, and keep 'wal-receiver follow' running on the same --wal-dir{}",
        match &cfg.serve {
            Some(a) => format!(" with --serve-standby: the standby streams from {a}"),
            None => String::new(),
        }
    );
    Ok(())
}

/// Takes the snapshot into `pgdata`, resuming failed attempts, and stores the WAL through
/// its stop position in `wal_dir`: everything a standby or a backup needs, except the
/// labels and recovery settings.
pub(crate) async fn snapshot_with_wal(
    cfg: &BootstrapConfig,
    pgdata: &Path,
    wal_dir: &Path,
) -> Result<Snapshot> {
    // A broken connection or a damaged frame costs only what was in flight: the attempt
    // is resumed like an interrupted bootstrap, skipping every file already staged.
    let mut backoff = RETRY_BACKOFF_MIN;
    let mut attempt = 1;
    let snap = loop {
        let resumed = check_target(pgdata)?;
        match snapshot(cfg, pgdata, wal_dir, resumed).await {
            Ok(snap) => break snap,
            Err(e) if e.downcast_ref::<Fatal>().is_some() => return Err(e),
            // A correct sender never sends an unsafe name: retrying cannot help.
            Err(e) if e.chain().any(|c| c.is::<UnsafePath>()) => {
                return Err(Fatal {
                    code: exit::PROTOCOL,
                    message: format!("{e:#}; nothing was written outside the target"),
                }
                .into())
            }
            Err(e) if attempt >= MAX_ATTEMPTS => {
                return Err(e.context(format!(
                    "snapshot failed {attempt} times; run the bootstrap again to resume"
                )))
            }
            Err(e) => {
                warn!("snapshot attempt {attempt} of {MAX_ATTEMPTS} failed: {e:#}; resuming in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
                attempt += 1;
            }
        }
    };
    info!(
        start_lsn = %snap.start_lsn, stop_lsn = %snap.stop_lsn, files = snap.received.len(),
        received_bytes = snap.bytes, skipped_bytes = snap.skipped, wire_bytes = snap.wire,
        "snapshot received; skipped {} bytes already staged and verified", snap.skipped
    );
    let (dir, ts, keep) = (
        pgdata.to_owned(),
        snap.tablespaces.clone(),
        snap.received.clone(),
    );
    tokio::task::spawn_blocking(move || remove_stale_and_sync(&dir, &ts, &keep)).await??;

    // WAL from the start LSN through the stop LSN, into the store.
    check_store_covers(wal_dir, snap.start_lsn)?;
    let mut last_log = Instant::now();
    loop {
        let flush = read_state(wal_dir)
            .map_err(follow::store_fatal)?
            .map(|s| s.flush_lsn)
            .unwrap_or_default();
        if flush >= snap.stop_lsn {
            break;
        }
        if !crate::store::writer_running(wal_dir) {
            // Nobody else keeps the store current (any more): fetch the WAL here.
            follow::follow(FollowConfig {
                senders: cfg.senders.clone(),
                name: cfg.name.clone(),
                wal_dir: wal_dir.to_owned(),
                start_lsn: Some(snap.start_lsn),
                until: Some(snap.stop_lsn),
                tls: cfg.tls.clone(),
                serve: None,
                retention: None,
                metrics_listen: None,
            })
            .await?;
            break;
        }
        // A follower keeps this store current (a backup repository's archive): wait for it.
        if last_log.elapsed() >= Duration::from_secs(10) {
            last_log = Instant::now();
            info!(%flush, stop_lsn = %snap.stop_lsn, "a wal-receiver follows this WAL store; waiting for it to store the WAL through the snapshot's stop position");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let flush_lsn = read_state(wal_dir)
        .map_err(follow::store_fatal)?
        .map(|s| s.flush_lsn)
        .unwrap_or_default();
    if flush_lsn < snap.stop_lsn {
        bail!("interrupted before WAL through {} was stored (the store holds WAL up to {flush_lsn}); run it again to finish", snap.stop_lsn);
    }
    Ok(snap)
}

/// One attempt at the snapshot: stage what is missing or changed into `pgdata`.
async fn snapshot(
    cfg: &BootstrapConfig,
    pgdata: &Path,
    wal_dir: &Path,
    resumed: bool,
) -> Result<Snapshot> {
    // Checksums are computed before connecting: the sender waits only briefly for them.
    let staged = if resumed {
        let dir = pgdata.to_owned();
        let staged = tokio::task::spawn_blocking(move || staged_sums(&dir)).await??;
        let bytes: u64 = staged.iter().map(|(_, s)| s.len() as u64 * CHUNK_LEN).sum();
        info!(
            files = staged.len(),
            approx_bytes = bytes,
            "resuming an unfinished bootstrap"
        );
        staged
    } else {
        Vec::new()
    };

    let (_, mut conn) = follow::choose(
        &cfg.senders,
        &cfg.name,
        Mode::Bootstrap,
        cfg.tls.as_ref(),
        None,
    )
    .await?;
    if let Some(st) = read_state(wal_dir).map_err(follow::store_fatal)? {
        check_same_cluster(&st, &conn.info, wal_dir)?;
    }
    if resumed {
        check_marker(pgdata, conn.info.system_id)?;
    } else {
        create_target(pgdata, conn.info.system_id)?;
    }
    for (path, sums) in staged {
        for part in sums.chunks(MAX_SUMS_PER_MESSAGE) {
            conn.link
                .send(&Message::Have {
                    path: path.clone(),
                    sums: part.to_vec(),
                })
                .await?;
        }
    }
    conn.link.send(&Message::StartBackup).await?;
    receive(
        conn,
        pgdata,
        &cfg.tablespace_mapping,
        cfg.tablespace_root.as_deref(),
        resumed,
    )
    .await
}

/// Refuses to resume a bootstrap of another cluster into `pgdata`.
fn check_marker(pgdata: &Path, system_id: u64) -> Result<()> {
    let text = fs::read_to_string(pgdata.join(MARKER))
        .with_context(|| format!("read {}", pgdata.join(MARKER).display()))?;
    let recorded = text
        .lines()
        .find_map(|l| l.strip_prefix("system_identifier="))
        .and_then(|v| v.trim().parse::<u64>().ok());
    match recorded {
        Some(id) if id != system_id => Err(Fatal {
            code: exit::MISMATCH,
            message: format!(
                "{} holds an unfinished bootstrap of system {id}, but the sender's primary is system {system_id}; refusing to mix clusters. Empty the directory or use another one",
                pgdata.display()
            ),
        }
        .into()),
        _ => Ok(()),
    }
}

/// Checks the target: absent or empty is a new bootstrap, one holding the marker is resumed
/// (`true`), anything else is refused.
fn check_target(pgdata: &Path) -> Result<bool> {
    if pgdata.join(MARKER).exists() {
        return Ok(true);
    }
    match fs::read_dir(pgdata).map(|mut rd| rd.next().is_some()) {
        Ok(true) => Err(Fatal {
            code: exit::TARGET_NOT_EMPTY,
            message: format!(
                "{} is not empty and holds no unfinished walship bootstrap; refusing to overwrite it. Give an empty or new directory",
                pgdata.display()
            ),
        }
        .into()),
        Ok(false) => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("read {}", pgdata.display())),
    }
}

/// Creates the target (mode 0700) with its marker, which names the cluster.
fn create_target(pgdata: &Path, system_id: u64) -> Result<()> {
    fs::create_dir_all(pgdata).with_context(|| format!("create {}", pgdata.display()))?;
    fs::set_permissions(
        pgdata,
        fs::Permissions::from_mode(crate::access::dir_mode()),
    )?;
    durable::write_atomic(
        &pgdata.join(MARKER),
        format!("wal-receiver bootstrap in progress\nsystem_identifier={system_id}\n").as_bytes(),
    )?;
    if let Some(parent) = pgdata.parent() {
        durable::fsync_dir(parent)?;
    }
    Ok(())
}

/// Chunk checksums of every file staged by an earlier attempt, by wire path.
fn staged_sums(pgdata: &Path) -> Result<Vec<(String, Vec<u64>)>> {
    let mut out = Vec::new();
    let mut roots = vec![(pgdata.to_owned(), String::new())];
    if let Ok(rd) = fs::read_dir(pgdata.join("pg_tblspc")) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.parse::<u32>().is_ok() {
                if let Ok(target) = fs::read_link(e.path()) {
                    roots.push((target, format!("pg_tblspc/{name}")));
                }
            }
        }
    }
    for (root, prefix) in roots {
        let mut stack = vec![(root, prefix)];
        while let Some((dir, rel)) = stack.pop() {
            let Ok(rd) = fs::read_dir(&dir) else { continue };
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let rel_path = if rel.is_empty() {
                    name.clone()
                } else {
                    format!("{rel}/{name}")
                };
                let Ok(ft) = e.file_type() else { continue };
                if ft.is_dir() {
                    stack.push((e.path(), rel_path));
                } else if ft.is_file() && rel_path != MARKER {
                    let wire = if rel_path == PG_CONTROL_STAGED {
                        PG_CONTROL.to_owned()
                    } else {
                        rel_path
                    };
                    out.push((wire, file_sums(&e.path())?));
                }
            }
        }
    }
    Ok(out)
}

fn file_sums(path: &Path) -> Result<Vec<u64>> {
    let mut f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut sums = Vec::new();
    let mut buf = vec![0u8; CHUNK_LEN as usize];
    loop {
        let mut got = 0;
        while got < buf.len() {
            let n = f.read(&mut buf[got..])?;
            if n == 0 {
                break;
            }
            got += n;
        }
        if got == 0 {
            break;
        }
        sums.push(chunk_sum(&buf[..got]));
        if got < buf.len() {
            break;
        }
    }
    Ok(sums)
}

struct OpenFile {
    path: PathBuf,
    file: File,
    next: u64,
    crc: u32,
}

impl OpenFile {
    /// The file being received, which must continue exactly at `offset`.
    fn continuing_at(cur: &mut Option<OpenFile>, offset: u64) -> Result<&mut OpenFile> {
        let f = cur
            .as_mut()
            .ok_or_else(|| anyhow!("file data outside a file"))?;
        if offset != f.next {
            bail!(
                "file data for {} at offset {offset}, expected {}",
                f.path.display(),
                f.next
            );
        }
        Ok(f)
    }

    /// Accounts for `bytes` now at the end of the file.
    fn advance(&mut self, bytes: &[u8]) {
        self.crc = crc32c::crc32c_append(self.crc, bytes);
        self.next += bytes.len() as u64;
    }
}

/// Receives the snapshot into the target.
async fn receive(
    conn: Connection,
    pgdata: &Path,
    mapping: &[(PathBuf, PathBuf)],
    tablespace_root: Option<&Path>,
    resumed: bool,
) -> Result<Snapshot> {
    let mut target = Target {
        root: pgdata.to_owned(),
        tablespaces: HashMap::new(),
    };
    let mut progress: Option<Progress> = None;
    let mut cur: Option<OpenFile> = None;
    let mut snap = Snapshot {
        start_lsn: Lsn::INVALID,
        stop_lsn: Lsn::INVALID,
        timeline: 0,
        system_id: conn.info.system_id,
        backup_label: String::new(),
        tablespace_map: String::new(),
        tablespaces: HashMap::new(),
        received: HashSet::new(),
        bytes: 0,
        skipped: 0,
        wire: 0,
    };
    // Frames are read and decompressed on their own task while this one writes files, and
    // a syncer thread fsyncs finished files while the copy goes on.
    let Connection {
        mut frames, link, ..
    } = conn;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<(Message, u64)>>(8);
    let reader = tokio::spawn(async move {
        loop {
            let item = match tokio::time::timeout(IDLE_TIMEOUT, frames.read_frame()).await {
                Err(_) => Err(anyhow!("the sender sent nothing for {IDLE_TIMEOUT:?}")),
                Ok(Err(e)) => Err(anyhow::Error::from(e).context("bad frame from sender")),
                Ok(Ok(None)) => Err(anyhow!(
                    "the sender closed the connection before the snapshot was complete"
                )),
                Ok(Ok(Some(frame))) => Message::decode(&frame)
                    .map(|m| (m, frame.wire_bytes))
                    .map_err(Into::into),
            };
            let stop = item.is_err();
            if tx.send(item).await.is_err() || stop {
                return;
            }
        }
    });
    let syncer = Syncer::start();
    let result = receive_loop(
        &mut rx,
        pgdata,
        (mapping, tablespace_root),
        resumed,
        &mut target,
        &mut progress,
        &mut cur,
        &mut snap,
        &syncer,
    )
    .await;
    reader.abort();
    drop(link);
    syncer.finish()?;
    result.map(|()| snap)
}

/// fsyncs finished files on a thread of its own. The first failure is kept and reported by
/// [`Syncer::finish`]; a failed fsync is fatal for the bootstrap.
struct Syncer {
    tx: Option<std::sync::mpsc::Sender<(File, PathBuf)>>,
    thread: Option<std::thread::JoinHandle<Result<(), durable::DurableError>>>,
}

impl Syncer {
    fn start() -> Syncer {
        let (tx, rx) = std::sync::mpsc::channel::<(File, PathBuf)>();
        let thread = std::thread::spawn(move || {
            for (file, path) in rx {
                durable::fsync_file(&file, &path)?;
            }
            Ok(())
        });
        Syncer {
            tx: Some(tx),
            thread: Some(thread),
        }
    }

    fn sync(&self, file: File, path: PathBuf) -> Result<()> {
        self.tx
            .as_ref()
            .and_then(|tx| tx.send((file, path)).ok())
            .ok_or_else(|| anyhow!("the fsync thread stopped"))
    }

    fn finish(mut self) -> Result<()> {
        self.tx.take();
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r.map_err(|e| {
                Fatal {
                    code: exit::DISK,
                    message: e.to_string(),
                }
                .into()
            }),
            Some(Err(_)) => bail!("the fsync thread panicked"),
            None => Ok(()),
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn receive_loop(
    rx: &mut tokio::sync::mpsc::Receiver<Result<(Message, u64)>>,
    pgdata: &Path,
    (mapping, tablespace_root): (&[(PathBuf, PathBuf)], Option<&Path>),
    resumed: bool,
    target: &mut Target,
    progress: &mut Option<Progress>,
    cur: &mut Option<OpenFile>,
    snap: &mut Snapshot,
    syncer: &Syncer,
) -> Result<()> {
    loop {
        let (msg, wire_bytes) = rx
            .recv()
            .await
            .ok_or_else(|| anyhow!("the connection reader stopped"))??;
        snap.wire += wire_bytes;
        let started = snap.start_lsn.is_valid();
        match msg {
            Message::BackupStart {
                start_lsn,
                timeline,
                total_bytes,
                file_count,
                tablespaces,
            } if !started => {
                info!(%start_lsn, timeline, total_bytes, file_count, "snapshot started");
                snap.timeline = timeline;
                for (oid, location) in tablespaces {
                    let dir = tablespace_dir(
                        pgdata,
                        oid,
                        Path::new(&location),
                        (mapping, tablespace_root),
                        resumed,
                    )?;
                    target.tablespaces.insert(oid, dir.clone());
                    snap.tablespaces.insert(oid, dir);
                }
                snap.start_lsn = start_lsn;
                *progress = Some(Progress::new(total_bytes));
            }
            Message::Dir { path, .. } if started && cur.is_none() => {
                let local = target.resolve(&path)?;
                fs::create_dir_all(&local)
                    .with_context(|| format!("create {}", local.display()))?;
                fs::set_permissions(
                    &local,
                    fs::Permissions::from_mode(crate::access::dir_mode()),
                )?;
            }
            Message::FileBegin { path, .. } if started && cur.is_none() => {
                let mut local = target.resolve(&path)?;
                if path == PG_CONTROL {
                    local = pgdata.join(PG_CONTROL_STAGED);
                }
                if let Some(parent) = local.parent() {
                    fs::create_dir_all(parent)
                        .with_context(|| format!("create {}", parent.display()))?;
                }
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .mode(crate::access::file_mode())
                    .custom_flags(nix::libc::O_NOFOLLOW)
                    .open(&local)
                    .with_context(|| format!("open {}", local.display()))?;
                *cur = Some(OpenFile {
                    path: local,
                    file,
                    next: 0,
                    crc: 0,
                });
            }
            Message::FileData { offset, data } => {
                let f = OpenFile::continuing_at(cur, offset)?;
                f.file
                    .write_all_at(&data, offset)
                    .with_context(|| format!("write {}", f.path.display()))?;
                f.advance(&data);
                snap.bytes += data.len() as u64;
                if let Some(p) = progress.as_mut() {
                    p.add(data.len() as u64, 0);
                }
            }
            Message::FileSame { offset, len } => {
                let f = OpenFile::continuing_at(cur, offset)?;
                // len <= CHUNK_LEN, checked when the message was decoded.
                let mut buf = vec![0u8; len as usize];
                f.file
                    .read_exact_at(&mut buf, offset)
                    .with_context(|| format!("read staged {}", f.path.display()))?;
                f.advance(&buf);
                snap.skipped += len as u64;
                if let Some(p) = progress.as_mut() {
                    p.add(0, len as u64);
                }
            }
            Message::FileEnd { size, crc32c } => {
                let f = cur
                    .take()
                    .ok_or_else(|| anyhow!("file end outside a file"))?;
                if size != f.next {
                    bail!(
                        "{}: the sender ended the file at {size} bytes after sending {}",
                        f.path.display(),
                        f.next
                    );
                }
                f.file
                    .set_len(size)
                    .with_context(|| format!("truncate {}", f.path.display()))?;
                if crc32c != f.crc {
                    bail!(
                        "{}: checksum mismatch (sender {crc32c:08x}, received {:08x})",
                        f.path.display(),
                        f.crc
                    );
                }
                snap.received.insert(f.path.clone());
                syncer.sync(f.file, f.path)?;
            }
            Message::BackupEnd {
                stop_lsn,
                backup_label,
                tablespace_map,
            } if started && cur.is_none() => {
                if let Some(p) = progress.take() {
                    p.finish();
                }
                snap.stop_lsn = stop_lsn;
                snap.backup_label = backup_label;
                snap.tablespace_map = tablespace_map;
                return Ok(());
            }
            Message::Error { code, message } => return Err(sender_error(code, message)),
            other => bail!(
                "unexpected {:?} message from the sender during the snapshot",
                other.kind()
            ),
        }
    }
}

/// The directory a tablespace's files go to, with the link `pg_tblspc/<oid>` to it.
fn tablespace_dir(
    pgdata: &Path,
    oid: u32,
    location: &Path,
    (mapping, root): (&[(PathBuf, PathBuf)], Option<&Path>),
    resumed: bool,
) -> Result<PathBuf> {
    let dir = mapping
        .iter()
        .find(|(old, _)| old == location)
        .map(|(_, new)| new.clone())
        .or_else(|| root.map(|r| r.join(oid.to_string())))
        .unwrap_or_else(|| location.to_owned());
    if !dir.is_absolute() {
        bail!(
            "tablespace {oid} would go to {}, which is not an absolute path",
            dir.display()
        );
    }
    // The location comes from the sender: it must be a plain absolute path.
    let text = dir.to_string_lossy();
    if text.contains('\0')
        || dir.components().any(|c| {
            matches!(
                c,
                std::path::Component::ParentDir | std::path::Component::CurDir
            )
        })
        || text.contains("/./")
        || text.ends_with("/.")
    {
        return Err(UnsafePath {
            name: location.display().to_string(),
            why: "is a tablespace location with '.' or '..' components or NUL",
        }
        .into());
    }
    let link = pgdata.join("pg_tblspc").join(oid.to_string());
    let ours = fs::read_link(&link).map(|t| t == dir).unwrap_or(false);
    let non_empty = fs::read_dir(&dir)
        .map(|mut rd| rd.next().is_some())
        .unwrap_or(false);
    if non_empty && !(resumed && ours) {
        return Err(Fatal {
            code: exit::TARGET_NOT_EMPTY,
            message: format!(
                "tablespace {oid} ({}) would be restored into {}, which is not empty; give --tablespace-mapping {}=NEW_DIR",
                location.display(),
                dir.display(),
                location.display()
            ),
        }
        .into());
    }
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(crate::access::dir_mode()))?;
    fs::create_dir_all(pgdata.join("pg_tblspc"))?;
    if !ours {
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&dir, &link)
            .with_context(|| format!("link {}", link.display()))?;
    }
    Ok(dir)
}

/// Removes staged files the snapshot does not contain, then fsyncs every directory.
fn remove_stale_and_sync(
    pgdata: &Path,
    tablespaces: &HashMap<u32, PathBuf>,
    keep: &HashSet<PathBuf>,
) -> Result<()> {
    let mut dirs = Vec::new();
    let mut stack: Vec<PathBuf> = vec![pgdata.to_owned()];
    stack.extend(tablespaces.values().cloned());
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).with_context(|| format!("list {}", dir.display()))? {
            let e = e?;
            let path = e.path();
            let ft = e.file_type()?;
            if ft.is_dir() {
                stack.push(path);
            } else if ft.is_file() && path != pgdata.join(MARKER) && !keep.contains(&path) {
                fs::remove_file(&path)
                    .with_context(|| format!("remove stale {}", path.display()))?;
            }
        }
        dirs.push(dir);
    }
    // The files themselves were fsynced by the syncer as they were finished.
    for dir in dirs.iter().rev() {
        durable::fsync_dir(dir)?;
    }
    durable::fsync_dir(&pgdata.join("pg_tblspc")).ok();
    Ok(())
}

/// A store that already holds WAL must hold it from the snapshot's start on.
fn check_store_covers(wal_dir: &Path, start_lsn: Lsn) -> Result<()> {
    let Some(status) = crate::status::status(wal_dir)? else {
        return Ok(());
    };
    let Some(state) = read_state(wal_dir).map_err(follow::store_fatal)? else {
        return Ok(());
    };
    let first = status
        .first_segment
        .as_deref()
        .and_then(|n| WalFileName::parse(n, state.seg_size));
    if let Some(WalFileName::Segment { segno, .. }) = first {
        if segno > state.seg_size.segment_of(start_lsn) {
            return Err(Fatal {
                code: exit::MISMATCH,
                message: format!(
                    "the WAL store {} starts after the snapshot's start {start_lsn}; the standby could not replay from it. Use an empty --wal-dir",
                    wal_dir.display()
                ),
            }
            .into());
        }
    }
    Ok(())
}

/// Refuses (exit 2) server settings PostgreSQL would not start with, and a standby socket
/// where `follow --serve-standby` serves it: the two would take the same socket file.
fn check_server_settings(
    server: &ServerSettings,
    serve: Option<&crate::serve::ServeAddr>,
) -> Result<()> {
    let usage = |message| Fatal {
        code: exit::USAGE,
        message,
    };
    server.check().map_err(usage)?;
    if let (Some(dir), Some(port), Some(crate::serve::ServeAddr::Unix { dir: d, port: p })) =
        (&server.socket_dir, server.port, serve)
    {
        if dir == d && port == *p {
            return Err(usage(format!(
                "--socket-dir {} with --port {port} is where 'follow --serve-standby' serves the standby; give the standby another port or socket directory",
                dir.display()
            ))
            .into());
        }
    }
    Ok(())
}

/// Writes the labels and recovery settings, then publishes `pg_control`.
fn finish(
    pgdata: &Path,
    wal_dir: &Path,
    snap: &Snapshot,
    restore_bin: &Path,
    stream_from: Option<(&crate::serve::ServeAddr, &str)>,
    server: &ServerSettings,
) -> Result<()> {
    durable::write_atomic(&pgdata.join("backup_label"), snap.backup_label.as_bytes())?;
    if !snap.tablespace_map.trim().is_empty() {
        let mut map = String::new();
        for line in snap.tablespace_map.lines().filter(|l| !l.is_empty()) {
            let oid: u32 = line
                .split(' ')
                .next()
                .and_then(|o| o.parse().ok())
                .ok_or_else(|| anyhow!("malformed tablespace_map line {line:?}"))?;
            let dir = snap.tablespaces.get(&oid).ok_or_else(|| {
                anyhow!(
                    "tablespace_map names tablespace {oid}, which the snapshot did not announce"
                )
            })?;
            map.push_str(&format!(
                "{oid} {}\n",
                escape_map_path(&dir.display().to_string())
            ));
        }
        durable::write_atomic(&pgdata.join("tablespace_map"), map.as_bytes())?;
    }
    durable::write_atomic(&pgdata.join("standby.signal"), b"")?;
    let restore = format!(
        "{} restore-wal --wal-dir {} %f %p",
        shell_quote(&restore_bin.display().to_string()),
        shell_quote(&wal_dir.display().to_string())
    );
    let mut conf =
        String::from("# Added by wal-receiver bootstrap: replay WAL from the walship store.\n");
    conf.push_str(&format!(
        "restore_command = '{}'\n",
        pgconf::quote(&restore)
    ));
    conf.push_str(&format!(
        "wal_retrieve_retry_interval = '{RETRY_INTERVAL}'\n"
    ));
    if let Some((addr, name)) = stream_from {
        // Streaming from `follow --serve-standby`; restore_command stays as the fallback
        // while the receiver is not serving (and for archive recovery).
        let conninfo = format!("{} application_name={}", conninfo_words(addr), name);
        conf.push_str(&format!(
            "primary_conninfo = '{}'\n",
            pgconf::quote(&conninfo)
        ));
    }
    conf.push_str(&server.conf_lines());
    pgconf::append_auto_conf(pgdata, &conf)?;
    durable::publish(&pgdata.join(PG_CONTROL_STAGED), &pgdata.join(PG_CONTROL))?;
    durable::remove_durable(&pgdata.join(MARKER))?;
    Ok(())
}

/// `host=... port=...` for libpq, each value quoted as libpq wants when needed.
fn conninfo_words(addr: &crate::serve::ServeAddr) -> String {
    let quote = |v: &str| {
        if !v.is_empty() && !v.contains([' ', '\'', '\\']) {
            v.to_owned()
        } else {
            format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
        }
    };
    match addr {
        crate::serve::ServeAddr::Unix { dir, port } => {
            format!("host={} port={port}", quote(&dir.display().to_string()))
        }
        crate::serve::ServeAddr::Tcp(a) => format!("host={} port={}", a.ip(), a.port()),
    }
}

/// tablespace_map escapes newlines, carriage returns and backslashes with a backslash.
fn escape_map_path(p: &str) -> String {
    let mut out = String::with_capacity(p.len());
    for c in p.chars() {
        if matches!(c, '\n' | '\r' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Quotes a word for the shell that runs restore_command.
pub(crate) fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+:=@,".contains(&b))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Progress of the copy: a bar on a terminal, a log line every 10 s elsewhere.
struct Progress {
    total: u64,
    done: u64,
    skipped: u64,
    started: Instant,
    last_log: Instant,
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    fn new(total: u64) -> Progress {
        let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar
        });
        Progress {
            total,
            done: 0,
            skipped: 0,
            started: Instant::now(),
            last_log: Instant::now(),
            bar,
        }
    }

    fn add(&mut self, received: u64, skipped: u64) {
        self.done += received + skipped;
        self.skipped += skipped;
        if let Some(bar) = &self.bar {
            bar.set_position(self.done);
            if skipped > 0 {
                bar.set_message(format!("({} skipped)", indicatif::HumanBytes(self.skipped)));
            }
        } else if self.last_log.elapsed() >= Duration::from_secs(10) {
            self.last_log = Instant::now();
            let secs = self.started.elapsed().as_secs_f64().max(0.001);
            let rate = self.done as f64 / secs;
            let eta = if rate > 0.0 {
                (self.total.saturating_sub(self.done)) as f64 / rate
            } else {
                0.0
            };
            info!(
                done_bytes = self.done,
                total_bytes = self.total,
                skipped_bytes = self.skipped,
                "copied {:.0}% ({} of {}), {}/s, ETA {:.0}s",
                100.0 * self.done as f64 / self.total.max(1) as f64,
                indicatif::HumanBytes(self.done),
                indicatif::HumanBytes(self.total),
                indicatif::HumanBytes(rate as u64),
                eta
            );
        }
    }

    fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(
            shell_quote("/usr/bin/wal-receiver"),
            "/usr/bin/wal-receiver"
        );
        assert_eq!(shell_quote("/a b/c"), "'/a b/c'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(escape_map_path("/a\\b"), "/a\\\\b");
    }

    #[test]
    fn refuses_non_empty_target_but_resumes_its_own() {
        let d = std::env::temp_dir().join(format!("walship-target-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        assert!(!check_target(&d).unwrap());
        create_target(&d, 42).unwrap();
        assert!(
            check_target(&d).unwrap(),
            "own unfinished bootstrap not resumed"
        );
        check_marker(&d, 42).unwrap();
        let e = check_marker(&d, 43).unwrap_err();
        assert_eq!(
            e.downcast_ref::<Fatal>().map(|f| f.code),
            Some(exit::MISMATCH),
            "another cluster's bootstrap resumed"
        );
        fs::remove_file(d.join(MARKER)).unwrap();
        assert!(!check_target(&d).unwrap(), "empty directory refused");
        fs::write(d.join("PG_VERSION"), b"15\n").unwrap();
        let e = check_target(&d).unwrap_err();
        assert_eq!(
            e.downcast_ref::<Fatal>().map(|f| f.code),
            Some(exit::TARGET_NOT_EMPTY)
        );
        fs::remove_dir_all(&d).unwrap();
    }
}
