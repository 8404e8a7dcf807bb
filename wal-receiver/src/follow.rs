//! `wal-receiver follow`: keep a WAL store current from a wal-sender, across any outage.
//!
//! One loop reads frames from the sender, writes them, flushes and acknowledges, without a
//! hop to another task. It writes every frame already whole in its read buffer, then
//! flushes once (group commit: while it waits for fdatasync more WAL queues up, so fsyncs
//! per second stay bounded however small the messages are), and only then acknowledges the
//! new flush position. Frame reads are cancellation-safe, so the same loop also waits for
//! the served standby's feedback.
//!
//! After any failure that is not fatal the receiver reconnects with exponential backoff and
//! resumes at the store's persisted flush position: nothing acknowledged is asked for again,
//! nothing is skipped.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::{info, warn};
use walship_common::frame::{Frame, FrameEncoder, FrameError, FrameReader};
use walship_common::protocol::{validate_name, ErrorCode, Message, Mode, PROTOCOL_VERSION};
use walship_common::service;
use walship_common::timeline::History;
use walship_common::tls::{self, Reader, Writer};
use walship_common::{Lsn, TimelineId, WalSegSize};

use crate::metrics::{ErrorKind, FollowMetrics};
use crate::retention::{Retention, StandbyReplay};
use crate::serve::{self, Feed, Feedback, ServeAddr, StoreView};
use crate::store::{Store, StoreError, StoreState};
use crate::{exit, Fatal};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// The sender sends a keepalive at least every few seconds; silence this long means the
/// connection is dead even if TCP has not noticed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Flush at least this often while WAL keeps arriving (bytes written but not flushed).
const MAX_UNFLUSHED: u64 = 8 << 20;
const PROGRESS_INTERVAL: Duration = Duration::from_secs(10);
/// The standby's feedback is written for `status` at most this often.
const STANDBY_FILE_INTERVAL: Duration = Duration::from_secs(1);
/// At a stop, how long the served standby has to close its connection once told.
const STANDBY_STOP_WAIT: Duration = Duration::from_secs(5);

pub struct FollowConfig {
    /// The senders to choose from (see [`choose`]); at least one.
    pub senders: Vec<String>,
    pub name: String,
    pub wal_dir: PathBuf,
    pub start_lsn: Option<Lsn>,
    /// Stop once the store is flushed to here (bootstrap's stop LSN); `None` follows forever.
    pub until: Option<Lsn>,
    /// TLS to the sender; `None` is plaintext.
    pub tls: Option<TlsClient>,
    /// Serve a standby over PostgreSQL's streaming replication protocol at this address.
    pub serve: Option<ServeAddr>,
    /// What the store keeps (see [`crate::retention`]); `None` keeps everything.
    pub retention: Option<Retention>,
    /// Serve Prometheus metrics at this HOST:PORT (see [`crate::metrics`]).
    pub metrics_listen: Option<String>,
}

/// How a stream with the sender broke, when no frame or I/O error says it.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("sender reported an error: {0}")]
    Reported(String),
    #[error("no message from the sender for {0:?}; assuming the connection is dead")]
    Silent(Duration),
    #[error("sender closed the connection")]
    Closed,
}

/// How the receiver connects with TLS.
#[derive(Clone)]
pub struct TlsClient {
    pub config: Arc<rustls::ClientConfig>,
    /// The name the sender's certificate must carry; default: the host of `--sender`.
    pub server_name: Option<String>,
}

/// A TLS failure: fatal (exit 9) when retrying cannot help, otherwise an error to retry.
fn tls_failure(e: anyhow::Error, sender: &str) -> anyhow::Error {
    let text = tls::explain(e.as_ref(), "the sender");
    if tls::is_configuration_error(e.as_ref()) {
        return Fatal {
            code: exit::AUTH,
            message: format!(
                "{} (sender {sender})",
                text.unwrap_or_else(|| format!("{e:#}"))
            ),
        }
        .into();
    }
    match text {
        Some(t) => e.context(t),
        None => e,
    }
}

/// Maps a store error to the exit code that tells the operator what is wrong.
pub fn store_fatal(e: StoreError) -> anyhow::Error {
    let code = match &e {
        StoreError::Locked { .. } => exit::STORE_LOCKED,
        StoreError::CorruptState { .. } | StoreError::Inconsistent { .. } => exit::STORE_CORRUPT,
        StoreError::Seal(_) | StoreError::Durable(_) => exit::DISK,
        // The directory given cannot be a store: a matter of configuration, not the disk.
        StoreError::Unusable { .. } => exit::USAGE,
    };
    let mut message = e.to_string();
    if message.contains(&format!("os error {}", nix::libc::ENOSPC)) {
        message.push_str(
            ". The store's file system is full; nothing unsynced was acknowledged. Free space, then start wal-receiver again: it resumes at its persisted position",
        );
    }
    Fatal { code, message }.into()
}

