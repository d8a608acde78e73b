//! Source mode, the one engine for writes read from PostgreSQL: rows read
//! at an exported snapshot and written at its version through the index
//! layer's apply path, vanished keys re-checked (see the parent module).

use crate::error::{Context, ReplayError, Result};
use std::collections::HashMap;
use std::time::{Duration, Instant};

use tidemark_index::apply::{Applier, Effect, Outcome};
use tidemark_index::mapping::{TableMapping, Write, content_hash};
use tidemark_index::reads::{doc_content_meta, doc_meta, doc_meta_searched, refresh};
use tidemark_index::search::Search;
use tidemark_schemas::{Row, Version};
use tokio::sync::watch;
use tokio_postgres::Client;
use tracing::info;

use super::verify::{AtSnapshot, verify};
use super::{Class, TableResult, WindowKeys};
use crate::audit::{Described, describe, keys_without_rows, rows_by_keys, sample_row_bytes};
use crate::progress::Progress;

/// Keys read and written per round trip, at most.
pub(crate) const CHUNK: usize = 10_000;
/// Row text one chunk may hold, at most: chunks are cut at `CHUNK` keys or
/// at this many bytes of rows, whichever comes first, so wide rows do not
/// make a chunk (up to three are alive at once, each as row text, mapped
/// values and a bulk body) take hundreds of MB. 8 MiB is also a good bulk
/// request size for OpenSearch.
pub(crate) const CHUNK_BYTES: usize = 8 << 20;
/// Even the widest rows go at least this many to a chunk.
pub(crate) const MIN_CHUNK: usize = 8;

/// Keys per chunk for rows of about `row_bytes` each.
pub(crate) fn keys_per_chunk(row_bytes: usize) -> usize {
    (CHUNK_BYTES / row_bytes.max(1)).clamp(MIN_CHUNK, CHUNK)
}
/// Below this many writes per request, splitting a chunk in two costs more
/// round trips than it gains.
pub(crate) const MIN_CONCURRENT_BULK: usize = 500;
/// Keys listed per class in a report.
pub(crate) const SAMPLE: usize = 10;

/// One key's write, planned.
#[derive(Debug)]
pub(crate) struct Planned {
    pub(crate) id: String,
    /// The write at the snapshot's version.
    pub(crate) write: Write,
    /// Its class against the index, where that is known before writing.
    pub(crate) class: Option<Class>,
    /// The content hash of the row at the snapshot (`None`: no row).
    pub(crate) hash: Option<String>,
}

