//! `reindex`: the steps of `tidemark_replay::reindex` in order, printed as
//! they go: plan, create and mark, fill (backfill's keys through the one
//! path of keyed writes, [`repair_into`]), audit of the new index, swap.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use tidemark_postgres::ConnInfo;
use tidemark_replay::backfill::{in_publication, table_keys};
use tidemark_replay::reindex;
use tidemark_schemas::config::Config;

use crate::repair::repair_into;

/// How long the audit of the new index waits before looking again at what
/// differs (a change the writers have not applied yet).
const RECHECK: Duration = Duration::from_secs(5);

pub async fn reindex(
    config: &Config,
    config_dir: &std::path::Path,
    table: &str,
    write: bool,
    target_override: bool,
    rollback: bool,
    abandon: bool,
) -> anyhow::Result<ExitCode> {
    let tables = [table.to_owned()];
    crate::check_tables(config, &tables)?;
    let mappings = tidemark_index::mapping::Mappings::new(config);
    let Some((entry, mapping)) = crate::chosen(config, &mappings, &tables).pop() else {
        anyhow::bail!("--table {table}: not in the config's [[tables]]");
    };
    let mut client = ConnInfo::from_config(config)?
        .connect("tidemark-replay")
        .await?;
    if !in_publication(&client, config, mapping).await? {
        anyhow::bail!(
            "table {table}: not in publication {} yet, so its changes would never reach the new \
             index; start the producer with this config first, then reindex",
            config.producer.publication
        );
    }
    let columns = tidemark_postgres::describe_table(&client, &mapping.schema, &mapping.table)
        .await
        .with_context(|| format!("table {table}: reading its columns"))?
        .columns;
    let search = tidemark_index::search::Search::connect(config.opensearch()?)?;
    search.info().await?;
    if abandon {
        let Some(index) = reindex::filling(&search, mapping).await? else {
            anyhow::bail!(
                "no reindex of {} is filling an index: nothing to abandon",
                mapping.index
            );
        };
        if !write {
            println!("dry run: would unmark {index} and delete it. Run with --yes to abandon");
            return Ok(ExitCode::from(1));
        }
        reindex::abandon(&search, mapping, &index).await?;
        println!(
            "abandoned: {index} unmarked, then deleted; {} is unchanged",
            mapping.index
        );
        return Ok(ExitCode::SUCCESS);
    }
    let plan = if rollback {
        reindex::plan_rollback(&search, mapping).await?
    } else {
        reindex::plan(&search, mapping, entry, config_dir, &columns).await?
    };
    let typed = plan.body["mappings"]["properties"]
        .as_object()
        .map_or(0, |p| p.len().saturating_sub(1));
    if rollback {
        println!(
            "rollback {table}: {} is an alias of {}; back to {} (kept since that reindex, \
             with its own mapping), filled again first so nothing written since is lost",
            plan.name, plan.current, plan.next
        );
    } else {
        println!(
            "reindex {table}: {} is {}; new index {} ({typed} typed fields{})",
            plan.name,
            if plan.adopt {
                "a concrete index".to_owned()
            } else {
                format!("an alias of {}", plan.current)
            },
            plan.next,
            match &entry.index_settings {
                Some(s) => format!(", settings {}", serde_json::json!(s)),
                None => String::new(),
            }
        );
    }
    if let Some(copy) = &plan.copy {
        println!(
            "  adopting: {} becomes an alias; the concrete index is copied to {copy} first and \
             kept there, write-blocked",
            plan.name
        );
    }
    if !write {
        println!("dry run: nothing created. Run with --yes to reindex");
        return Ok(ExitCode::from(1));
    }
    let started = Instant::now();
    if rollback {
        reindex::mark_existing(&search, &plan).await?;
        println!("marked {}: every writer now writes there too", plan.next);
    } else {
        reindex::create_marked(&search, &plan).await?;
        println!(
            "created {} and marked it: every writer now writes there too",
            plan.next
        );
    }

    let mut into = mapping.clone();
    into.index = plan.next.clone();
    let target = tidemark_replay::audit::Target {
        mapping: &into,
        time_column: entry.audit_time_column.as_deref(),
        sample: None,
        since: None,
        deep: false,
        kafka: None,
        invocation: "",
        known: &[],
        part: None,
    };
    let keys = if rollback {
        // The index went unwritten since the reindex it was replaced by:
        // what changed since (deletes too) is what its audit finds.
        let report =
            tidemark_replay::audit::audit_table(&mut client, &search, &target, RECHECK).await?;
        println!(
            "{table}: {} documents of {} differ from the table",
            report.drifted(),
            plan.next
        );
        tidemark_replay::window::WindowKeys::from_keys(report.drifted_keys.iter())?
    } else {
        let keys = table_keys(&mut client, mapping, None).await?;
        println!("{table}: {} rows to fill {} with", keys.len(), plan.next);
        keys
    };
    let abandon = format!(
        "{} stays marked (writers keep writing there); abandon it with reindex --table {table} \
         --abandon --yes, then run reindex again once the cause is fixed",
        plan.next
    );
    let filled = if keys.is_empty() {
        ExitCode::SUCCESS
    } else {
        repair_into(
            config,
            &[(&into, &keys)],
            true,
            target_override,
            "reindex",
            "rows",
            false,
        )
        .await?
    };
    if filled != ExitCode::SUCCESS {
        anyhow::bail!(
            "the fill of {} did not verify: not swapped; {abandon}",
            plan.next
        );
    }
    let report =
        tidemark_replay::audit::audit_table(&mut client, &search, &target, RECHECK).await?;
    if report.drifted() > 0 {
        print!("{}", tidemark_replay::audit::render_text(&[report]));
        anyhow::bail!(
            "the audit of {} found drift: not swapped; {abandon}",
            plan.next
        );
    }
    println!("audit of {}: clean", plan.next);
    let swapped = reindex::swap(&search, &plan).await?;
    let kept = plan.copy.as_deref().unwrap_or(&plan.current);
    println!(
        "swapped: {} -> {} ({} documents, {} held {}); writes waited {} ms; {} s in all",
        plan.name,
        plan.next,
        swapped.after,
        if plan.adopt {
            &plan.name
        } else {
            &plan.current
        },
        swapped.before,
        swapped.blocked.as_millis(),
        started.elapsed().as_secs()
    );
    println!(
        "  {kept} is kept, write-blocked and no longer written, until you drop it \
         (DELETE /{kept})"
    );
    Ok(ExitCode::SUCCESS)
}
