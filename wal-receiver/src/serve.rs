//! `follow --serve-standby`: the part of PostgreSQL's streaming replication protocol that a
//! stock standby's walreceiver uses, served straight from the WAL store.
//!
//! - Startup: `N` to an SSL or GSS request, trust authentication, `ParameterStatus`,
//!   `BackendKeyData`, `ReadyForQuery`.
//! - `IDENTIFY_SYSTEM` with the store's system identifier, timeline and flush position.
//! - `TIMELINE_HISTORY n` from the store's history files.
//! - `START_REPLICATION [SLOT s] [PHYSICAL] X/Y [TIMELINE n]`, then CopyBoth: `w` messages
//!   of at most 128 KiB, never past the store's persisted flush position, `k` keepalives,
//!   and the standby's `r` (positions) and `h` (hot-standby feedback), which go upstream.
//! - The end of a timeline: a standby streaming a timeline that the store has left (or
//!   leaves while it streams) gets WAL up to the switch point, then CopyDone, and after its
//!   own CopyDone the `next_tli, next_tli_startpos` row, as PostgreSQL's walsender sends it.
//!   The standby then asks for the new history file and streams the new timeline.
//! - CopyDone and Terminate.
//!
//! WAL goes to the standby as soon as it is fsynced in the store, and never before: the
//! follow loop publishes each new flush position. One standby is served at a time, so the
//! replay position reported upstream is that standby's.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};
use walship_common::tls::{self, Reader, Writer};
use walship_common::{pgtime, Lsn, TimelineId, WalFileName, WalSegSize};

use crate::sealed;
use crate::walread::WalReader;
use walship_common::timeline::{read_history_file, History};

/// Where the standby connects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServeAddr {
    /// A Unix socket `DIR/.s.PGSQL.PORT`, as PostgreSQL names its own.
    Unix { dir: PathBuf, port: u16 },
    /// A TCP address; it must be a loopback address (authentication is trust).
    Tcp(std::net::SocketAddr),
}

impl ServeAddr {
    /// `DIR` (absolute, a Unix socket directory) with `port`, or `HOST:PORT` on loopback.
    pub fn parse(s: &str, port: u16) -> Result<ServeAddr, String> {
        if s.starts_with('/') {
            return Ok(ServeAddr::Unix {
                dir: PathBuf::from(s),
                port,
            });
        }
        let addr: std::net::SocketAddr = s.parse().map_err(|_| {
            format!("--serve-standby {s:?} is neither an absolute socket directory nor IP:PORT")
        })?;
        if !addr.ip().is_loopback() {
            return Err(format!(
                "--serve-standby {addr}: the standby is served with trust authentication, so only a Unix socket or a loopback address is allowed"
            ));
        }
        Ok(ServeAddr::Tcp(addr))
    }
}

impl std::fmt::Display for ServeAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServeAddr::Unix { dir, port } => write!(f, "{}/.s.PGSQL.{port}", dir.display()),
            ServeAddr::Tcp(a) => write!(f, "{a}"),
        }
    }
}

/// What the standby server needs to know of the store; the follow loop publishes it after
/// every flush.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreView {
    pub system_id: u64,
    pub timeline: TimelineId,
    pub seg_size: WalSegSize,
    pub pg_version: u32,
    /// The persisted flush position: the standby is never sent anything past it.
    pub flush_lsn: Lsn,
}

/// What the standby reported last.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Feedback {
    pub application_name: String,
    pub connected: bool,
    pub write_lsn: Lsn,
    pub flush_lsn: Lsn,
    pub apply_lsn: Lsn,
    pub xmin: u32,
    pub xmin_epoch: u32,
    pub catalog_xmin: u32,
    pub catalog_xmin_epoch: u32,
    /// When the standby last reported, in seconds since the Unix epoch.
    pub reply_time: u64,
}

/// The two ends the follow loop keeps.
pub struct Feed {
    pub view: watch::Sender<Option<StoreView>>,
    pub feedback: watch::Receiver<Feedback>,
    /// The Unix socket file served on, removed at [`Feed::stop`].
    socket: Option<PathBuf>,
}

