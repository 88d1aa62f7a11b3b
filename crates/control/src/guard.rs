//! Automatic rollback of grey releases. Proxies serving a release report its
//! answer counts every second (`Report` on the push stream, counted since each
//! proxy started). The control plane keeps, per release and proxy, the reports of
//! the last window, and once a second checks each release that has a
//! `spec.release.rollback` rule: when more than `errorPercent` of the answers
//! over `window`, summed over the proxies, were 5xx — with at least
//! `minRequests` answers — it rolls the release back, as a new revision any
//! operator can read in the history.
//!
//! With several control-plane replicas, each judges from the proxies connected to
//! it; the first to see the rule broken rolls back, the others then find nothing
//! to roll back.

use crate::plane::{Meta, Plane, WriteError};
use crate::push::{Publisher, pb};
use crate::store::Store;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often the rules are checked.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// One report of one release from one proxy.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    requests: u64,
    errors: u64,
}

/// Answers and 5xx answers over a window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub requests: u64,
    pub errors: u64,
}

/// The reports received, by release.
#[derive(Debug, Default)]
pub struct Observed {
    by_release: Mutex<HashMap<String, Reports>>,
}

/// The reports on one release, by proxy, oldest first.
#[derive(Debug)]
struct Reports {
    /// Proxies count a release's answers from when they began to serve it: a
    /// proxy's first report counts from zero. Not after the release was rewritten:
    /// then a first report is where counting starts.
    from_zero: bool,
    nodes: HashMap<String, VecDeque<Sample>>,
}

impl Observed {
    /// Keep what `node` reported at `at`.
    pub fn record(&self, node: &str, report: pb::Report, at: Instant) {
        let Ok(mut map) = self.by_release.lock() else {
            return;
        };
        for c in report.apis {
            let release = map.entry(c.api).or_insert_with(|| Reports {
                from_zero: true,
                nodes: HashMap::new(),
            });
            let samples = release.nodes.entry(node.to_string()).or_default();
            // Counts that went down: the proxy restarted. Start over from here.
            if samples
                .back()
                .is_some_and(|s| c.requests < s.requests || c.errors < s.errors)
            {
                samples.clear();
            }
            if samples.is_empty() && release.from_zero {
                samples.push_back(Sample {
                    at,
                    requests: 0,
                    errors: 0,
                });
            }
            samples.push_back(Sample {
                at,
                requests: c.requests,
                errors: c.errors,
            });
        }
    }

    /// The answers of `release` over the `window` before `now`, summed over the
    /// proxies; for a proxy that has reported for less than the window, since its
    /// first report. Reports older than the window go, but for one (the base).
    pub fn over(&self, release: &str, window: Duration, now: Instant) -> Tally {
        let Ok(mut map) = self.by_release.lock() else {
            return Tally::default();
        };
        let Some(Reports { nodes, .. }) = map.get_mut(release) else {
            return Tally::default();
        };
        let since = now.checked_sub(window);
        // A proxy that stopped reporting (gone, or no longer serving it) counts
        // no more once its last report has left the window.
        nodes.retain(|_, s| s.back().is_some_and(|b| since.is_none_or(|t| b.at >= t)));
        let mut t = Tally::default();
        for samples in nodes.values_mut() {
            if let Some(t0) = since {
                while samples.len() > 1 && samples[1].at <= t0 {
                    samples.pop_front();
                }
            }
            if let (Some(first), Some(last)) = (samples.front(), samples.back()) {
                t.requests += last.requests - first.requests;
                t.errors += last.errors - first.errors;
            }
        }
        t
    }

    /// Drop every report of `release` (gone, or without a rule).
    pub fn forget(&self, release: &str) {
        if let Ok(mut map) = self.by_release.lock() {
            map.remove(release);
        }
    }

    /// `release` was rewritten: judge it on the answers from now on.
    pub fn restart(&self, release: &str) {
        if let Ok(mut map) = self.by_release.lock()
            && let Some(r) = map.get_mut(release)
        {
            r.from_zero = false;
            r.nodes.clear();
        }
    }

    /// The releases reported on.
    fn releases(&self) -> Vec<String> {
        self.by_release
            .lock()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }
}

/// A rule broken: why, in words, for the history.
pub fn breaks(rule: &meshgate_api::AutoRollbackSpec, t: Tally) -> Option<String> {
    if t.requests == 0 || t.requests < rule.min_requests {
        return None;
    }
    let percent = t.errors as f64 * 100.0 / t.requests as f64;
    (percent > rule.error_percent).then(|| {
        format!(
            "automatic rollback: {} of {} answers ({percent:.1}%) were 5xx in the last {}, above {}%",
            t.errors, t.requests, rule.window, rule.error_percent
        )
    })
}

