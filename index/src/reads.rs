//! Reads of documents' `_tidemark` metadata: by id (realtime multi-get),
//! by search over doc values (faster, as of the last refresh), and every id
//! of an index scrolled in id order. The replay tools (audit, window) read
//! the index only through these and `search`.

use std::collections::HashMap;

use crate::error::{IndexError, Step};
use opensearch::OpenSearch;
use opensearch::{ClearScrollParts, ScrollParts, SearchParts};
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::warn;

use crate::mapping::document_digest;
use crate::search::Search;
use tidemark_schemas::Row;

/// `_tidemark` hash (and, with `commit_time`, commit time) of documents by
/// id, from doc values (columnar, no source parsing): several times faster
/// than a multi-get of the same documents (10,000 existing documents:
/// 0.11-0.19 s against 0.84-0.95 s). Sees what the last refresh made
/// visible; [`doc_meta`] reads realtime. At most 10,000 ids (the default
/// `index.max_result_window`). With `hashes`, only the documents whose
/// hash is one of them: cheaper when few are (nothing to fetch).
pub async fn doc_meta_searched(
    search: &Search,
    index: &str,
    ids: &[&str],
    commit_time: bool,
    hashes: Option<&[&str]>,
) -> Result<HashMap<String, Value>, IndexError> {
    let meta = |fields: HitFields| {
        json!({
            "hash": fields.hash.into_iter().next(),
            "commit_time": fields.commit_time.into_iter().next(),
        })
    };
    // Ids and hashes from doc values alone (`_tidemark.id`).
    let mut found = HashMap::with_capacity(ids.len());
    let mut without_id = 0usize;
    for hit in search_ids(search, index, ids, commit_time, hashes, false).await? {
        let mut fields = hit.fields;
        match fields.id.pop() {
            Some(id) => {
                found.insert(id, meta(fields));
            }
            None => without_id += 1,
        }
    }
    // Documents written before `_tidemark.id` existed: their ids come from
    // the stored `_id`, the slower way.
    if without_id > 0 {
        let rest: Vec<&str> = ids
            .iter()
            .copied()
            .filter(|id| !found.contains_key(*id))
            .collect();
        for hit in search_ids(search, index, &rest, commit_time, hashes, true).await? {
            if let Some(id) = hit.id {
                found.insert(id, meta(hit.fields));
            }
        }
    }
    Ok(found)
}

#[derive(Deserialize, Default)]
struct SearchAnswer {
    #[serde(default)]
    hits: SearchHits,
}

#[derive(Deserialize, Default)]
struct SearchHits {
    #[serde(default)]
    hits: Vec<SearchHit>,
}

#[derive(Deserialize)]
struct SearchHit {
    #[serde(rename = "_id")]
    id: Option<String>,
    #[serde(default)]
    fields: HitFields,
}

/// The documents of `ids` (at most 10,000), `_tidemark` fields from doc
/// values; with `hashes` only those whose hash is one of them; with
/// `stored_id` also each hit's stored `_id`.
async fn search_ids(
    search: &Search,
    index: &str,
    ids: &[&str],
    commit_time: bool,
    hashes: Option<&[&str]>,
    stored_id: bool,
) -> Result<Vec<SearchHit>, IndexError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut docvalues = vec![json!("_tidemark.id"), json!("_tidemark.hash")];
    if commit_time {
        docvalues.push(
            json!({"field": "_tidemark.commit_time", "format": "strict_date_optional_time_nanos"}),
        );
    }
    let mut body = json!({
        "size": ids.len(),
        "_source": false,
        "track_total_hits": false,
        "sort": ["_doc"],
        "query": {"ids": {"values": ids}},
        "docvalue_fields": docvalues,
    });
    if let Some(hashes) = hashes {
        body["query"] = json!({"bool": {"filter": [
            {"ids": {"values": ids}},
            {"terms": {"_tidemark.hash": hashes}},
        ]}});
    }
    if !stored_id {
        body["stored_fields"] = json!("_none_");
    }
    let response = search
        .client()
        .search(SearchParts::Index(&[index]))
        .filter_path(&["hits.hits._id", "hits.hits.fields"])
        .body(body)
        .send()
        .await
        .unanswered(|| format!("index {index}: search by ids"))?;
    if !response.status_code().is_success() {
        let status = response.status_code();
        let text = response.text().await.unwrap_or_default();
        return Err(IndexError::Refused(format!(
            "index {index}: search by ids answered {status}: {text}"
        )));
    }
    let answer: SearchAnswer = response
        .json()
        .await
        .failed(|| format!("index {index}: search by ids answer"))?;
    Ok(answer.hits.hits)
}

