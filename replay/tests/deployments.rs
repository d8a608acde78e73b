//! Two deployments side by side: two databases of one PostgreSQL server,
//! each with its own producer (slot), topic prefix, consumer group and
//! indices, sharing one Kafka cluster, one state topic, one dead-letter
//! topic and the OpenSearch cluster's runs index. Both databases have a
//! table of the same name, the case where table names alone collide. Each
//! deployment converges to its own rows, lists and repairs only its own
//! dead letters, audits clean and lists its own runs; and a producer of the
//! second database configured with the first's topic prefix refuses to
//! start, naming the slot that already feeds the topic.

#[path = "../../consumer/tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::Pipeline;
use tidemark_testkit::topic_record_count;

/// `url` with its database replaced by `database`.
fn in_database(url: &str, database: &str) -> String {
    let (server, _) = url.rsplit_once('/').expect("a database in the URL");
    format!("{server}/{database}")
}

/// The ids of the dead letters `tidemark-replay dead-letters` lists for `p`.
fn listed_dead_letters(p: &Pipeline) -> Vec<i64> {
    let (code, out, err) = p.run_replay(&["dead-letters", "--format", "json"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    let listed: Value = serde_json::from_str(&out).expect("JSON");
    let mut ids: Vec<i64> = listed["dead_letters"]
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|d| d["key"]["id"].as_i64())
        .collect();
    ids.sort_unstable();
    ids
}

#[tokio::test(flavor = "multi_thread")]
async fn two_databases_share_kafka_the_dead_letter_topic_and_the_runs_index() {
    let mut a = Pipeline::new("r_dep_a").await;
    let mut b = Pipeline::new("r_dep_b").await;
    // The second database, reached by the same roles.
    let database = b.name.clone();
    for sql in [
        format!("CREATE DATABASE {database}"),
        format!("GRANT CONNECT, CREATE ON DATABASE {database} TO tidemark_repl"),
    ] {
        a.pg.batch_execute(&sql).await.expect("second database");
    }
    b.stack.pg_url = in_database(&b.stack.pg_url, &database);
    b.stack.pg_replication_url = in_database(&b.stack.pg_replication_url, &database);
    b.pg = support::pg(&b.stack.pg_url).await;

    let shared = format!(
        "dead_letter_topic = \"{0}.shared-dead-letter\"\nstate_topic = \"{0}.shared-state\"\n",
        a.name
    );
    let table = format!("{}_orders", a.name);
    for (p, first) in [(&mut a, 0), (&mut b, 1000)] {
        p.kafka_extra = shared.clone();
        // Rows bigger than this are the producer's dead letters.
        p.producer_extra = "max_event_bytes = 4096".into();
        p.create_table(&table, "id int PRIMARY KEY, body text", "")
            .await;
        p.pg.batch_execute(&format!(
            "INSERT INTO {table} SELECT {first} + g, 'row ' || g FROM generate_series(1, 50) g"
        ))
        .await
        .expect("rows");
    }
    a.start_producer().await;
    b.start_producer().await;
    let consumer_a = a.start_consumer_in_process().await;
    let consumer_b = b.start_consumer_in_process().await;

    // One row too big for each producer: a dead letter of each deployment,
    // of the same table name, in the one dead-letter topic.
    for (p, id) in [(&a, 100), (&b, 1100)] {
        p.pg.batch_execute(&format!(
            "INSERT INTO {table} VALUES ({id}, repeat('x', 10000))"
        ))
        .await
        .expect("oversized row");
    }
    let dead_letters = format!("{}.shared-dead-letter", a.name);
    let deadline = Instant::now() + Duration::from_secs(60);
    while topic_record_count(&a.stack.kafka_brokers, &dead_letters) < 2 {
        assert!(
            Instant::now() < deadline,
            "the oversized rows never reached the dead-letter topic"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(listed_dead_letters(&a), [100]);
    assert_eq!(listed_dead_letters(&b), [1100]);

    // Each repairs its own dead letter from its own database, and each
    // index ends equal to its own table.
    for p in [&a, &b] {
        let (code, out, err) = p.run_replay(&["dead-letters", "--repair", "--yes"]);
        assert_eq!(code, Some(0), "{out}\n{err}");
        p.wait_converged(&table, 60, &[]).await;
        let (code, out, err) = p.run_replay(&["audit", "--table", &format!("public.{table}")]);
        assert_eq!(code, Some(0), "{out}\n{err}");
    }
    let docs = a.docs(&a.index(&table)).await;
    assert_eq!(docs.len(), 51);
    assert!(docs.contains_key("100") && !docs.contains_key("1100"));

    // Each lists its own runs; --all lists both.
    let deployments = |p: &Pipeline, all: bool| {
        let mut args = vec!["runs", "--format", "json", "--limit", "1000"];
        if all {
            args.push("--all");
        }
        let (code, out, err) = p.run_replay(&args);
        assert_eq!(code, Some(0), "{out}\n{err}");
        let runs: Value = serde_json::from_str(&out).expect("JSON");
        let mut seen: Vec<String> = runs
            .as_array()
            .expect("a list")
            .iter()
            .filter_map(|r| r["deployment"].as_str().map(str::to_owned))
            .filter(|d| *d == a.name || *d == b.name)
            .collect();
        seen.sort();
        seen.dedup();
        seen
    };
    assert_eq!(deployments(&a, false), [a.name.clone()]);
    assert_eq!(deployments(&b, false), [b.name.clone()]);
    assert_eq!(deployments(&a, true), [a.name.clone(), b.name.clone()]);

    // The second database's tables under the first's topic prefix: its
    // topics are fed by the first's slot, so its producer refuses to start.
    let mut clash = b.config_as("producer");
    clash.kafka.topic_prefix = a.name.clone();
    clash.producer.slot = format!("{}_clash", b.name);
    let metrics = Arc::new(tidemark_producer::metrics::Metrics::default());
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let refused = tokio::time::timeout(
        Duration::from_secs(60),
        tidemark_producer::run::run(clash.clone(), metrics, shutdown),
    )
    .await
    .expect("refused at once")
    .expect_err("a producer on topics another slot feeds");
    let message = refused.to_string();
    assert!(
        message.contains(&format!(
            "its topic {}.public.{table} is already fed by slot {}",
            a.name, a.name
        )) && message.contains(&format!(
            "database {}",
            a.stack.pg_url.rsplit('/').next().unwrap_or("?")
        )) && message.contains("kafka.topic_prefix"),
        "{message}"
    );
    let slots: i64 =
        b.pg.query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
            &[&clash.producer.slot],
        )
        .await
        .expect("slots")
        .get(0);
    assert_eq!(slots, 0, "the refused producer created its slot");
    // Its own record is never forgotten.
    let own = tidemark_producer::run::forget_slot(&clash, &clash.producer.slot)
        .await
        .expect_err("own slot");
    assert!(own.to_string().contains("own producer.slot"), "{own}");

    consumer_a.stop().await;
    consumer_b.stop().await;
    a.cleanup(&[&table]).await;
    b.cleanup(&[&table]).await;
    a.pg.batch_execute(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
        .await
        .expect("drop the second database");
}
