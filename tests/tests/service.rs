//! walship as a systemd service, against real PostgreSQL 15: the readiness protocol
//! (`READY=1`, `STATUS=`, `STOPPING=1` on the real `sd_notify` datagram socket), a clean stop
//! on SIGTERM under load (flushed, the standby told, resumed exactly where it stopped), and
//! the shipped units and example configurations checked by `systemd-analyze verify` and by
//! the programs themselves.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use walship_common::Lsn;
use walship_tests::*;

/// The unit's `TimeoutStopSec=`: systemd kills a receiver that takes longer to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// The source tree's `packaging/` directory.
fn packaging() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging")
        .canonicalize()
        .expect("packaging directory")
}

/// The service manager's end of `NOTIFY_SOCKET`: a datagram socket the program under test
/// may write to (it may run as `postgres`).
struct Notify {
    sock: UnixDatagram,
    path: PathBuf,
    /// Every message received so far, in order.
    seen: Vec<String>,
}

impl Notify {
    fn bind(path: PathBuf) -> Result<Notify> {
        let sock = UnixDatagram::bind(&path).with_context(|| format!("bind {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777))?;
        sock.set_read_timeout(Some(Duration::from_millis(200)))?;
        Ok(Notify {
            sock,
            path,
            seen: Vec::new(),
        })
    }

    /// Reads messages until one holds the assignment `want` (a whole line, such as
    /// `READY=1`), or one whose `STATUS=` line starts with `want` after "STATUS=".
    fn wait_line(&mut self, want: &str, proc: &mut Proc) -> Result<String> {
        self.wait_line_or(want, || tail(&proc.log_text(), 20))
    }

    /// [`Notify::wait_line`], with `log` to show when it times out.
    fn wait_line_or(&mut self, want: &str, log: impl Fn() -> String) -> Result<String> {
        let start = Instant::now();
        let mut buf = vec![0u8; 4096];
        loop {
            if let Some(m) = self
                .seen
                .iter()
                .find(|m| m.lines().any(|l| l.starts_with(want)))
            {
                return Ok(m.clone());
            }
            match self.sock.recv(&mut buf) {
                Ok(n) => self
                    .seen
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned()),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e.into()),
            }
            if start.elapsed() > PATIENCE {
                bail!(
                    "no {want:?} from the program within {PATIENCE:?}; it sent {:?}\n{}",
                    self.seen,
                    log()
                );
            }
        }
    }
}

impl Notify {
    /// Forgets the messages seen so far: the next wait is for a new one.
    fn forget(&mut self) {
        self.seen.clear();
    }
}

fn sigterm(p: &Proc) {
    let pid = p.pid().expect("running");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
}

