//! Audit speed and memory on a large table, against the local stack.
//!
//!     dev/stack up && cargo bench -p tidemark-replay --bench audit
//!
//! Environment: `TIDEMARK_BENCH_ROWS` (default 1000000).
//!
//! Sets up a table of N rows and its index with the documents the consumer
//! would write (through the consumer's own mapping and bulk lines), then
//! measures, in the same run:
//! (a) baseline: reading the table through a cursor in the audit's chunk
//!     size (PostgreSQL alone), rows/s;
//! (b) `tidemark-replay audit` (release binary) on the clean table and
//!     index: rows compared per second, and its peak RSS (VmHWM);
//! (c) the same with `--deep` (every document's source read and hashed):
//!     rows/s as a ratio to (b);
//! (d) `--part 1/1`: one process auditing the table as a part does (rows
//!     hashed in PostgreSQL, documents looked up), as a ratio to (b);
//! (e) `--part 1/2` and `--part 2/2` as two processes at once: the table's
//!     rows over the wall time of both, as a ratio to (b) and to (d).
//! Goal (issue): (b) >= 100,000 rows/s with RSS under 200 MB.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use serde_json::{Value, json};
use tidemark_index::apply::{ApplyStats, bulk_lines};
use tidemark_index::mapping::Mappings;
use tidemark_index::search::Search;
use tidemark_schemas::config::Config;
use tidemark_schemas::{ChangeEvent, FORMAT_VERSION, Lsn, Operation, Source};
use tidemark_testkit::{Stack, unique_name};
use tokio_postgres::NoTls;

