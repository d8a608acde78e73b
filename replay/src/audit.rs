//! Audit: compare each configured table with its index and report what
//! drifted: **missing** (a row without a document), **extra** (a document
//! without a row), **stale** (a document whose content hash differs from
//! what the current row maps to, through the consumer's own mapping code).
//!
//! How, with memory bounded by the chunk size plus the drift found:
//! 1. Rows: one REPEATABLE READ transaction; a cursor over the table,
//!    fetched in chunks; each row mapped exactly as the producer and
//!    consumer map it; a realtime multi-get of the chunk's document ids
//!    fetching only `_tidemark.hash` and `_tidemark.commit_time`.
//! 2. Documents: a scroll over the index fetching only `_tidemark.key`;
//!    each chunk's keys looked up in the same PostgreSQL snapshot.
//! 3. Re-check: rows keep changing while an audit runs and the consumer
//!    lags a little, so every candidate is looked at again after
//!    `recheck_after` (fresh snapshot, fresh multi-get); only drift that is
//!    still there is reported.
//!
//! When drift began: each drifted row is dated by the table's
//! `updated_at`-style column when the config names one (`audit_time_column`),
//! else by the document's last applied commit time, and counted per hour.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::Context;
use opensearch::OpenSearch;
use opensearch::{ClearScrollParts, ScrollParts, SearchParts};
use serde::Deserialize;
use serde::Serialize;
use serde_json::{Value, json};
use tidemark_index::mapping::{TableMapping, content_digest, content_hash};
use tidemark_index::search::Search;
use tidemark_postgres::values::Mapping;
use tidemark_postgres::{CatalogTable, TypeResolver, describe_table, quote_ident, row_values};
use tidemark_schemas::Row;
use tokio_postgres::{Client, GenericClient, SimpleQueryMessage};
use tracing::{info, warn};

use crate::merge::{Entry, Mismatch, Sorter};

/// Rows per cursor fetch and ids per lookup: large enough that round trips
/// do not dominate, small enough that a chunk of wide rows stays a few MB.
const CHUNK: usize = 2_000;
/// Documents per scroll page (ids and a hash each, ~100 bytes in JSON).
const SCROLL_PAGE: usize = 10_000;
/// A progress line every this many rows or documents.
const PROGRESS_EVERY: u64 = 100_000;
/// Keys shown per kind of drift in a report.
const EXAMPLES: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Missing,
    Extra,
    Stale,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Missing => "missing",
            Kind::Extra => "extra",
            Kind::Stale => "stale",
        }
    }
}

/// One drifted document.
#[derive(Debug, Clone, Serialize)]
pub struct Drift {
    pub kind: Kind,
    pub id: String,
    pub key: Row,
    /// When the row last changed (time column) or, without one, when the
    /// document was last applied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct Counts {
    pub missing: u64,
    pub extra: u64,
    pub stale: u64,
}

#[derive(Debug, Serialize)]
pub struct TableReport {
    pub table: String,
    pub index: String,
    pub rows: u64,
    pub documents: u64,
    pub counts: Counts,
    /// Drift per hour (`2026-11-22T10`), by kind.
    pub timeline: BTreeMap<String, BTreeMap<Kind, u64>>,
    /// Up to 20 examples per kind.
    pub examples: Vec<Drift>,
    /// Candidates that were consistent on re-check (changing while audited).
    pub settled_on_recheck: u64,
    /// The fraction checked, when sampled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample: Option<f64>,
    /// Only rows changed since then were checked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// Every drifted document (id, key), for `--repair`.
    #[serde(skip)]
    pub drifted_keys: Vec<(String, Row)>,
}

impl TableReport {
    pub fn drifted(&self) -> u64 {
        self.counts.missing + self.counts.extra + self.counts.stale
    }
}

/// What an audit needs to know about one table.
#[derive(Debug)]
pub struct Target<'a> {
    pub mapping: &'a TableMapping,
    pub time_column: Option<&'a str>,
    /// Check only this fraction (0..1] of rows and of documents.
    pub sample: Option<f64>,
    /// Check only rows whose time column is at or after this, and documents
    /// applied at or after it.
    pub since: Option<jiff::Timestamp>,
}

/// The table as the catalog describes it, with type mappings and key types.
pub(crate) struct Described {
    table: CatalogTable,
    mappings: Vec<Mapping>,
    key_index: Vec<usize>,
    /// `regtype` text of each key column, for typed literals.
    key_types: Vec<String>,
    select: String,
}

