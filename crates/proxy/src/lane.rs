//! Lanes: full-link grey release. A request tagged `x-mesh-lane: NAME` (or with a
//! W3C `baggage` member `mesh-lane=NAME`) goes, at every hop, to the endpoints
//! labelled `lane=NAME`, or to the baseline where a service has none; untagged
//! requests reach only the baseline (see `Cluster::pick`).
//!
//! The tag must reach every hop. An app that passes on `x-mesh-lane` or `baggage`
//! carries it itself. For an app that passes on only its trace context
//! (`traceparent`, or B3), the sidecar does it: the inbound side remembers each
//! tagged request's trace id with its lane, and the outbound side tags the app's
//! calls carrying a remembered trace id. A trace id is remembered for one to two
//! minutes, and at most [`CAPACITY`] of them per generation.

use http::{HeaderMap, HeaderName, HeaderValue};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub const HEADER: HeaderName = HeaderName::from_static("x-mesh-lane");
const BAGGAGE: HeaderName = HeaderName::from_static("baggage");
const BAGGAGE_KEY: &str = "mesh-lane";
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const B3: HeaderName = HeaderName::from_static("b3");
const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
/// Trace ids remembered per generation; a full generation starts the next.
pub const CAPACITY: usize = 65_536;
/// A generation's age at which the next starts.
const GENERATION: Duration = Duration::from_secs(60);
/// The longest lane name taken.
const MAX_LANE: usize = 64;

/// The lane a request is tagged with, if any (a malformed tag counts as none).
pub fn of(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get(&HEADER) {
        return v.to_str().ok().filter(|l| valid(l));
    }
    let baggage = headers.get(&BAGGAGE)?.to_str().ok()?;
    baggage
        .split(',')
        .filter_map(|member| member.split(';').next()?.split_once('='))
        .find(|(k, _)| k.trim() == BAGGAGE_KEY)
        .map(|(_, v)| v.trim())
        .filter(|l| valid(l))
}

fn valid(lane: &str) -> bool {
    !lane.is_empty()
        && lane.len() <= MAX_LANE
        && lane
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The request's trace id: W3C `traceparent`, B3 single `b3`, or `X-B3-TraceId`.
fn trace_id(headers: &HeaderMap) -> Option<u128> {
    let hex = |s: &str| {
        (matches!(s.len(), 16 | 32))
            .then(|| u128::from_str_radix(s, 16).ok())
            .flatten()
            .filter(|&id| id != 0)
    };
    if let Some(v) = headers.get(&TRACEPARENT) {
        return v.to_str().ok()?.split('-').nth(1).and_then(hex);
    }
    if let Some(v) = headers.get(&B3) {
        return v.to_str().ok()?.split('-').next().and_then(hex);
    }
    headers.get(&B3_TRACE_ID)?.to_str().ok().and_then(hex)
}

/// Trace ids seen with a lane, in two generations.
struct Memory {
    used: AtomicBool,
    generations: Mutex<Generations>,
}

struct Generations {
    current: HashMap<u128, HeaderValue>,
    previous: HashMap<u128, HeaderValue>,
    started: Instant,
}

fn memory() -> &'static Memory {
    static MEMORY: OnceLock<Memory> = OnceLock::new();
    MEMORY.get_or_init(|| Memory {
        used: AtomicBool::new(false),
        generations: Mutex::new(Generations {
            current: HashMap::new(),
            previous: HashMap::new(),
            started: Instant::now(),
        }),
    })
}

/// On a sidecar's inbound side: remember the lane of a tagged request by its trace
/// id, for the app's outbound calls in the same trace.
pub fn remember(headers: &HeaderMap) {
    let Some(lane) = of(headers) else { return };
    let Some(id) = trace_id(headers) else { return };
    let Ok(value) = HeaderValue::from_str(lane) else {
        return;
    };
    let m = memory();
    let Ok(mut g) = m.generations.lock() else {
        return;
    };
    let now = Instant::now();
    if g.current.len() >= CAPACITY || now.duration_since(g.started) >= GENERATION {
        g.previous = std::mem::take(&mut g.current);
        g.started = now;
    }
    g.current.insert(id, value);
    m.used.store(true, Ordering::Relaxed);
}

/// On a sidecar's outbound side: tag an untagged call whose trace id an inbound
/// request was seen with.
pub fn restore(headers: &mut HeaderMap) {
    let m = memory();
    if !m.used.load(Ordering::Relaxed) || headers.contains_key(&HEADER) || of(headers).is_some() {
        return;
    }
    let Some(id) = trace_id(headers) else { return };
    let lane = match m.generations.lock() {
        Ok(g) => g.current.get(&id).or_else(|| g.previous.get(&id)).cloned(),
        Err(_) => None,
    };
    if let Some(lane) = lane {
        headers.insert(HEADER, lane);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    HeaderName::from_bytes(k.as_bytes()).unwrap_or_else(|e| panic!("{e}")),
                    HeaderValue::from_str(v).unwrap_or_else(|e| panic!("{e}")),
                )
            })
            .collect()
    }

    #[test]
    fn tags_come_from_the_header_or_baggage() {
        assert_eq!(of(&headers(&[("x-mesh-lane", "canary")])), Some("canary"));
        let b = headers(&[("baggage", "userId=alice, mesh-lane = blue;prop=1,x=y")]);
        assert_eq!(of(&b), Some("blue"));
        assert_eq!(of(&headers(&[("x-mesh-lane", "no spaces")])), None);
        assert_eq!(of(&headers(&[("baggage", "other=1")])), None);
        assert_eq!(of(&HeaderMap::new()), None);
    }

    #[test]
    fn trace_ids_in_every_format() {
        let w3c = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let id = 0x4bf92f3577b34da6a3ce929d0e0e4736u128;
        assert_eq!(trace_id(&headers(&[("traceparent", w3c)])), Some(id));
        let b3 = "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1";
        assert_eq!(trace_id(&headers(&[("b3", b3)])), Some(id));
        assert_eq!(
            trace_id(&headers(&[("x-b3-traceid", "a3ce929d0e0e4736")])),
            Some(0xa3ce929d0e0e4736)
        );
        assert_eq!(trace_id(&headers(&[("traceparent", "00-xyz-1-01")])), None);
        let zero = "00-00000000000000000000000000000000-00f067aa0ba902b7-01";
        assert_eq!(trace_id(&headers(&[("traceparent", zero)])), None);
    }

    #[test]
    fn the_outbound_call_of_a_tagged_trace_is_tagged() {
        let trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        remember(&headers(&[
            ("x-mesh-lane", "canary"),
            ("traceparent", trace),
        ]));
        let mut call = headers(&[(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-1111111111111111-01",
        )]);
        restore(&mut call);
        assert_eq!(of(&call), Some("canary"));
        // Another trace, or a call tagged already, is left alone.
        let mut other = headers(&[(
            "traceparent",
            "00-1af7651916cd43dd8448eb211c80319c-1111111111111111-01",
        )]);
        restore(&mut other);
        assert_eq!(of(&other), None);
        let mut tagged = headers(&[("x-mesh-lane", "blue"), ("traceparent", trace)]);
        restore(&mut tagged);
        assert_eq!(of(&tagged), Some("blue"));
    }
}
