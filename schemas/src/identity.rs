//! A pipeline's identity: the PostgreSQL cluster and database that feed it,
//! the Kafka cluster and topic prefix that carry it. The consumer stamps it
//! into the `_meta` of every index it creates or writes (under
//! [`META_KEY`]); every command that writes an index compares the stamp
//! with what it sees before writing, and refuses another pipeline's index
//! or one that carries no stamp (the wrong-target guard).
//!
//! The consumer never connects to PostgreSQL: it learns the PostgreSQL half
//! from the producer's progress record ([`crate::state::SlotProgress`]),
//! so a stamp written before the producer first ran lacks it
//! ([`Identity::postgres_system`] and [`Identity::database`] are `None`),
//! and the consumer completes it at its next start. A field missing on
//! either side is not compared, and the comparison says so.

use serde::{Deserialize, Serialize};

/// Where a stamp lives in an index's mapping: `_meta.tidemark_pipeline`.
pub const META_KEY: &str = "tidemark_pipeline";

/// Which PostgreSQL, database, Kafka cluster and topic prefix a pipeline is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// PostgreSQL's system identifier (IDENTIFY_SYSTEM, decimal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres_system: Option<String>,
    /// The PostgreSQL database.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    /// Kafka's cluster id.
    pub kafka_cluster: String,
    /// `kafka.topic_prefix`.
    pub topic_prefix: String,
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unknown = "unknown";
        write!(
            f,
            "PostgreSQL system {} database {}, Kafka cluster {} topic prefix {}",
            self.postgres_system.as_deref().unwrap_or(unknown),
            self.database.as_deref().unwrap_or(unknown),
            self.kafka_cluster,
            self.topic_prefix
        )
    }
}

impl Identity {
    /// The fields in which `seen` differs from this (recorded) identity,
    /// each as `name recorded X, seen Y`; fields either side lacks are not
    /// compared.
    pub fn differences(&self, seen: &Identity) -> Vec<String> {
        let mut out = Vec::new();
        let mut compare = |name: &str, recorded: Option<&str>, now: Option<&str>| {
            if let (Some(recorded), Some(now)) = (recorded, now)
                && recorded != now
            {
                out.push(format!("{name}: recorded {recorded}, seen {now}"));
            }
        };
        compare(
            "PostgreSQL system",
            self.postgres_system.as_deref(),
            seen.postgres_system.as_deref(),
        );
        compare(
            "database",
            self.database.as_deref(),
            seen.database.as_deref(),
        );
        compare(
            "Kafka cluster",
            Some(&self.kafka_cluster),
            Some(&seen.kafka_cluster),
        );
        compare(
            "topic prefix",
            Some(&self.topic_prefix),
            Some(&seen.topic_prefix),
        );
        out
    }

    /// The fields that could not be compared with `seen` (missing on either
    /// side), by name.
    pub fn unchecked(&self, seen: &Identity) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.postgres_system.is_none() || seen.postgres_system.is_none() {
            out.push("PostgreSQL system");
        }
        if self.database.is_none() || seen.database.is_none() {
            out.push("database");
        }
        out
    }

    /// This stamp with the fields it lacks taken from `seen`, if that adds
    /// any (and they agree otherwise): what the consumer writes back.
    pub fn completed_by(&self, seen: &Identity) -> Option<Identity> {
        if !self.differences(seen).is_empty() {
            return None;
        }
        let completed = Identity {
            postgres_system: self
                .postgres_system
                .clone()
                .or_else(|| seen.postgres_system.clone()),
            database: self.database.clone().or_else(|| seen.database.clone()),
            ..self.clone()
        };
        (completed != *self).then_some(completed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(system: Option<&str>, cluster: &str) -> Identity {
        Identity {
            postgres_system: system.map(str::to_owned),
            database: Some("app".into()),
            kafka_cluster: cluster.into(),
            topic_prefix: "tidemark".into(),
        }
    }

    #[test]
    fn differences_name_both_sides_and_skip_what_is_unknown() {
        let recorded = identity(Some("7400"), "k1");
        assert!(recorded.differences(&recorded).is_empty());
        assert_eq!(
            recorded.differences(&identity(Some("9999"), "k2")),
            [
                "PostgreSQL system: recorded 7400, seen 9999",
                "Kafka cluster: recorded k1, seen k2"
            ]
        );
        let partial = identity(None, "k1");
        assert!(partial.differences(&recorded).is_empty());
        assert_eq!(partial.unchecked(&recorded), ["PostgreSQL system"]);
    }

    #[test]
    fn a_partial_stamp_is_completed_only_by_an_agreeing_identity() {
        let partial = identity(None, "k1");
        assert_eq!(
            partial.completed_by(&identity(Some("7400"), "k1")),
            Some(identity(Some("7400"), "k1"))
        );
        assert_eq!(partial.completed_by(&identity(None, "k1")), None);
        assert_eq!(partial.completed_by(&identity(Some("7400"), "k2")), None);
    }

    #[test]
    fn the_stamp_keeps_its_json_shape() {
        let json = serde_json::to_value(identity(Some("7400"), "k1")).expect("json");
        assert_eq!(
            json,
            serde_json::json!({"postgres_system": "7400", "database": "app",
                "kafka_cluster": "k1", "topic_prefix": "tidemark"})
        );
    }
}
