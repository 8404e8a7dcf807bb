//! Security against real PostgreSQL 15: TLS accepted and refused, the identity rule, the
//! loopback rule, handshake timeouts and connection limits.

use std::io::Read;
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Result;
use walship_tests::*;

/// `--tls-*` arguments for a receiver.
fn tls_args(ca: &Path, identity: Option<&(std::path::PathBuf, std::path::PathBuf)>) -> Vec<String> {
    let mut a = vec!["--tls-ca".to_owned(), ca.display().to_string()];
    if let Some((c, k)) = identity {
        a.extend([
            "--tls-cert".to_owned(),
            c.display().to_string(),
            "--tls-key".to_owned(),
            k.display().to_string(),
        ]);
    }
    a
}

/// Runs a receiver that must be refused: exit 9, with `expect` in its error.
fn refused(
    dir: &TestDir,
    sender: &str,
    name: &str,
    extra: Vec<String>,
    expect: &str,
) -> Result<()> {
    let mut r = Receiver::new(dir, sender, name);
    r.extra = extra;
    let (code, log) = r.run_to_exit()?;
    assert_eq!(
        code,
        Some(9),
        "receiver {name} was not refused with exit 9:\n{}",
        tail(&log, 10)
    );
    assert!(
        log.contains(expect),
        "receiver {name}'s error does not say {expect:?}:\n{}",
        tail(&log, 10)
    );
    Ok(())
}

#[test]
fn tls_sender_streams_to_verified_receivers_and_refuses_bad_certificates() -> Result<()> {
    let dir = TestDir::new("tls");
    let ca = Ca::new(&dir, "ca")?;
    let other_ca = Ca::new(&dir, "other-ca")?;
    let server = ca.issue("server", "localhost", &["localhost"], false)?;
    let expired = ca.issue("expired", "localhost", &["localhost"], true)?;
    let pg = Pg::start_primary(&dir, "primary", "")?;
    let tls_sender = |name: &str, (c, k): &(std::path::PathBuf, std::path::PathBuf)| {
        let (c, k) = (c.display().to_string(), k.display().to_string());
        Sender::start_with(&dir, &pg, name, &["--tls-cert", &c, "--tls-key", &k])
    };
    let sender = tls_sender("sender", &server)?;
    let port = sender.addr.rsplit_once(':').unwrap().1.to_owned();
    let by_name = format!("localhost:{port}");

    // A verified receiver streams, and its WAL reads back whole.
    let mut r = Receiver::new(&dir, &by_name, "good");
    r.extra = tls_args(&ca.cert_path, None);
    r.spawn()?;
    let first = r.wait_streaming()?;
    pg.sql("CREATE TABLE t AS SELECT g FROM generate_series(1, 100000) g")?;
    r.wait_flush(pg.flush_lsn()?)?;
    verify_wal(&r.wal_dir, first, &dir.join("verify"))?;

    // Refused before any data moves.
    refused(&dir, &by_name, "plain", vec![], "requires TLS")?;
    refused(
        &dir,
        &by_name,
        "unknownca",
        tls_args(&other_ca.cert_path, None),
        "not signed by a trusted CA",
    )?;
    refused(
        &dir,
        &sender.addr,
        "wronghost",
        tls_args(&ca.cert_path, None),
        "does not name the host",
    )?;
    let old = tls_sender("sender-expired", &expired)?;
    let old_port = old.addr.rsplit_once(':').unwrap().1.to_owned();
    refused(
        &dir,
        &format!("localhost:{old_port}"),
        "late",
        tls_args(&ca.cert_path, None),
        "has expired",
    )?;
    let plain = Sender::start_with(&dir, &pg, "sender-plain", &[])?;
    refused(
        &dir,
        &plain.addr,
        "tlstoplain",
        vec![
            "--tls-ca".into(),
            ca.cert_path.display().to_string(),
            "--tls-server-name".into(),
            "localhost".into(),
        ],
        "did not speak TLS",
    )?;
    // No refused receiver got a slot.
    for name in ["plain", "unknownca", "wronghost", "late", "tlstoplain"] {
        assert_eq!(
            pg.sql(&format!(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'walship_{name}'"
            ))?,
            "0",
            "refused receiver {name} has a slot"
        );
    }
    // The good receiver was not disturbed.
    pg.sql("INSERT INTO t SELECT g FROM generate_series(1, 1000) g")?;
    r.wait_flush(pg.flush_lsn()?)?;
    Ok(())
}

