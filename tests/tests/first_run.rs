//! The first run, as the README tells a DBA to set it up: a role `walship` that logs in with
//! scram-sha-256, the README's grants and `pg_hba.conf` lines, a password that never
//! appears on a command line, and a server that may require TLS. Errors that cannot fix
//! themselves end the command at once with exit code 12 and a message that names the fix.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Result;
use walship_tests::*;

/// The exit code of wal-sender and wal-receiver when the sender cannot use the primary as
/// configured.
const EXIT_SETUP: i32 = 12;
/// Escapes a password file field.
fn pgpass_escape(s: &str) -> String {
    s.replace('\\', r"\\").replace(':', r"\:")
}

/// Runs a sender that must refuse to start: returns its exit code, log and how long it ran.
fn sender_refuses(
    dir: &TestDir,
    log: &str,
    conninfo: &str,
    home: &Path,
    env: &[(&str, &str)],
) -> Result<(Option<i32>, String, Duration)> {
    let started = Instant::now();
    let (mut p, _) = start_sender(dir, log, conninfo, home, env)?;
    let status = p.wait_exit()?;
    Ok((status.code(), p.log_text(), started.elapsed()))
}

/// The command line of a running process, as `ps` shows it.
fn cmdline(pid: u32) -> Result<String> {
    Ok(String::from_utf8_lossy(&fs::read(format!("/proc/{pid}/cmdline"))?).replace('\0', " "))
}

fn assert_no_password(what: &str, text: &str, pw: &str) {
    assert!(!text.contains(pw), "{what} shows the password:\n{text}");
    // Not even the part before the first character a file or a shell would escape.
    let head = pw.split(':').next().unwrap_or(pw);
    assert!(
        !text.contains(&format!("{head}:ship")),
        "{what} shows the password:\n{text}"
    );
}

/// Bootstraps `name` through `sender` into `<dir>/<name>-data`; returns the exit code,
/// the log, and the bootstrap's command line as it ran.
fn bootstrap(dir: &TestDir, sender: &str, name: &str) -> Result<(Option<i32>, String, String)> {
    let mut c = bootstrap_cmd(
        sender,
        name,
        &dir.join(&format!("{name}-data")),
        &dir.join(&format!("wal-{name}")),
        &[],
    );
    c.args(["--standby-feed", "restore-command"]);
    let mut p = Proc::spawn(c, dir.join(&format!("bootstrap-{name}.log")))?;
    let argv = cmdline(p.pid().expect("running"))?;
    let status = p.wait_exit()?;
    Ok((status.code(), p.log_text(), argv))
}

