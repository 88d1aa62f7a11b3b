//! Calendar windows: the day or month a moment falls in, in a time zone.

use jiff::Timestamp;
use jiff::civil::Date;
use jiff::tz::TimeZone;
use meshgate_core::QuotaPeriod;
use std::sync::{Arc, Mutex};

/// One calendar day or month: `[start, end)` in Unix seconds, and a key that names it
/// (`d:2026-11-22@UTC`, `m:2026-11@Asia/Shanghai`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub key: Arc<str>,
    pub start: i64,
    pub end: i64,
}

impl Window {
    /// Whole seconds from `now` to the window's end (at least 1: a client told to
    /// retry after 0 seconds would just retry).
    pub fn seconds_left(&self, now: i64) -> u64 {
        (self.end - now).max(1) as u64
    }

    pub fn length(&self) -> u64 {
        (self.end - self.start).max(1) as u64
    }
}

/// Days or months in one time zone, with the current window cached (it changes once
/// a day at most, so a request costs one clock read and a compare).
#[derive(Debug)]
pub struct Calendar {
    period: QuotaPeriod,
    tz: TimeZone,
    tz_name: String,
    current: Mutex<Option<Window>>,
}

impl Calendar {
    /// `tz_name` is an IANA name (`UTC`, `Europe/Berlin`) from the bundled database,
    /// so results do not depend on the host's tzdata.
    pub fn new(period: QuotaPeriod, tz_name: &str) -> Result<Self, String> {
        let tz = TimeZone::get(tz_name).map_err(|_| {
            format!("unknown time zone {tz_name:?} (use an IANA name such as UTC or Europe/Berlin)")
        })?;
        Ok(Self {
            period,
            tz,
            tz_name: tz_name.to_string(),
            current: Mutex::new(None),
        })
    }

    pub fn period(&self) -> QuotaPeriod {
        self.period
    }

    /// The window `now` (Unix seconds) falls in.
    pub fn window(&self, now: i64) -> Window {
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = cur.as_ref()
            && (w.start..w.end).contains(&now)
        {
            return w.clone();
        }
        let w = self.compute(now);
        *cur = Some(w.clone());
        w
    }

    fn compute(&self, now: i64) -> Window {
        let at = Timestamp::from_second(now).unwrap_or(Timestamp::UNIX_EPOCH);
        let date = at.to_zoned(self.tz.clone()).date();
        let (first, next, key) = match self.period {
            QuotaPeriod::Day => (date, date.tomorrow().ok(), format!("d:{date}")),
            QuotaPeriod::Month => (
                date.first_of_month(),
                date.last_of_month().tomorrow().ok(),
                format!("m:{:04}-{:02}", date.year(), date.month()),
            ),
        };
        let start = self.midnight(first).unwrap_or(now);
        // The end of time has no next day; such a window simply never ends.
        let end = next.and_then(|d| self.midnight(d)).unwrap_or(i64::MAX);
        Window {
            key: format!("{key}@{}", self.tz_name).into(),
            start,
            end,
        }
    }

    /// The first moment of `date` in the zone (later than 00:00 where a DST gap
    /// swallows midnight).
    fn midnight(&self, date: Date) -> Option<i64> {
        let z = date.to_zoned(self.tz.clone()).ok()?;
        Some(z.start_of_day().ok()?.timestamp().as_second())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> i64 {
        s.parse::<Timestamp>()
            .unwrap_or_else(|e| panic!("{s}: {e}"))
            .as_second()
    }

    #[test]
    fn windows_follow_the_calendar_of_their_zone() {
        let cases = [
            // (period, zone, moment, key, start, end)
            (
                QuotaPeriod::Day,
                "UTC",
                "2026-11-22T13:45:00Z",
                "d:2026-11-22@UTC",
                "2026-11-22T00:00:00Z",
                "2026-11-23T00:00:00Z",
            ),
            // 23:30 UTC is already the next day in Shanghai (UTC+8).
            (
                QuotaPeriod::Day,
                "Asia/Shanghai",
                "2026-11-22T23:30:00Z",
                "d:2026-11-23@Asia/Shanghai",
                "2026-11-22T16:00:00Z",
                "2026-11-23T16:00:00Z",
            ),
            // The day DST starts in Berlin has 23 hours.
            (
                QuotaPeriod::Day,
                "Europe/Berlin",
                "2026-03-29T12:00:00Z",
                "d:2026-03-29@Europe/Berlin",
                "2026-03-28T23:00:00Z",
                "2026-03-29T22:00:00Z",
            ),
            (
                QuotaPeriod::Month,
                "UTC",
                "2026-02-14T08:00:00Z",
                "m:2026-02@UTC",
                "2026-02-01T00:00:00Z",
                "2026-03-01T00:00:00Z",
            ),
            // December rolls over into the next year.
            (
                QuotaPeriod::Month,
                "America/New_York",
                "2026-12-31T12:00:00Z",
                "m:2026-12@America/New_York",
                "2026-12-01T05:00:00Z",
                "2027-01-01T05:00:00Z",
            ),
        ];
        for (period, zone, at, key, start, end) in cases {
            let cal = Calendar::new(period, zone).unwrap_or_else(|e| panic!("{e}"));
            let w = cal.window(ts(at));
            assert_eq!(&*w.key, key, "{zone} {at}");
            assert_eq!((w.start, w.end), (ts(start), ts(end)), "{zone} {at}");
        }
    }

    #[test]
    fn the_cached_window_moves_on_at_its_end() {
        let cal = Calendar::new(QuotaPeriod::Day, "UTC").unwrap_or_else(|e| panic!("{e}"));
        let end = ts("2026-11-23T00:00:00Z");
        assert_eq!(&*cal.window(end - 1).key, "d:2026-11-22@UTC");
        assert_eq!(&*cal.window(end).key, "d:2026-11-23@UTC");
        assert_eq!(cal.window(end - 10).seconds_left(end - 10), 10);
    }

    #[test]
    fn unknown_zones_are_refused_with_a_hint() {
        let Err(e) = Calendar::new(QuotaPeriod::Day, "Mars/Olympus") else {
            panic!("an unknown zone was accepted");
        };
        assert!(e.contains("IANA"), "{e}");
    }
}
