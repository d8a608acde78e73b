//! The apply path: writes -> one `_bulk` request -> an outcome per write.
//! This is the only code that writes documents; replay reuses it.
//!
//! - Every document write and delete carries `version = commit LSN` with
//!   `version_type=external_gte`, so a stale, repeated or replayed write is a
//!   version conflict (counted as stale), never an overwrite.
//! - Inside one call, writes of the same document collapse to the last one
//!   (per-key order is the input order). A truncate is a barrier: what comes
//!   before it is applied first.
//! - An update that did not carry unchanged TOAST fields takes them from an
//!   earlier write of the same call, else from the current document (a
//!   realtime multi-get), and then writes the whole document at its version.
//!   If a newer write lands in between, ours is a version conflict, so the
//!   old value can never come back over a newer one. With no current
//!   document the fields stay absent and `_tidemark.incomplete` lists them,
//!   so audit reports the document as stale and replay can repair it.
//! - What each answer means is decided in `answer`, nowhere here. Writes
//!   that must wait (index closed, blocked or missing, credentials refused,
//!   429, 5xx, no answer, a strict mapping refusing a field: see `answer`)
//!   are retried with exponential backoff (`backon`), forever, in order,
//!   until they succeed or the caller asks to stop; meanwhile [`Blocked`]
//!   says where and why, and one log line a minute repeats it. Only a
//!   document that is wrong in itself comes back as `Rejected` with
//!   OpenSearch's reason; a caller that knows more than the answer (the
//!   consumer: whether the column changed type) is asked first
//!   ([`Refusals`]) and may make it wait instead. A whole request refused for one unknown document
//!   (413, an invalid id) is split in halves until that document is found,
//!   and the rest is applied.
//!
//! Files: `bulk` (the request body), `wait` (waiting out a stall), `stats`
//! (what is reported), this file (the apply loop and TOAST fills).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use backon::ExponentialBuilder;
use bytes::{BufMut, Bytes, BytesMut};
use tidemark_schemas::{Row, Version};
use tokio::sync::watch;
use tracing::debug;

use crate::answer::{self, Cause, Item, Request, Stall};
use crate::mapping::Write;
use crate::search::{Search, SearchError};

mod bulk;
mod stats;
mod wait;
pub use bulk::*;
pub use stats::*;
use wait::Waiting;

/// What became of one write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// OpenSearch holds it, and did this.
    Applied(Effect),
    /// A later write of the same document in the same call replaced it.
    Superseded,
    /// The index already had this version or a newer one.
    Stale,
    /// OpenSearch refused it and retrying cannot help; the reason is
    /// OpenSearch's.
    Rejected(String),
}

/// What an applied write did to its document, as OpenSearch answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    Created,
    Updated,
    Deleted,
    /// A versioned delete of an absent document: only its tombstone (the
    /// version) is recorded.
    WasAbsent,
    /// A truncate, or an answer without a known result.
    Other,
}

/// The caller asked to stop while OpenSearch was still being retried;
/// nothing after the last successful write is known to be applied.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("stopped while retrying OpenSearch")]
pub struct Interrupted;

/// Asked about a document OpenSearch refused as wrong in itself, before it
/// is rejected: a stall when the refusal is not the record's fault after
/// all, so the write waits (and is retried, in order) instead of going to
/// the dead-letter topic. `None` keeps it a bad record.
pub trait Refusals: Send + Sync + std::fmt::Debug {
    /// `index` is the write's (the config's name), `reason` OpenSearch's
    /// (`answer::reason`), `version` the write's.
    fn judge<'a>(
        &'a self,
        index: &'a str,
        reason: &'a str,
        version: Version,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<Stall>> + Send + 'a>>;
}

