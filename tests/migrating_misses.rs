//! A migrating cluster's reads of keys that exist nowhere: two reads (new
//! owner, old owner), not three, once the old owner's write epoch is known
//! and has not changed; and still three when it has, so a key moved
//! between the two reads is found.

mod common;
use common::over_unix as over;
use common::{host_of, moving_keys};
use rb::testing::TestSetup;
use rb::{Cluster, Commands, Execute};

fn rechecks(c: &Cluster) -> u64 {
    c.stats().migration.expect("migrating").rechecks
}

/// Misses in a map and through the async client: the first read of each
/// old host rechecks (no epoch known yet), later ones do not, until a key
/// changes on the old host.
#[test]
fn misses_recheck_only_while_the_old_owner_changes() {
    let setup = TestSetup::new(3, 1).expect("servers");
    let old = over(&setup, 2, None);
    let new = over(&setup, 3, Some(&old));
    let keys = moving_keys(&old, &new, "nowhere", 40);
    let map_reads = |new: &Cluster| {
        let got = new
            .map(|c| keys.iter().map(|k| c.get(k)).collect::<Vec<_>>())
            .expect("map");
        for p in got {
            assert_eq!(p.value().expect("GET"), None);
        }
    };
    map_reads(&new);
    let first = rechecks(&new);
    assert_eq!(first, 40, "no epoch known: every miss rechecked");
    map_reads(&new);
    map_reads(&new);
    assert_eq!(rechecks(&new), first, "unchanged old hosts: no recheck");
    let client = new.async_client();
    for k in &keys {
        assert_eq!(client.get(k).wait().expect("GET"), None);
    }
    assert_eq!(rechecks(&new), first, "the async client too");
    // A key changes on each old host: the next misses recheck.
    for h in 0..2 {
        let local = old.local_client(h).expect("local");
        let _: i64 = local.cmd(rb::cmd("INCR").arg("a counter")).expect("INCR");
    }
    map_reads(&new);
    assert_eq!(rechecks(&new), first + 40, "changed old hosts: rechecked");
    map_reads(&new);
    assert_eq!(rechecks(&new), first + 40);
    old.local_client(0)
        .expect("local")
        .set("another", 1)
        .expect("SET");
    for k in &keys {
        assert_eq!(client.get(k).wait().expect("GET"), None);
    }
    let on_host_0 = keys.iter().filter(|k| host_of(&old, k) == 0).count() as u64;
    assert!(on_host_0 > 0);
    assert_eq!(
        rechecks(&new),
        first + 40 + 1,
        "the async client rechecks once (its epoch read then is the new one)"
    );
}

/// As `migrating_regressions::a_key_moved_between_the_two_reads_is_found`,
/// with the old host's epoch known before the map: the writer's move
/// changes it, so the miss on the old owner is rechecked and the key found.
#[test]
fn a_key_moved_between_the_two_reads_is_found_with_a_known_epoch() {
    let setup = TestSetup::new(3, 1).expect("servers");
    let old = over(&setup, 2, None);
    let new = over(&setup, 3, Some(&old));
    let k = moving_keys(&old, &new, "c", 1).remove(0);
    old.routing_client().set(&k, 5).expect("SET");
    // Learn the old hosts' epochs: misses on every old host.
    let probes = moving_keys(&old, &new, "probe", 20);
    new.map(|c| {
        for p in &probes {
            c.get(p);
        }
    })
    .expect("map");
    let n = host_of(&new, &k);
    let filler = (0..)
        .map(|i| format!("f{i}"))
        .find(|f| host_of(&new, f) == n && host_of(&old, f) == n)
        .expect("a filler key");
    let before = rechecks(&new);
    let mut read = None;
    new.map(|c| {
        read = Some(c.get(&k));
        // Past the early-write threshold: the GET goes out now.
        let _ = c.cmd::<i64>(rb::cmd("APPEND").arg(&filler).arg(vec![b'x'; 70_000]));
        let (n2, k2) = (new.clone(), k.clone());
        let v = std::thread::spawn(move || n2.routing_client().incr(&k2))
            .join()
            .expect("writer");
        assert_eq!(v.expect("INCR"), 6);
    })
    .expect("map");
    let got = read.expect("read").value().expect("GET");
    assert_eq!(
        got,
        Some(b"6".to_vec()),
        "nil for a key that always existed"
    );
    assert_eq!(rechecks(&new), before + 1);
}

/// A GET of two arguments in a migrating map gets the server's error, as
/// in a plain map, and its neighbours their own replies (the read table
/// keeps one-argument GETs only).
#[test]
fn a_get_of_two_arguments_gets_the_servers_error() {
    let setup = TestSetup::new(3, 1).expect("servers");
    let old = over(&setup, 2, None);
    let new = over(&setup, 3, Some(&old));
    let keys = moving_keys(&old, &new, "two", 2);
    new.map(|c| {
        c.set(&keys[0], "v");
    })
    .expect("SET");
    let m = new.mapping_client(rb::MapOptions::default());
    let bad = m.execute::<rb::Value>(rb::cmd("GET").arg(&keys[0]).arg(&keys[1]));
    let good = m.get(&keys[0]);
    let missing = m.get(&keys[1]);
    assert!(m.join(None).is_err(), "the bad GET is the map's failure");
    let e = bad.value().expect_err("wrong number of arguments");
    assert!(e.to_string().contains("wrong number"), "{e}");
    assert_eq!(good.value().expect("GET"), Some(b"v".to_vec()));
    assert_eq!(missing.value().expect("GET"), None);
}
