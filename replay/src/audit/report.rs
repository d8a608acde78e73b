//! An audit's reports: text for the terminal, and a self-contained HTML
//! page with the drift timeline.

use std::collections::BTreeMap;

use serde_json::Value;

use super::{Kind, TableReport};

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
            "{} -> {}: {} rows, {} documents: {} missing, {} extra, {} stale{}\n",
            r.table,
            r.index,
            r.rows,
            r.documents,
            r.counts.missing,
            r.counts.extra,
            r.counts.stale,
            if r.settled_on_recheck > 0 {
                format!(
                    " ({} changed while audited, consistent on re-check)",
                    r.settled_on_recheck
                )
            } else {
                String::new()
            }
        ));
        if r.drifted() == 0 {
            continue;
        }
        out.push_str("  when (hour, UTC)   missing  extra  stale\n");
        for (hour, kinds) in &r.timeline {
            let n = |k| kinds.get(&k).copied().unwrap_or(0);
            out.push_str(&format!(
                "  {hour:<17} {:>8} {:>6} {:>6}\n",
                n(Kind::Missing),
                n(Kind::Extra),
                n(Kind::Stale)
            ));
        }
        for e in &r.examples {
            out.push_str(&format!(
                "  {:<7} id {}  key {}{}\n",
                e.kind.as_str(),
                e.id,
                Value::Object(e.key.clone()),
                e.since
                    .as_deref()
                    .map(|s| format!("  since {s}"))
                    .unwrap_or_default()
            ));
        }
    }
    out
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
        out.push_str("<p>When the drifted rows last changed (per hour, UTC):</p>\n");
        out.push_str(&timeline_svg(&r.timeline));
        out.push_str(r#"<p class="legend"><span class="missing" style="background:#d9822b"></span>missing<span style="background:#7157d9"></span>extra<span style="background:#c23030"></span>stale</p>"#);
        out.push_str(
            "\n<table><tr><th>kind</th><th>document id</th><th>key</th><th>since</th></tr>\n",
        );
        for e in &r.examples {
            out.push_str(&format!(
                "<tr><td>{}</td><td><code>{}</code></td><td><code>{}</code></td><td>{}</td></tr>\n",
                e.kind.as_str(),
                escape(&e.id),
                escape(&Value::Object(e.key.clone()).to_string()),
                escape(e.since.as_deref().unwrap_or("unknown"))
            ));
        }
        out.push_str("</table>\n");
    }
    out.push_str("</body></html>\n");
    out
}

/// Stacked bars, one per hour, in an inline SVG.
pub(crate) fn timeline_svg(timeline: &BTreeMap<String, BTreeMap<Kind, u64>>) -> String {
    let bar = 36.0;
    let gap = 14.0;
    let height = 160.0;
    let top = timeline
        .values()
        .map(|k| k.values().sum::<u64>())
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let width = 60.0 + timeline.len() as f64 * (bar + gap);
    let mut svg = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{:.0}" role="img" aria-label="drift per hour">
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
        let label = match hour.get(5..) {
            Some(day_hour) if hour != "unknown" => format!("{day_hour}h"),
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
