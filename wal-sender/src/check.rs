//! `wal-sender check`: every precondition of a working sender, each reported as OK or as a
//! failure with its fix (see [`walship_common::check`] for the report and its exit codes).
//!
//! It takes the flags of `serve` and checks, in order: the SQL session that snapshots use
//! and, through it, the role (`REPLICATION`), `wal_level`, free wal senders and replication
//! slots, `max_slot_wal_keep_size`, the grants and the data directory snapshots need; the
//! replication connection; the TLS files (loadable, the key matching the certificate,
//! validity dates); the listen address (free, or held by a running wal-sender), and that of
//! `--metrics-listen`. The SQL
//! session runs first so that the replication connection of the check itself is not counted
//! among the wal senders in use. Nothing is changed on the primary: no slot is created.

use std::net::ToSocketAddrs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use tokio::io::AsyncWriteExt;
use walship_common::check::{certificate_dates, key_permissions, metrics_address, Report};
use walship_common::conninfo::Settings;
use walship_common::frame::{FrameEncoder, FrameReader};
use walship_common::pgclient::{self, SetupError};
use walship_common::protocol::{ErrorCode, Message, Mode, PROTOCOL_VERSION};
use walship_common::tls;

use crate::pgconn::ReplConn;
use crate::snapshot;

/// The application_name of the check's connections, as the server's log shows it.
const APPLICATION_NAME: &str = "walship_sender_check";
/// How long the probe of an address in use waits for an answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// What `check` looks at: the flags of `serve` that concern the set-up.
pub struct CheckConfig {
    pub pg: Settings,
    pub listen: String,
    pub pgdata: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    pub insecure_listen: bool,
    pub metrics_listen: Option<String>,
}

/// What went wrong with a connection to PostgreSQL, and what to do about it.
fn pg_problem(e: &anyhow::Error) -> (String, String) {
    let text = format!("{e:#}");
    let no_password = e
        .chain()
        .any(|c| matches!(c.downcast_ref(), Some(SetupError::NoPassword { .. })));
    let fix = if no_password {
        "put the password in the password file of the user running wal-sender (~/.pgpass, or PGPASSFILE or passfile=, mode 0600) or in PGPASSWORD; see the README".to_owned()
    } else {
        match pgclient::setup_problem(e.as_ref()) {
            Some("") => "as the message says (a certificate, a key or sslmode)".to_owned(),
            Some(fix) => fix.to_owned(),
            None => "check that PostgreSQL runs and listens at the host and port of --pg-conn, and that this host may reach it; a server that is starting will accept soon".to_owned(),
        }
    };
    (text, fix)
}

/// The settings and counts the SQL session reads.
struct Primary {
    user: String,
    replication: bool,
    wal_level: String,
    max_wal_senders: i64,
    wal_senders: i64,
    max_slots: i64,
    slots: i64,
    walship_slots: Vec<String>,
    max_slot_wal_keep_size: String,
    in_recovery: bool,
}

