//! `audit`: each chosen table against its index, reported as text, JSON or
//! HTML; with `--repair`, the drifted keys go through `repair::repair_keys`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use tidemark_postgres::ConnInfo;
use tidemark_schemas::config::Config;

use crate::AuditFormat;
use crate::repair::repair_keys;

#[derive(Debug)]
pub struct AuditOptions {
    pub format: AuditFormat,
    pub out: Option<PathBuf>,
    pub recheck_after: u64,
    pub sample: Option<f64>,
    pub since: Option<jiff::Timestamp>,
    pub repair: bool,
    pub yes: bool,
    pub target_override: bool,
    pub deep: bool,
    pub causes: bool,
    /// How this program was started (`tidemark-replay --config F`), for
    /// the commands the report suggests.
    pub invocation: String,
    pub part: Option<tidemark_replay::audit::Part>,
}

pub async fn audit(
    config: &Config,
    tables: &[String],
    options: AuditOptions,
) -> anyhow::Result<ExitCode> {
    let AuditOptions {
        format,
        out,
        recheck_after,
        sample,
        since,
        repair,
        yes,
        target_override,
        deep,
        causes,
        invocation,
        part,
    } = options;
    crate::check_tables(config, tables)?;
    let search = tidemark_index::search::Search::connect(config.opensearch()?)?;
    search.info().await?;
    let mut client = ConnInfo::from_config(config)?
        .connect("tidemark-audit")
        .await?;
    let mappings = tidemark_index::mapping::Mappings::new(config);
    let mut reports = Vec::new();
    for (entry, mapping) in crate::chosen(config, &mappings, tables) {
        let target = tidemark_replay::audit::Target {
            mapping,
            time_column: entry.audit_time_column.as_deref(),
            sample,
            since,
            deep,
            kafka: causes.then_some(&config.kafka),
            invocation: &invocation,
            known: &[],
            part,
        };
        reports.push(
            tidemark_replay::audit::audit_table(
                &mut client,
                &search,
                &target,
                std::time::Duration::from_secs(recheck_after),
            )
            .await?,
        );
    }
    let drifted = written(&reports, format, out)?;
    if repair && drifted > 0 {
        return repair_drift(config, &reports, yes, target_override, deep).await;
    }
    Ok(drift_exit(drifted))
}

/// `audit --merge`: the parts' JSON reports as the whole table's report.
pub fn merge(
    files: &[PathBuf],
    format: AuditFormat,
    out: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let mut parts = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("--merge {}: cannot read", file.display()))?;
        #[derive(serde::Deserialize)]
        struct Report {
            tables: Vec<tidemark_replay::audit::TableReport>,
        }
        let report: Report = serde_json::from_str(&text).with_context(|| {
            format!(
                "--merge {}: not an audit's JSON report (audit --part I/N --format json)",
                file.display()
            )
        })?;
        parts.extend(report.tables);
    }
    let reports = tidemark_replay::audit::merge_parts(parts).map_err(anyhow::Error::msg)?;
    Ok(drift_exit(written(&reports, format, out)?))
}

/// Writes the report to `out` (else standard output); the documents that
/// drifted.
fn written(
    reports: &[tidemark_replay::audit::TableReport],
    format: AuditFormat,
    out: Option<PathBuf>,
) -> anyhow::Result<u64> {
    let text = rendered(reports, format);
    match out {
        Some(path) => std::fs::write(&path, text)
            .with_context(|| format!("--out {}: cannot write", path.display()))?,
        None => print!("{text}"),
    }
    Ok(reports.iter().map(|r| r.drifted()).sum())
}

/// Exit 0 clean, 1 drift.
fn drift_exit(drifted: u64) -> ExitCode {
    if drifted > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn rendered(reports: &[tidemark_replay::audit::TableReport], format: AuditFormat) -> String {
    match format {
        AuditFormat::Text => tidemark_replay::audit::render_text(reports),
        AuditFormat::Json => format!("{:#}\n", serde_json::json!({"tables": reports})),
        AuditFormat::Html => {
            tidemark_replay::audit::render_html(reports, &jiff::Timestamp::now().to_string())
        }
    }
}

/// Feeds the drifted documents to window's source mode, then checks them
/// again. Exit 0 when nothing drifts any more.
async fn repair_drift(
    config: &Config,
    reports: &[tidemark_replay::audit::TableReport],
    write: bool,
    target_override: bool,
    deep: bool,
) -> anyhow::Result<ExitCode> {
    let sets: Vec<(String, Vec<(String, tidemark_schemas::Row)>)> = reports
        .iter()
        .filter(|r| r.drifted() > 0)
        .map(|r| (r.table.clone(), r.drifted_keys.clone()))
        .collect();
    repair_keys(
        config,
        &sets,
        write,
        target_override,
        "audit --repair",
        "drifted documents",
        deep,
    )
    .await
}
