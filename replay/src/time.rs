//! Times on the command line: RFC 3339 (`2026-11-22T10:00:00Z`,
//! `2026-11-22T12:00:00+02:00`) or relative to now (`-2h`, `-30m`, `-1d`,
//! `-90s`, `now`).

use jiff::{SignedDuration, Timestamp};

/// Parses a command-line time; `now` is passed in so tests are exact.
pub fn parse_time(text: &str, now: Timestamp) -> Result<Timestamp, String> {
    let text = text.trim();
    if text == "now" {
        return Ok(now);
    }
    if let Some(relative) = text.strip_prefix('-') {
        let split = relative
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(relative.len());
        let (number, unit) = relative.split_at(split);
        let n: i64 = number
            .parse()
            .map_err(|_| format!("{text:?}: expected a number before the unit, as in -2h"))?;
        let seconds = match unit {
            "s" => n,
            "m" => n * 60,
            "h" => n * 3600,
            "d" => n * 86_400,
            _ => {
                return Err(format!(
                    "{text:?}: the unit must be s, m, h or d, as in -2h"
                ));
            }
        };
        return now
            .checked_sub(SignedDuration::from_secs(seconds))
            .map_err(|e| format!("{text:?}: {e}"));
    }
    text.parse::<Timestamp>().map_err(|e| {
        format!("{text:?} is not a time: use RFC 3339 (2026-11-22T10:00:00Z) or a relative time (-2h): {e}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_and_relative_times() {
        let now: Timestamp = "2026-11-22T12:00:00Z".parse().expect("time");
        assert_eq!(
            parse_time("2026-11-22T12:00:00+02:00", now).expect("rfc3339"),
            "2026-11-22T10:00:00Z".parse::<Timestamp>().expect("time")
        );
        assert_eq!(
            parse_time("-2h", now).expect("relative"),
            "2026-11-22T10:00:00Z".parse::<Timestamp>().expect("time")
        );
        assert_eq!(
            parse_time("-1d", now).expect("relative"),
            "2026-11-21T12:00:00Z".parse::<Timestamp>().expect("time")
        );
        assert_eq!(parse_time("now", now).expect("now"), now);
        assert!(
            parse_time("-2w", now)
                .expect_err("unit")
                .contains("unit must be")
        );
        assert!(
            parse_time("yesterday", now)
                .expect_err("text")
                .contains("RFC 3339")
        );
    }
}
