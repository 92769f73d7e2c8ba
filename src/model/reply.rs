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

/// How a FETCH got an entry (WITHMETA).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Hit,
    /// This call started the fill.
    Miss,
    /// This call joined a fill another call started.
    Coalesced,
    /// The model was unavailable: a fallback model answered (stored under
    /// the fallback request's key, whose TTL is reported).
    Fallback,
    /// A similar request's entry answered (FETCH ... SIMILAR); its key
    /// and TTL are reported.
    Similar,
}

impl Status {
    pub fn word(self) -> &'static [u8] {
        match self {
            Status::Hit => b"hit",
            Status::Miss => b"miss",
            Status::Coalesced => b"coalesced",
            Status::Fallback => b"fallback",
            Status::Similar => b"similar",
        }
    }
}

/// One entry's metadata; its remaining TTL is read when the reply is sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Meta {
    pub status: Status,
    pub key: Arc<[u8]>,
    /// False when nothing was kept (NOSTORE, or the entry failed).
    pub stored: bool,
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
    /// A plain array of replies (LLMCACHE.SIMILAR).
    Array(Vec<Reply>),
    /// `[inner, meta]`: `meta` is one triple (`single`) or one per input.
    WithMeta {
        inner: Box<Reply>,
        meta: Vec<Meta>,
        single: bool,
    },
}
