//! What holding requests until the handshake is good costs (DESIGN.md,
//! "Sequencing rules"): a fresh connection that needs `SELECT` pays one
//! round trip more than one that needs no handshake; a pooled connection
//! pays nothing.
//!
//! Spawns one local redis-server (TCP on 127.0.0.1) and times, in
//! alternating rounds, an immediate `GET` on db 0 (no handshake) and on
//! db 1 (`SELECT 1` first), each on a fresh connection and on a pooled one,
//! plus a `PING` round trip for scale. Prints medians.
//!
//! ```sh
//! cargo run --release --example handshake
//! ```

use std::time::{Duration, Instant};

use rb::testing::TestSetup;
use rb::{Cluster, Commands, HostConfig};

const ROUNDS: usize = 400;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let setup = TestSetup::with_tcp(1, 1)?;
    let port = setup.tcp_port(0).ok_or("no TCP port")?;
    let host = |db: i64| HostConfig::new().host("127.0.0.1").port(port).db(db);
    let cluster_on = |db: i64| Cluster::builder().host(0, host(db)).build();

    let (mut fresh, mut pooled) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
    let mut ping = Vec::new();
    for round in 0..ROUNDS {
        for step in 0..2 {
            // Alternate which db goes first, so drift hits both alike.
            let db = (round + step) % 2;
            let cluster = cluster_on(db as i64)?;
            let client = cluster.routing_client();
            let t = Instant::now();
            let _: Option<Vec<u8>> = client.get("k")?;
            fresh[db].push(t.elapsed());
            let t = Instant::now();
            let _: Option<Vec<u8>> = client.get("k")?;
            pooled[db].push(t.elapsed());
            let local = cluster.local_client(0)?;
            let t = Instant::now();
            let _: String = local.cmd(rb::cmd("PING"))?;
            ping.push(t.elapsed());
        }
    }
    let us = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2].as_secs_f64() * 1e6
    };
    let (f0, f1) = (us(&mut fresh[0]), us(&mut fresh[1]));
    let (p0, p1) = (us(&mut pooled[0]), us(&mut pooled[1]));
    let rtt = us(&mut ping);
    println!("medians of {ROUNDS} alternating rounds, one local redis-server over TCP:");
    println!("  fresh connection, db 0 (no handshake):  {f0:8.1} us");
    println!(
        "  fresh connection, db 1 (SELECT first):  {f1:8.1} us  ({:+.1} us)",
        f1 - f0
    );
    println!("  pooled connection, db 0:                {p0:8.1} us");
    println!(
        "  pooled connection, db 1:                {p1:8.1} us  ({:+.1} us)",
        p1 - p0
    );
    println!("  PING round trip (pooled):               {rtt:8.1} us");
    Ok(())
}
