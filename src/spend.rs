//! The node's spend limits (quota.rs) behind a lock, read from the configs,
//! with the errors and counters FETCH needs.

use std::sync::{LazyLock, Mutex, MutexGuard};

use redis_module::RedisError;

use crate::config::{
    DAILY_TOKEN_BUDGET, GLOBAL_MAX_REQUESTS, GLOBAL_MAX_TOKENS, QUOTA_WINDOW_MS,
    TENANT_MAX_REQUESTS, TENANT_MAX_TOKENS,
};
use crate::errors::describe;
use crate::ffi::error;
use crate::quota::{Charge, Class, Limits, Quotas};
use crate::stats::STATS;
use crate::ttl::now_us;

/// Tenants whose windows are kept; the least recently charged go first.
const MAX_TENANTS: usize = 100_000;

static QUOTAS: LazyLock<Mutex<Quotas>> = LazyLock::new(|| Mutex::new(Quotas::new(MAX_TENANTS)));

fn quotas() -> MutexGuard<'static, Quotas> {
    QUOTAS.lock().unwrap_or_else(|e| e.into_inner())
}

fn limits() -> Limits {
    Limits {
        window_us: QUOTA_WINDOW_MS.get_u64() * 1000,
        tenant_requests: TENANT_MAX_REQUESTS.get_u64(),
        tenant_tokens: TENANT_MAX_TOKENS.get_u64(),
        global_requests: GLOBAL_MAX_REQUESTS.get_u64(),
        global_tokens: GLOBAL_MAX_TOKENS.get_u64(),
        daily_tokens: DAILY_TOKEN_BUDGET.get_u64(),
    }
}

/// Charges a call that is about to go upstream, or refuses it with a
/// `THROTTLED` error carrying the wait in milliseconds.
pub fn admit(tenant: Option<&[u8]>, requests: u64, tokens: u64) -> Result<Charge, RedisError> {
    let refusal = match quotas().admit(tenant, requests, tokens, now_us(), &limits()) {
        Ok(c) => return Ok(c),
        Err(r) => r,
    };
    let who = match (refusal.class, tenant) {
        (Class::TenantRequests | Class::TenantTokens, Some(t)) => {
            STATS.throttled_tenant.incr();
            format!("tenant '{}'", describe(t))
        }
        (Class::Budget, _) => {
            STATS.throttled_budget.incr();
            "the daily token budget".to_string()
        }
        _ => {
            STATS.throttled_global.incr();
            "the global limit".to_string()
        }
    };
    let when = match refusal.retry_after_ms {
        Some(ms) => format!("retry after {ms} ms"),
        None => "this call alone is over the limit".to_string(),
    };
    Err(error(format!(
        "THROTTLED {when}: {who} is at {} {}; no upstream call was made",
        refusal.class.config(),
        refusal.limit
    )))
}

/// Replaces the charge's token estimate with the upstream's `usage`
/// (0 when the call failed: failed calls are not billed).
pub fn settle(charge: &Charge, actual_tokens: u64) {
    quotas().settle(charge, actual_tokens);
}

/// (tokens spent today, budget left or -1 when unlimited) for INFO.
pub fn today() -> (u64, i64) {
    let spent = quotas().spent_today(now_us());
    let budget = DAILY_TOKEN_BUDGET.get_u64();
    let left = if budget == 0 {
        -1
    } else {
        budget.saturating_sub(spent) as i64
    };
    (spent, left)
}
