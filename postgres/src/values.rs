//! PostgreSQL values (their text output, as pgoutput sends them) to JSON,
//! without loss.
//!
//! The replication session pins the settings that shape text output
//! (`DateStyle=ISO`, `TimeZone=UTC`, `IntervalStyle=iso_8601`,
//! `bytea_output=hex`, `extra_float_digits=3`; see `source`), so each type's
//! text has one known form:
//!
//! | PostgreSQL | JSON |
//! | --- | --- |
//! | bool | true / false |
//! | int2, int4, int8, oid | number |
//! | float4, float8 | number; `"NaN"`, `"Infinity"`, `"-Infinity"` as strings |
//! | numeric | string, exact (`"19.90"`, `"NaN"`) |
//! | bytea | base64 string |
//! | json, jsonb | nested JSON (numbers kept exact) |
//! | timestamptz | `"2026-11-22T10:15:00.123456Z"`-style string (UTC) |
//! | timestamp | `"2026-11-22T10:15:00.123456"` (no offset: it has none) |
//! | arrays of any of these | arrays, nested for more dimensions, `null` elements kept |
//! | enums, domains | as their label / base type |
//! | everything else (text, uuid, date, time, interval, inet, money, ranges, geometry, ...) | PostgreSQL's text output, as a string |
//!
//! The last row is the documented text fallback: nothing is guessed, the
//! value is exactly what PostgreSQL prints. Infinite and BC timestamps keep
//! PostgreSQL's text (`"infinity"`, `"... BC"`), which RFC 3339 cannot express.

use base64::Engine;
use serde_json::{Number, Value};

pub use tidemark_schemas::values::Mapping;

/// The mapping of a type described by its `pg_type` row: enums are their
/// labels, domains map as their base type, arrays as arrays of their
/// element, and anything else uses the text fallback.
pub fn catalog_mapping(entry: &TypeEntry, resolve: impl Fn(u32) -> Option<Mapping>) -> Mapping {
    match entry.typtype {
        b'e' => Mapping::Text,
        b'd' => resolve(entry.base_type).unwrap_or(Mapping::Text),
        _ if entry.category == b'A' && entry.element != 0 => {
            Mapping::Array(Box::new(resolve(entry.element).unwrap_or(Mapping::Text)))
        }
        _ => Mapping::Text,
    }
}

/// The parts of a `pg_type` row that decide a mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeEntry {
    pub oid: u32,
    /// `b` base, `c` composite, `d` domain, `e` enum, `p` pseudo, `r` range, `m` multirange.
    pub typtype: u8,
    /// `typcategory`; `A` for arrays.
    pub category: u8,
    /// `typelem` of an array type.
    pub element: u32,
    /// `typbasetype` of a domain.
    pub base_type: u32,
}

/// A value whose text did not have the form its type promises.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot map {mapping:?} value: {detail}")]
pub struct ValueError {
    pub mapping: Mapping,
    pub detail: String,
}

/// Maps one value's text to JSON.
///
/// An error describes the text (its length, what was expected), never the
/// text itself: it reaches logs and dead letters, which carry no row
/// contents.
pub fn to_json(mapping: &Mapping, text: &str) -> Result<Value, ValueError> {
    let size = text.len();
    let fail = |detail: String| ValueError {
        mapping: mapping.clone(),
        detail,
    };
    Ok(match mapping {
        Mapping::Bool => match text {
            "t" => Value::Bool(true),
            "f" => Value::Bool(false),
            _ => {
                return Err(fail(format!(
                    "expected t or f, got {size} bytes of other text"
                )));
            }
        },
        Mapping::Integer => {
            let n: i64 = text
                .parse()
                .map_err(|e| fail(format!("{e} ({size} bytes of text)")))?;
            Value::Number(n.into())
        }
        Mapping::Float => match text {
            "NaN" | "Infinity" | "-Infinity" => Value::String(text.to_owned()),
            _ => {
                let f: f64 = text
                    .parse()
                    .map_err(|e| fail(format!("{e} ({size} bytes of text)")))?;
                Number::from_f64(f)
                    .map(Value::Number)
                    .ok_or_else(|| fail("not a finite number".into()))?
            }
        },
        Mapping::Numeric | Mapping::Text => Value::String(text.to_owned()),
        Mapping::Bytea => {
            let hex = text
                .strip_prefix("\\x")
                .ok_or_else(|| fail("expected hex output (\\x...)".into()))?;
            let bytes = decode_hex(hex).ok_or_else(|| fail("invalid hex digits".into()))?;
            Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
        }
        Mapping::Json => {
            serde_json::from_str(text).map_err(|e| fail(format!("invalid JSON: {e}")))?
        }
        // PostgreSQL prints timestamps in ASCII; anything else is not one
        // (and the byte offsets in iso_timestamp assume ASCII).
        Mapping::Timestamp | Mapping::TimestampTz if !text.is_ascii() => {
            return Err(fail(format!("not a timestamp ({size} bytes, not ASCII)")));
        }
        Mapping::Timestamp => Value::String(iso_timestamp(text, false)),
        Mapping::TimestampTz => Value::String(iso_timestamp(text, true)),
        Mapping::Array(element) => parse_array(text, element).map_err(fail)?,
    })
}

