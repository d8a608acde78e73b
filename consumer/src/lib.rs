//! The consumer: Kafka change events applied to OpenSearch.
//!
//! Contract (DESIGN.md invariants 1, 2, 4, 5, 6, 7):
//! - Delivery: at least once; duplicates are harmless because every write
//!   carries the source commit LSN as an `external_gte` version, so a stale,
//!   repeated or replayed event can never overwrite newer data.
//! - Ordering: per key within a partition, kept inside each bulk batch.
//! - Progress: an offset is stored (and so committed) only after OpenSearch
//!   accepted, or the dead-letter topic took, every record at or before it.
//!
//! `apply` is the only path by which Tidemark writes documents; the replay
//! tools reuse it with the same `mapping`.
//!
//! Modules: `mapping` (table -> index, id, fields, metadata), `search`
//! (OpenSearch requests), `apply` (bulk with versions, TOAST, retries),
//! `run` (Kafka group loop, offsets, dead letters), `metrics`, `http`.

pub mod apply;
pub mod http;
pub mod mapping;
pub mod metrics;
pub mod run;
pub mod search;
