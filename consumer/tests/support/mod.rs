//! A whole pipeline for one test on the local stack: its own tables, slot,
//! publication, topic prefix, consumer group and indices; the producer run
//! in-process (its own crate tests the binary); the real
//! `tidemark-consumer` binary; and ways to compare PostgreSQL with the index.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use opensearch::http::Url;
use opensearch::http::transport::{SingleNodeConnectionPool, TransportBuilder};
use opensearch::indices::IndicesRefreshParts;
use opensearch::{OpenSearch, SearchParts};
use serde_json::{Value, json};
use tidemark_schemas::config::Config;
#[allow(unused_imports)]
pub use tidemark_testkit::topics::{Record, drop_slot, http_get, pg, read_raw, read_topic};
use tidemark_testkit::{Stack, topic_record_count, unique_name};
use tokio::sync::watch;
use tokio_postgres::Client;

pub struct Pipeline {
    pub stack: Stack,
    pub pg: Client,
    pub name: String,
    pub dir: PathBuf,
    pub opensearch_url: String,
    pub os: OpenSearch,
    /// `[[tables]]` entries, appended to every config.
    tables_toml: String,
    /// More lines for the config's `[producer]` section.
    pub producer_extra: String,
    /// More lines for the config's `[kafka]` section.
    pub kafka_extra: String,
    /// The PostgreSQL the pipeline captures, when not the stack's (a
    /// scratch cluster).
    pub source_url: Option<String>,
    /// A secured broker (`tidemark_testkit::kafka::ScratchKafka`) instead
    /// of the stack's: its address and CA. Each stage then logs in as its
    /// own SCRAM user, `tidemark-<stage>`.
    pub secured_kafka: Option<(String, PathBuf)>,
    /// How each stage logs in to a secured OpenSearch: more `[opensearch]`
    /// lines and its `TIDEMARK_OPENSEARCH_PASSWORD`, by stage.
    pub opensearch_login: BTreeMap<String, (String, Option<String>)>,
    producer: Option<(tokio::task::JoinHandle<()>, watch::Sender<bool>)>,
    next_run: usize,
}

/// A running consumer process; dropping it kills the process.
#[derive(Debug)]
pub struct ConsumerProcess {
    pub child: Child,
    pub port: u16,
    pub run: usize,
    pub log: PathBuf,
}

impl ConsumerProcess {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn metrics(&self) -> String {
        http_get(self.port, "/metrics").await.unwrap_or_default()
    }

    /// A counter's value from `/metrics` (0 when absent).
    pub async fn counter(&self, name: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then a clean exit within 60 s.
    pub fn stop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                assert!(
                    status.success(),
                    "consumer exited with {status}:\n{}",
                    self.log()
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "consumer did not stop on SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "consumer exited with {status} before it was ready:\n{}",
                    self.log()
                );
            }
            if http_get(self.port, "/readyz")
                .await
                .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "consumer not ready in 90 s:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A consumer running inside the test process.
pub struct InProcessConsumer {
    pub handle: tokio::task::JoinHandle<Result<(), tidemark_consumer::error::ConsumerError>>,
    pub stop: watch::Sender<bool>,
    pub metrics: Arc<tidemark_consumer::metrics::Metrics>,
}

impl InProcessConsumer {
    /// Stops it the way SIGTERM does: finish, commit, leave the group.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        self.handle
            .await
            .expect("consumer task")
            .expect("consumer run");
    }
}

impl Drop for ConsumerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn free_port() -> u16 {
    tidemark_testkit::ports::free()
}

pub fn opensearch_client(url: &str) -> OpenSearch {
    let url = Url::parse(url).expect("OpenSearch URL");
    let transport = TransportBuilder::new(SingleNodeConnectionPool::new(url))
        .timeout(Duration::from_secs(30))
        .build()
        .expect("OpenSearch transport");
    OpenSearch::new(transport)
}

