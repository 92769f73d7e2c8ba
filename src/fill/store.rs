//! Where a fill's results go. Production stores into Redis under one hold
//! of the lock; unit tests use [`MemStore`].

use redis_module::ThreadSafeContext;

use crate::fill::pins;
use crate::fill::pipeline::Expiry;
use crate::model::frames::{entry_id, Frame};
use crate::model::ttl::{expire_at, now_ms, JITTER_RNG};
use crate::redis::ffi::{self, Memory};
use crate::stats::STATS;

/// One fill's results for one DB.
pub struct Commit<'a> {
    pub db: i32,
    /// (pin hash key, model): the vectors must fit the namespace's pin.
    pub pin: Option<(&'a [u8], &'a [u8])>,
    pub dims: usize,
    pub entries: Vec<(&'a [u8], &'a [u8])>,
    /// None (NOSTORE): the pin is still checked, nothing is written.
    pub expiry: Option<Expiry>,
    /// Every entry gets the same jittered expiry (an answer and its
    /// semantic sidecar live and die together).
    pub together: bool,
    /// A key that, if it exists, takes the same expiry as the entries: a
    /// refilled answer's sidecar, so the entry stays a candidate.
    pub companion: Option<&'a [u8]>,
}

/// Entries for a generation's Stream (LLMCACHE.STREAM).
pub struct Append<'a> {
    pub db: i32,
    pub stream: &'a [u8],
    /// Entry ids are `<start_ms>-<n>`; `frames[0]` is entry `first`.
    pub start_ms: u64,
    pub first: u64,
    pub frames: &'a [Frame],
    /// A key naming the Stream while it runs (replicas find it there):
    /// set with the first entries, deleted with the end.
    pub pointer: Option<&'a [u8]>,
    /// Absolute expiry of the Stream after these entries.
    pub expire_at_ms: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Appended {
    Written,
    /// Writes are paused here (CLIENT PAUSE, failover): nothing written,
    /// try again.
    Paused,
}

pub trait Store: Sync {
    /// Err: the results must not be returned (they do not fit the pin).
    /// Writes that this node may not make now are skipped, not errors.
    fn commit(&self, c: &Commit) -> Result<(), String>;

    /// Appends to a Stream, all entries or none. Err: the Stream cannot
    /// continue here (no longer a master, out of memory, not a Stream).
    /// An end entry is written even over `maxmemory`, so readers end.
    fn append(&self, a: &Append) -> Result<Appended, String>;

    /// The string values of `keys` in `db` (None: missing or not a
    /// string). Only a `touch` read counts as a use for LRU/LFU eviction.
    fn read(&self, db: i32, keys: &[&[u8]], touch: bool) -> Vec<Option<Vec<u8>>>;
}

/// Redis, through a thread-safe context: the caller's DB, effects
/// replicated with absolute expiry, skipped when this node may not write
/// (paused, failing over, replica) or when `maxmemory` refuses the write.
pub struct RedisStore;

impl Store for RedisStore {
    fn commit(&self, c: &Commit) -> Result<(), String> {
        let tsc = ThreadSafeContext::new();
        let ctx = tsc.lock();
        let skip = |n: usize| STATS.writes_skipped.add(n as u64);
        if !ffi::select_db(&ctx, c.db) {
            skip(c.entries.len());
            return Ok(());
        }
        let writing = c.expiry.is_some() && ffi::may_write(&ctx);
        if let Some((key, model)) = c.pin {
            pins::check(&ctx, c.db, key, model, c.dims, writing)?;
        }
        let Some(expiry) = c.expiry else {
            return Ok(());
        };
        if !writing {
            skip(c.entries.len());
            return Ok(());
        }
        // Like a client's write: refused over maxmemory. Without eviction
        // each write is checked; with eviction Redis frees memory at the
        // next command, as after a client's MSET.
        let check_each = match ffi::memory(&ctx) {
            Memory::Over => {
                skip(c.entries.len());
                return Ok(());
            }
            Memory::Strict => true,
            Memory::Fine => false,
        };
        let now = now_ms();
        let shared = expire_at(now, expiry.ttl_secs, expiry.jitter_pct, JITTER_RNG.next());
        for (i, (key, value)) in c.entries.iter().enumerate() {
            let at = match c.together {
                true => shared,
                false => expire_at(now, expiry.ttl_secs, expiry.jitter_pct, JITTER_RNG.next()),
            };
            if ffi::set_string_checked(&ctx, key, value, at, check_each).is_err() {
                skip(c.entries.len() - i);
                return Ok(());
            }
        }
        if let (Some(k), true) = (c.companion, c.together) {
            let at = shared.map(|at| at.to_string());
            let changed = match &at {
                Some(at) => ffi::call(
                    &ctx,
                    "PEXPIREAT",
                    &[k, at.as_bytes()],
                    true,
                    ffi::reply_as_i64,
                ),
                // The answer has no expiry now: neither has its vector.
                None => ffi::call(&ctx, "PERSIST", &[k], true, ffi::reply_as_i64),
            };
            // An expiry change is no index event; a sidecar whose answer had
            // gone (and so left the index) is a candidate again.
            if changed.is_ok_and(|n| n == 1) {
                crate::fill::semindex::note_key_event(c.db, b"set", k);
            }
        }
        Ok(())
    }

    fn append(&self, a: &Append) -> Result<Appended, String> {
        crate::fill::appender::append(a)
    }