#[test]
fn client_certificates_bind_receivers_to_their_names() -> Result<()> {
    let dir = TestDir::new("mtls");
    let ca = Ca::new(&dir, "ca")?;
    let other_ca = Ca::new(&dir, "other-ca")?;
    let server = ca.issue("server", "localhost", &["localhost"], false)?;
    let alice = ca.issue("alice", "alice", &[], false)?;
    let bob_by_san = ca.issue("bob", "someone", &["bob"], false)?;
    let forged = other_ca.issue("forged", "mallory", &[], false)?;
    let pg = Pg::start_primary(&dir, "primary", "")?;
    pg.pgbench_init(1)?;
    let (c, k, cca) = (
        server.0.display().to_string(),
        server.1.display().to_string(),
        ca.cert_path.display().to_string(),
    );
    let sender = Sender::start_with(
        &dir,
        &pg,
        "sender",
        &["--tls-cert", &c, "--tls-key", &k, "--tls-client-ca", &cca],
    )?;
    let port = sender.addr.rsplit_once(':').unwrap().1.to_owned();
    let addr = format!("localhost:{port}");

    // A name from the common name, and one from a subject alternative name, both stream.
    let mut ra = Receiver::new(&dir, &addr, "alice");
    ra.extra = tls_args(&ca.cert_path, Some(&alice));
    ra.spawn()?;
    ra.wait_streaming()?;
    let mut rb = Receiver::new(&dir, &addr, "bob");
    rb.extra = tls_args(&ca.cert_path, Some(&bob_by_san));
    rb.spawn()?;
    rb.wait_streaming()?;
    let target = pg.flush_lsn()?;
    ra.wait_flush(target)?;
    rb.wait_flush(target)?;
    ra.proc.term();
    pg.wait_slot_released("walship_alice")?;
    let alice_slot = pg.slot_restart_lsn("walship_alice")?;

    // Alice's certificate cannot act as carol, nor as bob, nor touch their slots.
    refused(
        &dir,
        &addr,
        "carol",
        tls_args(&ca.cert_path, Some(&alice)),
        "allows the names",
    )?;
    let mut as_bob = Receiver::new(&dir, &addr, "bob");
    as_bob.wal_dir = dir.join("wal-bob-impostor");
    as_bob.proc.log = dir.join("receiver-bob-impostor.log");
    as_bob.extra = tls_args(&ca.cert_path, Some(&alice));
    let (code, log) = as_bob.run_to_exit()?;
    assert_eq!(code, Some(9), "{}", tail(&log, 10));
    assert!(
        log.contains("not \\\"bob\\\"") || log.contains("not \"bob\""),
        "{}",
        tail(&log, 10)
    );
    // No certificate, or one from another CA: refused.
    refused(&dir, &addr, "nocert", tls_args(&ca.cert_path, None), "TLS")?;
    refused(
        &dir,
        &addr,
        "mallory",
        tls_args(&ca.cert_path, Some(&forged)),
        "TLS",
    )?;
    assert_eq!(
        pg.sql("SELECT string_agg(slot_name, ',' ORDER BY slot_name) FROM pg_replication_slots")?,
        "walship_alice,walship_bob",
        "a refused receiver created a slot"
    );
    assert_eq!(
        pg.slot_restart_lsn("walship_alice")?,
        alice_slot,
        "alice's slot moved"
    );

    // A bootstrap over mutual TLS gives a standby equal to the primary.
    let boot = bootstrap_cmd(
        &addr,
        "alice",
        &dir.join("standby"),
        &dir.join("wal-standby"),
        &[],
    );
    let mut boot = boot;
    boot.args(tls_args(&ca.cert_path, Some(&alice)));
    let mut p = Proc::spawn(boot, dir.join("bootstrap.log"))?;
    let st = p.wait_exit()?;
    assert!(
        st.success(),
        "bootstrap failed: {}",
        tail(&p.log_text(), 10)
    );
    let want = pgbench_fingerprint(&pg, &[])?;
    let standby = Pg::start_existing(&dir, &dir.join("standby"), "standby")?;
    assert_eq!(pgbench_fingerprint(&standby, &[])?, want);
    Ok(())
}

