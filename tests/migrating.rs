//! A migrating cluster against real servers: reads fall back to the old
//! owner, writes land on the new one, and with the mover running and
//! writers and readers at work, nothing is lost.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rb::migrate::{move_keys, MoveOptions};
use rb::testing::TestSetup;
use rb::{Cluster, Commands, HostConfig, RouterKind};

/// Servers `0..n` of `setup`, over TCP when they listen on it (then the
/// mover moves keys with MIGRATE), else their unix sockets.
fn builder_over(setup: &TestSetup, n: usize, kind: RouterKind) -> rb::ClusterBuilder {
    let mut b = Cluster::builder().router(kind);
    for i in 0..n {
        let host = match setup.tcp_port(i) {
            Some(port) => HostConfig::new().host("127.0.0.1").port(port),
            None => {
                HostConfig::new().unix_socket_path(setup.socket(i).to_string_lossy().into_owned())
            }
        };
        b = b.host(i as u32, host);
    }
    b
}

fn over(setup: &TestSetup, n: usize, kind: RouterKind, from: Option<&Cluster>) -> Cluster {
    let mut b = builder_over(setup, n, kind);
    if let Some(old) = from {
        b = b.migrating_from(old);
    }
    b.build().expect("cluster")
}

/// Where each of `keys` is, by the plain clusters `old` and `new` (each
/// asked of its own owner): (on the old owner, on the new owner, the new
/// copy's PTTL).
fn places(old: &Cluster, new: &Cluster, key: &str) -> (bool, bool, i64) {
    let on_old = old.routing_client().exists(&[key]).expect("EXISTS old") == 1;
    let client = new.routing_client();
    let on_new = client.exists(&[key]).expect("EXISTS new") == 1;
    let ttl: i64 = client.cmd(rb::cmd("PTTL").arg(key)).expect("PTTL");
    (on_old, on_new, ttl)
}

