//! The report of `wal-sender check` and `wal-receiver check`, and the checks both make of
//! TLS files.
//!
//! A [`Report`] is a list of checks, each `ok`, `warn`, `fail` or `skip` (not run, because
//! an earlier check it depends on failed), with what was found and, for a warning or a
//! failure, the fix. It is rendered three ways ([`Format`]):
//!
//! - text, one line per check (`OK   name: detail`, `FAIL name: what is wrong — fix: ...`)
//!   and a summary line; the exit code is 0 unless a check failed, then
//!   [`EXIT_CHECK_FAILED`]. Warnings and skipped checks do not fail.
//! - JSON: an array of `{name, status, detail, fix}`, same exit codes.
//! - Nagios: one line (`WALSHIP OK - 9 checks passed`, `WALSHIP CRITICAL - 2 of 9 failed:
//!   ...`) with the plugin exit codes: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (the checks
//!   could not run at all).

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::tls;

/// The exit code of `check` when at least one check failed (text and JSON output).
pub const EXIT_CHECK_FAILED: u8 = 14;
/// A certificate that expires within this long is a warning.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// Nagios plugin exit codes.
pub mod nagios {
    pub const OK: u8 = 0;
    pub const WARNING: u8 = 1;
    pub const CRITICAL: u8 = 2;
    pub const UNKNOWN: u8 = 3;
}

/// The outcome of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// Works, but deserves attention; does not fail the check.
    Warn,
    Fail,
    /// Not run: what it needs failed already.
    Skip,
}

impl Status {
    /// The label of the text form, padded to one width.
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "OK  ",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
            Status::Skip => "SKIP",
        }
    }
}

/// One check's outcome.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// What to do, for a warning or a failure.
    pub fix: Option<String>,
}

/// The checks of one run, in the order they ran.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(transparent)]
pub struct Report {
    pub checks: Vec<Check>,
}

/// How a report is printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
    Nagios,
}

impl Report {
    fn push(&mut self, name: &str, status: Status, detail: String, fix: Option<String>) {
        self.checks.push(Check {
            name: name.to_owned(),
            status,
            detail,
            fix,
        });
    }

    pub fn ok(&mut self, name: &str, detail: impl Into<String>) {
        self.push(name, Status::Ok, detail.into(), None);
    }

    pub fn warn(&mut self, name: &str, detail: impl Into<String>, fix: impl Into<String>) {
        self.push(name, Status::Warn, detail.into(), Some(fix.into()));
    }

    pub fn fail(&mut self, name: &str, detail: impl Into<String>, fix: impl Into<String>) {
        self.push(name, Status::Fail, detail.into(), Some(fix.into()));
    }

    pub fn skip(&mut self, name: &str, why: impl Into<String>) {
        self.push(name, Status::Skip, why.into(), None);
    }

    fn count(&self, status: Status) -> usize {
        self.checks.iter().filter(|c| c.status == status).count()
    }

    /// How many checks failed.
    pub fn failed(&self) -> usize {
        self.count(Status::Fail)
    }

    /// The report as `format` prints it, and the exit code that goes with it.
    pub fn render(&self, format: Format) -> (String, u8) {
        match format {
            Format::Text => (self.text(), self.exit_code()),
            Format::Json => (
                serde_json::to_string_pretty(self).unwrap_or_else(|_| "[]".into()),
                self.exit_code(),
            ),
            Format::Nagios => self.nagios(),
        }
    }

    /// 0, or [`EXIT_CHECK_FAILED`] when a check failed.
    pub fn exit_code(&self) -> u8 {
        if self.failed() > 0 {
            EXIT_CHECK_FAILED
        } else {
            0
        }
    }

    fn text(&self) -> String {
        let mut out = String::new();
        for c in &self.checks {
            out.push_str(&format!("{} {}: {}", c.status.label(), c.name, c.detail));
            if let Some(fix) = &c.fix {
                out.push_str(&format!(" — fix: {fix}"));
            }
            out.push('\n');
        }
        let (failed, warned, skipped) = (
            self.failed(),
            self.count(Status::Warn),
            self.count(Status::Skip),
        );
        out.push_str(&format!(
            "{} checks: {} OK, {warned} warning(s), {failed} failed, {skipped} skipped. ",
            self.checks.len(),
            self.count(Status::Ok),
        ));
        out.push_str(if failed > 0 {
            "FAILED: fix what is marked FAIL and run check again"
        } else {
            "Passed (warnings do not fail the check)"
        });
        out
    }

