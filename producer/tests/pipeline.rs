//! The producer against real PostgreSQL and Kafka: what arrives, in what
//! order, with which values.

mod support;

use std::collections::BTreeMap;

use serde_json::{Value, json};
use support::Harness;
use tidemark_schemas::{Lsn, Operation};

fn schema_validator() -> jsonschema::Validator {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../schemas/envelope.schema.json"
    );
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(path).expect("schema file"))
        .expect("schema JSON");
    jsonschema::validator_for(&schema).expect("valid JSON Schema")
}

/// Snapshot rows, then inserts, updates (also of the primary key), deletes
/// and a truncate: every change arrives, each key's changes in commit order,
/// every envelope valid against the JSON Schema, timestamps = commit time.
#[tokio::test(flavor = "multi_thread")]
async fn every_operation_arrives_in_commit_order_per_key() {
    let h = Harness::new("ops").await;
    let table = h.table("items");
    h.create_table(&table, "id int PRIMARY KEY, v text NOT NULL")
        .await;
    h.pg.batch_execute(&format!(
        "INSERT INTO {table} VALUES (1, 'a1'), (2, 'b1'), (3, 'c1')"
    ))
    .await
    .expect("seed");
    let config = h.config(&[&table], "");
    let mut producer = h.start(&config, 0);
    h.wait_ready(&mut producer, 0).await;

    h.pg.batch_execute(&format!(
        "BEGIN; UPDATE {table} SET v = 'a2' WHERE id = 1; INSERT INTO {table} VALUES (4, 'd1'); COMMIT;
         UPDATE {table} SET v = 'a3' WHERE id = 1;
         DELETE FROM {table} WHERE id = 2;
         UPDATE {table} SET id = 30 WHERE id = 3;
         INSERT INTO {table} VALUES (2, 'b2');
         TRUNCATE {table};
         INSERT INTO {table} VALUES (1, 'a4');"
    ))
    .await
    .expect("workload");

    let topic = h.topic(&table);
    // 3 snapshot + 2 + 1 + 1 + 2 (PK change) + 1 + 3 truncate copies + 1.
    let records = h.read_until(&topic, |r| r.len() >= 14);
    h.stop(producer, 0);

    let validator = schema_validator();
    for record in &records {
        if let Err(error) = validator.validate(&record.raw) {
            panic!(
                "envelope does not match the JSON Schema: {error}\n{}",
                record.raw
            );
        }
        assert_eq!(
            record.lsn_header.as_deref(),
            Some(record.event.commit_lsn.to_string().as_str())
        );
        let commit_millis = record
            .event
            .commit_time
            .parse::<jiff::Timestamp>()
            .expect("time")
            .as_millisecond();
        assert_eq!(
            record.timestamp,
            Some(commit_millis),
            "record timestamp is the commit time"
        );
    }

    // Per key, in partition order: (op, v).
    let mut per_key: BTreeMap<i64, Vec<(Operation, Option<String>)>> = BTreeMap::new();
    let mut truncates = 0;
    let mut sorted = records.clone();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    let mut last_lsn_per_partition: BTreeMap<i32, Lsn> = BTreeMap::new();
    for r in &sorted {
        let last = last_lsn_per_partition.entry(r.partition).or_default();
        assert!(
            r.event.commit_lsn >= *last,
            "commit LSNs never go back within a partition"
        );
        *last = r.event.commit_lsn;
        if r.event.op == Operation::Truncate {
            truncates += 1;
            continue;
        }
        let id = r.event.key["id"].as_i64().expect("integer key");
        let v = r
            .event
            .after
            .as_ref()
            .map(|a| a["v"].as_str().expect("v").to_owned());
        per_key.entry(id).or_default().push((r.event.op, v));
    }
    use Operation::*;
    let s = |v: &str| Some(v.to_owned());
    assert_eq!(truncates, 3, "a truncate reaches every partition");
    assert_eq!(
        per_key[&1],
        [
            (Snapshot, s("a1")),
            (Update, s("a2")),
            (Update, s("a3")),
            (Insert, s("a4"))
        ]
    );
    assert_eq!(
        per_key[&2],
        [(Snapshot, s("b1")), (Delete, None), (Insert, s("b2"))]
    );
    assert_eq!(per_key[&3], [(Snapshot, s("c1")), (Delete, None)]);
    assert_eq!(per_key[&30], [(Update, s("c1"))]);
    assert_eq!(per_key[&4], [(Insert, s("d1"))]);

    let snapshot_lsn = records
        .iter()
        .find(|r| r.event.op == Snapshot)
        .expect("snapshot")
        .event
        .commit_lsn;
    assert!(
        records
            .iter()
            .filter(|r| r.event.op != Snapshot)
            .all(|r| r.event.commit_lsn > snapshot_lsn),
        "streamed changes are newer than the snapshot"
    );
    h.cleanup(&[&table]).await;
}

