//! The feature areas of walship end to end, on each PostgreSQL major version it supports.
//!
//! Every test here runs on the version under test ([`pg_bin`]: 15, or the programs
//! `WALSHIP_PG_BIN` names). `scripts/test.sh` runs this file with the rest of the suite on
//! 15, then once for each of 16, 17 and 18. Each test prints the version it ran on and how
//! long it took (shown with `--show-output`). Between them they go through:
//!
//! - a standby bootstrapped under load (with a tablespace, interrupted and resumed), fed by
//!   `follow --serve-standby` with synchronous replication, `remote_apply` and hot-standby
//!   feedback, equal to its primary; the WAL it stored read by the version's `pg_waldump`,
//!   and walked by the receiver itself after a (simulated) restart of the machine;
//! - a backup restored to a time, an LSN, a transaction and a restore point between two
//!   commits, and to the end of the archive (promoted, accepting writes), `verify`, `prune`
//!   and the version's `pg_verifybackup`;
//! - a failover by `scripts/failover.sh` that moves a second receiver, and the standby it
//!   serves, to the new timeline;
//! - a slot the primary invalidated, and a primary of another major version refused by an
//!   existing store, bootstrap and repository.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use walship_common::timeline::History;
use walship_common::{Lsn, TimelineId, WalSegSize};
use walship_tests::*;

const SEG: u64 = 16 << 20;

/// The PostgreSQL version under test, and when the test started: [`Run::done`] prints both.
struct Run {
    version: String,
    major: u32,
    started: Instant,
}

impl Run {
    fn start() -> Result<Run> {
        let bin = pg_bin();
        Ok(Run {
            version: pg_version_of(&bin)?,
            major: pg_major_of(&bin)?,
            started: Instant::now(),
        })
    }

    fn done(&self, what: &str) {
        println!(
            "PostgreSQL {}: {what}: passed in {:.1} s",
            self.version,
            self.started.elapsed().as_secs_f64()
        );
    }
}

fn receiver_cmd(args: &[&str]) -> Command {
    let mut c = as_postgres(Command::new(bin("wal-receiver")));
    c.args(["--log-format", "json"]).args(args);
    c
}

/// Runs `c` to its end with its log in `dir/log`; its exit code and log.
fn run_code(dir: &TestDir, log: &str, c: Command) -> Result<(Option<i32>, String)> {
    let mut p = Proc::spawn(c, dir.join(log))?;
    let st = p.wait_exit()?;
    Ok((st.code(), p.log_text()))
}

fn run_ok(dir: &TestDir, log: &str, c: Command) -> Result<String> {
    let (code, text) = run_code(dir, log, c)?;
    if code != Some(0) {
        bail!("{log}: exit {code:?}\n{}", tail(&text, 15));
    }
    Ok(text)
}

fn wait_replayed(standby: &Pg, lsn: Lsn) -> Result<()> {
    wait_for(&format!("the standby to replay {lsn}"), || {
        let r: Lsn = standby.sql("SELECT pg_last_wal_replay_lsn()")?.parse()?;
        Ok((r >= lsn).then_some(()))
    })
}

fn wait_streaming_from(standby: &Pg, wal_dir: &Path) -> Result<()> {
    let want = format!("streaming|{}", wal_dir.display());
    wait_for("the standby to stream from the receiver", || {
        let row = standby
            .sql("SELECT status || '|' || coalesce(sender_host, '') FROM pg_stat_wal_receiver")?;
        Ok((row == want).then_some(()))
    })
}

/// A follower of `sender` under `name` on `wal_dir` that serves a standby from it.
fn serving_receiver(dir: &TestDir, senders: &[String], name: &str, wal_dir: &Path) -> Receiver {
    let mut r = Receiver::new(dir, &senders[0], name);
    r.wal_dir = wal_dir.to_owned();
    r.as_postgres = true;
    for s in &senders[1..] {
        r.extra.extend(["--sender".to_owned(), s.clone()]);
    }
    r.extra
        .extend(["--serve-standby".to_owned(), wal_dir.display().to_string()]);
    r
}

