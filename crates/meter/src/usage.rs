//! Usage metering: requests per Consumer × Api × status class, per hour.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Status classes counted: 1xx .. 5xx.
pub const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Counts per status class, indexed like [`CLASSES`].
pub type Counts = [u64; 5];

/// The class index of a status (anything outside 100..=599 counts as 5xx).
pub fn class_of(status: u16) -> usize {
    (usize::from(status / 100)).clamp(1, 5) - 1
}

/// One hour of one Consumer's use of one Api.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hour {
    /// Hours since the Unix epoch (UTC).
    pub hour: i64,
    pub consumer: Arc<str>,
    pub api: Arc<str>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Counts not yet written to the ledger.
    pending: HashMap<Hour, Counts>,
    /// Counts since start-up per Consumer and Api, for metrics.
    totals: HashMap<(Arc<str>, Arc<str>), Counts>,
}

#[derive(Debug, Default)]
pub struct UsageMeter {
    inner: Mutex<Inner>,
}

impl UsageMeter {
    /// Count one answered request at `now` (Unix seconds).
    pub fn record(&self, consumer: &Arc<str>, api: &Arc<str>, status: u16, now: i64) {
        let class = class_of(status);
        let hour = Hour {
            hour: now.div_euclid(3600),
            consumer: consumer.clone(),
            api: api.clone(),
        };
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.pending.entry(hour).or_default()[class] += 1;
        inner
            .totals
            .entry((consumer.clone(), api.clone()))
            .or_default()[class] += 1;
    }

    /// The pending counts, leaving none.
    pub fn take_pending(&self) -> HashMap<Hour, Counts> {
        std::mem::take(&mut self.inner.lock().unwrap_or_else(|e| e.into_inner()).pending)
    }

    /// Counts that could not be written go back, to be tried again.
    pub fn put_back(&self, rows: HashMap<Hour, Counts>) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for (k, v) in rows {
            let e = inner.pending.entry(k).or_default();
            for (a, b) in e.iter_mut().zip(v) {
                *a += b;
            }
        }
    }

    /// Pending counts within `[from_hour, to_hour)`, without taking them.
    pub fn pending_in(&self, from_hour: i64, to_hour: i64) -> Vec<(Hour, Counts)> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .pending
            .iter()
            .filter(|(h, _)| (from_hour..to_hour).contains(&h.hour))
            .map(|(h, c)| (h.clone(), *c))
            .collect()
    }

    /// Totals since start-up, sorted by Consumer then Api.
    pub fn totals(&self) -> Vec<(Arc<str>, Arc<str>, Counts)> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<_> = inner
            .totals
            .iter()
            .map(|((c, a), n)| (c.clone(), a.clone(), *n))
            .collect();
        out.sort_by(|x, y| (&x.0, &x.1).cmp(&(&y.0, &y.1)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_fall_into_their_class() {
        let cases = [
            (100, 0),
            (204, 1),
            (301, 2),
            (404, 3),
            (429, 3),
            (503, 4),
            (0, 0),
            (999, 4),
        ];
        for (status, class) in cases {
            assert_eq!(class_of(status), class, "{status}");
        }
    }

    #[test]
    fn requests_are_counted_per_hour_and_in_totals() {
        let m = UsageMeter::default();
        let (alice, orders): (Arc<str>, Arc<str>) = ("alice".into(), "orders".into());
        m.record(&alice, &orders, 200, 3600 * 10 + 5);
        m.record(&alice, &orders, 500, 3600 * 10 + 3599);
        m.record(&alice, &orders, 200, 3600 * 11);
        let mut hours = m.pending_in(0, i64::MAX);
        hours.sort();
        assert_eq!(
            hours.iter().map(|(h, c)| (h.hour, *c)).collect::<Vec<_>>(),
            [(10, [0, 1, 0, 0, 1]), (11, [0, 1, 0, 0, 0])]
        );
        assert_eq!(m.pending_in(11, 12).len(), 1);
        let taken = m.take_pending();
        assert!(m.pending_in(0, i64::MAX).is_empty());
        m.put_back(taken);
        assert_eq!(m.pending_in(0, i64::MAX).len(), 2);
        assert_eq!(m.totals()[0].2, [0, 2, 0, 0, 1]);
    }
}
