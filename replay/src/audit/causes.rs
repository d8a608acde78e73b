//! Why each drifted document drifted, from what Kafka holds for its key:
//! the table's topic read **once** for the drift's time range (from a
//! minute before the oldest document or row time among the drifted keys,
//! or from the start of what Kafka holds when one has neither), and the
//! dead-letter topic over the same range.
//!
//! The rule, per drifted document at version `v` (none when missing):
//! - **lost in apply**: Kafka holds a change of the key newer than `v`
//!   (the consumer skipped it, or set it aside: then its dead-letter
//!   reason is said);
//! - **missed delete**: the same, for a document whose row is gone and
//!   whose newest change is a delete (or a truncate);
//! - **foreign write**: the document was not written by Tidemark (no
//!   `_tidemark`), or, with `--deep`, its content is not what its stored
//!   hash says (a partial `_update`, a hand fix, a second writer);
//! - **lost in capture**: Kafka has nothing newer than `v`, though the row
//!   changed (or vanished) after it, and Kafka holds the key's partition
//!   from before then: the change never reached the topic;
//! - **unknown**: Kafka alone cannot say (its partition no longer holds
//!   that far back; or the newest change is the document's own and its
//!   content still differs, as an event with unchanged TOAST values can).
//!
//! The cause decides the fix ([`Cause::fix`]): a change Kafka still holds
//! is repaired by `window` over its commit time; the others by
//! `audit --repair`, which re-reads the rows.

use crate::error::{Context, Result};
use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::Serialize;
use serde_json::Value;
use tidemark_index::mapping::TableMapping;
use tidemark_schemas::config::Kafka;
use tidemark_schemas::{ChangeEvent, Operation, Row, commit_time::unix_millis};
use tracing::info;

use super::Kind;
use crate::progress::Progress;
use crate::window::{KAFKA_TIMEOUT, close_in_background, open_scanner, record_key_of};

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    LostInApply,
    MissedDelete,
    LostInCapture,
    ForeignWrite,
    Unknown,
}

/// How a cause is repaired.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Fix {
    /// `window` over the commit times of the changes Kafka holds.
    Window,
    /// `audit --repair`: the rows are read again.
    AuditRepair,
    /// Someone else writes to the index: find them, then `audit --deep
    /// --repair`.
    CheckWriters,
}

impl Cause {
    pub const ALL: [Cause; 5] = [
        Cause::LostInApply,
        Cause::MissedDelete,
        Cause::LostInCapture,
        Cause::ForeignWrite,
        Cause::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Cause::LostInApply => "lost in apply",
            Cause::MissedDelete => "missed delete",
            Cause::LostInCapture => "lost in capture",
            Cause::ForeignWrite => "foreign write",
            Cause::Unknown => "unknown",
        }
    }

    pub fn fix(self) -> Fix {
        match self {
            Cause::LostInApply | Cause::MissedDelete => Fix::Window,
            Cause::LostInCapture | Cause::Unknown => Fix::AuditRepair,
            Cause::ForeignWrite => Fix::CheckWriters,
        }
    }
}

/// A drifted document as the re-check saw it.
#[derive(Debug, Clone)]
pub(crate) struct Finding {
    pub(crate) kind: Kind,
    pub(crate) id: String,
    pub(crate) key: Row,
    /// The row's `audit_time_column`, when the config names one.
    pub(crate) row_time: Option<String>,
    /// The document's `_tidemark` (with `--deep`, `hash` is its content's
    /// and `stored_hash` the one it carries); `None` when missing.
    pub(crate) doc: Option<Value>,
}

impl Finding {
    fn doc_version(&self) -> Option<u64> {
        let v = &self.doc.as_ref()?["version"];
        v.as_u64().or_else(|| v.as_str()?.parse().ok())
    }

    fn doc_ms(&self) -> Option<i64> {
        unix_millis(self.doc.as_ref()?["commit_time"].as_str()?)
    }

    fn row_ms(&self) -> Option<i64> {
        unix_millis(self.row_time.as_deref()?)
    }

