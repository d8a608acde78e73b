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
//! 4. Causes: what Kafka and the dead-letter topic hold for the drifted
//!    keys, read once per table (`causes`), says why each drifted (lost in
//!    apply, missed delete, lost in capture, foreign write, unknown) and
//!    when: the first change that did not land, else the row's time column
//!    (`audit_time_column`). The drift times make a histogram at a width
//!    that fits their spread (`timeline`), and the causes the fixes: the
//!    exact `window` command for the changes Kafka holds, `audit --repair`
//!    for the rest.
//!
//! With `deep`, a document is judged by its content (`_source` hashed
//! through the same mapping) rather than by the hash it carries, which a
//! write that bypassed Tidemark leaves as it was.
//!
//! Files: `rows` (the table side), `docs` (the index side), `candidates`
//! (full merge or key look-ups), `causes`, `timeline`, `report` (text and
//! HTML), this file (the comparison, one table's audit, its conclusion).

use crate::error::{Context, ReplayError, Result};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;
use tidemark_index::mapping::{TableMapping, content_hash};
use tidemark_index::reads::{doc_content_meta, doc_meta, refresh};
use tidemark_index::search::Search;
use tidemark_postgres::quote_ident;
use tidemark_schemas::Row;
use tokio_postgres::Client;
use tracing::info;

mod candidates;
mod causes;
mod docs;
mod parts;
mod report;
mod rows;
mod timeline;
use candidates::*;
pub use causes::{Cause, Fix};
use causes::{Evidence, Finding, gather, judge};
pub(crate) use docs::*;
pub use parts::merge_parts;
pub use report::*;
pub(crate) use rows::*;
pub use timeline::Timeline;
use timeline::{histogram, window_bounds};

/// Rows per cursor fetch and ids per lookup: large enough that round trips
/// do not dominate, small enough that a chunk of wide rows stays a few MB.
const CHUNK: usize = 2_000;
/// Documents per scroll page (ids and a hash each, ~100 bytes in JSON).
const SCROLL_PAGE: usize = 10_000;
/// A progress line every this many rows or documents.
const PROGRESS_EVERY: u64 = 100_000;
/// Keys shown per kind of drift in a report.
const EXAMPLES: usize = 20;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize,
)]
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
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Drift {
    pub kind: Kind,
    pub id: String,
    pub key: Row,
    /// When the drift began, where known: the first change Kafka holds
    /// that did not land, else the row's time column (without causes: the
    /// time column, else the document's last applied commit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<Cause>,
    /// Its change went to the dead-letter topic, for this reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<String>,
}

#[derive(Debug, Default, Clone, Serialize, serde::Deserialize)]
pub struct Counts {
    pub missing: u64,
    pub extra: u64,
    pub stale: u64,
}

impl Counts {
    fn add(&mut self, kind: Kind) {
        match kind {
            Kind::Missing => self.missing += 1,
            Kind::Extra => self.extra += 1,
            Kind::Stale => self.stale += 1,
        }
    }

    pub fn total(&self) -> u64 {
        self.missing + self.extra + self.stale
    }
}

/// What to run to repair one share of the drift.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Suggestion {
    pub fix: Fix,
    /// Drifted documents it repairs.
    pub documents: u64,
    /// The command, exactly as it can be run.
    pub command: String,
    /// For a window: its bounds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct TableReport {
    pub table: String,
    pub index: String,
    /// `hash` (documents judged by their stored `_tidemark.hash`) or
    /// `deep` (by their content: finds writes that bypassed Tidemark).
    pub mode: String,
    pub rows: u64,
    pub documents: u64,
    pub counts: Counts,
    /// The earliest and latest drift time, over the drift that has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_drift: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_drift: Option<String>,
    /// Drift per bucket, at a width that fits its spread.
    pub timeline: Timeline,
    /// Drift with no time (documents Tidemark never wrote, rows older than
    /// what Kafka holds, no time column): its fix is `audit --repair`.
    pub untimed: Counts,
    /// Drifted documents per cause (`None`: causes not read, `--no-causes`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub causes: Option<BTreeMap<Cause, u64>>,
    /// Drifted documents whose change is in the dead-letter topic.
    pub dead_lettered: u64,
    /// What repairs it, most specific first.
    pub fixes: Vec<Suggestion>,
    /// Up to 20 examples per kind, in key order.
    pub examples: Vec<Drift>,
    /// Candidates that were consistent on re-check (changing while audited).
    pub settled_on_recheck: u64,
    /// The fraction checked, when sampled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample: Option<f64>,
    /// Only rows changed since then were checked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// The share audited (`--part I/N`); merged reports have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<Part>,
    /// Every drifted document (id, key), for `--repair`.
    #[serde(skip, default)]
    pub drifted_keys: Vec<(String, Row)>,
}

