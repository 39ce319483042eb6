//! The mover's two ways of copying against real servers: `MIGRATE` (the
//! old server sends the keys itself) where the servers reach each other,
//! `DUMP`/`RESTORE` through the client elsewhere, and what only `MIGRATE`
//! gets right: a key deleted while it is being moved stays deleted even
//! when a write reaches the new owner right after.

mod common;
use common::{over_tcp, tcp};

use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::proxy::{Fault, Proxy, Upstream};
use rb::migrate::{move_keys, MoveOptions, Transfer};
use rb::testing::TestSetup;
use rb::{Cluster, Commands, HostConfig, HostId, RouterKind};

/// A cluster over the unix sockets of servers `0..n` of `setup`.
fn over_unix(setup: &TestSetup, n: usize) -> Cluster {
    let mut b = Cluster::builder().router(RouterKind::Partition);
    for i in 0..n {
        let path = setup.socket(i).to_string_lossy().into_owned();
        b = b.host(i as u32, HostConfig::new().unix_socket_path(path));
    }
    b.build().expect("cluster")
}

/// Calls of `command` a host's server has seen (`INFO commandstats`).
fn calls(cluster: &Cluster, host: HostId, command: &str) -> u64 {
    let info: String = cluster
        .local_client(host)
        .expect("local")
        .cmd(rb::cmd("INFO").arg("commandstats"))
        .expect("INFO");
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().expect("a count"))
}

fn total_calls(cluster: &Cluster, hosts: usize, command: &str) -> u64 {
    (0..hosts as HostId)
        .map(|h| calls(cluster, h, command))
        .sum()
}

/// Keys `k:0..n` (every 10th with a 1000 s TTL) through `cluster`; when.
fn fill(cluster: &Cluster, n: usize) -> Instant {
    let at = Instant::now();
    cluster
        .map(|c| {
            for i in 0..n {
                let key = format!("k:{i}");
                if i % 10 == 0 {
                    c.set_with(
                        &key,
                        i,
                        rb::SetOptions::new().expiry(rb::Expiry::Seconds(1000)),
                    );
                } else {
                    c.set(&key, i);
                }
            }
        })
        .expect("fill");
    at
}

/// Whether `key`'s owner differs between the clusters.
fn leaves(old: &Cluster, new: &Cluster, key: &str) -> bool {
    let owner = |c: &Cluster| {
        c.router()
            .expect("router")
            .host_for_key(key.as_bytes())
            .expect("route")
    };
    owner(old) != owner(new)
}

/// Every key on its owner in `new` only, with its value (or `newer`) and
/// its TTL within a second of what `fill` (at `filled`) set.
fn check_placed(new: &Cluster, servers: usize, n: usize, filled: Instant, newer: &[String]) {
    let router = new.router().expect("router");
    let mut held = 0;
    for h in 0..servers as HostId {
        held += new
            .local_client(h)
            .expect("local")
            .dbsize()
            .expect("DBSIZE");
    }
    assert_eq!(held as usize, n, "each key once");
    for i in 0..n {
        let key = format!("k:{i}");
        let local = new
            .local_client(router.host_for_key(key.as_bytes()).expect("route"))
            .expect("local");
        let v: Option<String> = local
            .get(&key)
            .expect("GET")
            .map(|b| String::from_utf8(b).expect("utf-8"));
        let want = if newer.contains(&key) {
            "newer".to_owned()
        } else {
            i.to_string()
        };
        assert_eq!(v.as_deref(), Some(want.as_str()), "{key}");
        let ttl = local.ttl(&key).expect("TTL");
        if i % 10 == 0 && !newer.contains(&key) {
            let left = 1000 - filled.elapsed().as_secs() as i64;
            assert!(
                (left - 1..=left).contains(&ttl),
                "{key}: ttl {ttl}, want {left}"
            );
        }
    }
}

