//! The optional "upstream failing" memory: after a fill fails, identical
//! calls fail fast for a short while instead of queueing behind a broken
//! upstream. Bounded (least recently used entries go first); pure, with
//! time as a parameter.

use std::num::NonZeroUsize;
use std::sync::Arc;

use lru::LruCache;

/// A failure: until when, its message, and whether only this entry's own
/// input was refused (so only this entry fails, not the calls holding it).
type Remembered = (u64, Arc<str>, bool);

pub struct FailMemory {
    entries: LruCache<Vec<u8>, Remembered>,
}

impl FailMemory {
    pub fn new(capacity: usize) -> Self {
        FailMemory {
            entries: LruCache::new(NonZeroUsize::new(capacity.max(1)).unwrap_or(NonZeroUsize::MIN)),
        }
    }

    /// Remembers that `key` failed with `msg` until `now_ms + for_ms`.
    pub fn remember(
        &mut self,
        key: &[u8],
        now_ms: u64,
        for_ms: u64,
        msg: Arc<str>,
        per_input: bool,
    ) {
        if for_ms > 0 {
            self.entries.put(
                key.to_vec(),
                (now_ms.saturating_add(for_ms), msg, per_input),
            );
        }
    }

    /// The remembered failure of `key`, if it has not expired.
    pub fn check(&mut self, key: &[u8], now_ms: u64) -> Option<(Arc<str>, bool)> {
        match self.entries.get(key) {
            Some((until, msg, per_input)) if now_ms < *until => Some((msg.clone(), *per_input)),
            Some(_) => {
                self.entries.pop(key);
                None
            }
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_fails_fast_until_the_memory_expires() {
        let mut m = FailMemory::new(10);
        m.remember(b"k", 1000, 500, Arc::from("ERR boom"), false);
        m.remember(b"one", 1000, 500, Arc::from("ERR too long"), true);
        assert_eq!(m.check(b"k", 1000), Some((Arc::from("ERR boom"), false)));
        assert_eq!(m.check(b"k", 1499), Some((Arc::from("ERR boom"), false)));
        assert_eq!(
            m.check(b"one", 1000),
            Some((Arc::from("ERR too long"), true))
        );
        assert_eq!(m.check(b"k", 1500), None);
        assert_eq!(m.check(b"other", 1000), None);
    }

    #[test]
    fn zero_means_off() {
        let mut m = FailMemory::new(10);
        m.remember(b"k", 0, 0, Arc::from("ERR"), false);
        assert_eq!(m.check(b"k", 0), None);
    }

    #[test]
    fn it_is_bounded() {
        let mut m = FailMemory::new(2);
        for k in [b"a", b"b", b"c"] {
            m.remember(k, 0, 100, Arc::from("ERR"), false);
        }
        assert_eq!(m.check(b"a", 1), None, "the oldest entry must be evicted");
        assert!(m.check(b"b", 1).is_some() && m.check(b"c", 1).is_some());
    }
}
