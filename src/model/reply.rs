//! What a FETCH finally answers, as plain data: the fill side builds it on
//! any thread, the Redis adapter renders it on the main thread.

use std::sync::Arc;

/// One element of a multi-entry answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Value(Arc<[u8]>),
    /// This entry alone failed (its input was refused upstream); the
    /// others still carry their values.
    Error(Arc<str>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Error(String),
    Bulk(Arc<[u8]>),
    /// One element per input; `json` renders each vector as a number array.
    Items {
        items: Vec<Item>,
        json: bool,
    },
}
