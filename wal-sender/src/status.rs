//! `wal-sender status`: the receivers, as the primary sees them.
//!
//! Every receiver has the physical slot `walship_NAME`. For each, the slot tells whether a
//! wal sender holds it (the receiver is connected), how far back the primary keeps WAL for
//! it (`restart_lsn`), and whether that WAL is safe (`wal_status`, `safe_wal_size`); the
//! row of `pg_stat_replication` of the wal sender that holds it tells what the receiver
//! acknowledged (`flush_lsn`; `restart_lsn` follows it), and the lag is the distance from
//! there to the primary's current WAL position. It reads the primary only, so it works
//! whether or not `wal-sender serve` runs.
//!
//! Only columns that PostgreSQL 15 has are read; 16 to 18 only added columns to both views.
//! Without `pg_read_all_stats` (as `pg_monitor` has it) or superuser, PostgreSQL hides every
//! wal sender's details, its own role's too: a connected receiver then shows no positions,
//! and its lag is counted from the slot's `restart_lsn`.

use anyhow::{Context, Result};
use serde::Serialize;
use walship_common::conninfo::Settings;
use walship_common::pgclient;

use crate::snapshot;

/// A receiver as the primary sees it.
#[derive(Debug, Serialize)]
pub struct ReceiverStatus {
    /// The receiver's name (the slot without `walship_`).
    pub name: String,
    pub slot: String,
    /// A wal sender holds the slot: the receiver is streaming.
    pub connected: bool,
    /// The wal sender's state (`streaming`, `catchup`...), when connected.
    pub state: Option<String>,
    /// `async`, `sync`, `potential` or `quorum`, when connected.
    pub sync_state: Option<String>,
    /// What the receiver acknowledged as fsynced, when connected.
    pub flush_lsn: Option<String>,
    /// The standby the receiver feeds has replayed up to here, when it reports it.
    pub replay_lsn: Option<String>,
    /// Bytes from `flush_lsn` (or, when not connected, `restart_lsn`) to the primary's
    /// current WAL position.
    pub lag_bytes: Option<i64>,
    /// The oldest WAL the slot keeps on the primary.
    pub restart_lsn: Option<String>,
    /// `reserved`, `extended`, `unreserved` or `lost` (the receiver must be bootstrapped
    /// again).
    pub wal_status: Option<String>,
    /// Bytes that can still be written before the slot is in danger of losing WAL (with
    /// `max_slot_wal_keep_size`); none when unbounded.
    pub safe_wal_size: Option<i64>,
    /// The receiver's last report (RFC 3339), when connected.
    pub reply_time: Option<String>,
}

/// What `status` prints.
#[derive(Debug, Serialize)]
pub struct SenderStatus {
    /// The primary's current WAL position (a standby's last received position).
    pub current_lsn: Option<String>,
    pub in_recovery: bool,
    pub receivers: Vec<ReceiverStatus>,
}

/// Reads the receivers' slots and wal senders from the primary.
pub async fn status(pg: &Settings) -> Result<SenderStatus> {
    let (sql, conn) =
        pgclient::connect_sql(pg, snapshot::DEFAULT_DBNAME, Some("walship_sender_status"))
            .await
            .context("connect to PostgreSQL")?;
    let head = sql
        .query_one(
            "SELECT pg_is_in_recovery(), \
                    (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn() \
                          ELSE pg_current_wal_lsn() END)::text",
            &[],
        )
        .await
        .context("read the current WAL position")?;
    let (in_recovery, current_lsn): (bool, Option<String>) = (head.get(0), head.get(1));
    let rows = sql
        .query(
            "WITH now AS (SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn() \
                                      ELSE pg_current_wal_lsn() END AS lsn) \
             SELECT s.slot_name::text, s.active_pid IS NOT NULL, r.state, r.sync_state, \
                    r.flush_lsn::text, r.replay_lsn::text, \
                    pg_wal_lsn_diff(now.lsn, coalesce(r.flush_lsn, s.restart_lsn))::int8, \
                    s.restart_lsn::text, s.wal_status, s.safe_wal_size, \
                    to_char(r.reply_time AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') \
             FROM pg_replication_slots s \
             LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid \
             CROSS JOIN now \
             WHERE s.slot_type = 'physical' AND s.slot_name LIKE 'walship\\_%' \
             ORDER BY s.slot_name",
            &[],
        )
        .await
        .context("read the replication slots")?;
    let receivers = rows
        .iter()
        .map(|row| {
            let slot: String = row.get(0);
            ReceiverStatus {
                name: slot.trim_start_matches("walship_").to_owned(),
                slot,
                connected: row.get(1),
                state: row.get(2),
                sync_state: row.get(3),
                flush_lsn: row.get(4),
                replay_lsn: row.get(5),
                lag_bytes: row.get(6),
                restart_lsn: row.get(7),
                wal_status: row.get(8),
                safe_wal_size: row.get(9),
                reply_time: row.get(10),
            }
        })
        .collect();
    drop(sql);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), conn).await;
    Ok(SenderStatus {
        current_lsn,
        in_recovery,
        receivers,
    })
}

impl std::fmt::Display for SenderStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
        writeln!(
            f,
            "{}: WAL at {}",
            if self.in_recovery {
                "standby (in recovery)"
            } else {
                "primary"
            },
            dash(&self.current_lsn)
        )?;
        if self.receivers.is_empty() {
            return write!(f, "no receivers: no slot walship_NAME on this server");
        }
        writeln!(
            f,
            "{:<20} {:<24} {:>12} {:>14} {:>12} {:<10} {:>14}",
            "receiver",
            "connected",
            "flush_lsn",
            "lag_bytes",
            "restart_lsn",
            "wal_status",
            "safe_wal_size"
        )?;
        for (i, r) in self.receivers.iter().enumerate() {
            let connected = if r.connected && r.state.is_none() {
                "yes (details hidden)".to_owned()
            } else if r.connected {
                format!(
                    "yes ({}, {})",
                    r.state.as_deref().unwrap_or("?"),
                    r.sync_state.as_deref().unwrap_or("?")
                )
            } else {
                "no".to_owned()
            };
            let num = |v: Option<i64>| v.map_or_else(|| "-".to_owned(), |n| n.to_string());
            write!(
                f,
                "{:<20} {:<24} {:>12} {:>14} {:>12} {:<10} {:>14}",
                r.name,
                connected,
                dash(&r.flush_lsn),
                num(r.lag_bytes),
                dash(&r.restart_lsn),
                dash(&r.wal_status),
                num(r.safe_wal_size)
            )?;
            if i + 1 < self.receivers.len() {
                writeln!(f)?;
            }
        }
        Ok(())
    }
}
