//! The key-ordered merge behind a full audit: rows and documents, each
//! reduced to (document id, content hash), sorted by id and walked side by
//! side. One pass over each side, no per-key lookups.
//!
//! Neither side can deliver id order by itself: PostgreSQL orders a key by
//! its type and collation, OpenSearch's cheap stream (`_doc` order) has no
//! order at all. So each side goes through a [`Sorter`]: an external sort
//! that keeps at most [`RUN_BYTES`] in memory and spills sorted runs to
//! anonymous temporary files (removed by the OS even if the process dies),
//! then merges them. Memory is bounded whatever the table's size; disk use
//! is about 60 bytes per row plus the id and key text.
//!
//! `window` uses the same sort for the keys of a time window
//! ([`Sorter::finish_distinct`]): distinct, in id order, read back in chunks.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, Write};

/// In-memory budget of one sorter before it spills a run. Two sorters run
/// at once (rows and documents), so an audit holds at most twice this in
/// entries (plus the Vec's growth slack): well inside the 200 MB an audit
/// may use, and enough to sort a 100,000-row table without touching the
/// disk. Bigger runs buy little: a 1,000,000-row audit spends well under a
/// second of its time on runs.
pub const RUN_BYTES: usize = 16 << 20;
/// Runs merged at once. Past this many, the runs so far are merged into one
/// (on disk, streaming), so open files stay few for any table size.
const MAX_RUNS: usize = 128;
/// Memory per entry beyond its text: the entry itself (its Vec slot) and
/// the allocator's share of its two heap strings.
const ENTRY_OVERHEAD: usize = std::mem::size_of::<Entry>() + 2 * 16;

/// One row or document, reduced to what the comparison needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The document id (for a row: the id the consumer would give it).
    pub id: String,
    /// The content hash; `None` for a document that carries none.
    pub hash: Option<u128>,
    /// The row's key as JSON (rows only: a drifted row is re-checked by key).
    pub key: Option<String>,
}

impl Entry {
    fn size(&self) -> usize {
        self.id.len() + self.key.as_ref().map_or(0, String::len) + ENTRY_OVERHEAD
    }

    fn write_to(&self, out: &mut impl Write) -> io::Result<()> {
        write_text(out, &self.id)?;
        match self.hash {
            Some(hash) => {
                out.write_all(&[1])?;
                out.write_all(&hash.to_le_bytes())?;
            }
            None => out.write_all(&[0])?,
        }
        match &self.key {
            Some(key) => {
                out.write_all(&[1])?;
                write_text(out, key)
            }
            None => out.write_all(&[0]),
        }
    }

    /// The next entry of a run; `None` at its end.
    fn read_from(input: &mut impl Read) -> io::Result<Option<Entry>> {
        let mut len = [0u8; 4];
        match input.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let id = read_text(input, u32::from_le_bytes(len))?;
        let hash = match read_flag(input)? {
            true => {
                let mut bytes = [0u8; 16];
                input.read_exact(&mut bytes)?;
                Some(u128::from_le_bytes(bytes))
            }
            false => None,
        };
        let key = match read_flag(input)? {
            true => {
                input.read_exact(&mut len)?;
                Some(read_text(input, u32::from_le_bytes(len))?)
            }
            false => None,
        };
        Ok(Some(Entry { id, hash, key }))
    }
}

fn write_text(out: &mut impl Write, text: &str) -> io::Result<()> {
    let len = u32::try_from(text.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "id or key over 4 GiB"))?;
    out.write_all(&len.to_le_bytes())?;
    out.write_all(text.as_bytes())
}