#[test]
fn the_sender_takes_its_password_from_pgpass_and_pgpassword_and_never_shows_it() -> Result<()> {
    let dir = TestDir::new("firstrun-secrets");
    let pw = password();
    let pg = primary(&dir, &pw)?;
    pg.set_hba(HBA_LOCAL)?;
    // No dbname: the SQL session must use a database that exists by default.
    let conninfo = format!("host={} port={} user=walship", pg.sock.display(), pg.port);

    // ~/.pgpass, 0600, with the socket directory as its host and escaped characters.
    let with_pgpass = home(&dir, "home-pgpass")?;
    let pgpass = with_pgpass.join(".pgpass");
    fs::write(
        &pgpass,
        format!(
            "# walship\n{sock}:{port}:replication:walship:{pw}\n{sock}:{port}:postgres:walship:{pw}\n",
            sock = pgpass_escape(&pg.sock.display().to_string()),
            port = pg.port,
            pw = pgpass_escape(&pw)
        ),
    )?;
    fs::set_permissions(&pgpass, fs::Permissions::from_mode(0o600))?;
    let (mut sender, addr) = start_sender(&dir, "sender-pgpass", &conninfo, &with_pgpass, &[])?;
    wait_listening(&mut sender, &addr)?;
    let sender_pid = sender.pid().expect("running");
    assert_no_password("the sender's command line", &cmdline(sender_pid)?, &pw);

    // A standby is bootstrapped through it: both connections, replication and SQL, log in.
    let (code, log, argv) = bootstrap(&dir, &addr, "sb")?;
    assert_eq!(code, Some(0), "bootstrap failed:\n{}", tail(&log, 20));
    assert_no_password("the bootstrap's command line", &argv, &pw);
    assert!(dir.join("sb-data/global/pg_control").exists());

    // A receiver follows through it.
    pg.sql("INSERT INTO t VALUES (1001, 'after the bootstrap')")?;
    let target = pg.flush_lsn()?;
    let mut r = Receiver::start(&dir, &addr, "follower")?;
    r.wait_flush(target)?;
    assert_no_password(
        "the receiver's command line",
        &cmdline(r.proc.pid().expect("running"))?,
        &pw,
    );
    assert_no_password("the sender's command line", &cmdline(sender_pid)?, &pw);
    assert_eq!(
        pg.sql("SELECT count(*) FROM pg_stat_replication WHERE usename = 'walship' AND application_name = 'follower'")?,
        "1"
    );
    r.proc.term();
    sender.term();
    assert_no_password("the sender's log", &sender.log_text(), &pw);
    assert_no_password("the receiver's log", &r.proc.log_text(), &pw);

    // The same file, readable by the group: ignored with libpq's warning, so no password.
    fs::set_permissions(&pgpass, fs::Permissions::from_mode(0o640))?;
    let (code, log, _) = sender_refuses(&dir, "sender-open-pgpass", &conninfo, &with_pgpass, &[])?;
    assert_eq!(code, Some(EXIT_SETUP), "{log}");
    assert!(log.contains("has group or world access"), "{log}");
    assert!(log.contains("password file"), "{log}");
    assert_no_password("the sender's log", &log, &pw);

    // PGPASSWORD, with no password file at all.
    let empty = home(&dir, "home-empty")?;
    let (mut sender, addr) = start_sender(
        &dir,
        "sender-pgpassword",
        &conninfo,
        &empty,
        &[("PGPASSWORD", pw.as_str())],
    )?;
    wait_listening(&mut sender, &addr)?;
    pg.sql("INSERT INTO t VALUES (1002, 'PGPASSWORD')")?;
    let target = pg.flush_lsn()?;
    let mut r = Receiver::start(&dir, &addr, "follower2")?;
    r.wait_flush(target)?;
    assert_no_password(
        "the sender's command line",
        &cmdline(sender.pid().expect("running"))?,
        &pw,
    );
    r.proc.term();
    sender.term();
    assert_no_password("the sender's log", &sender.log_text(), &pw);
    Ok(())
}

