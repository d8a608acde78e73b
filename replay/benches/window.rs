//! Replay speed, against the local stack.
//!
//!     dev/stack up && cargo bench -p tidemark-replay --bench window
//!
//! Environment: `TIDEMARK_BENCH_ROWS` (rows changed in the window, default
//! 100000); `TIDEMARK_BENCH_ROUNDS` (default 3); `TIDEMARK_BENCH_GAP_S`
//! (seconds from the inserts to the window, default 61: past the scan's
//! 60 s head start; 0 makes every scan read the inserts too); `RUST_LOG`
//! (also shows the replay command's own log, e.g.
//! `RUST_LOG=tidemark_replay=debug` for per-chunk timings); `TIDEMARK_BENCH_KEEP=1` leaves the table, topic,
//! index and config in place and prints how to run the command by hand
//! (for profiling one phase without re-creating the data).
//!
//! The incident of `shared/INCIDENTS.md` story 1: N rows exist and their
//! documents are current; then every row is updated inside the window and
//! none of those updates reaches the index (no consumer runs), so the index
//! holds N stale documents. A copy of that stale index is kept (write-
//! blocked), and before each measured run the index is put back to it
//! (`_clone`, versions included). Each round:
//! (a) baseline: the consumer (in-process) applying the window's N updates
//!     from Kafka, docs/s from its first applied batch to its last applied
//!     change (the first batch's changes are not counted: their time is not
//!     measured);
//! (b) `tidemark-replay window --yes` in source mode: keys/s, whole command;
//! (c) the same in log mode: events/s, whole command;
//! (d) `tidemark-replay backfill --table T --yes` of the whole table (the
//!     same N rows, every one stale): rows/s, as a ratio to (b), whose
//!     engine it shares, plus the reading of every key first.
//! After (b), (c) and (d) the bench checks that all N documents hold the updated
//! row. Every round's ratios are printed, then their medians. On this shared
//! machine the baseline alone moves by 1.5x between rounds a minute apart,
//! so one round's ratio says little; the rounds interleave (a), (b) and (c)
//! so that each ratio compares neighbours in time.
//! Goal (issue): (b)/(a) and (c)/(a) at least 0.8.

#[path = "../../consumer/tests/support/mod.rs"]
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::Pipeline;
use tidemark_testkit::bench::{Cpu, StackCpu, cpu_seconds, env_usize, median};
use tidemark_testkit::topic_record_count;

