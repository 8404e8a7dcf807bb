//! Who may read what wal-receiver keeps.
//!
//! WAL stores, backup repositories and the data directories wal-receiver makes hold the
//! whole database in the clear. Like PostgreSQL's own data directory they belong to one OS
//! user: directories 0700, files 0600. With `--allow-group-access` (as `initdb
//! --allow-group-access`) the owner's group may read them: 0750 and 0640. The mode is set
//! once per process, with the umask, before anything is created ([`init`]); code that gives
//! a mode explicitly takes it from [`dir_mode`] and [`file_mode`].
//!
//! A store or repository that others can reach is refused ([`check`]), as PostgreSQL
//! refuses to start on a data directory with group or world permissions; so is writing
//! into one that belongs to another OS user, whose files the owner (and the standby's
//! `restore_command`) could then not read.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::OnceLock;

use nix::sys::stat::{umask, Mode};
use nix::unistd::{geteuid, Uid, User};

use crate::{exit, Fatal};

/// Who besides the owner may read what wal-receiver creates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Nobody: directories 0700, files 0600 (PostgreSQL's default).
    Owner,
    /// The owner's group may read: directories 0750, files 0640 (`initdb -g`).
    Group,
}

impl Access {
    /// The mode of a directory wal-receiver creates.
    pub fn dir_mode(self) -> u32 {
        0o777 & !self.mask()
    }

    /// The mode of a file wal-receiver creates.
    pub fn file_mode(self) -> u32 {
        0o666 & !self.mask()
    }

    /// The umask, and the permission bits a store or repository must not have.
    fn mask(self) -> u32 {
        match self {
            Access::Owner => 0o077,
            Access::Group => 0o027,
        }
    }
}

static ACCESS: OnceLock<Access> = OnceLock::new();

/// Sets this process's access mode and its umask. Call it first, before anything is created.
pub fn init(access: Access) {
    let _ = ACCESS.set(access);
    umask(Mode::from_bits_truncate(access.mask() as nix::libc::mode_t));
}

/// The access mode [`init`] set (owner only if it was not called).
pub fn current() -> Access {
    ACCESS.get().copied().unwrap_or(Access::Owner)
}

/// The mode of a directory wal-receiver creates, under the current access mode.
pub fn dir_mode() -> u32 {
    current().dir_mode()
}

/// The mode of a file wal-receiver creates, under the current access mode.
pub fn file_mode() -> u32 {
    current().file_mode()
}

/// What a command does with the directory it is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Use {
    /// Reads it, or removes from it (status, backups, verify, prune, restore).
    Read,
    /// Writes new files into it (follow, bootstrap, backup): it must also be this user's.
    Write,
}

/// What [`check`] finds about a directory, without changing it.
#[derive(Debug)]
pub enum Verdict {
    /// Missing (it will be created private), not a directory (the command reports it), or
    /// private enough.
    Fine,
    /// Empty, this user's, and open to others: a command that uses it makes it private
    /// first, as `initdb` does.
    EmptyOpen { mode: u32 },
    /// Refused with [`exit::PERMISSIONS`]; the message names the fix.
    Refused(Fatal),
}

/// Checks the WAL store or repository `dir` (`what` names it in messages) before a command
/// uses it. A directory that does not exist yet passes: it is created private. An empty one
/// with a wider mode is made private, as `initdb` fixes the permissions of an existing
/// empty directory. Otherwise it is refused with [`exit::PERMISSIONS`] when other users
/// (or, without `--allow-group-access`, the group) have any permission on it, or, for
/// [`Use::Write`], when it belongs to another OS user.
pub fn check(dir: &Path, what: &str, usage: Use) -> Result<(), Fatal> {
    match assess(dir, what, usage) {
        Verdict::Fine => Ok(()),
        Verdict::Refused(f) => Err(f),
        Verdict::EmptyOpen { mode } => {
            let access = current();
            if fs::set_permissions(dir, fs::Permissions::from_mode(access.dir_mode())).is_ok() {
                tracing::info!(
                    dir = %dir.display(),
                    "made the empty {what} private: mode {mode:04o} -> {:04o}",
                    access.dir_mode()
                );
                return Ok(());
            }
            Err(Fatal {
                code: exit::PERMISSIONS,
                message: open_message(dir, what, mode, access),
            })
        }
    }
}