impl Feed {
    /// Ends the service when `follow` stops: a connected standby is sent `FATAL 57P01`
    /// (what a PostgreSQL server says to its sessions when it shuts down) and its
    /// connection closed; this waits up to `within` for that, then removes the socket file,
    /// as PostgreSQL removes its own.
    pub async fn stop(self, within: Duration) {
        let Feed {
            view,
            mut feedback,
            socket,
        } = self;
        // Every connection's next wait on the view ends: it says goodbye and closes.
        drop(view);
        if tokio::time::timeout(within, feedback.wait_for(|f| !f.connected))
            .await
            .is_err()
        {
            warn!("the standby's connection did not close within {within:?} of the stop");
        }
        if let Some(path) = socket {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// `follow` is stopping: the standby's connection ends with `FATAL 57P01`.
#[derive(Debug, thiserror::Error)]
#[error("wal-receiver is stopping")]
struct Stopping;

/// Largest startup packet accepted (PostgreSQL allows 10000 bytes).
const MAX_STARTUP_LEN: usize = 10_000;
/// Largest message accepted from the standby: queries and feedback are small.
const MAX_MESSAGE_LEN: usize = 64 << 10;
/// Largest `w` message, as PostgreSQL's walsender (MAX_SEND_SIZE).
const MAX_SEND: usize = 128 << 10;
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const SSL_REQUEST: i32 = 80877103;
const GSS_REQUEST: i32 = 80877104;
const CANCEL_REQUEST: i32 = 80877102;
const PROTOCOL_3: i32 = 196608;

/// Starts serving standbys at `addr` from the store in `dir`. Fails at once if the address
/// cannot be bound.
pub async fn start(addr: &ServeAddr, dir: &Path) -> Result<Feed> {
    let (view_tx, view_rx) = watch::channel(None);
    let (fb_tx, fb_rx) = watch::channel(Feedback::default());
    let ctx = Ctx {
        dir: dir.to_owned(),
        view: view_rx,
        feedback: Arc::new(fb_tx),
        busy: Arc::new(AtomicBool::new(false)),
        corrupt: sealed::Verdicts::default(),
        // The store exists: `follow` opened it before serving.
        owner: std::fs::metadata(dir)
            .map(|m| m.uid())
            .unwrap_or_else(|_| nix::unistd::geteuid().as_raw()),
    };
    let mut socket = None;
    let listener = match addr {
        ServeAddr::Unix {
            dir: sock_dir,
            port,
        } => {
            let path = sock_dir.join(format!(".s.PGSQL.{port}"));
            socket = Some(path.clone());
            remove_stale_socket(&path).await?;
            let listener = UnixListener::bind(&path)
                .with_context(|| format!("listen on {} for the standby", path.display()))?;
            // Open to all, as PostgreSQL's own socket (unix_socket_permissions = 0777): the
            // directory's permissions, then peer authentication, decide who connects.
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777))?;
            Listener::Unix(listener)
        }
        ServeAddr::Tcp(a) => Listener::Tcp(
            TcpListener::bind(a)
                .await
                .with_context(|| format!("listen on {a} for the standby"))?,
        ),
    };
    info!(address = %addr, "serving the standby (PostgreSQL streaming replication)");
    let shown = addr.to_string();
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((rd, wr, peer)) => {
                    let ctx = ctx.clone();
                    tokio::spawn(async move { ctx.connection(rd, wr, peer).await });
                }
                Err(e) => {
                    warn!(address = %shown, "accept for the standby failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(Feed {
        view: view_tx,
        feedback: fb_rx,
        socket,
    })
}

/// The standby's listener, on a Unix socket or on TCP.
enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// Who is at the other end of a standby connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Peer {
    /// A Unix socket: the OS user of the connecting process (SO_PEERCRED), `None` when the
    /// kernel would not tell.
    Unix(Option<u32>),
    /// TCP on loopback: the OS user cannot be known.
    Tcp,
}

