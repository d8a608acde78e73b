//! `tidemark-replay`: the incident tools.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tidemark_postgres::ConnInfo;
use tidemark_replay::{history, keys, time};
use tidemark_schemas::Source;
use tidemark_schemas::config::Config;

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
        #[arg(long, value_enum, default_value_t = Format::Text)]
        output: Format,
    },
    /// Lists recorded replay runs, newest first.
    Runs {
        #[arg(long, default_value_t = 20)]
        limit: usize,
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
        /// Repair what drifted through window's source mode (rows read at an
        /// exported snapshot, written at its LSN), then check those
        /// documents again. Without --yes, a dry run of the repair.
        #[arg(long)]
        repair: bool,
        /// With --repair: write.
        #[arg(long)]
        yes: bool,
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

fn main() -> ExitCode {
    tidemark_process::no_transparent_huge_pages();
    let args = Args::parse();
    tidemark_process::init_logging("warn");
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("tidemark-replay: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tidemark-replay: {}", tidemark_process::report(e.as_ref()));
            ExitCode::from(2)
        }
    }
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
            format,
        } => {
            let now = jiff::Timestamp::now();
            let since_ms = since
                .map(|s| time::parse_time(&s, now).map_err(|e| anyhow::anyhow!("--since {e}")))
                .transpose()?
                .map(|t| t.as_millisecond());
            if let Some(t) = &table
                && !config.tables.iter().any(|c| &c.table == t)
            {
                anyhow::bail!("--table {t}: not in the config's [[tables]]");
            }
            let filter = tidemark_replay::dead_letters::Filter {
                since_ms,
                table,
                reason,
            };
            dead_letters(&config, &filter, repair, yes, format).await
        }
        Command::Window {
            from,
            to,
            table,
            key,
            dry_run,
            yes,
            mode,
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
                output,
            )
            .await
        }
        Command::Runs { limit, format } => {
            let search = tidemark_index::search::Search::connect(config.opensearch()?)?;
            let runs = tidemark_index::runs::list(&search, limit).await?;
            match format {
                Format::Json => println!("{:#}", serde_json::Value::Array(runs.clone())),
                Format::Text => {
                    for r in &runs {
                        println!(
                            "{}  {:<8} {:<9} {}@{}  {}  {}",
                            r["started"].as_str().unwrap_or("-"),
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
        } => {
            if let Some(f) = sample
                && !(f > 0.0 && f <= 1.0)
            {
                anyhow::bail!("--sample {f}: must be a fraction in (0, 1], e.g. 0.01");
            }
            let since = since
                .map(|s| time::parse_time(&s, jiff::Timestamp::now()))
                .transpose()
                .map_err(anyhow::Error::msg)?;
            let options = AuditOptions {
                format,
                out,
                recheck_after,
                sample,
                since,
                repair,
                yes,
            };
            audit(&config, &table, options).await
        }
        Command::History {
            table,
            key,
            since,
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
            let brokers = config.kafka.brokers.clone();
            let found = tokio::task::spawn_blocking(move || {
                history::read_history(&brokers, &topic, &source, &key, since_ms)
            })
            .await
            .context("history task")??;
            match format {
                Format::Text => print!("{}", history::render_text(&found)),
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

#[derive(Debug)]
struct AuditOptions {
    format: AuditFormat,
    out: Option<PathBuf>,
    recheck_after: u64,
    sample: Option<f64>,
    since: Option<jiff::Timestamp>,
    repair: bool,
    yes: bool,
}

async fn audit(
    config: &Config,
    tables: &[String],
    options: AuditOptions,
) -> anyhow::Result<ExitCode> {
    let AuditOptions {
        format,
        out,
        recheck_after,
        sample,
        since,
        repair,
        yes,
    } = options;
    for t in tables {
        if !config.tables.iter().any(|c| &c.table == t) {
            anyhow::bail!("--table {t}: not in the config's [[tables]]");
        }
    }
    let search = tidemark_index::search::Search::connect(config.opensearch()?)?;
    search.info().await?;
    let mut client = ConnInfo::from_config(config)?
        .connect("tidemark-audit")
        .await?;
    let mappings = tidemark_index::mapping::Mappings::new(config);
    let mut reports = Vec::new();
    for entry in &config.tables {
        if !tables.is_empty() && !tables.contains(&entry.table) {
            continue;
        }
        let (schema, name) = entry.parts();
        let Some(mapping) = mappings.get(schema, name) else {
            continue;
        };
        let target = tidemark_replay::audit::Target {
            mapping,
            time_column: entry.audit_time_column.as_deref(),
            sample,
            since,
        };
        reports.push(
            tidemark_replay::audit::audit_table(
                &mut client,
                &search,
                &target,
                std::time::Duration::from_secs(recheck_after),
            )
            .await?,
        );
    }
    let text = match format {
        AuditFormat::Text => tidemark_replay::audit::render_text(&reports),
        AuditFormat::Json => format!("{:#}\n", serde_json::json!({"tables": reports})),
        AuditFormat::Html => {
            tidemark_replay::audit::render_html(&reports, &jiff::Timestamp::now().to_string())
        }
    };
    match out {
        Some(path) => std::fs::write(&path, text)
            .with_context(|| format!("--out {}: cannot write", path.display()))?,
        None => print!("{text}"),
    }
    let drifted: u64 = reports.iter().map(|r| r.drifted()).sum();
    if repair && drifted > 0 {
        return repair_drift(config, &reports, &mut client, yes).await;
    }
    Ok(if drifted > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

#[allow(clippy::too_many_arguments)]
async fn window(
    config: &Config,
    from: jiff::Timestamp,
    to: jiff::Timestamp,
    tables: &[String],
    keys: &[String],
    write: bool,
    mode: Mode,
    output: Format,
) -> anyhow::Result<ExitCode> {
    use tidemark_replay::window;
    enum Found {
        Source(window::WindowKeys),
        Log(window::LogWindow),
    }
    impl Found {
        fn keys(&self) -> usize {
            match self {
                Found::Source(f) => f.len() as usize,
                Found::Log(f) => f.len() as usize,
            }
        }
        fn events(&self) -> u64 {
            match self {
                Found::Source(f) => f.events,
                Found::Log(f) => f.events,
            }
        }
    }
    let started = jiff::Timestamp::now();
    tracing::debug!("window: started");
    for t in tables {
        if !config.tables.iter().any(|c| &c.table == t) {
            anyhow::bail!("--table {t}: not in the config's [[tables]]");
        }
    }
    if !keys.is_empty() && tables.len() != 1 {
        anyhow::bail!("--key needs exactly one --table (keys belong to a table)");
    }
    let brokers = config.kafka.brokers.clone();
    // Asked on its own thread while the rest starts; awaited for the print.
    let kafka_cluster = tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .ok()?;
        consumer
            .client()
            .fetch_cluster_id(rdkafka::util::Timeout::After(
                std::time::Duration::from_secs(10),
            ))
    });
    let search = tidemark_index::search::Search::connect(config.opensearch()?)?;
    let conn = ConnInfo::from_config(config)?;
    // The three systems of the target print are asked at the same time.
    let (cluster, client) = tokio::try_join!(search.info(), async {
        anyhow::Ok(conn.connect("tidemark-replay").await?)
    })?;
    tracing::debug!("window: OpenSearch and PostgreSQL reached");
    let system_id = match client
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await
    {
        Ok(row) => row.get::<_, String>(0),
        Err(_) => "unknown (reading it needs pg_monitor)".to_owned(),
    };
    let mappings = tidemark_index::mapping::Mappings::new(config);
    let mut found = Vec::new();
    for entry in &config.tables {
        if !tables.is_empty() && !tables.contains(&entry.table) {
            continue;
        }
        let (schema, name) = entry.parts();
        let Some(mapping) = mappings.get(schema, name) else {
            continue;
        };
        let only = if keys.is_empty() {
            None
        } else {
            let columns = keys::primary_key(&client, schema, name).await?;
            let mut record_keys = Vec::new();
            for k in keys {
                let key = keys::parse_key(k, &entry.table, &columns).map_err(anyhow::Error::msg)?;
                record_keys.push(window::record_key_of(mapping, &key));
            }
            Some(record_keys)
        };
        let topic = config.kafka.table_topic(schema, name);
        let brokers = config.kafka.brokers.clone();
        let owned = mapping.clone();
        let (from_ms, to_ms) = (from.as_millisecond(), to.as_millisecond());
        let keys_found = tokio::task::spawn_blocking(move || match mode {
            Mode::Source => {
                window::collect_keys(&brokers, &topic, &owned, from_ms, to_ms, only.as_deref())
                    .map(Found::Source)
            }
            Mode::Log => {
                window::collect_log(&brokers, &topic, &owned, from_ms, to_ms, only.as_deref())
                    .map(Found::Log)
            }
        })
        .await??;
        found.push((mapping, keys_found));
    }
    let kafka_cluster = kafka_cluster
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| "unknown".into());
    let total_keys: usize = found.iter().map(|(_, f)| f.keys()).sum();
    let total_events: u64 = found.iter().map(|(_, f)| f.events()).sum();
    let target = format!(
        "target:\n  PostgreSQL  system {system_id}, database {}\n  Kafka       cluster {kafka_cluster}, topics {}\n  OpenSearch  cluster {} ({}), indices {}\n  window      {from} .. {to}\n  found       {total_events} changes of {total_keys} keys\n  mode        {}, {}\n",
        conn.database,
        found
            .iter()
            .map(|(m, _)| config.kafka.table_topic(&m.schema, &m.table))
            .collect::<Vec<_>>()
            .join(", "),
        cluster.cluster_name,
        cluster.cluster_uuid,
        found
            .iter()
            .map(|(m, _)| m.index.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        if mode == Mode::Log { "log" } else { "source" },
        if write {
            "WRITE (--yes)"
        } else {
            "dry run: nothing is written; pass --yes to write"
        },
    );
    eprint!("{target}");
    let stats = std::sync::Arc::new(tidemark_index::apply::ApplyStats::default());
    let search = std::sync::Arc::new(search);
    let applier = tidemark_index::apply::Applier::new(search.clone(), stats);
    let job = window::Job {
        config,
        search: &search,
        applier: &applier,
        write,
    };
    let mut results = Vec::new();
    let mut log_results = Vec::new();
    let mut failure = None;
    if total_keys > 0 {
        for (mapping, keys_found) in &found {
            let done = match keys_found {
                Found::Source(f) => window::run_table(&job, mapping, f)
                    .await
                    .map(|r| results.push(r)),
                Found::Log(f) => window::run_log(&job, mapping, &mappings, f)
                    .await
                    .map(|r| log_results.push(r)),
            };
            if let Err(e) = done {
                failure = Some(tidemark_process::report(e.as_ref()));
                break;
            }
        }
    }
    let results_json = match mode {
        Mode::Source => window::to_json(&results),
        Mode::Log => serde_json::json!(log_results),
    };
    let (user, host) = tidemark_index::runs::who();
    // Log mode refuses keys that changed again after the window; the run
    // then did not do all it was asked, and says so in its exit code.
    let refused: u64 = log_results.iter().map(|r| r.refused).sum();
    let outcome = match (&failure, total_keys) {
        (Some(e), _) => format!("error: {e}"),
        (None, 0) => "nothing to do".to_owned(),
        (None, _) if refused > 0 => format!("done; {refused} keys refused (newer changes)"),
        (None, _) => "done".to_owned(),
    };
    let record = tidemark_index::runs::RunRecord {
        command: "window".into(),
        user,
        host,
        started: started.to_string(),
        finished: jiff::Timestamp::now().to_string(),
        arguments: std::env::args().skip(1).collect(),
        dry_run: !write,
        outcome: outcome.clone(),
        results: results_json.clone(),
    };
    tidemark_index::runs::record(&search, &record).await?;
    tracing::debug!("window: run recorded");
    if let Some(e) = failure {
        anyhow::bail!(e);
    }
    match (output, mode) {
        (Format::Text, Mode::Source) => print!("{}", window::render_text(&results, write)),
        (Format::Text, Mode::Log) => print!("{}", window::render_log_text(&log_results, write)),
        (Format::Json, _) => println!(
            "{:#}",
            serde_json::json!({"dry_run": !write, "mode": if mode == Mode::Log { "log" } else { "source" },
                "window": {"from": from.to_string(), "to": to.to_string()}, "tables": results_json})
        ),
    }
    Ok(if total_keys == 0 {
        eprintln!("nothing to do: no changes in the window");
        ExitCode::from(1)
    } else if refused > 0 {
        eprintln!(
            "{refused} keys refused: they changed again after the window, so their window \
             change is not the latest. Repair them with source mode (drop --mode log)"
        );
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Feeds the drifted documents to window's source mode, then checks them
/// again. Exit 0 when nothing drifts any more.
async fn repair_drift(
    config: &Config,
    reports: &[tidemark_replay::audit::TableReport],
    client: &mut tokio_postgres::Client,
    write: bool,
) -> anyhow::Result<ExitCode> {
    let sets: Vec<(String, Vec<(String, tidemark_schemas::Row)>)> = reports
        .iter()
        .filter(|r| r.drifted() > 0)
        .map(|r| (r.table.clone(), r.drifted_keys.clone()))
        .collect();
    repair_keys(
        config,
        &sets,
        client,
        write,
        "audit --repair",
        "drifted documents",
    )
    .await
}

/// Lists dead letters; with `repair`, feeds their keys to window's source
/// mode, then checks them again.
async fn dead_letters(
    config: &Config,
    filter: &tidemark_replay::dead_letters::Filter,
    repair: bool,
    write: bool,
    format: Format,
) -> anyhow::Result<ExitCode> {
    use tidemark_replay::dead_letters;
    let topic = config.kafka.dead_letter_topic();
    let brokers = config.kafka.brokers.clone();
    let scan_filter = filter.clone();
    let scan_topic = topic.clone();
    // librdkafka's calls block; the scan runs beside the runtime.
    let letters = tokio::task::spawn_blocking(move || {
        dead_letters::list(&brokers, &scan_topic, &scan_filter)
    })
    .await
    .context("dead-letter scan task")??;
    match format {
        Format::Text => print!("{}", dead_letters::render_text(&letters)),
        Format::Json => println!(
            "{:#}",
            serde_json::json!({"topic": topic, "dead_letters": letters})
        ),
    }
    if letters.is_empty() {
        return Ok(ExitCode::from(1));
    }
    if !repair {
        return Ok(ExitCode::SUCCESS);
    }
    let mappings = tidemark_index::mapping::Mappings::new(config);
    let mut sets = Vec::new();
    for (table, keys) in dead_letters::keys_by_table(&letters) {
        let Some((schema, name)) = table.split_once('.') else {
            continue;
        };
        let Some(mapping) = mappings.get(schema, name) else {
            eprintln!("{table}: not in the config's [[tables]]; its dead letters are left out");
            continue;
        };
        let mut ids = Vec::with_capacity(keys.len());
        for key in keys {
            match mapping.doc_id(&key) {
                Ok(id) => ids.push((id, key)),
                Err(e) => eprintln!("{e}; that dead letter is left out"),
            }
        }
        sets.push((table, ids));
    }
    let unkeyed = letters.len()
        - letters
            .iter()
            .filter(|d| d.table.is_some() && d.key.is_some())
            .count();
    if unkeyed > 0 {
        eprintln!(
            "{unkeyed} dead letters name no table and key (payloads that were not change events): nothing to repair from them"
        );
    }
    let mut client = ConnInfo::from_config(config)?
        .connect("tidemark-dead-letters")
        .await?;
    repair_keys(
        config,
        &sets,
        &mut client,
        write,
        "dead-letters --repair",
        "dead-lettered keys",
    )
    .await
}

/// The one repair path of audit and dead letters: prints the target, feeds
/// each table's keys (document id, key) to window's source mode, checks
/// them again after a real run, and records the run. Exit 0 when nothing
/// differs any more.
async fn repair_keys(
    config: &Config,
    sets: &[(String, Vec<(String, tidemark_schemas::Row)>)],
    client: &mut tokio_postgres::Client,
    write: bool,
    command: &str,
    what: &str,
) -> anyhow::Result<ExitCode> {
    use tidemark_replay::window;
    let search = std::sync::Arc::new(tidemark_index::search::Search::connect(
        config.opensearch()?,
    )?);
    let cluster = search.info().await?;
    let mappings = tidemark_index::mapping::Mappings::new(config);
    let targets: Vec<(
        &tidemark_index::mapping::TableMapping,
        &Vec<(String, tidemark_schemas::Row)>,
    )> = sets
        .iter()
        .filter(|(_, keys)| !keys.is_empty())
        .filter_map(|(table, keys)| {
            let (schema, name) = table.split_once('.')?;
            Some((mappings.get(schema, name)?, keys))
        })
        .collect();
    eprintln!(
        "repair target: OpenSearch cluster {} ({}), {} {what} in {}; {}",
        cluster.cluster_name,
        cluster.cluster_uuid,
        targets.iter().map(|(_, keys)| keys.len()).sum::<usize>(),
        targets
            .iter()
            .map(|(m, _)| m.index.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        if write {
            "WRITE (--yes)"
        } else {
            "dry run: nothing is written; pass --yes to write"
        }
    );
    let applier = tidemark_index::apply::Applier::new(search.clone(), std::sync::Arc::default());
    let job = window::Job {
        config,
        search: &search,
        applier: &applier,
        write,
    };
    let started = jiff::Timestamp::now();
    let mut results = Vec::new();
    let mut still = 0;
    for (mapping, keys) in targets {
        let window_keys = window::WindowKeys::from_keys(keys.iter())?;
        results.push(window::run_table(&job, mapping, &window_keys).await?);
        if write {
            still += tidemark_replay::audit::recheck(client, &search, mapping, keys).await?;
        }
    }
    print!("{}", window::render_text(&results, write));
    if write {
        println!("after the repair: {still} of the {what} still differ");
    }
    let (user, host) = tidemark_index::runs::who();
    let record = tidemark_index::runs::RunRecord {
        command: command.into(),
        user,
        host,
        started: started.to_string(),
        finished: jiff::Timestamp::now().to_string(),
        arguments: std::env::args().skip(1).collect(),
        dry_run: !write,
        outcome: if !write {
            "dry run".into()
        } else if still == 0 {
            "repaired".into()
        } else {
            format!("{still} still drift")
        },
        results: window::to_json(&results),
    };
    tidemark_index::runs::record(&search, &record).await?;
    Ok(if write && still == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
