//! Issue 9's peer benchmark: rb's async client against redis-rs and fred,
//! all in one process, on the same four local redis-servers.
//!
//! ```sh
//! cargo run --release --example async_peers            # 5 rounds of each
//! cargo run --release --example async_peers -- 9       # 9 rounds of each
//! cargo run --release --example async_peers -- 5 B     # scenario B only
//! cargo run --release --example async_peers -- 5 AB rb  # rb's clients only
//! ```
//!
//! Four redis-servers listen on 127.0.0.1 (TCP); rb seeds 10,000 keys with
//! `Cluster::map`. Every client reads the same keys from the same nodes: the
//! peers route by hand with rb's own router (`host_for_key`), one
//! connection or client per node.
//!
//! Scenarios, each in alternating rounds (the order rotates every round so
//! that drift hits every client alike); the table shows the medians:
//!
//! - **A** 1,000 tokio tasks x 100 GETs on a runtime with 2 worker threads
//!   (ten times back to back per round): ops/s and process CPU per op.
//!   rb's `AsyncClient` (one, cloned per task); redis-rs
//!   `MultiplexedConnection` (one per node, cloned per task); fred (one
//!   `Client` per node).
//! - **B** one task doing sequential GETs: p50/p99 latency. The same three,
//!   plus rb's sync `RoutingClient` on a plain thread.
//! - **C** 8 OS threads doing single GETs: rb's `AsyncClient` shared by all
//!   threads (`Reply::wait`, no runtime), rb's `RoutingClient` shared in an
//!   `Arc`, and redis-rs with one sync `Connection` per thread per node.
//!
//! Every scenario also runs the "handoff floor" (module [`handoff`]): a
//! thread that answers each GET from a table at once, without a server,
//! behind the same queue-and-wake handoff as rb's driver. It is what any
//! client of that design pays before the network: the lower bound of rb's
//! CPU per GET, and the upper bound of its rate on this machine.
//!
//! The table also shows the GET and MGET commands the servers ran per GET
//! (`INFO commandstats`, read between rounds): below 1, the client merged
//! GETs into MGETs; and the servers' CPU per GET (`INFO cpu`).
//!
//! CPU is the whole process's (`getrusage(RUSAGE_SELF)`, user + system):
//! the runtime's workers, rb's driver thread, fred's and redis-rs' tasks,
//! but not the redis-servers (child processes). Everything shares the
//! machine's cores with the servers, as it would on a busy host.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use fred::interfaces::{ClientLike, KeysInterface};
use rb::testing::TestSetup;
use rb::{Cluster, Commands, HostConfig};

const NODES: usize = 4;
const KEYS: usize = 10_000;
const VALUE_LEN: usize = 32;
/// Scenario A; one round runs it `RUNS_A` times back to back (so that a
/// round lasts long enough to time well).
const TASKS: usize = 1_000;
const GETS_PER_TASK: usize = 100;
const RUNS_A: usize = 10;
/// Scenario B; and the name of its sync client.
const SYNC_B: &str = "rb RoutingClient (sync)";
const SEQUENTIAL_GETS: usize = 20_000;
/// Scenario C.
const THREADS: usize = 8;
const GETS_PER_THREAD: usize = 10_000;
/// The handoff floor's name (see [`handoff`]).
const FLOOR: &str = "floor: handoff, no I/O";

/// rb's async client, behind one small adapter: every rb-async call of the
/// benchmark goes through these three functions.
mod rb_async {
    use rb::{Cluster, Commands};

    pub type Client = rb::AsyncClient;

    pub fn client(cluster: &Cluster) -> Client {
        cluster.async_client()
    }

    pub async fn get(client: &Client, key: &str) -> rb::Result<Option<Vec<u8>>> {
        client.get(key).await
    }

    pub fn get_wait(client: &Client, key: &str) -> rb::Result<Option<Vec<u8>>> {
        client.get(key).wait()
    }
}

/// The floor under any client built as rb's is (issue 9's design: one
/// thread that owns the connections, callers that hand it requests and are
/// woken with the answers), without the network: a thread that answers
/// each GET at once from a table. What it costs per GET (a queue send, the
/// thread's wake-up when it sleeps, a copy of the value into a new `Vec`,
/// the caller's wake-up) no such client can go below; the servers' work
/// and the sockets' syscalls come on top.
mod handoff {
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{mpsc, Arc, Mutex};
    use std::task::{Context, Poll, Wake, Waker};