/// Applies writes to OpenSearch.
#[derive(Debug, Clone)]
pub struct Applier {
    search: Arc<Search>,
    stats: Arc<ApplyStats>,
    refusals: Option<Arc<dyn Refusals>>,
    backoff: ExponentialBuilder,
    /// At most this many bytes of unchanged TOAST values are fetched from
    /// the index before the writes that need them are sent (see
    /// [`Applier::with_fill_budget`]).
    fill_budget: usize,
}

/// How many documents the first TOAST multi-get of a part asks for; later
/// ones are sized from the bytes per document seen so far, within the
/// budget, up to [`FILL_CHUNK_MAX`].
const FILL_CHUNK_FIRST: usize = 8;
/// The most documents one TOAST multi-get asks for.
const FILL_CHUNK_MAX: usize = 1_000;

/// A write ready to send: its input position, its index (a position in
/// the segment's list of indices) and its bulk lines.
struct Prepared {
    input: usize,
    index: usize,
    lines: Bytes,
    /// A copy for an index a reindex fills (`crate::alias`): its answer
    /// never decides the write's outcome, but it is waited for like any.
    shadow: bool,
    version: Version,
    /// The document's id and whether this is a delete: what a copy needs
    /// if one is made after the write was prepared (see [`Applier::remark`]).
    id: String,
    delete: bool,
}

