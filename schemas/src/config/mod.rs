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
//!
//! One file per section (`postgres`, `kafka`, `producer`, `consumer` with
//! `[opensearch]`, `tables`), each with its fields, defaults and checks;
//! this file holds the whole, the environment overrides and the helpers.

use std::fmt;

use serde::Deserialize;

mod consumer;
mod kafka;
mod postgres;
mod producer;
mod tables;

pub use consumer::*;
pub use kafka::*;
pub use postgres::*;
pub use producer::*;
pub use tables::*;

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

/// A secret that `Debug` never prints.
#[derive(Clone)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The field of every document that holds Tidemark's metadata (version,
/// commit LSN and time, content hash, key). Reserved: no column may map to it.
pub const META_FIELD: &str = "_tidemark";

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
        let mut config: Config = toml::from_str(text).map_err(|e| parse_error(text, &e))?;
        let set = |name: &str| env(name).filter(|v| !v.is_empty());
        if let Some(url) = set("TIDEMARK_POSTGRES_URL") {
            config.postgres.url = url;
        }
        config.postgres.password = set("TIDEMARK_PG_PASSWORD").map(Secret);
        if let Some(brokers) = set("TIDEMARK_KAFKA_BROKERS") {
            config.kafka.brokers = brokers;
        }
        config.kafka.password = set("TIDEMARK_KAFKA_PASSWORD").map(Secret);
        if let Some(url) = set("TIDEMARK_OPENSEARCH_URL") {
            match &mut config.opensearch {
                Some(opensearch) => opensearch.url = url,
                None => {
                    config.opensearch = Some(OpenSearch {
                        url,
                        username: None,
                        password: None,
                        tls_ca_file: None,
                        tls_certificate_file: None,
                        tls_key_file: None,
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

    /// Checks every constraint the types cannot, section by section; the
    /// first failure names its field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.postgres.validate()?;
        self.kafka.validate()?;
        self.producer.validate()?;
        if let Some(opensearch) = &self.opensearch {
            opensearch.validate()?;
        }
        self.consumer.validate()?;
        tables::validate(&self.tables, &self.kafka)
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
/// Both places a URL can carry one: `user:password@` and a `password=`
/// query parameter.
pub fn redact_url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let base = match base.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('@') {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
                None => base.to_owned(),
            },
            None => base.to_owned(),
        },
        None => base.to_owned(),
    };
    match query {
        None => base,
        Some(query) => {
            let pairs: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((name, _)) if name.eq_ignore_ascii_case("password") => {
                        format!("{name}=***")
                    }
                    _ => pair.to_owned(),
                })
                .collect();
            format!("{base}?{}", pairs.join("&"))
        }
    }
}

