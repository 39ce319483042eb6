//! Defects a review of 418a8de..5b9df6b found (the mover's MIGRATE, the
//! migrating read table's three rounds and the old host's write epoch),
//! each reproduced here first by the reviewer (every test failed on
//! 5b9df6b): an old server refusing INFO failed reads and moves; a
//! long-lived mapping client kept every read; a client's move racing the
//! mover lost the key (older than the change); MIGRATE went where the old
//! server resolves the address, not where this client reaches; keys a
//! timed-out MIGRATE did move were counted skipped.

mod common;
use common::over_unix as over;

use std::sync::atomic::{AtomicUsize, Ordering};

use common::host_of;
use rb::migrate::{move_keys, MoveOptions, Transfer};
use rb::testing::TestSetup;
use rb::{Cluster, Commands, FromValue, HostConfig, MapOptions, RouterKind};

/// A cluster over the TCP ports of servers `0..n` of `setup`.
fn over_tcp(setup: &TestSetup, n: usize, from: Option<&Cluster>) -> Cluster {
    let mut b = Cluster::builder().router(RouterKind::Partition);
    for i in 0..n {
        let port = setup.tcp_port(i).expect("a TCP port");
        b = b.host(i as u32, HostConfig::new().host("127.0.0.1").port(port));
    }
    if let Some(old) = from {
        b = b.migrating_from(old);
    }
    b.build().expect("cluster")
}

/// Keys `prefix0..` whose owner changes, `n` of them.
fn moving_keys(old: &Cluster, new: &Cluster, prefix: &str, n: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .filter(|k| host_of(old, k) != host_of(new, k))
        .take(n)
        .collect()
}

/// The old servers (0 and 1) let the default user run anything but
/// `INFO` (a common hardening: `INFO` is in `@dangerous`).
fn no_info_on_old_servers(i: usize) -> String {
    if i < 2 {
        "user default on nopass ~* &* +@all -info".to_owned()
    } else {
        String::new()
    }
}

/// A read of a key that exists nowhere, on a migrating cluster whose old
/// servers refuse `INFO`: before the change it answered nil (two reads
/// and a recheck); now the epoch probe's refusal is the map's failure, so
/// every read that misses on both owners fails (routing client and map).
#[test]
fn a_miss_everywhere_fails_when_the_old_server_refuses_info() {
    let setup = TestSetup::with_config(3, 1, no_info_on_old_servers).expect("servers");
    let old = over(&setup, 2, None);
    let new = over(&setup, 3, Some(&old));
    let k = moving_keys(&old, &new, "nowhere", 1).remove(0);
    // The key does exist nowhere; the answer is nil.
    let got = new.routing_client().get(&k);
    assert!(
        matches!(got, Ok(None)),
        "a GET of a missing key on a migrating cluster: {got:?}"
    );
    let in_map = new.map(|c| c.get(&k));
    assert!(in_map.is_ok(), "the map failed: {:?}", in_map.err());
}

/// `Transfer::Auto` (the default) asks each server's `INFO server` for its
/// run_id; a server that refuses `INFO` fails the whole move, where the
/// `DUMP`/`RESTORE` it would fall back to works (shown with DumpRestore).
#[test]
fn auto_move_fails_when_a_server_refuses_info() {
    let setup = TestSetup::with_tcp_config(3, 1, no_info_on_old_servers).expect("servers");
    let old = over_tcp(&setup, 2, None);
    let new = over_tcp(&setup, 3, None);
    let keys = moving_keys(&old, &new, "k", 50);
    for k in &keys {
        old.routing_client().set(k, 1).expect("SET");
    }
    // Control: DUMP/RESTORE needs no INFO.
    let report = move_keys(
        &old,
        &new,
        MoveOptions::new().transfer(Transfer::DumpRestore),
    )
    .expect("DumpRestore moves without INFO");
    assert_eq!(report.progress.moved, 50);
    // Put them back and move with the default.
    for k in &keys {
        new.routing_client().del(&[k]).expect("DEL");
        old.routing_client().set(k, 1).expect("SET");
    }
    let auto = move_keys(&old, &new, MoveOptions::new());
    assert!(
        auto.is_ok(),
        "Auto should fall back to DUMP/RESTORE, not fail: {:?}",
        auto.err()
    );
}

static DROPPED: AtomicUsize = AtomicUsize::new(0);

