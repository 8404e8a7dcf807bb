//! Backup repositories against real PostgreSQL 15: point-in-time restore by time, LSN and
//! restore point, pg_verifybackup on a restored backup with its WAL, verify finding damage,
//! retention, and a backup taken under pgbench.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use walship_common::Lsn;
use walship_tests::*;

fn receiver_cmd(args: &[&str]) -> Command {
    let mut c = as_postgres(Command::new(bin("wal-receiver")));
    c.args(["--log-format", "json"]).args(args);
    c
}

fn run_ok(dir: &TestDir, log: &str, c: Command) -> Result<String> {
    let mut p = Proc::spawn(c, dir.join(log))?;
    let st = p.wait_exit()?;
    if !st.success() {
        bail!("{log}: exit {:?}\n{}", st.code(), tail(&p.log_text(), 15));
    }
    Ok(p.log_text())
}

fn run_code(dir: &TestDir, log: &str, c: Command) -> Result<(Option<i32>, String)> {
    let mut p = Proc::spawn(c, dir.join(log))?;
    let st = p.wait_exit()?;
    Ok((st.code(), p.log_text()))
}

fn backup(dir: &TestDir, sender: &str, repo: &Path, extra: &[&str]) -> Result<()> {
    let mut c = receiver_cmd(&["backup", "--sender", sender, "--name", "repo", "--repo"]);
    c.arg(repo).args(extra);
    run_ok(dir, "backup.log", c).map(|_| ())
}

fn restore(
    dir: &TestDir,
    repo: &Path,
    pgdata: &Path,
    extra: &[&str],
) -> Result<(Option<i32>, String)> {
    let mut c = receiver_cmd(&["restore", "--repo"]);
    c.arg(repo).arg("--pgdata").arg(pgdata).args(extra);
    run_code(dir, "restore.log", c)
}

/// Restores, starts the server and waits until recovery has ended (promoted at the target).
fn restore_and_start(dir: &TestDir, repo: &Path, name: &str, extra: &[&str]) -> Result<Pg> {
    let pgdata = dir.join(name);
    let (code, log) = restore(dir, repo, &pgdata, extra)?;
    if code != Some(0) {
        bail!("restore {name} failed ({code:?}):\n{}", tail(&log, 10));
    }
    let pg = Pg::start_existing(dir, &pgdata, name)?;
    wait_for(&format!("{name} to finish recovery"), || {
        Ok((pg.sql("SELECT pg_is_in_recovery()")? == "f").then_some(()))
    })?;
    Ok(pg)
}

/// The time now as PostgreSQL writes it, with an offset of five and a half hours (a zone
/// without summer time), e.g. `2026-12-02 14:06:22.123456+05:30`.
fn offset_now(pg: &Pg) -> Result<String> {
    Ok(pg.sql(
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'Asia/Kolkata', 'YYYY-MM-DD HH24:MI:SS.US')",
    )? + "+05:30")
}

/// A primary (prepared by `init`), its sender, and a backup repository whose archive a
/// follower (`follow --wal-dir <repo>/wal`, under the repository's name) keeps current.
struct Repo {
    dir: TestDir,
    primary: Pg,
    sender: Sender,
    repo: PathBuf,
    arch: Receiver,
}

fn repo_setup(name: &str, init: impl FnOnce(&Pg) -> Result<()>) -> Result<Repo> {
    let dir = TestDir::new(name);
    let primary = Pg::start_primary(&dir, "primary", "")?;
    init(&primary)?;
    let sender = Sender::start(&dir, &primary)?;
    let repo = dir.join("repo");
    postgres_dir(&repo)?;
    let mut arch = Receiver::new(&dir, &sender.addr, "repo");
    arch.wal_dir = repo.join("wal");
    arch.as_postgres = true;
    arch.spawn()?;
    arch.wait_streaming()?;
    Ok(Repo {
        dir,
        primary,
        sender,
        repo,
        arch,
    })
}

