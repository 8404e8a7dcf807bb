//! `wal-sender check`, `wal-receiver check` and `wal-sender status` against real
//! PostgreSQL: each broken precondition is reported as a failure that names its fix, a
//! working set-up passes (exit 0; warnings do not fail), `--json` parses, `--nagios` prints
//! one line with Nagios' exit codes, and `status` shows the receivers as the primary sees
//! them.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, Result};
use walship_tests::*;

/// The exit code of `check` when a check failed.
const EXIT_CHECK_FAILED: i32 = 14;

/// Runs a `check` (or `status`) command; returns its exit code and its standard output,
/// with its standard error after a marker line.
fn run(mut c: Command) -> Result<(Option<i32>, String, String)> {
    let out = c.output()?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// `wal-sender check` (or another wal-sender command) with `HOME` at `home` and `env` as
/// the only libpq variables.
fn sender_cmd(home: &Path, env: &[(&str, &str)], args: &[&str]) -> Command {
    let mut c = Command::new(bin("wal-sender"));
    c.args(args).env("HOME", home);
    for v in PG_ENV {
        c.env_remove(v);
    }
    c.envs(env.iter().copied());
    c
}

/// The report line of check `name`, which must be there.
fn line<'a>(out: &'a str, name: &str) -> &'a str {
    out.lines()
        .find(|l| {
            l.get(5..)
                .is_some_and(|rest| rest.starts_with(&format!("{name}:")))
        })
        .unwrap_or_else(|| panic!("no line for check {name:?} in:\n{out}"))
}

/// Asserts that check `name` failed, naming a fix that contains `fix`.
fn assert_fails(out: &str, name: &str, fix: &str) {
    let l = line(out, name);
    assert!(l.starts_with("FAIL "), "{name} did not fail:\n{out}");
    let (_, named) = l
        .split_once(" — fix: ")
        .unwrap_or_else(|| panic!("{name} names no fix:\n{out}"));
    assert!(
        named.contains(fix),
        "{name}'s fix does not say {fix:?}:\n{out}"
    );
}

fn assert_ok(out: &str, name: &str) {
    assert!(
        line(out, name).starts_with("OK   "),
        "{name} is not OK:\n{out}"
    );
}

/// Makes a test key private, as an operator would (the harness writes them 0644).
fn private(key: &Path) -> Result<()> {
    fs::set_permissions(key, fs::Permissions::from_mode(0o600))?;
    Ok(())
}

