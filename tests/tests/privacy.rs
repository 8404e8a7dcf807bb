//! Private by default, against real PostgreSQL 15: every store, repository and data
//! directory that `bootstrap`, `follow`, `backup`, `restore` and `scripts/bootstrap-follower.sh`
//! make is 0700 with 0600 files; another OS user can neither read a store nor be served on
//! the standby socket; a store or repository open to others is refused with the fix, and
//! `--allow-group-access` accepts one its group may read.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use walship_tests::*;

/// Modes under `root` (itself included) that are not `dir_mode` for a directory or
/// `file_mode` for a regular file, and how many entries were checked. Sockets and symbolic
/// links are not checked (a tablespace's link is followed by walking its target
/// separately); entries that vanish during the walk (a server's temporary files) are
/// skipped.
fn wrong_modes(root: &Path, dir_mode: u32, file_mode: u32) -> Result<(Vec<String>, usize)> {
    let mut wrong = Vec::new();
    let mut checked = 0;
    let mut stack = vec![root.to_owned()];
    while let Some(p) = stack.pop() {
        let meta = match fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("stat {}", p.display())),
        };
        let ft = meta.file_type();
        let mode = meta.permissions().mode() & 0o7777;
        let want = if ft.is_dir() {
            dir_mode
        } else if ft.is_file() {
            file_mode
        } else {
            continue;
        };
        checked += 1;
        if mode != want {
            wrong.push(format!("{} is {mode:04o}, not {want:04o}", p.display()));
        }
        if ft.is_dir() {
            match fs::read_dir(&p) {
                Ok(rd) => {
                    for e in rd {
                        stack.push(e?.path());
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("list {}", p.display())),
            }
        }
    }
    Ok((wrong, checked))
}

/// Asserts that everything under `root` is 0700/0600, and that there was something to check.
fn assert_private(root: &Path, at_least: usize) -> Result<()> {
    let (wrong, checked) = wrong_modes(root, 0o700, 0o600)?;
    assert!(
        wrong.is_empty(),
        "not private under {}:\n{}",
        root.display(),
        wrong.join("\n")
    );
    assert!(
        checked >= at_least,
        "only {checked} entries under {} (expected at least {at_least})",
        root.display()
    );
    Ok(())
}

fn mode_of(p: &Path) -> Result<u32> {
    Ok(fs::metadata(p)?.permissions().mode() & 0o7777)
}

fn chmod(p: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", p.display()))
}

/// Runs a command to its end: exit code, stdout, stderr.
fn output(mut c: Command) -> Result<(Option<i32>, String, String)> {
    let desc = format!("{c:?}");
    let out = c
        .stdin(Stdio::null())
        .current_dir("/")
        .output()
        .with_context(|| format!("run {desc}"))?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// `wal-receiver ARGS` as this process's user.
fn receiver(args: &[&str]) -> Command {
    let mut c = Command::new(bin("wal-receiver"));
    c.args(args);
    c
}

/// A command run as the OS user `user` (we are root).
fn as_user(user: &str, program: &Path) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", user, "--"]).arg(program);
    c
}

/// Waits until the store reached `lsn`, asking `status --allow-group-access` (the plain
/// `status` refuses a group-readable store).
fn wait_flush_group(r: &mut Receiver, lsn: walship_common::Lsn) -> Result<()> {
    wait_for(&format!("receiver {} to reach {lsn}", r.name), || {
        if !r.proc.is_running() {
            bail!(
                "receiver {} exited:\n{}",
                r.name,
                tail(&r.proc.log_text(), 20)
            );
        }
        let mut c = receiver(&["--allow-group-access", "status", "--json", "--wal-dir"]);
        c.arg(&r.wal_dir);
        let (code, out, _) = output(c)?;
        let flush = serde_json::from_str::<serde_json::Value>(&out)
            .ok()
            .and_then(|s| s["flush_lsn"].as_str().and_then(|l| l.parse().ok()));
        Ok((code == Some(0) && flush.is_some_and(|f: walship_common::Lsn| f >= lsn)).then_some(()))
    })
}

