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
//!
//! Files: `rows` (the table side), `docs` (the index side), `candidates`
//! (full merge or key look-ups), `report` (text and HTML), this file (the
//! comparison and one table's audit).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;
use tidemark_index::mapping::{TableMapping, content_hash};
use tidemark_index::reads::{doc_meta, refresh};
use tidemark_index::search::Search;
use tidemark_postgres::quote_ident;
use tidemark_schemas::Row;
use tokio_postgres::Client;
use tracing::info;

mod candidates;
mod docs;
mod report;
mod rows;
use candidates::*;
pub(crate) use docs::*;
pub use report::*;
pub(crate) use rows::*;

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
pub(crate) fn compare(
    mapping: &TableMapping,
    row: Option<&Row>,
    doc: Option<&Value>,
) -> Option<Kind> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
