//! The source side of an audit: a table described once, its rows read by
//! key chunks or in key order through a cursor, and the keys that have no
//! row, all mapped exactly as the producer maps them.

use crate::error::{Context, ReplayError, Result};
use std::collections::HashMap;
use std::time::Instant;

use serde_json::Value;
use tidemark_index::mapping::{TableMapping, content_digest};
use tidemark_postgres::values::Mapping;
use tidemark_postgres::{CatalogTable, TypeResolver, describe_table, quote_ident, row_values};
use tidemark_schemas::Row;
use tokio_postgres::{Client, GenericClient, SimpleQueryMessage};
use tracing::info;

use super::{CHUNK, PROGRESS_EVERY};
use crate::merge::{Entry, Sorter};
use crate::progress::Progress;

/// The table as the catalog describes it, with type mappings and key types.
pub(crate) struct Described {
    pub(crate) table: CatalogTable,
    pub(crate) mappings: Vec<Mapping>,
    pub(crate) key_index: Vec<usize>,
    /// `regtype` text of each key column, for typed literals.
    pub(crate) key_types: Vec<String>,
    pub(crate) select: String,
}

pub(crate) async fn describe(client: &Client, schema: &str, name: &str) -> Result<Described> {
    let table = describe_table(client, schema, name)
        .await
        .with_context(|| format!("table {schema}.{name}"))?;
    let mut types = TypeResolver::default();
    let mut mappings = Vec::new();
    for (_, oid) in &table.columns {
        mappings.push(types.mapping(client, *oid).await?);
    }
    let key_index: Vec<usize> = table
        .key
        .iter()
        .filter_map(|k| table.columns.iter().position(|(c, _)| c == k))
        .collect();
    let mut key_types = Vec::new();
    for &i in &key_index {
        let row = client
            .query_one("SELECT $1::oid::regtype::text", &[&table.columns[i].1])
            .await
            .with_context(|| format!("table {schema}.{name}: reading its column types"))?;
        key_types.push(row.get(0));
    }
    let select = format!(
        "SELECT {} FROM {}.{}",
        table
            .columns
            .iter()
            .map(|(c, _)| quote_ident(c))
            .collect::<Vec<_>>()
            .join(", "),
        quote_ident(&table.schema),
        quote_ident(&table.name)
    );
    Ok(Described {
        table,
        mappings,
        key_index,
        key_types,
        select,
    })
}

/// PostgreSQL's estimate of the table's row count (`None` before its
/// first ANALYZE), for progress.
pub(crate) async fn estimated_rows(client: &Client, d: &Described) -> Option<u64> {
    let table = format!(
        "{}.{}",
        quote_ident(&d.table.schema),
        quote_ident(&d.table.name)
    );
    let row = client
        .query_one(
            "SELECT reltuples::bigint FROM pg_class WHERE oid = $1::text::regclass",
            &[&table],
        )
        .await
        .ok()?;
    u64::try_from(row.get::<_, i64>(0)).ok()
}

/// The average size, in bytes of text, of a row as `rows_by_keys` reads
/// it, from up to 100 rows of the table (0 for an empty table): how many
/// rows a chunk may hold.
pub(crate) async fn sample_row_bytes(client: &Client, d: &Described) -> Result<usize> {
    let row = client
        .query_one(
            &format!(
                "SELECT coalesce(avg(octet_length(s::text)), 0)::bigint FROM ({} LIMIT 100) s",
                d.select
            ),
            &[],
        )
        .await
        .with_context(|| format!("table {}: sampling row sizes", d.table.qualified()))?;
    Ok(row.get::<_, i64>(0).max(0) as usize)
}

/// Keys as one typed array per key column, each a single SQL literal
/// (`'{"1","2"}'::text[]::integer[]`): PostgreSQL reads one array per
/// column instead of parsing a typed literal per key (10,000 integer keys:
/// 12 ms against 27 ms for an IN list).
pub(crate) struct KeyArrays {
    /// One typed array expression per key column, in key order.
    columns: Vec<String>,
    /// Positions (into the keys given) of the keys in the arrays, in order.
    included: Vec<usize>,
    /// Positions of keys lacking a key column: they match no row.
    incomplete: Vec<usize>,
}

