//! wal-sender: runs on the primary host and serves WAL to wal-receivers.
//!
//! - [`pgconn`]: a minimal client for PostgreSQL's replication protocol.
//! - [`session`]: one receiver's handshake, slot and stream.
//! - [`serve`]: the listener that runs a session per receiver.

pub mod pgconn;
pub mod session;
pub mod snapshot;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::session::SessionConfig;

/// What `wal-sender serve` needs.
pub struct ServeConfig {
    pub pg_conn: String,
    pub listen: String,
    pub zstd_level: i32,
    pub snapshot_zstd_level: i32,
    pub max_connections: usize,
    pub pgdata: Option<std::path::PathBuf>,
    pub batch_delay: Duration,
}

/// Accepts receivers until SIGINT or SIGTERM.
pub async fn serve(cfg: ServeConfig) -> Result<()> {
    let pg = pgconn::parse_conninfo(&cfg.pg_conn)?;
    match pgconn::ReplConn::connect(&pg, "walship_sender_check").await {
        Ok(mut c) => {
            let sys = c.identify_system().await?;
            info!(system_id = sys.system_id, timeline = sys.timeline, flush_lsn = %sys.flush_lsn,
                  server_version = %c.server_version, "connected to PostgreSQL");
            c.terminate().await;
        }
        Err(e) => warn!("cannot reach PostgreSQL yet ({e:#}); receivers will retry"),
    }
    let listener = TcpListener::bind(&cfg.listen)
        .await
        .with_context(|| format!("listen on {}", cfg.listen))?;
    info!(listen = %listener.local_addr()?, "wal-sender listening");
    let session_cfg = SessionConfig {
        pg,
        zstd_level: cfg.zstd_level,
        snapshot_zstd_level: cfg.snapshot_zstd_level,
        pgdata: cfg.pgdata.clone(),
        batch_delay: cfg.batch_delay,
    };
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
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
                    continue;
                };
                let scfg = session_cfg.clone();
                tokio::spawn(async move {
                    session::run(sock, peer, scfg).await;
                    drop(permit);
                });
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    info!("wal-sender stopping");
    Ok(())
}
