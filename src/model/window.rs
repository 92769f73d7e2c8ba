//! Sliding-window limiter with constant memory. Pure: time is a parameter.
//!
//! The window of `W` microseconds is cut into `SLOTS` buckets of
//! `g = ceil(W / SLOTS)` microseconds (the last `SLOTS + 1` are kept in a
//! ring). A request at time `t` counts every bucket that overlaps
//! `(t - W, t]`, the oldest one whole. Because that set covers every instant
//! of any half-open interval of length `W` that ends after `t`, the admitted
//! cost in **any** interval of length `W` never exceeds `max`. The price is
//! the part of the oldest bucket outside the window: under steady overload
//! the limiter admits `max` per `W + g`, which is `SLOTS / (SLOTS + 1)` (98.5%)
//! of an exact sliding log, in `16 + 8 * (SLOTS + 1)` bytes of counters
//! whatever `max` is.

pub const SLOTS: u64 = 64;
const RING: usize = SLOTS as usize + 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    window_us: u64,
    /// Absolute index (`t / g`) of the newest bucket in the ring.
    head: u64,
    /// Latest time seen: the clock may step back, the window does not.
    last_us: u64,
    counts: [u64; RING],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u64,
    pub remaining: u64,
    /// Microseconds until `cost` would fit if nothing else arrives; None
    /// when allowed, or when `cost > max` so it never fits.
    pub retry_after_us: Option<u64>,
    /// Microseconds until the window is empty again.
    pub reset_after_us: u64,
}

impl Window {
    pub fn new(window_us: u64) -> Self {
        Window {
            window_us: window_us.max(1),
            head: 0,
            last_us: 0,
            counts: [0; RING],
        }
    }

    pub fn window_us(&self) -> u64 {
        self.window_us
    }

    fn width(&self) -> u64 {
        self.window_us.div_ceil(SLOTS).max(1)
    }

    /// Moves the ring forward to `now` and returns the clamped time.
    fn advance(&mut self, now_us: u64) -> u64 {
        let now = now_us.max(self.last_us);
        self.last_us = now;
        let b = now / self.width();
        if b > self.head {
            let steps = (b - self.head).min(RING as u64);
            for i in 1..=steps {
                self.counts[((self.head + i) % RING as u64) as usize] = 0;
            }
            self.head = b;
        }
        now
    }

    /// Oldest bucket index that overlaps `(now - W, now]`.
    fn oldest(&self, now: u64) -> u64 {
        let first = now.saturating_add(1).saturating_sub(self.window_us);
        (first / self.width()).max(self.head.saturating_sub(RING as u64 - 1))
    }

    fn at(&self, bucket: u64) -> u64 {
        self.counts[(bucket % RING as u64) as usize]
    }

    /// Cost counted against a request at `now` (already advanced).
    fn used(&self, now: u64) -> u64 {
        (self.oldest(now)..=self.head).fold(0u64, |a, b| a.saturating_add(self.at(b)))
    }

    /// True when nothing admitted still counts at `now_us`.
    pub fn is_idle(&self, now_us: u64) -> bool {
        self.used(now_us.max(self.last_us)) == 0
    }

    /// Admits `cost` at `now_us` if it fits under `max`, and records it.
    pub fn check(&mut self, now_us: u64, max: u64, cost: u64) -> Decision {
        let d = self.peek(now_us, max, cost);
        if d.allowed {
            let slot = (self.head % RING as u64) as usize;
            self.counts[slot] = self.counts[slot].saturating_add(cost);
        }
        if !d.allowed {
            return d;
        }
        Decision {
            remaining: d.remaining.saturating_sub(cost),
            reset_after_us: self.time_until_empty(self.last_us),
            ..d
        }
    }

    /// What `check` would decide, without recording anything. `remaining`
    /// is before the cost.
    pub fn peek(&mut self, now_us: u64, max: u64, cost: u64) -> Decision {
        let now = self.advance(now_us);
        let used = self.used(now);
        let allowed = cost <= max.saturating_sub(used);
        Decision {
            allowed,
            limit: max,
            remaining: max.saturating_sub(used),
            retry_after_us: if allowed || cost > max {
                None
            } else {
                Some(self.time_until_free(now, used.saturating_add(cost) - max))
            },
            reset_after_us: self.time_until_empty(now),
        }
    }

