//! The end-to-end test harness: real PostgreSQL servers, real wal-sender and wal-receiver
//! processes, and PostgreSQL's own tools as the oracle.
//!
//! - [`pg_bin`]: the PostgreSQL programs under test, 15 unless `WALSHIP_PG_BIN` names those
//!   of another major version (`scripts/test.sh` runs `tests/versions.rs` on 16, 17 and 18).
//!   Each server gets its own socket directory: builds differ in their default (Debian's is
//!   `/var/run/postgresql`, the builds `scripts/install-pg.sh` installs use `/tmp`).
//! - [`TestDir`]: a unique temporary directory per test, removed on success.
//! - [`Pg`]: an initdb'd cluster on a Unix socket in that directory, stopped on drop. When
//!   the tests run as root, every PostgreSQL server command runs as the `postgres` user.
//! - [`Sender`], [`Receiver`]: the walship processes, with their logs in the test directory.
//! - [`Proxy`]: a TCP proxy whose connections a test can cut, or that damages what it
//!   forwards ([`Chaos`]).
//! - [`verify_wal`]: every stored segment, fetched with `restore-wal`, read by `pg_waldump`.

use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use walship_common::{Lsn, SegmentNo, TimelineId, WalFileName, WalSegSize};

/// PostgreSQL 15's programs where Debian installs them: the default of [`pg_bin`].
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// The PostgreSQL programs the tests run: `WALSHIP_PG_BIN`, or [`PG_BIN`].
pub fn pg_bin() -> PathBuf {
    std::env::var_os("WALSHIP_PG_BIN")
        .filter(|b| !b.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(PG_BIN))
}

/// `pg_bin()/name`: a PostgreSQL program of the version under test.
pub fn pg_tool(name: &str) -> PathBuf {
    pg_bin().join(name)
}

/// The version of the PostgreSQL programs in `bin`, as `postgres --version` gives it
/// (`"18.6"`).
pub fn pg_version_of(bin: &Path) -> Result<String> {
    let out = run({
        let mut c = Command::new(bin.join("postgres"));
        c.arg("--version");
        c
    })?;
    // "postgres (PostgreSQL) 18.6" or "postgres (PostgreSQL) 15.15 (Debian 15.15-0+deb12u1)"
    out.split_whitespace()
        .nth(2)
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("{}: no version in {out:?}", bin.display()))
}

/// The major version of the PostgreSQL programs in `bin` (18 for "18.6").
pub fn pg_major_of(bin: &Path) -> Result<u32> {
    let v = pg_version_of(bin)?;
    v.split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|m| m.parse().ok())
        .ok_or_else(|| anyhow!("{}: version {v:?} has no major number", bin.display()))
}

/// Generous: only to keep a broken test from hanging forever.
pub const PATIENCE: Duration = Duration::from_secs(180);

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Where the walship binaries are: `WALSHIP_BIN_DIR`, or the target directory of this test.
/// When the tests run as root the binaries are copied into a directory the `postgres` user
/// can reach, since the checkout may not be readable by it. That directory is named after
/// the target directory, so every test process of a checkout shares one copy (refreshed
/// when a build is newer) instead of leaving one behind per process.
pub fn bin(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let built = match std::env::var("WALSHIP_BIN_DIR") {
            Ok(d) => PathBuf::from(d),
            // target/<profile>/deps/<test> -> target/<profile>
            Err(_) => std::env::current_exe()
                .expect("current exe")
                .parent()
                .and_then(|p| p.parent())
                .expect("target dir")
                .to_owned(),
        };
        if !is_root() {
            return built;
        }
        let key = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            built.hash(&mut h);
            h.finish()
        };
        let shared = std::env::temp_dir().join(format!("walship-bin-{key:016x}"));
        let _ = fs::create_dir(&shared);
        // Shared only if it is a directory this user owns (then made writable by it alone);
        // otherwise a directory of this process's own.
        let trusted = fs::symlink_metadata(&shared).is_ok_and(|m| {
            use std::os::unix::fs::MetadataExt;
            m.is_dir() && m.uid() == nix::unistd::geteuid().as_raw()
        }) && fs::set_permissions(&shared, fs::Permissions::from_mode(0o755)).is_ok();
        let copy = if trusted {
            shared
        } else {
            let own =
                std::env::temp_dir().join(format!("walship-bin-{key:016x}-{}", std::process::id()));
            fs::create_dir_all(&own).expect("create binary dir");
            own
        };
        for b in ["wal-sender", "wal-receiver"] {
            let src = fs::metadata(built.join(b)).expect("built binary");
            // The copy carries the build's modification time: equal size and time, same file.
            let current = fs::metadata(copy.join(b)).is_ok_and(|dst| {
                dst.len() == src.len() && dst.modified().ok() == src.modified().ok()
            });
            if current {
                continue;
            }
            // Renamed into place: a process running the old copy keeps its file.
            let tmp = copy.join(format!("{b}.tmp.{}", std::process::id()));
            fs::copy(built.join(b), &tmp).expect("copy binary");
            fs::File::options()
                .write(true)
                .open(&tmp)
                .and_then(|f| f.set_modified(src.modified()?))
                .expect("set the copy's modification time");
            fs::rename(&tmp, copy.join(b)).expect("rename binary");
        }
        fs::set_permissions(&copy, fs::Permissions::from_mode(0o755)).expect("chmod");
        copy
    });
    dir.join(name)
}