impl KeyArrays {
    pub(crate) fn new(d: &Described, keys: &[&Row]) -> KeyArrays {
        let key_columns: Vec<&str> = d
            .key_index
            .iter()
            .map(|&i| d.table.columns[i].0.as_str())
            .collect();
        let mut elements: Vec<Vec<String>> =
            vec![Vec::with_capacity(keys.len()); key_columns.len()];
        let mut included = Vec::with_capacity(keys.len());
        let mut incomplete = Vec::new();
        for (n, key) in keys.iter().enumerate() {
            let values: Option<Vec<&Value>> = key_columns.iter().map(|c| key.get(*c)).collect();
            match values {
                Some(values) => {
                    for (column, value) in elements.iter_mut().zip(values) {
                        column.push(array_element(value));
                    }
                    included.push(n);
                }
                None => incomplete.push(n),
            }
        }
        let columns = elements
            .iter()
            .zip(&d.key_types)
            .map(|(items, sql_type)| {
                let text = format!("{{{}}}", items.join(","));
                format!("'{}'::text[]::{sql_type}[]", text.replace('\'', "''"))
            })
            .collect();
        KeyArrays {
            columns,
            included,
            incomplete,
        }
    }
}

/// A key value as a double-quoted array element: the text PostgreSQL's
/// input function for the column type reads (a string as itself, anything
/// else as its JSON text), with `\` and `"` escaped.
pub(crate) fn array_element(value: &Value) -> String {
    let text = match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The current rows (mapped) of the given keys, by document id.
pub(crate) async fn rows_by_keys(
    client: &impl GenericClient,
    d: &Described,
    mapping: &TableMapping,
    keys: &[&Row],
) -> Result<HashMap<String, Row>> {
    let arrays = KeyArrays::new(d, keys);
    if arrays.included.is_empty() {
        return Ok(HashMap::new());
    }
    let key_columns: Vec<String> = d
        .key_index
        .iter()
        .map(|&i| quote_ident(&d.table.columns[i].0))
        .collect();
    let sql = match (key_columns.as_slice(), arrays.columns.as_slice()) {
        ([column], [array]) => format!("{} WHERE {column} = ANY({array})", d.select),
        _ => format!(
            "{} WHERE ({}) IN (SELECT * FROM unnest({}))",
            d.select,
            key_columns.join(", "),
            arrays.columns.join(", ")
        ),
    };
    let mut out = HashMap::new();
    for message in client
        .simple_query(&sql)
        .await
        .with_context(|| format!("table {}: looking up keys", d.table.qualified()))?
    {
        if let SimpleQueryMessage::Row(row) = message {
            let (key, after) = row_values(&d.table, &d.mappings, &d.key_index, &row)?;
            out.insert(mapping.doc_id(&key)?, after);
        }
    }
    Ok(out)
}

/// Which of `keys` have no row (positions into `keys`): an anti-join of
/// the keys, one typed array per key column, against the table. Only the
/// vanished keys come back, so nothing is mapped or hashed.
pub(crate) async fn keys_without_rows(
    client: &impl GenericClient,
    d: &Described,
    keys: &[&Row],
) -> Result<Vec<usize>> {
    let arrays = KeyArrays::new(d, keys);
    let mut vanished = arrays.incomplete.clone();
    if arrays.included.is_empty() {
        return Ok(vanished);
    }
    let names: Vec<String> = (0..arrays.columns.len()).map(|i| format!("k{i}")).collect();
    let matches: Vec<String> = d
        .key_index
        .iter()
        .zip(&names)
        .map(|(&i, k)| format!("t.{} = v.{k}", quote_ident(&d.table.columns[i].0)))
        .collect();
    let sql = format!(
        "SELECT v.n FROM unnest({}) WITH ORDINALITY AS v({}, n) WHERE NOT EXISTS (SELECT 1 FROM {}.{} t WHERE {})",
        arrays.columns.join(", "),
        names.join(", "),
        quote_ident(&d.table.schema),
        quote_ident(&d.table.name),
        matches.join(" AND ")
    );
    for message in client
        .simple_query(&sql)
        .await
        .with_context(|| format!("table {}: checking keys", d.table.qualified()))?
    {
        // Ordinality counts from 1 over the included keys.
        if let SimpleQueryMessage::Row(row) = message
            && let Some(n) = row.get(0).and_then(|n| n.parse::<usize>().ok())
            && let Some(&position) = n.checked_sub(1).and_then(|i| arrays.included.get(i))
        {
            vanished.push(position);
        }
    }
    vanished.sort_unstable();
    Ok(vanished)
}

/// Every row of `query`, mapped as the consumer maps it and reduced to
/// (document id, content hash, key), sorted by id.
pub(crate) async fn sorted_rows(
    client: &mut Client,
    d: &Described,
    mapping: &TableMapping,
    query: &str,
    progress: &Progress,
) -> Result<Sorter> {
    let name = mapping.qualified();
    let started = Instant::now();
    let tx = open_cursor(client, &name, query).await?;
    let fetch = format!("FETCH {CHUNK} FROM tidemark_audit");
    let mut sorter = Sorter::default();
    let mut chunk = tx
        .simple_query(&fetch)
        .await
        .with_context(|| format!("table {name}: reading rows"))?;
    let mut next_report = PROGRESS_EVERY;
    loop {
        let fetched = chunk
            .iter()
            .filter(|m| matches!(m, SimpleQueryMessage::Row(_)))
            .count();
        let last = fetched < CHUNK;
        // PostgreSQL reads the next chunk while this one is mapped.
        let (next, mapped) = tokio::join!(
            async {
                if last {
                    Ok(Vec::new())
                } else {
                    tx.simple_query(&fetch).await
                }
            },
            async {
                for message in &chunk {
                    if let SimpleQueryMessage::Row(row) = message {
                        let (key, after) = row_values(&d.table, &d.mappings, &d.key_index, row)?;
                        sorter
                            .push(Entry {
                                id: mapping.doc_id(&key)?,
                                hash: Some(content_digest(&mapping.fields(&after))),
                                key: Some(
                                    serde_json::to_string(&key)
                                        .context("encoding a key for the spill file")?,
                                ),
                            })
                            .context("spilling the table's rows to disk")?;
                    }
                }
                Ok::<_, ReplayError>(())
            }
        );
        mapped?;
        progress.inc(fetched as u64);
        if sorter.count() >= next_report {
            next_report += PROGRESS_EVERY;
            info!(table = %name, rows = sorter.count(), elapsed_s = started.elapsed().as_secs(), "audit: rows read");
        }
        if last {
            break;
        }
        chunk = next.with_context(|| format!("table {name}: reading rows"))?;
    }
    tx.batch_execute("CLOSE tidemark_audit")
        .await
        .with_context(|| format!("table {name}: closing the row cursor"))?;
    tx.commit()
        .await
        .with_context(|| format!("table {name}: ending the read's transaction"))?;
    Ok(sorter)
}

/// Opens the audit's cursor over `query` in a REPEATABLE READ, read-only
/// transaction: every row is read at one snapshot.
pub(crate) async fn open_cursor<'c>(
    client: &'c mut Client,
    name: &str,
    query: &str,
) -> Result<tokio_postgres::Transaction<'c>> {
    let tx = client
        .transaction()
        .await
        .with_context(|| format!("table {name}: cannot begin a transaction"))?;
    tx.batch_execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .await
        .with_context(|| format!("table {name}: cannot begin a repeatable read"))?;

    tx.batch_execute(&format!(
        "DECLARE tidemark_audit NO SCROLL CURSOR FOR {query}"
    ))
    .await
    .with_context(|| format!("table {name}: cannot read it"))?;
    Ok(tx)
}

/// Key column -> its `regtype` text, to decode ids back into keys.
pub(crate) fn key_types(d: &Described) -> HashMap<String, String> {
    d.key_index
        .iter()
        .map(|&i| d.table.columns[i].0.clone())
        .zip(d.key_types.iter().cloned())
        .collect()
}
