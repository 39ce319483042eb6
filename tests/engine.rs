//! The engine against real servers: auto-batching as the servers count it,
//! a million keys over 64 hosts, join timeouts, servers stopped and killed
//! mid-map, a routing client shared by threads, socket leaks, concurrent
//! connects, error replies and unroutable commands.
//!
//! Every test spawns its own servers (`rb::testing::TestSetup`, unix
//! sockets in a private temp dir). The two tests that measure the whole
//! process (open fds, resident memory) run their body in a fresh copy of
//! this test binary (see [`isolated`]), so the other tests of this file,
//! which run in parallel threads, cannot disturb what they measure.

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::{cluster, cluster_without_health, command_calls as calls, host_of};
use rb::{Cluster, Commands, Error, HostId, MapOptions, Phase, Promise};

type Bytes = Vec<u8>;

/// `per_host` keys `{prefix}{n}` owned by each host, indexed by host id.
fn keys_per_host(cluster: &Cluster, prefix: &str, per_host: usize) -> Vec<Vec<String>> {
    let hosts = cluster.host_ids().len();
    let mut keys = vec![Vec::new(); hosts];
    let mut n = 0u64;
    while keys.iter().any(|k| k.len() < per_host) {
        let key = format!("{prefix}{n}");
        let host = host_of(cluster, &key) as usize;
        if keys[host].len() < per_host {
            keys[host].push(key);
        }
        n += 1;
        assert!(n < 1_000_000, "the router never picks some host");
    }
    keys
}

/// The value these tests store under `key`.
fn value_of(key: &str) -> Bytes {
    format!("v:{key}").into_bytes()
}

/// Runs the calling test's body in a fresh copy of this test binary, alone
/// and on one thread, so that process-wide measurements (open fds, RSS) see
/// only that test. Returns true in the copy (run the body there) and false
/// in the parent, after checking that the copy ran exactly that test and
/// passed (its output is printed).
fn isolated(test: &str) -> bool {
    const VAR: &str = "RB_ENGINE_ISOLATED_TEST";
    if std::env::var(VAR).as_deref() == Ok(test) {
        return true;
    }
    let exe = std::env::current_exe().expect("path of this test binary");
    let out = Command::new(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(VAR, test)
        .output()
        .expect("run this test binary again");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("--- {test}, isolated run ---\n{stdout}{stderr}--- end ---");
    assert!(
        out.status.success(),
        "the isolated run of {test} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("test result: ok. 1 passed"),
        "the isolated run did not run {test}:\n{stdout}"
    );
    false
}

fn reset_stats(cluster: &Cluster, host: HostId) {
    cluster
        .local_client(host)
        .expect("local client")
        .cmd::<()>(rb::cmd("CONFIG").arg("RESETSTAT"))
        .expect("CONFIG RESETSTAT");
}

/// `(get, mget, set, mset)` calls since the last reset.
fn get_set_calls(cluster: &Cluster, host: HostId) -> (u64, u64, u64, u64) {
    (
        calls(cluster, host, "get"),
        calls(cluster, host, "mget"),
        calls(cluster, host, "set"),
        calls(cluster, host, "mset"),
    )
}

/// Open fds of this process: all of them, and the sockets among them.
fn open_fds() -> (usize, usize) {
    let mut all = 0;
    let mut sockets = 0;
    for entry in std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd") {
        let entry = entry.expect("fd entry");
        all += 1;
        if let Ok(target) = std::fs::read_link(entry.path()) {
            if target.to_string_lossy().starts_with("socket:") {
                sockets += 1;
            }
        }
    }
    // The directory handle of `read_dir` itself is one of them.
    (all - 1, sockets)
}

// ---------------------------------------------------------------------------
// 1. auto-batching, as the server counts it
// ---------------------------------------------------------------------------

