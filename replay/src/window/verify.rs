//! Step 5 of a real run: the engine checks its own work. Once the writes
//! and the re-check are done, every key the run was given is audited again
//! at a fresh snapshot: its current row (or its absence) against its
//! document, read by search after a refresh (see [`Read`]), and a key that
//! looks differing again realtime.
//!
//! A key that differs is not yet a failure: live writes go on. It is looked
//! at again for up to [`SETTLE`], and what still differs then is judged by
//! what the run itself wrote:
//! - the row is what it was at the run's snapshot `V` (the run wrote exactly
//!   that): the write did not hold (refused, or overwritten by someone
//!   else), and the key **still differs**: the run failed for it;
//! - the row changed after `V`: that change carries a commit LSN above `V`
//!   and is the live pipeline's to apply, so the key is counted as
//!   **changed since** and not as differing.
//!
//! The fingerprints of the rows at `V` are kept per key as two 64-bit
//! hashes (16 bytes a key), not as rows.

use crate::error::{ReplayError, Result};
use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::Serialize;
use tidemark_index::mapping::{TableMapping, content_hash};
use tidemark_index::reads::{doc_content_meta, doc_meta, doc_meta_searched, refresh};
use tidemark_index::search::Search;
use tidemark_schemas::Row;
use tokio_postgres::Client;

use crate::audit::{Described, Kind, compare, rows_by_keys};

/// How long differing keys are looked at again before they are judged.
pub(crate) const SETTLE: Duration = Duration::from_secs(5);
/// Keys listed as still differing in a report, at most.
pub(crate) const LISTED: usize = 100;
/// Keys verified per round trip.
const VERIFY_CHUNK: usize = 5_000;

/// The verdict on a run's writes, per table.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Verified {
    /// Keys whose document equals their row now.
    pub clean: u64,
    /// Keys whose row is what the run wrote and whose document does not
    /// show it: the run did not repair them.
    pub still_differ: u64,
    /// Keys whose row changed after the run's snapshot and whose document
    /// does not show that yet: the live pipeline's to apply.
    pub changed_since: u64,
    /// Up to [`LISTED`] of the keys that still differ.
    pub differing: Vec<Differing>,
}

/// A key the run did not repair: its document id and how it differs.
#[derive(Debug, Clone, Serialize)]
pub struct Differing {
    pub id: String,
    pub kind: Kind,
}

/// What each key's row was at the run's snapshot, as the run wrote it.
#[derive(Debug, Default)]
pub(crate) struct AtSnapshot(HashMap<u64, u64>);

impl AtSnapshot {
    /// Notes the content hash the run wrote for `id` (`None`: no row, a
    /// delete).
    pub(crate) fn note(&mut self, id: &str, hash: Option<&str>) {
        self.0.insert(fingerprint(id), hash.map_or(0, fingerprint));
    }

    /// Whether `id`'s current row (by its content hash) is what it was at
    /// the snapshot. A key never noted counts as changed.
    fn unchanged(&self, id: &str, hash: Option<&str>) -> bool {
        self.0.get(&fingerprint(id)) == Some(&hash.map_or(0, fingerprint))
    }
}

fn fingerprint(text: &str) -> u64 {
    // 0 stands for "no row"; a hash of 0 is moved off it.
    xxhash_rust::xxh3::xxh3_64(text.as_bytes()).max(1)
}

/// How the documents are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read {
    /// By search, from doc values, as the last refresh shows them: the
    /// first look at every key, after one refresh. A realtime multi-get of
    /// documents written moments ago makes OpenSearch refresh for them, and
    /// cost it 26 CPU-s for 100,000 keys against about 1 this way.
    Searched,
    /// Realtime, by multi-get: the keys that looked differing, again.
    Realtime,
    /// Realtime, each document's whole source hashed (`by_content`).
    Content,
}

