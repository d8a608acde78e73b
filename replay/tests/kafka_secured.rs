//! The whole pipeline against a secured Kafka broker (SASL_SSL only,
//! SCRAM-SHA-512, certificates made at start-up, StandardAuthorizer with
//! the least-privilege ACLs of README.md): the producer, the consumer and
//! replay each log in as their own user and work as they do in the clear;
//! what the ACLs refuse stays refused (the consumer's and replay's users
//! cannot write the events the consumer applies); a wrong password, an
//! unknown CA or a plaintext client fail at start-up naming the broker and
//! the field to fix, never the password.

#[path = "../../consumer/tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use support::Pipeline;
use tidemark_testkit::kafka::ScratchKafka;

#[tokio::test(flavor = "multi_thread")]
async fn pipeline_over_sasl_ssl_with_acls() {
    let mut p = Pipeline::new("r_ksec").await;
    let broker = ScratchKafka::secured(&p.name);
    p.secured_kafka = Some((broker.brokers(), broker.ca()));
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
            "the snapshot was not indexed through the secured broker"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    consumer.stop().await;

    // Ten updates the index never gets (the consumer is gone, its offsets
    // moved past them), repaired by replay as its own user.
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
    assert!(
        err.contains("security_protocol=sasl_ssl sasl=SCRAM-SHA-512 user=tidemark-replay"),
        "the target print says how replay reached Kafka:\n{err}"
    );
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
    let (code, out, err) = p.run_replay(&[
        "history",
        "--table",
        &format!("public.{table}"),
        "--key",
        "3",
    ]);
    assert_eq!(code, Some(0), "history:\n{out}\n{err}");
    assert!(out.contains("changed"), "history shows the update:\n{out}");

    // The ACLs hold: only the producer's user writes table topics. (The
    // threat: whoever can write them can make the consumer apply anything.)
    let topic = p.topic(&table);
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
        p.topic_ends(&table).iter().sum::<i64>(),
        60,
        "nothing but the producer's 60 changes in the topic"
    );
    p.stop_producer().await;
    p.cleanup(&[&table]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_password_an_unknown_ca_or_plaintext_fail_at_start_up_by_name() {
    let mut p = Pipeline::new("r_ksecno").await;
    let broker = ScratchKafka::secured(&p.name);
    p.secured_kafka = Some((broker.brokers(), broker.ca()));
    let table = p.table("t");
    p.create_table(&table, "id int PRIMARY KEY, v text", "")
        .await;
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
        let (code, err) = run(text, password);
        assert_eq!(code, Some(2), "{what}:\n{err}");
        assert!(
            err.contains(&format!("Kafka at {brokers} refused")),
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
    p.cleanup(&[&table]).await;
}

/// The rule above every other: a credential the broker refuses *while
/// running* (rotated on the broker before the clients got the new one) is
/// an outage, waited out: the consumer says so on `/readyz`, nothing is
/// lost, and once the credential is right again the changes made meanwhile
/// arrive.
#[tokio::test(flavor = "multi_thread")]
async fn a_credential_refused_while_running_is_waited_out() {
    let mut p = Pipeline::new("r_ksecrot").await;
    let broker = ScratchKafka::secured(&p.name);
    p.secured_kafka = Some((broker.brokers(), broker.ca()));
    let table = p.table("t");
    p.create_table(&table, "id int PRIMARY KEY, v text", "")
        .await;
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