#[test]
fn sender_check_names_each_failure_with_its_fix() -> Result<()> {
    let dir = TestDir::new("check-sender");
    let pw = password();
    let pg = primary(&dir, &pw)?;
    pg.set_hba(HBA_LOCAL)?;
    let empty = home(&dir, "home")?;
    let base = format!("host={} port={} user=walship", pg.sock.display(), pg.port);
    let listen = format!("127.0.0.1:{}", free_port());
    let env = [("PGPASSWORD", pw.as_str())];
    let check = |env: &[(&str, &str)], extra: &[&str]| {
        let mut args = vec!["check", "--pg-conn", &base, "--listen", &listen];
        args.extend_from_slice(extra);
        run(sender_cmd(&empty, env, &args))
    };

    // The README's set-up passes; max_slot_wal_keep_size = -1 is a warning, which does not
    // fail the check.
    let (code, out, err) = check(&env, &[])?;
    eprintln!("wal-sender check, the README's set-up:\n{out}");
    assert_eq!(code, Some(0), "{out}\n{err}");
    for name in [
        "sql session",
        "role",
        "wal_level",
        "max_wal_senders",
        "replication slots",
        "snapshot grants",
        "data directory",
        "replication connection",
        "tls",
        "listen",
    ] {
        assert_ok(&out, name);
    }
    assert!(
        line(&out, "max_slot_wal_keep_size").starts_with("WARN "),
        "{out}"
    );
    assert!(out.contains("warnings do not fail"), "{out}");
    // Nagios: WARNING, exit 1, one line.
    let (code, out, _) = check(&env, &["--nagios"])?;
    assert_eq!(code, Some(1), "{out}");
    assert_eq!(out.trim().lines().count(), 1, "{out}");
    assert!(out.starts_with("WALSHIP WARNING - "), "{out}");
    assert!(out.contains("max_slot_wal_keep_size"), "{out}");
    // JSON: an array of {name, status, detail, fix}.
    let (code, out, _) = check(&env, &["--json"])?;
    assert_eq!(code, Some(0), "{out}");
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let checks = v.as_array().ok_or_else(|| anyhow!("not an array: {out}"))?;
    assert!(checks.len() >= 10, "{out}");
    for c in checks {
        assert!(c["name"].is_string() && c["detail"].is_string(), "{c}");
        assert!(
            ["ok", "warn", "fail", "skip"].contains(&c["status"].as_str().unwrap_or("")),
            "{c}"
        );
    }
    let keep = checks
        .iter()
        .find(|c| c["name"] == "max_slot_wal_keep_size")
        .ok_or_else(|| anyhow!("no max_slot_wal_keep_size in {out}"))?;
    assert_eq!(keep["status"], "warn");
    assert!(keep["fix"]
        .as_str()
        .unwrap_or("")
        .contains("max_slot_wal_keep_size"));
    // With the cap set, everything is OK, and Nagios says so.
    pg.sql("ALTER SYSTEM SET max_slot_wal_keep_size = '1GB'")?;
    pg.sql("SELECT pg_reload_conf()")?;
    wait_for("max_slot_wal_keep_size to be read", || {
        Ok((pg.sql("SHOW max_slot_wal_keep_size")?.trim() == "1GB").then_some(()))
    })?;
    let (code, out, _) = check(&env, &["--nagios"])?;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.starts_with("WALSHIP OK - ") && out.contains("checks passed"),
        "{out}"
    );

    // An expired certificate.
    let ca = Ca::new(&dir, "ca")?;
    let (cert, key) = ca.issue("expired", "localhost", &["localhost"], true)?;
    private(&key)?;
    let (c, k) = (cert.display().to_string(), key.display().to_string());
    let (code, out, _) = check(&env, &["--tls-cert", &c, "--tls-key", &k])?;
    assert_eq!(code, Some(EXIT_CHECK_FAILED), "{out}");
    assert_fails(&out, "tls certificate", "issue a new certificate");
    assert!(
        line(&out, "tls certificate").contains("expired on 2021-01-01"),
        "{out}"
    );
    assert_ok(&out, "tls files");

    // A wrong password: named, with the fix, and never shown.
    let wrong = "Wrong-Pa55word-given";
    let (code, out, err) = check(&[("PGPASSWORD", wrong)], &[])?;
    eprintln!("wal-sender check, a wrong password:\n{out}");
    assert_eq!(code, Some(EXIT_CHECK_FAILED), "{out}\n{err}");
    assert_fails(&out, "sql session", "password");
    assert_fails(&out, "replication connection", "password");
    assert!(line(&out, "sql session").contains("28P01"), "{out}");
    assert!(!out.contains(wrong) && !err.contains(wrong), "{out}\n{err}");
    assert!(!out.contains(&pw), "{out}");
    assert!(out.contains("FAILED"), "{out}");
    // Nagios: CRITICAL, exit 2, naming the failed checks on one line.
    let (code, out, _) = check(&[("PGPASSWORD", wrong)], &["--nagios"])?;
    assert_eq!(code, Some(2), "{out}");
    assert_eq!(out.trim().lines().count(), 1, "{out}");
    assert!(out.starts_with("WALSHIP CRITICAL - 2 of "), "{out}");
    assert!(
        out.contains("sql session: ") && out.contains("replication connection: "),
        "{out}"
    );

    // No free replication slot: one slot, taken by something else.
    pg.sql("ALTER SYSTEM SET max_replication_slots = 1")?;
    pg.restart()?;
    pg.sql("SELECT pg_create_physical_replication_slot('someone_else')")?;
    let (code, out, _) = check(&env, &[])?;
    assert_eq!(code, Some(EXIT_CHECK_FAILED), "{out}");
    assert_fails(&out, "replication slots", "max_replication_slots");
    assert!(line(&out, "replication slots").contains("1 of 1"), "{out}");
    pg.sql("SELECT pg_drop_replication_slot('someone_else')")?;

    // wal_level = minimal (which needs max_wal_senders = 0).
    pg.sql("ALTER SYSTEM SET wal_level = minimal")?;
    pg.sql("ALTER SYSTEM SET max_wal_senders = 0")?;
    pg.restart()?;
    let (code, out, _) = check(&env, &[])?;
    assert_eq!(code, Some(EXIT_CHECK_FAILED), "{out}");
    assert_fails(&out, "wal_level", "wal_level = replica");
    assert_fails(&out, "max_wal_senders", "max_wal_senders");
    assert_fails(&out, "replication connection", "max_wal_senders");
    assert_ok(&out, "sql session");
    Ok(())
}

