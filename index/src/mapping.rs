//! Table -> document mapping: which index, which id, which fields, and the
//! `_tidemark` metadata every document carries. Pure (no I/O), so the
//! consumer, replay and audit all derive exactly the same document from the
//! same row.
//!
//! A document is the event's `after` row with the table's include/exclude
//! and rename rules applied, plus
//! `_tidemark: {version, lsn, commit_time, hash, id, key}` where `version` is the
//! source commit LSN as a number (the `external_gte` version), `hash` is a
//! content hash of the mapped fields (not of the metadata), and `key` is the
//! primary key, so a document can always be traced to its row.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::{Map, Value, json};
use tidemark_schemas::config::{Config, Table};
use tidemark_schemas::{ChangeEvent, Lsn, Operation, Row, Version};

/// The `_tidemark` object's mapping, added to every index Tidemark writes.
/// `key` is stored but not indexed, so key columns of any type fit. `id`
/// repeats the document id in doc values only: a search by ids can then
/// answer ids and hashes from doc values without loading each hit's stored
/// `_id` (10,000 documents: 35-58 ms against 150 ms).
pub fn meta_mapping() -> Value {
    json!({
        "properties": {
            "version": {"type": "long"},
            "lsn": {"type": "keyword"},
            "commit_time": {"type": "date"},
            "hash": {"type": "keyword"},
            "id": {"type": "keyword", "index": false},
            "key": {"type": "object", "enabled": false},
            "incomplete": {"type": "keyword"}
        }
    })
}

/// How one table maps to documents.
#[derive(Debug, Clone)]
pub struct TableMapping {
    pub schema: String,
    pub table: String,
    pub index: String,
    id_columns: Option<Vec<String>>,
    include: Option<HashSet<String>>,
    exclude: HashSet<String>,
    rename: BTreeMap<String, String>,
}

impl TableMapping {
    pub fn new(table: &Table, config: &Config) -> TableMapping {
        let (schema, name) = table.parts();
        TableMapping {
            schema: schema.to_owned(),
            table: name.to_owned(),
            index: table.index_name(&config.kafka),
            id_columns: table.id.clone(),
            include: table.include.as_ref().map(|c| c.iter().cloned().collect()),
            exclude: table.exclude.iter().cloned().collect(),
            rename: table.rename.clone(),
        }
    }

    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }

    /// The document field a column maps to, or `None` when it is left out.
    pub fn field<'a>(&'a self, column: &'a str) -> Option<&'a str> {
        if self.exclude.contains(column)
            || self
                .include
                .as_ref()
                .is_some_and(|inc| !inc.contains(column))
        {
            return None;
        }
        Some(self.rename.get(column).map_or(column, String::as_str))
    }

    /// The mapped fields of a row (no metadata).
    pub fn fields(&self, row: &Row) -> Row {
        let mut doc = Map::new();
        for (column, value) in row {
            if let Some(field) = self.field(column) {
                doc.insert(field.to_owned(), value.clone());
            }
        }
        doc
    }

    /// The document id of a primary key.
    pub fn doc_id(&self, key: &Row) -> Result<String, MappingError> {
        let columns: Vec<&String> = match &self.id_columns {
            Some(columns) => columns.iter().collect(),
            None => key.keys().collect(),
        };
        if columns.is_empty() {
            return Err(MappingError::EmptyKey {
                table: self.qualified(),
            });
        }
        let mut parts = Vec::with_capacity(columns.len());
        for column in &columns {
            let value = key
                .get(*column)
                .ok_or_else(|| MappingError::MissingKeyColumn {
                    table: self.qualified(),
                    column: (*column).clone(),
                })?;
            parts.push(id_text(value));
        }
        if parts.len() == 1 {
            return Ok(parts.swap_remove(0));
        }
        let escaped: Vec<String> = parts
            .iter()
            .map(|p| p.replace('%', "%25").replace('/', "%2F"))
            .collect();
        Ok(escaped.join("/"))
    }
}

impl TableMapping {
    /// The columns the document id is made of, in id order: the configured
    /// `id`, else the key columns in name order.
    pub fn id_columns(&self, key_columns: &[String]) -> Vec<String> {
        match &self.id_columns {
            Some(columns) => columns.clone(),
            None => {
                let mut sorted = key_columns.to_vec();
                sorted.sort();
                sorted
            }
        }
    }

    /// The id's parts (as text), reversing [`TableMapping::doc_id`] for a
    /// key of `columns` columns; `None` when the id cannot be one.
    pub fn split_id(&self, id: &str, columns: usize) -> Option<Vec<String>> {
        if columns == 1 {
            return Some(vec![id.to_owned()]);
        }
        let parts: Vec<String> = id
            .split('/')
            .map(|p| p.replace("%2F", "/").replace("%25", "%"))
            .collect();
        (parts.len() == columns).then_some(parts)
    }
}