/// Follows the sender until a signal or a fatal error.
///
/// Under a service manager (`Type=notify`; never for a bootstrap's catch-up, which has
/// `until`) it reports ready once the store is open and recovered and the standby's socket
/// listens, before any sender answers: a receiver is up while its primary is down, and says
/// so in its status. On SIGTERM or SIGINT the session is dropped at an await point, where
/// everything written has been fsynced (a batch is written and flushed without one), so only
/// the acknowledgement of the last flush may not have left; the store is flushed and closed,
/// the served standby is told the receiver is stopping, and `follow` returns `Ok`.
pub async fn follow(cfg: FollowConfig) -> Result<()> {
    validate_name(&cfg.name).map_err(|m| Fatal {
        code: exit::USAGE,
        message: m,
    })?;
    // From the start: a SIGTERM while the store is recovered stops cleanly afterwards.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let wal_dir = cfg.wal_dir.clone();
    let mut store = tokio::task::spawn_blocking(move || Store::open(&wal_dir))
        .await?
        .map_err(store_fatal)?;
    info!(wal_dir = %cfg.wal_dir.display(), flush_lsn = %store.flush_lsn(), "WAL store opened");
    if let Some(r) = &cfg.retention {
        if let Some(replay) = &r.standby {
            // What a standby reported before this run still needs its WAL.
            *replay.lock().unwrap_or_else(|p| p.into_inner()) =
                crate::retention::recorded_standby_replay(&cfg.wal_dir);
        }
        info!(keep_wal = %r.setting, "WAL retention");
        store.set_retention(r.clone()).map_err(store_fatal)?;
    }
    let mut feed = match &cfg.serve {
        Some(addr) => Some(serve::start(addr, &cfg.wal_dir).await.map_err(|e| Fatal {
            code: exit::USAGE,
            message: format!("cannot serve the standby: {e:#}"),
        })?),
        None => None,
    };
    publish(feed.as_ref(), &store);
    let keep_bytes = match cfg.retention.as_ref().map(|r| r.keep) {
        Some(crate::retention::KeepWal::Size(b)) => Some(b),
        _ => None,
    };
    let metrics = Arc::new(FollowMetrics::new(&cfg.name, &cfg.wal_dir, keep_bytes));
    let timeline_of = |store: &Store| store.state().map(|s| s.timeline.0).unwrap_or(0);
    metrics.flushed(store.flush_lsn(), timeline_of(&store));
    if let Some(f) = &feed {
        metrics.watch_standby(f.feedback.clone());
    }
    if let Some(addr) = &cfg.metrics_listen {
        metrics.serve(addr).map_err(|e| Fatal {
            code: exit::USAGE,
            message: e.to_string(),
        })?;
    }
    if cfg.until.is_none() {
        let held = match store.state() {
            Some(_) => format!("flushed to {}", store.flush_lsn()),
            None => "empty".to_owned(),
        };
        service::ready(&format!(
            "store open, {held}; connecting to {}",
            cfg.senders.join(", ")
        ));
    }
    let mut backoff = BACKOFF_MIN;
    loop {
        let before = store.flush_lsn();
        let result = tokio::select! {
            r = session(&mut store, &cfg, feed.as_mut(), &metrics) => r,
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        };
        metrics.connected(false);
        match result {
            // Never touch the store after a fatal error: a failed fsync is not retried.
            Err(e) if e.downcast_ref::<Fatal>().is_some() => return Err(e),
            Err(e) => {
                warn!("{e:#}; reconnecting in {backoff:?}");
                metrics.failed(&e);
                tell(&cfg, || {
                    format!(
                        "waiting for sender: {e:#}; flushed to {}; retrying in {backoff:?}",
                        store.flush_lsn()
                    )
                });
            }
            Ok(Outcome::Reached) => break,
            Ok(Outcome::TimelineEnded) => {
                publish(feed.as_ref(), &store);
                backoff = BACKOFF_MIN;
                continue;
            }
        }
        // WAL written before the failure was verified and is contiguous: make it durable, so
        // the next session resumes exactly where the store ends.
        store.flush().map_err(store_fatal)?;
        publish(feed.as_ref(), &store);
        metrics.flushed(store.flush_lsn(), timeline_of(&store));
        if store.flush_lsn() > before {
            backoff = BACKOFF_MIN;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
    // Signal: make what was written durable (nothing unflushed was acknowledged anyway).
    if cfg.until.is_none() {
        service::stopping(&format!("stopping: flushing to {}", store.write_lsn()));
    }
    let flush_lsn = store.flush().map_err(store_fatal)?;
    publish(feed.as_ref(), &store);
    store.close().map_err(store_fatal)?;
    if let Some(f) = feed {
        f.stop(STANDBY_STOP_WAIT).await;
    }
    info!(%flush_lsn, "wal-receiver stopped");
    Ok(())
}

/// Tells the service manager what `follow` does now; a bootstrap's catch-up (with `until`)
/// tells nothing.
fn tell(cfg: &FollowConfig, status: impl FnOnce() -> String) {
    if cfg.until.is_none() {
        service::status(&status());
    }
}

pub struct Link {
    wr: Writer,
    enc: FrameEncoder,
    buf: Vec<u8>,
}

impl Link {
    pub async fn send(&mut self, m: &Message) -> Result<()> {
        self.buf.clear();
        m.encode(&mut self.enc, &mut self.buf)?;
        self.wr.write_all(&self.buf).await.context("send to sender")
    }
}

pub fn sender_error(code: ErrorCode, message: String) -> anyhow::Error {
    match code {
        ErrorCode::WalGone => Fatal {
            code: exit::WAL_GONE,
            message: format!("the primary no longer has the WAL this receiver needs: {message}"),
        }
        .into(),
        ErrorCode::Version | ErrorCode::BadName | ErrorCode::BadRequest => Fatal {
            code: exit::MISMATCH,
            message: format!("the sender refused this receiver: {message}"),
        }
        .into(),
        ErrorCode::Auth => Fatal {
            code: exit::AUTH,
            message: format!("the sender refused this receiver: {message}"),
        }
        .into(),
        ErrorCode::Setup => Fatal {
            code: exit::SETUP,
            message: format!(
                "the sender cannot use its PostgreSQL server as configured: {message}"
            ),
        }
        .into(),
        ErrorCode::Other => StreamError::Reported(message).into(),
    }
}

/// One connection: handshake, then receive, store, flush and acknowledge until it fails.
/// What the sender said about its primary.
pub struct ServerInfo {
    pub system_id: u64,
    pub timeline: TimelineId,
    pub seg_size: WalSegSize,
    pub flush_lsn: Lsn,
    /// PostgreSQL major version, from the server's version string (0 if unreadable).
    pub pg_version: u32,
    /// The server is a standby, not a primary.
    pub in_recovery: bool,
}

/// An open connection to a sender, past the handshake.
pub struct Connection {
    pub frames: FrameReader<Reader>,
    pub link: Link,
    pub info: ServerInfo,
}

/// Connects to `sender`, says hello in `mode` and reads its `ServerInfo`.
pub async fn connect(
    sender: &str,
    name: &str,
    mode: Mode,
    tls_client: Option<&TlsClient>,
) -> Result<Connection> {
    let sock = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(sender))
        .await
        .map_err(|_| anyhow!("connecting to {sender} timed out"))?
        .with_context(|| format!("connect to sender {sender}"))?;
    sock.set_nodelay(true)?;
    let (rd, wr) = match tls_client {
        None => tls::split(sock),
        Some(t) => {
            let host = t
                .server_name
                .clone()
                .unwrap_or_else(|| tls::host_of(sender).to_owned());
            let server_name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| Fatal {
                code: exit::USAGE,
                message: format!("{host:?} cannot be checked against a certificate: {e}; give --tls-server-name"),
            })?;
            let stream = tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                tokio_rustls::TlsConnector::from(t.config.clone()).connect(server_name, sock),
            )
            .await
            .map_err(|_| anyhow!("TLS handshake with {sender} timed out"))?
            .map_err(|e| tls_failure(anyhow::Error::from(e).context("TLS handshake"), sender))?;
            tls::split(stream)
        }
    };
    let mut link = Link {
        wr,
        enc: FrameEncoder::new(1)?,
        buf: Vec::new(),
    };
    let mut frames = FrameReader::new(rd)?;
    link.send(&Message::Hello {
        version: PROTOCOL_VERSION,
        name: name.to_owned(),
        mode,
    })
    .await
    .map_err(|e| tls_failure(e, sender))?;
    let frame = tokio::time::timeout(HANDSHAKE_TIMEOUT, frames.read_frame())
        .await
        .map_err(|_| anyhow!("sender did not answer the handshake within {HANDSHAKE_TIMEOUT:?}"))?
        // With TLS 1.3 a refused client certificate shows here, at the first read.
        .map_err(|e| tls_failure(e.into(), sender))?
        .ok_or_else(|| anyhow!("sender closed the connection during the handshake"))?;
    let info = match Message::decode(&frame)? {
        Message::ServerInfo {
            version,
            system_id,
            timeline,
            seg_size,
            flush_lsn,
            server_version,
            in_recovery,
        } => {
            if version != PROTOCOL_VERSION {
                return Err(Fatal { code: exit::MISMATCH, message: format!("sender speaks walship protocol {version}, this receiver {PROTOCOL_VERSION}") }.into());
            }
            let seg = WalSegSize::new(seg_size as u64).ok_or_else(|| Fatal {
                code: exit::MISMATCH,
                message: format!("sender reports an invalid WAL segment size {seg_size}"),
            })?;
            info!(%sender, system_id, timeline, %flush_lsn, %server_version, in_recovery, "connected to sender");
            ServerInfo {
                in_recovery,
                pg_version: pg_major_version(&server_version),
                system_id,
                timeline: TimelineId(timeline),
                seg_size: seg,
                flush_lsn,
            }
        }
        Message::Error { code, message } => return Err(sender_error(code, message)),
        other => bail!("expected ServerInfo from sender, got {:?}", other.kind()),
    };
    Ok(Connection { frames, link, info })
}

