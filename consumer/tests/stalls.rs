//! An outage is never turned into loss: what the index, the cluster or the
//! mapping cannot take now is waited out, in order, with `/readyz` and
//! `tidemark_consumer_blocked` saying why; the dead-letter topic gets only
//! records that are wrong in themselves. Each test runs under live writes
//! and ends with the index equal to the table, without any replay.

mod support;

use std::time::{Duration, Instant};

use opensearch::http::Method;
use serde_json::{Value, json};
use support::{Pipeline, assert_versions, read_raw, writer};
use tidemark_schemas::{Lsn, Version};

#[tokio::test(flavor = "multi_thread")]
async fn an_index_closed_for_60_s_under_load_is_waited_out_not_dead_lettered() {
    let mut p = Pipeline::new("c_closed").await;
    let table = p.table("t");
    p.create_table(&table, "id int PRIMARY KEY, title text, n int", "")
        .await;
    p.start_producer().await;
    let mut consumer = p.start_consumer();
    consumer.wait_ready().await;
    let index = p.index(&table);
    // ~110 changes per round, 90 rounds over ~75 s.
    let load = writer(
        p.stack.pg_url.clone(),
        table.clone(),
        90,
        Duration::from_millis(700),
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    p.index_admin(Method::Post, &format!("/{index}/_close"), None)
        .await;
    let seen = p
        .watch_stall(&mut consumer, &index, "index_closed", 60)
        .await;
    p.index_admin(Method::Post, &format!("/{index}/_open"), None)
        .await;
    assert!(
        seen.unready,
        "/readyz never said index_closed:\n{}",
        consumer.log()
    );
    assert!(
        seen.gauge,
        "the blocked gauge never rose:\n{}",
        consumer.log()
    );
    load.await.expect("writer");
    let docs = p.wait_converged(&table, 180, &[&consumer]).await;
    assert!(docs.len() > 4000, "{} docs", docs.len());
    assert_versions(&p, &table, &docs);
    assert_eq!(p.dead_letter_count(), 0, "{}", consumer.log());
    assert_eq!(
        consumer
            .counter("tidemark_consumer_dead_letters_total")
            .await,
        0.0
    );
    consumer.wait_ready().await;
    consumer.stop();
    p.cleanup(&[&table]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn write_and_read_only_blocks_are_waited_out_not_dead_lettered() {
    let mut p = Pipeline::new("c_blocks").await;
    let table = p.table("t");
    p.create_table(&table, "id int PRIMARY KEY, title text, n int", "")
        .await;
    p.start_producer().await;
    let mut consumer = p.start_consumer();
    consumer.wait_ready().await;
    let index = p.index(&table);
    let load = writer(
        p.stack.pg_url.clone(),
        table.clone(),
        80,
        Duration::from_millis(700),
    );
    let settings = format!("/{index}/_settings");
    for block in ["index.blocks.write", "index.blocks.read_only"] {
        tokio::time::sleep(Duration::from_secs(3)).await;
        p.index_admin(Method::Put, &settings, Some(json!({ block: true })))
            .await;
        let seen = p.watch_stall(&mut consumer, &index, "blocked", 30).await;
        p.index_admin(Method::Put, &settings, Some(json!({ block: false })))
            .await;
        assert!(
            seen.unready,
            "{block}: /readyz never said blocked:\n{}",
            consumer.log()
        );
        assert!(seen.gauge, "{block}: the blocked gauge never rose");
    }
    load.await.expect("writer");
    let docs = p.wait_converged(&table, 180, &[&consumer]).await;
    assert!(docs.len() > 3500, "{} docs", docs.len());
    assert_versions(&p, &table, &docs);
    assert_eq!(p.dead_letter_count(), 0, "{}", consumer.log());
    consumer.wait_ready().await;
    consumer.stop();
    p.cleanup(&[&table]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_strict_mapping_refusing_a_column_stalls_the_table_until_it_is_fixed() {
    let mut p = Pipeline::new("c_strict").await;
    let table = p.table("t");
    let mappings = p.dir.join("strict.json");
    std::fs::write(
        &mappings,
        r#"{"mappings": {"dynamic": "strict", "properties": {"id": {"type": "long"}, "title": {"type": "text"}}}}"#,
    )
    .expect("mappings file");
    p.create_table(
        &table,
        "id int PRIMARY KEY, title text",
        &format!("mappings_file = {:?}", mappings.display().to_string()),
    )
    .await;
    p.start_producer().await;
    let mut consumer = p.start_consumer();
    consumer.wait_ready().await;
    let index = p.index(&table);
    p.pg.batch_execute(&format!(
        "INSERT INTO {table} SELECT g, 't' || g FROM generate_series(1, 50) g"
    ))
    .await
    .expect("rows");
    p.wait_converged(&table, 60, &[&consumer]).await;
    // A new column the strict mapping does not know.
    p.pg.batch_execute(&format!(
        "ALTER TABLE {table} ADD COLUMN code text;
         UPDATE {table} SET code = 'c' || id;
         INSERT INTO {table} SELECT g, 't' || g, 'c' || g FROM generate_series(51, 60) g;"
    ))
    .await
    .expect("new column");
    // The producer first sends the table again in its new shape (the
    // default `on_schema_change`), which under CI's load takes a while.
    let began = std::time::Instant::now();
    let seen = p
        .wait_stall(&mut consumer, &index, "strict_mapping", 120)
        .await;
    eprintln!(
        "stalled {:.1} s after the DDL",
        began.elapsed().as_secs_f64()
    );
    assert!(
        seen.unready,
        "/readyz never said strict_mapping:\n{}",
        consumer.log()
    );
    assert!(seen.gauge, "the blocked gauge never rose");
    // And it stays stalled: nothing is skipped or dead-lettered meanwhile.
    let still = p
        .watch_stall(&mut consumer, &index, "strict_mapping", 5)
        .await;
    assert!(still.unready && still.gauge, "the stall ended by itself");
    assert_eq!(p.dead_letter_count(), 0, "{}", consumer.log());
    let docs = p.docs(&index).await;
    assert_eq!(docs.len(), 50, "nothing after the refused write is applied");
    assert!(docs.values().all(|d| d.get("code").is_none()));
    // The operator fixes the mapping; the table resumes where it stopped.
    p.index_admin(
        Method::Put,
        &format!("/{index}/_mapping"),
        Some(json!({"properties": {"code": {"type": "keyword"}}})),
    )
    .await;
    let docs = p.wait_converged(&table, 90, &[&consumer]).await;
    assert_eq!(docs.len(), 60);
    assert_versions(&p, &table, &docs);
    assert_eq!(p.dead_letter_count(), 0);
    consumer.wait_ready().await;
    consumer.stop();
    p.cleanup(&[&table]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_over_long_id_is_one_dead_letter_and_its_transaction_is_applied() {
    let mut p = Pipeline::new("c_longid").await;
    let table = p.table("t");
    p.create_table(&table, "id text PRIMARY KEY, n int", "")
        .await;
    p.start_producer().await;
    let mut consumer = p.start_consumer();
    consumer.wait_ready().await;
    let long = "k".repeat(600);
    p.pg.batch_execute(&format!(
        "BEGIN;
         INSERT INTO {table} SELECT 'r' || g, g FROM generate_series(1, 500) g;
         INSERT INTO {table} VALUES ('{long}', 0);
         INSERT INTO {table} SELECT 'r' || g, g FROM generate_series(501, 1000) g;
         COMMIT;"
    ))
    .await
    .expect("rows");
    let dead = read_raw(
        &p.stack.kafka_brokers,
        &format!("{}.dead-letter", p.name),
        1,
    );
    let dead: Value = serde_json::from_slice(&dead[0]).expect("dead letter JSON");
    assert_eq!(dead["key"], json!({"id": long}), "{dead}");
    assert_eq!(dead["table"], format!("public.{table}"));
    let reason = dead["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("600 bytes, over the 512-byte limit"),
        "{reason}"
    );
    let index = p.index(&table);
    let deadline = Instant::now() + Duration::from_secs(60);
    while p.docs(&index).await.len() < 1000 {
        assert!(Instant::now() < deadline, "{}", consumer.log());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let docs = p.docs(&index).await;
    assert_eq!(docs.len(), 1000);
    assert!(!docs.contains_key(&long));
    assert_eq!(p.dead_letter_count(), 1);
    assert_eq!(
        consumer
            .counter("tidemark_consumer_dead_letters_total")
            .await,
        1.0
    );
    consumer.stop();
    p.cleanup(&[&table]).await;
}

/// A bulk request OpenSearch refuses as a whole for one write (an id over
/// 512 bytes, sent here past the mapping's own check) is split until that
/// write is alone: it alone is rejected, every other write is applied.
#[tokio::test(flavor = "multi_thread")]
async fn a_bulk_refused_for_one_write_is_split_and_the_rest_applied() {
    use tidemark_index::apply::{Applier, Outcome};
    use tidemark_index::mapping::Write;
    use tidemark_index::search::Search;
    let p = Pipeline::new("c_split").await;
    let index = p.name.clone();
    let config = tidemark_schemas::config::Config::from_toml(
        &format!(
            "[postgres]\nurl = \"postgres://u@127.0.0.1/db\"\n[kafka]\nbrokers = \"127.0.0.1:1\"\n\
             [opensearch]\nurl = \"{}\"\n[[tables]]\ntable = \"public.t\"\n",
            p.opensearch_url
        ),
        |_| None,
    )
    .expect("config");
    let search = std::sync::Arc::new(
        Search::connect(config.opensearch().expect("opensearch")).expect("connect"),
    );
    let applier = Applier::new(search, std::sync::Arc::default());
    let write = |id: String, n: u64| {
        let Value::Object(fields) = json!({"n": n}) else {
            unreachable!()
        };
        Write::Index {
            index: index.clone(),
            id,
            version: Version::of_commit(1, Lsn(100 + n)).expect("a version"),
            fields,
            missing: vec![],
            key: Default::default(),
            commit_time: "2026-12-01T10:00:00.000000Z".into(),
        }
    };
    let mut writes: Vec<Write> = (0..1000).map(|n| write(format!("d{n}"), n)).collect();
    writes.insert(377, write("x".repeat(600), 5000));
    let (_keep, stop) = tokio::sync::watch::channel(false);
    let outcomes = applier.apply(writes, &stop).await.expect("applied");
    let rejected: Vec<(usize, &Outcome)> = outcomes
        .iter()
        .enumerate()
        .filter(|(_, o)| matches!(o, Outcome::Rejected(_)))
        .collect();
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(rejected[0].0, 377);
    let Outcome::Rejected(reason) = rejected[0].1 else {
        unreachable!()
    };
    assert!(reason.contains("512"), "{reason}");
    assert_eq!(p.docs(&index).await.len(), 1000);
    let _ =
        p.os.indices()
            .delete(opensearch::indices::IndicesDeleteParts::Index(&[&index]))
            .send()
            .await;
}

/// A member stalled on a closed index stays in the group and, when a new
/// member joins, gives its partitions up at once (abandoning the batch it
/// waits on, uncommitted) instead of holding the rebalance until the index
/// opens again. Nothing is lost: the index converges once it is open.
#[tokio::test(flavor = "multi_thread")]
async fn a_rebalance_while_stalled_hands_the_partitions_over_at_once() {
    let mut p = Pipeline::new("c_stallrb").await;
    let table = p.table("t");
    p.create_table(&table, "id int PRIMARY KEY, title text, n int", "")
        .await;
    p.start_producer().await;
    let mut first = p.start_consumer();
    first.wait_ready().await;
    let index = p.index(&table);
    let load = writer(
        p.stack.pg_url.clone(),
        table.clone(),
        40,
        Duration::from_millis(500),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    p.index_admin(Method::Post, &format!("/{index}/_close"), None)
        .await;
    let seen = p.watch_stall(&mut first, &index, "index_closed", 8).await;
    assert!(seen.unready, "{}", first.log());
    let joined = Instant::now();
    let mut second = p.start_consumer();
    let assigned = |log: String| {
        log.lines()
            .any(|l| l.contains("partitions assigned") && !l.contains("partitions=0"))
    };
    while !assigned(second.log()) {
        assert!(
            joined.elapsed() < Duration::from_secs(40),
            "the new member got no partitions while the first was stalled:\n{}\n----\n{}",
            first.log(),
            second.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        first.log().contains("abandoning it"),
        "the stalled member did not abandon its batch:\n{}",
        first.log()
    );
    // Still closed: the handover happened during the stall, not after it.
    let health =
        p.os.cat()
            .indices(opensearch::cat::CatIndicesParts::Index(&[&index]))
            .format("json")
            .send()
            .await
            .expect("cat")
            .json::<Value>()
            .await
            .expect("cat json");
    assert_eq!(health[0]["status"], "close", "{health}");
    p.index_admin(Method::Post, &format!("/{index}/_open"), None)
        .await;
    load.await.expect("writer");
    let docs = p.wait_converged(&table, 180, &[&first, &second]).await;
    assert!(docs.len() > 1500, "{} docs", docs.len());
    assert_versions(&p, &table, &docs);
    assert_eq!(p.dead_letter_count(), 0);
    first.stop();
    second.stop();
    p.cleanup(&[&table]).await;
}

/// An index deleted under a running consumer is not silently made again by
/// `action.auto_create_index` with dynamic mappings: the first write that
/// lands in the new index stalls (`index_replaced`), uncommitted. The
/// operator's fix (delete the stray index, restart) re-applies those writes
/// into an index made with Tidemark's mappings.
#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_index_is_not_silently_made_again_with_dynamic_mappings() {
    let mut p = Pipeline::new("c_replaced").await;
    let table = p.table("t");
    p.create_table(&table, "id int PRIMARY KEY, title text", "")
        .await;
    p.start_producer().await;
    let mut consumer = p.start_consumer();
    consumer.wait_ready().await;
    let index = p.index(&table);
    p.pg.batch_execute(&format!(
        "INSERT INTO {table} SELECT g, 't' || g FROM generate_series(1, 10) g"
    ))
    .await
    .expect("rows");
    p.wait_converged(&table, 60, &[&consumer]).await;
    p.index_admin(Method::Delete, &format!("/{index}"), None)
        .await;
    p.pg.batch_execute(&format!(
        "INSERT INTO {table} SELECT g, 't' || g FROM generate_series(11, 20) g"
    ))
    .await
    .expect("rows after the delete");
    let seen = p
        .watch_stall(&mut consumer, &index, "index_replaced", 10)
        .await;
    assert!(
        seen.unready,
        "/readyz never said index_replaced:\n{}",
        consumer.log()
    );
    assert!(seen.gauge);
    assert_eq!(p.dead_letter_count(), 0);
    // The operator removes the stray index and restarts the consumer.
    consumer.stop();
    p.index_admin(Method::Delete, &format!("/{index}"), None)
        .await;
    let mut consumer = p.start_consumer();
    consumer.wait_ready().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ids: Vec<i64> = p
            .docs(&index)
            .await
            .keys()
            .filter_map(|k| k.parse().ok())
            .collect();
        if ids.len() == 10 && ids.iter().all(|id| (11..=20).contains(id)) {
            break;
        }
        assert!(Instant::now() < deadline, "ids {ids:?}\n{}", consumer.log());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Made by the consumer: `_tidemark.key` is stored but not indexed.
    let mapping =
        p.os.indices()
            .get_mapping(opensearch::indices::IndicesGetMappingParts::Index(&[
                &index,
            ]))
            .send()
            .await
            .expect("mapping")
            .json::<Value>()
            .await
            .expect("mapping json");
    assert_eq!(
        mapping[&index]["mappings"]["properties"]["_tidemark"]["properties"]["key"]["enabled"],
        json!(false),
        "{mapping}"
    );
    consumer.stop();
    p.cleanup(&[&table]).await;
}
