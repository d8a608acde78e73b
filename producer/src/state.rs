//! The producer's own progress record, kept in a compacted Kafka topic
//! (one record per slot, latest wins), as Kafka Connect keeps its offsets.
//!
//! It answers two questions at start-up that the slot alone cannot:
//! - Did the initial snapshot finish? The record "snapshot started" is
//!   written *before* the slot is created, so a crash at any point of the
//!   snapshot leaves a record that says so, and the next start drops the
//!   slot and takes the snapshot again (re-sending rows is harmless: they
//!   carry the snapshot LSN as their version).
//! - Did anything else move the slot? Before every confirmation to
//!   PostgreSQL the producer records the LSN it is about to confirm, so the
//!   slot can never be ahead of the record unless another reader consumed
//!   it, which would mean changes never reached Kafka.
//! - Is the history unbroken? The record names the cluster (system
//!   identifier) and timeline the slot's changes came from. A slot that is
//!   gone while the record says it had streamed, another cluster, or a new
//!   timeline (a failover, a point-in-time restore) is a gap: changes may
//!   never have been read. [`history_gap`] is that rule; start-up refuses
//!   such a gap unless told to take a new snapshot over it.
//! - Does another slot feed the same topics? Deployments may share one
//!   state topic (several producers, one Kafka cluster): each record names
//!   its slot's topic prefix and tables, so a producer whose topics another
//!   slot's record claims refuses to start ([`claimed_elsewhere`]) rather
//!   than interleave two sources' rows, whose versions have no order with
//!   each other, in one topic.

use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};
pub use tidemark_schemas::state::{HistoryGap, SlotProgress};

use crate::sink::{SinkError, client_config};

const READ_TIMEOUT: Duration = Duration::from_secs(15);

/// Whether the history recorded in `progress` goes on unbroken on the server
/// that answers now (`system_id`, `timeline`), with the slot present or not;
/// else what was lost. A record from before identities were kept checks only
/// the slot.
pub fn history_gap(
    progress: &SlotProgress,
    slot_exists: bool,
    system_id: &str,
    timeline: u32,
) -> Option<String> {
    if let Some(recorded) = &progress.system_id
        && recorded != system_id
    {
        return Some(format!(
            "PostgreSQL's system identifier is {system_id}, not {recorded} as when slot {} streamed: \
             this is another cluster (restored from a backup, rebuilt, or the wrong server), whose \
             versions have no order with the indexed ones: if it is the right server, delete the \
             tables' indices (or point them at new ones) before --resnapshot",
            progress.slot
        ));
    }
    if let Some(recorded) = progress.timeline
        && recorded != timeline
    {
        return Some(format!(
            "PostgreSQL is on timeline {timeline}, not {recorded} as when slot {} streamed: a \
             failover or a point-in-time restore, whose history may lack changes Kafka already has",
            progress.slot
        ));
    }
    if !slot_exists && progress.snapshot_complete {
        return Some(format!(
            "replication slot {} is gone (dropped, or lost in a failover: PostgreSQL 15 does not \
             copy slots to standbys)",
            progress.slot
        ));
    }
    None
}

/// A table topic of ours that another slot's record says it feeds.
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    /// `schema.table`.
    pub table: String,
    pub topic: String,
    /// The other slot's record.
    pub slot: String,
    pub system_id: Option<String>,
    pub database: Option<String>,
}

impl Claim {
    /// Whether the claiming slot is of the same database on the same server
    /// (then whether it still exists can be asked).
    pub fn same_database(&self, system_id: &str, database: &str) -> bool {
        self.system_id.as_deref() == Some(system_id) && self.database.as_deref() == Some(database)
    }
}

