//! `backfill`: a table's existing rows (all of them, or those `--where`
//! selects) into its index: an index emptied or recreated, a mapping
//! changed, documents someone deleted; anything where the rows are right
//! and the index must be made to hold them, without stopping the pipeline.
//! (A table added to the config gets its rows from the producer, which
//! snapshots it at its next start: `tidemark_producer::snapshot`.)
//!
//! **Where the rows travel: straight into the index**, through window's
//! source-mode engine ([`crate::window::run_table`]), the one engine of
//! every write read from PostgreSQL: rows read at an exported snapshot and
//! written at its LSN as their version, vanished keys deleted again, the
//! run verified at a fresh snapshot. A live change carries a higher LSN, so
//! it wins in whichever order the two land, and a row deleted meanwhile
//! does not come back: the guarantees `window` proves. Not into Kafka as
//! snapshot events: appended to a topic while the producer streams, such
//! an event could land after a later delete of its key and, applied once
//! that delete's tombstone is forgotten (`index.gc_deletes`), resurrect
//! the row; only the producer can order snapshot events against the
//! stream. So the topic does not hold what a backfill wrote (`history` and
//! `window --mode log` see such a row from its next change).
//!
//! **Which rows.** The keys are read first, through a cursor in one
//! REPEATABLE READ, read-only transaction (so a `--where` cannot write),
//! into the external sort window's keys use (bounded memory: a table of
//! any size). The engine then reads each chunk's rows by key at its
//! snapshot, taken after. A row inserted between the two reads is not
//! among the keys and needs nothing: its insert streams through the
//! pipeline, which is why the table must be in the publication first
//! ([`in_publication`]). A row deleted between them is a key without a
//! row at the snapshot: a versioned delete, as in `window`.

use crate::error::{Context, Result};
use std::time::Instant;

use tidemark_index::mapping::TableMapping;
use tidemark_postgres::{key_values, quote_ident};
use tidemark_schemas::config::Config;
use tokio_postgres::{Client, SimpleQueryMessage};
use tracing::info;

use crate::audit::{describe, estimated_rows, open_cursor};
use crate::progress::Progress;
use crate::window::{KeySet, WindowKeys};

/// Keys fetched per round trip (a key is a few bytes).
const FETCH: usize = 10_000;

/// Whether the producer's publication streams `mapping`'s table: a row
/// inserted or changed while (and after) a backfill runs reaches the index
/// only that way.
pub async fn in_publication(
    client: &Client,
    config: &Config,
    mapping: &TableMapping,
) -> Result<bool> {
    let row = client
        .query_opt(
            "SELECT 1 FROM pg_publication_tables \
             WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
            &[
                &config.producer.publication,
                &mapping.schema,
                &mapping.table,
            ],
        )
        .await
        .with_context(|| format!("table {}: reading the publication", mapping.qualified()))?;
    Ok(row.is_some())
}

/// The keys (document id, key) of the table's rows that `filter` (SQL, a
/// `WHERE` condition) selects, or of every row.
pub async fn table_keys(
    client: &mut Client,
    mapping: &TableMapping,
    filter: Option<&str>,
) -> Result<WindowKeys> {
    let name = mapping.qualified();
    let d = describe(client, &mapping.schema, &mapping.table).await?;
    let columns: Vec<String> = d
        .key_index
        .iter()
        .map(|&i| quote_ident(&d.table.columns[i].0))
        .collect();
    let mut query = format!(
        "SELECT {} FROM {}.{}",
        columns.join(", "),
        quote_ident(&d.table.schema),
        quote_ident(&d.table.name)
    );
    if let Some(filter) = filter {
        query.push_str(&format!(" WHERE ({filter})"));
    }
    let estimate = if filter.is_none() {
        estimated_rows(client, &d).await
    } else {
        None
    };
    let progress = Progress::new(&format!("{name}: keys"), "rows", estimate);
    let started = Instant::now();
    let tx = open_cursor(client, &name, &query)
        .await
        .with_context(|| match filter {
            Some(filter) => format!("backfill --where {filter:?} on {name}"),
            None => format!("backfill of {name}"),
        })?;
    let fetch = format!("FETCH {FETCH} FROM tidemark_audit");
    let mut keys = KeySet::default();
    loop {
        let chunk = tx
            .simple_query(&fetch)
            .await
            .with_context(|| format!("table {name}: reading its keys"))?;
        let mut fetched = 0;
        for message in &chunk {
            if let SimpleQueryMessage::Row(row) = message {
                fetched += 1;
                let key = key_values(&d.table, &d.mappings, &d.key_index, row)?;
                keys.push(mapping.doc_id(&key)?, &key)?;
            }
        }
        progress.inc(fetched);
        if (fetched as usize) < FETCH {
            break;
        }
    }
    tx.batch_execute("CLOSE tidemark_audit")
        .await
        .with_context(|| format!("table {name}: closing the key cursor"))?;
    tx.commit()
        .await
        .with_context(|| format!("table {name}: ending the read's transaction"))?;

    progress.finish();
    info!(table = %name, keys = keys.count(), elapsed_ms = started.elapsed().as_millis() as u64, "backfill: keys read");
    keys.finish()
}
