//! HTTP to the OpenAI-compatible upstream: one shared keep-alive agent, a
//! total deadline per attempt, bounded bodies, no redirects, and retries by
//! the policy in retry.rs. Runs on worker threads only, never under the
//! Redis lock.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use ureq::unversioned::transport::DefaultConnector;
use ureq::Agent;

use crate::config::{self, Bounded};
use crate::fill::apikey;
pub use crate::fill::endpoints::Dest;
use crate::fill::endpoints::{authorize, timeouts};
use crate::fill::resolve::BoundedResolver;
use crate::model::breaker::State;
use crate::model::errors::sanitize;
use crate::model::retry::{parse_retry_after, Outcome, Policy};
use crate::model::sse::{Event, Parser};
use crate::stats::STATS;

/// Longest piece of upstream error text passed on to clients.
const MAX_UPSTREAM_MESSAGE: usize = 200;
const NO_MESSAGE: &str = "(no message)";
/// Error bodies are read only this far.
const MAX_ERROR_BODY: u64 = 64 * 1024;

/// Text an upstream sent back, made safe: a message that echoes the key
/// in any form is withheld whole, and anything shaped like an OpenAI key
/// is redacted.
pub fn scrub(text: &str, key: Option<&str>) -> String {
    if key.is_some_and(|k| apikey::echoes(text, k)) {
        return "[message withheld: it repeated the API key]".into();
    }
    text.split(' ')
        .map(|w| if w.contains("sk-") { "[redacted]" } else { w })
        .collect::<Vec<_>>()
        .join(" ")
}

/// What fills send and wait on: production uses [`Http`], tests a fake.
pub trait Upstream {
    /// POSTs `body` to `url` with retries until it succeeds, fails for
    /// good, or `deadline` passes. Returns the 200 response body.
    fn post(&self, dest: &Dest, body: &[u8], deadline: Instant) -> Result<Vec<u8>, Failure>;

    /// POSTs a streamed request and hands `sink` each batch of events as
    /// it arrives, until the sink says it is done. An attempt is retried
    /// only while the sink has taken nothing.
    fn stream(
        &self,
        dest: &Dest,
        body: &[u8],
        deadline: Instant,
        sink: &mut dyn Sink,
    ) -> Result<(), Failure>;
}

/// Where a streamed answer's events go.
pub trait Sink {
    /// Takes events; Ok(true) once the stream is complete.
    fn events(&mut self, events: Vec<Event>) -> Result<bool, Failure>;
    /// True once anything was taken: from then on there is no retry.
    fn started(&self) -> bool;
}

/// The HTTP upstream: a shared keep-alive agent and the stop flag.
pub struct Http {
    pub agent: Agent,
    pub stopping: &'static AtomicBool,
}

impl Upstream for Http {
    fn post(&self, dest: &Dest, body: &[u8], deadline: Instant) -> Result<Vec<u8>, Failure> {
        let route = &dest.endpoint.route;
        let key = apikey::for_source(&route.key, &route.name).map_err(Failure::Credentials)?;
        let stopping = || self.stopping.load(Ordering::Relaxed);
        let Some(_slot) = dest.endpoint.slot(deadline, &stopping) else {
            return Err(Failure::Busy(route.name.clone(), route.max_concurrency));
        };
        retrying(dest, deadline, self.stopping, &|| false, &mut |budget| {
            attempt(&self.agent, dest, body, key.as_deref(), budget)
        })
    }

    fn stream(
        &self,
        dest: &Dest,
        body: &[u8],
        deadline: Instant,
        sink: &mut dyn Sink,
    ) -> Result<(), Failure> {
        let route = &dest.endpoint.route;
        let key = apikey::for_source(&route.key, &route.name).map_err(Failure::Credentials)?;
        let stopping = || self.stopping.load(Ordering::Relaxed);
        let Some(_slot) = dest.endpoint.slot(deadline, &stopping) else {
            return Err(Failure::Busy(route.name.clone(), route.max_concurrency));
        };
        let sink = std::cell::RefCell::new(sink);
        let started = || sink.borrow().started();
        retrying(dest, deadline, self.stopping, &started, &mut |_| {
            // The whole stream may use what is left of the lease; the
            // per-attempt timeout bounds each silence instead.
            let left = deadline.saturating_duration_since(Instant::now());
            let mut s = sink.borrow_mut();
            stream_attempt(&self.agent, dest, body, key.as_deref(), left, &mut **s)
        })
    }
}

