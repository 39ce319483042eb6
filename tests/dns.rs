//! Name resolution (issue 8): every host's name is resolved at the same
//! time, each within its host's connect budget, and every address is
//! tried in turn.
//!
//! The servers listen on ephemeral TCP ports of 127.0.0.1
//! ([`TestSetup::with_tcp`]); the hosts are named `cache-a.test`, ... and
//! a fake [`Resolve`] gives their addresses after a delay, or an error, or
//! no answer until the test ends. The delays are the fake resolver's
//! latency, not synchronisation. Tests that measure wall time take
//! [`SERIAL`].

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

mod common;
use common::host_of;
use common::watch::{median, ms_list, within};
use rb::testing::TestSetup;
use rb::{Cluster, Commands, Error, HostConfig, HostId, Hosts, Phase, Promise, Resolve};

/// Held by the tests that measure wall time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// The fake resolver's latency per name in the timing test.
const DELAY: Duration = Duration::from_millis(300);

const NAMES: [&str; 4] = [
    "cache-a.test",
    "cache-b.test",
    "cache-c.test",
    "cache-d.test",
];

/// What the fake resolver answers for a name.
#[derive(Clone)]
enum Answer {
    /// These addresses, after the resolver's delay.
    Addrs(Vec<SocketAddr>),
    /// An error with this text, after the delay.
    Fail(&'static str),
    /// A panic in the resolver.
    Panic,
    /// Nothing until the gate opens (then an error): a resolver far slower
    /// than any connect budget.
    Hang,
}

/// A resolver with a fixed answer per name, a latency, and a count of
/// calls.
struct Fake {
    delay: Duration,
    answers: HashMap<String, Answer>,
    calls: AtomicUsize,
    gate: Mutex<bool>,
    opened: Condvar,
}

impl Fake {
    fn new(
        delay: Duration,
        answers: impl IntoIterator<Item = (&'static str, Answer)>,
    ) -> Arc<Fake> {
        Arc::new(Fake {
            delay,
            answers: answers
                .into_iter()
                .map(|(name, a)| (name.to_owned(), a))
                .collect(),
            calls: AtomicUsize::new(0),
            gate: Mutex::new(false),
            opened: Condvar::new(),
        })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Lets the hanging lookups return (so their threads end).
    fn open(&self) {
        *self.gate.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.opened.notify_all();
    }
}

impl Resolve for Fake {
    fn resolve(&self, host: &str, _port: u16) -> io::Result<Vec<SocketAddr>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let answer = self.answers.get(host).cloned();
        if !matches!(answer, Some(Answer::Hang)) {
            // The resolver's latency (this is the fake DNS server being
            // slow, not a test waiting for something).
            std::thread::sleep(self.delay);
        }
        match answer {
            Some(Answer::Addrs(addrs)) => Ok(addrs),
            Some(Answer::Fail(why)) => Err(io::Error::other(why)),
            Some(Answer::Panic) => panic!("the fake resolver panics (on purpose)"),
            Some(Answer::Hang) => {
                let gate = self.gate.lock().unwrap_or_else(|p| p.into_inner());
                let _open = self
                    .opened
                    .wait_timeout_while(gate, Duration::from_secs(30), |open| !*open);
                Err(io::Error::new(io::ErrorKind::TimedOut, "gave up"))
            }
            None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("fake resolver: no record for {host}"),
            )),
        }
    }
}

/// 127.0.0.1 at `port`.
fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A loopback port that nothing listens on (bound, then released).
fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("its address").port()
}

/// `n` servers listening on TCP, and the port of each.
fn tcp_servers(n: usize) -> (TestSetup, Vec<u16>) {
    let setup = TestSetup::with_tcp(n, 1).expect("start redis-server on TCP");
    let ports = (0..n)
        .map(|i| setup.tcp_port(i).expect("a TCP port"))
        .collect();
    (setup, ports)
}

/// A cluster with host `i` named `NAMES[i]` at `ports[i]`, resolved by
/// `resolver`, each host with `connect_timeout`.
fn named_cluster(ports: &[u16], resolver: Arc<Fake>, connect_timeout: Duration) -> Cluster {
    let mut builder = Cluster::builder().resolver(resolver);
    for (i, port) in ports.iter().enumerate() {
        builder = builder.host(
            i as HostId,
            HostConfig::new()
                .host(NAMES[i])
                .port(*port)
                .connect_timeout(connect_timeout),
        );
    }
    builder.build().expect("build the cluster")
}

/// One key owned by each host `0..hosts`, in host order.
fn key_per_host(cluster: &Cluster, hosts: usize) -> Vec<String> {
    let mut keys: Vec<Option<String>> = vec![None; hosts];
    for n in 0.. {
        let key = format!("dns-{n}");
        let host = host_of(cluster, &key) as usize;
        if keys[host].is_none() {
            keys[host] = Some(key);
        }
        if keys.iter().all(Option::is_some) {
            break;
        }
    }
    keys.into_iter().flatten().collect()
}

