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
//! (OpenSearch requests), `answer` (what each OpenSearch answer means:
//! applied, stale, a bad record, or wait), `apply` (bulk with versions,
//! TOAST, waiting out what cannot be written now),
//! `record` (what a record must be to be applied), `run` (Kafka group
//! loop, offsets, dead letters), `metrics`, `http`.

pub mod answer;
pub mod apply;
pub mod http;
pub mod mapping;
pub mod metrics;
pub mod record;
pub mod run;
pub mod search;
