//! wal-receiver: keeps a durable, verifiable WAL store fed from a wal-sender, and serves it
//! to a standby.
//!
//! - [`store`]: the WAL store and its state file.
//! - [`sealed`]: complete segments, compressed and checksummed at rest.
//! - [`access`]: who may read what wal-receiver keeps (modes, umask, permission checks).
//! - [`backup`]: backup repositories: base backups, the WAL archive, point-in-time restore.
//! - [`bootstrap`]: a new standby from a snapshot of the primary.
//! - [`check`]: `wal-receiver check`, every precondition of a working `follow`.
//! - [`paths`]: checks on file names from the network.
//! - [`pgconf`]: where a new server listens, written into its `postgresql.auto.conf`.
//! - [`follow`]: the streaming loop with group commit and reconnects.
//! - [`metrics`]: what `follow --metrics-listen` exports.
//! - [`restore`]: the `restore_command` helper.
//! - [`status`]: what a store holds.
//! - [`walcheck`]: where valid WAL ends in a segment, for recovery after a crash.
//! - [`walread`]: reading WAL back out of a store while it is written.
//! - [`serve`]: PostgreSQL's streaming replication protocol, served to a standby from the store.

pub mod access;
pub mod backup;
pub mod bootstrap;
pub mod check;
pub mod follow;
pub mod metrics;
pub mod paths;
pub mod pgconf;
pub mod restore;
pub mod retention;
pub mod sealed;
pub mod serve;
pub mod status;
pub mod store;
pub mod walcheck;
pub mod walread;

/// Exit codes of wal-receiver. They are part of its interface (see the README).
pub mod exit {
    /// Any other error.
    pub const ERROR: u8 = 1;
    /// Bad command line.
    pub const USAGE: u8 = 2;
    /// The primary no longer has the WAL this receiver needs: bootstrap again.
    pub const WAL_GONE: u8 = 3;
    /// The sender's cluster does not match the store (system identifier, segment size,
    /// timeline) or the sender refused this receiver.
    pub const MISMATCH: u8 = 4;
    /// The store is corrupt or inconsistent (e.g. a damaged state file).
    pub const STORE_CORRUPT: u8 = 5;
    /// Another wal-receiver holds the store's lock.
    pub const STORE_LOCKED: u8 = 6;
    /// A write or fsync to the store failed; nothing unsynced was acknowledged.
    pub const DISK: u8 = 7;
    /// `bootstrap` was given a non-empty directory that holds no unfinished bootstrap.
    pub const TARGET_NOT_EMPTY: u8 = 8;
    /// TLS or identity refused: a certificate was rejected by either side, one side does
    /// not speak TLS, or the receiver's certificate does not carry its name.
    pub const AUTH: u8 = 9;
    /// The sender sent something no correct sender sends, such as an unsafe file name in a
    /// snapshot. Nothing was written outside the target.
    pub const PROTOCOL: u8 = 10;
    /// The store holds WAL past the point where the sender's timeline forked from it: two
    /// histories diverged. Bootstrap this receiver again.
    pub const DIVERGED: u8 = 11;
    /// The sender cannot use its PostgreSQL server as configured (authentication, a role,
    /// a database, a grant, a setting such as wal_level): retrying cannot help. The message
    /// names the fix.
    pub const SETUP: u8 = 12;
    /// A WAL store or repository is open to other users (group or world permissions,
    /// without `--allow-group-access`), or belongs to another OS user than the one writing
    /// into it. The message names the fix.
    pub const PERMISSIONS: u8 = 13;
    /// `check` found a failing check (`check --nagios` exits with Nagios' codes instead:
    /// 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN).
    pub const CHECK_FAILED: u8 = walship_common::check::EXIT_CHECK_FAILED;
}

/// An error that ends the process with a specific exit code instead of a retry.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Fatal {
    pub code: u8,
    pub message: String,
}
