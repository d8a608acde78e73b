//! What an OpenSearch answer means for a write, decided here and nowhere
//! else (DESIGN.md invariant 1: an outage is never turned into loss).
//!
//! Every answer falls in one of four classes:
//! - **applied**: OpenSearch holds the write (or its tombstone);
//! - **stale**: the index already has this version or a newer one;
//! - **bad record**: the document itself is wrong (a value its field's
//!   mapping cannot parse, a document or id OpenSearch will never take). No
//!   retry can fix it, so it goes to the dead-letter topic and the pipeline
//!   goes on;
//! - **wait**: the index, the cluster or the credentials cannot take the
//!   write *now* (closed, blocked, missing, 401/403, 429, 5xx, no answer, a
//!   strict mapping that refuses a new field, a mapping that a column's
//!   type change left behind as the caller judges it, ...). The write is retried in
//!   order, forever, and nothing after it is committed: fixing the cause
//!   (opening the index, lifting the block, rotating the password, fixing
//!   the mapping) resumes the pipeline where it stopped.
//!
//! The rule for what is not listed: an answer this module does not know is
//! a *wait*, never a bad record. Dead-lettering on a guess turns an outage
//! into loss; waiting on a guess only delays, and says why on `/readyz`.

use std::fmt;

use serde_json::Value;

/// Why writes cannot go through now. The label is a metric label (low
/// cardinality); the detail is OpenSearch's words, for logs and `/readyz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cause {
    /// No answer: connection refused or reset, timeout, unreadable answer.
    Unreachable,
    /// 429: the cluster is overloaded (queue full, circuit breaker).
    Overloaded,
    /// 5xx.
    ServerError,
    /// `index_closed_exception`: someone closed the index.
    IndexClosed,
    /// `index_not_found_exception` or a 404 for the index.
    IndexMissing,
    /// `cluster_block_exception`: `index.blocks.write`, `read_only`,
    /// `read_only_allow_delete` (disk watermark), a cluster-wide block.
    Blocked,
    /// 401: the credentials were refused.
    Unauthorized,
    /// 403 `security_exception`: the user may not write this index.
    Forbidden,
    /// An alias without a write index.
    NoWriteIndex,
    /// The index was deleted and created again (its uuid changed), e.g. by
    /// `action.auto_create_index` with dynamic mappings after someone
    /// deleted it: Tidemark does not write into an index it did not set up.
    IndexReplaced,
    /// `strict_dynamic_mapping_exception`: the table's mapping refuses a
    /// field the rows now have. A problem of the mapping, not of the row.
    StrictMapping,
    /// The index's field limit (`index.mapping.total_fields.limit`, depth,
    /// nested) is reached: a setting to raise, not a row to drop.
    MappingLimit,
    /// A document refused by its field's mapping, where the field's column
    /// changed type since the index was made (`text` to `jsonb`): the index
    /// cannot take the table's rows any more, a reindex can. Decided by the
    /// consumer (`apply::Refusals`), not from the answer alone.
    ColumnTypeChanged,
    /// A document refused by its field's mapping before the producer has
    /// recorded the table's columns as of the change: whether the column's
    /// type changed is not known yet.
    ShapePending,
    /// A whole-request refusal that is not about one document.
    RequestRefused,
    /// An answer this module does not know (see the module doc).
    Unknown,
}

impl Cause {
    pub fn label(self) -> &'static str {
        match self {
            Cause::Unreachable => "unreachable",
            Cause::Overloaded => "overloaded",
            Cause::ServerError => "server_error",
            Cause::IndexClosed => "index_closed",
            Cause::IndexMissing => "index_missing",
            Cause::Blocked => "blocked",
            Cause::Unauthorized => "unauthorized",
            Cause::Forbidden => "forbidden",
            Cause::NoWriteIndex => "no_write_index",
            Cause::IndexReplaced => "index_replaced",
            Cause::StrictMapping => "strict_mapping",
            Cause::MappingLimit => "mapping_limit",
            Cause::ColumnTypeChanged => "column_type_changed",
            Cause::ShapePending => "shape_pending",
            Cause::RequestRefused => "request_refused",
            Cause::Unknown => "unknown",
        }
    }

    /// Whether the cluster itself is away (as opposed to answering "no").
    pub fn is_down(self) -> bool {
        matches!(
            self,
            Cause::Unreachable | Cause::ServerError | Cause::Overloaded
        )
    }
}

