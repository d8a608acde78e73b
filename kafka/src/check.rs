//! The start-up check: do the brokers answer, and do they take this
//! client? librdkafka retries a refused TLS handshake or SASL login
//! forever and only says why in its error callback, so a misconfigured
//! client would look like a broker that does not answer. [`Witness`] keeps
//! the last thing librdkafka said, and [`check`] turns it into an error
//! that names the brokers, the user and the field to fix.
//!
//! The rule (README.md, "Secured connections"): a refusal at start-up is a
//! misconfiguration and fails fast ([`CheckError::Refused`]); the same
//! refusal while running is an outage, waited out by each stage (the
//! records stay in librdkafka's queue or in Kafka).

use std::sync::Mutex;
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use tidemark_schemas::config::Kafka;

/// What librdkafka reported: an error's code and its reason.
pub type Complaint = (Option<RDKafkaErrorCode>, String);

/// A client context that remembers the first few things librdkafka
/// complained about (and logs them at debug: the caller reports the
/// verdict). librdkafka hands them over only when the client is polled.
#[derive(Debug, Default)]
pub struct Witness {
    seen: Mutex<Vec<Complaint>>,
}

/// How many complaints a [`Witness`] keeps (a refused client repeats one).
const KEPT: usize = 16;

impl Witness {
    /// What librdkafka reported so far, oldest first.
    pub fn seen(&self) -> Vec<Complaint> {
        self.seen.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

impl Witness {
    fn keep(&self, complaint: Complaint) {
        if let Ok(mut seen) = self.seen.lock()
            && seen.len() < KEPT
        {
            seen.push(complaint);
        }
    }
}

impl ClientContext for Witness {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(%error, reason, "Kafka client");
        self.keep((error.rdkafka_error_code(), reason.to_owned()));
    }

    /// A connection that fails is reported as a log line (facility
    /// `FAIL`) with the reason, e.g. a plaintext client on a TLS listener;
    /// the error event that follows says only "brokers are down".
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        tracing::debug!(?level, fac, message, "Kafka client");
        if fac == "FAIL" || (level as i32) <= (RDKafkaLogLevel::Warning as i32) {
            // librdkafka prefixes its thread: "[thrd:host:port/id]: ".
            let message = match message.strip_prefix("[thrd:") {
                Some(rest) => rest.split_once("]: ").map_or(message, |(_, m)| m),
                None => message,
            };
            self.keep((None, message.to_owned()));
        }
    }
}

impl ConsumerContext for Witness {}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The brokers answer, but refuse this client: fails start-up.
    #[error("Kafka at {brokers} refused {who}: {reason}. {fix}")]
    Refused {
        brokers: String,
        who: String,
        reason: String,
        fix: &'static str,
    },
    #[error(
        "cannot reach Kafka at {brokers}: {reason}. Check kafka.brokers (or TIDEMARK_KAFKA_BROKERS) and that the brokers are up"
    )]
    Unreachable { brokers: String, reason: String },
    /// librdkafka refused the settings themselves (a file it cannot load,
    /// an unknown property).
    #[error("Kafka client setup failed: {0}")]
    Client(#[source] KafkaError),
}

impl CheckError {
    /// Whether the brokers refused us (as opposed to not answering).
    pub fn refused(&self) -> bool {
        matches!(self, CheckError::Refused { .. })
    }
}

/// Fetches the cluster's metadata as `client_id` within `timeout`; on
/// failure says whether the brokers refused this client (TLS, SASL, ACLs)
/// or did not answer.
pub async fn check(kafka: &Kafka, client_id: &str, timeout: Duration) -> Result<(), CheckError> {
    let client: BaseConsumer<Witness> = crate::client_config(kafka, client_id)
        // Why a connection failed comes as an Info line (facility FAIL).
        .set_log_level(RDKafkaLogLevel::Info)
        .create_with_context(Witness::default())
        .map_err(CheckError::Client)?;
    let answer = tokio::task::spawn_blocking(move || {
        let answer = client.fetch_metadata(None, timeout).map(|_| ());
        if answer.is_err() {
            // Hand librdkafka's complaints to the witness.
            let until = std::time::Instant::now() + Duration::from_secs(1);
            while std::time::Instant::now() < until {
                let _ = client.poll(Duration::from_millis(100));
            }
        }
        (answer, client.context().seen())
    })
    .await;
    let (answer, seen) = match answer {
        Ok(outcome) => outcome,
        Err(_) => return Err(CheckError::Client(KafkaError::Canceled)),
    };
    let Err(error) = answer else { return Ok(()) };
    let who = match &kafka.sasl_username {
        Some(user) => format!("user {user}"),
        None => "this client".to_owned(),
    };
    Err(classify(&error, &seen).into_error(kafka.brokers.clone(), who))
}

/// What a failed check means.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Refused { reason: String, fix: &'static str },
    Unreachable(String),
}

impl Verdict {
    fn into_error(self, brokers: String, who: String) -> CheckError {
        match self {
            Verdict::Refused { reason, fix } => CheckError::Refused {
                brokers,
                who,
                reason,
                fix,
            },
            Verdict::Unreachable(reason) => CheckError::Unreachable { brokers, reason },
        }
    }
}

