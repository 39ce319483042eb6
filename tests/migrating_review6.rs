//! Review of d8dd38f/ca0b476 (a migrating map's GET keeps its nil as a
//! miss in the session and its slot among the map's GET keys): scenarios
//! against real servers. Each GET's key holds its own name as its value,
//! so a promise settled with another key's reply shows.

use std::sync::Arc;
use std::time::Duration;

mod common;
use common::{host_of, moving_keys as moving, over_unix_speaking as over, staying_keys as staying};
use rb::testing::TestSetup;
use rb::{Cluster, Commands, HostConfig, HostId, MapOptions, Protocol, Router, RouterKind, Value};

/// Keys on their old owner only (value = key), keys on their new owner
/// (value = key), keys nowhere; GETs of all of them interleaved, in
/// several rounds of one mapping client (some rounds cancelled, some with
/// big writes between the GETs so that replies are read while sending).
fn rounds(protocol: Protocol, opts: MapOptions) {
    let setup = TestSetup::new(3, 1).expect("servers");
    let old = over(&setup, 2, None, protocol);
    let new = over(&setup, 3, Some(&old), protocol);
    let on_old = moving(&old, &new, "old", 30);
    let on_new = moving(&old, &new, "new", 30);
    let nowhere = moving(&old, &new, "none", 30);
    let stay = staying(&old, &new, "stay", 10);
    let oldc = old.routing_client();
    for k in &on_old {
        oldc.set(k, k.as_str()).expect("SET old");
    }
    let newc = new.routing_client();
    // Written straight to their new owners (a routing SET through the
    // migrating cluster would do the same, plus the old copy's DEL).
    for k in &on_new {
        new.local_client(host_of(&new, k))
            .expect("local")
            .set(k, k.as_str())
            .expect("SET new");
    }
    for k in &stay {
        newc.set(k, k.as_str()).expect("SET stay");
    }
    let filler = &stay[0];
    let m = new.mapping_client(opts);
    for round in 0..6 {
        let mut expect = Vec::new();
        for i in 0..30 {
            for (keys, present) in [(&on_old, true), (&on_new, true), (&nowhere, false)] {
                let k = &keys[(i + round * 7) % keys.len()];
                expect.push((k.clone(), present, m.get(k.as_str())));
            }
            if round % 2 == 1 && i % 10 == 0 {
                // Past the early-write threshold: replies come in while sending.
                let _: rb::Promise<Value> =
                    m.cmd(rb::cmd("SET").arg(filler.as_str()).arg(vec![b'x'; 70_000]));
            }
        }
        if round == 3 {
            m.cancel();
            for (k, _, p) in &expect {
                assert!(!p.is_pending(), "round {round}: {k} left pending by cancel");
                if let Ok(Some(v)) = p.value() {
                    assert_eq!(
                        v,
                        k.as_bytes(),
                        "round {round}: {k} got another key's value"
                    );
                }
            }
            let _ = m.join(Some(Duration::from_secs(5)));
            continue;
        }
        m.join(Some(Duration::from_secs(10))).expect("join");
        for (k, present, p) in &expect {
            assert!(!p.is_pending(), "round {round}: {k} pending after the join");
            let got = p.value().expect("GET");
            let want = present.then(|| k.as_bytes().to_vec());
            // A key found on its old owner may have been copied forward:
            // its value stays the same.
            assert_eq!(got, want, "round {round}: {k}");
        }
    }
}

#[test]
fn reused_client_resp2_batched() {
    rounds(Protocol::Resp2, MapOptions::new());
}

#[test]
fn reused_client_resp3_unbatched_one_host_at_a_time() {
    rounds(
        Protocol::Resp3,
        MapOptions::new().auto_batch(false).max_concurrency(1),
    );
}

#[test]
fn reused_client_small_batches_one_host_at_a_time() {
    rounds(
        Protocol::Resp2,
        MapOptions::new().max_batch_size(2).max_concurrency(1),
    );
}

