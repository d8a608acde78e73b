//! The index side of an audit: every id of an index, scrolled in id order
//! (`tidemark_index::reads`) and sorted on disk for the merge; reads by id
//! and hash are `tidemark_index::reads` too.

use crate::error::{Context, Result};
use std::time::Instant;

use opensearch::OpenSearch;
use serde_json::json;
use tidemark_index::mapping::document_digest;
use tidemark_index::reads::{Fetch, IdScroll};
use tracing::info;

use super::{PROGRESS_EVERY, SCROLL_PAGE};
use crate::merge::{Entry, Sorter};
use crate::progress::Progress;

/// Every document of the index as (id, content hash), sorted by id: the
/// hash it carries, or with `deep` the hash of what it holds.
pub(crate) async fn sorted_documents(
    client: OpenSearch,
    index: String,
    deep: bool,
    progress: Progress,
) -> Result<Sorter> {
    let started = Instant::now();
    let mut sorter = Sorter::default();
    let mut next_report = PROGRESS_EVERY;
    let mut scroll = IdScroll::new(
        client,
        index.clone(),
        json!({"match_all": {}}),
        if deep { Fetch::Content } else { Fetch::Hash },
        // A page of sources is larger than one of hashes.
        if deep { SCROLL_PAGE / 4 } else { SCROLL_PAGE },
    );
    let result = async {
        loop {
            let hits = scroll.next_page().await?;
            if hits.is_empty() {
                return Ok(());
            }
            progress.inc(hits.len() as u64);
            for hit in hits {
                let hash = match hit.source {
                    Some(source) => Some(document_digest(&source)),
                    None => hit
                        .fields
                        .and_then(|f| f.hash.into_iter().next())
                        .and_then(|h| u128::from_str_radix(&h, 16).ok()),
                };
                sorter.push(Entry {
                    id: hit.id,
                    hash,
                    key: None,
                })
                .with_context(|| format!("index {index}: spilling its documents to disk"))?;

            }
            if sorter.count() >= next_report {
                next_report += PROGRESS_EVERY;
                info!(index = %index, documents = sorter.count(), elapsed_s = started.elapsed().as_secs(), "audit: documents read");
            }
        }
    }
    .await;
    scroll.close().await;
    result.map(|()| sorter)
}
