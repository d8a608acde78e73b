//! A row's change history: every change of one key found in Kafka, oldest
//! first, each with a field-level diff from the state before it.
//!
//! Only the partition the key hashes to is read (Kafka's murmur2, as the
//! producer partitions), from the beginning or from `--since` (via
//! `offsets_for_times`, started a minute early because Kafka timestamps are
//! not monotonic, then filtered on the envelope's commit time), to the
//! partition's end as it was when the command started. Memory holds the
//! matching changes only.

use crate::error::{Context, ReplayError, Result};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::Serialize;
use serde_json::{Value, json};
use tidemark_schemas::partition::partition_for;
use tidemark_schemas::{ChangeEvent, Operation, Row, Source, record_key};
use tracing::info;

const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);

/// One field's change.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldChange {
    pub field: String,
    /// Absent: the field did not exist before (or the row did not).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub before: Option<Value>,
    /// Absent: the field is gone (row deleted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<Value>,
    /// The update did not send this (unchanged TOAST) value.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unchanged_not_sent: bool,
}

/// One change of the row.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub partition: i32,
    pub offset: i64,
    pub op: Operation,
    pub commit_time: String,
    pub commit_lsn: String,
    pub lsn: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xid: Option<u32>,
    pub changes: Vec<FieldChange>,
}

/// Follows a row's state through its events and says what each changed.
#[derive(Debug, Default)]
pub struct Differ {
    state: Option<Row>,
    /// The version of the last change of the row (a resnapshot removes the
    /// row only if its snapshot did not rewrite it, i.e. if this is older).
    last: Option<tidemark_schemas::Version>,
}

impl Differ {
    /// The field changes `event` makes to the current state, and the new state.
    pub fn step(&mut self, event: &ChangeEvent) -> Vec<FieldChange> {
        let version = event.version().ok();
        if event.op == Operation::Resnapshot {
            let rewritten = self.last.is_some() && self.last >= version;
            if rewritten || self.state.is_none() {
                return Vec::new();
            }
        }
        self.last = version;
        let before = self.state.take();
        let mut changes = Vec::new();
        match event.op {
            Operation::Delete | Operation::Truncate | Operation::Resnapshot => {
                for (field, value) in before.iter().flatten() {
                    changes.push(FieldChange {
                        field: field.clone(),
                        before: Some(value.clone()),
                        after: None,
                        unchanged_not_sent: false,
                    });
                }
            }
            Operation::Snapshot | Operation::Insert | Operation::Update => {
                let mut after = event.after.clone().unwrap_or_default();
                for field in &event.unchanged_toast {
                    let old = before.as_ref().and_then(|b| b.get(field)).cloned();
                    if let Some(old) = &old {
                        after.insert(field.clone(), old.clone());
                    }
                    changes.push(FieldChange {
                        field: field.clone(),
                        before: old.clone(),
                        after: old,
                        unchanged_not_sent: true,
                    });
                }
                for (field, value) in &after {
                    if event.unchanged_toast.contains(field) {
                        continue;
                    }
                    let old = before.as_ref().and_then(|b| b.get(field));
                    if old != Some(value) {
                        changes.push(FieldChange {
                            field: field.clone(),
                            before: old.cloned(),
                            after: Some(value.clone()),
                            unchanged_not_sent: false,
                        });
                    }
                }
                for (field, value) in before.iter().flatten() {
                    if !after.contains_key(field) {
                        changes.push(FieldChange {
                            field: field.clone(),
                            before: Some(value.clone()),
                            after: None,
                            unchanged_not_sent: false,
                        });
                    }
                }
                changes.sort_by(|a, b| a.field.cmp(&b.field));
                self.state = Some(after);
            }
        }
        changes
    }
}

/// What `history` found.
#[derive(Debug, Serialize)]
pub struct History {
    pub table: String,
    pub key: Row,
    pub topic: String,
    pub partition: i32,
    /// Records read from the partition.
    pub scanned: u64,
    pub steps: Vec<Step>,
}

