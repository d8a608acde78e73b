//! A throwaway secured Kafka broker (`dev/stack kafka-up` with
//! `TIDEMARK_STACK_KAFKA_SECURED=1`, a state directory and ports of its
//! own): SASL_SSL only, SCRAM users, and ACLs granting each Tidemark stage
//! the least privilege README.md lists, for topics under one prefix. It is
//! stopped and deleted when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::unique_name;

#[derive(Debug)]
pub struct ScratchKafka {
    pub dir: PathBuf,
    pub port: u16,
    /// The topic prefix (and consumer group prefix) the ACLs grant.
    pub prefix: String,
}

/// The SCRAM users `dev/stack` creates, each with password `<user>-dev`.
pub const USERS: [&str; 4] = [
    "admin",
    "tidemark-producer",
    "tidemark-consumer",
    "tidemark-replay",
];

/// The development password of a `dev/stack` SCRAM user.
pub fn password(user: &str) -> String {
    format!("{user}-dev")
}

/// librdkafka settings of a test client of a secured broker at `brokers`
/// (CA `ca`), logged in as `user` with its `dev/stack` password
/// (SCRAM-SHA-512).
pub fn client(brokers: &str, ca: &Path, user: &str) -> rdkafka::ClientConfig {
    let mut config = rdkafka::ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("security.protocol", "sasl_ssl")
        .set("sasl.mechanism", "SCRAM-SHA-512")
        .set("sasl.username", user)
        .set("sasl.password", password(user))
        .set("ssl.ca.location", ca.display().to_string());
    config
}

impl ScratchKafka {
    /// Starts a secured broker whose ACLs cover topics and groups named
    /// `prefix...`, and waits until it answers and the ACLs are in place.
    pub fn secured(prefix: &str) -> ScratchKafka {
        let dir = PathBuf::from("/var/tmp").join(unique_name("tidemark_scratch_kafka"));
        std::fs::create_dir_all(&dir).expect("scratch Kafka dir");
        // The broker's port and, next to it, its controller's.
        let port = crate::ports::free_pair();
        let broker = ScratchKafka {
            dir,
            port,
            prefix: prefix.to_owned(),
        };
        let status = broker.stack("kafka-up");
        assert!(
            status.success(),
            "scratch Kafka did not start; see {}/kafka/kafka.log",
            broker.dir.display()
        );
        broker
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The CA that signed the broker's certificate (for 127.0.0.1).
    pub fn ca(&self) -> PathBuf {
        self.dir.join("kafka/tls/ca.pem")
    }

    /// Sets `user`'s SCRAM password (both mechanisms) on the broker.
    /// Connections already logged in stay so until they reconnect.
    pub fn set_password(&self, user: &str, password: &str) {
        let status = self.stack_with("kafka-scram", &[user, password]);
        assert!(
            status.success(),
            "could not set the password of {user}; see {}/kafka/scram.log",
            self.dir.display()
        );
    }

    /// Stops the broker and starts it again (same data, same users), so
    /// every client reconnects and logs in again.
    pub fn restart(&self) {
        let _ = self.stack("kafka-down");
        let status = self.stack("kafka-up");
        assert!(
            status.success(),
            "scratch Kafka did not start again; see {}/kafka/kafka.log",
            self.dir.display()
        );
    }

    fn stack(&self, command: &str) -> std::process::ExitStatus {
        self.stack_with(command, &[])
    }

    fn stack_with(&self, command: &str, args: &[&str]) -> std::process::ExitStatus {
        Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("../stack"))
            .arg(command)
            .args(args)
            .env("TIDEMARK_STACK_DIR", &self.dir)
            .env("TIDEMARK_STACK_KAFKA_PORT", self.port.to_string())
            .env("TIDEMARK_STACK_KAFKA_SECURED", "1")
            .env("TIDEMARK_STACK_KAFKA_PREFIX", &self.prefix)
            .stdin(std::process::Stdio::null())
            .status()
            .expect("run dev/stack")
    }
}

impl Drop for ScratchKafka {
    fn drop(&mut self) {
        let _ = self.stack("kafka-down");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A scratch Kafka cluster of three KRaft nodes (`dev/stack
/// kafka-cluster-up`: replication factor 3, `min.insync.replicas` 2), for
/// the tests that kill brokers. Plaintext. Dropping it stops every node.
#[derive(Debug)]
pub struct ScratchKafkaCluster {
    pub dir: PathBuf,
    /// Node 1's port; node i listens on `port + 2(i-1)`, its controller
    /// on the port after.
    pub port: u16,
}

impl ScratchKafkaCluster {
    pub const NODES: i32 = 3;

    /// Starts the cluster and waits until every node answers.
    pub fn start() -> ScratchKafkaCluster {
        let dir = PathBuf::from("/var/tmp").join(unique_name("tidemark_scratch_kafka_cluster"));
        std::fs::create_dir_all(&dir).expect("scratch Kafka cluster dir");
        let port = crate::ports::free_run(2 * Self::NODES as u16);
        let cluster = ScratchKafkaCluster { dir, port };
        assert!(
            cluster.stack(&["kafka-cluster-up"]).success(),
            "scratch Kafka cluster did not start; see {}/kafka-*/kafka.log",
            cluster.dir.display()
        );
        cluster
    }

    /// Every node's address, for `bootstrap.servers`.
    pub fn brokers(&self) -> String {
        (1..=Self::NODES)
            .map(|i| format!("127.0.0.1:{}", self.port + 2 * (i as u16 - 1)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// kill -9 node `id` (Kafka's `node.id`, 1-based), as a crash would.
    pub fn kill(&self, id: i32) {
        assert!(
            self.stack(&["kafka-node-kill", &id.to_string()]).success(),
            "could not kill node {id}"
        );
    }

    /// Starts node `id` again and waits until it answers.
    pub fn start_node(&self, id: i32) {
        assert!(
            self.stack(&["kafka-node-up", &id.to_string()]).success(),
            "node {id} did not start again; see {}/kafka-{id}/kafka.log",
            self.dir.display()
        );
    }

    /// SIGSTOP node `id` (a stall, not a crash), or SIGCONT it.
    pub fn pause(&self, id: i32, paused: bool) {
        let command = if paused {
            "kafka-node-pause"
        } else {
            "kafka-node-resume"
        };
        assert!(
            self.stack(&[command, &id.to_string()]).success(),
            "{command} {id} failed"
        );
    }

    fn stack(&self, args: &[&str]) -> std::process::ExitStatus {
        Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("../stack"))
            .args(args)
            .env("TIDEMARK_STACK_DIR", &self.dir)
            .env("TIDEMARK_STACK_KAFKA_PORT", self.port.to_string())
            .env("TIDEMARK_STACK_KAFKA_NODES", Self::NODES.to_string())
            .stdin(std::process::Stdio::null())
            .status()
            .expect("run dev/stack")
    }
}

impl Drop for ScratchKafkaCluster {
    fn drop(&mut self) {
        let _ = self.stack(&["kafka-cluster-down"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
