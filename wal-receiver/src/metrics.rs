//! The receiver's Prometheus metrics (`follow --metrics-listen`), all named
//! `walship_receiver_*`.
//!
//! The follow loop stores what it knows in atomics as it goes (a relaxed store or add per
//! frame, nothing more); the metrics thread reads them at scrape time and never holds
//! anything the loop waits for. What costs more is done by the scrape itself, on the
//! metrics thread, and at most every [`SCAN_INTERVAL`]: listing the store for its size and
//! sealed segments, and `statvfs` of its file system. The served standby's state is read
//! from the watch channel its server publishes.
//!
//! Positions are exported as byte positions (an LSN `X/Y` is `X * 2^32 + Y`), so that
//! differences are byte counts.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use walship_common::frame::FrameError;
use walship_common::metrics::collect;
use walship_common::metrics::prometheus_client::collector::Collector;
use walship_common::metrics::prometheus_client::encoding::DescriptorEncoder;
use walship_common::metrics::Registry;
use walship_common::Lsn;

use crate::follow::StreamError;
use crate::serve::Feedback;

/// The store is listed, and its file system asked for its free space, at most this often.
pub const SCAN_INTERVAL: Duration = Duration::from_secs(10);

/// What made a session with the sender fail: the `kind` label of
/// `walship_receiver_errors_total`. As a context of an error it marks its kind (its text
/// then reads before the cause's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// No sender could be connected to, or none chosen (refused, unreachable, TLS, the
    /// handshake, no primary among several).
    Connect,
    /// The sender sent nothing for the idle timeout.
    Timeout,
    /// The sender closed the connection.
    Closed,
    /// The connection failed (reset, broken pipe).
    Network,
    /// A frame failed its checksum or limits.
    BadFrame,
    /// The sender reported an error it may recover from.
    Sender,
    /// Anything else: a message out of place, a position that does not continue the store.
    Protocol,
}

impl ErrorKind {
    const ALL: [ErrorKind; 7] = [
        ErrorKind::Connect,
        ErrorKind::Timeout,
        ErrorKind::Closed,
        ErrorKind::Network,
        ErrorKind::BadFrame,
        ErrorKind::Sender,
        ErrorKind::Protocol,
    ];

    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Closed => "closed",
            ErrorKind::Network => "network",
            ErrorKind::BadFrame => "bad_frame",
            ErrorKind::Sender => "sender",
            ErrorKind::Protocol => "protocol",
        }
    }

    /// The kind of a session's error, from its type and the types of its causes.
    pub fn of(e: &anyhow::Error) -> ErrorKind {
        if let Some(k) = e.downcast_ref::<ErrorKind>() {
            return *k;
        }
        for cause in e.chain() {
            if let Some(k) = cause.downcast_ref::<ErrorKind>() {
                return *k;
            }
            if let Some(s) = cause.downcast_ref::<StreamError>() {
                return match s {
                    StreamError::Reported(_) => ErrorKind::Sender,
                    StreamError::Silent(_) => ErrorKind::Timeout,
                    StreamError::Closed => ErrorKind::Closed,
                };
            }
            if let Some(f) = cause.downcast_ref::<FrameError>() {
                return match f {
                    FrameError::Io(_) | FrameError::Truncated { .. } => ErrorKind::Network,
                    _ => ErrorKind::BadFrame,
                };
            }
            if cause.is::<std::io::Error>() {
                return ErrorKind::Network;
            }
        }
        ErrorKind::Protocol
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ErrorKind::Connect => "no sender to follow",
            ErrorKind::Timeout => "the sender went silent",
            ErrorKind::Closed => "the sender closed the connection",
            ErrorKind::Network => "the connection to the sender failed",
            ErrorKind::BadFrame => "a bad frame from the sender",
            ErrorKind::Sender => "the sender reported an error",
            ErrorKind::Protocol => "the sender broke the protocol",
        })
    }
}

impl std::error::Error for ErrorKind {}

/// What the store's directory and file system hold, as last listed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct StoreScan {
    /// Bytes of every file in the store.
    bytes: u64,
    /// Sealed (compressed, complete) segments.
    sealed: u64,
    /// The file system's size, and what an unprivileged writer may still use of it.
    fs_size: u64,
    fs_free: u64,
}

