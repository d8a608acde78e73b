//! Producer throughput and memory, against the local stack.
//!
//!     dev/stack up && cargo bench -p tidemark-producer --bench producer
//!
//! Environment: `TIDEMARK_BENCH_ROWS` (rows per throughput run, default
//! 200000), `TIDEMARK_BENCH_BIG_TXN` (rows of the single big transaction,
//! default 1000000).
//!
//! The machine is shared and noisy, so the figures that matter are ratios
//! against a baseline measured in the same run over the same WAL:
//! (a) the decode ceiling, `pg_recvlogical` with pgoutput writing to
//!     /dev/null, reading N already-written row inserts from a slot;
//! (b) `tidemark-producer` reading the same kind of WAL (N inserts written
//!     while it was stopped) until Kafka acknowledged all N records;
//! (c) the producer's peak RSS (VmHWM) while one transaction of a million
//!     rows goes through.
//! It also prints the producer's CPU time per change during (b), from
//! /proc (user + system, 100 ticks/s), which varies far less than wall time.
//! (a) and (b) are measured `TIDEMARK_BENCH_ROUNDS` times (default 3),
//! interleaved, and the median ratio is printed: one pair of runs on this
//! shared machine can be off by half.
//! Goals (issue): (b)/(a) >= 0.5; (c) < 100 MB.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tidemark_testkit::bench::{Cpu, cpu_seconds, env_usize, median};
use tidemark_testkit::{Stack, unique_name};
use tokio_postgres::{Client, NoTls};

#[tokio::main]
async fn main() {
    let rows = env_usize("TIDEMARK_BENCH_ROWS", 200_000);
    let big = env_usize("TIDEMARK_BENCH_BIG_TXN", 1_000_000);
    let rounds = env_usize("TIDEMARK_BENCH_ROUNDS", 3).max(1);
    let stack = Stack::get();
    let (pg, connection) = tokio_postgres::connect(&stack.pg_url, NoTls)
        .await
        .expect("PostgreSQL");
    tokio::spawn(connection);

    println!("producer bench: {rows} rows per run, {rounds} rounds, big transaction {big} rows");
    println!(
        "{:<6} {:<8} {:>14} {:>16} {:>8} {:>16}",
        "round", "row", "(a) decode/s", "(b) producer/s", "(b)/(a)", "producer CPU/chg"
    );
    let sizes = [("~200B", 170usize), ("~1KB", 990)];
    let mut ratios = vec![Vec::new(); sizes.len()];
    for round in 1..=rounds {
        for (i, (label, payload)) in sizes.iter().enumerate() {
            let decode = decode_ceiling(&pg, &stack, rows, *payload).await;
            let (produced, cpu_seconds) = producer_rate(&pg, &stack, rows, *payload).await;
            let cpu_micros = cpu_seconds * 1e6 / rows as f64;
            ratios[i].push(produced / decode);
            println!(
                "{round:<6} {label:<8} {decode:>14.0} {produced:>16.0} {:>8.2} {cpu_micros:>13.1} us",
                produced / decode
            );
        }
    }
    for ((label, _), ratios) in sizes.iter().zip(&ratios) {
        println!(
            "median (b)/(a) {label}: {:.2} over {rounds} rounds (goal >= 0.5)",
            median(ratios)
        );
    }
    let rss = big_transaction_rss(&pg, &stack, big).await;
    println!(
        "(c) peak RSS through one {big}-row transaction: {:.1} MB (goal < 100 MB)",
        rss as f64 / 1024.0
    );
}

async fn create_table(pg: &Client, payload: usize) -> String {
    let table = unique_name("bench");
    pg.batch_execute(&format!(
        "CREATE TABLE {table} (id int PRIMARY KEY, payload text NOT NULL);
         ALTER TABLE {table} OWNER TO tidemark_repl;"
    ))
    .await
    .expect("create table");
    let _ = payload;
    table
}

/// Inserts `rows` rows in transactions of 1000 (a steady OLTP-like shape).
async fn insert_rows(pg: &Client, table: &str, rows: usize, payload: usize) {
    for start in (0..rows).step_by(1000) {
        let end = (start + 1000).min(rows);
        pg.batch_execute(&format!(
            "INSERT INTO {table} SELECT g, repeat(md5(g::text), {}) FROM generate_series({}, {}) g",
            payload.div_ceil(32),
            start + 1,
            end
        ))
        .await
        .expect("insert");
    }
}

