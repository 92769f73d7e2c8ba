//! The in-memory semantic index: derived data, rebuilt from the sidecars
//! in Redis, never the source of truth. Each (DB, context, size) is a
//! partition of its own, so a search can only ever return entries of the
//! caller's context, and one odd-sized vector cannot block the others. It holds one sign bit per dimension per entry (192 bytes at
//! 1536 dims), enough to shortlist candidates; their exact scores come
//! from the sidecars themselves. Pure: no Redis types, no clock.

use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;

use crate::model::semantic::{hamming, sign_code, usable};

/// What identifies a sidecar's partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub context: [u8; 32],
    pub nsid: [u8; 16],
    pub generation: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Inserted {
    Added,
    Replaced,
    /// The index holds its maximum; the entry is not searchable.
    Full,
    /// A zero or non-finite vector.
    Unusable,
}

struct Part {
    nsid: [u8; 16],
    generation: u64,
    keys: Vec<Arc<[u8]>>,
    /// `words` u64s per entry, in `keys` order.
    codes: Vec<u64>,
    words: usize,
}

/// A partition: DB, context, dimensions.
type PartKey = (i32, [u8; 32], usize);

/// Where an entry is: its partition and its position there.
#[derive(Clone, Copy)]
struct Slot {
    part: PartKey,
    pos: usize,
}

#[derive(Default)]
pub struct Index {
    parts: HashMap<PartKey, Part>,
    slots: HashMap<i32, HashMap<Arc<[u8]>, Slot>>,
    len: usize,
    bytes: usize,
}

impl Index {
    pub fn new() -> Self {
        Index::default()
    }

    /// Entries searchable now.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn contexts(&self) -> usize {
        self.parts.len()
    }

    /// Approximate heap bytes held for the entries.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Indexes (or re-indexes) sidecar `key` of `db`.
    pub fn insert(
        &mut self,
        db: i32,
        key: &[u8],
        head: Head,
        vector: &[f32],
        max: usize,
    ) -> Inserted {
        if !usable(vector) {
            self.remove(db, key);
            return Inserted::Unusable;
        }
        let replaced = self.remove(db, key);
        if self.len >= max {
            return Inserted::Full;
        }
        let pk = (db, head.context, vector.len());
        let part = self.parts.entry(pk).or_insert_with(|| Part {
            nsid: head.nsid,
            generation: head.generation,
            keys: Vec::new(),
            codes: Vec::new(),
            words: vector.len().div_ceil(64),
        });
        let key: Arc<[u8]> = Arc::from(key);
        part.codes.extend(sign_code(vector));
        part.keys.push(key.clone());
        let slot = Slot {
            part: pk,
            pos: part.keys.len() - 1,
        };
        self.bytes += entry_bytes(&key, part.words);
        self.slots.entry(db).or_default().insert(key, slot);
        self.len += 1;
        if replaced {
            Inserted::Replaced
        } else {
            Inserted::Added
        }
    }

    /// Drops sidecar `key` of `db`; false when it was not indexed.
    pub fn remove(&mut self, db: i32, key: &[u8]) -> bool {
        let Some(slots) = self.slots.get_mut(&db) else {
            return false;
        };
        let Some(slot) = slots.remove(key) else {
            return false;
        };
        let pk = slot.part;
        let mut emptied = false;
        if let Some(part) = self.parts.get_mut(&pk) {
            let (w, last) = (part.words, part.keys.len() - 1);
            self.bytes = self.bytes.saturating_sub(entry_bytes(key, w));
            part.keys.swap_remove(slot.pos);
            if slot.pos != last {
                let (from, to) = (last * w, slot.pos * w);
                part.codes.copy_within(from..from + w, to);
                if let Some(moved) = slots.get_mut(&part.keys[slot.pos]) {
                    moved.pos = slot.pos;
                }
            }
            part.codes.truncate(last * w);
            emptied = part.keys.is_empty();
        }
        if emptied {
            self.parts.remove(&pk);
        }
        self.len -= 1;
        true
    }

    /// FLUSHDB (`Some(db)`) or FLUSHALL (`None`).
    pub fn clear(&mut self, db: Option<i32>) {
        match db {
            None => *self = Index::default(),
            Some(db) => {
                let keys: Vec<Arc<[u8]>> = self
                    .slots
                    .get(&db)
                    .map(|s| s.keys().cloned().collect())
                    .unwrap_or_default();
                for k in keys {
                    self.remove(db, &k);
                }
            }
        }
    }

    /// After a namespace flush: drops its partitions older than `current`.
    pub fn forget(&mut self, db: i32, nsid: [u8; 16], current: u64) -> usize {
        let stale: Vec<Arc<[u8]>> = self
            .parts
            .iter()
            .filter(|((d, _, _), p)| *d == db && p.nsid == nsid && p.generation < current)
            .flat_map(|(_, p)| p.keys.iter().cloned())
            .collect();
        for k in &stale {
            self.remove(db, k);
        }
        stale.len()
    }

    /// Up to `n` sidecar keys of the context nearest `query` by sign
    /// agreement (all of them when the context holds no more than `n`).
    pub fn shortlist(
        &self,
        db: i32,
        context: &[u8; 32],
        query: &[f32],
        n: usize,
    ) -> Vec<Arc<[u8]>> {
        let Some(part) = self.parts.get(&(db, *context, query.len())) else {
            return Vec::new();
        };
        if n == 0 {
            return Vec::new();
        }
        if part.keys.len() <= n {
            return part.keys.clone();
        }
        let q = sign_code(query);
        // The n nearest so far, farthest on top: most entries cost one
        // compare, and nothing is allocated per entry.
        let mut near: BinaryHeap<(u32, u32)> = BinaryHeap::with_capacity(n + 1);
        for (i, c) in part.codes.chunks_exact(part.words).enumerate() {
            let d = hamming(&q, c);
            if near.len() < n {
                near.push((d, i as u32));
            } else if near.peek().is_some_and(|&(far, _)| d < far) {
                near.pop();
                near.push((d, i as u32));
            }
        }
        near.into_iter()
            .map(|(_, i)| part.keys[i as usize].clone())
            .collect()
    }
}

