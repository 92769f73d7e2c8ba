//! Dimension pins in Redis: a hash per namespace (model -> size), and this
//! node's memory of them (model/pins.rs has the policy). Used by
//! EMBCACHE.SET/MSET/DIMS on the main thread and by fills under the lock.

use std::sync::{LazyLock, Mutex, MutexGuard};

use redis_module::Context;

use crate::model::pins::{decide, mismatch_message, Decision, PinMemory};
use crate::redis::ffi;

static MEMORY: LazyLock<Mutex<PinMemory>> = LazyLock::new(|| Mutex::new(PinMemory::new(16_384)));

fn memory() -> MutexGuard<'static, PinMemory> {
    MEMORY.lock().unwrap_or_else(|e| e.into_inner())
}

/// The pin stored in Redis, if any.
pub fn read(ctx: &Context, key: &[u8], model: &[u8]) -> Result<Option<usize>, String> {
    ffi::call(ctx, "HGET", &[key, model], false, ffi::reply_as_u64)
        .map(|p| p.map(|p| p as usize))
        .map_err(|e| format!("ERR cannot read the dimension pin: {e}"))
}

/// Checks `dims` against the pin of (`key`, `model`) in `db`, the DB `ctx`
/// has selected, and writes the pin when `writing` and it is new or was
/// lost. Err when the vectors do not fit.
pub fn check(
    ctx: &Context,
    db: i32,
    key: &[u8],
    model: &[u8],
    dims: usize,
    writing: bool,
) -> Result<(), String> {
    let stored = read(ctx, key, model)?;
    let remembered = memory().get(db, key, model);
    match decide(stored, remembered, dims) {
        Decision::Mismatch(p) => Err(mismatch_message(p, dims)),
        Decision::Matches => {
            memory().remember(db, key, model, dims);
            Ok(())
        }
        Decision::Create(d) | Decision::Restore(d) => {
            if writing {
                let d_text = d.to_string();
                let args: [&[u8]; 3] = [key, model, d_text.as_bytes()];
                if ffi::call(ctx, "HSET", &args, true, |_| ()).is_ok() {
                    memory().remember(db, key, model, d);
                }
            }
            Ok(())
        }
    }
}

/// EMBCACHE.DIMS ... RESET: removes the pin and this node's memory of it.
pub fn reset(ctx: &Context, db: i32, key: &[u8], model: &[u8]) -> Result<i64, String> {
    memory().forget(db, key, model);
    ffi::call(ctx, "HDEL", &[key, model], true, ffi::reply_as_i64)
        .map_err(|e| format!("ERR cannot remove the dimension pin: {e}"))
}

/// FLUSHDB, FLUSHALL (None), SWAPDB and role changes: the hashes are gone,
/// moved, or were changed by another master.
pub fn forget_db(db: Option<i32>) {
    memory().forget_db(db);
}
