//! `backfill`: each table's keys read from PostgreSQL (see
//! `tidemark_replay::backfill`), then the one path of keyed writes
//! ([`repair_sets`]): the target printed and checked, window's source-mode
//! engine, verification, a run record.

use std::process::ExitCode;

use tidemark_postgres::ConnInfo;
use tidemark_replay::backfill::{in_publication, table_keys};
use tidemark_schemas::config::Config;

use crate::repair::repair_sets;

pub async fn backfill(
    config: &Config,
    tables: &[String],
    filter: Option<&str>,
    write: bool,
    target_override: bool,
) -> anyhow::Result<ExitCode> {
    if tables.is_empty() {
        anyhow::bail!("backfill needs --table schema.table (repeat it for several tables)");
    }
    crate::check_tables(config, tables)?;
    if filter.is_some() && tables.len() != 1 {
        anyhow::bail!("--where is a condition on one table's columns: give exactly one --table");
    }
    let mappings = tidemark_index::mapping::Mappings::new(config);
    let chosen = crate::chosen(config, &mappings, tables);
    let mut client = ConnInfo::from_config(config)?
        .connect("tidemark-replay")
        .await?;
    let mut sets = Vec::new();
    for (_, mapping) in &chosen {
        let table = mapping.qualified();
        if !in_publication(&client, config, mapping).await? {
            anyhow::bail!(
                "table {table}: not in publication {} yet, so what changes in it during and after the backfill would never reach the index; \
                 start the producer with this config first (it adds the table to the publication), then run the backfill",
                config.producer.publication
            );
        }
        let keys = table_keys(&mut client, mapping, filter).await?;
        eprintln!(
            "{table}: {} rows to backfill{}",
            keys.len(),
            filter.map(|f| format!(" (where {f})")).unwrap_or_default()
        );
        sets.push((table, keys));
    }
    repair_sets(
        config,
        &sets,
        write,
        target_override,
        "backfill",
        "rows",
        false,
    )
    .await
}
