//! The consumer's one error type: what stops `prepare` or `run`. Every
//! variant says what it was doing (naming the topic, the record's
//! topic/partition/offset, or the config field) and carries no row.
//!
//! What the consumer waits out (OpenSearch down, an index closed, a refused
//! credential mid-run) never becomes one of these: the apply loop retries
//! it and says so on `/readyz` (`tidemark_index::apply`). These end the
//! process, which its supervisor restarts.

use rdkafka::error::KafkaError;
use tidemark_index::error::IndexError;
use tidemark_kafka::CheckError;
use tidemark_schemas::config::ConfigError;

/// Why the consumer could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    /// The config lacks what the consumer needs (`opensearch`, ...).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// OpenSearch refused or could not be reached at start-up, or an index
    /// could not be created, checked or claimed.
    #[error(transparent)]
    Index(#[from] IndexError),
    /// No broker answered, or the brokers refused this client.
    #[error(transparent)]
    KafkaCheck(#[from] CheckError),
    /// A Kafka client could not be made or used: `what` names the step.
    #[error("{what}")]
    Kafka {
        what: String,
        #[source]
        source: KafkaError,
    },
    /// A task of the consumer's own failed (a panic in a batch).
    #[error("{0}")]
    Task(String),
}

impl ConsumerError {
    /// A Kafka step that failed, named.
    pub(crate) fn kafka(what: impl Into<String>) -> impl FnOnce(KafkaError) -> Self {
        let what = what.into();
        move |source| Self::Kafka { what, source }
    }
}
