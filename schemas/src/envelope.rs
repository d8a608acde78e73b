//! The change-event envelope: one JSON object per row change, the wire format
//! between the producer and everything downstream (consumer, replay, audit,
//! history). `schemas/envelope.schema.json` is its JSON Schema.
//!
//! Compatibility: `format` is the envelope version. A reader accepts every
//! version up to the one it knows and ignores fields it does not know, so a
//! newer producer can add fields without breaking older consumers; a change
//! that would break them raises `format`.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::Lsn;

/// The envelope version this crate writes.
pub const FORMAT_VERSION: u32 = 1;

/// Row values by column name, already mapped to JSON without loss.
pub type Row = Map<String, Value>;

/// One change of one row (or, for a truncate, of one table).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeEvent {
    /// Envelope version; see [`FORMAT_VERSION`].
    pub format: u32,
    /// Which table changed.
    pub source: Source,
    /// What happened.
    pub op: Operation,
    /// The primary-key (or replica-identity) columns. Empty for a truncate.
    pub key: Row,
    /// The row before the change, where the replica identity provides it
    /// (the key columns with the default identity, all columns with FULL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<Row>,
    /// The row after the change; absent for deletes and truncates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Row>,
    /// Columns whose values PostgreSQL did not send because an UPDATE left a
    /// large (TOASTed) value unchanged. They are absent from `after`, and the
    /// index must keep its current value for them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unchanged_toast: Vec<String>,
    /// Commit LSN of the source transaction; for snapshot rows, the LSN at
    /// which the snapshot is consistent. With `timeline`, it makes the
    /// document version ([`crate::Version`]).
    pub commit_lsn: Lsn,
    /// The PostgreSQL timeline the change was read on. Absent (and written
    /// only when above 1) for timeline 1, where every cluster starts and
    /// every envelope written before the field existed was read.
    #[serde(default = "first_timeline", skip_serializing_if = "is_first_timeline")]
    pub timeline: u32,
    /// The change's own position in the WAL (equal to `commit_lsn` for
    /// snapshot rows).
    pub lsn: Lsn,
    /// Source transaction id; absent for snapshot rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xid: Option<u32>,
    /// Commit time, RFC 3339 in UTC with microseconds; for snapshot rows the
    /// time the snapshot was taken.
    pub commit_time: String,
}

fn first_timeline() -> u32 {
    1
}

fn is_first_timeline(timeline: &u32) -> bool {
    *timeline == 1
}

impl ChangeEvent {
    /// The document version of this change ([`crate::Version`]'s rule).
    pub fn version(&self) -> Result<crate::Version, crate::VersionError> {
        crate::Version::of_commit(self.timeline, self.commit_lsn)
    }
}

/// A table in a database.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Source {
    pub database: String,
    pub schema: String,
    pub table: String,
}

impl Source {
    /// `schema.table`, the name used in topics, config and messages.
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }
}

/// What happened to the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// A row read by the initial snapshot.
    Snapshot,
    Insert,
    Update,
    Delete,
    /// The whole table was truncated. Sent to every partition of the table's
    /// topic, so that it is ordered with every key's changes.
    Truncate,
    /// A new snapshot, taken over a gap in the history (`tidemark-producer
    /// --resnapshot`), rewrote every row of the table at this event's
    /// version: a document older than it is of a row that is gone. Sent to
    /// every partition, after the snapshot's rows, with an empty key. Not a
    /// change of any row: readers before it existed set it aside as a
    /// record they cannot read.
    Resnapshot,
}

impl Operation {
    /// The lower-case name used in headers, metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Snapshot => "snapshot",
            Operation::Insert => "insert",
            Operation::Update => "update",
            Operation::Delete => "delete",
            Operation::Truncate => "truncate",
            Operation::Resnapshot => "resnapshot",
        }
    }
}

/// The Kafka record key of a row: table and primary key, as compact JSON
/// with key columns in name order, so the same row always gets the same key
/// bytes (and so the same partition) whatever order columns arrive in.
pub fn record_key(source: &Source, key: &Row) -> Vec<u8> {
    #[derive(Serialize)]
    struct RecordKey<'a> {
        schema: &'a str,
        table: &'a str,
        key: std::collections::BTreeMap<&'a str, &'a Value>,
    }
    let sorted = key.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let record_key = RecordKey {
        schema: &source.schema,
        table: &source.table,
        key: sorted,
    };
    // Serializing strings and JSON values into a Vec cannot fail.
    serde_json::to_vec(&record_key).unwrap_or_default()
}

/// The part of an envelope a topic scan looks at: which key, what kind of
/// change, when. The row images are skipped, not built, so a scan over
/// wide rows costs little more than over narrow ones.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct EventHead {
    pub format: u32,
    pub op: Operation,
    pub key: Row,
    pub commit_time: String,
}

