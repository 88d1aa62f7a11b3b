//! `GET /usage?from=&to=&by=&consumer=&api=`: metered requests per Consumer × Api ×
//! status class over a time range, for billing.
//!
//! Usage is kept per hour (UTC), so `from` rounds down and `to` up to whole hours;
//! the answer says which range it covers. `to` is exclusive.

use meshgate_meter::{CLASSES, Counts, Hour};
use serde_json::{Value, json};
use std::collections::BTreeMap;

#[derive(Debug)]
pub enum Error {
    /// The query is wrong (400).
    Query(String),
    /// The store could not be read (500).
    Store(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum By {
    Total,
    Day,
    Hour,
}

#[derive(Debug, PartialEq, Eq)]
struct Query {
    from_hour: i64,
    to_hour: i64,
    by: By,
    consumer: Option<String>,
    api: Option<String>,
}

pub fn report(query: &str) -> Result<Value, Error> {
    let q = parse(query, meshgate_meter::unix_now())?;
    let meter = meshgate_meter::meter();
    let rows = meter.usage(q.from_hour, q.to_hour).map_err(Error::Store)?;
    Ok(json!({
        "from": hour_text(q.from_hour),
        "to": hour_text(q.to_hour),
        "by": match q.by { By::Total => "total", By::Day => "day", By::Hour => "hour" },
        "persisted": meter.persisted(),
        "usage": aggregate(rows, &q),
    }))
}

fn hour_text(hour: i64) -> String {
    jiff::Timestamp::from_second(hour.saturating_mul(3600))
        .map_or_else(|_| hour.to_string(), |t| t.to_string())
}

fn parse(query: &str, now: i64) -> Result<Query, Error> {
    let mut from = None;
    let mut to = None;
    let mut q = Query {
        from_hour: 0,
        to_hour: 0,
        by: By::Total,
        consumer: None,
        api: None,
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_encoding::percent_decode_str(&v.replace('+', " "))
            .decode_utf8()
            .map_err(|_| Error::Query(format!("{k}: not UTF-8")))?
            .into_owned();
        match k {
            "from" => from = Some(instant("from", &v)?),
            "to" => to = Some(instant("to", &v)?),
            "by" => {
                q.by = match v.as_str() {
                    "total" => By::Total,
                    "day" => By::Day,
                    "hour" => By::Hour,
                    _ => return Err(Error::Query(format!("by: {v:?} is not total, day or hour"))),
                }
            }
            "consumer" => q.consumer = Some(v),
            "api" => q.api = Some(v),
            _ => {
                return Err(Error::Query(format!(
                    "unknown parameter {k:?} (use from, to, by, consumer, api)"
                )));
            }
        }
    }
    let from = from.unwrap_or(now - now.rem_euclid(86_400));
    let to = to.unwrap_or(now);
    q.from_hour = from.div_euclid(3600);
    q.to_hour = to.div_euclid(3600) + i64::from(to.rem_euclid(3600) > 0);
    if q.to_hour <= q.from_hour {
        return Err(Error::Query("to must be later than from".into()));
    }
    Ok(q)
}

/// Unix seconds from an RFC 3339 time, a date (its UTC midnight) or Unix seconds.
fn instant(name: &str, s: &str) -> Result<i64, Error> {
    if let Ok(t) = s.parse::<jiff::Timestamp>() {
        return Ok(t.as_second());
    }
    if let Ok(d) = s.parse::<jiff::civil::Date>()
        && let Ok(z) = d.to_zoned(jiff::tz::TimeZone::UTC)
    {
        return Ok(z.timestamp().as_second());
    }
    s.parse::<i64>().map_err(|_| {
        Error::Query(format!(
            "{name}: {s:?} is not an RFC 3339 time (2026-11-22T10:00:00Z), a date (2026-11-22) or Unix seconds"
        ))
    })
}

/// Rows summed per bucket (the whole range, a UTC day or an hour), Consumer and Api.
fn aggregate(rows: Vec<(Hour, Counts)>, q: &Query) -> Vec<Value> {
    let mut sums: BTreeMap<(i64, String, String), Counts> = BTreeMap::new();
    for (h, counts) in rows {
        if q.consumer.as_deref().is_some_and(|c| c != &*h.consumer)
            || q.api.as_deref().is_some_and(|a| a != &*h.api)
        {
            continue;
        }
        let bucket = match q.by {
            By::Total => 0,
            By::Day => h.hour.div_euclid(24),
            By::Hour => h.hour,
        };
        let sum = sums
            .entry((bucket, h.consumer.to_string(), h.api.to_string()))
            .or_default();
        for (a, b) in sum.iter_mut().zip(counts) {
            *a += b;
        }
    }
    sums.into_iter()
        .map(|((bucket, consumer, api), counts)| {
            let classes: serde_json::Map<String, Value> = CLASSES
                .iter()
                .zip(counts)
                .filter(|(_, n)| *n > 0)
                .map(|(c, n)| (c.to_string(), n.into()))
                .collect();
            let mut row = json!({
                "consumer": consumer,
                "api": api,
                "requests": counts.iter().sum::<u64>(),
                "statusClasses": classes,
            });
            match q.by {
                By::Total => {}
                By::Day => row["day"] = hour_text(bucket * 24)[..10].into(),
                By::Hour => row["hour"] = hour_text(bucket).into(),
            }
            row
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_795_000_000; // 2026-11-18T09:06:40Z

    fn query(s: &str) -> Query {
        parse(s, NOW).unwrap_or_else(|e| panic!("{s}: {e:?}"))
    }

    #[test]
    fn ranges_round_out_to_whole_hours() {
        let q = query("");
        // Default: from the start of today (UTC) to now, rounded up.
        assert_eq!(
            (q.from_hour, q.to_hour),
            (NOW / 86_400 * 24, NOW / 3600 + 1)
        );
        let q = query("from=2026-11-01&to=2026-12-01");
        assert_eq!(hour_text(q.from_hour), "2026-11-01T00:00:00Z");
        assert_eq!(hour_text(q.to_hour), "2026-12-01T00:00:00Z");
        let q = query("from=2026-11-01T10:30:00Z&to=2026-11-01T11:00:01%2B00:00");
        assert_eq!(hour_text(q.from_hour), "2026-11-01T10:00:00Z");
        assert_eq!(hour_text(q.to_hour), "2026-11-01T12:00:00Z");
        assert_eq!(query("from=0&to=3600").to_hour, 1);
    }

    #[test]
    fn bad_queries_say_what_is_wrong() {
        let cases = [
            (
                "from=yesterday",
                "from: \"yesterday\" is not an RFC 3339 time",
            ),
            ("by=week", "by: \"week\" is not total, day or hour"),
            (
                "from=2026-11-02&to=2026-11-01",
                "to must be later than from",
            ),
            ("month=11", "unknown parameter \"month\""),
        ];
        for (q, want) in cases {
            match parse(q, NOW) {
                Err(Error::Query(m)) => assert!(m.contains(want), "{q}: {m}"),
                other => panic!("{q}: {other:?}"),
            }
        }
    }

    #[test]
    fn rows_sum_per_bucket_and_filter_by_consumer_and_api() {
        let row = |hour, c: &str, a: &str, counts| {
            (
                Hour {
                    hour,
                    consumer: c.into(),
                    api: a.into(),
                },
                counts,
            )
        };
        let rows = || {
            vec![
                row(24, "alice", "orders", [0, 2, 0, 1, 0]),
                row(25, "alice", "orders", [0, 1, 0, 0, 1]),
                row(48, "alice", "orders", [0, 4, 0, 0, 0]),
                row(24, "bob", "orders", [0, 1, 0, 0, 0]),
            ]
        };
        let mut q = query("consumer=alice");
        let total = aggregate(rows(), &q);
        assert_eq!(total.len(), 1);
        assert_eq!(total[0]["requests"], 9);
        assert_eq!(
            total[0]["statusClasses"],
            json!({"2xx": 7, "4xx": 1, "5xx": 1})
        );
        q.by = By::Day;
        let days = aggregate(rows(), &q);
        assert_eq!(
            days.iter()
                .map(|d| (d["day"].clone(), d["requests"].clone()))
                .collect::<Vec<_>>(),
            [
                (json!("1970-01-02"), json!(5)),
                (json!("1970-01-03"), json!(4))
            ]
        );
        q.by = By::Hour;
        q.consumer = None;
        q.api = Some("payments".into());
        assert!(aggregate(rows(), &q).is_empty());
    }
}