/// A typed GET: the old owner's value converts (or fails to) as a hit on
/// the new owner would.
#[test]
fn typed_get_of_a_value_on_the_old_owner() {
    let setup = TestSetup::new(3, 1).expect("servers");
    let old = over(&setup, 2, None, Protocol::Resp2);
    let new = over(&setup, 3, Some(&old), Protocol::Resp2);
    let ks = moving(&old, &new, "t", 3);
    let oldc = old.routing_client();
    oldc.set(&ks[0], "abc").expect("SET");
    oldc.set(&ks[1], "5").expect("SET");
    let m = new.mapping_client(MapOptions::new());
    let bad: rb::Promise<i64> = m.cmd(rb::cmd("GET").arg(&ks[0]));
    let good: rb::Promise<i64> = m.cmd(rb::cmd("GET").arg(&ks[1]));
    let none: rb::Promise<Option<i64>> = m.cmd(rb::cmd("GET").arg(&ks[2]));
    let r = m.join(Some(Duration::from_secs(5)));
    println!("join: {r:?}; bad: {:?}", bad.value());
    assert!(bad.value().is_err());
    assert_eq!(good.value().expect("5"), 5);
    assert_eq!(none.value().expect("nil"), None);
    assert!(r.is_err(), "a conversion failure is the join's");
}

/// A callback of a migrating GET's promise runs another migrating map on
/// the same thread (its own read table and miss list) while the first
/// map hands out its final replies.
#[test]
fn a_map_inside_a_callback_of_a_miss() {
    let setup = TestSetup::new(3, 1).expect("servers");
    let old = over(&setup, 2, None, Protocol::Resp2);
    let new = over(&setup, 3, Some(&old), Protocol::Resp2);
    let ks = moving(&old, &new, "cb", 40);
    let oldc = old.routing_client();
    for k in &ks[..20] {
        oldc.set(k, k.as_str()).expect("SET");
    }
    let inner_results = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let outer = new
        .map(|c| {
            ks.iter()
                .map(|k| {
                    let p = c.get(k.as_str());
                    let (new, ks, out) = (new.clone(), ks.clone(), inner_results.clone());
                    let _ = p.then(move |_| {
                        let got = new
                            .map(|c2| {
                                ks.iter()
                                    .map(|k| (k.clone(), c2.get(k.as_str())))
                                    .collect::<Vec<_>>()
                            })
                            .expect("inner map");
                        out.borrow_mut().push(got);
                    });
                    (k.clone(), p)
                })
                .collect::<Vec<_>>()
        })
        .expect("outer map");
    for (i, (k, p)) in outer.iter().enumerate() {
        let want = (i < 20).then(|| k.as_bytes().to_vec());
        assert_eq!(p.value().expect("GET"), want, "{k}");
    }
    let inner = inner_results.borrow();
    assert_eq!(inner.len(), 40);
    for got in inner.iter() {
        for (i, (k, p)) in got.iter().enumerate() {
            let want = (i < 20).then(|| k.as_bytes().to_vec());
            assert_eq!(p.value().expect("inner GET"), want, "inner {k}");
        }
    }
}

/// A paused old owner and a join with a timeout: every GET settles.
#[test]
fn a_paused_old_owner_and_a_timeout() {
    let setup = TestSetup::new(3, 1).expect("servers");
    let old = over(&setup, 2, None, Protocol::Resp2);
    let new = over(&setup, 3, Some(&old), Protocol::Resp2);
    let ks = moving(&old, &new, "p", 20);
    setup.pause(0).expect("pause");
    let m = new.mapping_client(MapOptions::new());
    let ps: Vec<_> = ks.iter().map(|k| m.get(k.as_str())).collect();
    let r = m.join(Some(Duration::from_millis(300)));
    setup.resume(0).expect("resume");
    println!("join: {r:?}");
    for (k, p) in ks.iter().zip(&ps) {
        assert!(!p.is_pending(), "{k} pending");
    }
    // The client is usable again.
    let again: Vec<_> = ks.iter().map(|k| m.get(k.as_str())).collect();
    m.join(Some(Duration::from_secs(5))).expect("join again");
    for p in again {
        assert_eq!(p.value().expect("GET"), None);
    }
}