/// The baseline consumer runs in this process: give it the allocator the
/// `tidemark-consumer` binary uses, so (a) is what users run.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// (a): the consumer applying the window's events to the stale index,
/// docs/s from its first applied batch to its last applied change, and
/// how many changes that first batch held (not counted in the rate).
async fn consumer_rate(p: &Pipeline, table: &str, rows: usize) -> (f64, f64) {
    let consumer = p.start_consumer_in_process().await;
    let metrics = consumer.metrics.clone();
    let applied = || {
        metrics
            .render()
            .lines()
            .filter(|l| l.starts_with("tidemark_consumer_changes_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    // The clock starts when the first batch has been applied; the changes
    // of that batch took time before it, so they are not counted.
    let first = loop {
        let n = applied();
        if n >= 1.0 {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert!(
        first < rows as f64,
        "the consumer applied all {rows} changes in its first batch: too few to time; raise TIDEMARK_BENCH_ROWS"
    );
    let t0 = Instant::now();
    while applied() < rows as f64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = (rows as f64 - first) / t0.elapsed().as_secs_f64();
    consumer.stop().await;
    assert_eq!(
        updated(p, table).await as usize,
        rows,
        "the consumer applied every update"
    );
    (rate, first)
}

/// Answers a request or panics with its body.
async fn ok(response: Result<opensearch::http::response::Response, opensearch::Error>, what: &str) {
    let response = response.unwrap_or_else(|e| panic!("{what}: {e}"));
    let status = response.status_code();
    let text = response.text().await.unwrap_or_default();
    assert!(status.is_success(), "{what}: {status} {text}");
}

fn stale_copy(p: &Pipeline, table: &str) -> String {
    format!("{}-stale", p.index(table))
}

/// Keeps the index as it is now (the stale state) in a write-blocked copy.
async fn keep_stale_copy(p: &Pipeline, table: &str) {
    use opensearch::indices::{IndicesCloneParts, IndicesPutSettingsParts};
    let (index, stale) = (p.index(table), stale_copy(p, table));
    let indices = p.os.indices();
    let blocked = indices
        .put_settings(IndicesPutSettingsParts::Index(&[&index]))
        .body(serde_json::json!({"index.blocks.write": true}))
        .send()
        .await;
    ok(blocked, "block writes").await;
    let cloned = indices
        .clone(IndicesCloneParts::IndexTarget(&index, &stale))
        .wait_for_active_shards("1")
        .send()
        .await;
    ok(cloned, "clone to the stale copy").await;
}

/// Puts the index back to the stale copy (documents and versions).
async fn restore_stale(p: &Pipeline, table: &str) {
    use opensearch::indices::{IndicesCloneParts, IndicesDeleteParts};
    let (index, stale) = (p.index(table), stale_copy(p, table));
    let indices = p.os.indices();
    let _ = indices
        .delete(IndicesDeleteParts::Index(&[&index]))
        .send()
        .await;
    let cloned = indices
        .clone(IndicesCloneParts::IndexTarget(&stale, &index))
        .wait_for_active_shards("1")
        .body(serde_json::json!({"settings": {"index.blocks.write": null}}))
        .send()
        .await;
    ok(cloned, "restore from the stale copy").await;
}

/// Documents in the index.
async fn count(p: &Pipeline, table: &str) -> u64 {
    count_matching(p, table, serde_json::json!({"match_all": {}})).await
}

/// Documents holding the window's update of their row.
async fn updated(p: &Pipeline, table: &str) -> u64 {
    count_matching(
        p,
        table,
        serde_json::json!({"match_phrase": {"title": "edited"}}),
    )
    .await
}

/// Documents matching `query`, after a refresh.
async fn count_matching(p: &Pipeline, table: &str, query: serde_json::Value) -> u64 {
    let index = p.index(table);
    let _ =
        p.os.indices()
            .refresh(opensearch::indices::IndicesRefreshParts::Index(&[&index]))
            .send()
            .await;
    let answer: serde_json::Value =
        p.os.count(opensearch::CountParts::Index(&[&index]))
            .body(serde_json::json!({ "query": query }))
            .send()
            .await
            .expect("count")
            .json()
            .await
            .expect("count answer");
    answer["count"].as_u64().unwrap_or(0)
}

/// Runs `sql(first, last)` over ids 0..rows, 10,000 at a time, then waits
/// until the table's topic holds `rows * records_per_row` records.
async fn in_batches(
    p: &Pipeline,
    table: &str,
    rows: usize,
    records_per_row: usize,
    sql: impl Fn(usize, usize) -> String,
) {
    for first in (0..rows).step_by(10_000) {
        let last = (first + 10_000).min(rows) - 1;
        p.pg.batch_execute(&sql(first, last))
            .await
            .unwrap_or_else(|e| panic!("rows {first}-{last}: {e}"));
    }
    while (topic_record_count(&p.stack.kafka_brokers, &p.topic(table)) as usize)
        < rows * records_per_row
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs `tidemark-replay`; its wall seconds and CPU seconds.
fn replay(p: &Pipeline, args: &[&str]) -> (f64, f64) {
    let config = p.dir.join("bench.toml");
    std::fs::write(&config, p.config_text(1, "")).expect("config");
    let cpu0 = cpu_seconds(Cpu::WaitedChildren);
    let t0 = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_tidemark-replay"))
        .arg("--config")
        .arg(&config)
        .args(args)
        .env_remove("TIDEMARK_KAFKA_BROKERS")
        .env_remove("TIDEMARK_OPENSEARCH_URL")
        .output()
        .expect("replay");
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds(Cpu::WaitedChildren) - cpu0;
    // With RUST_LOG set (e.g. `tidemark_replay=debug`), show the command's
    // own log: its phases and per-chunk timings.
    if std::env::var_os("RUST_LOG").is_some() {
        eprint!("{}", String::from_utf8_lossy(&output.stderr));
    }
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (elapsed, cpu)
}

#[tokio::main]
async fn main() {
    // As the binaries do (the baseline consumer runs in this process).
    tidemark_process::no_transparent_huge_pages();
    let rows = env_usize("TIDEMARK_BENCH_ROWS", 100_000);
    let rounds = env_usize("TIDEMARK_BENCH_ROUNDS", 3).max(1);
    let mut p = Pipeline::new("bench_window").await;
    let table = p.table("t");
    p.create_table(&table, "id int PRIMARY KEY, title text, n int", "")
        .await;
    p.start_producer().await;
    println!("window bench: {rows} rows updated in the window, their documents stale");

    // Before the window: the rows exist and the index is current.
    in_batches(&p, &table, rows, 1, |first, last| {
        format!("INSERT INTO {table} SELECT g, 'article number ' || g, g % 1000 FROM generate_series({first}, {last}) g")
    })
    .await;
    let inserted = Instant::now();
    let window_start = p.topic_ends(&table);
    {
        let consumer = p.start_consumer_in_process().await;
        while (count(&p, &table).await as usize) < rows {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        consumer.stop().await;
    }
    keep_stale_copy(&p, &table).await;

    // The window: every row updated; no consumer runs, so the index misses
    // all of it. It starts `gap` after the inserts: a window scan starts
    // 60 s early (Kafka timestamps are not strictly monotonic), and in an
    // incident of hours those 60 s are a sliver of the scan; right after
    // the burst of inserts they would double it.
    let gap = Duration::from_secs(env_usize("TIDEMARK_BENCH_GAP_S", 61) as u64);
    tokio::time::sleep(
        gap.saturating_sub(inserted.elapsed())
            .max(Duration::from_millis(1100)),
    )
    .await;
    let from = jiff::Timestamp::now();
    in_batches(&p, &table, rows, 2, |first, last| {
        format!("UPDATE {table} SET title = title || ' (edited)', n = n + 1 WHERE id BETWEEN {first} AND {last}")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let to = jiff::Timestamp::now();
    let (from, to) = (from.to_string(), to.to_string());

    let (mut source_ratios, mut log_ratios, mut backfill_ratios) =
        (Vec::new(), Vec::new(), Vec::new());
    let qualified = format!("public.{table}");
    for round in 1..=rounds {
        p.seek_consumer_offsets(&table, &window_start);
        restore_stale(&p, &table).await;
        let (servers0, own0) = (
            StackCpu::sample(),
            cpu_seconds(Cpu::Process(std::process::id())),
        );
        let (consumer, first_batch) = consumer_rate(&p, &table, rows).await;
        let consumer_cpu = cpu_seconds(Cpu::Process(std::process::id())) - own0;
        let consumer_servers = StackCpu::sample().since(servers0);

        // (b) source mode, (c) log mode, each on the stale index.
        restore_stale(&p, &table).await;
        let servers0 = StackCpu::sample();
        let (source_secs, source_cpu) =
            replay(&p, &["window", "--from", &from, "--to", &to, "--yes"]);
        let source_servers = StackCpu::sample().since(servers0);
        assert_eq!(
            updated(&p, &table).await as usize,
            rows,
            "source mode repaired every document"
        );
        restore_stale(&p, &table).await;
        let servers0 = StackCpu::sample();
        let (log_secs, log_cpu) = replay(
            &p,
            &[
                "window", "--mode", "log", "--from", &from, "--to", &to, "--yes",
            ],
        );
        let log_servers = StackCpu::sample().since(servers0);
        assert_eq!(
            updated(&p, &table).await as usize,
            rows,
            "log mode repaired every document"
        );
        restore_stale(&p, &table).await;
        let (backfill_secs, backfill_cpu) =
            replay(&p, &["backfill", "--table", &qualified, "--yes"]);
        assert_eq!(
            updated(&p, &table).await as usize,
            rows,
            "backfill repaired every document"
        );
        let source = rows as f64 / source_secs;
        let log = rows as f64 / log_secs;
        let backfill = rows as f64 / backfill_secs;
        source_ratios.push(source / consumer);
        log_ratios.push(log / consumer);
        backfill_ratios.push(backfill / source);
        println!(
            "round {round}: (a) consumer {consumer:>6.0} docs/s | (b) source {source:>6.0} keys/s ({source_secs:.1} s, {source_cpu:.2} CPU-s) = {:.2} | (c) log {log:>6.0} events/s ({log_secs:.1} s, {log_cpu:.2} CPU-s) = {:.2}",
            source / consumer,
            log / consumer
        );
        println!(
            "         (d) backfill {backfill:>6.0} rows/s ({backfill_secs:.1} s, {backfill_cpu:.2} CPU-s) = {:.2} of (b)",
            backfill / source
        );
        println!(
            "         servers: (a) {consumer_servers}, consumer {consumer_cpu:.2} (first batch {first_batch} changes) | (b) {source_servers} | (c) {log_servers}"
        );
    }
    println!(
        "median of {rounds} rounds: (b)/(a) = {:.2}, (c)/(a) = {:.2}   (goal: both >= 0.8; whole commands against the consumer's steady rate); (d)/(b) = {:.2}",
        median(&source_ratios),
        median(&log_ratios),
        median(&backfill_ratios)
    );
    if std::env::var_os("TIDEMARK_BENCH_KEEP").is_some() {
        p.stop_producer().await;
        println!(
            "kept: {} --config {} window --from {from} --to {to} [--yes] (index {})",
            env!("CARGO_BIN_EXE_tidemark-replay"),
            p.dir.join("bench.toml").display(),
            p.index(&table)
        );
        return;
    }
    let _ =
        p.os.indices()
            .delete(opensearch::indices::IndicesDeleteParts::Index(&[
                &stale_copy(&p, &table),
            ]))
            .send()
            .await;
    p.cleanup(&[&table]).await;
}
