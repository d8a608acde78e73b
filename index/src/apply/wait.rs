//! Waiting out what cannot be written now: the backoff, the stall recorded
//! in [`Blocked`](super::Blocked) while it lasts, one log line a minute.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use tokio::sync::watch;
use tracing::warn;

use super::{Applier, Interrupted, lock};
use crate::answer::Stall;

/// How often a stall that goes on is logged again (the first time at once).
pub(crate) const STALL_LOG_EVERY: Duration = Duration::from_secs(60);

/// One stretch of waiting: its backoff, and when it was last logged.
pub(crate) struct Waiting<'a> {
    applier: &'a Applier,
    delays: backon::ExponentialBackoff,
    since: Option<Instant>,
    logged: Option<Instant>,
}

impl<'a> Waiting<'a> {
    pub(crate) fn new(applier: &'a Applier) -> Waiting<'a> {
        Waiting {
            applier,
            delays: applier.backoff.build(),
            since: None,
            logged: None,
        }
    }

    /// Records where writes wait and why, logs it (at once, then once a
    /// minute), and pauses before the next try.
    pub(crate) async fn wait(
        &mut self,
        stalls: &[(&str, Stall)],
        writes: usize,
        stop: &watch::Receiver<bool>,
    ) -> Result<(), Interrupted> {
        let stats = &self.applier.stats;
        for (index, stall) in stalls {
            stats.blocked.set(index, stall);
            if stall.cause.is_down() {
                stats.opensearch_up.store(false, Ordering::Relaxed);
            }
        }
        let since = *self.since.get_or_insert_with(Instant::now);
        let due = self.logged.is_none_or(|t| t.elapsed() >= STALL_LOG_EVERY);
        if due {
            self.logged = Some(Instant::now());
            let oldest = lock(&stats.oldest_waiting).clone().unwrap_or_default();
            for (index, stall) in stalls {
                warn!(
                    index = if index.is_empty() { "*" } else { index },
                    reason = stall.cause.label(),
                    detail = %stall.detail,
                    writes,
                    waiting_secs = since.elapsed().as_secs(),
                    oldest_offset = %oldest,
                    "OpenSearch cannot take these writes now; waiting (nothing is skipped or committed past)"
                );
            }
        }
        self.applier.pause(&mut self.delays, stop).await
    }

    /// The writes went through: say so if they had waited.
    pub(crate) fn resolved(&mut self) {
        if let Some(since) = self.since.take() {
            tracing::info!(
                waited_secs = since.elapsed().as_secs(),
                "OpenSearch takes writes again"
            );
        }
        self.delays = self.applier.backoff.build();
    }
}