#[test]
fn migrate_moves_every_key_with_its_ttl_and_counts_it() {
    let setup = TestSetup::with_tcp(5, 1).expect("servers");
    let (old, new) = (over_tcp(&setup, 4), over_tcp(&setup, 5));
    let filled = fill(&old, 10_000);
    // Newer writes on the new owners of 50 leaving keys: they win.
    let newer: Vec<String> = (0..10_000)
        .map(|i| format!("k:{i}"))
        .filter(|k| leaves(&old, &new, k))
        .take(50)
        .collect();
    let client = new.routing_client();
    for k in &newer {
        client.set(k, "newer").expect("SET");
    }
    // What the copied keys weigh, as DUMP gives it.
    let mut dumps: std::collections::BTreeMap<HostId, Vec<rb::Cmd>> = Default::default();
    for i in 0..10_000 {
        let k = format!("k:{i}");
        if leaves(&old, &new, &k) && !newer.contains(&k) {
            let owner = old
                .router()
                .expect("r")
                .host_for_key(k.as_bytes())
                .expect("route");
            dumps
                .entry(owner)
                .or_default()
                .push(rb::cmd("DUMP").arg(&k));
        }
    }
    let mut bytes = 0;
    for (owner, cmds) in dumps {
        for dump in old.local_client(owner).expect("local").pipeline(cmds) {
            match dump.expect("DUMP") {
                rb::Value::BulkString(d) => bytes += d.len() as u64,
                other => panic!("DUMP answered {other:?}"),
            }
        }
    }
    let report = move_keys(
        &old,
        &new,
        MoveOptions::new().batch(300).transfer(Transfer::Migrate),
    )
    .expect("move");
    let p = &report.progress;
    println!("{p:?}");
    assert_eq!(p.skipped, 50, "{p:?}");
    assert_eq!(
        (p.vanished, p.copied, p.bytes),
        (0, p.moved, bytes),
        "{p:?}"
    );
    assert_eq!(p.moved + p.skipped + p.stayed, p.scanned, "{p:?}");
    assert!(total_calls(&old, 4, "migrate") > 0, "MIGRATE was used");
    assert_eq!(
        total_calls(&old, 4, "pttl"),
        0,
        "nothing went through the client"
    );
    check_placed(&new, 5, 10_000, filled, &newer);
}

#[test]
fn auto_uses_migrate_over_tcp_and_the_client_elsewhere() {
    let setup = TestSetup::with_tcp(3, 1).expect("servers");
    // Over TCP: MIGRATE.
    let (old, new) = (over_tcp(&setup, 2), over_tcp(&setup, 3));
    let filled = fill(&old, 2000);
    let report = move_keys(&old, &new, MoveOptions::new()).expect("move");
    assert!(report.progress.moved > 0);
    assert!(total_calls(&old, 2, "migrate") > 0);
    assert_eq!(total_calls(&old, 2, "pttl"), 0);
    check_placed(&new, 3, 2000, filled, &[]);
    // Over unix sockets: MIGRATE cannot reach a socket; Migrate says so.
    new.all(|c| {
        c.flushdb();
    })
    .expect("FLUSHDB");
    let (old, new) = (over_unix(&setup, 2), over_unix(&setup, 3));
    let filled = fill(&old, 2000);
    let err = move_keys(&old, &new, MoveOptions::new().transfer(Transfer::Migrate))
        .expect_err("MIGRATE cannot reach a unix socket");
    assert!(err.to_string().contains("MIGRATE cannot reach"), "{err}");
    let migrates = total_calls(&old, 2, "migrate");
    move_keys(&old, &new, MoveOptions::new()).expect("move");
    assert_eq!(
        total_calls(&old, 2, "migrate"),
        migrates,
        "no MIGRATE to a socket"
    );
    assert!(
        total_calls(&old, 2, "pttl") > 0,
        "copied through the client"
    );
    check_placed(&new, 3, 2000, filled, &[]);
}