/// The major version in a PostgreSQL version string ("15.18 (Debian ...)" is 15); 0 if
/// there is none.
pub fn pg_major_version(v: &str) -> u32 {
    let digits: String = v.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().unwrap_or(0)
}

/// Refuses a sender whose primary is not the cluster the store holds.
pub fn check_same_cluster(
    st: &StoreState,
    info: &ServerInfo,
    wal_dir: &std::path::Path,
) -> Result<()> {
    // The version first: a primary upgraded to another major (pg_upgrade) has another
    // system identifier too, and the version is what the operator needs to hear about.
    if st.pg_version != 0 && info.pg_version != 0 && st.pg_version != info.pg_version {
        return Err(Fatal {
            code: exit::MISMATCH,
            message: format!(
                "the primary runs PostgreSQL {} but the store holds WAL of PostgreSQL {}; WAL formats differ between major versions. Use another --wal-dir",
                info.pg_version, st.pg_version
            ),
        }
        .into());
    }
    if st.system_id != info.system_id {
        return Err(Fatal { code: exit::MISMATCH, message: format!(
            "the sender's primary has system identifier {}, but the WAL store {} holds WAL of system {}; refusing to mix clusters. Use another --wal-dir for this primary",
            info.system_id, wal_dir.display(), st.system_id
        ) }.into());
    }
    if st.seg_size != info.seg_size {
        return Err(Fatal {
            code: exit::MISMATCH,
            message: format!(
                "the primary uses {}-byte WAL segments but the store holds {}-byte segments",
                info.seg_size.bytes(),
                st.seg_size.bytes()
            ),
        }
        .into());
    }
    Ok(())
}

