//! One receiver's session: handshake, slot, and the WAL stream.
//!
//! Each receiver gets its own task and its own replication connection to PostgreSQL, so a
//! slow, stalled or misbehaving receiver never delays another.
//!
//! Positions: `ack_flush_lsn <= sent_lsn`. The receiver's acknowledged flush position is
//! the only position ever reported upstream as flush, so the slot `walship_<name>` never
//! advances past what the receiver has fsynced; an acknowledgement beyond what was sent is a
//! protocol violation and ends the session.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::{error, info, warn};
use walship_common::conninfo::Settings;
use walship_common::frame::{Frame, FrameEncoder, FrameError, FrameReader};
use walship_common::pgclient;
use walship_common::protocol::{validate_name, ErrorCode, Message, Mode, PROTOCOL_VERSION};
use walship_common::tls::{self, Reader, Writer};
use walship_common::{Lsn, WalSegSize};

use crate::metrics::{ReceiverStats, Refused, SenderMetrics};
use crate::pgconn::{CopyMessage, PgError, ReplConn};
use crate::snapshot::{self, ChunkReader, Entry, Have};

/// Status updates go upstream at least this often, acknowledged or not.
const STATUS_INTERVAL: Duration = Duration::from_secs(10);
/// How long a session waits for its receiver to close after the end of a timeline.
const END_DRAIN: Duration = Duration::from_secs(5);
/// A keepalive goes to the receiver when nothing else was sent for this long.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);

/// Settings shared by every session.
#[derive(Clone)]
pub struct SessionConfig {
    /// How to connect to PostgreSQL (passwords are looked up at each connection).
    pub pg: Settings,
    /// zstd level for WAL: small messages, where a higher level pays.
    pub zstd_level: i32,
    /// zstd level for snapshot files: bulk data, where speed pays.
    pub snapshot_zstd_level: i32,
    /// The primary's data directory, when given on the command line.
    pub pgdata: Option<std::path::PathBuf>,
    /// How long a small run of WAL waits for more before it is sent.
    pub batch_delay: Duration,
    /// How long a receiver has for each step of the handshake (TLS, Hello, its request).
    pub handshake_timeout: Duration,
    /// What `--metrics-listen` exports.
    pub metrics: Arc<SenderMetrics>,
}

/// A handshake step took longer than `--handshake-timeout`.
#[derive(Debug, thiserror::Error)]
#[error("handshake not completed within {0:?}")]
pub struct HandshakeTimeout(pub Duration);

/// An error to send to the receiver before closing.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

fn refuse(code: ErrorCode, message: impl Into<String>) -> anyhow::Error {
    Refusal {
        code,
        message: message.into(),
    }
    .into()
}

struct Out {
    wr: Writer,
    enc: FrameEncoder,
    buf: Vec<u8>,
    wire_bytes: u64,
    frames: u64,
    last_sent: Instant,
}

impl Out {
    async fn send(&mut self, msg: &Message) -> Result<()> {
        self.buf.clear();
        msg.encode(&mut self.enc, &mut self.buf)?;
        self.wr
            .write_all(&self.buf)
            .await
            .context("send to receiver")?;
        self.wire_bytes += self.buf.len() as u64;
        self.frames += 1;
        self.last_sent = Instant::now();
        Ok(())
    }
}

/// How the sender secures its connections.
#[derive(Clone)]
pub struct Security {
    /// TLS settings; `None` is plaintext.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Receivers must present a certificate, and may act only under a name it carries.
    pub client_auth: bool,
}

/// A connection after TLS: its halves, and the names the receiver's certificate allows
/// (`None` when client certificates are not required).
struct Accepted {
    rd: Reader,
    wr: Writer,
    identity: Option<Vec<String>>,
}

