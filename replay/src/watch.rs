//! What `audit --watch` knows and serves: per table, the drift its last
//! pass confirmed, when that pass ran and how long it took, whether it
//! failed; `/readyz` and `/metrics` over HTTP. The passes themselves (the
//! loop, the repair after a delay) are the binary's; this holds their
//! results and renders them.
//!
//! Readiness: every table has had a pass, and its last pass succeeded. A
//! pass that cannot run (PostgreSQL, OpenSearch or Kafka unreachable, a
//! credential refused) is tried again at the next interval and says so
//! here meanwhile; it never reports an outage as a clean index.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use crate::audit::{Counts, TableReport};

/// Which kind of pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Pass {
    /// Recent changes only (by the time column, else a sample), and the
    /// drift already known.
    Rolling,
    /// The whole table.
    Full,
}

impl Pass {
    pub fn as_str(self) -> &'static str {
        match self {
            Pass::Rolling => "rolling",
            Pass::Full => "full",
        }
    }
}

#[derive(Debug, Default, Clone)]
struct TableState {
    /// Drift the last successful pass confirmed.
    drift: Counts,
    /// Its earliest drift time (unix seconds), when it has one.
    first_drift_s: Option<f64>,
    /// Per pass kind: (finished at, unix seconds; duration, seconds).
    last: BTreeMap<Pass, (f64, f64)>,
    /// The last pass's error, while it lasts.
    failing: Option<String>,
    failures: u64,
    repaired: u64,
}

/// The watch's state, shared by the passes and the HTTP endpoint.
#[derive(Debug, Default)]
pub struct Watch {
    tables: Mutex<BTreeMap<String, TableState>>,
}

fn now_s() -> f64 {
    jiff::Timestamp::now().as_millisecond() as f64 / 1_000.0
}

impl Watch {
    pub fn new(tables: impl IntoIterator<Item = String>) -> Arc<Watch> {
        Arc::new(Watch {
            tables: Mutex::new(
                tables
                    .into_iter()
                    .map(|t| (t, TableState::default()))
                    .collect(),
            ),
        })
    }

    fn with(&self, table: &str, f: impl FnOnce(&mut TableState)) {
        let mut tables = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        f(tables.entry(table.to_owned()).or_default());
    }

    /// A pass that ran to its end.
    pub fn passed(&self, pass: Pass, report: &TableReport, seconds: f64) {
        self.with(&report.table, |t| {
            t.drift = report.counts.clone();
            t.first_drift_s = report
                .first_drift
                .as_deref()
                .and_then(|s| s.parse::<jiff::Timestamp>().ok())
                .map(|ts| ts.as_millisecond() as f64 / 1_000.0);
            t.last.insert(pass, (now_s(), seconds));
            t.failing = None;
        });
    }

    /// A pass that could not run; the drift known before stays shown.
    pub fn failed(&self, table: &str, why: String) {
        self.with(table, |t| {
            t.failing = Some(why);
            t.failures += 1;
        });
    }

    pub fn repaired(&self, table: &str, documents: u64) {
        self.with(table, |t| t.repaired += documents);
    }

    /// `Ok` when every table had a pass and its last one succeeded.
    pub fn readiness(&self) -> Result<(), String> {
        let tables = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        let mut why = Vec::new();
        for (name, t) in tables.iter() {
            if let Some(error) = &t.failing {
                why.push(format!("{name}: the last pass failed: {error}"));
            } else if t.last.is_empty() {
                why.push(format!("{name}: no pass finished yet"));
            }
        }
        if why.is_empty() {
            Ok(())
        } else {
            Err(why.join("; "))
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let tables = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        let now = now_s();
        let mut out = String::new();
        let head = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        head(
            &mut out,
            "tidemark_audit_drift",
            "gauge",
            "Drifted documents the table's last pass confirmed, by kind.",
        );
        // A table without a finished pass has no drift figure yet: absent,
        // not 0 (a 0 before the first pass would say "clean").
        let passed = || tables.iter().filter(|(_, t)| !t.last.is_empty());
        for (name, t) in passed() {
            for (kind, n) in [
                ("missing", t.drift.missing),
                ("extra", t.drift.extra),
                ("stale", t.drift.stale),
            ] {
                let _ = writeln!(
                    out,
                    "tidemark_audit_drift{{table=\"{}\",kind=\"{kind}\"}} {n}",
                    label(name)
                );
            }
        }
        head(
            &mut out,
            "tidemark_audit_oldest_drift_seconds",
            "gauge",
            "Age of the table's oldest drift with a time (0: none).",
        );
        for (name, t) in passed() {
            let age = t.first_drift_s.map_or(0.0, |s| (now - s).max(0.0));
            let _ = writeln!(
                out,
                "tidemark_audit_oldest_drift_seconds{{table=\"{}\"}} {age:.0}",
                label(name)
            );
        }
        head(
            &mut out,
            "tidemark_audit_last_pass_timestamp_seconds",
            "gauge",
            "When the table's last pass of this kind finished (unix time).",
        );
        for (name, t) in tables.iter() {
            for (pass, (at, _)) in &t.last {
                let _ = writeln!(
                    out,
                    "tidemark_audit_last_pass_timestamp_seconds{{table=\"{}\",pass=\"{}\"}} {at:.3}",
                    label(name),
                    pass.as_str()
                );
            }
        }
        head(
            &mut out,
            "tidemark_audit_last_pass_duration_seconds",
            "gauge",
            "How long the table's last pass of this kind took.",
        );
        for (name, t) in tables.iter() {
            for (pass, (_, seconds)) in &t.last {
                let _ = writeln!(
                    out,
                    "tidemark_audit_last_pass_duration_seconds{{table=\"{}\",pass=\"{}\"}} {seconds:.3}",
                    label(name),
                    pass.as_str()
                );
            }
        }
        head(
            &mut out,
            "tidemark_audit_pass_failures_total",
            "counter",
            "Passes that could not run (a service unreachable or refusing).",
        );
        for (name, t) in tables.iter() {
            let _ = writeln!(
                out,
                "tidemark_audit_pass_failures_total{{table=\"{}\"}} {}",
                label(name),
                t.failures
            );
        }
        head(
            &mut out,
            "tidemark_audit_repaired_total",
            "counter",
            "Drifted documents repaired by --repair-after.",
        );
        for (name, t) in tables.iter() {
            let _ = writeln!(
                out,
                "tidemark_audit_repaired_total{{table=\"{}\"}} {}",
                label(name),
                t.repaired
            );
        }
        out
    }
}

/// A label value, escaped as the exposition format asks.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl tidemark_process::http::Health for Watch {
    fn readiness(&self) -> Result<(), String> {
        Watch::readiness(self)
    }
    fn render(&self) -> String {
        Watch::render(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_waits_for_a_pass_and_says_what_failed() {
        let w = Watch::new(["public.a".to_owned()]);
        assert!(
            w.readiness()
                .expect_err("not ready before a pass")
                .contains("no pass finished yet")
        );
        w.failed("public.a", "cannot reach PostgreSQL".into());
        let why = w.readiness().expect_err("not ready after a failed pass");
        assert!(why.contains("public.a: the last pass failed: cannot reach PostgreSQL"));
        let text = w.render();
        assert!(text.contains("tidemark_audit_pass_failures_total{table=\"public.a\"} 1"));
        assert!(
            !text.contains("tidemark_audit_drift{table=\"public.a\""),
            "no drift figure before a pass finished: {text}"
        );
    }
}
