//! `window`: the keys changed in a time window (from Kafka), repaired in
//! source mode (rows read again at one exported snapshot) or log mode.

use std::process::ExitCode;

use tidemark_postgres::ConnInfo;
use tidemark_schemas::config::Config;

use tidemark_replay::guard::{Guard, seen_identity};
use tidemark_replay::keys;

use crate::{Format, Mode};

#[allow(clippy::too_many_arguments)]
pub async fn window(
    config: &Config,
    from: jiff::Timestamp,
    to: jiff::Timestamp,
    tables: &[String],
    keys: &[String],
    write: bool,
    mode: Mode,
    allow_partial: bool,
    target_override: bool,
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
    tracing::debug!("window: started");
    crate::check_tables(config, tables)?;
    if !keys.is_empty() && tables.len() != 1 {
        anyhow::bail!("--key needs exactly one --table (keys belong to a table)");
    }
    let kafka = config.kafka.clone();
    // Asked on its own thread while the rest starts; awaited for the print.
    let kafka_cluster = tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let consumer: BaseConsumer = tidemark_kafka::client_config(&kafka, "tidemark-replay")
            .create()
            .ok()?;
        consumer
            .client()
            .fetch_cluster_id(rdkafka::util::Timeout::After(
                std::time::Duration::from_secs(10),
            ))
    });
    let search = std::sync::Arc::new(tidemark_index::search::Search::connect(
        config.opensearch()?,
    )?);
    let guard = Guard::start(&search, &config.kafka.topic_prefix, "window", write);
    let conn = ConnInfo::from_config(config)?;
    // The three systems of the target print are asked at the same time.
    let (cluster, client, ()) = tokio::try_join!(
        async { anyhow::Ok(search.info().await?) },
        async { anyhow::Ok(conn.connect("tidemark-replay").await?) },
        crate::reach_kafka(&config.kafka),
    )?;
    tracing::debug!("window: OpenSearch and PostgreSQL reached");
    // Whether the session is encrypted, as the server sees it.
    let tls = conn.tls_state(&client).await;
    let mappings = tidemark_index::mapping::Mappings::new(config);
    let mut found = Vec::new();
    for (entry, mapping) in crate::chosen(config, &mappings, tables) {
        let (schema, name) = entry.parts();
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
        let kafka = config.kafka.clone();
        let owned = mapping.clone();
        let start = window::Start {
            from_ms: from.as_millisecond(),
            allow_partial,
        };
        let to_ms = to.as_millisecond();
        let keys_found = tokio::task::spawn_blocking(move || match mode {
            Mode::Source => {
                window::collect_keys(&kafka, &topic, &owned, start, to_ms, only.as_deref())
                    .map(Found::Source)
            }
            Mode::Log => window::collect_log(&kafka, &topic, &owned, start, to_ms, only.as_deref())
                .map(Found::Log),
        })
        .await??;
        let shortfalls = match &keys_found {
            Found::Source(f) => &f.shortfalls,
            Found::Log(f) => &f.shortfalls,
        };
        if !shortfalls.is_empty() {
            eprintln!(
                "{}\n--allow-partial: repairing what Kafka still holds; run `tidemark-replay audit --table {} --repair` for the rest",
                window::shortfall_text(&mapping.qualified(), shortfalls),
                mapping.qualified()
            );
        }
        found.push((mapping, keys_found));
    }
    let kafka_cluster = kafka_cluster
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| "unknown".into());
    let seen = seen_identity(config, &conn, &client, kafka_cluster.clone()).await;
    let system_id = seen.postgres_system.clone().unwrap_or_else(|| {
        "unknown (neither IDENTIFY_SYSTEM nor pg_control_system answered)".into()
    });
    let indices: Vec<&str> = found.iter().map(|(m, _)| m.index.as_str()).collect();
    let checked = guard
        .check_targets(&indices, &seen, target_override)
        .await?;
    let kafka_cluster = format!(
        "{kafka_cluster} ({})",
        tidemark_kafka::describe(&config.kafka)
    );
    let total_keys: usize = found.iter().map(|(_, f)| f.keys()).sum();
    let total_events: u64 = found.iter().map(|(_, f)| f.events()).sum();
    let target = format!(
        "target:\n  PostgreSQL  system {system_id}, database {}, {tls}\n  Kafka       cluster {kafka_cluster}, topics {}\n  OpenSearch  cluster {} ({}), indices {}\n  window      {from} .. {to}\n  found       {total_events} changes of {total_keys} keys\n  mode        {}, {}\n",
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
        guard.mode(),
    );
    guard.show_checked_target(&target, checked).await?;
    let stats = std::sync::Arc::new(tidemark_index::apply::ApplyStats::default());
    let applier = tidemark_index::apply::Applier::new(search.clone(), stats);
    let job = window::Job {
        config,
        search: &search,
        applier: &applier,
        write,
        by_content: false,
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
                failure = Some(tidemark_process::report(&e));
                break;
            }
        }
    }
    let results_json = match mode {
        Mode::Source => window::to_json(&results),
        Mode::Log => serde_json::json!(log_results),
    };
    // Log mode refuses keys that changed again after the window; the run
    // then did not do all it was asked, and says so in its exit code.
    let refused: u64 = log_results.iter().map(|r| r.refused).sum();
    // Source mode checks its own work: a key it did not repair fails the run.
    let unrepaired: u64 = results.iter().map(|r| r.unrepaired()).sum();
    let outcome = match (&failure, total_keys) {
        (Some(e), _) => format!("error: {e}"),
        (None, 0) => "nothing to do".to_owned(),
        (None, _) if refused > 0 => format!("done; {refused} keys refused (newer changes)"),
        (None, _) if unrepaired > 0 => format!("done; {unrepaired} keys not repaired"),
        (None, _) if write && mode == Mode::Source => "done; verified".to_owned(),
        (None, _) => "done".to_owned(),
    };
    guard.record(&outcome, results_json.clone()).await?;
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
    } else if unrepaired > 0 {
        eprintln!(
            "{unrepaired} keys not repaired: their writes were refused or did not hold (listed \
             under \"still differs\"; the warnings above give OpenSearch's reasons)"
        );
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
