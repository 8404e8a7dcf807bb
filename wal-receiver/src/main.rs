//! The wal-receiver command line. Exit codes are listed in `wal_receiver::exit` (`check`: 0
//! when no check failed, 14 when one did; with `--nagios` 0 OK, 1 WARNING, 2 CRITICAL, 3
//! UNKNOWN).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use wal_receiver::pgconf::ServerSettings;
use wal_receiver::serve::ServeAddr;
use wal_receiver::{exit, Fatal};
use walship_common::logging::{self, LogFormat};
use walship_common::Lsn;

/// wal-receiver: store a primary's WAL durably from a wal-sender and feed it to a standby.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Log format: plain or json. The level comes from RUST_LOG (default info).
    #[arg(long, global = true, default_value = "plain")]
    log_format: LogFormat,
    /// Let the owner's group read what wal-receiver creates (directories 0750, files 0640,
    /// as initdb --allow-group-access), and accept WAL stores and repositories its group may
    /// read. Without it they are private to their owner (0700, 0600) and a store or
    /// repository open to others is refused.
    #[arg(long, global = true)]
    allow_group_access: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Stream WAL from a sender into a WAL store and keep it current, reconnecting after
    /// any outage. Acknowledges only fsynced WAL.
    Follow(FollowArgs),
    /// Check every precondition of `follow` and report each as OK or FAIL with its fix:
    /// the receiver name, the TLS files (loadable, key matching, validity dates, the name
    /// in the certificate), each sender (TCP, TLS and the handshake: it answers, reaches
    /// its PostgreSQL and accepts this name; no stream is asked for, so no slot moves),
    /// that the store holds the sender's cluster, the store's owner and permissions, disk
    /// space against --keep-wal, the --serve-standby socket, and for a backup repository
    /// (--repo, or the one --wal-dir is the archive of) the WAL chain from the newest backup
    /// to the end of the archive. Takes the flags of `follow`. Exits 0 when no check failed
    /// (warnings do not fail), 14 when one did; with --nagios, 0 OK, 1 WARNING, 2 CRITICAL,
    /// 3 UNKNOWN.
    Check {
        #[command(flatten)]
        follow: FollowArgs,
        /// A backup repository to check as well: its permissions, and the WAL chain from
        /// the newest backup's start to the end of its archive. Default: the repository
        /// whose archive --wal-dir is, if it is one.
        #[arg(long, value_name = "DIR")]
        repo: Option<PathBuf>,
        /// Print a JSON array of {name, status, detail, fix} (status: ok, warn, fail, skip).
        #[arg(long, conflicts_with = "nagios")]
        json: bool,
        /// Print one line for Nagios-style monitoring and exit 0 OK, 1 WARNING, 2 CRITICAL,
        /// 3 UNKNOWN.
        #[arg(long)]
        nagios: bool,
    },
    /// Make a new standby from a live primary: restore a consistent snapshot into --pgdata,
    /// store WAL through the snapshot's stop position in --wal-dir, and write the recovery
    /// settings. Exits 0 once everything is fsynced; then start the standby with pg_ctl and
    /// keep `follow` running on the same --wal-dir. An interrupted bootstrap can be run again:
    /// it resumes, and files already received and unchanged on the primary are not sent again.
    Bootstrap {
        /// The wal-sender to take the snapshot from. Repeatable, as for `follow`: the
        /// snapshot comes from the primary among them.
        #[arg(long = "sender", value_name = "HOST:PORT", required = true)]
        senders: Vec<String>,
        /// This receiver's name (slot walship_NAME); use the same name for `follow`.
        #[arg(long)]
        name: String,
        /// The standby's data directory: created if missing, must be empty (or hold an
        /// unfinished bootstrap to resume).
        #[arg(long, value_name = "DIR")]
        pgdata: PathBuf,
        /// The WAL store directory, as for `follow`.
        #[arg(long, value_name = "DIR")]
        wal_dir: PathBuf,
        /// Put the tablespace that is at OLD on the primary into NEW here (repeatable, as
        /// with pg_basebackup). Needed whenever the standby runs on the primary's host.
        #[arg(long, value_name = "OLD=NEW", value_parser = parse_mapping)]
        tablespace_mapping: Vec<(PathBuf, PathBuf)>,
        #[command(flatten)]
        tls: TlsArgs,
        /// How the standby gets WAL: "stream" sets primary_conninfo to the address where
        /// `follow --serve-standby` serves it (restore_command stays as the fallback);
        /// "restore-command" uses restore_command only.
        #[arg(long, value_name = "HOW", default_value = "stream", value_parser = ["stream", "restore-command"])]
        standby_feed: String,
        /// Where `follow --serve-standby` will serve the standby (default: --wal-dir, as a
        /// Unix socket directory). Give the same to `follow`.
        #[arg(long, value_name = "SOCKET_DIR|IP:PORT")]
        serve_standby: Option<String>,
        /// The port in the socket's name when the standby is served on a directory.
        #[arg(long, value_name = "PORT", default_value_t = 5432)]
        serve_standby_port: u16,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Copy one WAL file from the store to DEST: for restore_command, as
    /// `wal-receiver restore-wal --wal-dir DIR %f %p`. Exits 1 when the file is not there,
    /// 5 when the store's copy is corrupt.
    RestoreWal {
        /// The WAL store directory.
        #[arg(long, value_name = "DIR")]
        wal_dir: PathBuf,
        /// The WAL file name PostgreSQL asks for (%f).
        file: String,
        /// Where to write it (%p).
        dest: PathBuf,
        /// Do not decompress the next sealed segment in the background (by default it is,
        /// into .walship-prefetch beside DEST, while PostgreSQL replays this one).
        #[arg(long)]
        no_prefetch: bool,
        /// Once PostgreSQL asks for the segment that holds the end of the archive, request
        /// the server's promotion as pg_ctl promote does, from the current directory (the
        /// data directory): rename pg_wal/walship.promote.armed (written by `restore`) to
        /// promote, and send SIGUSR1 to the postmaster of postmaster.pid. `restore` sets
        /// this for a restore to the end of the archive.
        #[arg(long)]
        promote_at_end: bool,
    },
    /// Show what a WAL store holds: system identifier, timeline, flush position,
    /// segments, and bytes received raw vs on the wire.
    Status {
        /// The WAL store directory.
        #[arg(long, value_name = "DIR")]
        wal_dir: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Also ask the standby this store feeds, at this libpq connection string, for its
        /// recovery state, replay position and last replay time (what a failover needs).
        /// Read as libpq reads it: PGPASSWORD, the password file and sslmode apply; the
        /// database is dbname, else PGDATABASE, else postgres.
        #[arg(long, value_name = "CONNINFO")]
        standby: Option<String>,
        /// A file whose first line is the password for --standby: used when the connection
        /// string gives none, before PGPASSWORD and the password file (pgpass). Refused
        /// unless private to its owner (chmod 600), as libpq refuses a pgpass file.
        #[arg(long, value_name = "FILE", requires = "standby")]
        standby_password_file: Option<PathBuf>,
    },
    /// Take a base backup into a backup repository while the primary runs. The WAL through
    /// the backup's stop position goes into the repository's WAL archive, REPO/wal; keep it
    /// continuous with `wal-receiver follow --wal-dir REPO/wal --name NAME` (same name).
    Backup {
        /// The wal-sender to take the backup from (repeatable, as for `follow`).
        #[arg(long = "sender", value_name = "HOST:PORT", required = true)]
        senders: Vec<String>,
        /// The repository's receiver name (slot walship_NAME); use the same name for the
        /// `follow` that keeps REPO/wal current.
        #[arg(long)]
        name: String,
        /// The backup repository (created if missing).
        #[arg(long, value_name = "DIR")]
        repo: PathBuf,
        /// After the backup, keep only the newest N backups, and the WAL they need.
        #[arg(long, value_name = "N")]
        keep: Option<usize>,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// Restore a backup from a repository into a new data directory, set up so that
    /// `pg_ctl start` replays the archive to the target and stops there. Without a target it
    /// replays to the end of the archive. Picks the newest backup that ends before the
    /// target (the oldest for --target-xid and --target-name); every stored file is checked
    /// against its checksum, and a damaged backup is refused.
    Restore {
        /// The backup repository.
        #[arg(long, value_name = "DIR")]
        repo: PathBuf,
        /// The new data directory (created; must be empty or absent).
        #[arg(long, value_name = "DIR")]
        pgdata: PathBuf,
        /// Replay up to this time, which must name its zone: RFC 3339 (2026-11-26T17:00:00Z,
        /// 2026-11-26T19:00:00+02:00) or as PostgreSQL's recovery_target_time takes it
        /// (2026-11-26 19:00:00+02, 2026-11-26 17:00:00 UTC, 2026-11-26 19:00:00
        /// Europe/Helsinki). The archive must hold a commit or abort after it (refused
        /// otherwise).
        #[arg(long, value_name = "TIME")]
        target_time: Option<String>,
        /// Replay up to this LSN.
        #[arg(long, value_name = "LSN")]
        target_lsn: Option<Lsn>,
        /// Replay up to the commit of this transaction.
        #[arg(long, value_name = "XID")]
        target_xid: Option<String>,
        /// Replay up to this restore point (pg_create_restore_point).
        #[arg(long, value_name = "NAME")]
        target_name: Option<String>,
        /// What PostgreSQL does at the target.
        #[arg(long, value_name = "ACTION", value_parser = ["pause", "promote", "shutdown"])]
        target_action: Option<String>,
        /// Restore this backup (an id from `backups`) instead of choosing one.
        #[arg(long, value_name = "ID")]
        backup: Option<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// List a repository's backups, their sizes, and the restorable range.
    Backups {
        /// The backup repository.
        #[arg(long, value_name = "DIR")]
        repo: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Remove the oldest backups beyond --keep, and the WAL no kept backup needs.
    Prune {
        /// The backup repository.
        #[arg(long, value_name = "DIR")]
        repo: PathBuf,
        /// How many backups to keep (newest first).
        #[arg(long, value_name = "N")]
        keep: usize,
    },
    /// Check every stored backup file and WAL segment against its checksum, and the WAL
    /// chain from each backup's start to the end of the archive. Names every problem; exits
    /// 5 if there is one. Files verified before and unchanged since are not read again
    /// unless --full.
    Verify {
        /// The backup repository.
        #[arg(long, value_name = "DIR")]
        repo: PathBuf,
        /// Read everything, even what an earlier run found intact.
        #[arg(long)]
        full: bool,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// The flags of `follow` (and of `check`, which takes the same, so that one configuration
/// serves both).
#[derive(clap::Args, Debug)]
struct FollowArgs {
    /// The wal-sender to follow. Repeat it to list the senders of every node that may
    /// become the primary: the receiver then follows the one whose server is a primary
    /// on the highest timeline, re-chooses after every disconnect (so it finds a new
    /// primary after a failover by itself), never moves to a lower timeline, and
    /// follows none while two claim to be primary on the same timeline.
    #[arg(long = "sender", value_name = "HOST:PORT", required = true)]
    senders: Vec<String>,
    /// This receiver's name: the sender uses the slot walship_NAME and
    /// application_name=NAME (so synchronous_standby_names can name it).
    #[arg(long)]
    name: String,
    /// The WAL store directory (created if missing; one receiver per store).
    #[arg(long, value_name = "DIR")]
    wal_dir: PathBuf,
    /// Where an empty store starts (rounded down to its segment start). Default: the
    /// start of the primary's current segment. Ignored when the store has WAL.
    #[arg(long, value_name = "LSN")]
    start_lsn: Option<Lsn>,
    #[command(flatten)]
    tls: TlsArgs,
    /// Serve a standby over PostgreSQL's streaming replication protocol, straight from
    /// the store: an absolute directory for a Unix socket (.s.PGSQL.PORT in it), or a
    /// loopback IP:PORT. On a Unix socket only the OS user that owns the WAL store may
    /// connect (peer authentication); on TCP any local user may. The standby's replay
    /// position and hot-standby feedback go upstream.
    #[arg(long, value_name = "SOCKET_DIR|IP:PORT")]
    serve_standby: Option<String>,
    /// The port in the socket's name when --serve-standby is a directory.
    #[arg(long, value_name = "PORT", default_value_t = 5432)]
    serve_standby_port: u16,
    /// Remove the oldest sealed segments beyond this total size of sealed files on disk
    /// (64MB, 2GiB) or older than this (7d, 12h); `all` keeps everything. Never removes
    /// what the served standby has not replayed. Default with --serve-standby: the
    /// smaller of 10% of the store's file system and 16 GiB; without it, all (a
    /// restore_command standby reports no position). Refused in a backup repository
    /// (prune decides).
    #[arg(long, value_name = "SIZE|DURATION|all")]
    keep_wal: Option<wal_receiver::retention::KeepWal>,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics (plain HTTP, no
    /// authentication: listen on loopback or a monitoring network): the flush position
    /// and the lag behind the primary, seconds since the sender's last message, bytes
    /// received, reconnections and errors by kind, the store's size and its file system's
    /// free space, the served standby's replay position and lag.
    #[arg(long, value_name = "HOST:PORT")]
    metrics_listen: Option<String>,
}

/// Where the server made by `bootstrap` or `restore` listens: written into its
/// postgresql.auto.conf, so that a plain `pg_ctl start` or a service manager starts it
/// there. What is not given stays as in the primary's configuration, which the new data
/// directory copies.
#[derive(clap::Args, Debug)]
struct ServerArgs {
    /// The port the new server listens on (`port`). Default: the primary's.
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    port: Option<u16>,
    /// The directory of the new server's Unix socket (`unix_socket_directories`). Default:
    /// the primary's.
    #[arg(long, value_name = "DIR")]
    socket_dir: Option<PathBuf>,
    /// The new server's TCP addresses (`listen_addresses`): e.g. '*', a list of addresses,
    /// or '' for the Unix socket only. Default: the primary's.
    #[arg(long, value_name = "ADDRESSES")]
    listen_addresses: Option<String>,
}

impl ServerArgs {
    fn settings(self) -> std::io::Result<ServerSettings> {
        Ok(ServerSettings {
            port: self.port,
            socket_dir: self.socket_dir.map(std::path::absolute).transpose()?,
            listen_addresses: self.listen_addresses,
        })
    }
}

/// TLS to the sender.
#[derive(clap::Args, Debug)]
struct TlsArgs {
    /// PEM CA certificate(s) that sign the sender's certificate: turns on TLS. The sender's
    /// certificate must name the host of --sender (or --tls-server-name).
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// PEM certificate this receiver presents, for a sender that requires client
    /// certificates. Its common name or a DNS subject alternative name must be --name.
    #[arg(long, value_name = "FILE", requires = "tls_key", requires = "tls_ca")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The name the sender's certificate must carry, when it is not the host in --sender
    /// (for example when connecting by IP address).
    #[arg(long, value_name = "NAME", requires = "tls_ca")]
    tls_server_name: Option<String>,
}

impl TlsArgs {
    fn load(self) -> Result<Option<wal_receiver::follow::TlsClient>, Fatal> {
        let Some(ca) = self.tls_ca else {
            return Ok(None);
        };
        let identity = match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
            _ => None,
        };
        let config = walship_common::tls::client_config(&ca, identity).map_err(|e| Fatal {
            code: exit::USAGE,
            message: e.to_string(),
        })?;
        Ok(Some(wal_receiver::follow::TlsClient {
            config,
            server_name: self.tls_server_name,
        }))
    }
}

fn parse_mapping(s: &str) -> Result<(PathBuf, PathBuf), String> {
    let (old, new) = s.split_once('=').ok_or("expected OLD=NEW")?;
    let (old, new) = (PathBuf::from(old), PathBuf::from(new));
    if !old.is_absolute() || !new.is_absolute() {
        return Err("both directories of a tablespace mapping must be absolute".into());
    }
    Ok((old, new))
}

/// `follow`'s runtime: one thread, which writes and fdatasyncs the store inline, as
/// pg_receivewal does. Handing each fdatasync to another thread (`block_in_place`) woke a
/// second thread per flush, and the served standby's task ran wherever that thread was.
fn follow_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

const STORE: &str = "WAL store";
const REPO: &str = "backup repository";

/// Refuses a WAL store or repository that others can reach (or, to write, that belongs to
/// another user) before the command touches it. `restore-wal` only warns: PostgreSQL runs
/// it for every segment, and a refusal there would stall the standby without hiding
/// anything the store's permissions have not already exposed.
fn check_access(command: &Command) -> Result<(), Fatal> {
    use wal_receiver::access::{check, Use};
    match command {
        Command::Follow(FollowArgs { wal_dir, .. }) | Command::Bootstrap { wal_dir, .. } => {
            check(wal_dir, STORE, Use::Write)
        }
        Command::Status { wal_dir, .. } => check(wal_dir, STORE, Use::Read),
        Command::Backup { repo, .. } => check(repo, REPO, Use::Write),
        Command::Restore { repo, .. }
        | Command::Backups { repo, .. }
        | Command::Prune { repo, .. }
        | Command::Verify { repo, .. } => check(repo, REPO, Use::Read),
        // Warned about once a file is served (PostgreSQL polls for missing ones).
        Command::RestoreWal { .. } => Ok(()),
        // Reports what it finds instead.
        Command::Check { .. } => Ok(()),
    }
}

fn main() -> ExitCode {
    let cli: Cli = walship_common::config::parse();
    // Before anything is created: what this process creates is private.
    wal_receiver::access::init(if cli.allow_group_access {
        wal_receiver::access::Access::Group
    } else {
        wal_receiver::access::Access::Owner
    });
    logging::init(cli.log_format);
    if let Err(e) = check_access(&cli.command) {
        walship_common::report!("wal-receiver: {e}");
        return ExitCode::from(e.code);
    }
    let result = match cli.command {
        Command::Check {
            follow,
            repo,
            json,
            nagios,
        } => {
            use walship_common::check::{could_not_run, Format};
            let format = match (json, nagios) {
                (true, _) => Format::Json,
                (_, true) => Format::Nagios,
                _ => Format::Text,
            };
            let cfg = wal_receiver::check::CheckConfig {
                senders: follow.senders,
                name: follow.name,
                wal_dir: follow.wal_dir,
                tls_ca: follow.tls.tls_ca,
                tls_cert: follow.tls.tls_cert,
                tls_key: follow.tls.tls_key,
                tls_server_name: follow.tls.tls_server_name,
                serve_standby: follow.serve_standby,
                serve_standby_port: follow.serve_standby_port,
                keep_wal: follow.keep_wal,
                repo,
                metrics_listen: follow.metrics_listen,
            };
            let report = match runtime() {
                Ok(rt) => rt.block_on(wal_receiver::check::check(&cfg)),
                Err(e) => {
                    let e = format!("cannot start the runtime: {e}");
                    if let Some((line, code)) = could_not_run(format, &e) {
                        println!("{line}");
                        return ExitCode::from(code);
                    }
                    walship_common::report!("wal-receiver: {e}");
                    return ExitCode::from(exit::ERROR);
                }
            };
            let (text, code) = report.render(format);
            println!("{text}");
            return ExitCode::from(code);
        }
        Command::Follow(FollowArgs {
            senders,
            name,
            wal_dir,
            start_lsn,
            tls,
            serve_standby,
            serve_standby_port,
            keep_wal,
            metrics_listen,
        }) => tls.load().map_err(anyhow::Error::from).and_then(|tls| {
            let retention =
                wal_receiver::retention::resolve(&wal_dir, keep_wal, serve_standby.is_some())
                    .map_err(|message| Fatal {
                        code: exit::USAGE,
                        message,
                    })?;
            let serve = serve_standby
                .map(|s| ServeAddr::parse(&s, serve_standby_port))
                .transpose()
                .map_err(|message| Fatal {
                    code: exit::USAGE,
                    message,
                })?;
            let cfg = wal_receiver::follow::FollowConfig {
                senders,
                name,
                wal_dir,
                start_lsn,
                until: None,
                tls,
                serve,
                retention,
                metrics_listen,
            };
            follow_runtime()?.block_on(wal_receiver::follow::follow(cfg))
        }),
        Command::Bootstrap {
            senders,
            name,
            pgdata,
            wal_dir,
            tablespace_mapping,
            tls,
            standby_feed,
            serve_standby,
            serve_standby_port,
            server,
        } => wal_receiver::pgconf::own_program()
            .map_err(anyhow::Error::from)
            .and_then(|restore_bin| {
                let tls = tls.load()?;
                let serve = if standby_feed == "stream" {
                    let addr = match serve_standby {
                        Some(s) => s,
                        None => std::path::absolute(&wal_dir)?.display().to_string(),
                    };
                    Some(
                        ServeAddr::parse(&addr, serve_standby_port).map_err(|message| Fatal {
                            code: exit::USAGE,
                            message,
                        })?,
                    )
                } else {
                    None
                };
                runtime()?.block_on(wal_receiver::bootstrap::bootstrap(
                    wal_receiver::bootstrap::BootstrapConfig {
                        senders,
                        name,
                        pgdata,
                        wal_dir,
                        tablespace_mapping,
                        tablespace_root: None,
                        restore_bin,
                        tls,
                        serve,
                        server: server.settings()?,
                    },
                ))
            }),
        Command::RestoreWal {
            wal_dir,
            file,
            dest,
            no_prefetch,
            promote_at_end,
        } => match wal_receiver::restore::restore_wal(
            &wal_dir,
            &file,
            &dest,
            !no_prefetch,
            promote_at_end,
        ) {
            Ok(true) => {
                if let Some(why) = wal_receiver::access::exposure(&wal_dir, STORE) {
                    tracing::warn!("{why}");
                }
                Ok(())
            }
            Ok(false) => {
                tracing::debug!("{file} is not in {}", wal_dir.display());
                return ExitCode::from(exit::ERROR);
            }
            Err(e) => Err(e),
        },
        Command::Status {
            wal_dir,
            json,
            standby,
            standby_password_file,
        } => match wal_receiver::status::status(&wal_dir).and_then(|s| {
            let Some(mut s) = s else { return Ok(None) };
            if let Some(conninfo) = standby {
                let password = standby_password_file.as_deref();
                if let Some(Err(e)) = password.map(walship_common::conninfo::read_password_file) {
                    return Err(Fatal {
                        code: exit::USAGE,
                        message: format!("--standby-password-file: {e}"),
                    }
                    .into());
                }
                s.standby_server = Some(
                    runtime()?.block_on(wal_receiver::status::query_standby(&conninfo, password)),
                );
            }
            Ok(Some(s))
        }) {
            Ok(Some(s)) if json => serde_json::to_string(&s)
                .map(|j| println!("{j}"))
                .map_err(Into::into),
            Ok(Some(s)) => {
                println!("{s}");
                Ok(())
            }
            Ok(None) => Err(anyhow::anyhow!(
                "{} holds no WAL store (no state file)",
                wal_dir.display()
            )),
            Err(e) => Err(e),
        },
        Command::Backup {
            senders,
            name,
            repo,
            keep,
            tls,
        } => (|| {
            let tls = tls.load()?;
            let record = runtime()?.block_on(wal_receiver::backup::backup(
                wal_receiver::backup::BackupConfig {
                    repo,
                    senders,
                    name,
                    tls,
                    keep,
                },
            ))?;
            println!(
                "backup {} complete: {} to {}, {} bytes stored as {}",
                record.id, record.start_lsn, record.stop_lsn, record.bytes, record.stored_bytes
            );
            Ok(())
        })(),
        Command::Restore {
            repo,
            pgdata,
            target_time,
            target_lsn,
            target_xid,
            target_name,
            target_action,
            backup,
            server,
        } => wal_receiver::pgconf::own_program()
            .map_err(anyhow::Error::from)
            .and_then(|restore_bin| {
                let b = wal_receiver::backup::restore(&wal_receiver::backup::RestoreConfig {
                    repo,
                    pgdata: pgdata.clone(),
                    target: wal_receiver::backup::Target {
                        time: target_time,
                        lsn: target_lsn,
                        xid: target_xid,
                        name: target_name,
                        action: target_action,
                    },
                    backup,
                    restore_bin,
                    server: server.settings()?,
                })?;
                println!(
                    "restored backup {} into {}; start it with pg_ctl: it replays the archive to the target and takes the target action, or without a target replays all of it and then promotes itself",
                    b.id,
                    pgdata.display()
                );
                Ok(())
            }),
        Command::Backups { repo, json } => {
            wal_receiver::backup::listing(&repo).and_then(|l| {
                if json {
                    println!("{}", serde_json::to_string(&l)?);
                } else {
                    println!("{l}");
                }
                Ok(())
            })
        }
        Command::Prune { repo, keep } => wal_receiver::backup::prune(&repo, keep),
        Command::Verify { repo, full, json } => {
            wal_receiver::backup::verify(&repo, full).and_then(|v| {
                if json {
                    println!("{}", serde_json::to_string(&v)?);
                } else {
                    for p in &v.problems {
                        println!("PROBLEM: {p}");
                    }
                    println!(
                        "{} backups; files read {}, unchanged and skipped {}; WAL segments read {}, skipped {}; {} problem(s)",
                        v.backups,
                        v.files_read,
                        v.files_skipped,
                        v.segments_read,
                        v.segments_skipped,
                        v.problems.len()
                    );
                }
                if v.problems.is_empty() {
                    Ok(())
                } else {
                    Err(Fatal {
                        code: exit::STORE_CORRUPT,
                        message: format!("{} problem(s) found", v.problems.len()),
                    }
                    .into())
                }
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = e
                .downcast_ref::<Fatal>()
                .map(|f| f.code)
                .unwrap_or(exit::ERROR);
            walship_common::report!("wal-receiver: {e:#}");
            ExitCode::from(code)
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
