//! Which keys a window touches: each chosen table topic scanned from
//! `offsets_for_times(from - 60 s)` to its end as of the start, the
//! distinct keys (sorted on disk) handed out in chunks.

use crate::error::{Context, ReplayError, Result};
use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tidemark_index::mapping::TableMapping;
use tidemark_schemas::{EventHead, Operation, Row, Source, record_key};
use tracing::info;

use super::CHUNK;
use super::retention::{self, Shortfall};
use crate::merge::{Distinct, Entry, Sorter};

pub(crate) const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);

/// A consumer that reads topics on its own assignment and commits nothing
/// (window and history scans).
pub(crate) fn scanner_config(kafka: &tidemark_schemas::config::Kafka, group: &str) -> ClientConfig {
    let mut config = tidemark_kafka::client_config(kafka, group);
    config
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("queued.max.messages.kbytes", SCAN_PREFETCH_KBYTES)
        // Once a partition's prefetch is full, librdkafka waits this long
        // before fetching it again (default 1 s): a scan reads faster than
        // that, so it stalled ~1 s per refill (200,000 records: 1.25-1.3 s
        // for 0.45 CPU-s).
        .set("fetch.queue.backoff.ms", SCAN_REFILL_MS);
    config
}

/// The keys a window touched in one table: distinct, sorted by document
/// id, and spilled to a temporary file past a few MB (the same external
/// sort as the audit's), so a window of any size is held in bounded
/// memory.
#[derive(Debug, Default)]
pub struct WindowKeys {
    /// `None` until a key is found.
    keys: Option<Distinct>,
    /// Changes in the window.
    pub events: u64,
    /// Truncates in the window (not repairable by key; audit the table).
    pub truncates: u64,
    /// Partitions that no longer hold the window's start (`--allow-partial`).
    pub shortfalls: Vec<Shortfall>,
}

/// Keys gathered one at a time (a backfill's, read by cursor), sorted by
/// document id and made distinct, spilled to disk past the sort's memory
/// budget: a table of any size.
#[derive(Default)]
pub struct KeySet {
    sorter: Sorter,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field("count", &self.sorter.count())
            .finish()
    }
}

impl KeySet {
    pub fn push(&mut self, id: String, key: &Row) -> Result<()> {
        self.sorter
            .push(key_entry(id, key)?)
            .context("spilling the window's keys to disk")?;
        Ok(())
    }

    /// Keys pushed so far (duplicates included).
    pub fn count(&self) -> u64 {
        self.sorter.count()
    }

    pub fn finish(self) -> Result<WindowKeys> {
        Ok(WindowKeys {
            keys: Some(
                self.sorter
                    .finish_distinct()
                    .context("sorting the window's keys on disk")?,
            ),
            ..WindowKeys::default()
        })
    }
}

