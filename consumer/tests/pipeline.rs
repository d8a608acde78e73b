//! PostgreSQL -> producer -> Kafka -> `tidemark-consumer` -> OpenSearch, on
//! the local stack: every operation, every type, redelivery, TOAST, dead
//! letters, misconfiguration.

mod support;

use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use serde_json::{Value, json};
use support::{Pipeline, read_raw};
use tidemark_testkit::topic_record_count;

/// Every document's version is the commit LSN of its row's last change.
fn assert_versions_match_last_events(
    pipeline: &Pipeline,
    table: &str,
    docs: &std::collections::BTreeMap<String, Value>,
) {
    let expected = topic_record_count(&pipeline.stack.kafka_brokers, &pipeline.topic(table));
    let last = pipeline.last_events(table, expected as usize);
    for (id, doc) in docs {
        let event = &last
            .get(id)
            .unwrap_or_else(|| panic!("no event for {id}"))
            .event;
        assert_eq!(
            doc["_tidemark"]["version"],
            json!(event.commit_lsn.0),
            "doc {id}"
        );
        assert_eq!(
            doc["_version"],
            json!(event.commit_lsn.0),
            "doc {id} _version"
        );
        assert_eq!(
            doc["_tidemark"]["lsn"],
            json!(event.commit_lsn.to_string()),
            "doc {id}"
        );
        assert_eq!(
            doc["_tidemark"]["commit_time"],
            json!(event.commit_time),
            "doc {id}"
        );
        assert_eq!(
            doc["_tidemark"]["key"],
            Value::Object(event.key.clone()),
            "doc {id}"
        );
        let mut fields = doc.as_object().expect("doc").clone();
        fields.remove("_tidemark");
        fields.remove("_version");
        assert_eq!(
            doc["_tidemark"]["hash"],
            json!(tidemark_index::mapping::content_hash(&fields)),
            "doc {id}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_operation_reaches_the_index_with_its_version() {
    let mut p = Pipeline::new("c_ops").await;
    let table = p.table("t");
    p.create_table(
        &table,
        "id int PRIMARY KEY, title text, n bigint, flag bool",
        "",
    )
    .await;
    p.pg.batch_execute(&format!(
        "INSERT INTO {table} SELECT g, 'snap ' || g, g * 10, g % 2 = 0 FROM generate_series(1, 50) g"
    ))
    .await
    .expect("snapshot rows");
    p.start_producer().await;
    let mut consumer = p.start_consumer();
    consumer.wait_ready().await;
    p.wait_converged(&table, 90, &[&consumer]).await;

    p.pg.batch_execute(&format!(
        "INSERT INTO {table} VALUES (100, 'new', 1, true);
         UPDATE {table} SET title = 'updated', n = n + 1 WHERE id <= 10;
         DELETE FROM {table} WHERE id BETWEEN 11 AND 20;
         UPDATE {table} SET id = 200 WHERE id = 21;
         BEGIN;
           INSERT INTO {table} VALUES (300, 'a', 1, false);
           UPDATE {table} SET title = 'b' WHERE id = 300;
           UPDATE {table} SET title = 'c', n = 3 WHERE id = 300;
         COMMIT;"
    ))
    .await
    .expect("changes");
    let docs = p.wait_converged(&table, 60, &[&consumer]).await;
    assert_eq!(docs.len(), 50 - 10 + 2);
    assert_eq!(docs["300"]["title"], "c");
    assert!(!docs.contains_key("21") && docs.contains_key("200"));
    assert_versions_match_last_events(&p, &table, &docs);

    // A truncate empties the index; rows inserted after it stay.
    p.pg.batch_execute(&format!(
        "TRUNCATE {table}; INSERT INTO {table} VALUES (1, 'after truncate', 1, true), (2, 'x', 2, false);"
    ))
    .await
    .expect("truncate");
    let docs = p.wait_converged(&table, 60, &[&consumer]).await;
    assert_eq!(docs.len(), 2);
    assert_eq!(docs["1"]["title"], "after truncate");
    let text = consumer.metrics().await;
    assert!(
        text.contains(&format!(
            "tidemark_consumer_changes_total{{table=\"public.{table}\",op=\"truncate\"}}"
        )),
        "{text}"
    );
    consumer.stop();
    p.cleanup(&[&table]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_type_reaches_the_index_as_the_producer_sent_it() {
    let mut p = Pipeline::new("c_types").await;
    let table = p.table("types");
    let mood = format!("{}_mood", p.name);
    p.pg.batch_execute(&format!("CREATE TYPE {mood} AS ENUM ('sad', 'happy');"))
        .await
        .expect("enum");
    // Values OpenSearch's dynamic mapping cannot hold (a 30-digit integer
    // inside jsonb is not a long; [1, 2.50] is a long then a float) need a
    // mapping, as they would in production: flat_object for j and jb.
    let mappings = p.dir.join("types-mappings.json");
    std::fs::write(
        &mappings,
        r#"{"properties": {"j": {"type": "flat_object"}, "jb": {"type": "flat_object"}, "num": {"type": "keyword"}}}"#,
    )
    .expect("mappings file");
    p.create_table(
        &table,
        &format!(
            "tenant int, id bigint, small smallint, big bigint, num numeric, f4 real, f8 double precision,
             f_nan double precision, f_inf double precision, t text, vc varchar(10), ch char(3), flag bool,
             raw bytea, u uuid, d date, tm time, ts timestamp, tstz timestamptz, iv interval,
             j json, jb jsonb, ints int[], grid int[][], texts text[], m {mood},
             PRIMARY KEY (tenant, id)"
        ),
        &format!("mappings_file = {:?}", mappings.display().to_string()),
    )
    .await;
    let row = "(7, 1, -32768, 9223372036854775807, 12345678901234567890.000000000001, 1.5, 0.1,
        'NaN', '-Infinity', 'héllo \"q\"', 'varchar', 'ab', true, '\\x00ff10', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
        '2026-11-22', '10:15:00.5', '2026-11-22 10:15:00.123456', '2026-11-22 10:15:00.123456+02', '1 year 2 days 3 hours',
        '{\"a\": [1, 2.50]}', '{\"n\": 123456789012345678901234567890, \"s\": \"x\"}', '{1,NULL,3}', '{{1,2},{3,4}}',
        '{\"a,b\",NULL,\"NULL\"}', 'happy')";
    p.pg.batch_execute(&format!("INSERT INTO {table} VALUES {row}"))
        .await
        .expect("snapshot row");
    p.start_producer().await;
    let mut consumer = p.start_consumer();
    consumer.wait_ready().await;
    p.pg.batch_execute(&format!(
        "INSERT INTO {table} VALUES {}",
        row.replacen("(7, 1,", "(7, 2,", 1)
    ))
    .await
    .expect("streamed row");
    let records = support::read_topic(
        &p.stack.kafka_brokers,
        &p.topic(&table),
        Duration::from_secs(60),
        |r| r.len() >= 2,
    );
    let index = p.index(&table);
    let deadline = Instant::now() + Duration::from_secs(60);
    let docs = loop {
        let docs = p.docs(&index).await;
        if docs.len() >= 2 {
            break docs;
        }
        assert!(
            Instant::now() < deadline,
            "{} docs in {index}:\n{}",
            docs.len(),
            consumer.log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    for record in &records {
        // Composite key, columns in name order: id, tenant.
        let id = format!("{}/7", record.event.key["id"]);
        let mut doc = docs[&id].clone();
        doc.as_object_mut().expect("doc").remove("_tidemark");
        doc.as_object_mut().expect("doc").remove("_version");
        // Exactly what the producer sent, digits included (OpenSearch keeps
        // the source as it was written).
        assert_eq!(doc, record.raw["after"], "document {id}");
        assert_eq!(doc["j"]["a"][1].to_string(), "2.50");
        assert_eq!(doc["jb"]["n"].to_string(), "123456789012345678901234567890");
    }
    assert_eq!(
        consumer
            .counter("tidemark_consumer_dead_letters_total")
            .await,
        0.0
    );
    consumer.stop();
    p.cleanup(&[&table]).await;
    let _ = p.pg.batch_execute(&format!("DROP TYPE {mood}")).await;
}

/// The field types of a new index come from the table's PostgreSQL
/// column types, as the producer recorded them (tidemark_index::derive): no
/// mappings file, and values OpenSearch's dynamic mapping refuses index.
/// The consumer starts before the producer has recorded anything, so the
/// index is created at the table's first change.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_index_is_typed_from_the_column_types() {
    let mut p = Pipeline::new("c_derive").await;
    let table = p.table("typed");
    p.create_table(
        &table,
        "id int PRIMARY KEY, f8 double precision, num numeric, t text, raw bytea, u uuid,
         d date, tstz timestamptz, jb jsonb, ints int[], iv interval",
        "",
    )
    .await;
    // Dynamic mapping would make f8 and jb.n longs and jb.mixed a long
    // from the first row, then refuse the second: NaN, a 30-digit integer,
    // "a" in a numeric array. infinity is no date either.
    p.pg.batch_execute(&format!(
        "INSERT INTO {table} VALUES
         (1, 1.5, 19.90, 'one', '\\x00ff', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '2026-11-22',
          '2026-11-22 10:15:00.123456+00', '{{\"n\": 1, \"mixed\": [1, 2]}}', '{{1,2}}', '1 day')"
    ))
    .await
    .expect("snapshot row");
    let mut consumer = p.start_consumer();
    consumer.wait_ready().await;
    let index = p.index(&table);
    p.start_producer().await;
    p.pg.batch_execute(&format!(
        "INSERT INTO {table} VALUES
         (2, 'NaN', 'NaN', 'two', '\\x01', 'b0eebc99-9c0b-4ef8-bb6d-6bb9bd380a12', 'infinity',
          'infinity', '{{\"n\": 123456789012345678901234567890, \"mixed\": [1, \"a\", {{\"x\": true}}]}}',
          '{{3,NULL}}', '2 hours')"
    ))
    .await
    .expect("streamed row");
    let records = support::read_topic(
        &p.stack.kafka_brokers,
        &p.topic(&table),
        Duration::from_secs(60),
        |r| r.len() >= 2,
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let docs = loop {
        let docs = p.docs(&index).await;
        if docs.len() >= 2 {
            break docs;
        }
        assert!(
            Instant::now() < deadline,
            "{} docs in {index}:\n{}",
            docs.len(),
            consumer.log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    for record in &records {
        let id = record.event.key["id"].to_string();
        let mut doc = docs[&id].clone();
        doc.as_object_mut().expect("doc").remove("_tidemark");
        doc.as_object_mut().expect("doc").remove("_version");
        assert_eq!(doc, record.raw["after"], "document {id}");
    }
    assert_eq!(
        consumer
            .counter("tidemark_consumer_dead_letters_total")
            .await,
        0.0,
        "{}",
        consumer.log()
    );
    let response =
        p.os.indices()
            .get_mapping(opensearch::indices::IndicesGetMappingParts::Index(&[
                &index,
            ]))
            .send()
            .await
            .expect("mapping");
    let mapping: Value = response.json().await.expect("mapping JSON");
    let fields = &mapping[&index]["mappings"]["properties"];
    let kind = |field: &str| {
        fields[field]["type"]
            .as_str()
            .unwrap_or("unmapped")
            .to_owned()
    };
    assert_eq!(kind("id"), "long");
    assert_eq!(kind("f8"), "double");
    assert_eq!(kind("num"), "keyword");
    assert_eq!(kind("t"), "text");
    assert_eq!(fields["t"]["fields"]["keyword"]["type"], "keyword");
    assert_eq!(kind("raw"), "binary");
    assert_eq!(kind("u"), "keyword");
    assert_eq!(kind("d"), "date");
    assert_eq!(kind("tstz"), "date");
    assert_eq!(kind("jb"), "flat_object");
    assert_eq!(kind("ints"), "long");
    assert!(
        consumer
            .log()
            .contains("its index is created at its first change"),
        "the consumer started before the producer recorded the columns:\n{}",
        consumer.log()
    );
    // --print-mappings shows what a new index would get, from Kafka alone.
    let config = p.dir.join("print-mappings.toml");
    std::fs::write(&config, p.config_text(support::free_port(), "")).expect("config");
    let printed = std::process::Command::new(env!("CARGO_BIN_EXE_tidemark-consumer"))
        .arg("--config")
        .arg(&config)
        .arg("--print-mappings")
        .env_remove("TIDEMARK_KAFKA_BROKERS")
        .env_remove("TIDEMARK_OPENSEARCH_URL")
        .output()
        .expect("tidemark-consumer --print-mappings");
    assert!(
        printed.status.success(),
        "{}",
        String::from_utf8_lossy(&printed.stderr)
    );
    let printed: Value = serde_json::from_slice(&printed.stdout).expect("JSON on stdout");
    let entry = printed
        .as_array()
        .and_then(|tables| tables.iter().find(|t| t["index"] == index.as_str()))
        .unwrap_or_else(|| panic!("{index} not printed: {printed:#}"));
    assert_eq!(entry["columns"], "recorded by the producer");
    let printed_fields = entry["mappings"]["properties"]
        .as_object()
        .expect("printed properties");
    assert_eq!(printed_fields.len(), 11, "{printed_fields:#?}");
    for (field, printed) in printed_fields {
        if field != "_tidemark" {
            assert_eq!(
                &fields[field], printed,
                "field {field}: printed and created differ"
            );
        }
    }

    consumer.stop();
    p.cleanup(&[&table]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redelivered_old_event_changes_nothing() {
    let mut p = Pipeline::new("c_redeliver").await;
    let table = p.table("t");
    p.create_table(&table, "id int PRIMARY KEY, title text", "")
        .await;
    p.start_producer().await;
    let mut consumer = p.start_consumer();
    consumer.wait_ready().await;
    p.pg.batch_execute(&format!("INSERT INTO {table} VALUES (1, 'v1')"))
        .await
        .expect("insert");
    p.pg.batch_execute(&format!("UPDATE {table} SET title = 'v2' WHERE id = 1"))
        .await
        .expect("update");
    let before = p.wait_converged(&table, 60, &[&consumer]).await;
    assert_eq!(before["1"]["title"], "v2");

    // Inject the old insert again, into the key's own partition.
    let records = support::read_topic(
        &p.stack.kafka_brokers,
        &p.topic(&table),
        Duration::from_secs(30),
        |r| r.len() >= 2,
    );
    let old = records
        .iter()
        .find(|r| r.event.after.as_ref().is_some_and(|a| a["title"] == "v1"))
        .expect("the v1 insert");
    let payload = serde_json::to_vec(&old.raw).expect("payload");
    // A redelivery is the record as the producer wrote it, key included (a
    // record whose key does not match its event is a dead letter).
    let key = tidemark_schemas::record_key(&old.event.source, &old.event.key);
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &p.stack.kafka_brokers)
        .create()
        .expect("producer");
    producer
        .send(
            BaseRecord::<[u8], [u8]>::to(&p.topic(&table))
                .partition(old.partition)
                .key(&key[..])
                .payload(&payload[..]),
        )
        .map_err(|(e, _)| e)
        .expect("inject");
    producer.flush(Duration::from_secs(10)).expect("flush");

    let deadline = Instant::now() + Duration::from_secs(30);
    while consumer.counter("tidemark_consumer_stale_total").await < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the injected event was not seen as stale:\n{}",
            consumer.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = p.docs(&p.index(&table)).await;
    assert_eq!(after, before, "an old event changed the index");
    consumer.stop();
    p.cleanup(&[&table]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_update_with_unchanged_toast_keeps_the_large_field() {
    let mut p = Pipeline::new("c_toast").await;
    let table = p.table("t");
    p.create_table(&table, "id int PRIMARY KEY, title text, body text", "")
        .await;
    p.start_producer().await;
    let mut consumer = p.start_consumer();
    consumer.wait_ready().await;
    // 12.8 kB of hex digits: too large to stay inline, so TOASTed.
    let big = "(SELECT string_agg(md5(g::text), '') FROM generate_series(1, 400) g)";
    p.pg.batch_execute(&format!("INSERT INTO {table} VALUES (1, 'a', {big})"))
        .await
        .expect("insert");
    p.wait_converged(&table, 60, &[&consumer]).await;
    // In its own batch: the body must come from the index.
    p.pg.batch_execute(&format!("UPDATE {table} SET title = 'b' WHERE id = 1"))
        .await
        .expect("update");
    // In one transaction (so one batch): the body comes from the insert.
    p.pg.batch_execute(&format!(
        "BEGIN; INSERT INTO {table} VALUES (2, 'a', {big}); COMMIT;
         BEGIN; UPDATE {table} SET title = 'b' WHERE id = 2; UPDATE {table} SET title = 'c' WHERE id = 2; COMMIT;"
    ))
    .await
    .expect("insert and update");
    let docs = p.wait_converged(&table, 60, &[&consumer]).await;
    assert_eq!(docs["1"]["title"], "b");
    assert_eq!(docs["1"]["body"].as_str().map(str::len), Some(12_800));
    assert_eq!(docs["2"]["title"], "c");
    // The updates really did leave the body out.
    let records = support::read_topic(
        &p.stack.kafka_brokers,
        &p.topic(&table),
        Duration::from_secs(30),
        |r| r.len() >= 5,
    );
    let toasted = records
        .iter()
        .filter(|r| r.event.unchanged_toast == ["body"])
        .count();
    assert!(
        toasted >= 2,
        "updates did not mark body unchanged: {records:#?}"
    );
    assert_eq!(
        consumer
            .counter("tidemark_consumer_incomplete_toast_total")
            .await,
        0.0
    );
    consumer.stop();
    p.cleanup(&[&table]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_and_rejected_records_go_to_the_dead_letter_topic() {
    let mut p = Pipeline::new("c_dlq").await;
    let table = p.table("t");
    let mappings = p.dir.join("mappings.json");
    std::fs::write(
        &mappings,
        r#"{"mappings": {"properties": {"code": {"type": "long"}}}}"#,
    )
    .expect("mappings file");
    p.create_table(
        &table,
        "id int PRIMARY KEY, code text",
        &format!("mappings_file = {:?}", mappings.display().to_string()),
    )
    .await;
    p.start_producer().await;
    let mut consumer = p.start_consumer();
    consumer.wait_ready().await;
    p.pg.batch_execute(&format!(
        "INSERT INTO {table} VALUES (1, '12'), (2, 'not a number'), (3, '7')"
    ))
    .await
    .expect("rows");
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &p.stack.kafka_brokers)
        .create()
        .expect("producer");
    producer
        .send(
            BaseRecord::<[u8], [u8]>::to(&p.topic(&table))
                .partition(0)
                .key(&b"garbage"[..])
                .payload(&b"{not json"[..]),
        )
        .map_err(|(e, _)| e)
        .expect("inject");
    producer.flush(Duration::from_secs(10)).expect("flush");
    p.pg.batch_execute(&format!("INSERT INTO {table} VALUES (4, '40')"))
        .await
        .expect("row after");

    let dead = read_raw(
        &p.stack.kafka_brokers,
        &format!("{}.dead-letter", p.name),
        2,
    );
    let dead: Vec<Value> = dead
        .iter()
        .map(|d| serde_json::from_slice(d).expect("dead letter JSON"))
        .collect();
    let rejected = dead
        .iter()
        .find(|d| d["key"] == json!({"id": 2}))
        .unwrap_or_else(|| panic!("row 2 not dead-lettered: {dead:#?}"));
    assert_eq!(rejected["stage"], "consumer");
    assert_eq!(rejected["table"], format!("public.{table}"));
    assert_eq!(rejected["origin"]["topic"], p.topic(&table));
    assert!(rejected["origin"]["offset"].is_i64());
    assert!(
        rejected["reason"]
            .as_str()
            .is_some_and(|r| r.contains("mapper_parsing_exception")),
        "{rejected}"
    );
    let malformed = dead
        .iter()
        .find(|d| d["table"].is_null())
        .unwrap_or_else(|| panic!("garbage not dead-lettered: {dead:#?}"));
    assert_eq!(malformed["origin"]["partition"], 0);
    assert!(
        malformed["reason"]
            .as_str()
            .is_some_and(|r| r.contains("not a change event")),
        "{malformed}"
    );
    // The rest went on: 1, 3 and the later 4 are there; 2 is not.
    let index = p.index(&table);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ids: Vec<String> = p.docs(&index).await.into_keys().collect();
        if ids == ["1", "3", "4"] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ids {ids:?}:\n{}",
            consumer.log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        consumer
            .counter("tidemark_consumer_dead_letters_total")
            .await,
        2.0
    );
    consumer.stop();
    p.cleanup(&[&table]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn misconfiguration_fails_fast_and_says_how_to_fix_it() {
    let mut p = Pipeline::with_opensearch("c_misconfig", "http://127.0.0.1:9").await;
    let table = p.table("t");
    p.create_table(&table, "id int PRIMARY KEY", "").await;
    let run = |p: &mut Pipeline| {
        let mut c = p.start_consumer();
        let status = c.child.wait().expect("wait");
        (status.code(), c.log())
    };
    let (code, log) = run(&mut p);
    assert_eq!(code, Some(2), "{log}");
    assert!(
        log.contains("cannot reach OpenSearch at http://127.0.0.1:9"),
        "{log}"
    );
    assert!(log.contains("Check opensearch.url"), "{log}");

    // An index that maps _tidemark.version as something else.
    let mut p2 = Pipeline::new("c_misconfig").await;
    let table2 = p2.table("t");
    p2.create_table(&table2, "id int PRIMARY KEY", "").await;
    let index = p2.index(&table2);
    p2.os
        .indices()
        .create(opensearch::indices::IndicesCreateParts::Index(&index))
        .body(json!({"mappings": {"properties": {"_tidemark": {"properties": {"version": {"type": "keyword"}}}}}}))
        .send()
        .await
        .expect("create index");
    let (code, log) = run(&mut p2);
    assert_eq!(code, Some(2), "{log}");
    assert!(
        log.contains(&format!(
            "table public.{table2} (index {index}): the index maps _tidemark.version"
        )),
        "{log}"
    );
    p2.cleanup(&[&table2]).await;
    p.cleanup(&[&table]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_record_whose_key_does_not_match_its_row_is_a_dead_letter() {
    let mut p = Pipeline::new("c_forged").await;
    let table = p.table("t");
    p.create_table(&table, "id int PRIMARY KEY, title text", "")
        .await;
    p.start_producer().await;
    let mut consumer = p.start_consumer();
    consumer.wait_ready().await;
    p.pg.batch_execute(&format!("INSERT INTO {table} VALUES (1, 'one')"))
        .await
        .expect("row");
    // The producer's own record for row 1, with its envelope key changed to
    // another row's (record key to match): applied, it would create a
    // document 999999 that no row has.
    let real = p.last_events(&table, 1).remove("1").expect("row 1's event");
    let mut forged = real.event.clone();
    forged.key.insert("id".into(), json!(999999));
    let key = tidemark_schemas::record_key(&forged.source, &forged.key);
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &p.stack.kafka_brokers)
        .create()
        .expect("producer");
    producer
        .send(
            BaseRecord::<[u8], [u8]>::to(&p.topic(&table))
                .key(&key[..])
                .payload(&forged.to_vec()[..]),
        )
        .map_err(|(e, _)| e)
        .expect("inject");
    producer.flush(Duration::from_secs(10)).expect("flush");
    p.pg.batch_execute(&format!("INSERT INTO {table} VALUES (2, 'two')"))
        .await
        .expect("row after");
    let dead = read_raw(
        &p.stack.kafka_brokers,
        &format!("{}.dead-letter", p.name),
        1,
    );
    let dead: Value = serde_json::from_slice(&dead[0]).expect("dead letter JSON");
    assert_eq!(dead["key"], json!({"id": 999999}), "{dead}");
    assert!(
        dead["reason"]
            .as_str()
            .is_some_and(|r| r.contains("key column \"id\" in `after` does not match")),
        "{dead}"
    );
    assert!(!dead.to_string().contains("one"), "no row contents: {dead}");
    let docs = p.wait_converged(&table, 30, &[&consumer]).await;
    assert_eq!(docs.keys().collect::<Vec<_>>(), ["1", "2"]);
    consumer.stop();
    p.cleanup(&[&table]).await;
}

/// A table added to `[[tables]]` once the slot exists: at its next start
/// the producer sends the table's existing rows as snapshot events (one
/// snapshot, taken before streaming resumes) and streams it from then on,
/// with updates, deletes and inserts running throughout; a start after
/// that sends nothing again.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_added_to_the_config_later_gets_its_existing_rows() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    let mut p = Pipeline::new("c_added").await;
    let first = p.table("a");
    p.create_table(&first, "id int PRIMARY KEY, title text", "")
        .await;
    p.pg.batch_execute(&format!(
        "INSERT INTO {first} SELECT g, 'a ' || g FROM generate_series(1, 10) g"
    ))
    .await
    .expect("rows");
    p.start_producer().await;
    let consumer = p.start_consumer_in_process().await;
    p.wait_converged(&first, 90, &[]).await;

    // Made and filled while the pipeline runs, then configured.
    let later = p.table("b");
    p.create_table(&later, "id int PRIMARY KEY, title text, n int", "")
        .await;
    p.pg.batch_execute(&format!(
        "INSERT INTO {later} SELECT g, 'b ' || g, 0 FROM generate_series(1, 2000) g"
    ))
    .await
    .expect("rows");
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let writer = {
        let (url, table) = (p.stack.pg_url.clone(), later.clone());
        let (stop, done) = (stop.clone(), done.clone());
        tokio::spawn(async move {
            let pg = tidemark_testkit::topics::pg(&url).await;
            let mut i: i32 = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let sql = match i % 10 {
                    0 => format!("DELETE FROM {table} WHERE id = {}", (i * 53) % 2000 + 1),
                    7 => format!("INSERT INTO {table} VALUES ({}, 'new', 0)", 10_000 + i),
                    _ => format!(
                        "UPDATE {table} SET n = n + 1, title = 'live' WHERE id = {}",
                        (i * 37) % 2000 + 1
                    ),
                };
                pg.batch_execute(&sql).await.expect("live write");
                done.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    p.stop_producer().await;
    consumer.stop().await;
    let before = done.load(Ordering::Relaxed);
    p.start_producer().await;
    let consumer = p.start_consumer_in_process().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.expect("writer");
    assert!(
        done.load(Ordering::Relaxed) > before,
        "no live write ran across the restart"
    );

    let docs = p.wait_converged(&later, 90, &[]).await;
    assert!(docs.len() > 1900, "{} documents", docs.len());
    assert_versions_match_last_events(&p, &later, &docs);
    // The existing rows came as snapshot events, all at one version.
    let records = topic_record_count(&p.stack.kafka_brokers, &p.topic(&later));
    let last = p.last_events(&later, records as usize);
    let snapshot_lsns: std::collections::BTreeSet<_> = last
        .values()
        .filter(|r| r.event.op == tidemark_schemas::Operation::Snapshot)
        .map(|r| r.event.commit_lsn)
        .collect();
    let snapshotted = last
        .values()
        .filter(|r| r.event.op == tidemark_schemas::Operation::Snapshot)
        .count();
    assert!(
        snapshotted > 1000,
        "{snapshotted} keys last seen in a snapshot"
    );
    assert_eq!(snapshot_lsns.len(), 1, "{snapshot_lsns:?}");

    // Recorded: the next start sends no snapshot again.
    p.stop_producer().await;
    p.start_producer().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        topic_record_count(&p.stack.kafka_brokers, &p.topic(&later)),
        records,
        "a start after the table was snapshotted sent records again"
    );

    consumer.stop().await;
    p.cleanup(&[&first, &later]).await;
}

/// Schema changes converge without a manual command: after each DDL and
/// updates of 5 of the 50 rows, the documents of the 45 rows not touched
/// take the new shape too (the producer sends the table again at its next
/// change, `on_schema_change = "backfill"`, the default).
#[tokio::test(flavor = "multi_thread")]
async fn schema_changes_converge_every_document() {
    let mut p = Pipeline::new("c_schema").await;
    let table = p.table("t");
    p.create_table(&table, "id int PRIMARY KEY, a text, b int", "")
        .await;
    p.pg.batch_execute(&format!(
        "INSERT INTO {table} SELECT g, 'a ' || g, g FROM generate_series(1, 50) g"
    ))
    .await
    .expect("rows");
    p.start_producer().await;
    let consumer = p.start_consumer_in_process().await;
    p.wait_converged(&table, 90, &[]).await;

    let steps = [
        "ADD COLUMN c text DEFAULT 'x'",
        "DROP COLUMN a",
        "RENAME COLUMN b TO bb",
        "ALTER COLUMN bb TYPE bigint",
        "ADD COLUMN d int NOT NULL DEFAULT 7",
    ];
    for (i, ddl) in steps.iter().enumerate() {
        p.pg.batch_execute(&format!(
            "ALTER TABLE {table} {ddl};
             UPDATE {table} SET c = 'step {i}' WHERE id BETWEEN {} AND {}",
            i * 5 + 1,
            i * 5 + 5
        ))
        .await
        .unwrap_or_else(|e| panic!("{ddl}: {e}"));
        let started = Instant::now();
        let docs = p.wait_converged(&table, 60, &[]).await;
        assert_eq!(docs.len(), 50, "after {ddl}");
        println!(
            "{ddl}: converged in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    let docs = p.docs(&p.index(&table)).await;
    let doc = &docs["50"];
    assert_eq!(doc["c"], "x", "{doc}");
    assert_eq!(doc["d"], 7, "{doc}");
    assert!(doc.get("a").is_none() && doc.get("b").is_none(), "{doc}");
    assert_eq!(doc["bb"], 50, "{doc}");

    consumer.stop().await;
    p.cleanup(&[&table]).await;
}

/// A DDL that commits while the producer is taking a schema change's
/// snapshot is read by it: the snapshot's column list is the one its own
/// transaction reads, not the one described when the change arrived. A
/// transaction held open makes the temporary slot wait (a logical slot's
/// snapshot waits for the transactions running when it is created), and a
/// `DROP COLUMN` commits meanwhile. Read with the earlier list, the
/// snapshot failed on the dropped column and stopped the producer (seen
/// once in CI, where the same race came from the DDL being decoded before
/// it was visible to other sessions).
#[tokio::test(flavor = "multi_thread")]
async fn a_ddl_committed_during_a_schema_change_snapshot_is_read_by_it() {
    let mut p = Pipeline::new("c_schema_race").await;
    let table = p.table("t");
    // With a generated column, which pgoutput does not send, so no
    // snapshot may either.
    p.create_table(
        &table,
        "id int PRIMARY KEY, a text, b int, twice int GENERATED ALWAYS AS (b * 2) STORED",
        "",
    )
    .await;
    p.pg.batch_execute(&format!(
        "INSERT INTO {table} SELECT g, 'a ' || g, g FROM generate_series(1, 20) g"
    ))
    .await
    .expect("rows");
    p.start_producer().await;
    let consumer = p.start_consumer_in_process().await;
    p.wait_converged(&table, 90, &[]).await;

    let (blocker, connection) = tokio_postgres::connect(&p.stack.pg_url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    blocker
        .batch_execute("BEGIN; SELECT txid_current()")
        .await
        .expect("a transaction with an xid");
    p.pg.batch_execute(&format!(
        "ALTER TABLE {table} ADD COLUMN c text DEFAULT 'x'; UPDATE {table} SET b = b WHERE id = 1"
    ))
    .await
    .expect("first DDL");
    // The producer saw the change of shape and waits for its snapshot.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let waiting: i64 =
            p.pg.query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE starts_with(slot_name::text, $1)",
                &[&format!("{}_again_", p.name)],
            )
            .await
            .expect("slots")
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the producer never began the schema change's snapshot"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    p.pg.batch_execute(&format!("ALTER TABLE {table} DROP COLUMN a"))
        .await
        .expect("second DDL");
    blocker.batch_execute("COMMIT").await.expect("commit");
    p.pg.batch_execute(&format!("UPDATE {table} SET b = b + 1 WHERE id = 2"))
        .await
        .expect("next change");

    let docs = p.wait_converged(&table, 60, &[]).await;
    assert_eq!(docs.len(), 20);
    let docs = p.docs(&p.index(&table)).await;
    let doc = &docs["20"];
    assert_eq!(doc["c"], "x", "{doc}");
    assert!(doc.get("a").is_none(), "{doc}");
    assert!(doc.get("twice").is_none(), "{doc}");
    assert_eq!(p.dead_letter_count(), 0);

    consumer.stop().await;
    p.cleanup(&[&table]).await;
}

/// The same DDLs with writes running all along: an updater and an inserter
/// on the columns no DDL touches, so changes race every shape change (a
/// change committed just before, during and after each `ALTER`). The
/// documents still end equal to their rows, and nothing is dead-lettered.
#[tokio::test(flavor = "multi_thread")]
async fn schema_changes_converge_with_writes_running_throughout() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let mut p = Pipeline::new("c_schema_live").await;
    let table = p.table("t");
    p.create_table(&table, "id int PRIMARY KEY, a text, b int, n int", "")
        .await;
    p.pg.batch_execute(&format!(
        "INSERT INTO {table} SELECT g, 'a ' || g, g, 0 FROM generate_series(1, 500) g"
    ))
    .await
    .expect("rows");
    p.start_producer().await;
    let consumer = p.start_consumer_in_process().await;
    p.wait_converged(&table, 90, &[]).await;

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let writer = {
        let (url, table, stop, done) = (
            p.stack.pg_url.clone(),
            table.clone(),
            stop.clone(),
            done.clone(),
        );
        tokio::spawn(async move {
            let (pg, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .expect("connect");
            tokio::spawn(connection);
            let mut i: i32 = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                pg.execute(
                    &format!("UPDATE {table} SET n = n + 1 WHERE id = $1"),
                    &[&((i * 37) % 500 + 1)],
                )
                .await
                .expect("update");
                if i % 5 == 0 {
                    pg.execute(
                        &format!("INSERT INTO {table} (id, n) VALUES ($1, 0)"),
                        &[&(10_000 + i)],
                    )
                    .await
                    .expect("insert");
                }
                done.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let steps = [
        "ADD COLUMN c text DEFAULT 'x'",
        "DROP COLUMN a",
        "RENAME COLUMN b TO bb",
        "ALTER COLUMN bb TYPE bigint",
        "ADD COLUMN d int NOT NULL DEFAULT 7",
    ];
    for ddl in steps {
        tokio::time::sleep(Duration::from_secs(2)).await;
        p.pg.batch_execute(&format!("ALTER TABLE {table} {ddl}"))
            .await
            .unwrap_or_else(|e| panic!("{ddl}: {e}"));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.expect("writer");
    let writes = done.load(Ordering::Relaxed);
    assert!(writes >= 200, "only {writes} write rounds ran");
    let started = Instant::now();
    let docs = p.wait_converged(&table, 60, &[]).await;
    println!(
        "{writes} write rounds through {} DDLs; converged {:.1} s after the last write",
        steps.len(),
        started.elapsed().as_secs_f64()
    );
    let doc = &docs["1"];
    assert_eq!(doc["c"], "x", "{doc}");
    assert_eq!(doc["d"], 7, "{doc}");
    assert!(doc.get("a").is_none() && doc.get("b").is_none(), "{doc}");
    assert_eq!(p.dead_letter_count(), 0, "nothing dead-lettered");

    consumer.stop().await;
    p.cleanup(&[&table]).await;
}

/// `on_schema_change = "stop"`: the producer stops at the table's first
/// change after a DDL, naming the table and what to do, and sends nothing
/// of it.
#[tokio::test(flavor = "multi_thread")]
async fn a_schema_change_stops_the_producer_when_told_to() {
    let mut p = Pipeline::new("c_schema_stop").await;
    let table = p.table("t");
    p.create_table(
        &table,
        "id int PRIMARY KEY, a text",
        "on_schema_change = \"stop\"",
    )
    .await;
    p.pg.batch_execute(&format!("INSERT INTO {table} VALUES (1, 'a')"))
        .await
        .expect("row");
    let metrics = std::sync::Arc::new(tidemark_producer::metrics::Metrics::default());
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let producer = tokio::spawn(tidemark_producer::run::run(
        p.config_as("producer"),
        metrics.clone(),
        shutdown,
    ));
    let deadline = Instant::now() + Duration::from_secs(90);
    while !metrics.streaming.load(std::sync::atomic::Ordering::Relaxed) {
        assert!(Instant::now() < deadline, "not streaming");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = topic_record_count(&p.stack.kafka_brokers, &p.topic(&table));
    p.pg.batch_execute(&format!(
        "ALTER TABLE {table} ADD COLUMN b int; UPDATE {table} SET b = 1"
    ))
    .await
    .expect("ddl");
    let stopped = tokio::time::timeout(Duration::from_secs(60), producer)
        .await
        .expect("the producer did not stop")
        .expect("producer task");
    let error = stopped
        .expect_err("the producer stopped with an error")
        .to_string();
    assert!(
        error.contains(&format!("public.{table}")) && error.contains("on_schema_change"),
        "{error}"
    );
    assert_eq!(
        topic_record_count(&p.stack.kafka_brokers, &p.topic(&table)),
        before,
        "nothing of the changed table was sent"
    );
    assert!(
        metrics.render().contains(&format!(
            "tidemark_producer_schema_changes_total{{table=\"public.{table}\"}} 1"
        )),
        "{}",
        metrics.render()
    );
    p.cleanup(&[&table]).await;
}
