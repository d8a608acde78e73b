//! Consumer throughput and latency, against the local stack.
//!
//!     dev/stack up && cargo bench -p tidemark-consumer --bench consumer
//!
//! Environment: `TIDEMARK_BENCH_ROWS` (documents per throughput run,
//! default 100000), `TIDEMARK_BENCH_LATENCY_SECS` (length of the latency
//! run, default 20).
//!
//! The machine is shared and noisy (PostgreSQL, Kafka, OpenSearch and the
//! bench on the same cores), so the figures that matter are ratios against
//! baselines measured in the same run:
//! (a) OpenSearch alone: the same documents, as the same `_bulk` lines
//!     (version, metadata), the same number per request, one request at a
//!     time, into an index with the same settings;
//! (b) `tidemark-consumer` (release binary) applying a pre-filled topic of
//!     the same events: docs/s from its first applied change to its last;
//! (c) end to end: rows inserted into PostgreSQL (producer in this process,
//!     consumer binary) until all are applied, against the slower stage;
//! (d) commit-to-searchable latency, p50 and p99, at half of (c)'s rate,
//!     with OpenSearch's default 1 s refresh: each row's insert returns
//!     (commit), a poller searching every 50 ms notes when it appears.
//! Goals (issue): (b)/(a) >= 0.8; (c) bounded by the slowest stage; p99 < 2 s.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use opensearch::OpenSearch;
use opensearch::http::Url;
use opensearch::http::transport::{SingleNodeConnectionPool, TransportBuilder};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use tidemark_index::apply::{ApplyStats, bulk_lines};
use tidemark_index::mapping::Mappings;
use tidemark_schemas::config::Config;
use tidemark_schemas::{ChangeEvent, FORMAT_VERSION, Lsn, Operation, Source, record_key};
use tidemark_testkit::{Stack, unique_name};
use tokio::sync::watch;
use tokio_postgres::NoTls;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const PARTITIONS: i32 = 3;

struct Bench {
    stack: Stack,
    name: String,
    dir: std::path::PathBuf,
    os: OpenSearch,
}

fn os_client(url: &str) -> OpenSearch {
    let transport = TransportBuilder::new(SingleNodeConnectionPool::new(
        Url::parse(url).expect("OpenSearch URL"),
    ))
    .timeout(Duration::from_secs(120))
    .build()
    .expect("transport");
    OpenSearch::new(transport)
}

impl Bench {
    fn config(&self, table: &str, consumer_port: u16, group: &str) -> String {
        format!(
            "[postgres]\nurl = \"{}\"\n[kafka]\nbrokers = \"{}\"\ntopic_prefix = \"{}\"\npartitions = {PARTITIONS}\n\
             [opensearch]\nurl = \"{}\"\n[producer]\nslot = \"{}\"\npublication = \"{}\"\n\
             [consumer]\ngroup_id = \"{group}\"\nhttp_listen = \"127.0.0.1:{consumer_port}\"\n\
             [[tables]]\ntable = \"public.{table}\"\n\
             index_settings = {{ number_of_shards = 1, number_of_replicas = 0 }}\n",
            self.stack.pg_replication_url,
            self.stack.kafka_brokers,
            self.name,
            self.stack.opensearch_url,
            self.name,
            self.name,
        )
    }

    fn start_consumer(&self, config_text: &str, run: &str) -> Child {
        let path = self.dir.join(format!("{run}.toml"));
        std::fs::write(&path, config_text).expect("config");
        Command::new(env!("CARGO_BIN_EXE_tidemark-consumer"))
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join(format!("{run}.log"))).expect("log"))
            .spawn()
            .expect("start tidemark-consumer")
    }
}

fn free_port() -> u16 {
    tidemark_testkit::ports::free()
}

use tidemark_testkit::topics::metric_sum as metric;

/// The event of row `i` of a synthetic table: ~200 B of row data.
fn event(table: &str, i: u64, lsn: u64) -> ChangeEvent {
    let after = json!({
        "id": i,
        "title": format!("article number {i}"),
        "body": format!("{:0>120}", i.wrapping_mul(2_654_435_761)),
        "hidden": i.is_multiple_of(7),
        "score": i % 1000,
    });
    let Value::Object(after) = after else {
        unreachable!()
    };
    let mut key = serde_json::Map::new();
    key.insert("id".into(), json!(i));
    ChangeEvent {
        format: FORMAT_VERSION,
        source: Source {
            database: "bench".into(),
            schema: "public".into(),
            table: table.into(),
        },
        op: Operation::Insert,
        key,
        before: None,
        after: Some(after),
        unchanged_toast: vec![],
        commit_lsn: Lsn(lsn),
        timeline: 1,
        lsn: Lsn(lsn),
        xid: Some(1),
        commit_time: "2026-11-22T10:00:00.000000Z".into(),
    }
}