fn run_ok(dir: &TestDir, log: &str, c: Command) -> Result<()> {
    let mut p = Proc::spawn(c, dir.join(log))?;
    let st = p.wait_exit()?;
    if !st.success() {
        bail!("{log}: exit {:?}\n{}", st.code(), tail(&p.log_text(), 15));
    }
    Ok(())
}

/// Sends a replication startup packet to the socket `sock` and returns all the server
/// answers until it closes the connection.
fn startup_reply(sock: &Path) -> Result<Vec<u8>> {
    let mut s = UnixStream::connect(sock).with_context(|| format!("connect {}", sock.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut body = 196608i32.to_be_bytes().to_vec();
    for (k, v) in [
        ("user", "postgres"),
        ("replication", "true"),
        ("application_name", "intruder"),
    ] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut msg = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    msg.extend_from_slice(&body);
    s.write_all(&msg)?;
    let mut reply = Vec::new();
    s.read_to_end(&mut reply)?;
    Ok(reply)
}

/// psql as `user` on a replication connection to the socket directory `sock_dir`, running
/// IDENTIFY_SYSTEM.
fn psql_replication(user: &str, sock_dir: &Path, port: u16) -> Result<(Option<i32>, String)> {
    let mut c = as_user(user, &Path::new(PG_BIN).join("psql"));
    c.args(["-X", "-A", "-t", "-d"])
        .arg(format!(
            "host={} port={port} user=postgres replication=true connect_timeout=60",
            sock_dir.display()
        ))
        .args(["-c", "IDENTIFY_SYSTEM"]);
    let (code, out, err) = output(c)?;
    Ok((code, format!("{out}{err}")))
}

#[test]
fn bootstrap_and_follow_make_a_private_store_standby_and_tablespace() -> Result<()> {
    let dir = TestDir::new("privboot");
    let pg = Pg::start_primary(&dir, "primary", "")?;
    let ts_primary = dir.join("ts-primary");
    postgres_dir(&ts_primary)?;
    pg.sql(&format!(
        "CREATE TABLESPACE ts1 LOCATION '{}'",
        ts_primary.display()
    ))?;
    pg.sql("CREATE TABLE in_ts (v int) TABLESPACE ts1")?;
    pg.sql("INSERT INTO in_ts SELECT generate_series(1, 1000)")?;
    pg.pgbench_init(1)?;
    let sender = Sender::start(&dir, &pg)?;
    // Neither the store, the data directory nor the tablespace directory exists yet:
    // wal-receiver creates them all.
    let (pgdata, wal_dir, ts_standby) =
        (dir.join("standby"), dir.join("wal"), dir.join("ts-standby"));
    run_ok(
        &dir,
        "bootstrap.log",
        bootstrap_cmd(
            &sender.addr,
            "sb",
            &pgdata,
            &wal_dir,
            &[(ts_primary.clone(), ts_standby.clone())],
        ),
    )?;
    let mut follower = Receiver::new(&dir, &sender.addr, "sb");
    follower.wal_dir = wal_dir.clone();
    follower.as_postgres = true;
    follower.extra = vec!["--serve-standby".into(), wal_dir.display().to_string()];
    follower.spawn()?;
    follower.wait_streaming()?;
    let standby = Pg::start_existing(&dir, &pgdata, "standby")?;
    pg.sql("INSERT INTO in_ts SELECT generate_series(1001, 2000)")?;
    pg.sql("SELECT pg_switch_wal()")?;
    let target = pg.flush_lsn()?;
    follower.wait_flush(target)?;
    wait_for("the standby to stream from the receiver and replay", || {
        let row = standby.sql(&format!(
            "SELECT status || '|' || (pg_last_wal_replay_lsn() >= '{target}')::text FROM pg_stat_wal_receiver"
        ))?;
        Ok((row == "streaming|true").then_some(()))
    })?;
    assert_eq!(standby.sql("SELECT count(*) FROM in_ts")?, "2000");

    // The store: its directory, state, LOCK, sealed segments, the segment being written.
    assert_private(&wal_dir, 4)?;
    // The standby's data directory, with what PostgreSQL itself added while running.
    assert_private(&pgdata, 100)?;
    assert_private(&ts_standby, 2)?;
    Ok(())
}

#[test]
fn backup_and_restore_make_a_private_repository_and_data_directory() -> Result<()> {
    let dir = TestDir::new("privbackup");
    let pg = Pg::start_primary(&dir, "primary", "")?;
    pg.sql("CREATE TABLE t (v int)")?;
    pg.sql("INSERT INTO t SELECT generate_series(1, 100)")?;
    let sender = Sender::start(&dir, &pg)?;
    let bin_dir = bin("wal-receiver").parent().context("bin dir")?.to_owned();

    // scripts/backup.sh creates the repository (and its log and lock), and the backup in it.
    let repo = dir.join("repo");
    let mut c = as_postgres(Command::new(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/backup.sh"),
    ));
    c.arg("--bin")
        .arg(&bin_dir)
        .args(["--sender", &sender.addr, "--name", "repo", "--repo"])
        .arg(&repo);
    let (code, out, err) = output(c)?;
    assert_eq!(code, Some(0), "backup.sh: {out}{err}");
    assert!(out.starts_with("walship-backup OK "), "{out}");
    // A second backup by wal-receiver itself, with a follower keeping the archive.
    let mut arch = Receiver::new(&dir, &sender.addr, "repo");
    arch.wal_dir = repo.join("wal");
    arch.as_postgres = true;
    arch.spawn()?;
    arch.wait_streaming()?;
    pg.sql("INSERT INTO t SELECT generate_series(101, 200)")?;
    let mut c = as_postgres(receiver(&["--log-format", "json", "backup"]));
    c.args(["--sender", &sender.addr, "--name", "repo", "--repo"])
        .arg(&repo);
    run_ok(&dir, "backup.log", c)?;
    pg.sql("INSERT INTO t SELECT generate_series(201, 300)")?;
    pg.sql("SELECT pg_switch_wal()")?;
    arch.wait_flush(pg.flush_lsn()?)?;

    let restored = dir.join("restored");
    let mut c = as_postgres(receiver(&["--log-format", "json", "restore", "--repo"]));
    c.arg(&repo).arg("--pgdata").arg(&restored);
    run_ok(&dir, "restore.log", c)?;
    // Before PostgreSQL touches it: what restore wrote.
    assert_private(&restored, 100)?;
    let server = Pg::start_existing(&dir, &restored, "restored")?;
    wait_for("the restored server to finish recovery", || {
        Ok((server.sql("SELECT pg_is_in_recovery()")? == "f").then_some(()))
    })?;
    assert_eq!(server.sql("SELECT count(*) FROM t")?, "300");

    // The repository: backups, their files and manifests, the WAL archive, log and lock.
    assert_private(&repo, 100)?;
    assert!(repo.join("backup.log").is_file() && repo.join("backup.lock").is_file());
    // And the restored server after recovery: restore_command's files, PostgreSQL's own.
    assert_private(&restored, 100)?;
    Ok(())
}

#[test]
fn another_os_user_can_neither_read_the_store_nor_be_served_on_the_standby_socket() -> Result<()> {
    if !is_root() {
        eprintln!("skipped: switching to another OS user needs root");
        return Ok(());
    }
    let dir = TestDir::new("privpeer");
    let pg = Pg::start_primary(&dir, "primary", "")?;
    let system_id = pg.sql("SELECT system_identifier FROM pg_control_system()")?;
    let sender = Sender::start(&dir, &pg)?;
    // Served where bootstrap puts it by default: a socket in the store.
    let mut inner = Receiver::new(&dir, &sender.addr, "inner");
    inner.as_postgres = true;
    let port = free_port();
    inner.extra = vec![
        "--serve-standby".into(),
        inner.wal_dir.display().to_string(),
        "--serve-standby-port".into(),
        port.to_string(),
    ];
    inner.spawn()?;
    // And in a socket directory every user may enter: peer authentication decides.
    let open_sock = dir.join("open-sock");
    postgres_dir(&open_sock)?;
    chmod(&open_sock, 0o755)?;
    let mut outer = Receiver::new(&dir, &sender.addr, "outer");
    outer.as_postgres = true;
    outer.extra = vec![
        "--serve-standby".into(),
        open_sock.display().to_string(),
        "--serve-standby-port".into(),
        port.to_string(),
    ];
    outer.spawn()?;
    inner.wait_streaming()?;
    outer.wait_streaming()?;
    let lsn = pg.flush_lsn()?;
    inner.wait_flush(lsn)?;
    outer.wait_flush(lsn)?;
    let store = inner.wal_dir.clone();
    assert_eq!(mode_of(&store)?, 0o700);

    // Reading the store as nobody: the directory, a file in it, and through restore-wal.
    let (code, out, err) = output({
        let mut c = as_user("nobody", Path::new("/bin/ls"));
        c.arg(&store);
        c
    })?;
    assert_ne!(code, Some(0), "nobody listed the store: {out}");
    assert!(err.contains("Permission denied"), "{err}");
    let (code, _, err) = output({
        let mut c = as_user("nobody", Path::new("/bin/cat"));
        c.arg(store.join("state"));
        c
    })?;
    assert_ne!(code, Some(0), "nobody read the store's state file");
    assert!(err.contains("Permission denied"), "{err}");
    let first = fs::read_dir(&store)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.len() >= 24 && (n.ends_with(".zst") || n.ends_with(".partial")))
        .context("no segment in the store")?;
    let scratch = dir.join("nobody-scratch");
    fs::create_dir_all(&scratch)?;
    chmod(&scratch, 0o777)?;
    let (code, _, err) = output({
        let mut c = as_user("nobody", &bin("wal-receiver"));
        c.args(["restore-wal", "--no-prefetch", "--wal-dir"])
            .arg(&store)
            .arg(&first[..24])
            .arg(scratch.join(&first[..24]));
        c
    })?;
    assert_ne!(
        code,
        Some(0),
        "nobody got {} through restore-wal",
        &first[..24]
    );
    assert!(!scratch.join(&first[..24]).exists());
    let _ = err;

    // Connecting as nobody: the socket in the store cannot even be reached...
    let (code, text) = psql_replication("nobody", &store, port)?;
    assert_ne!(
        code,
        Some(0),
        "nobody was served from the store's socket: {text}"
    );
    assert!(text.contains("Permission denied"), "{text}");
    // ... and on the open socket, peer authentication refuses nobody, and root too: only the
    // store's owner is served.
    let (code, text) = psql_replication("nobody", &open_sock, port)?;
    assert_ne!(code, Some(0), "nobody was served: {text}");
    assert!(
        text.contains("peer authentication failed") && text.contains("nobody"),
        "{text}"
    );
    let reply = startup_reply(&open_sock.join(format!(".s.PGSQL.{port}")))?;
    let shown = String::from_utf8_lossy(&reply);
    assert_eq!(reply.first(), Some(&b'E'), "root was not refused: {shown}");
    assert!(
        shown.contains("28000") && shown.contains("peer authentication failed"),
        "{shown}"
    );
    let refusals = outer.proc.log_events_starting("standby connection refused");
    assert!(
        refusals.len() >= 2,
        "the refusals were not logged: {}",
        tail(&outer.proc.log_text(), 10)
    );
    // The owner (postgres, as whom the standby runs) is served.
    let (code, text) = psql_replication("postgres", &open_sock, port)?;
    assert_eq!(code, Some(0), "the store's owner was refused: {text}");
    assert!(text.starts_with(&format!("{system_id}|")), "{text}");
    Ok(())
}

#[test]
fn an_open_store_or_repository_is_refused_with_the_fix_unless_group_access_allows_it() -> Result<()>
{
    let dir = TestDir::new("privopen");
    let pg = Pg::start_primary(&dir, "primary", "")?;
    let sender = Sender::start(&dir, &pg)?;
    let mut r = Receiver::new(&dir, &sender.addr, "open");
    r.spawn()?;
    r.wait_streaming()?;
    r.wait_flush(pg.flush_lsn()?)?;
    r.proc.term();
    let store = r.wal_dir.clone();
    let shown = store.display().to_string();
    let status = |extra: &[&str]| -> Result<(Option<i32>, String)> {
        let mut c = receiver(extra);
        c.args(["status", "--wal-dir"]).arg(&store);
        let (code, out, err) = output(c)?;
        Ok((code, format!("{out}{err}")))
    };
    assert_eq!(status(&[])?.0, Some(0));

    // Group-readable: refused by status and follow, with the fix; accepted with
    // --allow-group-access.
    chmod(&store, 0o750)?;
    let (code, text) = status(&[])?;
    assert_eq!(code, Some(13), "{text}");
    assert!(
        text.contains(&format!("chmod -R go-rwx {shown}"))
            && text.contains("--allow-group-access")
            && text.contains("0750"),
        "{text}"
    );
    let (code, log) = r.run_to_exit()?;
    assert_eq!(code, Some(13), "{}", tail(&log, 5));
    assert!(log.contains(&format!("chmod -R go-rwx {shown}")), "{log}");
    let (code, text) = status(&["--allow-group-access"])?;
    assert_eq!(code, Some(0), "{text}");
    r.extra = vec!["--allow-group-access".into()];
    r.spawn()?;
    pg.sql("SELECT pg_switch_wal()")?;
    wait_flush_group(&mut r, pg.flush_lsn()?)?;
    r.proc.term();
    // With group access, what it created since (a new segment) is readable by the group,
    // and by no one else.
    let mut group_readable = 0;
    for e in fs::read_dir(&store)? {
        let m = e?.metadata()?;
        if m.is_file() {
            let mode = m.permissions().mode() & 0o777;
            assert!(mode == 0o600 || mode == 0o640, "a file of mode {mode:o}");
            group_readable += usize::from(mode == 0o640);
        }
    }
    assert!(group_readable > 0, "nothing was created with group access");

    // World-readable: refused even with --allow-group-access. restore-wal still serves
    // (PostgreSQL runs it), and warns.
    chmod(&store, 0o755)?;
    let (code, text) = status(&["--allow-group-access"])?;
    assert_eq!(code, Some(13), "{text}");
    assert!(
        text.contains(&format!("chmod -R g-w,o-rwx {shown}")),
        "{text}"
    );
    let (code, text) = status(&[])?;
    assert_eq!(code, Some(13), "{text}");
    let seg = fs::read_dir(&store)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.len() == 28 && n.ends_with(".zst"))
        .context("no sealed segment")?;
    let scratch = dir.join("scratch");
    fs::create_dir_all(&scratch)?;
    let mut c = receiver(&["restore-wal", "--no-prefetch", "--wal-dir"]);
    c.arg(&store).arg(&seg[..24]).arg(scratch.join(&seg[..24]));
    let (code, _, err) = output(c)?;
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("open to other users"), "{err}");
    assert_eq!(mode_of(&scratch.join(&seg[..24]))?, 0o600);

    // Private again: accepted.
    chmod(&store, 0o700)?;
    assert_eq!(status(&[])?.0, Some(0));

    // A repository open to others is refused by every command that takes it.
    let repo = dir.join("repo");
    fs::create_dir_all(repo.join("backups"))?;
    chmod(&repo, 0o755)?;
    let repo_shown = repo.display().to_string();
    for args in [
        &["backups", "--repo"][..],
        &["verify", "--repo"][..],
        &["prune", "--keep", "1", "--repo"][..],
    ] {
        let mut c = receiver(args);
        c.arg(&repo);
        let (code, out, err) = output(c)?;
        assert_eq!(code, Some(13), "{args:?}: {out}{err}");
        assert!(
            err.contains(&format!("chmod -R go-rwx {repo_shown}")),
            "{err}"
        );
    }
    let mut c = receiver(&["restore", "--repo"]);
    c.arg(&repo).arg("--pgdata").arg(dir.join("never"));
    let (code, _, err) = output(c)?;
    assert_eq!(code, Some(13), "{err}");
    assert!(!dir.join("never").exists());
    let mut c = receiver(&[
        "backup",
        "--sender",
        &sender.addr,
        "--name",
        "repo",
        "--repo",
    ]);
    c.arg(&repo);
    let (code, _, err) = output(c)?;
    assert_eq!(code, Some(13), "{err}");
    assert_eq!(
        pg.sql("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'walship_repo'")?,
        "0",
        "the refused backup created a slot"
    );

    // An empty directory the operator made with a wide mode is made private, as initdb does.
    let fresh = dir.join("fresh");
    fs::create_dir_all(&fresh)?;
    chmod(&fresh, 0o755)?;
    let mut f = Receiver::new(&dir, &sender.addr, "fresh");
    f.wal_dir = fresh.clone();
    f.spawn()?;
    f.wait_flush(pg.flush_lsn()?)?;
    f.proc.term();
    assert_private(&fresh, 3)?;

    // A new store made with --allow-group-access: 0750 and 0640.
    let mut g = Receiver::new(&dir, &sender.addr, "grp");
    g.extra = vec!["--allow-group-access".into()];
    g.spawn()?;
    wait_flush_group(&mut g, pg.flush_lsn()?)?;
    g.proc.term();
    let (wrong, checked) = wrong_modes(&g.wal_dir, 0o750, 0o640)?;
    assert!(
        wrong.is_empty() && checked >= 3,
        "{checked} entries: {}",
        wrong.join("\n")
    );

    // Writing into a store that belongs to another OS user is refused: what it wrote
    // would be unreadable by the owner.
    if let Some((uid, gid)) = postgres_ids() {
        nix::unistd::chown(&store, Some(uid.into()), Some(gid.into()))?;
        let (code, log) = r.run_to_exit()?;
        assert_eq!(code, Some(13), "{}", tail(&log, 5));
        assert!(log.contains("belongs to postgres"), "{log}");
    }
    Ok(())
}

