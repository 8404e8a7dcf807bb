//! Failover, against real PostgreSQL 15: a primary and two standbys, each fed by a receiver
//! that lists every node's sender. The primary crashes, `scripts/failover.sh` promotes the
//! most up-to-date standby, and the other receiver and its standby follow timeline 2 by
//! themselves. Along the way: no acknowledged commit is lost under `ANY 1` synchronous
//! replication, a receiver that holds WAL of the old history refuses the new one, the old
//! primary restarted on timeline 1 is not followed, and each timeline reads back whole.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use walship_common::timeline::History;
use walship_common::{Lsn, TimelineId};
use walship_tests::*;

const ACKED: &str = "SELECT count(*), sum(id) FROM acked";

/// A standby with its receiver, whose `--sender` list names every node.
struct Node {
    name: String,
    pg: Pg,
    receiver: Receiver,
    /// Where a sender listens if this node is promoted.
    listen: String,
}

fn node(dir: &TestDir, name: &str, senders: &[String], listen: &str) -> Result<Node> {
    let wal_dir = dir.join(&format!("wal-{name}"));
    let mut boot = Proc::spawn(
        bootstrap_cmd(&senders[0], name, &dir.join(name), &wal_dir, &[]),
        dir.join(&format!("bootstrap-{name}.log")),
    )?;
    if !boot.wait_exit()?.success() {
        bail!("bootstrap {name} failed: {}", tail(&boot.log_text(), 10));
    }
    let mut receiver = Receiver::new(dir, &senders[0], name);
    receiver.wal_dir = wal_dir.clone();
    receiver.as_postgres = true;
    for s in &senders[1..] {
        receiver.extra.extend(["--sender".to_owned(), s.clone()]);
    }
    receiver
        .extra
        .extend(["--serve-standby".to_owned(), wal_dir.display().to_string()]);
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

fn failover_cmd(nodes: &[&Node]) -> Command {
    let mut c = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/failover.sh"));
    c.arg("--bin")
        .arg(bin("wal-receiver").parent().expect("bin dir"))
        .arg("--pg-bin")
        .arg(pg_bin())
        .args(["--wait", "120"]);
    for n in nodes {
        c.args(["--candidate", &n.name, "--wal-dir"])
            .arg(&n.receiver.wal_dir)
            .arg("--pgdata")
            .arg(&n.pg.data)
            .args(["--standby", &n.pg.conninfo(), "--listen", &n.listen]);
    }
    c
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

fn store_status(r: &Receiver) -> Result<serde_json::Value> {
    r.status()
}

fn lsn_of(v: &serde_json::Value) -> Result<Lsn> {
    v.as_str()
        .context("not a string")?
        .parse()
        .map_err(Into::into)
}

/// The switch point of timeline 1 in the store's history file of timeline 2.
fn switch_point(wal_dir: &Path) -> Result<Lsn> {
    let content = std::fs::read(wal_dir.join("00000002.history"))?;
    let h = History::parse(TimelineId(2), &content).map_err(anyhow::Error::msg)?;
    Ok(h.switch_from(TimelineId(1)).context("no switch from 1")?.0)
}

#[test]
fn failover_to_the_most_recent_standby_without_losing_commits() -> Result<()> {
    let dir = TestDir::new("failover");
    let mut primary = Pg::start_primary(&dir, "primary", "wal_keep_size = 256MB")?;
    primary.pgbench_init(2)?;
    primary.sql("CREATE TABLE acked (id int PRIMARY KEY)")?;
    let sender_a = Sender::start(&dir, &primary)?;
    let (listen_b, listen_c) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let senders = vec![sender_a.addr.clone(), listen_b.clone(), listen_c.clone()];
    let b = node(&dir, "nb", &senders, &listen_b)?;
    let c = node(&dir, "nc", &senders, &listen_c)?;
    // A third receiver follows only the old primary: it will end up on the old history.
    let mut d = Receiver::new(&dir, &sender_a.addr, "nd");
    d.spawn()?;
    d.wait_streaming()?;

    primary.sql("ALTER SYSTEM SET synchronous_standby_names = 'ANY 1 (nb, nc)'")?;
    primary.sql("SELECT pg_reload_conf()")?;
    wait_for("both receivers to be synchronous candidates", || {
        let n = primary.sql(
            "SELECT count(*) FROM pg_stat_replication WHERE application_name IN ('nb','nc') AND sync_state = 'quorum'",
        )?;
        Ok((n == "2").then_some(()))
    })?;

    // Load, and a client that records every commit the primary acknowledged.
    let script = dir.join("acked.sql");
    let mut sql = String::new();
    for i in 1..=200_000 {
        sql.push_str(&format!("INSERT INTO acked VALUES ({i});\n\\echo {i}\n"));
    }
    std::fs::write(&script, sql)?;
    let mut client = Command::new(pg_tool("psql"));
    client
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d"])
        .arg(primary.conninfo())
        .arg("-f")
        .arg(&script);
    let mut client = Proc::spawn(client, dir.join("acked.out"))?;
    let mut bench = primary.pgbench(2, 30)?;
    // A fourth receiver stops early: after the failover it has the rest of timeline 1 to
    // fetch from the new primary before it can switch.
    let mut e = Receiver::new(&dir, &sender_a.addr, "ne");
    e.spawn()?;
    std::thread::sleep(std::time::Duration::from_secs(2));
    e.proc.term();
    std::thread::sleep(std::time::Duration::from_secs(3));
    primary.stop_immediate()?;
    let _ = client.wait_exit();
    let _ = bench.wait();
    let acked: u32 = client
        .log_text()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .max()
        .context("the client saw no acknowledged commit")?;
    assert!(acked > 10, "only {acked} commits before the crash");

    // Failover.
    let _senders = [&b, &c].map(|n| {
        KillOnDrop(PathBuf::from(format!(
            "{}.sender.pid",
            n.receiver.wal_dir.display()
        )))
    });
    let out = failover_cmd(&[&b, &c]).output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "failover.sh failed:\n{text}");
    let (new, other) = if text.contains("chose nb") {
        (b, c)
    } else if text.contains("chose nc") {
        (c, b)
    } else {
        bail!("failover.sh did not say what it chose:\n{text}");
    };
    // The store the script chose held the most recent WAL of the two, as the script saw
    // them before it promoted (its candidate lines: "<name> store: timeline T, flush X").
    let seen: Vec<(String, Lsn)> = text
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.trim().split_once(' ')?;
            let flush = rest.split("flush ").nth(1)?.split(';').next()?;
            Some((name.to_owned(), flush.parse().ok()?))
        })
        .collect();
    assert_eq!(
        seen.len(),
        2,
        "failover.sh did not list both candidates:\n{text}"
    );
    let most = seen.iter().map(|(_, l)| *l).max().expect("two candidates");
    let chosen = seen
        .iter()
        .find(|(n, _)| *n == new.name)
        .expect("chosen listed")
        .1;
    assert_eq!(
        chosen, most,
        "chose {} at {chosen}, not the most recent:\n{text}",
        new.name
    );
    assert!(text.contains("promoted"), "{text}");
    assert_eq!(new.pg.sql("SELECT pg_is_in_recovery()")?, "f");

    // Every commit the old primary acknowledged is on the new primary.
    let present = new
        .pg
        .sql(&format!("SELECT count(*) FROM acked WHERE id <= {acked}"))?;
    assert_eq!(
        present,
        acked.to_string(),
        "acknowledged commits lost in the failover"
    );

    // The other receiver finds the new primary, follows timeline 2, and its standby too.
    let mut other = other;
    wait_for("the other receiver to follow timeline 2", || {
        if !other.receiver.proc.is_running() {
            bail!(
                "receiver exited:\n{}",
                tail(&other.receiver.proc.log_text(), 20)
            );
        }
        Ok((store_status(&other.receiver)?["timeline"] == 2).then_some(()))
    })?;
    new.pg
        .sql("INSERT INTO acked SELECT g FROM generate_series(1000001, 1001000) g")?;
    let mut bench = new.pg.pgbench(2, 3)?;
    assert!(bench.wait()?.success(), "pgbench on the new primary failed");
    let target = new.pg.flush_lsn()?;
    other.receiver.wait_flush(target)?;
    wait_for("the other standby to replay timeline 2", || {
        let r: Lsn = other.pg.sql("SELECT pg_last_wal_replay_lsn()")?.parse()?;
        Ok((r >= target).then_some(()))
    })?;
    // status asks the standby itself what a failover needs.
    let out = Command::new(bin("wal-receiver"))
        .args(["status", "--json", "--wal-dir"])
        .arg(&other.receiver.wal_dir)
        .args(["--standby", &other.pg.conninfo()])
        .output()?;
    let st: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(st["timeline"], 2, "{st}");
    assert_eq!(st["history_timelines"], serde_json::json!([2]), "{st}");
    let sb = &st["standby_server"];
    assert_eq!(sb["in_recovery"], true, "{st}");
    assert_eq!(sb["timeline"], 2, "{st}");
    assert!(lsn_of(&sb["replay_lsn"])? >= target, "{st}");
    // RFC 3339 in UTC, whatever the standby's DateStyle and TimeZone.
    assert!(
        sb["last_replay_time"]
            .as_str()
            .is_some_and(|t| t.len() >= 20 && t.as_bytes()[10] == b'T' && t.ends_with('Z')),
        "{st}"
    );
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

    // The receiver that stopped early gets the rest of timeline 1 from the new primary, the
    // end of that timeline, then timeline 2.
    let e_flush = e.flush_lsn()?;
    e.sender = new.listen.clone();
    e.spawn()?;
    e.wait_flush(target)?;
    let e_switch = switch_point(&e.wal_dir)?;
    assert!(
        e_flush < e_switch,
        "the early-stopped receiver was not behind: {e_flush} vs {e_switch}"
    );
    assert!(
        e.proc
            .log_text()
            .contains("the sender reached the end of the timeline"),
        "no end of timeline in its log"
    );
    assert_eq!(e.status()?["timeline"], 2);
    verify_timeline(
        &e.wal_dir,
        TimelineId(1),
        e_flush,
        e_switch,
        &dir.join("scratch-e"),
    )?;
    e.proc.term();

    // Persistence: the history file and the old timeline's last segment, and each
    // timeline reads back whole with pg_waldump.
    let wal = other.receiver.wal_dir.clone();
    let switch = switch_point(&wal)?;
    let seg = 16u64 << 20;
    if switch.0 % seg != 0 {
        let partial = wal.join(format!(
            "00000001{:08X}{:08X}.partial",
            switch.0 / seg / 256,
            switch.0 / seg % 256
        ));
        assert!(partial.exists(), "{} is missing", partial.display());
    }
    let start_tl1 = Lsn(switch.0 - switch.0 % seg).max(Lsn(seg * 2));
    let n1 = verify_timeline(
        &wal,
        TimelineId(1),
        Lsn(start_tl1.0 - seg),
        switch,
        &dir.join("scratch1"),
    )?;
    let n2 = verify_timeline(
        &wal,
        TimelineId(2),
        Lsn(switch.0 - switch.0 % seg),
        other.receiver.flush_lsn()?,
        &dir.join("scratch2"),
    )?;
    assert!(n1 > 0 && n2 > 0, "pg_waldump read {n1} and {n2} records");

    // The old primary comes back on timeline 1: receivers on timeline 2 do not follow it.
    primary.start()?;
    primary.sql("CHECKPOINT")?;
    let old_end = primary.flush_lsn()?;
    // A receiver that lists every sender re-chooses after a disconnect: it sees two
    // primaries and keeps to timeline 2.
    other.receiver.proc.term();
    other.receiver.spawn()?;
    wait_for("the other receiver to notice the old primary", || {
        Ok(other
            .receiver
            .proc
            .log_text()
            .contains("SEVERAL PRIMARIES")
            .then_some(()))
    })?;
    other.receiver.wait_streaming()?;
    assert_eq!(store_status(&other.receiver)?["timeline"], 2);
    // One that knows only the old primary's sender refuses it, and says why.
    other.receiver.proc.term();
    let mut lone = Receiver::new(&dir, &sender_a.addr, &other.name);
    lone.wal_dir = other.receiver.wal_dir.clone();
    lone.as_postgres = true;
    let flush_before = lone.flush_lsn()?;
    lone.spawn()?;
    wait_for("the lone receiver to refuse timeline 1", || {
        Ok(lone
            .proc
            .log_text()
            .contains("below this store's timeline 2")
            .then_some(()))
    })?;
    lone.proc.term();
    assert_eq!(
        lone.flush_lsn()?,
        flush_before,
        "a refused sender's WAL was stored"
    );
    assert_eq!(lone.status()?["timeline"], 2);

    // Divergence: the receiver that followed only the old primary now holds timeline-1 WAL
    // past the fork (the restarted primary wrote more). Pointed at the new primary, it
    // refuses, naming the fork.
    d.wait_flush(old_end)?;
    let d_flush = d.flush_lsn()?;
    d.proc.term();
    if d_flush > switch {
        d.sender = new.listen.clone();
        let (code, log) = d.run_to_exit()?;
        assert_eq!(
            code,
            Some(11),
            "diverged receiver did not exit 11:\n{}",
            tail(&log, 10)
        );
        assert!(
            log.contains(&switch.to_string()) && log.contains("bootstrap"),
            "the refusal does not name the fork {switch}:\n{}",
            tail(&log, 5)
        );
        assert_eq!(d.flush_lsn()?, d_flush, "the diverged store changed");
        assert_eq!(d.status()?["timeline"], 1);
    } else {
        bail!("the receiver of the old primary did not get WAL past the fork {switch} ({d_flush})");
    }
    // A fresh bootstrap of it from the new primary succeeds.
    let target_dir: PathBuf = dir.join("nd-again");
    // It lists both senders: the old primary's (timeline 1) and the new one's.
    let mut cmd = bootstrap_cmd(
        &sender_a.addr,
        "nd",
        &target_dir,
        &dir.join("wal-nd-again"),
        &[],
    );
    cmd.args(["--sender", &new.listen]);
    let mut boot = Proc::spawn(cmd, dir.join("bootstrap-nd-again.log"))?;
    assert!(
        boot.wait_exit()?.success(),
        "bootstrap from the new primary failed: {}",
        tail(&boot.log_text(), 10)
    );
    assert_eq!(status_json(&dir.join("wal-nd-again"))?["timeline"], 2);
    Ok(())
}

