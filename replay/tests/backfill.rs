//! `tidemark-replay backfill` against the local stack: an index someone
//! emptied gets its table's rows back, with writes running throughout, and
//! ends exactly as the table is (no deleted row back, no live change
//! undone) with a clean audit.

#[path = "../../consumer/tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use support::Pipeline;
use tokio_postgres::NoTls;

/// Updates, deletes and inserts rows of `table` until `stop`, counting
/// statements in `done`.
async fn live_writes(
    url: String,
    table: String,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let (pg, connection) = tokio_postgres::connect(&url, NoTls).await?;
    tokio::spawn(connection);
    let mut i: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let id = (i * 37) % 3000 + 1;
        pg.execute(
            &format!("UPDATE {table} SET n = n + 1, title = 'live ' || n WHERE id = $1"),
            &[&(id as i32)],
        )
        .await?;
        if i.is_multiple_of(10) {
            let id = (i * 53) % 3000 + 1;
            pg.execute(
                &format!("DELETE FROM {table} WHERE id = $1"),
                &[&(id as i32)],
            )
            .await?;
        }
        if i.is_multiple_of(7) {
            pg.execute(
                &format!("INSERT INTO {table} VALUES ($1, 'new', 0)"),
                &[&(10_000 + i as i32)],
            )
            .await?;
        }
        done.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_emptied_index_is_backfilled_under_live_writes() {
    let mut p = Pipeline::new("r_backfill").await;
    let later = p.table("b");
    let qualified = format!("public.{later}");
    // Tombstones forgotten at once (`gc_deletes` 0): a document written at
    // the backfill's snapshot after the consumer applied a later delete
    // would stay, unless the engine deletes it again.
    p.create_table(
        &later,
        "id int PRIMARY KEY, title text, n int",
        "index_settings = { number_of_shards = 1, number_of_replicas = 0, gc_deletes = \"0s\" }",
    )
    .await;
    p.pg.batch_execute(&format!(
        "INSERT INTO {later} SELECT g, 'b ' || g, 0 FROM generate_series(1, 3000) g"
    ))
    .await
    .expect("rows");
    p.start_producer().await;
    let consumer = p.start_consumer_in_process().await;
    p.wait_converged(&later, 90, &[]).await;

    // A table configured while the producer has not been restarted is not
    // in the publication yet: what changed in it during the backfill would
    // be lost, so it is refused, naming the table.
    let other = p.table("c");
    p.create_table(&other, "id int PRIMARY KEY", "").await;
    let (code, out, err) = p.run_replay(&["backfill", "--table", &format!("public.{other}")]);
    assert_eq!(code, Some(2), "{out}\n{err}");
    assert!(
        err.contains("not in publication") && err.contains(&other),
        "{err}"
    );

    // Someone empties the index.
    let index = p.index(&later);
    let answer =
        p.os.delete_by_query(opensearch::DeleteByQueryParts::Index(&[&index]))
            .body(serde_json::json!({"query": {"match_all": {}}}))
            .refresh(true)
            .send()
            .await
            .expect("_delete_by_query");
    assert!(answer.status_code().is_success(), "_delete_by_query");
    assert_eq!(p.count(&index, "*").await, 0, "the index is empty");

    // A condition PostgreSQL refuses: exit 2, naming --where and the table.
    let (code, out, err) = p.run_replay(&[
        "backfill",
        "--table",
        &qualified,
        "--where",
        "no_such_column > 1",
    ]);
    assert_eq!(code, Some(2), "{out}\n{err}");
    assert!(
        err.contains("--where") && err.contains(&qualified) && err.contains("no_such_column"),
        "{err}"
    );
    // A dry run of a subset writes nothing and says what it would do.
    let (code, out, err) =
        p.run_replay(&["backfill", "--table", &qualified, "--where", "id <= 100"]);
    assert_eq!(code, Some(1), "a dry run: {out}\n{err}");
    assert!(err.contains("100 rows to backfill"), "{err}");
    assert!(
        out.contains(
            "100 would be created, 0 would be updated, 0 would be deleted, 0 already right"
        ),
        "{out}"
    );
    assert_eq!(p.count(&index, "*").await, 0, "the dry run wrote nothing");

    // The whole table, with updates, deletes and inserts running all along.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let writer = tokio::spawn(live_writes(
        p.stack.pg_url.clone(),
        later.clone(),
        stop.clone(),
        done.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = done.load(Ordering::Relaxed);
    let (code, out, err) =
        // Two seconds between reading the rows and writing them, for the
        // consumer to apply deletes made in between.
        tokio::task::block_in_place(|| {
            p.run_replay_with(
                &["backfill", "--table", &qualified, "--yes"],
                &[("TIDEMARK_REPLAY_PAUSE_BEFORE_WRITE_MS", "2000")],
            )
        });
    let during = done.load(Ordering::Relaxed) - before;
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("verified:"), "{out}");
    let again = out
        .split(" deleted again after the final check")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse::<u64>().ok());
    assert!(
        again.is_some_and(|n| n > 0),
        "no row deleted during the backfill was deleted again: {out}"
    );
    assert!(
        during >= 10,
        "only {during} live writes ran during the backfill"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.expect("writer").expect("live writes");

    // The index is the table: every live change kept, no deleted row back.
    let docs = p.wait_converged(&later, 90, &[]).await;
    assert!(docs.len() > 2900, "{} documents", docs.len());
    let (code, out, err) = p.run_replay(&["audit", "--table", &qualified, "--recheck-after", "1"]);
    assert_eq!(
        code,
        Some(0),
        "a clean audit after the backfill: {out}\n{err}"
    );
    let (_, runs, _) = p.run_replay(&["runs", "--format", "json"]);
    assert!(runs.contains("\"backfill\""), "{runs}");

    consumer.stop().await;
    p.cleanup(&[&later, &other]).await;
}
