//! Start-up and the producer's life: check everything, decide whether a
//! snapshot is needed, take it, stream, shut down cleanly.
//!
//! Start-up order, and why:
//! 1. PostgreSQL checks (wal_level, primary, privileges, tables, keys) and
//!    Kafka reachability: fail fast, before anything is created.
//! 2. Publication and topics are created if missing (when allowed).
//! 3. The slot: if it exists and our state record says its snapshot
//!    finished, stream from it, after checking nothing else moved it past
//!    our last confirmation, and after snapshotting the tables added to the
//!    config since (`snapshot::again`). If our record says a snapshot was interrupted,
//!    drop the slot and start over. If it is missing, record "snapshot
//!    started" first, then create it with an exported snapshot, read every
//!    table at that snapshot, and record "snapshot complete".
//!
//!    Before any of that, the history must be unbroken (`state::history_gap`):
//!    a slot gone after it had streamed, another cluster, or a new timeline
//!    stops start-up with what was lost and the fix, unless `--resnapshot`
//!    asks for a new snapshot over the gap, which is then recorded.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use pgwire_replication::{ReplicationClient, ReplicationConfig};
use tidemark_schemas::Lsn;
use tidemark_schemas::config::Config;
use tokio::sync::watch;
use tokio_postgres::Client;
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::sink::{Sink, SinkError};
use crate::snapshot::{self, SnapshotError};
use crate::state::{HistoryGap, SlotProgress, StateStore, history_gap};
use crate::stream::{Stream, StreamError};
use crate::waits::wait_reason;
use tidemark_postgres::server::{self, check_server, ensure_publication, slot_state};
use tidemark_postgres::{
    CatalogTable, ConnInfo, Point, Replication, SourceError, describe_table, quote_ident,
};

/// How long start-up waits for an active slot to be released before
/// reporting that another reader holds it.
const SLOT_RELEASE_WAIT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("replication session: {0}")]
    Replication(#[from] pgwire_replication::PgWireError),
    #[error(
        "replication slot {slot} is at {slot_lsn}, past the last position Tidemark confirmed ({recorded}). Something \
         else consumed from this slot, so changes in between may never have reached Kafka. Drop the slot \
         (SELECT pg_drop_replication_slot('{slot}')) to take a new snapshot, then audit the index"
    )]
    SlotMoved {
        slot: String,
        slot_lsn: Lsn,
        recorded: Lsn,
    },
    #[error("CREATE_REPLICATION_SLOT for {slot} returned no {what}")]
    SlotCreation { slot: String, what: &'static str },
    #[error(
        "the change history of slot {slot} has a gap: {what}. Tidemark had confirmed changes up to \
         {last_confirmed}; what happened after that was never read, so rows changed or deleted since \
         may be wrong in the index. To recover: start tidemark-producer once with --resnapshot. It takes \
         a new snapshot of every table, records the gap in the state topic, and sends each table a \
         resnapshot marker after its rows, with which consumers remove the documents of rows deleted \
         during the gap; then check with `tidemark-replay audit`"
    )]
    HistoryGap {
        slot: String,
        what: String,
        last_confirmed: String,
    },
    #[error(
        "table {table}: its topic {topic} is already fed by slot {slot} ({whose}), and one topic \
         cannot carry two slots' rows. {fix}"
    )]
    TopicClaimed {
        table: String,
        topic: String,
        slot: String,
        whose: String,
        fix: String,
    },
    #[error("--forget-slot {0}: {1}")]
    Forget(String, String),
}

/// How the producer starts.
#[derive(Debug, Clone, Copy, Default)]
pub struct StartOptions {
    /// Take a new snapshot over a gap in the history (see [`RunError::HistoryGap`])
    /// instead of refusing to start.
    pub resnapshot: bool,
}

/// The cluster and timeline that answer now.
struct Server {
    system_id: String,
    timeline: u32,
}

