//! The one place that talks to Redis below the command layer. Every hazard
//! listed in shared/field-notes.md is handled here, so command files never
//! build a `RedisString` from text, never reply with a simple string holding
//! user data, and never send an unsanitised error.

use std::os::raw::{c_int, c_void};
use std::sync::Mutex;

use redis_module::{
    raw, CallOptions, CallOptionsBuilder, CallReply, CallResult, Context, ContextFlags, KeyType,
    RedisError, RedisString, RedisValue,
};

use crate::model::codec::fp32_to_json;
use crate::model::errors::sanitize;
use crate::model::reply::{Item, Meta, Reply, Status};

const WRONGTYPE: &str = "WRONGTYPE Operation against a key holding the wrong kind of value";

/// Every error reply goes through here: printable ASCII, bounded.
pub fn error(msg: impl AsRef<str>) -> RedisError {
    RedisError::String(sanitize(msg.as_ref()))
}

fn call_options(replicate: bool, check_oom: bool) -> CallOptions {
    let mut b = CallOptionsBuilder::new().errors_as_replies();
    if replicate {
        // Script mode makes a write obey min-replicas-to-write and refuse
        // after a failed save (MISCONF), as a client's own write would.
        b = b.replicate().script_mode();
    }
    if check_oom {
        // From a worker this checks the memory in use at this very call.
        b = b.verify_oom();
    }
    b.build()
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
    call_checked(ctx, cmd, args, replicate, false, read)
}

/// [`call`], refused like a client's write when Redis is over `maxmemory`
/// and `check_oom` is set.
pub fn call_checked<T>(
    ctx: &Context,
    cmd: &str,
    args: &[&[u8]],
    replicate: bool,
    check_oom: bool,
    read: impl FnOnce(CallReply<'_>) -> T,
) -> Result<T, RedisError> {
    let res: CallResult<'static> = ctx.call_ext(cmd, &call_options(replicate, check_oom), args);
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
        _ => Err(error(WRONGTYPE)),
    }
}

/// A key opened for the module's own bookkeeping reads: no LRU/LFU touch,
/// and (Redis 7.2+; 7.0 ignores the flag) no keyspace hit/miss counted.
/// Raw, because redis-module 2.0.8's `RedisKey::to_raw_parts` does not
/// give up ownership (the key would be closed twice).
struct QuietKey {
    key: *mut raw::RedisModuleKey,
    // Kept until the key is closed.
    _name: RedisString,
}

impl QuietKey {
    fn open(ctx: &Context, key: &[u8]) -> Self {
        let name = RedisString::create_from_slice(ctx.ctx, key);
        let mode = raw::REDISMODULE_READ
            | raw::REDISMODULE_OPEN_KEY_NOTOUCH
            | raw::REDISMODULE_OPEN_KEY_NOSTATS;
        // SAFETY: called on the main thread (or under the lock) with a live
        // context and key name; the handle is closed once, in `drop`.
        let key = unsafe { raw::RedisModule_OpenKey.unwrap()(ctx.ctx, name.inner, mode as c_int) };
        QuietKey { key, _name: name }
    }

    fn key_type(&self) -> KeyType {
        if self.key.is_null() {
            return KeyType::Empty;
        }
        // SAFETY: a non-null handle from RM_OpenKey, not yet closed.
        unsafe { raw::RedisModule_KeyType.unwrap()(self.key) }.into()
    }
}

impl Drop for QuietKey {
    fn drop(&mut self) {
        if !self.key.is_null() {
            // SAFETY: the handle is open and this is its only close.
            unsafe { raw::RedisModule_CloseKey.unwrap()(self.key) };
        }
    }
}

