//! walship protocol messages, carried one per [frame](crate::frame).
//!
//! A session:
//! ```text
//! receiver                         sender
//!   Hello{version,name} ------------>
//!   <------------ ServerInfo{version,system_id,timeline,seg_size,flush_lsn,server_version,
//!                            in_recovery}
//!   GetHistory{timeline} ----------->       (any number, before StartStream)
//!   <------------ History{timeline,content}
//!   StartStream{start_lsn,timeline} ->       (sender ensures slot walship_<name>, starts
//!   <------------ WalData / Keepalive         replication from start_lsn on that slot)
//!   Ack{write_lsn,flush_lsn} ------->       (reported upstream as the standby's flush)
//!   <------------ EndOfTimeline{next_timeline,switch_lsn}   (a historic timeline was
//!                                            streamed to its end; the session ends)
//!   <------------ Error{code,message}        (either side may end with an error)
//! ```
//! A bootstrap session (`Hello.mode == Bootstrap`) continues after `ServerInfo` with:
//! ```text
//!   Have{path,sums} ... ------------>       (chunk checksums of files already staged)
//!   StartBackup -------------------->       (sender: slot, pg_backup_start, walk PGDATA)
//!   <------------ BackupStart{start_lsn,timeline,total_bytes,file_count,tablespaces}
//!   <------------ Dir / FileBegin, FileData | FileSame ..., FileEnd   (pg_control last)
//!   <------------ BackupEnd{stop_lsn,backup_label,tablespace_map}
//! ```
//! A file travels in [`CHUNK_LEN`] chunks; a chunk whose checksum pair matches the
//! receiver's `Have` entry is sent as `FileSame` instead of its bytes.
//! All integers are little-endian. Strings are a u16 length and UTF-8 bytes. Every decoder
//! checks each length against the bytes present (and against a small maximum) before use,
//! and a message with trailing bytes is rejected.

use crate::frame::{Frame, FrameEncoder, FrameError};
use crate::lsn::Lsn;

/// The protocol version this build speaks. Peers with another version are refused.
pub const PROTOCOL_VERSION: u16 = 2;
/// Longest string field (names, messages, versions).
pub const MAX_STRING_LEN: usize = 4096;
/// Longest long-string field (backup_label, tablespace_map).
pub const MAX_LONG_STRING_LEN: usize = 1 << 20;
/// Files travel in chunks of this size.
pub const CHUNK_LEN: u64 = 1 << 20;
/// Most checksums one `Have` message may carry.
pub const MAX_SUMS_PER_MESSAGE: usize = 1 << 17;
/// Most tablespaces a backup may announce.
pub const MAX_TABLESPACES: usize = 4096;
/// Longest receiver name: the slot `walship_<name>` must fit PostgreSQL's 63-byte names.
pub const MAX_NAME_LEN: usize = 63 - "walship_".len();

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    ServerInfo = 2,
    StartStream = 3,
    WalData = 4,
    Keepalive = 5,
    Ack = 6,
    Error = 7,
    Have = 8,
    StartBackup = 9,
    BackupStart = 10,
    Dir = 11,
    FileBegin = 12,
    FileData = 13,
    FileSame = 14,
    FileEnd = 15,
    BackupEnd = 16,
    StandbyFeedback = 17,
    GetHistory = 18,
    History = 19,
    EndOfTimeline = 20,
}

impl Kind {
    fn from_u8(k: u8) -> Option<Kind> {
        use Kind::*;
        Some(match k {
            1 => Hello,
            2 => ServerInfo,
            3 => StartStream,
            4 => WalData,
            5 => Keepalive,
            6 => Ack,
            7 => Error,
            8 => Have,
            9 => StartBackup,
            10 => BackupStart,
            11 => Dir,
            12 => FileBegin,
            13 => FileData,
            14 => FileSame,
            15 => FileEnd,
            16 => BackupEnd,
            17 => StandbyFeedback,
            18 => GetHistory,
            19 => History,
            20 => EndOfTimeline,
            _ => return None,
        })
    }
}