/// `follow` is ready once its store is open and its standby socket listens, while no sender
/// answers yet; it says it is waiting, then streaming. `serve` is ready once it listens;
/// SIGTERM gives STOPPING=1 and exit 0, and PostgreSQL releases the slot of the receiver it
/// served, which says it is waiting again. SIGTERM to `follow` likewise, its socket removed.
#[test]
fn follow_and_serve_tell_systemd_when_they_are_ready_and_stopping() -> Result<()> {
    let dir = TestDir::new("notify");
    let pg = Pg::start_primary(&dir, "primary", "")?;
    let sender_addr = format!("127.0.0.1:{}", free_port());
    let wal_dir = dir.join("wal");
    let serve_port = free_port();

    // The receiver first, with no sender listening: the primary's side is down.
    let mut rn = Notify::bind(dir.join("notify-receiver.sock"))?;
    let mut follow = Command::new(bin("wal-receiver"));
    follow
        .args([
            "follow",
            "--sender",
            &sender_addr,
            "--name",
            "svc",
            "--wal-dir",
        ])
        .arg(&wal_dir)
        .arg("--serve-standby")
        .arg(&wal_dir)
        .args(["--serve-standby-port", &serve_port.to_string()])
        .env("NOTIFY_SOCKET", &rn.path);
    let mut receiver = Proc::spawn(follow, dir.join("receiver.log"))?;
    let ready = rn.wait_line("READY=1", &mut receiver)?;
    // Ready means serving: the standby's socket accepts connections already.
    let socket = wal_dir.join(format!(".s.PGSQL.{serve_port}"));
    std::os::unix::net::UnixStream::connect(&socket)
        .with_context(|| format!("connect to {} once READY=1 was sent", socket.display()))?;
    eprintln!("receiver ready: {ready:?}");
    rn.wait_line("STATUS=waiting for sender", &mut receiver)?;
    assert!(
        receiver.is_running(),
        "follow exited while no sender answered"
    );

    // Now the sender, under the same protocol.
    let mut sn = Notify::bind(dir.join("notify-sender.sock"))?;
    let mut serve = Command::new(bin("wal-sender"));
    serve
        .args([
            "serve",
            "--pg-conn",
            &pg.conninfo(),
            "--listen",
            &sender_addr,
        ])
        .env("NOTIFY_SOCKET", &sn.path);
    let mut sender = Proc::spawn(serve, dir.join("sender.log"))?;
    let ready = sn.wait_line("READY=1", &mut sender)?;
    std::net::TcpStream::connect(&sender_addr)
        .context("connect to the sender once READY=1 was sent")?;
    assert!(
        ready.contains(&format!("STATUS=listening on {sender_addr}")),
        "{ready:?}"
    );
    let streaming = rn.wait_line("STATUS=streaming from", &mut receiver)?;
    assert!(streaming.contains("on timeline 1"), "{streaming:?}");
    pg.sql("SELECT pg_switch_wal()")?;
    pg.sql("CREATE TABLE t AS SELECT generate_series(1, 1000) AS v")?;
    let target = pg.flush_lsn()?;
    wait_for("the receiver to store the primary's WAL", || {
        Ok(status_json(&wal_dir)?["flush_lsn"]
            .as_str()
            .and_then(|l| l.parse::<Lsn>().ok())
            .filter(|l| *l >= target))
    })?;

    // The sender first: its receiver's slot is released while the receiver still runs.
    assert_eq!(
        pg.sql("SELECT active FROM pg_replication_slots WHERE slot_name = 'walship_svc'")?,
        "t"
    );
    rn.forget();
    sigterm(&sender);
    sn.wait_line("STOPPING=1", &mut sender)?;
    let st = sender.wait_exit()?;
    assert_eq!(st.code(), Some(0), "serve after SIGTERM: {st}");
    pg.wait_slot_released("walship_svc")?;
    rn.wait_line("STATUS=waiting for sender", &mut receiver)?;
    assert!(
        receiver.is_running(),
        "follow exited when its sender stopped"
    );

    sigterm(&receiver);
    rn.wait_line("STOPPING=1", &mut receiver)?;
    let st = receiver.wait_exit()?;
    assert_eq!(st.code(), Some(0), "follow after SIGTERM: {st}");
    assert!(
        !socket.exists(),
        "the standby socket {} is left behind",
        socket.display()
    );
    let stopped = status_json(&wal_dir)?;
    assert_eq!(stopped["receiver_running"], false, "{stopped}");
    Ok(())
}

