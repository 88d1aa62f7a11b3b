//! The embedded store (one redb file): quota counters of open windows and hourly
//! usage rows, so a restart neither resets quotas nor loses what billing reads.

use crate::quota::Saved;
use crate::usage::{Counts, Hour};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::collections::HashMap;
use std::path::Path;

/// (Consumer, window key) → (requests used, window end in Unix seconds).
const QUOTA: TableDefinition<(&str, &str), (u64, i64)> = TableDefinition::new("quota");
/// (hour since the epoch, Consumer, Api) → counts per status class.
const USAGE: TableDefinition<(i64, &str, &str), [u64; 5]> = TableDefinition::new("usage_hourly");

#[derive(Debug)]
pub struct Ledger {
    db: Database,
}

fn text(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl Ledger {
    /// Open (or create) the store at `path`. Only one process may hold it.
    pub fn open(path: &Path) -> Result<Self, String> {
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => format!(
                "{} is in use by another meshgate process (give each gateway its own --state-dir)",
                path.display()
            ),
            e => format!("cannot open {}: {e}", path.display()),
        })?;
        Self::init(db)
    }

    /// A store that lives in memory only (tests).
    pub fn in_memory() -> Result<Self, String> {
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(text)?;
        Self::init(db)
    }

    fn init(db: Database) -> Result<Self, String> {
        let tx = db.begin_write().map_err(text)?;
        tx.open_table(QUOTA).map_err(text)?;
        tx.open_table(USAGE).map_err(text)?;
        tx.commit().map_err(text)?;
        Ok(Self { db })
    }

    /// Write changed quota counters and add pending usage, in one transaction; quota
    /// windows that ended before `now` go.
    pub fn save(
        &self,
        quota: &[Saved],
        usage: &HashMap<Hour, Counts>,
        now: i64,
    ) -> Result<(), String> {
        let tx = self.db.begin_write().map_err(text)?;
        {
            let mut q = tx.open_table(QUOTA).map_err(text)?;
            for s in quota {
                q.insert((s.consumer.as_str(), s.window.as_str()), (s.used, s.end))
                    .map_err(text)?;
            }
            q.retain(|_, (_, end)| end > now).map_err(text)?;
            let mut u = tx.open_table(USAGE).map_err(text)?;
            for (h, counts) in usage {
                let key = (h.hour, &*h.consumer, &*h.api);
                let mut sum = u.get(key).map_err(text)?.map_or([0; 5], |v| v.value());
                for (a, b) in sum.iter_mut().zip(counts) {
                    *a += b;
                }
                u.insert(key, sum).map_err(text)?;
            }
        }
        tx.commit().map_err(text)
    }

    /// Quota counters of windows still open at `now`.
    pub fn quota(&self, now: i64) -> Result<Vec<Saved>, String> {
        let tx = self.db.begin_read().map_err(text)?;
        let q = tx.open_table(QUOTA).map_err(text)?;
        let mut out = Vec::new();
        for row in q.iter().map_err(text)? {
            let (k, v) = row.map_err(text)?;
            let ((consumer, window), (used, end)) = (k.value(), v.value());
            if end > now {
                out.push(Saved {
                    consumer: consumer.to_string(),
                    window: window.to_string(),
                    used,
                    end,
                });
            }
        }
        Ok(out)
    }

    /// Usage rows of hours in `[from_hour, to_hour)`.
    pub fn usage(&self, from_hour: i64, to_hour: i64) -> Result<Vec<(Hour, Counts)>, String> {
        let tx = self.db.begin_read().map_err(text)?;
        let u = tx.open_table(USAGE).map_err(text)?;
        let mut out = Vec::new();
        for row in u
            .range((from_hour, "", "")..(to_hour, "", ""))
            .map_err(text)?
        {
            let (k, v) = row.map_err(text)?;
            let (hour, consumer, api) = k.value();
            out.push((
                Hour {
                    hour,
                    consumer: consumer.into(),
                    api: api.into(),
                },
                v.value(),
            ));
        }
        Ok(out)
    }

    /// Drop usage rows of hours before `before_hour`.
    pub fn prune_usage(&self, before_hour: i64) -> Result<(), String> {
        let tx = self.db.begin_write().map_err(text)?;
        tx.open_table(USAGE)
            .map_err(text)?
            .retain_in((i64::MIN, "", "")..(before_hour, "", ""), |_, _| false)
            .map_err(text)?;
        tx.commit().map_err(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hour(h: i64, c: &str, a: &str) -> Hour {
        Hour {
            hour: h,
            consumer: c.into(),
            api: a.into(),
        }
    }

    #[test]
    fn usage_adds_up_across_saves_and_reads_by_hour_range() {
        let l = Ledger::in_memory().unwrap_or_else(|e| panic!("{e}"));
        let mut batch = HashMap::new();
        batch.insert(hour(10, "alice", "orders"), [0, 3, 0, 1, 0]);
        batch.insert(hour(11, "alice", "orders"), [0, 1, 0, 0, 0]);
        l.save(&[], &batch, 0).unwrap_or_else(|e| panic!("{e}"));
        l.save(&[], &batch, 0).unwrap_or_else(|e| panic!("{e}"));
        let rows = l.usage(10, 11).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(rows, [(hour(10, "alice", "orders"), [0, 6, 0, 2, 0])]);
        assert_eq!(l.usage(0, 100).map(|r| r.len()), Ok(2));
        l.prune_usage(11).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(l.usage(0, 100).map(|r| r.len()), Ok(1));
    }

    #[test]
    fn quota_counters_persist_until_their_window_ends() {
        let l = Ledger::in_memory().unwrap_or_else(|e| panic!("{e}"));
        let saved = |w: &str, used, end| Saved {
            consumer: "alice".into(),
            window: w.into(),
            used,
            end,
        };
        l.save(
            &[saved("d:1", 5, 100), saved("d:2", 1, 200)],
            &HashMap::new(),
            0,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        l.save(&[saved("d:1", 6, 100)], &HashMap::new(), 0)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut q = l.quota(50).unwrap_or_else(|e| panic!("{e}"));
        q.sort_by(|a, b| a.window.cmp(&b.window));
        assert_eq!(q, [saved("d:1", 6, 100), saved("d:2", 1, 200)]);
        assert_eq!(l.quota(150).map(|q| q.len()), Ok(1));
        // A save after the first window ended removes it from the file.
        l.save(&[], &HashMap::new(), 150)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(l.quota(0).map(|q| q.len()), Ok(1));
    }

    #[test]
    fn a_second_process_cannot_open_the_same_file() {
        let dir = std::env::temp_dir().join(format!("meshgate-ledger-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let path = dir.join("state.redb");
        let first = Ledger::open(&path).unwrap_or_else(|e| panic!("{e}"));
        let Err(e) = Ledger::open(&path) else {
            panic!("opened twice");
        };
        assert!(e.contains("in use"), "{e}");
        drop(first);
        assert!(Ledger::open(&path).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
