//! Configuration files and `WALSHIP_*` environment variables for both programs.
//!
//! Every long flag of every command can also come from a TOML file named by `--config FILE`
//! (or by `WALSHIP_CONFIG`), and from the environment variable `WALSHIP_` + the flag's long
//! name upper-cased with `-` as `_` (`--pg-conn`: `WALSHIP_PG_CONN`). For each flag the
//! command line wins over the environment, which wins over the file. The file's keys are the
//! long names at the top level, words joined by `_` (or `-`): `pg_conn = "host=..."`,
//! `keep_wal = "64MB"`, `insecure_listen = true`, `sender = ["a:7000", "b:7000"]`.
//!
//! How: before clap parses, [`layer`] finds the subcommand that runs, from clap's own
//! [`Command`] (so flags added to a command later are configurable with no change here), and
//! turns the file's keys and the environment's values for that subcommand into
//! `--flag=value` arguments placed right after the subcommand's name, leaving out every flag
//! that a higher layer gives. clap then parses the whole, so a value from a file or the
//! environment is checked exactly as one typed.
//!
//! Invariants:
//! - a key that is no long flag of any command of the program is an error naming the file
//!   and line; a key of another subcommand is ignored, so that one file serves `follow`,
//!   `status` and `check` of one instance;
//! - `WALSHIP_*` variables that name no flag are ignored (scripts and the test harness use
//!   some of their own);
//! - positional arguments, `--help`, `--version` and `--config` itself are not configurable;
//! - no error of this module shows a value: a value may be a secret (a connection string).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use clap::error::{ContextKind, ContextValue};
use clap::{Arg, ArgAction, Command, CommandFactory, FromArgMatches};

/// What every variable of this module starts with.
pub const ENV_PREFIX: &str = "WALSHIP_";
/// The variable that names the configuration file when `--config` is not given.
pub const CONFIG_ENV: &str = "WALSHIP_CONFIG";
/// The id and long name of the `--config` flag.
const CONFIG_ID: &str = "config";
/// The value name of flags that take a libpq connection string (which may hold a password).
const CONNINFO_VALUE_NAME: &str = "CONNINFO";
/// The exit code of a configuration error, as of any usage error.
pub const EXIT_USAGE: u8 = 2;

/// A configuration file or variable that cannot be used. Never shows a value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A problem at a line of the file: bad TOML, an unknown key, a value of the wrong type.
    #[error("{}:{line}: {message}", path.display())]
    File {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{var}: {message}")]
    Env { var: String, message: String },
}

/// The arguments for clap, with what the file and the environment add.
#[derive(Debug, Default)]
pub struct Layered {
    /// The program's arguments (its name first) as clap is to parse them.
    pub args: Vec<OsString>,
    /// Where each flag that the command line did not give came from ("FILE:LINE" or the
    /// variable's name), by long name: for the note under a clap error.
    pub origins: BTreeMap<String, String>,
    /// Warnings to show (a password in a file that others can read).
    pub warnings: Vec<String>,
}

/// The `--config` flag, added to every command of a program.
fn config_arg() -> Arg {
    Arg::new(CONFIG_ID)
        .long(CONFIG_ID)
        .value_name("FILE")
        .global(true)
        .value_parser(clap::value_parser!(PathBuf))
        .help(
            "Read flags from this TOML file (default: the file named by WALSHIP_CONFIG). Its keys \
             are the long flags' names with _ between words, at the top level (pg_conn = \
             \"host=...\", keep_wal = \"64MB\", insecure_listen = true, sender = [\"a:7000\"]); \
             a key of another subcommand is ignored, an unknown key is an error. Any flag can \
             also come from WALSHIP_<FLAG> (WALSHIP_PG_CONN, WALSHIP_KEEP_WAL; 1/true/yes/on \
             or 0/false/no/off for a switch). The command line wins over the environment, \
             which wins over the file",
        )
}

/// The program's clap command with `--config` added: what [`parse`] parses with. Use it in
/// the `verify_cli` test.
pub fn command<C: CommandFactory>() -> Command {
    C::command().arg(config_arg())
}

