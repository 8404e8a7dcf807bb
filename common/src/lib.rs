//! walship-common: what wal-sender and wal-receiver share.
//!
//! - [`lsn`]: WAL positions.
//! - [`segment`]: timelines, segment numbers and WAL file names.
//! - [`frame`]: the checksummed, compressed frame every message travels in.
//! - [`protocol`]: the walship messages and the handshake.
//! - [`durable`]: crash-safe file writes.
//! - [`logging`]: tracing set-up shared by both binaries.
//! - [`timeline`]: timeline history files.
//! - [`pgtime`]: PostgreSQL's timestamps.
//! - [`tls`]: TLS configuration and the plain-or-TLS stream halves.
//! - [`conninfo`]: libpq connection strings, environment defaults and password files.
//! - [`config`]: configuration files and `WALSHIP_*` variables under the command line.
//! - [`pgclient`]: connecting to PostgreSQL with TLS by `sslmode`, and what a failure means.
//! - [`check`]: the report of the `check` commands, and the checks of TLS files.
//! - [`metrics`]: `--metrics-listen`, Prometheus metrics over HTTP.
//! - [`service`]: readiness, status and stopping, told to systemd (`Type=notify`).

pub mod check;
pub mod config;
pub mod conninfo;
pub mod durable;
pub mod frame;
pub mod logging;
pub mod lsn;
pub mod metrics;
pub mod pgclient;
pub mod pgtime;
pub mod protocol;
pub mod segment;
pub mod service;
pub mod timeline;
pub mod tls;

pub use lsn::Lsn;
pub use segment::{SegmentNo, TimelineId, WalFileName, WalSegSize};
