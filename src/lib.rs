//! aicache: a Redis module that caches embedding vectors and LLM responses
//! for every app instance at once. This file only wires things together.

mod commands;
pub mod config;
mod fill;
mod limits;
pub mod model;
mod redis;
pub mod stats;

use redis_module::configuration::ConfigurationFlags;
use redis_module::{redis_module, Context, InfoContext, RedisResult, RedisString, Status};

use config::*;

// `cargo test` runs without a Redis process, so the Redis allocator is absent.
#[cfg(not(test))]
type Allocator = redis_module::alloc::RedisAlloc;
#[cfg(not(test))]
const ALLOCATOR: Allocator = redis_module::alloc::RedisAlloc;
#[cfg(test)]
type Allocator = std::alloc::System;
#[cfg(test)]
const ALLOCATOR: Allocator = std::alloc::System;

fn init(ctx: &Context, _args: &[RedisString]) -> Status {
    let seed = model::ttl::now_ms() ^ (std::process::id() as u64).rotate_left(32);
    model::ttl::JITTER_RNG.reseed(seed);
    redis::blocked::init(ctx);
    if let Err(e) = fill::pool::start(WORKERS.get_u64() as usize, QUEUE_SIZE.get_u64() as usize) {
        ctx.log_warning(&model::errors::sanitize(&e));
        redis::blocked::deinit();
        return Status::Err;
    }
    if let Err(e) = fill::semindex::start() {
        ctx.log_warning(&model::errors::sanitize(&e));
        fill::pool::stop();
        redis::blocked::deinit();
        return Status::Err;
    }
    redis::events::on_shutdown(ctx, shutdown);
    redis::events::on_flush(ctx, on_flush);
    redis::keyspace::on_key_event(ctx, fill::semindex::note_key_event);
    redis::keyspace::on_loading(ctx, fill::semindex::note_loading);
    redis::events::on_resetstat(ctx, || {
        stats::STATS.reset();
        stats::FILL_LATENCY.reset();
        fill::endpoints::table().reset_stats();
    });
    log_key_source();
    Status::Ok
}

/// FLUSHDB (`Some(db)`), or FLUSHALL, SWAPDB, a role change (`None`).
fn on_flush(db: Option<i32>) {
    fill::pins::forget_db(db);
    fill::semindex::note_flush(db);
}

/// Which key source is in use (never the key), and a warning when the key
/// would cross the network in clear text.
fn log_key_source() {
    let line = model::errors::sanitize(&fill::apikey::describe_source());
    redis_module::logging::log_notice(&line);
    if let Some(w) = fill::apikey::cleartext_warning() {
        redis_module::logging::log_warning(model::errors::sanitize(&w));
    }
    for line in fill::apikey::route_lines() {
        redis_module::logging::log_notice(model::errors::sanitize(&line));
    }
}

/// The semantic index names keys by prefix: a new prefix means other keys.
fn on_prefix_config<T>(
    _: &redis_module::configuration::ConfigurationContext,
    _: &str,
    _: &'static T,
) {
    let _ = std::panic::catch_unwind(|| fill::semindex::note_flush(None));
}

fn on_key_config<T>(_: &redis_module::configuration::ConfigurationContext, _: &str, _: &'static T) {
    let _ = std::panic::catch_unwind(log_key_source);
}

/// Workers stop retrying and every waiter is released with an error. Redis
/// exits without flushing client buffers, so in practice those clients see
/// the connection close; the error reaches them only if the shutdown fails
/// and the server carries on.
fn shutdown() {
    fill::pool::halt();
    fill::pipeline::abandon_all("ERR aicache is shutting down");
}

/// MODULE UNLOAD: Redis refuses it while a client is blocked, but a fill can
/// outlive its callers (they timed out, or another part of their call
/// failed), and its worker will want the lock this thread holds. Refuse
/// until no fill runs and no deadline timer is pending, then join the idle
/// workers.
fn deinit(ctx: &Context) -> Status {
    if fill::pipeline::fills_in_flight() > 0
        || fill::pool::queue_depth() > 0
        || redis::blocked::live_timers() > 0
        || fill::pool::busy() > 0
        || fill::batcher::open_batches() > 0
        || redis::keywait::wake_pending()
        || !fill::semindex::stop()
    {
        ctx.log_warning("aicache: fills are still running; MODULE UNLOAD refused, try again");
        return Status::Err;
    }
    fill::pool::stop();
    redis::blocked::deinit();
    Status::Ok
}

