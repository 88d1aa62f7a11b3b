//! What the registry costs as a fleet registers: every sidecar of a mesh saying
//! Hello to one control plane (after a restart, say). A registration rebuilds only
//! the services it touches and writes one record for the other control planes, so
//! registering N instances over 100 services grows with N times the size of a
//! service, not with N squared (compare 1,000 and 5,000).

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use meshgate_control::push::pb;
use meshgate_control::registry::Registry;
use std::time::{Duration, Instant};

fn instances(n: usize) -> Vec<(String, pb::Instance)> {
    (0..n)
        .map(|i| {
            let instance = pb::Instance {
                service: format!("svc-{}", i % 100),
                address: format!("10.0.{}.{}:8080", i / 250, i % 250),
                labels: [("version".to_string(), format!("v{}", i % 3))].into(),
                zone: "z1".into(),
                ..Default::default()
            };
            (format!("node-{i}"), instance)
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("registry");
    g.sample_size(10);
    for n in [1_000, 5_000] {
        let fleet = instances(n);
        g.bench_function(format!("register {n} instances of 100 services"), |b| {
            b.iter_batched(
                || (Registry::default(), fleet.clone()),
                |(registry, fleet)| {
                    // The push streams and the store's writer hold receivers.
                    let (_table, _mine) = (registry.subscribe(), registry.mine());
                    let now = Instant::now();
                    for (node, instance) in fleet {
                        registry.register(&node, instance, Duration::from_secs(30), now);
                    }
                    registry
                },
                BatchSize::PerIteration,
            );
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