    fn read(&self, db: i32, keys: &[&[u8]], touch: bool) -> Vec<Option<Vec<u8>>> {
        let mut out = Vec::with_capacity(keys.len());
        // 64 keys per hold of the lock: commands run in between.
        for chunk in keys.chunks(64) {
            let tsc = ThreadSafeContext::new();
            let ctx = tsc.lock();
            let selected = ffi::select_db(&ctx, db);
            for k in chunk {
                let v = match (selected, touch) {
                    (false, _) => None,
                    (true, false) => crate::redis::keyspace::read_quiet(&ctx, k),
                    (true, true) => ffi::with_string(&ctx, k, |v| v.map(<[u8]>::to_vec))
                        .ok()
                        .flatten(),
                };
                out.push(v);
            }
        }
        out
    }
}

/// True when a write checked against `maxmemory` would be refused now.
fn oom_now(ctx: &redis_module::Context) -> bool {
    ctx.get_flags().contains(redis_module::ContextFlags::OOM)
}

/// Appends under one hold of the lock; each XADD carries its explicit id
/// and the expiry is absolute, so replicas and the AOF hold the same
/// Stream.
pub fn append_locked(ctx: &redis_module::Context, a: &Append) -> Result<Appended, String> {
    if !ffi::select_db(ctx, a.db) {
        return Err("ERR the stream's DB cannot be selected".into());
    }
    match ffi::write_state(ctx) {
        ffi::WriteState::Writable => {}
        ffi::WriteState::Paused => return Ok(Appended::Paused),
        ffi::WriteState::NotMaster => {
            return Err("ERR this node stopped being a master during the stream".into())
        }
    }
    // One check per batch: a refusal half-way through would leave a
    // partial batch and ids the next append could not follow.
    let full = match ffi::memory(ctx) {
        Memory::Over => true,
        Memory::Strict => oom_now(ctx),
        Memory::Fine => false,
    };
    if full && a.frames.iter().any(|f| !f.is_end()) {
        STATS.writes_skipped.incr();
        return Err("ERR out of memory (maxmemory): the stream was ended".into());
    }
    let at = a.expire_at_ms.to_string();
    let ends = a.frames.last().is_some_and(Frame::is_end);
    if let Some(p) = a.pointer {
        let _ = if ends {
            ffi::call(ctx, "DEL", &[p], true, |_| ())
        } else if a.first == 1 {
            ffi::call(
                ctx,
                "SET",
                &[p, a.stream, b"PXAT", at.as_bytes()],
                true,
                |_| (),
            )
        } else {
            Ok(())
        };
    }
    for (i, f) in a.frames.iter().enumerate() {
        let id = entry_id(a.start_ms, a.first + i as u64);
        let fields = f.fields();
        let mut args: Vec<&[u8]> = vec![a.stream, id.as_bytes()];
        args.extend(fields.iter().map(Vec::as_slice));
        ffi::call(ctx, "XADD", &args, true, |_| ())
            .map_err(|e| format!("ERR the stream could not be written: {e}"))?;
    }
    let _ = ffi::call(ctx, "PEXPIREAT", &[a.stream, at.as_bytes()], true, |_| ());
    Ok(Appended::Written)
}

#[cfg(test)]
pub mod mem {
    //! An in-memory store with the same pin policy, for unit tests.
    use std::collections::HashMap;
    use std::sync::Mutex;

    use super::*;
    use crate::model::pins::{decide, mismatch_message, Decision};

    type Entries = HashMap<(i32, Vec<u8>), Vec<u8>>;
    type Pins = HashMap<(i32, Vec<u8>, Vec<u8>), usize>;
    type Streams = HashMap<(i32, Vec<u8>), Vec<(String, Frame)>>;

    #[derive(Default)]
    pub struct MemStore {
        pub entries: Mutex<Entries>,
        pub pins: Mutex<Pins>,
        pub streams: Mutex<Streams>,
        /// Writes this store refuses (a paused master), for tests.
        pub read_only: bool,
    }

    impl Store for MemStore {
        fn commit(&self, c: &Commit) -> Result<(), String> {
            let writing = c.expiry.is_some() && !self.read_only;
            if let Some((key, model)) = c.pin {
                let mut pins = self.pins.lock().unwrap();
                let id = (c.db, key.to_vec(), model.to_vec());
                match decide(pins.get(&id).copied(), None, c.dims) {
                    Decision::Mismatch(p) => return Err(mismatch_message(p, c.dims)),
                    Decision::Create(d) | Decision::Restore(d) if writing => {
                        pins.insert(id, d);
                    }
                    _ => {}
                }
            }
            if writing {
                let mut e = self.entries.lock().unwrap();
                for (k, v) in &c.entries {
                    e.insert((c.db, k.to_vec()), v.to_vec());
                }
            }
            Ok(())
        }

        fn append(&self, a: &Append) -> Result<Appended, String> {
            if self.read_only {
                return Ok(Appended::Paused);
            }
            let mut streams = self.streams.lock().unwrap();
            let s = streams.entry((a.db, a.stream.to_vec())).or_default();
            for (i, f) in a.frames.iter().enumerate() {
                s.push((entry_id(a.start_ms, a.first + i as u64), f.clone()));
            }
            Ok(Appended::Written)
        }

        fn read(&self, db: i32, keys: &[&[u8]], _touch: bool) -> Vec<Option<Vec<u8>>> {
            let e = self.entries.lock().unwrap();
            keys.iter()
                .map(|k| e.get(&(db, k.to_vec())).cloned())
                .collect()
        }
    }
}
