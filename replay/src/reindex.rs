//! `reindex`: a table's index rebuilt under its name with the mapping and
//! settings the config gives now (a shard count, a field type), while
//! searches and writes carry on. The steps, each a function here, the
//! binary running them in order:
//!
//! 1. [`plan`]: what the configured name stands for (a concrete index, or
//!    an alias with one index behind it) and the new physical index,
//!    `<name>-<n>`. A concrete index is *adopted*: its name becomes an
//!    alias, and a frozen copy of it (`<name>-0`) is kept.
//! 2. [`create_marked`]: the new index, created with the current mapping
//!    (`tidemark_index::derive`, from the catalog's column types now),
//!    settings and the pipeline stamp, then marked
//!    (`tidemark_index::alias::mark`). From then on every writer also
//!    writes there; the step returns once the mark has settled
//!    (`alias::MARK_SETTLE`), so every change committed afterwards reaches
//!    it (the rule `tidemark_index::alias` promises).
//! 3. The fill: `backfill`'s keys through window's source-mode engine into
//!    the new index, at a snapshot taken after the mark settled: rows as of
//!    the snapshot at its LSN, later changes from the writers. Verified by
//!    the engine, then audited as a whole (the binary).
//! 4. [`swap`]: writes to the old index are blocked (writers wait, as for
//!    any write block, and their copies to the new index carry on); once
//!    every bulk request that was running then has ended (each carried its
//!    copies, so the new index holds every write the old one took) and the
//!    new index is refreshed, one `_aliases` call points the name at it and
//!    drops the mark (and, when

//!    adopting, removes the concrete index, whose copy was made first). The
//!    old index (or the copy) stays, write-blocked, until dropped by hand.
//!
//! Search never sees the name missing, empty or half-filled: until the
//! swap it is the old index, after it the new one, filled and counted.

use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use tidemark_index::alias::{MARK_SETTLE, Target, mark};
use tidemark_index::mapping::TableMapping;
use tidemark_index::search::{Search, new_index_mappings};
use tidemark_schemas::config::Table;

use crate::error::{Context, ReplayError, Result};

/// What a reindex of one table will do.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The configured name: what searches and writers use.
    pub name: String,
    /// The index behind the name now.
    pub current: String,
    /// Whether the name is a concrete index, to be adopted.
    pub adopt: bool,
    /// Where a concrete index is copied before the name becomes an alias.
    pub copy: Option<String>,
    /// The new physical index.
    pub next: String,
    /// Its creation body (settings, mappings with the stamp in `_meta`).
    pub body: Value,
}

/// The physical indices' names, `<name>-<n>`: the next free `n` (from 1).
fn next_name(name: &str, existing: &[String]) -> String {
    let n = existing
        .iter()
        .filter_map(|i| i.strip_prefix(name)?.strip_prefix('-')?.parse::<u64>().ok())
        .max()
        .map_or(1, |n| n + 1);
    format!("{name}-{n}")
}

/// The indices whose names begin with `prefix`.
async fn named_like(search: &Search, prefix: &str) -> Result<Vec<String>> {
    let (_, answer) = search
        .call(
            tidemark_index::http::Method::Get,
            &format!("/{prefix}*/_settings/index.uuid?expand_wildcards=all"),
            None,
        )
        .await
        .with_context(|| format!("listing the indices named {prefix}*"))?;
    Ok(answer
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default())
}

