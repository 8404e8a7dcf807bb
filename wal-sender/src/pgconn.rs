//! A minimal client for PostgreSQL's streaming replication protocol.
//!
//! tokio-postgres cannot open a replication connection (it never sends `replication=true`
//! and has no CopyBoth), so this module speaks the wire protocol itself, using
//! postgres-protocol to build frontend messages and its SCRAM/md5 helpers to authenticate.
//! Connection parameters come from a libpq keyword/value string parsed by
//! `tokio_postgres::Config`.
//!
//! Every backend message is checked against [`MAX_BACKEND_MESSAGE`] before its body is
//! buffered. [`ReplConn::recv_copy`] is cancellation-safe: bytes read stay in the connection's
//! buffer until a whole message is there, so it can be used in `select!`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Buf, BufMut, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio_postgres::config::Host;
use walship_common::{pgtime, Lsn};

/// The largest backend message accepted (replication data messages are at most 128 KiB).
pub const MAX_BACKEND_MESSAGE: usize = 64 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// An error PostgreSQL reported (ErrorResponse), with its SQLSTATE.
#[derive(Debug, thiserror::Error)]
#[error("{severity}: {message} (SQLSTATE {code})")]
pub struct PgError {
    pub severity: String,
    pub code: String,
    pub message: String,
}

/// What arrives on a replication stream.
#[derive(Debug)]
pub enum CopyMessage {
    /// `'w'`: WAL bytes starting at `start_lsn`; `server_flush_lsn` is the server's WAL end.
    XLogData {
        start_lsn: Lsn,
        server_flush_lsn: Lsn,
        data: bytes::Bytes,
    },
    /// `'k'`: the server's WAL end; `reply_requested` asks for a status update now.
    Keepalive {
        server_flush_lsn: Lsn,
        reply_requested: bool,
    },
    /// The server ended the copy (end of timeline or shutdown).
    CopyDone,
}

/// Result of `IDENTIFY_SYSTEM`.
#[derive(Debug, Clone)]
pub struct SystemInfo {
    pub system_id: u64,
    pub timeline: u32,
    pub flush_lsn: Lsn,
}

/// A replication connection (`replication=true`).
pub struct ReplConn {
    stream: Box<dyn Stream>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    pub server_version: String,
}

/// Fills in what libpq would default: user from the OS, host `/var/run/postgresql`, port 5432.
pub fn parse_conninfo(conninfo: &str) -> Result<tokio_postgres::Config> {
    let mut cfg: tokio_postgres::Config = conninfo
        .parse()
        .with_context(|| format!("parse connection string {conninfo:?}"))?;
    if cfg.get_user().is_none() {
        let user = std::env::var("PGUSER").ok().or_else(|| {
            nix::unistd::User::from_uid(nix::unistd::getuid())
                .ok()
                .flatten()
                .map(|u| u.name)
        });
        cfg.user(user.ok_or_else(|| {
            anyhow!("no user in the connection string and none in the environment")
        })?);
    }
    if cfg.get_hosts().is_empty() {
        cfg.host_path("/var/run/postgresql");
    }
    Ok(cfg)
}

