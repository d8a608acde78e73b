//! `audit --watch`: the audit as a service. A rolling pass every
//! `--interval` (per table: rows changed in the last `--lookback` by its
//! time column, else a `--sample` of the table; plus every drift already
//! known, so drift that was repaired leaves the gauge), a full pass every
//! `--full-every` (the first pass is full) that checks content as
//! `--deep` does (rolling passes do too while drift is known, or always
//! with `--deep`), in the audit's bounded memory.
//! `/readyz` and `/metrics` on `--listen` (see `tidemark_replay::watch`).
//! With `--repair-after SECS`, drift seen for longer than that (so not
//! the consumer's lag) is repaired through the same path as
//! `audit --repair --yes`, and recorded like every write.
//! Every pass also compares each table's columns with its index's mapping
//! (`reindex::type_conflicts`): a column whose type changed to one the
//! index cannot take is logged each pass with the fix, and with
//! `--reindex` the table is reindexed as `reindex --table T --yes` would.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use tidemark_postgres::ConnInfo;
use tidemark_process::http::serve;
use tidemark_replay::audit::{TableReport, Target, audit_table};
use tidemark_replay::watch::{Pass, Watch};
use tidemark_schemas::Row;
use tidemark_schemas::config::Config;
use tracing::{info, warn};

use crate::repair::repair_keys;

#[derive(Debug)]
pub struct WatchOptions {
    pub interval: Duration,
    pub full_every: Duration,
    pub lookback: Duration,
    /// The fraction a rolling pass checks of a table without a time column.
    pub sample: f64,
    pub listen: SocketAddr,
    pub repair_after: Option<Duration>,
    pub recheck_after: Duration,
    pub deep: bool,
    pub causes: bool,
    pub invocation: String,
    pub reindex: bool,
    pub config_dir: std::path::PathBuf,
}

pub async fn watch(
    config: &Config,
    tables: &[String],
    options: WatchOptions,
) -> anyhow::Result<ExitCode> {
    crate::check_tables(config, tables)?;
    let mappings = tidemark_index::mapping::Mappings::new(config);
    let chosen = crate::chosen(config, &mappings, tables);
    let state = Watch::new(chosen.iter().map(|(_, m)| m.qualified()));
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .with_context(|| {
            format!(
                "--listen {}: cannot listen there (in use? pick another address)",
                options.listen
            )
        })?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(serve(listener, state.clone(), stopped));
    eprintln!(
        "audit --watch: {} tables, a rolling pass every {} s, a full pass every {} s; /readyz and /metrics on http://{}",
        chosen.len(),
        options.interval.as_secs(),
        options.full_every.as_secs(),
        options.listen
    );
    // Per table: the drift known (id, key), and since when each id was seen.
    let mut known: HashMap<String, Vec<(String, Row)>> = HashMap::new();
    let mut first_seen: HashMap<(String, String), Instant> = HashMap::new();
    let mut next_full = Instant::now();
    let signal = tidemark_process::wait_for_signal();
    tokio::pin!(signal);
    loop {
        let pass = if Instant::now() >= next_full {
            next_full = Instant::now() + options.full_every;
            Pass::Full
        } else {
            Pass::Rolling
        };
        for (entry, mapping) in &chosen {
            let table = mapping.qualified();
            retype(config, &options, entry, mapping).await;
            let started = Instant::now();
            let previous = known.get(&table).cloned().unwrap_or_default();
            let time_column = entry.audit_time_column.as_deref();
            let target = Target {
                mapping,
                time_column,
                sample: match (pass, time_column) {
                    (Pass::Rolling, None) => Some(options.sample),
                    _ => None,
                },
                since: match (pass, time_column) {
                    (Pass::Rolling, Some(_)) => Some(
                        jiff::Timestamp::now()
                            - jiff::SignedDuration::try_from(options.lookback)
                                .unwrap_or(jiff::SignedDuration::from_secs(600)),
                    ),
                    _ => None,
                },
                // The full pass checks content too: it is what finds writes
                // that bypassed Tidemark. While drift is known, rolling
                // passes do as well, so drift only content shows stays
                // seen until it is repaired.
                deep: options.deep || pass == Pass::Full || !previous.is_empty(),
                kafka: options.causes.then_some(&config.kafka),
                invocation: &options.invocation,
                known: &previous,
                part: None,
            };
            let outcome = tokio::select! {
                outcome = one_pass(config, &target, options.recheck_after) => outcome,
                () = &mut signal => break,
            };
            match outcome {
                Ok(report) => {
                    let seconds = started.elapsed().as_secs_f64();
                    state.passed(pass, &report, seconds);
                    println!(
                        "{} pass: {table}: {} missing, {} extra, {} stale ({seconds:.1} s)",
                        pass.as_str(),
                        report.counts.missing,
                        report.counts.extra,
                        report.counts.stale
                    );
                    let now = Instant::now();
                    first_seen.retain(|(t, id), _| {
                        t != &table || report.drifted_keys.iter().any(|(d, _)| d == id)
                    });
                    for (id, _) in &report.drifted_keys {
                        first_seen.entry((table.clone(), id.clone())).or_insert(now);
                    }
                    known.insert(table.clone(), report.drifted_keys);
                }
                Err(e) => {
                    let why = tidemark_process::report(e.as_ref());
                    warn!(table = %table, pass = pass.as_str(), error = %why, "audit --watch: the pass could not run; trying again at the next interval");
                    state.failed(&table, why);
                    if pass == Pass::Full {
                        // The full pass is owed: the next pass is one.
                        next_full = Instant::now();
                    }
                }
            }
        }
        if let Some(after) = options.repair_after {
            repair_lasting(config, &state, &mut known, &first_seen, after).await;
        }
        tokio::select! {
            () = tokio::time::sleep(options.interval) => {}
            () = &mut signal => break,
        }
    }
    info!("audit --watch: stopping");
    let _ = stop.send(true);
    let _ = server.await;
    Ok(ExitCode::SUCCESS)
}

