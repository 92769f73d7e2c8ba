//! Filling misses: the single-flight registry of blocked calls, the worker
//! pool, the HTTP upstream and the writes back into Redis.

pub mod apikey;
pub mod appender;
pub mod batcher;
pub mod call;
pub mod endpoints;
pub mod job;
pub mod pins;
pub mod pipeline;
pub mod pool;
pub mod refresh;
pub mod resolve;
pub mod semantic;
pub mod semindex;
pub mod store;
pub mod streaming;
pub mod streams;
pub mod upstream;

#[cfg(test)]
mod economy_tests;
#[cfg(test)]
mod semantic_tests;
#[cfg(test)]
mod stream_tests;
#[cfg(test)]
mod tests;
