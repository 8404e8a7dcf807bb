//! `wal-receiver restore-wal`: the `restore_command` helper.
//!
//! It serves one WAL file from the store to PostgreSQL without taking the store's lock, so
//! it runs while `follow` writes. A sealed segment is decompressed and verified; the segment
//! being written is served up to the store's flush position and zero-padded to the full
//! segment size (PostgreSQL ignores a short file and stops replay cleanly at the zeros). That
//! position is the one [`crate::store::read_state`] gives: after a restart of the machine,
//! before a writer opens the store again, it includes whole, valid records past the recorded
//! position. Bytes past the flush position are never served: they may be left over from a
//! crash.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nix::fcntl::{Flock, FlockArg};
use walship_common::{SegmentNo, WalFileName};

use crate::store::{
    boot_id, read_recorded_state, reader_error, with_wal_past, StoreState, PARTIAL_SUFFIX,
    SEALED_SUFFIX,
};
use crate::walread::read_partial;
use crate::{exit, sealed, Fatal};

/// Where prefetched segments wait, next to `dest` (in the server's `pg_wal`).
pub const PREFETCH_DIR: &str = ".walship-prefetch";
/// The suffix of a file being written, until it is renamed to its name.
const TMP_SUFFIX: &str = ".walship-tmp";

/// PostgreSQL's promotion request (`PROMOTE_SIGNAL_FILE`), relative to the data directory
/// (restore_command runs there). `pg_ctl promote` writes it, then signals the postmaster;
/// PostgreSQL removes it when it promotes.
pub const PROMOTE_SIGNAL: &str = "promote";
/// Written by `restore`; renamed to [`PROMOTE_SIGNAL`] once PostgreSQL asks for the segment
/// that holds the end of the archive. So the promotion is requested once, for this restore
/// only: a server later made a standby with the same restore_command never finds it. In
/// `pg_wal`, which base backups and `pg_verifybackup` leave out.
pub const PROMOTE_ARMED: &str = "pg_wal/walship.promote.armed";
/// The postmaster's lock file, whose first line is its process id.
const POSTMASTER_PID: &str = "postmaster.pid";

/// Writes `file` to `dest`. `Ok(false)` means the store does not have it (yet). A sealed
/// copy that is corrupt is a [`Fatal`] error with exit code 5.
///
/// With `prefetch`, a sealed next segment is decompressed in the background into
/// `PREFETCH_DIR` beside `dest`, while PostgreSQL replays this one; the next call takes it
/// from there with a rename. Only sealed segments are prefetched: they never change. When a
/// file is not in the store (the end of the archive, or the probe for a next timeline's
/// history that follows it), the prefetch directory is removed.
///
/// With `promote_at_end`, a request for the segment that holds the end of the archive, or a
/// later one, requests the server's promotion as `pg_ctl promote` does, from the current
/// directory (the data directory): [`PROMOTE_ARMED`] is renamed to [`PROMOTE_SIGNAL`] and
/// the postmaster gets SIGUSR1. A standby acts on the request only when it finds no more
/// WAL, so it first replays every record the archive holds, then promotes (without the
/// end-of-recovery checkpoint that archive recovery waits for).
pub fn restore_wal(
    wal_dir: &Path,
    file: &str,
    dest: &Path,
    prefetch: bool,
    promote_at_end: bool,
) -> Result<bool> {
    let spool = dest
        .parent()
        .map(|d| d.join(PREFETCH_DIR))
        .unwrap_or_else(|| PathBuf::from(PREFETCH_DIR));
    let Some(mut state) = read_recorded_state(wal_dir).map_err(reader_error)? else {
        return Ok(false);
    };
    let Some(name) = WalFileName::parse(file, state.seg_size) else {
        bail!("{file:?} is not a WAL segment or timeline history file name");
    };
    if let WalFileName::Segment { segno, .. } = name {
        // Only the segment being written, or a later one, depends on where its WAL ends;
        // earlier ones are read without walking it.
        if segno >= state.seg_size.segment_of(state.flush_lsn) {
            state = with_wal_past(wal_dir, state).map_err(reader_error)?;
        }
    }
    let at_end = matches!(name, WalFileName::Segment { segno, .. }
        if segno >= state.seg_size.segment_of(state.flush_lsn));
    // `file` passed WalFileName::parse: a bare name.
    let spooled = matches!(name, WalFileName::Segment { .. }) && take_spooled(&spool, file, dest);
    let found = spooled
        || write_dest(wal_dir, file, name, &state, dest).map_err(|e| {
            if sealed::is_corrupt(&e) {
                // Not "not in the store" (exit 1): asking again cannot help.
                Fatal {
                    code: exit::STORE_CORRUPT,
                    message: format!(
                        "{e:#}. The store cannot serve {file}: copy the segment from another WAL store or from the primary's pg_wal, or bootstrap this standby again"
                    ),
                }
                .into()
            } else {
                e
            }
        })?;
    if promote_at_end && at_end {
        request_promotion(
            Path::new(PROMOTE_ARMED),
            Path::new(PROMOTE_SIGNAL),
            Path::new(POSTMASTER_PID),
        );
    }
    if !found {
        let _ = fs::remove_dir_all(&spool);
        return Ok(false);
    }
    if let (true, WalFileName::Segment { timeline, segno }) = (prefetch, name) {
        let next = WalFileName::Segment {
            timeline,
            segno: SegmentNo(segno.0 + 1),
        }
        .to_name(state.seg_size);
        if wal_dir.join(format!("{next}{SEALED_SUFFIX}")).exists()
            && !spool.join(&next).exists()
            && open_spool(&spool)
        {
            // Best effort: if it cannot start, the next call decompresses it itself.
            let _ = std::env::current_exe().and_then(|exe| {
                std::process::Command::new(exe)
                    .args(["restore-wal", "--no-prefetch", "--wal-dir"])
                    .arg(wal_dir)
                    .arg(&next)
                    .arg(spool.join(&next))
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
            });
        }
    }
    Ok(true)
}

