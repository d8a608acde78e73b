//! PostgreSQL log sequence numbers.
//!
//! An LSN is a byte position in the write-ahead log. Tidemark uses the commit
//! LSN of a source transaction as the document version in OpenSearch
//! (DESIGN.md, invariant 2), so it must order exactly as PostgreSQL orders
//! it and survive a round trip through text without loss. PostgreSQL prints
//! it as two hexadecimal halves, `16/B374D848`; that is also our text form,
//! so a value can be pasted between `psql` and Tidemark.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A position in PostgreSQL's write-ahead log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The invalid LSN (`0/0`), which PostgreSQL uses for "none".
    pub const INVALID: Lsn = Lsn(0);

    /// The LSN as the integer OpenSearch takes for an external version.
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// Text that is not an LSN in PostgreSQL's `XXX/XXX` form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid LSN {input:?}: expected two hexadecimal halves like 16/B374D848")]
pub struct ParseLsnError {
    input: String,
}

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || ParseLsnError {
            input: s.to_owned(),
        };
        let (high, low) = s.split_once('/').ok_or_else(invalid)?;
        let is_half =
            |h: &str| !h.is_empty() && h.len() <= 8 && h.bytes().all(|b| b.is_ascii_hexdigit());
        if !is_half(high) || !is_half(low) {
            return Err(invalid());
        }
        let high = u64::from_str_radix(high, 16).map_err(|_| invalid())?;
        let low = u64::from_str_radix(low, 16).map_err(|_| invalid())?;
        Ok(Lsn((high << 32) | low))
    }
}

impl Serialize for Lsn {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_like_postgres() {
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
        assert_eq!(Lsn(0).to_string(), "0/0");
        assert_eq!(Lsn(u64::MAX).to_string(), "FFFFFFFF/FFFFFFFF");
    }

    #[test]
    fn parses_postgres_text_in_any_case() {
        assert_eq!("16/B374D848".parse(), Ok(Lsn(0x16_B374_D848)));
        assert_eq!("16/b374d848".parse(), Ok(Lsn(0x16_B374_D848)));
        assert_eq!("0/0".parse(), Ok(Lsn::INVALID));
    }

    #[test]
    fn rejects_what_postgres_would_reject() {
        for bad in [
            "",
            "16",
            "/1",
            "1/",
            "1/2/3",
            "G/0",
            "123456789/0",
            "1/ 2",
            "-1/0",
        ] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn text_round_trip_keeps_order() {
        let values = [
            0u64,
            1,
            0xFFFF_FFFF,
            0x1_0000_0000,
            0x16_B374_D848,
            u64::MAX,
        ];
        for pair in values.windows(2) {
            let a: Lsn = Lsn(pair[0]).to_string().parse().expect("round trip");
            let b: Lsn = Lsn(pair[1]).to_string().parse().expect("round trip");
            assert!(a < b, "{a} < {b}");
        }
    }

    #[test]
    fn serde_uses_the_text_form() {
        let json = serde_json::to_string(&Lsn(0x16_B374_D848)).expect("serialize");
        assert_eq!(json, "\"16/B374D848\"");
        let back: Lsn = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, Lsn(0x16_B374_D848));
        let err = serde_json::from_str::<Lsn>("\"nope\"").expect_err("must fail");
        assert!(err.to_string().contains("invalid LSN \"nope\""), "{err}");
    }
}