/// A sender as [`choose`] sees it.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub sender: String,
    pub timeline: TimelineId,
    pub in_recovery: bool,
}

/// Picks the sender to follow among several: the one whose server is a primary on the
/// highest timeline, never one below `store_timeline`. `Err` says why none can be chosen;
/// the caller waits and asks again. Two primaries on the highest timeline are refused: only
/// a timeline can tell which one is the true leader.
pub fn pick(cands: &[Candidate], store_timeline: Option<TimelineId>) -> Result<usize, String> {
    let describe = |c: &Candidate| {
        format!(
            "{} ({} on timeline {})",
            c.sender,
            if c.in_recovery { "standby" } else { "primary" },
            c.timeline.0
        )
    };
    let primaries: Vec<usize> = (0..cands.len())
        .filter(|&i| !cands[i].in_recovery)
        .collect();
    let Some(top) = primaries.iter().map(|&i| cands[i].timeline).max() else {
        let seen: Vec<String> = cands.iter().map(describe).collect();
        return Err(format!(
            "no sender reports a primary (reachable: {}); waiting for one",
            if seen.is_empty() {
                "none".to_owned()
            } else {
                seen.join(", ")
            }
        ));
    };
    let at_top: Vec<usize> = primaries
        .iter()
        .copied()
        .filter(|&i| cands[i].timeline == top)
        .collect();
    if at_top.len() > 1 {
        let names: Vec<String> = at_top.iter().map(|&i| describe(&cands[i])).collect();
        return Err(format!(
            "SPLIT BRAIN: {} all claim to be primary on timeline {}; following none of them until one can be chosen by timeline. Stop all but one",
            names.join(", "),
            top.0
        ));
    }
    if let Some(st) = store_timeline {
        if top < st {
            return Err(format!(
                "the only primary, {}, is on timeline {}, below this store's timeline {}: it is on an older history (an old primary started again?); not following it",
                describe(&cands[at_top[0]]),
                top.0,
                st.0
            ));
        }
    }
    if primaries.len() > 1 {
        let names: Vec<String> = primaries.iter().map(|&i| describe(&cands[i])).collect();
        warn!(
            "SEVERAL PRIMARIES: {}; following {}, the one on the highest timeline",
            names.join(", "),
            cands[at_top[0]].sender
        );
    }
    Ok(at_top[0])
}

/// Connects to the sender to follow. With one sender that is the one; with several, every
/// sender is asked and [`pick`] chooses.
pub async fn choose(
    senders: &[String],
    name: &str,
    mode: Mode,
    tls_client: Option<&TlsClient>,
    store_timeline: Option<TimelineId>,
) -> Result<(String, Connection)> {
    if let [only] = senders {
        return Ok((only.clone(), connect(only, name, mode, tls_client).await?));
    }
    let mut set = tokio::task::JoinSet::new();
    for (i, sender) in senders.iter().enumerate() {
        let (sender, name, tls) = (sender.clone(), name.to_owned(), tls_client.cloned());
        set.spawn(async move { (i, connect(&sender, &name, mode, tls.as_ref()).await) });
    }
    let mut conns: Vec<(usize, Connection)> = Vec::new();
    let mut fatal = None;
    while let Some(joined) = set.join_next().await {
        let (i, result) = joined?;
        match result {
            Ok(c) => conns.push((i, c)),
            Err(e) => {
                warn!(sender = %senders[i], "{e:#}");
                if e.downcast_ref::<Fatal>().is_some() {
                    fatal = Some(e);
                }
            }
        }
    }
    if conns.is_empty() {
        return Err(fatal.unwrap_or_else(|| anyhow!("no sender is reachable")));
    }
    conns.sort_by_key(|(i, _)| *i);
    let cands: Vec<Candidate> = conns
        .iter()
        .map(|(i, c)| Candidate {
            sender: senders[*i].clone(),
            timeline: c.info.timeline,
            in_recovery: c.info.in_recovery,
        })
        .collect();
    match pick(&cands, store_timeline) {
        Ok(k) => {
            let (i, conn) = conns.swap_remove(k);
            info!(sender = %senders[i], timeline = conn.info.timeline.0, "following this sender's primary");
            Ok((senders[i].clone(), conn))
        }
        Err(why) => {
            tracing::error!("{why}");
            Err(anyhow!("{why}"))
        }
    }
}

