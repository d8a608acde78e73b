//! Every replay run is recorded (who, when, where, arguments, counts,
//! outcome) in the `tidemark-runs` index of the target cluster, so the team
//! finds later what was done to the index; `tidemark-replay runs` lists them.
//! Each record names its deployment (`kafka.topic_prefix`), so deployments
//! that share the cluster share the index and each lists its own runs.

use crate::error::{IndexError, Step};
use crate::search::Search;
use opensearch::SearchParts;
use opensearch::indices::{IndicesCreateParts, IndicesExistsParts};
use serde::Serialize;
use serde_json::{Value, json};

/// Where runs are recorded.
pub const RUNS_INDEX: &str = "tidemark-runs";

#[derive(Debug, Serialize)]
pub struct RunRecord {
    /// The deployment that ran it: its `kafka.topic_prefix`.
    pub deployment: String,
    pub command: String,
    pub user: String,
    pub host: String,
    pub started: String,
    pub finished: String,
    pub arguments: Vec<String>,
    pub dry_run: bool,
    pub outcome: String,
    pub results: Value,
}

/// The user and host running this process.
pub fn who() -> (String, String) {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into());
    (user, host)
}

async fn ensure_index(search: &Search) -> Result<(), IndexError> {
    let exists = search
        .client()
        .indices()
        .exists(IndicesExistsParts::Index(&[RUNS_INDEX]))
        .send()
        .await?
        .status_code();
    if exists.is_success() {
        // An index created before records named their deployment: the
        // field is mapped before the first record that has it.
        search
            .client()
            .indices()
            .put_mapping(opensearch::indices::IndicesPutMappingParts::Index(&[
                RUNS_INDEX,
            ]))
            .body(json!({"properties": {"deployment": {"type": "keyword"}}}))
            .send()
            .await?;
        return Ok(());
    }
    let response = search
        .client()
        .indices()
        .create(IndicesCreateParts::Index(RUNS_INDEX))
        .body(json!({
            "mappings": {"properties": {
                "deployment": {"type": "keyword"},
                "command": {"type": "keyword"}, "user": {"type": "keyword"}, "host": {"type": "keyword"},
                "started": {"type": "date"}, "finished": {"type": "date"},
                "arguments": {"type": "keyword"}, "dry_run": {"type": "boolean"},
                "outcome": {"type": "keyword"}, "results": {"type": "object", "enabled": false}
            }}
        }))
        .send()
        .await?;
    let status = response.status_code();
    let text = response.text().await.unwrap_or_default();
    if !status.is_success() && !text.contains("resource_already_exists_exception") {
        return Err(IndexError::Refused(format!(
            "cannot create the {RUNS_INDEX} index: {status} {text}"
        )));
    }
    Ok(())
}

/// Records a run; the record is searchable when this returns.
pub async fn record(search: &Search, run: &RunRecord) -> Result<(), IndexError> {
    ensure_index(search).await?;
    let response = search
        .client()
        .index(opensearch::IndexParts::Index(RUNS_INDEX))
        // An immediate refresh of this small index, not `wait_for`: that
        // waited for the next scheduled refresh, up to a second per run.
        .refresh(opensearch::params::Refresh::True)
        .body(json!(run))
        .send()
        .await
        .unanswered(|| format!("cannot record the run in {RUNS_INDEX}"))?;
    if !response.status_code().is_success() {
        let text = response.text().await.unwrap_or_default();
        return Err(IndexError::Refused(format!(
            "cannot record the run in {RUNS_INDEX}: {text}"
        )));
    }
    Ok(())
}

/// The latest runs, newest first: of `deployment` only, when given (runs
/// recorded before records named one are listed only without it).
pub async fn list(
    search: &Search,
    limit: usize,
    deployment: Option<&str>,
) -> Result<Vec<Value>, IndexError> {
    let query = match deployment {
        Some(d) => json!({"term": {"deployment": d}}),
        None => json!({"match_all": {}}),
    };
    let response = search
        .client()
        .search(SearchParts::Index(&[RUNS_INDEX]))
        .body(json!({"size": limit, "query": query, "sort": [{"started": "desc"}]}))
        .send()
        .await?;
    if response.status_code().as_u16() == 404 {
        return Ok(Vec::new());
    }
    let body: Value = response.json().await?;
    Ok(body["hits"]["hits"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|h| h["_source"].clone())
        .collect())
}
