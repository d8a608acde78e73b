//! Row keys on the command line, turned into the key object the producer
//! puts in events (and so into the exact Kafka record key).
//!
//! Accepted forms: a JSON object (`{"id": 42}`), `column=value` pairs
//! (`tenant=7,id=1`), or a bare value for a one-column primary key (`42`).
//! The last two need the key's columns and types, read from the
//! PostgreSQL catalog by the producer's key rule; integer and boolean columns become JSON numbers and
//! booleans (as the producer maps them), everything else a string.

use crate::error::{Cause, ReplayError, Result};
use serde_json::{Map, Value};
use tidemark_schemas::Row;
use tokio_postgres::Client;

/// A primary-key column and its type name (`int4`, `text`, ...).
pub type KeyColumn = (String, String);

/// The key columns of `schema.table`, in key order, by the one key rule
/// the producer keys events by (`tidemark_postgres::catalog`).
pub async fn primary_key(client: &Client, schema: &str, table: &str) -> Result<Vec<KeyColumn>> {
    use tidemark_postgres::SourceError;
    match tidemark_postgres::table_key(client, schema, table).await {
        Ok(key) => Ok(key),
        Err(SourceError::NoSuchTable(_) | SourceError::NoKey(_)) => {
            Err(ReplayError::Refused(format!(
                "table {schema}.{table} has no primary key (or does not exist); pass --key as JSON, e.g. '{{\"id\": 42}}'"
            )))
        }
        Err(e) => Err(e.within(format!(
            "table {schema}.{table}: cannot read its primary key"
        ))),
    }
}

/// Whether a key text needs the catalog (is not a JSON object).
pub fn needs_catalog(text: &str) -> bool {
    !text.trim_start().starts_with('{')
}

/// Parses a key text; `columns` is the primary key (needed unless the text
/// is a JSON object). Errors name the table and column.
pub fn parse_key(text: &str, table: &str, columns: &[KeyColumn]) -> Result<Row, String> {
    let trimmed = text.trim();
    if trimmed.starts_with('{') {
        return match serde_json::from_str::<Value>(trimmed) {
            Ok(Value::Object(map)) if !map.is_empty() => Ok(map),
            _ => Err(format!(
                "--key {text:?}: not a JSON object with the key columns"
            )),
        };
    }
    let mut key = Map::new();
    if trimmed.contains('=') {
        for pair in trimmed.split(',') {
            let (column, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("--key {text:?}: {pair:?} is not column=value"))?;
            let column = column.trim();
            let Some((_, kind)) = columns.iter().find(|(c, _)| c == column) else {
                return Err(format!(
                    "--key: table {table} has no key column {column:?}; its key is ({})",
                    names(columns)
                ));
            };
            key.insert(column.to_owned(), typed(value.trim(), column, kind, table)?);
        }
        if let Some((missing, _)) = columns.iter().find(|(c, _)| !key.contains_key(c)) {
            return Err(format!(
                "--key: key column {missing:?} of table {table} is missing; its key is ({})",
                names(columns)
            ));
        }
        return Ok(key);
    }
    match columns {
        [(column, kind)] => {
            key.insert(column.clone(), typed(trimmed, column, kind, table)?);
            Ok(key)
        }
        _ => Err(format!(
            "--key {text:?}: table {table} has a composite key ({}); pass column=value pairs, e.g. {}",
            names(columns),
            columns
                .iter()
                .map(|(c, _)| format!("{c}=..."))
                .collect::<Vec<_>>()
                .join(",")
        )),
    }
}

fn names(columns: &[KeyColumn]) -> String {
    columns
        .iter()
        .map(|(c, _)| c.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn typed(value: &str, column: &str, kind: &str, table: &str) -> Result<Value, String> {
    match kind {
        "int2" | "int4" | "int8" | "oid" => value.parse::<i64>().map(Value::from).map_err(|_| {
            format!(
                "--key: column {column} of table {table} is {kind}; {value:?} is not an integer"
            )
        }),
        "bool" => match value {
            "true" | "t" => Ok(Value::Bool(true)),
            "false" | "f" => Ok(Value::Bool(false)),
            _ => Err(format!(
                "--key: column {column} of table {table} is bool; {value:?} is not true or false"
            )),
        },
        _ => Ok(Value::String(value.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cols(list: &[(&str, &str)]) -> Vec<KeyColumn> {
        list.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn every_form_gives_the_producers_key() {
        let single = cols(&[("id", "int8")]);
        assert_eq!(
            Value::Object(parse_key("42", "t", &single).expect("bare")),
            json!({"id": 42})
        );
        assert_eq!(
            Value::Object(parse_key("id=42", "t", &single).expect("pair")),
            json!({"id": 42})
        );
        assert_eq!(
            Value::Object(parse_key(r#"{"id": "x"}"#, "t", &[]).expect("json")),
            json!({"id": "x"})
        );
        let composite = cols(&[("tenant", "int4"), ("slug", "text")]);
        assert_eq!(
            Value::Object(parse_key("slug=a-b, tenant=7", "t", &composite).expect("pairs")),
            json!({"tenant": 7, "slug": "a-b"})
        );
    }

    #[test]
    fn mistakes_name_table_and_column() {
        let composite = cols(&[("tenant", "int4"), ("slug", "text")]);
        let err = parse_key("7", "public.t", &composite).expect_err("composite");
        assert!(err.contains("composite key (tenant, slug)"), "{err}");
        let err = parse_key("tenant=x,slug=a", "public.t", &composite).expect_err("type");
        assert!(
            err.contains("column tenant of table public.t is int4"),
            "{err}"
        );
        let err = parse_key("tenant=1", "public.t", &composite).expect_err("missing");
        assert!(err.contains("key column \"slug\""), "{err}");
        let err = parse_key("nope=1", "public.t", &composite).expect_err("unknown");
        assert!(err.contains("no key column \"nope\""), "{err}");
    }
}
