//! Cross-client micro-batching. Embedding jobs for the same (endpoint,
//! model, dimensions, encoding) that arrive within aicache.batch-window-ms
//! of the first share one upstream request, cut at aicache.batch-size
//! inputs and aicache.batch-max-tokens estimated tokens: a full batch goes
//! at once, a partial one when its window ends. A job larger than the room
//! left is split, so batches go out full. One thread keeps the windows;
//! it never touches Redis.

use std::sync::{Condvar, LazyLock, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::{BATCH_MAX_TOKENS, BATCH_SIZE};
use crate::fill::job::{Job, Task};
use crate::fill::pipeline::{submit_one, Pending};
use crate::limits::spend::Bill;

/// Batches open at once; past it a job goes out alone.
const MAX_OPEN: usize = 1024;

struct Open {
    key: Vec<u8>,
    jobs: Vec<Job>,
    count: usize,
    tokens: u64,
    due: Instant,
}

#[derive(Default)]
struct State {
    open: Vec<Open>,
    running: bool,
}

static STATE: LazyLock<(Mutex<State>, Condvar)> =
    LazyLock::new(|| (Mutex::new(State::default()), Condvar::new()));
static THREAD: Mutex<Option<JoinHandle<()>>> = Mutex::new(None);

fn state() -> MutexGuard<'static, State> {
    STATE.0.lock().unwrap_or_else(|e| e.into_inner())
}

/// What must match for two jobs to share a request.
fn batch_key(job: &Job) -> Option<Vec<u8>> {
    let Task::Embed { spec, .. } = &job.task else {
        return None;
    };
    let mut k = Vec::new();
    for part in [
        spec.plan.first().map_or("", |d| d.url.as_str()),
        spec.model.as_str(),
    ] {
        k.extend_from_slice(&(part.len() as u64).to_be_bytes());
        k.extend_from_slice(part.as_bytes());
    }
    k.extend_from_slice(&spec.dims.unwrap_or(0).to_be_bytes());
    k.push(u8::from(spec.base64));
    Some(k)
}

/// Adds an embedding job to its open batch (opening one if needed).
pub fn add(mut job: Job, window: Duration) {
    let Some(key) = batch_key(&job) else {
        let _ = submit_one(job);
        return;
    };
    let max_count = BATCH_SIZE.get_u64().max(1) as usize;
    let max_tokens = BATCH_MAX_TOKENS.get_u64().max(1);
    let mut ready = Vec::new();
    {
        let mut st = state();
        if !st.running {
            drop(st);
            let _ = submit_one(job);
            return;
        }
        loop {
            let i = match st.open.iter().position(|o| o.key == key) {
                Some(i) => i,
                None if st.open.len() >= MAX_OPEN => {
                    ready.push(job);
                    break;
                }
                None => {
                    st.open.push(Open {
                        key: key.clone(),
                        jobs: Vec::new(),
                        count: 0,
                        tokens: 0,
                        due: Instant::now() + window,
                    });
                    STATE.1.notify_one();
                    st.open.len() - 1
                }
            };
            let o = &mut st.open[i];
            let (n, t) = job.embed_size().unwrap_or((0, 0));
            let fits = take_fitting(&job, o, max_count, max_tokens);
            if fits >= n {
                o.count += n;
                o.tokens = o.tokens.saturating_add(t);
                o.jobs.push(job);
                if o.count >= max_count {
                    ready.push(wrap(st.open.swap_remove(i).jobs));
                }
                break;
            }
            // Fill this batch with the front of the job, send it, and put
            // the rest in a new batch.
            if fits > 0 {
                if let Some(front) = job.split_front(fits) {
                    o.jobs.push(front);
                }
            }
            ready.push(wrap(st.open.swap_remove(i).jobs));
        }
    }
    for j in ready {
        let _ = submit_one(j);
    }
}

/// How many of the job's first inputs fit in the batch's room. An empty
/// batch takes at least one, so an input over the token cap still goes.
fn take_fitting(job: &Job, o: &Open, max_count: usize, max_tokens: u64) -> usize {
    let Task::Embed { inputs, .. } = &job.task else {
        return 0;
    };
    let mut tokens = o.tokens;
    let mut n = 0;
    for (count, t) in (o.count..).zip(inputs) {
        let e = crate::model::quota::estimate_tokens(t.len());
        if count > 0 && (count >= max_count || tokens.saturating_add(e) > max_tokens) {
            break;
        }
        tokens = tokens.saturating_add(e);
        n += 1;
    }
    n
}

/// One job for the pool: the jobs of a batch, or the only one.
fn wrap(mut jobs: Vec<Job>) -> Job {
    if jobs.len() == 1 {
        if let Some(j) = jobs.pop() {
            return j;
        }
    }
    let deadline = jobs
        .iter()
        .map(|j| j.deadline)
        .min()
        .unwrap_or_else(Instant::now);
    Job {
        pending: Pending::new(Vec::new(), Vec::new(), 0),
        bill: Bill::new(None),
        db: 0,
        expiry: None,
        deadline,
        queued: Instant::now(),
        task: Task::Batch(jobs),
    }
}

/// Starts the window thread.
pub fn start() -> Result<(), String> {
    state().running = true;
    let t = std::thread::Builder::new()
        .name("aicache-batch".into())
        .spawn(run)
        .map_err(|e| {
            state().running = false;
            format!("cannot start the batching thread: {e}")
        })?;
    *THREAD.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
    Ok(())
}

fn run() {
    let mut st = state();
    while st.running {
        let now = Instant::now();
        let mut due = Vec::new();
        let mut i = 0;
        while i < st.open.len() {
            if st.open[i].due <= now {
                due.push(wrap(st.open.swap_remove(i).jobs));
            } else {
                i += 1;
            }
        }
        if !due.is_empty() {
            drop(st);
            for j in due {
                let _ = submit_one(j);
            }
            st = state();
            continue;
        }
        let next = st.open.iter().map(|o| o.due).min();
        let wait = next.map_or(Duration::from_secs(1), |d| d.saturating_duration_since(now));
        st = STATE
            .1
            .wait_timeout(st, wait)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

/// Stops the thread; open batches go to the pool (which, stopping, fails
/// them with its reason). `join`: wait for the thread (unload only).
pub fn stop(join: bool) {
    let open = {
        let mut st = state();
        st.running = false;
        std::mem::take(&mut st.open)
    };
    STATE.1.notify_all();
    for o in open {
        let _ = submit_one(wrap(o.jobs));
    }
    if join {
        if let Some(t) = THREAD.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

/// Batches waiting for their window (MODULE UNLOAD waits for none).
pub fn open_batches() -> usize {
    state().open.len()
}