async fn read_primary(sql: &tokio_postgres::Client) -> Result<Primary> {
    let row = sql
        .query_one(
            "SELECT current_user::text, r.rolreplication OR r.rolsuper, \
                    current_setting('wal_level'), current_setting('max_wal_senders')::int8, \
                    (SELECT count(*) FROM pg_stat_replication), \
                    current_setting('max_replication_slots')::int8, \
                    (SELECT count(*) FROM pg_replication_slots), \
                    (SELECT coalesce(array_agg(slot_name::text ORDER BY slot_name), '{}') \
                       FROM pg_replication_slots WHERE slot_name LIKE 'walship\\_%'), \
                    current_setting('max_slot_wal_keep_size'), pg_is_in_recovery() \
             FROM pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await
        .context("read the role and the replication settings")?;
    Ok(Primary {
        user: row.get(0),
        replication: row.get(1),
        wal_level: row.get(2),
        max_wal_senders: row.get(3),
        wal_senders: row.get(4),
        max_slots: row.get(5),
        slots: row.get(6),
        walship_slots: row.get(7),
        max_slot_wal_keep_size: row.get(8),
        in_recovery: row.get(9),
    })
}

/// Runs every check.
pub async fn check(cfg: &CheckConfig) -> Report {
    let mut r = Report::default();
    let primary = check_sql(&mut r, cfg).await;
    check_replication(&mut r, cfg, primary.as_ref()).await;
    check_tls(&mut r, cfg);
    check_listen(&mut r, cfg).await;
    if let Some(addr) = &cfg.metrics_listen {
        metrics_address(&mut r, addr).await;
    }
    r
}

/// The checks made through the SQL session (`wal_level` aside, which the replication
/// connection can read too).
const SQL_CHECKS: [&str; 6] = [
    "role",
    "max_wal_senders",
    "replication slots",
    "max_slot_wal_keep_size",
    "snapshot grants",
    "data directory",
];

/// The SQL session, and what it can tell: the role, the settings, the grants, the data
/// directory. Returns what it read, for the checks that follow.
async fn check_sql(r: &mut Report, cfg: &CheckConfig) -> Option<Primary> {
    const NAME: &str = "sql session";
    let (sql, conn) = match pgclient::connect_sql(
        &cfg.pg,
        snapshot::DEFAULT_DBNAME,
        Some(APPLICATION_NAME),
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            let (text, fix) = pg_problem(&anyhow::Error::from(e));
            r.fail(NAME, text, fix);
            for name in SQL_CHECKS {
                r.skip(name, "not checked: the SQL session failed");
            }
            return None;
        }
    };
    let dbname = cfg.pg.dbname.as_deref().unwrap_or(snapshot::DEFAULT_DBNAME);
    let primary = match read_primary(&sql).await {
        Ok(p) => p,
        Err(e) => {
            r.fail(
                NAME,
                format!("connected, but {e:#}"),
                "connect with a role that may read pg_settings and pg_roles (every role may, unless they were revoked)",
            );
            return None;
        }
    };
    r.ok(
        NAME,
        format!(
            "connected to database {dbname} as {} ({})",
            primary.user, cfg.pg
        ),
    );
    let p = &primary;
    if p.replication {
        r.ok("role", format!("{} has REPLICATION", p.user));
    } else {
        r.fail(
            "role",
            format!("{} lacks the REPLICATION attribute", p.user),
            format!("ALTER ROLE {} REPLICATION;", quote_ident(&p.user)),
        );
    }
    if p.wal_level == "minimal" {
        r.fail(
            "wal_level",
            "minimal: the primary keeps no WAL for replication",
            "set wal_level = replica in postgresql.conf and restart PostgreSQL",
        );
    } else {
        r.ok("wal_level", p.wal_level.clone());
    }
    let free_senders = p.max_wal_senders - p.wal_senders;
    if free_senders <= 0 {
        r.fail(
            "max_wal_senders",
            format!(
                "{} of {} wal senders in use: none free for a receiver, a bootstrap or a backup",
                p.wal_senders, p.max_wal_senders
            ),
            "raise max_wal_senders (each receiver needs one, and one more while it bootstraps or backs up; it needs wal_level = replica) and restart PostgreSQL",
        );
    } else {
        r.ok(
            "max_wal_senders",
            format!(
                "{} of {} in use, {free_senders} free",
                p.wal_senders, p.max_wal_senders
            ),
        );
    }
    let free_slots = p.max_slots - p.slots;
    let walship = if p.walship_slots.is_empty() {
        "none of them walship's".to_owned()
    } else {
        format!("walship's: {}", p.walship_slots.join(", "))
    };
    let slots = format!("{} of {} slots used ({walship})", p.slots, p.max_slots);
    let more_slots = "raise max_replication_slots and restart PostgreSQL, or drop slots no longer used (SELECT pg_drop_replication_slot('NAME')): each receiver needs its slot walship_NAME";
    if p.max_slots == 0 || (free_slots <= 0 && p.walship_slots.is_empty()) {
        r.fail(
            "replication slots",
            format!("{slots}: no free slot for a receiver"),
            more_slots,
        );
    } else if free_slots <= 0 {
        r.warn(
            "replication slots",
            format!(
                "{slots}: the receivers that have a slot can follow, but a new receiver cannot"
            ),
            more_slots,
        );
    } else {
        r.ok("replication slots", format!("{slots}, {free_slots} free"));
    }
    if p.max_slot_wal_keep_size == "-1" {
        r.warn(
            "max_slot_wal_keep_size",
            "-1: a receiver that stays away holds WAL on the primary without bound, until its disk is full",
            "set max_slot_wal_keep_size (e.g. 50GB) to cap it; a receiver that falls further behind loses its slot and must be bootstrapped again",
        );
    } else {
        r.ok(
            "max_slot_wal_keep_size",
            format!(
                "{}: a receiver further behind loses its slot and must be bootstrapped again",
                p.max_slot_wal_keep_size
            ),
        );
    }
    if p.in_recovery {
        r.warn(
            "primary",
            "the server is a standby (in recovery): receivers follow it only when no sender of a primary is given to them",
            "point --pg-conn at the primary, unless this sender is meant for a node that may become the primary",
        );
    }
    check_snapshots(r, cfg, &sql, &p.user).await;
    drop(sql);
    let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
    Some(primary)
}