    /// Written by Tidemark: the document carries a version.
    fn ours(&self) -> bool {
        self.doc_version().is_some()
    }

    /// With `--deep`: the content is not what the stored hash says.
    fn overwritten(&self) -> bool {
        let Some(doc) = &self.doc else {
            return false;
        };
        doc.get("stored_hash")
            .is_some_and(|stored| stored != &doc["hash"])
    }
}

/// What Kafka holds for one drifted key.
#[derive(Debug, Clone, Default)]
pub(crate) struct Evidence {
    /// Changes newer than the document's version (all, when missing).
    pub(crate) newer: u64,
    /// Commit times (ms) of the first and last of them.
    pub(crate) first_newer_ms: Option<i64>,
    pub(crate) last_newer_ms: Option<i64>,
    /// The operation of the newest change seen (by version).
    pub(crate) latest: Option<(u64, Operation)>,
    /// Kafka holds the key's partition from before the document's (or
    /// row's) time: an absence of changes means something.
    pub(crate) covered: bool,
    /// The reason of the key's latest dead letter since the scan's start.
    pub(crate) dead_letter: Option<String>,
}

/// One finding's verdict.
#[derive(Debug, Clone)]
pub(crate) struct Verdict {
    pub(crate) cause: Cause,
    /// When the drift began (ms), where that is known: the first change
    /// Kafka holds that did not land, or the row's time.
    pub(crate) since_ms: Option<i64>,
    /// The commit times (ms) a window must cover to repair it.
    pub(crate) window_ms: Option<(i64, i64)>,
}

/// Judges one finding by its evidence (see the module's rule).
pub(crate) fn judge(finding: &Finding, evidence: &Evidence) -> Verdict {
    let lost = evidence.newer > 0;
    let window_ms = evidence.first_newer_ms.zip(evidence.last_newer_ms);
    let from_kafka = |cause| Verdict {
        cause,
        since_ms: evidence.first_newer_ms,
        window_ms,
    };
    let untimed = |cause| Verdict {
        cause,
        since_ms: None,
        window_ms: None,
    };
    let by_row = |cause| Verdict {
        cause,
        since_ms: finding.row_ms(),
        window_ms: None,
    };
    match finding.kind {
        Kind::Extra if !finding.ours() => untimed(Cause::ForeignWrite),
        Kind::Extra => {
            let deleted = evidence.latest.is_some_and(|(_, op)| {
                matches!(
                    op,
                    Operation::Delete | Operation::Truncate | Operation::Resnapshot
                )
            });
            match () {
                _ if lost && deleted => from_kafka(Cause::MissedDelete),
                _ if evidence.covered => untimed(Cause::LostInCapture),
                _ => untimed(Cause::Unknown),
            }
        }
        Kind::Missing | Kind::Stale if lost => from_kafka(Cause::LostInApply),
        Kind::Stale if finding.overwritten() => untimed(Cause::ForeignWrite),
        Kind::Missing if evidence.covered => by_row(Cause::LostInCapture),
        Kind::Stale
            if evidence.covered
                && finding
                    .row_ms()
                    .zip(finding.doc_ms())
                    .is_some_and(|(row, doc)| row > doc) =>
        {
            by_row(Cause::LostInCapture)
        }
        Kind::Missing | Kind::Stale => by_row(Cause::Unknown),
    }
}

