//! Decoded pgoutput messages to change events.
//!
//! Holds what the stream has said so far: the shape of each relation and
//! the transaction being read. No I/O: the caller resolves what needs the
//! catalog (primary-key columns, non-built-in types) and hands it in with
//! [`Changes::register`].
//!
//! Decisions a Debezium user would expect:
//! - The key is the primary key (looked up in the catalog), not pgoutput's
//!   key flags, which mark every column under `REPLICA IDENTITY FULL`.
//! - An UPDATE that changes the primary key becomes a delete of the old key
//!   followed by an update (upsert) of the new one, so each key's partition
//!   sees its own end.
//! - A TOASTed value an UPDATE did not touch is left out of `after` and named
//!   in `unchanged_toast`, unless the old row (REPLICA IDENTITY FULL) carries
//!   it, in which case `after` gets the value.

use std::collections::HashMap;

use serde_json::Value;
use tidemark_schemas::{ChangeEvent, FORMAT_VERSION, Lsn, Operation, Row, Source};

use crate::pgoutput::{Datum, Message, Relation, Tuple};
use tidemark_postgres::RowError;
use tidemark_postgres::values::{Mapping, ValueError, to_json};

/// What we know of a captured table.
#[derive(Debug, Clone)]
pub struct TableInfo {
    pub source: Source,
    pub columns: Vec<ColumnInfo>,
    /// Indices into `columns` of the primary-key columns, in key order.
    pub key: Vec<usize>,
}

#[derive(Debug, Clone)]
pub struct ColumnInfo {
    pub name: String,
    pub mapping: Mapping,
}

/// A change that could not be turned into an event. Each names the table
/// (and column) so the record can be found; none carries row contents.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("change for relation oid {0} before its Relation message")]
    UnknownRelation(u32),
    #[error("row change outside a transaction (relation oid {0})")]
    NoTransaction(u32),
    #[error("{table}: row has {got} columns, relation announced {expected}")]
    ColumnCount {
        table: String,
        expected: usize,
        got: usize,
    },
    /// A value or key column that cannot be mapped (the same error a row
    /// read by SQL gives).
    #[error(transparent)]
    Row(#[from] RowError),
    #[error("{table}.{column}: binary values are not requested and cannot be mapped")]
    Binary { table: String, column: String },
    #[error("{table}: primary-key column {column} is not in the relation")]
    MissingKeyColumn { table: String, column: String },
}

#[derive(Debug, Clone)]
struct Txn {
    xid: u32,
    commit_lsn: Lsn,
    commit_time: String,
}

/// The stream's decoding state.
#[derive(Debug)]
pub struct Changes {
    database: String,
    /// The timeline the stream reads (part of every change's version).
    timeline: u32,
    tables: HashMap<u32, TableInfo>,
    txn: Option<Txn>,
}

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
pub const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// RFC 3339 in UTC with exactly six fractional digits, from PostgreSQL's
/// microseconds since 2000-01-01.
pub fn pg_time_to_rfc3339(pg_micros: i64) -> String {
    tidemark_schemas::commit_time::from_unix_micros(pg_micros.saturating_add(PG_EPOCH_UNIX_MICROS))
}

impl Changes {
    pub fn new(database: impl Into<String>, timeline: u32) -> Changes {
        Changes {
            database: database.into(),
            timeline,
            tables: HashMap::new(),
            txn: None,
        }
    }

