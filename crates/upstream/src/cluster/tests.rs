use super::*;

fn ep(port: u16, weight: u32, version: &str) -> Endpoint {
    let mut labels = BTreeMap::new();
    labels.insert("version".to_string(), version.to_string());
    Endpoint::new(SocketAddr::from(([127, 0, 0, 1], port)), weight, labels)
}

fn counts(c: &Cluster, subset: Option<usize>, n: usize) -> BTreeMap<u16, usize> {
    let mut m = BTreeMap::new();
    for i in 0..n {
        let p = c.pick(subset, Some(i as u64 * 7919), None);
        if let Some(p) = p {
            *m.entry(p.endpoint.addr.port()).or_default() += 1;
        }
    }
    m
}

fn v(version: &str) -> BTreeMap<String, String> {
    [("version".to_string(), version.to_string())].into()
}

fn v2() -> Selector {
    Selector::Labels(v("v2"))
}

#[test]
fn weighted_round_robin_is_exact_and_smooth() {
    let c = Cluster::new(
        "s",
        LbPolicy::RoundRobin,
        None,
        vec![],
        vec![ep(1, 3, "v1"), ep(2, 1, "v1")],
    );
    assert_eq!(counts(&c, None, 400), [(1, 300), (2, 100)].into());
    assert_eq!(smooth_wrr(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
}

#[test]
fn random_and_least_request_follow_weights_roughly() {
    for policy in [LbPolicy::Random, LbPolicy::LeastRequest] {
        let c = Cluster::new(
            "s",
            policy,
            None,
            vec![],
            vec![ep(1, 1, "v1"), ep(2, 1, "v1")],
        );
        let m = counts(&c, None, 2000);
        for (_, n) in m {
            assert!((800..1200).contains(&n), "{policy:?} uneven");
        }
    }
}

#[test]
fn least_request_avoids_busy_endpoint() {
    let c = Cluster::new(
        "s",
        LbPolicy::LeastRequest,
        None,
        vec![],
        vec![ep(1, 1, "v1"), ep(2, 1, "v1")],
    );
    // hold 50 requests on whichever endpoint the first pick chooses
    let held: Vec<Picked> = (0..50).filter_map(|_| c.pick(None, None, None)).collect();
    let busy: Vec<u16> = held.iter().map(|p| p.endpoint.addr.port()).collect();
    let port1 = busy.iter().filter(|p| **p == 1).count();
    assert!(port1 > 10 && port1 < 40, "P2C should spread: {port1}");
    let set = c.endpoints();
    let total: u32 = set.endpoints.iter().map(|e| e.in_flight()).sum();
    assert_eq!(total, 50);
    drop(held);
    assert_eq!(set.endpoints.iter().map(|e| e.in_flight()).sum::<u32>(), 0);
}

#[test]
fn ring_hash_is_sticky() {
    let c = Cluster::new(
        "s",
        LbPolicy::RingHash,
        None,
        vec![],
        vec![ep(1, 1, "v1"), ep(2, 1, "v1"), ep(3, 1, "v1")],
    );
    for h in 0..100u64 {
        let a = c.pick(None, Some(h), None).map(|p| p.endpoint.addr);
        let b = c.pick(None, Some(h), None).map(|p| p.endpoint.addr);
        assert_eq!(a, b);
    }
}

#[test]
fn subsets_and_fallback() {
    let c = Cluster::new(
        "s",
        LbPolicy::RoundRobin,
        None,
        vec![
            v2(),
            Selector::Labels(v("v9")),
            Selector::NoneOf(vec![v("v2")]),
        ],
        vec![ep(1, 1, "v1"), ep(2, 1, "v2")],
    );
    assert_eq!(counts(&c, Some(0), 10), [(2, 10)].into());
    // no v9 endpoint: the whole set serves
    assert_eq!(counts(&c, Some(1), 10), [(1, 5), (2, 5)].into());
    // the baseline excludes v2
    assert_eq!(counts(&c, Some(2), 10), [(1, 10)].into());
    c.update(vec![ep(1, 1, "v1"), ep(3, 1, "v2")]);
    assert_eq!(counts(&c, Some(0), 4), [(3, 4)].into());
}

#[test]
fn retry_avoids_failed_endpoint() {
    let c = Cluster::new(
        "s",
        LbPolicy::RingHash,
        None,
        vec![],
        vec![ep(1, 1, "v1"), ep(2, 1, "v1")],
    );
    let first = c.pick(None, Some(1), None).map(|p| p.endpoint.addr);
    let again = c.pick(None, Some(1), first).map(|p| p.endpoint.addr);
    assert_ne!(first, again);
}

#[test]
fn empty_cluster_picks_nothing() {
    let c = Cluster::new("s", LbPolicy::RoundRobin, None, vec![], vec![]);
    assert!(c.pick(None, None, None).is_none());
}