/// `_tidemark` of documents by id, realtime (not refresh-bound): `hash`,
/// `commit_time` and `version`.
pub async fn doc_meta(
    search: &Search,
    index: &str,
    ids: &[&str],
) -> Result<HashMap<String, Value>, IndexError> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let (found, _) = search
        .current_fields(
            index,
            ids,
            &[
                "_tidemark.hash",
                "_tidemark.commit_time",
                "_tidemark.version",
            ],
        )
        .await
        .unanswered(|| format!("index {index}: multi-get"))?;
    Ok(found
        .into_iter()
        .map(|(id, source)| (id, source.get("_tidemark").cloned().unwrap_or(Value::Null)))
        .collect())
}

/// [`doc_meta`] with each document's content hashed as it is stored
/// ([`document_digest`] of the whole `_source`): `hash` is then the hash of
/// what the document holds, and `stored_hash` what `_tidemark.hash` says
/// it should hold. The two differ after a write that bypassed Tidemark (a
/// partial `_update`, a hand fix, a second writer). Reads every document's
/// source, so several times the cost of [`doc_meta`].
pub async fn doc_content_meta(
    search: &Search,
    index: &str,
    ids: &[&str],
) -> Result<HashMap<String, Value>, IndexError> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let (found, _) = search
        .current_fields(index, ids, &["*"])
        .await
        .unanswered(|| format!("index {index}: multi-get"))?;
    Ok(found
        .into_iter()
        .map(|(id, source)| (id, content_meta(&source)))
        .collect())
}

/// A document's `_tidemark`, with `hash` replaced by the hash of its
/// content and the stored one kept as `stored_hash`.
pub fn content_meta(source: &Row) -> Value {
    let mut meta = source.get("_tidemark").cloned().unwrap_or(json!({}));
    if !meta.is_object() {
        meta = json!({});
    }
    let stored = meta.get("hash").cloned().unwrap_or(Value::Null);
    meta["stored_hash"] = stored;
    meta["hash"] = json!(format!("{:032x}", document_digest(source)));
    meta
}

/// One page of an id scroll, as `filter_path` trims it.
#[derive(Debug, Deserialize)]
struct ScrollPage {
    #[serde(rename = "_scroll_id")]
    scroll_id: Option<String>,
    #[serde(default)]
    hits: Option<ScrollHits>,
}

#[derive(Debug, Deserialize)]
struct ScrollHits {
    #[serde(default)]
    hits: Vec<ScrollHit>,
}

#[derive(Debug, Deserialize)]
pub struct ScrollHit {
    #[serde(rename = "_id")]
    pub id: String,
    #[serde(default)]
    pub fields: Option<HitFields>,
    /// With [`Fetch::Content`] only.
    #[serde(rename = "_source", default)]
    pub source: Option<Row>,
}

/// What an [`IdScroll`] fetches beside each id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetch {
    /// Nothing else.
    Ids,
    /// `_tidemark.hash` from doc values (no `_source`).
    Hash,
    /// The whole `_source`, to hash what a document holds (`audit --deep`).
    Content,
}

/// `_tidemark` doc values of a hit (those asked for).
#[derive(Debug, Deserialize, Default)]
pub struct HitFields {
    #[serde(rename = "_tidemark.id", default)]
    pub id: Vec<String>,
    #[serde(rename = "_tidemark.hash", default)]
    pub hash: Vec<String>,
    #[serde(rename = "_tidemark.commit_time", default)]
    pub commit_time: Vec<String>,
}

