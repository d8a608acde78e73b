//! `window`: repair a time window after an incident ("updates between 10:00
//! and 14:00 never reached search; put them back"), in source mode.
//!
//! 1. **Which rows.** Every partition of each chosen table topic is read from
//!    `offsets_for_times(from - 60 s)` (Kafka timestamps are commit times but
//!    not strictly monotonic) until its end as of the start, or until
//!    records are more than 60 s past `to`; a change counts when its
//!    envelope's commit time lies in `[from, to]`. The distinct keys (and
//!    `--key` narrows them) are what gets repaired.
//! 2. **Read the truth.** A temporary replication slot exports a snapshot
//!    whose LSN `V` is exact; the keys' rows are read at that snapshot in
//!    chunks.
//! 3. **Write through the consumer's apply path** with version `V`: a row
//!    becomes its document, a key without a row a versioned delete. Anything
//!    the index has that is newer than `V` wins (version conflict), so
//!    nothing regresses; a delete committed after `V` has a higher LSN, so
//!    it wins too, while its tombstone lives.
//! 4. **Close the race** the tombstone cannot (`index.gc_deletes`): once a
//!    chunk's writes landed, its written keys are read again, and every one
//!    whose row vanished since `V` is deleted again at version `V + 1`
//!    (see [`recheck_written`] for why that version is right). This runs
//!    beside the writes of the next chunks, so only the last chunk's
//!    re-check is left when the writes end. A row that merely *changed* after `V`
//!    needs nothing: its change carries a commit LSN above `V` through the live pipeline,
//!    which wins over our write in whichever order the two land. Only a
//!    delete can lose that race, once its tombstone is forgotten.
//!
//! A dry run (the default without `--yes`) writes nothing and classifies
//! each key against the index: create, update, delete, or already right.
//! A real run skips the keys already right and takes the other classes
//! from OpenSearch's answers to its writes (see [`plan`]).

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde::Serialize;
use serde_json::Value;
use tidemark_index::apply::{Applier, Effect, Outcome};
use tidemark_index::mapping::{TableMapping, Write, content_hash};
use tidemark_index::search::Search;
use tidemark_schemas::{ChangeEvent, EventHead, Operation, Row, Source, Version, record_key};
use tokio::sync::watch;
use tokio_postgres::Client;
use tracing::info;

use crate::audit::{
    Described, describe, doc_meta, doc_meta_searched, keys_without_rows, refresh, rows_by_keys,
    sample_row_bytes,
};
use crate::merge::{Distinct, Entry, Sorter};

const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);
/// Keys read and written per round trip, at most.
const CHUNK: usize = 10_000;
/// Row text one chunk may hold, at most: chunks are cut at `CHUNK` keys or
/// at this many bytes of rows, whichever comes first, so wide rows do not
/// make a chunk (up to three are alive at once, each as row text, mapped
/// values and a bulk body) take hundreds of MB. 8 MiB is also a good bulk
/// request size for OpenSearch.
const CHUNK_BYTES: usize = 8 << 20;
/// Even the widest rows go at least this many to a chunk.
const MIN_CHUNK: usize = 8;

/// Keys per chunk for rows of about `row_bytes` each.
fn keys_per_chunk(row_bytes: usize) -> usize {
    (CHUNK_BYTES / row_bytes.max(1)).clamp(MIN_CHUNK, CHUNK)
}
/// Below this many writes per request, splitting a chunk in two costs more
/// round trips than it gains.
const MIN_CONCURRENT_BULK: usize = 500;
/// Keys listed per class in a report.
const SAMPLE: usize = 10;

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
}

