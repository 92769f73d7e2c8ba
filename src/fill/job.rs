//! The worker side of a fill: call the upstream (no Redis lock held),
//! check the answer against the request, then store it through a
//! [`Store`] and answer the waiters. Generic over the upstream and the
//! store, so the whole path runs in unit tests with fakes.

use std::sync::Arc;
use std::time::Instant;

use crate::fill::call::{FillError, FillResult};
use crate::fill::pipeline::{ChatSpec, EmbedSpec, Expiry, Pending};
use crate::fill::store::{Commit, Store};
use crate::fill::streaming::{self, Target};
use crate::fill::upstream::{Failure, Upstream};
use crate::limits::spend::Bill;
use crate::model::canon::validate_response;
use crate::model::embed::{parse_response, request_body};
use crate::model::frames::Frame;
use crate::model::pins::check_answer;
use crate::stats::{FILL_LATENCY as STATS_LATENCY, STATS, STREAMS_RUNNING};
use std::sync::atomic::Ordering;

pub enum Task {
    Embed {
        spec: Arc<EmbedSpec>,
        inputs: Vec<String>,
        keys: Vec<Vec<u8>>,
    },
    Chat {
        spec: Arc<ChatSpec>,
        key: Vec<u8>,
    },
    /// A streamed chat fill: chunks go to `target` as they arrive.
    Stream {
        spec: Arc<ChatSpec>,
        key: Vec<u8>,
        target: Target,
    },
}

/// A unit of work for the pool. A job refused by the queue is failed with
/// the reason; a job dropped any other way fails through its `Pending`.
pub struct Job {
    pub pending: Pending,
    pub bill: Bill,
    pub db: i32,
    pub expiry: Option<Expiry>,
    /// The end of the fill's lease: no attempt starts after it.
    pub deadline: Instant,
    pub queued: Instant,
    pub task: Task,
}

/// Upstream requests made and tokens they reported.
#[derive(Default)]
struct Spent {
    requests: u64,
    tokens: u64,
    answered: bool,
}

impl Job {
    /// A refused job never called upstream: its charge is refunded.
    pub fn fail(self, msg: &str) {
        self.bill.refund();
        self.pending.fail(msg);
    }

    /// The Stream this job writes, if any.
    pub fn stream_target(&self) -> Option<Target> {
        match &self.task {
            Task::Stream { target, .. } => Some(target.clone()),
            _ => None,
        }
    }

    /// A Stream that joined this plain fill gets its answer replayed,
    /// before the fill ends and stops owning it.
    fn replay_to_stream(&self, store: &dyn Store, result: &FillResult) {
        if let Some(stream) = self.pending.close() {
            let linger = crate::config::STREAM_LINGER_MS.get_u64();
            let t = Target::new(self.db, stream, linger, 0, u64::MAX);
            streaming::replay_into(store, &t, result);
        }
    }

    pub fn run(self, up: &dyn Upstream, store: &dyn Store) {
        if Instant::now() >= self.deadline {
            let waited = self.queued.elapsed().as_millis();
            let f = Failure::QueueExpired(waited as u64);
            f.count();
            match &self.task {
                Task::Stream { target, .. } => {
                    target.end(store, Vec::new(), Frame::Error(f.message()))
                }
                Task::Chat { .. } => {
                    self.replay_to_stream(store, &Err(FillError::whole(&f.message())))
                }
                Task::Embed { .. } => {}
            }
            self.bill.refund();
            return self.pending.fail(&f.message());
        }
        let started = Instant::now();
        let latency = || STATS_LATENCY.record(started.elapsed().as_millis() as u64);
        match &self.task {
            Task::Embed { spec, inputs, keys } => {
                let (results, spent) = embed(up, store, &self, spec, inputs, keys);
                latency();
                self.bill
                    .settle(spent.requests, spent.tokens, spent.answered);
                self.pending.finish(results, true);
            }
            Task::Chat { spec, key } => {
                let (result, spent) = chat(up, store, &self, spec, key);
                latency();
                self.replay_to_stream(store, &result);
                self.bill
                    .settle(spent.requests, spent.tokens, spent.answered);
                self.pending.finish(vec![result], true);
            }
            Task::Stream { spec, key, target } => {
                let _running = Running::new();
                let s = streaming::run(up, store, spec, target, key, self.deadline, self.expiry);
                self.bill.settle(1, s.tokens, s.answered);
                self.pending.finish(vec![s.result], true);
            }
        }
    }
}

/// Counts a streamed generation in `streams_running` until it drops, on
/// every path out (a panic included).
struct Running;

impl Running {
    fn new() -> Self {
        STREAMS_RUNNING.fetch_add(1, Ordering::Relaxed);
        Running
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        STREAMS_RUNNING.fetch_sub(1, Ordering::Relaxed);
    }
}

fn whole(f: &Failure) -> FillError {
    FillError::whole(&f.message())
}

