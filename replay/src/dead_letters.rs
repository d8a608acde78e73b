//! The way back from the dead-letter topic: list what was set aside (time,
//! stage, table, key, reason, origin), and gather the keys to repair.
//!
//! A dead letter never holds row contents, only where the record came from
//! and why it was set aside. So a repair does not re-send anything from the
//! dead-letter topic: once the cause is fixed (a mapping, say), the rows of
//! those keys are read again from PostgreSQL at an exported snapshot and
//! written through window's source mode, like every other repair.
//!
//! The topic is read from `--since` (via `offsets_for_times`, a minute
//! early as window does) to its end as of the start; memory holds the
//! matching dead letters only.

use crate::error::{Context, Result};
use std::time::Duration;

use rdkafka::consumer::Consumer;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::Serialize;
use tidemark_schemas::Row;

const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);

/// One dead letter, as listed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetter {
    /// When it was set aside (the record's Kafka timestamp), RFC 3339.
    pub time: String,
    /// `producer` or `consumer`.
    pub stage: String,
    /// schema.table, when known (a payload that was not a change event has
    /// none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<Row>,
    pub reason: String,
    /// Where the record was: topic/partition/offset (consumer) or the LSN
    /// (producer).
    pub origin: String,
    /// The table topic it belongs to, when known
    /// (`tidemark_schemas::DeadLetter::table_topic`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
}

/// What to list.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub since_ms: Option<i64>,
    pub table: Option<String>,
    /// A piece of the reason, case-insensitive.
    pub reason: Option<String>,
    /// This deployment's table topics ([`Filter::of_deployment`]): a letter
    /// that names another topic is another deployment's, in a dead-letter
    /// topic they share. A letter naming no topic (of no known table, or
    /// written before the producer kept it) is kept.
    pub topics: Option<Vec<String>>,
}

impl Filter {
    fn keeps(&self, letter: &DeadLetter) -> bool {
        let table = self
            .table
            .as_ref()
            .is_none_or(|t| letter.table.as_ref() == Some(t));
        let reason = self
            .reason
            .as_ref()
            .is_none_or(|r| letter.reason.to_lowercase().contains(&r.to_lowercase()));
        let ours = match (&self.topics, &letter.topic) {
            (Some(topics), Some(topic)) => topics.contains(topic),
            _ => true,
        };
        table && reason && ours
    }

    /// Keeps only the letters of `config`'s deployment (its tables' topics).
    pub fn of_deployment(self, config: &tidemark_schemas::config::Config) -> Filter {
        let topics = config
            .tables
            .iter()
            .map(|t| {
                let (schema, table) = t.parts();
                config.kafka.table_topic(schema, table)
            })
            .collect();
        Filter {
            topics: Some(topics),
            ..self
        }
    }
}

/// A dead-letter record's payload (`tidemark_schemas::DeadLetter`, the one
/// shape both stages write), as listed; `None` for what is not one.
pub fn parse(payload: &[u8], timestamp_ms: Option<i64>) -> Option<DeadLetter> {
    let letter = tidemark_schemas::DeadLetter::from_slice(payload).ok()?;
    let time = timestamp_ms
        .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
        .map(|t| t.to_string())
        .unwrap_or_default();
    Some(DeadLetter {
        time,
        stage: letter.stage.as_str().to_owned(),
        origin: letter.place(),
        topic: letter.table_topic().map(str::to_owned),
        table: letter.table,
        key: letter.key,
        reason: letter.reason,
    })
}