/// Check every release's rule once a second until `stopping`.
pub async fn run<S: Store>(
    push: Arc<Publisher<S>>,
    plane: Arc<Plane<S>>,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    // The revision each release was at when last checked: a new one starts over.
    let mut seen: HashMap<String, u64> = HashMap::new();
    let mut tick = tokio::time::interval(CHECK_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopping.wait_for(|s| *s) => return,
        }
        let observed = &push.observed;
        let reported = observed.releases();
        if reported.is_empty() {
            continue;
        }
        let releases = match crate::release::list(&plane).await {
            Ok((_, list)) => list,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the releases to check their rollback rules");
                continue;
            }
        };
        for name in reported {
            if !releases
                .iter()
                .any(|r| r.name == name && r.spec.rollback.is_some())
            {
                observed.forget(&name);
                seen.remove(&name);
            }
        }
        let now = Instant::now();
        for r in &releases {
            let Some(rule) = &r.spec.rollback else {
                continue;
            };
            match seen.insert(r.name.clone(), r.revision) {
                Some(rev) if rev != r.revision => {
                    observed.restart(&r.name);
                    continue;
                }
                _ => {}
            }
            let Ok(window) = meshgate_config::parse_duration(&rule.window) else {
                continue;
            };
            let Some(why) = breaks(rule, observed.over(&r.name, window, now)) else {
                continue;
            };
            tracing::warn!(release = %r.name, reason = %why, "rolling the release back");
            let meta = Meta {
                author: "meshgate (automatic rollback)".into(),
                message: format!("{why}: roll back release {} of Api {}", r.name, r.spec.of),
            };
            match crate::release::roll_back(&plane, meta, &r.name, false).await {
                Ok(w) => {
                    tracing::warn!(release = %r.name, revision = w.revision, "release rolled back")
                }
                // Another replica was first.
                Err(WriteError::NotFound(_)) => {}
                Err(e) => {
                    tracing::error!(release = %r.name, error = %e, "cannot roll the release back")
                }
            }
            observed.forget(&r.name);
            seen.remove(&r.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(api: &str, requests: u64, errors: u64) -> pb::Report {
        pb::Report {
            apis: vec![pb::ApiCount {
                api: api.into(),
                requests,
                errors,
            }],
        }
    }

    #[test]
    fn the_window_sums_differences_over_proxies() {
        let o = Observed::default();
        let t0 = Instant::now();
        let s = Duration::from_secs;
        o.record("a", report("r", 100, 10), t0);
        o.record("a", report("r", 150, 12), t0 + s(5));
        o.record("a", report("r", 200, 30), t0 + s(10));
        o.record("b", report("r", 7, 0), t0 + s(8));
        o.record("b", report("r", 17, 5), t0 + s(10));
        // Whole history: a proxy's first report counts from zero.
        assert_eq!(
            o.over("r", s(60), t0 + s(10)),
            Tally {
                requests: 217,
                errors: 35
            }
        );
        // The last 5 s: a from its report at 5 s, b from zero.
        assert_eq!(
            o.over("r", s(5), t0 + s(10)),
            Tally {
                requests: 67,
                errors: 23
            }
        );
        // A restarted proxy starts over from zero; a silent one leaves the window.
        o.record("b", report("r", 3, 3), t0 + s(11));
        assert_eq!(o.over("r", s(5), t0 + s(11)).requests, 53);
        assert_eq!(o.over("r", s(5), t0 + s(20)), Tally::default());
        // Rewritten: counting starts at the next report.
        o.restart("r");
        o.record("a", report("r", 300, 40), t0 + s(21));
        o.record("a", report("r", 310, 41), t0 + s(22));
        assert_eq!(
            o.over("r", s(5), t0 + s(22)),
            Tally {
                requests: 10,
                errors: 1
            }
        );
    }

    #[test]
    fn a_rule_breaks_above_its_share_with_enough_answers() {
        let rule = meshgate_api::AutoRollbackSpec {
            error_percent: 10.0,
            window: "30s".into(),
            min_requests: 20,
        };
        let t = |requests, errors| Tally { requests, errors };
        assert!(breaks(&rule, t(19, 19)).is_none());
        assert!(breaks(&rule, t(100, 10)).is_none());
        let why = breaks(&rule, t(100, 11)).unwrap_or_default();
        assert_eq!(
            why,
            "automatic rollback: 11 of 100 answers (11.0%) were 5xx in the last 30s, above 10%"
        );
    }
}
