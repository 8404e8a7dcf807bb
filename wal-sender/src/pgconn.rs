//! A minimal client for PostgreSQL's streaming replication protocol.
//!
//! tokio-postgres cannot open a replication connection (it never sends `replication=true`
//! and has no CopyBoth), so this module speaks the wire protocol itself, using
//! postgres-protocol to build frontend messages and its SCRAM/md5 helpers to authenticate.
//! The connection string, the password and TLS are handled as libpq handles them, by
//! [`walship_common::conninfo`] and [`walship_common::pgclient`].
//!
//! Every backend message is checked against [`MAX_BACKEND_MESSAGE`] before its body is
//! buffered. [`ReplConn::recv_copy`] is cancellation-safe: bytes read stay in the connection's
//! buffer until a whole message is there, so it can be used in `select!`.

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Buf, BufMut, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use walship_common::conninfo::{Settings, Target};
use walship_common::pgclient::{self, ConnectError, PgStream, SetupError};
use walship_common::{pgtime, Lsn};

pub use walship_common::pgclient::PgError;

/// The largest backend message accepted (replication data messages are at most 128 KiB).
pub const MAX_BACKEND_MESSAGE: usize = 64 << 20;
/// The database a physical replication connection names, for the password file (as
/// pg_basebackup does).
const REPLICATION_DB: &str = "replication";

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
    stream: PgStream,
    rbuf: BytesMut,
    wbuf: BytesMut,
    pub server_version: String,
}

impl ReplConn {
    /// Connects with `replication=true` and `application_name` to the first of the hosts
    /// that accepts, and authenticates. The error of the last host tried is returned.
    pub async fn connect(
        pg: &Settings,
        application_name: &str,
    ) -> std::result::Result<ReplConn, ConnectError> {
        let mut last = None;
        for target in &pg.targets {
            let attempt = async {
                let stream = pgclient::open(pg, target).await?;
                let mut conn = ReplConn {
                    stream,
                    rbuf: BytesMut::with_capacity(256 << 10),
                    wbuf: BytesMut::new(),
                    server_version: String::new(),
                };
                conn.startup(pg, target, application_name).await?;
                Ok::<_, ConnectError>(conn)
            };
            match tokio::time::timeout(pg.connect_timeout, attempt).await {
                Ok(Ok(c)) => return Ok(c),
                Ok(Err(e)) => last = Some(e),
                Err(_) => {
                    last = Some(ConnectError::Timeout {
                        target: target.to_string(),
                        after: pg.connect_timeout,
                    })
                }
            }
        }
        Err(last.unwrap_or_else(|| ConnectError::Other {
            target: pg.to_string(),
            text: "no host to connect to".into(),
        }))
    }

    /// The start-up message and authentication, until the server is ready for queries.
    async fn startup(
        &mut self,
        pg: &Settings,
        target: &Target,
        application_name: &str,
    ) -> std::result::Result<(), ConnectError> {
        let other = |text: String| ConnectError::Other {
            target: target.to_string(),
            text,
        };
        let user = pg.user.as_str();
        let mut params = vec![
            ("user", user),
            ("database", REPLICATION_DB),
            ("replication", "true"),
            ("application_name", application_name),
        ];
        if let Some(o) = &pg.options {
            params.push(("options", o.as_str()));
        }
        frontend::startup_message(params.iter().copied(), &mut self.wbuf)
            .map_err(|e| other(format!("build the start-up message: {e}")))?;
        self.flush().await.map_err(|e| other(format!("{e:#}")))?;
        let password = || {
            pg.password(target, REPLICATION_DB).ok_or_else(|| {
                ConnectError::from(SetupError::NoPassword {
                    target: target.to_string(),
                    user: user.to_owned(),
                    sources: pg.password_sources(),
                })
            })
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            let (tag, body) = self
                .read_message()
                .await
                .map_err(|e| other(format!("{e:#}")))?;
            match tag {
                b'R' => {
                    let mut b = &body[..];
                    if b.len() < 4 {
                        return Err(other("malformed authentication request".into()));
                    }
                    match b.get_i32() {
                        0 => {}
                        3 => {
                            let pw = password()?;
                            frontend::password_message(pw.as_bytes(), &mut self.wbuf)
                                .map_err(|e| other(e.to_string()))?;
                        }
                        5 => {
                            if b.len() < 4 {
                                return Err(other("malformed md5 request".into()));
                            }
                            let salt = [b[0], b[1], b[2], b[3]];
                            let hash = postgres_protocol::authentication::md5_hash(
                                user.as_bytes(),
                                password()?.as_bytes(),
                                salt,
                            );
                            frontend::password_message(hash.as_bytes(), &mut self.wbuf)
                                .map_err(|e| other(e.to_string()))?;
                        }
                        10 => {
                            let offered =
                                b.split(|&c| c == 0).any(|m| m == SCRAM_SHA_256.as_bytes());
                            if !offered {
                                return Err(other("the server offers no SASL mechanism walship supports (SCRAM-SHA-256)".into()));
                            }
                            let s = ScramSha256::new(
                                password()?.as_bytes(),
                                ChannelBinding::unsupported(),
                            );
                            frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut self.wbuf)
                                .map_err(|e| other(e.to_string()))?;
                            scram = Some(s);
                        }
                        11 => {
                            let s = scram
                                .as_mut()
                                .ok_or_else(|| other("unexpected SASL continue".into()))?;
                            s.update(b)
                                .map_err(|e| other(format!("SCRAM authentication: {e}")))?;
                            frontend::sasl_response(s.message(), &mut self.wbuf)
                                .map_err(|e| other(e.to_string()))?;
                        }
                        12 => {
                            let s = scram
                                .as_mut()
                                .ok_or_else(|| other("unexpected SASL final".into()))?;
                            s.finish(b)
                                .map_err(|e| other(format!("SCRAM authentication: {e}")))?;
                        }
                        kind => {
                            return Err(other(format!(
                                "the server asks for authentication method {kind}, which walship does not support"
                            )))
                        }
                    }
                    if !self.wbuf.is_empty() {
                        self.flush().await.map_err(|e| other(format!("{e:#}")))?;
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
                b'E' => {
                    return Err(ConnectError::Server {
                        target: target.to_string(),
                        error: parse_error(&body),
                    })
                }
                t => {
                    return Err(other(format!(
                        "unexpected message {:?} during start-up",
                        t as char
                    )))
                }
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
