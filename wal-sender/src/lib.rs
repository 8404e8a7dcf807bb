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

pub use crate::session::Security;
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
    pub handshake_timeout: Duration,
    pub security: Security,
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
        pg,
        zstd_level: cfg.zstd_level,
        snapshot_zstd_level: cfg.snapshot_zstd_level,
        pgdata: cfg.pgdata.clone(),
        batch_delay: cfg.batch_delay,
        handshake_timeout: cfg.handshake_timeout,
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
                let sec = cfg.security.clone();
                tokio::spawn(async move {
                    session::run(sock, peer, scfg, sec).await;
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