/// `2026-11-22 10:15:00.123+00` -> `2026-11-22T10:15:00.123Z`; offsets
/// other than UTC get their `:MM`. Infinite and BC values keep PostgreSQL's
/// text, which ISO 8601 cannot express.
fn iso_timestamp(text: &str, with_zone: bool) -> String {
    if text.ends_with(" BC") || text.contains("infinity") || text.len() < 19 {
        return text.to_owned();
    }
    let mut out = text.replacen(' ', "T", 1);
    if with_zone {
        // The zone is the last `+HH`, `-HH`, `+HH:MM` or `+HH:MM:SS` after the time.
        if let Some(sign) = out[19..].find(['+', '-']).map(|i| i + 19) {
            let zone = out.split_off(sign);
            match zone.as_str() {
                "+00" | "-00" | "+00:00" => out.push('Z'),
                z if z.len() == 3 => {
                    out.push_str(z);
                    out.push_str(":00");
                }
                z => out.push_str(z),
            }
        }
    }
    out
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Parses an array literal such as `{1,NULL,3}`, `{{a,b},{c,d}}` or
/// `{"x,y","say \"hi\""}` (with an optional `[1:2]=` bounds prefix).
fn parse_array(text: &str, element: &Mapping) -> Result<Value, String> {
    let body = match text.strip_prefix('[') {
        Some(_) => text
            .split_once('=')
            .map(|(_, b)| b)
            .ok_or("bounds without '='")?,
        None => text,
    };
    let mut parser = ArrayParser {
        chars: body.chars().collect(),
        pos: 0,
    };
    let value = parser.array(element)?;
    if parser.pos != parser.chars.len() {
        return Err(format!("unexpected text after array at {}", parser.pos));
    }
    Ok(value)
}

struct ArrayParser {
    chars: Vec<char>,
    pos: usize,
}

impl ArrayParser {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn array(&mut self, element: &Mapping) -> Result<Value, String> {
        if self.peek() != Some('{') {
            return Err(format!("expected '{{' at {}", self.pos));
        }
        self.pos += 1;
        let mut items = Vec::new();
        if self.peek() == Some('}') {
            self.pos += 1;
            return Ok(Value::Array(items));
        }
        loop {
            let item = match self.peek() {
                Some('{') => self.array(element)?,
                Some('"') => {
                    let s = self.quoted()?;
                    to_json(element, &s).map_err(|e| e.detail)?
                }
                Some(_) => {
                    let start = self.pos;
                    while let Some(c) = self.peek() {
                        if c == ',' || c == '}' {
                            break;
                        }
                        self.pos += 1;
                    }
                    let raw: String = self.chars[start..self.pos].iter().collect();
                    let raw = raw.trim();
                    if raw.eq_ignore_ascii_case("NULL") {
                        Value::Null
                    } else {
                        to_json(element, raw).map_err(|e| e.detail)?
                    }
                }
                None => return Err("unterminated array".into()),
            };
            items.push(item);
            match self.peek() {
                Some(',') => self.pos += 1,
                Some('}') => {
                    self.pos += 1;
                    return Ok(Value::Array(items));
                }
                _ => return Err(format!("expected ',' or '}}' at {}", self.pos)),
            }
        }
    }

    fn quoted(&mut self) -> Result<String, String> {
        self.pos += 1; // opening quote
        let mut out = String::new();
        loop {
            match self.peek() {
                Some('"') => {
                    self.pos += 1;
                    return Ok(out);
                }
                Some('\\') => {
                    self.pos += 1;
                    let escaped = self.peek().ok_or("unterminated escape")?;
                    out.push(escaped);
                    self.pos += 1;
                }
                Some(c) => {
                    out.push(c);
                    self.pos += 1;
                }
                None => return Err("unterminated quoted element".into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn map(oid: u32, text: &str) -> Value {
        let mapping = Mapping::builtin(oid).unwrap_or_else(|| panic!("oid {oid} is built in"));
        to_json(&mapping, text).unwrap_or_else(|e| panic!("{oid} {text:?}: {e}"))
    }

    #[test]
    fn scalars() {
        assert_eq!(map(16, "t"), json!(true));
        assert_eq!(map(20, "-9223372036854775808"), json!(i64::MIN));
        assert_eq!(map(701, "1.5e+300"), json!(1.5e300));
        assert_eq!(map(701, "NaN"), json!("NaN"));
        assert_eq!(map(700, "-Infinity"), json!("-Infinity"));
        assert_eq!(
            map(1700, "12345678901234567890.000000000001"),
            json!("12345678901234567890.000000000001")
        );
        assert_eq!(map(17, "\\x48656c6c6f00ff"), json!("SGVsbG8A/w=="));
        assert_eq!(
            map(2950, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
        );
        assert_eq!(map(1186, "P1Y2M3DT4H5M6S"), json!("P1Y2M3DT4H5M6S"));
    }

    #[test]
    fn jsonb_is_nested_and_numbers_stay_exact() {
        let value = map(
            3802,
            r#"{"a": [1, 2.50], "big": 123456789012345678901234567890}"#,
        );
        assert_eq!(value["a"][1].to_string(), "2.50");
        assert_eq!(value["big"].to_string(), "123456789012345678901234567890");
    }

    #[test]
    fn timestamps() {
        assert_eq!(
            map(1184, "2026-11-22 10:15:00.123456+00"),
            json!("2026-11-22T10:15:00.123456Z")
        );
        assert_eq!(
            map(1184, "2026-11-22 10:15:00+05:30"),
            json!("2026-11-22T10:15:00+05:30")
        );
        assert_eq!(
            map(1184, "2026-11-22 10:15:00-08"),
            json!("2026-11-22T10:15:00-08:00")
        );
        assert_eq!(
            map(1114, "2026-11-22 10:15:00"),
            json!("2026-11-22T10:15:00")
        );
        assert_eq!(map(1184, "infinity"), json!("infinity"));
        assert_eq!(
            map(1114, "0044-03-15 12:00:00 BC"),
            json!("0044-03-15 12:00:00 BC")
        );
    }

    #[test]
    fn arrays() {
        assert_eq!(map(1007, "{1,NULL,3}"), json!([1, null, 3]));
        assert_eq!(map(1007, "{{1,2},{3,4}}"), json!([[1, 2], [3, 4]]));
        assert_eq!(
            map(1009, r#"{"a,b","say \"hi\"",NULL,"NULL",plain}"#),
            json!(["a,b", "say \"hi\"", null, "NULL", "plain"])
        );
        assert_eq!(map(1007, "{}"), json!([]));
        assert_eq!(map(1007, "[0:1]={5,6}"), json!([5, 6]));
        assert_eq!(
            map(1185, r#"{"2026-01-01 00:00:00+00"}"#),
            json!(["2026-01-01T00:00:00Z"])
        );
        assert_eq!(map(3807, r#"{"{\"a\": 1}"}"#), json!([{"a": 1}]));
    }

    #[test]
    fn enums_domains_and_unknown_types() {
        let resolve = |oid| Mapping::builtin(oid);
        let entry = |typtype, category, element, base_type| TypeEntry {
            oid: 90000,
            typtype,
            category,
            element,
            base_type,
        };
        assert_eq!(
            catalog_mapping(&entry(b'e', b'E', 0, 0), resolve),
            Mapping::Text
        );
        assert_eq!(
            catalog_mapping(&entry(b'd', b'N', 0, 23), resolve),
            Mapping::Integer
        );
        assert_eq!(
            catalog_mapping(&entry(b'b', b'A', 23, 0), resolve),
            Mapping::Array(Box::new(Mapping::Integer))
        );
        assert_eq!(
            catalog_mapping(&entry(b'r', b'R', 0, 0), resolve),
            Mapping::Text
        );
    }

    #[test]
    fn malformed_text_is_an_error_not_a_guess() {
        let bad = [
            (16, "yes"),
            (23, "1.5"),
            (17, "48"),
            (3802, "{"),
            (1007, "{1,2"),
            (1007, "{1}x"),
            // Found by the `values` fuzz target: a multi-byte character
            // across byte 19 made the zone search slice inside it.
            (1184, "2026-11-22 10:15:0\u{1e4}+00"),
            (1185, "{\"2026-11-22 10:15:0\u{1e4}+00\"}"),
        ];
        for (oid, text) in bad {
            let mapping = Mapping::builtin(oid).expect("built in");
            assert!(
                to_json(&mapping, text).is_err(),
                "{oid} {text:?} should fail"
            );
        }
    }

    #[test]
    fn errors_describe_the_text_never_repeat_it() {
        let canary = "canary-0c7e";
        for mapping in [
            Mapping::Bool,
            Mapping::Integer,
            Mapping::Float,
            Mapping::Bytea,
            Mapping::Json,
            Mapping::TimestampTz,
        ] {
            let text = format!("{canary}\u{e9}");
            let error = to_json(&mapping, &text).expect_err("not a value of the type");
            assert!(!error.to_string().contains(canary), "{mapping:?}: {error}");
        }
        let error = to_json(&Mapping::Integer, "12x").expect_err("not an integer");
        assert_eq!(
            error.to_string(),
            "cannot map Integer value: invalid digit found in string (3 bytes of text)"
        );
    }
}
