//! Streaming: the replication stream into Kafka, confirming LSNs only after
//! Kafka acknowledged everything before them.
//!
//! Contract:
//! - Delivery is at least once. The reader hands every change to Kafka as it
//!   arrives (memory does not grow with transaction size) and queues, in
//!   stream order, each safe position (a commit's end, or a keepalive's WAL
//!   end between transactions) with the number of records sent before it.
//!   A position becomes confirmable only when Kafka acknowledged all of
//!   those records (`Sink::acked`, an unbroken prefix).
//! - Progress moves at most every [`CONFIRM_INTERVAL`]: the acker first
//!   records the position in the state topic, then the reader reports it to
//!   PostgreSQL as flushed. A crash anywhere re-reads from the last
//!   confirmed position: duplicates, never gaps.
//! - An idle captured table set still advances the slot, through keepalive
//!   positions, so WAL written elsewhere in the database does not pile up.
//! - Changes of tables not in `[[tables]]` are skipped, keyless ones too: a
//!   publication may cover more than this pipeline captures (`FOR ALL
//!   TABLES`, or one shared with another pipeline). They are counted in
//!   `tidemark_producer_skipped_total`, never sent, never fatal.
//! - A table's shape (column names and types) is compared at each of its
//!   Relation messages with the last one kept in the state record: a
//!   difference is a schema change, met as the table's `on_schema_change`
//!   says (`backfill`: the table sent again at a new snapshot before the
//!   stream goes on, see `snapshot::again`). The new shape is recorded with
//!   the next confirmed position, so a crash before that meets it again.
//! - A change that cannot be decoded or mapped goes to the dead-letter topic
//!   (table, LSN, reason) and the stream goes on. A Kafka delivery failure is
//!   fatal: nothing after it is confirmed, and the restart re-sends it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use pgwire_replication::{ReplicationClient, ReplicationEvent};
use tidemark_schemas::Lsn;
use tokio::sync::{mpsc, watch};
use tokio_postgres::Client;
use tracing::{debug, info, warn};

use crate::changes::{Changes, PG_EPOCH_UNIX_MICROS};
use crate::metrics::Metrics;
use crate::pgoutput::{self, Message};
use crate::sink::{Sink, SinkError};
use crate::snapshot;
use crate::state::{SlotProgress, StateStore};
use tidemark_postgres::{CatalogTable, SourceError, TypeResolver, describe_table};
use tidemark_schemas::config::OnSchemaChange;

/// How often confirmed progress is recorded and reported to PostgreSQL.
/// Each confirmation costs one acknowledged write to the state topic.
pub const CONFIRM_INTERVAL: Duration = Duration::from_secs(1);
/// Positions queued between reader and acker. A full queue makes the reader
/// wait (backpressure to PostgreSQL); librdkafka's own queue bounds the
/// records in flight.
const ACK_QUEUE: usize = 16_384;

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("replication stream failed: {0}")]
    Replication(#[from] pgwire_replication::PgWireError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("acknowledgement task failed: {0}")]
    Task(String),
    /// A table sent again after its shape changed could not be read.
    #[error(transparent)]
    Snapshot(Box<crate::snapshot::SnapshotError>),
    #[error(
        "table {table}: its key changed from ({old}) to ({new}); documents are named by the key, so \
         the index would keep every old document beside a new one. Rebuild its index: stop the \
         pipeline, delete the index, and start the producer with --resnapshot"
    )]
    KeyChanged {
        table: String,
        old: String,
        new: String,
    },
    #[error(
        "table {table}: its shape changed (a column added, dropped, renamed or retyped) and its \
         on_schema_change is \"stop\". Check its mapping takes the new shape, then set \
         on_schema_change = \"backfill\" (every row sent again) or \"ignore\" and restart"
    )]
    SchemaChanged { table: String },
}

/// Confirmable up to `lsn` once records `0..sent` are acknowledged.
#[derive(Debug, Clone)]
struct Position {
    lsn: Lsn,
    sent: u64,
    commit_unix_micros: Option<i64>,
    /// Table shapes to record once this position is confirmed (everything
    /// before it, a snapshot sent for a schema change included, is in
    /// Kafka): a crash before that sees the change again.
    shapes: Vec<(String, String)>,
}

/// Everything the stream needs from the rest of the producer.
pub struct Stream {
    pub repl: ReplicationClient,
    pub sql: Client,
    pub config: tidemark_schemas::config::Config,
    pub conn: tidemark_postgres::ConnInfo,
    pub sink: Arc<Sink>,
    pub state: Arc<StateStore>,
    pub progress: SlotProgress,
    pub metrics: Arc<Metrics>,
    pub database: String,
    /// Captured tables by relation OID, as described at start-up.
    pub tables: HashMap<u32, CatalogTable>,
    /// The server's timeline (a promotion ends the stream, so it holds for
    /// the whole stream).
    pub timeline: u32,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("slot", &self.progress.slot)
            .finish()
    }
}