/// Writes wait: why, in OpenSearch's words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stall {
    pub cause: Cause,
    pub detail: String,
}

impl fmt::Display for Stall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.cause.label(), self.detail)
    }
}

/// What one bulk item's answer means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// OpenSearch holds it; `result` as it answered (`created`, ...).
    Applied(Option<String>),
    /// A versioned delete of an absent document: its tombstone is recorded.
    WasAbsent,
    Stale,
    /// Wrong in itself: the reason goes to the dead-letter topic.
    BadRecord(String),
    Wait(Stall),
}

/// What a whole-request error means for the writes in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// One (unknown) write of several makes OpenSearch refuse the request:
    /// send the halves apart until it is found.
    Split,
    /// The request held one write, and OpenSearch refuses it for what it is.
    BadRecord(String),
    Wait(Stall),
}

/// A bulk item: its status, `result` and `error` object.
pub fn item(status: u16, result: Option<&str>, error: Option<&Value>) -> Item {
    match status {
        200..=299 => return Item::Applied(result.map(str::to_owned)),
        404 if result == Some("not_found") => return Item::WasAbsent,
        409 => return Item::Stale,
        _ => {}
    }
    let kind = error_type(error);
    if let Some(cause) = cause_of(status, kind, error) {
        return Item::Wait(Stall {
            cause,
            detail: reason(error),
        });
    }
    if status == 400 && BAD_DOCUMENT.contains(&kind) || status == 413 {
        return Item::BadRecord(reason(error));
    }
    Item::Wait(Stall {
        cause: Cause::Unknown,
        detail: format!("{status} {}", reason(error)),
    })
}

/// The document field a mapping refusal names (`failed to parse field
/// [body] of type [text]`, `object mapping for [body] tried to parse ...`),
/// as OpenSearch writes it (`a.b` for a field inside an object); `None`
/// for a refusal that names none.
pub fn refused_field(reason: &str) -> Option<&str> {
    ["failed to parse field [", "object mapping for [", "field ["]
        .iter()
        .find_map(|start| {
            let from = reason.find(start)? + start.len();
            let len = reason[from..].find(']')?;
            Some(&reason[from..from + len]).filter(|f| !f.is_empty())
        })
}

/// Whether a write's copy for a reindex (`crate::alias`), sent to the mark
/// alias with `require_alias`, found the mark gone: the reindex swapped or
/// was abandoned since the marks were read, so the copy is not needed.
pub fn mark_gone(status: u16, error: Option<&Value>) -> bool {
    status == 404
        && error_type(error) == "index_not_found_exception"
        && reason(error).contains("require_alias")
}

/// A whole request answered `status` with `body`; `writes` were in it.
pub fn request(status: u16, body: &str, writes: usize) -> Request {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let error = parsed
        .as_ref()
        .map(|b| &b["error"])
        .filter(|e| e.is_object());
    let kind = error_type(error);
    let detail = match error {
        Some(_) => format!("{status} {}", reason(error)),
        None => format!("{status} {}", first_line(body)),
    };
    // Refused for what one document is: too large, or an invalid request
    // line (an id over 512 bytes makes OpenSearch refuse the whole bulk).
    let about_a_document =
        status == 413 || (status == 400 && kind == "action_request_validation_exception");
    if about_a_document {
        return if writes > 1 {
            Request::Split
        } else {
            Request::BadRecord(detail)
        };
    }
    let cause = cause_of(status, kind, error).unwrap_or(Cause::RequestRefused);
    Request::Wait(Stall { cause, detail })
}

/// No answer at all.
pub fn unreachable(detail: impl Into<String>) -> Stall {
    Stall {
        cause: Cause::Unreachable,
        detail: detail.into(),
    }
}

