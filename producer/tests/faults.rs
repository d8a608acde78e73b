//! The producer under faults and misconfiguration: real `kill -9`, idle
//! tables, a huge transaction, and every start-up mistake an operator can
//! make that we can make here.

mod support;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use support::{Harness, Record};

/// Runs the producer to completion (it should fail) and returns its log.
fn run_expecting_failure(h: &Harness, config: &std::path::Path, run: usize) -> String {
    let log = std::fs::File::create(h.dir.join(format!("producer-{run}.log"))).expect("log file");
    let status = Command::new(env!("CARGO_BIN_EXE_tidemark-producer"))
        .arg("--config")
        .arg(config)
        .env_remove("TIDEMARK_KAFKA_BROKERS")
        .env_remove("TIDEMARK_POSTGRES_URL")
        .stderr(log)
        .status()
        .expect("run producer");
    let log = h.log(run);
    assert_eq!(
        status.code(),
        Some(2),
        "exit code 2 on a start-up error:\n{log}"
    );
    log
}

/// Kill -9 at random moments under a steady workload, restart each time:
/// every committed change reaches Kafka at least once, and each key's
/// changes first appear in commit order.
#[tokio::test(flavor = "multi_thread")]
async fn kill_9_under_load_loses_nothing_and_keeps_per_key_order() {
    const KEYS: i32 = 20;
    const UPDATES: i32 = 600;
    const KILLS: usize = 4;
    let h = Harness::new("kill").await;
    let table = h.table("counters");
    h.create_table(&table, "id int PRIMARY KEY, n int NOT NULL")
        .await;
    h.pg.batch_execute(&format!(
        "INSERT INTO {table} SELECT g, 0 FROM generate_series(1, {KEYS}) g"
    ))
    .await
    .expect("seed");
    let config = h.config(&[&table], "");
    let mut run = 0;
    let mut producer = h.start(&config, run);
    h.wait_ready(&mut producer, run).await;

    let writer = {
        let url = h.stack.pg_url.clone();
        let table = table.clone();
        tokio::spawn(async move {
            let pg = support::pg(&url).await;
            for i in 0..UPDATES {
                let id = i % KEYS + 1;
                pg.execute(
                    &format!("UPDATE {table} SET n = n + 1 WHERE id = $1"),
                    &[&id],
                )
                .await
                .expect("update");
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        })
    };
    // Pseudo-random kill moments, different every run but reproducible from
    // the seed printed on failure.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(1);
    println!("kill schedule seed: {seed}");
    let mut state = u64::from(seed) | 1;
    for _ in 0..KILLS {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        tokio::time::sleep(Duration::from_millis(300 + state % 2000)).await;
        producer.kill().expect("kill -9");
        producer.wait().expect("reap");
        run += 1;
        producer = h.start(&config, run);
        h.wait_ready(&mut producer, run).await;
    }
    writer.await.expect("writer");

    let finals: BTreeMap<i64, i64> =
        h.pg.query(&format!("SELECT id::int8, n::int8 FROM {table}"), &[])
            .await
            .expect("final rows")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
    let value = |r: &Record| -> Option<(i64, i64)> {
        let after = r.event.after.as_ref()?;
        Some((r.event.key["id"].as_i64()?, after["n"].as_i64()?))
    };
    let records = h.read_until(&h.topic(&table), |records| {
        let mut max: BTreeMap<i64, i64> = BTreeMap::new();
        for (id, n) in records.iter().filter_map(value) {
            let m = max.entry(id).or_default();
            *m = (*m).max(n);
        }
        finals.iter().all(|(id, n)| max.get(id) == Some(n))
    });
    h.stop(producer, run);

    let mut sorted = records.clone();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    let mut first_seen: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    for (id, n) in sorted.iter().filter_map(value) {
        let seen = first_seen.entry(id).or_default();
        if !seen.contains(&n) {
            seen.push(n);
        }
    }
    for (id, final_n) in &finals {
        let expected: Vec<i64> = (0..=*final_n).collect();
        assert_eq!(
            first_seen[id], expected,
            "key {id}: every value once, first appearances in commit order"
        );
    }
    let duplicates = records.len() - finals.values().map(|n| *n as usize + 1).sum::<usize>();
    println!(
        "{} records for {} changes ({duplicates} re-sent after kills)",
        records.len(),
        UPDATES + KEYS
    );
    h.cleanup(&[&table]).await;
}

/// Writes to tables that are not captured still move the slot forward, so
/// PostgreSQL can recycle WAL.
#[tokio::test(flavor = "multi_thread")]
async fn slot_advances_while_captured_tables_are_idle() {
    let h = Harness::new("idle").await;
    let captured = h.table("captured");
    let other = h.table("other");
    h.create_table(&captured, "id int PRIMARY KEY").await;
    h.create_table(&other, "id int").await;
    let config = h.config(&[&captured], "");
    let mut producer = h.start(&config, 0);
    h.wait_ready(&mut producer, 0).await;
    h.pg.batch_execute(&format!(
        "INSERT INTO {other} SELECT generate_series(1, 5000)"
    ))
    .await
    .expect("write elsewhere");
    let target = h.current_wal_lsn().await;
    h.wait_slot_confirmed(&target, 0).await;
    h.stop(producer, 0);
    h.cleanup(&[&captured, &other]).await;
}

/// A single transaction of 1,000,000 rows goes through (the producer
/// forwards changes as they arrive; its memory is measured by the bench).
#[tokio::test(flavor = "multi_thread")]
async fn million_row_transaction_goes_through() {
    const ROWS: i64 = 1_000_000;
    let h = Harness::new("big").await;
    let table = h.table("big");
    h.create_table(&table, "id int PRIMARY KEY, v text").await;
    let config = h.config(&[&table], "");
    let mut producer = h.start(&config, 0);
    h.wait_ready(&mut producer, 0).await;
    h.pg.batch_execute(&format!(
        "INSERT INTO {table} SELECT g, 'row ' || g FROM generate_series(1, {ROWS}) g"
    ))
    .await
    .expect("one big transaction");
    let after_insert = h.current_wal_lsn().await;
    let topic = h.topic(&table);
    let deadline = Instant::now() + Duration::from_secs(600);
    let total = loop {
        let total = tidemark_testkit::topic_record_count(&h.stack.kafka_brokers, &topic);
        if total >= ROWS || Instant::now() > deadline {
            break total;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    assert_eq!(
        total,
        ROWS,
        "every row of the transaction is in Kafka:\n{}",
        h.log(0)
    );
    // And the slot is confirmed past the transaction once all of it was
    // acknowledged.
    h.wait_slot_confirmed(&after_insert, 0).await;
    h.stop(producer, 0);
    h.cleanup(&[&table]).await;
}

/// Each misconfiguration stops the producer at start with a message that
/// names the problem and says how to fix it.
#[tokio::test(flavor = "multi_thread")]
async fn misconfiguration_fails_fast_with_a_fix() {
    let h = Harness::new("misconf").await;
    let keyless = h.table("keyless");
    h.create_table(&keyless, "v text").await;
    let good = h.table("good");
    h.create_table(&good, "id int PRIMARY KEY").await;

    let missing = h.config(&[&format!("{}_absent", h.name)], "");
    let log = run_expecting_failure(&h, &missing, 0);
    assert!(
        log.contains(&format!("table public.{}_absent does not exist", h.name)),
        "{log}"
    );

    let config = h.config(&[&keyless], "");
    let log = run_expecting_failure(&h, &config, 1);
    assert!(
        log.contains(&format!("table public.{keyless} has no primary key")),
        "{log}"
    );
    assert!(log.contains("REPLICA IDENTITY USING INDEX"), "{log}");

    let config = h.config(&[&good], "create_publication = false");
    let log = run_expecting_failure(&h, &config, 2);
    assert!(
        log.contains(&format!("publication {} does not exist", h.name)),
        "{log}"
    );
    assert!(log.contains("CREATE PUBLICATION"), "{log}");

    let config = h.config(&[&good], "");
    let text = std::fs::read_to_string(&config).expect("config");
    let unreachable = h.dir.join("unreachable.toml");
    std::fs::write(
        &unreachable,
        text.replace(&h.stack.kafka_brokers, "127.0.0.1:1"),
    )
    .expect("write");
    let log = run_expecting_failure(&h, &unreachable, 3);
    assert!(log.contains("cannot reach Kafka at 127.0.0.1:1"), "{log}");

    let role = format!("{}_norepl", h.name);
    h.pg.batch_execute(&format!("CREATE ROLE {role} LOGIN PASSWORD 'pw'"))
        .await
        .expect("role");
    let url = url_for_role(&h.stack.pg_replication_url, &role, "pw");
    let norepl = h.dir.join("norepl.toml");
    std::fs::write(&norepl, text.replace(&h.stack.pg_replication_url, &url)).expect("write");
    let log = run_expecting_failure(&h, &norepl, 4);
    assert!(
        log.contains(&format!("role {role} may not replicate")),
        "{log}"
    );
    assert!(
        log.contains(&format!("ALTER ROLE {role} WITH REPLICATION")),
        "{log}"
    );

    // A slot moved past what Tidemark confirmed (another reader consumed it).
    let mut producer = h.start(&config, 5);
    h.wait_ready(&mut producer, 5).await;
    h.stop(producer, 5);
    h.pg.batch_execute(&format!("INSERT INTO {good} VALUES (1)"))
        .await
        .expect("change");
    h.pg.execute(
        "SELECT pg_replication_slot_advance($1, pg_current_wal_lsn())",
        &[&h.name],
    )
    .await
    .expect("advance the slot behind Tidemark's back");
    let log = run_expecting_failure(&h, &config, 6);
    assert!(
        log.contains("past the last position Tidemark confirmed"),
        "{log}"
    );

    h.cleanup(&[&keyless, &good]).await;
    let _ = h.pg.batch_execute(&format!("DROP ROLE {role}")).await;
}

fn url_for_role(url: &str, role: &str, password: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("scheme");
    let host = rest.split_once('@').map(|(_, h)| h).unwrap_or(rest);
    format!("{scheme}://{role}:{password}@{host}")
}

/// A snapshot killed half-way is taken again on the next start: every row
/// reaches Kafka (rows sent twice are harmless, they carry the same version).
#[tokio::test(flavor = "multi_thread")]
async fn interrupted_snapshot_is_completed_on_restart() {
    const ROWS: i64 = 100_000;
    let h = Harness::new("resnap").await;
    let table = h.table("rows");
    h.create_table(&table, "id int PRIMARY KEY, v text").await;
    h.pg.batch_execute(&format!(
        "INSERT INTO {table} SELECT g, repeat('x', 100) FROM generate_series(1, {ROWS}) g"
    ))
    .await
    .expect("seed");
    let config = h.config(&[&table], "snapshot_fetch_rows = 500");
    let topic = h.topic(&table);
    let mut producer = h.start(&config, 0);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let sent = tidemark_testkit::topic_record_count(&h.stack.kafka_brokers, &topic);
        if sent > 0 {
            assert!(
                sent < ROWS,
                "snapshot finished before it could be interrupted ({sent} rows)"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "snapshot never started:\n{}",
            h.log(0)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    producer.kill().expect("kill -9 mid-snapshot");
    producer.wait().expect("reap");

    let mut producer = h.start(&config, 1);
    h.wait_ready(&mut producer, 1).await;
    let records = h.read_until(&topic, |records| {
        let ids: std::collections::HashSet<i64> = records
            .iter()
            .filter_map(|r| r.event.key["id"].as_i64())
            .collect();
        ids.len() as i64 == ROWS
    });
    h.stop(producer, 1);
    assert!(
        h.log(1).contains("snapshot was interrupted"),
        "{}",
        h.log(1)
    );
    assert!(records.len() as i64 >= ROWS);
    h.cleanup(&[&table]).await;
}

/// Pointed at a server without logical WAL, or at a standby, the producer
/// refuses to start and says how to fix it. Both servers are throwaway
/// clusters this test starts, since the shared stack must stay logical.
#[tokio::test(flavor = "multi_thread")]
async fn wal_level_and_standby_are_refused_with_a_fix() {
    use tidemark_testkit::scratch::ScratchPostgres;
    let h = Harness::new("scratch").await;
    let text = std::fs::read_to_string(h.config(&["whatever"], "")).expect("config");
    let pointed_at = |url: &str, file: &str| {
        let path = h.dir.join(file);
        std::fs::write(&path, text.replace(&h.stack.pg_replication_url, url))
            .expect("write config");
        path
    };

    let replica_wal = ScratchPostgres::primary(&[("wal_level", "replica")]);
    let log = run_expecting_failure(&h, &pointed_at(&replica_wal.url(), "replica.toml"), 0);
    assert!(
        log.contains("wal_level is 'replica', but logical replication needs 'logical'"),
        "{log}"
    );
    assert!(
        log.contains("ALTER SYSTEM SET wal_level = logical"),
        "{log}"
    );

    let primary = ScratchPostgres::primary(&[("wal_level", "logical")]);
    let standby = primary.standby();
    let log = run_expecting_failure(&h, &pointed_at(&standby.url(), "standby.toml"), 1);
    assert!(
        log.contains("is a standby (in recovery). Point postgres.url at the primary"),
        "{log}"
    );
}

/// Sets (or, with `None`, removes) a topic-level config on the broker.
async fn set_topic_config(brokers: &str, topic: &str, name: &str, value: Option<&str>) {
    use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client");
    // AlterConfigs replaces the topic's whole dynamic config: max.message.bytes
    // is the only one these topics have.
    let mut config = AlterConfig::new(ResourceSpecifier::Topic(topic));
    if let Some(value) = value {
        config = config.set(name, value);
    }
    let results = admin
        .alter_configs(&[config], &AdminOptions::new())
        .await
        .expect("alter configs");
    for result in results {
        result.unwrap_or_else(|e| panic!("alter {topic} {name}: {e:?}"));
    }
}

/// A record Kafka refuses (here: larger than its topic accepts, a topic
/// misconfigured under a running producer) stops the producer with an error
/// naming the topic and LSN, and nothing from it on is confirmed: once the
/// topic is fixed, a restart delivers the refused change and the one after
/// it. The restart can only see them if the slot never moved past them.
#[tokio::test(flavor = "multi_thread")]
async fn refused_record_stops_the_stream_and_is_resent_after_the_fix() {
    let h = Harness::new("refused").await;
    let table = h.table("t");
    h.create_table(&table, "id int PRIMARY KEY, body text NOT NULL")
        .await;
    let config = h.config(&[&table], "");
    let topic = h.topic(&table);
    let mut producer = h.start(&config, 0);
    h.wait_ready(&mut producer, 0).await;
    h.pg.batch_execute(&format!("INSERT INTO {table} VALUES (1, 'small')"))
        .await
        .expect("insert 1");
    let first = h.current_wal_lsn().await;
    h.wait_slot_confirmed(&first, 0).await;

    set_topic_config(
        &h.stack.kafka_brokers,
        &topic,
        "max.message.bytes",
        Some("2048"),
    )
    .await;
    // 20 KB of random hex: lz4 cannot bring it under 2 KB.
    h.pg.batch_execute(&format!(
        "INSERT INTO {table} SELECT 2, string_agg(md5(random()::text), '') FROM generate_series(1, 640)"
    ))
    .await
    .expect("insert 2");
    h.pg.batch_execute(&format!("INSERT INTO {table} VALUES (3, 'small')"))
        .await
        .expect("insert 3");

    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Ok(Some(status)) = producer.try_wait() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "producer kept running after Kafka refused a record:\n{}",
            h.log(0)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let log = h.log(0);
    assert_eq!(status.code(), Some(2), "exit code 2:\n{log}");
    assert!(
        log.contains(&format!(
            "Kafka did not accept the record for {topic} (commit LSN "
        )) && !log.contains("(commit LSN 0/0)"),
        "the error names topic and commit LSN:\n{log}"
    );

    set_topic_config(&h.stack.kafka_brokers, &topic, "max.message.bytes", None).await;
    let mut producer = h.start(&config, 1);
    h.wait_ready(&mut producer, 1).await;
    let records = h.read_until(&topic, |records| {
        [2, 3].iter().all(|id| {
            records
                .iter()
                .any(|r| r.event.key.get("id").and_then(|v| v.as_i64()) == Some(*id))
        })
    });
    let body_len = records
        .iter()
        .find(|r| r.event.key.get("id").and_then(|v| v.as_i64()) == Some(2))
        .and_then(|r| r.event.after.as_ref()?.get("body")?.as_str().map(str::len));
    assert_eq!(body_len, Some(20_480), "row 2 arrived whole after the fix");
    h.stop(producer, 1);
    h.cleanup(&[&table]).await;
}

/// A slot dropped while the producer was stopped is a gap in the history:
/// the restart refuses (exit 2) naming the last confirmed LSN and the fix,
/// instead of silently taking a new snapshot and leaving the rows deleted
/// during the gap in the index for good. `--resnapshot` then takes the new
/// snapshot and records the gap in the state topic, with both LSNs.
#[tokio::test(flavor = "multi_thread")]
async fn a_lost_slot_is_refused_then_resnapshotted_on_request() {
    let h = Harness::new("lostslot").await;
    let table = h.table("rows");
    h.create_table(&table, "id int PRIMARY KEY, v text").await;
    h.pg.batch_execute(&format!(
        "INSERT INTO {table} SELECT g, 'v' FROM generate_series(1, 20) g"
    ))
    .await
    .expect("seed");
    let config = h.config(&[&table], "");
    let topic = h.topic(&table);
    let mut producer = h.start(&config, 0);
    h.wait_ready(&mut producer, 0).await;
    h.pg.batch_execute(&format!("UPDATE {table} SET v = 'w' WHERE id = 1"))
        .await
        .expect("a streamed change");
    h.read_until(&topic, |r| r.len() >= 21);
    let confirmed = h.current_wal_lsn().await;
    h.wait_slot_confirmed(&confirmed, 0).await;
    h.stop(producer, 0);
    tidemark_testkit::topics::drop_slot(&h.pg, &h.name).await;
    h.pg.batch_execute(&format!("DELETE FROM {table} WHERE id <= 10"))
        .await
        .expect("deletes during the gap");

    let log = run_expecting_failure(&h, &config, 1);
    assert!(
        log.contains(&format!("replication slot {} is gone", h.name)),
        "{log}"
    );
    assert!(
        log.contains("Tidemark had confirmed changes up to"),
        "{log}"
    );
    assert!(
        log.contains("--resnapshot") && log.contains("resnapshot marker"),
        "{log}"
    );
    let before = tidemark_testkit::topic_record_count(&h.stack.kafka_brokers, &topic);
    assert_eq!(before, 21, "the refused start sent nothing");

    let mut producer = h.start_with(&config, 2, &["--resnapshot"]);
    h.wait_ready(&mut producer, 2).await;
    // The 10 rows left, snapshotted again.
    let records = h.read_until(&topic, |r| r.len() >= 34);
    // Partitions interleave: tell the two snapshots apart by their LSN.
    let mut snapshots: BTreeMap<tidemark_schemas::Lsn, Vec<i64>> = BTreeMap::new();
    for r in records
        .iter()
        .filter(|r| r.event.op == tidemark_schemas::Operation::Snapshot)
    {
        snapshots
            .entry(r.event.commit_lsn)
            .or_default()
            .push(r.event.key["id"].as_i64().expect("id"));
    }
    assert_eq!(snapshots.len(), 2, "{snapshots:?}");
    let (snapshot_lsn, mut ids) = snapshots.pop_last().expect("the new snapshot");
    ids.sort_unstable();
    assert_eq!(
        ids,
        (11..=20).collect::<Vec<i64>>(),
        "the rows left, snapshotted again"
    );
    // Then, on every partition, the marker that makes consumers remove what
    // the new snapshot did not rewrite.
    let markers: Vec<&Record> = records
        .iter()
        .filter(|r| r.event.op == tidemark_schemas::Operation::Resnapshot)
        .collect();
    assert_eq!(markers.len(), 3, "one per partition");
    assert!(
        markers
            .iter()
            .all(|m| m.event.commit_lsn == snapshot_lsn && m.event.key.is_empty())
    );
    for marker in &markers {
        assert!(
            records.iter().all(|r| r.partition != marker.partition
                || r.event.op != tidemark_schemas::Operation::Snapshot
                || r.event.commit_lsn != snapshot_lsn
                || r.offset < marker.offset),
            "the marker comes after the snapshot's rows of its partition"
        );
    }
    h.stop(producer, 2);
    let state_topic = format!("{}.state", h.name);
    let count = tidemark_testkit::topic_record_count(&h.stack.kafka_brokers, &state_topic);
    let records: Vec<serde_json::Value> =
        support::read_raw(&h.stack.kafka_brokers, &state_topic, count as usize)
            .iter()
            .map(|r| serde_json::from_slice(r).expect("state record JSON"))
            .collect();
    let latest = records.last().expect("a state record");
    assert_eq!(
        latest["gap"]["resnapshot_lsn"],
        snapshot_lsn.to_string(),
        "{latest}"
    );
    assert!(latest["gap"]["last_confirmed"].is_string(), "{latest}");
    assert!(
        latest["gap"]["what"]
            .as_str()
            .is_some_and(|w| w.contains("is gone")),
        "{latest}"
    );
    assert!(
        latest["system_id"].is_string() && latest["timeline"].is_u64(),
        "{latest}"
    );
    h.cleanup(&[&table]).await;
}

/// A change larger than `producer.max_message_bytes` cannot be read, and
/// the replication stream cannot resume past it. The producer does not
/// exit into a restart loop: it names the table and LSN on `/readyz` and in
/// its log, backing off; restarted with a larger limit, it streams on and
/// the change arrives.
#[tokio::test(flavor = "multi_thread")]
async fn a_change_too_large_to_read_waits_with_its_table_and_lsn() {
    let h = Harness::new("toolarge").await;
    let table = h.table("docs");
    h.create_table(&table, "id int PRIMARY KEY, body text")
        .await;
    let config = h.config(&[&table], "max_message_bytes = 100000");
    let mut producer = h.start(&config, 0);
    h.wait_ready(&mut producer, 0).await;
    h.pg.batch_execute(&format!(
        "INSERT INTO {table} VALUES (1, 'small');
         INSERT INTO {table} VALUES (2, (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 6250) g));"
    ))
    .await
    .expect("rows");
    let deadline = Instant::now() + Duration::from_secs(30);
    let answer = loop {
        let answer = support::http_get(h.http_port, "/readyz")
            .await
            .unwrap_or_default();
        if answer.contains("max_message_bytes") {
            break answer;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never named the change: {answer}\n{}",
            h.log(0)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.contains(&format!("to table public.{table} at LSN ")),
        "{answer}"
    );
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(
        producer.try_wait().expect("try_wait").is_none(),
        "the producer exited:\n{}",
        h.log(0)
    );
    // Backing off (1, 2, 4 s...), not a tight loop.
    let tries = h.log(0).matches("cannot stream now; waiting").count();
    assert!(
        (1..=5).contains(&tries),
        "{tries} tries in ~8 s:\n{}",
        h.log(0)
    );
    h.stop(producer, 0);

    let config = h.config(&[&table], "max_message_bytes = 1000000");
    let mut producer = h.start(&config, 1);
    h.wait_ready(&mut producer, 1).await;
    let records = h.read_until(&h.topic(&table), |r| {
        r.iter().any(|r| r.event.key["id"] == 2)
    });
    assert!(
        records.iter().any(|r| r.event.key["id"] == 1),
        "row 1 is there too (at least once)"
    );
    h.stop(producer, 1);
    h.cleanup(&[&table]).await;
}

/// PostgreSQL restarting under a streaming producer is waited out: the
/// producer says so on `/readyz`, reconnects with backoff once the server
/// is back, and streams on from its last confirmed position; it does not
/// exit and need a supervisor. A scratch cluster, since the shared one
/// serves other tests.
#[tokio::test(flavor = "multi_thread")]
async fn a_postgresql_restart_is_waited_out_and_streaming_resumes() {
    use tidemark_testkit::scratch::ScratchPostgres;
    let h = Harness::new("pgrestart").await;
    let server = ScratchPostgres::primary(&[("wal_level", "logical")]);
    let admin = support::pg(&server.url()).await;
    admin
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .expect("table");
    let config = h.config_at(&server.url(), &["t"]);
    let mut producer = h.start(&config, 0);
    h.wait_ready(&mut producer, 0).await;
    admin
        .batch_execute("INSERT INTO t SELECT g, 'before' FROM generate_series(1, 10) g")
        .await
        .expect("rows before");
    let topic = h.topic("t");
    h.read_until(&topic, |r| r.len() >= 10);
    drop(admin);

    // The server goes down for 6 s; /readyz is watched meanwhile.
    let (server, saw_wait) = restart_watched(&h, &mut producer, server, 6).await;
    let admin = support::pg(&server.url()).await;
    admin
        .batch_execute("INSERT INTO t SELECT g, 'after' FROM generate_series(11, 20) g")
        .await
        .expect("rows after");
    // Until every row is in: row 20 can be read before rows of another
    // partition.
    let records = h.read_until(&topic, |r| {
        (1..=20).all(|id| r.iter().any(|r| r.event.key["id"] == id))
    });
    assert!(
        saw_wait,
        "/readyz never said it was reconnecting:\n{}",
        h.log(0)
    );
    let ids: std::collections::BTreeSet<i64> = records
        .iter()
        .filter_map(|r| r.event.key["id"].as_i64())
        .collect();
    assert_eq!(ids, (1..=20).collect(), "every row, before and after");
    h.wait_ready(&mut producer, 0).await;
    assert!(
        producer.try_wait().expect("try_wait").is_none(),
        "{}",
        h.log(0)
    );
    h.stop(producer, 0);
}

/// A schema change's snapshot (the table sent again in its new shape)
/// interrupted by PostgreSQL restarting is waited out like the stream is:
/// the producer does not exit, and once the server is back the table is
/// sent again in full. The snapshot is held at its start by a transaction
/// left open (a new slot waits for every running transaction), so the
/// restart always lands inside it.
#[tokio::test(flavor = "multi_thread")]
async fn a_postgresql_restart_during_a_schema_change_snapshot_is_waited_out() {
    use tidemark_testkit::scratch::ScratchPostgres;
    let h = Harness::new("pgddl").await;
    let server = ScratchPostgres::primary(&[("wal_level", "logical")]);
    let admin = support::pg(&server.url()).await;
    admin
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, v text);
             CREATE TABLE side (n int);
             INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 200) g",
        )
        .await
        .expect("tables");
    let config = h.config_at(&server.url(), &["t"]);
    let mut producer = h.start(&config, 0);
    h.wait_ready(&mut producer, 0).await;
    let topic = h.topic("t");
    h.read_until(&topic, |r| r.len() >= 200);

    // A transaction with an xid stays open; then the shape changes.
    let holder = support::pg(&server.url()).await;
    holder
        .batch_execute("BEGIN; INSERT INTO side VALUES (1)")
        .await
        .expect("open transaction");
    admin
        .batch_execute(
            "ALTER TABLE t ADD COLUMN c text DEFAULT 'x';
             UPDATE t SET v = 'changed' WHERE id = 1",
        )
        .await
        .expect("schema change");
    // The producer sees the new shape (before the update, which follows
    // the snapshot); the snapshot waits on `holder`.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let metrics = support::http_get(h.http_port, "/metrics")
            .await
            .unwrap_or_default();
        if metrics.contains("tidemark_producer_schema_changes_total{table=\"public.t\"} 1") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no schema change seen:\n{metrics}\n{}",
            h.log(0)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !h.log(0).contains("tables snapshotted again"),
        "the snapshot was not held:\n{}",
        h.log(0)
    );
    drop((admin, holder));
    let (_server, saw_wait) = restart_watched(&h, &mut producer, server, 4).await;
    assert!(
        saw_wait,
        "/readyz never said it was reconnecting:\n{}",
        h.log(0)
    );
    // Every row is sent again with the new column.
    let records = h.read_until(&topic, |r| {
        (1..=200).all(|id| {
            r.iter().any(|r| {
                r.event.key["id"] == id
                    && r.event
                        .after
                        .as_ref()
                        .is_some_and(|a| a.get("c").is_some_and(|c| c == "x"))
            })
        })
    });
    assert!(records.len() >= 400, "{} records", records.len());
    h.wait_ready(&mut producer, 0).await;
    assert!(
        producer.try_wait().expect("try_wait").is_none(),
        "{}",
        h.log(0)
    );
    h.stop(producer, 0);
}

/// Restarts `server` (down for `down_secs`) while polling the producer:
/// it must not exit; returns the server and whether `/readyz` said it was
/// reconnecting meanwhile.
async fn restart_watched(
    h: &Harness,
    producer: &mut support::Producer,
    server: tidemark_testkit::scratch::ScratchPostgres,
    down_secs: u64,
) -> (tidemark_testkit::scratch::ScratchPostgres, bool) {
    let restart = tokio::task::spawn_blocking(move || {
        server.restart(Duration::from_secs(down_secs));
        server
    });
    let mut saw_wait = false;
    while !restart.is_finished() {
        if let Some(answer) = support::http_get(h.http_port, "/readyz").await
            && answer.starts_with("HTTP/1.1 503")
            && answer.contains("reconnecting")
        {
            saw_wait = true;
        }
        assert!(
            producer.try_wait().expect("try_wait").is_none(),
            "the producer exited on the restart:\n{}",
            h.log(0)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    (restart.await.expect("restart"), saw_wait)
}
