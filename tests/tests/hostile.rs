//! Hostile conditions against real PostgreSQL 15: a network that flips bits and cuts
//! connections, a full disk on the receiver, and a sender that sends unsafe file names.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Result};
use walship_common::frame::FrameEncoder;
use walship_common::protocol::Message;
use walship_common::Lsn;
use walship_tests::*;

/// Bit flips about every 1 MiB and cuts about every 4 MiB of each direction's bytes.
const CHAOS: Chaos = Chaos {
    seed: 0x05EE_D0FC_4A05,
    flip_every: 1 << 20,
    cut_every: 4 << 20,
};

#[test]
fn streaming_through_a_damaging_network_stores_exactly_the_primarys_wal() -> Result<()> {
    let dir = TestDir::new("chaos-stream");
    // The primary keeps its WAL, so that every stored segment can be compared with it.
    let pg = Pg::start_primary(&dir, "primary", "wal_keep_size = 4GB")?;
    let sender = Sender::start(&dir, &pg)?;
    // WAL compresses to a few MB on the wire: damage it more often than snapshots.
    let chaos = Chaos {
        flip_every: 512 << 10,
        cut_every: 2 << 20,
        ..CHAOS
    };
    let proxy = Proxy::start_chaos(&sender.addr, chaos)?;
    let mut r = Receiver::start(&dir, &proxy.addr, "rchaos")?;
    let first = r.wait_streaming()?;
    pg.pgbench_init(5)?;
    let mut bench = pg.pgbench(4, 10)?;
    assert!(bench.wait()?.success(), "pgbench failed");
    let target = pg.flush_lsn()?;
    r.wait_flush(target)?;
    let (flips, cuts) = (proxy.flips(), proxy.cuts());
    eprintln!("the proxy flipped {flips} bits and cut {cuts} connections");
    assert!(
        flips >= 5 && cuts >= 2,
        "too little damage to test anything: {flips} flips, {cuts} cuts"
    );
    let log = r.proc.log_text();
    assert!(
        log.contains("checksum mismatch"),
        "no corruption was detected:\n{}",
        tail(&log, 20)
    );
    assert!(r.proc.is_running(), "the receiver died");
    let compared = compare_with_primary(&r.wal_dir, &pg, first, target, &dir.join("cmp"))?;
    assert!(compared >= 3, "only {compared} segments compared");
    verify_wal(&r.wal_dir, first, &dir.join("verify"))?;
    // Every stored segment is intact at rest too.
    assert_eq!(
        Command::new(bin("wal-receiver"))
            .args(["status", "--wal-dir"])
            .arg(&r.wal_dir)
            .status()?
            .code(),
        Some(0)
    );
    Ok(())
}

#[test]
fn bootstrap_through_a_damaging_network_gives_an_equal_standby() -> Result<()> {
    let dir = TestDir::new("chaos-boot");
    let pg = Pg::start_primary(&dir, "primary", "")?;
    pg.pgbench_init(3)?;
    let sender = Sender::start(&dir, &pg)?;
    let proxy = Proxy::start_chaos(&sender.addr, CHAOS)?;
    let cmd = bootstrap_cmd(
        &proxy.addr,
        "bchaos",
        &dir.join("standby"),
        &dir.join("wal"),
        &[],
    );
    let mut p = Proc::spawn(cmd, dir.join("bootstrap.log"))?;
    let st = p.wait_exit()?;
    let log = p.log_text();
    assert!(st.success(), "bootstrap failed: {}", tail(&log, 15));
    let (flips, cuts) = (proxy.flips(), proxy.cuts());
    eprintln!("the proxy flipped {flips} bits and cut {cuts} connections");
    assert!(
        log.contains("snapshot attempt 1 of"),
        "the snapshot was never damaged, so this tested nothing:\n{}",
        tail(&log, 15)
    );
    let want = pgbench_fingerprint(&pg, &[])?;
    let standby = Pg::start_existing(&dir, &dir.join("standby"), "standby")?;
    assert_eq!(
        pgbench_fingerprint(&standby, &[])?,
        want,
        "the standby differs"
    );
    Ok(())
}