fn megabytes(path: &Path) -> Result<u64> {
    let out = Command::new("du").arg("-sm").arg(path).output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("0")
        .parse()
        .unwrap_or(0))
}

/// Makes the store's `state` record `flush` and its `LOCK` name another boot of the
/// machine: what a crash of the machine leaves when `state` was last synced earlier in
/// the segment (the layout is `StoreState`'s in wal-receiver/src/store.rs).
fn as_after_a_machine_crash(wal_dir: &Path, flush: Lsn) -> Result<()> {
    let path = wal_dir.join("state");
    let mut b = std::fs::read(&path)?;
    b[32..40].copy_from_slice(&flush.0.to_le_bytes());
    let crc = crc32c::crc32c(&b[0..56]);
    b[56..60].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&path, &b)?;
    std::fs::write(
        wal_dir.join("LOCK"),
        "a boot of the machine before a crash\n",
    )?;
    Ok(())
}

#[test]
fn a_standby_bootstrapped_under_load_streams_through_the_receiver() -> Result<()> {
    let run = Run::start()?;
    let dir = TestDir::new("v-standby");
    let pg = Pg::start_primary(&dir, "primary", "")?;
    let ts_primary = dir.join("ts-primary");
    postgres_dir(&ts_primary)?;
    pg.sql(&format!(
        "CREATE TABLESPACE ts1 LOCATION '{}'",
        ts_primary.display()
    ))?;
    pg.sql("CREATE TABLE in_ts (id int PRIMARY KEY, v text) TABLESPACE ts1")?;
    pg.sql("INSERT INTO in_ts SELECT g, md5(g::text) FROM generate_series(1, 20000) g")?;
    pg.sql("CREATE TABLE seen (v int)")?;
    pg.pgbench_init(10)?;
    let sender = Sender::start(&dir, &pg)?;
    let (pgdata, wal_dir, ts_standby) = (
        dir.join("standby"),
        dir.join("wal-sb"),
        dir.join("ts-standby"),
    );
    let mapping = [(ts_primary.clone(), ts_standby.clone())];

    // Interrupted once a good part is copied: not startable, and resumed under load.
    let mut boot = Proc::spawn(
        bootstrap_cmd(&sender.addr, "sb", &pgdata, &wal_dir, &mapping),
        dir.join("bootstrap-1.log"),
    )?;
    wait_for("the copy to get going", || {
        Ok((megabytes(&pgdata)? >= 40).then_some(()))
    })?;
    boot.kill9();
    assert!(pgdata.join("walship-bootstrap.incomplete").exists());
    assert!(
        !Pg::would_start(&dir, &pgdata),
        "PostgreSQL started from an unfinished bootstrap"
    );
    let mut load = pg.pgbench(2, 3600)?;
    let mut again = Proc::spawn(
        bootstrap_cmd(&sender.addr, "sb", &pgdata, &wal_dir, &mapping),
        dir.join("bootstrap-2.log"),
    )?;
    let st = again.wait_exit()?;
    assert!(
        st.success(),
        "resumed bootstrap failed: {}",
        tail(&again.log_text(), 10)
    );
    let skipped = again
        .log_events_starting("bootstrap complete")
        .first()
        .and_then(|f| f["skipped_bytes"].as_u64())
        .unwrap_or(0);
    assert!(
        skipped >= 20 << 20,
        "the re-run skipped only {skipped} bytes"
    );
    assert!(pgdata.join("tablespace_map").exists(), "no tablespace_map");
    // PostgreSQL 17 and later keep WAL summaries in pg_wal/summaries, which a base backup
    // holds empty.
    assert_eq!(
        pgdata.join("pg_wal/summaries").is_dir(),
        run.major >= 17,
        "pg_wal/summaries"
    );

    // Streamed to the standby through the receiver.
    let mut follower = serving_receiver(&dir, std::slice::from_ref(&sender.addr), "sb", &wal_dir);
    follower.spawn()?;
    let first = follower.wait_streaming()?;
    let standby = Pg::start_existing(&dir, &pgdata, "standby")?;
    assert_eq!(standby.sql("SELECT pg_is_in_recovery()")?, "t");
    assert_eq!(standby.sql("SELECT count(*) FROM in_ts")?, "20000");
    standby.sql("ALTER SYSTEM SET hot_standby_feedback = on")?;
    standby.sql("ALTER SYSTEM SET wal_receiver_status_interval = '1s'")?;
    standby.sql("SELECT pg_reload_conf()")?;
    wait_streaming_from(&standby, &wal_dir)?;

    // Synchronous replication with remote_apply: a commit returns once the standby behind
    // the receiver has replayed it.
    pg.sql("ALTER SYSTEM SET synchronous_standby_names = 'sb'")?;
    pg.sql("ALTER SYSTEM SET synchronous_commit = remote_apply")?;
    pg.sql("SELECT pg_reload_conf()")?;
    wait_for("the receiver to be the synchronous standby", || {
        let st =
            pg.sql("SELECT sync_state FROM pg_stat_replication WHERE application_name = 'sb'")?;
        Ok((st == "sync").then_some(()))
    })?;
    for v in 1..=3 {
        pg.sql(&format!("INSERT INTO seen VALUES ({v})"))?;
        assert_eq!(
            standby.sql(&format!("SELECT count(*) FROM seen WHERE v = {v}"))?,
            "1",
            "row {v} not visible on the standby when its commit returned"
        );
    }
    // Hot-standby feedback reaches the primary's slot.
    wait_for("the standby's feedback to set the slot's xmin", || {
        let x = pg.sql(
            "SELECT coalesce(xmin::text, '') FROM pg_replication_slots WHERE slot_name = 'walship_sb'",
        )?;
        Ok((!x.is_empty()).then_some(()))
    })?;

    let _ = load.kill();
    let _ = load.wait();
    pg.sql("INSERT INTO in_ts VALUES (-1, 'after the load')")?;
    let target = pg.flush_lsn()?;
    follower.wait_flush(target)?;
    wait_replayed(&standby, target)?;
    let extra = ["SELECT count(*), sum(hashtext(x::text)::bigint) FROM in_ts x"];
    assert_eq!(
        pgbench_fingerprint(&standby, &extra)?,
        pgbench_fingerprint(&pg, &extra)?,
        "the standby's data differs from the primary's"
    );
    wait_for("pg_stat_replication to show the standby's replay", || {
        let r = pg.sql(
            "SELECT coalesce(replay_lsn::text, '') FROM pg_stat_replication WHERE application_name = 'sb'",
        )?;
        Ok(r.parse::<Lsn>().ok().filter(|l| *l >= target).map(|_| ()))
    })?;
    let out = Command::new(bin("wal-receiver"))
        .args(["status", "--json", "--wal-dir"])
        .arg(&wal_dir)
        .args(["--standby", &standby.conninfo()])
        .output()?;
    let st: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(st["pg_version"], run.major, "{st}");
    assert_eq!(st["standby_server"]["in_recovery"], true, "{st}");

    // The stored WAL, read by this version's pg_waldump, without a gap.
    let seg = WalSegSize::new(SEG).expect("16 MiB");
    let records = verify_wal(&wal_dir, first.segment_start(seg), &dir.join("verify"))?;
    assert!(records > 0);

    // After a crash of the machine `state` may lag inside its segment: the receiver walks
    // this version's WAL records to find the end of what it had synced.
    pg.sql("INSERT INTO seen VALUES (10)")?;
    let flushed = pg.flush_lsn()?;
    follower.wait_flush(flushed)?;
    follower.proc.term();
    let recorded = follower.flush_lsn()?;
    let lagging = Lsn(recorded.segment_start(seg).0 + 40);
    assert!(
        lagging < recorded,
        "no record between {lagging} and {recorded}"
    );
    as_after_a_machine_crash(&wal_dir, lagging)?;
    assert_eq!(
        follower.flush_lsn()?,
        recorded,
        "the walk over the store's WAL did not find its end"
    );
    follower.spawn()?;
    pg.sql("INSERT INTO seen VALUES (11)")?;
    let target = pg.flush_lsn()?;
    follower.wait_flush(target)?;
    wait_replayed(&standby, target)?;
    assert_eq!(standby.sql("SELECT count(*) FROM seen")?, "5");
    run.done("bootstrap under load with a tablespace and a resume, streaming through follow --serve-standby, synchronous remote_apply, hot-standby feedback, pg_waldump, the walk after a crash");
    Ok(())
}