/// SIGTERM to `follow --serve-standby` while pgbench writes: it exits 0 well within the
/// unit's stop timeout; the store holds, fsynced and readable without a gap, everything the
/// primary's slot says was acknowledged; the standby is told why its connection ends; and the
/// next start asks for WAL exactly where the store ends, and the standby catches up.
#[test]
fn follow_stops_cleanly_on_sigterm_under_load_and_resumes_where_it_stopped() -> Result<()> {
    let dir = TestDir::new("sigterm");
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
    receiver.extra = vec!["--serve-standby".into(), wal_dir.display().to_string()];
    receiver.spawn()?;
    // From the start of its segment: the first request, where the bootstrap ended, may fall
    // in the zeros after a segment switch, where no record starts.
    let seg = walship_common::WalSegSize::new(16 << 20).expect("16 MiB");
    let first = receiver.wait_streaming()?.segment_start(seg);
    let standby = Pg::start_existing(&dir, &dir.join("standby"), "standby")?;
    let want_host = wal_dir.display().to_string();
    wait_for("the standby to stream from the receiver", || {
        let row = standby
            .sql("SELECT status || '|' || coalesce(sender_host, '') FROM pg_stat_wal_receiver")?;
        Ok((row == format!("streaming|{want_host}")).then_some(()))
    })?;

    let mut bench = primary.pgbench(4, 600)?;
    // Well into the load: a few segments past where it started.
    let busy = Lsn(first.0 + (32 << 20));
    receiver.wait_flush(busy)?;
    let t0 = Instant::now();
    sigterm(&receiver.proc);
    let st = receiver.proc.wait_exit()?;
    let took = t0.elapsed();
    eprintln!("follow stopped {took:?} after SIGTERM, under load: {st}");
    assert_eq!(st.code(), Some(0), "follow after SIGTERM: {st}");
    assert!(
        took < STOP_TIMEOUT,
        "follow took {took:?} to stop, past the unit's TimeoutStopSec"
    );
    let log = receiver.proc.log_text();
    let stopped: Lsn = receiver
        .proc
        .log_events("wal-receiver stopped")
        .first()
        .and_then(|f| f["flush_lsn"].as_str()?.parse().ok())
        .ok_or_else(|| anyhow!("no 'wal-receiver stopped' line:\n{}", tail(&log, 20)))?;
    let flush = receiver.flush_lsn()?;
    assert_eq!(
        flush, stopped,
        "the store's persisted position is not the one follow reported at its stop"
    );
    // What the primary holds as acknowledged is in the store, durably.
    let acked = primary
        .slot_restart_lsn("walship_sb")?
        .ok_or_else(|| anyhow!("the slot has no restart_lsn"))?;
    assert!(
        acked <= flush,
        "the slot says {acked} was acknowledged, but the store holds only up to {flush}"
    );
    let records = verify_wal(&wal_dir, first, &dir.join("verify-stop"))?;
    eprintln!("after the stop: acknowledged {acked}, stored {flush}, {records} records read without a gap");
    // The standby was told why its connection ended, and the socket is gone.
    wait_for("the standby to log the receiver's goodbye", || {
        Ok(standby
            .log_text()
            .contains("terminating connection because wal-receiver is stopping")
            .then_some(()))
    })?;
    assert!(
        !wal_dir.join(".s.PGSQL.5432").exists(),
        "the standby socket is left behind"
    );
    assert!(
        log.contains("standby disconnected: wal-receiver is stopping"),
        "the standby's session did not end as a stop:\n{}",
        tail(&log, 20)
    );

    // Started again: it asks for WAL exactly where the store ends.
    let before = receiver.requested_starts().len();
    receiver.spawn()?;
    wait_for("the receiver to ask for WAL again", || {
        Ok((receiver.requested_starts().len() > before).then_some(()))
    })?;
    let resumed = receiver.requested_starts()[before];
    assert_eq!(
        resumed, flush,
        "resumed at {resumed}, but the store ended at {flush}"
    );
    // Load on after the restart too, then the end of it.
    receiver.wait_flush(Lsn(flush.0 + (16 << 20)))?;
    assert!(
        bench.try_wait()?.is_none(),
        "pgbench ended early: {:?}",
        bench.wait()
    );
    let _ = bench.kill();
    let _ = bench.wait();
    let target = primary.flush_lsn()?;
    receiver.wait_flush(target)?;
    wait_for(&format!("the standby to replay {target}"), || {
        let replay: Lsn = standby.sql("SELECT pg_last_wal_replay_lsn()")?.parse()?;
        Ok((replay >= target).then_some(()))
    })?;
    assert_eq!(
        pgbench_fingerprint(&standby, &[])?,
        pgbench_fingerprint(&primary, &[])?,
        "the standby's data differs from the primary's"
    );
    verify_wal(&wal_dir, first, &dir.join("verify-end"))?;
    Ok(())
}