/// What a receiver wants from a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// Stream WAL (`wal-receiver follow`).
    Follow = 1,
    /// Take a snapshot of the data directory (`wal-receiver bootstrap`).
    Bootstrap = 2,
}

/// The checksum pair that identifies a chunk's content: CRC-32C in the high half, CRC32
/// (IEEE) in the low half. Two independent 32-bit checksums make an accidental match of a
/// changed chunk a 1 in 2^64 event.
pub fn chunk_sum(data: &[u8]) -> u64 {
    ((crc32c::crc32c(data) as u64) << 32) | crc32fast::hash(data) as u64
}

/// Error codes a sender can send in [`Message::Error`]. The receiver branches on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// Anything else; the receiver retries.
    Other = 1,
    /// The peer speaks another protocol version.
    Version = 2,
    /// The receiver's name is not acceptable.
    BadName = 3,
    /// The primary no longer has the WAL the receiver asked for.
    WalGone = 4,
    /// The request does not fit the primary (e.g. a timeline it does not have).
    BadRequest = 5,
    /// TLS is required, or the receiver's certificate does not allow the name it gave.
    Auth = 6,
    /// The sender cannot use its PostgreSQL server as configured (authentication, a role,
    /// a database, a grant, a setting); retrying cannot help. The message names the fix.
    /// Older receivers read it as `Other` and retry.
    Setup = 7,
}

