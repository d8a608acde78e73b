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
//! 4. **Close the race** the tombstone cannot (`index.gc_deletes`): after
//!    writing, the written keys are checked again at a newer exported
//!    snapshot `V2`, and every one whose row vanished since `V` is deleted
//!    again at `V2`. A row that merely *changed* after `V` needs nothing:
//!    its change carries a commit LSN above `V` through the live pipeline,
//!    which wins over our write in whichever order the two land. Only a
//!    delete can lose that race, once its tombstone is forgotten.
//!
//! A dry run (the default without `--yes`) writes nothing and classifies
//! each key against the index: create, update, delete, or already right.

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde::Serialize;
use serde_json::Value;
use tidemark_consumer::apply::{Applier, Outcome};
use tidemark_consumer::mapping::{TableMapping, Write, content_hash};
use tidemark_consumer::search::Search;
use tidemark_schemas::{ChangeEvent, Lsn, Operation, Row, Source, record_key};
use tokio::sync::watch;
use tokio_postgres::Client;
use tracing::info;

use crate::audit::{Described, describe, doc_meta, keys_without_rows, rows_by_keys};

const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);
/// Keys read and written per round trip.
const CHUNK: usize = 10_000;
/// Below this many writes per request, splitting a chunk in two costs more
/// round trips than it gains.
const MIN_CONCURRENT_BULK: usize = 500;
/// Keys listed per class in a report.
const SAMPLE: usize = 10;

/// The keys a window touched in one table.
#[derive(Debug, Default)]
pub struct WindowKeys {
    /// Document id -> key.
    pub keys: BTreeMap<String, Row>,
    /// Changes in the window.
    pub events: u64,
    /// Truncates in the window (not repairable by key; audit the table).
    pub truncates: u64,
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
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "tidemark-replay-window")
        .set("enable.auto.commit", "false")
        .create()?;
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
        let event = ChangeEvent::from_slice(message.payload().unwrap_or_default())
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
        if event.op == Operation::Truncate {
            found.truncates += 1;
            continue;
        }
        let id = mapping
            .doc_id(&event.key)
            .map_err(|e| anyhow::anyhow!("{topic} partition {partition} offset {offset}: {e}"))?;
        found.keys.insert(id, event.key);
    }
    info!(
        topic,
        scanned,
        keys = found.keys.len(),
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
    /// Written (real run): applied, or refused because the index had newer.
    pub applied: u64,
    pub newer_in_index: u64,
    pub rejected: u64,
    /// Keys whose row vanished between the read and the end, deleted again.
    pub deleted_after_recheck: u64,
    /// The snapshot LSN the documents were written with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version_lsn: Option<String>,
}

