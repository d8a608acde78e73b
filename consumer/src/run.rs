//! The consumer's life: check OpenSearch and Kafka, create missing indices,
//! join the consumer group, then loop: collect a batch (cut on bytes or
//! time), apply it, dead-letter what OpenSearch refused, store offsets.
//!
//! Offsets: `enable.auto.offset.store` is off; an offset is stored only
//! after every record of its partition up to it is applied, stale, or in
//! the dead-letter topic (delivery acknowledged). librdkafka commits stored
//! offsets every second, on partition revocation (rebalance), and on close.
//! So a `kill -9` at any moment re-reads from the last stored offset, and
//! re-applying is harmless because every write is version-guarded.
//!
//! Rebalances: before revoked partitions go to another member, the batch
//! being applied is finished and its offsets committed, and records of
//! those partitions that were read but not yet applied are dropped (the
//! new owner reads them again from the commit). A member therefore never
//! writes a revoked partition's records after the new owner started. This
//! matters beyond tidiness: two changes of one row in one transaction share
//! a version (the commit LSN) and `external_gte` accepts an equal version,
//! so a late write of the earlier change would win over the later one.
//!
//! Stalls (OpenSearch cannot take the batch now: see `answer`): the member
//! stays in the group. Once the next batch is full the partitions are
//! paused and polling goes on, so heartbeats, `max.poll.interval.ms` and
//! rebalances are served however long the stall lasts. A revocation during
//! a stall abandons the batch in flight (it is never committed; the new
//! owner re-reads it from the last commit) and gives the partitions up at
//! once instead of waiting for OpenSearch. Abandoning is safe because the
//! group's assignment is eager (librdkafka's default range/roundrobin
//! strategies): every partition is revoked together, so every record of
//! the abandoned batch is re-read from its committed offset.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rdkafka::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;

use tidemark_schemas::config::Config;
use tidemark_schemas::{ChangeEvent, DeadLetter, Origin, Stage};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::error::ConsumerError;
use crate::indices::{Tables, pipeline_identity};
use crate::metrics::Metrics;
use crate::record::Topics;
use tidemark_index::apply::{Applier, Outcome, lock};
use tidemark_index::mapping::Write;
use tidemark_index::search::Search;

const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);

/// Checks everything the consumer needs, fails with how to fix it, and
/// creates missing indices (`indices`). Returns the OpenSearch handle and
/// the tables.
pub async fn prepare(
    config: &Config,
    config_dir: &Path,
) -> Result<(Arc<Search>, Arc<Tables>), ConsumerError> {
    let search = Arc::new(Search::connect(config.opensearch()?)?);
    let info = search.info().await?;
    info!(
        url = %search.url(),
        cluster = %info.cluster_name,
        uuid = %info.cluster_uuid,
        version = %info.version.number,
        "OpenSearch reachable"
    );
    check_kafka(&config.kafka).await?;
    let kafka = &config.kafka;
    info!(brokers = %kafka.brokers, security = %tidemark_kafka::describe(kafka), "Kafka reachable");
    let (identity, progress) = pipeline_identity(config).await?;
    let tables = Tables::prepare(&search, config, config_dir, identity, progress.as_ref()).await?;
    Ok((search, Arc::new(tables)))
}

/// Fails with a how-to-fix error when no broker answers or takes us.
async fn check_kafka(kafka: &tidemark_schemas::config::Kafka) -> Result<(), ConsumerError> {
    tidemark_kafka::check(kafka, "tidemark-consumer", KAFKA_TIMEOUT).await?;
    Ok(())
}

/// Keeps lag metrics from librdkafka's statistics and hands revoked
/// partitions over cleanly (see the module doc).
struct GroupContext {
    metrics: Arc<Metrics>,
    handover: Arc<Handover>,
}

/// What the rebalance callback and the main loop share. The callback runs
/// inside `recv()` on the main loop's task, so the two never run at once.
#[derive(Default)]
struct Handover {
    /// The outcome of the batch being applied, for the callback to wait on.
    in_flight: Mutex<Option<InFlight>>,
    /// Partitions revoked since the main loop last looked.
    revoked: Mutex<Vec<(String, i32)>>,
}

/// The batch being applied, as the rebalance callback sees it.
struct InFlight {
    outcome: mpsc::Receiver<Option<Done>>,
    /// True: give the batch up at its next wait (it stores nothing).
    abandon: watch::Sender<bool>,
}

/// How often the revoke callback looks whether the batch it waits for is
/// stalled (then it abandons it instead of waiting).
const REVOKE_CHECK: Duration = Duration::from_millis(100);