/// Hosts that are databases of one server: `MIGRATE` to itself would wait
/// on itself, so Auto copies through the client and Migrate refuses.
#[test]
fn hosts_on_one_server_are_not_migrated_to_themselves() {
    let setup = TestSetup::with_tcp(1, 1).expect("server");
    let port = setup.tcp_port(0).expect("port");
    let db = |d: i64| HostConfig::new().host("127.0.0.1").port(port).db(d);
    let old = Cluster::builder().host(0, db(0)).build().expect("old");
    let new = Cluster::builder()
        .host(0, db(0))
        .host(1, db(1))
        .build()
        .expect("new");
    let filled = fill(&old, 1000);
    let err = move_keys(&old, &new, MoveOptions::new().transfer(Transfer::Migrate))
        .expect_err("the same server");
    assert!(err.to_string().contains("MIGRATE cannot reach"), "{err}");
    let started = Instant::now();
    let report = move_keys(&old, &new, MoveOptions::new()).expect("move");
    assert!(report.progress.moved > 0);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "no MIGRATE waited on itself"
    );
    assert_eq!(calls(&old, 0, "migrate"), 0);
    check_placed(&new, 2, 1000, filled, &[]);
}

/// Old servers without MIGRATE (renamed away): Auto's first MIGRATE of a
/// pair fails outright, and that pair copies through the client from then on.
#[test]
fn auto_falls_back_when_migrate_fails() {
    let setup = TestSetup::with_tcp_config(3, 1, |i| {
        if i < 2 {
            "rename-command MIGRATE \"\"".to_owned()
        } else {
            String::new()
        }
    })
    .expect("servers");
    let (old, new) = (over_tcp(&setup, 2), over_tcp(&setup, 3));
    let filled = fill(&old, 3000);
    let report = move_keys(&old, &new, MoveOptions::new().batch(200)).expect("move");
    assert!(report.progress.moved > 0, "{:?}", report.progress);
    check_placed(&new, 3, 3000, filled, &[]);
    new.all(|c| {
        c.flushdb();
    })
    .expect("FLUSHDB");
    fill(&old, 3000);
    let err = move_keys(&old, &new, MoveOptions::new().transfer(Transfer::Migrate))
        .expect_err("no MIGRATE");
    assert!(
        err.to_string().to_lowercase().contains("unknown command"),
        "{err}"
    );
}

/// The `nth` key `k:<i>` whose owner differs between `old` and `new`.
fn a_leaving_key(old: &Cluster, new: &Cluster, nth: usize) -> String {
    (0..)
        .map(|i| format!("k:{i}"))
        .filter(|k| leaves(old, new, k))
        .nth(nth)
        .expect("a key that moves")
}

/// Two servers over TCP: the old cluster (server 0 alone), both servers
/// directly, and the mover's view of them, in which server 1 (the new
/// owner of the keys that leave) sits behind a proxy.
struct NewOwnerBehindAProxy {
    setup: TestSetup,
    old: Cluster,
    direct: Cluster,
    proxy: Proxy,
    mover_new: Cluster,
}

impl NewOwnerBehindAProxy {
    fn start() -> NewOwnerBehindAProxy {
        let setup = TestSetup::with_tcp(2, 1).expect("servers");
        let old = Cluster::builder()
            .host(0, tcp(&setup, 0))
            .build()
            .expect("old");
        let direct = over_tcp(&setup, 2);
        let addr = format!("127.0.0.1:{}", setup.tcp_port(1).expect("port"))
            .parse()
            .expect("addr");
        let proxy = Proxy::start(Upstream::Tcp(addr));
        let mover_new = Cluster::builder()
            .host(0, tcp(&setup, 0))
            .host(1, proxy.host_config())
            .build()
            .expect("mover's cluster");
        NewOwnerBehindAProxy {
            setup,
            old,
            direct,
            proxy,
            mover_new,
        }
    }

    /// The clients' cluster over both servers (directly), migrating from
    /// the old one.
    fn migrating(&self) -> Cluster {
        Cluster::builder()
            .host(0, tcp(&self.setup, 0))
            .host(1, tcp(&self.setup, 1))
            .migrating_from(&self.old)
            .build()
            .expect("migrating")
    }
}

