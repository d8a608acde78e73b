//! The Kafka side of the producer: topics, records, dead letters.
//!
//! Delivery contract: every record goes through one idempotent producer with
//! `acks=all`, so a record Kafka acknowledged is on every in-sync replica and
//! retries never duplicate or reorder within a partition. Every record gets
//! a sequence number when it is handed to librdkafka; its delivery callback
//! marks the number, and [`Sink::acked`] is the length of the acknowledged
//! prefix. A caller remembers [`Sink::sent`] after the records a source
//! position covers and confirms that position only once `acked` reached it
//! (see `stream`). No future, channel or wake-up per record: that
//! bookkeeping cost more CPU than building the record.
//!
//! Records:
//! - topic `<prefix>.<schema>.<table>`, key = table + primary key (stable
//!   JSON, see `tidemark_schemas::record_key`), partitioned with murmur2 like
//!   Java clients, so every tool computes the same partition for a key;
//! - value = the envelope; timestamp = commit time, so a time window maps to
//!   offsets with `offsets_for_times`; headers `tidemark.lsn` (commit LSN)
//!   and `tidemark.op`;
//! - a truncate goes to every partition of its topic, so it is ordered with
//!   every key's changes;
//! - an event over `producer.max_event_bytes`, or a change that cannot be
//!   decoded, goes to the dead-letter topic with table, key, LSN and reason,
//!   never row contents.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Header, Headers, OwnedHeaders};
use rdkafka::producer::{BaseRecord, FutureProducer, Producer, ProducerContext, ThreadedProducer};
use rdkafka::util::Timeout;

use tidemark_schemas::config::Config;
use tidemark_schemas::{ChangeEvent, DeadLetter, Lsn, Operation, Stage, record_key};
use tokio::sync::Notify;
use tracing::warn;

/// How long start-up waits for Kafka to answer before failing.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Upper bound of librdkafka's send queue. Bounds the producer's memory
/// for records not yet acknowledged; a full queue is backpressure.
const QUEUE_MAX_KBYTES: &str = "32768";

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The brokers do not answer, or refuse this client (TLS, SASL, ACLs).
    #[error(transparent)]
    Reach(#[from] tidemark_kafka::CheckError),
    #[error("Kafka client setup failed: {0}")]
    Client(#[source] KafkaError),
    #[error(
        "cannot create topic {topic}: {reason}. Create it yourself or give Tidemark's Kafka user CREATE rights"
    )]
    CreateTopic { topic: String, reason: String },
    #[error("topic {0} has no partitions with a leader in the broker's metadata after 30 s")]
    NoPartitions(String),
    #[error("Kafka did not accept the record for {topic} (commit LSN {lsn}): {source}")]
    Send {
        topic: String,
        lsn: Lsn,
        #[source]
        source: KafkaError,
    },
}

/// The acknowledged prefix of the records handed to librdkafka, kept by its
/// delivery callback (on the producer's polling thread).
#[derive(Debug, Default)]
struct Deliveries {
    window: Mutex<AckWindow>,
    /// Records `0..acked` are all acknowledged.
    acked: AtomicU64,
    failed: AtomicBool,
    /// The first delivery that failed; nothing at or after it is ever
    /// counted as acknowledged.
    failure: Mutex<Option<(String, Lsn, KafkaError)>>,
    /// Wakes [`Sink::acknowledged`] waiters when `acked` moves or a
    /// delivery fails.
    moved: Notify,
}

/// Which sequence numbers past the acknowledged prefix are acknowledged:
/// delivery reports of different partitions arrive in any order.
#[derive(Debug, Default)]
struct AckWindow {
    /// The lowest sequence number not yet acknowledged.
    base: u64,
    /// `done[i]`: `base + i` was acknowledged. Never starts with `true`.
    done: VecDeque<bool>,
}

