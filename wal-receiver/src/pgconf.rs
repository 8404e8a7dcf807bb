//! Where a server made by `bootstrap` or `restore` listens, written into its
//! `postgresql.auto.conf`, and the program its `restore_command` runs.
//!
//! The new data directory is a copy of the primary's, configuration files included, so it
//! would listen where the primary does: on the primary's host, on the very port and socket
//! the primary holds. Settings given here are appended to `postgresql.auto.conf` after the
//! recovery settings. PostgreSQL reads that file after `postgresql.conf`, and the last line
//! for a setting wins, so a plain `pg_ctl start` (or a service manager) starts the server
//! where the operator asked. A setting not given is not written: the primary's stays.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// `sizeof(sun_path)` on Linux, terminating NUL included: PostgreSQL refuses to start when
/// a socket directory leaves no room for `.s.PGSQL.<port>` in it.
const SUN_PATH_LEN: usize = 108;

/// Where the new server listens; `None` keeps what the primary's configuration says.
#[derive(Debug, Clone, Default)]
pub struct ServerSettings {
    /// `port`.
    pub port: Option<u16>,
    /// `unix_socket_directories`: one absolute directory.
    pub socket_dir: Option<PathBuf>,
    /// `listen_addresses`, as PostgreSQL takes it (`''` for Unix sockets only).
    pub listen_addresses: Option<String>,
}

impl ServerSettings {
    /// Refuses values PostgreSQL would reject at start-up, or that would not survive being
    /// written as one line of `postgresql.auto.conf`. The message names the flag.
    pub fn check(&self) -> Result<(), String> {
        if self.port == Some(0) {
            return Err("--port must be from 1 to 65535".into());
        }
        if let Some(dir) = &self.socket_dir {
            let text = dir
                .to_str()
                .ok_or_else(|| format!("--socket-dir {}: not valid UTF-8", dir.display()))?;
            if !dir.is_absolute() {
                return Err(format!("--socket-dir {text:?} must be an absolute path"));
            }
            // A list separator or a quote would make it another list of directories.
            if text.contains([',', '"']) || text.chars().any(char::is_control) {
                return Err(format!(
                    "--socket-dir {text:?}: a comma, a double quote or a control character cannot be written into unix_socket_directories"
                ));
            }
            let socket = format!("{text}/.s.PGSQL.{}", self.port.unwrap_or(65535));
            if socket.len() >= SUN_PATH_LEN {
                return Err(format!(
                    "--socket-dir {text:?} is too long: the socket path {socket} must stay under {SUN_PATH_LEN} bytes. Give a shorter directory"
                ));
            }
        }
        if let Some(a) = &self.listen_addresses {
            if a.chars().any(char::is_control) {
                return Err("--listen-addresses must not contain control characters".into());
            }
        }
        Ok(())
    }

    /// The `postgresql.auto.conf` lines for what was given, with a comment; empty when
    /// nothing was.
    pub fn conf_lines(&self) -> String {
        let mut out = String::new();
        if let Some(p) = self.port {
            out.push_str(&format!("port = {p}\n"));
        }
        if let Some(d) = &self.socket_dir {
            out.push_str(&format!(
                "unix_socket_directories = '{}'\n",
                quote(&d.display().to_string())
            ));
        }
        if let Some(a) = &self.listen_addresses {
            out.push_str(&format!("listen_addresses = '{}'\n", quote(a)));
        }
        if out.is_empty() {
            return out;
        }
        format!("# Where this server listens (wal-receiver --port, --socket-dir, --listen-addresses).\n{out}")
    }

    /// What is left to the primary's configuration, for a log line; `None` when nothing is.
    pub fn inherited(&self) -> Option<String> {
        let left: Vec<&str> = [
            (self.port.is_none(), "port"),
            (self.socket_dir.is_none(), "unix_socket_directories"),
            (self.listen_addresses.is_none(), "listen_addresses"),
        ]
        .into_iter()
        .filter_map(|(inherited, name)| inherited.then_some(name))
        .collect();
        (!left.is_empty()).then(|| left.join(", "))
    }
}

/// A value for a single-quoted `postgresql.conf` string: quotes doubled, and backslashes,
/// which the configuration parser reads as escapes, doubled as well.
pub fn quote(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\'', "''")
}

/// Appends `text` to `pgdata/postgresql.auto.conf` (created if missing), on a line of its
/// own, and writes the file atomically.
pub(crate) fn append_auto_conf(pgdata: &Path, text: &str) -> Result<()> {
    let auto = pgdata.join("postgresql.auto.conf");
    let mut conf = match std::fs::read_to_string(&auto) {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("read {}", auto.display())),
    };
    if !conf.is_empty() && !conf.ends_with('\n') {
        conf.push('\n');
    }
    conf.push_str(text);
    walship_common::durable::write_atomic(&auto, conf.as_bytes())
        .with_context(|| format!("write {}", auto.display()))
}

/// The path of this program, for the `restore_command` that `bootstrap` and `restore`
/// write: where it was run from (an installed copy names itself). Linux names a program
/// replaced on disk since it started `<path> (deleted)`; the path it was started from,
/// which now holds the new copy, is what the server should run.
pub fn own_program() -> std::io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    if !exe.exists() {
        if let Some(orig) = exe.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
            if Path::new(orig).exists() {
                return Ok(PathBuf::from(orig));
            }
        }
    }
    Ok(exe)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_for_what_is_given_only() {
        assert_eq!(ServerSettings::default().conf_lines(), "");
        assert_eq!(
            ServerSettings::default().inherited().as_deref(),
            Some("port, unix_socket_directories, listen_addresses")
        );
        let s = ServerSettings {
            port: Some(5433),
            socket_dir: Some("/run/it's".into()),
            listen_addresses: Some(String::new()),
        };
        s.check().unwrap();
        let lines = s.conf_lines();
        assert!(lines.starts_with('#'));
        assert!(lines.contains("\nport = 5433\n"));
        assert!(lines.contains("\nunix_socket_directories = '/run/it''s'\n"));
        assert!(lines.ends_with("\nlisten_addresses = ''\n"));
        assert_eq!(s.inherited(), None);
        assert_eq!(quote(r"a\b'c"), r"a\\b''c");
    }

    #[test]
    fn refuses_what_postgres_would_not_take() {
        let bad = |port, dir: &str, listen: Option<&str>| {
            ServerSettings {
                port,
                socket_dir: Some(dir.into()),
                listen_addresses: listen.map(Into::into),
            }
            .check()
            .unwrap_err()
        };
        assert!(bad(Some(0), "/tmp", None).contains("--port"));
        assert!(bad(None, "relative", None).contains("absolute"));
        assert!(bad(None, "/a,b", None).contains("comma"));
        assert!(bad(None, "/a\nb", None).contains("control"));
        assert!(bad(Some(5432), &format!("/{}", "d".repeat(100)), None).contains("too long"));
        assert!(bad(None, "/tmp", Some("*\nport = 1")).contains("control"));
        // 107 bytes with the socket name: the longest PostgreSQL takes.
        let longest = format!("/{}", "d".repeat(107 - 1 - "/.s.PGSQL.5432".len()));
        ServerSettings {
            port: Some(5432),
            socket_dir: Some(longest.into()),
            listen_addresses: None,
        }
        .check()
        .unwrap();
    }
}
