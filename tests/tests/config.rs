//! Configuration from a file (`--config`) and from `WALSHIP_*` variables, end to end against
//! real PostgreSQL 15: a `follow` configured only by a file and one configured only by the
//! environment each stream WAL from a real sender; `serve` configured by a file with
//! `pg_password_file` logs in to a scram-sha-256 primary; an unknown key stops either
//! program with exit 2 at its file and line. Every child gets its configuration on its own
//! `Command`: nothing is set in the test process's environment.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Result};
use walship_tests::*;

/// The exit code of a usage or configuration error.
const EXIT_USAGE: i32 = 2;
/// The exit code of a sender that cannot use the primary as configured.
const EXIT_SETUP: i32 = 12;

/// The variables the harness and the scripts use for themselves. None may be the variable of
/// a flag, or running the tests with it set would configure the programs under test.
const HARNESS_VARIABLES: &[&str] = &[
    "WALSHIP_BIN_DIR",
    "WALSHIP_PG_BIN",
    "WALSHIP_PG_OTHER_BIN",
    "WALSHIP_PG_CACHE",
    "WALSHIP_PG_MAJORS",
    "WALSHIP_TEST_TMP",
    "WALSHIP_TEST_THREADS",
    "WALSHIP_KEEP_TEST_DIRS",
];

/// `program` with no `WALSHIP_*` variable of the test's own environment, and `env` set: only
/// what the test gives configures it.
fn walship(program: &str, env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(bin(program));
    for (k, _) in std::env::vars_os() {
        if k.to_str().is_some_and(|k| k.starts_with("WALSHIP_")) {
            c.env_remove(k);
        }
    }
    c.envs(env.iter().copied());
    c
}