fn scan(dir: &Path) -> StoreScan {
    let mut s = StoreScan::default();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let Ok(md) = entry.metadata() else { continue };
            if !md.is_file() {
                continue;
            }
            s.bytes += md.len();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name
                .strip_suffix(crate::store::SEALED_SUFFIX)
                .is_some_and(|stem| stem.len() == 24 && stem.bytes().all(|b| b.is_ascii_hexdigit()))
            {
                s.sealed += 1;
            }
        }
    }
    if let Ok(vfs) = nix::sys::statvfs::statvfs(dir) {
        let unit = vfs.fragment_size();
        s.fs_size = vfs.blocks().saturating_mul(unit);
        s.fs_free = vfs.blocks_available().saturating_mul(unit);
    }
    s
}

/// Everything `follow` exports.
#[derive(Debug)]
pub struct FollowMetrics {
    name: String,
    wal_dir: PathBuf,
    started: Instant,
    /// The store's persisted flush position.
    flush_lsn: AtomicU64,
    /// The primary's flush position, as the sender last reported it.
    primary_flush_lsn: AtomicU64,
    timeline: AtomicU64,
    /// Streaming from a sender now.
    connected: AtomicBool,
    /// When the last message from a sender arrived, in milliseconds after `started` plus
    /// one; 0 before any.
    last_message: AtomicU64,
    raw_bytes: AtomicU64,
    wire_bytes: AtomicU64,
    reconnects: AtomicU64,
    errors: [AtomicU64; ErrorKind::ALL.len()],
    /// `--keep-wal SIZE`, when the store is bounded by a size.
    retention_bytes: Option<u64>,
    /// The served standby's reports.
    standby: OnceLock<watch::Receiver<Feedback>>,
    last_scan: Mutex<Option<(Instant, StoreScan)>>,
}

impl FollowMetrics {
    pub fn new(name: &str, wal_dir: &Path, retention_bytes: Option<u64>) -> FollowMetrics {
        FollowMetrics {
            name: name.to_owned(),
            wal_dir: wal_dir.to_owned(),
            started: Instant::now(),
            flush_lsn: AtomicU64::new(0),
            primary_flush_lsn: AtomicU64::new(0),
            timeline: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            last_message: AtomicU64::new(0),
            raw_bytes: AtomicU64::new(0),
            wire_bytes: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            errors: Default::default(),
            retention_bytes,
            standby: OnceLock::new(),
            last_scan: Mutex::new(None),
        }
    }

    /// Serves these metrics at `listen` (HOST:PORT) from now on.
    pub fn serve(
        self: &Arc<Self>,
        listen: &str,
    ) -> Result<(), walship_common::metrics::MetricsError> {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Exporter(self.clone())));
        walship_common::metrics::serve(listen, registry).map(|_| ())
    }

    /// The served standby's reports come through `feedback`.
    pub fn watch_standby(&self, feedback: watch::Receiver<Feedback>) {
        let _ = self.standby.set(feedback);
    }

    /// The store is flushed to `flush_lsn`, on `timeline`.
    pub fn flushed(&self, flush_lsn: Lsn, timeline: u32) {
        self.flush_lsn.store(flush_lsn.0, Ordering::Relaxed);
        self.timeline.store(timeline as u64, Ordering::Relaxed);
    }

    /// A message arrived from the sender; `wal` is the WAL it carried, raw and on the wire.
    pub fn message(&self, primary_flush_lsn: Lsn, wal: Option<(u64, u64)>) {
        let ms = self.started.elapsed().as_millis() as u64 + 1;
        self.last_message.store(ms, Ordering::Relaxed);
        self.primary_flush_lsn
            .fetch_max(primary_flush_lsn.0, Ordering::Relaxed);
        if let Some((raw, wire)) = wal {
            self.raw_bytes.fetch_add(raw, Ordering::Relaxed);
            self.wire_bytes.fetch_add(wire, Ordering::Relaxed);
        }
    }

    /// Streaming from a sender starts (`true`) or ends.
    pub fn connected(&self, yes: bool) {
        self.connected.store(yes, Ordering::Relaxed);
    }

    /// A session failed with `e`; the receiver reconnects.
    pub fn failed(&self, e: &anyhow::Error) {
        let kind = ErrorKind::of(e);
        let i = ErrorKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
        self.errors[i].fetch_add(1, Ordering::Relaxed);
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }

    /// The store as last listed, listed again if that is older than [`SCAN_INTERVAL`].
    fn store_scan(&self) -> StoreScan {
        let mut last = self.last_scan.lock().unwrap_or_else(|p| p.into_inner());
        match *last {
            Some((at, s)) if at.elapsed() < SCAN_INTERVAL => s,
            _ => {
                let s = scan(&self.wal_dir);
                *last = Some((Instant::now(), s));
                s
            }
        }
    }
}

