//! The bulk body: each write as its action line and document, with the
//! `external_gte` version and the `_tidemark` metadata.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use serde::Serialize;
use tidemark_schemas::Row;
use tidemark_schemas::config::META_FIELD;
use tracing::warn;

use super::ApplyStats;
use crate::mapping::{Write, content_hash};

/// The bulk action line and document for one write, NDJSON (public for
/// the bench's OpenSearch-alone baseline).
pub fn bulk_lines(write: &Write, stats: &ApplyStats) -> Bytes {
    let mut out = Vec::with_capacity(256);
    match write {
        Write::Index {
            index,
            id,
            version,
            fields,
            missing,
            key,
            commit_time,
        } => {
            let lsn = version.lsn();
            if !missing.is_empty() {
                stats.incomplete_toast.fetch_add(1, Ordering::Relaxed);
                warn!(index, id, fields = ?missing, lsn = %lsn,
                    "unchanged TOAST values not found in the index; document written without them (audit will report it stale)");
            }
            let hash = content_hash(fields);
            let document = Document {
                fields,
                meta: Meta {
                    // The write's own version: truncates and resnapshots
                    // delete below it.
                    version: version.get(),
                    lsn: lsn.to_string(),
                    commit_time,
                    hash: &hash,
                    id,
                    key,
                    incomplete: (!missing.is_empty()).then_some(missing.as_slice()),
                },
            };
            // Serializing into a Vec cannot fail.
            let _ = serde_json::to_writer(
                &mut out,
                &Action::Index(Target::new(index, id, version.get())),
            );
            out.push(b'\n');
            let _ = serde_json::to_writer(&mut out, &document);
            out.push(b'\n');
        }
        Write::Delete { index, id, version } => {
            let _ = serde_json::to_writer(
                &mut out,
                &Action::Delete(Target::new(index, id, version.get())),
            );
            out.push(b'\n');
        }
        Write::Truncate { .. } => {}
    }
    Bytes::from(out)
}

/// `lines` (made by [`bulk_lines`] for `write`) aimed at `index` instead:
/// the same document at the same version, for an index a reindex fills
/// (`crate::alias`).
pub(crate) fn retarget(lines: &Bytes, write: &Write, index: &str) -> Bytes {
    match write {
        Write::Index { id, version, .. } => retarget_to(lines, id, *version, false, index),
        Write::Delete { id, version, .. } => retarget_to(lines, id, *version, true, index),
        Write::Truncate { .. } => Bytes::new(),
    }
}

/// [`retarget`] from what a prepared write keeps: its id, version and
/// whether it is a delete.
pub(crate) fn retarget_to(
    lines: &Bytes,
    id: &str,
    version: tidemark_schemas::Version,
    delete: bool,
    index: &str,
) -> Bytes {
    let mut target = Target::new(index, id, version.get());
    let action = match delete {
        false => {
            // Only through the mark alias: once the mark is gone the copy
            // fails (`answer::mark_gone`) rather than creating an index of
            // that name. (A delete cannot require an alias: its copy goes to
            // the physical index.)
            target.require_alias = Some(true);
            Action::Index(target)
        }
        true => Action::Delete(target),
    };
    let mut out = Vec::with_capacity(lines.len() + index.len());
    let _ = serde_json::to_writer(&mut out, &action);
    out.push(b'\n');
    let rest = lines
        .iter()
        .position(|b| *b == b'\n')
        .map_or(&[][..], |n| &lines[n + 1..]);
    out.extend_from_slice(rest);
    Bytes::from(out)
}

/// A bulk action line, `{"index": {...}}` or `{"delete": {...}}`.

#[derive(Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Action<'a> {
    Index(Target<'a>),
    Delete(Target<'a>),
}

/// Fields in the order earlier versions wrote them (sorted).
#[derive(Serialize)]
pub(crate) struct Target<'a> {
    #[serde(rename = "_id")]
    id: &'a str,
    #[serde(rename = "_index")]
    index: &'a str,
    version: u64,
    version_type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    require_alias: Option<bool>,
}

impl<'a> Target<'a> {
    fn new(index: &'a str, id: &'a str, version: u64) -> Target<'a> {
        Target {
            index,
            id,
            version,
            version_type: "external_gte",
            require_alias: None,
        }
    }
}

/// The `_tidemark` metadata object (see `mapping::meta_mapping`).
#[derive(Serialize)]
pub(crate) struct Meta<'a> {
    version: u64,
    lsn: String,
    commit_time: &'a str,
    hash: &'a str,
    /// The document id again, in doc values (see `mapping::meta_mapping`).
    id: &'a str,
    key: &'a Row,
    #[serde(skip_serializing_if = "Option::is_none")]
    incomplete: Option<&'a [String]>,
}

/// A document as written: the mapped fields plus `_tidemark`, serialized
/// straight from the write (no copy of the fields). A column mapped to the
/// metadata field's name is left out: `_tidemark` is ours.
pub(crate) struct Document<'a> {
    fields: &'a Row,
    meta: Meta<'a>,
}

impl Serialize for Document<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(None)?;
        for (name, value) in self.fields {
            if name != META_FIELD {
                map.serialize_entry(name, value)?;
            }
        }
        map.serialize_entry(META_FIELD, &self.meta)?;
        map.end()
    }
}