impl Applier {
    pub fn new(search: Arc<Search>, stats: Arc<ApplyStats>) -> Applier {
        Applier {
            search,
            stats,
            backoff: ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_secs(10))
                .with_jitter()
                .without_max_times(),
            fill_budget: tidemark_schemas::config::DEFAULT_BATCH_MAX_BYTES,
            refusals: None,
        }
    }

    /// Asks `refusals` about every document refused as wrong in itself
    /// before rejecting it (see [`Refusals`]).
    pub fn with_refusals(mut self, refusals: Arc<dyn Refusals>) -> Applier {
        self.refusals = Some(refusals);
        self
    }

    /// Bounds the unchanged TOAST values held at once: writes are filled
    /// and sent in parts, each cut once the values fetched for it reach
    /// `bytes` (the consumer passes `consumer.batch_max_bytes`, so a batch
    /// of updates to rows with huge TOASTed values holds about one batch of
    /// them, not all). A single document larger than that is still fetched
    /// whole.
    pub fn with_fill_budget(mut self, bytes: usize) -> Applier {
        self.fill_budget = bytes.max(1);
        self
    }

    pub fn stats(&self) -> &Arc<ApplyStats> {
        &self.stats
    }

    /// Applies `writes` in order and returns one outcome per write. Returns
    /// `Interrupted` only when `stop` turned true while OpenSearch was
    /// failing; then none of the outcomes can be trusted.
    pub async fn apply(
        &self,
        writes: Vec<Write>,
        stop: &watch::Receiver<bool>,
    ) -> Result<Vec<Outcome>, Interrupted> {
        let mut outcomes = vec![Outcome::Applied(Effect::Other); writes.len()];
        let mut segment: Vec<(usize, Write)> = Vec::new();
        for (i, write) in writes.into_iter().enumerate() {
            if let Write::Truncate { index, version } = &write {
                self.apply_segment(std::mem::take(&mut segment), &mut outcomes, stop)
                    .await?;
                self.truncate(index, *version, stop).await?;
                let marked = self
                    .retry(index, stop, || self.search.marked(index))
                    .await?;
                for shadow in &marked {
                    self.truncate(shadow, *version, stop).await?;
                }
                outcomes[i] = Outcome::Applied(Effect::Other);
            } else {
                segment.push((i, write));
            }
        }
        self.apply_segment(segment, &mut outcomes, stop).await?;
        Ok(outcomes)
    }

    async fn apply_segment(
        &self,
        segment: Vec<(usize, Write)>,
        outcomes: &mut [Outcome],
        stop: &watch::Receiver<bool>,
    ) -> Result<(), Interrupted> {
        if segment.is_empty() {
            return Ok(());
        }
        // Collapse to the newest write per document (the highest version,
        // the later of equals), carrying TOAST fields forward from earlier
        // writes of the same document. The newest is the last one, except
        // after a table was sent again (a schema change): its snapshot
        // events outrank the changes at or below their LSN that follow them,
        // which OpenSearch would refuse as stale anyway.
        let mut last: HashMap<(String, String), usize> = HashMap::new();
        let mut slots: Vec<Option<(usize, Write)>> = Vec::with_capacity(segment.len());
        for (input, mut write) in segment {
            // Truncates never reach a segment: apply() splits on them.
            let Some(doc) = write.document() else {
                continue;
            };
            if let Some(&prev) = last.get(&doc)
                && let Some((_, prev_write)) = &slots[prev]
                && prev_write.version() > write.version()
            {
                outcomes[input] = Outcome::Stale;
                continue;
            }
            if let Some(prev) = last.insert(doc, slots.len())
                && let Some((prev_input, prev_write)) = slots[prev].take()
            {
                outcomes[prev_input] = Outcome::Superseded;
                carry_toast(&prev_write, &mut write);
            }
            slots.push(Some((input, write)));
        }
        let mut survivors: Vec<(usize, Write)> = slots.into_iter().flatten().collect();
        // A batch mostly writes one index or a few: a linear search is cheap.
        let mut indices: Vec<String> = Vec::new();
        // Filled and sent a part at a time (each document is in one part
        // only, so per-key order holds): see `with_fill_budget`.
        let mut start = 0;
        while start < survivors.len() {
            let end = start
                + self
                    .fill_toast_from_index(&mut survivors[start..], stop)
                    .await?;
            let part = &mut survivors[start..end];
            let mut prepared: Vec<Prepared> = part
                .iter()
                .map(|(input, write)| Prepared {
                    input: *input,
                    index: position(&mut indices, write.index()),
                    lines: bulk_lines(write, &self.stats),
                    shadow: false,
                    version: write.version(),
                    id: write_id(write).to_owned(),
                    delete: matches!(write, Write::Delete { .. }),
                })
                .collect();
            // Each write also goes to the index a reindex of its index is
            // filling, through its mark, read at most
            // `alias::MARKS_MAX_AGE` ago: the rule `crate::alias` promises.
            // (written index, its mark, the indices behind the mark)
            let mut marks: Vec<(usize, usize, Vec<usize>)> = Vec::new();
            let written: Vec<usize> = {
                let mut seen: Vec<usize> = prepared.iter().map(|p| p.index).collect();
                seen.sort_unstable();
                seen.dedup();
                seen
            };
            for at in written {
                let name = indices[at].clone();
                let marked = self
                    .retry(&name, stop, || self.search.marked(&name))
                    .await?;
                if !marked.is_empty() {
                    let mark = position(&mut indices, &crate::alias::mark(&name));
                    let behind = marked.iter().map(|m| position(&mut indices, m)).collect();
                    marks.push((at, mark, behind));
                }
            }
            if !marks.is_empty() {
                let mut copies = Vec::new();
                for (p, (_, write)) in prepared.iter().zip(part.iter()) {
                    let Some((_, mark, behind)) = marks.iter().find(|(at, ..)| *at == p.index)
                    else {
                        continue;
                    };
                    let targets = match write {
                        Write::Delete { .. } => behind.clone(),
                        _ => vec![*mark],
                    };
                    for target in targets {
                        copies.push(Prepared {
                            input: p.input,
                            index: target,
                            lines: retarget(&p.lines, write, &indices[target]),
                            shadow: true,
                            version: p.version,
                            id: p.id.clone(),
                            delete: p.delete,
                        });
                    }
                }
                prepared.extend(copies);
            }

            // The lines hold the documents now; the fields can go.
            for (_, write) in part.iter_mut() {
                if let Write::Index { fields, .. } = write {
                    *fields = Row::new();
                }
            }
            self.send(prepared, &mut indices, outcomes, stop).await?;
            start = end;
        }
        Ok(())
    }

    /// Takes unchanged TOAST fields from the current documents, for a
    /// prefix of `writes`: stops once the values fetched reach the fill
    /// budget and returns how many writes, from the first, are ready.
    async fn fill_toast_from_index(
        &self,
        writes: &mut [(usize, Write)],
        stop: &watch::Receiver<bool>,
    ) -> Result<usize, Interrupted> {
        let needs = |w: &Write| matches!(w, Write::Index { missing, .. } if !missing.is_empty());
        let mut fetched = 0usize;
        let mut docs_fetched = 0usize;
        let mut chunk = FILL_CHUNK_FIRST;
        let mut next = 0;
        while next < writes.len() {
            // The next run of writes to one index that need values, at most
            // `chunk` of them; writes that need nothing ride along.
            let Some(first) = (next..writes.len()).find(|&n| needs(&writes[n].1)) else {
                return Ok(writes.len());
            };
            let index = writes[first].1.index().to_owned();
            let mut group = Vec::new();
            let mut end = first;
            while end < writes.len() && group.len() < chunk {
                let write = &writes[end].1;
                if needs(write) {
                    if write.index() != index {
                        break;
                    }
                    group.push(end);
                }
                end += 1;
            }
            let mut ids = Vec::with_capacity(group.len());
            let mut fields: Vec<String> = Vec::new();
            for &n in &group {
                if let (_, Write::Index { id, missing, .. }) = &writes[n] {
                    ids.push(id.clone());
                    for field in missing {
                        if !fields.contains(field) {
                            fields.push(field.clone());
                        }
                    }
                }
            }
            let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
            let field_refs: Vec<&str> = fields.iter().map(String::as_str).collect();
            let (current, bytes) = self
                .retry(&index, stop, || {
                    self.search.current_fields(&index, &id_refs, &field_refs)
                })
                .await?;
            for &n in &group {
                if let (
                    _,
                    Write::Index {
                        id,
                        fields,
                        missing,
                        ..
                    },
                ) = &mut writes[n]
                    && let Some(doc) = current.get(id.as_str())
                {
                    missing.retain(|field| match doc.get(field) {
                        Some(value) => {
                            fields.insert(field.clone(), value.clone());
                            false
                        }
                        None => true,
                    });
                }
            }
            drop(current);
            fetched += bytes;
            docs_fetched += group.len();
            next = end;
            if fetched >= self.fill_budget {
                return Ok(next);
            }
            let per_doc = (fetched / docs_fetched).max(1);
            chunk = ((self.fill_budget - fetched) / per_doc).clamp(1, FILL_CHUNK_MAX);
        }
        Ok(writes.len())
    }

    /// Sends prepared writes until every one has an outcome: writes that
    /// must wait are sent again, in order, after a pause.
    async fn send(
        &self,
        mut pending: Vec<Prepared>,
        indices: &mut Vec<String>,
        outcomes: &mut [Outcome],
        stop: &watch::Receiver<bool>,
    ) -> Result<(), Interrupted> {
        let mut waiting = Waiting::new(self);
        // Writes whose copy to a marked index landed (see `crate::alias`
        // for what that allows a write the index refuses for a column's
        // type change).
        let mut copied: std::collections::HashSet<usize> = std::collections::HashSet::new();
        while !pending.is_empty() {
            let mut body = BytesMut::with_capacity(pending.iter().map(|p| p.lines.len()).sum());
            for p in &pending {
                body.put_slice(&p.lines);
            }
            let started = Instant::now();
            let result = self.search.bulk(body.freeze()).await;
            self.stats.observe(started.elapsed());
            let items = match result {
                Ok(items) if items.len() == pending.len() => items,
                Ok(items) => {
                    let stall = answer::unreachable(format!(
                        "bulk answer has {} items for {} writes",
                        items.len(),
                        pending.len()
                    ));
                    waiting.wait(&[("", stall)], pending.len(), stop).await?;
                    continue;
                }
                Err(SearchError::Transport(e)) => {
                    let stall = answer::unreachable(e);
                    waiting.wait(&[("", stall)], pending.len(), stop).await?;
                    continue;
                }
                Err(SearchError::Status { status, body }) => {
                    match answer::request(status, &body, pending.len()) {
                        Request::Split => {
                            // One document spoils the request: send the
                            // halves apart, in order, until it is alone.
                            debug!(
                                status,
                                writes = pending.len(),
                                "bulk refused as a whole; splitting it"
                            );
                            let second = pending.split_off(pending.len() / 2);
                            Box::pin(self.send(pending, &mut *indices, outcomes, stop)).await?;
                            pending = second;
                        }
                        Request::BadRecord(reason) => {
                            for p in pending.drain(..) {
                                if p.shadow {
                                    shadow_refused(&indices[p.index], &reason);
                                } else {
                                    outcomes[p.input] = Outcome::Rejected(reason.clone());
                                }
                            }
                        }
                        Request::Wait(stall) => {
                            waiting.wait(&[("", stall)], pending.len(), stop).await?;
                        }
                    }
                    continue;
                }
            };
            self.stats.opensearch_up.store(true, Ordering::Relaxed);
            self.stats.blocked.clear("");
            let mut answered: Vec<(Prepared, Item)> = pending
                .into_iter()
                .zip(items)
                .map(|(p, item)| {
                    let verdict = if p.shadow && answer::mark_gone(item.status, item.error.as_ref())
                    {
                        Item::Applied(None)
                    } else {
                        answer::item(item.status, item.result.as_deref(), item.error.as_ref())
                    };
                    (p, verdict)
                })
                .collect();
            copied.extend(
                answered
                    .iter()
                    .filter(|(p, v)| {
                        p.shadow && matches!(v, Item::Applied(_) | Item::WasAbsent | Item::Stale)
                    })
                    .map(|(p, _)| p.input),
            );
            let mut retyped: Vec<usize> = Vec::new();
            if let Some(refusals) = &self.refusals {
                for (p, verdict) in &mut answered {
                    if let (false, Item::BadRecord(reason)) = (p.shadow, &*verdict)
                        && let Some(stall) =
                            refusals.judge(&indices[p.index], reason, p.version).await
                    {
                        *verdict = if stall.cause == Cause::ColumnTypeChanged
                            && copied.contains(&p.input)
                        {
                            Item::Applied(None)
                        } else {
                            if stall.cause == Cause::ColumnTypeChanged {
                                retyped.push(p.input);
                            }
                            Item::Wait(stall)
                        };
                    }
                }
            }
            // A document created (or a tombstone recorded) in an index that
            // was deleted and made again behind our back is not committed.
            // One uuid look-up per index and bulk, not per document: per
            // document, a bulk of 10,000 creates cost 10,000 requests (the
            // consumer bench's (b) fell from 0.97 to 0.18 of OpenSearch's
            // own rate).
            let mut stalls: Vec<(&str, Stall)> = Vec::new();
            let mut checked: Vec<&str> = Vec::new();
            for (p, verdict) in &answered {
                let creates = matches!(verdict, Item::WasAbsent)
                    || matches!(verdict, Item::Applied(Some(r)) if r == "created");
                let index = indices[p.index].as_str();
                let check = creates || self.search.found_replaced(index).is_some();
                if check && !checked.contains(&index) {
                    checked.push(index);
                    if let Err(stall) = self.search.same_index(index).await {
                        stalls.push((index, stall));
                    }
                }
            }
            let replaced = stalls.len();
            let mut retry = Vec::new();
            for (p, verdict) in answered {
                let index = indices[p.index].as_str();
                if stalls[..replaced].iter().any(|(i, _)| *i == index) {
                    retry.push(p);
                    continue;
                }
                let outcome = match verdict {
                    Item::Applied(result) => Outcome::Applied(match result.as_deref() {
                        Some("created") => Effect::Created,
                        Some("updated") => Effect::Updated,
                        Some("deleted") => Effect::Deleted,
                        _ => Effect::Other,
                    }),
                    Item::WasAbsent => Outcome::Applied(Effect::WasAbsent),
                    Item::Stale => Outcome::Stale,
                    Item::BadRecord(reason) => Outcome::Rejected(reason),
                    Item::Wait(stall) => {
                        if !stalls.iter().any(|(i, _)| *i == index) {
                            stalls.push((index, stall));
                        }
                        retry.push(p);
                        continue;
                    }
                };
                if p.shadow {
                    if let Outcome::Rejected(reason) = &outcome {
                        shadow_refused(index, reason);
                    }
                    continue;
                }
                outcomes[p.input] = outcome;
            }
            for index in indices.iter() {
                if !stalls.iter().any(|(i, _)| i == index) {
                    self.stats.blocked.clear(index);
                }
            }
            if !retry.is_empty() {
                waiting.wait(&stalls, retry.len(), stop).await?;
            }
            pending = retry;
            if !retyped.is_empty() {
                self.remark(&mut pending, &retyped, indices, &copied, stop)
                    .await?;
            }
        }
        waiting.resolved();
        Ok(())
    }

    /// Gives the writes of `inputs` (waiting for a column's type change)
    /// that have no copy yet one to the index a reindex of their index
    /// fills, when one is marked now: they were prepared before the mark
    /// was placed, and they wait until a copy lands (`crate::alias`).
    async fn remark(
        &self,
        pending: &mut Vec<Prepared>,
        inputs: &[usize],
        indices: &mut Vec<String>,
        copied: &std::collections::HashSet<usize>,
        stop: &watch::Receiver<bool>,
    ) -> Result<(), Interrupted> {
        let has_copy: std::collections::HashSet<usize> = pending
            .iter()
            .filter(|p| p.shadow)
            .map(|p| p.input)
            .chain(copied.iter().copied())
            .collect();
        let waiting: Vec<usize> = (0..pending.len())
            .filter(|&i| {
                let p = &pending[i];
                !p.shadow && inputs.contains(&p.input) && !has_copy.contains(&p.input)
            })
            .collect();
        let mut names: Vec<usize> = waiting.iter().map(|&i| pending[i].index).collect();
        names.sort_unstable();
        names.dedup();
        let mut copies = Vec::new();
        for at in names {
            let name = indices[at].clone();
            let marked = self
                .retry(&name, stop, || self.search.marked(&name))
                .await?;
            if marked.is_empty() {
                continue;
            }
            let mark = position(indices, &crate::alias::mark(&name));
            let behind: Vec<usize> = marked.iter().map(|m| position(indices, m)).collect();
            for &i in waiting.iter().filter(|&&i| pending[i].index == at) {
                let p = &pending[i];
                let targets = if p.delete { behind.clone() } else { vec![mark] };
                for target in targets {
                    copies.push(Prepared {
                        input: p.input,
                        index: target,
                        lines: retarget_to(&p.lines, &p.id, p.version, p.delete, &indices[target]),
                        shadow: true,
                        version: p.version,
                        id: p.id.clone(),
                        delete: p.delete,
                    });
                }
            }
        }
        pending.extend(copies);
        Ok(())
    }

    async fn truncate(
        &self,
        index: &str,
        version: Version,
        stop: &watch::Receiver<bool>,
    ) -> Result<(), Interrupted> {
        let deleted = self
            .retry(index, stop, || {
                self.search.delete_older_than(index, version.get())
            })
            .await?;
        tracing::info!(index, version = version.get(), deleted, "truncate applied");
        Ok(())
    }

    /// Runs a request on `index` until it succeeds, waiting out every
    /// failure: the apply path never skips (a read or a truncate that
    /// cannot run is a stall, never a bad record).
    async fn retry<T, F, Fut>(
        &self,
        index: &str,
        stop: &watch::Receiver<bool>,
        mut request: F,
    ) -> Result<T, Interrupted>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, SearchError>>,
    {
        let mut waiting = Waiting::new(self);
        loop {
            match request().await {
                Ok(value) => {
                    self.stats.opensearch_up.store(true, Ordering::Relaxed);
                    self.stats.blocked.clear(index);
                    waiting.resolved();
                    return Ok(value);
                }
                Err(e) => {
                    let stall = match e {
                        SearchError::Transport(detail) => answer::unreachable(detail),
                        SearchError::Status { status, body } => {
                            match answer::request(status, &body, 0) {
                                Request::Wait(stall) => stall,
                                Request::Split | Request::BadRecord(_) => Stall {
                                    cause: Cause::RequestRefused,
                                    detail: format!("{status} {body}"),
                                },
                            }
                        }
                    };
                    waiting.wait(&[(index, stall)], 1, stop).await?;
                }
            }
        }
    }

    async fn pause(
        &self,
        delays: &mut impl Iterator<Item = Duration>,
        stop: &watch::Receiver<bool>,
    ) -> Result<(), Interrupted> {
        self.stats.retries.fetch_add(1, Ordering::Relaxed);
        let delay = delays.next().unwrap_or(Duration::from_secs(10));
        let mut stop = stop.clone();
        if *stop.borrow() {
            return Err(Interrupted);
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => Ok(()),
            _ = stop.wait_for(|s| *s) => Err(Interrupted),
        }
    }
}

