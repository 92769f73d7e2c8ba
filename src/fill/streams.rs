//! LLMCACHE.STREAM's side of the registry: which Stream a caller reads.
//! A request already streaming gives its Stream; a plain fill of it gets a
//! Stream attached (its answer is replayed there); otherwise a streamed
//! fill starts, paid for like a chat FETCH. Redis-free.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::fill::job::{Job, Task};
use crate::fill::pipeline::{failing_fast, failures, registry, Kind, Pending, Work};
use crate::fill::streaming::Target;
use crate::limits::spend::{self, Bill};
use crate::model::inflight::Join;
use crate::stats::STATS;

/// Stream settings of one STREAM call.
pub struct StreamOpts {
    /// The name a new Stream gets.
    pub name: Arc<[u8]>,
    /// Where a storing Stream is named while it runs (for replicas).
    pub pointer: Option<Arc<[u8]>>,
    pub linger_ms: u64,
    pub max_entries: u64,
    /// The generation's own limit (TIMEOUT), under the lease.
    pub deadline_ms: u64,
}

pub enum Streaming {
    /// Read this Stream; nothing new was started.
    Joined(Arc<[u8]>),
    /// Read this Stream once `Job` is queued.
    Started(Arc<[u8]>, Box<Job>),
}

/// The Stream for `work`'s single entry. Err: refused, nothing started.
pub fn start(work: Work, opts: StreamOpts, now: u64) -> Result<Streaming, String> {
    let fill_key = work.fill_key(0);
    if work.fail_memory_ms > 0 {
        if let Some((msg, _)) = failures().check(&fill_key, now) {
            STATS.fail_fast_errors.incr();
            return Err(failing_fast(&msg));
        }
    }
    let Kind::Chat(spec) = &work.kind else {
        return Err("ERR internal error: only chat requests stream".into());
    };
    let mut reg = registry();
    reg.set_limits(work.max_fills, work.lease_ms);
    if let Some((id, stream)) = reg.live(&fill_key, now) {
        STATS.stream_joins.incr();
        return Ok(Streaming::Joined(match stream {
            Some(s) => s,
            None => {
                // A plain fill of the same request: its answer is replayed.
                reg.set_stream(id, opts.name.clone());
                opts.name
            }
        }));
    }
    let entry = &work.entries[0];
    let charge = spend::admit(work.tenant.as_deref(), 1, entry.tokens)?;
    let id = match reg.open(&fill_key, now, Vec::new()) {
        Join::Start(id) => id,
        _ => {
            drop(reg);
            Bill::new(Some(charge)).refund();
            STATS.fill_capacity_errors.incr();
            return Err(format!(
                "ERR too many fills in flight (aicache.max-fills {})",
                work.max_fills
            ));
        }
    };
    reg.set_stream(id, opts.name.clone());
    drop(reg);
    STATS.fills_started.incr();
    STATS.streams_started.incr();
    let mut target = Target::new(
        work.db,
        opts.name.clone(),
        opts.linger_ms,
        work.lease_ms,
        opts.max_entries,
    );
    target.pointer = opts.pointer;
    let limit = work.lease_ms.min(opts.deadline_ms.max(1));
    let job = Job {
        pending: Pending::new(vec![id], vec![fill_key], work.fail_memory_ms),
        bill: Bill::new(Some(charge)),
        db: work.db,
        expiry: work.expiry,
        deadline: Instant::now() + Duration::from_millis(limit),
        queued: Instant::now(),
        task: Task::Stream {
            spec: spec.clone(),
            key: entry.key.clone(),
            target,
        },
    };
    Ok(Streaming::Started(opts.name, Box::new(job)))
}

/// True while a fill of this process writes `stream`.
pub fn is_live(stream: &[u8]) -> bool {
    registry().has_stream(stream)
}
