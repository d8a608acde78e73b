//! The one TOML file that drives a deployment: where PostgreSQL, Kafka and
//! OpenSearch are, which tables are captured, and how. The producer, the
//! consumer and the replay tools all read the same file.
//!
//! Parsing and validation only (no I/O): the binaries read the file and hand
//! the text in with the process environment. Unknown fields are errors, so a
//! typo never silently falls back to a default. Every constraint is checked
//! at start and a failure names the field (`producer.slot`,
//! `tables[2].table`, ...).
//!
//! Secrets come from the environment, never the file: `TIDEMARK_PG_PASSWORD`
//! fills in the PostgreSQL password. Environment overrides for whole URLs
//! (`TIDEMARK_POSTGRES_URL`, `TIDEMARK_KAFKA_BROKERS`,
//! `TIDEMARK_OPENSEARCH_URL`) let one file serve several environments.

use std::fmt;

use serde::Deserialize;

/// Default number of partitions for topics the producer creates. More
/// partitions allow more consumer instances; 3 suits a small deployment.
pub const DEFAULT_PARTITIONS: i32 = 3;
/// Default largest event, in bytes, sent to a table topic; larger ones go to
/// the dead-letter topic. Matches Kafka's default `message.max.bytes` (1 MB),
/// so an event the broker would refuse never stalls the stream.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1_000_000;
/// Default largest replication message the producer reads, in bytes: 1 GiB,
/// PostgreSQL's own limit for a value, so every row PostgreSQL can hold is
/// read (and, over `max_event_bytes`, dead-lettered). It costs memory only
/// when such a row comes: one message is held whole while it is decoded.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1 << 30;
/// Tables snapshotted at once. Each holds one PostgreSQL connection and a
/// cursor; 2 keeps a 2-core database responsive.
pub const DEFAULT_SNAPSHOT_PARALLELISM: usize = 2;
/// Rows fetched per cursor round trip in a snapshot: large enough to
/// amortize the round trip, small enough that memory stays flat.
pub const DEFAULT_SNAPSHOT_FETCH_ROWS: usize = 2_000;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub postgres: Postgres,
    pub kafka: Kafka,
    /// Where documents go. Needed by the consumer and replay, not by the
    /// producer.
    #[serde(default)]
    pub opensearch: Option<OpenSearch>,
    #[serde(default)]
    pub producer: Producer,
    #[serde(default)]
    pub consumer: Consumer,
    #[serde(default)]
    pub tables: Vec<Table>,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenSearch {
    /// Base URL, e.g. `https://search.internal:9200`.
    pub url: String,
    /// Basic-auth user; the password comes from `TIDEMARK_OPENSEARCH_PASSWORD`.
    #[serde(default)]
    pub username: Option<String>,
    #[serde(skip)]
    pub password: Option<Secret>,
    /// Timeout of one request (a bulk included), in seconds.
    #[serde(default = "default_request_timeout_secs")]
    pub request_timeout_secs: u64,
}

impl fmt::Debug for OpenSearch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenSearch")
            .field("url", &redact_url(&self.url))
            .field("username", &self.username)
            .field("password", &self.password)
            .field("request_timeout_secs", &self.request_timeout_secs)
            .finish()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Consumer {
    /// Kafka consumer group; run more consumers with the same group to share
    /// the partitions.
    #[serde(default = "default_group_id")]
    pub group_id: String,
    /// A bulk request is sent when its body reaches this size...
    #[serde(default = "default_batch_max_bytes")]
    pub batch_max_bytes: usize,
    /// ...or when its first record has waited this long.
    #[serde(default = "default_batch_max_wait_ms")]
    pub batch_max_wait_ms: u64,
    /// `/readyz` fails when the oldest unapplied record is older than this.
    #[serde(default = "default_ready_max_lag_secs")]
    pub ready_max_lag_secs: u64,
    /// Address of `/healthz`, `/readyz` and `/metrics`.
    #[serde(default = "default_consumer_http_listen")]
    pub http_listen: String,
}

