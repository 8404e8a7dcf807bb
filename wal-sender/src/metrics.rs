//! The sender's Prometheus metrics (`serve --metrics-listen`), all named `walship_sender_*`.
//!
//! Sessions update atomics ([`ReceiverStats`], [`SenderMetrics`]'s counters) as they go;
//! the metrics thread reads them at scrape time, under short locks, and never waits for a
//! session. The state of the replication slots comes from a poll of
//! `pg_replication_slots` over an SQL session every [`SLOT_POLL_INTERVAL`], never from a
//! scrape.
//!
//! One series per receiver, labelled `receiver`: every receiver connected now, and every
//! slot `walship_NAME` on the primary, connected or not. A receiver that disconnects keeps
//! its series with `walship_sender_receiver_connected 0`, and its lag keeps growing with
//! the primary's position, so that an alert on the lag fires for a receiver that stays
//! away (the slot holds WAL for it); its series go once its slot is dropped.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use walship_common::conninfo::Settings;
use walship_common::metrics::collect;
use walship_common::metrics::prometheus_client::collector::Collector;
use walship_common::metrics::prometheus_client::encoding::DescriptorEncoder;
use walship_common::metrics::prometheus_client::registry::Registry;
use walship_common::protocol::ErrorCode;
use walship_common::{pgclient, Lsn};

/// How often the slots' state is read from the primary.
pub const SLOT_POLL_INTERVAL: Duration = Duration::from_secs(15);
/// How long one poll may take.
const SLOT_POLL_TIMEOUT: Duration = Duration::from_secs(10);
/// The statuses `pg_replication_slots.wal_status` takes.
const WAL_STATUSES: [&str; 4] = ["reserved", "extended", "unreserved", "lost"];

/// Why a connection was refused or ended before it could stream: the `reason` label of
/// `walship_sender_connections_refused_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Refused {
    /// `--max-connections` were open already.
    TooManyConnections,
    /// The TLS handshake failed (a certificate refused, a peer that does not speak TLS).
    Tls,
    /// A plaintext client at a sender that requires TLS.
    TlsRequired,
    /// A handshake step took longer than `--handshake-timeout`.
    HandshakeTimeout,
    /// The receiver's certificate does not carry the name it gave.
    Auth,
    /// Another walship protocol version.
    Version,
    /// A receiver name that is not `[a-z0-9_]{1,55}`.
    BadName,
    /// A request the primary cannot serve (a timeline or position it does not have).
    BadRequest,
    /// The primary no longer has the WAL asked for (the slot was invalidated).
    WalGone,
    /// The sender cannot use its primary as configured (authentication, a grant, a setting).
    Setup,
}

impl Refused {
    pub fn label(self) -> &'static str {
        match self {
            Refused::TooManyConnections => "too_many_connections",
            Refused::Tls => "tls",
            Refused::TlsRequired => "tls_required",
            Refused::HandshakeTimeout => "handshake_timeout",
            Refused::Auth => "auth",
            Refused::Version => "version",
            Refused::BadName => "bad_name",
            Refused::BadRequest => "bad_request",
            Refused::WalGone => "wal_gone",
            Refused::Setup => "setup",
        }
    }

    const ALL: [Refused; 10] = [
        Refused::TooManyConnections,
        Refused::Tls,
        Refused::TlsRequired,
        Refused::HandshakeTimeout,
        Refused::Auth,
        Refused::Version,
        Refused::BadName,
        Refused::BadRequest,
        Refused::WalGone,
        Refused::Setup,
    ];

    /// The refusal a session's error code stands for; `None` for `Other` (retried).
    pub fn of_code(code: ErrorCode) -> Option<Refused> {
        match code {
            ErrorCode::Version => Some(Refused::Version),
            ErrorCode::BadName => Some(Refused::BadName),
            ErrorCode::BadRequest => Some(Refused::BadRequest),
            ErrorCode::WalGone => Some(Refused::WalGone),
            ErrorCode::Auth => Some(Refused::Auth),
            ErrorCode::Setup => Some(Refused::Setup),
            ErrorCode::Other => None,
        }
    }
}

/// What the sender knows of one receiver (by name), across its sessions.
#[derive(Debug, Default)]
pub struct ReceiverStats {
    /// Streaming sessions of this name open now (normally 0 or 1).
    sessions: AtomicI64,
    /// The receiver's acknowledged (fsynced) position, as a byte position.
    ack_flush: AtomicU64,
    /// WAL bytes sent, before compression and on the wire.
    sent_raw: AtomicU64,
    sent_wire: AtomicU64,
}

