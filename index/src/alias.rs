//! Aliases and reindex targets: the one place for how a configured index
//! name may stand for an alias, how a reindex marks the physical index it
//! is filling, and how every writer learns of that mark.
//!
//! Promises:
//! - A configured `index` names either a concrete index or an alias with
//!   one index behind it; writers and readers use the name as it is, and
//!   OpenSearch resolves it on each request.
//! - A reindex marks the index it fills (`<index>-<n>`) with the alias
//!   [`mark`]`(index)`. Every write made through `apply::Applier` (the
//!   consumer's and replay's) to `index` is also made to it, at the same
//!   version, with marks read at most [`MARKS_MAX_AGE`] before the bulk
//!   that carries the write is built. So once a mark has been in place for
//!   longer than that, every change committed afterwards reaches the marked
//!   index: a change is consumed after it is committed, and its bulk is
//!   built from marks read after the mark was placed. The reindex takes its
//!   snapshot only after waiting [`MARK_SETTLE`].
//! - A copy of an index write goes through the mark with `require_alias`:
//!   once the mark is gone (the reindex swapped, or was abandoned) the copy
//!   is dropped and never creates an index of that name. A delete cannot
//!   require an alias, so its copy goes to the index behind the mark; this
//!   is why a reindex is abandoned by removing its mark and deleting the
//!   index only [`MARK_SETTLE`] later.
//! - A write the index refuses because its field's column changed type
//!   (`answer::Cause::ColumnTypeChanged`, as the caller judges it), whose
//!   copy the marked index took, is applied: the marked index replaces the
//!   refusing one at the swap, and only a reindex can fix the type. So the
//!   writers go on keeping it current (its audit before the swap sees every
//!   change) instead of waiting on a swap that waits on them. Should the
//!   reindex be abandoned, the next reindex fills from the table again.
//! - The move of the alias (and, for an index adopted from a concrete one,
//!   the removal of that index) is one `_aliases` call: no search sees the
//!   name missing, and no write auto-creates it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use opensearch::http::headers::HeaderMap;
use opensearch::http::request::JsonBody;
use opensearch::http::{Method, StatusCode};
use serde_json::{Value, json};

use crate::search::{Search, SearchError, truncate};

/// How old the marks a bulk is built from may be.
pub const MARKS_MAX_AGE: Duration = Duration::from_secs(1);

/// How long a reindex waits between placing its mark and taking the
/// snapshot it fills from: several times [`MARKS_MAX_AGE`], for writers
/// on a busy machine.
pub const MARK_SETTLE: Duration = Duration::from_secs(5);

/// The alias that marks the index a reindex of `index` is filling.
pub fn mark(index: &str) -> String {
    format!("{index}.tidemark-reindex")
}

/// The marks read per index name, and when.
#[derive(Debug, Default)]
pub(crate) struct MarkCache {
    read: HashMap<String, (Instant, Vec<String>)>,
}

/// What a configured index name stands for now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Missing,
    /// A concrete index of that name.
    Concrete,
    /// An alias, and the indices behind it.
    Alias(Vec<String>),
}