/// Runs a session to its end, logging how it ended. Never panics on bad input.
pub async fn run(sock: TcpStream, peer: SocketAddr, cfg: SessionConfig, sec: Security) {
    let _ = sock.set_nodelay(true);
    let enc = match FrameEncoder::new(cfg.zstd_level) {
        Ok(e) => e,
        Err(e) => {
            warn!(%peer, "cannot create compressor: {e}");
            return;
        }
    };
    let accepted = match tokio::time::timeout(cfg.handshake_timeout, accept(sock, &sec)).await {
        Ok(Ok(Ok(a))) => a,
        Ok(Ok(Err((mut wr, text)))) => {
            // A plaintext receiver at a TLS sender: tell it why, in its own protocol, and
            // nothing else.
            warn!(%peer, "refused: {text}");
            cfg.metrics.refused(Refused::TlsRequired);
            if let Ok(mut enc) = FrameEncoder::new(1) {
                let mut buf = Vec::new();
                let msg = Message::Error {
                    code: ErrorCode::Auth,
                    message: text,
                };
                if msg.encode(&mut enc, &mut buf).is_ok() {
                    let _ = tokio::time::timeout(Duration::from_secs(2), wr.write_all(&buf)).await;
                }
            }
            let _ = wr.shutdown().await;
            return;
        }
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            // A port probe, or a client that gave up.
            info!(%peer, "connection closed before the handshake");
            return;
        }
        Ok(Err(e)) => {
            let text = tls::explain(&e, "the receiver").unwrap_or_else(|| format!("{e:#}"));
            warn!(%peer, "connection refused: {text}");
            cfg.metrics.refused(Refused::Tls);
            return;
        }
        Err(_) => {
            warn!(%peer, "connection closed: no handshake within {:?}", cfg.handshake_timeout);
            cfg.metrics.refused(Refused::HandshakeTimeout);
            return;
        }
    };
    let mut out = Out {
        wr: accepted.wr,
        enc,
        buf: Vec::new(),
        wire_bytes: 0,
        frames: 0,
        last_sent: Instant::now(),
    };
    let mut name = String::from("?");
    let result = session(
        accepted.rd,
        &mut out,
        peer,
        &cfg,
        accepted.identity,
        &mut name,
    )
    .await;
    match result {
        Ok(()) => info!(receiver = %name, %peer, "receiver disconnected"),
        Err(e) => {
            let (code, text) = classify(&e);
            if let Some(why) = Refused::of_code(code) {
                cfg.metrics.refused(why);
            } else if e.is::<HandshakeTimeout>() {
                cfg.metrics.refused(Refused::HandshakeTimeout);
            }
            if code == ErrorCode::Setup {
                error!(receiver = %name, %peer, "session ended: {text}");
            } else {
                warn!(receiver = %name, %peer, "session ended: {text}");
            }
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                out.send(&Message::Error {
                    code,
                    message: text,
                }),
            )
            .await;
        }
    }
    let _ = out.wr.shutdown().await;
}

/// What the receiver is told when a session fails: a refusal as it was made; a problem
/// with the primary's configuration that retrying cannot fix (a password, a grant, a
/// setting, an unreadable data directory) as `Setup`, with what to do; anything else as
/// `Other`, which the receiver retries.
pub fn classify(e: &anyhow::Error) -> (ErrorCode, String) {
    if let Some(r) = e.downcast_ref::<Refusal>() {
        return (r.code, r.message.clone());
    }
    let text = format!("{e:#}");
    if e.chain().any(|c| c.is::<snapshot::DataDirUnreadable>()) {
        return (ErrorCode::Setup, text);
    }
    match pgclient::setup_problem(e.as_ref()) {
        Some("") => (ErrorCode::Setup, text),
        Some(fix) => (ErrorCode::Setup, format!("{text}. To fix: {fix}")),
        None => (ErrorCode::Other, text),
    }
}

/// The TLS handshake, when TLS is on. `Ok(Err(..))` is a plaintext client at a TLS sender:
/// the socket is handed back so that it can be told why it is refused.
async fn accept(
    sock: TcpStream,
    sec: &Security,
) -> std::io::Result<std::result::Result<Accepted, (TcpStream, String)>> {
    let Some(cfg) = &sec.tls else {
        let (rd, wr) = tls::split(sock);
        return Ok(Ok(Accepted {
            rd,
            wr,
            identity: None,
        }));
    };
    let mut first = [0u8; 1];
    if sock.peek(&mut first).await? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed before the handshake",
        ));
    }
    if first[0] != tls::TLS_HANDSHAKE_BYTE {
        return Ok(Err((
            sock,
            "this sender requires TLS; give the receiver --tls-ca (and --tls-cert/--tls-key if the sender requires client certificates)".to_owned(),
        )));
    }
    let stream = tokio_rustls::TlsAcceptor::from(cfg.clone())
        .accept(sock)
        .await?;
    let identity = if sec.client_auth {
        let der = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or_else(|| std::io::Error::other("the receiver presented no certificate"))?;
        Some(certificate_names(der.as_ref()))
    } else {
        None
    };
    let (rd, wr) = tls::split(stream);
    Ok(Ok(Accepted { rd, wr, identity }))
}

/// The names a client certificate carries: its subject common names and DNS subject
/// alternative names (shared with `check`).
pub use walship_common::check::certificate_names;

async fn read_msg(frames: &mut FrameReader<Reader>) -> Result<Message> {
    let frame = frames
        .read_frame()
        .await?
        .ok_or_else(|| anyhow!("receiver closed the connection"))?;
    Ok(Message::decode(&frame)?)
}

