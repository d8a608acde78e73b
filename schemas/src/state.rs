//! The producer's progress record, as it travels in the state topic
//! (`kafka.state_topic`, compacted, keyed by slot, latest wins). The
//! producer writes it and owns its rules (`tidemark-producer`'s `state`
//! module); the consumer reads which PostgreSQL cluster and database feed
//! the pipeline from it (the pipeline's identity, see [`crate::identity`]).

use serde::{Deserialize, Serialize};

use crate::Lsn;

/// The latest progress of one slot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlotProgress {
    pub slot: String,
    /// The initial snapshot finished and every row of it is in Kafka.
    pub snapshot_complete: bool,
    /// The LSN the snapshot is consistent at, once known.
    #[serde(default)]
    pub snapshot_lsn: Option<Lsn>,
    /// The highest LSN confirmed (or about to be) to PostgreSQL.
    #[serde(default)]
    pub confirmed_lsn: Option<Lsn>,
    /// The cluster the slot's changes come from (IDENTIFY_SYSTEM). Absent in
    /// records written before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_id: Option<String>,
    /// The database the slot belongs to. Absent in records written before
    /// it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    /// The server's timeline when the record was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<u32>,
    /// The last gap in the history a new snapshot was taken over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gap: Option<HistoryGap>,
    /// The tables (`schema.table`) whose rows Kafka holds: snapshotted,
    /// with the slot or when they were added to the config later. A
    /// configured table not listed is snapshotted at the next start.
    /// Absent in records written before it was kept (the publication's
    /// tables then stand for it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tables: Option<Vec<String>>,
    /// Each table's last shape as pgoutput described it (`schema.table` ->
    /// its columns, [`shape_text`]): a Relation message that differs is a
    /// schema change. Kept here so a reconnect, which sends every Relation
    /// again, is not mistaken for one. A table's first shape is recorded
    /// before its first row is sent, so the consumer can map its index from
    /// the column types (`tidemark_index::derive`) before the first document.

    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub shapes: std::collections::BTreeMap<String, String>,
    /// The `kafka.topic_prefix` the slot's tables are sent under: with
    /// `tables`, the topics this slot feeds, which no other slot may (see
    /// the producer's `state::claimed_elsewhere`). Absent in records
    /// written before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic_prefix: Option<String>,
}

/// A gap in the change history, as recorded when a new snapshot was taken
/// over it (`tidemark-producer --resnapshot`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryGap {
    /// What was lost.
    pub what: String,
    /// The last position Tidemark had confirmed before the gap.
    pub last_confirmed: Option<Lsn>,
    /// The LSN the new snapshot is consistent at (the documents it did not
    /// rewrite are older than it).
    #[serde(default)]
    pub resnapshot_lsn: Option<Lsn>,
    /// When the new snapshot was started (RFC 3339).
    pub at: String,
}

/// A table's shape as [`SlotProgress::shapes`] keeps it: each column's name
/// and type OID, in order, `name:oid` joined by `,`. The one place the
/// format is written.
pub fn shape_text<'a>(columns: impl Iterator<Item = (&'a str, u32)>) -> String {
    columns
        .map(|(name, oid)| format!("{name}:{oid}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The columns (name, type OID) of a shape made by [`shape_text`]; `None`
/// when the text is not one. A column name may hold `:` or `,` (quoted
/// identifiers): each entry is split at its last `:`, and a `,` inside a
/// name leaves a piece without one, which joins the next.
pub fn shape_columns(shape: &str) -> Option<Vec<(String, u32)>> {
    if shape.is_empty() {
        return Some(Vec::new());
    }
    let mut columns = Vec::new();
    let mut pending = String::new();
    for piece in shape.split(',') {
        if !pending.is_empty() {
            pending.push(',');
        }
        pending.push_str(piece);
        if let Some((name, oid)) = pending.rsplit_once(':')
            && let Ok(oid) = oid.parse::<u32>()
        {
            columns.push((name.to_owned(), oid));
            pending.clear();
        }
    }
    pending.is_empty().then_some(columns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shape_reads_back_as_its_columns() {
        let columns = [("id", 23), ("odd:name", 25), ("a,b", 3802), ("price", 1700)];
        let text = shape_text(columns.iter().map(|(n, o)| (*n, *o)));
        assert_eq!(text, "id:23,odd:name:25,a,b:3802,price:1700");
        let back = shape_columns(&text).expect("a shape");
        let expected: Vec<(String, u32)> =
            columns.iter().map(|(n, o)| (n.to_string(), *o)).collect();
        assert_eq!(back, expected);
        assert_eq!(shape_columns(""), Some(Vec::new()));
        assert_eq!(shape_columns("id:x"), None);
    }
}