async fn create_topic(brokers: &str, topic: &str) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin");
    admin
        .create_topics(
            &[NewTopic::new(topic, PARTITIONS, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .expect("create topic");
}

async fn wait_metric(port: u16, name: &str, target: f64, child: &mut Child, what: &str) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if metric(port, name).await >= target {
            return Instant::now();
        }
        assert!(
            child.try_wait().ok().flatten().is_none(),
            "{what}: consumer exited"
        );
        assert!(Instant::now() < deadline, "{what}: not done in 10 minutes");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn stop(mut child: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

#[tokio::main]
async fn main() {
    let rows = env_usize("TIDEMARK_BENCH_ROWS", 100_000);
    let latency_secs = env_usize("TIDEMARK_BENCH_LATENCY_SECS", 20);
    let stack = Stack::get();
    let name = unique_name("bench_consumer");
    let dir = std::env::temp_dir().join(&name);
    std::fs::create_dir_all(&dir).expect("dir");
    let bench = Bench {
        os: os_client(&stack.opensearch_url),
        stack,
        name,
        dir,
    };
    println!("consumer bench: {rows} documents per throughput run");

    // (b) the consumer over a pre-filled topic.
    let table_b = format!("{}_b", bench.name);
    let topic_b = format!("{}.public.{table_b}", bench.name);
    create_topic(&bench.stack.kafka_brokers, &topic_b).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bench.stack.kafka_brokers)
        .set("linger.ms", "20")
        .set("compression.type", "lz4")
        .create()
        .expect("producer");
    let mut pending = Vec::new();
    let mut envelope_bytes = 0usize;
    for i in 0..rows as u64 {
        let e = event(&table_b, i, 1_000 + i);
        let payload = serde_json::to_vec(&e).expect("json");
        envelope_bytes += payload.len();
        let key = record_key(&e.source, &e.key);
        pending.push(
            producer
                .send_result(FutureRecord::to(&topic_b).key(&key).payload(&payload))
                .map_err(|(e, _)| e),
        );
        if pending.len() >= 10_000 {
            for p in pending.drain(..) {
                p.expect("queued")
                    .await
                    .expect("delivered")
                    .map_err(|(e, _)| e)
                    .expect("acked");
            }
        }
    }
    for p in pending.drain(..) {
        p.expect("queued")
            .await
            .expect("delivered")
            .map_err(|(e, _)| e)
            .expect("acked");
    }
    let port = free_port();
    let config_b = bench.config(&table_b, port, &format!("{}_b", bench.name));
    let mut consumer = bench.start_consumer(&config_b, "b");
    let started = wait_metric(
        port,
        "tidemark_consumer_changes_total",
        1.0,
        &mut consumer,
        "(b)",
    )
    .await;
    let done = wait_metric(
        port,
        "tidemark_consumer_changes_total",
        rows as f64,
        &mut consumer,
        "(b)",
    )
    .await;
    let consumer_rate = rows as f64 / (done - started).as_secs_f64();
    let bulks = metric(port, "tidemark_consumer_bulk_seconds_count")
        .await
        .max(1.0);
    let per_bulk = (rows as f64 / bulks).round().max(1.0) as usize;
    stop(consumer);

    // (a) OpenSearch alone, same lines, same documents per request.
    let config: Config = Config::from_toml(&config_b, |_| None).expect("config");
    let mappings = Mappings::new(&config);
    let index_a = format!("{}_a_baseline", bench.name);
    bench
        .os
        .indices()
        .create(opensearch::indices::IndicesCreateParts::Index(&index_a))
        .body(json!({"settings": {"number_of_shards": 1, "number_of_replicas": 0},
                     "mappings": {"properties": {"_tidemark": tidemark_index::mapping::meta_mapping()}}}))
        .send()
        .await
        .expect("create baseline index");
    let stats = ApplyStats::default();
    let mut bodies = Vec::new();
    let mut body = BytesMut::new();
    let mut in_body = 0;
    for i in 0..rows as u64 {
        let mut write = mappings
            .write(&event(&table_b, i, 1_000 + i))
            .expect("maps");
        if let tidemark_index::mapping::Write::Index { index, .. } = &mut write {
            index.clone_from(&index_a);
        }
        body.put_slice(&bulk_lines(&write, &stats));
        in_body += 1;
        if in_body == per_bulk {
            bodies.push(std::mem::take(&mut body).freeze());
            in_body = 0;
        }
    }
    if in_body > 0 {
        bodies.push(body.freeze());
    }
    let t0 = Instant::now();
    for b in bodies {
        let response = bench
            .os
            .bulk(opensearch::BulkParts::None)
            .body(vec![b])
            .send()
            .await
            .expect("bulk");
        let answer: Value = response.json().await.expect("bulk answer");
        assert_eq!(answer["errors"], json!(false), "baseline bulk had errors");
    }
    let baseline_rate = rows as f64 / t0.elapsed().as_secs_f64();
    println!(
        "(a) OpenSearch _bulk alone:       {baseline_rate:>9.0} docs/s  ({per_bulk} docs per request, {:.0} B per envelope)",
        envelope_bytes as f64 / rows as f64
    );
    println!(
        "(b) tidemark-consumer, pre-filled: {consumer_rate:>9.0} docs/s  (b)/(a) = {:.2}  (goal >= 0.8)",
        consumer_rate / baseline_rate
    );

    // (c) end to end from PostgreSQL.
    let (pg, connection) = tokio_postgres::connect(&bench.stack.pg_url, NoTls)
        .await
        .expect("PostgreSQL");
    tokio::spawn(connection);
    let table_c = format!("{}_c", bench.name);
    pg.batch_execute(&format!(
        "CREATE TABLE {table_c} (id bigint PRIMARY KEY, title text, body text, hidden bool, score int);
         ALTER TABLE {table_c} OWNER TO tidemark_repl;"
    ))
    .await
    .expect("table");
    let port = free_port();
    let config_c = bench.config(&table_c, port, &format!("{}_c", bench.name));
    let producer_config = Config::from_toml(&config_c, |_| None).expect("config");
    let producer_metrics = Arc::new(tidemark_producer::metrics::Metrics::default());
    let (stop_producer, shutdown) = watch::channel(false);
    let running = producer_metrics.clone();
    let producer_task = tokio::spawn(async move {
        tidemark_producer::run::run(producer_config, running, shutdown)
            .await
            .expect("producer");
    });
    while !producer_metrics.streaming.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut consumer = bench.start_consumer(&config_c, "c");
    wait_ready(port, &mut consumer).await;
    let t0 = Instant::now();
    let chunk = 10_000;
    for start in (0..rows).step_by(chunk) {
        pg.batch_execute(&format!(
            "INSERT INTO {table_c} SELECT g, 'article number ' || g, lpad((g * 2654435761)::text, 120, '0'), g % 7 = 0, g % 1000
             FROM generate_series({start}, {}) g",
            (start + chunk).min(rows) - 1
        ))
        .await
        .expect("insert");
    }
    let written = t0.elapsed();
    // The producer stage ends when its events counter reaches the rows.
    let mut produced_at = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if produced_at.is_none()
            && producer_metrics.render().lines().any(|l| {
                l.starts_with("tidemark_producer_events_total")
                    && l.contains("op=\"insert\"")
                    && l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) >= Some(rows as f64)
            })
        {
            produced_at = Some(t0.elapsed());
        }
        if metric(port, "tidemark_consumer_changes_total").await >= rows as f64 {
            break;
        }
        assert!(Instant::now() < deadline, "(c) not done in 10 minutes");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let end_to_end = t0.elapsed();
    let produced_at = produced_at.unwrap_or(end_to_end);
    let e2e_rate = rows as f64 / end_to_end.as_secs_f64();
    let producer_rate = rows as f64 / produced_at.as_secs_f64();
    let write_rate = rows as f64 / written.as_secs_f64();
    let slowest = producer_rate.min(consumer_rate).min(write_rate);
    println!(
        "(c) end to end:                   {e2e_rate:>9.0} changes/s  (inserts {write_rate:.0}/s, producer stage {producer_rate:.0}/s, consumer (b) {consumer_rate:.0}/s; (c)/slowest = {:.2})",
        e2e_rate / slowest
    );

    // (d) latency at half of (c)'s rate.
    let rate = (e2e_rate / 2.0).max(100.0);
    let per_tick = ((rate / 100.0).round() as usize).max(1);
    let index_c = format!("{}.public.{table_c}", bench.name);
    let first_id = rows as i64 + 1_000_000;
    let committed: Arc<std::sync::Mutex<HashMap<i64, Instant>>> = Arc::default();
    let (done_tx, done_rx) = watch::channel(false);
    let poller = {
        let os = os_client(&bench.stack.opensearch_url);
        let index = index_c.clone();
        tokio::spawn(async move {
            let mut seen: HashMap<i64, Instant> = HashMap::new();
            // Partitions are applied in separate bulks, so rows do not become
            // visible in id order: search from the lowest id not yet seen.
            let mut floor = first_id;
            let mut quiet_after_done = 0;
            loop {
                let answer: Value = os
                    .search(opensearch::SearchParts::Index(&[&index]))
                    .body(
                        json!({"size": 10000, "_source": false, "sort": [{"id": "asc"}],
                                 "query": {"range": {"id": {"gte": floor}}}}),
                    )
                    .send()
                    .await
                    .expect("search")
                    .json()
                    .await
                    .expect("search answer");
                let now = Instant::now();
                let hits = answer["hits"]["hits"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                for hit in &hits {
                    if let Some(id) = hit["_id"].as_str().and_then(|s| s.parse::<i64>().ok()) {
                        seen.entry(id).or_insert(now);
                    }
                }
                while seen.contains_key(&floor) {
                    floor += 1;
                }
                if *done_rx.borrow() {
                    let new = hits.iter().any(|h| {
                        h["_id"]
                            .as_str()
                            .and_then(|s| s.parse::<i64>().ok())
                            .is_some_and(|id| seen.get(&id) == Some(&now))
                    });
                    quiet_after_done = if new { 0 } else { quiet_after_done + 1 };
                    if quiet_after_done > 60 {
                        return seen;
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let t0 = Instant::now();
    let mut next = first_id;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while t0.elapsed() < Duration::from_secs(latency_secs as u64) {
        tick.tick().await;
        pg.batch_execute(&format!(
            "INSERT INTO {table_c} SELECT g, 'late ' || g, 'x', false, 1 FROM generate_series({next}, {}) g",
            next + per_tick as i64 - 1
        ))
        .await
        .expect("insert");
        let now = Instant::now();
        if let Ok(mut c) = committed.lock() {
            for id in next..next + per_tick as i64 {
                c.insert(id, now);
            }
        }
        next += per_tick as i64;
    }
    let _ = done_tx.send(true);
    let seen = poller.await.expect("poller");
    let committed = committed.lock().map(|c| c.clone()).unwrap_or_default();
    let mut latencies: Vec<f64> = committed
        .iter()
        .filter_map(|(id, at)| {
            seen.get(id)
                .map(|s| s.saturating_duration_since(*at).as_secs_f64())
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p) as usize];
    println!(
        "(d) commit-to-searchable at {:.0} rows/s ({} rows, {} seen): p50 {:.3} s, p99 {:.3} s (goal p99 < 2 s)",
        per_tick as f64 * 100.0,
        committed.len(),
        latencies.len(),
        pct(0.5),
        pct(0.99)
    );

    stop(consumer);
    let _ = stop_producer.send(true);
    let _ = producer_task.await;
    let _ = pg
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND NOT active",
            &[&bench.name],
        )
        .await;
    let _ = pg
        .batch_execute(&format!(
            "DROP PUBLICATION IF EXISTS {}; DROP TABLE IF EXISTS {table_c}",
            bench.name
        ))
        .await;
    for index in [
        index_a.as_str(),
        index_c.as_str(),
        &format!("{}.public.{table_b}", bench.name),
    ] {
        let _ = bench
            .os
            .indices()
            .delete(opensearch::indices::IndicesDeleteParts::Index(&[index]))
            .send()
            .await;
    }
}

async fn wait_ready(port: u16, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if tidemark_testkit::topics::http_get(port, "/readyz")
            .await
            .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
        {
            return;
        }
        assert!(child.try_wait().ok().flatten().is_none(), "consumer exited");
        assert!(Instant::now() < deadline, "consumer not ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