/// What [`check`] would find about `dir`, changing nothing (for `check`, the command).
pub fn assess(dir: &Path, what: &str, usage: Use) -> Verdict {
    // What cannot be read here (missing, not a directory, no permission) is for the
    // command itself to report.
    let Ok(meta) = fs::metadata(dir) else {
        return Verdict::Fine;
    };
    if !meta.is_dir() {
        return Verdict::Fine;
    }
    let access = current();
    let shown = dir.display();
    let euid = geteuid();
    if usage == Use::Write && meta.uid() != euid.as_raw() {
        let owner = Uid::from_raw(meta.uid());
        let how = if euid.is_root() {
            format!(
                " (as root: runuser -u {} -- wal-receiver ...)",
                user_name(owner)
            )
        } else {
            String::new()
        };
        return Verdict::Refused(Fatal {
            code: exit::PERMISSIONS,
            message: format!(
                "the {what} {shown} belongs to {}, but wal-receiver runs as {}: the files it wrote there would be unreadable by their owner (and by a standby's restore_command). Run wal-receiver as {}{how}, as PostgreSQL runs as the owner of its data directory",
                user_label(owner),
                user_label(euid),
                user_name(owner),
            ),
        });
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & access.mask() == 0 {
        return Verdict::Fine;
    }
    let empty = fs::read_dir(dir).is_ok_and(|mut rd| rd.next().is_none());
    if empty && meta.uid() == euid.as_raw() {
        return Verdict::EmptyOpen { mode };
    }
    Verdict::Refused(Fatal {
        code: exit::PERMISSIONS,
        message: open_message(dir, what, mode, access),
    })
}

/// Why a directory of `mode` is open to more users than `access` allows, and the fix.
fn open_message(dir: &Path, what: &str, mode: u32, access: Access) -> String {
    let shown = dir.display();
    let quoted = shell_quote(&shown.to_string());
    match access {
        Access::Owner => format!(
            "the {what} {shown} is open to other users (mode {mode:04o}): it holds the database in the clear, so, like PostgreSQL's data directory, it must be private to its owner. Fix it with: chmod -R go-rwx {quoted}  (or, to let the owner's group read it: chmod -R g-w,o-rwx {quoted}, and give --allow-group-access)"
        ),
        Access::Group => format!(
            "the {what} {shown} is open to {who} (mode {mode:04o}): with --allow-group-access its group may read it, but nobody else, and only the owner may write. Fix it with: chmod -R g-w,o-rwx {quoted}",
            who = if mode & 0o007 != 0 {
                "all users"
            } else {
                "writes by its group"
            },
        ),
    }
}

/// Why `dir` is open to more users than the access mode allows, if it is: for commands
/// that must not refuse (`restore-wal`, which PostgreSQL runs for every segment), and only
/// warn.
pub fn exposure(dir: &Path, what: &str) -> Option<String> {
    let mode = fs::metadata(dir).ok()?.permissions().mode() & 0o777;
    let access = current();
    (mode & access.mask() != 0).then(|| open_message(dir, what, mode, access))
}

fn user_name(uid: Uid) -> String {
    match User::from_uid(uid) {
        Ok(Some(u)) => u.name,
        _ => uid.to_string(),
    }
}

pub(crate) fn user_label(uid: Uid) -> String {
    match User::from_uid(uid) {
        Ok(Some(u)) => format!("{} (uid {uid})", u.name),
        _ => format!("uid {uid}"),
    }
}

/// `s` as one word for a POSIX shell.
fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+,:@%=".contains(&b))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("walship-access-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn modes() {
        assert_eq!(Access::Owner.dir_mode(), 0o700);
        assert_eq!(Access::Owner.file_mode(), 0o600);
        assert_eq!(Access::Group.dir_mode(), 0o750);
        assert_eq!(Access::Group.file_mode(), 0o640);
    }

    #[test]
    fn open_stores_are_refused_with_the_fix_and_empty_ones_made_private() {
        let d = tmpdir("check");
        fs::write(d.join("state"), b"x").unwrap();
        for (mode, refused) in [(0o700, false), (0o750, true), (0o705, true), (0o710, true)] {
            fs::set_permissions(&d, fs::Permissions::from_mode(mode)).unwrap();
            let r = check(&d, "WAL store", Use::Read);
            assert_eq!(r.is_err(), refused, "mode {mode:o}");
            if let Err(f) = r {
                assert_eq!(f.code, exit::PERMISSIONS);
                assert!(f.message.contains("chmod -R go-rwx"), "{}", f.message);
                assert!(f.message.contains("--allow-group-access"), "{}", f.message);
                assert!(exposure(&d, "WAL store").is_some());
            } else {
                assert!(exposure(&d, "WAL store").is_none());
            }
        }
        // Written by this user: accepted; an empty, open directory is made private.
        fs::set_permissions(&d, fs::Permissions::from_mode(0o700)).unwrap();
        check(&d, "WAL store", Use::Write).unwrap();
        fs::remove_file(d.join("state")).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
        check(&d, "WAL store", Use::Write).unwrap();
        assert_eq!(
            fs::metadata(&d).unwrap().permissions().mode() & 0o777,
            0o700
        );
        // Missing: created private later.
        check(&d.join("new"), "WAL store", Use::Write).unwrap();
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn assess_changes_nothing() {
        let d = tmpdir("assess");
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
        assert!(matches!(
            assess(&d, "WAL store", Use::Write),
            Verdict::EmptyOpen { mode: 0o755 }
        ));
        assert_eq!(
            fs::metadata(&d).unwrap().permissions().mode() & 0o777,
            0o755
        );
        fs::write(d.join("state"), b"x").unwrap();
        match assess(&d, "WAL store", Use::Read) {
            Verdict::Refused(f) => assert!(f.message.contains("chmod -R go-rwx"), "{}", f.message),
            v => panic!("{v:?}"),
        }
        fs::set_permissions(&d, fs::Permissions::from_mode(0o700)).unwrap();
        assert!(matches!(assess(&d, "WAL store", Use::Read), Verdict::Fine));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn shell_words() {
        assert_eq!(shell_quote("/var/lib/walship/wal"), "/var/lib/walship/wal");
        assert_eq!(shell_quote("/a b/it's"), r"'/a b/it'\''s'");
    }
}
