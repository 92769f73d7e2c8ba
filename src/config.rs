//! Module configs (`CONFIG GET aicache.*`). The statics are the single source
//! of truth; commands read them through [`Settings::snapshot`] once per call.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Mutex;

use redis_module::configuration::ConfigurationContext;
use redis_module::{ConfigurationValue, RedisError, RedisString};

use crate::fill::upstream::reload_api_key;
use crate::model::keys::validate_prefix;

/// Seconds an entry lives when no `EX` is given; 0 keeps entries forever.
pub static DEFAULT_TTL: Bounded = Bounded::new(86_400, 0, crate::model::ttl::MAX_TTL_SECS as i64);
/// Each TTL is drawn uniformly from `ttl +/- ttl * pct / 100`.
pub static TTL_JITTER_PCT: Bounded = Bounded::new(10, 0, crate::model::ttl::MAX_JITTER_PCT as i64);
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
pub static KEY_PREFIX: Checked = Checked::new(validate_prefix, None);

pub const DEFAULT_KEY_PREFIX: &str = "aicache:";

// Fills. Thread count and queue size are fixed when the pool starts.
pub static WORKERS: Bounded = Bounded::new(8, 1, 256);
pub static QUEUE_SIZE: Bounded = Bounded::new(1024, 1, 1 << 20);
/// Entries being filled at once, over all clients.
pub static MAX_FILLS: Bounded = Bounded::new(65_536, 1, 1 << 24);
/// Texts per embeddings request.
pub static BATCH_SIZE: Bounded = Bounded::new(100, 1, 2048);
/// How long a fill holds its entry; it also bounds the fill's retries.
pub static LEASE_MS: Bounded = Bounded::new(60_000, 100, 3_600_000);
/// How long a FETCH waits for its fills unless it passes TIMEOUT.
pub static WAIT_TIMEOUT_MS: Bounded = Bounded::new(60_000, 1, 3_600_000);

/// After a failed fill, identical calls fail fast for this long; 0 = off.
pub static FAIL_MEMORY_MS: Bounded = Bounded::new(0, 0, 600_000);

// Spend limits on upstream calls; 0 = unlimited.
pub static QUOTA_WINDOW_MS: Bounded = Bounded::new(60_000, 1, 86_400_000);
pub static TENANT_MAX_REQUESTS: Bounded = Bounded::new(0, 0, 1 << 53);
pub static TENANT_MAX_TOKENS: Bounded = Bounded::new(0, 0, 1 << 53);
pub static GLOBAL_MAX_REQUESTS: Bounded = Bounded::new(0, 0, 1 << 53);
pub static GLOBAL_MAX_TOKENS: Bounded = Bounded::new(0, 0, 1 << 53);
/// Tokens per UTC day over all upstream calls.
pub static DAILY_TOKEN_BUDGET: Bounded = Bounded::new(0, 0, 1 << 53);

// Upstream HTTP.
pub static CONNECT_TIMEOUT_MS: Bounded = Bounded::new(5_000, 1, 600_000);
/// Whole attempt, body included: a slow-drip body cannot outlive it.
pub static ATTEMPT_TIMEOUT_MS: Bounded = Bounded::new(30_000, 1, 3_600_000);
pub static UPSTREAM_MAX_BYTES: Bounded = Bounded::new(64 << 20, 1024, 1 << 30);
pub static RETRIES: Bounded = Bounded::new(2, 0, 10);
pub static BACKOFF_BASE_MS: Bounded = Bounded::new(200, 1, 60_000);
pub static BACKOFF_CAP_MS: Bounded = Bounded::new(5_000, 1, 600_000);
/// Ask for `encoding_format: base64` (exact FP32, cheap to parse).
pub static UPSTREAM_BASE64: AtomicBool = AtomicBool::new(true);

