//! Bounded WAL stores, against real PostgreSQL 15: `follow --keep-wal 64MB` keeps the sealed
//! segments below the limit plus one segment's worth through a few hundred MB of WAL, and a
//! served standby that is stopped holds every segment from its replay position on until it
//! has replayed them.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use walship_common::{Lsn, SegmentNo, TimelineId, WalFileName, WalSegSize};
use walship_tests::*;

const LIMIT: u64 = 64_000_000;

fn seg() -> WalSegSize {
    WalSegSize::new(16 << 20).unwrap()
}

/// The limit plus one sealed segment (a compressed segment of hex text is far below its
/// raw size; the raw size plus zstd's framing bounds it).
fn bound() -> u64 {
    LIMIT + (16 << 20) + (64 << 10)
}

/// Bytes of the sealed segments in the store.
fn sealed_bytes(wal_dir: &Path) -> u64 {
    std::fs::read_dir(wal_dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".zst"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Samples the sealed total every 50 ms until dropped; `max` holds the largest seen.
struct Sampler {
    stop: Arc<AtomicBool>,
    max: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(wal_dir: &Path) -> Sampler {
        let (stop, max) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let (s, m, dir) = (stop.clone(), max.clone(), wal_dir.to_owned());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                m.fetch_max(sealed_bytes(&dir), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Sampler {
            stop,
            max,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.max.load(Ordering::Relaxed)
    }
}

/// Writes about `mb` MB of WAL of random hex text (compresses to about half), in batches.
fn write_wal(pg: &Pg, mb: u64) -> Result<()> {
    pg.sql("CREATE TABLE IF NOT EXISTS junk (v text)")?;
    // About 200 bytes of WAL per row.
    for _ in 0..(mb / 40).max(1) {
        pg.sql(
            "INSERT INTO junk SELECT md5(random()::text) || md5(random()::text) || md5(random()::text) || md5(random()::text) FROM generate_series(1, 200000)",
        )?;
    }
    pg.sql("TRUNCATE junk")?;
    Ok(())
}

fn segment_name(segno: SegmentNo) -> String {
    WalFileName::Segment {
        timeline: TimelineId(1),
        segno,
    }
    .to_name(seg())
}

fn kept(wal_dir: &Path, segno: SegmentNo) -> bool {
    let name = segment_name(segno);
    wal_dir.join(format!("{name}.zst")).exists() || wal_dir.join(format!("{name}.partial")).exists()
}

#[test]
fn keep_wal_bounds_a_followers_store_through_pgbench() -> Result<()> {
    let dir = TestDir::new("retsize");
    let pg = Pg::start_primary(&dir, "primary", "")?;
    let sender = Sender::start(&dir, &pg)?;
    let mut r = Receiver::new(&dir, &sender.addr, "r1");
    r.extra = vec!["--keep-wal".into(), "64MB".into()];
    r.spawn()?;
    let first = r.wait_streaming()?;
    let sampler = Sampler::start(&r.wal_dir);
    pg.pgbench_init(20)?;
    let mut bench = pg.pgbench(4, 10)?;
    assert!(bench.wait()?.success(), "pgbench failed");
    write_wal(&pg, 250)?;
    let end = pg.flush_lsn()?;
    r.wait_flush(end)?;
    let produced = end.saturating_sub(first);
    assert!(
        produced > 300 << 20,
        "the run produced only {produced} bytes of WAL"
    );
    // Sealing is in the background: wait until every complete segment is sealed.
    let last_complete = SegmentNo(seg().segment_of(end).0 - 1);
    wait_for("the last complete segment to be sealed", || {
        Ok(r.wal_dir
            .join(format!("{}.zst", segment_name(last_complete)))
            .exists()
            .then_some(()))
    })?;
    let max = sampler.finish();
    assert!(
        max <= bound(),
        "the sealed segments reached {max} bytes, above {LIMIT} plus a segment"
    );
    let now = sealed_bytes(&r.wal_dir);
    assert!(now <= bound(), "the store holds {now} sealed bytes");
    // Retention did act: the first segment is gone, and the removal was logged.
    assert!(
        !kept(&r.wal_dir, seg().segment_of(first)),
        "the first segment is still kept"
    );
    let removals = r
        .proc
        .log_events("removed the oldest sealed segments beyond the retention limit");
    assert!(!removals.is_empty(), "{}", tail(&r.proc.log_text(), 10));
    // The newest segments are all there, from the oldest kept on.
    let st = r.status()?;
    let oldest = st["retention"]["oldest_kept"]
        .as_str()
        .expect("status shows the oldest segment kept")
        .to_owned();
    assert!(
        st["retention"]["reason"]
            .as_str()
            .is_some_and(|s| s.starts_with("size limit")),
        "{st}"
    );
    assert!(st["retention"]["setting"]
        .as_str()
        .is_some_and(|s| s.contains("64.0 MB") || s.contains("64000000")));
    let oldest_segno = match WalFileName::parse(&oldest, seg()) {
        Some(WalFileName::Segment { segno, .. }) => segno,
        _ => bail!("status names {oldest}"),
    };
    for s in oldest_segno.0..=last_complete.0 {
        assert!(kept(&r.wal_dir, SegmentNo(s)), "segment {s} is missing");
    }
    let text = std::process::Command::new(bin("wal-receiver"))
        .args(["status", "--wal-dir"])
        .arg(&r.wal_dir)
        .output()?;
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("retention:") && text.contains("size limit"),
        "{text}"
    );
    Ok(())
}

#[test]
fn keep_wal_is_refused_in_a_backup_repository() -> Result<()> {
    let dir = TestDir::new("retrepo");
    std::fs::create_dir_all(dir.join("repo/backups"))?;
    let mut r = Receiver::new(&dir, "127.0.0.1:1", "r1");
    r.wal_dir = dir.join("repo/wal");
    r.extra = vec!["--keep-wal".into(), "1GB".into()];
    let (code, log) = r.run_to_exit()?;
    assert_eq!(code, Some(2), "{log}");
    assert!(log.contains("prune"), "{log}");
    Ok(())
}

/// A primary, a sender, a standby bootstrapped through the receiver, and the receiver
/// serving it with `--keep-wal 64MB`.
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
    let mut receiver = Receiver::new(&dir, &sender.addr, "sb");
    receiver.wal_dir = wal_dir.clone();
    receiver.as_postgres = true;
    receiver.extra = vec![
        "--serve-standby".into(),
        wal_dir.display().to_string(),
        "--keep-wal".into(),
        "64MB".into(),
    ];
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

fn wait_replayed(standby: &Pg, lsn: Lsn) -> Result<()> {
    wait_for(&format!("the standby to replay {lsn}"), || {
        Ok((replay_lsn(standby)? >= lsn).then_some(()))
    })
}

#[test]
fn a_stopped_standby_holds_its_wal_until_it_has_replayed_it() -> Result<()> {
    let mut s = setup("retstandby")?;
    let target = s.primary.flush_lsn()?;
    wait_replayed(&s.standby, target)?;
    // The receiver has heard the standby's replay position.
    wait_for("status to show the standby's replay", || {
        let st = s.receiver.status()?;
        let replay = st["standby"]["replay_lsn"]
            .as_str()
            .and_then(|l| l.parse::<Lsn>().ok());
        Ok(replay.filter(|l| *l >= target))
    })?;
    s.standby.stop()?;
    let replay = s.receiver.status()?["standby"]["replay_lsn"]
        .as_str()
        .unwrap()
        .parse::<Lsn>()?;
    let held_from = seg().segment_of(replay);
    // Far more WAL than the limit while the standby is away.
    write_wal(&s.primary, 250)?;
    let end = s.primary.flush_lsn()?;
    s.receiver.wait_flush(end)?;
    let last_complete = SegmentNo(seg().segment_of(end).0 - 1);
    wait_for("the last complete segment to be sealed", || {
        Ok(s.receiver
            .wal_dir
            .join(format!("{}.zst", segment_name(last_complete)))
            .exists()
            .then_some(()))
    })?;
    for n in held_from.0..=last_complete.0 {
        assert!(
            kept(&s.receiver.wal_dir, SegmentNo(n)),
            "segment {n} was removed though the stopped standby has not replayed it"
        );
    }
    let held = sealed_bytes(&s.receiver.wal_dir);
    assert!(
        held > bound(),
        "only {held} sealed bytes: the test did not pass the limit"
    );
    let st = s.receiver.status()?;
    assert!(
        st["retention"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("standby's replay position")),
        "{st}"
    );
    // The standby comes back and catches up: retention trims back once it has.
    s.standby.start()?;
    wait_replayed(&s.standby, end)?;
    wait_for(
        "the standby's new replay position to reach the receiver",
        || {
            let st = s.receiver.status()?;
            Ok(st["standby"]["replay_lsn"]
                .as_str()
                .and_then(|l| l.parse::<Lsn>().ok())
                .filter(|l| *l >= end))
        },
    )?;
    // Trimming runs after each seal: seal a few more segments.
    wait_for("retention to trim back below the limit", || {
        s.primary
            .sql("CREATE TABLE IF NOT EXISTS t (v int); INSERT INTO t VALUES (1); SELECT pg_switch_wal()")?;
        std::thread::sleep(Duration::from_millis(500));
        Ok((sealed_bytes(&s.receiver.wal_dir) <= bound()).then_some(()))
    })?;
    assert!(
        !kept(&s.receiver.wal_dir, held_from),
        "the segment the standby needed is still kept after it replayed it"
    );
    assert!(
        s.receiver.proc.is_running(),
        "{}",
        tail(&s.receiver.proc.log_text(), 10)
    );
    let _ = &s.dir;
    Ok(())
}
