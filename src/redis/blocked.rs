//! Blocked clients that get exactly one reply.
//!
//! Redis 7.0 can lose a reply when a module unblocks a client from a thread
//! just as Redis's own timeout fires (shared/field-notes.md). So Redis never
//! times these clients out: each one is blocked with no timeout and a module
//! timer calls back on the main thread at the deadline. Whoever *takes* the
//! [`Blocked`] handle (the fill with its value, or the deadline with an
//! error) is the only one that unblocks it, and that choice is made by the
//! owner of the handle under its own lock.

use std::os::raw::{c_int, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use std::sync::Arc;

use redis_module::{raw, Context};

use crate::model::reply::Reply;
use crate::redis::ffi::send;

/// A detached context kept for the life of the module: timers are created
/// and stopped through it, so a blocked client's free callback can stop its
/// timer whatever context Redis hands that callback.
static TIMER_CTX: AtomicPtr<raw::RedisModuleCtx> = AtomicPtr::new(std::ptr::null_mut());
/// Deadline timers not yet fired or stopped (INFO, and unload's check).
static TIMERS: AtomicU64 = AtomicU64::new(0);

type Deadline = Box<dyn FnOnce() + Send>;

/// Called once from the module's init.
pub fn init(ctx: &Context) {
    // SAFETY: ctx is the live OnLoad context; the detached context it
    // returns is valid until freed, which we never do while loaded.
    let detached = unsafe { raw::RedisModule_GetDetachedThreadSafeContext.map(|f| f(ctx.ctx)) };
    if let Some(d) = detached {
        TIMER_CTX.store(d, Ordering::Release);
    }
}

pub fn live_timers() -> u64 {
    TIMERS.load(Ordering::Relaxed)
}

/// Runs `f` on the main thread after `ms` (0: the next event-loop turn).
pub fn after(ms: u64, f: Deadline) -> bool {
    let tctx = TIMER_CTX.load(Ordering::Acquire);
    // SAFETY: reading the API table Redis filled in at load.
    let create = unsafe { raw::RedisModule_CreateTimer };
    let (false, Some(create)) = (tctx.is_null(), create) else {
        return false;
    };
    let data = Box::into_raw(Box::new(f));
    // SAFETY: main thread, the module's detached context; `fire` takes the
    // Box back exactly once.
    unsafe {
        create(
            tctx,
            ms.min(i64::MAX as u64) as i64,
            Some(fire),
            data.cast(),
        )
    };
    TIMERS.fetch_add(1, Ordering::Relaxed);
    true
}

/// A `stats` field of INFO as an integer, read through the module's own
/// context (main thread).
pub fn server_stat(field: &std::ffi::CStr) -> Option<u64> {
    let tctx = TIMER_CTX.load(Ordering::Acquire);
    if tctx.is_null() {
        return None;
    }
    // SAFETY: main thread, live detached context; the info object is freed
    // before returning.
    unsafe {
        let info = raw::RedisModule_GetServerInfo?(tctx, c"stats".as_ptr());
        if info.is_null() {
            return None;
        }
        let mut err: c_int = 0;
        let v = raw::RedisModule_ServerInfoGetFieldUnsigned?(info, field.as_ptr(), &mut err);
        if let Some(free) = raw::RedisModule_FreeServerInfo {
            free(tctx, info);
        }
        (err == 0).then_some(v)
    }
}

/// Unload, or a failed load: frees the detached context. Only once no
/// timer is live (unload checks [`live_timers`]).
pub fn deinit() {
    let tctx = TIMER_CTX.swap(std::ptr::null_mut(), Ordering::AcqRel);
    if !tctx.is_null() {
        // SAFETY: the context came from GetDetachedThreadSafeContext and,
        // swapped out above, is freed once.
        unsafe {
            if let Some(free) = raw::RedisModule_FreeThreadSafeContext {
                free(tctx);
            }
        }
    }
}

/// What Redis holds for an unblocked client until it has replied.
struct Private {
    reply: Reply,
    /// The deadline timer to stop, unless the deadline itself replied.
    timer: Option<Timer>,
}

/// A deadline timer and whether it has fired: a fired timer's id may be
/// reused (ids are clock-based), so it is never stopped by id.
struct Timer {
    id: u64,
    fired: Arc<AtomicBool>,
}

/// A client blocked by FETCH. Consumed by [`Blocked::unblock`]; dropping it
/// unblocks with an error, so no path leaves a client blocked.
pub struct Blocked {
    bc: Option<NonNull<raw::RedisModuleBlockedClient>>,
    timer: Option<Timer>,
}

// SAFETY: the handle is only passed to RedisModule_UnblockClient, which
// Redis documents as callable from any thread, and `unblock` takes it by
// value, so it is used once.
unsafe impl Send for Blocked {}

impl Blocked {
    /// Blocks the calling client; `on_deadline` runs on the main thread
    /// after `timeout_ms` unless the client was answered first. None when
    /// Redis refuses to block or no timer can be made.
    pub fn new(ctx: &Context, timeout_ms: u64, on_deadline: Deadline) -> Option<Blocked> {
        let tctx = TIMER_CTX.load(Ordering::Acquire);
        // SAFETY: reading the API table Redis filled in at load.
        let create = unsafe { raw::RedisModule_CreateTimer };
        let (false, Some(create)) = (tctx.is_null(), create) else {
            return None;
        };
        // SAFETY: ctx is the live context of the running command; the
        // callbacks are extern "C" functions that catch every panic.
        let bc = unsafe {
            raw::RedisModule_BlockClient?(ctx.ctx, Some(on_reply), None, Some(free_private), 0)
        };
        let bc = NonNull::new(bc)?;
        let fired = Arc::new(AtomicBool::new(false));
        let flag = fired.clone();
        let on_deadline: Deadline = Box::new(move || {
            flag.store(true, Ordering::Release);
            on_deadline()
        });
        let data = Box::into_raw(Box::new(on_deadline));
        let period = timeout_ms.min(i64::MAX as u64) as i64;
        // SAFETY: tctx is the module's detached context; `data` is handed to
        // `fire` or reclaimed by `stop_timer`, exactly once.
        let id = unsafe { create(tctx, period, Some(fire), data.cast()) };
        TIMERS.fetch_add(1, Ordering::Relaxed);
        crate::redis::guard::note_blocked();
        Some(Blocked {
            bc: Some(bc),
            timer: Some(Timer { id, fired }),
        })
    }

    /// Answers the client. Call from any thread.
    pub fn unblock(mut self, reply: Reply) {
        self.release(reply);
    }

    /// Answers from the deadline callback, whose timer Redis is retiring.
    pub fn unblock_at_deadline(mut self, reply: Reply) {
        self.timer = None;
        self.release(reply);
    }

    fn release(&mut self, reply: Reply) {
        let Some(bc) = self.bc.take() else { return };
        let data = Box::into_raw(Box::new(Private {
            reply,
            timer: self.timer.take(),
        }));
        // SAFETY: `bc` came from RedisModule_BlockClient and `take` makes this
        // the only release; Redis hands `data` to on_reply (if the client is
        // still there) and then to free_private, which reclaims the Box.
        unsafe {
            if let Some(unblock) = raw::RedisModule_UnblockClient {
                unblock(bc.as_ptr(), data.cast());
            }
        }
    }
}

impl Drop for Blocked {
    fn drop(&mut self) {
        self.release(Reply::Error("ERR internal error: fill abandoned".into()));
    }
}

extern "C" fn on_reply(
    ctx: *mut raw::RedisModuleCtx,
    _: *mut *mut raw::RedisModuleString,
    _: c_int,
) -> c_int {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        let context = Context::new(ctx);
        // SAFETY: Redis calls this only for a client released by
        // UnblockClient, whose private data is our `Private` (or null).
        let data = unsafe { raw::RedisModule_GetBlockedClientPrivateData.map(|f| f(ctx)) };
        match data.and_then(|p| NonNull::new(p.cast::<Private>())) {
            // SAFETY: the Private stays alive until free_private, after this.
            Some(p) => send(&context, unsafe { &p.as_ref().reply }),
            None => send(
                &context,
                &Reply::Error("ERR internal error: no reply".into()),
            ),
        }
    }));
    raw::REDISMODULE_OK as c_int
}

