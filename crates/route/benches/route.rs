//! Route matching cost with 10,000 Apis: the target is under 1 µs median, and the
//! cost must not grow with the number of Apis (compare the 100 and 10,000 cases).

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, Method};
use meshgate_route::{PathPattern, Route, Router, normalize_path};
use std::hint::black_box;

fn router(n: usize) -> Router<usize> {
    let mut b = Router::builder();
    for i in 0..n {
        // A realistic mix: literal prefixes, captures, methods, some host-bound.
        let (path, hosts) = match i % 4 {
            0 => (format!("/svc{i}/users/{{id}}"), vec![]),
            1 => (format!("/svc{i}/orders/{{id}}/items/{{item}}"), vec![]),
            2 => (format!("/svc{i}/files/{{*rest}}"), vec![]),
            _ => (
                format!("/svc{i}/health"),
                vec![format!("api{}.example.com", i % 50)],
            ),
        };
        let pattern = match PathPattern::parse(&path) {
            Ok(p) => p,
            Err(e) => panic!("{path}: {e}"),
        };
        let route = Route {
            hosts,
            pattern,
            methods: vec![Method::GET, Method::POST],
            headers: vec![],
            value: i,
        };
        if let Err(e) = b.insert(route) {
            panic!("{e}");
        }
    }
    b.build()
}

fn bench(c: &mut Criterion) {
    let headers = HeaderMap::new();
    for n in [100usize, 10_000] {
        let r = router(n);
        let last = n - 3; // an `orders` route near the end of insertion order
        let path = format!("/svc{last}/orders/42/items/7");
        c.bench_function(&format!("route {n} apis: capture match"), |b| {
            b.iter(|| {
                black_box(r.route(
                    black_box("api.example.com"),
                    &Method::GET,
                    black_box(&path),
                    &headers,
                ))
            })
        });
        let rest = format!("/svc{}/files/a/b/c.txt", n - 2);
        c.bench_function(&format!("route {n} apis: rest match"), |b| {
            b.iter(|| black_box(r.route("x", &Method::GET, black_box(&rest), &headers)))
        });
        c.bench_function(&format!("route {n} apis: miss"), |b| {
            b.iter(|| black_box(r.route("x", &Method::GET, black_box("/nothing/here"), &headers)))
        });
    }
    c.bench_function("normalize: clean path", |b| {
        b.iter(|| black_box(normalize_path(black_box("/svc1/orders/42/items/7"))))
    });
    c.bench_function("normalize: dot segments and escapes", |b| {
        b.iter(|| black_box(normalize_path(black_box("/a/./b/../%2e%2e/c%41//d"))))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