/// The file in the prefetch directory that names the boot of the machine it was filled in.
const SPOOL_BOOT: &str = "BOOT";

/// Creates the prefetch directory for this boot of the machine; `false` when prefetching
/// cannot be used (no boot id to tie it to, or the directory cannot be made).
fn open_spool(spool: &Path) -> bool {
    let Some(boot) = boot_id() else {
        return false;
    };
    if filled_in(spool, &boot) {
        return true;
    }
    let _ = fs::remove_dir_all(spool);
    fs::create_dir_all(spool).is_ok() && fs::write(spool.join(SPOOL_BOOT), boot).is_ok()
}

/// Whether the prefetch directory was filled in the boot `boot`.
fn filled_in(spool: &Path, boot: &str) -> bool {
    fs::read_to_string(spool.join(SPOOL_BOOT)).is_ok_and(|b| b == boot)
}

/// Moves the prefetched `file` to `dest`, if it is there; `false` otherwise.
///
/// Prefetched segments are not fsynced (a segment's worth of writes to sync while the
/// server replays). They are used only in the boot of the machine that wrote them, in which
/// the page cache holds every byte written before the rename; after a restart of the
/// machine the directory is removed unused. A prefetch still writing `file` holds its
/// temporary file locked: this waits for it rather than decompress the segment again.
fn take_spooled(spool: &Path, file: &str, dest: &Path) -> bool {
    if !boot_id().is_some_and(|boot| filled_in(spool, &boot)) {
        let _ = fs::remove_dir_all(spool);
        return false;
    }
    if let Ok(f) = File::open(spool.join(format!("{file}{TMP_SUFFIX}"))) {
        let _ = Flock::lock(f, FlockArg::LockShared);
    }
    fs::rename(spool.join(file), dest).is_ok()
}

/// Requests the promotion the way `pg_ctl promote` does, which PostgreSQL 15 to 18 all
/// honour (`promote_trigger_file` is gone from 16): the armed marker becomes the
/// `promote` file, then the postmaster named in `pid_file` gets SIGUSR1 and passes the
/// request to the startup process. Without the marker (already used, or never written)
/// there is nothing to do. A failure is only logged: the server then stays a standby at the
/// end of the archive, to be promoted by hand.
fn request_promotion(armed: &Path, signal: &Path, pid_file: &Path) {
    match fs::rename(armed, signal) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return,
        Err(e) => {
            tracing::warn!(
                "cannot rename {} to {}: {e}; promote the server with pg_ctl promote",
                armed.display(),
                signal.display()
            );
            return;
        }
    }
    let signalled = postmaster_pid(pid_file).and_then(|pid| {
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGUSR1)
            .with_context(|| format!("send SIGUSR1 to the postmaster (process {pid})"))
    });
    match signalled {
        Ok(()) => tracing::info!(
            "the end of the archive is reached: the server is asked to promote once it has replayed it"
        ),
        Err(e) => tracing::warn!("{e:#}; promote the server with pg_ctl promote"),
    }
}

