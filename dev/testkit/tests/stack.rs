//! Proves that each service of the local stack is the real thing and usable
//! from Rust the way Tidemark will use it. If one of these fails, every
//! pipeline test would fail for a reason that has nothing to do with
//! Tidemark, so they come first and say plainly which service is wrong.

use std::collections::BTreeMap;
use std::time::Duration;

use opensearch::http::Url;
use opensearch::http::request::JsonBody;
use opensearch::http::transport::{SingleNodeConnectionPool, TransportBuilder};
use opensearch::indices::{IndicesCreateParts, IndicesDeleteParts, IndicesRefreshParts};
use opensearch::{BulkParts, OpenSearch, SearchParts};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde_json::{Value, json};
use tidemark_testkit::{Stack, unique_name};
use tokio_postgres::NoTls;

async fn pg(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {url} is not reachable: {e}"));
    tokio::spawn(connection);
    client
}

/// A publication and a pgoutput slot see a committed insert: the exact
/// machinery the producer will stream from.
#[tokio::test]
async fn postgres_streams_a_change_through_a_pgoutput_slot() {
    let stack = Stack::get();
    let db = pg(&stack.pg_url).await;
    let wal_level: String = db
        .query_one("SHOW wal_level", &[])
        .await
        .expect("SHOW")
        .get(0);
    assert_eq!(wal_level, "logical");

    let table = unique_name("stack_t");
    let publication = unique_name("stack_pub");
    let slot = unique_name("stack_slot");
    let marker = unique_name("value");
    db.batch_execute(&format!(
        "CREATE TABLE {table} (id int PRIMARY KEY, v text NOT NULL);
         CREATE PUBLICATION {publication} FOR TABLE {table};"
    ))
    .await
    .expect("create table and publication");
    db.execute(
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
        &[&slot],
    )
    .await
    .expect("create pgoutput slot");
    db.execute(&format!("INSERT INTO {table} VALUES (1, $1)"), &[&marker])
        .await
        .expect("insert");

    let rows = db
        .query(
            "SELECT data FROM pg_logical_slot_get_binary_changes($1, NULL, NULL, \
             'proto_version', '1', 'publication_names', $2)",
            &[&slot, &publication],
        )
        .await
        .expect("read the slot");
    let messages: Vec<Vec<u8>> = rows.iter().map(|r| r.get(0)).collect();

    db.execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .expect("drop slot");
    db.batch_execute(&format!(
        "DROP PUBLICATION {publication}; DROP TABLE {table};"
    ))
    .await
    .expect("clean up");

    let kinds: Vec<char> = messages.iter().map(|m| char::from(m[0])).collect();
    assert_eq!(
        kinds,
        ['B', 'R', 'I', 'C'],
        "begin, relation, insert, commit"
    );
    let contains = |haystack: &[u8], needle: &str| {
        haystack
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
    };
    assert!(
        contains(&messages[1], &table),
        "relation message names the table"
    );
    assert!(
        contains(&messages[2], &marker),
        "insert message carries the new value"
    );
}

/// The role Tidemark's producer connects as may replicate but is not a
/// superuser.
#[tokio::test]
async fn postgres_replication_role_is_least_privilege() {
    let stack = Stack::get();
    let db = pg(&stack.pg_replication_url).await;
    let row = db
        .query_one(
            "SELECT rolreplication, rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .expect("read own role");
    let (replication, superuser): (bool, bool) = (row.get(0), row.get(1));
    assert!(replication, "the replication role can replicate");
    assert!(!superuser, "the replication role is not a superuser");
}

/// The idempotent producer with acks=all delivers, a consumer group reads
/// every record in per-key order, and a manual commit is what the group
/// resumes from.
#[tokio::test]
async fn kafka_idempotent_produce_and_group_consume_with_manual_commit() {
    const RECORDS: usize = 120;
    const KEYS: usize = 12;
    let stack = Stack::get();
    let topic = unique_name("stack_topic");
    let group = unique_name("stack_group");
    let timeout = Duration::from_secs(30);

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &stack.kafka_brokers)
        .create()
        .expect("admin client");
    let options = AdminOptions::new().operation_timeout(Some(timeout));
    let created = admin
        .create_topics(
            &[NewTopic::new(&topic, 3, TopicReplication::Fixed(1))],
            &options,
        )
        .await
        .expect("create topic request");
    assert!(
        created.iter().all(Result::is_ok),
        "create topic: {created:?}"
    );

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &stack.kafka_brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .expect("producer");
    let mut sent: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut last_offset: BTreeMap<i32, i64> = BTreeMap::new();
    for i in 0..RECORDS {
        let key = format!("key-{}", i % KEYS);
        let payload = format!("value-{i}");
        let delivery = producer
            .send(
                FutureRecord::to(&topic).key(&key).payload(&payload),
                timeout,
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("delivery of record {i} to {topic}: {e}"));
        last_offset.insert(delivery.partition, delivery.offset);
        sent.entry(key).or_default().push(payload);
    }

    let consumer_config = || {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &stack.kafka_brokers)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest");
        config
    };
    let consumer: StreamConsumer = consumer_config().create().expect("consumer");
    consumer.subscribe(&[&topic]).expect("subscribe");
    let mut received: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut count = 0;
    while count < RECORDS {
        let message = tokio::time::timeout(timeout, consumer.recv())
            .await
            .unwrap_or_else(|_| {
                panic!("only {count} of {RECORDS} records arrived within {timeout:?}")
            })
            .expect("consume");
        let key = String::from_utf8(message.key().expect("key").to_vec()).expect("utf-8 key");
        let payload =
            String::from_utf8(message.payload().expect("payload").to_vec()).expect("utf-8");
        received.entry(key).or_default().push(payload);
        count += 1;
    }
    assert_eq!(received, sent, "every record once, in per-key order");
    consumer
        .commit_consumer_state(CommitMode::Sync)
        .expect("manual commit");
    drop(consumer);

    // A new member of the group starts from what was committed: one past the
    // last delivered offset of every partition that got records.
    let resumed: StreamConsumer = consumer_config().create().expect("second consumer");
    let mut partitions = TopicPartitionList::new();
    for partition in 0..3 {
        partitions.add_partition(&topic, partition);
    }
    let committed = resumed
        .committed_offsets(partitions, timeout)
        .expect("committed offsets");
    for (partition, last) in &last_offset {
        let element = committed
            .find_partition(&topic, *partition)
            .expect("partition listed");
        assert_eq!(
            element.offset(),
            Offset::Offset(last + 1),
            "partition {partition}"
        );
    }
    let deleted = admin
        .delete_topics(&[&topic], &options)
        .await
        .expect("delete topic");
    assert!(
        deleted.iter().all(Result::is_ok),
        "delete topic: {deleted:?}"
    );
}