/// Why a call to the upstream failed.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    Connect(String),
    Timeout(u64),
    Status(u16, String),
    TooLarge(u64),
    /// The request could not be built (bad URL): retrying cannot help.
    Request(String),
    /// HTTP 200 whose body fails validation.
    Invalid(String),
    /// The API key source is configured but unusable: nothing was sent.
    Credentials(String),
    /// The job waited this many ms in the queue, past the fill's lease.
    QueueExpired(u64),
    /// A stream broke off: an error event, no `[DONE]`, a cap reached.
    Stream(String),
    /// The Stream could not be written here: the message as is.
    Store(String),
    /// The endpoint's circuit is open: nothing was sent.
    CircuitOpen(String),
    /// No concurrency slot of the endpoint came free before the deadline.
    Busy(String, usize),
    Stopped,
}

impl Failure {
    /// The client-facing error: printable ASCII, bounded, key-free.
    pub fn message(&self) -> String {
        let m = match self {
            Failure::Connect(e) => format!("ERR upstream connection failed: {e}"),
            Failure::Timeout(ms) => format!(
                "ERR upstream timed out after {ms} ms (aicache.upstream-timeout-ms, lease-ms)"
            ),
            Failure::Status(code, _) if (300..400).contains(code) => {
                format!("ERR upstream returned HTTP {code}; redirects are not followed")
            }
            // An auth failure's text is the likeliest to quote the key.
            Failure::Status(code @ (401 | 403), _) => format!(
                "ERR upstream returned HTTP {code}: the API key was refused (check \
                 aicache.api-key-file or the variable named by aicache.api-key-env)"
            ),
            Failure::Status(code, msg) => format!("ERR upstream returned HTTP {code}: {msg}"),
            Failure::TooLarge(n) => {
                format!("ERR upstream response is larger than aicache.upstream-max-bytes {n}")
            }
            Failure::Request(e) => format!("ERR upstream request could not be built: {e}"),
            Failure::Invalid(e) => format!("ERR upstream returned an invalid response: {e}"),
            Failure::Credentials(e) | Failure::Store(e) => e.clone(),
            Failure::QueueExpired(ms) => format!(
                "ERR fill not started: it waited {ms} ms in the queue, past aicache.lease-ms \
                 (add workers or raise the lease)"
            ),
            Failure::Stream(e) => format!("ERR upstream stream failed: {e}"),
            Failure::CircuitOpen(name) => format!(
                "ERR upstream endpoint '{name}' is failing and its circuit is open \
                 (aicache.breaker-*); no request was sent"
            ),
            Failure::Busy(name, n) => format!(
                "ERR upstream endpoint '{name}' had no free slot (max-concurrency {n}) before the deadline"
            ),
            Failure::Stopped => "ERR aicache is shutting down".to_string(),
        };
        sanitize(&m)
    }

    /// A refusal that may concern a single input of a batch (a provider's
    /// token-limit error names none): the batch is worth splitting.
    pub fn names_an_input(&self) -> bool {
        matches!(self, Failure::Status(400 | 413 | 422, _))
    }

    /// A failure of the endpoint rather than of the request: another
    /// endpoint serving the same model may well answer.
    pub fn fails_over(&self) -> bool {
        match self {
            Failure::Connect(_)
            | Failure::Timeout(_)
            | Failure::CircuitOpen(_)
            | Failure::Busy(..)
            | Failure::Credentials(_) => true,
            Failure::Status(s, _) => *s == 429 || *s >= 500,
            _ => false,
        }
    }

    /// Nothing reached the upstream: no request to pay for.
    pub fn sent_nothing(&self) -> bool {
        matches!(
            self,
            Failure::CircuitOpen(_)
                | Failure::Busy(..)
                | Failure::Credentials(_)
                | Failure::Stopped
        )
    }

    /// What the attempt says of the endpoint's health, for its breaker.
    fn health(&self) -> Option<bool> {
        match self {
            Failure::Connect(_) | Failure::Timeout(_) => Some(false),
            Failure::Status(s, _) if *s == 429 || *s >= 500 => Some(false),
            _ => None,
        }
    }

