//! Defects a second review found in the fixes of the first, each failing
//! before its fix: host ids past 2^31 mixed old and new hosts up (a write
//! lost, or an overflow panic); cancel left migrating reads pending; a
//! follow-up's failure left the map's join Ok.

use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;
use common::host_of;
use rb::testing::TestSetup;
use rb::{Cluster, Commands, HostConfig, HostId, MapOptions, Router, RouterKind, Value};

fn cfg(setup: &TestSetup, i: usize) -> HostConfig {
    HostConfig::new().unix_socket_path(setup.socket(i).to_string_lossy().into_owned())
}

fn over(setup: &TestSetup, n: usize, from: Option<&Cluster>, read: Option<Duration>) -> Cluster {
    let mut b = Cluster::builder().router(RouterKind::Partition);
    for i in 0..n {
        b = b.host(i as u32, cfg(setup, i).read_timeout(read));
    }
    if let Some(old) = from {
        b = b.migrating_from(old);
    }
    b.build().expect("cluster")
}

/// Keys starting with `b` go to `hi`, every other key to `lo`.
struct ByFirst {
    lo: HostId,
    hi: HostId,
}

impl Router for ByFirst {
    fn host_for_key(&self, key: &[u8]) -> rb::Result<HostId> {
        Ok(if key.first() == Some(&b'b') {
            self.hi
        } else {
            self.lo
        })
    }
}

fn plain(setup: &TestSetup, i: usize) -> rb::LocalClient {
    Cluster::builder()
        .host(0, cfg(setup, i))
        .build()
        .expect("cluster")
        .local_client(0)
        .expect("local")
}

/// A new cluster with a host at id 2^31: a migrating map's session put the
/// old cluster's host 0 at 2^31 + 0 over it, and a SET was written to the
/// old server, then deleted there as its stale copy: lost, reported OK.
/// Such ids are refused now.
#[test]
fn host_ids_past_2_pow_31_are_refused_not_mixed_up() {
    let setup = TestSetup::new(3, 1).expect("servers");
    let hi: HostId = 1 << 31;
    let old = Cluster::builder()
        .host(0, cfg(&setup, 2))
        .custom_router(Arc::new(ByFirst { lo: 0, hi: 0 }))
        .build()
        .expect("old");
    let new = Cluster::builder()
        .host(0, cfg(&setup, 0))
        .host(hi, cfg(&setup, 1))
        .custom_router(Arc::new(ByFirst { lo: 0, hi }))
        .migrating_from(&old)
        .build()
        .expect("new");
    let err = new.map(|c| c.set("bkey", "v")).expect_err("refused");
    assert!(matches!(err, rb::Error::Config { .. }), "{err}");
    assert_eq!(
        plain(&setup, 2).get("bkey").expect("GET"),
        None,
        "nothing written anywhere"
    );
}

/// An old host id >= 2^31 overflowed 2^31 + id (a panic in debug builds,
/// another host in release).
#[test]
fn an_old_host_id_past_2_pow_31_is_refused_without_a_panic() {
    let setup = TestSetup::new(2, 1).expect("servers");
    let old_id: HostId = (1 << 31) + 5;
    let old = Cluster::builder()
        .host(old_id, cfg(&setup, 1))
        .custom_router(Arc::new(ByFirst {
            lo: old_id,
            hi: old_id,
        }))
        .build()
        .expect("old");
    plain(&setup, 1).set("key", "old value").expect("SET");
    let new = Cluster::builder()
        .host(0, cfg(&setup, 0))
        .custom_router(Arc::new(ByFirst { lo: 0, hi: 0 }))
        .migrating_from(&old)
        .build()
        .expect("new");
    let got = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        new.map(|c| c.get("key")).map(|p| p.value())
    }));
    let err = got.expect("no panic").expect_err("refused");
    assert!(matches!(err, rb::Error::Config { .. }), "{err}");
}

/// `MappingClient::cancel` rejects only what the pipeline still waits
/// for: a migrating GET whose nil already came in (a miss marked in the
/// read table, waiting for the fallback after the join) stays pending.
#[test]
fn cancel_rejects_migrating_reads_waiting_for_their_fallback() {
    let setup = TestSetup::new(3, 1).expect("servers");
    let old = over(&setup, 2, None, None);
    let new = over(&setup, 3, Some(&old), None);
    let k = (0..)
        .map(|i| format!("k{i}"))
        .find(|k| host_of(&old, k) != host_of(&new, k) && host_of(&new, k) < 2)
        .expect("moving key");
    let h = host_of(&new, &k);
    let s = (0..)
        .map(|i| format!("s{i}"))
        .find(|s| host_of(&new, s) == h && host_of(&old, s) == h)
        .expect("a key staying on the new owner");
    let m = new.mapping_client(MapOptions::new().auto_batch(false));
    let miss = m.get(&k);
    let big = vec![b'x'; 100_000];
    // Past the write threshold: the GET goes out while enqueuing.
    let _a: rb::Promise<Value> = m.cmd(rb::cmd("SET").arg(&s).arg(big.as_slice()));
    // Another early write: its pump reads the GET's nil.
    let _b: rb::Promise<Value> = m.cmd(rb::cmd("SET").arg(&s).arg(big.as_slice()));
    m.cancel();
    assert!(!miss.is_pending(), "cancel left a promise pending");
}

/// The old copy's DEL of a migrating overwrite (a paused old server) held
/// a `join(200 ms)` for the old host's whole 3 s read timeout, and the
/// join said Ok. The map's timeout bounds it now, and the join reports it.
#[test]
fn a_follow_up_failure_is_the_joins_failure() {
    let setup = TestSetup::new(3, 1).expect("servers");
    let old = over(&setup, 2, None, Some(Duration::from_secs(3)));
    let new = over(&setup, 3, Some(&old), Some(Duration::from_secs(3)));
    let k = (0..)
        .map(|i| format!("k{i}"))
        .find(|k| host_of(&old, k) != host_of(&new, k) && host_of(&new, k) == 2)
        .expect("moving key");
    let old_server = host_of(&old, &k) as usize;
    setup.pause(old_server).expect("pause");
    let m = new.mapping_client(MapOptions::new());
    let set = m.set(&k, "v");
    let t = Instant::now();
    let r = m.join(Some(Duration::from_millis(200)));
    let took = t.elapsed();
    setup.resume(old_server).expect("resume");
    println!(
        "join(200ms) -> {r:?} after {took:?}; SET -> {:?}",
        set.value()
    );
    assert!(r.is_err(), "the SET failed, the join must say so");
    assert!(
        took < Duration::from_millis(1000),
        "join(200 ms) took {took:?}"
    );
    assert!(set.value().is_err());
}
