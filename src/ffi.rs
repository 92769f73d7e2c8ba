//! The one place that talks to Redis below the command layer. Every hazard
//! listed in shared/field-notes.md is handled here, so command files never
//! build a `RedisString` from text, never reply with a simple string holding
//! user data, and never send an unsanitised error.

use redis_module::{
    raw, CallOptions, CallOptionsBuilder, CallReply, CallResult, Context, KeyType, RedisError,
    RedisString, RedisValue,
};

use crate::errors::sanitize;

/// Every error reply goes through here: printable ASCII, bounded.
pub fn error(msg: impl AsRef<str>) -> RedisError {
    RedisError::String(sanitize(msg.as_ref()))
}

fn call_options(replicate: bool) -> CallOptions {
    let b = CallOptionsBuilder::new().errors_as_replies();
    if replicate {
        b.replicate().build()
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