/// Integer fields of the hash at `key` (binary-safe field names): `None`
/// when there is no such key; a missing or non-numeric field is `None`.
pub fn hash_u64s(
    ctx: &Context,
    key: &[u8],
    fields: &[&[u8]],
) -> Result<Option<Vec<Option<u64>>>, RedisError> {
    let k = QuietKey::open(ctx, key);
    match k.key_type() {
        KeyType::Empty => return Ok(None),
        KeyType::Hash => {}
        _ => return Err(error(WRONGTYPE)),
    }
    let mut out = Vec::with_capacity(fields.len());
    for f in fields {
        let name = RedisString::create_from_slice(ctx.ctx, f);
        let mut value: *mut raw::RedisModuleString = std::ptr::null_mut();
        // SAFETY: `k.key` is an open hash key of this context. With
        // REDISMODULE_HASH_NONE, HashGet takes (field string, out pointer)
        // pairs ended by NULL, and sets `value` to a new string (or leaves
        // it NULL when the field is absent).
        let status = unsafe {
            raw::RedisModule_HashGet.unwrap()(
                k.key,
                raw::REDISMODULE_HASH_NONE as c_int,
                name.inner,
                &mut value as *mut *mut raw::RedisModuleString,
                std::ptr::null_mut::<c_void>(),
            )
        };
        let v = (status == raw::REDISMODULE_OK as c_int && !value.is_null()).then(|| {
            // Owns the string HashGet made, and frees it on drop.
            let s = RedisString::from_redis_module_string(ctx.ctx, value);
            std::str::from_utf8(s.as_slice()).ok()?.parse().ok()
        });
        out.push(v.flatten());
    }
    Ok(Some(out))
}

