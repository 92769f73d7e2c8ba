//! The life of a FETCH miss: the call blocks, each missing entry joins or
//! starts a fill in the single-flight registry, and each fill's result is
//! handed to every call waiting on it. A call replies once, when its last
//! entry arrives or its first error does.

use std::sync::{Arc, LazyLock, Mutex, MutexGuard};

use redis_module::{Context, ContextFlags, RedisError};

use crate::fill::job::Job;
use crate::fill::pool::{self, Refused};
use crate::limits::spend::Bill;
use crate::model::failmem::FailMemory;
use crate::model::inflight::{Join, Registry};
use crate::model::quota::Charge;
use crate::redis::ffi::{self, Blocked, Reply};
use crate::stats::STATS;

pub type FillResult = Result<Arc<[u8]>, Arc<str>>;

/// One blocked call and what it has received so far.
pub struct Call {
    state: Mutex<CallState>,
}

struct CallState {
    blocked: Option<Blocked>,
    /// One slot per distinct entry; hits arrive filled.
    slots: Vec<Option<Arc<[u8]>>>,
    missing: usize,
    shape: Shape,
}

/// How a complete call renders its slots.
pub enum Shape {
    /// One vector per input; `order[i]` is the slot of input `i`.
    Vectors { order: Vec<usize>, json: bool },
    /// A single bulk string (the LLM response).
    Single,
}

pub struct Waiter {
    call: Arc<Call>,
    slot: usize,
}

static FAILURES: LazyLock<Mutex<FailMemory>> =
    LazyLock::new(|| Mutex::new(FailMemory::new(65_536)));

fn failures() -> MutexGuard<'static, FailMemory> {
    FAILURES.lock().unwrap_or_else(|e| e.into_inner())
}

/// Records an upstream failure for these entries (aicache.fail-memory-ms).
pub fn remember_failure(keys: &[Vec<u8>], msg: &str) {
    let for_ms = crate::config::FAIL_MEMORY_MS.get_u64();
    if for_ms == 0 {
        return;
    }
    let msg: Arc<str> = Arc::from(msg);
    let now = crate::model::ttl::now_ms();
    let mut f = failures();
    for k in keys {
        f.remember(k, now, for_ms, msg.clone());
    }
}

/// Fails a call at once when one of its missing entries failed recently.
pub fn check_failures<'a>(keys: impl Iterator<Item = &'a [u8]>) -> Result<(), RedisError> {
    if crate::config::FAIL_MEMORY_MS.get_u64() == 0 {
        return Ok(());
    }
    let now = crate::model::ttl::now_ms();
    let mut f = failures();
    for k in keys {
        if let Some(msg) = f.check(k, now) {
            STATS.fail_fast_errors.incr();
            let msg = msg.trim_start_matches("ERR ");
            return Err(ffi::error(format!(
                "ERR {msg} (failing fast: the same fill failed within aicache.fail-memory-ms)"
            )));
        }
    }
    Ok(())
}

static REGISTRY: LazyLock<Mutex<Registry<Waiter>>> =
    LazyLock::new(|| Mutex::new(Registry::new(65_536, 60_000)));

fn registry() -> MutexGuard<'static, Registry<Waiter>> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn fills_in_flight() -> usize {
    registry().len()
}

impl Call {
    fn lock(&self) -> MutexGuard<'_, CallState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn deliver(&self, slot: usize, result: &FillResult) {
        let mut st = self.lock();
        if st.blocked.is_none() {
            return;
        }
        match result {
            Err(e) => {
                let b = st.blocked.take();
                drop(st);
                if let Some(b) = b {
                    b.unblock(Reply::Error(e.to_string()));
                }
            }
            Ok(v) => {
                if let Some(s) = st.slots.get_mut(slot) {
                    if s.is_none() {
                        *s = Some(v.clone());
                        st.missing -= 1;
                    }
                }
                if st.missing == 0 {
                    let b = st.blocked.take();
                    let reply = render(&st);
                    drop(st);
                    if let Some(b) = b {
                        b.unblock(reply);
                    }
                }
            }
        }
    }

    /// Fails the call at once (queue full, too many fills).
    fn fail(&self, msg: &str) {
        self.deliver(0, &Err(Arc::from(msg)));
    }
}

