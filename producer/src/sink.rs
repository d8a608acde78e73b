//! The Kafka side of the producer: topics, records, dead letters.
//!
//! Delivery contract: every record goes through one idempotent producer with
//! `acks=all`, so a record Kafka acknowledged is on every in-sync replica and
//! retries never duplicate or reorder within a partition. Sending returns a
//! [`Pending`] delivery; the caller confirms source positions only once the
//! deliveries before them resolved (see `stream`).
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

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use serde_json::json;
use tidemark_schemas::config::Config;
use tidemark_schemas::{ChangeEvent, Lsn, Operation, record_key};
use tracing::warn;

/// How long start-up waits for Kafka to answer before failing.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Upper bound of librdkafka's send queue. Bounds the producer's memory
/// for records not yet acknowledged; a full queue is backpressure.
const QUEUE_MAX_KBYTES: &str = "65536";

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error(
        "cannot reach Kafka at {brokers}: {source}. Check kafka.brokers (or TIDEMARK_KAFKA_BROKERS) and that the brokers are up"
    )]
    Unreachable {
        brokers: String,
        #[source]
        source: KafkaError,
    },
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

/// A record handed to Kafka whose acknowledgement is still to come.
pub struct Pending {
    pub topic: String,
    pub lsn: Lsn,
    pub delivery: DeliveryFuture,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pending({} at {})", self.topic, self.lsn)
    }
}

impl Pending {
    /// Waits for Kafka's acknowledgement.
    pub async fn acknowledged(self) -> Result<(), SinkError> {
        let failed = |source| SinkError::Send {
            topic: self.topic.clone(),
            lsn: self.lsn,
            source,
        };
        match self.delivery.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((error, _))) => Err(failed(error)),
            Err(_) => Err(failed(KafkaError::Canceled)),
        }
    }
}

/// The producer's Kafka connection and topic layout.
pub struct Sink {
    producer: FutureProducer,
    prefix: String,
    dead_letter_topic: String,
    max_event_bytes: usize,
    /// Partition count of each table topic, for truncates.
    partitions: HashMap<String, i32>,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink")
            .field("topics", &self.partitions.keys())
            .finish()
    }
}

/// librdkafka settings shared by the producer's clients.
pub fn client_config(brokers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("client.id", "tidemark-producer");
    config
}

impl Sink {
    /// Connects, creates missing topics, and learns their partition counts.
    pub async fn connect(config: &Config, tables: &[(String, String)]) -> Result<Sink, SinkError> {
        let kafka = &config.kafka;
        let producer: FutureProducer = client_config(&kafka.brokers)
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
            )
            .create()
            .map_err(SinkError::Client)?;

        // Fail fast when no broker answers.
        let probe = producer.clone();
        tokio::task::spawn_blocking(move || probe.client().fetch_metadata(None, CONNECT_TIMEOUT))
            .await
            .map_err(|_| SinkError::Client(KafkaError::Canceled))?
            .map_err(|source| SinkError::Unreachable {
                brokers: kafka.brokers.clone(),
                source,
            })?;

        let mut topics: Vec<String> = tables
            .iter()
            .map(|(s, t)| kafka.table_topic(s, t))
            .collect();
        let table_topics = topics.clone();
        topics.push(kafka.dead_letter_topic());
        ensure_topics(config, &topics, kafka.partitions).await?;
        ensure_state_topic(config).await?;

