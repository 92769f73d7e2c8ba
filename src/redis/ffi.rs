//! The one place that talks to Redis below the command layer. Every hazard
//! listed in shared/field-notes.md is handled here, so command files never
//! build a `RedisString` from text, never reply with a simple string holding
//! user data, and never send an unsanitised error.

use std::os::raw::{c_int, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::NonNull;
use std::sync::Arc;

use redis_module::{
    raw, CallOptions, CallOptionsBuilder, CallReply, CallResult, Context, ContextFlags, KeyType,
    RedisError, RedisString, RedisValue,
};

use crate::model::codec::fp32_to_json;
use crate::model::errors::sanitize;
use crate::stats::STATS;

/// Every error reply goes through here: printable ASCII, bounded.
pub fn error(msg: impl AsRef<str>) -> RedisError {
    RedisError::String(sanitize(msg.as_ref()))
}

fn call_options(replicate: bool) -> CallOptions {
    let b = CallOptionsBuilder::new().errors_as_replies();
    if replicate {
        // Script mode makes a write obey min-replicas-to-write and refuse
        // after a failed save (MISCONF), as a client's own write would.
        b.replicate().script_mode().build()
    } else {
        b.build()
    }
}

/// Runs a command with binary-safe arguments. `replicate` sends the command
/// to replicas and the AOF as an effect of the calling command.
pub fn call<T>(
    ctx: &Context,
    cmd: &str,
    args: &[&[u8]],
    replicate: bool,
    read: impl FnOnce(CallReply<'_>) -> T,
) -> Result<T, RedisError> {
    let res: CallResult<'static> = ctx.call_ext(cmd, &call_options(replicate), args);
    match res {
        Ok(reply) => Ok(read(reply)),
        Err(e) => Err(error(String::from_utf8_lossy(e.as_bytes()))),
    }
}

/// The value of a string key, or `None` when the key does not exist.
/// A key of another type is a WRONGTYPE error.
pub fn with_string<T>(
    ctx: &Context,
    key: &[u8],
    f: impl FnOnce(Option<&[u8]>) -> T,
) -> Result<T, RedisError> {
    let name = RedisString::create_from_slice(ctx.ctx, key);
    let k = ctx.open_key(&name);
    match k.key_type() {
        KeyType::Empty => Ok(f(None)),
        KeyType::String => {
            let v = k.read().map_err(|_| error("ERR could not read entry"))?;
            Ok(f(Some(v.unwrap_or(&[]))))
        }
        _ => Err(error(
            "WRONGTYPE Operation against a key holding the wrong kind of value",
        )),
    }
}

/// Replies with `bytes` as a bulk string straight from the caller's buffer
/// (no copy into a `Vec`), then tells the macro glue that the reply is sent.
pub fn reply_bytes(ctx: &Context, bytes: &[u8]) -> RedisValue {
    raw::reply_with_string_buffer(ctx.ctx, bytes.as_ptr().cast(), bytes.len());
    RedisValue::NoReply
}

/// `SET key value [PXAT ms]` replicated as written: the absolute expiry means
/// replicas and AOF replay keep the master's jittered deadline.
pub fn set_string(
    ctx: &Context,
    key: &[u8],
    value: &[u8],
    expire_at_ms: Option<u64>,
) -> Result<(), RedisError> {
    match expire_at_ms {
        Some(at) => {
            let at = at.to_string();
            call(
                ctx,
                "SET",
                &[key, value, b"PXAT", at.as_bytes()],
                true,
                |_| (),
            )
        }
        None => call(ctx, "SET", &[key, value], true, |_| ()),
    }
}

/// Reads an integer stored as a string reply (HGET and friends).
pub fn reply_as_u64(reply: CallReply<'_>) -> Option<u64> {
    match reply {
        CallReply::String(s) => std::str::from_utf8(s.as_bytes()).ok()?.parse().ok(),
        CallReply::I64(i) => u64::try_from(i.to_i64()).ok(),
        _ => None,
    }
}

/// Reads an integer reply (DEL and friends).
pub fn reply_as_i64(reply: CallReply<'_>) -> i64 {
    match reply {
        CallReply::I64(i) => i.to_i64(),
        _ => 0,
    }
}

/// Starts an array reply of `len` elements; the caller sends each one.
pub fn reply_array(ctx: &Context, len: usize) {
    raw::reply_with_array(ctx.ctx, len as std::os::raw::c_long);
}

/// Sends a nil element (RESP2 null bulk, RESP3 null).
pub fn reply_null(ctx: &Context) -> RedisValue {
    raw::reply_with_null(ctx.ctx);
    RedisValue::NoReply
}

/// What a blocked FETCH finally receives.
pub enum Reply {
    Error(String),
    Bulk(Arc<[u8]>),
    /// One element per input; JSON renders each vector as a number array.
    Vectors(Vec<Arc<[u8]>>, bool),
}

fn send(ctx: &Context, reply: &Reply) {
    match reply {
        Reply::Error(e) => {
            ctx.reply(Err(error(e)));
        }
        Reply::Bulk(b) => {
            reply_bytes(ctx, b);
        }
        Reply::Vectors(items, json) => {
            reply_array(ctx, items.len());
            for v in items {
                if *json {
                    reply_bytes(ctx, &fp32_to_json(v));
                } else {
                    reply_bytes(ctx, v);
                }
            }
        }
    }
}

/// Replies on the main thread, without blocking.
pub fn send_now(ctx: &Context, reply: Reply) -> RedisValue {
    send(ctx, &reply);
    RedisValue::NoReply
}

/// A client blocked by FETCH. `unblock` consumes it, and dropping it
/// unblocks with an error, so every blocked client is released exactly once
/// (Redis frees the handle and our reply only then, even for a client that
/// timed out or disconnected meanwhile).
pub struct Blocked(Option<NonNull<raw::RedisModuleBlockedClient>>);

// SAFETY: the handle is only passed to RedisModule_UnblockClient, which Redis
// documents as callable from any thread, and `unblock` takes it by value, so
// it is used once.
unsafe impl Send for Blocked {}

impl Blocked {
    /// Blocks the calling client for at most `timeout_ms`; Redis itself then
    /// replies through `on_timeout`. None when Redis refuses to block.
    pub fn new(ctx: &Context, timeout_ms: u64) -> Option<Blocked> {
        // SAFETY: ctx is the live context of the command being run, and
        // the callbacks are `extern "C"` functions that never unwind.
        let bc = unsafe {
            raw::RedisModule_BlockClient?(
                ctx.ctx,
                Some(on_reply),
                Some(on_timeout),
                Some(free_reply),
                timeout_ms.min(i64::MAX as u64) as i64,
            )
        };
        NonNull::new(bc).map(|p| Blocked(Some(p)))
    }

    pub fn unblock(mut self, reply: Reply) {
        self.release(reply);
    }

    fn release(&mut self, reply: Reply) {
        let Some(bc) = self.0.take() else { return };
        let data = Box::into_raw(Box::new(reply));
        // SAFETY: `bc` came from RedisModule_BlockClient and `take` makes this
        // the only release; Redis hands `data` to on_reply and then to
        // free_reply, which turns it back into the Box.
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
        // UnblockClient, whose private data is our Reply (or null).
        let data = unsafe { raw::RedisModule_GetBlockedClientPrivateData.map(|f| f(ctx)) };
        match data.and_then(|p| NonNull::new(p.cast::<Reply>())) {
            // SAFETY: the Reply stays alive until free_reply runs, after this.
            Some(r) => send(&context, unsafe { r.as_ref() }),
            None => send(
                &context,
                &Reply::Error("ERR internal error: no reply".into()),
            ),
        }
    }));
    raw::REDISMODULE_OK as c_int
}