/// A reply type whose drops are counted.
struct Tracked(#[allow(dead_code)] Option<Vec<u8>>);

impl FromValue for Tracked {
    fn from_value(v: rb::Value) -> rb::Result<Tracked> {
        Ok(Tracked(FromValue::from_value(v)?))
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        DROPPED.fetch_add(1, Ordering::SeqCst);
    }
}

/// A long-lived mapping client on a migrating cluster: the read table is
/// no longer emptied after a join (the old `take` emptied it), so every
/// GET ever made keeps its entry, its key bytes and a clone of its
/// promise (with the value, if the caller did not take it) until the
/// client is dropped; each join also walks every entry ever made. A plain
/// mapping client frees a value when its promise is dropped.
#[test]
fn a_long_lived_mapping_client_keeps_every_read() {
    let setup = TestSetup::new(3, 1).expect("servers");
    let old = over(&setup, 2, None);
    let new = over(&setup, 3, Some(&old));
    let k = moving_keys(&old, &new, "held", 1).remove(0);
    new.routing_client().set(&k, "v").expect("SET");
    // Control: a plain (not migrating) cluster over the same servers.
    let plain = over(&setup, 3, None);
    let m = plain.mapping_client(MapOptions::new());
    let before = DROPPED.load(Ordering::SeqCst);
    let p = m.cmd::<Tracked>(rb::cmd("GET").arg(&k));
    m.join(None).expect("join");
    drop(p);
    assert_eq!(DROPPED.load(Ordering::SeqCst), before + 1, "plain: freed");
    // Migrating: the value lives on in the read table.
    let m = new.mapping_client(MapOptions::new());
    for _ in 0..3 {
        let before = DROPPED.load(Ordering::SeqCst);
        let p = m.cmd::<Tracked>(rb::cmd("GET").arg(&k));
        m.join(None).expect("join");
        assert!(p.is_resolved());
        drop(p);
        assert_eq!(
            DROPPED.load(Ordering::SeqCst),
            before + 1,
            "a read's value outlives its join and its promise"
        );
    }
}

/// A key the migrating cluster's client moves itself (`move_now`:
/// `DUMP`/`RESTORE`, then compare-and-delete on the old host) while the
/// mover's `MIGRATE` finds the key already on its new owner (BUSYKEY). The
/// mover deleted the old copy as "the new owner's own"; the client's
/// compare-and-delete then found the old copy gone, took that for a delete
/// made during its move, and deleted its copy from the new owner: the key
/// was nowhere. Now the mover drops the client's record of its copy
/// before it deletes the old copy (`rb::migrate::COPIES`), so the client
/// does not take back a copy that is the key's only home (here released
/// once the mover has reported the key skipped).
#[test]
fn a_client_move_racing_the_mover_keeps_the_key() {
    use common::proxy::{Fault, Proxy};
    let setup = TestSetup::with_tcp(3, 1).expect("servers");
    let old = over_tcp(&setup, 2, None);
    let direct = over_tcp(&setup, 3, None);
    // The migrating cluster reaches server 2 through a proxy.
    let proxy = Proxy::to_unix(setup.socket(2));
    let mut b = Cluster::builder().router(RouterKind::Partition);
    for i in 0..2u32 {
        let port = setup.tcp_port(i as usize).expect("port");
        b = b.host(i, HostConfig::new().host("127.0.0.1").port(port));
    }
    let new = b
        .host(2, proxy.host_config())
        .migrating_from(&old)
        .build()
        .expect("new");
    let k = (0..)
        .map(|i| format!("t{i}"))
        .find(|k| host_of(&new, k) == 2)
        .expect("a key moving to host 2");
    old.routing_client().set(&k, "v").expect("SET");
    // Warm the client's connection to server 2, then hold its replies.
    let _: String = new
        .local_client(2)
        .expect("local")
        .cmd(rb::cmd("PING"))
        .expect("PING");
    proxy.set_fault(Fault::HoldReplies);
    let (n2, k2) = (new.clone(), k.clone());
    let tx = std::thread::spawn(move || {
        n2.routing_client()
            .transaction::<(Option<Vec<u8>>,), _, _>(&[k2.as_str()], |tx| {
                tx.get(k2.as_str());
                Ok(())
            })
    });
    // The client's RESTORE has run on server 2 (its reply is held).
    let on_new = direct.local_client(2).expect("local");
    while on_new.exists(&[k.as_str()]).expect("EXISTS") == 0 {
        std::thread::yield_now();
    }
    let (seen_tx, seen) = std::sync::mpsc::channel();
    let mover = {
        let (old, direct) = (old.clone(), direct.clone());
        std::thread::spawn(move || {
            move_keys(
                &old,
                &direct,
                MoveOptions::new()
                    .transfer(Transfer::Migrate)
                    .progress(move |p| {
                        let _ = seen_tx.send(p.skipped);
                    }),
            )
        })
    };
    while seen.recv().expect("progress") == 0 {}
    proxy.set_fault(Fault::None);
    let (got,) = tx.join().expect("thread").expect("transaction");
    let report = mover.join().expect("mover").expect("move");
    assert_eq!(report.progress.skipped, 1, "{:?}", report.progress);
    let left = on_new.get(&k).expect("GET");
    assert_eq!(
        (got, left),
        (Some(b"v".to_vec()), Some(b"v".to_vec())),
        "the key existed throughout and was never deleted"
    );
}

/// A resolver (service discovery, `ClusterBuilder::resolver`) that sends
/// one configured port to another.
struct Remap {
    from: u16,
    to: u16,
}

impl rb::Resolve for Remap {
    fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<std::net::SocketAddr>> {
        let port = if port == self.from { self.to } else { port };
        use std::net::ToSocketAddrs;
        Ok((host, port).to_socket_addrs()?.collect())
    }
}

/// `Transfer::Auto` hands the old server the new owner's address as
/// configured, but the client reaches it through its own resolver: the
/// old server's `MIGRATE` goes wherever that address leads from there
/// (here another, unrelated server), deletes the keys, and the mover
/// counts them moved; nothing checks that they reached the new owner.
#[test]
fn auto_migrates_to_the_address_as_the_client_names_it() {
    let setup = TestSetup::with_tcp(4, 1).expect("servers");
    let port = |i: usize| setup.tcp_port(i).expect("port");
    let old = over_tcp(&setup, 2, None);
    // Host 2 is named localhost:<server 3's port>; the client's resolver
    // takes it to server 2.
    let resolver = std::sync::Arc::new(Remap {
        from: port(3),
        to: port(2),
    });
    let mut b = Cluster::builder()
        .router(RouterKind::Partition)
        .resolver(resolver);
    for i in 0..2 {
        b = b.host(i as u32, HostConfig::new().host("127.0.0.1").port(port(i)));
    }
    let new = b
        .host(2, HostConfig::new().host("localhost").port(port(3)))
        .build()
        .expect("new");
    let keys: Vec<String> = (0..)
        .map(|i| format!("r{i}"))
        .filter(|k| host_of(&new, k) == 2)
        .take(20)
        .collect();
    for k in &keys {
        old.routing_client().set(k, 1).expect("SET");
    }
    let report = move_keys(&old, &new, MoveOptions::new()).expect("move");
    let on_new: i64 = new
        .local_client(2)
        .expect("local")
        .dbsize()
        .expect("DBSIZE");
    assert_eq!(
        on_new, 20,
        "moved {} keys, but the new owner has {on_new} of them",
        report.progress.moved
    );
}

/// A `MIGRATE` that times out reading the new owner's answers after the
/// new owner ran every `RESTORE` (IOERR): every key is then on both
/// servers; the mover takes each for "the new owner's own" (a newer
/// write), deletes the old copy and counts it skipped, so the report says
/// nothing was copied or moved (and no bytes) although every key moved.
#[test]
fn an_ioerr_after_the_restores_counts_moved_keys_as_skipped() {
    use common::proxy::{Fault, Proxy};
    let setup = TestSetup::with_tcp(3, 1).expect("servers");
    let old = over_tcp(&setup, 2, None);
    let proxy = Proxy::to_unix(setup.socket(2));
    let mut b = Cluster::builder().router(RouterKind::Partition);
    for i in 0..2u32 {
        let port = setup.tcp_port(i as usize).expect("port");
        b = b.host(i, HostConfig::new().host("127.0.0.1").port(port));
    }
    let new = b
        .host(
            2,
            proxy
                .host_config()
                .connect_timeout(std::time::Duration::from_millis(100)),
        )
        .build()
        .expect("new");
    let keys: Vec<String> = (0..)
        .map(|i| format!("io{i}"))
        .filter(|k| host_of(&new, k) == 2 && host_of(&old, k) == 0)
        .take(10)
        .collect();
    // A first move of one key: the servers' run_ids are learned, the
    // mover's connection to host 2 (its EXISTS go through it) is open.
    old.routing_client().set(&keys[0], "value").expect("SET");
    let warm = move_keys(&old, &new, MoveOptions::new().transfer(Transfer::Migrate)).expect("move");
    assert_eq!(warm.progress.moved, 1);
    new.local_client(2)
        .expect("local")
        .flushdb()
        .expect("FLUSHDB");
    for k in &keys {
        old.routing_client().set(k, "value").expect("SET");
    }
    proxy.set_fault(Fault::HoldReplies);
    // Release the replies once the old server's MIGRATE gave up.
    let watcher = {
        let old = old.clone();
        std::thread::spawn(move || {
            let local = old.local_client(0).expect("local");
            while local
                .info(Some("errorstats"))
                .expect("INFO")
                .get("errorstat_IOERR")
                .is_none()
            {
                std::thread::yield_now();
            }
        })
    };
    let mover = {
        let (old, new) = (old.clone(), new.clone());
        std::thread::spawn(move || {
            move_keys(&old, &new, MoveOptions::new().transfer(Transfer::Migrate))
        })
    };
    watcher.join().expect("watcher");
    proxy.set_fault(Fault::None);
    let report = mover.join().expect("mover").expect("move");
    let p = &report.progress;
    let on_new: i64 = new
        .local_client(2)
        .expect("local")
        .dbsize()
        .expect("DBSIZE");
    assert_eq!(on_new, 10, "every key reached the new owner");
    assert_eq!((p.moved, p.skipped), (10, 0), "{p:?}");
}
