//! The per-filter cache of token verdicts (jwt verifications, introspection
//! answers): by the whole token, bounded in size, entries kept while they are live.

use std::collections::HashMap;
use std::sync::Mutex;

/// A cached verdict that lapses (its token expires, or its TTL runs out).
pub(crate) trait Live {
    fn live(&self) -> bool;
}

impl<T: Live> Live for std::sync::Arc<T> {
    fn live(&self) -> bool {
        (**self).live()
    }
}

#[derive(Debug)]
pub(crate) struct TokenCache<V> {
    map: Mutex<HashMap<Box<str>, V, foldhash::fast::RandomState>>,
    capacity: usize,
}

impl<V: Clone + Live> TokenCache<V> {
    /// `capacity` 0 turns caching off.
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            map: Mutex::new(HashMap::default()),
            capacity,
        }
    }

    /// The live verdict for `token`, if any.
    pub(crate) fn get(&self, token: &str) -> Option<V> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.get(token).filter(|v| v.live()).cloned()
    }

    /// Remember a verdict. When full, lapsed entries go first; if none lapsed, all go
    /// (a cache of this kind refills at the cost of one verification per token).
    pub(crate) fn put(&self, token: String, v: V) {
        if self.capacity == 0 {
            return;
        }
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= self.capacity {
            map.retain(|_, v| v.live());
            if map.len() >= self.capacity {
                map.clear();
            }
        }
        map.insert(token.into_boxed_str(), v);
    }
}
