//! `wal-receiver check`: every precondition of a working `follow`, each reported as OK or
//! as a failure with its fix (see [`walship_common::check`] for the report and its exit
//! codes).
//!
//! It takes the flags of `follow` (and `--repo`) and checks: the receiver name; the TLS
//! files (loadable, the key matching the certificate, validity dates, the name in the
//! certificate); each sender (TCP, TLS and the walship handshake up to the sender's
//! `ServerInfo`, which proves that the sender answers, reaches its PostgreSQL and accepts
//! this receiver's name, without asking for a stream, so no slot is created or moved); that
//! the store holds the sender's cluster; the store's owner and permissions; the disk space
//! against the retention setting; the standby socket of `--serve-standby`; and, for a
//! backup repository, its permissions and the WAL chain from the newest backup to the end
//! of the archive; and the address of `--metrics-listen`. Nothing is created or changed.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use walship_common::check::{
    certificate_dates, certificate_names, key_permissions, metrics_address, Report,
};
use walship_common::protocol::{validate_name, ErrorCode, Message, Mode};
use walship_common::{tls, WalSegSize};

use crate::access::{self, Use, Verdict};
use crate::follow::{self, TlsClient};
use crate::retention::{self, KeepWal};
use crate::serve::ServeAddr;
use crate::store::{self, StoreFile};
use crate::{backup, exit, Fatal};

/// The longest path of a Unix socket (`sun_path` holds 108 bytes with the final NUL).
const MAX_SOCKET_PATH: usize = 107;

/// What `check` looks at: the flags of `follow`, and a repository.
pub struct CheckConfig {
    pub senders: Vec<String>,
    pub name: String,
    pub wal_dir: PathBuf,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_server_name: Option<String>,
    pub serve_standby: Option<String>,
    pub serve_standby_port: u16,
    pub keep_wal: Option<KeepWal>,
    /// A backup repository to check; by default the one `wal_dir` is the archive of.
    pub repo: Option<PathBuf>,
    pub metrics_listen: Option<String>,
}

/// Runs every check.
pub async fn check(cfg: &CheckConfig) -> Report {
    let mut r = Report::default();
    let name_ok = match validate_name(&cfg.name) {
        Ok(()) => {
            r.ok("name", format!("{} (slot walship_{})", cfg.name, cfg.name));
            true
        }
        Err(m) => {
            r.fail(
                "name",
                m,
                "give --name of 1 to 55 characters among a-z, 0-9 and _",
            );
            false
        }
    };
    let tls = check_tls(&mut r, cfg);
    if name_ok {
        check_senders(&mut r, cfg, tls.as_ref()).await;
    } else {
        r.skip("sender", "not asked: the name is not valid");
    }
    check_store(&mut r, cfg);
    check_disk(&mut r, cfg);
    check_serve_standby(&mut r, cfg);
    check_repository(&mut r, cfg);
    if let Some(addr) = &cfg.metrics_listen {
        metrics_address(&mut r, addr).await;
    }
    r
}

/// The TLS files; returns the client configuration when they load.
fn check_tls(r: &mut Report, cfg: &CheckConfig) -> Option<TlsClient> {
    let Some(ca) = &cfg.tls_ca else {
        r.ok(
            "tls",
            "off: the sender must listen without TLS (on loopback, or with --insecure-listen)",
        );
        return None;
    };
    let now = SystemTime::now();
    let identity = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
        _ => None,
    };
    let config = match tls::client_config(ca, identity) {
        Ok(c) => {
            r.ok(
                "tls files",
                match identity {
                    Some((c, k)) => format!(
                        "CA {}, certificate {} and its key {} load and match",
                        ca.display(),
                        c.display(),
                        k.display()
                    ),
                    None => format!(
                        "CA {} loads; no client certificate (a sender that requires one refuses this receiver)",
                        ca.display()
                    ),
                },
            );
            Some(c)
        }
        Err(e) => {
            r.fail(
                "tls files",
                e.to_string(),
                "give PEM files readable by this user: --tls-ca the CA of the sender's certificate, --tls-cert and --tls-key a certificate and its own key",
            );
            None
        }
    };
    certificate_dates(r, "tls CA", ca, now);
    if let Some(cert) = &cfg.tls_cert {
        certificate_dates(r, "tls certificate", cert, now);
        if let Some(key) = &cfg.tls_key {
            key_permissions(r, "tls key", key);
        }
        if let Ok(certs) = tls::load_certs("certificate", cert) {
            let names = certs
                .first()
                .map(|c| certificate_names(c.as_ref()))
                .unwrap_or_default();
            if names.contains(&cfg.name) {
                r.ok(
                    "tls certificate name",
                    format!("the certificate carries the name {}", cfg.name),
                );
            } else {
                r.fail(
                    "tls certificate name",
                    format!(
                        "the certificate carries the names {names:?}, not {:?}: a sender that requires client certificates refuses this receiver",
                        cfg.name
                    ),
                    format!(
                        "issue a certificate whose common name or a DNS subject alternative name is {}",
                        cfg.name
                    ),
                );
            }
        }
    }
    config.map(|config| TlsClient {
        config,
        server_name: cfg.tls_server_name.clone(),
    })
}

