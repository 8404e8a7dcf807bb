//! `wal-receiver follow`: keep a WAL store current from a wal-sender, across any outage.
//!
//! One task reads frames from the sender (frame reads are not cancellation-safe, so they
//! live on their own task) and passes messages through a bounded channel to the writer loop.
//! The writer appends everything already queued, then flushes once (group commit: while it
//! waits for fdatasync more WAL queues up, so fsyncs per second stay bounded however small
//! the messages are), and only then acknowledges the new flush position.
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
use tokio::sync::mpsc;
use tracing::{info, warn};
use walship_common::frame::{FrameDecoder, FrameEncoder};
use walship_common::protocol::{validate_name, ErrorCode, Message, Mode, PROTOCOL_VERSION};
use walship_common::tls::{self, Reader, Writer};
use walship_common::{Lsn, TimelineId, WalSegSize};

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

pub struct FollowConfig {
    pub sender: String,
    pub name: String,
    pub wal_dir: PathBuf,
    pub start_lsn: Option<Lsn>,
    /// Stop once the store is flushed to here (bootstrap's stop LSN); `None` follows forever.
    pub until: Option<Lsn>,
    /// TLS to the sender; `None` is plaintext.
    pub tls: Option<TlsClient>,
    /// Serve a standby over PostgreSQL's streaming replication protocol at this address.
    pub serve: Option<ServeAddr>,
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
pub async fn follow(cfg: FollowConfig) -> Result<()> {
    validate_name(&cfg.name).map_err(|m| Fatal {
        code: exit::USAGE,
        message: m,
    })?;
    let wal_dir = cfg.wal_dir.clone();
    let mut store = tokio::task::spawn_blocking(move || Store::open(&wal_dir))
        .await?
        .map_err(store_fatal)?;
    info!(wal_dir = %cfg.wal_dir.display(), flush_lsn = %store.flush_lsn(), "WAL store opened");
    let mut feed = match &cfg.serve {
        Some(addr) => Some(serve::start(addr, &cfg.wal_dir).await.map_err(|e| Fatal {
            code: exit::USAGE,
            message: format!("cannot serve the standby: {e:#}"),
        })?),
        None => None,
    };
    publish(feed.as_ref(), &store);
    let mut backoff = BACKOFF_MIN;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let before = store.flush_lsn();
        let result = tokio::select! {
            r = session(&mut store, &cfg, feed.as_mut()) => r,
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        };
        match result {
            // Never touch the store after a fatal error: a failed fsync is not retried.
            Err(e) if e.downcast_ref::<Fatal>().is_some() => return Err(e),
            Err(e) => warn!(sender = %cfg.sender, "{e:#}; reconnecting in {backoff:?}"),
            Ok(Outcome::Reached) => break,
        }
        // WAL written before the failure was verified and is contiguous: make it durable, so
        // the next session resumes exactly where the store ends.
        tokio::task::block_in_place(|| store.flush()).map_err(store_fatal)?;
        publish(feed.as_ref(), &store);
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
    let flush_lsn = tokio::task::block_in_place(|| store.flush()).map_err(store_fatal)?;
    tokio::task::block_in_place(|| store.close()).map_err(store_fatal)?;
    info!(%flush_lsn, "wal-receiver stopped");
    Ok(())
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
        ErrorCode::Other => anyhow!("sender reported an error: {message}"),
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
}

/// An open connection to a sender, past the handshake.
pub struct Connection {
    pub rd: Reader,
    pub link: Link,
    pub dec: FrameDecoder,
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
    let (mut rd, wr) = match tls_client {
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
    let mut dec = FrameDecoder::new()?;
    link.send(&Message::Hello {
        version: PROTOCOL_VERSION,
        name: name.to_owned(),
        mode,
    })
    .await
    .map_err(|e| tls_failure(e, sender))?;
    let frame = tokio::time::timeout(HANDSHAKE_TIMEOUT, dec.read_frame(&mut rd))
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
        } => {
            if version != PROTOCOL_VERSION {
                return Err(Fatal { code: exit::MISMATCH, message: format!("sender speaks walship protocol {version}, this receiver {PROTOCOL_VERSION}") }.into());
            }
            let seg = WalSegSize::new(seg_size as u64).ok_or_else(|| Fatal {
                code: exit::MISMATCH,
                message: format!("sender reports an invalid WAL segment size {seg_size}"),
            })?;
            info!(system_id, timeline, %flush_lsn, %server_version, "connected to sender");
            ServerInfo {
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
    Ok(Connection {
        rd,
        link,
        dec,
        info,
    })
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
    if st.timeline != info.timeline {
        return Err(Fatal { code: exit::MISMATCH, message: format!(
            "the primary is on timeline {} but the store holds timeline {}; following a timeline switch is not supported yet",
            info.timeline, st.timeline
        ) }.into());
    }
    Ok(())
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
) -> Result<Outcome> {
    let Connection {
        mut rd,
        mut link,
        mut dec,
        info,
    } = connect(&cfg.sender, &cfg.name, Mode::Follow, cfg.tls.as_ref()).await?;
    let (system_id, timeline, seg_size, server_flush_lsn) =
        (info.system_id, info.timeline, info.seg_size, info.flush_lsn);
    match store.state() {
        Some(st) => check_same_cluster(st, &info, &cfg.wal_dir)?,
        None => {
            let start_lsn = cfg
                .start_lsn
                .unwrap_or(server_flush_lsn)
                .segment_start(seg_size);
            tokio::task::block_in_place(|| {
                store.init(system_id, timeline, seg_size, info.pg_version, start_lsn)
            })
            .map_err(store_fatal)?;
            info!(%start_lsn, "initialised empty WAL store");
        }
    }
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
    // The sender of this session has not heard from the standby yet.
    if let Some(f) = feed.as_deref() {
        let fb = f.feedback.borrow().clone();
        if fb.connected {
            link.send(&feedback_message(&fb)).await?;
        }
    }

    let (tx, mut rx) = mpsc::channel::<Result<(Message, u64)>>(256);
    let reader = tokio::spawn(async move {
        loop {
            let item = match dec.read_frame(&mut rd).await {
                Ok(Some(frame)) => Message::decode(&frame)
                    .map(|m| (m, frame.wire_bytes))
                    .map_err(anyhow::Error::from),
                Ok(None) => Err(anyhow!("sender closed the connection")),
                Err(e) => Err(anyhow::Error::from(e).context("bad frame from sender")),
            };
            let stop = item.is_err();
            if tx.send(item).await.is_err() || stop {
                return;
            }
        }
    });
    let result = stream(
        store,
        &mut rx,
        &mut link,
        server_flush_lsn,
        cfg.until,
        feed,
        &cfg.wal_dir,
    )
    .await;
    reader.abort();
    result
}

/// How a session ended without an error.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// The store reached the position it was asked to reach.
    Reached,
}

#[allow(clippy::too_many_arguments)]
async fn stream(
    store: &mut Store,
    rx: &mut mpsc::Receiver<Result<(Message, u64)>>,
    link: &mut Link,
    mut server_flush_lsn: Lsn,
    until: Option<Lsn>,
    mut feed: Option<&mut Feed>,
    wal_dir: &std::path::Path,
) -> Result<Outcome> {
    let mut last_log = Instant::now();
    let mut last_msg = tokio::time::Instant::now();
    let mut last_file = tokio::time::Instant::now() - STANDBY_FILE_INTERVAL;
    // Feedback not yet written to the standby file (it is written at most once a second).
    let mut unwritten: Option<Feedback> = None;
    let mut sent: Option<Message> = None;
    loop {
        let first = tokio::select! {
            _ = tokio::time::sleep_until(last_file + STANDBY_FILE_INTERVAL), if unwritten.is_some() => {
                if let Some(fb) = unwritten.take() {
                    last_file = tokio::time::Instant::now();
                    write_standby_file(wal_dir, &fb);
                }
                continue;
            }
            r = tokio::time::timeout_at(last_msg + IDLE_TIMEOUT, rx.recv()) => r
                .map_err(|_| anyhow!("no message from the sender for {IDLE_TIMEOUT:?}; assuming the connection is dead"))?
                .ok_or_else(|| anyhow!("connection reader stopped"))?,
            fb = next_feedback(&mut feed) => {
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
                    tokio::task::block_in_place(|| store.write(start_lsn, &data, wire_bytes))
                        .map_err(store_fatal)?;
                    server_flush_lsn = server_flush_lsn.max(sf);
                }
                Message::Keepalive {
                    server_flush_lsn: sf,
                } => server_flush_lsn = server_flush_lsn.max(sf),
                Message::Error { code, message } => return Err(sender_error(code, message)),
                other => bail!("unexpected {:?} message from sender", other.kind()),
            }
            if store.write_lsn().saturating_sub(store.flush_lsn()) < MAX_UNFLUSHED {
                item = rx.try_recv().ok();
            }
        }
        if store.write_lsn() > store.flush_lsn() {
            let t0 = Instant::now();
            let batch = store.write_lsn().saturating_sub(store.flush_lsn());
            // The standby may have WAL as soon as it is fdatasynced, before `state` records
            // the new position.
            let (view, feed_ref) = (view_of(store), feed.as_deref());
            let mut synced_us = 0u64;
            let flush_lsn = tokio::task::block_in_place(|| {
                store.flush_notify(|synced| {
                    synced_us = t0.elapsed().as_micros() as u64;
                    if let (Some(f), Some(v)) = (feed_ref, view) {
                        f.view.send_replace(Some(StoreView {
                            flush_lsn: synced,
                            ..v
                        }));
                    }
                })
            })
            .map_err(store_fatal)?;
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
        if last_log.elapsed() >= PROGRESS_INTERVAL {
            last_log = Instant::now();
            let flush_lsn = store.flush_lsn();
            info!(%flush_lsn, %server_flush_lsn, lag_bytes = server_flush_lsn.saturating_sub(flush_lsn), "following");
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
    }

    #[test]
    fn major_version_of_a_server_version_string() {
        assert_eq!(pg_major_version("15.18 (Debian 15.18-0+deb12u1)"), 15);
        assert_eq!(pg_major_version("16beta2"), 16);
        assert_eq!(pg_major_version("fake"), 0);
    }
}