impl AckWindow {
    /// Marks `seq` acknowledged; returns the new length of the prefix.
    fn mark(&mut self, seq: u64) -> u64 {
        if let Some(offset) = seq.checked_sub(self.base) {
            let offset = offset as usize;
            if offset >= self.done.len() {
                self.done.resize(offset + 1, false);
            }
            self.done[offset] = true;
            while self.done.front() == Some(&true) {
                self.done.pop_front();
                self.base += 1;
            }
        }
        self.base
    }
}

/// The data producer's context: routes delivery reports to [`Deliveries`].
struct SinkContext {
    deliveries: Arc<Deliveries>,
}

impl ClientContext for SinkContext {}

impl ProducerContext for SinkContext {
    /// The record's sequence number.
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, seq: usize) {
        let deliveries = &self.deliveries;
        match result {
            Ok(_) => {
                let acked = match deliveries.window.lock() {
                    Ok(mut window) => window.mark(seq as u64),
                    Err(_) => return,
                };
                deliveries.acked.store(acked, Ordering::Release);
            }
            Err((source, message)) => {
                // The commit LSN travels in the record's header; dead
                // letters have none.
                let lsn = message
                    .headers()
                    .and_then(|h| h.iter().find(|h| h.key == LSN_HEADER))
                    .and_then(|h| h.value)
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(Lsn::INVALID);
                deliveries.fail(message.topic(), lsn, source.clone());
            }
        }
        deliveries.moved.notify_waiters();
    }
}

impl Deliveries {
    /// Records the first failure; later ones add nothing the restart needs.
    fn fail(&self, topic: &str, lsn: Lsn, source: KafkaError) {
        if let Ok(mut failure) = self.failure.lock()
            && failure.is_none()
        {
            *failure = Some((topic.to_owned(), lsn, source));
        }
        self.failed.store(true, Ordering::Release);
    }
}

/// Header carrying the commit LSN of a record's change.
const LSN_HEADER: &str = "tidemark.lsn";

/// A table topic: its name and partition count (for truncates).
#[derive(Debug)]
struct TableTopic {
    schema: String,
    table: String,
    topic: String,
    partitions: i32,
}

/// The producer's Kafka connection and topic layout.
pub struct Sink {
    producer: ThreadedProducer<SinkContext>,
    deliveries: Arc<Deliveries>,
    /// Sequence number of the next record handed to librdkafka.
    next: AtomicU64,
    /// For the state topic and metadata: acknowledged one record at a time.
    state_producer: FutureProducer,
    prefix: String,
    dead_letter_topic: String,
    max_event_bytes: usize,
    topics: Vec<TableTopic>,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink")
            .field("topics", &self.topics)
            .finish()
    }
}

/// librdkafka settings shared by the producer's clients (the Kafka
/// layer's, named `tidemark-producer`).
pub fn client_config(kafka: &tidemark_schemas::config::Kafka) -> ClientConfig {
    tidemark_kafka::client_config(kafka, "tidemark-producer")
}

impl Sink {
    /// Connects, creates missing topics, and learns their partition counts.
    pub async fn connect(config: &Config, tables: &[(String, String)]) -> Result<Sink, SinkError> {
        let kafka = &config.kafka;
        let mut settings = client_config(kafka);
        settings
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("partitioner", "murmur2_random")
            .set("compression.type", "lz4")
            .set("linger.ms", "5")
            .set("queue.buffering.max.kbytes", QUEUE_MAX_KBYTES)
            // Never give up on a record: while Kafka is down the stream
            // stalls (and reports unready) instead of failing records.
            .set("message.timeout.ms", "0")
            .set(
                "message.max.bytes",
                (config.producer.max_event_bytes + 64 * 1024).to_string(),
            );
        let state_producer: FutureProducer = settings.create().map_err(SinkError::Client)?;

        // Fail fast, saying why, when no broker answers or takes us.
        check_reachable(kafka).await?;

        let deliveries = Arc::new(Deliveries::default());
        let producer = settings
            .create_with_context(SinkContext {
                deliveries: deliveries.clone(),
            })
            .map_err(SinkError::Client)?;

        let mut names: Vec<String> = tables
            .iter()
            .map(|(s, t)| kafka.table_topic(s, t))
            .collect();
        names.push(kafka.dead_letter_topic());
        ensure_topics(config, &names, kafka.partitions).await?;
        ensure_state_topic(config).await?;

        let mut topics = Vec::with_capacity(tables.len());
        for ((schema, table), topic) in tables.iter().zip(names) {
            let partitions = wait_for_partitions(&state_producer, &topic).await?;
            topics.push(TableTopic {
                schema: schema.clone(),
                table: table.clone(),
                topic,
                partitions,
            });
        }
        Ok(Sink {
            producer,
            deliveries,
            next: AtomicU64::new(0),
            state_producer,
            prefix: kafka.topic_prefix.clone(),
            dead_letter_topic: kafka.dead_letter_topic(),
            max_event_bytes: config.producer.max_event_bytes,
            topics,
        })
    }

