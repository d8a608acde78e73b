//! The initial snapshot: every row of every captured table, read at exactly
//! the point where the new slot's stream begins.
//!
//! Consistency: the slot is created with `EXPORT_SNAPSHOT`; each table is
//! read in a REPEATABLE READ transaction that imports that snapshot, so the
//! snapshot holds exactly the changes committed before the slot's consistent
//! point and the stream holds exactly those after it: nothing missed,
//! nothing twice. Snapshot rows carry the consistent point as their commit
//! LSN (their document version), which is lower than any streamed change's.
//!
//! Ordering: every snapshot row is acknowledged by Kafka before streaming
//! starts, so a key's snapshot record always precedes its streamed ones.
//!
//! Tables added to the config after the slot was created (at the next
//! start) and tables whose shape changed (at their next change) get the
//! same ([`again`]), at a snapshot of their own taken before the stream
//! goes on.
//!
//! Columns: each table is read with the column list its own transaction
//! sees (`tidemark_postgres::read_columns`), so a DDL that commits around
//! the snapshot can neither fail the read nor leave a new column out.
//!
//! Memory: a cursor fetches `producer.snapshot_fetch_rows` rows at a time,
//! and at most `MAX_PENDING` records (of all tables) are left unacknowledged
//! before the next fetch, whatever the table's size. Tables run in parallel up to `producer.snapshot_parallelism`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tidemark_schemas::config::Config;
use tidemark_schemas::{ChangeEvent, FORMAT_VERSION, Operation, Source};
use tokio::sync::Semaphore;
use tokio_postgres::SimpleQueryMessage;
use tracing::{info, warn};

use crate::changes::ChangeError;
use crate::metrics::Metrics;
use crate::sink::{Sink, SinkError};
use tidemark_postgres::values::Mapping;
use tidemark_postgres::{
    CatalogTable, ConnInfo, SourceError, TypeResolver, quote_ident, read_columns,
};
use tidemark_postgres::{Point, row_values};

/// Records in flight before a snapshot waits for Kafka to catch up.
const MAX_PENDING: u64 = 10_000;
/// How often a long table snapshot logs its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot of {table}: {source}")]
    Source {
        table: String,
        #[source]
        source: SourceError,
    },
    #[error("snapshot of {table}: PostgreSQL failed: {}", tidemark_postgres::pg_text(.source))]
    Query {
        table: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("snapshot of {table}: {source}")]
    Sink {
        table: String,
        #[source]
        source: SinkError,
    },
    #[error("snapshot task failed: {0}")]
    Task(String),
    #[error("snapshot of tables while the slot exists: {0}")]
    Export(#[from] tidemark_postgres::ExportError),
}

impl SnapshotError {
    /// Whether PostgreSQL went away under the snapshot (its connection
    /// lost, the server shutting down or not yet accepting connections):
    /// an outage to wait out, after which the snapshot is taken again.
    pub fn is_outage(&self) -> bool {
        match self {
            SnapshotError::Export(tidemark_postgres::ExportError::Replication(e)) => {
                e.is_transient()
            }
            SnapshotError::Query { source, .. }
            | SnapshotError::Source {
                source: SourceError::Query { source, .. },
                ..
            } => tidemark_postgres::connection_lost(source),
            SnapshotError::Source {
                source: SourceError::Connect { .. },
                ..
            } => true,
            _ => false,
        }
    }
}

/// What a finished snapshot read.
#[derive(Debug, Default, Clone, Copy)]
pub struct SnapshotStats {
    pub rows: u64,
    pub dead_letters: u64,
}