/// Every PostgreSQL type of the issue's table, through a real stream and a
/// real snapshot, maps to the same exact JSON.
#[tokio::test(flavor = "multi_thread")]
async fn every_type_maps_without_loss_in_snapshot_and_stream() {
    let h = Harness::new("types").await;
    let table = h.table("types");
    let mood = format!("{}_mood", h.name);
    let positive = format!("{}_positive", h.name);
    h.pg.batch_execute(&format!(
        "CREATE TYPE {mood} AS ENUM ('sad', 'happy');
         CREATE DOMAIN {positive} AS int CHECK (VALUE > 0);"
    ))
    .await
    .expect("types");
    h.create_table(
        &table,
        &format!(
            "tenant int, id bigint, small smallint, big bigint, num numeric, f4 real, f8 double precision,
             f_nan double precision, f_inf double precision, t text, vc varchar(10), ch char(3), flag bool,
             raw bytea, u uuid, d date, tm time, ts timestamp, tstz timestamptz, iv interval,
             j json, jb jsonb, ints int[], grid int[][], texts text[], m {mood}, p {positive},
             PRIMARY KEY (tenant, id)"
        ),
    )
    .await;
    let row = "(7, 1, -32768, 9223372036854775807, 12345678901234567890.000000000001, 1.5, 0.1,
        'NaN', '-Infinity', 'héllo \"q\"', 'varchar', 'ab', true, '\\x00ff10', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
        '2026-11-22', '10:15:00.5', '2026-11-22 10:15:00.123456', '2026-11-22 10:15:00.123456+02', '1 year 2 days 3 hours',
        '{\"a\": [1, 2.50]}', '{\"n\": 123456789012345678901234567890, \"s\": \"x\"}', '{1,NULL,3}', '{{1,2},{3,4}}',
        '{\"a,b\",NULL,\"NULL\"}', 'happy', 5)";
    h.pg.batch_execute(&format!("INSERT INTO {table} VALUES {row}"))
        .await
        .expect("snapshot row");
    let config = h.config(&[&table], "");
    let mut producer = h.start(&config, 0);
    h.wait_ready(&mut producer, 0).await;
    h.pg.batch_execute(&format!(
        "INSERT INTO {table} VALUES {}",
        row.replacen("(7, 1,", "(7, 2,", 1)
    ))
    .await
    .expect("streamed row");
    let mut records = h.read_until(&h.topic(&table), |r| r.len() >= 2);
    h.stop(producer, 0);
    // Different keys, so possibly different partitions: order by key.
    records.sort_by_key(|r| r.event.key["id"].as_i64());

    let mut expected = json!({
        "tenant": 7, "small": -32768, "big": 9223372036854775807i64,
        "num": "12345678901234567890.000000000001", "f4": 1.5, "f8": 0.1,
        "f_nan": "NaN", "f_inf": "-Infinity", "t": "héllo \"q\"", "vc": "varchar", "ch": "ab ", "flag": true,
        "raw": "AP8Q", "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "d": "2026-11-22", "tm": "10:15:00.5",
        "ts": "2026-11-22T10:15:00.123456", "tstz": "2026-11-22T08:15:00.123456Z", "iv": "P1Y2DT3H",
        "j": {"a": [1, 2.50]}, "jb": {"n": 123456789012345678901234567890u128, "s": "x"},
        "ints": [1, null, 3], "grid": [[1, 2], [3, 4]], "texts": ["a,b", null, "NULL"], "m": "happy", "p": 5
    });
    // json keeps its text verbatim, so 2.50 stays 2.50 (json! would make it 2.5).
    expected["j"] = serde_json::from_str(r#"{"a": [1, 2.50]}"#).expect("json");
    for (record, (op, id)) in records
        .iter()
        .zip([(Operation::Snapshot, 1), (Operation::Insert, 2)])
    {
        assert_eq!(record.event.op, op);
        assert_eq!(
            record.event.key,
            *json!({"tenant": 7, "id": id}).as_object().expect("key")
        );
        let mut after = Value::Object(record.event.after.clone().expect("after"));
        after.as_object_mut().expect("object").remove("id");
        assert_eq!(after, expected, "{op:?} row");
        // Exact digits survive the wire, not just the value.
        assert_eq!(
            record.raw["after"]["num"],
            json!("12345678901234567890.000000000001")
        );
        assert_eq!(
            record.raw["after"]["jb"]["n"].to_string(),
            "123456789012345678901234567890"
        );
        assert_eq!(record.raw["after"]["j"]["a"][1].to_string(), "2.50");
    }
    h.cleanup(&[&table]).await;
    let _ =
        h.pg.batch_execute(&format!("DROP TYPE {mood}; DROP DOMAIN {positive};"))
            .await;
}