impl Search {
    /// Sends one request, JSON in and out; any answer but 2xx is an error
    /// naming the status, except 404, which is `Ok((404, body))`.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(StatusCode, Value), SearchError> {
        let response = self
            .client()
            .send(
                method,
                path,
                HeaderMap::new(),
                None::<&()>,
                body.map(JsonBody::new),
                None,
            )
            .await
            .map_err(|e| SearchError::Transport(e.to_string()))?;
        let status = response.status_code();
        let text = response.text().await.unwrap_or_default();
        if !status.is_success() && status != StatusCode::NOT_FOUND {
            return Err(SearchError::Status {
                status: status.as_u16(),
                body: truncate(&text),
            });
        }
        let value = serde_json::from_str(&text).unwrap_or(Value::Null);
        Ok((status, value))
    }

    /// The indices an alias named `alias` points at (none when it does
    /// not exist).
    pub async fn aliased(&self, alias: &str) -> Result<Vec<String>, SearchError> {
        let (status, answer) = self
            .call(Method::Get, &format!("/_alias/{alias}"), None)
            .await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(Vec::new());
        }
        let mut indices: Vec<String> = answer
            .as_object()
            .into_iter()
            .flat_map(|m| m.keys().cloned())
            .collect();
        indices.sort();
        Ok(indices)
    }

    /// What `name` stands for now.
    pub async fn target(&self, name: &str) -> Result<Target, SearchError> {
        let behind = self.aliased(name).await?;
        if !behind.is_empty() {
            return Ok(Target::Alias(behind));
        }
        let (status, _) = self.call(Method::Head, &format!("/{name}"), None).await?;
        Ok(if status == StatusCode::NOT_FOUND {
            Target::Missing
        } else {
            Target::Concrete
        })
    }

    /// The indices a reindex of `index` is filling, as read at most
    /// [`MARKS_MAX_AGE`] ago (the writers' rule of this module).
    pub async fn marked(&self, index: &str) -> Result<Vec<String>, SearchError> {
        if let Some((at, marked)) = crate::apply::lock(&self.marks).read.get(index)
            && at.elapsed() < MARKS_MAX_AGE
        {
            return Ok(marked.clone());
        }
        // Read before the clock is taken: the age counts from before the
        // answer was made.
        let at = Instant::now();
        let marked = self.aliased(&mark(index)).await?;
        crate::apply::lock(&self.marks)
            .read
            .insert(index.to_owned(), (at, marked.clone()));
        Ok(marked)
    }

    /// One `_aliases` call: all of `actions` or none.
    pub async fn update_aliases(&self, actions: Vec<Value>) -> Result<(), SearchError> {
        self.call(
            Method::Post,
            "/_aliases",
            Some(json!({ "actions": actions })),
        )
        .await
        .map(|_| ())
    }

    /// Sets or lifts `index.blocks.write` on `index`.
    pub async fn block_writes(&self, index: &str, on: bool) -> Result<(), SearchError> {
        self.call(
            Method::Put,
            &format!("/{index}/_settings"),
            Some(json!({"index": {"blocks": {"write": on}}})),
        )
        .await
        .map(|_| ())
    }

    /// Makes what was written to `index` visible to searches.
    pub async fn refresh(&self, index: &str) -> Result<(), SearchError> {
        self.call(Method::Post, &format!("/{index}/_refresh"), None)
            .await
            .map(|_| ())
    }

    /// The number of documents searches see in `index`.
    pub async fn count(&self, index: &str) -> Result<u64, SearchError> {
        let (_, answer) = self
            .call(Method::Get, &format!("/{index}/_count"), None)
            .await?;
        Ok(answer["count"].as_u64().unwrap_or(0))
    }

    /// The ids of the bulk requests running in the cluster now.
    pub async fn running_bulks(&self) -> Result<Vec<String>, SearchError> {
        let (_, answer) = self
            .call(
                Method::Get,
                "/_tasks?actions=indices:data/write/bulk&filter_path=nodes.*.tasks.*.id",
                None,
            )
            .await?;
        Ok(answer["nodes"]
            .as_object()
            .into_iter()
            .flat_map(|nodes| nodes.iter())
            .flat_map(|(node, n)| {
                n["tasks"]
                    .as_object()
                    .into_iter()
                    .flat_map(|t| t.keys())
                    .map(move |id| {
                        if id.contains(':') {
                            id.clone()
                        } else {
                            format!("{node}:{id}")
                        }
                    })
            })
            .collect())
    }

    /// Waits until every shard of `index` is allocated to a node
    /// (`yellow`: replicas may still be copying).
    pub async fn wait_allocated(&self, index: &str) -> Result<(), SearchError> {
        self.call(
            Method::Get,
            &format!("/_cluster/health/{index}?wait_for_status=yellow&timeout=120s"),
            None,
        )
        .await
        .map(|_| ())
    }
}
