//! Moving keys when a fleet grows or shrinks, against real servers: every
//! key ends on its new owner with its value and TTL, writes made during the
//! move win, a mover killed half-way resumes from its printed position.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

mod common;

use rb::migrate::{move_keys, MoveOptions};
use rb::testing::TestSetup;
use rb::{Cluster, Commands, HostConfig, RouterKind, ScanCursor};

/// A cluster over servers `0..n` of `setup` (socket paths, or
/// `127.0.0.1:port` for TCP), with `kind`.
fn over(places: &[String], n: usize, kind: RouterKind) -> Cluster {
    let mut b = Cluster::builder().router(kind);
    for (i, place) in places.iter().take(n).enumerate() {
        let host = match place.strip_prefix("127.0.0.1:") {
            Some(port) => HostConfig::new()
                .host("127.0.0.1")
                .port(port.parse().expect("a port")),
            None => HostConfig::new().unix_socket_path(place.clone()),
        };
        b = b.host(i as u32, host);
    }
    b.build().expect("cluster")
}

fn sockets(setup: &TestSetup) -> Vec<String> {
    (0..setup.server_count())
        .map(|i| setup.socket(i).to_string_lossy().into_owned())
        .collect()
}

/// When a fill ran: its keys' TTLs started between these two instants.
#[derive(Clone, Copy)]
struct Filled {
    start: std::time::Instant,
    end: std::time::Instant,
}

/// Fills `cluster` with `n` keys (every 10th with a TTL of 1000 s); when.
fn fill(cluster: &Cluster, n: usize) -> Filled {
    let start = std::time::Instant::now();
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
    Filled {
        start,
        end: std::time::Instant::now(),
    }
}

/// Every key is on its owner in `cluster`, with its value, and on no other
/// server; TTLs kept within a second of what `fill` (at `filled`) set.
fn check_placed(cluster: &Cluster, n: usize, filled: Filled) {
    let router = cluster.router().expect("router");
    let mut per_host: HashMap<u32, Vec<String>> = HashMap::new();
    for i in 0..n {
        let key = format!("k:{i}");
        let owner = router.host_for_key(key.as_bytes()).expect("route");
        per_host.entry(owner).or_default().push(key);
    }
    let mut total = 0;
    for (host, keys) in &per_host {
        let local = cluster.local_client(*host).expect("local");
        let size = local.dbsize().expect("DBSIZE");
        assert_eq!(
            size as usize,
            keys.len(),
            "host {host} holds only its own keys"
        );
        for key in keys {
            let i: usize = key[2..].parse().expect("index");
            let v: Option<Vec<u8>> = local.get(key).expect("GET");
            assert_eq!(v, Some(i.to_string().into_bytes()), "{key} on host {host}");
            let ttl = local.ttl(key).expect("TTL");
            // A key set early in a slow fill has less left than one set
            // late: each may have anything between.
            let least = 1000 - filled.start.elapsed().as_secs() as i64 - 1;
            let most = 1000 - filled.end.elapsed().as_secs() as i64;
            if i % 10 == 0 {
                assert!(
                    (least..=most).contains(&ttl),
                    "{key}: ttl {ttl}, want {least}..={most}"
                );
            } else {
                assert_eq!(ttl, -1, "{key}");
            }
        }
        total += keys.len();
    }
    assert_eq!(total, n);
}

#[test]
fn growing_moves_every_changed_key_with_its_ttl() {
    let setup = TestSetup::new(5, 1).expect("servers");
    let paths = sockets(&setup);
    for (kind, name) in [
        (RouterKind::Partition, "partition"),
        (RouterKind::ConsistentHashing, "ketama"),
    ] {
        for local in 0..5 {
            over(&paths, 5, RouterKind::Partition)
                .local_client(local)
                .expect("local")
                .flushdb()
                .expect("FLUSHDB");
        }
        let old = over(&paths, 4, kind);
        let new = over(&paths, 5, kind);
        let filled = fill(&old, 20_000);
        let report = move_keys(&old, &new, MoveOptions::new().batch(500)).expect("move");
        let p = &report.progress;
        println!(
            "{name} 4 -> 5: {} of 20000 keys moved ({:.1}%), {} keys/s moved",
            p.moved,
            100.0 * p.moved as f64 / 20_000.0,
            (p.moved as f64 / report.elapsed.as_secs_f64()) as u64
        );
        // Keys moved onto a host the walk has not reached yet are seen
        // again there (and stay).
        assert!(
            p.scanned >= 20_000 && p.moved + p.stayed == p.scanned,
            "{p:?}"
        );
        assert_eq!((p.skipped, p.vanished), (0, 0));
        check_placed(&new, 20_000, filled);
    }
}

#[test]
fn shrinking_and_changing_the_router() {
    let setup = TestSetup::new(5, 1).expect("servers");
    let paths = sockets(&setup);
    let old = over(&paths, 5, RouterKind::Partition);
    let filled = fill(&old, 10_000);
    let new = over(&paths, 4, RouterKind::ConsistentHashing);
    let report = move_keys(&old, &new, MoveOptions::new()).expect("move");
    println!("partition 5 -> ketama 4: {:?}", report.progress);
    check_placed(&new, 10_000, filled);
}

