//! Review 10 (commits c96375f..9a03381): the async driver's task executor
//! (`Driver::spawn`, `Reply::from_task`) running migrating async requests.
//! Both defects failed at 9a03381: a task's clients kept their drivers
//! running (a request with no deadline to a host that never answers kept
//! both threads and the connection after everything was dropped), and a
//! task's wait on the old cluster's reply spun on the driver thread. A
//! task's clients now reach their drivers through a queue that does not
//! keep them running (a stopping driver runs its tasks while it flushes),
//! and their replies never spin.

mod common;

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::proxy::{Fault, Proxy};
use common::{host_of, migrating_over_tcp, tcp};
use rb::testing::TestSetup;
use rb::{AsyncOptions, Cluster, Commands, HostConfig, RouterKind};

/// A TCP listener that accepts connections and never answers: the
/// accepted connections, as they come, through the returned channel.
fn blackhole() -> (HostConfig, mpsc::Receiver<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            match s {
                Ok(s) => {
                    if tx.send(s).is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    });
    (HostConfig::new().host("127.0.0.1").port(port), rx)
}

/// Reads from `s` until `needle` was seen (the request reached the
/// server); panics after `within`.
fn read_until(s: &mut TcpStream, needle: &[u8], within: Duration) {
    s.set_read_timeout(Some(within)).expect("timeout");
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.windows(needle.len()).any(|w| w == needle) {
        let n = s.read(&mut buf).expect("the request comes");
        assert!(n > 0, "closed before the request came");
        seen.extend_from_slice(&buf[..n]);
    }
}

/// Whether `s` is closed by its peer (EOF or reset) within `within`.
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let until = Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).expect("timeout");
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// Old cluster on servers 0 and 1; the new one on servers 0, 1 and a
/// host 2 that never answers; migrating when `migrating`.
fn with_silent_host2(
    servers: &TestSetup,
    migrating: bool,
) -> (Cluster, Cluster, mpsc::Receiver<TcpStream>) {
    let old = common::over_tcp(servers, 2);
    let (silent, conns) = blackhole();
    let mut b = Cluster::builder()
        .router(RouterKind::Partition)
        .host(0, tcp(servers, 0))
        .host(1, tcp(servers, 1))
        .host(2, silent);
    if migrating {
        b = b.migrating_from(&old);
    }
    (old, b.build().expect("new"), conns)
}

/// Control for the test below (passes): a plain async request waiting on a
/// host that never answers, with no deadline (no timeout anywhere). Once
/// the reply, the client and the cluster are dropped, the driver stops
/// (after its flush of at most 500 ms) and closes its connections.
#[test]
fn control_a_plain_request_without_deadline_lets_the_driver_stop() {
    let servers = TestSetup::with_tcp(2, 1).expect("servers");
    let (old, new, conns) = with_silent_host2(&servers, false);
    let key = (0..)
        .map(|i| format!("plain{i}"))
        .find(|k| host_of(&new, k) == 2)
        .expect("a key on host 2");
    let client = new.async_client();
    let reply = client.incr(&key);
    let mut conn = conns
        .recv_timeout(Duration::from_secs(5))
        .expect("the driver connects to host 2");
    read_until(&mut conn, b"INCR", Duration::from_secs(5));
    drop(reply);
    drop(client);
    drop(new);
    drop(old);
    assert!(
        closed_within(&mut conn, Duration::from_secs(5)),
        "the driver stopped and closed its connection"
    );
}

/// Found by review: a migrating async request is a task on the driver
/// thread that holds the client (so the driver's own handle) until it
/// ends. With no deadline (no client timeout, no read timeout: the
/// defaults) and a host that never answers, it never ends: once the
/// reply, the client and both clusters are dropped, the driver thread
/// (and the old cluster's, which the task's old client keeps) runs on
/// forever with its connections open — where a plain request's driver
/// stops (the control above). `Cluster::async_client` promises the thread
/// stops when the last async client and the last outstanding reply are
/// gone.
#[test]
fn a_migrating_request_without_deadline_does_not_keep_the_driver_running() {
    let servers = TestSetup::with_tcp(2, 1).expect("servers");
    let (old, new, conns) = with_silent_host2(&servers, true);
    let key = (0..)
        .map(|i| format!("moving{i}"))
        .find(|k| host_of(&new, k) == 2 && host_of(&old, k) != 2)
        .expect("a key moving to host 2");
    let client = new.async_client();
    // A write of a key in transit: EXISTS on its new owner first.
    let reply = client.incr(&key);
    let mut conn = conns
        .recv_timeout(Duration::from_secs(5))
        .expect("the driver connects to host 2");
    read_until(&mut conn, b"EXISTS", Duration::from_secs(5));
    drop(reply);
    drop(client);
    drop(new);
    drop(old);
    assert!(
        closed_within(&mut conn, Duration::from_secs(5)),
        "the driver thread of a dropped migrating cluster still runs (its \
         task keeps its own handle), its connection to host 2 still open"
    );
}

/// Found by review: a task's step on the old cluster awaits a reply of the
/// old cluster's driver, polled on the new cluster's driver thread; that
/// reply may spin (`AsyncOptions::spin`: the old driver has a lone request
/// in flight, and the polling thread is not the old driver's). The spin
/// then holds the new driver thread itself: every other request on the
/// cluster (here a GET of a key that does not move, on a healthy server)
/// waits until the old host answers or the step times out. The spin is
/// documented to hold the polling thread (the caller's runtime worker),
/// never the driver.
#[test]
fn a_migrating_step_on_the_old_cluster_does_not_spin_on_the_driver_thread() {
    let servers = TestSetup::with_tcp(3, 1).expect("servers");
    let proxy = Proxy::to_unix(servers.socket(1));
    let old = Cluster::builder()
        .router(RouterKind::Partition)
        .host(0, tcp(&servers, 0))
        .host(1, proxy.host_config())
        .build()
        .expect("old");
    let new = migrating_over_tcp(&servers, &old);
    let moving = (0..)
        .map(|i| format!("spin{i}"))
        .find(|k| host_of(&old, k) == 1 && host_of(&new, k) == 2)
        .expect("a key moving from the proxied old host to host 2");
    let staying = (0..)
        .map(|i| format!("stay{i}"))
        .find(|k| host_of(&old, k) == 0 && host_of(&new, k) == 0)
        .expect("a key staying on server 0");
    let client = new.async_client_with(
        AsyncOptions::new()
            .timeout(Duration::from_millis(1500))
            .spin(Duration::from_secs(5)),
    );
    // Connections to the new hosts made.
    let _: Option<Vec<u8>> = client.get(&staying).wait().expect("GET");
    proxy.set_fault(Fault::Hold);
    // An overwrite of a key in transit: SET on the new owner, then DEL of
    // its old copy on the old owner (held by the proxy).
    let set = client.set(&moving, "v");
    while proxy.received_bytes() == 0 {
        std::thread::yield_now();
    }
    // The DEL went out: the task awaits it on the driver thread.
    let t = Instant::now();
    let _: Option<Vec<u8>> = client.get(&staying).wait().expect("GET");
    let took = t.elapsed();
    proxy.set_fault(Fault::None);
    let _ = set.wait();
    assert!(
        took < Duration::from_millis(500),
        "a GET on a healthy host took {took:?}: the driver thread was held \
         by a migrating task's spin on the old cluster's reply"
    );
}
