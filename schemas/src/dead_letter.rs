//! The dead-letter record, one shape for both stages that write it.
//!
//! A dead letter says where a record came from and why it was set aside:
//! never row contents (a key, which identifies the row, is carried by
//! design). The row itself stays where it was, in its table topic (consumer)
//! or in PostgreSQL (producer); `tidemark-replay dead-letters --repair`
//! reads it again from there. The wire form is pinned by
//! `schemas/tests/golden/dead_letter_*.json`.

use serde::{Deserialize, Serialize};

use crate::{ChangeEvent, Lsn, Operation, Row};

/// Which stage set the record aside.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Producer,
    Consumer,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Producer => "producer",
            Stage::Consumer => "consumer",
        }
    }
}

/// Where a consumer's record was in Kafka.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// One dead letter. Fields the stage does not know are `null`; `origin`
/// (consumer) and `lsn` (producer) are left out by the stage that has none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub stage: Stage,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
    /// schema.table, when known (a payload that was not a change event
    /// has none).
    #[serde(default)]
    pub table: Option<String>,
    #[serde(default)]
    pub key: Option<Row>,
    #[serde(default)]
    pub op: Option<Operation>,
    #[serde(default)]
    pub commit_lsn: Option<Lsn>,
    /// The position in the replication stream where the producer met it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsn: Option<Lsn>,
    #[serde(default)]
    pub commit_time: Option<String>,
    /// Why it was set aside: names table, column and type, never a value.
    pub reason: String,
    /// The table topic the record belongs to, written by the producer when
    /// it knows the table (the consumer's is `origin.topic`). See
    /// [`DeadLetter::table_topic`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
}

impl DeadLetter {
    /// A dead letter for `event` (when it could be decoded) or for a record
    /// of `table` (when only that is known).
    pub fn new(
        stage: Stage,
        event: Option<&ChangeEvent>,
        table: Option<&str>,
        reason: &str,
    ) -> Self {
        DeadLetter {
            stage,
            origin: None,
            table: event
                .map(|e| e.source.qualified())
                .or(table.map(str::to_owned)),
            key: event.map(|e| e.key.clone()),
            op: event.map(|e| e.op),
            commit_lsn: event.map(|e| e.commit_lsn),
            lsn: None,
            commit_time: event.map(|e| e.commit_time.clone()),
            reason: reason.to_owned(),
            topic: None,
        }
    }

    /// The table topic the record belongs to (`origin.topic`, else the
    /// producer's `topic`): which deployment set it aside when several
    /// share one dead-letter topic, since a table's name alone does not say
    /// (two databases can both have `public.orders`; their deployments
    /// differ by `kafka.topic_prefix`). `None` for a record of no known
    /// table, or one written before the producer kept it.
    pub fn table_topic(&self) -> Option<&str> {
        self.origin
            .as_ref()
            .map(|o| o.topic.as_str())
            .or(self.topic.as_deref())
    }

    /// The record's payload.
    pub fn to_vec(&self) -> Vec<u8> {
        // A struct of strings, numbers and JSON maps always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses a payload; an error for what is not a dead letter.
    pub fn from_slice(payload: &[u8]) -> Result<DeadLetter, serde_json::Error> {
        serde_json::from_slice(payload)
    }

    /// Where the record was: `topic/partition/offset` (consumer), `lsn X`
    /// (producer), else `?`.
    pub fn place(&self) -> String {
        match (&self.origin, self.lsn.or(self.commit_lsn)) {
            (Some(o), _) => format!("{}/{}/{}", o.topic, o.partition, o.offset),
            (None, Some(lsn)) => format!("lsn {lsn}"),
            (None, None) => "?".to_owned(),
        }
    }
}
