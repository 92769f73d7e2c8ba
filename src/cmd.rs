//! Helpers shared by the command families: argument words, namespaces and
//! write expiry.

use redis_module::{RedisError, RedisString};

use crate::config::Settings;
use crate::errors::describe;
use crate::ffi::error;
use crate::keys::Namespace;
use crate::ttl::{jittered_ms, now_ms, parse_ex, SplitMix};

/// Drives TTL jitter; seeded at module load.
pub static JITTER_RNG: SplitMix = SplitMix::new(0);

pub fn namespace<'a>(cfg: &'a Settings, arg: &'a RedisString) -> Result<Namespace<'a>, RedisError> {
    Namespace::new(&cfg.prefix, arg.as_slice()).map_err(|e| error(e.message()))
}

pub fn is_word(arg: &RedisString, word: &str) -> bool {
    arg.as_slice().eq_ignore_ascii_case(word.as_bytes())
}

pub fn unknown_option(arg: &RedisString, expected: &str) -> RedisError {
    error(format!(
        "ERR unknown option '{}'; expected {expected}",
        describe(arg.as_slice())
    ))
}

/// Parses an optional trailing `EX seconds` that starts at `args[at]`.
pub fn ex_option(args: &[RedisString], at: usize) -> Result<Option<u64>, RedisError> {
    match args.len().checked_sub(at) {
        Some(0) => Ok(None),
        Some(2) if is_word(&args[at], "EX") => {
            Ok(Some(parse_ex(args[at + 1].as_slice()).map_err(error)?))
        }
        Some(1) | Some(2) => Err(unknown_option(&args[at], "EX seconds")),
        _ => Err(RedisError::WrongArity),
    }
}

/// Absolute expiry in Unix ms for one write, or None for no expiry.
pub fn expire_at(cfg: &Settings, ex: Option<u64>) -> Option<u64> {
    let base = ex.unwrap_or(cfg.default_ttl_secs);
    if base == 0 {
        return None;
    }
    Some(now_ms() + jittered_ms(base, cfg.jitter_pct, JITTER_RNG.next()))
}

/// Rejects an argument longer than the config `limit_name` allows.
pub fn check_len(what: &str, len: usize, limit: usize, limit_name: &str) -> Result<(), RedisError> {
    if len > limit {
        return Err(error(format!(
            "ERR {what} is {len} bytes, more than {limit_name} {limit}"
        )));
    }
    Ok(())
}