pub(crate) async fn describe(
    client: &Client,
    schema: &str,
    name: &str,
) -> anyhow::Result<Described> {
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
            .await?;
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

/// The average size, in bytes of text, of a row as `rows_by_keys` reads
/// it, from up to 100 rows of the table (0 for an empty table): how many
/// rows a chunk may hold.
pub(crate) async fn sample_row_bytes(client: &Client, d: &Described) -> anyhow::Result<usize> {
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
struct KeyArrays {
    /// One typed array expression per key column, in key order.
    columns: Vec<String>,
    /// Positions (into the keys given) of the keys in the arrays, in order.
    included: Vec<usize>,
    /// Positions of keys lacking a key column: they match no row.
    incomplete: Vec<usize>,
}

impl KeyArrays {
    fn new(d: &Described, keys: &[&Row]) -> KeyArrays {
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
fn array_element(value: &Value) -> String {
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
) -> anyhow::Result<HashMap<String, Row>> {
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
) -> anyhow::Result<Vec<usize>> {
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

/// `_tidemark` hash (and, with `commit_time`, commit time) of documents by
/// id, from doc values (columnar, no source parsing): several times faster
/// than a multi-get of the same documents (10,000 existing documents:
/// 0.11-0.19 s against 0.84-0.95 s). Sees what the last refresh made
/// visible; [`doc_meta`] reads realtime. At most 10,000 ids (the default
/// `index.max_result_window`). With `hashes`, only the documents whose
/// hash is one of them: cheaper when few are (nothing to fetch).
pub(crate) async fn doc_meta_searched(
    search: &Search,
    index: &str,
    ids: &[&str],
    commit_time: bool,
    hashes: Option<&[&str]>,
) -> anyhow::Result<HashMap<String, Value>> {
    let meta = |fields: HitFields| {
        json!({
            "hash": fields.hash.into_iter().next(),
            "commit_time": fields.commit_time.into_iter().next(),
        })
    };
    // Ids and hashes from doc values alone (`_tidemark.id`).
    let mut found = HashMap::with_capacity(ids.len());
    let mut without_id = 0usize;
    for hit in search_ids(search, index, ids, commit_time, hashes, false).await? {
        let mut fields = hit.fields;
        match fields.id.pop() {
            Some(id) => {
                found.insert(id, meta(fields));
            }
            None => without_id += 1,
        }
    }
    // Documents written before `_tidemark.id` existed: their ids come from
    // the stored `_id`, the slower way.
    if without_id > 0 {
        let rest: Vec<&str> = ids
            .iter()
            .copied()
            .filter(|id| !found.contains_key(*id))
            .collect();
        for hit in search_ids(search, index, &rest, commit_time, hashes, true).await? {
            if let Some(id) = hit.id {
                found.insert(id, meta(hit.fields));
            }
        }
    }
    Ok(found)
}

#[derive(Deserialize, Default)]
struct SearchAnswer {
    #[serde(default)]
    hits: SearchHits,
}

#[derive(Deserialize, Default)]
struct SearchHits {
    #[serde(default)]
    hits: Vec<SearchHit>,
}

#[derive(Deserialize)]
struct SearchHit {
    #[serde(rename = "_id")]
    id: Option<String>,
    #[serde(default)]
    fields: HitFields,
}

/// The documents of `ids` (at most 10,000), `_tidemark` fields from doc
/// values; with `hashes` only those whose hash is one of them; with
/// `stored_id` also each hit's stored `_id`.
async fn search_ids(
    search: &Search,
    index: &str,
    ids: &[&str],
    commit_time: bool,
    hashes: Option<&[&str]>,
    stored_id: bool,
) -> anyhow::Result<Vec<SearchHit>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut docvalues = vec![json!("_tidemark.id"), json!("_tidemark.hash")];
    if commit_time {
        docvalues.push(
            json!({"field": "_tidemark.commit_time", "format": "strict_date_optional_time_nanos"}),
        );
    }
    let mut body = json!({
        "size": ids.len(),
        "_source": false,
        "track_total_hits": false,
        "sort": ["_doc"],
        "query": {"ids": {"values": ids}},
        "docvalue_fields": docvalues,
    });
    if let Some(hashes) = hashes {
        body["query"] = json!({"bool": {"filter": [
            {"ids": {"values": ids}},
            {"terms": {"_tidemark.hash": hashes}},
        ]}});
    }
    if !stored_id {
        body["stored_fields"] = json!("_none_");
    }
    let response = search
        .client()
        .search(SearchParts::Index(&[index]))
        .filter_path(&["hits.hits._id", "hits.hits.fields"])
        .body(body)
        .send()
        .await
        .with_context(|| format!("index {index}: search by ids"))?;
    if !response.status_code().is_success() {
        let status = response.status_code();
        let text = response.text().await.unwrap_or_default();
        anyhow::bail!("index {index}: search by ids answered {status}: {text}");
    }
    let answer: SearchAnswer = response
        .json()
        .await
        .with_context(|| format!("index {index}: search by ids answer"))?;
    Ok(answer.hits.hits)
}

/// `_tidemark` of documents by id, realtime (not refresh-bound).
pub(crate) async fn doc_meta(
    search: &Search,
    index: &str,
    ids: &[&str],
) -> anyhow::Result<HashMap<String, Value>> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let (found, _) = search
        .current_fields(index, ids, &["_tidemark.hash", "_tidemark.commit_time"])
        .await
        .with_context(|| format!("index {index}: multi-get"))?;
    Ok(found
        .into_iter()
        .map(|(id, source)| (id, source.get("_tidemark").cloned().unwrap_or(Value::Null)))
        .collect())
}

/// The key a document id was made from, if it decodes into values the key
/// columns' types accept (so a hand-written id like `foreign-1` on an
/// integer key is simply a document without a row, not an SQL error).
fn key_from_id(
    mapping: &TableMapping,
    id_columns: &[String],
    types: &HashMap<String, String>,
    id: &str,
) -> Option<Row> {
    let parts = mapping.split_id(id, id_columns.len())?;
    let mut key = Row::new();
    for (column, text) in id_columns.iter().zip(parts) {
        let value = match types.get(column).map(String::as_str) {
            Some("smallint" | "integer" | "bigint") => Value::from(text.parse::<i64>().ok()?),
            Some("numeric") => {
                text.parse::<f64>().ok()?;
                Value::String(text)
            }
            Some("uuid") => {
                let hex = text.chars().filter(|c| *c != '-').count();
                if hex != 32 || !text.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
                    return None;
                }
                Value::String(text)
            }
            Some("boolean") => Value::Bool(match text.as_str() {
                "true" => true,
                "false" => false,
                _ => return None,
            }),
            _ => Value::String(text),
        };
        key.insert(column.clone(), value);
    }
    Some(key)
}

/// Whether a document id falls in the sample (a stable pseudo-random
/// choice by id hash).
fn sampled(id: &str, sample: Option<f64>) -> bool {
    match sample {
        None => true,
        Some(fraction) => {
            let h = xxhash_rust::xxh3::xxh3_64(id.as_bytes());
            (h as f64 / u64::MAX as f64) < fraction
        }
    }
}

/// Compares one row with its document: the drift kind, if any.
fn compare(mapping: &TableMapping, row: Option<&Row>, doc: Option<&Value>) -> Option<Kind> {
    match (row, doc) {
        (None, None) => None,
        (Some(_), None) => Some(Kind::Missing),
        (None, Some(_)) => Some(Kind::Extra),
        (Some(row), Some(meta)) => {
            let expected = content_hash(&mapping.fields(row));
            (meta["hash"].as_str() != Some(expected.as_str())).then_some(Kind::Stale)
        }
    }
}

/// Full audit: both sides streamed once, sorted by document id and merged
/// (see [`crate::merge`]). Rows are read in one REPEATABLE READ snapshot
/// while the index is scrolled at the same time (ids and `_tidemark.hash`
/// doc values only); what disagrees becomes a candidate for the re-check.
async fn merged_candidates(
    client: &mut Client,
    search: &Search,
    mapping: &TableMapping,
    d: &Described,
    query: &str,
    report: &mut TableReport,
) -> anyhow::Result<Vec<(String, Row)>> {
    let name = mapping.qualified();
    let started = Instant::now();
    // The index is read on its own task (its own thread under the
    // multi-threaded runtime) while this one maps rows; dropping the set
    // on an error stops it.
    let mut scroll = tokio::task::JoinSet::new();
    scroll.spawn(sorted_documents(
        search.client().clone(),
        mapping.index.clone(),
    ));
    let rows = sorted_rows(client, d, mapping, query).await?;
    report.rows = rows.count();
    info!(table = %name, rows = report.rows, elapsed_ms = started.elapsed().as_millis() as u64, "audit: rows read");
    let docs = scroll
        .join_next()
        .await
        .context("the index scroll task vanished")???;
    report.documents = docs.count();
    info!(table = %name, documents = report.documents, elapsed_ms = started.elapsed().as_millis() as u64, "audit: documents read");

    let id_columns = mapping.id_columns(&d.table.key);
    let key_types = key_types(d);
    let mut candidates = Vec::new();
    let mut bad_key = None;
    crate::merge::merge(
        rows.finish().context("audit: reading back sorted rows")?,
        docs.finish()
            .context("audit: reading back sorted documents")?,
        |mismatch| {
            let (id, key) = match mismatch {
                Mismatch::Missing(row) | Mismatch::Stale { row } => {
                    let key = row
                        .key
                        .as_deref()
                        .map(serde_json::from_str::<Row>)
                        .transpose();
                    match key {
                        Ok(key) => (row.id, key.unwrap_or_default()),
                        Err(e) => {
                            bad_key.get_or_insert(format!("document {}: {e}", row.id));
                            return;
                        }
                    }
                }
                // An id that does not decode has no row: it stays with an
                // empty key and is reported extra.
                Mismatch::Extra(doc) => {
                    let key =
                        key_from_id(mapping, &id_columns, &key_types, &doc.id).unwrap_or_default();
                    (doc.id, key)
                }
            };
            candidates.push((id, key));
        },
    )
    .context("audit: merging rows and documents")?;
    if let Some(e) = bad_key {
        anyhow::bail!("table {name}: a spilled key did not read back: {e}");
    }
    info!(table = %name, candidates = candidates.len(), elapsed_ms = started.elapsed().as_millis() as u64, "audit: merged");
    Ok(candidates)
}

/// Every row of `query`, mapped as the consumer maps it and reduced to
/// (document id, content hash, key), sorted by id.
async fn sorted_rows(
    client: &mut Client,
    d: &Described,
    mapping: &TableMapping,
    query: &str,
) -> anyhow::Result<Sorter> {
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
                        sorter.push(Entry {
                            id: mapping.doc_id(&key)?,
                            hash: Some(content_digest(&mapping.fields(&after))),
                            key: Some(serde_json::to_string(&key)?),
                        })?;
                    }
                }
                anyhow::Ok(())
            }
        );
        mapped?;
        if sorter.count() >= next_report {
            next_report += PROGRESS_EVERY;
            info!(table = %name, rows = sorter.count(), elapsed_s = started.elapsed().as_secs(), "audit: rows read");
        }
        if last {
            break;
        }
        chunk = next.with_context(|| format!("table {name}: reading rows"))?;
    }
    tx.batch_execute("CLOSE tidemark_audit").await?;
    tx.commit().await?;
    Ok(sorter)
}