#[test]
fn a_backup_restores_to_each_target_kind_and_to_the_end_of_the_archive() -> Result<()> {
    let run = Run::start()?;
    let dir = TestDir::new("v-backup");
    let primary = Pg::start_primary(&dir, "primary", "")?;
    primary.sql("CREATE TABLE t (v text)")?;
    let sender = Sender::start(&dir, &primary)?;
    let repo = dir.join("repo");
    postgres_dir(&repo)?;
    let mut arch = Receiver::new(&dir, &sender.addr, "repo");
    arch.wal_dir = repo.join("wal");
    arch.as_postgres = true;
    arch.spawn()?;
    arch.wait_streaming()?;
    let repo_arg = repo.display().to_string();
    let backup = |log: &str, extra: &[&str]| -> Result<String> {
        let mut c = receiver_cmd(&["backup", "--sender", &sender.addr, "--name", "repo"]);
        c.args(["--repo", &repo_arg]).args(extra);
        run_ok(&dir, log, c)
    };
    backup("backup-1.log", &[])?;

    // psql prints the row, then the command tag.
    let inserted = primary.sql("INSERT INTO t VALUES ('t1') RETURNING pg_current_xact_id()")?;
    let xid = inserted.lines().next().unwrap_or_default().to_owned();
    primary.sql("SELECT pg_create_restore_point('after_t1')")?;
    let between_lsn = primary.flush_lsn()?;
    std::thread::sleep(Duration::from_millis(1100));
    let between_time = primary.sql(
        r#"SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"#,
    )?;
    std::thread::sleep(Duration::from_millis(1100));
    primary.sql("INSERT INTO t VALUES ('t2')")?;
    primary.sql("SELECT pg_switch_wal()")?;
    primary.sql("INSERT INTO t VALUES ('after')")?;
    primary.sql("SELECT pg_switch_wal()")?;
    primary.sql("CHECKPOINT")?;
    // A commit in the segment being written, which the restore without a target must
    // replay before it promotes.
    primary.sql("INSERT INTO t VALUES ('z-last')")?;
    arch.wait_flush(primary.flush_lsn()?)?;

    let restore = |name: &str, extra: &[&str]| -> Result<Pg> {
        let pgdata = dir.join(name);
        let mut c = receiver_cmd(&["restore", "--repo", &repo_arg, "--pgdata"]);
        c.arg(&pgdata).args(extra);
        run_ok(&dir, &format!("restore-{name}.log"), c)?;
        let pg = Pg::start_existing(&dir, &pgdata, name)?;
        wait_for(&format!("{name} to finish recovery"), || {
            Ok((pg.sql("SELECT pg_is_in_recovery()")? == "f").then_some(()))
        })?;
        Ok(pg)
    };
    let rows = |pg: &Pg| pg.sql("SELECT string_agg(v, ',' ORDER BY v) FROM t");
    let between_lsn = between_lsn.to_string();
    for (name, target) in [
        ("r-time", ["--target-time", between_time.as_str()]),
        ("r-lsn", ["--target-lsn", between_lsn.as_str()]),
        ("r-xid", ["--target-xid", xid.as_str()]),
        ("r-name", ["--target-name", "after_t1"]),
    ] {
        let pg = restore(name, &[target[0], target[1], "--target-action", "promote"])?;
        assert_eq!(rows(&pg)?, "t1", "{name}: restore to {}", target[1]);
    }
    // Without a target: every archived commit, then promoted by restore_command's request.
    let at_end = restore("r-end", &[])?;
    assert_eq!(rows(&at_end)?, "after,t1,t2,z-last");
    assert!(
        at_end.log_text().contains("received promote request"),
        "the restored server was not asked to promote: {}",
        tail(&at_end.log_text(), 10)
    );
    for left in ["pg_wal/walship.promote.armed", "promote", "standby.signal"] {
        assert!(
            !at_end.data.join(left).exists(),
            "{left} is left after promotion"
        );
    }
    at_end.sql("INSERT INTO t VALUES ('written after the restore')")?;
    drop(at_end);

    // This version's pg_verifybackup accepts a restored backup with its WAL.
    let listing: serde_json::Value = serde_json::from_str(
        run_ok(
            &dir,
            "backups.json",
            receiver_cmd(&["backups", "--json", "--repo", &repo_arg]),
        )?
        .lines()
        .last()
        .context("backups printed nothing")?,
    )?;
    let b = &listing["backups"][0];
    let (start, stop): (Lsn, Lsn) = (
        b["start_lsn"].as_str().context("start")?.parse()?,
        b["stop_lsn"].as_str().context("stop")?.parse()?,
    );
    let plain = dir.join("r-verify");
    let mut c = receiver_cmd(&["restore", "--repo", &repo_arg, "--pgdata"]);
    c.arg(&plain);
    run_ok(&dir, "restore-verify.log", c)?;
    let waldir = dir.join("verify-wal");
    postgres_dir(&waldir)?;
    for segno in start.0 / SEG..=stop.0 / SEG {
        let name = format!("00000001{:08X}{:08X}", segno / 256, segno % 256);
        let mut c = receiver_cmd(&["restore-wal", "--no-prefetch", "--wal-dir"]);
        c.arg(repo.join("wal")).arg(&name).arg(waldir.join(&name));
        run_ok(&dir, "restore-wal.log", c)?;
    }
    let out = Command::new(pg_tool("pg_verifybackup"))
        .arg("-w")
        .arg(&waldir)
        .arg(&plain)
        .output()?;
    assert!(
        out.status.success(),
        "pg_verifybackup: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // verify, and a second backup that prunes the first.
    run_ok(
        &dir,
        "verify.log",
        receiver_cmd(&["verify", "--repo", &repo_arg]),
    )?;
    backup("backup-2.log", &["--keep", "1"])?;
    let listing: serde_json::Value = serde_json::from_str(
        run_ok(
            &dir,
            "backups-2.json",
            receiver_cmd(&["backups", "--json", "--repo", &repo_arg]),
        )?
        .lines()
        .last()
        .context("backups printed nothing")?,
    )?;
    assert_eq!(
        listing["backups"].as_array().map(Vec::len),
        Some(1),
        "{listing}"
    );
    run.done("backup, restore to a time, an LSN, an xid and a restore point, to the end of the archive (promoted), pg_verifybackup, verify, prune");
    Ok(())
}

/// A standby with its receiver, whose `--sender` list names every node.
struct Node {
    name: String,
    pg: Pg,
    receiver: Receiver,
    listen: String,
}

fn node(dir: &TestDir, name: &str, senders: &[String], listen: &str) -> Result<Node> {
    let wal_dir = dir.join(&format!("wal-{name}"));
    let (code, log) = run_code(
        dir,
        &format!("bootstrap-{name}.log"),
        bootstrap_cmd(&senders[0], name, &dir.join(name), &wal_dir, &[]),
    )?;
    if code != Some(0) {
        bail!("bootstrap {name} failed: {}", tail(&log, 10));
    }
    let mut receiver = serving_receiver(dir, senders, name, &wal_dir);
    receiver.spawn()?;
    receiver.wait_streaming()?;
    let pg = Pg::start_existing(dir, &dir.join(name), name)?;
    Ok(Node {
        name: name.to_owned(),
        pg,
        receiver,
        listen: listen.to_owned(),
    })
}

/// Stops the wal-sender failover.sh started, when the test ends however it ends.
struct KillOnDrop(PathBuf);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = std::fs::read_to_string(&self.0)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
}

