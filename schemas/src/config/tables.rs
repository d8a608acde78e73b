//! `[[tables]]`: which tables are captured and how each maps to its index.

use super::{ConfigError, Kafka, META_FIELD, invalid, is_index_name, is_topic_name};
use serde::Deserialize;

/// `[[tables]] on_schema_change`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnSchemaChange {
    /// Every row sent again at a new snapshot, so every document takes the
    /// new shape (not only those whose row changes next).
    #[default]
    Backfill,
    /// Logged and counted; documents take the new shape as their rows change.
    Ignore,
    /// The producer stops with an error naming the table and the change.
    Stop,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Table {
    /// `schema.table`.
    pub table: String,
    /// Target index or alias; default: the table's topic name
    /// (`<topic_prefix>.<schema>.<table>`), as Kafka Connect sinks do.
    #[serde(default)]
    pub index: Option<String>,
    /// Key columns that make the document id, in order; default: every
    /// primary-key column, in name order. Several columns are joined with
    /// `/` (a `/` or `%` inside a value is percent-escaped).
    #[serde(default)]
    pub id: Option<Vec<String>>,
    /// Only these columns go into the document (default: all).
    #[serde(default)]
    pub include: Option<Vec<String>>,
    /// These columns stay out of the document.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Column name -> document field name.
    #[serde(default)]
    pub rename: std::collections::BTreeMap<String, String>,
    /// Settings for an index the consumer creates, e.g.
    /// `{ number_of_shards = 1, number_of_replicas = 0 }`.
    #[serde(default)]
    pub index_settings: Option<toml::Table>,
    /// A JSON file with the index's `mappings` (relative paths are relative
    /// to the config file), used when the consumer creates the index.
    #[serde(default)]
    pub mappings_file: Option<std::path::PathBuf>,
    /// An `updated_at`-style column; audit dates drifted rows by it.
    #[serde(default)]
    pub audit_time_column: Option<String>,
    /// What the producer does when the table's shape changes (a column
    /// added, dropped, renamed or retyped), seen at its next change:
    /// `backfill` (default) sends every row again in the new shape,
    /// `ignore` only logs and counts it, `stop` stops the producer.
    #[serde(default)]
    pub on_schema_change: OnSchemaChange,
    /// The field types of an index the consumer creates: derived from the
    /// column types (default), with choices for `numeric` and `json`
    /// columns and per-column mappings.
    #[serde(default)]
    pub mapping: FieldTypes,
}

/// `[[tables]] mapping = { ... }`: how the consumer types a new index's
/// fields (see `tidemark_index::derive` for the table of types). Applies
/// when it creates the index; an existing index keeps its mapping.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldTypes {
    /// Derive each field's type from its column's PostgreSQL type, as the
    /// producer recorded it (default true); `false` leaves every field not
    /// in `columns` or the `mappings_file` to OpenSearch's dynamic mapping.
    #[serde(default = "yes")]
    pub derive: bool,
    /// `numeric` columns: `keyword` (default: exact, as the producer sends
    /// them), `scaled_float` (searchable by range, `scaling_factor` decimal
    /// places kept) or `double` (approximate).
    #[serde(default)]
    pub numeric: NumericMapping,
    /// `scaled_float`'s `scaling_factor` (default 100: cents).
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f64,
    /// `json`/`jsonb` columns: `flat_object` (default: searchable, takes any
    /// numbers and mixed arrays, but needs an object at the top),
    /// `disabled` (kept in `_source` only, takes any JSON) or `dynamic`
    /// (OpenSearch guesses from the first document).
    #[serde(default)]
    pub json: JsonMapping,
    /// Column name -> its OpenSearch mapping, replacing the derived one,
    /// e.g. `{ price = { type = "scaled_float", scaling_factor = 100 } }`.
    #[serde(default)]
    pub columns: std::collections::BTreeMap<String, serde_json::Value>,
}

impl Default for FieldTypes {
    fn default() -> Self {
        FieldTypes {
            derive: true,
            numeric: NumericMapping::default(),
            scaling_factor: default_scaling_factor(),
            json: JsonMapping::default(),
            columns: Default::default(),
        }
    }
}

fn yes() -> bool {
    true
}

fn default_scaling_factor() -> f64 {
    100.0
}

/// `mapping.numeric`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NumericMapping {
    #[default]
    Keyword,
    ScaledFloat,
    Double,
}

/// `mapping.json`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JsonMapping {
    #[default]
    FlatObject,
    Disabled,
    Dynamic,
}

impl Table {
    /// The target index (or alias) name.
    pub fn index_name(&self, kafka: &Kafka) -> String {
        match &self.index {
            Some(index) => index.clone(),
            None => {
                let (schema, table) = self.parts();
                kafka.table_topic(schema, table)
            }
        }
    }

