//! Exported snapshots: a consistent view of the database whose LSN is known
//! exactly, so rows read in it can be written with that LSN as their
//! version (replay's source mode; the producer's own snapshot takes its
//! export from the slot it creates).

use pgwire_replication::ReplicationClient;
use tidemark_schemas::Lsn;

use crate::catalog::quote_ident;
use crate::conn::{ConnInfo, Replication};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("replication session: {0}")]
    Replication(#[from] pgwire_replication::PgWireError),
    #[error("CREATE_REPLICATION_SLOT for {slot} returned no {what}")]
    SlotCreation { slot: String, what: &'static str },
}

/// A consistent snapshot whose LSN is known exactly, for tools that read
/// rows and write them with that LSN as their version (replay's source
/// mode): a TEMPORARY logical slot created with an exported snapshot.
/// PostgreSQL keeps the snapshot importable (`SET TRANSACTION SNAPSHOT`)
/// while `session` is open and drops the slot when it closes.
pub struct ExportedSnapshot {
    pub session: ReplicationClient,
    pub name: String,
    pub lsn: Lsn,
    /// The server's timeline: with `lsn`, the version of rows read at it.
    pub timeline: u32,
}

impl ExportedSnapshot {
    /// Where it is consistent.
    pub fn point(&self) -> crate::rows::Point {
        crate::rows::Point {
            lsn: self.lsn,
            timeline: self.timeline,
        }
    }
}

impl std::fmt::Debug for ExportedSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportedSnapshot")
            .field("name", &self.name)
            .field("lsn", &self.lsn)
            .finish()
    }
}

/// The cluster's system identifier (IDENTIFY_SYSTEM), on a replication
/// session of its own set up as `session` says: what a pipeline's identity
/// names its PostgreSQL by (`tidemark_schemas::identity`). Needs only the
/// REPLICATION attribute the producer and replay need anyway.
pub async fn system_identifier(
    conn: &ConnInfo,
    session: &Replication<'_>,
) -> Result<String, ExportError> {
    let mut session = ReplicationClient::connect_gated(conn.replication(session)).await?;
    Ok(session.identify_system().await?.system_id)
}

/// Creates the temporary slot `slot` with an exported snapshot, on a
/// replication session set up as `session` says.
pub async fn export_snapshot(
    conn: &ConnInfo,
    session: &Replication<'_>,
    slot: &str,
) -> Result<ExportedSnapshot, ExportError> {
    let mut session = ReplicationClient::connect_gated(conn.replication(session)).await?;
    let timeline = session.identify_system().await?.timeline;
    let rows = session
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT {} TEMPORARY LOGICAL pgoutput (SNAPSHOT 'export')",
            quote_ident(slot)
        ))
        .await?;
    let text = |i: usize| {
        rows.first()
            .and_then(|row| row.get(i))
            .and_then(|v| v.as_ref())
            .map(|b| String::from_utf8_lossy(b).into_owned())
    };
    let lsn = text(1)
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| ExportError::SlotCreation {
            slot: slot.to_owned(),
            what: "consistent point",
        })?;
    let name = text(2).ok_or_else(|| ExportError::SlotCreation {
        slot: slot.to_owned(),
        what: "snapshot name",
    })?;
    Ok(ExportedSnapshot {
        session,
        name,
        lsn,
        timeline,
    })
}