    /// One GET's answer, and the waker of whoever waits for it.
    #[derive(Default)]
    struct Slot {
        state: Mutex<(Option<Vec<u8>>, Option<Waker>)>,
        ready: AtomicBool,
    }

    /// The answering thread's queue; it stops when the last clone drops.
    #[derive(Clone)]
    pub struct Client {
        queue: mpsc::Sender<(usize, Arc<Slot>)>,
    }

    impl Client {
        /// Starts the thread, which answers key `i` with `values[i]`.
        pub fn start(values: Arc<Vec<Vec<u8>>>) -> Client {
            let (queue, requests) = mpsc::channel::<(usize, Arc<Slot>)>();
            std::thread::spawn(move || {
                // Sleep until a request comes, then take all that came.
                while let Ok(first) = requests.recv() {
                    for (index, slot) in std::iter::once(first).chain(requests.try_iter()) {
                        let value = values.get(index).cloned();
                        let waker = {
                            let mut state = slot.state.lock().unwrap_or_else(|p| p.into_inner());
                            state.0 = value;
                            slot.ready.store(true, Ordering::Release);
                            state.1.take()
                        };
                        if let Some(w) = waker {
                            w.wake();
                        }
                    }
                }
            });
            Client { queue }
        }

        /// Key `index`'s value, as a future.
        pub fn get(&self, index: usize) -> Get {
            let slot = Arc::new(Slot::default());
            let _ = self.queue.send((index, slot.clone()));
            Get { slot }
        }
    }

    pub struct Get {
        slot: Arc<Slot>,
    }

    impl Future for Get {
        type Output = Option<Vec<u8>>;

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Vec<u8>>> {
            let mut state = self.slot.state.lock().unwrap_or_else(|p| p.into_inner());
            if self.slot.ready.load(Ordering::Acquire) {
                return Poll::Ready(state.0.take());
            }
            state.1 = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    /// Wakes a thread blocked in [`Get::wait`].
    struct Unpark(std::thread::Thread);

    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }

    impl Get {
        /// Blocks this thread until the answer is in.
        pub fn wait(mut self) -> Option<Vec<u8>> {
            let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
            let mut cx = Context::from_waker(&waker);
            loop {
                if let Poll::Ready(v) = Pin::new(&mut self).poll(&mut cx) {
                    return v;
                }
                std::thread::park();
            }
        }
    }
}

/// A key and the node (0..4) that owns it, as rb's router says.
struct Key {
    name: String,
    node: usize,
}

/// The key that op `j` of worker `w` reads: every worker walks all keys,
/// from its own starting point.
fn key_index(worker: usize, op: usize) -> usize {
    (worker * 7_919 + op * 37) % KEYS
}

/// Key `i`'s value, made once: checking a reply costs the harness a
/// compare, not a `format!` per GET (the same for every client).
fn expected(i: usize) -> &'static [u8] {
    static VALUES: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    VALUES.get_or_init(|| (0..KEYS).map(value_of).collect())[i].as_slice()
}

fn value_of(i: usize) -> Vec<u8> {
    format!("{i:0width$}", width = VALUE_LEN).into_bytes()
}

/// Process CPU time (user + system) so far.
fn process_cpu() -> Duration {
    // SAFETY: getrusage writes into the struct we pass and reads nothing else.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1_000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// One round's outcome.
#[derive(Clone, Copy, Default)]
struct Round {
    ops: usize,
    wall: Duration,
    cpu: Duration,
    /// Per-op latency quantiles, for scenario B.
    p50: Duration,
    p99: Duration,
    /// GET and MGET commands the servers ran in the round (their
    /// `INFO commandstats`): how well the client batched.
    server_commands: u64,
    /// The servers' CPU time in the round (their `INFO cpu`).
    server_cpu: Duration,
}

impl Round {
    fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.wall.as_secs_f64()
    }
    fn cpu_us_per_op(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.ops as f64
    }
    fn server_commands_per_op(&self) -> f64 {
        self.server_commands as f64 / self.ops as f64
    }
    fn server_cpu_us_per_op(&self) -> f64 {
        self.server_cpu.as_secs_f64() * 1e6 / self.ops as f64
    }
}

