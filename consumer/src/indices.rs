//! The tables' indices, and when each is created: the consumer's one place
//! for that.
//!
//! Promises:
//! - A new index is typed from its table's columns (name and PostgreSQL
//!   type, as the producer recorded them in the state topic before the
//!   table's first row; `tidemark_index::derive`), so OpenSearch never
//!   guesses a field's type from the first document it sees. The consumer
//!   needs no PostgreSQL credentials for it.
//! - An index is created at start when its columns are known (or nothing
//!   is derived: `mapping.derive = false`), else at its table's first
//!   change, whose columns the producer recorded before sending it. A
//!   table whose columns are still unknown then (events written by
//!   something other than the producer) gets OpenSearch's dynamic mapping,
//!   as before, with a warning.
//! - Creating an index waits out OpenSearch or Kafka being down, as writing
//!   does; a refusal (a bad `mappings_file`, a field type OpenSearch does
//!   not know) stops the consumer with the table named.
//! - Every index the consumer writes is claimed with this pipeline's stamp
//!   (`tidemark_index::identity`) before its first write; the stamp and the
//!   columns come from one read of the producer's record
//!   ([`pipeline_identity`]).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use tidemark_index::mapping::{Mappings, TableMapping, Write};
use tidemark_index::search::{Search, new_index_mappings};
use tidemark_schemas::config::{Config, Table};
use tidemark_schemas::identity::Identity;
use tidemark_schemas::state::{SlotProgress, shape_columns};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::error::ConsumerError;

const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);

/// The configured tables' mappings, and the indices still to be created.
#[derive(Debug)]
pub struct Tables {
    pub mappings: Mappings,
    config: Config,
    config_dir: PathBuf,
    identity: Identity,
    /// Indices (by name) created at their table's first change.
    pending: Mutex<BTreeSet<String>>,
}

/// A table's columns (name, type OID) as `progress` records them.
pub fn recorded_columns(
    progress: Option<&SlotProgress>,
    table: &TableMapping,
) -> Option<Vec<(String, u32)>> {
    progress?
        .shapes
        .get(&table.qualified())
        .and_then(|shape| shape_columns(shape))
}

/// The producer's latest record for this deployment's slot, read under the
/// consumer group's name (which its ACLs already cover). Blocks.
pub fn read_progress(config: &Config) -> Result<Option<SlotProgress>, ConsumerError> {
    let group = format!("{}.identity", config.consumer.group_id);
    tidemark_kafka::recorded_progress(
        &config.kafka,
        "tidemark-consumer",
        &group,
        &config.producer.slot,
        KAFKA_TIMEOUT,
    )
    .map_err(ConsumerError::kafka(format!(
        "reading the producer's record from the state topic {}",
        config.kafka.state_topic()
    )))
}

/// This pipeline's identity as the consumer can know it: Kafka's cluster
/// id and the topic prefix, and the PostgreSQL system and database the
/// producer recorded for `producer.slot` in the state topic (unknown until
/// the producer first ran: the indices' stamps are then completed at the
/// next start).
pub(crate) async fn pipeline_identity(
    config: &Config,
) -> Result<(tidemark_schemas::identity::Identity, Option<SlotProgress>), ConsumerError> {
    let owned = config.clone();
    let (cluster, progress) = tokio::task::spawn_blocking(move || {
        let cluster = tidemark_kafka::cluster_id(&owned.kafka, "tidemark-consumer", KAFKA_TIMEOUT)
            .map_err(ConsumerError::kafka(
                "reading this pipeline's identity from Kafka (cluster id)",
            ))?;
        Ok::<_, ConsumerError>((cluster, read_progress(&owned)?))
    })
    .await
    .map_err(|e| ConsumerError::Task(format!("reading this pipeline's identity: {e}")))??;
    let (postgres_system, database) = match &progress {
        Some(p) => (p.system_id.clone(), p.database.clone()),
        None => (None, None),
    };
    if postgres_system.is_none() {
        warn!(slot = %config.producer.slot, state_topic = %config.kafka.state_topic(),
            "the producer has not recorded which PostgreSQL feeds this pipeline yet: indices are \
             stamped without it, and the next start completes their stamps");
    }
    let identity = tidemark_schemas::identity::Identity {
        postgres_system,
        database,
        kafka_cluster: cluster,
        topic_prefix: config.kafka.topic_prefix.clone(),
    };
    Ok((identity, progress))
}

