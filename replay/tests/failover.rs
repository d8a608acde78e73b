//! A failover that loses the old primary's tail: documents written from
//! that tail carry versions from timeline 1 that are above the promoted
//! standby's LSNs. The version's timeline epoch (`tidemark_schemas::Version`)
//! makes every change of timeline 2 outrank them, so after the producer's
//! refusal and `--resnapshot`, the index holds exactly the new primary's
//! rows, and later changes go on landing. A slot lost without a failover
//! converges the same way.

#[path = "../../consumer/tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::Pipeline;
use tidemark_testkit::scratch::ScratchPostgres;
use tokio::sync::watch;

async fn doc(p: &Pipeline, index: &str, id: &str) -> Option<Value> {
    p.docs(index).await.remove(id)
}

async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within 90 s");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_failover_the_index_converges_to_the_new_primary() {
    let primary = ScratchPostgres::primary(&[("wal_level", "logical")]);
    let old = support::pg(&primary.url()).await;
    old.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 50) g;",
    )
    .await
    .expect("table");
    let standby = primary.standby();
    let mut p = Pipeline::new("r_failover").await;
    p.source_url = Some(primary.url());
    p.add_table("t", "");
    let index = format!("{}.public.t", p.name);
    p.start_producer().await;
    let consumer = p.start_consumer_in_process().await;
    wait_for("the snapshot indexed", async || {
        p.docs(&index).await.len() == 50
    })
    .await;

    // The standby stops receiving; the old primary writes a tail the
    // pipeline indexes, far ahead in WAL (so its LSNs stay above the new
    // primary's for the whole test), then crashes.
    standby.stop("fast");
    old.batch_execute(
        "CREATE TABLE filler AS SELECT g, md5(g::text) m FROM generate_series(1, 100000) g;
         DROP TABLE filler;
         UPDATE t SET v = 'tail' WHERE id <= 10;
         DELETE FROM t WHERE id = 50;
         INSERT INTO t VALUES (100, 'only in the tail');",
    )
    .await
    .expect("the tail");
    wait_for("the tail indexed", async || {
        doc(&p, &index, "100").await.is_some()
            && doc(&p, &index, "1").await.is_some_and(|d| d["v"] == "tail")
    })
    .await;
    p.stop_producer().await;
    drop(old);
    primary.stop("immediate");

    // Failover: the standby, without the tail, is promoted (timeline 2)
    // and takes writes.
    standby.start_again();
    standby.promote();
    let new = support::pg(&standby.url()).await;
    new.batch_execute("UPDATE t SET v = 'new' WHERE id IN (1, 2)")
        .await
        .expect("a write on the new primary");
    p.source_url = Some(standby.url());

    // The producer sees the new timeline and refuses; --resnapshot goes on.
    let metrics = Arc::new(tidemark_producer::metrics::Metrics::default());
    let (_stop, shutdown) = watch::channel(false);
    let refused = tidemark_producer::run::run(p.config(), metrics.clone(), shutdown.clone()).await;
    let message = refused.expect_err("a new timeline is a gap").to_string();
    assert!(message.contains("timeline 2, not 1"), "{message}");
    let (stop, shutdown) = watch::channel(false);
    let resnapshot = tokio::spawn(tidemark_producer::run::run_with(
        p.config(),
        tidemark_producer::run::StartOptions { resnapshot: true },
        metrics,
        shutdown,
    ));
    // The new snapshot outranks the tail: row 1 is 'new', 3 is back to 'v3',
    // 50 is back.
    wait_for("the new snapshot indexed", async || {
        let docs = p.docs(&index).await;
        docs.get("1").is_some_and(|d| d["v"] == "new")
            && docs.get("3").is_some_and(|d| d["v"] == "v3")
            && docs.contains_key("50")
    })
    .await;
    // Row 100 exists only in the lost tail: the resnapshot's marker removes
    // it (its version is timeline 1's), and the index is the new primary's
    // without any repair.
    wait_for("the tail-only row removed", async || {
        doc(&p, &index, "100").await.is_none()
    })
    .await;
    let (code, out, err) = p.run_replay(&["audit", "--format", "json", "--recheck-after", "1"]);
    assert_eq!(code, Some(0), "clean after the failover: {out}\n{err}");
    // And the new timeline's later changes land.
    new.batch_execute("UPDATE t SET v = 'later' WHERE id = 4")
        .await
        .expect("a later write");
    wait_for("a later change indexed", async || {
        doc(&p, &index, "4")
            .await
            .is_some_and(|d| d["v"] == "later")
    })
    .await;
    let _ = stop.send(true);
    let _ = resnapshot.await;
    consumer.stop().await;
    let _ =
        p.os.indices()
            .delete(opensearch::indices::IndicesDeleteParts::Index(&[&index]))
            .send()
            .await;
}

/// The slot is dropped while the producer is stopped and rows are deleted
/// meanwhile: after the refusal, `--resnapshot` alone (its marker) leaves
/// the index equal to the table, the rows deleted in the gap gone.
#[tokio::test(flavor = "multi_thread")]
async fn after_a_lost_slot_the_resnapshot_alone_converges_the_index() {
    let mut p = Pipeline::new("r_lostslot").await;
    let table = p.table("t");
    p.create_table(&table, "id int PRIMARY KEY, v text", "")
        .await;
    p.pg.batch_execute(&format!(
        "INSERT INTO {table} SELECT g, 'v' || g FROM generate_series(1, 40) g"
    ))
    .await
    .expect("rows");
    p.start_producer().await;
    let consumer = p.start_consumer_in_process().await;
    p.wait_converged(&table, 90, &[]).await;
    p.stop_producer().await;
    support::drop_slot(&p.pg, &p.name).await;
    p.pg.batch_execute(&format!(
        "DELETE FROM {table} WHERE id <= 10; UPDATE {table} SET v = 'gap' WHERE id = 20"
    ))
    .await
    .expect("changes during the gap");

    let metrics = Arc::new(tidemark_producer::metrics::Metrics::default());
    let (_stop, shutdown) = watch::channel(false);
    let refused = tidemark_producer::run::run(p.config(), metrics.clone(), shutdown).await;
    let message = refused.expect_err("a lost slot is a gap").to_string();
    assert!(message.contains("is gone"), "{message}");
    let (stop, shutdown) = watch::channel(false);
    let resnapshot = tokio::spawn(tidemark_producer::run::run_with(
        p.config(),
        tidemark_producer::run::StartOptions { resnapshot: true },
        metrics,
        shutdown,
    ));
    let docs = p.wait_converged(&table, 90, &[]).await;
    assert_eq!(docs.len(), 30);
    assert_eq!(docs["20"]["v"], "gap");
    let (code, out, err) = p.run_replay(&["audit", "--format", "json", "--recheck-after", "1"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    // The row's history says what the resnapshot did to it.
    let key = "{\"id\": 3}";
    let (code, out, err) = p.run_replay(&[
        "history",
        "--table",
        &format!("public.{table}"),
        "--key",
        key,
    ]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        out.contains("the row was gone (deleted during the gap), removed"),
        "{out}"
    );
    let _ = stop.send(true);
    let _ = resnapshot.await;
    consumer.stop().await;
    p.cleanup(&[&table]).await;
}