extern "C" fn on_timeout(
    ctx: *mut raw::RedisModuleCtx,
    _: *mut *mut raw::RedisModuleString,
    _: c_int,
) -> c_int {
    let _ = catch_unwind(|| {
        STATS.wait_timeouts.incr();
        let msg = "ERR timed out waiting for the upstream fill (TIMEOUT option or aicache.wait-timeout-ms)";
        send(&Context::new(ctx), &Reply::Error(msg.into()));
    });
    raw::REDISMODULE_OK as c_int
}

extern "C" fn free_reply(_: *mut raw::RedisModuleCtx, data: *mut c_void) {
    if let Some(p) = NonNull::new(data.cast::<Reply>()) {
        // SAFETY: `data` is the Box leaked in `release`; Redis frees it once.
        let _ = catch_unwind(AssertUnwindSafe(|| {
            drop(unsafe { Box::from_raw(p.as_ptr()) })
        }));
    }
}

/// The DB the calling client has selected.
pub fn selected_db(ctx: &Context) -> i32 {
    // SAFETY: a plain getter on the live command context.
    unsafe { raw::RedisModule_GetSelectedDb.map_or(0, |f| f(ctx.ctx)) }
}

/// Points `ctx` (a worker's thread-safe context, under the lock) at `db`.
pub fn select_db(ctx: &Context, db: i32) -> bool {
    // SAFETY: the caller holds the Redis lock for `ctx`.
    unsafe {
        raw::RedisModule_SelectDb.is_some_and(|f| f(ctx.ctx, db) == raw::REDISMODULE_OK as c_int)
    }
}

/// True when a worker may write now: this node is a master and writes are
/// not paused (CLIENT PAUSE WRITE, failover). Call under the lock.
pub fn may_write(ctx: &Context) -> bool {
    let flags = ctx.get_flags();
    // SAFETY: a getter, called with the Redis lock held.
    let avoid = unsafe { raw::RedisModule_AvoidReplicaTraffic.is_some_and(|f| f() != 0) };
    flags.contains(ContextFlags::MASTER) && !flags.contains(ContextFlags::READONLY) && !avoid
}

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
