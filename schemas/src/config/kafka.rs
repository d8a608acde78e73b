//! `[kafka]`: the brokers and the names of the pipeline's topics.

use std::collections::BTreeMap;

use super::{ConfigError, Secret, invalid, is_topic_name};
use serde::Deserialize;

/// librdkafka properties `[kafka.properties]` may not set: Tidemark's
/// guarantees rest on them (no loss, no reordering, offsets stored only
/// after a record is applied), or another field already says them.
const REFUSED: [(&str, &str); 13] = [
    ("bootstrap.servers", "set kafka.brokers"),
    ("client.id", "each client names itself"),
    ("group.id", "set consumer.group_id"),
    ("acks", "the producer needs acks=all to lose nothing"),
    (
        "enable.idempotence",
        "the producer needs idempotence to keep order on retries",
    ),
    (
        "max.in.flight.requests.per.connection",
        "idempotence bounds it",
    ),
    ("message.timeout.ms", "a record is never given up on (0)"),
    (
        "partitioner",
        "a row's changes must land in one partition (murmur2)",
    ),
    (
        "transactional.id",
        "Tidemark's producer is idempotent, not transactional",
    ),
    (
        "enable.auto.commit",
        "offsets are committed only after records are applied",
    ),
    (
        "enable.auto.offset.store",
        "offsets are stored only after records are applied",
    ),
    (
        "auto.offset.reset",
        "a new consumer group reads from the start",
    ),
    (
        "isolation.level",
        "Tidemark reads what its own producer wrote",
    ),
];

/// Default number of partitions for topics the producer creates. More
/// partitions allow more consumer instances; 3 suits a small deployment.
pub const DEFAULT_PARTITIONS: i32 = 3;
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kafka {
    /// Bootstrap servers, `host:port[,host:port...]`.
    pub brokers: String,
    /// Table topics are `<topic_prefix>.<schema>.<table>`.
    #[serde(default = "default_topic_prefix")]
    pub topic_prefix: String,
    /// Partitions of topics the producer creates.
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// Replication factor of topics the producer creates.
    #[serde(default = "default_replication_factor")]
    pub replication_factor: i32,
    /// Where undecodable or oversized records go; default `<prefix>.dead-letter`.
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
    /// The producer's progress record (snapshot done, last confirmed LSN);
    /// default `<prefix>.state`.
    #[serde(default)]
    pub state_topic: Option<String>,
    /// librdkafka properties for every client (producer, consumer, replay),
    /// e.g. `"security.protocol" = "sasl_ssl"`, `"sasl.mechanism"`,
    /// `"sasl.username"`, `"ssl.ca.location"`. Secrets are refused here:
    /// the SASL password comes from `TIDEMARK_KAFKA_PASSWORD`.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// `sasl.password`, from `TIDEMARK_KAFKA_PASSWORD` only.
    #[serde(skip)]
    pub password: Option<Secret>,
}

impl Kafka {
    pub fn table_topic(&self, schema: &str, table: &str) -> String {
        format!("{}.{schema}.{table}", self.topic_prefix)
    }
    pub fn dead_letter_topic(&self) -> String {
        self.dead_letter_topic
            .clone()
            .unwrap_or_else(|| format!("{}.dead-letter", self.topic_prefix))
    }
    pub fn state_topic(&self) -> String {
        self.state_topic
            .clone()
            .unwrap_or_else(|| format!("{}.state", self.topic_prefix))
    }
}

pub(crate) fn default_topic_prefix() -> String {
    "tidemark".into()
}
pub(crate) fn default_partitions() -> i32 {
    DEFAULT_PARTITIONS
}
pub(crate) fn default_replication_factor() -> i32 {
    1
}

impl Kafka {
    /// The `[kafka]` constraints.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        for name in self.properties.keys() {
            let field = format!("kafka.properties.\"{name}\"");
            let key = name.to_ascii_lowercase();
            if let Some((_, why)) = REFUSED.iter().find(|(refused, _)| *refused == key) {
                return Err(invalid(field, format!("Tidemark sets it: {why}")));
            }
            if key.contains("password") || key.contains("secret") || key.contains("jaas") {
                return Err(invalid(
                    field,
                    "secrets do not go in the file: put the SASL password in TIDEMARK_KAFKA_PASSWORD \
                     (and use key files that need no password)",
                ));
            }
        }
        if self.brokers.trim().is_empty() {
            return Err(invalid("kafka.brokers", "must name at least one host:port"));
        }
        if !is_topic_name(&self.topic_prefix) {
            return Err(invalid(
                "kafka.topic_prefix",
                "must be letters, digits, '.', '_' or '-' (a Kafka topic name)",
            ));
        }
        if self.partitions < 1 {
            return Err(invalid("kafka.partitions", "must be at least 1"));
        }
        if self.replication_factor < 1 {
            return Err(invalid("kafka.replication_factor", "must be at least 1"));
        }
        for (field, topic) in [
            ("kafka.dead_letter_topic", self.dead_letter_topic()),
            ("kafka.state_topic", self.state_topic()),
        ] {
            if !is_topic_name(&topic) {
                return Err(invalid(
                    field,
                    format!("{topic:?} is not a valid Kafka topic name"),
                ));
            }
        }
        Ok(())
    }
}
