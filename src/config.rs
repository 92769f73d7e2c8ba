//! Module configs (`CONFIG GET aicache.*`). The statics are the single source
//! of truth; commands read them through [`Settings::snapshot`] once per call.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Mutex;

use redis_module::configuration::ConfigurationContext;
use redis_module::{ConfigurationValue, RedisError, RedisString};

use crate::keys::validate_prefix;

/// Seconds an entry lives when no `EX` is given; 0 keeps entries forever.
pub static DEFAULT_TTL: AtomicI64 = AtomicI64::new(86_400);
/// Each TTL is drawn uniformly from `ttl +/- ttl * pct / 100`.
pub static TTL_JITTER_PCT: AtomicI64 = AtomicI64::new(10);
/// Largest text accepted, in bytes, before normalisation.
pub static MAX_TEXT_BYTES: AtomicI64 = AtomicI64::new(32_768);
/// Largest vector accepted, in dimensions.
pub static MAX_DIMS: AtomicI64 = AtomicI64::new(8_192);
/// When non-zero every vector must have exactly this many dimensions;
/// when zero each (namespace, model) is pinned by its first vector.
pub static FIXED_DIMS: AtomicI64 = AtomicI64::new(0);
/// Collapse ASCII whitespace runs in texts before hashing.
pub static NORMALIZE_WHITESPACE: AtomicBool = AtomicBool::new(false);
/// Prepended to every key the module writes.
pub static KEY_PREFIX: KeyPrefix = KeyPrefix(Mutex::new(String::new()));

pub const DEFAULT_KEY_PREFIX: &str = "aicache:";

/// A string config whose setter rejects prefixes that would break hash tags.
pub struct KeyPrefix(Mutex<String>);

impl KeyPrefix {
    pub fn get_string(&self) -> String {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl ConfigurationValue<RedisString> for KeyPrefix {
    fn get(&self, _ctx: &ConfigurationContext) -> RedisString {
        // Validated printable ASCII, so the NUL panic in create() cannot fire.
        RedisString::create(None, self.get_string())
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
}

fn load(v: &AtomicI64) -> u64 {
    v.load(Ordering::Relaxed).max(0) as u64
}

impl Settings {
    pub fn snapshot() -> Settings {
        Settings {
            prefix: KEY_PREFIX.get_string(),
            default_ttl_secs: load(&DEFAULT_TTL),
            jitter_pct: load(&TTL_JITTER_PCT),
            max_text_bytes: load(&MAX_TEXT_BYTES) as usize,
            max_dims: load(&MAX_DIMS) as usize,
            fixed_dims: load(&FIXED_DIMS) as usize,
            normalize_whitespace: NORMALIZE_WHITESPACE.load(Ordering::Relaxed),
        }
    }
}