impl ReplConn {
    /// Connects with `replication=true` and `application_name`, and authenticates.
    pub async fn connect(cfg: &tokio_postgres::Config, application_name: &str) -> Result<ReplConn> {
        let port = cfg.get_ports().first().copied().unwrap_or(5432);
        let mut last_err = anyhow!("no host to connect to");
        for host in cfg.get_hosts() {
            let attempt = async {
                let stream: Box<dyn Stream> = match host {
                    Host::Tcp(h) => {
                        let s = TcpStream::connect((h.as_str(), port))
                            .await
                            .with_context(|| format!("connect to {h}:{port}"))?;
                        s.set_nodelay(true)?;
                        Box::new(s)
                    }
                    Host::Unix(dir) => {
                        let path: PathBuf = dir.join(format!(".s.PGSQL.{port}"));
                        Box::new(
                            UnixStream::connect(&path)
                                .await
                                .with_context(|| format!("connect to {}", path.display()))?,
                        )
                    }
                };
                let mut conn = ReplConn {
                    stream,
                    rbuf: BytesMut::with_capacity(256 << 10),
                    wbuf: BytesMut::new(),
                    server_version: String::new(),
                };
                conn.startup(cfg, application_name).await?;
                Ok::<_, anyhow::Error>(conn)
            };
            match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
                Ok(Ok(c)) => return Ok(c),
                Ok(Err(e)) => last_err = e,
                Err(_) => {
                    last_err =
                        anyhow!("connecting to PostgreSQL timed out after {CONNECT_TIMEOUT:?}")
                }
            }
        }
        Err(last_err)
    }

    async fn startup(
        &mut self,
        cfg: &tokio_postgres::Config,
        application_name: &str,
    ) -> Result<()> {
        let user = cfg.get_user().unwrap_or("postgres");
        let params = [
            ("user", user),
            ("database", "replication"),
            ("replication", "true"),
            ("application_name", application_name),
        ];
        frontend::startup_message(params.iter().copied(), &mut self.wbuf)?;
        self.flush().await?;
        let mut scram: Option<ScramSha256> = None;
        loop {
            let (tag, body) = self.read_message().await?;
            match tag {
                b'R' => {
                    let mut b = &body[..];
                    if b.len() < 4 {
                        bail!("malformed authentication request from PostgreSQL");
                    }
                    let kind = b.get_i32();
                    let password = || {
                        cfg.get_password().ok_or_else(|| {
                            anyhow!(
                                "PostgreSQL asks for a password and the connection string has none"
                            )
                        })
                    };
                    match kind {
                        0 => {}
                        3 => {
                            frontend::password_message(password()?, &mut self.wbuf)?;
                            self.flush().await?;
                        }
                        5 => {
                            if b.len() < 4 {
                                bail!("malformed md5 request from PostgreSQL");
                            }
                            let salt = [b[0], b[1], b[2], b[3]];
                            let hash = postgres_protocol::authentication::md5_hash(user.as_bytes(), password()?, salt);
                            frontend::password_message(hash.as_bytes(), &mut self.wbuf)?;
                            self.flush().await?;
                        }
                        10 => {
                            let offered = b.split(|&c| c == 0).any(|m| m == SCRAM_SHA_256.as_bytes());
                            if !offered {
                                bail!("PostgreSQL offers no SASL mechanism walship supports (SCRAM-SHA-256)");
                            }
                            let s = ScramSha256::new(password()?, ChannelBinding::unsupported());
                            frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut self.wbuf)?;
                            self.flush().await?;
                            scram = Some(s);
                        }
                        11 => {
                            let s = scram.as_mut().ok_or_else(|| anyhow!("unexpected SASL continue"))?;
                            s.update(b).context("SCRAM authentication")?;
                            frontend::sasl_response(s.message(), &mut self.wbuf)?;
                            self.flush().await?;
                        }
                        12 => {
                            let s = scram.as_mut().ok_or_else(|| anyhow!("unexpected SASL final"))?;
                            s.finish(b).context("SCRAM authentication")?;
                        }
                        other => bail!("PostgreSQL asks for authentication method {other}, which walship does not support"),
                    }
                }
                b'S' => {
                    let mut parts = body[..].split(|&c| c == 0);
                    if let (Some(k), Some(v)) = (parts.next(), parts.next()) {
                        if k == b"server_version" {
                            self.server_version = String::from_utf8_lossy(v).into_owned();
                        }
                    }
                }
                b'K' | b'N' => {}
                b'Z' => return Ok(()),
                b'E' => return Err(parse_error(&body).into()),
                t => bail!(
                    "unexpected message {:?} during PostgreSQL start-up",
                    t as char
                ),
            }
        }
    }

    /// Runs a simple query and returns its rows as text (the last result set).
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>> {
        frontend::query(sql, &mut self.wbuf)?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let (tag, body) = self.read_message().await?;
            match tag {
                b'T' => rows.clear(),
                b'D' => rows.push(parse_data_row(&body)?),
                b'C' | b'N' | b'S' | b'I' => {}
                b'E' => error = Some(parse_error(&body)),
                b'Z' => break,
                t => bail!("unexpected message {:?} in reply to {sql:?}", t as char),
            }
        }
        match error {
            Some(e) => Err(anyhow::Error::new(e).context(format!("run {sql:?}"))),
            None => Ok(rows),
        }
    }

    pub async fn identify_system(&mut self) -> Result<SystemInfo> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let row = rows
            .first()
            .ok_or_else(|| anyhow!("IDENTIFY_SYSTEM returned no row"))?;
        let col = |i: usize| {
            row.get(i)
                .and_then(|c| c.as_deref())
                .ok_or_else(|| anyhow!("IDENTIFY_SYSTEM column {i} missing"))
        };
        Ok(SystemInfo {
            system_id: col(0)?.parse().context("parse systemid")?,
            timeline: col(1)?.parse().context("parse timeline")?,
            flush_lsn: col(2)?.parse().context("parse xlogpos")?,
        })
    }

    /// `SHOW setting` through the replication connection.
    pub async fn show(&mut self, setting: &str) -> Result<String> {
        let rows = self.simple_query(&format!("SHOW {setting}")).await?;
        rows.first()
            .and_then(|r| r.first().cloned().flatten())
            .ok_or_else(|| anyhow!("SHOW {setting} returned nothing"))
    }

    /// Starts streaming; returns once the server has answered with CopyBothResponse.
    pub async fn start_replication(
        &mut self,
        slot: &str,
        start_lsn: Lsn,
        timeline: u32,
    ) -> Result<()> {
        let sql =
            format!("START_REPLICATION SLOT \"{slot}\" PHYSICAL {start_lsn} TIMELINE {timeline}");
        frontend::query(&sql, &mut self.wbuf)?;
        self.flush().await?;
        loop {
            let (tag, body) = self.read_message().await?;
            match tag {
                b'W' => return Ok(()),
                b'N' | b'S' => {}
                b'E' => return Err(parse_error(&body).into()),
                t => bail!(
                    "unexpected message {:?} in reply to START_REPLICATION",
                    t as char
                ),
            }
        }
    }

    /// Receives the next replication message. Cancellation-safe.
    pub async fn recv_copy(&mut self) -> Result<CopyMessage> {
        loop {
            let (tag, body) = self.read_message().await?;
            match tag {
                b'd' => {
                    let mut b = body;
                    if b.is_empty() {
                        bail!("empty CopyData from PostgreSQL");
                    }
                    match b.get_u8() {
                        b'w' => {
                            if b.len() < 24 {
                                bail!("short XLogData message from PostgreSQL");
                            }
                            let start_lsn = Lsn(b.get_u64());
                            let server_flush_lsn = Lsn(b.get_u64());
                            let _send_time = b.get_i64();
                            return Ok(CopyMessage::XLogData {
                                start_lsn,
                                server_flush_lsn,
                                data: b.freeze(),
                            });
                        }
                        b'k' => {
                            if b.len() < 17 {
                                bail!("short keepalive message from PostgreSQL");
                            }
                            let server_flush_lsn = Lsn(b.get_u64());
                            let _send_time = b.get_i64();
                            return Ok(CopyMessage::Keepalive {
                                server_flush_lsn,
                                reply_requested: b.get_u8() != 0,
                            });
                        }
                        t => bail!(
                            "unknown replication message {:?} from PostgreSQL",
                            t as char
                        ),
                    }
                }
                b'c' => return Ok(CopyMessage::CopyDone),
                b'N' | b'S' => {}
                b'E' => return Err(parse_error(&body).into()),
                t => bail!("unexpected message {:?} during replication", t as char),
            }
        }
    }

    /// Sends a standby status update (`'r'`). `apply` may be `Lsn::INVALID` (unknown).
    pub async fn send_status(
        &mut self,
        write: Lsn,
        flush: Lsn,
        apply: Lsn,
        reply_requested: bool,
    ) -> Result<()> {
        let mut m = BytesMut::with_capacity(34);
        m.put_u8(b'r');
        m.put_u64(write.0);
        m.put_u64(flush.0);
        m.put_u64(apply.0);
        m.put_i64(pgtime::now());
        m.put_u8(reply_requested as u8);
        frontend::CopyData::new(m.freeze())?.write(&mut self.wbuf);
        self.flush().await
    }

    /// Sends hot-standby feedback (`'h'`): the standby's oldest xmin and catalog xmin with
    /// their epochs (0 means none).
    pub async fn send_hot_standby_feedback(
        &mut self,
        xmin: u32,
        xmin_epoch: u32,
        catalog_xmin: u32,
        catalog_xmin_epoch: u32,
    ) -> Result<()> {
        let mut m = BytesMut::with_capacity(25);
        m.put_u8(b'h');
        m.put_i64(pgtime::now());
        m.put_u32(xmin);
        m.put_u32(xmin_epoch);
        m.put_u32(catalog_xmin);
        m.put_u32(catalog_xmin_epoch);
        frontend::CopyData::new(m.freeze())?.write(&mut self.wbuf);
        self.flush().await
    }

    /// Ends the session politely; errors are ignored since the connection is going away.
    /// Answers the server's CopyDone and reads what follows. After a historic timeline
    /// was streamed to its end PostgreSQL sends the next timeline and where it starts;
    /// `None` means it sent no such row (it is shutting down).
    pub async fn end_copy(&mut self) -> Result<Option<(u32, Lsn)>> {
        frontend::copy_done(&mut self.wbuf);
        self.flush().await?;
        let mut next = None;
        loop {
            let (tag, body) = match self.read_message().await {
                Ok(m) => m,
                // A server that shuts down closes the connection after its CopyDone.
                Err(_) if next.is_none() => return Ok(None),
                Err(e) => return Err(e),
            };
            match tag {
                b'D' => {
                    let row = parse_data_row(&body)?;
                    let tli = row
                        .first()
                        .cloned()
                        .flatten()
                        .and_then(|t| t.parse::<u32>().ok())
                        .ok_or_else(|| anyhow!("bad next_tli in the end-of-timeline row"))?;
                    let pos = row
                        .get(1)
                        .cloned()
                        .flatten()
                        .and_then(|p| p.parse::<Lsn>().ok())
                        .ok_or_else(|| {
                            anyhow!("bad next_tli_startpos in the end-of-timeline row")
                        })?;
                    next = Some((tli, pos));
                }
                b'd' | b'T' | b'C' | b'N' | b'S' => {}
                b'E' => return Err(parse_error(&body).into()),
                b'Z' => return Ok(next),
                t => bail!(
                    "unexpected message {:?} after the end of streaming",
                    t as char
                ),
            }
        }
    }

    /// The content of timeline `tli`'s history file.
    pub async fn timeline_history(&mut self, tli: u32) -> Result<Vec<u8>> {
        let rows = self
            .simple_query(&format!("TIMELINE_HISTORY {tli}"))
            .await?;
        rows.first()
            .and_then(|r| r.get(1).cloned().flatten())
            .map(String::into_bytes)
            .ok_or_else(|| anyhow!("TIMELINE_HISTORY {tli} returned no content"))
    }

    pub async fn terminate(mut self) {
        frontend::terminate(&mut self.wbuf);
        let _ = self.flush().await;
    }

    async fn flush(&mut self) -> Result<()> {
        self.stream
            .write_all(&self.wbuf)
            .await
            .context("send to PostgreSQL")?;
        self.wbuf.clear();
        Ok(())
    }

    /// Reads one whole message: (tag, body). The length is checked before buffering.
    async fn read_message(&mut self) -> Result<(u8, BytesMut)> {
        loop {
            if self.rbuf.len() >= 5 {
                let len =
                    u32::from_be_bytes([self.rbuf[1], self.rbuf[2], self.rbuf[3], self.rbuf[4]])
                        as usize;
                if !(4..=MAX_BACKEND_MESSAGE).contains(&len) {
                    bail!("PostgreSQL sent a message of invalid length {len}");
                }
                if self.rbuf.len() > len {
                    let mut msg = self.rbuf.split_to(1 + len);
                    let tag = msg[0];
                    msg.advance(5);
                    return Ok((tag, msg));
                }
                self.rbuf.reserve(1 + len - self.rbuf.len());
            } else {
                self.rbuf.reserve(64 << 10);
            }
            let n = self
                .stream
                .read_buf(&mut self.rbuf)
                .await
                .context("read from PostgreSQL")?;
            if n == 0 {
                bail!("PostgreSQL closed the connection");
            }
        }
    }
}

fn parse_data_row(body: &[u8]) -> Result<Vec<Option<String>>> {
    let mut b = body;
    if b.len() < 2 {
        bail!("short DataRow");
    }
    let n = b.get_i16();
    let mut row = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        if b.len() < 4 {
            bail!("short DataRow");
        }
        let len = b.get_i32();
        if len < 0 {
            row.push(None);
        } else {
            let len = len as usize;
            if b.len() < len {
                bail!("short DataRow");
            }
            row.push(Some(String::from_utf8_lossy(&b[..len]).into_owned()));
            b.advance(len);
        }
    }
    Ok(row)
}

/// Parses an ErrorResponse body into severity, SQLSTATE and message.
pub fn parse_error(body: &[u8]) -> PgError {
    let mut e = PgError {
        severity: "ERROR".into(),
        code: String::new(),
        message: String::new(),
    };
    for field in body.split(|&c| c == 0) {
        if let Some((&t, v)) = field.split_first() {
            let v = String::from_utf8_lossy(v).into_owned();
            match t {
                b'S' => e.severity = v,
                b'C' => e.code = v,
                b'M' => e.message = v,
                _ => {}
            }
        }
    }
    e
}