/// `--tls-*` arguments of a receiver.
fn receiver_tls(ca: &Path, cert: &Path, key: &Path) -> Vec<String> {
    ["--tls-ca", "--tls-cert", "--tls-key"]
        .iter()
        .zip([ca, cert, key])
        .flat_map(|(f, p)| [f.to_string(), p.display().to_string()])
        .collect()
}

fn receiver_check(args: &[String]) -> Result<(Option<i32>, String, String)> {
    let mut c = Command::new(bin("wal-receiver"));
    c.arg("check").args(args);
    run(c)
}

#[test]
fn a_running_set_up_passes_and_status_shows_its_receiver() -> Result<()> {
    let dir = TestDir::new("check-running");
    let pg = Pg::start_primary(&dir, "primary", "max_slot_wal_keep_size = '1GB'")?;
    let ca = Ca::new(&dir, "ca")?;
    let server = ca.issue("sender", "localhost", &["localhost"], false)?;
    let client = ca.issue("standby1", "standby1", &[], false)?;
    private(&server.1)?;
    private(&client.1)?;
    let (c, k, cca) = (
        server.0.display().to_string(),
        server.1.display().to_string(),
        ca.cert_path.display().to_string(),
    );
    let sender_metrics = format!("127.0.0.1:{}", free_port());
    let tls_flags = [
        "--tls-cert",
        &c,
        "--tls-key",
        &k,
        "--tls-client-ca",
        &cca,
        "--metrics-listen",
        &sender_metrics,
    ];
    let sender = Sender::start_with(&dir, &pg, "sender", &tls_flags)?;
    let port = sender.addr.rsplit_once(':').unwrap().1.to_owned();
    let addr = format!("localhost:{port}");
    let mut rx = Receiver::new(&dir, &addr, "standby1");
    rx.extra = receiver_tls(&ca.cert_path, &client.0, &client.1);
    rx.extra.extend(["--keep-wal".into(), "64MB".into()]);
    let receiver_metrics = format!("127.0.0.1:{}", free_port());
    rx.extra
        .extend(["--metrics-listen".into(), receiver_metrics]);
    rx.spawn()?;
    rx.wait_streaming()?;
    rx.wait_flush(pg.flush_lsn()?)?;

    // The sender's check, with the flags of the running sender: all OK, its address held
    // by that sender.
    let empty = home(&dir, "home")?;
    let conninfo = pg.conninfo();
    let mut args = vec!["check", "--pg-conn", &conninfo, "--listen", &sender.addr];
    args.extend_from_slice(&tls_flags);
    let (code, out, err) = run(sender_cmd(&empty, &[], &args))?;
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(!out.contains("FAIL ") && !out.contains("WARN "), "{out}");
    assert!(line(&out, "listen").contains("running wal-sender"), "{out}");
    for name in ["tls files", "tls certificate", "tls client CA", "tls key"] {
        assert_ok(&out, name);
    }
    assert!(
        line(&out, "metrics-listen").contains("running walship program"),
        "{out}"
    );

    // The receiver's check, with the flags of the running follow.
    let mut follow_args: Vec<String> = ["--sender", &addr, "--name", "standby1", "--wal-dir"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    follow_args.push(rx.wal_dir.display().to_string());
    follow_args.extend(rx.extra.iter().cloned());
    let (code, out, err) = receiver_check(&follow_args)?;
    eprintln!("wal-receiver check, a running follow:\n{out}");
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(!out.contains("FAIL ") && !out.contains("WARN "), "{out}");
    let sender_line = line(&out, &format!("sender {addr}"));
    assert!(sender_line.contains("answers over TLS"), "{out}");
    assert!(
        sender_line.contains("accepts the receiver name standby1"),
        "{out}"
    );
    for name in [
        "name",
        "tls files",
        "tls CA",
        "tls certificate",
        "tls certificate name",
        "store",
        "store state",
        "store cluster",
        "disk space",
    ] {
        assert_ok(&out, name);
    }
    assert!(
        line(&out, "store state").contains("a follow is running"),
        "{out}"
    );
    assert!(
        line(&out, "metrics-listen").contains("running walship program"),
        "{out}"
    );
    let (code, out, _) = receiver_check(&[follow_args.clone(), vec!["--nagios".into()]].concat())?;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.starts_with("WALSHIP OK - "), "{out}");
    let (code, out, _) = receiver_check(&[follow_args.clone(), vec!["--json".into()]].concat())?;
    assert_eq!(code, Some(0), "{out}");
    let v: serde_json::Value = serde_json::from_str(&out)?;
    assert!(
        v.as_array()
            .is_some_and(|a| a.iter().all(|c| c["status"] == "ok")),
        "{out}"
    );
    assert!(rx.proc.is_running(), "the check disturbed the receiver");

    // A standby served from the store passes; a limit the disk cannot hold fails.
    let wal_dir = rx.wal_dir.display().to_string();
    let (code, out, _) = receiver_check(
        &[
            follow_args.clone(),
            vec!["--serve-standby".into(), wal_dir.clone()],
        ]
        .concat(),
    )?;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        line(&out, "serve-standby").contains(".s.PGSQL.5432"),
        "{out}"
    );
    let nowhere = dir.join("no-such-dir").display().to_string();
    let mut too_much: Vec<String> = [
        "--sender",
        &addr,
        "--name",
        "standby1",
        "--wal-dir",
        &wal_dir,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    too_much.extend(receiver_tls(&ca.cert_path, &client.0, &client.1));
    too_much.extend(["--keep-wal".into(), "1000TB".into()]);
    too_much.extend(["--serve-standby".into(), nowhere]);
    let (code, out, _) = receiver_check(&too_much)?;
    assert_eq!(code, Some(EXIT_CHECK_FAILED), "{out}");
    assert_fails(&out, "disk space", "lower --keep-wal");
    assert_fails(&out, "serve-standby", "create the directory");

    // An expired client certificate.
    let expired = ca.issue("standby1-expired", "standby1", &[], true)?;
    private(&expired.1)?;
    let mut args = ["--sender", &addr, "--name", "standby1", "--wal-dir"]
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>();
    args.push(rx.wal_dir.display().to_string());
    args.extend(receiver_tls(&ca.cert_path, &expired.0, &expired.1));
    let (code, out, _) = receiver_check(&args)?;
    assert_eq!(code, Some(EXIT_CHECK_FAILED), "{out}");
    assert_fails(&out, "tls certificate", "issue a new certificate");
    assert!(line(&out, "tls certificate").contains("expired"), "{out}");
    // The sender refuses it too, and the check says which side to fix.
    assert!(
        line(&out, &format!("sender {addr}")).starts_with("FAIL "),
        "{out}"
    );
    let (code, out, _) = receiver_check(&[args, vec!["--nagios".into()]].concat())?;
    assert_eq!(code, Some(2), "{out}");
    assert!(out.starts_with("WALSHIP CRITICAL - 2 of "), "{out}");

    // A world-readable store.
    fs::set_permissions(&rx.wal_dir, fs::Permissions::from_mode(0o755))?;
    let (code, out, _) = receiver_check(&follow_args)?;
    fs::set_permissions(&rx.wal_dir, fs::Permissions::from_mode(0o700))?;
    assert_eq!(code, Some(EXIT_CHECK_FAILED), "{out}");
    assert_fails(&out, "store", "chmod -R go-rwx");
    assert!(
        line(&out, "store").contains("open to other users (mode 0755)"),
        "{out}"
    );

    // wal-sender status: the receiver, connected, with what it acknowledged.
    let status = |json: bool| {
        let mut args = vec!["status", "--pg-conn", &conninfo];
        if json {
            args.push("--json");
        }
        run(sender_cmd(&empty, &[], &args))
    };
    let (code, out, err) = status(true)?;
    assert_eq!(code, Some(0), "{out}\n{err}");
    let st: serde_json::Value = serde_json::from_str(&out)?;
    let r = &st["receivers"][0];
    assert_eq!(r["name"], "standby1", "{out}");
    assert_eq!(r["slot"], "walship_standby1", "{out}");
    assert_eq!(r["connected"], true, "{out}");
    assert_eq!(r["state"], "streaming", "{out}");
    let flush: walship_common::Lsn = r["flush_lsn"]
        .as_str()
        .ok_or_else(|| anyhow!("no flush_lsn: {out}"))?
        .parse()?;
    assert!(flush >= rx.flush_lsn()?, "{out}");
    assert!(r["lag_bytes"].as_i64().is_some_and(|l| l >= 0), "{out}");
    assert_eq!(r["wal_status"], "reserved", "{out}");
    assert!(r["restart_lsn"].is_string(), "{out}");
    assert!(r["safe_wal_size"].is_i64(), "{out}");
    assert_eq!(st["in_recovery"], false, "{out}");
    let (_, text, _) = status(false)?;
    eprintln!("wal-sender status:\n{text}");
    assert!(
        text.contains("standby1") && text.contains("yes (streaming"),
        "{text}"
    );

    // A role without pg_read_all_stats sees that the receiver is connected, but PostgreSQL
    // hides its positions; with it, it sees them.
    pg.sql("CREATE ROLE watcher LOGIN")?;
    let watcher = format!("host={} port={} user=watcher", pg.sock.display(), pg.port);
    let as_watcher = || -> Result<serde_json::Value> {
        let (code, out, err) = run(sender_cmd(
            &empty,
            &[],
            &["status", "--pg-conn", &watcher, "--json"],
        ))?;
        assert_eq!(code, Some(0), "{out}\n{err}");
        Ok(serde_json::from_str(&out)?)
    };
    let st = as_watcher()?;
    assert_eq!(st["receivers"][0]["connected"], true, "{st}");
    assert!(st["receivers"][0]["flush_lsn"].is_null(), "{st}");
    pg.sql("GRANT pg_read_all_stats TO watcher")?;
    let st = as_watcher()?;
    assert!(st["receivers"][0]["flush_lsn"].is_string(), "{st}");

    // And once the receiver stops: still listed, not connected, its slot still there.
    rx.proc.term();
    pg.wait_slot_released("walship_standby1")?;
    let (code, out, _) = status(true)?;
    assert_eq!(code, Some(0), "{out}");
    let st: serde_json::Value = serde_json::from_str(&out)?;
    let r = &st["receivers"][0];
    assert_eq!(r["name"], "standby1", "{out}");
    assert_eq!(r["connected"], false, "{out}");
    assert!(
        r["restart_lsn"].is_string() && r["lag_bytes"].is_i64(),
        "{out}"
    );
    let (_, text, _) = status(false)?;
    let row = text
        .lines()
        .find(|l| l.starts_with("standby1"))
        .ok_or_else(|| anyhow!("no row for standby1:\n{text}"))?;
    assert!(row.split_whitespace().nth(1) == Some("no"), "{text}");
    Ok(())
}