/// A key value as id text: strings as they are, numbers as their digits,
/// anything else as compact JSON.
fn id_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The content hash of mapped fields: xxh3-128 of their JSON with keys in
/// name order (serde_json's map is ordered), as 32 hex digits.
pub fn content_hash(fields: &Row) -> String {
    format!("{:032x}", content_digest(fields))
}

/// [`content_hash`] as the number it prints (audit compares millions).
pub fn content_digest(fields: &Row) -> u128 {
    // Serializing a map of JSON values into a Vec cannot fail.
    let bytes = serde_json::to_vec(fields).unwrap_or_default();
    xxhash_rust::xxh3::xxh3_128(&bytes)
}

/// The content hash of a document as stored: [`content_digest`] of its
/// `_source` without `_tidemark`. Equal to the hash Tidemark stored in
/// `_tidemark.hash` exactly when nothing else changed the document (JSON
/// numbers keep their digits, so a stored source hashes as it was sent).
pub fn document_digest(source: &Row) -> u128 {
    if !source.contains_key("_tidemark") {
        return content_digest(source);
    }
    let mut fields = source.clone();
    fields.remove("_tidemark");
    content_digest(&fields)
}

/// What one change event asks of the index.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    /// Write the whole document at `version`.
    Index {
        index: String,
        id: String,
        version: Version,
        /// Mapped fields (no metadata yet: it is added, with the hash, when
        /// the document is complete).
        fields: Row,
        /// Fields whose values the event did not carry (unchanged TOAST):
        /// they must come from the current document.
        missing: Vec<String>,
        key: Row,
        /// Its commit LSN in `_tidemark.lsn` is `version.lsn()`: one
        /// number, so the two can never disagree.
        commit_time: String,
    },
    /// Delete the document, leaving a tombstone at `version`.
    Delete {
        index: String,
        id: String,
        version: Version,
    },
    /// Remove every document of the index older than `version`.
    Truncate { index: String, version: Version },
}

impl Write {
    pub fn index(&self) -> &str {
        match self {
            Write::Index { index, .. }
            | Write::Delete { index, .. }
            | Write::Truncate { index, .. } => index,
        }
    }
    /// The (index, id) of the document written; `None` for a truncate.
    pub fn document(&self) -> Option<(String, String)> {
        match self {
            Write::Index { index, id, .. } | Write::Delete { index, id, .. } => {
                Some((index.clone(), id.clone()))
            }
            Write::Truncate { .. } => None,
        }
    }
    pub fn version(&self) -> Version {
        match self {
            Write::Index { version, .. }
            | Write::Delete { version, .. }
            | Write::Truncate { version, .. } => *version,
        }
    }
}

/// Why an event cannot become a document. Names the table and the column.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    #[error("table {table} is not in the config's [[tables]]")]
    UnknownTable { table: String },
    #[error("table {table}: key column {column:?} (from tables.id) is not in the event's key")]
    MissingKeyColumn { table: String, column: String },
    #[error("table {table}: the event has an empty key")]
    EmptyKey { table: String },
    #[error("table {table}: {op} event without an `after` row")]
    NoAfter { table: String, op: &'static str },
    #[error("table {table}: commit LSN {lsn} makes no document version: {source}")]
    VersionTooLarge {
        table: String,
        lsn: Lsn,
        source: tidemark_schemas::VersionError,
    },
    #[error("table {table}: {problem}; OpenSearch cannot store such a document id")]
    InvalidId { table: String, problem: String },
}

/// OpenSearch refuses a document id over 512 bytes, and for one such write
/// it refuses the whole bulk request; an id is checked before sending.
pub const MAX_ID_BYTES: usize = 512;

/// Whether OpenSearch can take `id` as a document id.
fn check_id(table: &TableMapping, id: String) -> Result<String, MappingError> {
    let problem = if id.is_empty() {
        "the document id is empty".to_owned()
    } else if id.len() > MAX_ID_BYTES {
        format!(
            "the document id is {} bytes, over the {MAX_ID_BYTES}-byte limit",
            id.len()
        )
    } else {
        return Ok(id);
    };
    Err(MappingError::InvalidId {
        table: table.qualified(),
        problem,
    })
}

/// Every configured table's mapping.
#[derive(Debug, Clone)]
pub struct Mappings {
    tables: HashMap<(String, String), TableMapping>,
}

impl Mappings {
    pub fn new(config: &Config) -> Mappings {
        let tables = config
            .tables
            .iter()
            .map(|t| {
                let m = TableMapping::new(t, config);
                ((m.schema.clone(), m.table.clone()), m)
            })
            .collect();
        Mappings { tables }
    }

