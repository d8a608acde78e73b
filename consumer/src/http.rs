//! `/healthz`, `/readyz` and `/metrics` of the consumer. `/readyz` answers
//! 503 unless Kafka and OpenSearch answer and the lag is under
//! `consumer.ready_max_lag_secs`; `/healthz` only says the process serves.

use tidemark_process::http::Health;

use crate::metrics::Metrics;

pub use tidemark_process::http::serve;

impl Health for Metrics {
    fn readiness(&self) -> Result<(), String> {
        Metrics::readiness(self)
    }
    fn render(&self) -> String {
        Metrics::render(self)
    }
}