/// Parses the process's arguments as `C`, with the configuration file and the environment
/// layered under them. Exits as clap does on a usage error or `--help`, and with
/// [`EXIT_USAGE`] on a configuration error (printed as `PROGRAM: FILE:LINE: ...`).
pub fn parse<C: CommandFactory + FromArgMatches>() -> C {
    let mut cmd = command::<C>();
    let program = cmd.get_name().to_owned();
    let argv: Vec<OsString> = std::env::args_os().collect();
    let layered = match layer(&mut cmd, &argv, &|k| std::env::var_os(k)) {
        Ok(l) => l,
        Err(e) => {
            crate::report!("{program}: {e}");
            std::process::exit(EXIT_USAGE.into());
        }
    };
    for w in &layered.warnings {
        crate::report!("{program}: warning: {w}");
    }
    let mut matches = match cmd.try_get_matches_from_mut(&layered.args) {
        Ok(m) => m,
        Err(e) => {
            let _ = e.print();
            if let Some(origin) = error_origin(&e, &layered.origins) {
                crate::report!("{origin}");
            }
            std::process::exit(e.exit_code());
        }
    };
    match C::from_arg_matches_mut(&mut matches) {
        Ok(c) => c,
        Err(e) => e.format(&mut cmd).exit(),
    }
}

/// "(--flag came from FILE:LINE)" when clap's error is about a flag the command line did not
/// give.
fn error_origin(e: &clap::Error, origins: &BTreeMap<String, String>) -> Option<String> {
    let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) else {
        return None;
    };
    let long = arg.strip_prefix("--")?;
    let long = long.split([' ', '=', '<']).next()?;
    origins
        .get(long)
        .map(|o| format!("(--{long} came from {o})"))
}

/// How a flag takes its value(s).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// A switch: given or not (`true`/`false` in a file).
    Switch,
    /// Counted occurrences (an integer in a file).
    Count,
    /// One value.
    One,
    /// Repeatable: an array in a file, comma-separated in a variable.
    Many,
}

fn kind(arg: &Arg) -> Kind {
    match arg.get_action() {
        ArgAction::SetTrue | ArgAction::SetFalse => Kind::Switch,
        ArgAction::Count => Kind::Count,
        ArgAction::Append => Kind::Many,
        _ if arg.get_num_args().is_some_and(|n| n.max_values() > 1) => Kind::Many,
        _ => Kind::One,
    }
}

/// Whether a file or variable may give `arg`.
fn configurable(arg: &Arg) -> bool {
    !arg.is_positional()
        && arg.get_long().is_some()
        && arg.get_id() != CONFIG_ID
        && !matches!(
            arg.get_action(),
            ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version
        )
}

/// Whether `arg`, given as `--flag` without `=`, takes the next argument as its value.
fn takes_next(arg: &Arg) -> bool {
    arg.get_action().takes_values() && arg.get_num_args().is_none_or(|n| n.min_values() > 0)
}

/// The names a file key may use for `arg`: its long name and long aliases.
fn longs(arg: &Arg) -> Vec<&str> {
    let mut v: Vec<&str> = arg.get_long().into_iter().collect();
    v.extend(arg.get_all_aliases().unwrap_or_default());
    v
}

/// The variable that gives `long`: `WALSHIP_PG_CONN` for `pg-conn`.
pub fn env_var(long: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        long.to_ascii_uppercase().replace('-', "_")
    )
}

/// What the command line gives, found the way clap reads it.
#[derive(Default)]
struct Given {
    /// Ids of the flags given.
    ids: HashSet<String>,
    /// The last `--config` value.
    config: Option<OsString>,
}

