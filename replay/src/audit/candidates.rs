//! Which keys may differ: the full audit merges the table's keys and the
//! index's ids, both in order (`merge`); a subset audit (`--key`, sampled
//! or repaired keys) looks each one up.

use crate::error::{Context, ReplayError, Result};
use std::time::Instant;

use serde_json::json;
use tidemark_index::reads::{Fetch, IdScroll, doc_content_meta, doc_meta_searched};
use tidemark_index::search::Search;
use tidemark_postgres::row_values;
use tidemark_schemas::Row;
use tokio_postgres::{Client, SimpleQueryMessage};
use tracing::info;

use super::{
    CHUNK, Described, TableReport, Target, compare, estimated_rows, key_from_id, key_types,
    open_cursor, rows_by_keys, sampled, sorted_documents, sorted_rows,
};
use crate::merge::Mismatch;
use crate::progress::Progress;

/// Full audit: both sides streamed once, sorted by document id and merged
/// (see [`crate::merge`]). Rows are read in one REPEATABLE READ snapshot
/// while the index is scrolled at the same time (ids and `_tidemark.hash`
/// doc values only); what disagrees becomes a candidate for the re-check.
pub(crate) async fn merged_candidates(
    client: &mut Client,
    search: &Search,
    target: &Target<'_>,
    d: &Described,
    query: &str,
    report: &mut TableReport,
) -> Result<Vec<(String, Row)>> {
    let mapping = target.mapping;
    let name = mapping.qualified();
    let started = Instant::now();
    // The index is read on its own task (its own thread under the
    // multi-threaded runtime) while this one maps rows; dropping the set
    // on an error stops it.
    let estimate = estimated_rows(client, d).await;
    let documents = Progress::new(&format!("{name}: documents"), "documents", estimate);
    let mut scroll = tokio::task::JoinSet::new();
    scroll.spawn(sorted_documents(
        search.client().clone(),
        mapping.index.clone(),
        target.deep,
        documents.clone(),
    ));
    let rows_progress = Progress::new(&format!("{name}: rows"), "rows", estimate);
    let rows = sorted_rows(client, d, mapping, query, &rows_progress).await?;
    rows_progress.finish();
    report.rows = rows.count();
    info!(table = %name, rows = report.rows, elapsed_ms = started.elapsed().as_millis() as u64, "audit: rows read");
    let docs = scroll
        .join_next()
        .await
        .ok_or_else(|| ReplayError::Task("the index scroll task vanished".to_owned()))?
        .context("the index scroll task failed")??;

    documents.finish();
    report.documents = docs.count();
    info!(table = %name, documents = report.documents, elapsed_ms = started.elapsed().as_millis() as u64, "audit: documents read");

    let id_columns = mapping.id_columns(&d.table.key);
    let key_types = key_types(d);
    let mut candidates = Vec::new();
    let mut bad_key = None;
    crate::merge::merge(
        rows.finish().context("audit: reading back sorted rows")?,
        docs.finish()
            .context("audit: reading back sorted documents")?,
        |mismatch| {
            let (id, key) = match mismatch {
                Mismatch::Missing(row) | Mismatch::Stale { row } => {
                    let key = row
                        .key
                        .as_deref()
                        .map(serde_json::from_str::<Row>)
                        .transpose();
                    match key {
                        Ok(key) => (row.id, key.unwrap_or_default()),
                        Err(e) => {
                            bad_key.get_or_insert(format!("document {}: {e}", row.id));
                            return;
                        }
                    }
                }
                // An id that does not decode has no row: it stays with an
                // empty key and is reported extra.
                Mismatch::Extra(doc) => {
                    let key =
                        key_from_id(mapping, &id_columns, &key_types, &doc.id).unwrap_or_default();
                    (doc.id, key)
                }
            };
            candidates.push((id, key));
        },
    )
    .context("audit: merging rows and documents")?;
    if let Some(e) = bad_key {
        return Err(ReplayError::Record {
            what: format!("table {name}: a spilled key did not read back"),
            source: e.into(),
        });
    }
    info!(table = %name, candidates = candidates.len(), elapsed_ms = started.elapsed().as_millis() as u64, "audit: merged");
    Ok(candidates)
}

