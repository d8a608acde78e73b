//! The producer's metrics, in one place, rendered in Prometheus text format
//! for `/metrics`. Labels are table and operation only (low cardinality).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

use tidemark_schemas::{Lsn, Operation, Source};

const OPERATIONS: [Operation; 6] = [
    Operation::Snapshot,
    Operation::Insert,
    Operation::Update,
    Operation::Delete,
    Operation::Truncate,
    Operation::Resnapshot,
];

#[derive(Debug, Default)]
pub struct Metrics {
    /// Events by (schema, table), counted per operation.
    events: Mutex<BTreeMap<(String, String), [u64; OPERATIONS.len()]>>,
    dead_letters: AtomicU64,
    /// Changes of published tables this pipeline does not capture.
    skipped: AtomicU64,
    /// Schema changes seen, by `schema.table`.
    schema_changes: Mutex<BTreeMap<String, u64>>,
    delivery_errors: AtomicU64,
    confirmed_lsn: AtomicU64,
    server_wal_end: AtomicU64,
    /// Unix microseconds of the last commit whose changes reached Kafka.
    last_commit_unix_micros: AtomicI64,
    /// Set by the health checker.
    pub postgres_up: AtomicBool,
    pub kafka_up: AtomicBool,
    pub streaming: AtomicBool,
    /// Why the stream waits instead of running, for `/readyz`.
    pub blocked: Mutex<Option<String>>,
}

impl Metrics {
    pub fn event(&self, source: &Source, op: Operation) {
        let Ok(mut events) = self.events.lock() else {
            return;
        };
        // Look up without allocating; a table's first event creates its row.
        let counts = match events
            .iter_mut()
            .find(|(k, _)| k.0 == source.schema && k.1 == source.table)
        {
            Some((_, counts)) => counts,
            None => events
                .entry((source.schema.clone(), source.table.clone()))
                .or_default(),
        };
        counts[op as usize] += 1;
    }
    pub fn dead_letter(&self) {
        self.dead_letters.fetch_add(1, Ordering::Relaxed);
    }
    pub fn skipped(&self) {
        self.skipped.fetch_add(1, Ordering::Relaxed);
    }
    pub fn schema_change(&self, table: &str) {
        if let Ok(mut changes) = self.schema_changes.lock() {
            *changes.entry(table.to_owned()).or_default() += 1;
        }
    }
    pub fn delivery_error(&self) {
        self.delivery_errors.fetch_add(1, Ordering::Relaxed);
    }
    pub fn confirmed(&self, lsn: Lsn) {
        self.confirmed_lsn.fetch_max(lsn.0, Ordering::Relaxed);
    }
    pub fn server_wal_end(&self, lsn: Lsn) {
        self.server_wal_end.fetch_max(lsn.0, Ordering::Relaxed);
    }
    pub fn committed_at(&self, unix_micros: i64) {
        self.last_commit_unix_micros
            .fetch_max(unix_micros, Ordering::Relaxed);
    }

    /// Bytes of WAL the server has that are not yet confirmed.
    pub fn slot_lag_bytes(&self) -> u64 {
        let end = self.server_wal_end.load(Ordering::Relaxed);
        end.saturating_sub(self.confirmed_lsn.load(Ordering::Relaxed))
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP tidemark_producer_events_total Change events sent to Kafka."
        );
        let _ = writeln!(out, "# TYPE tidemark_producer_events_total counter");
        if let Ok(events) = self.events.lock() {
            for ((schema, table), counts) in events.iter() {
                for op in OPERATIONS {
                    let n = counts[op as usize];
                    if n > 0 {
                        let op = op.as_str();
                        let _ = writeln!(
                            out,
                            "tidemark_producer_events_total{{table=\"{schema}.{table}\",op=\"{op}\"}} {n}"
                        );
                    }
                }
            }
        }
        let _ = writeln!(
            out,
            "# HELP tidemark_producer_schema_changes_total Changes of a table's shape seen (at its next change)."
        );
        let _ = writeln!(out, "# TYPE tidemark_producer_schema_changes_total counter");
        if let Ok(changes) = self.schema_changes.lock() {
            for (table, n) in changes.iter() {
                let _ = writeln!(
                    out,
                    "tidemark_producer_schema_changes_total{{table=\"{table}\"}} {n}"
                );
            }
        }
        let gauge = |out: &mut String, name: &str, help: &str, kind: &str, value: String| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {value}");
        };
        gauge(
            &mut out,
            "tidemark_producer_dead_letters_total",
            "Records sent to the dead-letter topic.",
            "counter",
            self.dead_letters.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            &mut out,
            "tidemark_producer_skipped_total",
            "Changes of published tables not in [[tables]], skipped.",
            "counter",
            self.skipped.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            &mut out,
            "tidemark_producer_delivery_errors_total",
            "Kafka deliveries that failed.",
            "counter",
            self.delivery_errors.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            &mut out,
            "tidemark_producer_confirmed_lsn",
            "Last LSN confirmed to PostgreSQL, as a number.",
            "gauge",
            self.confirmed_lsn.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            &mut out,
            "tidemark_producer_slot_lag_bytes",
            "WAL bytes between the server's end and the confirmed LSN.",
            "gauge",
            self.slot_lag_bytes().to_string(),
        );
        let last = self.last_commit_unix_micros.load(Ordering::Relaxed);
        let behind = if last == 0 {
            0.0
        } else {
            (jiff::Timestamp::now().as_microsecond() - last).max(0) as f64 / 1e6
        };
        gauge(
            &mut out,
            "tidemark_producer_seconds_behind",
            "Seconds since the commit time of the last change sent.",
            "gauge",
            format!("{behind:.3}"),
        );
        for (name, flag) in [
            ("postgres", &self.postgres_up),
            ("kafka", &self.kafka_up),
            ("streaming", &self.streaming),
        ] {
            gauge(
                &mut out,
                &format!("tidemark_producer_{name}_up"),
                &format!("1 when {name} is healthy."),
                "gauge",
                u8::from(flag.load(Ordering::Relaxed)).to_string(),
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let metrics = Metrics::default();
        let source = Source {
            database: "d".into(),
            schema: "public".into(),
            table: "t".into(),
        };
        metrics.event(&source, Operation::Insert);
        metrics.event(&source, Operation::Insert);
        metrics.server_wal_end(Lsn(1000));
        metrics.confirmed(Lsn(400));
        let text = metrics.render();
        assert!(
            text.contains("tidemark_producer_events_total{table=\"public.t\",op=\"insert\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("tidemark_producer_slot_lag_bytes 600"),
            "{text}"
        );
    }
}
