//! Module configs (`CONFIG GET aicache.*`). The statics are the single source
//! of truth; commands read them through [`Settings::snapshot`] once per call.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Mutex;

use redis_module::configuration::ConfigurationContext;
use redis_module::{ConfigurationValue, RedisError, RedisString};

use crate::keys::validate_prefix;

/// Seconds an entry lives when no `EX` is given; 0 keeps entries forever.
pub static DEFAULT_TTL: Bounded = Bounded::new(86_400, 0, crate::ttl::MAX_TTL_SECS as i64);
/// Each TTL is drawn uniformly from `ttl +/- ttl * pct / 100`.
pub static TTL_JITTER_PCT: Bounded = Bounded::new(10, 0, crate::ttl::MAX_JITTER_PCT as i64);
/// Largest text accepted, in bytes, before normalisation.
pub static MAX_TEXT_BYTES: Bounded = Bounded::new(32_768, 1, 64 * 1024 * 1024);
/// Largest vector accepted, in dimensions.
pub static MAX_DIMS: Bounded = Bounded::new(8_192, 1, 65_536);
/// When non-zero every vector must have exactly this many dimensions;
/// when zero each (namespace, model) is pinned by its first vector.
pub static FIXED_DIMS: Bounded = Bounded::new(0, 0, 65_536);
/// Largest LLMCACHE request body accepted, in bytes.
pub static MAX_REQUEST_BYTES: Bounded = Bounded::new(1 << 20, 1, 64 << 20);
/// Largest LLM response stored, in bytes.
pub static MAX_RESPONSE_BYTES: Bounded = Bounded::new(4 << 20, 1, 256 << 20);
/// Cache responses to requests with temperature > 0 (sampled answers).
pub static CACHE_SAMPLED: AtomicBool = AtomicBool::new(true);
/// Collapse ASCII whitespace runs in texts before hashing.
pub static NORMALIZE_WHITESPACE: AtomicBool = AtomicBool::new(false);
/// Prepended to every key the module writes.
pub static KEY_PREFIX: KeyPrefix = KeyPrefix(Mutex::new(String::new()));

pub const DEFAULT_KEY_PREFIX: &str = "aicache:";

/// An integer config that checks its own range: Redis checks `CONFIG SET`,
/// but not values given on the `loadmodule` line.
pub struct Bounded {
    value: AtomicI64,
    pub default: i64,
    pub min: i64,
    pub max: i64,
}

impl Bounded {
    pub const fn new(default: i64, min: i64, max: i64) -> Self {
        Bounded {
            value: AtomicI64::new(default),
            default,
            min,
            max,
        }
    }

    pub fn get_u64(&self) -> u64 {
        self.value.load(Ordering::Relaxed).max(0) as u64
    }
}

impl ConfigurationValue<i64> for Bounded {
    fn get(&self, _ctx: &ConfigurationContext) -> i64 {
        self.value.load(Ordering::Relaxed)
    }

    fn set(&self, _ctx: &ConfigurationContext, val: i64) -> Result<(), RedisError> {
        if val < self.min || val > self.max {
            return Err(RedisError::String(format!(
                "argument must be between {} and {} inclusive",
                self.min, self.max
            )));
        }
        self.value.store(val, Ordering::Relaxed);
        Ok(())
    }
}

/// A string config whose setter rejects prefixes that would break hash tags.
pub struct KeyPrefix(Mutex<String>);

impl KeyPrefix {
    pub fn get_string(&self) -> String {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl ConfigurationValue<RedisString> for KeyPrefix {
    fn get(&self, _ctx: &ConfigurationContext) -> RedisString {
        // create() panics on NUL; the slice constructor cannot.
        RedisString::create_from_slice(std::ptr::null_mut(), self.get_string().as_bytes())
    }

    fn set(&self, _ctx: &ConfigurationContext, val: RedisString) -> Result<(), RedisError> {
        let s = std::str::from_utf8(val.as_slice())
            .map_err(|_| RedisError::Str("key-prefix must be printable ASCII"))?;
        validate_prefix(s).map_err(RedisError::String)?;
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = s.to_string();
        Ok(())
    }
}

/// One consistent view of the configs for the length of a command.
pub struct Settings {
    pub prefix: String,
    pub default_ttl_secs: u64,
    pub jitter_pct: u64,
    pub max_text_bytes: usize,
    pub max_dims: usize,
    pub fixed_dims: usize,
    pub normalize_whitespace: bool,
    pub max_request_bytes: usize,
    pub max_response_bytes: usize,
    pub cache_sampled: bool,
}

impl Settings {
    pub fn snapshot() -> Settings {
        Settings {
            prefix: KEY_PREFIX.get_string(),
            default_ttl_secs: DEFAULT_TTL.get_u64(),
            jitter_pct: TTL_JITTER_PCT.get_u64(),
            max_text_bytes: MAX_TEXT_BYTES.get_u64() as usize,
            max_dims: MAX_DIMS.get_u64() as usize,
            fixed_dims: FIXED_DIMS.get_u64() as usize,
            normalize_whitespace: NORMALIZE_WHITESPACE.load(Ordering::Relaxed),
            max_request_bytes: MAX_REQUEST_BYTES.get_u64() as usize,
            max_response_bytes: MAX_RESPONSE_BYTES.get_u64() as usize,
            cache_sampled: CACHE_SAMPLED.load(Ordering::Relaxed),
        }
    }
}
