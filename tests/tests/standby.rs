//! The standby fed over PostgreSQL's own streaming replication protocol by
//! `wal-receiver follow --serve-standby`, against real PostgreSQL 15: streaming through the
//! receiver, remote_apply, hot-standby feedback, and restarts in either order.

use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Result};
use walship_common::Lsn;
use walship_tests::*;

/// A primary with pgbench tables, a sender, a standby bootstrapped with the default
/// (streaming) feed, and its receiver serving it.
struct Setup {
    dir: TestDir,
    primary: Pg,
    _sender: Sender,
    receiver: Receiver,
    standby: Pg,
}

fn setup(name: &str) -> Result<Setup> {
    let dir = TestDir::new(name);
    let primary = Pg::start_primary(&dir, "primary", "")?;
    primary.pgbench_init(2)?;
    let sender = Sender::start(&dir, &primary)?;
    let wal_dir = dir.join("wal");
    let mut boot = Proc::spawn(
        bootstrap_cmd(&sender.addr, "sb", &dir.join("standby"), &wal_dir, &[]),
        dir.join("bootstrap.log"),
    )?;
    let st = boot.wait_exit()?;
    if !st.success() {
        bail!("bootstrap failed: {}", tail(&boot.log_text(), 10));
    }
    let conf = std::fs::read_to_string(dir.join("standby/postgresql.auto.conf"))?;
    assert!(
        conf.contains(&format!(
            "primary_conninfo = 'host={} port=5432 application_name=sb'",
            wal_dir.display()
        )),
        "bootstrap did not configure streaming from the receiver:\n{conf}"
    );
    let mut receiver = Receiver::new(&dir, &sender.addr, "sb");
    receiver.wal_dir = wal_dir.clone();
    receiver.as_postgres = true;
    receiver.extra = vec!["--serve-standby".into(), wal_dir.display().to_string()];
    receiver.spawn()?;
    receiver.wait_streaming()?;
    let standby = Pg::start_existing(&dir, &dir.join("standby"), "standby")?;
    Ok(Setup {
        dir,
        primary,
        _sender: sender,
        receiver,
        standby,
    })
}

fn replay_lsn(standby: &Pg) -> Result<Lsn> {
    Ok(standby.sql("SELECT pg_last_wal_replay_lsn()")?.parse()?)
}

fn wait_streaming_from_receiver(s: &Setup) -> Result<()> {
    let want_host = s.receiver.wal_dir.display().to_string();
    wait_for("the standby to stream from the receiver", || {
        let row = s
            .standby
            .sql("SELECT status || '|' || coalesce(sender_host, '') FROM pg_stat_wal_receiver")?;
        Ok((row == format!("streaming|{want_host}")).then_some(()))
    })
}

fn wait_replayed(standby: &Pg, lsn: Lsn) -> Result<()> {
    wait_for(&format!("the standby to replay {lsn}"), || {
        Ok((replay_lsn(standby)? >= lsn).then_some(()))
    })
}

#[test]
fn standby_streams_through_the_receiver_and_its_replay_travels_upstream() -> Result<()> {
    let s = setup("sbstream")?;
    wait_streaming_from_receiver(&s)?;
    let mut bench = s.primary.pgbench(4, 8)?;
    assert!(bench.wait()?.success(), "pgbench failed");
    let target = s.primary.flush_lsn()?;
    wait_replayed(&s.standby, target)?;
    assert_eq!(
        pgbench_fingerprint(&s.standby, &[])?,
        pgbench_fingerprint(&s.primary, &[])?,
        "the standby's data differs from the primary's"
    );
    // The primary sees the standby's replay position through walship.
    wait_for("pg_stat_replication to show the standby's replay", || {
        let r = s.primary.sql(
            "SELECT coalesce(replay_lsn::text, '') FROM pg_stat_replication WHERE application_name = 'sb'",
        )?;
        Ok(r.parse::<Lsn>().ok().filter(|l| *l >= target).map(|_| ()))
    })?;
    // And so does `status`.
    wait_for("status to show the standby", || {
        let st = s.receiver.status()?;
        let replay = st["standby"]["replay_lsn"]
            .as_str()
            .and_then(|l| l.parse::<Lsn>().ok());
        Ok(
            (st["standby"]["connected"] == true && replay.is_some_and(|l| l >= target))
                .then_some(()),
        )
    })?;
    Ok(())
}