impl Stream {
    /// Runs until `shutdown` fires or an error ends the stream. On shutdown,
    /// waits for Kafka to acknowledge everything read and confirms it.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> Result<Lsn, StreamError> {
        let Stream {
            mut repl,
            sql,
            config,
            conn,
            sink,
            state,
            progress,
            metrics,
            database,
            mut tables,
            timeline,
        } = self;
        let mut shapes = progress.shapes.clone();
        let mut new_shapes: Vec<(String, String)> = Vec::new();
        let (steps, step_rx) = mpsc::channel::<Position>(ACK_QUEUE);
        let (confirm_tx, mut confirm_rx) =
            watch::channel(progress.confirmed_lsn.unwrap_or_default());
        let acker = tokio::spawn(acknowledge(
            step_rx,
            sink.clone(),
            state,
            progress,
            confirm_tx,
            metrics.clone(),
        ));

        let mut changes = Changes::new(database, timeline);
        // What this pipeline captures, by name (a captured table dropped
        // and created again comes back under a new OID), and the OIDs of
        // published relations it does not capture.
        let captured: HashSet<(String, String)> = tables
            .values()
            .map(|t| (t.schema.clone(), t.name.clone()))
            .collect();
        let mut skipped: HashSet<u32> = HashSet::new();
        let mut past_block = false;
        let mut types = TypeResolver::default();
        let mut in_transaction = false;
        let mut last_position = Lsn::INVALID;
        let mut commit_unix_micros = 0i64;
        metrics.streaming.store(true, Ordering::Relaxed);
        let result: Result<(), StreamError> = async {
            loop {
                let event = tokio::select! {
                    biased;
                    _ = shutdown.changed() => {
                        info!("shutdown requested: stop reading, flush, confirm");
                        return Ok(());
                    }
                    Ok(()) = confirm_rx.changed() => {
                        let lsn = *confirm_rx.borrow_and_update();
                        repl.update_applied_lsn(pgwire_replication::Lsn(lsn.0));
                        continue;
                    }
                    event = repl.recv() => event?,
                };
                let Some(event) = event else {
                    return Ok(());
                };
                match event {
                    ReplicationEvent::Begin { final_lsn, xid, commit_time_micros } => {
                        changes.begin(xid, Lsn(final_lsn.0), commit_time_micros);
                        commit_unix_micros = commit_time_micros.saturating_add(PG_EPOCH_UNIX_MICROS);
                        in_transaction = true;
                    }
                    ReplicationEvent::Commit { end_lsn, .. } => {
                        if !past_block {
                            // Read past what had blocked the stream, if anything.
                            past_block = true;
                            if let Ok(mut blocked) = metrics.blocked.lock() {
                                blocked.take();
                            }
                        }
                        changes.commit();
                        in_transaction = false;
                        last_position = Lsn(end_lsn.0);
                        let step = Position { lsn: last_position, sent: sink.sent(), commit_unix_micros: Some(commit_unix_micros), shapes: std::mem::take(&mut new_shapes) };
                        send(&steps, step).await?;
                    }
                    ReplicationEvent::KeepAlive { wal_end, .. } => {
                        if !past_block {
                            // Streaming again after an outage.
                            past_block = true;
                            if let Ok(mut blocked) = metrics.blocked.lock() {
                                blocked.take();
                            }
                        }
                        let wal_end = Lsn(wal_end.0);
                        metrics.server_wal_end(wal_end);
                        if !in_transaction && wal_end > last_position {
                            last_position = wal_end;
                            send(&steps, Position { lsn: wal_end, sent: sink.sent(), commit_unix_micros: None, shapes: Vec::new() }).await?;
                        }
                    }
                    ReplicationEvent::XLogData { wal_start, wal_end, data, .. } => {
                        metrics.server_wal_end(Lsn(wal_end.0));
                        let lsn = Lsn(wal_start.0);
                        let message = match pgoutput::decode(&data) {
                            Ok(message) => message,
                            Err(error) => {
                                warn!(%lsn, %error, "undecodable pgoutput message sent to the dead-letter topic");
                                metrics.dead_letter();
                                sink.dead_letter(None, None, &error.to_string(), lsn).await?;
                                continue;
                            }
                        };
                        if let Message::Relation(relation) = &message
                            && !captured.contains(&(relation.namespace.clone(), relation.name.clone()))
                        {
                            if skipped.insert(relation.oid) {
                                info!(table = %format!("{}.{}", relation.namespace, relation.name), oid = relation.oid,
                                      "published table not in [[tables]]: its changes are skipped");
                            }
                            continue;
                        }
                        let message = match skip_uncaptured(message, &skipped) {
                            Some(message) => message,
                            None => {
                                metrics.skipped();
                                continue;
                            }
                        };
                        if let Message::Relation(relation) = &message {
                            let mut mappings = Vec::with_capacity(relation.columns.len());
                            for column in &relation.columns {
                                mappings.push(types.mapping(&sql, column.type_oid).await?);
                            }
                            let key = match tables.get(&relation.oid) {
                                Some(table) => table.key.clone(),
                                None => {
                                    // A captured table re-created under a new OID.
                                    let table = describe_table(&sql, &relation.namespace, &relation.name).await?;
                                    let key = table.key.clone();
                                    tables.insert(relation.oid, table);
                                    key
                                }
                            };
                            let qualified = format!("{}.{}", relation.namespace, relation.name);
                            let shape = shape_of(relation);
                            match shapes.get(&qualified) {
                                Some(old) if *old == shape => {}
                                Some(old) => {
                                    metrics.schema_change(&qualified);
                                    let table = describe_table(&sql, &relation.namespace, &relation.name).await?;
                                    let entry = config.tables.iter().find(|t| t.table == qualified);
                                    let on_change = entry.map(|t| t.on_schema_change).unwrap_or_default();
                                    schema_changed(&qualified, (old, &shape), (&key, &table.key), on_change)?;
                                    tables.insert(relation.oid, table.clone());
                                    if on_change == OnSchemaChange::Backfill {
                                        snapshot::again(&config, &conn, &[table], &sink, &metrics, timeline, "its shape changed")
                                            .await
                                            .map_err(|e| StreamError::Snapshot(Box::new(e)))?;
                                    }
                                    shapes.insert(qualified.clone(), shape.clone());
                                    new_shapes.push((qualified, shape));
                                }
                                None => {
                                    shapes.insert(qualified.clone(), shape.clone());
                                    new_shapes.push((qualified, shape));
                                }
                            }
                            if let Err(error) = changes.register(relation, mappings, &key) {
                                warn!(%lsn, %error, "relation cannot be captured");
                            }
                            debug!(table = %format!("{}.{}", relation.namespace, relation.name), oid = relation.oid, "relation");
                            continue;
                        }
                        match changes.events(&message, lsn) {
                            Ok(events) => {
                                for event in events {
                                    metrics.event(&event.source, event.op);
                                    sink.send(&event).await?;
                                }
                            }
                            Err(error) => {
                                let table = relation_name(&changes, &message);
                                warn!(%lsn, table = table.as_deref().unwrap_or("?"), %error,
                                      "change sent to the dead-letter topic");
                                metrics.dead_letter();
                                sink.dead_letter(None, table.as_deref(), &error.to_string(), lsn).await?;
                            }
                        }
                    }
                    ReplicationEvent::Message { .. } => {}
                    ReplicationEvent::StoppedAt { .. } => return Ok(()),
                }
            }
        }
        .await;
        metrics.streaming.store(false, Ordering::Relaxed);

