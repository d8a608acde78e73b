//! The one error type of the PostgreSQL layer. Every message says what is
//! wrong and how to fix it, because the person reading it is an operator at
//! start-up, not a developer; none carries a password or a row's values.

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(
        "cannot connect to PostgreSQL at {url}: {}. Check postgres.url and TIDEMARK_PG_PASSWORD",
        pg_text(.source)
    )]
    Connect {
        url: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("postgres.url is not a valid connection URL: {0}")]
    Url(String),
    /// The URL's TLS parameters ask for what cannot be set up (a missing
    /// CA file, verify-full without a CA, ...).
    #[error("postgres.url: {0}")]
    Tls(String),
    #[error(
        "wal_level is '{0}', but logical replication needs 'logical'. Run ALTER SYSTEM SET wal_level = logical \
         (or set it in postgresql.conf) and restart PostgreSQL"
    )]
    WalLevel(String),
    #[error("{0} is a standby (in recovery). Point postgres.url at the primary")]
    Standby(String),
    #[error("role {0} may not replicate. Run ALTER ROLE {0} WITH REPLICATION (as a superuser)")]
    NoReplicationPrivilege(String),
    #[error("table {0} does not exist (check tables[].table and the schema name)")]
    NoSuchTable(String),
    #[error(
        "table {0} has no primary key, so its rows cannot be keyed. Add a primary key, or \
         ALTER TABLE {0} REPLICA IDENTITY USING INDEX <a unique index on NOT NULL columns>"
    )]
    NoKey(String),
    #[error(
        "role {role} cannot read table {table} (needed for the snapshot). Run GRANT SELECT ON {table} TO {role}"
    )]
    NoSelect { role: String, table: String },
    #[error(
        "role {role} cannot use schema {schema} (needed for the snapshot). Run GRANT USAGE ON SCHEMA {schema} TO {role}"
    )]
    NoSchemaUsage { role: String, schema: String },
    #[error(
        "publication {publication} does not exist and producer.create_publication is false. Create it: \
         CREATE PUBLICATION {publication} FOR TABLE {tables}"
    )]
    NoPublication { publication: String, tables: String },
    #[error(
        "publication {publication} does not include {table} and producer.create_publication is false. Run \
         ALTER PUBLICATION {publication} ADD TABLE {table}"
    )]
    NotPublished { publication: String, table: String },
    #[error(
        "cannot create or change publication {publication}: {}. Creating a publication for tables needs \
         their owner: run `{sql}` as the owner, or grant ownership", pg_text(.source)
    )]
    PublicationDenied {
        publication: String,
        sql: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(
        "replication slot {slot} was invalidated (PostgreSQL removed WAL it still needed, e.g. because of \
         max_slot_wal_keep_size); changes after {confirmed} are lost to it. Drop it with \
         SELECT pg_drop_replication_slot('{slot}'), restart the producer to take a new snapshot, then audit the index"
    )]
    SlotInvalidated { slot: String, confirmed: String },
    #[error(
        "replication slot {slot} is in use by process {pid}. One producer reads one slot; stop the other reader"
    )]
    SlotActive { slot: String, pid: i32 },
    #[error(
        "replication slot {slot} is not usable: {problem}. Use another producer.slot or drop it"
    )]
    SlotUnusable { slot: String, problem: String },
    #[error(
        "replication slot {slot} is missing and producer.create_slot is false. Create it with \
         SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput'), or allow create_slot"
    )]
    NoSlot { slot: String },
    #[error("PostgreSQL query failed ({what}): {}", pg_text(.source))]
    Query {
        what: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
}

/// The server's own message for a database error (tokio-postgres displays
/// only "db error"), else the error itself.
pub fn pg_text(error: &tokio_postgres::Error) -> String {
    use std::error::Error;
    match (error.as_db_error(), error.source()) {
        (Some(db), _) => format!("{}: {}", db.severity(), db.message()),
        (None, Some(cause)) => format!("{error}: {cause}"),
        (None, None) => error.to_string(),
    }
}

/// Whether `error` means the connection was lost (closed under us, or the
/// server shutting down or not yet accepting: SQLSTATE class 08 and
/// 57P01-57P03) rather than a query the server refused: an outage to wait
/// out, not a mistake to report.
pub fn connection_lost(error: &tokio_postgres::Error) -> bool {
    let code = error.code().map(|c| c.code()).unwrap_or_default();
    error.is_closed()
        || code.starts_with("08")
        || matches!(code, "57P01" | "57P02" | "57P03")
        || std::error::Error::source(error).is_some_and(|s| s.is::<std::io::Error>())
}

pub(crate) fn query(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> SourceError {
    move |source| SourceError::Query { what, source }
}
