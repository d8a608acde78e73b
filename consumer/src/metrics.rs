//! The consumer's metrics, rendered in Prometheus text format for
//! `/metrics`, and the readiness verdict for `/readyz`. Labels are table,
//! operation, topic and partition only (low cardinality).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tidemark_schemas::Operation;

use tidemark_index::apply::{ApplyStats, LATENCY_BUCKETS};

const OPERATIONS: [Operation; 6] = [
    Operation::Snapshot,
    Operation::Insert,
    Operation::Update,
    Operation::Delete,
    Operation::Truncate,
    Operation::Resnapshot,
];

/// Where one assigned partition stands.
#[derive(Debug, Clone, Copy, Default)]
pub struct PartitionLag {
    /// Records between what is applied and the partition's end (-1: unknown).
    pub records: i64,
    /// Kafka timestamp (commit time) of the last applied record, Unix ms.
    pub last_applied_ms: Option<i64>,
}

#[derive(Debug)]
pub struct Metrics {
    /// Applied changes by table, per operation.
    docs: Mutex<BTreeMap<String, [u64; OPERATIONS.len()]>>,
    stale: AtomicU64,
    dead_letters: AtomicU64,
    lag: Mutex<BTreeMap<(String, i32), PartitionLag>>,
    pub apply: Arc<ApplyStats>,
    pub kafka_up: AtomicBool,
    /// Readiness threshold.
    pub max_lag_secs: u64,
}

impl Metrics {
    pub fn new(max_lag_secs: u64) -> Metrics {
        Metrics {
            docs: Mutex::default(),
            stale: AtomicU64::default(),
            dead_letters: AtomicU64::default(),
            lag: Mutex::default(),
            apply: Arc::default(),
            kafka_up: AtomicBool::new(false),
            max_lag_secs,
        }
    }

    pub fn applied(&self, table: &str, op: Operation) {
        if let Ok(mut docs) = self.docs.lock() {
            let counts = match docs.get_mut(table) {
                Some(counts) => counts,
                None => docs.entry(table.to_owned()).or_default(),
            };
            counts[op as usize] += 1;
        }
    }
    pub fn stale(&self) {
        self.stale.fetch_add(1, Ordering::Relaxed);
    }
    pub fn dead_letter(&self) {
        self.dead_letters.fetch_add(1, Ordering::Relaxed);
    }
    pub fn dead_letters(&self) -> u64 {
        self.dead_letters.load(Ordering::Relaxed)
    }
    pub fn stale_count(&self) -> u64 {
        self.stale.load(Ordering::Relaxed)
    }

    /// Records the Kafka timestamp of the last applied record of a partition.
    pub fn applied_through(&self, topic: &str, partition: i32, timestamp_ms: Option<i64>) {
        if let Ok(mut lag) = self.lag.lock() {
            let entry = lag.entry((topic.to_owned(), partition)).or_default();
            if timestamp_ms.is_some() {
                entry.last_applied_ms = timestamp_ms;
            }
        }
    }

    /// Records how many records a partition is behind (from client stats).
    pub fn partition_lag(&self, topic: &str, partition: i32, records: i64) {
        if let Ok(mut lag) = self.lag.lock() {
            lag.entry((topic.to_owned(), partition))
                .or_default()
                .records = records;
        }
    }

    /// Forgets partitions this consumer no longer owns.
    pub fn retain_partitions(&self, keep: impl Fn(&str, i32) -> bool) {
        if let Ok(mut lag) = self.lag.lock() {
            lag.retain(|(t, p), _| keep(t, *p));
        }
    }

    fn lag_seconds(lag: &PartitionLag, now_ms: i64) -> f64 {
        if lag.records <= 0 {
            return 0.0;
        }
        match lag.last_applied_ms {
            Some(ms) => ((now_ms - ms).max(0) as f64) / 1000.0,
            None => 0.0,
        }
    }

    /// The worst lag in seconds over the assigned partitions.
    pub fn max_lag_seconds(&self) -> f64 {
        let now = now_ms();
        self.lag
            .lock()
            .map(|lag| {
                lag.values()
                    .map(|l| Self::lag_seconds(l, now))
                    .fold(0.0, f64::max)
            })
            .unwrap_or(0.0)
    }