/// Reads the keys' rows at `snapshot` (an exported snapshot name) and
/// plans each key's write (see [`Planned`]).
///
/// A dry run classifies every key by looking its document up. A real run
/// (`write`) only looks for the documents already right (those whose hash
/// is the row's, a search that finds nothing to fetch in an incident) and
/// learns the other classes from what OpenSearch answers to the writes
/// (see [`class_of`]): the lookup of every document cost OpenSearch about
/// as much CPU as a tenth of the writes.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn plan(
    client: &mut Client,
    snapshot: &str,
    d: &Described,
    mapping: &TableMapping,
    search: &Search,
    keys: &[(String, Row)],
    at: tidemark_postgres::Point,
    commit_time: &str,
    write: bool,
    by_content: bool,
) -> Result<Vec<Planned>> {
    let started = Instant::now();
    let version = Version::of_snapshot(at.timeline, at.lsn)?;
    let key_rows: Vec<&Row> = keys.iter().map(|(_, k)| k).collect();
    let ids: Vec<&str> = keys.iter().map(|(id, _)| id.as_str()).collect();
    let read = async {
        let tx = client.transaction().await.with_context(|| {
            format!("table {}: cannot begin a transaction", d.table.qualified())
        })?;

        tx.batch_execute(&format!(
            "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT '{}'",
            snapshot.replace('\'', "''")
        ))
        .await
        .with_context(|| format!("table {}: cannot read at snapshot {snapshot}", d.table.qualified()))?;
        let rows = rows_by_keys(&tx, d, mapping, &key_rows).await?;
        tx.commit().await.with_context(|| {
            format!(
                "table {}: cannot end the snapshot's transaction",
                d.table.qualified()
            )
        })?;

        Ok::<_, ReplayError>(rows)
    };
    // Documents as of the refresh at the start of the run (see `run_table`).
    let (mut rows, docs) = if by_content {
        // Judged by what each document holds, not by the hash it says it
        // holds (`audit --deep` found writes that bypassed Tidemark): read
        // realtime, with sources.
        let lookup =
            async { Ok::<_, ReplayError>(doc_content_meta(search, &mapping.index, &ids).await?) };
        let (rows, docs) = tokio::try_join!(read, lookup)?;
        (documents(mapping, rows), docs)
    } else if write {
        let documents = documents(mapping, read.await?);
        let hashes: Vec<&str> = documents.values().map(|(_, hash)| hash.as_str()).collect();
        let docs = doc_meta_searched(search, &mapping.index, &ids, false, Some(&hashes)).await?;
        (documents, docs)
    } else {
        // The rows and the documents of the chunk are asked for at once.
        let lookup = async {
            Ok::<_, ReplayError>(
                doc_meta_searched(search, &mapping.index, &ids, false, None).await?,
            )
        };
        let (rows, mut docs) = tokio::try_join!(read, lookup)?;
        // A key whose row is gone is deleted only if its document exists;
        // one written since the refresh (or after a failed refresh) is not
        // in the search's view, so those few keys are asked realtime.
        let unseen: Vec<&str> = ids
            .iter()
            .copied()
            .filter(|id| !rows.contains_key(*id) && !docs.contains_key(*id))
            .collect();
        if !unseen.is_empty() {
            docs.extend(doc_meta(search, &mapping.index, &unseen).await?);
        }
        (documents(mapping, rows), docs)
    };
    tracing::debug!(table = %mapping.qualified(), keys = keys.len(),
        read_and_lookup_ms = started.elapsed().as_millis() as u64, "window: chunk planned");
    let mut out = Vec::with_capacity(keys.len());
    for (id, key) in keys {
        let doc = docs.get(id.as_str());
        match rows.remove(id) {
            Some((fields, hash)) => {
                let right = doc.is_some_and(|meta| meta["hash"].as_str() == Some(hash.as_str()));
                let class = match doc {
                    _ if right => Some(Class::AlreadyRight),
                    _ if write => None,
                    None => Some(Class::Create),
                    Some(_) => Some(Class::Update),
                };
                out.push(Planned {
                    id: id.clone(),
                    write: Write::Index {
                        index: mapping.index.clone(),
                        id: id.clone(),
                        version,
                        fields,
                        missing: Vec::new(),
                        key: key.clone(),
                        commit_time: commit_time.to_owned(),
                    },
                    class,
                    hash: Some(hash),
                });
            }
            None => out.push(Planned {
                id: id.clone(),
                write: Write::Delete {
                    index: mapping.index.clone(),
                    id: id.clone(),
                    version,
                },
                class: match doc {
                    _ if write => None,
                    Some(_) => Some(Class::Delete),
                    None => Some(Class::AlreadyRight),
                },
                hash: None,
            }),
        }
    }
    Ok(out)
}

/// Each row's document fields and their content hash, by document id.
pub(crate) fn documents(
    mapping: &TableMapping,
    rows: HashMap<String, Row>,
) -> HashMap<String, (Row, String)> {
    rows.into_iter()
        .map(|(id, row)| {
            let fields = mapping.fields(&row);
            let hash = content_hash(&fields);
            (id, (fields, hash))
        })
        .collect()
}

/// The class of a real run's write, from what OpenSearch did with it;
/// `None` when the answer does not say (the write was refused: the index
/// held a newer version, or OpenSearch rejected it), and the document has
/// to be asked for. A delete of an absent document only records its
/// version, and the document was already right.
pub(crate) fn class_of(outcome: &Outcome) -> Option<Class> {
    match outcome {
        Outcome::Applied(Effect::Created) => Some(Class::Create),
        Outcome::Applied(Effect::Updated) => Some(Class::Update),
        Outcome::Applied(Effect::Deleted) => Some(Class::Delete),
        Outcome::Applied(Effect::WasAbsent) => Some(Class::AlreadyRight),
        Outcome::Applied(Effect::Other)
        | Outcome::Superseded
        | Outcome::Stale
        | Outcome::Rejected(_) => None,
    }
}