impl Handover {
    /// Waits for the batch being applied, if any, and returns its applied
    /// offsets; abandons it (returning nothing) if it is waiting on
    /// OpenSearch, as `stalled` says.
    fn wait_in_flight(&self, stalled: impl Fn() -> bool) -> Option<Done> {
        let InFlight { outcome, abandon } = lock(&self.in_flight).take()?;
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if !multi_thread {
            // The batch task could never run while we block this thread.
            warn!(
                "rebalance: cannot wait for the batch being applied outside a multi-threaded runtime"
            );
            return None;
        }
        // The batch runs on another worker; this one may block meanwhile.
        tokio::task::block_in_place(|| {
            loop {
                match outcome.recv_timeout(REVOKE_CHECK) {
                    Ok(done) => return done,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return None,
                    Err(mpsc::RecvTimeoutError::Timeout) if stalled() && !*abandon.borrow() => {
                        info!(
                            "rebalance while OpenSearch cannot take the batch: abandoning it (not committed; the new owner re-reads it)"
                        );
                        let _ = abandon.send(true);
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                }
            }
        })
    }

    /// Asks the batch in flight, if any, to stop at its next wait.
    fn abandon(&self) {
        if let Some(in_flight) = lock(&self.in_flight).as_ref() {
            let _ = in_flight.abandon.send(true);
        }
    }
}

impl ClientContext for GroupContext {
    fn stats(&self, statistics: Statistics) {
        for (topic, t) in &statistics.topics {
            for p in t.partitions.values() {
                if p.partition >= 0 && p.consumer_lag_stored >= 0 {
                    self.metrics
                        .partition_lag(topic, p.partition, p.consumer_lag_stored);
                }
            }
        }
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(partitions) => {
                // Finish the batch being applied and commit it before
                // another member takes over (see the module doc).
                let started = Instant::now();
                let apply = &self.metrics.apply;
                let stalled = || {
                    !apply.blocked.current().is_empty()
                        || !apply.opensearch_up.load(Ordering::Relaxed)
                };
                for (topic, partition, offset, _) in
                    self.handover.wait_in_flight(stalled).unwrap_or_default()
                {
                    if let Err(e) = consumer.store_offset(&topic, partition, offset) {
                        debug!(topic, partition, offset, error = %e, "offset not stored at revocation");
                    }
                }
                debug!(
                    waited_ms = started.elapsed().as_millis() as u64,
                    "rebalance: batch in flight finished"
                );
                match consumer.commit_consumer_state(CommitMode::Sync) {
                    Ok(()) => info!(
                        partitions = partitions.count(),
                        "partitions revoked; stored offsets committed"
                    ),
                    Err(e) => debug!(error = %e, "partitions revoked; nothing to commit"),
                }
                let revoked: Vec<(String, i32)> = partitions
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect();
                self.metrics
                    .retain_partitions(|t, p| !revoked.iter().any(|(rt, rp)| rt == t && *rp == p));
                lock(&self.handover.revoked).extend(revoked);
            }
            Rebalance::Assign(partitions) => {
                info!(partitions = partitions.count(), "partitions assigned");
            }
            Rebalance::Error(e) => warn!(error = %e, "rebalance error"),
        }
    }
}

/// One record of the current batch.
struct Record {
    topic: String,
    partition: i32,
    /// Payload bytes (counted against the batch's byte budget).
    size: usize,
    offset: i64,
    timestamp_ms: Option<i64>,
    key: Option<Bytes>,
    /// The event, when the payload is one (a dead letter names its table
    /// and key even when it cannot be applied).
    event: Option<ChangeEvent>,
    /// Its write, or why the record cannot be applied.
    write: Result<Write, String>,
}

