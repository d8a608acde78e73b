//! Replay speed, against the local stack.
//!
//!     dev/stack up && cargo bench -p tidemark-replay --bench window
//!
//! Environment: `TIDEMARK_BENCH_ROWS` (rows changed in the window, default
//! 100000); `TIDEMARK_BENCH_ROUNDS` (default 3); `RUST_LOG` (also shows the
//! replay command's own log, e.g. `RUST_LOG=tidemark_replay=debug` for
//! per-chunk timings).
//!
//! N rows are inserted while no consumer runs (the window), so the index
//! lacks all of them. Then, each time into the emptied index, each round:
//! (a) baseline: the consumer (in-process) applying the window's N events
//!     from Kafka, docs/s from its first to its last applied change;
//! (b) `tidemark-replay window --yes` in source mode: keys/s, whole command;
//! (c) the same in log mode: events/s, whole command.
//! Every round's ratios are printed, then their medians. On this shared
//! machine the baseline alone moves by 1.5x between rounds a minute apart,
//! so one round's ratio says little; the rounds interleave (a), (b) and (c)
//! so that each ratio compares neighbours in time.
//! Goal (issue): (b)/(a) and (c)/(a) at least 0.8.

#[path = "../../consumer/tests/support/mod.rs"]
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::Pipeline;
use tidemark_testkit::bench::{Cpu, cpu_seconds, env_usize, median};
use tidemark_testkit::topic_record_count;

/// The baseline consumer runs in this process: give it the allocator the
/// `tidemark-consumer` binary uses, so (a) is what users run.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// (a): the consumer applying the window's events into an empty index,
/// docs/s from its first to its last applied change.
async fn consumer_rate(p: &Pipeline, table: &str, rows: usize) -> f64 {
    empty_index(p, table).await;
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
    while applied() < 1.0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t0 = Instant::now();
    while applied() < rows as f64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = rows as f64 / t0.elapsed().as_secs_f64();
    consumer.stop().await;
    rate
}

async fn empty_index(p: &Pipeline, table: &str) {
    let index = p.index(table);
    let _ =
        p.os.indices()
            .delete(opensearch::indices::IndicesDeleteParts::Index(&[&index]))
            .send()
            .await;
    let config = p.config();
    let search = tidemark_consumer::search::Search::connect(config.opensearch().expect("os"))
        .expect("search");
    let mappings = tidemark_consumer::mapping::Mappings::new(&config);
    let mapping = mappings.iter().find(|m| m.index == index).expect("mapping");
    search
        .ensure_index(mapping, &config.tables[0], &p.dir)
        .await
        .expect("index");
}

async fn count(p: &Pipeline, table: &str) -> u64 {
    let index = p.index(table);
    let _ =
        p.os.indices()
            .refresh(opensearch::indices::IndicesRefreshParts::Index(&[&index]))
            .send()
            .await;
    let answer: serde_json::Value =
        p.os.count(opensearch::CountParts::Index(&[&index]))
            .send()
            .await
            .expect("count")
            .json()
            .await
            .expect("count answer");
    answer["count"].as_u64().unwrap_or(0)
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
    let rows = env_usize("TIDEMARK_BENCH_ROWS", 100_000);
    let rounds = env_usize("TIDEMARK_BENCH_ROUNDS", 3).max(1);
    let mut p = Pipeline::new("bench_window").await;
    let table = p.table("t");
    p.create_table(&table, "id int PRIMARY KEY, title text, n int", "")
        .await;
    p.start_producer().await;
    println!("window bench: {rows} rows changed in the window");

    let from = jiff::Timestamp::now();
    for start in (0..rows).step_by(10_000) {
        p.pg.batch_execute(&format!(
            "INSERT INTO {table} SELECT g, 'article number ' || g, g % 1000 FROM generate_series({start}, {}) g",
            (start + 10_000).min(rows) - 1
        ))
        .await
        .expect("insert");
    }
    while (topic_record_count(&p.stack.kafka_brokers, &p.topic(&table)) as usize) < rows {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let to = jiff::Timestamp::now();
    let (from, to) = (from.to_string(), to.to_string());

    let (mut source_ratios, mut log_ratios) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        if round > 1 {
            p.rewind_consumer_offsets(&table);
        }
        let consumer = consumer_rate(&p, &table, rows).await;

        // (b) source mode, (c) log mode, each into an empty index.
        empty_index(&p, &table).await;
        let (source_secs, source_cpu) =
            replay(&p, &["window", "--from", &from, "--to", &to, "--yes"]);
        assert_eq!(
            count(&p, &table).await as usize,
            rows,
            "source mode wrote every row"
        );
        empty_index(&p, &table).await;
        let (log_secs, log_cpu) = replay(
            &p,
            &[
                "window", "--mode", "log", "--from", &from, "--to", &to, "--yes",
            ],
        );
        assert_eq!(
            count(&p, &table).await as usize,
            rows,
            "log mode wrote every row"
        );
        let source = rows as f64 / source_secs;
        let log = rows as f64 / log_secs;
        source_ratios.push(source / consumer);
        log_ratios.push(log / consumer);
        println!(
            "round {round}: (a) consumer {consumer:>6.0} docs/s | (b) source {source:>6.0} keys/s ({source_secs:.1} s, {source_cpu:.2} CPU-s) = {:.2} | (c) log {log:>6.0} events/s ({log_secs:.1} s, {log_cpu:.2} CPU-s) = {:.2}",
            source / consumer,
            log / consumer
        );
    }
    println!(
        "median of {rounds} rounds: (b)/(a) = {:.2}, (c)/(a) = {:.2}   (goal: both >= 0.8; whole commands against the consumer's steady rate)",
        median(&source_ratios),
        median(&log_ratios)
    );
    p.cleanup(&[&table]).await;
}
