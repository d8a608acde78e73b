//! The incident tools against a PostgreSQL that accepts TCP only over TLS
//! (`sslmode=verify-full`): `window` (its exported snapshot on a
//! replication session, its reads on a SQL session), `audit` and `history`
//! work as they do in the clear.

#[path = "../../consumer/tests/support/mod.rs"]
mod support;

use support::Pipeline;
use tidemark_testkit::scratch::{PASSWORD, ScratchPostgres};

#[tokio::test(flavor = "multi_thread")]
async fn window_audit_and_history_over_verify_full() {
    let server = ScratchPostgres::secured();
    let admin = support::pg(&server.socket_url()).await;
    admin
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, v text);
             INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 50) g;",
        )
        .await
        .expect("table");
    let ca = server.certs.clone().expect("certs").ca;
    let mut p = Pipeline::new("r_tls").await;
    p.source_url = Some(format!(
        "postgres://postgres:{PASSWORD}@127.0.0.1:{}/postgres?sslmode=verify-full&sslrootcert={}",
        server.port,
        ca.display()
    ));
    p.add_table("t", "");
    p.start_producer().await;
    let err = p.lost_updates_drill(&admin, "t", 50).await;
    assert!(
        err.contains("database postgres, TLSv1.3 (sslmode=verify-full)"),
        "the target print says the session is encrypted:\n{err}"
    );
    let (code, out, err) = p.run_replay(&["history", "--table", "public.t", "--key", "3"]);
    assert_eq!(code, Some(0), "history:\n{out}\n{err}");
    assert!(out.contains("changed"), "history shows the update:\n{out}");
    p.stop_producer().await;
}
