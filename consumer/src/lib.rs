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
//! Documents are mapped, written and classified by the index layer
//! (`tidemark-index`: mapping, bulk apply, answers), the one path the replay
//! tools use too; this crate owns the Kafka side of the worker.
//!
//! Modules: `error` (`ConsumerError`: what stops it), `record` (what a
//! record must be to be applied), `run` (Kafka group loop, offsets, dead
//! letters), `metrics`, `http`.

pub mod error;
pub mod http;
pub mod indices;
pub mod metrics;
pub mod record;
pub mod run;