/// One page of an id scroll, as `filter_path` trims it.
#[derive(Debug, Deserialize)]
struct ScrollPage {
    #[serde(rename = "_scroll_id")]
    scroll_id: Option<String>,
    #[serde(default)]
    hits: Option<ScrollHits>,
}

#[derive(Debug, Deserialize)]
struct ScrollHits {
    #[serde(default)]
    hits: Vec<ScrollHit>,
}

#[derive(Debug, Deserialize)]
struct ScrollHit {
    #[serde(rename = "_id")]
    id: String,
    #[serde(default)]
    fields: Option<HitFields>,
}

/// `_tidemark` doc values of a hit (those asked for).
#[derive(Debug, Deserialize, Default)]
struct HitFields {
    #[serde(rename = "_tidemark.id", default)]
    id: Vec<String>,
    #[serde(rename = "_tidemark.hash", default)]
    hash: Vec<String>,
    #[serde(rename = "_tidemark.commit_time", default)]
    commit_time: Vec<String>,
}

/// A scroll over an index in index order that returns document ids (and,
/// when asked, the `_tidemark.hash` doc values: no `_source` either way),
/// one page at a time, trimmed by `filter_path`. [`IdScroll::close`] frees
/// the search context early; OpenSearch drops it after 2 minutes otherwise.
struct IdScroll {
    client: OpenSearch,
    index: String,
    /// The first request's body; `None` once it was sent.
    first: Option<Value>,
    scroll_id: Option<String>,
}

