//! Bootstrapping a standby from a live primary, against real PostgreSQL 15.

use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use walship_common::Lsn;
use walship_tests::*;

/// Waits until the standby has replayed up to `lsn`.
fn wait_replayed(standby: &Pg, lsn: Lsn) -> Result<()> {
    wait_for(&format!("the standby to replay up to {lsn}"), || {
        let v = standby.sql(&format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'"))?;
        Ok((v == "t").then_some(()))
    })
}

#[test]
fn bootstrap_under_load_with_a_tablespace_gives_an_equal_standby() -> Result<()> {
    let dir = TestDir::new("bootstrap");
    let pg = Pg::start_primary(&dir, "primary", "")?;
    let ts_primary = dir.join("ts-primary");
    postgres_dir(&ts_primary)?;
    pg.sql(&format!(
        "CREATE TABLESPACE ts1 LOCATION '{}'",
        ts_primary.display()
    ))?;
    pg.sql("CREATE TABLE in_ts (id int primary key, v text) TABLESPACE ts1")?;
    pg.sql("INSERT INTO in_ts SELECT g, md5(g::text) FROM generate_series(1, 20000) g")?;
    pg.pgbench_init(10)?;
    let sender = Sender::start(&dir, &pg)?;
    let mut load = pg.pgbench(2, 3600)?;

    let (pgdata, wal_dir, ts_standby) = (
        dir.join("standby"),
        dir.join("wal-sb"),
        dir.join("ts-standby"),
    );
    let mut boot = Proc::spawn(
        bootstrap_cmd(
            &sender.addr,
            "sb",
            &pgdata,
            &wal_dir,
            &[(ts_primary.clone(), ts_standby.clone())],
        ),
        dir.join("bootstrap.log"),
    )?;
    let st = boot.wait_exit()?;
    assert!(
        st.success(),
        "bootstrap failed: {}",
        tail(&boot.log_text(), 10)
    );
    assert!(!pgdata.join("walship-bootstrap.incomplete").exists());
    assert!(pgdata.join("backup_label").exists() && pgdata.join("standby.signal").exists());
    assert!(pgdata.join("tablespace_map").exists(), "no tablespace_map");
    assert!(
        ts_standby.read_dir()?.next().is_some(),
        "the tablespace was not restored into the mapped directory"
    );

    let mut follower = Receiver::new(&dir, &sender.addr, "sb");
    follower.wal_dir = wal_dir.clone();
    // The store is the standby's (its restore_command reads it): written by its user.
    follower.as_postgres = true;
    follower.spawn()?;
    let standby = Pg::start_existing(&dir, &pgdata, "standby")?;
    assert_eq!(standby.sql("SELECT pg_is_in_recovery()")?, "t");
    assert_eq!(standby.sql("SELECT count(*) FROM in_ts")?, "20000");
    assert!(
        standby
            .log_text()
            .contains("consistent recovery state reached"),
        "{}",
        tail(&standby.log_text(), 10)
    );

    // It keeps replaying while the primary writes, then catches up once the load stops.
    std::thread::sleep(Duration::from_secs(3));
    let _ = load.kill();
    let _ = load.wait();
    pg.sql("INSERT INTO in_ts VALUES (-1, 'after the load')")?;
    let target = pg.flush_lsn()?;
    follower.wait_flush(target)?;
    wait_replayed(&standby, target)?;
    let extra = ["SELECT count(*), sum(hashtext(x::text)::bigint) FROM in_ts x"];
    assert_eq!(
        pgbench_fingerprint(&standby, &extra)?,
        pgbench_fingerprint(&pg, &extra)?
    );
    Ok(())
}

#[test]
fn interrupted_bootstrap_is_not_startable_and_resumes_skipping_verified_files() -> Result<()> {
    let dir = TestDir::new("resume");
    let pg = Pg::start_primary(&dir, "primary", "")?;
    pg.pgbench_init(10)?;
    let sender = Sender::start(&dir, &pg)?;
    let (pgdata, wal_dir) = (dir.join("standby"), dir.join("wal-sb"));

    let mut boot = Proc::spawn(
        bootstrap_cmd(&sender.addr, "sr", &pgdata, &wal_dir, &[]),
        dir.join("bootstrap-1.log"),
    )?;
    // Kill it once a good part of the data is there.
    wait_for("the copy to get going", || {
        let out = Command::new("du").arg("-sm").arg(&pgdata).output()?;
        let mb: u64 = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or("0")
            .parse()
            .unwrap_or(0);
        Ok((mb >= 40).then_some(()))
    })?;
    boot.kill9();
    assert!(pgdata.join("walship-bootstrap.incomplete").exists());
    assert!(!pgdata.join("global/pg_control").exists());
    assert!(
        !Pg::would_start(&dir, &pgdata),
        "PostgreSQL started from an unfinished bootstrap"
    );

    let mut again = Proc::spawn(
        bootstrap_cmd(&sender.addr, "sr", &pgdata, &wal_dir, &[]),
        dir.join("bootstrap-2.log"),
    )?;
    let st = again.wait_exit()?;
    assert!(
        st.success(),
        "resumed bootstrap failed: {}",
        tail(&again.log_text(), 10)
    );
    let done = again.log_events_starting("bootstrap complete");
    let skipped = done
        .first()
        .and_then(|f| f["skipped_bytes"].as_u64())
        .unwrap_or(0);
    assert!(
        skipped >= 20 << 20,
        "the re-run skipped only {skipped} bytes"
    );
    eprintln!("resumed bootstrap skipped {skipped} bytes");

    let standby = Pg::start_existing(&dir, &pgdata, "standby")?;
    let target = pg.flush_lsn()?;
    let mut follower = Receiver::new(&dir, &sender.addr, "sr");
    follower.wal_dir = wal_dir;
    follower.as_postgres = true;
    follower.spawn()?;
    follower.wait_flush(target)?;
    wait_replayed(&standby, target)?;
    assert_eq!(
        pgbench_fingerprint(&standby, &[])?,
        pgbench_fingerprint(&pg, &[])?
    );
    Ok(())
}

#[test]
fn bootstrap_refuses_a_non_empty_directory_and_another_clusters_wal_dir() -> Result<()> {
    let dir = TestDir::new("refuse");
    let one = Pg::start_primary(&dir, "one", "")?;
    let two = Pg::start_primary(&dir, "two", "")?;
    let s1 = Sender::start(&dir, &one)?;
    let s2 = Sender::start(&dir, &two)?;

    let full = dir.join("full");
    postgres_dir(&full)?;
    std::fs::write(full.join("important.txt"), b"do not touch")?;
    let mut boot = Proc::spawn(
        bootstrap_cmd(&s1.addr, "rf", &full, &dir.join("wal-rf"), &[]),
        dir.join("b1.log"),
    )?;
    assert_eq!(
        boot.wait_exit()?.code(),
        Some(8),
        "{}",
        tail(&boot.log_text(), 5)
    );
    assert!(boot.log_text().contains("is not empty"));
    assert_eq!(std::fs::read(full.join("important.txt"))?, b"do not touch");

    // A WAL store of cluster one, then a bootstrap from cluster two into it.
    // Written by postgres, as bootstrap runs: a store of another OS user is refused first.
    let mut r = Receiver::new(&dir, &s1.addr, "rm");
    r.as_postgres = true;
    r.spawn()?;
    r.wait_streaming()?;
    r.proc.term();
    let mut boot = Proc::spawn(
        bootstrap_cmd(&s2.addr, "rm", &dir.join("sb2"), &r.wal_dir, &[]),
        dir.join("b2.log"),
    )?;
    assert_eq!(
        boot.wait_exit()?.code(),
        Some(4),
        "{}",
        tail(&boot.log_text(), 5)
    );
    assert!(boot.log_text().contains("refusing to mix clusters"));
    assert!(
        !dir.join("sb2").exists(),
        "the target was created before the refusal"
    );

    // An unfinished bootstrap of cluster one, resumed from cluster two: refused, untouched.
    let half = dir.join("half");
    postgres_dir(&half)?;
    let one_id = one.sql("SELECT system_identifier FROM pg_control_system()")?;
    std::fs::write(
        half.join("walship-bootstrap.incomplete"),
        format!("wal-receiver bootstrap in progress\nsystem_identifier={one_id}\n"),
    )?;
    std::fs::write(half.join("PG_VERSION"), b"15\n")?;
    let mut boot = Proc::spawn(
        bootstrap_cmd(&s2.addr, "rh", &half, &dir.join("wal-rh"), &[]),
        dir.join("b3.log"),
    )?;
    assert_eq!(
        boot.wait_exit()?.code(),
        Some(4),
        "{}",
        tail(&boot.log_text(), 5)
    );
    assert!(
        boot.log_text()
            .contains(&format!("holds an unfinished bootstrap of system {one_id}")),
        "{}",
        tail(&boot.log_text(), 5)
    );
    assert_eq!(std::fs::read(half.join("PG_VERSION"))?, b"15\n");
    Ok(())
}

#[test]
fn two_receivers_bootstrap_at_the_same_time() -> Result<()> {
    let dir = TestDir::new("twoboot");
    let pg = Pg::start_primary(&dir, "primary", "")?;
    pg.pgbench_init(2)?;
    let sender = Sender::start(&dir, &pg)?;
    let mut boots = Vec::new();
    for name in ["ba", "bb"] {
        let cmd = bootstrap_cmd(
            &sender.addr,
            name,
            &dir.join(&format!("standby-{name}")),
            &dir.join(&format!("wal-{name}")),
            &[],
        );
        boots.push(Proc::spawn(
            cmd,
            dir.join(&format!("bootstrap-{name}.log")),
        )?);
    }
    for b in &mut boots {
        let st = b.wait_exit()?;
        assert!(
            st.success(),
            "bootstrap failed: {}",
            tail(&b.log_text(), 10)
        );
    }
    let want = pgbench_fingerprint(&pg, &[])?;
    for name in ["ba", "bb"] {
        let standby = Pg::start_existing(
            &dir,
            &dir.join(&format!("standby-{name}")),
            &format!("standby-{name}"),
        )?;
        assert_eq!(standby.sql("SELECT pg_is_in_recovery()")?, "t");
        assert_eq!(
            pgbench_fingerprint(&standby, &[])?,
            want,
            "standby {name} differs"
        );
    }
    Ok(())
}

/// A receiver whose slot the primary invalidated stops with exit 3 and advice to bootstrap
/// again; the bootstrap then works under the same name.
#[test]
fn lost_slot_stops_the_receiver_and_a_new_bootstrap_recovers() -> Result<()> {
    let dir = TestDir::new("lostslot");
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
    r.spawn()?;
    assert_eq!(
        r.proc.wait_exit()?.code(),
        Some(3),
        "{}",
        tail(&r.proc.log_text(), 5)
    );
    assert!(
        r.proc.log_text().contains("invalidated"),
        "{}",
        tail(&r.proc.log_text(), 5)
    );

    let pgdata = dir.join("standby");
    let mut boot = Proc::spawn(
        bootstrap_cmd(&sender.addr, "rl", &pgdata, &dir.join("wal-new"), &[]),
        dir.join("bootstrap.log"),
    )?;
    assert!(
        boot.wait_exit()?.success(),
        "bootstrap failed: {}",
        tail(&boot.log_text(), 10)
    );
    let standby = Pg::start_existing(&dir, &pgdata, "standby")?;
    assert_eq!(
        pgbench_fingerprint(&standby, &[])?,
        pgbench_fingerprint(&pg, &[])?
    );
    Ok(())
}
