//! The one health endpoint of every long-running command: `/healthz` (the
//! process serves requests), `/readyz` (200, or 503 with why), `/metrics`
//! (Prometheus text). What "ready" means and what is measured are the
//! caller's ([`Health`]); how they are served is here.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::sync::watch;

/// What a command's endpoint reports.
pub trait Health: Send + Sync + 'static {
    /// `Ok` when ready, else why not (for `/readyz`).
    fn readiness(&self) -> Result<(), String>;
    /// The metrics in Prometheus text format.
    fn render(&self) -> String;
}

/// Serves `/healthz`, `/readyz` and `/metrics` on `listener` until
/// `shutdown` turns true.
pub async fn serve<H: Health>(
    listener: tokio::net::TcpListener,
    health: Arc<H>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(h): State<Arc<H>>| async move {
                match h.readiness() {
                    Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
                    Err(why) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: {why}\n"),
                    ),
                }
            }),
        )
        .route(
            "/metrics",
            get(|State(h): State<Arc<H>>| async move { h.render() }),
        )
        .with_state(health);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .await
}
