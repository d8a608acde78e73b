//! When the producer waits instead of stopping: which errors an outage (or
//! a change too large to read) caused, and what `/readyz` says meanwhile.

use std::time::Duration;

use tidemark_postgres::{ConnInfo, SourceError};
use tidemark_schemas::config::Config;

use crate::run::RunError;
use crate::stream::StreamError;

/// Why the producer waits and reads again instead of stopping, for an error
/// that an outage (or a change too large to read) caused; `None` for an
/// error to stop on (misconfiguration fails fast at start-up). Once the
/// producer is reconnecting, a PostgreSQL that is still away (refusing
/// connections, starting up) is waited for too.
pub(crate) async fn wait_reason(
    config: &Config,
    error: &RunError,
    reconnecting: bool,
) -> Option<String> {
    match error {
        RunError::Stream(StreamError::Replication(e)) if e.is_message_too_large() => Some(format!(
            "cannot read the next change: {}",
            too_large_change(config, e).await
        )),
        RunError::Stream(StreamError::Replication(e)) | RunError::Replication(e) if e.is_io() => {
            Some(format!(
                "the replication connection to PostgreSQL broke ({e}); reconnecting"
            ))
        }
        RunError::Snapshot(e) if e.is_outage() => Some(format!(
            "PostgreSQL went away during a snapshot ({error}); reconnecting, then the snapshot \
             is taken again"
        )),
        RunError::Stream(StreamError::Snapshot(e)) if e.is_outage() => Some(format!(
            "PostgreSQL went away while a table was sent again after its shape changed \
             ({error}); reconnecting, then it is sent again"
        )),
        RunError::Source(SourceError::Connect { .. } | SourceError::Query { .. })
        | RunError::Stream(StreamError::Source(_))
        | RunError::Replication(_)
            if reconnecting =>
        {
            Some(format!(
                "PostgreSQL is not back yet ({error}); reconnecting"
            ))
        }
        _ => None,
    }
}

/// Which change was too large, as far as PostgreSQL can tell without
/// sending it: peeks the slot for the first change over the limit (its
/// size, LSN and table; never its contents).
async fn too_large_change(config: &Config, error: &pgwire_replication::PgWireError) -> String {
    let limit = config.producer.max_message_bytes;
    let fix = "raise producer.max_message_bytes (up to 1073741824), or make the row smaller";
    let found = async {
        let conn = ConnInfo::from_config(config).ok()?;
        let sql = conn.connect("tidemark-producer-peek").await.ok()?;
        // The slot is free once the ended session's walsender lets go.
        let mut tries = 0;
        while tries < 20
            && sql
                .query_opt(
                    "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active",
                    &[&config.producer.slot],
                )
                .await
                .ok()
                .flatten()
                .is_some()
        {
            tries += 1;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        // Only the first bytes leave the server: tag, then the relation OID
        // of an insert, update or delete (protocol version 1).
        let row = sql
            .query_opt(
                "SELECT lsn::text, length(data)::bigint, get_byte(data, 0), \
                        CASE WHEN get_byte(data, 0) IN (73, 85, 68) \
                             THEN (SELECT n.nspname || '.' || c.relname FROM pg_class c \
                                   JOIN pg_namespace n ON n.oid = c.relnamespace \
                                   WHERE c.oid = (get_byte(data, 1)::bigint << 24 | get_byte(data, 2) << 16 \
                                                  | get_byte(data, 3) << 8 | get_byte(data, 4))::oid) END \
                 FROM pg_logical_slot_peek_binary_changes($1, NULL, 100000, \
                      'proto_version', '1', 'publication_names', $2) \
                 WHERE length(data) > $3::bigint LIMIT 1",
                &[
                    &config.producer.slot,
                    &config.producer.publication,
                    &(limit as i64),
                ],
            )
            .await
            .map_err(|e| tracing::debug!(error = %e, "peeking the slot for the change too large"))
            .ok()??;
        let lsn: String = row.get(0);
        let bytes: i64 = row.get(1);
        let table: Option<String> = row.get(3);
        Some(format!(
            "a change of {bytes} bytes to table {} at LSN {lsn} is over producer.max_message_bytes ({limit})",
            table.as_deref().unwrap_or("(unknown)")
        ))
    }
    .await;
    match found {
        Some(what) => format!("{what}: {fix}"),
        None => format!("{error}, over producer.max_message_bytes ({limit}): {fix}"),
    }
}