fn read_text(input: &mut impl Read, len: u32) -> io::Result<String> {
    let mut bytes = vec![0u8; len as usize];
    input.read_exact(&mut bytes)?;
    String::from_utf8(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn read_flag(input: &mut impl Read) -> io::Result<bool> {
    let mut flag = [0u8; 1];
    input.read_exact(&mut flag)?;
    Ok(flag[0] == 1)
}

/// Collects entries in any order and gives them back sorted by id.
#[derive(Debug)]
pub struct Sorter {
    run_bytes: usize,
    pending: Vec<Entry>,
    pending_bytes: usize,
    runs: Vec<File>,
    count: u64,
}

impl Default for Sorter {
    fn default() -> Self {
        Sorter::with_run_bytes(RUN_BYTES)
    }
}

impl Sorter {
    /// A sorter that spills every `run_bytes` (tests use a tiny budget).
    pub fn with_run_bytes(run_bytes: usize) -> Sorter {
        Sorter {
            run_bytes,
            pending: Vec::new(),
            pending_bytes: 0,
            runs: Vec::new(),
            count: 0,
        }
    }

    pub fn push(&mut self, entry: Entry) -> io::Result<()> {
        self.pending_bytes += entry.size();
        self.pending.push(entry);
        self.count += 1;
        if self.pending_bytes >= self.run_bytes {
            self.spill()?;
        }
        Ok(())
    }

    /// Entries pushed so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    fn spill(&mut self) -> io::Result<()> {
        let mut pending = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        pending.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        let run = write_run(pending.into_iter().map(Ok))?;
        self.runs.push(run);
        if self.runs.len() >= MAX_RUNS {
            let runs = std::mem::take(&mut self.runs);
            let merged = write_run(Merged::new(runs, Vec::new())?)?;
            self.runs.push(merged);
        }
        Ok(())
    }

    /// Every entry, by id (ties in no particular order).
    pub fn finish(mut self) -> io::Result<Merged> {
        let mut pending = std::mem::take(&mut self.pending);
        pending.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        Merged::new(self.runs, pending)
    }
}

impl Sorter {
    /// The entries by id with one entry per id (the first pushed of equal
    /// ids is not guaranteed; callers give equal ids equal contents), in
    /// a file that can be read any number of times.
    pub fn finish_distinct(self) -> io::Result<Distinct> {
        let mut len = 0;
        let mut last: Option<String> = None;
        let mut merged = self.finish()?;
        let distinct = std::iter::from_fn(|| {
            loop {
                match merged.next()? {
                    Ok(entry) if last.as_deref() == Some(entry.id.as_str()) => continue,
                    Ok(entry) => {
                        last = Some(entry.id.clone());
                        len += 1;
                        return Some(Ok(entry));
                    }
                    Err(e) => return Some(Err(e)),
                }
            }
        });
        let file = write_run(distinct)?;
        Ok(Distinct { file, len })
    }
}

/// Distinct entries sorted by id, on disk (see [`Sorter::finish_distinct`]).
#[derive(Debug)]
pub struct Distinct {
    file: File,
    len: u64,
}

impl Distinct {
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Reads the entries from the start. One reader at a time: readers
    /// share the file's position.
    pub fn read(&self) -> io::Result<impl Iterator<Item = io::Result<Entry>> + use<>> {
        let mut file = self.file.try_clone()?;
        file.rewind()?;
        let mut input = BufReader::with_capacity(1 << 16, file);
        Ok(std::iter::from_fn(move || {
            Entry::read_from(&mut input).transpose()
        }))
    }
}

/// Writes sorted entries to an anonymous temporary file, rewound for reading.
fn write_run(entries: impl Iterator<Item = io::Result<Entry>>) -> io::Result<File> {
    let mut out = BufWriter::with_capacity(1 << 16, tempfile::tempfile()?);
    for entry in entries {
        entry?.write_to(&mut out)?;
    }
    let mut file = out.into_inner().map_err(io::IntoInnerError::into_error)?;
    file.rewind()?;
    Ok(file)
}

/// A source's next entry, ordered for a min-heap by id.
#[derive(Debug)]
struct Head {
    entry: Entry,
    source: usize,
}

impl PartialEq for Head {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Head {}
impl PartialOrd for Head {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Head {
    fn cmp(&self, other: &Self) -> Ordering {
        (&self.entry.id, self.source).cmp(&(&other.entry.id, other.source))
    }
}

/// The sorted entries of a [`Sorter`]: its runs and its in-memory tail,
/// merged.
#[derive(Debug)]
pub struct Merged {
    runs: Vec<BufReader<File>>,
    tail: std::vec::IntoIter<Entry>,
    heap: BinaryHeap<Reverse<Head>>,
}

impl Merged {
    fn new(runs: Vec<File>, tail: Vec<Entry>) -> io::Result<Merged> {
        let mut merged = Merged {
            runs: runs
                .into_iter()
                .map(|f| BufReader::with_capacity(1 << 16, f))
                .collect(),
            tail: tail.into_iter(),
            heap: BinaryHeap::new(),
        };
        for source in 0..=merged.runs.len() {
            merged.refill(source)?;
        }
        Ok(merged)
    }

    /// Source `runs.len()` is the in-memory tail.
    fn refill(&mut self, source: usize) -> io::Result<()> {
        let next = match self.runs.get_mut(source) {
            Some(run) => Entry::read_from(run)?,
            None => self.tail.next(),
        };
        if let Some(entry) = next {
            self.heap.push(Reverse(Head { entry, source }));
        }
        Ok(())
    }
}

impl Iterator for Merged {
    type Item = io::Result<Entry>;

    fn next(&mut self) -> Option<Self::Item> {
        let Reverse(Head { entry, source }) = self.heap.pop()?;
        if let Err(e) = self.refill(source) {
            return Some(Err(e));
        }
        Some(Ok(entry))
    }
}

/// Where a row and its document disagree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    /// A row without a document.
    Missing(Entry),
    /// A document without a row.
    Extra(Entry),
    /// Both, with different hashes (or a document without one).
    Stale { row: Entry },
}

/// Walks rows and documents (both sorted by id) together and calls `found`
/// for each disagreement; returns how many ids matched.
pub fn merge(
    rows: impl Iterator<Item = io::Result<Entry>>,
    docs: impl Iterator<Item = io::Result<Entry>>,
    mut found: impl FnMut(Mismatch),
) -> io::Result<u64> {
    let mut rows = rows.peekable();
    let mut docs = docs.peekable();
    let mut matched = 0;
    loop {
        let order = match (rows.peek(), docs.peek()) {
            (None, None) => return Ok(matched),
            (Some(Err(_)), _) | (_, Some(Err(_))) => {
                let error = match rows.next() {
                    Some(Err(e)) => e,
                    _ => match docs.next() {
                        Some(Err(e)) => e,
                        _ => io::Error::other("merge: lost an error"),
                    },
                };
                return Err(error);
            }
            (Some(Ok(_)), None) => Ordering::Less,
            (None, Some(Ok(_))) => Ordering::Greater,
            (Some(Ok(row)), Some(Ok(doc))) => row.id.cmp(&doc.id),
        };
        match order {
            Ordering::Less => {
                if let Some(Ok(row)) = rows.next() {
                    found(Mismatch::Missing(row));
                }
            }
            Ordering::Greater => {
                if let Some(Ok(doc)) = docs.next() {
                    found(Mismatch::Extra(doc));
                }
            }
            Ordering::Equal => {
                if let (Some(Ok(row)), Some(Ok(doc))) = (rows.next(), docs.next()) {
                    if row.hash.is_some() && row.hash == doc.hash {
                        matched += 1;
                    } else {
                        found(Mismatch::Stale { row });
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn entry(id: &str, hash: u128, key: bool) -> Entry {
        Entry {
            id: id.to_owned(),
            hash: Some(hash),
            key: key.then(|| format!("{{\"id\":\"{id}\"}}")),
        }
    }

    fn sorted(entries: &[Entry], run_bytes: usize) -> Vec<Entry> {
        let mut sorter = Sorter::with_run_bytes(run_bytes);
        for e in entries {
            sorter.push(e.clone()).expect("push");
        }
        sorter
            .finish()
            .expect("finish")
            .collect::<io::Result<Vec<_>>>()
            .expect("read")
    }

    /// A deterministic shuffle of ids 0..n (no rand dependency needed).
    fn shuffled(n: u64) -> Vec<String> {
        let mut ids: Vec<String> = (0..n).map(|i| i.to_string()).collect();
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        for i in (1..ids.len()).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ids.swap(i, (state % (i as u64 + 1)) as usize);
        }
        ids
    }

    #[test]
    fn spilled_runs_merge_into_id_order() {
        let entries: Vec<Entry> = shuffled(10_000)
            .iter()
            .map(|id| entry(id, id.len() as u128, true))
            .collect();
        // ~100 entries a run: about 100 runs, so the cascade is not hit
        // but many files are merged; then a budget that cascades.
        for run_bytes in [usize::MAX, 10_000, 1_000] {
            let out = sorted(&entries, run_bytes);
            let mut expected = entries.clone();
            expected.sort_by(|a, b| a.id.cmp(&b.id));
            assert_eq!(out, expected, "run_bytes {run_bytes}");
        }
    }

    #[test]
    fn distinct_keeps_one_entry_per_id_and_rereads() {
        let mut entries: Vec<Entry> = shuffled(3_000)
            .iter()
            .map(|id| {
                entry(
                    &(id.parse::<u64>().expect("number") % 1_000).to_string(),
                    7,
                    true,
                )
            })
            .collect();
        entries.reverse();
        let mut sorter = Sorter::with_run_bytes(5_000);
        for e in &entries {
            sorter.push(e.clone()).expect("push");
        }
        let distinct = sorter.finish_distinct().expect("distinct");
        assert_eq!(distinct.len(), 1_000);
        let mut expected: Vec<String> = (0..1_000).map(|i: u64| i.to_string()).collect();
        expected.sort();
        for _ in 0..2 {
            let ids: Vec<String> = distinct
                .read()
                .expect("read")
                .map(|e| e.expect("entry").id)
                .collect();
            assert_eq!(ids, expected);
        }
    }

    #[test]
    fn entries_round_trip_through_a_run() {
        let entries = vec![
            Entry {
                id: "ünïcode/%2F".into(),
                hash: None,
                key: None,
            },
            Entry {
                id: String::new(),
                hash: Some(u128::MAX),
                key: Some("{}".into()),
            },
        ];
        assert_eq!(sorted(&entries, 1), {
            let mut e = entries.clone();
            e.sort_by(|a, b| a.id.cmp(&b.id));
            e
        });
    }

    #[test]
    fn merge_finds_missing_extra_and_stale() {
        // Rows 0..3000, documents for all but every 7th, every 11th with a
        // different hash, and 100 documents without a row.
        let rows: Vec<Entry> = (0..3000).map(|i| entry(&i.to_string(), 1, true)).collect();
        let mut docs: Vec<Entry> = (0..3000)
            .filter(|i| i % 7 != 0)
            .map(|i| {
                let mut e = entry(&i.to_string(), if i % 11 == 0 { 2 } else { 1 }, false);
                if i == 13 {
                    e.hash = None;
                }
                e
            })
            .collect();
        docs.extend((0..100).map(|i| entry(&format!("extra-{i}"), 1, false)));
        docs.reverse();
        let mut expected: BTreeMap<String, &str> = BTreeMap::new();
        for i in 0..3000 {
            if i % 7 == 0 {
                expected.insert(i.to_string(), "missing");
            } else if i % 11 == 0 || i == 13 {
                expected.insert(i.to_string(), "stale");
            }
        }
        for i in 0..100 {
            expected.insert(format!("extra-{i}"), "extra");
        }
        let mut found = BTreeMap::new();
        let matched = merge(
            sorted(&rows, 2_000).into_iter().map(Ok),
            sorted(&docs, 2_000).into_iter().map(Ok),
            |m| {
                let (id, kind) = match m {
                    Mismatch::Missing(e) => (e.id, "missing"),
                    Mismatch::Extra(e) => (e.id, "extra"),
                    Mismatch::Stale { row } => (row.id, "stale"),
                };
                assert!(found.insert(id, kind).is_none(), "reported twice");
            },
        )
        .expect("merge");
        assert_eq!(found, expected);
        let stale = expected.values().filter(|k| **k == "stale").count();
        let missing = expected.values().filter(|k| **k == "missing").count();
        assert_eq!(matched as usize, 3000 - missing - stale);
    }

    #[test]
    fn merge_stops_at_a_read_error() {
        let rows = vec![Ok(entry("a", 1, true)), Err(io::Error::other("disk gone"))];
        let docs = vec![Ok(entry("a", 1, false)), Ok(entry("b", 1, false))];
        let error = merge(rows.into_iter(), docs.into_iter(), |_| {}).expect_err("error");
        assert_eq!(error.to_string(), "disk gone");
    }
}
