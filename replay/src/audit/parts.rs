//! `audit --merge`: the JSON reports of one audit's parts (`--part I/N`,
//! see [`super::Part`]) added up into the report one process auditing the
//! whole table would have written: counts, rows, documents, causes and
//! dead letters summed; the drift's first and last time the earliest and
//! the latest; the timeline at one width; one suggestion per fix, a
//! window's bounds the union of the parts'; examples the first per kind in
//! key order. Every part of a split must be there, once: a missing part
//! would pass for a cleaner table.

use std::collections::BTreeMap;

use super::{Counts, Drift, EXAMPLES, Fix, Kind, Suggestion, TableReport, timeline};

/// The reports of `parts` (any tables, any order) merged, one per table.
pub fn merge_parts(parts: Vec<TableReport>) -> Result<Vec<TableReport>, String> {
    let mut by_table: BTreeMap<String, Vec<TableReport>> = BTreeMap::new();
    for report in parts {
        by_table
            .entry(report.table.clone())
            .or_default()
            .push(report);
    }
    by_table
        .into_iter()
        .map(|(table, reports)| merge_table(&table, reports))
        .collect()
}

fn merge_table(table: &str, reports: Vec<TableReport>) -> Result<TableReport, String> {
    let Some(of) = reports.first().and_then(|r| r.part).map(|p| p.of) else {
        return Err(format!(
            "table {table}: a report of the whole table; --merge takes the reports of an audit's \
             parts (audit --part I/N --format json)"
        ));
    };
    let mut seen = vec![false; of as usize];
    for r in &reports {
        let Some(part) = r.part.filter(|p| p.of == of) else {
            return Err(format!(
                "table {table}: the reports split it differently ({} and {})",
                reports[0]
                    .part
                    .map_or("whole".to_owned(), |p| p.to_string()),
                r.part.map_or("whole".to_owned(), |p| p.to_string())
            ));
        };
        if std::mem::replace(&mut seen[part.index as usize], true) {
            return Err(format!("table {table}: part {part} is given twice"));
        }
        if r.mode != reports[0].mode || r.index != reports[0].index {
            return Err(format!(
                "table {table}: part {part} audited {} ({}), another {} ({}): merge the parts of one audit",
                r.index, r.mode, reports[0].index, reports[0].mode
            ));
        }
    }
    let missing: Vec<String> = (0..of)
        .filter(|i| !seen[*i as usize])
        .map(|i| format!("{}/{of}", i + 1))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "table {table}: part {} missing; a merge without it would pass for a cleaner table",
            missing.join(", ")
        ));
    }

    let sum = |f: fn(&Counts) -> u64, pick: fn(&TableReport) -> &Counts| -> u64 {
        reports.iter().map(|r| f(pick(r))).sum()
    };
    let counts = |pick: fn(&TableReport) -> &Counts| Counts {
        missing: sum(|c| c.missing, pick),
        extra: sum(|c| c.extra, pick),
        stale: sum(|c| c.stale, pick),
    };
    let earliest = |times: Vec<&String>, latest: bool| -> Option<String> {
        let mut parsed: Vec<(jiff::Timestamp, &String)> = times
            .into_iter()
            .filter_map(|t| Some((t.parse().ok()?, t)))
            .collect();
        parsed.sort();
        let chosen = if latest {
            parsed.last()
        } else {
            parsed.first()
        };
        chosen.map(|(_, t)| (*t).clone())
    };
    let first_drift = earliest(
        reports
            .iter()
            .filter_map(|r| r.first_drift.as_ref())
            .collect(),
        false,
    );
    let last_drift = earliest(
        reports
            .iter()
            .filter_map(|r| r.last_drift.as_ref())
            .collect(),
        true,
    );
    let millis = |t: &Option<String>| {
        t.as_ref()
            .and_then(|t| t.parse::<jiff::Timestamp>().ok())
            .map(|t| t.as_millisecond())
    };
    let timelines: Vec<timeline::Timeline> = reports.iter().map(|r| r.timeline.clone()).collect();
    let timeline = match (millis(&first_drift), millis(&last_drift)) {
        (Some(first), Some(last)) => timeline::merged(&timelines, first, last),
        _ => timeline::Timeline::default(),
    };
    let causes = reports.iter().any(|r| r.causes.is_some()).then(|| {
        let mut all = BTreeMap::new();
        for (cause, n) in reports.iter().filter_map(|r| r.causes.as_ref()).flatten() {
            *all.entry(*cause).or_default() += n;
        }
        all
    });

    let mut fixes: BTreeMap<Fix, Suggestion> = BTreeMap::new();
    for s in reports.iter().flat_map(|r| &r.fixes) {
        match fixes.get_mut(&s.fix) {
            None => {
                fixes.insert(s.fix, s.clone());
            }
            Some(merged) => {
                merged.documents += s.documents;
                let from = earliest(
                    [&merged.from, &s.from].into_iter().flatten().collect(),
                    false,
                );
                let to = earliest([&merged.to, &s.to].into_iter().flatten().collect(), true);
                if let (Some(old_from), Some(old_to), Some(from), Some(to)) =
                    (&merged.from, &merged.to, &from, &to)
                {
                    merged.command = merged.command.replace(
                        &format!("--from {old_from} --to {old_to}"),
                        &format!("--from {from} --to {to}"),
                    );
                }
                merged.from = from;
                merged.to = to;
            }
        }
    }

    let mut examples: Vec<Drift> = reports.iter().flat_map(|r| r.examples.clone()).collect();
    examples.sort_by(|a, b| (a.kind, id_order(&a.id)).cmp(&(b.kind, id_order(&b.id))));
    let mut per_kind: BTreeMap<Kind, usize> = BTreeMap::new();
    examples.retain(|d| {
        let n = per_kind.entry(d.kind).or_default();
        *n += 1;
        *n <= EXAMPLES
    });

    let first = &reports[0];
    Ok(TableReport {
        table: table.to_owned(),
        index: first.index.clone(),
        mode: first.mode.clone(),
        rows: reports.iter().map(|r| r.rows).sum(),
        documents: reports.iter().map(|r| r.documents).sum(),
        counts: counts(|r| &r.counts),
        first_drift,
        last_drift,
        timeline,
        untimed: counts(|r| &r.untimed),
        causes,
        dead_lettered: reports.iter().map(|r| r.dead_lettered).sum(),
        fixes: fixes.into_values().collect(),
        examples,
        settled_on_recheck: reports.iter().map(|r| r.settled_on_recheck).sum(),
        sample: first.sample,
        since: first.since.clone(),
        part: None,
        drifted_keys: Vec::new(),
    })
}