/// GET and MGET commands run so far by the servers behind `probes` (one
/// connection per node), from their `INFO commandstats`, and their CPU
/// time (`INFO cpu`, user + system).
fn server_counts(probes: &mut [redis::Connection]) -> (u64, Duration) {
    let (mut calls, mut cpu) = (0, 0.0);
    for probe in probes {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .arg("cpu")
            .query(probe)
            .unwrap_or_default();
        for line in info.lines() {
            if line.starts_with("cmdstat_get:") || line.starts_with("cmdstat_mget:") {
                calls += line
                    .split([':', ','])
                    .find_map(|field| field.strip_prefix("calls="))
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0);
            }
            if let Some(seconds) = line
                .strip_prefix("used_cpu_user:")
                .or_else(|| line.strip_prefix("used_cpu_sys:"))
            {
                cpu += seconds.trim().parse::<f64>().unwrap_or(0.0);
            }
        }
    }
    (calls, Duration::from_secs_f64(cpu))
}

/// `round`, with the GET/MGET commands the servers ran while it ran and
/// the CPU time they took.
fn counting_servers(probes: &mut [redis::Connection], round: impl FnOnce() -> Round) -> Round {
    let (calls, cpu) = server_counts(probes);
    let mut round = round();
    let (calls_after, cpu_after) = server_counts(probes);
    round.server_commands = calls_after.saturating_sub(calls);
    round.server_cpu = cpu_after.saturating_sub(cpu);
    round
}

/// Counts good answers; keeps the first failure to show it.
#[derive(Default)]
struct Tally {
    good: usize,
    bad: usize,
    first_bad: Option<String>,
}

impl Tally {
    fn add<E: std::fmt::Display>(&mut self, got: Result<Option<Vec<u8>>, E>, index: usize) {
        match got {
            Ok(Some(v)) if v == expected(index) => self.good += 1,
            other => {
                self.bad += 1;
                if self.first_bad.is_none() {
                    self.first_bad = Some(match other {
                        Ok(v) => format!("key {index}: unexpected value {v:?}"),
                        Err(e) => format!("key {index}: {e}"),
                    });
                }
            }
        }
    }
    fn merge(&mut self, other: Tally) {
        self.good += other.good;
        self.bad += other.bad;
        if self.first_bad.is_none() {
            self.first_bad = other.first_bad;
        }
    }
    fn check(&self, what: &str) {
        if self.bad > 0 {
            eprintln!(
                "warning: {what}: {} of {} GETs failed, first: {}",
                self.bad,
                self.good + self.bad,
                self.first_bad.as_deref().unwrap_or("?")
            );
        }
    }
}

/// The clients that run on the tokio runtime (scenarios A and B).
#[derive(Clone)]
enum AsyncPeer {
    Rb(rb_async::Client),
    Redis(Vec<redis::aio::MultiplexedConnection>),
    Fred(Vec<fred::clients::Client>),
    Floor(handoff::Client),
}

impl AsyncPeer {
    fn name(&self) -> &'static str {
        match self {
            AsyncPeer::Rb(_) => "rb AsyncClient",
            AsyncPeer::Redis(_) => "redis-rs multiplexed",
            AsyncPeer::Fred(_) => "fred",
            AsyncPeer::Floor(_) => FLOOR,
        }
    }

    /// `ops` GETs in sequence, as worker `worker`, on this task's own clone
    /// of the client(s); with `latencies`, the time of each one is pushed
    /// there.
    async fn worker(
        mut self,
        keys: Arc<Vec<Key>>,
        worker: usize,
        ops: usize,
        mut latencies: Option<Vec<Duration>>,
    ) -> (Tally, Option<Vec<Duration>>) {
        let mut tally = Tally::default();
        for op in 0..ops {
            let index = key_index(worker, op);
            let key = &keys[index];
            let start = Instant::now();
            match &mut self {
                AsyncPeer::Rb(client) => tally.add(rb_async::get(client, &key.name).await, index),
                AsyncPeer::Redis(conns) => {
                    // The task's own clones of the node connections.
                    let got = redis::cmd("GET")
                        .arg(&key.name)
                        .query_async::<Option<Vec<u8>>>(&mut conns[key.node])
                        .await;
                    tally.add(got, index);
                }
                AsyncPeer::Floor(client) => {
                    tally.add(Ok::<_, rb::Error>(client.get(index).await), index)
                }
                AsyncPeer::Fred(clients) => {
                    let got = clients[key.node]
                        .get::<Option<Vec<u8>>, _>(key.name.as_str())
                        .await;
                    tally.add(got, index);
                }
            }
            if let Some(l) = latencies.as_mut() {
                l.push(start.elapsed());
            }
        }
        (tally, latencies)
    }
}