/// (a) Four hosts whose names each take [`DELAY`] to resolve: a map over
/// all four costs about one delay, not four, because the names are
/// resolved at the same time. Fresh connections every round (pools
/// emptied), three rounds each of a map and of a routing client's MGET
/// across the four hosts; the figures are printed.
#[test]
fn names_of_many_hosts_resolve_concurrently() {
    let _serial = serial();
    let (_setup, ports) = tcp_servers(4);
    let fake = Fake::new(
        DELAY,
        NAMES
            .iter()
            .zip(&ports)
            .map(|(name, port)| (*name, Answer::Addrs(vec![loopback(*port)]))),
    );
    let cluster = named_cluster(&ports, fake.clone(), Duration::from_secs(5));
    let keys = key_per_host(&cluster, 4);

    let mut map_times = Vec::new();
    for round in 0..3 {
        cluster.disconnect_pools();
        let start = Instant::now();
        let promises = cluster
            .map(|c| keys.iter().map(|k| c.set(k, round)).collect::<Vec<_>>())
            .expect("the map succeeds");
        map_times.push(start.elapsed());
        assert!(promises.iter().all(Promise::is_resolved));
    }
    let mut mget_times = Vec::new();
    for _ in 0..3 {
        cluster.disconnect_pools();
        let start = Instant::now();
        let values = cluster.routing_client().mget(&keys).expect("MGET succeeds");
        mget_times.push(start.elapsed());
        assert_eq!(values, vec![Some(b"2".to_vec()); 4]);
    }
    assert_eq!(fake.calls(), 4 * 6, "one lookup per host per round");
    println!(
        "4 hosts, {DELAY:?} per lookup: map {} (median {:?}), routing MGET {} (median {:?})",
        ms_list(&map_times),
        median(map_times.clone()),
        ms_list(&mget_times),
        median(mget_times.clone()),
    );
    for t in map_times.iter().chain(&mget_times) {
        assert!(*t >= DELAY, "every round waits for the resolver: {t:?}");
    }
    assert!(
        median(map_times.clone()) < 2 * DELAY,
        "a map over 4 slow names took {} (serial resolution would be ~{:?})",
        ms_list(&map_times),
        4 * DELAY
    );
    assert!(
        median(mget_times.clone()) < 2 * DELAY,
        "an MGET over 4 slow names took {}",
        ms_list(&mget_times)
    );
}

/// (b) A name with two addresses, the first a closed port: the connect
/// moves on to the second, and commands succeed (a map and a routing
/// client, each with a fresh connection).
#[test]
fn every_address_is_tried_in_turn() {
    let (_setup, ports) = tcp_servers(1);
    let dead = loopback(closed_port());
    let fake = Fake::new(
        Duration::ZERO,
        [(NAMES[0], Answer::Addrs(vec![dead, loopback(ports[0])]))],
    );
    let cluster = named_cluster(&ports, fake.clone(), Duration::from_secs(5));
    // Temporaries: the client's methods take `&mut self` today, `&self` soon.
    cluster
        .routing_client()
        .set("two-addrs", "v")
        .expect("SET through the second address");
    assert_eq!(
        cluster.routing_client().get("two-addrs").expect("GET"),
        Some(b"v".to_vec())
    );
    cluster.disconnect_pools();
    let got = cluster
        .map(|c| c.get("two-addrs"))
        .expect("a map through the second address");
    assert_eq!(got.value().expect("resolved"), Some(b"v".to_vec()));
    assert!(fake.calls() >= 2, "each new connection resolves the name");
}

