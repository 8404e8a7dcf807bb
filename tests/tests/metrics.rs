//! Metrics, against real PostgreSQL 15 and a real Prometheus server (Debian's `prometheus`
//! package, which `scripts/test.sh` installs): Prometheus scrapes `wal-sender serve` and
//! `wal-receiver follow` (`--metrics-listen`) through a pgbench run and answers PromQL
//! queries of the receiver's lag and position and of the sender's per-receiver series;
//! `promtool check metrics` passes on each program's scrape, and `promtool check rules` and
//! `promtool test rules` on the shipped alert rules, which the Prometheus server loads and
//! evaluates: stopping the receiver makes its alerts pending.
//!
//! Without `prometheus` and `promtool` in `PATH` the tests fail, saying how to install them,
//! unless `WALSHIP_SKIP_PROMETHEUS=1`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use walship_tests::*;

/// The shipped alert rules, and their unit tests.
fn rules_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/prometheus/walship-alerts.yml")
}

fn rules_test_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/prometheus/walship-alerts.test.yml")
}

/// Where `name` is in `PATH`.
fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// `prometheus` and `promtool`, or `None` when `WALSHIP_SKIP_PROMETHEUS=1` says to skip.
fn prometheus_tools(test: &str) -> Result<Option<(PathBuf, PathBuf)>> {
    match (which("prometheus"), which("promtool")) {
        (Some(p), Some(t)) => Ok(Some((p, t))),
        _ if std::env::var("WALSHIP_SKIP_PROMETHEUS").is_ok_and(|v| v == "1") => {
            println!("{test}: SKIPPED: prometheus or promtool is not installed, and WALSHIP_SKIP_PROMETHEUS=1");
            Ok(None)
        }
        _ => bail!(
            "prometheus and promtool are needed in PATH: install Debian's package (apt-get install --no-install-recommends prometheus; scripts/test.sh does), or set WALSHIP_SKIP_PROMETHEUS=1 to skip this test"
        ),
    }
}

/// A plain HTTP/1.0 GET of `path` at `addr`: the status code and the body.
fn http_get(addr: &str, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connect to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8(raw).context("an HTTP answer that is not UTF-8")?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no HTTP head in {text:?}"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("no status in {head:?}"))?;
    Ok((code, body.to_owned()))
}

/// `s` percent-encoded for a URL's query.
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The value of sample `name{labels}` in a text exposition, if there is one.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// A Prometheus server of this test's own: its configuration, storage and log in the test
/// directory, listening on a free loopback port, scraping every second and evaluating the
/// shipped alert rules every second.
struct Prometheus {
    proc: Proc,
    addr: String,
}

impl Prometheus {
    fn start(dir: &TestDir, bin: &Path, jobs: &[(&str, &str)]) -> Result<Prometheus> {
        let home = dir.join("prometheus");
        std::fs::create_dir_all(&home)?;
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n",
        );
        config.push_str(&format!("rule_files:\n  - {}\n", rules_file().display()));
        config.push_str("scrape_configs:\n");
        for (job, target) in jobs {
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']\n"
            ));
        }
        let config_file = home.join("prometheus.yml");
        std::fs::write(&config_file, config)?;
        let addr = format!("127.0.0.1:{}", free_port());
        let mut c = Command::new(bin);
        c.arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                home.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn");
        let mut p = Prometheus {
            proc: Proc::spawn(c, dir.join("prometheus.log"))?,
            addr,
        };
        wait_for("Prometheus to be ready", || {
            if !p.proc.is_running() {
                bail!("prometheus exited:\n{}", tail(&p.proc.log_text(), 20));
            }
            Ok(matches!(http_get(&p.addr, "/-/ready"), Ok((200, _))).then_some(()))
        })?;
        Ok(p)
    }

    /// An instant query: each series' labels and value.
    fn query(&self, promql: &str) -> Result<Vec<(serde_json::Value, f64)>> {
        let (code, body) = http_get(
            &self.addr,
            &format!("/api/v1/query?query={}", url_encode(promql)),
        )?;
        let v: serde_json::Value =
            serde_json::from_str(&body).with_context(|| format!("HTTP {code}: {body}"))?;
        if v["status"] != "success" {
            bail!("query {promql:?} failed: {body}");
        }
        let result = v["data"]["result"]
            .as_array()
            .ok_or_else(|| anyhow!("no result in {body}"))?;
        result
            .iter()
            .map(|r| {
                let value = r["value"][1]
                    .as_str()
                    .and_then(|s| s.parse::<f64>().ok())
                    .ok_or_else(|| anyhow!("no value in {r}"))?;
                Ok((r["metric"].clone(), value))
            })
            .collect()
    }

    /// Waits until `promql` answers at least one series, and returns the first one's value.
    fn wait_value(&self, what: &str, promql: &str) -> Result<f64> {
        wait_for(what, || Ok(self.query(promql)?.first().map(|(_, v)| *v)))
    }
}