    pub fn get(&self, schema: &str, table: &str) -> Option<&TableMapping> {
        self.tables.get(&(schema.to_owned(), table.to_owned()))
    }

    pub fn iter(&self) -> impl Iterator<Item = &TableMapping> {
        self.tables.values()
    }

    /// The write an event asks for.
    pub fn write(&self, event: &ChangeEvent) -> Result<Write, MappingError> {
        let source = &event.source;
        let mapping =
            self.get(&source.schema, &source.table)
                .ok_or_else(|| MappingError::UnknownTable {
                    table: source.qualified(),
                })?;
        let version = event
            .version()
            .map_err(|source| MappingError::VersionTooLarge {
                table: mapping.qualified(),
                lsn: event.commit_lsn,
                source,
            })?;
        let index = mapping.index.clone();
        Ok(match event.op {
            // Both remove what is older than the event: a truncate every
            // row, a resnapshot the rows its snapshot did not rewrite.
            Operation::Truncate | Operation::Resnapshot => Write::Truncate { index, version },
            Operation::Delete => Write::Delete {
                index,
                id: check_id(mapping, mapping.doc_id(&event.key)?)?,
                version,
            },
            Operation::Snapshot | Operation::Insert | Operation::Update => {
                let after = event.after.as_ref().ok_or_else(|| MappingError::NoAfter {
                    table: mapping.qualified(),
                    op: event.op.as_str(),
                })?;
                Write::Index {
                    index,
                    id: check_id(mapping, mapping.doc_id(&event.key)?)?,
                    version,
                    fields: mapping.fields(after),
                    missing: event
                        .unchanged_toast
                        .iter()
                        .filter_map(|c| mapping.field(c).map(str::to_owned))
                        .collect(),
                    key: event.key.clone(),
                    commit_time: event.commit_time.clone(),
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_schemas::{FORMAT_VERSION, Source};

    fn config(tables: &str) -> Config {
        let text = format!(
            "[postgres]\nurl = \"postgres://u@h/db\"\n[kafka]\nbrokers = \"h:1\"\n{tables}"
        );
        Config::from_toml(&text, |_| None).expect("valid config")
    }

    fn row(value: Value) -> Row {
        match value {
            Value::Object(map) => map,
            _ => Map::new(),
        }
    }

    fn event(op: Operation, key: Value, after: Option<Value>) -> ChangeEvent {
        ChangeEvent {
            format: FORMAT_VERSION,
            source: Source {
                database: "db".into(),
                schema: "public".into(),
                table: "articles".into(),
            },
            op,
            key: row(key),
            before: None,
            after: after.map(row),
            unchanged_toast: vec![],
            commit_lsn: Lsn(0x1_0000_0010),
            timeline: 1,
            lsn: Lsn(0x1_0000_0008),
            xid: Some(7),
            commit_time: "2026-11-22T10:00:00.000000Z".into(),
        }
    }

    #[test]
    fn default_index_is_the_topic_and_id_the_key() {
        let m = Mappings::new(&config("[[tables]]\ntable = \"public.articles\""));
        let w = m
            .write(&event(
                Operation::Insert,
                json!({"id": 42}),
                Some(json!({"id": 42, "title": "t"})),
            ))
            .expect("maps");
        let Write::Index {
            index,
            id,
            version,
            fields,
            ..
        } = w
        else {
            panic!("not an index write: {w:?}");
        };
        assert_eq!(index, "tidemark.public.articles");
        assert_eq!(id, "42");
        assert_eq!(version.get(), 0x1_0000_0010);
        assert_eq!(Value::Object(fields), json!({"id": 42, "title": "t"}));
    }

    #[test]
    fn composite_ids_are_ordered_and_escaped() {
        let m = Mappings::new(&config(
            "[[tables]]\ntable = \"public.articles\"\nid = [\"tenant\", \"slug\"]",
        ));
        let t = m.get("public", "articles").expect("configured");
        let key = row(json!({"slug": "a/b%c", "tenant": 7}));
        assert_eq!(t.doc_id(&key).expect("id"), "7/a%2Fb%25c");
        // Without `id`, key columns in name order.
        let m = Mappings::new(&config("[[tables]]\ntable = \"public.articles\""));
        let t = m.get("public", "articles").expect("configured");
        assert_eq!(t.doc_id(&key).expect("id"), "a%2Fb%25c/7");
        // A single string key is used as it is.
        assert_eq!(t.doc_id(&row(json!({"k": "a/b"}))).expect("id"), "a/b");
    }

    #[test]
    fn ids_decode_back_to_their_key() {
        let m = Mappings::new(&config("[[tables]]\ntable = \"public.articles\""));
        let t = m.get("public", "articles").expect("configured");
        let key = row(json!({"slug": "a/b%c", "tenant": 7}));
        let id = t.doc_id(&key).expect("id");
        let columns = t.id_columns(&["tenant".to_owned(), "slug".to_owned()]);
        assert_eq!(columns, ["slug", "tenant"]);
        assert_eq!(
            t.split_id(&id, 2),
            Some(vec!["a/b%c".to_owned(), "7".to_owned()])
        );
        assert_eq!(t.split_id("no-slash", 2), None);
        assert_eq!(t.split_id("a/b", 1), Some(vec!["a/b".to_owned()]));
    }

    #[test]
    fn missing_id_column_names_table_and_column() {
        let m = Mappings::new(&config(
            "[[tables]]\ntable = \"public.articles\"\nid = [\"tenant\"]",
        ));
        let err = m
            .write(&event(Operation::Delete, json!({"id": 1}), None))
            .expect_err("no tenant");
        assert_eq!(
            err.to_string(),
            "table public.articles: key column \"tenant\" (from tables.id) is not in the event's key"
        );
    }

    #[test]
    fn include_exclude_rename_and_toast_fields() {
        let m = Mappings::new(&config(
            "[[tables]]\ntable = \"public.articles\"\nexclude = [\"secret\"]\nrename = { body = \"text\" }",
        ));
        let mut e = event(
            Operation::Update,
            json!({"id": 1}),
            Some(json!({"id": 1, "secret": "s", "title": "t"})),
        );
        e.unchanged_toast = vec!["body".into(), "secret".into()];
        let Ok(Write::Index {
            fields, missing, ..
        }) = m.write(&e)
        else {
            panic!("not an index write");
        };
        assert_eq!(Value::Object(fields), json!({"id": 1, "title": "t"}));
        assert_eq!(missing, vec!["text".to_owned()]);

        let m = Mappings::new(&config(
            "[[tables]]\ntable = \"public.articles\"\ninclude = [\"title\"]",
        ));
        let t = m.get("public", "articles").expect("configured");
        assert_eq!(
            Value::Object(t.fields(&row(json!({"id": 1, "title": "t"})))),
            json!({"title": "t"})
        );
    }

    #[test]
    fn unknown_table_and_missing_after_are_errors() {
        let m = Mappings::new(&config("[[tables]]\ntable = \"public.other\""));
        let err = m
            .write(&event(Operation::Insert, json!({"id": 1}), None))
            .expect_err("unknown");
        assert!(err.to_string().contains("public.articles"), "{err}");
        let m = Mappings::new(&config("[[tables]]\ntable = \"public.articles\""));
        let err = m
            .write(&event(Operation::Update, json!({"id": 1}), None))
            .expect_err("no after");
        assert!(err.to_string().contains("update event without"), "{err}");
    }

    #[test]
    fn ids_opensearch_cannot_store_are_refused_naming_table_and_size() {
        let m = Mappings::new(&config("[[tables]]\ntable = \"public.articles\""));
        let with_id = |id: &str| {
            let after = json!({"id": id});
            m.write(&event(Operation::Insert, json!({"id": id}), Some(after)))
        };
        assert!(with_id(&"x".repeat(MAX_ID_BYTES)).is_ok());
        let err = with_id(&"x".repeat(MAX_ID_BYTES + 1)).expect_err("too long");
        assert_eq!(
            err.to_string(),
            "table public.articles: the document id is 513 bytes, over the 512-byte limit; OpenSearch cannot store such a document id"
        );
        let err = with_id("").expect_err("empty");
        assert!(
            err.to_string().contains("the document id is empty"),
            "{err}"
        );
        let delete = m.write(&event(
            Operation::Delete,
            json!({"id": "é".repeat(300)}),
            None,
        ));
        assert!(
            matches!(delete, Err(MappingError::InvalidId { .. })),
            "{delete:?}"
        );
    }

    #[test]
    fn hash_ignores_key_order_and_sees_every_value() {
        let a = row(json!({"a": 1, "b": {"x": [1, 2], "y": "z"}}));
        let mut b = Map::new();
        b.insert("b".into(), json!({"y": "z", "x": [1, 2]}));
        b.insert("a".into(), json!(1));
        assert_eq!(content_hash(&a), content_hash(&b));
        let c = row(json!({"a": 1, "b": {"x": [2, 1], "y": "z"}}));
        assert_ne!(content_hash(&a), content_hash(&c));
        // Exact digits matter: 1.0 and 1.00 are different numeric values.
        let d1 = row(json!({"n": serde_json::from_str::<Value>("1.0").expect("json")}));
        let d2 = row(json!({"n": serde_json::from_str::<Value>("1.00").expect("json")}));
        assert_ne!(content_hash(&d1), content_hash(&d2));
        assert_eq!(content_hash(&a).len(), 32);
    }
}
