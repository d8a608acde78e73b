//! Progress of the long commands (audit, window) on a terminal: a bar with
//! counts, rate and ETA, drawn on standard error only when it is a
//! terminal; logs, pipes and cron get nothing from it (they have the
//! `info` lines at `RUST_LOG=info`).

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// All bars of the process draw together (the audit reads rows and
/// documents at once), one line each.
static BARS: std::sync::LazyLock<MultiProgress> = std::sync::LazyLock::new(MultiProgress::new);

/// One counted task. Cloning shares the bar (the index scroll counts on
/// its own task).
#[derive(Debug, Clone)]
pub struct Progress(ProgressBar);

impl Progress {
    /// `total`: the expected count, when known (an estimate is fine: the
    /// bar grows past it).
    pub fn new(what: &str, unit: &str, total: Option<u64>) -> Progress {
        if !std::io::stderr().is_terminal() {
            return Progress(ProgressBar::hidden());
        }
        let bar = match total {
            Some(total) => ProgressBar::new(total).with_style(
                ProgressStyle::with_template(&format!(
                    "{{prefix}} [{{bar:30}}] {{human_pos}}/{{human_len}} {unit}, {{per_sec}}, ETA {{eta}}"
                ))
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            ),
            None => ProgressBar::new_spinner().with_style(
                ProgressStyle::with_template(&format!(
                    "{{prefix}} {{spinner}} {{human_pos}} {unit}, {{per_sec}}, {{elapsed}}"
                ))
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            ),
        };
        let bar = BARS.add(bar);
        bar.set_prefix(what.to_owned());
        bar.enable_steady_tick(Duration::from_millis(250));
        Progress(bar)
    }

    pub fn inc(&self, n: u64) {
        self.0.inc(n);
        if self.0.length().is_some_and(|len| self.0.position() > len) {
            self.0.set_length(self.0.position());
        }
    }

    /// Removes the bar: the command's own report follows.
    pub fn finish(&self) {
        self.0.finish_and_clear();
        BARS.remove(&self.0);
    }
}
