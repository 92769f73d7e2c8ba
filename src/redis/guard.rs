//! The panic boundary. Redis calls command handlers, INFO, config and
//! server-event callbacks through `extern "C"` frames, where an unwinding
//! panic aborts the server; every entry point runs inside [`guard`] or its
//! own `catch_unwind`, so a bug costs one error reply, not the process.

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};

use redis_module::{Context, RedisResult, RedisString, RedisValue};

use crate::redis::ffi::error;
use crate::stats::STATS;

thread_local! {
    /// Set when the running command blocked its client: from then on the
    /// blocked-client path owns the reply, even if the handler panics.
    static BLOCKED: Cell<bool> = const { Cell::new(false) };
}

pub fn note_blocked() {
    BLOCKED.with(|b| b.set(true));
}

pub type Handler = fn(&Context, Vec<RedisString>) -> RedisResult;

pub fn guard(name: &str, ctx: &Context, args: Vec<RedisString>, f: Handler) -> RedisResult {
    BLOCKED.with(|b| b.set(false));
    match catch_unwind(AssertUnwindSafe(|| f(ctx, args))) {
        Ok(r) => r,
        Err(_) => {
            STATS.handler_panics.incr();
            if BLOCKED.with(Cell::get) {
                return Ok(RedisValue::NoReply);
            }
            Err(error(format!(
                "ERR internal error in {name}: the command was aborted (aicache_handler_panics)"
            )))
        }
    }
}

/// Places AICACHE.DEBUG can make panic once, to prove the boundary holds.
#[derive(Debug, Clone, Copy)]
pub enum Site {
    Info,
    Worker,
}

static INFO: AtomicBool = AtomicBool::new(false);
static WORKER: AtomicBool = AtomicBool::new(false);

fn flag(site: Site) -> &'static AtomicBool {
    match site {
        Site::Info => &INFO,
        Site::Worker => &WORKER,
    }
}

pub fn arm(site: Site) {
    flag(site).store(true, Ordering::Relaxed);
}

/// Panics once at `site` if a test armed it.
pub fn maybe_panic(site: Site) {
    if flag(site).swap(false, Ordering::Relaxed) {
        panic!("aicache: injected panic at {site:?}");
    }
}