/// (c) One host's resolver never answers: the map fails with a connect
/// timeout naming that host within its connect budget (+ 50 ms), and the
/// other hosts' requests succeed meanwhile. The routing client too.
#[test]
fn a_hung_resolver_costs_its_host_the_connect_budget() {
    let _serial = serial();
    let budget = Duration::from_millis(200);
    let (_setup, ports) = tcp_servers(4);
    let fake = Fake::new(
        Duration::from_millis(20),
        NAMES.iter().zip(&ports).map(|(name, port)| {
            let answer = if *name == NAMES[0] {
                Answer::Hang
            } else {
                Answer::Addrs(vec![loopback(*port)])
            };
            (*name, answer)
        }),
    );
    let cluster = named_cluster(&ports, fake.clone(), budget);
    let keys = key_per_host(&cluster, 4);

    let c2 = cluster.clone();
    let k2 = keys.clone();
    let (result, promises, elapsed) = within(Duration::from_secs(10), "map", move || {
        let mut promises = Vec::new();
        let start = Instant::now();
        let result = c2.map(|c| {
            for k in &k2 {
                promises.push(c.set(k, "v"));
            }
        });
        let elapsed = start.elapsed();
        let outcomes: Vec<Result<(), Error>> = promises.iter().map(Promise::value).collect();
        (result, outcomes, elapsed)
    })
    .expect("the map returns");
    println!("a hung resolver, connect budget {budget:?}: the map returned after {elapsed:?}");
    match &result {
        Err(Error::Timeout {
            host,
            phase: Phase::Connect,
            budget: b,
            ..
        }) => {
            assert_eq!(host.id, 0);
            assert!(host.addr.contains("cache-a.test"), "{host}");
            assert_eq!(*b, budget);
        }
        other => panic!("expected a connect timeout for host 0, got {other:?}"),
    }
    assert!(
        elapsed < budget + Duration::from_millis(50),
        "the map took {elapsed:?} (budget {budget:?})"
    );
    assert!(promises[0].is_err());
    for (i, p) in promises.iter().enumerate().skip(1) {
        assert!(p.is_ok(), "host {i}: {p:?}");
    }

    // The routing client: the same budget, and other hosts unaffected.
    let c2 = cluster.clone();
    let k2 = keys.clone();
    let (first, others, elapsed) = within(Duration::from_secs(10), "routing", move || {
        let start = Instant::now();
        let first = c2.routing_client().get(&k2[0]);
        let elapsed = start.elapsed();
        let others: Vec<_> = k2[1..].iter().map(|k| c2.routing_client().get(k)).collect();
        (first, others, elapsed)
    })
    .expect("the routing client returns");
    println!("a hung resolver: a routing GET failed after {elapsed:?}");
    assert!(
        matches!(&first, Err(Error::Timeout { host, phase: Phase::Connect, .. }) if host.id == 0),
        "{first:?}"
    );
    assert!(elapsed < budget + Duration::from_millis(50), "{elapsed:?}");
    for v in others {
        assert_eq!(v.expect("the other hosts answer"), Some(b"v".to_vec()));
    }
    fake.open();
}

/// (d) A resolver that fails, answers with no address, or panics: a
/// connection error naming the host and saying why (at once: a panicking
/// resolver still wakes the session, which does not wait out the connect
/// budget); the good host is unaffected.
#[test]
fn resolver_errors_name_the_host() {
    let (_setup, ports) = tcp_servers(1);
    let fake = Fake::new(
        Duration::ZERO,
        [
            (NAMES[0], Answer::Addrs(vec![loopback(ports[0])])),
            (NAMES[1], Answer::Fail("SERVFAIL from the fake resolver")),
            (NAMES[2], Answer::Addrs(Vec::new())),
            (NAMES[3], Answer::Panic),
        ],
    );
    let cluster = named_cluster(&[ports[0]; 4], fake, Duration::from_secs(5));
    for (id, needle) in [
        (1, "SERVFAIL from the fake resolver"),
        (2, "no address"),
        (3, "panicked"),
    ] {
        let c = cluster.clone();
        let err = within(Duration::from_secs(2), "GET", move || {
            c.local_client(id).expect("local client").get("k")
        })
        .expect("fails at once, not after the connect budget")
        .expect_err("no address to connect to");
        let text = err.to_string();
        println!("host {id}: {text}");
        assert!(
            matches!(&err, Error::Connection { host, .. } if host.id == id),
            "{err:?}"
        );
        assert!(text.contains(NAMES[id as usize]), "{text}");
        assert!(text.contains(needle), "{text}");
    }
    // In a fanout, the good host still answers.
    let sizes = cluster.fanout(Hosts::All, |c| c.cmd::<i64>(rb::cmd("DBSIZE")));
    assert!(sizes.is_err());
    cluster
        .local_client(0)
        .expect("local client")
        .set("k", 1)
        .expect("host 0 resolves and answers");
}

/// (e) A name the system resolver cannot resolve (`.invalid` is reserved
/// never to exist): a clean error naming the host, no hang.
#[test]
fn unresolvable_name_with_the_system_resolver() {
    let cluster = Cluster::builder()
        .host(
            0,
            HostConfig::new()
                .host("nonexistent.invalid")
                .port(6379)
                .connect_timeout(Duration::from_secs(5)),
        )
        .build()
        .expect("build");
    let err = within(Duration::from_secs(20), "GET", move || {
        cluster.routing_client().get("k")
    })
    .expect("returns")
    .expect_err("cannot connect");
    println!("{err}");
    assert!(err.to_string().contains("nonexistent.invalid"), "{err}");
    assert!(
        matches!(
            &err,
            Error::Connection { host, .. } | Error::Timeout { host, phase: Phase::Connect, .. }
                if host.id == 0
        ),
        "{err:?}"
    );
}
