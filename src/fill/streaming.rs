//! The worker side of LLMCACHE.STREAM: upstream events become Stream
//! entries as they arrive (each read's events under one hold of the lock,
//! none held back), the deltas are assembled, and a good end is stored as
//! the ordinary LLMCACHE entry before the end entry is written, so a reader
//! that sees the end and then FETCHes gets a hit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::fill::call::{FillError, FillResult};
use crate::fill::pipeline::ChatSpec;
use crate::fill::store::{Append, Appended, Commit, RedisStore, Store};
use crate::fill::upstream::{error_text, Failure, Sink, Upstream};
use crate::model::assemble::Assembler;
use crate::model::frames::{replay, Frame};
use crate::model::sse::Event;
use crate::model::ttl::{now_ms, Expiry};
use crate::stats::STATS;

/// `Target::next` once the end entry is written.
const ENDED: u64 = u64::MAX;

/// The Stream a fill writes, shared with the pool so a panicking worker's
/// Stream still gets its end entry.
#[derive(Clone)]
pub struct Target {
    pub db: i32,
    pub stream: Arc<[u8]>,
    pub start_ms: u64,
    /// The number of the next entry, or ENDED.
    pub next: Arc<AtomicU64>,
    pub linger_ms: u64,
    pub lease_ms: u64,
    pub max_entries: u64,
    /// See [`Append::pointer`].
    pub pointer: Option<Arc<[u8]>>,
}

impl Target {
    pub fn new(db: i32, stream: Arc<[u8]>, linger_ms: u64, lease_ms: u64, max: u64) -> Self {
        Target {
            db,
            stream,
            start_ms: now_ms(),
            next: Arc::new(AtomicU64::new(1)),
            linger_ms,
            lease_ms,
            max_entries: max,
            pointer: None,
        }
    }

    pub fn ended(&self) -> bool {
        self.next.load(Ordering::Acquire) == ENDED
    }

    /// Writes `frames`; Ok(false) while writes are paused here.
    fn write(&self, store: &dyn Store, frames: &[Frame]) -> Result<bool, String> {
        let first = self.next.load(Ordering::Acquire);
        if first == ENDED {
            return Ok(true);
        }
        let end = frames.last().is_some_and(Frame::is_end);
        // Until it ends, a Stream outlives its fill's lease by the linger,
        // so a Stream orphaned by a crash still goes away.
        let hold = if end { 0 } else { self.lease_ms };
        let a = Append {
            db: self.db,
            stream: &self.stream,
            start_ms: self.start_ms,
            first,
            frames,
            pointer: self.pointer.as_deref(),
            expire_at_ms: now_ms() + hold + self.linger_ms,
        };
        match store.append(&a)? {
            Appended::Paused => Ok(false),
            Appended::Written => {
                let next = if end {
                    ENDED
                } else {
                    first + frames.len() as u64
                };
                self.next.store(next, Ordering::Release);
                STATS.stream_entries.add(frames.len() as u64);
                Ok(true)
            }
        }
    }

    /// Writes what is left and the end entry, waiting out a write pause
    /// for a while. Chunks that cannot be written (out of memory) are
    /// dropped; the end entry is always tried.
    pub fn end(&self, store: &dyn Store, mut frames: Vec<Frame>, end: Frame) {
        frames.push(end);
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            match self.write(store, &frames) {
                Ok(true) => return,
                Ok(false) if Instant::now() < until => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) if frames.len() > 1 => {
                    frames.drain(..frames.len() - 1);
                }
                _ => {
                    STATS.writes_skipped.incr();
                    return;
                }
            }
        }
    }

    /// A worker died with this Stream open: end it so readers stop.
    pub fn abandon(&self) {
        if !self.ended() {
            let msg = "ERR internal error: the stream's fill was abandoned";
            self.end(&RedisStore, Vec::new(), Frame::Error(msg.into()));
        }
    }
}

/// Receives the upstream's events for one Stream.
struct Streamer<'a> {
    store: &'a dyn Store,
    target: &'a Target,
    max_bytes: usize,
    bytes: usize,
    /// Chunks not yet written (writes paused).
    pending: Vec<Frame>,
    taken: u64,
    asm: Assembler,
    done: bool,
}

