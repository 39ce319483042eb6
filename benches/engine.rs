//! The engine end to end against 4 local redis-servers (unix sockets):
//! a map of 1,000 GETs, a map of 1,000 SETs (auto-batched into MGET/MSET
//! per host), and one immediate routed GET. Written against the public API
//! only, so the same file measures an older commit (a `git worktree`) in
//! the same run for comparison.
//!
//! ```sh
//! cargo bench --bench engine
//! ```

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rb::testing::TestSetup;
use rb::Commands;

fn engine(c: &mut Criterion) {
    let setup = TestSetup::new(4, 1).expect("start redis-server");
    let cluster = setup.make_cluster().expect("cluster");
    let keys: Vec<String> = (0..1000).map(|i| format!("bench:{i}")).collect();
    cluster
        .map(|m| {
            for k in &keys {
                m.set(k, "0123456789abcdef");
            }
        })
        .expect("seed");

    let mut g = c.benchmark_group("engine");
    g.throughput(Throughput::Elements(keys.len() as u64));
    g.bench_function("map_get_1000", |b| {
        b.iter(|| {
            let mut got = Vec::with_capacity(keys.len());
            cluster
                .map(|m| {
                    for k in &keys {
                        got.push(m.get(k));
                    }
                })
                .expect("map");
            got
        })
    });
    g.bench_function("map_set_1000", |b| {
        b.iter(|| {
            cluster
                .map(|m| {
                    for k in &keys {
                        m.set(k, "0123456789abcdef");
                    }
                })
                .expect("map")
        })
    });
    g.throughput(Throughput::Elements(1));
    #[allow(unused_mut)] // older commits took `&mut self`
    let mut client = cluster.routing_client();
    g.bench_function("routing_get", |b| {
        b.iter(|| client.get("bench:1").expect("GET"))
    });
    g.finish();
}

criterion_group!(benches, engine);
criterion_main!(benches);
