//! Single-flight registry: at most one upstream fill per entry key at a time.
//! Later callers join the running fill instead of starting another. Pure and
//! bounded; time is a parameter.
//!
//! A fill holds its key under a lease. Once the lease has passed, a new
//! caller starts a fresh fill; the old one still completes for its own
//! waiters, which is why waiters belong to a fill id and not to a key.

use std::collections::HashMap;
use std::sync::Arc;

#[derive(Debug, PartialEq, Eq)]
pub enum Join {
    /// No live fill: the caller must run fill `id`.
    Start(u64),
    /// A live fill exists: the caller waits for fill `id`.
    Wait(u64),
    /// The registry holds `capacity` fills: fail fast.
    Full,
}

struct Fill<W> {
    key: Vec<u8>,
    started_ms: u64,
    waiters: Vec<W>,
    /// The Redis Stream its chunks go to (LLMCACHE.STREAM).
    stream: Option<Arc<[u8]>>,
    /// Its result is being delivered: nobody may join any more.
    closed: bool,
}

impl<W> Fill<W> {
    fn joinable(&self, now_ms: u64, lease_ms: u64) -> bool {
        !self.closed && now_ms.saturating_sub(self.started_ms) < lease_ms
    }
}

pub struct Registry<W> {
    by_key: HashMap<Vec<u8>, u64>,
    fills: HashMap<u64, Fill<W>>,
    by_stream: HashMap<Arc<[u8]>, u64>,
    next_id: u64,
    capacity: usize,
    lease_ms: u64,
}

impl<W> Registry<W> {
    pub fn new(capacity: usize, lease_ms: u64) -> Self {
        Registry {
            by_key: HashMap::new(),
            fills: HashMap::new(),
            by_stream: HashMap::new(),
            next_id: 1,
            capacity,
            lease_ms,
        }
    }

    pub fn set_limits(&mut self, capacity: usize, lease_ms: u64) {
        self.capacity = capacity;
        self.lease_ms = lease_ms;
    }

    /// Fills running now, including ones whose lease has passed.
    pub fn len(&self) -> usize {
        self.fills.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fills.is_empty()
    }

    /// True when a caller of `key` at `now_ms` would join a running fill.
    pub fn is_live(&self, key: &[u8], now_ms: u64) -> bool {
        self.by_key
            .get(key)
            .and_then(|id| self.fills.get(id))
            .is_some_and(|f| f.joinable(now_ms, self.lease_ms))
    }

    /// The live fill a caller of `key` would join, and its Stream.
    pub fn live(&self, key: &[u8], now_ms: u64) -> Option<(u64, Option<Arc<[u8]>>)> {
        let id = *self.by_key.get(key)?;
        let f = self.fills.get(&id)?;
        f.joinable(now_ms, self.lease_ms)
            .then(|| (id, f.stream.clone()))
    }

    /// Gives fill `id` a Stream; false when the fill is gone or closed.
    pub fn set_stream(&mut self, id: u64, stream: Arc<[u8]>) -> bool {
        match self.fills.get_mut(&id) {
            Some(f) if !f.closed && f.stream.is_none() => {
                f.stream = Some(stream.clone());
                self.by_stream.insert(stream, id);
                true
            }
            _ => false,
        }
    }

    /// True while the fill writing `stream` runs (closed or not).
    pub fn has_stream(&self, stream: &[u8]) -> bool {
        self.by_stream.contains_key(stream)
    }

    /// Stops fill `id` taking joiners and returns its Stream, so the
    /// result can be written there before [`Registry::complete`].
    pub fn close(&mut self, id: u64) -> Option<Arc<[u8]>> {
        let f = self.fills.get_mut(&id)?;
        f.closed = true;
        f.stream.clone()
    }

    /// Adds `waiter` to the live fill for `key`, or starts a new fill.
    pub fn join(&mut self, key: &[u8], now_ms: u64, waiter: W) -> Join {
        if let Some(&id) = self.by_key.get(key) {
            if let Some(fill) = self.fills.get_mut(&id) {
                if fill.joinable(now_ms, self.lease_ms) {
                    fill.waiters.push(waiter);
                    return Join::Wait(id);
                }
            }
        }
        self.open(key, now_ms, vec![waiter])
    }

