//! Command handlers: parse and validate arguments, read hits, and hand
//! misses to the fill pipeline. Thin by design.

pub mod args;
pub mod embcache;
pub mod llmcache;
pub mod throttle;
