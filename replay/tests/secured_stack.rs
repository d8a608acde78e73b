//! The whole pipeline on the secured stack: PostgreSQL that takes TCP only
//! over TLS (`sslmode=verify-full`), Kafka that takes only SASL_SSL with
//! SCRAM users and least-privilege ACLs, OpenSearch with the security
//! plugin (HTTPS only). Each stage logs in as its own user: the producer
//! and the consumer to Kafka as `tidemark-producer` / `tidemark-consumer`,
//! the consumer to OpenSearch with basic auth, replay with a client
//! certificate. Snapshot, stream, a `window` repair, a clean `audit` and
//! `history` work as they do in the clear, and what the ACLs refuse stays
//! refused; OpenSearch refusals are named (Kafka's: `kafka_secured.rs`;
//! PostgreSQL's: `producer/tests/tls.rs`).

#[path = "../../consumer/tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use support::Pipeline;
use tidemark_testkit::kafka::ScratchKafka;
use tidemark_testkit::scratch::{PASSWORD, ScratchOpenSearch, ScratchPostgres};

#[tokio::test(flavor = "multi_thread")]
async fn the_whole_pipeline_on_the_secured_stack() {
    let server = ScratchPostgres::secured();
    let node = ScratchOpenSearch::secured();
    let mut p = Pipeline::with_secured_opensearch("r_secstack", &node).await;
    let broker = ScratchKafka::secured(&p.name);
    p.secured_kafka = Some((broker.brokers(), broker.ca()));
    p.source_url = Some(format!(
        "postgres://postgres:{PASSWORD}@127.0.0.1:{}/postgres?sslmode=verify-full&sslrootcert={}",
        server.port,
        server.certs.clone().expect("certs").ca.display()
    ));
    let ca = format!("tls_ca_file = \"{}\"\n", node.ca().display());
    let (cert, key) = node.client_certificate();
    p.opensearch_login.insert(
        "consumer".into(),
        (
            format!("{ca}username = \"tidemark\"\n"),
            Some("tidemark-dev".into()),
        ),
    );
    p.opensearch_login.insert(
        "replay".into(),
        (
            format!(
                "{ca}tls_certificate_file = \"{}\"\ntls_key_file = \"{}\"\n",
                cert.display(),
                key.display()
            ),
            None,
        ),
    );
    let source = support::pg(&server.socket_url()).await;
    source
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, v text);
             INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 50) g;",
        )
        .await
        .expect("table");
    p.add_table("t", "");
    p.start_producer().await;
    let err = p.lost_updates_drill(&source, "t", 50).await;
    for said in [
        "database postgres, TLSv1.3 (sslmode=verify-full)",
        "security_protocol=sasl_ssl sasl=SCRAM-SHA-512 user=tidemark-replay",
    ] {
        assert!(err.contains(said), "the target print says {said:?}:\n{err}");
    }
    let (code, out, err) = p.run_replay(&["history", "--table", "public.t", "--key", "3"]);
    assert_eq!(code, Some(0), "history:\n{out}\n{err}");
    assert!(out.contains("changed"), "history shows the update:\n{out}");

    // The sessions the producer holds are encrypted, as the server sees them.
    let encrypted: Vec<bool> = source
        .query(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
              WHERE a.application_name = 'tidemark-producer'",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        !encrypted.is_empty() && encrypted.iter().all(|e| *e),
        "the producer's sessions are encrypted: {encrypted:?}"
    );

    // The ACLs hold: only the producer's user writes table topics. (The
    // threat: whoever can write them can make the consumer apply anything.)
    let topic = p.topic("t");
    for stage in ["consumer", "replay"] {
        let producer: FutureProducer = p
            .kafka_client(stage)
            .set("message.timeout.ms", "20000")
            .create()
            .expect("a producer");
        let delivery = producer
            .send(
                FutureRecord::to(&topic).key("{}").payload("{}"),
                Duration::ZERO,
            )
            .await;
        match delivery {
            Err((error, _)) => assert_eq!(
                error.rdkafka_error_code(),
                Some(RDKafkaErrorCode::TopicAuthorizationFailed),
                "tidemark-{stage}: {error}"
            ),
            Ok(at) => panic!("tidemark-{stage} wrote to {topic} at {at:?}"),
        }
    }
    assert_eq!(
        p.topic_ends("t").iter().sum::<i64>(),
        60,
        "nothing but the producer's 60 changes in the topic"
    );
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
    opensearch_refusals(&p, &node);
    p.stop_producer().await;
}

/// `[opensearch]` lines: the node's CA, then `login`.
fn login(node: &ScratchOpenSearch, login: &str) -> String {
    format!("tls_ca_file = \"{}\"\n{login}", node.ca().display())
}

/// A wrong password, an untrusted certificate, a certificate for another
/// host and plain HTTP each stop `audit` at start-up with exit 2, naming
/// the cluster and the field to fix, never the password.
fn opensearch_refusals(p: &Pipeline, node: &ScratchOpenSearch) {
    let config = p.dir.join("refused.toml");
    let url = node.url();
    let run = |url: &str, lines: &str, password: &str| {
        // Replay's own login replaced by the case's.
        let own = &p.opensearch_login["replay"].0;
        let text = p.config_text_as("replay", 1, "").replacen(
            &format!("[opensearch]\nurl = \"{}\"\n{own}", node.url()),
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
            .env(
                "TIDEMARK_KAFKA_PASSWORD",
                p.kafka_password("replay").expect("a Kafka password"),
            )
            .env_remove("TIDEMARK_OPENSEARCH_URL")
            .env_remove("TIDEMARK_KAFKA_BROKERS")
            .output()
            .expect("run tidemark-replay");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let basic = |password| login(node, &format!("username = \"tidemark\"\n{password}"));
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
            "the right CA, but a host the certificate does not name (localhost)",
            url.replacen("127.0.0.1", "localhost", 1),
            basic(""),
            "tidemark-dev",
            vec!["TLS handshake failed", "names the host in opensearch.url"],
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
