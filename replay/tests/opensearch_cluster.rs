//! The pipeline writing to a three-node OpenSearch cluster (one JVM per
//! node) that the test starts itself, with `opensearch.url` naming all
//! three: one node is killed with SIGKILL under steady load and started
//! again. The consumer carries on through the other two (each request goes
//! to the next node; one that meets the dead node is retried on the next),
//! and at the end every document equals its row, the audit is clean and
//! nothing was dead-lettered.

#[path = "../../consumer/tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::Pipeline;
use tidemark_testkit::scratch::ScratchOpenSearchCluster;

#[tokio::test(flavor = "multi_thread")]
async fn killing_an_opensearch_node_under_load_loses_nothing() {
    let cluster = tokio::task::spawn_blocking(ScratchOpenSearchCluster::start)
        .await
        .expect("cluster");
    // The test's own reads go to node 1; node 2 is the one killed.
    let mut p = Pipeline::with_opensearch("r_oscluster", &cluster.node_url(1)).await;
    p.opensearch_url = cluster.urls();
    let table = p.table("t");
    let qualified = format!("public.{table}");
    // Three shards with a replica each: every node holds some, and losing
    // one loses no data.
    p.create_table(
        &table,
        "id int PRIMARY KEY, title text, n int",
        "index_settings = { number_of_shards = 3, number_of_replicas = 1 }",
    )
    .await;
    p.pg.batch_execute(&format!(
        "INSERT INTO {table} SELECT g, 'o ' || g, 0 FROM generate_series(1, 1000) g"
    ))
    .await
    .expect("rows");
    p.start_producer().await;
    let consumer = p.start_consumer_in_process().await;
    p.wait_converged(&table, 120, &[]).await;

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let writer = tokio::spawn(support::churn(
        p.stack.pg_url.clone(),
        table.clone(),
        stop.clone(),
        done.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let started = Instant::now();
    let before = done.load(Ordering::Relaxed);
    let index = p.index(&table);
    tokio::task::block_in_place(|| cluster.kill(2));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let indexed_then = p.count(&index, "*").await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    // Not waiting for the node: the inserts made while it is down reach
    // the index through the other two.
    let indexed_since = p.count(&index, "*").await - indexed_then;
    let down = done.load(Ordering::Relaxed) - before;
    tokio::task::block_in_place(|| cluster.start_node(2));
    println!(
        "node 2 killed; {down} write rounds in the 10 s it was down, {indexed_since} documents \
         more in the last 8 of them; back after {:.0} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        indexed_since >= 50,
        "only {indexed_since} documents more while node 2 was down: the consumer waited for it \
         instead of going on through the other nodes"
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.expect("writer").expect("live writes");
    let writes = done.load(Ordering::Relaxed);
    assert!(
        down >= 100,
        "only {down} write rounds ran while node 2 was down"
    );

    let converging = Instant::now();
    let docs = p.wait_converged(&table, 180, &[]).await;
    let (code, out, err) = p.run_replay(&["audit", "--table", &qualified, "--recheck-after", "1"]);
    assert_eq!(code, Some(0), "a clean audit: {out}\n{err}");
    let dead = p.dead_letter_count();
    assert_eq!(dead, 0, "nothing dead-lettered");
    println!(
        "an OpenSearch node killed and back: {writes} write rounds, {} documents, converged \
         {:.1} s after the last write, {dead} dead letters, audit clean",
        docs.len(),
        converging.elapsed().as_secs_f64()
    );

    consumer.stop().await;
    p.cleanup(&[&table]).await;
    drop(cluster);
}