fn entry_bytes(key: &[u8], words: usize) -> usize {
    // The key (shared by two maps), its code, and the map slots.
    key.len() + words * 8 + 96
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(c: u8) -> Head {
        Head {
            context: [c; 32],
            nsid: [1; 16],
            generation: 0,
        }
    }

    fn unit(i: usize, dims: usize) -> Vec<f32> {
        // Deterministic, spread signs.
        (0..dims)
            .map(|d| if (d * 7 + i * 13) % 5 < 2 { -1.0 } else { 1.0 })
            .collect()
    }

    #[test]
    fn partitions_never_mix_contexts_or_dbs() {
        let mut x = Index::new();
        assert_eq!(x.insert(0, b"a", head(1), &[1.0, 0.0], 10), Inserted::Added);
        assert_eq!(x.insert(0, b"b", head(2), &[1.0, 0.0], 10), Inserted::Added);
        assert_eq!(x.insert(1, b"c", head(1), &[1.0, 0.0], 10), Inserted::Added);
        let keys = |db, c| x.shortlist(db, &[c; 32], &[1.0, 0.0], 8);
        assert_eq!(keys(0, 1), vec![Arc::from(&b"a"[..])]);
        assert_eq!(keys(0, 2), vec![Arc::from(&b"b"[..])]);
        assert_eq!(keys(1, 1), vec![Arc::from(&b"c"[..])]);
        assert!(keys(1, 2).is_empty());
        assert!(x.shortlist(0, &[1; 32], &[1.0, 0.0, 0.0], 8).is_empty());
        assert_eq!((x.len(), x.contexts()), (3, 3));
    }

    #[test]
    fn remove_keeps_the_rest_findable_and_frees_empty_partitions() {
        let mut x = Index::new();
        for i in 0..50u8 {
            x.insert(0, &[i], head(1), &unit(i as usize, 100), 1000);
        }
        for i in (0..50u8).step_by(3) {
            assert!(x.remove(0, &[i]));
            assert!(!x.remove(0, &[i]));
        }
        let mut left: Vec<Vec<u8>> = x
            .shortlist(0, &[1; 32], &unit(0, 100), 1000)
            .iter()
            .map(|k| k.to_vec())
            .collect();
        left.sort();
        let want: Vec<Vec<u8>> = (0..50u8).filter(|i| i % 3 != 0).map(|i| vec![i]).collect();
        assert_eq!(left, want);
        // Every survivor's code moved with it: each finds itself first.
        for i in want {
            let v = unit(i[0] as usize, 100);
            let near = x.shortlist(0, &[1; 32], &v, 1);
            let code = sign_code(&v);
            let best = sign_code(&unit(near[0][0] as usize, 100));
            assert_eq!(hamming(&code, &best), 0, "{i:?}");
        }
        for i in 0..50u8 {
            x.remove(0, &[i]);
        }
        assert_eq!((x.len(), x.contexts(), x.bytes()), (0, 0, 0));
    }

    #[test]
    fn the_shortlist_holds_the_nearest_by_sign() {
        let mut x = Index::new();
        let q: Vec<f32> = (0..128)
            .map(|d| if d % 2 == 0 { 1.0 } else { -1.0 })
            .collect();
        for i in 0..200usize {
            let mut v = q.clone();
            // Entry i differs from the query in i signs.
            for d in v.iter_mut().take(i.min(128)) {
                *d = -*d;
            }
            x.insert(0, &(i as u32).to_be_bytes(), head(1), &v, 1000);
        }
        let mut got: Vec<u32> = x
            .shortlist(0, &[1; 32], &q, 5)
            .iter()
            .map(|k| u32::from_be_bytes([k[0], k[1], k[2], k[3]]))
            .collect();
        got.sort();
        assert_eq!(got, vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn bounds_replacement_bad_vectors_flushes() {
        let mut x = Index::new();
        assert_eq!(x.insert(0, b"a", head(1), &[1.0], 2), Inserted::Added);
        assert_eq!(x.insert(0, b"a", head(1), &[-1.0], 2), Inserted::Replaced);
        assert_eq!(x.insert(0, b"b", head(1), &[1.0], 2), Inserted::Added);
        assert_eq!(x.insert(0, b"c", head(1), &[1.0], 2), Inserted::Full);
        assert_eq!(x.insert(0, b"d", head(1), &[0.0], 9), Inserted::Unusable);
        assert_eq!(
            x.insert(0, b"e", head(1), &[f32::NAN], 9),
            Inserted::Unusable
        );
        assert_eq!(x.len(), 2);
        // Another size is a partition of its own: both stay searchable.
        assert_eq!(x.insert(0, b"f", head(1), &[1.0, 1.0], 9), Inserted::Added);
        assert_eq!(x.shortlist(0, &[1; 32], &[1.0, 1.0], 9).len(), 1);
        assert_eq!(x.shortlist(0, &[1; 32], &[1.0], 9).len(), 2);
        x.remove(0, b"f");
        x.insert(1, b"z", head(1), &[1.0], 9);
        x.clear(Some(0));
        assert_eq!(x.len(), 1);
        x.clear(None);
        assert!(x.is_empty());
    }

    #[test]
    fn forget_drops_only_older_generations_of_that_namespace() {
        let mut x = Index::new();
        let h = |c: u8, ns: u8, g: u64| Head {
            context: [c; 32],
            nsid: [ns; 16],
            generation: g,
        };
        x.insert(0, b"old", h(1, 1, 0), &[1.0], 9);
        x.insert(0, b"new", h(2, 1, 1), &[1.0], 9);
        x.insert(0, b"other", h(3, 2, 0), &[1.0], 9);
        x.insert(1, b"otherdb", h(1, 1, 0), &[1.0], 9);
        assert_eq!(x.forget(0, [1; 16], 1), 1);
        assert_eq!(x.len(), 3);
        assert!(x.shortlist(0, &[1; 32], &[1.0], 9).is_empty());
    }
}