impl ErrorCode {
    pub fn from_u16(v: u16) -> ErrorCode {
        match v {
            2 => ErrorCode::Version,
            3 => ErrorCode::BadName,
            4 => ErrorCode::WalGone,
            5 => ErrorCode::BadRequest,
            6 => ErrorCode::Auth,
            7 => ErrorCode::Setup,
            _ => ErrorCode::Other,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Hello {
        version: u16,
        name: String,
        mode: Mode,
    },
    ServerInfo {
        version: u16,
        system_id: u64,
        timeline: u32,
        seg_size: u32,
        flush_lsn: Lsn,
        server_version: String,
        /// The server is a standby (in recovery), not a primary.
        in_recovery: bool,
    },
    /// Asks for timeline `timeline`'s history file.
    GetHistory {
        timeline: u32,
    },
    /// A timeline history file, as PostgreSQL wrote it.
    History {
        timeline: u32,
        content: Vec<u8>,
    },
    /// The timeline being streamed ended at `switch_lsn`; `next_timeline` follows it. All
    /// WAL up to `switch_lsn` was sent before this.
    EndOfTimeline {
        next_timeline: u32,
        switch_lsn: Lsn,
    },
    StartStream {
        start_lsn: Lsn,
        timeline: u32,
    },
    /// WAL bytes starting at `start_lsn`; `server_flush_lsn` is the primary's flush position.
    WalData {
        start_lsn: Lsn,
        server_flush_lsn: Lsn,
        data: Vec<u8>,
    },
    Keepalive {
        server_flush_lsn: Lsn,
    },
    /// `flush_lsn <= write_lsn`; everything below `flush_lsn` is fsynced on the receiver.
    Ack {
        write_lsn: Lsn,
        flush_lsn: Lsn,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    /// A staged file's chunk checksums ([`chunk_sum`]) from an earlier attempt.
    Have {
        path: String,
        sums: Vec<u64>,
    },
    StartBackup,
    BackupStart {
        start_lsn: Lsn,
        timeline: u32,
        total_bytes: u64,
        file_count: u64,
        /// (oid, location on the primary)
        tablespaces: Vec<(u32, String)>,
    },
    Dir {
        path: String,
        mode: u32,
    },
    FileBegin {
        path: String,
        size: u64,
        mode: u32,
    },
    FileData {
        offset: u64,
        data: Vec<u8>,
    },
    /// The chunk at `offset` equals the receiver's staged copy.
    FileSame {
        offset: u64,
        len: u32,
    },
    /// `crc32c` covers the whole file as sent, `size` bytes.
    FileEnd {
        size: u64,
        crc32c: u32,
    },
    BackupEnd {
        stop_lsn: Lsn,
        backup_label: String,
        tablespace_map: String,
    },
    /// What the standby a receiver feeds reports: its replay position, and its hot-standby
    /// feedback (xmin 0 means none, as in PostgreSQL).
    StandbyFeedback {
        apply_lsn: Lsn,
        xmin: u32,
        xmin_epoch: u32,
        catalog_xmin: u32,
        catalog_xmin_epoch: u32,
    },
}

/// Why a frame's payload is not a valid message.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("malformed {kind:?} message: {why}")]
    Malformed { kind: Kind, why: &'static str },
}

/// Checks a receiver name: 1 to 55 characters of `a-z`, `0-9` and `_`, so that
/// `walship_<name>` is a valid replication slot name.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!(
            "receiver name must be 1 to {MAX_NAME_LEN} characters long"
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(format!(
            "receiver name {name:?} may contain only lower-case letters, digits and '_' (it names the slot walship_<name>)"
        ));
    }
    Ok(())
}

impl Message {
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello { .. } => Kind::Hello,
            Message::ServerInfo { .. } => Kind::ServerInfo,
            Message::StartStream { .. } => Kind::StartStream,
            Message::WalData { .. } => Kind::WalData,
            Message::Keepalive { .. } => Kind::Keepalive,
            Message::Ack { .. } => Kind::Ack,
            Message::StandbyFeedback { .. } => Kind::StandbyFeedback,
            Message::GetHistory { .. } => Kind::GetHistory,
            Message::History { .. } => Kind::History,
            Message::EndOfTimeline { .. } => Kind::EndOfTimeline,
            Message::Error { .. } => Kind::Error,
            Message::Have { .. } => Kind::Have,
            Message::StartBackup => Kind::StartBackup,
            Message::BackupStart { .. } => Kind::BackupStart,
            Message::Dir { .. } => Kind::Dir,
            Message::FileBegin { .. } => Kind::FileBegin,
            Message::FileData { .. } => Kind::FileData,
            Message::FileSame { .. } => Kind::FileSame,
            Message::FileEnd { .. } => Kind::FileEnd,
            Message::BackupEnd { .. } => Kind::BackupEnd,
        }
    }

    /// Appends this message as one frame to `out`. WAL data goes through the connection's
    /// zstd stream; control messages travel uncompressed.
    pub fn encode(&self, enc: &mut FrameEncoder, out: &mut Vec<u8>) -> Result<(), FrameError> {
        let mut p = Vec::new();
        match self {
            Message::Hello {
                version,
                name,
                mode,
            } => {
                p.extend_from_slice(&version.to_le_bytes());
                put_str(&mut p, name);
                p.push(*mode as u8);
            }
            Message::ServerInfo {
                version,
                system_id,
                timeline,
                seg_size,
                flush_lsn,
                server_version,
                in_recovery,
            } => {
                p.extend_from_slice(&version.to_le_bytes());
                p.extend_from_slice(&system_id.to_le_bytes());
                p.extend_from_slice(&timeline.to_le_bytes());
                p.extend_from_slice(&seg_size.to_le_bytes());
                p.extend_from_slice(&flush_lsn.0.to_le_bytes());
                put_str(&mut p, server_version);
                p.push(*in_recovery as u8);
            }
            Message::GetHistory { timeline } => p.extend_from_slice(&timeline.to_le_bytes()),
            Message::History { timeline, content } => {
                p.extend_from_slice(&timeline.to_le_bytes());
                put_long_bytes(&mut p, content);
            }
            Message::EndOfTimeline {
                next_timeline,
                switch_lsn,
            } => {
                p.extend_from_slice(&next_timeline.to_le_bytes());
                p.extend_from_slice(&switch_lsn.0.to_le_bytes());
            }
            Message::StartStream {
                start_lsn,
                timeline,
            } => {
                p.extend_from_slice(&start_lsn.0.to_le_bytes());
                p.extend_from_slice(&timeline.to_le_bytes());
            }
            Message::WalData {
                start_lsn,
                server_flush_lsn,
                data,
            } => {
                p.reserve(16 + data.len());
                p.extend_from_slice(&start_lsn.0.to_le_bytes());
                p.extend_from_slice(&server_flush_lsn.0.to_le_bytes());
                p.extend_from_slice(data);
            }
            Message::Keepalive { server_flush_lsn } => {
                p.extend_from_slice(&server_flush_lsn.0.to_le_bytes())
            }
            Message::Ack {
                write_lsn,
                flush_lsn,
            } => {
                p.extend_from_slice(&write_lsn.0.to_le_bytes());
                p.extend_from_slice(&flush_lsn.0.to_le_bytes());
            }
            Message::StandbyFeedback {
                apply_lsn,
                xmin,
                xmin_epoch,
                catalog_xmin,
                catalog_xmin_epoch,
            } => {
                p.extend_from_slice(&apply_lsn.0.to_le_bytes());
                for v in [xmin, xmin_epoch, catalog_xmin, catalog_xmin_epoch] {
                    p.extend_from_slice(&v.to_le_bytes());
                }
            }
            Message::Error { code, message } => {
                p.extend_from_slice(&(*code as u16).to_le_bytes());
                put_str(&mut p, message);
            }
            Message::Have { path, sums } => {
                put_str(&mut p, path);
                p.extend_from_slice(&(sums.len() as u32).to_le_bytes());
                for s in sums {
                    p.extend_from_slice(&s.to_le_bytes());
                }
            }
            Message::StartBackup => {}
            Message::BackupStart {
                start_lsn,
                timeline,
                total_bytes,
                file_count,
                tablespaces,
            } => {
                p.extend_from_slice(&start_lsn.0.to_le_bytes());
                p.extend_from_slice(&timeline.to_le_bytes());
                p.extend_from_slice(&total_bytes.to_le_bytes());
                p.extend_from_slice(&file_count.to_le_bytes());
                p.extend_from_slice(&(tablespaces.len() as u16).to_le_bytes());
                for (oid, location) in tablespaces {
                    p.extend_from_slice(&oid.to_le_bytes());
                    put_str(&mut p, location);
                }
            }
            Message::Dir { path, mode } => {
                put_str(&mut p, path);
                p.extend_from_slice(&mode.to_le_bytes());
            }
            Message::FileBegin { path, size, mode } => {
                put_str(&mut p, path);
                p.extend_from_slice(&size.to_le_bytes());
                p.extend_from_slice(&mode.to_le_bytes());
            }
            Message::FileData { offset, data } => {
                p.reserve(8 + data.len());
                p.extend_from_slice(&offset.to_le_bytes());
                p.extend_from_slice(data);
            }
            Message::FileSame { offset, len } => {
                p.extend_from_slice(&offset.to_le_bytes());
                p.extend_from_slice(&len.to_le_bytes());
            }
            Message::FileEnd { size, crc32c } => {
                p.extend_from_slice(&size.to_le_bytes());
                p.extend_from_slice(&crc32c.to_le_bytes());
            }
            Message::BackupEnd {
                stop_lsn,
                backup_label,
                tablespace_map,
            } => {
                p.extend_from_slice(&stop_lsn.0.to_le_bytes());
                put_long_str(&mut p, backup_label);
                put_long_str(&mut p, tablespace_map);
            }
        }
        let compress = matches!(
            self,
            Message::WalData { .. } | Message::FileData { .. } | Message::Have { .. }
        );
        enc.encode(self.kind() as u8, &p, compress, out)
    }

    /// Parses a verified frame's payload.
    pub fn decode(frame: &Frame) -> Result<Message, ProtocolError> {
        let kind = Kind::from_u8(frame.kind).ok_or(ProtocolError::UnknownKind(frame.kind))?;
        let malformed = |why| ProtocolError::Malformed { kind, why };
        let mut r = Reader {
            buf: &frame.payload,
            kind,
        };
        let msg = match kind {
            Kind::Hello => Message::Hello {
                version: r.u16()?,
                name: r.str()?,
                mode: match r.u8()? {
                    1 => Mode::Follow,
                    2 => Mode::Bootstrap,
                    _ => return Err(malformed("unknown mode")),
                },
            },
            Kind::ServerInfo => Message::ServerInfo {
                version: r.u16()?,
                system_id: r.u64()?,
                timeline: r.u32()?,
                seg_size: r.u32()?,
                flush_lsn: Lsn(r.u64()?),
                server_version: r.str()?,
                in_recovery: match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(malformed("bad in_recovery flag")),
                },
            },
            Kind::GetHistory => Message::GetHistory { timeline: r.u32()? },
            Kind::History => Message::History {
                timeline: r.u32()?,
                content: r.long_bytes()?.to_vec(),
            },
            Kind::EndOfTimeline => Message::EndOfTimeline {
                next_timeline: r.u32()?,
                switch_lsn: Lsn(r.u64()?),
            },
            Kind::StartStream => Message::StartStream {
                start_lsn: Lsn(r.u64()?),
                timeline: r.u32()?,
            },
            Kind::WalData => {
                let start_lsn = Lsn(r.u64()?);
                let server_flush_lsn = Lsn(r.u64()?);
                let data = std::mem::take(&mut r.buf).to_vec();
                if start_lsn.checked_add(data.len() as u64).is_none() {
                    return Err(ProtocolError::Malformed {
                        kind,
                        why: "data runs past the end of the log",
                    });
                }
                Message::WalData {
                    start_lsn,
                    server_flush_lsn,
                    data,
                }
            }
            Kind::Keepalive => Message::Keepalive {
                server_flush_lsn: Lsn(r.u64()?),
            },
            Kind::Ack => {
                let write_lsn = Lsn(r.u64()?);
                let flush_lsn = Lsn(r.u64()?);
                if flush_lsn > write_lsn {
                    return Err(ProtocolError::Malformed {
                        kind,
                        why: "flush position is past write position",
                    });
                }
                Message::Ack {
                    write_lsn,
                    flush_lsn,
                }
            }
            Kind::StandbyFeedback => Message::StandbyFeedback {
                apply_lsn: Lsn(r.u64()?),
                xmin: r.u32()?,
                xmin_epoch: r.u32()?,
                catalog_xmin: r.u32()?,
                catalog_xmin_epoch: r.u32()?,
            },
            Kind::Error => Message::Error {
                code: ErrorCode::from_u16(r.u16()?),
                message: r.str()?,
            },
            Kind::Have => {
                let path = r.str()?;
                let n = r.u32()? as usize;
                if n > MAX_SUMS_PER_MESSAGE || r.buf.len() != n * 8 {
                    return Err(malformed("checksum count does not match the message"));
                }
                let mut sums = Vec::with_capacity(n);
                for _ in 0..n {
                    sums.push(r.u64()?);
                }
                Message::Have { path, sums }
            }
            Kind::StartBackup => Message::StartBackup,
            Kind::BackupStart => {
                let start_lsn = Lsn(r.u64()?);
                let timeline = r.u32()?;
                let total_bytes = r.u64()?;
                let file_count = r.u64()?;
                let n = r.u16()? as usize;
                if n > MAX_TABLESPACES {
                    return Err(malformed("too many tablespaces"));
                }
                let mut tablespaces = Vec::with_capacity(n);
                for _ in 0..n {
                    tablespaces.push((r.u32()?, r.str()?));
                }
                Message::BackupStart {
                    start_lsn,
                    timeline,
                    total_bytes,
                    file_count,
                    tablespaces,
                }
            }
            Kind::Dir => Message::Dir {
                path: r.str()?,
                mode: r.u32()?,
            },
            Kind::FileBegin => Message::FileBegin {
                path: r.str()?,
                size: r.u64()?,
                mode: r.u32()?,
            },
            Kind::FileData => {
                let offset = r.u64()?;
                let data = std::mem::take(&mut r.buf).to_vec();
                if offset.checked_add(data.len() as u64).is_none() {
                    return Err(malformed("chunk runs past the largest file size"));
                }
                Message::FileData { offset, data }
            }
            Kind::FileSame => {
                let offset = r.u64()?;
                let len = r.u32()?;
                if len as u64 > CHUNK_LEN || offset.checked_add(len as u64).is_none() {
                    return Err(malformed("bad chunk length"));
                }
                Message::FileSame { offset, len }
            }
            Kind::FileEnd => Message::FileEnd {
                size: r.u64()?,
                crc32c: r.u32()?,
            },
            Kind::BackupEnd => Message::BackupEnd {
                stop_lsn: Lsn(r.u64()?),
                backup_label: r.long_str()?,
                tablespace_map: r.long_str()?,
            },
        };
        if !r.buf.is_empty() {
            return Err(ProtocolError::Malformed {
                kind,
                why: "trailing bytes",
            });
        }
        Ok(msg)
    }
}

