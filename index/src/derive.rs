//! An index's field types, derived from its table's columns: what the
//! consumer creates a new index with, so OpenSearch never guesses a type
//! from the first document it sees (and then refuses the next one: a
//! `"NaN"` double, a 30-digit number inside a `jsonb`, a mixed array).
//!
//! The columns come from the producer, which records each table's shape
//! (name and type OID per column, `tidemark_schemas::state`) before the
//! table's first row reaches Kafka; the consumer needs no PostgreSQL
//! credentials. What JSON each type becomes is `tidemark_schemas::values`;
//! this module says which OpenSearch type takes that JSON:
//!
//! | PostgreSQL | JSON (producer) | OpenSearch |
//! | --- | --- | --- |
//! | bool | true / false | `boolean` |
//! | int2, int4, int8, oid | number | `long` |
//! | float4, float8 | number, or `"NaN"` / `"Infinity"` | `double`, `ignore_malformed` (a non-finite value stays in `_source`, unindexed) |
//! | numeric | exact string | `keyword` (default), or `scaled_float` / `double` by `mapping.numeric` |
//! | bytea | base64 | `binary` |
//! | json, jsonb | nested JSON | `flat_object` (default: every leaf a keyword, any numbers, mixed arrays), or `disabled` / `dynamic` by `mapping.json` |
//! | timestamptz, timestamp | ISO 8601 with microseconds | `date`, `ignore_malformed` (`infinity` and BC dates stay in `_source`); searches and sorts see milliseconds |
//! | date | `2026-11-22` | `date`, `ignore_malformed` |
//! | uuid | its text | `keyword` |
//! | text, varchar, char, name | the text | `text` with a `keyword` subfield (`ignore_above` 256) |
//! | arrays | arrays | their element's type |
//! | anything else (enums, domains, time, interval, inet, ...) | its text | not mapped: OpenSearch's dynamic mapping |
//!
//! A column's mapping in `mapping.columns` replaces the derived one, and a
//! field the `mappings_file` maps replaces both. Excluded columns are not
//! mapped; renamed ones are mapped under their field name.

use serde_json::{Map, Value, json};
use tidemark_schemas::config::{JsonMapping, NumericMapping, Table};
use tidemark_schemas::values::{Mapping, array_element};

use crate::mapping::TableMapping;

/// The properties (document field -> its OpenSearch mapping) for `table`'s
/// index: derived from `columns` (name, type OID) where known and
/// `mapping.derive` is on, then the config's per-column mappings.
pub fn properties(
    table: &Table,
    mapping: &TableMapping,
    columns: Option<&[(String, u32)]>,
) -> Map<String, Value> {
    let options = &table.mapping;
    let mut properties = Map::new();
    if options.derive
        && let Some(columns) = columns
    {
        for (column, oid) in columns {
            let Some(field) = mapping.field(column) else {
                continue;
            };
            if let Some(derived) = field_type(*oid, table) {
                properties.insert(field.to_owned(), derived);
            }
        }
    }
    for (column, value) in &options.columns {
        if let Some(field) = mapping.field(column) {
            properties.insert(field.to_owned(), value.clone());
        }
    }
    properties
}

/// What values an OpenSearch field type takes, coarsely: two types of one
/// kind take the same JSON (`float` and `double`, `text` and `keyword`,
/// `object` and `flat_object`), so an index typed one way still takes the
/// rows a column typed the other way gives. A change of kind (`text` to
/// `flat_object`, `long` to `text`) is the one rule for "a column's type
/// changed to one the index cannot take": the consumer waits on it rather
/// than dead-letter the rows, and `audit --watch --reindex` reindexes.
pub fn kind_of(mapping_type: &str) -> &str {
    match mapping_type {
        "text" | "keyword" | "match_only_text" | "wildcard" | "constant_keyword"
        | "search_as_you_type" => "string",
        "long" | "integer" | "short" | "byte" | "double" | "float" | "half_float"
        | "scaled_float" | "unsigned_long" => "number",
        "date" | "date_nanos" => "date",
        "object" | "nested" | "flat_object" => "object",
        other => other,
    }
}

/// The OpenSearch mapping for a column of type `oid`, or `None` where
/// dynamic mapping decides. An array maps as its element: arrays are
/// implicit in OpenSearch.
pub fn field_type(oid: u32, table: &Table) -> Option<Value> {
    let element = array_element(oid).unwrap_or(oid);
    // Types whose JSON is their text, which OpenSearch can type better.
    match element {
        // Character types as full text with an exact subfield, as dynamic
        // mapping makes them (so `field.keyword` queries keep working).
        25 | 1043 | 1042 | 18 | 19 => {
            return Some(json!({
                "type": "text",
                "fields": {"keyword": {"type": "keyword", "ignore_above": 256}},
            }));
        }
        2950 => return Some(json!({"type": "keyword"})),
        1082 => return Some(date()),
        _ => {}
    }
    kind_type(&Mapping::builtin(element)?, table)
}