impl WindowKeys {
    /// The given (document id, key) pairs (e.g. drift an audit found).
    pub fn from_keys<'a>(keys: impl IntoIterator<Item = &'a (String, Row)>) -> Result<WindowKeys> {
        let mut set = KeySet::default();
        for (id, key) in keys {
            set.push(id.clone(), key)?;
        }
        set.finish()
    }

    /// Distinct keys.
    pub fn len(&self) -> u64 {
        self.keys.as_ref().map_or(0, Distinct::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The keys in document id order, in chunks growing to `CHUNK`.
    pub(crate) fn chunks(&self) -> Result<KeyChunks> {
        let entries: Box<dyn Iterator<Item = std::io::Result<Entry>> + Send> = match &self.keys {
            Some(keys) => Box::new(
                keys.read()
                    .context("reading the window's keys back from disk")?,
            ),
            None => Box::new(std::iter::empty()),
        };
        Ok(KeyChunks {
            entries,
            size: FIRST_CHUNK,
            cap: CHUNK,
        })
    }
}

/// A key as a sort entry: its document id, and the key as JSON.
pub(crate) fn key_entry(id: String, key: &Row) -> Result<Entry> {
    Ok(Entry {
        id,
        hash: None,
        key: Some(serde_json::to_string(key).context("encoding a key for the spill file")?),
    })
}

/// Reads sorted key entries back, a chunk at a time.
pub(crate) struct KeyChunks {
    entries: Box<dyn Iterator<Item = std::io::Result<Entry>> + Send>,
    /// Size of the next chunk: starts at `FIRST_CHUNK`, doubles to `CHUNK`.
    size: usize,
    /// No chunk is larger (see [`keys_per_chunk`]).
    pub(crate) cap: usize,
}

/// The first chunk is read and classified before anything can be written
/// beside it; a small one gets the writes going sooner, and each chunk
/// after it is planned while the one before (half its size) is written.
pub(crate) const FIRST_CHUNK: usize = CHUNK / 8;

impl KeyChunks {
    /// The next chunk of (document id, key) pairs; empty at the end.
    pub(crate) fn next_chunk(&mut self) -> Result<Vec<(String, Row)>> {
        let size = self.size.min(self.cap);
        self.size = (self.size * 2).min(CHUNK);
        let mut chunk = Vec::with_capacity(size);
        for entry in self.entries.by_ref().take(size) {
            let entry = entry.context("reading the window's keys back from disk")?;
            let key: Row = serde_json::from_str(entry.key.as_deref().unwrap_or("{}"))
                .with_context(|| format!("document {}: its key did not read back", entry.id))?;
            chunk.push((entry.id, key));
        }
        Ok(chunk)
    }
}

/// Records librdkafka may fetch ahead of the reader, in KiB. Its default
/// (64 MiB) was most of a window's memory; a topic scan reads records
/// faster than it parses them, so a small read-ahead costs no speed.
pub(crate) const SCAN_PREFETCH_KBYTES: &str = "32768";

/// How soon a scan fetches again once it has read into a full prefetch.
pub(crate) const SCAN_REFILL_MS: &str = "5";

/// A scanner (see [`scanner_config`]) and the partition count of `topic`
/// (0: no such topic); an error says Kafka cannot be reached.
pub(crate) fn open_scanner(
    kafka: &tidemark_schemas::config::Kafka,
    topic: &str,
    group: &str,
) -> Result<(BaseConsumer, i32)> {
    let consumer: BaseConsumer = scanner_config(kafka, group)
        .create()
        .with_context(|| format!("topic {topic}: cannot create a Kafka client"))?;
    let metadata = consumer
        .fetch_metadata(Some(topic), KAFKA_TIMEOUT)
        .with_context(|| {
            format!(
                "cannot reach Kafka at {}. Check kafka.brokers",
                kafka.brokers
            )
        })?;

    let partitions = metadata
        .topics()
        .first()
        .map(|t| t.partitions().len())
        .unwrap_or(0) as i32;
    Ok((consumer, partitions))
}

/// A scanner assigned to a window's partitions, with each partition's end
/// (exclusive).
pub(crate) type Opened = (BaseConsumer, HashMap<i32, i64>);

/// A window's start: `--from`, and whether a start Kafka no longer holds
/// is accepted (`--allow-partial`; see `retention`).
#[derive(Debug, Clone, Copy)]
pub struct Start {
    pub from_ms: i64,
    pub allow_partial: bool,
}

/// A consumer assigned to every partition of `topic` from
/// `offsets_for_times(from - 60 s)` (Kafka timestamps are commit times but
/// not strictly monotonic), with each partition's end (exclusive) as of now;
/// `None` when no partition has anything from then on. A window that starts
/// before what Kafka still holds is refused (see `retention`) unless
/// partial windows are allowed; the partitions that fall short are
/// returned either way.
pub(crate) fn open_window(
    kafka: &tidemark_schemas::config::Kafka,
    topic: &str,
    mapping: &TableMapping,
    start: Start,
) -> Result<(Option<Opened>, Vec<Shortfall>)> {
    let from_ms = start.from_ms;
    let (consumer, partitions) = open_scanner(kafka, topic, "tidemark-replay-window")?;
    if partitions == 0 {
        return Err(ReplayError::Refused(format!(
            "topic {topic} does not exist: has the producer run for {}?",
            mapping.qualified()
        )));
    }
    let mut query = TopicPartitionList::new();
    for p in 0..partitions {
        query
            .add_partition_offset(topic, p, Offset::Offset(from_ms - 60_000))
            .with_context(|| format!("{topic} partition {p}: cannot ask for an offset by time"))?;
    }
    tracing::debug!(topic, partitions, "window: topic metadata read");
    let starts = consumer
        .offsets_for_times(query, KAFKA_TIMEOUT)
        .with_context(|| format!("topic {topic}: cannot find the window's first offsets"))?;
    let mut assignment = TopicPartitionList::new();
    let mut open: HashMap<i32, i64> = HashMap::new();
    let mut held = Vec::new();
    for p in 0..partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, KAFKA_TIMEOUT)
            .with_context(|| format!("{topic} partition {p}: cannot read offsets"))?;
        let first = match starts.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => Some(o),
            _ => None,
        };
        held.push((p, low, high, first));
        let start = first.map_or(high, |o| o.max(low));
        if start < high {
            assignment
                .add_partition_offset(topic, p, Offset::Offset(start))
                .with_context(|| format!("{topic} partition {p} offset {start}: cannot assign"))?;
            open.insert(p, high);
        }
    }
    tracing::debug!(topic, "window: start offsets and ends known");
    let shortfalls = retention::check(&consumer, kafka, topic, &held, from_ms)?;
    if !shortfalls.is_empty() {
        if !start.allow_partial {
            return Err(ReplayError::Refused(retention::refusal(
                &mapping.qualified(),
                &shortfalls,
            )));
        }
        for s in &shortfalls {
            tracing::warn!(
                topic,
                partition = s.partition,
                oldest_offset = s.oldest_offset,
                short_by_s = s.short_by_s,
                "window: Kafka no longer holds the window's start (--allow-partial)"
            );
        }
    }
    if open.is_empty() {
        return Ok((None, shortfalls));
    }
    consumer
        .assign(&assignment)
        .with_context(|| format!("topic {topic}: cannot assign the window's partitions"))?;
    Ok((Some((consumer, open)), shortfalls))
}

