//! Growing a fleet from 4 to 5 nodes under traffic, without losing a key.
//!
//! Spawns 5 local redis-servers, fills the first 4 through a 4-node cluster,
//! then builds a 5-node cluster `migrating_from` the 4-node one and, while
//! readers and writers use it, moves every key whose owner changed with
//! `rb::migrate::move_keys`, printing progress. At the end it checks that
//! every key is where the new router says, with the last value written, and
//! prints the figures: keys moved per second (`Transfer::DumpRestore` and
//! `Transfer::Migrate`, without traffic), the read cost of a migrating cluster over a
//! plain one (hits and misses), and the share of keys each router moves.
//!
//! ```sh
//! cargo run --release --example resize            # 200,000 keys
//! cargo run --release --example resize -- 50000   # fewer
//! ```

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rb::migrate::{move_keys, MoveOptions, Transfer};
use rb::testing::TestSetup;
use rb::{Cluster, Commands, HostConfig, RouterKind};

const COUNTERS: usize = 100;

fn over(
    setup: &TestSetup,
    n: usize,
    kind: RouterKind,
    from: Option<&Cluster>,
) -> rb::Result<Cluster> {
    let mut b = Cluster::builder().router(kind);
    for i in 0..n {
        let port = setup.tcp_port(i).unwrap_or(0);
        b = b.host(i as u32, HostConfig::new().host("127.0.0.1").port(port));
    }
    if let Some(old) = from {
        b = b.migrating_from(old);
    }
    b.build()
}

fn flush_all(setup: &TestSetup) -> rb::Result<()> {
    let all = over(setup, 5, RouterKind::Partition, None)?;
    all.all(|c| {
        c.flushdb();
    })?;
    Ok(())
}

fn fill(cluster: &Cluster, keys: usize) -> rb::Result<()> {
    cluster.map(|c| {
        for i in 0..keys {
            c.set(format!("k:{i}"), i);
        }
        for j in 0..COUNTERS {
            c.set(format!("c:{j}"), 0);
        }
    })?;
    Ok(())
}