/// A tmpfs of a fixed size, unmounted on drop.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(path: &Path, size: &str) -> Result<Option<SmallDisk>> {
        if !is_root() {
            eprintln!("SKIPPED: the disk-full test mounts a tmpfs and needs root");
            return Ok(None);
        }
        std::fs::create_dir_all(path)?;
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size},mode=0777"))
            .arg("tmpfs")
            .arg(path)
            .status()?;
        if !st.success() {
            bail!("mount -t tmpfs failed ({st}); the disk-full test needs a tmpfs");
        }
        Ok(Some(SmallDisk(path.to_owned())))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn full_disk_stops_the_receiver_cleanly_and_it_resumes_once_space_is_freed() -> Result<()> {
    let dir = TestDir::new("diskfull");
    let Some(disk) = SmallDisk::mount(&dir.join("small"), "64m")? else {
        return Ok(());
    };
    // Room for one 16 MiB segment and a little more; the filler is what the operator
    // frees later.
    let filler = disk.0.join("filler");
    std::fs::write(&filler, vec![1u8; 40 << 20])?;
    let pg = Pg::start_primary(&dir, "primary", "")?;
    let sender = Sender::start(&dir, &pg)?;
    let mut r = Receiver::new(&dir, &sender.addr, "rfull");
    r.wal_dir = disk.0.join("wal");
    r.spawn()?;
    let first = r.wait_streaming()?;
    pg.pgbench_init(3)?;
    let mut bench = pg.pgbench(2, 120)?;
    let status = r.proc.wait_exit()?;
    let _ = bench.kill();
    let _ = bench.wait();
    let log = r.proc.log_text();
    assert_eq!(
        status.code(),
        Some(7),
        "not exit 7 on a full disk:\n{}",
        tail(&log, 10)
    );
    assert!(
        log.contains("No space left on device"),
        "{}",
        tail(&log, 10)
    );
    // The persisted position is correct: every byte below it reads back whole, and the
    // slot never went past it.
    let persisted = r.flush_lsn()?;
    assert!(
        persisted > first,
        "nothing was stored before the disk filled"
    );
    verify_wal(&r.wal_dir, first, &dir.join("verify1"))?;
    if let Some(slot) = pg.slot_restart_lsn("walship_rfull")? {
        assert!(
            slot <= persisted,
            "slot at {slot}, past the persisted {persisted}"
        );
    }
    // Space freed: a restart resumes exactly there and catches up with nothing lost.
    std::fs::remove_file(&filler)?;
    r.spawn()?;
    let target = pg.flush_lsn()?;
    r.wait_flush(target)?;
    assert_eq!(
        r.requested_starts().last(),
        Some(&persisted),
        "did not resume at the persisted position"
    );
    verify_wal(&r.wal_dir, first, &dir.join("verify2"))?;
    r.proc.term();
    Ok(())
}

/// A fake sender for one bootstrap: it answers the handshake, then sends `messages`.
fn fake_snapshot_sender(listener: TcpListener, messages: Vec<Message>) -> Result<()> {
    let (mut s, _) = listener.accept()?;
    s.set_read_timeout(Some(Duration::from_millis(300)))?;
    let mut scratch = [0u8; 4096];
    let mut enc = FrameEncoder::new(1)?;
    fake_server_info(&mut s, &mut enc, 4242, Lsn(0x300_0000), "15.0")?;
    let mut out = Vec::new();
    while matches!(s.read(&mut scratch), Ok(n) if n > 0) {} // Have..., StartBackup
    for m in messages {
        out.clear();
        m.encode(&mut enc, &mut out)?;
        if s.write_all(&out).is_err() {
            break;
        }
    }
    let _ = s.shutdown(std::net::Shutdown::Write);
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    while matches!(s.read(&mut scratch), Ok(n) if n > 0) {}
    Ok(())
}

