//! `tidemark-replay audit --watch` against the local stack: updates lost
//! under a running watch raise its drift gauge, which falls again once
//! they are repaired (by hand, then by `--repair-after`), with `/readyz`
//! ready throughout.

#[path = "../../consumer/tests/support/mod.rs"]
mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::Pipeline;
use tidemark_testkit::topic_record_count;
use tidemark_testkit::topics::http_get;

/// A running `audit --watch`, stopped (SIGTERM) when dropped.
struct Watcher {
    child: Child,
    port: u16,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

fn start_watch(p: &Pipeline, extra: &[&str]) -> Watcher {
    let config = p.dir.join("watch.toml");
    std::fs::write(&config, p.config_text_as("replay", 1, "")).expect("config");
    let port = support::free_port();
    let log = std::fs::File::create(p.dir.join(format!("watch-{port}.log"))).expect("log");
    let child = Command::new(env!("CARGO_BIN_EXE_tidemark-replay"))
        .arg("--config")
        .arg(&config)
        .args([
            "audit",
            "--watch",
            "--interval",
            "2",
            "--recheck-after",
            "1",
        ])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(extra)
        .env_remove("TIDEMARK_KAFKA_BROKERS")
        .env_remove("TIDEMARK_OPENSEARCH_URL")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("audit --watch");
    Watcher { child, port }
}

/// The value of one sample line of `/metrics`, once it exists.
async fn metric(port: u16, line_start: &str) -> Option<f64> {
    let text = http_get(port, "/metrics").await?;
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Waits until the metric holds `want`; the last metrics text on failure.
async fn wait_metric(w: &Watcher, p: &Pipeline, line_start: &str, want: f64, within_s: u64) {
    let deadline = Instant::now() + Duration::from_secs(within_s);
    loop {
        if metric(w.port, line_start).await == Some(want) {
            return;
        }
        if Instant::now() > deadline {
            let text = http_get(w.port, "/metrics").await.unwrap_or_default();
            let log = std::fs::read_to_string(p.dir.join(format!("watch-{}.log", w.port)))
                .unwrap_or_default();
            panic!("{line_start} never became {want}:\n{text}\n--- watch log:\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Updates rows `ids` (their time column set to `updated_at`) while the
/// consumer is away and moves its group past them: lost updates.
async fn lose_updates(
    p: &mut Pipeline,
    table: &str,
    consumer: support::InProcessConsumer,
    ids: &str,
    updated_at: &str,
) -> support::InProcessConsumer {
    consumer.stop().await;
    let before = topic_record_count(&p.stack.kafka_brokers, &p.topic(table));
    let n =
        p.pg.execute(
            &format!(
                "UPDATE {table} SET title = 'lost', updated_at = {updated_at} WHERE id IN ({ids})"
            ),
            &[],
        )
        .await
        .expect("updates") as i64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while topic_record_count(&p.stack.kafka_brokers, &p.topic(table)) < before + n {
        assert!(Instant::now() < deadline, "the updates never reached Kafka");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    p.skip_consumer_offsets(table);
    p.start_consumer_in_process().await
}

#[tokio::test(flavor = "multi_thread")]
async fn drift_lost_under_a_running_watch_raises_its_gauge_until_repaired() {
    let mut p = Pipeline::new("r_watch").await;
    // Rows dated an hour back: outside every rolling pass's lookback, so
    // only what a row's change (or a full pass) brings up gets looked at.
    let table = p.table("t");
    p.create_table(
        &table,
        "id int PRIMARY KEY, title text, updated_at timestamptz NOT NULL DEFAULT now()",
        "audit_time_column = \"updated_at\"",
    )
    .await;
    p.pg.batch_execute(&format!(
        "INSERT INTO {table} (id, title, updated_at) \
         SELECT g, 'row ' || g, now() - interval '1 hour' FROM generate_series(1, 50) g"
    ))
    .await
    .expect("rows");
    p.start_producer().await;
    let consumer = p.start_consumer_in_process().await;
    p.wait_converged(&table, 90, &[]).await;

    let stale = format!("tidemark_audit_drift{{table=\"public.{table}\",kind=\"stale\"}}");
    let watcher = start_watch(&p, &[]);
    wait_metric(&watcher, &p, &stale, 0.0, 60).await;
    let ready = http_get(watcher.port, "/readyz").await.unwrap_or_default();
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");

    // Lost under the running watch: the gauge rises to exactly 3.
    let consumer = lose_updates(&mut p, &table, consumer, "3, 4, 5", "now()").await;
    wait_metric(&watcher, &p, &stale, 3.0, 60).await;
    let oldest = metric(
        watcher.port,
        &format!("tidemark_audit_oldest_drift_seconds{{table=\"public.{table}\"}}"),
    )
    .await;
    assert!(oldest.is_some(), "no oldest-drift gauge");
    // Repaired by hand: the gauge falls (the known drift is looked at again
    // on every rolling pass).
    let (code, out, err) = p.run_replay(&["audit", "--repair", "--yes", "--recheck-after", "1"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    wait_metric(&watcher, &p, &stale, 0.0, 60).await;
    drop(watcher);

    // Lost while no watch runs, in rows whose time column says an hour ago:
    // only a full pass (the first) sees them, and the rolling passes after
    // it keep looking at them (a rolling pass alone would not, and the
    // gauge would fall with nothing repaired). With --repair-after, drift
    // that outlasts it is repaired by the watch itself, and recorded as a
    // run.
    let consumer = lose_updates(
        &mut p,
        &table,
        consumer,
        "7, 8",
        "now() - interval '1 hour'",
    )
    .await;
    // And one document overwritten around Tidemark, which keeps its stored
    // hash: the full pass checks content and finds it too.
    let answer =
        p.os.update(opensearch::UpdateParts::IndexId(&p.index(&table), "9"))
            .body(serde_json::json!({"doc": {"title": "fixed by hand"}}))
            .send()
            .await
            .expect("_update");
    assert!(answer.status_code().is_success(), "_update 9");
    let watcher = start_watch(&p, &["--repair-after", "3"]);
    wait_metric(&watcher, &p, &stale, 3.0, 60).await;
    let repaired = format!("tidemark_audit_repaired_total{{table=\"public.{table}\"}}");
    wait_metric(&watcher, &p, &repaired, 3.0, 90).await;
    wait_metric(&watcher, &p, &stale, 0.0, 60).await;
    drop(watcher);
    let docs = p.wait_converged(&table, 30, &[]).await;
    assert_eq!(docs["7"]["title"], "lost");
    assert_eq!(docs["9"]["title"], "row 9");
    let (_, runs, _) = p.run_replay(&["runs", "--format", "json"]);
    assert!(runs.contains("audit --watch --repair-after"), "{runs}");

    consumer.stop().await;
    p.cleanup(&[&table]).await;
}
