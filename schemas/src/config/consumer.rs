//! `[consumer]` and `[opensearch]`: the sync workers' group and batches, and
//! the cluster they write to.

use std::fmt;
use std::path::PathBuf;

use super::{ConfigError, Secret, invalid, redact_url};
use serde::Deserialize;

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenSearch {
    /// Base URL, e.g. `https://search.internal:9200`; or several nodes of
    /// one cluster, separated by commas, used in turn (a node that does not
    /// answer is retried on the next).
    pub url: String,
    /// Basic-auth user; the password comes from `TIDEMARK_OPENSEARCH_PASSWORD`.
    #[serde(default)]
    pub username: Option<String>,
    #[serde(skip)]
    pub password: Option<Secret>,
    /// PEM file of the CA the cluster's certificate must be signed by
    /// (`https://` only); absent: the system's trust store.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate (mutual TLS, the security plugin's
    /// `clientcert` authentication), with `tls_key_file`.
    #[serde(default)]
    pub tls_certificate_file: Option<PathBuf>,
    /// PEM private key of the client certificate, unencrypted.
    #[serde(default)]
    pub tls_key_file: Option<PathBuf>,
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
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_certificate_file", &self.tls_certificate_file)
            .field("tls_key_file", &self.tls_key_file)
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
    /// A bulk request is sent when its body reaches this size... It is the
    /// consumer's largest memory cost: the batch being applied and the one
    /// being read each hold their decoded writes (about 29 MB of peak RSS
    /// per MiB in the `pair_memory` bench, README).

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
    /// Records fetched ahead of the batch being built, at most this many
    /// KiB (librdkafka's `queued.max.messages.kbytes`): memory the consumer
    /// holds for records it has not applied yet. librdkafka's own default,
    /// 65536, costs up to 64 MiB; a few bulk requests' worth keeps the
    /// batches full.
    #[serde(default = "default_fetch_queue_kbytes")]
    pub fetch_queue_kbytes: usize,
}

impl Default for Consumer {
    fn default() -> Self {
        Consumer {
            group_id: default_group_id(),
            batch_max_bytes: DEFAULT_BATCH_MAX_BYTES,
            batch_max_wait_ms: DEFAULT_BATCH_MAX_WAIT_MS,
            ready_max_lag_secs: DEFAULT_READY_MAX_LAG_SECS,
            http_listen: default_consumer_http_listen(),
            fetch_queue_kbytes: DEFAULT_FETCH_QUEUE_KBYTES,
        }
    }
}

/// Default bulk size: OpenSearch's guidance is 5-15 MB per bulk request.
pub const DEFAULT_BATCH_MAX_BYTES: usize = 5 * 1024 * 1024;
/// Default longest wait before a partial bulk is sent; with OpenSearch's 1 s
/// refresh this keeps commit-to-searchable well under 2 s.
pub const DEFAULT_BATCH_MAX_WAIT_MS: u64 = 200;
/// Default pre-fetch bound: two default bulk requests' worth.
pub const DEFAULT_FETCH_QUEUE_KBYTES: usize = 2 * DEFAULT_BATCH_MAX_BYTES / 1024;
pub(crate) fn default_fetch_queue_kbytes() -> usize {
    DEFAULT_FETCH_QUEUE_KBYTES
}
/// Default lag after which the consumer reports itself not ready.
pub const DEFAULT_READY_MAX_LAG_SECS: u64 = 300;
pub(crate) fn default_request_timeout_secs() -> u64 {
    30
}
pub(crate) fn default_group_id() -> String {
    "tidemark-consumer".into()
}
pub(crate) fn default_batch_max_bytes() -> usize {
    DEFAULT_BATCH_MAX_BYTES
}
pub(crate) fn default_batch_max_wait_ms() -> u64 {
    DEFAULT_BATCH_MAX_WAIT_MS
}
pub(crate) fn default_ready_max_lag_secs() -> u64 {
    DEFAULT_READY_MAX_LAG_SECS
}
pub(crate) fn default_consumer_http_listen() -> String {
    "127.0.0.1:9465".into()
}

impl OpenSearch {
    /// The nodes `url` names, in order.
    pub fn urls(&self) -> Vec<&str> {
        self.url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect()
    }

    /// The `[opensearch]` constraints.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let opensearch = self;
        let urls = opensearch.urls();
        if urls.is_empty()
            || !urls
                .iter()
                .all(|u| u.starts_with("http://") || u.starts_with("https://"))
        {
            return Err(invalid(
                "opensearch.url",
                "must be an http:// or https:// URL (or several, separated by commas)",
            ));
        }
        let https = opensearch.url.starts_with("https://");
        if urls.iter().any(|u| u.starts_with("https://") != https) {
            return Err(invalid(
                "opensearch.url",
                "mixes http:// and https:// nodes; one cluster speaks one",
            ));
        }
        for (field, path) in [
            ("opensearch.tls_ca_file", &opensearch.tls_ca_file),
            (
                "opensearch.tls_certificate_file",
                &opensearch.tls_certificate_file,
            ),
            ("opensearch.tls_key_file", &opensearch.tls_key_file),
        ] {
            let Some(path) = path else { continue };
            if !https {
                return Err(invalid(field, "is set but opensearch.url is not https://"));
            }
            if let Err(e) = std::fs::File::open(path) {
                return Err(invalid(
                    field,
                    format!("cannot read {}: {e}", path.display()),
                ));
            }
        }
        if opensearch.tls_certificate_file.is_some() != opensearch.tls_key_file.is_some() {
            return Err(invalid(
                "opensearch.tls_certificate_file",
                "a client certificate needs both tls_certificate_file and tls_key_file",
            ));
        }
        if opensearch.tls_certificate_file.is_some() && opensearch.username.is_some() {
            return Err(invalid(
                "opensearch.username",
                "choose one way to log in: a client certificate (tls_certificate_file) or \
                 basic auth (username and TIDEMARK_OPENSEARCH_PASSWORD)",
            ));
        }
        if opensearch.request_timeout_secs == 0 {
            return Err(invalid(
                "opensearch.request_timeout_secs",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

impl Consumer {
    /// The `[consumer]` constraints.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.group_id.trim().is_empty() {
            return Err(invalid("consumer.group_id", "must not be empty"));
        }
        if self.batch_max_bytes < 1024 {
            return Err(invalid("consumer.batch_max_bytes", "must be at least 1024"));
        }
        if self.batch_max_wait_ms == 0 {
            return Err(invalid("consumer.batch_max_wait_ms", "must be at least 1"));
        }
        if !(1..=2_097_151).contains(&self.fetch_queue_kbytes) {
            return Err(invalid(
                "consumer.fetch_queue_kbytes",
                "must be between 1 and 2097151 (KiB), e.g. 10240",
            ));
        }

        if self.http_listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                "consumer.http_listen",
                "must be an address like 127.0.0.1:9465",
            ));
        }
        Ok(())
    }
}