#[test]
fn serve_exits_at_once_on_a_setting_that_cannot_work() -> Result<()> {
    let dir = TestDir::new("firstrun-serve");
    let pw = password();
    let pg = primary(&dir, &pw)?;
    pg.set_hba(HBA_LOCAL)?;
    let empty = home(&dir, "home")?;
    let base = format!("host={} port={} user=walship", pg.sock.display(), pg.port);

    // A wrong password: authentication is named, the password given is not shown.
    let wrong = "Wrong-Pa55word-given";
    let (code, log, took) = sender_refuses(
        &dir,
        "sender-wrong",
        &base,
        &empty,
        &[("PGPASSWORD", wrong)],
    )?;
    eprintln!("serve with a wrong password exited after {took:?}");
    assert_eq!(code, Some(EXIT_SETUP), "{log}");
    assert!(log.contains("password authentication failed"), "{log}");
    assert!(log.contains("28P01"), "{log}");
    assert!(!log.contains(wrong), "{log}");
    assert!(!log.contains("receivers will retry"), "{log}");
    // Within seconds, not after any retrying (PATIENCE only bounds a hang).
    assert!(took < Duration::from_secs(60), "took {took:?}");

    // The same wrong password inside the string: shown nowhere.
    let (code, log, _) = sender_refuses(
        &dir,
        "sender-wrong-in-string",
        &format!("{base} password='{wrong}'"),
        &empty,
        &[],
    )?;
    assert_eq!(code, Some(EXIT_SETUP), "{log}");
    assert!(!log.contains(wrong), "{log}");

    // No password anywhere: where to put one is named.
    let (code, log, _) = sender_refuses(&dir, "sender-none", &base, &empty, &[])?;
    assert_eq!(code, Some(EXIT_SETUP), "{log}");
    assert!(log.contains("none was found"), "{log}");
    assert!(log.contains(".pgpass"), "{log}");

    // A typo'd keyword: exit 2, naming the keyword, not the string's password.
    let (code, log, _) = sender_refuses(
        &dir,
        "sender-typo",
        &format!("{base} pasword={pw} password={pw}"),
        &empty,
        &[],
    )?;
    assert_eq!(code, Some(2), "{log}");
    assert!(log.contains("\"pasword\""), "{log}");
    assert_no_password("the error", &log, &pw);

    // A database that does not exist, for the SQL session.
    let (code, log, _) = sender_refuses(
        &dir,
        "sender-nodb",
        &format!("{base} dbname=nosuchdb"),
        &empty,
        &[("PGPASSWORD", pw.as_str())],
    )?;
    assert_eq!(code, Some(EXIT_SETUP), "{log}");
    assert!(log.contains("nosuchdb"), "{log}");
    assert!(log.contains("3D000") || log.contains("28000"), "{log}");

    // A role without REPLICATION.
    pg.sql("ALTER ROLE walship NOREPLICATION")?;
    let (code, log, _) = sender_refuses(
        &dir,
        "sender-norepl",
        &base,
        &empty,
        &[("PGPASSWORD", pw.as_str())],
    )?;
    assert_eq!(code, Some(EXIT_SETUP), "{log}");
    assert!(log.contains("REPLICATION"), "{log}");
    pg.sql("ALTER ROLE walship REPLICATION")?;

    // A server that is not there yet is only a warning: the sender keeps serving.
    let (mut p, addr) = start_sender(
        &dir,
        "sender-not-up",
        &format!("host={} port=1 user=walship", dir.join("nowhere").display()),
        &empty,
        &[("PGPASSWORD", pw.as_str())],
    )?;
    wait_listening(&mut p, &addr)?;
    assert!(
        p.log_text().contains("receivers will retry"),
        "{}",
        p.log_text()
    );
    p.term();

    // And with everything right it starts.
    let (mut p, addr) = start_sender(
        &dir,
        "sender-ok",
        &base,
        &empty,
        &[("PGPASSWORD", pw.as_str())],
    )?;
    wait_listening(&mut p, &addr)?;
    assert!(
        p.log_text().contains("snapshots can be served"),
        "{}",
        p.log_text()
    );
    p.term();

    // A primary that cannot have slots, then one with wal_level = minimal.
    let env = [("PGPASSWORD", pw.as_str())];
    pg.sql("ALTER SYSTEM SET max_replication_slots = 0")?;
    pg.restart()?;
    let (code, log, _) = sender_refuses(&dir, "sender-no-slots", &base, &empty, &env)?;
    assert_eq!(code, Some(EXIT_SETUP), "{log}");
    assert!(log.contains("max_replication_slots"), "{log}");
    pg.sql("ALTER SYSTEM SET wal_level = minimal")?;
    pg.sql("ALTER SYSTEM SET max_wal_senders = 0")?;
    pg.restart()?;
    let (code, log, _) = sender_refuses(&dir, "sender-minimal", &base, &empty, &env)?;
    assert_eq!(code, Some(EXIT_SETUP), "{log}");
    assert!(
        log.contains("53300")
            && log.contains("max_wal_senders")
            && log.contains("wal_level = replica"),
        "{log}"
    );
    Ok(())
}

#[test]
fn a_receiver_exits_with_code_12_instead_of_retrying_when_the_sender_cannot_use_the_primary(
) -> Result<()> {
    let dir = TestDir::new("firstrun-receiver");
    let pw = password();
    let pg = primary(&dir, &pw)?;
    pg.sql("CREATE DATABASE walshipdb")?;
    pg.set_hba(&format!(
        "{HBA_LOCAL}local walshipdb walship scram-sha-256\n"
    ))?;
    let empty = home(&dir, "home")?;
    let (mut sender, addr) = start_sender(
        &dir,
        "sender",
        &format!(
            "host={} port={} user=walship dbname=walshipdb",
            pg.sock.display(),
            pg.port
        ),
        &empty,
        &[("PGPASSWORD", pw.as_str())],
    )?;
    wait_listening(&mut sender, &addr)?;

    // The SQL session's database is dropped after the sender started: a bootstrap fails at
    // once, naming it, instead of ten attempts over more than a minute.
    pg.sql("DROP DATABASE walshipdb")?;
    let started = Instant::now();
    let (code, log, _) = bootstrap(&dir, &addr, "sb")?;
    eprintln!("bootstrap exited after {:?}", started.elapsed());
    assert_eq!(code, Some(EXIT_SETUP), "{}", tail(&log, 20));
    assert!(log.contains("walshipdb"), "{log}");
    assert!(log.contains("does not exist"), "{log}");
    assert!(!log.contains("attempt 2"), "{log}");

    // The role's password changes under a running sender: follow exits, and so does a
    // bootstrap, each with code 12, naming authentication.
    pg.sql("ALTER ROLE walship PASSWORD 'changed-by-the-dba'")?;
    let started = Instant::now();
    let mut r = Receiver::new(&dir, &addr, "follower");
    let (code, log) = r.run_to_exit()?;
    eprintln!("follow exited after {:?}", started.elapsed());
    assert_eq!(code, Some(EXIT_SETUP), "{}", tail(&log, 20));
    assert!(log.contains("password authentication failed"), "{log}");
    assert!(!log.contains("reconnecting"), "{log}");
    assert_no_password("the receiver's log", &log, &pw);
    let (code, log, _) = bootstrap(&dir, &addr, "sb2")?;
    assert_eq!(code, Some(EXIT_SETUP), "{}", tail(&log, 20));
    assert!(log.contains("password authentication failed"), "{log}");
    assert!(!log.contains("attempt 2"), "{log}");
    // The sender itself keeps running: it is the operator's to fix.
    assert!(sender.is_running());
    sender.term();
    assert_no_password("the sender's log", &sender.log_text(), &pw);
    Ok(())
}