impl Listener {
    /// The next connection, as plain read and write halves, and who made it.
    async fn accept(&self) -> std::io::Result<(Reader, Writer, Peer)> {
        Ok(match self {
            Listener::Unix(l) => {
                let (s, _) = l.accept().await?;
                let uid = s.peer_cred().ok().map(|c| c.uid());
                let (r, w) = tls::split(s);
                (r, w, Peer::Unix(uid))
            }
            Listener::Tcp(l) => {
                let (s, _) = l.accept().await?;
                let _ = s.set_nodelay(true);
                let (r, w) = tls::split(s);
                (r, w, Peer::Tcp)
            }
        })
    }
}

/// A socket file left by a process that is gone is removed; one that answers is in use.
async fn remove_stale_socket(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                bail!(
                    "{} is in use: another wal-receiver or a PostgreSQL server listens there",
                    path.display()
                );
            }
            std::fs::remove_file(path).with_context(|| format!("remove stale {}", path.display()))
        }
        Ok(_) => bail!("{} exists and is not a socket", path.display()),
        Err(_) => Ok(()),
    }
}

#[derive(Clone)]
struct Ctx {
    dir: PathBuf,
    view: watch::Receiver<Option<StoreView>>,
    feedback: Arc<watch::Sender<Feedback>>,
    /// A standby is being served.
    busy: Arc<AtomicBool>,
    /// Sealed segments found corrupt, kept across connections: a standby that asks again
    /// for one (its walreceiver retries every `wal_retrieve_retry_interval`) is answered
    /// without decompressing it again, until the file changes.
    corrupt: sealed::Verdicts,
    /// The OS user that owns the store: the only one served on a Unix socket.
    owner: u32,
}

/// A message from the standby, after startup.
enum Front {
    Query(String),
    CopyData(Vec<u8>),
    CopyDone,
    Terminate,
}

/// Backend messages, written into one buffer.
#[derive(Default)]
struct Out(Vec<u8>);

impl Out {
    fn msg(&mut self, kind: u8, body: &[u8]) {
        self.0.push(kind);
        self.0
            .extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        self.0.extend_from_slice(body);
    }
    fn parameter(&mut self, name: &str, value: &str) {
        let mut b = Vec::new();
        cstr(&mut b, name);
        cstr(&mut b, value);
        self.msg(b'S', &b);
    }
    fn error(&mut self, severity: &str, code: &str, message: &str) {
        let mut b = Vec::new();
        for (field, value) in [
            (b'S', severity),
            (b'V', severity),
            (b'C', code),
            (b'M', message),
        ] {
            b.push(field);
            cstr(&mut b, value);
        }
        b.push(0);
        self.msg(b'E', &b);
    }
    fn ready(&mut self) {
        self.msg(b'Z', b"I");
    }
    fn complete(&mut self, tag: &str) {
        let mut b = Vec::new();
        cstr(&mut b, tag);
        self.msg(b'C', &b);
    }
    /// A RowDescription of text-format columns (name, type oid).
    fn columns(&mut self, cols: &[(&str, u32)]) {
        let mut b = Vec::new();
        b.extend_from_slice(&(cols.len() as i16).to_be_bytes());
        for (name, oid) in cols {
            cstr(&mut b, name);
            b.extend_from_slice(&0i32.to_be_bytes()); // table oid
            b.extend_from_slice(&0i16.to_be_bytes()); // column number
            b.extend_from_slice(&oid.to_be_bytes());
            b.extend_from_slice(&(-1i16).to_be_bytes()); // type size
            b.extend_from_slice(&0i32.to_be_bytes()); // type modifier
            b.extend_from_slice(&0i16.to_be_bytes()); // text format
        }
        self.msg(b'T', &b);
    }
    fn row(&mut self, values: &[Option<&[u8]>]) {
        let mut b = Vec::new();
        b.extend_from_slice(&(values.len() as i16).to_be_bytes());
        for v in values {
            match v {
                Some(v) => {
                    b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    b.extend_from_slice(v);
                }
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        self.msg(b'D', &b);
    }
    async fn send(&mut self, w: &mut Writer) -> Result<()> {
        w.write_all(&self.0).await?;
        w.flush().await?;
        self.0.clear();
        Ok(())
    }
}

fn cstr(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(s.as_bytes());
    b.push(0);
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Reads the startup packet (answering SSL and GSS requests with `N`). Returns its
/// parameters, or `None` for a cancel request.
async fn startup<R, W>(r: &mut R, w: &mut W) -> Result<Option<Vec<(String, String)>>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let len = r.read_i32().await? as usize;
        if !(8..=MAX_STARTUP_LEN).contains(&len) {
            bail!("startup packet of {len} bytes");
        }
        let mut body = vec![0u8; len - 4];
        r.read_exact(&mut body).await?;
        let code = i32::from_be_bytes(body[0..4].try_into().expect("4 bytes"));
        match code {
            SSL_REQUEST | GSS_REQUEST => {
                w.write_all(b"N").await?;
                w.flush().await?;
            }
            CANCEL_REQUEST => return Ok(None),
            PROTOCOL_3 => {
                let mut params = Vec::new();
                let mut parts = body[4..].split(|&b| b == 0);
                while let Some(k) = parts.next() {
                    if k.is_empty() {
                        break;
                    }
                    let v = parts.next().unwrap_or_default();
                    params.push((
                        String::from_utf8_lossy(k).into_owned(),
                        String::from_utf8_lossy(v).into_owned(),
                    ));
                }
                return Ok(Some(params));
            }
            other => bail!("unsupported protocol version {other:#x}"),
        }
    }
}

/// Reads frontend messages on its own task (reads are not cancellation-safe).
fn spawn_reader(mut r: Reader) -> mpsc::Receiver<Result<Front>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let item = async {
                let kind = r.read_u8().await?;
                let len = r.read_i32().await?;
                if len < 4 || len as usize - 4 > MAX_MESSAGE_LEN {
                    bail!("message {:?} of {len} bytes", kind as char);
                }
                let mut body = vec![0u8; len as usize - 4];
                r.read_exact(&mut body).await?;
                Ok(match kind {
                    b'Q' => {
                        let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
                        Front::Query(String::from_utf8_lossy(&body[..end]).into_owned())
                    }
                    b'd' => Front::CopyData(body),
                    b'c' => Front::CopyDone,
                    b'X' => Front::Terminate,
                    other => bail!("unsupported message {:?}", other as char),
                })
            }
            .await;
            let stop = item.is_err();
            if tx.send(item).await.is_err() || stop {
                return;
            }
        }
    });
    rx
}