/// Medians of `rounds` maps of GETs of `keys` through `a` and through `b`,
/// alternating (the machine's drift hits both alike).
fn time_gets(
    a: &Cluster,
    b: &Cluster,
    keys: &[String],
    rounds: usize,
) -> rb::Result<(Duration, Duration)> {
    let once = |cluster: &Cluster| -> rb::Result<Duration> {
        let t = Instant::now();
        cluster.map(|c| {
            for k in keys {
                c.get(k);
            }
        })?;
        Ok(t.elapsed())
    };
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        ta.push(once(a)?);
        tb.push(once(b)?);
    }
    ta.sort();
    tb.sort();
    Ok((ta[rounds / 2], tb[rounds / 2]))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let keys: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200_000);
    let setup = TestSetup::with_tcp(5, 1)?;

    // The share of keys each router moves from 4 to 5 nodes.
    for (kind, name) in [
        (RouterKind::Partition, "partition (rb's default)"),
        (RouterKind::ConsistentHashing, "ketama"),
    ] {
        let (a, b) = (
            over(&setup, 4, kind, None)?.router()?,
            over(&setup, 5, kind, None)?.router()?,
        );
        let moved = (0..keys)
            .filter(|i| {
                let k = format!("k:{i}");
                a.host_for_key(k.as_bytes()).ok() != b.host_for_key(k.as_bytes()).ok()
            })
            .count();
        println!(
            "{name}: 4 -> 5 nodes moves {:.1}% of the keys",
            100.0 * moved as f64 / keys as f64
        );
    }

    // The read cost of a migrating cluster, before any move: misses (keys
    // nowhere) and hits (keys already on their new owner).
    flush_all(&setup)?;
    let old = over(&setup, 4, RouterKind::Partition, None)?;
    let new_plain = over(&setup, 5, RouterKind::Partition, None)?;
    let migrating = over(&setup, 5, RouterKind::Partition, Some(&old))?;
    let probe: Vec<String> = (0..20_000).map(|i| format!("p:{i}")).collect();
    let (miss_plain, miss_migrating) = time_gets(&new_plain, &migrating, &probe, 21)?;
    new_plain.map(|c| {
        for k in &probe {
            c.set(k, "v");
        }
    })?;
    let (hit_plain, hit_migrating) = time_gets(&new_plain, &migrating, &probe, 21)?;
    println!(
        "a map of 20,000 GETs, migrating cluster vs plain (medians of 21, alternating): hits {:.2}x ({hit_migrating:?} vs {hit_plain:?}), misses {:.2}x ({miss_migrating:?} vs {miss_plain:?})",
        hit_migrating.as_secs_f64() / hit_plain.as_secs_f64(),
        miss_migrating.as_secs_f64() / miss_plain.as_secs_f64(),
    );

    // The mover's two ways of copying, without traffic, alternating.
    let mut rates = (Vec::new(), Vec::new());
    for _ in 0..3 {
        rates
            .0
            .push(move_rate(&setup, keys, Transfer::DumpRestore)?);
        rates.1.push(move_rate(&setup, keys, Transfer::Migrate)?);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (dump_restore_rate, migrate_rate) = (median(&mut rates.0), median(&mut rates.1));
    println!(
        "move_keys without traffic (medians of 3 alternating): DUMP/RESTORE {dump_restore_rate:.0} keys/s, MIGRATE {migrate_rate:.0} keys/s ({:.2}x)",
        migrate_rate / dump_restore_rate
    );

    // The move itself, under traffic.
    fill(&old, keys)?;
    let migrating = over(&setup, 5, RouterKind::Partition, Some(&old))?;
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for w in 0..4 {
        let client = migrating.routing_client();
        workers.push(std::thread::spawn(move || -> rb::Result<u64> {
            for n in 0..2_000u64 {
                client.incr(format!("c:{}", (n as usize + w) % COUNTERS))?;
            }
            Ok(2_000)
        }));
    }
    for r in 0..2 {
        let (cluster, stop, reads) = (migrating.clone(), stop.clone(), reads.clone());
        workers.push(std::thread::spawn(move || -> rb::Result<u64> {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let start = (n * 7919 + r * 1000) % (keys - 100);
                let got = cluster.map(|c| {
                    (start..start + 100)
                        .map(|i| c.get(format!("k:{i}")))
                        .collect::<Vec<_>>()
                })?;
                for (i, p) in (start..).zip(got) {
                    if p.value()? != Some(i.to_string().into_bytes()) {
                        return Err(rb::Error::Config {
                            reason: format!("k:{i} read wrong during the move").into(),
                        });
                    }
                }
                reads.fetch_add(100, Ordering::Relaxed);
                n += 1;
            }
            Ok(0)
        }));
    }
    let tty = std::io::stdout().is_terminal();
    let started = Instant::now();
    let last_line = std::sync::Mutex::new(Instant::now());
    let report = move_keys(
        &old,
        &migrating,
        MoveOptions::new().batch(1000).progress(move |p| {
            let line = format!(
                "moving: {} scanned, {} copied, {} moved, {} stayed, {} skipped, {:.1} MB",
                p.scanned,
                p.copied,
                p.moved,
                p.stayed,
                p.skipped,
                p.bytes as f64 / 1e6
            );
            if tty {
                print!("\r{line}   ");
                let _ = std::io::stdout().flush();
            } else if let Ok(mut last) = last_line.lock() {
                // Not a terminal: a line a second, and the last one.
                if last.elapsed() >= Duration::from_secs(1) || p.resume_at.is_none() {
                    println!("{line}");
                    *last = Instant::now();
                }
            }
        }),
    )?;
    stop.store(true, Ordering::Relaxed);
    let mut incrs = 0;
    for w in workers {
        incrs += w.join().map_err(|_| "a worker panicked")??;
    }
    let p = &report.progress;
    println!(
        "\nmoved {} keys in {:.2?} ({:.0} keys/s, Transfer::Auto: MIGRATE here) under traffic; {} reads and {incrs} INCRs ran meanwhile",
        p.moved,
        report.elapsed,
        p.moved as f64 / report.elapsed.as_secs_f64(),
        reads.load(Ordering::Relaxed)
    );
    println!(
        "(wall time of the move and its check: {:.2?})",
        started.elapsed()
    );

    // Every key where the new router says, with its value; counters exact.
    let router = new_plain.router()?;
    let mut misplaced = 0;
    for i in 0..keys {
        let k = format!("k:{i}");
        let owner = router.host_for_key(k.as_bytes())?;
        let v: Option<Vec<u8>> = new_plain.local_client(owner)?.get(&k)?;
        if v != Some(i.to_string().into_bytes()) {
            misplaced += 1;
        }
    }
    let total: i64 = (0..COUNTERS)
        .map(|j| {
            new_plain
                .routing_client()
                .cmd::<i64>(rb::cmd("GET").arg(format!("c:{j}")))
        })
        .sum::<rb::Result<i64>>()?;
    println!(
        "check: {misplaced} of {keys} keys misplaced or wrong; counters total {total} (want {incrs})"
    );
    if misplaced > 0 || total != incrs as i64 {
        return Err("the check failed".into());
    }
    Ok(())
}

/// Keys per second of `move_keys` with `transfer`, without traffic (the
/// fleet is filled first and emptied after).
fn move_rate(setup: &TestSetup, keys: usize, transfer: Transfer) -> rb::Result<f64> {
    flush_all(setup)?;
    let old = over(setup, 4, RouterKind::Partition, None)?;
    let new = over(setup, 5, RouterKind::Partition, None)?;
    fill(&old, keys)?;
    let report = move_keys(
        &old,
        &new,
        MoveOptions::new().batch(1000).transfer(transfer),
    )?;
    flush_all(setup)?;
    Ok(report.progress.moved as f64 / report.elapsed.as_secs_f64())
}
