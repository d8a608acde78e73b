//! Log mode: the window's last change of each key, taken from Kafka
//! itself (no PostgreSQL), written at its own commit version.

use crate::error::{Context, Result};
use std::time::Duration;

use rdkafka::Message;
use serde::Serialize;
use tidemark_index::apply::Outcome;
use tidemark_index::mapping::{TableMapping, Write};
use tidemark_schemas::{ChangeEvent, EventHead, Operation};
use tokio::sync::watch;

use super::retention::Shortfall;
use super::{
    CHUNK, CHUNK_BYTES, Job, SAMPLE, Start, apply_distinct, close_in_background, open_window,
};
use crate::merge::{Distinct, Entry, Sorter};

/// Log mode's view of a window: the last change of every key in it, and
/// which keys changed again after it. Held like the window's keys: sorted
/// by document id and spilled to disk past a few MB, so memory does not
/// grow with the window.
#[derive(Debug, Default)]
pub struct LogWindow {
    /// One entry per key changed in the window: `key` holds the record
    /// payload of its last change in the window (parsed again when
    /// applied), `hash` the (partition, offset) of a newer change after
    /// the window, if any (see [`newer_code`]).
    keys: Option<Distinct>,
    pub events: u64,
    pub truncates: u64,
    /// Partitions that no longer hold the window's start (`--allow-partial`).
    pub shortfalls: Vec<Shortfall>,
}