/// What to do about a sender that could not be asked, by the exit code `follow` would give.
fn sender_fix(e: &anyhow::Error) -> &'static str {
    match e.downcast_ref::<Fatal>().map(|f| f.code) {
        Some(exit::AUTH) => "as the message says: the CA, certificate and key given here (--tls-ca, --tls-cert, --tls-key, --tls-server-name) must fit the sender's (--tls-cert, --tls-client-ca)",
        Some(exit::SETUP) => "fix the primary's side as the message says; 'wal-sender check' on the primary's host checks all of it",
        Some(exit::MISMATCH) => "as the message says: run the same walship version on both hosts, and a name the sender accepts",
        Some(exit::USAGE) => "give --tls-server-name, the name the sender's certificate carries",
        _ => "check that 'wal-sender serve' runs there, that --sender names its --listen address, and that this host may reach it (a firewall?)",
    }
}

/// Each sender: the handshake, up to its `ServerInfo`; then, for the first primary that
/// answers, that the store holds its cluster.
async fn check_senders(r: &mut Report, cfg: &CheckConfig, tls: Option<&TlsClient>) {
    if cfg.tls_ca.is_some() && tls.is_none() {
        r.skip("sender", "not asked: the TLS files do not load");
        return;
    }
    let mut compared = false;
    for sender in &cfg.senders {
        let check_name = format!("sender {sender}");
        match follow::connect(sender, &cfg.name, Mode::Follow, tls).await {
            Ok(mut conn) => {
                let i = &conn.info;
                r.ok(
                    &check_name,
                    format!(
                        "answers{}: PostgreSQL {} {}, system {}, timeline {}, WAL at {}; it accepts the receiver name {}",
                        if tls.is_some() { " over TLS" } else { "" },
                        i.pg_version,
                        if i.in_recovery { "standby" } else { "primary" },
                        i.system_id,
                        i.timeline.0,
                        i.flush_lsn,
                        cfg.name
                    ),
                );
                if !compared && !i.in_recovery {
                    compared = true;
                    store_matches(r, cfg, &conn.info);
                }
                // End the handshake: no stream is asked for, so no slot is touched.
                let _ = conn
                    .link
                    .send(&Message::Error {
                        code: ErrorCode::Other,
                        message: "wal-receiver check: handshake only, no stream".into(),
                    })
                    .await;
            }
            Err(e) => r.fail(&check_name, format!("{e:#}"), sender_fix(&e)),
        }
    }
}

/// Whether the store (if it holds WAL) belongs to the sender's cluster.
fn store_matches(r: &mut Report, cfg: &CheckConfig, info: &follow::ServerInfo) {
    let Ok(Some(st)) = store::read_state(&cfg.wal_dir) else {
        return;
    };
    match follow::check_same_cluster(&st, info, &cfg.wal_dir) {
        Ok(()) => r.ok(
            "store cluster",
            format!(
                "the store holds WAL of the sender's cluster (system {})",
                st.system_id
            ),
        ),
        Err(e) => r.fail(
            "store cluster",
            format!("{e:#}"),
            "give this sender another --wal-dir, or follow the sender of the store's cluster",
        ),
    }
}

/// A directory's owner, mode, and what `follow` (or `backup`) will say about it.
fn check_dir(r: &mut Report, check_name: &str, dir: &Path, what: &str) -> bool {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => m,
        Ok(_) => {
            r.fail(
                check_name,
                format!("{} is not a directory", dir.display()),
                format!("give the {what} as a directory"),
            );
            return false;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            r.ok(
                check_name,
                format!(
                    "{} does not exist yet: it is created private ({:04o})",
                    dir.display(),
                    access::dir_mode()
                ),
            );
            return false;
        }
        Err(e) => {
            r.fail(
                check_name,
                format!("cannot read {}: {e}", dir.display()),
                "run wal-receiver as the OS user that owns it",
            );
            return false;
        }
    };
    let mode = meta.permissions().mode() & 0o777;
    let owner = crate::access::user_label(nix::unistd::Uid::from_raw(meta.uid()));
    match access::assess(dir, what, Use::Write) {
        Verdict::Fine => {
            r.ok(
                check_name,
                format!("{}: owner {owner}, mode {mode:04o}", dir.display()),
            );
            true
        }
        Verdict::EmptyOpen { mode } => {
            r.ok(
                check_name,
                format!(
                    "{}: empty, mode {mode:04o}: made {:04o} when first used",
                    dir.display(),
                    access::dir_mode()
                ),
            );
            true
        }
        Verdict::Refused(f) => {
            let (detail, fix) = match f.message.split_once(" Fix it with: ") {
                Some((d, fix)) => (d.to_owned(), fix.to_owned()),
                None => (
                    f.message.clone(),
                    "run wal-receiver as the OS user that owns it, or chown it to that user".into(),
                ),
            };
            r.fail(check_name, detail, fix);
            false
        }
    }
}

