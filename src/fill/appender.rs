//! One thread makes every Stream append. Hundreds of generations each
//! appending a chunk every few ms would take the Redis lock (and wake the
//! event loop) tens of thousands of times a second; the appender takes it
//! at most once per millisecond for all of them, so a chunk waits at most
//! about a millisecond and the main thread keeps its latency.

use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use redis_module::ThreadSafeContext;

use crate::fill::store::{append_locked, Append, Appended};
use crate::model::frames::Frame;

/// Gap between two takes of the lock while appends keep coming.
const TICK: Duration = Duration::from_millis(1);
/// Requests waiting for the appender; a full queue makes workers wait.
const QUEUE: usize = 4096;
/// Most requests applied under one take of the lock.
const BATCH: usize = 1024;

type Answer = Result<Appended, String>;

struct Request {
    db: i32,
    stream: Vec<u8>,
    start_ms: u64,
    first: u64,
    frames: Vec<Frame>,
    pointer: Option<Vec<u8>>,
    expire_at_ms: u64,
    reply: Sender<Answer>,
}

static TX: Mutex<Option<Sender<Request>>> = Mutex::new(None);

fn sender() -> Option<Sender<Request>> {
    TX.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

pub fn start() -> Result<JoinHandle<()>, String> {
    let (tx, rx) = bounded::<Request>(QUEUE);
    let t = std::thread::Builder::new()
        .name("aicache-append".into())
        .spawn(move || run(rx))
        .map_err(|e| format!("cannot start the appender thread: {e}"))?;
    *TX.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
    Ok(t)
}

/// Closes the queue: the thread ends once it is empty.
pub fn stop() {
    TX.lock().unwrap_or_else(|e| e.into_inner()).take();
}

/// Appends through the appender thread, waiting for the outcome.
pub fn append(a: &Append) -> Answer {
    let Some(tx) = sender() else {
        return Err("ERR aicache is shutting down".into());
    };
    let (reply, answer) = bounded(1);
    let req = Request {
        db: a.db,
        stream: a.stream.to_vec(),
        start_ms: a.start_ms,
        first: a.first,
        frames: a.frames.to_vec(),
        pointer: a.pointer.map(<[u8]>::to_vec),
        expire_at_ms: a.expire_at_ms,
        reply,
    };
    tx.send(req)
        .map_err(|_| "ERR aicache is shutting down".to_string())?;
    answer
        .recv()
        .unwrap_or_else(|_| Err("ERR internal error: the appender stopped".into()))
}

fn run(rx: Receiver<Request>) {
    let mut last = Instant::now() - TICK;
    while let Ok(first) = rx.recv() {
        let wait = TICK.saturating_sub(last.elapsed());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let answers: Vec<Answer> = {
            let tsc = ThreadSafeContext::new();
            let ctx = tsc.lock();
            batch
                .iter()
                .map(|r| {
                    let a = Append {
                        db: r.db,
                        stream: &r.stream,
                        start_ms: r.start_ms,
                        first: r.first,
                        frames: &r.frames,
                        pointer: r.pointer.as_deref(),
                        expire_at_ms: r.expire_at_ms,
                    };
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        append_locked(&ctx, &a)
                    }))
                    .unwrap_or_else(|_| Err("ERR internal error while appending".into()))
                })
                .collect()
        };
        last = Instant::now();
        if answers.contains(&Ok(Appended::Written)) {
            crate::redis::keywait::wake_main_thread();
        }
        for (r, a) in batch.into_iter().zip(answers) {
            let _ = r.reply.send(a);
        }
    }
}
