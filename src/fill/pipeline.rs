//! The one entry point of a fill. A command handler describes its work
//! ([`Work`]: entries with their hits, inputs, store policy, tenant,
//! deadline); this file joins each missing entry to the single-flight
//! registry, consults failure memory and the spend limits, cuts the new
//! fills into upstream requests and queues them. Workers answer through
//! [`Pending`].

use std::sync::{Arc, LazyLock, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use redis_module::{Context, ContextFlags, RedisResult, RedisValue};

use crate::fill::call::{Answer, Call, FillError, FillResult, MetaPlan, Shape};
use crate::fill::endpoints::Dest;
use crate::fill::job::{Job, Task};
use crate::fill::pool::{self, Refused};
use crate::limits::spend::{self, Bill};
use crate::model::batch::batches;
use crate::model::failmem::FailMemory;
use crate::model::inflight::{Join, Registry};
use crate::model::reply::{Reply, Status};
use crate::model::ttl::now_ms;
use crate::redis::blocked::Blocked;
use crate::redis::ffi;
use crate::stats::STATS;

/// One distinct entry of a call.
pub struct Entry {
    /// The entry's key in Redis.
    pub key: Vec<u8>,
    /// What goes upstream for it (the text, for embeddings).
    pub input: String,
    /// Estimated tokens, for the spend limits and batching.
    pub tokens: u64,
    pub hit: Option<Arc<[u8]>>,
}

pub use crate::model::ttl::Expiry;

pub struct EmbedSpec {
    /// The endpoints to try, in order (routes.rs).
    pub plan: Vec<Dest>,
    pub model: String,
    pub dims: Option<u32>,
    /// The namespace's pin hash, unless DIMENSIONS fixes the size.
    pub pin_key: Option<Vec<u8>>,
    pub fixed_dims: usize,
    /// The model's size from aicache.model-dims.
    pub known_dims: Option<usize>,
    pub max_dims: usize,
    pub base64: bool,
}

pub struct ChatSpec {
    pub plan: Vec<Dest>,
    pub body: Vec<u8>,
    pub max_bytes: usize,
    pub fallback: Option<ChatFallback>,
    /// FETCH ... SIMILAR: look for a similar entry before filling.
    pub semantic: Option<Arc<crate::fill::semantic::SemSpec>>,
}

/// The request a chat fill makes instead when its model is unavailable.
pub struct ChatFallback {
    pub model: String,
    pub body: Vec<u8>,
    /// The fallback request's own entry key: its answer is stored there.
    pub key: Vec<u8>,
    pub plan: Vec<Dest>,
}

pub enum Kind {
    Embed(Arc<EmbedSpec>),
    Chat(Arc<ChatSpec>),
}

/// Everything a fill needs, built by a command handler.
pub struct Work {
    pub db: i32,
    pub kind: Kind,
    pub entries: Vec<Entry>,
    pub shape: Shape,
    /// None: NOSTORE, answer but keep nothing.
    pub expiry: Option<Expiry>,
    pub tenant: Option<Vec<u8>>,
    pub timeout_ms: u64,
    pub batch_size: usize,
    pub batch_max_tokens: u64,
    pub lease_ms: u64,
    pub max_fills: usize,
    pub fail_memory_ms: u64,
    /// WITHMETA: the reply carries each entry's status and TTL.
    pub with_meta: bool,
}

impl Work {
    fn meta_plan(&self) -> Option<MetaPlan> {
        self.with_meta.then(|| MetaPlan {
            keys: self.entries.iter().map(|e| Arc::from(&e.key[..])).collect(),
            status: self
                .entries
                .iter()
                .map(|e| match e.hit {
                    Some(_) => Status::Hit,
                    None => Status::Miss,
                })
                .collect(),
            stored: self.expiry.is_some(),
        })
    }

    /// The same call's settings with no entries, no tenant and no waiting
    /// client, for a background refresh.
    pub fn background(&self) -> Work {
        Work {
            db: self.db,
            kind: match &self.kind {
                Kind::Embed(s) => Kind::Embed(s.clone()),
                Kind::Chat(s) => Kind::Chat(s.clone()),
            },
            entries: Vec::new(),
            shape: Shape::Single,
            expiry: self.expiry,
            tenant: None,
            timeout_ms: self.timeout_ms,
            batch_size: self.batch_size,
            batch_max_tokens: self.batch_max_tokens,
            lease_ms: self.lease_ms,
            max_fills: self.max_fills,
            fail_memory_ms: self.fail_memory_ms,
            with_meta: false,
        }
    }

    fn missing(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.entries.len()).filter(|&i| self.entries[i].hit.is_none())
    }

    /// The single-flight key: a fill stores into one DB, and NOSTORE
    /// fills store nothing, so only calls that would store alike share.
    pub(crate) fn fill_key(&self, slot: usize) -> Vec<u8> {
        let mut k = self.entries[slot].key.clone();
        k.extend_from_slice(&self.db.to_be_bytes());
        k.push(u8::from(self.expiry.is_none()));
        // A call that may be answered by a similar entry never shares a
        // fill with one that asked for its exact entry only.
        if let Kind::Chat(spec) = &self.kind {
            if let Some(sem) = &spec.semantic {
                k.extend_from_slice(b"~similar");
                k.extend_from_slice(&sem.threshold.to_bits().to_be_bytes());
            }
        }
        k
    }
}