/// The dead letters in `topic` that `filter` keeps, oldest first.
pub fn list(
    kafka: &tidemark_schemas::config::Kafka,
    topic: &str,
    filter: &Filter,
) -> Result<Vec<DeadLetter>> {
    let (consumer, partitions) =
        crate::window::open_scanner(kafka, topic, "tidemark-replay-dead-letters")?;
    let mut ends = std::collections::HashMap::new();
    let mut assignment = TopicPartitionList::new();
    let starts = match filter.since_ms {
        Some(since) => {
            let mut query = TopicPartitionList::new();
            for p in 0..partitions {
                query
                    .add_partition_offset(topic, p, Offset::Offset(since - 60_000))
                    .with_context(|| {
                        format!("{topic} partition {p}: cannot ask for an offset by time")
                    })?;
            }
            Some(
                consumer
                    .offsets_for_times(query, KAFKA_TIMEOUT)
                    .with_context(|| {
                        format!("topic {topic}: cannot find the first offsets of --since")
                    })?,
            )
        }
        None => None,
    };
    for p in 0..partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, KAFKA_TIMEOUT)
            .with_context(|| format!("{topic} partition {p}: cannot read offsets"))?;
        let start = match starts
            .as_ref()
            .and_then(|s| s.find_partition(topic, p))
            .map(|e| e.offset())
        {
            Some(Offset::Offset(o)) => o.max(low),
            Some(Offset::End) => high,
            _ => low,
        };
        if start < high {
            assignment
                .add_partition_offset(topic, p, Offset::Offset(start))
                .with_context(|| format!("{topic} partition {p} offset {start}: cannot assign"))?;
            ends.insert(p, high);
        }
    }
    let mut out = Vec::new();
    if ends.is_empty() {
        return Ok(out);
    }
    consumer
        .assign(&assignment)
        .with_context(|| format!("topic {topic}: cannot assign its partitions"))?;

    while !ends.is_empty() {
        let Some(message) = consumer.poll(Duration::from_secs(1)) else {
            continue;
        };
        let message = message.with_context(|| format!("reading {topic}"))?;
        let partition = message.partition();
        if ends
            .get(&partition)
            .is_some_and(|end| message.offset() + 1 >= *end)
        {
            ends.remove(&partition);
        }
        let timestamp = message.timestamp().to_millis();
        if let (Some(since), Some(ts)) = (filter.since_ms, timestamp)
            && ts < since
        {
            continue;
        }
        if let Some(letter) = message
            .payload()
            .and_then(|payload| parse(payload, timestamp))
            && filter.keeps(&letter)
        {
            out.push(letter);
        }
    }
    std::thread::spawn(move || drop(consumer));
    // Partitions interleave as they are read: list in time order.
    out.sort_by(|a, b| a.time.cmp(&b.time));
    Ok(out)
}

/// Text for a terminal: one line per dead letter.
pub fn render_text(letters: &[DeadLetter]) -> String {
    let mut out = format!("{} dead letters\n", letters.len());
    for d in letters {
        let key = d
            .key
            .as_ref()
            .map(|k| serde_json::Value::Object(k.clone()).to_string())
            .unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{}  {:<8}  {}  {}  {}  ({})\n",
            d.time,
            d.stage,
            d.table.as_deref().unwrap_or("-"),
            key,
            d.reason,
            d.origin
        ));
    }
    out
}

