//! The one guard every writing command goes through (`window`, `audit
//! --repair`, `dead-letters --repair`, and what comes next): it prints the
//! target, writes nothing unless asked (`--yes`), and records the run.
//!
//! Promises:
//! - Before anything is written, the operator has seen on stderr which
//!   systems and indices the command is about to touch and whether it
//!   writes: `WRITE (--yes)` or `dry run: nothing is written; pass --yes to
//!   write`.
//! - Nothing is written to an index that is not this pipeline's: each
//!   target index's stamp (`tidemark_index::identity`) is judged against
//!   what this process sees ([`seen_identity`]); another pipeline's index,
//!   or one without a stamp, is refused (exit 2) naming both sides, unless
//!   `--target-override`. A dry run says what a real run would refuse.
//! - Every run, dry or not, done or failed, leaves a record in the
//!   `tidemark-runs` index (`tidemark_index::runs`) with who, where, when,
//!   the arguments, the outcome and the counts.

use crate::error::{ReplayError, Result};
use serde_json::Value;
use tidemark_index::identity::{Verdict, foreign, judge, stamp_of};
use tidemark_index::runs::{self, RunRecord};
use tidemark_index::search::Search;
use tidemark_schemas::identity::{Identity, META_KEY};

/// A writing command's run, from its target print to its record.
#[derive(Debug)]
pub struct Guard<'a> {
    search: &'a Search,
    deployment: String,
    command: String,
    write: bool,
    started: jiff::Timestamp,
}

impl<'a> Guard<'a> {
    /// Starts the run of `command` (e.g. `window`) for `deployment` (its
    /// `kafka.topic_prefix`). `write` is whether the operator passed
    /// `--yes` (and not `--dry-run`).
    pub fn start(search: &'a Search, deployment: &str, command: &str, write: bool) -> Guard<'a> {
        Guard {
            search,
            deployment: deployment.to_owned(),
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

    /// The wrong-target guard over `indices`: lines for the target print,
    /// or, for a real run without `override_target`, the refusal (which
    /// the caller records and exits 2 with).
    pub async fn check_targets(
        &self,
        indices: &[&str],
        seen: &Identity,
        override_target: bool,
    ) -> Result<Result<String, String>> {
        let mut lines = String::new();
        let mut problems = Vec::new();
        for index in indices {
            let stamp = stamp_of(self.search, index).await?;
            match judge(stamp.as_ref(), seen) {
                Verdict::Ours { unchecked } if unchecked.is_empty() => {
                    lines.push_str(&format!("  identity    {index}: this pipeline's\n"));
                }
                Verdict::Ours { unchecked } => lines.push_str(&format!(
                    "  identity    {index}: this pipeline's (not compared, unknown on one side: {})\n",
                    unchecked.join(", ")
                )),
                Verdict::Unstamped => problems.push(format!(
                    "index {index} carries no pipeline stamp (_meta.{META_KEY}): the consumer \
                     never wrote it, or has not run since stamps were introduced (start it \
                     once and it stamps the indices it writes). This process sees: {seen}"
                )),
                Verdict::Foreign {
                    recorded,
                    differences,
                } => problems.push(foreign(index, &recorded, seen, &differences)),
            }
        }
        if problems.is_empty() {
            return Ok(Ok(lines));
        }
        if self.write && !override_target {
            return Ok(Err(format!(
                "refusing to write: {}. Pass --target-override to write anyway",
                problems.join("; ")
            )));
        }
        let prefix = if self.write {
            "OVERRIDDEN (--target-override)"
        } else {
            "a real run would refuse"
        };
        for p in problems {
            lines.push_str(&format!("  identity    {prefix}: {p}\n"));
        }
        Ok(Ok(lines))
    }

    /// Records the run with its outcome and results; the record is
    /// searchable when this returns.
    pub async fn record(self, outcome: &str, results: Value) -> Result<()> {
        self.write_record(outcome, results).await
    }

    /// Prints the target with the verdict of [`Guard::check_targets`]; a
    /// refusal is recorded as the run's outcome and returned as the error
    /// the command exits 2 with.
    pub async fn show_checked_target(
        &self,
        target: &str,
        checked: Result<String, String>,
    ) -> Result<()> {
        let lines = checked.as_ref().map_or("", String::as_str);
        let separator = if target.ends_with('\n') { "" } else { "\n" };
        self.show_target(&format!("{target}{separator}{lines}"));
        if let Err(refusal) = checked {
            self.write_record("refused: not this pipeline's index", Value::Null)
                .await?;
            return Err(ReplayError::Refused(refusal));
        }
        Ok(())
    }

    async fn write_record(&self, outcome: &str, results: Value) -> Result<()> {
        let (user, host) = runs::who();
        let record = RunRecord {
            deployment: self.deployment.clone(),
            command: self.command.clone(),
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

/// What this process sees of the pipeline it is about to write for: the
/// PostgreSQL it reads rows from (system identifier by IDENTIFY_SYSTEM,
/// else `pg_control_system()`; unknown if neither answers), its database,
/// Kafka's cluster id and the topic prefix.
pub async fn seen_identity(
    config: &tidemark_schemas::config::Config,
    conn: &tidemark_postgres::ConnInfo,
    client: &tokio_postgres::Client,
    kafka_cluster: String,
) -> Identity {
    let replication = tidemark_postgres::Replication::of(config, "tidemark-replay");
    let system = match tidemark_postgres::system_identifier(conn, &replication).await {
        Ok(system) => Some(system),
        Err(_) => client
            .query_one(
                "SELECT system_identifier::text FROM pg_control_system()",
                &[],
            )
            .await
            .ok()
            .map(|row| row.get::<_, String>(0)),
    };
    Identity {
        postgres_system: system,
        database: Some(conn.database.clone()),
        kafka_cluster,
        topic_prefix: config.kafka.topic_prefix.clone(),
    }
}