/// Runs until `shutdown` turns true: then finishes (or abandons, if
/// OpenSearch is down) the current batch, commits, and leaves the group.
pub async fn run(
    config: Config,
    search: Arc<Search>,
    tables: Arc<Tables>,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ConsumerError> {
    let checks = Topics::new(&config);
    let topics = checks.names();
    let handover = Arc::new(Handover::default());
    let context = GroupContext {
        metrics: metrics.clone(),
        handover: handover.clone(),
    };
    let consumer: StreamConsumer<GroupContext> =
        tidemark_kafka::client_config(&config.kafka, "tidemark-consumer")
            .set("group.id", &config.consumer.group_id)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("statistics.interval.ms", "1000")
            .set(
                "queued.max.messages.kbytes",
                config.consumer.fetch_queue_kbytes.to_string(),
            )
            // One fetch answer is held whole before it is queued: bound it
            // by the same budget (librdkafka's default is 50 MiB).
            .set(
                "fetch.max.bytes",
                (config.consumer.fetch_queue_kbytes * 1024)
                    .max(1_048_576)
                    .to_string(),
            )
            // A dead member's partitions move on after 10 s, not 45.
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "2000")
            // Applying waits while OpenSearch is down; stay in the group that long.
            .set("max.poll.interval.ms", "900000")
            .create_with_context(context)
            .map_err(ConsumerError::kafka("cannot create the Kafka consumer"))?;
    let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topic_refs)
        .map_err(ConsumerError::kafka("cannot subscribe to the table topics"))?;
    info!(group = %config.consumer.group_id, topics = ?topics, "consuming");
    let dead_letters: FutureProducer =
        tidemark_kafka::client_config(&config.kafka, "tidemark-consumer-dead-letters")
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", "0")
            .create()
            .map_err(ConsumerError::kafka(
                "cannot create the dead-letter producer",
            ))?;
    let dead_letter_topic = config.kafka.dead_letter_topic();
    let applier = Applier::new(search.clone(), metrics.apply.clone())
        .with_fill_budget(config.consumer.batch_max_bytes)
        .with_refusals(Arc::new(crate::indices::TypeChanges::new(
            tables.clone(),
            search.clone(),
        )));
    metrics.apply.opensearch_up.store(true, Ordering::Relaxed);
    let health = tokio::spawn(health_loop(
        search.clone(),
        config.kafka.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));

    let max_bytes = config.consumer.batch_max_bytes;
    let max_wait = Duration::from_millis(config.consumer.batch_max_wait_ms);
    let mut batch: Vec<Record> = Vec::new();
    let mut batch_bytes = 0usize;
    let mut batch_started = Instant::now();
    let mut stop = shutdown.clone();
    let sinks = Sinks {
        applier,
        search: search.clone(),
        tables: tables.clone(),
        dead_letters,
        dead_letter_topic,
        metrics: metrics.clone(),
    };
    // One batch is applied while the next is read and decoded; the next is
    // sent only when the one before it is done, so per-key order holds.
    let mut in_flight: Option<tokio::task::JoinHandle<Result<Option<Done>, ConsumerError>>> = None;
    // Partitions paused while a full batch waits for the one in flight.
    let mut paused: Option<rdkafka::TopicPartitionList> = None;
    let result = loop {
        if *stop.borrow() {
            break Ok(());
        }
        let wait = if batch.is_empty() || paused.is_some() {
            Duration::from_millis(500)
        } else {
            max_wait.saturating_sub(batch_started.elapsed())
        };
        let received = tokio::select! {
            _ = stop.wait_for(|s| *s) => break Ok(()),
            joined = async { in_flight.as_mut().expect("guarded by the if").await }, if in_flight.is_some() => {
                in_flight = None;
                lock(&handover.in_flight).take();
                match finished(joined) {
                    Ok(done) => store_offsets(&consumer, &metrics, done),
                    Err(e) => break Err(e),
                }
                if let Some(partitions) = paused.take()
                    && let Err(e) = consumer.resume(&partitions)
                {
                    debug!(error = %e, "resume after the batch in flight (partitions moved meanwhile)");
                }
                continue;
            }
            received = tokio::time::timeout(wait, consumer.recv()) => received,
        };
        // A rebalance ran inside recv(): records of revoked partitions that
        // are read but not applied are the new owner's to apply now.
        let revoked = std::mem::take(&mut *lock(&handover.revoked));
        if !revoked.is_empty() {
            let before = batch.len();
            batch.retain(|r| !revoked.contains(&(r.topic.clone(), r.partition)));
            batch_bytes = batch.iter().map(|r| r.size).sum();
            if batch.len() < before {
                info!(
                    dropped = before - batch.len(),
                    "records of revoked partitions left to their new owner"
                );
            }
        }
        match received {
            Ok(Ok(message)) => {
                if batch.is_empty() {
                    batch_started = Instant::now();
                }
                let payload = message.payload().unwrap_or_default();
                batch_bytes += payload.len();
                let (event, write) = match ChangeEvent::from_slice(payload) {
                    Err(e) => (None, Err(e.to_string())),
                    Ok(mut event) => {
                        let write = checks
                            .check(message.topic(), message.key(), &event)
                            .and_then(|()| {
                                tables.mappings.write(&event).map_err(|e| e.to_string())
                            });
                        // The write holds the row now; the event stays for
                        // what metrics and a dead letter name (table, key,
                        // op, LSN), without a second copy of the row.
                        event.before = None;
                        event.after = None;
                        (Some(event), write)
                    }
                };
                batch.push(Record {
                    topic: message.topic().to_owned(),
                    partition: message.partition(),
                    size: payload.len(),
                    offset: message.offset(),
                    timestamp_ms: message.timestamp().to_millis(),
                    key: message.key().map(Bytes::copy_from_slice),
                    event,
                    write,
                });
            }
            Ok(Err(e)) => {
                warn!(error = %e, "Kafka consumer error");
                continue;
            }
            Err(_elapsed) => {}
        }
        let due =
            !batch.is_empty() && (batch_bytes >= max_bytes || batch_started.elapsed() >= max_wait);
        if due && in_flight.is_some() {
            // The next batch is ready before the last is applied (OpenSearch
            // is slow or stalled): stop fetching, keep polling.
            if paused.is_none() {
                match consumer.assignment() {
                    Ok(partitions) => match consumer.pause(&partitions) {
                        Ok(()) => paused = Some(partitions),
                        Err(e) => debug!(error = %e, "cannot pause the partitions"),
                    },
                    Err(e) => debug!(error = %e, "cannot read the assignment"),
                }
            }
            continue;
        }
        if due {
            let records = std::mem::take(&mut batch);
            batch_bytes = 0;
            let (outcome, waiter) = mpsc::sync_channel(1);
            let (abandon, stop) = watch::channel(false);
            *lock(&handover.in_flight) = Some(InFlight {
                outcome: waiter,
                abandon,
            });
            let sinks = sinks.clone();
            in_flight = Some(tokio::spawn(async move {
                let applied = apply_batch(records, sinks, stop).await;
                if let Ok(done) = &applied {
                    // Nobody waiting (no rebalance) is the common case.
                    let _ = outcome.send(done.clone());
                }
                applied
            }));
        }
    };
    // Finish what was read, unless OpenSearch keeps us from it (a batch
    // that waits on OpenSearch stops at its next wait and stores nothing).
    handover.abandon();
    if let Some(previous) = in_flight.take() {
        lock(&handover.in_flight).take();
        match finished(previous.await) {
            Ok(done) => store_offsets(&consumer, &metrics, done),
            Err(e) => warn!(error = %e, "the last batch failed"),
        }
    }
    if result.is_ok() && !batch.is_empty() {
        let records = std::mem::take(&mut batch);
        let (_keep, never) = watch::channel(false);
        match tokio::time::timeout(
            Duration::from_secs(10),
            apply_batch(records, sinks.clone(), never),
        )
        .await
        {
            Ok(result) => match result {
                Ok(done) => store_offsets(&consumer, &metrics, done),
                Err(e) => warn!(error = %e, "the last batch failed"),
            },
            Err(_) => warn!(
                "OpenSearch did not take the last batch within 10 s; it will be re-read on the next start"
            ),
        }
    }
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => info!("offsets committed"),
        Err(e) => debug!(error = %e, "no offsets to commit at shutdown"),
    }
    consumer.unsubscribe();
    health.abort();
    result
}