        // Let the acker drain: every queued delivery acknowledged, the last
        // position recorded and confirmed.
        drop(steps);
        let acked = acker.await.map_err(|e| StreamError::Task(e.to_string()))?;
        let final_lsn = match acked {
            Ok(lsn) => lsn,
            // The acker's error is the cause (a failed delivery); the
            // reader then only saw its queue close.
            Err(error) => {
                if let Err(reader) = &result {
                    debug!(%reader, "reader stopped after the delivery failure");
                }
                return Err(error.into());
            }
        };
        repl.update_applied_lsn(pgwire_replication::Lsn(final_lsn.0));
        // Gives the worker time to send the last standby status.
        let _ = repl.shutdown().await;
        result?;
        info!(lsn = %final_lsn, "stream stopped; confirmed");
        Ok(final_lsn)
    }
}

async fn send(steps: &mpsc::Sender<Position>, step: Position) -> Result<(), StreamError> {
    steps
        .send(step)
        .await
        .map_err(|_| StreamError::Task("acknowledgement task ended".into()))
}

/// The message without the relations this pipeline does not capture;
/// `None` when nothing of it is captured.
fn skip_uncaptured(message: Message, skipped: &HashSet<u32>) -> Option<Message> {
    match message {
        Message::Insert { relation, .. }
        | Message::Update { relation, .. }
        | Message::Delete { relation, .. }
            if skipped.contains(&relation) =>
        {
            None
        }
        Message::Truncate {
            relations,
            cascade,
            restart_identity,
        } => {
            let relations: Vec<u32> = relations
                .into_iter()
                .filter(|oid| !skipped.contains(oid))
                .collect();
            (!relations.is_empty()).then_some(Message::Truncate {
                relations,
                cascade,
                restart_identity,
            })
        }
        other => Some(other),
    }
}

