//! The retention guard: a window whose start Kafka no longer holds is
//! refused, never silently shortened.
//!
//! A partition falls short of `--from` when records before its oldest
//! were deleted (its low watermark is above 0: retention, or the admin
//! API's delete-records) and
//! - the oldest record it still holds was committed after `--from`: the
//!   deleted ones may have been inside the window; or
//! - it holds no record at all and the window reaches back past the topic's
//!   `retention.ms` (or retention is unlimited, so only a deliberate delete
//!   emptied it). A partition emptied by retention while the window lies
//!   inside retention lost only records older than the window.
//!
//! Kafka's timestamps are commit times (see `scan`), so "committed after
//! `--from`" is read off the oldest record's timestamp.

use crate::error::{Context, ReplayError, Result};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::Serialize;

use super::KAFKA_TIMEOUT;

/// A partition that no longer holds the start of the window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Shortfall {
    pub topic: String,
    pub partition: i32,
    /// The first offset the partition still holds (records before it were
    /// deleted).
    pub oldest_offset: i64,
    /// When the record at that offset was committed; `None` when the
    /// partition holds no record.
    pub oldest_time: Option<String>,
    /// How far the oldest record is past `--from`, in seconds (0 when the
    /// partition holds none).
    pub short_by_s: i64,
}

impl std::fmt::Display for Shortfall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.oldest_time {
            Some(at) => write!(
                f,
                "topic {} partition {}: its oldest record (offset {}) was committed at {at}, {} s after --from",
                self.topic, self.partition, self.oldest_offset, self.short_by_s
            ),
            None => write!(
                f,
                "topic {} partition {}: it holds no record any more (the {} before offset {} were deleted)",
                self.topic, self.partition, self.oldest_offset, self.oldest_offset
            ),
        }
    }
}

/// What a partition's low watermark and start say before any record is
/// read: whether its oldest record must be looked at (`Some(low)`).
pub(crate) fn suspect(low: i64, high: i64, start: Option<i64>) -> Option<i64> {
    // Nothing deleted, or the first record at or after from - 60 s lies
    // past the oldest held: older records are still there.
    if low == 0 || start.is_some_and(|s| s > low) {
        return None;
    }
    // All held records are older than the window (no start): whatever was
    // deleted is older still. An empty partition is judged by retention.
    if start.is_none() && low < high {
        return None;
    }
    Some(low)
}

