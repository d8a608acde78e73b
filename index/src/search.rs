//! The OpenSearch side: connecting, checking, creating indices, and the few
//! requests the apply path needs (bulk, realtime multi-get, versioned
//! delete-by-query). Errors say whether retrying can help.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use opensearch::auth::Credentials;
use opensearch::http::StatusCode;
use opensearch::http::Url;
use opensearch::http::transport::TransportBuilder;
use opensearch::indices::{
    IndicesCreateParts, IndicesExistsParts, IndicesGetMappingParts, IndicesGetSettingsParts,
    IndicesPutMappingParts,
};
use opensearch::params::Conflicts;
use opensearch::{BulkParts, DeleteByQueryParts, MgetParts, OpenSearch};
use serde::Deserialize;
use serde_json::{Value, json};
use tidemark_schemas::Row;
use tidemark_schemas::config::{self, META_FIELD};
use tracing::{info, warn};

use crate::answer::{Cause, Stall};
use crate::error::{IndexError, Step, failed};
use crate::mapping::{TableMapping, meta_mapping};

/// A request that did not go through.
#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    /// No answer (connection refused, timeout, reset): retry.
    #[error("OpenSearch did not answer: {0}")]
    Transport(String),
    /// An error status for the whole request.
    #[error("OpenSearch answered {status}: {body}")]
    Status { status: u16, body: String },
}

impl SearchError {
    /// 429, 5xx and no answer at all are worth retrying; other statuses are
    /// not going to change.
    pub fn retryable(&self) -> bool {
        match self {
            SearchError::Transport(_) => true,
            SearchError::Status { status, .. } => *status == 429 || *status >= 500,
        }
    }
}