impl LogWindow {
    /// Keys changed in the window.
    pub fn len(&self) -> u64 {
        self.keys.as_ref().map_or(0, Distinct::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A (partition, offset) in an entry's `hash` field.
pub(crate) fn newer_code(partition: i32, offset: i64) -> u128 {
    ((partition as u32 as u128) << 64) | offset as u64 as u128
}

pub(crate) fn newer_decode(code: u128) -> (i32, i64) {
    ((code >> 64) as u32 as i32, code as u64 as i64)
}

/// The sort id of one sighting of a key: the document id, then its
/// partition and offset at fixed width, so a key's sightings sort together
/// and in commit order. NUL cannot occur in an id (PostgreSQL text cannot
/// hold it), so it separates unambiguously.
pub(crate) fn sighting_id(id: &str, partition: i32, offset: i64) -> String {
    format!("{id}\u{0}{partition:010}{offset:020}")
}

/// Folds the sorted sightings of every key into one entry per key changed
/// in the window (see [`LogWindow::keys`]).
pub(crate) fn fold_sightings(sightings: Sorter) -> Result<Distinct> {
    /// The key being folded: its id, last in-window payload, first newer change.
    struct Current {
        id: String,
        last: Option<String>,
        newer: Option<u128>,
    }
    fn flush(current: Option<Current>, out: &mut Sorter) -> std::io::Result<()> {
        match current {
            Some(Current {
                id,
                last: Some(payload),
                newer,
            }) => out.push(Entry {
                id,
                hash: newer,
                key: Some(payload),
            }),
            _ => Ok(()),
        }
    }
    let mut out = Sorter::default();
    let mut current: Option<Current> = None;
    let sorted = sightings
        .finish()
        .context("sorting the window's changes on disk")?;
    for sighting in sorted {
        let sighting = sighting.context("reading the window's changes back from disk")?;
        let Some((id, position)) = sighting.id.rsplit_once('\u{0}') else {
            continue;
        };
        if current.as_ref().is_none_or(|c| c.id != id) {
            flush(current.take(), &mut out).context("spilling the window's changes to disk")?;
            current = Some(Current {
                id: id.to_owned(),
                last: None,
                newer: None,
            });
        }
        let Some(current) = current.as_mut() else {
            continue;
        };
        match sighting.key {
            // A change inside the window: the latest so far.
            Some(payload) => {
                current.last = Some(payload);
                current.newer = None;
            }
            // A change after the window, after one inside it.
            None if current.last.is_some() && current.newer.is_none() => {
                let partition = position.get(..10).and_then(|p| p.parse().ok());
                let offset = position.get(10..).and_then(|o| o.parse().ok());
                if let (Some(partition), Some(offset)) = (partition, offset) {
                    current.newer = Some(newer_code(partition, offset));
                }
            }
            None => {}
        }
    }
    flush(current, &mut out).context("spilling the window's changes to disk")?;
    out.finish_distinct()
        .context("sorting the window's changes on disk")
}

/// Reads every partition of the table's topic from the window's start to
/// its end as of now. Proof that no newer change exists for a key is
/// having read its whole partition past the window without meeting one.
pub fn collect_log(
    kafka: &tidemark_schemas::config::Kafka,
    topic: &str,
    mapping: &TableMapping,
    start: Start,
    to_ms: i64,
    only: Option<&[Vec<u8>]>,
) -> Result<LogWindow> {
    let from_ms = start.from_ms;
    let (opened, shortfalls) = open_window(kafka, topic, mapping, start)?;
    let Some((consumer, mut open)) = opened else {
        return Ok(LogWindow {
            shortfalls,
            ..LogWindow::default()
        });
    };
    let mut found = LogWindow {
        shortfalls,
        ..LogWindow::default()
    };
    let mut sightings = Sorter::default();
    while !open.is_empty() {
        let Some(message) = consumer.poll(Duration::from_secs(1)) else {
            continue;
        };
        let message = message.with_context(|| topic.to_string())?;
        let (partition, offset) = (message.partition(), message.offset());
        let Some(&end) = open.get(&partition) else {
            continue;
        };
        if offset + 1 >= end {
            open.remove(&partition);
        }
        if let (Some(only), Some(key)) = (only, message.key())
            && !only.iter().any(|k| k.as_slice() == key)
        {
            continue;
        }
        let event = EventHead::from_slice(message.payload().unwrap_or_default())
            .with_context(|| format!("{topic} partition {partition} offset {offset}"))?;
        let Some(at) = tidemark_schemas::commit_time::unix_millis(&event.commit_time) else {
            continue;
        };
        if at < from_ms {
            continue;
        }
        if matches!(event.op, Operation::Truncate | Operation::Resnapshot) {
            if at <= to_ms {
                found.events += 1;
                found.truncates += 1;
            }
            continue;
        }
        let id = mapping
            .doc_id(&event.key)
            .with_context(|| format!("{topic} partition {partition} offset {offset}"))?;
        // Every sighting from the window's start on; the fold keeps each
        // key's last change inside the window and its first after it.
        let payload = if at <= to_ms {
            found.events += 1;
            let text = std::str::from_utf8(message.payload().unwrap_or_default())
                .with_context(|| format!("{topic} partition {partition} offset {offset}"))?;
            Some(text.to_owned())
        } else {
            None
        };
        sightings
            .push(Entry {
                id: sighting_id(&id, partition, offset),
                hash: None,
                key: payload,
            })
            .context("spilling the window's changes to disk")?;
    }
    close_in_background(consumer);
    found.keys = Some(fold_sightings(sightings)?);
    Ok(found)
}

/// Log mode: re-applies each key's last change in the window, with its own
/// commit LSN as version, for keys proven to have no newer change; refuses
/// the others (source mode handles them).
pub async fn run_log(
    job: &Job<'_>,
    mapping: &TableMapping,
    mappings: &tidemark_index::mapping::Mappings,
    found: &LogWindow,
) -> Result<LogResult> {
    let mut result = LogResult {
        table: mapping.qualified(),
        index: mapping.index.clone(),
        keys: found.len(),
        events: found.events,
        truncates: found.truncates,
        ..LogResult::default()
    };
    if job.write && !found.is_empty() {
        job.search
            .ensure_meta_fields(&mapping.qualified(), &mapping.index)
            .await;
    }
    let mut writes = Vec::with_capacity(CHUNK);
    let mut bytes = 0usize;
    let entries: Box<dyn Iterator<Item = std::io::Result<Entry>> + Send> = match &found.keys {
        Some(keys) => Box::new(
            keys.read()
                .context("reading the window's changes back from disk")?,
        ),
        None => Box::new(std::iter::empty()),
    };
    for entry in entries {
        let Entry { id, hash, key } =
            entry.context("reading the window's changes back from disk")?;
        let payload = key.unwrap_or_default();
        if let Some((partition, offset)) = hash.map(newer_decode) {
            result.refused += 1;
            if result.refused_sample.len() < SAMPLE {
                result.refused_sample.push(format!(
                    "{id} (newer change at partition {partition} offset {offset})"
                ));
            }
            continue;
        }
        let event = ChangeEvent::from_slice(payload.as_bytes())
            .with_context(|| format!("{}: document {id}", mapping.qualified()))?;
        let write = mappings.write(&event)?;

        result.to_apply += 1;
        if job.write {
            bytes += payload.len();
            writes.push(write);
        }
        if writes.len() == CHUNK || bytes >= CHUNK_BYTES {
            apply_log_chunk(job, mapping, std::mem::take(&mut writes), &mut result).await?;
            bytes = 0;
        }
    }
    apply_log_chunk(job, mapping, writes, &mut result).await?;
    Ok(result)
}

/// Applies one chunk of log mode's writes and counts the outcomes.
pub(crate) async fn apply_log_chunk(
    job: &Job<'_>,
    mapping: &TableMapping,
    writes: Vec<Write>,
    result: &mut LogResult,
) -> Result<()> {
    if writes.is_empty() {
        return Ok(());
    }
    let (_keep, never) = watch::channel(false);
    let outcomes = apply_distinct(job.applier, writes, &never)
        .await
        .with_context(|| mapping.qualified())?;
    for outcome in outcomes {
        match outcome {
            Outcome::Applied(_) | Outcome::Superseded => result.applied += 1,
            Outcome::Stale => result.newer_in_index += 1,
            Outcome::Rejected(_) => result.rejected += 1,
        }
    }
    Ok(())
}

/// What log mode did (or would do) in one table.
#[derive(Debug, Default, Serialize)]
pub struct LogResult {
    pub table: String,
    pub index: String,
    pub keys: u64,
    pub events: u64,
    pub truncates: u64,
    /// Keys whose last window change would be (or was) re-applied.
    pub to_apply: u64,
    /// Keys refused: a newer change exists after the window.
    pub refused: u64,
    pub refused_sample: Vec<String>,
    pub applied: u64,
    pub newer_in_index: u64,
    pub rejected: u64,
}

pub fn render_log_text(results: &[LogResult], write: bool) -> String {
    let mut out = String::new();
    for r in results {
        out.push_str(&format!(
            "{} -> {} (log mode): {} changes of {} keys in the window; {} {}re-applied, {} refused (changed again after the window; use source mode)\n",
            r.table,
            r.index,
            r.events,
            r.keys,
            r.to_apply,
            if write { "" } else { "would be " },
            r.refused
        ));
        for refused in &r.refused_sample {
            out.push_str(&format!("    refused: {refused}\n"));
        }
        if write {
            out.push_str(&format!(
                "  {} applied, {} kept a newer version, {} refused by OpenSearch\n",
                r.applied, r.newer_in_index, r.rejected
            ));
        }
    }
    out
}