#[test]
fn auto_batching_sends_ceil_n_over_max_batch_mgets() {
    const N: usize = 1000;
    const B: usize = 64;
    // ceil(1000 / 64) = 16: fifteen full batches and one of 40 keys.
    const BATCHES: u64 = N.div_ceil(B) as u64;
    const _: () = assert!(BATCHES == 16);
    const _: () = assert!(N % B > 1, "the last batch must have more than one key");

    let (_setup, cluster) = cluster(1, 1);
    let keys: Vec<String> = (0..N).map(|i| format!("batch:{i}")).collect();
    let batched = MapOptions::new().max_batch_size(B);

    reset_stats(&cluster, 0);
    let sets = cluster
        .map_with(batched.clone(), |c| {
            keys.iter()
                .map(|k| c.set(k, value_of(k)))
                .collect::<Vec<_>>()
        })
        .expect("batched SET map");
    assert!(sets.iter().all(|p| p.value().is_ok()));
    let gets = cluster
        .map_with(batched.clone(), |c| {
            keys.iter().map(|k| c.get(k)).collect::<Vec<_>>()
        })
        .expect("batched GET map");
    for (k, p) in keys.iter().zip(&gets) {
        assert_eq!(p.value().unwrap(), Some(value_of(k)), "{k}");
    }
    let (get, mget, set, mset) = get_set_calls(&cluster, 0);
    println!("N={N} B={B}: GET {get}, MGET {mget}, SET {set}, MSET {mset}");
    assert_eq!((mset, set), (BATCHES, 0), "MSET/SET calls for {N} SETs");
    assert_eq!((mget, get), (BATCHES, 0), "MGET/GET calls for {N} GETs");

    // A tail run of exactly one key goes out as a plain GET (SET).
    reset_stats(&cluster, 0);
    let tail = &keys[..B + 1];
    let gets = cluster
        .map_with(batched.clone(), |c| {
            tail.iter().map(|k| c.get(k)).collect::<Vec<_>>()
        })
        .expect("batched GET map");
    for (k, p) in tail.iter().zip(&gets) {
        assert_eq!(p.value().unwrap(), Some(value_of(k)), "{k}");
    }
    cluster
        .map_with(batched, |c| {
            for k in tail {
                c.set(k, value_of(k));
            }
        })
        .expect("batched SET map");
    assert_eq!(
        get_set_calls(&cluster, 0),
        (1, 1, 1, 1),
        "65 keys with batches of 64: one MGET + one GET, one MSET + one SET"
    );

    // Batching off: one command per call.
    reset_stats(&cluster, 0);
    let unbatched = MapOptions::new().auto_batch(false).max_batch_size(B);
    cluster
        .map_with(unbatched.clone(), |c| {
            for k in &keys {
                c.set(k, value_of(k));
            }
        })
        .expect("unbatched SET map");
    let gets = cluster
        .map_with(unbatched, |c| {
            keys.iter().map(|k| c.get(k)).collect::<Vec<_>>()
        })
        .expect("unbatched GET map");
    for (k, p) in keys.iter().zip(&gets) {
        assert_eq!(p.value().unwrap(), Some(value_of(k)), "{k}");
    }
    let (get, mget, set, mset) = get_set_calls(&cluster, 0);
    println!("auto_batch(false): GET {get}, MGET {mget}, SET {set}, MSET {mset}");
    assert_eq!((get, mget), (N as u64, 0));
    assert_eq!((set, mset), (N as u64, 0));
}

// ---------------------------------------------------------------------------
// 2. a million keys over 64 hosts
// ---------------------------------------------------------------------------

#[test]
fn map_over_64_hosts_with_a_million_keys() {
    if !isolated("map_over_64_hosts_with_a_million_keys") {
        return;
    }
    const KEYS: usize = 1_000_000;
    let (_setup, cluster) = cluster(8, 8);
    assert_eq!(cluster.host_ids().len(), 64);
    let (rss_before, hwm_before) = common::watch::rss_kib();

    let start = Instant::now();
    let sets = cluster
        .map(|c| {
            (0..KEYS)
                .map(|i| c.set(format!("m:{i}"), i))
                .collect::<Vec<_>>()
        })
        .expect("SET map");
    let set_time = start.elapsed();
    assert_eq!(sets.len(), KEYS);
    assert!(sets.iter().all(Promise::is_resolved), "every SET resolved");
    drop(sets);
    let (rss_after_set, _) = common::watch::rss_kib();

    let start = Instant::now();
    let gets = cluster
        .map(|c| {
            (0..KEYS)
                .map(|i| c.get(format!("m:{i}")))
                .collect::<Vec<_>>()
        })
        .expect("GET map");
    let get_time = start.elapsed();
    let mut wrong = 0;
    for (i, p) in gets.iter().enumerate() {
        if p.value().expect("GET resolved") != Some(i.to_string().into_bytes()) {
            wrong += 1;
        }
    }
    assert_eq!(wrong, 0, "values read back wrong");
    let (rss_after_get, hwm_after) = common::watch::rss_kib();
    drop(gets);

    let sizes = cluster
        .all(|c| c.dbsize())
        .expect("DBSIZE fanout")
        .value()
        .expect("DBSIZE values");
    assert_eq!(sizes.len(), 64);
    assert_eq!(sizes.values().sum::<i64>(), KEYS as i64);
    let fewest = sizes.values().min().copied().unwrap_or(0);
    assert!(
        fewest > (KEYS / 64 / 2) as i64,
        "keys spread over every host: {sizes:?}"
    );

    let growth_kib = hwm_after.saturating_sub(rss_before);
    println!(
        "1M SET map {set_time:?}, 1M GET map {get_time:?}; RSS before {} MiB \
         (peak {} MiB), after SETs {} MiB, after GETs {} MiB, peak {} MiB; \
         peak growth {} MiB",
        rss_before / 1024,
        hwm_before / 1024,
        rss_after_set / 1024,
        rss_after_get / 1024,
        hwm_after / 1024,
        growth_kib / 1024,
    );
    assert!(
        growth_kib < 1536 * 1024,
        "peak RSS grew by {} MiB for {KEYS} keys",
        growth_kib / 1024
    );
}

