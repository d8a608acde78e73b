//! `[producer]`: the slot, the publication, the snapshot and the limits of
//! what one change may be.

use super::{ConfigError, invalid, is_pg_name};
use serde::Deserialize;

/// Default largest event, in bytes, sent to a table topic; larger ones go to
/// the dead-letter topic. Matches Kafka's default `message.max.bytes` (1 MB),
/// so an event the broker would refuse never stalls the stream.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1_000_000;
/// Default largest replication message the producer reads, in bytes: 1 GiB,
/// PostgreSQL's own limit for a value, so every row PostgreSQL can hold is
/// read (and, over `max_event_bytes`, dead-lettered). It costs memory only
/// when such a row comes: one message is held whole while it is decoded.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1 << 30;
/// Tables snapshotted at once. Each holds one PostgreSQL connection and a
/// cursor; 2 keeps a 2-core database responsive.
pub const DEFAULT_SNAPSHOT_PARALLELISM: usize = 2;
/// Rows fetched per cursor round trip in a snapshot: large enough to
/// amortize the round trip, small enough that memory stays flat.
pub const DEFAULT_SNAPSHOT_FETCH_ROWS: usize = 2_000;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Producer {
    /// Replication slot; one producer reads one slot.
    #[serde(default = "default_slot")]
    pub slot: String,
    /// Publication listing the captured tables.
    #[serde(default = "default_slot")]
    pub publication: String,
    /// Create the publication (for the configured tables) if it is missing.
    #[serde(default = "yes")]
    pub create_publication: bool,
    /// Create the slot if it is missing. A new slot starts with a snapshot
    /// of every configured table, consistent with the stream.
    #[serde(default = "yes")]
    pub create_slot: bool,
    /// Take the initial snapshot when the slot is created.
    #[serde(default = "yes")]
    pub snapshot: bool,
    #[serde(default = "default_snapshot_parallelism")]
    pub snapshot_parallelism: usize,
    #[serde(default = "default_snapshot_fetch_rows")]
    pub snapshot_fetch_rows: usize,
    #[serde(default = "default_max_event_bytes")]
    pub max_event_bytes: usize,
    /// Largest replication message read (one row change is one message).
    /// A larger one cannot be read nor skipped (the stream cannot resume
    /// past it): the producer then waits, backing off, with the table and
    /// LSN on `/readyz`, until this is raised.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Address of `/healthz`, `/readyz` and `/metrics`.
    #[serde(default = "default_http_listen")]
    pub http_listen: String,
}

impl Default for Producer {
    fn default() -> Self {
        Producer {
            slot: default_slot(),
            publication: default_slot(),
            create_publication: true,
            create_slot: true,
            snapshot: true,
            snapshot_parallelism: DEFAULT_SNAPSHOT_PARALLELISM,
            snapshot_fetch_rows: DEFAULT_SNAPSHOT_FETCH_ROWS,
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            http_listen: default_http_listen(),
        }
    }
}

pub(crate) fn default_slot() -> String {
    "tidemark".into()
}
pub(crate) fn yes() -> bool {
    true
}
pub(crate) fn default_snapshot_parallelism() -> usize {
    DEFAULT_SNAPSHOT_PARALLELISM
}
pub(crate) fn default_snapshot_fetch_rows() -> usize {
    DEFAULT_SNAPSHOT_FETCH_ROWS
}
pub(crate) fn default_max_event_bytes() -> usize {
    DEFAULT_MAX_EVENT_BYTES
}
pub(crate) fn default_max_message_bytes() -> usize {
    DEFAULT_MAX_MESSAGE_BYTES
}
pub(crate) fn default_http_listen() -> String {
    "127.0.0.1:9464".into()
}

impl Producer {
    /// The `[producer]` constraints.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        for (field, name) in [
            ("producer.slot", &self.slot),
            ("producer.publication", &self.publication),
        ] {
            if !is_pg_name(name) {
                return Err(invalid(
                    field,
                    format!(
                        "{name:?} must be 1-63 characters of a-z, 0-9 and _ (PostgreSQL slot rules)"
                    ),
                ));
            }
        }
        if self.snapshot_parallelism == 0 {
            return Err(invalid(
                "producer.snapshot_parallelism",
                "must be at least 1",
            ));
        }
        if self.snapshot_fetch_rows == 0 {
            return Err(invalid(
                "producer.snapshot_fetch_rows",
                "must be at least 1",
            ));
        }
        if self.max_event_bytes < 1024 {
            return Err(invalid("producer.max_event_bytes", "must be at least 1024"));
        }
        if self.max_message_bytes < 1024 || self.max_message_bytes > DEFAULT_MAX_MESSAGE_BYTES {
            return Err(invalid(
                "producer.max_message_bytes",
                "must be from 1024 to 1073741824 (1 GiB, the protocol's limit)",
            ));
        }
        if self.http_listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                "producer.http_listen",
                "must be an address like 127.0.0.1:9464",
            ));
        }
        Ok(())
    }
}
