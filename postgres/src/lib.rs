//! The PostgreSQL layer: everything Tidemark knows about the source database
//! apart from decoding the replication stream, shared by the producer and
//! the replay tools.
//!
//! It owns:
//! - `conn`: the URL parsed once (`ConnInfo`), SQL and replication sessions
//!   opened from it with the same pinned output settings;
//! - `catalog`: tables, columns, types and the one key rule (primary key,
//!   else replica-identity index);
//! - `values`: PostgreSQL text output to JSON, without loss;
//! - `rows`: rows read by SQL mapped exactly as the stream maps them;
//! - `tls`: `sslmode` and its files, parsed once for both sessions;
//! - `export`: exported snapshots whose LSN is known exactly;
//! - `server`: the checks, publication and slot state logical replication
//!   needs;
//! - `error`: one error type whose messages tell the operator the fix.
//!
//! It promises: a row maps to the same key and JSON whether it arrives by
//! the stream, the snapshot or a replay read; no error carries a password
//! or a row's values. It depends only on `tidemark-schemas`; it knows
//! nothing of Kafka or OpenSearch.

pub mod catalog;
pub mod conn;
pub mod error;
pub mod export;
pub mod rows;
pub mod server;
pub mod tls;
pub mod values;

pub use catalog::{
    CatalogTable, TypeResolver, describe_table, quote_ident, read_columns, table_key,
};
pub use conn::{ConnInfo, Replication, SESSION_OPTIONS};
pub use error::{SourceError, connection_lost, pg_text};
pub use export::{ExportError, ExportedSnapshot, export_snapshot, system_identifier};
pub use rows::{Point, RowError, key_values, row_values};
