//! The incident tools' one error type: what stops a command of the replay
//! library (`window`, `backfill`, `audit`, `history`, `dead-letters`).
//! Every variant says what it was doing, naming the table, the topic, the
//! partition and offset, or the document id; none carries a row's contents.
//!
//! What the tools wait out (OpenSearch down or refusing a write while a
//! repair applies) never becomes one of these: the index layer's apply
//! path retries it and says so. These end the command, which then records
//! its run as failed (`guard`) and exits 2 with the causes on one line
//! (`tidemark_process::report`).
//!
//! [`Context`] names the step an error happened in, as `anyhow`'s does,
//! but keeps the error typed: a PostgreSQL error stays a
//! `tokio_postgres::Error`, a Kafka error a `KafkaError`.

use std::io;

use rdkafka::error::KafkaError;
use tidemark_index::error::IndexError;
use tidemark_index::mapping::MappingError;
use tidemark_index::search::SearchError;
use tidemark_postgres::{ExportError, RowError, SourceError};
use tidemark_schemas::{EnvelopeError, VersionError};

/// The replay library's results.
pub type Result<T, E = ReplayError> = std::result::Result<T, E>;

/// Why an incident command could not go on.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The PostgreSQL layer refused (no such table, no key, a catalog read).
    #[error(transparent)]
    Source(#[from] SourceError),
    /// An exported snapshot could not be taken.
    #[error(transparent)]
    Export(#[from] ExportError),
    /// A row's value or key could not be decoded.
    #[error(transparent)]
    Row(#[from] RowError),
    /// The index layer failed a request or a set-up step.
    #[error(transparent)]
    Index(#[from] IndexError),
    /// A request to OpenSearch did not go through.
    #[error(transparent)]
    Search(#[from] SearchError),
    /// A row or an event makes no document (its id, its version).
    #[error(transparent)]
    Mapping(#[from] MappingError),
    /// A snapshot or commit position makes no document version.
    #[error(transparent)]
    Version(#[from] VersionError),

    /// A PostgreSQL query failed: `what` names the step and the table.
    #[error("{what}")]
    Postgres {
        what: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// A Kafka read failed: `what` names the topic, partition and offset.
    #[error("{what}")]
    Kafka {
        what: String,
        #[source]
        source: KafkaError,
    },
    /// A spill file (keys, rows or documents sorted on disk) failed.
    #[error("{what}")]
    Spill {
        what: String,
        #[source]
        source: io::Error,
    },
    /// A record read from Kafka (or written to a spill file) is not what
    /// Tidemark writes: not UTF-8, not JSON, not an event.
    #[error("{what}")]
    Record {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A step failed for a reason below it, itself one of these.
    #[error("{what}")]
    Step {
        what: String,
        #[source]
        source: Box<ReplayError>,
    },
    /// What the command will not do, and what to do instead (a window
    /// beyond retention, a table without a key, ...).
    #[error("{0}")]
    Refused(String),
    /// A server did not answer in time (records that did not arrive).
    #[error("{0}")]
    Timeout(String),
    /// The command was stopped (SIGTERM, Ctrl-C) while it waited out an
    /// outage; what it had applied stays applied.
    #[error("{0}")]
    Interrupted(String),
    /// A task of the command's own failed (a panic, or it was cut off).

    #[error("{0}")]
    Task(String),
}

/// An error that a step's name can be put around.
pub trait Cause {
    /// This error, as the cause of the step `what`.
    fn within(self, what: String) -> ReplayError;
}

impl Cause for ReplayError {
    fn within(self, what: String) -> ReplayError {
        ReplayError::Step {
            what,
            source: Box::new(self),
        }
    }
}

impl Cause for tokio_postgres::Error {
    fn within(self, what: String) -> ReplayError {
        ReplayError::Postgres { what, source: self }
    }
}

impl Cause for KafkaError {
    fn within(self, what: String) -> ReplayError {
        ReplayError::Kafka { what, source: self }
    }
}

impl Cause for io::Error {
    fn within(self, what: String) -> ReplayError {
        ReplayError::Spill { what, source: self }
    }
}

macro_rules! cause_in_a_record {
    ($($t:ty),*) => {$(
        impl Cause for $t {
            fn within(self, what: String) -> ReplayError {
                ReplayError::Record { what, source: Box::new(self) }
            }
        }
    )*};
}
cause_in_a_record!(serde_json::Error, std::str::Utf8Error, EnvelopeError);

impl Cause for tidemark_index::apply::Interrupted {
    fn within(self, what: String) -> ReplayError {
        ReplayError::Interrupted(format!("{what}: {self}"))
    }
}

impl Cause for tokio::task::JoinError {
    fn within(self, what: String) -> ReplayError {
        ReplayError::Task(format!("{what}: {self}"))
    }
}

macro_rules! cause_through_replay_error {
    ($($t:ty),*) => {$(
        impl Cause for $t {
            fn within(self, what: String) -> ReplayError {
                ReplayError::from(self).within(what)
            }
        }
    )*};
}
cause_through_replay_error!(
    SourceError,
    ExportError,
    RowError,
    IndexError,
    SearchError,
    MappingError,
    VersionError
);

/// Names the step a result's error happened in.
pub trait Context<T> {
    /// The error, if any, as the cause of `what`.
    fn context(self, what: &str) -> Result<T>;
    /// The error, if any, as the cause of the step `what()` names (built
    /// only on an error).
    fn with_context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: Cause> Context<T> for std::result::Result<T, E> {
    fn context(self, what: &str) -> Result<T> {
        self.map_err(|e| e.within(what.to_owned()))
    }

    fn with_context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| e.within(what()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_names_itself_then_its_cause_once() {
        let spill: io::Result<()> = Err(io::Error::other("disk full"));
        let Err(e) = spill
            .context("reading the window's keys back from disk")
            .with_context(|| "table public.orders: window".to_owned())
        else {
            panic!("an error stays an error");
        };

        assert_eq!(
            tidemark_process::report(&e),
            "table public.orders: window: reading the window's keys back from disk: disk full"
        );
        assert!(matches!(e, ReplayError::Step { .. }));
    }
}
