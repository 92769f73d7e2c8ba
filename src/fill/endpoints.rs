//! The live route table: each endpoint's route, circuit breaker, request
//! counters, latency histogram and concurrency cap. Rebuilt when a route
//! config changes; an endpoint whose route is unchanged keeps its state.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::config::{self, Checked};
use crate::fill::upstream::{Failure, Sink, Upstream};
use crate::model::breaker::{Admit, Breaker, Limits, State};
use crate::model::routes::{self, Api, Auth, Checks, Route};
use crate::model::ttl::now_ms;
use crate::stats::STATS;
use crate::stats::{Counter, Latency};

pub struct Endpoint {
    pub route: Route,
    breaker: Mutex<Breaker>,
    pub requests: Counter,
    pub errors: Counter,
    pub skipped: Counter,
    pub latency: Latency,
    busy: Mutex<usize>,
    freed: Condvar,
}

/// Where one request goes: an endpoint and the URL for its API and model.
#[derive(Clone)]
pub struct Dest {
    pub endpoint: Arc<Endpoint>,
    pub url: String,
}

impl Endpoint {
    fn new(route: Route) -> Self {
        Endpoint {
            route,
            breaker: Mutex::new(Breaker::default()),
            requests: Counter::default(),
            errors: Counter::default(),
            skipped: Counter::default(),
            latency: Latency::new(),
            busy: Mutex::new(0),
            freed: Condvar::new(),
        }
    }

    /// A test endpoint: the default route to `url`.
    #[cfg(test)]
    pub fn plain(url: &str) -> Arc<Endpoint> {
        Arc::new(Endpoint::new(Route::legacy(url, "", "")))
    }

    fn breaker(&self) -> MutexGuard<'_, Breaker> {
        self.breaker.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// May a request go now; with the sequence number of a probe.
    pub fn admit(&self) -> (Admit, u64) {
        let mut b = self.breaker();
        if limits().failures == 0 {
            b.reset();
            return (Admit::Yes, 0);
        }
        let a = b.admit(now_ms());
        (a, b.probe_seq())
    }

    pub fn state(&self) -> State {
        self.breaker().state(now_ms())
    }

    /// One attempt's outcome: `Some(true)` healthy, `Some(false)` a failure
    /// of the endpoint, `None` neither (a 4xx about the request).
    pub fn record(&self, healthy: Option<bool>, took: Duration) {
        self.requests.incr();
        self.latency.record(took.as_millis() as u64);
        let mut b = self.breaker();
        match healthy {
            Some(true) => b.success(),
            Some(false) => {
                self.errors.incr();
                b.failure(now_ms(), &limits());
            }
            None => b.release_probe(),
        }
    }

