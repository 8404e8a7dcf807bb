//! libpq connection settings, read the way libpq reads them.
//!
//! A keyword/value string (`host=/var/run/postgresql user=walship sslmode=verify-full`) is
//! parsed with libpq's quoting rules: a value may be `'single quoted'`, and a backslash
//! escapes the next character, quoted or not. What the string does not give comes from
//! libpq's environment variables (`PGHOST`, `PGPORT`, `PGUSER`, `PGPASSWORD`, `PGPASSFILE`,
//! `PGDATABASE`, `PGSSLMODE`, ...) and then from libpq's defaults.
//!
//! Passwords come, in this order, from the string's `password`, from a file that holds only
//! the password (`--pg-password-file`, [`Settings::use_password_file`]; read once, refused
//! when the group or others may access it), from `PGPASSWORD`, and from the password file
//! (`passfile`, `PGPASSFILE`, or `~/.pgpass`), which is read at each connection and ignored,
//! with a warning, when the group or others may access it.
//!
//! Invariant: a password never leaves [`Settings`] except towards the server. [`Settings`]
//! displays (and debug-prints) itself with the password replaced by `********`, and no
//! error of this module quotes the string it was given: errors name the keyword instead.

use std::fmt;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// libpq's default socket directory on Debian, whose PostgreSQL this was built for.
pub const DEFAULT_SOCKET_DIR: &str = "/var/run/postgresql";
pub const DEFAULT_PORT: u16 = 5432;
/// How long one connection attempt may take when the string gives no `connect_timeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// What a password is shown as.
pub const REDACTED: &str = "********";

/// libpq keywords walship acts on.
const KEYWORDS: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "user",
    "password",
    "passfile",
    "dbname",
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "application_name",
    "connect_timeout",
    "options",
];
/// libpq keywords that are accepted and have no effect on walship's connections (TCP
/// keepalives are the operating system's; walship names its own connections).
const IGNORED: &[&str] = &[
    "fallback_application_name",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "sslcompression",
    "sslsni",
];
/// libpq keywords accepted only with the values walship behaves as.
const LIMITED: &[(&str, &[&str])] = &[
    ("target_session_attrs", &["any"]),
    ("gssencmode", &["disable", "prefer"]),
    ("channel_binding", &["disable", "prefer"]),
];
/// libpq keywords walship does not support.
const UNSUPPORTED: &[&str] = &[
    "service",
    "requirepeer",
    "sslpassword",
    "sslcrl",
    "sslcrldir",
    "sslcertmode",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "sslnegotiation",
    "krbsrvname",
    "gsslib",
    "gssdelegation",
    "replication",
    "client_encoding",
    "load_balance_hosts",
    "require_auth",
];

/// A connection string that cannot be used. The message names the keyword, never a value
/// that could be a password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnInfoError {
    #[error("connection string: unknown keyword \"{0}\" (walship takes libpq's keywords: host, port, user, dbname, passfile, sslmode, sslrootcert, ...)")]
    UnknownKeyword(String),
    #[error("connection string: walship does not support the keyword \"{0}\"")]
    UnsupportedKeyword(String),
    #[error("connection string: a word without \"=\" at character {0} (a value with spaces must be quoted, as in password='a b')")]
    MissingEquals(usize),
    #[error("connection string: the quoted value of \"{0}\" has no closing quote")]
    Unterminated(String),
    #[error("connection string: invalid {keyword}: {why}")]
    BadValue { keyword: String, why: String },
    #[error("connection strings as URIs (postgresql://...) are not supported; give libpq's keyword=value form, e.g. \"host=/var/run/postgresql user=walship\"")]
    Uri,
    #[error("no user in the connection string or PGUSER, and the OS user has no name")]
    NoUser,
}

/// The keyword/value pairs of a connection string, in their order. Every keyword is one
/// libpq knows and walship accepts.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct ConnInfo {
    pairs: Vec<(String, String)>,
}

