//! An index's pipeline stamp (`_meta.tidemark_pipeline`, see
//! `tidemark_schemas::identity`): reading it, writing it, and the one rule
//! by which a writer accepts an index.
//!
//! The rule ([`judge`]): an index is this pipeline's when its stamp agrees
//! with what the writer sees in every field both name. The consumer stamps
//! an index without one (it creates or writes it: it is its writer of
//! record) and completes a partial stamp; it refuses a stamp that differs.
//! Every other writer (replay's writing commands) refuses an index that
//! differs *or carries no stamp*, unless told to override.

use opensearch::indices::{IndicesGetMappingParts, IndicesPutMappingParts};
use serde_json::{Map, Value, json};
use tidemark_schemas::identity::{Identity, META_KEY};

use crate::error::{IndexError, Step};
use crate::search::Search;

/// What an index's stamp says, against what a writer sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The stamp agrees (fields either side lacks are listed, unchecked).
    Ours { unchecked: Vec<&'static str> },
    /// The index carries no stamp.
    Unstamped,
    /// The stamp names another pipeline: how it differs.
    Foreign {
        recorded: Identity,
        differences: Vec<String>,
    },
}

/// Judges `stamp` (an index's, if any) against `seen`.
pub fn judge(stamp: Option<&Identity>, seen: &Identity) -> Verdict {
    match stamp {
        None => Verdict::Unstamped,
        Some(recorded) => {
            let differences = recorded.differences(seen);
            if differences.is_empty() {
                Verdict::Ours {
                    unchecked: recorded.unchecked(seen),
                }
            } else {
                Verdict::Foreign {
                    recorded: recorded.clone(),
                    differences,
                }
            }
        }
    }
}

/// The index's `_meta` object (empty if none).
pub async fn meta(search: &Search, index: &str) -> Result<Map<String, Value>, IndexError> {
    let response = search
        .client()
        .indices()
        .get_mapping(IndicesGetMappingParts::Index(&[index]))
        .send()
        .await
        .unanswered(|| format!("index {index}: cannot read its mapping"))?;
    let status = response.status_code();
    if !status.is_success() {
        return Err(IndexError::Refused(format!(
            "index {index}: OpenSearch answered {status} to reading its mapping (does it exist?)"
        )));
    }
    let answer: Value = response
        .json()
        .await
        .failed(|| format!("index {index}: mapping answer"))?;
    // Keyed by the concrete index name (the config may name an alias).
    Ok(answer
        .as_object()
        .and_then(|m| m.values().next())
        .and_then(|m| m.pointer("/mappings/_meta"))
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default())
}

/// The index's stamp, if it carries one. An unreadable stamp is an error
/// naming the index.
pub async fn stamp_of(search: &Search, index: &str) -> Result<Option<Identity>, IndexError> {
    match meta(search, index).await?.remove(META_KEY) {
        None => Ok(None),
        Some(value) => serde_json::from_value(value).map(Some).map_err(|e| {
            IndexError::Refused(format!(
                "index {index}: _meta.{META_KEY} is not a pipeline stamp ({e}); remove it or fix it"
            ))
        }),
    }
}

/// Writes `identity` as the index's stamp, keeping the rest of its `_meta`
/// (OpenSearch replaces `_meta` as a whole).
pub async fn write_stamp(
    search: &Search,
    index: &str,
    identity: &Identity,
) -> Result<(), IndexError> {
    let mut meta = meta(search, index).await?;
    meta.insert(META_KEY.to_owned(), json!(identity));
    let response = search
        .client()
        .indices()
        .put_mapping(IndicesPutMappingParts::Index(&[index]))
        .body(json!({ "_meta": meta }))
        .send()
        .await
        .unanswered(|| format!("index {index}: cannot write its pipeline stamp"))?;
    let status = response.status_code();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        return Err(IndexError::Refused(format!(
            "index {index}: OpenSearch answered {status} to writing its pipeline stamp: {}",
            text.chars().take(300).collect::<String>()
        )));
    }
    Ok(())
}

/// The consumer's side of the rule, at start-up: stamps an index without a
/// stamp, completes a partial one, accepts its own, and refuses another
/// pipeline's with an error naming both sides and what to do.
pub async fn claim(search: &Search, index: &str, seen: &Identity) -> Result<(), IndexError> {
    let stamp = stamp_of(search, index).await?;
    match judge(stamp.as_ref(), seen) {
        Verdict::Unstamped => {
            write_stamp(search, index, seen).await?;
            tracing::info!(index, identity = %seen, "index stamped with this pipeline's identity");
        }
        Verdict::Ours { .. } => {
            if let Some(completed) = stamp.as_ref().and_then(|s| s.completed_by(seen)) {
                write_stamp(search, index, &completed).await?;
                tracing::info!(index, identity = %completed, "index stamp completed");
            }
        }
        Verdict::Foreign {
            recorded,
            differences,
        } => {
            return Err(IndexError::Refused(foreign(
                index,
                &recorded,
                seen,
                &differences,
            )));
        }
    }
    Ok(())
}

/// The refusal for another pipeline's index.
pub fn foreign(
    index: &str,
    recorded: &Identity,
    seen: &Identity,
    differences: &[String],
) -> String {
    format!(
        "index {index} belongs to another pipeline ({}). Its stamp: {recorded}; this process \
         sees: {seen}. Check opensearch.url, the table's index, kafka.brokers, \
         kafka.topic_prefix and postgres.url; if the index really is this pipeline's now, \
         remove its _meta.{META_KEY}",
        differences.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(cluster: &str) -> Identity {
        Identity {
            postgres_system: Some("7400".into()),
            database: Some("app".into()),
            kafka_cluster: cluster.into(),
            topic_prefix: "tidemark".into(),
        }
    }

    #[test]
    fn an_index_is_ours_only_with_an_agreeing_stamp() {
        let seen = identity("k1");
        assert_eq!(judge(None, &seen), Verdict::Unstamped);
        assert_eq!(
            judge(Some(&seen), &seen),
            Verdict::Ours { unchecked: vec![] }
        );
        let Verdict::Foreign { differences, .. } = judge(Some(&identity("k2")), &seen) else {
            panic!("another cluster's stamp is foreign");
        };
        assert_eq!(differences, ["Kafka cluster: recorded k2, seen k1"]);
        let text = foreign("i", &identity("k2"), &seen, &differences);
        assert!(
            text.contains("Kafka cluster k2") && text.contains("Kafka cluster k1"),
            "{text}"
        );
    }
}
