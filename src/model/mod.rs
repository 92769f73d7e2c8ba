//! Pure logic: no Redis types, no globals but a jitter RNG, time and
//! randomness passed in. Everything here is unit-tested without a server.

pub mod assemble;
pub mod batch;
pub mod breaker;
pub mod canon;
pub mod codec;
pub mod embed;
pub mod errors;
pub mod failmem;
pub mod frames;
pub mod inflight;
pub mod keys;
pub mod pins;
pub mod quota;
pub mod reply;
pub mod retry;
pub mod routes;
pub mod semantic;
pub mod sse;
pub mod ttl;
pub mod vindex;
pub mod window;
