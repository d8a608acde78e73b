//! `tidemark-producer`: streams row changes of the configured PostgreSQL
//! tables into Kafka, starting with a consistent snapshot.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tidemark_producer::metrics::Metrics;
use tidemark_schemas::config::Config;
use tokio::sync::watch;
use tracing::info;

/// Every event allocates a few small buffers on several threads; glibc's
/// allocator took about a quarter of the producer's CPU under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Streams row changes from PostgreSQL logical replication (pgoutput) into
/// Kafka, one topic per table, losing nothing: an LSN is confirmed to
/// PostgreSQL only after Kafka acknowledged every change before it.
///
/// On first start it creates the publication, the replication slot and the
/// topics (when the config allows) and sends a consistent snapshot of every
/// table. Stop it with SIGTERM or Ctrl-C: it stops reading, waits for Kafka,
/// confirms, and exits.
///
/// Environment: TIDEMARK_PG_PASSWORD (PostgreSQL password),
/// TIDEMARK_POSTGRES_URL and TIDEMARK_KAFKA_BROKERS (override the file),
/// RUST_LOG (log filter, default info), TIDEMARK_LOG_FORMAT=json for JSON logs.
#[derive(Debug, Parser)]
#[command(name = "tidemark-producer", version)]
struct Args {
    /// The deployment's TOML config file (see config/example.toml).
    #[arg(long, env = "TIDEMARK_CONFIG")]
    config: PathBuf,
    /// Check the config, PostgreSQL and Kafka, then exit without streaming.
    #[arg(long)]
    check: bool,
    /// When the change history has a gap (the slot is gone after it had
    /// streamed, another PostgreSQL cluster, a new timeline after a failover
    /// or restore), take a new snapshot of every table instead of refusing to
    /// start. The gap is recorded in the state topic, and each table gets a
    /// resnapshot marker after its rows, with which consumers remove the
    /// documents the new snapshot did not rewrite (rows deleted during the
    /// gap).
    #[arg(long)]
    resnapshot: bool,
    /// Remove another slot's record from the state topic, then exit: for a
    /// deployment gone for good that shared the state topic, whose record
    /// still claims its tables' topics (a producer refuses to start on
    /// topics another slot's record claims). Never this config's own slot.
    #[arg(long, value_name = "SLOT")]
    forget_slot: Option<String>,
}

fn main() -> ExitCode {
    let binary = tidemark_process::Binary {
        name: "tidemark-producer",
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
    if let Some(slot) = &args.forget_slot {
        tidemark_producer::run::forget_slot(&config, slot).await?;
        println!(
            "removed slot {slot}'s record from the state topic {}",
            config.kafka.state_topic()
        );
        return Ok(());
    }
    if args.check {
        tidemark_producer::run::check(&config).await?;
        println!("config, PostgreSQL and Kafka are ready for tidemark-producer");
        return Ok(());
    }
    let metrics = Arc::new(Metrics::default());
    let (stop, shutdown) = watch::channel(false);
    let listen = config
        .producer
        .http_listen
        .parse()
        .context("producer.http_listen")?;
    let http = tokio::spawn(tidemark_producer::http::serve(
        listen,
        metrics.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(async move {
        tidemark_process::wait_for_signal().await;
        info!("signal received; shutting down");
        let _ = stop.send(true);
    });
    let options = tidemark_producer::run::StartOptions {
        resnapshot: args.resnapshot,
    };
    let result = tidemark_producer::run::run_with(config, options, metrics, shutdown).await;
    http.abort();
    result.map_err(Into::into)
}