/// The class of a write (a `delete` or not) whose answer did not say,
/// from whether its document exists now, as a dry run would classify it.
pub(crate) fn class_by_document(delete: bool, exists: bool) -> Class {
    match (delete, exists) {
        (true, true) => Class::Delete,
        (true, false) => Class::AlreadyRight,
        (false, true) => Class::Update,
        (false, false) => Class::Create,
    }
}

/// Everything a run needs.
#[derive(Debug)]
pub struct Job<'a> {
    pub config: &'a tidemark_schemas::config::Config,
    pub search: &'a Search,
    pub applier: &'a Applier,
    pub write: bool,
    /// Judge documents by their content, not by their stored
    /// `_tidemark.hash` (a repair of what `audit --deep` found): a write
    /// that bypassed Tidemark leaves that hash as it was, so a document it
    /// changed would otherwise count as already right and stay as it is.
    pub by_content: bool,
}

/// Repairs (or, without `write`, classifies) one table's window keys.
pub async fn run_table(
    job: &Job<'_>,
    mapping: &TableMapping,
    found: &WindowKeys,
) -> Result<TableResult> {
    let total = found.len();
    let mut result = TableResult {
        table: mapping.qualified(),
        index: mapping.index.clone(),
        keys: total,
        events: found.events,
        truncates: found.truncates,
        short_of_kafka: found.shortfalls.clone(),
        ..TableResult::default()
    };
    if found.is_empty() {
        return Ok(result);
    }
    let prepare = Instant::now();
    let conn = tidemark_postgres::ConnInfo::from_config(job.config)?;
    let mut client = conn.connect("tidemark-replay").await?;
    let d = describe(&client, &mapping.schema, &mapping.table).await?;
    let row_bytes = sample_row_bytes(&client, &d).await?;
    tracing::debug!(table = %mapping.qualified(), row_bytes, keys_per_chunk = keys_per_chunk(row_bytes), "window: row size sampled");
    // Classifying reads documents by search (doc values), which sees what
    // the last refresh made visible: refresh once, so that every document
    // written before the run (a previous run's too) is seen. Documents the
    // live consumer writes after it carry newer versions than what they
    // replace, so a class read from the refreshed view never undoes them.
    refresh(job.search, &mapping.index).await;
    if job.write {
        job.search
            .ensure_meta_fields(&mapping.qualified(), &mapping.index)
            .await;
    }
    let slot = format!("tidemark_replay_{}", std::process::id());
    let snapshot = tidemark_postgres::export_snapshot(
        &conn,
        &tidemark_postgres::Replication::of(job.config, "tidemark-replay"),
        &slot,
    )
    .await?;
    tracing::debug!(table = %mapping.qualified(), prepare_ms = prepare.elapsed().as_millis() as u64, "window: connected, described, snapshot exported");
    let at = snapshot.point();
    result.version_lsn = Some(at.lsn.to_string());
    let now = jiff::Timestamp::now().to_string();
    let (_keep, never) = watch::channel(false);
    let started = Instant::now();
    let progress = Progress::new(&mapping.qualified(), "keys", Some(total));
    let mut last_report = Instant::now();
    // Keys written as documents go, chunk by chunk once applied, to the
    // re-check running beside the writes (step 4).
    let (to_recheck, recheck_rx) = tokio::sync::mpsc::channel::<Vec<(String, Row)>>(RECHECK_QUEUE);
    let recheck = recheck_written(job, &conn, &d, mapping, at, recheck_rx);
    let mut wrote = AtSnapshot::default();
    let writes_done = async {
        let mut done = 0u64;
        let mut chunks = found.chunks()?;
        chunks.cap = keys_per_chunk(row_bytes);
        // Chunk i is written while chunk i + 1 is read and classified.
        let mut chunk = chunks.next_chunk()?;
        let mut planned = plan(
            &mut client,
            &snapshot.name,
            &d,
            mapping,
            job.search,
            &chunk,
            at,
            &now,
            job.write,
            job.by_content,
        )
        .await?;
        while !chunk.is_empty() {
            let next_chunk = chunks.next_chunk()?;
            let mut writes = Vec::new();
            // Per write: its document id, whether it is a delete, its key.
            let mut sent = Vec::new();
            for (planned, (_, key)) in std::mem::take(&mut planned).into_iter().zip(chunk.iter()) {
                let Planned {
                    id,
                    write,
                    class,
                    hash,
                } = planned;
                wrote.note(&id, hash.as_deref());
                if let Some(class) = class {
                    result.count(class, &id);
                }
                if job.write && class != Some(Class::AlreadyRight) {
                    sent.push((id, matches!(write, Write::Delete { .. }), key));
                    writes.push(write);
                }
            }
            let apply = async {
                if job.write && !writes.is_empty() {
                    pause_between_read_and_write().await;
                    let started = Instant::now();
                    let outcomes = apply_distinct(job.applier, writes, &never).await;
                    tracing::debug!(table = %mapping.qualified(), apply_ms = started.elapsed().as_millis() as u64, "window: chunk applied");
                    Some(outcomes)
                } else {
                    None
                }
            };
            let next = async {
                if next_chunk.is_empty() {
                    return None;
                }
                Some(
                    plan(
                        &mut client,
                        &snapshot.name,
                        &d,
                        mapping,
                        job.search,
                        &next_chunk,
                        at,
                        &now,
                        job.write,
                        job.by_content,
                    )
                    .await,
                )
            };
            let (applied, next) = tokio::join!(apply, next);
            // Documents written at V, for the re-check: only such a
            // document can outlive a later delete (a delete at V loses to
            // any later insert by version).
            let mut written = Vec::new();
            if let Some(outcomes) = applied {
                let outcomes = outcomes.with_context(|| mapping.qualified())?;
                let mut unknown = Vec::new();
                for ((id, delete, key), outcome) in sent.into_iter().zip(outcomes) {
                    match class_of(&outcome) {
                        Some(class) => result.count(class, &id),
                        None => unknown.push((id.clone(), delete)),
                    }
                    match outcome {
                        Outcome::Applied(Effect::WasAbsent) => {}
                        Outcome::Applied(_) | Outcome::Superseded => {
                            result.applied += 1;
                            if !delete {
                                written.push((id, key.clone()));
                            }
                        }
                        Outcome::Stale => result.newer_in_index += 1,
                        Outcome::Rejected(reason) => {
                            result.rejected += 1;
                            tracing::warn!(table = %mapping.qualified(), id, %reason, "document refused by OpenSearch");
                        }
                    }
                }
                if !unknown.is_empty() {
                    let ids: Vec<&str> = unknown.iter().map(|(id, _)| id.as_str()).collect();
                    let docs = doc_meta(job.search, &mapping.index, &ids).await?;
                    for (id, delete) in &unknown {
                        result.count(class_by_document(*delete, docs.contains_key(id)), id);
                    }
                }
            }
            if !written.is_empty() && to_recheck.send(written).await.is_err() {
                // The re-check ended early; its error is reported below.
                break;
            }
            if let Some(next) = next {
                planned = next?;
            }
            let chunk_len = chunk.len() as u64;
            done += chunk_len;
            chunk = next_chunk;
            progress.inc(chunk_len);
            if last_report.elapsed() >= Duration::from_secs(10) {
                last_report = Instant::now();
                let rate = done as f64 / started.elapsed().as_secs_f64().max(0.001);
                let eta = (total - done) as f64 / rate.max(1.0);
                info!(table = %mapping.qualified(), done, total, rate = rate as u64, eta_s = eta as u64, "window progress");
            }
        }
        progress.finish();
        drop(to_recheck);
        info!(table = %mapping.qualified(), keys = total, elapsed_ms = started.elapsed().as_millis() as u64, "window: keys written");
        Ok::<_, ReplayError>(result)
    };
    let (mut result, deleted_again) = tokio::try_join!(writes_done, recheck)?;
    drop(snapshot);
    result.deleted_after_recheck = deleted_again;
    if job.write {
        info!(table = %mapping.qualified(), deleted_again, elapsed_ms = started.elapsed().as_millis() as u64, "window: final re-check done");
        // Step 5: the run checks its own work, at a fresh snapshot.
        let mut chunks = found.chunks()?;
        let keys = std::iter::from_fn(|| match chunks.next_chunk() {
            Ok(chunk) if chunk.is_empty() => None,
            other => Some(other),
        });
        result.verified = Some(
            verify(
                &client,
                job.search,
                &d,
                mapping,
                keys,
                &wrote,
                job.by_content,
            )
            .await?,
        );
    }
    Ok(result)
}

