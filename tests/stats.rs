//! `cluster.stats()` against what the servers saw: command counts equal
//! `INFO commandstats` for a known workload through every client, and the
//! latency histogram's p50/p99 fall within a bucket of latencies measured
//! around a proxy that delays every reply.

use std::time::{Duration, Instant};

mod common;
use common::cluster;
use common::proxy::{Fault, Proxy};
use rb::testing::TestSetup;
use rb::{Cluster, Commands, HostStats};

/// Total `calls=` of every command in `INFO commandstats` of the server
/// behind `host` (asked through `observer`, whose stats are not checked),
/// `info` itself left out; and the failed calls.
fn server_calls(observer: &Cluster, host: u32) -> (u64, u64) {
    let info = observer
        .local_client(host)
        .expect("local client")
        .info(Some("commandstats"))
        .expect("INFO");
    let (mut calls, mut failed) = (0, 0);
    for (name, value) in &info.0 {
        if !name.starts_with("cmdstat_") || name == "cmdstat_info" {
            continue;
        }
        for field in value.split(',') {
            if let Some(n) = field.strip_prefix("calls=") {
                calls += n.parse::<u64>().expect("calls");
            }
            if let Some(n) = field.strip_prefix("failed_calls=") {
                failed += n.parse::<u64>().expect("failed_calls");
            }
        }
    }
    (calls, failed)
}

fn host_stats(cluster: &Cluster, id: u32) -> HostStats {
    cluster.stats().host(id).expect("host stats").clone()
}

#[test]
fn counts_equal_what_the_servers_saw() {
    let (setup, cluster) = cluster(2, 1);
    let observer = setup.make_cluster().expect("a second cluster to read INFO");
    let keys: Vec<String> = (0..300).map(|i| format!("s{i}")).collect();
    // Maps: SETs and GETs (merged into MSET/MGET), INCRs, and INCRs of a
    // string (server errors).
    cluster
        .map(|c| {
            for k in &keys {
                c.set(k, "v");
            }
        })
        .expect("map of SETs");
    let _ = cluster.map(|c| {
        for k in &keys {
            c.get(k);
            c.incr(format!("n:{k}"));
        }
        for k in keys.iter().take(10) {
            c.incr(k);
        }
    });
    // The routing client, the async client, a fanout.
    let client = cluster.routing_client();
    for k in keys.iter().take(25) {
        let _: Option<Vec<u8>> = client.get(k).expect("GET");
    }
    let async_client = cluster.async_client();
    for k in keys.iter().take(40) {
        let _ = async_client.get(k).wait().expect("GET");
    }
    // The driver adds a read's counts after handing out its replies; its
    // last handle's drop waits for the thread, so they are all in.
    drop(async_client);
    cluster.all(|c| c.dbsize()).expect("DBSIZE");

    let mut errors_seen = 0;
    for host in [0, 1] {
        let stats = host_stats(&cluster, host);
        let (calls, failed) = server_calls(&observer, host);
        println!(
            "host {host}: rb counted {} commands, {} replies, {} server errors; the server {calls} calls, {failed} failed",
            stats.commands, stats.replies, stats.server_errors
        );
        assert_eq!(stats.commands, calls, "host {host}: commands");
        assert_eq!(
            stats.replies, stats.commands,
            "host {host}: a reply per command"
        );
        assert_eq!(stats.server_errors, failed, "host {host}: server errors");
        assert_eq!(stats.in_flight, 0, "host {host}: nothing in flight");
        assert_eq!(stats.timeouts, 0);
        assert!(stats.bytes_in > 0 && stats.bytes_out > 0);
        assert!(stats.latency.count > 0);
        errors_seen += stats.server_errors;
    }
    assert_eq!(errors_seen, 10, "the ten INCRs of a string");
}

#[test]
fn latency_quantiles_are_within_a_bucket_of_measured_ones() {
    let setup = TestSetup::new(1, 1).expect("start redis-server");
    let proxy = Proxy::to_unix(setup.socket(0));
    let cluster = Cluster::builder()
        .host(0, proxy.host_config())
        .build()
        .expect("cluster");
    let client = cluster.routing_client();
    client.set("k", 1).expect("warm up, unmeasured delay");
    let before = host_stats(&cluster, 0).latency;
    // Delays of 2 ms for 80 requests and 20 ms for 20: p50 in the first
    // group, p99 in the second.
    let mut measured = Vec::new();
    for (delay, n) in [(2u64, 80), (20, 20)] {
        proxy.set_fault(Fault::Delay(Duration::from_millis(delay)));
        for _ in 0..n {
            let t = Instant::now();
            let _: Option<Vec<u8>> = client.get("k").expect("GET");
            measured.push(t.elapsed());
        }
    }
    proxy.set_fault(Fault::None);
    measured.sort();
    let q = |p: f64| measured[((measured.len() as f64 * p).ceil() as usize).saturating_sub(1)];
    let (m50, m99) = (q(0.50), q(0.99));
    let stats = host_stats(&cluster, 0).latency;
    assert_eq!(stats.count - before.count, 100);
    println!(
        "measured around the client: p50 {m50:?}, p99 {m99:?}; rb's histogram: p50 {:?}, p99 {:?}, max {:?}",
        stats.p50, stats.p99, stats.max
    );
    // One bucket is 1/16 of its power of two: 6.25% of the value at most.
    let within_a_bucket = |got: Duration, want: Duration| {
        let (g, w) = (got.as_secs_f64(), want.as_secs_f64());
        (g - w).abs() <= w / 16.0 + 0.000_2
    };
    assert!(
        within_a_bucket(stats.p50, m50),
        "p50 {:?} vs {m50:?}",
        stats.p50
    );
    assert!(
        within_a_bucket(stats.p99, m99),
        "p99 {:?} vs {m99:?}",
        stats.p99
    );
}
