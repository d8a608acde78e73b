//! What the apply path reports: counters and latencies for metrics, and
//! which indices wait on what (`/readyz`, `tidemark_consumer_blocked`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::answer::{Cause, Stall};

/// Counters the apply path keeps (rendered by the consumer's `/metrics`).
#[derive(Debug, Default)]
pub struct ApplyStats {
    pub retries: AtomicU64,
    pub bulk_requests: AtomicU64,
    pub incomplete_toast: AtomicU64,
    /// False from a failed request until the next successful one.
    pub opensearch_up: AtomicBool,
    /// Bulk latency histogram: counts per bucket of [`LATENCY_BUCKETS`],
    /// plus the sum in microseconds.
    pub latency_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    pub latency_sum_micros: AtomicU64,
    /// Where writes wait now, and why.
    pub blocked: Blocked,
    /// The first record of the batch being applied ("topic/partition/offset"),
    /// set by the caller, so a stall's log line names the oldest waiting
    /// offset.
    pub oldest_waiting: Mutex<Option<String>>,
}

/// Where writes wait, by index (`""`: every index, the cluster itself), for
/// `/readyz`, `tidemark_consumer_blocked{index,reason}` and the stall log.
#[derive(Debug, Default)]
pub struct Blocked {
    state: Mutex<BlockedState>,
}

#[derive(Debug, Default)]
pub(crate) struct BlockedState {
    now: BTreeMap<String, Stall>,
    /// Every (index, cause) ever blocked, so its gauge falls back to 0
    /// instead of vanishing.
    seen: BTreeSet<(String, Cause)>,
}

/// A poisoned lock only means a panic elsewhere; the data is still usable.
pub fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Blocked {
    /// Records that writes to `index` wait on `stall`.
    pub fn set(&self, index: &str, stall: &Stall) {
        let mut state = lock(&self.state);
        state.seen.insert((index.to_owned(), stall.cause));
        state.now.insert(index.to_owned(), stall.clone());
    }

    /// Records that writes to `index` go through again.
    pub fn clear(&self, index: &str) {
        lock(&self.state).now.remove(index);
    }

    /// What waits now: (index, stall); `""` is the cluster.
    pub fn current(&self) -> Vec<(String, Stall)> {
        let state = lock(&self.state);
        state
            .now
            .iter()
            .map(|(i, s)| (i.clone(), s.clone()))
            .collect()
    }

    /// (index, cause label, blocked now) for every pair ever blocked.
    pub fn gauges(&self) -> Vec<(String, &'static str, bool)> {
        let state = lock(&self.state);
        state
            .seen
            .iter()
            .map(|(index, cause)| {
                let now = state.now.get(index).is_some_and(|s| s.cause == *cause);
                (index.clone(), cause.label(), now)
            })
            .collect()
    }
}

/// Upper bounds (seconds) of the bulk latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

impl ApplyStats {
    pub(crate) fn observe(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        for (bound, count) in LATENCY_BUCKETS.iter().zip(&self.latency_buckets) {
            if secs <= *bound {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.bulk_requests.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }
}
