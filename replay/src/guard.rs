//! The one guard every writing command goes through (`window`, `audit
//! --repair`, `dead-letters --repair`, and what comes next): it prints the
//! target, writes nothing unless asked (`--yes`), and records the run.
//!
//! Promises:
//! - Before anything is written, the operator has seen on stderr which
//!   systems and indices the command is about to touch and whether it
//!   writes: `WRITE (--yes)` or `dry run: nothing is written; pass --yes to
//!   write`.
//! - Every run, dry or not, done or failed, leaves a record in the
//!   `tidemark-runs` index (`tidemark_index::runs`) with who, where, when,
//!   the arguments, the outcome and the counts.

use serde_json::Value;
use tidemark_index::runs::{self, RunRecord};
use tidemark_index::search::Search;

/// A writing command's run, from its target print to its record.
#[derive(Debug)]
pub struct Guard<'a> {
    search: &'a Search,
    command: String,
    write: bool,
    started: jiff::Timestamp,
}

impl<'a> Guard<'a> {
    /// Starts the run of `command` (e.g. `window`). `write` is whether the
    /// operator passed `--yes` (and not `--dry-run`).
    pub fn start(search: &'a Search, command: &str, write: bool) -> Guard<'a> {
        Guard {
            search,
            command: command.to_owned(),
            write,
            started: jiff::Timestamp::now(),
        }
    }

    /// Whether this run writes.
    pub fn writes(&self) -> bool {
        self.write
    }

    /// What the run will do, as the target print says it.
    pub fn mode(&self) -> &'static str {
        if self.write {
            "WRITE (--yes)"
        } else {
            "dry run: nothing is written; pass --yes to write"
        }
    }

    /// Prints the target (already naming the mode, see [`Guard::mode`]) on
    /// stderr, before anything is written.
    pub fn show_target(&self, target: &str) {
        eprint!("{target}");
        if !target.ends_with('\n') {
            eprintln!();
        }
    }

    /// Records the run with its outcome and results; the record is
    /// searchable when this returns.
    pub async fn record(self, outcome: &str, results: Value) -> anyhow::Result<()> {
        let (user, host) = runs::who();
        let record = RunRecord {
            command: self.command,
            user,
            host,
            started: self.started.to_string(),
            finished: jiff::Timestamp::now().to_string(),
            arguments: std::env::args().skip(1).collect(),
            dry_run: !self.write,
            outcome: outcome.to_owned(),
            results,
        };
        Ok(runs::record(self.search, &record).await?)
    }
}
