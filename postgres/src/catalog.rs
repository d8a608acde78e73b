//! The catalog: what a captured table is (columns, types, key) and how
//! each type maps to JSON. The key rule lives here, once: a table's key is
//! its primary key, else its replica-identity index, in index order. The
//! producer keys events by it and the replay tools parse `--key` by it.

use std::collections::HashMap;

use tokio_postgres::Client;

use crate::error::{SourceError, query};
use crate::values::{Mapping, TypeEntry};

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
    let key: Vec<String> = key_columns(client, oid)
        .await?
        .into_iter()
        .map(|(name, _)| name)
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

/// The columns a statement reading `table` sees now, in order, with type
/// OIDs: the server's own parse of `SELECT *` on it (under the lock that
/// parse takes, held to the end of the transaction), less the generated
/// columns, which pgoutput does not send either.
///
/// The rule for every read of rows at a snapshot: take the column list
/// with this, inside the transaction that reads the rows, never from a
/// description taken before. Two things make an earlier one wrong:
/// - logical decoding sends a DDL's Relation message once its commit is
///   flushed to WAL, which can be before the committing session has made
///   it visible to others, so a `describe_table` on seeing it may still
///   read the old catalog;
/// - another DDL can commit between the snapshot's export and its read.
///
/// Either way the list names a column gone (the read fails) or misses a new
/// one (the documents silently lack it).
pub async fn read_columns(
    client: &Client,
    table: &CatalogTable,
) -> Result<Vec<(String, u32)>, SourceError> {
    let qualified = format!(
        "{}.{}",
        quote_ident(&table.schema),
        quote_ident(&table.name)
    );
    let parsed = client
        .prepare(&format!("SELECT * FROM {qualified}"))
        .await
        .map_err(query("table columns as read"))?;
    let generated: Vec<String> = client
        .query(
            "SELECT attname::text FROM pg_attribute
             WHERE attrelid = $1::text::regclass AND attnum > 0 AND attgenerated <> ''",
            &[&qualified],
        )
        .await
        .map_err(query("generated columns"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(parsed
        .columns()
        .iter()
        .filter(|c| !generated.iter().any(|g| g == c.name()))
        .map(|c| (c.name().to_owned(), c.type_().oid()))
        .collect())
}

/// The key of the table with `oid`: its primary key, else its replica
/// identity index; each column with its type's name (`int4`, `text`, ...),
/// in key order. Empty when the table has neither.
async fn key_columns(client: &Client, oid: u32) -> Result<Vec<(String, String)>, SourceError> {
    Ok(client
        .query(
            "SELECT a.attname::text, t.typname::text
             FROM pg_index i
             CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, position)
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             JOIN pg_type t ON t.oid = a.atttypid
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
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// The key of `schema.table` by the one key rule (see the module), each
/// column with its type's name, for tools that only need the key (no
/// SELECT privilege is checked). `NoSuchTable` / `NoKey` name the table.
pub async fn table_key(
    client: &Client,
    schema: &str,
    table: &str,
) -> Result<Vec<(String, String)>, SourceError> {
    let qualified = format!("{schema}.{table}");
    let oid: u32 = client
        .query_opt(
            "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&schema, &table],
        )
        .await
        .map_err(query("look up table"))?
        .ok_or_else(|| SourceError::NoSuchTable(qualified.clone()))?
        .get(0);
    let key = key_columns(client, oid).await?;
    if key.is_empty() {
        return Err(SourceError::NoKey(qualified));
    }
    Ok(key)
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
                (None, Some(entry)) => crate::values::catalog_mapping(entry, |o| {
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
