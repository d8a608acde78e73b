//! The Kafka layer: how every Tidemark client, in every stage, reaches the
//! cluster. One function makes a client's settings from the config's
//! `[kafka]` section, so a setting (a TLS file, a SASL mechanism, a timeout)
//! reaches the producer's, the consumer's and replay's clients alike, as
//! Kafka Connect's pass-through does; one check ([`check`]) says at
//! start-up whether the brokers take this client, and if not, why. It also
//! reads what stages learn from Kafka itself (`latest`): the cluster id, and
//! the latest record of a key in the state topic (the producer's progress,
//! the PostgreSQL side of the pipeline's identity).
//!
//! It promises: the security fields (`security_protocol`, `sasl_*`,
//! `ssl_*_location`) and `[kafka.properties]` are applied to every client,
//! after Tidemark's own base settings and before each client's own (which
//! are the ones our guarantees rest on, and which the config refuses in
//! `properties`: see `tidemark_schemas::config::Kafka`); `sasl.password`
//! comes only from `TIDEMARK_KAFKA_PASSWORD` and is never logged or put
//! in an error (librdkafka may quote a property's value when it refuses
//! it: the config keeps secrets out of properties for that reason).
//! It depends only on `tidemark-schemas`.

mod check;
mod latest;

pub use check::{CheckError, Complaint, Witness, check};
pub use latest::{cluster_id, latest_record, latest_records, recorded_progress, recorded_source};

use rdkafka::ClientConfig;
use tidemark_schemas::config::Kafka;

/// The settings every client of `kafka` starts from: the brokers, the
/// client's name, the security fields, `[kafka.properties]`, and the SASL
/// password.
pub fn client_config(kafka: &Kafka, client_id: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &kafka.brokers)
        .set("client.id", client_id)
        .set("security.protocol", kafka.security_protocol.as_str());
    if let Some(mechanism) = kafka.sasl_mechanism {
        config.set("sasl.mechanism", mechanism.as_str());
    }
    if let Some(user) = &kafka.sasl_username {
        config.set("sasl.username", user);
    }
    for (name, path) in [
        ("ssl.ca.location", &kafka.ssl_ca_location),
        ("ssl.certificate.location", &kafka.ssl_certificate_location),
        ("ssl.key.location", &kafka.ssl_key_location),
    ] {
        if let Some(path) = path {
            config.set(name, path.display().to_string());
        }
    }
    for (name, value) in &kafka.properties {
        config.set(name, value);
    }
    if let Some(password) = &kafka.password {
        config.set("sasl.password", &password.0);
    }
    config
}

/// What start-up logs about how clients reach `kafka`: the protocol, the
/// mechanism and the user, never a password.
pub fn describe(kafka: &Kafka) -> String {
    let mut text = format!("security_protocol={}", kafka.security_protocol.as_str());
    if let (Some(mechanism), Some(user)) = (kafka.sasl_mechanism, &kafka.sasl_username) {
        text.push_str(&format!(" sasl={} user={user}", mechanism.as_str()));
    }
    if let Some(ca) = &kafka.ssl_ca_location {
        text.push_str(&format!(" ca={}", ca.display()));
    }
    if kafka.ssl_certificate_location.is_some() {
        text.push_str(" client_certificate=yes");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_schemas::config::Config;

    #[test]
    fn security_properties_and_the_password_reach_every_client() {
        let text = "[postgres]\nurl = \"postgres://u@h/db\"\n[kafka]\nbrokers = \"b:9092\"\n\
                    security_protocol = \"sasl_ssl\"\nsasl_mechanism = \"SCRAM-SHA-512\"\n\
                    sasl_username = \"tidemark\"\nssl_ca_location = \"/dev/null\"\n\
                    [kafka.properties]\n\"socket.keepalive.enable\" = \"true\"\n\
                    [[tables]]\ntable = \"public.t\"\n";
        let config = Config::from_toml(text, |name| {
            (name == "TIDEMARK_KAFKA_PASSWORD").then(|| "s3cret".to_owned())
        })
        .expect("valid");
        let client = client_config(&config.kafka, "tidemark-test");
        assert_eq!(client.get("bootstrap.servers"), Some("b:9092"));
        assert_eq!(client.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(client.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(client.get("sasl.username"), Some("tidemark"));
        assert_eq!(client.get("ssl.ca.location"), Some("/dev/null"));
        assert_eq!(client.get("socket.keepalive.enable"), Some("true"));
        assert_eq!(client.get("sasl.password"), Some("s3cret"));
        assert!(
            !format!("{:?}", config.kafka).contains("s3cret"),
            "Debug never prints the password"
        );
        let said = describe(&config.kafka);
        assert_eq!(
            said,
            "security_protocol=sasl_ssl sasl=SCRAM-SHA-512 user=tidemark ca=/dev/null"
        );
    }
}