    /// When bucket `b` stops overlapping the window: the first `t` with
    /// `(t + 1 - W) / g > b`.
    fn expires_at(&self, b: u64) -> u64 {
        b.saturating_add(1)
            .saturating_mul(self.width())
            .saturating_add(self.window_us)
            .saturating_sub(1)
    }

    fn time_until_free(&self, now: u64, need: u64) -> u64 {
        let mut freed = 0u64;
        for b in self.oldest(now)..=self.head {
            freed = freed.saturating_add(self.at(b));
            if freed >= need {
                return self.expires_at(b).saturating_sub(now).max(1);
            }
        }
        self.expires_at(self.head).saturating_sub(now).max(1)
    }

    fn time_until_empty(&self, now: u64) -> u64 {
        (self.oldest(now)..=self.head)
            .rev()
            .find(|&b| self.at(b) > 0)
            .map_or(0, |b| self.expires_at(b).saturating_sub(now))
    }

    /// Corrects a charge made at `at_us` by `delta` (token reconciliation).
    /// A bucket that has left the ring is gone; counts never go below 0.
    pub fn adjust(&mut self, at_us: u64, delta: i64) {
        let b = at_us / self.width();
        if b > self.head || b + (RING as u64) <= self.head {
            return;
        }
        let slot = (b % RING as u64) as usize;
        self.counts[slot] = if delta >= 0 {
            self.counts[slot].saturating_add(delta as u64)
        } else {
            self.counts[slot].saturating_sub(delta.unsigned_abs())
        };
    }

    pub const ENCODED_LEN: usize = 8 + 8 * 3 + 8 * RING;
    const MAGIC: &'static [u8; 8] = b"aicthr1\0";