/// The partition router, except that commands for host 2 go to host 0.
struct Redirecting {
    inner: Arc<dyn Router>,
}

impl Router for Redirecting {
    fn host_for_key(&self, key: &[u8]) -> rb::Result<HostId> {
        self.inner.host_for_key(key)
    }

    fn host_for_command(&self, cmd: &rb::Cmd) -> rb::Result<HostId> {
        // A router that keeps reads off host 2 while it warms up (say):
        // its commands go to host 0 instead.
        let host = self.inner.host_for_command(cmd)?;
        Ok(if host == 2 { 0 } else { host })
    }
}

/// A custom router's `host_for_command` decides where a plain map's and
/// the async client's GET go; a migrating map's GET used it too before
/// this change, and now asks `host_for_key` only.
#[test]
fn a_migrating_gets_route_is_the_routers_host_for_command() {
    let setup = TestSetup::new(3, 1).expect("servers");
    let old = over(&setup, 2, None, Protocol::Resp2);
    let plain_new = over(&setup, 3, None, Protocol::Resp2);
    let inner = plain_new.router().expect("router");
    let mut b = Cluster::builder().custom_router(Arc::new(Redirecting {
        inner: inner.clone(),
    }));
    for i in 0..3 {
        let path = setup.socket(i).to_string_lossy().into_owned();
        b = b.host(i as u32, HostConfig::new().unix_socket_path(path));
    }
    let new = b.migrating_from(&old).build().expect("new");
    // A key whose new owner by key is host 2 (host 0 by host_for_command)
    // and whose old owner is host 1.
    let k = (0..)
        .map(|i| format!("r{i}"))
        .find(|k| inner.host_for_key(k.as_bytes()).ok() == Some(2) && host_of(&old, k) == 1)
        .expect("key");
    // Written through the migrating cluster itself (the SET goes where
    // host_for_command says: host 0).
    new.map(|c| c.set(&k, "v")).expect("SET");
    let via_async = new.async_client().get(&k).wait().expect("async GET");
    let via_map = new.map(|c| c.get(&k)).expect("map").value().expect("GET");
    println!("async: {via_async:?}, map: {via_map:?}");
    assert_eq!(
        via_map,
        Some(b"v".to_vec()),
        "a value the map wrote reads as missing"
    );
    assert_eq!(via_map, via_async, "the map and the async client disagree");
}

/// A GET's nil read while the map was still sending (kept for the old
/// owner), then `cancel()`: the promise is rejected (now "cancelled while
/// waiting for GET", before "cancelled"), and the failure is recorded.
#[test]
fn cancel_of_a_kept_miss_error_and_next_join() {
    let setup = TestSetup::new(3, 1).expect("servers");
    let old = over(&setup, 2, None, Protocol::Resp2);
    let new = over(&setup, 3, Some(&old), Protocol::Resp2);
    let k = moving(&old, &new, "c", 1).remove(0);
    let h = host_of(&new, &k);
    let s = (0..)
        .map(|i| format!("s{i}"))
        .find(|s| host_of(&new, s) == h && host_of(&old, s) == h)
        .expect("a key staying on the new owner");
    let m = new.mapping_client(MapOptions::new().auto_batch(false));
    let miss = m.get(&k);
    let big = vec![b'x'; 100_000];
    let a: rb::Promise<Value> = m.cmd(rb::cmd("SET").arg(&s).arg(big.as_slice()));
    let b: rb::Promise<Value> = m.cmd(rb::cmd("SET").arg(&s).arg(big.as_slice()));
    // Let the server answer what went out; the next early write reads it.
    std::thread::sleep(Duration::from_millis(50));
    let _c: rb::Promise<Value> = m.cmd(rb::cmd("SET").arg(&s).arg(big.as_slice()));
    m.cancel();
    let reason = miss.reason();
    println!("miss: {reason:?}");
    println!(
        "miss display: {}",
        reason.as_ref().map(|e| e.to_string()).unwrap_or_default()
    );
    println!("a: {:?} b: {:?}", a.is_resolved(), b.is_resolved());
    let next = m.join(Some(Duration::from_secs(5)));
    println!("next join: {next:?}");
    assert!(matches!(reason, Some(rb::Error::Cancelled { .. })));
}