    /// The schema and table name (validated to have both).
    pub fn parts(&self) -> (&str, &str) {
        self.table
            .split_once('.')
            .unwrap_or(("public", &self.table))
    }
}

impl Table {
    /// Whether `column` goes into the document (include/exclude).
    fn in_document(&self, column: &str) -> bool {
        !self.exclude.iter().any(|c| c == column)
            && self
                .include
                .as_ref()
                .is_none_or(|inc| inc.iter().any(|c| c == column))
    }

    fn validate_mapping(&self, i: usize, kafka: &Kafka) -> Result<(), ConfigError> {
        let index = self.index_name(kafka);
        if !is_index_name(&index) {
            return Err(invalid(
                format!("tables[{i}].index"),
                format!(
                    "{index:?} is not a valid OpenSearch index name (lowercase; no spaces or \\/*?\"<>|,#; not starting with -, _ or +){}",
                    if self.index.is_none() {
                        "; set index = \"...\" for this table"
                    } else {
                        ""
                    }
                ),
            ));
        }
        if let Some(id) = &self.id
            && id.is_empty()
        {
            return Err(invalid(
                format!("tables[{i}].id"),
                "must list at least one key column",
            ));
        }
        if self.include.is_some() && !self.exclude.is_empty() {
            return Err(invalid(
                format!("tables[{i}].exclude"),
                "use include or exclude, not both",
            ));
        }
        let mut targets = std::collections::HashMap::new();
        for (column, field) in &self.rename {
            let name = format!("tables[{i}].rename.{column}");
            if field.is_empty() || field.starts_with('_') {
                return Err(invalid(
                    name,
                    format!(
                        "{field:?}: document fields must not be empty or start with '_' (reserved by OpenSearch and for {META_FIELD})"
                    ),
                ));
            }
            if let Some(other) = targets.insert(field.as_str(), column.as_str()) {
                return Err(invalid(
                    name,
                    format!("{field:?} is also the new name of column {other:?}"),
                ));
            }
            if !self.in_document(column) {
                return Err(invalid(
                    name,
                    format!("column {column:?} is not in the document (see include/exclude)"),
                ));
            }
        }
        let types = &self.mapping;
        if !(types.scaling_factor.is_finite() && types.scaling_factor > 0.0) {
            return Err(invalid(
                format!("tables[{i}].mapping.scaling_factor"),
                format!(
                    "{}: must be a positive number, e.g. 100",
                    types.scaling_factor
                ),
            ));
        }
        for (column, value) in &types.columns {
            let name = format!("tables[{i}].mapping.columns.{column}");
            if !value.get("type").is_some_and(|t| t.is_string()) {
                return Err(invalid(
                    name,
                    "must be an OpenSearch field mapping with a type, e.g. { type = \"keyword\" }",
                ));
            }
            if !self.in_document(column) {
                return Err(invalid(
                    name,
                    format!("column {column:?} is not in the document (see include/exclude)"),
                ));
            }
        }
        // A kept, unrenamed column whose name a rename also produces would

        // make two values for one field.
        let kept = |c: &String| !self.exclude.contains(c) && !self.rename.contains_key(c);
        if let Some(include) = &self.include {
            for column in include.iter().filter(|c| kept(c)) {
                if let Some(other) = targets.get(column.as_str()) {
                    return Err(invalid(
                        format!("tables[{i}].rename.{other}"),
                        format!("{column:?} is also an included column's name"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The `[[tables]]` constraints: each entry, then that no two share an index.
pub(crate) fn validate(tables: &[Table], kafka: &Kafka) -> Result<(), ConfigError> {
    if tables.is_empty() {
        return Err(invalid(
            "tables",
            "list at least one [[tables]] entry with table = \"schema.table\"",
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for (i, table) in tables.iter().enumerate() {
        let field = format!("tables[{i}].table");
        let Some((schema, name)) = table.table.split_once('.') else {
            return Err(invalid(
                field,
                format!("{:?} must be schema.table", table.table),
            ));
        };
        if schema.is_empty() || name.is_empty() || name.contains('.') {
            return Err(invalid(
                field,
                format!("{:?} must be schema.table", table.table),
            ));
        }
        if !seen.insert(&table.table) {
            return Err(invalid(field, format!("{:?} is listed twice", table.table)));
        }
        if !is_topic_name(&kafka.table_topic(schema, name)) {
            return Err(invalid(
                field,
                format!("{:?} does not make a valid Kafka topic name", table.table),
            ));
        }
        table.validate_mapping(i, kafka)?;
    }
    let mut indices = std::collections::HashMap::new();
    for (i, table) in tables.iter().enumerate() {
        if let Some(other) = indices.insert(table.index_name(kafka), i) {
            return Err(invalid(
                format!("tables[{i}].index"),
                format!(
                    "{:?} is also the index of tables[{other}] ({}); each table needs its own index",
                    table.index_name(kafka),
                    tables[other].table
                ),
            ));
        }
    }
    Ok(())
}