/// The topics of `tables` (`schema.table`, sent under `prefix`) that a
/// record of another slot than `slot` in `records` claims: same prefix, a
/// table in common. Topic names carry the schema and table, not the
/// database or the slot, so such a topic would carry two slots' rows. A
/// record from before prefixes were kept claims nothing (it is checked once
/// its producer ran again). Two producers started at the same moment can
/// both pass: the check is for deployments set up one after the other.
pub fn claimed_elsewhere<'a>(
    slot: &str,
    prefix: &str,
    tables: &[String],
    records: impl IntoIterator<Item = &'a SlotProgress>,
) -> Vec<Claim> {
    let mut claims = Vec::new();
    for other in records {
        if other.slot == slot || other.topic_prefix.as_deref() != Some(prefix) {
            continue;
        }
        // Its tables: those Kafka holds, and those whose first shape it
        // recorded before sending their first row (a snapshot under way).
        let theirs: std::collections::BTreeSet<&String> = other
            .tables
            .iter()
            .flatten()
            .chain(other.shapes.keys())
            .collect();
        for table in theirs {
            if tables.contains(table) {
                claims.push(Claim {
                    table: table.clone(),
                    topic: format!("{prefix}.{table}"),
                    slot: other.slot.clone(),
                    system_id: other.system_id.clone(),
                    database: other.database.clone(),
                });
            }
        }
    }
    claims
}

pub struct StateStore {
    producer: FutureProducer,
    kafka: tidemark_schemas::config::Kafka,
    topic: String,
}

impl std::fmt::Debug for StateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StateStore({})", self.topic)
    }
}

impl StateStore {
    pub fn new(
        producer: FutureProducer,
        kafka: &tidemark_schemas::config::Kafka,
        topic: &str,
    ) -> StateStore {
        StateStore {
            producer,
            kafka: kafka.clone(),
            topic: topic.to_owned(),
        }
    }

    /// The latest record of every slot, by slot, reading the topic to its
    /// end (one read: the state topic holds a small record per slot).
    pub async fn load_all(
        &self,
    ) -> Result<std::collections::BTreeMap<String, SlotProgress>, SinkError> {
        let kafka = self.kafka.clone();
        let topic = self.topic.clone();
        tokio::task::spawn_blocking(move || read_all(&kafka, &topic))
            .await
            .map_err(|_| SinkError::Client(rdkafka::error::KafkaError::Canceled))?
    }

    /// Deletes `slot`'s record (a tombstone, which compaction keeps until
    /// `delete.retention.ms` and then drops with the record): for a slot
    /// whose producer is gone for good, so that its claims on topics end.
    pub async fn forget(&self, slot: &str) -> Result<(), SinkError> {
        let record: FutureRecord<'_, str, [u8]> = FutureRecord::to(&self.topic).key(slot);
        match self.producer.send(record, READ_TIMEOUT).await {
            Ok(_) => Ok(()),
            Err((source, _)) => Err(SinkError::Send {
                topic: self.topic.clone(),
                lsn: Default::default(),
                source,
            }),
        }
    }

    /// Writes a record and waits until Kafka acknowledged it.
    /// Before the publication changes: a record from before `tables` was
    /// kept gets the publication's tables (`published`) as the tables Kafka
    /// holds, saved, when a configured table is about to be added; so a
    /// crash before that table is snapshotted leaves it missing from the
    /// record, and it is snapshotted at the next start.
    pub async fn keep_published(
        &self,
        progress: &mut SlotProgress,
        configured: &[String],
        published: &[String],
    ) -> Result<(), SinkError> {
        if progress.tables.is_none() && configured.iter().any(|t| !published.contains(t)) {
            progress.tables = Some(published.to_vec());
            self.save(progress).await?;
        }
        Ok(())
    }

    pub async fn save(&self, progress: &SlotProgress) -> Result<(), SinkError> {
        let payload = serde_json::to_vec(progress).unwrap_or_default();
        let record = FutureRecord::to(&self.topic)
            .key(&progress.slot)
            .payload(&payload);
        let lsn = progress
            .confirmed_lsn
            .or(progress.snapshot_lsn)
            .unwrap_or_default();
        match self.producer.send(record, READ_TIMEOUT).await {
            Ok(_) => Ok(()),
            Err((source, _)) => Err(SinkError::Send {
                topic: self.topic.clone(),
                lsn,
                source,
            }),
        }
    }
}

fn read_all(
    kafka: &tidemark_schemas::config::Kafka,
    topic: &str,
) -> Result<std::collections::BTreeMap<String, SlotProgress>, SinkError> {
    let mut config = client_config(kafka);
    config.set("group.id", "tidemark-producer-state-reader");
    let latest =
        tidemark_kafka::latest_records(config, topic, READ_TIMEOUT).map_err(SinkError::Client)?;
    // A record that does not parse is no slot's progress.
    Ok(latest
        .into_values()
        .filter_map(|payload| serde_json::from_slice::<SlotProgress>(&payload).ok())
        .map(|p| (p.slot.clone(), p))
        .collect())
}