/// Refuses to mix histories: the store at `timeline`, flushed to `flush`, may follow the
/// history `hist` only if it holds nothing past the point where `hist` left its timeline.
fn check_not_diverged(
    timeline: TimelineId,
    flush: Lsn,
    hist: &History,
    sender: &str,
) -> Result<(Lsn, TimelineId)> {
    let Some((switch, next)) = hist.switch_from(timeline) else {
        return Err(Fatal {
            code: exit::DIVERGED,
            message: format!(
                "the sender {sender} is on timeline {}, whose history does not contain this store's timeline {}: the histories diverged. Bootstrap this receiver again from the new primary",
                hist.of.0, timeline.0
            ),
        }
        .into());
    };
    if flush > switch {
        return Err(Fatal {
            code: exit::DIVERGED,
            message: format!(
                "this store holds WAL on timeline {} up to {flush}, but timeline {} forked from it at {switch} (the fork LSN): {} bytes past the fork are on a history the new primary does not have. Refusing to follow timeline {}; bootstrap this receiver again ('wal-receiver bootstrap' into a new --wal-dir and data directory)",
                timeline.0,
                next.0,
                flush.saturating_sub(switch),
                hist.of.0
            ),
        }
        .into());
    }
    Ok((switch, next))
}

/// One connection: handshake, then receive, store, flush and acknowledge until it fails,
/// or until the store reaches `cfg.until`.
/// What the standby server is told of the store, with the persisted flush position.
fn view_of(store: &Store) -> Option<StoreView> {
    store.state().map(|st| StoreView {
        system_id: st.system_id,
        timeline: st.timeline,
        seg_size: st.seg_size,
        pg_version: st.pg_version,
        flush_lsn: store.flush_lsn(),
    })
}

/// Tells the standby server what the store holds durably.
fn publish(feed: Option<&Feed>, store: &Store) {
    if let (Some(f), Some(v)) = (feed, view_of(store)) {
        f.view.send_replace(Some(v));
    }
}

/// Waits for new feedback from the standby; never returns without a standby server.
async fn next_feedback(feed: &mut Option<&mut Feed>) -> Feedback {
    match feed {
        Some(f) => {
            if f.feedback.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
            f.feedback.borrow_and_update().clone()
        }
        None => std::future::pending().await,
    }
}

/// The standby's feedback as it travels upstream.
fn feedback_message(f: &Feedback) -> Message {
    Message::StandbyFeedback {
        apply_lsn: f.apply_lsn,
        xmin: f.xmin,
        xmin_epoch: f.xmin_epoch,
        catalog_xmin: f.catalog_xmin,
        catalog_xmin_epoch: f.catalog_xmin_epoch,
    }
}

/// Where `status` finds what the standby last reported.
pub const STANDBY_FILE: &str = "standby.json";

/// Records the standby's feedback for `status`. Informational: not fsynced.
fn write_standby_file(dir: &std::path::Path, f: &Feedback) {
    let json = serde_json::json!({
        "application_name": f.application_name,
        "connected": f.connected,
        "write_lsn": f.write_lsn.to_string(),
        "flush_lsn": f.flush_lsn.to_string(),
        "replay_lsn": f.apply_lsn.to_string(),
        "reply_time": f.reply_time,
        "xmin": f.xmin,
    });
    let tmp = dir.join(format!("{STANDBY_FILE}.tmp"));
    if std::fs::write(&tmp, json.to_string()).is_ok() {
        let _ = std::fs::rename(&tmp, dir.join(STANDBY_FILE));
    }
}

async fn session(
    store: &mut Store,
    cfg: &FollowConfig,
    feed: Option<&mut Feed>,
    metrics: &FollowMetrics,
) -> Result<Outcome> {
    let store_timeline = store.state().map(|s| s.timeline);
    let (
        sender,
        Connection {
            mut frames,
            mut link,
            info,
        },
    ) = choose(
        &cfg.senders,
        &cfg.name,
        Mode::Follow,
        cfg.tls.as_ref(),
        store_timeline,
    )
    .await
    .map_err(|e| {
        if e.is::<Fatal>() {
            e
        } else {
            e.context(ErrorKind::Connect)
        }
    })?;
    metrics.message(info.flush_lsn, None);
    let (system_id, timeline, seg_size, server_flush_lsn) =
        (info.system_id, info.timeline, info.seg_size, info.flush_lsn);
    match store.state() {
        Some(st) => check_same_cluster(st, &info, &cfg.wal_dir)?,
        None => {
            let start_lsn = cfg
                .start_lsn
                .unwrap_or(server_flush_lsn)
                .segment_start(seg_size);
            store
                .init(system_id, timeline, seg_size, info.pg_version, start_lsn)
                .map_err(store_fatal)?;
            info!(%start_lsn, "initialised empty WAL store");
        }
    }
    let store_timeline = store.state().map(|s| s.timeline).unwrap_or(timeline);
    if timeline < store_timeline {
        bail!(
            "the sender {sender} serves timeline {}, below this store's timeline {}: its server is on an older history (an old primary started again?); not following it",
            timeline.0,
            store_timeline.0
        );
    }
    if timeline > store_timeline {
        follow_history(store, &sender, timeline, &mut link, &mut frames).await?;
        publish(feed.as_deref(), store);
    }
    let timeline = store.state().map(|s| s.timeline).unwrap_or(timeline);
    let start_lsn = store.flush_lsn();
    if cfg.until.is_some_and(|until| start_lsn >= until) {
        return Ok(Outcome::Reached);
    }
    link.send(&Message::StartStream {
        start_lsn,
        timeline: timeline.0,
    })
    .await?;
    link.send(&Message::Ack {
        write_lsn: start_lsn,
        flush_lsn: start_lsn,
    })
    .await?;
    info!(%start_lsn, timeline = timeline.0, "requesting WAL");
    metrics.connected(true);
    metrics.flushed(start_lsn, timeline.0);
    tell(cfg, || {
        format!(
            "streaming from {start_lsn} on timeline {} from {sender}",
            timeline.0
        )
    });
    // The sender of this session has not heard from the standby yet.
    if let Some(f) = feed.as_deref() {
        let fb = f.feedback.borrow().clone();
        if fb.connected {
            link.send(&feedback_message(&fb)).await?;
        }
    }

    stream(
        store,
        &mut frames,
        &mut link,
        server_flush_lsn,
        cfg.until,
        feed,
        &cfg.wal_dir,
        cfg.retention.as_ref().and_then(|r| r.standby.as_ref()),
        metrics,
    )
    .await
}

