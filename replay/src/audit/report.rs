//! An audit's reports: text for the terminal, and a self-contained HTML
//! page with the drift timeline.

use std::collections::BTreeMap;

use serde_json::Value;

use super::timeline::width_text;
use super::{Cause, Fix, Kind, TableReport};

/// The terminal summary.
pub fn render_text(reports: &[TableReport]) -> String {
    let mut out = String::new();
    for r in reports {
        if let Some(fraction) = r.sample {
            out.push_str(&format!(
                "{}: SAMPLED, about {:.1}% of rows and documents checked; counts are of the sample\n",
                r.table,
                fraction * 100.0
            ));
        }
        if let Some(since) = &r.since {
            out.push_str(&format!("{}: only rows changed since {since}\n", r.table));
        }
        out.push_str(&format!(
            "{} -> {}: {} rows, {} documents: {} missing, {} extra, {} stale ({} check{})\n",
            r.table,
            r.index,
            r.rows,
            r.documents,
            r.counts.missing,
            r.counts.extra,
            r.counts.stale,
            mode_text(&r.mode),
            if r.settled_on_recheck > 0 {
                format!(
                    "; {} changed while audited, consistent on re-check",
                    r.settled_on_recheck
                )
            } else {
                String::new()
            }
        ));
        if r.drifted() == 0 {
            continue;
        }
        if let (Some(first), Some(last)) = (&r.first_drift, &r.last_drift) {
            out.push_str(&format!("  drift from {first} to {last}\n"));
        }
        if let Some(causes) = &r.causes {
            out.push_str(&format!(
                "  causes: {}\n",
                causes_text(causes, r.dead_lettered)
            ));
        }
        out.push_str(&format!(
            "  when ({}, UTC)          missing  extra  stale\n",
            width_text(r.timeline.bucket_s.max(1))
        ));
        let n = |kinds: &BTreeMap<Kind, u64>, k| kinds.get(&k).copied().unwrap_or(0);
        for (start, kinds) in &r.timeline.buckets {
            out.push_str(&format!(
                "  {start:<24} {:>8} {:>6} {:>6}\n",
                n(kinds, Kind::Missing),
                n(kinds, Kind::Extra),
                n(kinds, Kind::Stale)
            ));
        }
        if r.untimed.total() > 0 {
            out.push_str(&format!(
                "  {:<24} {:>8} {:>6} {:>6}\n",
                "no time", r.untimed.missing, r.untimed.extra, r.untimed.stale
            ));
        }
        out.push_str("  repair:\n");
        for fix in &r.fixes {
            out.push_str(&format!(
                "    {} ({}):\n      {}\n",
                documents(fix.documents),
                fix_text(fix.fix, r),
                fix.command
            ));
        }
        for e in &r.examples {
            out.push_str(&format!(
                "  {:<7} id {}  key {}{}{}{}\n",
                e.kind.as_str(),
                e.id,
                Value::Object(e.key.clone()),
                e.since
                    .as_deref()
                    .map(|s| format!("  since {s}"))
                    .unwrap_or_default(),
                e.cause
                    .map(|c| format!("  {}", c.as_str()))
                    .unwrap_or_default(),
                e.dead_letter
                    .as_deref()
                    .map(|reason| format!(" (dead-lettered: {})", short(reason)))
                    .unwrap_or_default()
            ));
        }
    }
    out
}

fn documents(n: u64) -> String {
    if n == 1 {
        "1 document".to_owned()
    } else {
        format!("{n} documents")
    }
}

fn mode_text(mode: &str) -> &'static str {
    match mode {
        "deep" => "deep: content",
        _ => "stored hash",
    }
}

/// `7 lost in apply (2 dead-lettered), 1 missed delete`.
pub(crate) fn causes_text(causes: &BTreeMap<Cause, u64>, dead_lettered: u64) -> String {
    let mut parts: Vec<String> = causes
        .iter()
        .map(|(cause, n)| format!("{n} {}", cause.as_str()))
        .collect();
    if dead_lettered > 0 {
        parts.push(format!("{dead_lettered} of them dead-lettered"));
    }
    if parts.is_empty() {
        return "none".to_owned();
    }
    parts.join(", ")
}

