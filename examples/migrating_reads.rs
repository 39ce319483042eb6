//! The read cost of a migrating cluster over a plain one, alone: maps of
//! 20,000 GETs through a 5-node cluster migrating from a 4-node one and
//! through the plain 5-node cluster, alternating, on 5 local servers.
//!
//! ```sh
//! cargo run --release --example migrating_reads -- hits      # keys on their new owner
//! cargo run --release --example migrating_reads -- misses 61 # keys nowhere, 61 rounds
//! ```
//!
//! Prints the median time of each and their ratio (goals: hits 1.05x,
//! misses 2.1x). `examples/resize.rs` prints the same figures as part of
//! a whole resize; this one runs more rounds, for comparing two builds.

use std::time::{Duration, Instant};

use rb::testing::TestSetup;
use rb::{Cluster, Commands, HostConfig, RouterKind};

fn over(setup: &TestSetup, n: usize, from: Option<&Cluster>) -> rb::Result<Cluster> {
    let mut b = Cluster::builder().router(RouterKind::Partition);
    for i in 0..n {
        let port = setup.tcp_port(i).unwrap_or(0);
        b = b.host(i as u32, HostConfig::new().host("127.0.0.1").port(port));
    }
    if let Some(old) = from {
        b = b.migrating_from(old);
    }
    b.build()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let hits = std::env::args().nth(1).as_deref() != Some("misses");
    let rounds: usize = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(41)
        .max(1);
    let setup = TestSetup::with_tcp(5, 1)?;
    let old = over(&setup, 4, None)?;
    let plain = over(&setup, 5, None)?;
    let migrating = over(&setup, 5, Some(&old))?;
    let keys: Vec<String> = (0..20_000).map(|i| format!("p:{i}")).collect();
    if hits {
        plain.map(|c| {
            for k in &keys {
                c.set(k, "v");
            }
        })?;
    }
    let once = |cluster: &Cluster| -> rb::Result<Duration> {
        let t = Instant::now();
        cluster.map(|c| {
            for k in &keys {
                c.get(k);
            }
        })?;
        Ok(t.elapsed())
    };
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        a.push(once(&plain)?);
        b.push(once(&migrating)?);
    }
    a.sort();
    b.sort();
    let (a, b) = (a[rounds / 2], b[rounds / 2]);
    println!(
        "{}: migrating {b:?} vs plain {a:?} (medians of {rounds}, alternating): {:.3}x",
        if hits { "hits" } else { "misses" },
        b.as_secs_f64() / a.as_secs_f64()
    );
    Ok(())
}
