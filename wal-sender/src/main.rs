//! The wal-sender command line. Exit codes: 0 stopped by a signal, 1 error, 2 bad usage or
//! configuration (including unusable TLS files, a non-loopback address without TLS, and a
//! connection string that cannot be parsed), 12 the primary cannot be used as configured
//! (authentication, role, database, settings; found at start-up), 14 `check` found a
//! failing check (`check --nagios` exits with Nagios' codes instead: 0 OK, 1 WARNING,
//! 2 CRITICAL, 3 UNKNOWN).

use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use walship_common::check;
use walship_common::logging::{self, LogFormat};
use walship_common::tls;

const DEFAULT_ZSTD_LEVEL: i32 = 1;
const DEFAULT_SNAPSHOT_ZSTD_LEVEL: i32 = 1;
const DEFAULT_MAX_CONNECTIONS: usize = 64;
const DEFAULT_BATCH_DELAY: &str = "0ms";

/// wal-sender: stream a PostgreSQL primary's WAL, compressed and checksummed, to wal-receivers.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Log format: plain or json. The level comes from RUST_LOG (default info).
    #[arg(long, global = true, default_value = "plain")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve WAL to receivers. Each receiver NAME gets the physical replication slot
    /// walship_NAME and a replication connection with application_name=NAME.
    Serve(ServeArgs),
    /// Check every precondition of `serve` and report each as OK or FAIL with its fix: the
    /// SQL session and the replication connection (authentication), the role's REPLICATION,
    /// wal_level, free wal senders and replication slots, max_slot_wal_keep_size, the
    /// grants and data directory snapshots need, the TLS files (loadable, key matching,
    /// validity dates) and the listen address (free, or held by a running wal-sender).
    /// Takes the flags of `serve`. Exits 0 when no check failed (warnings do not fail),
    /// 14 when one did; with --nagios, 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.
    Check {
        #[command(flatten)]
        serve: ServeArgs,
        #[command(flatten)]
        output: CheckOutput,
    },
    /// Show the receivers as the primary sees them: for each slot walship_NAME, whether
    /// the receiver is connected, what it acknowledged, its lag behind the primary's WAL
    /// position in bytes, the slot's restart_lsn, wal_status and safe_wal_size. It reads
    /// the primary only, so it works whether or not `wal-sender serve` runs. Positions of
    /// connected receivers need a role with pg_read_all_stats (pg_monitor) or a superuser;
    /// without it they show as unknown.
    Status {
        /// libpq connection string for the primary, as for `serve`.
        #[arg(long, value_name = "CONNINFO", default_value = "")]
        pg_conn: String,
        /// A file whose first line is the password, as for `serve`.
        #[arg(long, value_name = "FILE")]
        pg_password_file: Option<PathBuf>,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// A command line that cannot be used as given (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Usage(String);

/// How `check` prints its report.
#[derive(clap::Args, Debug)]
struct CheckOutput {
    /// Print a JSON array of {name, status, detail, fix} (status: ok, warn, fail, skip).
    #[arg(long, conflicts_with = "nagios")]
    json: bool,
    /// Print one line for Nagios-style monitoring and exit 0 OK, 1 WARNING, 2 CRITICAL,
    /// 3 UNKNOWN.
    #[arg(long)]
    nagios: bool,
}

impl CheckOutput {
    fn format(&self) -> walship_common::check::Format {
        use walship_common::check::Format;
        match (self.json, self.nagios) {
            (true, _) => Format::Json,
            (_, true) => Format::Nagios,
            _ => Format::Text,
        }
    }
}

/// The flags of `serve` (and of `check`, which takes the same, so that one configuration
/// serves both).
#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// libpq keyword/value connection string for the primary, e.g.
    /// "host=/var/run/postgresql port=5432 user=walship". What it does not give comes
    /// from libpq's environment (PGHOST, PGUSER, PGSSLMODE...) and defaults. Keep the
    /// password out of it (every local user sees a command line): walship reads
    /// --pg-password-file, PGPASSWORD and the password file (passfile, PGPASSFILE,
    /// ~/.pgpass) as libpq does. TLS: sslmode, sslrootcert, sslcert, sslkey. The role needs
    /// REPLICATION.
    #[arg(long, value_name = "CONNINFO", default_value = "")]
    pg_conn: String,
    /// A file whose first line is the password for --pg-conn, read at start: used when the
    /// connection string gives none, before PGPASSWORD and the password file (pgpass).
    /// Refused unless private to its owner (chmod 600), as libpq refuses a pgpass file.
    #[arg(long, value_name = "FILE")]
    pg_password_file: Option<PathBuf>,
    /// Address to listen on for receivers.
    #[arg(long, value_name = "HOST:PORT")]
    listen: String,
    /// zstd level for WAL on the wire. The sender runs next to the primary, whose CPU it
    /// shares: level 1 costs a quarter less CPU than level 3, and on pgbench WAL in
    /// the frames streaming makes it compresses within two points of level 3.
    #[arg(long, default_value_t = DEFAULT_ZSTD_LEVEL, value_parser = clap::value_parser!(i32).range(1..=19))]
    zstd_level: i32,
    /// zstd level for snapshot files on the wire (bulk data: level 1 is fast).
    #[arg(long, default_value_t = DEFAULT_SNAPSHOT_ZSTD_LEVEL, value_parser = clap::value_parser!(i32).range(1..=19))]
    snapshot_zstd_level: i32,
    /// Most receivers connected at once; more are closed at once.
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// How long a small run of WAL (under 16 KiB) may wait for more while the receiver
    /// has not yet acknowledged the WAL sent before it. A receiver that has acknowledged
    /// everything gets new WAL at once. Larger frames compress better and cost fewer
    /// wake-ups, but a synchronous commit waits the longer. 0 (the default) never waits:
    /// the receiver then batches what arrives while it fsyncs.
    #[arg(long, value_name = "DURATION", default_value = DEFAULT_BATCH_DELAY, value_parser = humantime::parse_duration)]
    batch_delay: std::time::Duration,
    /// How long a new connection has for each step of its handshake (TLS, hello,
    /// request) before it is closed, so that idle connections cannot hold the
    /// --max-connections places.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    handshake_timeout: std::time::Duration,
    /// The primary's data directory, read for snapshots. Default: the server's
    /// data_directory setting (the sender must run on the primary's host).
    #[arg(long, value_name = "DIR")]
    pgdata: Option<std::path::PathBuf>,
    /// PEM certificate (chain) the sender presents: turns on TLS. Every connection must
    /// then be TLS; a plaintext receiver is refused before any data moves.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA certificate(s) that sign receivers' certificates. With it, every receiver
    /// must present a certificate, and may use only a receiver name that is the
    /// certificate's common name or one of its DNS subject alternative names.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Allow listening on a non-loopback address without TLS. Without TLS anyone who
    /// reaches the port can read the database's WAL and snapshots.
    #[arg(long)]
    insecure_listen: bool,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics (plain HTTP, no
    /// authentication: listen on loopback or a monitoring network): each receiver's
    /// acknowledged position, lag and bytes sent, the slots' safe_wal_size and wal_status,
    /// snapshots in progress, refused connections by reason.
    #[arg(long, value_name = "HOST:PORT")]
    metrics_listen: Option<String>,
}

/// The primary's connection settings from --pg-conn and --pg-password-file. The error names
/// a keyword or the file, never the string or the password.
fn pg_settings(
    pg_conn: &str,
    password_file: Option<&std::path::Path>,
) -> Result<walship_common::conninfo::Settings, String> {
    let mut pg = walship_common::conninfo::Settings::from_conninfo(pg_conn)
        .map_err(|e| format!("--pg-conn: {e}"))?;
    if let Some(file) = password_file {
        pg.use_password_file(file)
            .map_err(|e| format!("--pg-password-file: {e}"))?;
    }
    Ok(pg)
}

/// Checks the listen address and loads the TLS files, before anything starts.
fn security(
    listen: &str,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_client_ca: Option<PathBuf>,
    insecure_listen: bool,
) -> Result<wal_sender::Security, String> {
    let tls = match (&tls_cert, &tls_key) {
        (Some(cert), Some(key)) => Some(
            tls::server_config(cert, key, tls_client_ca.as_deref()).map_err(|e| e.to_string())?,
        ),
        _ => None,
    };
    if tls.is_none() && !insecure_listen {
        let addrs: Vec<_> = listen
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve --listen {listen}: {e}"))?
            .collect();
        if let Some(a) = addrs.iter().find(|a| !a.ip().is_loopback()) {
            return Err(format!(
                "refusing to listen on {a} without TLS: anyone who reaches it could read the database. Give --tls-cert and --tls-key (and --tls-client-ca to authenticate receivers), listen on a loopback address, or accept the risk with --insecure-listen"
            ));
        }
    }
    Ok(wal_sender::Security {
        tls,
        client_auth: tls_client_ca.is_some(),
    })
}

fn main() -> ExitCode {
    let cli: Cli = walship_common::config::parse();
    // The sender creates no files today; whatever it may create is private, as PostgreSQL's.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    logging::init(cli.log_format);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            walship_common::report!("wal-sender: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = match cli.command {
        Command::Serve(ServeArgs {
            pg_conn,
            pg_password_file,
            listen,
            zstd_level,
            snapshot_zstd_level,
            max_connections,
            pgdata,
            batch_delay,
            handshake_timeout,
            tls_cert,
            tls_key,
            tls_client_ca,
            insecure_listen,
            metrics_listen,
        }) => {
            let security =
                match security(&listen, tls_cert, tls_key, tls_client_ca, insecure_listen) {
                    Ok(s) => s,
                    Err(e) => {
                        walship_common::report!("wal-sender: {e}");
                        return ExitCode::from(2);
                    }
                };
            let pg = match pg_settings(&pg_conn, pg_password_file.as_deref()) {
                Ok(pg) => pg,
                Err(e) => {
                    walship_common::report!("wal-sender: {e}");
                    return ExitCode::from(2);
                }
            };
            rt.block_on(wal_sender::serve(wal_sender::ServeConfig {
                pg,
                listen,
                zstd_level,
                snapshot_zstd_level,
                max_connections,
                pgdata,
                batch_delay,
                handshake_timeout,
                security,
                metrics_listen,
            }))
        }
        Command::Check { serve, output } => {
            let format = output.format();
            let pg = match pg_settings(&serve.pg_conn, serve.pg_password_file.as_deref()) {
                Ok(pg) => pg,
                Err(e) => {
                    if let Some((line, code)) = check::could_not_run(format, &e) {
                        println!("{line}");
                        return ExitCode::from(code);
                    }
                    walship_common::report!("wal-sender: {e}");
                    return ExitCode::from(2);
                }
            };
            let report = rt.block_on(wal_sender::check::check(&wal_sender::check::CheckConfig {
                pg,
                listen: serve.listen,
                pgdata: serve.pgdata,
                tls_cert: serve.tls_cert,
                tls_key: serve.tls_key,
                tls_client_ca: serve.tls_client_ca,
                insecure_listen: serve.insecure_listen,
                metrics_listen: serve.metrics_listen,
            }));
            let (text, code) = report.render(format);
            println!("{text}");
            return ExitCode::from(code);
        }
        Command::Status {
            pg_conn,
            pg_password_file,
            json,
        } => (|| {
            let pg = pg_settings(&pg_conn, pg_password_file.as_deref()).map_err(Usage)?;
            let st = rt.block_on(wal_sender::status::status(&pg))?;
            if json {
                println!("{}", serde_json::to_string(&st)?);
            } else {
                println!("{st}");
            }
            Ok(())
        })(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<Usage>() || e.is::<walship_common::metrics::MetricsError>() => {
            walship_common::report!("wal-sender: {e:#}");
            ExitCode::from(2)
        }
        Err(e) if e.is::<wal_sender::SetupFailure>() => {
            walship_common::report!("wal-sender: {e:#}");
            ExitCode::from(wal_sender::EXIT_SETUP)
        }
        Err(e) => {
            walship_common::report!("wal-sender: {e:#}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn verify_cli() {
        walship_common::config::command::<super::Cli>().debug_assert();
    }
}
