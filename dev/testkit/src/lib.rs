//! Finds the local stack that `dev/stack up` started, and makes names that
//! keep tests apart.
//!
//! Integration tests run against real PostgreSQL, Kafka and OpenSearch that
//! the project starts itself on loopback. They learn where from the
//! environment (`eval "$(dev/stack env)"`, which `make test` does), or, when
//! a developer runs `cargo test` in a plain shell, from the file `dev/stack
//! up` writes (`.stack/env`). A test that finds neither fails with a message
//! that says how to start the stack: it never quietly skips.
//!
//! Every test creates its own tables, slots, topics and indices under
//! [`unique_name`]s, so tests running in parallel never see each other's
//! data, and no test touches anything it did not create.

pub mod bench;
pub mod kafka;
pub mod ports;
pub mod scratch;
pub mod topics;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Where the services of the local stack listen.
#[derive(Debug, Clone)]
pub struct Stack {
    /// PostgreSQL superuser URL, for tests that create schemas and tables.
    pub pg_url: String,
    /// PostgreSQL URL of the least-privilege replication role.
    pub pg_replication_url: String,
    /// Kafka bootstrap servers.
    pub kafka_brokers: String,
    /// OpenSearch base URL.
    pub opensearch_url: String,
}

const VARS: [&str; 4] = [
    "TIDEMARK_PG_URL",
    "TIDEMARK_PG_REPLICATION_URL",
    "TIDEMARK_KAFKA_BROKERS",
    "TIDEMARK_OPENSEARCH_URL",
];

impl Stack {
    /// The stack from the environment, else from `dev/stack`'s env file.
    ///
    /// # Panics
    /// When neither names all four services: a test cannot run without them,
    /// and the message says how to start them.
    pub fn get() -> Stack {
        match Self::from_sources(|name| std::env::var(name).ok(), &env_file_path()) {
            Ok(stack) => stack,
            Err(missing) => panic!(
                "the local stack is not configured ({missing}). Start it with \
                 `dev/stack up` (or run `make test`, which does), then \
                 `eval \"$(dev/stack env)\"`"
            ),
        }
    }

    fn from_sources(
        env: impl Fn(&str) -> Option<String>,
        env_file: &Path,
    ) -> Result<Stack, String> {
        let from_file = std::fs::read_to_string(env_file)
            .map(|text| parse_env_file(&text))
            .unwrap_or_default();
        let lookup = |name: &str| {
            env(name)
                .filter(|v| !v.is_empty())
                .or_else(|| from_file.get(name).cloned())
                .ok_or_else(|| format!("{name} is not set and {} has none", env_file.display()))
        };
        let [pg, repl, kafka, os] = VARS;
        Ok(Stack {
            pg_url: lookup(pg)?,
            pg_replication_url: lookup(repl)?,
            kafka_brokers: lookup(kafka)?,
            opensearch_url: lookup(os)?,
        })
    }
}

/// Where `dev/stack` keeps its state: `.stack` at the repository root, or
/// `TIDEMARK_STACK_DIR`.
pub fn stack_dir() -> PathBuf {
    std::env::var_os("TIDEMARK_STACK_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.stack"))
}

/// `.stack/env` in [`stack_dir`].
fn env_file_path() -> PathBuf {
    stack_dir().join("env")
}

/// Reads the `export NAME='value'` lines that `dev/stack env` prints.
fn parse_env_file(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("export "))
        .filter_map(|assignment| assignment.split_once('='))
        .map(|(name, value)| {
            let value = value.trim();
            let value = value
                .strip_prefix('\'')
                .and_then(|v| v.strip_suffix('\''))
                .unwrap_or(value);
            (name.trim().to_owned(), value.to_owned())
        })
        .collect()
}

/// Records in all partitions of `topic` (the sum of high watermarks); 0
/// while the topic does not exist yet. One client per call: for polling in
/// a tight loop, keep a [`RecordCount`].
pub fn topic_record_count(brokers: &str, topic: &str) -> i64 {
    RecordCount::new(brokers, topic).get()
}

/// Counts a topic's records (the sum of high watermarks) through one Kafka
/// client kept between calls.
pub struct RecordCount {
    consumer: Option<rdkafka::consumer::BaseConsumer>,
    topic: String,
    /// Learned once the topic exists.
    partitions: i32,
}

impl std::fmt::Debug for RecordCount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RecordCount({})", self.topic)
    }
}

impl RecordCount {
    pub fn new(brokers: &str, topic: &str) -> RecordCount {
        RecordCount {
            consumer: rdkafka::ClientConfig::new()
                .set("bootstrap.servers", brokers)
                .create()
                .ok(),
            topic: topic.to_owned(),
            partitions: 0,
        }
    }

    /// The records now; 0 while the topic does not exist.
    pub fn get(&mut self) -> i64 {
        use rdkafka::consumer::Consumer;
        let timeout = std::time::Duration::from_secs(5);
        let Some(consumer) = &self.consumer else {
            return 0;
        };
        if self.partitions == 0 {
            self.partitions = consumer
                .fetch_metadata(Some(&self.topic), timeout)
                .ok()
                .and_then(|m| m.topics().first().map(|t| t.partitions().len() as i32))
                .unwrap_or(0);
        }
        (0..self.partitions)
            .map(|p| {
                consumer
                    .fetch_watermarks(&self.topic, p, timeout)
                    .map(|(_, high)| high)
                    .unwrap_or(0)
            })
            .sum()
    }
}

/// A name no other test run will use: `prefix` plus 12 random hex digits.
///
/// Lower-case ASCII letters, digits and `_` only, so it is valid unquoted as
/// a PostgreSQL identifier, a replication slot, a Kafka topic and an
/// OpenSearch index.
pub fn unique_name(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}_{}", &id[..12])
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "export TIDEMARK_PG_URL='postgres://a:b@127.0.0.1:1/db'\n\
        export TIDEMARK_PG_REPLICATION_URL='postgres://r:s@127.0.0.1:1/db'\n\
        export TIDEMARK_KAFKA_BROKERS='127.0.0.1:2'\n\
        export TIDEMARK_OPENSEARCH_URL='http://127.0.0.1:3'\n";

    #[test]
    fn parses_what_dev_stack_env_prints() {
        let vars = parse_env_file(FILE);
        assert_eq!(vars["TIDEMARK_KAFKA_BROKERS"], "127.0.0.1:2");
        assert_eq!(vars["TIDEMARK_PG_URL"], "postgres://a:b@127.0.0.1:1/db");
        assert_eq!(vars.len(), 4);
    }

    #[test]
    fn environment_wins_over_the_file() {
        let dir = std::env::temp_dir().join(unique_name("testkit"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("env");
        std::fs::write(&file, FILE).expect("write env file");
        let env = |name: &str| (name == "TIDEMARK_KAFKA_BROKERS").then(|| "127.0.0.1:9".to_owned());
        let stack = Stack::from_sources(env, &file).expect("complete");
        assert_eq!(stack.kafka_brokers, "127.0.0.1:9");
        assert_eq!(stack.opensearch_url, "http://127.0.0.1:3");
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn names_what_is_missing() {
        let err =
            Stack::from_sources(|_| None, Path::new("/nonexistent/env")).expect_err("incomplete");
        assert!(err.contains("TIDEMARK_PG_URL is not set"), "{err}");
        assert!(err.contains("/nonexistent/env"), "{err}");
    }

    #[test]
    fn unique_names_are_identifiers_and_differ() {
        let a = unique_name("t");
        let b = unique_name("t");
        assert_ne!(a, b);
        assert_eq!(a.len(), "t_".len() + 12);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
        );
    }
}
