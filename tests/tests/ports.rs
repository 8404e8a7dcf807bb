//! Servers that start as configured, against real PostgreSQL: a standby made by
//! `scripts/bootstrap-follower.sh --port P` and a server restored with `restore --port P`
//! come up on their own port and socket with a plain `pg_ctl start` (no `-o`), and the
//! `restore_command` they were given names the wal-receiver that made them: the copy
//! `scripts/install.sh` installed, not the build tree. The script's readiness check logs in
//! as any psql would (a password from `~/.pgpass`), and when it cannot, it still prints its
//! summary, with the command that restarts `follow`, and exits non-zero with the reason.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use walship_tests::*;

const PASSWORD: &str = "walship-test-password";

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts")
}

/// Installs the binaries under test with `scripts/install.sh` into `<dir>/installed/bin`
/// and returns that directory, as the running programs name it (symbolic links resolved).
fn install(dir: &TestDir) -> Result<PathBuf> {
    let bindir = dir.join("installed/bin");
    let out = Command::new("bash")
        .arg(scripts().join("install.sh"))
        .arg("--from")
        .arg(bin("wal-receiver").parent().context("bin dir")?)
        .arg("--bindir")
        .arg(&bindir)
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!(
            "install.sh failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for b in ["wal-sender", "wal-receiver"] {
        let mode = fs::metadata(bindir.join(b))?.permissions().mode() & 0o7777;
        assert_eq!(mode, 0o755, "{b} installed with mode {mode:o}");
    }
    let leftovers: Vec<_> = fs::read_dir(&bindir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    assert_eq!(leftovers.len(), 2, "install.sh left {leftovers:?}");
    Ok(fs::canonicalize(&bindir)?)
}

/// The settings wal-receiver appended to `postgresql.auto.conf`, last one of each name.
fn auto_conf(pgdata: &Path, name: &str) -> Result<String> {
    let conf = fs::read_to_string(pgdata.join("postgresql.auto.conf"))?;
    conf.lines()
        .rev()
        .find_map(|l| l.strip_prefix(&format!("{name} = ")))
        .map(str::to_owned)
        .with_context(|| format!("no {name} in postgresql.auto.conf:\n{conf}"))
}

/// Checks that the server on `pg` is the one at `pgdata`, listening where it was told.
fn check_listens_as_configured(pg: &Pg, pgdata: &Path, sock: &Path, port: u16) -> Result<()> {
    assert_eq!(pg.sql("SHOW port")?, port.to_string());
    assert_eq!(
        pg.sql("SHOW unix_socket_directories")?,
        sock.display().to_string()
    );
    assert_eq!(pg.sql("SHOW listen_addresses")?, "");
    assert_eq!(pg.sql("SHOW data_directory")?, pgdata.display().to_string());
    assert!(sock.join(format!(".s.PGSQL.{port}")).exists());
    Ok(())
}

/// Stops what `bootstrap-follower.sh` left running (the standby and its `follow`) when the
/// test ends, however it ends.
struct Leftovers {
    pgdata: PathBuf,
}

impl Leftovers {
    fn stop_standby(&self) {
        if self.pgdata.join("postmaster.pid").exists() {
            let mut c = as_postgres(Command::new(pg_tool("pg_ctl")));
            c.arg("-D")
                .arg(&self.pgdata)
                .args(["stop", "-m", "fast", "-w", "-t", "60"])
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let _ = c.status();
        }
    }
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        self.stop_standby();
        let pid_file = PathBuf::from(format!("{}.wal.follow.pid", self.pgdata.display()));
        if let Some(pid) = fs::read_to_string(pid_file)
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

/// Runs `bootstrap-follower.sh` for a standby `name` with `HOME=home` and no password in
/// the environment; returns its exit code and its output (stdout then stderr).
fn bootstrap_follower(
    dir: &TestDir,
    sender: &str,
    name: &str,
    bindir: &Path,
    sock: &Path,
    port: u16,
    home: &Path,
) -> Result<(Option<i32>, String)> {
    let out = Command::new("bash")
        .arg(scripts().join("bootstrap-follower.sh"))
        .args(["--sender", sender, "--name", name, "--pgdata"])
        .arg(dir.join(name))
        .args(["--port", &port.to_string(), "--socket-dir"])
        .arg(sock)
        .args(["--listen-addresses", "", "--bin"])
        .arg(bindir)
        .arg("--pg-bin")
        .arg(pg_bin())
        .args(["--timeout", "150"])
        .env("HOME", home)
        .env_remove("PGPASSWORD")
        .env_remove("PGPASSFILE")
        .stdin(Stdio::null())
        .output()?;
    Ok((
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

#[test]
fn a_standby_made_by_bootstrap_follower_starts_on_its_port_with_a_plain_pg_ctl_start() -> Result<()>
{
    let dir = TestDir::new("ports-standby");
    let pg = Pg::start_primary(&dir, "primary", "")?;
    pg.sql("CREATE TABLE t (v int)")?;
    pg.sql(&format!("ALTER ROLE postgres PASSWORD '{PASSWORD}'"))?;
    // The standby gets the primary's pg_hba.conf as it is on disk. Written here and not
    // loaded, it makes the standby demand a password while the primary, its sender and the
    // harness keep trust.
    fs::write(
        pg.data.join("pg_hba.conf"),
        "local all all scram-sha-256\nlocal replication all scram-sha-256\n",
    )?;
    let sender = Sender::start(&dir, &pg)?;
    let bindir = install(&dir)?;
    let receiver = bindir.join("wal-receiver");
    let sock = dir.join("standby-sock");
    postgres_dir(&sock)?;
    let home = dir.join("home");
    fs::create_dir_all(&home)?;

    // No password anywhere: the standby comes up, the check cannot log in. The summary is
    // printed all the same, and the script fails at once, naming the reason.
    let port = free_port();
    let nopw = Leftovers {
        pgdata: dir.join("nopw"),
    };
    let (code, out) = bootstrap_follower(&dir, &sender.addr, "nopw", &bindir, &sock, port, &home)?;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("could not log in as role 'postgres'")
            && out.contains("PGPASSWORD, PGPASSFILE or ~/.pgpass"),
        "{out}"
    );
    assert!(
        !out.contains("within 150s"),
        "it waited for its timeout:\n{out}"
    );
    assert!(
        out.contains("To start the receiver again")
            && out.contains(&format!(
                "{} follow --sender {} --name nopw --wal-dir",
                receiver.display(),
                sender.addr
            )),
        "no summary with the command that restarts follow:\n{out}"
    );
    // ... and the standby is indeed up, in recovery, for a client with the password.
    let psql = Command::new(pg_tool("psql"))
        .args(["-XAtqw", "-h"])
        .arg(&sock)
        .args(["-p", &port.to_string(), "-U", "postgres", "-d", "postgres"])
        .args(["-c", "SELECT pg_is_in_recovery()"])
        .env("PGPASSWORD", PASSWORD)
        .output()?;
    assert_eq!(
        String::from_utf8_lossy(&psql.stdout).trim(),
        "t",
        "{}",
        String::from_utf8_lossy(&psql.stderr)
    );
    drop(nopw);

    // The password in ~/.pgpass, as psql reads it: the check passes.
    let pgpass = home.join(".pgpass");
    fs::write(&pgpass, format!("*:*:*:postgres:{PASSWORD}\n"))?;
    fs::set_permissions(&pgpass, fs::Permissions::from_mode(0o600))?;
    let port = free_port();
    let pgdata = dir.join("sb");
    let sb = Leftovers {
        pgdata: pgdata.clone(),
    };
    let (code, out) = bootstrap_follower(&dir, &sender.addr, "sb", &bindir, &sock, port, &home)?;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("the standby is up and in recovery"), "{out}");
    assert_eq!(auto_conf(&pgdata, "port")?, port.to_string());
    assert_eq!(
        auto_conf(&pgdata, "unix_socket_directories")?,
        format!("'{}'", sock.display())
    );
    let restore = auto_conf(&pgdata, "restore_command")?;
    assert!(
        restore.starts_with(&format!("'{} restore-wal --wal-dir ", receiver.display())),
        "restore_command does not run the installed wal-receiver: {restore}"
    );

    // Stopped, and started again with no options at all: same port, same socket.
    sb.stop_standby();
    fs::write(pgdata.join("pg_hba.conf"), "local all all trust\n")?; // for the harness
    let standby = Pg::start_as_configured(&dir, &pgdata, "standby", &sock, port)?;
    check_listens_as_configured(&standby, &pgdata, &sock, port)?;
    assert_eq!(standby.sql("SELECT pg_is_in_recovery()")?, "t");
    // The follow the script started still feeds it.
    pg.sql("INSERT INTO t VALUES (42)")?;
    wait_for("the standby to replay the new row", || {
        Ok((standby.sql("SELECT count(*) FROM t")? == "1").then_some(()))
    })?;
    drop(standby);
    Ok(())
}

#[test]
fn a_restored_server_starts_on_its_port_and_replays_with_the_installed_program() -> Result<()> {
    let dir = TestDir::new("ports-restore");
    let pg = Pg::start_primary(&dir, "primary", "")?;
    pg.sql("CREATE TABLE t (v int)")?;
    let sender = Sender::start(&dir, &pg)?;
    let repo = dir.join("repo");
    postgres_dir(&repo)?;
    let mut arch = Receiver::new(&dir, &sender.addr, "repo");
    arch.wal_dir = repo.join("wal");
    arch.as_postgres = true;
    arch.spawn()?;
    arch.wait_streaming()?;
    let bindir = install(&dir)?;
    let receiver = bindir.join("wal-receiver");

    let mut backup = as_postgres(Command::new(&receiver));
    backup
        .args([
            "backup",
            "--sender",
            &sender.addr,
            "--name",
            "repo",
            "--repo",
        ])
        .arg(&repo);
    let mut p = Proc::spawn(backup, dir.join("backup.log"))?;
    assert!(p.wait_exit()?.success(), "{}", tail(&p.log_text(), 10));
    // Rows only the archive holds: the restored server gets them through restore_command.
    pg.sql("INSERT INTO t SELECT generate_series(1, 1000)")?;
    let end = pg.flush_lsn()?;
    arch.wait_flush(end)?;

    let (pgdata, sock, port) = (dir.join("restored"), dir.join("restored-sock"), free_port());
    postgres_dir(&sock)?;
    let mut restore = as_postgres(Command::new(&receiver));
    restore
        .args(["restore", "--repo"])
        .arg(&repo)
        .arg("--pgdata")
        .arg(&pgdata)
        .args(["--port", &port.to_string(), "--socket-dir"])
        .arg(&sock)
        .args(["--listen-addresses", ""]);
    let mut p = Proc::spawn(restore, dir.join("restore.log"))?;
    assert!(p.wait_exit()?.success(), "{}", tail(&p.log_text(), 10));
    let restore = auto_conf(&pgdata, "restore_command")?;
    assert!(
        restore.starts_with(&format!("'{} restore-wal --wal-dir ", receiver.display())),
        "restore_command does not run the installed wal-receiver: {restore}"
    );

    let restored = Pg::start_as_configured(&dir, &pgdata, "restored", &sock, port)?;
    wait_for("the restored server to finish recovery", || {
        Ok((restored.sql("SELECT pg_is_in_recovery()")? == "f").then_some(()))
    })?;
    check_listens_as_configured(&restored, &pgdata, &sock, port)?;
    assert_eq!(restored.sql("SELECT count(*) FROM t")?, "1000");
    // The primary kept its own socket throughout.
    assert_eq!(pg.sql("SELECT count(*) FROM t")?, "1000");
    Ok(())
}
