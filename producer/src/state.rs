//! The producer's own progress record, kept in a compacted Kafka topic
//! (one record per slot, latest wins), as Kafka Connect keeps its offsets.
//!
//! It answers two questions at start-up that the slot alone cannot:
//! - Did the initial snapshot finish? The record "snapshot started" is
//!   written *before* the slot is created, so a crash at any point of the
//!   snapshot leaves a record that says so, and the next start drops the
//!   slot and takes the snapshot again (re-sending rows is harmless: they
//!   carry the snapshot LSN as their version).
//! - Did anything else move the slot? Before every confirmation to
//!   PostgreSQL the producer records the LSN it is about to confirm, so the
//!   slot can never be ahead of the record unless another reader consumed
//!   it, which would mean changes never reached Kafka.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tidemark_schemas::Lsn;

use crate::sink::{SinkError, client_config};

const READ_TIMEOUT: Duration = Duration::from_secs(15);

/// The latest progress of one slot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlotProgress {
    pub slot: String,
    /// The initial snapshot finished and every row of it is in Kafka.
    pub snapshot_complete: bool,
    /// The LSN the snapshot is consistent at, once known.
    #[serde(default)]
    pub snapshot_lsn: Option<Lsn>,
    /// The highest LSN confirmed (or about to be) to PostgreSQL.
    #[serde(default)]
    pub confirmed_lsn: Option<Lsn>,
}

pub struct StateStore {
    producer: FutureProducer,
    brokers: String,
    topic: String,
}

impl std::fmt::Debug for StateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StateStore({})", self.topic)
    }
}

impl StateStore {
    pub fn new(producer: FutureProducer, brokers: &str, topic: &str) -> StateStore {
        StateStore {
            producer,
            brokers: brokers.to_owned(),
            topic: topic.to_owned(),
        }
    }

    /// The latest record for `slot`, reading the topic to its end.
    pub async fn load(&self, slot: &str) -> Result<Option<SlotProgress>, SinkError> {
        let brokers = self.brokers.clone();
        let topic = self.topic.clone();
        let slot = slot.to_owned();
        tokio::task::spawn_blocking(move || read_latest(&brokers, &topic, &slot))
            .await
            .map_err(|_| SinkError::Client(rdkafka::error::KafkaError::Canceled))?
    }

    /// Writes a record and waits until Kafka acknowledged it.
    pub async fn save(&self, progress: &SlotProgress) -> Result<(), SinkError> {
        let payload = serde_json::to_vec(progress).unwrap_or_default();
        let record = FutureRecord::to(&self.topic)
            .key(&progress.slot)
            .payload(&payload);
        let lsn = progress
            .confirmed_lsn
            .or(progress.snapshot_lsn)
            .unwrap_or_default();
        match self.producer.send(record, READ_TIMEOUT).await {
            Ok(_) => Ok(()),
            Err((source, _)) => Err(SinkError::Send {
                topic: self.topic.clone(),
                lsn,
                source,
            }),
        }
    }
}

/// Errors a just-created topic gives until its partition has a leader.
fn is_not_ready(error: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode::*;
    matches!(
        error.rdkafka_error_code(),
        Some(
            UnknownPartition
                | UnknownTopicOrPartition
                | UnknownTopic
                | LeaderNotAvailable
                | NotLeaderForPartition
        )
    )
}

fn read_latest(brokers: &str, topic: &str, slot: &str) -> Result<Option<SlotProgress>, SinkError> {
    let consumer: BaseConsumer = client_config(brokers)
        .set("group.id", "tidemark-producer-state-reader")
        .set("enable.auto.commit", "false")
        .create()
        .map_err(SinkError::Client)?;
    // A state topic created a moment ago may not have a leader yet.
    let deadline = std::time::Instant::now() + READ_TIMEOUT * 2;
    let (low, high) = loop {
        match consumer.fetch_watermarks(topic, 0, READ_TIMEOUT) {
            Ok(marks) => break marks,
            Err(error) if std::time::Instant::now() < deadline && is_not_ready(&error) => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(error) => return Err(SinkError::Client(error)),
        }
    };
    if high <= low {
        return Ok(None);
    }
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, 0, Offset::Offset(low))
        .map_err(SinkError::Client)?;
    consumer.assign(&assignment).map_err(SinkError::Client)?;
    let mut latest = None;
    let deadline = std::time::Instant::now() + READ_TIMEOUT * 4;
    loop {
        if std::time::Instant::now() > deadline {
            return Err(SinkError::Client(rdkafka::error::KafkaError::Canceled));
        }
        let Some(message) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let message = message.map_err(SinkError::Client)?;
        if message.key() == Some(slot.as_bytes())
            && let Some(payload) = message.payload()
            && let Ok(progress) = serde_json::from_slice::<SlotProgress>(payload)
        {
            latest = Some(progress);
        }
        if message.offset() + 1 >= high {
            return Ok(latest);
        }
    }
}