// A table's shape: each column's name and type, in order
// (`tidemark_schemas::state::shape_text`). From a Relation message
// (`shape_of`) or the catalog (`catalog_shape`), the same text for the
// same table.
use tidemark_schemas::state::shape_text as shape;

fn shape_of(relation: &pgoutput::Relation) -> String {
    shape(
        relation
            .columns
            .iter()
            .map(|c| (c.name.as_str(), c.type_oid)),
    )
}

/// The shape the catalog gives: the first one kept for a table (the
/// snapshot was read in it), so its first streamed change after a DDL is
/// seen as a change.
pub fn catalog_shape(table: &CatalogTable) -> String {
    shape(
        table
            .columns
            .iter()
            .map(|(name, oid)| (name.as_str(), *oid)),
    )
}

/// The rule for a table whose shape changed (`old` to `new`, its key from
/// `old_key` to `new_key`): logged, and an error when the producer must
/// stop (the key changed: documents are named by it; or `on_schema_change
/// = "stop"`).
fn schema_changed(
    table: &str,
    (old, new): (&str, &str),
    (old_key, new_key): (&[String], &[String]),
    on_change: OnSchemaChange,
) -> Result<(), StreamError> {
    if old_key != new_key {
        return Err(StreamError::KeyChanged {
            table: table.to_owned(),
            old: old_key.join(", "),
            new: new_key.join(", "),
        });
    }
    warn!(table, from = old, to = new, on_schema_change = ?on_change, "schema change: the table's shape differs from the last one seen");
    if on_change == OnSchemaChange::Stop {
        return Err(StreamError::SchemaChanged {
            table: table.to_owned(),
        });
    }
    Ok(())
}

fn relation_name(changes: &Changes, message: &Message) -> Option<String> {
    let oid = match message {
        Message::Insert { relation, .. }
        | Message::Update { relation, .. }
        | Message::Delete { relation, .. } => *relation,
        Message::Truncate { relations, .. } => *relations.first()?,
        _ => return None,
    };
    changes.table(oid).map(|t| t.source.qualified())
}

/// Confirms positions, in stream order, once Kafka acknowledged every record
/// sent before them.
async fn acknowledge(
    mut steps: mpsc::Receiver<Position>,
    sink: Arc<Sink>,
    state: Arc<StateStore>,
    mut progress: SlotProgress,
    confirm: watch::Sender<Lsn>,
    metrics: Arc<Metrics>,
) -> Result<Lsn, SinkError> {
    let mut confirmed = progress.confirmed_lsn.unwrap_or_default();
    // Positions not yet confirmable, oldest first. Positions with the same
    // `sent` are confirmable together, so only the newest is kept: the
    // queue never holds more entries than records in flight, plus one.
    let mut waiting: VecDeque<Position> = VecDeque::new();
    let mut tick = tokio::time::interval(CONFIRM_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut open = true;
    while open {
        // Confirm when the tick fires (at most once per interval) or at the
        // end. Between ticks the acker only files positions: no per-record
        // work and no wake-up per delivery.
        tokio::select! {
            step = steps.recv() => match step {
                Some(position) => {
                    match waiting.back_mut() {
                        Some(last) if last.sent == position.sent => {
                            last.lsn = position.lsn;
                            last.commit_unix_micros = position.commit_unix_micros.or(last.commit_unix_micros);
                            last.shapes.extend(position.shapes);
                        }
                        _ => waiting.push_back(position),
                    }
                    continue;
                }
                None => open = false,
            },
            _ = tick.tick() => {}
        }
        if !open && let Some(last) = waiting.back() {
            // Shutdown: wait for everything the last position covers.
            if let Err(error) = sink.acknowledged(last.sent).await {
                metrics.delivery_error();
                return Err(error);
            }
        }
        if let Some(error) = sink.failure() {
            metrics.delivery_error();
            return Err(error);
        }
        let acked = sink.acked();
        let mut safe = confirmed;
        while let Some(position) = waiting.front()
            && position.sent <= acked
        {
            safe = safe.max(position.lsn);
            if let Some(micros) = position.commit_unix_micros {
                metrics.committed_at(micros);
            }
            if let Some(position) = waiting.pop_front() {
                progress.shapes.extend(position.shapes);
            }
        }
        if safe > confirmed {
            progress.confirmed_lsn = Some(safe);
            state.save(&progress).await?;
            confirmed = safe;
            metrics.confirmed(safe);
            let _ = confirm.send(safe);
            debug!(lsn = %safe, "confirmed");
        }
    }
    Ok(confirmed)
}