async fn session(
    rd: Reader,
    out: &mut Out,
    peer: SocketAddr,
    cfg: &SessionConfig,
    identity: Option<Vec<String>>,
    name_out: &mut String,
) -> Result<()> {
    let mut frames = FrameReader::new(rd)?;
    let hello = tokio::time::timeout(cfg.handshake_timeout, read_msg(&mut frames))
        .await
        .map_err(|_| HandshakeTimeout(cfg.handshake_timeout))??;
    let (name, mode) = match hello {
        Message::Hello {
            version,
            name,
            mode,
        } => {
            if version != PROTOCOL_VERSION {
                return Err(refuse(ErrorCode::Version, format!(
                    "receiver speaks walship protocol version {version}, this sender speaks {PROTOCOL_VERSION}; run the same walship version on both hosts"
                )));
            }
            validate_name(&name).map_err(|m| refuse(ErrorCode::BadName, m))?;
            (name, mode)
        }
        other => bail!("expected Hello, got {:?}", other.kind()),
    };
    *name_out = name.clone();
    if let Some(names) = &identity {
        // The name picks the slot: a receiver may touch only its own.
        if !names.contains(&name) {
            return Err(refuse(ErrorCode::Auth, format!(
                "the receiver's certificate allows the names {names:?}, not {name:?}; a receiver may act only under a name its certificate carries"
            )));
        }
    }
    let slot = format!("walship_{name}");
    info!(receiver = %name, %peer, "receiver connected");

    let mut pg = ReplConn::connect(&cfg.pg, &name)
        .await
        .context("open a replication connection")?;
    let sys = pg.identify_system().await?;
    let seg_setting = pg.show("wal_segment_size").await?;
    let seg_size = WalSegSize::parse_setting(&seg_setting).ok_or_else(|| {
        anyhow!("PostgreSQL reports an unusable wal_segment_size {seg_setting:?}")
    })?;
    // A standby reports in_hot_standby = on (PostgreSQL 14 and later).
    let in_recovery = pg.show("in_hot_standby").await? == "on";
    out.send(&Message::ServerInfo {
        version: PROTOCOL_VERSION,
        system_id: sys.system_id,
        timeline: sys.timeline,
        seg_size: seg_size.bytes() as u32,
        flush_lsn: sys.flush_lsn,
        server_version: pg.server_version.clone(),
        in_recovery,
    })
    .await?;
    if mode == Mode::Bootstrap {
        // Nothing compressed was sent yet, so the zstd stream can start at another level.
        out.enc = FrameEncoder::new(cfg.snapshot_zstd_level)?;
        return bootstrap(pg, frames, out, cfg, &name, &slot).await;
    }

    // History files first (a receiver on an older timeline needs them), then the request.
    let (start_lsn, timeline) = loop {
        match tokio::time::timeout(cfg.handshake_timeout, read_msg(&mut frames))
            .await
            .map_err(|_| HandshakeTimeout(cfg.handshake_timeout))??
        {
            Message::GetHistory { timeline } => {
                if timeline < 2 || timeline > sys.timeline {
                    return Err(refuse(ErrorCode::BadRequest, format!(
                        "there is no history file for timeline {timeline} (the server is on timeline {})",
                        sys.timeline
                    )));
                }
                let content = pg
                    .timeline_history(timeline)
                    .await
                    .with_context(|| format!("read the history of timeline {timeline}"))?;
                out.send(&Message::History { timeline, content }).await?;
            }
            Message::StartStream {
                start_lsn,
                timeline,
            } => break (start_lsn, timeline),
            Message::Error { message, .. } => bail!("receiver ended the handshake: {message}"),
            other => bail!("expected StartStream, got {:?}", other.kind()),
        }
    };
    if timeline > sys.timeline {
        return Err(refuse(ErrorCode::BadRequest, format!(
            "receiver asks for timeline {timeline}, but the server is on timeline {}; it is behind the receiver's history",
            sys.timeline
        )));
    }
    if start_lsn > sys.flush_lsn {
        return Err(refuse(ErrorCode::BadRequest, format!(
            "receiver asks for WAL from {start_lsn}, ahead of the primary's flush position {}; its store belongs to another history",
            sys.flush_lsn
        )));
    }
    ensure_slot(&mut pg, &slot, start_lsn, false).await?;
    if let Err(e) = pg.start_replication(&slot, start_lsn, timeline).await {
        return Err(classify_pg_error(
            e.context(format!("start replication on slot {slot} at {start_lsn}")),
            &slot,
            start_lsn,
        ));
    }
    info!(receiver = %name, %start_lsn, timeline, %slot, "streaming WAL");
    // PostgreSQL reports missing WAL only once streaming has begun.
    let streaming = cfg.metrics.streaming(&name);
    stream(
        pg,
        frames,
        out,
        &name,
        &slot,
        start_lsn,
        cfg.batch_delay,
        &cfg.metrics,
        &streaming.stats,
    )
    .await
    .map_err(|e| classify_pg_error(e, &slot, start_lsn))
}

