//! Limits on upstream spend: per-tenant and global requests and tokens per
//! window, and a daily (UTC) token budget. Only calls that really go
//! upstream are charged: tokens are estimated before the call and
//! corrected with the upstream's `usage` after it. Pure: time is a
//! parameter. State is per node and in memory.

use lru::LruCache;

use crate::model::window::Window;

const DAY_US: u64 = 86_400_000_000;

/// Limits in force for one decision; 0 means unlimited.
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    pub window_us: u64,
    pub tenant_requests: u64,
    pub tenant_tokens: u64,
    pub global_requests: u64,
    pub global_tokens: u64,
    pub daily_tokens: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    TenantRequests,
    TenantTokens,
    GlobalRequests,
    GlobalTokens,
    Budget,
    /// The tenant table is full of tenants with live windows.
    Tenants,
}

impl Class {
    pub fn config(self) -> &'static str {
        match self {
            Class::TenantRequests => "aicache.tenant-max-requests",
            Class::TenantTokens => "aicache.tenant-max-tokens",
            Class::GlobalRequests => "aicache.global-max-requests",
            Class::GlobalTokens => "aicache.global-max-tokens",
            Class::Budget => "aicache.daily-token-budget",
            Class::Tenants => "tracked tenants",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub class: Class,
    pub limit: u64,
    /// None when the call can never fit (it alone is over the limit).
    pub retry_after_ms: Option<u64>,
}

/// What one admitted call was charged, for the correction afterwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    pub tenant: Option<Vec<u8>>,
    /// The (monotonic) time the windows recorded the charge at.
    pub at_us: u64,
    pub requests: u64,
    pub tokens: u64,
    /// Windows are rebuilt when quota-window-ms changes; a charge settles
    /// only against the windows it was made in.
    generation: u64,
}

impl Charge {
    /// The same charge with other amounts: one job's share of a call.
    pub fn part(&self, requests: u64, tokens: u64) -> Charge {
        Charge {
            requests,
            tokens,
            ..self.clone()
        }
    }
}

/// `actual - charged` as a window adjustment, without overflow.
fn delta(actual: u64, charged: u64) -> i64 {
    (i128::from(actual) - i128::from(charged)).clamp(i128::from(-i64::MAX), i128::from(i64::MAX))
        as i64
}

struct Pair {
    requests: Window,
    tokens: Window,
}

impl Pair {
    fn new(window_us: u64) -> Self {
        Pair {
            requests: Window::new(window_us),
            tokens: Window::new(window_us),
        }
    }
}

pub struct Quotas {
    tenants: LruCache<Vec<u8>, Pair>,
    capacity: usize,
    global: Pair,
    day: u64,
    spent_today: u64,
    last_us: u64,
    generation: u64,
}

fn ms_ceil(us: u64) -> u64 {
    us.div_ceil(1000)
}

impl Quotas {
    /// `max_tenants` bounds memory: the least recently charged tenant's
    /// windows are dropped first (it starts afresh if it comes back).
    pub fn new(max_tenants: usize) -> Self {
        Quotas {
            tenants: LruCache::unbounded(),
            capacity: max_tenants.max(1),
            global: Pair::new(60_000_000),
            day: 0,
            spent_today: 0,
            last_us: 0,
            generation: 0,
        }
    }

    /// The clock may step back; the quotas' time does not.
    fn clamp(&mut self, now_us: u64) -> u64 {
        self.last_us = self.last_us.max(now_us);
        self.last_us
    }

    fn roll_day(&mut self, now_us: u64) {
        let day = self.clamp(now_us) / DAY_US;
        if day > self.day {
            self.day = day;
            self.spent_today = 0;
        }
    }

    /// Tokens charged today (UTC), after corrections.
    pub fn spent_today(&mut self, now_us: u64) -> u64 {
        self.roll_day(now_us);
        self.spent_today
    }