#[test]
fn point_in_time_restore_by_time_lsn_and_name_and_pg_verifybackup() -> Result<()> {
    let Repo {
        dir,
        primary,
        sender,
        repo,
        mut arch,
    } = repo_setup("pitr", |p| p.sql("CREATE TABLE t (v text)").map(drop))?;
    backup(&dir, &sender.addr, &repo, &[])?;

    primary.sql("INSERT INTO t VALUES ('t1')")?;
    primary.sql("SELECT pg_create_restore_point('after_t1')")?;
    let between_lsn = primary.flush_lsn()?;
    std::thread::sleep(Duration::from_millis(1100));
    // In PostgreSQL's own form, with an offset: restore writes it for PostgreSQL in UTC.
    let between_time = offset_now(&primary)?;
    std::thread::sleep(Duration::from_millis(1100));
    primary.sql("INSERT INTO t VALUES ('t2')")?;
    primary.sql("SELECT pg_switch_wal()")?;
    primary.sql("INSERT INTO t VALUES ('after')")?;
    // The last segment then holds no commit: finding the last one takes a segment back.
    primary.sql("SELECT pg_switch_wal()")?;
    primary.sql("CHECKPOINT")?;
    arch.wait_flush(primary.flush_lsn()?)?;

    let rows = |pg: &Pg| pg.sql("SELECT string_agg(v, ',' ORDER BY v) FROM t");
    let at_time = restore_and_start(
        &dir,
        &repo,
        "r-time",
        &["--target-time", &between_time, "--target-action", "promote"],
    )?;
    assert_eq!(rows(&at_time)?, "t1", "restore to {between_time}");
    let conf = std::fs::read_to_string(at_time.data.join("postgresql.auto.conf"))?;
    assert!(
        conf.lines()
            .any(|l| l.starts_with("recovery_target_time = '") && l.ends_with("+00'")),
        "recovery_target_time not written in UTC:\n{conf}"
    );
    // A target is reached by archive recovery, which takes the target action itself.
    assert!(!at_time.log_text().contains("received promote request"));
    drop(at_time);
    let at_lsn = restore_and_start(
        &dir,
        &repo,
        "r-lsn",
        &[
            "--target-lsn",
            &between_lsn.to_string(),
            "--target-action",
            "promote",
        ],
    )?;
    assert_eq!(rows(&at_lsn)?, "t1", "restore to {between_lsn}");
    drop(at_lsn);
    let at_name = restore_and_start(
        &dir,
        &repo,
        "r-name",
        &["--target-name", "after_t1", "--target-action", "promote"],
    )?;
    assert_eq!(rows(&at_name)?, "t1", "restore to the restore point");
    drop(at_name);
    let at_end = restore_and_start(&dir, &repo, "r-end", &[])?;
    assert_eq!(
        rows(&at_end)?,
        "after,t1,t2",
        "restore to the end of the archive"
    );
    // restore_command prefetched segments into pg_wal/.walship-prefetch, and removed it at
    // the end of the archive.
    assert!(
        at_end.log_text().contains("restored log file"),
        "no segment came through restore_command"
    );
    assert!(!at_end.data.join("pg_wal/.walship-prefetch").exists());
    // Without a target the server replayed as a standby and promoted itself at the end of
    // the archive: restore_command requested the promotion as pg_ctl promote does.
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
    drop(at_end);

    // Targets no backup plus archive reaches are refused, and nothing is written.
    let refused = |name: &str, args: &[&str], why: &str| -> Result<()> {
        let (code, log) = restore(&dir, &repo, &dir.join(name), args)?;
        assert_eq!(code, Some(4), "{name}: {}", tail(&log, 5));
        assert!(log.contains(why), "{name}: {}", tail(&log, 5));
        assert!(!dir.join(name).exists(), "{name} was written");
        Ok(())
    };
    // Before the backup ended.
    refused(
        "r-early",
        &["--target-lsn", "0/1000000"],
        "no backup can reach it",
    )?;
    // Past the end of the archive.
    refused(
        "r-late",
        &["--target-lsn", "FF/0"],
        "past the end of the WAL archive",
    )?;
    // A time after the archive's last transaction: PostgreSQL would replay to the end and
    // fail.
    refused(
        "r-future",
        &["--target-time", "2100-01-01T00:00:00Z"],
        "is not before the last transaction in the WAL archive",
    )?;
    // A time without a zone: a usage error that asks for one, before anything is read.
    let (code, log) = restore(
        &dir,
        &repo,
        &dir.join("r-nozone"),
        &["--target-time", "2026-12-02 10:36:22"],
    )?;
    assert_eq!(code, Some(2), "{}", tail(&log, 5));
    assert!(log.contains("no time zone"), "{}", tail(&log, 5));
    assert!(!dir.join("r-nozone").exists());
    // A repository that is not there: a usage error that says so.
    let (code, log) = restore(&dir, &dir.join("no-repo"), &dir.join("r-norepo"), &[])?;
    assert_eq!(code, Some(2), "{}", tail(&log, 5));
    assert!(log.contains("no repository at"), "{}", tail(&log, 5));

    // pg_verifybackup on a restored backup, with its WAL fetched from the archive.
    let listing: serde_json::Value = serde_json::from_str(
        run_ok(
            &dir,
            "backups.json",
            receiver_cmd(&["backups", "--json", "--repo", &repo.display().to_string()]),
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
    assert!(listing["restorable_from_time"].is_string(), "{listing}");
    let plain = dir.join("r-verify");
    let (code, log) = restore(&dir, &repo, &plain, &[])?;
    assert_eq!(code, Some(0), "{}", tail(&log, 5));
    let waldir = dir.join("verify-wal");
    postgres_dir(&waldir)?;
    let seg = 16u64 << 20;
    for segno in start.0 / seg..=stop.0 / seg {
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

    // scripts/backup.sh, as cron runs it: one summary line and an exit code.
    let script = |args: &[&str]| -> Result<(Option<i32>, String)> {
        let mut c = as_postgres(Command::new(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/backup.sh"),
        ));
        c.arg("--bin")
            .arg(bin("wal-receiver").parent().context("bin dir")?)
            .args(args);
        let out = c.output()?;
        Ok((
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ))
    };
    let repo_arg = repo.display().to_string();
    let (code, line) = script(&[
        "--sender",
        &sender.addr,
        "--name",
        "repo",
        "--repo",
        &repo_arg,
        "--keep",
        "1",
    ])?;
    assert_eq!(code, Some(0), "{line}");
    assert!(
        line.starts_with("walship-backup OK ")
            && line.contains(" backups=1")
            && line.lines().count() == 1,
        "{line}"
    );
    let (code, line) = script(&[
        "--sender",
        &sender.addr,
        "--name",
        "Bad-Name",
        "--repo",
        &repo_arg,
    ])?;
    assert_eq!(code, Some(2), "{line}");
    assert!(
        line.starts_with("walship-backup FAILED ") && line.contains("exit=2"),
        "{line}"
    );
    Ok(())
}

fn segment_files(wal: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(wal)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "zst"))
        .collect();
    v.sort();
    Ok(v)
}

#[test]
fn verify_finds_damage_retention_keeps_two_and_a_backup_under_pgbench_restores() -> Result<()> {
    let Repo {
        dir,
        primary,
        sender,
        repo,
        mut arch,
    } = repo_setup("repo", |p| p.pgbench_init(2))?;

    // Three backups, the last while pgbench runs, with --keep 2.
    backup(&dir, &sender.addr, &repo, &[])?;
    primary.sql("SELECT pg_switch_wal()")?;
    let mut bench = primary.pgbench(2, 4)?;
    assert!(bench.wait()?.success());
    backup(&dir, &sender.addr, &repo, &["--keep", "2"])?;
    let mut bench = primary.pgbench(2, 8)?;
    std::thread::sleep(Duration::from_secs(2));
    backup(&dir, &sender.addr, &repo, &["--keep", "2"])?;
    assert!(bench.wait()?.success());
    let expected = pgbench_fingerprint(&primary, &[])?;
    primary.sql("SELECT pg_create_restore_point('after_bench')")?;
    primary.sql("SELECT pg_switch_wal()")?;
    arch.wait_flush(primary.flush_lsn()?)?;

    let listing: serde_json::Value = serde_json::from_str(
        run_ok(
            &dir,
            "backups.json",
            receiver_cmd(&["backups", "--json", "--repo", &repo.display().to_string()]),
        )?
        .lines()
        .last()
        .context("nothing listed")?,
    )?;
    let ids: Vec<String> = listing["backups"]
        .as_array()
        .context("backups")?
        .iter()
        .map(|b| b["id"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(ids.len(), 2, "--keep 2 left {ids:?}");
    let oldest_start: Lsn = listing["backups"][0]["start_lsn"]
        .as_str()
        .context("start")?
        .parse()?;
    for f in segment_files(&repo.join("wal"))? {
        let name = f
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let segno =
            u64::from_str_radix(&name[16..24], 16)? + 256 * u64::from_str_radix(&name[8..16], 16)?;
        assert!(
            segno >= oldest_start.0 / (16 << 20),
            "{name} is older than the oldest kept backup's start {oldest_start}"
        );
    }
    // Both remaining backups restore; the one taken under pgbench reaches the primary's data.
    let first = restore_and_start(&dir, &repo, "r-first", &["--backup", &ids[0]])?;
    assert_eq!(pgbench_fingerprint(&first, &[])?.len(), 4);
    drop(first);
    let under_load = restore_and_start(
        &dir,
        &repo,
        "r-load",
        &[
            "--backup",
            &ids[1],
            "--target-name",
            "after_bench",
            "--target-action",
            "promote",
        ],
    )?;
    assert_eq!(
        pgbench_fingerprint(&under_load, &[])?,
        expected,
        "the backup taken under pgbench did not restore to the primary's data"
    );
    drop(under_load);

    // verify: clean, then cheap on a second run.
    let verify = |log: &str, full: bool| -> Result<(Option<i32>, serde_json::Value)> {
        let mut c = receiver_cmd(&["verify", "--json", "--repo"]);
        c.arg(&repo);
        if full {
            c.arg("--full");
        }
        let (code, out) = run_code(&dir, log, c)?;
        let json = out
            .lines()
            .find(|l| l.starts_with("{\"backups\""))
            .context("no verify report")?;
        Ok((code, serde_json::from_str(json)?))
    };
    let (code, v) = verify("verify1.log", false)?;
    assert_eq!(code, Some(0), "{v}");
    assert!(v["files_read"].as_u64() > Some(0), "{v}");
    let (code, v) = verify("verify2.log", false)?;
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["files_read"], 0, "second run re-read files: {v}");
    assert_eq!(v["segments_read"], 0, "second run re-read WAL: {v}");

    // Damage: a flipped byte, a truncated file, a deleted WAL segment in the middle.
    let files = repo.join("backups").join(&ids[0]).join("files");
    let flipped = files.join("global/pg_control.zst");
    let mut b = std::fs::read(&flipped)?;
    let mid = b.len() / 2;
    b[mid] ^= 0x10;
    std::fs::write(&flipped, &b)?;
    let truncated = files.join("PG_VERSION.zst");
    let t = std::fs::read(&truncated)?;
    std::fs::write(&truncated, &t[..t.len() / 2])?;
    let segs = segment_files(&repo.join("wal"))?;
    if segs.len() < 3 {
        bail!("too few sealed segments to delete one in the middle: {segs:?}");
    }
    let gone = &segs[segs.len() / 2];
    std::fs::remove_file(gone)?;
    let gone_name = gone
        .file_stem()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    // And a backup record changed by hand.
    let record = repo.join("backups").join(&ids[1]).join("backup.json");
    let text = std::fs::read_to_string(&record)?;
    std::fs::write(
        &record,
        text.replacen("\"timeline\": 1", "\"timeline\": 7", 1),
    )?;
    let (code, v) = verify("verify3.log", false)?;
    assert_eq!(code, Some(5), "{v}");
    let problems = v["problems"].to_string();
    for needle in [
        "global/pg_control",
        "PG_VERSION",
        gone_name.as_str(),
        "does not match its checksum",
    ] {
        assert!(
            problems.contains(needle),
            "verify did not name {needle}: {problems}"
        );
    }
    // Restore refuses the damaged backup and leaves nothing to start.
    let (code, log) = restore(&dir, &repo, &dir.join("r-damaged"), &["--backup", &ids[0]])?;
    assert_ne!(code, Some(0), "restore of a damaged backup succeeded");
    assert!(
        !dir.join("r-damaged").exists(),
        "a damaged restore left a directory"
    );
    assert!(
        log.contains("gap") || log.contains("damaged"),
        "{}",
        tail(&log, 5)
    );
    Ok(())
}