/// Reports (and with `--reindex`, fixes) the columns of a table whose type
/// changed to one its index cannot take. An outage is logged and the next
/// pass looks again.
async fn retype(
    config: &Config,
    options: &WatchOptions,
    entry: &tidemark_schemas::config::Table,
    mapping: &tidemark_index::mapping::TableMapping,
) {
    let table = mapping.qualified();
    let conflicts = async {
        let client = ConnInfo::from_config(config)?
            .connect("tidemark-audit-watch")
            .await?;
        let columns = tidemark_postgres::describe_table(&client, &mapping.schema, &mapping.table)
            .await?
            .columns;
        let search = tidemark_index::search::Search::connect(config.opensearch()?)?;
        anyhow::Ok(
            tidemark_replay::reindex::type_conflicts(
                &search,
                mapping,
                entry,
                &options.config_dir,
                &columns,
            )
            .await?,
        )
    };
    let conflicts = match conflicts.await {
        Ok(conflicts) if conflicts.is_empty() => return,
        Ok(conflicts) => conflicts,
        Err(e) => {
            warn!(table = %table, error = %tidemark_process::report(e.as_ref()), "audit --watch: cannot compare the columns with the index's mapping; the next pass looks again");
            return;
        }
    };
    let fields = conflicts
        .iter()
        .map(|c| format!("{} ({} in the index, {} now)", c.field, c.indexed, c.wanted))
        .collect::<Vec<_>>()
        .join(", ");
    if !options.reindex {
        warn!(table = %table, fields = %fields, "audit --watch: columns changed to types the index cannot take (the consumer's writes of the table wait): run tidemark-replay reindex --table {table} --yes, or watch with --reindex");
        return;
    }
    warn!(table = %table, fields = %fields, "audit --watch: columns changed to types the index cannot take; reindexing (--reindex)");
    match crate::reindex::reindex(
        config,
        &options.config_dir,
        &table,
        true,
        false,
        false,
        false,
    )
    .await
    {
        Ok(code) if code == ExitCode::SUCCESS => {
            info!(table = %table, "audit --watch: reindexed")
        }
        Ok(_) => {
            warn!(table = %table, "audit --watch: the reindex did not finish; the next pass looks again")
        }
        Err(e) => {
            warn!(table = %table, error = %tidemark_process::report(e.as_ref()), "audit --watch: the reindex could not run; the next pass looks again")
        }
    }
}

/// One table's pass on a fresh connection (an outage fails the pass; the
/// next interval connects again).
async fn one_pass(
    config: &Config,
    target: &Target<'_>,
    recheck_after: Duration,
) -> anyhow::Result<TableReport> {
    let search = tidemark_index::search::Search::connect(config.opensearch()?)?;
    search.info().await?;
    let mut client = ConnInfo::from_config(config)?
        .connect("tidemark-audit-watch")
        .await?;
    Ok(audit_table(&mut client, &search, target, recheck_after).await?)
}

/// Repairs the drift seen for longer than `after`, table by table.
async fn repair_lasting(
    config: &Config,
    state: &Watch,
    known: &mut HashMap<String, Vec<(String, Row)>>,
    first_seen: &HashMap<(String, String), Instant>,
    after: Duration,
) {
    for (table, keys) in known.iter_mut() {
        let lasting: Vec<(String, Row)> = keys
            .iter()
            .filter(|(id, _)| {
                first_seen
                    .get(&(table.clone(), id.clone()))
                    .is_some_and(|t| t.elapsed() >= after)
            })
            .cloned()
            .collect();
        if lasting.is_empty() {
            continue;
        }
        info!(table = %table, documents = lasting.len(), after_s = after.as_secs(), "audit --watch: repairing drift that outlasted --repair-after");
        let sets = vec![(table.clone(), lasting.clone())];
        match repair_keys(
            config,
            &sets,
            true,
            false,
            "audit --watch --repair-after",
            "drifted documents",
            // By content: a foreign write the full pass found keeps its
            // stored hash, and only a content check sees it needs writing.
            true,
        )
        .await
        {
            Ok(code) if code == ExitCode::SUCCESS => {
                state.repaired(table, lasting.len() as u64);
            }
            Ok(_) => {
                warn!(table = %table, "audit --watch: some repaired documents still differ; the next pass looks again")
            }
            Err(e) => {
                warn!(table = %table, error = %tidemark_process::report(e.as_ref()), "audit --watch: the repair could not run; the next pass looks again")
            }
        }
    }
}