impl IdScroll {
    fn new(client: OpenSearch, index: String, query: Value, with_hash: bool, page: usize) -> Self {
        let mut body = json!({"size": page, "sort": ["_doc"], "_source": false, "query": query});
        if with_hash {
            body["docvalue_fields"] = json!(["_tidemark.hash"]);
        }
        IdScroll {
            client,
            index,
            first: Some(body),
            scroll_id: None,
        }
    }

    /// The next page of hits; empty at the end.
    async fn next_page(&mut self) -> anyhow::Result<Vec<ScrollHit>> {
        const KEEP: &str = "_scroll_id,hits.hits._id,hits.hits.fields";
        let index = &self.index;
        let response = match (self.first.take(), &self.scroll_id) {
            (Some(body), _) => {
                self.client
                    .search(SearchParts::Index(&[index]))
                    .scroll("2m")
                    .filter_path(&[KEEP])
                    .body(body)
                    .send()
                    .await
            }
            (None, Some(id)) => {
                self.client
                    .scroll(ScrollParts::None)
                    .filter_path(&[KEEP])
                    .body(json!({"scroll": "2m", "scroll_id": id}))
                    .send()
                    .await
            }
            (None, None) => return Ok(Vec::new()),
        }
        .with_context(|| format!("index {index}: cannot scroll"))?;
        if !response.status_code().is_success() {
            let status = response.status_code();
            let text = response.text().await.unwrap_or_default();
            anyhow::bail!("index {index}: scroll answered {status}: {text}");
        }
        let page: ScrollPage = response
            .json()
            .await
            .with_context(|| format!("index {index}: scroll answer"))?;
        self.scroll_id = page.scroll_id;
        Ok(page.hits.map(|h| h.hits).unwrap_or_default())
    }

    async fn close(self) {
        if let Some(id) = self.scroll_id {
            let _ = self
                .client
                .clear_scroll(ClearScrollParts::None)
                .body(json!({"scroll_id": [id]}))
                .send()
                .await;
        }
    }
}

/// Every document of the index as (id, content hash), sorted by id.
async fn sorted_documents(client: OpenSearch, index: String) -> anyhow::Result<Sorter> {
    let started = Instant::now();
    let mut sorter = Sorter::default();
    let mut next_report = PROGRESS_EVERY;
    let mut scroll = IdScroll::new(
        client,
        index.clone(),
        json!({"match_all": {}}),
        true,
        SCROLL_PAGE,
    );
    let result = async {
        loop {
            let hits = scroll.next_page().await?;
            if hits.is_empty() {
                return Ok(());
            }
            for hit in hits {
                let hash = hit
                    .fields
                    .and_then(|f| f.hash.into_iter().next())
                    .and_then(|h| u128::from_str_radix(&h, 16).ok());
                sorter.push(Entry {
                    id: hit.id,
                    hash,
                    key: None,
                })?;
            }
            if sorter.count() >= next_report {
                next_report += PROGRESS_EVERY;
                info!(index = %index, documents = sorter.count(), elapsed_s = started.elapsed().as_secs(), "audit: documents read");
            }
        }
    }
    .await;
    scroll.close().await;
    result.map(|()| sorter)
}