const FIX_SASL: &str =
    "Check kafka.sasl_username, kafka.sasl_mechanism and TIDEMARK_KAFKA_PASSWORD";
const FIX_TLS: &str = "Check kafka.ssl_ca_location (the CA that signed the brokers' certificates) \
                       and that the certificates name the hosts in kafka.brokers";
const FIX_PROTOCOL: &str = "The broker hung up before answering. Check kafka.security_protocol: \
                            the listener may expect TLS (ssl, sasl_ssl) or SASL";
const FIX_ACL: &str =
    "Grant the user the ACLs of README.md, \"Secured connections\" (describe on the topics)";

/// Decides from the check's own error and what librdkafka complained
/// about meanwhile: the first complaint that is a refusal decides, else
/// the brokers are unreachable. Pure, so each case is tested without a
/// broker.
fn classify(error: &KafkaError, seen: &[Complaint]) -> Verdict {
    use RDKafkaErrorCode::*;
    let code = error.rdkafka_error_code();
    if let Some(c @ (TopicAuthorizationFailed | ClusterAuthorizationFailed)) = code {
        return Verdict::Refused {
            reason: format!("not authorized ({c:?})"),
            fix: FIX_ACL,
        };
    }
    let own = (code, error.to_string());
    let refusal = |(code, reason): &Complaint| {
        let lower = reason.to_ascii_lowercase();
        let fix = if matches!(code, Some(Authentication | SaslAuthenticationFailed))
            || lower.contains("sasl authentication")
        {
            FIX_SASL
        } else if *code == Some(SSL)
            || lower.contains("ssl handshake")
            || lower.contains("certificate")
        {
            FIX_TLS
        } else if lower.contains("security.protocol")
            || (lower.contains("disconnected") && lower.contains("apiversion_query"))
        {
            FIX_PROTOCOL
        } else {
            return None;
        };
        Some(Verdict::Refused {
            reason: reason.trim().to_owned(),
            fix,
        })
    };
    seen.iter()
        .chain(std::iter::once(&own))
        .find_map(refusal)
        .unwrap_or_else(|| {
            // A connection's own failure says more than "brokers are down".
            let reason = seen
                .iter()
                .find(|(code, _)| code.is_none())
                .or(seen.last())
                .map_or(&own.1, |(_, reason)| reason);
            Verdict::Unreachable(reason.trim().to_owned())
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use RDKafkaErrorCode::*;

    fn timeout() -> KafkaError {
        KafkaError::MetadataFetch(OperationTimedOut)
    }

    #[test]
    fn the_last_complaint_decides_what_a_timeout_means() {
        type Case = (
            KafkaError,
            Option<(Option<RDKafkaErrorCode>, &'static str)>,
            Option<&'static str>,
        );
        let cases: [Case; 9] = [
            (
                timeout(),
                Some((
                    Some(Authentication),
                    "SASL authentication error: Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512",
                )),
                Some(FIX_SASL),
            ),
            (
                timeout(),
                Some((
                    Some(SSL),
                    "ssl://127.0.0.1:9093/bootstrap: SSL handshake failed: error:0A000086:SSL routines::certificate verify failed",
                )),
                Some(FIX_TLS),
            ),
            (
                timeout(),
                Some((
                    Some(BrokerTransportFailure),
                    "127.0.0.1:9093/bootstrap: Disconnected while requesting ApiVersion: might be caused by incorrect security.protocol configuration (connecting to a SSL listener?)",
                )),
                Some(FIX_PROTOCOL),
            ),
            (
                KafkaError::MetadataFetch(TopicAuthorizationFailed),
                None,
                Some(FIX_ACL),
            ),
            (
                KafkaError::MetadataFetch(Authentication),
                None,
                Some(FIX_SASL),
            ),
            (
                timeout(),
                Some((
                    Some(BrokerTransportFailure),
                    "127.0.0.1:9/bootstrap: Connect to ipv4#127.0.0.1:9 failed: Connection refused",
                )),
                None,
            ),
            (timeout(), None, None),
            (
                KafkaError::MetadataFetch(BrokerTransportFailure),
                Some((
                    None,
                    "[thrd:127.0.0.1:59192/bootstrap]: 127.0.0.1:59192/bootstrap: Disconnected: connection closed by peer: receive 0 after POLLIN (after 5ms in state APIVERSION_QUERY)",
                )),
                Some(FIX_PROTOCOL),
            ),
            (
                KafkaError::MetadataFetch(BrokerTransportFailure),
                Some((
                    Some(Authentication),
                    "sasl_ssl://127.0.0.1:33135/bootstrap: SASL authentication error: Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512",
                )),
                Some(FIX_SASL),
            ),
        ];
        for (error, last, fix) in cases {
            let last: Vec<Complaint> = last.into_iter().map(|(c, r)| (c, r.to_owned())).collect();
            let verdict = classify(&error, &last);
            match (fix, verdict) {
                (Some(fix), Verdict::Refused { fix: got, .. }) => {
                    assert_eq!(got, fix, "{last:?}")
                }
                (None, Verdict::Unreachable(_)) => {}
                (expected, got) => panic!("{last:?}: expected {expected:?}, got {got:?}"),
            }
        }
    }
}