/// A write made on the new owner during the move wins over the old copy,
/// and a key deleted during the move is not brought back.
#[test]
fn writes_during_the_move_win() {
    let setup = TestSetup::new(3, 1).expect("servers");
    let paths = sockets(&setup);
    let old = over(&paths, 2, RouterKind::Partition);
    let new = over(&paths, 3, RouterKind::Partition);
    fill(&old, 2000);
    let new_client = new.routing_client();
    let moved: Vec<String> = (0..2000)
        .map(|i| format!("k:{i}"))
        .filter(|k| {
            old.router()
                .expect("r")
                .host_for_key(k.as_bytes())
                .expect("k")
                != new
                    .router()
                    .expect("r")
                    .host_for_key(k.as_bytes())
                    .expect("k")
        })
        .collect();
    // Newer values written to the new owner before the mover gets there.
    for k in moved.iter().take(100) {
        new_client.set(k, "newer").expect("SET");
    }
    move_keys(&old, &new, MoveOptions::new()).expect("move");
    for k in moved.iter().take(100) {
        assert_eq!(
            new_client.get(k).expect("GET"),
            Some(b"newer".to_vec()),
            "{k}"
        );
    }
    // The old copies are gone from the old owners.
    for k in moved.iter().take(100) {
        let was = old
            .router()
            .expect("r")
            .host_for_key(k.as_bytes())
            .expect("k");
        let v: Option<Vec<u8>> = old.local_client(was).expect("local").get(k).expect("GET");
        assert_eq!(v, None, "{k} left on host {was}");
    }
}

/// The child process of [`a_killed_mover_resumes_from_its_position`].
fn child_mover() -> bool {
    let Ok(paths) = std::env::var("RB_MOVER_SOCKETS") else {
        return false;
    };
    let paths: Vec<String> = paths.split('\n').map(String::from).collect();
    let old = over(&paths, 4, RouterKind::Partition);
    let new = over(&paths, 5, RouterKind::Partition);
    let _ = move_keys(
        &old,
        &new,
        MoveOptions::new()
            .batch(200)
            .keys_per_second(10_000)
            .progress(|p| {
                if let Some(at) = p.resume_at {
                    println!("resume {at}");
                }
            }),
    );
    true
}

#[test]
fn a_killed_mover_resumes_from_its_position() {
    if child_mover() {
        return;
    }
    let setup = TestSetup::new(5, 1).expect("servers");
    killed_mover_resumes(
        &setup,
        sockets(&setup),
        "a_killed_mover_resumes_from_its_position",
    );
}

/// The same over TCP, where the mover moves keys with MIGRATE.
#[test]
fn a_killed_migrating_mover_resumes_from_its_position() {
    if child_mover() {
        return;
    }
    let setup = TestSetup::with_tcp(5, 1).expect("servers");
    let places = (0..5)
        .map(|i| format!("127.0.0.1:{}", setup.tcp_port(i).expect("port")))
        .collect();
    killed_mover_resumes(
        &setup,
        places,
        "a_killed_migrating_mover_resumes_from_its_position",
    );
    let all = over(&sockets(&setup), 5, RouterKind::Partition);
    let migrates: u64 = (0..4)
        .map(|h| common::command_calls(&all, h, "migrate"))
        .sum();
    assert!(migrates > 0, "the keys moved with MIGRATE");
}

/// Fills 4 of `setup`'s servers, starts a mover to 5 in a child process
/// (this test binary running `test`), kills it about half-way, resumes
/// from its last reported position and checks every key.
fn killed_mover_resumes(setup: &TestSetup, paths: Vec<String>, test: &str) {
    assert_eq!(setup.server_count(), 5);
    let old = over(&paths, 4, RouterKind::Partition);
    let new = over(&paths, 5, RouterKind::Partition);
    let filled = fill(&old, 30_000);
    let exe = std::env::current_exe().expect("this test binary");
    let mut child = Command::new(exe)
        .args([test, "--exact", "--nocapture"])
        .env("RB_MOVER_SOCKETS", paths.join("\n"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the mover");
    let out = child.stdout.take().expect("stdout");
    let mut last = None;
    let mut reports = 0;
    for line in BufReader::new(out).lines() {
        let line = line.expect("line");
        if let Some(at) = line.strip_prefix("resume ") {
            last = Some(at.parse::<ScanCursor>().expect("a cursor"));
            reports += 1;
            if reports == 60 {
                break; // about half-way (rate-limited): kill it, mid-batch as it may be
            }
        }
    }
    child.kill().expect("kill the mover");
    let _ = child.wait();
    let at = last.expect("the mover reported progress");
    println!("killed; resuming at {at}");
    let report = move_keys(&old, &new, MoveOptions::new().resume_from(at)).expect("resume");
    println!("resumed: {:?}", report.progress);
    assert!(report.progress.moved > 0, "the killed mover had work left");
    check_placed(&new, 30_000, filled);
}

/// Growing (partition 4 -> 5), then shrinking and changing the router
/// (partition 5 -> ketama 4) over TCP, where the mover uses MIGRATE.
#[test]
fn growing_and_shrinking_with_migrate() {
    let setup = TestSetup::with_tcp(5, 1).expect("servers");
    let places: Vec<String> = (0..5)
        .map(|i| format!("127.0.0.1:{}", setup.tcp_port(i).expect("port")))
        .collect();
    let four = over(&places, 4, RouterKind::Partition);
    let five = over(&places, 5, RouterKind::Partition);
    let filled = fill(&four, 10_000);
    let grown = move_keys(&four, &five, MoveOptions::new().batch(500)).expect("grow");
    println!("partition 4 -> 5 with MIGRATE: {:?}", grown.progress);
    check_placed(&five, 10_000, filled);
    let ketama = over(&places, 4, RouterKind::ConsistentHashing);
    let shrunk = move_keys(&five, &ketama, MoveOptions::new()).expect("shrink");
    println!(
        "partition 5 -> ketama 4 with MIGRATE: {:?}",
        shrunk.progress
    );
    check_placed(&ketama, 10_000, filled);
    let migrates: u64 = (0..5)
        .map(|h| common::command_calls(&five, h, "migrate"))
        .sum();
    assert!(migrates > 0, "the keys moved with MIGRATE");
}
