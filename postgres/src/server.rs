//! The server-side objects logical replication needs, checked and made:
//! that the server is a primary with logical WAL our role may replicate,
//! the publication, and the slot's state.

use tidemark_schemas::Lsn;
use tokio_postgres::Client;
use tracing::info;

use crate::catalog::{CatalogTable, quote_ident};
use crate::conn::ConnInfo;
use crate::error::{SourceError, query};

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

/// Makes sure the publication exists and covers every captured table,
/// creating or extending it when the config allows.
/// The tables (schema, name) `publication` streams now (none when it does
/// not exist).
pub async fn published_tables(
    client: &Client,
    publication: &str,
) -> Result<Vec<(String, String)>, SourceError> {
    Ok(client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(query("publication tables"))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

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
    let published = published_tables(client, publication).await?;
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
