//! Quota counters of this proxy: requests used per Consumer per calendar window.
//! Authoritative in memory; the ledger persists them (see [`crate::Meter::flush`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

const SHARDS: usize = 8;

/// A Consumer's counter in one window.
type Key = (Arc<str>, Arc<str>);

#[derive(Debug, Clone, Copy)]
struct Slot {
    used: u64,
    /// The window's end (Unix seconds): the slot is dropped after it.
    end: i64,
    dirty: bool,
}

/// What taking one request from a quota found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// Counted; `used` includes this request.
    Admitted { used: u64 },
    /// Not counted: `used` already reached the limit.
    Exceeded { used: u64 },
}

/// One persisted counter: Consumer, window key, used, window end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saved {
    pub consumer: String,
    pub window: String,
    pub used: u64,
    pub end: i64,
}

#[derive(Debug)]
pub struct QuotaBook {
    shards: Vec<Mutex<HashMap<Key, Slot>>>,
    hasher: foldhash::fast::RandomState,
}

impl Default for QuotaBook {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }
}

impl QuotaBook {
    fn shard(&self, consumer: &str) -> &Mutex<HashMap<Key, Slot>> {
        use std::hash::BuildHasher;
        &self.shards[(self.hasher.hash_one(consumer) as usize) % SHARDS]
    }

    /// Count one request of `consumer` in `window` (ending at `end`) unless `limit`
    /// is already used up.
    pub fn take(&self, consumer: &Arc<str>, window: &Arc<str>, limit: u64, end: i64) -> Take {
        let mut map = self
            .shard(consumer)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let slot = map
            .entry((consumer.clone(), window.clone()))
            .or_insert(Slot {
                used: 0,
                end,
                dirty: false,
            });
        if slot.used >= limit {
            return Take::Exceeded { used: slot.used };
        }
        slot.used += 1;
        slot.dirty = true;
        Take::Admitted { used: slot.used }
    }

    /// Requests `consumer` used in `window` so far.
    pub fn used(&self, consumer: &str, window: &str) -> u64 {
        let map = self
            .shard(consumer)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        map.get(&(consumer.into(), window.into()))
            .map_or(0, |s| s.used)
    }

    /// Counters changed since the last call (marked clean), and ended windows dropped.
    pub fn take_dirty(&self, now: i64) -> Vec<Saved> {
        let mut out = Vec::new();
        for shard in &self.shards {
            let mut map = shard.lock().unwrap_or_else(|e| e.into_inner());
            map.retain(|_, s| s.end > now);
            for ((c, w), s) in map.iter_mut().filter(|(_, s)| s.dirty) {
                s.dirty = false;
                out.push(Saved {
                    consumer: c.to_string(),
                    window: w.to_string(),
                    used: s.used,
                    end: s.end,
                });
            }
        }
        out
    }

    /// Mark counters whose write failed as changed again, so the next flush retries.
    pub fn restore_dirty(&self, failed: Vec<Saved>) {
        for s in failed {
            let mut map = self
                .shard(&s.consumer)
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(slot) = map.get_mut(&(s.consumer.as_str().into(), s.window.as_str().into()))
            {
                slot.dirty = true;
            }
        }
    }

    /// Put back counters saved before a restart; a counter already counted here since
    /// start-up keeps the larger value (requests are never forgotten twice).
    pub fn restore(&self, saved: Vec<Saved>, now: i64) {
        for s in saved.into_iter().filter(|s| s.end > now) {
            let mut map = self
                .shard(&s.consumer)
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let slot = map
                .entry((s.consumer.as_str().into(), s.window.as_str().into()))
                .or_insert(Slot {
                    used: 0,
                    end: s.end,
                    dirty: false,
                });
            slot.used = slot.used.max(s.used);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quota_admits_exactly_its_limit_per_window() {
        let book = QuotaBook::default();
        let (alice, bob): (Arc<str>, Arc<str>) = ("alice".into(), "bob".into());
        let (today, tomorrow): (Arc<str>, Arc<str>) = ("d:1".into(), "d:2".into());
        let admitted = (0..5)
            .filter(|_| matches!(book.take(&alice, &today, 3, 100), Take::Admitted { .. }))
            .count();
        assert_eq!(admitted, 3);
        assert_eq!(
            book.take(&alice, &today, 3, 100),
            Take::Exceeded { used: 3 }
        );
        // Another Consumer, and the next window, start from zero.
        assert_eq!(book.take(&bob, &today, 3, 100), Take::Admitted { used: 1 });
        assert_eq!(
            book.take(&alice, &tomorrow, 3, 200),
            Take::Admitted { used: 1 }
        );
        // A raised limit admits again at once.
        assert_eq!(
            book.take(&alice, &today, 4, 100),
            Take::Admitted { used: 4 }
        );
    }

    #[test]
    fn dirty_counters_are_handed_out_once_and_ended_windows_dropped() {
        let book = QuotaBook::default();
        let (alice, w1, w2): (Arc<str>, Arc<str>, Arc<str>) =
            ("alice".into(), "d:1".into(), "d:2".into());
        book.take(&alice, &w1, 10, 100);
        book.take(&alice, &w2, 10, 200);
        let mut first = book.take_dirty(50);
        first.sort_by(|a, b| a.window.cmp(&b.window));
        assert_eq!(first.iter().map(|s| s.used).collect::<Vec<_>>(), [1, 1]);
        assert!(book.take_dirty(50).is_empty());
        // At 150 the first window is over: it goes, the second is untouched.
        book.take(&alice, &w2, 10, 200);
        let second = book.take_dirty(150);
        assert_eq!(second.len(), 1);
        assert_eq!((second[0].window.as_str(), second[0].used), ("d:2", 2));
        assert_eq!(book.used("alice", "d:1"), 0);
    }

    #[test]
    fn restored_counters_continue_and_never_go_back() {
        let book = QuotaBook::default();
        let (alice, w): (Arc<str>, Arc<str>) = ("alice".into(), "d:1".into());
        book.take(&alice, &w, 10, 100);
        let saved = |used, end| Saved {
            consumer: "alice".into(),
            window: "d:1".into(),
            used,
            end,
        };
        book.restore(vec![saved(7, 100), saved(9, 40)], 50);
        assert_eq!(book.used("alice", "d:1"), 7);
        assert_eq!(book.take(&alice, &w, 8, 100), Take::Admitted { used: 8 });
        book.restore(vec![saved(2, 100)], 50);
        assert_eq!(book.used("alice", "d:1"), 8);
    }
}
