//! The PostgreSQL side, apart from the replication stream itself: the SQL
//! connection, the checks that fail fast on a misconfigured server, the
//! publication, the slot's state, and the catalog look-ups the decoder needs
//! (primary keys, column types).
//!
//! Every check's error says what is wrong and how to fix it, because the
//! person reading it is an operator at start-up, not a developer.

use std::collections::HashMap;

use tidemark_schemas::Lsn;
use tidemark_schemas::config::{Config, redact_url};
use tokio_postgres::{Client, NoTls};
use tracing::{info, warn};

use crate::values::{Mapping, TypeEntry};

/// Session settings that fix the text form of every value, so `values` can
/// map it exactly. The replication session and snapshot sessions use the
/// same ones, so snapshot rows and streamed rows look alike.
pub const SESSION_OPTIONS: &str = "-c DateStyle=ISO,MDY -c TimeZone=UTC -c IntervalStyle=iso_8601 \
     -c bytea_output=hex -c extra_float_digits=3";

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

fn query(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> SourceError {
    move |source| SourceError::Query { what, source }
}

/// Parsed connection settings, shared by the SQL and replication sessions.
#[derive(Clone)]
pub struct ConnInfo {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub database: String,
    /// The URL without its password, for messages.
    pub display: String,
}

impl std::fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display)
    }
}

impl ConnInfo {
    pub fn from_config(config: &Config) -> Result<ConnInfo, SourceError> {
        let url = &config.postgres.url;
        let parsed: tokio_postgres::Config =
            url.parse().map_err(|e| SourceError::Url(format!("{e}")))?;
        let host = match parsed.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "localhost".into(),
        };
        let password = match (&config.postgres.password, parsed.get_password()) {
            (Some(secret), _) => secret.0.clone(),
            (None, Some(p)) => String::from_utf8_lossy(p).into_owned(),
            (None, None) => String::new(),
        };
        let user = parsed.get_user().unwrap_or("postgres").to_owned();
        Ok(ConnInfo {
            host,
            port: parsed.get_ports().first().copied().unwrap_or(5432),
            database: parsed.get_dbname().unwrap_or(&user).to_owned(),
            user,
            password,
            display: redact_url(url),
        })
    }

    /// A new SQL session with the pinned output settings.
    pub async fn connect(&self, application: &str) -> Result<Client, SourceError> {
        let mut config = tokio_postgres::Config::new();
        config
            .host(&self.host)
            .port(self.port)
            .user(&self.user)
            .password(&self.password)
            .dbname(&self.database)
            .application_name(application)
            .options(SESSION_OPTIONS);
        let (client, connection) =
            config
                .connect(NoTls)
                .await
                .map_err(|source| SourceError::Connect {
                    url: self.display.clone(),
                    source,
                })?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                warn!(%error, "PostgreSQL connection ended");
            }
        });
        Ok(client)
    }
}

/// A captured table as the catalog describes it.
#[derive(Debug, Clone)]
pub struct CatalogTable {
    pub schema: String,
    pub name: String,
    pub oid: u32,
    /// Published columns (not dropped, not generated), in order, with type OIDs.
    pub columns: Vec<(String, u32)>,
    /// Primary-key (or replica-identity index) columns, in key order.
    pub key: Vec<String>,
}