impl Sink for Streamer<'_> {
    fn events(&mut self, events: Vec<Event>) -> Result<bool, Failure> {
        for e in events {
            let (name, data) = match e {
                Event::Done => {
                    self.done = true;
                    break;
                }
                Event::Data { name, data } => (name, data),
            };
            if name.as_deref() == Some("error") || has_error(&data) {
                let key = crate::fill::apikey::current().ok().flatten();
                return Err(Failure::Stream(error_text(data.as_bytes(), key.as_deref())));
            }
            self.asm
                .push(data.as_bytes())
                .map_err(|e| Failure::Invalid(e.to_string()))?;
            self.bytes += data.len();
            if self.bytes > self.max_bytes {
                return Err(Failure::TooLarge(self.max_bytes as u64));
            }
            // One entry stays free for the end.
            if self.taken + 2 > self.target.max_entries {
                return Err(Failure::Stream(format!(
                    "it is longer than aicache.stream-max-entries {}",
                    self.target.max_entries
                )));
            }
            self.pending.push(Frame::Chunk(data.into_bytes()));
            self.taken += 1;
        }
        if !self.pending.is_empty()
            && self
                .target
                .write(self.store, &self.pending)
                .map_err(Failure::Store)?
        {
            self.pending.clear();
        }
        Ok(self.done)
    }

    fn started(&self) -> bool {
        self.taken > 0
    }
}

fn has_error(data: &str) -> bool {
    data.contains("\"error\"")
        && serde_json::from_str::<Value>(data)
            .ok()
            .and_then(|v| v.get("error").map(|e| !e.is_null()))
            .unwrap_or(false)
}

/// What a streamed fill cost and told.
pub struct Streamed {
    pub result: FillResult,
    pub tokens: u64,
    pub answered: bool,
}

/// Runs one streamed fill to its end entry. `key`/`expiry`: where a good
/// answer is stored (None: NOSTORE).
pub fn run(
    up: &dyn Upstream,
    store: &dyn Store,
    spec: &ChatSpec,
    target: &Target,
    key: &[u8],
    deadline: Instant,
    expiry: Option<Expiry>,
) -> Streamed {
    let mut s = Streamer {
        store,
        target,
        max_bytes: crate::config::UPSTREAM_MAX_BYTES.get_u64() as usize,
        bytes: 0,
        pending: Vec::new(),
        taken: 0,
        asm: Assembler::default(),
        done: false,
    };
    let streamed = crate::fill::endpoints::stream_any(up, &spec.plan, &spec.body, deadline, &mut s);
    let pending = std::mem::take(&mut s.pending);
    let failed = |f: Failure, answered: bool| {
        let msg = f.message();
        target.end(store, pending.clone(), Frame::Error(msg.clone()));
        Streamed {
            result: Err(FillError::whole(&msg)),
            tokens: 0,
            answered,
        }
    };
    if let Err(f) = streamed {
        return failed(f, s.taken > 0);
    }
    let Some(finish_reason) = s.asm.finish_reason().map(str::to_string) else {
        let f = Failure::Stream("it ended before the answer finished".into());
        f.count();
        return failed(f, true);
    };
    let usage = s.asm.usage().cloned();
    let tokens = usage
        .as_ref()
        .and_then(|u| u.get("total_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    count_tokens(usage.as_ref());
    let result = match s.asm.finish() {
        Ok(b) if b.len() > spec.max_bytes => Err(format!(
            "response is {} bytes, more than max-response-bytes {}",
            b.len(),
            spec.max_bytes
        )),
        r => r,
    };
    let result = match result {
        Ok(b) => {
            let commit = Commit {
                db: target.db,
                pin: None,
                dims: 0,
                entries: vec![(key, b.as_slice())],
                expiry,
                together: false,
                companion: None,
            };
            store
                .commit(&commit)
                .map(|()| Arc::from(b))
                .map_err(|m| FillError::whole(&m))
        }
        Err(e) => {
            let f = Failure::Invalid(e);
            f.count();
            Err(FillError::whole(&f.message()))
        }
    };
    target.end(
        store,
        pending,
        Frame::Finished {
            finish_reason,
            usage,
        },
    );
    Streamed {
        result,
        tokens,
        answered: true,
    }
}

fn count_tokens(usage: Option<&Value>) {
    let n = |k: &str| {
        usage
            .and_then(|u| u.get(k))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    STATS.tokens_prompt.add(n("prompt_tokens"));
    STATS.tokens_completion.add(n("completion_tokens"));
    STATS.tokens_total.add(n("total_tokens"));
}

/// A plain (non-streamed) fill that a Stream joined: its answer replayed
/// as chunks, or its error, then the end entry.
pub fn replay_into(store: &dyn Store, target: &Target, result: &FillResult) {
    let (frames, end) = match result {
        Ok(body) => match replay(body) {
            Ok(chunks) => {
                let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                let finish_reason = v["choices"][0]["finish_reason"]
                    .as_str()
                    .unwrap_or("stop")
                    .to_string();
                (
                    chunks.into_iter().map(Frame::Chunk).collect(),
                    Frame::Finished {
                        finish_reason,
                        usage: v.get("usage").cloned(),
                    },
                )
            }
            Err(e) => (Vec::new(), Frame::Error(format!("ERR internal error: {e}"))),
        },
        Err(e) => (Vec::new(), Frame::Error(e.msg.to_string())),
    };
    target.end(store, frames, end);
}