fn render(st: &CallState) -> Reply {
    let slots: Vec<Arc<[u8]>> = st
        .slots
        .iter()
        .map(|s| s.clone().unwrap_or_else(|| Arc::from(&b""[..])))
        .collect();
    match &st.shape {
        Shape::Single => Reply::Bulk(
            slots
                .into_iter()
                .next()
                .unwrap_or_else(|| Arc::from(&b""[..])),
        ),
        Shape::Vectors { order, json } => {
            Reply::Vectors(order.iter().map(|&i| slots[i].clone()).collect(), *json)
        }
    }
}

/// Fills this job must answer for. Dropping it unanswered (a panic in a
/// worker, a job dropped at shutdown) fails them, so no waiter is left behind.
pub struct Pending {
    ids: Vec<u64>,
}

impl Pending {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Completes fill `i` of this job with `results[i]`.
    pub fn finish(mut self, results: Vec<FillResult>) {
        let ids = std::mem::take(&mut self.ids);
        complete(ids.into_iter().zip(results));
    }

    pub fn fail(mut self, msg: &str) {
        let err: Arc<str> = Arc::from(msg);
        let ids = std::mem::take(&mut self.ids);
        complete(ids.into_iter().map(|id| (id, Err(err.clone()))));
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.ids.is_empty() {
            let ids = std::mem::take(&mut self.ids);
            let err: Arc<str> = Arc::from("ERR internal error: the fill was abandoned");
            complete(ids.into_iter().map(|id| (id, Err(err.clone()))));
        }
    }
}

fn complete(results: impl Iterator<Item = (u64, FillResult)>) {
    let mut handed: Vec<(Vec<Waiter>, FillResult)> = Vec::new();
    {
        let mut reg = registry();
        for (id, r) in results {
            handed.push((reg.complete(id), r));
        }
    }
    // Outside the registry lock: a reply may be large to build.
    for (waiters, r) in handed {
        for w in waiters {
            w.call.deliver(w.slot, &r);
        }
    }
}

/// The single-flight key. A fill stores into one DB, so callers in other
/// DBs do not share it; NOSTORE fills never store, so only other NOSTORE
/// calls may share them.
pub fn fill_key(key: &[u8], db: i32, nostore: bool) -> Vec<u8> {
    let mut k = key.to_vec();
    k.extend_from_slice(&db.to_be_bytes());
    k.push(u8::from(nostore));
    k
}

/// The missing entries of one call, to be joined to fills.
pub struct Misses {
    /// (fill key, slot) per missing entry.
    pub entries: Vec<(Vec<u8>, usize)>,
}

/// What `begin` started: (slot, fill id) per fill, and the spend charge.
pub struct Begun {
    pub started: Vec<(usize, u64)>,
    pub charge: Option<Charge>,
}

/// Blocks the client and joins every missing entry to a fill. `admit` sees
/// the slots whose fills this call would start (the only ones that go
/// upstream) and may refuse them; it runs under the registry lock, so
/// exactly those fills start. Err: refused before anything happened.
/// Ok(None): the call has been answered already (it could not block, or
/// the registry is full) and its charge refunded.
pub fn begin(
    ctx: &Context,
    slots: Vec<Option<Arc<[u8]>>>,
    shape: Shape,
    misses: Misses,
    timeout_ms: u64,
    admit: impl FnOnce(&[usize]) -> Result<Option<Charge>, RedisError>,
) -> Result<Option<Begun>, RedisError> {
    let now = crate::model::ttl::now_ms();
    let mut reg = registry();
    reg.set_limits(
        crate::config::MAX_FILLS.get_u64() as usize,
        crate::config::LEASE_MS.get_u64(),
    );
    let new_slots: Vec<usize> = misses
        .entries
        .iter()
        .filter(|(key, _)| !reg.is_live(key, now))
        .map(|&(_, slot)| slot)
        .collect();
    let charge = admit(&new_slots)?;
    let Some(blocked) = Blocked::new(ctx, timeout_ms) else {
        drop(reg);
        Bill::new(charge).refund();
        ffi::send_now(
            ctx,
            Reply::Error("ERR this client cannot be blocked".into()),
        );
        return Ok(None);
    };
    let call = Arc::new(Call {
        state: Mutex::new(CallState {
            blocked: Some(blocked),
            missing: slots.iter().filter(|s| s.is_none()).count(),
            slots,
            shape,
        }),
    });
    let mut started = Vec::new();
    let mut full = false;
    for (key, slot) in misses.entries {
        let waiter = Waiter {
            call: call.clone(),
            slot,
        };
        match reg.join(&key, now, waiter) {
            Join::Start(id) => started.push((slot, id)),
            Join::Wait(_) => STATS.coalesced_waiters.incr(),
            Join::Full => {
                full = true;
                break;
            }
        }
    }
    drop(reg);
    if full {
        Bill::new(charge).refund();
        STATS.fill_capacity_errors.incr();
        let msg = format!(
            "ERR too many fills in flight (aicache.max-fills {})",
            crate::config::MAX_FILLS.get_u64()
        );
        call.fail(&msg);
        Pending {
            ids: started.iter().map(|&(_, id)| id).collect(),
        }
        .fail(&msg);
        return Ok(None);
    }
    STATS.fills_started.add(started.len() as u64);
    Ok(Some(Begun { started, charge }))
}

