//! The incident tools: re-apply a time window, audit source against index,
//! and show a row's change history.
//!
//! Contract (DESIGN.md invariants 2, 3, 8): replay never resurrects a deleted
//! row nor regresses a newer one, however often it runs; it writes only
//! through the index layer's apply path (`tidemark-index`, the consumer's
//! too) and reads rows only through the PostgreSQL layer
//! (`tidemark-postgres`, the producer's too); and every command that writes shows its
//! target and counts first and needs `--dry-run` or an explicit confirmation.
//!
//! Modules: `window` (repair a time window, source and log mode),
//! `backfill` (a table's rows into its index, through window's engine),
//! `reindex` (a table's index rebuilt behind its name), `audit`

//! (source against index) and `merge` (its key-ordered merge),
//! `dead_letters` (list the dead-letter topic, gather keys to repair),
//! `error` (the one error type, [`error::ReplayError`]),
//! `guard` (what every writing command does: target, confirmation, run record),
//! `history` (a row's changes from Kafka), `keys` (key
//! arguments -> the producer's key object), `time` (RFC 3339 and relative
//! times), `progress` (bars on a terminal, nothing in logs), `watch`
//! (`audit --watch`'s state, `/readyz` and `/metrics`).

pub mod audit;
pub mod backfill;
pub mod dead_letters;
pub mod error;
pub mod guard;
pub mod history;
pub mod keys;
pub mod merge;
pub mod progress;
pub mod reindex;
pub mod time;
pub mod watch;
pub mod window;