// ---------------------------------------------------------------------------
// 3. a stopped server: the join times out for it alone
// ---------------------------------------------------------------------------

#[test]
fn join_timeout_with_a_stopped_server() {
    const BUDGET: Duration = Duration::from_millis(200);
    let (setup, cluster) = cluster_without_health(2, 1);
    let keys = keys_per_host(&cluster, "t:", 100);
    cluster
        .map(|c| {
            for k in keys.iter().flatten() {
                c.set(k, value_of(k));
            }
        })
        .expect("seed map");
    assert_eq!(
        (cluster.idle_connections(0), cluster.idle_connections(1)),
        (1, 1)
    );

    setup.pause(1).expect("SIGSTOP server 1");
    // First with the pooled connection (it passes the liveness check: a
    // stopped server's socket is open), then with a fresh connect (a unix
    // socket connect completes against the stopped server's backlog).
    // Last, with more bytes than the socket takes: they are still being
    // written when the deadline passes.
    let rounds = [
        ("pooled connection", 1, 0, Phase::Read),
        ("fresh connection", 0, 0, Phase::Read),
        (
            "fresh connection, full socket buffer",
            0,
            2000,
            Phase::Write,
        ),
    ];
    let big = vec![b'x'; 1000];
    // Keys of their own: what reached the server runs when it resumes.
    let big_keys = &keys_per_host(&cluster, "tbig:", 10)[1];
    for (round, idle_before, appends, expected_phase) in rounds {
        assert_eq!(cluster.idle_connections(1), idle_before, "{round}");
        let mut promises = Vec::new();
        let mut appended = Vec::new();
        let start = Instant::now();
        let result = cluster.map_with(MapOptions::new().timeout(BUDGET), |c| {
            for (host, ks) in keys.iter().enumerate() {
                for k in ks {
                    promises.push((host as HostId, k, c.get(k)));
                }
            }
            for i in 0..appends {
                appended.push(c.append(&big_keys[i % big_keys.len()], &big));
            }
        });
        let elapsed = start.elapsed();
        println!("{round}: map with a stopped host returned after {elapsed:?}");
        assert!(elapsed >= BUDGET, "{round}: returned before the deadline");
        assert!(
            elapsed < Duration::from_millis(300),
            "{round}: took {elapsed:?}"
        );
        match result {
            Err(Error::Timeout {
                host,
                budget,
                phase,
                ..
            }) => {
                assert_eq!(host.id, 1, "{round}");
                assert_eq!(budget, BUDGET, "{round}");
                // Small requests fit the socket buffer: it is the reply
                // that never came; 2 MB do not.
                assert_eq!(phase, expected_phase, "{round}");
            }
            Err(e) => panic!("{round}: expected a timeout of host 1, got {e}"),
            Ok(()) => panic!("{round}: the map to a stopped server succeeded"),
        }
        for (host, k, p) in &promises {
            assert!(!p.is_pending(), "{round}: {k} still pending");
            if *host == 1 {
                match p.reason() {
                    Some(Error::Timeout { host, .. }) => assert_eq!(host.id, 1),
                    other => panic!("{round}: {k} on host 1: {other:?}"),
                }
            } else {
                assert_eq!(p.value().unwrap(), Some(value_of(k)), "{round}: {k}");
            }
        }
        for p in &appended {
            match p.reason() {
                Some(Error::Timeout { host, .. }) => assert_eq!(host.id, 1),
                other => panic!("{round}: APPEND on host 1: {other:?}"),
            }
        }
        // The timed-out connection is closed, the healthy one pooled.
        assert_eq!(cluster.idle_connections(0), 1, "{round}");
        assert_eq!(cluster.idle_connections(1), 0, "{round}");
    }

    setup.resume(1).expect("SIGCONT server 1");
    let gets = cluster
        .map_with(MapOptions::new().timeout(Duration::from_secs(10)), |c| {
            keys.iter()
                .flatten()
                .map(|k| (k, c.get(k)))
                .collect::<Vec<_>>()
        })
        .expect("map after resume");
    for (k, p) in gets {
        assert_eq!(p.value().unwrap(), Some(value_of(k)), "{k}");
    }
}

// ---------------------------------------------------------------------------
// 4. a server killed while a map to it is in flight
// ---------------------------------------------------------------------------

