//! Usage metering and quota counters of one proxy, and the embedded store that keeps
//! them across restarts.
//!
//! Both live in memory, process-wide ([`meter`]), so the request path takes one short
//! lock and never does I/O; a flusher (started by the binary) writes what changed to
//! the [`Ledger`] every second and at shutdown. A crash loses at most that second.

mod ledger;
mod period;
mod quota;
mod usage;

pub use ledger::Ledger;
pub use period::{Calendar, Window};
pub use quota::{QuotaBook, Saved, Take};
pub use usage::{CLASSES, Counts, Hour, UsageMeter, class_of};

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{LazyLock, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

/// Usage rows older than this many hours (400 days) are dropped.
pub const USAGE_RETENTION_HOURS: i64 = 400 * 24;

/// The process's quota counters and usage meter, with their store once attached.
#[derive(Debug, Default)]
pub struct Meter {
    pub quota: QuotaBook,
    pub usage: UsageMeter,
    ledger: OnceLock<Ledger>,
    /// Held while pending counts move to the ledger, so a report never sees a count
    /// twice or not at all.
    moving: Mutex<()>,
    pruned_hour: AtomicI64,
}

static METER: LazyLock<Meter> = LazyLock::new(Meter::default);

/// The process-wide meter.
pub fn meter() -> &'static Meter {
    &METER
}

/// Unix seconds now.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl Meter {
    /// Persist into `ledger` from now on, restoring the quota counters it holds.
    pub fn attach(&self, ledger: Ledger, now: i64) -> Result<(), String> {
        let saved = ledger.quota(now)?;
        self.ledger
            .set(ledger)
            .map_err(|_| "the meter already has a store".to_string())?;
        self.quota.restore(saved, now);
        Ok(())
    }

    pub fn persisted(&self) -> bool {
        self.ledger.get().is_some()
    }

    /// Write what changed since the last flush. Without a store this does nothing
    /// (counts stay in memory).
    pub fn flush(&self, now: i64) -> Result<(), String> {
        let Some(ledger) = self.ledger.get() else {
            return Ok(());
        };
        let _moving = self.moving.lock().unwrap_or_else(|e| e.into_inner());
        let quota = self.quota.take_dirty(now);
        let usage = self.usage.take_pending();
        let changed = !quota.is_empty() || !usage.is_empty();
        if changed && let Err(e) = ledger.save(&quota, &usage, now) {
            self.usage.put_back(usage);
            self.quota.restore_dirty(quota);
            return Err(e);
        }
        let hour = now.div_euclid(3600);
        if self.pruned_hour.swap(hour, Ordering::Relaxed) != hour {
            ledger.prune_usage(hour - USAGE_RETENTION_HOURS)?;
        }
        Ok(())
    }

    /// Usage per hour in `[from_hour, to_hour)`: what the store holds plus what is
    /// not written yet.
    pub fn usage(&self, from_hour: i64, to_hour: i64) -> Result<Vec<(Hour, Counts)>, String> {
        let _moving = self.moving.lock().unwrap_or_else(|e| e.into_inner());
        let mut rows = match self.ledger.get() {
            Some(l) => l.usage(from_hour, to_hour)?,
            None => Vec::new(),
        };
        rows.extend(self.usage.pending_in(from_hour, to_hour));
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_restart_keeps_quota_counters_and_usage() {
        let dir = std::env::temp_dir().join(format!("meshgate-meter-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let path = dir.join("state.redb");
        let (alice, orders, window): (Arc<str>, Arc<str>, Arc<str>) =
            ("alice".into(), "orders".into(), "d:x".into());
        let now = 36_000;
        {
            let m = Meter::default();
            m.attach(Ledger::open(&path).unwrap_or_else(|e| panic!("{e}")), now)
                .unwrap_or_else(|e| panic!("{e}"));
            for _ in 0..3 {
                m.quota.take(&alice, &window, 10, now + 100);
                m.usage.record(&alice, &orders, 200, now);
            }
            m.flush(now).unwrap_or_else(|e| panic!("{e}"));
            // One more after the flush: a report still sees it.
            m.usage.record(&alice, &orders, 404, now);
            let rows = m.usage(10, 11).unwrap_or_else(|e| panic!("{e}"));
            let sum = rows.iter().fold([0; 5], |mut acc, (_, c)| {
                acc.iter_mut().zip(c).for_each(|(a, b)| *a += b);
                acc
            });
            assert_eq!(sum, [0, 3, 0, 1, 0]);
            m.flush(now).unwrap_or_else(|e| panic!("{e}"));
        }
        let m = Meter::default();
        m.attach(
            Ledger::open(&path).unwrap_or_else(|e| panic!("{e}")),
            now + 50,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(m.quota.used("alice", "d:x"), 3);
        assert_eq!(
            m.usage(10, 11)
                .map(|r| r.iter().map(|(_, c)| c[1] + c[3]).sum::<u64>()),
            Ok(4)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