    /// Starts a fill for `key` with these waiters (none: a Stream's fill,
    /// which nobody waits on yet), replacing any fill that is no longer
    /// joinable as the key's fill.
    pub fn open(&mut self, key: &[u8], now_ms: u64, waiters: Vec<W>) -> Join {
        if self.fills.len() >= self.capacity {
            return Join::Full;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.by_key.insert(key.to_vec(), id);
        self.fills.insert(
            id,
            Fill {
                key: key.to_vec(),
                started_ms: now_ms,
                waiters,
                stream: None,
                closed: false,
            },
        );
        Join::Start(id)
    }

    /// Ends fill `id` and hands back everyone waiting on it. The key is
    /// released unless a newer fill has taken it over.
    pub fn complete(&mut self, id: u64) -> Vec<W> {
        let Some(fill) = self.fills.remove(&id) else {
            return Vec::new();
        };
        if self.by_key.get(&fill.key) == Some(&id) {
            self.by_key.remove(&fill.key);
        }
        if let Some(s) = &fill.stream {
            self.by_stream.remove(s);
        }
        fill.waiters
    }

    /// Ends every fill (module unload): all waiters, for a final reply.
    pub fn drain(&mut self) -> Vec<W> {
        self.by_key.clear();
        self.by_stream.clear();
        self.fills.drain().flat_map(|(_, f)| f.waiters).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_starts_one_fill_and_joins_the_rest() {
        let mut r = Registry::new(10, 1000);
        assert_eq!(r.join(b"k", 0, "a"), Join::Start(1));
        assert_eq!(r.join(b"k", 5, "b"), Join::Wait(1));
        assert_eq!(r.join(b"k", 9, "c"), Join::Wait(1));
        assert_eq!(r.join(b"other", 9, "d"), Join::Start(2));
        assert_eq!(r.complete(1), vec!["a", "b", "c"]);
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn it_tells_who_would_join() {
        let mut r = Registry::new(10, 100);
        assert!(!r.is_live(b"k", 0));
        r.join(b"k", 0, ());
        assert!(r.is_live(b"k", 99));
        assert!(!r.is_live(b"k", 100), "past its lease a fill is not joined");
    }

    #[test]
    fn it_releases_the_key_when_a_fill_completes() {
        let mut r = Registry::new(10, 1000);
        let Join::Start(id) = r.join(b"k", 0, 1) else {
            panic!()
        };
        r.complete(id);
        assert!(matches!(r.join(b"k", 1, 2), Join::Start(_)));
    }

    #[test]
    fn it_lets_a_new_fill_start_after_the_lease() {
        let mut r = Registry::new(10, 100);
        assert_eq!(r.join(b"k", 0, "old"), Join::Start(1));
        assert_eq!(r.join(b"k", 99, "old2"), Join::Wait(1));
        assert_eq!(r.join(b"k", 100, "new"), Join::Start(2));
        assert_eq!(r.join(b"k", 101, "new2"), Join::Wait(2));
        // The stale fill still answers its own waiters and leaves the key alone.
        assert_eq!(r.complete(1), vec!["old", "old2"]);
        assert_eq!(r.join(b"k", 102, "new3"), Join::Wait(2));
        assert_eq!(r.complete(2), vec!["new", "new2", "new3"]);
        assert!(r.is_empty());
    }

    #[test]
    fn a_stream_fill_is_joined_by_key_and_known_by_stream_until_it_completes() {
        let mut r: Registry<&str> = Registry::new(10, 100);
        let Join::Start(id) = r.open(b"k", 0, Vec::new()) else {
            panic!()
        };
        let s: Arc<[u8]> = Arc::from(&b"stream-1"[..]);
        assert!(r.set_stream(id, s.clone()));
        assert!(
            !r.set_stream(id, Arc::from(&b"other"[..])),
            "one Stream per fill"
        );
        assert_eq!(r.live(b"k", 5), Some((id, Some(s.clone()))));
        assert_eq!(r.join(b"k", 5, "fetch"), Join::Wait(id));
        assert!(r.has_stream(b"stream-1"));
        assert_eq!(r.close(id), Some(s));
        assert_eq!(r.live(b"k", 6), None, "a closing fill takes no joiners");
        assert!(r.has_stream(b"stream-1"), "still writing its end");
        assert!(!r.set_stream(id, Arc::from(&b"late"[..])));
        assert_eq!(r.complete(id), vec!["fetch"]);
        assert!(!r.has_stream(b"stream-1"));
        assert_eq!(r.live(b"k", 7), None);
    }

    #[test]
    fn it_is_bounded() {
        let mut r = Registry::new(2, 1000);
        assert!(matches!(r.join(b"a", 0, ()), Join::Start(_)));
        assert!(matches!(r.join(b"b", 0, ()), Join::Start(_)));
        assert_eq!(r.join(b"c", 0, ()), Join::Full);
        // Joining a live fill needs no new slot.
        assert!(matches!(r.join(b"a", 0, ()), Join::Wait(_)));
    }

    #[test]
    fn it_survives_a_clock_going_backwards() {
        let mut r = Registry::new(2, 100);
        assert_eq!(r.join(b"k", 1000, 1), Join::Start(1));
        assert_eq!(r.join(b"k", 10, 2), Join::Wait(1));
    }

    #[test]
    fn it_drains_every_waiter_once() {
        let mut r = Registry::new(10, 100);
        r.join(b"a", 0, 1);
        r.join(b"a", 0, 2);
        r.join(b"b", 0, 3);
        let mut all = r.drain();
        all.sort();
        assert_eq!(all, vec![1, 2, 3]);
        assert!(r.is_empty());
        assert!(r.complete(1).is_empty());
    }
}
