//! Command handlers: parse and validate arguments, read hits, and hand
//! misses to the fill pipeline. Thin by design.

pub mod args;
pub mod debug;
pub mod embcache;
pub mod llmcache;
pub mod similar;
pub mod stream;
pub mod throttle;

use redis_module::{Context, RedisResult, RedisString};

use crate::redis::guard::guard;

/// Every command as Redis calls it: inside the panic boundary.
macro_rules! guarded {
    ($($name:ident => $label:literal, $handler:path;)*) => {
        $(pub fn $name(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
            guard($label, ctx, args, $handler)
        })*
    };
}

guarded! {
    embcache_set => "EMBCACHE.SET", embcache::set;
    embcache_mset => "EMBCACHE.MSET", embcache::mset;
    embcache_get => "EMBCACHE.GET", embcache::get;
    embcache_mget => "EMBCACHE.MGET", embcache::mget;
    embcache_del => "EMBCACHE.DEL", embcache::del;
    embcache_key => "EMBCACHE.KEY", embcache::key;
    embcache_dims => "EMBCACHE.DIMS", embcache::dims;
    embcache_fetch => "EMBCACHE.FETCH", embcache::fetch;
    embcache_flush => "EMBCACHE.FLUSH", embcache::flush;
    llmcache_set => "LLMCACHE.SET", llmcache::set;
    llmcache_get => "LLMCACHE.GET", llmcache::get;
    llmcache_del => "LLMCACHE.DEL", llmcache::del;
    llmcache_key => "LLMCACHE.KEY", llmcache::key;
    llmcache_fetch => "LLMCACHE.FETCH", llmcache::fetch;
    llmcache_flush => "LLMCACHE.FLUSH", llmcache::flush;
    llmcache_similar => "LLMCACHE.SIMILAR", similar::similar;
    llmcache_stream => "LLMCACHE.STREAM", stream::stream;
    llmcache_read => "LLMCACHE.READ", stream::read;
    aicache_throttle => "AICACHE.THROTTLE", throttle::throttle;
    aicache_debug => "AICACHE.DEBUG", debug::debug;
}
