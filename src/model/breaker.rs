//! A circuit breaker per endpoint, Redis-free, on an injected clock (ms).
//! Closed: every request goes. After `failures` consecutive failures, the
//! first of them within `window_ms` of the last, it opens: nothing goes
//! for `cooldown_ms`. Then half-open: exactly one probe goes; its success
//! closes the circuit, its failure opens it for another cool-down.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    pub fn word(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// 0 turns the breaker off.
    pub failures: u32,
    pub window_ms: u64,
    pub cooldown_ms: u64,
}

#[derive(Debug, Default)]
pub struct Breaker {
    streak: u32,
    streak_start_ms: u64,
    open_until_ms: Option<u64>,
    probing: bool,
    /// Which admission the current probe is, so only it can release itself.
    probe_seq: u64,
    pub opened: u64,
}

/// May a request go now?
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    Yes,
    /// Yes, as the half-open probe: report its outcome.
    Probe,
    No,
}

impl Breaker {
    pub fn state(&self, now: u64) -> State {
        match self.open_until_ms {
            None => State::Closed,
            Some(t) if now < t => State::Open,
            Some(_) => State::HalfOpen,
        }
    }

    pub fn admit(&mut self, now: u64) -> Admit {
        match self.state(now) {
            State::Closed => Admit::Yes,
            State::Open => Admit::No,
            State::HalfOpen if self.probing => Admit::No,
            State::HalfOpen => {
                self.probing = true;
                self.probe_seq += 1;
                Admit::Probe
            }
        }
    }

    /// The sequence number of the probe just admitted.
    pub fn probe_seq(&self) -> u64 {
        self.probe_seq
    }

    /// Releases probe `seq` if it is still the one in flight and recorded
    /// no outcome.
    pub fn release_probe_if(&mut self, seq: u64) {
        if self.probing && self.probe_seq == seq {
            self.probing = false;
        }
    }

    /// The breaker turned off (`failures` 0): every request goes.
    pub fn reset(&mut self) {
        self.streak = 0;
        self.open_until_ms = None;
        self.probing = false;
    }

    /// A probe that ended without an outcome (a 4xx that says nothing of
    /// the endpoint's health, a shutdown) lets the next request probe.
    pub fn release_probe(&mut self) {
        self.probing = false;
    }

    pub fn success(&mut self) {
        self.streak = 0;
        self.open_until_ms = None;
        self.probing = false;
    }

    pub fn failure(&mut self, now: u64, l: &Limits) {
        if l.failures == 0 {
            return;
        }
        if self.open_until_ms.is_some() {
            // A failed probe (or a late answer while open): another cool-down.
            if self.state(now) != State::Open {
                self.open_until_ms = Some(now.saturating_add(l.cooldown_ms));
                self.opened += 1;
            }
            self.probing = false;
            return;
        }
        if self.streak == 0 || now.saturating_sub(self.streak_start_ms) > l.window_ms {
            self.streak = 0;
            self.streak_start_ms = now;
        }
        self.streak += 1;
        if self.streak >= l.failures {
            self.streak = 0;
            self.open_until_ms = Some(now.saturating_add(l.cooldown_ms));
            self.opened += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits {
        failures: 3,
        window_ms: 1000,
        cooldown_ms: 500,
    };

    #[test]
    fn it_opens_after_n_failures_in_the_window_then_probes_once() {
        let mut b = Breaker::default();
        b.failure(0, &L);
        b.failure(10, &L);
        assert_eq!(b.admit(20), Admit::Yes);
        b.failure(20, &L);
        assert_eq!(b.state(21), State::Open);
        assert_eq!(b.admit(519), Admit::No);
        assert_eq!(b.admit(520), Admit::Probe);
        assert_eq!(b.admit(521), Admit::No, "one probe at a time");
        b.failure(600, &L);
        assert_eq!(b.state(601), State::Open, "a failed probe re-opens");
        assert_eq!(b.opened, 2);
        assert_eq!(b.admit(1100), Admit::Probe);
        b.success();
        assert_eq!(b.state(1101), State::Closed);
        assert_eq!(b.admit(1101), Admit::Yes);
    }

    #[test]
    fn failures_spread_wider_than_the_window_or_broken_by_a_success_do_not_open() {
        let mut b = Breaker::default();
        b.failure(0, &L);
        b.failure(500, &L);
        b.failure(1500, &L);
        assert_eq!(
            b.state(1500),
            State::Closed,
            "the first is outside the window"
        );
        b.failure(1600, &L);
        b.success();
        b.failure(1700, &L);
        assert_eq!(b.state(1700), State::Closed);
        let mut off = Breaker::default();
        for t in 0..100 {
            off.failure(t, &Limits { failures: 0, ..L });
        }
        assert_eq!(off.state(100), State::Closed);
    }

    #[test]
    fn a_released_probe_lets_another_probe() {
        let mut b = Breaker::default();
        for t in 0..3 {
            b.failure(t, &L);
        }
        assert_eq!(b.admit(600), Admit::Probe);
        b.release_probe();
        assert_eq!(b.admit(601), Admit::Probe);
        let second = b.probe_seq();
        b.release_probe_if(second - 1);
        assert_eq!(
            b.admit(602),
            Admit::No,
            "a stale probe cannot free the live one"
        );
        b.release_probe_if(second);
        assert_eq!(b.admit(603), Admit::Probe);
        b.reset();
        assert_eq!(b.state(604), State::Closed);
    }
}