/// A scroll over an index in index order that returns document ids (and
/// what [`Fetch`] asks for), one page at a time, trimmed by `filter_path`. [`IdScroll::close`] frees
/// the search context early; OpenSearch drops it after 2 minutes otherwise.
#[derive(Debug)]
pub struct IdScroll {
    client: OpenSearch,
    index: String,
    /// The first request's body; `None` once it was sent.
    first: Option<Value>,
    scroll_id: Option<String>,
}

impl IdScroll {
    pub fn new(client: OpenSearch, index: String, query: Value, fetch: Fetch, page: usize) -> Self {
        let mut body = json!({"size": page, "sort": ["_doc"], "_source": false, "query": query});
        match fetch {
            Fetch::Ids => {}
            Fetch::Hash => body["docvalue_fields"] = json!(["_tidemark.hash"]),
            Fetch::Content => body["_source"] = json!(true),
        }
        IdScroll {
            client,
            index,
            first: Some(body),
            scroll_id: None,
        }
    }

    /// Only slice `id` of `max` (0-based): OpenSearch's sliced scroll, which
    /// splits the documents into `max` disjoint shares that together are all
    /// of them, by their `_id`. A single slice is the whole index.
    pub fn sliced(mut self, id: u32, max: u32) -> Self {
        if max > 1
            && let Some(body) = &mut self.first
        {
            body["slice"] = json!({"id": id, "max": max});
        }
        self
    }

    /// The next page of hits; empty at the end.
    pub async fn next_page(&mut self) -> Result<Vec<ScrollHit>, IndexError> {
        const KEEP: &str = "_scroll_id,hits.hits._id,hits.hits.fields,hits.hits._source";
        let index = &self.index;
        let response = match (self.first.take(), &self.scroll_id) {
            (Some(body), _) => {
                self.client
                    .search(SearchParts::Index(&[index]))
                    .scroll("2m")
                    .filter_path(&[KEEP])
                    .body(body)
                    .send()
                    .await
            }
            (None, Some(id)) => {
                self.client
                    .scroll(ScrollParts::None)
                    .filter_path(&[KEEP])
                    .body(json!({"scroll": "2m", "scroll_id": id}))
                    .send()
                    .await
            }
            (None, None) => return Ok(Vec::new()),
        }
        .unanswered(|| format!("index {index}: cannot scroll"))?;
        if !response.status_code().is_success() {
            let status = response.status_code();
            let text = response.text().await.unwrap_or_default();
            return Err(IndexError::Refused(format!(
                "index {index}: scroll answered {status}: {text}"
            )));
        }
        let page: ScrollPage = response
            .json()
            .await
            .failed(|| format!("index {index}: scroll answer"))?;
        self.scroll_id = page.scroll_id;
        Ok(page.hits.map(|h| h.hits).unwrap_or_default())
    }

    pub async fn close(self) {
        if let Some(id) = self.scroll_id {
            let _ = self
                .client
                .clear_scroll(ClearScrollParts::None)
                .body(json!({"scroll_id": [id]}))
                .send()
                .await;
        }
    }
}

/// Makes everything written to `index` so far visible to search. A
/// failure (e.g. no permission to refresh) is only logged: a document
/// written since the index's last refresh is then not seen by a search,
/// and the callers read realtime where that matters (the audit re-checks
/// what looked wrong; window asks realtime before skipping a delete).
pub async fn refresh(search: &Search, index: &str) {
    let answer = search
        .client()
        .indices()
        .refresh(opensearch::indices::IndicesRefreshParts::Index(&[index]))
        .send()
        .await;
    match answer {
        Ok(response) if response.status_code().is_success() => {}
        Ok(response) => {
            warn!(index, status = %response.status_code(), "could not refresh the index; documents written since its last refresh are looked up realtime where it matters")
        }
        Err(e) => {
            warn!(index, error = %e, "could not refresh the index; documents written since its last refresh are looked up realtime where it matters")
        }
    }
}
