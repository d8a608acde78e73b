//! The pipeline on a three-node Kafka cluster (KRaft, replication factor 3,
//! `min.insync.replicas` 2) that the test starts itself: the leader broker
//! of a busy partition is killed with SIGKILL under steady load and
//! started again, `TIDEMARK_CLUSTER_KILLS` times (1 in `make test`, 5 in
//! `make cluster-test`), then the leader of partition 0 is stopped with
//! SIGSTOP for 15 s and continued; then three consumers share the group,
//! one restarted every 10 s (20 s in `make cluster-test`), a fourth
//! joining halfway. The producer and consumer keep running; at the end
//! every document equals its row, the audit is clean and nothing was
//! dead-lettered.

#[path = "../../consumer/tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use support::Pipeline;
use tidemark_testkit::kafka::ScratchKafkaCluster;

/// The node id leading `partition` of `topic`, and how many replicas it has.
fn leader(brokers: &str, topic: &str, partition: i32) -> (i32, usize) {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("metadata client");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(metadata) = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))
            && let Some(p) = metadata
                .topics()
                .first()
                .and_then(|t| t.partitions().iter().find(|p| p.id() == partition))
            && p.leader() > 0
        {
            return (p.leader(), p.replicas().len());
        }
        assert!(
            Instant::now() < deadline,
            "no leader of {topic}/{partition}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_the_leader_broker_under_load_loses_nothing() {
    let kills: i32 = std::env::var("TIDEMARK_CLUSTER_KILLS")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(1);
    let cluster = ScratchKafkaCluster::start();
    let mut p = Pipeline::new("r_cluster").await;
    p.stack.kafka_brokers = cluster.brokers();
    p.kafka_extra = "replication_factor = 3\n".into();
    let table = p.table("t");
    let qualified = format!("public.{table}");
    p.create_table(&table, "id int PRIMARY KEY, title text, n int", "")
        .await;
    p.pg.batch_execute(&format!(
        "INSERT INTO {table} SELECT g, 'c ' || g, 0 FROM generate_series(1, 1000) g"
    ))
    .await
    .expect("rows");
    p.start_producer().await;
    let mut consumers = vec![p.start_consumer_in_process().await];
    p.wait_converged(&table, 120, &[]).await;

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let writer = tokio::spawn(support::churn(
        p.stack.pg_url.clone(),
        table.clone(),
        stop.clone(),
        done.clone(),
    ));
    let topic = p.topic(&table);
    let started = Instant::now();
    for k in 0..kills {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let partition = k % 3;
        let brokers = cluster.brokers();
        let topic_name = topic.clone();
        let (node, replicas) =
            tokio::task::spawn_blocking(move || leader(&brokers, &topic_name, partition))
                .await
                .expect("leader");
        assert_eq!(replicas, 3, "{topic}/{partition} is not replicated 3 times");
        let before = done.load(Ordering::Relaxed);
        tokio::task::block_in_place(|| cluster.kill(node));
        tokio::time::sleep(Duration::from_secs(5)).await;
        tokio::task::block_in_place(|| cluster.start_node(node));
        println!(
            "kill {}: node {node} (leader of {topic}/{partition}) killed and back; {} write \
             rounds meanwhile",
            k + 1,
            done.load(Ordering::Relaxed) - before
        );
    }
    // A stall rather than a crash: the leader of partition 0 stopped
    // (SIGSTOP) for longer than the controller's broker session timeout
    // (`broker.session.timeout.ms`, 9 s), so it is fenced and its
    // partitions move, then continued (SIGCONT).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let brokers = cluster.brokers();
    let topic_name = topic.clone();
    let (node, _) = tokio::task::spawn_blocking(move || leader(&brokers, &topic_name, 0))
        .await
        .expect("leader");
    let before = done.load(Ordering::Relaxed);
    tokio::task::block_in_place(|| cluster.pause(node, true));
    tokio::time::sleep(Duration::from_secs(15)).await;
    tokio::task::block_in_place(|| cluster.pause(node, false));
    println!(
        "stall: node {node} (leader of {topic}/0) stopped for 15 s and continued; {} write \
         rounds meanwhile",
        done.load(Ordering::Relaxed) - before
    );
    tokio::time::sleep(Duration::from_secs(5)).await;

    // Rebalance storms: three consumers of the group, one of them
    // restarted every `every` seconds, and a fourth joining halfway.
    let (restarts, every) = if kills >= 5 { (4, 20) } else { (2, 10) };
    consumers.push(p.start_consumer_in_process().await);
    consumers.push(p.start_consumer_in_process().await);
    let before = done.load(Ordering::Relaxed);
    for r in 0..restarts {
        tokio::time::sleep(Duration::from_secs(every)).await;
        let one = consumers.remove(r % consumers.len());
        one.stop().await;
        consumers.push(p.start_consumer_in_process().await);
        if r + 1 == restarts / 2 {
            consumers.push(p.start_consumer_in_process().await);
        }
    }
    println!(
        "rebalances: {restarts} consumer restarts {every} s apart and a fourth consumer \
         joining; {} write rounds meanwhile",
        done.load(Ordering::Relaxed) - before
    );
    assert_eq!(consumers.len(), 4);
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.expect("writer").expect("live writes");
    let writes = done.load(Ordering::Relaxed);
    assert!(
        writes >= 100 * kills as u64,
        "only {writes} write rounds ran"
    );

    let converging = Instant::now();
    let docs = p.wait_converged(&table, 180, &[]).await;
    let (code, out, err) = p.run_replay(&["audit", "--table", &qualified, "--recheck-after", "1"]);
    assert_eq!(code, Some(0), "a clean audit: {out}\n{err}");
    let dead = p.dead_letter_count();
    assert_eq!(dead, 0, "nothing dead-lettered");
    println!(
        "{kills} kills of the leader broker, a 15 s stall and the rebalances survived in {:.0} s: {writes} write rounds, {} \
         documents, converged {:.1} s after the last write, {dead} dead letters, audit clean",
        started.elapsed().as_secs_f64(),
        docs.len(),
        converging.elapsed().as_secs_f64()
    );

    for consumer in consumers {
        consumer.stop().await;
    }
    p.cleanup(&[&table]).await;
    drop(cluster);
}