    /// Records a relation's shape, with the mapping of each column's type
    /// and the names of its primary-key columns.
    pub fn register(
        &mut self,
        relation: &Relation,
        mappings: Vec<Mapping>,
        key_columns: &[String],
    ) -> Result<&TableInfo, ChangeError> {
        let table = format!("{}.{}", relation.namespace, relation.name);
        let columns: Vec<ColumnInfo> = relation
            .columns
            .iter()
            .zip(mappings)
            .map(|(c, mapping)| ColumnInfo {
                name: c.name.clone(),
                mapping,
            })
            .collect();
        let key = key_columns
            .iter()
            .map(|k| {
                columns.iter().position(|c| &c.name == k).ok_or_else(|| {
                    ChangeError::MissingKeyColumn {
                        table: table.clone(),
                        column: k.clone(),
                    }
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let info = TableInfo {
            source: Source {
                database: self.database.clone(),
                schema: relation.namespace.clone(),
                table: relation.name.clone(),
            },
            columns,
            key,
        };
        self.tables.insert(relation.oid, info);
        Ok(&self.tables[&relation.oid])
    }

    pub fn table(&self, oid: u32) -> Option<&TableInfo> {
        self.tables.get(&oid)
    }

    pub fn begin(&mut self, xid: u32, final_lsn: Lsn, commit_time_micros: i64) {
        self.txn = Some(Txn {
            xid,
            commit_lsn: final_lsn,
            commit_time: pg_time_to_rfc3339(commit_time_micros),
        });
    }

    pub fn commit(&mut self) {
        self.txn = None;
    }

    /// The events of one row-change message at WAL position `lsn`. Other
    /// messages give none.
    pub fn events(&self, message: &Message, lsn: Lsn) -> Result<Vec<ChangeEvent>, ChangeError> {
        let relation_of = |m: &Message| match m {
            Message::Insert { relation, .. }
            | Message::Update { relation, .. }
            | Message::Delete { relation, .. } => Some(*relation),
            Message::Truncate { relations, .. } => relations.first().copied(),
            _ => None,
        };
        let Some(first_relation) = relation_of(message) else {
            return Ok(Vec::new());
        };
        let txn = self
            .txn
            .as_ref()
            .ok_or(ChangeError::NoTransaction(first_relation))?;
        let table = |oid: u32| {
            self.tables
                .get(&oid)
                .ok_or(ChangeError::UnknownRelation(oid))
        };
        let event = |info: &TableInfo, op, key, before, after, unchanged_toast| ChangeEvent {
            format: FORMAT_VERSION,
            source: info.source.clone(),
            op,
            key,
            before,
            after,
            unchanged_toast,
            commit_lsn: txn.commit_lsn,
            timeline: self.timeline,
            lsn,
            xid: Some(txn.xid),
            commit_time: txn.commit_time.clone(),
        };
        Ok(match message {
            Message::Insert { relation, new } => {
                let info = table(*relation)?;
                let (after, _) = row(info, new, None)?;
                let key = key_of(info, &after)?;
                vec![event(
                    info,
                    Operation::Insert,
                    key,
                    None,
                    Some(after),
                    Vec::new(),
                )]
            }
            Message::Update { relation, old, new } => {
                let info = table(*relation)?;
                let before = old.as_ref().map(|o| old_row(info, o)).transpose()?;
                let (after, unchanged) = row(info, new, old.as_ref())?;
                let key = key_of(info, &after)?;
                let mut out = Vec::with_capacity(2);
                // A changed primary key: the old key's document must go.
                if let Some(before) = &before
                    && let Ok(old_key) = key_of(info, before)
                    && old_key != key
                {
                    out.push(event(
                        info,
                        Operation::Delete,
                        old_key,
                        Some(before.clone()),
                        None,
                        Vec::new(),
                    ));
                }
                out.push(event(
                    info,
                    Operation::Update,
                    key,
                    before,
                    Some(after),
                    unchanged,
                ));
                out
            }
            Message::Delete { relation, old } => {
                let info = table(*relation)?;
                let before = old_row(info, old)?;
                let key = key_of(info, &before)?;
                vec![event(
                    info,
                    Operation::Delete,
                    key,
                    Some(before),
                    None,
                    Vec::new(),
                )]
            }
            Message::Truncate { relations, .. } => relations
                .iter()
                .map(|oid| {
                    Ok(event(
                        table(*oid)?,
                        Operation::Truncate,
                        Row::new(),
                        None,
                        None,
                        Vec::new(),
                    ))
                })
                .collect::<Result<_, ChangeError>>()?,
            _ => Vec::new(),
        })
    }
}

/// Maps a new-row tuple. Unchanged TOAST values come from `old` when it
/// carries them (REPLICA IDENTITY FULL); otherwise they are left out and
/// named in the second result.
fn row(
    info: &TableInfo,
    tuple: &Tuple,
    old: Option<&Tuple>,
) -> Result<(Row, Vec<String>), ChangeError> {
    check_width(info, tuple)?;
    let mut out = Row::new();
    let mut unchanged = Vec::new();
    for (i, (column, datum)) in info.columns.iter().zip(tuple).enumerate() {
        let datum = match (datum, old.and_then(|o| o.get(i))) {
            (Datum::UnchangedToast, Some(old @ Datum::Text(_))) => old,
            (datum, _) => datum,
        };
        match datum {
            Datum::UnchangedToast => unchanged.push(column.name.clone()),
            datum => {
                out.insert(column.name.clone(), value(info, column, datum)?);
            }
        }
    }
    Ok((out, unchanged))
}

/// Maps an old-row tuple: every sent column of an `O` (FULL) tuple, or the
/// key columns of a `K` tuple (PostgreSQL sends the rest as nulls).
fn old_row(info: &TableInfo, tuple: &Tuple) -> Result<Row, ChangeError> {
    check_width(info, tuple)?;
    let key_only = info
        .columns
        .iter()
        .zip(tuple)
        .enumerate()
        .any(|(i, (_, d))| !info.key.contains(&i) && matches!(d, Datum::Null))
        && info.key.iter().all(|&k| matches!(tuple[k], Datum::Text(_)));
    let mut out = Row::new();
    for (i, (column, datum)) in info.columns.iter().zip(tuple).enumerate() {
        if matches!(datum, Datum::UnchangedToast) || (key_only && !info.key.contains(&i)) {
            continue;
        }
        out.insert(column.name.clone(), value(info, column, datum)?);
    }
    Ok(out)
}

fn check_width(info: &TableInfo, tuple: &Tuple) -> Result<(), ChangeError> {
    if tuple.len() != info.columns.len() {
        return Err(ChangeError::ColumnCount {
            table: info.source.qualified(),
            expected: info.columns.len(),
            got: tuple.len(),
        });
    }
    Ok(())
}

fn value(info: &TableInfo, column: &ColumnInfo, datum: &Datum) -> Result<Value, ChangeError> {
    match datum {
        Datum::Null | Datum::UnchangedToast => Ok(Value::Null),
        Datum::Text(bytes) => {
            let text = std::str::from_utf8(bytes).map_err(|e| RowError::Value {
                table: info.source.qualified(),
                column: column.name.clone(),
                source: ValueError {
                    mapping: column.mapping.clone(),
                    detail: format!("not UTF-8: {e}"),
                },
            })?;
            to_json(&column.mapping, text).map_err(|source| {
                ChangeError::Row(RowError::Value {
                    table: info.source.qualified(),
                    column: column.name.clone(),
                    source,
                })
            })
        }
        Datum::Binary(_) => Err(ChangeError::Binary {
            table: info.source.qualified(),
            column: column.name.clone(),
        }),
    }
}

fn key_of(info: &TableInfo, row: &Row) -> Result<Row, ChangeError> {
    let mut key = Row::new();
    for &i in &info.key {
        let name = &info.columns[i].name;
        let bad = |what| {
            ChangeError::Row(RowError::BadKey {
                table: info.source.qualified(),
                column: name.clone(),
                what,
            })
        };
        match row.get(name) {
            None => return Err(bad("missing")),
            Some(Value::Null) => return Err(bad("null")),
            Some(v) => key.insert(name.clone(), v.clone()),
        };
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use serde_json::json;

    use super::*;
    use crate::pgoutput::Column;

    fn relation(columns: &[(&str, u32)]) -> Relation {
        Relation {
            oid: 1,
            namespace: "public".into(),
            name: "articles".into(),
            replica_identity: b'd',
            columns: columns
                .iter()
                .map(|(name, oid)| Column {
                    key: false,
                    name: (*name).into(),
                    type_oid: *oid,
                    type_modifier: -1,
                })
                .collect(),
        }
    }

    fn t(s: &str) -> Datum {
        Datum::Text(Bytes::from(s.to_owned()))
    }

    fn setup() -> Changes {
        let mut changes = Changes::new("shop", 1);
        let rel = relation(&[("id", 23), ("title", 25), ("body", 25)]);
        let mappings = rel
            .columns
            .iter()
            .map(|c| Mapping::builtin(c.type_oid).expect("builtin"))
            .collect();
        changes
            .register(&rel, mappings, &["id".into()])
            .expect("register");
        // 2026-11-22T00:00:00Z in PostgreSQL microseconds.
        changes.begin(700, Lsn(0x500), 848_620_800_000_000);
        changes
    }

    #[test]
    fn insert_event() {
        let changes = setup();
        let events = changes
            .events(
                &Message::Insert {
                    relation: 1,
                    new: vec![t("7"), t("hi"), Datum::Null],
                },
                Lsn(0x400),
            )
            .expect("events");
        assert_eq!(events.len(), 1);
        let e = &events[0];
        assert_eq!(e.op, Operation::Insert);
        assert_eq!(e.key, *json!({"id": 7}).as_object().expect("object"));
        assert_eq!(
            e.after.as_ref().map(|a| json!(a)),
            Some(json!({"id": 7, "title": "hi", "body": null}))
        );
        assert_eq!(
            (e.commit_lsn, e.lsn, e.xid),
            (Lsn(0x500), Lsn(0x400), Some(700))
        );
        assert_eq!(e.commit_time, "2026-11-22T00:00:00.000000Z");
    }

    #[test]
    fn unchanged_toast_is_named_not_nulled() {
        let changes = setup();
        let update = Message::Update {
            relation: 1,
            old: None,
            new: vec![t("7"), t("new"), Datum::UnchangedToast],
        };
        let e = &changes.events(&update, Lsn(0x400)).expect("events")[0];
        assert_eq!(e.unchanged_toast, ["body"]);
        assert!(!e.after.as_ref().expect("after").contains_key("body"));
    }

    #[test]
    fn unchanged_toast_comes_from_the_full_old_row() {
        let changes = setup();
        let update = Message::Update {
            relation: 1,
            old: Some(vec![t("7"), t("old"), t("big body")]),
            new: vec![t("7"), t("new"), Datum::UnchangedToast],
        };
        let e = &changes.events(&update, Lsn(0x400)).expect("events")[0];
        assert!(e.unchanged_toast.is_empty());
        assert_eq!(e.after.as_ref().expect("after")["body"], json!("big body"));
        assert_eq!(e.before.as_ref().expect("before")["title"], json!("old"));
    }

    #[test]
    fn primary_key_change_deletes_the_old_key() {
        let changes = setup();
        let update = Message::Update {
            relation: 1,
            old: Some(vec![t("7"), Datum::Null, Datum::Null]),
            new: vec![t("8"), t("x"), t("y")],
        };
        let events = changes.events(&update, Lsn(0x400)).expect("events");
        let ops: Vec<_> = events.iter().map(|e| (e.op, e.key["id"].clone())).collect();
        assert_eq!(
            ops,
            [(Operation::Delete, json!(7)), (Operation::Update, json!(8))]
        );
        assert_eq!(
            events[0].before.as_ref().map(|b| json!(b)),
            Some(json!({"id": 7})),
            "K tuple: key only"
        );
    }

    #[test]
    fn errors_name_table_and_column() {
        let changes = setup();
        let bad = Message::Insert {
            relation: 1,
            new: vec![t("seven"), t("x"), t("y")],
        };
        let err = changes.events(&bad, Lsn(1)).expect_err("bad int");
        assert!(
            err.to_string()
                .starts_with("public.articles.id: cannot map Integer value"),
            "{err}"
        );
        let short = Message::Insert {
            relation: 1,
            new: vec![t("7")],
        };
        assert!(
            changes
                .events(&short, Lsn(1))
                .expect_err("width")
                .to_string()
                .contains("1 columns")
        );
        let unknown = Message::Insert {
            relation: 9,
            new: vec![],
        };
        assert!(matches!(
            changes.events(&unknown, Lsn(1)),
            Err(ChangeError::UnknownRelation(9))
        ));
    }

    #[test]
    fn truncate_gives_one_event_per_table() {
        let changes = setup();
        let events = changes
            .events(
                &Message::Truncate {
                    relations: vec![1],
                    cascade: false,
                    restart_identity: false,
                },
                Lsn(2),
            )
            .expect("events");
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].op, Operation::Truncate);
        assert!(events[0].key.is_empty());
    }

    #[test]
    fn commit_times_are_rfc3339_with_micros() {
        assert_eq!(pg_time_to_rfc3339(0), "2000-01-01T00:00:00.000000Z");
        assert_eq!(pg_time_to_rfc3339(-1), "1999-12-31T23:59:59.999999Z");
        assert_eq!(
            pg_time_to_rfc3339(848_620_800_123_456),
            "2026-11-22T00:00:00.123456Z"
        );
    }
}
