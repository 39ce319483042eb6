//! Per-host health against real servers behind the fault proxy: a failing
//! host goes Down after the threshold and then costs nothing (HostDown at
//! once, no connect, no waiting); it is used again within one back-off
//! period after it recovers (by a request, or by the driver's background
//! probe); flapping does not pin it down; `disabled()` keeps the old
//! behaviour.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;
use common::host_of;
use common::proxy::{Fault, Proxy};
use rb::testing::TestSetup;
use rb::{Cluster, Commands, Error, HealthPolicy, HostEvent, HostHealth, MapOptions};

const FAULTY: u32 = 1;

/// Two hosts: 0 straight to a server, 1 through the proxy; `policy` for both.
fn rig(policy: HealthPolicy) -> (TestSetup, Proxy, Cluster, Arc<Mutex<Vec<String>>>) {
    let setup = TestSetup::new(2, 1).expect("start redis-server");
    let proxy = Proxy::to_unix(setup.socket(1));
    let events = Arc::new(Mutex::new(Vec::new()));
    let seen = events.clone();
    let cluster = Cluster::builder()
        .host(0, setup.host_config(0, 0))
        .host(
            FAULTY,
            proxy
                .host_config()
                .connect_timeout(Duration::from_millis(300))
                .read_timeout(Some(Duration::from_millis(300))),
        )
        .health(policy)
        .observer(Arc::new(move |e: &HostEvent| {
            let tag = match e {
                HostEvent::Connected { .. } => "connected",
                HostEvent::Failed { .. } => "failed",
                HostEvent::Down { .. } => "down",
                HostEvent::Up { .. } => "up",
                _ => "other",
            };
            seen.lock()
                .expect("events")
                .push(format!("{}:{tag}", e.host().id));
        }))
        .build()
        .expect("cluster");
    (setup, proxy, cluster, events)
}

fn key_of(cluster: &Cluster, host: u32) -> String {
    (0..)
        .map(|i| format!("k{i}"))
        .find(|k| host_of(cluster, k) == host)
        .expect("a key")
}

fn quick() -> HealthPolicy {
    HealthPolicy::new()
        .failures(3)
        .open_for(Duration::from_millis(200))
        .max_open_for(Duration::from_millis(800))
}

/// After 3 refused connects the host is Down: a routing call and a map to
/// it fail with HostDown in well under a millisecond, naming the host; the
/// other host is untouched; the observer saw failed x3 then down.
#[test]
fn a_down_host_fails_fast_with_host_down() {
    let (_setup, proxy, cluster, events) = rig(quick());
    let key = key_of(&cluster, FAULTY);
    let client = cluster.routing_client();
    client.set(&key, 1).expect("SET while healthy");
    proxy.set_fault(Fault::Refuse);
    for _ in 0..3 {
        let e = client.get(&key).expect_err("refused");
        assert!(e.is_connection_error(), "{e}");
    }
    assert!(matches!(
        cluster.health(FAULTY),
        Ok(HostHealth::Down { .. })
    ));
    let mut took = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let e = client.get(&key).expect_err("down");
        took.push(t.elapsed());
        assert!(e.is_host_down(), "{e}");
        assert_eq!(e.host().map(|h| h.id), Some(FAULTY));
    }
    took.sort();
    let median = took[took.len() / 2];
    println!(
        "HostDown from a routing GET: median {median:?}, max {:?}",
        took[took.len() - 1]
    );
    assert!(median < Duration::from_millis(1), "{median:?}");

    // A map: the down host's promises fail at once, the other host's work.
    let other = key_of(&cluster, 0);
    let t = Instant::now();
    let (mine, theirs) = {
        let mut out = None;
        let r = cluster.map(|c| out = Some((c.get(&key), c.get(&other))));
        assert!(r.expect_err("the down host fails the map").is_host_down());
        out.expect("promises")
    };
    println!("map with a Down host: {:?}", t.elapsed());
    assert!(mine.reason().is_some_and(|e| e.is_host_down()));
    assert!(theirs.value().is_ok());
    assert!(t.elapsed() < Duration::from_millis(50));
    let log = events.lock().expect("events").join(" ");
    assert!(log.contains("1:failed 1:failed 1:failed 1:down"), "{log}");
    assert!(!log.contains("0:failed"), "{log}");
}

/// A blackholed host (nothing answers) makes maps time out; with a map
/// timeout shorter than the connect budget, those timeouts count too, so
/// after three maps the fourth pays nothing for the host.
#[test]
fn map_timeouts_on_a_silent_host_take_it_down() {
    let (_setup, proxy, cluster, _events) = rig(quick());
    let key = key_of(&cluster, FAULTY);
    proxy.set_fault(Fault::Blackhole);
    let opts = MapOptions::new().timeout(Duration::from_millis(100));
    for _ in 0..3 {
        let e = cluster
            .map_with(opts.clone(), |c| {
                c.get(&key);
            })
            .expect_err("blackholed");
        assert!(e.is_timeout(), "{e}");
    }
    let t = Instant::now();
    let e = cluster
        .map_with(opts, |c| {
            c.get(&key);
        })
        .expect_err("down");
    assert!(e.is_host_down(), "{e}");
    assert!(t.elapsed() < Duration::from_millis(5), "{:?}", t.elapsed());
}