    /// Waits for one of the route's `max-concurrency` slots until
    /// `deadline`; None when none came free.
    pub fn slot(&self, deadline: Instant, stopping: &dyn Fn() -> bool) -> Option<Slot<'_>> {
        let cap = self.route.max_concurrency;
        if cap == 0 {
            return Some(Slot(None));
        }
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        while *busy >= cap {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || stopping() {
                return None;
            }
            // Short waits: shutdown is noticed even with no slot freed.
            let wait = left.min(Duration::from_millis(50));
            busy = self
                .freed
                .wait_timeout(busy, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *busy += 1;
        Some(Slot(Some(self)))
    }

    /// CONFIG RESETSTAT: the counters, not the circuit.
    fn reset(&self) {
        for c in [&self.requests, &self.errors, &self.skipped] {
            c.reset();
        }
        self.latency.reset();
    }

    fn info(&self, out: &mut Vec<(String, String)>) {
        let n = format!("endpoint_{}", self.route.name.replace('-', "_"));
        let b = self.breaker();
        let state = b.state(now_ms());
        out.push((format!("{n}_state"), state.word().into()));
        out.push((
            format!("{n}_open"),
            u8::from(state != State::Closed).to_string(),
        ));
        out.push((format!("{n}_opened"), b.opened.to_string()));
        drop(b);
        for (k, v) in [
            ("requests", self.requests.get()),
            ("errors", self.errors.get()),
            ("skipped", self.skipped.get()),
        ] {
            out.push((format!("{n}_{k}"), v.to_string()));
        }
        let busy = *self.busy.lock().unwrap_or_else(|e| e.into_inner());
        out.push((format!("{n}_in_flight"), busy.to_string()));
        for (k, v) in self.latency.fields_named(&format!("{n}_latency")) {
            out.push((k, v.to_string()));
        }
    }
}

/// Posts to the first endpoint of `plan` whose circuit admits it; on a
/// failure that says nothing against the request itself (connect, timeout,
/// 429, 5xx, open circuit, missing credentials) the next one is tried,
/// each with its own retries, all within `deadline`.
pub fn post_any(
    up: &dyn Upstream,
    plan: &[Dest],
    body: &[u8],
    deadline: Instant,
) -> Result<Vec<u8>, Failure> {
    each_endpoint(plan, deadline, &|| true, &mut |d| {
        up.post(d, body, deadline)
    })
}

/// [`post_any`] for a streamed request: it fails over only while the sink
/// has taken nothing.
pub fn stream_any(
    up: &dyn Upstream,
    plan: &[Dest],
    body: &[u8],
    deadline: Instant,
    sink: &mut dyn Sink,
) -> Result<(), Failure> {
    let sink = std::cell::RefCell::new(sink);
    let fresh = || !sink.borrow().started();
    each_endpoint(plan, deadline, &fresh, &mut |d| {
        let mut s = sink.borrow_mut();
        up.stream(d, body, deadline, &mut **s)
    })
}

fn each_endpoint<T>(
    plan: &[Dest],
    deadline: Instant,
    may_continue: &dyn Fn() -> bool,
    call: &mut dyn FnMut(&Dest) -> Result<T, Failure>,
) -> Result<T, Failure> {
    let mut last: Option<Failure> = None;
    for (i, d) in plan.iter().enumerate() {
        if i > 0 && (Instant::now() >= deadline || !may_continue()) {
            break;
        }
        // Only a real answer's failure is worth reporting over "nothing
        // was sent" (an open circuit, no key, no free slot).
        let keep = |last: &mut Option<Failure>, f: Failure| {
            if last.as_ref().map_or(true, Failure::sent_nothing) || !f.sent_nothing() {
                *last = Some(f);
            }
        };
        let (admitted, seq) = d.endpoint.admit();
        if admitted == Admit::No {
            d.endpoint.skipped.incr();
            STATS.circuit_rejections.incr();
            keep(
                &mut last,
                Failure::CircuitOpen(d.endpoint.route.name.clone()),
            );
            continue;
        }
        if i > 0 {
            STATS.failovers.incr();
        }
        let result = call(d);
        // A probe that ended before any attempt (no key, no free slot, a
        // shutdown) must not hold the half-open circuit shut for good.
        if admitted == Admit::Probe {
            d.endpoint.breaker().release_probe_if(seq);
        }
        match result {
            Ok(v) => return Ok(v),
            Err(f) if f.fails_over() => keep(&mut last, f),
            Err(f) => return Err(f),
        }
    }
    Err(last.unwrap_or_else(|| Failure::Request("no endpoint is configured".into())))
}

/// The route's own timeouts, else the global ones.
pub(crate) fn timeouts(dest: &Dest) -> (Duration, Duration) {
    let r = &dest.endpoint.route;
    let attempt = r.timeout_ms.map_or_else(
        || Duration::from_millis(config::ATTEMPT_TIMEOUT_MS.get_u64()),
        Duration::from_millis,
    );
    let connect = r.connect_timeout_ms.map_or_else(
        || Duration::from_millis(config::CONNECT_TIMEOUT_MS.get_u64()),
        Duration::from_millis,
    );
    (attempt, connect)
}

pub(crate) type Request = ureq::RequestBuilder<ureq::typestate::WithBody>;

/// The credentials header of the route's auth style.
pub(crate) fn authorize(req: Request, dest: &Dest, key: Option<&str>) -> Request {
    match (&dest.endpoint.route.auth, key) {
        (Auth::Azure, Some(k)) => req.header("api-key", k),
        (Auth::Bearer, Some(k)) => req.header("Authorization", format!("Bearer {k}")),
        _ => req,
    }
}

/// A held concurrency slot, given back on drop.
pub struct Slot<'a>(Option<&'a Endpoint>);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if let Some(e) = self.0 {
            let mut busy = e.busy.lock().unwrap_or_else(|e| e.into_inner());
            *busy = busy.saturating_sub(1);
            e.freed.notify_one();
        }
    }
}