/// A sender serving a standby, which is then promoted: the sender ships the history file
/// and the new timeline, and its receiver continues on timeline 2 without a restart.
#[test]
fn a_sender_on_a_promoted_standby_carries_its_receiver_to_the_new_timeline() -> Result<()> {
    let dir = TestDir::new("promote");
    let primary = Pg::start_primary(&dir, "primary", "wal_keep_size = 128MB")?;
    primary.pgbench_init(1)?;
    let sender = Sender::start(&dir, &primary)?;
    let s = node(&dir, "ns", std::slice::from_ref(&sender.addr), "unused")?;
    let cascade = Sender::start_with(&dir, &s.pg, "sender-on-standby", &[])?;
    let mut r = Receiver::start(&dir, &cascade.addr, "nr")?;
    let mut bench = primary.pgbench(2, 3)?;
    assert!(bench.wait()?.success());
    let before = primary.flush_lsn()?;
    wait_for("the standby to replay", || {
        let l: Lsn = s.pg.sql("SELECT pg_last_wal_replay_lsn()")?.parse()?;
        Ok((l >= before).then_some(()))
    })?;
    s.pg.promote()?;
    let mut bench = s.pg.pgbench(2, 3)?;
    assert!(
        bench.wait()?.success(),
        "pgbench on the promoted standby failed"
    );
    let target = s.pg.flush_lsn()?;
    r.wait_flush(target)?;
    assert_eq!(r.status()?["timeline"], 2);
    assert!(
        r.proc
            .log_text()
            .contains("the sender reached the end of the timeline"),
        "{}",
        tail(&r.proc.log_text(), 20)
    );
    assert!(
        cascade.proc.log_text().contains("end of timeline"),
        "the sender did not relay the end of the timeline"
    );
    let switch = switch_point(&r.wal_dir)?;
    let seg = 16u64 << 20;
    let first = Lsn(switch.0 - switch.0 % seg);
    verify_timeline(&r.wal_dir, TimelineId(1), first, switch, &dir.join("s1"))?;
    verify_timeline(&r.wal_dir, TimelineId(2), first, target, &dir.join("s2"))?;
    Ok(())
}