/// Stops what `bootstrap-follower.sh` started: the standby and the follower.
struct ScriptCleanup {
    pgdata: PathBuf,
    pid_file: PathBuf,
}

impl Drop for ScriptCleanup {
    fn drop(&mut self) {
        let mut c = Command::new(if is_root() { "runuser" } else { "env" });
        if is_root() {
            c.args(["-u", "postgres", "--"]);
        }
        c.arg(Path::new(PG_BIN).join("pg_ctl"))
            .arg("-D")
            .arg(&self.pgdata)
            .args(["stop", "-m", "immediate", "-w"]);
        let _ = c.stdout(Stdio::null()).stderr(Stdio::null()).status();
        if let Some(pid) = fs::read_to_string(&self.pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

#[test]
fn bootstrap_follower_script_makes_a_private_store_and_standby() -> Result<()> {
    let dir = TestDir::new("privscript");
    let pg = Pg::start_primary(&dir, "primary", "")?;
    pg.pgbench_init(1)?;
    let sender = Sender::start(&dir, &pg)?;
    let pgdata = dir.join("standby");
    let wal_dir = dir.join("standby.wal");
    let sock = dir.join("standby-sock");
    let _cleanup = ScriptCleanup {
        pgdata: pgdata.clone(),
        pid_file: dir.join("standby.wal.follow.pid"),
    };
    let port = free_port();
    let mut c = Command::new(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/bootstrap-follower.sh"),
    );
    c.args(["--sender", &sender.addr, "--name", "scripted", "--pgdata"])
        .arg(&pgdata)
        .args(["--port", &port.to_string(), "--socket-dir"])
        .arg(&sock)
        .arg("--bin")
        .arg(bin("wal-receiver").parent().context("bin dir")?)
        .args(["--timeout", "180"]);
    let (code, out, err) = output(c)?;
    assert_eq!(code, Some(0), "bootstrap-follower.sh failed:\n{out}\n{err}");
    assert!(out.contains("the standby is up"), "{out}");
    pg.sql("SELECT pg_switch_wal()")?;
    let target = pg.flush_lsn()?;
    wait_for("the script's receiver to store the WAL", || {
        Ok(status_json(&wal_dir)
            .ok()
            .and_then(|s| s["flush_lsn"].as_str().and_then(|l| l.parse().ok()))
            .filter(|l: &walship_common::Lsn| *l >= target)
            .map(|_| ()))
    })?;

    assert_private(&wal_dir, 4)?;
    assert_private(&pgdata, 100)?;
    // Its logs and pid file, next to the store and the data directory.
    for f in [
        dir.join("standby.wal.follow.log"),
        dir.join("standby.wal.follow.pid"),
        dir.join("standby.log"),
    ] {
        assert_eq!(mode_of(&f)?, 0o600, "{}", f.display());
    }
    Ok(())
}