/// Written chunks the re-check may fall behind by before the writes pause.
pub(crate) const RECHECK_QUEUE: usize = 2;

/// Step 4, beside the writes: once a chunk's writes have landed, reads
/// which of its keys have no row any more, at a snapshot taken after those
/// writes landed (a plain statement: nothing more is needed of it), and
/// deletes their documents again at version `V + 1`.
///
/// Why `V + 1` is right: the row existed at `V`, so its delete committed
/// after `V` and carries a commit LSN above `V`, which the live pipeline
/// applies anyway; `V + 1` beats only the document this run wrote at `V`,
/// and every change committed after that delete (a re-insert) carries a
/// higher LSN still, so it wins over this delete in whichever order the two
/// land. Returns how many documents it deleted again.
pub(crate) async fn recheck_written(
    job: &Job<'_>,
    conn: &tidemark_postgres::ConnInfo,
    d: &Described,
    mapping: &TableMapping,
    at: tidemark_postgres::Point,
    mut chunks: tokio::sync::mpsc::Receiver<Vec<(String, Row)>>,
) -> Result<u64> {
    let version = Version::of_snapshot(at.timeline, at.lsn)?.superseding();
    let (_keep, never) = watch::channel(false);
    let mut client: Option<Client> = None;
    let mut deleted = 0u64;
    while let Some(mut keys) = chunks.recv().await {
        while let Ok(more) = chunks.try_recv() {
            keys.extend(more);
        }
        let started = Instant::now();
        let client = match &mut client {
            Some(client) => client,
            None => client.insert(conn.connect("tidemark-replay-recheck").await?),
        };
        for part in keys.chunks(CHUNK) {
            let rows: Vec<&Row> = part.iter().map(|(_, key)| key).collect();
            let vanished = keys_without_rows(client, d, &rows).await?;
            if vanished.is_empty() {
                continue;
            }
            let deletes: Vec<Write> = vanished
                .iter()
                .map(|&n| Write::Delete {
                    index: mapping.index.clone(),
                    id: part[n].0.clone(),
                    version,
                })
                .collect();
            deleted += deletes.len() as u64;
            job.applier
                .apply(deletes, &never)
                .await
                .with_context(|| mapping.qualified())?;
        }
        tracing::debug!(table = %mapping.qualified(), keys = keys.len(),
            recheck_ms = started.elapsed().as_millis() as u64, "window: written keys re-checked");
    }
    Ok(deleted)
}

