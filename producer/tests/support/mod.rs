//! Runs the real `tidemark-producer` binary against the local stack, with a
//! table, slot, publication and topic prefix of its own, and reads back what
//! it wrote to Kafka.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[allow(unused_imports)]
pub use tidemark_testkit::topics::{Record, http_get, pg, read_raw, read_topic};
use tidemark_testkit::{Stack, unique_name};
use tokio_postgres::Client;

pub struct Harness {
    pub stack: Stack,
    pub pg: Client,
    /// Unique name used for slot, publication and topic prefix.
    pub name: String,
    pub dir: PathBuf,
    pub http_port: u16,
}

/// A running producer process. Dropping it kills the process, so a failing
/// test never leaves a producer (and its walsender) behind.
#[derive(Debug)]
pub struct Producer(Child);

impl std::ops::Deref for Producer {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Producer {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn free_port() -> u16 {
    tidemark_testkit::ports::free()
}

impl Harness {
    pub async fn new(prefix: &str) -> Harness {
        let stack = Stack::get();
        let pg = pg(&stack.pg_url).await;
        let name = unique_name(prefix);
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir).expect("temp dir");
        Harness {
            stack,
            pg,
            name,
            dir,
            http_port: free_port(),
        }
    }

    /// A table name unique to this test.
    pub fn table(&self, suffix: &str) -> String {
        format!("{}_{suffix}", self.name)
    }

    pub fn topic(&self, table: &str) -> String {
        format!("{}.public.{table}", self.name)
    }

    /// The config of [`Harness::config`] pointed at another server (a
    /// scratch cluster a test may restart), as `scratch.toml`.
    pub fn config_at(&self, url: &str, tables: &[&str]) -> PathBuf {
        let text = std::fs::read_to_string(self.config(tables, "")).expect("config");
        let path = self.dir.join("scratch.toml");
        std::fs::write(&path, text.replace(&self.stack.pg_replication_url, url))
            .expect("scratch config");
        path
    }

    /// Writes a config for `tables` (in schema public) and returns its path.
    /// `extra` is appended to the [producer] section.
    pub fn config(&self, tables: &[&str], extra: &str) -> PathBuf {
        let mut text = format!(
            "[postgres]\nurl = \"{}\"\n[kafka]\nbrokers = \"{}\"\ntopic_prefix = \"{}\"\npartitions = 3\n\
             [producer]\nslot = \"{}\"\npublication = \"{}\"\nhttp_listen = \"127.0.0.1:{}\"\n{extra}\n",
            self.stack.pg_replication_url,
            self.stack.kafka_brokers,
            self.name,
            self.name,
            self.name,
            self.http_port
        );
        for table in tables {
            text.push_str(&format!("[[tables]]\ntable = \"public.{table}\"\n"));
        }
        let path = self.dir.join("tidemark.toml");
        std::fs::write(&path, text).expect("write config");
        path
    }

    /// Creates a table owned by the replication role, so the producer may
    /// publish it (as it would its own tables in production).
    pub async fn create_table(&self, table: &str, columns: &str) {
        self.pg
            .batch_execute(&format!(
                "CREATE TABLE {table} ({columns}); ALTER TABLE {table} OWNER TO tidemark_repl;"
            ))
            .await
            .unwrap_or_else(|e| panic!("create {table}: {e}"));
    }

    /// Starts the producer binary; its log goes to `<dir>/producer-<n>.log`.
    pub fn start(&self, config: &PathBuf, run: usize) -> Producer {
        self.start_with(config, run, &[])
    }

    /// [`Harness::start`] with more command-line arguments.
    pub fn start_with(&self, config: &PathBuf, run: usize, args: &[&str]) -> Producer {
        let log =
            std::fs::File::create(self.dir.join(format!("producer-{run}.log"))).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_tidemark-producer"))
            .arg("--config")
            .arg(config)
            .args(args)
            .env("RUST_LOG", "info,tidemark_producer=debug")
            .env_remove("TIDEMARK_KAFKA_BROKERS")
            .env_remove("TIDEMARK_POSTGRES_URL")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start tidemark-producer");
        Producer(child)
    }

    pub fn log(&self, run: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("producer-{run}.log"))).unwrap_or_default()
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self, child: &mut Producer, run: usize) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "producer exited with {status} before it was ready:\n{}",
                    self.log(run)
                );
            }
            if http_get(self.http_port, "/readyz")
                .await
                .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "producer not ready in 90 s:\n{}",
                self.log(run)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn stop(&self, mut child: Producer, run: usize) {
        let pid = child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                assert!(
                    status.success(),
                    "producer exited with {status}:\n{}",
                    self.log(run)
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "producer did not stop on SIGTERM:\n{}",
                self.log(run)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Reads a topic from the beginning until `done` holds for what was read.
    pub fn read_until(&self, topic: &str, done: impl Fn(&[Record]) -> bool) -> Vec<Record> {
        read_topic(
            &self.stack.kafka_brokers,
            topic,
            Duration::from_secs(90),
            done,
        )
    }

    /// The server's current WAL position.
    pub async fn current_wal_lsn(&self) -> String {
        self.pg
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .expect("lsn")
            .get(0)
    }

    /// Waits (up to 60 s) until the slot is confirmed at or past `lsn`.
    pub async fn wait_slot_confirmed(&self, lsn: &str, run: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let reached: bool = self
                .pg
                .query_one(
                    "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
                    &[&self.name, &lsn],
                )
                .await
                .expect("slot")
                .get(0);
            if reached {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "slot stayed behind {lsn} for 60 s:\n{}",
                self.log(run)
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Drops what the test created in PostgreSQL (slot, publication, tables).
    pub async fn cleanup(&self, tables: &[&str]) {
        tidemark_testkit::topics::drop_slot(&self.pg, &self.name).await;
        let _ = self
            .pg
            .batch_execute(&format!("DROP PUBLICATION IF EXISTS {}", self.name))
            .await;
        for table in tables {
            let _ = self
                .pg
                .batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
                .await;
        }
    }
}
