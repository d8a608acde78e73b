//! The Kafka layer: how every Tidemark client, in every stage, reaches the
//! cluster. One function makes a client's settings from the config's
//! `[kafka]` section, so a setting (a TLS file, a SASL mechanism, a timeout)
//! reaches the producer's, the consumer's and replay's clients alike, as
//! Kafka Connect's pass-through does.
//!
//! It promises: `[kafka.properties]` are applied to every client, after
//! Tidemark's own base settings and before each client's own (which are the
//! ones our guarantees rest on, and which the config refuses in
//! `properties`: see `tidemark_schemas::config::Kafka`); `sasl.password`
//! comes only from `TIDEMARK_KAFKA_PASSWORD`; no value is ever logged.
//! It depends only on `tidemark-schemas`.

use rdkafka::ClientConfig;
use tidemark_schemas::config::Kafka;

/// The settings every client of `kafka` starts from: the brokers, the
/// client's name, `[kafka.properties]`, and the SASL password.
pub fn client_config(kafka: &Kafka, client_id: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &kafka.brokers)
        .set("client.id", client_id);
    for (name, value) in &kafka.properties {
        config.set(name, value);
    }
    if let Some(password) = &kafka.password {
        config.set("sasl.password", &password.0);
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_schemas::config::Config;

    #[test]
    fn properties_and_the_password_reach_every_client() {
        let text = "[postgres]\nurl = \"postgres://u@h/db\"\n[kafka]\nbrokers = \"b:9092\"\n\
                    [kafka.properties]\n\"security.protocol\" = \"sasl_ssl\"\n\"sasl.mechanism\" = \"SCRAM-SHA-512\"\n\
                    \"sasl.username\" = \"tidemark\"\n[[tables]]\ntable = \"public.t\"\n";
        let config = Config::from_toml(text, |name| {
            (name == "TIDEMARK_KAFKA_PASSWORD").then(|| "s3cret".to_owned())
        })
        .expect("valid");
        let client = client_config(&config.kafka, "tidemark-test");
        assert_eq!(client.get("bootstrap.servers"), Some("b:9092"));
        assert_eq!(client.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(client.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(client.get("sasl.password"), Some("s3cret"));
        assert!(
            !format!("{:?}", config.kafka).contains("s3cret"),
            "Debug never prints the password"
        );
    }
}