        let mut partitions = HashMap::new();
        for topic in table_topics {
            let count = wait_for_partitions(&producer, &topic).await?;
            partitions.insert(topic, count);
        }
        Ok(Sink {
            producer,
            prefix: kafka.topic_prefix.clone(),
            dead_letter_topic: kafka.dead_letter_topic(),
            max_event_bytes: config.producer.max_event_bytes,
            partitions,
        })
    }

    pub fn producer(&self) -> &FutureProducer {
        &self.producer
    }

    /// Hands one event to Kafka; oversized events go to the dead-letter
    /// topic instead. Waits (backpressure) while the send queue is full.
    pub async fn send(&self, event: &ChangeEvent) -> Result<Vec<Pending>, SinkError> {
        let topic = format!(
            "{}.{}.{}",
            self.prefix, event.source.schema, event.source.table
        );
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
            return Ok(vec![
                self.dead_letter(Some(event), None, &reason, event.lsn)
                    .await?,
            ]);
        }
        let partitions: Vec<Option<i32>> = if event.op == Operation::Truncate {
            (0..self.partitions.get(&topic).copied().unwrap_or(1))
                .map(Some)
                .collect()
        } else {
            vec![None]
        };
        let timestamp = commit_millis(&event.commit_time);
        let mut out = Vec::with_capacity(partitions.len());
        for partition in partitions {
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "tidemark.lsn",
                    value: Some(event.commit_lsn.to_string().as_bytes()),
                })
                .insert(Header {
                    key: "tidemark.op",
                    value: Some(event.op.as_str().as_bytes()),
                });
            let mut record = FutureRecord::to(&topic)
                .key(&key)
                .payload(&payload)
                .headers(headers);
            if let Some(ts) = timestamp {
                record = record.timestamp(ts);
            }
            if let Some(p) = partition {
                record = record.partition(p);
            }
            let delivery = self.enqueue(record, event.commit_lsn).await?;
            out.push(Pending {
                topic: topic.clone(),
                lsn: event.commit_lsn,
                delivery,
            });
        }
        Ok(out)
    }

    /// Sends a dead-letter record: where the change came from and why it was
    /// set aside, with its key when known; never row contents.
    pub async fn dead_letter(
        &self,
        event: Option<&ChangeEvent>,
        table: Option<&str>,
        reason: &str,
        lsn: Lsn,
    ) -> Result<Pending, SinkError> {
        let table = event
            .map(|e| e.source.qualified())
            .or(table.map(str::to_owned));
        let body = json!({
            "stage": "producer",
            "table": table,
            "key": event.map(|e| &e.key),
            "op": event.map(|e| e.op.as_str()),
            "commit_lsn": event.map(|e| e.commit_lsn),
            "lsn": lsn,
            "commit_time": event.map(|e| &e.commit_time),
            "reason": reason,
        });
        let payload = serde_json::to_vec(&body).unwrap_or_default();
        let key = event
            .map(|e| record_key(&e.source, &e.key))
            .unwrap_or_default();
        let record = FutureRecord::to(&self.dead_letter_topic)
            .key(&key)
            .payload(&payload);
        let delivery = self.enqueue(record, lsn).await?;
        Ok(Pending {
            topic: self.dead_letter_topic.clone(),
            lsn,
            delivery,
        })
    }

    /// Enqueues a record, waiting while librdkafka's queue is full.
    async fn enqueue(
        &self,
        mut record: FutureRecord<'_, Vec<u8>, Vec<u8>>,
        lsn: Lsn,
    ) -> Result<DeliveryFuture, SinkError> {
        loop {
            match self.producer.send_result(record) {
                Ok(delivery) => return Ok(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    record = returned;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((source, returned)) => {
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

/// Milliseconds since the Unix epoch of an RFC 3339 commit time.
fn commit_millis(commit_time: &str) -> Option<i64> {
    commit_time
        .parse::<jiff::Timestamp>()
        .ok()
        .map(|t| t.as_millisecond())
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

/// Fails with a how-to-fix error when no broker answers.
pub async fn check_reachable(brokers: &str) -> Result<(), SinkError> {
    let client: rdkafka::consumer::BaseConsumer =
        client_config(brokers).create().map_err(SinkError::Client)?;
    let owned = brokers.to_owned();
    tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::Consumer;
        client.fetch_metadata(None, CONNECT_TIMEOUT).map(|_| ())
    })
    .await
    .map_err(|_| SinkError::Client(KafkaError::Canceled))?
    .map_err(|source| SinkError::Unreachable {
        brokers: owned,
        source,
    })
}

async fn admin(config: &Config) -> Result<AdminClient<DefaultClientContext>, SinkError> {
    client_config(&config.kafka.brokers)
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
    fn commit_time_to_kafka_timestamp() {
        assert_eq!(
            commit_millis("2026-11-22T00:00:00.123456Z"),
            Some(1_795_305_600_123)
        );
        assert_eq!(commit_millis("not a time"), None);
    }
}