/// Closing a librdkafka client waits for its threads; nothing waits on a
/// scanner's close, so it happens beside the rest of the command.
pub(crate) fn close_in_background(consumer: BaseConsumer) {
    std::thread::spawn(move || drop(consumer));
}

/// Reads the table's topic and collects the keys changed in the window.
/// `only` narrows to these keys' record keys.
pub fn collect_keys(
    kafka: &tidemark_schemas::config::Kafka,
    topic: &str,
    mapping: &TableMapping,
    start: Start,
    to_ms: i64,
    only: Option<&[Vec<u8>]>,
) -> Result<WindowKeys> {
    let from_ms = start.from_ms;
    let (opened, shortfalls) = open_window(kafka, topic, mapping, start)?;
    let Some((consumer, mut open)) = opened else {
        return Ok(WindowKeys {
            shortfalls,
            ..WindowKeys::default()
        });
    };
    let mut found = WindowKeys {
        shortfalls,
        ..WindowKeys::default()
    };
    let mut keys = Sorter::default();
    let started = Instant::now();
    let mut last_report = Instant::now();
    let mut scanned = 0u64;
    while !open.is_empty() {
        let Some(message) = consumer.poll(Duration::from_secs(1)) else {
            continue;
        };
        let message = message.with_context(|| topic.to_string())?;
        let partition = message.partition();
        let offset = message.offset();
        scanned += 1;
        if last_report.elapsed() >= Duration::from_secs(10) {
            last_report = Instant::now();
            info!(topic, scanned, "reading the window");
        }
        let Some(&end) = open.get(&partition) else {
            continue;
        };
        let past_window = message
            .timestamp()
            .to_millis()
            .is_some_and(|t| t > to_ms + 60_000);
        if offset + 1 >= end || past_window {
            open.remove(&partition);
            let _ = consumer.incremental_unassign(&{
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition(topic, partition);
                tpl
            });
            if past_window {
                continue;
            }
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
        if at < from_ms || at > to_ms {
            continue;
        }
        found.events += 1;
        if matches!(event.op, Operation::Truncate | Operation::Resnapshot) {
            found.truncates += 1;
            continue;
        }
        let id = mapping
            .doc_id(&event.key)
            .with_context(|| format!("{topic} partition {partition} offset {offset}"))?;
        keys.push(key_entry(id, &event.key)?)
            .context("spilling the window's keys to disk")?;
    }
    close_in_background(consumer);
    found.keys = Some(
        keys.finish_distinct()
            .context("sorting the window's keys on disk")?,
    );

    info!(
        topic,
        scanned,
        keys = found.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "window: keys collected"
    );
    Ok(found)
}

/// The record key of a table row (to narrow a window to `--key`s).
pub fn record_key_of(mapping: &TableMapping, key: &Row) -> Vec<u8> {
    let source = Source {
        database: String::new(),
        schema: mapping.schema.clone(),
        table: mapping.table.clone(),
    };
    record_key(&source, key)
}
