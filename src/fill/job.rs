//! The worker side of a fill: call the upstream (no Redis lock held),
//! validate, then take the lock once to store the results as replicated
//! effects with absolute expiry in the caller's DB, then answer the waiters.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis_module::{Context, ThreadSafeContext};
use ureq::Agent;

use crate::fill::fetch::{FillResult, Pending};
use crate::fill::upstream::{post, Failure};
use crate::limits::spend::Bill;
use crate::model::canon::validate_response;
use crate::model::ttl::{jittered_ms, now_ms};
use crate::redis::ffi;
use crate::stats::STATS;

/// Where and how results are written. None of a job's `store` means NOSTORE.
pub struct Store {
    pub db: i32,
    /// Seconds before jitter; 0 keeps entries forever.
    pub ttl_secs: u64,
    pub jitter_pct: u64,
}

/// The namespace's per-model dimension pin, checked before vectors land.
pub struct Pin {
    pub dims_key: Vec<u8>,
    pub model: Vec<u8>,
    /// `aicache.fixed-dims`, 0 when unset.
    pub fixed: usize,
}

pub struct EmbedJob {
    pub pending: Pending,
    pub url: String,
    pub body: Vec<u8>,
    pub keys: Vec<Vec<u8>>,
    pub dims: Option<usize>,
    pub max_dims: usize,
    pub store: Option<Store>,
    /// None when DIMENSIONS fixes the size.
    pub pin: Option<Pin>,
    pub deadline: Instant,
    /// What this job's upstream call was charged, settled after it.
    pub bill: Bill,
}

pub struct LlmJob {
    pub pending: Pending,
    pub url: String,
    pub body: Vec<u8>,
    pub key: Vec<u8>,
    pub max_bytes: usize,
    pub store: Option<Store>,
    pub deadline: Instant,
    pub bill: Bill,
}

/// A unit of work for the pool. A job refused by the queue is failed with
/// the reason; a job dropped any other way fails through its `Pending`.
pub enum Job {
    Embed(Box<EmbedJob>),
    Llm(Box<LlmJob>),
}

impl Job {
    pub fn run(self, agent: &Agent, stopping: &AtomicBool) {
        match self {
            Job::Embed(j) => j.run(agent, stopping),
            Job::Llm(j) => j.run(agent, stopping),
        }
    }

    /// A refused job never called upstream: its charge is refunded.
    pub fn fail(self, msg: &str) {
        let (pending, bill) = match self {
            Job::Embed(j) => (j.pending, j.bill),
            Job::Llm(j) => (j.pending, j.bill),
        };
        bill.refund();
        pending.fail(msg);
    }
}

/// When a fill started now must give up: the end of its lease, so that a
/// job that waited in the queue does not retry past it.
pub fn deadline() -> Instant {
    Instant::now() + Duration::from_millis(crate::config::LEASE_MS.get_u64())
}

/// An upstream failure: every waiter gets it, and it may be remembered so
/// identical calls fail fast for a while.
fn fail(pending: Pending, keys: &[Vec<u8>], f: &Failure) {
    let msg = f.message();
    if *f != Failure::Stopped {
        crate::fill::fetch::remember_failure(keys, &msg);
    }
    pending.fail(&msg);
}

impl EmbedJob {
    pub fn run(self, agent: &Agent, stopping: &AtomicBool) {
        let n = self.pending.len();
        let parsed = post(agent, &self.url, &self.body, self.deadline, stopping).and_then(|body| {
            crate::model::embed::parse_response(&body, n, self.dims, self.max_dims).map_err(|e| {
                let f = Failure::Invalid(e);
                f.count();
                f
            })
        });
        let e = match parsed {
            Ok(e) => e,
            Err(f) => {
                self.bill.failed();
                return fail(self.pending, &self.keys, &f);
            }
        };
        self.bill.succeeded(e.tokens);
        STATS.tokens_prompt.add(e.tokens);
        STATS.tokens_total.add(e.tokens);
        if let Some(store) = &self.store {
            let entries: Vec<(&[u8], &[u8])> = self
                .keys
                .iter()
                .zip(&e.vectors)
                .map(|(k, v)| (k.as_slice(), v.as_slice()))
                .collect();
            if let Err(msg) = write(store, self.pin.as_ref(), &entries) {
                return self.pending.fail(&msg);
            }
        }
        let results: Vec<FillResult> = e.vectors.into_iter().map(|v| Ok(Arc::from(v))).collect();
        self.pending.finish(results);
    }
}