impl EventHead {
    /// Parses the head of an envelope, refusing versions newer than this
    /// reader; the same errors as [`ChangeEvent::from_slice`].
    pub fn from_slice(bytes: &[u8]) -> Result<EventHead, EnvelopeError> {
        let head: EventHead = serde_json::from_slice(bytes)?;
        check_format(head.format)?;
        Ok(head)
    }
}

/// Why an envelope could not be read.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("not a change event: {0}")]
    Json(#[from] serde_json::Error),
    #[error(
        "change event format {found} is newer than this reader knows ({known}); upgrade Tidemark"
    )]
    TooNew { found: u32, known: u32 },
}

/// Refuses envelope versions newer than this reader.
fn check_format(format: u32) -> Result<(), EnvelopeError> {
    if format > FORMAT_VERSION {
        return Err(EnvelopeError::TooNew {
            found: format,
            known: FORMAT_VERSION,
        });
    }
    Ok(())
}

impl ChangeEvent {
    /// Parses an envelope, refusing versions newer than this reader.
    pub fn from_slice(bytes: &[u8]) -> Result<ChangeEvent, EnvelopeError> {
        let event: ChangeEvent = serde_json::from_slice(bytes)?;
        check_format(event.format)?;
        Ok(event)
    }

    /// The envelope as the JSON bytes written to Kafka.
    pub fn to_vec(&self) -> Vec<u8> {
        // Maps with string keys and JSON values always serialize.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn row(value: Value) -> Row {
        match value {
            Value::Object(map) => map,
            other => panic!("not an object: {other}"),
        }
    }

    fn users() -> Source {
        Source {
            database: "shop".into(),
            schema: "public".into(),
            table: "users".into(),
        }
    }

    #[test]
    fn record_key_is_stable_across_column_order() {
        let a = record_key(&users(), &row(json!({"tenant": 7, "id": "x"})));
        let mut reordered = Row::new();
        reordered.insert("id".into(), json!("x"));
        reordered.insert("tenant".into(), json!(7));
        let b = record_key(&users(), &reordered);
        assert_eq!(a, b);
        assert_eq!(
            String::from_utf8(a).expect("utf-8"),
            r#"{"schema":"public","table":"users","key":{"id":"x","tenant":7}}"#
        );
    }

    #[test]
    fn rejects_a_newer_format_and_names_both_versions() {
        let mut value = serde_json::to_value(ChangeEvent {
            format: FORMAT_VERSION,
            source: users(),
            op: Operation::Delete,
            key: row(json!({"id": 1})),
            before: None,
            after: None,
            unchanged_toast: vec![],
            commit_lsn: Lsn(2),
            timeline: 1,
            lsn: Lsn(1),
            xid: Some(9),
            commit_time: "2026-01-01T00:00:00.000000Z".into(),
        })
        .expect("to value");
        value["format"] = json!(FORMAT_VERSION + 1);
        let bytes = serde_json::to_vec(&value).expect("bytes");
        let err = ChangeEvent::from_slice(&bytes).expect_err("too new");
        assert!(err.to_string().contains("format 2 is newer"), "{err}");
        let err = EventHead::from_slice(&bytes).expect_err("too new");
        assert!(err.to_string().contains("format 2 is newer"), "{err}");
    }

    #[test]
    fn head_is_the_envelope_without_its_row_images() {
        let event = ChangeEvent {
            format: FORMAT_VERSION,
            source: users(),
            op: Operation::Update,
            key: row(json!({"id": 7, "region": "eu"})),
            before: Some(row(json!({"id": 7, "region": "eu", "name": "old"}))),
            after: Some(row(
                json!({"id": 7, "region": "eu", "name": "new \"quoted\""}),
            )),
            unchanged_toast: vec!["bio".into()],
            commit_lsn: Lsn(0x20),
            timeline: 1,
            lsn: Lsn(0x18),
            xid: Some(11),
            commit_time: "2026-01-01T00:00:00.000001Z".into(),
        };
        let head = EventHead::from_slice(&event.to_vec()).expect("head parses");
        assert_eq!(
            head,
            EventHead {
                format: FORMAT_VERSION,
                op: event.op,
                key: event.key.clone(),
                commit_time: event.commit_time.clone(),
            }
        );
        // A payload that is not an envelope is an error, not an empty head.
        assert!(EventHead::from_slice(br#"{"format":1,"op":"insert"}"#).is_err());
    }

    #[test]
    fn ignores_unknown_fields_from_newer_writers() {
        let bytes = br#"{"format":1,"source":{"database":"d","schema":"s","table":"t"},
            "op":"insert","key":{"id":1},"after":{"id":1},"commit_lsn":"0/10","lsn":"0/8",
            "xid":5,"commit_time":"2026-01-01T00:00:00.000000Z","added_later":true}"#;
        let event = ChangeEvent::from_slice(bytes).expect("parses");
        assert_eq!(event.op, Operation::Insert);
        assert_eq!(event.commit_lsn, Lsn(0x10));
        assert!(event.unchanged_toast.is_empty());
    }
}
