//! The incident drill, automated: the sync job loses a window of changes
//! (for real: its offsets move past them), then `tidemark-replay window`
//! puts them back. The index ends equal to the table; a row updated after
//! the window keeps its newer value; a row deleted after the window stays
//! deleted with `index.gc_deletes` at 0; the dry run touches nothing and its
//! counts are what the real run then does; a second run is a no-op; a run
//! concurrent with live traffic ends exact; every run is recorded.

#[path = "../../consumer/tests/support/mod.rs"]
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::Pipeline;
use tidemark_testkit::topic_record_count;

fn replay(p: &Pipeline, args: &[&str]) -> (Option<i32>, String, String) {
    p.run_replay(args)
}

fn counts(report: &Value) -> Value {
    report["tables"][0]["counts"].clone()
}

/// Runs `tidemark-replay audit` (with `extra` arguments); asserts that the
/// index equals the table and returns the report.
fn audit_is_clean(p: &Pipeline, extra: &[&str]) -> Value {
    let mut args = vec!["audit", "--format", "json"];
    args.extend_from_slice(extra);
    let (code, out, err) = replay(p, &args);
    assert_eq!(
        code,
        Some(0),
        "the index differs from the table: {out}\n{err}"
    );
    serde_json::from_str(&out).expect("audit JSON")
}

/// One document as OpenSearch returns it by id.
async fn document(p: &Pipeline, table: &str, id: &str) -> Value {
    p.os.get(opensearch::GetParts::IndexId(&p.index(table), id))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("doc")
}