impl LlmJob {
    pub fn run(self, agent: &Agent, stopping: &AtomicBool) {
        let checked =
            post(agent, &self.url, &self.body, self.deadline, stopping).and_then(|body| {
                let invalid = |e: String| {
                    let f = Failure::Invalid(e.trim_start_matches("ERR ").to_string());
                    f.count();
                    f
                };
                if body.len() > self.max_bytes {
                    return Err(invalid(format!(
                        "response is {} bytes, more than max-response-bytes {}",
                        body.len(),
                        self.max_bytes
                    )));
                }
                let usage = validate_response(&body).map_err(invalid)?;
                Ok((body, usage))
            });
        let (body, usage) = match checked {
            Ok(x) => x,
            Err(f) => {
                self.bill.failed();
                return fail(self.pending, std::slice::from_ref(&self.key), &f);
            }
        };
        self.bill.succeeded(usage.total);
        STATS.tokens_prompt.add(usage.prompt);
        STATS.tokens_completion.add(usage.completion);
        STATS.tokens_total.add(usage.total);
        if let Some(store) = &self.store {
            if let Err(msg) = write(store, None, &[(self.key.as_slice(), body.as_slice())]) {
                return self.pending.fail(&msg);
            }
        }
        self.pending.finish(vec![Ok(Arc::from(body))]);
    }
}

/// Stores entries under one hold of the Redis lock. Skips the write (not the
/// reply) when this node may not write now, or Redis refuses it
/// (min-replicas-to-write, MISCONF); a dimension mismatch is an error.
fn write(store: &Store, pin: Option<&Pin>, entries: &[(&[u8], &[u8])]) -> Result<(), String> {
    let tsc = ThreadSafeContext::new();
    let ctx = tsc.lock();
    if !ffi::may_write(&ctx) || !ffi::select_db(&ctx, store.db) {
        STATS.writes_skipped.incr();
        return Ok(());
    }
    let dims = entries.first().map_or(0, |(_, v)| v.len() / 4);
    if let Some(pin) = pin {
        if !check_pin(&ctx, pin, dims)? {
            STATS.writes_skipped.incr();
            return Ok(());
        }
    }
    for (key, value) in entries {
        let at = (store.ttl_secs > 0).then(|| {
            now_ms()
                + jittered_ms(
                    store.ttl_secs,
                    store.jitter_pct,
                    crate::model::ttl::JITTER_RNG.next(),
                )
        });
        if ffi::set_string(&ctx, key, value, at).is_err() {
            STATS.writes_skipped.incr();
            break;
        }
    }
    Ok(())
}

/// Ok(true) when the vectors fit the namespace's pin (pinning it if new),
/// Ok(false) when Redis refused to write the pin.
fn check_pin(ctx: &Context, pin: &Pin, dims: usize) -> Result<bool, String> {
    if pin.fixed != 0 {
        if dims != pin.fixed {
            return Err(format!(
                "ERR dimension mismatch: upstream returned {dims} dimensions, fixed-dims is {}",
                pin.fixed
            ));
        }
        return Ok(true);
    }
    let have = ffi::call(
        ctx,
        "HGET",
        &[&pin.dims_key, &pin.model],
        false,
        ffi::reply_as_u64,
    )
    .map_err(|e| format!("ERR cannot read the dimension pin: {e}"))?;
    match have {
        Some(p) if p as usize != dims => Err(format!(
            "ERR dimension mismatch: this namespace stores {p}-dimension vectors for this model, \
             upstream returned {dims}"
        )),
        Some(_) => Ok(true),
        None => {
            let d = dims.to_string();
            let pinned = ffi::call(
                ctx,
                "HSET",
                &[&pin.dims_key, &pin.model, d.as_bytes()],
                true,
                |_| (),
            );
            Ok(pinned.is_ok())
        }
    }
}
