//! Counters behind the `aicache` INFO section. Relaxed atomics: each
//! counter is exact, the section is not one atomic snapshot.

use std::sync::atomic::{AtomicU64, Ordering};

pub struct Counter(AtomicU64);

impl Counter {
    const fn new() -> Self {
        Counter(AtomicU64::new(0))
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn incr(&self) {
        self.add(1);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

macro_rules! counters {
    ($($name:ident),* $(,)?) => {
        pub struct Stats { $(pub $name: Counter,)* }

        pub static STATS: Stats = Stats { $($name: Counter::new(),)* };

        impl Stats {
            /// CONFIG RESETSTAT.
            pub fn reset(&self) {
                $(self.$name.0.store(0, Ordering::Relaxed);)*
            }

            /// Every counter with its INFO field name.
            pub fn fields(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name.get()),)*]
            }
        }
    };
}

counters!(
    hits,
    misses,
    coalesced_waiters,
    fills_started,
    upstream_requests,
    upstream_retries,
    upstream_errors_connect,
    upstream_errors_timeout,
    upstream_errors_http_429,
    upstream_errors_http_4xx,
    upstream_errors_http_5xx,
    upstream_errors_invalid,
    upstream_errors_too_large,
    queue_full_errors,
    fail_fast_errors,
    throttled_tenant,
    throttled_global,
    throttled_budget,
    fill_capacity_errors,
    wait_timeouts,
    worker_panics,
    writes_skipped,
    batch_splits,
    handler_panics,
    streams_started,
    stream_joins,
    stream_entries,
    stream_reads_blocked,
    tokens_prompt,
    tokens_completion,
    tokens_total,
);