/// Where an applied batch goes: OpenSearch, the dead-letter topic, metrics.
#[derive(Clone)]
struct Sinks {
    applier: Applier,
    search: Arc<Search>,
    tables: Arc<Tables>,
    dead_letters: FutureProducer,
    dead_letter_topic: String,
    metrics: Arc<Metrics>,
}

/// The last record of each partition in an applied batch: topic,
/// partition, offset, Kafka timestamp.
type Done = Vec<(String, i32, i64, Option<i64>)>;

fn finished(
    joined: Result<Result<Option<Done>, ConsumerError>, tokio::task::JoinError>,
) -> Result<Option<Done>, ConsumerError> {
    joined.map_err(|e| ConsumerError::Task(format!("batch task failed: {e}")))?
}

/// Stores the offsets of an applied batch; `None` (interrupted) stores
/// nothing, so those records are read again.
fn store_offsets(consumer: &StreamConsumer<GroupContext>, metrics: &Metrics, done: Option<Done>) {
    for (topic, partition, offset, timestamp) in done.unwrap_or_default() {
        match consumer.store_offset(&topic, partition, offset) {
            Ok(()) => metrics.applied_through(&topic, partition, timestamp),
            // Revoked meanwhile: the new owner re-applies from the last commit.
            Err(e) => {
                debug!(topic, partition, offset, error = %e, "offset not stored (partition revoked)")
            }
        }
    }
}