/// A frame read from the sender, as a message and the bytes it took on the wire.
fn message_of(read: Result<Option<Frame>, FrameError>) -> Result<(Message, u64)> {
    match read {
        Ok(Some(frame)) => Message::decode(&frame)
            .map(|m| (m, frame.wire_bytes))
            .map_err(anyhow::Error::from),
        Ok(None) => Err(StreamError::Closed.into()),
        Err(e) => Err(anyhow::Error::from(e).context("bad frame from sender")),
    }
}

/// How a session ended without an error.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// The store reached the position it was asked to reach.
    Reached,
    /// The timeline streamed ended; the next session continues on the next one.
    TimelineEnded,
}

/// Asks the sender for timeline `t`'s history file.
async fn get_history(
    sender: &str,
    t: TimelineId,
    link: &mut Link,
    frames: &mut FrameReader<Reader>,
) -> Result<Vec<u8>> {
    link.send(&Message::GetHistory { timeline: t.0 }).await?;
    let frame = tokio::time::timeout(HANDSHAKE_TIMEOUT, frames.read_frame())
        .await
        .map_err(|_| {
            anyhow!(
                "the sender {sender} did not send the history of timeline {}",
                t.0
            )
        })??
        .ok_or_else(|| anyhow!("sender closed the connection"))?;
    match Message::decode(&frame)? {
        Message::History { timeline, content } if timeline == t.0 => Ok(content),
        Message::Error { code, message } => Err(sender_error(code, message)),
        other => bail!(
            "expected the history of timeline {}, got {:?}",
            t.0,
            other.kind()
        ),
    }
}

/// Brings the store onto the sender's `timeline`: fetches the history files the store
/// lacks, refuses a history that diverged from the store's, stores them durably, and
/// switches the store's timeline at every switch point it has already reached. The store
/// may stay on an older timeline whose end it has not reached yet; the stream then
/// delivers the rest of it and ends with `EndOfTimeline`.
async fn follow_history(
    store: &mut Store,
    sender: &str,
    timeline: TimelineId,
    link: &mut Link,
    frames: &mut FrameReader<Reader>,
) -> Result<()> {
    let from = store.state().map(|s| s.timeline).unwrap_or(timeline);
    // The newest history lists every ancestor; only those above the store's timeline are
    // fetched too (timelines that are not ancestors may not exist on this server).
    let mut files = Vec::new();
    let newest = get_history(sender, timeline, link, frames).await?;
    let hist = History::parse(timeline, &newest)
        .map_err(|why| anyhow!("the sender {sender} sent an unusable history file: {why}"))?;
    for a in &hist.ancestors {
        if a.timeline > from {
            let content = get_history(sender, a.timeline, link, frames).await?;
            History::parse(a.timeline, &content).map_err(|why| {
                anyhow!("the sender {sender} sent an unusable history file: {why}")
            })?;
            files.push((a.timeline, content));
        }
    }
    files.push((timeline, newest));
    let hist = &hist;
    let st = store.state().expect("initialised").clone();
    // Refuse before anything of the new history is stored.
    check_not_diverged(st.timeline, store.flush_lsn(), hist, sender)?;
    for (t, content) in &files {
        store.save_history(*t, content).map_err(store_fatal)?;
    }
    loop {
        let st = store.state().expect("initialised").clone();
        if st.timeline == timeline {
            return Ok(());
        }
        let (switch, next) = check_not_diverged(st.timeline, store.flush_lsn(), hist, sender)?;
        if store.flush_lsn() < switch {
            info!(
                timeline = st.timeline.0,
                from = %store.flush_lsn(),
                to = %switch,
                "fetching the rest of timeline {} before switching to timeline {}",
                st.timeline.0,
                next.0
            );
            return Ok(());
        }
        store.switch_timeline(next, switch).map_err(store_fatal)?;
        warn!(
            from_timeline = st.timeline.0,
            to_timeline = next.0,
            %switch,
            "timeline switch: the store continues on timeline {} from {switch}",
            next.0
        );
    }
}