    /// A producer for the state topic (same settings, own client).
    pub fn state_producer(&self) -> &FutureProducer {
        &self.state_producer
    }

    /// How many records were handed to librdkafka so far. Records
    /// `0..sent()` include every record sent before the call.
    pub fn sent(&self) -> u64 {
        self.next.load(Ordering::Acquire)
    }

    /// How many records, from the first, Kafka acknowledged without a gap.
    pub fn acked(&self) -> u64 {
        self.deliveries.acked.load(Ordering::Acquire)
    }

    /// The first failed delivery, if any. A failure is final: the records
    /// from it on are never counted as acknowledged.
    pub fn failure(&self) -> Option<SinkError> {
        if !self.deliveries.failed.load(Ordering::Acquire) {
            return None;
        }
        let failure = self.deliveries.failure.lock().ok()?;
        failure
            .as_ref()
            .map(|(topic, lsn, source)| SinkError::Send {
                topic: topic.clone(),
                lsn: *lsn,
                source: source.clone(),
            })
    }

    /// Waits until records `0..count` are all acknowledged, or one failed.
    pub async fn acknowledged(&self, count: u64) -> Result<(), SinkError> {
        loop {
            let moved = self.deliveries.moved.notified();
            tokio::pin!(moved);
            moved.as_mut().enable();
            if let Some(error) = self.failure() {
                return Err(error);
            }
            if self.acked() >= count {
                return Ok(());
            }
            moved.await;
        }
    }

    /// Hands one event to Kafka; oversized events go to the dead-letter
    /// topic instead. Waits (backpressure) while the send queue is full.
    pub async fn send(&self, event: &ChangeEvent) -> Result<(), SinkError> {
        if let Some(error) = self.failure() {
            return Err(error);
        }
        let known = self
            .topics
            .iter()
            .find(|t| t.schema == event.source.schema && t.table == event.source.table);
        let owned;
        let (topic, partitions) = match known {
            Some(t) => (t.topic.as_str(), t.partitions),
            None => {
                owned = format!(
                    "{}.{}.{}",
                    self.prefix, event.source.schema, event.source.table
                );
                (owned.as_str(), 1)
            }
        };
        let payload = event.to_vec();
        let key = record_key(&event.source, &event.key);
        if payload.len() > self.max_event_bytes {
            let reason = format!(
                "event of {} bytes exceeds producer.max_event_bytes ({})",
                payload.len(),
                self.max_event_bytes
            );
            warn!(table = %event.source.qualified(), lsn = %event.lsn, commit_lsn = %event.commit_lsn,
                  bytes = payload.len(), "oversized event sent to the dead-letter topic");
            return self
                .dead_letter(Some(event), None, &reason, event.lsn)
                .await;
        }
        // A truncate (or a resnapshot's marker) goes to every partition,
        // ordered with every key; anything else to the partition of its key.
        let truncate = matches!(event.op, Operation::Truncate | Operation::Resnapshot);
        let targets = if truncate { partitions } else { 1 };
        let timestamp = commit_millis(&event.commit_time);
        let lsn = event.commit_lsn.to_string();
        for partition in 0..targets {
            let headers = OwnedHeaders::new_with_capacity(2)
                .insert(Header {
                    key: LSN_HEADER,
                    value: Some(lsn.as_bytes()),
                })
                .insert(Header {
                    key: "tidemark.op",
                    value: Some(event.op.as_str().as_bytes()),
                });
            let mut record = BaseRecord::with_opaque_to(topic, 0)
                .key(&key)
                .payload(&payload)
                .headers(headers);
            if let Some(ts) = timestamp {
                record = record.timestamp(ts);
            }
            if truncate {
                record = record.partition(partition);
            }
            self.enqueue(record, event.commit_lsn).await?;
        }
        Ok(())
    }