impl Tables {
    /// Creates each missing index whose columns `progress` records (or that
    /// derives nothing), claims every existing one, and leaves the others
    /// for their table's first change.
    pub async fn prepare(
        search: &Search,
        config: &Config,
        config_dir: &Path,
        identity: Identity,
        progress: Option<&SlotProgress>,
    ) -> Result<Tables, ConsumerError> {
        let mappings = Mappings::new(config);
        let mut pending = BTreeSet::new();
        for table in &config.tables {
            let (schema, name) = table.parts();
            let Some(mapping) = mappings.get(schema, name) else {
                continue;
            };
            let columns = recorded_columns(progress, mapping);
            if columns.is_none()
                && table.mapping.derive
                && !search.index_exists(&mapping.index).await?
            {
                info!(
                    table = %mapping.qualified(),
                    index = %mapping.index,
                    "the producer has not recorded this table's columns yet: its index is created at its first change"
                );
                pending.insert(mapping.index.clone());
                continue;
            }
            search
                .ensure_index(mapping, table, config_dir, columns.as_deref())
                .await?;
            // The wrong-target guard: this consumer stamps the index it
            // writes, and refuses one another pipeline stamped.
            tidemark_index::identity::claim(search, &mapping.index, &identity).await?;
        }
        Ok(Tables {
            mappings,
            config: config.clone(),
            config_dir: config_dir.to_owned(),
            identity,
            pending: Mutex::new(pending),
        })
    }