/// The position of `index` in `indices`, added if it is not there (a batch
/// mostly writes one index or a few: a linear search is cheap).
fn position(indices: &mut Vec<String>, index: &str) -> usize {
    match indices.iter().position(|i| i == index) {
        Some(n) => n,
        None => {
            indices.push(index.to_owned());
            indices.len() - 1
        }
    }
}

/// A copy for an index a reindex fills was refused: its mapping differs
/// from the live index's. The write's outcome is the live index's; the
/// reindex's audit of the new index reports the document before any swap.
fn shadow_refused(index: &str, reason: &str) {
    tracing::warn!(
        index,
        reason,
        "the index a reindex fills refused a write; the reindex's audit will report it"
    );
}

/// Moves TOAST values the later write lacks from the earlier write.
fn carry_toast(earlier: &Write, later: &mut Write) {
    if let (
        Write::Index {
            fields: old_fields, ..
        },
        Write::Index {
            fields, missing, ..
        },
    ) = (earlier, later)
    {
        missing.retain(|field| match old_fields.get(field) {
            Some(value) => {
                fields.insert(field.clone(), value.clone());
                false
            }
            None => true,
        });
    }
}

/// A document write's id (a truncate has none).
fn write_id(write: &Write) -> &str {
    match write {
        Write::Index { id, .. } | Write::Delete { id, .. } => id,
        Write::Truncate { .. } => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::content_hash;
    use serde_json::{Value, json};
    use tidemark_schemas::Lsn;
    use tidemark_schemas::config::META_FIELD;

    fn index_write(id: &str, version: u64, fields: Value, missing: &[&str]) -> Write {
        let Value::Object(fields) = fields else {
            panic!("fields must be an object")
        };
        Write::Index {
            index: "i".into(),
            id: id.into(),
            version: Version::of_commit(1, Lsn(version)).expect("a version"),
            fields,
            missing: missing.iter().map(|s| s.to_string()).collect(),
            key: Row::new(),
            commit_time: "2026-11-22T10:00:00.000000Z".into(),
        }
    }

    #[test]
    fn document_line_is_fields_plus_metadata() {
        let stats = ApplyStats::default();
        let mut write = index_write(
            "7",
            0x20,
            json!({"title": "a", "_tidemark": "a column by our name"}),
            &["body"],
        );
        if let Write::Index { key, .. } = &mut write {
            key.insert("id".into(), json!(7));
        }
        let text = String::from_utf8(bulk_lines(&write, &stats).to_vec()).expect("utf8");
        let document: Value =
            serde_json::from_str(text.lines().nth(1).expect("document line")).expect("json");
        let Value::Object(fields) = json!({"title": "a", "_tidemark": "a column by our name"})
        else {
            panic!()
        };
        assert_eq!(
            document,
            json!({
                "title": "a",
                "_tidemark": {
                    "version": 0x20,
                    "lsn": "0/20",
                    "commit_time": "2026-11-22T10:00:00.000000Z",
                    "hash": content_hash(&fields),
                    "id": "7",
                    "key": {"id": 7},
                    "incomplete": ["body"],
                }
            })
        );
        assert_eq!(stats.incomplete_toast.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn toast_values_carry_forward_from_an_earlier_write() {
        let earlier = index_write("1", 10, json!({"body": "big", "title": "a"}), &[]);
        let mut later = index_write("1", 11, json!({"title": "b"}), &["body"]);
        carry_toast(&earlier, &mut later);
        let Write::Index {
            fields, missing, ..
        } = later
        else {
            panic!()
        };
        assert_eq!(Value::Object(fields), json!({"body": "big", "title": "b"}));
        assert!(missing.is_empty());
    }

    #[test]
    fn bulk_lines_carry_version_metadata_and_hash() {
        let stats = ApplyStats::default();
        let write = index_write("7", 0x1_0000_0000, json!({"title": "a"}), &[]);
        let text = String::from_utf8(bulk_lines(&write, &stats).to_vec()).expect("utf8");
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect();
        assert_eq!(
            lines[0],
            json!({"index": {"_index": "i", "_id": "7", "version": 4294967296u64, "version_type": "external_gte"}})
        );
        assert_eq!(lines[1]["title"], "a");
        assert_eq!(lines[1][META_FIELD]["version"], 4294967296u64);
        assert_eq!(lines[1][META_FIELD]["lsn"], "1/0");
        let Value::Object(fields) = json!({"title": "a"}) else {
            panic!()
        };
        assert_eq!(lines[1][META_FIELD]["hash"], content_hash(&fields));
        let delete = Write::Delete {
            index: "i".into(),
            id: "7".into(),
            version: Version::of_commit(1, Lsn(5)).expect("a version"),
        };
        assert_eq!(
            String::from_utf8(bulk_lines(&delete, &stats).to_vec()).expect("utf8"),
            "{\"delete\":{\"_id\":\"7\",\"_index\":\"i\",\"version\":5,\"version_type\":\"external_gte\"}}\n"
        );
    }

    #[test]
    fn a_copy_for_a_reindex_goes_only_through_the_mark_alias() {
        let stats = ApplyStats::default();
        let write = index_write("7", 0x1_0000_0000, json!({"title": "a"}), &[]);
        let lines = bulk_lines(&write, &stats);
        let copy = String::from_utf8(bulk::retarget(&lines, &write, "i-2").to_vec()).expect("utf8");
        let original = String::from_utf8(lines.to_vec()).expect("utf8");
        assert_eq!(
            copy,
            original.replacen(
                "\"_index\":\"i\",\"version\":4294967296,\"version_type\":\"external_gte\"",
                "\"_index\":\"i-2\",\"version\":4294967296,\"version_type\":\"external_gte\",\"require_alias\":true",
                1
            )
        );
        let delete = Write::Delete {
            index: "i".into(),
            id: "7".into(),
            version: Version::of_commit(1, Lsn(5)).expect("a version"),
        };
        let lines = bulk_lines(&delete, &stats);
        assert_eq!(
            String::from_utf8(bulk::retarget(&lines, &delete, "i-2").to_vec()).expect("utf8"),
            "{\"delete\":{\"_id\":\"7\",\"_index\":\"i-2\",\"version\":5,\"version_type\":\"external_gte\"}}\n"
        );
    }
}