#[test]
fn remote_apply_waits_for_the_standby_behind_the_receiver() -> Result<()> {
    let mut s = setup("sbapply")?;
    wait_streaming_from_receiver(&s)?;
    s.primary.sql("CREATE TABLE seen (v int)")?;
    s.primary
        .sql("ALTER SYSTEM SET synchronous_standby_names = 'sb'")?;
    s.primary
        .sql("ALTER SYSTEM SET synchronous_commit = remote_apply")?;
    s.primary.sql("SELECT pg_reload_conf()")?;
    wait_for("the receiver to be the synchronous standby", || {
        let st = s
            .primary
            .sql("SELECT sync_state FROM pg_stat_replication WHERE application_name = 'sb'")?;
        Ok((st == "sync").then_some(()))
    })?;
    for v in 1..=5 {
        s.primary.sql(&format!("INSERT INTO seen VALUES ({v})"))?;
        // The commit returned: the standby has replayed it.
        assert_eq!(
            s.standby
                .sql(&format!("SELECT count(*) FROM seen WHERE v = {v}"))?,
            "1",
            "row {v} not visible on the standby when the commit returned"
        );
    }
    // With the standby stopped, a commit waits.
    s.standby.stop()?;
    let mut c = std::process::Command::new(pg_tool("psql"));
    c.args(["-X", "-d"])
        .arg(s.primary.conninfo())
        .args(["-c", "INSERT INTO seen VALUES (100)"]);
    let mut waiting = Proc::spawn(c, s.dir.join("waiting-insert.log"))?;
    wait_for("the commit to wait for the standby", || {
        let w = s
            .primary
            .sql("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'")?;
        Ok((w == "1").then_some(()))
    })?;
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        waiting.is_running(),
        "the commit did not wait for the standby"
    );
    s.standby.start()?;
    let st = waiting.wait_exit()?;
    assert!(st.success(), "{}", waiting.log_text());
    assert_eq!(
        s.standby.sql("SELECT count(*) FROM seen WHERE v = 100")?,
        "1"
    );
    Ok(())
}

#[test]
fn hot_standby_feedback_holds_the_primarys_xmin_and_releases_it() -> Result<()> {
    let s = setup("sbfeedback")?;
    s.standby
        .sql("ALTER SYSTEM SET hot_standby_feedback = on")?;
    s.standby
        .sql("ALTER SYSTEM SET wal_receiver_status_interval = '1s'")?;
    s.standby.sql("SELECT pg_reload_conf()")?;
    wait_streaming_from_receiver(&s)?;
    let slot_xmin = || -> Result<Option<u64>> {
        let x = s
            .primary
            .sql("SELECT coalesce(xmin::text, '') FROM pg_replication_slots WHERE slot_name = 'walship_sb'")?;
        Ok(x.parse().ok())
    };
    // A long transaction on the standby holds a snapshot.
    let mut session = s.standby.psql_session()?;
    let stdin = session.stdin.as_mut().unwrap();
    writeln!(stdin, "BEGIN ISOLATION LEVEL REPEATABLE READ;")?;
    writeln!(stdin, "SELECT count(*) FROM pgbench_accounts;")?;
    stdin.flush()?;
    let held = wait_for(
        "the slot's xmin to be set by the standby's feedback",
        slot_xmin,
    )?;
    // Transactions on the primary move on, but the held xmin stays while the query lasts.
    for _ in 0..20 {
        s.primary.sql("SELECT txid_current()")?;
    }
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        slot_xmin()?,
        Some(held),
        "the xmin moved while the standby's query ran"
    );
    // The query ends: the xmin is released.
    writeln!(session.stdin.as_mut().unwrap(), "COMMIT;")?;
    drop(session.stdin.take());
    session.wait()?;
    wait_for("the slot's xmin to move on", || {
        Ok(match slot_xmin()? {
            None => Some(()),
            Some(x) if x > held => Some(()),
            Some(_) => None,
        })
    })?;
    Ok(())
}