    /// Fixed-size little-endian encoding: what a THROTTLE key holds.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::ENCODED_LEN);
        out.extend_from_slice(Self::MAGIC);
        for v in [self.window_us, self.head, self.last_us] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for c in self.counts {
            out.extend_from_slice(&c.to_le_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Window> {
        if bytes.len() != Self::ENCODED_LEN || &bytes[..8] != Self::MAGIC {
            return None;
        }
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[8 + 8 * i..16 + 8 * i]);
            u64::from_le_bytes(w)
        };
        let mut counts = [0u64; RING];
        for (i, c) in counts.iter_mut().enumerate() {
            *c = word(3 + i);
        }
        let w = Window {
            window_us: word(0).max(1),
            head: word(1),
            last_us: word(2),
            counts,
        };
        // Only states this code can produce: the newest bucket is the
        // latest time's bucket.
        (w.head == w.last_us / w.width()).then_some(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// The reference: an exact sliding log.
    struct Log {
        w: u64,
        entries: VecDeque<(u64, u64)>,
    }

    impl Log {
        fn check(&mut self, now: u64, max: u64, cost: u64) -> bool {
            while self
                .entries
                .front()
                .is_some_and(|&(t, _)| t + self.w <= now)
            {
                self.entries.pop_front();
            }
            let used: u64 = self.entries.iter().map(|&(_, c)| c).sum();
            let ok = used + cost <= max;
            if ok {
                self.entries.push_back((now, cost));
            }
            ok
        }
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// Largest admitted cost in any half-open interval of length w.
    fn worst_window(admitted: &[(u64, u64)], w: u64) -> u64 {
        let mut worst = 0;
        let mut sum = 0;
        let mut lo = 0;
        for hi in 0..admitted.len() {
            sum += admitted[hi].1;
            while admitted[lo].0 + w <= admitted[hi].0 {
                sum -= admitted[lo].1;
                lo += 1;
            }
            worst = worst.max(sum);
        }
        worst
    }

    #[test]
    fn it_never_over_admits_and_keeps_up_with_an_exact_log() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for case in 0..300 {
            let w = 1 + rng.next() % 50_000;
            let max = 1 + rng.next() % 200;
            let max_cost = 1 + rng.next() % 5;
            // From sparse to heavy overload.
            let mean_gap = 1 + rng.next() % (2 * w / max + 2);
            let mut win = Window::new(w);
            let mut log = Log {
                w,
                entries: VecDeque::new(),
            };
            let (mut t, mut ours, mut reference) = (0u64, Vec::new(), 0u64);
            // Long enough (100 windows) that the last, cut-off window does
            // not decide the ratio.
            while t < 100 * w {
                t += rng.next() % (2 * mean_gap);
                let cost = 1 + rng.next() % max_cost;
                if win.check(t, max, cost).allowed {
                    ours.push((t, cost));
                }
                if log.check(t, max, cost) {
                    reference += cost;
                }
            }
            let worst = worst_window(&ours, w);
            assert!(worst <= max, "case {case}: {worst} > {max} in a window");
            let admitted: u64 = ours.iter().map(|&(_, c)| c).sum();
            assert!(
                admitted * 100 >= reference * 95,
                "case {case}: {admitted} < 95% of {reference} (w {w}, max {max})"
            );
        }
    }

    #[test]
    fn it_reports_remaining_retry_and_reset() {
        let mut w = Window::new(1_000_000);
        let d = w.check(0, 3, 2);
        assert!(d.allowed && d.remaining == 1 && d.retry_after_us.is_none());
        assert_eq!(d.reset_after_us, w.expires_at(0));
        let d = w.check(10, 3, 2);
        assert!(!d.allowed && d.remaining == 1);
        // Room comes back when the first bucket leaves the window: ~1 s.
        let retry = d.retry_after_us.unwrap();
        assert!((990_000..=1_040_000).contains(&retry), "{retry}");
        assert!(w.check(10 + retry, 3, 2).allowed);
        assert!(!w.check(10 + retry, 3, 2).allowed);
    }

    #[test]
    fn a_cost_above_max_never_fits() {
        let mut w = Window::new(1000);
        let d = w.check(5, 3, 4);
        assert!(!d.allowed && d.retry_after_us.is_none() && d.remaining == 3);
    }

    #[test]
    fn boundaries_are_half_open() {
        let mut w = Window::new(SLOTS * 10); // g = 10 us
        assert!(w.check(0, 1, 1).allowed);
        assert!(!w.check(SLOTS * 10 - 1, 1, 1).allowed);
        // At t = W the first admission is outside (t - W, t], and bucket 0
        // has left the window only once t + 1 - W reaches g.
        assert!(!w.check(SLOTS * 10, 1, 1).allowed);
        assert!(w.check(SLOTS * 10 + 9, 1, 1).allowed);
    }

    #[test]
    fn huge_max_and_sub_microsecond_rates_work() {
        let mut w = Window::new(1_000);
        let max = 1_000_000_000;
        for t in 0..1_000 {
            assert!(w.check(t, max, 1_000_000).allowed, "t {t}");
        }
        assert!(!w.check(999, max, 1).allowed);
        assert!(w.check(2_100, max, max).allowed);
        assert_eq!(w.check(2_100, u64::MAX, u64::MAX - max).remaining, 0);
    }

    #[test]
    fn a_clock_going_backwards_cannot_reopen_the_window() {
        let mut w = Window::new(1_000_000);
        assert!(w.check(5_000_000, 1, 1).allowed);
        assert!(!w.check(1_000, 1, 1).allowed);
        assert!(!w.check(5_500_000, 1, 1).allowed);
    }

    #[test]
    fn it_round_trips_and_rejects_foreign_bytes() {
        let mut w = Window::new(60_000_000);
        w.check(123_456_789, 100, 7);
        let bytes = w.encode();
        assert_eq!(bytes.len(), Window::ENCODED_LEN);
        assert_eq!(Window::decode(&bytes), Some(w));
        assert_eq!(Window::decode(b"hello"), None);
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert_eq!(Window::decode(&bad), None);
        // A crafted state with an inconsistent head is foreign, and extreme
        // times cannot overflow.
        let mut forged = bytes.clone();
        forged[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(Window::decode(&forged), None);
        let mut late = Window::new(u64::MAX);
        let d = late.check(u64::MAX, 5, 1);
        assert!(d.allowed && d.remaining == 4);
    }

    #[test]
    fn adjust_corrects_a_recent_charge_only() {
        let mut w = Window::new(1_000_000);
        w.check(0, 100, 50);
        w.adjust(0, -30);
        assert_eq!(w.check(1, 100, 0).remaining, 80);
        w.adjust(0, 1_000);
        assert_eq!(w.check(2, 1_000, 0).remaining, 0);
        w.adjust(10_000_000, 5); // in the future: ignored
        w.check(5_000_000, 1_000, 0);
        w.adjust(0, 5); // long gone: ignored
        assert_eq!(w.check(5_000_001, 1_000, 0).remaining, 1_000);
    }
}