    /// Creates the indices `writes` go to that are still pending, with the
    /// columns the producer has recorded by now. `false` when stopped while
    /// waiting for OpenSearch or Kafka.
    pub async fn ready_for(
        &self,
        search: &Search,
        writes: &[Write],
        stop: &watch::Receiver<bool>,
    ) -> Result<bool, ConsumerError> {
        let wanted: Vec<String> = {
            let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            if pending.is_empty() {
                return Ok(true);
            }
            let mut wanted: Vec<String> = writes
                .iter()
                .map(|w| w.index().to_owned())
                .filter(|i| pending.contains(i))
                .collect();
            wanted.sort();
            wanted.dedup();
            wanted
        };
        for index in wanted {
            let Some((table, mapping)) = self.table_of(&index) else {
                continue;
            };
            let mut delay = Duration::from_millis(250);
            loop {
                match self.create(search, table, mapping).await {
                    Ok(()) => break,
                    Err(e) if retryable(&e) => {
                        warn!(table = %mapping.qualified(), index = %index, error = %tidemark_process::report(&e), "cannot create the index yet; waiting");
                    }
                    Err(e) => return Err(e),
                }
                let mut stop = stop.clone();
                if *stop.borrow() {
                    return Ok(false);
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.changed() => return Ok(false),
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&index);
        }
        Ok(true)
    }

    async fn create(
        &self,
        search: &Search,
        table: &Table,
        mapping: &TableMapping,
    ) -> Result<(), ConsumerError> {
        let config = self.config.clone();
        let progress = tokio::task::spawn_blocking(move || read_progress(&config))
            .await
            .map_err(|e| ConsumerError::Task(format!("reading the state topic: {e}")))??;
        let columns = recorded_columns(progress.as_ref(), mapping);
        if columns.is_none() {
            warn!(
                table = %mapping.qualified(),
                index = %mapping.index,
                "the producer recorded no columns for this table: its index gets OpenSearch's dynamic mapping"
            );
        }
        search
            .ensure_index(mapping, table, &self.config_dir, columns.as_deref())
            .await?;
        tidemark_index::identity::claim(search, &mapping.index, &self.identity).await?;
        Ok(())
    }

    fn table_of(&self, index: &str) -> Option<(&Table, &TableMapping)> {
        self.config.tables.iter().find_map(|table| {
            let (schema, name) = table.parts();
            let mapping = self.mappings.get(schema, name)?;
            (mapping.index == index).then_some((table, mapping))
        })
    }
}

/// Whether waiting can help: no answer from OpenSearch or Kafka.
fn retryable(e: &ConsumerError) -> bool {
    match e {
        ConsumerError::Index(e) => e.retryable(),
        ConsumerError::Kafka { .. } => true,
        _ => false,
    }
}

/// What `tidemark-consumer --print-mappings` prints: for each table, its
/// index and the mappings a new index gets, from the columns the producer
/// recorded (`progress`), as JSON.
pub fn print_mappings(
    config: &Config,
    config_dir: &Path,
    progress: Option<&SlotProgress>,
) -> Result<serde_json::Value, ConsumerError> {
    let mappings = Mappings::new(config);
    let mut out = Vec::new();
    for table in &config.tables {
        let (schema, name) = table.parts();
        let Some(mapping) = mappings.get(schema, name) else {
            continue;
        };
        let columns = recorded_columns(progress, mapping);
        let body = new_index_mappings(mapping, table, config_dir, columns.as_deref())?;
        out.push(serde_json::json!({
            "table": mapping.qualified(),
            "index": mapping.index,
            "columns": match &columns {
                Some(_) => "recorded by the producer",
                None => "not recorded yet (the producer has not run): fields other than mapping.columns and the mappings_file are left to dynamic mapping",
            },
            "mappings": body,
        }));
    }
    Ok(serde_json::Value::Array(out))
}

/// How old the producer's record and an index's field type may be when a
/// refusal is judged: one read per second at most, however many documents
/// a bulk had refused.
const JUDGED_FRESH: Duration = Duration::from_secs(1);

/// Tells a column's type change from a bad value (`apply::Refusals`): a
/// document its field's mapping refuses is a bad record only when the
/// table's columns, as the producer recorded them as of the change, would
/// type the field of the same kind as the index does
/// (`tidemark_index::derive::kind_of`). When they would type it otherwise
/// (`text` became `jsonb`), the index cannot take the table's rows any
/// more and the write waits, naming the reindex that lets it through
/// (`tidemark-replay reindex`); it then goes on by itself. Until the
/// producer's record covers the change (its confirmed LSN reaches the
/// write's), the write waits too: the record is what says which.
#[derive(Debug)]
pub struct TypeChanges {
    tables: std::sync::Arc<Tables>,
    search: std::sync::Arc<Search>,
    progress: tokio::sync::Mutex<Option<(std::time::Instant, Option<SlotProgress>)>>,
    fields: tokio::sync::Mutex<FieldTypes>,
    /// index -> when made, and the properties a new index would get from
    /// the columns recorded then (one `mappings_file` read per second at
    /// most, not one per refused document).
    expected: tokio::sync::Mutex<
        std::collections::HashMap<String, (std::time::Instant, serde_json::Value)>,
    >,
}

/// (index, field) -> when read, and the type it was mapped with then.
type FieldTypes = std::collections::HashMap<(String, String), (std::time::Instant, Option<String>)>;

impl TypeChanges {
    pub fn new(tables: std::sync::Arc<Tables>, search: std::sync::Arc<Search>) -> TypeChanges {
        TypeChanges {
            tables,
            search,
            progress: Default::default(),
            fields: Default::default(),
            expected: Default::default(),
        }
    }

    /// The producer's record, read at most [`JUDGED_FRESH`] ago; `Err` when
    /// Kafka does not answer (then the write waits).
    async fn progress(&self) -> Result<Option<SlotProgress>, String> {
        let mut cached = self.progress.lock().await;
        if let Some((at, progress)) = &*cached
            && at.elapsed() < JUDGED_FRESH
        {
            return Ok(progress.clone());
        }
        let config = self.tables.config.clone();
        let progress = tokio::task::spawn_blocking(move || read_progress(&config))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| tidemark_process::report(&e))?;
        *cached = Some((std::time::Instant::now(), progress.clone()));
        Ok(progress)
    }