/// Once the fault clears, the host is used again within one back-off
/// period: the first request at `retry_at` probes it and brings it Up.
#[test]
fn a_recovered_host_is_used_again_within_one_period() {
    let (_setup, proxy, cluster, events) = rig(quick());
    let key = key_of(&cluster, FAULTY);
    let client = cluster.routing_client();
    proxy.set_fault(Fault::Refuse);
    for _ in 0..3 {
        let _ = client.get(&key);
    }
    let HostHealth::Down { retry_at, .. } = cluster.health(FAULTY).expect("health") else {
        panic!("not down");
    };
    proxy.set_fault(Fault::None);
    let t = Instant::now();
    let back = loop {
        match client.get(&key) {
            Ok(_) => break t.elapsed(),
            Err(e) => assert!(e.is_host_down(), "{e}"),
        }
        assert!(t.elapsed() < Duration::from_secs(2), "never came back");
        std::thread::yield_now();
    };
    let period = retry_at.saturating_duration_since(t);
    println!("back after {back:?} (retry was due in {period:?})");
    assert!(
        back <= period + Duration::from_millis(50),
        "{back:?} vs {period:?}"
    );
    assert!(matches!(cluster.health(FAULTY), Ok(HostHealth::Up)));
    assert!(events.lock().expect("events").join(" ").ends_with("1:up"));
}

/// Failures interleaved with successes never reach the threshold.
#[test]
fn flapping_does_not_pin_a_host_down() {
    let (_setup, proxy, cluster, _events) = rig(quick());
    let key = key_of(&cluster, FAULTY);
    let client = cluster.routing_client();
    for _ in 0..10 {
        proxy.set_fault(Fault::Refuse);
        for _ in 0..2 {
            let e = client.get(&key).expect_err("refused");
            assert!(e.is_connection_error(), "{e}");
        }
        proxy.set_fault(Fault::None);
        client.get(&key).expect("a success in between");
    }
    assert!(matches!(cluster.health(FAULTY), Ok(HostHealth::Up)));
}

/// `disabled()`: every request meets the fault itself, as before.
#[test]
fn disabled_health_keeps_trying_the_host() {
    let (_setup, proxy, cluster, events) = rig(HealthPolicy::disabled());
    let key = key_of(&cluster, FAULTY);
    let client = cluster.routing_client();
    proxy.set_fault(Fault::Refuse);
    for _ in 0..10 {
        let e = client.get(&key).expect_err("refused");
        assert!(e.is_connection_error(), "{e}");
    }
    assert!(matches!(cluster.health(FAULTY), Ok(HostHealth::Up)));
    assert!(!events.lock().expect("events").join(" ").contains("down"));
}

/// The driver probes a Down host in the background: it comes back Up with
/// no user request.
#[test]
fn the_driver_brings_a_host_back_without_a_request() {
    let (_setup, proxy, cluster, _events) = rig(quick());
    let key = key_of(&cluster, FAULTY);
    let client = cluster.async_client();
    proxy.set_fault(Fault::Refuse);
    for _ in 0..3 {
        let e = client.get(&key).wait().expect_err("refused");
        assert!(e.is_connection_error(), "{e}");
    }
    let e = client.get(&key).wait().expect_err("down");
    assert!(matches!(e, Error::HostDown { .. }), "{e}");
    proxy.set_fault(Fault::None);
    let t = Instant::now();
    while !matches!(cluster.health(FAULTY), Ok(HostHealth::Up)) {
        assert!(t.elapsed() < Duration::from_secs(3), "still down");
        std::thread::sleep(Duration::from_millis(5));
    }
    println!(
        "the driver's probe brought the host back after {:?}",
        t.elapsed()
    );
    client.get(&key).wait().expect("up again");
}

/// Async requests that were in flight together on a silent host are one
/// piece of evidence, however the driver's turns group their timeouts:
/// ten requests made 5 ms apart (all before the first times out) leave the
/// host Up (one failure of three); two more rounds, each made after the
/// last timeout was heard, take it Down. Before, each turn's timeouts
/// counted: the ten took the host Down at once.
#[test]
fn async_timeouts_in_flight_together_count_once() {
    let (_setup, proxy, cluster, _events) = rig(quick());
    let key = key_of(&cluster, FAULTY);
    let client = cluster.async_client_with(
        rb::AsyncOptions::new()
            .timeout(Duration::from_millis(100))
            .spin(Duration::ZERO),
    );
    client.get(&key).wait().expect("connected");
    proxy.set_fault(Fault::Blackhole);
    let round = || {
        let replies: Vec<_> = (0..10)
            .map(|_| {
                let r = client.get(&key);
                std::thread::sleep(Duration::from_millis(5));
                r
            })
            .collect();
        for r in replies {
            assert!(r.wait().expect_err("blackholed").is_timeout());
        }
    };
    round();
    assert!(
        cluster.health(FAULTY).expect("health").is_up(),
        "one failure"
    );
    round();
    round();
    assert!(
        !cluster.health(FAULTY).expect("health").is_up(),
        "three failures"
    );
}