/// A test's own client of a secured scratch node: its `admin` user,
/// trusting the node's CA.
pub fn secured_opensearch_client(
    node: &tidemark_testkit::scratch::ScratchOpenSearch,
) -> OpenSearch {
    use opensearch::auth::Credentials;
    use opensearch::cert::{Certificate, CertificateValidation};
    let url = Url::parse(&node.url()).expect("OpenSearch URL");
    let ca = Certificate::from_pem(&std::fs::read(node.ca()).expect("the node's CA")).expect("PEM");
    let transport = TransportBuilder::new(SingleNodeConnectionPool::new(url))
        .timeout(Duration::from_secs(30))
        .cert_validation(CertificateValidation::Full(ca))
        .auth(Credentials::Basic("admin".into(), "admin-dev".into()))
        .build()
        .expect("OpenSearch transport");
    OpenSearch::new(transport)
}

impl Pipeline {
    pub async fn new(prefix: &str) -> Pipeline {
        let stack = Stack::get();
        let url = stack.opensearch_url.clone();
        Self::with_opensearch(prefix, &url).await
    }

    /// A pipeline whose index is a secured scratch node; set
    /// `opensearch_login` for the stages.
    pub async fn with_secured_opensearch(
        prefix: &str,
        node: &tidemark_testkit::scratch::ScratchOpenSearch,
    ) -> Pipeline {
        let mut p = Self::with_opensearch(prefix, &node.url()).await;
        p.os = secured_opensearch_client(node);
        p
    }

