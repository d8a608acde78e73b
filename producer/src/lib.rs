//! The producer: PostgreSQL logical replication (pgoutput) into Kafka.
//!
//! Contract (DESIGN.md invariants 1, 4, 5, 6, 7), which every part of this
//! crate keeps as it is built:
//! - Delivery: at least once. An LSN is confirmed to PostgreSQL only after
//!   Kafka acknowledged every event at or before it (idempotent producer,
//!   `acks=all`), so a crash at any moment re-sends, never skips.
//! - Ordering: per row. The Kafka key is table + primary key, so one row's
//!   changes land in one partition, in commit order.
//! - Progress: the confirmed flush LSN moves only with Kafka's delivery
//!   reports, or, when nothing is pending, to the server's keepalive position.
//!
//! The PostgreSQL side apart from the stream (connections, checks,
//! publication, catalog, the key rule, value mapping) is the PostgreSQL
//! layer, `tidemark-postgres`, which replay uses too.
//!
//! Modules: `pgoutput` (decoder), `changes` (messages to events),
//! `snapshot`, `stream` (replication to Kafka with acknowledgement),
//! `sink` (Kafka), `state` (progress record), `metrics`, `http`, `run`,
//! `waits` (which errors are waited out).

pub mod changes;
pub mod http;
pub mod metrics;
pub mod pgoutput;
pub mod run;
pub mod sink;
pub mod snapshot;
pub mod state;
pub mod stream;
mod waits;
