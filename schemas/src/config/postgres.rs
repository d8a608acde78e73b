//! `[postgres]`: where the source database is and how to reach it.

use std::fmt;

use super::{ConfigError, Secret, invalid, redact_url};
use serde::Deserialize;

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Postgres {
    /// Connection URL of the primary, e.g.
    /// `postgres://tidemark_repl@db.internal:5432/shop`. Put the password in
    /// `TIDEMARK_PG_PASSWORD`, not here.
    pub url: String,
    #[serde(skip)]
    pub password: Option<Secret>,
}

impl fmt::Debug for Postgres {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Postgres")
            .field("url", &redact_url(&self.url))
            .field("password", &self.password)
            .finish()
    }
}

impl Postgres {
    /// The `[postgres]` constraints.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if !(self.url.starts_with("postgres://") || self.url.starts_with("postgresql://")) {
            return Err(invalid("postgres.url", "must be a postgres:// URL"));
        }
        Ok(())
    }
}