/// A parsed `START_REPLICATION [SLOT s] [PHYSICAL] X/Y [TIMELINE n]`.
fn parse_start(words: &[&str]) -> Result<(Lsn, Option<u32>), String> {
    let mut i = 1;
    if words.get(i).is_some_and(|w| w.eq_ignore_ascii_case("SLOT")) {
        i += 2;
    }
    if words
        .get(i)
        .is_some_and(|w| w.eq_ignore_ascii_case("LOGICAL"))
    {
        return Err("logical replication is not served".into());
    }
    if words
        .get(i)
        .is_some_and(|w| w.eq_ignore_ascii_case("PHYSICAL"))
    {
        i += 1;
    }
    let lsn: Lsn = words
        .get(i)
        .and_then(|w| w.parse().ok())
        .ok_or("START_REPLICATION needs a start position X/Y")?;
    i += 1;
    let timeline = match words.get(i) {
        Some(w) if w.eq_ignore_ascii_case("TIMELINE") => Some(
            words
                .get(i + 1)
                .and_then(|t| t.parse::<u32>().ok())
                .ok_or("TIMELINE needs a number")?,
        ),
        Some(w) => return Err(format!("unexpected {w:?} in START_REPLICATION")),
        None => None,
    };
    Ok((lsn, timeline))
}

impl Ctx {
    /// Peer authentication, as PostgreSQL's `peer` method: on a Unix socket only the OS user
    /// that owns the store is served (the standby runs as that user), so no other local
    /// user can read WAL through the socket. Why `peer` is refused, if it is.
    fn refusal(&self, peer: Peer) -> Option<String> {
        let uid = match peer {
            Peer::Tcp => return None,
            Peer::Unix(Some(uid)) if uid == self.owner => return None,
            Peer::Unix(uid) => uid,
        };
        let owner = crate::access::user_label(nix::unistd::Uid::from_raw(self.owner));
        Some(match uid {
            Some(uid) => format!(
                "peer authentication failed: wal-receiver serves the standby only to the OS user that owns the WAL store, {owner}; this connection is from {}",
                crate::access::user_label(nix::unistd::Uid::from_raw(uid))
            ),
            None => format!(
                "peer authentication failed: the OS user of this connection could not be determined; wal-receiver serves the standby only to {owner}"
            ),
        })
    }