#[test]
fn server_killed_mid_map() {
    const VICTIM: HostId = 1;
    let (mut setup, cluster) = cluster(3, 1);
    let keys = keys_per_host(&cluster, "kill:", 50);
    let counters = keys_per_host(&cluster, "killn:", 50);
    let big_keys = &keys_per_host(&cluster, "killbig:", 300)[VICTIM as usize];
    cluster
        .map(|c| {
            for k in keys.iter().flatten() {
                c.set(k, value_of(k));
            }
        })
        .expect("seed map");

    // Two idle connections per host: the map's, and one a local client
    // opened while the map held the first. After the kill, the one left in
    // the pool is stale.
    cluster
        .map(|c| {
            for ks in &keys {
                c.get(&ks[0]);
            }
            for host in cluster.host_ids() {
                let pong = cluster.local_client(host).unwrap().ping().unwrap();
                assert_eq!(pong, "PONG");
            }
        })
        .expect("pool-filling map");
    assert_eq!(cluster.idle_connections(VICTIM), 2);

    let big = vec![b'x'; 1000];
    let mut before = Vec::new();
    let mut bulk = Vec::new();
    let mut after = Vec::new();
    let result = cluster.map_with(MapOptions::new().timeout(Duration::from_secs(10)), |c| {
        for (host, ks) in keys.iter().enumerate() {
            for k in ks {
                before.push((host as HostId, k, c.get(k)));
            }
        }
        // Nothing was written yet (below the write threshold), and the
        // stopped server answers nothing: no promise of the victim can be
        // resolved before it dies.
        setup.pause(VICTIM as usize).expect("SIGSTOP the victim");
        // ~200 KB to the victim (APPEND: not batched): written while
        // enqueuing, so requests are on the wire when it dies.
        for k in &big_keys[..200] {
            bulk.push(c.append(k, &big));
        }
        setup.kill(VICTIM as usize).expect("SIGKILL the victim");
        for (host, ks) in counters.iter().enumerate() {
            for k in ks {
                after.push((host as HostId, k, c.incr(k)));
            }
        }
    });
    match &result {
        Err(e @ Error::Connection { host, .. }) => {
            assert_eq!(host.id, VICTIM, "{e}");
            println!("map with a killed server: {e}");
        }
        Err(e) => panic!("expected a connection error of host {VICTIM}, got {e}"),
        Ok(()) => panic!("the map to a killed server succeeded"),
    }
    let check_victim = |what: &str, p: Option<Error>| match p {
        Some(e @ Error::Connection { .. }) => {
            assert_eq!(e.host().map(|h| h.id), Some(VICTIM), "{what}: {e}")
        }
        other => panic!("{what}: expected a connection error, got {other:?}"),
    };
    for (host, k, p) in &before {
        if *host == VICTIM {
            check_victim(&format!("GET {k}"), p.reason());
        } else {
            assert_eq!(p.value().unwrap(), Some(value_of(k)), "{k}");
        }
    }
    assert_eq!(bulk.len(), 200);
    for p in &bulk {
        check_victim("APPEND", p.reason());
    }
    for (host, k, p) in &after {
        if *host == VICTIM {
            check_victim(&format!("INCR {k}"), p.reason());
        } else {
            assert_eq!(p.value().unwrap(), 1, "INCR {k}");
        }
    }
    // The failed connection was closed; the stale one is still pooled.
    assert_eq!(cluster.idle_connections(VICTIM), 1);

    setup.restart(VICTIM as usize).expect("restart the victim");
    // The victim's data is gone with it; everything else is intact.
    let gets = cluster
        .map_with(MapOptions::new().timeout(Duration::from_secs(10)), |c| {
            keys.iter()
                .enumerate()
                .flat_map(|(host, ks)| ks.iter().map(move |k| (host as HostId, k)))
                .map(|(host, k)| (host, k, c.get(k)))
                .collect::<Vec<_>>()
        })
        .expect("the map after the restart meets the stale connection and reconnects");
    for (host, k, p) in gets {
        let expected = (host != VICTIM).then(|| value_of(k));
        assert_eq!(p.value().unwrap(), expected, "{k}");
    }
    assert_eq!(cluster.idle_connections(VICTIM), 1, "stale one replaced");
    let client = cluster.routing_client();
    let k = &keys[VICTIM as usize][0];
    client.set(k, "back").expect("routing SET after restart");
    assert_eq!(client.get(k).unwrap(), Some(b"back".to_vec()));

    // Again with the server running: some of the first requests may be
    // answered before it dies; each is then answered right, or rejected
    // naming it. What is queued after its death is rejected.
    let mut early = Vec::new();
    let mut late = Vec::new();
    let result = cluster.map_with(MapOptions::new().timeout(Duration::from_secs(10)), |c| {
        for k in &big_keys[..200] {
            early.push(c.append(k, &big));
        }
        // A round trip to the victim on another connection: it has read
        // (and answered) much of the above by now. The next 100 KB go
        // past the write threshold, which also reads what has arrived.
        let pong = cluster.local_client(VICTIM).unwrap().ping().unwrap();
        assert_eq!(pong, "PONG");
        for k in &big_keys[200..] {
            early.push(c.append(k, &big));
        }
        setup.kill(VICTIM as usize).expect("SIGKILL the victim");
        for (host, ks) in counters.iter().enumerate() {
            for k in ks {
                late.push((host as HostId, k, c.incr(k)));
            }
        }
    });
    match &result {
        Err(e @ Error::Connection { host, .. }) => assert_eq!(host.id, VICTIM, "{e}"),
        Err(e) => panic!("expected a connection error of host {VICTIM}, got {e}"),
        Ok(()) => panic!("the map to a killed server succeeded"),
    }
    let mut answered = 0;
    for p in &early {
        match p.reason() {
            None => {
                assert_eq!(p.value().unwrap(), 1000, "APPEND to a fresh key");
                answered += 1;
            }
            e => check_victim("APPEND", e),
        }
    }
    for (host, k, p) in &late {
        if *host == VICTIM {
            check_victim(&format!("INCR {k}"), p.reason());
        } else {
            assert_eq!(p.value().unwrap(), 2, "INCR {k}");
        }
    }
    println!(
        "running server killed mid-map: {answered} of {} early requests answered",
        early.len()
    );
    setup.restart(VICTIM as usize).expect("restart the victim");
    client
        .set(k, "again")
        .expect("routing SET after the second restart");
    assert_eq!(client.get(k).unwrap(), Some(b"again".to_vec()));
}