fn write_file(path: &Path, text: &str, mode: u32) -> Result<()> {
    fs::write(path, text)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// New rows on the primary reach the receiver's store, and pg_waldump reads all of it.
fn streams(pg: &Pg, r: &mut Receiver, dir: &TestDir) -> Result<()> {
    // The receiver logs "requesting WAL" in JSON only if log_format came through too.
    let first = wait_for("the receiver to ask for WAL", || {
        if !r.proc.is_running() {
            bail!("the receiver exited:\n{}", tail(&r.proc.log_text(), 20));
        }
        Ok(r.requested_starts().first().copied())
    })?;
    pg.sql("CREATE TABLE IF NOT EXISTS c (g int); INSERT INTO c SELECT generate_series(1, 20000)")?;
    let target = pg.flush_lsn()?;
    r.wait_flush(target)?;
    let records = verify_wal(&r.wal_dir, first, &dir.join(&format!("verify-{}", r.name)))?;
    assert!(records > 1000, "pg_waldump read only {records} records");
    Ok(())
}

#[test]
fn follow_configured_only_by_a_file_streams() -> Result<()> {
    let dir = TestDir::new("config-file");
    let pg = Pg::start_primary(&dir, "primary", "")?;
    let sender = Sender::start(&dir, &pg)?;
    let mut r = Receiver::new(&dir, &sender.addr, "fromfile");
    let conf = dir.join("standby.toml");
    write_file(
        &conf,
        &format!(
            "# a standby's receiver\n\
             log_format = \"json\"\n\
             sender = [\"{}\"]\n\
             name = \"fromfile\"\n\
             wal_dir = \"{}\"\n\
             keep-wal = \"all\"\n\
             # status's: follow ignores it\n\
             json = true\n",
            sender.addr,
            r.wal_dir.display()
        ),
        0o600,
    )?;
    let mut c = walship("wal-receiver", &[]);
    c.arg("follow").arg("--config").arg(&conf);
    r.proc = Proc::spawn(c, r.proc.log.clone())?;
    streams(&pg, &mut r, &dir)?;

    // The same file serves `status`: its wal_dir and json, with follow's keys ignored.
    let out = walship("wal-receiver", &[])
        .arg("status")
        .arg("--config")
        .arg(&conf)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(st["flush_lsn"], r.status()?["flush_lsn"], "{st}");
    Ok(())
}

#[test]
fn follow_configured_only_by_the_environment_streams() -> Result<()> {
    let dir = TestDir::new("config-env");
    let pg = Pg::start_primary(&dir, "primary", "")?;
    let sender = Sender::start(&dir, &pg)?;
    let mut r = Receiver::new(&dir, &sender.addr, "fromenv");
    let wal_dir = r.wal_dir.display().to_string();
    let mut c = walship(
        "wal-receiver",
        &[
            ("WALSHIP_LOG_FORMAT", "json"),
            ("WALSHIP_SENDER", &sender.addr),
            ("WALSHIP_NAME", "fromenv"),
            ("WALSHIP_WAL_DIR", &wal_dir),
            // A variable that names no flag is ignored.
            ("WALSHIP_NOT_A_FLAG", "x"),
        ],
    );
    c.arg("follow");
    r.proc = Proc::spawn(c, r.proc.log.clone())?;
    streams(&pg, &mut r, &dir)
}

/// `wal-sender serve --config conf`, with a private, empty home and no libpq variables.
fn sender_from(dir: &TestDir, conf: &Path, log: &str) -> Result<Proc> {
    let home = dir.join(&format!("home-{log}"));
    fs::create_dir_all(&home)?;
    fs::set_permissions(&home, fs::Permissions::from_mode(0o700))?;
    let mut c = walship("wal-sender", &[]);
    c.arg("serve").arg("--config").arg(conf).env("HOME", &home);
    for v in PG_ENV {
        c.env_remove(v);
    }
    Proc::spawn(c, dir.join(&format!("{log}.log")))
}

#[test]
fn serve_takes_its_password_from_a_password_file_named_in_its_configuration() -> Result<()> {
    let dir = TestDir::new("config-password");
    let pw = format!("Conf:pw\\{}-x", std::process::id());
    let pg = primary(&dir, &pw)?;
    pg.set_hba(HBA_LOCAL)?;
    let pw_file = dir.join("walship.password");
    write_file(&pw_file, &format!("{pw}\n"), 0o600)?;
    let conninfo = format!("host={} port={} user=walship", pg.sock.display(), pg.port);
    let config = |addr: &str, password_file: Option<&Path>| {
        let mut text =
            format!("log_format = \"json\"\npg_conn = \"{conninfo}\"\nlisten = \"{addr}\"\n");
        if let Some(f) = password_file {
            text.push_str(&format!("pg_password_file = \"{}\"\n", f.display()));
        }
        text
    };

    let addr = format!("127.0.0.1:{}", free_port());
    let conf = dir.join("sender.toml");
    write_file(&conf, &config(&addr, Some(&pw_file)), 0o600)?;
    let mut sender = sender_from(&dir, &conf, "sender")?;
    wait_for("wal-sender to listen", || {
        if !sender.is_running() {
            bail!("wal-sender exited:\n{}", tail(&sender.log_text(), 20));
        }
        Ok(std::net::TcpStream::connect(&addr).ok().map(|_| ()))
    })?;
    // A receiver streams through it: the replication connection logged in too.
    pg.sql("INSERT INTO t SELECT g, 'more ' || g FROM generate_series(1001, 2000) g")?;
    let target = pg.flush_lsn()?;
    let mut r = Receiver::start(&dir, &addr, "follower")?;
    r.wait_flush(target)?;
    r.proc.term();
    sender.term();
    assert!(!sender.log_text().contains(&pw), "{}", sender.log_text());

    // `status --standby` takes a password file the same way (any server answers it).
    let status = |password_file: &Path| -> Result<(Option<i32>, String, serde_json::Value)> {
        let conf = dir.join("status.toml");
        write_file(
            &conf,
            &format!(
                "wal_dir = \"{}\"\njson = true\nstandby = \"{conninfo}\"\nstandby_password_file = \"{}\"\n",
                r.wal_dir.display(),
                password_file.display()
            ),
            0o600,
        )?;
        let mut c = walship("wal-receiver", &[]);
        c.arg("status").arg("--config").arg(&conf);
        for v in PG_ENV {
            c.env_remove(v);
        }
        let out = c.env("HOME", dir.join("home-sender")).output()?;
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let json = serde_json::from_slice(&out.stdout).unwrap_or_default();
        Ok((out.status.code(), stderr, json))
    };
    let (code, stderr, st) = status(&pw_file)?;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(st["standby_server"]["reachable"], true, "{st}");
    assert_eq!(st["standby_server"]["in_recovery"], false, "{st}");
    let wrong = dir.join("wrong.password");
    write_file(&wrong, "not-the-password\n", 0o600)?;
    let (code, _, st) = status(&wrong)?;
    assert_eq!(code, Some(0));
    assert_eq!(st["standby_server"]["reachable"], false, "{st}");
    write_file(&wrong, "not-the-password\n", 0o640)?;
    let (code, stderr, _) = status(&wrong)?;
    assert_eq!(code, Some(EXIT_USAGE), "{stderr}");
    assert!(stderr.contains("--standby-password-file"), "{stderr}");

    // Without the password file there is no password: the sender cannot log in.
    let conf = dir.join("sender-none.toml");
    write_file(
        &conf,
        &config(&format!("127.0.0.1:{}", free_port()), None),
        0o600,
    )?;
    let mut p = sender_from(&dir, &conf, "sender-none")?;
    let code = p.wait_exit()?.code();
    assert_eq!(code, Some(EXIT_SETUP), "{}", p.log_text());

    // A password file that others can read is refused, naming the fix, not the password.
    write_file(&pw_file, &format!("{pw}\n"), 0o644)?;
    let conf = dir.join("sender-open.toml");
    write_file(
        &conf,
        &config(&format!("127.0.0.1:{}", free_port()), Some(&pw_file)),
        0o600,
    )?;
    let mut p = sender_from(&dir, &conf, "sender-open")?;
    let code = p.wait_exit()?.code();
    let log = p.log_text();
    assert_eq!(code, Some(EXIT_USAGE), "{log}");
    assert!(log.contains("--pg-password-file"), "{log}");
    assert!(log.contains("chmod 600"), "{log}");
    assert!(!log.contains(&pw), "{log}");
    Ok(())
}

#[test]
fn an_unknown_key_exits_2_naming_the_file_and_line() -> Result<()> {
    let dir = TestDir::new("config-unknown");
    let conf = dir.join("standby.toml");
    write_file(
        &conf,
        "sender = [\"127.0.0.1:1\"]\nname = \"n\"\nwal_dir = \"/nonexistent\"\n\n# retention\n\nkeep_wall = \"64MB\"\n",
        0o600,
    )?;
    let out = walship("wal-receiver", &[])
        .args(["follow", "--config"])
        .arg(&conf)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_USAGE), "{stderr}");
    assert_eq!(
        stderr.trim_end(),
        format!(
            "wal-receiver: {}:7: unknown key \"keep_wall\" (did you mean \"keep_wal\"?)",
            conf.display()
        )
    );

    // The sender too, with the file named by WALSHIP_CONFIG.
    let conf = dir.join("sender.toml");
    write_file(&conf, "listne = \"127.0.0.1:1\"\n", 0o600)?;
    let out = walship(
        "wal-sender",
        &[("WALSHIP_CONFIG", &conf.display().to_string())],
    )
    .arg("serve")
    .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_USAGE), "{stderr}");
    assert!(
        stderr.contains(&format!("{}:1: unknown key \"listne\"", conf.display())),
        "{stderr}"
    );

    // A bad value is refused by clap as if typed, which says where it came from.
    write_file(&conf, "listen = \"127.0.0.1:1\"\nzstd_level = 42\n", 0o600)?;
    let out = walship("wal-sender", &[])
        .args(["serve", "--config"])
        .arg(&conf)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_USAGE), "{stderr}");
    assert!(stderr.contains("--zstd-level"), "{stderr}");
    assert!(
        stderr.contains(&format!("(--zstd-level came from {}:2)", conf.display())),
        "{stderr}"
    );
    Ok(())
}

