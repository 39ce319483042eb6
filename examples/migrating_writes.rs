//! The write cost of a migrating cluster over a plain one, and the mover's
//! rate, alone: on 5 local servers, a 5-node cluster migrating from a
//! 4-node one.
//!
//! ```sh
//! cargo run --release --example migrating_writes -- sets 21    # maps of 20,000 SETs
//! cargo run --release --example migrating_writes -- dels 21    # maps of 20,000 DELs
//! cargo run --release --example migrating_writes -- move 5     # move_keys, DUMP/RESTORE
//! ```
//!
//! `sets` and `dels` print the median time of a map through each cluster
//! (alternating rounds) and their ratio; `move` prints the median keys per
//! second of `move_keys` with `Transfer::DumpRestore` over 100,000 keys
//! (no traffic). For comparing two builds: run them alternately.

use std::time::{Duration, Instant};

use rb::migrate::{move_keys, MoveOptions, Transfer};
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

/// One map of `f` over `keys` through `cluster`: how long it took.
fn timed(
    cluster: &Cluster,
    keys: &[String],
    f: impl Fn(&rb::MappingClient, &str),
) -> rb::Result<Duration> {
    let t = Instant::now();
    cluster.map(|c| {
        for k in keys {
            f(c, k);
        }
    })?;
    Ok(t.elapsed())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "sets".into());
    let rounds: usize = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(21);
    let setup = TestSetup::with_tcp(5, 1)?;
    let old = over(&setup, 4, None)?;
    let plain = over(&setup, 5, None)?;
    let migrating = over(&setup, 5, Some(&old))?;
    if mode == "move" {
        let keys = 100_000;
        let mut rates = Vec::new();
        for _ in 0..rounds {
            plain.all(|c| {
                c.flushdb();
            })?;
            old.map(|c| {
                for i in 0..keys {
                    c.set(format!("k:{i}"), i);
                }
            })?;
            let report = move_keys(
                &old,
                &plain,
                MoveOptions::new().transfer(Transfer::DumpRestore),
            )?;
            rates.push(report.progress.moved as f64 / report.elapsed.as_secs_f64());
        }
        rates.sort_by(f64::total_cmp);
        println!(
            "move_keys DUMP/RESTORE, 100,000 keys (median of {rounds}): {:.0} keys/s",
            rates[rates.len() / 2]
        );
        return Ok(());
    }
    let keys: Vec<String> = (0..20_000).map(|i| format!("w:{i}")).collect();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        if mode == "dels" {
            for (cluster, times) in [(&plain, &mut a), (&migrating, &mut b)] {
                plain.map(|c| {
                    for k in &keys {
                        c.set(k, "v");
                    }
                })?;
                times.push(timed(cluster, &keys, |c, k| {
                    c.del(&[k]);
                })?);
            }
        } else {
            a.push(timed(&plain, &keys, |c, k| {
                c.set(k, "v");
            })?);
            b.push(timed(&migrating, &keys, |c, k| {
                c.set(k, "v");
            })?);
        }
    }
    let (a, b) = (median(a), median(b));
    println!(
        "a map of 20,000 {}, migrating vs plain (medians of {rounds}, alternating): {:.2}x ({b:?} vs {a:?})",
        if mode == "dels" { "DELs" } else { "SETs" },
        b.as_secs_f64() / a.as_secs_f64()
    );
    Ok(())
}