fn put_long_str(p: &mut Vec<u8>, s: &str) {
    put_long_bytes(p, s.as_bytes());
}

fn put_long_bytes(p: &mut Vec<u8>, s: &[u8]) {
    let s = &s[..s.len().min(MAX_LONG_STRING_LEN)];
    p.extend_from_slice(&(s.len() as u32).to_le_bytes());
    p.extend_from_slice(s);
}

fn put_str(p: &mut Vec<u8>, s: &str) {
    let s = &s.as_bytes()[..s.len().min(MAX_STRING_LEN)];
    p.extend_from_slice(&(s.len() as u16).to_le_bytes());
    p.extend_from_slice(s);
}

struct Reader<'a> {
    buf: &'a [u8],
    kind: Kind,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.buf.len() < n {
            return Err(ProtocolError::Malformed {
                kind: self.kind,
                why: "too short",
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.take(1)?[0])
    }
    fn long_bytes(&mut self) -> Result<&'a [u8], ProtocolError> {
        let len = self.u32()? as usize;
        if len > MAX_LONG_STRING_LEN {
            return Err(ProtocolError::Malformed {
                kind: self.kind,
                why: "field too long",
            });
        }
        self.take(len)
    }
    fn long_str(&mut self) -> Result<String, ProtocolError> {
        let len = self.u32()? as usize;
        self.string(len, MAX_LONG_STRING_LEN)
    }
    fn u16(&mut self) -> Result<u16, ProtocolError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, ProtocolError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, ProtocolError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn str(&mut self) -> Result<String, ProtocolError> {
        let len = self.u16()? as usize;
        self.string(len, MAX_STRING_LEN)
    }
    /// `len` bytes of UTF-8, after checking `len` against `max`.
    fn string(&mut self, len: usize, max: usize) -> Result<String, ProtocolError> {
        if len > max {
            return Err(ProtocolError::Malformed {
                kind: self.kind,
                why: "string too long",
            });
        }
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| ProtocolError::Malformed {
            kind: self.kind,
            why: "string is not UTF-8",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::FrameDecoder;

    fn all() -> Vec<Message> {
        vec![
            Message::Hello {
                version: 1,
                name: "b1".into(),
                mode: Mode::Bootstrap,
            },
            Message::ServerInfo {
                version: 1,
                system_id: 7712431528347405820,
                timeline: 1,
                seg_size: 16 << 20,
                flush_lsn: Lsn(0x23004A50),
                server_version: "15.18".into(),
                in_recovery: true,
            },
            Message::GetHistory { timeline: 2 },
            Message::History {
                timeline: 2,
                content: b"1\t0/23023FA0\tno recovery target specified\n".to_vec(),
            },
            Message::EndOfTimeline {
                next_timeline: 2,
                switch_lsn: Lsn(0x23023FA0),
            },
            Message::StartStream {
                start_lsn: Lsn(0x23000000),
                timeline: 1,
            },
            Message::WalData {
                start_lsn: Lsn(0x23000000),
                server_flush_lsn: Lsn(0x23004A50),
                data: vec![7; 19024],
            },
            Message::Keepalive {
                server_flush_lsn: Lsn(5),
            },
            Message::Ack {
                write_lsn: Lsn(9),
                flush_lsn: Lsn(8),
            },
            Message::StandbyFeedback {
                apply_lsn: Lsn(0x23004A50),
                xmin: 1240,
                xmin_epoch: 0,
                catalog_xmin: 0,
                catalog_xmin_epoch: 0,
            },
            Message::Error {
                code: ErrorCode::WalGone,
                message: "gone".into(),
            },
            Message::Have {
                path: "base/5/1259".into(),
                sums: vec![1, u64::MAX, 7],
            },
            Message::StartBackup,
            Message::BackupStart {
                start_lsn: Lsn(0x12000028),
                timeline: 1,
                total_bytes: 1 << 30,
                file_count: 982,
                tablespaces: vec![(16384, "/srv/ts1".into())],
            },
            Message::Dir {
                path: "base/5".into(),
                mode: 0o700,
            },
            Message::FileBegin {
                path: "base/5/1259".into(),
                size: 8192,
                mode: 0o600,
            },
            Message::FileData {
                offset: 1 << 20,
                data: vec![3; 5000],
            },
            Message::FileSame {
                offset: 0,
                len: 1 << 20,
            },
            Message::FileEnd {
                size: 8192,
                crc32c: 0xdeadbeef,
            },
            Message::BackupEnd {
                stop_lsn: Lsn(0x216637A0),
                backup_label: "START WAL LOCATION: 0/12000028\n".into(),
                tablespace_map: String::new(),
            },
        ]
    }

    #[test]
    fn round_trip() {
        let mut enc = FrameEncoder::new(1).unwrap();
        let mut dec = FrameDecoder::new().unwrap();
        for m in all() {
            let mut wire = Vec::new();
            m.encode(&mut enc, &mut wire).unwrap();
            let f = dec.decode_buf(&wire).unwrap();
            assert_eq!(Message::decode(&f).unwrap(), m);
        }
    }

    #[test]
    fn short_long_and_unknown_payloads_are_rejected() {
        let mut enc = FrameEncoder::new(1).unwrap();
        let mut dec = FrameDecoder::new().unwrap();
        for m in all() {
            let mut wire = Vec::new();
            m.encode(&mut enc, &mut wire).unwrap();
            let f = dec.decode_buf(&wire).unwrap();
            if !matches!(m, Message::WalData { .. } | Message::FileData { .. }) {
                let mut longer = f.clone();
                longer.payload.push(0);
                assert!(
                    Message::decode(&longer).is_err(),
                    "{m:?} with a trailing byte"
                );
            }
            let min_len = if matches!(m, Message::FileData { .. }) {
                8
            } else if matches!(m, Message::WalData { .. }) {
                16
            } else {
                f.payload.len()
            };
            for cut in 0..min_len.min(20) {
                let mut short = f.clone();
                short.payload.truncate(cut);
                assert!(Message::decode(&short).is_err(), "{m:?} cut at {cut}");
            }
        }
        let f = Frame {
            kind: 99,
            payload: vec![],
            wire_bytes: 16,
        };
        assert!(matches!(
            Message::decode(&f),
            Err(ProtocolError::UnknownKind(99))
        ));
        let f = Frame {
            kind: Kind::Ack as u8,
            payload: [Lsn(1).0.to_le_bytes(), Lsn(2).0.to_le_bytes()].concat(),
            wire_bytes: 0,
        };
        assert!(Message::decode(&f).is_err(), "flush past write accepted");
    }

    #[test]
    fn names() {
        assert!(validate_name("standby_1").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("Upper").is_err());
        assert!(validate_name("a-b").is_err());
        assert!(validate_name("../x").is_err());
        assert!(validate_name(&"a".repeat(MAX_NAME_LEN)).is_ok());
        assert!(validate_name(&"a".repeat(MAX_NAME_LEN + 1)).is_err());
    }
}
