//! Module configs (`CONFIG GET aicache.*`). The statics are the single source
//! of truth; commands read them through [`Settings::snapshot`] once per call.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use redis_module::configuration::ConfigurationContext;
use redis_module::{ConfigurationValue, RedisError, RedisString};

use crate::model::keys::validate_prefix;
use crate::redis::ffi::OwnedString;

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
/// Vector sizes of the models in use (`model=dims,...`): a fill's answer
/// for a listed model must have that size before it may pin a namespace.
pub static MODEL_DIMS: Checked = Checked::new(
    crate::model::pins::check_model_dims,
    crate::model::pins::DEFAULT_MODEL_DIMS,
);
/// Prepended to every key the module writes.
pub static KEY_PREFIX: Checked = Checked::new(validate_prefix, DEFAULT_KEY_PREFIX);

pub const DEFAULT_KEY_PREFIX: &str = "aicache:";

// Fills. Thread count and queue size are fixed when the pool starts.
pub static WORKERS: Bounded = Bounded::new(8, 1, 256);
pub static QUEUE_SIZE: Bounded = Bounded::new(1024, 1, 1 << 20);
/// Entries being filled at once, over all clients.
pub static MAX_FILLS: Bounded = Bounded::new(65_536, 1, 1 << 24);
/// Texts per embeddings request.
pub static BATCH_SIZE: Bounded = Bounded::new(100, 1, 2048);
/// Estimated tokens per embeddings request (OpenAI allows 300,000).
pub static BATCH_MAX_TOKENS: Bounded = Bounded::new(200_000, 1, 1 << 40);
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
/// Who a spend-limited call belongs to: `arg` (the TENANT argument),
/// `user` (the caller's ACL user) or `namespace` (its hash tag).
pub static TENANT_SOURCE: Checked = Checked::new(check_tenant_source, "arg");

// Upstream HTTP.
/// How long a generation's Stream stays readable after its last entry.
pub static STREAM_LINGER_MS: Bounded = Bounded::new(60_000, 1, 86_400_000);
/// Entries one Stream may hold; a longer generation ends with an error.
pub static STREAM_MAX_ENTRIES: Bounded = Bounded::new(20_000, 2, 1 << 24);
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
pub static UPSTREAM_URL: Checked = Checked::new(check_base_url, DEFAULT_UPSTREAM_URL);
/// Full URL for embeddings; empty means `<upstream-url>/embeddings`.
pub static EMBEDDINGS_URL: Checked = Checked::new(check_optional_url, "");
/// Full URL for chat completions; empty means `<upstream-url>/chat/completions`.
pub static CHAT_URL: Checked = Checked::new(check_optional_url, "");
/// Name of the environment variable holding the API key.
pub static API_KEY_ENV: Checked = Checked::new(check_env_name, "OPENAI_API_KEY");
/// File holding the API key; wins over the environment variable.
pub static API_KEY_FILE: Checked = Checked::new(check_key_file, "");

/// Misses for the same (route, model, dimensions) arriving within this
/// many ms of the first go upstream as one request; 0 = off.
pub static BATCH_WINDOW_MS: Bounded = Bounded::new(5, 0, 1_000);
/// A hit in the last this-% of its TTL refreshes the entry in the
/// background; 0 = off.
pub static REFRESH_AHEAD_PCT: Bounded = Bounded::new(0, 0, 90);
/// Entries being refreshed ahead at once; more hits in the window wait
/// for the next read.
pub static REFRESH_MAX_INFLIGHT: Bounded = Bounded::new(256, 1, 1 << 20);
/// Consecutive failures that open an endpoint's circuit; 0 = never.
pub static BREAKER_FAILURES: Bounded = Bounded::new(5, 0, 10_000);
/// The failures must fall within this many ms.
pub static BREAKER_WINDOW_MS: Bounded = Bounded::new(10_000, 1, 3_600_000);
/// How long an open circuit refuses before one probe may go.
pub static BREAKER_COOLDOWN_MS: Bounded = Bounded::new(5_000, 1, 3_600_000);
/// The embedding model that semantic lookups (FETCH ... SIMILAR) embed
/// prompts with; part of every semantic context, so changing it starts
/// over with no candidates.
pub static SEMANTIC_MODEL: Checked = Checked::new(check_semantic_model, "text-embedding-3-small");
/// The cosine similarity `SIMILAR` without a number asks for.
pub static SEMANTIC_THRESHOLD: Checked = Checked::new(check_threshold, "0.92");
/// Entries the in-memory semantic index holds at most; more are not
/// searchable (INFO semantic_index_full counts them).
pub static SEMANTIC_MAX_ENTRIES: Bounded = Bounded::new(1_000_000, 0, 1 << 28);
/// Extra endpoints (see routes.rs for the grammar); empty slots are unused.
pub static ROUTES: [Checked; crate::model::routes::MAX_ROUTES] =
    [const { Checked::new(check_route, "") }; crate::model::routes::MAX_ROUTES];