// ---------------------------------------------------------------------------
// 5. one routing client, eight threads
// ---------------------------------------------------------------------------

/// A small deterministic generator (64-bit LCG, high bits).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// 10,000 mixed commands on this thread's own keys, each answer checked
/// against a model; returns the number of commands.
fn routing_worker(client: rb::RoutingClient, thread: u64) -> usize {
    const OPS: usize = 10_000;
    let mut rng = Lcg(thread + 1);
    let mut strings: HashMap<String, i64> = HashMap::new();
    let mut hashes: HashMap<String, HashMap<String, String>> = HashMap::new();
    let skey = |n: u64| format!("thr{thread}:s{n}");
    let hkey = |n: u64| format!("thr{thread}:h{n}");
    let as_bytes = |v: Option<&i64>| v.map(|v| v.to_string().into_bytes());
    for op in 0..OPS {
        let ctx = format!("thread {thread} op {op}");
        match rng.below(8) {
            0 => {
                let (k, v) = (skey(rng.below(64)), rng.below(1000) as i64);
                client.set(&k, v).expect(&ctx);
                strings.insert(k, v);
            }
            1 => {
                let k = skey(rng.below(64));
                assert_eq!(
                    client.get(&k).expect(&ctx),
                    as_bytes(strings.get(&k)),
                    "{ctx}"
                );
            }
            2 => {
                let k = skey(rng.below(64));
                let n = client.incr(&k).expect(&ctx);
                let model = strings.entry(k).or_insert(0);
                *model += 1;
                assert_eq!(n, *model, "{ctx}");
            }
            3 => {
                let a = rng.below(64);
                let b = (a + 1 + rng.below(63)) % 64;
                let (ka, kb) = (skey(a), skey(b));
                let n = client.del(&[&ka, &kb]).expect(&ctx);
                let removed =
                    strings.remove(&ka).is_some() as i64 + strings.remove(&kb).is_some() as i64;
                assert_eq!(n, removed, "{ctx}");
            }
            4 => {
                let (k, f) = (hkey(rng.below(16)), format!("f{}", rng.below(8)));
                let v = format!("{thread}-{op}");
                let added = client.hset(&k, &f, &v).expect(&ctx);
                let fresh = hashes.entry(k).or_default().insert(f, v).is_none();
                assert_eq!(added, fresh as i64, "{ctx}");
            }
            5 => {
                let (k, f) = (hkey(rng.below(16)), format!("f{}", rng.below(8)));
                let want = hashes
                    .get(&k)
                    .and_then(|h| h.get(&f))
                    .map(|v| v.clone().into_bytes());
                assert_eq!(client.hget(&k, &f).expect(&ctx), want, "{ctx}");
            }
            6 => {
                let ks: Vec<String> = (0..5).map(|_| skey(rng.below(64))).collect();
                let want: Vec<Option<Bytes>> =
                    ks.iter().map(|k| as_bytes(strings.get(k))).collect();
                assert_eq!(client.mget(&ks).expect(&ctx), want, "{ctx}");
            }
            _ => {
                let a = rng.below(64);
                let b = (a + 1 + rng.below(63)) % 64;
                let (ka, kb) = (skey(a), skey(b));
                let want = strings.contains_key(&ka) as i64 + strings.contains_key(&kb) as i64;
                assert_eq!(client.exists(&[&ka, &kb]).expect(&ctx), want, "{ctx}");
            }
        }
    }
    // The final state, read back in one emulated MGET across the hosts.
    let all: Vec<String> = (0..64).map(skey).collect();
    let want: Vec<Option<Bytes>> = all.iter().map(|k| as_bytes(strings.get(k))).collect();
    assert_eq!(client.mget(&all).unwrap(), want, "thread {thread} final");
    OPS
}