/// The remaining TTL of `key` in ms, as PTTL answers it (-1: no expiry,
/// -2: no such key), without running a command.
pub fn pttl(ctx: &Context, key: &[u8]) -> i64 {
    let k = QuietKey::open(ctx, key);
    if k.key_type() == KeyType::Empty {
        return -2;
    }
    // SAFETY: `k.key` is an open, non-empty key of this context; GetExpire
    // only reads it.
    let ms = unsafe { raw::RedisModule_GetExpire.unwrap()(k.key) };
    if ms == raw::REDISMODULE_NO_EXPIRE as i64 {
        -1
    } else {
        ms.max(0)
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
    set_string_checked(ctx, key, value, expire_at_ms, false)
}

/// [`set_string`], refused over `maxmemory` when `check_oom` is set.
pub fn set_string_checked(
    ctx: &Context,
    key: &[u8],
    value: &[u8],
    expire_at_ms: Option<u64>,
    check_oom: bool,
) -> Result<(), RedisError> {
    match expire_at_ms {
        Some(at) => {
            let at = at.to_string();
            let args: [&[u8]; 4] = [key, value, b"PXAT", at.as_bytes()];
            call_checked(ctx, "SET", &args, true, check_oom, |_| ())
        }
        None => call_checked(ctx, "SET", &[key, value], true, check_oom, |_| ()),
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

/// Runs a read command and, when it answers a non-empty array, sends that
/// array to the client as is. Returns the array's length (0: nothing sent).
pub fn reply_if_entries(ctx: &Context, cmd: &str, args: &[&[u8]]) -> Result<usize, RedisError> {
    let opts = CallOptionsBuilder::new().errors_as_replies().build();
    let res: CallResult<'static> = ctx.call_ext(cmd, &opts, args);
    match res {
        Ok(CallReply::Array(a)) if a.len() > 0 => {
            // SAFETY: the reply is alive until `a` drops, after this call;
            // Redis copies it into the client's output.
            unsafe {
                if let Some(f) = raw::RedisModule_ReplyWithCallReply {
                    f(ctx.ctx, a.get_raw());
                }
            }
            Ok(a.len())
        }
        Ok(_) => Ok(0),
        Err(e) => Err(error(String::from_utf8_lossy(e.as_bytes()))),
    }
}

/// The id of a Stream's last entry and whether that entry is an end
/// entry (its first field is `end`); None for a missing or empty key.
pub fn last_stream_entry(ctx: &Context, key: &[u8]) -> Result<Option<(String, bool)>, RedisError> {
    let opts = CallOptionsBuilder::new().errors_as_replies().build();
    let args: [&[u8]; 5] = [key, b"+", b"-", b"COUNT", b"1"];
    let res: CallResult<'static> = ctx.call_ext("XREVRANGE", &opts, &args);
    let bytes = |r: Option<CallResult<'_>>| match r {
        Some(Ok(CallReply::String(s))) => Some(s.as_bytes().to_vec()),
        _ => None,
    };
    match res {
        Ok(CallReply::Array(entries)) => {
            let Some(Ok(CallReply::Array(entry))) = entries.get(0) else {
                return Ok(None);
            };
            let Some(id) = bytes(entry.get(0)) else {
                return Ok(None);
            };
            let first_field = match entry.get(1) {
                Some(Ok(CallReply::Array(fields))) => bytes(fields.get(0)),
                _ => None,
            };
            let is_end =
                crate::model::frames::is_end_entry(&[first_field.as_deref().unwrap_or(b"")]);
            Ok(Some((String::from_utf8_lossy(&id).into_owned(), is_end)))
        }
        Ok(_) => Ok(None),
        Err(e) => Err(error(String::from_utf8_lossy(e.as_bytes()))),
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

/// Renders a reply on the main thread.
pub fn send(ctx: &Context, reply: &Reply) {
    match reply {
        Reply::Error(e) => {
            ctx.reply(Err(error(e)));
        }
        Reply::Bulk(b) => {
            reply_bytes(ctx, b);
        }
        Reply::Items { items, json } => {
            reply_array(ctx, items.len());
            for item in items {
                match item {
                    Item::Value(v) if *json => {
                        reply_bytes(ctx, &fp32_to_json(v));
                    }
                    Item::Value(v) => {
                        reply_bytes(ctx, v);
                    }
                    Item::Error(e) => {
                        raw::reply_with_error(ctx.ctx, to_cstring(e).as_ptr());
                    }
                }
            }
        }
        Reply::Array(items) => {
            reply_array(ctx, items.len());
            for r in items {
                send(ctx, r);
            }
        }
        Reply::WithMeta { inner, .. } if matches!(**inner, Reply::Error(_)) => send(ctx, inner),
        Reply::WithMeta {
            inner,
            meta,
            single,
        } => {
            // Everything read before the first byte goes out, so the
            // arrays are never cut short.
            let ttls: Vec<i64> = meta
                .iter()
                .map(|m| if m.stored { pttl(ctx, &m.key) } else { -2 })
                .collect();
            reply_array(ctx, 2);
            send(ctx, inner);
            if !single {
                reply_array(ctx, meta.len());
            }
            for (m, ttl) in meta.iter().zip(ttls) {
                send_meta(ctx, m, ttl);
            }
        }
    }
}

/// `[status, age_ms, ttl_ms]`. The TTL was read at reply time, in the
/// caller's DB: -1 no expiry, -2 nothing stored. The age is 0 for an entry
/// this call (or the fill it joined) just fetched, and -1 (unknown) for a
/// hit: entries do not record when they were written.
fn send_meta(ctx: &Context, m: &Meta, ttl: i64) {
    let age = match m.status {
        Status::Hit => -1,
        Status::Miss | Status::Coalesced | Status::Fallback => 0,
        // The similar entry's write time is unknown, as for a hit.
        Status::Similar => -1,
    };
    reply_array(ctx, 3);
    reply_bytes(ctx, m.status.word());
    raw::reply_with_long_long(ctx.ctx, age);
    raw::reply_with_long_long(ctx.ctx, ttl);
}

/// An error for the wire: sanitised, so it holds no NUL.
fn to_cstring(msg: &str) -> std::ffi::CString {
    std::ffi::CString::new(sanitize(msg)).unwrap_or_default()
}

/// Replies on the main thread, without blocking.
pub fn send_now(ctx: &Context, reply: Reply) -> RedisValue {
    send(ctx, &reply);
    RedisValue::NoReply
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

/// Whether a worker may write now, read under the lock.
pub enum WriteState {
    Writable,
    /// CLIENT PAUSE WRITE or a failover in progress: wait.
    Paused,
    /// A replica, or read-only: never here.
    NotMaster,
}

pub fn write_state(ctx: &Context) -> WriteState {
    let flags = ctx.get_flags();
    if !flags.contains(ContextFlags::MASTER) || flags.contains(ContextFlags::READONLY) {
        return WriteState::NotMaster;
    }
    // SAFETY: a getter, called with the Redis lock held.
    if unsafe { raw::RedisModule_AvoidReplicaTraffic.is_some_and(|f| f() != 0) } {
        return WriteState::Paused;
    }
    WriteState::Writable
}

/// Memory state for a worker about to write, read under the lock.
pub enum Memory {
    /// No limit in the way.
    Fine,
    /// Over `maxmemory`: a client's write would be refused now.
    Over,
    /// A limit without eviction: check every write, as Redis would.
    Strict,
}

pub fn memory(ctx: &Context) -> Memory {
    let flags = ctx.get_flags();
    if !flags.contains(ContextFlags::MAXMEMORY) {
        return Memory::Fine;
    }
    if flags.contains(ContextFlags::EVICTED) {
        // Redis evicts at the start of its next command, so a full cache
        // sits just over the limit between commands: write, as a client's
        // write would be allowed. Refuse only far past the limit, where
        // eviction finds nothing to free (volatile-* with no TTLs).
        // SAFETY: a plain getter, called with the Redis lock held.
        let ratio = unsafe { raw::RedisModule_GetUsedMemoryRatio.map_or(0.0, |f| f()) };
        return if ratio > EVICTING_SLACK {
            Memory::Over
        } else {
            Memory::Fine
        };
    }
    if flags.contains(ContextFlags::OOM) {
        Memory::Over
    } else {
        Memory::Strict
    }
}

/// How far past `maxmemory` fills still write under an eviction policy.
const EVICTING_SLACK: f32 = 1.1;

/// A string config's value as Redis reads it: Redis copies the bytes and
/// never frees what a getter returns, so the config owns it and replaces
/// it only when the value changes.
pub struct OwnedString(Mutex<Option<RedisString>>);

// SAFETY: the string is created with no context (not tied to a client) and
// only read or replaced under the mutex; Redis calls config getters and
// setters on the main thread.
unsafe impl Send for OwnedString {}
// SAFETY: as above, every access goes through the mutex.
unsafe impl Sync for OwnedString {}

impl OwnedString {
    pub const fn new() -> Self {
        OwnedString(Mutex::new(None))
    }

    /// A borrowed handle for a config getter: Redis must not free it.
    pub fn get(&self, value: &str) -> RedisString {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if g.as_ref().map(|s| s.as_slice()) != Some(value.as_bytes()) {
            *g = Some(RedisString::create_from_slice(
                std::ptr::null_mut(),
                value.as_bytes(),
            ));
        }
        let inner = g.as_ref().map_or(std::ptr::null_mut(), |s| s.inner);
        RedisString::from_redis_module_string(std::ptr::null_mut(), inner)
    }
}

/// The calling client's ACL user name; None for a call with no client
/// user (a module's RM_Call without the `C` flag), where Redis's own
/// current-user getter would read a null user.
pub fn user_name(ctx: &Context) -> Option<Vec<u8>> {
    // SAFETY: getters on the live command context; the returned string is
    // ours to free, and is read before it is freed.
    unsafe {
        let id = raw::RedisModule_GetClientId?(ctx.ctx);
        if id == 0 {
            return None;
        }
        let s = raw::RedisModule_GetClientUserNameById?(ctx.ctx, id);
        if s.is_null() {
            return None;
        }
        let mut len = 0usize;
        let p = raw::RedisModule_StringPtrLen?(s, &mut len);
        let name = (!p.is_null()).then(|| std::slice::from_raw_parts(p.cast::<u8>(), len).to_vec());
        if let Some(free) = raw::RedisModule_FreeString {
            free(ctx.ctx, s);
        }
        name
    }
}