/// Who answers: printed before replay writes, logged at start.
#[derive(Debug, Clone, Deserialize)]
pub struct ClusterInfo {
    pub cluster_name: String,
    pub cluster_uuid: String,
    pub version: ClusterVersion,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ClusterVersion {
    pub number: String,
}

/// One item of a bulk response.
#[derive(Debug, Clone, Deserialize)]
pub struct BulkItem {
    pub status: u16,
    #[serde(default)]
    pub result: Option<String>,
    #[serde(default)]
    pub error: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct BulkResponse {
    items: Vec<HashMap<String, BulkItem>>,
}

#[derive(Debug)]
pub struct Search {
    client: OpenSearch,
    url: String,
    /// The uuid of each index this process writes, as it first saw it (set
    /// up at start by `ensure_index`, else at its first check).
    uuids: Mutex<HashMap<String, String>>,
    /// Indices found replaced. It sticks until the process restarts: the
    /// writes that found it were applied to the stray index, so their
    /// retries answer `updated` and would otherwise pass unchecked.
    replaced: Mutex<HashMap<String, Stall>>,
    /// The reindex marks read per index name (`crate::alias`).
    pub(crate) marks: Mutex<crate::alias::MarkCache>,
}

/// Whether a get-mapping answer lacks a field of [`meta_mapping`] under
/// `_tidemark` (an index made by an earlier version).
fn lacks_meta_field(mappings: &Value) -> bool {
    let wanted = meta_mapping();
    let fields: Vec<&String> = wanted["properties"]
        .as_object()
        .into_iter()
        .flat_map(|w| w.keys())
        .collect();
    mappings
        .as_object()
        .into_iter()
        .flat_map(|m| m.values())
        .any(|m| {
            let have = m.pointer(&format!("/mappings/properties/{META_FIELD}/properties"));
            fields
                .iter()
                .any(|field| have.and_then(|h| h.get(field.as_str())).is_none())
        })
}

impl Search {
    pub fn connect(config: &config::OpenSearch) -> Result<Search, IndexError> {
        let mut urls = Vec::new();
        for url in config.urls() {
            urls.push(Url::parse(url).map_err(failed(|| {
                format!(
                    "opensearch.url: {} is not a URL",
                    tidemark_schemas::config::redact_url(url)
                )
            }))?);
        }
        let mut transport = TransportBuilder::new(crate::nodes::Nodes::new(urls))
            .timeout(Duration::from_secs(config.request_timeout_secs));
        if let Some(user) = &config.username {
            let password = config
                .password
                .as_ref()
                .map(|p| p.0.clone())
                .unwrap_or_default();
            transport = transport.auth(Credentials::Basic(user.clone(), password));
        }
        let transport = crate::tls::secure(transport, config)?;
        let transport = transport
            .build()
            .map_err(failed(|| "cannot build the OpenSearch client".to_owned()))?;
        Ok(Search {
            client: OpenSearch::new(transport),
            url: config
                .urls()
                .into_iter()
                .map(tidemark_schemas::config::redact_url)
                .collect::<Vec<_>>()
                .join(","),
            uuids: Mutex::default(),
            replaced: Mutex::default(),
            marks: Mutex::default(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn client(&self) -> &OpenSearch {
        &self.client
    }

    /// The cluster's name, uuid and version; an error says how to fix it.
    pub async fn info(&self) -> Result<ClusterInfo, IndexError> {
        let response = self.client.info().send().await.map_err(|e| {
            // The cause chain says what TLS refused; `{e}` alone does not.
            let hint = if format!("{e:?}").contains("certificate") {
                "The TLS handshake failed: check opensearch.tls_ca_file (the CA that signed \
                     the cluster's certificate) and that the certificate names the host in \
                     opensearch.url"
            } else {
                "Is it running? Check opensearch.url (or TIDEMARK_OPENSEARCH_URL), whether \
                     it is https://, and, with security on, opensearch.username and \
                     TIDEMARK_OPENSEARCH_PASSWORD"
            };
            IndexError::Unreachable {
                what: format!("cannot reach OpenSearch at {}: {e}. {hint}", self.url),
                source: e,
            }
        })?;
        let status = response.status_code();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(IndexError::Refused(format!(
                "OpenSearch at {} answered {status} to GET /: {}. Check opensearch.username and \
                 TIDEMARK_OPENSEARCH_PASSWORD, or the client certificate \
                 (opensearch.tls_certificate_file) and its role mapping",
                self.url,
                truncate(&body)
            )));
        }
        response
            .json::<ClusterInfo>()
            .await
            .failed(|| format!("{} did not answer like OpenSearch", self.url))
    }

    /// Cheap liveness probe for readiness.
    pub async fn ping(&self) -> bool {
        matches!(self.client.ping().send().await, Ok(r) if r.status_code().is_success())
    }

    /// Whether `index` (or an alias of that name) exists.
    pub async fn index_exists(&self, index: &str) -> Result<bool, IndexError> {
        let status = self
            .client
            .indices()
            .exists(IndicesExistsParts::Index(&[index]))
            .send()
            .await
            .map_err(|e| IndexError::Unreachable {
                what: format!(
                    "index {index}: cannot reach OpenSearch at {}: {e}",
                    self.url
                ),
                source: e,
            })?
            .status_code();
        match status {
            StatusCode::NOT_FOUND => Ok(false),
            s if s.is_success() => Ok(true),
            s => Err(IndexError::Refused(format!(
                "index {index}: OpenSearch answered {s} to an index lookup"
            ))),
        }
    }

    /// Creates the table's index if it is missing (with the configured
    /// settings, the mappings of [`new_index_mappings`], and
    /// `_tidemark`), else makes sure `_tidemark` is mapped as Tidemark
    /// needs. `columns` are the table's (name, type OID), as the producer
    /// recorded them, where known. An error names the table and index.
    pub async fn ensure_index(
        &self,
        mapping: &TableMapping,
        table: &config::Table,
        config_dir: &Path,
        columns: Option<&[(String, u32)]>,
    ) -> Result<(), IndexError> {
        let index = &mapping.index;
        let what = || format!("table {} (index {index})", mapping.qualified());
        if !self.index_exists(index).await? {
            let mappings = new_index_mappings(mapping, table, config_dir, columns)?;
            let fields = mappings["properties"]
                .as_object()
                .map_or(0, |p| p.len() - 1);
            let mut body = json!({ "mappings": mappings });
            if let Some(settings) = &table.index_settings {
                body["settings"] = serde_json::to_value(settings)
                    .map_err(failed(|| format!("{}: index_settings", what())))?;
            }
            let response = self
                .client
                .indices()
                .create(IndicesCreateParts::Index(index))
                .body(body)
                .send()
                .await
                .map_err(|e| IndexError::Unreachable {
                    what: format!("{}: cannot create the index: {e}", what()),
                    source: e,
                })?;
            let status = response.status_code();
            let text = response.text().await.unwrap_or_default();
            if status.is_success() {
                info!(
                    table = %mapping.qualified(),
                    index = %index,
                    typed_fields = fields,
                    columns_known = columns.is_some(),
                    "created index"
                );

                self.remember_uuid(index)
                    .await
                    .unanswered(|| format!("{}: cannot read the index's uuid", what()))?;
                return Ok(());
            }
            // Another consumer of the group may have created it meanwhile.
            if !text.contains("resource_already_exists_exception") {
                return Err(IndexError::Refused(format!(
                    "{}: OpenSearch refused to create the index ({status}): {}. Check \
                     index_settings and mappings_file",
                    what(),
                    truncate(&text)
                )));
            }
        }
        // The index exists: `_tidemark.version` must be a long, or version
        // guards and truncates would not work.
        let response = self
            .client
            .indices()
            .get_mapping(IndicesGetMappingParts::Index(&[index]))
            .send()
            .await
            .map_err(|e| IndexError::Unreachable {
                what: format!("{}: cannot read the mapping: {e}", what()),
                source: e,
            })?;
        let mappings: Value = response
            .json()
            .await
            .failed(|| format!("{}: mapping answer", what()))?;
        let existing_types: Vec<&Value> = mappings
            .as_object()
            .into_iter()
            .flat_map(|m| m.values())
            .filter_map(|m| {
                m.pointer(&format!(
                    "/mappings/properties/{META_FIELD}/properties/version/type"
                ))
            })
            .collect();
        if existing_types.iter().any(|t| t.as_str() != Some("long")) {
            return Err(IndexError::Refused(format!(
                "{}: the index maps {META_FIELD}.version as {:?}, not long; reindex it or choose \
                 another index name",
                what(),
                existing_types
            )));
        }
        if existing_types.is_empty() {
            if let Err(answer) = self.put_meta_mapping(index).await {
                return Err(IndexError::Refused(format!(
                    "{}: the existing index cannot take the {META_FIELD} mapping: {answer}",
                    what()
                )));
            }
        } else if lacks_meta_field(&mappings) {
            self.add_meta_fields(&mapping.qualified(), index).await;
        }
        self.remember_uuid(index)
            .await
            .unanswered(|| format!("{}: cannot read the index's uuid", what()))?;
        Ok(())
    }

    /// The name and uuid of `index` (of the index behind it, for an
    /// alias), `None` when there is none.
    async fn index_uuid(&self, index: &str) -> Result<Option<(String, String)>, SearchError> {
        let response = self
            .client
            .indices()
            .get_settings(IndicesGetSettingsParts::IndexName(
                &[index],
                &["index.uuid"],
            ))
            .flat_settings(true)
            .send()
            .await
            .map_err(|e| SearchError::Transport(e.to_string()))?;
        if response.status_code() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let answer: Value = successful(response)
            .await?
            .json()
            .await
            .map_err(|e| SearchError::Transport(format!("unreadable settings answer: {e}")))?;
        Ok(answer
            .as_object()
            .and_then(|m| m.iter().next())
            .and_then(|(name, i)| {
                i["settings"]["index.uuid"]
                    .as_str()
                    .map(|uuid| (name.clone(), uuid.to_owned()))
            }))
    }

    /// Remembers the uuid the index behind `index` has now, as the one this
    /// process writes.
    async fn remember_uuid(&self, index: &str) -> Result<(), SearchError> {
        if let Some((name, uuid)) = self.index_uuid(index).await? {
            crate::apply::lock(&self.uuids).insert(name, uuid);
        }
        Ok(())
    }

    /// `Ok` while the index behind `index` is still the one this process
    /// first saw under its name; a stall when it was deleted and created
    /// again (or cannot be checked). The uuids are kept per concrete index,
    /// so an alias moved to another index (a reindex's swap) is not a
    /// replacement.
    pub async fn same_index(&self, index: &str) -> Result<(), Stall> {
        if let Some(stall) = self.found_replaced(index) {
            return Err(stall);
        }
        let now = match self.index_uuid(index).await {
            Ok(now) => now,
            Err(e) => {
                return Err(Stall {
                    cause: if e.retryable() {
                        Cause::Unreachable
                    } else {
                        Cause::RequestRefused
                    },
                    detail: format!("cannot read the uuid of index {index}: {e}"),
                });
            }
        };
        let mut uuids = crate::apply::lock(&self.uuids);
        let Some((name, now)) = now else {
            return Ok(());
        };
        let Some(known) = uuids.get(&name) else {
            uuids.insert(name, now);
            return Ok(());
        };
        if &now == known {
            return Ok(());
        }
        let stall = Stall {
            cause: Cause::IndexReplaced,
            detail: format!(
                "index {index} was deleted and created again (uuid {known} -> {now}), e.g. by \
                 action.auto_create_index with dynamic mappings; nothing written to it since is \
                 committed. Delete it and restart the consumer to create it with its mappings, \
                 then repair with tidemark-replay audit --repair (or restart to keep it as it is)"
            ),
        };
        drop(uuids);
        crate::apply::lock(&self.replaced).insert(index.to_owned(), stall.clone());
        Err(stall)
    }

    /// The stall of an index found replaced earlier, if it was.
    pub fn found_replaced(&self, index: &str) -> Option<Stall> {
        crate::apply::lock(&self.replaced).get(index).cloned()
    }

    /// Adds `_tidemark` fields that an index made by an earlier version
    /// lacks (`id`); adding fields to a mapping is always allowed. Writers
    /// call it before writing, so the field is never mapped dynamically. A
    /// failure is only logged: documents are then looked up the slower way.
    pub async fn ensure_meta_fields(&self, table: &str, index: &str) {
        let current = async {
            self.client
                .indices()
                .get_mapping(IndicesGetMappingParts::Index(&[index]))
                .send()
                .await?
                .json::<Value>()
                .await
        };
        match current.await {
            Ok(mappings) if lacks_meta_field(&mappings) => {
                self.add_meta_fields(table, index).await;
            }
            Ok(_) => {}
            Err(e) => warn!(table, index, error = %e, "cannot read the index mapping"),
        }
    }

    async fn add_meta_fields(&self, table: &str, index: &str) {
        match self.put_meta_mapping(index).await {
            Ok(()) => info!(
                table,
                index, "added the newer {META_FIELD} fields to the index mapping"
            ),
            Err(answer) => warn!(table, index, %answer,
                "cannot add the newer {META_FIELD} fields to the index mapping; replay and audit look its documents up the slower way"),
        }
    }

    /// Puts the `_tidemark` mapping on an index (new fields only are
    /// added); the error is OpenSearch's answer, or why there was none.
    async fn put_meta_mapping(&self, index: &str) -> Result<(), String> {
        let response = self
            .client
            .indices()
            .put_mapping(IndicesPutMappingParts::Index(&[index]))
            .body(json!({"properties": {META_FIELD: meta_mapping()}}))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status_code();
        if status.is_success() {
            return Ok(());
        }
        let text = response.text().await.unwrap_or_default();
        Err(format!("{status} {}", truncate(&text)))
    }

    /// Sends one bulk body (NDJSON); the items answer in request order.
    pub async fn bulk(&self, body: Bytes) -> Result<Vec<BulkItem>, SearchError> {
        let response = self
            .client
            .bulk(BulkParts::None)
            // Only what the answer is judged by: a bulk answer otherwise
            // repeats index, id, version, shards and sequence numbers per
            // item, several times the bytes to hold and parse.
            .filter_path(&[
                "errors",
                "items.*.status",
                "items.*.result",
                "items.*.error",
            ])
            .body(vec![body])
            .send()
            .await
            .map_err(|e| SearchError::Transport(e.to_string()))?;
        let response = successful(response).await?;
        let parsed: BulkResponse = response
            .json()
            .await
            .map_err(|e| SearchError::Transport(format!("unreadable bulk response: {e}")))?;
        Ok(parsed
            .items
            .into_iter()
            .map(|mut item| {
                // Each item is {"index": {...}} or {"delete": {...}}.
                item.drain().next().map(|(_, v)| v).unwrap_or(BulkItem {
                    status: 500,
                    result: None,
                    error: Some(json!("empty bulk item")),
                })
            })
            .collect())
    }

    /// The current (realtime, not refresh-bound) values of `fields` of
    /// documents `ids` in `index`; absent documents are absent from the map.
    /// Also the size of the answer in bytes (what the caller now holds).
    pub async fn current_fields(
        &self,
        index: &str,
        ids: &[&str],
        fields: &[&str],
    ) -> Result<(HashMap<String, Row>, usize), SearchError> {
        let response = self
            .client
            .mget(MgetParts::Index(index))
            .realtime(true)
            ._source_includes(fields)
            // Only what is read below: a missing document's answer shrinks
            // to its id, a found one's to its id and the asked fields.
            .filter_path(&["docs._id", "docs.found", "docs._source"])
            .body(json!({ "ids": ids }))
            .send()
            .await
            .map_err(|e| SearchError::Transport(e.to_string()))?;
        let response = successful(response).await?;
        #[derive(Deserialize)]
        struct Doc {
            #[serde(rename = "_id")]
            id: String,
            #[serde(default)]
            found: bool,
            #[serde(rename = "_source", default)]
            source: Option<Row>,
        }
        #[derive(Deserialize)]
        struct Docs {
            docs: Vec<Doc>,
        }
        let body = response
            .bytes()
            .await
            .map_err(|e| SearchError::Transport(format!("unreadable mget response: {e}")))?;
        let docs: Docs = serde_json::from_slice(&body)
            .map_err(|e| SearchError::Transport(format!("unreadable mget response: {e}")))?;
        let found = docs
            .docs
            .into_iter()
            .filter(|d| d.found)
            .map(|d| (d.id, d.source.unwrap_or_default()))
            .collect();
        Ok((found, body.len()))
    }

    /// Deletes every document of `index` whose version is below `version`
    /// (a truncate at that commit LSN); returns how many went.
    pub async fn delete_older_than(&self, index: &str, version: u64) -> Result<u64, SearchError> {
        let response = self
            .client
            .delete_by_query(DeleteByQueryParts::Index(&[index]))
            .conflicts(Conflicts::Proceed)
            .refresh(true)
            .body(json!({"query": {"range": {format!("{META_FIELD}.version"): {"lt": version}}}}))
            .send()
            .await
            .map_err(|e| SearchError::Transport(e.to_string()))?;
        let response = successful(response).await?;
        let answer: Value = response.json().await.map_err(|e| {
            SearchError::Transport(format!("unreadable delete_by_query response: {e}"))
        })?;
        if let Some(failures) = answer["failures"].as_array().filter(|f| !f.is_empty()) {
            return Err(SearchError::Status {
                status: 500,
                body: truncate(&Value::Array(failures.clone()).to_string()),
            });
        }
        Ok(answer["deleted"].as_u64().unwrap_or(0))
    }
}

/// The response if its status is a success, else the status and the start
/// of the body as an error.
async fn successful(
    response: opensearch::http::response::Response,
) -> Result<opensearch::http::response::Response, SearchError> {
    let status = response.status_code();
    if status.is_success() {
        return Ok(response);
    }
    let body = response.text().await.unwrap_or_default();
    Err(SearchError::Status {
        status: status.as_u16(),
        body: truncate(&body),
    })
}

/// Error bodies can be long; logs and dead letters get the start.
pub fn truncate(text: &str) -> String {
    const MAX: usize = 2_000;
    if text.len() <= MAX {
        return text.to_owned();
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// The mappings a new index for the table is created with: the
/// `mappings_file` (if any), each field it leaves out typed from `columns`
/// (name, type OID; `derive`), plus `_tidemark`.
pub fn new_index_mappings(
    mapping: &TableMapping,
    table: &config::Table,
    config_dir: &Path,
    columns: Option<&[(String, u32)]>,
) -> Result<Value, IndexError> {
    let index = &mapping.index;
    let what = || format!("table {} (index {index})", mapping.qualified());
    let mut mappings = match &table.mappings_file {
        Some(file) => {
            let path = config_dir.join(file);
            let text = std::fs::read_to_string(&path).map_err(failed(|| {
                format!("{}: cannot read mappings_file {}", what(), path.display())
            }))?;
            let value: Value = serde_json::from_str(&text).map_err(failed(|| {
                format!("{}: mappings_file {} is not JSON", what(), path.display())
            }))?;
            // Accept either {"mappings": {...}} or the mappings object itself.
            match value.get("mappings") {
                Some(inner) => inner.clone(),
                None => value,
            }
        }
        None => json!({}),
    };
    let Some(object) = mappings.as_object_mut() else {
        return Err(IndexError::Refused(format!(
            "{}: mappings_file must hold a JSON object",
            what()
        )));
    };
    let properties = object.entry("properties").or_insert_with(|| json!({}));
    let Some(properties) = properties.as_object_mut() else {
        return Err(IndexError::Refused(format!(
            "{}: mappings_file: \"properties\" must be an object",
            what()
        )));
    };
    if properties.contains_key(META_FIELD) {
        return Err(IndexError::Refused(format!(
            "{}: mappings_file maps {META_FIELD}, which Tidemark reserves for its metadata; remove it",
            what()
        )));
    }
    for (field, derived) in crate::derive::properties(table, mapping, columns) {
        properties.entry(field).or_insert(derived);
    }
    properties.insert(META_FIELD.to_owned(), meta_mapping());
    Ok(mappings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_from_before_the_id_field_lacks_a_meta_field() {
        let answer = |meta: Value| json!({"i": {"mappings": {"properties": {META_FIELD: meta}}}});
        assert!(!lacks_meta_field(&answer(meta_mapping())));
        let mut old = meta_mapping();
        old["properties"]
            .as_object_mut()
            .expect("properties")
            .remove("id");
        assert!(lacks_meta_field(&answer(old)));
    }
}