#[test]
fn routing_client_shared_by_8_threads() {
    let (_setup, cluster) = cluster(2, 2);
    let client = cluster.routing_client();
    let start = Instant::now();
    let total: usize = std::thread::scope(|s| {
        let workers: Vec<_> = (0..8u64)
            .map(|t| {
                let client = client.clone();
                s.spawn(move || routing_worker(client, t))
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("worker thread"))
            .sum()
    });
    let elapsed = start.elapsed();
    assert_eq!(total, 80_000);
    println!("8 threads x 10,000 routed commands in {elapsed:?}");
    // Every pooled connection is healthy and bounded by the pool size.
    for host in cluster.host_ids() {
        let idle = cluster.idle_connections(host);
        assert!((1..=16).contains(&idle), "host {host}: {idle} idle");
    }
}

// ---------------------------------------------------------------------------
// 6. no leaked sockets
// ---------------------------------------------------------------------------

#[test]
fn no_leaked_sockets() {
    if !isolated("no_leaked_sockets") {
        return;
    }
    let (setup, cluster) = cluster_without_health(2, 1);
    let keys = keys_per_host(&cluster, "fd:", 4);
    let mut list_key = keys[0][0].clone();
    list_key.push_str(":list");
    cluster.routing_client().rpush(&list_key, &["x"]).unwrap();
    let small_map = |i: usize| {
        cluster
            .map(|c| {
                let ps: Vec<_> = keys
                    .iter()
                    .flatten()
                    .map(|k| {
                        c.set(k, i);
                        c.get(k)
                    })
                    .collect();
                ps
            })
            .expect("small map")
            .iter()
            .all(|p| p.value().unwrap() == Some(i.to_string().into_bytes()))
    };

    for i in 0..10 {
        assert!(small_map(i));
    }
    let warm = open_fds();
    for i in 0..10_000 {
        assert!(small_map(i), "map {i}");
    }
    let after_maps = open_fds();

    // Error replies keep the connection in sync and pooled.
    for _ in 0..100 {
        let r = cluster.map(|c| {
            c.incr(&list_key);
            c.get(&keys[1][0])
        });
        assert_eq!(
            r.err().and_then(|e| e.code().map(str::to_owned)),
            Some("WRONGTYPE".into())
        );
    }
    let after_errors = open_fds();

    let client = cluster.routing_client();
    for i in 0..1000 {
        let k = &keys[i % 2][i % 4];
        match i % 3 {
            0 => client.set(k, i).unwrap(),
            1 => assert!(client.get(k).unwrap().is_some()),
            _ => assert_eq!(client.mget(&[&keys[0][0], &keys[1][0]]).unwrap().len(), 2),
        }
    }
    let after_routing = open_fds();

    // Timed-out maps close their connection to the stopped server (a new
    // one connects each time, into its backlog); none stays open. Only the
    // stopped host's keys: with a 10 ms budget on a loaded machine, the
    // healthy host could time out too and be the first failure reported.
    setup.pause(1).unwrap();
    for i in 0..20 {
        let r = cluster.map_with(MapOptions::new().timeout(Duration::from_millis(10)), |c| {
            for k in &keys[1] {
                c.get(k);
            }
        });
        match r {
            Err(Error::Timeout { host, .. }) => assert_eq!(host.id, 1, "map {i}"),
            other => panic!("map {i} to a stopped server: {other:?}"),
        }
        assert_eq!(cluster.idle_connections(1), 0);
    }
    let while_stopped = open_fds();
    setup.resume(1).unwrap();
    for i in 0..10 {
        assert!(small_map(i));
    }
    let after_timeouts = open_fds();
    println!(
        "open fds (all, sockets): after 10 maps {warm:?}, after 10,000 more {after_maps:?}, \
         after 100 failing maps {after_errors:?}, after 1,000 routing commands {after_routing:?}, \
         after 20 timed-out maps {while_stopped:?}, after 10 maps more {after_timeouts:?}; \
         idle connections {:?}",
        cluster
            .host_ids()
            .iter()
            .map(|&h| cluster.idle_connections(h))
            .collect::<Vec<_>>()
    );
    assert_eq!(after_maps, warm, "10,000 maps");
    assert_eq!(after_errors, warm, "100 maps with an error reply");
    assert_eq!(after_routing, warm, "1,000 routing client commands");
    // Host 1's pooled connection was closed by the first timeout.
    assert_eq!(while_stopped, (warm.0 - 1, warm.1 - 1), "20 timed-out maps");
    assert_eq!(after_timeouts, warm, "10 maps after the server resumed");
}

// ---------------------------------------------------------------------------
// 7. a first map over 64 hosts
// ---------------------------------------------------------------------------

#[test]
fn connects_to_64_hosts_concurrently() {
    let (_setup, cluster) = cluster(8, 8);
    let hosts = cluster.host_ids();
    assert_eq!(hosts.len(), 64);
    assert!(hosts.iter().all(|&h| cluster.idle_connections(h) == 0));
    let keys = keys_per_host(&cluster, "c64:", 3);

    let start = Instant::now();
    let gets = cluster
        .map(|c| {
            for k in keys.iter().flatten() {
                c.set(k, value_of(k));
            }
            keys.iter()
                .flatten()
                .map(|k| (k, c.get(k)))
                .collect::<Vec<_>>()
        })
        .expect("first map over 64 hosts");
    let elapsed = start.elapsed();
    for (k, p) in &gets {
        assert_eq!(p.value().unwrap(), Some(value_of(k)), "{k}");
    }
    let idle: Vec<usize> = hosts.iter().map(|&h| cluster.idle_connections(h)).collect();
    println!("first map over 64 hosts (64 connects) in {elapsed:?}");
    assert_eq!(idle, vec![1; 64], "one pooled connection per host");

    // Each server sees exactly its 8 hosts' connections (the INFO below
    // reuses one of them), so no connection was opened twice.
    for server in 0..8u32 {
        let clients: i64 = cluster
            .local_client(server * 8)
            .unwrap()
            .info(Some("clients"))
            .unwrap()
            .parse("connected_clients")
            .expect("connected_clients");
        assert_eq!(clients, 8, "server {server}");
    }
    // A second map reuses them.
    cluster
        .map(|c| {
            for k in keys.iter().flatten() {
                c.get(k);
            }
        })
        .expect("second map");
    let idle: Vec<usize> = hosts.iter().map(|&h| cluster.idle_connections(h)).collect();
    assert_eq!(idle, vec![1; 64]);
}

// ---------------------------------------------------------------------------
// 8. an error reply fails one promise only
// ---------------------------------------------------------------------------

#[test]
fn error_reply_does_not_break_other_hosts() {
    let (_setup, cluster) = cluster(2, 2);
    let keys = keys_per_host(&cluster, "err:", 3);
    const BAD_HOST: HostId = 2;
    let list_key = format!("{}:list", keys[BAD_HOST as usize][0]);
    let list_key = {
        // A key of its own that the bad host owns.
        let mut n = 0;
        let mut k = list_key;
        while host_of(&cluster, &k) != BAD_HOST {
            n += 1;
            k = format!("err:list{n}");
        }
        k
    };
    let client = cluster.routing_client();
    client.rpush(&list_key, &["a", "b"]).unwrap();
    for k in keys.iter().flatten() {
        client.set(k, value_of(k)).unwrap();
    }

    let mut gets_before = Vec::new();
    let mut gets_after = Vec::new();
    let mut incrs = Vec::new();
    let mut bad = None;
    let result = cluster.map(|c| {
        for k in keys.iter().flatten() {
            gets_before.push((k, c.get(k)));
        }
        bad = Some(c.incr(&list_key));
        for k in keys.iter().flatten() {
            incrs.push(c.incr(format!("{k}:n")));
            gets_after.push((k, c.get(k)));
        }
    });
    let bad = bad.expect("the bad command was sent");
    let e = bad.reason().expect("INCR of a list is rejected");
    println!("error reply: {e}");
    match &e {
        Error::Server {
            host,
            command,
            code,
            ..
        } => {
            assert_eq!(&**code, "WRONGTYPE");
            assert_eq!(host.as_ref().map(|h| h.id), Some(BAD_HOST));
            assert_eq!(&**command, "INCR");
        }
        other => panic!("expected a server error, got {other:?}"),
    }
    assert_eq!(e.code(), Some("WRONGTYPE"));
    let text = e.to_string();
    assert!(text.contains(&format!("host {BAD_HOST} ")), "{text}");
    assert!(text.contains("INCR"), "{text}");

    let map_err = result.expect_err("the map returns the error reply");
    assert_eq!(map_err.to_string(), text, "the map's error is that one");

    for (k, p) in gets_before.iter().chain(&gets_after) {
        assert_eq!(p.value().unwrap(), Some(value_of(k)), "{k}");
    }
    for p in &incrs {
        assert_eq!(p.value().unwrap(), 1);
    }
    // The connection stayed in sync and was pooled.
    assert_eq!(cluster.idle_connections(BAD_HOST), 1);
    assert_eq!(client.llen(&list_key).unwrap(), 2);
}

// ---------------------------------------------------------------------------
// 9. unknown hosts and unroutable commands
// ---------------------------------------------------------------------------

#[test]
fn unknown_host_and_unroutable_are_clear_errors() {
    let (_setup, cluster) = cluster(1, 2);
    match cluster.local_client(999) {
        Err(e @ Error::NoSuchHost { id: 999 }) => {
            assert!(e.to_string().contains("999"), "{e}")
        }
        Err(e) => panic!("expected NoSuchHost 999, got {e}"),
        Ok(_) => panic!("a local client for host 999"),
    }
    assert!(matches!(
        cluster.fanout(rb::Hosts::Ids(vec![0, 999]), |c| c.ping()),
        Err(Error::NoSuchHost { id: 999 })
    ));

    let client = cluster.routing_client();
    match client.cmd::<i64>(rb::cmd("SUNIONSTORE").arg("a").arg("b")) {
        Err(e @ Error::Unroutable { .. }) => {
            if let Error::Unroutable { command, .. } = &e {
                assert_eq!(&**command, "SUNIONSTORE");
            }
            assert!(e.to_string().contains("SUNIONSTORE"), "{e}");
            println!("{e}");
        }
        other => panic!("expected Unroutable, got {other:?}"),
    }

    // In a map: that promise alone is rejected, the map returns its error.
    let mut ok = None;
    let mut refused = None;
    let result = cluster.map(|c| {
        ok = Some(c.set("fine", 1));
        refused = Some(c.cmd::<i64>(rb::cmd("SUNIONSTORE").arg("a").arg("b")));
    });
    assert!(
        matches!(result, Err(Error::Unroutable { ref command, .. }) if &**command == "SUNIONSTORE")
    );
    assert!(ok.unwrap().value().is_ok());
    assert!(matches!(
        refused.unwrap().reason(),
        Some(Error::Unroutable { ref command, .. }) if &**command == "SUNIONSTORE"
    ));
    assert_eq!(client.get("fine").unwrap(), Some(b"1".to_vec()));
}

/// Merged MGET replies are handed to their promises element by element as
/// they arrive: values of every size, split over many reads at any byte,
/// each reach their own promise, in batches of every length.
#[test]
fn merged_replies_split_over_many_reads_reach_each_promise() {
    let (_setup, cluster) = cluster(2, 1);
    // Sizes around the bulk header's digit steps and past the 64 KiB reads.
    let sizes = [0usize, 1, 9, 10, 99, 100, 1000, 65_535, 65_536, 200_000];
    let keys: Vec<String> = (0..300).map(|i| format!("split:{i}")).collect();
    let value = |i: usize| -> Bytes {
        let len = sizes[i % sizes.len()];
        (0..len).map(|j| (i * 31 + j) as u8).collect()
    };
    cluster
        .map(|c| {
            for (i, k) in keys.iter().enumerate() {
                // Every seventh key is left missing: a nil inside the MGET.
                if i % 7 != 3 {
                    c.set(k, value(i));
                }
            }
        })
        .unwrap();
    for batch in [2, 3, 7, 64, 256] {
        let gets = cluster
            .map_with(MapOptions::new().max_batch_size(batch), |c| {
                keys.iter()
                    .map(|k| c.get(k))
                    .collect::<Vec<Promise<Option<Bytes>>>>()
            })
            .unwrap();
        for (i, p) in gets.iter().enumerate() {
            let expected = (i % 7 != 3).then(|| value(i));
            assert_eq!(p.value().unwrap(), expected, "key {i}, batches of {batch}");
        }
    }
}

/// A merged MGET answered with an error (here the server's ACL refuses
/// MGET) rejects each of its promises with that error, naming the host and
/// MGET; the other commands of the map, before and after it on the same
/// connection, still get their own replies.
#[test]
fn merged_mget_answered_with_an_error() {
    let (_setup, cluster) = cluster(1, 1);
    let local = cluster.local_client(0).unwrap();
    local.set("a", "1").unwrap();
    local
        .cmd::<()>(rb::cmd("ACL").arg("SETUSER").arg("default").arg("-mget"))
        .unwrap();
    let mut gets: Vec<Promise<Option<Bytes>>> = Vec::new();
    let mut counts: Vec<Promise<i64>> = Vec::new();
    let failure = cluster
        .map(|c| {
            counts.push(c.incr("counter"));
            gets.extend((0..10).map(|_| c.get("a")));
            counts.push(c.incr("counter"));
        })
        .expect_err("the map reports its first failure");
    assert!(
        matches!(&failure, Error::Server { code, .. } if &**code == "NOPERM"),
        "{failure}"
    );
    let (before, after) = (&counts[0], &counts[1]);
    assert_eq!(before.value().unwrap(), 1);
    assert_eq!(after.value().unwrap(), 2);
    for p in &gets {
        match p.reason() {
            Some(Error::Server {
                host,
                command,
                code,
                ..
            }) => {
                assert_eq!(host.map(|h| h.id), Some(0));
                assert_eq!(&*command, "MGET");
                assert_eq!(&*code, "NOPERM");
            }
            other => panic!("expected NOPERM for MGET, got {other:?}"),
        }
    }
}
