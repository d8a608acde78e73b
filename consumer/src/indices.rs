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
