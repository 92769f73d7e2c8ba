//! Keeps the in-memory semantic index in step with the sidecars in Redis.
//! The main thread only notes what happened to which key (keyspace events,
//! flushes, loading) in a bounded queue; one thread, `aicache-semidx`,
//! reads the sidecars under the lock in small chunks and updates the
//! index. So writes by workers, replication, AOF replay, DEL, expiry,
//! eviction and FLUSHALL all reach the index the same way, and a full
//! rebuild (restart, replica sync, queue overflow) is a SCAN.
//!
//! Searches run on the worker threads; the main thread never takes the
//! index lock.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, LazyLock, Mutex, MutexGuard, RwLock, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use redis_module::ThreadSafeContext;

use crate::config::{KEY_PREFIX, SEMANTIC_MAX_ENTRIES};
use crate::fill::store::{RedisStore, Store};
use crate::model::keys::{is_semantic_key, semantic_key_for};
use crate::model::semantic::Sidecar;
use crate::model::vindex::{Head, Index, Inserted};
use crate::redis::{ffi, keyspace};
use crate::stats::STATS;

enum Update {
    /// Re-read the sidecar: it was written (or may have been).
    Upsert(i32, Vec<u8>),
    Remove(i32, Vec<u8>),
    Clear(Option<i32>),
    Forget(i32, [u8; 16], u64),
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Update>,
    rebuild: bool,
    busy: bool,
    stop: bool,
}

/// Pending updates beyond this are dropped for a full rebuild.
const MAX_QUEUE: usize = 100_000;

static QUEUE: LazyLock<Mutex<Queue>> = LazyLock::new(Mutex::default);
static WAKE: Condvar = Condvar::new();
// Lookups share the read lock; only the upkeep thread writes.
static INDEX: LazyLock<RwLock<Index>> = LazyLock::new(|| RwLock::new(Index::new()));
static THREAD: Mutex<Option<JoinHandle<()>>> = Mutex::new(None);
static LOADING: AtomicBool = AtomicBool::new(false);
static REBUILDING: AtomicBool = AtomicBool::new(false);
/// An entry was refused for want of room since the last rebuild.
static REFUSED: AtomicBool = AtomicBool::new(false);

static ENTRIES: AtomicU64 = AtomicU64::new(0);
static CONTEXTS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);
static REBUILD_MS: AtomicU64 = AtomicU64::new(0);
static PENDING: AtomicU64 = AtomicU64::new(0);

fn queue() -> MutexGuard<'static, Queue> {
    QUEUE.lock().unwrap_or_else(|e| e.into_inner())
}

fn index() -> RwLockWriteGuard<'static, Index> {
    INDEX.write().unwrap_or_else(|e| e.into_inner())
}

fn push(u: Option<Update>, rebuild: bool) {
    let mut q = queue();
    // A rebuild reads everything as it is now: what was queued before it
    // is already covered.
    if rebuild || q.items.len() >= MAX_QUEUE {
        q.items.clear();
        q.rebuild = true;
        REBUILDING.store(true, Ordering::Relaxed);
    } else if let Some(u) = u {
        q.items.push_back(u);
    }
    PENDING.store(q.items.len() as u64, Ordering::Relaxed);
    drop(q);
    WAKE.notify_one();
}

/// A keyspace event (main thread, or a worker holding the lock).
pub fn note_key_event(db: i32, event: &[u8], key: &[u8]) {
    if LOADING.load(Ordering::Relaxed) {
        return;
    }
    let prefix = KEY_PREFIX.value();
    let removal = matches!(
        event,
        b"del" | b"expired" | b"evicted" | b"rename_from" | b"move_from"
    );
    if is_semantic_key(&prefix, key) {
        // A TTL change leaves the sidecar as it is.
        if matches!(event, b"expire" | b"persist") {
            return;
        }
        let u = match removal {
            true => Update::Remove(db, key.to_vec()),
            false => Update::Upsert(db, key.to_vec()),
        };
        push(Some(u), false);
    } else if removal {
        // The answer is gone: its sidecar stops being a candidate, even
        // if it outlives the answer (eviction picks keys one by one).
        if let Some(sem) = semantic_key_for(&prefix, key) {
            push(Some(Update::Remove(db, sem)), false);
        }
    }
}

/// FLUSHDB (`Some(db)`); FLUSHALL, SWAPDB or a role change (`None`):
/// the data may have moved under the index, so it is rebuilt.
pub fn note_flush(db: Option<i32>) {
    match db {
        Some(db) => push(Some(Update::Clear(Some(db))), false),
        None => push(None, true),
    }
}