fn kind_type(kind: &Mapping, table: &Table) -> Option<Value> {
    Some(match kind {
        Mapping::Bool => json!({"type": "boolean"}),
        Mapping::Integer => json!({"type": "long"}),
        Mapping::Float => json!({"type": "double", "ignore_malformed": true}),
        Mapping::Numeric => match table.mapping.numeric {
            NumericMapping::Keyword => json!({"type": "keyword"}),
            NumericMapping::Double => json!({"type": "double", "ignore_malformed": true}),
            NumericMapping::ScaledFloat => json!({
                "type": "scaled_float",
                "scaling_factor": table.mapping.scaling_factor,
                "ignore_malformed": true,
            }),
        },
        Mapping::Bytea => json!({"type": "binary"}),
        Mapping::Json => match table.mapping.json {
            JsonMapping::FlatObject => json!({"type": "flat_object"}),
            JsonMapping::Disabled => json!({"type": "object", "enabled": false}),
            JsonMapping::Dynamic => return None,
        },
        Mapping::Timestamp | Mapping::TimestampTz => date(),
        Mapping::Text | Mapping::Array(_) => return None,
    })
}

/// A date field that takes the producer's ISO 8601 text (microseconds,
/// with or without `Z`: the default format, `strict_date_optional_time`)
/// and keeps `infinity` and BC dates in `_source`.
fn date() -> Value {
    json!({"type": "date", "ignore_malformed": true})
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_schemas::config::Config;

    #[test]
    fn a_change_of_kind_is_one_the_index_cannot_take() {
        assert_eq!(kind_of("float"), kind_of("double"));
        assert_eq!(kind_of("text"), kind_of("keyword"));
        assert_eq!(kind_of("object"), kind_of("flat_object"));
        assert_ne!(kind_of("text"), kind_of("flat_object"));
        assert_ne!(kind_of("long"), kind_of("text"));
        assert_ne!(kind_of("date"), kind_of("keyword"));
        assert_eq!(kind_of("binary"), "binary");
    }

    fn table(extra: &str) -> (Table, TableMapping) {
        let text = format!(
            "[postgres]\nurl = \"postgres://u@h/db\"\n[kafka]\nbrokers = \"b:9092\"\n\
             [opensearch]\nurl = \"http://o:9200\"\n[[tables]]\ntable = \"public.t\"\n\
             rename = {{ b = \"bee\" }}\nexclude = [\"secret\"]\n{extra}"
        );
        let config = Config::from_toml(&text, |_| None).expect("a config");
        let t = config.tables[0].clone();
        let m = TableMapping::new(&t, &config);
        (t, m)
    }

    fn columns() -> Vec<(String, u32)> {
        [
            ("id", 23),
            ("price", 1700),
            ("ratio", 701),
            ("doc", 3802),
            ("at", 1184),
            ("day", 1082),
            ("b", 25),
            ("tags", 1009),
            ("blob", 17),
            ("secret", 25),
            ("span", 1186),
        ]
        .iter()
        .map(|(n, o)| (n.to_string(), *o))
        .collect()
    }

    #[test]
    fn each_type_gets_the_field_type_that_takes_its_json() {
        let (t, m) = table("");
        let p = properties(&t, &m, Some(&columns()));
        assert_eq!(p["id"]["type"], "long");
        assert_eq!(p["price"]["type"], "keyword");
        assert_eq!(
            p["ratio"],
            json!({"type": "double", "ignore_malformed": true})
        );
        assert_eq!(p["doc"]["type"], "flat_object");
        assert_eq!(p["at"]["type"], "date");
        assert_eq!(p["at"]["ignore_malformed"], true);
        assert_eq!(p["day"]["type"], "date");
        assert_eq!(p["tags"]["type"], "text");
        assert_eq!(p["tags"]["fields"]["keyword"]["ignore_above"], 256);
        assert_eq!(p["blob"]["type"], "binary");
        // Renamed under its field, excluded not at all, interval dynamic.
        assert_eq!(p["bee"]["type"], "text");
        assert!(!p.contains_key("b") && !p.contains_key("secret"));
        assert!(!p.contains_key("span"));
    }

    #[test]
    fn the_config_chooses_numeric_and_json_and_overrides_a_column() {
        let (t, m) = table(
            "mapping = { numeric = \"scaled_float\", scaling_factor = 1000, json = \"disabled\", \
             columns = { ratio = { type = \"float\" } } }",
        );
        let p = properties(&t, &m, Some(&columns()));
        assert_eq!(
            p["price"],
            json!({"type": "scaled_float", "scaling_factor": 1000.0, "ignore_malformed": true})
        );
        assert_eq!(p["doc"], json!({"type": "object", "enabled": false}));
        assert_eq!(p["ratio"], json!({"type": "float"}));
    }

    #[test]
    fn without_derivation_only_the_configured_columns_are_mapped() {
        let (t, m) =
            table("mapping = { derive = false, columns = { price = { type = \"double\" } } }");
        let p = properties(&t, &m, Some(&columns()));
        assert_eq!(p.len(), 1);
        assert_eq!(p["price"]["type"], "double");
        let (t, m) = table("");
        assert!(properties(&t, &m, None).is_empty());
    }
}