    async fn connection(mut self, mut rd: Reader, mut wr: Writer, peer: Peer) {
        let params =
            match tokio::time::timeout(Duration::from_secs(30), startup(&mut rd, &mut wr)).await {
                Ok(Ok(Some(p))) => p,
                Ok(Ok(None)) => return,
                Ok(Err(e)) => {
                    warn!("standby connection refused: {e:#}");
                    return;
                }
                Err(_) => {
                    warn!("standby connection closed: no startup packet within 30 s");
                    return;
                }
            };
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let app = get("application_name").unwrap_or_default();
        let mut out = Out::default();
        if let Some(why) = self.refusal(peer) {
            warn!(application_name = %app, "standby connection refused: {why}");
            out.error("FATAL", "28000", &why);
            let _ = out.send(&mut wr).await;
            return;
        }
        let physical = get("replication").is_some_and(|v| {
            matches!(v.to_ascii_lowercase().as_str(), "true" | "on" | "yes" | "1")
        });
        if !physical {
            out.error(
                "FATAL",
                "28000",
                "wal-receiver serves only physical replication connections (replication=true)",
            );
            let _ = out.send(&mut wr).await;
            return;
        }
        if self.busy.swap(true, Ordering::SeqCst) {
            out.error(
                "FATAL",
                "53300",
                "wal-receiver already serves a standby; it serves one at a time",
            );
            let _ = out.send(&mut wr).await;
            return;
        }
        info!(application_name = %app, "standby connected");
        let result = self.session(rd, &mut wr, &mut out, &app).await;
        match &result {
            Ok(()) => info!(application_name = %app, "standby disconnected"),
            Err(e) if e.is::<Stopping>() => {
                // Nothing is half-written at the waits that see the stop.
                out.0.clear();
                out.error(
                    "FATAL",
                    "57P01",
                    "terminating connection because wal-receiver is stopping",
                );
                let _ = out.send(&mut wr).await;
                info!(application_name = %app, "standby disconnected: wal-receiver is stopping");
            }
            // A corrupt segment is reported once, when found, not at every retry.
            Err(e) => match sealed::corruption(e) {
                Some(c) if c.known => {
                    debug!(application_name = %app, "standby session ended: {e:#}")
                }
                Some(_) => {
                    error!(application_name = %app, "standby session ended: {e:#}. The standby cannot be served past it until the segment is repaired (copy it from another WAL store or from the primary's pg_wal)")
                }
                None => warn!(application_name = %app, "standby session ended: {e:#}"),
            },
        }
        // Without a standby there is no hot-standby feedback to hold the primary's xmin.
        self.feedback.send_modify(|f| {
            f.connected = false;
            f.xmin = 0;
            f.xmin_epoch = 0;
            f.catalog_xmin = 0;
            f.catalog_xmin_epoch = 0;
        });
        self.busy.store(false, Ordering::SeqCst);
    }

    /// The store's view, waiting until the store is initialised.
    async fn view(&mut self) -> Result<StoreView> {
        let v = self
            .view
            .wait_for(|v| v.is_some())
            .await
            .map_err(|_| Stopping)?;
        Ok(v.expect("waited for Some"))
    }