#[test]
fn sslmode_verify_full_against_a_server_that_requires_tls() -> Result<()> {
    let dir = TestDir::new("firstrun-tls");
    let pw = password();
    let mut pg = primary(&dir, &pw)?;
    let ca = Ca::new(&dir, "pg-ca")?;
    let port = pg.enable_tls(&ca, &["localhost"])?;
    // Only TLS connections from the loopback address, with scram-sha-256.
    pg.set_hba(
        "local all postgres trust\n\
         hostssl replication walship 127.0.0.1/32 scram-sha-256\n\
         hostssl postgres walship 127.0.0.1/32 scram-sha-256\n",
    )?;
    let empty = home(&dir, "home")?;
    let env = [("PGPASSWORD", pw.as_str())];
    let root = ca.cert_path.display().to_string();
    let full = format!(
        "host=localhost hostaddr=127.0.0.1 port={port} user=walship sslmode=verify-full sslrootcert={root}"
    );

    let (mut sender, addr) = start_sender(&dir, "sender", &full, &empty, &env)?;
    wait_listening(&mut sender, &addr)?;
    let (code, log, _) = bootstrap(&dir, &addr, "sb")?;
    assert_eq!(code, Some(0), "bootstrap failed:\n{}", tail(&log, 20));
    pg.sql("INSERT INTO t VALUES (1001, 'over TLS')")?;
    let target = pg.flush_lsn()?;
    let mut r = Receiver::start(&dir, &addr, "follower")?;
    r.wait_flush(target)?;
    // The replication connection is encrypted.
    assert_eq!(
        pg.sql("SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_replication r USING (pid) WHERE r.application_name = 'follower'")?,
        "t"
    );
    // status --standby reads the same settings: TLS, verify-full, PGPASSWORD.
    let out = Command::new(bin("wal-receiver"))
        .args(["status", "--json", "--wal-dir"])
        .arg(&r.wal_dir)
        .arg("--standby")
        .arg(&full)
        .env("PGPASSWORD", &pw)
        .output()?;
    let st: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(st["standby_server"]["reachable"], true, "{st}");
    assert_eq!(st["standby_server"]["in_recovery"], false, "{st}");
    r.proc.term();
    sender.term();

    // verify-ca checks the chain only: an address the certificate does not name is fine.
    let ca_only =
        format!("host=127.0.0.1 port={port} user=walship sslmode=verify-ca sslrootcert={root}");
    let (mut sender, addr) = start_sender(&dir, "sender-verify-ca", &ca_only, &empty, &env)?;
    wait_listening(&mut sender, &addr)?;
    assert!(
        sender.log_text().contains("snapshots can be served"),
        "{}",
        sender.log_text()
    );
    sender.term();

    // verify-full to that address is refused, naming the host.
    let (code, log, _) = sender_refuses(
        &dir,
        "sender-wrong-name",
        &format!("host=127.0.0.1 port={port} user=walship sslmode=verify-full sslrootcert={root}"),
        &empty,
        &env,
    )?;
    assert_eq!(code, Some(EXIT_SETUP), "{log}");
    assert!(log.contains("does not name the host 127.0.0.1"), "{log}");

    // A CA that did not sign the server's certificate.
    let other = Ca::new(&dir, "other-ca")?;
    let (code, log, _) = sender_refuses(
        &dir,
        "sender-wrong-ca",
        &format!(
            "host=localhost hostaddr=127.0.0.1 port={port} user=walship sslmode=verify-full sslrootcert={}",
            other.cert_path.display()
        ),
        &empty,
        &env,
    )?;
    assert_eq!(code, Some(EXIT_SETUP), "{log}");
    assert!(log.contains("not signed by a CA in"), "{log}");
    assert!(log.contains("other-ca.pem"), "{log}");

    // verify-full without a root certificate says what to give.
    let (code, log, _) = sender_refuses(
        &dir,
        "sender-no-root",
        &format!("host=localhost hostaddr=127.0.0.1 port={port} user=walship sslmode=verify-full"),
        &empty,
        &env,
    )?;
    assert_eq!(code, Some(EXIT_SETUP), "{log}");
    assert!(log.contains("sslrootcert"), "{log}");

    // Without TLS the server refuses: it requires TLS.
    let (code, log, _) = sender_refuses(
        &dir,
        "sender-no-tls",
        &format!("host=127.0.0.1 port={port} user=walship sslmode=disable"),
        &empty,
        &env,
    )?;
    assert_eq!(code, Some(EXIT_SETUP), "{log}");
    assert!(log.contains("no encryption"), "{log}");
    assert!(log.contains("pg_hba.conf"), "{log}");

    // require encrypts without checking the certificate.
    let (mut sender, addr) = start_sender(
        &dir,
        "sender-require",
        &format!("host=127.0.0.1 port={port} user=walship sslmode=require"),
        &empty,
        &env,
    )?;
    wait_listening(&mut sender, &addr)?;
    sender.term();

    // prefer, with a root certificate that cannot verify the server: as libpq, the
    // connection is made again without TLS, which pg_hba.conf allows here.
    pg.set_hba(
        "local all postgres trust\n\
         hostssl replication walship 127.0.0.1/32 scram-sha-256\n\
         hostssl postgres walship 127.0.0.1/32 scram-sha-256\n\
         hostnossl replication walship 127.0.0.1/32 scram-sha-256\n\
         hostnossl postgres walship 127.0.0.1/32 scram-sha-256\n",
    )?;
    let prefer = format!(
        "host=localhost hostaddr=127.0.0.1 port={port} user=walship sslmode=prefer sslrootcert={}",
        other.cert_path.display()
    );
    let (mut sender, addr) = start_sender(&dir, "sender-prefer", &prefer, &empty, &env)?;
    wait_listening(&mut sender, &addr)?;
    let log = sender.log_text();
    assert!(
        log.contains("sslmode=prefer: connecting without TLS"),
        "{log}"
    );
    assert!(log.contains("snapshots can be served"), "{log}");
    sender.term();
    // With require, the same root certificate is a failure, not a fallback.
    let (code, log, _) = sender_refuses(
        &dir,
        "sender-require-bad-root",
        &format!(
            "host=127.0.0.1 port={port} user=walship sslmode=require sslrootcert={}",
            other.cert_path.display()
        ),
        &empty,
        &env,
    )?;
    assert_eq!(code, Some(EXIT_SETUP), "{log}");
    assert!(!log.contains("connecting without TLS"), "{log}");

    // Client certificates: the server asks for one signed by its CA, naming the role.
    let ca_copy = pg.data.join("client-ca.crt");
    fs::copy(&ca.cert_path, &ca_copy)?;
    if let Some((uid, gid)) = postgres_ids() {
        nix::unistd::chown(&ca_copy, Some(uid.into()), Some(gid.into()))?;
    }
    pg.sql("ALTER SYSTEM SET ssl_ca_file = 'client-ca.crt'")?;
    pg.set_hba(
        "local all postgres trust\n\
         hostssl replication walship 127.0.0.1/32 scram-sha-256 clientcert=verify-full\n\
         hostssl postgres walship 127.0.0.1/32 scram-sha-256 clientcert=verify-full\n",
    )?;
    let (cert, key) = ca.issue("walship-client", "walship", &[], false)?;
    let with_cert = format!("{full} sslcert={} sslkey={}", cert.display(), key.display());
    // A key others may read is refused, as libpq refuses it.
    let (code, log, _) = sender_refuses(&dir, "sender-open-key", &with_cert, &empty, &env)?;
    assert_eq!(code, Some(EXIT_SETUP), "{log}");
    assert!(log.contains("has group or world access"), "{log}");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600))?;
    let (mut sender, addr) = start_sender(&dir, "sender-client-cert", &with_cert, &empty, &env)?;
    wait_listening(&mut sender, &addr)?;
    assert!(
        sender.log_text().contains("snapshots can be served"),
        "{}",
        sender.log_text()
    );
    sender.term();
    // Without it the server refuses, and the sender says so at once.
    let (code, log, _) = sender_refuses(&dir, "sender-no-client-cert", &full, &empty, &env)?;
    assert_eq!(code, Some(EXIT_SETUP), "{log}");
    assert!(log.contains("certificate"), "{log}");
    Ok(())
}
