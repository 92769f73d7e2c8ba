//! Counters behind the `aicache` INFO section. Relaxed atomics: each
//! counter is exact, the section is not one atomic snapshot.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
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

    pub fn reset(&self) {
        self.0.store(0, Ordering::Relaxed);
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
    emb_hits,
    emb_misses,
    llm_hits,
    llm_misses,
    tokens_saved,
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
    batched_requests,
    batched_calls,
    chat_fallbacks,
    failovers,
    circuit_rejections,
    refreshes_started,
    refreshes_skipped,
    semantic_lookups,
    semantic_hits,
    semantic_misses,
    semantic_skipped,
    semantic_errors,
    semantic_index_full,
    semantic_rebuilds,
);

/// Upper bounds (ms) of the fill latency buckets, as Prometheus `le`.
pub const LATENCY_BOUNDS_MS: [u64; 11] =
    [10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000];

/// Time from a worker taking a fill job to its upstream answer (retries
/// and splits included, queue wait excluded): counts per bucket.
pub struct Latency {
    buckets: [Counter; LATENCY_BOUNDS_MS.len() + 1],
    sum_ms: Counter,
}

pub static FILL_LATENCY: Latency = Latency::new();

impl Default for Latency {
    fn default() -> Self {
        Latency::new()
    }
}

impl Latency {
    pub const fn new() -> Self {
        Latency {
            buckets: [const { Counter::new() }; LATENCY_BOUNDS_MS.len() + 1],
            sum_ms: Counter::new(),
        }
    }

    pub fn record(&self, ms: u64) {
        let i = LATENCY_BOUNDS_MS
            .iter()
            .position(|&b| ms <= b)
            .unwrap_or(LATENCY_BOUNDS_MS.len());
        self.buckets[i].incr();
        self.sum_ms.add(ms);
    }

    pub fn reset(&self) {
        for b in &self.buckets {
            b.0.store(0, Ordering::Relaxed);
        }
        self.sum_ms.0.store(0, Ordering::Relaxed);
    }

    /// Cumulative counts as INFO fields (`fill_latency_le_<ms>`, then
    /// `_le_inf`, `_count`, `_sum_ms`), so they map onto a Prometheus
    /// histogram one to one.
    pub fn fields(&self) -> Vec<(String, u64)> {
        self.fields_named("fill_latency")
    }

    /// The same fields under another name (one histogram per endpoint).
    pub fn fields_named(&self, name: &str) -> Vec<(String, u64)> {
        let mut total = 0;
        let mut out = Vec::with_capacity(self.buckets.len() + 2);
        for (i, b) in self.buckets.iter().enumerate() {
            total += b.get();
            let name = match LATENCY_BOUNDS_MS.get(i) {
                Some(ms) => format!("{name}_le_{ms}"),
                None => format!("{name}_le_inf"),
            };
            out.push((name, total));
        }
        out.push((format!("{name}_count"), total));
        out.push((format!("{name}_sum_ms"), self.sum_ms.get()));
        out
    }
}

/// Streamed generations running now (a gauge: not reset by RESETSTAT).
pub static STREAMS_RUNNING: AtomicU64 = AtomicU64::new(0);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_are_cumulative_and_bounds_inclusive() {
        let l = Latency::new();
        for ms in [0, 10, 11, 30_000, 30_001] {
            l.record(ms);
        }
        let f: std::collections::HashMap<String, u64> = l.fields().into_iter().collect();
        assert_eq!(f["fill_latency_le_10"], 2);
        assert_eq!(f["fill_latency_le_25"], 3);
        assert_eq!(f["fill_latency_le_30000"], 4);
        assert_eq!(f["fill_latency_le_inf"], 5);
        assert_eq!(f["fill_latency_count"], 5);
        assert_eq!(f["fill_latency_sum_ms"], 60_022);
        l.reset();
        assert_eq!(l.fields()[0].1, 0);
    }
}
