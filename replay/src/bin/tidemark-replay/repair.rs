//! The repairs fed by a list of keys (`audit --repair`, `dead-letters
//! --repair`), and the dead-letter listing that feeds one.

use std::process::ExitCode;

use anyhow::Context;
use tidemark_schemas::config::Config;

use tidemark_replay::guard::{Guard, seen_identity};

use crate::Format;

/// Lists dead letters; with `repair`, feeds their keys to window's source
/// mode, then checks them again.
pub async fn dead_letters(
    config: &Config,
    filter: &tidemark_replay::dead_letters::Filter,
    repair: bool,
    write: bool,
    target_override: bool,
    format: Format,
) -> anyhow::Result<ExitCode> {
    use tidemark_replay::dead_letters;
    let topic = config.kafka.dead_letter_topic();
    let kafka = config.kafka.clone();
    let scan_filter = filter.clone();
    let scan_topic = topic.clone();
    // librdkafka's calls block; the scan runs beside the runtime.
    let letters =
        tokio::task::spawn_blocking(move || dead_letters::list(&kafka, &scan_topic, &scan_filter))
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
    repair_keys(
        config,
        &sets,
        write,
        target_override,
        "dead-letters --repair",
        "dead-lettered keys",
        false,
    )
    .await
}

/// The one repair path of audit and dead letters: each table's keys
/// (document id, key) through [`repair_sets`].
pub async fn repair_keys(
    config: &Config,
    sets: &[(String, Vec<(String, tidemark_schemas::Row)>)],
    write: bool,
    target_override: bool,
    command: &str,
    what: &str,
    by_content: bool,
) -> anyhow::Result<ExitCode> {
    let mut keyed = Vec::with_capacity(sets.len());
    for (table, keys) in sets.iter().filter(|(_, keys)| !keys.is_empty()) {
        keyed.push((
            table.clone(),
            tidemark_replay::window::WindowKeys::from_keys(keys.iter())?,
        ));
    }
    repair_sets(
        config,
        &keyed,
        write,
        target_override,
        command,
        what,
        by_content,
    )
    .await
}

/// The one path of every write fed by keys (audit and dead-letter repairs,
/// backfill): prints the target, feeds each table's keys to window's
/// source mode, which checks them again after a real run, and records the
/// run. Exit 0 when nothing differs any more.
pub async fn repair_sets(
    config: &Config,
    sets: &[(String, tidemark_replay::window::WindowKeys)],
    write: bool,
    target_override: bool,
    command: &str,
    what: &str,
    by_content: bool,
) -> anyhow::Result<ExitCode> {
    let mappings = tidemark_index::mapping::Mappings::new(config);
    let targets: Vec<(
        &tidemark_index::mapping::TableMapping,
        &tidemark_replay::window::WindowKeys,
    )> = sets
        .iter()
        .filter(|(_, keys)| !keys.is_empty())
        .filter_map(|(table, keys)| {
            let (schema, name) = table.split_once('.')?;
            Some((mappings.get(schema, name)?, keys))
        })
        .collect();
    repair_into(
        config,
        &targets,
        write,
        target_override,
        command,
        what,
        by_content,
    )
    .await
}

/// [`repair_sets`] with each table's index given (a reindex writes to the
/// index it fills, not to the configured name).
pub async fn repair_into(
    config: &Config,
    targets: &[(
        &tidemark_index::mapping::TableMapping,
        &tidemark_replay::window::WindowKeys,
    )],
    write: bool,
    target_override: bool,
    command: &str,
    what: &str,
    by_content: bool,
) -> anyhow::Result<ExitCode> {
    use tidemark_replay::window;
    let search = std::sync::Arc::new(tidemark_index::search::Search::connect(
        config.opensearch()?,
    )?);
    let guard = Guard::start(&search, &config.kafka.topic_prefix, command, write);
    let cluster = search.info().await?;
    // The wrong-target guard needs what this process sees of the pipeline.
    let conn = tidemark_postgres::ConnInfo::from_config(config)?;
    let client = conn.connect("tidemark-replay").await?;
    let kafka = config.kafka.clone();
    let kafka_cluster = tokio::task::spawn_blocking(move || {
        tidemark_kafka::cluster_id(
            &kafka,
            "tidemark-replay",
            std::time::Duration::from_secs(10),
        )
    })
    .await?
    .unwrap_or_else(|_| "unknown (Kafka did not answer)".into());
    let seen = seen_identity(config, &conn, &client, kafka_cluster).await;
    let indices: Vec<&str> = targets.iter().map(|(m, _)| m.index.as_str()).collect();
    let checked = guard
        .check_targets(&indices, &seen, target_override)
        .await?;
    let target = format!(
        "repair target: OpenSearch cluster {} ({}), {} {what} in {}; {}",
        cluster.cluster_name,
        cluster.cluster_uuid,
        targets.iter().map(|(_, keys)| keys.len()).sum::<u64>(),
        indices.join(", "),
        guard.mode(),
    );
    guard.show_checked_target(&target, checked).await?;
    let applier = tidemark_index::apply::Applier::new(search.clone(), std::sync::Arc::default());
    let job = window::Job {
        config,
        search: &search,
        applier: &applier,
        write,
        by_content,
    };
    let mut results = Vec::new();
    for (mapping, keys) in targets {
        results.push(window::run_table(&job, mapping, keys).await?);
    }

    // The engine verified its writes (a real run); what it did not repair
    // still differs.
    let still: u64 = results.iter().map(|r| r.unrepaired()).sum();
    print!("{}", window::render_text(&results, write));
    if write {
        println!("after the repair: {still} of the {what} still differ");
    }
    let outcome = if !write {
        "dry run".into()
    } else if still == 0 {
        "repaired".into()
    } else {
        format!("{still} still drift")
    };
    guard.record(&outcome, window::to_json(&results)).await?;
    Ok(if write && still == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
