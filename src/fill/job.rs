//! The worker side of a fill: call the upstream (no Redis lock held),
//! check the answer against the request, then store it through a
//! [`Store`] and answer the waiters. Generic over the upstream and the
//! store, so the whole path runs in unit tests with fakes.

use std::sync::Arc;
use std::time::Instant;

use crate::fill::call::{FillError, FillResult};
use crate::fill::endpoints::post_any;
use crate::fill::endpoints::Dest;
use crate::fill::pipeline::{ChatSpec, EmbedSpec, Expiry, Pending};
use crate::fill::semantic::{self, Replier, SemSpec};
use crate::fill::store::{Commit, Store};
use crate::fill::streaming::{self, Target};
use crate::fill::upstream::{Failure, Upstream};
use crate::limits::spend::Bill;
use crate::model::canon::{validate_response, Usage};
use crate::model::embed::{parse_response, request_body};
use crate::model::errors::sanitize;
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
    /// Embedding jobs of several calls for one (endpoint, model, size),
    /// sent as one request (micro-batching, batcher.rs).
    Batch(Vec<Job>),
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
    /// LLMCACHE.SIMILAR: the nearest entries of a context, no fill.
    Similar {
        spec: Arc<SemSpec>,
        reply: Replier,
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
pub(crate) struct Spent {
    pub requests: u64,
    pub tokens: u64,
    pub answered: bool,
}

impl Spent {
    /// A request counts unless nothing was sent (open circuits, no key).
    pub(crate) fn count<T>(&mut self, posted: &Result<T, Failure>) {
        if !matches!(posted, Err(f) if f.sent_nothing()) {
            self.requests += 1;
        }
    }
}

impl Job {
    /// A refused job never called upstream: its charge is refunded.
    pub fn fail(mut self, msg: &str) {
        match &mut self.task {
            Task::Batch(jobs) => {
                for j in std::mem::take(jobs) {
                    j.fail(msg);
                }
            }
            Task::Similar { reply, .. } => reply.fail(msg),
            _ => {}
        }
        self.bill.refund();
        self.pending.fail(msg);
    }

    /// Input count and estimated tokens of an embedding job.
    pub fn embed_size(&self) -> Option<(usize, u64)> {
        match &self.task {
            Task::Embed { inputs, .. } => Some((inputs.len(), inputs.iter().map(|t| est(t)).sum())),
            _ => None,
        }
    }

    /// Splits the first `n` inputs of an embedding job off into a job of
    /// their own, with their share of the charge.
    pub fn split_front(&mut self, n: usize) -> Option<Job> {
        let Task::Embed { spec, inputs, keys } = &mut self.task else {
            return None;
        };
        let n = n.min(inputs.len());
        let front: Vec<String> = inputs.drain(..n).collect();
        let tokens = front.iter().map(|t| est(t)).sum();
        Some(Job {
            pending: self.pending.split_front(n),
            bill: self.bill.split(tokens),
            db: self.db,
            expiry: self.expiry,
            deadline: self.deadline,
            queued: self.queued,
            task: Task::Embed {
                spec: spec.clone(),
                keys: keys.drain(..n).collect(),
                inputs: front,
            },
        })
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

    pub fn run(mut self, up: &dyn Upstream, store: &dyn Store) {
        if let Task::Similar { .. } = &self.task {
            return self.run_similar(up, store);
        }
        if let Task::Batch(jobs) = &mut self.task {
            return run_batch(up, store, std::mem::take(jobs));
        }
        if matches!(self.task, Task::Embed { .. }) && Instant::now() < self.deadline {
            return run_batch(up, store, vec![self]);
        }
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
                Task::Embed { .. } | Task::Batch(_) | Task::Similar { .. } => {}
            }
            self.bill.refund();
            return self.pending.fail(&f.message());
        }
        let started = Instant::now();
        let latency = || STATS_LATENCY.record(started.elapsed().as_millis() as u64);
        match &self.task {
            Task::Embed { .. } | Task::Batch(_) => {}
            Task::Chat { spec, key } => {
                let done = semantic::chat(up, store, &self, spec, key);
                latency();
                self.replay_to_stream(store, &done.result);
                let s = &done.spent;
                self.bill.settle(s.requests, s.tokens, s.answered);
                self.pending
                    .finish_marked(vec![done.result], done.remember, vec![done.mark]);
            }
            Task::Similar { .. } => {}
            Task::Stream { spec, key, target } => {
                let _running = Running::new();
                let s = streaming::run(up, store, spec, target, key, self.deadline, self.expiry);
                self.bill.settle(1, s.tokens, s.answered);
                self.pending.finish(vec![s.result], true);
            }
        }
    }
}

