//! Peak memory of the producer and consumer binaries together, at the
//! workload of the memory comparison in issue #20, against the local stack:
//!
//!     dev/stack up && cargo bench -p tidemark-consumer --bench pair_memory
//!
//! Workload, per variant: 100,000 rows (~200 B each) inserted, then every
//! row updated, then 30 s of 200 updates/s; the pair runs as release
//! binaries (`tidemark-producer` is built by this bench), each its own
//! process, and their peak resident sizes (`VmHWM`) are read when the
//! consumer has applied every change. Throughput is the inserts' and
//! updates' changes per second from the first insert to the last applied.
//!
//! Variants, in one run (the machine is shared: compare within a run):
//! - `librdkafka default`: `consumer.fetch_queue_kbytes = 65536`, the
//!   consumer's pre-fetch queue as librdkafka sizes it;
//! - `config default`: the shipped `consumer.fetch_queue_kbytes`;
//! - `2 MiB batches`: that, with `consumer.batch_max_bytes` at 2 MiB
//!   instead of 5 (how much of the peak the batches make).

//!
//! Environment: `TIDEMARK_BENCH_ROWS` (default 100000),
//! `TIDEMARK_BENCH_TAIL_SECS` (default 30), `TIDEMARK_BENCH_ROUNDS`
//! (default 1: each round runs both variants, interleaved).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tidemark_testkit::bench::{env_usize, median};
use tidemark_testkit::{Stack, unique_name};
use tokio_postgres::NoTls;

fn peak_rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

use tidemark_testkit::topics::metric_sum as metric;

fn stop(mut child: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

fn spawn(binary: &std::path::Path, config: &std::path::Path, log: &std::path::Path) -> Child {
    Command::new(binary)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .env_remove("TIDEMARK_KAFKA_BROKERS")
        .env_remove("TIDEMARK_OPENSEARCH_URL")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log"))
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", binary.display()))
}

/// The release producer binary, built for this bench.
fn producer_binary() -> std::path::PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--locked",
            "-p",
            "tidemark-producer",
            "--bin",
            "tidemark-producer",
        ])
        .status()
        .expect("cargo build");
    assert!(status.success(), "building tidemark-producer failed");
    let consumer = std::path::PathBuf::from(env!("CARGO_BIN_EXE_tidemark-consumer"));
    consumer.with_file_name("tidemark-producer")
}

struct Measured {
    producer_mb: f64,
    consumer_mb: f64,
    rate: f64,
}