impl ConnInfo {
    /// Parses a libpq keyword/value string.
    pub fn parse(s: &str) -> Result<ConnInfo, ConnInfoError> {
        let t = s.trim_start();
        if t.starts_with("postgresql://") || t.starts_with("postgres://") {
            return Err(ConnInfoError::Uri);
        }
        let chars: Vec<char> = s.chars().collect();
        let mut i = 0;
        let mut pairs = Vec::new();
        while i < chars.len() {
            if chars[i].is_whitespace() {
                i += 1;
                continue;
            }
            let start = i;
            let mut keyword = String::new();
            while i < chars.len() && chars[i] != '=' && !chars[i].is_whitespace() {
                keyword.push(chars[i]);
                i += 1;
            }
            while i < chars.len() && chars[i].is_whitespace() {
                i += 1;
            }
            if i >= chars.len() || chars[i] != '=' {
                // The word could be a password typed without its keyword: not shown.
                return Err(ConnInfoError::MissingEquals(start + 1));
            }
            i += 1;
            while i < chars.len() && chars[i].is_whitespace() {
                i += 1;
            }
            let mut value = String::new();
            if i < chars.len() && chars[i] == '\'' {
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return Err(ConnInfoError::Unterminated(keyword)),
                        Some('\\') => {
                            if let Some(&c) = chars.get(i + 1) {
                                value.push(c);
                            }
                            i += 2;
                        }
                        Some('\'') => {
                            i += 1;
                            break;
                        }
                        Some(&c) => {
                            value.push(c);
                            i += 1;
                        }
                    }
                }
            } else {
                while i < chars.len() && !chars[i].is_whitespace() {
                    if chars[i] == '\\' {
                        if let Some(&c) = chars.get(i + 1) {
                            value.push(c);
                        }
                        i += 2;
                    } else {
                        value.push(chars[i]);
                        i += 1;
                    }
                }
            }
            check_keyword(&keyword, &value)?;
            pairs.push((keyword, value));
        }
        Ok(ConnInfo { pairs })
    }

    /// The value of `keyword` (the last one given, as libpq takes it); an empty value is
    /// no value.
    pub fn get(&self, keyword: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(k, _)| k == keyword)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }

    /// The string again, quoted as libpq reads it, with the password shown as `********`.
    pub fn redacted(&self) -> String {
        self.render(true)
    }

    fn render(&self, redact: bool) -> String {
        self.pairs
            .iter()
            .map(|(k, v)| {
                if redact && k == "password" {
                    format!("{k}={REDACTED}")
                } else {
                    format!("{k}={}", quote(v))
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Debug shows the redacted form: a `ConnInfo` in a log or a panic shows no password.
impl fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConnInfo({:?})", self.redacted())
    }
}

/// Quotes a value as libpq reads it back.
fn quote(v: &str) -> String {
    if !v.is_empty()
        && !v
            .chars()
            .any(|c| c.is_whitespace() || c == '\'' || c == '\\')
    {
        return v.to_owned();
    }
    let mut out = String::with_capacity(v.len() + 2);
    out.push('\'');
    for c in v.chars() {
        if c == '\'' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

fn check_keyword(keyword: &str, value: &str) -> Result<(), ConnInfoError> {
    if KEYWORDS.contains(&keyword) || IGNORED.contains(&keyword) {
        return Ok(());
    }
    if let Some((_, allowed)) = LIMITED.iter().find(|(k, _)| *k == keyword) {
        if value.is_empty() || allowed.contains(&value) {
            return Ok(());
        }
        return Err(ConnInfoError::BadValue {
            keyword: keyword.to_owned(),
            why: format!(
                "walship supports only {} (the value is not shown: it could be a password run into it)",
                allowed.join(" or ")
            ),
        });
    }
    if UNSUPPORTED.contains(&keyword) {
        return Err(ConnInfoError::UnsupportedKeyword(keyword.to_owned()));
    }
    Err(ConnInfoError::UnknownKeyword(keyword.to_owned()))
}

/// libpq's `sslmode`. `allow` is not supported: it tries without TLS first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS when the server offers it, without checking its certificate (unless a root
    /// certificate file is there: then it is checked, as libpq does).
    Prefer,
    /// TLS or nothing; the certificate is checked only when a root certificate file is
    /// there (then as `verify-ca`).
    Require,
    /// TLS, and the server's certificate must chain to `sslrootcert`.
    VerifyCa,
    /// As `verify-ca`, and the certificate must also name the host connected to.
    VerifyFull,
}

impl SslMode {
    fn parse(v: &str) -> Result<SslMode, ConnInfoError> {
        Ok(match v {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(ConnInfoError::BadValue {
                    keyword: "sslmode".into(),
                    why: format!(
                        "not one of disable, prefer, require, verify-ca, verify-full ({} characters given)",
                        other.chars().count()
                    ),
                })
            }
        })
    }

    /// A connection without TLS is refused.
    pub fn requires_tls(self) -> bool {
        matches!(
            self,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// Where a server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    /// A host name or IP address.
    Tcp(String),
    /// A Unix-socket directory.
    Unix(PathBuf),
}

/// One server to try: libpq tries the hosts of a string in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub host: Host,
    /// `hostaddr`: the address to connect to, when the host name is for TLS and the
    /// password file only.
    pub hostaddr: Option<IpAddr>,
    pub port: u16,
}

impl Target {
    /// The host as the password file names it: a Unix socket in the default directory is
    /// `localhost`, as libpq has it.
    fn pgpass_host(&self) -> String {
        match &self.host {
            Host::Tcp(h) => h.clone(),
            Host::Unix(p) if p == Path::new(DEFAULT_SOCKET_DIR) => "localhost".into(),
            Host::Unix(p) => p.display().to_string(),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.host, self.hostaddr) {
            (Host::Unix(dir), _) => write!(
                f,
                "{}",
                dir.join(format!(".s.PGSQL.{}", self.port)).display()
            ),
            (Host::Tcp(h), Some(a)) if h != &a.to_string() => {
                write!(f, "{h} ({a}) port {}", self.port)
            }
            (Host::Tcp(h), _) => write!(f, "{h} port {}", self.port),
        }
    }
}

/// A password, kept out of every log line and debug print.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(Vec<u8>);

impl Password {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

/// Everything needed to connect to a PostgreSQL server: the string's settings completed
/// from the environment and libpq's defaults.
#[derive(Clone)]
pub struct Settings {
    pub targets: Vec<Target>,
    pub user: String,
    /// `dbname` or `PGDATABASE`; each connection chooses its default.
    pub dbname: Option<String>,
    /// `password`, else a password file's (`use_password_file`), else `PGPASSWORD`.
    password: Option<Password>,
    /// Whether the string gave `password`.
    password_in_string: bool,
    /// `passfile` or `PGPASSFILE`, else `~/.pgpass`.
    pub passfile: Option<PathBuf>,
    pub sslmode: SslMode,
    /// `sslrootcert`/`PGSSLROOTCERT`, else `~/.postgresql/root.crt` if it exists.
    pub sslrootcert: Option<PathBuf>,
    /// Whether `sslrootcert` was given rather than found.
    pub sslrootcert_given: bool,
    /// The client certificate and key: `sslcert`/`sslkey` (or `PGSSLCERT`/`PGSSLKEY`),
    /// else `~/.postgresql/postgresql.crt` and `.key` if the certificate exists.
    pub sslcert: Option<PathBuf>,
    pub sslkey: Option<PathBuf>,
    pub application_name: Option<String>,
    pub connect_timeout: Duration,
    pub options: Option<String>,
    shown: String,
}

impl Settings {
    /// Parses `conninfo` and completes it from this process's environment.
    pub fn from_conninfo(conninfo: &str) -> Result<Settings, ConnInfoError> {
        Settings::with_env(conninfo, &|k| std::env::var(k).ok(), home_dir())
    }

    /// Parses `conninfo` and completes it from `env` (a lookup of environment variables)
    /// and the home directory `home`.
    pub fn with_env(
        conninfo: &str,
        env: &dyn Fn(&str) -> Option<String>,
        home: Option<PathBuf>,
    ) -> Result<Settings, ConnInfoError> {
        let ci = ConnInfo::parse(conninfo)?;
        let env = |k: &str| env(k).filter(|v| !v.is_empty());
        let get =
            |keyword: &str, var: &str| ci.get(keyword).map(str::to_owned).or_else(|| env(var));
        let bad = |keyword: &str, why: String| ConnInfoError::BadValue {
            keyword: keyword.into(),
            why,
        };

        let hosts: Vec<String> = get("host", "PGHOST")
            .map(|h| h.split(',').map(str::to_owned).collect())
            .unwrap_or_default();
        let addrs: Vec<Option<IpAddr>> = match get("hostaddr", "PGHOSTADDR") {
            None => Vec::new(),
            Some(a) => a
                .split(',')
                .map(|a| {
                    if a.is_empty() {
                        Ok(None)
                    } else {
                        a.parse::<IpAddr>().map(Some).map_err(|_| {
                            bad(
                                "hostaddr",
                                format!(
                                    "not an IP address ({} characters given)",
                                    a.chars().count()
                                ),
                            )
                        })
                    }
                })
                .collect::<Result<_, _>>()?,
        };
        if !hosts.is_empty() && !addrs.is_empty() && hosts.len() != addrs.len() {
            return Err(bad(
                "hostaddr",
                format!("{} addresses for {} hosts", addrs.len(), hosts.len()),
            ));
        }
        let n = hosts.len().max(addrs.len()).max(1);
        let ports: Vec<u16> = match get("port", "PGPORT") {
            None => vec![DEFAULT_PORT],
            Some(p) => p
                .split(',')
                .map(|p| {
                    if p.is_empty() {
                        return Ok(DEFAULT_PORT);
                    }
                    p.parse::<u16>().ok().filter(|&p| p > 0).ok_or_else(|| {
                        bad(
                            "port",
                            format!("not a port number ({} characters given)", p.chars().count()),
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
        };
        if ports.len() != 1 && ports.len() != n {
            return Err(bad("port", format!("{} ports for {n} hosts", ports.len())));
        }
        let mut targets = Vec::with_capacity(n);
        for i in 0..n {
            let addr = addrs.get(i).copied().flatten();
            let host = match hosts.get(i).map(String::as_str).unwrap_or("") {
                "" => match addr {
                    Some(a) => Host::Tcp(a.to_string()),
                    None => Host::Unix(PathBuf::from(DEFAULT_SOCKET_DIR)),
                },
                h if h.starts_with('/') => Host::Unix(PathBuf::from(h)),
                h => Host::Tcp(h.to_owned()),
            };
            targets.push(Target {
                host,
                hostaddr: addr,
                port: if ports.len() == 1 { ports[0] } else { ports[i] },
            });
        }

        let user = match get("user", "PGUSER") {
            Some(u) => u,
            None => os_user().ok_or(ConnInfoError::NoUser)?,
        };
        let sslmode = match get("sslmode", "PGSSLMODE") {
            Some(m) => SslMode::parse(&m)?,
            None => SslMode::Prefer,
        };
        let connect_timeout = match get("connect_timeout", "PGCONNECT_TIMEOUT") {
            None => DEFAULT_CONNECT_TIMEOUT,
            Some(t) => match t.trim().parse::<i64>() {
                // As libpq: zero or less is the default wait, less than 2 s is 2 s.
                Ok(s) if s <= 0 => DEFAULT_CONNECT_TIMEOUT,
                Ok(s) => Duration::from_secs(s.max(2) as u64),
                Err(_) => {
                    return Err(bad(
                        "connect_timeout",
                        format!(
                            "not a number of seconds ({} characters given)",
                            t.chars().count()
                        ),
                    ))
                }
            },
        };
        let home_file = |name: &str| home.as_ref().map(|h| h.join(".postgresql").join(name));
        let (sslrootcert, sslrootcert_given) = match get("sslrootcert", "PGSSLROOTCERT") {
            Some(p) => (Some(PathBuf::from(p)), true),
            None => (home_file("root.crt").filter(|p| p.exists()), false),
        };
        let sslcert = get("sslcert", "PGSSLCERT")
            .map(PathBuf::from)
            .or_else(|| home_file("postgresql.crt").filter(|p| p.exists()));
        let sslkey = get("sslkey", "PGSSLKEY")
            .map(PathBuf::from)
            .or_else(|| sslcert.as_ref().and_then(|_| home_file("postgresql.key")));
        Ok(Settings {
            targets,
            user,
            dbname: get("dbname", "PGDATABASE"),
            password: get("password", "PGPASSWORD").map(|p| Password(p.into_bytes())),
            password_in_string: ci.get("password").is_some(),
            passfile: get("passfile", "PGPASSFILE")
                .map(PathBuf::from)
                .or_else(|| home.as_ref().map(|h| h.join(".pgpass"))),
            sslmode,
            sslrootcert,
            sslrootcert_given,
            sslcert,
            sslkey,
            application_name: get("application_name", "PGAPPNAME"),
            connect_timeout,
            options: get("options", "PGOPTIONS"),
            shown: ci.redacted(),
        })
    }

    /// The password for a connection to `target` as `self.user` to `dbname`: the string's
    /// or `PGPASSWORD`, else the password file's matching line. `None` when there is none.
    /// Physical replication connections look up the database `replication`, as
    /// pg_basebackup does.
    pub fn password(&self, target: &Target, dbname: &str) -> Option<Password> {
        if let Some(p) = &self.password {
            return Some(p.clone());
        }
        let file = self.passfile.as_ref()?;
        let content = read_passfile(file)?;
        pgpass_lookup(
            &content,
            &target.pgpass_host(),
            &target.port.to_string(),
            dbname,
            &self.user,
        )
        .map(Password)
    }

    /// Uses the first line of the file at `path` as the password when the string gives none,
    /// before `PGPASSWORD` and the password file. The file is read now, and refused if the
    /// group or others may access it (as libpq refuses such a password file), if it is not a
    /// plain file, or if its first line is empty.
    pub fn use_password_file(&mut self, path: &Path) -> Result<(), PasswordFileError> {
        let password = read_password_file(path)?;
        if !self.password_in_string {
            self.password = Some(password);
        }
        Ok(())
    }

    /// Where a password could come from, for an error message.
    pub fn password_sources(&self) -> String {
        match &self.passfile {
            Some(f) => format!(
                "give it in the password file {} (a line host:port:database:user:password, mode 0600), in PGPASSWORD, or as password= in the connection string",
                f.display()
            ),
            None => "give it in a password file (passfile, PGPASSFILE), in PGPASSWORD, or as password= in the connection string".into(),
        }
    }
}

/// The string as given, with the password shown as `********`.
impl fmt::Display for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Settings({:?})", self.shown)
    }
}

/// The home directory: `HOME`, else the password database's entry for this user.
pub fn home_dir() -> Option<PathBuf> {
    match std::env::var_os("HOME") {
        Some(h) if !h.is_empty() => Some(PathBuf::from(h)),
        _ => nix::unistd::User::from_uid(nix::unistd::geteuid())
            .ok()
            .flatten()
            .map(|u| u.dir),
    }
}

fn os_user() -> Option<String> {
    nix::unistd::User::from_uid(nix::unistd::geteuid())
        .ok()
        .flatten()
        .map(|u| u.name)
}

/// A file given to hold a password that cannot be used. Never shows the file's content.
#[derive(Debug, thiserror::Error)]
pub enum PasswordFileError {
    #[error("cannot read the password file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the password file {} is not a plain file", path.display())]
    NotAFile { path: PathBuf },
    #[error("the password file {} may be accessed by its group or others (mode {mode:04o}); make it private to its owner: chmod 600 {}", path.display(), path.display())]
    Exposed { path: PathBuf, mode: u32 },
    #[error("the password file {} holds no password on its first line", path.display())]
    Empty { path: PathBuf },
}

/// The password in the first line of the file at `path` (without its line end), refusing a
/// file that the group or others may access.
pub fn read_password_file(path: &Path) -> Result<Password, PasswordFileError> {
    use std::io::Read;
    let read = |source| PasswordFileError::Read {
        path: path.to_owned(),
        source,
    };
    // Checked before opening: opening a FIFO would wait for a writer.
    if !std::fs::metadata(path).map_err(read)?.is_file() {
        return Err(PasswordFileError::NotAFile {
            path: path.to_owned(),
        });
    }
    let mut file = std::fs::File::open(path).map_err(read)?;
    let mode = file.metadata().map_err(read)?.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(PasswordFileError::Exposed {
            path: path.to_owned(),
            mode,
        });
    }
    let mut content = Vec::new();
    file.read_to_end(&mut content).map_err(read)?;
    let first = content.split(|&b| b == b'\n').next().unwrap_or_default();
    let first = first.strip_suffix(b"\r").unwrap_or(first);
    if first.is_empty() {
        return Err(PasswordFileError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(Password(first.to_vec()))
}

/// Reads the password file as libpq does: a missing file is no file; one that is not a
/// plain file, or that the group or others may access, is ignored with a warning.
fn read_passfile(path: &Path) -> Option<Vec<u8>> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() {
        tracing::warn!(
            "password file \"{}\" is not a plain file; it is ignored",
            path.display()
        );
        return None;
    }
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(
            "password file \"{}\" has group or world access; permissions should be u=rw (0600) or less. It is ignored",
            path.display()
        );
        return None;
    }
    std::fs::read(path).ok()
}

/// The password of the first line of a password file that matches: each line is
/// `host:port:database:user:password`, a field `*` matches anything, `\` escapes `:` and
/// `\`, and lines starting with `#` are comments.
pub fn pgpass_lookup(
    content: &[u8],
    host: &str,
    port: &str,
    dbname: &str,
    user: &str,
) -> Option<Vec<u8>> {
    if dbname.is_empty() || user.is_empty() {
        return None;
    }
    for line in content.split(|&b| b == b'\n') {
        let mut end = line.len();
        while end > 0 && (line[end - 1] == b'\r' || line[end - 1] == b'\n') {
            end -= 1;
        }
        let line = &line[..end];
        if line.is_empty() || line[0] == b'#' {
            continue;
        }
        let rest = [host, port, dbname, user]
            .iter()
            .try_fold(line, |rest, token| field_matches(rest, token.as_bytes()));
        if let Some(rest) = rest {
            let mut password = Vec::with_capacity(rest.len());
            let mut i = 0;
            while i < rest.len() && rest[i] != b':' {
                if rest[i] == b'\\' && i + 1 < rest.len() {
                    i += 1;
                }
                password.push(rest[i]);
                i += 1;
            }
            return Some(password);
        }
    }
    None
}

/// If the field at the start of `buf` matches `token`, what follows its `:`.
fn field_matches<'a>(buf: &'a [u8], token: &[u8]) -> Option<&'a [u8]> {
    if buf.starts_with(b"*:") {
        return Some(&buf[2..]);
    }
    let (mut i, mut t) = (0, 0);
    while i < buf.len() {
        let escaped = buf[i] == b'\\';
        if escaped {
            i += 1;
        }
        let c = *buf.get(i)?;
        if c == b':' && !escaped && t == token.len() {
            return Some(&buf[i + 1..]);
        }
        if t == token.len() || c != token[t] {
            return None;
        }
        i += 1;
        t += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn settings(s: &str, env: &[(&str, &str)]) -> Result<Settings, ConnInfoError> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut env = env;
        env.entry("PGUSER".into())
            .or_insert_with(|| "tester".into());
        Settings::with_env(
            s,
            &move |k| env.get(k).cloned(),
            Some(PathBuf::from("/nonexistent-home")),
        )
    }

    #[test]
    fn parses_quoting_as_libpq_does() {
        let ci = ConnInfo::parse(
            r"host=/tmp/x  port = 5433 password='it''s' user=a\ b dbname='x \'y\' \\z' options='-c a=b'",
        );
        // 'it''s' is two quoted values in a row: libpq reads 'it' and then a keyword "'s'".
        assert!(ci.is_err());
        let ci = ConnInfo::parse(
            r"host=/tmp/x  port = 5433 password='it\'s a secret' user=a\ b dbname='x \'y\' \\z' options='-c a=b'",
        )
        .unwrap();
        assert_eq!(ci.get("host"), Some("/tmp/x"));
        assert_eq!(ci.get("port"), Some("5433"));
        assert_eq!(ci.get("password"), Some("it's a secret"));
        assert_eq!(ci.get("user"), Some("a b"));
        assert_eq!(ci.get("dbname"), Some(r"x 'y' \z"));
        assert_eq!(ci.get("options"), Some("-c a=b"));
        assert_eq!(ConnInfo::parse("").unwrap(), ConnInfo::default());
        // The last value of a keyword wins; an empty value is none.
        let ci = ConnInfo::parse("port=1 port=2 user=''").unwrap();
        assert_eq!(ci.get("port"), Some("2"));
        assert_eq!(ci.get("user"), None);
    }

    #[test]
    fn round_trips_through_its_rendering() {
        for s in [
            "host=/var/run/postgresql port=5432 user=walship",
            r"user='a b' dbname='it\'s' options='-c x=\\y' host=''",
            "sslmode=verify-full sslrootcert=/etc/ssl/ca.pem host=db1,db2 port=5432,5433",
        ] {
            let ci = ConnInfo::parse(s).unwrap();
            assert_eq!(ConnInfo::parse(&ci.render(false)).unwrap(), ci, "{s}");
        }
    }

    #[test]
    fn errors_name_the_keyword_and_never_a_password() {
        let secret = "s3cr3t-Pa55";
        for (s, want) in [
            (format!("user=w pasword={secret}"), "\"pasword\""),
            (format!("user=w password={secret} junk"), "character"),
            (format!("password='{secret}"), "\"password\""),
            (format!("password={secret} sslmode=bogus"), "sslmode"),
            (format!("password={secret} service=x"), "\"service\""),
            (format!("postgresql://u:{secret}@h/db"), "URIs"),
            (
                format!("password={secret} gssencmode=require"),
                "gssencmode",
            ),
        ] {
            let e = settings(&s, &[]).unwrap_err().to_string();
            assert!(e.contains(want), "{s}: {e}");
            assert!(!e.contains("s3cr3t"), "{s}: {e}");
        }
    }

    #[test]
    fn display_and_debug_redact_the_password() {
        let s = settings("host=/tmp user=w password='a secret'", &[]).unwrap();
        assert_eq!(s.to_string(), "host=/tmp user=w password=********");
        assert!(!format!("{s:?}").contains("secret"));
        let p = s.password(&s.targets[0], "postgres").unwrap();
        assert_eq!(p.as_bytes(), b"a secret");
        assert_eq!(format!("{p:?}"), REDACTED);
        let ci = ConnInfo::parse("password=x1y2").unwrap();
        assert!(!format!("{ci:?}").contains("x1y2"));
    }

    #[test]
    fn defaults_come_from_the_environment_then_libpq() {
        let s = settings("", &[]).unwrap();
        assert_eq!(
            s.targets,
            vec![Target {
                host: Host::Unix(DEFAULT_SOCKET_DIR.into()),
                hostaddr: None,
                port: 5432
            }]
        );
        assert_eq!(s.user, "tester");
        assert_eq!(s.dbname, None);
        assert_eq!(s.sslmode, SslMode::Prefer);
        assert_eq!(s.passfile, Some(PathBuf::from("/nonexistent-home/.pgpass")));
        let env = [
            ("PGHOST", "db.example"),
            ("PGPORT", "6543"),
            ("PGUSER", "envuser"),
            ("PGDATABASE", "envdb"),
            ("PGSSLMODE", "require"),
            ("PGPASSFILE", "/etc/pass"),
            ("PGPASSWORD", "envpw"),
        ];
        let s = settings("", &env).unwrap();
        assert_eq!(s.targets[0].host, Host::Tcp("db.example".into()));
        assert_eq!(s.targets[0].port, 6543);
        assert_eq!(
            (s.user.as_str(), s.dbname.as_deref()),
            ("envuser", Some("envdb"))
        );
        assert_eq!(s.sslmode, SslMode::Require);
        assert_eq!(s.passfile, Some(PathBuf::from("/etc/pass")));
        assert_eq!(s.password(&s.targets[0], "x").unwrap().as_bytes(), b"envpw");
        // The string wins over the environment.
        let s = settings("host=/s port=7 user=u sslmode=disable password=strpw", &env).unwrap();
        assert_eq!(
            s.targets[0],
            Target {
                host: Host::Unix("/s".into()),
                hostaddr: None,
                port: 7
            }
        );
        assert_eq!(s.user, "u");
        assert_eq!(s.sslmode, SslMode::Disable);
        assert_eq!(s.password(&s.targets[0], "x").unwrap().as_bytes(), b"strpw");
    }

    #[test]
    fn several_hosts_and_addresses() {
        let s = settings(
            "host=a,/sock,,c hostaddr=,,10.0.0.3,10.0.0.4 port=1,2,3,4",
            &[],
        )
        .unwrap();
        assert_eq!(
            s.targets[0],
            Target {
                host: Host::Tcp("a".into()),
                hostaddr: None,
                port: 1
            }
        );
        assert_eq!(s.targets[1].host, Host::Unix("/sock".into()));
        assert_eq!(s.targets[2].host, Host::Tcp("10.0.0.3".into()));
        assert_eq!(s.targets[3].hostaddr, Some("10.0.0.4".parse().unwrap()));
        assert_eq!(s.targets[3].port, 4);
        assert!(settings("host=a,b port=1,2,3", &[]).is_err());
        assert!(settings("host=a,b hostaddr=1.2.3.4", &[]).is_err());
        assert!(settings("hostaddr=not-an-ip", &[]).is_err());
    }

    #[test]
    fn pgpass_lines_match_as_in_libpq() {
        let file = b"# a comment\n\
            db1:5432:postgres:walship:first\n\
            *:*:replication:walship:repl\\:pw\\\\x:ignored\n\
            localhost:5432:*:walship:local\r\n\
            /tmp/sock\\:dir:5432:*:*:escaped\n\
            *:*:*:*:fallback";
        let look = |h: &str, p: &str, d: &str, u: &str| {
            pgpass_lookup(file, h, p, d, u).map(|v| String::from_utf8(v).unwrap())
        };
        assert_eq!(
            look("db1", "5432", "postgres", "walship").as_deref(),
            Some("first")
        );
        assert_eq!(
            look("db2", "5432", "replication", "walship").as_deref(),
            Some(r"repl:pw\x")
        );
        assert_eq!(
            look("localhost", "5432", "postgres", "walship").as_deref(),
            Some("local")
        );
        assert_eq!(
            look("/tmp/sock:dir", "5432", "x", "y").as_deref(),
            Some("escaped")
        );
        assert_eq!(
            look("db1", "5433", "postgres", "walship").as_deref(),
            Some("fallback")
        );
        // A prefix of a field is not a match.
        assert_eq!(
            pgpass_lookup(
                b"db:5432:postgres:walship:x\n",
                "db1",
                "5432",
                "postgres",
                "walship"
            ),
            None
        );
        assert_eq!(
            pgpass_lookup(
                b"db1:5432:postgres:walship:x\n",
                "db",
                "5432",
                "postgres",
                "walship"
            ),
            None
        );
        assert_eq!(pgpass_lookup(b"*:*:*:*:x", "h", "1", "", "u"), None);
    }

    proptest::proptest! {
        /// Any string parses or is refused; never a panic, and an error never quotes it.
        #[test]
        fn parse_never_panics_nor_echoes(s in ".{0,80}") {
            if let Err(e) = ConnInfo::parse(&format!("password=Zq9{s}")) {
                proptest::prop_assert!(!e.to_string().contains("Zq9"));
            }
        }

        /// A password run into the value of another keyword (a missing space, say) is not
        /// shown by the error about that value.
        #[test]
        fn a_bad_value_is_never_shown(
            keyword in proptest::sample::select(vec![
                "port", "hostaddr", "sslmode", "connect_timeout", "gssencmode",
                "channel_binding", "target_session_attrs",
            ]),
            tail in "[a-z0-9=]{0,12}",
        ) {
            let text = format!("host=h {keyword}=1password=Qv7Zk{tail}");
            let shown = match settings(&text, &[]) {
                Ok(_) => String::new(),
                Err(e) => e.to_string(),
            };
            proptest::prop_assert!(!shown.contains("Qv7Zk"), "{shown}");
        }

        #[test]
        fn pgpass_lookup_never_panics(content in proptest::collection::vec(proptest::num::u8::ANY, 0..200),
                                      host in "[a-z:*\\\\]{0,6}") {
            let _ = pgpass_lookup(&content, &host, "5432", "db", "u");
        }
    }

    #[test]
    fn the_password_file_is_read_only_when_private() {
        let dir = std::env::temp_dir().join(format!("walship-pgpass-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pgpass");
        std::fs::write(&file, "*:*:*:w:from-file\n").unwrap();
        let s = settings(&format!("user=w passfile={}", file.display()), &[]).unwrap();
        // The default socket directory is "localhost" in the file; another is its path.
        assert_eq!(s.targets[0].pgpass_host(), "localhost");
        let other = settings("host=/tmp/s", &[]).unwrap();
        assert_eq!(other.targets[0].pgpass_host(), "/tmp/s");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(s.password(&s.targets[0], "postgres"), None);
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            s.password(&s.targets[0], "postgres").unwrap().as_bytes(),
            b"from-file"
        );
        // The string's password and PGPASSWORD come before the file.
        let s2 = settings(
            &format!("user=w passfile={}", file.display()),
            &[("PGPASSWORD", "env")],
        )
        .unwrap();
        assert_eq!(
            s2.password(&s2.targets[0], "postgres").unwrap().as_bytes(),
            b"env"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_password_file_comes_after_the_string_and_before_the_environment() {
        let dir = std::env::temp_dir().join(format!("walship-pwfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("password");
        std::fs::write(&file, "from-file\r\nsecond line\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let password = |conninfo: &str, env: &[(&str, &str)]| {
            let mut s = settings(conninfo, env).unwrap();
            s.use_password_file(&file).unwrap();
            s.password(&s.targets[0], "postgres")
                .unwrap()
                .as_bytes()
                .to_vec()
        };
        assert_eq!(password("user=w", &[]), b"from-file");
        assert_eq!(password("user=w", &[("PGPASSWORD", "env")]), b"from-file");
        assert_eq!(password("user=w password=inline", &[]), b"inline");
        // Refused when others may read it, when empty, when not a file: never showing it.
        let refused = |mode: u32, content: &str| {
            std::fs::write(&file, content).unwrap();
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = settings("user=w", &[])
                .unwrap()
                .use_password_file(&file)
                .unwrap_err()
                .to_string();
            assert!(!e.contains("Qv7Zk"), "{e}");
            e
        };
        let e = refused(0o640, "Qv7Zk\n");
        assert!(e.contains("mode 0640") && e.contains("chmod 600"), "{e}");
        assert!(refused(0o604, "Qv7Zk\n").contains("mode 0604"));
        assert!(refused(0o600, "\nQv7Zk\n").contains("holds no password"));
        let e = settings("user=w", &[])
            .unwrap()
            .use_password_file(&dir)
            .unwrap_err();
        assert!(e.to_string().contains("is not a plain file"), "{e}");
        let e = settings("user=w", &[])
            .unwrap()
            .use_password_file(&dir.join("missing"))
            .unwrap_err();
        assert!(
            e.to_string().starts_with("cannot read the password file"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
