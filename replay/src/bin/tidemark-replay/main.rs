//! `tidemark-replay`: the incident tools.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tidemark_postgres::ConnInfo;
use tidemark_replay::{history, keys, time};

mod audit;
mod backfill;
mod reindex;
mod repair;
mod watch;
mod window;

use audit::{AuditOptions, audit};
use backfill::backfill;
use repair::dead_letters;
use std::time::Duration;
use tidemark_schemas::Source;
use tidemark_schemas::config::Config;
use watch::{WatchOptions, watch};
use window::window;

/// Window and audit map, hash and serialize millions of small JSON values
/// on several threads; with glibc's allocator a perf profile of a window
/// run spent ~37% of the command's CPU in malloc/free.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Incident tools for a Tidemark deployment, with the pipeline's config.
///
/// Exit codes: 0 done (something found), 1 nothing found or refused,
/// 2 error. Environment: as the producer and consumer
/// (TIDEMARK_PG_PASSWORD, TIDEMARK_KAFKA_BROKERS, ...); RUST_LOG.
#[derive(Debug, Parser)]
#[command(name = "tidemark-replay", version)]
struct Args {
    /// The deployment's TOML config file (see config/example.toml).
    #[arg(long, env = "TIDEMARK_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Repairs a time window: finds the rows changed in it (from Kafka),
    /// reads them from PostgreSQL at one exported snapshot, and writes them
    /// through the consumer's apply path with that snapshot's LSN as their
    /// version (deleting documents whose row is gone), so nothing newer is
    /// overwritten and nothing deleted comes back. Prints the target first;
    /// without --yes it is a dry run that writes nothing. Every run is
    /// recorded in the tidemark-runs index. Exit 0 done, 1 nothing to do,
    /// 2 error.
    Window {
        /// Start of the window: RFC 3339 or relative (-4h).
        #[arg(long, allow_hyphen_values = true)]
        from: String,
        /// End of the window: RFC 3339, relative (-1h) or now.
        #[arg(long, allow_hyphen_values = true)]
        to: String,
        /// Only these tables (schema.table); default: every configured one.
        #[arg(long)]
        table: Vec<String>,
        /// Only these keys (as for history); needs exactly one --table.
        #[arg(long)]
        key: Vec<String>,
        /// Write nothing; report what would change (the default without --yes).
        #[arg(long)]
        dry_run: bool,
        /// Write: the confirmation that the printed target is the right one.
        #[arg(long)]
        yes: bool,
        /// source (default): re-read the rows from PostgreSQL. log: re-apply
        /// each key's last change in the window, only for keys proven to
        /// have no newer change (the rest are refused), for when the source
        /// cannot be read.
        #[arg(long, value_enum, default_value_t = Mode::Source)]
        mode: Mode,
        /// Accept a window that starts before the oldest record Kafka still
        /// holds (retention): repair what is left, and say which partitions
        /// fall short. Without it such a window is refused (exit 2).
        #[arg(long)]
        allow_partial: bool,
        /// Write even to an index that is not this pipeline's (another
        /// pipeline's stamp, or none): see README, "The wrong-target guard".
        #[arg(long)]
        target_override: bool,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        output: Format,
    },
    /// Writes a table's existing rows (or those --where selects) into its
    /// index: an emptied or recreated index, a changed mapping, documents
    /// deleted by hand. Through window's source mode:
    /// rows read at an exported snapshot, written at its LSN as their
    /// version (live changes win, nothing deleted comes back), vanished
    /// rows deleted again, the run verified and recorded. Prints the
    /// target; without --yes a dry run. Exit 0 written and verified, 1 a
    /// dry run or something still differs, 2 error.
    Backfill {
        /// The tables (schema.table, of the config's [[tables]]); repeat
        /// for several.
        #[arg(long)]
        table: Vec<String>,
        /// Only rows this SQL condition selects (one table), e.g.
        /// "id > 1000" or "updated_at < '2026-12-01'". Read in a read-only
        /// transaction.
        #[arg(long = "where")]
        filter: Option<String>,
        /// Write nothing; report what would change (the default without --yes).
        #[arg(long)]
        dry_run: bool,
        /// Write: the confirmation that the printed target is the right one.
        #[arg(long)]
        yes: bool,
        /// Write even to an index that is not this pipeline's (another
        /// pipeline's stamp, or none).
        #[arg(long)]
        target_override: bool,
    },
    /// Rebuilds a table's index behind its name, with the mapping and
    /// settings the config gives now, while searches and writes go on: a
    /// new index <index>-<n>, marked so every writer writes there too,
    /// filled by backfill at a snapshot, audited, then the name moved to
    /// it in one _aliases call (a concrete index is adopted: copied to
    /// <index>-0, its name made an alias). The old index is kept,
    /// write-blocked. Without --yes a dry run. Exit 0 swapped, 1 a dry
    /// run, 2 error (nothing swapped).
    Reindex {
        /// The table (schema.table, of the config's [[tables]]).
        #[arg(long)]
        table: String,
        /// Write nothing; say what would be done (the default without --yes).
        #[arg(long)]
        dry_run: bool,
        /// Reindex: the confirmation that the printed target is the right one.
        #[arg(long)]
        yes: bool,
        /// Write even to an index that is not this pipeline's.
        #[arg(long)]
        target_override: bool,
        /// Go back to the index the last reindex replaced (kept,
        /// write-blocked): it is filled again, audited and swapped in the
        /// same way, so nothing written since is lost.
        #[arg(long)]
        rollback: bool,
        /// Give up a reindex that stopped before its swap: its new index is
        /// unmarked, then deleted once no writer can still copy to it.
        #[arg(long, conflicts_with = "rollback")]
        abandon: bool,
    },
    /// Lists recorded replay runs, newest first.
    Runs {
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Every deployment's runs, not only this config's
        /// (`kafka.topic_prefix`): deployments that share the OpenSearch
        /// cluster share the runs index.
        #[arg(long)]
        all: bool,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Every change of one row found in Kafka, oldest first, with operation,
    /// commit time, transaction id, LSN and a field-level diff from the
    /// previous state. Reads only the partition the key hashes to.
    History {
        /// The table, schema.table (one of the config's [[tables]]).
        #[arg(long)]
        table: String,
        /// The row's primary key: 42 (one-column key), tenant=7,id=1, or
        /// JSON {"id": 42}. The first two read the key's columns and types
        /// from PostgreSQL.
        #[arg(long)]
        key: String,
        /// Only changes committed at or after this time: RFC 3339
        /// (2026-11-22T10:00:00Z) or relative (-2h, -30m, -1d).
        #[arg(long, allow_hyphen_values = true)]
        since: Option<String>,
        /// Show long values in full (text output cuts them after 200
        /// characters and says their length).
        #[arg(long)]
        full: bool,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Compares each table with its index: missing (row without document),
    /// extra (document without row), stale (document differs from what the
    /// row maps to), and when the drift began. Exit 0 clean, 1 drift found,
    /// 2 error, so it can alert from cron or CI.
    Audit {
        /// Only these tables (schema.table); default: every configured table.
        #[arg(long)]
        table: Vec<String>,
        /// text (terminal summary), json (for machines), html (a
        /// self-contained page with the drift timeline chart).
        #[arg(long, value_enum, default_value_t = AuditFormat::Text)]
        format: AuditFormat,
        /// Write the report here instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Seconds to wait before re-checking what looked drifted (rows that
        /// change during the audit, consumer lag).
        #[arg(long, default_value_t = 5)]
        recheck_after: u64,
        /// Check only a random fraction (0 < F <= 1) of rows and documents,
        /// for very large tables; the report says so.
        #[arg(long)]
        sample: Option<f64>,
        /// Check only rows changed at or after this time (needs the table's
        /// audit_time_column): RFC 3339 or relative (-2h, -1d).
        #[arg(long, allow_hyphen_values = true)]
        since: Option<String>,
        /// Audit only share I of N of each table (1 <= I <= N), so that N
        /// processes share a table: the rows whose key hashes to it and the
        /// documents of its slice of the index. Their JSON reports add up
        /// with --merge; with --repair, each part repairs its share.
        #[arg(long, value_name = "I/N")]
        part: Option<String>,
        /// Merge the JSON reports (--format json) of one audit's parts into
        /// the report of the whole (every part of the split must be given),
        /// printed in --format; reads neither PostgreSQL nor OpenSearch.
        /// Exit 0 clean, 1 drift.
        #[arg(long, value_name = "REPORT", num_args = 1..)]
        merge: Vec<PathBuf>,
        /// Repair what drifted through window's source mode (rows read at an
        /// exported snapshot, written at its LSN), then check those
        /// documents again. Without --yes, a dry run of the repair.
        #[arg(long)]
        repair: bool,
        /// With --repair: write.
        #[arg(long)]
        yes: bool,
        /// With --repair: write even to an index that is not this
        /// pipeline's (another pipeline's stamp, or none).
        #[arg(long)]
        target_override: bool,
        /// Judge each document by its content (its source hashed through
        /// the same mapping) rather than by the hash Tidemark stored: finds
        /// writes that bypassed Tidemark (a partial _update, a hand fix, a
        /// second writer). Reads every document's source: slower.
        #[arg(long)]
        deep: bool,
        /// Do not read Kafka for why each document drifted (for an audit
        /// while Kafka is unreachable); the report then suggests
        /// `audit --repair` only.
        #[arg(long)]
        no_causes: bool,
        /// Run as a service: a rolling pass every --interval, a full pass
        /// every --full-every, /readyz and /metrics on --listen (see
        /// README, "audit --watch"). Stops on SIGTERM or Ctrl-C.
        #[arg(long)]
        watch: bool,
        /// With --watch: seconds between rolling passes.
        #[arg(long, default_value_t = 60)]
        interval: u64,
        /// With --watch: seconds between full passes (the first is one).
        #[arg(long, default_value_t = 3600)]
        full_every: u64,
        /// With --watch: how far back a rolling pass reads changed rows
        /// (by the table's audit_time_column), in seconds.
        #[arg(long, default_value_t = 600)]
        lookback: u64,
        /// With --watch: where /readyz and /metrics are served.
        #[arg(long, default_value = "127.0.0.1:9466")]
        listen: std::net::SocketAddr,
        /// With --watch: repair drift seen for longer than this many
        /// seconds (longer than the consumer's lag), as audit --repair
        /// --yes would, recorded as a run. Off by default.
        #[arg(long)]
        repair_after: Option<u64>,
        /// With --watch: when a column's type changes to one its index's
        /// mapping cannot take (text to jsonb, say: the consumer's writes
        /// of that table wait meanwhile), reindex the table as reindex
        /// --table T --yes would, instead of only reporting it. Off by
        /// default.
        #[arg(long)]
        reindex: bool,
    },
    /// Lists what the dead-letter topic holds: time, stage, table, key,
    /// reason and origin (never row contents). With --repair, once the
    /// cause is fixed (a mapping, say), re-applies those keys through
    /// window's source mode: rows read at an exported snapshot, written at
    /// its LSN, vanished rows deleted; a dry run without --yes; recorded in
    /// the runs index. Exit 0 listed (or repaired), 1 none found (or some
    /// still differ), 2 error.
    DeadLetters {
        /// Only dead letters set aside at or after this time: RFC 3339 or
        /// relative (-2h, -1d).
        #[arg(long, allow_hyphen_values = true)]
        since: Option<String>,
        /// Only this table (schema.table).
        #[arg(long)]
        table: Option<String>,
        /// Only dead letters whose reason contains this text
        /// (case-insensitive), e.g. mapper_parsing_exception.
        #[arg(long)]
        reason: Option<String>,
        /// Repair the keys of the dead letters listed.
        #[arg(long)]
        repair: bool,
        /// With --repair: write.
        #[arg(long)]
        yes: bool,
        /// With --repair: write even to an index that is not this
        /// pipeline's (another pipeline's stamp, or none).
        #[arg(long)]
        target_override: bool,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Source,
    Log,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum AuditFormat {
    Text,
    Json,
    Html,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Json,
}

/// `word` as one shell word: as it is when it needs no quoting.
fn shell_word(word: &str) -> String {
    if !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+:@=,".contains(c))
    {
        return word.to_owned();
    }
    format!("'{}'", word.replace('\'', "'\\''"))
}

fn main() -> ExitCode {
    let binary = tidemark_process::Binary {
        name: "tidemark-replay",
        default_log: "warn",
        log_fatal: false,
    };
    binary.main(Args::parse, run)
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let path = args
        .config
        .context("--config (or TIDEMARK_CONFIG) is required: the deployment's TOML file")?;
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    let config = Config::from_toml(&text, |name| std::env::var(name).ok())
        .with_context(|| format!("config file {}", path.display()))?;
    match args.command {
        Command::DeadLetters {
            since,
            table,
            reason,
            repair,
            yes,
            target_override,
            format,
        } => {
            let now = jiff::Timestamp::now();
            let since_ms = since
                .map(|s| time::parse_time(&s, now).map_err(|e| anyhow::anyhow!("--since {e}")))
                .transpose()?
                .map(|t| t.as_millisecond());
            check_tables(&config, table.as_slice())?;
            reach_kafka(&config.kafka).await?;
            let filter = tidemark_replay::dead_letters::Filter {
                since_ms,
                table,
                reason,
                topics: None,
            }
            .of_deployment(&config);
            dead_letters(&config, &filter, repair, yes, target_override, format).await
        }
        Command::Window {
            from,
            to,
            table,
            key,
            dry_run,
            yes,
            mode,
            allow_partial,
            target_override,
            output,
        } => {
            let now = jiff::Timestamp::now();
            let from = time::parse_time(&from, now).map_err(|e| anyhow::anyhow!("--from {e}"))?;
            let to = time::parse_time(&to, now).map_err(|e| anyhow::anyhow!("--to {e}"))?;
            if from >= to {
                anyhow::bail!("--from {from} is not before --to {to}");
            }
            window(
                &config,
                from,
                to,
                &table,
                &key,
                yes && !dry_run,
                mode,
                allow_partial,
                target_override,
                output,
            )
            .await
        }
        Command::Backfill {
            table,
            filter,
            dry_run,
            yes,
            target_override,
        } => {
            backfill(
                &config,
                &table,
                filter.as_deref(),
                yes && !dry_run,
                target_override,
            )
            .await
        }
        Command::Reindex {
            table,
            dry_run,
            yes,
            target_override,
            rollback,
            abandon,
        } => {
            let dir = path
                .parent()
                .map(std::path::Path::to_path_buf)
                .unwrap_or_default();
            reindex::reindex(
                &config,
                &dir,
                &table,
                yes && !dry_run,
                target_override,
                rollback,
                abandon,
            )
            .await
        }
        Command::Runs { limit, all, format } => {
            let search = tidemark_index::search::Search::connect(config.opensearch()?)?;
            let deployment = (!all).then_some(config.kafka.topic_prefix.as_str());
            let runs = tidemark_index::runs::list(&search, limit, deployment).await?;
            match format {
                Format::Json => println!("{:#}", serde_json::Value::Array(runs.clone())),
                Format::Text => {
                    for r in &runs {
                        println!(
                            "{}  {}  {:<8} {:<9} {}@{}  {}  {}",
                            r["started"].as_str().unwrap_or("-"),
                            r["deployment"].as_str().unwrap_or("-"),
                            r["command"].as_str().unwrap_or("-"),
                            if r["dry_run"] == true {
                                "dry-run"
                            } else {
                                "write"
                            },
                            r["user"].as_str().unwrap_or("-"),
                            r["host"].as_str().unwrap_or("-"),
                            r["outcome"].as_str().unwrap_or("-"),
                            r["arguments"]
                                .as_array()
                                .map(|a| a
                                    .iter()
                                    .filter_map(|v| v.as_str())
                                    .collect::<Vec<_>>()
                                    .join(" "))
                                .unwrap_or_default()
                        );
                    }
                }
            }
            Ok(if runs.is_empty() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Audit {
            table,
            format,
            out,
            recheck_after,
            sample,
            since,
            repair,
            yes,
            target_override,
            deep,
            no_causes,
            watch: watching,
            interval,
            full_every,
            lookback,
            listen,
            repair_after,
            reindex,
            part,
            merge,
        } => {
            if !merge.is_empty() {
                if repair || watching || part.is_some() || sample.is_some() || since.is_some() {
                    anyhow::bail!(
                        "--merge adds up reports already made: --repair, --watch, --part, --sample and --since do not apply"
                    );
                }
                return audit::merge(&merge, format, out);
            }
            let part = part
                .map(|p| tidemark_replay::audit::Part::parse(&p))
                .transpose()
                .map_err(anyhow::Error::msg)?;
            if let Some(f) = sample
                && !(f > 0.0 && f <= 1.0)
            {
                anyhow::bail!("--sample {f}: must be a fraction in (0, 1], e.g. 0.01");
            }
            let since = since
                .map(|s| time::parse_time(&s, jiff::Timestamp::now()))
                .transpose()
                .map_err(anyhow::Error::msg)?;
            let invocation = format!(
                "tidemark-replay --config {}",
                shell_word(&path.display().to_string())
            );
            if watching {
                if part.is_some() {
                    anyhow::bail!("--watch audits whole tables: --part does not apply");
                }
                if repair || since.is_some() || out.is_some() {
                    anyhow::bail!(
                        "--watch runs its own passes: --repair, --since and --out do not apply (--repair-after SECS repairs from a watch)"
                    );
                }
                if interval == 0 || full_every == 0 {
                    anyhow::bail!("--interval and --full-every must be at least 1 second");
                }
                let options = WatchOptions {
                    interval: Duration::from_secs(interval),
                    full_every: Duration::from_secs(full_every),
                    lookback: Duration::from_secs(lookback),
                    sample: sample.unwrap_or(0.01),
                    listen,
                    repair_after: repair_after.map(Duration::from_secs),
                    recheck_after: Duration::from_secs(recheck_after),
                    deep,
                    causes: !no_causes,
                    invocation,
                    reindex,
                    config_dir: path
                        .parent()
                        .map(std::path::Path::to_path_buf)
                        .unwrap_or_default(),
                };
                return watch(&config, &table, options).await;
            }
            if repair_after.is_some() {
                anyhow::bail!("--repair-after needs --watch (without it: --repair)");
            }
            if reindex {
                anyhow::bail!(
                    "--reindex needs --watch (without it: tidemark-replay reindex --table T --yes)"
                );
            }
            let options = AuditOptions {
                format,
                out,
                recheck_after,
                sample,
                since,
                repair,
                yes,
                target_override,
                deep,
                causes: !no_causes,
                invocation,
                part,
            };
            audit(&config, &table, options).await
        }
        Command::History {
            table,
            key,
            since,
            full,
            format,
        } => {
            let Some(entry) = config.tables.iter().find(|t| t.table == table) else {
                anyhow::bail!(
                    "--table {table}: not in the config's [[tables]] ({})",
                    config
                        .tables
                        .iter()
                        .map(|t| t.table.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            };
            let (schema, name) = entry.parts();
            reach_kafka(&config.kafka).await?;
            let columns = if keys::needs_catalog(&key) {
                let client = ConnInfo::from_config(&config)?
                    .connect("tidemark-replay")
                    .await?;
                keys::primary_key(&client, schema, name).await?
            } else {
                Vec::new()
            };
            let key = keys::parse_key(&key, &table, &columns).map_err(anyhow::Error::msg)?;
            let since_ms = since
                .map(|s| time::parse_time(&s, jiff::Timestamp::now()))
                .transpose()
                .map_err(anyhow::Error::msg)?
                .map(|t| t.as_millisecond());
            let database = ConnInfo::from_config(&config)?.database;
            let source = Source {
                database,
                schema: schema.to_owned(),
                table: name.to_owned(),
            };
            let topic = config.kafka.table_topic(schema, name);
            let kafka = config.kafka.clone();
            let found = tokio::task::spawn_blocking(move || {
                history::read_history(&kafka, &topic, &source, &key, since_ms)
            })
            .await
            .context("history task")??;
            match format {
                Format::Text => print!("{}", history::render_text(&found, full)),
                Format::Json => println!("{:#}", history::render_json(&found)),
            }
            Ok(if found.steps.is_empty() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}

/// Every `--table` must be a configured table; the error names it.
fn check_tables(config: &Config, tables: &[String]) -> anyhow::Result<()> {
    match tables
        .iter()
        .find(|t| !config.tables.iter().any(|c| &c.table == *t))
    {
        Some(t) => anyhow::bail!("--table {t}: not in the config's [[tables]]"),
        None => Ok(()),
    }
}

/// The configured tables `--table` chose (every one when none), in config
/// order, each with its mapping.
fn chosen<'a>(
    config: &'a Config,
    mappings: &'a tidemark_index::mapping::Mappings,
    tables: &[String],
) -> Vec<(
    &'a tidemark_schemas::config::Table,
    &'a tidemark_index::mapping::TableMapping,
)> {
    config
        .tables
        .iter()
        .filter(|entry| tables.is_empty() || tables.contains(&entry.table))
        .filter_map(|entry| {
            let (schema, name) = entry.parts();
            Some((entry, mappings.get(schema, name)?))
        })
        .collect()
}

/// Fails with a how-to-fix error when no broker answers or takes replay's
/// Kafka user (before a command reads a topic).
pub(crate) async fn reach_kafka(kafka: &tidemark_schemas::config::Kafka) -> anyhow::Result<()> {
    tidemark_kafka::check(kafka, "tidemark-replay", std::time::Duration::from_secs(10)).await?;
    Ok(())
}