/// A root for `systemd-analyze verify --root`: this host's own units (the targets the
/// shipped ones refer to), the shipped units where the package puts them, and the programs
/// and script at the paths their `ExecStart=` names.
fn unit_root(dir: &TestDir) -> Result<PathBuf> {
    let root = dir.join("root");
    let units = root.join("usr/lib/systemd/system");
    std::fs::create_dir_all(&units)?;
    std::os::unix::fs::symlink("usr/lib", root.join("lib"))?;
    let host_units = Path::new("/usr/lib/systemd/system");
    for e in std::fs::read_dir(host_units).context("read this host's systemd units")? {
        let e = e?;
        if e.file_type()?.is_file() {
            std::fs::copy(e.path(), units.join(e.file_name()))?;
        }
    }
    for e in std::fs::read_dir(packaging().join("systemd"))? {
        let e = e?;
        std::fs::copy(e.path(), units.join(e.file_name()))?;
    }
    std::fs::create_dir_all(root.join("usr/bin"))?;
    for b in ["wal-sender", "wal-receiver"] {
        std::fs::copy(bin(b), root.join("usr/bin").join(b))?;
    }
    let scripts = root.join("usr/share/walship/scripts");
    std::fs::create_dir_all(&scripts)?;
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/backup.sh"),
        scripts.join("backup.sh"),
    )?;
    Ok(root)
}