fn promtool(tool: &Path, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let mut c = Command::new(tool);
    c.args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().context("run promtool")?;
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .ok_or_else(|| anyhow!("no stdin"))?
            .write_all(input.as_bytes())?;
    }
    drop(child.stdin.take());
    let out = child.wait_with_output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("promtool {args:?} failed ({}):\n{text}", out.status);
    }
    Ok(text)
}

#[test]
fn prometheus_scrapes_the_sender_and_the_receiver_through_pgbench() -> Result<()> {
    let Some((prometheus, promtool_bin)) =
        prometheus_tools("prometheus_scrapes_the_sender_and_the_receiver_through_pgbench")?
    else {
        return Ok(());
    };
    let dir = TestDir::new("metrics");
    // A size cap, so that the slot reports a safe_wal_size.
    let pg = Pg::start_primary(&dir, "primary", "max_slot_wal_keep_size = 2GB\n")?;
    let sender_metrics = format!("127.0.0.1:{}", free_port());
    let sender = Sender::start_with(&dir, &pg, "sender", &["--metrics-listen", &sender_metrics])?;
    let receiver_metrics = format!("127.0.0.1:{}", free_port());
    let mut r = Receiver::new(&dir, &sender.addr, "metered");
    r.extra = vec!["--metrics-listen".into(), receiver_metrics.clone()];
    r.spawn()?;
    let first = r.wait_streaming()?;
    let prom = Prometheus::start(
        &dir,
        &prometheus,
        &[
            ("walship-sender", &sender_metrics),
            ("walship-receiver", &receiver_metrics),
        ],
    )?;

    pg.pgbench_init(10)?;
    let mut bench = pg.pgbench(4, 8)?;
    // While pgbench runs: the receiver's lag answers, and its position is scraped.
    let lag = prom.wait_value(
        "Prometheus to answer the receiver's lag",
        "walship_receiver_lag_bytes{job=\"walship-receiver\"}",
    )?;
    assert!(lag >= 0.0, "lag {lag}");
    let early = prom.wait_value(
        "the receiver's flush position in Prometheus",
        "walship_receiver_flush_lsn_bytes",
    )?;
    assert!(
        early >= first.0 as f64,
        "{early} below the first request {first}"
    );
    assert!(bench.wait()?.success(), "pgbench failed");
    let end = pg.flush_lsn()?;
    r.wait_flush(end)?;

    // The position grows to the primary's, in Prometheus, as exported by both programs.
    let end_f = end.0 as f64;
    let late = wait_for(
        "Prometheus to see the receiver at the primary's end",
        || {
            Ok(prom
                .query("walship_receiver_flush_lsn_bytes")?
                .first()
                .map(|(_, v)| *v)
                .filter(|v| *v >= end_f))
        },
    )?;
    assert!(
        late > early,
        "the flush position did not grow: {early} then {late}"
    );
    let stored = r.flush_lsn()?.0 as f64;
    assert!(
        late <= stored,
        "Prometheus saw {late}, past the store's {stored}"
    );
    let acked = wait_for("the sender's series of the receiver", || {
        Ok(prom
            .query("walship_sender_receiver_flush_lsn_bytes{receiver=\"metered\"}")?
            .first()
            .map(|(_, v)| *v)
            .filter(|v| *v >= end_f))
    })?;
    assert!(
        acked <= stored,
        "the sender saw {acked} acknowledged, past {stored}"
    );
    let connected = prom.query("walship_sender_receiver_connected{receiver=\"metered\"}")?;
    assert_eq!(connected.len(), 1, "{connected:?}");
    assert_eq!(connected[0].0["receiver"], "metered");
    assert_eq!(connected[0].1, 1.0);
    let lag = prom.wait_value(
        "the sender's lag of the receiver",
        "walship_sender_receiver_lag_bytes{receiver=\"metered\"}",
    )?;
    assert!(lag >= 0.0, "lag {lag}");
    // Bytes: everything from the first request on went out and came in; the wire carried
    // less than the raw WAL (pgbench WAL compresses).
    let produced = end.0.saturating_sub(first.0) as f64;
    let raw_in = prom.wait_value(
        "the receiver's raw bytes",
        "walship_receiver_received_raw_bytes_total",
    )?;
    let wire_in = prom.wait_value(
        "the receiver's wire bytes",
        "walship_receiver_received_wire_bytes_total",
    )?;
    assert!(
        raw_in >= produced,
        "received {raw_in} raw bytes of {produced}"
    );
    assert!(
        wire_in > 0.0 && wire_in < raw_in,
        "wire {wire_in}, raw {raw_in}"
    );
    let raw_out = prom.wait_value(
        "the sender's raw bytes",
        "walship_sender_receiver_sent_raw_bytes_total{receiver=\"metered\"}",
    )?;
    assert!(
        raw_out >= produced,
        "sent {raw_out} raw bytes of {produced}"
    );
    let age = prom.wait_value(
        "the age of the receiver's last message",
        "walship_receiver_last_message_age_seconds",
    )?;
    assert!(age < 30.0, "last message {age} s ago while streaming");
    // Once idle, the receiver's lag comes down to nothing.
    prom.wait_value(
        "the receiver's lag to reach 0",
        "walship_receiver_lag_bytes == 0",
    )?;
    // The slot as the primary reports it (polled every 15 s).
    let safe = prom.wait_value(
        "the slot's safe_wal_size",
        "walship_sender_slot_safe_wal_size_bytes{receiver=\"metered\",slot=\"walship_metered\"}",
    )?;
    // PostgreSQL counts it from the end of the current segment: the cap plus at most one.
    let cap = (2u64 << 30) + (16 << 20);
    assert!(safe > 0.0 && safe <= cap as f64, "safe_wal_size {safe}");
    prom.wait_value(
        "the slot's wal_status",
        "walship_sender_slot_wal_status{receiver=\"metered\",status=\"reserved\"} == 1",
    )?;
    let store = prom.wait_value("the store's size", "walship_receiver_store_bytes")?;
    assert!(store > 0.0, "store {store}");
    let free = prom.wait_value(
        "the store's free space",
        "walship_receiver_filesystem_free_bytes / walship_receiver_filesystem_size_bytes",
    )?;
    assert!(free > 0.0 && free <= 1.0, "free fraction {free}");
    // Nothing alerts while all is well (but the disk of the machine under test may be full).
    let firing = prom.query("ALERTS{alertname!=\"WalshipStoreFilesystemNearlyFull\"}")?;
    assert!(firing.is_empty(), "alerts while streaming: {firing:?}");

    // Each program's scrape passes promtool, and only /metrics answers.
    for addr in [&sender_metrics, &receiver_metrics] {
        let (code, text) = http_get(addr, "/metrics")?;
        assert_eq!(code, 200, "{text}");
        promtool(&promtool_bin, &["check", "metrics"], Some(&text))?;
        let (code, _) = http_get(addr, "/other")?;
        assert_eq!(code, 404);
    }
    let rules = rules_file();
    let checked = promtool(
        &promtool_bin,
        &["check", "rules", &rules.display().to_string()],
        None,
    )?;
    assert!(checked.contains("SUCCESS"), "{checked}");

    // The receiver stops: the sender keeps its series, not connected, with a lag that
    // grows with the primary; Prometheus sees the receiver down and its alerts pending.
    r.proc.term();
    pg.sql("CREATE TABLE after_stop AS SELECT generate_series(1, 100000) AS v")?;
    let moved = pg.flush_lsn()?;
    wait_for("the sender to show the receiver away and behind", || {
        let (_, text) = http_get(&sender_metrics, "/metrics")?;
        let away = sample(
            &text,
            "walship_sender_receiver_connected{receiver=\"metered\"}",
        );
        let lag = sample(
            &text,
            "walship_sender_receiver_lag_bytes{receiver=\"metered\"}",
        );
        Ok(
            (away == Some(0.0) && lag.is_some_and(|l| l >= moved.saturating_sub(end) as f64))
                .then_some(()),
        )
    })?;
    for alert in ["WalshipReceiverDown", "WalshipSenderReceiverAway"] {
        prom.wait_value(
            &format!("the {alert} alert"),
            &format!("ALERTS{{alertname=\"{alert}\"}}"),
        )?;
    }
    drop(prom);
    Ok(())
}