    /// Charges `requests` and `tokens` (an estimate) to the tenant and the
    /// global windows, all or nothing.
    pub fn admit(
        &mut self,
        tenant: Option<&[u8]>,
        requests: u64,
        tokens: u64,
        now_us: u64,
        l: &Limits,
    ) -> Result<Charge, Refusal> {
        self.roll_day(now_us);
        let now_us = self.last_us;
        // A call must fit in what is left of the budget by its own
        // estimate: the only overshoot left is estimate versus usage.
        if l.daily_tokens > 0 && self.spent_today.saturating_add(tokens) > l.daily_tokens {
            let next_day = (self.day + 1) * DAY_US;
            return Err(Refusal {
                class: Class::Budget,
                limit: l.daily_tokens,
                retry_after_ms: (tokens <= l.daily_tokens)
                    .then(|| ms_ceil(next_day.saturating_sub(now_us)).max(1)),
            });
        }
        if self.global.requests.window_us() != l.window_us {
            self.global = Pair::new(l.window_us);
            self.tenants.clear();
            self.generation += 1;
        }
        let limited = tenant.filter(|_| l.tenant_requests > 0 || l.tenant_tokens > 0);
        // A new tenant is checked against fresh windows and enters the
        // table only once admitted, and only in place of a tenant whose
        // windows are empty: rotating tenant ids cannot erase anyone's state.
        let mut fresh = Pair::new(l.window_us);
        let known = limited.is_some_and(|t| self.tenants.contains(t));
        if limited.is_some() && !known && self.tenants.len() >= self.capacity {
            let idle = self
                .tenants
                .peek_lru()
                .is_some_and(|(_, p)| p.requests.is_idle(now_us) && p.tokens.is_idle(now_us));
            if !idle {
                return Err(Refusal {
                    class: Class::Tenants,
                    limit: self.capacity as u64,
                    retry_after_ms: Some(ms_ceil(l.window_us).max(1)),
                });
            }
            self.tenants.pop_lru();
        }
        let tenant_pair = match limited {
            Some(t) if known => self.tenants.get_mut(t),
            Some(_) => Some(&mut fresh),
            None => None,
        };
        let mut checks: Vec<(&mut Window, u64, u64, Class)> = Vec::with_capacity(4);
        if let Some(p) = tenant_pair {
            checks.push((
                &mut p.requests,
                l.tenant_requests,
                requests,
                Class::TenantRequests,
            ));
            checks.push((&mut p.tokens, l.tenant_tokens, tokens, Class::TenantTokens));
        }
        checks.push((
            &mut self.global.requests,
            l.global_requests,
            requests,
            Class::GlobalRequests,
        ));
        checks.push((
            &mut self.global.tokens,
            l.global_tokens,
            tokens,
            Class::GlobalTokens,
        ));
        checks.retain(|(_, max, _, _)| *max > 0);
        for (w, max, cost, class) in checks.iter_mut() {
            let d = w.peek(now_us, *max, *cost);
            if !d.allowed {
                return Err(Refusal {
                    class: *class,
                    limit: *max,
                    retry_after_ms: d.retry_after_us.map(|us| ms_ceil(us).max(1)),
                });
            }
        }
        for (w, max, cost, _) in checks {
            w.check(now_us, max, cost);
        }
        if let (Some(t), false) = (limited, known) {
            self.tenants.put(t.to_vec(), fresh);
        }
        self.spent_today = self.spent_today.saturating_add(tokens);
        Ok(Charge {
            tenant: tenant.map(<[u8]>::to_vec),
            at_us: now_us,
            requests,
            tokens,
            generation: self.generation,
        })
    }