    async fn session(
        &mut self,
        rd: Reader,
        wr: &mut Writer,
        out: &mut Out,
        app: &str,
    ) -> Result<()> {
        let view = self.view().await?;
        out.msg(b'R', &0i32.to_be_bytes());
        let version = format!("{}.0 (walship)", view.pg_version.max(15));
        for (k, v) in [
            ("server_version", version.as_str()),
            ("server_encoding", "UTF8"),
            ("client_encoding", "UTF8"),
            ("DateStyle", "ISO, MDY"),
            ("integer_datetimes", "on"),
            ("standard_conforming_strings", "on"),
            ("application_name", app),
        ] {
            out.parameter(k, v);
        }
        let mut key = Vec::new();
        key.extend_from_slice(&(std::process::id() as i32).to_be_bytes());
        key.extend_from_slice(&0i32.to_be_bytes());
        out.msg(b'K', &key);
        out.ready();
        out.send(wr).await?;
        self.feedback.send_modify(|f| {
            f.application_name = app.to_owned();
            f.connected = true;
        });
        let mut front = spawn_reader(rd);
        loop {
            let msg = front
                .recv()
                .await
                .ok_or_else(|| anyhow!("reader stopped"))??;
            let query = match msg {
                Front::Query(q) => q,
                Front::Terminate => return Ok(()),
                Front::CopyData(_) | Front::CopyDone => bail!("COPY data outside COPY"),
            };
            let q = query.trim().trim_end_matches(';').trim();
            let words: Vec<&str> = q.split_whitespace().collect();
            let command = words
                .first()
                .map(|w| w.to_ascii_uppercase())
                .unwrap_or_default();
            let view = self.view().await?;
            match command.as_str() {
                "IDENTIFY_SYSTEM" => {
                    out.columns(&[
                        ("systemid", 25),
                        ("timeline", 23),
                        ("xlogpos", 25),
                        ("dbname", 25),
                    ]);
                    let (sys, tl, pos) = (
                        view.system_id.to_string(),
                        view.timeline.0.to_string(),
                        view.flush_lsn.to_string(),
                    );
                    out.row(&[
                        Some(sys.as_bytes()),
                        Some(tl.as_bytes()),
                        Some(pos.as_bytes()),
                        None,
                    ]);
                    out.complete("IDENTIFY_SYSTEM");
                    out.ready();
                }
                "TIMELINE_HISTORY" => {
                    let tli: Option<u32> = words.get(1).and_then(|w| w.parse().ok());
                    let name =
                        tli.map(|t| WalFileName::History(TimelineId(t)).to_name(view.seg_size));
                    match name
                        .as_ref()
                        .map(|n| (n, read_history_file(&self.dir.join(n))))
                    {
                        Some((n, Ok(content))) => {
                            out.columns(&[("filename", 25), ("content", 17)]);
                            out.row(&[Some(n.as_bytes()), Some(&content)]);
                            out.complete("TIMELINE_HISTORY");
                        }
                        _ => out.error(
                            "ERROR",
                            "58P01",
                            &format!(
                                "could not open the history file for timeline {}",
                                words.get(1).unwrap_or(&"?")
                            ),
                        ),
                    }
                    out.ready();
                }
                "START_REPLICATION" => match parse_start(&words) {
                    Err(e) => {
                        out.error("ERROR", "42601", &e);
                        out.ready();
                    }
                    Ok((start, t)) => {
                        let t = TimelineId(t.unwrap_or(view.timeline.0));
                        match self.timeline_end(t, &view) {
                            Err(e) => {
                                out.error("ERROR", "XX000", &e);
                                out.ready();
                            }
                            Ok(Some((end, _))) if start > end => {
                                out.error("ERROR", "XX000", &format!("requested starting point {start} on timeline {} is not in this server's history\nThis server's history forked from timeline {} at {end}.", t.0, t.0));
                                out.ready();
                            }
                            Ok(None) if start > view.flush_lsn => {
                                out.error("ERROR", "XX000", &format!("requested starting point {start} is ahead of the WAL flush position of this server {}", view.flush_lsn));
                                out.ready();
                            }
                            Ok(end) => {
                                info!(application_name = %app, %start, timeline = t.0, "standby starts streaming");
                                // CopyBothResponse: text format, no columns.
                                out.msg(b'W', &[0, 0, 0]);
                                out.send(wr).await?;
                                if let Some((end, next)) = self
                                    .stream(&mut front, wr, out, start, t, end, view)
                                    .await?
                                {
                                    // End of a historic timeline: which one follows, and where.
                                    out.columns(&[("next_tli", 20), ("next_tli_startpos", 25)]);
                                    let (n, e) = (next.0.to_string(), end.to_string());
                                    out.row(&[Some(n.as_bytes()), Some(e.as_bytes())]);
                                    info!(application_name = %app, timeline = t.0, %end, next_timeline = next.0, "end of timeline sent to the standby");
                                }
                                out.complete("START_STREAMING");
                                out.ready();
                            }
                        }
                    }
                },
                _ => {
                    out.error(
                        "ERROR",
                        "42601",
                        &format!("wal-receiver does not serve {command:?}"),
                    );
                    out.ready();
                }
            }
            out.send(wr).await?;
        }
    }