/// A TOML error as the operator needs it: what is wrong and where (line
/// and column), without the offending line, which toml's own message
/// quotes (a misplaced `password = "..."` would be printed), and without
/// any quoted value (`invalid type: string "..."`).
fn parse_error(text: &str, error: &toml::de::Error) -> ConfigError {
    let mut message = String::new();
    let mut quoted = false;
    for c in error.message().chars() {
        if c == '"' {
            if quoted {
                message.push_str("...\"");
            } else {
                message.push('"');
            }
            quoted = !quoted;
        } else if !quoted {
            message.push(c);
        }
    }
    let at = error
        .span()
        .map(|span| {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |n| n + 1) + 1;
            format!(" (line {line}, column {column})")
        })
        .unwrap_or_default();
    ConfigError::Parse(format!("{}{at}", message.trim_end()))
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
                MINIMAL.to_owned() + "mapping = { columns = { a = \"keyword\" } }\n",
                "tables[0].mapping.columns.a: must be an OpenSearch field mapping with a type",
            ),
            (
                MINIMAL.to_owned()
                    + "exclude = [\"a\"]\nmapping = { columns = { a = { type = \"keyword\" } } }\n",
                "tables[0].mapping.columns.a: column \"a\" is not in the document",
            ),
            (
                MINIMAL.to_owned()
                    + "mapping = { numeric = \"scaled_float\", scaling_factor = 0 }\n",
                "tables[0].mapping.scaling_factor: 0: must be a positive number",
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
            (
                MINIMAL.replace(
                    "[kafka]",
                    "[opensearch]\nurl = \"http://a:9200, https://b:9200\"\n[kafka]",
                ),
                "opensearch.url: mixes http:// and https:// nodes",
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
                include_str!("../../../config/example.toml"),
            ),
            (
                "config/demo.toml",
                include_str!("../../../config/demo.toml"),
            ),
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
        assert_eq!(
            redact_url("postgres://u@h/db?sslmode=require&password=secret&x=1"),
            "postgres://u@h/db?sslmode=require&password=***&x=1"
        );
        assert_eq!(
            redact_url("postgres://u:a@h/db?PASSWORD=b"),
            "postgres://u:***@h/db?PASSWORD=***"
        );
    }

    #[test]
    fn kafka_properties_pass_through_but_not_what_tidemark_relies_on() {
        let with = |properties: &str| {
            Config::from_toml(
                &format!("{MINIMAL}\n[kafka.properties]\n{properties}\n"),
                no_env,
            )
        };
        let config = with("\"ssl.endpoint.identification.algorithm\" = \"none\"")
            .expect("a pass-through property");
        assert_eq!(
            config.kafka.properties["ssl.endpoint.identification.algorithm"],
            "none"
        );
        for (line, says) in [
            (
                "\"security.protocol\" = \"ssl\"",
                "set kafka.security_protocol",
            ),
            ("\"acks\" = \"1\"", "acks=all"),
            (
                "\"enable.auto.commit\" = \"true\"",
                "only after records are applied",
            ),
            ("\"sasl.password\" = \"x\"", "TIDEMARK_KAFKA_PASSWORD"),
            (
                "\"sasl.oauthbearer.client.secret\" = \"x\"",
                "TIDEMARK_KAFKA_PASSWORD",
            ),
        ] {
            let error = with(line).expect_err("refused").to_string();
            assert!(
                error.starts_with("kafka.properties."),
                "names the field: {error}"
            );
            assert!(error.contains(says), "{error}");
            assert!(!error.contains("\"x\""), "no secret value: {error}");
        }
    }

    #[test]
    fn kafka_security_fields_must_agree() {
        let kafka = |fields: &str, password: Option<&str>| {
            let text = MINIMAL.replace("[kafka]\n", &format!("[kafka]\n{fields}\n"));
            assert_ne!(text, MINIMAL, "MINIMAL has a [kafka] line");
            Config::from_toml(&text, |name| {
                (name == "TIDEMARK_KAFKA_PASSWORD")
                    .then(|| password.map(str::to_owned))
                    .flatten()
            })
        };
        let scram = "security_protocol = \"SASL_SSL\"\nsasl_mechanism = \"scram-sha-512\"\n\
                     sasl_username = \"tidemark-producer\"";
        let config = kafka(scram, Some("pw")).expect("a complete SASL_SSL setting");
        assert_eq!(config.kafka.security_protocol, SecurityProtocol::SaslSsl);
        assert_eq!(
            config.kafka.sasl_mechanism,
            Some(SaslMechanism::ScramSha512)
        );
        for (fields, password, field, says) in [
            (
                scram,
                None,
                "kafka.sasl_username",
                "TIDEMARK_KAFKA_PASSWORD",
            ),
            (
                "security_protocol = \"sasl_ssl\"\nsasl_username = \"u\"",
                Some("pw"),
                "kafka.sasl_mechanism",
                "SCRAM-SHA-512",
            ),
            (
                "security_protocol = \"sasl_ssl\"\nsasl_mechanism = \"PLAIN\"",
                Some("pw"),
                "kafka.sasl_username",
                "needs the SASL user",
            ),
            (
                "sasl_username = \"u\"",
                None,
                "kafka.sasl_username",
                "security_protocol is plaintext",
            ),
            ("", Some("pw"), "TIDEMARK_KAFKA_PASSWORD", "is set but"),
            (
                "security_protocol = \"ssl\"\nssl_ca_location = \"/nonexistent/ca.pem\"",
                None,
                "kafka.ssl_ca_location",
                "cannot read /nonexistent/ca.pem",
            ),
            (
                "ssl_ca_location = \"/dev/null\"",
                None,
                "kafka.ssl_ca_location",
                "security_protocol is plaintext",
            ),
            (
                "security_protocol = \"ssl\"\nssl_certificate_location = \"/dev/null\"",
                None,
                "kafka.ssl_certificate_location",
                "both",
            ),
        ] {
            let error = kafka(fields, password).expect_err(fields).to_string();
            assert!(error.starts_with(field), "names {field}: {error}");
            assert!(error.contains(says), "{error}");
            assert!(!error.contains("pw"), "no password: {error}");
        }
        let error = kafka("security_protocol = \"tls\"", None).expect_err("not a protocol");
        assert!(error.to_string().contains("sasl_ssl"), "{error}");
        let error = kafka(
            "security_protocol = \"sasl_ssl\"\nsasl_mechanism = \"GSSAPI\"",
            None,
        )
        .expect_err("not built in");
        assert!(error.to_string().contains("SCRAM-SHA-256"), "{error}");
    }

    #[test]
    fn opensearch_tls_fields_must_agree() {
        let with = |fields: &str, url: &str| {
            Config::from_toml(
                &MINIMAL.replace(
                    "[kafka]",
                    &format!("[opensearch]\nurl = \"{url}\"\n{fields}\n[kafka]"),
                ),
                no_env,
            )
        };
        let config = with(
            "tls_ca_file = \"/dev/null\"\ntls_certificate_file = \"/dev/null\"\ntls_key_file = \"/dev/null\"",
            "https://127.0.0.1:9200",
        )
        .expect("a CA and a client certificate");
        assert!(
            config
                .opensearch()
                .expect("[opensearch]")
                .tls_ca_file
                .is_some()
        );
        for (fields, url, says) in [
            (
                "tls_ca_file = \"/dev/null\"",
                "http://h:9200",
                "opensearch.tls_ca_file: is set but opensearch.url is not https://",
            ),
            (
                "tls_ca_file = \"/nonexistent.pem\"",
                "https://h:9200",
                "opensearch.tls_ca_file: cannot read /nonexistent.pem",
            ),
            (
                "tls_key_file = \"/dev/null\"",
                "https://h:9200",
                "opensearch.tls_certificate_file: a client certificate needs both",
            ),
            (
                "tls_certificate_file = \"/dev/null\"\ntls_key_file = \"/dev/null\"\nusername = \"u\"",
                "https://h:9200",
                "opensearch.username: choose one way to log in",
            ),
        ] {
            let error = with(fields, url).expect_err(fields).to_string();
            assert!(error.starts_with(says), "{error}");
        }
    }

    #[test]
    fn toml_errors_say_where_but_never_what() {
        let canary = "canary-hunter2-41";
        for text in [
            format!("[postgres]\nurl = \"postgres://h/db\"\npassword = \"{canary}\"\n"),
            format!("[kafka]\npartitions = \"{canary}\"\n"),
            format!("[postgres]\nurl = \"{canary}\n"),
        ] {
            let error = Config::from_toml(&text, no_env).expect_err("not a valid config");
            let shown = error.to_string();
            assert!(!shown.contains(canary), "{shown}");
            assert!(shown.contains(" (line "), "{shown}");
        }
        let error =
            Config::from_toml("[kafka]\npartitions = \"x\"\n", no_env).expect_err("a string");
        assert!(error.to_string().contains("(line 2, column 14)"), "{error}");
    }
}
