//! When drift began, at a resolution that fits its spread: a histogram of
//! drift times whose buckets are seconds for a burst of minutes, minutes
//! for hours, hours for days (at most [`MAX_BUCKETS`] buckets), and the
//! window of commit times a `window` run must cover to repair it.

use std::collections::BTreeMap;

use serde::Serialize;

use super::Kind;

/// Bucket widths tried, narrowest first.
const WIDTHS_S: [i64; 8] = [1, 10, 60, 600, 3_600, 6 * 3_600, 86_400, 7 * 86_400];
/// At most this many buckets between the first and the last drift time.
pub const MAX_BUCKETS: i64 = 60;

/// A drift histogram.
#[derive(Debug, Default, Clone, Serialize, serde::Deserialize)]
pub struct Timeline {
    /// Bucket width, in seconds.
    pub bucket_s: i64,
    /// Drift per bucket (keyed by the bucket's start, RFC 3339), by kind;
    /// buckets with no drift are left out.
    pub buckets: BTreeMap<String, BTreeMap<Kind, u64>>,
}

/// The narrowest width that spans `first..=last` in at most
/// [`MAX_BUCKETS`] buckets.
pub fn width_for(first_ms: i64, last_ms: i64) -> i64 {
    let spread_s = (last_ms - first_ms).max(0) / 1_000 + 1;
    WIDTHS_S
        .into_iter()
        .find(|w| (spread_s + w - 1) / w <= MAX_BUCKETS)
        .unwrap_or(WIDTHS_S[WIDTHS_S.len() - 1])
}

/// The histogram of `(kind, time)` drift at the width its spread needs.
pub fn histogram(times: &[(Kind, i64)]) -> Timeline {
    let (Some(first), Some(last)) = (
        times.iter().map(|(_, t)| *t).min(),
        times.iter().map(|(_, t)| *t).max(),
    ) else {
        return Timeline::default();
    };
    let bucket_s = width_for(first, last);
    let mut buckets: BTreeMap<String, BTreeMap<Kind, u64>> = BTreeMap::new();
    for (kind, ms) in times {
        let start_s = ms.div_euclid(1_000 * bucket_s) * bucket_s;
        let label = jiff::Timestamp::from_second(start_s)
            .map(|t| t.to_string())
            .unwrap_or_else(|_| start_s.to_string());
        *buckets.entry(label).or_default().entry(*kind).or_default() += 1;
    }
    Timeline { bucket_s, buckets }
}

/// A bucket width as people say it.
pub fn width_text(bucket_s: i64) -> String {
    match bucket_s {
        s if s % 86_400 == 0 => plural(s / 86_400, "day"),
        s if s % 3_600 == 0 => plural(s / 3_600, "hour"),
        s if s % 60 == 0 => plural(s / 60, "minute"),
        s => plural(s, "second"),
    }
}

fn plural(n: i64, unit: &str) -> String {
    if n == 1 {
        unit.to_owned()
    } else {
        format!("{n} {unit}s")
    }
}

/// The `--from`/`--to` of a window that covers commit times
/// `first..=last` (ms): whole seconds, the first rounded down and the last
/// rounded up past it, so `window`'s inclusive bounds hold both.
pub fn window_bounds(first_ms: i64, last_ms: i64) -> (String, String) {
    let text = |s: i64| {
        jiff::Timestamp::from_second(s)
            .map(|t| t.to_string())
            .unwrap_or_else(|_| s.to_string())
    };
    (
        text(first_ms.div_euclid(1_000)),
        text(last_ms.div_euclid(1_000) + 1),
    )
}

/// The timelines of an audit's parts as one, at the narrowest width that
/// spans `first_ms..=last_ms` in at most [`MAX_BUCKETS`] buckets and is no
/// narrower than any part's. Each width divides every wider one, so each of
/// a part's buckets falls inside exactly one merged bucket.
pub(crate) fn merged(timelines: &[Timeline], first_ms: i64, last_ms: i64) -> Timeline {
    let widest = timelines.iter().map(|t| t.bucket_s).max().unwrap_or(1);
    let needed = width_for(first_ms, last_ms).max(widest);
    let bucket_s = WIDTHS_S
        .into_iter()
        .find(|w| {
            *w >= needed
                && timelines
                    .iter()
                    .all(|t| t.bucket_s <= 0 || w % t.bucket_s == 0)
        })
        .unwrap_or(needed);
    let mut buckets: BTreeMap<String, BTreeMap<Kind, u64>> = BTreeMap::new();
    for timeline in timelines {
        for (label, kinds) in &timeline.buckets {
            let Ok(start) = label.parse::<jiff::Timestamp>() else {
                continue;
            };
            let start_s = start.as_second().div_euclid(bucket_s) * bucket_s;
            let label = jiff::Timestamp::from_second(start_s)
                .map(|t| t.to_string())
                .unwrap_or_else(|_| start_s.to_string());
            let merged = buckets.entry(label).or_default();
            for (kind, n) in kinds {
                *merged.entry(*kind).or_default() += n;
            }
        }
    }
    Timeline { bucket_s, buckets }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_resolution_fits_the_spread() {
        // A burst of two minutes: seconds would be 120 buckets, 10 s fits.
        assert_eq!(width_for(0, 120_000), 10);
        assert_eq!(width_for(0, 50_000), 1);
        assert_eq!(width_for(0, 3 * 3_600_000), 600);
        assert_eq!(width_for(0, 2 * 86_400_000), 3_600);
        assert_eq!(width_for(0, 30 * 86_400_000), 86_400);
        let t = histogram(&[
            (Kind::Stale, 1_500),
            (Kind::Missing, 1_900),
            (Kind::Stale, 30_200),
        ]);
        assert_eq!(t.bucket_s, 1);
        assert_eq!(t.buckets.len(), 2);
        assert_eq!(t.buckets["1970-01-01T00:00:01Z"][&Kind::Stale], 1);
        assert_eq!(t.buckets["1970-01-01T00:00:01Z"][&Kind::Missing], 1);
        assert_eq!(width_text(600), "10 minutes");
        assert_eq!(width_text(3_600), "hour");
    }

    #[test]
    fn window_bounds_hold_both_ends() {
        assert_eq!(
            window_bounds(1_500, 30_200),
            (
                "1970-01-01T00:00:01Z".to_owned(),
                "1970-01-01T00:00:31Z".to_owned()
            )
        );
    }
}