fn bytes(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

#[derive(Debug)]
struct Exporter(Arc<FollowMetrics>);

impl Collector for Exporter {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = &self.0;
        let flush = m.flush_lsn.load(Ordering::Relaxed);
        let primary = m.primary_flush_lsn.load(Ordering::Relaxed);
        collect::gauge(
            &mut enc,
            "walship_receiver_info",
            "The receiver's name and walship's version (always 1)",
        )?
        .sample(
            &[
                ("receiver", &m.name),
                ("version", env!("CARGO_PKG_VERSION")),
            ],
            1,
        )?;
        collect::gauge_value(
            &mut enc,
            "walship_receiver_connected",
            "1 while streaming from a sender, 0 while connecting or waiting to reconnect",
            m.connected.load(Ordering::Relaxed) as i64,
        )?;
        if flush > 0 {
            collect::gauge_value(
                &mut enc,
                "walship_receiver_timeline",
                "The timeline the store is on",
                m.timeline.load(Ordering::Relaxed) as i64,
            )?;
            collect::gauge_value(
                &mut enc,
                "walship_receiver_flush_lsn_bytes",
                "The store's flush position (fsynced and acknowledged WAL), as a byte position",
                bytes(flush),
            )?;
        }
        if primary > 0 {
            collect::gauge_value(
                &mut enc,
                "walship_receiver_primary_flush_lsn_bytes",
                "The primary's flush position as the sender last reported it, as a byte position",
                bytes(primary),
            )?;
            collect::gauge_value(
                &mut enc,
                "walship_receiver_lag_bytes",
                "Bytes between the primary's flush position as last reported and the store's flush position",
                bytes(primary.saturating_sub(flush)),
            )?;
        }
        let last = m.last_message.load(Ordering::Relaxed);
        let since = if last == 0 {
            m.started.elapsed()
        } else {
            m.started
                .elapsed()
                .saturating_sub(Duration::from_millis(last - 1))
        };
        collect::gauge(
            &mut enc,
            "walship_receiver_last_message_age_seconds",
            "Seconds since the last message from a sender (since start-up before the first)",
        )?
        .sample_f64(&[], since.as_secs_f64())?;
        collect::counter_value(
            &mut enc,
            "walship_receiver_received_raw_bytes",
            "WAL bytes received, uncompressed",
            m.raw_bytes.load(Ordering::Relaxed),
        )?;
        collect::counter_value(
            &mut enc,
            "walship_receiver_received_wire_bytes",
            "Bytes the received WAL took on the wire (compressed frames)",
            m.wire_bytes.load(Ordering::Relaxed),
        )?;
        collect::counter_value(
            &mut enc,
            "walship_receiver_reconnects",
            "Times a session with a sender failed and the receiver connected again",
            m.reconnects.load(Ordering::Relaxed),
        )?;
        let mut f = collect::counter(
            &mut enc,
            "walship_receiver_errors",
            "Failed sessions with a sender, by kind",
        )?;
        for (i, k) in ErrorKind::ALL.iter().enumerate() {
            f.sample(
                &[("kind", k.label())],
                bytes(m.errors[i].load(Ordering::Relaxed)),
            )?;
        }
        let s = m.store_scan();
        collect::gauge_value(
            &mut enc,
            "walship_receiver_store_bytes",
            "Bytes of the files in the WAL store",
            bytes(s.bytes),
        )?;
        collect::gauge_value(
            &mut enc,
            "walship_receiver_sealed_segments",
            "Sealed (complete, compressed) segments kept in the store",
            bytes(s.sealed),
        )?;
        if s.fs_size > 0 {
            collect::gauge_value(
                &mut enc,
                "walship_receiver_filesystem_size_bytes",
                "Size of the store's file system",
                bytes(s.fs_size),
            )?;
            collect::gauge_value(
                &mut enc,
                "walship_receiver_filesystem_free_bytes",
                "Bytes of the store's file system still free for the receiver",
                bytes(s.fs_free),
            )?;
        }
        if let Some(limit) = m.retention_bytes {
            collect::gauge_value(
                &mut enc,
                "walship_receiver_keep_wal_bytes",
                "The --keep-wal size limit on sealed segments",
                bytes(limit),
            )?;
        }
        if let Some(rx) = m.standby.get() {
            let fb = rx.borrow().clone();
            collect::gauge_value(
                &mut enc,
                "walship_receiver_standby_connected",
                "1 while the served standby (--serve-standby) is connected",
                fb.connected as i64,
            )?;
            if fb.apply_lsn != Lsn::default() {
                collect::gauge_value(
                    &mut enc,
                    "walship_receiver_standby_replay_lsn_bytes",
                    "The served standby's replay position, as last reported, as a byte position",
                    bytes(fb.apply_lsn.0),
                )?;
                collect::gauge_value(
                    &mut enc,
                    "walship_receiver_standby_replay_lag_bytes",
                    "Bytes between the store's flush position and the served standby's replay position",
                    bytes(flush.saturating_sub(fb.apply_lsn.0)),
                )?;
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                if fb.reply_time > 0 {
                    collect::gauge_value(
                        &mut enc,
                        "walship_receiver_standby_reply_age_seconds",
                        "Seconds since the served standby last reported",
                        bytes(now.saturating_sub(fb.reply_time)),
                    )?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use walship_common::metrics::prometheus_client::encoding::prometheus_text;

    fn scrape(m: &Arc<FollowMetrics>) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Exporter(m.clone())));
        let mut text = String::new();
        prometheus_text::encode(&mut text, &registry).unwrap();
        text
    }

    #[test]
    fn positions_lag_and_bytes() {
        let dir = std::env::temp_dir().join(format!("walship-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("000000010000000000000001.zst"), vec![0u8; 100]).unwrap();
        std::fs::write(dir.join("000000010000000000000002.partial"), vec![0u8; 50]).unwrap();
        std::fs::write(dir.join("not-a-segment.zst"), b"x").unwrap();
        let m = Arc::new(FollowMetrics::new("r1", &dir, Some(1000)));
        m.flushed(Lsn(0x100_0000), 1);
        m.message(Lsn(0x100_1000), Some((4096, 512)));
        let t = scrape(&m);
        for want in [
            "walship_receiver_info{receiver=\"r1\",",
            "walship_receiver_flush_lsn_bytes 16777216\n",
            "walship_receiver_lag_bytes 4096\n",
            "walship_receiver_received_raw_bytes_total 4096\n",
            "walship_receiver_received_wire_bytes_total 512\n",
            "walship_receiver_store_bytes 151\n",
            "walship_receiver_sealed_segments 1\n",
            "walship_receiver_keep_wal_bytes 1000\n",
            "walship_receiver_errors_total{kind=\"timeout\"} 0\n",
        ] {
            assert!(t.contains(want), "{want} in {t}");
        }
        assert!(!t.contains("walship_receiver_standby"), "{t}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn errors_are_counted_by_kind() {
        let m = Arc::new(FollowMetrics::new("r1", Path::new("/nonexistent"), None));
        let refused =
            anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
                .context("connect to sender s:1")
                .context(ErrorKind::Connect);
        m.failed(&refused);
        let reset = anyhow::Error::new(FrameError::Io(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        )))
        .context("bad frame from sender");
        m.failed(&reset);
        let crc = anyhow::Error::new(FrameError::Checksum {
            computed: 1,
            expected: 2,
        });
        m.failed(&crc);
        m.failed(&anyhow::anyhow!("unexpected Hello message from sender"));
        let t = scrape(&m);
        for kind in ["connect", "network", "bad_frame", "protocol"] {
            assert!(
                t.contains(&format!(
                    "walship_receiver_errors_total{{kind=\"{kind}\"}} 1\n"
                )),
                "{kind} in {t}"
            );
        }
        assert!(t.contains("walship_receiver_reconnects_total 4\n"), "{t}");
        // The kind as context keeps the cause's text.
        assert_eq!(
            format!("{refused:#}"),
            "no sender to follow: connect to sender s:1: connection refused"
        );
    }

    #[test]
    fn the_served_standbys_replay_lag() {
        let m = Arc::new(FollowMetrics::new("r1", Path::new("/nonexistent"), None));
        let (tx, rx) = watch::channel(Feedback::default());
        m.watch_standby(rx);
        m.flushed(Lsn(0x300_0000), 1);
        assert!(scrape(&m).contains("walship_receiver_standby_connected 0\n"));
        tx.send_replace(Feedback {
            connected: true,
            apply_lsn: Lsn(0x200_0000),
            ..Feedback::default()
        });
        let t = scrape(&m);
        assert!(t.contains("walship_receiver_standby_connected 1\n"), "{t}");
        assert!(
            t.contains("walship_receiver_standby_replay_lag_bytes 16777216\n"),
            "{t}"
        );
    }
}
