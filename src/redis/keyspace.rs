//! What the semantic index needs from Redis: keyspace notifications (set,
//! del, expired, evicted...), loading events, SCAN and quiet reads. Every
//! callback is caught, so a panic never unwinds into Redis.

use std::os::raw::{c_char, c_int, c_void};
use std::panic::catch_unwind;
use std::sync::OnceLock;

use redis_module::{raw, CallOptionsBuilder, CallReply, CallResult, Context, RedisString};

type KeyHook = fn(db: i32, event: &[u8], key: &[u8]);

static KEY_HOOK: OnceLock<KeyHook> = OnceLock::new();

/// Calls `f` on the main thread (or a worker holding the lock) for every
/// generic, string, expired and evicted keyspace event, whatever
/// `notify-keyspace-events` says. `f` must only note the event: Redis
/// forbids writes here.
pub fn on_key_event(ctx: &Context, f: KeyHook) {
    extern "C" fn event(
        ctx: *mut raw::RedisModuleCtx,
        _: c_int,
        name: *const c_char,
        key: *mut raw::RedisModuleString,
    ) -> c_int {
        let _ = catch_unwind(|| {
            let Some(f) = KEY_HOOK.get() else { return };
            if name.is_null() || key.is_null() {
                return;
            }
            // SAFETY: Redis passes a NUL-terminated event name and a live
            // key string for the duration of this callback; the context's
            // selected DB is the event's.
            let (name, key, db) = unsafe {
                let name = std::ffi::CStr::from_ptr(name).to_bytes();
                let mut len = 0usize;
                let p =
                    raw::RedisModule_StringPtrLen.map_or(std::ptr::null(), |g| g(key, &mut len));
                if p.is_null() {
                    return;
                }
                let key = std::slice::from_raw_parts(p.cast::<u8>(), len);
                let db = raw::RedisModule_GetSelectedDb.map_or(0, |g| g(ctx));
                (name, key, db)
            };
            f(db, name, key);
        });
        raw::REDISMODULE_OK as c_int
    }
    let _ = KEY_HOOK.set(f);
    let types = raw::REDISMODULE_NOTIFY_GENERIC
        | raw::REDISMODULE_NOTIFY_STRING
        | raw::REDISMODULE_NOTIFY_EXPIRED
        | raw::REDISMODULE_NOTIFY_EVICTED;
    // SAFETY: subscribing with the live OnLoad context.
    unsafe {
        if let Some(sub) = raw::RedisModule_SubscribeToKeyspaceEvents {
            sub(ctx.ctx, types as c_int, Some(event));
        }
    }
}

static LOADING_HOOK: OnceLock<fn(bool)> = OnceLock::new();

/// Calls `f(false)` when Redis starts loading data (RDB, AOF, a
/// replica's full sync) and `f(true)` when loading ended or failed.
pub fn on_loading(ctx: &Context, f: fn(bool)) {
    extern "C" fn loading(
        _: *mut raw::RedisModuleCtx,
        _: raw::RedisModuleEvent,
        sub: u64,
        _: *mut c_void,
    ) {
        let _ = catch_unwind(|| {
            if let Some(f) = LOADING_HOOK.get() {
                f(matches!(
                    sub,
                    raw::REDISMODULE_SUBEVENT_LOADING_ENDED
                        | raw::REDISMODULE_SUBEVENT_LOADING_FAILED
                ));
            }
        });
    }
    let _ = LOADING_HOOK.set(f);
    let event = raw::RedisModuleEvent {
        id: raw::REDISMODULE_EVENT_LOADING,
        dataver: 1,
    };
    raw::subscribe_to_server_event(ctx.ctx, event, Some(loading));
}

/// One SCAN step of the selected DB over keys matching `pattern`: the
/// next cursor (0 at the end) and the keys. None when SCAN failed.
pub fn scan(
    ctx: &Context,
    cursor: u64,
    pattern: &[u8],
    count: usize,
) -> Option<(u64, Vec<Vec<u8>>)> {
    let opts = CallOptionsBuilder::new().errors_as_replies().build();
    let cur = cursor.to_string();
    let count = count.to_string();
    let args: [&[u8]; 5] = [
        cur.as_bytes(),
        b"MATCH",
        pattern,
        b"COUNT",
        count.as_bytes(),
    ];
    let res: CallResult<'static> = ctx.call_ext("SCAN", &opts, &args);
    let Ok(CallReply::Array(a)) = res else {
        return None;
    };
    let next = match a.get(0) {
        Some(Ok(CallReply::String(s))) => std::str::from_utf8(s.as_bytes()).ok()?.parse().ok()?,
        _ => return None,
    };
    let mut keys = Vec::new();
    if let Some(Ok(CallReply::Array(names))) = a.get(1) {
        for n in names.iter() {
            if let Ok(CallReply::String(s)) = n {
                keys.push(s.as_bytes().to_vec());
            }
        }
    }
    Some((next, keys))
}

/// A copy of string key `key` in the selected DB, read without touching
/// its LRU/LFU clock or the keyspace hit counters: the index's own reads
/// must not change what gets evicted. None for a missing key or another type.
pub fn read_quiet(ctx: &Context, key: &[u8]) -> Option<Vec<u8>> {
    let name = RedisString::create_from_slice(ctx.ctx, key);
    let mode = raw::REDISMODULE_READ
        | raw::REDISMODULE_OPEN_KEY_NOTOUCH
        | raw::REDISMODULE_OPEN_KEY_NOSTATS;
    // SAFETY: reading the API table Redis filled in at load.
    let (open, kind, dma, close) = unsafe {
        (
            raw::RedisModule_OpenKey?,
            raw::RedisModule_KeyType?,
            raw::RedisModule_StringDMA?,
            raw::RedisModule_CloseKey?,
        )
    };
    // SAFETY: called with the Redis lock held for `ctx`; the key handle is
    // closed before returning, and the DMA pointer is read only while it
    // is open.
    unsafe {
        let k = open(ctx.ctx, name.inner, mode as c_int);
        if k.is_null() {
            return None;
        }
        let out = if kind(k) == raw::REDISMODULE_KEYTYPE_STRING as c_int {
            let mut len = 0usize;
            let p = dma(k, &mut len, raw::REDISMODULE_READ as c_int);
            (!p.is_null()).then(|| std::slice::from_raw_parts(p.cast::<u8>(), len).to_vec())
        } else {
            None
        };
        close(k);
        out
    }
}