/// The store: owner and permissions, its state, and whether a `follow` runs on it.
fn check_store(r: &mut Report, cfg: &CheckConfig) {
    const NAME: &str = "store";
    if !check_dir(r, NAME, &cfg.wal_dir, "WAL store") {
        return;
    }
    match store::read_state(&cfg.wal_dir) {
        Ok(Some(st)) => r.ok(
            "store state",
            format!(
                "WAL of system {} on timeline {} through {}{}",
                st.system_id,
                st.timeline.0,
                st.flush_lsn,
                if store::writer_running(&cfg.wal_dir) {
                    "; a follow is running on it"
                } else {
                    "; no follow is running on it"
                }
            ),
        ),
        Ok(None) => r.ok("store state", "no WAL yet: follow starts it"),
        Err(e) => r.fail(
            "store state",
            e.to_string(),
            "the store cannot be trusted: move it aside and bootstrap this receiver again (or copy the damaged files from another store)",
        ),
    }
}

/// The bytes of the files in `dir`, and the segment size its state records (else 16 MiB).
fn store_usage(dir: &Path) -> (u64, u64) {
    let seg = store::read_recorded_state(dir)
        .ok()
        .flatten()
        .map_or(WalSegSize::DEFAULT, |s| s.seg_size);
    let held = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| StoreFile::parse(&e.file_name().to_string_lossy(), seg).is_some())
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    (held, seg.bytes())
}

/// Free bytes on the file system of `dir` (or of its nearest existing ancestor).
fn free_bytes(dir: &Path) -> Option<u64> {
    let mut at = std::path::absolute(dir).ok()?;
    while !at.exists() {
        at = at.parent()?.to_owned();
    }
    let s = nix::sys::statvfs::statvfs(&at).ok()?;
    Some(s.blocks_available().saturating_mul(s.fragment_size()))
}

fn size(b: u64) -> String {
    bytesize::ByteSize::b(b).to_string()
}

/// The disk space against what the store keeps.
fn check_disk(r: &mut Report, cfg: &CheckConfig) {
    const NAME: &str = "disk space";
    let Some(free) = free_bytes(&cfg.wal_dir) else {
        r.skip(NAME, "cannot read the file system's free space");
        return;
    };
    let (held, seg) = store_usage(&cfg.wal_dir);
    let room = free + held;
    let retention =
        match retention::resolve(&cfg.wal_dir, cfg.keep_wal, cfg.serve_standby.is_some()) {
            Ok(r) => r,
            Err(m) => {
                r.fail(
                    NAME,
                    m,
                    "drop --keep-wal here: 'wal-receiver prune' trims a repository's archive",
                );
                return;
            }
        };
    let now = format!("{} free, the store holds {}", size(free), size(held));
    match retention.map(|t| (t.keep, t.setting)) {
        None if retention::in_repository(&cfg.wal_dir) => r.ok(
            NAME,
            format!("{now}; a repository's archive keeps what 'wal-receiver prune' leaves"),
        ),
        None => r.warn(
            NAME,
            format!("{now}; every segment is kept (no --keep-wal): the store grows with the primary's WAL until the disk is full"),
            "give --keep-wal SIZE or DURATION covering what the standby may lag behind (with --serve-standby the default is the smaller of 10% of the file system and 16 GiB)",
        ),
        Some((KeepWal::Size(limit), setting)) => {
            // The limit applies to sealed files; the segment being written and one sealed
            // beyond the limit come on top.
            let needed = limit.saturating_add(2 * seg);
            if room < needed {
                r.fail(
                    NAME,
                    format!("{now}; {setting} needs up to {} (the limit and two segments)", size(needed)),
                    format!("free {} on the store's file system, or lower --keep-wal", size(needed - room)),
                );
            } else {
                r.ok(NAME, format!("{now}; {setting} fits, with {} to spare", size(room - needed)));
            }
        }
        Some((_, setting)) => r.ok(
            NAME,
            format!("{now}; {setting}: an age limit bounds the store by the primary's WAL rate over that time"),
        ),
    }
}