#[test]
fn a_failover_moves_a_second_receiver_and_its_standby_to_the_new_timeline() -> Result<()> {
    const ACKED: &str = "SELECT count(*), sum(id) FROM acked";
    let run = Run::start()?;
    let dir = TestDir::new("v-failover");
    let mut primary = Pg::start_primary(&dir, "primary", "wal_keep_size = 256MB")?;
    primary.pgbench_init(2)?;
    primary.sql("CREATE TABLE acked (id int PRIMARY KEY)")?;
    let sender = Sender::start(&dir, &primary)?;
    let (listen_b, listen_c) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let senders = vec![sender.addr.clone(), listen_b.clone(), listen_c.clone()];
    let b = node(&dir, "nb", &senders, &listen_b)?;
    let c = node(&dir, "nc", &senders, &listen_c)?;
    primary.sql("ALTER SYSTEM SET synchronous_standby_names = 'ANY 1 (nb, nc)'")?;
    primary.sql("SELECT pg_reload_conf()")?;
    wait_for("both receivers to be synchronous candidates", || {
        let n = primary.sql(
            "SELECT count(*) FROM pg_stat_replication WHERE application_name IN ('nb','nc') AND sync_state = 'quorum'",
        )?;
        Ok((n == "2").then_some(()))
    })?;

    // Load, and a client that records every commit the primary acknowledged; then the
    // primary crashes.
    let script = dir.join("acked.sql");
    let sql: String = (1..=50_000)
        .map(|i| format!("INSERT INTO acked VALUES ({i});\n\\echo {i}\n"))
        .collect();
    std::fs::write(&script, sql)?;
    let mut client = Command::new(pg_tool("psql"));
    client
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d"])
        .arg(primary.conninfo())
        .arg("-f")
        .arg(&script);
    let mut client = Proc::spawn(client, dir.join("acked.out"))?;
    let mut bench = primary.pgbench(2, 30)?;
    std::thread::sleep(Duration::from_secs(4));
    primary.stop_immediate()?;
    let _ = client.wait_exit();
    let _ = bench.wait();
    let acked: u32 = client
        .log_text()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .max()
        .context("the client saw no acknowledged commit")?;

    let _senders = [&b, &c].map(|n| {
        KillOnDrop(PathBuf::from(format!(
            "{}.sender.pid",
            n.receiver.wal_dir.display()
        )))
    });
    let mut failover =
        Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/failover.sh"));
    failover
        .arg("--bin")
        .arg(bin("wal-receiver").parent().context("bin dir")?)
        .args(["--wait", "120"]);
    // Debian's PostgreSQL 15 is where the script looks by default (after the data
    // directory's PG_VERSION); the other versions' programs are elsewhere here.
    if pg_bin() != Path::new(PG_BIN) {
        failover.arg("--pg-bin").arg(pg_bin());
    }
    for n in [&b, &c] {
        failover
            .args(["--candidate", &n.name, "--wal-dir"])
            .arg(&n.receiver.wal_dir)
            .arg("--pgdata")
            .arg(&n.pg.data)
            .args(["--standby", &n.pg.conninfo(), "--listen", &n.listen]);
    }
    let out = failover.output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "failover.sh failed:\n{text}");
    let (new, mut other) = if text.contains("chose nb") {
        (b, c)
    } else if text.contains("chose nc") {
        (c, b)
    } else {
        bail!("failover.sh did not say what it chose:\n{text}");
    };
    assert_eq!(new.pg.sql("SELECT pg_is_in_recovery()")?, "f");
    assert_eq!(
        new.pg
            .sql(&format!("SELECT count(*) FROM acked WHERE id <= {acked}"))?,
        acked.to_string(),
        "acknowledged commits lost in the failover"
    );

    // The other receiver finds the new primary and moves to timeline 2; so does its standby.
    wait_for("the other receiver to follow timeline 2", || {
        if !other.receiver.proc.is_running() {
            bail!(
                "receiver exited:\n{}",
                tail(&other.receiver.proc.log_text(), 20)
            );
        }
        Ok((other.receiver.status()?["timeline"] == 2).then_some(()))
    })?;
    let mut bench = new.pg.pgbench(2, 3)?;
    assert!(bench.wait()?.success(), "pgbench on the new primary failed");
    let target = new.pg.flush_lsn()?;
    other.receiver.wait_flush(target)?;
    wait_replayed(&other.pg, target)?;
    assert_eq!(
        other
            .pg
            .sql("SELECT received_tli FROM pg_stat_wal_receiver")?,
        "2",
        "the other standby does not stream timeline 2"
    );
    assert_eq!(
        pgbench_fingerprint(&other.pg, &[ACKED])?,
        pgbench_fingerprint(&new.pg, &[ACKED])?,
        "the remaining standby's data differs from the new primary's"
    );
    // Each timeline reads back whole with this version's pg_waldump.
    let wal = other.receiver.wal_dir.clone();
    let history = std::fs::read(wal.join("00000002.history"))?;
    let switch = History::parse(TimelineId(2), &history)
        .map_err(anyhow::Error::msg)?
        .switch_from(TimelineId(1))
        .context("no switch from timeline 1")?
        .0;
    let from = Lsn(switch.0 - switch.0 % SEG);
    let n1 = verify_timeline(&wal, TimelineId(1), from, switch, &dir.join("s1"))?;
    let n2 = verify_timeline(&wal, TimelineId(2), from, target, &dir.join("s2"))?;
    assert!(n1 > 0 && n2 > 0, "pg_waldump read {n1} and {n2} records");
    run.done("synchronous ANY 1, a crash of the primary, scripts/failover.sh, a second receiver and its standby on timeline 2");
    Ok(())
}

