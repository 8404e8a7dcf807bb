//! wal-sender: runs on the primary host and serves WAL to wal-receivers.
//!
//! - [`metrics`]: what `--metrics-listen` exports.
//! - [`pgconn`]: a minimal client for PostgreSQL's replication protocol.
//! - [`session`]: one receiver's handshake, slot and stream.
//! - [`snapshot`]: the snapshot service and its SQL session.
//! - [`check`]: `wal-sender check`, every precondition of a working sender.
//! - [`status`]: `wal-sender status`, the receivers as the primary sees them.
//! - [`serve`]: the listener that runs a session per receiver, after checking at start-up
//!   that the primary can be used as configured.

pub mod check;
pub mod metrics;
pub mod pgconn;
pub mod session;
pub mod snapshot;
pub mod status;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{info, warn};
use walship_common::conninfo::Settings;
use walship_common::pgclient;
use walship_common::protocol::ErrorCode;

use crate::metrics::{Refused, SenderMetrics};
use crate::pgconn::ReplConn;
pub use crate::session::Security;
use crate::session::SessionConfig;

/// The exit code of `serve` when it cannot use the primary as configured (see
/// [`SetupFailure`]); the receivers' exit code for the same cause has the same number.
pub const EXIT_SETUP: u8 = 12;

/// What `wal-sender serve` needs.
pub struct ServeConfig {
    /// How to connect to the primary.
    pub pg: Settings,
    pub listen: String,
    pub zstd_level: i32,
    pub snapshot_zstd_level: i32,
    pub max_connections: usize,
    pub pgdata: Option<std::path::PathBuf>,
    pub batch_delay: Duration,
    pub handshake_timeout: Duration,
    pub security: Security,
    /// Serve Prometheus metrics at this HOST:PORT (`/metrics`).
    pub metrics_listen: Option<String>,
}

/// `serve` found at start-up that it cannot use the primary as configured (a password, a
/// role, a database, a setting): retrying cannot help. The message names the fix.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SetupFailure(pub String);

/// Accepts receivers until SIGINT or SIGTERM.
///
/// Under a service manager (`Type=notify`) it reports ready once the start-up checks have
/// passed and the listener is bound, and stopping at the signal. Sessions end with the
/// process: each one's replication connection closes, and PostgreSQL releases the slot.
pub async fn serve(cfg: ServeConfig) -> Result<()> {
    // From the start: a SIGTERM during the checks stops cleanly once they are done.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let metrics = Arc::new(SenderMetrics::default());
    if let Some(addr) = &cfg.metrics_listen {
        let mut registry = walship_common::metrics::Registry::default();
        metrics.register(&mut registry);
        walship_common::metrics::serve(addr, registry)?;
        tokio::spawn(metrics.clone().poll_slots(cfg.pg.clone()));
    }
    check_primary(&cfg.pg, cfg.pgdata.as_deref()).await?;
    let listener = TcpListener::bind(&cfg.listen)
        .await
        .with_context(|| format!("listen on {}", cfg.listen))?;
    let local = listener.local_addr()?;
    match (&cfg.security.tls, cfg.security.client_auth) {
        (Some(_), true) => {
            info!(listen = %local, "wal-sender listening: TLS, client certificates required (a receiver acts only under a name its certificate carries)")
        }
        (Some(_), false) => {
            info!(listen = %local, "wal-sender listening: TLS; client certificates are not required, so any client that reaches this port can act as any receiver")
        }
        (None, _) if local.ip().is_loopback() => {
            info!(listen = %local, "wal-sender listening: plaintext, loopback only")
        }
        (None, _) => {
            warn!(listen = %local, "wal-sender listening WITHOUT TLS on a non-loopback address (--insecure-listen): WAL and snapshots travel unencrypted and receivers are not authenticated")
        }
    }
    let session_cfg = SessionConfig {
        pg: cfg.pg.clone(),
        zstd_level: cfg.zstd_level,
        snapshot_zstd_level: cfg.snapshot_zstd_level,
        pgdata: cfg.pgdata.clone(),
        batch_delay: cfg.batch_delay,
        handshake_timeout: cfg.handshake_timeout,
        metrics: metrics.clone(),
    };
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    walship_common::service::ready(&format!("listening on {local}"));
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (sock, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    warn!(%peer, max = cfg.max_connections, "too many connections; closing this one");
                    metrics.refused(Refused::TooManyConnections);
                    continue;
                };
                let scfg = session_cfg.clone();
                let sec = cfg.security.clone();
                tokio::spawn(async move {
                    let m = scfg.metrics.clone();
                    m.connection(1);
                    session::run(sock, peer, scfg, sec).await;
                    m.connection(-1);
                    drop(permit);
                });
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    info!("wal-sender stopping");
    walship_common::service::stopping(&format!(
        "stopping: closing {} receiver connection(s)",
        cfg.max_connections - slots.available_permits()
    ));
    Ok(())
}

