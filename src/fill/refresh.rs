//! Refresh-ahead: a hit on an entry in the last aicache.refresh-ahead-pct
//! of its TTL starts a background fill of that entry, while the hit is
//! served at once. The fill is the ordinary single-flight fill (a miss
//! arriving meanwhile joins it) with no client waiting; it is charged to
//! the global spend limits only, and at most aicache.refresh-max-inflight
//! entries are refreshed at once.

use std::sync::atomic::{AtomicUsize, Ordering};

use redis_module::{Context, ContextFlags};

use crate::config::{REFRESH_AHEAD_PCT, REFRESH_MAX_INFLIGHT};
use crate::fill::call::Answer;
use crate::fill::pipeline::{self, Started, Work};
use crate::model::reply::Reply;
use crate::model::ttl::{now_ms, refresh_due};
use crate::redis::ffi;
use crate::stats::STATS;

static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// Entries being refreshed now.
pub fn in_flight() -> usize {
    IN_FLIGHT.load(Ordering::Relaxed)
}

/// The answer of a fill nobody waits for: it only gives back its share of
/// the in-flight bound, on whichever path the call ends.
struct Quiet(usize);

impl Answer for Quiet {
    fn send(self: Box<Self>, _: Reply) {}
}

impl Drop for Quiet {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(self.0, Ordering::Relaxed);
    }
}

/// True when a hit on `key` (stored with a nominal TTL of `ttl_secs`)
/// should start a refresh.
pub fn due(ctx: &Context, key: &[u8], ttl_secs: u64) -> bool {
    let pct = REFRESH_AHEAD_PCT.get_u64();
    pct > 0 && refresh_due(ffi::pttl(ctx, key), ttl_secs, pct)
}

/// Starts the fills of `work` (entries with no hit) in the background.
pub fn start(ctx: &Context, mut work: Work) {
    let n = work.entries.len();
    if n == 0 || work.expiry.is_none() || !ctx.get_flags().contains(ContextFlags::MASTER) {
        return;
    }
    let cap = REFRESH_MAX_INFLIGHT.get_u64() as usize;
    let reserved = IN_FLIGHT.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
        (v + n <= cap).then_some(v + n)
    });
    if reserved.is_err() {
        STATS.refreshes_skipped.add(n as u64);
        return;
    }
    let quiet = Quiet(n);
    work.tenant = None;
    work.with_meta = false;
    match pipeline::start(work, now_ms(), move |_| {
        Some(Box::new(quiet) as Box<dyn Answer>)
    }) {
        // Entries already being filled were joined, not refreshed again.
        Ok(Started::Jobs(jobs)) => {
            let filled: usize = jobs.iter().map(|j| j.embed_size().map_or(1, |s| s.0)).sum();
            STATS.refreshes_started.add(filled as u64);
            pipeline::submit(jobs);
        }
        // Refused (spend limits, failure memory): the entry simply expires.
        Ok(Started::Now(_)) | Err(_) => STATS.refreshes_skipped.add(n as u64),
    }
}
