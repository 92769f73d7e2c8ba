//! Where a fill's results go. Production stores into Redis under one hold
//! of the lock; unit tests use [`MemStore`].

use redis_module::ThreadSafeContext;

use crate::fill::pins;
use crate::fill::pipeline::Expiry;
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
}

pub trait Store: Sync {
    /// Err: the results must not be returned (they do not fit the pin).
    /// Writes that this node may not make now are skipped, not errors.
    fn commit(&self, c: &Commit) -> Result<(), String>;
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
        for (i, (key, value)) in c.entries.iter().enumerate() {
            let at = expire_at(now, expiry.ttl_secs, expiry.jitter_pct, JITTER_RNG.next());
            if ffi::set_string_checked(&ctx, key, value, at, check_each).is_err() {
                skip(c.entries.len() - i);
                break;
            }
        }
        Ok(())
    }
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

    #[derive(Default)]
    pub struct MemStore {
        pub entries: Mutex<Entries>,
        pub pins: Mutex<Pins>,
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
    }
}
