//! The rb demo: spawn a local cluster, blast a million keys through it, and
//! compare with the obvious hand-written client measured in the same run.
//!
//! ```text
//! cargo run --release --example blast            # 4 servers, 1,000,000 keys, 3 rounds
//! cargo run --release --example blast -- 8 200000 5
//! ```
//!
//! What it does:
//! 1. starts `servers` redis-servers (rb::testing) listening on 127.0.0.1;
//! 2. SETs then GETs every key with `Cluster::map` (routed, pipelined,
//!    auto-batched into MSET/MGET, all nodes at once);
//! 3. does the same with the baseline: one blocking pipeline per node over
//!    plain `std::net::TcpStream`s, nodes one after another;
//! 4. prints keys/s and client CPU ns/key for both (medians of alternating
//!    rounds), and their ratio;
//! 5. fans `INFO` out to every node with `Cluster::all` and prints, per
//!    node, its keys, the MGET/MSET calls rb sent it and the GET/SET calls
//!    the baseline sent it, and its memory.
//!
//! Client CPU is this thread's on-CPU time (`/proc/thread-self/schedstat`),
//! so the servers' work is not counted.

use std::io::{BufWriter, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use rb::testing::TestSetup;
use rb::{Cluster, Commands, HostConfig};

/// This thread's CPU time so far.
fn thread_cpu() -> Duration {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|n| n.parse().ok()))
        .map(Duration::from_nanos)
        .unwrap_or_default()
}

/// Wall and CPU time of `f`.
fn measure<T>(f: impl FnOnce() -> T) -> (T, Duration, Duration) {
    let (wall, cpu) = (Instant::now(), thread_cpu());
    let out = f();
    (out, wall.elapsed(), thread_cpu() - cpu)
}

struct Figure {
    what: &'static str,
    wall: Duration,
    cpu: Duration,
}

impl Figure {
    fn keys_per_sec(&self, keys: usize) -> f64 {
        keys as f64 / self.wall.as_secs_f64()
    }
    fn cpu_ns_per_key(&self, keys: usize) -> f64 {
        self.cpu.as_nanos() as f64 / keys as f64
    }
}