/// Scenario A: `runs` times `TASKS` tasks x `GETS_PER_TASK` GETs, all at once.
fn scenario_a(
    rt: &tokio::runtime::Runtime,
    peer: &AsyncPeer,
    keys: &Arc<Vec<Key>>,
    runs: usize,
) -> Round {
    let (wall, cpu) = (Instant::now(), process_cpu());
    let tally = rt.block_on(async {
        let mut tally = Tally::default();
        for run in 0..runs {
            let handles: Vec<_> = (0..TASKS)
                .map(|t| {
                    let task =
                        peer.clone()
                            .worker(keys.clone(), run * TASKS + t, GETS_PER_TASK, None);
                    tokio::spawn(task)
                })
                .collect();
            for h in handles {
                match h.await {
                    Ok((t, _)) => tally.merge(t),
                    Err(e) => panic!("a task panicked: {e}"),
                }
            }
        }
        tally
    });
    let round = Round {
        ops: runs * TASKS * GETS_PER_TASK,
        wall: wall.elapsed(),
        cpu: process_cpu() - cpu,
        ..Round::default()
    };
    tally.check(peer.name());
    round
}

fn quantiles(mut latencies: Vec<Duration>) -> (Duration, Duration) {
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    (at(0.50), at(0.99))
}

/// Scenario B, on the runtime: one task doing sequential GETs.
fn scenario_b_async(
    rt: &tokio::runtime::Runtime,
    peer: &AsyncPeer,
    keys: &Arc<Vec<Key>>,
    worker: usize,
) -> Round {
    let (wall, cpu) = (Instant::now(), process_cpu());
    let task = peer.clone().worker(
        keys.clone(),
        worker,
        SEQUENTIAL_GETS,
        Some(Vec::with_capacity(SEQUENTIAL_GETS)),
    );
    let (tally, latencies) = match rt.block_on(rt.spawn(task)) {
        Ok(out) => out,
        Err(e) => panic!("the task panicked: {e}"),
    };
    let (wall, cpu) = (wall.elapsed(), process_cpu() - cpu);
    tally.check(peer.name());
    let (p50, p99) = quantiles(latencies.unwrap_or_default());
    Round {
        ops: SEQUENTIAL_GETS,
        wall,
        cpu,
        p50,
        p99,
        ..Round::default()
    }
}

/// Scenario B, rb's sync routing client on this (plain) thread.
fn scenario_b_sync(client: &rb::RoutingClient, keys: &[Key], worker: usize) -> Round {
    let mut latencies = Vec::with_capacity(SEQUENTIAL_GETS);
    let mut tally = Tally::default();
    let (wall, cpu) = (Instant::now(), process_cpu());
    for op in 0..SEQUENTIAL_GETS {
        let index = key_index(worker, op);
        let start = Instant::now();
        let got = client.get(&keys[index].name);
        latencies.push(start.elapsed());
        tally.add(got, index);
    }
    let (wall, cpu) = (wall.elapsed(), process_cpu() - cpu);
    tally.check("rb RoutingClient");
    let (p50, p99) = quantiles(latencies);
    Round {
        ops: SEQUENTIAL_GETS,
        wall,
        cpu,
        p50,
        p99,
        ..Round::default()
    }
}

/// Scenario C's clients.
enum ThreadPeer {
    RbAsync,
    RbSync,
    RedisSync,
    Floor,
}

impl ThreadPeer {
    fn name(&self) -> &'static str {
        match self {
            ThreadPeer::RbAsync => "rb AsyncClient (wait)",
            ThreadPeer::RbSync => "rb RoutingClient",
            ThreadPeer::RedisSync => "redis-rs Connection",
            ThreadPeer::Floor => FLOOR,
        }
    }
}