async fn wait_for(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done().await {
        assert!(Instant::now() < deadline, "{what} did not happen in 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The incident: with no consumer running, `burst` commits changes that
/// make `records` Kafka records; once they are all in Kafka, the consumer
/// group's offsets skip past them (as a sync job that dropped them would),
/// so the index never sees them. Returns the window around the burst.
async fn lose_a_burst(
    p: &Pipeline,
    table: &str,
    burst: &str,
    records: i64,
) -> (jiff::Timestamp, jiff::Timestamp) {
    let window_start = jiff::Timestamp::now();
    let before = topic_record_count(&p.stack.kafka_brokers, &p.topic(table));
    p.pg.batch_execute(burst)
        .await
        .unwrap_or_else(|e| panic!("burst: {e}"));
    let deadline = Instant::now() + Duration::from_secs(120);
    while topic_record_count(&p.stack.kafka_brokers, &p.topic(table)) < before + records {
        assert!(Instant::now() < deadline, "burst not in Kafka");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Kafka timestamps are commit times in ms: leave the last one behind.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let window_end = jiff::Timestamp::now();
    p.skip_consumer_offsets(table);
    (window_start, window_end)
}

/// Runs `window --yes --output json` over `[from, to]` with a 4 s pause
/// between its read and its write, runs `sql` 2 s into it (inside the
/// pause), waits until the live pipeline `shows` it, and returns the run's
/// report once it succeeded.
async fn replay_racing(
    p: &Pipeline,
    from: &str,
    to: &str,
    sql: &str,
    (what, shows): (&str, impl AsyncFnMut() -> bool),
) -> Value {
    let config = p.dir.join("replay.toml");
    std::fs::write(&config, p.config_text(1, "")).expect("config");
    let mut run = tokio::process::Command::new(env!("CARGO_BIN_EXE_tidemark-replay"))
        .arg("--config")
        .arg(&config)
        .args([
            "window", "--from", from, "--to", to, "--yes", "--output", "json",
        ])
        .env("TIDEMARK_REPLAY_PAUSE_BEFORE_WRITE_MS", "4000")
        .env_remove("TIDEMARK_KAFKA_BROKERS")
        .env_remove("TIDEMARK_OPENSEARCH_URL")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("replay");
    // The SQL goes into the gap once replay has read the rows and says it
    // pauses (a fixed delay raced the read on a busy machine).
    let stderr = run.stderr.take().expect("stderr");
    let (paused_tx, paused) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        let mut paused_tx = Some(paused_tx);
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("pausing 4000 ms between read and write")
                && let Some(tx) = paused_tx.take()
            {
                let _ = tx.send(());
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(60), paused)
        .await
        .expect("replay paused between its read and its write")
        .expect("replay's stderr");
    p.pg.batch_execute(sql)
        .await
        .expect("changes inside the gap");
    wait_for(what, shows).await;
    let output = tokio::time::timeout(Duration::from_secs(60), async {
        let status = run.wait().await.expect("replay exit");
        let mut out = String::new();
        use tokio::io::AsyncReadExt;
        if let Some(mut stdout) = run.stdout.take() {
            let _ = stdout.read_to_string(&mut out).await;
        }
        (status, out)
    })
    .await
    .expect("replay finished");
    assert!(output.0.success(), "{}", output.1);
    serde_json::from_str(&output.1).expect("JSON")
}

/// A table seeded by `seed(table)`, streamed and indexed by a consumer that
/// is stopped again: the state before an incident.
async fn indexed_table(
    name: &str,
    columns: &str,
    index_settings: &str,
    seed: impl Fn(&str) -> String,
) -> (Pipeline, String) {
    indexed_table_with(name, columns, index_settings, "", seed).await
}

/// [`indexed_table`], with `extra` TOML for the table's entry.
async fn indexed_table_with(
    name: &str,
    columns: &str,
    index_settings: &str,
    extra: &str,
    seed: impl Fn(&str) -> String,
) -> (Pipeline, String) {
    let mut p = Pipeline::new(name).await;
    let table = p.table("t");
    p.create_table(
        &table,
        columns,
        &format!("index_settings = {{ {index_settings} }}\n{extra}"),
    )
    .await;
    p.pg.batch_execute(&seed(&table))
        .await
        .unwrap_or_else(|e| panic!("seed {table}: {e}"));
    p.start_producer().await;
    let consumer = p.start_consumer_in_process().await;
    p.wait_converged(&table, 90, &[]).await;
    consumer.stop().await;
    (p, table)
}

#[tokio::test(flavor = "multi_thread")]
async fn window_repairs_a_lost_burst_exactly_and_safely() {
    let (mut p, table) = indexed_table(
        "r_window",
        "id int PRIMARY KEY, title text, n int",
        "number_of_shards = 1, number_of_replicas = 0, gc_deletes = \"0s\"",
        |table| {
            format!("INSERT INTO {table} SELECT g, 'row ' || g, 0 FROM generate_series(1, 100) g")
        },
    )
    .await;
    let index = p.index(&table);

    // The incident: the sync job is down while a burst happens, and comes
    // back past it.
    let (window_start, window_end) = lose_a_burst(
        &p,
        &table,
        &format!(
            "UPDATE {table} SET title = 'lost update' WHERE id <= 20;
         INSERT INTO {table} SELECT g, 'lost insert', 0 FROM generate_series(200, 209) g;
         DELETE FROM {table} WHERE id BETWEEN 50 AND 54;"
        ),
        35,
    )
    .await;
    let consumer = p.start_consumer_in_process().await;

    // After the window, live traffic: row 1 gets newer, row 2 is deleted
    // (and with gc_deletes 0 its tombstone is forgotten at once).
    p.pg.batch_execute(&format!(
        "UPDATE {table} SET title = 'newer than the window' WHERE id = 1; DELETE FROM {table} WHERE id = 2;"
    ))
    .await
    .expect("after the window");
    wait_for("live changes after the window", async || {
        let docs = p.docs(&index).await;
        docs.get("1")
            .is_some_and(|d| d["title"] == "newer than the window")
            && !docs.contains_key("2")
    })
    .await;
    let lost = p.docs(&index).await;
    assert_eq!(lost["3"]["title"], "row 3", "the loss is real");
    assert!(!lost.contains_key("200") && lost.contains_key("50"));

    let (from, to) = (window_start.to_string(), window_end.to_string());
    let window = ["window", "--from", &from, "--to", &to, "--output", "json"];

    // Dry run: prints the target, writes nothing, counts what would change.
    let (code, out, err) = replay(&p, &window);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(err.contains("dry run: nothing is written"), "{err}");
    assert!(err.contains("OpenSearch  cluster tidemark-dev"), "{err}");
    assert!(err.contains("found       35 changes of 35 keys"), "{err}");
    let dry: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(dry["dry_run"], true);
    assert_eq!(
        counts(&dry),
        json!({"create": 10, "update": 18, "delete": 5, "already_right": 2}),
        "{dry:#}"
    );
    assert_eq!(p.docs(&index).await, lost, "the dry run changed the index");

    // The real run, while rows outside the window keep changing.
    let writer = {
        let url = p.stack.pg_url.clone();
        let table = table.clone();
        tokio::spawn(async move {
            let client = support::pg(&url).await;
            for _ in 0..30 {
                client
                    .batch_execute(&format!(
                        "UPDATE {table} SET n = n + 1 WHERE id BETWEEN 60 AND 80"
                    ))
                    .await
                    .expect("live update");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let mut args = window.to_vec();
    args.push("--yes");
    let (code, out, err) = replay(&p, &args);
    writer.await.expect("writer");
    assert_eq!(code, Some(0), "{out}\n{err}");
    let real: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(
        counts(&real),
        counts(&dry),
        "the dry run predicted the real run"
    );
    assert_eq!(real["tables"][0]["applied"], 33, "{real:#}");
    // The run checked its own work: every key of the window is right.
    assert_eq!(
        real["tables"][0]["verified"],
        json!({"clean": 35, "still_differ": 0, "changed_since": 0, "differing": []}),
        "{real:#}"
    );
    let docs = p.wait_converged(&table, 60, &[]).await;
    assert_eq!(
        docs["1"]["title"], "newer than the window",
        "a newer row regressed"
    );
    assert!(
        !docs.contains_key("2"),
        "a row deleted after the window came back"
    );
    assert_eq!(docs["3"]["title"], "lost update");

    // A second run finds nothing to change.
    let (code, out, err) = replay(&p, &args);
    assert_eq!(code, Some(0), "{err}");
    let again: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(
        counts(&again),
        json!({"already_right": 35}),
        "the second run is not a no-op: {again:#}"
    );

    // --key narrows the window to one row.
    let qualified = format!("public.{table}");
    let (code, out, err) = replay(
        &p,
        &[
            "window", "--from", &from, "--to", &to, "--table", &qualified, "--key", "3",
            "--output", "json",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    let one: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(one["tables"][0]["keys"], 1, "{one:#}");
    assert_eq!(counts(&one), json!({"already_right": 1}));

    // The race: a row deleted after replay read it and before it wrote it,
    // with the tombstone forgotten at once (gc_deletes 0). The re-check of
    // the written keys must delete it again. A row updated in the same
    // gap needs nothing from it: the live change has the higher version.
    consumer.stop().await;
    let race_start = jiff::Timestamp::now();
    let before = topic_record_count(&p.stack.kafka_brokers, &p.topic(&table));
    p.pg.batch_execute(&format!(
        "UPDATE {table} SET title = 'lost again' WHERE id IN (30, 31)"
    ))
    .await
    .expect("lost update");
    while topic_record_count(&p.stack.kafka_brokers, &p.topic(&table)) < before + 2 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let race_end = jiff::Timestamp::now();
    p.skip_consumer_offsets(&table);
    let consumer = p.start_consumer_in_process().await;
    let raced = replay_racing(
        &p,
        &race_start.to_string(),
        &race_end.to_string(),
        &format!(
            "DELETE FROM {table} WHERE id = 30; UPDATE {table} SET title = 'newer than the read' WHERE id = 31"
        ),
        ("the live delete of row 30 and update of 31", async || {
            let docs = p.docs(&index).await;
            !docs.contains_key("30")
                && docs
                    .get("31")
                    .is_some_and(|d| d["title"] == "newer than the read")
        }),
    )
    .await;
    assert_eq!(raced["tables"][0]["deleted_after_recheck"], 1, "{raced:#}");
    // Both raced rows changed after the run's snapshot: neither counts as
    // differing, whether or not the live pipeline had applied them yet.
    let verified = &raced["tables"][0]["verified"];
    assert_eq!(verified["still_differ"], 0, "{raced:#}");
    assert_eq!(
        verified["clean"].as_u64().unwrap_or(0) + verified["changed_since"].as_u64().unwrap_or(0),
        2,
        "{raced:#}"
    );
    // Row 31's write was refused (the index had the newer update), so its
    // class is read from its document, as a dry run would: it exists.
    // Row 30's document was gone when written (or refused by its
    // tombstone): a create either way.
    assert_eq!(
        counts(&raced),
        json!({"create": 1, "update": 1}),
        "{raced:#}"
    );
    assert!(
        raced["tables"][0]["newer_in_index"].as_u64() >= Some(1),
        "{raced:#}"
    );
    let docs = p.wait_converged(&table, 60, &[]).await;
    assert!(
        !docs.contains_key("30"),
        "replay resurrected a row deleted during it"
    );
    assert_eq!(
        docs["31"]["title"], "newer than the read",
        "replay regressed a row updated during it"
    );

    // Log mode: a lost burst on rows 40 and 41, then 41 changes again
    // after the window. 40's last change is re-applied; 41 is refused (a
    // newer change exists), and keeps the newer value the consumer applied.
    consumer.stop().await;
    let log_start = jiff::Timestamp::now();
    let before = topic_record_count(&p.stack.kafka_brokers, &p.topic(&table));
    p.pg.batch_execute(&format!(
        "UPDATE {table} SET title = 'log lost' WHERE id IN (40, 41)"
    ))
    .await
    .expect("lost burst");
    while topic_record_count(&p.stack.kafka_brokers, &p.topic(&table)) < before + 2 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let log_end = jiff::Timestamp::now();
    p.skip_consumer_offsets(&table);
    let consumer = p.start_consumer_in_process().await;
    p.pg.batch_execute(&format!(
        "UPDATE {table} SET title = 'newest' WHERE id = 41"
    ))
    .await
    .expect("after the log window");
    wait_for("row 41's newest value", async || {
        p.docs(&index)
            .await
            .get("41")
            .is_some_and(|d| d["title"] == "newest")
    })
    .await;
    let (log_from, log_to) = (log_start.to_string(), log_end.to_string());
    let log_args = [
        "window", "--mode", "log", "--from", &log_from, "--to", &log_to, "--output", "json",
    ];
    let (code, out, err) = replay(&p, &log_args);
    assert_eq!(code, Some(1), "a refused key exits 1: {err}");
    assert!(
        err.contains("1 keys refused") && err.contains("source mode"),
        "{err}"
    );
    let dry: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(dry["tables"][0]["to_apply"], 1, "{dry:#}");
    assert_eq!(dry["tables"][0]["refused"], 1, "{dry:#}");
    assert!(
        dry["tables"][0]["refused_sample"][0]
            .as_str()
            .is_some_and(|r| r.starts_with("41 (newer change at partition")),
        "{dry:#}"
    );
    assert_eq!(
        p.docs(&index).await["40"]["title"],
        "row 40",
        "the log dry run wrote"
    );
    let mut args = log_args.to_vec();
    args.push("--yes");
    let (code, out, err) = replay(&p, &args);
    assert_eq!(code, Some(1), "applied 40, refused 41: {out}\n{err}");
    let real: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(real["tables"][0]["applied"], 1, "{real:#}");
    assert_eq!(real["tables"][0]["refused"], 1, "{real:#}");
    let docs = p.wait_converged(&table, 60, &[]).await;
    assert_eq!(docs["40"]["title"], "log lost");
    assert_eq!(docs["41"]["title"], "newest");

    // Every run is recorded, newest first.
    let (code, out, _) = replay(&p, &["runs", "--format", "json"]);
    assert_eq!(code, Some(0));
    let runs: Value = serde_json::from_str(&out).expect("JSON");
    let mine: Vec<&Value> = runs
        .as_array()
        .expect("runs")
        .iter()
        .filter(|r| {
            r["arguments"]
                .as_array()
                .is_some_and(|a| a.iter().any(|v| v == &json!(from)))
        })
        .collect();
    assert_eq!(mine.len(), 4, "{runs:#}");
    assert_eq!(mine[3]["dry_run"], true);
    assert_eq!(mine[0]["outcome"], "done");
    assert!(mine[0]["user"].is_string() && mine[0]["host"].is_string());

    // Nothing in an empty window: exit 1. Bad input names the argument.
    let (code, _, err) = replay(
        &p,
        &[
            "window",
            "--from",
            "2001-01-01T00:00:00Z",
            "--to",
            "2001-01-01T01:00:00Z",
        ],
    );
    assert_eq!(code, Some(1), "{err}");
    let (code, _, err) = replay(&p, &["window", "--from", "-1h", "--to", "-2h"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("is not before --to"), "{err}");
    let (code, _, err) = replay(
        &p,
        &["window", "--from", "-1h", "--to", "now", "--key", "1"],
    );
    assert_eq!(code, Some(2));
    assert!(err.contains("--key needs exactly one --table"), "{err}");

    consumer.stop().await;
    p.cleanup(&[&table]).await;
}

/// A write OpenSearch refuses (here a document whose `j.a` is text where
/// the index maps a number) does not hold: the run's own verification finds
/// its key still differing, names it, and the run exits 1, while the
/// other keys of the window are repaired and verified clean.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_write_fails_the_run_and_names_its_key() {
    // Dynamic mapping for j (not the derived flat_object, which takes any
    // value): the first documents map j.a as a number, so text is refused.
    let (mut p, table) = indexed_table_with(
        "r_window_refused",
        "id int PRIMARY KEY, j jsonb",
        "number_of_shards = 1, number_of_replicas = 0",
        "mapping = { json = \"dynamic\" }",
        |table| {
            format!(
                "INSERT INTO {table} SELECT g, jsonb_build_object('a', g) FROM generate_series(1, 10) g"
            )
        },
    )
    .await;
    let (from, to) = lose_a_burst(
        &p,
        &table,
        &format!(
            "UPDATE {table} SET j = jsonb_build_object('a', 100 + id) WHERE id <= 5;
             UPDATE {table} SET j = '{{\"a\": \"not a number\"}}' WHERE id = 3;"
        ),
        6,
    )
    .await;
    let (from, to) = (from.to_string(), to.to_string());
    let (code, out, err) = replay(&p, &["window", "--from", &from, "--to", &to, "--yes"]);
    assert_eq!(
        code,
        Some(1),
        "a refused write must fail the run: {out}\n{err}"
    );
    assert!(
        out.contains("verified: 4 clean, 1 still differ")
            && out.contains("still differs: 3 (stale)"),
        "{out}"
    );
    assert!(err.contains("1 keys not repaired"), "{err}");
    let docs = p.docs(&p.index(&table)).await;
    assert_eq!(docs["1"]["j"]["a"], 101, "the other keys were repaired");
    assert_eq!(
        docs["3"]["j"]["a"], 3,
        "the refused key kept its old document"
    );

    // The verdict is in the run record.
    let (code, out, _) = replay(&p, &["runs", "--format", "json"]);
    assert_eq!(code, Some(0));
    let runs: Value = serde_json::from_str(&out).expect("JSON");
    let run = runs
        .as_array()
        .expect("runs")
        .iter()
        .find(|r| {
            r["arguments"]
                .as_array()
                .is_some_and(|a| a.iter().any(|v| v == &json!(from)))
        })
        .expect("the run is recorded");
    assert_eq!(run["outcome"], "done; 1 keys not repaired", "{run:#}");
    assert_eq!(
        run["results"][0]["verified"]["differing"][0]["id"], "3",
        "{run:#}"
    );
    p.cleanup(&[&table]).await;
}

/// The retention guard: records at the start of a window deleted from Kafka
/// (here with the admin API's delete-records, as retention would once their
/// segment closed) make the window refuse, naming the partitions and what
/// to do; `--allow-partial` repairs what is left and says so, and `audit
/// --repair` puts back the rest.
#[tokio::test(flavor = "multi_thread")]
async fn a_window_older_than_what_kafka_holds_is_refused() {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let (mut p, table) = indexed_table(
        "r_window_retention",
        "id int PRIMARY KEY, title text",
        "number_of_shards = 1, number_of_replicas = 0",
        |table| format!("INSERT INTO {table} SELECT g, 'row ' || g FROM generate_series(1, 30) g"),
    )
    .await;
    let before = p.topic_ends(&table);
    let (from, to) = lose_a_burst(
        &p,
        &table,
        &format!("UPDATE {table} SET title = 'lost' WHERE id <= 30"),
        30,
    )
    .await;
    // Kafka drops the seed and the first half of the burst on every partition.
    let after = p.topic_ends(&table);
    let topic = p.topic(&table);
    let mut cut = rdkafka::TopicPartitionList::new();
    for (partition, (b, a)) in before.iter().zip(&after).enumerate() {
        if a > b {
            cut.add_partition_offset(
                &topic,
                partition as i32,
                rdkafka::Offset::Offset(b + (a - b) / 2),
            )
            .expect("offset");
        }
    }
    let admin: AdminClient<DefaultClientContext> =
        p.kafka_client("admin").create().expect("admin client");
    let deleted = admin
        .delete_records(&cut, &AdminOptions::new())
        .await
        .expect("delete-records");
    for e in deleted.elements() {
        assert!(
            e.error().is_ok(),
            "delete-records on partition {}: {:?}",
            e.partition(),
            e.error()
        );
    }

    let qualified = format!("public.{table}");
    let (from, to) = (from.to_string(), to.to_string());
    let args = ["window", "--from", &from, "--to", &to, "--output", "json"];
    let (code, out, err) = replay(&p, &args);
    assert_eq!(
        code,
        Some(2),
        "a window Kafka no longer holds must be refused: {out}\n{err}"
    );
    assert!(
        err.contains(&format!("before what Kafka still holds for {qualified}"))
            && err.contains(&format!("topic {topic} partition "))
            && err.contains("after --from")
            && err.contains("--allow-partial")
            && err.contains(&format!("audit --table {qualified} --repair")),
        "{err}"
    );
    assert_eq!(out, "", "nothing is reported for a refused window");

    let mut partial = args.to_vec();
    partial.extend(["--allow-partial", "--yes"]);
    let (code, out, err) = replay(&p, &partial);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        err.contains("--allow-partial: repairing what Kafka still holds"),
        "{err}"
    );
    let report: Value = serde_json::from_str(&out).expect("JSON");
    let short = report["tables"][0]["short_of_kafka"]
        .as_array()
        .expect("shortfalls");
    assert_eq!(short.len(), cut.count(), "{report:#}");
    let repaired = report["tables"][0]["keys"].as_u64().expect("keys");
    assert!(
        repaired > 0 && repaired < 30,
        "only what Kafka holds: {report:#}"
    );

    // The rest comes back from the table.
    let (code, out, err) = replay(&p, &["audit", "--table", &qualified, "--repair", "--yes"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    audit_is_clean(&p, &["--table", &qualified]);
    p.cleanup(&[&table]).await;
}

/// The re-check deletes again at version `V + 1`: above the document the
/// run wrote at `V`, below every change committed after the row's delete.
/// A row deleted between replay's read and its write, while the consumer
/// is behind (so the write lands first), is deleted again by the re-check;
/// then the consumer catches up and the row is inserted again: with
/// tombstones kept (the default `gc_deletes`), a re-check delete at a
/// version above those changes would keep the row out.
#[tokio::test(flavor = "multi_thread")]
async fn a_row_inserted_again_after_the_recheck_comes_back() {
    let (mut p, table) = indexed_table(
        "r_window_back",
        "id int PRIMARY KEY, title text, n int",
        "number_of_shards = 1, number_of_replicas = 0",
        |table| {
            format!("INSERT INTO {table} SELECT g, 'row ' || g, 0 FROM generate_series(1, 10) g")
        },
    )
    .await;
    let (from, to) = lose_a_burst(
        &p,
        &table,
        &format!("UPDATE {table} SET title = 'lost update' WHERE id IN (1, 2)"),
        2,
    )
    .await;
    let raced = replay_racing(
        &p,
        &from.to_string(),
        &to.to_string(),
        &format!("DELETE FROM {table} WHERE id = 1"),
        ("the delete of row 1", async || {
            !p.rows(&table).await.contains_key("1")
        }),
    )
    .await;
    let result = &raced["tables"][0];
    assert_eq!(result["applied"], 2, "{raced:#}");
    assert_eq!(result["deleted_after_recheck"], 1, "{raced:#}");
    assert!(
        !document(&p, &table, "1").await["found"]
            .as_bool()
            .expect("found"),
        "the re-check did not delete row 1 again"
    );
    let consumer = p.start_consumer_in_process().await;
    p.pg.batch_execute(&format!(
        "INSERT INTO {table} (id, title, n) VALUES (1, 'inserted again', 1)"
    ))
    .await
    .expect("insert row 1 again");
    let docs = p.wait_converged(&table, 60, &[]).await;
    assert_eq!(docs["1"]["title"], "inserted again");
    assert_eq!(docs["2"]["title"], "lost update");
    consumer.stop().await;
    p.cleanup(&[&table]).await;
}

/// A window of more than one chunk (10,000 keys), each chunk going to
/// OpenSearch as two bulk requests at once: the counts are exact, the index
/// equals the table, a second run is a no-op.
#[tokio::test(flavor = "multi_thread")]
async fn a_large_window_is_written_in_concurrent_halves_exactly() {
    let (mut p, table) = indexed_table(
        "r_window_big",
        "id int PRIMARY KEY, title text, n int",
        "number_of_shards = 1, number_of_replicas = 0",
        |table| {
            format!("INSERT INTO {table} SELECT g, 'row ' || g, 0 FROM generate_series(1, 200) g")
        },
    )
    .await;

    let (window_start, window_end) = lose_a_burst(
        &p,
        &table,
        &format!(
        "INSERT INTO {table} SELECT g, 'lost insert ' || g, g FROM generate_series(1000, 12999) g;
         UPDATE {table} SET title = 'lost update' WHERE id <= 100;
         DELETE FROM {table} WHERE id BETWEEN 151 AND 200;"
    ),
        12150,
    )
    .await;

    let (from, to) = (window_start.to_string(), window_end.to_string());
    let window = [
        "window", "--from", &from, "--to", &to, "--output", "json", "--yes",
    ];
    let (code, out, err) = replay(&p, &window);
    assert_eq!(code, Some(0), "{out}\n{err}");
    let real: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(
        counts(&real),
        json!({"create": 12000, "update": 100, "delete": 50}),
        "{real:#}"
    );
    assert_eq!(real["tables"][0]["applied"], 12150, "{real:#}");
    assert_eq!(real["tables"][0]["rejected"], 0, "{real:#}");
    // More documents than one search page: the audit proves index == table.
    let audit = audit_is_clean(&p, &["--recheck-after", "1"]);
    assert_eq!(audit["tables"][0]["rows"], 12150, "{audit:#}");
    assert_eq!(audit["tables"][0]["documents"], 12150, "{audit:#}");
    let doc = document(&p, &table, "12999").await;
    assert_eq!(doc["_source"]["title"], "lost insert 12999", "{doc:#}");

    let (code, out, err) = replay(&p, &window);
    assert_eq!(code, Some(0), "{out}\n{err}");
    let again: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(counts(&again), json!({"already_right": 12150}), "{again:#}");
    p.cleanup(&[&table]).await;
}

/// Runs `tidemark-replay` like [`replay`], also returning its peak resident
/// memory in MB (VmHWM, read from /proc while it runs).
fn replay_with_peak_rss(p: &Pipeline, args: &[&str]) -> (Option<i32>, String, String, u64) {
    use std::io::Read;
    let config = p.dir.join("replay.toml");
    std::fs::write(&config, p.config_text(1, "")).expect("config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tidemark-replay"))
        .arg("--config")
        .arg(&config)
        .args(args)
        .env_remove("TIDEMARK_KAFKA_BROKERS")
        .env_remove("TIDEMARK_OPENSEARCH_URL")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run tidemark-replay");
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout")));
    let err = drain(Box::new(child.stderr.take().expect("stderr")));
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak_kb = 0u64;
    let status = loop {
        if let Some(kb) = std::fs::read_to_string(&status_file).ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        }) {
            peak_kb = peak_kb.max(kb);
        }
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    (
        status.code(),
        out.join().expect("stdout"),
        err.join().expect("stderr"),
        peak_kb / 1024,
    )
}

/// Wide rows: 400 rows of 200 KB (80 MB) in one window. Chunks are cut by
/// bytes as well as keys, so the command holds a few MB of rows at a time,
/// not the whole window: the repair is exact and its peak memory stays
/// bounded. Measured peaks: source 175-187 MB, log 131 MB; with chunks cut
/// by key count alone (all 400 rows at once): 547 and 509 MB.
#[tokio::test(flavor = "multi_thread")]
async fn a_window_of_wide_rows_is_repaired_in_bounded_memory() {
    let (mut p, table) = indexed_table(
        "r_window_wide",
        "id int PRIMARY KEY, body text",
        "number_of_shards = 1, number_of_replicas = 0",
        |table| format!("INSERT INTO {table} VALUES (1, 'seed')"),
    )
    .await;

    // 6,400 md5 digests per row: 204,800 characters that compress poorly.
    let (window_start, window_end) = lose_a_burst(
        &p,
        &table,
        &format!(
            "INSERT INTO {table} SELECT g, (SELECT string_agg(md5(g::text || i::text), '') FROM generate_series(1, 6400) i)
             FROM generate_series(1000, 1399) g"
        ),
        400,
    )
    .await;

    let (from, to) = (window_start.to_string(), window_end.to_string());
    let (code, out, err, peak_mb) = replay_with_peak_rss(
        &p,
        &[
            "window", "--from", &from, "--to", &to, "--output", "json", "--yes",
        ],
    );
    assert_eq!(code, Some(0), "{out}\n{err}");
    let real: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(counts(&real), json!({"create": 400}), "{real:#}");
    assert_eq!(real["tables"][0]["applied"], 400, "{real:#}");
    assert!(
        peak_mb < 300,
        "source mode: peak RSS {peak_mb} MB for an 80 MB window: chunks are not bounded by bytes"
    );
    audit_is_clean(&p, &[]);
    let doc = document(&p, &table, "1399").await;
    assert_eq!(
        doc["_source"]["body"].as_str().map(str::len),
        Some(204_800),
        "a wide row arrives whole"
    );
    let (code, out, err, log_peak_mb) = replay_with_peak_rss(
        &p,
        &[
            "window", "--mode", "log", "--from", &from, "--to", &to, "--output", "json", "--yes",
        ],
    );
    assert_eq!(code, Some(0), "{out}\n{err}");
    let log: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(log["tables"][0]["to_apply"], 400, "{log:#}");
    assert!(
        log_peak_mb < 300,
        "log mode: peak RSS {log_peak_mb} MB for an 80 MB window: chunks are not bounded by bytes"
    );
    eprintln!("wide window: peak RSS {peak_mb} MB source, {log_peak_mb} MB log");
    p.cleanup(&[&table]).await;
}

/// Composite text keys with every character SQL and array syntax care
/// about (quote, comma, braces, backslash, double quote, the word NULL,
/// spaces, non-ASCII): the window reads them back by key, re-checks them,
/// and the index ends equal to the table.
#[tokio::test(flavor = "multi_thread")]
async fn a_window_over_awkward_composite_keys_is_exact() {
    let mut p = Pipeline::new("r_window_keys").await;
    let table = p.table("t");
    p.create_table(
        &table,
        "region text, code text, n int, PRIMARY KEY (region, code)",
        "index_settings = { number_of_shards = 1, number_of_replicas = 0 }",
    )
    .await;
    let awkward = [
        "o'clock",
        "a,b",
        "{x}",
        r"back\slash",
        "\"quoted\"",
        "NULL",
        "spaced out",
        "Zürich",
    ];
    let quote = |s: &str| format!("'{}'", s.replace('\'', "''"));
    let values: Vec<String> = awkward
        .iter()
        .enumerate()
        .map(|(i, k)| format!("({}, {}, 0)", quote(k), quote(&format!("c{i} {k}"))))
        .collect();
    p.pg.batch_execute(&format!("INSERT INTO {table} VALUES {}", values.join(", ")))
        .await
        .expect("rows");
    p.start_producer().await;
    let consumer = p.start_consumer_in_process().await;
    let index = p.index(&table);
    wait_for("the seed rows indexed", async || {
        p.docs(&index).await.len() == 8
    })
    .await;
    consumer.stop().await;

    let (window_start, window_end) = lose_a_burst(
        &p,
        &table,
        &format!(
            "UPDATE {table} SET n = 1;
         DELETE FROM {table} WHERE region = 'a,b';
         INSERT INTO {table} VALUES ('new ''one''', 'x,{{y}}', 2);"
        ),
        10,
    )
    .await;

    let (from, to) = (window_start.to_string(), window_end.to_string());
    let (code, out, err) = replay(
        &p,
        &[
            "window", "--from", &from, "--to", &to, "--output", "json", "--yes",
        ],
    );
    assert_eq!(code, Some(0), "{out}\n{err}");
    let real: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(
        counts(&real),
        json!({"create": 1, "update": 7, "delete": 1}),
        "{real:#}"
    );
    audit_is_clean(&p, &[]);
    p.cleanup(&[&table]).await;
}

/// Documents written before `_tidemark.id` existed (an index made by an
/// earlier Tidemark): the window still finds them by id, so their classes
/// are right, and a writing run adds the field to the mapping.
#[tokio::test(flavor = "multi_thread")]
async fn documents_from_before_the_id_field_are_classified_right() {
    let mut p = Pipeline::new("r_window_old").await;
    let table = p.table("t");
    p.create_table(&table, "id int PRIMARY KEY, title text, n int", "")
        .await;
    p.start_producer().await;
    let index = p.index(&table);
    let mut old_meta = tidemark_index::mapping::meta_mapping();
    old_meta["properties"]
        .as_object_mut()
        .expect("properties")
        .remove("id");
    let created =
        p.os.indices()
            .create(opensearch::indices::IndicesCreateParts::Index(&index))
            .body(json!({
                "settings": {"number_of_shards": 1, "number_of_replicas": 0},
                "mappings": {"properties": {"_tidemark": old_meta}}
            }))
            .send()
            .await
            .expect("create the old index");
    assert!(created.status_code().is_success());

    // The window: rows 1-4 inserted, row 4 deleted again. No consumer runs.
    let (window_start, window_end) = lose_a_burst(
        &p,
        &table,
        &format!(
            "INSERT INTO {table} VALUES (1, 'one', 0), (2, 'two', 0), (3, 'three', 0), (4, 'four', 0);
             DELETE FROM {table} WHERE id = 4;"
        ),
        5,
    )
    .await;
    // Documents as an earlier version wrote them (no `_tidemark.id`): 1 is
    // current, 2 is stale, 4's row is gone, 3 has none.
    let old_document = |id: i64, title: &str| {
        let Value::Object(fields) = json!({"id": id, "title": title, "n": 0}) else {
            unreachable!()
        };
        let mut doc = Value::Object(fields.clone());
        doc["_tidemark"] = json!({
            "version": 1, "lsn": "0/1", "commit_time": "2026-01-01T00:00:00Z",
            "hash": tidemark_index::mapping::content_hash(&fields), "key": {"id": id},
        });
        doc
    };
    for (id, title) in [(1, "one"), (2, "old two"), (4, "four")] {
        let written =
            p.os.index(opensearch::IndexParts::IndexId(&index, &id.to_string()))
                .version(1)
                .version_type(opensearch::params::VersionType::External)
                .body(old_document(id, title))
                .send()
                .await
                .expect("old document");
        assert!(written.status_code().is_success());
    }

    let (from, to) = (window_start.to_string(), window_end.to_string());
    let window = ["window", "--from", &from, "--to", &to, "--output", "json"];
    let expected = json!({"already_right": 1, "create": 1, "update": 1, "delete": 1});
    let (code, out, err) = replay(&p, &window);
    assert_eq!(code, Some(0), "{out}\n{err}");
    let dry: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(counts(&dry), expected, "{dry:#}");

    // No consumer ever ran on this index, so it carries no pipeline stamp:
    // the dry run says a real run would refuse it, and the real run does,
    // unless told the target is right.
    assert!(
        err.contains("a real run would refuse") && err.contains("carries no pipeline stamp"),
        "{err}"
    );
    let mut args = window.to_vec();
    args.push("--yes");
    let (code, out, err) = replay(&p, &args);
    assert_eq!(
        code,
        Some(2),
        "an unstamped index must be refused: {out}\n{err}"
    );
    assert!(err.contains("--target-override"), "{err}");
    args.push("--target-override");
    let (code, out, err) = replay(&p, &args);
    assert_eq!(code, Some(0), "{out}\n{err}");
    let real: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(counts(&real), expected, "{real:#}");
    let mapping: Value =
        p.os.indices()
            .get_mapping(opensearch::indices::IndicesGetMappingParts::Index(&[
                &index,
            ]))
            .send()
            .await
            .expect("mapping")
            .json()
            .await
            .expect("mapping answer");
    assert_eq!(
        mapping[&index]["mappings"]["properties"]["_tidemark"]["properties"]["id"],
        json!({"type": "keyword", "index": false}),
        "{mapping:#}"
    );
    let docs = p.docs(&index).await;
    assert_eq!(docs.len(), 3, "{docs:?}");
    assert_eq!(docs["2"]["title"], "two");
    assert_eq!(docs["3"]["_tidemark"]["id"], "3");
    // Document 1 was right and kept its old form: the second run finds
    // it (and the rest) without `_tidemark.id` where it is missing.
    assert!(docs["1"]["_tidemark"].get("id").is_none());
    let (code, out, err) = replay(&p, &args);
    assert_eq!(code, Some(0), "{err}");
    let again: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(counts(&again), json!({"already_right": 4}), "{again:#}");
    audit_is_clean(&p, &[]);
    p.cleanup(&[&table]).await;
}