/// The standby's socket (or loopback address) of `--serve-standby`.
fn check_serve_standby(r: &mut Report, cfg: &CheckConfig) {
    const NAME: &str = "serve-standby";
    let Some(s) = &cfg.serve_standby else {
        return;
    };
    let addr = match ServeAddr::parse(s, cfg.serve_standby_port) {
        Ok(a) => a,
        Err(m) => {
            r.fail(
                NAME,
                m,
                "give an absolute socket directory, or a loopback IP:PORT",
            );
            return;
        }
    };
    let running = store::writer_running(&cfg.wal_dir);
    match &addr {
        ServeAddr::Unix { dir, .. } => {
            let path = addr.to_string();
            if path.len() > MAX_SOCKET_PATH {
                r.fail(
                    NAME,
                    format!("the socket path {path} is {} bytes long; a Unix socket's path may have at most {MAX_SOCKET_PATH}", path.len()),
                    "serve the standby in a directory with a shorter path",
                );
                return;
            }
            let own_store = std::path::absolute(dir).ok() == std::path::absolute(&cfg.wal_dir).ok();
            if !dir.exists() {
                if own_store {
                    r.ok(NAME, format!("{path}: in the store, which follow creates"));
                } else {
                    r.fail(
                        NAME,
                        format!("{} does not exist", dir.display()),
                        "create the directory, writable by the user running follow",
                    );
                }
                return;
            }
            use nix::unistd::{access, AccessFlags};
            if access(dir.as_path(), AccessFlags::W_OK | AccessFlags::X_OK).is_err() {
                r.fail(
                    NAME,
                    format!("{} is not writable by this user: the socket cannot be made there", dir.display()),
                    "serve in a directory the user running follow may write (the store, by default)",
                );
                return;
            }
            let sock = PathBuf::from(&path);
            r.ok(
                NAME,
                if sock.exists() && running {
                    format!("{path}: served by the follow running on this store")
                } else {
                    format!("{path}: the directory is writable")
                },
            );
        }
        ServeAddr::Tcp(a) => match std::net::TcpListener::bind(a) {
            Ok(_) => r.ok(NAME, format!("{a} is free (loopback)")),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && running => r.ok(
                NAME,
                format!(
                    "{a} is in use, and a follow runs on this store: presumably it serves there"
                ),
            ),
            Err(e) => r.fail(
                NAME,
                format!("cannot listen on {a}: {e}"),
                "choose another port for --serve-standby, or stop what holds it",
            ),
        },
    }
}

/// A backup repository: `--repo`, or the one the store is the archive of. Its permissions,
/// and the WAL chain from the newest backup's start to the end of the archive.
fn check_repository(r: &mut Report, cfg: &CheckConfig) {
    let repo = match &cfg.repo {
        Some(p) => p.clone(),
        None if retention::in_repository(&cfg.wal_dir) => {
            match std::path::absolute(&cfg.wal_dir)
                .ok()
                .and_then(|d| d.parent().map(Path::to_owned))
            {
                Some(p) => p,
                None => return,
            }
        }
        None => return,
    };
    if !repo.join(backup::BACKUPS_DIR).is_dir() && !repo.join(backup::WAL_DIR).is_dir() {
        r.fail(
            "repository",
            format!(
                "{} is no backup repository (no backups/ and no wal/)",
                repo.display()
            ),
            "give --repo the directory given to 'wal-receiver backup --repo'",
        );
        return;
    }
    if !check_dir(r, "repository", &repo, "backup repository") {
        return;
    }
    const NAME: &str = "wal chain";
    match backup::newest_chain(&repo) {
        Ok(None) => r.warn(
            NAME,
            "no complete backup yet (or no WAL archive): nothing can be restored",
            "run 'wal-receiver backup' (scripts/backup.sh), and keep 'follow --wal-dir REPO/wal' running",
        ),
        Ok(Some(c)) if c.missing.is_empty() => r.ok(
            NAME,
            format!("from backup {}'s start {} to the end of the archive at {}: no segment missing", c.backup, c.from, c.to),
        ),
        Ok(Some(c)) => r.fail(
            NAME,
            format!(
                "{} segment(s) missing between backup {}'s start {} and the end of the archive at {}, first {}: it cannot be restored past the gap",
                c.missing.len(), c.backup, c.from, c.to, c.missing[0]
            ),
            "take a new backup ('wal-receiver backup') with 'follow --wal-dir REPO/wal' running under the same name, and run 'wal-receiver verify'",
        ),
        Err(e) => r.fail(NAME, format!("{e:#}"), "run 'wal-receiver verify' for details"),
    }
}
