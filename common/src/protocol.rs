//! walship protocol messages, carried one per [frame](crate::frame).
//!
//! A session:
//! ```text
//! receiver                         sender
//!   Hello{version,name} ------------>
//!   <------------ ServerInfo{version,system_id,timeline,seg_size,flush_lsn,server_version}
//!   StartStream{start_lsn,timeline} ->       (sender ensures slot walship_<name>, starts
//!   <------------ WalData / Keepalive         replication from start_lsn on that slot)
//!   Ack{write_lsn,flush_lsn} ------->       (reported upstream as the standby's flush)
//!   <------------ Error{code,message}        (either side may end with an error)
//! ```
//! All integers are little-endian. Strings are a u16 length and UTF-8 bytes. Every decoder
//! checks each length against the bytes present (and against a small maximum) before use,
//! and a message with trailing bytes is rejected.

use crate::frame::{Frame, FrameEncoder, FrameError};
use crate::lsn::Lsn;

/// The protocol version this build speaks. Peers with another version are refused.
pub const PROTOCOL_VERSION: u16 = 1;
/// Longest string field (names, messages, versions).
pub const MAX_STRING_LEN: usize = 4096;
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
}

impl ErrorCode {
    pub fn from_u16(v: u16) -> ErrorCode {
        match v {
            2 => ErrorCode::Version,
            3 => ErrorCode::BadName,
            4 => ErrorCode::WalGone,
            5 => ErrorCode::BadRequest,
            _ => ErrorCode::Other,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Hello {
        version: u16,
        name: String,
    },
    ServerInfo {
        version: u16,
        system_id: u64,
        timeline: u32,
        seg_size: u32,
        flush_lsn: Lsn,
        server_version: String,
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
            Message::Error { .. } => Kind::Error,
        }
    }

    /// Appends this message as one frame to `out`. WAL data goes through the connection's
    /// zstd stream; control messages travel uncompressed.
    pub fn encode(&self, enc: &mut FrameEncoder, out: &mut Vec<u8>) -> Result<(), FrameError> {
        let mut p = Vec::new();
        match self {
            Message::Hello { version, name } => {
                p.extend_from_slice(&version.to_le_bytes());
                put_str(&mut p, name);
            }
            Message::ServerInfo {
                version,
                system_id,
                timeline,
                seg_size,
                flush_lsn,
                server_version,
            } => {
                p.extend_from_slice(&version.to_le_bytes());
                p.extend_from_slice(&system_id.to_le_bytes());
                p.extend_from_slice(&timeline.to_le_bytes());
                p.extend_from_slice(&seg_size.to_le_bytes());
                p.extend_from_slice(&flush_lsn.0.to_le_bytes());
                put_str(&mut p, server_version);
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
            Message::Error { code, message } => {
                p.extend_from_slice(&(*code as u16).to_le_bytes());
                put_str(&mut p, message);
            }
        }
        let compress = matches!(self, Message::WalData { .. });
        enc.encode(self.kind() as u8, &p, compress, out)
    }

    /// Parses a verified frame's payload.
    pub fn decode(frame: &Frame) -> Result<Message, ProtocolError> {
        let kind = match frame.kind {
            1 => Kind::Hello,
            2 => Kind::ServerInfo,
            3 => Kind::StartStream,
            4 => Kind::WalData,
            5 => Kind::Keepalive,
            6 => Kind::Ack,
            7 => Kind::Error,
            k => return Err(ProtocolError::UnknownKind(k)),
        };
        let mut r = Reader {
            buf: &frame.payload,
            kind,
        };
        let msg = match kind {
            Kind::Hello => Message::Hello {
                version: r.u16()?,
                name: r.str()?,
            },
            Kind::ServerInfo => Message::ServerInfo {
                version: r.u16()?,
                system_id: r.u64()?,
                timeline: r.u32()?,
                seg_size: r.u32()?,
                flush_lsn: Lsn(r.u64()?),
                server_version: r.str()?,
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
            Kind::Error => Message::Error {
                code: ErrorCode::from_u16(r.u16()?),
                message: r.str()?,
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
        if len > MAX_STRING_LEN {
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
            },
            Message::ServerInfo {
                version: 1,
                system_id: 7712431528347405820,
                timeline: 1,
                seg_size: 16 << 20,
                flush_lsn: Lsn(0x23004A50),
                server_version: "15.18".into(),
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
            Message::Error {
                code: ErrorCode::WalGone,
                message: "gone".into(),
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
            if !matches!(m, Message::WalData { .. }) {
                let mut longer = f.clone();
                longer.payload.push(0);
                assert!(
                    Message::decode(&longer).is_err(),
                    "{m:?} with a trailing byte"
                );
            }
            let min_len = if matches!(m, Message::WalData { .. }) {
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
