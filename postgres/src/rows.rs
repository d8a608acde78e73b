//! Rows read with SQL (the snapshot's cursor, replay's reads by key), mapped
//! to JSON exactly as the stream maps them, so "what a row maps to" is the
//! same everywhere, and the point a read was consistent at.

use serde_json::Value;
use tidemark_schemas::{Lsn, Row};

use crate::catalog::CatalogTable;
use crate::values::{Mapping, ValueError, to_json};

/// Where a snapshot is consistent: the LSN, on the timeline it was taken
/// on (together they make its rows' version, `tidemark_schemas::Version`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Point {
    pub lsn: Lsn,
    pub timeline: u32,
}

/// Why a row could not be mapped; names the table, the column and the
/// type's problem, never the value.
#[derive(Debug, thiserror::Error)]
pub enum RowError {
    #[error("{table}.{column}: {source}")]
    Value {
        table: String,
        column: String,
        #[source]
        source: ValueError,
    },
    #[error("{table}: primary-key column {column} is {what}")]
    BadKey {
        table: String,
        column: String,
        what: &'static str,
    },
}

/// A row of only the key columns (a `SELECT` of `table.columns[i]` for
/// each `i` of `key_index`, in that order) mapped as [`row_values`] maps
/// them: the key, under the same one key rule (a null key column is an
/// error naming the table and the column).
pub fn key_values(
    table: &CatalogTable,
    mappings: &[Mapping],
    key_index: &[usize],
    row: &tokio_postgres::SimpleQueryRow,
) -> Result<Row, RowError> {
    let mut key = Row::new();
    for (position, &i) in key_index.iter().enumerate() {
        let column = &table.columns[i].0;
        let Some(text) = row.get(position) else {
            return Err(RowError::BadKey {
                table: table.qualified(),
                column: column.clone(),
                what: "null",
            });
        };
        let value = to_json(&mappings[i], text).map_err(|source| RowError::Value {
            table: table.qualified(),
            column: column.clone(),
            source,
        })?;
        key.insert(column.clone(), value);
    }
    Ok(key)
}

/// A row read as text (`SELECT` of `table.columns`, in order) mapped to
/// JSON exactly as the snapshot and the stream map it: the key and the
/// whole row. Replay and audit use it, so "what a row maps to" is the same
/// everywhere.
pub fn row_values(
    table: &CatalogTable,
    mappings: &[Mapping],
    key_index: &[usize],
    row: &tokio_postgres::SimpleQueryRow,
) -> Result<(Row, Row), RowError> {
    let mut after = Row::new();
    for (i, ((column, _), mapping)) in table.columns.iter().zip(mappings).enumerate() {
        let value = match row.get(i) {
            None => Value::Null,
            Some(text) => to_json(mapping, text).map_err(|source| RowError::Value {
                table: table.qualified(),
                column: column.clone(),
                source,
            })?,
        };
        after.insert(column.clone(), value);
    }
    let mut key = Row::new();
    for &i in key_index {
        let name = &table.columns[i].0;
        match after.get(name) {
            Some(Value::Null) | None => {
                return Err(RowError::BadKey {
                    table: table.qualified(),
                    column: name.clone(),
                    what: "null",
                });
            }
            Some(v) => {
                key.insert(name.clone(), v.clone());
            }
        }
    }
    Ok((key, after))
}