/// The postmaster's process id: the first line of its `postmaster.pid`.
fn postmaster_pid(path: &Path) -> Result<nix::unistd::Pid> {
    let text = fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    text.lines()
        .next()
        .and_then(|l| l.trim().parse::<i32>().ok())
        // A single-user server writes its negated pid; 0 and 1 are never a postmaster.
        .filter(|&pid| pid > 1)
        .map(nix::unistd::Pid::from_raw)
        .ok_or_else(|| anyhow::anyhow!("{} does not start with a process id", path.display()))
}

/// Writes `file` from the store to `dest` through a temporary name. `Ok(false)`: the store
/// does not have it.
fn write_dest(
    wal_dir: &Path,
    file: &str,
    name: WalFileName,
    state: &StoreState,
    dest: &Path,
) -> Result<bool> {
    let tmp = dest.with_file_name(format!(
        "{}{TMP_SUFFIX}",
        dest.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    let out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .with_context(|| format!("create {}", tmp.display()))?;
    // Held until the file has its name (see take_spooled); released on exit at the latest.
    let _writing = out
        .try_clone()
        .ok()
        .and_then(|f| Flock::lock(f, FlockArg::LockExclusive).ok());
    // Large writes: a segment in 8 KiB writes cost more system time than its decompression.
    let mut out = io::BufWriter::with_capacity(1 << 20, out);
    let result = write_file(wal_dir, file, name, state, &mut out).and_then(|len| {
        let f = out
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(|| format!("write {}", tmp.display()))?;
        if let Some(len) = len {
            // The zeros past the served WAL, as a hole: nothing to write.
            f.set_len(len)
                .with_context(|| format!("extend {}", tmp.display()))?;
        }
        Ok(len.is_some())
    });
    match result {
        Ok(true) => {
            fs::rename(&tmp, dest).with_context(|| format!("rename into {}", dest.display()))?;
            Ok(true)
        }
        other => {
            let _ = fs::remove_file(&tmp);
            other
        }
    }
}

/// Writes `file` from the store to `out`. `Ok(None)`: the store does not have it.
/// `Ok(Some(len))`: the file's length, which may go past what was written; the rest is
/// zeros (the segment being written is served up to the flush position).
fn write_file(
    wal_dir: &Path,
    file: &str,
    name: WalFileName,
    state: &StoreState,
    out: &mut impl Write,
) -> Result<Option<u64>> {
    let found = match name {
        WalFileName::History(_) => match File::open(wal_dir.join(file)) {
            Ok(mut f) => Some(io::copy(&mut f, out).with_context(|| format!("copy {file}"))?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(|| format!("open {file}")),
        },
        WalFileName::Segment { timeline, segno } => {
            let seg_len = state.seg_size.bytes();
            // `file` passed WalFileName::parse, so it is a bare name inside wal_dir.
            let sealed_path = wal_dir.join(format!("{file}{SEALED_SUFFIX}"));
            let partial_path = wal_dir.join(format!("{file}{PARTIAL_SUFFIX}"));
            let flush_seg = state.seg_size.segment_of(state.flush_lsn);
            if sealed_path.exists() {
                sealed::read_sealed(&sealed_path, seg_len, out)?;
                Some(seg_len)
            } else if timeline != state.timeline || segno > flush_seg {
                None
            } else {
                let valid = if segno < flush_seg {
                    seg_len
                } else {
                    state.flush_lsn.segment_offset(state.seg_size)
                };
                if valid == 0 {
                    return Ok(None);
                }
                // Checked against recycling: see crate::walread.
                match read_partial(&partial_path, 0, valid as usize) {
                    Ok(Some(bytes)) => {
                        out.write_all(&bytes)
                            .context("write the restored segment")?;
                        Some(seg_len)
                    }
                    // Sealed (and perhaps recycled) between our looks: serve the sealed copy.
                    Ok(None) if sealed_path.exists() => {
                        sealed::read_sealed(&sealed_path, seg_len, out)?;
                        Some(seg_len)
                    }
                    Ok(None) => None,
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => bail!(
                        "{} is shorter than the store's flush position says",
                        partial_path.display()
                    ),
                    Err(e) => {
                        return Err(e).with_context(|| format!("read {}", partial_path.display()))
                    }
                }
            }
        }
    };
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_promotion_is_requested_once_and_signals_the_postmaster() {
        use std::os::unix::process::ExitStatusExt;
        let dir = spool_dir("promote");
        fs::create_dir_all(dir.join("pg_wal")).unwrap();
        let (armed, signal, pid_file) = (
            dir.join(PROMOTE_ARMED),
            dir.join(PROMOTE_SIGNAL),
            dir.join(POSTMASTER_PID),
        );
        // A stand-in for the postmaster: SIGUSR1 ends it.
        let mut postmaster = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        fs::write(&pid_file, format!("{}\n/data\n", postmaster.id())).unwrap();
        fs::write(&armed, b"").unwrap();
        request_promotion(&armed, &signal, &pid_file);
        assert!(signal.exists() && !armed.exists());
        let st = postmaster.wait().unwrap();
        assert_eq!(st.signal(), Some(nix::sys::signal::Signal::SIGUSR1 as i32));
        // Without the marker nothing is requested again.
        fs::remove_file(&signal).unwrap();
        let mut postmaster = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        fs::write(&pid_file, format!("{}\n", postmaster.id())).unwrap();
        request_promotion(&armed, &signal, &pid_file);
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(postmaster.try_wait().unwrap().is_none() && !signal.exists());
        postmaster.kill().unwrap();
        let _ = postmaster.wait();
        // A pid file that names no postmaster is not signalled.
        for bad in ["", "-1234\n", "1\n", "x\n"] {
            fs::write(&pid_file, bad).unwrap();
            assert!(postmaster_pid(&pid_file).is_err(), "{bad:?}");
        }
        let _ = fs::remove_dir_all(&dir);
    }

    fn spool_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("walship-spool-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_spool_from_another_boot_is_removed_unused() {
        let Some(boot) = boot_id() else { return };
        let spool = spool_dir("boot");
        let dest = spool.with_extension("dest");
        fs::create_dir_all(&spool).unwrap();
        fs::write(spool.join(SPOOL_BOOT), "another boot").unwrap();
        fs::write(spool.join("seg"), b"old").unwrap();
        assert!(!take_spooled(&spool, "seg", &dest));
        assert!(!spool.exists() && !dest.exists());

        assert!(open_spool(&spool));
        assert_eq!(fs::read_to_string(spool.join(SPOOL_BOOT)).unwrap(), boot);
        fs::write(spool.join("seg"), b"new").unwrap();
        assert!(take_spooled(&spool, "seg", &dest));
        assert_eq!(fs::read(&dest).unwrap(), b"new");
        let _ = fs::remove_dir_all(&spool);
        let _ = fs::remove_file(&dest);
    }

    #[test]
    fn taking_a_segment_waits_for_the_prefetch_writing_it() {
        if boot_id().is_none() {
            return;
        }
        let spool = spool_dir("wait");
        let dest = spool.with_extension("dest");
        assert!(open_spool(&spool));
        // The prefetch: its temporary file, locked while it writes.
        let tmp = spool.join(format!("seg{TMP_SUFFIX}"));
        let f = File::create(&tmp).unwrap();
        let lock = Flock::lock(f, FlockArg::LockExclusive).unwrap();
        let taker = {
            let (spool, dest) = (spool.clone(), dest.clone());
            std::thread::spawn(move || take_spooled(&spool, "seg", &dest))
        };
        // Without the wait the taker finds no segment; it only ever finds it late.
        std::thread::sleep(std::time::Duration::from_millis(200));
        fs::write(&tmp, b"segment").unwrap();
        fs::rename(&tmp, spool.join("seg")).unwrap();
        drop(lock);
        assert!(taker.join().unwrap(), "the segment was not taken");
        assert_eq!(fs::read(&dest).unwrap(), b"segment");
        let _ = fs::remove_dir_all(&spool);
        let _ = fs::remove_file(&dest);
    }
}
