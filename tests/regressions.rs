//! Regression tests for known defects of the engine, one test per defect,
//! each named after it and documented with what it proves.
//!
//! Every call that could hang on a defective engine runs on a helper thread
//! with a bounded wait (`common::watch`), so a defect shows as a failing
//! assertion, never as a stuck suite. Faults are injected with the loopback
//! proxy of `common::proxy`. The tests that measure time or memory take
//! [`SERIAL`] so they do not run at the same time as each other.

use std::io::{self, Read, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

mod common;
use common::host_of;
use common::proxy::{Fault, Proxy};
use common::watch::{median, ms_list, watched, within};
use rb::testing::TestSetup;
use rb::{Cluster, Commands, Error, HostConfig, Hosts, MapOptions, Phase, Protocol, Value};

/// Held by every test of this file: some measure wall time or stream at
/// full speed, and on two cores any test running beside them disturbs
/// what they measure.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

const PROTOCOLS: [Protocol; 2] = [Protocol::Resp2, Protocol::Resp3];

/// A one-host cluster.
fn one_host(config: HostConfig) -> Cluster {
    Cluster::builder()
        .host(0, config)
        .build()
        .expect("build a one-host cluster")
}

/// Whether `key` exists in db `db` of server 0, asked directly (no proxy,
/// default user).
fn exists_in(setup: &TestSetup, db: usize, key: &str) -> bool {
    let direct = one_host(setup.host_config(0, db));
    let n = direct
        .local_client(0)
        .expect("local client")
        .exists(&[key])
        .expect("EXISTS as the default user");
    n == 1
}

// ---------------------------------------------------------------------------
// 1. A failed handshake must not let requests run in another db or as
//    another user.
// ---------------------------------------------------------------------------

/// A host whose `SELECT` fails (db 100 of a 16-db server) must not run the
/// request queued behind the handshake in db 0: the SET is an error naming
/// SELECT, and db 0 does not get the key. Both RESP2 and RESP3 (`HELLO 3`,
/// then `SELECT`). A host with a good db (1) is the control.
#[test]
fn failed_select_does_not_run_writes_in_db_0() {
    let _serial = serial();
    let setup = TestSetup::new(1, 1).expect("start redis-server");
    let mut defects = Vec::new();
    for protocol in PROTOCOLS {
        // Control: a good SELECT writes where it should.
        let key = format!("select-ok-{protocol:?}");
        let good = one_host(setup.host_config(0, 1).protocol(protocol));
        let k = key.clone();
        within(Duration::from_secs(10), "SET through db 1", move || {
            good.routing_client().set(k, "v")
        })
        .expect("bounded")
        .expect("SET through db 1 works");
        assert!(exists_in(&setup, 1, &key) && !exists_in(&setup, 0, &key));

        let key = format!("select-bad-{protocol:?}");
        let bad = one_host(setup.host_config(0, 100).protocol(protocol));
        let k = key.clone();
        let result = within(Duration::from_secs(10), "SET through db 100", move || {
            bad.routing_client().set(k, "v")
        })
        .expect("bounded");
        match &result {
            Ok(()) => defects.push(format!("{protocol:?}: SET through db 100 succeeded")),
            Err(e) if !e.to_string().contains("SELECT") => {
                defects.push(format!("{protocol:?}: the error does not name SELECT: {e}"))
            }
            Err(_) => {}
        }
        if exists_in(&setup, 0, &key) {
            defects.push(format!(
                "{protocol:?}: the SET ran in db 0 although SELECT 100 failed (call result: {result:?})"
            ));
        }
    }
    assert!(defects.is_empty(), "{}", defects.join("\n"));
}

/// A host whose `AUTH` fails (ACL user `alice`, wrong password; the
/// default user is on with no password) must not run the request queued
/// behind the handshake as the default user: the SET is an error and the
/// key does not exist. RESP2 (`AUTH alice wrong`) and RESP3
/// (`HELLO 3 AUTH alice wrong`). The right password is the control.
#[test]
fn failed_auth_does_not_run_writes_as_the_default_user() {
    let _serial = serial();
    let setup = TestSetup::with_config(1, 1, |_| "user alice on >right ~* +@all\n".into())
        .expect("start redis-server with an ACL user");
    let mut defects = Vec::new();
    for protocol in PROTOCOLS {
        let key = format!("auth-ok-{protocol:?}");
        let good = one_host(
            setup
                .host_config(0, 0)
                .username("alice")
                .password("right")
                .protocol(protocol),
        );
        let k = key.clone();
        within(Duration::from_secs(10), "SET as alice", move || {
            good.routing_client().set(k, "v")
        })
        .expect("bounded")
        .expect("SET as alice with the right password works");
        assert!(exists_in(&setup, 0, &key));

        let key = format!("auth-bad-{protocol:?}");
        let bad = one_host(
            setup
                .host_config(0, 0)
                .username("alice")
                .password("wrong")
                .protocol(protocol),
        );
        let k = key.clone();
        let result = within(
            Duration::from_secs(10),
            "SET with a wrong password",
            move || bad.routing_client().set(k, "v"),
        )
        .expect("bounded");
        match &result {
            Ok(()) => defects.push(format!("{protocol:?}: SET with a wrong password succeeded")),
            Err(e) => {
                let text = e.to_string();
                if !["AUTH", "HELLO", "WRONGPASS"]
                    .iter()
                    .any(|w| text.contains(w))
                {
                    defects.push(format!(
                        "{protocol:?}: the error does not name the handshake: {text}"
                    ));
                }
            }
        }
        if exists_in(&setup, 0, &key) {
            defects.push(format!(
                "{protocol:?}: the SET ran as the default user although AUTH failed (call result: {result:?})"
            ));
        }
    }
    assert!(defects.is_empty(), "{}", defects.join("\n"));
}

// ---------------------------------------------------------------------------
// 2. Commands that do not answer exactly once must not desynchronise the
//    reply stream.
// ---------------------------------------------------------------------------

/// On one connection in one map (a fanout to the one host):
/// `ECHO before`, `UNSUBSCRIBE a b`, `PUNSUBSCRIBE`, `SUNSUBSCRIBE`,
/// `CLIENT REPLY OFF`, `CLIENT REPLY SKIP`, `ECHO hello`. The five
/// commands that do not answer exactly once per call are refused with
/// `Error::Unsupported`, and each ECHO gets its own text back.
fn check_non_once_commands_are_refused(protocol: Protocol) {
    let setup = TestSetup::new(1, 1).expect("start redis-server");
    let cluster = one_host(setup.host_config(0, 0).protocol(protocol));
    let labels = [
        "ECHO before",
        "UNSUBSCRIBE a b",
        "PUNSUBSCRIBE",
        "SUNSUBSCRIBE",
        "CLIENT REPLY OFF",
        "CLIENT REPLY SKIP",
        "ECHO hello",
    ];
    let commands: Vec<rb::Cmd> = labels
        .iter()
        .map(|l| {
            let mut words = l.split(' ');
            let mut c = rb::cmd(words.next().expect("a name"));
            for w in words {
                c = c.arg(w);
            }
            c
        })
        .collect();
    let outcome = within(
        Duration::from_secs(5),
        "the map with UNSUBSCRIBE and CLIENT REPLY",
        move || {
            let mut promises = Vec::new();
            let _ = cluster.fanout(Hosts::Ids(vec![0]), |c| {
                for command in commands {
                    promises.push(c.cmd::<Value>(command));
                }
            });
            promises
                .iter()
                .map(|p| p.value().map(|mut m| m.remove(&0)))
                .collect::<Vec<Result<Option<Value>, Error>>>()
        },
    );
    let results = match outcome {
        Ok(r) => r,
        Err(hung) => panic!("{protocol:?}: {hung}"),
    };
    let mut defects = Vec::new();
    for (label, result) in labels.iter().zip(&results) {
        let want_echo = label.strip_prefix("ECHO ");
        match (want_echo, result) {
            (Some(text), Ok(Some(Value::BulkString(got)))) if got == text.as_bytes() => {}
            (Some(text), other) => defects.push(format!(
                "{label}: want its own text {text:?}, got {other:?}"
            )),
            (None, Err(Error::Unsupported { .. })) => {}
            (None, other) => {
                defects.push(format!("{label}: want Error::Unsupported, got {other:?}"))
            }
        }
    }
    assert!(defects.is_empty(), "{protocol:?}:\n{}", defects.join("\n"));
}

/// See [`check_non_once_commands_are_refused`]: RESP2.
#[test]
fn unsubscribe_and_client_reply_are_refused_and_replies_stay_in_step_resp2() {
    let _serial = serial();
    check_non_once_commands_are_refused(Protocol::Resp2);
}

/// See [`check_non_once_commands_are_refused`]: RESP3 (where the
/// unsubscribe confirmations are push frames).
#[test]
fn unsubscribe_and_client_reply_are_refused_and_replies_stay_in_step_resp3() {
    let _serial = serial();
    check_non_once_commands_are_refused(Protocol::Resp3);
}

// ---------------------------------------------------------------------------
// 3. A script call keeps the order of its command list, also when the
//    script vanished from the server.
// ---------------------------------------------------------------------------

/// `execute_commands` of `[SET k 10, script INCR k, GET k]`: the GET sees
/// the script's effect ("11") on the first run (the script is loaded), after
/// `SCRIPT FLUSH`, and after a server restart (the cluster still believes
/// the host holds the script, so it meets `NOSCRIPT`).
#[test]
fn script_call_keeps_list_order_after_script_flush_and_restart() {
    let _serial = serial();
    let mut setup = TestSetup::new(1, 1).expect("start redis-server");
    let cluster = setup.make_cluster().expect("cluster");
    let run = |label: &str| -> (Result<Value, Error>, Result<Value, Error>) {
        let c = cluster.clone();
        within(Duration::from_secs(10), label, move || {
            let script = rb::Script::new("return redis.call('INCR', KEYS[1])");
            let out = c
                .execute_commands([(
                    "k",
                    vec![
                        rb::cmd("SET").arg("k").arg(10).into(),
                        script.call(&["k"], &[] as &[&str]).into(),
                        rb::cmd("GET").arg("k").into(),
                    ],
                )])
                .expect("execute_commands");
            let list = &out["k"];
            (list[1].value(), list[2].value())
        })
        .expect("bounded")
    };
    let mut seen = Vec::new();
    seen.push(("first run (script loaded)", run("first run")));
    cluster
        .local_client(0)
        .expect("local client")
        .cmd::<()>(rb::cmd("SCRIPT").arg("FLUSH"))
        .expect("SCRIPT FLUSH");
    seen.push(("after SCRIPT FLUSH", run("after SCRIPT FLUSH")));
    setup.restart(0).expect("restart the server");
    seen.push(("after a restart", run("after a restart")));

    let mut defects = Vec::new();
    for (label, (script, get)) in &seen {
        println!("{label}: script -> {script:?}, GET -> {get:?}");
        if !matches!(script, Ok(Value::Int(11))) {
            defects.push(format!("{label}: the script returned {script:?}, want 11"));
        }
        if !matches!(get, Ok(Value::BulkString(v)) if v == b"11") {
            defects.push(format!(
                "{label}: GET returned {get:?}, want \"11\" (the script ran after the GET)"
            ));
        }
    }
    assert!(defects.is_empty(), "{}", defects.join("\n"));
}

// ---------------------------------------------------------------------------
// 4. A peer sending at full speed cannot hold a caller past its deadline.
// ---------------------------------------------------------------------------

/// Bytes of the fake bulk reply for the deadline tests: the largest bulk
/// Redis allows. One of them may arrive whole within 300 ms on a fast
/// machine (the routing test then passes by succeeding); the map test asks
/// for eight, which none reads within its budget, so it always checks the
/// deadline itself. `tests/faults.rs` checks the timeout at 200 ms.
const DEADLINE_BULK: usize = 512 << 20;
const SLACK: Duration = Duration::from_millis(20);

fn deadline_runs(label: &str, run: impl Fn() -> (Duration, String)) -> Vec<Duration> {
    let mut times = Vec::new();
    for i in 0..5 {
        let (t, outcome) = run();
        println!("{label} run {i}: {t:?}: {outcome}");
        times.push(t);
    }
    times
}

/// A map with a 300 ms timeout doing eight GETs (not merged) to a peer
/// that answers each with a 512 MiB bulk as fast as it can fails with a
/// timeout within 300 ms + 20 ms (median of five runs; the five figures
/// and the overshoot are printed). Before, the map asked one GET, which a
/// fast machine reads whole in time: the test then measured the reply's
/// handling after its last read (21-23 ms of moving the body down by its
/// header, since gone), not the deadline.
#[test]
fn map_timeout_holds_against_a_peer_streaming_at_full_speed() {
    let _serial = serial();
    let proxy = Proxy::fake(Fault::HugeBulkEach(DEADLINE_BULK));
    // Every run times out, often before a whole reply came: with health on,
    // the third would leave the host Down and the rest fail at once.
    let cluster = Cluster::builder()
        .host(0, proxy.host_config())
        .health(rb::HealthPolicy::disabled())
        .build()
        .expect("cluster");
    let budget = Duration::from_millis(300);
    let times = deadline_runs("map", || {
        let c = cluster.clone();
        within(
            Duration::from_secs(60),
            "map against HugeBulkEach",
            move || {
                let start = Instant::now();
                let opts = MapOptions::new().timeout(budget).auto_batch(false);
                let r = c.map_with(opts, |m| {
                    for i in 0..8 {
                        m.get(format!("k{i}"));
                    }
                });
                let took = start.elapsed();
                match r {
                    Err(e) if e.is_timeout() => (took, format!("{e}")),
                    other => panic!("want a timeout after {took:?}, got {other:?}"),
                }
            },
        )
        .expect("bounded")
    });
    assert!(
        times.iter().all(|t| *t >= budget),
        "a timeout before the deadline: {}",
        ms_list(&times)
    );
    assert_on_budget("a map with timeout", budget, &times);
}

/// A routing-client GET with `read_timeout(300 ms)` to a peer that answers
/// with a 512 MiB bulk as fast as it can returns within 300 ms + 20 ms
/// (median of five; figures and overshoot printed).
#[test]
fn routing_read_timeout_holds_against_a_peer_streaming_at_full_speed() {
    let _serial = serial();
    let proxy = Proxy::fake(Fault::HugeBulk(DEADLINE_BULK));
    let budget = Duration::from_millis(300);
    let cluster = one_host(proxy.host_config().read_timeout(Some(budget)));
    let times = deadline_runs("routing get", || {
        let c = cluster.clone();
        within(
            Duration::from_secs(60),
            "routing GET against HugeBulk",
            move || {
                let start = Instant::now();
                let r = c.routing_client().get("k");
                (
                    start.elapsed(),
                    format!("{:?}", r.map(|v| v.map(|v| v.len()))),
                )
            },
        )
        .expect("bounded")
    });
    assert_on_budget("a routing GET with read_timeout", budget, &times);
}

/// Prints the runs' durations, their median and its overshoot of `budget`,
/// and asserts the median is within `budget` + [`SLACK`].
fn assert_on_budget(what: &str, budget: Duration, times: &[Duration]) {
    let m = median(times.to_vec());
    println!(
        "{what} {budget:?}: {} median {m:?}, overshoot {:.1} ms",
        ms_list(times),
        (m.as_secs_f64() - budget.as_secs_f64()) * 1e3
    );
    assert!(
        m <= budget + SLACK,
        "{what} {budget:?} took {m:?} (median of {}) against a peer streaming a {} MiB bulk",
        ms_list(times),
        DEADLINE_BULK >> 20
    );
}

// ---------------------------------------------------------------------------
// 5. Unbounded replies are refused.
// ---------------------------------------------------------------------------

/// Resident memory growth past which the endless-reply tests cut the peer
/// (a safety net for the machine, not the assertion).
const MEMORY_NET_KIB: u64 = 4 << 20;

fn endless_map(config: HostConfig, limit: Duration) -> Result<(), String> {
    let proxy = Proxy::fake(Fault::EndlessArray);
    let cluster = one_host(config.host("127.0.0.1").port(proxy.port()));
    let w = watched(
        limit,
        MEMORY_NET_KIB,
        Duration::from_secs(10),
        || proxy.disconnect_all(),
        move || {
            cluster
                .map(|m| {
                    m.get("k");
                })
                .map(|_| ())
        },
    );
    println!(
        "endless array: {:?}, RSS growth {} MiB, result {:?}, stopped: {:?}",
        w.elapsed,
        w.rss_growth_kib / 1024,
        w.result,
        w.stopped
    );
    if let Some(why) = w.stopped {
        return Err(format!(
            "the map did not end by itself ({why}); after cutting the peer it returned {:?}",
            w.result
        ));
    }
    match w.result {
        Some(Err(Error::Protocol { .. })) => Ok(()),
        other => Err(format!(
            "the map ended after {:?} with {other:?}, want Error::Protocol (a reply limit)",
            w.elapsed
        )),
    }
}

/// A peer that answers a GET with `*9223372036854775807` and `:1` forever
/// (no map timeout): the map ends by itself with `Error::Protocol` (the
/// default reply limits) within 30 s.
#[test]
fn endless_array_reply_fails_with_a_protocol_error_under_default_limits() {
    let _serial = serial();
    if let Err(e) = endless_map(HostConfig::new(), Duration::from_secs(30)) {
        panic!("{e}");
    }
}

/// The same with `max_reply_elements(1000)` and `max_reply_bytes(1 MiB)`:
/// the map fails with `Error::Protocol` in under a second.
#[test]
fn endless_array_reply_fails_fast_with_explicit_reply_limits() {
    let _serial = serial();
    let config = HostConfig::new()
        .max_reply_elements(1000)
        .max_reply_bytes(1 << 20);
    let start = Instant::now();
    let result = endless_map(config, Duration::from_secs(3));
    let took = start.elapsed();
    if let Err(e) = result {
        panic!("{e}");
    }
    assert!(took < Duration::from_secs(1), "took {took:?}");
}

// ---------------------------------------------------------------------------
// 8. Smaller defects.
// ---------------------------------------------------------------------------

/// `username("u")` with no password: building the cluster, or else its
/// first command, is an `Error::Config` (an ACL user without a password
/// cannot authenticate; silently sending no AUTH runs as the default user).
#[test]
fn username_without_password_is_a_config_error() {
    let _serial = serial();
    let setup = TestSetup::new(1, 1).expect("start redis-server");
    let built = Cluster::builder()
        .host(0, setup.host_config(0, 0).username("u"))
        .build();
    let cluster = match built {
        Err(Error::Config { .. }) => return,
        Err(e) => panic!("building failed, but not with Error::Config: {e:?}"),
        Ok(c) => c,
    };
    let result = within(Duration::from_secs(10), "GET as user u", move || {
        cluster.routing_client().get("k")
    })
    .expect("bounded");
    assert!(
        matches!(result, Err(Error::Config { .. })),
        "a host with a user name and no password: the build succeeded and GET returned {result:?}, want Error::Config"
    );
}

/// An immediate command to a host that accepts the TCP connection but
/// never answers the handshake (`SELECT 1` behind a blackhole) fails with
/// `Error::Timeout` in phase Connect with the connect budget (200 ms), not
/// the read budget (2 s).
#[test]
fn slow_handshake_of_an_immediate_command_times_out_in_the_connect_phase_with_the_connect_budget() {
    let _serial = serial();
    let proxy = Proxy::fake(Fault::Blackhole);
    let connect = Duration::from_millis(200);
    let cluster = one_host(
        proxy
            .host_config()
            .db(1)
            .connect_timeout(connect)
            .read_timeout(Some(Duration::from_secs(2))),
    );
    let (took, result) = within(
        Duration::from_secs(10),
        "GET behind a blackhole",
        move || {
            let start = Instant::now();
            let r = cluster.routing_client().get("k");
            (start.elapsed(), r)
        },
    )
    .expect("bounded");
    println!("took {took:?}: {result:?}");
    match &result {
        Err(Error::Timeout { phase, budget, .. }) => assert!(
            *phase == Phase::Connect && *budget == connect,
            "want a Connect timeout of {connect:?}, got phase {phase:?} budget {budget:?} after {took:?}"
        ),
        other => panic!("want Error::Timeout, got {other:?} after {took:?}"),
    }
    assert!(took < connect + Duration::from_millis(300), "took {took:?}");
}

/// A unix-socket connect that meets a full backlog (`EAGAIN`) is retried
/// within the connect budget: the listener here has a backlog of 0, filled
/// with connections nobody accepts; 100 ms later a thread accepts them all
/// and answers `PING` with `+PONG`, and the PING succeeds.
#[test]
fn unix_connect_that_gets_eagain_is_retried_within_the_connect_budget() {
    let _serial = serial();
    let dir = std::env::temp_dir().join(format!("rb-eagain-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("fake.sock");
    let listener = UnixListener::bind(&path).expect("bind a unix socket");
    // Linux lets listen() be called again to change the backlog.
    // SAFETY: the fd is a bound, listening unix socket owned by `listener`.
    let rc = unsafe { libc::listen(listener.as_raw_fd(), 0) };
    assert_eq!(rc, 0, "listen: {}", io::Error::last_os_error());
    let mut fillers = Vec::new();
    loop {
        match mio::net::UnixStream::connect(&path) {
            Ok(s) => fillers.push(s),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("filler connect: {e}"),
        }
        assert!(fillers.len() < 10_000, "the backlog never filled");
    }
    println!("backlog full after {} connections", fillers.len());

    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let stop = stop.clone();
        std::thread::spawn(move || fake_pong_server(listener, &stop))
    };
    let cluster = one_host(
        HostConfig::new()
            .unix_socket_path(path.to_string_lossy().into_owned())
            .connect_timeout(Duration::from_secs(2)),
    );
    let result = within(
        Duration::from_secs(10),
        "PING over a full backlog",
        move || {
            let start = Instant::now();
            let r = cluster.local_client(0).expect("local client").ping();
            (start.elapsed(), r)
        },
    );
    stop.store(true, Ordering::SeqCst);
    let _ = server.join();
    drop(fillers);
    let _ = std::fs::remove_dir_all(&dir);
    let (took, reply) = result.expect("bounded");
    println!("PING took {took:?}: {reply:?}");
    assert_eq!(
        reply.as_deref().map_err(|e| e.to_string()),
        Ok("PONG"),
        "the connect that met EAGAIN was not retried"
    );
    assert!(took < Duration::from_secs(2), "took {took:?}");
}

/// After 100 ms, accepts every connection (for up to 5 s) and answers each
/// `PING` it sees with `+PONG`.
fn fake_pong_server(listener: UnixListener, stop: &AtomicBool) {
    std::thread::sleep(Duration::from_millis(100));
    listener.set_nonblocking(true).expect("nonblocking");
    let start = Instant::now();
    let mut conns: Vec<(std::os::unix::net::UnixStream, Vec<u8>)> = Vec::new();
    while !stop.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(5) {
        while let Ok((s, _)) = listener.accept() {
            s.set_nonblocking(true).expect("nonblocking");
            conns.push((s, Vec::new()));
        }
        for (s, seen) in &mut conns {
            let mut buf = [0u8; 4096];
            if let Ok(n) = s.read(&mut buf) {
                seen.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(seen).to_ascii_uppercase();
                let pings = text.matches("PING").count();
                for _ in 0..pings {
                    let _ = s.write_all(b"+PONG\r\n");
                }
                if pings > 0 {
                    seen.clear();
                }
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A connection reset by the peer during a map is reported as
/// `Error::Connection` with `io::ErrorKind::ConnectionReset`, not as a
/// closed connection.
#[test]
fn reset_during_a_map_is_reported_as_connection_reset() {
    let _serial = serial();
    let setup = TestSetup::new(1, 1).expect("start redis-server");
    let proxy = Proxy::to_unix(setup.socket(0));
    let cluster = one_host(proxy.host_config());
    proxy.set_fault(Fault::Reset);
    let result = within(Duration::from_secs(10), "a map through Reset", move || {
        let mut p = None;
        let _ = cluster.map(|m| {
            p = Some(m.get("k"));
        });
        p.expect("the closure ran").value()
    })
    .expect("bounded");
    match &result {
        Err(Error::Connection { kind, .. }) if *kind == io::ErrorKind::ConnectionReset => {}
        other => panic!("want Error::Connection with kind ConnectionReset, got {other:?}"),
    }
}

/// In a map with `max_concurrency(1)`, a command to host 0 then one to host
/// 1 forces an implicit join of host 0; once host 0 has nothing
/// outstanding its connection goes back to the pool at once, so inside the
/// closure `idle_connections(0)` is 1.
#[test]
fn implicit_join_returns_the_finished_hosts_connection_to_the_pool() {
    let _serial = serial();
    let setup = TestSetup::new(2, 1).expect("start redis-server");
    let cluster = setup.make_cluster().expect("cluster");
    let key0 = (0..)
        .map(|n| format!("k{n}"))
        .find(|k| host_of(&cluster, k) == 0)
        .expect("a key of host 0");
    let key1 = (0..)
        .map(|n| format!("k{n}"))
        .find(|k| host_of(&cluster, k) == 1)
        .expect("a key of host 1");
    let result = within(Duration::from_secs(10), "a map over two hosts", move || {
        let before = cluster.idle_connections(0);
        let c = cluster.clone();
        let inside = cluster.map_with(MapOptions::new().max_concurrency(1), |m| {
            m.get(&key0);
            m.get(&key1);
            c.idle_connections(0)
        });
        (before, inside, cluster.idle_connections(0))
    })
    .expect("bounded");
    println!("idle connections of host 0: before, inside, after the map: {result:?}");
    let (before, inside, _) = result;
    assert_eq!(before, 0);
    assert_eq!(
        inside.expect("the map"),
        1,
        "host 0's connection was not back in the pool after the implicit join"
    );
}

// ---------------------------------------------------------------------------
// 9. Nothing is retried once request bytes went out.
// ---------------------------------------------------------------------------

/// `INCR counter` through a proxy that cuts the reply in half and closes:
/// the call fails, the server counted exactly one INCR (the proxy forwarded
/// exactly one request's bytes), and once the fault is gone the next call
/// succeeds. Once on a fresh connection, once on a pooled one.
#[test]
fn no_retry_after_request_bytes_went_out_and_recovery_after_the_fault() {
    let _serial = serial();
    let setup = TestSetup::new(1, 1).expect("start redis-server");
    let proxy = Proxy::to_unix(setup.socket(0));
    let cluster = one_host(proxy.host_config());
    let direct = one_host(setup.host_config(0, 0));
    let counter = |label: &str| -> i64 {
        let v = direct
            .local_client(0)
            .expect("local client")
            .get("counter")
            .expect("GET counter directly");
        let v = v.map(|v| String::from_utf8(v).expect("utf-8"));
        v.map_or(0, |v| v.parse().unwrap_or_else(|_| panic!("{label}: {v}")))
    };
    let request = rb::cmd("INCR").arg("counter").to_packed().len() as u64;
    let incr = |label: &str| -> Result<i64, Error> {
        let c = cluster.clone();
        within(Duration::from_secs(10), label, move || {
            c.routing_client().incr("counter")
        })
        .expect("bounded")
    };

    let mut expected = 0;
    for phase in ["fresh connection", "pooled connection"] {
        if phase == "pooled connection" {
            let c = cluster.clone();
            within(Duration::from_secs(10), "warm the pool", move || {
                c.routing_client().get("warm")
            })
            .expect("bounded")
            .expect("a clean GET");
            assert_eq!(cluster.idle_connections(0), 1, "the pool was warmed");
        }
        let (bytes0, accepted0) = (proxy.forwarded_bytes(), proxy.accepted());
        proxy.set_fault(Fault::CutMidReply);
        let r = incr(phase);
        expected += 1;
        let forwarded = proxy.forwarded_bytes() - bytes0;
        let accepted = proxy.accepted() - accepted0;
        println!(
            "{phase}: INCR under CutMidReply -> {r:?}; forwarded {forwarded} bytes (one request is {request}), {accepted} new connections"
        );
        assert!(
            r.is_err(),
            "{phase}: INCR succeeded through a cut reply: {r:?}"
        );
        assert_eq!(
            counter(phase),
            expected,
            "{phase}: the INCR ran more than once (retried after its bytes went out)"
        );
        assert_eq!(
            forwarded, request,
            "{phase}: the proxy forwarded {forwarded} bytes, want one request ({request})"
        );
        proxy.set_fault(Fault::None);
        expected += 1;
        assert_eq!(
            incr(&format!("{phase}: recovery")).expect("INCR after the fault"),
            expected
        );
    }
}