impl WindowKeys {
    /// The given (document id, key) pairs (e.g. drift an audit found).
    pub fn from_keys<'a>(
        keys: impl IntoIterator<Item = &'a (String, Row)>,
    ) -> anyhow::Result<WindowKeys> {
        let mut sorter = Sorter::default();
        for (id, key) in keys {
            sorter.push(key_entry(id.clone(), key)?)?;
        }
        Ok(WindowKeys {
            keys: Some(sorter.finish_distinct()?),
            ..WindowKeys::default()
        })
    }

    /// Distinct keys.
    pub fn len(&self) -> u64 {
        self.keys.as_ref().map_or(0, Distinct::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The keys in document id order, in chunks growing to `CHUNK`.
    fn chunks(&self) -> anyhow::Result<KeyChunks> {
        let entries: Box<dyn Iterator<Item = std::io::Result<Entry>> + Send> = match &self.keys {
            Some(keys) => Box::new(keys.read()?),
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
fn key_entry(id: String, key: &Row) -> anyhow::Result<Entry> {
    Ok(Entry {
        id,
        hash: None,
        key: Some(serde_json::to_string(key)?),
    })
}

/// Reads sorted key entries back, a chunk at a time.
struct KeyChunks {
    entries: Box<dyn Iterator<Item = std::io::Result<Entry>> + Send>,
    /// Size of the next chunk: starts at `FIRST_CHUNK`, doubles to `CHUNK`.
    size: usize,
    /// No chunk is larger (see [`keys_per_chunk`]).
    cap: usize,
}

/// The first chunk is read and classified before anything can be written
/// beside it; a small one gets the writes going sooner, and each chunk
/// after it is planned while the one before (half its size) is written.
const FIRST_CHUNK: usize = CHUNK / 8;

impl KeyChunks {
    /// The next chunk of (document id, key) pairs; empty at the end.
    fn next_chunk(&mut self) -> anyhow::Result<Vec<(String, Row)>> {
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
const SCAN_PREFETCH_KBYTES: &str = "32768";

/// How soon a scan fetches again once it has read into a full prefetch.
const SCAN_REFILL_MS: &str = "5";

/// A consumer that reads topics on its own assignment and commits nothing
/// (window and history scans).
pub(crate) fn scanner_config(brokers: &str, group: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
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

/// A scanner (see [`scanner_config`]) and the partition count of `topic`
/// (0: no such topic); an error says Kafka cannot be reached.
pub(crate) fn open_scanner(
    brokers: &str,
    topic: &str,
    group: &str,
) -> anyhow::Result<(BaseConsumer, i32)> {
    let consumer: BaseConsumer = scanner_config(brokers, group).create()?;
    let metadata = consumer
        .fetch_metadata(Some(topic), KAFKA_TIMEOUT)
        .map_err(|e| {
            anyhow::anyhow!("cannot reach Kafka at {brokers}: {e}. Check kafka.brokers")
        })?;
    let partitions = metadata
        .topics()
        .first()
        .map(|t| t.partitions().len())
        .unwrap_or(0) as i32;
    Ok((consumer, partitions))
}

/// A consumer assigned to every partition of `topic` from
/// `offsets_for_times(from - 60 s)` (Kafka timestamps are commit times but
/// not strictly monotonic), with each partition's end (exclusive) as of now;
/// `None` when no partition has anything from then on.
fn open_window(
    brokers: &str,
    topic: &str,
    mapping: &TableMapping,
    from_ms: i64,
) -> anyhow::Result<Option<(BaseConsumer, HashMap<i32, i64>)>> {
    let (consumer, partitions) = open_scanner(brokers, topic, "tidemark-replay-window")?;
    if partitions == 0 {
        anyhow::bail!(
            "topic {topic} does not exist: has the producer run for {}?",
            mapping.qualified()
        );
    }
    let mut query = TopicPartitionList::new();
    for p in 0..partitions {
        query.add_partition_offset(topic, p, Offset::Offset(from_ms - 60_000))?;
    }
    tracing::debug!(topic, partitions, "window: topic metadata read");
    let starts = consumer.offsets_for_times(query, KAFKA_TIMEOUT)?;
    let mut assignment = TopicPartitionList::new();
    let mut open: HashMap<i32, i64> = HashMap::new();
    for p in 0..partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, KAFKA_TIMEOUT)?;
        let start = match starts.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o.max(low),
            _ => high,
        };
        if start < high {
            assignment.add_partition_offset(topic, p, Offset::Offset(start))?;
            open.insert(p, high);
        }
    }
    tracing::debug!(topic, "window: start offsets and ends known");
    if open.is_empty() {
        return Ok(None);
    }
    consumer.assign(&assignment)?;
    Ok(Some((consumer, open)))
}

/// Closing a librdkafka client waits for its threads; nothing waits on a
/// scanner's close, so it happens beside the rest of the command.
fn close_in_background(consumer: BaseConsumer) {
    std::thread::spawn(move || drop(consumer));
}

/// Reads the table's topic and collects the keys changed in the window.
/// `only` narrows to these keys' record keys.
pub fn collect_keys(
    brokers: &str,
    topic: &str,
    mapping: &TableMapping,
    from_ms: i64,
    to_ms: i64,
    only: Option<&[Vec<u8>]>,
) -> anyhow::Result<WindowKeys> {
    let Some((consumer, mut open)) = open_window(brokers, topic, mapping, from_ms)? else {
        return Ok(WindowKeys::default());
    };
    let mut found = WindowKeys::default();
    let mut keys = Sorter::default();
    let started = Instant::now();
    let mut last_report = Instant::now();
    let mut scanned = 0u64;
    while !open.is_empty() {
        let Some(message) = consumer.poll(Duration::from_secs(1)) else {
            continue;
        };
        let message = message.map_err(|e| anyhow::anyhow!("{topic}: {e}"))?;
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
            .map_err(|e| anyhow::anyhow!("{topic} partition {partition} offset {offset}: {e}"))?;
        let Some(at) = event
            .commit_time
            .parse::<jiff::Timestamp>()
            .ok()
            .map(|t| t.as_millisecond())
        else {
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
            .map_err(|e| anyhow::anyhow!("{topic} partition {partition} offset {offset}: {e}"))?;
        keys.push(key_entry(id, &event.key)?)?;
    }
    close_in_background(consumer);
    found.keys = Some(keys.finish_distinct()?);
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

/// What a key needs, or needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    Create,
    Update,
    Delete,
    AlreadyRight,
}

/// Per table: counts and sample keys per class, and what writing did.
#[derive(Debug, Default, Serialize)]
pub struct TableResult {
    pub table: String,
    pub index: String,
    pub keys: u64,
    pub events: u64,
    pub truncates: u64,
    pub counts: BTreeMap<Class, u64>,
    pub samples: BTreeMap<Class, Vec<String>>,
    /// Written (real run): applied (a delete of an absent document, which
    /// only records its version, is not counted: its key was already
    /// right), or refused because the index had newer, or rejected.
    pub applied: u64,
    pub newer_in_index: u64,
    pub rejected: u64,
    /// Keys whose row vanished between the read and the end, deleted again.
    pub deleted_after_recheck: u64,
    /// The snapshot LSN the documents were written with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version_lsn: Option<String>,
}

impl TableResult {
    /// Counts a key in its class, and keeps it as a sample of the class.
    fn count(&mut self, class: Class, id: &str) {
        *self.counts.entry(class).or_default() += 1;
        let sample = self.samples.entry(class).or_default();
        if sample.len() < SAMPLE {
            sample.push(id.to_owned());
        }
    }
}

/// Reads the keys' rows at `snapshot` (an exported snapshot name) and
/// returns per key: the write at `version`, and its class against the
/// index where that is known before writing.
///
/// A dry run classifies every key by looking its document up. A real run
/// (`write`) only looks for the documents already right (those whose hash
/// is the row's, a search that finds nothing to fetch in an incident) and
/// learns the other classes from what OpenSearch answers to the writes
/// (see [`class_of`]): the lookup of every document cost OpenSearch about
/// as much CPU as a tenth of the writes.
#[allow(clippy::too_many_arguments)]
async fn plan(
    client: &mut Client,
    snapshot: &str,
    d: &Described,
    mapping: &TableMapping,
    search: &Search,
    keys: &[(String, Row)],
    at: tidemark_postgres::Point,
    commit_time: &str,
    write: bool,
) -> anyhow::Result<Vec<(String, Write, Option<Class>)>> {
    let started = Instant::now();
    let version = Version::of_snapshot(at.timeline, at.lsn)?.get();
    let key_rows: Vec<&Row> = keys.iter().map(|(_, k)| k).collect();
    let ids: Vec<&str> = keys.iter().map(|(id, _)| id.as_str()).collect();
    let read = async {
        let tx = client.transaction().await?;
        tx.batch_execute(&format!(
            "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT '{}'",
            snapshot.replace('\'', "''")
        ))
        .await?;
        let rows = rows_by_keys(&tx, d, mapping, &key_rows).await?;
        tx.commit().await?;
        anyhow::Ok(rows)
    };
    // Documents as of the refresh at the start of the run (see `run_table`).
    let (mut rows, docs) = if write {
        let documents = documents(mapping, read.await?);
        let hashes: Vec<&str> = documents.values().map(|(_, hash)| hash.as_str()).collect();
        let docs = doc_meta_searched(search, &mapping.index, &ids, false, Some(&hashes)).await?;
        (documents, docs)
    } else {
        // The rows and the documents of the chunk are asked for at once.
        let lookup = doc_meta_searched(search, &mapping.index, &ids, false, None);
        let (rows, mut docs) = tokio::try_join!(read, lookup)?;
        // A key whose row is gone is deleted only if its document exists;
        // one written since the refresh (or after a failed refresh) is not
        // in the search's view, so those few keys are asked realtime.
        let unseen: Vec<&str> = ids
            .iter()
            .copied()
            .filter(|id| !rows.contains_key(*id) && !docs.contains_key(*id))
            .collect();
        if !unseen.is_empty() {
            docs.extend(doc_meta(search, &mapping.index, &unseen).await?);
        }
        (documents(mapping, rows), docs)
    };
    tracing::debug!(table = %mapping.qualified(), keys = keys.len(),
        read_and_lookup_ms = started.elapsed().as_millis() as u64, "window: chunk planned");
    let mut out = Vec::with_capacity(keys.len());
    for (id, key) in keys {
        let doc = docs.get(id.as_str());
        match rows.remove(id) {
            Some((fields, hash)) => {
                let right = doc.is_some_and(|meta| meta["hash"].as_str() == Some(hash.as_str()));
                let class = match doc {
                    _ if right => Some(Class::AlreadyRight),
                    _ if write => None,
                    None => Some(Class::Create),
                    Some(_) => Some(Class::Update),
                };
                out.push((
                    id.clone(),
                    Write::Index {
                        index: mapping.index.clone(),
                        id: id.clone(),
                        version,
                        fields,
                        missing: Vec::new(),
                        key: key.clone(),
                        lsn: at.lsn,
                        commit_time: commit_time.to_owned(),
                    },
                    class,
                ));
            }
            None => out.push((
                id.clone(),
                Write::Delete {
                    index: mapping.index.clone(),
                    id: id.clone(),
                    version,
                },
                match doc {
                    _ if write => None,
                    Some(_) => Some(Class::Delete),
                    None => Some(Class::AlreadyRight),
                },
            )),
        }
    }
    Ok(out)
}

/// Each row's document fields and their content hash, by document id.
fn documents(mapping: &TableMapping, rows: HashMap<String, Row>) -> HashMap<String, (Row, String)> {
    rows.into_iter()
        .map(|(id, row)| {
            let fields = mapping.fields(&row);
            let hash = content_hash(&fields);
            (id, (fields, hash))
        })
        .collect()
}

/// The class of a real run's write, from what OpenSearch did with it;
/// `None` when the answer does not say (the write was refused: the index
/// held a newer version, or OpenSearch rejected it), and the document has
/// to be asked for. A delete of an absent document only records its
/// version, and the document was already right.
fn class_of(outcome: &Outcome) -> Option<Class> {
    match outcome {
        Outcome::Applied(Effect::Created) => Some(Class::Create),
        Outcome::Applied(Effect::Updated) => Some(Class::Update),
        Outcome::Applied(Effect::Deleted) => Some(Class::Delete),
        Outcome::Applied(Effect::WasAbsent) => Some(Class::AlreadyRight),
        Outcome::Applied(Effect::Other)
        | Outcome::Superseded
        | Outcome::Stale
        | Outcome::Rejected(_) => None,
    }
}

/// The class of a write (a `delete` or not) whose answer did not say,
/// from whether its document exists now, as a dry run would classify it.
fn class_by_document(delete: bool, exists: bool) -> Class {
    match (delete, exists) {
        (true, true) => Class::Delete,
        (true, false) => Class::AlreadyRight,
        (false, true) => Class::Update,
        (false, false) => Class::Create,
    }
}

/// Everything a run needs.
#[derive(Debug)]
pub struct Job<'a> {
    pub config: &'a tidemark_schemas::config::Config,
    pub search: &'a Search,
    pub applier: &'a Applier,
    pub write: bool,
}

/// Repairs (or, without `write`, classifies) one table's window keys.
pub async fn run_table(
    job: &Job<'_>,
    mapping: &TableMapping,
    found: &WindowKeys,
) -> anyhow::Result<TableResult> {
    let total = found.len();
    let mut result = TableResult {
        table: mapping.qualified(),
        index: mapping.index.clone(),
        keys: total,
        events: found.events,
        truncates: found.truncates,
        ..TableResult::default()
    };
    if found.is_empty() {
        return Ok(result);
    }
    let prepare = Instant::now();
    let conn = tidemark_postgres::ConnInfo::from_config(job.config)?;
    let mut client = conn.connect("tidemark-replay").await?;
    let d = describe(&client, &mapping.schema, &mapping.table).await?;
    let row_bytes = sample_row_bytes(&client, &d).await?;
    tracing::debug!(table = %mapping.qualified(), row_bytes, keys_per_chunk = keys_per_chunk(row_bytes), "window: row size sampled");
    // Classifying reads documents by search (doc values), which sees what
    // the last refresh made visible: refresh once, so that every document
    // written before the run (a previous run's too) is seen. Documents the
    // live consumer writes after it carry newer versions than what they
    // replace, so a class read from the refreshed view never undoes them.
    refresh(job.search, &mapping.index).await;
    if job.write {
        job.search
            .ensure_meta_fields(&mapping.qualified(), &mapping.index)
            .await;
    }
    let slot = format!("tidemark_replay_{}", std::process::id());
    let snapshot = tidemark_postgres::export_snapshot(
        &conn,
        &tidemark_postgres::Replication::of(job.config, "tidemark-replay"),
        &slot,
    )
    .await?;
    tracing::debug!(table = %mapping.qualified(), prepare_ms = prepare.elapsed().as_millis() as u64, "window: connected, described, snapshot exported");
    let at = snapshot.point();
    result.version_lsn = Some(at.lsn.to_string());
    let now = jiff::Timestamp::now().to_string();
    let (_keep, never) = watch::channel(false);
    let started = Instant::now();
    let terminal = std::io::stderr().is_terminal();
    let mut last_report = Instant::now();
    // Keys written as documents go, chunk by chunk once applied, to the
    // re-check running beside the writes (step 4).
    let (to_recheck, recheck_rx) = tokio::sync::mpsc::channel::<Vec<(String, Row)>>(RECHECK_QUEUE);
    let recheck = recheck_written(job, &conn, &d, mapping, at, recheck_rx);
    let writes_done = async {
        let mut done = 0u64;
        let mut chunks = found.chunks()?;
        chunks.cap = keys_per_chunk(row_bytes);
        // Chunk i is written while chunk i + 1 is read and classified.
        let mut chunk = chunks.next_chunk()?;
        let mut planned = plan(
            &mut client,
            &snapshot.name,
            &d,
            mapping,
            job.search,
            &chunk,
            at,
            &now,
            job.write,
        )
        .await?;
        while !chunk.is_empty() {
            let next_chunk = chunks.next_chunk()?;
            let mut writes = Vec::new();
            // Per write: its document id, whether it is a delete, its key.
            let mut sent = Vec::new();
            for ((id, write, class), (_, key)) in
                std::mem::take(&mut planned).into_iter().zip(chunk.iter())
            {
                if let Some(class) = class {
                    result.count(class, &id);
                }
                if job.write && class != Some(Class::AlreadyRight) {
                    sent.push((id, matches!(write, Write::Delete { .. }), key));
                    writes.push(write);
                }
            }
            let apply = async {
                if job.write && !writes.is_empty() {
                    pause_between_read_and_write().await;
                    let started = Instant::now();
                    let outcomes = apply_distinct(job.applier, writes, &never).await;
                    tracing::debug!(table = %mapping.qualified(), apply_ms = started.elapsed().as_millis() as u64, "window: chunk applied");
                    Some(outcomes)
                } else {
                    None
                }
            };
            let next = async {
                if next_chunk.is_empty() {
                    return None;
                }
                Some(
                    plan(
                        &mut client,
                        &snapshot.name,
                        &d,
                        mapping,
                        job.search,
                        &next_chunk,
                        at,
                        &now,
                        job.write,
                    )
                    .await,
                )
            };
            let (applied, next) = tokio::join!(apply, next);
            // Documents written at V, for the re-check: only such a
            // document can outlive a later delete (a delete at V loses to
            // any later insert by version).
            let mut written = Vec::new();
            if let Some(outcomes) = applied {
                let outcomes =
                    outcomes.map_err(|e| anyhow::anyhow!("{}: {e}", mapping.qualified()))?;
                let mut unknown = Vec::new();
                for ((id, delete, key), outcome) in sent.into_iter().zip(outcomes) {
                    match class_of(&outcome) {
                        Some(class) => result.count(class, &id),
                        None => unknown.push((id.clone(), delete)),
                    }
                    match outcome {
                        Outcome::Applied(Effect::WasAbsent) => {}
                        Outcome::Applied(_) | Outcome::Superseded => {
                            result.applied += 1;
                            if !delete {
                                written.push((id, key.clone()));
                            }
                        }
                        Outcome::Stale => result.newer_in_index += 1,
                        Outcome::Rejected(reason) => {
                            result.rejected += 1;
                            tracing::warn!(table = %mapping.qualified(), id, %reason, "document refused by OpenSearch");
                        }
                    }
                }
                if !unknown.is_empty() {
                    let ids: Vec<&str> = unknown.iter().map(|(id, _)| id.as_str()).collect();
                    let docs = doc_meta(job.search, &mapping.index, &ids).await?;
                    for (id, delete) in &unknown {
                        result.count(class_by_document(*delete, docs.contains_key(id)), id);
                    }
                }
            }
            if !written.is_empty() && to_recheck.send(written).await.is_err() {
                // The re-check ended early; its error is reported below.
                break;
            }
            if let Some(next) = next {
                planned = next?;
            }
            done += chunk.len() as u64;
            chunk = next_chunk;
            if last_report.elapsed() >= Duration::from_secs(if terminal { 1 } else { 10 }) {
                last_report = Instant::now();
                let rate = done as f64 / started.elapsed().as_secs_f64().max(0.001);
                let eta = (total - done) as f64 / rate.max(1.0);
                if terminal {
                    eprint!(
                        "\r{}: {done}/{total} keys, {rate:.0} keys/s, ETA {eta:.0} s   ",
                        mapping.qualified(),
                    );
                } else {
                    info!(table = %mapping.qualified(), done, total, rate = rate as u64, eta_s = eta as u64, "window progress");
                }
            }
        }
        if terminal && total > CHUNK as u64 {
            eprintln!();
        }
        drop(to_recheck);
        info!(table = %mapping.qualified(), keys = total, elapsed_ms = started.elapsed().as_millis() as u64, "window: keys written");
        anyhow::Ok(result)
    };
    let (mut result, deleted_again) = tokio::try_join!(writes_done, recheck)?;
    drop(snapshot);
    result.deleted_after_recheck = deleted_again;
    if job.write {
        info!(table = %mapping.qualified(), deleted_again, elapsed_ms = started.elapsed().as_millis() as u64, "window: final re-check done");
    }
    Ok(result)
}

/// Written chunks the re-check may fall behind by before the writes pause.
const RECHECK_QUEUE: usize = 2;

/// Step 4, beside the writes: once a chunk's writes have landed, reads
/// which of its keys have no row any more, at a snapshot taken after those
/// writes landed (a plain statement: nothing more is needed of it), and
/// deletes their documents again at version `V + 1`.
///
/// Why `V + 1` is right: the row existed at `V`, so its delete committed
/// after `V` and carries a commit LSN above `V`, which the live pipeline
/// applies anyway; `V + 1` beats only the document this run wrote at `V`,
/// and every change committed after that delete (a re-insert) carries a
/// higher LSN still, so it wins over this delete in whichever order the two
/// land. Returns how many documents it deleted again.
async fn recheck_written(
    job: &Job<'_>,
    conn: &tidemark_postgres::ConnInfo,
    d: &Described,
    mapping: &TableMapping,
    at: tidemark_postgres::Point,
    mut chunks: tokio::sync::mpsc::Receiver<Vec<(String, Row)>>,
) -> anyhow::Result<u64> {
    let version = Version::of_snapshot(at.timeline, at.lsn)?
        .superseding()
        .get();
    let (_keep, never) = watch::channel(false);
    let mut client: Option<Client> = None;
    let mut deleted = 0u64;
    while let Some(mut keys) = chunks.recv().await {
        while let Ok(more) = chunks.try_recv() {
            keys.extend(more);
        }
        let started = Instant::now();
        let client = match &mut client {
            Some(client) => client,
            None => client.insert(conn.connect("tidemark-replay-recheck").await?),
        };
        for part in keys.chunks(CHUNK) {
            let rows: Vec<&Row> = part.iter().map(|(_, key)| key).collect();
            let vanished = keys_without_rows(client, d, &rows).await?;
            if vanished.is_empty() {
                continue;
            }
            let deletes: Vec<Write> = vanished
                .iter()
                .map(|&n| Write::Delete {
                    index: mapping.index.clone(),
                    id: part[n].0.clone(),
                    version,
                })
                .collect();
            deleted += deletes.len() as u64;
            job.applier
                .apply(deletes, &never)
                .await
                .map_err(|e| anyhow::anyhow!("{}: {e}", mapping.qualified()))?;
        }
        tracing::debug!(table = %mapping.qualified(), keys = keys.len(),
            recheck_ms = started.elapsed().as_millis() as u64, "window: written keys re-checked");
    }
    Ok(deleted)
}

/// Applies writes to distinct documents as two bulk requests at once, each
/// on its own task: OpenSearch indexes on two write threads, and building
/// bodies and reading answers runs beside the planning of the next chunk.
/// (The consumer sends one request at a time because its batches keep
/// per-key order; a window has one write per key, so no order is at stake.)
/// Outcomes in input order.
async fn apply_distinct(
    applier: &Applier,
    mut writes: Vec<Write>,
    stop: &watch::Receiver<bool>,
) -> anyhow::Result<Vec<Outcome>> {
    let spawn = |writes: Vec<Write>| {
        let applier = applier.clone();
        let stop = stop.clone();
        tokio::spawn(async move { applier.apply(writes, &stop).await })
    };
    let halves = if writes.len() < 2 * MIN_CONCURRENT_BULK {
        vec![spawn(writes)]
    } else {
        let second = writes.split_off(writes.len() / 2);
        vec![spawn(writes), spawn(second)]
    };
    let mut outcomes = Vec::new();
    for half in halves {
        let applied = half
            .await
            .map_err(|e| anyhow::anyhow!("apply task failed: {e}"))?;
        outcomes.extend(
            applied.map_err(|_| anyhow::anyhow!("interrupted while OpenSearch was failing"))?,
        );
    }
    Ok(outcomes)
}

/// Fault injection for the race test: `TIDEMARK_REPLAY_PAUSE_BEFORE_WRITE_MS`
/// widens the gap between reading rows and writing them, so a test can
/// delete a row inside it. Unset in normal use.
async fn pause_between_read_and_write() {
    if let Some(ms) = std::env::var("TIDEMARK_REPLAY_PAUSE_BEFORE_WRITE_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        eprintln!("pausing {ms} ms between read and write (TIDEMARK_REPLAY_PAUSE_BEFORE_WRITE_MS)");
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

/// The text report of a run.
pub fn render_text(results: &[TableResult], write: bool) -> String {
    let mut out = String::new();
    for r in results {
        let n = |c: Class| r.counts.get(&c).copied().unwrap_or(0);
        out.push_str(&format!(
            "{} -> {}: {} changes of {} keys in the window{}\n",
            r.table,
            r.index,
            r.events,
            r.keys,
            if r.truncates > 0 {
                format!(
                    " ({} truncates: not repairable by key; run `tidemark-replay audit --table {}`)",
                    r.truncates, r.table
                )
            } else {
                String::new()
            }
        ));
        let verb = if write { "" } else { "would be " };
        out.push_str(&format!(
            "  {} {verb}created, {} {verb}updated, {} {verb}deleted, {} already right\n",
            n(Class::Create),
            n(Class::Update),
            n(Class::Delete),
            n(Class::AlreadyRight)
        ));
        for (class, keys) in &r.samples {
            out.push_str(&format!("    {class:?}: {}\n", keys.join(", ")));
        }
        if write {
            out.push_str(&format!(
                "  written at version {}: {} applied, {} kept a newer version, {} refused; {} deleted again after the final check\n",
                r.version_lsn.as_deref().unwrap_or("-"),
                r.applied,
                r.newer_in_index,
                r.rejected,
                r.deleted_after_recheck
            ));
        }
    }
    out
}

/// A JSON value for reports and the runs index.
pub fn to_json(results: &[TableResult]) -> Value {
    serde_json::json!(results)
}

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
fn newer_code(partition: i32, offset: i64) -> u128 {
    ((partition as u32 as u128) << 64) | offset as u64 as u128
}

fn newer_decode(code: u128) -> (i32, i64) {
    ((code >> 64) as u32 as i32, code as u64 as i64)
}

/// The sort id of one sighting of a key: the document id, then its
/// partition and offset at fixed width, so a key's sightings sort together
/// and in commit order. NUL cannot occur in an id (PostgreSQL text cannot
/// hold it), so it separates unambiguously.
fn sighting_id(id: &str, partition: i32, offset: i64) -> String {
    format!("{id}\u{0}{partition:010}{offset:020}")
}

/// Folds the sorted sightings of every key into one entry per key changed
/// in the window (see [`LogWindow::keys`]).
fn fold_sightings(sightings: Sorter) -> anyhow::Result<Distinct> {
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
    for sighting in sightings.finish()? {
        let sighting = sighting?;
        let Some((id, position)) = sighting.id.rsplit_once('\u{0}') else {
            continue;
        };
        if current.as_ref().is_none_or(|c| c.id != id) {
            flush(current.take(), &mut out)?;
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
    flush(current, &mut out)?;
    Ok(out.finish_distinct()?)
}

/// Reads every partition of the table's topic from the window's start to
/// its end as of now. Proof that no newer change exists for a key is
/// having read its whole partition past the window without meeting one.
pub fn collect_log(
    brokers: &str,
    topic: &str,
    mapping: &TableMapping,
    from_ms: i64,
    to_ms: i64,
    only: Option<&[Vec<u8>]>,
) -> anyhow::Result<LogWindow> {
    let Some((consumer, mut open)) = open_window(brokers, topic, mapping, from_ms)? else {
        return Ok(LogWindow::default());
    };
    let mut found = LogWindow::default();
    let mut sightings = Sorter::default();
    while !open.is_empty() {
        let Some(message) = consumer.poll(Duration::from_secs(1)) else {
            continue;
        };
        let message = message.map_err(|e| anyhow::anyhow!("{topic}: {e}"))?;
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
            .map_err(|e| anyhow::anyhow!("{topic} partition {partition} offset {offset}: {e}"))?;
        let Some(at) = event
            .commit_time
            .parse::<jiff::Timestamp>()
            .ok()
            .map(|t| t.as_millisecond())
        else {
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
            .map_err(|e| anyhow::anyhow!("{topic} partition {partition} offset {offset}: {e}"))?;
        // Every sighting from the window's start on; the fold keeps each
        // key's last change inside the window and its first after it.
        let payload = if at <= to_ms {
            found.events += 1;
            let text = std::str::from_utf8(message.payload().unwrap_or_default()).map_err(|e| {
                anyhow::anyhow!("{topic} partition {partition} offset {offset}: {e}")
            })?;
            Some(text.to_owned())
        } else {
            None
        };
        sightings.push(Entry {
            id: sighting_id(&id, partition, offset),
            hash: None,
            key: payload,
        })?;
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
) -> anyhow::Result<LogResult> {
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
        Some(keys) => Box::new(keys.read()?),
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
            .map_err(|e| anyhow::anyhow!("{}: document {id}: {e}", mapping.qualified()))?;
        let write = mappings.write(&event).map_err(|e| anyhow::anyhow!("{e}"))?;
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
async fn apply_log_chunk(
    job: &Job<'_>,
    mapping: &TableMapping,
    writes: Vec<Write>,
    result: &mut LogResult,
) -> anyhow::Result<()> {
    if writes.is_empty() {
        return Ok(());
    }
    let (_keep, never) = watch::channel(false);
    let outcomes = apply_distinct(job.applier, writes, &never)
        .await
        .map_err(|e| anyhow::anyhow!("{}: {e}", mapping.qualified()))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_answers_give_the_classes_a_dry_run_gives() {
        let class = |o: Outcome| class_of(&o);
        assert_eq!(
            class(Outcome::Applied(Effect::Created)),
            Some(Class::Create)
        );
        assert_eq!(
            class(Outcome::Applied(Effect::Updated)),
            Some(Class::Update)
        );
        assert_eq!(
            class(Outcome::Applied(Effect::Deleted)),
            Some(Class::Delete)
        );
        assert_eq!(
            class(Outcome::Applied(Effect::WasAbsent)),
            Some(Class::AlreadyRight)
        );
        // Refused or unclear: the document is asked for.
        assert_eq!(class(Outcome::Stale), None);
        assert_eq!(class(Outcome::Rejected("x".into())), None);
        assert_eq!(class(Outcome::Applied(Effect::Other)), None);
        assert_eq!(class_by_document(false, false), Class::Create);
        assert_eq!(class_by_document(false, true), Class::Update);
        assert_eq!(class_by_document(true, true), Class::Delete);
        assert_eq!(class_by_document(true, false), Class::AlreadyRight);
    }

    fn sighting(id: &str, partition: i32, offset: i64, inside: bool) -> Entry {
        Entry {
            id: sighting_id(id, partition, offset),
            hash: None,
            key: inside.then(|| format!("change of {id} at {offset}")),
        }
    }

    #[test]
    fn chunks_are_cut_by_bytes_for_wide_rows() {
        assert_eq!(keys_per_chunk(0), CHUNK, "empty table: cut by keys");
        assert_eq!(keys_per_chunk(60), CHUNK, "narrow rows: cut by keys");
        assert_eq!(keys_per_chunk(200 * 1024), 40, "200 KB rows: 8 MiB a chunk");
        assert_eq!(
            keys_per_chunk(64 << 20),
            MIN_CHUNK,
            "huge rows: a few at a time"
        );
    }

    #[test]
    fn each_key_keeps_its_last_change_in_the_window_and_its_first_after() {
        // Pushed out of order, across runs: the fold must not care.
        let mut sightings = Sorter::with_run_bytes(300);
        for s in [
            sighting("a", 0, 12, false),
            sighting("a", 0, 3, true),
            sighting("a", 0, 9, true),
            sighting("a", 0, 15, false),
            // Offsets compare as numbers, not text: 100 after 99.
            sighting("b", 1, 100, true),
            sighting("b", 1, 99, true),
            // Only after the window: not a key of the window at all.
            sighting("c", 2, 5, false),
            // An id that extends another one's text.
            sighting("a/1", 0, 4, true),
        ] {
            sightings.push(s).expect("push");
        }
        let folded = fold_sightings(sightings).expect("fold");
        let entries: Vec<Entry> = folded
            .read()
            .expect("read")
            .map(|e| e.expect("entry"))
            .collect();
        type Folded = (String, Option<String>, Option<(i32, i64)>);
        let view: Vec<Folded> = entries
            .into_iter()
            .map(|e| (e.id, e.key, e.hash.map(newer_decode)))
            .collect();
        assert_eq!(
            view,
            vec![
                ("a".into(), Some("change of a at 9".into()), Some((0, 12))),
                ("a/1".into(), Some("change of a/1 at 4".into()), None),
                ("b".into(), Some("change of b at 100".into()), None),
            ]
        );
        assert_eq!(
            newer_decode(newer_code(2_147_483_647, 1 << 40)),
            (2_147_483_647, 1 << 40)
        );
    }
}
