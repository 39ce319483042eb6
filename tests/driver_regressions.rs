//! Defects a review found in the async driver and the transactions, each
//! reproduced here first (every test failed on commit 6032988):
//! a transaction cut in two by a health probe left a pooled connection in
//! MULTI; an async transaction let other callers' requests in between (a
//! GET answered `QUEUED`); dropping the last handle could deadlock on a
//! dropped task's waker; a host replaced under the driver kept its old
//! stats; a request right after `add_host` was cancelled. And one found
//! later (failed on 0a2a958): a caller's waker
//! that panicked ended the driver thread, after which every caller's
//! requests waited forever.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Wake, Waker};
use std::time::{Duration, Instant};

mod common;
use common::host_of;
use common::proxy::{Fault, Proxy};
use rb::testing::TestSetup;
use rb::{Cluster, Commands, HealthPolicy, HostConfig, HostHealth, Hosts, Value};

fn key_of(cluster: &Cluster, host: u32) -> String {
    (0..)
        .map(|i| format!("k{i}"))
        .find(|k| host_of(cluster, k) == host)
        .expect("a key")
}

struct LockingWaker(Arc<Mutex<()>>);
impl Wake for LockingWaker {
    fn wake(self: Arc<Self>) {
        let _g = self.0.lock();
    }
}

/// A transaction whose MULTI is the health probe of a Down host: MULTI
/// goes out alone (the rest are refused HostDown), and the connection goes
/// back to the pool inside MULTI.
#[test]
fn a_transaction_that_is_a_health_probe_runs_whole_or_not_at_all() {
    let setup = TestSetup::new(2, 1).expect("servers");
    let proxy = Proxy::to_unix(setup.socket(1));
    let cluster = Cluster::builder()
        .host(0, setup.host_config(0, 0))
        .host(
            1,
            proxy
                .host_config()
                .connect_timeout(Duration::from_millis(300))
                .read_timeout(Some(Duration::from_millis(300))),
        )
        .health(
            HealthPolicy::new()
                .failures(3)
                .open_for(Duration::from_millis(100))
                .max_open_for(Duration::from_millis(200)),
        )
        .build()
        .expect("cluster");
    let key = key_of(&cluster, 1);
    let client = cluster.routing_client();
    client.set(&key, "before").expect("SET");
    proxy.set_fault(Fault::Refuse);
    for _ in 0..3 {
        let _ = client.get(&key);
    }
    assert!(matches!(cluster.health(1), Ok(HostHealth::Down { .. })));
    proxy.set_fault(Fault::None);
    // Wait out the Down period (a time, not another thread's progress).
    if let Ok(HostHealth::Down { retry_at, .. }) = cluster.health(1) {
        std::thread::sleep(
            retry_at.saturating_duration_since(Instant::now()) + Duration::from_millis(5),
        );
    }
    let r: rb::Result<Vec<Value>> = client.transaction(&[&key], |tx| {
        tx.set(&key, "in-tx");
        Ok(())
    });
    // The transaction ran whole (it carried the probe) or not at all; the
    // connection it used serves the next command cleanly either way.
    let got = client.get(&key).expect("GET after");
    client.set(&key, "after").expect("SET after");
    let direct = Cluster::builder()
        .host(0, setup.host_config(1, 0))
        .build()
        .expect("direct");
    let truth = direct
        .local_client(0)
        .expect("local")
        .get(&key)
        .expect("GET");
    match r {
        Ok(_) => assert_eq!(got, Some(b"in-tx".to_vec())),
        Err(e) => {
            assert!(e.is_host_down(), "{e}");
            assert_eq!(got, Some(b"before".to_vec()));
        }
    }
    assert_eq!(truth, Some(b"after".to_vec()), "the SET after it ran");
}

/// An async transaction's MULTI..EXEC is queued with one mpsc send per
/// command: other callers' requests to the same host can land in between.
#[test]
fn an_async_transaction_is_one_uninterrupted_block() {
    let setup = TestSetup::new(1, 1).expect("servers");
    let cluster = setup.make_cluster().expect("cluster");
    let client = cluster.async_client();
    client.set("k", "v").wait().expect("SET");
    let stop = Arc::new(AtomicBool::new(false));
    let bad_gets = Arc::new(AtomicUsize::new(0));
    let sample = Arc::new(Mutex::new(None));
    let mut readers = Vec::new();
    for _ in 0..3 {
        let (c, stop, bad, sample) = (
            client.clone(),
            stop.clone(),
            bad_gets.clone(),
            sample.clone(),
        );
        readers.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let r = c.get("k").wait();
                if !matches!(&r, Ok(Some(v)) if v == b"v") {
                    bad.fetch_add(1, Ordering::Relaxed);
                    sample.lock().unwrap().get_or_insert(format!("{r:?}"));
                }
            }
        }));
    }
    let started = Instant::now();
    let (mut txs, mut bad_txs, mut first_bad) = (0, 0, None);
    while started.elapsed() < Duration::from_secs(4) && bad_gets.load(Ordering::Relaxed) == 0 {
        let r: rb::Result<Vec<Value>> = client
            .transaction(&["t"], |tx| {
                for _ in 0..200 {
                    tx.incr("t");
                }
                Ok(())
            })
            .wait();
        txs += 1;
        if !matches!(&r, Ok(v) if v.len() == 200) {
            bad_txs += 1;
            first_bad.get_or_insert(format!("{:?}", r.map(|v| v.len())));
        }
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    println!(
        "{txs} transactions, {bad_txs} bad (first: {first_bad:?}); {} bad GETs (first: {:?})",
        bad_gets.load(Ordering::Relaxed),
        sample.lock().unwrap()
    );
    assert_eq!(bad_gets.load(Ordering::Relaxed) + bad_txs, 0);
}

