//! WAL streaming against real PostgreSQL 15: continuity, outages, slots, synchronous
//! replication, several receivers, and hostile input.

use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Result};
use walship_common::Lsn;
use walship_tests::*;

const SLOT_PREFIX: &str = "walship_";

/// Checks the slot never runs ahead of the receiver's fsynced position. The slot is read
/// first: restart_lsn(t1) <= ack(t1) <= flush(t1) <= flush(t2).
fn check_slot_behind_flush(pg: &Pg, r: &Receiver) -> Result<Option<Lsn>> {
    let restart = pg.slot_restart_lsn(&format!("{SLOT_PREFIX}{}", r.name))?;
    let flush = r.flush_lsn()?;
    if let Some(restart) = restart {
        if restart > flush {
            bail!("slot restart_lsn {restart} is past the receiver's fsynced position {flush}");
        }
    }
    Ok(restart)
}

#[test]
fn streams_under_load_and_waldump_reads_every_byte() -> Result<()> {
    let dir = TestDir::new("load");
    let pg = Pg::start_primary(&dir, "primary", "")?;
    let sender = Sender::start(&dir, &pg)?;
    let mut r = Receiver::start(&dir, &sender.addr, "r1")?;
    let first = r.wait_streaming()?;
    pg.pgbench_init(5)?;
    let mut bench = pg.pgbench(4, 10)?;
    let mut restarts = Vec::new();
    while bench.try_wait()?.is_none() {
        if let Some(restart) = check_slot_behind_flush(&pg, &r)? {
            restarts.push(restart);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(bench.wait()?.success(), "pgbench failed");
    let target = pg.flush_lsn()?;
    r.wait_flush(target)?;
    check_slot_behind_flush(&pg, &r)?;
    // The slot advanced with the acknowledgements.
    wait_for("slot to advance", || {
        let restart = check_slot_behind_flush(&pg, &r)?;
        Ok(restart.filter(|l| Some(l) > restarts.first()).map(|_| ()))
    })?;
    assert!(
        restarts.windows(2).all(|w| w[0] <= w[1]),
        "restart_lsn went backwards: {restarts:?}"
    );
    let records = verify_wal(&r.wal_dir, first, &dir.join("verify"))?;
    assert!(records > 10_000, "pg_waldump read only {records} records");
    let st = r.status()?;
    let (raw, wire) = (
        st["raw_bytes"].as_u64().unwrap(),
        st["wire_bytes"].as_u64().unwrap(),
    );
    eprintln!(
        "raw WAL {raw} bytes, on the wire {wire} bytes ({:.1}%)",
        100.0 * wire as f64 / raw as f64
    );
    assert!(
        raw > 0 && wire > 0 && wire < raw,
        "compression did not happen: raw {raw}, wire {wire}"
    );
    assert!(
        st["sealed_segments"].as_u64().unwrap() >= 2,
        "no sealed segments: {st}"
    );
    Ok(())
}

/// One outage while pgbench writes: before it, note the slot (the receiver's last
/// acknowledgement reported upstream); after it, the receiver must ask for its persisted
/// position or later (whole records written past it), never behind what it acknowledged.
/// `act` returns the persisted position, when the test knows it.
fn outage(
    pg: &Pg,
    r: &mut Receiver,
    what: &str,
    act: impl FnOnce(&mut Receiver) -> Result<Option<Lsn>>,
) -> Result<()> {
    let before = r.requested_starts().len();
    let acked = pg.slot_restart_lsn(&format!("{SLOT_PREFIX}{}", r.name))?;
    let expected = act(r)?;
    wait_for(&format!("receiver to resume after {what}"), || {
        Ok((r.requested_starts().len() > before).then_some(()))
    })?;
    let resumed = *r.requested_starts().last().unwrap();
    if let Some(acked) = acked {
        assert!(
            resumed >= acked,
            "after {what}: resumed at {resumed}, before the acknowledged {acked}"
        );
    }
    if let Some(persisted) = expected {
        assert!(
            resumed >= persisted && resumed <= pg.flush_lsn()?,
            "after {what} the receiver resumed at {resumed}: before its persisted flush position {persisted}, or past the primary's"
        );
    }
    eprintln!("{what}: acknowledged {acked:?}, resumed at {resumed}");
    Ok(())
}

/// Stops the load, waits for the receiver to hold everything the primary flushed, and has
/// pg_waldump read the store from `first` without a gap.
fn stop_and_verify(
    pg: &Pg,
    r: &mut Receiver,
    mut bench: std::process::Child,
    first: Lsn,
    dir: &TestDir,
) -> Result<()> {
    let _ = bench.kill();
    let _ = bench.wait();
    let target = pg.flush_lsn()?;
    r.wait_flush(target)?;
    let records = verify_wal(&r.wal_dir, first, &dir.join("verify"))?;
    eprintln!("pg_waldump read {records} records from {first} to {target} without a gap");
    Ok(())
}

#[test]
fn continuity_across_receiver_kills_sender_and_primary_restarts_and_cuts() -> Result<()> {
    let dir = TestDir::new("outages");
    let pg = Pg::start_primary(&dir, "primary", "")?;
    pg.pgbench_init(2)?;
    let mut sender = Sender::start(&dir, &pg)?;
    let proxy = Proxy::start(&sender.addr)?;
    let mut r = Receiver::start(&dir, &proxy.addr, "ro")?;
    let first = r.wait_streaming()?;
    let mut bench = pg.pgbench(4, 3600)?;
    let settle = || std::thread::sleep(Duration::from_millis(1500));

    for i in 0..3 {
        settle();
        outage(&pg, &mut r, &format!("SIGKILL #{}", i + 1), |r| {
            r.proc.kill9();
            let persisted = r.flush_lsn()?;
            r.spawn()?;
            Ok(Some(persisted))
        })?;
    }
    settle();
    outage(&pg, &mut r, "sender restart", |_| {
        sender.restart().map(|_| None)
    })?;
    settle();
    outage(&pg, &mut r, "primary restart", |_| {
        pg.restart().map(|_| None)
    })?;
    // pgbench lost its connections with the restart; load again.
    let _ = bench.kill();
    let _ = bench.wait();
    bench = pg.pgbench(4, 3600)?;
    settle();
    outage(&pg, &mut r, "TCP cut", |_| {
        let n = proxy.cut();
        assert!(n >= 1, "no connection to cut");
        Ok(None)
    })?;
    settle();
    stop_and_verify(&pg, &mut r, bench, first, &dir)
}

/// Power loss can leave `state` behind the WAL it records: the receiver fdatasyncs it only
/// when the flush position enters a new segment. Emulated here by rolling `state` back to
/// the start of its segment after SIGKILL, once the receiver holds everything the primary
/// flushed (which then ends with a whole record), and by giving `LOCK` the boot id of an
/// earlier boot. Readers must see the WAL past the recorded position before the receiver
/// runs again, and the receiver must resume exactly where it was, without a gap.
#[test]
fn a_state_file_left_behind_by_a_crash_is_caught_up_from_the_wal_records() -> Result<()> {
    let dir = TestDir::new("lagstate");
    let pg = Pg::start_primary(&dir, "primary", "")?;
    pg.pgbench_init(2)?;
    let sender = Sender::start(&dir, &pg)?;
    let mut r = Receiver::start(&dir, &sender.addr, "rl")?;
    let first = r.wait_streaming()?;
    let mut bench = pg.pgbench(4, 3600)?;
    // Into a segment, far enough for the rolled-back position to lie many records behind.
    wait_for("the receiver to be 1 MiB into a segment", || {
        let flush = r.flush_lsn()?;
        Ok((flush.0 % (16 << 20) > 1 << 20).then_some(()))
    })?;
    let _ = bench.kill();
    let _ = bench.wait();
    let persisted = wait_for("the receiver to hold all the primary flushed", || {
        let target = pg.flush_lsn()?;
        r.wait_flush(target)?;
        Ok((r.flush_lsn()? == target && pg.flush_lsn()? == target).then_some(target))
    })?;
    r.proc.kill9();
    let path = r.wal_dir.join("state");
    let mut state = std::fs::read(&path)?;
    let seg_size = u32::from_le_bytes(state[24..28].try_into()?) as u64;
    let rolled_back = Lsn(persisted.0 - persisted.0 % seg_size);
    state[32..40].copy_from_slice(&rolled_back.0.to_le_bytes());
    let crc = crc32c::crc32c(&state[0..56]);
    state[56..60].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&path, &state)?;
    std::fs::write(r.wal_dir.join("LOCK"), "the boot before a power loss")?;
    assert_eq!(
        r.flush_lsn()?,
        persisted,
        "status, with no receiver running, must count the WAL past the rolled-back {rolled_back}"
    );
    r.spawn()?;
    wait_for("the receiver to resume", || {
        Ok((r.requested_starts().len() > 1).then_some(()))
    })?;
    let resumed = *r.requested_starts().last().unwrap();
    eprintln!("persisted {persisted}, rolled back to {rolled_back}, resumed at {resumed}");
    assert_eq!(resumed, persisted, "rolled back to {rolled_back}");
    assert!(
        !r.proc
            .log_events("took up whole, valid WAL records past the recorded flush position (left by a crash)")
            .is_empty(),
        "{}",
        tail(&r.proc.log_text(), 10)
    );
    let bench = pg.pgbench(4, 3600)?;
    std::thread::sleep(Duration::from_secs(2));
    stop_and_verify(&pg, &mut r, bench, first, &dir)
}

#[test]
fn synchronous_commit_waits_for_the_receivers_fsync() -> Result<()> {
    let dir = TestDir::new("sync");
    let pg = Pg::start_primary(&dir, "primary", "synchronous_standby_names = 'rsync'")?;
    let sender = Sender::start(&dir, &pg)?;
    // Create the table before the receiver exists: commits before that would wait.
    let mut r = Receiver::start(&dir, &sender.addr, "rsync")?;
    wait_for("pg_stat_replication to show the receiver as sync", || {
        Ok((pg
            .sql("SELECT sync_state FROM pg_stat_replication WHERE application_name = 'rsync'")?
            == "sync")
            .then_some(()))
    })?;
    pg.sql("CREATE TABLE t (v int)")?;
    pg.sql("INSERT INTO t VALUES (1)")?;

    r.proc.kill9();
    let mut insert = Command::new(pg_tool("psql"))
        .args([
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            &pg.conninfo(),
            "-c",
            "INSERT INTO t VALUES (2)",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    wait_for("the commit to wait for synchronous replication", || {
        Ok(
            (pg.sql("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'")? == "1")
                .then_some(()),
        )
    })?;
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        insert.try_wait()?.is_none(),
        "the commit finished while the synchronous receiver was down"
    );

    r.spawn()?;
    let status = wait_for("the commit to complete", || Ok(insert.try_wait()?))?;
    assert!(status.success());
    assert_eq!(
        pg.sql("SELECT sync_state FROM pg_stat_replication WHERE application_name = 'rsync'")?,
        "sync"
    );
    // The commit record is durable on the receiver.
    let commit_lsn = pg.flush_lsn()?;
    assert!(
        r.flush_lsn()?
            >= pg
                .sql("SELECT flush_lsn FROM pg_stat_replication WHERE application_name = 'rsync'")?
                .parse()?
    );
    r.wait_flush(commit_lsn)?;
    Ok(())
}

#[test]
fn two_receivers_follow_one_sender_and_garbage_does_not_disturb_them() -> Result<()> {
    let dir = TestDir::new("two");
    let pg = Pg::start_primary(&dir, "primary", "")?;
    let sender = Sender::start(&dir, &pg)?;
    let mut a = Receiver::start(&dir, &sender.addr, "ra")?;
    let mut b = Receiver::start(&dir, &sender.addr, "rb")?;
    let (fa, fb) = (a.wait_streaming()?, b.wait_streaming()?);
    pg.pgbench_init(3)?;
    // Garbage and a half-open connection to the sender while both stream.
    {
        use std::io::Write;
        let mut g = std::net::TcpStream::connect(&sender.addr)?;
        g.write_all(&[0xAB; 4096])?;
        let _half_open = std::net::TcpStream::connect(&sender.addr)?;
        let mut bench = pg.pgbench(2, 5)?;
        assert!(bench.wait()?.success());
    }
    let target = pg.flush_lsn()?;
    a.wait_flush(target)?;
    b.wait_flush(target)?;
    verify_wal(&a.wal_dir, fa, &dir.join("va"))?;
    verify_wal(&b.wal_dir, fb, &dir.join("vb"))?;
    assert!(
        sender.proc.log_text().contains("bad frame magic"),
        "sender did not report the garbage connection"
    );
    Ok(())
}

#[test]
fn store_of_another_cluster_is_refused() -> Result<()> {
    let dir = TestDir::new("sysid");
    let pg1 = Pg::start_primary(&dir, "one", "")?;
    let pg2 = Pg::start_primary(&dir, "two", "")?;
    let s1 = Sender::start(&dir, &pg1)?;
    let s2 = Sender::start(&dir, &pg2)?;
    let mut r = Receiver::start(&dir, &s1.addr, "rx")?;
    r.wait_streaming()?;
    r.proc.term();
    r.sender = s2.addr.clone();
    r.spawn()?;
    let st = r.proc.wait_exit()?;
    assert_eq!(
        st.code(),
        Some(4),
        "expected exit code 4 (cluster mismatch)"
    );
    assert!(
        r.proc.log_text().contains("refusing to mix clusters"),
        "{}",
        tail(&r.proc.log_text(), 5)
    );
    Ok(())
}

#[test]
fn corrupt_state_file_is_refused_at_start() -> Result<()> {
    let dir = TestDir::new("corrupt");
    let pg = Pg::start_primary(&dir, "primary", "")?;
    let sender = Sender::start(&dir, &pg)?;
    let mut r = Receiver::start(&dir, &sender.addr, "rc")?;
    r.wait_streaming()?;
    r.proc.term();
    let state = r.wal_dir.join("state");
    let mut bytes = std::fs::read(&state)?;
    bytes[35] ^= 0x01; // a bit of the flush position
    std::fs::write(&state, &bytes)?;
    r.spawn()?;
    let st = r.proc.wait_exit()?;
    assert_eq!(st.code(), Some(5), "expected exit code 5 (store corrupt)");
    assert!(
        r.proc.log_text().contains("corrupt"),
        "{}",
        tail(&r.proc.log_text(), 5)
    );
    Ok(())
}

/// `wal-receiver restore-wal --wal-dir DIR FILE DEST`: its exit code and what it printed.
fn restore_wal(
    wal_dir: &std::path::Path,
    file: &str,
    dest: &std::path::Path,
) -> Result<(Option<i32>, String)> {
    let out = Command::new(bin("wal-receiver"))
        .args(["restore-wal", "--no-prefetch", "--wal-dir"])
        .arg(wal_dir)
        .arg(file)
        .arg(dest)
        .output()?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn odd_names_in_a_store_are_ignored_and_a_corrupt_segment_is_exit_5() -> Result<()> {
    let dir = TestDir::new("oddnames");
    // A --wal-dir under a file cannot be created: a usage error, not a disk error.
    let file = dir.join("a-file");
    std::fs::write(&file, b"")?;
    let mut bad = Receiver::new(&dir, "127.0.0.1:1", "rbad");
    bad.wal_dir = file.join("wal");
    let (code, log) = bad.run_to_exit()?;
    assert_eq!(code, Some(2), "{}", tail(&log, 5));
    assert!(
        log.contains("cannot use") && log.contains("--wal-dir"),
        "{}",
        tail(&log, 5)
    );

    let pg = Pg::start_primary(&dir, "primary", "")?;
    let sender = Sender::start(&dir, &pg)?;
    let mut r = Receiver::start(&dir, &sender.addr, "ro")?;
    r.wait_streaming()?;
    for _ in 0..3 {
        pg.sql("SELECT pg_switch_wal()")?;
        pg.sql("CHECKPOINT")?;
    }
    r.wait_flush(pg.flush_lsn()?)?;
    wait_for("a sealed segment", || {
        Ok((r.status()?["sealed_segments"].as_u64() >= Some(2)).then_some(()))
    })?;
    r.proc.term();
    let before = r.status()?;
    // 24-byte names with a multi-byte character where the name is cut into its fields
    // (once a panic in every reader of the store), with and without the store's suffixes,
    // and a name that is not UTF-8.
    let odd = [
        "0000000\u{e9}000000000000002",
        "000000010000000\u{20ac}000002.partial",
        "0000000100000000000000\u{e9}.zst",
        "0000000\u{e9}.history",
    ];
    for name in odd {
        std::fs::write(r.wal_dir.join(name), b"odd")?;
    }
    use std::os::unix::ffi::OsStrExt;
    std::fs::write(
        r.wal_dir.join(std::ffi::OsStr::from_bytes(
            b"00000001000000000000\xff\xfe.partial",
        )),
        b"odd",
    )?;
    // status: the same as before.
    let after = r.status()?;
    for field in [
        "first_segment",
        "last_segment",
        "sealed_segments",
        "partial_segments",
        "history_timelines",
    ] {
        assert_eq!(after[field], before[field], "{field}: {after}");
    }
    // restore-wal: an odd name is not a WAL file (exit 1); real segments are still served.
    let dest = dir.join("restored");
    for name in odd {
        let (code, err) = restore_wal(&r.wal_dir, name, &dest)?;
        assert_eq!(code, Some(1), "{name}: {err}");
    }
    let first = before["first_segment"].as_str().unwrap().to_owned();
    let (code, err) = restore_wal(&r.wal_dir, &first, &dest)?;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(std::fs::metadata(&dest)?.len(), 16 << 20);
    // follow starts on the store, and goes on storing WAL.
    r.spawn()?;
    pg.sql("SELECT pg_switch_wal()")?;
    r.wait_flush(pg.flush_lsn()?)?;
    assert!(r.proc.is_running(), "{}", tail(&r.proc.log_text(), 10));
    r.proc.term();

    // A sealed segment damaged at rest: restore-wal says so and exits 5, not 1 ("not in
    // the store"), so that it is not taken for the end of the archive.
    let sealed = r.wal_dir.join(format!("{first}.zst"));
    assert!(sealed.exists(), "{first} is not sealed");
    let mut bytes = std::fs::read(&sealed)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&sealed, &bytes)?;
    let (code, err) = restore_wal(&r.wal_dir, &first, &dest)?;
    assert_eq!(code, Some(5), "{err}");
    assert!(err.contains("corrupt") && err.contains(&first), "{err}");
    Ok(())
}

#[test]
fn receiver_stops_with_advice_when_the_primary_lost_its_wal() -> Result<()> {
    let dir = TestDir::new("gone");
    let pg = Pg::start_primary(&dir, "primary", "min_wal_size = 32MB\nmax_wal_size = 64MB")?;
    let sender = Sender::start(&dir, &pg)?;
    let mut r = Receiver::start(&dir, &sender.addr, "rg")?;
    r.wait_streaming()?;
    r.proc.term();
    pg.wait_slot_released("walship_rg")?;
    pg.sql("SELECT pg_drop_replication_slot('walship_rg')")?;
    pg.pgbench_init(6)?;
    for _ in 0..3 {
        pg.sql("SELECT pg_switch_wal()")?;
        pg.sql("CHECKPOINT")?;
    }
    r.spawn()?;
    let st = r.proc.wait_exit()?;
    assert_eq!(
        st.code(),
        Some(3),
        "expected exit code 3 (WAL gone): {}",
        tail(&r.proc.log_text(), 5)
    );
    let log = r.proc.log_text();
    assert!(
        log.contains("no longer has the WAL") && log.contains("Bootstrap"),
        "{}",
        tail(&log, 5)
    );
    Ok(())
}

/// A fake sender that sends bad frames: each must be rejected with a clear error, the
/// receiver must reconnect, and nothing from a bad frame may reach the store.
#[test]
fn receiver_rejects_corrupt_truncated_and_oversized_frames() -> Result<()> {
    use std::io::{Read, Write};
    use walship_common::frame::FrameEncoder;
    use walship_common::protocol::Message;

    let dir = TestDir::new("badframes");
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    let start = Lsn(0x300_0000);
    let wal: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
    let wal2 = wal.clone();
    let server = std::thread::spawn(move || -> Result<()> {
        for round in 0..4 {
            let (mut s, _) = listener.accept()?;
            s.set_read_timeout(Some(Duration::from_millis(500)))?;
            let mut scratch = [0u8; 4096];
            let mut enc = FrameEncoder::new(1)?;
            fake_server_info(&mut s, &mut enc, 42, Lsn(0x300_5000), "fake")?;
            let mut out = Vec::new();
            let _ = s.read(&mut scratch); // StartStream, Ack
            out.clear();
            Message::WalData {
                start_lsn: start,
                server_flush_lsn: Lsn(0x300_5000),
                data: wal2.clone(),
            }
            .encode(&mut enc, &mut out)?;
            match round {
                0 => {
                    let at = out.len() - 100;
                    out[at] ^= 0x20;
                    s.write_all(&out)?;
                }
                1 => s.write_all(&out[..out.len() / 2])?,
                2 => {
                    out[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
                    s.write_all(&out)?;
                }
                _ => {
                    s.write_all(&out)?;
                    // Keep the connection until the receiver has acknowledged.
                    std::thread::sleep(Duration::from_secs(5));
                    return Ok(());
                }
            }
            // End the round with a FIN, not an RST: half-close, then drain what the
            // receiver sent, so closing with unread bytes cannot reset the connection
            // before the receiver has seen the bad frame.
            // The receiver may have reset the connection already: that is fine too.
            let _ = s.shutdown(std::net::Shutdown::Write);
            while matches!(s.read(&mut scratch), Ok(n) if n > 0) {}
        }
        Ok(())
    });
    let mut r = Receiver::start(&dir, &addr, "rbad")?;
    r.wait_flush(Lsn(start.0 + wal.len() as u64))?;
    server.join().unwrap()?;
    let log = r.proc.log_text();
    for expected in [
        "checksum mismatch",
        "closed in the middle of a frame",
        "exceeds the limit",
    ] {
        assert!(
            log.contains(expected),
            "no {expected:?} error in the receiver log:\n{}",
            tail(&log, 20)
        );
    }
    assert!(r.proc.is_running(), "receiver died on bad input");
    assert_eq!(r.flush_lsn()?, Lsn(start.0 + wal.len() as u64));
    // The store holds exactly the good bytes, then zeros.
    let dest = dir.join("seg");
    let ok = Command::new(bin("wal-receiver"))
        .args(["restore-wal", "--wal-dir"])
        .arg(&r.wal_dir)
        .arg("000000010000000000000003")
        .arg(&dest)
        .status()?;
    assert!(ok.success());
    let seg = std::fs::read(&dest)?;
    assert_eq!(seg.len(), 16 << 20);
    assert_eq!(&seg[..wal.len()], &wal[..]);
    assert!(
        seg[wal.len()..].iter().all(|&b| b == 0),
        "bytes past the flush position were served"
    );
    Ok(())
}
