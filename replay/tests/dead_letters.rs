//! `tidemark-replay dead-letters` against the local stack: rows a mapping
//! refused are dead letters; they are listed with table, key and reason;
//! once the mapping is fixed, `--repair --yes` brings them back through
//! window's source mode and the audit is clean.

#[path = "../../consumer/tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use opensearch::http::Method;
use serde_json::{Value, json};
use support::Pipeline;

#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_are_listed_and_repaired_once_the_mapping_is_fixed() {
    let mut p = Pipeline::new("r_dlq").await;
    let table = p.table("t");
    let mappings = p.dir.join("mappings.json");
    std::fs::write(
        &mappings,
        r#"{"mappings": {"properties": {"code": {"type": "long"}}}}"#,
    )
    .expect("mappings file");
    p.create_table(
        &table,
        "id int PRIMARY KEY, code text",
        &format!("mappings_file = {:?}", mappings.display().to_string()),
    )
    .await;
    p.start_producer().await;
    let consumer = p.start_consumer_in_process().await;
    p.pg.batch_execute(&format!(
        "INSERT INTO {table} VALUES (1, '12'), (2, 'not a number'), (3, '7'), (4, 'x')"
    ))
    .await
    .expect("rows");
    let index = p.index(&table);
    let deadline = Instant::now() + Duration::from_secs(60);
    while p.dead_letter_count() < 2 || p.docs(&index).await.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "rows 2 and 4 never dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    let (code, out, err) = p.run_replay(&["dead-letters", "--format", "json"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    let listed: Value = serde_json::from_str(&out).expect("JSON");
    let letters = listed["dead_letters"].as_array().expect("a list");
    // Set aside in one batch: the same time, any order.
    let mut ids: Vec<i64> = letters
        .iter()
        .filter_map(|d| d["key"]["id"].as_i64())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, [2, 4], "{listed:#}");
    for d in letters {
        assert_eq!(d["table"], format!("public.{table}"));
        assert_eq!(d["stage"], "consumer");
        assert!(
            d["reason"]
                .as_str()
                .is_some_and(|r| r.contains("mapper_parsing_exception")),
            "{d}"
        );
        assert!(
            d["origin"]
                .as_str()
                .is_some_and(|o| o.starts_with(&p.topic(&table))),
            "{d}"
        );
    }
    let (code, _, _) = p.run_replay(&["dead-letters", "--reason", "no such reason"]);
    assert_eq!(code, Some(1), "nothing matches: exit 1");

    // A dry run writes nothing.
    let (code, out, err) = p.run_replay(&["dead-letters", "--repair"]);
    assert_eq!(code, Some(1), "a dry run exits 1: {out}\n{err}");
    assert!(
        err.contains("2 dead-lettered keys") && err.contains("dry run"),
        "{err}"
    );
    assert_eq!(p.docs(&index).await.len(), 2, "the dry run wrote");

    // The cause is fixed: the field keeps what it cannot parse in _source.
    p.index_admin(
        Method::Put,
        &format!("/{index}/_mapping"),
        Some(json!({"properties": {"code": {"type": "long", "ignore_malformed": true}}})),
    )
    .await;
    let (code, out, err) = p.run_replay(&["dead-letters", "--repair", "--yes"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        out.contains("after the repair: 0 of the dead-lettered keys still differ"),
        "{out}"
    );
    let docs = p.wait_converged(&table, 30, &[]).await;
    assert_eq!(docs["2"]["code"], "not a number");
    let (code, out, err) = p.run_replay(&["audit", "--format", "json", "--recheck-after", "1"]);
    assert_eq!(
        code,
        Some(0),
        "the audit is clean after the repair: {out}\n{err}"
    );
    let (_, runs, _) = p.run_replay(&["runs", "--format", "json"]);
    assert!(runs.contains("dead-letters --repair"), "{runs}");
    consumer.stop().await;
    p.cleanup(&[&table]).await;
}
