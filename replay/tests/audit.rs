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
    // Dated by updated_at (missing and stale rows) or the document's last
    // commit (extra): everything falls in the current hour here.
    let hours: Vec<&String> = t["timeline"]
        .as_object()
        .expect("timeline")
        .keys()
        .collect();
    assert!(
        !hours.is_empty() && hours.iter().all(|h| h.len() == 13 || *h == "unknown"),
        "{hours:?}"
    );

    let (code, text, _) = audit(&p, &["--recheck-after", "1"]);
    assert_eq!(code, Some(1));
    assert!(text.contains("2 missing, 2 extra, 2 stale"), "{text}");
    assert!(text.contains("stale   id 10"), "{text}");

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
