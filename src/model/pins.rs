//! Dimension pins: every vector stored for one (namespace, model) has one
//! size. This is the whole policy; fill/pins.rs only reads and writes it.
//!
//! An upstream answer must first agree with what the request fixes (an
//! explicit DIMENSIONS, `aicache.fixed-dims`, the size `aicache.model-dims`
//! lists for the model). Only then may it be compared with, or create, the pin. A pin the
//! node has seen is also remembered in memory, so a pin hash lost to
//! eviction is restored with its old size rather than re-pinned by
//! whatever size the next answer has.

use std::num::NonZeroUsize;

use lru::LruCache;

/// Published output sizes of OpenAI's models: the default of
/// `aicache.model-dims`, where an admin lists the models in use.
pub const DEFAULT_MODEL_DIMS: &str =
    "text-embedding-3-small=1536,text-embedding-3-large=3072,text-embedding-ada-002=1536";

/// Validates a `model=dims,model=dims` table.
pub fn check_model_dims(table: &str) -> Result<(), String> {
    if table.len() > 4096 {
        return Err("model-dims is longer than 4096 bytes".into());
    }
    for pair in table.split(',').filter(|p| !p.is_empty()) {
        let ok = pair
            .split_once('=')
            .is_some_and(|(m, d)| !m.is_empty() && matches!(d.parse::<usize>(), Ok(1..=65_536)));
        if !ok {
            return Err(format!(
                "model-dims entries are model=dims (dims 1 to 65536), not '{pair}'"
            ));
        }
    }
    Ok(())
}

/// The size `table` lists for `model`.
pub fn known_dims(table: &str, model: &str) -> Option<usize> {
    table
        .split(',')
        .filter_map(|p| p.split_once('='))
        .find(|(m, _)| *m == model)
        .and_then(|(_, d)| d.parse().ok())
}

/// The size the request itself fixes, if any: DIMENSIONS, else fixed-dims,
/// else the model's listed size.
pub fn expected_dims(
    known: Option<usize>,
    dimensions: Option<usize>,
    fixed: usize,
) -> Option<usize> {
    dimensions.or((fixed != 0).then_some(fixed)).or(known)
}