/// Applies one batch and dead-letters what cannot be applied. Returns the
/// positions to store, `None` when stopped while OpenSearch was failing, or
/// an error when the dead-letter topic cannot be written.
async fn apply_batch(
    mut records: Vec<Record>,
    sinks: Sinks,
    stop: watch::Receiver<bool>,
) -> Result<Option<Done>, ConsumerError> {
    let Sinks {
        applier,
        search,
        tables,
        dead_letters,
        dead_letter_topic,
        metrics,
    } = sinks;
    if let Some(first) = records.first() {
        *lock(&applier.stats().oldest_waiting) = Some(format!(
            "{}/{}/{}",
            first.topic, first.partition, first.offset
        ));
    }
    let mut writes = Vec::new();
    let mut write_of = Vec::with_capacity(records.len());
    for record in &mut records {
        if record.write.is_ok() {
            // Moved, not copied: the record keeps only why it failed, if so.
            let taken = std::mem::replace(&mut record.write, Err(String::new()));
            if let Ok(write) = taken {
                write_of.push(Some(writes.len()));
                writes.push(write);
            }
        } else {
            write_of.push(None);
        }
    }
    // A table's index not created yet: now, from the columns its producer
    // recorded before this first change.
    if !tables.ready_for(&search, &writes, &stop).await? {
        info!("stopped while creating an index; offsets of the unfinished batch are not stored");
        return Ok(None);
    }
    let outcomes = match applier.apply(writes, &stop).await {
        Ok(outcomes) => outcomes,
        Err(interrupted) => {
            info!("{interrupted}; offsets of the unfinished batch are not stored");
            return Ok(None);
        }
    };
    for (record, slot) in records.iter().zip(&write_of) {
        let outcome = match slot {
            Some(n) => outcomes[*n].clone(),
            None => Outcome::Rejected(match &record.write {
                Err(reason) => reason.clone(),
                Ok(_) => String::new(),
            }),
        };
        let event = record.event.as_ref();
        match &outcome {
            Outcome::Applied(_) | Outcome::Superseded => {
                if let Some(event) = event {
                    metrics.applied(&event.source.qualified(), event.op);
                }
            }
            Outcome::Stale => metrics.stale(),
            Outcome::Rejected(reason) => {
                warn!(
                    topic = %record.topic,
                    partition = record.partition,
                    offset = record.offset,
                    table = event.map(|e| e.source.qualified()).unwrap_or_default(),
                    key = ?event.map(|e| &e.key),
                    lsn = ?event.map(|e| e.commit_lsn),
                    reason = %reason,
                    "record sent to the dead-letter topic"
                );
                send_dead_letter(&dead_letters, &dead_letter_topic, record, event, reason).await?;
                metrics.dead_letter();
            }
        }
    }
    // Records of one partition are in offset order: the last one counts.
    let mut last: HashMap<(&str, i32), (i64, Option<i64>)> = HashMap::new();
    for record in &records {
        last.insert(
            (record.topic.as_str(), record.partition),
            (record.offset, record.timestamp_ms),
        );
    }
    Ok(Some(
        last.into_iter()
            .map(|((topic, partition), (offset, timestamp))| {
                (topic.to_owned(), partition, offset, timestamp)
            })
            .collect(),
    ))
}

/// A dead letter names where the record came from and why it was set
/// aside; the row itself stays in its topic at that offset.
async fn send_dead_letter(
    producer: &FutureProducer,
    topic: &str,
    record: &Record,
    event: Option<&ChangeEvent>,
    reason: &str,
) -> Result<(), ConsumerError> {
    let letter = DeadLetter {
        origin: Some(Origin {
            topic: record.topic.clone(),
            partition: record.partition,
            offset: record.offset,
        }),
        ..DeadLetter::new(Stage::Consumer, event, None, reason)
    };
    let payload = letter.to_vec();
    let key = record.key.clone().unwrap_or_default();
    let headers = OwnedHeaders::new().insert(Header {
        key: "tidemark.stage",
        value: Some("consumer"),
    });
    let send = FutureRecord::to(topic)
        .key(&key[..])
        .payload(&payload)
        .headers(headers);
    producer
        .send(send, rdkafka::util::Timeout::Never)
        .await
        .map_err(|(e, _)| {
            ConsumerError::kafka(format!(
                "cannot write to the dead-letter topic {topic} (record {}/{}/{})",
                record.topic, record.partition, record.offset
            ))(e)
        })?;
    Ok(())
}

/// Every 5 s: does OpenSearch answer, does Kafka answer.
async fn health_loop(
    search: Arc<Search>,
    kafka: tidemark_schemas::config::Kafka,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let os = search.ping().await;
        metrics.apply.opensearch_up.store(os, Ordering::Relaxed);
        let up = check_kafka(&kafka).await.is_ok();
        metrics.kafka_up.store(up, Ordering::Relaxed);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}
