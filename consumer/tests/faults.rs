//! The consumer under faults, on the local stack: a second group member,
//! `kill -9` under load, OpenSearch stopped for 30 s. Each ends with the
//! index equal to the table, row for row, with the right versions.

mod support;

use std::time::{Duration, Instant};

use support::{Pipeline, assert_versions, http_get, writer};
use tidemark_testkit::scratch::ScratchOpenSearch;

fn random_millis(low: u64, high: u64) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    Duration::from_millis(low + nanos % (high - low))
}

#[tokio::test(flavor = "multi_thread")]
async fn two_consumers_share_the_partitions_and_the_index_is_exact() {
    let mut p = Pipeline::new("c_group").await;
    let table = p.table("t");
    p.create_table(&table, "id int PRIMARY KEY, title text, n int", "")
        .await;
    p.start_producer().await;
    let mut first = p.start_consumer();
    let mut second = p.start_consumer();
    first.wait_ready().await;
    second.wait_ready().await;
    // The writes start while the group still forms (the second member
    // joins ~2 s in, revoking the first one's partitions mid-load) and go
    // on for ~5 s past it, so both members have live work to share.
    writer(
        p.stack.pg_url.clone(),
        table.clone(),
        30,
        Duration::from_millis(200),
    )
    .await
    .expect("writer");
    let docs = p.wait_converged(&table, 120, &[&first, &second]).await;
    assert!(docs.len() > 1500, "{} docs", docs.len());
    assert_versions(&p, &table, &docs);
    let applied_first = first.counter("tidemark_consumer_changes_total").await;
    let applied_second = second.counter("tidemark_consumer_changes_total").await;
    assert!(
        applied_first > 0.0 && applied_second > 0.0,
        "both members apply changes: {applied_first} and {applied_second}\n{}\n----\n{}",
        first.log(),
        second.log()
    );
    first.stop();
    second.stop();
    p.cleanup(&[&table]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_at_random_moments_under_load_loses_nothing() {
    let mut p = Pipeline::new("c_kill").await;
    let table = p.table("t");
    p.create_table(&table, "id int PRIMARY KEY, title text, n int", "")
        .await;
    p.start_producer().await;
    let mut consumer = p.start_consumer();
    consumer.wait_ready().await;
    let load = writer(
        p.stack.pg_url.clone(),
        table.clone(),
        60,
        Duration::from_millis(100),
    );
    let mut kills = 0;
    while kills < 3 {
        tokio::time::sleep(random_millis(500, 2500)).await;
        consumer.kill();
        kills += 1;
        consumer = p.start_consumer();
    }
    load.await.expect("writer");
    let docs = p.wait_converged(&table, 180, &[&consumer]).await;
    assert!(docs.len() > 2000, "{} docs", docs.len());
    assert_versions(&p, &table, &docs);
    consumer.stop();
    p.cleanup(&[&table]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn opensearch_down_for_30_s_mid_load_loses_nothing() {
    let node = ScratchOpenSearch::start();
    let mut p = Pipeline::with_opensearch("c_osdown", &node.url()).await;
    let table = p.table("t");
    p.create_table(&table, "id int PRIMARY KEY, title text, n int", "")
        .await;
    p.start_producer().await;
    let mut consumer = p.start_consumer();
    consumer.wait_ready().await;
    let load = writer(
        p.stack.pg_url.clone(),
        table.clone(),
        80,
        Duration::from_millis(500),
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    node.stop();
    let stopped = Instant::now();
    // While OpenSearch is away the consumer says so and waits.
    let mut saw_unready = false;
    while stopped.elapsed() < Duration::from_secs(30) {
        if let Some(answer) = http_get(consumer.port, "/readyz").await
            && answer.starts_with("HTTP/1.1 503")
            && answer.contains("opensearch down")
        {
            saw_unready = true;
        }
        assert!(
            consumer.child.try_wait().expect("try_wait").is_none(),
            "the consumer exited while OpenSearch was down:\n{}",
            consumer.log()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(
        saw_unready,
        "/readyz never reported OpenSearch down:\n{}",
        consumer.log()
    );
    node.up();
    load.await.expect("writer");
    let docs = p.wait_converged(&table, 180, &[&consumer]).await;
    assert!(docs.len() > 2500, "{} docs", docs.len());
    assert_versions(&p, &table, &docs);
    assert!(consumer.counter("tidemark_consumer_retries_total").await > 0.0);
    consumer.wait_ready().await;
    consumer.stop();
    p.cleanup(&[&table]).await;
}