pub const ROUTE_CHECKS: crate::model::routes::Checks = crate::model::routes::Checks {
    url: check_base_url,
    env: check_env_name,
    file: check_key_file,
};

fn check_route(s: &str) -> Result<(), String> {
    crate::model::routes::parse(s, &ROUTE_CHECKS).map(|_| ())
}

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
pub struct Checked {
    /// None until first read or set; then shared, so reading it per
    /// command copies a pointer, not the text.
    value: Mutex<Option<Arc<str>>>,
    default: &'static str,
    check: fn(&str) -> Result<(), String>,
    /// What Redis reads: owned here, so `CONFIG GET` allocates nothing.
    shown: OwnedString,
}

impl Checked {
    pub const fn new(check: fn(&str) -> Result<(), String>, default: &'static str) -> Self {
        Checked {
            value: Mutex::new(None),
            default,
            check,
            shown: OwnedString::new(),
        }
    }

    pub fn value(&self) -> Arc<str> {
        let mut v = self.value.lock().unwrap_or_else(|e| e.into_inner());
        v.get_or_insert_with(|| Arc::from(self.default)).clone()
    }

    pub fn get_string(&self) -> String {
        self.value().to_string()
    }
}

impl ConfigurationValue<RedisString> for Checked {
    fn get(&self, _ctx: &ConfigurationContext) -> RedisString {
        self.shown.get(&self.value())
    }

    fn set(&self, _ctx: &ConfigurationContext, val: RedisString) -> Result<(), RedisError> {
        let s = std::str::from_utf8(val.as_slice())
            .map_err(|_| RedisError::Str("value must be printable ASCII"))?;
        if !s.bytes().all(|b| (0x21..0x7f).contains(&b)) {
            return Err(RedisError::Str(
                "value must be printable ASCII without spaces",
            ));
        }
        let checked = std::panic::catch_unwind(|| (self.check)(s))
            .unwrap_or_else(|_| Err("internal error checking the value".into()));
        checked.map_err(RedisError::String)?;
        *self.value.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::from(s));
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
    // The port, if any, follows the last ':' outside an IPv6 literal.
    let host_end = authority.rfind(']').map_or(0, |i| i + 1);
    if let Some((_, port)) = authority[host_end..].rsplit_once(':') {
        if !port.is_empty() && !matches!(port.parse::<u32>(), Ok(1..=65535)) {
            return Err(format!(
                "upstream URL port must be 1 to 65535, not '{port}'"
            ));
        }
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

/// The variable holding the key must look like one: upper-case, ending
/// in `_API_KEY`, `_KEY` or `_TOKEN`, so a protected-config change cannot
/// send an arbitrary variable upstream as a Bearer token.
pub fn check_env_name(s: &str) -> Result<(), String> {
    let shaped = s.len() <= 128
        && s.starts_with(|c: char| c.is_ascii_uppercase())
        && s.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        && ["_API_KEY", "_KEY", "_TOKEN"]
            .iter()
            .any(|end| s.ends_with(end));
    if !shaped {
        return Err(
            "api-key-env must be an upper-case variable name ending in _API_KEY, _KEY or _TOKEN"
                .into(),
        );
    }
    Ok(())
}

/// Largest key file read: keys are short; anything bigger is a mistake.
pub const MAX_KEY_FILE_BYTES: u64 = 4096;

/// A key file must be a regular file (links to one are followed) of sane
/// size that not everyone may write.
pub fn check_key_meta(meta: &std::fs::Metadata) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    if !meta.is_file() {
        return Err("api-key-file is not a regular file".into());
    }
    if meta.len() == 0 || meta.len() > MAX_KEY_FILE_BYTES {
        return Err(format!(
            "api-key-file must hold 1 to {MAX_KEY_FILE_BYTES} bytes"
        ));
    }
    if meta.mode() & 0o002 != 0 {
        return Err("api-key-file is writable by everyone".into());
    }
    Ok(())
}

fn check_key_file(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Ok(());
    }
    // Only the error kind: the message could quote the file.
    let meta =
        std::fs::metadata(s).map_err(|e| format!("api-key-file cannot be read: {}", e.kind()))?;
    check_key_meta(&meta)
}

fn check_tenant_source(s: &str) -> Result<(), String> {
    match s {
        "arg" | "user" | "namespace" => Ok(()),
        _ => Err("tenant-source must be arg, user or namespace".into()),
    }
}

fn check_semantic_model(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > crate::model::keys::MAX_MODEL_BYTES {
        return Err("semantic-model must be 1 to 256 bytes".into());
    }
    Ok(())
}

fn check_threshold(s: &str) -> Result<(), String> {
    crate::model::semantic::parse_threshold(s.as_bytes())
        .map(|_| ())
        .ok_or_else(|| "semantic-threshold must be a number from 0 to 1".into())
}