/// Item error types that mean the document itself is wrong.
const BAD_DOCUMENT: [&str; 6] = [
    "mapper_parsing_exception",
    "document_parsing_exception",
    "illegal_argument_exception",
    "action_request_validation_exception",
    "x_content_parse_exception",
    "not_x_content_exception",
];

/// The wait cause an answer names, if it names one.
fn cause_of(status: u16, kind: &str, error: Option<&Value>) -> Option<Cause> {
    let caused_by = error.and_then(|e| e["caused_by"]["type"].as_str());
    let text = error.and_then(|e| e["reason"].as_str()).unwrap_or("");
    let cause = match kind {
        "index_closed_exception" => Cause::IndexClosed,
        "index_not_found_exception" => Cause::IndexMissing,
        "cluster_block_exception" => Cause::Blocked,
        "strict_dynamic_mapping_exception" => Cause::StrictMapping,
        "security_exception" if status == 401 => Cause::Unauthorized,
        "security_exception" => Cause::Forbidden,
        _ if caused_by == Some("strict_dynamic_mapping_exception") => Cause::StrictMapping,
        "illegal_argument_exception" if text.contains("no write index is defined") => {
            Cause::NoWriteIndex
        }
        "illegal_argument_exception"
            if text.contains("Limit of total fields")
                || text.contains("Limit of mapping depth")
                || text.contains("Limit of nested fields") =>
        {
            Cause::MappingLimit
        }
        _ => match status {
            401 => Cause::Unauthorized,
            403 => Cause::Forbidden,
            404 => Cause::IndexMissing,
            429 => Cause::Overloaded,
            500..=599 => Cause::ServerError,
            _ => return None,
        },
    };
    Some(cause)
}

fn error_type(error: Option<&Value>) -> &str {
    error.and_then(|e| e["type"].as_str()).unwrap_or("")
}

/// OpenSearch's reason for an error: type, reason and cause, without the
/// row contents OpenSearch quotes in them (these reasons go to logs and
/// dead letters, which never carry row contents): the `Preview of field's
/// value: ...` it appends is cut, and a cause that quotes anything (`For
/// input string: "..."`) is reduced to its type.
pub fn reason(error: Option<&Value>) -> String {
    let Some(error) = error else {
        return "refused without a reason".into();
    };
    let kind = error["type"].as_str().unwrap_or("error");
    let text = without_preview(error["reason"].as_str().unwrap_or(""));
    let cause = match (
        error["caused_by"]["type"].as_str(),
        error["caused_by"]["reason"].as_str(),
    ) {
        (_, Some(cause)) if !quotes_anything(cause) => Some(without_preview(cause).to_owned()),
        (Some(kind), _) => Some(format!("{kind}, its reason withheld: it quotes the value")),
        (None, Some(_)) => Some("its reason withheld: it quotes the value".to_owned()),
        (None, None) => None,
    };
    match cause {
        Some(cause) => format!("{kind}: {text} (caused by: {cause})"),
        None if text.is_empty() => format!("{kind}: refused without a reason"),
        None => format!("{kind}: {text}"),
    }
}

/// `reason` up to OpenSearch's preview of the value, if it has one.
fn without_preview(reason: &str) -> &str {
    match reason.find("Preview of field's value") {
        Some(at) => reason[..at].trim_end_matches([' ', '.']),
        None => reason,
    }
}

/// Whether a text quotes something (a value, as causes do).
fn quotes_anything(text: &str) -> bool {
    text.contains(['"', '\''])
}