/// Dropping the last handle joins the driver, which settles outstanding
/// requests and calls their (possibly dropped) tasks' wakers while the
/// dropping thread waits: a waker that takes a lock the dropper holds
/// deadlocks.
#[test]
fn dropping_the_last_handle_calls_no_dropped_tasks_waker() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming() {
            held.push(s);
        }
    });
    let cluster = Cluster::builder()
        .host(0, HostConfig::new().host("127.0.0.1").port(port))
        .health(HealthPolicy::disabled())
        .build()
        .unwrap();
    let lock = Arc::new(Mutex::new(()));
    let waker = Waker::from(Arc::new(LockingWaker(lock.clone())));
    let client = cluster.async_client();
    let mut reply = client.get("k");
    let mut cx = Context::from_waker(&waker);
    assert!(std::pin::Pin::new(&mut reply).poll(&mut cx).is_pending());
    std::thread::sleep(Duration::from_millis(100));
    let (tx, rx) = std::sync::mpsc::channel();
    let l2 = lock.clone();
    std::thread::spawn(move || {
        let _g = l2.lock().unwrap(); // e.g. an executor's run queue
        drop(reply); // a task dropped during shutdown
        drop(client);
        let _ = tx.send(());
    });
    let done = rx.recv_timeout(Duration::from_secs(3)).is_ok();
    println!("drop of the last handle finished: {done}");
    assert!(
        done,
        "deadlock: Driver::drop joins the thread that waits for our lock"
    );
}

/// A host replaced (removed and added again with the same id) keeps the
/// driver's slot with the old host's HostWatch: the new entry's stats and
/// health never hear of async traffic.
#[test]
fn a_replaced_host_gets_the_drivers_stats() {
    let setup = TestSetup::new(1, 1).expect("servers");
    let cluster = Cluster::builder()
        .host(0, setup.host_config(0, 0))
        .build()
        .unwrap();
    let client = cluster.async_client();
    client.get("k").wait().expect("GET");
    assert!(cluster.remove_host(0));
    cluster
        .add_host(Some(0), setup.host_config(0, 0))
        .expect("add");
    for _ in 0..10 {
        client.get("k").wait().expect("GET");
    }
    // The driver adds a read's counts after handing its replies out; its
    // last handle's drop waits for it.
    drop(client);
    let routing = cluster.routing_client();
    routing.get("k").expect("GET");
    let s = &cluster.stats().hosts[&0];
    println!(
        "host 0 after re-add: commands {} replies {} (10 async + 1 routing sent)",
        s.commands, s.replies
    );
    assert!(s.commands >= 11);
}

/// add_host then an async request to the new host at once: the driver
/// drains requests before it takes the new host table.
#[test]
fn an_async_request_right_after_add_host_reaches_it() {
    let setup = TestSetup::new(1, 16).expect("servers");
    let cluster = Cluster::builder()
        .host(0, setup.host_config(0, 0))
        .build()
        .unwrap();
    let client = cluster.async_client();
    let mut failures = Vec::new();
    for db in 1..16u32 {
        // keep the driver spinning
        let _ = client.get("warm").wait();
        cluster
            .add_host(Some(db), setup.host_config(0, db as usize))
            .expect("add");
        let r = client
            .fanout(Hosts::Ids(vec![db]))
            .cmd::<String>(rb::cmd("PING"))
            .wait();
        if let Err(e) = r {
            failures.push(format!("{db}: {e}"));
        }
    }
    println!(
        "{} of 15 PINGs to a just-added host failed: {:?}",
        failures.len(),
        failures.first()
    );
    assert!(failures.is_empty());
}

/// A waker that panics when woken (a broken executor), after saying so.
struct PanickingWaker(Arc<AtomicBool>);
impl Wake for PanickingWaker {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::SeqCst);
        panic!("a broken executor's waker");
    }
}

/// One caller's broken waker must not take the driver down with it: the
/// driver calls wakers on its thread, and a panic there ended the thread,
/// after which every request of every caller waited forever (no deadline
/// fires without the driver).
#[test]
fn a_panicking_waker_does_not_stop_the_driver() {
    let setup = TestSetup::new(1, 1).expect("servers");
    let cluster = setup.make_cluster().expect("cluster");
    let client = cluster.async_client_with(
        rb::AsyncOptions::new()
            .spin(Duration::ZERO)
            .timeout(Duration::from_secs(2)),
    );
    client.set("pw:k", "v").wait().expect("SET");
    let woken = Arc::new(AtomicBool::new(false));
    let waker = Waker::from(Arc::new(PanickingWaker(woken.clone())));
    let mut broken = client.get("pw:k");
    assert!(std::pin::Pin::new(&mut broken)
        .poll(&mut Context::from_waker(&waker))
        .is_pending());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !woken.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "the waker was never called");
        std::thread::yield_now();
    }
    drop(broken);
    // Another caller, after: answered (or at worst timed out), not left
    // waiting forever.
    let (tx, rx) = std::sync::mpsc::channel();
    let other = client.clone();
    std::thread::spawn(move || {
        let _ = tx.send(other.get("pw:k").wait());
    });
    let got = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("a GET after a broken waker never finished: the driver died");
    assert_eq!(got.expect("GET"), Some(b"v".to_vec()));
}