/// Reads the key's partition and collects its changes.
pub fn read_history(
    kafka: &tidemark_schemas::config::Kafka,
    topic: &str,
    source: &Source,
    key: &Row,
    since_ms: Option<i64>,
) -> Result<History> {
    let (consumer, partitions) =
        crate::window::open_scanner(kafka, topic, "tidemark-replay-history")?;
    if partitions == 0 {
        return Err(ReplayError::Refused(format!(
            "topic {topic} does not exist: is {} a captured table, and has the producer run?",
            source.qualified()
        )));
    }
    let record_key = record_key(source, key);
    // A truncate reaches every partition with the table-only key.
    let truncate_key = record_key_of_table(source);
    let partition = partition_for(&record_key, partitions);
    let (low, high) = consumer
        .fetch_watermarks(topic, partition, KAFKA_TIMEOUT)
        .with_context(|| format!("{topic} partition {partition}: cannot read offsets"))?;
    let mut first = low;
    if let Some(since) = since_ms {
        let mut query = TopicPartitionList::new();
        // Kafka timestamps are not monotonic: start a minute early.
        query
            .add_partition_offset(topic, partition, Offset::Offset(since - 60_000))
            .with_context(|| {
                format!("{topic} partition {partition}: cannot ask for an offset by time")
            })?;
        let found = consumer
            .offsets_for_times(query, KAFKA_TIMEOUT)
            .with_context(|| {
                format!("{topic} partition {partition}: cannot find the offset of --since")
            })?;
        if let Some(element) = found.find_partition(topic, partition) {
            match element.offset() {
                Offset::Offset(o) => first = o.max(low),
                Offset::End => first = high,
                _ => {}
            }
        }
    }
    let mut history = History {
        table: source.qualified(),
        key: key.clone(),
        topic: topic.to_owned(),
        partition,
        scanned: 0,
        steps: Vec::new(),
    };
    if first >= high {
        return Ok(history);
    }
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, partition, Offset::Offset(first))
        .with_context(|| format!("{topic} partition {partition} offset {first}: cannot assign"))?;
    consumer
        .assign(&assignment)
        .with_context(|| format!("{topic} partition {partition}: cannot assign it"))?;

    let total = (high - first) as u64;
    let terminal = std::io::stderr().is_terminal();
    let mut last_report = Instant::now();
    let mut differ = Differ::default();
    let mut position = first;
    while position < high {
        let Some(message) = consumer.poll(Duration::from_secs(1)) else {
            continue;
        };
        let message = message
            .with_context(|| format!("{topic} partition {partition} after offset {position}"))?;
        position = message.offset() + 1;
        history.scanned += 1;
        if last_report.elapsed() >= Duration::from_secs(if terminal { 1 } else { 10 }) {
            last_report = Instant::now();
            if terminal {
                eprint!(
                    "\rscanned {} of {total} records of {topic} partition {partition}",
                    history.scanned
                );
            } else {
                info!(
                    topic,
                    partition,
                    scanned = history.scanned,
                    total,
                    "reading history"
                );
            }
        }
        let Some(message_key) = message.key() else {
            continue;
        };
        if message_key != record_key.as_slice() && message_key != truncate_key.as_slice() {
            continue;
        }
        let payload = message.payload().unwrap_or_default();
        let event = ChangeEvent::from_slice(payload).with_context(|| {
            format!("{topic} partition {partition} offset {}", message.offset())
        })?;
        if let Some(since) = since_ms
            && commit_ms(&event).is_some_and(|t| t < since)
        {
            // Keep the state, so the first shown diff is right.
            differ.step(&event);
            continue;
        }
        let changes = differ.step(&event);
        history.steps.push(Step {
            partition,
            offset: message.offset(),
            op: event.op,
            commit_time: event.commit_time.clone(),
            commit_lsn: event.commit_lsn.to_string(),
            lsn: event.lsn.to_string(),
            xid: event.xid,
            changes,
        });
    }
    if terminal && history.scanned > 0 {
        eprintln!();
    }
    Ok(history)
}

fn record_key_of_table(source: &Source) -> Vec<u8> {
    record_key(source, &Row::new())
}

fn commit_ms(event: &ChangeEvent) -> Option<i64> {
    tidemark_schemas::commit_time::unix_millis(&event.commit_time)
}

/// The text report: one block per change, a line per changed field.
/// Values longer than this many characters are cut in the text output
/// (a TOAST value can be megabytes), unless `full`.
pub const SHOWN_CHARS: usize = 200;

/// A value as the text output shows it: cut after [`SHOWN_CHARS`]
/// characters with its full length said, unless `full`.
fn shown(value: &Option<Value>, full: bool) -> String {
    let Some(value) = value else {
        return "(none)".to_owned();
    };
    let text = value.to_string();
    let length = text.chars().count();
    if full || length <= SHOWN_CHARS {
        return text;
    }
    let cut: String = text.chars().take(SHOWN_CHARS).collect();
    format!("{cut}... ({length} characters; --full shows all)")
}