/// external_gte versions keep the newest document: an older version is
/// rejected, an equal one applies, and the result can be searched.
#[tokio::test]
async fn opensearch_bulk_with_external_gte_rejects_older_versions() {
    let stack = Stack::get();
    let url = Url::parse(&stack.opensearch_url).expect("OpenSearch URL");
    let transport = TransportBuilder::new(SingleNodeConnectionPool::new(url))
        .disable_proxy()
        .build()
        .expect("transport");
    let client = OpenSearch::new(transport);
    let index = unique_name("stack_index");

    let created = client
        .indices()
        .create(IndicesCreateParts::Index(&index))
        .body(json!({"settings": {"number_of_shards": 1, "number_of_replicas": 0}}))
        .send()
        .await
        .expect("create index");
    assert!(
        created.status_code().is_success(),
        "create index: {}",
        created.status_code()
    );

    let bulk = |docs: Vec<(&'static str, u64, &'static str)>| {
        let body: Vec<JsonBody<Value>> = docs
            .into_iter()
            .flat_map(|(id, version, title)| {
                [
                    json!({"index": {"_id": id, "version": version, "version_type": "external_gte"}}).into(),
                    json!({"title": title}).into(),
                ]
            })
            .collect();
        let request = client.bulk(BulkParts::Index(&index)).body(body);
        async move {
            let response = request.send().await.expect("bulk request");
            assert!(
                response.status_code().is_success(),
                "bulk: {}",
                response.status_code()
            );
            let body: Value = response.json().await.expect("bulk response");
            body["items"]
                .as_array()
                .expect("items")
                .iter()
                .map(|item| item["index"]["status"].as_u64().expect("status"))
                .collect::<Vec<u64>>()
        }
    };

    let first = bulk(vec![
        ("a", 10, "a at 10"),
        ("b", 10, "b at 10"),
        ("c", 10, "c at 10"),
    ])
    .await;
    assert_eq!(first, [201, 201, 201]);
    let second = bulk(vec![
        ("a", 5, "a at 5"),
        ("b", 10, "b again at 10"),
        ("c", 11, "c at 11"),
    ])
    .await;
    assert_eq!(
        second,
        [409, 200, 200],
        "older rejected, equal and newer applied"
    );

    client
        .indices()
        .refresh(IndicesRefreshParts::Index(&[&index]))
        .send()
        .await
        .expect("refresh");
    let found: Value = client
        .search(SearchParts::Index(&[&index]))
        .body(json!({"query": {"match_all": {}}, "version": true, "sort": [{"_id": "asc"}]}))
        .send()
        .await
        .expect("search")
        .json()
        .await
        .expect("search response");
    let hits: Vec<(String, u64, String)> = found["hits"]["hits"]
        .as_array()
        .expect("hits")
        .iter()
        .map(|h| {
            (
                h["_id"].as_str().expect("id").to_owned(),
                h["_version"].as_u64().expect("version"),
                h["_source"]["title"].as_str().expect("title").to_owned(),
            )
        })
        .collect();
    client
        .indices()
        .delete(IndicesDeleteParts::Index(&[&index]))
        .send()
        .await
        .expect("delete index");
    assert_eq!(
        hits,
        [
            ("a".to_owned(), 10, "a at 10".to_owned()),
            ("b".to_owned(), 10, "b again at 10".to_owned()),
            ("c".to_owned(), 11, "c at 11".to_owned()),
        ]
    );
}