    /// Replaces a charge with what the call really cost: `requests` made
    /// and `tokens` used (0 and 0 when it never went upstream).
    pub fn settle(&mut self, charge: &Charge, requests: u64, tokens: u64) {
        let dr = delta(requests, charge.requests);
        let dt = delta(tokens, charge.tokens);
        if charge.generation == self.generation {
            if let Some(t) = &charge.tenant {
                if let Some(p) = self.tenants.peek_mut(t) {
                    p.requests.adjust(charge.at_us, dr);
                    p.tokens.adjust(charge.at_us, dt);
                }
            }
            self.global.requests.adjust(charge.at_us, dr);
            self.global.tokens.adjust(charge.at_us, dt);
        }
        if charge.at_us / DAY_US == self.day {
            let spent =
                i128::from(self.spent_today) + i128::from(tokens) - i128::from(charge.tokens);
            self.spent_today = spent.clamp(0, i128::from(u64::MAX)) as u64;
        }
    }
}

/// OpenAI's rule of thumb for English: about 4 bytes per token.
pub fn estimate_tokens(bytes: usize) -> u64 {
    (bytes as u64).div_ceil(4).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60_000_000;

    fn limits() -> Limits {
        Limits {
            window_us: MIN,
            ..Limits::default()
        }
    }

    #[test]
    fn zero_means_unlimited() {
        let mut q = Quotas::new(10);
        for i in 0..1000 {
            assert!(q.admit(Some(b"t"), 1, 1_000, i, &limits()).is_ok());
        }
    }

    #[test]
    fn a_tenant_is_limited_alone_and_others_go_through() {
        let mut q = Quotas::new(10);
        let l = Limits {
            tenant_requests: 2,
            ..limits()
        };
        assert!(q.admit(Some(b"a"), 1, 5, 0, &l).is_ok());
        assert!(q.admit(Some(b"a"), 1, 5, 1, &l).is_ok());
        let r = q.admit(Some(b"a"), 1, 5, 2, &l).unwrap_err();
        assert_eq!(r.class, Class::TenantRequests);
        assert!(r.retry_after_ms.unwrap() >= 59_000);
        assert!(q.admit(Some(b"b"), 1, 5, 3, &l).is_ok());
        assert!(
            q.admit(None, 1, 5, 3, &l).is_ok(),
            "no tenant, no tenant limit"
        );
        assert!(q.admit(Some(b"a"), 1, 5, 2 * MIN, &l).is_ok());
    }

    #[test]
    fn a_refusal_charges_nothing() {
        let mut q = Quotas::new(10);
        let l = Limits {
            tenant_requests: 10,
            global_tokens: 100,
            ..limits()
        };
        assert_eq!(
            q.admit(Some(b"a"), 1, 101, 0, &l).unwrap_err().class,
            Class::GlobalTokens
        );
        // The tenant's request window was not charged by the refused call.
        for i in 0..10 {
            assert!(q.admit(Some(b"a"), 1, 1, i, &l).is_ok(), "{i}");
        }
        assert_eq!(q.spent_today(10), 10);
    }

    #[test]
    fn settling_corrects_the_estimate() {
        let mut q = Quotas::new(10);
        let l = Limits {
            tenant_tokens: 100,
            daily_tokens: 1_000,
            ..limits()
        };
        let c = q.admit(Some(b"a"), 1, 90, 0, &l).unwrap();
        assert!(q.admit(Some(b"a"), 1, 20, 1, &l).is_err());
        q.settle(&c, 1, 10);
        assert_eq!(q.spent_today(2), 10);
        assert!(q.admit(Some(b"a"), 1, 80, 2, &l).is_ok());
    }

    #[test]
    fn the_daily_budget_stops_misses_until_utc_midnight() {
        let mut q = Quotas::new(10);
        let l = Limits {
            daily_tokens: 100,
            ..limits()
        };
        let noon = 10 * DAY_US + DAY_US / 2;
        let c = q.admit(None, 1, 60, noon, &l).unwrap();
        q.settle(&c, 1, 120);
        let r = q.admit(None, 1, 1, noon + 1, &l).unwrap_err();
        assert_eq!(r.class, Class::Budget);
        assert_eq!(r.retry_after_ms, Some(DAY_US / 2 / 1000));
        assert!(q.admit(None, 1, 1, 11 * DAY_US, &l).is_ok());
        assert_eq!(q.spent_today(11 * DAY_US), 1);
    }

    #[test]
    fn a_refund_returns_requests_and_survives_huge_numbers() {
        let mut q = Quotas::new(10);
        let l = Limits {
            tenant_requests: 1,
            daily_tokens: 1 << 53,
            ..limits()
        };
        let c = q.admit(Some(b"a"), 1, 1 << 53, 5, &l).unwrap();
        q.settle(&c, 0, 0);
        assert_eq!(q.spent_today(6), 0);
        assert!(q.admit(Some(b"a"), 1, 1, 7, &l).is_ok());
    }

    #[test]
    fn the_clock_stepping_back_changes_nothing() {
        let mut q = Quotas::new(10);
        let l = Limits {
            daily_tokens: 10,
            ..limits()
        };
        let c = q.admit(None, 1, 10, 2 * DAY_US, &l).unwrap();
        // Back across midnight: the budget is not reset.
        assert!(q.admit(None, 1, 1, 2 * DAY_US - 5, &l).is_err());
        q.settle(&c, 1, 4);
        assert_eq!(q.spent_today(2 * DAY_US - 5), 4);
    }

    #[test]
    fn a_new_window_length_ignores_old_charges() {
        let mut q = Quotas::new(10);
        let l = Limits {
            global_tokens: 10,
            ..limits()
        };
        let c = q.admit(None, 1, 10, 0, &l).unwrap();
        let short = Limits {
            window_us: 1_000_000,
            ..l
        };
        assert!(q.admit(None, 1, 10, 1, &short).is_ok());
        q.settle(&c, 1, 0); // must not free the new window's tokens
        assert!(q.admit(None, 1, 1, 2, &short).is_err());
    }

    #[test]
    fn tenants_are_bounded_and_a_new_one_never_evicts_live_state() {
        let mut q = Quotas::new(2);
        let l = Limits {
            tenant_requests: 1,
            ..limits()
        };
        assert!(q.admit(Some(b"a"), 1, 1, 0, &l).is_ok());
        assert!(q.admit(Some(b"b"), 1, 1, 0, &l).is_ok());
        let r = q.admit(Some(b"c"), 1, 1, 1, &l).unwrap_err();
        assert_eq!(r.class, Class::Tenants);
        assert_eq!(q.tenants.len(), 2);
        // "a" is still limited: rotating ids did not reset it.
        assert_eq!(
            q.admit(Some(b"a"), 1, 1, 2, &l).unwrap_err().class,
            Class::TenantRequests
        );
        // Once a window has passed, the idle tenant makes room.
        assert!(q.admit(Some(b"c"), 1, 1, 2 * MIN, &l).is_ok());
        assert_eq!(q.tenants.len(), 2);
    }

    #[test]
    fn a_refused_new_tenant_is_not_tracked() {
        let mut q = Quotas::new(10);
        let l = Limits {
            tenant_tokens: 10,
            ..limits()
        };
        assert!(q.admit(Some(b"big"), 1, 11, 0, &l).is_err());
        assert_eq!(q.tenants.len(), 0);
    }

    #[test]
    fn a_call_must_fit_in_what_is_left_of_the_budget() {
        let mut q = Quotas::new(10);
        let l = Limits {
            daily_tokens: 100,
            ..limits()
        };
        let r = q.admit(None, 1, 150, 0, &l).unwrap_err();
        assert_eq!((r.class, r.retry_after_ms), (Class::Budget, None));
        assert!(q.admit(None, 1, 60, 1, &l).is_ok());
        let r = q.admit(None, 1, 41, 2, &l).unwrap_err();
        assert_eq!(r.class, Class::Budget);
        assert!(r.retry_after_ms.is_some());
        assert!(q.admit(None, 1, 40, 3, &l).is_ok());
    }

    #[test]
    fn estimates_round_up() {
        assert_eq!(estimate_tokens(0), 1);
        assert_eq!(estimate_tokens(4), 1);
        assert_eq!(estimate_tokens(5), 2);
    }
}
