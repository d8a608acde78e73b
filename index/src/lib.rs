//! The OpenSearch layer: everything Tidemark knows about documents and how
//! they are written, shared by the consumer and the replay tools.
//!
//! It owns:
//! - `mapping`: table -> index, document id, fields, the `_tidemark`
//!   metadata, and the one version a write carries (built through
//!   `tidemark_schemas::Version`);
//! - `derive`: a new index's field types, from its table's column types as
//!   the producer recorded them;
//! - `nodes`: the cluster's nodes, each request to the next in turn;
//! - `search`: the connection and every request Tidemark makes (bulk, reads
//!   by id and hash, scrolls, index checks);
//! - `alias`: an index name that stands for an alias, the mark a reindex
//!   puts on the index it fills, and the atomic alias move;
//! - `answer`: what each OpenSearch answer means (applied, stale, a bad

//!   record, or wait), decided in one place;
//! - `apply`: bulk writes with `external_gte` versions, TOAST fills, and
//!   waiting out whatever cannot be written now;
//! - `reads`: documents' `_tidemark` metadata by id or by search, and
//!   every id of an index in id order (scrolls);
//! - `runs`: the `tidemark-runs` index where replay records what it did;
//! - `identity`: each index's pipeline stamp and the rule by which a
//!   writer accepts an index (the wrong-target guard);
//! - `error`: what fails outside a bulk answer (`IndexError`, with
//!   `retryable()`).
//!
//! It promises: `apply::Applier` is the only path by which documents are
//! written, so a write from the consumer and a write from `window` are built,
//! versioned and classified the same way; an outage (closed, blocked,
//! refused, unreachable) is waited for, never reported as a bad record.
//!
//! It depends only on `tidemark-schemas`; it knows nothing of Kafka or
//! PostgreSQL (their types reach it only as `tidemark_schemas::values`).

pub mod alias;
pub mod answer;
pub mod apply;
pub mod derive;
pub mod error;
pub mod identity;
pub mod mapping;
pub mod nodes;
pub mod reads;
pub mod runs;
pub mod search;
mod tls;

/// The HTTP types of the client crate, for requests `Search::call` sends.
pub use opensearch::http;