/// What a fix repairs, in words, with the causes it covers.
pub(crate) fn fix_text(fix: Fix, r: &TableReport) -> String {
    let causes: Vec<&str> = r
        .causes
        .iter()
        .flat_map(|c| c.keys())
        .filter(|c| c.fix() == fix)
        .map(|c| c.as_str())
        .collect();
    let what = match fix {
        Fix::Window => "changes Kafka still holds: replay their window".to_owned(),
        Fix::AuditRepair => "re-read their rows".to_owned(),
        Fix::CheckWriters => format!(
            "written by someone else: find what else writes to index {} (a partial _update, a hand fix, a second service), then rewrite them",
            r.index
        ),
    };
    if causes.is_empty() {
        what
    } else {
        format!("{}; {what}", causes.join(", "))
    }
}

/// A dead-letter reason, cut for a line.
fn short(reason: &str) -> String {
    const MAX: usize = 120;
    if reason.chars().count() <= MAX {
        return reason.to_owned();
    }
    let cut: String = reason.chars().take(MAX).collect();
    format!("{cut}...")
}

pub(crate) fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A self-contained HTML report (no external assets): per-table counts, the
/// drift timeline as an SVG bar chart, example keys.
pub fn render_html(reports: &[TableReport], generated_at: &str) -> String {
    let drifted: u64 = reports.iter().map(TableReport::drifted).sum();
    let mut out = String::new();
    out.push_str(&format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Tidemark audit: {verdict}</title>
<style>
body {{ font: 15px/1.45 system-ui, sans-serif; margin: 2rem; color: #1d2733; max-width: 72rem; }}
code {{ word-break: break-all; }}
h1 {{ font-size: 1.6rem; margin-bottom: .2rem; }}
.verdict {{ display: inline-block; padding: .2rem .7rem; border-radius: .3rem; font-weight: 600; color: #fff; background: {color}; }}
table {{ border-collapse: collapse; margin: .8rem 0 1.5rem; }}
th, td {{ border-bottom: 1px solid #d8dee6; padding: .3rem .8rem; text-align: left; }}
td.n {{ text-align: right; font-variant-numeric: tabular-nums; }}
code {{ font-size: .9em; }}
.missing {{ fill: #d9822b; }} .extra {{ fill: #7157d9; }} .stale {{ fill: #c23030; }}
.legend span {{ display: inline-block; width: .8rem; height: .8rem; margin: 0 .3rem 0 1rem; vertical-align: middle; }}
</style></head><body>
<h1>Tidemark audit</h1>
<p>Generated {generated}. <span class="verdict">{verdict}</span></p>
<table><tr><th>table</th><th>index</th><th>rows</th><th>documents</th><th>missing</th><th>extra</th><th>stale</th></tr>
"#,
        verdict = if drifted == 0 { "clean".to_owned() } else { format!("{drifted} documents drifted") },
        color = if drifted == 0 { "#2b8a3e" } else { "#c23030" },
        generated = escape(generated_at),
    ));
    for r in reports {
        out.push_str(&format!(
            "<tr><td><code>{}</code></td><td><code>{}</code></td><td class=n>{}</td><td class=n>{}</td><td class=n>{}</td><td class=n>{}</td><td class=n>{}</td></tr>\n",
            escape(&r.table), escape(&r.index), r.rows, r.documents, r.counts.missing, r.counts.extra, r.counts.stale
        ));
    }
    out.push_str("</table>\n");
    for r in reports.iter().filter(|r| r.drifted() > 0) {
        out.push_str(&format!("<h2>{}</h2>\n", escape(&r.table)));
        if let Some(fraction) = r.sample {
            out.push_str(&format!(
                "<p><strong>Sampled:</strong> about {:.1}% of rows and documents were checked; counts are of the sample.</p>\n",
                fraction * 100.0
            ));
        }
        if let (Some(first), Some(last)) = (&r.first_drift, &r.last_drift) {
            out.push_str(&format!(
                "<p>Drift from <strong>{}</strong> to <strong>{}</strong> ({} check).</p>\n",
                escape(first),
                escape(last),
                mode_text(&r.mode)
            ));
        }
        if let Some(causes) = &r.causes {
            out.push_str(&format!(
                "<p>Causes: {}.</p>\n",
                escape(&causes_text(causes, r.dead_lettered))
            ));
        }
        out.push_str("<p>Repair:</p>\n<ul>\n");
        for fix in &r.fixes {
            out.push_str(&format!(
                "<li>{} ({}):<br><code>{}</code></li>\n",
                documents(fix.documents),
                escape(&fix_text(fix.fix, r)),
                escape(&fix.command)
            ));
        }
        out.push_str("</ul>\n");
        out.push_str(&format!(
            "<p>When the drift began (per {}, UTC{}):</p>\n",
            width_text(r.timeline.bucket_s.max(1)),
            if r.untimed.total() > 0 {
                format!("; {} with no time", documents(r.untimed.total()))
            } else {
                String::new()
            }
        ));
        out.push_str(&timeline_svg(&r.timeline.buckets));
        out.push_str(r#"<p class="legend"><span class="missing" style="background:#d9822b"></span>missing<span style="background:#7157d9"></span>extra<span style="background:#c23030"></span>stale</p>"#);
        out.push_str(
            "\n<table><tr><th>kind</th><th>document id</th><th>key</th><th>since</th><th>cause</th></tr>\n",
        );
        for e in &r.examples {
            out.push_str(&format!(
                "<tr><td>{}</td><td><code>{}</code></td><td><code>{}</code></td><td>{}</td><td>{}{}</td></tr>\n",
                e.kind.as_str(),
                escape(&e.id),
                escape(&Value::Object(e.key.clone()).to_string()),
                escape(e.since.as_deref().unwrap_or("no time")),
                e.cause.map_or("-", |c| c.as_str()),
                e.dead_letter
                    .as_deref()
                    .map(|r| format!(" (dead-lettered: {})", escape(&short(r))))
                    .unwrap_or_default()
            ));
        }
        out.push_str("</table>\n");
    }
    out.push_str("</body></html>\n");
    out
}

/// Stacked bars, one per hour, in an inline SVG.
pub(crate) fn timeline_svg(timeline: &BTreeMap<String, BTreeMap<Kind, u64>>) -> String {
    // Up to 60 buckets: narrower bars when there are many.
    let bar = (900.0 / timeline.len().max(1) as f64).clamp(8.0, 36.0);
    let gap = (bar * 0.4).round();
    let height = 160.0;
    let top = timeline
        .values()
        .map(|k| k.values().sum::<u64>())
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let width = 60.0 + timeline.len() as f64 * (bar + gap);
    let mut svg = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{:.0}" role="img" aria-label="drift over time">
<line x1="40" y1="{height:.0}" x2="{width:.0}" y2="{height:.0}" stroke="#8a96a3"/>
<text x="4" y="14" font-size="12">{top:.0}</text><text x="4" y="{height:.0}" font-size="12">0</text>
"##,
        height + 50.0
    );
    for (i, (hour, kinds)) in timeline.iter().enumerate() {
        let x = 48.0 + i as f64 * (bar + gap);
        let mut y = height;
        for kind in [Kind::Missing, Kind::Extra, Kind::Stale] {
            let n = kinds.get(&kind).copied().unwrap_or(0);
            if n == 0 {
                continue;
            }
            let h = (n as f64 / top) * (height - 20.0);
            y -= h;
            svg.push_str(&format!(
                r#"<rect class="{}" x="{x:.1}" y="{y:.1}" width="{bar:.0}" height="{h:.1}"><title>{} {}: {n}</title></rect>
"#,
                kind.as_str(),
                escape(hour),
                kind.as_str()
            ));
        }
        // `2026-11-22T10:01:00Z` shows as `11-22 10:01:00`.
        let label = match (hour.get(5..10), hour.get(11..19)) {
            (Some(day), Some(time)) => format!("{day} {time}"),
            _ => hour.clone(),
        };
        svg.push_str(&format!(
            r#"<text x="{:.1}" y="{:.0}" font-size="11" transform="rotate(35 {:.1} {:.0})">{}</text>
"#,
            x,
            height + 14.0,
            x,
            height + 14.0,
            escape(&label)
        ));
    }
    svg.push_str("</svg>\n");
    svg
}