/// Opens the audit's cursor over `query` in a REPEATABLE READ, read-only
/// transaction: every row is read at one snapshot.
async fn open_cursor<'c>(
    client: &'c mut Client,
    name: &str,
    query: &str,
) -> anyhow::Result<tokio_postgres::Transaction<'c>> {
    let tx = client.transaction().await?;
    tx.batch_execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .await?;
    tx.batch_execute(&format!(
        "DECLARE tidemark_audit NO SCROLL CURSOR FOR {query}"
    ))
    .await
    .with_context(|| format!("table {name}: cannot read it"))?;
    Ok(tx)
}

/// Key column -> its `regtype` text, to decode ids back into keys.
fn key_types(d: &Described) -> HashMap<String, String> {
    d.key_index
        .iter()
        .map(|&i| d.table.columns[i].0.clone())
        .zip(d.key_types.iter().cloned())
        .collect()
}

/// Subset audit (`--sample`, `--since`): each side's chosen rows or
/// documents are looked up on the other side by key, which costs a round
/// trip per chunk but reads only the subset. (A merge would need the same
/// subset on both sides, which neither a sample nor a time filter gives.)
async fn looked_up_candidates(
    client: &mut Client,
    search: &Search,
    target: &Target<'_>,
    d: &Described,
    query: &str,
    report: &mut TableReport,
) -> anyhow::Result<Vec<(String, Row)>> {
    let mapping = target.mapping;
    let name = mapping.qualified();
    let index = mapping.index.clone();
    let mut candidates: Vec<(String, Row)> = Vec::new();
    let started = Instant::now();

    // 1. Rows -> documents.
    let tx = open_cursor(client, &name, query).await?;
    let fetch = format!("FETCH {CHUNK} FROM tidemark_audit");
    // The next chunk is read and mapped while the current one's documents
    // are looked up: PostgreSQL and OpenSearch work at the same time.
    let read_chunk = || async {
        let mut chunk: Vec<(String, Row, Row)> = Vec::with_capacity(CHUNK);
        for message in tx.simple_query(&fetch).await? {
            if let SimpleQueryMessage::Row(row) = message {
                let (key, after) = row_values(&d.table, &d.mappings, &d.key_index, &row)?;
                chunk.push((mapping.doc_id(&key)?, key, after));
            }
        }
        anyhow::Ok(chunk)
    };
    let mut chunk = read_chunk().await?;
    loop {
        let fetched = chunk.len();
        report.rows += fetched as u64;
        let ids: Vec<&str> = chunk.iter().map(|(id, _, _)| id.as_str()).collect();
        let last = fetched < CHUNK;
        let (docs, next) =
            tokio::join!(doc_meta_searched(search, &index, &ids, true, None), async {
                if last {
                    Ok(Vec::new())
                } else {
                    read_chunk().await
                }
            });
        let docs = docs?;
        for (id, key, after) in &chunk {
            if compare(mapping, Some(after), docs.get(id)).is_some() {
                candidates.push((id.clone(), key.clone()));
            }
        }
        if last {
            break;
        }
        if report.rows % 100_000 < CHUNK as u64 {
            info!(table = %name, rows = report.rows, elapsed_s = started.elapsed().as_secs(), "audit: rows compared");
        }
        chunk = next?;
    }
    tx.batch_execute("CLOSE tidemark_audit").await?;
    info!(table = %name, rows = report.rows, elapsed_ms = started.elapsed().as_millis() as u64, "audit: rows pass done");

    // 2. Documents -> rows, in the same snapshot.
    let id_columns = mapping.id_columns(&d.table.key);
    let key_types = key_types(d);
    let doc_query = match target.since {
        Some(since) => json!({"range": {"_tidemark.commit_time": {"gte": since.to_string()}}}),
        None => json!({"match_all": {}}),
    };
    let mut scroll = IdScroll::new(
        search.client().clone(),
        index.clone(),
        doc_query,
        false,
        CHUNK,
    );
    let result = async {
        loop {
            let hits = scroll.next_page().await?;
            if hits.is_empty() {
                return anyhow::Ok(());
            }
            report.documents += hits.len() as u64;
            // Ids only (no source): the key comes back from the id, whose
            // encoding the mapping can reverse. An id that does not decode
            // has no row, so it stays with an empty key and is reported
            // extra.
            let docs: Vec<(String, Row)> = hits
                .into_iter()
                .map(|h| {
                    let key =
                        key_from_id(mapping, &id_columns, &key_types, &h.id).unwrap_or_default();
                    (h.id, key)
                })
                .collect();
            let keys: Vec<&Row> = docs.iter().map(|(_, k)| k).collect();
            let rows = rows_by_keys(&tx, d, mapping, &keys).await?;
            for (id, key) in docs {
                if !rows.contains_key(&id) && sampled(&id, target.sample) {
                    candidates.push((id, key));
                }
            }
        }
    }
    .await;
    scroll.close().await;
    result?;
    tx.commit().await?;
    info!(table = %name, documents = report.documents, elapsed_ms = started.elapsed().as_millis() as u64, "audit: documents pass done");
    Ok(candidates)
}