    /// Where `timeline` ends in the store's history, and the timeline after it; `None` for
    /// the store's current timeline. `Err` for a timeline not in the store's history.
    fn timeline_end(
        &self,
        timeline: TimelineId,
        view: &StoreView,
    ) -> std::result::Result<Option<(Lsn, TimelineId)>, String> {
        if timeline == view.timeline {
            return Ok(None);
        }
        let not_ours = || {
            format!(
                "requested timeline {} is not in this server's history",
                timeline.0
            )
        };
        if timeline > view.timeline {
            return Err(not_ours());
        }
        let name = WalFileName::History(view.timeline).to_name(view.seg_size);
        let content = read_history_file(&self.dir.join(&name))
            .map_err(|e| format!("could not read history file {name}: {e}"))?;
        let hist = History::parse(view.timeline, &content)?;
        hist.switch_from(timeline).map(Some).ok_or_else(not_ours)
    }

    /// Streams WAL of `timeline` from `start` until the standby ends the copy (`None`), or,
    /// when the timeline is (or becomes) historic, up to its end, where it ends the copy
    /// itself and returns the end and the next timeline.
    #[allow(clippy::too_many_arguments)]
    async fn stream(
        &mut self,
        front: &mut mpsc::Receiver<Result<Front>>,
        wr: &mut Writer,
        out: &mut Out,
        start: Lsn,
        timeline: TimelineId,
        mut end: Option<(Lsn, TimelineId)>,
        first: StoreView,
    ) -> Result<Option<(Lsn, TimelineId)>> {
        let mut reader =
            WalReader::new(&self.dir, timeline, first.seg_size).with_verdicts(self.corrupt.clone());
        let mut pos = start;
        let mut view = first;
        let mut keepalive = tokio::time::interval(KEEPALIVE_INTERVAL);
        loop {
            let limit = end.map(|(e, _)| e).unwrap_or(view.flush_lsn);
            while pos < limit {
                let data = match reader.read(pos, MAX_SEND, limit) {
                    Ok(data) => data,
                    Err(e) => {
                        // Tell the standby why, as a server that cannot read its WAL does.
                        if sealed::is_corrupt(&e) {
                            out.error("ERROR", "XX001", &format!("{e:#}"));
                            out.send(wr).await?;
                        }
                        return Err(e);
                    }
                };
                let Some(data) = data else {
                    let name = WalFileName::Segment {
                        timeline,
                        segno: view.seg_size.segment_of(pos),
                    }
                    .to_name(view.seg_size);
                    out.error(
                        "ERROR",
                        "58P01",
                        &format!("requested WAL segment {name} has already been removed"),
                    );
                    out.send(wr).await?;
                    bail!("the standby asked for WAL at {pos}, which the store no longer holds");
                };
                let mut body = Vec::with_capacity(25 + data.len());
                body.push(b'w');
                body.extend_from_slice(&pos.0.to_be_bytes());
                body.extend_from_slice(&limit.0.to_be_bytes());
                body.extend_from_slice(&pgtime::now().to_be_bytes());
                body.extend_from_slice(&data);
                out.msg(b'd', &body);
                out.send(wr).await?;
                pos = Lsn(pos.0 + data.len() as u64);
            }
            if let Some(e) = end.filter(|(e, _)| pos >= *e) {
                // End of the timeline: CopyDone, then wait for the standby's.
                out.msg(b'c', &[]);
                out.send(wr).await?;
                loop {
                    match front
                        .recv()
                        .await
                        .ok_or_else(|| anyhow!("reader stopped"))??
                    {
                        Front::CopyData(d) => self.on_copy_data(&d)?,
                        Front::CopyDone => return Ok(Some(e)),
                        Front::Terminate => {
                            return Err(anyhow!(
                                "the standby terminated at the end of the timeline"
                            ))
                        }
                        Front::Query(_) => bail!("a query during streaming"),
                    }
                }
            }
            tokio::select! {
                changed = self.view.changed() => {
                    changed.map_err(|_| Stopping)?;
                    let latest = *self.view.borrow_and_update();
                    if let Some(v) = latest {
                        view = v;
                        if end.is_none() && view.timeline != timeline {
                            // The store moved to a new timeline: this one is history now.
                            end = self.timeline_end(timeline, &view).map_err(|e| anyhow!(e))?;
                        }
                    }
                }
                msg = front.recv() => {
                    match msg.ok_or_else(|| anyhow!("reader stopped"))?? {
                        Front::CopyData(d) => self.on_copy_data(&d)?,
                        Front::CopyDone => {
                            out.msg(b'c', &[]);
                            return Ok(None);
                        }
                        Front::Terminate => bail!("the standby terminated during streaming"),
                        Front::Query(_) => bail!("a query during streaming"),
                    }
                }
                _ = keepalive.tick() => {
                    let mut body = Vec::with_capacity(18);
                    body.push(b'k');
                    body.extend_from_slice(&view.flush_lsn.0.to_be_bytes());
                    body.extend_from_slice(&pgtime::now().to_be_bytes());
                    body.push(0);
                    out.msg(b'd', &body);
                    out.send(wr).await?;
                }
            }
        }
    }