    /// `Ok` when ready, else what is wrong.
    pub fn readiness(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        if !self.kafka_up.load(Ordering::Relaxed) {
            problems.push("kafka down".to_owned());
        }
        if !self.apply.opensearch_up.load(Ordering::Relaxed) {
            problems.push("opensearch down".to_owned());
        }
        for (index, stall) in self.apply.blocked.current() {
            let index = if index.is_empty() { "*" } else { &index };
            problems.push(format!("blocked on index {index}: {stall}"));
        }
        let lag = self.max_lag_seconds();
        if lag > self.max_lag_secs as f64 {
            problems.push(format!(
                "lag {lag:.0}s over consumer.ready_max_lag_secs {}",
                self.max_lag_secs
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join(", "))
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            name.to_owned()
        };
        let docs_name = metric(
            "tidemark_consumer_changes_total",
            "counter",
            "Changes applied to OpenSearch (stale and dead-lettered ones excluded).",
        );
        let mut body = String::new();
        if let Ok(docs) = self.docs.lock() {
            for (table, counts) in docs.iter() {
                for op in OPERATIONS {
                    let _ = writeln!(
                        body,
                        "{docs_name}{{table=\"{table}\",op=\"{}\"}} {}",
                        op.as_str(),
                        counts[op as usize]
                    );
                }
            }
        }
        out.push_str(&body);
        let counters = [
            (
                "tidemark_consumer_stale_total",
                "Changes OpenSearch already had at the same or a newer version.",
                self.stale.load(Ordering::Relaxed),
            ),
            (
                "tidemark_consumer_dead_letters_total",
                "Records sent to the dead-letter topic.",
                self.dead_letters.load(Ordering::Relaxed),
            ),
            (
                "tidemark_consumer_retries_total",
                "OpenSearch requests retried after 429, 5xx or no answer.",
                self.apply.retries.load(Ordering::Relaxed),
            ),
            (
                "tidemark_consumer_incomplete_toast_total",
                "Updates whose unchanged TOAST values were not in the index.",
                self.apply.incomplete_toast.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        }
        let name = "tidemark_consumer_bulk_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Latency of bulk requests.\n# TYPE {name} histogram"
        );
        for (bound, count) in LATENCY_BUCKETS.iter().zip(&self.apply.latency_buckets) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                count.load(Ordering::Relaxed)
            );
        }
        let total = self.apply.bulk_requests.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {total}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.apply.latency_sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {total}");
        let now = now_ms();
        let _ = writeln!(
            out,
            "# HELP tidemark_consumer_lag_records Records not yet applied, per partition.\n\
             # TYPE tidemark_consumer_lag_records gauge"
        );
        let lag = self.lag.lock().map(|l| l.clone()).unwrap_or_default();
        for ((topic, partition), l) in &lag {
            let _ = writeln!(
                out,
                "tidemark_consumer_lag_records{{topic=\"{topic}\",partition=\"{partition}\"}} {}",
                l.records
            );
        }
        let _ = writeln!(
            out,
            "# HELP tidemark_consumer_lag_seconds Age of the last applied record while records wait, per partition.\n\
             # TYPE tidemark_consumer_lag_seconds gauge"
        );
        for ((topic, partition), l) in &lag {
            let _ = writeln!(
                out,
                "tidemark_consumer_lag_seconds{{topic=\"{topic}\",partition=\"{partition}\"}} {:.3}",
                Self::lag_seconds(l, now)
            );
        }
        for (name, help, up) in [
            (
                "tidemark_consumer_kafka_up",
                "Kafka answered the last check.",
                self.kafka_up.load(Ordering::Relaxed),
            ),
            (
                "tidemark_consumer_opensearch_up",
                "OpenSearch answered the last request.",
                self.apply.opensearch_up.load(Ordering::Relaxed),
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}",
                u8::from(up)
            );
        }
        let name = "tidemark_consumer_blocked";
        let _ = writeln!(
            out,
            "# HELP {name} 1 while writes to the index wait for this reason (index \"*\": the cluster).\n# TYPE {name} gauge"
        );
        for (index, reason, now) in self.apply.blocked.gauges() {
            let index = if index.is_empty() { "*" } else { &index };
            let _ = writeln!(
                out,
                "{name}{{index=\"{index}\",reason=\"{reason}\"}} {}",
                u8::from(now)
            );
        }
        out
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_dependencies_and_lag() {
        let m = Metrics::new(60);
        assert_eq!(m.readiness(), Err("kafka down, opensearch down".into()));
        m.kafka_up.store(true, Ordering::Relaxed);
        m.apply.opensearch_up.store(true, Ordering::Relaxed);
        assert_eq!(m.readiness(), Ok(()));
        m.applied_through("t", 0, Some(now_ms() - 120_000));
        m.partition_lag("t", 0, 0);
        assert_eq!(m.readiness(), Ok(()), "caught up: no lag however old");
        m.partition_lag("t", 0, 5);
        let err = m.readiness().expect_err("lagging");
        assert!(err.starts_with("lag 120s over"), "{err}");
        let text = m.render();
        assert!(
            text.contains("tidemark_consumer_lag_records{topic=\"t\",partition=\"0\"} 5"),
            "{text}"
        );
    }

    #[test]
    fn a_stall_fails_readiness_with_its_reason_and_sets_its_gauge() {
        let m = Metrics::new(60);
        m.kafka_up.store(true, Ordering::Relaxed);
        m.apply.opensearch_up.store(true, Ordering::Relaxed);
        let stall = tidemark_index::answer::Stall {
            cause: tidemark_index::answer::Cause::IndexClosed,
            detail: "index_closed_exception: closed".into(),
        };
        m.apply.blocked.set("orders", &stall);
        assert_eq!(
            m.readiness(),
            Err("blocked on index orders: index_closed (index_closed_exception: closed)".into())
        );
        let gauge = "tidemark_consumer_blocked{index=\"orders\",reason=\"index_closed\"}";
        assert!(m.render().contains(&format!("{gauge} 1")), "{}", m.render());
        m.apply.blocked.clear("orders");
        assert_eq!(m.readiness(), Ok(()));
        assert!(m.render().contains(&format!("{gauge} 0")), "{}", m.render());
    }
}