/// The grants and the data directory that `bootstrap` and `backup` need. Following works
/// without them, so they are warnings, as at `serve`'s start-up.
async fn check_snapshots(
    r: &mut Report,
    cfg: &CheckConfig,
    sql: &tokio_postgres::Client,
    user: &str,
) {
    let grants = sql
        .query_one(
            "SELECT has_function_privilege('pg_backup_start(text, boolean)', 'EXECUTE'), \
                    has_function_privilege('pg_backup_stop(boolean)', 'EXECUTE')",
            &[],
        )
        .await
        .map(|row| (row.get::<_, bool>(0), row.get::<_, bool>(1)));
    let role = quote_ident(user);
    match grants {
        Ok((true, true)) => r.ok(
            "snapshot grants",
            format!("{user} may run pg_backup_start and pg_backup_stop"),
        ),
        Ok((start, stop)) => {
            let mut missing = Vec::new();
            if !start {
                missing.push(format!(
                    "GRANT EXECUTE ON FUNCTION pg_backup_start(text, boolean) TO {role};"
                ));
            }
            if !stop {
                missing.push(format!(
                    "GRANT EXECUTE ON FUNCTION pg_backup_stop(boolean) TO {role};"
                ));
            }
            r.warn(
                "snapshot grants",
                format!("{user} may not run pg_backup_start and pg_backup_stop: bootstrap and backup will fail (following works)"),
                missing.join(" "),
            );
        }
        Err(e) => r.warn(
            "snapshot grants",
            format!("cannot read the role's grants: {e}"),
            "run check as the role --pg-conn names",
        ),
    }
    let dir = match &cfg.pgdata {
        Some(d) => d.clone(),
        None => match sql.query_one("SHOW data_directory", &[]).await {
            Ok(row) => PathBuf::from(row.get::<_, String>(0)),
            Err(e) => {
                r.warn(
                    "data directory",
                    format!("cannot read the server's data_directory setting: {}", e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_owned())),
                    format!("GRANT pg_read_all_settings TO {role}; or give --pgdata (bootstrap and backup need the data directory)"),
                );
                return;
            }
        },
    };
    data_directory(r, &dir);
}

/// Whether snapshots can read the data directory: its `global/pg_control` opens for reading.
fn data_directory(r: &mut Report, dir: &Path) {
    let control = dir.join(snapshot::PG_CONTROL);
    match std::fs::File::open(&control) {
        Ok(_) => r.ok(
            "data directory",
            format!("{} is readable for snapshots", dir.display()),
        ),
        Err(e) => r.warn(
            "data directory",
            format!(
                "cannot read {}: {e}: bootstrap and backup will fail (following works)",
                control.display()
            ),
            "run wal-sender on the primary's host as the OS user that owns the data directory (postgres), or give --pgdata",
        ),
    }
}

/// The replication connection: authentication and `REPLICATION`, and, when the SQL session
/// could not tell, `wal_level`.
async fn check_replication(r: &mut Report, cfg: &CheckConfig, primary: Option<&Primary>) {
    const NAME: &str = "replication connection";
    let mut c = match ReplConn::connect(&cfg.pg, APPLICATION_NAME).await {
        Ok(c) => c,
        Err(e) => {
            let (text, fix) = pg_problem(&anyhow::Error::from(e));
            r.fail(NAME, text, fix);
            if primary.is_none() {
                r.skip("wal_level", "not checked: neither connection succeeded");
            }
            return;
        }
    };
    match c.identify_system().await {
        Ok(sys) => r.ok(
            NAME,
            format!(
                "PostgreSQL {}, system {}, timeline {}, WAL at {}",
                c.server_version, sys.system_id, sys.timeline, sys.flush_lsn
            ),
        ),
        Err(e) => r.fail(
            NAME,
            format!("connected, but IDENTIFY_SYSTEM failed: {e:#}"),
            "check the server's log",
        ),
    }
    if primary.is_none() {
        match c.show("wal_level").await {
            Ok(level) if level == "minimal" => r.fail(
                "wal_level",
                "minimal: the primary keeps no WAL for replication",
                "set wal_level = replica in postgresql.conf and restart PostgreSQL",
            ),
            Ok(level) => r.ok("wal_level", level),
            Err(e) => r.skip("wal_level", format!("cannot read it: {e:#}")),
        }
    }
    c.terminate().await;
}