/// Reads the table's topic and the dead-letter topic once, for every
/// finding at once: its evidence, in the findings' order. Blocking (a
/// librdkafka consumer): run it off the async runtime.
pub(crate) fn gather(
    kafka: &Kafka,
    mapping: &TableMapping,
    findings: &[Finding],
) -> Result<Vec<Evidence>> {
    let started = Instant::now();
    let topic = kafka.table_topic(&mapping.schema, &mapping.table);
    let mut evidence = vec![Evidence::default(); findings.len()];
    // Record key -> findings (a foreign id decodes into no key: it has no
    // changes, and it is the table-wide key of truncates).
    let mut by_key: HashMap<Vec<u8>, usize> = HashMap::new();
    for (i, f) in findings.iter().enumerate() {
        if !f.key.is_empty() {
            by_key.insert(record_key_of(mapping, &f.key), i);
        }
    }
    let table_key = record_key_of(mapping, &Row::new());
    let partition_of = |partitions: i32| -> Vec<Option<i32>> {
        findings
            .iter()
            .map(|f| {
                (!f.key.is_empty()).then(|| {
                    tidemark_schemas::partition::partition_for(
                        &record_key_of(mapping, &f.key),
                        partitions,
                    )
                })
            })
            .collect()
    };
    // Each finding's earliest time of interest: its document's commit
    // time, else its row's; none means from the start of what Kafka holds.
    let bounds: Vec<Option<i64>> = findings
        .iter()
        .map(|f| f.doc_ms().or_else(|| f.row_ms()))
        .collect();
    let from_ms = bounds
        .iter()
        .copied()
        .collect::<Option<Vec<i64>>>()
        .and_then(|b| b.into_iter().min())
        .map(|ms| ms - 60_000);

    let (consumer, partitions) = open_scanner(kafka, &topic, "tidemark-replay-audit")?;
    if partitions == 0 {
        close_in_background(consumer);
        return Ok(evidence);
    }
    let partition_of = partition_of(partitions);
    let starts = match from_ms {
        Some(ms) => {
            let mut query = TopicPartitionList::new();
            for p in 0..partitions {
                query
                    .add_partition_offset(&topic, p, Offset::Offset(ms))
                    .with_context(|| {
                        format!("{topic} partition {p}: cannot ask for an offset by time")
                    })?;
            }
            Some(
                consumer
                    .offsets_for_times(query, KAFKA_TIMEOUT)
                    .with_context(|| {
                        format!("topic {topic}: cannot find the drift's first offsets")
                    })?,
            )
        }
        None => None,
    };
    // Per partition: (low watermark, where the scan starts, its end).
    let mut spans = HashMap::new();
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions {
        let (low, high) = consumer
            .fetch_watermarks(&topic, p, KAFKA_TIMEOUT)
            .with_context(|| format!("{topic} partition {p}: cannot read offsets"))?;
        let start = match starts
            .as_ref()
            .and_then(|s| s.find_partition(&topic, p))
            .map(|e| e.offset())
        {
            Some(Offset::Offset(o)) => o.max(low),
            Some(Offset::End) => high,
            _ => low,
        };
        spans.insert(p, (low, start, high));
        if start < high {
            assignment
                .add_partition_offset(&topic, p, Offset::Offset(start))
                .with_context(|| format!("{topic} partition {p} offset {start}: cannot assign"))?;
        }
    }
    // The oldest record's commit time of each partition read from its low
    // watermark (> 0: retention removed what was before it).
    let mut oldest_ms: HashMap<i32, i64> = HashMap::new();
    let mut open: HashMap<i32, i64> = spans
        .iter()
        .filter(|(_, (_, start, high))| start < high)
        .map(|(p, (_, _, high))| (*p, *high))
        .collect();
    let mut truncates: Vec<(u64, i64)> = Vec::new();
    let mut scanned = 0u64;
    let mut last_report = Instant::now();
    let total: i64 = spans
        .values()
        .map(|(_, start, high)| (high - start).max(0))
        .sum();
    let progress = Progress::new(
        &format!("{}: Kafka, for causes", mapping.qualified()),
        "records",
        Some(total as u64),
    );
    if !open.is_empty() {
        consumer
            .assign(&assignment)
            .with_context(|| format!("topic {topic}: cannot assign its partitions"))?;
    }
    while !open.is_empty() {
        let Some(message) = consumer.poll(Duration::from_secs(1)) else {
            continue;
        };
        let message = message.with_context(|| topic.to_string())?;
        let (partition, offset) = (message.partition(), message.offset());
        scanned += 1;
        progress.inc(1);
        if last_report.elapsed() >= Duration::from_secs(10) {
            last_report = Instant::now();
            info!(topic, scanned, "audit: reading Kafka for causes");
        }
        if open.get(&partition).is_some_and(|end| offset + 1 >= *end) {
            open.remove(&partition);
        }
        if spans
            .get(&partition)
            .is_some_and(|(low, _, _)| offset == *low)
            && let Some(ms) = message.timestamp().to_millis()
        {
            oldest_ms.insert(partition, ms);
        }
        let Some(key) = message.key() else { continue };
        let finding = by_key.get(key).copied();
        if finding.is_none() && key != table_key.as_slice() {
            continue;
        }
        let event = ChangeEvent::from_slice(message.payload().unwrap_or_default())
            .with_context(|| format!("{topic} partition {partition} offset {offset}"))?;
        let version = event
            .version()
            .with_context(|| format!("{topic} partition {partition} offset {offset}"))?
            .get();
        let ms = unix_millis(&event.commit_time).unwrap_or_default();
        match finding {
            Some(i) => note(
                &mut evidence[i],
                findings[i].doc_version(),
                version,
                ms,
                event.op,
            ),
            None => {
                truncates.push((version, ms));
                // A missing document's drift begins after its row's last
                // removal: the truncate is in every partition, in order
                // with that partition's changes.
                for (i, f) in findings.iter().enumerate() {
                    if f.doc.is_none() && partition_of[i] == Some(partition) {
                        note(&mut evidence[i], None, version, ms, event.op);
                    }
                }
            }
        }
    }
    progress.finish();
    close_in_background(consumer);
    // A truncate reaches every partition: counted once per key.
    truncates.sort_unstable();
    truncates.dedup_by_key(|(version, _)| *version);
    for (i, f) in findings.iter().enumerate() {
        if f.kind != Kind::Extra || f.doc.is_none() {
            continue;
        }
        for &(version, ms) in &truncates {
            note(
                &mut evidence[i],
                f.doc_version(),
                version,
                ms,
                Operation::Truncate,
            );
        }
    }
    // Whether the key's partition reaches back far enough.
    for (i, partition) in partition_of.iter().enumerate() {
        let Some((low, start, _)) = partition.and_then(|p| spans.get(&p)) else {
            continue;
        };
        evidence[i].covered = *low == 0
            || *start > *low
            || match (bounds[i], partition.and_then(|p| oldest_ms.get(&p))) {
                (Some(bound), Some(oldest)) => *oldest <= bound,
                _ => false,
            };
    }
    // Dead letters of these keys since the scan's start.
    let letters = crate::dead_letters::list(
        kafka,
        &kafka.dead_letter_topic(),
        &crate::dead_letters::Filter {
            since_ms: from_ms,
            table: Some(mapping.qualified()),
            reason: None,
            topics: Some(vec![topic.clone()]),
        },
    )?;
    let ids: HashMap<&str, usize> = findings
        .iter()
        .enumerate()
        .map(|(i, f)| (f.id.as_str(), i))
        .collect();
    for letter in letters {
        let Some(id) = letter.key.as_ref().and_then(|k| mapping.doc_id(k).ok()) else {
            continue;
        };
        if let Some(&i) = ids.get(id.as_str()) {
            evidence[i].dead_letter = Some(letter.reason);
        }
    }
    info!(
        topic,
        scanned,
        findings = findings.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "audit: causes read from Kafka"
    );
    Ok(evidence)
}