/// Subset audit (`--sample`, `--since`, `--part`): each side's chosen rows or
/// documents are looked up on the other side by key, which costs a round
/// trip per chunk but reads only the subset. (A merge would need the same
/// subset on both sides, which neither a sample nor a time filter gives.)
pub(crate) async fn looked_up_candidates(
    client: &mut Client,
    search: &Search,
    target: &Target<'_>,
    d: &Described,
    query: &str,
    report: &mut TableReport,
) -> Result<Vec<(String, Row)>> {
    let mapping = target.mapping;
    let name = mapping.qualified();
    let index = mapping.index.clone();
    let mut candidates: Vec<(String, Row)> = Vec::new();
    let started = Instant::now();

    // 1. Rows -> documents.
    let tx = open_cursor(client, &name, query).await?;
    let fetch = format!("FETCH {CHUNK} FROM tidemark_audit");
    // The next chunk is read and mapped while the current one's documents
    // are looked up: PostgreSQL and OpenSearch work at the same time.
    let read_chunk = || async {
        let mut chunk: Vec<(String, Row, Row)> = Vec::with_capacity(CHUNK);
        let fetched = tx
            .simple_query(&fetch)
            .await
            .with_context(|| format!("table {name}: reading the chosen rows"))?;
        for message in fetched {
            if let SimpleQueryMessage::Row(row) = message {
                let (key, after) = row_values(&d.table, &d.mappings, &d.key_index, &row)?;
                chunk.push((mapping.doc_id(&key)?, key, after));
            }
        }
        Ok::<_, ReplayError>(chunk)
    };
    let progress = Progress::new(&format!("{name}: rows"), "rows", None);
    let mut chunk = read_chunk().await?;
    loop {
        let fetched = chunk.len();
        progress.inc(fetched as u64);
        report.rows += fetched as u64;
        let ids: Vec<&str> = chunk.iter().map(|(id, _, _)| id.as_str()).collect();
        let last = fetched < CHUNK;
        let lookup = async {
            if target.deep {
                doc_content_meta(search, &index, &ids).await
            } else {
                doc_meta_searched(search, &index, &ids, true, None).await
            }
        };
        let (docs, next) = tokio::join!(lookup, async {
            if last {
                Ok(Vec::new())
            } else {
                read_chunk().await
            }
        });
        let docs = docs?;
        for (id, key, after) in &chunk {
            if compare(mapping, Some(after), docs.get(id)).is_some() {
                candidates.push((id.clone(), key.clone()));
            }
        }
        if last {
            break;
        }
        if report.rows % 100_000 < CHUNK as u64 {
            info!(table = %name, rows = report.rows, elapsed_s = started.elapsed().as_secs(), "audit: rows compared");
        }
        chunk = next?;
    }
    progress.finish();
    tx.batch_execute("CLOSE tidemark_audit")
        .await
        .with_context(|| format!("table {name}: closing the row cursor"))?;
    info!(table = %name, rows = report.rows, elapsed_ms = started.elapsed().as_millis() as u64, "audit: rows pass done");

    // 2. Documents -> rows, in the same snapshot.
    let id_columns = mapping.id_columns(&d.table.key);
    let key_types = key_types(d);
    let doc_query = match target.since {
        Some(since) => json!({"range": {"_tidemark.commit_time": {"gte": since.to_string()}}}),
        None => json!({"match_all": {}}),
    };
    let mut scroll = IdScroll::new(
        search.client().clone(),
        index.clone(),
        doc_query,
        Fetch::Ids,
        CHUNK,
    )
    .sliced(
        target.part.map_or(0, |p| p.index),
        target.part.map_or(1, |p| p.of),
    );
    let result = async {
        loop {
            let hits = scroll.next_page().await?;
            if hits.is_empty() {
                return Ok::<_, ReplayError>(());
            }
            report.documents += hits.len() as u64;
            // Ids only (no source): the key comes back from the id, whose
            // encoding the mapping can reverse. An id that does not decode
            // has no row, so it stays with an empty key and is reported
            // extra.
            let docs: Vec<(String, Row)> = hits
                .into_iter()
                .map(|h| {
                    let key =
                        key_from_id(mapping, &id_columns, &key_types, &h.id).unwrap_or_default();
                    (h.id, key)
                })
                .collect();
            let keys: Vec<&Row> = docs.iter().map(|(_, k)| k).collect();
            let rows = rows_by_keys(&tx, d, mapping, &keys).await?;
            for (id, key) in docs {
                if !rows.contains_key(&id) && sampled(&id, target.sample) {
                    candidates.push((id, key));
                }
            }
        }
    }
    .await;
    scroll.close().await;
    result?;
    tx.commit()
        .await
        .with_context(|| format!("table {name}: ending the read's transaction"))?;
    info!(table = %name, documents = report.documents, elapsed_ms = started.elapsed().as_millis() as u64, "audit: documents pass done");
    Ok(candidates)
}