    fn on_copy_data(&self, d: &[u8]) -> Result<()> {
        let u64_at = |i: usize| u64::from_be_bytes(d[i..i + 8].try_into().expect("8 bytes"));
        let u32_at = |i: usize| u32::from_be_bytes(d[i..i + 4].try_into().expect("4 bytes"));
        match d.first() {
            Some(b'r') if d.len() >= 34 => {
                let (write, flush, apply) = (Lsn(u64_at(1)), Lsn(u64_at(9)), Lsn(u64_at(17)));
                self.feedback.send_if_modified(|f| {
                    let changed = (f.write_lsn, f.flush_lsn, f.apply_lsn) != (write, flush, apply);
                    f.write_lsn = write;
                    f.flush_lsn = flush;
                    f.apply_lsn = apply;
                    f.reply_time = unix_now();
                    changed
                });
            }
            Some(b'h') if d.len() >= 25 => {
                let hs = (u32_at(9), u32_at(13), u32_at(17), u32_at(21));
                self.feedback.send_if_modified(|f| {
                    let changed =
                        (f.xmin, f.xmin_epoch, f.catalog_xmin, f.catalog_xmin_epoch) != hs;
                    (f.xmin, f.xmin_epoch, f.catalog_xmin, f.catalog_xmin_epoch) = hs;
                    changed
                });
            }
            Some(k) => bail!(
                "unexpected standby message {:?} of {} bytes",
                *k as char,
                d.len()
            ),
            None => bail!("empty CopyData from the standby"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_replication_forms() {
        let p = |s: &str| parse_start(&s.split_whitespace().collect::<Vec<_>>());
        assert_eq!(
            p("START_REPLICATION 0/22000000 TIMELINE 1"),
            Ok((Lsn(0x2200_0000), Some(1)))
        );
        assert_eq!(
            p("START_REPLICATION SLOT \"sb2slot\" PHYSICAL 0/23000000 TIMELINE 1"),
            Ok((Lsn(0x2300_0000), Some(1)))
        );
        assert_eq!(p("START_REPLICATION 1/0"), Ok((Lsn(1 << 32), None)));
        assert!(p("START_REPLICATION SLOT s LOGICAL 0/0").is_err());
        assert!(p("START_REPLICATION").is_err());
        assert!(p("START_REPLICATION 0/0 TIMELINE x").is_err());
    }

    #[test]
    fn serve_addresses() {
        assert_eq!(
            ServeAddr::parse("/var/lib/walship/s1", 5432),
            Ok(ServeAddr::Unix {
                dir: "/var/lib/walship/s1".into(),
                port: 5432
            })
        );
        assert!(ServeAddr::parse("127.0.0.1:5499", 0).is_ok());
        assert!(ServeAddr::parse("0.0.0.0:5499", 0).is_err());
        assert!(ServeAddr::parse("relative/dir", 0).is_err());
    }
}