impl TableReport {
    pub fn drifted(&self) -> u64 {
        self.counts.total()
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
    /// Judge documents by their content (`_source` hashed through the same
    /// mapping), not by their stored hash.
    pub deep: bool,
    /// Where to read causes from; `None`: not read (`--no-causes`).
    pub kafka: Option<&'a tidemark_schemas::config::Kafka>,
    /// How the suggested commands start (`tidemark-replay --config F`).
    pub invocation: &'a str,
    /// Documents (id, key) known to have drifted before (`--watch`): looked
    /// at again whatever the pass reads, so repaired drift is seen to go.
    pub known: &'a [(String, Row)],
    /// Audit only this share of the table (`--part I/N`).
    pub part: Option<Part>,
}

/// One of `of` disjoint shares of a table's audit (`--part I/N`, `index`
/// from 0), so that N processes share one table. Each part reads only its
/// share from both sides: the rows whose key hashes to it in PostgreSQL
/// (`hashtextextended` of the key's row text), and the documents of its
/// slice of the index (OpenSearch's sliced scroll, by `_id`). A row's
/// drift (missing, stale) is found by the part its key hashes to, a
/// document without a row (extra) by the part whose slice holds it; both
/// families are partitions, so the parts together find each drifted
/// document once, and `audit --merge` adds their reports up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Part {
    pub index: u32,
    pub of: u32,
}

impl Part {
    /// `I/N` with 1 <= I <= N, as `--part` takes it.
    pub fn parse(text: &str) -> std::result::Result<Part, String> {
        let parsed = text.split_once('/').and_then(|(i, n)| {
            Some((i.trim().parse::<u32>().ok()?, n.trim().parse::<u32>().ok()?))
        });
        match parsed {
            Some((i, n)) if n >= 1 && (1..=n).contains(&i) => Ok(Part {
                index: i - 1,
                of: n,
            }),
            _ => Err(format!(
                "--part {text}: give I/N with 1 <= I <= N, e.g. 1/4 (this process audits the first of four shares)"
            )),
        }
    }

    /// The SQL condition that keeps this part's rows, over `key` columns.
    fn condition(self, key: &[String]) -> String {
        let columns = key
            .iter()
            .map(|k| quote_ident(k))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "(hashtextextended(ROW({columns})::text, 0) & 9223372036854775807) % {} = {}",
            self.of, self.index
        )
    }
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index + 1, self.of)
    }
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
) -> Result<TableReport> {
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
        mode: if target.deep { "deep" } else { "hash" }.to_owned(),
        rows: 0,
        documents: 0,
        counts: Counts::default(),
        first_drift: None,
        last_drift: None,
        timeline: Timeline::default(),
        untimed: Counts::default(),
        causes: None,
        dead_lettered: 0,
        fixes: Vec::new(),
        examples: Vec::new(),
        settled_on_recheck: 0,
        sample: target.sample,
        since: target.since.map(|t| t.to_string()),
        part: target.part,
        drifted_keys: Vec::new(),
    };
    let mut query = d.select.clone();
    if let Some(fraction) = target.sample {
        query.push_str(&format!(" TABLESAMPLE BERNOULLI ({})", fraction * 100.0));
    }
    let mut conditions = Vec::new();
    if let Some(since) = target.since {
        let Some(column) = target.time_column else {
            return Err(ReplayError::Refused(format!(
                "--since: table {name} has no audit_time_column in the config, so its rows cannot be chosen by time"
            )));
        };
        conditions.push(format!("{} >= '{since}'::timestamptz", quote_ident(column)));
    }
    if let Some(part) = target.part {
        conditions.push(part.condition(&d.table.key));
    }
    if !conditions.is_empty() {
        query.push_str(&format!(" WHERE {}", conditions.join(" AND ")));
    }
    // Candidates: document id -> (kind, key).
    let started = Instant::now();
    let whole = target.sample.is_none() && target.since.is_none() && target.part.is_none();
    let mut candidates = if whole {
        merged_candidates(client, search, target, &d, &query, &mut report).await?
    } else {
        looked_up_candidates(client, search, target, &d, &query, &mut report).await?
    };

    candidates.extend(target.known.iter().cloned());
    candidates.sort_by(|a, b| a.0.cmp(&b.0));
    candidates.dedup_by(|a, b| a.0 == b.0);

    // 3. Re-check what looked wrong, later and in a fresh snapshot.
    if !candidates.is_empty() {
        info!(table = %name, candidates = candidates.len(), wait_s = recheck_after.as_secs(), "audit: re-checking candidates");
        tokio::time::sleep(recheck_after).await;
    }
    let mut findings = Vec::new();
    for chunk in candidates.chunks(CHUNK / 4) {
        let keys: Vec<&Row> = chunk.iter().map(|(_, k)| k).collect();
        let rows = rows_by_keys(&*client, &d, mapping, &keys).await?;
        let ids: Vec<&str> = chunk.iter().map(|(id, _)| id.as_str()).collect();
        let mut docs = if target.deep {
            doc_content_meta(search, &index, &ids).await?
        } else {
            doc_meta(search, &index, &ids).await?
        };
        for (id, key) in chunk {
            let row = rows.get(id);
            let Some(kind) = compare(mapping, row, docs.get(id)) else {
                report.settled_on_recheck += 1;
                continue;
            };
            let row_time = target
                .time_column
                .and_then(|c| row.and_then(|r| r.get(c)))
                .and_then(Value::as_str)
                .map(str::to_owned);
            findings.push(Finding {
                kind,
                id: id.clone(),
                key: key.clone(),
                row_time,
                doc: docs.remove(id),
            });
        }
    }
    // Reports list keys in the order their values sort.
    findings.sort_by(|a, b| key_order(&a.key, &b.key).then_with(|| a.id.cmp(&b.id)));
    // 4. Why, from Kafka: its topic read once for all of them.
    let evidence = match target.kafka {
        Some(kafka) if !findings.is_empty() => {
            let (kafka, owned, probes) = (kafka.clone(), mapping.clone(), findings.clone());
            Some(
                tokio::task::spawn_blocking(move || gather(&kafka, &owned, &probes))
                    .await
                    .with_context(|| format!("table {name}: the causes task failed"))?
                    .with_context(|| format!(
                        "table {name}: reading Kafka for the causes of its drift (--no-causes audits without)"
                    ))?,

            )
        }
        Some(_) => Some(Vec::new()),
        None => None,
    };
    conclude(&mut report, target, findings, evidence);
    info!(table = %name, rows = report.rows, documents = report.documents,
        missing = report.counts.missing, extra = report.counts.extra, stale = report.counts.stale,
        elapsed_s = started.elapsed().as_secs(), "audit: table done");
    Ok(report)
}

