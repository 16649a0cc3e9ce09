//! Text keys to dense indexes, for joins made in memory.
//!
//! The start's narrow read ([`super::Tx::map_rows`]) joins a million session addresses to
//! their sessions and users. Row by row, by SQL join or by hash, that is a few cache misses a
//! row (a search of a million keys), most of a restart's main-thread CPU. But the tables are
//! mostly written in step (a session's addresses right after it, a user's first session
//! soon after the user), so a scan of one meets the keys of the other in nearly the order
//! they were read: each key is first compared with the one after the last found, in step
//! with memory, and only searched for by hash when that misses. The keys live in one arena:
//! a million short keys cost a few allocations, not a million.

use std::hash::BuildHasher as _;

use hashbrown::HashTable;

/// Keys, each given the next index when first added.
#[derive(Default)]
pub struct Keys {
    arena: String,
    /// Where key `i` lies in `arena`.
    spans: Vec<(usize, usize)>,
    /// Indexes into `spans`, found by the key's hash: the first `hashed` keys, the others
    /// hashed when a search first needs them.
    table: HashTable<u32>,
    hashed: usize,
    state: foldhash::fast::RandomState,
}

impl Keys {
    /// Room for `n` keys of about `bytes` bytes each.
    pub fn with_capacity(n: usize, bytes: usize) -> Keys {
        Keys {
            arena: String::with_capacity(n.saturating_mul(bytes)),
            spans: Vec::with_capacity(n),
            ..Default::default()
        }
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// The key of index `i`.
    pub fn key(&self, i: u32) -> &str {
        let (from, to) = self.spans[i as usize];
        &self.arena[from..to]
    }

    /// Adds `key` as a new one, unsearched for: for a column whose values are distinct (a
    /// table's key). Were one repeated, [`Keys::find`] would give either index.
    pub fn push(&mut self, key: &str) -> u32 {
        // More than u32::MAX keys cannot come from one registry (the maps' indexes are u32
        // too); saturating would alias two keys, so this is a bug worth stopping at.
        let i = u32::try_from(self.spans.len()).expect("fewer than 2^32 keys");
        let from = self.arena.len();
        self.arena.push_str(key);
        self.spans.push((from, self.arena.len()));
        i
    }

    /// The index of `key`, if it was added: `near` (the index found last) and the one after
    /// it are compared first.
    pub fn find(&mut self, key: &str, near: Option<u32>) -> Option<u32> {
        self.near(key, near).or_else(|| self.search(key))
    }

    /// `near` or the index after it, if that is `key`'s; no search.
    pub fn near(&self, key: &str, near: Option<u32>) -> Option<u32> {
        let n = near?;
        [n, n.wrapping_add(1)]
            .into_iter()
            .find(|&i| (i as usize) < self.len() && self.key(i) == key)
    }

    /// The index of `key` by its hash.
    fn search(&mut self, key: &str) -> Option<u32> {
        self.hash_all();
        let h = self.state.hash_one(key);
        self.table.find(h, |&i| self.key(i) == key).copied()
    }

    fn hash_all(&mut self) {
        let Keys {
            arena,
            spans,
            table,
            hashed,
            state,
        } = self;
        let at = |i: u32| {
            let (from, to) = spans[i as usize];
            &arena[from..to]
        };
        if spans.len() > table.capacity() {
            // Room for as many as the arena was sized for: no rehash while a read interns.
            let want = spans.capacity().max(spans.len()) - table.len();
            table.reserve(want, |&j| state.hash_one(at(j)));
        }
        while *hashed < spans.len() {
            let i = *hashed as u32;
            table.insert_unique(state.hash_one(at(i)), i, |&j| state.hash_one(at(j)));
            *hashed += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_told_apart_and_found_again() {
        let mut k = Keys::with_capacity(2, 4);
        let names: Vec<String> = (0..10_000).map(|i| format!("u{i}")).collect();
        for (i, n) in names.iter().enumerate() {
            assert_eq!(k.push(n), i as u32);
        }
        for (i, n) in names.iter().enumerate() {
            assert_eq!(k.find(n, None), Some(i as u32));
            assert_eq!(k.key(i as u32), n);
        }
        // Prefixes of each other, the empty key; hints that miss, wrap or run past the end.
        assert_eq!(k.find("u10000", None), None);
        assert_eq!(k.find("u", Some(3)), None);
        assert_eq!(k.push(""), 10_000);
        assert_eq!(k.find("", Some(9_999)), Some(10_000));
        assert_eq!(k.find("u7", Some(u32::MAX)), Some(7));
        assert_eq!(k.find("u0", Some(u32::MAX)), Some(0));
        // Keys pushed after a search are searched for too.
        assert_eq!(k.push("p0"), 10_001);
        assert_eq!(k.push("p1"), 10_002);
        assert_eq!(k.find("p0", None), Some(10_001));
        assert_eq!(k.find("p1", Some(3)), Some(10_002));
        // `near` looks at the hint and the index after it, nothing else.
        assert_eq!(k.near("p1", Some(10_001)), Some(10_002));
        assert_eq!(k.near("p1", Some(10_002)), Some(10_002));
        assert_eq!(k.near("p0", Some(10_002)), None);
        assert_eq!(k.near("p0", None), None);
        assert_eq!(k.near("zz", Some(10_002)), None);
    }
}
