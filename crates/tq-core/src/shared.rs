//! Process-wide sharing of large seeded matrices (dense Haar rotations, QJL sketches): one copy per
//! key while any user holds it.
//!
//! A [`WeakCache`] maps a key (dimension, seed, kind...) to a weak reference, so a matrix lives as
//! long as its last holder and is built once for all of them: the heads and layers of a KV cache,
//! or the parts of a loaded file, share one. Building happens outside the lock; two threads asking
//! for a missing key at once may both build it, and both get equal matrices (construction is
//! deterministic).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, OnceLock, Weak};

/// A map from keys to weakly held `f32` matrices, usable as a `static`.
pub struct WeakCache<K> {
    map: OnceLock<Mutex<HashMap<K, Weak<[f32]>>>>,
}

impl<K: Hash + Eq + Clone> WeakCache<K> {
    /// An empty cache.
    pub const fn new() -> Self {
        Self {
            map: OnceLock::new(),
        }
    }

    /// The matrix of `key`: the live shared one, else `build()`'s, kept for later callers.
    /// O(1) when live; `build`'s cost otherwise.
    pub fn get_or_build(&self, key: &K, build: impl FnOnce() -> Vec<f32>) -> Arc<[f32]> {
        let map = self.map.get_or_init(|| Mutex::new(HashMap::new()));
        if let Some(m) = map
            .lock()
            .ok()
            .and_then(|m| m.get(key).and_then(Weak::upgrade))
        {
            return m;
        }
        let m: Arc<[f32]> = build().into();
        if let Ok(mut map) = map.lock() {
            map.retain(|_, w| w.strong_count() > 0);
            map.insert(key.clone(), Arc::downgrade(&m));
        }
        m
    }
}

impl<K: Hash + Eq + Clone> Default for WeakCache<K> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_build_while_held_and_freed_with_the_last_holder() {
        static C: WeakCache<u32> = WeakCache::new();
        let mut builds = 0;
        let a = C.get_or_build(&1, || {
            builds += 1;
            vec![1.0; 4]
        });
        let b = C.get_or_build(&1, || {
            builds += 1;
            vec![2.0; 4]
        });
        assert_eq!(builds, 1);
        assert!(Arc::ptr_eq(&a, &b));
        drop((a, b));
        let c = C.get_or_build(&1, || {
            builds += 1;
            vec![3.0; 4]
        });
        assert_eq!((builds, c[0]), (2, 3.0));
    }
}