impl Default for Consumer {
    fn default() -> Self {
        Consumer {
            group_id: default_group_id(),
            batch_max_bytes: DEFAULT_BATCH_MAX_BYTES,
            batch_max_wait_ms: DEFAULT_BATCH_MAX_WAIT_MS,
            ready_max_lag_secs: DEFAULT_READY_MAX_LAG_SECS,
            http_listen: default_consumer_http_listen(),
        }
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Postgres {
    /// Connection URL of the primary, e.g.
    /// `postgres://tidemark_repl@db.internal:5432/shop`. Put the password in
    /// `TIDEMARK_PG_PASSWORD`, not here.
    pub url: String,
    #[serde(skip)]
    pub password: Option<Secret>,
}

impl fmt::Debug for Postgres {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Postgres")
            .field("url", &redact_url(&self.url))
            .field("password", &self.password)
            .finish()
    }
}

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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Producer {
    /// Replication slot; one producer reads one slot.
    #[serde(default = "default_slot")]
    pub slot: String,
    /// Publication listing the captured tables.
    #[serde(default = "default_slot")]
    pub publication: String,
    /// Create the publication (for the configured tables) if it is missing.
    #[serde(default = "yes")]
    pub create_publication: bool,
    /// Create the slot if it is missing. A new slot starts with a snapshot
    /// of every configured table, consistent with the stream.
    #[serde(default = "yes")]
    pub create_slot: bool,
    /// Take the initial snapshot when the slot is created.
    #[serde(default = "yes")]
    pub snapshot: bool,
    #[serde(default = "default_snapshot_parallelism")]
    pub snapshot_parallelism: usize,
    #[serde(default = "default_snapshot_fetch_rows")]
    pub snapshot_fetch_rows: usize,
    #[serde(default = "default_max_event_bytes")]
    pub max_event_bytes: usize,
    /// Largest replication message read (one row change is one message).
    /// A larger one cannot be read nor skipped (the stream cannot resume
    /// past it): the producer then waits, backing off, with the table and
    /// LSN on `/readyz`, until this is raised.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Address of `/healthz`, `/readyz` and `/metrics`.
    #[serde(default = "default_http_listen")]
    pub http_listen: String,
}

impl Default for Producer {
    fn default() -> Self {
        Producer {
            slot: default_slot(),
            publication: default_slot(),
            create_publication: true,
            create_slot: true,
            snapshot: true,
            snapshot_parallelism: DEFAULT_SNAPSHOT_PARALLELISM,
            snapshot_fetch_rows: DEFAULT_SNAPSHOT_FETCH_ROWS,
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            http_listen: default_http_listen(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Table {
    /// `schema.table`.
    pub table: String,
    /// Target index or alias; default: the table's topic name
    /// (`<topic_prefix>.<schema>.<table>`), as Kafka Connect sinks do.
    #[serde(default)]
    pub index: Option<String>,
    /// Key columns that make the document id, in order; default: every
    /// primary-key column, in name order. Several columns are joined with
    /// `/` (a `/` or `%` inside a value is percent-escaped).
    #[serde(default)]
    pub id: Option<Vec<String>>,
    /// Only these columns go into the document (default: all).
    #[serde(default)]
    pub include: Option<Vec<String>>,
    /// These columns stay out of the document.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Column name -> document field name.
    #[serde(default)]
    pub rename: std::collections::BTreeMap<String, String>,
    /// Settings for an index the consumer creates, e.g.
    /// `{ number_of_shards = 1, number_of_replicas = 0 }`.
    #[serde(default)]
    pub index_settings: Option<toml::Table>,
    /// A JSON file with the index's `mappings` (relative paths are relative
    /// to the config file), used when the consumer creates the index.
    #[serde(default)]
    pub mappings_file: Option<std::path::PathBuf>,
    /// An `updated_at`-style column; audit dates drifted rows by it.
    #[serde(default)]
    pub audit_time_column: Option<String>,
}

impl Table {
    /// The target index (or alias) name.
    pub fn index_name(&self, kafka: &Kafka) -> String {
        match &self.index {
            Some(index) => index.clone(),
            None => {
                let (schema, table) = self.parts();
                kafka.table_topic(schema, table)
            }
        }
    }

    /// The schema and table name (validated to have both).
    pub fn parts(&self) -> (&str, &str) {
        self.table
            .split_once('.')
            .unwrap_or(("public", &self.table))
    }
}

/// A secret that `Debug` never prints.
#[derive(Clone)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Default bulk size: OpenSearch's guidance is 5-15 MB per bulk request.
pub const DEFAULT_BATCH_MAX_BYTES: usize = 5 * 1024 * 1024;
/// Default longest wait before a partial bulk is sent; with OpenSearch's 1 s
/// refresh this keeps commit-to-searchable well under 2 s.
pub const DEFAULT_BATCH_MAX_WAIT_MS: u64 = 200;
/// Default lag after which the consumer reports itself not ready.
pub const DEFAULT_READY_MAX_LAG_SECS: u64 = 300;
/// The field of every document that holds Tidemark's metadata (version,
/// commit LSN and time, content hash, key). Reserved: no column may map to it.
pub const META_FIELD: &str = "_tidemark";

fn default_request_timeout_secs() -> u64 {
    30
}
fn default_group_id() -> String {
    "tidemark-consumer".into()
}
fn default_batch_max_bytes() -> usize {
    DEFAULT_BATCH_MAX_BYTES
}
fn default_batch_max_wait_ms() -> u64 {
    DEFAULT_BATCH_MAX_WAIT_MS
}
fn default_ready_max_lag_secs() -> u64 {
    DEFAULT_READY_MAX_LAG_SECS
}
fn default_consumer_http_listen() -> String {
    "127.0.0.1:9465".into()
}
fn default_topic_prefix() -> String {
    "tidemark".into()
}
fn default_partitions() -> i32 {
    DEFAULT_PARTITIONS
}
fn default_replication_factor() -> i32 {
    1
}
fn default_slot() -> String {
    "tidemark".into()
}
fn yes() -> bool {
    true
}
fn default_snapshot_parallelism() -> usize {
    DEFAULT_SNAPSHOT_PARALLELISM
}
fn default_snapshot_fetch_rows() -> usize {
    DEFAULT_SNAPSHOT_FETCH_ROWS
}
fn default_max_event_bytes() -> usize {
    DEFAULT_MAX_EVENT_BYTES
}
fn default_max_message_bytes() -> usize {
    DEFAULT_MAX_MESSAGE_BYTES
}
fn default_http_listen() -> String {
    "127.0.0.1:9464".into()
}

/// A configuration that cannot work; names the field and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("config is not valid TOML for Tidemark: {0}")]
    Parse(String),
    #[error("{field}: {problem}")]
    Invalid { field: String, problem: String },
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        problem: problem.into(),
    }
}

impl Config {
    /// Parses and validates a config file's text, applying the environment
    /// overrides (`env` looks a variable up).
    pub fn from_toml(
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut config: Config =
            toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        let set = |name: &str| env(name).filter(|v| !v.is_empty());
        if let Some(url) = set("TIDEMARK_POSTGRES_URL") {
            config.postgres.url = url;
        }
        config.postgres.password = set("TIDEMARK_PG_PASSWORD").map(Secret);
        if let Some(brokers) = set("TIDEMARK_KAFKA_BROKERS") {
            config.kafka.brokers = brokers;
        }
        if let Some(url) = set("TIDEMARK_OPENSEARCH_URL") {
            match &mut config.opensearch {
                Some(opensearch) => opensearch.url = url,
                None => {
                    config.opensearch = Some(OpenSearch {
                        url,
                        username: None,
                        password: None,
                        request_timeout_secs: default_request_timeout_secs(),
                    })
                }
            }
        }
        if let Some(opensearch) = &mut config.opensearch {
            opensearch.password = set("TIDEMARK_OPENSEARCH_PASSWORD").map(Secret);
        }
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(self.postgres.url.starts_with("postgres://")
            || self.postgres.url.starts_with("postgresql://"))
        {
            return Err(invalid("postgres.url", "must be a postgres:// URL"));
        }
        if self.kafka.brokers.trim().is_empty() {
            return Err(invalid("kafka.brokers", "must name at least one host:port"));
        }
        if !is_topic_name(&self.kafka.topic_prefix) {
            return Err(invalid(
                "kafka.topic_prefix",
                "must be letters, digits, '.', '_' or '-' (a Kafka topic name)",
            ));
        }
        if self.kafka.partitions < 1 {
            return Err(invalid("kafka.partitions", "must be at least 1"));
        }
        if self.kafka.replication_factor < 1 {
            return Err(invalid("kafka.replication_factor", "must be at least 1"));
        }
        for (field, topic) in [
            ("kafka.dead_letter_topic", self.kafka.dead_letter_topic()),
            ("kafka.state_topic", self.kafka.state_topic()),
        ] {
            if !is_topic_name(&topic) {
                return Err(invalid(
                    field,
                    format!("{topic:?} is not a valid Kafka topic name"),
                ));
            }
        }
        for (field, name) in [
            ("producer.slot", &self.producer.slot),
            ("producer.publication", &self.producer.publication),
        ] {
            if !is_pg_name(name) {
                return Err(invalid(
                    field,
                    format!(
                        "{name:?} must be 1-63 characters of a-z, 0-9 and _ (PostgreSQL slot rules)"
                    ),
                ));
            }
        }
        if self.producer.snapshot_parallelism == 0 {
            return Err(invalid(
                "producer.snapshot_parallelism",
                "must be at least 1",
            ));
        }
        if self.producer.snapshot_fetch_rows == 0 {
            return Err(invalid(
                "producer.snapshot_fetch_rows",
                "must be at least 1",
            ));
        }
        if self.producer.max_event_bytes < 1024 {
            return Err(invalid("producer.max_event_bytes", "must be at least 1024"));
        }
        if self.producer.max_message_bytes < 1024
            || self.producer.max_message_bytes > DEFAULT_MAX_MESSAGE_BYTES
        {
            return Err(invalid(
                "producer.max_message_bytes",
                "must be from 1024 to 1073741824 (1 GiB, the protocol's limit)",
            ));
        }
        if self
            .producer
            .http_listen
            .parse::<std::net::SocketAddr>()
            .is_err()
        {
            return Err(invalid(
                "producer.http_listen",
                "must be an address like 127.0.0.1:9464",
            ));
        }
        if let Some(opensearch) = &self.opensearch {
            if !(opensearch.url.starts_with("http://") || opensearch.url.starts_with("https://")) {
                return Err(invalid(
                    "opensearch.url",
                    "must be an http:// or https:// URL",
                ));
            }
            if opensearch.request_timeout_secs == 0 {
                return Err(invalid(
                    "opensearch.request_timeout_secs",
                    "must be at least 1",
                ));
            }
        }
        if self.consumer.group_id.trim().is_empty() {
            return Err(invalid("consumer.group_id", "must not be empty"));
        }
        if self.consumer.batch_max_bytes < 1024 {
            return Err(invalid("consumer.batch_max_bytes", "must be at least 1024"));
        }
        if self.consumer.batch_max_wait_ms == 0 {
            return Err(invalid("consumer.batch_max_wait_ms", "must be at least 1"));
        }
        if self
            .consumer
            .http_listen
            .parse::<std::net::SocketAddr>()
            .is_err()
        {
            return Err(invalid(
                "consumer.http_listen",
                "must be an address like 127.0.0.1:9465",
            ));
        }
        if self.tables.is_empty() {
            return Err(invalid(
                "tables",
                "list at least one [[tables]] entry with table = \"schema.table\"",
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, table) in self.tables.iter().enumerate() {
            let field = format!("tables[{i}].table");
            let Some((schema, name)) = table.table.split_once('.') else {
                return Err(invalid(
                    field,
                    format!("{:?} must be schema.table", table.table),
                ));
            };
            if schema.is_empty() || name.is_empty() || name.contains('.') {
                return Err(invalid(
                    field,
                    format!("{:?} must be schema.table", table.table),
                ));
            }
            if !seen.insert(&table.table) {
                return Err(invalid(field, format!("{:?} is listed twice", table.table)));
            }
            if !is_topic_name(&self.kafka.table_topic(schema, name)) {
                return Err(invalid(
                    field,
                    format!("{:?} does not make a valid Kafka topic name", table.table),
                ));
            }
            table.validate_mapping(i, &self.kafka)?;
        }
        let mut indices = std::collections::HashMap::new();
        for (i, table) in self.tables.iter().enumerate() {
            if let Some(other) = indices.insert(table.index_name(&self.kafka), i) {
                return Err(invalid(
                    format!("tables[{i}].index"),
                    format!(
                        "{:?} is also the index of tables[{other}] ({}); each table needs its own index",
                        table.index_name(&self.kafka),
                        self.tables[other].table
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The `[opensearch]` section, which the consumer and replay need.
    pub fn opensearch(&self) -> Result<&OpenSearch, ConfigError> {
        self.opensearch.as_ref().ok_or_else(|| {
            invalid(
                "opensearch",
                "missing: add an [opensearch] section with url = \"http://host:9200\" (or set TIDEMARK_OPENSEARCH_URL)",
            )
        })
    }

    /// The configured table `schema.table`, if any.
    pub fn table(&self, schema: &str, table: &str) -> Option<&Table> {
        self.tables.iter().find(|t| t.parts() == (schema, table))
    }
}

impl Table {
    fn validate_mapping(&self, i: usize, kafka: &Kafka) -> Result<(), ConfigError> {
        let index = self.index_name(kafka);
        if !is_index_name(&index) {
            return Err(invalid(
                format!("tables[{i}].index"),
                format!(
                    "{index:?} is not a valid OpenSearch index name (lowercase; no spaces or \\/*?\"<>|,#; not starting with -, _ or +){}",
                    if self.index.is_none() {
                        "; set index = \"...\" for this table"
                    } else {
                        ""
                    }
                ),
            ));
        }
        if let Some(id) = &self.id
            && id.is_empty()
        {
            return Err(invalid(
                format!("tables[{i}].id"),
                "must list at least one key column",
            ));
        }
        if self.include.is_some() && !self.exclude.is_empty() {
            return Err(invalid(
                format!("tables[{i}].exclude"),
                "use include or exclude, not both",
            ));
        }
        let mut targets = std::collections::HashMap::new();
        for (column, field) in &self.rename {
            let name = format!("tables[{i}].rename.{column}");
            if field.is_empty() || field.starts_with('_') {
                return Err(invalid(
                    name,
                    format!(
                        "{field:?}: document fields must not be empty or start with '_' (reserved by OpenSearch and for {META_FIELD})"
                    ),
                ));
            }
            if let Some(other) = targets.insert(field.as_str(), column.as_str()) {
                return Err(invalid(
                    name,
                    format!("{field:?} is also the new name of column {other:?}"),
                ));
            }
            if self.exclude.contains(column)
                || self
                    .include
                    .as_ref()
                    .is_some_and(|inc| !inc.contains(column))
            {
                return Err(invalid(
                    name,
                    format!("column {column:?} is not in the document (see include/exclude)"),
                ));
            }
        }
        // A kept, unrenamed column whose name a rename also produces would
        // make two values for one field.
        let kept = |c: &String| !self.exclude.contains(c) && !self.rename.contains_key(c);
        if let Some(include) = &self.include {
            for column in include.iter().filter(|c| kept(c)) {
                if let Some(other) = targets.get(column.as_str()) {
                    return Err(invalid(
                        format!("tables[{i}].rename.{other}"),
                        format!("{column:?} is also an included column's name"),
                    ));
                }
            }
        }
        Ok(())
    }
}

fn is_topic_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 249
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn is_index_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.starts_with(['-', '_', '+'])
        && !name
            .chars()
            .any(|c| c.is_uppercase() || c.is_whitespace() || "\\/*?\"<>|,#:".contains(c))
}

fn is_pg_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// A URL with any password replaced, for logs and `Debug`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [postgres]
        url = "postgres://tidemark_repl@127.0.0.1:5432/shop"
        [kafka]
        brokers = "127.0.0.1:9092"
        [[tables]]
        table = "public.articles"
    "#;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let config = Config::from_toml(MINIMAL, no_env).expect("valid");
        assert_eq!(config.producer.slot, "tidemark");
        assert_eq!(config.kafka.partitions, DEFAULT_PARTITIONS);
        assert_eq!(
            config.kafka.table_topic("public", "articles"),
            "tidemark.public.articles"
        );
        assert_eq!(config.kafka.dead_letter_topic(), "tidemark.dead-letter");
        assert_eq!(config.producer.max_event_bytes, DEFAULT_MAX_EVENT_BYTES);
    }

    #[test]
    fn environment_supplies_secrets_and_overrides() {
        let env = |name: &str| match name {
            "TIDEMARK_PG_PASSWORD" => Some("hunter2".to_owned()),
            "TIDEMARK_KAFKA_BROKERS" => Some("10.0.0.1:9092".to_owned()),
            _ => None,
        };
        let config = Config::from_toml(MINIMAL, env).expect("valid");
        assert_eq!(config.kafka.brokers, "10.0.0.1:9092");
        let debug = format!("{config:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("Secret(***)"), "{debug}");
    }

    #[test]
    fn unknown_fields_are_errors() {
        let text = MINIMAL.replace("[kafka]", "[kafka]\nbrokerz = \"x\"");
        let err = Config::from_toml(&text, no_env).expect_err("typo");
        assert!(err.to_string().contains("unknown field `brokerz`"), "{err}");
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                MINIMAL.replace("public.articles", "articles"),
                "tables[0].table: \"articles\" must be schema.table",
            ),
            (
                MINIMAL.replace("[kafka]", "[producer]\nslot = \"Bad-Slot\"\n[kafka]"),
                "producer.slot:",
            ),
            (
                MINIMAL.replace("[kafka]", "[kafka]\npartitions = 0"),
                "kafka.partitions: must be at least 1",
            ),
            (
                MINIMAL.replace("postgres://", "mysql://"),
                "postgres.url: must be a postgres:// URL",
            ),
            (
                MINIMAL.to_owned() + "[[tables]]\ntable = \"public.articles\"\n",
                "tables[1].table: \"public.articles\" is listed twice",
            ),
            (
                MINIMAL.to_owned() + "include = [\"a\"]\nexclude = [\"b\"]\n",
                "tables[0].exclude: use include or exclude, not both",
            ),
            (
                MINIMAL.to_owned() + "rename = { a = \"x\", b = \"x\" }\n",
                "tables[0].rename.b: \"x\" is also the new name of column \"a\"",
            ),
            (
                MINIMAL.to_owned() + "rename = { a = \"_tidemark\" }\n",
                "tables[0].rename.a:",
            ),
            (
                MINIMAL.to_owned() + "exclude = [\"a\"]\nrename = { a = \"b\" }\n",
                "tables[0].rename.a: column \"a\" is not in the document",
            ),
            (
                MINIMAL.to_owned() + "index = \"Articles\"\n",
                "tables[0].index: \"Articles\" is not a valid OpenSearch index name",
            ),
            (
                MINIMAL.to_owned() + "id = []\n",
                "tables[0].id: must list at least one key column",
            ),
            (
                MINIMAL.to_owned()
                    + "index = \"same\"\n[[tables]]\ntable = \"public.other\"\nindex = \"same\"\n",
                "tables[1].index: \"same\" is also the index of tables[0]",
            ),
            (
                MINIMAL.replace("[kafka]", "[consumer]\nbatch_max_wait_ms = 0\n[kafka]"),
                "consumer.batch_max_wait_ms: must be at least 1",
            ),
            (
                MINIMAL.replace("[kafka]", "[opensearch]\nurl = \"localhost:9200\"\n[kafka]"),
                "opensearch.url: must be an http:// or https:// URL",
            ),
        ];
        for (text, expected) in cases {
            let err = Config::from_toml(&text, no_env).expect_err(expected);
            assert!(
                err.to_string().starts_with(expected),
                "{err} / expected {expected}"
            );
        }
    }

    #[test]
    fn opensearch_comes_from_the_file_or_the_environment() {
        let config = Config::from_toml(MINIMAL, no_env).expect("valid");
        let err = config.opensearch().expect_err("no [opensearch]");
        assert!(err.to_string().starts_with("opensearch: missing"), "{err}");
        let env = |name: &str| match name {
            "TIDEMARK_OPENSEARCH_URL" => Some("http://10.0.0.2:9200".to_owned()),
            "TIDEMARK_OPENSEARCH_PASSWORD" => Some("s3cret".to_owned()),
            _ => None,
        };
        let config = Config::from_toml(MINIMAL, env).expect("valid");
        let os = config.opensearch().expect("from the environment");
        assert_eq!(os.url, "http://10.0.0.2:9200");
        assert!(!format!("{config:?}").contains("s3cret"));
        assert_eq!(
            config.tables[0].index_name(&config.kafka),
            "tidemark.public.articles"
        );
    }

    #[test]
    fn shipped_configs_are_valid() {
        for (name, text) in [
            (
                "config/example.toml",
                include_str!("../../config/example.toml"),
            ),
            ("config/demo.toml", include_str!("../../config/demo.toml")),
        ] {
            let config = Config::from_toml(text, no_env).unwrap_or_else(|e| panic!("{name}: {e}"));
            config
                .opensearch()
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5/db"),
            "postgres://u:***@h:5/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
    }
}