    pub async fn with_opensearch(prefix: &str, opensearch_url: &str) -> Pipeline {
        let stack = Stack::get();
        let pg = pg(&stack.pg_url).await;
        let name = unique_name(prefix);
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir).expect("temp dir");
        Pipeline {
            stack,
            pg,
            dir,
            os: opensearch_client(opensearch_url),
            opensearch_url: opensearch_url.to_owned(),
            name,
            tables_toml: String::new(),
            producer_extra: String::new(),
            kafka_extra: String::new(),
            source_url: None,
            secured_kafka: None,
            opensearch_login: BTreeMap::new(),
            producer: None,
            next_run: 0,
        }
    }

    /// A table name unique to this test.
    pub fn table(&self, suffix: &str) -> String {
        format!("{}_{suffix}", self.name)
    }

    pub fn topic(&self, table: &str) -> String {
        format!("{}.public.{table}", self.name)
    }

    /// The default index of a table: its topic name.
    pub fn index(&self, table: &str) -> String {
        self.topic(table)
    }

    /// Creates a table owned by the replication role and adds it to the
    /// config; `mapping` is extra TOML for its `[[tables]]` entry.
    pub async fn create_table(&mut self, table: &str, columns: &str, mapping: &str) {
        self.pg
            .batch_execute(&format!(
                "CREATE TABLE {table} ({columns}); ALTER TABLE {table} OWNER TO tidemark_repl;"
            ))
            .await
            .unwrap_or_else(|e| panic!("create {table}: {e}"));
        self.add_table(table, mapping);
    }

    /// Rewrites the tables' TOML (`from` -> `to`), e.g. a table's
    /// settings changed before a reindex; configs written afterwards
    /// carry it.
    pub fn edit_tables(&mut self, from: &str, to: &str) {
        assert!(
            self.tables_toml.contains(from),
            "{from:?} not in the tables"
        );
        self.tables_toml = self.tables_toml.replace(from, to);
    }

    /// Adds a table of schema public to the config only (it lives
    /// elsewhere, e.g. in a scratch cluster).
    pub fn add_table(&mut self, table: &str, mapping: &str) {
        let settings = if mapping.contains("index_settings") {
            ""
        } else {
            "index_settings = { number_of_shards = 1, number_of_replicas = 0 }\n"
        };
        self.tables_toml.push_str(&format!(
            "[[tables]]\ntable = \"public.{table}\"\n{settings}{mapping}\n"
        ));
    }

    /// The config text of the consumer; `consumer_port` goes to
    /// `consumer.http_listen`.
    pub fn config_text(&self, consumer_port: u16, consumer_extra: &str) -> String {
        self.config_text_as("consumer", consumer_port, consumer_extra)
    }

    /// The `[kafka]` lines that make `stage` log in to the secured broker
    /// as its own user (none for the stack's broker).
    fn kafka_security(&self, stage: &str) -> String {
        match &self.secured_kafka {
            Some((_, ca)) => format!(
                "security_protocol = \"sasl_ssl\"\nsasl_mechanism = \"SCRAM-SHA-512\"\n\
                 sasl_username = \"tidemark-{stage}\"\nssl_ca_location = \"{}\"\n",
                ca.display()
            ),
            None => String::new(),
        }
    }

    /// `TIDEMARK_OPENSEARCH_PASSWORD` of `stage`, if it logs in with one.
    pub fn opensearch_password(&self, stage: &str) -> Option<String> {
        self.opensearch_login
            .get(stage)
            .and_then(|(_, password)| password.clone())
    }

    /// `TIDEMARK_KAFKA_PASSWORD` of `stage` on the secured broker.
    pub fn kafka_password(&self, stage: &str) -> Option<String> {
        self.secured_kafka
            .as_ref()
            .map(|_| tidemark_testkit::kafka::password(&format!("tidemark-{stage}")))
    }

    /// The config text as `stage` (`producer`, `consumer`, `replay`) uses it.
    pub fn config_text_as(&self, stage: &str, consumer_port: u16, consumer_extra: &str) -> String {
        format!(
            "[postgres]\nurl = \"{}\"\n[kafka]\nbrokers = \"{}\"\ntopic_prefix = \"{}\"\npartitions = 3\n{}{}\
             [opensearch]\nurl = \"{}\"\n{}\
             [producer]\nslot = \"{}\"\npublication = \"{}\"\n{}\n\
             [consumer]\ngroup_id = \"{}\"\nbatch_max_wait_ms = 100\nhttp_listen = \"127.0.0.1:{consumer_port}\"\n{consumer_extra}\n{}",
            self.source_url
                .as_deref()
                .unwrap_or(&self.stack.pg_replication_url),
            self.secured_kafka
                .as_ref()
                .map_or(&self.stack.kafka_brokers, |(brokers, _)| brokers),
            self.name,
            self.kafka_security(stage),
            self.kafka_extra,
            self.opensearch_url,
            self.opensearch_login
                .get(stage)
                .map_or("", |(lines, _)| lines.as_str()),
            self.name,
            self.name,
            self.producer_extra,
            self.name,
            self.tables_toml,
        )
    }

    pub fn config(&self) -> Config {
        self.config_as("consumer")
    }

    /// The config as `stage` reads it (with its Kafka password).
    pub fn config_as(&self, stage: &str) -> Config {
        let password = self.kafka_password(stage);
        let os_password = self.opensearch_password(stage);
        Config::from_toml(&self.config_text_as(stage, 1, ""), |name| match name {
            "TIDEMARK_KAFKA_PASSWORD" => password.clone(),
            "TIDEMARK_OPENSEARCH_PASSWORD" => os_password.clone(),
            _ => None,
        })
        .expect("valid test config")
    }

    /// Runs the producer in this process until `stop_producer`.
    pub async fn start_producer(&mut self) {
        let config = self.config_as("producer");
        let metrics = Arc::new(tidemark_producer::metrics::Metrics::default());
        let (stop, shutdown) = watch::channel(false);
        let running = metrics.clone();
        let handle = tokio::spawn(async move {
            if let Err(e) = tidemark_producer::run::run(config, running, shutdown).await {
                panic!("producer failed: {e}");
            }
        });
        // Streaming means the slot exists and the snapshot is in Kafka: a
        // change made from now on is streamed, not snapshotted.
        let deadline = Instant::now() + Duration::from_secs(90);
        while !metrics.streaming.load(std::sync::atomic::Ordering::Relaxed) {
            assert!(
                !handle.is_finished(),
                "the producer stopped before streaming"
            );
            assert!(
                Instant::now() < deadline,
                "the producer was not streaming after 90 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.producer = Some((handle, stop));
    }

    pub async fn stop_producer(&mut self) {
        if let Some((handle, stop)) = self.producer.take() {
            let _ = stop.send(true);
            handle.await.expect("producer task");
        }
    }

    /// Starts a `tidemark-consumer` process; `extra` goes to its [consumer].
    pub fn start_consumer_with(&mut self, extra: &str) -> ConsumerProcess {
        let run = self.next_run;
        self.next_run += 1;
        let port = free_port();
        let path = self.dir.join(format!("consumer-{run}.toml"));
        std::fs::write(&path, self.config_text(port, extra)).expect("write config");
        let log = self.dir.join(format!("consumer-{run}.log"));
        // Built by `cargo test` for the consumer's own tests; other crates'
        // tests that include this module run the consumer in-process.
        let Some(binary) = option_env!("CARGO_BIN_EXE_tidemark-consumer") else {
            panic!(
                "the consumer binary is only known to the consumer's tests; use start_consumer_in_process"
            );
        };
        let mut command = Command::new(binary);
        if let Some(password) = self.kafka_password("consumer") {
            command.env("TIDEMARK_KAFKA_PASSWORD", password);
        }
        if let Some(password) = self.opensearch_password("consumer") {
            command.env("TIDEMARK_OPENSEARCH_PASSWORD", password);
        }
        let child = command
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "info,tidemark_consumer=debug")
            .env_remove("TIDEMARK_KAFKA_BROKERS")
            .env_remove("TIDEMARK_OPENSEARCH_URL")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start tidemark-consumer");
        ConsumerProcess {
            child,
            port,
            run,
            log,
        }
    }

    /// Runs a consumer in this process (for tests of other crates); stop
    /// it with the returned sender.
    pub async fn start_consumer_in_process(&self) -> InProcessConsumer {
        let config = self.config();
        let (search, mappings) = tidemark_consumer::run::prepare(&config, &self.dir)
            .await
            .expect("consumer prepare");
        let metrics = Arc::new(tidemark_consumer::metrics::Metrics::new(300));
        let (stop, shutdown) = watch::channel(false);
        let handle = tokio::spawn(tidemark_consumer::run::run(
            config,
            search,
            mappings,
            metrics.clone(),
            shutdown,
        ));
        InProcessConsumer {
            handle,
            stop,
            metrics,
        }
    }

    /// Moves the consumer group's committed offsets to the end of every
    /// partition of `table`'s topic, as a sync job that silently dropped
    /// records would: what was not applied yet is lost to the index. The
    /// group must have no running member.
    pub fn skip_consumer_offsets(&self, table: &str) {
        self.commit_group_offsets(table, |_, high| high);
    }

    /// Moves the consumer group's committed offsets back to the start of
    /// every partition of `table`'s topic, so the next consumer applies it
    /// all again (benchmark rounds). The group must have no running member.
    pub fn rewind_consumer_offsets(&self, table: &str) {
        self.commit_group_offsets(table, |low, _| low);
    }

    /// The end offset of every partition of `table`'s topic, by partition.
    pub fn topic_ends(&self, table: &str) -> Vec<i64> {
        let (_, watermarks) = self.group_client(table);
        watermarks.into_iter().map(|(_, high)| high).collect()
    }

    /// Moves the consumer group's committed offsets to `offsets` (by
    /// partition, e.g. from [`Pipeline::topic_ends`] earlier). The group must
    /// have no running member.
    pub fn seek_consumer_offsets(&self, table: &str, offsets: &[i64]) {
        let mut next = offsets.iter();
        self.commit_group_offsets(table, |_, _| *next.next().expect("an offset per partition"));
    }

    /// librdkafka settings of a test client of the pipeline's broker,
    /// logged in as `stage` when it is the secured one.
    pub fn kafka_client(&self, stage: &str) -> rdkafka::ClientConfig {
        match &self.secured_kafka {
            Some((brokers, ca)) => {
                tidemark_testkit::kafka::client(brokers, ca, &format!("tidemark-{stage}"))
            }
            None => {
                let mut config = rdkafka::ClientConfig::new();
                config.set("bootstrap.servers", &self.stack.kafka_brokers);
                config
            }
        }
    }

    /// A client of the consumer group, and the (low, high) watermarks of
    /// every partition of `table`'s topic.
    fn group_client(&self, table: &str) -> (rdkafka::consumer::BaseConsumer, Vec<(i64, i64)>) {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let topic = self.topic(table);
        let consumer: BaseConsumer = self
            .kafka_client("consumer")
            .set("group.id", &self.name)
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let metadata = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .expect("metadata");
        let partitions = metadata.topics()[0].partitions().len() as i32;
        let watermarks = (0..partitions)
            .map(|p| {
                consumer
                    .fetch_watermarks(&topic, p, Duration::from_secs(10))
                    .expect("watermarks")
            })
            .collect();
        (consumer, watermarks)
    }

    /// Commits, for the consumer group, `pick(low, high)` of each partition.
    fn commit_group_offsets(&self, table: &str, mut pick: impl FnMut(i64, i64) -> i64) {
        use rdkafka::consumer::{CommitMode, Consumer};
        let topic = self.topic(table);
        let (consumer, watermarks) = self.group_client(table);
        let mut offsets = rdkafka::TopicPartitionList::new();
        for (p, (low, high)) in watermarks.into_iter().enumerate() {
            offsets
                .add_partition_offset(&topic, p as i32, rdkafka::Offset::Offset(pick(low, high)))
                .expect("offset");
        }
        consumer
            .commit(&offsets, CommitMode::Sync)
            .expect("commit group offsets");
    }

    pub fn start_consumer(&mut self) -> ConsumerProcess {
        self.start_consumer_with("")
    }

    /// The incident drill of the secured-connection tests, on a pipeline
    /// whose producer runs: the consumer (in this process) indexes the
    /// `rows` rows of `table` (ids 1..=rows, in `source`), stops; ten
    /// updates it never gets (its offsets moved past them) are repaired by
    /// `tidemark-replay window --yes`; then `audit` is clean. Returns
    /// window's standard error (its target print).
    pub async fn lost_updates_drill(&self, source: &Client, table: &str, rows: usize) -> String {
        let index = self.index(table);
        let consumer = self.start_consumer_in_process().await;
        let deadline = Instant::now() + Duration::from_secs(90);
        while self.docs(&index).await.len() < rows {
            assert!(Instant::now() < deadline, "the snapshot was not indexed");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        consumer.stop().await;
        source
            .batch_execute(&format!("UPDATE {table} SET v = 'changed' WHERE id <= 10"))
            .await
            .expect("updates");
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.topic_ends(table).iter().sum::<i64>() < rows as i64 + 10 {
            assert!(Instant::now() < deadline, "the updates did not reach Kafka");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.skip_consumer_offsets(table);
        let (code, out, err) =
            self.run_replay(&["window", "--from", "-10m", "--to", "now", "--yes"]);
        assert_eq!(code, Some(0), "window:\n{out}\n{err}");
        let docs = self.docs(&index).await;
        let changed = (1..=10)
            .filter(|id| {
                docs.get(&id.to_string())
                    .is_some_and(|d| d["v"] == "changed")
            })
            .count();
        assert_eq!(changed, 10, "window repaired every lost update:\n{out}");
        let (code, out, audit_err) = self.run_replay(&["audit"]);
        assert_eq!(
            code,
            Some(0),
            "a clean audit after the repair:\n{out}\n{audit_err}"
        );
        err
    }

    /// Every document of an index by id (metadata included), after a refresh.
    pub async fn docs(&self, index: &str) -> BTreeMap<String, Value> {
        let _ = self
            .os
            .indices()
            .refresh(IndicesRefreshParts::Index(&[index]))
            .send()
            .await;
        let response = self
            .os
            .search(SearchParts::Index(&[index]))
            .body(json!({"size": 10000, "query": {"match_all": {}}, "version": true}))
            .send()
            .await
            .expect("search");
        if response.status_code().as_u16() == 404 {
            return BTreeMap::new();
        }
        let body: Value = response.json().await.expect("search answer");
        body["hits"]["hits"]
            .as_array()
            .map(|hits| {
                hits.iter()
                    .map(|h| {
                        let mut source = h["_source"].clone();
                        source["_version"] = h["_version"].clone();
                        (h["_id"].as_str().unwrap_or_default().to_owned(), source)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every row of a table as the producer maps it, by id: `to_jsonb`,
    /// which agrees with the producer for int, bigint, text and bool columns,
    /// and for timestamptz once +00:00 is written Z, less the generated
    /// columns (pgoutput does not send them).
    pub async fn rows(&self, table: &str) -> BTreeMap<String, Value> {
        let generated: Vec<String> = self
            .pg
            .query(
                "SELECT attname::text FROM pg_attribute
                 WHERE attrelid = $1::text::regclass AND attnum > 0 AND attgenerated <> ''",
                &[&table],
            )
            .await
            .expect("generated columns")
            .iter()
            .map(|r| r.get(0))
            .collect();
        self.pg
            .query(
                &format!("SELECT id::text, to_jsonb(t)::text FROM {table} t"),
                &[],
            )
            .await
            .expect("rows")
            .iter()
            .map(|r| {
                let json: String = r.get(1);
                let mut row: Value = serde_json::from_str(&json).expect("row json");
                // to_jsonb writes timestamptz in UTC as +00:00; the producer
                // writes Z. Same instant, same text after this.
                if let Some(map) = row.as_object_mut() {
                    map.retain(|column, _| !generated.contains(column));
                    for value in map.values_mut() {
                        let utc = value
                            .as_str()
                            .and_then(|t| t.strip_suffix("+00:00"))
                            .filter(|t| t.contains('T'))
                            .map(|t| format!("{t}Z"));
                        if let Some(utc) = utc {
                            *value = Value::String(utc);
                        }
                    }
                }
                (r.get::<_, String>(0), row)
            })
            .collect()
    }

    /// Waits (up to `secs`) until the index holds exactly the table's rows;
    /// panics with the difference otherwise. Returns the documents.
    pub async fn wait_converged(
        &self,
        table: &str,
        secs: u64,
        consumers: &[&ConsumerProcess],
    ) -> BTreeMap<String, Value> {
        let index = self.index(table);
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let rows = self.rows(table).await;
            let docs = self.docs(&index).await;
            let diff = difference(&rows, &docs);
            if diff.is_empty() {
                return docs;
            }
            if Instant::now() >= deadline {
                let logs: Vec<String> = consumers.iter().map(|c| c.log()).collect();
                panic!(
                    "{index} differs from {table} after {secs} s ({} rows, {} docs): {:#?}\nconsumer logs:\n{}",
                    rows.len(),
                    docs.len(),
                    &diff[..diff.len().min(10)],
                    logs.join("\n----\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// The event that decides each key's document in a table's topic (as
    /// of `expected` records), by document id: the one with the highest
    /// version, the later one of equals. That is the key's last event,
    /// except after a table was sent again (a schema change): its snapshot
    /// event then outranks the changes at or below its LSN streamed after it.
    pub fn last_events(&self, table: &str, expected: usize) -> BTreeMap<String, Record> {
        let records = read_topic(
            &self.stack.kafka_brokers,
            &self.topic(table),
            Duration::from_secs(60),
            |r| r.len() >= expected,
        );
        let mut last: BTreeMap<String, Record> = BTreeMap::new();
        for r in records {
            if let Some(id) = r.event.key.get("id") {
                let newer = last
                    .get(&id.to_string())
                    .is_none_or(|kept| r.event.commit_lsn >= kept.event.commit_lsn);
                if newer {
                    last.insert(id.to_string(), r);
                }
            }
        }
        last
    }

    /// Drops what the test created (slot, publication, tables, indices).
    pub async fn cleanup(&mut self, tables: &[&str]) {
        self.stop_producer().await;
        drop_slot(&self.pg, &self.name).await;
        let _ = self
            .pg
            .batch_execute(&format!("DROP PUBLICATION IF EXISTS {}", self.name))
            .await;
        for table in tables {
            let _ = self
                .pg
                .batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
                .await;
            let index = self.index(table);
            let _ = self
                .os
                .indices()
                .delete(opensearch::indices::IndicesDeleteParts::Index(&[&index]))
                .send()
                .await;
        }
    }
}

/// Rows without a document, documents without a row, and documents whose
/// fields differ from their row (metadata aside).
pub fn difference(rows: &BTreeMap<String, Value>, docs: &BTreeMap<String, Value>) -> Vec<String> {
    let mut out = Vec::new();
    for (id, row) in rows {
        match docs.get(id) {
            None => out.push(format!("missing {id}")),
            Some(doc) => {
                let mut fields = doc.clone();
                if let Some(map) = fields.as_object_mut() {
                    map.remove("_tidemark");
                    map.remove("_version");
                }
                if &fields != row {
                    out.push(format!("stale {id}: doc {fields} row {row}"));
                }
            }
        }
    }
    for id in docs.keys() {
        if !rows.contains_key(id) {
            out.push(format!("extra {id}"));
        }
    }
    out
}

/// Writes rounds of inserts, updates and deletes until `rounds` are done.
/// Round r inserts ids r*100..r*100+99, bumps every tenth row, deletes
/// every 97th.
pub fn writer(
    pg_url: String,
    table: String,
    rounds: i64,
    pause: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client = pg(&pg_url).await;
        for r in 0..rounds {
            client
                .batch_execute(&format!(
                    "INSERT INTO {table} SELECT g, md5(g::text), 0 FROM generate_series({}, {}) g;
                     UPDATE {table} SET n = n + 1, title = md5(random()::text) WHERE id % 10 = {};
                     DELETE FROM {table} WHERE id % 97 = {};",
                    r * 100,
                    r * 100 + 99,
                    r % 10,
                    r % 97
                ))
                .await
                .unwrap_or_else(|e| panic!("round {r}: {e}"));
            tokio::time::sleep(pause).await;
        }
    })
}

/// Every document's version is the highest commit LSN of its row's events.
pub fn assert_versions(
    p: &Pipeline,
    table: &str,
    docs: &std::collections::BTreeMap<String, serde_json::Value>,
) {
    let expected = topic_record_count(&p.stack.kafka_brokers, &p.topic(table));
    let last = p.last_events(table, expected as usize);
    for (id, doc) in docs {
        let event = &last[id].event;
        assert_eq!(doc["_version"], json!(event.commit_lsn.0), "doc {id}");
    }
}

/// What was seen of a consumer while it waited on something.
#[derive(Debug, Default)]
pub struct Watched {
    /// `/readyz` answered 503 naming the reason.
    pub unready: bool,
    /// `tidemark_consumer_blocked{index,reason}` was 1.
    pub gauge: bool,
}

impl Pipeline {
    /// Polls the consumer every second for `secs`: it must stay alive, and
    /// `/readyz` and the blocked gauge are checked for `reason` on `index`.
    pub async fn watch_stall(
        &self,
        consumer: &mut ConsumerProcess,
        index: &str,
        reason: &str,
        secs: u64,
    ) -> Watched {
        let mut seen = Watched::default();
        let gauge = format!("tidemark_consumer_blocked{{index=\"{index}\",reason=\"{reason}\"}} 1");
        let until = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < until {
            assert!(
                consumer.child.try_wait().expect("try_wait").is_none(),
                "the consumer exited while {index} was {reason}:\n{}",
                consumer.log()
            );
            if let Some(answer) = http_get(consumer.port, "/readyz").await
                && answer.starts_with("HTTP/1.1 503")
                && answer.contains(reason)
                && answer.contains(index)
            {
                seen.unready = true;
            }
            if consumer.metrics().await.contains(&gauge) {
                seen.gauge = true;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        seen
    }

    /// Polls the consumer every second until both `/readyz` and the blocked
    /// gauge name `reason` on `index`, or `secs` pass: for a stall that
    /// follows something slow (a schema change the producer first snapshots).
    pub async fn wait_stall(
        &self,
        consumer: &mut ConsumerProcess,
        index: &str,
        reason: &str,
        secs: u64,
    ) -> Watched {
        let until = Instant::now() + Duration::from_secs(secs);
        let mut seen = Watched::default();
        while Instant::now() < until && !(seen.unready && seen.gauge) {
            let now = self.watch_stall(consumer, index, reason, 1).await;
            seen.unready |= now.unready;
            seen.gauge |= now.gauge;
        }
        seen
    }

    /// Records in this pipeline's dead-letter topic.
    pub fn dead_letter_count(&self) -> i64 {
        topic_record_count(
            &self.stack.kafka_brokers,
            &format!("{}.dead-letter", self.name),
        )
    }

    /// An index API call that must succeed (close, open, settings, mapping).
    pub async fn index_admin(
        &self,
        method: opensearch::http::Method,
        path: &str,
        body: Option<Value>,
    ) {
        let response = self
            .os
            .send(
                method,
                path,
                opensearch::http::headers::HeaderMap::new(),
                None::<&()>,
                body.map(opensearch::http::request::JsonBody::new),
                None,
            )
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        let status = response.status_code();
        let text = response.text().await.unwrap_or_default();
        assert!(status.is_success(), "{path}: {status} {text}");
    }
}

impl Pipeline {
    /// Runs `tidemark-replay` with this pipeline's config: exit code,
    /// standard output, standard error. Only replay's own tests know the
    /// binary.
    pub fn run_replay(&self, args: &[&str]) -> (Option<i32>, String, String) {
        self.run_replay_with(args, &[])
    }

    /// [`Pipeline::run_replay`] with these environment variables set too.
    pub fn run_replay_with(
        &self,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> (Option<i32>, String, String) {
        let Some(binary) = option_env!("CARGO_BIN_EXE_tidemark-replay") else {
            panic!("the replay binary is only known to the replay crate's tests");
        };
        let config = self.dir.join("replay.toml");
        std::fs::write(&config, self.config_text_as("replay", 1, "")).expect("config");
        let mut command = Command::new(binary);
        if let Some(password) = self.kafka_password("replay") {
            command.env("TIDEMARK_KAFKA_PASSWORD", password);
        }
        if let Some(password) = self.opensearch_password("replay") {
            command.env("TIDEMARK_OPENSEARCH_PASSWORD", password);
        }
        let output = command
            .arg("--config")
            .arg(&config)
            .args(args)
            .env_remove("TIDEMARK_KAFKA_BROKERS")
            .env_remove("TIDEMARK_OPENSEARCH_URL")
            .envs(env.iter().copied())
            .output()
            .expect("run tidemark-replay");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }
}

impl Pipeline {
    /// Sets one config of a table's topic (AlterConfigs replaces the
    /// topic's whole dynamic config, so one at a time).
    pub async fn set_topic_config(&self, table: &str, name: &str, value: &str) {
        use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
        let admin: AdminClient<rdkafka::client::DefaultClientContext> =
            rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &self.stack.kafka_brokers)
                .create()
                .expect("admin client");
        let topic = self.topic(table);
        let change = AlterConfig::new(ResourceSpecifier::Topic(&topic)).set(name, value);
        let results = admin
            .alter_configs(&[change], &AdminOptions::new())
            .await
            .expect("alter configs");
        for result in results {
            result.unwrap_or_else(|e| panic!("{topic} {name}={value}: {e:?}"));
        }
    }

    /// Documents in an index matching a query string (`*` for all).
    pub async fn count(&self, index: &str, query: &str) -> u64 {
        let _ = self
            .os
            .indices()
            .refresh(IndicesRefreshParts::Index(&[index]))
            .send()
            .await;
        let response = self
            .os
            .count(opensearch::CountParts::Index(&[index]))
            .q(query)
            .send()
            .await
            .expect("count");
        let body: Value = response.json().await.unwrap_or_default();
        body["count"].as_u64().unwrap_or(0)
    }
}

/// The peak resident memory of a process (`VmHWM`), in bytes.
pub fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Steady load on a table of rows 1..=1000 (`id int, title text, n int`):
/// updates, inserts (ids from 100,001) and deletes until `stop`, about 200
/// rounds a second, counting rounds in `done`.
pub async fn churn(
    url: String,
    table: String,
    stop: Arc<std::sync::atomic::AtomicBool>,
    done: Arc<std::sync::atomic::AtomicU64>,
) -> anyhow::Result<()> {
    let (pg, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let mut i: i32 = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        i += 1;
        pg.execute(
            &format!("UPDATE {table} SET n = n + 1 WHERE id = $1"),
            &[&((i * 37) % 1000 + 1)],
        )
        .await?;
        if i % 4 == 0 {
            pg.execute(
                &format!("INSERT INTO {table} VALUES ($1, 'new', 0)"),
                &[&(100_000 + i)],
            )
            .await?;
        }
        if i % 10 == 0 {
            pg.execute(
                &format!("DELETE FROM {table} WHERE id = $1"),
                &[&((i * 53) % 1000 + 1)],
            )
            .await?;
        }
        done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}