/// Step 1: what the reindex of `mapping`'s index would do. `columns` are
/// the table's columns and type OIDs as the catalog has them now.
pub async fn plan(
    search: &Search,
    mapping: &TableMapping,
    table: &Table,
    config_dir: &std::path::Path,
    columns: &[(String, u32)],
) -> Result<Plan> {
    let name = mapping.index.clone();
    let (current, adopt) = match search.target(&name).await? {
        Target::Missing => {
            return Err(ReplayError::Refused(format!(
                "index {name} (table {}) does not exist: nothing to reindex; the consumer creates \
                 it with the current mapping at start",
                mapping.qualified()
            )));
        }
        Target::Concrete => (name.clone(), true),
        Target::Alias(behind) if behind.len() == 1 => (behind[0].clone(), false),
        Target::Alias(behind) => {
            return Err(ReplayError::Refused(format!(
                "alias {name} points at {} indices ({}): a table's index must be one; point it at \
                 one with POST /_aliases",
                behind.len(),
                behind.join(", ")
            )));
        }
    };
    let filling = search.aliased(&mark(&name)).await?;
    if !filling.is_empty() {
        return Err(ReplayError::Refused(format!(
            "a reindex of {name} is already filling {}: let it finish, or abandon it with \
             reindex --table {} --abandon --yes",
            filling.join(", "),
            mapping.qualified()
        )));
    }
    let existing = named_like(search, &format!("{name}-")).await?;
    let copy = adopt.then(|| format!("{name}-0"));
    if let Some(copy) = &copy
        && existing.contains(copy)
    {
        return Err(ReplayError::Refused(format!(
            "index {copy} exists, and adopting the concrete index {name} copies it there first: \
             delete or rename {copy}"
        )));
    }
    let next = next_name(&name, &existing);
    let mut mappings = new_index_mappings(mapping, table, config_dir, Some(columns))?;
    let mut meta: Map<String, Value> = tidemark_index::identity::meta(search, &name).await?;
    // Where `--rollback` goes back to: the index searches use now (for an
    // adopted one, its copy).
    let previous = copy.clone().unwrap_or_else(|| current.clone());
    meta.insert(
        REINDEX_META.into(),
        json!({"of": name, "previous": previous, "started": jiff::Timestamp::now().to_string()}),
    );
    mappings["_meta"] = Value::Object(meta);
    let mut body = json!({ "mappings": mappings });
    if let Some(settings) = &table.index_settings {
        body["settings"] = serde_json::to_value(settings).map_err(|e| {
            ReplayError::Refused(format!(
                "table {}: index_settings: {e}",
                mapping.qualified()
            ))
        })?;
    }
    Ok(Plan {
        name,
        current,
        adopt,
        copy,
        next,
        body,
    })
}

/// The index a reindex of `mapping`'s index is filling, if one is.
pub async fn filling(search: &Search, mapping: &TableMapping) -> Result<Option<String>> {
    let marked = search.aliased(&mark(&mapping.index)).await?;
    match marked.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(one.clone())),
        more => Err(ReplayError::Refused(format!(
            "alias {} marks {} indices ({}); a reindex fills one",
            mark(&mapping.index),
            more.len(),
            more.join(", ")
        ))),
    }
}

/// `--abandon`: the index a reindex is filling is unmarked, and deleted
/// once no writer can still hold the mark ([`MARK_SETTLE`] later), so no
/// late copy creates it again.
pub async fn abandon(search: &Search, mapping: &TableMapping, index: &str) -> Result<()> {
    search
        .update_aliases(vec![
            json!({"remove": {"index": index, "alias": mark(&mapping.index)}}),
        ])
        .await
        .with_context(|| format!("removing the mark of index {index}"))?;
    tokio::time::sleep(MARK_SETTLE).await;
    search
        .call(
            tidemark_index::http::Method::Delete,
            &format!("/{index}"),
            None,
        )
        .await
        .with_context(|| format!("deleting index {index}"))?;
    Ok(())
}

/// Where a reindexed index records what it replaced (`_meta`).
const REINDEX_META: &str = "tidemark_reindex";

/// Step 1 of `--rollback`: back to the index the last reindex replaced
/// (kept, write-blocked). It is filled again like a new one, so nothing
/// written since that reindex is lost; the mapping it has is its own.
/// A field whose type in a table's index is of another kind than the
/// table's columns give it now (`tidemark_index::derive::kind_of`): what a
/// reindex fixes, and what the consumer's writes wait on meanwhile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeConflict {
    pub field: String,
    /// Its type in the index now.
    pub indexed: String,
    /// Its type from the columns now.
    pub wanted: String,
}