/// Reads `args[from..]` as options of `cmd` into `given`. Returns the index of the first
/// argument that is not an option when `stop_at_word` (the subcommand's name), else reads on
/// past positional arguments; stops at `--`.
fn scan(
    cmd: &Command,
    args: &[OsString],
    from: usize,
    stop_at_word: bool,
    given: &mut Given,
) -> Option<usize> {
    let mut i = from;
    while i < args.len() {
        let Some(token) = args[i].to_str() else {
            if stop_at_word {
                return Some(i);
            }
            i += 1;
            continue;
        };
        if token == "--" {
            return None;
        }
        let found = if let Some(long) = token.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (long, None),
            };
            cmd.get_arguments()
                .find(|a| longs(a).contains(&name))
                .map(|a| (a, inline.map(OsString::from)))
        } else if token.len() > 1 && token.starts_with('-') {
            // `-x`, `-xVALUE` or `-x=VALUE` (a token of several short switches is read as
            // its first: walship has none but -h and -V).
            let mut chars = token[1..].chars();
            let c = chars.next().expect("a token longer than '-'");
            let rest = chars.as_str();
            cmd.get_arguments()
                .find(|a| {
                    a.get_short() == Some(c)
                        || a.get_all_short_aliases().unwrap_or_default().contains(&c)
                })
                .map(|a| {
                    let rest = rest.strip_prefix('=').unwrap_or(rest);
                    (a, (!rest.is_empty()).then(|| OsString::from(rest)))
                })
        } else {
            if stop_at_word {
                return Some(i);
            }
            i += 1;
            continue;
        };
        if let Some((arg, inline)) = found {
            given.ids.insert(arg.get_id().to_string());
            let value = match inline {
                Some(v) => Some(v),
                None if takes_next(arg) => {
                    i += 1;
                    args.get(i).cloned()
                }
                None => None,
            };
            if arg.get_id() == CONFIG_ID {
                given.config = value;
            }
        }
        i += 1;
    }
    None
}

/// Adds to `args` (the program's arguments, its name first) what the configuration file and
/// the `WALSHIP_*` variables (looked up through `env`) give for the subcommand that runs.
/// Without a subcommand that clap knows, or with `--help` or `--version`, the arguments are
/// left as they are for clap to answer.
pub fn layer(
    cmd: &mut Command,
    args: &[OsString],
    env: &dyn Fn(&str) -> Option<OsString>,
) -> Result<Layered, ConfigError> {
    cmd.build();
    let unchanged = || Layered {
        args: args.to_vec(),
        ..Layered::default()
    };
    let mut given = Given::default();
    let Some(at) = scan(cmd, args, 1, true, &mut given) else {
        return Ok(unchanged());
    };
    let Some(sub) = args[at]
        .to_str()
        .filter(|name| *name != "help")
        .and_then(|name| cmd.find_subcommand(name))
    else {
        return Ok(unchanged());
    };
    scan(sub, args, at + 1, false, &mut given);
    if given.ids.contains("help") || given.ids.contains("version") {
        return Ok(unchanged());
    }

    // The subcommand's configurable flags (its own and the program's global ones).
    let flags: Vec<&Arg> = sub.get_arguments().filter(|a| configurable(a)).collect();
    let mut layers: Vec<Option<(Vec<OsString>, String)>> = vec![None; flags.len()];
    let mut warnings = Vec::new();

    let path = given
        .config
        .or_else(|| env(CONFIG_ENV).filter(|v| !v.is_empty()))
        .map(PathBuf::from);
    if let Some(path) = path {
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let others_read = std::fs::metadata(&path)
            .map(|m| m.permissions().mode() & 0o044 != 0)
            .unwrap_or(false);
        let file = ConfigFile {
            path: &path,
            text: &text,
            others_read,
        };
        file.layer(cmd, &flags, &mut layers, &mut warnings)?;
    }

    // The environment over the file.
    for (i, arg) in flags.iter().enumerate() {
        let long = arg.get_long().expect("configurable flags have a long name");
        let var = env_var(long);
        if let Some(value) = env(&var).filter(|v| !v.is_empty()) {
            let tokens = env_tokens(arg, &var, &value)?;
            layers[i] = Some((tokens, var));
        }
    }

    // The command line over both.
    let mut added = Vec::new();
    let mut origins = BTreeMap::new();
    for (arg, layer) in flags.iter().zip(layers) {
        let Some((tokens, origin)) = layer else {
            continue;
        };
        if given.ids.contains(arg.get_id().as_str()) {
            continue;
        }
        let long = arg.get_long().expect("configurable flags have a long name");
        origins.insert(long.to_owned(), origin);
        added.extend(tokens);
    }
    let mut out = args[..=at].to_vec();
    out.extend(added);
    out.extend_from_slice(&args[at + 1..]);
    Ok(Layered {
        args: out,
        origins,
        warnings,
    })
}

/// `--long=value`.
fn flag_with(long: &str, value: &OsStr) -> OsString {
    let mut s = OsString::from(format!("--{long}="));
    s.push(value);
    s
}