/// Scenario C: `THREADS` threads x `GETS_PER_THREAD` GETs. rb's clients are
/// shared by every thread; redis-rs has `conns[thread][node]`.
fn scenario_c(
    which: &ThreadPeer,
    async_client: &rb_async::Client,
    sync_client: &Arc<rb::RoutingClient>,
    floor: &handoff::Client,
    conns: &mut [Vec<redis::Connection>],
    keys: &[Key],
) -> Round {
    let start = Barrier::new(THREADS + 1);
    let (tally, wall, cpu) = std::thread::scope(|s| {
        let handles: Vec<_> = conns
            .iter_mut()
            .enumerate()
            .map(|(t, conns)| {
                let start = &start;
                let sync_client = Arc::clone(sync_client);
                s.spawn(move || {
                    let mut tally = Tally::default();
                    start.wait();
                    for op in 0..GETS_PER_THREAD {
                        let index = key_index(t, op);
                        let key = &keys[index];
                        match which {
                            ThreadPeer::RbAsync => {
                                tally.add(rb_async::get_wait(async_client, &key.name), index)
                            }
                            ThreadPeer::RbSync => tally.add(sync_client.get(&key.name), index),
                            ThreadPeer::Floor => {
                                tally.add(Ok::<_, rb::Error>(floor.get(index).wait()), index)
                            }
                            ThreadPeer::RedisSync => {
                                let got = redis::cmd("GET")
                                    .arg(&key.name)
                                    .query::<Option<Vec<u8>>>(&mut conns[key.node]);
                                tally.add(got, index)
                            }
                        }
                    }
                    tally
                })
            })
            .collect();
        start.wait();
        let (wall, cpu) = (Instant::now(), process_cpu());
        let mut tally = Tally::default();
        for h in handles {
            match h.join() {
                Ok(t) => tally.merge(t),
                Err(_) => panic!("a thread panicked"),
            }
        }
        (tally, wall.elapsed(), process_cpu() - cpu)
    });
    tally.check(which.name());
    Round {
        ops: THREADS * GETS_PER_THREAD,
        wall,
        cpu,
        ..Round::default()
    }
}

/// The 1-minute load average, to tell a busy machine's figures apart.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// Medians of one client's rounds.
struct Summary {
    scenario: &'static str,
    client: &'static str,
    ops_per_sec: f64,
    /// The slowest and fastest round.
    ops_range: (f64, f64),
    cpu_us_per_op: f64,
    server_commands_per_op: f64,
    server_cpu_us_per_op: f64,
    p50_us: f64,
    p99_us: f64,
}

fn summarize(scenario: &'static str, client: &'static str, rounds: &[Round]) -> Summary {
    let m = |f: &dyn Fn(&Round) -> f64| median(rounds.iter().map(f).collect());
    Summary {
        scenario,
        client,
        ops_per_sec: m(&Round::ops_per_sec),
        ops_range: rounds
            .iter()
            .map(Round::ops_per_sec)
            .fold((f64::MAX, 0.0), |(lo, hi), x| (lo.min(x), hi.max(x))),
        cpu_us_per_op: m(&Round::cpu_us_per_op),
        server_commands_per_op: m(&Round::server_commands_per_op),
        server_cpu_us_per_op: m(&Round::server_cpu_us_per_op),
        p50_us: m(&|r| r.p50.as_secs_f64() * 1e6),
        p99_us: m(&|r| r.p99.as_secs_f64() * 1e6),
    }
}

