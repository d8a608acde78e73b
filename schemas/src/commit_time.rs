//! The commit time's one rule: how an envelope's `commit_time` is written
//! (RFC 3339 in UTC with exactly six fractional digits, e.g.
//! `2026-11-22T10:15:00.123456Z`) and how it is read back (Kafka record
//! timestamps, window bounds, history). Every stage goes through here, so
//! the text form and its parse cannot drift apart.

/// The commit time of `unix` microseconds since the Unix epoch.
pub fn from_unix_micros(unix: i64) -> String {
    let seconds = unix.div_euclid(1_000_000);
    let micros = unix.rem_euclid(1_000_000);
    match jiff::Timestamp::from_second(seconds) {
        Ok(ts) => {
            let whole = ts.strftime("%Y-%m-%dT%H:%M:%S").to_string();
            format!("{whole}.{micros:06}Z")
        }
        // Out of jiff's range (year > 9999): cannot happen for a commit time.
        Err(_) => format!("{unix}us"),
    }
}

/// Now, as a commit time (the time of a snapshot's rows and markers).
pub fn now() -> String {
    from_unix_micros(jiff::Timestamp::now().as_microsecond())
}

/// Milliseconds since the Unix epoch of a commit time; `None` when the text
/// is not one.
pub fn unix_millis(commit_time: &str) -> Option<i64> {
    commit_time
        .parse::<jiff::Timestamp>()
        .ok()
        .map(|t| t.as_millisecond())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_with_six_digits_and_read_back() {
        let text = from_unix_micros(1_764_583_200_123_456);
        assert_eq!(text, "2025-12-01T10:00:00.123456Z");
        assert_eq!(unix_millis(&text), Some(1_764_583_200_123));
        assert_eq!(from_unix_micros(-1), "1969-12-31T23:59:59.999999Z");
        assert_eq!(unix_millis("not a time"), None);
    }
}