#[test]
fn the_shipped_alert_rules_fire_as_their_unit_tests_say() -> Result<()> {
    let Some((_, promtool_bin)) =
        prometheus_tools("the_shipped_alert_rules_fire_as_their_unit_tests_say")?
    else {
        return Ok(());
    };
    let out = promtool(
        &promtool_bin,
        &["test", "rules", &rules_test_file().display().to_string()],
        None,
    )?;
    assert!(out.contains("SUCCESS"), "{out}");
    Ok(())
}

#[test]
fn a_metrics_address_in_use_is_refused_at_start() -> Result<()> {
    let dir = TestDir::new("metrics-busy");
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = taken.local_addr()?.to_string();
    let mut r = Receiver::new(&dir, "127.0.0.1:1", "busy");
    r.extra = vec!["--metrics-listen".into(), addr.clone()];
    let (code, log) = r.run_to_exit()?;
    assert_eq!(code, Some(2), "{}", tail(&log, 5));
    assert!(
        log.contains(&format!("cannot listen for metrics on {addr}")),
        "{}",
        tail(&log, 5)
    );
    // The sender too, before it connects to PostgreSQL (there is none here).
    let out = Command::new(bin("wal-sender"))
        .args([
            "serve",
            "--pg-conn",
            "host=/nonexistent port=1",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            &addr,
        ])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("cannot listen for metrics on {addr}")),
        "{err}"
    );
    drop(taken);
    Ok(())
}