#[test]
fn unsafe_names_in_a_snapshot_end_the_bootstrap_and_nothing_escapes() -> Result<()> {
    let dir = TestDir::new("badnames");
    // Every target one level down, so that a name that escapes by one or two levels lands
    // in this test's own directory, never in the shared temporary directory.
    let root = dir.join("t");
    postgres_dir(&root)?;
    let outside = root.join("outside");
    std::fs::create_dir_all(&outside)?;
    let begin = |tablespaces: Vec<(u32, String)>| Message::BackupStart {
        start_lsn: Lsn(0x300_0028),
        timeline: 1,
        total_bytes: 10,
        file_count: 1,
        tablespaces,
    };
    let file = |path: &str| {
        vec![
            Message::FileBegin {
                path: path.to_owned(),
                size: 5,
                mode: 0o600,
            },
            Message::FileData {
                offset: 0,
                data: b"owned".to_vec(),
            },
        ]
    };
    let outside_s = outside.display().to_string();
    let cases: Vec<(&str, Vec<Message>, &str)> = vec![
        ("dotdot", file("base/../../outside/x"), "'..' component"),
        ("absolute", file(&format!("{outside_s}/x")), "absolute"),
        ("nul", file("base/x\0y"), "NUL"),
        ("drive", file("C:/outside/x"), "drive prefix"),
        ("backslash", file("base\\..\\..\\x"), "backslash"),
        (
            "dir",
            vec![Message::Dir {
                path: "global/../../outside/d".into(),
                mode: 0o700,
            }],
            "'..' component",
        ),
        ("tblspc-link", file("pg_tblspc/16384"), "tablespace"),
        ("tblspc-unknown", file("pg_tblspc/99/x"), "did not announce"),
        ("symlink", file("evil/x"), "symbolic link"),
    ];
    for (name, msgs, expect) in cases {
        let pgdata = root.join(format!("standby-{name}"));
        if name == "symlink" {
            // An unfinished bootstrap of this cluster, with a link planted in it.
            std::fs::create_dir_all(&pgdata)?;
            std::fs::write(
                pgdata.join("walship-bootstrap.incomplete"),
                "wal-receiver bootstrap in progress\nsystem_identifier=4242\n",
            )?;
            std::os::unix::fs::symlink(&outside, pgdata.join("evil"))?;
            postgres_dir(&pgdata)?;
            Command::new("chown")
                .args(["-h", "-R"])
                .arg(postgres_owner())
                .arg(&pgdata)
                .status()?;
        }
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?.to_string();
        let mut all = vec![begin(vec![])];
        all.extend(msgs);
        let fake = std::thread::spawn(move || fake_snapshot_sender(listener, all));
        let cmd = bootstrap_cmd(
            &addr,
            "bad",
            &pgdata,
            &root.join(format!("wal-{name}")),
            &[],
        );
        let mut p = Proc::spawn(cmd, dir.join(&format!("bootstrap-{name}.log")))?;
        let st = p.wait_exit()?;
        let log = p.log_text();
        assert_eq!(
            st.code(),
            Some(10),
            "case {name}: not exit 10:\n{}",
            tail(&log, 8)
        );
        assert!(
            log.contains(expect),
            "case {name}: no {expect:?} in:\n{}",
            tail(&log, 8)
        );
        fake.join().unwrap()?;
    }
    // A tablespace location with '..' is refused the same way.
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    let evil_location = format!("{}/a/ts/../../outside/ts", root.display());
    let msgs = vec![begin(vec![(16384, evil_location)])];
    let fake = std::thread::spawn(move || fake_snapshot_sender(listener, msgs));
    let cmd = bootstrap_cmd(
        &addr,
        "bad",
        &root.join("standby-ts"),
        &root.join("wal-ts"),
        &[],
    );
    let mut p = Proc::spawn(cmd, dir.join("bootstrap-ts.log"))?;
    let st = p.wait_exit()?;
    assert_eq!(st.code(), Some(10), "{}", tail(&p.log_text(), 8));
    fake.join().unwrap()?;
    // Nothing was written outside any target.
    let escaped: Vec<_> = std::fs::read_dir(&outside)?
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(escaped.is_empty(), "files escaped the target: {escaped:?}");
    assert!(!root.join("x").exists() && !dir.join("x").exists());
    Ok(())
}

/// `user:group` of the postgres OS user when root, else the current user.
fn postgres_owner() -> String {
    match postgres_ids() {
        Some((u, g)) => format!("{u}:{g}"),
        None => format!("{}:{}", nix::unistd::getuid(), nix::unistd::getgid()),
    }
}