#[linkme::distributed_slice(redis_module::server_events::INFO_COMMAND_HANDLER_LIST)]
fn info(ctx: &InfoContext, for_crash_report: bool) -> RedisResult<()> {
    let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        info_section(ctx, for_crash_report)
    }));
    built.unwrap_or_else(|_| {
        stats::STATS.handler_panics.incr();
        Ok(())
    })
}

fn info_section(ctx: &InfoContext, for_crash_report: bool) -> RedisResult<()> {
    redis::guard::maybe_panic(redis::guard::Site::Info);
    if !for_crash_report {
        redis::events::recheck_reset();
    }
    let mut section = ctx.builder().add_section("fills");
    for (name, value) in stats::STATS.fields() {
        section = section.field(name, value)?;
    }
    for (name, value) in stats::FILL_LATENCY.fields() {
        section = section.field(&name, value)?;
    }
    let running = stats::STREAMS_RUNNING.load(std::sync::atomic::Ordering::Relaxed);
    section = section.field("streams_running", running)?;
    // A crash report may run on a thread that crashed holding these locks.
    if !for_crash_report {
        let (spent, left) = limits::spend::today();
        section = section
            .field("tokens_spent_today", spent)?
            .field("daily_budget_left", left)?
            .field("fills_in_flight", fill::pipeline::fills_in_flight() as u64)?
            .field("queue_depth", fill::pool::queue_depth() as u64)?
            .field("workers", fill::pool::workers() as u64)?
            .field("deadline_timers", redis::blocked::live_timers())?
            .field("batches_open", fill::batcher::open_batches() as u64)?
            .field("refreshes_in_flight", fill::refresh::in_flight() as u64)?;
        for (name, value) in fill::semindex::gauges() {
            section = section.field(name, value)?;
        }
        for (name, value) in fill::endpoints::table().info() {
            section = section.field(&name, value)?;
        }
    }
    section.build_section()?.build_info()?;
    Ok(())
}

