//! `tidemark-replay audit` against the local stack: a clean pipeline audits
//! clean; a sync job that silently dropped a burst of changes leaves
//! missing, extra and stale documents, which the audit finds exactly, with
//! rows changing under it all the while.

#[path = "../../consumer/tests/support/mod.rs"]
mod support;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use support::Pipeline;
use tidemark_testkit::topic_record_count;

fn audit(p: &Pipeline, args: &[&str]) -> (Option<i32>, String, String) {
    let mut all = vec!["audit"];
    all.extend_from_slice(args);
    p.run_replay(&all)
}

fn ids(report: &Value, kind: &str) -> BTreeSet<String> {
    report["tables"][0]["examples"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["kind"] == kind)
        .filter_map(|e| e["id"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_finds_exactly_the_drift_a_lost_burst_leaves() {
    let mut p = Pipeline::new("r_audit").await;
    let table = p.table("t");
    p.create_table(
        &table,
        "id int PRIMARY KEY, title text, n int, updated_at timestamptz NOT NULL DEFAULT now()",
        "audit_time_column = \"updated_at\"",
    )
    .await;
    p.pg.batch_execute(&format!(
        "INSERT INTO {table} (id, title, n) SELECT g, 'row ' || g, 0 FROM generate_series(1, 200) g"
    ))
    .await
    .expect("rows");
    p.start_producer().await;
    let consumer = p.start_consumer_in_process().await;
    p.wait_converged(&table, 90, &[]).await;

    let (code, out, err) = audit(&p, &["--format", "json", "--recheck-after", "1"]);
    assert_eq!(code, Some(0), "a clean pipeline audits clean: {out}\n{err}");
    let report: Value = serde_json::from_str(&out).expect("JSON report");
    assert_eq!(report["tables"][0]["rows"], 200);
    assert_eq!(report["tables"][0]["documents"], 200);

    // The sync job stops, a burst of changes happens, and the job comes back
    // past them: those changes never reach the index.
    consumer.stop().await;
    let before = topic_record_count(&p.stack.kafka_brokers, &p.topic(&table));
    p.pg.batch_execute(&format!(
        "UPDATE {table} SET title = 'changed', updated_at = now() WHERE id IN (10, 11);
         INSERT INTO {table} (id, title, n) VALUES (300, 'new', 0), (301, 'new', 0);
         DELETE FROM {table} WHERE id = 20;"
    ))
    .await
    .expect("burst");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while topic_record_count(&p.stack.kafka_brokers, &p.topic(&table)) < before + 5 {
        assert!(std::time::Instant::now() < deadline, "burst not in Kafka");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    p.skip_consumer_offsets(&table);
    let consumer = p.start_consumer_in_process().await;
    // A document nobody's pipeline wrote.
    p.os.index(opensearch::IndexParts::IndexId(
        &p.index(&table),
        "foreign-1",
    ))
    .refresh(opensearch::params::Refresh::True)
    .body(json!({"title": "written by hand"}))
    .send()
    .await
    .expect("foreign doc");

    // Rows keep changing during the audit (and the consumer applies them):
    // none of that may be reported.
    let writer = {
        let url = p.stack.pg_url.clone();
        let table = table.clone();
        tokio::spawn(async move {
            let client = support::pg(&url).await;
            for _ in 0..40 {
                client
                    .batch_execute(&format!(
                        "UPDATE {table} SET n = n + 1, updated_at = now() WHERE id BETWEEN 100 AND 150"
                    ))
                    .await
                    .expect("busy update");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let (code, out, err) = audit(&p, &["--format", "json", "--recheck-after", "5"]);
    writer.await.expect("writer");
    assert_eq!(code, Some(1), "drift exits 1: {out}\n{err}");
    // (The busy rows show up as settled_on_recheck: 15-50 in trial runs.)
    let report: Value = serde_json::from_str(&out).expect("JSON report");
    let t = &report["tables"][0];
    assert_eq!(
        t["counts"],
        json!({"missing": 2, "extra": 2, "stale": 2}),
        "{report:#}"
    );
    assert_eq!(
        ids(&report, "missing"),
        BTreeSet::from(["300".into(), "301".into()])
    );
    assert_eq!(
        ids(&report, "extra"),
        BTreeSet::from(["20".into(), "foreign-1".into()])
    );
    assert_eq!(
        ids(&report, "stale"),
        BTreeSet::from(["10".into(), "11".into()])
    );
    // Why: the burst is in Kafka (lost in apply, and a missed delete for
    // row 20); foreign-1 was never written by Tidemark.
    assert_eq!(
        t["causes"],
        json!({"lost_in_apply": 4, "missed_delete": 1, "foreign_write": 1}),
        "{report:#}"
    );
    // Dated by the first change that did not land; the burst took well
    // under a minute, so the histogram is in seconds; foreign-1 has no time.
    assert_eq!(t["timeline"]["bucket_s"], 1, "{report:#}");
    let buckets = t["timeline"]["buckets"].as_object().expect("buckets");
    assert!(
        !buckets.is_empty() && buckets.keys().all(|b| b.parse::<jiff::Timestamp>().is_ok()),
        "{buckets:?}"
    );
    assert_eq!(t["untimed"], json!({"missing": 0, "extra": 1, "stale": 0}));

    let (code, text, _) = audit(&p, &["--recheck-after", "1"]);
    assert_eq!(code, Some(1));
    assert!(text.contains("2 missing, 2 extra, 2 stale"), "{text}");
    assert!(text.contains("stale   id 10"), "{text}");

    // In three parts, each its share of rows and of documents: their
    // reports merged are the whole audit's, drift by drift.
    let mut files = Vec::new();
    let mut rows_read = 0;
    for i in 1..=3 {
        let file = p.dir.join(format!("part-{i}.json"));
        let (code, out, err) = audit(
            &p,
            &[
                "--format",
                "json",
                "--part",
                &format!("{i}/3"),
                "--out",
                &file.display().to_string(),
                "--recheck-after",
                "1",
            ],
        );
        assert!(matches!(code, Some(0 | 1)), "part {i}/3: {out}\n{err}");
        let part: Value =
            serde_json::from_str(&std::fs::read_to_string(&file).expect("part")).expect("JSON");
        let rows = part["tables"][0]["rows"].as_u64().expect("rows");
        assert!(rows < 200, "part {i}/3 read {rows} of 200 rows");
        rows_read += rows;
        files.push(file.display().to_string());
    }
    let mut args = vec!["--format", "json", "--merge"];
    args.extend(files.iter().map(String::as_str));
    let (code, out, err) = audit(&p, &args);
    assert_eq!(code, Some(1), "the merged parts drift: {out}\n{err}");
    let merged: Value = serde_json::from_str(&out).expect("merged JSON");
    let m = &merged["tables"][0];
    assert_eq!(rows_read, t["rows"].as_u64().unwrap_or(0));
    assert_eq!(m["rows"], t["rows"], "{merged:#}");
    assert_eq!(m["documents"], t["documents"], "{merged:#}");
    assert_eq!(m["counts"], t["counts"], "{merged:#}");
    assert_eq!(m["causes"], t["causes"], "{merged:#}");
    assert_eq!(m["untimed"], t["untimed"], "{merged:#}");
    assert_eq!(m["fixes"], t["fixes"], "{merged:#}\n{report:#}");
    for kind in ["missing", "extra", "stale"] {
        assert_eq!(ids(&merged, kind), ids(&report, kind), "{kind}");
    }
    let (code, _, err) = audit(&p, &["--merge", &files[0], &files[2]]);
    assert_eq!(code, Some(2));
    assert!(err.contains("part 2/3 missing"), "{err}");

    // --since narrows to recent changes (by updated_at / commit time);
    // --sample checks a fraction and says so.
    let (code, out, err) = audit(
        &p,
        &["--format", "json", "--since", "-1h", "--recheck-after", "1"],
    );
    assert_eq!(code, Some(1), "{err}");
    let recent: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(recent["tables"][0]["counts"]["stale"], 2, "{recent:#}");
    assert_eq!(recent["tables"][0]["counts"]["missing"], 2, "{recent:#}");
    let (code, out, err) = audit(&p, &["--format", "json", "--since", "2100-01-01T00:00:00Z"]);
    assert_eq!(code, Some(0), "nothing changed since then: {out}\n{err}");
    let (_, out, err) = audit(&p, &["--sample", "0.5", "--recheck-after", "1"]);
    assert!(out.contains("SAMPLED, about 50.0%"), "{out}\n{err}");
    let (code, _, err) = audit(&p, &["--sample", "2"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--sample 2: must be a fraction"), "{err}");

    // The HTML report renders in a real browser: a screenshot of it is a
    // 1000x800 PNG with far more on it than a blank page's.
    let html = p.dir.join("audit.html");
    let (code, _, err) = audit(
        &p,
        &[
            "--format",
            "html",
            "--out",
            &html.display().to_string(),
            "--recheck-after",
            "1",
        ],
    );
    assert_eq!(code, Some(1), "{err}");
    let page = std::fs::read_to_string(&html).expect("HTML report");
    assert!(
        page.contains("<svg") && page.contains("6 documents drifted"),
        "{page}"
    );
    let report_png = screenshot(&p, &format!("file://{}", html.display()), "report");
    let blank_png = screenshot(&p, "about:blank", "blank");
    for png in [&report_png, &blank_png] {
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
        let width = u32::from_be_bytes([png[16], png[17], png[18], png[19]]);
        let height = u32::from_be_bytes([png[20], png[21], png[22], png[23]]);
        assert_eq!((width, height), (1000, 800));
    }
    assert!(
        report_png.len() > 3 * blank_png.len(),
        "the report rendered nearly blank: {} bytes vs {} for a blank page",
        report_png.len(),
        blank_png.len()
    );

    // --repair: a dry run first, then the real one, and the audit is clean.
    let (code, out, err) = audit(&p, &["--repair", "--recheck-after", "1"]);
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(err.contains("dry run: nothing is written"), "{err}");
    assert!(
        out.contains("2 would be created, 2 would be updated, 2 would be deleted"),
        "{out}"
    );
    let (code, out, err) = audit(&p, &["--repair", "--yes", "--recheck-after", "1"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        out.contains("after the repair: 0 of the drifted documents still differ"),
        "{out}"
    );
    let (code, out, err) = audit(&p, &["--recheck-after", "1"]);
    assert_eq!(code, Some(0), "clean after the repair: {out}\n{err}");
    p.wait_converged(&table, 30, &[]).await;

    // An unknown table is an error that names it.
    let (code, _, err) = audit(&p, &["--table", "public.nope"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--table public.nope"), "{err}");

    consumer.stop().await;
    p.cleanup(&[&table]).await;
}

/// A headless Chromium screenshot of `url`, as PNG bytes.
fn screenshot(p: &Pipeline, url: &str, name: &str) -> Vec<u8> {
    let shot = p.dir.join(format!("{name}.png"));
    let output = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1000,800",
        ])
        .arg(format!(
            "--user-data-dir={}",
            p.dir.join(format!("chromium-{name}")).display()
        ))
        .arg(format!("--screenshot={}", shot.display()))
        .arg(url)
        .output()
        .expect("chromium (dev/stack up installs it)");
    std::fs::read(&shot).unwrap_or_else(|e| {
        panic!(
            "no screenshot of {url} ({e}): {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

/// The drill of the audit issue, with no timing told to the tool (the
/// table has no time column): a burst the consumer skipped, a burst the
/// mapping refused (dead-lettered), and documents overwritten by hand with
/// `_update`. The audit counts each cause exactly, `--deep` finds every
/// overwritten document, and the commands it prints, run exactly as
/// printed, leave both audits clean.
#[tokio::test(flavor = "multi_thread")]
async fn the_audit_names_the_window_the_causes_and_the_fix() {
    let mut p = Pipeline::new("r_causes").await;
    let table = p.table("t");
    let mappings = p.dir.join("mappings.json");
    std::fs::write(
        &mappings,
        r#"{"mappings": {"properties": {"code": {"type": "long"}}}}"#,
    )
    .expect("mappings file");
    p.create_table(
        &table,
        "id int PRIMARY KEY, title text, code text",
        &format!("mappings_file = {:?}", mappings.display().to_string()),
    )
    .await;
    p.pg.batch_execute(&format!(
        "INSERT INTO {table} SELECT g, 'row ' || g, '1' FROM generate_series(1, 60) g"
    ))
    .await
    .expect("rows");
    p.start_producer().await;
    let consumer = p.start_consumer_in_process().await;
    p.wait_converged(&table, 90, &[]).await;
    // The content check agrees with the stored hashes on a clean index.
    let (code, out, err) = audit(&p, &["--deep", "--recheck-after", "1"]);
    assert_eq!(
        code,
        Some(0),
        "a clean index audits clean by content: {out}\n{err}"
    );
    assert!(out.contains("(deep: content check)"), "{out}");

    // 1. The consumer misses a burst.
    consumer.stop().await;
    let before = topic_record_count(&p.stack.kafka_brokers, &p.topic(&table));
    let loss_began = jiff::Timestamp::now();
    p.pg.batch_execute(&format!(
        "UPDATE {table} SET title = 'changed' WHERE id BETWEEN 1 AND 10;
         INSERT INTO {table} VALUES (101, 'new', '1'), (102, 'new', '1'), (103, 'new', '1');
         DELETE FROM {table} WHERE id IN (20, 21);"
    ))
    .await
    .expect("burst");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while topic_record_count(&p.stack.kafka_brokers, &p.topic(&table)) < before + 15 {
        assert!(std::time::Instant::now() < deadline, "burst not in Kafka");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    p.skip_consumer_offsets(&table);
    let consumer = p.start_consumer_in_process().await;
    // 2. The mapping refuses three changes: dead letters.
    p.pg.batch_execute(&format!(
        "UPDATE {table} SET code = 'not a number' WHERE id BETWEEN 30 AND 32"
    ))
    .await
    .expect("refused burst");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while p.dead_letter_count() < 3 {
        assert!(std::time::Instant::now() < deadline, "no dead letters");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let loss_ended = jiff::Timestamp::now();
    // 3. Someone fixes five documents by hand, around Tidemark.
    let index = p.index(&table);
    for id in 40..45 {
        let answer =
            p.os.update(opensearch::UpdateParts::IndexId(&index, &id.to_string()))
                .body(json!({"doc": {"title": "fixed by hand"}}))
                .send()
                .await
                .expect("_update");
        assert!(answer.status_code().is_success(), "_update {id}");
    }

    let (code, out, err) = audit(&p, &["--format", "json", "--recheck-after", "2"]);
    assert_eq!(code, Some(1), "{out}\n{err}");
    let report: Value = serde_json::from_str(&out).expect("JSON");
    let t = &report["tables"][0];
    assert_eq!(t["mode"], "hash");
    // The stored hash does not see the hand fixes.
    assert_eq!(
        t["counts"],
        json!({"missing": 3, "extra": 2, "stale": 13}),
        "{report:#}"
    );
    assert_eq!(
        t["causes"],
        json!({"lost_in_apply": 16, "missed_delete": 2}),
        "{report:#} {err}"
    );
    assert_eq!(t["dead_lettered"], 3, "{report:#}");
    let dead: Vec<&Value> = t["examples"]
        .as_array()
        .expect("examples")
        .iter()
        .filter(|e| e["dead_letter"].is_string())
        .collect();
    assert_eq!(dead.len(), 3, "{report:#}");
    assert!(
        dead.iter().all(|e| e["dead_letter"]
            .as_str()
            .is_some_and(|r| r.contains("mapper_parsing_exception"))),
        "{dead:?}"
    );
    // Examples are in key order, not text order (2 before 10).
    let stale: Vec<i64> = t["examples"]
        .as_array()
        .expect("examples")
        .iter()
        .filter(|e| e["kind"] == "stale")
        .filter_map(|e| e["key"]["id"].as_i64())
        .collect();
    assert!(stale.windows(2).all(|w| w[0] < w[1]), "{stale:?}");

    // The window it names lies within a minute of the true loss.
    let fixes = t["fixes"].as_array().expect("fixes");
    assert_eq!(fixes.len(), 1, "{report:#}");
    assert_eq!(fixes[0]["fix"], "window");
    assert_eq!(fixes[0]["documents"], 18);
    let from: jiff::Timestamp = fixes[0]["from"]
        .as_str()
        .expect("from")
        .parse()
        .expect("time");
    let to: jiff::Timestamp = fixes[0]["to"].as_str().expect("to").parse().expect("time");
    let minute = jiff::SignedDuration::from_secs(60);
    assert!(
        from >= loss_began - minute && from <= loss_began + minute,
        "--from {from}, loss began {loss_began}"
    );
    assert!(
        to >= loss_ended - minute && to <= loss_ended + minute,
        "--to {to}, loss ended {loss_ended}"
    );
    let window_command = fixes[0]["command"].as_str().expect("command").to_owned();
    let (_, text, _) = audit(&p, &["--recheck-after", "1"]);
    assert!(text.contains(&window_command), "{text}");
    assert!(
        text.contains("causes: 16 lost in apply, 2 missed delete, 3 of them dead-lettered"),
        "{text}"
    );

    // --deep sees the hand fixes, and says who to look for.
    let (code, out, err) = audit(&p, &["--deep", "--format", "json", "--recheck-after", "1"]);
    assert_eq!(code, Some(1), "{out}\n{err}");
    let deep: Value = serde_json::from_str(&out).expect("JSON");
    let d = &deep["tables"][0];
    assert_eq!(d["mode"], "deep");
    assert_eq!(d["counts"]["stale"], 18, "{deep:#}");
    assert_eq!(d["causes"]["foreign_write"], 5, "{deep:#}");
    let foreign: BTreeSet<String> = d["examples"]
        .as_array()
        .expect("examples")
        .iter()
        .filter(|e| e["cause"] == "foreign_write")
        .filter_map(|e| e["id"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(foreign, (40..45).map(|i| i.to_string()).collect());

    // The refused changes need their cause fixed first (as for
    // dead-letters --repair); then the printed window, run as printed.
    p.index_admin(
        opensearch::http::Method::Put,
        &format!("/{index}/_mapping"),
        Some(json!({"properties": {"code": {"type": "long", "ignore_malformed": true}}})),
    )
    .await;
    let (code, out, err) = run_printed(&p, &window_command);
    assert_eq!(code, Some(0), "{window_command}\n{out}\n{err}");
    let (code, out, err) = audit(&p, &["--recheck-after", "1"]);
    assert_eq!(
        code,
        Some(0),
        "clean after the printed window: {out}\n{err}"
    );

    // What is left is the hand fixes, and their printed fix.
    let (code, out, err) = audit(&p, &["--deep", "--format", "json", "--recheck-after", "1"]);
    assert_eq!(code, Some(1), "{out}\n{err}");
    let deep: Value = serde_json::from_str(&out).expect("JSON");
    let d = &deep["tables"][0];
    assert_eq!(
        d["counts"],
        json!({"missing": 0, "extra": 0, "stale": 5}),
        "{deep:#}"
    );
    assert_eq!(d["fixes"][0]["fix"], "check_writers", "{deep:#}");
    let command = d["fixes"][0]["command"]
        .as_str()
        .expect("command")
        .to_owned();
    let (code, out, err) = run_printed(&p, &command);
    assert_eq!(code, Some(0), "{command}\n{out}\n{err}");
    let (code, out, err) = audit(&p, &["--deep", "--recheck-after", "1"]);
    assert_eq!(code, Some(0), "clean by content: {out}\n{err}");
    let docs = p.wait_converged(&table, 30, &[]).await;
    assert_eq!(docs["40"]["title"], "row 40");

    consumer.stop().await;
    p.cleanup(&[&table]).await;
}

/// Runs a command the report printed, word for word (it starts with
/// `tidemark-replay --config <the config this test wrote>`).
fn run_printed(p: &Pipeline, command: &str) -> (Option<i32>, String, String) {
    let words: Vec<&str> = command.split_whitespace().collect();
    assert_eq!(words.first(), Some(&"tidemark-replay"), "{command}");
    assert_eq!(words.get(1), Some(&"--config"), "{command}");
    let output = Command::new(env!("CARGO_BIN_EXE_tidemark-replay"))
        .args(&words[1..])
        .env_remove("TIDEMARK_KAFKA_BROKERS")
        .env_remove("TIDEMARK_OPENSEARCH_URL")
        .current_dir(&p.dir)
        .output()
        .expect("run the printed command");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
