//! `window`: repair a time window after an incident ("updates between 10:00
//! and 14:00 never reached search; put them back"), in source mode.
//!
//! 1. **Which rows.** Every partition of each chosen table topic is read from
//!    `offsets_for_times(from - 60 s)` (Kafka timestamps are commit times but
//!    not strictly monotonic) until its end as of the start, or until
//!    records are more than 60 s past `to`; a change counts when its
//!    envelope's commit time lies in `[from, to]`. The distinct keys (and
//!    `--key` narrows them) are what gets repaired. A window that starts
//!    before what Kafka still holds is refused unless `--allow-partial`
//!    (see `retention`): never silently shortened.
//! 2. **Read the truth.** A temporary replication slot exports a snapshot
//!    whose LSN `V` is exact; the keys' rows are read at that snapshot in
//!    chunks.
//! 3. **Write through the consumer's apply path** with version `V`: a row
//!    becomes its document, a key without a row a versioned delete. Anything
//!    the index has that is newer than `V` wins (version conflict), so
//!    nothing regresses; a delete committed after `V` has a higher LSN, so
//!    it wins too, while its tombstone lives.
//! 4. **Close the race** the tombstone cannot (`index.gc_deletes`): once a
//!    chunk's writes landed, its written keys are read again, and every one
//!    whose row vanished since `V` is deleted again at version `V + 1`
//!    (see [`recheck_written`] for why that version is right). This runs
//!    beside the writes of the next chunks, so only the last chunk's
//!    re-check is left when the writes end. A row that merely *changed* after `V`
//!    needs nothing: its change carries a commit LSN above `V` through the live pipeline,
//!    which wins over our write in whichever order the two land. Only a
//!    delete can lose that race, once its tombstone is forgotten.
//!
//! 5. **Check the work** (see `verify`): every key is audited again at a
//!    fresh snapshot; what the run wrote and does not hold fails it (exit
//!    1), a key that changed since is left to the live pipeline.
//!
//! A dry run (the default without `--yes`) writes nothing and classifies
//! each key against the index: create, update, delete, or already right.
//! A real run skips the keys already right and takes the other classes
//! from OpenSearch's answers to its writes (see [`plan`]).
//!
//! Files: `scan` (step 1, which keys), `retention` (its guard), `source`
//! (steps 2-4, the source-mode engine), `verify` (step 5), `log` (log
//! mode), this file (the classes and the report).

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

mod log;
mod retention;
mod scan;
mod source;
mod verify;
pub use log::*;
pub use retention::{Shortfall, shortfall_text};
pub use scan::*;
pub use source::*;
pub use verify::{Differing, Verified};

/// What a key needs, or needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    Create,
    Update,
    Delete,
    AlreadyRight,
}

/// Per table: counts and sample keys per class, and what writing did.
#[derive(Debug, Default, Serialize)]
pub struct TableResult {
    pub table: String,
    pub index: String,
    pub keys: u64,
    pub events: u64,
    pub truncates: u64,
    pub counts: BTreeMap<Class, u64>,
    pub samples: BTreeMap<Class, Vec<String>>,
    /// Written (real run): applied (a delete of an absent document, which
    /// only records its version, is not counted: its key was already
    /// right), or refused because the index had newer, or rejected.
    pub applied: u64,
    pub newer_in_index: u64,
    pub rejected: u64,
    /// Keys whose row vanished between the read and the end, deleted again.
    pub deleted_after_recheck: u64,
    /// The snapshot LSN the documents were written with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version_lsn: Option<String>,
    /// A real run's check of its own work (see `verify`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verified: Option<Verified>,
    /// Partitions that no longer held the window's start
    /// (`--allow-partial`): their changes before their oldest record were
    /// not repaired.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub short_of_kafka: Vec<Shortfall>,
}

impl TableResult {
    /// Keys this run was asked to repair and did not: those its
    /// verification found still differing (a refused write among them),
    /// or, unverified, the refused writes.
    pub fn unrepaired(&self) -> u64 {
        self.verified
            .as_ref()
            .map_or(self.rejected, |v| v.still_differ)
    }
}

/// Document ids as people read them: numbers by value (`8` before `10`)
/// and first, anything else after them as text (a total order).
fn id_order(a: &str, b: &str) -> std::cmp::Ordering {
    match (a.parse::<i128>(), b.parse::<i128>()) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        (Ok(_), Err(_)) => std::cmp::Ordering::Less,
        (Err(_), Ok(_)) => std::cmp::Ordering::Greater,
        (Err(_), Err(_)) => a.cmp(b),
    }
}

impl TableResult {
    /// Counts a key in its class, and keeps it as a sample of the class.
    fn count(&mut self, class: Class, id: &str) {
        *self.counts.entry(class).or_default() += 1;
        let sample = self.samples.entry(class).or_default();
        if sample.len() < SAMPLE {
            sample.push(id.to_owned());
        }
    }
}