/// An UPDATE that leaves a large TOASTed value alone: with the default
/// replica identity the column is named in `unchanged_toast` and absent from
/// `after`; with REPLICA IDENTITY FULL the value comes along.
#[tokio::test(flavor = "multi_thread")]
async fn unchanged_toast_is_marked_or_carried() {
    let h = Harness::new("toast").await;
    let plain = h.table("plain");
    let full = h.table("full");
    for table in [&plain, &full] {
        h.create_table(table, "id int PRIMARY KEY, title text, body text")
            .await;
        // Random text does not compress, so it is stored out of line.
        h.pg.batch_execute(&format!(
            "ALTER TABLE {table} ALTER COLUMN body SET STORAGE EXTERNAL;
             INSERT INTO {table} SELECT 1, 't', string_agg(md5(g::text), '') FROM generate_series(1, 2000) g;"
        ))
        .await
        .expect("seed");
    }
    h.pg.batch_execute(&format!("ALTER TABLE {full} REPLICA IDENTITY FULL"))
        .await
        .expect("full");
    let config = h.config(&[&plain, &full], "");
    let mut producer = h.start(&config, 0);
    h.wait_ready(&mut producer, 0).await;
    for table in [&plain, &full] {
        h.pg.batch_execute(&format!(
            "UPDATE {table} SET title = 'changed' WHERE id = 1"
        ))
        .await
        .expect("update");
    }
    let plain_records = h.read_until(&h.topic(&plain), |r| r.len() >= 2);
    let full_records = h.read_until(&h.topic(&full), |r| r.len() >= 2);
    h.stop(producer, 0);

    let body_len = 2000 * 32;
    let update = &plain_records[1].event;
    assert_eq!(update.op, Operation::Update);
    assert_eq!(update.unchanged_toast, ["body"]);
    let after = update.after.as_ref().expect("after");
    assert_eq!(after["title"], json!("changed"));
    assert!(!after.contains_key("body"), "an unsent value is not a null");
    let snapshot_body = plain_records[0].event.after.as_ref().expect("after")["body"]
        .as_str()
        .expect("body")
        .len();
    assert_eq!(snapshot_body, body_len);

    let update = &full_records[1].event;
    assert!(update.unchanged_toast.is_empty());
    let body = update.after.as_ref().expect("after")["body"]
        .as_str()
        .expect("body carried");
    assert_eq!(body.len(), body_len);
    h.cleanup(&[&plain, &full]).await;
}

/// A row larger than `producer.max_event_bytes` goes to the dead-letter
/// topic with table, key, LSN and reason (no row contents), and the stream
/// goes on with the next change.
#[tokio::test(flavor = "multi_thread")]
async fn oversized_row_goes_to_the_dead_letter_topic_and_the_stream_goes_on() {
    let h = Harness::new("dlq").await;
    let table = h.table("docs");
    h.create_table(&table, "id int PRIMARY KEY, body text")
        .await;
    let config = h.config(&[&table], "max_event_bytes = 4096");
    let mut producer = h.start(&config, 0);
    h.wait_ready(&mut producer, 0).await;
    h.pg.batch_execute(&format!(
        "INSERT INTO {table} VALUES (1, 'small');
         INSERT INTO {table} VALUES (2, repeat('secret', 2000));
         INSERT INTO {table} VALUES (3, 'after the big one');"
    ))
    .await
    .expect("workload");
    let records = h.read_until(&h.topic(&table), |r| r.len() >= 2);
    let dead = support::read_raw(
        &h.stack.kafka_brokers,
        &format!("{}.dead-letter", h.name),
        1,
    );
    h.stop(producer, 0);

    let mut ids: Vec<i64> = records
        .iter()
        .filter_map(|r| r.event.key["id"].as_i64())
        .collect();
    ids.sort_unstable();
    assert_eq!(
        ids,
        [1, 3],
        "the oversized row is not in the table topic, the next one is"
    );
    let letter: Value = serde_json::from_slice(&dead[0]).expect("dead letter is JSON");
    assert_eq!(letter["table"], json!(format!("public.{table}")));
    assert_eq!(letter["key"], json!({"id": 2}));
    assert_eq!(letter["stage"], json!("producer"));
    assert!(
        letter["lsn"].as_str().is_some_and(|l| l.contains('/')),
        "{letter}"
    );
    assert!(
        letter["reason"]
            .as_str()
            .is_some_and(|r| r.contains("exceeds producer.max_event_bytes (4096)")),
        "{letter}"
    );
    assert!(
        !String::from_utf8_lossy(&dead[0]).contains("secret"),
        "no row contents in the dead letter"
    );
    h.cleanup(&[&table]).await;
}