/// The TLS files, or, without TLS, whether `serve` would listen there in plaintext.
fn check_tls(r: &mut Report, cfg: &CheckConfig) {
    let now = SystemTime::now();
    let (Some(cert), Some(key)) = (&cfg.tls_cert, &cfg.tls_key) else {
        let addrs: Vec<_> = match cfg.listen.to_socket_addrs() {
            Ok(a) => a.collect(),
            Err(_) => {
                r.skip("tls", "off; not checked further: --listen does not resolve");
                return;
            }
        };
        let public = addrs.iter().find(|a| !a.ip().is_loopback());
        match public {
            Some(a) if cfg.insecure_listen => r.warn(
                "tls",
                format!("off, on the non-loopback address {a} (--insecure-listen): WAL and snapshots travel unencrypted, and receivers are not authenticated"),
                "give --tls-cert and --tls-key, and --tls-client-ca to authenticate receivers",
            ),
            Some(a) => r.fail(
                "tls",
                format!("off, and {a} is not a loopback address: serve refuses to listen there"),
                "give --tls-cert and --tls-key (and --tls-client-ca), listen on a loopback address, or accept the risk with --insecure-listen",
            ),
            None => r.ok("tls", "off: plaintext, on loopback only"),
        }
        return;
    };
    match tls::server_config(cert, key, cfg.tls_client_ca.as_deref()) {
        Ok(_) => r.ok(
            "tls files",
            format!(
                "{} and its key {} load and match{}",
                cert.display(),
                key.display(),
                if cfg.tls_client_ca.is_some() {
                    "; client certificates are required"
                } else {
                    "; client certificates are not required, so anyone who reaches the port can act as any receiver"
                }
            ),
        ),
        Err(e) => r.fail(
            "tls files",
            e.to_string(),
            "give a PEM certificate (chain) and its own private key, readable by this user",
        ),
    }
    certificate_dates(r, "tls certificate", cert, now);
    key_permissions(r, "tls key", key);
    if let Some(ca) = &cfg.tls_client_ca {
        certificate_dates(r, "tls client CA", ca, now);
    }
}

/// Whether `serve` can listen at `--listen`: the address is free, or a wal-sender already
/// listens there (a running sender, which is fine).
async fn check_listen(r: &mut Report, cfg: &CheckConfig) {
    const NAME: &str = "listen";
    let err = match tokio::net::TcpListener::bind(&cfg.listen).await {
        Ok(l) => {
            let at = l.local_addr().map_or(cfg.listen.clone(), |a| a.to_string());
            r.ok(NAME, format!("{at} is free"));
            return;
        }
        Err(e) => e,
    };
    if err.kind() != std::io::ErrorKind::AddrInUse {
        r.fail(
            NAME,
            format!("cannot listen on {}: {err}", cfg.listen),
            "give --listen an address of this host (HOST:PORT) and a port this user may bind",
        );
        return;
    }
    match tokio::time::timeout(PROBE_TIMEOUT, probe_sender(&cfg.listen)).await {
        Ok(Ok(())) => r.ok(
            NAME,
            format!(
                "{} is in use by a running wal-sender (it answered)",
                cfg.listen
            ),
        ),
        _ => r.fail(
            NAME,
            format!(
                "{} is in use by a program that is not a wal-sender",
                cfg.listen
            ),
            "choose another --listen port, or stop the program that holds it",
        ),
    }
}

/// Asks whatever listens at `addr` whether it is a wal-sender: a walship Hello with a
/// name no sender accepts, in plaintext. A wal-sender answers with a walship error (the
/// name is refused, or TLS is required) before it opens any connection to PostgreSQL.
async fn probe_sender(addr: &str) -> Result<()> {
    let sock = tokio::net::TcpStream::connect(addr).await?;
    let (rd, mut wr) = tls::split(sock);
    let mut buf = Vec::new();
    Message::Hello {
        version: PROTOCOL_VERSION,
        name: "wal-sender-check".into(),
        mode: Mode::Follow,
    }
    .encode(&mut FrameEncoder::new(1)?, &mut buf)?;
    wr.write_all(&buf).await?;
    let frame = FrameReader::new(rd)?
        .read_frame()
        .await?
        .context("closed without an answer")?;
    match Message::decode(&frame)? {
        Message::Error {
            code: ErrorCode::BadName | ErrorCode::Auth,
            ..
        } => Ok(()),
        other => anyhow::bail!("unexpected answer {:?}", other.kind()),
    }
}

/// `name` as an SQL identifier.
fn quote_ident(name: &str) -> String {
    if !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit()
    {
        name.to_owned()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn identifiers_are_quoted_when_they_must_be() {
        assert_eq!(super::quote_ident("walship"), "walship");
        assert_eq!(super::quote_ident("Wal Ship"), "\"Wal Ship\"");
        assert_eq!(super::quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(super::quote_ident("1x"), "\"1x\"");
    }
}