/// Makes sure the slot exists and still protects WAL from `start_lsn`.
/// Makes sure the slot exists and still protects WAL from `start_lsn`. For a `fresh` start
/// (a bootstrap, which needs no earlier WAL) an invalidated slot is dropped and created
/// again; otherwise it means the receiver's WAL is gone.
async fn ensure_slot(pg: &mut ReplConn, slot: &str, start_lsn: Lsn, fresh: bool) -> Result<()> {
    let rows = pg
        .simple_query(&format!("READ_REPLICATION_SLOT {slot}"))
        .await?;
    let row = rows
        .first()
        .ok_or_else(|| anyhow!("READ_REPLICATION_SLOT returned no row"))?;
    let slot_type = row.first().cloned().flatten();
    let restart_lsn = row.get(1).cloned().flatten();
    match (slot_type.as_deref(), restart_lsn) {
        (None, _) => create_slot(pg, slot).await,
        (Some("physical"), Some(_)) => Ok(()),
        (Some("physical"), None) if fresh => {
            warn!(%slot, "replication slot was invalidated; dropping it and creating it again for the new bootstrap");
            pg.simple_query(&format!("DROP_REPLICATION_SLOT \"{slot}\""))
                .await
                .with_context(|| format!("drop invalidated replication slot {slot}"))?;
            create_slot(pg, slot).await
        }
        (Some("physical"), None) => Err(refuse(ErrorCode::WalGone, format!(
            "replication slot {slot} was invalidated on the primary (max_slot_wal_keep_size?); the WAL from {start_lsn} is gone. Bootstrap this receiver again"
        ))),
        (Some(other), _) => Err(refuse(ErrorCode::BadRequest, format!(
            "replication slot {slot} exists but is a {other} slot; drop it or choose another receiver name"
        ))),
    }
}

/// Creates the slot with WAL reserved from now on.
async fn create_slot(pg: &mut ReplConn, slot: &str) -> Result<()> {
    match pg
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT \"{slot}\" PHYSICAL RESERVE_WAL"
        ))
        .await
    {
        Ok(_) => info!(%slot, "created physical replication slot"),
        // Another session of the same receiver may have created it a moment ago.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<PgError>()
                    .is_some_and(|p| p.code == "42710")
            }) => {}
        // CREATE_REPLICATION_SLOT says 55000 when the server cannot have slots at all.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<PgError>()
                    .is_some_and(|p| p.code == "55000")
            }) =>
        {
            return Err(refuse(ErrorCode::Setup, format!(
                "{:#}. To fix: set wal_level = replica (or logical) and max_replication_slots above 0 on the primary, then restart it",
                e.context(format!("create replication slot {slot}"))
            )));
        }
        Err(e) => return Err(e.context(format!("create replication slot {slot}"))),
    }
    Ok(())
}

fn classify_pg_error(e: anyhow::Error, slot: &str, start_lsn: Lsn) -> anyhow::Error {
    let text = format!("{e:#}");
    // PostgreSQL 18 refuses START_REPLICATION on an invalidated slot ("can no longer access
    // replication slot", the reason in its DETAIL); 15 to 17 accept it and fail later.
    if text.contains("has already been removed")
        || text.contains("invalidated")
        || text.contains("can no longer access replication slot")
    {
        return refuse(ErrorCode::WalGone, format!(
            "the primary no longer has the WAL from {start_lsn} (slot {slot}): {text}. Bootstrap this receiver again"
        ));
    }
    e
}

/// A standby's hot-standby feedback: xmin, its epoch, catalog xmin, its epoch.
type HotStandby = (u32, u32, u32, u32);

/// The largest run of WAL coalesced into one frame.
const MAX_BATCH: usize = 1 << 20;
/// Below this size a frame waits up to the batch delay for more WAL.
const SMALL_BATCH: usize = 16 << 10;

/// The upstream side of a stream: what was sent, what was acknowledged.
struct Upstream<'a> {
    pg: ReplConn,
    out: &'a mut Out,
    sent_lsn: Lsn,
    ack_write_lsn: Lsn,
    ack_flush_lsn: Lsn,
    /// The replay position of the standby the receiver feeds, if it reports one.
    ack_apply_lsn: Lsn,
    /// Hot-standby feedback last sent upstream.
    hot_standby: HotStandby,
    raw_bytes: u64,
    /// A message read while coalescing that still has to be handled.
    pending: Option<CopyMessage>,
    /// Where this stream started: the receiver may acknowledge up to here before any WAL.
    start_lsn: Lsn,
    /// What the receiver sends: acknowledgements and its standby's feedback.
    frames: FrameReader<Reader>,
    batch_delay: Duration,
    /// What `--metrics-listen` exports: the primary's position, and this receiver's.
    metrics: &'a SenderMetrics,
    stats: &'a ReceiverStats,
    /// The timeline was streamed to its end: the session is over.
    ended: bool,
}