#[test]
fn a_lost_slot_stops_the_receiver_with_exit_3() -> Result<()> {
    let run = Run::start()?;
    let dir = TestDir::new("v-lostslot");
    let conf = "max_slot_wal_keep_size = 32MB\nmin_wal_size = 32MB\nmax_wal_size = 64MB";
    let pg = Pg::start_primary(&dir, "primary", conf)?;
    let sender = Sender::start(&dir, &pg)?;
    let mut r = Receiver::start(&dir, &sender.addr, "rl")?;
    r.wait_streaming()?;
    r.proc.term();
    pg.wait_slot_released("walship_rl")?;
    pg.pgbench_init(5)?;
    wait_for("the slot to be invalidated", || {
        pg.sql("SELECT pg_switch_wal()")?;
        pg.sql("CHECKPOINT")?;
        Ok((pg
            .sql("SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'walship_rl'")?
            == "lost")
            .then_some(()))
    })?;
    let flush = r.flush_lsn()?;
    let (code, log) = r.run_to_exit()?;
    assert_eq!(code, Some(3), "{}", tail(&log, 5));
    assert!(log.contains("invalidated"), "{}", tail(&log, 5));
    assert_eq!(r.flush_lsn()?, flush);
    run.done("a slot invalidated by max_slot_wal_keep_size: exit 3");
    Ok(())
}

