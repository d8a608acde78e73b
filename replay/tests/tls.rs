//! The incident tools against a PostgreSQL that accepts TCP only over TLS
//! (`sslmode=verify-full`): `window` (its exported snapshot on a
//! replication session, its reads on a SQL session), `audit` and `history`
//! work as they do in the clear.

#[path = "../../consumer/tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::Pipeline;
use tidemark_testkit::scratch::{PASSWORD, ScratchPostgres};

#[tokio::test(flavor = "multi_thread")]
async fn window_audit_and_history_over_verify_full() {
    let server = ScratchPostgres::secured();
    let admin = support::pg(&server.socket_url()).await;
    admin
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, v text);
             INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 50) g;",
        )
        .await
        .expect("table");
    let ca = server.certs.clone().expect("certs").ca;
    let mut p = Pipeline::new("r_tls").await;
    p.source_url = Some(format!(
        "postgres://postgres:{PASSWORD}@127.0.0.1:{}/postgres?sslmode=verify-full&sslrootcert={}",
        server.port,
        ca.display()
    ));
    p.add_table("t", "");
    let index = format!("{}.public.t", p.name);
    p.start_producer().await;
    let consumer = p.start_consumer_in_process().await;
    let deadline = Instant::now() + Duration::from_secs(90);
    while p.docs(&index).await.len() < 50 {
        assert!(Instant::now() < deadline, "the snapshot was not indexed");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    consumer.stop().await;

    // Ten updates the index never gets: the consumer is gone, and its
    // offsets are moved past them once they are in Kafka.
    admin
        .batch_execute("UPDATE t SET v = 'changed' WHERE id <= 10")
        .await
        .expect("updates");
    let deadline = Instant::now() + Duration::from_secs(60);
    while p.topic_ends("t").iter().sum::<i64>() < 60 {
        assert!(Instant::now() < deadline, "the updates did not reach Kafka");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    p.skip_consumer_offsets("t");

    let (code, out, err) = p.run_replay(&["window", "--from", "-10m", "--to", "now", "--yes"]);
    assert_eq!(code, Some(0), "window:\n{out}\n{err}");
    assert!(
        err.contains("database postgres, TLSv1.3 (sslmode=verify-full)"),
        "the target print says the session is encrypted:\n{err}"
    );
    let docs = p.docs(&index).await;
    let changed = (1..=10)
        .filter(|id| {
            docs.get(&id.to_string())
                .is_some_and(|d| d["v"] == "changed")
        })
        .count();
    assert_eq!(changed, 10, "window repaired every lost update: {out}");

    let (code, out, err) = p.run_replay(&["audit"]);
    assert_eq!(
        code,
        Some(0),
        "a clean audit after the repair:\n{out}\n{err}"
    );
    let (code, out, err) = p.run_replay(&["history", "--table", "public.t", "--key", "3"]);
    assert_eq!(code, Some(0), "history:\n{out}\n{err}");
    assert!(out.contains("changed"), "history shows the update:\n{out}");
    p.stop_producer().await;
}
