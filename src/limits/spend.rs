//! The node's spend limits (quota.rs) behind a lock, read from the configs,
//! with the errors and counters FETCH needs.

use std::sync::{LazyLock, Mutex, MutexGuard};

use crate::config::{
    DAILY_TOKEN_BUDGET, GLOBAL_MAX_REQUESTS, GLOBAL_MAX_TOKENS, QUOTA_WINDOW_MS,
    TENANT_MAX_REQUESTS, TENANT_MAX_TOKENS,
};
use crate::model::errors::describe;
pub use crate::model::quota::Charge;
use crate::model::quota::{Class, Limits, Quotas};
use crate::model::ttl::now_us;
use crate::stats::STATS;

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
pub fn admit(tenant: Option<&[u8]>, requests: u64, tokens: u64) -> Result<Charge, String> {
    let refusal = match quotas().admit(tenant, requests, tokens, now_us(), &limits()) {
        Ok(c) => return Ok(c),
        Err(r) => r,
    };
    let who = match (refusal.class, tenant) {
        (Class::TenantRequests | Class::TenantTokens, Some(t)) => {
            STATS.throttled_tenant.incr();
            format!("tenant '{}'", describe(t))
        }
        (Class::Tenants, _) => {
            STATS.throttled_tenant.incr();
            "the tenant table (every tracked tenant is active)".to_string()
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
    Err(format!(
        "THROTTLED {when}: {who} is at {} {}; no upstream call was made",
        refusal.class.config(),
        refusal.limit
    ))
}

/// One upstream request's charge until it is settled. Dropping it (a
/// panicking job) settles as a failed call: the request counts, the tokens
/// are refunded.
pub struct Bill(Option<Charge>);

impl Bill {
    pub fn new(charge: Option<Charge>) -> Bill {
        Bill(charge)
    }

    fn settle_with(
        &mut self,
        requests: impl FnOnce(&Charge) -> u64,
        tokens: impl FnOnce(&Charge) -> u64,
    ) {
        if let Some(c) = self.0.take() {
            let (r, t) = (requests(&c), tokens(&c));
            quotas().settle(&c, r, t);
        }
    }

    /// Moves `tokens` of the charge (and no request) into a bill of its
    /// own, for a part of the job that another request will carry.
    pub fn split(&mut self, tokens: u64) -> Bill {
        match &mut self.0 {
            Some(c) => {
                let t = tokens.min(c.tokens);
                c.tokens -= t;
                Bill(Some(c.part(0, t)))
            }
            None => Bill(None),
        }
    }

    /// The call never went upstream: nothing is owed.
    pub fn refund(mut self) {
        self.settle_with(|_| 0, |_| 0);
    }

    /// Settles with what the job really did: `requests` made upstream and
    /// `tokens` they reported. An answer without `usage` keeps the
    /// estimate rather than billing nothing; failed calls bill no tokens.
    pub fn settle(mut self, requests: u64, tokens: u64, answered: bool) {
        self.settle_with(
            |_| requests,
            |c| match (answered, tokens) {
                (false, _) => 0,
                (true, 0) => c.tokens,
                (true, t) => t,
            },
        );
    }
}

impl Drop for Bill {
    fn drop(&mut self) {
        self.settle_with(|c| c.requests, |_| 0);
    }
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
