//! aicache: a Redis module that caches embedding vectors and LLM responses
//! for every app instance at once. This file only wires things together.

pub mod canon;
mod cmd;
pub mod codec;
pub mod config;
mod embcache;
pub mod errors;
mod ffi;
pub mod inflight;
pub mod keys;
mod llmcache;
pub mod retry;
pub mod ttl;

use redis_module::configuration::ConfigurationFlags;
use redis_module::{redis_module, Context, RedisString, Status};

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

fn init(_ctx: &Context, _args: &[RedisString]) -> Status {
    let seed = ttl::now_ms() ^ (std::process::id() as u64).rotate_left(32);
    cmd::JITTER_RNG.reseed(seed);
    Status::Ok
}

redis_module! {
    name: "aicache",
    version: 1,
    allocator: (Allocator, ALLOCATOR),
    data_types: [],
    init: init,
    commands: [
        ["embcache.set", embcache::set, "write deny-oom", 1, 1, 1, "", "write"],
        ["embcache.mset", embcache::mset, "write deny-oom", 1, 1, 1, "", "write"],
        ["embcache.get", embcache::get, "readonly fast", 1, 1, 1, "", "read"],
        ["embcache.mget", embcache::mget, "readonly", 1, 1, 1, "", "read"],
        ["embcache.del", embcache::del, "write", 1, 1, 1, "", "write"],
        ["embcache.key", embcache::key, "readonly fast", 1, 1, 1, "", "read"],
        ["llmcache.set", llmcache::set, "write deny-oom", 1, 1, 1, "", "write"],
        ["llmcache.get", llmcache::get, "readonly", 1, 1, 1, "", "read"],
        ["llmcache.del", llmcache::del, "write", 1, 1, 1, "", "write"],
        ["llmcache.key", llmcache::key, "readonly", 1, 1, 1, "", "read"],
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
        ],
        string: [
            ["key-prefix", &KEY_PREFIX, DEFAULT_KEY_PREFIX, ConfigurationFlags::DEFAULT, None],
        ],
        bool: [
            ["normalize-whitespace", &NORMALIZE_WHITESPACE, false, ConfigurationFlags::DEFAULT, None],
            ["cache-sampled", &CACHE_SAMPLED, true, ConfigurationFlags::DEFAULT, None],
        ],
        enum: [],
        module_args_as_configuration: true,
    ]
}