/// The arguments a variable's value stands for.
fn env_tokens(arg: &Arg, var: &str, value: &OsStr) -> Result<Vec<OsString>, ConfigError> {
    let long = arg.get_long().expect("configurable flags have a long name");
    let bad = |message: &str| ConfigError::Env {
        var: var.to_owned(),
        message: message.to_owned(),
    };
    match kind(arg) {
        Kind::One => Ok(vec![flag_with(long, value)]),
        Kind::Many => {
            let s = value
                .to_str()
                .ok_or_else(|| bad("not valid UTF-8 (a list is split at commas)"))?;
            Ok(s.split(',')
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(|v| flag_with(long, OsStr::new(v)))
                .collect())
        }
        Kind::Switch => match value.to_str().and_then(parse_bool) {
            Some(true) => Ok(vec![OsString::from(format!("--{long}"))]),
            Some(false) => Ok(Vec::new()),
            None => Err(bad(
                "a switch takes 1, true, yes or on, or 0, false, no or off",
            )),
        },
        Kind::Count => {
            let n = value
                .to_str()
                .and_then(|s| s.trim().parse::<u8>().ok())
                .ok_or_else(|| bad("expected a count (0 to 255)"))?;
            Ok(vec![OsString::from(format!("--{long}")); n.into()])
        }
    }
}

/// A switch's value in a variable, as systemd and PostgreSQL spell booleans.
fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// A configuration file's text.
struct ConfigFile<'a> {
    path: &'a Path,
    text: &'a str,
    /// Whether its group or others may read it.
    others_read: bool,
}

impl ConfigFile<'_> {
    fn line(&self, span: Option<std::ops::Range<usize>>) -> usize {
        let end = span.map_or(0, |s| s.start).min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn error(&self, span: Option<std::ops::Range<usize>>, message: String) -> ConfigError {
        ConfigError::File {
            path: self.path.to_owned(),
            line: self.line(span),
            message,
        }
    }

    /// Puts the file's values for `flags` (the subcommand's) into `layers`, checking every
    /// key against every command of `program`.
    fn layer(
        &self,
        program: &Command,
        flags: &[&Arg],
        layers: &mut [Option<(Vec<OsString>, String)>],
        warnings: &mut Vec<String>,
    ) -> Result<(), ConfigError> {
        // TOML's own messages name no value; its rendering (with the line) would.
        let doc = toml_edit::Document::parse(self.text)
            .map_err(|e| self.error(e.span(), e.message().trim().replace('\n', "; ")))?;
        let table = doc.as_table();
        let known = program_keys(program);
        let mut seen: HashMap<String, String> = HashMap::new();
        for (key, item) in table.iter() {
            let span = table.key(key).and_then(|k| k.span());
            let name = key.replace('_', "-");
            if item.is_table() || item.is_array_of_tables() || item.is_inline_table() {
                return Err(self.error(
                    span,
                    format!("\"{key}\" is a table: keys are flags' names, at the top level"),
                ));
            }
            if name == CONFIG_ID {
                return Err(self.error(
                    span,
                    "\"config\" cannot be set in a configuration file".to_owned(),
                ));
            }
            let Some(index) = flags.iter().position(|a| longs(a).contains(&name.as_str())) else {
                if known.contains(&name) {
                    // A flag of another subcommand: the same file serves them all.
                    continue;
                }
                let hint = did_you_mean(&name, &known)
                    .map(|k| format!(" (did you mean \"{}\"?)", k.replace('-', "_")))
                    .unwrap_or_default();
                return Err(self.error(span, format!("unknown key \"{key}\"{hint}")));
            };
            let arg = flags[index];
            let id = arg.get_id().to_string();
            if let Some(other) = seen.insert(id, key.to_owned()) {
                return Err(self.error(
                    span,
                    format!("\"{key}\" and \"{other}\" name the same flag; keep one"),
                ));
            }
            let line = self.line(span.clone());
            let tokens = self.tokens(arg, key, item, span)?;
            if self.others_read && holds_password(arg, item) {
                warnings.push(format!(
                    "{}:{line}: {key} holds a password, and others can read the file: make it private (chmod 600), or give the password in a password file",
                    self.path.display()
                ));
            }
            layers[index] = Some((tokens, format!("{}:{line}", self.path.display())));
        }
        Ok(())
    }

    /// The arguments a key's value stands for.
    fn tokens(
        &self,
        arg: &Arg,
        key: &str,
        item: &toml_edit::Item,
        span: Option<std::ops::Range<usize>>,
    ) -> Result<Vec<OsString>, ConfigError> {
        let long = arg.get_long().expect("configurable flags have a long name");
        let bad = |what: &str| self.error(span.clone(), format!("{key}: {what}"));
        let value = item.as_value().ok_or_else(|| bad("expected a value"))?;
        match kind(arg) {
            Kind::Switch => match value.as_bool() {
                Some(true) => Ok(vec![OsString::from(format!("--{long}"))]),
                Some(false) => Ok(Vec::new()),
                None => Err(bad("a switch takes true or false")),
            },
            Kind::Count => {
                let n = value
                    .as_integer()
                    .and_then(|n| u8::try_from(n).ok())
                    .ok_or_else(|| bad("expected a count (0 to 255)"))?;
                Ok(vec![OsString::from(format!("--{long}")); n.into()])
            }
            Kind::One => {
                if value.is_array() {
                    return Err(bad("takes one value, not an array"));
                }
                let v = scalar(value).ok_or_else(|| bad("expected a string or a number"))?;
                Ok(vec![flag_with(long, OsStr::new(&v))])
            }
            Kind::Many => {
                let values: Vec<&toml_edit::Value> = match value.as_array() {
                    Some(a) => a.iter().collect(),
                    None => vec![value],
                };
                values
                    .into_iter()
                    .map(|v| {
                        scalar(v)
                            .map(|v| flag_with(long, OsStr::new(&v)))
                            .ok_or_else(|| bad("expected a string, a number, or an array of them"))
                    })
                    .collect()
            }
        }
    }
}