/// A repository's WAL chain: complete after a backup, a failure naming the fix once a
/// segment it needs is gone.
#[test]
fn check_follows_a_repositorys_wal_chain() -> Result<()> {
    let dir = TestDir::new("check-repo");
    let pg = Pg::start_primary(&dir, "primary", "")?;
    pg.pgbench_init(2)?;
    let sender = Sender::start(&dir, &pg)?;
    let repo = dir.join("repo");
    let as_pg = |args: &[&str]| {
        let mut c = as_postgres(Command::new(bin("wal-receiver")));
        c.args(args);
        c
    };
    let r = repo.display().to_string();
    let (code, out, err) = run(as_pg(&[
        "backup",
        "--sender",
        &sender.addr,
        "--name",
        "repo",
        "--repo",
        &r,
    ]))?;
    assert_eq!(code, Some(0), "{out}\n{err}");
    // The archive's follower, through a few segment switches: sealed segments.
    let mut arch = Receiver::new(&dir, &sender.addr, "repo");
    arch.wal_dir = repo.join("wal");
    arch.as_postgres = true;
    arch.spawn()?;
    arch.wait_streaming()?;
    pg.sql("CREATE TABLE filler (v int)")?;
    for _ in 0..3 {
        pg.sql("INSERT INTO filler SELECT generate_series(1, 50000)")?;
        pg.sql("SELECT pg_switch_wal()")?;
    }
    arch.wait_flush(pg.flush_lsn()?)?;
    arch.proc.term();
    let wal = repo.join("wal").display().to_string();
    let check_args = [
        "check",
        "--sender",
        &sender.addr,
        "--name",
        "repo",
        "--wal-dir",
        &wal,
    ];
    let (code, out, err) = run(as_pg(&check_args))?;
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert_ok(&out, "repository");
    assert!(
        line(&out, "wal chain").contains("no segment missing"),
        "{out}"
    );
    assert_ok(&out, "disk space");

    // Remove the oldest sealed segment, which the backup needs.
    let mut sealed: Vec<PathBuf> = fs::read_dir(repo.join("wal"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "zst"))
        .collect();
    sealed.sort();
    let first = sealed
        .first()
        .ok_or_else(|| anyhow!("the archive holds no sealed segment"))?;
    fs::remove_file(first)?;
    let (code, out, _) = run(as_pg(&check_args))?;
    assert_eq!(code, Some(EXIT_CHECK_FAILED), "{out}");
    assert_fails(&out, "wal chain", "take a new backup");
    assert!(line(&out, "wal chain").contains("missing"), "{out}");
    Ok(())
}