/// The baseline: for each node in turn, write every command as one
/// pipeline on a blocking `TcpStream`, then read every reply.
fn baseline(
    ports: &[u16],
    per_node: &[Vec<usize>],
    keys: &[String],
    values: &[String],
    set: bool,
) -> usize {
    let mut answered = 0;
    for (port, indexes) in ports.iter().zip(per_node) {
        let stream = TcpStream::connect(("127.0.0.1", *port)).expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        let mut out = BufWriter::with_capacity(1 << 16, &stream);
        for &i in indexes {
            let c = if set {
                rb::cmd("SET").arg(&keys[i]).arg(&values[i])
            } else {
                rb::cmd("GET").arg(&keys[i])
            };
            out.write_all(&c.to_packed()).expect("write");
        }
        out.flush().expect("flush");
        drop(out);
        let mut buf = Vec::with_capacity(1 << 20);
        let mut start = 0;
        let mut chunk = vec![0u8; 1 << 16];
        let mut reader = &stream;
        let mut left = indexes.len();
        while left > 0 {
            let n = reader.read(&mut chunk).expect("read");
            assert!(n > 0, "server closed");
            buf.extend_from_slice(&chunk[..n]);
            while let Some((_, used)) = rb::resp::decode(&buf[start..]).expect("valid reply") {
                start += used;
                left -= 1;
                answered += 1;
                if left == 0 {
                    break;
                }
            }
            if start == buf.len() {
                buf.clear();
                start = 0;
            }
        }
    }
    answered
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let servers: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(4);
    let count: usize = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(3).max(1);

    let rounds_text = if rounds == 1 {
        "1 round".to_owned()
    } else {
        format!("median of {rounds} rounds")
    };
    println!("rb blast: {servers} local redis-servers on 127.0.0.1, {count} keys, {rounds_text}");
    println!("  rb:       Cluster::map, every node at once, runs of GET/SET auto-batched");
    println!("            into MGET/MSET of up to 256 keys");
    println!("  baseline: one blocking pipeline per node over a plain std::net::TcpStream,");
    println!("            nodes one after another, one GET/SET per key (no batching)");
    println!("  client CPU: this thread's on-CPU time (user + kernel) per key; the");
    println!("            servers' work is not in it");
    let setup = TestSetup::with_tcp(servers, 1)?;
    let ports: Vec<u16> = (0..servers).filter_map(|i| setup.tcp_port(i)).collect();
    let cluster = Cluster::builder()
        .host_defaults(HostConfig::new().host("127.0.0.1"))
        .hosts(ports.iter().map(|&p| HostConfig::new().port(p)))
        .build()?;

    let keys: Vec<String> = (0..count).map(|i| format!("key:{i}")).collect();
    let values: Vec<String> = (0..count).map(|i| format!("value-{i:012}")).collect();
    let router = cluster.router()?;
    let mut per_node: Vec<Vec<usize>> = vec![Vec::new(); servers];
    for (i, k) in keys.iter().enumerate() {
        per_node[router.host_for_key(k.as_bytes())? as usize].push(i);
    }

    // Warm up connections and allocator with a small map.
    cluster.map(|c| {
        for k in keys.iter().take(1000) {
            c.get(k);
        }
    })?;

    // Rounds alternate rb and the baseline, so both see the same machine;
    // each figure is the median of its rounds (shared machines are noisy).
    let mut runs: [Vec<(Duration, Duration)>; 4] = Default::default();
    for _ in 0..rounds {
        cluster.all(|c| c.flushdb())?;
        let ((), wall, cpu) = measure(|| {
            cluster
                .map(|c| {
                    for (k, v) in keys.iter().zip(&values) {
                        c.set(k, v);
                    }
                })
                .expect("map SET")
        });
        runs[0].push((wall, cpu));

        let mut promises = Vec::with_capacity(count);
        let ((), wall, cpu) = measure(|| {
            cluster
                .map(|c| {
                    for k in &keys {
                        promises.push(c.get(k));
                    }
                })
                .expect("map GET")
        });
        runs[1].push((wall, cpu));
        let found = promises
            .iter()
            .zip(&values)
            .filter(|(p, v)| p.value().ok().flatten().as_deref() == Some(v.as_bytes()))
            .count();
        assert_eq!(found, count, "every key read back with its value");
        drop(promises);

        cluster.all(|c| c.flushdb())?;
        let (n, wall, cpu) = measure(|| baseline(&ports, &per_node, &keys, &values, true));
        assert_eq!(n, count);
        runs[2].push((wall, cpu));
        let (n, wall, cpu) = measure(|| baseline(&ports, &per_node, &keys, &values, false));
        assert_eq!(n, count);
        runs[3].push((wall, cpu));
    }
    let median = |mut xs: Vec<Duration>| {
        xs.sort();
        xs[xs.len() / 2]
    };
    let names = ["rb map SET", "rb map GET", "baseline SET", "baseline GET"];
    let figures: Vec<Figure> = runs
        .iter()
        .zip(names)
        .map(|(r, what)| Figure {
            what,
            wall: median(r.iter().map(|x| x.0).collect()),
            cpu: median(r.iter().map(|x| x.1).collect()),
        })
        .collect();

    println!();
    println!(
        "{:<14} {:>12} {:>14} {:>16}",
        "", "wall", "keys/s", "client CPU/key"
    );
    for f in &figures {
        println!(
            "{:<14} {:>10.1}ms {:>14.0} {:>13.0} ns",
            f.what,
            f.wall.as_secs_f64() * 1e3,
            f.keys_per_sec(count),
            f.cpu_ns_per_key(count)
        );
    }
    let ratio =
        |a: usize, b: usize| figures[a].keys_per_sec(count) / figures[b].keys_per_sec(count);
    let cpu_ratio =
        |a: usize, b: usize| figures[a].cpu_ns_per_key(count) / figures[b].cpu_ns_per_key(count);
    println!();
    println!(
        "rb map SET vs baseline SET: {:.2}x the keys/s, {:.2}x the client CPU per key",
        ratio(0, 2),
        cpu_ratio(0, 2)
    );
    println!(
        "rb map GET vs baseline GET: {:.2}x the keys/s, {:.2}x the client CPU per key",
        ratio(1, 3),
        cpu_ratio(1, 3)
    );

    // Fan INFO out to every node, and say what is on each in words.
    let infos = cluster.all(|c| c.info(Some("everything")))?;
    let mut infos: Vec<_> = infos.value()?.into_iter().collect();
    infos.sort_by_key(|(id, _)| *id);
    /// `calls=` of a command in `INFO commandstats`; 0 when never called.
    fn calls(info: &rb::InfoDict, command: &str) -> u64 {
        info.get(&format!("cmdstat_{command}"))
            .and_then(|s| s.split(',').find_map(|f| f.strip_prefix("calls=")))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }
    let with_commas = |n: u64| {
        let digits = n.to_string();
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        out
    };
    println!();
    println!("Per node, after the last round (calls counted over all rounds and the warm-up):");
    println!(
        "{:<24} {:>10} {:>10} {:>10} {:>12} {:>12} {:>9}",
        "", "keys", "rb MSET", "rb MGET", "baseline SET", "baseline GET", "memory"
    );
    let mut total = 0;
    for (id, info) in &infos {
        // `db0:keys=250123,expires=0,avg_ttl=0`
        let keys: u64 = info
            .get("db0")
            .and_then(|s| s.split(',').find_map(|f| f.strip_prefix("keys=")))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        total += keys;
        let port = ports.get(*id as usize).copied().unwrap_or(0);
        println!(
            "{:<24} {:>10} {:>10} {:>10} {:>12} {:>12} {:>9}",
            format!("host {id} (127.0.0.1:{port})"),
            with_commas(keys),
            with_commas(calls(info, "mset")),
            with_commas(calls(info, "mget")),
            with_commas(calls(info, "set")),
            with_commas(calls(info, "get")),
            info.get("used_memory_human").unwrap_or("?"),
        );
    }
    println!(
        "keys on all nodes: {} (of {})",
        with_commas(total),
        with_commas(count as u64)
    );
    Ok(())
}