/// The fields of `mapping`'s index that the table's `columns` (from the
/// catalog) would type of another kind; none when the index is missing.
pub async fn type_conflicts(
    search: &Search,
    mapping: &TableMapping,
    table: &Table,
    config_dir: &std::path::Path,
    columns: &[(String, u32)],
) -> Result<Vec<TypeConflict>> {
    use tidemark_index::derive::kind_of;
    let wanted = new_index_mappings(mapping, table, config_dir, Some(columns))?;
    let (status, answer) = search
        .call(
            tidemark_index::http::Method::Get,
            &format!("/{}/_mapping", mapping.index),
            None,
        )
        .await?;
    if status.as_u16() == 404 {
        return Ok(Vec::new());
    }
    let Some(indexed) = answer
        .as_object()
        .and_then(|indices| indices.values().next())
        .map(|i| &i["mappings"]["properties"])
    else {
        return Ok(Vec::new());
    };
    let type_of = |field: &Value| -> Option<String> {
        field.is_object().then(|| {
            field["type"]
                .as_str()
                .unwrap_or(if field.get("properties").is_some() {
                    "object"
                } else {
                    ""
                })
                .to_owned()
        })
    };
    let mut conflicts = Vec::new();
    for (field, want) in wanted["properties"].as_object().into_iter().flatten() {
        let (Some(want), Some(now)) = (type_of(want), type_of(&indexed[field])) else {
            continue;
        };
        if !want.is_empty() && !now.is_empty() && kind_of(&want) != kind_of(&now) {
            conflicts.push(TypeConflict {
                field: field.clone(),
                indexed: now,
                wanted: want,
            });
        }
    }
    Ok(conflicts)
}

pub async fn plan_rollback(search: &Search, mapping: &TableMapping) -> Result<Plan> {
    let name = mapping.index.clone();
    let current = match search.target(&name).await? {
        Target::Alias(behind) if behind.len() == 1 => behind[0].clone(),
        _ => {
            return Err(ReplayError::Refused(format!(
                "index {name} (table {}) is not an alias of one index: no reindex to roll back",
                mapping.qualified()
            )));
        }
    };
    let meta = tidemark_index::identity::meta(search, &current).await?;
    let Some(previous) = meta
        .get(REINDEX_META)
        .and_then(|m| m["previous"].as_str())
        .map(str::to_owned)
    else {
        return Err(ReplayError::Refused(format!(
            "index {current} (behind {name}) was not made by a reindex: nothing to roll back to"
        )));
    };
    if search.target(&previous).await? != Target::Concrete {
        return Err(ReplayError::Refused(format!(
            "index {previous}, which {current} replaced, is gone (dropped by hand?): nothing to \
             roll back to"
        )));
    }
    Ok(Plan {
        name,
        current,
        adopt: false,
        copy: None,
        next: previous,
        body: Value::Null,
    })
}

/// Step 2 of `--rollback`: lifts the write block of the index to go back
/// to and marks it, then waits for the mark to settle.
pub async fn mark_existing(search: &Search, plan: &Plan) -> Result<()> {
    search
        .block_writes(&plan.next, false)
        .await
        .with_context(|| format!("lifting the write block of index {}", plan.next))?;
    mark_and_settle(search, plan).await
}

/// Step 2: creates the new index, marks it, and waits for the mark to
/// settle. A refusal (a bad mapping or setting) names the index.
pub async fn create_marked(search: &Search, plan: &Plan) -> Result<()> {
    search
        .call(
            tidemark_index::http::Method::Put,
            &format!("/{}", plan.next),
            Some(plan.body.clone()),
        )
        .await
        .with_context(|| {
            format!(
                "creating index {} (check the table's index_settings and mappings)",
                plan.next
            )
        })?;
    search
        .wait_allocated(&plan.next)
        .await
        .with_context(|| format!("waiting for index {} to be allocated", plan.next))?;
    mark_and_settle(search, plan).await
}