/// How one key compares now: its drift (if any) and its row's hash. The
/// rows and the documents are read at once.
async fn look(
    client: &Client,
    search: &Search,
    d: &Described,
    mapping: &TableMapping,
    keys: &[(String, Row)],
    read: Read,
) -> Result<Vec<(Option<Kind>, Option<String>)>> {
    let key_rows: Vec<&Row> = keys.iter().map(|(_, k)| k).collect();
    let ids: Vec<&str> = keys.iter().map(|(id, _)| id.as_str()).collect();
    let documents = async {
        Ok::<_, ReplayError>(match read {
            Read::Searched => doc_meta_searched(search, &mapping.index, &ids, false, None).await?,
            Read::Realtime => doc_meta(search, &mapping.index, &ids).await?,
            Read::Content => doc_content_meta(search, &mapping.index, &ids).await?,
        })
    };
    let (rows, docs) = tokio::try_join!(rows_by_keys(client, d, mapping, &key_rows), documents)?;
    Ok(keys
        .iter()
        .map(|(id, _)| {
            let row = rows.get(id);
            (
                compare(mapping, row, docs.get(id)),
                row.map(|r| content_hash(&mapping.fields(r))),
            )
        })
        .collect())
}

/// Verifies `keys` (all the run was given) against what it wrote.
pub(crate) async fn verify(
    client: &Client,
    search: &Search,
    d: &Described,
    mapping: &TableMapping,
    keys: impl Iterator<Item = Result<Vec<(String, Row)>>>,
    wrote: &AtSnapshot,
    by_content: bool,
) -> Result<Verified> {
    let started = Instant::now();
    let mut verdict = Verified::default();
    let mut differ: Vec<(String, Row)> = Vec::new();
    let (first, again) = if by_content {
        (Read::Content, Read::Content)
    } else {
        // Every write of the run is visible to search after this.
        refresh(search, &mapping.index).await;
        (Read::Searched, Read::Realtime)
    };
    for chunk in keys {
        let chunk = chunk?;
        for part in chunk.chunks(VERIFY_CHUNK) {
            for ((id, key), (kind, _)) in part
                .iter()
                .zip(look(client, search, d, mapping, part, first).await?)
            {
                match kind {
                    None => verdict.clean += 1,
                    Some(_) => differ.push((id.clone(), key.clone())),
                }
            }
        }
    }
    let settle_until = Instant::now() + SETTLE;
    let mut last: Vec<(Option<Kind>, Option<String>)> = Vec::new();
    while !differ.is_empty() {
        tokio::time::sleep(Duration::from_millis(500)).await;
        last.clear();
        for part in differ.chunks(VERIFY_CHUNK) {
            last.extend(look(client, search, d, mapping, part, again).await?);
        }
        let mut kept = Vec::with_capacity(differ.len());
        let mut kept_last = Vec::with_capacity(differ.len());
        for (key, seen) in differ.drain(..).zip(last.drain(..)) {
            if seen.0.is_none() {
                verdict.clean += 1;
            } else {
                kept.push(key);
                kept_last.push(seen);
            }
        }
        differ = kept;
        last = kept_last;
        // Only a live change still on its way can make a key settle;
        // a key whose row is what the run wrote waits for nothing.
        let waiting = differ
            .iter()
            .zip(&last)
            .any(|((id, _), (_, hash))| !wrote.unchanged(id, hash.as_deref()));
        if !waiting || Instant::now() >= settle_until {
            break;
        }
    }
    for ((id, _), (kind, hash)) in differ.iter().zip(&last) {
        if wrote.unchanged(id, hash.as_deref()) {
            verdict.still_differ += 1;
            if verdict.differing.len() < LISTED {
                verdict.differing.push(Differing {
                    id: id.clone(),
                    kind: kind.unwrap_or(Kind::Stale),
                });
            }
        } else {
            verdict.changed_since += 1;
        }
    }
    tracing::info!(table = %mapping.qualified(), clean = verdict.clean,
        still_differ = verdict.still_differ, changed_since = verdict.changed_since,
        elapsed_ms = started.elapsed().as_millis() as u64, "window: writes verified");
    Ok(verdict)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_unchanged_only_with_the_hash_it_was_written_with() {
        let mut wrote = AtSnapshot::default();
        wrote.note("1", Some("abc"));
        wrote.note("2", None);
        assert!(wrote.unchanged("1", Some("abc")));
        assert!(!wrote.unchanged("1", Some("abd")), "the row changed since");
        assert!(!wrote.unchanged("1", None), "the row was deleted since");
        assert!(wrote.unchanged("2", None), "still deleted");
        assert!(!wrote.unchanged("2", Some("abc")), "inserted again since");
        assert!(!wrote.unchanged("3", None), "never written: changed");
    }
}