/// A publication may cover more than the pipeline captures (`FOR ALL
/// TABLES`, or one shared with another pipeline): changes of the other
/// tables, keyless ones too, are skipped and counted; the captured table
/// streams on, truncates included. The test has a database of its own, so
/// its `FOR ALL TABLES` publication touches no other test's tables.
#[tokio::test(flavor = "multi_thread")]
async fn published_tables_not_captured_are_skipped_keyless_ones_too() {
    let h = Harness::new("skip").await;
    let db = h.name.clone();
    h.pg.batch_execute(&format!("CREATE DATABASE {db} OWNER tidemark_repl"))
        .await
        .expect("database");
    let in_db = |url: &str| {
        format!(
            "{}/{db}",
            url.rsplit_once('/').expect("url has a database").0
        )
    };
    let admin = support::pg(&in_db(&h.stack.pg_url)).await;
    admin
        .batch_execute(&format!(
            "CREATE TABLE captured (id int PRIMARY KEY, v text);
             CREATE TABLE keyless (v text);
             CREATE TABLE other (id int PRIMARY KEY, v text);
             ALTER TABLE captured OWNER TO tidemark_repl;
             CREATE PUBLICATION {db} FOR ALL TABLES;"
        ))
        .await
        .expect("tables and publication");
    let config = h.config(&["captured"], "create_publication = false");
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(
        &config,
        text.replace(
            &h.stack.pg_replication_url,
            &in_db(&h.stack.pg_replication_url),
        ),
    )
    .expect("config");
    let mut producer = h.start(&config, 0);
    h.wait_ready(&mut producer, 0).await;
    for round in 0..20 {
        admin
            .batch_execute(&format!(
                "INSERT INTO keyless VALUES ('k{round}');
                 INSERT INTO other VALUES ({round}, 'o');
                 INSERT INTO captured VALUES ({round}, 'c');
                 UPDATE other SET v = 'p' WHERE id = {round};"
            ))
            .await
            .expect("round");
    }
    admin
        .batch_execute("TRUNCATE keyless, other; TRUNCATE captured, keyless;")
        .await
        .expect("truncates");
    let topic = format!("{}.public.captured", h.name);
    // 20 inserts, and the captured table's truncate on each of 3 partitions.
    let records = h.read_until(&topic, |r| {
        r.iter()
            .filter(|r| r.event.op == Operation::Truncate)
            .count()
            >= 3
    });
    assert!(
        producer.try_wait().expect("try_wait").is_none(),
        "the producer exited:\n{}",
        h.log(0)
    );
    let inserts = records
        .iter()
        .filter(|r| r.event.op == Operation::Insert)
        .count();
    assert_eq!(inserts, 20);
    assert!(records.iter().all(|r| r.event.source.table == "captured"));
    let metrics = support::http_get(h.http_port, "/metrics")
        .await
        .unwrap_or_default();
    let skipped = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tidemark_producer_skipped_total "))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    // 20 rounds of 3 changes of other tables, plus the first truncate.
    assert_eq!(skipped, 61, "{metrics}");
    for table in ["keyless", "other"] {
        let topic = format!("{}.public.{table}", h.name);
        assert_eq!(
            tidemark_testkit::topic_record_count(&h.stack.kafka_brokers, &topic),
            0,
            "{topic}"
        );
    }
    assert_eq!(
        tidemark_testkit::topic_record_count(
            &h.stack.kafka_brokers,
            &format!("{}.dead-letter", h.name)
        ),
        0,
        "{}",
        h.log(0)
    );
    h.stop(producer, 0);
    tidemark_testkit::topics::drop_slot(&admin, &h.name).await;
    drop(admin);
    let _ =
        h.pg.batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
            .await;
}