/// The text report; values over [`SHOWN_CHARS`] are cut unless `full`.
pub fn render_text(history: &History, full: bool) -> String {
    let mut out = format!(
        "{} key {}: {} change{} in {} partition {} ({} records read)\n",
        history.table,
        Value::Object(history.key.clone()),
        history.steps.len(),
        if history.steps.len() == 1 { "" } else { "s" },
        history.topic,
        history.partition,
        history.scanned
    );
    for step in &history.steps {
        out.push_str(&format!(
            "\n{}  {:<8}  lsn {}  xid {}  offset {}\n",
            step.commit_time,
            step.op.as_str(),
            step.commit_lsn,
            step.xid.map_or("-".to_owned(), |x| x.to_string()),
            step.offset
        ));
        match step.op {
            Operation::Delete => out.push_str("    row deleted\n"),
            Operation::Truncate => out.push_str("    table truncated: row removed\n"),
            Operation::Resnapshot if step.changes.is_empty() => {
                out.push_str("    new snapshot over a gap in the history: row kept\n")
            }
            Operation::Resnapshot => out.push_str(
                "    new snapshot over a gap in the history: the row was gone (deleted during the gap), removed\n",
            ),
            _ => {}
        }
        if matches!(
            step.op,
            Operation::Delete | Operation::Truncate | Operation::Resnapshot
        ) {
            continue;
        }
        for change in &step.changes {
            let show = |v: &Option<Value>| shown(v, full);
            if change.unchanged_not_sent {
                out.push_str(&format!(
                    "    = {}: unchanged (large value, not sent)\n",
                    change.field
                ));
            } else if change.before.is_none() {
                out.push_str(&format!(
                    "    + {}: {}\n",
                    change.field,
                    show(&change.after)
                ));
            } else if change.after.is_none() {
                out.push_str(&format!(
                    "    - {}: {}\n",
                    change.field,
                    show(&change.before)
                ));
            } else {
                out.push_str(&format!(
                    "    ~ {}: {} -> {}\n",
                    change.field,
                    show(&change.before),
                    show(&change.after)
                ));
            }
        }
    }
    out
}

/// The JSON report.
pub fn render_json(history: &History) -> Value {
    json!(history)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_values_are_cut_with_their_length_unless_full() {
        let long = Some(Value::String("x".repeat(1_000_000)));
        let text = shown(&long, false);
        assert!(text.chars().count() < SHOWN_CHARS + 60, "{}", text.len());
        assert!(
            text.ends_with("... (1000002 characters; --full shows all)"),
            "{}",
            &text[190..]
        );
        assert_eq!(shown(&long, true).len(), 1_000_002);
        let short = Some(Value::String("héllo".into()));
        assert_eq!(shown(&short, false), "\"héllo\"");
        assert_eq!(shown(&None, false), "(none)");
    }
    use tidemark_schemas::{FORMAT_VERSION, Lsn};

    fn event(op: Operation, after: Option<Value>, toast: &[&str]) -> ChangeEvent {
        ChangeEvent {
            format: FORMAT_VERSION,
            source: Source {
                database: "db".into(),
                schema: "public".into(),
                table: "articles".into(),
            },
            op,
            key: json!({"id": 3}).as_object().cloned().unwrap_or_default(),
            before: None,
            after: after.and_then(|a| a.as_object().cloned()),
            unchanged_toast: toast.iter().map(|s| s.to_string()).collect(),
            commit_lsn: Lsn(100),
            timeline: 1,
            lsn: Lsn(90),
            xid: Some(7),
            commit_time: "2026-11-22T10:00:00.000000Z".into(),
        }
    }

    #[test]
    fn diffs_follow_the_row() {
        let mut d = Differ::default();
        let created = d.step(&event(
            Operation::Insert,
            Some(json!({"id": 3, "hidden": false, "body": "long"})),
            &[],
        ));
        assert_eq!(created.len(), 3);
        assert!(created.iter().all(|c| c.before.is_none()));
        let hidden = d.step(&event(
            Operation::Update,
            Some(json!({"id": 3, "hidden": true})),
            &["body"],
        ));
        assert_eq!(
            hidden,
            vec![
                FieldChange {
                    field: "body".into(),
                    before: Some(json!("long")),
                    after: Some(json!("long")),
                    unchanged_not_sent: true
                },
                FieldChange {
                    field: "hidden".into(),
                    before: Some(json!(false)),
                    after: Some(json!(true)),
                    unchanged_not_sent: false
                },
            ]
        );
        let deleted = d.step(&event(Operation::Delete, None, &[]));
        assert_eq!(deleted.len(), 3, "every field removed: {deleted:?}");
        assert!(deleted.iter().all(|c| c.after.is_none()));
        // The body carried through the TOAST update is part of the state.
        assert!(
            deleted
                .iter()
                .any(|c| c.field == "body" && c.before == Some(json!("long")))
        );
    }
}