async fn decode_ceiling(pg: &Client, stack: &Stack, rows: usize, payload: usize) -> f64 {
    let table = create_table(pg, payload).await;
    let slot = unique_name("bench_a");
    pg.batch_execute(&format!("CREATE PUBLICATION {slot} FOR TABLE {table}"))
        .await
        .expect("publication");
    pg.execute(
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
        &[&slot],
    )
    .await
    .expect("slot");
    insert_rows(pg, &table, rows, payload).await;
    let end: String = pg
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("lsn")
        .get(0);
    let started = Instant::now();
    let status = Command::new("pg_recvlogical")
        .args([
            "-d",
            &stack.pg_replication_url,
            "--slot",
            &slot,
            "--start",
            "--no-loop",
        ])
        .args([
            "-o",
            "proto_version=1",
            "-o",
            &format!("publication_names={slot}"),
        ])
        .args(["-E", &end, "-f", "/dev/null"])
        .stderr(Stdio::null())
        .status()
        .expect("run pg_recvlogical");
    let elapsed = started.elapsed();
    assert!(status.success(), "pg_recvlogical failed: {status}");
    pg.execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .expect("drop slot");
    pg.batch_execute(&format!("DROP PUBLICATION {slot}; DROP TABLE {table};"))
        .await
        .expect("cleanup");
    rows as f64 / elapsed.as_secs_f64()
}

/// Killed when dropped, so a failed assertion leaves no producer behind.
struct Guard(std::process::Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

struct Producer {
    child: Guard,
    name: String,
    table: String,
    port: u16,
}

fn start_producer(stack: &Stack, table: &str, name: &str, port: u16) -> Guard {
    let dir = std::env::temp_dir().join(name);
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("bench.toml");
    std::fs::write(
        &config,
        format!(
            "[postgres]\nurl = \"{}\"\n[kafka]\nbrokers = \"{}\"\ntopic_prefix = \"{name}\"\npartitions = 3\n\
             [producer]\nslot = \"{name}\"\npublication = \"{name}\"\nhttp_listen = \"127.0.0.1:{port}\"\n\
             [[tables]]\ntable = \"public.{table}\"\n",
            stack.pg_replication_url, stack.kafka_brokers
        ),
    )
    .expect("config");
    let log = std::fs::File::create(dir.join("producer.log")).expect("log");
    Guard(
        Command::new(env!("CARGO_BIN_EXE_tidemark-producer"))
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stderr(log)
            .spawn()
            .expect("start producer"),
    )
}

async fn wait_ready(port: u16) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            let _ = s
                .write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await;
            let mut out = String::new();
            let _ = s.read_to_string(&mut out).await;
            if out.starts_with("HTTP/1.1 200") {
                return;
            }
        }
        assert!(Instant::now() < deadline, "producer not ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn stop(child: &mut Guard) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status();
    let _ = child.0.wait();
}

fn free_port() -> u16 {
    tidemark_testkit::ports::free()
}

async fn new_producer(pg: &Client, stack: &Stack, payload: usize) -> Producer {
    let table = create_table(pg, payload).await;
    let name = unique_name("bench_b");
    let port = free_port();
    let child = start_producer(stack, &table, &name, port);
    wait_ready(port).await;
    Producer {
        child,
        name,
        table,
        port,
    }
}

async fn cleanup(pg: &Client, p: &Producer) {
    let _ = pg
        .execute("SELECT pg_drop_replication_slot($1)", &[&p.name])
        .await;
    let _ = pg
        .batch_execute(&format!(
            "DROP PUBLICATION {}; DROP TABLE {};",
            p.name, p.table
        ))
        .await;
}

/// Changes per second of the catch-up, and the producer's CPU seconds for it.
async fn producer_rate(pg: &Client, stack: &Stack, rows: usize, payload: usize) -> (f64, f64) {
    // Create slot and topics, then stop, write the WAL, and time the catch-up.
    let mut p = new_producer(pg, stack, payload).await;
    stop(&mut p.child);
    insert_rows(pg, &p.table, rows, payload).await;
    let topic = format!("{}.public.{}", p.name, p.table);
    // One client for the whole poll: a new one per poll cost the shared
    // cores more than the poll itself.
    let mut count = tidemark_testkit::RecordCount::new(&stack.kafka_brokers, &topic);
    let started = Instant::now();
    p.child = start_producer(stack, &p.table, &p.name, p.port);
    while count.get() < rows as i64 {
        assert!(
            started.elapsed() < Duration::from_secs(1800),
            "producer did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    let cpu = cpu_seconds(Cpu::Process(p.child.0.id()));
    stop(&mut p.child);
    cleanup(pg, &p).await;
    (rows as f64 / elapsed.as_secs_f64(), cpu)
}

/// Peak resident memory (kB) of the producer through one huge transaction.
async fn big_transaction_rss(pg: &Client, stack: &Stack, rows: usize) -> u64 {
    let mut p = new_producer(pg, stack, 170).await;
    pg.batch_execute(&format!(
        "INSERT INTO {} SELECT g, repeat(md5(g::text), 6) FROM generate_series(1, {rows}) g",
        p.table
    ))
    .await
    .expect("big transaction");
    let topic = format!("{}.public.{}", p.name, p.table);
    let started = Instant::now();
    while tidemark_testkit::topic_record_count(&stack.kafka_brokers, &topic) < rows as i64 {
        assert!(
            started.elapsed() < Duration::from_secs(1800),
            "big transaction did not arrive"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", p.child.0.id())).expect("proc status");
    let peak = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .expect("VmHWM");
    stop(&mut p.child);
    cleanup(pg, &p).await;
    peak
}