/// Counts, dates, explains and suggests the fixes of what the re-check
/// confirmed; `evidence` is in the findings' order.
fn conclude(
    report: &mut TableReport,
    target: &Target<'_>,
    findings: Vec<Finding>,
    evidence: Option<Vec<Evidence>>,
) {
    let table = &report.table;
    let mut times = Vec::new();
    let mut causes: BTreeMap<Cause, u64> = BTreeMap::new();
    // Per fix: documents, and for windows the commit times to cover.
    let mut fixes: BTreeMap<Fix, (u64, Option<(i64, i64)>)> = BTreeMap::new();
    for (i, f) in findings.iter().enumerate() {
        report.counts.add(f.kind);
        let e = evidence.as_ref().and_then(|e| e.get(i));
        let verdict = e.map(|e| judge(f, e));
        let since_ms = match &verdict {
            Some(v) => v.since_ms,
            None => f
                .row_time
                .as_deref()
                .or_else(|| f.doc.as_ref().and_then(|m| m["commit_time"].as_str()))
                .and_then(tidemark_schemas::commit_time::unix_millis),
        };
        match since_ms {
            Some(ms) => times.push((f.kind, ms)),
            None => report.untimed.add(f.kind),
        }
        let fix = verdict.as_ref().map_or(Fix::AuditRepair, |v| v.cause.fix());
        let slot = fixes.entry(fix).or_default();
        slot.0 += 1;
        if let Some((first, last)) = verdict.as_ref().and_then(|v| v.window_ms) {
            slot.1 = Some(match slot.1 {
                Some((a, b)) => (a.min(first), b.max(last)),
                None => (first, last),
            });
        }
        if let Some(v) = &verdict {
            *causes.entry(v.cause).or_default() += 1;
        }
        let dead_letter = e.and_then(|e| e.dead_letter.clone());
        if dead_letter.is_some() {
            report.dead_lettered += 1;
        }
        report.drifted_keys.push((f.id.clone(), f.key.clone()));
        if report.examples.iter().filter(|x| x.kind == f.kind).count() < EXAMPLES {
            report.examples.push(Drift {
                kind: f.kind,
                id: f.id.clone(),
                key: f.key.clone(),
                since: since_ms.map(text_time),
                cause: verdict.map(|v| v.cause),
                dead_letter,
            });
        }
    }
    report.first_drift = times.iter().map(|(_, t)| *t).min().map(text_time);
    report.last_drift = times.iter().map(|(_, t)| *t).max().map(text_time);
    report.timeline = histogram(&times);
    report.causes = evidence.map(|_| causes);
    let run = target.invocation;
    for (fix, (documents, window)) in fixes {
        let suggestion = match (fix, window) {
            (Fix::Window, Some((first, last))) => {
                let (from, to) = window_bounds(first, last);
                Suggestion {
                    fix,
                    documents,
                    command: format!("{run} window --from {from} --to {to} --table {table} --yes"),
                    from: Some(from),
                    to: Some(to),
                }
            }
            (Fix::CheckWriters, _) => Suggestion {
                fix,
                documents,
                command: format!("{run} audit --table {table} --deep --repair --yes"),
                from: None,
                to: None,
            },
            _ => Suggestion {
                fix,
                documents,
                command: format!("{run} audit --table {table} --repair --yes"),
                from: None,
                to: None,
            },
        };
        report.fixes.push(suggestion);
    }
}

