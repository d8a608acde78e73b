//! `tidemark-replay history` against the local stack: a row created,
//! updated, hidden and deleted shows each step with the right diffs, found
//! in the one partition its key hashes to.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tidemark_schemas::config::Config;
use tidemark_testkit::topics::{pg, read_topic};
use tidemark_testkit::{Stack, unique_name};
use tokio::sync::watch;

struct Setup {
    stack: Stack,
    name: String,
    config_path: std::path::PathBuf,
}

fn config_text(stack: &Stack, name: &str, tables: &[&str]) -> String {
    let mut text = format!(
        "[postgres]\nurl = \"{}\"\n[kafka]\nbrokers = \"{}\"\ntopic_prefix = \"{name}\"\npartitions = 3\n\
         [producer]\nslot = \"{name}\"\npublication = \"{name}\"\n",
        stack.pg_replication_url, stack.kafka_brokers
    );
    for table in tables {
        text.push_str(&format!("[[tables]]\ntable = \"public.{table}\"\n"));
    }
    text
}

fn history(setup: &Setup, args: &[&str]) -> (Option<i32>, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_tidemark-replay"))
        .arg("--config")
        .arg(&setup.config_path)
        .arg("history")
        .args(args)
        .env_remove("TIDEMARK_KAFKA_BROKERS")
        .output()
        .expect("run tidemark-replay");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn history_shows_every_step_of_a_row_with_diffs() {
    let stack = Stack::get();
    let client = pg(&stack.pg_url).await;
    let name = unique_name("r_history");
    let table = format!("{name}_t");
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, title text, hidden bool, body text);
             ALTER TABLE {table} OWNER TO tidemark_repl;
             INSERT INTO {table} SELECT g, 'row ' || g, false, NULL FROM generate_series(1, 20) g;"
        ))
        .await
        .expect("table");
    let dir = std::env::temp_dir().join(&name);
    std::fs::create_dir_all(&dir).expect("dir");
    let text = config_text(&stack, &name, &[&table]);
    let config_path = dir.join("tidemark.toml");
    std::fs::write(&config_path, &text).expect("config");
    let config = Config::from_toml(&text, |_| None).expect("config");
    let metrics = Arc::new(tidemark_producer::metrics::Metrics::default());
    let (stop, shutdown) = watch::channel(false);
    let running = metrics.clone();
    let producer = tokio::spawn(async move {
        tidemark_producer::run::run(config, running, shutdown)
            .await
            .expect("producer");
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    while !metrics.streaming.load(Ordering::Relaxed) {
        assert!(Instant::now() < deadline, "producer not streaming");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let big = "(SELECT string_agg(md5(g::text), '') FROM generate_series(1, 400) g)";
    client
        .batch_execute(&format!(
            "UPDATE {table} SET title = 'Search that drifts', body = {big} WHERE id = 3;
             UPDATE {table} SET hidden = true WHERE id = 3;
             DELETE FROM {table} WHERE id = 3;
             UPDATE {table} SET title = 'other' WHERE id = 4;"
        ))
        .await
        .expect("changes");
    let topic = format!("{name}.public.{table}");
    read_topic(&stack.kafka_brokers, &topic, Duration::from_secs(60), |r| {
        r.len() >= 24
    });
    let setup = Setup {
        stack,
        name,
        config_path,
    };

    let (code, out, err) = history(
        &setup,
        &[
            "--table",
            &format!("public.{table}"),
            "--key",
            "3",
            "--format",
            "json",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    let found: Value = serde_json::from_str(&out).expect("JSON report");
    let steps = found["steps"].as_array().expect("steps");
    let ops: Vec<&str> = steps.iter().filter_map(|s| s["op"].as_str()).collect();
    assert_eq!(ops, ["snapshot", "update", "update", "delete"], "{out}");
    assert_eq!(found["key"], json!({"id": 3}));
    // Other rows' changes are not mixed in, and only one partition was read.
    let total: i64 = 24;
    assert!(found["scanned"].as_i64().expect("scanned") < total, "{out}");
    let retitle = &steps[1]["changes"];
    assert!(
        retitle
            .as_array()
            .expect("changes")
            .iter()
            .any(|c| c["field"] == "title"
                && c["before"] == "row 3"
                && c["after"] == "Search that drifts"),
        "{retitle}"
    );
    let hide = steps[2]["changes"].as_array().expect("changes");
    assert!(
        hide.iter()
            .any(|c| c["field"] == "hidden" && c["before"] == false && c["after"] == true),
        "{hide:?}"
    );
    assert!(
        hide.iter()
            .any(|c| c["field"] == "body" && c["unchanged_not_sent"] == true),
        "the body was not sent with the hide: {hide:?}"
    );
    assert!(steps[2]["xid"].is_u64() && steps[2]["commit_lsn"].is_string());

    let (code, out, err) = history(
        &setup,
        &["--table", &format!("public.{table}"), "--key", "id=3"],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("~ hidden: false -> true"), "{out}");
    assert!(
        out.contains("= body: unchanged (large value, not sent)"),
        "{out}"
    );
    assert!(out.contains("row deleted"), "{out}");
    // The 12,800-character body is cut in the text output, its length said;
    // --full shows it whole.
    assert!(
        out.contains("... (12802 characters; --full shows all)"),
        "{out}"
    );
    assert!(
        out.lines().all(|l| l.len() < 600),
        "a long value was printed whole: {out}"
    );
    let (code, full, err) = history(
        &setup,
        &[
            "--table",
            &format!("public.{table}"),
            "--key",
            "3",
            "--full",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(
        full.lines().any(|l| l.len() > 12_800),
        "--full cut a value: {full}"
    );

    // Every key is found in the partition it hashes to.
    for id in [1, 2, 5, 6, 7, 8, 9, 10, 11, 12] {
        let (code, out, err) = history(
            &setup,
            &[
                "--table",
                &format!("public.{table}"),
                "--key",
                &id.to_string(),
                "--format",
                "json",
            ],
        );
        assert_eq!(code, Some(0), "key {id}: {err}");
        let found: Value = serde_json::from_str(&out).expect("JSON");
        assert_eq!(found["steps"][0]["op"], "snapshot", "key {id}: {out}");
    }
    // A key that never existed: exit 1, nothing shown; a future --since too.
    let (code, out, _) = history(
        &setup,
        &["--table", &format!("public.{table}"), "--key", "999"],
    );
    assert_eq!(code, Some(1), "{out}");
    let (code, _, _) = history(
        &setup,
        &[
            "--table",
            &format!("public.{table}"),
            "--key",
            "3",
            "--since",
            "2100-01-01T00:00:00Z",
        ],
    );
    assert_eq!(code, Some(1));
    // Mistakes name the thing.
    let (code, _, err) = history(
        &setup,
        &["--table", &format!("public.{table}"), "--key", "abc"],
    );
    assert_eq!(code, Some(2));
    assert!(err.contains("column id of table"), "{err}");
    let (code, _, err) = history(&setup, &["--table", "public.nope", "--key", "1"]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("--table public.nope: not in the config"),
        "{err}"
    );

    let _ = stop.send(true);
    let _ = producer.await;
    let _ = client
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND NOT active",
            &[&setup.name],
        )
        .await;
    let _ = client
        .batch_execute(&format!(
            "DROP PUBLICATION IF EXISTS {}; DROP TABLE IF EXISTS {table}",
            setup.name
        ))
        .await;
    let _ = &setup.stack;
}