/// Ids as their keys sort: numbers by value, the rest as text.
fn id_order(id: &str) -> (u8, i128, &str) {
    match id.parse::<i128>() {
        Ok(n) => (0, n, ""),
        Err(_) => (1, 0, id),
    }
}

#[cfg(test)]
mod tests {
    use super::super::Part;
    use super::*;

    fn part(index: u32, of: u32, missing: u64, from: &str, to: &str) -> TableReport {
        let json = serde_json::json!({
            "table": "public.t", "index": "t", "mode": "hash", "rows": 10, "documents": 9,
            "counts": {"missing": missing, "extra": 1, "stale": 0},
            "first_drift": from, "last_drift": to,
            "timeline": {"bucket_s": 10, "buckets": {from: {"missing": missing}}},
            "untimed": {"missing": 0, "extra": 1, "stale": 0},
            "causes": {"lost_in_apply": missing},
            "dead_lettered": 0,
            "fixes": [{"fix": "window", "documents": missing,
                       "command": format!("tidemark-replay window --from {from} --to {to} --table public.t --yes"),
                       "from": from, "to": to}],
            "examples": [{"kind": "missing", "id": format!("{}", 10 - index), "key": {"id": 10 - index}}],
            "settled_on_recheck": 0,
            "part": Part { index, of },
        });
        serde_json::from_value(json).expect("a part's report")
    }

    #[test]
    fn the_parts_of_a_split_add_up_to_one_report() {
        let merged = merge_parts(vec![
            part(1, 2, 3, "2026-12-04T10:00:20Z", "2026-12-04T10:00:40Z"),
            part(0, 2, 2, "2026-12-04T10:00:00Z", "2026-12-04T10:00:30Z"),
        ])
        .expect("merged");
        assert_eq!(merged.len(), 1);
        let m = &merged[0];
        assert_eq!((m.rows, m.documents), (20, 18));
        assert_eq!((m.counts.missing, m.counts.extra), (5, 2));
        assert_eq!(m.first_drift.as_deref(), Some("2026-12-04T10:00:00Z"));
        assert_eq!(m.last_drift.as_deref(), Some("2026-12-04T10:00:40Z"));
        assert_eq!(m.causes.as_ref().and_then(|c| c.values().next()), Some(&5));
        assert_eq!(m.fixes.len(), 1);
        assert_eq!(
            m.fixes[0].command,
            "tidemark-replay window --from 2026-12-04T10:00:00Z --to 2026-12-04T10:00:40Z --table public.t --yes"
        );
        assert_eq!(m.fixes[0].documents, 5);
        let buckets: u64 = m.timeline.buckets.values().flat_map(|k| k.values()).sum();
        assert_eq!(buckets, 5);
        let ids: Vec<&str> = m.examples.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["9", "10"]);
        assert_eq!(m.part, None);
    }

    #[test]
    fn a_missing_or_repeated_part_is_refused() {
        let missing = merge_parts(vec![part(
            0,
            3,
            1,
            "2026-12-04T10:00:00Z",
            "2026-12-04T10:00:00Z",
        )])
        .expect_err("parts 2 and 3 missing");
        assert!(missing.contains("part 2/3, 3/3 missing"), "{missing}");
        let twice = merge_parts(vec![
            part(0, 2, 1, "2026-12-04T10:00:00Z", "2026-12-04T10:00:00Z"),
            part(0, 2, 1, "2026-12-04T10:00:00Z", "2026-12-04T10:00:00Z"),
        ])
        .expect_err("twice");
        assert!(twice.contains("part 1/2 is given twice"), "{twice}");
        let other = merge_parts(vec![
            part(0, 2, 1, "2026-12-04T10:00:00Z", "2026-12-04T10:00:00Z"),
            part(1, 3, 1, "2026-12-04T10:00:00Z", "2026-12-04T10:00:00Z"),
        ])
        .expect_err("another split");
        assert!(other.contains("split it differently"), "{other}");
    }
}