#[test]
fn copy_forward_moves_what_reads_find_on_the_old_owner() {
    let setup = TestSetup::new(5, 1).expect("servers");
    let old = over(&setup, 4, RouterKind::Partition, None);
    let plain_new = over(&setup, 5, RouterKind::Partition, None);
    let copying = builder_over(&setup, 5, RouterKind::Partition)
        .migrating_from(&old)
        .copy_forward(true)
        .build()
        .expect("cluster");
    let reading = over(&setup, 5, RouterKind::Partition, Some(&old));
    let old_router = old.router().expect("router");
    let new_router = plain_new.router().expect("router");
    let moving: Vec<String> = (0..400)
        .map(|i| format!("cf:{i}"))
        .filter(|k| {
            old_router.host_for_key(k.as_bytes()).expect("old")
                != new_router.host_for_key(k.as_bytes()).expect("new")
        })
        .take(60)
        .collect();
    assert_eq!(moving.len(), 60, "keys that change owner");
    old.map(|c| {
        for (i, k) in moving.iter().enumerate() {
            match i % 3 {
                0 => drop(c.set(k.as_str(), i)),
                1 => {
                    drop(c.cmd::<()>(rb::cmd("SET").arg(k.as_str()).arg(i).arg("PX").arg(600_000)))
                }
                _ => drop(c.hset(k.as_str(), "f", i)),
            }
        }
    })
    .expect("fill");
    // Without copy-forward, reads only read: every key stays put.
    let strings: Vec<&String> = moving
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 3 != 2)
        .map(|(_, k)| k)
        .collect();
    let hashes: Vec<&String> = moving
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 3 == 2)
        .map(|(_, k)| k)
        .collect();
    let half = strings.len() / 2;
    let got = reading
        .map(|c| {
            strings
                .iter()
                .map(|k| c.get(k.as_str()))
                .collect::<Vec<_>>()
        })
        .expect("map");
    assert!(got.iter().all(|p| p.value().expect("GET").is_some()));
    assert!(
        moving.iter().all(|k| places(&old, &plain_new, k).0),
        "still on the old owners"
    );
    assert_eq!(reading.stats().migration.expect("stats").copied_forward, 0);

    // With it: a map's GETs (half the strings), the routing client's HGETs
    // (the EXISTS path), the async client's GETs (the other half).
    let got = copying
        .map(|c| {
            strings[..half]
                .iter()
                .map(|k| c.get(k.as_str()))
                .collect::<Vec<_>>()
        })
        .expect("map");
    for (p, k) in got.iter().zip(&strings[..half]) {
        assert!(p.value().expect("GET").is_some(), "{k}");
    }
    let client = copying.routing_client();
    for k in &hashes {
        assert!(client.hget(k.as_str(), "f").expect("HGET").is_some(), "{k}");
    }
    let a = copying.async_client();
    for k in &strings[half..] {
        assert!(a.get(k.as_str()).wait().expect("GET").is_some(), "{k}");
    }
    for (i, k) in moving.iter().enumerate() {
        let (on_old, on_new, ttl) = places(&old, &plain_new, k);
        assert!(!on_old && on_new, "{k}: moved (old {on_old}, new {on_new})");
        if i % 3 == 1 {
            assert!(ttl > 590_000 && ttl <= 600_000, "{k}: TTL kept, {ttl}");
        } else {
            assert_eq!(ttl, -1, "{k}: no TTL");
        }
    }
    let stats = copying.stats().migration.expect("stats");
    println!("{stats:?}");
    assert_eq!(stats.copied_forward, moving.len() as u64);
    assert_eq!(stats.copy_forward_failures, 0);
    // The next reads are hits on the new owner: no fallback.
    let before = stats.fallback_reads;
    let got = copying
        .map(|c| {
            moving
                .iter()
                .map(|k| c.exists(&[k.as_str()]))
                .collect::<Vec<_>>()
        })
        .expect("map");
    assert!(got.iter().all(|p| p.value().expect("EXISTS") == 1));
    assert_eq!(
        copying.stats().migration.expect("stats").fallback_reads,
        before
    );
}

#[test]
fn reads_fall_back_and_writes_land_on_the_new_owner() {
    let setup = TestSetup::new(5, 1).expect("servers");
    let old = over(&setup, 4, RouterKind::Partition, None);
    let new = over(&setup, 5, RouterKind::Partition, Some(&old));
    old.map(|c| {
        for i in 0..2000 {
            c.set(format!("k:{i}"), i);
        }
        c.hset("h", "f", "v");
        c.rpush("l", &["a", "b"]);
    })
    .expect("fill");
    // Reads through the migrating cluster: maps, the routing client, MGET.
    let values = new
        .map(|c| {
            (0..2000)
                .map(|i| c.get(format!("k:{i}")))
                .collect::<Vec<_>>()
        })
        .expect("map");
    for (i, v) in values.iter().enumerate() {
        assert_eq!(
            v.value().expect("GET"),
            Some(i.to_string().into_bytes()),
            "k:{i}"
        );
    }
    let client = new.routing_client();
    let keys: Vec<String> = (0..50).map(|i| format!("k:{i}")).collect();
    let got = client.mget(&keys).expect("MGET");
    assert!(got
        .iter()
        .enumerate()
        .all(|(i, v)| v.as_deref() == Some(i.to_string().as_bytes())));
    assert_eq!(client.hget("h", "f").expect("HGET"), Some(b"v".to_vec()));
    assert_eq!(client.llen("l").expect("LLEN"), 2);
    let stats = new.stats().migration.expect("migration stats");
    println!("{stats:?}");
    assert!(stats.fallback_reads > 1000 && stats.fallback_hits > 1000);

    // A modify on a key still on its old owner moves it first.
    assert_eq!(client.incr("k:7").expect("INCR"), 8);
    assert_eq!(client.rpush("l", &["c"]).expect("RPUSH"), 3);
    // An overwrite lands on the new owner; the old copy goes.
    client.set("k:8", "eight").expect("SET");
    assert_eq!(client.get("k:8").expect("GET"), Some(b"eight".to_vec()));
    // A delete reaches both.
    assert_eq!(client.del(&["k:9"]).expect("DEL"), 1);
    assert_eq!(client.get("k:9").expect("GET"), None);
    let plain_new = over(&setup, 5, RouterKind::Partition, None);
    let plain = plain_new.routing_client();
    assert_eq!(
        plain.get("k:7").expect("GET"),
        Some(b"8".to_vec()),
        "moved then incremented"
    );
    assert_eq!(plain.get("k:8").expect("GET"), Some(b"eight".to_vec()));
    assert_eq!(
        old.routing_client().get("k:8").expect("GET"),
        None,
        "old copy gone"
    );
    assert_eq!(old.routing_client().get("k:9").expect("GET"), None);
}