    fn nagios(&self) -> (String, u8) {
        let total = self.checks.len();
        let one_line = |c: &Check| {
            // '|' starts Nagios performance data; a plugin's output is one line.
            format!("{}: {}", c.name, c.detail)
                .replace('|', "/")
                .replace('\n', " ")
        };
        let listed = |status: Status| {
            self.checks
                .iter()
                .filter(|c| c.status == status)
                .map(one_line)
                .collect::<Vec<_>>()
                .join("; ")
        };
        let failed = self.failed();
        if failed > 0 {
            return (
                format!(
                    "WALSHIP CRITICAL - {failed} of {total} failed: {}",
                    listed(Status::Fail)
                ),
                nagios::CRITICAL,
            );
        }
        let warned = self.count(Status::Warn);
        if warned > 0 {
            return (
                format!(
                    "WALSHIP WARNING - {total} checks passed, {warned} with a warning: {}",
                    listed(Status::Warn)
                ),
                nagios::WARNING,
            );
        }
        (format!("WALSHIP OK - {total} checks passed"), nagios::OK)
    }
}

/// What `check` prints, and its exit code, when the checks could not run at all (the error
/// is not about the set-up but about this run): for Nagios, UNKNOWN.
pub fn could_not_run(format: Format, error: &str) -> Option<(String, u8)> {
    (format == Format::Nagios).then(|| {
        (
            format!("WALSHIP UNKNOWN - {}", error.replace('|', "/")),
            nagios::UNKNOWN,
        )
    })
}

/// An RFC 3339 time in UTC, to the second.
fn utc(unix_seconds: i64) -> String {
    jiff::Timestamp::from_second(unix_seconds)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|_| unix_seconds.to_string())
}

/// Checks the validity dates of every certificate in the PEM file `path` (a certificate
/// chain, or CA certificates), as of `now`, under the check name `name`: one that has
/// expired or is not valid yet fails, one that expires within [`EXPIRY_WARNING`] warns.
/// A file that cannot be read or parsed fails.
pub fn certificate_dates(report: &mut Report, name: &str, path: &Path, now: SystemTime) {
    let certs = match tls::load_certs("certificate", path) {
        Ok(c) => c,
        Err(e) => {
            report.fail(
                name,
                e.to_string(),
                "give a readable PEM file that holds the certificate(s)",
            );
            return;
        }
    };
    let now = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let shown = path.display();
    let mut soonest: Option<(i64, String)> = None;
    for der in &certs {
        use x509_parser::prelude::*;
        let cert = match X509Certificate::from_der(der.as_ref()) {
            Ok((_, c)) => c,
            Err(e) => {
                report.fail(
                    name,
                    format!("{shown} holds a certificate that cannot be parsed: {e}"),
                    "replace it with a valid X.509 certificate",
                );
                return;
            }
        };
        let subject = cert.subject().to_string();
        let (from, until) = (
            cert.validity().not_before.timestamp(),
            cert.validity().not_after.timestamp(),
        );
        if until < now {
            report.fail(
                name,
                format!(
                    "{shown}: certificate {subject:?} expired on {}",
                    utc(until)
                ),
                "issue a new certificate and put it in place of this one (the peer refuses an expired certificate)",
            );
            return;
        }
        if from > now {
            report.fail(
                name,
                format!(
                    "{shown}: certificate {subject:?} is not valid before {}",
                    utc(from)
                ),
                "check this host's clock, or issue a certificate valid from now",
            );
            return;
        }
        if soonest.as_ref().is_none_or(|(t, _)| until < *t) {
            soonest = Some((until, subject));
        }
    }
    let Some((until, subject)) = soonest else {
        return;
    };
    let left = Duration::from_secs((until - now).max(0) as u64);
    let days = left.as_secs() / 86_400;
    let detail = format!(
        "{shown}: {} certificate(s), valid until {} ({days} days; the soonest to expire is {subject:?})",
        certs.len(),
        utc(until)
    );
    if left < EXPIRY_WARNING {
        report.warn(
            name,
            detail,
            "renew the certificate before it expires; an expired certificate is refused",
        );
    } else {
        report.ok(name, detail);
    }
}

