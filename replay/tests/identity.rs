//! The wrong-target guard, end to end: the consumer stamps the index it
//! writes with the pipeline's identity (PostgreSQL system and database as
//! the producer recorded them, Kafka cluster id, topic prefix); `window
//! --yes` writes to it; an index stamped by another pipeline is refused by
//! both the consumer and `window` (naming both sides) unless
//! `--target-override`; an index without a stamp (one from before stamps)
//! is refused by `window` until the consumer's next start stamps it.

#[path = "../../consumer/tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::Pipeline;

/// The index's `_meta` as OpenSearch returns it.
async fn meta(p: &Pipeline, index: &str) -> Value {
    let mapping: Value =
        p.os.indices()
            .get_mapping(opensearch::indices::IndicesGetMappingParts::Index(&[index]))
            .send()
            .await
            .expect("mapping")
            .json()
            .await
            .expect("mapping answer");
    mapping[index]["mappings"]["_meta"].clone()
}

/// Replaces the index's `_meta` (as another pipeline, or an old version,
/// would have left it).
async fn set_meta(p: &Pipeline, index: &str, meta: Value) {
    let answer =
        p.os.indices()
            .put_mapping(opensearch::indices::IndicesPutMappingParts::Index(&[index]))
            .body(json!({ "_meta": meta }))
            .send()
            .await
            .expect("put _meta");
    assert!(
        answer.status_code().is_success(),
        "{:?}",
        answer.text().await
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn only_this_pipelines_index_is_written() {
    let mut p = Pipeline::new("r_identity").await;
    let table = p.table("t");
    p.create_table(&table, "id int PRIMARY KEY, title text", "")
        .await;
    p.pg.batch_execute(&format!(
        "INSERT INTO {table} SELECT g, 'row ' || g FROM generate_series(1, 5) g"
    ))
    .await
    .expect("seed");
    p.start_producer().await;
    let consumer = p.start_consumer_in_process().await;
    p.wait_converged(&table, 90, &[]).await;
    consumer.stop().await;
    let index = p.index(&table);

    // The consumer's stamp names what this pipeline is.
    let system: String =
        p.pg.query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await
        .expect("system identifier")
        .get(0);
    let config = p.config();
    let kafka = config.kafka.clone();
    let cluster = tokio::task::spawn_blocking(move || {
        tidemark_kafka::cluster_id(&kafka, "test", Duration::from_secs(10)).expect("cluster id")
    })
    .await
    .expect("cluster id task");
    let stamp = meta(&p, &index).await["tidemark_pipeline"].clone();
    assert_eq!(
        stamp,
        json!({"postgres_system": system, "database": "tidemark",
            "kafka_cluster": cluster, "topic_prefix": p.name}),
        "the consumer's stamp"
    );

    // A run on this pipeline's index is accepted and says so.
    let window = ["window", "--from", "-10m", "--to", "now", "--yes"];
    let (code, out, err) = p.run_replay(&window);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        err.contains(&format!("identity    {index}: this pipeline's\n")),
        "{err}"
    );

    // Another pipeline's index: the consumer and window refuse it, naming
    // both sides; --target-override writes anyway.
    let mut other = stamp.clone();
    other["kafka_cluster"] = json!("another-cluster");
    set_meta(
        &p,
        &index,
        json!({"tidemark_pipeline": other, "owner": "search team"}),
    )
    .await;
    let refused = tidemark_consumer::run::prepare(&config, &p.dir)
        .await
        .expect_err("the consumer refuses another pipeline's index")
        .to_string();
    assert!(
        refused.contains(&format!("index {index} belongs to another pipeline"))
            && refused.contains(&format!(
                "Kafka cluster: recorded another-cluster, seen {cluster}"
            )),
        "{refused}"
    );
    let (code, out, err) = p.run_replay(&window);
    assert_eq!(code, Some(2), "{out}\n{err}");
    assert!(
        err.contains("refusing to write")
            && err.contains(&format!(
                "Kafka cluster: recorded another-cluster, seen {cluster}"
            ))
            && err.contains("--target-override"),
        "{err}"
    );
    let mut overridden = window.to_vec();
    overridden.push("--target-override");
    let (code, out, err) = p.run_replay(&overridden);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(err.contains("OVERRIDDEN (--target-override)"), "{err}");

    // An index from before stamps (its other _meta kept): refused until the
    // consumer's next start stamps it; then accepted.
    set_meta(&p, &index, json!({"owner": "search team"})).await;
    let (code, _, err) = p.run_replay(&window);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("carries no pipeline stamp"), "{err}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let consumer = loop {
        // The group's previous member may still be leaving.
        match tidemark_consumer::run::prepare(&config, &p.dir).await {
            Ok(_) => break p.start_consumer_in_process().await,
            Err(e) => {
                assert!(Instant::now() < deadline, "the consumer did not start: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    consumer.stop().await;
    let restamped = meta(&p, &index).await;
    assert_eq!(restamped["tidemark_pipeline"], stamp, "{restamped:#}");
    assert_eq!(
        restamped["owner"], "search team",
        "the rest of _meta is kept"
    );
    let (code, out, err) = p.run_replay(&window);
    assert_eq!(code, Some(0), "{out}\n{err}");
    p.cleanup(&[&table]).await;
}
