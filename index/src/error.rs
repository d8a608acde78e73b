//! The index layer's one error type for what is not a bulk answer (those
//! are `answer`'s): connecting, checking and creating indices, reads, the
//! runs index. Each says what it was doing, naming the index or the field;
//! none carries a document's contents.

use std::error::Error;

use crate::search::SearchError;

/// A failed request or set-up step of the index layer.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// OpenSearch did not answer: waiting and trying again can help.
    #[error("{what}")]
    Unreachable {
        what: String,
        #[source]
        source: opensearch::Error,
    },
    /// A request whose failure `search` classified.
    #[error("{what}")]
    Search {
        what: String,
        #[source]
        source: SearchError,
    },
    /// A step failed for a reason below it (a file, a parse, the client).
    #[error("{what}")]
    Failed {
        what: String,
        #[source]
        source: Box<dyn Error + Send + Sync>,
    },
    /// OpenSearch answered, and refused, or answered what it should not.
    #[error("{0}")]
    Refused(String),
}

impl IndexError {
    /// Whether waiting and trying again can help (no answer), as opposed to
    /// a refusal or a misconfiguration that will not change by itself.
    pub fn retryable(&self) -> bool {
        match self {
            IndexError::Unreachable { .. } => true,
            IndexError::Search { source, .. } => source.retryable(),
            IndexError::Failed { .. } | IndexError::Refused(_) => false,
        }
    }
}

/// A request that got no answer, where no step was named.
impl From<opensearch::Error> for IndexError {
    fn from(source: opensearch::Error) -> Self {
        IndexError::Unreachable {
            what: source.to_string(),
            source,
        }
    }
}

impl<T> Step<T> for Result<T, SearchError> {
    fn unanswered(self, what: impl FnOnce() -> String) -> Result<T, IndexError> {
        self.map_err(|source| IndexError::Search {
            what: what(),
            source,
        })
    }

    fn failed(self, what: impl FnOnce() -> String) -> Result<T, IndexError> {
        self.unanswered(what)
    }
}

/// Names the step an error happened in.
pub(crate) trait Step<T> {
    /// A request that got no answer.
    fn unanswered(self, what: impl FnOnce() -> String) -> Result<T, IndexError>;
    /// Any other failure below this step.
    fn failed(self, what: impl FnOnce() -> String) -> Result<T, IndexError>;
}

impl<T> Step<T> for Result<T, opensearch::Error> {
    fn unanswered(self, what: impl FnOnce() -> String) -> Result<T, IndexError> {
        self.map_err(|source| IndexError::Unreachable {
            what: what(),
            source,
        })
    }

    fn failed(self, what: impl FnOnce() -> String) -> Result<T, IndexError> {
        self.map_err(|source| IndexError::Failed {
            what: what(),
            source: Box::new(source),
        })
    }
}

/// `failed` for errors other than the client's.
pub(crate) fn failed<E: Error + Send + Sync + 'static>(
    what: impl FnOnce() -> String,
) -> impl FnOnce(E) -> IndexError {
    move |source| IndexError::Failed {
        what: what(),
        source: Box::new(source),
    }
}