fn rows_env() -> usize {
    std::env::var("TIDEMARK_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

#[tokio::main]
async fn main() {
    let rows = rows_env();
    let stack = Stack::get();
    let name = unique_name("bench_audit");
    let table = format!("{name}_t");
    let dir = std::env::temp_dir().join(&name);
    std::fs::create_dir_all(&dir).expect("dir");
    let config_text = format!(
        "[postgres]\nurl = \"{}\"\n[kafka]\nbrokers = \"{}\"\ntopic_prefix = \"{name}\"\n\
         [opensearch]\nurl = \"{}\"\n\
         [[tables]]\ntable = \"public.{table}\"\n\
         index_settings = {{ number_of_shards = 1, number_of_replicas = 0, refresh_interval = \"30s\" }}\n",
        stack.pg_url, stack.kafka_brokers, stack.opensearch_url
    );
    let config_path = dir.join("tidemark.toml");
    std::fs::write(&config_path, &config_text).expect("config");
    let config = Config::from_toml(&config_text, |_| None).expect("config");
    let (pg, connection) = tokio_postgres::connect(&stack.pg_url, NoTls)
        .await
        .expect("PostgreSQL");
    tokio::spawn(connection);
    println!("audit bench: {rows} rows");

    let t0 = Instant::now();
    pg.batch_execute(&format!(
        "CREATE TABLE {table} (id bigint PRIMARY KEY, title text NOT NULL, n int NOT NULL);
         INSERT INTO {table} SELECT g, 'article number ' || g, g % 1000 FROM generate_series(1, {rows}) g;
         ANALYZE {table};"
    ))
    .await
    .expect("table");
    let search = Search::connect(config.opensearch().expect("opensearch")).expect("search");
    let mappings = Mappings::new(&config);
    let mapping = mappings.get("public", &table).expect("mapping");
    search
        .ensure_index(mapping, &config.tables[0], &dir, None)
        .await
        .expect("index");
    let stats = ApplyStats::default();
    let source = Source {
        database: "tidemark".into(),
        schema: "public".into(),
        table: table.clone(),
    };
    let mut body = BytesMut::new();
    let mut in_body = 0;
    for id in 1..=rows as i64 {
        let after = json!({"id": id, "title": format!("article number {id}"), "n": id % 1000});
        let Value::Object(after) = after else {
            unreachable!()
        };
        let mut key = serde_json::Map::new();
        key.insert("id".into(), json!(id));
        let event = ChangeEvent {
            format: FORMAT_VERSION,
            source: source.clone(),
            op: Operation::Snapshot,
            key,
            before: None,
            after: Some(after),
            unchanged_toast: vec![],
            commit_lsn: Lsn(1_000),
            timeline: 1,
            lsn: Lsn(1_000),
            xid: None,
            commit_time: "2026-11-22T10:00:00.000000Z".into(),
        };
        body.put_slice(&bulk_lines(&mappings.write(&event).expect("maps"), &stats));
        in_body += 1;
        if in_body == 10_000 || id == rows as i64 {
            let answer: Value = search
                .client()
                .bulk(opensearch::BulkParts::None)
                .body(vec![std::mem::take(&mut body).freeze()])
                .send()
                .await
                .expect("bulk")
                .json()
                .await
                .expect("bulk answer");
            assert_eq!(answer["errors"], json!(false), "setup bulk failed");
            in_body = 0;
        }
    }
    search
        .client()
        .indices()
        .refresh(opensearch::indices::IndicesRefreshParts::Index(&[
            &mapping.index
        ]))
        .send()
        .await
        .expect("refresh");
    println!(
        "setup (table + index of {rows}): {:.0} s",
        t0.elapsed().as_secs_f64()
    );

    // (a) PostgreSQL alone: the same cursor, the same chunk size.
    let t0 = Instant::now();
    pg.batch_execute(&format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY;
         DECLARE bench NO SCROLL CURSOR FOR SELECT id, title, n FROM {table}"
    ))
    .await
    .expect("cursor");
    let mut read = 0usize;
    loop {
        let got = pg
            .simple_query("FETCH 2000 FROM bench")
            .await
            .expect("fetch")
            .iter()
            .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
            .count();
        read += got;
        if got < 2000 {
            break;
        }
    }
    pg.batch_execute("COMMIT").await.expect("commit");
    let baseline = read as f64 / t0.elapsed().as_secs_f64();

    // (b) the audit, as a user runs it; (c) the same with --deep.
    let (rate, peak_mb, elapsed) = run_audit(&config_path, rows, &[]);
    let (deep_rate, deep_peak_mb, deep_elapsed) = run_audit(&config_path, rows, &["--deep"]);
    let (one_part_rate, one_part_elapsed) = run_parts(&config_path, rows, 1);
    let (two_parts_rate, two_parts_elapsed) = run_parts(&config_path, rows, 2);
    println!(
        "(a) PostgreSQL cursor read alone: {baseline:>9.0} rows/s\n\
         (b) tidemark-replay audit:        {rate:>9.0} rows/s  (b)/(a) = {:.2}; {elapsed:.1} s in all  (goal >= 100000 rows/s)\n\
         (c) tidemark-replay audit --deep: {deep_rate:>9.0} rows/s  (c)/(b) = {:.2}; {deep_elapsed:.1} s in all\n\
         peak RSS of the audit: {peak_mb:.1} MB, with --deep {deep_peak_mb:.1} MB  (goal < 200 MB)\n\
         (d) audit --part 1/1, one process: {one_part_rate:>9.0} rows/s  (d)/(b) = {:.2}; {one_part_elapsed:.1} s\n\
         (e) audit --part 1/2 and 2/2 at once: {two_parts_rate:>7.0} rows/s  (e)/(b) = {:.2}, (e)/(d) = {:.2}; {two_parts_elapsed:.1} s",
        rate / baseline,
        deep_rate / rate,
        one_part_rate / rate,
        two_parts_rate / rate,
        two_parts_rate / one_part_rate,
    );

    let _ = pg.batch_execute(&format!("DROP TABLE {table}")).await;
    let _ = search
        .client()
        .indices()
        .delete(opensearch::indices::IndicesDeleteParts::Index(&[
            &mapping.index
        ]))
        .send()
        .await;
}

/// Runs `audit --part I/n` for every I at once, as n processes: the
/// table's rows per second of wall time (all of them done), and seconds.
/// Their reports must add up to the whole table, clean.
fn run_parts(config_path: &std::path::Path, rows: usize, n: u32) -> (f64, f64) {
    let t0 = Instant::now();
    let children: Vec<_> = (1..=n)
        .map(|i| {
            Command::new(env!("CARGO_BIN_EXE_tidemark-replay"))
                .arg("--config")
                .arg(config_path)
                .args(["audit", "--format", "json", "--recheck-after", "1"])
                .args(["--part", &format!("{i}/{n}")])
                .env_remove("TIDEMARK_KAFKA_BROKERS")
                .env_remove("TIDEMARK_OPENSEARCH_URL")
                .env("RUST_LOG", "warn")
                .stdout(Stdio::piped())
                .spawn()
                .expect("audit --part")
        })
        .collect();
    let mut read = 0u64;
    for child in children {
        let output = child.wait_with_output().expect("wait");
        let out = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "a part found drift or failed: {out}"
        );
        let report: Value = serde_json::from_str(&out).expect("JSON report");
        read += report["tables"][0]["rows"].as_u64().unwrap_or(0);
    }
    let elapsed = t0.elapsed().as_secs_f64();
    assert_eq!(
        read, rows as u64,
        "the parts' rows do not add up to the table"
    );
    (rows as f64 / elapsed, elapsed)
}

/// Runs `tidemark-replay audit` (plus `extra`) on the clean table: rows
/// per second, peak RSS in MB (VmHWM), seconds.
fn run_audit(config_path: &std::path::Path, rows: usize, extra: &[&str]) -> (f64, f64, f64) {
    let t0 = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tidemark-replay"))
        .arg("--config")
        .arg(config_path)
        .args(["audit", "--format", "json", "--recheck-after", "1"])
        .args(extra)
        .env_remove("TIDEMARK_KAFKA_BROKERS")
        .env_remove("TIDEMARK_OPENSEARCH_URL")
        .stdout(Stdio::piped())
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .spawn()
        .expect("audit");
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak_kb = 0u64;
    let status = loop {
        if let Ok(text) = std::fs::read_to_string(&status_path)
            && let Some(kb) = text
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        {
            peak_kb = peak_kb.max(kb);
        }
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let elapsed = t0.elapsed().as_secs_f64();
    let mut out = String::new();
    use std::io::Read;
    if let Some(mut stdout) = child.stdout.take() {
        let _ = stdout.read_to_string(&mut out);
    }
    assert!(
        status.success(),
        "the audit {extra:?} found drift or failed: {status}\n{out}"
    );
    let report: Value = serde_json::from_str(&out).expect("JSON report");
    assert_eq!(report["tables"][0]["rows"], json!(rows));
    assert_eq!(report["tables"][0]["documents"], json!(rows));
    (rows as f64 / elapsed, peak_kb as f64 / 1024.0, elapsed)
}