fn embed(
    up: &dyn Upstream,
    store: &dyn Store,
    job: &Job,
    spec: &EmbedSpec,
    inputs: &[String],
    keys: &[Vec<u8>],
) -> (Vec<FillResult>, Spent) {
    let mut out: Vec<Option<FillResult>> = vec![None; inputs.len()];
    let mut spent = Spent::default();
    let all: Vec<usize> = (0..inputs.len()).collect();
    embed_part(up, spec, inputs, &all, job.deadline, &mut out, &mut spent);
    let mut results: Vec<FillResult> = out
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(FillError::whole("ERR internal error: no result"))))
        .collect();
    // Split requests answered separately: their sizes must agree too, and
    // with what the request fixes, before anything is pinned or stored.
    let sizes: Vec<usize> = results.iter().flatten().map(|v| v.len() / 4).collect();
    let Some(&dims) = sizes.first() else {
        return (results, spent);
    };
    let checked = if sizes.iter().any(|&d| d != dims) {
        Err(format!(
            "vectors of {dims} and {} dimensions in one answer",
            sizes.iter().find(|&&d| d != dims).unwrap_or(&0)
        ))
    } else {
        check_answer(
            spec.known_dims,
            spec.dims.map(|d| d as usize),
            spec.fixed_dims,
            dims,
        )
    };
    if let Err(e) = checked {
        let f = Failure::Invalid(e);
        f.count();
        return (fail_values(results, &whole(&f)), spent);
    }
    let entries: Vec<(&[u8], &[u8])> = keys
        .iter()
        .zip(&results)
        .filter_map(|(k, r)| r.as_ref().ok().map(|v| (k.as_slice(), &v[..])))
        .collect();
    let commit = Commit {
        db: job.db,
        pin: spec.pin_key.as_deref().map(|k| (k, spec.model.as_bytes())),
        dims,
        entries,
        expiry: job.expiry,
    };
    if let Err(msg) = store.commit(&commit) {
        results = fail_values(results, &FillError::whole(&msg));
    }
    (results, spent)
}

fn fail_values(results: Vec<FillResult>, e: &FillError) -> Vec<FillResult> {
    results.into_iter().map(|r| r.and(Err(e.clone()))).collect()
}

/// Embeds `part` of the inputs. An upstream refusal that may name a single
/// input (400, 413, 422: a provider's token-limit error names none) splits
/// the part in halves until the refused inputs stand alone; they fail, the
/// rest are filled. That costs at most two requests per halving.
fn embed_part(
    up: &dyn Upstream,
    spec: &EmbedSpec,
    inputs: &[String],
    part: &[usize],
    deadline: Instant,
    out: &mut [Option<FillResult>],
    spent: &mut Spent,
) {
    let texts: Vec<&str> = part.iter().map(|&i| inputs[i].as_str()).collect();
    let body = request_body(&spec.model, &texts, spec.dims, spec.base64);
    spent.requests += 1;
    let answer = up.post(&spec.url, &body, deadline).and_then(|b| {
        let dims = spec.dims.map(|d| d as usize);
        parse_response(&b, part.len(), dims, spec.max_dims).map_err(|e| {
            let f = Failure::Invalid(e);
            f.count();
            f
        })
    });
    match answer {
        Ok(e) => {
            spent.tokens = spent.tokens.saturating_add(e.tokens);
            spent.answered = true;
            STATS.tokens_prompt.add(e.tokens);
            STATS.tokens_total.add(e.tokens);
            for (&i, v) in part.iter().zip(e.vectors) {
                out[i] = Some(Ok(Arc::from(v)));
            }
        }
        Err(f) if f.names_an_input() && part.len() > 1 && Instant::now() < deadline => {
            STATS.batch_splits.incr();
            let (a, b) = part.split_at(part.len() / 2);
            embed_part(up, spec, inputs, a, deadline, out, spent);
            embed_part(up, spec, inputs, b, deadline, out, spent);
        }
        Err(f) => {
            let e = FillError {
                msg: Arc::from(f.message()),
                per_input: f.names_an_input() && part.len() == 1,
            };
            for &i in part {
                out[i] = Some(Err(e.clone()));
            }
        }
    }
}

fn chat(
    up: &dyn Upstream,
    store: &dyn Store,
    job: &Job,
    spec: &ChatSpec,
    key: &[u8],
) -> (FillResult, Spent) {
    let mut spent = Spent {
        requests: 1,
        ..Spent::default()
    };
    let checked = up
        .post(&spec.url, &spec.body, job.deadline)
        .and_then(|body| {
            let invalid = |e: String| {
                let f = Failure::Invalid(e.trim_start_matches("ERR ").to_string());
                f.count();
                f
            };
            if body.len() > spec.max_bytes {
                return Err(invalid(format!(
                    "response is {} bytes, more than max-response-bytes {}",
                    body.len(),
                    spec.max_bytes
                )));
            }
            let usage = validate_response(&body).map_err(invalid)?;
            Ok((body, usage))
        });
    let (body, usage) = match checked {
        Ok(x) => x,
        Err(f) => return (Err(whole(&f)), spent),
    };
    spent.tokens = usage.total;
    spent.answered = true;
    STATS.tokens_prompt.add(usage.prompt);
    STATS.tokens_completion.add(usage.completion);
    STATS.tokens_total.add(usage.total);
    let commit = Commit {
        db: job.db,
        pin: None,
        dims: 0,
        entries: vec![(key, body.as_slice())],
        expiry: job.expiry,
    };
    if let Err(msg) = store.commit(&commit) {
        return (Err(FillError::whole(&msg)), spent);
    }
    (Ok(Arc::from(body)), spent)
}