#[allow(clippy::too_many_arguments)]
async fn stream(
    store: &mut Store,
    frames: &mut FrameReader<Reader>,
    link: &mut Link,
    mut server_flush_lsn: Lsn,
    until: Option<Lsn>,
    mut feed: Option<&mut Feed>,
    wal_dir: &std::path::Path,
    standby_replay: Option<&StandbyReplay>,
    metrics: &FollowMetrics,
) -> Result<Outcome> {
    let mut last_log = Instant::now();
    let mut last_msg = tokio::time::Instant::now();
    let mut last_file = tokio::time::Instant::now() - STANDBY_FILE_INTERVAL;
    // Feedback not yet written to the standby file (it is written at most once a second).
    let mut unwritten: Option<Feedback> = None;
    let mut sent: Option<Message> = None;
    let mut ended = None;
    loop {
        let first = tokio::select! {
            _ = tokio::time::sleep_until(last_file + STANDBY_FILE_INTERVAL), if unwritten.is_some() => {
                if let Some(fb) = unwritten.take() {
                    last_file = tokio::time::Instant::now();
                    write_standby_file(wal_dir, &fb);
                }
                continue;
            }
            // read_frame is cancellation-safe: a frame partly read stays buffered.
            r = tokio::time::timeout_at(last_msg + IDLE_TIMEOUT, frames.read_frame()) => message_of(r
                .map_err(|_| StreamError::Silent(IDLE_TIMEOUT))?),
            fb = next_feedback(&mut feed) => {
                // Retention keeps the segment of the last replay position reported.
                if let Some(r) = standby_replay.filter(|_| fb.apply_lsn != Lsn::default()) {
                    *r.lock().unwrap_or_else(|p| p.into_inner()) = Some(fb.apply_lsn);
                }
                let m = feedback_message(&fb);
                if sent.as_ref() != Some(&m) {
                    link.send(&m).await?;
                    sent = Some(m);
                }
                if !fb.connected || last_file.elapsed() >= STANDBY_FILE_INTERVAL {
                    last_file = tokio::time::Instant::now();
                    write_standby_file(wal_dir, &fb);
                    unwritten = None;
                } else {
                    unwritten = Some(fb);
                }
                continue;
            }
        };
        last_msg = tokio::time::Instant::now();
        let mut item = Some(first);
        while let Some(it) = item.take() {
            let (msg, wire_bytes) = it?;
            match &msg {
                Message::WalData {
                    server_flush_lsn: sf,
                    data,
                    ..
                } => metrics.message(*sf, Some((data.len() as u64, wire_bytes))),
                Message::Keepalive {
                    server_flush_lsn: sf,
                } => metrics.message(*sf, None),
                _ => metrics.message(Lsn::default(), None),
            }
            match msg {
                Message::WalData {
                    start_lsn,
                    server_flush_lsn: sf,
                    data,
                } => {
                    if start_lsn != store.write_lsn() {
                        bail!(
                            "sender sent WAL at {start_lsn}, but the store continues at {}",
                            store.write_lsn()
                        );
                    }
                    // A write into the page cache: not worth handing this worker's other
                    // tasks to another thread.
                    store
                        .write(start_lsn, &data, wire_bytes)
                        .map_err(store_fatal)?;
                    server_flush_lsn = server_flush_lsn.max(sf);
                }
                Message::Keepalive {
                    server_flush_lsn: sf,
                } => server_flush_lsn = server_flush_lsn.max(sf),
                Message::EndOfTimeline {
                    next_timeline,
                    switch_lsn,
                } => {
                    if switch_lsn != store.write_lsn() {
                        bail!(
                            "the sender ended the timeline at {switch_lsn}, but sent WAL up to {}",
                            store.write_lsn()
                        );
                    }
                    info!(%switch_lsn, next_timeline, "the sender reached the end of the timeline");
                    ended = Some(next_timeline);
                    break;
                }
                Message::Error { code, message } => return Err(sender_error(code, message)),
                other => bail!("unexpected {:?} message from sender", other.kind()),
            }
            if store.write_lsn().saturating_sub(store.flush_lsn()) < MAX_UNFLUSHED {
                // Frames already read, and those already in the socket, go into the same
                // flush; none is waited for. (read_frame returns a buffered frame at its
                // first poll, and is cancellation-safe: a frame only partly arrived stays
                // buffered for the next read.)
                item = tokio::select! {
                    biased;
                    read = frames.read_frame() => Some(message_of(read)),
                    _ = std::future::ready(()) => None,
                };
            }
        }
        if store.write_lsn() > store.flush_lsn() {
            let t0 = Instant::now();
            let batch = store.write_lsn().saturating_sub(store.flush_lsn());
            // The standby may have WAL as soon as it is fdatasynced, before `state` records
            // the new position.
            let (view, feed_ref) = (view_of(store), feed.as_deref());
            let mut synced_us = 0u64;
            let flush_lsn = store
                .flush_notify(|synced| {
                    synced_us = t0.elapsed().as_micros() as u64;
                    if let (Some(f), Some(v)) = (feed_ref, view) {
                        f.view.send_replace(Some(StoreView {
                            flush_lsn: synced,
                            ..v
                        }));
                    }
                })
                .map_err(store_fatal)?;
            metrics.flushed(flush_lsn, store.state().map(|s| s.timeline.0).unwrap_or(0));
            tracing::debug!(
                batch,
                synced_us,
                flush_us = t0.elapsed().as_micros() as u64,
                "flushed"
            );
            link.send(&Message::Ack {
                write_lsn: store.write_lsn(),
                flush_lsn,
            })
            .await?;
            if until.is_some_and(|until| flush_lsn >= until) {
                return Ok(Outcome::Reached);
            }
        }
        if ended.is_some() {
            return Ok(Outcome::TimelineEnded);
        }
        if last_log.elapsed() >= PROGRESS_INTERVAL {
            last_log = Instant::now();
            let flush_lsn = store.flush_lsn();
            let lag_bytes = server_flush_lsn.saturating_sub(flush_lsn);
            info!(%flush_lsn, %server_flush_lsn, lag_bytes, "following");
            if until.is_none() {
                service::status(&format!(
                    "streaming: flushed to {flush_lsn}, {lag_bytes} bytes behind the primary"
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_clusters_store_is_refused() {
        let seg = WalSegSize::new(16 << 20).unwrap();
        let st = StoreState {
            system_id: 7,
            timeline: TimelineId(1),
            seg_size: seg,
            pg_version: 15,
            flush_lsn: Lsn(0x100_0000),
            raw_bytes: 0,
            wire_bytes: 0,
        };
        let info = |system_id, seg_size, pg_version| ServerInfo {
            system_id,
            timeline: TimelineId(1),
            seg_size,
            flush_lsn: Lsn(0x200_0000),
            pg_version,
            in_recovery: false,
        };
        let dir = std::path::Path::new("store");
        assert!(check_same_cluster(&st, &info(7, seg, 15), dir).is_ok());
        let code = |r: Result<()>| r.unwrap_err().downcast_ref::<Fatal>().map(|f| f.code);
        assert_eq!(
            code(check_same_cluster(&st, &info(8, seg, 15), dir)),
            Some(exit::MISMATCH)
        );
        let other_seg = WalSegSize::new(64 << 20).unwrap();
        assert_eq!(
            code(check_same_cluster(&st, &info(7, other_seg, 15), dir)),
            Some(exit::MISMATCH)
        );
        assert_eq!(
            code(check_same_cluster(&st, &info(7, seg, 16), dir)),
            Some(exit::MISMATCH)
        );
        // A primary upgraded to another major has another system identifier too: the
        // refusal names the versions.
        let e = check_same_cluster(&st, &info(8, seg, 18), dir).unwrap_err();
        assert!(
            e.to_string().contains("PostgreSQL 18") && e.to_string().contains("PostgreSQL 15"),
            "{e}"
        );
    }

    #[test]
    fn picks_the_primary_on_the_highest_timeline() {
        let c = |sender: &str, tl: u32, in_recovery: bool| Candidate {
            sender: sender.into(),
            timeline: TimelineId(tl),
            in_recovery,
        };
        // A standby and a primary: the primary.
        assert_eq!(pick(&[c("a", 1, true), c("b", 1, false)], None), Ok(1));
        // Two primaries: the higher timeline wins, the old one is never chosen.
        assert_eq!(
            pick(
                &[c("old", 1, false), c("new", 2, false)],
                Some(TimelineId(1))
            ),
            Ok(1)
        );
        // Two primaries on one timeline: neither.
        let e = pick(&[c("a", 2, false), c("b", 2, false), c("s", 1, true)], None).unwrap_err();
        assert!(
            e.contains("SPLIT BRAIN") && e.contains("a (primary") && e.contains("b (primary"),
            "{e}"
        );
        // No primary: none.
        assert!(pick(&[c("a", 2, true)], None)
            .unwrap_err()
            .contains("no sender reports a primary"));
        assert!(pick(&[], None).is_err());
        // Never below the store's timeline.
        let e = pick(&[c("old", 1, false), c("s", 2, true)], Some(TimelineId(2))).unwrap_err();
        assert!(e.contains("below this store's timeline 2"), "{e}");
    }

    #[test]
    fn divergence_names_the_fork() {
        let hist = History::parse(
            TimelineId(2),
            b"1\t0/5000100\tno recovery target specified\n",
        )
        .unwrap();
        assert_eq!(
            check_not_diverged(TimelineId(1), Lsn(0x5000000), &hist, "s").unwrap(),
            (Lsn(0x5000100), TimelineId(2))
        );
        assert!(check_not_diverged(TimelineId(1), Lsn(0x5000100), &hist, "s").is_ok());
        let e = check_not_diverged(TimelineId(1), Lsn(0x5000180), &hist, "s").unwrap_err();
        let f = e.downcast_ref::<Fatal>().unwrap();
        assert_eq!(f.code, exit::DIVERGED);
        assert!(
            f.message.contains("0/5000100") && f.message.contains("128 bytes"),
            "{}",
            f.message
        );
        // A timeline that is not in the history at all.
        let e = check_not_diverged(TimelineId(3), Lsn(1), &hist, "s").unwrap_err();
        assert_eq!(e.downcast_ref::<Fatal>().unwrap().code, exit::DIVERGED);
    }

    #[test]
    fn major_version_of_a_server_version_string() {
        assert_eq!(pg_major_version("15.18 (Debian 15.18-0+deb12u1)"), 15);
        assert_eq!(pg_major_version("16beta2"), 16);
        assert_eq!(pg_major_version("fake"), 0);
    }
}
