//! Review of two core changes: the driver's request queue (a locked vector
//! instead of an mpsc channel, 61fb04b) and short bulk strings converted by
//! the taker (`SlotState::Bulk`, 3a5e6fd).
//!
//! The review found one defect: once the driver thread had unwound (a
//! panic on it: a waker it called), the old channel's receiver was gone
//! and each later send was dropped at once, while the new queue was closed
//! only when `run` returned normally, so everything sent afterwards piled
//! up in it for as long as the client lived (a test here saw 257-259 MiB
//! kept after 256 SETs of 1 MiB). The queue is now closed by a guard that
//! also runs on an unwind; its test is `driver::tests::
//! work_queued_after_the_driver_panicked_is_dropped` (a reference count,
//! where this file's version measured the process's RSS, which also
//! counted what the unwinding thread had not dropped yet).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

mod common;
use rb::testing::TestSetup;
use rb::{cmd, join_all, AsyncOptions, Commands, Error, Execute, Reply, Value};

fn no_spin() -> AsyncOptions {
    AsyncOptions::new().spin(Duration::ZERO)
}

/// Values around the 64-byte inline limit, binary bytes, nil.
fn values() -> Vec<(String, Option<Vec<u8>>)> {
    let mut out = Vec::new();
    for len in [0usize, 1, 63, 64, 65, 127, 255, 256, 1000] {
        let v: Vec<u8> = (0..len).map(|i| (i * 37 % 256) as u8).collect();
        out.push((format!("rq:len{len}"), Some(v)));
    }
    out.push(("rq:bin".into(), Some(b"\0\xff\xfe\r\n$-1\r\n\0".to_vec())));
    out.push(("rq:nil".into(), None));
    out
}

fn load(client: &rb::AsyncClient, values: &[(String, Option<Vec<u8>>)]) {
    for (k, v) in values {
        match v {
            Some(v) => client.set(k, v.clone()).wait().expect("SET"),
            None => {
                let _: i64 = client.del(&[k]).wait().expect("DEL");
            }
        }
    }
}

/// Every bytes' type gets the same value through the deferred conversion
/// (merged MGET elements, which take `accept_bulk`) as through the plain
/// one, at 0, 63, 64, 65 ... bytes, binary, and nil; `String` still fails
/// on invalid UTF-8 naming the command.
#[test]
fn short_bulks_of_merged_gets_convert_like_long_ones() {
    let setup = TestSetup::new(2, 1).expect("servers");
    let cluster = setup.make_cluster().expect("cluster");
    let client = cluster.async_client_with(no_spin());
    let values = values();
    load(&client, &values);
    for _round in 0..20 {
        // Queued together: the driver merges them into MGETs per host.
        let get = |k: &str| cmd("GET").arg(k);
        let bytes: Vec<Reply<Vec<u8>>> =
            values.iter().map(|(k, _)| client.execute(get(k))).collect();
        let opt: Vec<Reply<Option<Vec<u8>>>> =
            values.iter().map(|(k, _)| client.execute(get(k))).collect();
        let val: Vec<Reply<Value>> = values.iter().map(|(k, _)| client.execute(get(k))).collect();
        let optval: Vec<Reply<Option<Value>>> =
            values.iter().map(|(k, _)| client.execute(get(k))).collect();
        let optopt: Vec<Reply<Option<Option<Vec<u8>>>>> =
            values.iter().map(|(k, _)| client.execute(get(k))).collect();
        let bytes = join_all(bytes);
        let opt = join_all(opt);
        let val = join_all(val);
        let optval = join_all(optval);
        let optopt = join_all(optopt);
        let bytes = block(bytes);
        let opt = block(opt);
        let val = block(val);
        let optval = block(optval);
        let optopt = block(optopt);
        for (i, (k, want)) in values.iter().enumerate() {
            let want_bytes = want.clone().unwrap_or_default();
            assert_eq!(bytes[i].as_ref().expect(k), &want_bytes, "{k} Vec<u8>");
            assert_eq!(opt[i].as_ref().expect(k), want, "{k} Option<Vec<u8>>");
            let want_val = match want {
                Some(v) => Value::BulkString(v.clone()),
                None => Value::Nil,
            };
            assert_eq!(val[i].as_ref().expect(k), &want_val, "{k} Value");
            let want_optval = want.clone().map(Value::BulkString);
            assert_eq!(
                optval[i].as_ref().expect(k),
                &want_optval,
                "{k} Option<Value>"
            );
            assert_eq!(
                optopt[i].as_ref().expect(k),
                &want.clone().map(Some),
                "{k} Option<Option<Vec<u8>>>"
            );
        }
    }
    // The GETs were merged (their elements take `accept_bulk`).
    let mgets: u64 = (0..2)
        .map(|h| common::command_calls(&cluster, h, "mget"))
        .sum();
    assert!(mgets > 0, "no GET was merged into an MGET");
    // A conversion that may fail stays on the driver, with its context.
    client.set("rq:bad", b"\xff".to_vec()).wait().expect("SET");
    let r: Vec<rb::Result<String>> = block(join_all(
        (0..4).map(|_| client.execute::<String>(cmd("GET").arg("rq:bad"))),
    ));
    for e in r {
        let e = e.expect_err("not UTF-8");
        assert!(e.to_string().contains("GET"), "{e}");
    }
}