    /// The type `index` maps `field` with now (`object` for an object
    /// without one), read at most [`JUDGED_FRESH`] ago.
    async fn field_type(&self, index: &str, field: &str) -> Result<Option<String>, String> {
        let key = (index.to_owned(), field.to_owned());
        if let Some((at, kind)) = self.fields.lock().await.get(&key)
            && at.elapsed() < JUDGED_FRESH
        {
            return Ok(kind.clone());
        }
        let (_, answer) = self
            .search
            .call(
                tidemark_index::http::Method::Get,
                &format!("/{index}/_mapping/field/{field}"),
                None,
            )
            .await
            .map_err(|e| e.to_string())?;
        let kind = answer.as_object().and_then(|indices| {
            indices.values().find_map(|i| {
                let leaf = field.rsplit('.').next().unwrap_or(field);
                let mapping = &i["mappings"][field]["mapping"][leaf];
                mapping
                    .is_object()
                    .then(|| mapping["type"].as_str().unwrap_or("object").to_owned())
            })
        });
        self.fields
            .lock()
            .await
            .insert(key, (std::time::Instant::now(), kind.clone()));
        Ok(kind)
    }

    async fn judged(
        &self,
        index: &str,
        reason: &str,
        version: tidemark_schemas::Version,
    ) -> Option<tidemark_index::answer::Stall> {
        use tidemark_index::answer::{Cause, Stall};
        let field = tidemark_index::answer::refused_field(reason)?;
        let top = field.split('.').next().unwrap_or(field);
        let (table, mapping) = self.tables.table_of(index)?;
        let wait = |cause, detail: String| Some(Stall { cause, detail });
        let progress = match self.progress().await {
            Ok(progress) => progress,
            Err(e) => {
                return wait(
                    Cause::ShapePending,
                    format!(
                        "cannot read the producer's record to judge a refusal of field {top}: {e}"
                    ),
                );
            }
        };
        let expected = {
            let mut cached = self.expected.lock().await;
            if cached
                .get(index)
                .is_none_or(|(at, _)| at.elapsed() >= JUDGED_FRESH)
            {
                let columns = recorded_columns(progress.as_ref(), mapping);
                let properties =
                    new_index_mappings(mapping, table, &self.tables.config_dir, columns.as_deref())
                        .map(|m| m["properties"].clone())
                        .unwrap_or_default();
                cached.insert(index.to_owned(), (std::time::Instant::now(), properties));
            }
            cached
                .get(index)
                .and_then(|(_, properties)| properties[top]["type"].as_str())
                .map(str::to_owned)
        };
        if let Some(expected) = expected {
            match self.field_type(index, top).await {
                Err(e) => {
                    return wait(
                        Cause::ShapePending,
                        format!("cannot read index {index}'s mapping of field {top}: {e}"),
                    );
                }
                Ok(Some(now))
                    if tidemark_index::derive::kind_of(&now)
                        != tidemark_index::derive::kind_of(&expected) =>
                {
                    return wait(
                        Cause::ColumnTypeChanged,
                        format!(
                            "table {}: field {top} is mapped as {now} in index {index}, but its column's type \
                             now maps as {expected}; run tidemark-replay reindex --table {} --yes, and writes \
                             go on by themselves once the index takes them",
                            mapping.qualified(),
                            mapping.qualified()
                        ),
                    );
                }
                Ok(_) => {}
            }
        }
        let covered = progress
            .as_ref()
            .and_then(|p| p.confirmed_lsn)
            .is_some_and(|confirmed| confirmed >= version.lsn());
        if !covered {
            return wait(
                Cause::ShapePending,
                format!(
                    "table {}: field {top} refused at LSN {}; waiting for the producer to record the \
                     table's columns as of it, to tell a type change from a bad value",
                    mapping.qualified(),
                    version.lsn()
                ),
            );
        }
        None
    }
}

impl tidemark_index::apply::Refusals for TypeChanges {
    fn judge<'a>(
        &'a self,
        index: &'a str,
        reason: &'a str,
        version: tidemark_schemas::Version,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Option<tidemark_index::answer::Stall>> + Send + 'a>,
    > {
        Box::pin(self.judged(index, reason, version))
    }
}
