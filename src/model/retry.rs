//! Retry policy for upstream calls: which failures are worth another attempt,
//! and how long to wait. Pure: time and randomness are parameters.

use std::time::Duration;

/// How one upstream attempt ended, as far as retrying is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Connection refused or reset, DNS failure, TLS failure.
    Connect,
    /// The attempt's total deadline passed.
    Timeout,
    /// The upstream answered with this HTTP status.
    Status(u16),
}

/// Statuses that mean "try again later": rate limits and server trouble.
pub fn is_retryable(outcome: &Outcome) -> bool {
    match outcome {
        Outcome::Connect | Outcome::Timeout => true,
        Outcome::Status(s) => matches!(s, 429 | 500 | 502 | 503 | 504),
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Attempts after the first one.
    pub retries: u32,
    pub base: Duration,
    pub cap: Duration,
}

impl Policy {
    /// Full-jitter exponential backoff: uniform in `[0, min(cap, base * 2^n)]`
    /// for retry `n` (0-based). `random` is any uniform u64.
    pub fn backoff(&self, retry: u32, random: u64) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX));
        let ceiling = exp.min(self.cap).as_millis() as u64;
        Duration::from_millis(random % (ceiling + 1))
    }

    /// The wait before retry `retry`, or None when the call should give up:
    /// not retryable, out of attempts, or the wait would pass the deadline.
    /// A `Retry-After` from the upstream replaces the backoff.
    pub fn next_wait(
        &self,
        outcome: &Outcome,
        retry: u32,
        retry_after: Option<Duration>,
        time_left: Duration,
        random: u64,
    ) -> Option<Duration> {
        if !is_retryable(outcome) || retry >= self.retries {
            return None;
        }
        let wait = retry_after.unwrap_or_else(|| self.backoff(retry, random));
        (wait < time_left).then_some(wait)
    }
}

/// Parses a `Retry-After` value: delta seconds or an IMF-fixdate
/// (`Sun, 06 Nov 1994 08:49:37 GMT`), relative to `now_unix_secs`.
pub fn parse_retry_after(value: &str, now_unix_secs: u64) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs.min(86_400)));
    }
    let at = parse_http_date(v)?;
    Some(Duration::from_secs(at.saturating_sub(now_unix_secs)))
}

fn parse_http_date(s: &str) -> Option<u64> {
    // "Sun, 06 Nov 1994 08:49:37 GMT"
    let parts: Vec<&str> = s.split_whitespace().collect();
    if parts.len() != 6 || parts[5] != "GMT" {
        return None;
    }
    let day: u64 = parts[1].parse().ok()?;
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS.iter().position(|m| *m == parts[2])? as u64 + 1;
    let year: u64 = parts[3].parse().ok()?;
    let hms: Vec<u64> = parts[4]
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    // Years past 9999 are not dates an upstream means, and would overflow.
    if hms.len() != 3
        || !(1..=31).contains(&day)
        || !(1970..=9999).contains(&year)
        || hms[0] > 23
        || hms[1] > 59
        || hms[2] > 60
    {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + hms[0] * 3600 + hms[1] * 60 + hms[2])
}

/// Days since 1970-01-01 for a proleptic Gregorian date (Howard Hinnant's
/// algorithm), valid for years >= 1970.
fn days_from_civil(y: u64, m: u64, d: u64) -> u64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Policy = Policy {
        retries: 3,
        base: Duration::from_millis(100),
        cap: Duration::from_millis(1000),
    };
    const LOTS: Duration = Duration::from_secs(60);

    #[test]
    fn it_retries_only_transient_failures() {
        for o in [
            Outcome::Connect,
            Outcome::Timeout,
            Outcome::Status(429),
            Outcome::Status(503),
        ] {
            assert!(P.next_wait(&o, 0, None, LOTS, 5).is_some(), "{o:?}");
        }
        for s in [400, 401, 403, 404, 422, 200] {
            assert_eq!(
                P.next_wait(&Outcome::Status(s), 0, None, LOTS, 5),
                None,
                "{s}"
            );
        }
    }

    #[test]
    fn it_stops_after_the_configured_retries() {
        assert!(P.next_wait(&Outcome::Timeout, 2, None, LOTS, 5).is_some());
        assert_eq!(P.next_wait(&Outcome::Timeout, 3, None, LOTS, 5), None);
    }

    #[test]
    fn it_backs_off_with_full_jitter_under_the_cap() {
        assert_eq!(P.backoff(0, 0), Duration::ZERO);
        assert_eq!(P.backoff(0, 100), Duration::from_millis(100));
        assert_eq!(P.backoff(1, 200), Duration::from_millis(200));
        assert_eq!(P.backoff(10, 1000), Duration::from_millis(1000));
        assert!(P.backoff(40, u64::MAX) <= P.cap);
    }

    #[test]
    fn it_honours_retry_after_within_the_deadline() {
        let ra = Some(Duration::from_secs(2));
        assert_eq!(
            P.next_wait(&Outcome::Status(429), 0, ra, LOTS, 5),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            P.next_wait(&Outcome::Status(429), 0, ra, Duration::from_secs(1), 5),
            None
        );
    }

    #[test]
    fn it_parses_retry_after_seconds_and_dates() {
        assert_eq!(parse_retry_after("7", 0), Some(Duration::from_secs(7)));
        // 784111777 is Sun, 06 Nov 1994 08:49:37 GMT (RFC 9110's example).
        let at = "Sun, 06 Nov 1994 08:49:37 GMT";
        assert_eq!(
            parse_retry_after(at, 784_111_777 - 3),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            parse_retry_after(at, 784_111_777 + 10),
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse_retry_after("Thu, 01 Jan 1970 00:00:10 GMT", 0),
            Some(Duration::from_secs(10))
        );
        for bad in [
            "",
            "soon",
            "-1",
            "Sun, 06 Nov 1994 08:49:37 PST",
            "Sun, 32 Nov 1994 08:49:37 GMT",
            "Sun, 06 Nov 99999999999999 08:49:37 GMT",
            "Sun, 06 Nov 18446744073709551615 08:49:37 GMT",
        ] {
            assert_eq!(parse_retry_after(bad, 0), None, "{bad}");
        }
    }
}