pub const DEFAULT_UPSTREAM_URL: &str = "https://api.openai.com/v1";
pub static UPSTREAM_URL: Checked = Checked::new(check_base_url, None);
/// Full URL for embeddings; empty means `<upstream-url>/embeddings`.
pub static EMBEDDINGS_URL: Checked = Checked::new(check_optional_url, None);
/// Full URL for chat completions; empty means `<upstream-url>/chat/completions`.
pub static CHAT_URL: Checked = Checked::new(check_optional_url, None);
/// Name of the environment variable holding the API key.
pub static API_KEY_ENV: Checked = Checked::new(check_env_name, Some(reload_api_key));
/// File holding the API key; wins over the environment variable.
pub static API_KEY_FILE: Checked = Checked::new(check_key_file, Some(reload_api_key));

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

/// A string config with a validator run on every value, load time included.
/// `then` runs after a value is stored.
pub struct Checked {
    value: Mutex<String>,
    check: fn(&str) -> Result<(), String>,
    then: Option<fn()>,
}

impl Checked {
    pub const fn new(check: fn(&str) -> Result<(), String>, then: Option<fn()>) -> Self {
        Checked {
            value: Mutex::new(String::new()),
            check,
            then,
        }
    }

    pub fn get_string(&self) -> String {
        self.value.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl ConfigurationValue<RedisString> for Checked {
    fn get(&self, _ctx: &ConfigurationContext) -> RedisString {
        // create() panics on NUL; the slice constructor cannot.
        RedisString::create_from_slice(std::ptr::null_mut(), self.get_string().as_bytes())
    }

    fn set(&self, _ctx: &ConfigurationContext, val: RedisString) -> Result<(), RedisError> {
        let s = std::str::from_utf8(val.as_slice())
            .map_err(|_| RedisError::Str("value must be printable ASCII"))?;
        if !s.bytes().all(|b| (0x21..0x7f).contains(&b)) {
            return Err(RedisError::Str(
                "value must be printable ASCII without spaces",
            ));
        }
        (self.check)(s).map_err(RedisError::String)?;
        *self.value.lock().unwrap_or_else(|e| e.into_inner()) = s.to_string();
        if let Some(then) = self.then {
            then();
        }
        Ok(())
    }
}

fn check_base_url(s: &str) -> Result<(), String> {
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
        .ok_or("upstream URL must start with http:// or https://")?;
    let authority = rest.split('/').next().unwrap_or("");
    if authority.is_empty() {
        return Err("upstream URL has no host".into());
    }
    // Credentials in the URL would show in CONFIG GET.
    if authority.contains('@') {
        return Err("upstream URL must not carry credentials; use aicache.api-key-env".into());
    }
    if s.len() > 2048 {
        return Err("upstream URL is longer than 2048 bytes".into());
    }
    Ok(())
}

fn check_optional_url(s: &str) -> Result<(), String> {
    if s.is_empty() {
        Ok(())
    } else {
        check_base_url(s)
    }
}

fn check_env_name(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 128 || !s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err("api-key-env must be 1 to 128 letters, digits or underscores".into());
    }
    Ok(())
}

fn check_key_file(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Ok(());
    }
    // Only the error kind: the message could quote the file.
    std::fs::metadata(s)
        .map_err(|e| format!("api-key-file cannot be read: {}", e.kind()))
        .and_then(|m| {
            if m.is_file() {
                Ok(())
            } else {
                Err("api-key-file is not a regular file".into())
            }
        })
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
    pub batch_size: usize,
    pub wait_timeout_ms: u64,
    pub base64: bool,
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
            batch_size: BATCH_SIZE.get_u64() as usize,
            wait_timeout_ms: WAIT_TIMEOUT_MS.get_u64(),
            base64: UPSTREAM_BASE64.load(Ordering::Relaxed),
        }
    }

    /// Seconds to keep a fill's entries: EX, else the default.
    pub fn ttl_secs(&self, ex: Option<u64>) -> u64 {
        ex.unwrap_or(self.default_ttl_secs)
    }
}

fn endpoint(explicit: &Checked, path: &str) -> String {
    let url = explicit.get_string();
    if !url.is_empty() {
        return url;
    }
    let base = UPSTREAM_URL.get_string();
    format!("{}/{path}", base.trim_end_matches('/'))
}

pub fn embeddings_url() -> String {
    endpoint(&EMBEDDINGS_URL, "embeddings")
}

pub fn chat_url() -> String {
    endpoint(&CHAT_URL, "chat/completions")
}