#[test]
fn restarts_of_receiver_and_standby_in_either_order_resume_streaming() -> Result<()> {
    let mut s = setup("sbrestart")?;
    wait_streaming_from_receiver(&s)?;
    let mut bench = s.primary.pgbench(2, 20)?;
    // Receiver first, then the standby.
    std::thread::sleep(Duration::from_secs(2));
    s.receiver.proc.term();
    std::thread::sleep(Duration::from_secs(1));
    s.receiver.spawn()?;
    wait_streaming_from_receiver(&s)?;
    s.standby.stop()?;
    std::thread::sleep(Duration::from_secs(1));
    s.standby.start()?;
    wait_streaming_from_receiver(&s)?;
    // Standby first, then the receiver (SIGKILL this time).
    s.standby.stop()?;
    s.receiver.proc.kill9();
    s.standby.start()?;
    std::thread::sleep(Duration::from_secs(1));
    s.receiver.spawn()?;
    wait_streaming_from_receiver(&s)?;
    assert!(bench.wait()?.success(), "pgbench failed");
    let target = s.primary.flush_lsn()?;
    wait_replayed(&s.standby, target)?;
    assert_eq!(
        pgbench_fingerprint(&s.standby, &[])?,
        pgbench_fingerprint(&s.primary, &[])?,
        "the standby's data differs after the restarts"
    );
    // From the start of the store's first segment: the first request may fall in the
    // zeros after a segment switch, where no record starts.
    let seg = walship_common::WalSegSize::new(16 << 20).unwrap();
    let first = s.receiver.requested_starts()[0].segment_start(seg);
    verify_wal(&s.receiver.wal_dir, first, &s.dir.join("verify"))?;
    Ok(())
}

#[test]
fn a_corrupt_segment_is_reported_once_however_often_the_standby_asks() -> Result<()> {
    let mut s = setup("sbcorrupt")?;
    wait_streaming_from_receiver(&s)?;
    // The standby has everything, up to the middle of a segment.
    s.primary.sql("CREATE TABLE before_stop (v int)")?;
    let target = s.primary.flush_lsn()?;
    wait_replayed(&s.standby, target)?;
    let seg = walship_common::WalSegSize::new(16 << 20).unwrap();
    let wanted = walship_common::WalFileName::Segment {
        timeline: walship_common::TimelineId(1),
        segno: seg.segment_of(replay_lsn(&s.standby)?),
    }
    .to_name(seg);
    s.standby.stop()?;
    // That segment is completed and sealed while the standby is away, then damaged.
    s.primary.sql("CREATE TABLE while_stopped (v int)")?;
    s.primary.sql("SELECT pg_switch_wal()")?;
    s.primary.sql("CREATE TABLE after_switch (v int)")?;
    s.receiver.wait_flush(s.primary.flush_lsn()?)?;
    let sealed = s.receiver.wal_dir.join(format!("{wanted}.zst"));
    wait_for(&format!("{wanted} to be sealed"), || {
        Ok(sealed.exists().then_some(()))
    })?;
    let mut bytes = std::fs::read(&sealed)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&sealed, &bytes)?;
    let starts_before = s.receiver.proc.log_events("standby starts streaming").len();
    // The standby asks for it again and again (every wal_retrieve_retry_interval).
    s.standby.start()?;
    wait_for("the standby to ask for the segment three times", || {
        let starts = s.receiver.proc.log_events("standby starts streaming").len();
        Ok((starts >= starts_before + 3).then_some(()))
    })?;
    let log = s.receiver.proc.log_text();
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .is_ok_and(|v| v["level"] == "ERROR" && l.contains("corrupt"))
        })
        .collect();
    assert_eq!(
        errors.len(),
        1,
        "the corrupt segment was not reported exactly once:\n{}",
        tail(&log, 20)
    );
    assert!(errors[0].contains(&wanted), "{}", errors[0]);
    assert!(s.receiver.proc.is_running(), "{}", tail(&log, 10));
    // The standby was told why, in its own log.
    wait_for("the standby to log why streaming failed", || {
        Ok(s.standby
            .log_text()
            .lines()
            .any(|l| l.contains("WAL stream") && l.contains("corrupt"))
            .then_some(()))
    })?;
    Ok(())
}