/// `get` into i64 of a key that is nowhere: the conversion's failure, in a
/// migrating map and in a plain one.
#[test]
fn typed_final_nil_error_and_map_result() {
    let setup = TestSetup::new(3, 1).expect("servers");
    let old = over(&setup, 2, None, Protocol::Resp2);
    let new = over(&setup, 3, Some(&old), Protocol::Resp2);
    let plain = over(&setup, 3, None, Protocol::Resp2);
    let k = moving(&old, &new, "n", 1).remove(0);
    let mut mp = None;
    // Twice: the second map knows the old host's epoch (no recheck).
    let _ = new.map(|c| c.cmd::<i64>(rb::cmd("GET").arg(&k)));
    let migrating = new.map(|c| mp = Some(c.cmd::<i64>(rb::cmd("GET").arg(&k))));
    let mut pp = None;
    let plain_r = plain.map(|c| pp = Some(c.cmd::<i64>(rb::cmd("GET").arg(&k))));
    let (mp, pp) = (mp.expect("p"), pp.expect("p"));
    println!(
        "migrating map: {:?}; promise: {:?}",
        migrating.as_ref().err(),
        mp.reason()
    );
    println!(
        "plain map: {:?}; promise: {:?}",
        plain_r.as_ref().err(),
        pp.reason()
    );
    println!(
        "displays: migrating {:?} / plain {:?}",
        mp.reason().map(|e| e.to_string()),
        pp.reason().map(|e| e.to_string())
    );
    assert_eq!(migrating.is_err(), plain_r.is_err());
}

/// Host 2 of the new cluster through a proxy that cuts the MGET's reply
/// in half: the GETs answered before the cut (nils among them) still go
/// to their old owner; the rest fail. Nothing is left pending or gets
/// another key's value.
#[test]
fn a_connection_cut_mid_mget() {
    use common::proxy::{Fault, Proxy};
    let setup = TestSetup::new(3, 1).expect("servers");
    let old = over(&setup, 2, None, Protocol::Resp2);
    let plain_new = over(&setup, 3, None, Protocol::Resp2);
    let proxy = Proxy::to_unix(setup.socket(2));
    let mut b = Cluster::builder().router(RouterKind::Partition);
    for i in 0..2 {
        let path = setup.socket(i).to_string_lossy().into_owned();
        b = b.host(i as u32, HostConfig::new().unix_socket_path(path));
    }
    let new = b
        .host(2, proxy.host_config())
        .migrating_from(&old)
        .build()
        .expect("new");
    let ks: Vec<String> = (0..)
        .map(|i| format!("m{i}"))
        .filter(|k| host_of(&plain_new, k) == 2)
        .take(40)
        .collect();
    for (i, k) in ks.iter().enumerate() {
        if i % 2 == 0 {
            old.routing_client().set(k, k.as_str()).expect("SET old");
        } else {
            plain_new
                .routing_client()
                .set(k, k.as_str())
                .expect("SET new");
        }
    }
    // Long values on the new owner: the reply spans several chunks.
    proxy.set_fault(Fault::CutMidReply);
    let m = new.mapping_client(MapOptions::new());
    let ps: Vec<_> = ks.iter().map(|k| m.get(k.as_str())).collect();
    let r = m.join(Some(Duration::from_secs(5)));
    println!("join: {r:?}");
    let (mut ok, mut err) = (0, 0);
    for (k, p) in ks.iter().zip(&ps) {
        assert!(!p.is_pending(), "{k} pending");
        match p.value() {
            Ok(v) => {
                ok += 1;
                assert_eq!(v.as_deref(), Some(k.as_bytes()), "{k}");
            }
            Err(_) => err += 1,
        }
    }
    println!("ok {ok} err {err}");
}

