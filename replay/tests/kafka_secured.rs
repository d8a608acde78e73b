//! Against a secured Kafka broker (SASL_SSL only, SCRAM-SHA-512,
//! certificates made at start-up, StandardAuthorizer with the
//! least-privilege ACLs of README.md): a wrong password, an unknown CA, a
//! certificate for another host or a plaintext client fail at start-up
//! naming the broker and the field to fix, never the password; a
//! credential refused while running is waited out. (The whole pipeline on
//! it: `secured_stack.rs`.)

#[path = "../../consumer/tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::Pipeline;
use tidemark_testkit::kafka::ScratchKafka;

/// At start-up, a wrong password, an unknown CA, a certificate for another
/// host and a plaintext client are refused by name. Then the rule above
/// every other: a credential the broker refuses *while
/// running* (rotated on the broker before the clients got the new one) is
/// an outage, waited out: the consumer says so on `/readyz`, nothing is
/// lost, and once the credential is right again the changes made meanwhile
/// arrive.
/// (One broker for both parts: each scratch broker is two JVMs.)
#[tokio::test(flavor = "multi_thread")]
async fn refused_at_start_up_by_name_and_waited_out_while_running() {
    let mut p = Pipeline::new("r_ksecrot").await;
    let broker = ScratchKafka::secured(&p.name);
    p.secured_kafka = Some((broker.brokers(), broker.ca()));
    let table = p.table("t");
    p.create_table(&table, "id int PRIMARY KEY, v text", "")
        .await;
    refusals(&p, &broker, &table);
    p.pg.batch_execute(&format!(
        "INSERT INTO {table} SELECT g, 'v' || g FROM generate_series(1, 10) g"
    ))
    .await
    .expect("rows");
    let index = p.index(&table);
    p.start_producer().await;
    let consumer = p.start_consumer_in_process().await;
    let deadline = Instant::now() + Duration::from_secs(90);
    while p.docs(&index).await.len() < 10 {
        assert!(Instant::now() < deadline, "the snapshot was not indexed");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // The broker's passwords change; every client must log in again.
    for user in ["tidemark-producer", "tidemark-consumer"] {
        broker.set_password(user, "rotated-on-the-broker-only");
    }
    broker.restart();
    p.pg.batch_execute(&format!(
        "INSERT INTO {table} SELECT g, 'during' FROM generate_series(11, 30) g;
         UPDATE {table} SET v = 'during' WHERE id <= 5"
    ))
    .await
    .expect("changes while refused");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let readiness = consumer.metrics.readiness();
        if readiness.as_ref().is_err_and(|r| r.contains("kafka down")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never said Kafka refuses the consumer: {readiness:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        !consumer.handle.is_finished(),
        "the consumer waits, it does not stop"
    );
    assert_eq!(
        p.docs(&index).await.len(),
        10,
        "nothing got through the refused login"
    );

    // The credentials are right again: what changed meanwhile arrives.
    for user in ["tidemark-producer", "tidemark-consumer"] {
        broker.set_password(user, &tidemark_testkit::kafka::password(user));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let docs = p.docs(&index).await;
        let during = docs.values().filter(|d| d["v"] == "during").count();
        if docs.len() == 30 && during == 25 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the changes made while refused did not all arrive: {} docs, {during} changed",
            docs.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while consumer
        .metrics
        .readiness()
        .is_err_and(|r| r.contains("kafka down"))
    {
        assert!(
            Instant::now() < deadline,
            "/readyz still says Kafka is down"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    consumer.stop().await;
    p.stop_producer().await;
    p.cleanup(&[&table]).await;
}

/// Each misconfiguration stops `history` at start-up with exit 2, naming
/// the broker and the field to fix, never the password.
fn refusals(p: &Pipeline, broker: &ScratchKafka, table: &str) {
    let brokers = broker.brokers();
    let config = p.dir.join("refused.toml");
    let run = |text: String, password: &str| {
        std::fs::write(&config, text).expect("config");
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_tidemark-replay"))
            .arg("--config")
            .arg(&config)
            .args([
                "history",
                "--table",
                &format!("public.{table}"),
                "--key",
                "1",
            ])
            .env("TIDEMARK_KAFKA_PASSWORD", password)
            .env_remove("TIDEMARK_KAFKA_BROKERS")
            .output()
            .expect("run tidemark-replay");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let secured = p.config_text_as("replay", 1, "");
    let ca_line = format!("ssl_ca_location = \"{}\"\n", broker.ca().display());
    let cases = [
        (
            "a wrong password",
            secured.clone(),
            "not-the-password-41",
            "TIDEMARK_KAFKA_PASSWORD",
        ),
        (
            "the system trust store, which does not hold the broker's CA",
            secured.replace(&ca_line, ""),
            "tidemark-replay-dev",
            "kafka.ssl_ca_location",
        ),
        (
            "the right CA, but a broker address the certificate does not name (localhost)",
            secured.replace(
                &format!("brokers = \"{brokers}\""),
                &format!("brokers = \"localhost:{}\"", broker.port),
            ),
            "tidemark-replay-dev",
            "kafka.ssl_ca_location",
        ),
        (
            "a plaintext client",
            secured
                .replace("security_protocol = \"sasl_ssl\"\n", "")
                .replace("sasl_mechanism = \"SCRAM-SHA-512\"\n", "")
                .replace("sasl_username = \"tidemark-replay\"\n", "")
                .replace(&ca_line, ""),
            "",
            "kafka.security_protocol",
        ),
    ];
    for (what, text, password, fix) in cases {
        assert!(
            text != secured || password != "tidemark-replay-dev",
            "{what}: the config, or the password, is wrong"
        );
        let started = Instant::now();
        let named = if text.contains("localhost") {
            format!("localhost:{}", broker.port)
        } else {
            brokers.clone()
        };
        let (code, err) = run(text, password);
        assert_eq!(code, Some(2), "{what}:\n{err}");
        assert!(
            err.contains(&format!("Kafka at {named} refused")),
            "{what}: names the broker and says it refused:\n{err}"
        );
        assert!(err.contains(fix), "{what}: names {fix}:\n{err}");
        assert!(
            password.is_empty() || !err.contains(password),
            "{what}: never the password:\n{err}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{what}: fails at start-up, not after retrying for ever"
        );
    }
}
