//! Filling misses: the single-flight registry of blocked calls, the worker
//! pool, the HTTP upstream and the writes back into Redis.

pub mod fetch;
pub mod job;
pub mod pool;
pub mod upstream;