/// Runs `n` clients for `rounds` rounds, each round in a rotated order.
fn alternate(
    rounds: usize,
    n: usize,
    mut run: impl FnMut(usize, usize) -> Option<Round>,
) -> Vec<Vec<Round>> {
    let mut out = vec![Vec::new(); n];
    for round in 0..rounds {
        for step in 0..n {
            let which = (round + step) % n;
            out[which].extend(run(which, round));
        }
    }
    out
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rounds: usize = match std::env::args().nth(1) {
        Some(a) => a.parse().map_err(|e| format!("rounds {a:?}: {e}"))?,
        None => 5,
    };
    let rounds = rounds.max(1);
    let only = std::env::args().nth(2).unwrap_or_else(|| "ABC".into());
    let run = |scenario: char| only.contains(scenario);
    // Only the clients whose names contain this (e.g. "rb"), if given.
    let clients = std::env::args().nth(3);
    let wanted = |name: &str| clients.as_deref().map_or(true, |c| name.contains(c));

    let setup = TestSetup::with_tcp(NODES, 1)?;
    let ports = (0..NODES)
        .map(|i| setup.tcp_port(i).ok_or("no TCP port"))
        .collect::<Result<Vec<u16>, _>>()?;
    let mut builder = Cluster::builder();
    for (i, &port) in ports.iter().enumerate() {
        builder = builder.host(
            i as rb::HostId,
            HostConfig::new().host("127.0.0.1").port(port),
        );
    }
    let cluster = builder.build()?;
    let router = cluster.router()?;
    let keys = (0..KEYS)
        .map(|i| {
            let name = format!("peer:{i}");
            let node = router.host_for_key(name.as_bytes())? as usize;
            Ok(Key { name, node })
        })
        .collect::<rb::Result<Vec<Key>>>()?;
    let keys = Arc::new(keys);
    cluster.map(|c| {
        for (i, key) in keys.iter().enumerate() {
            c.set(&key.name, value_of(i));
        }
    })?;
    let mut per_node = [0usize; NODES];
    for key in keys.iter() {
        per_node[key.node] += 1;
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let urls: Vec<String> = ports
        .iter()
        .map(|p| format!("redis://127.0.0.1:{p}/"))
        .collect();
    let (redis_conns, fred_clients) = rt.block_on(async {
        let mut redis_conns = Vec::new();
        let mut fred_clients = Vec::new();
        for url in &urls {
            let client = redis::Client::open(url.as_str())?;
            redis_conns.push(client.get_multiplexed_async_connection().await?);
            let config = fred::types::config::Config::from_url(url)?;
            let client = fred::types::Builder::from_config(config).build()?;
            client.init().await?;
            fred_clients.push(client);
        }
        Ok::<_, Box<dyn std::error::Error>>((redis_conns, fred_clients))
    })?;
    let async_client = rb_async::client(&cluster);
    let floor = handoff::Client::start(Arc::new((0..KEYS).map(value_of).collect()));
    let peers = [
        AsyncPeer::Rb(async_client.clone()),
        AsyncPeer::Redis(redis_conns),
        AsyncPeer::Fred(fred_clients.clone()),
        AsyncPeer::Floor(floor.clone()),
    ];
    let sync_client = Arc::new(cluster.routing_client());
    let mut redis_sync: Vec<Vec<redis::Connection>> = (0..THREADS)
        .map(|_| {
            urls.iter()
                .map(|u| redis::Client::open(u.as_str())?.get_connection())
                .collect::<redis::RedisResult<Vec<_>>>()
        })
        .collect::<redis::RedisResult<_>>()?;
    // One more connection per node, to read the servers' command counts.
    let mut probes = urls
        .iter()
        .map(|u| redis::Client::open(u.as_str())?.get_connection())
        .collect::<redis::RedisResult<Vec<_>>>()?;

    println!(
        "{NODES} redis-servers on 127.0.0.1 (TCP), {KEYS} keys of {VALUE_LEN} bytes (per node: {per_node:?}), {} cores, {rounds} alternating rounds, medians; load average {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average()
    );

    // Warm-up, not counted: connections, rb's driver thread, allocators.
    for peer in &peers {
        scenario_a(&rt, peer, &keys, 1);
    }
    let rounds_of = |scenario: char| if run(scenario) { rounds } else { 0 };

    eprintln!("A: {RUNS_A} x {TASKS} tasks x {GETS_PER_TASK} GETs on a 2-worker tokio runtime");
    let a = alternate(rounds_of('A'), peers.len(), |i, _| {
        wanted(peers[i].name())
            .then(|| counting_servers(&mut probes, || scenario_a(&rt, &peers[i], &keys, RUNS_A)))
    });

    eprintln!("B: one task, {SEQUENTIAL_GETS} sequential GETs");
    // First the async peers on the runtime, then rb's sync client.
    let b = alternate(rounds_of('B'), peers.len() + 1, |i, round| {
        match peers.get(i) {
            Some(peer) => wanted(peer.name()).then(|| {
                counting_servers(&mut probes, || scenario_b_async(&rt, peer, &keys, round))
            }),
            None => wanted(SYNC_B).then(|| {
                counting_servers(&mut probes, || scenario_b_sync(&sync_client, &keys, round))
            }),
        }
    });

    eprintln!("C: {THREADS} threads x {GETS_PER_THREAD} GETs");
    let thread_peers = [
        ThreadPeer::RbAsync,
        ThreadPeer::RbSync,
        ThreadPeer::RedisSync,
        ThreadPeer::Floor,
    ];
    let c = alternate(rounds_of('C'), thread_peers.len(), |i, _| {
        wanted(thread_peers[i].name()).then(|| {
            counting_servers(&mut probes, || {
                scenario_c(
                    &thread_peers[i],
                    &async_client,
                    &sync_client,
                    &floor,
                    &mut redis_sync,
                    &keys,
                )
            })
        })
    });

    let sa: Vec<Summary> = peers
        .iter()
        .enumerate()
        .map(|(i, p)| summarize("A", p.name(), &a[i]))
        .collect();
    let mut sb: Vec<Summary> = peers
        .iter()
        .enumerate()
        .map(|(i, p)| summarize("B", p.name(), &b[i]))
        .collect();
    sb.push(summarize("B", SYNC_B, &b[peers.len()]));
    let sc: Vec<Summary> = thread_peers
        .iter()
        .enumerate()
        .map(|(i, p)| summarize("C", p.name(), &c[i]))
        .collect();

    println!();
    println!("load average at the end: {}", load_average());
    println!(
        "| scenario | client | ops/s | rounds' ops/s | CPU us/op | server cmds/op | server CPU us/op | p50 us | p99 us | ops/s vs redis-rs | CPU/op vs redis-rs |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let print = |rows: &[Summary], base: &Summary, latency: bool| {
        for s in rows.iter().filter(|s| !s.ops_per_sec.is_nan()) {
            let (p50, p99) = if latency {
                (format!("{:.1}", s.p50_us), format!("{:.1}", s.p99_us))
            } else {
                ("-".to_owned(), "-".to_owned())
            };
            println!(
                "| {} | {} | {:.0} | {:.0}-{:.0} | {:.2} | {:.3} | {:.2} | {p50} | {p99} | {:.2}x | {:.2}x |",
                s.scenario,
                s.client,
                s.ops_per_sec,
                s.ops_range.0,
                s.ops_range.1,
                s.cpu_us_per_op,
                s.server_commands_per_op,
                s.server_cpu_us_per_op,
                s.ops_per_sec / base.ops_per_sec,
                s.cpu_us_per_op / base.cpu_us_per_op,
            );
        }
    };
    print(&sa, &sa[1], false);
    print(&sb, &sb[1], true);
    print(&sc, &sc[2], false);

    println!();
    println!("issue 9's goals:");
    // (scenario, what, ratio, goal: at least (true) or at most (false))
    let goals = [
        (
            "A",
            "rb ops/s / redis-rs ops/s       ",
            sa[0].ops_per_sec / sa[1].ops_per_sec,
            Some((true, 3.0)),
        ),
        (
            "A",
            "rb CPU/op / redis-rs CPU/op     ",
            sa[0].cpu_us_per_op / sa[1].cpu_us_per_op,
            Some((false, 1.0 / 3.0)),
        ),
        (
            "A",
            "rb ops/s / fred ops/s           ",
            sa[0].ops_per_sec / sa[2].ops_per_sec,
            None,
        ),
        (
            "B",
            "rb async p50 / rb sync p50      ",
            sb[0].p50_us / sb[peers.len()].p50_us,
            Some((false, 1.3)),
        ),
        (
            "B",
            "rb async p50 / redis-rs p50     ",
            sb[0].p50_us / sb[1].p50_us,
            None,
        ),
        (
            "C",
            "rb async shared / redis-rs conns",
            sc[0].ops_per_sec / sc[2].ops_per_sec,
            Some((true, 2.0)),
        ),
        (
            "C",
            "rb sync shared / redis-rs conns ",
            sc[1].ops_per_sec / sc[2].ops_per_sec,
            None,
        ),
    ];
    for (scenario, what, ratio, goal) in goals {
        if ratio.is_nan() {
            continue;
        }
        let goal = match goal {
            Some((true, x)) => format!(
                "  (goal >= {x:.2}x: {})",
                if ratio >= x { "met" } else { "NOT met" }
            ),
            Some((false, x)) => format!(
                "  (goal <= {x:.2}x: {})",
                if ratio <= x { "met" } else { "NOT met" }
            ),
            None => String::new(),
        };
        println!("  {scenario}  {what} = {ratio:5.2}x{goal}");
    }

    for client in &fred_clients {
        let _ = rt.block_on(client.quit());
    }
    Ok(())
}