/// Checks at start-up that the primary can be used, with the replication connection and
/// then the SQL session that snapshots use. A problem retrying cannot fix is an error
/// ([`SetupFailure`]), so that a service manager sees the failure; anything else (the
/// server is not up yet) is a warning, and receivers will retry. Missing grants that only
/// snapshots need are warnings too: following works without them.
async fn check_primary(pg: &Settings, pgdata: Option<&std::path::Path>) -> Result<()> {
    info!(pg_conn = %pg, "checking the connection to PostgreSQL");
    let judge = |e: anyhow::Error| -> Result<()> {
        if e.is::<SetupFailure>() {
            return Err(e);
        }
        match session::classify(&e) {
            (ErrorCode::Setup, text) => Err(SetupFailure(text).into()),
            (_, text) => {
                warn!("cannot reach PostgreSQL yet ({text}); receivers will retry");
                Ok(())
            }
        }
    };
    if let Err(e) = check_replication(pg).await {
        judge(e)?;
        return Ok(());
    }
    if let Err(e) = check_sql(pg, pgdata).await {
        judge(e)?;
    }
    Ok(())
}

async fn check_replication(pg: &Settings) -> Result<()> {
    let mut c = ReplConn::connect(pg, "walship_sender_check")
        .await
        .context("open a replication connection")?;
    let sys = c.identify_system().await?;
    let wal_level = c.show("wal_level").await?;
    let max_slots = c.show("max_replication_slots").await?;
    info!(system_id = sys.system_id, timeline = sys.timeline, flush_lsn = %sys.flush_lsn,
          server_version = %c.server_version, "connected to PostgreSQL");
    c.terminate().await;
    if wal_level == "minimal" {
        return Err(SetupFailure(
            "the primary runs with wal_level = minimal, which keeps no WAL for replication: set wal_level = replica and restart PostgreSQL".into(),
        )
        .into());
    }
    if max_slots.trim() == "0" {
        return Err(SetupFailure(
            "the primary has max_replication_slots = 0: set it to at least the number of receivers (each has the slot walship_NAME) and restart PostgreSQL".into(),
        )
        .into());
    }
    Ok(())
}

async fn check_sql(pg: &Settings, pgdata: Option<&std::path::Path>) -> Result<()> {
    let (sql, conn) =
        pgclient::connect_sql(pg, snapshot::DEFAULT_DBNAME, Some("walship_sender_check"))
            .await
            .context("open the SQL session that snapshots use")?;
    let grants = sql
        .query_one(
            "SELECT has_function_privilege('pg_backup_start(text, boolean)', 'EXECUTE') \
                AND has_function_privilege('pg_backup_stop(boolean)', 'EXECUTE')",
            &[],
        )
        .await
        .map(|r| r.get::<_, bool>(0));
    match grants {
        Ok(true) => match snapshot::data_directory(&sql, pgdata).await {
            Ok(dir) => info!(pgdata = %dir.display(), "snapshots can be served"),
            Err(e) => warn!("bootstrap and backup will fail until this is fixed: {}", session::classify(&e).1),
        },
        Ok(false) => warn!(
            "the role may not run pg_backup_start and pg_backup_stop: bootstrap and backup will fail until it is granted EXECUTE on both (see the README)"
        ),
        Err(e) => warn!("cannot check the role's grants for snapshots: {e}"),
    }
    drop(sql);
    let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
    Ok(())
}