/// Every long flag of every subcommand of `program`, from its help.
fn long_flags(program: &str) -> Result<Vec<String>> {
    let help = |args: &[&str]| -> Result<String> {
        let out = walship(program, &[]).args(args).output()?;
        if !out.status.success() {
            bail!("{program} {args:?} failed");
        }
        Ok(String::from_utf8(out.stdout)?)
    };
    let top = help(&["--help"])?;
    let subcommands: Vec<String> = top
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter(|s| s != "help")
        .collect();
    let mut flags = Vec::new();
    for sub in subcommands {
        for word in help(&[&sub, "--help"])?.split_whitespace() {
            if let Some(f) = word.strip_prefix("--") {
                let f: String = f
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                    .collect();
                if !f.is_empty() {
                    flags.push(f);
                }
            }
        }
    }
    Ok(flags)
}

#[test]
fn the_harness_variables_configure_no_flag() -> Result<()> {
    for program in ["wal-sender", "wal-receiver"] {
        let flags = long_flags(program)?;
        assert!(
            flags.iter().any(|f| f == "config") && flags.iter().any(|f| f == "log-format"),
            "{program}: no flags read from the help: {flags:?}"
        );
        for f in &flags {
            let var = format!("WALSHIP_{}", f.to_ascii_uppercase().replace('-', "_"));
            assert!(
                !HARNESS_VARIABLES.contains(&var.as_str()),
                "{program} --{f} is configured by {var}, which the test harness uses"
            );
        }
    }
    Ok(())
}