/// Checks an answer's size against what the request fixes.
pub fn check_answer(
    known: Option<usize>,
    dimensions: Option<usize>,
    fixed: usize,
    got: usize,
) -> Result<(), String> {
    match expected_dims(known, dimensions, fixed) {
        Some(want) if want != got => {
            let why = if dimensions.is_some() {
                "DIMENSIONS"
            } else if fixed != 0 {
                "aicache.fixed-dims"
            } else {
                "the model's published size (aicache.model-dims)"
            };
            Err(format!(
                "upstream returned {got}-dimension vectors, {why} is {want}"
            ))
        }
        _ => Ok(()),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The pin exists and matches.
    Matches,
    /// No pin anywhere: write one with this size.
    Create(usize),
    /// The pin hash is gone but this node remembers it: write it back.
    Restore(usize),
    /// The vectors do not fit the pin of this size.
    Mismatch(usize),
}

/// Decides what a vector of `dims` means for a (namespace, model) whose pin
/// hash holds `stored` and whose remembered pin is `remembered`.
pub fn decide(stored: Option<usize>, remembered: Option<usize>, dims: usize) -> Decision {
    match (stored, remembered) {
        (Some(p), _) if p == dims => Decision::Matches,
        (Some(p), _) => Decision::Mismatch(p),
        (None, Some(p)) if p == dims => Decision::Restore(p),
        (None, Some(p)) => Decision::Mismatch(p),
        (None, None) => Decision::Create(dims),
    }
}

pub fn mismatch_message(pinned: usize, got: usize) -> String {
    format!(
        "ERR dimension mismatch: this namespace stores {pinned}-dimension vectors for this \
         model, got {got} (EMBCACHE.DIMS ns model RESET removes the pin)"
    )
}

/// (db, pin hash key, model) -> size, least recently used dropped first.
pub struct PinMemory {
    pins: LruCache<(i32, Vec<u8>, Vec<u8>), usize>,
}

impl PinMemory {
    pub fn new(capacity: usize) -> Self {
        PinMemory {
            pins: LruCache::new(NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN)),
        }
    }

    pub fn get(&mut self, db: i32, key: &[u8], model: &[u8]) -> Option<usize> {
        self.pins.get(&(db, key.to_vec(), model.to_vec())).copied()
    }

    pub fn remember(&mut self, db: i32, key: &[u8], model: &[u8], dims: usize) {
        self.pins.put((db, key.to_vec(), model.to_vec()), dims);
    }

    pub fn forget(&mut self, db: i32, key: &[u8], model: &[u8]) {
        self.pins.pop(&(db, key.to_vec(), model.to_vec()));
    }

    /// FLUSHDB / FLUSHALL (`db` None) / SWAPDB: the hashes are gone or moved.
    pub fn forget_db(&mut self, db: Option<i32>) {
        match db {
            None => self.pins.clear(),
            Some(d) => {
                let gone: Vec<_> = self
                    .pins
                    .iter()
                    .filter(|((k, _, _), _)| *k == d)
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in gone {
                    self.pins.pop(&k);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_fixes_the_size_first() {
        let small = known_dims(DEFAULT_MODEL_DIMS, "text-embedding-3-small");
        assert_eq!(small, Some(1536));
        assert_eq!(expected_dims(None, Some(256), 512), Some(256));
        assert_eq!(expected_dims(None, None, 512), Some(512));
        assert_eq!(expected_dims(small, None, 0), Some(1536));
        assert_eq!(expected_dims(small, Some(256), 0), Some(256));
        assert_eq!(known_dims(DEFAULT_MODEL_DIMS, "my-model"), None);
        assert_eq!(known_dims("a=1,my-model=8", "my-model"), Some(8));
    }

    #[test]
    fn a_short_answer_for_a_known_model_is_refused() {
        let e = check_answer(Some(1536), None, 0, 1535).unwrap_err();
        assert!(e.contains("(aicache.model-dims) is 1536"), "{e}");
        assert!(check_answer(None, Some(8), 0, 7)
            .unwrap_err()
            .contains("DIMENSIONS is 8"));
        assert!(check_answer(None, None, 8, 7)
            .unwrap_err()
            .contains("fixed-dims is 8"));
        assert!(check_answer(None, None, 0, 7).is_ok());
    }

    #[test]
    fn model_dims_tables_are_validated() {
        assert!(check_model_dims(DEFAULT_MODEL_DIMS).is_ok());
        assert!(check_model_dims("").is_ok());
        for bad in ["m", "m=", "=8", "m=0", "m=65537", "m=x", "a=1,b"] {
            assert!(check_model_dims(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pins_are_created_matched_restored_or_refused() {
        assert_eq!(decide(None, None, 8), Decision::Create(8));
        assert_eq!(decide(Some(8), None, 8), Decision::Matches);
        assert_eq!(decide(Some(8), Some(8), 7), Decision::Mismatch(8));
        // The hash was evicted: the remembered size comes back, a wrong
        // answer cannot take its place.
        assert_eq!(decide(None, Some(8), 8), Decision::Restore(8));
        assert_eq!(decide(None, Some(8), 7), Decision::Mismatch(8));
    }

    #[test]
    fn memory_is_per_db_and_bounded() {
        let mut m = PinMemory::new(2);
        m.remember(0, b"k", b"m", 8);
        m.remember(1, b"k", b"m", 16);
        assert_eq!(m.get(0, b"k", b"m"), Some(8));
        m.forget_db(Some(0));
        assert_eq!(m.get(0, b"k", b"m"), None);
        assert_eq!(m.get(1, b"k", b"m"), Some(16));
        m.remember(2, b"a", b"m", 1);
        m.remember(3, b"b", b"m", 1);
        assert_eq!(m.get(1, b"k", b"m"), None, "least recently used goes first");
        m.forget_db(None);
        assert_eq!(m.get(3, b"b", b"m"), None);
    }
}