/// Loading started (`false`: the index waits) or ended (`true`: rebuilt).
pub fn note_loading(ended: bool) {
    LOADING.store(!ended, Ordering::Relaxed);
    if ended {
        push(None, true);
    } else {
        queue().items.clear();
    }
}

/// LLMCACHE.FLUSH moved namespace `nsid` of `db` to generation `current`.
pub fn note_flush_namespace(db: i32, nsid: [u8; 16], current: u64) {
    push(Some(Update::Forget(db, nsid, current)), false);
}

/// Up to `n` sidecar keys of `(db, context)` to score exactly.
pub fn shortlist(db: i32, context: &[u8; 32], query: &[f32], n: usize) -> Vec<Arc<[u8]>> {
    let x = INDEX.read().unwrap_or_else(|e| e.into_inner());
    x.shortlist(db, context, query, n)
}

/// INFO gauges.
pub fn gauges() -> [(&'static str, u64); 6] {
    [
        (
            "semantic_rebuilding",
            u64::from(REBUILDING.load(Ordering::Relaxed)),
        ),
        ("semantic_entries", ENTRIES.load(Ordering::Relaxed)),
        ("semantic_contexts", CONTEXTS.load(Ordering::Relaxed)),
        ("semantic_index_bytes", BYTES.load(Ordering::Relaxed)),
        ("semantic_index_pending", PENDING.load(Ordering::Relaxed)),
        ("semantic_rebuild_ms", REBUILD_MS.load(Ordering::Relaxed)),
    ]
}

/// Starts the upkeep thread with a full rebuild (MODULE LOAD on a server
/// that already holds data).
pub fn start() -> Result<(), String> {
    let mut t = THREAD.lock().unwrap_or_else(|e| e.into_inner());
    if t.is_some() {
        return Ok(());
    }
    queue().stop = false;
    let h = std::thread::Builder::new()
        .name("aicache-semidx".into())
        .spawn(run)
        .map_err(|e| format!("aicache: cannot start the semantic index thread: {e}"))?;
    *t = Some(h);
    drop(t);
    push(None, true);
    Ok(())
}

/// MODULE UNLOAD: false while the thread has work (it may be waiting for
/// the lock this caller holds); else stops and joins it.
pub fn stop() -> bool {
    {
        let mut q = queue();
        if q.busy || !q.items.is_empty() || q.rebuild {
            return false;
        }
        q.stop = true;
    }
    WAKE.notify_all();
    if let Some(h) = THREAD.lock().unwrap_or_else(|e| e.into_inner()).take() {
        let _ = h.join();
    }
    true
}

fn run() {
    loop {
        let (batch, rebuild) = {
            let mut q = queue();
            while !q.stop && q.items.is_empty() && !q.rebuild {
                q = WAKE.wait(q).unwrap_or_else(|e| e.into_inner());
            }
            if q.stop {
                return;
            }
            let n = q.items.len().min(512);
            let batch: Vec<Update> = q.items.drain(..n).collect();
            let rebuild = std::mem::take(&mut q.rebuild);
            q.busy = true;
            PENDING.store(q.items.len() as u64, Ordering::Relaxed);
            (batch, rebuild)
        };
        // A panic here loses this batch only; the next rebuild repairs.
        let done = std::panic::catch_unwind(|| {
            if LOADING.load(Ordering::Relaxed) {
                return;
            }
            if rebuild {
                rebuild_all();
            }
            apply(batch);
        });
        if done.is_err() {
            STATS.handler_panics.incr();
        }
        publish();
        let mut q = queue();
        q.busy = false;
        if !q.rebuild {
            REBUILDING.store(false, Ordering::Relaxed);
        }
        drop(q);
        // Entries refused for want of room get their turn once there is
        // room again (expiry, DEL, a flush).
        let max = SEMANTIC_MAX_ENTRIES.get_u64();
        if REFUSED.load(Ordering::Relaxed) && ENTRIES.load(Ordering::Relaxed) < max / 10 * 9 {
            REFUSED.store(false, Ordering::Relaxed);
            push(None, true);
        }
    }
}

fn publish() {
    let x = index();
    ENTRIES.store(x.len() as u64, Ordering::Relaxed);
    CONTEXTS.store(x.contexts() as u64, Ordering::Relaxed);
    BYTES.store(x.bytes() as u64, Ordering::Relaxed);
}

/// Applies updates in order. Sidecars are read after all of them were
/// noted, so each read is at least as new as its event.
fn apply(batch: Vec<Update>) {
    let wanted: Vec<(i32, &[u8])> = batch
        .iter()
        .filter_map(|u| match u {
            Update::Upsert(db, k) => Some((*db, k.as_slice())),
            _ => None,
        })
        .collect();
    let mut values = read_all(&wanted).into_iter();
    let max = SEMANTIC_MAX_ENTRIES.get_u64() as usize;
    let mut x = index();
    for u in &batch {
        match u {
            Update::Upsert(db, key) => {
                let value = values.next().flatten();
                index_one(&mut x, *db, key, value.as_deref(), max);
            }
            Update::Remove(db, key) => {
                x.remove(*db, key);
            }
            Update::Clear(db) => x.clear(*db),
            Update::Forget(db, nsid, current) => {
                x.forget(*db, *nsid, *current);
            }
        }
    }
}

fn index_one(x: &mut Index, db: i32, key: &[u8], value: Option<&[u8]>, max: usize) {
    let Some(side) = value.and_then(Sidecar::decode) else {
        x.remove(db, key);
        return;
    };
    let head = Head {
        context: side.context,
        nsid: side.nsid,
        generation: side.generation,
    };
    if x.insert(db, key, head, &side.floats(), max) == Inserted::Full {
        STATS.semantic_index_full.incr();
        REFUSED.store(true, Ordering::Relaxed);
    }
}

/// Reads `keys` under the lock, a chunk per hold so commands run between.
fn read_all(keys: &[(i32, &[u8])]) -> Vec<Option<Vec<u8>>> {
    let mut out = Vec::with_capacity(keys.len());
    // One read per run of the same DB (a batch is mostly one DB).
    for run in keys.chunk_by(|a, b| a.0 == b.0) {
        let names: Vec<&[u8]> = run.iter().map(|&(_, k)| k).collect();
        out.extend(RedisStore.read(run[0].0, &names, false));
    }
    out
}

/// Rebuilds the index from every DB's sidecars, on the side: lookups keep
/// the old index (every candidate is checked anyway) until the new one
/// replaces it.
fn rebuild_all() {
    let started = Instant::now();
    STATS.semantic_rebuilds.incr();
    let pattern = glob_escape(&format!("{}sem:v1:", KEY_PREFIX.value()));
    let max = SEMANTIC_MAX_ENTRIES.get_u64() as usize;
    let mut fresh = Index::new();
    'dbs: for db in 0..i32::from(u16::MAX) {
        let mut cursor = 0u64;
        loop {
            let step = {
                let tsc = ThreadSafeContext::new();
                let ctx = tsc.lock();
                if !ffi::select_db(&ctx, db) {
                    break 'dbs;
                }
                keyspace::scan(&ctx, cursor, &pattern, 256).map(|(next, keys)| {
                    let values: Vec<(Vec<u8>, Option<Vec<u8>>)> = keys
                        .into_iter()
                        .map(|k| {
                            let v = keyspace::read_quiet(&ctx, &k);
                            (k, v)
                        })
                        .collect();
                    (next, values)
                })
            };
            let Some((next, values)) = step else { break };
            for (k, v) in values {
                index_one(&mut fresh, db, &k, v.as_deref(), max);
            }
            if LOADING.load(Ordering::Relaxed) {
                // Loading started under us: its end rebuilds again.
                return;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    *index() = fresh;
    REBUILD_MS.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
}

/// A SCAN pattern matching keys that start with `prefix`.
fn glob_escape(prefix: &str) -> Vec<u8> {
    let mut p = Vec::with_capacity(prefix.len() + 2);
    for b in prefix.bytes() {
        if matches!(b, b'*' | b'?' | b'[' | b']' | b'\\') {
            p.push(b'\\');
        }
        p.push(b);
    }
    p.push(b'*');
    p
}

/// Indexes an entry directly, for tests of the lookup without Redis.
#[cfg(test)]
pub fn index_for_test(db: i32, key: &[u8], head: Head, v: &[f32]) {
    index().insert(db, key, head, v, usize::MAX);
}

#[cfg(test)]
mod tests {
    #[test]
    fn scan_patterns_escape_glob_characters() {
        assert_eq!(super::glob_escape("a*b?["), b"a\\*b\\?\\[*".to_vec());
        assert_eq!(
            super::glob_escape("aicache:sem:v1:"),
            b"aicache:sem:v1:*".to_vec()
        );
    }
}
