//! TTLs with jitter. Every write gets `base +/- jitter%`, drawn uniformly in
//! milliseconds, so entries written together do not expire together.
//! Randomness and time are parameters: tests pass fixed ones.

use std::sync::atomic::{AtomicU64, Ordering};

/// Largest TTL in seconds (100 years): keeps `now + ttl` far from overflow.
pub const MAX_TTL_SECS: u64 = 3_153_600_000;
/// Jitter is a percentage in `0..=MAX_JITTER_PCT`; never 100, so no entry is
/// written with a TTL of zero.
pub const MAX_JITTER_PCT: u64 = 90;

/// A TTL in milliseconds drawn from `[base - spread, base + spread]`, where
/// `spread = base * pct / 100`. `random` is any uniform u64.
pub fn jittered_ms(base_secs: u64, pct: u64, random: u64) -> u64 {
    let base = u128::from(base_secs.min(MAX_TTL_SECS)) * 1000;
    let spread = base * u128::from(pct.min(MAX_JITTER_PCT)) / 100;
    if spread == 0 {
        return base as u64;
    }
    let offset = u128::from(random) % (2 * spread + 1);
    (base - spread + offset).max(1) as u64
}

/// How a fill keeps its entries: seconds before jitter (0 = forever).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiry {
    pub ttl_secs: u64,
    pub jitter_pct: u64,
}

/// Absolute expiry in Unix ms of one write made at `now_ms`, or None for
/// no expiry (`ttl_secs` 0). Every write gets its own jitter draw.
pub fn expire_at(now_ms: u64, ttl_secs: u64, pct: u64, random: u64) -> Option<u64> {
    (ttl_secs > 0).then(|| now_ms + jittered_ms(ttl_secs, pct, random))
}

/// Parses the `EX` argument: a positive integer number of seconds.
pub fn parse_ex(arg: &[u8]) -> Result<u64, String> {
    let err =
        || format!("ERR EX must be a positive integer number of seconds (1 to {MAX_TTL_SECS})");
    if arg.is_empty() || arg.len() > 10 || !arg.iter().all(u8::is_ascii_digit) {
        return Err(err());
    }
    let v: u64 = std::str::from_utf8(arg)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(err)?;
    if v == 0 || v > MAX_TTL_SECS {
        return Err(err());
    }
    Ok(v)
}

/// Wall-clock milliseconds since the Unix epoch, the clock PXAT uses.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Drives TTL jitter and retry backoff; seeded at module load.
pub static JITTER_RNG: SplitMix = SplitMix::new(0);

/// splitmix64 over a shared counter: lock-free, good enough spread for TTLs,
/// no dependency. Not for anything secret.
pub struct SplitMix {
    state: AtomicU64,
}

impl SplitMix {
    pub const fn new(seed: u64) -> Self {
        SplitMix {
            state: AtomicU64::new(seed),
        }
    }

    pub fn reseed(&self, seed: u64) {
        self.state.store(seed, Ordering::Relaxed);
    }

    pub fn next(&self) -> u64 {
        let mut z = self
            .state
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Refresh-ahead: an entry with `remaining_ms` left of a nominal TTL of
/// `ttl_secs` is in the last `pct`% of it. The nominal TTL (EX or the
/// default), not the jittered one: the window is the same length for
/// every entry, and a jittered-short entry simply enters it sooner.
pub fn refresh_due(remaining_ms: i64, ttl_secs: u64, pct: u64) -> bool {
    if remaining_ms < 0 || ttl_secs == 0 || pct == 0 {
        return false;
    }
    let window = u128::from(ttl_secs) * 1000 * u128::from(pct) / 100;
    (remaining_ms as u128) <= window
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_stays_within_the_jitter_bounds() {
        for r in [0, 1, u64::MAX / 2, u64::MAX] {
            let ms = jittered_ms(100, 10, r);
            assert!((90_000..=110_000).contains(&ms), "{ms}");
        }
        assert_eq!(jittered_ms(100, 10, 0), 90_000);
        assert_eq!(jittered_ms(100, 10, 20_000), 110_000);
    }

    #[test]
    fn it_spreads_uniformly() {
        let rng = SplitMix::new(42);
        let mut buckets = [0u32; 10];
        for _ in 0..10_000 {
            let ms = jittered_ms(1000, 10, rng.next());
            assert!((900_000..=1_100_000).contains(&ms));
            buckets[((ms - 900_000) * 10 / 200_001) as usize] += 1;
        }
        // Each tenth of the range gets about 1,000 of 10,000 draws.
        for b in buckets {
            assert!((800..=1200).contains(&b), "{buckets:?}");
        }
    }

    #[test]
    fn it_does_not_jitter_when_disabled_or_tiny() {
        assert_eq!(jittered_ms(60, 0, 12345), 60_000);
        assert_eq!(jittered_ms(0, 10, 12345), 0);
    }

    #[test]
    fn it_never_returns_zero_or_overflows() {
        assert!(jittered_ms(1, 90, 0) >= 1);
        assert!(jittered_ms(u64::MAX, 90, u64::MAX) <= MAX_TTL_SECS * 1900);
    }

    #[test]
    fn it_expires_only_with_a_ttl() {
        assert_eq!(expire_at(1_000, 0, 10, 5), None);
        assert_eq!(expire_at(1_000, 10, 0, 5), Some(11_000));
    }

    #[test]
    fn it_parses_ex_strictly() {
        assert_eq!(parse_ex(b"60"), Ok(60));
        assert_eq!(parse_ex(b"3153600000"), Ok(MAX_TTL_SECS));
        for bad in [
            &b"0"[..],
            b"-1",
            b"1.5",
            b"",
            b" 1",
            b"1e3",
            b"3153600001",
            b"99999999999",
        ] {
            assert!(parse_ex(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn it_draws_different_values() {
        let rng = SplitMix::new(7);
        let a = rng.next();
        let b = rng.next();
        assert_ne!(a, b);
        rng.reseed(7);
        assert_eq!(rng.next(), a);
    }

    #[test]
    fn refresh_is_due_in_the_last_pct_of_the_nominal_ttl() {
        assert!(!refresh_due(600, 1, 40));
        assert!(refresh_due(400, 1, 40));
        assert!(refresh_due(0, 1, 40));
        assert!(!refresh_due(-1, 1, 40), "no expiry: nothing to refresh");
        assert!(!refresh_due(-2, 1, 40), "gone");
        assert!(!refresh_due(10, 0, 40), "kept forever");
        assert!(!refresh_due(10, 1, 0), "off");
        assert!(!refresh_due(i64::MAX, MAX_TTL_SECS, 90));
    }
}