/// The mover runs while 10 writers INCR counters, writers SET versions and
/// readers read: counters end exact, the last versions win, no read sees
/// nil for a key that exists, and every key ends on its new owner.
#[test]
fn nothing_is_lost_while_the_mover_runs() {
    nothing_is_lost(&TestSetup::new(5, 1).expect("servers"));
}

/// The same over TCP: the mover's MIGRATE and the writers' own moves
/// (DUMP/RESTORE) cross.
#[test]
fn nothing_is_lost_while_the_mover_migrates() {
    let setup = TestSetup::with_tcp(5, 1).expect("servers");
    nothing_is_lost(&setup);
    let old = over(&setup, 4, RouterKind::Partition, None);
    let migrates: u64 = (0..4)
        .map(|h| {
            let info: String = old
                .local_client(h)
                .expect("local")
                .cmd(rb::cmd("INFO").arg("commandstats"))
                .expect("INFO");
            info.lines()
                .find_map(|l| l.strip_prefix("cmdstat_migrate:calls="))
                .and_then(|r| r.split(',').next())
                .map_or(0, |n| n.parse().expect("calls"))
        })
        .sum();
    assert!(migrates > 0, "the mover used MIGRATE");
}

fn nothing_is_lost(setup: &TestSetup) {
    let old = over(setup, 4, RouterKind::Partition, None);
    let new = over(setup, 5, RouterKind::Partition, Some(&old));
    const KEYS: usize = 20_000;
    old.map(|c| {
        for i in 0..KEYS {
            c.set(format!("k:{i}"), i);
        }
        for j in 0..100 {
            c.set(format!("c:{j}"), 0);
            c.set(format!("v:{j}"), 0);
        }
    })
    .expect("fill");
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for w in 0..10 {
        let client = new.routing_client();
        threads.push(std::thread::spawn(move || {
            for n in 0..300 {
                client.incr(format!("c:{}", (n + w) % 100)).expect("INCR");
            }
            0usize
        }));
    }
    {
        let client = new.routing_client();
        threads.push(std::thread::spawn(move || {
            for version in 1..=200 {
                for j in 0..100 {
                    if (version + j) % 20 == 0 {
                        client.set(format!("v:{j}"), version).expect("SET");
                    }
                }
            }
            0
        }));
    }
    for r in 0..2 {
        let (client, stop) = (new.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut reads = 0;
            while !stop.load(Ordering::Relaxed) {
                let start = (reads * 97 + r * 5000) % (KEYS - 100);
                let got = client
                    .map(|c| {
                        (start..start + 100)
                            .map(|i| c.get(format!("k:{i}")))
                            .collect::<Vec<_>>()
                    })
                    .expect("map");
                for (i, p) in (start..).zip(got) {
                    assert_eq!(
                        p.value().expect("GET"),
                        Some(i.to_string().into_bytes()),
                        "k:{i} read as missing"
                    );
                }
                reads += 1;
            }
            reads
        }));
    }
    let report = move_keys(
        &old,
        &new,
        MoveOptions::new().batch(500).keys_per_second(40_000),
    )
    .expect("move");
    println!("moved: {:?}", report.progress);
    stop.store(true, Ordering::Relaxed);
    let mut reads = 0;
    for t in threads {
        reads += t.join().expect("worker");
    }
    println!(
        "{reads} read maps of 100 keys during the move; {:?}",
        new.stats().migration
    );
    // One more pass for keys written back to the old owners' ranges: none
    // should be left.
    let again =
        move_keys(&old, &new, MoveOptions::new().delete_delay(Duration::ZERO)).expect("again");
    assert_eq!(again.progress.moved, 0, "{:?}", again.progress);

    let plain = over(setup, 5, RouterKind::Partition, None);
    let client = plain.routing_client();
    let total: i64 = (0..100)
        .map(|j| {
            client
                .cmd::<i64>(rb::cmd("GET").arg(format!("c:{j}")))
                .expect("GET")
        })
        .sum();
    assert_eq!(total, 10 * 300, "every INCR counted once");
    for j in 0..100 {
        let last = (1..=200)
            .filter(|v| (v + j) % 20 == 0)
            .max()
            .expect("a version");
        let v: i64 = client
            .cmd(rb::cmd("GET").arg(format!("v:{j}")))
            .expect("GET");
        assert_eq!(v, last as i64, "v:{j}");
    }
    let router = plain.router().expect("router");
    for i in (0..KEYS).step_by(7) {
        let key = format!("k:{i}");
        let owner = router.host_for_key(key.as_bytes()).expect("route");
        let v: Option<Vec<u8>> = plain
            .local_client(owner)
            .expect("local")
            .get(&key)
            .expect("GET");
        assert_eq!(
            v,
            Some(i.to_string().into_bytes()),
            "{key} on its new owner"
        );
    }
}