fn limits() -> Limits {
    Limits {
        failures: config::BREAKER_FAILURES.get_u64() as u32,
        window_ms: config::BREAKER_WINDOW_MS.get_u64(),
        cooldown_ms: config::BREAKER_COOLDOWN_MS.get_u64(),
    }
}

/// The routes as configured, the default route last.
pub struct Table {
    endpoints: Vec<Arc<Endpoint>>,
    /// The config values it was built from, to notice a change cheaply.
    source: Vec<Arc<str>>,
}

impl Table {
    /// The endpoints a request for `model` tries, in order: the route that
    /// serves the model, then its fallbacks.
    pub fn plan(&self, api: Api, model: &str) -> Vec<Dest> {
        let routes: Vec<&Route> = self.endpoints.iter().map(|e| &e.route).collect();
        let first = routes::pick(routes.iter().copied(), model).unwrap_or(routes.len() - 1);
        routes::chain(&routes, first)
            .into_iter()
            .map(|i| Dest {
                endpoint: self.endpoints[i].clone(),
                url: routes[i].url_for(api, model),
            })
            .collect()
    }

    /// The fallback model of the route serving `model`, if it has one.
    pub fn fallback_model(&self, model: &str) -> Option<String> {
        let i = routes::pick(self.endpoints.iter().map(|e| &e.route), model)?;
        self.endpoints[i]
            .route
            .fallback_model
            .clone()
            .filter(|m| m != model)
    }

    pub fn reset_stats(&self) {
        for e in &self.endpoints {
            e.reset();
        }
    }

    pub fn routes(&self) -> impl Iterator<Item = &Route> {
        self.endpoints.iter().map(|e| &e.route)
    }

    pub fn info(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for e in &self.endpoints {
            e.info(&mut out);
        }
        out
    }
}

/// Key files are checked when set; a rebuild must not drop a route whose
/// file is being rotated, so it checks nothing there.
const REBUILD_CHECKS: Checks = Checks {
    url: |_| Ok(()),
    env: |_| Ok(()),
    file: |_| Ok(()),
};

static TABLE: Mutex<Option<Arc<Table>>> = Mutex::new(None);

fn sources() -> Vec<Arc<str>> {
    let legacy: [&Checked; 3] = [
        &config::UPSTREAM_URL,
        &config::EMBEDDINGS_URL,
        &config::CHAT_URL,
    ];
    legacy
        .iter()
        .copied()
        .chain(config::ROUTES.iter())
        .map(Checked::value)
        .collect()
}

/// The table for the configs now in force.
pub fn table() -> Arc<Table> {
    let now = sources();
    let mut slot = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(t) = slot.as_ref() {
        if t.source.len() == now.len() && t.source.iter().zip(&now).all(|(a, b)| Arc::ptr_eq(a, b))
        {
            return t.clone();
        }
    }
    let old = slot.take();
    let keep = |route: Route| -> Arc<Endpoint> {
        match old
            .as_ref()
            .and_then(|t| t.endpoints.iter().find(|e| e.route == route))
        {
            Some(e) => e.clone(),
            None => Arc::new(Endpoint::new(route)),
        }
    };
    let mut endpoints: Vec<Arc<Endpoint>> = now[3..]
        .iter()
        .filter_map(|s| routes::parse(s, &REBUILD_CHECKS).ok().flatten())
        .map(keep)
        .collect();
    // Two slots with one name: the first wins, as in matching.
    let mut seen = Vec::new();
    endpoints.retain(|e| {
        let new = !seen.contains(&e.route.name);
        seen.push(e.route.name.clone());
        new
    });
    endpoints.push(keep(Route::legacy(&now[0], &now[1], &now[2])));
    let t = Arc::new(Table {
        endpoints,
        source: now,
    });
    *slot = Some(t.clone());
    t
}
