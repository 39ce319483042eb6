//! The client surface: `&self` everywhere (clients shared through `Arc`),
//! rb's explicit mapping and fanout clients (join, cancel, drop), and
//! options that cannot work refused instead of clamped.

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;
use common::{cluster, host_of};
use rb::{Commands, Error, Execute, Hosts, MapOptions, Promise};

fn assert_send_sync<T: Send + Sync + 'static>() {}

/// The immediate clients can sit in an `Arc<AppState>` and be used from
/// many threads through `&self`.
#[test]
fn immediate_clients_are_shared_through_arc() {
    assert_send_sync::<rb::RoutingClient>();
    assert_send_sync::<rb::LocalClient>();
    let (_setup, cluster) = cluster(2, 1);
    struct AppState {
        redis: rb::RoutingClient,
    }
    let state = Arc::new(AppState {
        redis: cluster.routing_client(),
    });
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let state = state.clone();
            std::thread::spawn(move || {
                for i in 0..50 {
                    let key = format!("t{t}:{i}");
                    state.redis.set(&key, i).expect("SET");
                    let n: i64 = state.redis.incr(&key).expect("INCR");
                    assert_eq!(n, i + 1);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("worker thread");
    }
    let local = cluster.local_client(0).expect("local client");
    let shared: &rb::LocalClient = &local;
    assert!(shared.dbsize().expect("DBSIZE") > 0 || shared.dbsize().is_ok());
}

/// rb's `get_mapping_client`: promises are pending until `join`, which
/// settles every one of them; the client can be used and joined again.
#[test]
fn explicit_mapping_client_joins_and_is_reusable() {
    let (_setup, cluster) = cluster(2, 2);
    let m = cluster.mapping_client(MapOptions::new());
    let sets: Vec<Promise<()>> = (0..100).map(|i| m.set(format!("k{i}"), i)).collect();
    m.join(Some(Duration::from_secs(5))).expect("first join");
    assert!(sets.iter().all(|p| p.is_resolved()));

    let gets: Vec<Promise<Option<Vec<u8>>>> = (0..100).map(|i| m.get(format!("k{i}"))).collect();
    m.join(None).expect("second join");
    for (i, p) in gets.iter().enumerate() {
        assert_eq!(p.value().expect("GET"), Some(i.to_string().into_bytes()));
    }
}

/// A join's error is the first failure since the last join, and only that.
#[test]
fn explicit_mapping_client_reports_failures_per_join() {
    let (_setup, cluster) = cluster(1, 1);
    let m = cluster.mapping_client(MapOptions::new());
    m.set("s", "text");
    let bad = m.incr("s");
    assert!(m.join(None).is_err(), "INCR of a string fails the join");
    assert!(bad.is_rejected());
    let good = m.incr("n");
    m.join(None).expect("the next join sees no old failure");
    assert_eq!(good.value().expect("INCR"), 1);
}

/// `join(timeout)` rejects what is left with a timeout on time; `cancel`
/// rejects with `Cancelled`; dropping without a join cancels, too.
#[test]
fn explicit_mapping_client_timeout_cancel_and_drop() {
    let (setup, cluster) = cluster(2, 1);
    let paused_key = (0..)
        .map(|i| format!("p{i}"))
        .find(|k| host_of(&cluster, k) == 0)
        .expect("a key of host 0");
    let live_key = (0..)
        .map(|i| format!("l{i}"))
        .find(|k| host_of(&cluster, k) == 1)
        .expect("a key of host 1");
    setup.pause(0).expect("SIGSTOP host 0");

    let m = cluster.mapping_client(MapOptions::new());
    let stuck = m.get(&paused_key);
    let live = m.set(&live_key, 1);
    let start = Instant::now();
    let err = m
        .join(Some(Duration::from_millis(150)))
        .expect_err("host 0 is paused");
    let took = start.elapsed();
    assert!(err.is_timeout(), "{err}");
    assert!(took < Duration::from_millis(600), "join took {took:?}");
    assert!(stuck.reason().is_some_and(|e| e.is_timeout()));
    assert!(live.is_resolved(), "the live host's promise resolves");

    let m = cluster.mapping_client(MapOptions::new());
    let stuck = m.get(&paused_key);
    m.cancel();
    match stuck.reason() {
        Some(Error::Cancelled { host, .. }) => assert_eq!(host.id, 0),
        other => panic!("want Cancelled, got {other:?}"),
    }

    let stuck = {
        let m = cluster.mapping_client(MapOptions::new());
        m.get(&paused_key)
    };
    assert!(
        matches!(stuck.reason(), Some(Error::Cancelled { .. })),
        "dropped client: {:?}",
        stuck.reason()
    );
    setup.resume(0).expect("SIGCONT host 0");
    cluster
        .routing_client()
        .get(&paused_key)
        .expect("host 0 works again");
}

/// rb's `get_fanout_client`, joined by hand, with `target` and `target_key`.
#[test]
fn explicit_fanout_client() {
    let (_setup, cluster) = cluster(2, 2);
    let f = cluster.fanout_client(Hosts::All);
    f.target_key("foo").set("foo", 1);
    let sizes = f.dbsize();
    let one = f.target(&[1]).dbsize();
    f.join(Some(Duration::from_secs(5))).expect("join");
    let sizes = sizes.value().expect("DBSIZE everywhere");
    assert_eq!(sizes.len(), 4);
    assert_eq!(sizes.values().sum::<i64>(), 1);
    assert_eq!(one.value().expect("DBSIZE on 1").len(), 1);

    let unknown = cluster.fanout_client(Hosts::Ids(vec![0, 99]));
    let p = unknown.dbsize();
    assert!(matches!(p.reason(), Some(Error::NoSuchHost { id: 99 })));
    assert!(matches!(
        unknown.join(None),
        Err(Error::NoSuchHost { id: 99 })
    ));
}

/// A command issued from a promise callback while the same client is
/// sending is refused with an error, never a panic.
#[test]
fn reentrant_command_from_a_callback_is_refused() {
    let (_setup, cluster) = cluster(1, 1);
    let m = Rc::new(cluster.mapping_client(MapOptions::new()));
    let inner = Rc::new(std::cell::RefCell::new(None));
    // The first SET's callback runs when its reply is read; with enough
    // commands queued that reads happen while enqueuing, it runs inside
    // a later `set` call.
    let first = m.set("a", "x".repeat(1000));
    let (m2, slot) = (m.clone(), inner.clone());
    first.done(move |_| *slot.borrow_mut() = Some(m2.get("a")), |_| {});
    for i in 0..20_000 {
        m.set(format!("b{i}"), "y".repeat(100));
    }
    m.join(Some(Duration::from_secs(10))).ok();
    let got = inner.borrow_mut().take().expect("the callback ran");
    // It ran inside a later `set` (its reply was read while the map was
    // still sending): refused with an error, not a panic.
    assert!(
        matches!(got.reason(), Some(Error::Unsupported { .. })),
        "{:?}",
        got.reason()
    );
}

/// Zero concurrency or batch size is refused, not silently clamped.
#[test]
fn zero_concurrency_and_batch_size_are_refused() {
    let (_setup, cluster) = cluster(1, 1);
    for opts in [
        MapOptions::new().max_concurrency(0),
        MapOptions::new().max_batch_size(0),
    ] {
        let err = cluster.map_with(opts.clone(), |_| ()).expect_err("map");
        assert!(matches!(err, Error::Config { .. }), "{err}");
        let err = cluster
            .fanout_with(opts.clone(), Hosts::All, |_| ())
            .expect_err("fanout");
        assert!(matches!(err, Error::Config { .. }), "{err}");
        let m = cluster.mapping_client(opts.clone());
        assert!(matches!(m.get("k").reason(), Some(Error::Config { .. })));
        let err = cluster
            .execute_commands_with(opts, [("k", vec![rb::cmd("GET").arg("k").into()])])
            .expect_err("execute_commands");
        assert!(matches!(err, Error::Config { .. }), "{err}");
    }
}

/// `Execute` takes `&self`: one generic function serves every client.
#[test]
fn execute_takes_shared_references() {
    fn bump<C: Execute>(c: &C) -> C::Output<i64> {
        c.execute(rb::cmd("INCR").arg("n"))
    }
    let (_setup, cluster) = cluster(2, 1);
    assert_eq!(bump(&cluster.routing_client()).expect("INCR"), 1);
    let p = cluster.map(bump).expect("map");
    assert_eq!(p.value().expect("INCR"), 2);
    let local = cluster.local_client_for_key("n").expect("local");
    assert_eq!(bump(&local).expect("INCR"), 3);
}