/// Checks that the private key file `path` is private to its owner: one that its group or
/// others may read (or write) warns, since whoever reads it can act as this program.
pub fn key_permissions(report: &mut Report, name: &str, path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let shown = path.display();
    match std::fs::metadata(path) {
        Ok(m) if m.permissions().mode() & 0o077 != 0 => report.warn(
            name,
            format!(
                "{shown} is open to other users (mode {:04o}): whoever reads it can act as this program",
                m.permissions().mode() & 0o777
            ),
            format!("chmod 600 {shown}"),
        ),
        Ok(m) => report.ok(
            name,
            format!("{shown}: mode {:04o}", m.permissions().mode() & 0o777),
        ),
        Err(e) => report.fail(
            name,
            format!("cannot read {shown}: {e}"),
            "give a key file readable by the user running this program",
        ),
    }
}

/// Checks the address of `--metrics-listen`: free, or already serving walship's metrics (a
/// running program, which is fine); anything else there fails.
pub async fn metrics_address(report: &mut Report, addr: &str) {
    const NAME: &str = "metrics-listen";
    let err = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => {
            let at = l.local_addr().map_or(addr.to_owned(), |a| a.to_string());
            report.ok(NAME, format!("{at} is free"));
            return;
        }
        Err(e) => e,
    };
    if err.kind() != std::io::ErrorKind::AddrInUse {
        report.fail(
            NAME,
            format!("cannot listen on {addr}: {err}"),
            "give --metrics-listen an address of this host (HOST:PORT) and a port this user may bind",
        );
        return;
    }
    let probe = async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await?;
        let mut body = Vec::new();
        s.take(1 << 20).read_to_end(&mut body).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&body).contains("walship_"))
    };
    match tokio::time::timeout(Duration::from_secs(5), probe).await {
        Ok(Ok(true)) => report.ok(
            NAME,
            format!(
                "{addr} is in use by a running walship program, which serves its metrics there"
            ),
        ),
        _ => report.fail(
            NAME,
            format!("{addr} is in use by a program that does not serve walship's metrics"),
            "choose another --metrics-listen port, or stop the program that holds it",
        ),
    }
}

/// The names a certificate carries: its subject common names and DNS subject alternative
/// names. A certificate that cannot be parsed carries none.
pub fn certificate_names(der: &[u8]) -> Vec<String> {
    use x509_parser::prelude::*;
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for gn in &san.value.general_names {
            if let GeneralName::DNSName(d) = gn {
                names.push((*d).to_owned());
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Report {
        let mut r = Report::default();
        r.ok("a", "fine");
        r.warn("b", "so-so | meh", "do x");
        r
    }

    #[test]
    fn warnings_pass_and_failures_fail() {
        let mut r = sample();
        let (text, code) = r.render(Format::Text);
        assert_eq!(code, 0);
        assert!(
            text.starts_with("OK   a: fine\nWARN b: so-so | meh — fix: do x\n"),
            "{text}"
        );
        assert!(text.contains("warnings do not fail"), "{text}");
        let (line, code) = r.render(Format::Nagios);
        assert_eq!(code, nagios::WARNING);
        assert_eq!(
            line,
            "WALSHIP WARNING - 2 checks passed, 1 with a warning: b: so-so / meh"
        );
        r.fail("c", "broken", "mend it");
        r.skip("d", "needs c");
        let (text, code) = r.render(Format::Text);
        assert_eq!(code, EXIT_CHECK_FAILED);
        assert!(
            text.contains("FAIL c: broken — fix: mend it\nSKIP d: needs c\n"),
            "{text}"
        );
        let (line, code) = r.render(Format::Nagios);
        assert_eq!(code, nagios::CRITICAL);
        assert_eq!(line, "WALSHIP CRITICAL - 1 of 4 failed: c: broken");
        let (json, code) = r.render(Format::Json);
        assert_eq!(code, EXIT_CHECK_FAILED);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v[2]["status"], "fail");
        assert_eq!(v[2]["fix"], "mend it");
        assert_eq!(v[0]["fix"], serde_json::Value::Null);
        let mut ok = Report::default();
        ok.ok("a", "fine");
        assert_eq!(
            ok.render(Format::Nagios),
            ("WALSHIP OK - 1 checks passed".to_owned(), nagios::OK)
        );
        assert_eq!(
            could_not_run(Format::Nagios, "no runtime").unwrap().1,
            nagios::UNKNOWN
        );
        assert!(could_not_run(Format::Text, "x").is_none());
    }

    #[test]
    fn unreadable_certificate_files_fail() {
        let mut r = Report::default();
        let dir = std::env::temp_dir().join(format!("walship-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        certificate_dates(&mut r, "tls", &junk, SystemTime::now());
        certificate_dates(&mut r, "tls", &dir.join("missing.pem"), SystemTime::now());
        assert_eq!(r.failed(), 2, "{r:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
