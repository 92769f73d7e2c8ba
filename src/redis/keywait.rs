//! Clients blocked until a key changes (LLMCACHE.READ ... BLOCK), the way
//! XREAD BLOCK waits: Redis owns the wait, its timeout and CLIENT UNBLOCK,
//! and a worker's XADD wakes the reader. Every reply is sent on the main
//! thread by Redis's own blocked-on-keys pass, so the deadline and a new
//! entry cannot both answer (the worker never unblocks anyone).

use std::os::raw::{c_int, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};

use redis_module::{raw, Context, RedisString};

/// Tries to answer from the key's new state: true when it replied, false
/// to keep waiting.
pub type Serve = Box<dyn Fn(&Context) -> bool + Send>;

struct Waiting {
    serve: Serve,
}

/// Blocks the calling client on `key` for up to `timeout_ms` (Redis times
/// it out with a null reply). False when Redis refuses to block.
pub fn block_on_key(ctx: &Context, key: &[u8], timeout_ms: u64, serve: Serve) -> bool {
    let mut name = RedisString::create_from_slice(ctx.ctx, key);
    let data = Box::into_raw(Box::new(Waiting { serve }));
    // SAFETY: ctx is the running command's context; Redis keeps its own
    // reference to the key name, and hands `data` to free_waiting once.
    let bc = unsafe {
        raw::RedisModule_BlockClientOnKeys.map(|f| {
            f(
                ctx.ctx,
                Some(on_ready),
                Some(on_timeout),
                Some(free_waiting),
                timeout_ms.min(i64::MAX as u64) as i64,
                &mut name.inner,
                1,
                data.cast(),
            )
        })
    };
    if bc.is_some_and(|b| !b.is_null()) {
        crate::redis::guard::note_blocked();
        true
    } else {
        // SAFETY: Redis did not take the data.
        drop(unsafe { Box::from_raw(data) });
        false
    }
}

extern "C" fn on_ready(
    ctx: *mut raw::RedisModuleCtx,
    _: *mut *mut raw::RedisModuleString,
    _: c_int,
) -> c_int {
    let served = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: Redis calls this for a client blocked by block_on_keys,
        // whose private data is our Waiting until free_waiting runs.
        let data = unsafe { raw::RedisModule_GetBlockedClientPrivateData.map(|f| f(ctx)) };
        let Some(w) = data.and_then(|p| NonNull::new(p.cast::<Waiting>())) else {
            return false;
        };
        // SAFETY: as above; only read here.
        let w = unsafe { w.as_ref() };
        (w.serve)(&Context::new(ctx))
    }));
    match served {
        Ok(true) => raw::REDISMODULE_OK as c_int,
        Ok(false) => raw::REDISMODULE_ERR as c_int,
        // A panic while serving: reply once with an error, and stop waiting.
        Err(_) => {
            crate::stats::STATS.handler_panics.incr();
            let _ = catch_unwind(|| {
                Context::new(ctx).reply(Err(crate::redis::ffi::error(
                    "ERR internal error while reading the stream",
                )));
            });
            raw::REDISMODULE_OK as c_int
        }
    }
}

extern "C" fn on_timeout(
    ctx: *mut raw::RedisModuleCtx,
    _: *mut *mut raw::RedisModuleString,
    _: c_int,
) -> c_int {
    let _ = catch_unwind(|| {
        crate::redis::ffi::reply_null(&Context::new(ctx));
    });
    raw::REDISMODULE_OK as c_int
}

extern "C" fn free_waiting(_: *mut raw::RedisModuleCtx, data: *mut c_void) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        if let Some(p) = NonNull::new(data.cast::<Waiting>()) {
            // SAFETY: the Box leaked in block_on_key; Redis frees it once.
            drop(unsafe { Box::from_raw(p.as_ptr()) });
        }
    }));
}

/// A wake-up is queued and has not run yet.
static WAKE_PENDING: AtomicBool = AtomicBool::new(false);

/// Wakes the event loop after a worker wrote a key that clients may be
/// blocked on. Redis serves such clients in its next `beforeSleep`, but a
/// write made under a thread-safe context does not wake a sleeping loop:
/// without this, a blocked READ would wait for the next cron tick (up to
/// 1000/hz ms). One pending wake-up covers every write before it runs.
pub fn wake_main_thread() {
    if WAKE_PENDING.swap(true, Ordering::AcqRel) {
        return;
    }
    // SAFETY: EventLoopAddOneShot is documented as thread-safe; the
    // callback takes no data.
    let queued = unsafe {
        raw::RedisModule_EventLoopAddOneShot
            .is_some_and(|f| f(Some(woken), std::ptr::null_mut()) == raw::REDISMODULE_OK as c_int)
    };
    if !queued {
        WAKE_PENDING.store(false, Ordering::Release);
    }
}

/// A queued wake-up names a function of this library: unload must wait.
pub fn wake_pending() -> bool {
    WAKE_PENDING.load(Ordering::Acquire)
}

extern "C" fn woken(_: *mut c_void) {
    WAKE_PENDING.store(false, Ordering::Release);
}