/// Adds one change of a key to its evidence (changes come in their
/// partition's order).
fn note(e: &mut Evidence, doc_version: Option<u64>, version: u64, ms: i64, op: Operation) {
    let removed = matches!(
        op,
        Operation::Delete | Operation::Truncate | Operation::Resnapshot
    );
    if doc_version.is_none() && removed {
        // No document: what came before the row's removal is not what is
        // missing now.
        *e = Evidence {
            latest: Some((version, op)),
            ..Evidence::default()
        };
        return;
    }
    if doc_version.is_none_or(|v| version > v) {
        e.newer += 1;
        e.first_newer_ms = Some(e.first_newer_ms.map_or(ms, |t| t.min(ms)));
        e.last_newer_ms = Some(e.last_newer_ms.map_or(ms, |t| t.max(ms)));
    }
    if e.latest.is_none_or(|(v, _)| version > v) {
        e.latest = Some((version, op));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn finding(kind: Kind, doc: Option<Value>, row_time: Option<&str>) -> Finding {
        Finding {
            kind,
            id: "1".into(),
            key: json!({"id": 1}).as_object().cloned().unwrap_or_default(),
            row_time: row_time.map(str::to_owned),
            doc,
        }
    }

    fn seen(newer: u64, op: Operation, covered: bool) -> Evidence {
        Evidence {
            newer,
            first_newer_ms: (newer > 0).then_some(1_000),
            last_newer_ms: (newer > 0).then_some(2_000),
            latest: Some((10, op)),
            covered,
            dead_letter: None,
        }
    }

    #[test]
    fn the_cause_follows_what_kafka_holds() {
        let doc = json!({"version": 5, "commit_time": "2026-12-01T10:00:00Z", "hash": "a"});
        let stale = finding(Kind::Stale, Some(doc.clone()), Some("2026-12-01T11:00:00Z"));
        assert_eq!(
            judge(&stale, &seen(2, Operation::Update, true)).cause,
            Cause::LostInApply
        );
        let v = judge(&stale, &seen(2, Operation::Update, true));
        assert_eq!(
            (v.since_ms, v.window_ms),
            (Some(1_000), Some((1_000, 2_000)))
        );
        // Nothing newer in Kafka, though the row changed after the
        // document's commit, and Kafka reaches back that far.
        assert_eq!(
            judge(&stale, &seen(0, Operation::Update, true)).cause,
            Cause::LostInCapture
        );
        // ... but not when retention removed that part.
        assert_eq!(
            judge(&stale, &seen(0, Operation::Update, false)).cause,
            Cause::Unknown
        );
        let extra = finding(Kind::Extra, Some(doc.clone()), None);
        assert_eq!(
            judge(&extra, &seen(1, Operation::Delete, true)).cause,
            Cause::MissedDelete
        );
        assert_eq!(
            judge(&extra, &seen(0, Operation::Update, true)).cause,
            Cause::LostInCapture
        );
        let hand_made = finding(Kind::Extra, Some(json!({})), None);
        assert_eq!(
            judge(&hand_made, &seen(0, Operation::Update, true)).cause,
            Cause::ForeignWrite
        );
        let mut overwritten = doc.clone();
        overwritten["stored_hash"] = json!("b");
        let deep = finding(Kind::Stale, Some(overwritten), None);
        assert_eq!(
            judge(&deep, &seen(0, Operation::Update, true)).cause,
            Cause::ForeignWrite
        );
        let missing = finding(Kind::Missing, None, Some("2026-12-01T11:00:00Z"));
        assert_eq!(
            judge(&missing, &seen(0, Operation::Update, true)).cause,
            Cause::LostInCapture
        );
        assert_eq!(
            judge(&missing, &seen(1, Operation::Insert, true)).cause,
            Cause::LostInApply
        );
    }

    #[test]
    fn only_changes_past_the_documents_version_count() {
        let mut e = Evidence::default();
        note(&mut e, Some(5), 4, 100, Operation::Update);
        note(&mut e, Some(5), 5, 200, Operation::Update);
        assert_eq!(e.newer, 0);
        note(&mut e, Some(5), 7, 400, Operation::Update);
        note(&mut e, Some(5), 6, 300, Operation::Delete);
        assert_eq!(e.newer, 2);
        assert_eq!((e.first_newer_ms, e.last_newer_ms), (Some(300), Some(400)));
        assert_eq!(e.latest, Some((7, Operation::Update)));
        // A missing document: only what came after the row's last delete.
        let mut e = Evidence::default();
        note(&mut e, None, 3, 100, Operation::Insert);
        note(&mut e, None, 4, 200, Operation::Delete);
        note(&mut e, None, 6, 300, Operation::Insert);
        note(&mut e, None, 7, 400, Operation::Update);
        assert_eq!(e.newer, 2);
        assert_eq!((e.first_newer_ms, e.last_newer_ms), (Some(300), Some(400)));
    }
}