/// Makes everything written to `index` so far visible to search. A
/// failure (e.g. no permission to refresh) is only logged: a document
/// written since the index's last refresh is then not seen by a search,
/// and the callers read realtime where that matters (the audit re-checks
/// what looked wrong; window asks realtime before skipping a delete).
pub(crate) async fn refresh(search: &Search, index: &str) {
    let answer = search
        .client()
        .indices()
        .refresh(opensearch::indices::IndicesRefreshParts::Index(&[index]))
        .send()
        .await;
    match answer {
        Ok(response) if response.status_code().is_success() => {}
        Ok(response) => {
            warn!(index, status = %response.status_code(), "could not refresh the index; documents written since its last refresh are looked up realtime where it matters")
        }
        Err(e) => {
            warn!(index, error = %e, "could not refresh the index; documents written since its last refresh are looked up realtime where it matters")
        }
    }
}

/// Audits one table. `recheck_after` is how long to wait before looking at
/// candidates again (the consumer's lag plus a margin).
pub async fn audit_table(
    client: &mut Client,
    search: &Search,
    target: &Target<'_>,
    recheck_after: Duration,
) -> anyhow::Result<TableReport> {
    let mapping = target.mapping;
    let name = mapping.qualified();
    let index = mapping.index.clone();
    let d = describe(client, &mapping.schema, &mapping.table).await?;
    // Search sees documents only after a refresh; without one, documents
    // written in the last second (e.g. by a repair just before) would all
    // look missing and go through the re-check one lookup each.
    refresh(search, &index).await;
    let mut report = TableReport {
        table: name.clone(),
        index: index.clone(),
        rows: 0,
        documents: 0,
        counts: Counts::default(),
        timeline: BTreeMap::new(),
        examples: Vec::new(),
        settled_on_recheck: 0,
        sample: target.sample,
        since: target.since.map(|t| t.to_string()),
        drifted_keys: Vec::new(),
    };
    let mut query = d.select.clone();
    if let Some(fraction) = target.sample {
        query.push_str(&format!(" TABLESAMPLE BERNOULLI ({})", fraction * 100.0));
    }
    if let Some(since) = target.since {
        let Some(column) = target.time_column else {
            anyhow::bail!(
                "--since: table {name} has no audit_time_column in the config, so its rows cannot be chosen by time"
            );
        };
        query.push_str(&format!(
            " WHERE {} >= '{since}'::timestamptz",
            quote_ident(column)
        ));
    }
    // Candidates: document id -> (kind, key).
    let started = Instant::now();
    let mut candidates = if target.sample.is_none() && target.since.is_none() {
        merged_candidates(client, search, mapping, &d, &query, &mut report).await?
    } else {
        looked_up_candidates(client, search, target, &d, &query, &mut report).await?
    };

    candidates.sort_by(|a, b| a.0.cmp(&b.0));
    candidates.dedup_by(|a, b| a.0 == b.0);

    // 3. Re-check what looked wrong, later and in a fresh snapshot.
    if !candidates.is_empty() {
        info!(table = %name, candidates = candidates.len(), wait_s = recheck_after.as_secs(), "audit: re-checking candidates");
        tokio::time::sleep(recheck_after).await;
    }
    for chunk in candidates.chunks(CHUNK / 4) {
        let keys: Vec<&Row> = chunk.iter().map(|(_, k)| k).collect();
        let rows = rows_by_keys(&*client, &d, mapping, &keys).await?;
        let ids: Vec<&str> = chunk.iter().map(|(id, _)| id.as_str()).collect();
        let docs = doc_meta(search, &index, &ids).await?;
        for (id, key) in chunk {
            let row = rows.get(id);
            let doc = docs.get(id);
            let Some(kind) = compare(mapping, row, doc) else {
                report.settled_on_recheck += 1;
                continue;
            };
            let since = target
                .time_column
                .and_then(|c| row.and_then(|r| r.get(c)))
                .and_then(Value::as_str)
                .or_else(|| doc.and_then(|m| m["commit_time"].as_str()))
                .map(str::to_owned);
            match kind {
                Kind::Missing => report.counts.missing += 1,
                Kind::Extra => report.counts.extra += 1,
                Kind::Stale => report.counts.stale += 1,
            }
            let hour = since
                .as_deref()
                .map(|s| s.get(..13).unwrap_or(s).to_owned())
                .unwrap_or_else(|| "unknown".to_owned());
            *report
                .timeline
                .entry(hour)
                .or_default()
                .entry(kind)
                .or_default() += 1;
            report.drifted_keys.push((id.clone(), key.clone()));
            if report.examples.iter().filter(|e| e.kind == kind).count() < EXAMPLES {
                report.examples.push(Drift {
                    kind,
                    id: id.clone(),
                    key: key.clone(),
                    since,
                });
            }
        }
    }
    info!(table = %name, rows = report.rows, documents = report.documents,
        missing = report.counts.missing, extra = report.counts.extra, stale = report.counts.stale,
        elapsed_s = started.elapsed().as_secs(), "audit: table done");
    Ok(report)
}