/// A delete made while the mover has a key in flight, then an INCR made
/// after the delete has returned: the INCR must see no key (answer 1).
/// The mover reaches the new owner through a proxy that holds its bytes,
/// so the delete lands while the key is in flight. With `MIGRATE` the old
/// server moves and deletes in one step, so the delete either finds the
/// key there (and then on the new owner, where it deletes it) or waits
/// for the move. With `DUMP`/`RESTORE` the copy arrives after the delete:
/// the delete marked the key deleted on the new owner first, so the copy
/// does not land (before the mark it did, and the INCR answered 43, and
/// 43 stayed).
#[test]
fn a_delete_during_the_move_stays_deleted() {
    delete_during_the_move(Transfer::Migrate, false);
}

/// [`a_delete_during_the_move_stays_deleted`] with `DUMP`/`RESTORE`.
#[test]
fn a_delete_during_a_dump_restore_move_stays_deleted() {
    delete_during_the_move(Transfer::DumpRestore, false);
}

/// The same, the delete and the INCR made through the async client.
#[test]
fn an_async_delete_during_a_dump_restore_move_stays_deleted() {
    delete_during_the_move(Transfer::DumpRestore, true);
}

fn delete_during_the_move(transfer: Transfer, through_async: bool) {
    let two = NewOwnerBehindAProxy::start();
    let migrating = two.migrating();
    let NewOwnerBehindAProxy {
        setup: _servers,
        old,
        direct,
        proxy,
        mover_new,
    } = two;
    let key = a_leaving_key(&old, &direct, 0);
    // A first move, so that the mover knows the servers (it asks each
    // one's run_id once) and its next bytes to the proxy are the key's.
    old.routing_client()
        .set(a_leaving_key(&old, &direct, 1), 1)
        .expect("SET");
    move_keys(&old, &mover_new, MoveOptions::new().transfer(transfer)).expect("warm-up");
    old.routing_client().set(&key, 42).expect("SET");
    let warm = proxy.received_bytes();
    proxy.set_fault(Fault::Hold);
    let mover = {
        let (old, new) = (old.clone(), mover_new.clone());
        std::thread::spawn(move || move_keys(&old, &new, MoveOptions::new().transfer(transfer)))
    };
    // The key is in flight: its bytes are at the proxy.
    let since = Instant::now();
    while proxy.received_bytes() == warm {
        assert!(
            since.elapsed() < Duration::from_secs(10),
            "the mover never sent"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let (done_tx, done) = mpsc::channel();
    let deleter = {
        let (cluster, key) = (migrating.clone(), key.clone());
        std::thread::spawn(move || {
            let r = if through_async {
                cluster.async_client().del(&[&key]).wait()
            } else {
                cluster.routing_client().del(&[&key])
            };
            let _ = done_tx.send(());
            r
        })
    };
    if done.recv_timeout(Duration::from_millis(500)).is_ok() {
        // The delete returned with the key in flight (DUMP/RESTORE): let
        // the copy land (or be refused), and write before the mover can
        // look back.
        let evals = common::command_calls(&direct, 1, "eval");
        proxy.set_fault(Fault::HoldReplies);
        let target = direct.local_client(1).expect("local");
        let since = Instant::now();
        while target.exists(&[&key]).expect("EXISTS") == 0
            && common::command_calls(&direct, 1, "eval") == evals
        {
            assert!(
                since.elapsed() < Duration::from_secs(10),
                "the copy never arrived"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    } else {
        // The old server is busy moving (MIGRATE): the delete waits for it.
        proxy.set_fault(Fault::None);
    }
    deleter.join().expect("deleter").expect("DEL");
    let after: i64 = if through_async {
        migrating.async_client().incr(&key).wait().expect("INCR")
    } else {
        migrating.routing_client().incr(&key).expect("INCR")
    };
    proxy.set_fault(Fault::None);
    mover.join().expect("mover").expect("move");
    assert_eq!(after, 1, "an INCR after the delete found the deleted value");
    let on_new = direct
        .local_client(1)
        .expect("local")
        .get(&key)
        .expect("GET");
    let on_old = old.local_client(0).expect("local").get(&key).expect("GET");
    assert_eq!((on_old, on_new), (None, Some(b"1".to_vec())));
}

/// A command that changes a key the new owner lacks moves it first, over
/// TCP too with `DUMP`/`RESTORE`, never `MIGRATE` (a client's `MIGRATE`
/// crossing the mover's between the same two servers would block both
/// until a timeout: seen as a 4 -> 5 move under INCR traffic taking 21.5 s
/// instead of 1.5 s), in maps and through the async client; a key both
/// owners hold changes the new owner's value (its old copy is the
/// mover's to delete).
#[test]
fn writes_move_their_keys_through_the_client() {
    let setup = TestSetup::with_tcp(3, 1).expect("servers");
    let old = over_tcp(&setup, 2);
    let mut b = Cluster::builder().router(RouterKind::Partition);
    for i in 0..3 {
        b = b.host(i as u32, tcp(&setup, i));
    }
    let migrating = b.migrating_from(&old).build().expect("migrating");
    let direct = over_tcp(&setup, 3);
    let keys: Vec<String> = (0..400)
        .map(|i| format!("n:{i}"))
        .filter(|k| leaves(&old, &direct, k))
        .take(60)
        .collect();
    old.map(|c| {
        for (i, k) in keys.iter().enumerate() {
            c.set(k, i);
        }
    })
    .expect("fill");
    // The last ten also have a newer value on their new owner.
    direct
        .map(|c| {
            for k in &keys[50..] {
                c.set(k, 1000);
            }
        })
        .expect("newer");
    let before = (
        total_calls(&old, 2, "migrate"),
        total_calls(&old, 2, "pttl"),
    );
    let in_map = migrating
        .map(|c| keys[..25].iter().map(|k| c.incr(k)).collect::<Vec<_>>())
        .expect("map");
    for (i, p) in in_map.into_iter().enumerate() {
        assert_eq!(p.value().expect("INCR"), i as i64 + 1, "{}", keys[i]);
    }
    let client = migrating.async_client();
    for (i, k) in keys.iter().enumerate().skip(25) {
        let want = if i >= 50 { 1001 } else { i as i64 + 1 };
        assert_eq!(client.incr(k).wait().expect("INCR"), want, "{k}");
    }
    assert_eq!(total_calls(&old, 2, "migrate"), before.0, "no MIGRATE");
    assert!(
        total_calls(&old, 2, "pttl") > before.1,
        "through the client"
    );
    for k in &keys[..50] {
        let owner = old
            .router()
            .expect("r")
            .host_for_key(k.as_bytes())
            .expect("route");
        let left = old.local_client(owner).expect("local").get(k).expect("GET");
        assert_eq!(left, None, "{k} left on its old owner");
    }
}

/// Servers with a password: MIGRATE logs in to the new owner (AUTH), and
/// no error names the password (the old servers here lack MIGRATE, so
/// Transfer::Migrate fails).
#[test]
fn migrate_logs_in_and_never_shows_the_password() {
    const SECRET: &str = "s3cr3t-Pa55";
    let setup =
        TestSetup::with_tcp_config(3, 1, |_| format!("requirepass {SECRET}")).expect("servers");
    let with_password = |n: usize| {
        let mut b = Cluster::builder().router(RouterKind::Partition);
        for i in 0..n {
            b = b.host(i as u32, tcp(&setup, i).password(SECRET));
        }
        b.build().expect("cluster")
    };
    let (old, new) = (with_password(2), with_password(3));
    let filled = fill(&old, 2000);
    let report = move_keys(&old, &new, MoveOptions::new().transfer(Transfer::Migrate))
        .expect("move with AUTH");
    assert!(report.progress.moved > 0);
    assert!(total_calls(&old, 2, "migrate") > 0);
    check_placed(&new, 3, 2000, filled, &[]);
    // A MIGRATE that fails: its error and Debug say nothing of the secret.
    for h in 0..2 {
        let _: String = old
            .local_client(h)
            .expect("local")
            .cmd(rb::cmd("ACL").arg("SETUSER").arg("default").arg("-migrate"))
            .expect("ACL");
    }
    new.all(|c| {
        c.flushdb();
    })
    .expect("FLUSHDB");
    fill(&old, 2000);
    let err = move_keys(&old, &new, MoveOptions::new().transfer(Transfer::Migrate))
        .expect_err("MIGRATE is not allowed");
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains(SECRET), "{shown}");
    assert!(shown.contains("MIGRATE"), "{shown}");
}

/// A delete made while the mover copies the key through the client
/// (`DUMP`/`RESTORE`, its `RESTORE` held at a proxy until the delete has
/// returned): the copy lands after the delete, and the mover takes it back
/// (it finds the old copy gone).
#[test]
fn a_delete_during_a_copy_through_the_client_is_not_undone() {
    let two = NewOwnerBehindAProxy::start();
    let migrating = two.migrating();
    let NewOwnerBehindAProxy {
        setup: _servers,
        old,
        direct,
        proxy,
        mover_new,
    } = two;
    let key = a_leaving_key(&old, &direct, 0);
    old.routing_client().set(&key, 42).expect("SET");
    proxy.set_fault(Fault::Hold);
    let mover = {
        let (old, new) = (old.clone(), mover_new.clone());
        std::thread::spawn(move || {
            move_keys(
                &old,
                &new,
                MoveOptions::new().transfer(Transfer::DumpRestore),
            )
        })
    };
    let since = Instant::now();
    while proxy.received_bytes() == 0 {
        assert!(
            since.elapsed() < Duration::from_secs(10),
            "the mover never sent"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // The RESTORE is held: the delete reaches both owners first.
    assert_eq!(migrating.routing_client().del(&[&key]).expect("DEL"), 1);
    proxy.set_fault(Fault::None);
    let report = mover.join().expect("mover").expect("move");
    assert_eq!(report.progress.vanished, 1, "{:?}", report.progress);
    let on_new = direct
        .local_client(1)
        .expect("local")
        .get(&key)
        .expect("GET");
    let on_old = old.local_client(0).expect("local").get(&key).expect("GET");
    assert_eq!((on_old, on_new), (None, None), "the delete stands");
}

/// A key MIGRATE refuses because its new owner has it (BUSYKEY), gone from
/// the new owner by the time the mover looks (a concurrent change, here a
/// delete made while the mover's look is held at the proxy): the mover
/// migrates it once more. It failed the move with `Transfer::Migrate`
/// (and made `Auto` give up MIGRATE for the pair).
#[test]
fn a_key_refused_as_busy_and_gone_since_is_migrated_again() {
    let NewOwnerBehindAProxy {
        setup: _servers,
        old,
        direct,
        proxy,
        mover_new,
    } = NewOwnerBehindAProxy::start();
    // A first move: the mover's client connection to the new owner is the
    // proxy's connection 0 (its INFO), the old server's MIGRATE connection
    // is connection 1 (the canary; the old server keeps it open).
    old.routing_client()
        .set(a_leaving_key(&old, &direct, 1), 1)
        .expect("SET");
    move_keys(
        &old,
        &mover_new,
        MoveOptions::new().transfer(Transfer::Migrate),
    )
    .expect("warm-up");
    assert_eq!(proxy.accepted(), 2);
    let key = a_leaving_key(&old, &direct, 0);
    old.routing_client().set(&key, "old").expect("SET");
    let target = direct.local_client(1).expect("local");
    target.set(&key, "theirs").expect("SET");
    let looked = proxy.received_bytes_on(0);
    proxy.set_fault(Fault::HoldConnection(0));
    let mover = {
        let (old, new) = (old.clone(), mover_new.clone());
        std::thread::spawn(move || {
            move_keys(&old, &new, MoveOptions::new().transfer(Transfer::Migrate))
        })
    };
    // MIGRATE was refused (BUSYKEY); the mover's look at the new owner is held.
    let since = Instant::now();
    while proxy.received_bytes_on(0) == looked {
        assert!(
            since.elapsed() < Duration::from_secs(10),
            "the mover never looked"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(target.del(&[&key]).expect("DEL"), 1);
    proxy.set_fault(Fault::None);
    let report = mover.join().expect("mover").expect("move");
    assert_eq!(report.progress.moved, 1, "{:?}", report.progress);
    assert_eq!(target.get(&key).expect("GET"), Some(b"old".to_vec()));
    let left = old.local_client(0).expect("local").get(&key).expect("GET");
    assert_eq!(left, None);
}
