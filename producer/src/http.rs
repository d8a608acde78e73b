//! `/healthz`, `/readyz` and `/metrics`.
//!
//! Health means dependencies (INCIDENTS.md, story 3): `/readyz` answers 503
//! unless PostgreSQL and Kafka answer and the replication stream is running.
//! `/healthz` only says the process serves requests.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::sync::watch;

use crate::metrics::Metrics;

pub async fn serve(
    listen: std::net::SocketAddr,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route(
            "/metrics",
            get(|State(m): State<Arc<Metrics>>| async move { m.render() }),
        )
        .with_state(metrics);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.changed().await;
        })
        .await
}

async fn ready(State(metrics): State<Arc<Metrics>>) -> (StatusCode, String) {
    let checks = [
        ("postgres", metrics.postgres_up.load(Ordering::Relaxed)),
        ("kafka", metrics.kafka_up.load(Ordering::Relaxed)),
        (
            "replication stream",
            metrics.streaming.load(Ordering::Relaxed),
        ),
    ];
    let failing: Vec<&str> = checks
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(name, _)| *name)
        .collect();
    let blocked = metrics
        .blocked
        .lock()
        .map(|b| b.clone())
        .unwrap_or_default();
    if let Some(why) = blocked {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
    } else if failing.is_empty() {
        (StatusCode::OK, "ready\n".into())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {} down\n", failing.join(", ")),
        )
    }
}