/// The configured `tables` whose rows Kafka does not hold: those missing
/// from the record's `tables` (or, for a record from before it was kept,
/// from the tables `published` before this start).
pub fn added_tables(
    progress: &SlotProgress,
    tables: &[tidemark_postgres::CatalogTable],
    published: &[String],
) -> Vec<tidemark_postgres::CatalogTable> {
    let known = progress.tables.as_deref().unwrap_or(published);
    tables
        .iter()
        .filter(|t| !known.contains(&t.qualified()))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_schemas::Lsn;

    fn progress() -> SlotProgress {
        SlotProgress {
            slot: "s".into(),
            snapshot_complete: true,
            snapshot_lsn: Some(Lsn(16)),
            confirmed_lsn: Some(Lsn(32)),
            system_id: Some("7400".into()),
            database: Some("app".into()),
            timeline: Some(1),
            gap: None,
            tables: None,
            shapes: Default::default(),
            topic_prefix: Some("p".into()),
        }
    }

    #[test]
    fn another_slots_record_claims_the_topics_of_its_tables_under_its_prefix() {
        let tables = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let other =
            |slot: &str, prefix: Option<&str>, tables: &[&str], shapes: &[&str]| SlotProgress {
                slot: slot.into(),
                database: Some("billing".into()),
                topic_prefix: prefix.map(str::to_owned),
                tables: Some(tables.iter().map(|t| t.to_string()).collect()),
                shapes: shapes
                    .iter()
                    .map(|t| (t.to_string(), "id int4".to_owned()))
                    .collect(),
                ..progress()
            };
        let ours = tables(&["public.orders", "public.users"]);
        let records = [
            // Our own record never claims.
            other("s", Some("p"), &["public.orders"], &[]),
            // Same prefix, a table in common.
            other("b", Some("p"), &["public.orders", "public.items"], &[]),
            // Another prefix: other topics.
            other("c", Some("q"), &["public.users"], &[]),
            // A snapshot under way: its shapes are recorded, tables not yet.
            other("d", Some("p"), &[], &["public.users"]),
            // Written before prefixes were kept.
            other("e", None, &["public.users"], &[]),
        ];
        let claims = claimed_elsewhere("s", "p", &ours, &records);
        let found: Vec<(&str, &str, &str)> = claims
            .iter()
            .map(|c| (c.slot.as_str(), c.table.as_str(), c.topic.as_str()))
            .collect();
        assert_eq!(
            found,
            [
                ("b", "public.orders", "p.public.orders"),
                ("d", "public.users", "p.public.users")
            ]
        );
        assert!(claims[0].same_database("7400", "billing"));
        assert!(!claims[0].same_database("7400", "app"));
        assert!(!claims[0].same_database("9999", "billing"));
    }

    #[test]
    fn the_history_is_unbroken_only_on_the_same_cluster_timeline_and_slot() {
        assert_eq!(history_gap(&progress(), true, "7400", 1), None);
        let lost = history_gap(&progress(), false, "7400", 1).expect("slot gone");
        assert!(lost.contains("replication slot s is gone"), "{lost}");
        let other = history_gap(&progress(), true, "9999", 1).expect("other cluster");
        assert!(
            other.contains("system identifier is 9999, not 7400"),
            "{other}"
        );
        let failover = history_gap(&progress(), false, "7400", 2).expect("new timeline");
        assert!(failover.contains("timeline 2, not 1"), "{failover}");
        // An interrupted first snapshot is no gap: it is taken again.
        let mut first = progress();
        first.snapshot_complete = false;
        assert_eq!(history_gap(&first, false, "7400", 1), None);
    }

    #[test]
    fn records_from_before_identities_still_parse_and_check_the_slot() {
        let old: SlotProgress = serde_json::from_str(
            r#"{"slot":"s","snapshot_complete":true,"snapshot_lsn":"0/10","confirmed_lsn":"0/20"}"#,
        )
        .expect("an old record");
        assert_eq!(old.system_id, None);
        assert_eq!(history_gap(&old, true, "anything", 7), None);
        assert!(history_gap(&old, false, "anything", 7).is_some());
    }
}