    pub fn count(&self) {
        let c = match self {
            Failure::Connect(_) | Failure::Request(_) | Failure::Credentials(_) => {
                &STATS.upstream_errors_connect
            }
            Failure::QueueExpired(_) => &STATS.upstream_errors_timeout,
            Failure::Timeout(_) => &STATS.upstream_errors_timeout,
            Failure::Status(429, _) => &STATS.upstream_errors_http_429,
            Failure::Status(s, _) if *s >= 500 => &STATS.upstream_errors_http_5xx,
            Failure::Status(..) => &STATS.upstream_errors_http_4xx,
            Failure::TooLarge(_) => &STATS.upstream_errors_too_large,
            Failure::Invalid(_) | Failure::Stream(_) => &STATS.upstream_errors_invalid,
            Failure::Stopped | Failure::Store(_) | Failure::CircuitOpen(_) => return,
            Failure::Busy(..) => &STATS.upstream_errors_timeout,
        };
        c.incr();
    }

    fn outcome(&self) -> Option<Outcome> {
        match self {
            Failure::Connect(_) => Some(Outcome::Connect),
            Failure::Timeout(_) => Some(Outcome::Timeout),
            Failure::Status(s, _) => Some(Outcome::Status(*s)),
            _ => None,
        }
    }
}

/// The shared agent: connections are kept alive and reused by every worker.
pub fn agent(workers: usize, resolver: BoundedResolver) -> Agent {
    let config = Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .max_idle_connections(workers * 2)
        .max_idle_connections_per_host(workers)
        .user_agent("aicache/0.1")
        .build();
    Agent::with_parts(config, DefaultConnector::new(), resolver)
}

fn ms(b: &Bounded) -> Duration {
    Duration::from_millis(b.get_u64())
}