impl Upstream<'_> {
    /// Handles one message from PostgreSQL. WAL that is already buffered behind an XLogData
    /// message is coalesced into the same frame: it costs no waiting, and larger frames
    /// compress better.
    async fn on_copy(&mut self, m: CopyMessage) -> Result<()> {
        match m {
            CopyMessage::XLogData {
                start_lsn,
                server_flush_lsn,
                data,
            } => {
                let mut data = data.to_vec();
                let mut server_flush_lsn = server_flush_lsn;
                self.check_continues(start_lsn, &data)?;
                // Small frames compress badly (each zstd flush restarts its entropy tables)
                // and cost a wake-up on both sides. So, as Nagle's algorithm does, a small
                // run of WAL waits for more while the receiver still has WAL of ours to
                // acknowledge, up to `batch_delay`; once it has acknowledged everything it
                // is idle, and the run goes at once. Acknowledgements that arrive meanwhile
                // are reported upstream at once: a synchronous commit waits for them.
                //
                // Otherwise only what is already buffered is taken. (A zero-length timeout
                // would not do: the timer fires at its next tick, and WAL arriving more
                // often than that would extend the run without bound.) recv_copy is
                // cancellation-safe: a message still arriving stays buffered for later.
                let deadline = tokio::time::Instant::now() + self.batch_delay;
                let mut receiver_gone = false;
                while data.len() < MAX_BATCH {
                    // Busy: WAL sent before this run is not all acknowledged yet.
                    let wait = !receiver_gone
                        && self.ack_flush_lsn < start_lsn
                        && data.len() < SMALL_BATCH
                        && tokio::time::Instant::now() < deadline;
                    let next = if wait {
                        tokio::select! {
                            m = self.pg.recv_copy() => Some(m),
                            _ = tokio::time::sleep_until(deadline) => None,
                            // read_frame is cancellation-safe: a frame partly read stays
                            // buffered.
                            read = self.frames.read_frame() => {
                                receiver_gone = !self.on_receiver(read).await?;
                                continue;
                            }
                        }
                    } else {
                        tokio::select! {
                            biased;
                            m = self.pg.recv_copy() => Some(m),
                            _ = std::future::ready(()) => None,
                        }
                    };
                    match next {
                        Some(Ok(CopyMessage::XLogData {
                            start_lsn: next,
                            server_flush_lsn: sf,
                            data: more,
                        })) if data.len() + more.len() <= MAX_BATCH => {
                            self.check_continues(next, &more)?;
                            data.extend_from_slice(&more);
                            server_flush_lsn = server_flush_lsn.max(sf);
                        }
                        Some(Ok(other)) => {
                            self.pending = Some(other);
                            break;
                        }
                        Some(Err(e)) => return Err(e.context("receive WAL from PostgreSQL")),
                        None => break,
                    }
                }
                let raw = data.len() as u64;
                self.metrics.primary_at(server_flush_lsn);
                self.out
                    .send(&Message::WalData {
                        start_lsn,
                        server_flush_lsn,
                        data,
                    })
                    .await?;
                self.stats.sent(raw, self.out.buf.len() as u64);
                Ok(())
            }
            CopyMessage::Keepalive {
                server_flush_lsn,
                reply_requested,
            } => {
                self.metrics.primary_at(server_flush_lsn);
                if reply_requested {
                    self.report().await?;
                }
                if self.out.last_sent.elapsed() >= KEEPALIVE_INTERVAL {
                    self.out
                        .send(&Message::Keepalive { server_flush_lsn })
                        .await?;
                }
                Ok(())
            }
            CopyMessage::CopyDone => match self.pg.end_copy().await? {
                Some((next_timeline, switch_lsn)) => {
                    if switch_lsn != self.sent_lsn {
                        bail!(
                            "PostgreSQL ended the timeline at {switch_lsn}, but sent WAL up to {}",
                            self.sent_lsn
                        );
                    }
                    info!(%switch_lsn, next_timeline, "end of timeline: the receiver continues on the next one");
                    self.out
                        .send(&Message::EndOfTimeline {
                            next_timeline,
                            switch_lsn,
                        })
                        .await?;
                    self.ended = true;
                    Ok(())
                }
                None => bail!(
                    "PostgreSQL ended the replication stream at {} (it is shutting down)",
                    self.sent_lsn
                ),
            },
        }
    }

    /// Checks that WAL continues exactly where the stream is, and advances it.
    fn check_continues(&mut self, start_lsn: Lsn, data: &[u8]) -> Result<()> {
        if start_lsn != self.sent_lsn {
            bail!(
                "PostgreSQL sent WAL at {start_lsn}, expected {}",
                self.sent_lsn
            );
        }
        self.sent_lsn = start_lsn
            .checked_add(data.len() as u64)
            .ok_or_else(|| anyhow!("PostgreSQL sent WAL past the end of the log"))?;
        self.raw_bytes += data.len() as u64;
        Ok(())
    }

    /// Sends the receiver's acknowledged positions upstream as a standby status update.
    async fn report(&mut self) -> Result<()> {
        self.pg
            .send_status(
                self.ack_write_lsn,
                self.ack_flush_lsn,
                self.ack_apply_lsn,
                false,
            )
            .await
    }

    /// Handles what the receiver sent: the frame read, then every further frame already
    /// buffered, and reports the result upstream once. False when the receiver closed the
    /// connection.
    async fn on_receiver(&mut self, mut read: Result<Option<Frame>, FrameError>) -> Result<bool> {
        let mut report = false;
        loop {
            let Some(frame) = read.context("read from receiver")? else {
                return Ok(false);
            };
            match Message::decode(&frame).context("read from receiver")? {
                Message::Ack {
                    write_lsn,
                    flush_lsn,
                } => {
                    self.take_ack(write_lsn, flush_lsn)?;
                    report = true;
                }
                Message::StandbyFeedback {
                    apply_lsn,
                    xmin,
                    xmin_epoch,
                    catalog_xmin,
                    catalog_xmin_epoch,
                } => {
                    let hs = (xmin, xmin_epoch, catalog_xmin, catalog_xmin_epoch);
                    report |= self.take_standby(apply_lsn, hs).await?;
                }
                Message::Error { message, .. } => bail!("receiver reported: {message}"),
                other => bail!("unexpected {:?} message from receiver", other.kind()),
            }
            match self.frames.next_buffered() {
                Ok(None) => break,
                more => read = more,
            }
        }
        if report {
            self.report().await?;
        }
        Ok(true)
    }

    /// The standby behind the receiver replayed to `apply_lsn`; its hot-standby feedback is
    /// `hs`. Both go upstream, so that remote_apply and hot_standby_feedback work across
    /// walship: the feedback at once, the apply position with the next report. True when
    /// that position moved.
    async fn take_standby(&mut self, apply_lsn: Lsn, hs: HotStandby) -> Result<bool> {
        // A standby cannot have replayed what the receiver does not hold; never report more
        // than was sent.
        let apply_lsn = apply_lsn.min(self.sent_lsn);
        if hs != self.hot_standby {
            self.hot_standby = hs;
            self.pg
                .send_hot_standby_feedback(hs.0, hs.1, hs.2, hs.3)
                .await?;
        }
        let moved = apply_lsn != self.ack_apply_lsn;
        self.ack_apply_lsn = apply_lsn;
        Ok(moved)
    }

    /// Checks and takes the receiver's acknowledgement.
    fn take_ack(&mut self, write_lsn: Lsn, flush_lsn: Lsn) -> Result<()> {
        if flush_lsn < self.ack_flush_lsn {
            bail!(
                "receiver acknowledged {flush_lsn}, behind its earlier acknowledgement {}",
                self.ack_flush_lsn
            );
        }
        if write_lsn > self.sent_lsn.max(self.start_lsn) {
            bail!(
                "receiver acknowledged {write_lsn}, beyond the {} it was sent",
                self.sent_lsn
            );
        }
        self.ack_write_lsn = write_lsn;
        self.ack_flush_lsn = flush_lsn;
        self.stats.acked(flush_lsn);
        Ok(())
    }

    async fn on_tick(&mut self) -> Result<()> {
        self.report().await?;
        if self.out.last_sent.elapsed() >= KEEPALIVE_INTERVAL {
            self.out
                .send(&Message::Keepalive {
                    server_flush_lsn: self.sent_lsn,
                })
                .await?;
        }
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
async fn stream(
    pg: ReplConn,
    frames: FrameReader<Reader>,
    out: &mut Out,
    name: &str,
    slot: &str,
    start_lsn: Lsn,
    batch_delay: Duration,
    metrics: &SenderMetrics,
    stats: &ReceiverStats,
) -> Result<()> {
    // One task serves both connections: PostgreSQL's WAL goes out, and the receiver's
    // acknowledgements go upstream, without a hop between tasks.
    let mut up = Upstream {
        pg,
        out,
        sent_lsn: start_lsn,
        ack_write_lsn: Lsn::INVALID,
        ack_flush_lsn: Lsn::INVALID,
        ack_apply_lsn: Lsn::INVALID,
        hot_standby: (0, 0, 0, 0),
        raw_bytes: 0,
        pending: None,
        start_lsn,
        frames,
        batch_delay,
        ended: false,
        metrics,
        stats,
    };
    let mut status_tick = tokio::time::interval(STATUS_INTERVAL);
    let result: Result<()> = loop {
        if up.ended {
            break Ok(());
        }
        if let Some(m) = up.pending.take() {
            if let Err(e) = up.on_copy(m).await {
                break Err(e);
            }
            continue;
        }
        let step = tokio::select! {
            m = up.pg.recv_copy() => match m {
                Ok(m) => up.on_copy(m).await,
                Err(e) => Err(e.context("receive WAL from PostgreSQL")),
            },
            read = up.frames.read_frame() => match up.on_receiver(read).await {
                Ok(true) => Ok(()),
                Ok(false) => break Ok(()),
                Err(e) => Err(e),
            },
            _ = status_tick.tick() => up.on_tick().await,
        };
        if let Err(e) = step {
            break Err(e);
        }
    };
    // After the end of a timeline, let the receiver read it and close first: closing at once
    // could fail the receiver's last write before it has read the message.
    let drained = if up.ended && result.is_ok() {
        let drain = async {
            while up.frames.read_frame().await?.is_some() {}
            Ok::<_, FrameError>(())
        };
        tokio::time::timeout(END_DRAIN, drain).await.ok()
    } else {
        None
    };
    info!(receiver = %name, %slot, sent_lsn = %up.sent_lsn, ack_flush_lsn = %up.ack_flush_lsn, raw_bytes = up.raw_bytes,
          wire_bytes = up.out.wire_bytes,
        frames = up.out.frames, "stream ended");
    up.pg.terminate().await;
    match (result, drained) {
        (Ok(()), Some(Err(e))) => Err(anyhow::Error::from(e).context("read from receiver")),
        (r, _) => r,
    }
}

/// Serves one snapshot: the receiver's staged checksums, slot, `pg_backup_start`, the walk,
/// every file in chunks, `pg_backup_stop`. The SQL session that started the backup stays
/// open until it is stopped; if this session fails, dropping it aborts the backup.
async fn bootstrap(
    mut pg: ReplConn,
    mut frames: FrameReader<Reader>,
    out: &mut Out,
    cfg: &SessionConfig,
    name: &str,
    slot: &str,
) -> Result<()> {
    let _snapshot = cfg.metrics.snapshot();
    let mut have = Have::default();
    loop {
        match tokio::time::timeout(cfg.handshake_timeout, read_msg(&mut frames))
            .await
            .map_err(|_| {
                anyhow!(
                    "receiver sent nothing for {:?} before the backup",
                    cfg.handshake_timeout
                )
            })?? {
            Message::Have { path, sums } => have.add(path, sums)?,
            Message::StartBackup => break,
            other => bail!("expected Have or StartBackup, got {:?}", other.kind()),
        }
    }
    let (sql, connection) = snapshot::sql_session(&cfg.pg, name)
        .await
        .context("open an SQL session on the primary")?;
    let result = copy(&mut pg, &sql, out, &have, cfg, name, slot).await;
    drop(sql);
    connection.abort();
    pg.terminate().await;
    result
}

async fn copy(
    pg: &mut ReplConn,
    sql: &tokio_postgres::Client,
    out: &mut Out,
    have: &Have,
    cfg: &SessionConfig,
    name: &str,
    slot: &str,
) -> Result<()> {
    let pgdata = snapshot::data_directory(sql, cfg.pgdata.as_deref()).await?;
    // The slot must reserve WAL before the backup starts, or the backup's first segments
    // could be recycled before the copy ends.
    ensure_slot(pg, slot, Lsn::INVALID, true).await?;
    let label = format!("walship {name}");
    let start_lsn: Lsn = sql
        .query_one("SELECT pg_backup_start($1, true)::text", &[&label])
        .await
        .context("pg_backup_start")?
        .get::<_, String>(0)
        .parse()?;
    let timeline = sql
        .query_one("SELECT timeline_id FROM pg_control_checkpoint()", &[])
        .await
        .context("read the checkpoint timeline")?
        .get::<_, i32>(0) as u32;
    let tablespaces = snapshot::tablespaces(sql).await?;
    info!(receiver = %name, %start_lsn, timeline, tablespaces = tablespaces.len(), "backup started");
    let walk_dir = pgdata.clone();
    let walk_ts = tablespaces.clone();
    let entries =
        tokio::task::spawn_blocking(move || snapshot::walk(&walk_dir, &walk_ts)).await??;
    snapshot::log_walk(&entries);
    let total_bytes: u64 = entries.iter().map(Entry::size).sum();
    let file_count = entries
        .iter()
        .filter(|e| matches!(e, Entry::File { .. }))
        .count() as u64;
    out.send(&Message::BackupStart {
        start_lsn,
        timeline,
        total_bytes,
        file_count,
        tablespaces: tablespaces
            .iter()
            .map(|(oid, p)| (*oid, p.display().to_string()))
            .collect(),
    })
    .await?;
    let (mut sent, mut skipped) = (0u64, 0u64);
    for entry in &entries {
        match entry {
            Entry::Dir { rel, mode } => {
                out.send(&Message::Dir {
                    path: rel.clone(),
                    mode: *mode,
                })
                .await?;
            }
            Entry::File {
                rel,
                abs,
                size,
                mode,
            } => {
                let mut reader = ChunkReader::open(abs, *size)?;
                out.send(&Message::FileBegin {
                    path: rel.clone(),
                    size: *size,
                    mode: *mode,
                })
                .await?;
                let mut crc = 0u32;
                let mut index = 0u64;
                loop {
                    let offset = reader.offset;
                    let chunk = tokio::task::block_in_place(|| reader.next_chunk())
                        .with_context(|| format!("read {}", abs.display()))?;
                    if chunk.is_empty() {
                        break;
                    }
                    crc = crc32c::crc32c_append(crc, &chunk);
                    if !have.is_empty() && have.holds(rel, index, &chunk) {
                        skipped += chunk.len() as u64;
                        out.send(&Message::FileSame {
                            offset,
                            len: chunk.len() as u32,
                        })
                        .await?;
                    } else {
                        sent += chunk.len() as u64;
                        out.send(&Message::FileData {
                            offset,
                            data: chunk,
                        })
                        .await?;
                    }
                    index += 1;
                }
                out.send(&Message::FileEnd {
                    size: reader.offset,
                    crc32c: crc,
                })
                .await?;
            }
        }
    }
    let row = sql
        .query_one(
            "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(false)",
            &[],
        )
        .await
        .context("pg_backup_stop")?;
    let stop_lsn: Lsn = row.get::<_, String>(0).parse()?;
    let backup_label: String = row.get(1);
    let tablespace_map: String = row.get::<_, Option<String>>(2).unwrap_or_default();
    out.send(&Message::BackupEnd {
        stop_lsn,
        backup_label,
        tablespace_map,
    })
    .await?;
    info!(receiver = %name, %start_lsn, %stop_lsn, files = file_count, sent_bytes = sent, skipped_bytes = skipped,
          wire_bytes = out.wire_bytes, "backup sent");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pg(code: &str) -> PgError {
        PgError {
            severity: "ERROR".into(),
            code: code.into(),
            message: "m".into(),
        }
    }

    #[test]
    fn failures_are_classified_for_the_receiver() {
        // A missing grant, under the contexts the session adds: Setup, with the fix.
        let e = anyhow::Error::new(pg("42501")).context("pg_backup_start");
        let (code, text) = classify(&e);
        assert_eq!(code, ErrorCode::Setup);
        assert!(
            text.contains("pg_backup_start") && text.contains("To fix: grant"),
            "{text}"
        );
        // A refusal keeps its code and message.
        let e = refuse(ErrorCode::WalGone, "gone").context("stream");
        assert_eq!(classify(&e), (ErrorCode::WalGone, "gone".into()));
        // A data directory that cannot be read.
        let e = anyhow::Error::new(snapshot::DataDirUnreadable("/pgdata".into()));
        assert_eq!(classify(&e).0, ErrorCode::Setup);
        // A server shutting down, a cut connection: retried.
        let e = anyhow::Error::new(pg("57P01")).context("receive WAL from PostgreSQL");
        assert_eq!(classify(&e).0, ErrorCode::Other);
        let e = anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(classify(&e).0, ErrorCode::Other);
    }

    #[test]
    fn a_lost_slot_is_wal_gone_in_every_version() {
        let lost = |message: &str| {
            let e = anyhow::Error::new(PgError {
                message: message.into(),
                ..pg("55000")
            })
            .context("start replication");
            classify(&classify_pg_error(e, "walship_r", Lsn(0x100_0000))).0
        };
        // 18's refusal of START_REPLICATION, and the end of a stream in 15 to 17.
        assert_eq!(
            lost("can no longer access replication slot \"walship_r\""),
            ErrorCode::WalGone
        );
        assert_eq!(
            lost("requested WAL segment 000000010000000000000001 has already been removed"),
            ErrorCode::WalGone
        );
        // Other errors of that SQLSTATE (wal_level, no slots) are not a lost slot.
        assert_ne!(lost("something else"), ErrorCode::WalGone);
    }
}
