//! The latest record of each key in a compacted single-partition topic (the
//! state topic: the producer reads its own progress from it and the other
//! slots' records, the consumer the pipeline's identity).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

/// Errors a just-created topic gives until its partition has a leader.
fn is_not_ready(error: &KafkaError) -> bool {
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

/// The payload of the last record keyed `key` in partition 0 of `topic`,
/// reading it to its end; `None` when the topic holds none (or its last is
/// a tombstone). As [`latest_records`], which says how it blocks.
pub fn latest_record(
    config: ClientConfig,
    topic: &str,
    key: &str,
    timeout: Duration,
) -> Result<Option<Vec<u8>>, KafkaError> {
    Ok(latest_records(config, topic, timeout)?.remove(key.as_bytes()))
}

/// The payload of the last record of every key in partition 0 of `topic`,
/// reading it to its end; a key whose last record is a tombstone (no
/// payload) is left out, as compaction will. `config` is a client's
/// settings (see [`crate::client_config`]) with a `group.id`; nothing is
/// committed. Blocks: call it off the async runtime. A topic created a
/// moment ago is waited for up to twice `timeout`; reading it to its end,
/// up to four times `timeout` (then `KafkaError::Canceled`). Memory: one
/// payload per key (the state topic holds one small record per slot).
pub fn latest_records(
    mut config: ClientConfig,
    topic: &str,
    timeout: Duration,
) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, KafkaError> {
    let consumer: BaseConsumer = config.set("enable.auto.commit", "false").create()?;
    let deadline = Instant::now() + timeout * 2;
    let (low, high) = loop {
        match consumer.fetch_watermarks(topic, 0, timeout) {
            Ok(marks) => break marks,
            Err(error) if Instant::now() < deadline && is_not_ready(&error) => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(error) => return Err(error),
        }
    };
    let mut latest = BTreeMap::new();
    if high <= low {
        return Ok(latest);
    }
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, 0, Offset::Offset(low))?;
    consumer.assign(&assignment)?;
    let deadline = Instant::now() + timeout * 4;
    loop {
        if Instant::now() > deadline {
            return Err(KafkaError::Canceled);
        }
        let Some(message) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let message = message?;
        if let Some(key) = message.key() {
            match message.payload() {
                Some(payload) => latest.insert(key.to_vec(), payload.to_vec()),
                None => latest.remove(key),
            };
        }
        if message.offset() + 1 >= high {
            return Ok(latest);
        }
    }
}

/// The cluster id the brokers of `kafka` report. Blocks.
pub fn cluster_id(
    kafka: &tidemark_schemas::config::Kafka,
    client_id: &str,
    timeout: Duration,
) -> Result<String, KafkaError> {
    let consumer: BaseConsumer = crate::client_config(kafka, client_id).create()?;
    consumer
        .client()
        .fetch_cluster_id(rdkafka::util::Timeout::After(timeout))
        .ok_or(KafkaError::Canceled)
}

/// The PostgreSQL system identifier and database the producer of `slot`
/// recorded in the state topic (see `tidemark_schemas::state`); `(None,
/// None)` when the topic or the slot's record does not exist yet (the
/// producer has not run), or the record predates those fields. `group` is
/// the reader's `group.id` (nothing joins or commits; with ACLs, name one
/// the client may use). Blocks.
pub fn recorded_source(
    kafka: &tidemark_schemas::config::Kafka,
    client_id: &str,
    group: &str,
    slot: &str,
    timeout: Duration,
) -> Result<(Option<String>, Option<String>), KafkaError> {
    Ok(
        match recorded_progress(kafka, client_id, group, slot, timeout)? {
            Some(progress) => (progress.system_id, progress.database),
            None => (None, None),
        },
    )
}

/// The producer's latest record for `slot` in the state topic (see
/// `tidemark_schemas::state`); `None` when the topic or the slot's record
/// does not exist yet (the producer has not run) or does not parse.
/// `group` as for [`recorded_source`]. Blocks.
pub fn recorded_progress(
    kafka: &tidemark_schemas::config::Kafka,
    client_id: &str,
    group: &str,
    slot: &str,
    timeout: Duration,
) -> Result<Option<tidemark_schemas::state::SlotProgress>, KafkaError> {
    let topic = kafka.state_topic();

    let mut config = crate::client_config(kafka, client_id);
    config.set("group.id", group);
    let probe: BaseConsumer = config.create()?;
    let metadata = probe.fetch_metadata(Some(&topic), timeout)?;
    let exists = metadata
        .topics()
        .first()
        .is_some_and(|t| t.error().is_none() && !t.partitions().is_empty());
    drop(probe);
    if !exists {
        return Ok(None);
    }
    let Some(payload) = latest_record(config, &topic, slot, timeout)? else {
        return Ok(None);
    };
    Ok(serde_json::from_slice(&payload).ok())
}