#[test]
fn sender_without_tls_refuses_a_public_address_unless_told() -> Result<()> {
    let dir = TestDir::new("listen");
    let ca = Ca::new(&dir, "ca")?;
    let (c, k) = ca.issue("server", "localhost", &["localhost"], false)?;
    let port = free_port();
    let out = Command::new(bin("wal-sender"))
        .args(["serve", "--pg-conn", "host=/nonexistent", "--listen"])
        .arg(format!("0.0.0.0:{port}"))
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("without TLS"), "{err}");
    // Unusable TLS files are named.
    let out = Command::new(bin("wal-sender"))
        .args(["serve", "--pg-conn", "host=/nonexistent", "--listen"])
        .arg(format!("0.0.0.0:{port}"))
        .arg("--tls-cert")
        .arg(&k)
        .arg("--tls-key")
        .arg(&k)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("server.key") && err.contains("certificate"),
        "{err}"
    );
    // With TLS, or with --insecure-listen (and a loud warning), it starts.
    for (name, extra) in [
        (
            "tls",
            vec![
                "--tls-cert".to_owned(),
                c.display().to_string(),
                "--tls-key".to_owned(),
                k.display().to_string(),
            ],
        ),
        ("insecure", vec!["--insecure-listen".to_owned()]),
    ] {
        let mut cmd = Command::new(bin("wal-sender"));
        cmd.args([
            "--log-format",
            "json",
            "serve",
            "--pg-conn",
            "host=/nonexistent",
            "--listen",
        ])
        .arg(format!("0.0.0.0:{port}"))
        .args(&extra);
        let mut p = Proc::spawn(cmd, dir.join(&format!("sender-{name}.log")))?;
        wait_for("the sender to listen", || {
            Ok(TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ()))
        })?;
        if name == "insecure" {
            assert!(p.log_text().contains("WITHOUT TLS"), "{}", p.log_text());
        }
        p.term();
    }
    Ok(())
}

#[test]
fn idle_connections_are_closed_and_the_connection_limit_holds() -> Result<()> {
    let dir = TestDir::new("limits");
    let pg = Pg::start_primary(&dir, "primary", "")?;
    let sender = Sender::start_with(
        &dir,
        &pg,
        "sender",
        &["--max-connections", "2", "--handshake-timeout", "1s"],
    )?;
    // The harness's probe for the listening port holds a place until its session ends.
    wait_for("the probe connection to end", || {
        Ok(sender
            .proc
            .log_text()
            .contains("receiver closed the connection")
            .then_some(()))
    })?;
    // Two silent connections take both places; a third is closed at once.
    let mut idle: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(&sender.addr))
        .collect::<Result<_, _>>()?;
    std::thread::sleep(Duration::from_millis(200));
    let mut third = TcpStream::connect(&sender.addr)?;
    third.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut buf = [0u8; 64];
    assert_eq!(
        third.read(&mut buf)?,
        0,
        "the connection over the limit was not closed"
    );
    // The silent ones are closed once the handshake timeout passes, and a receiver gets in.
    let t0 = Instant::now();
    for s in &mut idle {
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        // The sender says why (an error frame), then closes.
        let mut said = Vec::new();
        s.read_to_end(&mut said)?;
    }
    eprintln!("idle connections closed after {:?}", t0.elapsed());
    let mut r = Receiver::start(&dir, &sender.addr, "after")?;
    r.wait_streaming()?;
    r.wait_flush(pg.flush_lsn()?)?;
    assert!(sender.proc.log_text().contains("too many connections"));
    assert!(sender
        .proc
        .log_text()
        .contains("handshake not completed within 1s"));
    Ok(())
}
