//! Golden files for the envelope's wire format: a change to what is written
//! to Kafka must show up here as a diff someone reviews, not slip through.
//! Set `TIDEMARK_BLESS=1` to rewrite the files after an intended change.

use serde_json::{Value, json};
use tidemark_schemas::{
    ChangeEvent, DeadLetter, FORMAT_VERSION, Lsn, Operation, Origin, Row, Source, Stage,
};

fn row(value: Value) -> Row {
    match value {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

fn check(name: &str, event: &ChangeEvent) {
    check_wire(name, &event.to_vec(), event, |bytes| {
        ChangeEvent::from_slice(bytes).expect("golden parses")
    });
}

/// Compares `payload` (pretty-printed) with the golden file `name` and
/// parses the file back into `value`.
fn check_wire<T: PartialEq + std::fmt::Debug>(
    name: &str,
    payload: &[u8],
    value: &T,
    parse: impl Fn(&[u8]) -> T,
) {
    let path = format!("{}/tests/golden/{name}.json", env!("CARGO_MANIFEST_DIR"));
    let written =
        serde_json::to_string_pretty(&serde_json::from_slice::<Value>(payload).expect("json"))
            .expect("pretty")
            + "\n";
    if std::env::var_os("TIDEMARK_BLESS").is_some() {
        std::fs::write(&path, &written).expect("bless");
    }
    let golden = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(written, golden, "wire format of {name} changed");
    assert_eq!(&parse(golden.as_bytes()), value, "{name} round-trips");
}

fn source() -> Source {
    Source {
        database: "shop".into(),
        schema: "public".into(),
        table: "articles".into(),
    }
}

#[test]
fn update_with_unchanged_toast() {
    check(
        "update_unchanged_toast",
        &ChangeEvent {
            format: FORMAT_VERSION,
            source: source(),
            op: Operation::Update,
            key: row(json!({"id": 42})),
            before: Some(row(json!({"id": 42}))),
            after: Some(row(
                json!({"id": 42, "hidden": true, "price": "19.90", "tags": ["a", null]}),
            )),
            unchanged_toast: vec!["body".into()],
            commit_lsn: Lsn(0x1_6B37_4D48),
            timeline: 1,
            lsn: Lsn(0x1_6B37_4C10),
            xid: Some(7781),
            commit_time: "2026-11-22T10:15:00.123456Z".into(),
        },
    );
}

#[test]
fn snapshot_row() {
    check(
        "snapshot",
        &ChangeEvent {
            format: FORMAT_VERSION,
            source: source(),
            op: Operation::Snapshot,
            key: row(json!({"id": 1})),
            before: None,
            after: Some(row(json!({"id": 1, "title": "hello", "body": "aGk="}))),
            unchanged_toast: vec![],
            commit_lsn: Lsn(0x1_0000_0028),
            timeline: 1,
            lsn: Lsn(0x1_0000_0028),
            xid: None,
            commit_time: "2026-11-22T09:00:00.000000Z".into(),
        },
    );
}

#[test]
fn delete() {
    check(
        "delete",
        &ChangeEvent {
            format: FORMAT_VERSION,
            source: source(),
            op: Operation::Delete,
            key: row(json!({"id": 42})),
            before: Some(row(json!({"id": 42}))),
            after: None,
            unchanged_toast: vec![],
            commit_lsn: Lsn(0x1_6B37_5000),
            timeline: 1,
            lsn: Lsn(0x1_6B37_4F00),
            xid: Some(7790),
            commit_time: "2026-11-22T10:16:00.000001Z".into(),
        },
    );
}

/// The dead-letter record's wire form, for each stage that writes one.
fn check_dead_letter(name: &str, letter: &DeadLetter) {
    check_wire(name, &letter.to_vec(), letter, |bytes| {
        DeadLetter::from_slice(bytes).expect("golden parses")
    });
}

fn refused_event() -> ChangeEvent {
    ChangeEvent {
        format: FORMAT_VERSION,
        source: source(),
        op: Operation::Insert,
        key: row(json!({"id": 42})),
        before: None,
        after: Some(row(json!({"id": 42, "body": "row contents"}))),
        unchanged_toast: vec![],
        commit_lsn: Lsn(0x1_6B37_4D48),
        timeline: 1,
        lsn: Lsn(0x1_6B37_4C10),
        xid: Some(7781),
        commit_time: "2026-11-22T10:15:00.123456Z".into(),
    }
}

#[test]
fn consumer_dead_letter() {
    let letter = DeadLetter {
        origin: Some(Origin {
            topic: "tidemark.public.articles".into(),
            partition: 3,
            offset: 1207,
        }),
        ..DeadLetter::new(
            Stage::Consumer,
            Some(&refused_event()),
            None,
            "mapper_parsing_exception: failed to parse field [price] of type [long]",
        )
    };
    check_dead_letter("dead_letter_consumer", &letter);
    assert!(
        !String::from_utf8_lossy(&letter.to_vec()).contains("row contents"),
        "a dead letter carries no row contents"
    );
    assert_eq!(letter.place(), "tidemark.public.articles/3/1207");
    assert_eq!(letter.table_topic(), Some("tidemark.public.articles"));
}

#[test]
fn producer_dead_letter() {
    // A row the producer could not map: only the table and the LSN are known.
    let letter = DeadLetter {
        lsn: Some(Lsn(0x1_6B37_4C10)),
        topic: Some("tidemark.public.articles".into()),
        ..DeadLetter::new(
            Stage::Producer,
            None,
            Some("public.articles"),
            "public.articles.price: numeric text is not a number",
        )
    };
    check_dead_letter("dead_letter_producer", &letter);
    assert_eq!(letter.place(), "lsn 1/6B374C10");
    assert_eq!(letter.table_topic(), Some("tidemark.public.articles"));
}