/// Runs `attempt` with retries by the policy until it succeeds, fails for
/// good, `deadline` passes, or `no_retry()` says a retry would repeat what
/// was already delivered.
fn retrying<T>(
    dest: &Dest,
    deadline: Instant,
    stopping: &AtomicBool,
    no_retry: &dyn Fn() -> bool,
    attempt: &mut dyn FnMut(Duration) -> Result<T, AttemptError>,
) -> Result<T, Failure> {
    let policy = Policy {
        retries: config::RETRIES.get_u64() as u32,
        base: ms(&config::BACKOFF_BASE_MS),
        cap: ms(&config::BACKOFF_CAP_MS),
    };
    let mut retry = 0;
    loop {
        if stopping.load(Ordering::Relaxed) {
            return Err(Failure::Stopped);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let budget = timeouts(dest).0.min(left);
        if budget.is_zero() {
            return Err(Failure::Timeout(0));
        }
        STATS.upstream_requests.incr();
        let began = Instant::now();
        let (failure, retry_after) = match attempt(budget) {
            Ok(v) => {
                dest.endpoint.record(Some(true), began.elapsed());
                return Ok(v);
            }
            Err(e) => e,
        };
        dest.endpoint.record(failure.health(), began.elapsed());
        failure.count();
        // An open circuit ends the retries here: the next endpoint, if any,
        // gets the rest of the lease.
        if no_retry() || dest.endpoint.state() == State::Open {
            return Err(failure);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let wait = failure.outcome().and_then(|o| {
            policy.next_wait(
                &o,
                retry,
                retry_after,
                left,
                crate::model::ttl::JITTER_RNG.next(),
            )
        });
        let Some(wait) = wait else {
            return Err(failure);
        };
        retry += 1;
        STATS.upstream_retries.incr();
        sleep_unless_stopping(wait, stopping);
    }
}

/// Sleeps in short steps so unload and shutdown are not held up by a long
/// `Retry-After`.
fn sleep_unless_stopping(wait: Duration, stopping: &AtomicBool) {
    let until = Instant::now() + wait;
    while !stopping.load(Ordering::Relaxed) {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

type AttemptError = (Failure, Option<Duration>);

fn attempt(
    agent: &Agent,
    dest: &Dest,
    body: &[u8],
    key: Option<&str>,
    budget: Duration,
) -> Result<Vec<u8>, AttemptError> {
    let budget_ms = budget.as_millis() as u64;
    let (_, connect) = timeouts(dest);
    let req = agent
        .post(&dest.url)
        .config()
        .timeout_global(Some(budget))
        .timeout_connect(Some(connect.min(budget)))
        .build()
        .header("Content-Type", "application/json");
    let req = authorize(req, dest, key);
    let mut resp = req.send(body).map_err(|e| (classify(e, budget_ms), None))?;
    let status = resp.status().as_u16();
    if status == 200 {
        let max = config::UPSTREAM_MAX_BYTES.get_u64();
        return resp
            .body_mut()
            .with_config()
            .limit(max)
            .read_to_vec()
            .map_err(|e| (classify(e, budget_ms), None));
    }
    Err(status_error(&mut resp, key))
}

/// A non-200 answer as a failure, with the wait its Retry-After asks for.
fn status_error(resp: &mut ureq::http::Response<ureq::Body>, key: Option<&str>) -> AttemptError {
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, crate::model::ttl::now_ms() / 1000));
    // The start of a long error page is still its message: read up to the
    // cap rather than failing on a body longer than it.
    let mut text = Vec::new();
    let _ = std::io::Read::read_to_end(
        &mut std::io::Read::take(resp.body_mut().as_reader(), MAX_ERROR_BODY),
        &mut text,
    );
    let mut msg = error_text(&text, key);
    if msg == NO_MESSAGE {
        if let Some(reason) = resp.status().canonical_reason() {
            msg = reason.to_string();
        }
    }
    (Failure::Status(status, msg), retry_after)
}

/// One streamed attempt: events go to `sink` as each read completes them,
/// so nothing waits for a buffer to fill. A silence longer than the
/// per-attempt timeout ends it, whether the socket is idle or drips bytes
/// that complete no event.
fn stream_attempt(
    agent: &Agent,
    dest: &Dest,
    body: &[u8],
    key: Option<&str>,
    left: Duration,
    sink: &mut dyn Sink,
) -> Result<(), AttemptError> {
    let (attempt, connect) = timeouts(dest);
    let gap = attempt.min(left);
    let gap_ms = gap.as_millis() as u64;
    let req = agent
        .post(&dest.url)
        .config()
        .timeout_global(Some(left))
        .timeout_per_read(Some(gap))
        .timeout_connect(Some(connect.min(gap)))
        .build()
        .header("Content-Type", "application/json")
        .header("Accept", "text/event-stream");
    let req = authorize(req, dest, key);
    let mut resp = req.send(body).map_err(|e| (classify(e, gap_ms), None))?;
    if resp.status().as_u16() != 200 {
        return Err(status_error(&mut resp, key));
    }
    let max = config::UPSTREAM_MAX_BYTES.get_u64();
    let mut reader = resp.body_mut().with_config().limit(max).reader();
    let mut parser = Parser::new(max.min(usize::MAX as u64) as usize);
    let mut buf = vec![0u8; 16 * 1024];
    let mut last_event = Instant::now();
    let fail = |f: Failure| (f, None);
    loop {
        let n = match std::io::Read::read(&mut reader, &mut buf) {
            Ok(n) => n,
            Err(e) => return Err(fail(read_error(e, gap_ms))),
        };
        let events = if n == 0 {
            std::mem::replace(&mut parser, Parser::new(0)).finish()
        } else {
            parser.feed(&buf[..n])
        }
        .map_err(|e| fail(Failure::Stream(e)))?;
        if !events.is_empty() {
            last_event = Instant::now();
            // The sink cleaned the text with the global key; this is the
            // key the route really sent.
            let scrubbed = |f: Failure| match f {
                Failure::Stream(m) => fail(Failure::Stream(scrub(&m, key))),
                f => fail(f),
            };
            if sink.events(events).map_err(scrubbed)? {
                return Ok(());
            }
        } else if last_event.elapsed() > gap {
            return Err(fail(Failure::Timeout(gap_ms)));
        }
        if n == 0 {
            return Err(fail(Failure::Stream("it ended without [DONE]".into())));
        }
    }
}

/// A failed read of a streamed body.
fn read_error(e: std::io::Error, gap_ms: u64) -> Failure {
    if e.kind() == std::io::ErrorKind::TimedOut {
        return Failure::Timeout(gap_ms);
    }
    match e.into_inner().map(|inner| inner.downcast::<ureq::Error>()) {
        Some(Ok(u)) => classify(*u, gap_ms),
        Some(Err(other)) => Failure::Connect(other.to_string()),
        None => Failure::Connect("the connection failed mid-stream".into()),
    }
}

fn classify(e: ureq::Error, budget_ms: u64) -> Failure {
    match e {
        ureq::Error::Timeout(_) => Failure::Timeout(budget_ms),
        ureq::Error::BodyExceedsLimit(n) => Failure::TooLarge(n),
        ureq::Error::BadUri(_) | ureq::Error::Http(_) | ureq::Error::RequireHttpsOnly(_) => {
            Failure::Request(e.to_string())
        }
        other => Failure::Connect(other.to_string()),
    }
}

/// The upstream's own explanation: `error.message` when the body is JSON,
/// else the start of the body. Key-free, printable, bounded.
pub fn error_text(body: &[u8], key: Option<&str>) -> String {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let msg = parsed
        .as_ref()
        .and_then(|v| v.get("error"))
        .and_then(|e| e.get("message").or(Some(e)))
        .and_then(Value::as_str)
        .map(str::to_string)
        .or_else(|| cut_message(body))
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    let clean: String = scrub(&msg, key)
        .chars()
        .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
        .take(MAX_UPSTREAM_MESSAGE)
        .collect();
    if clean.trim().is_empty() {
        NO_MESSAGE.into()
    } else {
        clean
    }
}

/// The `"message": "..."` of a JSON error body cut off at the read limit.
fn cut_message(body: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(body);
    let rest = text
        .split_once("\"message\"")?
        .1
        .trim_start()
        .strip_prefix(':')?;
    let rest = rest.trim_start().strip_prefix('"')?;
    let end = rest.find('"').unwrap_or(rest.len());
    Some(rest[..end].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_off_error_body_still_gives_its_message() {
        let body = format!(
            r#"{{"error": {{"message": "Rate limit reached {}"#,
            "x".repeat(100)
        );
        assert!(error_text(body.as_bytes(), None).starts_with("Rate limit reached xxx"));
        assert_eq!(error_text(b"<html>busy</html>", None), "<html>busy</html>");
    }

    #[test]
    fn it_takes_the_message_from_an_openai_error_body() {
        let body = br#"{"error": {"message": "Rate limit reached", "type": "x"}}"#;
        assert_eq!(error_text(body, None), "Rate limit reached");
        assert_eq!(error_text(br#"{"error": "plain"}"#, None), "plain");
        assert_eq!(error_text(b"Bad Gateway", None), "Bad Gateway");
        assert_eq!(error_text(b"", None), "(no message)");
    }

    #[test]
    fn it_makes_cjk_and_control_text_printable_and_bounded() {
        let body = "{\"error\": {\"message\": \"\u{4e00}\u{4e01} bad\\r\\n\"}}";
        assert_eq!(error_text(body.as_bytes(), None), "?? bad??");
        let long = "x".repeat(10_000);
        assert_eq!(
            error_text(long.as_bytes(), None).len(),
            MAX_UPSTREAM_MESSAGE
        );
    }

    #[test]
    fn it_never_repeats_the_key() {
        let body = br#"{"error": {"message": "Incorrect API key provided: sk-abc123. key"}}"#;
        let t = error_text(body, Some("s3cr3t-key!"));
        assert!(!t.contains("sk-abc"), "{t}");
        assert!(t.contains("[redacted]"));
        let body = br#"{"error": {"message": "bad key S3CR3T-KEY!"}}"#;
        let t = error_text(body, Some("s3cr3t-key!"));
        assert_eq!(t, "[message withheld: it repeated the API key]");
        // Auth failures never carry the upstream's text at all.
        let m = Failure::Status(401, "sk-whatever".into()).message();
        assert!(
            m.starts_with("ERR upstream returned HTTP 401: the API key was refused"),
            "{m}"
        );
        assert!(!m.contains("sk-"));
    }

    #[test]
    fn it_names_each_failure() {
        assert!(Failure::Status(302, "x".into())
            .message()
            .contains("redirects are not followed"));
        assert!(Failure::Timeout(30)
            .message()
            .contains("timed out after 30 ms"));
        assert!(Failure::TooLarge(9)
            .message()
            .contains("upstream-max-bytes 9"));
        assert_eq!(Failure::Invalid("x".into()).outcome(), None);
        assert_eq!(
            Failure::Status(503, String::new()).outcome(),
            Some(Outcome::Status(503))
        );
    }
}