/// Checks given documents again (after a repair): how many still drift.
pub async fn recheck(
    client: &Client,
    search: &Search,
    mapping: &TableMapping,
    keys: &[(String, Row)],
) -> anyhow::Result<u64> {
    let d = describe(client, &mapping.schema, &mapping.table).await?;
    let mut still = 0;
    for chunk in keys.chunks(CHUNK / 4) {
        let key_rows: Vec<&Row> = chunk.iter().map(|(_, k)| k).collect();
        let rows = rows_by_keys(client, &d, mapping, &key_rows).await?;
        let ids: Vec<&str> = chunk.iter().map(|(id, _)| id.as_str()).collect();
        let docs = doc_meta(search, &mapping.index, &ids).await?;
        for (id, _) in chunk {
            if compare(mapping, rows.get(id), docs.get(id)).is_some() {
                still += 1;
            }
        }
    }
    Ok(still)
}

/// The terminal summary.
pub fn render_text(reports: &[TableReport]) -> String {
    let mut out = String::new();
    for r in reports {
        if let Some(fraction) = r.sample {
            out.push_str(&format!(
                "{}: SAMPLED, about {:.1}% of rows and documents checked; counts are of the sample\n",
                r.table,
                fraction * 100.0
            ));
        }
        if let Some(since) = &r.since {
            out.push_str(&format!("{}: only rows changed since {since}\n", r.table));
        }
        out.push_str(&format!(
            "{} -> {}: {} rows, {} documents: {} missing, {} extra, {} stale{}\n",
            r.table,
            r.index,
            r.rows,
            r.documents,
            r.counts.missing,
            r.counts.extra,
            r.counts.stale,
            if r.settled_on_recheck > 0 {
                format!(
                    " ({} changed while audited, consistent on re-check)",
                    r.settled_on_recheck
                )
            } else {
                String::new()
            }
        ));
        if r.drifted() == 0 {
            continue;
        }
        out.push_str("  when (hour, UTC)   missing  extra  stale\n");
        for (hour, kinds) in &r.timeline {
            let n = |k| kinds.get(&k).copied().unwrap_or(0);
            out.push_str(&format!(
                "  {hour:<17} {:>8} {:>6} {:>6}\n",
                n(Kind::Missing),
                n(Kind::Extra),
                n(Kind::Stale)
            ));
        }
        for e in &r.examples {
            out.push_str(&format!(
                "  {:<7} id {}  key {}{}\n",
                e.kind.as_str(),
                e.id,
                Value::Object(e.key.clone()),
                e.since
                    .as_deref()
                    .map(|s| format!("  since {s}"))
                    .unwrap_or_default()
            ));
        }
    }
    out
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A self-contained HTML report (no external assets): per-table counts, the
/// drift timeline as an SVG bar chart, example keys.
pub fn render_html(reports: &[TableReport], generated_at: &str) -> String {
    let drifted: u64 = reports.iter().map(TableReport::drifted).sum();
    let mut out = String::new();
    out.push_str(&format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Tidemark audit: {verdict}</title>
<style>
body {{ font: 15px/1.45 system-ui, sans-serif; margin: 2rem; color: #1d2733; max-width: 72rem; }}
code {{ word-break: break-all; }}
h1 {{ font-size: 1.6rem; margin-bottom: .2rem; }}
.verdict {{ display: inline-block; padding: .2rem .7rem; border-radius: .3rem; font-weight: 600; color: #fff; background: {color}; }}
table {{ border-collapse: collapse; margin: .8rem 0 1.5rem; }}
th, td {{ border-bottom: 1px solid #d8dee6; padding: .3rem .8rem; text-align: left; }}
td.n {{ text-align: right; font-variant-numeric: tabular-nums; }}
code {{ font-size: .9em; }}
.missing {{ fill: #d9822b; }} .extra {{ fill: #7157d9; }} .stale {{ fill: #c23030; }}
.legend span {{ display: inline-block; width: .8rem; height: .8rem; margin: 0 .3rem 0 1rem; vertical-align: middle; }}
</style></head><body>
<h1>Tidemark audit</h1>
<p>Generated {generated}. <span class="verdict">{verdict}</span></p>
<table><tr><th>table</th><th>index</th><th>rows</th><th>documents</th><th>missing</th><th>extra</th><th>stale</th></tr>
"#,
        verdict = if drifted == 0 { "clean".to_owned() } else { format!("{drifted} documents drifted") },
        color = if drifted == 0 { "#2b8a3e" } else { "#c23030" },
        generated = escape(generated_at),
    ));
    for r in reports {
        out.push_str(&format!(
            "<tr><td><code>{}</code></td><td><code>{}</code></td><td class=n>{}</td><td class=n>{}</td><td class=n>{}</td><td class=n>{}</td><td class=n>{}</td></tr>\n",
            escape(&r.table), escape(&r.index), r.rows, r.documents, r.counts.missing, r.counts.extra, r.counts.stale
        ));
    }
    out.push_str("</table>\n");
    for r in reports.iter().filter(|r| r.drifted() > 0) {
        out.push_str(&format!("<h2>{}</h2>\n", escape(&r.table)));
        if let Some(fraction) = r.sample {
            out.push_str(&format!(
                "<p><strong>Sampled:</strong> about {:.1}% of rows and documents were checked; counts are of the sample.</p>\n",
                fraction * 100.0
            ));
        }
        out.push_str("<p>When the drifted rows last changed (per hour, UTC):</p>\n");
        out.push_str(&timeline_svg(&r.timeline));
        out.push_str(r#"<p class="legend"><span class="missing" style="background:#d9822b"></span>missing<span style="background:#7157d9"></span>extra<span style="background:#c23030"></span>stale</p>"#);
        out.push_str(
            "\n<table><tr><th>kind</th><th>document id</th><th>key</th><th>since</th></tr>\n",
        );
        for e in &r.examples {
            out.push_str(&format!(
                "<tr><td>{}</td><td><code>{}</code></td><td><code>{}</code></td><td>{}</td></tr>\n",
                e.kind.as_str(),
                escape(&e.id),
                escape(&Value::Object(e.key.clone()).to_string()),
                escape(e.since.as_deref().unwrap_or("unknown"))
            ));
        }
        out.push_str("</table>\n");
    }
    out.push_str("</body></html>\n");
    out
}

/// Stacked bars, one per hour, in an inline SVG.
fn timeline_svg(timeline: &BTreeMap<String, BTreeMap<Kind, u64>>) -> String {
    let bar = 36.0;
    let gap = 14.0;
    let height = 160.0;
    let top = timeline
        .values()
        .map(|k| k.values().sum::<u64>())
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let width = 60.0 + timeline.len() as f64 * (bar + gap);
    let mut svg = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{:.0}" role="img" aria-label="drift per hour">
<line x1="40" y1="{height:.0}" x2="{width:.0}" y2="{height:.0}" stroke="#8a96a3"/>
<text x="4" y="14" font-size="12">{top:.0}</text><text x="4" y="{height:.0}" font-size="12">0</text>
"##,
        height + 50.0
    );
    for (i, (hour, kinds)) in timeline.iter().enumerate() {
        let x = 48.0 + i as f64 * (bar + gap);
        let mut y = height;
        for kind in [Kind::Missing, Kind::Extra, Kind::Stale] {
            let n = kinds.get(&kind).copied().unwrap_or(0);
            if n == 0 {
                continue;
            }
            let h = (n as f64 / top) * (height - 20.0);
            y -= h;
            svg.push_str(&format!(
                r#"<rect class="{}" x="{x:.1}" y="{y:.1}" width="{bar:.0}" height="{h:.1}"><title>{} {}: {n}</title></rect>
"#,
                kind.as_str(),
                escape(hour),
                kind.as_str()
            ));
        }
        let label = match hour.get(5..) {
            Some(day_hour) if hour != "unknown" => format!("{day_hour}h"),
            _ => hour.clone(),
        };
        svg.push_str(&format!(
            r#"<text x="{:.1}" y="{:.0}" font-size="11" transform="rotate(35 {:.1} {:.0})">{}</text>
"#,
            x,
            height + 14.0,
            x,
            height + 14.0,
            escape(&label)
        ));
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_is_self_contained_and_escaped() {
        let mut timeline = BTreeMap::new();
        timeline.insert(
            "2026-11-22T10".to_owned(),
            BTreeMap::from([(Kind::Stale, 3u64), (Kind::Missing, 1)]),
        );
        let report = TableReport {
            table: "public.a<b>".into(),
            index: "a".into(),
            rows: 10,
            documents: 9,
            counts: Counts {
                missing: 1,
                extra: 0,
                stale: 3,
            },
            timeline,
            examples: vec![],
            settled_on_recheck: 0,
            sample: None,
            since: None,
            drifted_keys: Vec::new(),
        };
        let html = render_html(&[report], "2026-11-22T11:00:00Z");
        assert!(html.contains("public.a&lt;b&gt;"));
        assert!(html.contains("<svg") && html.contains("class=\"stale\""));
        assert!(html.contains("4 documents drifted"));
        assert!(
            !html.contains("src=\"http") && !html.contains("href=\"http"),
            "no external assets"
        );
    }

    #[test]
    fn array_elements_are_quoted_and_escaped() {
        assert_eq!(array_element(&json!(42)), r#""42""#);
        assert_eq!(array_element(&json!(true)), r#""true""#);
        assert_eq!(array_element(&json!("o'clock")), r#""o'clock""#);
        assert_eq!(array_element(&json!(r#"a"b\c,{d}"#)), r#""a\"b\\c,{d}""#);
        assert_eq!(array_element(&json!("NULL")), r#""NULL""#);
    }
}
