//! Bounded memory where unchanged TOAST values are filled in from the index
//! (DESIGN.md invariant 6): updates that did not carry a large unchanged
//! value take it from the current document, and the values fetched for one
//! part of a batch are bounded by `consumer.batch_max_bytes`, not by how
//! many such updates the batch holds.
//!
//! `TIDEMARK_TOAST_ROWS` (default 100) sets how many 2 MB rows: 2,000 is
//! the full drill of the issue (4 GB through the stack; minutes), outside
//! `make test`.

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Pipeline, peak_rss};

/// Stated before measuring: the consumer that applies the updates peaks
/// under this, however many 2 MB values they leave out. Unbounded, it held
/// every value of the batch at once, about three times over (the answer,
/// its parsed documents, the bulk lines).
const PEAK_RSS_BOUND: u64 = 150 * 1024 * 1024;
const VALUE_BYTES: usize = 2 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread")]
async fn filling_unchanged_toast_values_stays_within_the_batch_budget() {
    let rows: u64 = std::env::var("TIDEMARK_TOAST_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let mut p = Pipeline::new("c_toastmem").await;
    p.producer_extra = "max_event_bytes = 3000000".into();
    let table = p.table("t");
    p.create_table(&table, "id int PRIMARY KEY, title text, body text", "")
        .await;
    // Out of line and uncompressed: every body is TOASTed, 2 MB as stored.
    p.pg.batch_execute(&format!(
        "ALTER TABLE {table} ALTER COLUMN body SET STORAGE EXTERNAL"
    ))
    .await
    .expect("storage");
    p.start_producer().await;
    p.set_topic_config(&table, "max.message.bytes", "3000000")
        .await;
    let mut consumer = p.start_consumer();
    consumer.wait_ready().await;
    let index = p.index(&table);
    let body = format!(
        "(SELECT string_agg(md5(g::text || id::text), '') FROM generate_series(1, {}) g)",
        VALUE_BYTES / 32
    );
    for start in (1..=rows).step_by(10) {
        let end = (start + 9).min(rows);
        p.pg.batch_execute(&format!(
            "INSERT INTO {table} SELECT id, 'a', {body} FROM generate_series({start}, {end}) id"
        ))
        .await
        .expect("rows");
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while p.count(&index, "*").await < rows {
        assert!(
            Instant::now() < deadline,
            "inserts not applied:\n{}",
            consumer.log()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    consumer.stop();
    // Every row updated in another column while no consumer runs: one
    // batch of updates that all leave the 2 MB body out.
    p.pg.batch_execute(&format!("UPDATE {table} SET title = 'b'"))
        .await
        .expect("updates");
    let mut consumer = p.start_consumer();
    consumer.wait_ready().await;
    let deadline = Instant::now() + Duration::from_secs(600);
    while p.count(&index, "title:b").await < rows {
        assert!(
            Instant::now() < deadline,
            "updates not applied:\n{}",
            consumer.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let peak = peak_rss(consumer.child.id());
    assert_eq!(
        consumer
            .counter("tidemark_consumer_incomplete_toast_total")
            .await,
        0.0,
        "every body was found in the index"
    );
    let doc: Value =
        p.os.get(opensearch::GetParts::IndexId(&index, "1"))
            .send()
            .await
            .expect("get")
            .json()
            .await
            .expect("doc");
    assert_eq!(doc["_source"]["title"], "b");
    assert_eq!(
        doc["_source"]["body"].as_str().map(str::len),
        Some(VALUE_BYTES),
        "the unchanged body was kept"
    );
    eprintln!(
        "{rows} updates leaving out {} MB of TOAST values: consumer peak RSS {} MB (bound {} MB)",
        rows * VALUE_BYTES as u64 / (1024 * 1024),
        peak / (1024 * 1024),
        PEAK_RSS_BOUND / (1024 * 1024)
    );
    assert!(peak > 0, "could not read the consumer's peak RSS");
    assert!(
        peak < PEAK_RSS_BOUND,
        "consumer peak RSS {} MB over the {} MB bound",
        peak / (1024 * 1024),
        PEAK_RSS_BOUND / (1024 * 1024)
    );
    consumer.stop();
    p.cleanup(&[&table]).await;
}