extern "C" fn free_private(_: *mut raw::RedisModuleCtx, data: *mut c_void) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        if let Some(p) = NonNull::new(data.cast::<Private>()) {
            // SAFETY: `data` is the Box leaked in `release`; Redis frees it once.
            let private = unsafe { Box::from_raw(p.as_ptr()) };
            if let Some(t) = private.timer.filter(|t| !t.fired.load(Ordering::Acquire)) {
                stop_timer(t.id);
            }
        }
    }));
}

/// Stops a deadline timer that has not fired and drops its callback. Main
/// thread only (free_private runs there).
fn stop_timer(id: u64) {
    let tctx = TIMER_CTX.load(Ordering::Acquire);
    let mut data: *mut c_void = std::ptr::null_mut();
    // SAFETY: tctx is the module's detached context and we are on the main
    // thread; on success Redis hands back the `data` given to CreateTimer.
    let stopped = unsafe {
        raw::RedisModule_StopTimer
            .is_some_and(|f| f(tctx, id, &mut data) == raw::REDISMODULE_OK as c_int)
    };
    if stopped {
        TIMERS.fetch_sub(1, Ordering::Relaxed);
        if let Some(p) = NonNull::new(data.cast::<Deadline>()) {
            // SAFETY: the Box leaked in `Blocked::new`, never run.
            drop(unsafe { Box::from_raw(p.as_ptr()) });
        }
    }
}

extern "C" fn fire(_: *mut raw::RedisModuleCtx, data: *mut c_void) {
    TIMERS.fetch_sub(1, Ordering::Relaxed);
    if let Some(p) = NonNull::new(data.cast::<Deadline>()) {
        // SAFETY: the Box leaked in `Blocked::new`; Redis fires a timer once
        // and this timer was not stopped.
        let f = unsafe { Box::from_raw(p.as_ptr()) };
        let _ = catch_unwind(AssertUnwindSafe(f));
    }
}