/// The async client and execute_commands follow the same rules.
#[test]
fn the_async_client_and_execute_commands_migrate_too() {
    let setup = TestSetup::new(3, 1).expect("servers");
    let old = over(&setup, 2, RouterKind::Partition, None);
    let new = over(&setup, 3, RouterKind::Partition, Some(&old));
    old.map(|c| {
        for i in 0..500 {
            c.set(format!("k:{i}"), i);
        }
    })
    .expect("fill");
    let client = new.async_client();
    for i in 0..500 {
        let v = client.get(format!("k:{i}")).wait().expect("GET");
        assert_eq!(v, Some(i.to_string().into_bytes()), "k:{i}");
    }
    let keys: Vec<String> = (0..20).map(|i| format!("k:{i}")).collect();
    let all = client.mget(&keys).wait().expect("MGET");
    assert!(all
        .iter()
        .enumerate()
        .all(|(i, v)| v.as_deref() == Some(i.to_string().as_bytes())));
    assert_eq!(client.incr("k:3").wait().expect("INCR"), 4);
    client.set("k:4", "four").wait().expect("SET");
    assert_eq!(client.del(&["k:5", "k:6"]).wait().expect("DEL"), 2);
    let plain = over(&setup, 3, RouterKind::Partition, None).routing_client();
    assert_eq!(plain.get("k:3").expect("GET"), Some(b"4".to_vec()));
    assert_eq!(plain.get("k:4").expect("GET"), Some(b"four".to_vec()));
    assert_eq!(client.get("k:5").wait().expect("GET"), None);
    assert_eq!(old.routing_client().get("k:5").expect("GET"), None);

    let out = new
        .execute_commands([(
            "k:10",
            vec![
                rb::cmd("INCR").arg("k:10").into(),
                rb::cmd("GET").arg("k:10").into(),
            ],
        )])
        .expect("execute_commands");
    assert_eq!(out["k:10"][0].value().expect("INCR"), rb::Value::Int(11));
    assert_eq!(
        plain.get("k:10").expect("GET"),
        Some(b"11".to_vec()),
        "moved, then run"
    );
}