/// The `postgres` user's uid and gid, when the tests run as root.
pub fn postgres_ids() -> Option<(u32, u32)> {
    if !is_root() {
        return None;
    }
    let u = nix::unistd::User::from_name("postgres")
        .ok()
        .flatten()
        .expect("the postgres OS user exists");
    Some((u.uid.as_raw(), u.gid.as_raw()))
}

/// A walship command that writes what PostgreSQL reads (a standby's data directory, a WAL
/// store its restore_command reads): run as `postgres` when the tests run as root.
pub fn as_postgres(mut cmd: Command) -> Command {
    if let Some((uid, gid)) = postgres_ids() {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

/// A command for the PostgreSQL server program `bin/name`, run as `postgres` when we are
/// root.
fn pg_server_cmd(bin: &Path, name: &str) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(name));
        c
    } else {
        Command::new(bin.join(name))
    }
}

fn run(mut cmd: Command) -> Result<String> {
    let desc = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {desc}"))?;
    if !out.status.success() {
        bail!(
            "{desc} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls `f` until it returns `Some`, or fails after [`PATIENCE`].
pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if start.elapsed() > PATIENCE {
            bail!("timed out after {PATIENCE:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A per-test directory, readable and writable by `postgres`, removed when the test passes.
pub struct TestDir {
    pub path: PathBuf,
}

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let base = std::env::var("WALSHIP_TEST_TMP")
            .map(PathBuf::from)
            .unwrap_or_else(|_| std::env::temp_dir());
        let path = base.join(format!(
            "walship-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create test dir");
        if is_root() {
            run({
                let mut c = Command::new("chown");
                c.arg("postgres:postgres").arg(&path);
                c
            })
            .expect("chown test dir");
        }
        TestDir { path }
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("WALSHIP_KEEP_TEST_DIRS").is_some() {
            eprintln!("test files kept in {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// A PostgreSQL cluster listening only on a Unix socket.
pub struct Pg {
    pub data: PathBuf,
    pub sock: PathBuf,
    pub port: u16,
    /// The PostgreSQL programs that run it and talk to it.
    pub bin: PathBuf,
    log: PathBuf,
    running: bool,
}

impl Pg {
    /// initdb and start a primary of the version under test ([`pg_bin`]). `extra_conf`
    /// lines go into postgresql.conf.
    pub fn start_primary(dir: &TestDir, name: &str, extra_conf: &str) -> Result<Pg> {
        Pg::start_primary_of(&pg_bin(), dir, name, extra_conf)
    }

    /// [`Pg::start_primary`] with the PostgreSQL programs in `bin`. initdb's defaults stand,
    /// data checksums among them (on from PostgreSQL 18).
    pub fn start_primary_of(bin: &Path, dir: &TestDir, name: &str, extra_conf: &str) -> Result<Pg> {
        let data = dir.join(name);
        let sock = dir.join(&format!("{name}-sock"));
        fs::create_dir_all(&sock)?;
        if is_root() {
            run({
                let mut c = Command::new("chown");
                c.arg("postgres:postgres").arg(&sock);
                c
            })?;
        }
        let mut c = pg_server_cmd(bin, "initdb");
        c.arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "--no-sync"]);
        run(c)?;
        let conf = format!(
            "listen_addresses = ''\nunix_socket_directories = '{}'\nport = 5432\nwal_level = replica\nmax_wal_senders = 20\nmax_replication_slots = 20\nfsync = on\nlogging_collector = off\nshared_buffers = 64MB\n{extra_conf}\n",
            sock.display()
        );
        fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))?
            .write_all(conf.as_bytes())?;
        let mut pg = Pg {
            data,
            sock,
            port: 5432,
            bin: bin.to_owned(),
            log: dir.join(&format!("{name}.log")),
            running: false,
        };
        pg.ctl(&["start", "-w", "-t", "120"])?;
        pg.running = true;
        Ok(pg)
    }

    /// Starts a server on an existing data directory (a restored standby) with its own socket.
    pub fn start_existing(dir: &TestDir, data: &Path, name: &str) -> Result<Pg> {
        let sock = dir.join(&format!("{name}-sock"));
        fs::create_dir_all(&sock)?;
        if let Some((uid, gid)) = postgres_ids() {
            nix::unistd::chown(&sock, Some(uid.into()), Some(gid.into()))?;
        }
        let mut pg = Pg {
            data: data.to_owned(),
            sock: sock.clone(),
            port: 5432,
            bin: pg_bin(),
            log: dir.join(&format!("{name}.log")),
            running: false,
        };
        let opts = format!(
            "-c unix_socket_directories='{}' -c port=5432 -c listen_addresses=''",
            sock.display()
        );
        pg.ctl(&["start", "-w", "-t", "180", "-o", &opts])?;
        pg.running = true;
        Ok(pg)
    }

    /// Starts a server on an existing data directory with a plain `pg_ctl start`, no `-o`:
    /// it listens where its own configuration says, which the caller states as `sock` and
    /// `port` (the handle connects there).
    pub fn start_as_configured(
        dir: &TestDir,
        data: &Path,
        name: &str,
        sock: &Path,
        port: u16,
    ) -> Result<Pg> {
        let mut pg = Pg {
            data: data.to_owned(),
            sock: sock.to_owned(),
            port,
            bin: pg_bin(),
            log: dir.join(&format!("{name}.log")),
            running: false,
        };
        pg.ctl(&["start", "-w", "-t", "180"])?;
        pg.running = true;
        Ok(pg)
    }

    /// Tries to start a server on `data` and reports whether PostgreSQL accepted it.
    pub fn would_start(dir: &TestDir, data: &Path) -> bool {
        let sock = dir.join("probe-sock");
        let _ = fs::create_dir_all(&sock);
        if let Some((uid, gid)) = postgres_ids() {
            let _ = nix::unistd::chown(&sock, Some(uid.into()), Some(gid.into()));
        }
        let mut c = pg_server_cmd(&pg_bin(), "pg_ctl");
        let opts = format!(
            "-c unix_socket_directories='{}' -c port=5432 -c listen_addresses=''",
            sock.display()
        );
        c.arg("-D")
            .arg(data)
            .arg("-l")
            .arg(dir.join("probe.log"))
            .args(["start", "-w", "-t", "20", "-o", &opts]);
        let started = run(c).is_ok();
        if started {
            let mut c = pg_server_cmd(&pg_bin(), "pg_ctl");
            c.arg("-D")
                .arg(data)
                .args(["stop", "-m", "immediate", "-w"]);
            let _ = run(c);
        }
        started
    }

    fn ctl(&self, args: &[&str]) -> Result<String> {
        let mut c = pg_server_cmd(&self.bin, "pg_ctl");
        c.arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(args);
        run(c)
    }

    pub fn restart(&self) -> Result<()> {
        self.ctl(&["restart", "-m", "fast", "-w", "-t", "120"])
            .map(|_| ())
    }

    /// `pg_ctl stop -m fast`.
    pub fn stop(&mut self) -> Result<()> {
        self.ctl(&["stop", "-m", "fast", "-w", "-t", "120"])?;
        self.running = false;
        Ok(())
    }

    /// `pg_ctl promote`: the standby becomes a primary on a new timeline.
    pub fn promote(&self) -> Result<()> {
        self.ctl(&["promote", "-w", "-t", "120"]).map(|_| ())
    }

    /// `pg_ctl stop -m immediate`: a crash, as far as the server's WAL is concerned.
    pub fn stop_immediate(&mut self) -> Result<()> {
        self.ctl(&["stop", "-m", "immediate", "-w", "-t", "120"])?;
        self.running = false;
        Ok(())
    }

    /// Starts a stopped server again with the same settings as before.
    pub fn start(&mut self) -> Result<()> {
        let opts = format!(
            "-c unix_socket_directories='{}' -c port={} -c listen_addresses=''",
            self.sock.display(),
            self.port
        );
        self.ctl(&["start", "-w", "-t", "180", "-o", &opts])?;
        self.running = true;
        Ok(())
    }

    /// `psql` on this server with stdin open, for a session a test keeps open.
    pub fn psql_session(&self) -> Result<Child> {
        let mut c = Command::new(self.bin.join("psql"));
        c.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(self.conninfo())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c.spawn().context("spawn psql")
    }

    /// libpq keyword/value connection string.
    pub fn conninfo(&self) -> String {
        format!(
            "host={} port={} user=postgres dbname=postgres",
            self.sock.display(),
            self.port
        )
    }

    /// Runs SQL with psql and returns its unaligned, tuples-only output, trimmed.
    pub fn sql(&self, sql: &str) -> Result<String> {
        let mut c = Command::new(self.bin.join("psql"));
        c.args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(self.conninfo())
            .arg("-c")
            .arg(sql);
        Ok(run(c)?.trim().to_owned())
    }

    pub fn flush_lsn(&self) -> Result<Lsn> {
        Ok(self.sql("SELECT pg_current_wal_flush_lsn()")?.parse()?)
    }

    pub fn pgbench_init(&self, scale: u32) -> Result<()> {
        let mut c = Command::new(self.bin.join("pgbench"));
        // The connection string is pgbench's positional dbname argument (-d means --debug).
        c.args(["-i", "-q", "-s", &scale.to_string()])
            .arg(self.conninfo());
        run(c).map(|_| ())
    }

    /// Starts `pgbench -c clients -T secs` in the background.
    pub fn pgbench(&self, clients: u32, secs: u32) -> Result<Child> {
        Ok(Command::new(self.bin.join("pgbench"))
            .args(["-n", "-c", &clients.to_string(), "-T", &secs.to_string()])
            .arg(self.conninfo())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?)
    }

    /// Waits until no connection uses the slot (the sender closes its replication
    /// connection a moment after its receiver goes).
    pub fn wait_slot_released(&self, slot: &str) -> Result<()> {
        wait_for(&format!("slot {slot} to be released"), || {
            Ok((self.sql(&format!(
                "SELECT active FROM pg_replication_slots WHERE slot_name = '{slot}'"
            ))? == "f")
                .then_some(()))
        })
    }

    /// The slot's restart_lsn, if the slot exists and has one.
    pub fn slot_restart_lsn(&self, slot: &str) -> Result<Option<Lsn>> {
        let v = self.sql(&format!(
            "SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = '{slot}'"
        ))?;
        Ok(if v.is_empty() { None } else { Some(v.parse()?) })
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        if self.running {
            let _ = self.ctl(&["stop", "-m", "immediate", "-w"]);
        }
    }
}

/// A 127.0.0.1 port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A walship child process with its log file.
pub struct Proc {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(mut cmd: Command, log: PathBuf) -> Result<Proc> {
        let f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let child = cmd
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("spawn {cmd:?}"))?;
        Ok(Proc {
            child: Some(child),
            log,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the exit status.
    pub fn term(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        c.wait().ok()
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self) -> Result<std::process::ExitStatus> {
        let c = self.child.as_mut().ok_or_else(|| anyhow!("not running"))?;
        let start = Instant::now();
        loop {
            if let Some(st) = c.try_wait()? {
                self.child = None;
                return Ok(st);
            }
            if start.elapsed() > PATIENCE {
                bail!("process did not exit within {PATIENCE:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The JSON log lines whose message is `message`, as their `fields` objects.
    pub fn log_events(&self, message: &str) -> Vec<serde_json::Value> {
        self.log_events_starting(message)
            .into_iter()
            .filter(|f| f["message"].as_str() == Some(message))
            .collect()
    }

    /// The JSON log lines whose message starts with `prefix`, as their `fields` objects.
    pub fn log_events_starting(&self, prefix: &str) -> Vec<serde_json::Value> {
        self.log_text()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v.get("fields").cloned())
            .filter(|f| {
                f.get("message")
                    .and_then(|m| m.as_str())
                    .is_some_and(|m| m.starts_with(prefix))
            })
            .collect()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub struct Sender {
    pub proc: Proc,
    pub addr: String,
    conninfo: String,
    extra: Vec<String>,
}

impl Sender {
    pub fn start(dir: &TestDir, pg: &Pg) -> Result<Sender> {
        Sender::start_with(dir, pg, "sender", &[])
    }

    /// A sender with extra `serve` arguments, logging to `<dir>/<name>.log`.
    pub fn start_with(dir: &TestDir, pg: &Pg, name: &str, extra: &[&str]) -> Result<Sender> {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut s = Sender {
            proc: Proc {
                child: None,
                log: dir.join(&format!("{name}.log")),
            },
            addr,
            conninfo: pg.conninfo(),
            extra: extra.iter().map(|a| a.to_string()).collect(),
        };
        s.spawn()?;
        Ok(s)
    }

    fn spawn(&mut self) -> Result<()> {
        let mut c = Command::new(bin("wal-sender"));
        c.args([
            "--log-format",
            "json",
            "serve",
            "--pg-conn",
            &self.conninfo,
            "--listen",
            &self.addr,
        ])
        .args(&self.extra);
        self.proc = Proc::spawn(c, self.proc.log.clone())?;
        let addr = self.addr.clone();
        wait_for("wal-sender to listen", || {
            Ok(TcpStream::connect(&addr).ok().map(|_| ()))
        })
    }

    /// SIGTERM, then start again on the same address.
    pub fn restart(&mut self) -> Result<()> {
        self.proc.term();
        self.spawn()
    }
}

pub struct Receiver {
    pub proc: Proc,
    pub wal_dir: PathBuf,
    pub name: String,
    pub sender: String,
    /// Extra `follow` arguments (TLS files, for example).
    pub extra: Vec<String>,
    /// Run as the `postgres` OS user when the tests run as root (needed when a standby
    /// reads the store or connects to the receiver's socket).
    pub as_postgres: bool,
}

impl Receiver {
    /// A receiver that is not running yet; its store is `<dir>/wal-<name>`.
    pub fn new(dir: &TestDir, sender: &str, name: &str) -> Receiver {
        Receiver {
            proc: Proc {
                child: None,
                log: dir.join(&format!("receiver-{name}.log")),
            },
            wal_dir: dir.join(&format!("wal-{name}")),
            name: name.to_owned(),
            sender: sender.to_owned(),
            extra: Vec::new(),
            as_postgres: false,
        }
    }

    pub fn start(dir: &TestDir, sender: &str, name: &str) -> Result<Receiver> {
        let mut r = Receiver::new(dir, sender, name);
        r.spawn()?;
        Ok(r)
    }

    pub fn spawn(&mut self) -> Result<()> {
        let mut c = Command::new(bin("wal-receiver"));
        c.args([
            "--log-format",
            "json",
            "follow",
            "--sender",
            &self.sender,
            "--name",
            &self.name,
            "--wal-dir",
        ])
        .arg(&self.wal_dir)
        .args(&self.extra);
        if self.as_postgres {
            c = as_postgres(c);
        }
        self.proc = Proc::spawn(c, self.proc.log.clone())?;
        Ok(())
    }

    /// Runs the receiver until it exits by itself; returns its exit code and its log.
    pub fn run_to_exit(&mut self) -> Result<(Option<i32>, String)> {
        self.spawn()?;
        let status = self.proc.wait_exit()?;
        Ok((status.code(), self.proc.log_text()))
    }

    pub fn status(&self) -> Result<serde_json::Value> {
        status_json(&self.wal_dir)
    }

    pub fn flush_lsn(&self) -> Result<Lsn> {
        let s = self.status()?;
        s["flush_lsn"]
            .as_str()
            .ok_or_else(|| anyhow!("no flush_lsn in {s}"))?
            .parse()
            .map_err(Into::into)
    }

    /// Waits until the store's flush position reaches `lsn`.
    pub fn wait_flush(&mut self, lsn: Lsn) -> Result<()> {
        wait_for(&format!("receiver {} to reach {lsn}", self.name), || {
            if !self.proc.is_running() {
                bail!(
                    "receiver {} exited:\n{}",
                    self.name,
                    tail(&self.proc.log_text(), 20)
                );
            }
            Ok(match self.status() {
                Ok(_) if self.flush_lsn()? >= lsn => Some(()),
                _ => None,
            })
        })
    }

    /// Waits until the receiver has asked for WAL, and returns where it first asked from.
    pub fn wait_streaming(&self) -> Result<Lsn> {
        wait_for(
            &format!("receiver {} to start streaming", self.name),
            || Ok(self.requested_starts().first().copied()),
        )
    }

    /// Every `start_lsn` this receiver has requested, in order.
    pub fn requested_starts(&self) -> Vec<Lsn> {
        self.proc
            .log_events("requesting WAL")
            .iter()
            .filter_map(|f| f["start_lsn"].as_str().and_then(|s| s.parse().ok()))
            .collect()
    }
}

/// `wal-receiver bootstrap` as a child process (run as `postgres` when root).
pub fn bootstrap_cmd(
    sender: &str,
    name: &str,
    pgdata: &Path,
    wal_dir: &Path,
    mappings: &[(PathBuf, PathBuf)],
) -> Command {
    let mut c = as_postgres(Command::new(bin("wal-receiver")));
    c.args([
        "--log-format",
        "json",
        "bootstrap",
        "--sender",
        sender,
        "--name",
        name,
        "--pgdata",
    ])
    .arg(pgdata)
    .arg("--wal-dir")
    .arg(wal_dir);
    for (old, new) in mappings {
        c.arg("--tablespace-mapping")
            .arg(format!("{}={}", old.display(), new.display()));
    }
    c
}

/// Makes a directory owned by `postgres` (when root), e.g. for a tablespace.
pub fn postgres_dir(path: &Path) -> Result<()> {
    fs::create_dir_all(path)?;
    if let Some((uid, gid)) = postgres_ids() {
        nix::unistd::chown(path, Some(uid.into()), Some(gid.into()))?;
    }
    fs::set_permissions(path, fs::Permissions::from_mode(0o700))?;
    Ok(())
}

/// A fingerprint of the pgbench tables (and any extra query) that two servers with the
/// same data return identically.
pub fn pgbench_fingerprint(pg: &Pg, extra: &[&str]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for t in [
        "pgbench_accounts",
        "pgbench_branches",
        "pgbench_tellers",
        "pgbench_history",
    ] {
        out.push(pg.sql(&format!(
            "SELECT '{t}', count(*), coalesce(sum(hashtext(x::text)::bigint), 0) FROM {t} x"
        ))?);
    }
    for q in extra {
        out.push(pg.sql(q)?);
    }
    Ok(out)
}

pub fn status_json(wal_dir: &Path) -> Result<serde_json::Value> {
    let mut c = Command::new(bin("wal-receiver"));
    c.args(["status", "--json", "--wal-dir"]).arg(wal_dir);
    Ok(serde_json::from_str(&run(c)?)?)
}

/// The sender's side of a walship handshake, for fake senders: reads (and ignores) the
/// receiver's `Hello`, then answers with `ServerInfo` for a primary of `system_id` on
/// timeline 1 with 16 MiB segments, flushed up to `flush_lsn`.
pub fn fake_server_info(
    s: &mut TcpStream,
    enc: &mut walship_common::frame::FrameEncoder,
    system_id: u64,
    flush_lsn: Lsn,
    server_version: &str,
) -> Result<()> {
    use walship_common::protocol::{Message, PROTOCOL_VERSION};
    let mut scratch = [0u8; 4096];
    let _ = s.read(&mut scratch); // Hello
    let mut out = Vec::new();
    Message::ServerInfo {
        version: PROTOCOL_VERSION,
        system_id,
        timeline: 1,
        seg_size: 16 << 20,
        flush_lsn,
        server_version: server_version.into(),
        in_recovery: false,
    }
    .encode(enc, &mut out)?;
    s.write_all(&out)?;
    Ok(())
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Fetches every segment of the store's timeline from `from` through its flush position with
/// `restore-wal` and has `pg_waldump` read the whole range. Returns the number of records
/// pg_waldump read.
pub fn verify_wal(wal_dir: &Path, from: Lsn, scratch: &Path) -> Result<usize> {
    let st = status_json(wal_dir)?;
    let timeline = TimelineId(st["timeline"].as_u64().ok_or_else(|| anyhow!("timeline"))? as u32);
    let flush: Lsn = st["flush_lsn"]
        .as_str()
        .ok_or_else(|| anyhow!("flush_lsn"))?
        .parse()?;
    read_timeline(wal_dir, &st, timeline, from, flush, scratch)
}

/// Reads the store's WAL of timeline `tli` from `from` to `to` with `pg_waldump -t tli`:
/// segments through `restore-wal`, and an old timeline's last segment from its `.partial`
/// (which `restore-wal` does not serve, as PostgreSQL's archive does not). Returns the
/// number of records.
pub fn verify_timeline(
    wal_dir: &Path,
    tli: TimelineId,
    from: Lsn,
    to: Lsn,
    scratch: &Path,
) -> Result<usize> {
    read_timeline(wal_dir, &status_json(wal_dir)?, tli, from, to, scratch)
}

/// [`verify_timeline`], given the store's status (`st`).
fn read_timeline(
    wal_dir: &Path,
    st: &serde_json::Value,
    tli: TimelineId,
    from: Lsn,
    to: Lsn,
    scratch: &Path,
) -> Result<usize> {
    let seg = WalSegSize::new(st["segment_size"].as_u64().unwrap_or(0))
        .ok_or_else(|| anyhow!("segment size"))?;
    fs::create_dir_all(scratch)?;
    for segno in seg.segment_of(from).0..=seg.segment_of(Lsn(to.0.saturating_sub(1))).0 {
        let name = WalFileName::Segment {
            timeline: tli,
            segno: SegmentNo(segno),
        }
        .to_name(seg);
        let mut c = Command::new(bin("wal-receiver"));
        c.args(["restore-wal", "--no-prefetch", "--wal-dir"])
            .arg(wal_dir)
            .arg(&name)
            .arg(scratch.join(&name));
        let restored = run(c);
        // Only an old timeline's last segment may come from its .partial: on the store's
        // own timeline restore-wal must serve every segment.
        if restored.is_err() && tli.0 as u64 != st["timeline"].as_u64().unwrap_or(0) {
            let partial = wal_dir.join(format!("{name}.partial"));
            fs::copy(&partial, scratch.join(&name)).with_context(|| {
                format!("neither restore-wal nor {} has {name}", partial.display())
            })?;
        } else {
            restored.with_context(|| format!("restore-wal {name}"))?;
        }
    }
    let out = Command::new(pg_tool("pg_waldump"))
        .arg("-p")
        .arg(scratch)
        .args([
            "-t",
            &tli.0.to_string(),
            "--start",
            &from.to_string(),
            "--end",
            &to.to_string(),
        ])
        .stdin(Stdio::null())
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || stderr.contains("error") {
        bail!(
            "pg_waldump -t {} failed over {from}..{to}: {}",
            tli.0,
            tail(&stderr, 5)
        );
    }
    fs::remove_dir_all(scratch)?;
    Ok(out
        .stdout
        .split(|&b| b == b'\n')
        .filter(|l| l.starts_with(b"rmgr:"))
        .count())
}

/// A TCP proxy from a local port to `target`; [`Proxy::cut`] drops every open connection.
pub struct Proxy {
    pub addr: String,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
    flips: Arc<AtomicU64>,
    cuts: Arc<AtomicU64>,
}

/// What a chaotic proxy does to the bytes it forwards, in each direction of each
/// connection: flip one random bit about every `flip_every` bytes, and cut the connection
/// about every `cut_every` bytes (each distance uniform in 1..=2x). 0 turns either off.
#[derive(Clone, Copy, Debug)]
pub struct Chaos {
    pub seed: u64,
    pub flip_every: u64,
    pub cut_every: u64,
}

/// xorshift64*: a small, seeded, reproducible generator for test damage.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A distance in 1..=2*mean, or never for 0.
    fn distance(&mut self, mean: u64) -> u64 {
        if mean == 0 {
            u64::MAX
        } else {
            1 + self.next() % (2 * mean)
        }
    }
}

/// Copies `from` to `to`, damaging the bytes as `chaos` says.
fn forward(
    mut from: TcpStream,
    mut to: TcpStream,
    chaos: Option<Chaos>,
    stream_no: u64,
    flips: &AtomicU64,
    cuts: &AtomicU64,
) {
    let mut rng =
        Rng(chaos.map_or(1, |c| c.seed) ^ (stream_no.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1);
    let (flip_every, cut_every) = chaos.map_or((0, 0), |c| (c.flip_every, c.cut_every));
    let mut to_flip = rng.distance(flip_every);
    let mut to_cut = rng.distance(cut_every);
    let mut buf = [0u8; 64 << 10];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 {
            break;
        }
        let mut n = n as u64;
        let mut cut = false;
        if to_cut <= n {
            n = to_cut - 1;
            cut = true;
        } else {
            to_cut -= n;
        }
        let mut at = 0;
        while to_flip <= n - at {
            at += to_flip;
            buf[(at - 1) as usize] ^= 1 << (rng.next() % 8);
            flips.fetch_add(1, Ordering::SeqCst);
            to_flip = rng.distance(flip_every);
        }
        to_flip -= n - at;
        if to.write_all(&buf[..n as usize]).is_err() {
            break;
        }
        if cut {
            cuts.fetch_add(1, Ordering::SeqCst);
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

impl Proxy {
    /// A proxy that forwards faithfully until [`Proxy::cut`].
    pub fn start(target: &str) -> Result<Proxy> {
        Proxy::start_with(target, None)
    }

    /// A proxy that also damages and cuts connections as `chaos` says.
    pub fn start_chaos(target: &str, chaos: Chaos) -> Result<Proxy> {
        Proxy::start_with(target, Some(chaos))
    }

    fn start_with(target: &str, chaos: Option<Chaos>) -> Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?.to_string();
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (flips, cuts) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (c2, s2, target) = (conns.clone(), stop.clone(), target.to_owned());
        let (f2, k2) = (flips.clone(), cuts.clone());
        listener.set_nonblocking(true)?;
        std::thread::spawn(move || {
            let mut stream_no = 0u64;
            while !s2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let _ = client.set_nonblocking(false);
                        let Ok(server) = TcpStream::connect(&target) else {
                            continue;
                        };
                        let mut list = c2.lock().unwrap();
                        for (from, to) in [(&client, &server), (&server, &client)] {
                            let (a, b) = (from.try_clone().unwrap(), to.try_clone().unwrap());
                            let (f, k) = (f2.clone(), k2.clone());
                            stream_no += 1;
                            let no = stream_no;
                            std::thread::spawn(move || forward(a, b, chaos, no, &f, &k));
                        }
                        list.push(client);
                        list.push(server);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(Proxy {
            addr,
            conns,
            stop,
            flips,
            cuts,
        })
    }

    /// Bits flipped so far.
    pub fn flips(&self) -> u64 {
        self.flips.load(Ordering::SeqCst)
    }

    /// Connections cut by chaos so far.
    pub fn cuts(&self) -> u64 {
        self.cuts.load(Ordering::SeqCst)
    }

    /// Cuts every connection through the proxy; new ones are accepted again.
    pub fn cut(&self) -> usize {
        let mut list = self.conns.lock().unwrap();
        let n = list.len() / 2;
        for s in list.drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        n
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.cut();
    }
}

/// A test certificate authority, and certificates it signs, written as PEM files.
pub struct Ca {
    pub cert_path: PathBuf,
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
    dir: PathBuf,
}

impl Ca {
    /// A new CA whose certificate is `<dir>/<name>.pem`.
    pub fn new(dir: &TestDir, name: &str) -> Result<Ca> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("walship test CA {name}"));
        let key = rcgen::KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let cert_path = dir.join(&format!("{name}.pem"));
        fs::write(&cert_path, cert.pem())?;
        Ok(Ca {
            cert_path,
            cert,
            key,
            dir: dir.path.clone(),
        })
    }

    /// Issues a certificate with common name `cn` and DNS/IP subject alternative names
    /// `sans`, expired if asked. Returns the paths of its certificate and key.
    pub fn issue(
        &self,
        file: &str,
        cn: &str,
        sans: &[&str],
        expired: bool,
    ) -> Result<(PathBuf, PathBuf)> {
        let mut params =
            rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = rcgen::KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        let (c, k) = (
            self.dir.join(format!("{file}.crt")),
            self.dir.join(format!("{file}.key")),
        );
        fs::write(&c, cert.pem())?;
        fs::write(&k, key.serialize_pem())?;
        fs::set_permissions(&k, fs::Permissions::from_mode(0o644))?;
        Ok((c, k))
    }
}

/// Compares every complete segment the store holds from `from` up to the segment of `upto`
/// (exclusive) with the primary's own copy in `pg_wal`, byte for byte. Returns how many
/// segments were compared; segments the primary has already removed are skipped.
pub fn compare_with_primary(
    wal_dir: &Path,
    pg: &Pg,
    from: Lsn,
    upto: Lsn,
    scratch: &Path,
) -> Result<usize> {
    let st = status_json(wal_dir)?;
    let seg = WalSegSize::new(
        st["segment_size"]
            .as_u64()
            .ok_or_else(|| anyhow!("segment_size"))?,
    )
    .ok_or_else(|| anyhow!("segment size"))?;
    let timeline = TimelineId(st["timeline"].as_u64().ok_or_else(|| anyhow!("timeline"))? as u32);
    fs::create_dir_all(scratch)?;
    let mut compared = 0;
    for segno in seg.segment_of(from).0..seg.segment_of(upto).0 {
        let name = WalFileName::Segment {
            timeline,
            segno: SegmentNo(segno),
        }
        .to_name(seg);
        let Ok(theirs) = fs::read(pg.data.join("pg_wal").join(&name)) else {
            continue;
        };
        let dest = scratch.join(&name);
        let mut c = Command::new(bin("wal-receiver"));
        c.args(["restore-wal", "--no-prefetch", "--wal-dir"])
            .arg(wal_dir)
            .arg(&name)
            .arg(&dest);
        run(c).with_context(|| format!("restore-wal {name}"))?;
        let ours = fs::read(&dest)?;
        if ours != theirs {
            let at = ours.iter().zip(&theirs).position(|(a, b)| a != b);
            bail!("segment {name} differs from the primary's (first difference at byte {at:?})");
        }
        fs::remove_file(&dest)?;
        compared += 1;
    }
    Ok(compared)
}

impl Pg {
    /// Replaces `pg_hba.conf` with `lines` and reloads the server, returning once new
    /// connections see the new rules. Keep a line that lets the harness in
    /// (`local all postgres trust`).
    pub fn set_hba(&self, lines: &str) -> Result<()> {
        let before = self.sql("SELECT pg_conf_load_time()")?;
        fs::write(self.data.join("pg_hba.conf"), lines)?;
        self.sql("SELECT pg_reload_conf()")?;
        wait_for("PostgreSQL to reload pg_hba.conf", || {
            Ok((self.sql("SELECT pg_conf_load_time()")? != before).then_some(()))
        })
    }

    /// Turns TLS on with a certificate from `ca` for `names` (its first name is the common
    /// name), and has the server listen on 127.0.0.1 as well as on its socket, on a free
    /// port. Restarts the server; returns the port.
    pub fn enable_tls(&mut self, ca: &Ca, names: &[&str]) -> Result<u16> {
        let (cert, key) = ca.issue("pg-server", names[0], names, false)?;
        for (from, to) in [(&cert, "server.crt"), (&key, "server.key")] {
            let dest = self.data.join(to);
            fs::copy(from, &dest)?;
            fs::set_permissions(&dest, fs::Permissions::from_mode(0o600))?;
            if let Some((uid, gid)) = postgres_ids() {
                nix::unistd::chown(&dest, Some(uid.into()), Some(gid.into()))?;
            }
        }
        let port = free_port();
        fs::OpenOptions::new()
            .append(true)
            .open(self.data.join("postgresql.conf"))?
            .write_all(
                format!(
                    "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nlisten_addresses = '127.0.0.1'\nport = {port}\n"
                )
                .as_bytes(),
            )?;
        self.restart()?;
        self.port = port;
        Ok(port)
    }
}

// A first run as the README sets it up (shared by first_run.rs and check.rs).

/// Environment variables of libpq that must not leak from the test's environment.
pub const PG_ENV: &[&str] = &[
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGUSER",
    "PGDATABASE",
    "PGPASSWORD",
    "PGPASSFILE",
    "PGSSLMODE",
    "PGSSLROOTCERT",
    "PGSSLCERT",
    "PGSSLKEY",
    "PGAPPNAME",
    "PGOPTIONS",
    "PGCONNECT_TIMEOUT",
];

/// A password with the characters a password file must escape (`:` and `\`).
pub fn password() -> String {
    format!(r"Wal:ship\pw-{}-x", std::process::id())
}

/// A primary with scram-sha-256 for the role `walship`, created with the README's
/// attributes and grants. `hba` is the rest of pg_hba.conf after the harness's own line.
pub fn primary(dir: &TestDir, pw: &str) -> Result<Pg> {
    let pg = Pg::start_primary(dir, "primary", "password_encryption = 'scram-sha-256'")?;
    pg.sql(&format!(
        "CREATE ROLE walship WITH LOGIN REPLICATION PASSWORD '{pw}';
         GRANT EXECUTE ON FUNCTION pg_backup_start(text, boolean) TO walship;
         GRANT EXECUTE ON FUNCTION pg_backup_stop(boolean) TO walship;
         GRANT pg_read_all_settings TO walship;"
    ))?;
    pg.sql("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 1000) g")?;
    Ok(pg)
}

/// The README's pg_hba.conf lines for a sender on the primary's host, after the line the
/// harness itself needs.
pub const HBA_LOCAL: &str = "local all postgres trust\n\
                         local replication walship scram-sha-256\n\
                         local postgres walship scram-sha-256\n";

/// A private home directory for the sender (no password file unless a test writes one).
pub fn home(dir: &TestDir, name: &str) -> Result<PathBuf> {
    let h = dir.join(name);
    fs::create_dir_all(&h)?;
    fs::set_permissions(&h, fs::Permissions::from_mode(0o700))?;
    Ok(h)
}

/// `wal-sender serve` with `conninfo`, `HOME` set to `home`, and `env` as the only libpq
/// variables. Returns the process and its address.
pub fn start_sender(
    dir: &TestDir,
    log: &str,
    conninfo: &str,
    home: &Path,
    env: &[(&str, &str)],
) -> Result<(Proc, String)> {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut c = Command::new(bin("wal-sender"));
    c.args([
        "--log-format",
        "json",
        "serve",
        "--pg-conn",
        conninfo,
        "--listen",
        &addr,
    ])
    .env("HOME", home);
    for v in PG_ENV {
        c.env_remove(v);
    }
    c.envs(env.iter().copied());
    let p = Proc::spawn(c, dir.join(&format!("{log}.log")))?;
    Ok((p, addr))
}

/// Waits until the sender listens; fails with its log if it exits first.
pub fn wait_listening(p: &mut Proc, addr: &str) -> Result<()> {
    wait_for("wal-sender to listen", || {
        if !p.is_running() {
            bail!("wal-sender exited:\n{}", tail(&p.log_text(), 20));
        }
        Ok(std::net::TcpStream::connect(addr).ok().map(|_| ()))
    })
}