/// The PostgreSQL programs of a major version other than the one under test:
/// `WALSHIP_PG_OTHER_BIN`, or PostgreSQL 15's when another version is under test.
fn other_pg_bin(under_test: u32) -> Result<PathBuf> {
    let bin = match std::env::var_os("WALSHIP_PG_OTHER_BIN").filter(|b| !b.is_empty()) {
        Some(b) => PathBuf::from(b),
        None if under_test != 15 => PathBuf::from(PG_BIN),
        None => bail!(
            "set WALSHIP_PG_OTHER_BIN to the programs of a PostgreSQL major version other than 15 (scripts/install-pg.sh installs 16 to 18; scripts/test.sh sets it)"
        ),
    };
    let major = pg_major_of(&bin)?;
    if major == under_test {
        bail!(
            "WALSHIP_PG_OTHER_BIN={} is PostgreSQL {major} too",
            bin.display()
        );
    }
    Ok(bin)
}

#[test]
fn a_primary_of_another_major_version_is_refused_by_a_store_a_bootstrap_and_a_repository(
) -> Result<()> {
    let run = Run::start()?;
    let other_bin = other_pg_bin(run.major)?;
    let other_version = pg_version_of(&other_bin)?;
    let other_major = pg_major_of(&other_bin)?;
    let dir = TestDir::new("v-othermajor");
    let pg = Pg::start_primary(&dir, "primary", "")?;
    let sender = Sender::start(&dir, &pg)?;
    let mut store = Receiver::new(&dir, &sender.addr, "st");
    store.as_postgres = true;
    store.spawn()?;
    store.wait_streaming()?;
    pg.sql("CREATE TABLE t AS SELECT 1 AS v")?;
    store.wait_flush(pg.flush_lsn()?)?;
    store.proc.term();
    let repo = dir.join("repo");
    postgres_dir(&repo)?;
    let repo_arg = repo.display().to_string();
    let backup = |sender: &str, log: &str| {
        let mut c = receiver_cmd(&["backup", "--sender", sender, "--name", "repo"]);
        c.args(["--repo", &repo_arg]);
        run_code(&dir, log, c)
    };
    let (code, log) = backup(&sender.addr, "backup.log")?;
    assert_eq!(code, Some(0), "{}", tail(&log, 10));
    let status = store.status()?;
    assert_eq!(status["pg_version"], run.major, "{status}");

    let other = Pg::start_primary_of(&other_bin, &dir, "other", "")?;
    let other_sender = Sender::start_with(&dir, &other, "sender-other", &[])?;
    let names_both = |log: &str| {
        log.contains(&format!("runs PostgreSQL {other_major}"))
            && log.contains(&format!("WAL of PostgreSQL {}", run.major))
    };
    // follow
    store.sender = other_sender.addr.clone();
    let (code, log) = store.run_to_exit()?;
    assert_eq!(code, Some(4), "{}", tail(&log, 5));
    assert!(names_both(&log), "{}", tail(&log, 5));
    assert_eq!(
        store.flush_lsn()?.to_string(),
        status["flush_lsn"].as_str().unwrap_or_default(),
        "the refused store changed"
    );
    // bootstrap onto the store
    let pgdata = dir.join("standby");
    let (code, log) = run_code(
        &dir,
        "bootstrap.log",
        bootstrap_cmd(&other_sender.addr, "st", &pgdata, &store.wal_dir, &[]),
    )?;
    assert_eq!(code, Some(4), "{}", tail(&log, 5));
    assert!(names_both(&log), "{}", tail(&log, 5));
    assert!(!pgdata.join("global/pg_control").exists());
    // backup into the repository
    let (code, log) = backup(&other_sender.addr, "backup-other.log")?;
    assert_eq!(code, Some(4), "{}", tail(&log, 5));
    assert!(names_both(&log), "{}", tail(&log, 5));
    run.done(&format!(
        "a store, a bootstrap and a repository of {} refuse a primary of PostgreSQL {other_version}",
        run.version
    ));
    Ok(())
}