/// The partitions of `topic` that fall short of `from_ms`, given each
/// partition's (low, high) watermarks and `offsets_for_times` start.
pub(crate) fn check(
    consumer: &BaseConsumer,
    kafka: &tidemark_schemas::config::Kafka,
    topic: &str,
    partitions: &[(i32, i64, i64, Option<i64>)],
    from_ms: i64,
) -> Result<Vec<Shortfall>> {
    let suspects: Vec<(i32, i64, i64)> = partitions
        .iter()
        .filter_map(|&(p, low, high, start)| suspect(low, high, start).map(|l| (p, l, high)))
        .collect();
    if suspects.is_empty() {
        return Ok(Vec::new());
    }
    let mut short = Vec::new();
    let mut retention: Option<Option<i64>> = None;
    let mut to_read = TopicPartitionList::new();
    for &(p, low, high) in &suspects {
        if low < high {
            to_read
                .add_partition_offset(topic, p, Offset::Offset(low))
                .with_context(|| format!("{topic} partition {p} offset {low}: cannot assign"))?;
            continue;
        }
        let retention_ms = *retention.get_or_insert_with(|| retention_ms(kafka, topic));
        let reaches_past = match retention_ms {
            // Unknown (not allowed to describe the topic): assume the worst.
            None => true,
            Some(ms) if ms < 0 => true,
            Some(ms) => from_ms < jiff::Timestamp::now().as_millisecond() - ms,
        };
        if reaches_past {
            short.push(Shortfall {
                topic: topic.to_owned(),
                partition: p,
                oldest_offset: low,
                oldest_time: None,
                short_by_s: 0,
            });
        }
    }
    if to_read.count() > 0 {
        consumer
            .assign(&to_read)
            .with_context(|| format!("topic {topic}: cannot assign its oldest records"))?;
        let mut waiting: Vec<i32> = (0..to_read.count())
            .filter_map(|i| to_read.elements().get(i).map(|e| e.partition()))
            .collect();
        let deadline = std::time::Instant::now() + KAFKA_TIMEOUT;
        while !waiting.is_empty() {
            if std::time::Instant::now() >= deadline {
                return Err(ReplayError::Timeout(format!(
                    "topic {topic}: the oldest records of partitions {waiting:?} did not arrive in {} s",
                    KAFKA_TIMEOUT.as_secs()
                )));
            }
            let Some(message) = consumer.poll(Duration::from_millis(500)) else {
                continue;
            };
            let message = message.with_context(|| topic.to_string())?;
            let p = message.partition();
            if !waiting.contains(&p) {
                continue;
            }
            waiting.retain(|&w| w != p);
            let at = message.timestamp().to_millis();
            if let Some(at) = at
                && at > from_ms
            {
                short.push(Shortfall {
                    topic: topic.to_owned(),
                    partition: p,
                    oldest_offset: message.offset(),
                    oldest_time: jiff::Timestamp::from_millisecond(at)
                        .ok()
                        .map(|t| t.to_string()),
                    short_by_s: (at - from_ms) / 1000,
                });
            }
        }
        consumer
            .unassign()
            .with_context(|| format!("topic {topic}: cannot unassign"))?;
    }
    short.sort_by_key(|s| s.partition);
    Ok(short)
}

/// The topic's `retention.ms`; `None` when it cannot be read.
fn retention_ms(kafka: &tidemark_schemas::config::Kafka, topic: &str) -> Option<i64> {
    let admin: AdminClient<DefaultClientContext> =
        tidemark_kafka::client_config(kafka, "tidemark-replay")
            .create()
            .ok()?;
    let options = AdminOptions::new().request_timeout(Some(KAFKA_TIMEOUT));
    let answer = tokio::runtime::Handle::try_current()
        .ok()?
        .block_on(admin.describe_configs([&ResourceSpecifier::Topic(topic)], &options))
        .ok()?;
    let resource = answer.into_iter().next()?.ok()?;
    resource
        .get("retention.ms")
        .and_then(|e| e.value.as_deref())
        .and_then(|v| v.parse().ok())
}

/// Which partitions of `table`'s topic fall short, one line each.
pub fn shortfall_text(table: &str, shortfalls: &[Shortfall]) -> String {
    let mut out = format!(
        "the window starts before what Kafka still holds for {table}; a window repair cannot see the changes Kafka deleted:"
    );
    for s in shortfalls {
        out.push_str(&format!("\n  {s}"));
    }
    out
}

/// The refusal: which partitions fall short, and what to do.
pub fn refusal(table: &str, shortfalls: &[Shortfall]) -> String {
    format!(
        "{}\nMove --from later, or pass --allow-partial to repair what Kafka still holds and then run \
         `tidemark-replay audit --table {table} --repair` for the rest (audit reads the table, not Kafka)",
        shortfall_text(table, shortfalls)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_partitions_that_lost_records_are_suspects() {
        assert_eq!(suspect(0, 10, Some(0)), None, "nothing deleted");
        assert_eq!(suspect(5, 10, Some(7)), None, "older records still held");
        assert_eq!(
            suspect(5, 10, Some(5)),
            Some(5),
            "the oldest held may be in the window"
        );
        assert_eq!(
            suspect(5, 10, None),
            None,
            "every record held is older than the window"
        );
        assert_eq!(
            suspect(10, 10, None),
            Some(10),
            "emptied: judged by retention"
        );
    }
}
