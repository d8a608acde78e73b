//! No row contents and no secrets anywhere: a password and a value in a
//! non-key column, each a unique canary string, go through a run that hits
//! the error paths we can provoke (a value the mapping refuses, so a dead
//! letter; a lost update repaired by `window`; a wrong PostgreSQL
//! password; a password misplaced in the config file), and neither canary
//! appears in any log line of the producer and the consumer (captured here
//! at DEBUG, their libraries' included), the dead-letter topic, the consumer's metrics, replay's
//! output and errors, its run records, or the audit's JSON and HTML
//! reports. (`history` shows a row's values on purpose, to its operator:
//! it is left out.)

#[path = "../../consumer/tests/support/mod.rs"]
mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{Pipeline, read_raw};

/// Everything the producer and consumer log in this process.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log buffer")).into_owned()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn canaries_appear_in_no_output() {
    let logs = Captured::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_env_filter("debug")
        .with_writer(move || writer.clone())
        .init();
    let id = uuid_fragment();
    let row_canary = format!("canary-row-{id}");
    let password_canary = format!("canary-pw-{id}");

    let mut p = Pipeline::new("r_canary").await;
    let table = p.table("t");
    let mappings = p.dir.join("mappings.json");
    std::fs::write(
        &mappings,
        r#"{"mappings": {"properties": {"n": {"type": "long"}}}}"#,
    )
    .expect("mappings file");
    p.create_table(
        &table,
        "id int PRIMARY KEY, n text, v text",
        &format!("mappings_file = {:?}", mappings.display().to_string()),
    )
    .await;
    // Row 2's n is the canary, which a long field refuses: a dead letter.
    // (The test's own SQL goes through psql: this process's logs are the
    // producer's and the consumer's alone.)
    psql(
        &p.stack.pg_url,
        &format!(
            "INSERT INTO {table} VALUES (1, '1', 'plain'), (2, '{row_canary}', '{row_canary}'),
             (3, '3', '{row_canary}')"
        ),
    );
    p.start_producer().await;
    let consumer = p.start_consumer_in_process().await;
    let index = p.index(&table);
    let deadline = Instant::now() + Duration::from_secs(90);
    while p.docs(&index).await.len() < 2 || p.dead_letter_count() < 1 {
        assert!(
            Instant::now() < deadline,
            "rows 1 and 3 indexed, row 2 dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let metrics = consumer.metrics.render();
    consumer.stop().await;

    // A lost update (the consumer is gone, its offsets moved past it),
    // repaired by window; then audits in JSON and HTML.
    psql(
        &p.stack.pg_url,
        &format!("UPDATE {table} SET v = '{row_canary}-2' WHERE id = 1"),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while p.topic_ends(&table).iter().sum::<i64>() < 4 {
        assert!(Instant::now() < deadline, "the update did not reach Kafka");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    p.skip_consumer_offsets(&table);
    let mut outputs = vec![("consumer metrics".to_owned(), metrics)];
    let window = p.run_replay(&["window", "--from", "-10m", "--to", "now", "--yes"]);
    // Row 2 cannot be indexed (the mapping refuses it): the run says so,
    // by document id, and exits 1.
    assert_eq!(window.0, Some(1), "window:\n{}\n{}", window.1, window.2);
    assert!(
        window.1.contains("still differs: 2 (missing)"),
        "window:\n{}\n{}",
        window.1,
        window.2
    );
    let html = p.dir.join("audit.html");
    for (what, args) in [
        ("window", vec![]),
        ("audit --format json", vec!["audit", "--format", "json"]),
        (
            "audit --format html",
            vec![
                "audit",
                "--format",
                "html",
                "--out",
                html.to_str().expect("path"),
            ],
        ),
        ("runs", vec!["runs", "--format", "json"]),
        ("dead-letters", vec!["dead-letters", "--format", "json"]),
    ] {
        let (code, out, err) = if args.is_empty() {
            window.clone()
        } else {
            p.run_replay(&args)
        };
        assert!(code.is_some(), "{what} ran");
        outputs.push((format!("{what} (stdout)"), out));
        outputs.push((format!("{what} (stderr)"), err));
    }
    outputs.push((
        "the audit's HTML report".into(),
        std::fs::read_to_string(&html).expect("the HTML report"),
    ));
    assert!(
        outputs
            .iter()
            .any(|(what, text)| what.starts_with("dead-letters")
                && text.contains("mapper_parsing_exception")),
        "the dead letter was listed: {outputs:?}"
    );

    // Wrong PostgreSQL password; a password misplaced in the file.
    let config = p.dir.join("canary.toml");
    let text = p.config_text_as("replay", 1, "");
    let url = p.stack.pg_replication_url.clone();
    let without = url.replacen(":tidemark-repl-dev@", "@", 1);
    assert_ne!(without, url, "the URL had a password");
    for (what, text) in [
        ("a wrong PostgreSQL password", text.replace(&url, &without)),
        (
            "a password in the config file",
            text.replacen(
                "[postgres]\n",
                &format!("[postgres]\npassword = \"{password_canary}\"\n"),
                1,
            ),
        ),
    ] {
        std::fs::write(&config, &text).expect("config");
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_tidemark-replay"))
            .arg("--config")
            .arg(&config)
            .arg("audit")
            .env("TIDEMARK_PG_PASSWORD", &password_canary)
            .env_remove("TIDEMARK_KAFKA_BROKERS")
            .env_remove("TIDEMARK_OPENSEARCH_URL")
            .output()
            .expect("run tidemark-replay");
        assert_eq!(output.status.code(), Some(2), "{what} is refused");
        outputs.push((
            what.to_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        ));
    }

    // The dead letters and the run records, as stored.
    for (n, raw) in read_raw(
        &p.stack.kafka_brokers,
        &format!("{}.dead-letter", p.name),
        1,
    )
    .iter()
    .enumerate()
    {
        outputs.push((
            format!("dead letter {n}"),
            String::from_utf8_lossy(raw).into_owned(),
        ));
    }
    let runs = p.docs(tidemark_index::runs::RUNS_INDEX).await;
    outputs.push((
        "the runs index".into(),
        serde_json::to_string(&runs).expect("JSON"),
    ));
    outputs.push(("producer and consumer logs".into(), logs.text()));

    for (what, text) in &outputs {
        for canary in [&row_canary, &password_canary] {
            assert!(
                !text.contains(canary.as_str()),
                "{canary} appears in {what}:\n{}",
                excerpt(text, canary)
            );
        }
    }
    assert!(
        logs.text().contains("mapper_parsing_exception"),
        "the logs were captured (they name the refusal)"
    );
    p.stop_producer().await;
    p.cleanup(&[&table]).await;
}

/// Runs `sql` with psql (Debian's postgresql-client, which dev/stack
/// installs).
fn psql(url: &str, sql: &str) {
    let status = std::process::Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", url, "-c", sql])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("psql");
    assert!(status.success(), "psql failed");
}

fn uuid_fragment() -> String {
    tidemark_testkit::unique_name("x")[2..].to_owned()
}

/// The text around the first `needle`.
fn excerpt(text: &str, needle: &str) -> String {
    let at = text.find(needle).unwrap_or(0);
    let start = text[..at]
        .char_indices()
        .rev()
        .nth(300)
        .map_or(0, |(i, _)| i);
    let end = (at + needle.len() + 300).min(text.len());
    let end = (end..=text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(text.len());
    text[start..end].to_owned()
}