/// IDENTIFY_SYSTEM, on a replication session of its own that never starts;
/// logs how replication sessions are protected.
async fn identify(config: ReplicationConfig, conn: &ConnInfo) -> Result<Server, RunError> {
    let mut session = ReplicationClient::connect_gated(config).await?;
    let answer = session.identify_system().await?;
    let tls = match session
        .simple_query("SELECT ssl::text, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .await
    {
        Ok(rows) => {
            let text = |i: usize| {
                rows.first()
                    .and_then(|row| row.get(i))
                    .and_then(|v| v.as_ref())
                    .map(|b| String::from_utf8_lossy(b).into_owned())
            };
            match (text(0).as_deref(), text(1)) {
                (Some("true"), version) => version.unwrap_or_else(|| "TLS".into()),
                _ => "not encrypted".to_owned(),
            }
        }
        Err(_) => "unknown".to_owned(),
    };
    info!(server = %conn.display, session = "replication",
        tls = %format!("{tls} (sslmode={})", conn.tls.mode.as_str()), "PostgreSQL session");
    Ok(Server {
        system_id: answer.system_id,
        timeline: answer.timeline,
    })
}

/// The start-up checks alone (`tidemark-producer --check`): PostgreSQL,
/// the tables, Kafka. Creates nothing.
pub async fn check(config: &Config) -> Result<(), RunError> {
    let conn = ConnInfo::from_config(config)?;
    let sql = conn.connect("tidemark-producer-check").await?;
    check_server(&sql, &conn).await?;
    for table in &config.tables {
        let (schema, name) = table.parts();
        describe_table(&sql, schema, name).await?;
    }
    crate::sink::check_reachable(&config.kafka).await?;
    slot_state(&sql, &config.producer.slot, &conn.database).await?;
    Ok(())
}

/// Runs the producer until `shutdown` turns true or an error stops it.
pub async fn run(
    config: Config,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), RunError> {
    run_with(config, StartOptions::default(), metrics, shutdown).await
}

/// How long the producer waits, at most, before reading again after a
/// change too large for `producer.max_message_bytes` (first 1 s, doubling).
const TOO_LARGE_MAX_WAIT: Duration = Duration::from_secs(300);

/// [`run`], started as `options` say. A change too large to be read
/// (`producer.max_message_bytes`) cannot be skipped, since the stream
/// cannot resume past it: the producer names its table and LSN, says so on
/// `/readyz`, and reads again with backoff (so a raised limit, or a
/// restart with one, resumes), instead of exiting into a restart loop.
pub async fn run_with(
    config: Config,
    options: StartOptions,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), RunError> {
    let mut wait = Duration::from_secs(1);
    let mut options = options;
    let mut reconnecting = false;
    loop {
        let result = run_once(&config, options, &metrics, shutdown.clone()).await;
        let Err(error) = &result else {
            return result;
        };
        let Some(what) = wait_reason(&config, error, reconnecting).await else {
            return result;
        };
        reconnecting = true;
        // A new snapshot, if one was asked for, was taken: do not take it again.
        options.resnapshot = false;
        tracing::error!(%what, retry_in_secs = wait.as_secs(), "cannot stream now; waiting");
        metrics
            .postgres_up
            .store(false, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut blocked) = metrics.blocked.lock() {
            *blocked = Some(what);
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
        }
        wait = (wait * 2).min(TOO_LARGE_MAX_WAIT);
    }
}

async fn run_once(
    config: &Config,
    options: StartOptions,
    metrics: &Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), RunError> {
    let config = config.clone();
    let metrics = metrics.clone();
    let conn = ConnInfo::from_config(&config)?;
    let sql = conn.connect("tidemark-producer").await?;
    conn.log_tls(&sql, "sql").await;
    check_server(&sql, &conn).await?;
    let mut tables = Vec::with_capacity(config.tables.len());
    for table in &config.tables {
        let (schema, name) = table.parts();
        tables.push(describe_table(&sql, schema, name).await?);
    }
    metrics
        .postgres_up
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let names: Vec<(String, String)> = tables
        .iter()
        .map(|t| (t.schema.clone(), t.name.clone()))
        .collect();
    let sink = Arc::new(Sink::connect(&config, &names).await?);
    metrics
        .kafka_up
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let slot = config.producer.slot.clone();
    let state = Arc::new(StateStore::new(
        sink.state_producer().clone(),
        &config.kafka,
        &config.kafka.state_topic(),
    ));
    let mut records = state.load_all().await?;
    let mut recorded = records.remove(&slot);
    let published_before: Vec<String> =
        server::published_tables(&sql, &config.producer.publication)
            .await?
            .into_iter()
            .map(|(schema, name)| format!("{schema}.{name}"))
            .collect();
    if let Some(progress) = &mut recorded {
        let configured: Vec<String> = tables.iter().map(CatalogTable::qualified).collect();
        state
            .keep_published(progress, &configured, &published_before)
            .await?;
    }
    ensure_publication(
        &sql,
        &config.producer.publication,
        &tables,
        config.producer.create_publication,
    )
    .await?;
    let mut existing = released_slot_state(&sql, &slot, &conn.database).await?;
    let server = identify(replication_config(&conn, &config), &conn).await?;
    refuse_claimed_topics(
        &config,
        &sql,
        &tables,
        &server.system_id,
        &conn.database,
        &records,
    )
    .await?;
    let mut gap = None;
    if let Some(progress) = &recorded
        && let Some(what) = history_gap(
            progress,
            existing.is_some(),
            &server.system_id,
            server.timeline,
        )
    {
        let last_confirmed = progress.confirmed_lsn.or(progress.snapshot_lsn);
        if !options.resnapshot {
            return Err(RunError::HistoryGap {
                slot,
                what,
                last_confirmed: last_confirmed
                    .map_or_else(|| "nothing".to_owned(), |l| l.to_string()),
            });
        }
        warn!(slot, last_confirmed = ?last_confirmed, gap = %what,
              "gap in the change history: taking a new snapshot (--resnapshot)");
        if existing.is_some() {
            drop_slot(&sql, &slot).await?;
            existing = None;
        }
        recorded = None;
        gap = Some(HistoryGap {
            what,
            last_confirmed,
            resnapshot_lsn: None,
            at: jiff::Timestamp::now().to_string(),
        });
    } else if options.resnapshot {
        info!(
            slot,
            "--resnapshot given, but the history has no gap: starting as usual"
        );
    }

    if let (Some(_), Some(progress)) = (&existing, &recorded)
        && !progress.snapshot_complete
    {
        warn!(
            slot,
            "the initial snapshot was interrupted; dropping the slot to take it again"
        );
        drop_slot(&sql, &slot).await?;
        existing = None;
    }

    let repl_config = replication_config(&conn, &config);
    let (repl, progress) = match existing {
        Some(slot_now) => {
            let progress = match recorded {
                Some(progress) => {
                    let confirmed = progress
                        .confirmed_lsn
                        .or(progress.snapshot_lsn)
                        .unwrap_or_default();
                    if slot_now.confirmed_flush > confirmed {
                        return Err(RunError::SlotMoved {
                            slot,
                            slot_lsn: slot_now.confirmed_flush,
                            recorded: confirmed,
                        });
                    }
                    progress
                }
                None => {
                    warn!(slot, lsn = %slot_now.confirmed_flush,
                          "slot exists but Tidemark has no record of it: streaming from its position without a snapshot");
                    SlotProgress {
                        slot: slot.clone(),
                        snapshot_complete: true,
                        snapshot_lsn: None,
                        confirmed_lsn: Some(slot_now.confirmed_flush),
                        system_id: None,
                        database: None,
                        timeline: None,
                        gap: None,
                        tables: None,
                        shapes: Default::default(),
                        topic_prefix: None,
                    }
                }
            };
            let mut progress = SlotProgress {
                system_id: Some(server.system_id),
                database: Some(conn.database.clone()),
                timeline: Some(server.timeline),
                topic_prefix: Some(config.kafka.topic_prefix.clone()),
                ..progress
            };
            let added = crate::state::added_tables(&progress, &tables, &published_before);
            if !added.is_empty() {
                if add_first_shapes(&mut progress, &added) {
                    state.save(&progress).await?;
                }
                snapshot::again(
                    &config,
                    &conn,
                    &added,
                    &sink,
                    &metrics,
                    server.timeline,
                    "added to the config since the slot was created",
                )
                .await?;
            }
            let now: Vec<String> = tables.iter().map(CatalogTable::qualified).collect();
            if progress.tables.as_ref() != Some(&now) {
                progress.tables = Some(now);
                state.save(&progress).await?;
            }
            info!(slot, lsn = %slot_now.confirmed_flush, "resuming from the slot");
            let repl = ReplicationClient::connect(repl_config).await?;
            (repl, progress)
        }
        None => {
            if !config.producer.create_slot {
                return Err(SourceError::NoSlot { slot }.into());
            }
            let mut first = SlotProgress {
                slot: slot.clone(),
                snapshot_complete: false,
                snapshot_lsn: None,
                confirmed_lsn: None,
                system_id: Some(server.system_id),
                database: Some(conn.database.clone()),
                timeline: Some(server.timeline),
                gap,
                tables: None,
                shapes: Default::default(),
                topic_prefix: Some(config.kafka.topic_prefix.clone()),
            };
            add_first_shapes(&mut first, &tables);
            create_and_snapshot(&config, &conn, &tables, &sink, &state, &metrics, first).await?
        }
    };

    let mut progress = progress;
    if add_first_shapes(&mut progress, &tables) {
        // Recorded now, not at the next confirmation: a restart before one
        // (a DDL's snapshot interrupted, say) would otherwise take the
        // catalog's new shape as the first and miss the change.
        state.save(&progress).await?;
    }
    let by_oid: HashMap<u32, CatalogTable> = tables.into_iter().map(|t| (t.oid, t)).collect();
    let health = tokio::spawn(watch_health(
        conn.clone(),
        config.kafka.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    let stream = Stream {
        repl,
        sql,
        config: config.clone(),
        conn: conn.clone(),
        sink: sink.clone(),
        state,
        progress,
        metrics: metrics.clone(),
        database: conn.database.clone(),
        tables: by_oid,
        timeline: server.timeline,
    };
    let result = stream.run(shutdown).await;
    health.abort();
    let final_lsn = result?;
    if let Err(error) = sink.flush(Duration::from_secs(30)) {
        warn!(%error, "Kafka flush at shutdown");
    }
    // The replication worker ends without a last status update; make the
    // confirmed position reach the slot.
    advance_slot(&conn, &slot, final_lsn).await;
    Ok(())
}

/// Refuses to start when another slot's record claims one of our topics
/// (`state::claimed_elsewhere`): another database or server under the same
/// topic prefix, or another slot of this database that still exists. A
/// claim by a slot of this database that is gone is stale: warned about.
async fn refuse_claimed_topics(
    config: &Config,
    sql: &Client,
    tables: &[CatalogTable],
    system_id: &str,
    database: &str,
    records: &std::collections::BTreeMap<String, SlotProgress>,
) -> Result<(), RunError> {
    let ours: Vec<String> = tables.iter().map(CatalogTable::qualified).collect();
    let forget = |slot: &str| {
        format!(
            "If that deployment is gone for good, remove its record: tidemark-producer --config \
             <this config> --forget-slot {slot}"
        )
    };
    let claims = crate::state::claimed_elsewhere(
        &config.producer.slot,
        &config.kafka.topic_prefix,
        &ours,
        records.values(),
    );
    for claim in claims {
        if !claim.same_database(system_id, database) {
            return Err(RunError::TopicClaimed {
                whose: format!(
                    "database {} of PostgreSQL system {}",
                    claim.database.as_deref().unwrap_or("unknown"),
                    claim.system_id.as_deref().unwrap_or("unknown")
                ),
                fix: format!(
                    "Topic names carry the schema and table, not the database: give each \
                     deployment its own kafka.topic_prefix (and consumer.group_id). {}",
                    forget(&claim.slot)
                ),
                table: claim.table,
                topic: claim.topic,
                slot: claim.slot,
            });
        }
        let exists = sql
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
                &[&claim.slot],
            )
            .await
            .map_err(|source| SourceError::Query {
                what: "replication slots",
                source,
            })?
            .is_some();
        if exists {
            return Err(RunError::TopicClaimed {
                whose: "of this database".to_owned(),
                fix: format!(
                    "A table belongs to one producer: remove it from one config's [[tables]], or \
                     give this deployment its own kafka.topic_prefix. If slot {0} is an old slot \
                     of this deployment, drop it (SELECT pg_drop_replication_slot('{0}')), then \
                     run tidemark-producer --config <this config> --forget-slot {0}",
                    claim.slot
                ),
                table: claim.table,
                topic: claim.topic,
                slot: claim.slot,
            });
        }
        warn!(table = %claim.table, topic = %claim.topic, slot = %claim.slot,
              "a slot of this database that no longer exists recorded this table's topic: its record \
               is stale (remove it with tidemark-producer --forget-slot)");
    }
    Ok(())
}

/// Deletes another slot's record from the state topic (`--forget-slot`),
/// after saying what it claimed. Refuses this config's own slot, whose
/// record says whether its snapshot finished.
pub async fn forget_slot(config: &Config, slot: &str) -> Result<(), RunError> {
    if slot == config.producer.slot {
        return Err(RunError::Forget(
            slot.to_owned(),
            "this is the config's own producer.slot; its record says whether the snapshot \
             finished and where the stream stands, and is never removed"
                .to_owned(),
        ));
    }
    let producer: rdkafka::producer::FutureProducer = crate::sink::client_config(&config.kafka)
        .set("acks", "all")
        .create()
        .map_err(SinkError::Client)?;
    let state = StateStore::new(producer, &config.kafka, &config.kafka.state_topic());
    let records = state.load_all().await?;
    let Some(record) = records.get(slot) else {
        return Err(RunError::Forget(
            slot.to_owned(),
            format!(
                "the state topic {} has no record of this slot (slots recorded: {})",
                config.kafka.state_topic(),
                records.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        ));
    };
    state.forget(slot).await?;
    info!(slot, database = ?record.database, topic_prefix = ?record.topic_prefix,
          tables = ?record.tables, state_topic = %config.kafka.state_topic(),
          "slot's record removed from the state topic");
    Ok(())
}

/// The slot's state, waiting a little while it is active: after a crash the
/// old session's walsender can hold the slot until it notices the
/// connection is gone.
async fn released_slot_state(
    sql: &Client,
    slot: &str,
    database: &str,
) -> Result<Option<server::SlotState>, SourceError> {
    let deadline = tokio::time::Instant::now() + SLOT_RELEASE_WAIT;
    loop {
        match slot_state(sql, slot, database).await {
            Err(SourceError::SlotActive { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            other => return other,
        }
    }
}

/// The replication session of this producer's slot.
fn replication_config(conn: &ConnInfo, config: &Config) -> ReplicationConfig {
    conn.replication(&Replication::of(config, "tidemark-producer"))
}

/// Records in `progress` the catalog's shape of each of `tables` it lacks
/// (a table's first shape: its snapshot is read in it); whether any was
/// added. Called before a table's first row is sent, so its first streamed
/// change after a DDL is seen as a change, and the consumer types the
/// table's new index from these columns (`tidemark_index::derive`).
fn add_first_shapes(progress: &mut SlotProgress, tables: &[CatalogTable]) -> bool {
    let mut added = false;
    for table in tables {
        progress.shapes.entry(table.qualified()).or_insert_with(|| {
            added = true;
            crate::stream::catalog_shape(table)
        });
    }
    added
}

async fn create_and_snapshot(
    config: &Config,
    conn: &ConnInfo,
    tables: &[CatalogTable],
    sink: &Arc<Sink>,
    state: &StateStore,
    metrics: &Arc<Metrics>,
    mut progress: SlotProgress,
) -> Result<(ReplicationClient, SlotProgress), RunError> {
    let slot = config.producer.slot.clone();
    // Recorded before the slot exists: a crash from here on is recognised.
    state.save(&progress).await?;
    let mut repl = ReplicationClient::connect_gated(replication_config(conn, config)).await?;
    let snapshot_mode = if config.producer.snapshot {
        "export"
    } else {
        "nothing"
    };
    let rows = repl
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT '{snapshot_mode}')",
            quote_ident(&slot)
        ))
        .await?;
    let row = rows.first().ok_or_else(|| RunError::SlotCreation {
        slot: slot.clone(),
        what: "row",
    })?;
    let text = |i: usize| {
        row.get(i)
            .and_then(|v| v.as_ref())
            .map(|b| String::from_utf8_lossy(b).into_owned())
    };
    let consistent_point: Lsn =
        text(1)
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| RunError::SlotCreation {
                slot: slot.clone(),
                what: "consistent point",
            })?;
    info!(slot, lsn = %consistent_point, "created replication slot");
    progress.snapshot_lsn = Some(consistent_point);
    if let Some(gap) = &mut progress.gap {
        gap.resnapshot_lsn = Some(consistent_point);
        warn!(slot, lsn = %consistent_point, last_confirmed = ?gap.last_confirmed,
              "new snapshot over the gap in the history; documents it does not rewrite are older than its LSN");
    }
    if config.producer.snapshot {
        let snapshot_name = text(2).ok_or_else(|| RunError::SlotCreation {
            slot: slot.clone(),
            what: "snapshot name",
        })?;
        let point = Point {
            lsn: consistent_point,
            timeline: progress.timeline.unwrap_or(1),
        };
        snapshot::run(
            conn,
            tables,
            &snapshot_name,
            point,
            config.producer.snapshot_parallelism,
            config.producer.snapshot_fetch_rows,
            sink.clone(),
            metrics.clone(),
        )
        .await?;
        if progress.gap.is_some() {
            send_resnapshot_markers(conn, tables, point, sink).await?;
        }
    }
    progress.snapshot_complete = true;
    progress.confirmed_lsn = Some(consistent_point);
    progress.tables = Some(tables.iter().map(CatalogTable::qualified).collect());
    state.save(&progress).await?;
    repl.start().await?;
    Ok((repl, progress))
}

async fn drop_slot(sql: &Client, slot: &str) -> Result<(), SourceError> {
    sql.execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .map_err(|source| SourceError::Query {
            what: "drop interrupted slot",
            source,
        })?;
    Ok(())
}

/// After a new snapshot over a gap: one `resnapshot` event per table, to
/// every partition after its rows, at the snapshot's version. Consumers
/// remove what is older (the documents of rows deleted during the gap);
/// waits until Kafka acknowledged them.
async fn send_resnapshot_markers(
    conn: &ConnInfo,
    tables: &[CatalogTable],
    point: Point,
    sink: &Arc<Sink>,
) -> Result<(), RunError> {
    let commit_time = tidemark_schemas::commit_time::now();
    for table in tables {
        let event = tidemark_schemas::ChangeEvent {
            format: tidemark_schemas::FORMAT_VERSION,
            source: tidemark_schemas::Source {
                database: conn.database.clone(),
                schema: table.schema.clone(),
                table: table.name.clone(),
            },
            op: tidemark_schemas::Operation::Resnapshot,
            key: tidemark_schemas::Row::new(),
            before: None,
            after: None,
            unchanged_toast: Vec::new(),
            commit_lsn: point.lsn,
            timeline: point.timeline,
            lsn: point.lsn,
            xid: None,
            commit_time: commit_time.clone(),
        };
        sink.send(&event).await?;
        info!(table = %table.qualified(), lsn = %point.lsn,
              "resnapshot marker sent: consumers remove the documents the new snapshot did not rewrite");
    }
    sink.acknowledged(sink.sent()).await?;
    Ok(())
}

/// Moves the slot's confirmed position to `lsn` once the replication
/// session has released it. Best effort: not doing so only means the next
/// start re-sends a little.
async fn advance_slot(conn: &ConnInfo, slot: &str, lsn: Lsn) {
    let Ok(sql) = conn.connect("tidemark-producer-shutdown").await else {
        return;
    };
    for _ in 0..50 {
        let result = sql
            .execute(
                "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)
                 FROM pg_replication_slots WHERE slot_name = $1 AND NOT active
                   AND confirmed_flush_lsn < $2::text::pg_lsn",
                &[&slot, &lsn.to_string()],
            )
            .await;
        match result {
            Ok(_) => {
                let active: Option<bool> = sql
                    .query_opt(
                        "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                        &[&slot],
                    )
                    .await
                    .ok()
                    .flatten()
                    .map(|r| r.get(0));
                if active != Some(true) {
                    return;
                }
            }
            Err(error) => {
                warn!(slot, %lsn, %error, "could not confirm the final position");
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Keeps the dependency flags behind `/readyz` current.
async fn watch_health(
    conn: ConnInfo,
    kafka: tidemark_schemas::config::Kafka,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    use std::sync::atomic::Ordering;
    let mut sql: Option<Client> = None;
    loop {
        if sql.as_ref().is_none_or(|c| c.is_closed()) {
            sql = conn.connect("tidemark-producer-health").await.ok();
        }
        let pg_ok = match &sql {
            Some(client) => client.simple_query("SELECT 1").await.is_ok(),
            None => false,
        };
        metrics.postgres_up.store(pg_ok, Ordering::Relaxed);
        let kafka = kafka.clone();
        let kafka_ok = tokio::task::spawn_blocking(move || {
            use rdkafka::consumer::{BaseConsumer, Consumer};
            let consumer: Result<BaseConsumer, _> = crate::sink::client_config(&kafka).create();
            consumer
                .map(|c| c.fetch_metadata(None, Duration::from_secs(5)).is_ok())
                .unwrap_or(false)
        })
        .await
        .unwrap_or(false);
        metrics.kafka_up.store(kafka_ok, Ordering::Relaxed);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = shutdown.changed() => return,
        }
    }
}