impl ReceiverStats {
    /// The receiver acknowledged `flush_lsn` as fsynced.
    pub fn acked(&self, flush_lsn: Lsn) {
        self.ack_flush.fetch_max(flush_lsn.0, Ordering::Relaxed);
    }

    /// `raw` bytes of WAL went out as `wire` bytes.
    pub fn sent(&self, raw: u64, wire: u64) {
        self.sent_raw.fetch_add(raw, Ordering::Relaxed);
        self.sent_wire.fetch_add(wire, Ordering::Relaxed);
    }
}

/// A streaming session, counted while it lives.
pub struct Streaming {
    metrics: Arc<SenderMetrics>,
    name: String,
    pub stats: Arc<ReceiverStats>,
}

impl Drop for Streaming {
    fn drop(&mut self) {
        self.stats.sessions.fetch_sub(1, Ordering::Relaxed);
        self.metrics.streaming.fetch_sub(1, Ordering::Relaxed);
        // Without the slot poll nothing would ever forget a name: forget it now.
        if !self.metrics.polling.load(Ordering::Relaxed) {
            let mut map = lock(&self.metrics.receivers);
            if map
                .get(&self.name)
                .is_some_and(|s| s.sessions.load(Ordering::Relaxed) <= 0)
            {
                map.remove(&self.name);
            }
        }
    }
}

/// A snapshot being served, counted while it lives.
pub struct Snapshot(Arc<SenderMetrics>);