async fn mark_and_settle(search: &Search, plan: &Plan) -> Result<()> {
    search
        .update_aliases(vec![
            json!({"add": {"index": plan.next, "alias": mark(&plan.name)}}),
        ])
        .await
        .with_context(|| format!("marking index {} as filling {}", plan.next, plan.name))?;
    tokio::time::sleep(MARK_SETTLE).await;
    Ok(())
}

/// What the swap saw.
#[derive(Debug, Clone, Copy)]
pub struct Swapped {
    /// Documents in the old index, frozen, and in the new one at the swap.
    pub before: u64,
    pub after: u64,
    /// How long writes to the name waited.
    pub blocked: Duration,
}

/// How long the swap waits for the bulk requests running when writes to
/// the old index were blocked.
const DRAIN: Duration = Duration::from_secs(60);

/// Step 4: blocks writes to the old index, waits until every bulk request
/// running then has finished (each carried its copies to the new index, so
/// the new one now holds every write the old one took), and moves the name
/// in one `_aliases` call. If they do not finish, writes are unblocked and
/// nothing moves.
pub async fn swap(search: &Search, plan: &Plan) -> Result<Swapped> {
    let started = Instant::now();
    let old = &plan.current;
    search
        .block_writes(old, true)
        .await
        .with_context(|| format!("blocking writes to index {old} for the swap"))?;
    let result = swap_blocked(search, plan).await;
    if result.is_err() {
        // Writers carry on into the old index; the new one stays marked.
        let _ = search.block_writes(old, false).await;
    }
    let (before, after) = result?;
    Ok(Swapped {
        before,
        after,
        blocked: started.elapsed(),
    })
}

async fn swap_blocked(search: &Search, plan: &Plan) -> Result<(u64, u64)> {
    let old = &plan.current;
    if let Some(copy) = &plan.copy {
        search
            .call(
                tidemark_index::http::Method::Post,
                &format!("/{old}/_clone/{copy}"),
                None,
            )
            .await
            .with_context(|| format!("copying index {old} to {copy} before adopting its name"))?;
        search
            .wait_allocated(copy)
            .await
            .with_context(|| format!("waiting for the copy {copy}"))?;
    }
    // A bulk listed after the block was acknowledged either started after
    // it (its writes to the old index fail and are retried, after the swap
    // into the new one) or before it: wait for those to end.
    let running = search.running_bulks().await?;
    let deadline = Instant::now() + DRAIN;
    loop {
        let still = search.running_bulks().await?;
        if !running.iter().any(|id| still.contains(id)) {
            break;
        }
        if Instant::now() > deadline {
            return Err(ReplayError::Refused(format!(
                "bulk requests running when writes to {old} were blocked had not finished after \
                 {}s: not swapped, writes to {old} unblocked; run reindex again",
                DRAIN.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    search.refresh(old).await?;
    search.refresh(&plan.next).await?;
    let before = search.count(old).await?;
    let after = search.count(&plan.next).await?;

    let mut actions = vec![
        json!({"remove": {"index": plan.next, "alias": mark(&plan.name)}}),
        json!({"add": {"index": plan.next, "alias": plan.name, "is_write_index": true}}),
    ];
    if plan.adopt {
        actions.push(json!({"remove_index": {"index": old}}));
    } else {
        actions.push(json!({"remove": {"index": old, "alias": plan.name}}));
    }
    search
        .update_aliases(actions)
        .await
        .with_context(|| format!("pointing {} at {}", plan.name, plan.next))?;
    Ok((before, after))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn physical_indices_are_numbered_after_the_highest() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(next_name("a", &[]), "a-1");
        assert_eq!(next_name("a", &names(&["a-0"])), "a-1");
        assert_eq!(
            next_name("a", &names(&["a-0", "a-3", "a-x", "ab-9"])),
            "a-4"
        );
    }
}
