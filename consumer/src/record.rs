//! What a Kafka record must be before the consumer applies it: an event of
//! the table its topic is for, under the record key the producer gives that
//! row (`tidemark_schemas::record_key`), whose key columns in `after` are
//! the key. A record that breaks this was not written by our producer for
//! that row (a hand-made or forged record, a bug): applying it could create
//! a document no row has, or write one row's values under another's id. It
//! is a bad record: a dead letter naming the reason, never applied.
//!
//! The checks never print values: they name the table and the column.

use std::collections::HashMap;

use tidemark_schemas::config::Config;
use tidemark_schemas::{ChangeEvent, Operation, record_key};

/// The table each consumed topic carries, from the config.
#[derive(Debug, Clone)]
pub struct Topics {
    tables: HashMap<String, (String, String)>,
}

impl Topics {
    pub fn new(config: &Config) -> Topics {
        let tables = config
            .tables
            .iter()
            .map(|t| {
                let (schema, name) = t.parts();
                (
                    config.kafka.table_topic(schema, name),
                    (schema.to_owned(), name.to_owned()),
                )
            })
            .collect();
        Topics { tables }
    }

    /// The topics to subscribe to.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.tables.keys().cloned().collect();
        names.sort();
        names
    }

    /// `Ok` when the record in `topic` under `key` may be applied as
    /// `event`; else why not.
    pub fn check(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        event: &ChangeEvent,
    ) -> Result<(), String> {
        let table = event.source.qualified();
        if let Some((schema, name)) = self.tables.get(topic)
            && (schema != &event.source.schema || name != &event.source.table)
        {
            return Err(format!(
                "a record in topic {topic} (table {schema}.{name}) claims table {table}"
            ));
        }
        let expected = record_key(&event.source, &event.key);
        if key != Some(expected.as_slice()) {
            return Err(format!(
                "table {table}: the record key does not match the event's table and key"
            ));
        }
        if matches!(event.op, Operation::Truncate | Operation::Resnapshot) {
            return Ok(());
        }
        let Some(after) = &event.after else {
            return Ok(());
        };
        for (column, value) in &event.key {
            if event.unchanged_toast.iter().any(|c| c == column) {
                continue;
            }
            if after.get(column) != Some(value) {
                return Err(format!(
                    "table {table}: key column {column:?} in `after` does not match the event's key"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};
    use tidemark_schemas::{FORMAT_VERSION, Lsn, Row, Source};

    fn topics() -> Topics {
        let text = "[postgres]\nurl = \"postgres://u@h/db\"\n[kafka]\nbrokers = \"h:1\"\ntopic_prefix = \"p\"\n\
                    [[tables]]\ntable = \"public.a\"\n[[tables]]\ntable = \"public.b\"\n";
        Topics::new(&Config::from_toml(text, |_| None).expect("config"))
    }

    fn row(value: Value) -> Row {
        match value {
            Value::Object(map) => map,
            _ => panic!("an object"),
        }
    }

    fn event(table: &str, op: Operation, key: Value, after: Option<Value>) -> ChangeEvent {
        ChangeEvent {
            format: FORMAT_VERSION,
            source: Source {
                database: "db".into(),
                schema: "public".into(),
                table: table.into(),
            },
            op,
            key: row(key),
            before: None,
            after: after.map(row),
            unchanged_toast: vec![],
            commit_lsn: Lsn(16),
            timeline: 1,
            lsn: Lsn(8),
            xid: Some(1),
            commit_time: "2026-12-01T10:00:00.000000Z".into(),
        }
    }

    fn key_of(e: &ChangeEvent) -> Vec<u8> {
        record_key(&e.source, &e.key)
    }

    #[test]
    fn a_record_as_the_producer_writes_it_passes() {
        let t = topics();
        let insert = event(
            "a",
            Operation::Insert,
            json!({"id": 1}),
            Some(json!({"id": 1, "x": "v"})),
        );
        assert_eq!(
            t.check("p.public.a", Some(&key_of(&insert)), &insert),
            Ok(())
        );
        let delete = event("a", Operation::Delete, json!({"id": 1}), None);
        assert_eq!(
            t.check("p.public.a", Some(&key_of(&delete)), &delete),
            Ok(())
        );
        let truncate = event("a", Operation::Truncate, json!({}), None);
        assert_eq!(
            t.check("p.public.a", Some(&key_of(&truncate)), &truncate),
            Ok(())
        );
        let mut toast = event(
            "a",
            Operation::Update,
            json!({"id": "k"}),
            Some(json!({"x": 1})),
        );
        toast.unchanged_toast = vec!["id".into()];
        assert_eq!(t.check("p.public.a", Some(&key_of(&toast)), &toast), Ok(()));
    }

    #[test]
    fn mismatched_records_are_refused_naming_the_table_and_column() {
        let t = topics();
        // The envelope's key and its row disagree.
        let forged = event(
            "a",
            Operation::Insert,
            json!({"id": 999999}),
            Some(json!({"id": 1})),
        );
        let err = t
            .check("p.public.a", Some(&key_of(&forged)), &forged)
            .expect_err("after");
        assert_eq!(
            err,
            "table public.a: key column \"id\" in `after` does not match the event's key"
        );
        // The Kafka key is another row's.
        let insert = event(
            "a",
            Operation::Insert,
            json!({"id": 1}),
            Some(json!({"id": 1})),
        );
        let other = event(
            "a",
            Operation::Insert,
            json!({"id": 2}),
            Some(json!({"id": 2})),
        );
        let err = t
            .check("p.public.a", Some(&key_of(&other)), &insert)
            .expect_err("key");
        assert!(err.contains("record key does not match"), "{err}");
        assert!(t.check("p.public.a", None, &insert).is_err(), "no key");
        // An event of table b in a's topic.
        let b = event(
            "b",
            Operation::Insert,
            json!({"id": 1}),
            Some(json!({"id": 1})),
        );
        let err = t
            .check("p.public.a", Some(&key_of(&b)), &b)
            .expect_err("topic");
        assert_eq!(
            err,
            "a record in topic p.public.a (table public.a) claims table public.b"
        );
        // A key column missing from `after` is a mismatch too.
        let missing = event(
            "a",
            Operation::Update,
            json!({"id": 1}),
            Some(json!({"x": 1})),
        );
        assert!(
            t.check("p.public.a", Some(&key_of(&missing)), &missing)
                .is_err()
        );
    }
}
