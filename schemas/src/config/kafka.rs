//! `[kafka]`: the brokers, how clients authenticate to them, and the names
//! of the pipeline's topics.
//!
//! Security has typed fields (`security_protocol`, `sasl_mechanism`,
//! `sasl_username`, `ssl_*_location`) checked together here, so a
//! half-configured connection fails when the config is read, naming the
//! field, instead of as a broker that "does not answer"; the password comes
//! only from `TIDEMARK_KAFKA_PASSWORD`. Other librdkafka properties pass
//! through `[kafka.properties]`, except those below.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::{ConfigError, Secret, invalid, is_topic_name};
use serde::Deserialize;

/// librdkafka properties `[kafka.properties]` may not set: Tidemark's
/// guarantees rest on them (no loss, no reordering, offsets stored only
/// after a record is applied), or another field already says them.
const REFUSED: [(&str, &str); 20] = [
    ("security.protocol", "set kafka.security_protocol"),
    ("sasl.mechanism", "set kafka.sasl_mechanism"),
    ("sasl.mechanisms", "set kafka.sasl_mechanism"),
    ("sasl.username", "set kafka.sasl_username"),
    ("ssl.ca.location", "set kafka.ssl_ca_location"),
    (
        "ssl.certificate.location",
        "set kafka.ssl_certificate_location",
    ),
    ("ssl.key.location", "set kafka.ssl_key_location"),
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
    /// `plaintext` (default), `ssl`, `sasl_plaintext` or `sasl_ssl`, as
    /// Kafka spells them (either case).
    #[serde(default)]
    pub security_protocol: SecurityProtocol,
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`; required by the
    /// `sasl_*` protocols.
    #[serde(default)]
    pub sasl_mechanism: Option<SaslMechanism>,
    /// The SASL user; its password is `TIDEMARK_KAFKA_PASSWORD`.
    #[serde(default)]
    pub sasl_username: Option<String>,
    /// PEM file of the CA(s) the brokers' certificates must be signed by;
    /// absent: the system's trust store.
    #[serde(default)]
    pub ssl_ca_location: Option<PathBuf>,
    /// PEM client certificate (mutual TLS), with `ssl_key_location`.
    #[serde(default)]
    pub ssl_certificate_location: Option<PathBuf>,
    /// PEM private key of the client certificate, unencrypted (a key
    /// password would be a secret in the file).
    #[serde(default)]
    pub ssl_key_location: Option<PathBuf>,
    /// Other librdkafka properties for every client (producer, consumer,
    /// replay), e.g. `"ssl.endpoint.identification.algorithm" = "none"`.
    /// Secrets, and what the fields above or Tidemark's guarantees set,
    /// are refused here.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// `sasl.password`, from `TIDEMARK_KAFKA_PASSWORD` only.
    #[serde(skip)]
    pub password: Option<Secret>,
}

/// How clients reach the brokers: librdkafka's `security.protocol`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SecurityProtocol {
    #[default]
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl SecurityProtocol {
    const ALL: [SecurityProtocol; 4] = [
        SecurityProtocol::Plaintext,
        SecurityProtocol::Ssl,
        SecurityProtocol::SaslPlaintext,
        SecurityProtocol::SaslSsl,
    ];
    /// The value of librdkafka's `security.protocol`.
    pub fn as_str(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "plaintext",
            SecurityProtocol::Ssl => "ssl",
            SecurityProtocol::SaslPlaintext => "sasl_plaintext",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }
    pub fn sasl(self) -> bool {
        matches!(
            self,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        )
    }
    pub fn tls(self) -> bool {
        matches!(self, SecurityProtocol::Ssl | SecurityProtocol::SaslSsl)
    }
}

impl<'de> Deserialize<'de> for SecurityProtocol {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        named(d, &Self::ALL, Self::as_str, "kafka.security_protocol")
    }
}

/// How a SASL client proves who it is: librdkafka's `sasl.mechanism`.
/// (Kerberos and OAUTHBEARER are not built in: see README.md.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaslMechanism {
    Plain,
    ScramSha256,
    ScramSha512,
}

impl SaslMechanism {
    const ALL: [SaslMechanism; 3] = [
        SaslMechanism::Plain,
        SaslMechanism::ScramSha256,
        SaslMechanism::ScramSha512,
    ];
    /// The value of librdkafka's `sasl.mechanism`.
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

impl<'de> Deserialize<'de> for SaslMechanism {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        named(d, &Self::ALL, Self::as_str, "kafka.sasl_mechanism")
    }
}

/// The one of `all` whose name is the text, in any case (Kafka's docs
/// write `SASL_SSL`, librdkafka's `sasl_ssl`); else an error listing them.
fn named<'de, D: serde::Deserializer<'de>, T: Copy>(
    d: D,
    all: &[T],
    name: fn(T) -> &'static str,
    field: &str,
) -> Result<T, D::Error> {
    let text = String::deserialize(d)?;
    all.iter()
        .copied()
        .find(|v| name(*v).eq_ignore_ascii_case(&text))
        .ok_or_else(|| {
            let names: Vec<&str> = all.iter().map(|v| name(*v)).collect();
            serde::de::Error::custom(format!("{field} must be one of {}", names.join(", ")))
        })
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
        self.validate_security()?;
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

    /// The security fields agree with each other and the files exist.
    fn validate_security(&self) -> Result<(), ConfigError> {
        let protocol = self.security_protocol;
        let named = protocol.as_str();
        if protocol.sasl() {
            if self.sasl_mechanism.is_none() {
                return Err(invalid(
                    "kafka.sasl_mechanism",
                    format!(
                        "security_protocol {named} needs one: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"
                    ),
                ));
            }
            if self.sasl_username.as_deref().is_none_or(str::is_empty) {
                return Err(invalid(
                    "kafka.sasl_username",
                    format!("security_protocol {named} needs the SASL user"),
                ));
            }
            if self.password.is_none() {
                return Err(invalid(
                    "kafka.sasl_username",
                    format!(
                        "security_protocol {named} needs the user's password: set TIDEMARK_KAFKA_PASSWORD"
                    ),
                ));
            }
        } else {
            let stray = [
                ("kafka.sasl_mechanism", self.sasl_mechanism.is_some()),
                ("kafka.sasl_username", self.sasl_username.is_some()),
                ("TIDEMARK_KAFKA_PASSWORD", self.password.is_some()),
            ];
            if let Some((field, _)) = stray.iter().find(|(_, set)| *set) {
                return Err(invalid(
                    *field,
                    format!(
                        "is set but security_protocol is {named}: set security_protocol to sasl_ssl \
                         (or sasl_plaintext), or remove it"
                    ),
                ));
            }
        }
        let files = [
            ("kafka.ssl_ca_location", &self.ssl_ca_location),
            (
                "kafka.ssl_certificate_location",
                &self.ssl_certificate_location,
            ),
            ("kafka.ssl_key_location", &self.ssl_key_location),
        ];
        for (field, path) in files {
            let Some(path) = path else { continue };
            if !protocol.tls() {
                return Err(invalid(
                    field,
                    format!(
                        "is set but security_protocol is {named}: set security_protocol to ssl or sasl_ssl"
                    ),
                ));
            }
            if let Err(e) = std::fs::File::open(path) {
                return Err(invalid(
                    field,
                    format!("cannot read {}: {e}", path.display()),
                ));
            }
        }
        if self.ssl_certificate_location.is_some() != self.ssl_key_location.is_some() {
            return Err(invalid(
                "kafka.ssl_certificate_location",
                "a client certificate needs both ssl_certificate_location and ssl_key_location",
            ));
        }
        Ok(())
    }
}
