//! PostgreSQL over TLS, against a scratch cluster that accepts TCP
//! connections only over TLS (`hostssl` lines only), with certificates made
//! for it at start-up: what `sslmode` asks for is what happens, on the SQL
//! and the replication session alike, and every refusal names the server
//! and never the password.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::Harness;
use tidemark_testkit::scratch::{PASSWORD, ScratchPostgres};

/// A config for table `t` of `server`, reached at `host` with `password`
/// and the URL parameters `params`.
fn config_for(
    h: &Harness,
    server: &ScratchPostgres,
    host: &str,
    password: &str,
    params: &str,
) -> PathBuf {
    let text = std::fs::read_to_string(h.config(&["t"], "")).expect("config");
    let url = format!(
        "postgres://postgres:{password}@{host}:{}/postgres?{params}",
        server.port
    );
    let path = h
        .dir
        .join(format!("{}.toml", tidemark_testkit::unique_name("c")));
    std::fs::write(&path, text.replace(&h.stack.pg_replication_url, &url)).expect("write config");
    path
}

/// Runs `tidemark-producer --check` on `config`: (exit code, stderr).
fn check(config: &Path) -> (Option<i32>, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_tidemark-producer"))
        .arg("--config")
        .arg(config)
        .arg("--check")
        .env("RUST_LOG", "info")
        .env_remove("TIDEMARK_KAFKA_BROKERS")
        .env_remove("TIDEMARK_POSTGRES_URL")
        .output()
        .expect("run tidemark-producer --check");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

async fn secured_with_table() -> (ScratchPostgres, tokio_postgres::Client) {
    let server = ScratchPostgres::secured();
    let admin = support::pg(&server.socket_url()).await;
    admin
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, v text);
             INSERT INTO t SELECT g, 'snapshot' FROM generate_series(1, 5) g",
        )
        .await
        .expect("table");
    (server, admin)
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_full_streams_snapshot_and_changes_over_tls_on_both_sessions() {
    let h = Harness::new("tls").await;
    let (server, admin) = secured_with_table().await;
    let ca = server.certs.clone().expect("certs").ca;
    let config = config_for(
        &h,
        &server,
        "127.0.0.1",
        PASSWORD,
        &format!("sslmode=verify-full&sslrootcert={}", ca.display()),
    );
    let mut producer = h.start(&config, 0);
    h.wait_ready(&mut producer, 0).await;
    admin
        .batch_execute("INSERT INTO t SELECT g, 'streamed' FROM generate_series(6, 10) g")
        .await
        .expect("rows");
    // Until every row is in (the topic has several partitions: row 10 can
    // be read before rows of another partition).
    let records = h.read_until(&h.topic("t"), |r| {
        (1..=10).all(|id| r.iter().any(|r| r.event.key["id"] == id))
    });
    let ids: std::collections::BTreeSet<i64> = records
        .iter()
        .filter_map(|r| r.event.key["id"].as_i64())
        .collect();
    assert_eq!(ids, (1..=10).collect(), "the snapshot and the stream");

    // As the server sees them: the producer's SQL session and its
    // walsender are both encrypted.
    let sessions = admin
        .query(
            "SELECT a.backend_type, s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
              WHERE a.application_name = 'tidemark-producer'",
            &[],
        )
        .await
        .expect("pg_stat_ssl");
    let kinds: Vec<(String, bool)> = sessions.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert!(
        kinds.iter().any(|(k, ssl)| k == "walsender" && *ssl),
        "the replication session is encrypted: {kinds:?}"
    );
    assert!(
        kinds.iter().all(|(_, ssl)| *ssl),
        "every session is encrypted: {kinds:?}"
    );
    // And as the producer says at start-up, for each session.
    let log = h.log(0);
    assert_eq!(
        log.matches("TLSv1.3 (sslmode=verify-full)").count(),
        2,
        "one line for the SQL session, one for the replication session:\n{log}"
    );
    h.stop(producer, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_ca_wrong_host_wrong_password_and_no_tls_are_refused_by_name() {
    let h = Harness::new("tlsno").await;
    let (server, _admin) = secured_with_table().await;
    let certs = server.certs.clone().expect("certs");
    let verify = |mode: &str, ca: &Path| format!("sslmode={mode}&sslrootcert={}", ca.display());
    let shown = format!("postgres://postgres:***@127.0.0.1:{}", server.port);

    // A CA that did not sign the server's certificate.
    let (code, err) = check(&config_for(
        &h,
        &server,
        "127.0.0.1",
        PASSWORD,
        &verify("verify-full", &certs.other_ca),
    ));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!("cannot connect to PostgreSQL at {shown}")),
        "{err}"
    );
    assert!(
        err.contains("invalid peer certificate: UnknownIssuer"),
        "the reason: {err}"
    );

    // The right CA, but the certificate is for 127.0.0.1, not localhost:
    // verify-full refuses, verify-ca (no name check) accepts.
    let (code, err) = check(&config_for(
        &h,
        &server,
        "localhost",
        PASSWORD,
        &verify("verify-full", &certs.ca),
    ));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("postgres:***@localhost"),
        "names the server: {err}"
    );
    assert!(
        err.contains("certificate not valid for name \"localhost\""),
        "the reason: {err}"
    );
    let (code, err) = check(&config_for(
        &h,
        &server,
        "localhost",
        PASSWORD,
        &verify("verify-ca", &certs.ca),
    ));
    assert_eq!(code, Some(0), "verify-ca does not check the name: {err}");

    // A wrong password: refused, and the password is printed nowhere.
    let canary = "canary-Pw-5f1c9e";
    let (code, err) = check(&config_for(
        &h,
        &server,
        "127.0.0.1",
        canary,
        &verify("verify-full", &certs.ca),
    ));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("password authentication failed"), "{err}");
    assert!(!err.contains(canary), "the password leaked: {err}");

    // sslmode=disable against a server that only takes TLS: what the URL
    // asks for is what is tried, and the server's refusal is shown.
    let (code, err) = check(&config_for(
        &h,
        &server,
        "127.0.0.1",
        PASSWORD,
        "sslmode=disable",
    ));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("no encryption"), "{err}");
}

/// `[kafka.properties]` reach the producer's librdkafka clients: a value
/// librdkafka refuses stops `--check` (exit 2) naming the property.
#[tokio::test(flavor = "multi_thread")]
async fn kafka_properties_reach_the_producers_clients() {
    let h = Harness::new("kprops").await;
    let table = h.table("t");
    h.create_table(&table, "id int PRIMARY KEY").await;
    let config = h.config(&[&table], "");
    let mut text = std::fs::read_to_string(&config).expect("config");
    text.push_str("[kafka.properties]\n\"socket.keepalive.enable\" = \"maybe\"\n");
    std::fs::write(&config, text).expect("config");
    let (code, err) = check(&config);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("socket.keepalive.enable"),
        "names the property: {err}"
    );
}
