//! The fault proxy itself, checked with plain sockets: each fault does what
//! it says, the counters count, and dropping the proxy ends it promptly.
//! (So a failure elsewhere is rb's, not the proxy's.)

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

mod common;
use common::proxy::{Fault, Proxy};
use rb::testing::TestSetup;

const PING: &[u8] = b"*1\r\n$4\r\nPING\r\n";

fn connect(proxy: &Proxy) -> TcpStream {
    let s = TcpStream::connect(proxy.addr()).expect("connect to the proxy");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    s
}

/// Reads until `want` bytes came or the peer closed; what came and whether it closed.
fn read_some(s: &mut TcpStream, want: usize) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.len() < want {
        match s.read(&mut buf) {
            Ok(0) => return (got, true),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!("read: {e} after {got:?}"),
        }
    }
    (got, false)
}

/// Pass-through, delay, cut reply and the forwarded-bytes counter, against
/// a real server.
#[test]
fn proxy_passes_delays_and_cuts_real_replies() {
    let setup = TestSetup::new(1, 1).expect("start redis-server");
    let proxy = Proxy::to_unix(setup.socket(0));

    let mut s = connect(&proxy);
    s.write_all(PING).expect("write");
    assert_eq!(read_some(&mut s, 7).0, b"+PONG\r\n");
    assert_eq!(proxy.forwarded_bytes(), PING.len() as u64);
    assert_eq!(proxy.accepted(), 1);

    proxy.set_fault(Fault::Delay(Duration::from_millis(150)));
    let start = Instant::now();
    s.write_all(PING).expect("write");
    assert_eq!(read_some(&mut s, 7).0, b"+PONG\r\n");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(150) && took < Duration::from_millis(400),
        "{took:?}"
    );

    proxy.set_fault(Fault::CutMidReply);
    s.write_all(PING).expect("write");
    let (got, closed) = read_some(&mut s, 100);
    assert_eq!((got.as_slice(), closed), (&b"+PO"[..], true));
    assert_eq!(proxy.forwarded_bytes(), 3 * PING.len() as u64);
}

/// Blackhole, garbage, reset, huge bulk and endless array, with no upstream.
#[test]
fn proxy_fake_faults_answer_as_described() {
    let proxy = Proxy::fake(Fault::Blackhole);
    let mut s = connect(&proxy);
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("read timeout");
    s.write_all(PING).expect("write");
    let mut buf = [0u8; 16];
    let e = s.read(&mut buf).expect_err("no answer from a blackhole");
    assert!(
        matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{e}"
    );

    proxy.set_fault(Fault::Garbage);
    let mut s = connect(&proxy);
    s.write_all(PING).expect("write");
    assert_eq!(read_some(&mut s, 13).0, b"hello world\r\n");

    proxy.set_fault(Fault::HugeBulk(10));
    s.write_all(PING).expect("write");
    assert_eq!(read_some(&mut s, 17).0, b"$10\r\nxxxxxxxxxx\r\n");

    proxy.set_fault(Fault::EndlessArray);
    s.write_all(PING).expect("write");
    let (got, closed) = read_some(&mut s, 1 << 20);
    assert!(!closed);
    assert!(got.starts_with(b"*9223372036854775807\r\n:1\r\n:1\r\n"));
    proxy.set_fault(Fault::None);
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    println!(
        "after the endless array stopped: {} more bytes, then closed",
        rest.len()
    );

    proxy.set_fault(Fault::Reset);
    let mut s = connect(&proxy);
    s.write_all(PING).expect("write");
    let e = s.read(&mut buf).expect_err("a reset");
    assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
    assert_eq!(proxy.forwarded_bytes(), 0, "nothing has an upstream here");
}

/// Refuse closes the listener (connects are refused) and open connections;
/// lifting it listens again on the same port.
#[test]
fn proxy_refuses_and_listens_again() {
    let setup = TestSetup::new(1, 1).expect("start redis-server");
    let proxy = Proxy::to_unix(setup.socket(0));
    let mut open = connect(&proxy);
    proxy.set_fault(Fault::Refuse);
    let e = TcpStream::connect(proxy.addr()).expect_err("refused");
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
    let mut buf = [0u8; 16];
    assert!(
        matches!(open.read(&mut buf), Ok(0) | Err(_)),
        "the open connection was shut down"
    );
    proxy.set_fault(Fault::None);
    let mut s = connect(&proxy);
    s.write_all(PING).expect("write");
    assert_eq!(read_some(&mut s, 7).0, b"+PONG\r\n");
}

/// Dropping a proxy that is streaming to a client that does not read, and
/// holds idle connections, returns within a second.
#[test]
fn proxy_drop_is_prompt() {
    let proxy = Proxy::fake(Fault::HugeBulk(512 << 20));
    let mut streaming = connect(&proxy);
    streaming.write_all(PING).expect("write");
    let _idle = connect(&proxy);
    std::thread::sleep(Duration::from_millis(100));
    let start = Instant::now();
    drop(proxy);
    let took = start.elapsed();
    assert!(took < Duration::from_secs(1), "drop took {took:?}");
}
