//! `tidemark-replay reindex` against the local stack, with the producer and
//! the consumer running and writes going on throughout: the first reindex
//! adopts the consumer's concrete index (the name becomes an alias) while
//! a reader polling `_count` through the name never sees it fail or drop;
//! the second moves the alias under updates, deletes and inserts. Each
//! ends with a clean audit.

#[path = "../../consumer/tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use opensearch::OpenSearch;
use opensearch::http::Method;
use opensearch::http::headers::HeaderMap;
use opensearch::http::request::JsonBody;
use serde_json::Value;
use support::Pipeline;
use tokio_postgres::NoTls;

/// Writes to `table` until `stop`, counting statements in `done`: inserts
/// only, or updates, deletes and inserts.
async fn live_writes(
    url: String,
    table: String,
    only_inserts: bool,
    first_id: i32,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let (pg, connection) = tokio_postgres::connect(&url, NoTls).await?;
    tokio::spawn(connection);
    let mut i: i32 = 0;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        pg.execute(
            &format!("INSERT INTO {table} VALUES ($1, 'new', 0)"),
            &[&(first_id + i)],
        )
        .await?;
        if !only_inserts {
            let id = (i * 37) % 2000 + 1;
            pg.execute(
                &format!("UPDATE {table} SET n = n + 1, title = 'live ' || n WHERE id = $1"),
                &[&id],
            )
            .await?;
            if i % 10 == 0 {
                let id = (i * 53) % 2000 + 1;
                pg.execute(&format!("DELETE FROM {table} WHERE id = $1"), &[&id])
                    .await?;
            }
        }
        done.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// What a reader polling `_count` through the name saw.
#[derive(Debug, Default)]
struct Seen {
    polls: u64,
    /// Each failed search: when (ms since the reader began) and its answer.
    failures: Vec<(u128, String)>,
    /// (from, to) of every count lower than one seen before it.
    drops: Vec<(u64, u64)>,
}

/// A GET of `path`: its status and JSON answer.
async fn call(os: &OpenSearch, path: &str) -> Result<(u16, Value), String> {
    send(os, Method::Get, path, None).await
}

async fn send(
    os: &OpenSearch,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<(u16, Value), String> {
    let response = os
        .send(
            method,
            path,
            HeaderMap::new(),
            None::<&()>,
            body.map(JsonBody::new),
            None,
        )
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status_code().as_u16();
    let body = response.json::<Value>().await.unwrap_or(Value::Null);
    Ok((status, body))
}

/// Polls `_count` of `index` every 20 ms until `stop`.
async fn read_counts(os: OpenSearch, index: String, stop: Arc<AtomicBool>) -> Seen {
    let mut seen = Seen::default();
    let mut highest = 0;
    let began = std::time::Instant::now();
    while !stop.load(Ordering::Relaxed) {
        seen.polls += 1;
        match call(&os, &format!("/{index}/_count")).await {
            Ok((200, v)) => {
                let count = v["count"].as_u64().unwrap_or(0);
                if count < highest {
                    seen.drops.push((highest, count));
                }
                highest = highest.max(count);
            }
            Ok((status, v)) => seen
                .failures
                .push((began.elapsed().as_millis(), format!("{status} {v}"))),
            Err(e) => seen.failures.push((began.elapsed().as_millis(), e)),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    seen
}

async fn get(p: &Pipeline, path: &str) -> Value {
    call(&p.os, path)
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
        .1
}

/// Runs a reindex of `table` with writes going on, and returns its output
/// and what the count reader saw.
async fn reindex_under_writes(
    p: &Pipeline,
    table: &str,
    only_inserts: bool,
    first_id: i32,
    extra: &[&str],
) -> (String, Seen, u64) {
    let qualified = format!("public.{table}");
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let writer = tokio::spawn(live_writes(
        p.stack.pg_url.clone(),
        table.to_owned(),
        only_inserts,
        first_id,
        stop.clone(),
        done.clone(),
    ));
    let reader = tokio::spawn(read_counts(p.os.clone(), p.index(table), stop.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (code, out, err) = tokio::task::block_in_place(|| {
        let mut args = vec!["reindex", "--table", &qualified, "--yes"];
        args.extend_from_slice(extra);
        p.run_replay(&args)
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.expect("writer").expect("live writes");
    let seen = reader.await.expect("reader");
    assert_eq!(code, Some(0), "{out}\n{err}");
    (out, seen, done.load(Ordering::Relaxed))
}

/// After a reindex that moved the table's index from `from` to `to`: it
/// said so, no search by the name failed, the alias names `to` and not
/// `from`, and the audit is clean.
async fn assert_moved(p: &Pipeline, table: &str, out: &str, seen: &Seen, from: &str, to: &str) {
    let index = p.index(table);
    assert!(out.contains(&format!("swapped: {index} -> {to}")), "{out}");
    assert!(
        seen.failures.is_empty(),
        "searches by the name failed: {:?}",
        seen.failures
    );
    let aliases = get(p, &format!("/_alias/{index}")).await;
    assert!(
        aliases.get(to).is_some() && aliases.get(from).is_none(),
        "{aliases}"
    );
    p.wait_converged(table, 90, &[]).await;
    let qualified = format!("public.{table}");
    let (code, out, err) = p.run_replay(&["audit", "--table", &qualified, "--recheck-after", "1"]);
    assert_eq!(
        code,
        Some(0),
        "a clean audit after moving {index} to {to}: {out}\n{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reindex_under_live_writes_moves_the_name_and_search_never_sees_a_gap() {
    let mut p = Pipeline::new("r_reindex").await;
    let table = p.table("t");
    let qualified = format!("public.{table}");
    p.create_table(&table, "id int PRIMARY KEY, title text, n int", "")
        .await;
    p.pg.batch_execute(&format!(
        "INSERT INTO {table} SELECT g, 'r ' || g, 0 FROM generate_series(1, 2000) g"
    ))
    .await
    .expect("rows");
    p.start_producer().await;
    let consumer = p.start_consumer_in_process().await;
    p.wait_converged(&table, 90, &[]).await;
    let index = p.index(&table);

    // A dry run says what it would do and creates nothing.
    let (code, out, err) = p.run_replay(&["reindex", "--table", &qualified]);
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(
        out.contains(&format!("{index} is a concrete index; new index {index}-1")),
        "{out}"
    );
    assert!(out.contains(&format!("copied to {index}-0")), "{out}");
    let probe = call(&p.os, &format!("/{index}-1")).await.expect("GET");
    assert_eq!(probe.0, 404, "the dry run created nothing");

    // The new settings a reindex is for: two shards.
    p.edit_tables("number_of_shards = 1", "number_of_shards = 2");

    // 1. Adopting the concrete index, inserts only: the count through the
    //    name never fails and never drops.
    let (out, seen, writes) = reindex_under_writes(&p, &table, true, 100_000, &[]).await;
    println!("{out}\ncount reader: {seen:?}; {writes} inserts during the reindex");
    assert!(
        out.contains(&format!("swapped: {index} -> {index}-1")),
        "{out}"
    );
    assert!(writes >= 20, "only {writes} inserts ran during the reindex");
    assert!(
        seen.polls >= 50,
        "the reader polled only {} times",
        seen.polls
    );
    // The name never goes missing (no 404) and never counts less. The one
    // failure adoption causes: searches the node had already resolved to
    // the concrete index when the `_aliases` call removed it fail ("all
    // shards failed", 503) for an instant; measured here at 0-2 polls 20 ms
    // apart. Moving an alias (below) removes nothing: there it is zero.
    let first = seen.failures.first().map_or(0, |f| f.0);
    assert!(
        seen.failures.iter().all(|(at, f)| f.starts_with("503")
            && f.contains("all shards failed")
            && at - first <= 500),
        "searches by the name failed: {:?}",
        seen.failures
    );
    assert!(
        seen.drops.is_empty(),
        "the count through the name dropped: {:?}",
        seen.drops
    );
    let aliases = get(&p, &format!("/_alias/{index}")).await;
    assert_eq!(
        aliases
            .as_object()
            .map(|m| m.keys().cloned().collect::<Vec<_>>()),
        Some(vec![format!("{index}-1")]),
        "{aliases}"
    );
    let settings = get(&p, &format!("/{index}-1/_settings?flat_settings=true")).await;
    assert_eq!(
        settings[format!("{index}-1")]["settings"]["index.number_of_shards"],
        "2",
        "{settings}"
    );
    let copy = get(&p, &format!("/{index}-0/_settings?flat_settings=true")).await;
    assert_eq!(
        copy[format!("{index}-0")]["settings"]["index.blocks.write"],
        "true",
        "the adopted index's copy is kept, write-blocked: {copy}"
    );
    let marks = get(&p, &format!("/_alias/{index}.tidemark-reindex")).await;
    assert_eq!(marks["status"], 404, "the mark is gone: {marks}");
    p.wait_converged(&table, 90, &[]).await;
    let (code, out, err) = p.run_replay(&["audit", "--table", &qualified, "--recheck-after", "1"]);
    assert_eq!(
        code,
        Some(0),
        "a clean audit after the first reindex: {out}\n{err}"
    );

    // 2. Moving the alias, under updates, deletes and inserts.
    let (out, seen, writes) = reindex_under_writes(&p, &table, false, 200_000, &[]).await;
    println!(
        "{out}\ncount reader: {} polls; {writes} write rounds",
        seen.polls
    );
    assert!(
        out.contains(&format!("{index} is an alias of {index}-1")),
        "{out}"
    );
    assert_moved(
        &p,
        &table,
        &out,
        &seen,
        &format!("{index}-1"),
        &format!("{index}-2"),
    )
    .await;

    // 3. Rolled back to the index the second reindex replaced, under the
    //    same writes: filled again, so nothing written since is lost.
    let (out, seen, _) = reindex_under_writes(&p, &table, false, 300_000, &["--rollback"]).await;
    println!("{out}\ncount reader: {} polls", seen.polls);
    assert!(out.contains(&format!("back to {index}-1")), "{out}");
    assert_moved(
        &p,
        &table,
        &out,
        &seen,
        &format!("{index}-2"),
        &format!("{index}-1"),
    )
    .await;

    // 4. A reindex that stopped before its swap, abandoned: its index
    //    (made and marked here as a reindex does) is unmarked, then deleted
    //    once no writer can still copy to it, so it never comes back.
    let abandoned = format!("{index}-9");
    let body = serde_json::json!({"settings": {"number_of_shards": 1, "number_of_replicas": 0}});
    let (status, answer) = send(&p.os, Method::Put, &format!("/{abandoned}"), Some(body))
        .await
        .expect("PUT");
    assert_eq!(status, 200, "{answer}");
    let mark = serde_json::json!({"actions": [{"add": {"index": abandoned, "alias": format!("{index}.tidemark-reindex")}}]});
    let (status, answer) = send(&p.os, Method::Post, "/_aliases", Some(mark))
        .await
        .expect("POST");
    assert_eq!(status, 200, "{answer}");
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let writer = tokio::spawn(live_writes(
        p.stack.pg_url.clone(),
        table.clone(),
        false,
        400_000,
        stop.clone(),
        done.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let copies = get(&p, &format!("/{abandoned}/_count")).await;
    assert!(
        copies["count"].as_u64().unwrap_or(0) > 0,
        "writers copy to a marked index: {copies}"
    );
    let (code, out, err) = tokio::task::block_in_place(|| {
        p.run_replay(&["reindex", "--table", &qualified, "--abandon", "--yes"])
    });
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        out.contains(&format!("abandoned: {abandoned} unmarked, then deleted")),
        "{out}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.expect("writer").expect("live writes");
    for gone in [abandoned.clone(), format!("{index}.tidemark-reindex")] {
        let probe = call(&p.os, &format!("/{gone}")).await.expect("GET");
        assert_eq!(probe.0, 404, "{gone} exists after the abandon: {}", probe.1);
    }
    p.wait_converged(&table, 90, &[]).await;
    let dead = p.dead_letter_count();
    assert_eq!(dead, 0, "nothing dead-lettered");

    consumer.stop().await;
    p.cleanup(&[&table]).await;
    for n in 0..=2 {
        let name = format!("{index}-{n}");
        let _ =
            p.os.indices()
                .delete(opensearch::indices::IndicesDeleteParts::Index(&[&name]))
                .send()
                .await;
    }
}

/// A column's type changing to one the index's mapping cannot take (`text`
/// to `jsonb` objects) is not the rows' fault: the table's writes wait,
/// saying why and naming the reindex, and nothing is dead-lettered. The
/// reindex then types the new index from the catalog, the waiting writes go
/// through by themselves, and the audit is clean.
#[tokio::test(flavor = "multi_thread")]
async fn a_type_change_the_index_cannot_take_waits_for_a_reindex_and_loses_nothing() {
    type_change(false).await;
}

/// The same with `audit --watch --reindex` running: no command by hand,
/// the table converges within the 120 s.
#[tokio::test(flavor = "multi_thread")]
async fn a_watch_with_reindex_reindexes_a_type_change_by_itself() {
    type_change(true).await;
}

async fn type_change(by_watch: bool) {
    let mut p = Pipeline::new(if by_watch { "r_retype_w" } else { "r_retype" }).await;
    let table = p.table("t");
    let qualified = format!("public.{table}");
    p.create_table(&table, "id int PRIMARY KEY, body text, n int", "")
        .await;
    p.pg.batch_execute(&format!(
        "INSERT INTO {table} SELECT g, 'row ' || g, 0 FROM generate_series(1, 200) g"
    ))
    .await
    .expect("rows");
    p.start_producer().await;
    let consumer = p.start_consumer_in_process().await;
    p.wait_converged(&table, 90, &[]).await;
    let _watch = by_watch.then(|| {
        let config = p.dir.join("watch.toml");
        std::fs::write(&config, p.config_text_as("replay", 1, "")).expect("config");
        let log = std::fs::File::create(p.dir.join("watch.log")).expect("log");
        Watcher(
            std::process::Command::new(env!("CARGO_BIN_EXE_tidemark-replay"))
                .arg("--config")
                .arg(&config)
                .args(["audit", "--watch", "--reindex", "--interval", "2"])
                .args(["--listen", &format!("127.0.0.1:{}", support::free_port())])
                .env_remove("TIDEMARK_KAFKA_BROKERS")
                .env_remove("TIDEMARK_OPENSEARCH_URL")
                .env("RUST_LOG", "info")
                .stdout(std::process::Stdio::null())
                .stderr(log)
                .spawn()
                .expect("audit --watch"),
        )
    });

    // With the watch, writes run all along: updates, inserts and deletes
    // before, across and after the type change (none names the column).
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let writer = by_watch.then(|| {
        let (url, table, stop, done) = (
            p.stack.pg_url.clone(),
            table.clone(),
            stop.clone(),
            done.clone(),
        );
        tokio::spawn(async move {
            let (pg, connection) = tokio_postgres::connect(&url, NoTls).await.expect("connect");
            tokio::spawn(connection);
            let mut i: i32 = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let statements = [
                    format!(
                        "UPDATE {table} SET n = n + 1 WHERE id = {}",
                        (i * 37) % 200 + 1
                    ),
                    format!("INSERT INTO {table} (id, n) VALUES ({}, 0)", 10_000 + i),
                    format!("DELETE FROM {table} WHERE id = {}", 10_000 + i - 3),
                ];
                for sql in &statements {
                    pg.batch_execute(sql).await.expect("write");
                }
                done.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let changed = std::time::Instant::now();
    p.pg.batch_execute(&format!(
        "ALTER TABLE {table} ALTER COLUMN body TYPE jsonb USING jsonb_build_object('v', body);
         UPDATE {table} SET n = n + 1 WHERE id <= 10"
    ))
    .await
    .expect("type change");
    if let Some(writer) = writer {
        // Past the watch's next pass and its reindex (about 6 s).
        tokio::time::sleep(Duration::from_secs(15)).await;
        stop.store(true, Ordering::Relaxed);
        writer.await.expect("writer");
        let docs = p.wait_converged(&table, 120, &[]).await;
        assert_eq!(docs["7"]["body"]["v"], "row 7", "{}", docs["7"]);
        println!(
            "text -> jsonb reindexed by the watch under {} write rounds: converged {:.1} s after \
             the ALTER",
            done.load(Ordering::Relaxed),
            changed.elapsed().as_secs_f64()
        );
        // The watch moved the name to a new index.
        let behind = get(&p, &format!("/_alias/{}", p.index(&table))).await;
        assert!(
            behind.get(format!("{}-1", p.index(&table))).is_some(),
            "{behind}"
        );
    } else {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let why = loop {
            if let Err(why) = consumer.metrics.readiness()
                && why.contains("column_type_changed")
            {
                break why;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the consumer never said its writes wait for the type change ({:?}); dead letters: {}",
                consumer.metrics.readiness(),
                p.dead_letter_count()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert!(
            why.contains("field body is mapped as text")
                && why.contains(&format!("reindex --table {qualified} --yes")),
            "{why}"
        );
        assert_eq!(p.dead_letter_count(), 0, "a type change dead-lettered rows");
        let (code, out, err) = p.run_replay(&["reindex", "--table", &qualified, "--yes"]);
        assert_eq!(code, Some(0), "{out}\n{err}");
    }
    p.pg.batch_execute(&format!("UPDATE {table} SET n = n + 1 WHERE id > 190"))
        .await
        .expect("a change after the reindex");
    let docs = p.wait_converged(&table, 60, &[]).await;
    assert_eq!(docs["7"]["body"]["v"], "row 7", "{}", docs["7"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while let Err(why) = consumer.metrics.readiness() {
        assert!(
            std::time::Instant::now() < deadline,
            "still not ready after the reindex: {why}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(p.dead_letter_count(), 0);
    let (code, out, err) = p.run_replay(&["audit", "--table", &qualified, "--recheck-after", "1"]);
    assert_eq!(code, Some(0), "{out}\n{err}");

    consumer.stop().await;
    p.cleanup(&[&table]).await;
}

/// A running `audit --watch`, stopped (SIGTERM) when dropped.
struct Watcher(std::process::Child);

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .arg(self.0.id().to_string())
            .status();
        let _ = self.0.wait();
    }
}
