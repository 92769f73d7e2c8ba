//! AICACHE.THROTTLE: the sliding-window limiter of window.rs on a Redis key.
//! The key holds the window's fixed-size state as a plain string, written
//! as `SET key state PXAT t`, so replicas and AOF replay get the master's
//! exact state and never consult their own clocks.

use redis_module::{Context, RedisError, RedisResult, RedisString, RedisValue};

use crate::commands::args::{is_word, number, unknown_option};
use crate::model::ttl::now_us;
use crate::model::window::Window;
use crate::redis::ffi::{self, error};

/// Largest `max` and `COST`: far above any real quota, far below overflow.
pub const MAX_AMOUNT: u64 = 1 << 53;
/// Longest window: one year.
pub const MAX_WINDOW_MS: u64 = 366 * 86_400_000;

fn ms(us: u64) -> i64 {
    us.div_ceil(1000) as i64
}

/// AICACHE.THROTTLE key max window-ms [COST n]
/// -> [allowed, limit, remaining, retry_after_ms, reset_after_ms]
pub fn throttle(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    let cost = match args.len() {
        4 => 1,
        6 if is_word(&args[4], "COST") => number(Some(&args[5]), "COST", 1, MAX_AMOUNT)?,
        5 | 6 => return Err(unknown_option(&args[4], "COST n")),
        _ => return Err(RedisError::WrongArity),
    };
    let max = number(Some(&args[2]), "max", 1, MAX_AMOUNT)?;
    let window_us = number(Some(&args[3]), "window-ms", 1, MAX_WINDOW_MS)? * 1000;
    let key = args[1].as_slice();
    let stored = ffi::with_string(ctx, key, |v| v.map(Window::decode))?;
    let mut window = match stored {
        None => Window::new(window_us),
        Some(None) => {
            return Err(error(
                "ERR key holds a string that is not AICACHE.THROTTLE state",
            ))
        }
        // A new window length starts afresh: old buckets have another width.
        Some(Some(w)) if w.window_us() != window_us => Window::new(window_us),
        Some(Some(w)) => w,
    };
    let now = now_us();
    let d = window.check(now, max, cost);
    if d.allowed {
        let expire_at = (now + d.reset_after_us).div_ceil(1000) + 1;
        ffi::set_string(ctx, key, &window.encode(), Some(expire_at))?;
    }
    Ok(RedisValue::Array(vec![
        RedisValue::Integer(i64::from(d.allowed)),
        RedisValue::Integer(d.limit as i64),
        RedisValue::Integer(d.remaining as i64),
        RedisValue::Integer(d.retry_after_us.map_or(-1, ms)),
        RedisValue::Integer(ms(d.reset_after_us)),
    ]))
}