/// One consistent view of the configs for the length of a command.
pub struct Settings {
    pub prefix: Arc<str>,
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
    pub batch_max_tokens: u64,
    pub wait_timeout_ms: u64,
    pub lease_ms: u64,
    pub max_fills: usize,
    pub fail_memory_ms: u64,
    pub stream_linger_ms: u64,
    pub stream_max_entries: u64,
    pub base64: bool,
    pub tenant_source: Arc<str>,
    pub model_dims: Arc<str>,
    pub semantic_model: Arc<str>,
    pub semantic_threshold: f64,
}

impl Settings {
    pub fn snapshot() -> Settings {
        Settings {
            prefix: KEY_PREFIX.value(),
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
            batch_max_tokens: BATCH_MAX_TOKENS.get_u64(),
            wait_timeout_ms: WAIT_TIMEOUT_MS.get_u64(),
            lease_ms: LEASE_MS.get_u64(),
            max_fills: MAX_FILLS.get_u64() as usize,
            fail_memory_ms: FAIL_MEMORY_MS.get_u64(),
            stream_linger_ms: STREAM_LINGER_MS.get_u64(),
            stream_max_entries: STREAM_MAX_ENTRIES.get_u64(),
            base64: UPSTREAM_BASE64.load(Ordering::Relaxed),
            tenant_source: TENANT_SOURCE.value(),
            model_dims: MODEL_DIMS.value(),
            semantic_model: SEMANTIC_MODEL.value(),
            semantic_threshold: crate::model::semantic::parse_threshold(
                SEMANTIC_THRESHOLD.value().as_bytes(),
            )
            .unwrap_or(0.92),
        }
    }

    /// How a fill keeps its entries: EX, else the default TTL, jittered.
    pub fn expiry(&self, ex: Option<u64>) -> crate::model::ttl::Expiry {
        crate::model::ttl::Expiry {
            ttl_secs: ex.unwrap_or(self.default_ttl_secs),
            jitter_pct: self.jitter_pct,
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_urls_are_checked() {
        for ok in [
            "https://api.openai.com/v1",
            "http://127.0.0.1:8089/v1",
            "http://[::1]:65535/v1",
            "http://host:1",
        ] {
            assert!(check_base_url(ok).is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("ftp://x/v1", "must start with http"),
            ("http:///v1", "no host"),
            ("https://user:pw@host/v1", "credentials"),
            ("http://127.0.0.1:65536/v1", "port must be 1 to 65535"),
            ("http://127.0.0.1:0/v1", "port must be"),
            ("http://host:http/v1", "port must be"),
            ("http://[::1]:99999/v1", "port must be"),
        ] {
            let e = check_base_url(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert!(check_optional_url("").is_ok());
        assert!(check_optional_url("http://h:70000").is_err());
    }

    #[test]
    fn the_key_variable_must_look_like_a_key() {
        for ok in [
            "OPENAI_API_KEY",
            "AZURE_OPENAI_KEY",
            "MY_SERVICE_TOKEN",
            "K2_KEY",
        ] {
            assert!(check_env_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "HOME",
            "PATH",
            "openai_api_key",
            "_KEY",
            "AWS_SECRET_ACCESS",
            "A-B_KEY",
            "",
        ] {
            assert!(check_env_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_key_file_must_be_a_private_regular_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("aicache-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("key");
        std::fs::write(&file, "sk-test\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let path = file.to_str().unwrap();
        assert!(check_key_file(path).is_ok());
        assert!(check_key_file("").is_ok(), "no file configured");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(check_key_file(path)
            .unwrap_err()
            .contains("writable by everyone"));
        std::fs::write(&file, vec![b'k'; 5000]).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(check_key_file(path)
            .unwrap_err()
            .contains("1 to 4096 bytes"));
        assert!(check_key_file(dir.to_str().unwrap())
            .unwrap_err()
            .contains("not a regular file"));
        assert!(check_key_file("/no/such/file")
            .unwrap_err()
            .contains("cannot be read"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tenant_sources_are_a_closed_list() {
        for ok in ["arg", "user", "namespace"] {
            assert!(check_tenant_source(ok).is_ok());
        }
        assert!(check_tenant_source("USER").is_err());
    }

    #[test]
    fn settings_read_the_defaults() {
        let s = Settings::snapshot();
        assert_eq!(&*s.prefix, DEFAULT_KEY_PREFIX);
        assert_eq!(&*s.tenant_source, "arg");
        assert_eq!(s.expiry(None).ttl_secs, 86_400);
        assert_eq!(s.expiry(Some(5)).ttl_secs, 5);
        assert_eq!(embeddings_url(), "https://api.openai.com/v1/embeddings");
        assert_eq!(chat_url(), "https://api.openai.com/v1/chat/completions");
    }
}
