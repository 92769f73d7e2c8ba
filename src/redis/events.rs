//! Server events the module follows: shutdown, CONFIG RESETSTAT, and
//! FLUSHDB/FLUSHALL/SWAPDB/role changes. Each hook is caught, so a panic
//! in one never unwinds into Redis.

use std::os::raw::{c_int, c_void};
use std::panic::catch_unwind;

use redis_module::{raw, Context};

/// Calls `f` when Redis starts shutting down.
pub fn on_shutdown(ctx: &Context, f: fn()) {
    static HOOK: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();
    extern "C" fn shutdown_event(
        _: *mut raw::RedisModuleCtx,
        _: raw::RedisModuleEvent,
        _: u64,
        _: *mut c_void,
    ) {
        if let Some(f) = HOOK.get() {
            let _ = catch_unwind(f);
        }
    }
    let _ = HOOK.set(f);
    let event = raw::RedisModuleEvent {
        id: raw::REDISMODULE_EVENT_SHUTDOWN,
        dataver: 1,
    };
    raw::subscribe_to_server_event(ctx.ctx, event, Some(shutdown_event));
}

/// Calls `f` after `CONFIG RESETSTAT` has run. Redis has no event for it,
/// and a command filter sees commands before authentication, ACLs and
/// MULTI queuing, so the filter only notes the command (two byte
/// compares, no allocation) and the next event-loop turn checks that
/// Redis's own counters really were reset.
pub fn on_resetstat(ctx: &Context, f: fn()) {
    extern "C" fn filter(fctx: *mut raw::RedisModuleCommandFilterCtx) {
        let _ = catch_unwind(|| {
            // SAFETY: fctx is the live filter context; the arguments are
            // owned by the command and read at once.
            let is = |i: c_int, word: &[u8]| unsafe {
                let s = raw::RedisModule_CommandFilterArgGet
                    .map_or(std::ptr::null_mut(), |g| g(fctx, i));
                let mut len = 0usize;
                let p = if s.is_null() {
                    std::ptr::null()
                } else {
                    raw::RedisModule_StringPtrLen.map_or(std::ptr::null(), |g| g(s, &mut len))
                };
                !p.is_null()
                    && std::slice::from_raw_parts(p.cast::<u8>(), len).eq_ignore_ascii_case(word)
            };
            // SAFETY: as above.
            let argc = unsafe { raw::RedisModule_CommandFilterArgsCount.map_or(0, |g| g(fctx)) };
            if argc == 2 && is(0, b"config") && is(1, b"resetstat") {
                verify_reset();
            }
        });
    }
    let _ = RESET_HOOK.set(f);
    // SAFETY: registering a filter with the live OnLoad context.
    unsafe {
        if let Some(register) = raw::RedisModule_RegisterCommandFilter {
            register(
                ctx.ctx,
                Some(filter),
                raw::REDISMODULE_CMDFILTER_NOSELF as c_int,
            );
        }
    }

    fn verify_reset() {
        let before = reset_stats();
        crate::redis::blocked::after(
            0,
            Box::new(move || {
                let now = reset_stats();
                // Any of them going down means resetServerStats ran; several,
                // because commands later in the same event-loop turn count up
                // again.
                let down = |(b, n): (&Option<u64>, &Option<u64>)| matches!((b, n), (Some(b), Some(n)) if n < b);
                if before.iter().zip(&now).any(down) {
                    fire_reset();
                }
                note_commands(now[0]);
            }),
        );
    }
}

/// Redis counters that CONFIG RESETSTAT sets back to zero.
fn reset_stats() -> [Option<u64>; 3] {
    use crate::redis::blocked::server_stat;
    [
        server_stat(c"total_commands_processed"),
        server_stat(c"total_net_input_bytes"),
        server_stat(c"total_connections_received"),
    ]
}

static RESET_HOOK: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();
/// `total_commands_processed` when last looked at.
static LAST_COMMANDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn fire_reset() {
    if let Some(f) = RESET_HOOK.get() {
        f();
    }
}

fn note_commands(now: Option<u64>) {
    if let Some(n) = now {
        LAST_COMMANDS.store(n, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Called from INFO: a reset the filter did not see (one run by EXEC)
/// shows as Redis's command count below what it was at the last look.
pub fn recheck_reset() {
    let now = crate::redis::blocked::server_stat(c"total_commands_processed");
    if now.is_some_and(|n| n < LAST_COMMANDS.load(std::sync::atomic::Ordering::Relaxed)) {
        fire_reset();
    }
    note_commands(now);
}

/// Calls `f(Some(db))` after FLUSHDB, `f(None)` after FLUSHALL, SWAPDB and
/// a replication role change (the data may have changed under us).
pub fn on_flush(ctx: &Context, f: fn(Option<i32>)) {
    static HOOK: std::sync::OnceLock<fn(Option<i32>)> = std::sync::OnceLock::new();
    extern "C" fn flushed(
        _: *mut raw::RedisModuleCtx,
        event: raw::RedisModuleEvent,
        _: u64,
        data: *mut c_void,
    ) {
        let _ = catch_unwind(|| {
            let Some(f) = HOOK.get() else { return };
            if event.id == raw::REDISMODULE_EVENT_FLUSHDB && !data.is_null() {
                // SAFETY: Redis passes a RedisModuleFlushInfo for this event.
                let db = unsafe { (*data.cast::<raw::RedisModuleFlushInfo>()).dbnum };
                f((db >= 0).then_some(db));
            } else {
                f(None);
            }
        });
    }
    let _ = HOOK.set(f);
    for id in [
        raw::REDISMODULE_EVENT_FLUSHDB,
        raw::REDISMODULE_EVENT_SWAPDB,
        raw::REDISMODULE_EVENT_REPLICATION_ROLE_CHANGED,
    ] {
        let event = raw::RedisModuleEvent { id, dataver: 1 };
        raw::subscribe_to_server_event(ctx.ctx, event, Some(flushed));
    }
}