/// A value as it would be typed.
fn scalar(v: &toml_edit::Value) -> Option<String> {
    use toml_edit::Value;
    match v {
        Value::String(s) => Some(s.value().clone()),
        Value::Integer(i) => Some(i.value().to_string()),
        Value::Float(f) => Some(f.value().to_string()),
        Value::Boolean(b) => Some(b.value().to_string()),
        Value::Datetime(d) => Some(d.value().to_string()),
        Value::Array(_) | Value::InlineTable(_) => None,
    }
}

/// Whether a connection string's value carries `password=`.
fn holds_password(arg: &Arg, item: &toml_edit::Item) -> bool {
    let conninfo = arg
        .get_value_names()
        .is_some_and(|n| n.iter().any(|n| n.as_str() == CONNINFO_VALUE_NAME));
    let Some(s) = item.as_str().filter(|_| conninfo) else {
        return false;
    };
    match crate::conninfo::ConnInfo::parse(s) {
        Ok(ci) => ci.get("password").is_some(),
        // Cannot tell: a string that does not parse may still hold one.
        Err(_) => s.contains("password"),
    }
}

/// Every long name (and alias) of every command of the program, `-` between words.
fn program_keys(cmd: &Command) -> HashSet<String> {
    let mut keys = HashSet::new();
    let mut stack = vec![cmd];
    while let Some(c) = stack.pop() {
        for a in c.get_arguments().filter(|a| configurable(a)) {
            keys.extend(longs(a).into_iter().map(str::to_owned));
        }
        stack.extend(c.get_subcommands());
    }
    keys
}

/// The known key nearest to `key`, if it is near enough to be a typing slip.
fn did_you_mean<'a>(key: &str, known: &'a HashSet<String>) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (edit_distance(key, k), k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min()
        .map(|(_, k)| k.as_str())
}