/// The distinct keys per table of the dead letters that name both.
pub fn keys_by_table(letters: &[DeadLetter]) -> Vec<(String, Vec<Row>)> {
    let mut tables: Vec<(String, Vec<Row>)> = Vec::new();
    for d in letters {
        let (Some(table), Some(key)) = (&d.table, &d.key) else {
            continue;
        };
        if key.is_empty() {
            continue;
        }
        let keys = match tables.iter_mut().find(|(t, _)| t == table) {
            Some((_, keys)) => keys,
            None => {
                tables.push((table.clone(), Vec::new()));
                &mut tables.last_mut().expect("just pushed").1
            }
        };
        if !keys.contains(key) {
            keys.push(key.clone());
        }
    }
    tables
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn both_stages_dead_letters_parse_and_filter() {
        let consumer = json!({"stage": "consumer", "origin": {"topic": "p.public.t", "partition": 1, "offset": 42},
            "table": "public.t", "key": {"id": 2}, "op": "insert", "commit_lsn": "0/10",
            "commit_time": "2026-12-01T10:00:00Z", "reason": "mapper_parsing_exception: failed to parse field [n]"});
        let producer = json!({"stage": "producer", "table": "public.u", "key": {"id": 7},
            "lsn": "0/20", "reason": "event of 9000 bytes exceeds producer.max_event_bytes (4096)"});
        let garbage = json!({"stage": "consumer", "origin": {"topic": "p.public.t", "partition": 0, "offset": 3},
            "table": null, "key": null, "reason": "not a change event"});
        let parsed: Vec<DeadLetter> = [&consumer, &producer, &garbage]
            .iter()
            .map(|v| parse(v.to_string().as_bytes(), Some(1_764_583_200_000)).expect("parses"))
            .collect();
        assert_eq!(parsed[0].origin, "p.public.t/1/42");
        assert_eq!(parsed[0].time, "2025-12-01T10:00:00Z");
        assert_eq!(parsed[1].origin, "lsn 0/20");
        assert_eq!(parsed[2].table, None);
        let mapping = Filter {
            reason: Some("MAPPER_PARSING".into()),
            ..Filter::default()
        };
        assert!(mapping.keeps(&parsed[0]) && !mapping.keeps(&parsed[1]));
        let table = Filter {
            table: Some("public.u".into()),
            ..Filter::default()
        };
        assert!(!table.keeps(&parsed[0]) && table.keeps(&parsed[1]) && !table.keeps(&parsed[2]));
        // Repairable: the ones with a table and a key, each key once.
        let mut twice = parsed.clone();
        twice.push(parsed[0].clone());
        let keys = keys_by_table(&twice);
        assert_eq!(keys.len(), 2);
        assert_eq!(
            keys[0],
            (
                "public.t".to_owned(),
                vec![parsed[0].key.clone().expect("key")]
            )
        );
        assert!(parse(b"not json", None).is_none());
    }

    #[test]
    fn a_shared_dead_letter_topic_is_read_by_each_deployment_for_its_own_topics() {
        // Two databases, both with public.orders, under prefixes a and b.
        let ours = json!({"stage": "producer", "table": "public.orders", "key": {"id": 1},
            "lsn": "0/20", "topic": "a.public.orders", "reason": "too big"});
        let theirs = json!({"stage": "producer", "table": "public.orders", "key": {"id": 1},
            "lsn": "0/30", "topic": "b.public.orders", "reason": "too big"});
        let theirs_consumed = json!({"stage": "consumer",
            "origin": {"topic": "b.public.orders", "partition": 0, "offset": 5},
            "table": "public.orders", "key": {"id": 2}, "reason": "mapper_parsing_exception"});
        let older = json!({"stage": "producer", "table": "public.orders", "key": {"id": 3},
            "lsn": "0/10", "reason": "too big"});
        let parsed: Vec<DeadLetter> = [&ours, &theirs, &theirs_consumed, &older]
            .iter()
            .map(|v| parse(v.to_string().as_bytes(), None).expect("parses"))
            .collect();
        assert_eq!(parsed[2].topic.as_deref(), Some("b.public.orders"));
        let config = tidemark_schemas::config::Config::from_toml(
            "[postgres]\nurl = \"postgres://u@h/d\"\n[kafka]\nbrokers = \"k:9092\"\ntopic_prefix = \"a\"\n\
             [opensearch]\nurl = \"http://o:9200\"\n[producer]\nslot = \"s\"\npublication = \"p\"\n\
             [consumer]\ngroup_id = \"g\"\n[[tables]]\ntable = \"public.orders\"\n",
            |_| None,
        )
        .expect("config");
        let filter = Filter::default().of_deployment(&config);
        let kept: Vec<bool> = parsed.iter().map(|l| filter.keeps(l)).collect();
        assert_eq!(kept, [true, false, false, true]);
    }
}