/// The answer-or-fail obligation for a group of started fills.
pub fn pending(ids: Vec<u64>) -> Pending {
    Pending { ids }
}

/// Shutdown: every waiter gets an error now.
pub fn abandon_all(msg: &str) {
    let waiters = registry().drain();
    let err: FillResult = Err(Arc::from(msg));
    for w in waiters {
        w.call.deliver(w.slot, &err);
    }
}

/// Replies at once with a call's result when nothing is missing.
pub fn reply_complete(ctx: &Context, slots: Vec<Option<Arc<[u8]>>>, shape: Shape) {
    let st = CallState {
        blocked: None,
        missing: 0,
        slots,
        shape,
    };
    ffi::send_now(ctx, render(&st));
}

/// Misses need a real block and a master that may write; anything else
/// is answered now, before any fill starts.
pub fn check_can_fill(ctx: &Context, misses: usize) -> Result<(), RedisError> {
    let flags = ctx.get_flags();
    if flags.intersects(ContextFlags::MULTI | ContextFlags::LUA | ContextFlags::DENY_BLOCKING) {
        return Err(ffi::error(format!(
            "ERR {misses} cache miss(es) and this context cannot block (MULTI, script or module \
             call); run FETCH on its own or read with GET"
        )));
    }
    if !flags.contains(ContextFlags::MASTER) {
        return Err(ffi::error(format!(
            "ERR {misses} cache miss(es) on a replica; fills run on the master"
        )));
    }
    if flags.contains(ContextFlags::OOM) {
        return Err(ffi::error(format!(
            "ERR {misses} cache miss(es) and Redis is over maxmemory; not filling"
        )));
    }
    Ok(())
}

/// Queues every job; a refused job fails its fills with the reason.
pub fn submit(jobs: Vec<Job>) {
    for job in jobs {
        if let Err((job, why)) = pool::submit(job) {
            let msg = match why {
                Refused::Full(n) => {
                    STATS.queue_full_errors.incr();
                    format!("ERR upstream queue is full (aicache.queue-size {n}); try again later")
                }
                Refused::Stopped => "ERR aicache worker pool is not running".to_string(),
            };
            job.fail(&msg);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::panic::{catch_unwind, AssertUnwindSafe};

    fn unblocked_call() -> Arc<Call> {
        Arc::new(Call {
            state: Mutex::new(CallState {
                blocked: None,
                slots: vec![None],
                missing: 1,
                shape: Shape::Single,
            }),
        })
    }

    #[test]
    fn a_panicking_job_still_completes_its_fills() {
        let call = unblocked_call();
        let waiter = Waiter {
            call: call.clone(),
            slot: 0,
        };
        let Join::Start(id) = registry().join(b"test:panic", 0, waiter) else {
            panic!("fresh key must start a fill")
        };
        let job = pending(vec![id]);
        let r = catch_unwind(AssertUnwindSafe(move || {
            let _owned = job;
            panic!("worker bug");
        }));
        assert!(r.is_err());
        // The waiter was handed back and dropped, and the key is free again.
        assert_eq!(Arc::strong_count(&call), 1);
        let again = Waiter { call, slot: 0 };
        assert!(matches!(
            registry().join(b"test:panic", 1, again),
            Join::Start(_)
        ));
    }
}
