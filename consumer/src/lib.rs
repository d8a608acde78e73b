//! The consumer: Kafka change events applied to OpenSearch.
//!
//! Contract (DESIGN.md invariants 1, 2, 4, 5, 6, 7), which every part of this
//! crate keeps as it is built:
//! - Delivery: at least once; duplicates are harmless because every write
//!   carries the source commit LSN as an `external_gte` version, so a stale,
//!   repeated or replayed event can never overwrite newer data.
//! - Ordering: per key within a partition, kept inside each bulk batch.
//! - Progress: an offset is committed only after OpenSearch accepted (or the
//!   dead-letter topic took) every record at or before it.
//!
//! This is the only path by which Tidemark writes documents; the replay tools
//! reuse it. Not built yet; see the consumer issue.