redis_module! {
    name: "aicache",
    version: 1,
    allocator: (Allocator, ALLOCATOR),
    data_types: [],
    init: init,
    deinit: deinit,
    commands: [
        ["embcache.set", commands::embcache_set, "write deny-oom", 1, 1, 1, "", "write"],
        ["embcache.mset", commands::embcache_mset, "write deny-oom", 1, 1, 1, "", "write"],
        ["embcache.get", commands::embcache_get, "readonly fast", 1, 1, 1, "", "read"],
        ["embcache.mget", commands::embcache_mget, "readonly", 1, 1, 1, "", "read"],
        ["embcache.del", commands::embcache_del, "write", 1, 1, 1, "", "write"],
        ["embcache.key", commands::embcache_key, "readonly fast", 1, 1, 1, "", "read"],
        ["embcache.dims", commands::embcache_dims, "write", 1, 1, 1, "", "write"],
        ["llmcache.set", commands::llmcache_set, "write deny-oom", 1, 1, 1, "", "write"],
        ["llmcache.get", commands::llmcache_get, "readonly", 1, 1, 1, "", "read"],
        ["llmcache.del", commands::llmcache_del, "write", 1, 1, 1, "", "write"],
        ["llmcache.key", commands::llmcache_key, "readonly", 1, 1, 1, "", "read"],
        // FETCH is readonly to Redis so replicas serve its hits; its fills
        // write from workers, hence the write ACL category.
        ["embcache.fetch", commands::embcache_fetch, "readonly", 1, 1, 1, "", "write"],
        ["llmcache.fetch", commands::llmcache_fetch, "readonly", 1, 1, 1, "", "write"],
        // SIMILAR may cache the prompt's embedding from a worker, like a fill.
        ["llmcache.similar", commands::llmcache_similar, "readonly", 1, 1, 1, "", "write"],
        // STREAM starts fills like FETCH; READ may end an orphaned Stream.
        ["llmcache.stream", commands::llmcache_stream, "readonly", 1, 1, 1, "", "write"],
        ["llmcache.read", commands::llmcache_read, "readonly", 1, 1, 1, "", "read"],
        // FLUSH is O(1): it bumps the namespace's generation.
        ["embcache.flush", commands::embcache_flush, "write", 1, 1, 1, "", "write"],
        ["llmcache.flush", commands::llmcache_flush, "write", 1, 1, 1, "", "write"],
        ["aicache.throttle", commands::aicache_throttle, "write deny-oom fast", 1, 1, 1, "", "write"],
        // No ACL category: an empty one aborts the load on Redis 7.2+ and
        // Valkey (redis-module asserts it is non-empty where the API exists).
        ["aicache.debug", commands::aicache_debug, "admin", 0, 0, 0, ""],
    ],
    configurations: [
        i64: [
            ["default-ttl", &DEFAULT_TTL, DEFAULT_TTL.default, DEFAULT_TTL.min, DEFAULT_TTL.max, ConfigurationFlags::DEFAULT, None],
            ["ttl-jitter-pct", &TTL_JITTER_PCT, TTL_JITTER_PCT.default, TTL_JITTER_PCT.min, TTL_JITTER_PCT.max, ConfigurationFlags::DEFAULT, None],
            ["max-text-bytes", &MAX_TEXT_BYTES, MAX_TEXT_BYTES.default, MAX_TEXT_BYTES.min, MAX_TEXT_BYTES.max, ConfigurationFlags::DEFAULT, None],
            ["max-dims", &MAX_DIMS, MAX_DIMS.default, MAX_DIMS.min, MAX_DIMS.max, ConfigurationFlags::DEFAULT, None],
            ["fixed-dims", &FIXED_DIMS, FIXED_DIMS.default, FIXED_DIMS.min, FIXED_DIMS.max, ConfigurationFlags::DEFAULT, None],
            ["max-request-bytes", &MAX_REQUEST_BYTES, MAX_REQUEST_BYTES.default, MAX_REQUEST_BYTES.min, MAX_REQUEST_BYTES.max, ConfigurationFlags::DEFAULT, None],
            ["max-response-bytes", &MAX_RESPONSE_BYTES, MAX_RESPONSE_BYTES.default, MAX_RESPONSE_BYTES.min, MAX_RESPONSE_BYTES.max, ConfigurationFlags::DEFAULT, None],
            ["workers", &WORKERS, WORKERS.default, WORKERS.min, WORKERS.max, ConfigurationFlags::IMMUTABLE, None],
            ["queue-size", &QUEUE_SIZE, QUEUE_SIZE.default, QUEUE_SIZE.min, QUEUE_SIZE.max, ConfigurationFlags::IMMUTABLE, None],
            ["max-fills", &MAX_FILLS, MAX_FILLS.default, MAX_FILLS.min, MAX_FILLS.max, ConfigurationFlags::DEFAULT, None],
            ["batch-size", &BATCH_SIZE, BATCH_SIZE.default, BATCH_SIZE.min, BATCH_SIZE.max, ConfigurationFlags::DEFAULT, None],
            ["batch-max-tokens", &BATCH_MAX_TOKENS, BATCH_MAX_TOKENS.default, BATCH_MAX_TOKENS.min, BATCH_MAX_TOKENS.max, ConfigurationFlags::DEFAULT, None],
            ["lease-ms", &LEASE_MS, LEASE_MS.default, LEASE_MS.min, LEASE_MS.max, ConfigurationFlags::DEFAULT, None],
            ["wait-timeout-ms", &WAIT_TIMEOUT_MS, WAIT_TIMEOUT_MS.default, WAIT_TIMEOUT_MS.min, WAIT_TIMEOUT_MS.max, ConfigurationFlags::DEFAULT, None],
            ["fail-memory-ms", &FAIL_MEMORY_MS, FAIL_MEMORY_MS.default, FAIL_MEMORY_MS.min, FAIL_MEMORY_MS.max, ConfigurationFlags::DEFAULT, None],
            ["quota-window-ms", &QUOTA_WINDOW_MS, QUOTA_WINDOW_MS.default, QUOTA_WINDOW_MS.min, QUOTA_WINDOW_MS.max, ConfigurationFlags::DEFAULT, None],
            ["tenant-max-requests", &TENANT_MAX_REQUESTS, TENANT_MAX_REQUESTS.default, TENANT_MAX_REQUESTS.min, TENANT_MAX_REQUESTS.max, ConfigurationFlags::DEFAULT, None],
            ["tenant-max-tokens", &TENANT_MAX_TOKENS, TENANT_MAX_TOKENS.default, TENANT_MAX_TOKENS.min, TENANT_MAX_TOKENS.max, ConfigurationFlags::DEFAULT, None],
            ["global-max-requests", &GLOBAL_MAX_REQUESTS, GLOBAL_MAX_REQUESTS.default, GLOBAL_MAX_REQUESTS.min, GLOBAL_MAX_REQUESTS.max, ConfigurationFlags::DEFAULT, None],
            ["global-max-tokens", &GLOBAL_MAX_TOKENS, GLOBAL_MAX_TOKENS.default, GLOBAL_MAX_TOKENS.min, GLOBAL_MAX_TOKENS.max, ConfigurationFlags::DEFAULT, None],
            ["daily-token-budget", &DAILY_TOKEN_BUDGET, DAILY_TOKEN_BUDGET.default, DAILY_TOKEN_BUDGET.min, DAILY_TOKEN_BUDGET.max, ConfigurationFlags::DEFAULT, None],
            ["stream-linger-ms", &STREAM_LINGER_MS, STREAM_LINGER_MS.default, STREAM_LINGER_MS.min, STREAM_LINGER_MS.max, ConfigurationFlags::DEFAULT, None],
            ["stream-max-entries", &STREAM_MAX_ENTRIES, STREAM_MAX_ENTRIES.default, STREAM_MAX_ENTRIES.min, STREAM_MAX_ENTRIES.max, ConfigurationFlags::DEFAULT, None],
            ["upstream-connect-timeout-ms", &CONNECT_TIMEOUT_MS, CONNECT_TIMEOUT_MS.default, CONNECT_TIMEOUT_MS.min, CONNECT_TIMEOUT_MS.max, ConfigurationFlags::DEFAULT, None],
            ["upstream-timeout-ms", &ATTEMPT_TIMEOUT_MS, ATTEMPT_TIMEOUT_MS.default, ATTEMPT_TIMEOUT_MS.min, ATTEMPT_TIMEOUT_MS.max, ConfigurationFlags::DEFAULT, None],
            ["upstream-max-bytes", &UPSTREAM_MAX_BYTES, UPSTREAM_MAX_BYTES.default, UPSTREAM_MAX_BYTES.min, UPSTREAM_MAX_BYTES.max, ConfigurationFlags::DEFAULT, None],
            ["upstream-retries", &RETRIES, RETRIES.default, RETRIES.min, RETRIES.max, ConfigurationFlags::DEFAULT, None],
            ["upstream-backoff-base-ms", &BACKOFF_BASE_MS, BACKOFF_BASE_MS.default, BACKOFF_BASE_MS.min, BACKOFF_BASE_MS.max, ConfigurationFlags::DEFAULT, None],
            ["upstream-backoff-cap-ms", &BACKOFF_CAP_MS, BACKOFF_CAP_MS.default, BACKOFF_CAP_MS.min, BACKOFF_CAP_MS.max, ConfigurationFlags::DEFAULT, None],
            ["batch-window-ms", &BATCH_WINDOW_MS, BATCH_WINDOW_MS.default, BATCH_WINDOW_MS.min, BATCH_WINDOW_MS.max, ConfigurationFlags::DEFAULT, None],
            ["refresh-ahead-pct", &REFRESH_AHEAD_PCT, REFRESH_AHEAD_PCT.default, REFRESH_AHEAD_PCT.min, REFRESH_AHEAD_PCT.max, ConfigurationFlags::DEFAULT, None],
            ["refresh-max-inflight", &REFRESH_MAX_INFLIGHT, REFRESH_MAX_INFLIGHT.default, REFRESH_MAX_INFLIGHT.min, REFRESH_MAX_INFLIGHT.max, ConfigurationFlags::DEFAULT, None],
            ["breaker-failures", &BREAKER_FAILURES, BREAKER_FAILURES.default, BREAKER_FAILURES.min, BREAKER_FAILURES.max, ConfigurationFlags::DEFAULT, None],
            ["breaker-window-ms", &BREAKER_WINDOW_MS, BREAKER_WINDOW_MS.default, BREAKER_WINDOW_MS.min, BREAKER_WINDOW_MS.max, ConfigurationFlags::DEFAULT, None],
            ["breaker-cooldown-ms", &BREAKER_COOLDOWN_MS, BREAKER_COOLDOWN_MS.default, BREAKER_COOLDOWN_MS.min, BREAKER_COOLDOWN_MS.max, ConfigurationFlags::DEFAULT, None],
            ["semantic-max-entries", &SEMANTIC_MAX_ENTRIES, SEMANTIC_MAX_ENTRIES.default, SEMANTIC_MAX_ENTRIES.min, SEMANTIC_MAX_ENTRIES.max, ConfigurationFlags::DEFAULT, None],
        ],
        string: [
            ["key-prefix", &KEY_PREFIX, DEFAULT_KEY_PREFIX, ConfigurationFlags::DEFAULT, Some(Box::new(on_prefix_config))],
            // Where requests and the key go is the admin's call: PROTECTED
            // refuses CONFIG SET unless enable-protected-configs allows it.
            ["upstream-url", &UPSTREAM_URL, DEFAULT_UPSTREAM_URL, ConfigurationFlags::PROTECTED, Some(Box::new(on_key_config))],
            ["upstream-embeddings-url", &EMBEDDINGS_URL, "", ConfigurationFlags::PROTECTED, None],
            ["upstream-chat-url", &CHAT_URL, "", ConfigurationFlags::PROTECTED, None],
            ["api-key-env", &API_KEY_ENV, "OPENAI_API_KEY", ConfigurationFlags::PROTECTED, Some(Box::new(on_key_config))],
            ["api-key-file", &API_KEY_FILE, "", ConfigurationFlags::PROTECTED, Some(Box::new(on_key_config))],
            // Routes name URLs and key sources: admin-only, like upstream-url.
            ["route-1", &ROUTES[0], "", ConfigurationFlags::PROTECTED, Some(Box::new(on_key_config))],
            ["route-2", &ROUTES[1], "", ConfigurationFlags::PROTECTED, Some(Box::new(on_key_config))],
            ["route-3", &ROUTES[2], "", ConfigurationFlags::PROTECTED, Some(Box::new(on_key_config))],
            ["route-4", &ROUTES[3], "", ConfigurationFlags::PROTECTED, Some(Box::new(on_key_config))],
            ["route-5", &ROUTES[4], "", ConfigurationFlags::PROTECTED, Some(Box::new(on_key_config))],
            ["route-6", &ROUTES[5], "", ConfigurationFlags::PROTECTED, Some(Box::new(on_key_config))],
            ["route-7", &ROUTES[6], "", ConfigurationFlags::PROTECTED, Some(Box::new(on_key_config))],
            ["route-8", &ROUTES[7], "", ConfigurationFlags::PROTECTED, Some(Box::new(on_key_config))],
            ["tenant-source", &TENANT_SOURCE, "arg", ConfigurationFlags::DEFAULT, None],
            ["model-dims", &MODEL_DIMS, model::pins::DEFAULT_MODEL_DIMS, ConfigurationFlags::DEFAULT, None],
            ["semantic-model", &SEMANTIC_MODEL, "text-embedding-3-small", ConfigurationFlags::DEFAULT, None],
            ["semantic-threshold", &SEMANTIC_THRESHOLD, "0.92", ConfigurationFlags::DEFAULT, None],
        ],
        bool: [
            ["normalize-whitespace", &NORMALIZE_WHITESPACE, false, ConfigurationFlags::DEFAULT, None],
            ["cache-sampled", &CACHE_SAMPLED, true, ConfigurationFlags::DEFAULT, None],
            ["upstream-base64", &UPSTREAM_BASE64, true, ConfigurationFlags::DEFAULT, None],
        ],
        enum: [],
        module_args_as_configuration: true,
    ]
}
