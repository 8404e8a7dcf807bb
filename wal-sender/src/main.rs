//! The wal-sender command line. Exit codes: 0 stopped by a signal, 1 error, 2 bad usage.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use walship_common::logging::{self, LogFormat};

const DEFAULT_ZSTD_LEVEL: i32 = 3;
const DEFAULT_SNAPSHOT_ZSTD_LEVEL: i32 = 1;
const DEFAULT_MAX_CONNECTIONS: usize = 64;
const DEFAULT_BATCH_DELAY: &str = "1ms";

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
    Serve {
        /// libpq keyword/value connection string for the primary, e.g.
        /// "host=/var/run/postgresql port=5432 user=postgres". The role needs REPLICATION.
        #[arg(long, value_name = "CONNINFO")]
        pg_conn: String,
        /// Address to listen on for receivers.
        #[arg(long, value_name = "HOST:PORT")]
        listen: String,
        /// zstd level for WAL on the wire. WAL travels in small messages, where level 3
        /// shrinks pgbench WAL to about a fifth and level 1 to about a third.
        #[arg(long, default_value_t = DEFAULT_ZSTD_LEVEL, value_parser = clap::value_parser!(i32).range(1..=19))]
        zstd_level: i32,
        /// zstd level for snapshot files on the wire (bulk data: level 1 is fast).
        #[arg(long, default_value_t = DEFAULT_SNAPSHOT_ZSTD_LEVEL, value_parser = clap::value_parser!(i32).range(1..=19))]
        snapshot_zstd_level: i32,
        /// Most receivers connected at once; more are closed at once.
        #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS)]
        max_connections: usize,
        /// How long a small run of WAL (under 16 KiB) waits for more before it is sent.
        /// Larger frames compress better and cost fewer wake-ups; 0 sends at once.
        #[arg(long, value_name = "DURATION", default_value = DEFAULT_BATCH_DELAY, value_parser = humantime::parse_duration)]
        batch_delay: std::time::Duration,
        /// The primary's data directory, read for snapshots. Default: the server's
        /// data_directory setting (the sender must run on the primary's host).
        #[arg(long, value_name = "DIR")]
        pgdata: Option<std::path::PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wal-sender: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = match cli.command {
        Command::Serve {
            pg_conn,
            listen,
            zstd_level,
            snapshot_zstd_level,
            max_connections,
            pgdata,
            batch_delay,
        } => rt.block_on(wal_sender::serve(wal_sender::ServeConfig {
            pg_conn,
            listen,
            zstd_level,
            snapshot_zstd_level,
            max_connections,
            pgdata,
            batch_delay,
        })),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wal-sender: {e:#}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn verify_cli() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