/// Reads every table at `snapshot_name` and sends its rows to Kafka.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    conn: &ConnInfo,
    tables: &[CatalogTable],
    snapshot_name: &str,
    point: Point,
    parallelism: usize,
    fetch_rows: usize,
    sink: Arc<Sink>,
    metrics: Arc<Metrics>,
) -> Result<SnapshotStats, SnapshotError> {
    let started = Instant::now();
    let commit_time = tidemark_schemas::commit_time::now();
    let permits = Arc::new(Semaphore::new(parallelism));
    let mut tasks = tokio::task::JoinSet::new();
    for table in tables {
        let table = table.clone();
        let conn = conn.clone();
        let snapshot_name = snapshot_name.to_owned();
        let commit_time = commit_time.clone();
        let sink = sink.clone();
        let metrics = metrics.clone();
        let permits = permits.clone();
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await;
            snapshot_table(
                &conn,
                &table,
                &snapshot_name,
                point,
                &commit_time,
                fetch_rows,
                &sink,
                &metrics,
            )
            .await
        });
    }
    let mut total = SnapshotStats::default();
    while let Some(joined) = tasks.join_next().await {
        let stats = joined.map_err(|e| SnapshotError::Task(e.to_string()))??;
        total.rows += stats.rows;
        total.dead_letters += stats.dead_letters;
    }
    info!(rows = total.rows, dead_letters = total.dead_letters, lsn = %point.lsn,
          seconds = started.elapsed().as_secs_f64(), "initial snapshot complete");
    Ok(total)
}

#[allow(clippy::too_many_arguments)]
async fn snapshot_table(
    conn: &ConnInfo,
    table: &CatalogTable,
    snapshot_name: &str,
    point: Point,
    commit_time: &str,
    fetch_rows: usize,
    sink: &Sink,
    metrics: &Metrics,
) -> Result<SnapshotStats, SnapshotError> {
    let name = table.qualified();
    let source_err = |source| SnapshotError::Source {
        table: name.clone(),
        source,
    };
    let query_err = |source| SnapshotError::Query {
        table: name.clone(),
        source,
    };
    let sink_err = |source| SnapshotError::Sink {
        table: name.clone(),
        source,
    };
    let client = conn
        .connect("tidemark-snapshot")
        .await
        .map_err(source_err)?;
    let snapshot_literal = snapshot_name.replace('\'', "''");
    client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY;
             SET TRANSACTION SNAPSHOT '{snapshot_literal}'"
        ))
        .await
        .map_err(query_err)?;
    // The columns as this transaction reads them (`read_columns` says why
    // not the ones `table` was described with), locked from here on.
    let table = &CatalogTable {
        columns: read_columns(&client, table).await.map_err(source_err)?,
        ..table.clone()
    };
    if let Some(gone) = table
        .key
        .iter()
        .find(|k| !table.columns.iter().any(|(c, _)| c == *k))
    {
        warn!(table = %name, column = %gone, "a key column is gone from the table");
        return Err(source_err(SourceError::NoKey(name.clone())));
    }
    let mut types = TypeResolver::default();
    let mut mappings: Vec<Mapping> = Vec::with_capacity(table.columns.len());
    for (_, oid) in &table.columns {
        mappings.push(types.mapping(&client, *oid).await.map_err(source_err)?);
    }
    let columns = table
        .columns
        .iter()
        .map(|(c, _)| quote_ident(c))
        .collect::<Vec<_>>()
        .join(", ");
    client
        .batch_execute(&format!(
            "DECLARE tidemark_snapshot NO SCROLL CURSOR FOR SELECT {columns} FROM {}.{}",
            quote_ident(&table.schema),
            quote_ident(&table.name)
        ))
        .await
        .map_err(query_err)?;
    info!(table = %name, lsn = %point.lsn, "snapshot of table started");

    let source = Source {
        database: conn.database.clone(),
        schema: table.schema.clone(),
        table: table.name.clone(),
    };
    let key_index: Vec<usize> = table
        .key
        .iter()
        .filter_map(|k| table.columns.iter().position(|(c, _)| c == k))
        .collect();
    let fetch = format!("FETCH {fetch_rows} FROM tidemark_snapshot");
    let mut stats = SnapshotStats::default();
    let mut last_log = Instant::now();
    loop {
        let messages = client.simple_query(&fetch).await.map_err(query_err)?;
        let mut fetched = 0usize;
        for message in messages {
            let SimpleQueryMessage::Row(row) = message else {
                continue;
            };
            fetched += 1;
            match snapshot_event(
                &source,
                table,
                &mappings,
                &key_index,
                &row,
                point,
                commit_time,
            ) {
                Ok(event) => {
                    metrics.event(&source, Operation::Snapshot);
                    sink.send(&event).await.map_err(sink_err)?;
                }
                Err(error) => {
                    stats.dead_letters += 1;
                    metrics.dead_letter();
                    warn!(table = %name, lsn = %point.lsn, %error, "snapshot row sent to the dead-letter topic");
                    let reason = error.to_string();
                    sink.dead_letter(None, Some(&name), &reason, point.lsn)
                        .await
                        .map_err(sink_err)?;
                }
            }
            stats.rows += 1;
        }
        let behind = sink.sent().saturating_sub(MAX_PENDING);
        sink.acknowledged(behind).await.map_err(sink_err)?;
        if last_log.elapsed() >= PROGRESS_EVERY {
            info!(table = %name, rows = stats.rows, "snapshot progress");
            last_log = Instant::now();
        }
        if fetched < fetch_rows {
            break;
        }
    }
    // Every record of this table (and any sent before) acknowledged.
    sink.acknowledged(sink.sent()).await.map_err(sink_err)?;
    client.batch_execute("COMMIT").await.map_err(query_err)?;
    info!(table = %name, rows = stats.rows, "snapshot of table complete");
    Ok(stats)
}