pub struct Waiter {
    call: Arc<Call>,
    slot: usize,
}

static REGISTRY: LazyLock<Mutex<Registry<Waiter>>> =
    LazyLock::new(|| Mutex::new(Registry::new(65_536, 60_000)));
static FAILURES: LazyLock<Mutex<FailMemory>> =
    LazyLock::new(|| Mutex::new(FailMemory::new(65_536)));

pub(crate) fn registry() -> MutexGuard<'static, Registry<Waiter>> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn failures() -> MutexGuard<'static, FailMemory> {
    FAILURES.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn fills_in_flight() -> usize {
    registry().len()
}

/// EMBCACHE.FETCH / LLMCACHE.FETCH after their hits were read: replies now
/// when nothing is missing, else blocks the client and starts the fills.
pub fn fetch(ctx: &Context, work: Work) -> RedisResult {
    let missing = work.missing().count();
    if missing == 0 {
        let plan = work.meta_plan();
        let slots = work.entries.into_iter().map(|e| e.hit).collect();
        let reply = crate::fill::call::render_hits(slots, &work.shape, plan.as_ref());
        return Ok(ffi::send_now(ctx, reply));
    }
    // A semantic lookup may answer on a replica; only its fill may not.
    let replica_ok = matches!(&work.kind, Kind::Chat(s) if s.semantic.is_some());
    check_can_fill(ctx, missing, replica_ok)?;
    let timeout_ms = work.timeout_ms;
    let block = |call: Weak<Call>| -> Option<Box<dyn Answer>> {
        let on_deadline = Box::new(move || {
            if let Some(c) = call.upgrade() {
                c.expire();
            }
        });
        Blocked::new(ctx, timeout_ms, on_deadline).map(|b| Box::new(b) as Box<dyn Answer>)
    };
    match start(work, now_ms(), block) {
        Ok(Started::Jobs(jobs)) => {
            submit(jobs);
            Ok(RedisValue::NoReply)
        }
        Ok(Started::Now(reply)) => Ok(ffi::send_now(ctx, reply)),
        Err(msg) => Err(ffi::error(msg)),
    }
}

/// Misses need a real block and a master that may write; anything else
/// is answered now, before any fill starts.
fn check_can_fill(
    ctx: &Context,
    misses: usize,
    replica_ok: bool,
) -> Result<(), redis_module::RedisError> {
    let flags = ctx.get_flags();
    let why = if flags
        .intersects(ContextFlags::MULTI | ContextFlags::LUA | ContextFlags::DENY_BLOCKING)
    {
        "and this context cannot block (MULTI, script or module call); run FETCH on its own or read with GET"
    } else if !flags.contains(ContextFlags::MASTER) && !replica_ok {
        "on a replica; fills run on the master"
    } else {
        return Ok(());
    };
    Err(ffi::error(format!("ERR {misses} cache miss(es) {why}")))
}

/// Joins the call's missing entries to fills and returns the jobs to run
/// for the fills it starts. Err: refused before anything happened (the
/// client is not blocked). Ok: the client is blocked, or was answered.
pub fn start(
    work: Work,
    now: u64,
    block: impl FnOnce(Weak<Call>) -> Option<Box<dyn Answer>>,
) -> Result<Started, String> {
    let mut missing: Vec<usize> = work.missing().collect();
    let slots = work.entries.iter().map(|e| e.hit.clone()).collect();
    let call = Call::new(slots, work.shape.clone());
    if let Some(plan) = work.meta_plan() {
        call.want_meta(plan);
    }
    if work.fail_memory_ms > 0 {
        let mut refused = Vec::new();
        let mut f = failures();
        for &s in &missing {
            match f.check(&work.fill_key(s), now) {
                Some((msg, true)) => refused.push((s, Arc::from(failing_fast(&msg)))),
                Some((msg, false)) => {
                    STATS.fail_fast_errors.incr();
                    return Err(failing_fast(&msg));
                }
                None => {}
            }
        }
        drop(f);
        STATS.fail_fast_errors.add(refused.len() as u64);
        missing.retain(|s| !refused.iter().any(|(r, _)| r == s));
        call.refuse(&refused);
        if let Some(reply) = call.ready() {
            return Ok(Started::Now(reply));
        }
    }
    let fill_keys: Vec<Vec<u8>> = missing.iter().map(|&s| work.fill_key(s)).collect();
    let mut reg = registry();
    reg.set_limits(work.max_fills, work.lease_ms);
    let new: Vec<usize> = missing
        .iter()
        .zip(&fill_keys)
        .filter(|(_, k)| !reg.is_live(k, now))
        .map(|(&s, _)| s)
        .collect();
    // Only the fills this call starts go upstream, so only they are charged.
    let charge = if new.is_empty() {
        None
    } else {
        let (requests, tokens) = cost(&work, &new);
        Some(spend::admit(work.tenant.as_deref(), requests, tokens)?)
    };
    let Some(answer) = block(Arc::downgrade(&call)) else {
        drop(reg);
        Bill::new(charge).refund();
        return Err("ERR this client cannot be blocked".into());
    };
    call.attach(answer);
    let mut started = Vec::new();
    let mut full = false;
    for (&slot, key) in missing.iter().zip(&fill_keys) {
        let waiter = Waiter {
            call: call.clone(),
            slot,
        };
        match reg.join(key, now, waiter) {
            Join::Start(id) => started.push((slot, id)),
            Join::Wait(_) => {
                call.coalesced(slot);
                STATS.coalesced_waiters.incr();
                STATS.tokens_saved.add(work.entries[slot].tokens);
            }
            Join::Full => {
                full = true;
                break;
            }
        }
    }
    drop(reg);
    // Until the jobs own them, the started fills are answered by this
    // guard: a panic in between cannot leave them in the registry.
    let guard = Pending::new(
        started.iter().map(|&(_, id)| id).collect(),
        started.iter().map(|&(s, _)| work.fill_key(s)).collect(),
        0,
    );
    if full {
        Bill::new(charge).refund();
        STATS.fill_capacity_errors.incr();
        let msg = format!(
            "ERR too many fills in flight (aicache.max-fills {})",
            work.max_fills
        );
        call.fail(&msg);
        guard.fail(&msg);
        return Ok(Started::Jobs(Vec::new()));
    }
    STATS.fills_started.add(started.len() as u64);
    let jobs = jobs(&work, &started, charge);
    guard.disarm();
    Ok(Started::Jobs(jobs))
}

pub(crate) fn failing_fast(msg: &str) -> String {
    let msg = msg.trim_start_matches("ERR ");
    format!("ERR {msg} (failing fast: the same fill failed within aicache.fail-memory-ms)")
}

/// What `start` did.
pub enum Started {
    /// The client is blocked (or was answered); run these jobs.
    Jobs(Vec<Job>),
    /// Nothing to fill: reply with this now, without blocking.
    Now(Reply),
}

/// Upstream requests and estimated tokens of filling `slots` now.
fn cost(work: &Work, slots: &[usize]) -> (u64, u64) {
    let tokens: Vec<u64> = slots.iter().map(|&s| work.entries[s].tokens).collect();
    let requests = match work.kind {
        Kind::Embed(_) => batches(&tokens, work.batch_size, work.batch_max_tokens).len(),
        Kind::Chat(_) => 1,
    };
    (requests as u64, tokens.iter().sum())
}

fn jobs(work: &Work, started: &[(usize, u64)], charge: Option<spend::Charge>) -> Vec<Job> {
    // A call that only joined running fills starts nothing.
    if started.is_empty() {
        return Vec::new();
    }
    let deadline = Instant::now() + Duration::from_millis(work.lease_ms);
    let tokens: Vec<u64> = started
        .iter()
        .map(|&(s, _)| work.entries[s].tokens)
        .collect();
    let cuts = match work.kind {
        Kind::Embed(_) => batches(&tokens, work.batch_size, work.batch_max_tokens),
        Kind::Chat(_) => std::iter::once(0..started.len()).collect(),
    };
    cuts.into_iter()
        .map(|r| {
            let part = &started[r.clone()];
            let est: u64 = tokens[r].iter().sum();
            let task = match &work.kind {
                Kind::Embed(spec) => Task::Embed {
                    spec: spec.clone(),
                    inputs: part
                        .iter()
                        .map(|&(s, _)| work.entries[s].input.clone())
                        .collect(),
                    keys: part
                        .iter()
                        .map(|&(s, _)| work.entries[s].key.clone())
                        .collect(),
                },
                Kind::Chat(spec) => Task::Chat {
                    spec: spec.clone(),
                    key: work.entries[part[0].0].key.clone(),
                },
            };
            Job {
                pending: Pending::new(
                    part.iter().map(|&(_, id)| id).collect(),
                    part.iter().map(|&(s, _)| work.fill_key(s)).collect(),
                    work.fail_memory_ms,
                ),
                bill: Bill::new(charge.as_ref().map(|c| c.part(1, est))),
                db: work.db,
                expiry: work.expiry,
                deadline,
                queued: Instant::now(),
                task,
            }
        })
        .collect()
}

/// The fills a job must answer for. Dropping it unanswered (a panicking
/// worker, a job dropped at shutdown) fails them, so no waiter is left.
pub struct Pending {
    ids: Vec<u64>,
    fill_keys: Vec<Vec<u8>>,
    fail_memory_ms: u64,
}

impl Pending {
    pub(crate) fn new(ids: Vec<u64>, fill_keys: Vec<Vec<u8>>, fail_memory_ms: u64) -> Self {
        Pending {
            ids,
            fill_keys,
            fail_memory_ms,
        }
    }

    /// Completes fill `i` of this job with `results[i]`; failures are
    /// remembered for aicache.fail-memory-ms unless `remember` is false.
    pub fn finish(self, results: Vec<FillResult>, remember: bool) {
        let marks = vec![None; results.len()];
        self.finish_marked(results, remember, marks);
    }

    /// [`Pending::finish`], where `marks[i]` says how fill `i` was
    /// answered other than by its own entry (a fallback model, a similar
    /// entry) and names the key that answer is stored under.
    pub fn finish_marked(mut self, results: Vec<FillResult>, remember: bool, marks: Vec<Mark>) {
        if remember && self.fail_memory_ms > 0 {
            let now = now_ms();
            let mut f = failures();
            for (k, r) in self.fill_keys.iter().zip(&results) {
                if let Err(e) = r {
                    f.remember(k, now, self.fail_memory_ms, e.msg.clone(), e.per_input);
                }
            }
        }
        let ids = std::mem::take(&mut self.ids);
        complete(ids.into_iter().zip(results).zip(marks));
    }

    /// The first `n` fills, answered for by a job of their own.
    pub fn split_front(&mut self, n: usize) -> Pending {
        let n = n.min(self.ids.len());
        Pending {
            ids: self.ids.drain(..n).collect(),
            fill_keys: self.fill_keys.drain(..n).collect(),
            fail_memory_ms: self.fail_memory_ms,
        }
    }

    /// Stops the fills taking joiners; returns a Stream that joined one,
    /// which must get the result before [`Pending::finish`].
    pub fn close(&self) -> Option<Arc<[u8]>> {
        let mut reg = registry();
        self.ids.iter().find_map(|&id| reg.close(id))
    }

    /// The jobs now answer for these fills.
    fn disarm(mut self) {
        self.ids.clear();
    }

    pub fn fail(self, msg: &str) {
        let err = Err(FillError::whole(msg));
        let results = vec![err; self.ids.len()];
        self.finish(results, false);
    }
}

thread_local! {
    /// Set on worker threads: a job dropped there while panicking is a
    /// worker panic.
    static WORKER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Set when a panicking job's waiters were failed, so the pool does not
    /// count the same panic again.
    static PANIC_COUNTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

thread_local! {
    static ABANDONED: std::cell::RefCell<Vec<Arc<[u8]>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Streams of plain fills this thread abandoned since the last call.
pub fn take_abandoned_streams() -> Vec<Arc<[u8]>> {
    ABANDONED.with(|a| std::mem::take(&mut *a.borrow_mut()))
}

pub fn mark_worker_thread() {
    WORKER.with(|w| w.set(true));
}

/// True (once) when the panic the worker just caught was already counted.
pub fn take_panic_counted() -> bool {
    PANIC_COUNTED.with(|c| c.replace(false))
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.ids.is_empty() {
            // Count a worker panic before its waiters hear of it.
            let worker = WORKER.with(std::cell::Cell::get);
            if worker && std::thread::panicking() && !PANIC_COUNTED.with(|c| c.replace(true)) {
                STATS.worker_panics.incr();
            }
            // A Stream that joined an abandoned plain fill still needs its
            // end; the pool writes it once the panic is caught (no I/O in a
            // drop that may run while unwinding).
            if let Some(stream) = self.close() {
                ABANDONED.with(|a| a.borrow_mut().push(stream));
            }
            let ids = std::mem::take(&mut self.ids);
            let err = Err(FillError::whole(
                "ERR internal error: the fill was abandoned",
            ));
            complete(ids.into_iter().map(|id| ((id, err.clone()), None)));
        }
    }
}

pub type Mark = Option<(Status, Arc<[u8]>)>;

fn complete(results: impl Iterator<Item = ((u64, FillResult), Mark)>) {
    let mut handed: Vec<(Vec<Waiter>, FillResult, Mark)> = Vec::new();
    {
        let mut reg = registry();
        for ((id, r), mark) in results {
            handed.push((reg.complete(id), r, mark));
        }
    }
    // Outside the registry lock: a reply may be large to build.
    for (waiters, r, mark) in handed {
        for w in waiters {
            if let Some((status, key)) = &mark {
                w.call.mark(w.slot, *status, key.clone());
            }
            w.call.deliver(w.slot, &r);
        }
    }
}

/// Queues every job; a refused job fails its fills with the reason.
/// Embedding jobs wait up to aicache.batch-window-ms for others to share
/// their request.
pub fn submit(jobs: Vec<Job>) {
    let window = crate::config::BATCH_WINDOW_MS.get_u64();
    for job in jobs {
        if window > 0 && job.embed_size().is_some() {
            crate::fill::batcher::add(job, Duration::from_millis(window));
        } else {
            let _ = submit_one(job);
        }
    }
}

/// Queues a job; when refused, fails its fills and returns the reason.
pub fn submit_one(job: Job) -> Result<(), String> {
    let Err(refused) = pool::submit(job) else {
        return Ok(());
    };
    let (job, why) = *refused;
    let msg = match why {
        Refused::Full(n) => {
            STATS.queue_full_errors.incr();
            format!("ERR upstream queue is full (aicache.queue-size {n}); try again later")
        }
        Refused::Stopped => "ERR aicache worker pool is not running".to_string(),
    };
    job.fail(&msg);
    Err(msg)
}

/// Shutdown: every waiter gets an error now.
pub fn abandon_all(msg: &str) {
    let waiters = registry().drain();
    let err: FillResult = Err(FillError::whole(msg));
    for w in waiters {
        w.call.deliver(w.slot, &err);
    }
}
