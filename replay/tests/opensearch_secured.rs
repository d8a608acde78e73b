//! The consumer and replay against an OpenSearch node with the security
//! plugin (HTTPS only, with a CA made at start-up; internal users; client
//! certificates): the consumer logs in with basic auth, replay with a
//! client certificate, and both work as they do in the clear; a wrong
//! password, an untrusted certificate and plain HTTP fail at start-up with
//! exit 2, naming the cluster and the field to fix, never the password.

#[path = "../../consumer/tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::Pipeline;
use tidemark_testkit::scratch::ScratchOpenSearch;

/// `[opensearch]` lines: the node's CA, then `login`.
fn login(node: &ScratchOpenSearch, login: &str) -> String {
    format!("tls_ca_file = \"{}\"\n{login}", node.ca().display())
}

#[tokio::test(flavor = "multi_thread")]
async fn basic_auth_and_client_certificates_over_https() {
    let node = ScratchOpenSearch::secured();
    let mut p = Pipeline::with_secured_opensearch("r_ossec", &node).await;
    let (cert, key) = node.client_certificate();
    p.opensearch_login.insert(
        "consumer".into(),
        (
            login(&node, "username = \"tidemark\"\n"),
            Some("tidemark-dev".into()),
        ),
    );
    p.opensearch_login.insert(
        "replay".into(),
        (
            login(
                &node,
                &format!(
                    "tls_certificate_file = \"{}\"\ntls_key_file = \"{}\"\n",
                    cert.display(),
                    key.display()
                ),
            ),
            None,
        ),
    );
    let table = p.table("t");
    p.create_table(&table, "id int PRIMARY KEY, v text", "")
        .await;
    p.pg.batch_execute(&format!(
        "INSERT INTO {table} SELECT g, 'v' || g FROM generate_series(1, 50) g"
    ))
    .await
    .expect("rows");
    let index = p.index(&table);
    p.start_producer().await;
    let consumer = p.start_consumer_in_process().await;
    let deadline = Instant::now() + Duration::from_secs(90);
    while p.docs(&index).await.len() < 50 {
        assert!(
            Instant::now() < deadline,
            "the snapshot was not indexed in the secured node"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    consumer.stop().await;

    // Ten lost updates, repaired by replay logged in by its certificate.
    p.pg.batch_execute(&format!("UPDATE {table} SET v = 'changed' WHERE id <= 10"))
        .await
        .expect("updates");
    let deadline = Instant::now() + Duration::from_secs(60);
    while p.topic_ends(&table).iter().sum::<i64>() < 60 {
        assert!(Instant::now() < deadline, "the updates did not reach Kafka");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    p.skip_consumer_offsets(&table);
    let (code, out, err) = p.run_replay(&["window", "--from", "-10m", "--to", "now", "--yes"]);
    assert_eq!(code, Some(0), "window:\n{out}\n{err}");
    let docs = p.docs(&index).await;
    let changed = (1..=10)
        .filter(|id| {
            docs.get(&id.to_string())
                .is_some_and(|d| d["v"] == "changed")
        })
        .count();
    assert_eq!(changed, 10, "window repaired every lost update:\n{out}");
    let (code, out, err) = p.run_replay(&["audit"]);
    assert_eq!(code, Some(0), "a clean audit:\n{out}\n{err}");

    // Who the node saw: the consumer's basic-auth user, replay's
    // certificate's CN.
    let whoami = |password: Option<&str>| {
        let mut c = std::process::Command::new("curl");
        c.args(["-sS", "--cacert"]).arg(node.ca());
        if let Some(password) = password {
            c.args(["-u", &format!("tidemark:{password}")]);
        } else {
            c.arg("--cert").arg(&cert).arg("--key").arg(&key);
        }
        let out = c
            .arg(format!("{}/_plugins/_security/authinfo", node.url()))
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(
        whoami(Some("tidemark-dev")).contains("\"user_name\":\"tidemark\""),
        "basic auth logs in as tidemark"
    );
    assert!(
        whoami(None).contains("\"user_name\":\"tidemark-consumer\""),
        "the certificate logs in as its CN"
    );
    p.stop_producer().await;
    p.cleanup(&[&table]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_password_an_untrusted_certificate_or_plain_http_fail_by_name() {
    let node = ScratchOpenSearch::secured();
    let mut p = Pipeline::with_secured_opensearch("r_ossecno", &node).await;
    p.add_table("t", "");
    let config = p.dir.join("refused.toml");
    let url = node.url();
    let run = |url: &str, lines: &str, password: &str| {
        let text = p.config_text_as("replay", 1, "").replacen(
            &format!("[opensearch]\nurl = \"{}\"\n", node.url()),
            &format!("[opensearch]\nurl = \"{url}\"\n{lines}"),
            1,
        );
        assert!(text.contains(lines), "the [opensearch] lines went in");
        std::fs::write(&config, text).expect("config");
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_tidemark-replay"))
            .arg("--config")
            .arg(&config)
            .arg("audit")
            .env("TIDEMARK_OPENSEARCH_PASSWORD", password)
            .env_remove("TIDEMARK_OPENSEARCH_URL")
            .env_remove("TIDEMARK_KAFKA_BROKERS")
            .output()
            .expect("run tidemark-replay");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let basic = |password| login(&node, &format!("username = \"tidemark\"\n{password}"));
    let plain = url.replacen("https://", "http://", 1);
    let cases = [
        (
            "a wrong password",
            url.clone(),
            basic(""),
            "not-the-password-17",
            vec!["answered 401", "opensearch.username"],
        ),
        (
            "the system trust store, which does not hold the node's CA",
            url.clone(),
            "username = \"tidemark\"\n".to_owned(),
            "tidemark-dev",
            vec!["TLS handshake failed", "opensearch.tls_ca_file"],
        ),
        (
            "plain HTTP to an HTTPS node",
            plain.clone(),
            "username = \"tidemark\"\n".to_owned(),
            "tidemark-dev",
            vec!["cannot reach OpenSearch", "whether it is https://"],
        ),
    ];
    for (what, url, lines, password, says) in cases {
        let started = Instant::now();
        let (code, err) = run(&url, &lines, password);
        assert_eq!(code, Some(2), "{what}:\n{err}");
        for said in says {
            assert!(err.contains(said), "{what}: says {said:?}:\n{err}");
        }
        assert!(
            !err.contains(password),
            "{what}: never the password:\n{err}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{what}: fails at start-up"
        );
    }
}