async fn run(
    stack: &Stack,
    producer: &std::path::Path,
    variant: &str,
    consumer_extra: &str,
    rows: usize,
    tail_secs: usize,
) -> Measured {
    let name = unique_name("bench_pair");
    let dir = std::env::temp_dir().join(&name);
    std::fs::create_dir_all(&dir).expect("dir");
    let (pg, connection) = tokio_postgres::connect(&stack.pg_url, NoTls)
        .await
        .expect("PostgreSQL");
    tokio::spawn(connection);
    let table = format!("{name}_t");
    pg.batch_execute(&format!(
        "CREATE TABLE {table} (id bigint PRIMARY KEY, title text, body text);
         ALTER TABLE {table} OWNER TO tidemark_repl;"
    ))
    .await
    .expect("table");
    let consumer_port = tidemark_testkit::ports::free();
    let producer_port = tidemark_testkit::ports::free();
    let config = format!(
        "[postgres]\nurl = \"{}\"\n[kafka]\nbrokers = \"{}\"\ntopic_prefix = \"{name}\"\npartitions = 3\n\
         [opensearch]\nurl = \"{}\"\n[producer]\nslot = \"{name}\"\npublication = \"{name}\"\n\
         http_listen = \"127.0.0.1:{producer_port}\"\n\
         [consumer]\ngroup_id = \"{name}\"\nhttp_listen = \"127.0.0.1:{consumer_port}\"\n{consumer_extra}\n\
         [[tables]]\ntable = \"public.{table}\"\n\
         index_settings = {{ number_of_shards = 1, number_of_replicas = 0 }}\n",
        stack.pg_replication_url, stack.kafka_brokers, stack.opensearch_url,
    );
    let path = dir.join("pipeline.toml");
    std::fs::write(&path, config).expect("config");
    let mut producer_child = spawn(producer, &path, &dir.join("producer.log"));
    let consumer_child = spawn(
        std::path::Path::new(env!("CARGO_BIN_EXE_tidemark-consumer")),
        &path,
        &dir.join("consumer.log"),
    );
    // Streaming once the producer's slot exists.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let slot = pg
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active",
                &[&name],
            )
            .await
            .expect("slots");
        if slot.is_some() {
            break;
        }
        assert!(
            producer_child.try_wait().ok().flatten().is_none(),
            "{variant}: producer exited; see {}",
            dir.display()
        );
        assert!(
            Instant::now() < deadline,
            "{variant}: producer not streaming"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let t0 = Instant::now();
    let chunk = 10_000;
    for start in (0..rows).step_by(chunk) {
        let end = (start + chunk).min(rows) - 1;
        pg.batch_execute(&format!(
            "INSERT INTO {table} SELECT g, 'article number ' || g, lpad((g * 2654435761)::text, 160, '0')
             FROM generate_series({start}, {end}) g"
        ))
        .await
        .expect("insert");
    }
    for start in (0..rows).step_by(chunk) {
        let end = (start + chunk).min(rows) - 1;
        pg.batch_execute(&format!(
            "UPDATE {table} SET title = title || ' (edited)' WHERE id BETWEEN {start} AND {end}"
        ))
        .await
        .expect("update");
    }
    let bulk = 2 * rows;
    let deadline = Instant::now() + Duration::from_secs(900);
    while metric(consumer_port, "tidemark_consumer_changes_total").await < bulk as f64 {
        assert!(
            Instant::now() < deadline,
            "{variant}: not applied in 15 minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rate = bulk as f64 / t0.elapsed().as_secs_f64();
    // The tail: 200 updates/s, 20 every 100 ms.
    let tail_start = Instant::now();
    let mut next = 0usize;
    let mut sent = 0usize;
    while tail_start.elapsed() < Duration::from_secs(tail_secs as u64) {
        pg.batch_execute(&format!(
            "UPDATE {table} SET body = md5(random()::text) WHERE id IN (SELECT generate_series({next}, {}) % {rows})",
            next + 19
        ))
        .await
        .expect("tail update");
        next += 20;
        sent += 20;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let total = (bulk + sent) as f64;
    while metric(consumer_port, "tidemark_consumer_changes_total").await < total {
        assert!(Instant::now() < deadline, "{variant}: tail not applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let measured = Measured {
        producer_mb: peak_rss_mb(producer_child.id()),
        consumer_mb: peak_rss_mb(consumer_child.id()),
        rate,
    };
    stop(consumer_child);
    stop(producer_child);
    let _ = pg
        .batch_execute(&format!(
            "SELECT pg_drop_replication_slot('{name}'); DROP PUBLICATION IF EXISTS {name}; DROP TABLE {table};"
        ))
        .await;
    measured
}

#[tokio::main]
async fn main() {
    let rows = env_usize("TIDEMARK_BENCH_ROWS", 100_000);
    let tail_secs = env_usize("TIDEMARK_BENCH_TAIL_SECS", 30);
    let rounds = env_usize("TIDEMARK_BENCH_ROUNDS", 1).max(1);
    let stack = Stack::get();
    let producer = producer_binary();
    let variants = [
        ("librdkafka default", "fetch_queue_kbytes = 65536"),
        ("config default", ""),
        ("2 MiB batches", "batch_max_bytes = 2097152"),
    ];
    let mut results: Vec<Vec<Measured>> = variants.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for (i, (variant, extra)) in variants.iter().enumerate() {
            let m = run(&stack, &producer, variant, extra, rows, tail_secs).await;
            println!(
                "round {round} {variant:>18}: producer {:>6.1} MB  consumer {:>6.1} MB  pair {:>6.1} MB  {:>7.0} changes/s",
                m.producer_mb,
                m.consumer_mb,
                m.producer_mb + m.consumer_mb,
                m.rate
            );
            results[i].push(m);
        }
    }
    let summary = |ms: &[Measured]| {
        (
            median(
                &ms.iter()
                    .map(|m| m.producer_mb + m.consumer_mb)
                    .collect::<Vec<_>>(),
            ),
            median(&ms.iter().map(|m| m.rate).collect::<Vec<_>>()),
        )
    };
    let (base_mb, base_rate) = summary(&results[0]);
    for ((variant, _), ms) in variants.iter().zip(&results) {
        let (mb, rate) = summary(ms);
        println!(
            "{variant:>18}: pair peak {mb:>6.1} MB ({:.2} of librdkafka default), {rate:>7.0} changes/s ({:.2})  goal: pair < 150 MB",
            mb / base_mb,
            rate / base_rate
        );
    }
}
