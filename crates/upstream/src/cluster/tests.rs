use super::*;

fn ep(port: u16, weight: u32, version: &str) -> Endpoint {
    let mut labels = BTreeMap::new();
    labels.insert("version".to_string(), version.to_string());
    Endpoint::new(SocketAddr::from(([127, 0, 0, 1], port)), weight, labels)
}

fn counts(c: &Cluster, subset: Option<usize>, n: usize) -> BTreeMap<u16, usize> {
    let mut m = BTreeMap::new();
    for i in 0..n {
        let p = c.pick(subset, Some(i as u64 * 7919), None, None);
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
    let held: Vec<Picked> = (0..50)
        .filter_map(|_| c.pick(None, None, None, None))
        .collect();
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
        let a = c.pick(None, Some(h), None, None).map(|p| p.endpoint.addr);
        let b = c.pick(None, Some(h), None, None).map(|p| p.endpoint.addr);
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
    let first = c.pick(None, Some(1), None, None).map(|p| p.endpoint.addr);
    let again = c.pick(None, Some(1), first, None).map(|p| p.endpoint.addr);
    assert_ne!(first, again);
}

#[test]
fn empty_cluster_picks_nothing() {
    let c = Cluster::new("s", LbPolicy::RoundRobin, None, vec![], vec![]);
    assert!(c.pick(None, None, None, None).is_none());
}

fn outlier() -> crate::OutlierConfig {
    crate::OutlierConfig {
        consecutive_5xx: Some(2),
        consecutive_gateway_errors: None,
        base_ejection_time: std::time::Duration::from_secs(10),
        max_ejection_time: std::time::Duration::from_secs(300),
        max_ejection_percent: 50,
    }
}

fn four() -> Cluster {
    Cluster::new(
        "s",
        LbPolicy::RoundRobin,
        None,
        vec![],
        (1..=4).map(|p| ep(p, 1, "v1")).collect(),
    )
    .with_health(Some(outlier()), 50)
}

fn fail(c: &Cluster, port: u16, at: Instant) -> Option<Instant> {
    let set = c.endpoints();
    let e = set
        .endpoints
        .iter()
        .find(|e| e.addr.port() == port)?
        .clone();
    let _ = c.observe(&e, crate::Observed::Status(500), at);
    c.observe(&e, crate::Observed::LocalError, at)
}

#[test]
fn an_ejected_endpoint_leaves_the_rotation_until_its_time_is_up() {
    let c = four();
    let t0 = Instant::now();
    let until = fail(&c, 1, t0);
    assert_eq!(until, Some(t0 + std::time::Duration::from_secs(10)));
    assert_eq!(counts(&c, None, 300), [(2, 100), (3, 100), (4, 100)].into());
    // Nothing is due yet; the pending ejection is reported.
    assert_eq!(c.restore_due(t0), until);
    assert_eq!(c.restore_due(t0 + std::time::Duration::from_secs(10)), None);
    assert_eq!(counts(&c, None, 400).len(), 4);
}

#[test]
fn max_ejection_percent_caps_ejections_and_panic_uses_everyone() {
    let c = four();
    let t0 = Instant::now();
    assert!(fail(&c, 1, t0).is_some());
    assert!(fail(&c, 2, t0).is_some());
    // 50% of four are out: the third is refused.
    assert!(fail(&c, 3, t0).is_none());
    assert_eq!(counts(&c, None, 200), [(3, 100), (4, 100)].into());
    assert!(!c.endpoints().panic());

    // Health checks fail two of four: with one more below 50% usable, panic mode.
    let hc = crate::HealthCheckConfig {
        probe: crate::Probe::Tcp,
        interval: std::time::Duration::from_secs(1),
        timeout: std::time::Duration::from_secs(1),
        unhealthy_threshold: 1,
        healthy_threshold: 1,
    };
    let set = c.endpoints();
    let e3 = set.endpoints[2].clone();
    assert_eq!(c.checked(&e3, Err("refused".into()), &hc), Some(false));
    assert!(c.endpoints().panic());
    assert_eq!(counts(&c, None, 400).len(), 4, "panic spreads over all");
    assert_eq!(c.checked(&e3, Ok(()), &hc), Some(true));
    assert!(!c.endpoints().panic());
}

#[test]
fn health_survives_a_discovery_update() {
    let c = four();
    let t0 = Instant::now();
    assert!(fail(&c, 1, t0).is_some());
    c.update((1..=5).map(|p| ep(p, 1, "v1")).collect());
    let set = c.endpoints();
    assert!(set.endpoints[0].health.ejected());
    assert_eq!(counts(&c, None, 400).len(), 4);
}

#[test]
fn lanes_take_only_their_tagged_requests_and_fall_back_to_the_baseline() {
    let lane = |port, l: Option<&str>| {
        let mut labels = v("v1");
        if let Some(l) = l {
            labels.insert(LANE_LABEL.to_string(), l.to_string());
        }
        Endpoint::new(SocketAddr::from(([127, 0, 0, 1], port)), 1, labels)
    };
    let c = Cluster::new(
        "s",
        LbPolicy::RoundRobin,
        None,
        vec![v2()],
        vec![lane(1, None), lane(2, None), lane(3, Some("canary"))],
    );
    assert!(c.has_lanes());
    let picks = |l: Option<&str>, subset| -> Vec<u16> {
        (0..6)
            .filter_map(|_| c.pick(subset, None, None, l))
            .map(|p| p.endpoint.addr.port())
            .collect()
    };
    // Untagged traffic, and its subsets, never reach a lane's endpoint.
    assert!(picks(None, None).iter().all(|&p| p != 3));
    assert!(
        picks(None, Some(0)).iter().all(|&p| p != 3),
        "an empty subset falls back to the baseline"
    );
    // Tagged traffic reaches its lane only; an unknown lane goes to the baseline.
    assert_eq!(picks(Some("canary"), None), [3; 6]);
    assert!(picks(Some("blue"), None).iter().all(|&p| p != 3));
    // A cluster with lanes and no baseline serves only tagged traffic.
    let only = Cluster::new(
        "s",
        LbPolicy::RoundRobin,
        None,
        vec![],
        vec![lane(4, Some("canary"))],
    );
    assert!(only.pick(None, None, None, None).is_none());
    assert!(only.pick(None, None, None, Some("canary")).is_some());
    // Without lane labels nothing changes.
    assert!(
        !Cluster::new("s", LbPolicy::RoundRobin, None, vec![], vec![lane(5, None)]).has_lanes()
    );
}
