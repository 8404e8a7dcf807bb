//! `wal-receiver status`: what a store holds, for people and for scripts.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;
use walship_common::conninfo::Settings;
use walship_common::pgclient;
use walship_common::{pgtime, WalFileName};

use crate::store::{read_state, reader_error, StoreFile};

/// The fields of `status --json`.
#[derive(Debug, Serialize)]
pub struct Status {
    pub wal_dir: String,
    pub system_identifier: String,
    pub timeline: u32,
    pub flush_lsn: String,
    pub segment_size: u64,
    /// PostgreSQL major version of the primary (0: not recorded).
    pub pg_version: u32,
    pub first_segment: Option<String>,
    pub last_segment: Option<String>,
    pub sealed_segments: u64,
    pub partial_segments: u64,
    pub raw_bytes: u64,
    pub wire_bytes: u64,
    /// Whether a wal-receiver holds the store's lock right now.
    pub receiver_running: bool,
    /// What the standby served by `follow --serve-standby` last reported (at most about a
    /// second old while it is connected); absent if no standby was ever served.
    pub standby: Option<StandbyStatus>,
    /// Timelines whose history file the store holds.
    pub history_timelines: Vec<u32>,
    /// The standby server itself, asked with `status --standby CONNINFO`.
    pub standby_server: Option<StandbyServer>,
    /// What `follow --keep-wal` keeps and why, as its last retention pass recorded it;
    /// absent if no follower has applied a retention limit to this store.
    pub retention: Option<crate::retention::RetentionStatus>,
}

/// What the standby server says about itself (`status --standby`).
#[derive(Debug, Serialize)]
pub struct StandbyServer {
    /// Whether the query worked; the other fields are empty when it did not.
    pub reachable: bool,
    pub error: Option<String>,
    pub in_recovery: Option<bool>,
    /// `pg_last_wal_replay_lsn()`: the end of the last record replayed.
    pub replay_lsn: Option<String>,
    /// `pg_last_wal_receive_lsn()`: what its walreceiver has received and flushed.
    pub receive_lsn: Option<String>,
    /// `pg_last_xact_replay_timestamp()`: commit time of the last transaction replayed,
    /// RFC 3339 in UTC.
    pub last_replay_time: Option<String>,
    /// The timeline it replays (or, once promoted, writes).
    pub timeline: Option<u32>,
}

/// The database `status --standby` connects to when the string names none.
const STANDBY_DBNAME: &str = "postgres";

/// Asks the standby server at `conninfo` (a libpq keyword/value string, read as libpq reads
/// it, password file and sslmode included; the first line of `password_file` is the password
/// when the string gives none) for its recovery state. Never fails: an unreachable server
/// is reported as such.
pub async fn query_standby(conninfo: &str, password_file: Option<&Path>) -> StandbyServer {
    match query(conninfo, password_file).await {
        Ok(s) => s,
        Err(e) => StandbyServer {
            reachable: false,
            error: Some(format!("{e:#}")),
            in_recovery: None,
            replay_lsn: None,
            receive_lsn: None,
            last_replay_time: None,
            timeline: None,
        },
    }
}

async fn query(conninfo: &str, password_file: Option<&Path>) -> Result<StandbyServer> {
    // As libpq: PGPASSWORD, the password file and sslmode apply. Errors name a keyword,
    // never the string, which may hold a password.
    let mut settings = Settings::from_conninfo(conninfo).context("--standby")?;
    if let Some(file) = password_file {
        settings
            .use_password_file(file)
            .context("--standby-password-file")?;
    }
    let (client, task) = pgclient::connect_sql(&settings, STANDBY_DBNAME, Some("walship_status"))
        .await
        .context("connect to the standby")?;
    let row = client
        .query_one(
            "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text, \
             pg_last_wal_receive_lsn()::text, \
             (extract(epoch FROM pg_last_xact_replay_timestamp()) * 1000000)::int8, \
             (SELECT CASE WHEN pg_is_in_recovery() THEN \
                (SELECT received_tli FROM pg_stat_wal_receiver) END)::int4, \
             (SELECT timeline_id FROM pg_control_checkpoint())::int4",
            &[],
        )
        .await
        .context("query the standby")?;
    drop(client);
    let _ = task.await;
    let in_recovery: bool = row.get(0);
    let received_tli: Option<i32> = row.get(4);
    let checkpoint_tli: Option<i32> = row.get(5);
    Ok(StandbyServer {
        reachable: true,
        error: None,
        in_recovery: Some(in_recovery),
        replay_lsn: row.get(1),
        receive_lsn: row.get(2),
        // Microseconds since the Unix epoch: shown in RFC 3339, whatever the server's
        // DateStyle and TimeZone.
        last_replay_time: row
            .get::<_, Option<i64>>(3)
            .map(|us| pgtime::to_rfc3339(us - pgtime::PG_EPOCH_OFFSET_US)),
        timeline: received_tli.or(checkpoint_tli).map(|t| t as u32),
    })
}

/// A standby's last report, as `follow --serve-standby` recorded it.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct StandbyStatus {
    pub application_name: String,
    pub connected: bool,
    pub write_lsn: String,
    pub flush_lsn: String,
    pub replay_lsn: String,
    /// When the standby last reported: seconds since the Unix epoch in the file `follow`
    /// writes, RFC 3339 in UTC in `status --json`.
    #[serde(serialize_with = "rfc3339_seconds")]
    pub reply_time: u64,
    pub xmin: u32,
}

