//! Review of fe9ba04 (a panicking waker is caught on the driver) and
//! d1bfc52 (a panic on the driver's loop fails what waits on it).
//!
//! `FromValue` is a public trait, and the async client converts replies on
//! its driver thread: a user's conversion that panics is a panic on the
//! driver's loop, reachable from user code (and, through the reply's
//! bytes, from the network). On d1bfc52 it is caught by `run`'s
//! `catch_unwind`, and then:
//! - the request whose conversion panicked is never answered: its
//!   expectation was popped off the pipeline before the conversion, and
//!   dropped with its waiter as the panic unwound, so neither
//!   `session.cancel` nor a deadline (the timers went with `run`) reaches
//!   it;
//! - the other requests of a merged MSET it belonged to are lost the same
//!   way;
//! - every other caller's request, then and forever after, fails with
//!   `Cancelled`: one caller's conversion bug takes the client down, where
//!   fe9ba04 contains one caller's waker bug.
//!
//! Mended: the driver runs each conversion under `catch_unwind`, so one
//! that panics fails its own request with `Error::Type` naming host and
//! command, and nothing else (every test here failed on d1bfc52).

use std::sync::mpsc;
use std::time::Duration;

use rb::testing::TestSetup;
use rb::{cmd, AsyncOptions, Commands, Error, Execute, FromValue, Reply, Value};

/// A user's type whose conversion has a bug.
#[derive(Debug)]
struct Panicky;

impl FromValue for Panicky {
    fn from_value(_value: Value) -> rb::Result<Self> {
        panic!("a user's FromValue bug (expected by review_driver_panic)");
    }
}

fn options() -> AsyncOptions {
    AsyncOptions::new()
        .spin(Duration::ZERO)
        .timeout(Duration::from_secs(2))
}

/// Waits for `reply` on another thread, for at most `limit`.
fn wait_at_most<T: Send + 'static>(reply: Reply<T>, limit: Duration) -> Option<rb::Result<T>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(reply.wait());
    });
    rx.recv_timeout(limit).ok()
}

/// The request whose conversion panicked must still end (with an error):
/// "every request ends with a value or a clear error". On d1bfc52 it waits
/// forever (its 2 s timeout never fires either).
#[test]
fn a_request_whose_conversion_panics_still_ends() {
    let setup = TestSetup::new(1, 1).expect("servers");
    let cluster = setup.make_cluster().expect("cluster");
    let client = cluster.async_client_with(options());
    client.set("rp:k", "v").wait().expect("SET");
    let broken: Reply<Panicky> = client.execute(cmd("STRLEN").arg("rp:k"));
    let got = wait_at_most(broken, Duration::from_secs(10))
        .expect("the request whose conversion panicked never ended (10 s; its timeout is 2 s)");
    match got {
        Err(e @ Error::Type { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains("STRLEN") && text.contains("panicked"),
                "{text}"
            );
        }
        Err(e) => panic!("{e:?}"),
        Ok(_) => panic!("a conversion that panics gave a value"),
    }
}

/// Another caller's request, sent after one caller's conversion panicked,
/// is answered as usual: the panic is that caller's (as with a waker,
/// fe9ba04). On d1bfc52 it fails with `Cancelled`, as does every request
/// of every caller from then on, for as long as the client lives.
#[test]
fn a_conversion_that_panics_does_not_take_down_other_callers() {
    let setup = TestSetup::new(1, 1).expect("servers");
    let cluster = setup.make_cluster().expect("cluster");
    let client = cluster.async_client_with(options());
    client.set("rp:k", "v").wait().expect("SET");
    // Kept: a reply nobody holds may be dropped unconverted.
    let broken: Reply<Panicky> = client.execute(cmd("STRLEN").arg("rp:k"));
    // Converted (and failed) by the driver before the next caller comes.
    let broken = wait_at_most(broken, Duration::from_secs(10))
        .expect("the request whose conversion panicked never ended");
    assert!(matches!(broken, Err(Error::Type { .. })));
    let other = cluster.async_client_with(options());
    let got = wait_at_most(other.get("rp:k"), Duration::from_secs(10))
        .expect("another caller's GET never ended");
    match got {
        Ok(v) => assert_eq!(v, Some(b"v".to_vec())),
        Err(e) => panic!("another caller's GET failed: {e} ({e:?})"),
    }
}

/// SETs merged into one MSET with a SET whose conversion panics: each
/// ends (with a value or an error). On d1bfc52 those after it in the
/// MSET wait forever (the batch's expectation was popped and dropped).
#[test]
fn the_other_sets_of_a_merged_mset_still_end() {
    let setup = TestSetup::new(1, 1).expect("servers");
    let cluster = setup.make_cluster().expect("cluster");
    let client = cluster.async_client_with(options());
    client.set("rp:warm", "v").wait().expect("SET");
    // Queued in a tight loop: the driver takes them in few turns, and the
    // broken SET is merged with its neighbours.
    let mut before = Vec::new();
    for i in 0..200 {
        before.push(client.set(format!("rp:a{i}"), "x"));
    }
    let broken: Reply<Panicky> = client.execute(cmd("SET").arg("rp:broken").arg("x"));
    let mut after = Vec::new();
    for i in 0..200 {
        after.push(client.set(format!("rp:b{i}"), "x"));
    }
    let all: Vec<Reply<()>> = before.into_iter().chain(after).collect();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(all.into_iter().map(Reply::wait).collect::<Vec<_>>());
    });
    let got = rx.recv_timeout(Duration::from_secs(10)).ok();
    let broken = wait_at_most(broken, Duration::from_secs(10));
    let results = got.expect("some SETs merged with the broken one never ended (10 s)");
    for (i, r) in results.iter().enumerate() {
        assert!(r.is_ok(), "SET {i}: {r:?}");
    }
    assert!(
        matches!(broken, Some(Err(Error::Type { .. }))),
        "{broken:?}"
    );
}