/// The text report of a run.
pub fn render_text(results: &[TableResult], write: bool) -> String {
    let mut out = String::new();
    for r in results {
        let n = |c: Class| r.counts.get(&c).copied().unwrap_or(0);
        // Keys given (a repair, a backfill) rather than found in a window.
        let found = if r.events == 0 && r.truncates == 0 {
            format!("{} keys", r.keys)
        } else {
            format!("{} changes of {} keys in the window", r.events, r.keys)
        };
        out.push_str(&format!(
            "{} -> {}: {found}{}\n",
            r.table,
            r.index,
            if r.truncates > 0 {
                format!(
                    " ({} truncates: not repairable by key; run `tidemark-replay audit --table {}`)",
                    r.truncates, r.table
                )
            } else {
                String::new()
            }
        ));
        let verb = if write { "" } else { "would be " };
        out.push_str(&format!(
            "  {} {verb}created, {} {verb}updated, {} {verb}deleted, {} already right\n",
            n(Class::Create),
            n(Class::Update),
            n(Class::Delete),
            n(Class::AlreadyRight)
        ));
        for (class, keys) in &r.samples {
            let mut keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            keys.sort_by(|a, b| id_order(a, b));
            out.push_str(&format!("    {class:?}: {}\n", keys.join(", ")));
        }
        if write {
            out.push_str(&format!(
                "  written at version {}: {} applied, {} kept a newer version, {} refused; {} deleted again after the final check\n",
                r.version_lsn.as_deref().unwrap_or("-"),
                r.applied,
                r.newer_in_index,
                r.rejected,
                r.deleted_after_recheck
            ));
        }
        if let Some(v) = &r.verified {
            out.push_str(&format!(
                "  verified: {} clean, {} still differ",
                v.clean, v.still_differ
            ));
            if v.changed_since > 0 {
                out.push_str(&format!(
                    ", {} changed after the repair (the live pipeline applies them)",
                    v.changed_since
                ));
            }
            out.push('\n');
            for d in &v.differing {
                out.push_str(&format!(
                    "    still differs: {} ({})\n",
                    d.id,
                    d.kind.as_str()
                ));
            }
            if v.still_differ > v.differing.len() as u64 {
                out.push_str(&format!(
                    "    ... and {} more (audit the table to list them all)\n",
                    v.still_differ - v.differing.len() as u64
                ));
            }
        }
    }
    out
}

/// A JSON value for reports and the runs index.
pub fn to_json(results: &[TableResult]) -> Value {
    serde_json::json!(results)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::{Entry, Sorter};
    use tidemark_index::apply::{Effect, Outcome};

    #[test]
    fn sample_ids_read_in_key_order() {
        let mut r = TableResult::default();
        for id in ["10", "5x", "11", "8", "9", "a"] {
            r.count(Class::Create, id);
        }
        let text = render_text(&[r], false);
        assert!(text.contains("Create: 8, 9, 10, 11, 5x, a"), "{text}");
    }

    #[test]
    fn write_answers_give_the_classes_a_dry_run_gives() {
        let class = |o: Outcome| class_of(&o);
        assert_eq!(
            class(Outcome::Applied(Effect::Created)),
            Some(Class::Create)
        );
        assert_eq!(
            class(Outcome::Applied(Effect::Updated)),
            Some(Class::Update)
        );
        assert_eq!(
            class(Outcome::Applied(Effect::Deleted)),
            Some(Class::Delete)
        );
        assert_eq!(
            class(Outcome::Applied(Effect::WasAbsent)),
            Some(Class::AlreadyRight)
        );
        // Refused or unclear: the document is asked for.
        assert_eq!(class(Outcome::Stale), None);
        assert_eq!(class(Outcome::Rejected("x".into())), None);
        assert_eq!(class(Outcome::Applied(Effect::Other)), None);
        assert_eq!(class_by_document(false, false), Class::Create);
        assert_eq!(class_by_document(false, true), Class::Update);
        assert_eq!(class_by_document(true, true), Class::Delete);
        assert_eq!(class_by_document(true, false), Class::AlreadyRight);
    }

    fn sighting(id: &str, partition: i32, offset: i64, inside: bool) -> Entry {
        Entry {
            id: sighting_id(id, partition, offset),
            hash: None,
            key: inside.then(|| format!("change of {id} at {offset}")),
        }
    }

    #[test]
    fn chunks_are_cut_by_bytes_for_wide_rows() {
        assert_eq!(keys_per_chunk(0), CHUNK, "empty table: cut by keys");
        assert_eq!(keys_per_chunk(60), CHUNK, "narrow rows: cut by keys");
        assert_eq!(keys_per_chunk(200 * 1024), 40, "200 KB rows: 8 MiB a chunk");
        assert_eq!(
            keys_per_chunk(64 << 20),
            MIN_CHUNK,
            "huge rows: a few at a time"
        );
    }

    #[test]
    fn each_key_keeps_its_last_change_in_the_window_and_its_first_after() {
        // Pushed out of order, across runs: the fold must not care.
        let mut sightings = Sorter::with_run_bytes(300);
        for s in [
            sighting("a", 0, 12, false),
            sighting("a", 0, 3, true),
            sighting("a", 0, 9, true),
            sighting("a", 0, 15, false),
            // Offsets compare as numbers, not text: 100 after 99.
            sighting("b", 1, 100, true),
            sighting("b", 1, 99, true),
            // Only after the window: not a key of the window at all.
            sighting("c", 2, 5, false),
            // An id that extends another one's text.
            sighting("a/1", 0, 4, true),
        ] {
            sightings.push(s).expect("push");
        }
        let folded = fold_sightings(sightings).expect("fold");
        let entries: Vec<Entry> = folded
            .read()
            .expect("read")
            .map(|e| e.expect("entry"))
            .collect();
        type Folded = (String, Option<String>, Option<(i32, i64)>);
        let view: Vec<Folded> = entries
            .into_iter()
            .map(|e| (e.id, e.key, e.hash.map(newer_decode)))
            .collect();
        assert_eq!(
            view,
            vec![
                ("a".into(), Some("change of a at 9".into()), Some((0, 12))),
                ("a/1".into(), Some("change of a/1 at 4".into()), None),
                ("b".into(), Some("change of b at 100".into()), None),
            ]
        );
        assert_eq!(
            newer_decode(newer_code(2_147_483_647, 1 << 40)),
            (2_147_483_647, 1 << 40)
        );
    }
}