fn block<F: Future + Unpin>(f: F) -> F::Output {
    // Reply::wait exists for one Reply; JoinAll needs a loop.
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut f = f;
    loop {
        if let Poll::Ready(v) = Pin::new(&mut f).poll(&mut cx) {
            return v;
        }
        std::thread::park_timeout(Duration::from_millis(50));
    }
}

/// A second poll after Ready answers "already taken" (no panic, no second
/// value); Debug never claims a taken value is still there.
#[test]
fn a_reply_polled_after_ready_says_taken() {
    let setup = TestSetup::new(1, 1).expect("servers");
    let cluster = setup.make_cluster().expect("cluster");
    let client = cluster.async_client_with(no_spin());
    client.set("rq:k", "v").wait().expect("SET");
    let mut reply: Reply<Option<Vec<u8>>> = client.get("rq:k");
    assert!(format!("{reply:?}").contains("waiting"), "{reply:?}");
    let first = block(&mut reply);
    assert_eq!(first.expect("GET"), Some(b"v".to_vec()));
    // 81fb1cc says "taken" (the slot is let go); ed95ef1 said "waiting".
    let shown = format!("{reply:?}");
    assert!(
        !shown.contains("ready") && !shown.contains("failed"),
        "{shown}"
    );
    let waker = Waker::from(Arc::new(Noop));
    let second = Pin::new(&mut reply).poll(&mut Context::from_waker(&waker));
    match second {
        Poll::Ready(Err(Error::Pending { .. })) => {}
        other => panic!("second poll: {other:?}"),
    }
    drop(reply);
}

struct Noop;
impl Wake for Noop {
    fn wake(self: Arc<Self>) {}
}

/// A reply that came after its deadline is ignored, short bulk or not: the
/// timed-out caller keeps its Timeout, the next GET its own value.
#[test]
fn a_late_short_bulk_does_not_settle_a_timed_out_reply() {
    let setup = TestSetup::new(1, 1).expect("servers");
    let cluster = setup
        .cluster_builder()
        .health(rb::HealthPolicy::disabled())
        .build()
        .expect("cluster");
    let client = cluster.async_client_with(no_spin().timeout(Duration::from_millis(100)));
    client.set("rq:a", "first").wait().expect("SET");
    client.set("rq:b", "second").wait().expect("SET");
    setup.pause(0).expect("pause");
    let a: Reply<Vec<u8>> = client.execute(cmd("GET").arg("rq:a"));
    let b: Reply<Value> = client.execute(cmd("GET").arg("rq:a"));
    // Both time out while the server is paused; their replies come late.
    assert!(matches!(a.wait(), Err(Error::Timeout { .. })));
    assert!(matches!(b.wait(), Err(Error::Timeout { .. })));
    setup.resume(0).expect("resume");
    let after: Vec<u8> = client.execute(cmd("GET").arg("rq:b")).wait().expect("GET");
    assert_eq!(after, b"second");
}

/// One caller's requests reach the server in the order sent, across many
/// driver turns, while other threads queue too (a lost wake-up would show
/// as a stall: each round has a deadline).
#[test]
fn one_callers_requests_keep_their_order_and_nobody_stalls() {
    let setup = TestSetup::new(1, 1).expect("servers");
    let cluster = setup.make_cluster().expect("cluster");
    let stop = Arc::new(AtomicBool::new(false));
    let noise: Vec<_> = (0..2)
        .map(|t| {
            let client = cluster.async_client();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let _ = client.set(format!("rq:noise{t}"), n).wait();
                    n += 1;
                }
            })
        })
        .collect();
    let client = cluster.async_client_with(no_spin());
    let started = Instant::now();
    for round in 0..200 {
        let t = Instant::now();
        let key = format!("rq:list{}", round % 4);
        let _: i64 = client.del(&[&key]).wait().expect("DEL");
        let pushes: Vec<Reply<i64>> = (0..50)
            .map(|i| client.execute(cmd("RPUSH").arg(&key).arg(i)))
            .collect();
        let lens = block(join_all(pushes));
        for (i, l) in lens.into_iter().enumerate() {
            assert_eq!(l.expect("RPUSH"), i as i64 + 1, "round {round}");
        }
        // Idle a little so the driver goes to sleep between rounds.
        if round % 10 == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "round {round} took {:?}",
            t.elapsed()
        );
    }
    stop.store(true, Ordering::Relaxed);
    for n in noise {
        n.join().expect("noise thread");
    }
    assert!(started.elapsed() < Duration::from_secs(30));
}