/// `systemd-analyze verify` on `units` in `root`: its exit code, and everything it printed
/// (it exits 0 on an unknown directive or a value it cannot parse, but says so).
fn verify(root: &Path, units: &[&str]) -> Result<(bool, String)> {
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .args(units)
        .stdin(Stdio::null())
        .output()
        .context("run systemd-analyze (apt-get install systemd)")?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

/// Every shipped unit, an instance of each template, passes `systemd-analyze verify` without
/// a word; a unit with a misspelt directive or a missing program does not.
#[test]
fn shipped_units_pass_systemd_analyze_verify() -> Result<()> {
    let dir = TestDir::new("units");
    let root = unit_root(&dir)?;
    let shipped: Vec<String> = std::fs::read_dir(packaging().join("systemd"))?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    for unit in [
        "walship-sender.service",
        "walship-receiver@.service",
        "walship-backup@.service",
        "walship-backup@.timer",
    ] {
        assert!(shipped.iter().any(|s| s == unit), "{unit} is not shipped");
    }
    let instances: Vec<String> = shipped
        .iter()
        .map(|u| u.replace("@.", "@example."))
        .collect();
    let names: Vec<&str> = instances.iter().map(String::as_str).collect();
    let (ok, said) = verify(&root, &names)?;
    assert!(
        ok && said.trim().is_empty(),
        "systemd-analyze verify {names:?}:\n{said}"
    );
    eprintln!("systemd-analyze verify passed: {names:?}");

    // The check can fail: a misspelt directive, and a program that is not there.
    let units = root.join("usr/lib/systemd/system");
    let good = std::fs::read_to_string(units.join("walship-sender.service"))?;
    std::fs::write(
        units.join("walship-sender.service"),
        good.replace("ProtectSystem=strict", "ProtectSytem=strict"),
    )?;
    let (_, said) = verify(&root, &["walship-sender.service"])?;
    assert!(
        said.contains("ProtectSytem"),
        "a misspelt key passed:\n{said}"
    );
    std::fs::write(
        units.join("walship-sender.service"),
        good.replace("/usr/bin/wal-sender", "/usr/bin/wal-sendr"),
    )?;
    let (ok, said) = verify(&root, &["walship-sender.service"])?;
    assert!(!ok, "a missing program passed:\n{said}");
    Ok(())
}

/// Whether `stderr` shows an error of the configuration file `file` itself (`FILE:LINE:`).
fn config_error(stderr: &str, file: &Path) -> bool {
    let at = format!("{}:", file.display());
    stderr.match_indices(&at).any(|(i, _)| {
        stderr[i + at.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
    })
}

/// Runs `program args --config file` and returns its standard error.
fn run_with_config(program: &str, args: &[&str], file: &Path) -> Result<String> {
    let out = Command::new(bin(program))
        .args(args)
        .arg("--config")
        .arg(file)
        .stdin(Stdio::null())
        .output()?;
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The keys a TOML file sets at the top level (`key = value` lines; comments left out).
fn keys(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| {
            let (k, _) = l.split_once('=')?;
            let k = k.trim();
            (!k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
                .then(|| k.to_owned())
        })
        .collect()
}

/// `program args --help`.
fn help(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(bin(program))
        .args(args)
        .arg("--help")
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The example configurations name only flags the programs have: every key is a flag of the
/// command the file is for, and each file is read without an error of its own by a command
/// that takes it (which then fails for want of the example's hosts and files, which is not
/// what is checked). A key no command has is caught.
#[test]
fn example_configurations_use_the_programs_real_flags() -> Result<()> {
    let dir = TestDir::new("examples");
    let etc = packaging().join("etc");
    let serve = help("wal-sender", &["serve"])?;
    let follow = help("wal-receiver", &["follow"])?;
    let backup = help("wal-receiver", &["backup"])?;
    for (file, helps) in [
        ("sender.toml", vec![&serve]),
        ("standby.toml", vec![&follow]),
        ("archive.toml", vec![&follow, &backup]),
    ] {
        let found = keys(&std::fs::read_to_string(etc.join(file))?);
        assert!(found.len() >= 3, "{file}: keys {found:?}");
        for k in found {
            let flag = format!("--{}", k.replace('_', "-"));
            assert!(
                helps.iter().any(|h| {
                    h.match_indices(&flag).any(|(i, _)| {
                        matches!(h[i + flag.len()..].chars().next(), Some(' ' | '\n'))
                    })
                }),
                "{file}: {k} is no flag of the command it is for"
            );
        }
    }
    let cases: [(&str, &str, &[&str]); 4] = [
        ("sender.toml", "wal-sender", &["serve"]),
        ("standby.toml", "wal-receiver", &["status"]),
        ("archive.toml", "wal-receiver", &["status"]),
        ("archive.toml", "wal-receiver", &["backups"]),
    ];
    for (file, program, args) in cases {
        let path = etc.join(file);
        let stderr = run_with_config(program, args, &path)?;
        assert!(
            !config_error(&stderr, &path),
            "{program} {args:?} --config {file}:\n{stderr}"
        );
        assert!(
            !stderr.contains("unexpected argument"),
            "{program} {args:?} --config {file}:\n{stderr}"
        );
    }
    // The same check catches a key that no command has.
    let bad = dir.join("bad.toml");
    let text = std::fs::read_to_string(etc.join("standby.toml"))?;
    std::fs::write(&bad, format!("{text}\nkeep_wall = \"1GB\"\n"))?;
    let stderr = run_with_config("wal-receiver", &["status"], &bad)?;
    assert!(
        config_error(&stderr, &bad),
        "an unknown key was not reported:\n{stderr}"
    );
    Ok(())
}

/// A receiver whose standard error is gone (a closed pipe, a journal stream that broke) keeps
/// running, and still stops cleanly: a log line it cannot write is dropped, not a panic.
#[test]
fn follow_survives_a_closed_standard_error_and_still_stops_cleanly() -> Result<()> {
    let dir = TestDir::new("stderr");
    let wal_dir = dir.join("wal");
    let mut n = Notify::bind(dir.join("notify.sock"))?;
    let mut child = Command::new(bin("wal-receiver"))
        .args(["follow", "--sender", &format!("127.0.0.1:{}", free_port())])
        .args(["--name", "closed", "--wal-dir"])
        .arg(&wal_dir)
        .arg("--serve-standby")
        .arg(&wal_dir)
        .env("NOTIFY_SOCKET", &n.path)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    drop(child.stderr.take());
    let nothing = || "(its standard error is closed)".to_owned();
    n.wait_line_or("READY=1", nothing)?;
    // Two rounds of failed connections, each logged to the closed pipe.
    for _ in 0..2 {
        n.forget();
        n.wait_line_or("STATUS=waiting for sender", nothing)?;
    }
    assert!(child.try_wait()?.is_none(), "follow exited");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    n.wait_line_or("STOPPING=1", nothing)?;
    let st = wait_for("follow to exit", || Ok(child.try_wait()?))?;
    assert_eq!(
        st.code(),
        Some(0),
        "follow after SIGTERM with stderr closed: {st}"
    );
    assert!(
        !wal_dir.join(".s.PGSQL.5432").exists(),
        "the standby socket is left behind"
    );
    Ok(())
}
