//! AICACHE.DEBUG: fault injection for tests, refused unless the server runs
//! with `enable-debug-command` (the same gate as Redis's own DEBUG, which
//! can crash the server outright).

use redis_module::{CallReply, Context, RedisError, RedisResult, RedisString, RedisValue};

use crate::commands::args::{is_word, unknown_option};
use crate::redis::ffi::{self, error};
use crate::redis::guard::{arm, Site};

fn debug_allowed(ctx: &Context) -> bool {
    let value = ffi::call(
        ctx,
        "CONFIG",
        &[b"GET", b"enable-debug-command"],
        false,
        |r| match r {
            CallReply::Array(a) => a.get(1).and_then(|v| v.ok()).map(|v| match v {
                CallReply::String(s) => s.as_bytes().to_vec(),
                _ => Vec::new(),
            }),
            _ => None,
        },
    );
    matches!(value, Ok(Some(v)) if v != b"no")
}

/// AICACHE.DEBUG PANIC COMMAND|INFO|WORKER
/// COMMAND panics in this handler; INFO and WORKER arm one panic in the
/// next INFO callback or worker job.
pub fn debug(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    if args.len() != 3 {
        return Err(RedisError::WrongArity);
    }
    if !debug_allowed(ctx) {
        return Err(error(
            "ERR AICACHE.DEBUG is disabled: start redis-server with enable-debug-command yes",
        ));
    }
    if !is_word(&args[1], "PANIC") {
        return Err(unknown_option(&args[1], "PANIC"));
    }
    let site = &args[2];
    if is_word(site, "COMMAND") {
        panic!("aicache: injected panic in a command handler");
    } else if is_word(site, "INFO") {
        arm(Site::Info);
    } else if is_word(site, "WORKER") {
        arm(Site::Worker);
    } else {
        return Err(unknown_option(site, "COMMAND, INFO or WORKER"));
    }
    Ok(RedisValue::SimpleStringStatic("OK"))
}