impl Job {
    fn run_similar(self, up: &dyn Upstream, store: &dyn Store) {
        let Job {
            bill,
            task,
            db,
            deadline,
            queued,
            ..
        } = self;
        let Task::Similar { spec, mut reply } = task else {
            return;
        };
        if Instant::now() >= deadline {
            let f = Failure::QueueExpired(queued.elapsed().as_millis() as u64);
            f.count();
            bill.refund();
            return reply.fail(&f.message());
        }
        let (answer, s) = semantic::similar(up, store, db, deadline, &spec);
        bill.settle(s.requests, s.tokens, s.answered);
        reply.send(answer);
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

/// Estimated tokens of one text, as the spend limits count them.
fn est(text: &str) -> u64 {
    crate::model::quota::estimate_tokens(text.len())
}

/// Runs embedding jobs of one (endpoint, model, size) as one request:
/// each job gets its own vectors, checked and stored as its call asked,
/// and pays the tokens of its own inputs; the first pays the request.
fn run_batch(up: &dyn Upstream, store: &dyn Store, jobs: Vec<Job>) {
    let (live, late): (Vec<Job>, Vec<Job>) =
        jobs.into_iter().partition(|j| Instant::now() < j.deadline);
    for j in late {
        j.run(up, store);
    }
    let Some(first) = live.first() else { return };
    let Task::Embed { spec, .. } = &first.task else {
        return;
    };
    let spec = spec.clone();
    let deadline = live
        .iter()
        .map(|j| j.deadline)
        .min()
        .unwrap_or(first.deadline);
    let mut inputs: Vec<String> = Vec::new();
    let mut ranges = Vec::with_capacity(live.len());
    for j in &live {
        let start = inputs.len();
        if let Task::Embed { inputs: i, .. } = &j.task {
            inputs.extend(i.iter().cloned());
        }
        ranges.push(start..inputs.len());
    }
    if live.len() > 1 {
        STATS.batched_requests.incr();
        STATS.batched_calls.add(live.len() as u64);
    }
    let started = Instant::now();
    let mut out: Vec<Option<FillResult>> = vec![None; inputs.len()];
    let mut spent = Spent::default();
    let all: Vec<usize> = (0..inputs.len()).collect();
    embed_part(up, &spec, &inputs, &all, deadline, &mut out, &mut spent);
    STATS_LATENCY.record(started.elapsed().as_millis() as u64);
    let total_est: u64 = inputs.iter().map(|t| est(t)).sum::<u64>().max(1);
    for (k, (job, range)) in live.into_iter().zip(ranges).enumerate() {
        let mine_est: u64 = inputs[range.clone()].iter().map(|t| est(t)).sum();
        let results: Vec<FillResult> = out[range]
            .iter_mut()
            .map(|r| {
                r.take()
                    .unwrap_or_else(|| Err(FillError::whole("ERR internal error: no result")))
            })
            .collect();
        let answered = spent.answered && results.iter().any(Result::is_ok);
        let results = match &job.task {
            Task::Embed { spec, keys, .. } => keep(store, &job, spec, keys, results),
            _ => results,
        };
        let tokens =
            (u128::from(spent.tokens) * u128::from(mine_est) / u128::from(total_est)) as u64;
        let requests = if k == 0 { spent.requests } else { 0 };
        job.bill.settle(requests, tokens, answered);
        job.pending.finish(results, true);
    }
}

/// Checks one job's vectors against each other and the namespace's pin,
/// then stores them as the job's call asked.
fn keep(
    store: &dyn Store,
    job: &Job,
    spec: &EmbedSpec,
    keys: &[Vec<u8>],
    mut results: Vec<FillResult>,
) -> Vec<FillResult> {
    // Split requests answered separately: their sizes must agree too, and
    // with what the request fixes, before anything is pinned or stored.
    let sizes: Vec<usize> = results.iter().flatten().map(|v| v.len() / 4).collect();
    let Some(&dims) = sizes.first() else {
        return results;
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
        return fail_values(results, &whole(&f));
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
        together: false,
        companion: None,
    };
    if let Err(msg) = store.commit(&commit) {
        results = fail_values(results, &FillError::whole(&msg));
    }
    results
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
    let posted = post_any(up, &spec.plan, &body, deadline);
    spent.count(&posted);
    let answer = posted.and_then(|b| {
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

/// Asks the endpoints of `plan` and checks the answer.
fn ask(
    up: &dyn Upstream,
    plan: &[Dest],
    body: &[u8],
    max_bytes: usize,
    deadline: Instant,
    spent: &mut Spent,
) -> Result<(Vec<u8>, Usage), Failure> {
    let posted = post_any(up, plan, body, deadline);
    spent.count(&posted);
    posted.and_then(|body| {
        let invalid = |e: String| {
            let f = Failure::Invalid(e.trim_start_matches("ERR ").to_string());
            f.count();
            f
        };
        if body.len() > max_bytes {
            return Err(invalid(format!(
                "response is {} bytes, more than max-response-bytes {max_bytes}",
                body.len(),
            )));
        }
        let usage = validate_response(&body).map_err(invalid)?;
        Ok((body, usage))
    })
}

/// A chat fill. When every endpoint of the model is unavailable and its
/// route names a fallback model, that model is asked instead: its answer
/// is replied, marked, and stored under the fallback request's own key
/// (the third value), never under the original's. `sidecar` (key, bytes)
/// is stored with the answer, same expiry, unless a fallback answered.
pub(crate) fn chat(
    up: &dyn Upstream,
    store: &dyn Store,
    job: &Job,
    spec: &ChatSpec,
    key: &[u8],
    sidecar: Option<(&[u8], &[u8])>,
) -> (FillResult, Spent, Option<Arc<[u8]>>) {
    let mut spent = Spent::default();
    let first = ask(
        up,
        &spec.plan,
        &spec.body,
        spec.max_bytes,
        job.deadline,
        &mut spent,
    );
    let (body, usage, fell_back) = match (first, &spec.fallback) {
        (Ok((b, u)), _) => (b, u, None),
        (Err(f), Some(fb)) if f.fails_over() && Instant::now() < job.deadline => {
            STATS.chat_fallbacks.incr();
            match ask(
                up,
                &fb.plan,
                &fb.body,
                spec.max_bytes,
                job.deadline,
                &mut spent,
            ) {
                Ok((b, u)) => (b, u, Some(Arc::from(&fb.key[..]))),
                Err(f2) => {
                    let msg = format!(
                        "{}; the fallback model {} failed too: {}",
                        f.message(),
                        fb.model,
                        f2.message().trim_start_matches("ERR ")
                    );
                    return (Err(FillError::whole(&sanitize(&msg))), spent, None);
                }
            }
        }
        (Err(f), _) => return (Err(whole(&f)), spent, None),
    };
    spent.tokens = usage.total;
    spent.answered = true;
    STATS.tokens_prompt.add(usage.prompt);
    STATS.tokens_completion.add(usage.completion);
    STATS.tokens_total.add(usage.total);
    let mut entries = vec![(fell_back.as_deref().unwrap_or(key), body.as_slice())];
    // A refill without a new vector (refresh-ahead, REFRESH) keeps the
    // entry's existing sidecar alive as long as the answer.
    let mut companion = None;
    match (sidecar, &fell_back) {
        (Some(side), None) => entries.push(side),
        (None, None) => {
            companion =
                crate::model::keys::semantic_key_for(&crate::config::KEY_PREFIX.value(), key)
        }
        _ => {}
    }
    let commit = Commit {
        db: job.db,
        pin: None,
        dims: 0,
        entries,
        expiry: job.expiry,
        together: true,
        companion: companion.as_deref(),
    };
    if let Err(msg) = store.commit(&commit) {
        return (Err(FillError::whole(&msg)), spent, None);
    }
    (Ok(Arc::from(body)), spent, fell_back)
}