fn rfc3339_seconds<S: serde::Serializer>(secs: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&pgtime::unix_to_rfc3339(*secs))
}

pub fn status(wal_dir: &Path) -> Result<Option<Status>> {
    let Some(state) = read_state(wal_dir).map_err(reader_error)? else {
        return Ok(None);
    };
    let mut names = Vec::new();
    let mut history_timelines = Vec::new();
    let (mut sealed, mut partial) = (0, 0);
    for entry in fs::read_dir(wal_dir).with_context(|| format!("list {}", wal_dir.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let (timeline, segno, is_sealed) = match StoreFile::parse(&name, state.seg_size) {
            Some(StoreFile::History(t)) => {
                history_timelines.push(t.0);
                continue;
            }
            Some(StoreFile::Sealed { timeline, segno }) => (timeline, segno, true),
            Some(StoreFile::Partial { timeline, segno }) => (timeline, segno, false),
            None => continue,
        };
        // A .partial past the flush position holds nothing durable yet.
        if !is_sealed && state.seg_size.segment_start(segno) >= state.flush_lsn {
            continue;
        }
        if is_sealed {
            sealed += 1
        } else {
            partial += 1
        }
        let base = WalFileName::Segment { timeline, segno }.to_name(state.seg_size);
        names.push(((timeline, segno), base));
    }
    names.sort();
    names.dedup_by(|a, b| a.0 == b.0);
    let receiver_running = crate::store::writer_running(wal_dir);
    Ok(Some(Status {
        wal_dir: wal_dir.display().to_string(),
        system_identifier: state.system_id.to_string(),
        timeline: state.timeline.0,
        flush_lsn: state.flush_lsn.to_string(),
        segment_size: state.seg_size.bytes(),
        pg_version: state.pg_version,
        first_segment: names.first().map(|n| n.1.clone()),
        last_segment: names.last().map(|n| n.1.clone()),
        sealed_segments: sealed,
        partial_segments: partial,
        raw_bytes: state.raw_bytes,
        wire_bytes: state.wire_bytes,
        receiver_running,
        standby: fs::read(wal_dir.join(crate::follow::STANDBY_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok()),
        history_timelines: {
            history_timelines.sort();
            history_timelines
        },
        standby_server: None,
        retention: crate::retention::read_status(wal_dir),
    }))
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ratio = if self.raw_bytes > 0 {
            format!(
                " ({:.1}% of raw)",
                100.0 * self.wire_bytes as f64 / self.raw_bytes as f64
            )
        } else {
            String::new()
        };
        writeln!(f, "WAL store:          {}", self.wal_dir)?;
        writeln!(f, "system identifier:  {}", self.system_identifier)?;
        writeln!(f, "timeline:           {}", self.timeline)?;
        writeln!(f, "flush position:     {}", self.flush_lsn)?;
        writeln!(f, "segment size:       {} bytes", self.segment_size)?;
        writeln!(f, "PostgreSQL version: {}", self.pg_version)?;
        writeln!(
            f,
            "first segment:      {}",
            self.first_segment.as_deref().unwrap_or("(none)")
        )?;
        writeln!(
            f,
            "last segment:       {}",
            self.last_segment.as_deref().unwrap_or("(none)")
        )?;
        writeln!(
            f,
            "segments:           {} sealed, {} being written",
            self.sealed_segments, self.partial_segments
        )?;
        writeln!(
            f,
            "received:           {} bytes of WAL, {} bytes on the wire{ratio}",
            self.raw_bytes, self.wire_bytes
        )?;
        if let Some(s) = &self.standby {
            writeln!(
                f,
                "standby:            {} ({}), replayed to {}, flushed to {}, last report at {}",
                if s.application_name.is_empty() {
                    "?"
                } else {
                    &s.application_name
                },
                if s.connected {
                    "connected"
                } else {
                    "not connected"
                },
                s.replay_lsn,
                s.flush_lsn,
                pgtime::unix_to_rfc3339(s.reply_time)
            )?;
        }
        if let Some(r) = &self.retention {
            writeln!(f, "retention:          {}", r.setting)?;
            writeln!(
                f,
                "oldest kept:        {}: {} ({} bytes sealed, as of {})",
                r.oldest_kept.as_deref().unwrap_or("(none)"),
                r.reason,
                r.sealed_bytes,
                pgtime::unix_to_rfc3339(r.updated)
            )?;
        }
        if !self.history_timelines.is_empty() {
            writeln!(
                f,
                "history files:      timelines {:?}",
                self.history_timelines
            )?;
        }
        if let Some(s) = &self.standby_server {
            let or = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
            match &s.error {
                Some(e) => writeln!(f, "standby server:     unreachable: {e}")?,
                None => writeln!(
                    f,
                    "standby server:     {} on timeline {}, replayed to {}, received to {}, last replayed commit at {}",
                    if s.in_recovery == Some(true) { "in recovery" } else { "NOT in recovery (a primary)" },
                    s.timeline.map(|t| t.to_string()).unwrap_or_else(|| "-".into()),
                    or(&s.replay_lsn),
                    or(&s.receive_lsn),
                    or(&s.last_replay_time)
                )?,
            }
        }
        write!(
            f,
            "receiver running:   {}",
            if self.receiver_running { "yes" } else { "no" }
        )
    }
}