/// Levenshtein distance, in characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Parser, Subcommand};
    use std::io::Write;

    /// A program shaped like walship's: a global flag and switch, subcommands with a
    /// repeatable flag, a switch, a value with a default, a positional argument.
    #[derive(Parser, Debug)]
    #[command(name = "prog")]
    struct Cli {
        #[arg(long, global = true, default_value = "plain")]
        log_format: String,
        #[arg(long, global = true)]
        allow_group_access: bool,
        #[command(subcommand)]
        command: Cmd,
    }

    #[derive(Subcommand, Debug, PartialEq)]
    enum Cmd {
        Follow {
            #[arg(long = "sender", required = true)]
            senders: Vec<String>,
            #[arg(long)]
            name: String,
            #[arg(long)]
            keep_wal: Option<String>,
            #[arg(long, default_value_t = 5432)]
            port: u16,
            #[arg(long)]
            insecure: bool,
            #[arg(long, value_name = "CONNINFO")]
            pg_conn: Option<String>,
        },
        Status {
            #[arg(long)]
            json: bool,
            #[arg(long)]
            name: Option<String>,
        },
        RestoreWal {
            #[arg(long)]
            wal_dir: String,
            file: String,
        },
    }

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    /// A configuration file in a fresh directory, with `mode`.
    struct File {
        _dir: TempDir,
        path: PathBuf,
    }

    struct TempDir(PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn file(text: &str, mode: u32) -> File {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "walship-config-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("walship.toml");
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(text.as_bytes()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        File {
            _dir: TempDir(dir),
            path,
        }
    }

    fn layered(args: &[&str], env: &[(&str, &str)]) -> Result<Layered, ConfigError> {
        let env: HashMap<String, OsString> = env
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        layer(&mut command::<Cli>(), &os(args), &|k| env.get(k).cloned())
    }

    fn parsed(args: &[&str], env: &[(&str, &str)]) -> Cli {
        let l = layered(args, env).unwrap();
        let m = command::<Cli>().try_get_matches_from(&l.args).unwrap();
        Cli::from_arg_matches(&m).unwrap()
    }

    fn follow(cli: &Cli) -> (&[String], &str, Option<&str>, u16, bool) {
        match &cli.command {
            Cmd::Follow {
                senders,
                name,
                keep_wal,
                port,
                insecure,
                ..
            } => (senders, name, keep_wal.as_deref(), *port, *insecure),
            other => panic!("not follow: {other:?}"),
        }
    }

    #[test]
    fn the_command_with_config_is_valid() {
        command::<Cli>().debug_assert();
    }

    #[test]
    fn command_line_beats_environment_beats_file() {
        let f = file(
            "sender = [\"f1:1\", \"f2:2\"]\nname = \"from-file\"\nkeep_wal = \"1GB\"\nport = 6000\n",
            0o600,
        );
        let p = f.path.to_str().unwrap();
        // The file alone.
        let cli = parsed(&["prog", "follow", "--config", p], &[]);
        assert_eq!(
            follow(&cli),
            (
                &["f1:1".to_owned(), "f2:2".to_owned()][..],
                "from-file",
                Some("1GB"),
                6000,
                false
            )
        );
        // The environment over the file, the command line over both.
        let env = [
            ("WALSHIP_NAME", "from-env"),
            ("WALSHIP_KEEP_WAL", "2GB"),
            ("WALSHIP_SENDER", "e1:1, e2:2"),
        ];
        let cli = parsed(&["prog", "follow", "--config", p, "--keep-wal=3GB"], &env);
        assert_eq!(
            follow(&cli),
            (
                &["e1:1".to_owned(), "e2:2".to_owned()][..],
                "from-env",
                Some("3GB"),
                6000,
                false
            )
        );
        // A repeatable flag on the command line replaces the lower layers' list.
        let cli = parsed(&["prog", "follow", "--sender", "c:1", "--config", p], &env);
        assert_eq!(follow(&cli).0, &["c:1".to_owned()][..]);
        // WALSHIP_CONFIG names the file when --config does not.
        let cli = parsed(&["prog", "follow"], &[("WALSHIP_CONFIG", p)]);
        assert_eq!(follow(&cli).1, "from-file");
        // --config before the subcommand (it is global) and in the --config=FILE form.
        let cli = parsed(&["prog", &format!("--config={p}"), "follow"], &[]);
        assert_eq!(follow(&cli).1, "from-file");
    }

    #[test]
    fn switches_from_file_and_environment() {
        let on = file(
            "sender = \"s:1\"\nname = \"n\"\ninsecure = true\nallow_group_access = true\n",
            0o600,
        );
        let off = file("sender = \"s:1\"\nname = \"n\"\ninsecure = false\n", 0o600);
        let cli = parsed(
            &["prog", "follow", "--config", on.path.to_str().unwrap()],
            &[],
        );
        assert!(follow(&cli).4);
        assert!(cli.allow_group_access, "a global switch from the file");
        let cli = parsed(
            &["prog", "follow", "--config", off.path.to_str().unwrap()],
            &[],
        );
        assert!(!follow(&cli).4);
        for word in ["1", "true", "YES", "on"] {
            let cli = parsed(
                &["prog", "follow", "--config", off.path.to_str().unwrap()],
                &[("WALSHIP_INSECURE", word)],
            );
            assert!(follow(&cli).4, "{word}");
        }
        for word in ["0", "false", "no", "OFF"] {
            // false in the environment overrides true in the file.
            let cli = parsed(
                &["prog", "follow", "--config", on.path.to_str().unwrap()],
                &[("WALSHIP_INSECURE", word)],
            );
            assert!(!follow(&cli).4, "{word}");
        }
        let e = layered(
            &["prog", "follow", "--sender=s:1", "--name=n"],
            &[("WALSHIP_INSECURE", "maybe")],
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("WALSHIP_INSECURE: "), "{e}");
        assert!(!e.to_string().contains("maybe"), "{e}");
        let bad = file("insecure = \"yes\"\n", 0o600);
        let e = layered(
            &["prog", "follow", "--config", bad.path.to_str().unwrap()],
            &[],
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .ends_with(":1: insecure: a switch takes true or false"),
            "{e}"
        );
    }

    #[test]
    fn unknown_key_names_file_and_line() {
        let f = file(
            "# a standby\nsender = \"s:1\"\n\nname = \"n\"\n\n\nkeep_wall = \"64MB\"\n",
            0o600,
        );
        let e = layered(
            &["prog", "follow", "--config", f.path.to_str().unwrap()],
            &[],
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{}:7: unknown key \"keep_wall\" (did you mean \"keep_wal\"?)",
                f.path.display()
            )
        );
        // Unknown for every subcommand, not only the one that runs.
        let e = layered(
            &["prog", "status", "--config", f.path.to_str().unwrap()],
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().contains(":7: unknown key"), "{e}");
        // Positional arguments and --help are not configurable.
        for key in ["file", "help", "version"] {
            let f = file(&format!("{key} = \"x\"\n"), 0o600);
            let e = layered(
                &[
                    "prog",
                    "restore-wal",
                    "--config",
                    f.path.to_str().unwrap(),
                    "--wal-dir=d",
                    "f",
                ],
                &[],
            )
            .unwrap_err();
            assert!(
                e.to_string()
                    .contains(&format!(":1: unknown key \"{key}\"")),
                "{e}"
            );
        }
        // Tables, and a key given twice in its two spellings.
        let f = file("[follow]\nname = \"n\"\n", 0o600);
        let e = layered(
            &["prog", "follow", "--config", f.path.to_str().unwrap()],
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().contains(":1: \"follow\" is a table"), "{e}");
        let f = file("keep_wal = \"1\"\nkeep-wal = \"2\"\n", 0o600);
        let e = layered(
            &["prog", "follow", "--config", f.path.to_str().unwrap()],
            &[],
        )
        .unwrap_err();
        assert!(
            e.to_string().contains(":2: \"keep-wal\" and \"keep_wal\""),
            "{e}"
        );
        // Bad TOML: the line, never the text.
        let f = file("name = \"n\"\npg_conn = \"password=s3cret\n", 0o600);
        let e = layered(
            &["prog", "follow", "--config", f.path.to_str().unwrap()],
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().contains(":2: "), "{e}");
        assert!(!e.to_string().contains("s3cret"), "{e}");
    }

    #[test]
    fn another_subcommands_key_is_ignored_and_unknown_variables_too() {
        // `json` is status's; `sender` and `keep_wal` are follow's.
        let f = file(
            "sender = \"s:1\"\nname = \"n\"\nkeep_wal = \"64MB\"\njson = true\n",
            0o600,
        );
        let p = f.path.to_str().unwrap();
        let cli = parsed(
            &["prog", "follow", "--config", p],
            &[("WALSHIP_BIN_DIR", "/x")],
        );
        assert_eq!(follow(&cli).1, "n");
        let cli = parsed(
            &["prog", "status", "--config", p],
            &[("WALSHIP_PG_BIN", "/y")],
        );
        assert_eq!(
            cli.command,
            Cmd::Status {
                json: true,
                name: Some("n".into())
            }
        );
    }

    #[test]
    fn arrays_only_for_repeatable_flags() {
        let f = file(
            "sender = [\"a:1\", \"b:2\"]\nname = [\"x\", \"y\"]\n",
            0o600,
        );
        let e = layered(
            &["prog", "follow", "--config", f.path.to_str().unwrap()],
            &[],
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .ends_with(":2: name: takes one value, not an array"),
            "{e}"
        );
        // A single value for a repeatable flag is a list of one.
        let f = file("sender = \"a:1\"\nname = \"x\"\n", 0o600);
        let cli = parsed(
            &["prog", "follow", "--config", f.path.to_str().unwrap()],
            &[],
        );
        assert_eq!(follow(&cli).0, &["a:1".to_owned()][..]);
    }

    #[test]
    fn values_are_checked_by_clap_and_placed_after_the_subcommand() {
        let f = file(
            "sender = \"s:1\"\nname = \"n\"\nport = \"not-a-port\"\n",
            0o600,
        );
        let l = layered(
            &[
                "prog",
                "--log-format",
                "json",
                "follow",
                "--config",
                f.path.to_str().unwrap(),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(
            &l.args[..4],
            &os(&["prog", "--log-format", "json", "follow"])[..]
        );
        assert_eq!(l.origins["port"], format!("{}:3", f.path.display()));
        let e = command::<Cli>().try_get_matches_from(&l.args).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation);
        assert_eq!(
            error_origin(&e, &l.origins).unwrap(),
            format!("(--port came from {}:3)", f.path.display())
        );
        // A positional argument after the layered flags is still positional.
        let cli = parsed(&["prog", "restore-wal", "f1"], &[("WALSHIP_WAL_DIR", "/w")]);
        assert_eq!(
            cli.command,
            Cmd::RestoreWal {
                wal_dir: "/w".into(),
                file: "f1".into()
            }
        );
        // A flag's value is not a flag: "--name=--json" does not give --json.
        let cli = parsed(
            &["prog", "status", "--name=--json"],
            &[("WALSHIP_JSON", "1")],
        );
        assert_eq!(
            cli.command,
            Cmd::Status {
                json: true,
                name: Some("--json".into())
            }
        );
    }

    #[test]
    fn help_and_unknown_subcommands_pass_through() {
        let env = [("WALSHIP_CONFIG", "/nonexistent/walship.toml")];
        for args in [
            &["prog", "follow", "--help"][..],
            &["prog", "follow", "-h"],
            &["prog", "--version"],
            &["prog", "help", "follow"],
            &["prog", "nosuch"],
            &["prog"],
        ] {
            assert_eq!(layered(args, &env).unwrap().args, os(args));
        }
        // A missing file named by the environment is an error otherwise.
        let e = layered(&["prog", "follow"], &env).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("cannot read the configuration file /nonexistent/walship.toml"),
            "{e}"
        );
    }

    #[test]
    fn password_in_a_file_others_can_read_is_warned_about() {
        let text = "sender = \"s:1\"\nname = \"n\"\npg_conn = \"host=h password=s3cret\"\n";
        let open = file(text, 0o644);
        let l = layered(
            &["prog", "follow", "--config", open.path.to_str().unwrap()],
            &[],
        )
        .unwrap();
        assert_eq!(l.warnings.len(), 1);
        assert!(l.warnings[0].contains(":3: pg_conn holds a password"));
        assert!(!l.warnings[0].contains("s3cret"));
        let private = file(text, 0o600);
        let l = layered(
            &["prog", "follow", "--config", private.path.to_str().unwrap()],
            &[],
        )
        .unwrap();
        assert!(l.warnings.is_empty());
        let open = file(
            "sender = \"s:1\"\nname = \"n\"\npg_conn = \"host=h\"\n",
            0o644,
        );
        let l = layered(
            &["prog", "follow", "--config", open.path.to_str().unwrap()],
            &[],
        )
        .unwrap();
        assert!(l.warnings.is_empty());
    }

    #[test]
    fn variable_names() {
        assert_eq!(env_var("pg-conn"), "WALSHIP_PG_CONN");
        assert_eq!(env_var("keep-wal"), "WALSHIP_KEEP_WAL");
        assert_eq!(edit_distance("keep-wall", "keep-wal"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
    }
}