fn text_time(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| ms.to_string())
}

/// Keys in the order their values sort (numbers as numbers), column by
/// column: reports list `2` before `10`.
pub(crate) fn key_order(a: &Row, b: &Row) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    for ((_, x), (_, y)) in a.iter().zip(b.iter()) {
        let order = match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) => x.partial_cmp(&y).unwrap_or(Ordering::Equal),
            _ => match (x.as_str(), y.as_str()) {
                (Some(x), Some(y)) => x.cmp(y),
                _ => x.to_string().cmp(&y.to_string()),
            },
        };
        if order != Ordering::Equal {
            return order;
        }
    }
    a.len().cmp(&b.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_part_is_one_of_n_shares_and_says_which() {
        let part = Part::parse("2/3").expect("2/3");
        assert_eq!(part, Part { index: 1, of: 3 });
        assert_eq!(part.to_string(), "2/3");
        assert_eq!(
            part.condition(&["id".into(), "Region".into()]),
            "(hashtextextended(ROW(\"id\", \"Region\")::text, 0) & 9223372036854775807) % 3 = 1"
        );
        for bad in ["0/3", "4/3", "1/0", "3", "a/b", ""] {
            let refused = Part::parse(bad).expect_err(bad);
            assert!(refused.contains("1 <= I <= N"), "{refused}");
        }
    }

    #[test]
    fn html_is_self_contained_and_escaped() {
        let timeline = Timeline {
            bucket_s: 60,
            buckets: BTreeMap::from([(
                "2026-11-22T10:01:00Z".to_owned(),
                BTreeMap::from([(Kind::Stale, 3u64), (Kind::Missing, 1)]),
            )]),
        };
        let report = TableReport {
            table: "public.a<b>".into(),
            index: "a".into(),
            mode: "hash".into(),
            rows: 10,
            documents: 9,
            counts: Counts {
                missing: 1,
                extra: 0,
                stale: 3,
            },
            first_drift: Some("2026-11-22T10:01:02Z".into()),
            last_drift: Some("2026-11-22T10:01:40Z".into()),
            timeline,
            untimed: Counts::default(),
            causes: Some(BTreeMap::from([(Cause::LostInApply, 4)])),
            dead_lettered: 0,
            fixes: vec![Suggestion {
                fix: Fix::Window,
                documents: 4,
                command: "tidemark-replay window --from A --to B --table public.a<b> --yes".into(),
                from: Some("A".into()),
                to: Some("B".into()),
            }],
            examples: vec![],
            settled_on_recheck: 0,
            sample: None,
            since: None,
            part: None,
            drifted_keys: Vec::new(),
        };
        let html = render_html(&[report], "2026-11-22T11:00:00Z");
        assert!(html.contains("public.a&lt;b&gt;"));
        assert!(html.contains("<svg") && html.contains("class=\"stale\""));
        assert!(html.contains("4 documents drifted"));
        assert!(html.contains("--table public.a&lt;b&gt; --yes"), "{html}");
        assert!(html.contains("lost in apply"), "{html}");
        assert!(
            !html.contains("src=\"http") && !html.contains("href=\"http"),
            "no external assets"
        );
    }

    #[test]
    fn keys_sort_as_their_values_do() {
        let key = |v: Value| v.as_object().cloned().unwrap_or_default();
        let mut keys = [
            key(json!({"id": 10})),
            key(json!({"id": 2})),
            key(json!({"id": 1})),
        ];
        keys.sort_by(key_order);
        assert_eq!(keys[0]["id"], 1);
        assert_eq!(keys[2]["id"], 10);
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