/// Reads the keys' rows at `snapshot` (an exported snapshot name) and
/// returns per key: the write at `version` and its class against the index.
#[allow(clippy::too_many_arguments)]
async fn plan(
    client: &mut Client,
    snapshot: &str,
    d: &Described,
    mapping: &TableMapping,
    search: &Search,
    keys: &[(&String, &Row)],
    version: Lsn,
    commit_time: &str,
) -> anyhow::Result<Vec<(String, Write, Class)>> {
    let started = Instant::now();
    let key_rows: Vec<&Row> = keys.iter().map(|(_, k)| *k).collect();
    let ids: Vec<&str> = keys.iter().map(|(id, _)| id.as_str()).collect();
    // The rows and the documents of the chunk are asked for at once.
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
    let lookup = doc_meta(search, &mapping.index, &ids);
    let (rows, docs) = tokio::try_join!(read, lookup)?;
    tracing::debug!(table = %mapping.qualified(), keys = keys.len(),
        read_and_lookup_ms = started.elapsed().as_millis() as u64, "window: chunk planned");
    let mut out = Vec::with_capacity(keys.len());
    for (id, key) in keys {
        let doc = docs.get(id.as_str());
        match rows.get(id.as_str()) {
            Some(row) => {
                let fields = mapping.fields(row);
                let hash = content_hash(&fields);
                let class = match doc {
                    None => Class::Create,
                    Some(meta) if meta["hash"].as_str() == Some(hash.as_str()) => {
                        Class::AlreadyRight
                    }
                    Some(_) => Class::Update,
                };
                out.push((
                    (*id).clone(),
                    Write::Index {
                        index: mapping.index.clone(),
                        id: (*id).clone(),
                        version: version.0,
                        fields,
                        missing: Vec::new(),
                        key: (*key).clone(),
                        lsn: version,
                        commit_time: commit_time.to_owned(),
                    },
                    class,
                ));
            }
            None => out.push((
                (*id).clone(),
                Write::Delete {
                    index: mapping.index.clone(),
                    id: (*id).clone(),
                    version: version.0,
                },
                if doc.is_some() {
                    Class::Delete
                } else {
                    Class::AlreadyRight
                },
            )),
        }
    }
    Ok(out)
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
    let mut result = TableResult {
        table: mapping.qualified(),
        index: mapping.index.clone(),
        keys: found.keys.len() as u64,
        events: found.events,
        truncates: found.truncates,
        ..TableResult::default()
    };
    if found.keys.is_empty() {
        return Ok(result);
    }
    let conn = tidemark_producer::source::ConnInfo::from_config(job.config)?;
    let mut client = conn.connect("tidemark-replay").await?;
    let d = describe(&client, &mapping.schema, &mapping.table).await?;
    let slot = format!("tidemark_replay_{}", std::process::id());
    let snapshot = tidemark_producer::run::export_snapshot(job.config, &conn, &slot).await?;
    let version = snapshot.lsn;
    result.version_lsn = Some(version.to_string());
    let now = jiff::Timestamp::now().to_string();
    let keys: Vec<(&String, &Row)> = found.keys.iter().collect();
    let (_keep, never) = watch::channel(false);
    let started = Instant::now();
    let terminal = std::io::stderr().is_terminal();
    let mut last_report = Instant::now();
    let mut written: Vec<(String, Row)> = Vec::new();
    let mut done = 0usize;
    // Chunk i is written while chunk i + 1 is read and classified.
    let chunks: Vec<&[(&String, &Row)]> = keys.chunks(CHUNK).collect();
    let mut planned = match chunks.first() {
        Some(first) => {
            plan(
                &mut client,
                &snapshot.name,
                &d,
                mapping,
                job.search,
                first,
                version,
                &now,
            )
            .await?
        }
        None => Vec::new(),
    };
    for (i, chunk) in chunks.iter().enumerate() {
        let mut writes = Vec::new();
        for ((id, write, class), (_, key)) in
            std::mem::take(&mut planned).into_iter().zip(chunk.iter())
        {
            *result.counts.entry(class).or_default() += 1;
            let sample = result.samples.entry(class).or_default();
            if sample.len() < SAMPLE {
                sample.push(id.clone());
            }
            if job.write && class != Class::AlreadyRight {
                writes.push(write);
                written.push((id, (*key).clone()));
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
            match chunks.get(i + 1) {
                Some(next) => Some(
                    plan(
                        &mut client,
                        &snapshot.name,
                        &d,
                        mapping,
                        job.search,
                        next,
                        version,
                        &now,
                    )
                    .await,
                ),
                None => None,
            }
        };
        let (applied, next) = tokio::join!(apply, next);
        if let Some(outcomes) = applied {
            let outcomes = outcomes.map_err(|e| anyhow::anyhow!("{}: {e}", mapping.qualified()))?;
            for outcome in outcomes {
                match outcome {
                    Outcome::Applied | Outcome::Superseded => result.applied += 1,
                    Outcome::Stale => result.newer_in_index += 1,
                    Outcome::Rejected(reason) => {
                        result.rejected += 1;
                        tracing::warn!(table = %mapping.qualified(), %reason, "document refused by OpenSearch");
                    }
                }
            }
        }
        if let Some(next) = next {
            planned = next?;
        }
        done += chunk.len();
        if last_report.elapsed() >= Duration::from_secs(if terminal { 1 } else { 10 }) {
            last_report = Instant::now();
            let rate = done as f64 / started.elapsed().as_secs_f64().max(0.001);
            let eta = (keys.len() - done) as f64 / rate.max(1.0);
            if terminal {
                eprint!(
                    "\r{}: {done}/{} keys, {rate:.0} keys/s, ETA {eta:.0} s   ",
                    mapping.qualified(),
                    keys.len()
                );
            } else {
                info!(table = %mapping.qualified(), done, total = keys.len(), rate = rate as u64, eta_s = eta as u64, "window progress");
            }
        }
    }
    if terminal && keys.len() > CHUNK {
        eprintln!();
    }
    drop(snapshot);
    info!(table = %mapping.qualified(), keys = keys.len(), elapsed_ms = started.elapsed().as_millis() as u64, "window: keys written");

    // Rows deleted after the first read: with the tombstone possibly gone,
    // delete them again at a newer exact version (see step 4 above).
    if job.write && !written.is_empty() {
        let recheck =
            tidemark_producer::run::export_snapshot(job.config, &conn, &format!("{slot}_re"))
                .await?;
        for chunk in written.chunks(CHUNK) {
            let keys: Vec<&Row> = chunk.iter().map(|(_, key)| key).collect();
            let tx = client.transaction().await?;
            tx.batch_execute(&format!(
                "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT '{}'",
                recheck.name.replace('\'', "''")
            ))
            .await?;
            let vanished = keys_without_rows(&tx, &d, &keys).await?;
            tx.commit().await?;
            if vanished.is_empty() {
                continue;
            }
            let deletes: Vec<Write> = vanished
                .iter()
                .map(|&n| Write::Delete {
                    index: mapping.index.clone(),
                    id: chunk[n].0.clone(),
                    version: recheck.lsn.0,
                })
                .collect();
            result.deleted_after_recheck += deletes.len() as u64;
            job.applier
                .apply(deletes, &never)
                .await
                .map_err(|e| anyhow::anyhow!("{}: {e}", mapping.qualified()))?;
        }
        info!(table = %mapping.qualified(), deleted_again = result.deleted_after_recheck, elapsed_ms = started.elapsed().as_millis() as u64, "window: final re-check done");
    }
    Ok(result)
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
/// which keys changed again after it.
#[derive(Debug, Default)]
pub struct LogWindow {
    /// Document id -> the key's last change inside the window.
    pub last: BTreeMap<String, ChangeEvent>,
    /// Document id -> (partition, offset) of a newer change after the window.
    pub newer: BTreeMap<String, (i32, i64)>,
    pub events: u64,
    pub truncates: u64,
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
        let event = ChangeEvent::from_slice(message.payload().unwrap_or_default())
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
        if event.op == Operation::Truncate {
            if at <= to_ms {
                found.events += 1;
                found.truncates += 1;
            }
            continue;
        }
        let id = mapping
            .doc_id(&event.key)
            .map_err(|e| anyhow::anyhow!("{topic} partition {partition} offset {offset}: {e}"))?;
        if at <= to_ms {
            found.events += 1;
            found.last.insert(id, event);
        } else if found.last.contains_key(&id) {
            found.newer.entry(id).or_insert((partition, offset));
        }
    }
    Ok(found)
}

/// Log mode: re-applies each key's last change in the window, with its own
/// commit LSN as version, for keys proven to have no newer change; refuses
/// the others (source mode handles them).
pub async fn run_log(
    job: &Job<'_>,
    mapping: &TableMapping,
    mappings: &tidemark_consumer::mapping::Mappings,
    found: &LogWindow,
) -> anyhow::Result<LogResult> {
    let mut result = LogResult {
        table: mapping.qualified(),
        index: mapping.index.clone(),
        keys: found.last.len() as u64,
        events: found.events,
        truncates: found.truncates,
        ..LogResult::default()
    };
    let mut writes = Vec::new();
    for (id, event) in &found.last {
        if let Some((partition, offset)) = found.newer.get(id) {
            result.refused += 1;
            if result.refused_sample.len() < SAMPLE {
                result.refused_sample.push(format!(
                    "{id} (newer change at partition {partition} offset {offset})"
                ));
            }
            continue;
        }
        writes.push(mappings.write(event).map_err(|e| anyhow::anyhow!("{e}"))?);
    }
    result.to_apply = writes.len() as u64;
    if job.write {
        let (_keep, never) = watch::channel(false);
        for chunk in writes.chunks(CHUNK) {
            let outcomes = apply_distinct(job.applier, chunk.to_vec(), &never)
                .await
                .map_err(|e| anyhow::anyhow!("{}: {e}", mapping.qualified()))?;
            for outcome in outcomes {
                match outcome {
                    Outcome::Applied | Outcome::Superseded => result.applied += 1,
                    Outcome::Stale => result.newer_in_index += 1,
                    Outcome::Rejected(_) => result.rejected += 1,
                }
            }
        }
    }
    Ok(result)
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