/// Applies writes to distinct documents as two bulk requests at once, each
/// on its own task: OpenSearch indexes on two write threads, and building
/// bodies and reading answers runs beside the planning of the next chunk.
/// (The consumer sends one request at a time because its batches keep
/// per-key order; a window has one write per key, so no order is at stake.)
/// Outcomes in input order.
pub(crate) async fn apply_distinct(
    applier: &Applier,
    mut writes: Vec<Write>,
    stop: &watch::Receiver<bool>,
) -> Result<Vec<Outcome>> {
    let spawn = |writes: Vec<Write>| {
        let applier = applier.clone();
        let stop = stop.clone();
        tokio::spawn(async move { applier.apply(writes, &stop).await })
    };
    let halves = if writes.len() < 2 * MIN_CONCURRENT_BULK {
        vec![spawn(writes)]
    } else {
        let second = writes.split_off(writes.len() / 2);
        vec![spawn(writes), spawn(second)]
    };
    let mut outcomes = Vec::new();
    for half in halves {
        let applied = half.await.context("apply task failed")?;
        outcomes.extend(applied.map_err(|_| {
            ReplayError::Interrupted("interrupted while OpenSearch was failing".to_owned())
        })?);
    }
    Ok(outcomes)
}

/// Fault injection for the race test: `TIDEMARK_REPLAY_PAUSE_BEFORE_WRITE_MS`
/// widens the gap between reading rows and writing them, so a test can
/// delete a row inside it. Unset in normal use.
pub(crate) async fn pause_between_read_and_write() {
    if let Some(ms) = std::env::var("TIDEMARK_REPLAY_PAUSE_BEFORE_WRITE_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        eprintln!("pausing {ms} ms between read and write (TIDEMARK_REPLAY_PAUSE_BEFORE_WRITE_MS)");
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}