impl Drop for Snapshot {
    fn drop(&mut self) {
        self.0.snapshots.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One row of `pg_replication_slots` for a `walship_` slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotRow {
    pub slot: String,
    pub restart_lsn: Option<Lsn>,
    pub wal_status: Option<String>,
    pub safe_wal_size: Option<i64>,
}

/// The last poll of the primary.
#[derive(Debug, Default)]
struct Poll {
    ok: bool,
    slots: Vec<SlotRow>,
}

/// Everything the sender exports.
#[derive(Debug, Default)]
pub struct SenderMetrics {
    receivers: Mutex<BTreeMap<String, Arc<ReceiverStats>>>,
    /// The primary's newest WAL position known: the WAL end of the replication streams, or
    /// the poll's `pg_current_wal_flush_lsn()`, whichever is further.
    primary_flush: AtomicU64,
    streaming: AtomicI64,
    snapshots: AtomicI64,
    open_connections: AtomicI64,
    refused: [AtomicU64; Refused::ALL.len()],
    /// The slot poll runs (only with `--metrics-listen`).
    polling: AtomicBool,
    poll: Mutex<Poll>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SenderMetrics {
    /// A streaming session of receiver `name` starts.
    pub fn streaming(self: &Arc<Self>, name: &str) -> Streaming {
        // Counted under the lock, so that a session ending meanwhile cannot forget the name.
        let stats = {
            let mut map = lock(&self.receivers);
            let stats = map.entry(name.to_owned()).or_default().clone();
            stats.sessions.fetch_add(1, Ordering::Relaxed);
            stats
        };
        self.streaming.fetch_add(1, Ordering::Relaxed);
        Streaming {
            metrics: self.clone(),
            name: name.to_owned(),
            stats,
        }
    }

    /// A snapshot (bootstrap or backup) starts.
    pub fn snapshot(self: &Arc<Self>) -> Snapshot {
        self.snapshots.fetch_add(1, Ordering::Relaxed);
        Snapshot(self.clone())
    }

    pub fn refused(&self, why: Refused) {
        let i = Refused::ALL.iter().position(|r| *r == why).unwrap_or(0);
        self.refused[i].fetch_add(1, Ordering::Relaxed);
    }

    /// The primary's WAL reaches at least `lsn`.
    pub fn primary_at(&self, lsn: Lsn) {
        self.primary_flush.fetch_max(lsn.0, Ordering::Relaxed);
    }

    /// A connection was accepted (`+1`) or closed (`-1`).
    pub fn connection(&self, delta: i64) {
        self.open_connections.fetch_add(delta, Ordering::Relaxed);
    }

    /// Takes the result of one slot poll: `None` when it failed.
    fn take_poll(&self, result: Option<(Option<Lsn>, Vec<SlotRow>)>) {
        let Some((flush, slots)) = result else {
            lock(&self.poll).ok = false;
            return;
        };
        if let Some(lsn) = flush {
            self.primary_at(lsn);
        }
        // A name with no session and no slot is forgotten.
        lock(&self.receivers).retain(|name, s| {
            s.sessions.load(Ordering::Relaxed) > 0
                || slots.iter().any(|r| receiver_of(&r.slot) == Some(name))
        });
        *lock(&self.poll) = Poll { ok: true, slots };
    }

    /// Exports these metrics through `registry`.
    pub fn register(self: &Arc<Self>, registry: &mut Registry) {
        registry.register_collector(Box::new(Exporter(self.clone())));
    }

    /// Reads the slots' state from the primary every [`SLOT_POLL_INTERVAL`], for as long
    /// as the process lives. Each failure is logged once, until a poll succeeds again.
    pub async fn poll_slots(self: Arc<Self>, pg: Settings) {
        self.polling.store(true, Ordering::Relaxed);
        let mut session: Option<pgclient::SqlSession> = None;
        let mut failing = false;
        let mut tick = tokio::time::interval(SLOT_POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let result = tokio::time::timeout(SLOT_POLL_TIMEOUT, poll_once(&pg, &mut session))
                .await
                .unwrap_or_else(|_| Err("timed out".to_owned()));
            match result {
                Ok(found) => {
                    if failing {
                        tracing::info!("metrics: reading pg_replication_slots again");
                    }
                    failing = false;
                    self.take_poll(Some(found));
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!("metrics: cannot read pg_replication_slots: {e}; the slot metrics are stale until it works");
                    }
                    failing = true;
                    if let Some((_, conn)) = session.take() {
                        conn.abort();
                    }
                    self.take_poll(None);
                }
            }
        }
    }
}

/// The receiver name of slot `walship_NAME`.
fn receiver_of(slot: &str) -> Option<&str> {
    slot.strip_prefix("walship_").filter(|n| !n.is_empty())
}

/// The primary's WAL position, and its `walship_` physical slots. On a standby (a sender
/// that serves a cascading standby) the position is the one it has received or replayed.
const PRIMARY_POSITION_SQL: &str = "SELECT (CASE WHEN pg_is_in_recovery() \
     THEN coalesce(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()) \
     ELSE pg_current_wal_flush_lsn() END)::text";
const SLOTS_SQL: &str = "SELECT slot_name::text, restart_lsn::text, wal_status, safe_wal_size \
     FROM pg_replication_slots \
     WHERE slot_type = 'physical' AND slot_name LIKE 'walship\\_%' ORDER BY slot_name";

async fn poll_once(
    pg: &Settings,
    session: &mut Option<pgclient::SqlSession>,
) -> Result<(Option<Lsn>, Vec<SlotRow>), String> {
    if session.as_ref().is_none_or(|(c, _)| c.is_closed()) {
        let s = pgclient::connect_sql(
            pg,
            crate::snapshot::DEFAULT_DBNAME,
            Some("walship_sender_metrics"),
        )
        .await
        .map_err(|e| e.to_string())?;
        *session = Some(s);
    }
    let Some((client, _)) = session.as_ref() else {
        return Err("no session".to_owned());
    };
    let text = |e: tokio_postgres::Error| match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => e.to_string(),
    };
    let flush = client
        .query_one(PRIMARY_POSITION_SQL, &[])
        .await
        .map_err(text)?
        .get::<_, Option<String>>(0)
        .and_then(|s| s.parse().ok());
    let rows = client.query(SLOTS_SQL, &[]).await.map_err(text)?;
    let slots = rows
        .iter()
        .map(|r| SlotRow {
            slot: r.get(0),
            restart_lsn: r.get::<_, Option<String>>(1).and_then(|s| s.parse().ok()),
            wal_status: r.get(2),
            safe_wal_size: r.get(3),
        })
        .collect();
    Ok((flush, slots))
}

/// One receiver's series, as a scrape sees it.
#[derive(Debug, PartialEq, Eq)]
struct ReceiverRow {
    name: String,
    connected: bool,
    flush_lsn: Option<u64>,
    sent_raw: u64,
    sent_wire: u64,
    slot: Option<SlotRow>,
}

/// Joins the sessions' receivers with the polled slots, by name.
fn receiver_rows(
    receivers: &BTreeMap<String, Arc<ReceiverStats>>,
    slots: &[SlotRow],
) -> Vec<ReceiverRow> {
    let mut rows: BTreeMap<String, ReceiverRow> = BTreeMap::new();
    for (name, s) in receivers {
        let ack = s.ack_flush.load(Ordering::Relaxed);
        rows.insert(
            name.clone(),
            ReceiverRow {
                name: name.clone(),
                connected: s.sessions.load(Ordering::Relaxed) > 0,
                flush_lsn: (ack > 0).then_some(ack),
                sent_raw: s.sent_raw.load(Ordering::Relaxed),
                sent_wire: s.sent_wire.load(Ordering::Relaxed),
                slot: None,
            },
        );
    }
    for slot in slots {
        let Some(name) = receiver_of(&slot.slot) else {
            continue;
        };
        let row = rows.entry(name.to_owned()).or_insert_with(|| ReceiverRow {
            name: name.to_owned(),
            connected: false,
            flush_lsn: None,
            sent_raw: 0,
            sent_wire: 0,
            slot: None,
        });
        // A physical slot's restart_lsn is the flush position the receiver reported last.
        if let Some(r) = slot.restart_lsn {
            row.flush_lsn = Some(row.flush_lsn.unwrap_or(0).max(r.0));
        }
        row.slot = Some(slot.clone());
    }
    rows.into_values().collect()
}

#[derive(Debug)]
struct Exporter(Arc<SenderMetrics>);

fn lsn_value(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

impl Collector for Exporter {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = &self.0;
        let (ok, slots) = {
            let p = lock(&m.poll);
            (p.ok, p.slots.clone())
        };
        let rows = receiver_rows(&lock(&m.receivers), &slots);
        let primary = m.primary_flush.load(Ordering::Relaxed);
        collect::gauge(
            &mut enc,
            "walship_sender_info",
            "walship's version (always 1)",
        )?
        .sample(&[("version", env!("CARGO_PKG_VERSION"))], 1)?;
        if primary > 0 {
            collect::gauge_value(
                &mut enc,
                "walship_sender_primary_flush_lsn_bytes",
                "The primary's WAL position (flushed WAL), as a byte position",
                lsn_value(primary),
            )?;
        }
        collect::gauge_value(
            &mut enc,
            "walship_sender_receivers_connected",
            "Receivers streaming WAL now",
            m.streaming.load(Ordering::Relaxed),
        )?;
        collect::gauge_value(
            &mut enc,
            "walship_sender_connections",
            "Connections open now, in any state (handshake, streaming, snapshot)",
            m.open_connections.load(Ordering::Relaxed),
        )?;
        collect::gauge_value(
            &mut enc,
            "walship_sender_snapshots_in_progress",
            "Snapshots (bootstrap or backup) being served now",
            m.snapshots.load(Ordering::Relaxed),
        )?;
        let mut f = collect::counter(
            &mut enc,
            "walship_sender_connections_refused",
            "Connections refused or ended before or while streaming, by reason",
        )?;
        for (i, r) in Refused::ALL.iter().enumerate() {
            let n = m.refused[i].load(Ordering::Relaxed);
            f.sample(&[("reason", r.label())], lsn_value(n))?;
        }
        let mut f = collect::gauge(
            &mut enc,
            "walship_sender_receiver_connected",
            "1 while the receiver streams WAL, 0 when it is away (its slot remains)",
        )?;
        for r in &rows {
            f.sample(&[("receiver", &r.name)], r.connected as i64)?;
        }
        let mut f = collect::gauge(
            &mut enc,
            "walship_sender_receiver_flush_lsn_bytes",
            "The position the receiver acknowledged as fsynced (its slot's restart_lsn while it is away), as a byte position",
        )?;
        for r in &rows {
            if let Some(v) = r.flush_lsn {
                f.sample(&[("receiver", &r.name)], lsn_value(v))?;
            }
        }
        let mut f = collect::gauge(
            &mut enc,
            "walship_sender_receiver_lag_bytes",
            "Bytes of WAL between the primary's position and the receiver's acknowledged position",
        )?;
        if primary > 0 {
            for r in &rows {
                if let Some(v) = r.flush_lsn {
                    f.sample(
                        &[("receiver", &r.name)],
                        lsn_value(primary.saturating_sub(v)),
                    )?;
                }
            }
        }
        let mut f = collect::counter(
            &mut enc,
            "walship_sender_receiver_sent_raw_bytes",
            "WAL bytes sent to the receiver, before compression",
        )?;
        for r in &rows {
            f.sample(&[("receiver", &r.name)], lsn_value(r.sent_raw))?;
        }
        let mut f = collect::counter(
            &mut enc,
            "walship_sender_receiver_sent_wire_bytes",
            "Bytes the receiver's WAL took on the wire (compressed frames)",
        )?;
        for r in &rows {
            f.sample(&[("receiver", &r.name)], lsn_value(r.sent_wire))?;
        }
        collect::gauge_value(
            &mut enc,
            "walship_sender_slot_poll_success",
            "1 if the last read of pg_replication_slots succeeded",
            ok as i64,
        )?;
        let mut f = collect::gauge(
            &mut enc,
            "walship_sender_slot_safe_wal_size_bytes",
            "pg_replication_slots.safe_wal_size: bytes of WAL the primary can still write before the slot is invalidated (only with max_slot_wal_keep_size)",
        )?;
        for r in &rows {
            if let Some(size) = r.slot.as_ref().and_then(|s| s.safe_wal_size) {
                let slot = r.slot.as_ref().map(|s| s.slot.as_str()).unwrap_or("");
                f.sample(&[("receiver", &r.name), ("slot", slot)], size)?;
            }
        }
        let mut f = collect::gauge(
            &mut enc,
            "walship_sender_slot_wal_status",
            "pg_replication_slots.wal_status: 1 for the slot's current status (reserved, extended, unreserved, lost), 0 for the others",
        )?;
        for r in &rows {
            let Some(s) = &r.slot else { continue };
            let Some(current) = s.wal_status.as_deref() else {
                continue;
            };
            for status in WAL_STATUSES {
                f.sample(
                    &[("receiver", &r.name), ("slot", &s.slot), ("status", status)],
                    (status == current) as i64,
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(m: &Arc<SenderMetrics>) -> String {
        let mut registry = Registry::default();
        m.register(&mut registry);
        let mut text = String::new();
        walship_common::metrics::prometheus_client::encoding::prometheus_text::encode(
            &mut text, &registry,
        )
        .unwrap();
        text
    }

    #[test]
    fn a_receiver_keeps_its_series_while_its_slot_remains() {
        let m = Arc::new(SenderMetrics::default());
        m.polling.store(true, Ordering::Relaxed);
        let s = m.streaming("r1");
        s.stats.acked(Lsn(0x300_0000));
        s.stats.sent(1000, 100);
        m.primary_at(Lsn(0x400_0000));
        let t = scrape(&m);
        assert!(
            t.contains("walship_sender_receiver_connected{receiver=\"r1\"} 1"),
            "{t}"
        );
        assert!(
            t.contains("walship_sender_receiver_lag_bytes{receiver=\"r1\"} 16777216"),
            "{t}"
        );
        assert!(
            t.contains("walship_sender_receiver_sent_wire_bytes_total{receiver=\"r1\"} 100"),
            "{t}"
        );
        assert!(t.contains("walship_sender_receivers_connected 1"), "{t}");
        drop(s);
        // Away, with its slot: still there, not connected, lag from the slot's position.
        m.take_poll(Some((
            Some(Lsn(0x500_0000)),
            vec![SlotRow {
                slot: "walship_r1".into(),
                restart_lsn: Some(Lsn(0x300_0000)),
                wal_status: Some("extended".into()),
                safe_wal_size: Some(4096),
            }],
        )));
        let t = scrape(&m);
        assert!(
            t.contains("walship_sender_receiver_connected{receiver=\"r1\"} 0"),
            "{t}"
        );
        assert!(
            t.contains("walship_sender_receiver_lag_bytes{receiver=\"r1\"} 33554432"),
            "{t}"
        );
        assert!(t.contains(
            "walship_sender_slot_wal_status{receiver=\"r1\",slot=\"walship_r1\",status=\"extended\"} 1"
        ), "{t}");
        assert!(
            t.contains(
                "walship_sender_slot_safe_wal_size_bytes{receiver=\"r1\",slot=\"walship_r1\"} 4096"
            ),
            "{t}"
        );
        // The slot dropped: the receiver is forgotten.
        m.take_poll(Some((None, Vec::new())));
        assert!(!scrape(&m).contains("receiver=\"r1\""));
    }

    #[test]
    fn refusals_are_counted_by_reason() {
        let m = Arc::new(SenderMetrics::default());
        m.refused(Refused::TooManyConnections);
        m.refused(Refused::of_code(ErrorCode::Auth).unwrap());
        assert_eq!(Refused::of_code(ErrorCode::Other), None);
        let t = scrape(&m);
        assert!(t.contains(
            "walship_sender_connections_refused_total{reason=\"too_many_connections\"} 1"
        ));
        assert!(t.contains("walship_sender_connections_refused_total{reason=\"auth\"} 1"));
        assert!(t.contains("walship_sender_connections_refused_total{reason=\"tls\"} 0"));
    }

    #[test]
    fn without_the_poll_a_name_is_forgotten_when_it_disconnects() {
        let m = Arc::new(SenderMetrics::default());
        let s = m.streaming("away");
        assert!(scrape(&m).contains("walship_sender_receiver_connected{receiver=\"away\"} 1"));
        drop(s);
        assert!(!scrape(&m).contains("receiver=\"away\""));
    }
}