fn snapshot_event(
    source: &Source,
    table: &CatalogTable,
    mappings: &[Mapping],
    key_index: &[usize],
    row: &tokio_postgres::SimpleQueryRow,
    point: Point,
    commit_time: &str,
) -> Result<ChangeEvent, ChangeError> {
    let (key, after) = row_values(table, mappings, key_index, row)?;
    Ok(ChangeEvent {
        format: FORMAT_VERSION,
        source: source.clone(),
        op: Operation::Snapshot,
        key,
        before: None,
        after: Some(after),
        unchanged_toast: Vec::new(),
        commit_lsn: point.lsn,
        timeline: point.timeline,
        lsn: point.lsn,
        xid: None,
        commit_time: commit_time.to_owned(),
    })
}

/// Tables whose rows must be sent again while the slot exists: added to
/// the config after the slot was created (not in the state record's
/// `tables`, at start), or whose shape changed (`why` says which, for the
/// log). Their rows, read at a snapshot a temporary slot exports at `S`, go
/// to Kafka as snapshot events at version `S` before the stream goes on.
/// So in each partition every change above `S` follows the snapshot event
/// of its key (a later delete can never be overtaken by an older row), and
/// a change at or below `S` streamed after it loses to it by version. The
/// slot keeps the WAL meanwhile, as during the initial snapshot.
pub async fn again(
    config: &Config,
    conn: &ConnInfo,
    tables: &[CatalogTable],
    sink: &Arc<Sink>,
    metrics: &Arc<Metrics>,
    timeline: u32,
    why: &str,
) -> Result<(), SnapshotError> {
    let names: Vec<String> = tables.iter().map(CatalogTable::qualified).collect();
    if !config.producer.snapshot {
        warn!(tables = ?names, why, "producer.snapshot is off, so these rows are not sent again (tidemark-replay backfill writes them into the index)");
        return Ok(());
    }
    // A name of its own each time: the temporary slot of the previous
    // snapshot is dropped when its session ends, which the server may not
    // have finished when the next change of shape comes.
    static TAKEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = TAKEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let slot = format!("{}_again_{}_{n}", config.producer.slot, std::process::id());
    let snapshot = tidemark_postgres::export_snapshot(
        conn,
        &tidemark_postgres::Replication::of(config, "tidemark-producer"),
        &slot,
    )
    .await?;
    let point = Point {
        lsn: snapshot.lsn,
        timeline,
    };
    info!(tables = ?names, lsn = %point.lsn, why, "snapshotting these tables' rows before the stream goes on");
    let stats = run(
        conn,
        tables,
        &snapshot.name,
        point,
        config.producer.snapshot_parallelism,
        config.producer.snapshot_fetch_rows,
        sink.clone(),
        metrics.clone(),
    )
    .await?;
    drop(snapshot);
    info!(tables = ?names, lsn = %point.lsn, ?stats, why, "tables snapshotted again");
    Ok(())
}