    /// Sends a dead-letter record: where the change came from and why it was
    /// set aside, with its key when known; never row contents.
    pub async fn dead_letter(
        &self,
        event: Option<&ChangeEvent>,
        table: Option<&str>,
        reason: &str,
        lsn: Lsn,
    ) -> Result<(), SinkError> {
        let letter = DeadLetter::new(Stage::Producer, event, table, reason);
        let letter = DeadLetter {
            lsn: Some(lsn),
            topic: letter
                .table
                .as_ref()
                .map(|table| format!("{}.{table}", self.prefix)),
            ..letter
        };
        let payload = letter.to_vec();
        let key = event
            .map(|e| record_key(&e.source, &e.key))
            .unwrap_or_default();
        let record = BaseRecord::with_opaque_to(&self.dead_letter_topic, 0)
            .key(&key)
            .payload(&payload);
        self.enqueue(record, lsn).await
    }

    /// Enqueues a record under the next sequence number, waiting while
    /// librdkafka's queue is full.
    async fn enqueue(
        &self,
        mut record: BaseRecord<'_, Vec<u8>, Vec<u8>, usize>,
        lsn: Lsn,
    ) -> Result<(), SinkError> {
        record.delivery_opaque = self.next.fetch_add(1, Ordering::AcqRel) as usize;
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    record = returned;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((source, returned)) => {
                    // Its sequence number will never be acknowledged:
                    // waiters must see why.
                    self.deliveries.fail(returned.topic, lsn, source.clone());
                    self.deliveries.moved.notify_waiters();
                    return Err(SinkError::Send {
                        topic: returned.topic.to_owned(),
                        lsn,
                        source,
                    });
                }
            }
        }
    }

    /// Waits for everything queued to be acknowledged (shutdown).
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer.flush(Timeout::After(timeout))
    }
}

/// Milliseconds since the Unix epoch of a commit time.
fn commit_millis(commit_time: &str) -> Option<i64> {
    tidemark_schemas::commit_time::unix_millis(commit_time)
}