/// Two mapping clients of one migrating cluster used in turn on one
/// thread (each its own read table and miss list; the thread's spares
/// go to whichever asks first); one of them cancelled in one round.
#[test]
fn two_clients_interleaved_on_one_thread() {
    let setup = TestSetup::new(3, 1).expect("servers");
    let old = over(&setup, 2, None, Protocol::Resp2);
    let new = over(&setup, 3, Some(&old), Protocol::Resp2);
    let ks = moving(&old, &new, "i", 60);
    for k in &ks[..30] {
        old.routing_client().set(k, k.as_str()).expect("SET");
    }
    let filler = staying(&old, &new, "f", 1).remove(0);
    let a = new.mapping_client(MapOptions::new());
    let b = new.mapping_client(MapOptions::new());
    for round in 0..5 {
        let (mut pa, mut pb) = (Vec::new(), Vec::new());
        for (i, k) in ks.iter().enumerate() {
            if (i + round) % 2 == 0 {
                pa.push((i, a.get(k.as_str())));
            } else {
                pb.push((i, b.get(k.as_str())));
            }
            if i % 15 == 0 {
                let big = vec![b'x'; 70_000];
                let _: rb::Promise<Value> =
                    a.cmd(rb::cmd("SET").arg(filler.as_str()).arg(big.as_slice()));
                let _: rb::Promise<Value> =
                    b.cmd(rb::cmd("SET").arg(filler.as_str()).arg(big.as_slice()));
            }
        }
        if round == 2 {
            b.cancel();
            for (i, p) in &pb {
                assert!(!p.is_pending(), "b {i}");
            }
            pb.clear();
        }
        if round % 2 == 0 {
            a.join(None).expect("a");
            let _ = b.join(None);
        } else {
            b.join(None).expect("b");
            a.join(None).expect("a");
        }
        for (i, p) in pa.iter().chain(&pb) {
            let want = (*i < 30).then(|| ks[*i].as_bytes().to_vec());
            assert_eq!(p.value().expect("GET"), want, "round {round}: {}", ks[*i]);
        }
    }
}

/// The old owner killed: its GETs fail, the others are found.
#[test]
fn a_killed_old_owner() {
    let mut setup = TestSetup::new(3, 1).expect("servers");
    let old = over(&setup, 2, None, Protocol::Resp2);
    let new = over(&setup, 3, Some(&old), Protocol::Resp2);
    let ks: Vec<String> = moving(&old, &new, "k", 200)
        .into_iter()
        .filter(|k| host_of(&new, k) != 0)
        .take(40)
        .collect();
    for k in &ks {
        old.routing_client().set(k, k.as_str()).expect("SET");
    }
    setup.kill(0).expect("kill");
    let m = new.mapping_client(MapOptions::new());
    let ps: Vec<_> = ks.iter().map(|k| m.get(k.as_str())).collect();
    let r = m.join(Some(Duration::from_secs(5)));
    println!("join: {r:?}");
    for (k, p) in ks.iter().zip(&ps) {
        assert!(!p.is_pending(), "{k}");
        match p.value() {
            Ok(v) => {
                assert_eq!(host_of(&old, k), 1, "{k} read though its old owner is dead");
                assert_eq!(v.as_deref(), Some(k.as_bytes()), "{k}");
            }
            Err(_) => assert_eq!(host_of(&old, k), 0, "{k}"),
        }
    }
}
