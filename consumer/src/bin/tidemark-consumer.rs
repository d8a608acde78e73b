//! `tidemark-consumer`: applies the change events of the configured tables
//! from Kafka to OpenSearch, as one member of a consumer group.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tidemark_consumer::metrics::Metrics;
use tidemark_schemas::config::Config;
use tokio::sync::watch;
use tracing::info;

/// Bulk requests allocate many small JSON values on several threads.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Applies row changes from Kafka to OpenSearch, idempotent and
/// order-safe. Run several with the same config to share the partitions
/// (one Kafka consumer group, `consumer.group_id`).
///
/// On start it checks OpenSearch and Kafka and creates missing indices
/// (with each table's index_settings and mappings_file, plus the
/// `_tidemark` metadata mapping). Every document is written with
/// version = source commit LSN (`version_type=external_gte`), so old or
/// repeated events never overwrite newer data. Records OpenSearch refuses go
/// to the dead-letter topic with their origin and OpenSearch's reason. While
/// OpenSearch is down it retries and reports not ready; it never skips.
/// Stop it with SIGTERM or Ctrl-C: it finishes the batch, commits, and
/// leaves the group.
///
/// Environment: TIDEMARK_OPENSEARCH_PASSWORD (with opensearch.username),
/// TIDEMARK_OPENSEARCH_URL and TIDEMARK_KAFKA_BROKERS (override the file),
/// RUST_LOG (log filter, default info), TIDEMARK_LOG_FORMAT=json for JSON logs.
#[derive(Debug, Parser)]
#[command(name = "tidemark-consumer", version)]
struct Args {
    /// The deployment's TOML config file (see config/example.toml).
    #[arg(long, env = "TIDEMARK_CONFIG")]
    config: PathBuf,
    /// Check the config, OpenSearch and Kafka, create missing indices, then
    /// exit without consuming.
    #[arg(long)]
    check: bool,
    /// Print, as JSON, the mappings each table's index would be created
    /// with (typed from the columns the producer recorded in the state
    /// topic), then exit. Reads Kafka only; creates nothing.
    #[arg(long)]
    print_mappings: bool,
}

fn main() -> ExitCode {
    let binary = tidemark_process::Binary {
        name: "tidemark-consumer",
        default_log: "info",
        log_fatal: true,
    };
    binary.main(Args::parse, |args| async {
        try_main(args).await?;
        anyhow::Ok(ExitCode::SUCCESS)
    })
}

async fn try_main(args: Args) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("cannot read config file {}", args.config.display()))?;
    let config = Config::from_toml(&text, |name| std::env::var(name).ok())
        .with_context(|| format!("config file {}", args.config.display()))?;
    let config_dir = args
        .config
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    if args.print_mappings {
        let owned = config.clone();
        let progress =
            tokio::task::spawn_blocking(move || tidemark_consumer::indices::read_progress(&owned))
                .await??;
        let printed =
            tidemark_consumer::indices::print_mappings(&config, &config_dir, progress.as_ref())?;
        println!("{printed:#}");
        return Ok(());
    }
    let (search, mappings) = tidemark_consumer::run::prepare(&config, &config_dir).await?;

    if args.check {
        println!("config, OpenSearch and Kafka are ready for tidemark-consumer");
        return Ok(());
    }
    let metrics = Arc::new(Metrics::new(config.consumer.ready_max_lag_secs));
    let (stop, shutdown) = watch::channel(false);
    let listener = tokio::net::TcpListener::bind(&config.consumer.http_listen)
        .await
        .with_context(|| {
            format!(
                "consumer.http_listen: cannot listen on {}",
                config.consumer.http_listen
            )
        })?;
    let http = tokio::spawn(tidemark_consumer::http::serve(
        listener,
        metrics.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(async move {
        tidemark_process::wait_for_signal().await;
        info!("signal received; shutting down");
        let _ = stop.send(true);
    });
    let result = tidemark_consumer::run::run(config, search, mappings, metrics, shutdown).await;
    http.abort();
    Ok(result?)
}