/// How long a topic just created may take to show up with leaders for all
/// its partitions (a fresh broker elects them after `CreateTopics` returns).
const TOPIC_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The partition count of `topic`, once every partition has a leader.
pub async fn wait_for_partitions(producer: &FutureProducer, topic: &str) -> Result<i32, SinkError> {
    let deadline = tokio::time::Instant::now() + TOPIC_READY_TIMEOUT;
    loop {
        // fetch_metadata blocks on the network; keep it off the async workers.
        let probe = producer.clone();
        let name = topic.to_owned();
        let ready = tokio::task::spawn_blocking(move || {
            let metadata = probe
                .client()
                .fetch_metadata(Some(&name), CONNECT_TIMEOUT)?;
            Ok::<_, KafkaError>(metadata.topics().first().map(|t| {
                let partitions = t.partitions();
                let led = partitions
                    .iter()
                    .all(|p| p.leader() >= 0 && p.error().is_none());
                (partitions.len(), led && t.error().is_none())
            }))
        })
        .await
        .map_err(|_| SinkError::Client(KafkaError::Canceled))?
        .map_err(SinkError::Client)?;
        match ready {
            Some((count, true)) if count > 0 => return Ok(count as i32),
            _ if tokio::time::Instant::now() >= deadline => {
                return Err(SinkError::NoPartitions(topic.to_owned()));
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Fails with a how-to-fix error when no broker answers or takes us.
pub async fn check_reachable(kafka: &tidemark_schemas::config::Kafka) -> Result<(), SinkError> {
    tidemark_kafka::check(kafka, "tidemark-producer", CONNECT_TIMEOUT).await?;
    tracing::info!(brokers = %kafka.brokers, security = %tidemark_kafka::describe(kafka), "Kafka reachable");
    Ok(())
}

async fn admin(config: &Config) -> Result<AdminClient<DefaultClientContext>, SinkError> {
    client_config(&config.kafka)
        .create()
        .map_err(SinkError::Client)
}

async fn ensure_topics(
    config: &Config,
    topics: &[String],
    partitions: i32,
) -> Result<(), SinkError> {
    let admin = admin(config).await?;
    let factor = config.kafka.replication_factor;
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(factor)))
        .collect();
    create(&admin, &new).await
}

/// The state topic: one partition, compacted, so the latest record per slot
/// is kept forever.
async fn ensure_state_topic(config: &Config) -> Result<(), SinkError> {
    let admin = admin(config).await?;
    let topic = config.kafka.state_topic();
    let new = NewTopic::new(
        &topic,
        1,
        TopicReplication::Fixed(config.kafka.replication_factor),
    )
    .set("cleanup.policy", "compact");
    create(&admin, &[new]).await
}

async fn create(
    admin: &AdminClient<DefaultClientContext>,
    topics: &[NewTopic<'_>],
) -> Result<(), SinkError> {
    let options = AdminOptions::new().operation_timeout(Some(CONNECT_TIMEOUT));
    let results = admin
        .create_topics(topics, &options)
        .await
        .map_err(SinkError::Client)?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(SinkError::CreateTopic {
                    topic,
                    reason: code.to_string(),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acknowledged_prefix_waits_for_every_gap() {
        let mut window = AckWindow::default();
        // Reports of different partitions arrive out of order.
        assert_eq!(window.mark(2), 0);
        assert_eq!(window.mark(1), 0);
        assert_eq!(window.mark(4), 0);
        assert_eq!(window.mark(0), 3, "0, 1, 2 acknowledged; 3 is the gap");
        assert_eq!(window.mark(3), 5);
        assert!(window.done.is_empty());
        // A report below the prefix (cannot happen) changes nothing.
        assert_eq!(window.mark(1), 5);
        assert_eq!(window.mark(5), 6);
    }

    #[test]
    fn acknowledged_prefix_in_any_order_ends_complete() {
        // Every permutation of a small window ends with the full prefix, and
        // the prefix never passes a number not yet marked.
        let mut order: Vec<u64> = (0..7).collect();
        for round in 0..500u64 {
            // A deterministic shuffle (LCG), so a failure is reproducible.
            let mut state = round.wrapping_mul(6364136223846793005).wrapping_add(1);
            for i in (1..order.len()).rev() {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                order.swap(i, (state >> 33) as usize % (i + 1));
            }
            let mut window = AckWindow::default();
            let mut marked = [false; 7];
            for &seq in &order {
                marked[seq as usize] = true;
                let prefix = window.mark(seq);
                assert!(marked[..prefix as usize].iter().all(|m| *m));
                assert!(prefix == 7 || !marked[prefix as usize]);
            }
            assert_eq!(window.base, 7);
        }
    }

    #[test]
    fn commit_time_to_kafka_timestamp() {
        assert_eq!(
            commit_millis("2026-11-22T00:00:00.123456Z"),
            Some(1_795_305_600_123)
        );
        assert_eq!(commit_millis("not a time"), None);
    }
}