fn first_line(body: &str) -> &str {
    let line = body.lines().next().unwrap_or("");
    match line.char_indices().nth(300) {
        Some((end, _)) => &line[..end],
        None => line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(kind: &str, reason: &str) -> Value {
        json!({"type": kind, "reason": reason})
    }

    /// (status, result, error, the wait cause expected, the class expected).
    type Case = (
        u16,
        Option<&'static str>,
        Option<Value>,
        Option<Cause>,
        &'static str,
    );

    #[test]
    fn a_mapping_refusal_names_its_field() {
        assert_eq!(
            refused_field(
                "mapper_parsing_exception: failed to parse field [body] of type [text] in document with id '1'"
            ),
            Some("body")
        );
        assert_eq!(
            refused_field(
                "mapper_parsing_exception: object mapping for [doc.inner] tried to parse field [inner] as object, but found a concrete value"
            ),
            Some("doc.inner")
        );
        assert_eq!(
            refused_field("document_parsing_exception: [1:2] unexpected"),
            None
        );
    }

    /// Every status and error type OpenSearch answers a bulk item with, and
    /// what it means. A row here is a promise: change it only with the
    /// module doc's rule in mind.
    #[test]
    fn bulk_items_classify() {
        use Cause::*;
        let wait = |cause| Some(cause);
        let cases: Vec<Case> = vec![
            (201, Some("created"), None, None, "applied"),
            (200, Some("updated"), None, None, "applied"),
            (200, Some("deleted"), None, None, "applied"),
            (404, Some("not_found"), None, None, "absent"),
            (
                409,
                None,
                Some(err("version_conflict_engine_exception", "v")),
                None,
                "stale",
            ),
            (
                400,
                None,
                Some(err("mapper_parsing_exception", "failed to parse field [n]")),
                None,
                "bad",
            ),
            (
                400,
                None,
                Some(err("document_parsing_exception", "x")),
                None,
                "bad",
            ),
            (
                400,
                None,
                Some(err(
                    "illegal_argument_exception",
                    "Document contains at least one immense term",
                )),
                None,
                "bad",
            ),
            (
                400,
                None,
                Some(err("x_content_parse_exception", "x")),
                None,
                "bad",
            ),
            (413, None, None, None, "bad"),
            (
                400,
                None,
                Some(err("index_closed_exception", "closed")),
                wait(IndexClosed),
                "wait",
            ),
            (
                404,
                None,
                Some(err("index_not_found_exception", "no such index [i]")),
                wait(IndexMissing),
                "wait",
            ),
            (
                403,
                None,
                Some(err(
                    "cluster_block_exception",
                    "index [i] blocked by: [FORBIDDEN/8/index write (api)]",
                )),
                wait(Blocked),
                "wait",
            ),
            (
                429,
                None,
                Some(err(
                    "cluster_block_exception",
                    "blocked by: [TOO_MANY_REQUESTS/12/disk usage exceeded flood-stage watermark, index has read-only-allow-delete block]",
                )),
                wait(Blocked),
                "wait",
            ),
            (
                400,
                None,
                Some(err(
                    "strict_dynamic_mapping_exception",
                    "mapping set to strict, dynamic introduction of [c] within [_doc] is not allowed",
                )),
                wait(StrictMapping),
                "wait",
            ),
            (
                400,
                None,
                Some(
                    json!({"type": "mapper_parsing_exception", "reason": "x", "caused_by": {"type": "strict_dynamic_mapping_exception", "reason": "strict"}}),
                ),
                wait(StrictMapping),
                "wait",
            ),
            (
                400,
                None,
                Some(err(
                    "illegal_argument_exception",
                    "no write index is defined for alias [a]",
                )),
                wait(NoWriteIndex),
                "wait",
            ),
            (
                400,
                None,
                Some(err(
                    "illegal_argument_exception",
                    "Limit of total fields [1000] has been exceeded",
                )),
                wait(MappingLimit),
                "wait",
            ),
            (
                401,
                None,
                Some(err(
                    "security_exception",
                    "missing authentication credentials",
                )),
                wait(Unauthorized),
                "wait",
            ),
            (
                403,
                None,
                Some(err(
                    "security_exception",
                    "no permissions for [indices:data/write/bulk[s]]",
                )),
                wait(Forbidden),
                "wait",
            ),
            (401, None, None, wait(Unauthorized), "wait"),
            (403, None, None, wait(Forbidden), "wait"),
            (
                429,
                None,
                Some(err("es_rejected_execution_exception", "queue full")),
                wait(Overloaded),
                "wait",
            ),
            (500, None, None, wait(ServerError), "wait"),
            (
                503,
                None,
                Some(err(
                    "unavailable_shards_exception",
                    "primary shard is not active",
                )),
                wait(ServerError),
                "wait",
            ),
            (
                400,
                None,
                Some(err("some_new_exception", "?")),
                wait(Unknown),
                "wait",
            ),
            (404, None, None, wait(IndexMissing), "wait"),
        ];
        for (status, result, error, cause, class) in cases {
            let got = item(status, result, error.as_ref());
            let ok = match (&got, class) {
                (Item::Applied(r), "applied") => r.as_deref() == result,
                (Item::WasAbsent, "absent") | (Item::Stale, "stale") => true,
                (Item::BadRecord(_), "bad") => true,
                (Item::Wait(stall), "wait") => Some(stall.cause) == cause,
                _ => false,
            };
            assert!(
                ok,
                "{status} {error:?}: expected {class} {cause:?}, got {got:?}"
            );
        }
    }

    #[test]
    fn whole_requests_classify() {
        let body = |kind: &str, reason: &str| {
            json!({"error": {"type": kind, "reason": reason}, "status": 400}).to_string()
        };
        let invalid = body(
            "action_request_validation_exception",
            "Validation Failed: 1: id [..] is too long, must be no longer than 512 bytes but was: 600;",
        );
        assert_eq!(request(400, &invalid, 1000), Request::Split);
        assert!(
            matches!(request(400, &invalid, 1), Request::BadRecord(r) if r.contains("512 bytes"))
        );
        assert_eq!(request(413, "", 2), Request::Split);
        assert!(matches!(request(413, "", 1), Request::BadRecord(_)));
        let waits = [
            (
                400,
                body("index_closed_exception", "closed"),
                Cause::IndexClosed,
            ),
            (
                403,
                body("cluster_block_exception", "blocked"),
                Cause::Blocked,
            ),
            (
                401,
                body("security_exception", "unauthorized"),
                Cause::Unauthorized,
            ),
            (401, "Unauthorized".to_owned(), Cause::Unauthorized),
            (
                403,
                body("security_exception", "no permissions"),
                Cause::Forbidden,
            ),
            (
                404,
                body("index_not_found_exception", "no such index"),
                Cause::IndexMissing,
            ),
            (429, String::new(), Cause::Overloaded),
            (
                502,
                "<html>bad gateway</html>".to_owned(),
                Cause::ServerError,
            ),
            // Any other whole-request 400 is not about one document.
            (
                400,
                body("parse_exception", "request body is required"),
                Cause::RequestRefused,
            ),
            (400, "not json".to_owned(), Cause::RequestRefused),
        ];
        for (status, text, cause) in waits {
            match request(status, &text, 10) {
                Request::Wait(stall) => assert_eq!(stall.cause, cause, "{status} {text}"),
                other => panic!("{status} {text}: expected a wait, got {other:?}"),
            }
        }
    }

    #[test]
    fn reasons_name_type_reason_and_cause() {
        let error = json!({"type": "mapper_parsing_exception", "reason": "failed to parse field [n]",
            "caused_by": {"type": "x", "reason": "For input string"}});
        assert_eq!(
            reason(Some(&error)),
            "mapper_parsing_exception: failed to parse field [n] (caused by: For input string)"
        );
        assert_eq!(reason(None), "refused without a reason");
    }

    #[test]
    fn reasons_never_quote_the_value() {
        let canary = "canary-9d2b";
        let error = json!({"type": "mapper_parsing_exception",
            "reason": format!("failed to parse field [n] of type [long] in document with id '7'. Preview of field's value: '{canary}'"),
            "caused_by": {"type": "illegal_argument_exception", "reason": format!("For input string: \"{canary}\"")}});
        let text = reason(Some(&error));
        assert!(!text.contains(canary), "{text}");
        assert_eq!(
            text,
            "mapper_parsing_exception: failed to parse field [n] of type [long] in document with id '7' \
             (caused by: illegal_argument_exception, its reason withheld: it quotes the value)"
        );
        // A whole-request error keeps its status and type.
        let body = json!({"error": error, "status": 400}).to_string();
        let detail = match request(400, &body, 1) {
            Request::Wait(stall) => stall.detail,
            Request::BadRecord(reason) => reason,
            Request::Split => panic!("one write cannot be split"),
        };
        assert!(!detail.contains(canary), "{detail}");
    }
}
