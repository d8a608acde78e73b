//! Reading back what the pipeline wrote, for tests: a topic's change
//! events, raw record values, an HTTP endpoint, a PostgreSQL connection.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tidemark_schemas::ChangeEvent;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::{Client, NoTls};

use crate::unique_name;

/// One record read back from a table topic.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub timestamp: Option<i64>,
    pub lsn_header: Option<String>,
    pub raw: serde_json::Value,
    pub event: ChangeEvent,
}

pub async fn pg(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {url}: {e}"));
    tokio::spawn(connection);
    client
}

/// Drops a test's replication slot. The walsender of a producer that just
/// stopped may take a moment to let go of it, and a slot left behind keeps
/// WAL on the stack for good, so this retries for up to 10 s.
pub async fn drop_slot(pg: &Client, slot: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let _ = pg
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND NOT active",
                &[&slot],
            )
            .await;
        let left = pg
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await;
        if !matches!(left, Ok(Some(_))) || Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn http_get(port: u16, path: &str) -> Option<String> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .ok()?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response))
        .await
        .ok()?
        .ok()?;
    Some(response)
}

pub fn read_topic(
    brokers: &str,
    topic: &str,
    timeout: Duration,
    done: impl Fn(&[Record]) -> bool,
) -> Vec<Record> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique_name("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let deadline = Instant::now() + timeout;
    let partitions = loop {
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("metadata");
        let count = metadata
            .topics()
            .first()
            .map(|t| t.partitions().len())
            .unwrap_or(0);
        if count > 0 {
            break count as i32;
        }
        assert!(Instant::now() < deadline, "topic {topic} never appeared");
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions {
        assignment
            .add_partition_offset(topic, p, Offset::Beginning)
            .expect("assign");
    }
    consumer.assign(&assignment).expect("assign");
    let mut records = Vec::new();
    // The condition is checked when the topic goes quiet and every 1000
    // records, so reading a large topic stays linear.
    let mut check = true;
    loop {
        if check && done(&records) {
            return records;
        }
        assert!(
            Instant::now() < deadline,
            "{topic}: condition not met in {timeout:?} after {} records: {:#?}",
            records.len(),
            records
                .iter()
                .map(|r: &Record| (&r.event.op, &r.event.key))
                .collect::<Vec<_>>()
        );
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            check = true;
            continue;
        };
        let message = message.expect("consume");
        let payload = message.payload().expect("payload");
        let raw: serde_json::Value = serde_json::from_slice(payload).expect("JSON envelope");
        let event = ChangeEvent::from_slice(payload).expect("envelope");
        let lsn_header = message.headers().and_then(|h| {
            use rdkafka::message::Headers;
            h.iter()
                .find(|h| h.key == "tidemark.lsn")
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        });
        records.push(Record {
            partition: message.partition(),
            offset: message.offset(),
            timestamp: message.timestamp().to_millis(),
            lsn_header,
            raw,
            event,
        });
        check = records.len() % 1000 == 0;
    }
}

/// The first `count` record values of a topic (any format), from the start.
pub fn read_raw(brokers: &str, topic: &str, count: usize) -> Vec<Vec<u8>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique_name("raw"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut out = Vec::new();
    while out.len() < count {
        assert!(
            Instant::now() < deadline,
            "{topic}: only {} of {count} records in 60 s",
            out.len()
        );
        if let Some(message) = consumer.poll(Duration::from_millis(200)) {
            let message = message.expect("consume");
            out.push(message.payload().unwrap_or_default().to_vec());
        }
    }
    out
}

/// The sum of a metric's samples (every label set) on the `/metrics` of
/// the process listening on `port`; 0 when it does not answer.
pub async fn metric_sum(port: u16, name: &str) -> f64 {
    let Some(text) = http_get(port, "/metrics").await else {
        return 0.0;
    };
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