impl CatalogTable {
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

/// Checks the server is a primary with logical WAL and that our role may
/// replicate. Returns the database name.
pub async fn check_server(client: &Client, conn: &ConnInfo) -> Result<(), SourceError> {
    let wal_level: String = client
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(query("SHOW wal_level"))?
        .get(0);
    if wal_level != "logical" {
        return Err(SourceError::WalLevel(wal_level));
    }
    let in_recovery: bool = client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .map_err(query("pg_is_in_recovery"))?
        .get(0);
    if in_recovery {
        return Err(SourceError::Standby(conn.display.clone()));
    }
    let can_replicate: bool = client
        .query_one(
            "SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(query("role privileges"))?
        .get(0);
    if !can_replicate {
        return Err(SourceError::NoReplicationPrivilege(conn.user.clone()));
    }
    Ok(())
}

/// Looks up a configured table: it must exist, be keyed, and be readable.
pub async fn describe_table(
    client: &Client,
    schema: &str,
    name: &str,
) -> Result<CatalogTable, SourceError> {
    let qualified = format!("{schema}.{name}");
    let row = client
        .query_opt(
            "SELECT c.oid, c.relreplident::text, has_table_privilege(c.oid, 'SELECT'), current_user::text,
                    has_schema_privilege(n.oid, 'USAGE')
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&schema, &name],
        )
        .await
        .map_err(query("look up table"))?
        .ok_or_else(|| SourceError::NoSuchTable(qualified.clone()))?;
    let oid: u32 = row.get(0);
    let can_select: bool = row.get(2);
    let can_use_schema: bool = row.get(4);
    if !can_use_schema {
        return Err(SourceError::NoSchemaUsage {
            role: row.get(3),
            schema: schema.to_owned(),
        });
    }
    if !can_select {
        return Err(SourceError::NoSelect {
            role: row.get(3),
            table: qualified,
        });
    }
    let columns = client
        .query(
            "SELECT attname::text, atttypid FROM pg_attribute
             WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped AND attgenerated = ''
             ORDER BY attnum",
            &[&oid],
        )
        .await
        .map_err(query("table columns"))?
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, u32>(1)))
        .collect();
    // The primary key, else the replica identity index.
    let key: Vec<String> = client
        .query(
            "SELECT a.attname::text
             FROM pg_index i
             CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, position)
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             WHERE i.indrelid = $1
               AND i.indexrelid = (SELECT indexrelid FROM pg_index
                                   WHERE indrelid = $1 AND (indisprimary OR indisreplident)
                                   ORDER BY indisprimary DESC LIMIT 1)
             ORDER BY k.position",
            &[&oid],
        )
        .await
        .map_err(query("primary key"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if key.is_empty() {
        return Err(SourceError::NoKey(qualified));
    }
    Ok(CatalogTable {
        schema: schema.to_owned(),
        name: name.to_owned(),
        oid,
        columns,
        key,
    })
}

/// Makes sure the publication exists and covers every captured table,
/// creating or extending it when the config allows.
pub async fn ensure_publication(
    client: &Client,
    publication: &str,
    tables: &[CatalogTable],
    may_create: bool,
) -> Result<(), SourceError> {
    let quoted = |t: &CatalogTable| format!("{}.{}", quote_ident(&t.schema), quote_ident(&t.name));
    let all = tables.iter().map(quoted).collect::<Vec<_>>().join(", ");
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(query("look up publication"))?
        .is_some();
    if !exists {
        let sql = format!(
            "CREATE PUBLICATION {} FOR TABLE {all}",
            quote_ident(publication)
        );
        if !may_create {
            return Err(SourceError::NoPublication {
                publication: publication.to_owned(),
                tables: all,
            });
        }
        client
            .batch_execute(&sql)
            .await
            .map_err(|source| SourceError::PublicationDenied {
                publication: publication.to_owned(),
                sql: sql.clone(),
                source,
            })?;
        info!(publication, tables = %all, "created publication");
        return Ok(());
    }
    let published: Vec<(String, String)> = client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(query("publication tables"))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for table in tables {
        if published
            .iter()
            .any(|(s, n)| *s == table.schema && *n == table.name)
        {
            continue;
        }
        if !may_create {
            return Err(SourceError::NotPublished {
                publication: publication.to_owned(),
                table: table.qualified(),
            });
        }
        let sql = format!(
            "ALTER PUBLICATION {} ADD TABLE {}",
            quote_ident(publication),
            quoted(table)
        );
        client
            .batch_execute(&sql)
            .await
            .map_err(|source| SourceError::PublicationDenied {
                publication: publication.to_owned(),
                sql: sql.clone(),
                source,
            })?;
        info!(publication, table = %table.qualified(), "added table to publication");
    }
    Ok(())
}

/// What the server says about our slot.
#[derive(Debug, Clone)]
pub struct SlotState {
    pub confirmed_flush: Lsn,
}

/// The slot's state, `None` if it does not exist; an error if it exists
/// but cannot be used safely.
pub async fn slot_state(
    client: &Client,
    slot: &str,
    database: &str,
) -> Result<Option<SlotState>, SourceError> {
    let Some(row) = client
        .query_opt(
            "SELECT plugin::text, slot_type, database::text, active, active_pid, wal_status,
                    confirmed_flush_lsn::text
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(query("look up slot"))?
    else {
        return Ok(None);
    };
    let unusable = |problem: String| SourceError::SlotUnusable {
        slot: slot.to_owned(),
        problem,
    };
    let plugin: Option<String> = row.get(0);
    let slot_type: String = row.get(1);
    let slot_database: Option<String> = row.get(2);
    let active: bool = row.get(3);
    let active_pid: Option<i32> = row.get(4);
    let wal_status: Option<String> = row.get(5);
    let confirmed: Option<String> = row.get(6);
    if slot_type != "logical" || plugin.as_deref() != Some("pgoutput") {
        return Err(unusable(format!(
            "it is a {slot_type} slot with plugin {plugin:?}, not pgoutput"
        )));
    }
    if slot_database.as_deref() != Some(database) {
        return Err(unusable(format!(
            "it belongs to database {slot_database:?}, not {database}"
        )));
    }
    let confirmed_text = confirmed.unwrap_or_else(|| "0/0".into());
    if wal_status.as_deref() == Some("lost") {
        return Err(SourceError::SlotInvalidated {
            slot: slot.to_owned(),
            confirmed: confirmed_text,
        });
    }
    if active {
        return Err(SourceError::SlotActive {
            slot: slot.to_owned(),
            pid: active_pid.unwrap_or(0),
        });
    }
    let confirmed_flush = confirmed_text
        .parse()
        .map_err(|e| unusable(format!("confirmed_flush_lsn: {e}")))?;
    Ok(Some(SlotState { confirmed_flush }))
}

/// Resolves type OIDs to mappings, asking the catalog for anything that is
/// not built in (enums, domains, arrays of those, extension types).
#[derive(Debug, Default)]
pub struct TypeResolver {
    cache: HashMap<u32, Mapping>,
}

impl TypeResolver {
    pub async fn mapping(&mut self, client: &Client, oid: u32) -> Result<Mapping, SourceError> {
        if let Some(m) = Mapping::builtin(oid).or_else(|| self.cache.get(&oid).cloned()) {
            return Ok(m);
        }
        // Walk domain and array chains; depth is bounded by the catalog.
        let mut chain = vec![oid];
        let mut entries = HashMap::new();
        while let Some(&next) = chain.last() {
            if entries.contains_key(&next) || Mapping::builtin(next).is_some() || chain.len() > 16 {
                break;
            }
            let Some(row) = client
                .query_opt(
                    "SELECT typtype::text, typcategory::text, typelem, typbasetype FROM pg_type WHERE oid = $1",
                    &[&next],
                )
                .await
                .map_err(query("look up type"))?
            else {
                break;
            };
            let first_byte = |s: String| s.bytes().next().unwrap_or(b'?');
            let entry = TypeEntry {
                oid: next,
                typtype: first_byte(row.get(0)),
                category: first_byte(row.get(1)),
                element: row.get(2),
                base_type: row.get(3),
            };
            let inner = if entry.typtype == b'd' {
                entry.base_type
            } else {
                entry.element
            };
            entries.insert(next, entry);
            if inner == 0 {
                break;
            }
            chain.push(inner);
        }
        // Resolve from the innermost type outwards.
        let mut resolved: HashMap<u32, Mapping> = HashMap::new();
        for oid in chain.iter().rev() {
            let mapping = match (Mapping::builtin(*oid), entries.get(oid)) {
                (Some(m), _) => m,
                (None, Some(entry)) => Mapping::from_catalog(entry, |o| {
                    resolved.get(&o).cloned().or_else(|| Mapping::builtin(o))
                }),
                (None, None) => Mapping::Text,
            };
            resolved.insert(*oid, mapping);
        }
        let mapping = resolved.remove(&oid).unwrap_or(Mapping::Text);
        self.cache.insert(oid, mapping.clone());
        Ok(mapping)
    }
}

/// Quotes an identifier for SQL text.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_identifiers() {
        assert_eq!(quote_ident("users"), "\"users\"");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
    }
}
