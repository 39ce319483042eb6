//! Huge replies whose promises the caller dropped: the pipeline may free
//! such a reply off its thread, but never so that the map's outcome
//! changes (a conversion that would fail, or succeed, still does).

use std::io::{Read, Write};
use std::net::TcpListener;

use rb::{Cluster, Commands, HostConfig};

/// A fake server answering every command with the bulk `body`.
fn fake_bulk_server(body: Vec<u8>) -> HostConfig {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let body = body.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                let mut prev = b'\n';
                loop {
                    let n = match conn.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    let mut commands = 0;
                    for &b in &buf[..n] {
                        if b == b'*' && prev == b'\n' {
                            commands += 1;
                        }
                        prev = b;
                    }
                    for _ in 0..commands {
                        let mut reply = format!("${}\r\n", body.len()).into_bytes();
                        reply.extend_from_slice(&body);
                        reply.extend_from_slice(b"\r\n");
                        if conn.write_all(&reply).is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    HostConfig::new().host("127.0.0.1").port(port)
}

fn one_host(config: HostConfig) -> Cluster {
    Cluster::builder().host(0, config).build().expect("cluster")
}

/// 2 MiB of '0' then "7": a valid i64 (7).
fn digits() -> Vec<u8> {
    let mut v = vec![b'0'; 2 << 20];
    v.push(b'7');
    v
}

/// Found by review. A map whose i64 GET the server answers with a valid (if long) integer
/// must not fail; nor may its outcome depend on whether the caller kept
/// the promise.
#[test]
fn a_dropped_promise_does_not_turn_a_valid_huge_reply_into_a_map_failure() {
    let cluster = one_host(fake_bulk_server(digits()));
    // Kept: the map succeeds and the value is 7.
    let kept = cluster.map(|m| m.cmd::<i64>(rb::cmd("GET").arg("k")));
    let kept = kept.map(|p| p.value());
    println!("promise kept: {kept:?}");
    assert!(matches!(kept, Ok(Ok(7))), "kept: {kept:?}");
    // Dropped: the same reply now fails the map (an empty bulk was
    // converted to i64 instead of the reply).
    let dropped = cluster.map(|m| {
        let _ = m.cmd::<i64>(rb::cmd("GET").arg("k"));
    });
    println!("promise dropped: {dropped:?}");
    assert!(
        dropped.is_ok(),
        "the map failed on a valid reply: {dropped:?}"
    );
}

/// Found by review. The other way round: a reply that does not convert (not UTF-8 for a
/// String) fails the map whether or not the promise was kept.
#[test]
fn a_dropped_promise_does_not_hide_a_huge_replys_conversion_failure() {
    let cluster = one_host(fake_bulk_server(vec![0xff; 2 << 20]));
    let kept = cluster.map(|m| m.cmd::<String>(rb::cmd("GET").arg("k")));
    println!("promise kept: {:?}", kept.as_ref().map(|_| ()));
    assert!(kept.is_err(), "kept: the map should fail");
    let dropped = cluster.map(|m| {
        let _ = m.cmd::<String>(rb::cmd("GET").arg("k"));
    });
    println!("promise dropped: {dropped:?}");
    assert!(
        dropped.is_err(),
        "the map hid the conversion failure of a reply it replaced by an empty bulk"
    );
}
