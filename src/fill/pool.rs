//! The worker pool: fixed threads fed by a bounded channel. A full channel
//! is an immediate error for the caller; a panicking job is caught, and its
//! `Pending` guard answers its waiters while the stack unwinds.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use ureq::Agent;

use crate::stats::STATS;

pub use crate::fill::job::Job;
use crate::fill::store::RedisStore;
use crate::fill::upstream::Http;

struct Pool {
    tx: Sender<Job>,
    threads: Vec<JoinHandle<()>>,
    resolvers: Vec<JoinHandle<()>>,
    appender: JoinHandle<()>,
}

static POOL: Mutex<Option<Pool>> = Mutex::new(None);
/// Set at shutdown and unload: workers stop retrying and sleeping.
pub static STOPPING: AtomicBool = AtomicBool::new(false);

fn pool() -> std::sync::MutexGuard<'static, Option<Pool>> {
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn start(workers: usize, queue: usize) -> Result<(), String> {
    let (tx, rx) = bounded::<Job>(queue);
    let (resolver, resolvers) = crate::fill::resolve::start()?;
    let appender = match crate::fill::appender::start() {
        Ok(t) => t,
        Err(e) => {
            drop(resolver);
            for t in resolvers {
                let _ = t.join();
            }
            return Err(e);
        }
    };
    let agent = crate::fill::upstream::agent(workers, resolver);
    let mut threads = Vec::with_capacity(workers);
    for i in 0..workers {
        let rx: Receiver<Job> = rx.clone();
        let worker_agent = agent.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("aicache-w{i}"))
            .spawn(move || work(rx, worker_agent));
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                // The load fails and the library is unmapped: no thread may
                // still be running its code.
                drop(tx);
                drop(agent);
                crate::fill::appender::stop();
                for t in threads.into_iter().chain(resolvers).chain([appender]) {
                    let _ = t.join();
                }
                return Err(format!("cannot start worker thread: {e}"));
            }
        }
    }
    STOPPING.store(false, Ordering::Relaxed);
    if let Err(e) = crate::fill::batcher::start() {
        drop(tx);
        drop(agent);
        crate::fill::appender::stop();
        for t in threads.into_iter().chain(resolvers).chain([appender]) {
            let _ = t.join();
        }
        return Err(e);
    }
    *pool() = Some(Pool {
        tx,
        threads,
        resolvers,
        appender,
    });
    Ok(())
}

fn work(rx: Receiver<Job>, agent: Agent) {
    let up = Http {
        agent,
        stopping: &STOPPING,
    };
    crate::fill::pipeline::mark_worker_thread();
    while let Ok(job) = rx.recv() {
        BUSY.fetch_add(1, Ordering::AcqRel);
        let db = job.db;
        let target = job.stream_target();
        let ran = catch_unwind(AssertUnwindSafe(|| {
            crate::redis::guard::maybe_panic(crate::redis::guard::Site::Worker);
            job.run(&up, &RedisStore)
        }));
        if ran.is_err() {
            if !crate::fill::pipeline::take_panic_counted() {
                STATS.worker_panics.incr();
            }
            // Its readers must still see an end.
            let _ = catch_unwind(AssertUnwindSafe(|| {
                if let Some(t) = target {
                    t.abandon();
                }
                for s in crate::fill::pipeline::take_abandoned_streams() {
                    let linger = crate::config::STREAM_LINGER_MS.get_u64();
                    crate::fill::streaming::Target::new(db, s, linger, 0, u64::MAX).abandon();
                }
            }));
        }
        BUSY.fetch_sub(1, Ordering::AcqRel);
    }
}

pub enum Refused {
    Full(usize),
    Stopped,
}

/// Queues `job` without waiting. On refusal the job comes back unrun.
pub fn submit(job: Job) -> Result<(), Box<(Job, Refused)>> {
    let guard = pool();
    let Some(p) = guard.as_ref() else {
        return Err(Box::new((job, Refused::Stopped)));
    };
    match p.tx.try_send(job) {
        Ok(()) => Ok(()),
        Err(TrySendError::Full(job)) => {
            Err(Box::new((job, Refused::Full(p.tx.capacity().unwrap_or(0)))))
        }
        Err(TrySendError::Disconnected(job)) => Err(Box::new((job, Refused::Stopped))),
    }
}

/// Workers running a job now (including the clean-up after a panic).
static BUSY: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

pub fn busy() -> usize {
    BUSY.load(Ordering::Acquire)
}

pub fn queue_depth() -> usize {
    pool().as_ref().map_or(0, |p| p.tx.len())
}

pub fn workers() -> usize {
    pool().as_ref().map_or(0, |p| p.threads.len())
}

/// Closes the queue and joins every worker. Only for unload, and only when
/// no fill is running: a worker with a result would wait for the Redis lock
/// that the caller holds.
pub fn stop() {
    STOPPING.store(true, Ordering::Relaxed);
    crate::fill::batcher::stop(true);
    let Some(p) = pool().take() else { return };
    drop(p.tx);
    crate::fill::appender::stop();
    // Workers first: their agents hold the resolver's queue, and the
    // resolver threads end once the last of them is gone.
    for t in p.threads.into_iter().chain(p.resolvers).chain([p.appender]) {
        let _ = t.join();
    }
}

/// Shutdown: stop retries and empty the queue, without joining (a worker
/// may be waiting for the Redis lock the shutting-down main thread holds).
pub fn halt() {
    STOPPING.store(true, Ordering::Relaxed);
    crate::fill::batcher::stop(false);
    if let Some(p) = pool().take() {
        drop(p.tx);
    }
    crate::fill::appender::stop();
}
