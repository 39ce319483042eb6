//! Edge cases found in review: connection state never leaks through the
//! pool, push-mode commands are refused, script failures are reported as
//! what they are, and extreme user arguments do not panic.

use std::time::Duration;

use rb::testing::TestSetup;
use rb::{Commands, HostConfig, MapOptions, Value};

#[test]
fn connection_state_does_not_leak_through_the_pool() {
    let setup = TestSetup::new(1, 2).unwrap();
    let cluster = setup.make_cluster().unwrap();
    let local = cluster.local_client(0).unwrap();
    local.set("k", "v").unwrap();
    // A transaction left open, and a database switched, on one connection...
    local.cmd::<()>(rb::cmd("MULTI")).unwrap();
    // (this connection is now dirty and is closed, not pooled)
    assert_eq!(
        local.get("k").unwrap(),
        Some(b"v".to_vec()),
        "no QUEUED from a pooled MULTI"
    );
    local.cmd::<()>(rb::cmd("SELECT").arg(1)).unwrap();
    assert_eq!(
        local.get("k").unwrap(),
        Some(b"v".to_vec()),
        "still database 0"
    );
    assert_eq!(cluster.idle_connections(0), 1);
}

#[test]
fn push_mode_commands_are_refused() {
    let setup = TestSetup::new(1, 1).unwrap();
    let cluster = setup.make_cluster().unwrap();
    let local = cluster.local_client(0).unwrap();
    for c in [
        rb::cmd("SUBSCRIBE").arg("ch"),
        rb::cmd("MONITOR"),
        rb::cmd("psubscribe").arg("p*"),
    ] {
        let e = local.cmd::<Value>(c).unwrap_err();
        assert!(matches!(e, rb::Error::Unsupported { .. }), "{e}");
    }
    // The connection is fine afterwards.
    assert_eq!(local.ping().unwrap(), "PONG");
}

#[test]
fn script_load_failures_are_reported_as_themselves() {
    let setup = TestSetup::new(1, 1).unwrap();
    let cluster = setup.make_cluster().unwrap();
    let broken = rb::Script::new("this is not lua");
    let e = cluster
        .routing_client()
        .eval_script(&broken, &["k"], &[] as &[&str])
        .unwrap_err();
    assert_eq!(e.code(), Some("ERR"), "{e}");
    assert!(!e.to_string().contains("NOSCRIPT"), "{e}");
    assert!(
        e.to_string().contains("SCRIPT"),
        "names the SCRIPT LOAD: {e}"
    );

    let out = cluster
        .execute_commands([("k", vec![broken.call(&["k"], &[] as &[&str]).into()])])
        .unwrap();
    let e = out["k"][0].value().unwrap_err();
    assert!(!e.to_string().contains("NOSCRIPT"), "{e}");
}

#[test]
fn scripts_over_several_keys_are_refused_like_commands() {
    let setup = TestSetup::new(1, 1).unwrap();
    let cluster = setup.make_cluster().unwrap();
    let s = rb::Script::new("return 1");
    let e = cluster
        .routing_client()
        .eval_script(&s, &["a", "b"], &[] as &[&str])
        .unwrap_err();
    assert!(matches!(e, rb::Error::Unroutable { .. }), "{e}");
    let r = cluster.map(|c| c.eval_script(&s, &["a", "b"], &[] as &[&str]));
    assert!(matches!(r, Err(rb::Error::Unroutable { .. })));
}

#[test]
fn duplicate_keys_in_execute_commands_keep_every_result() {
    let setup = TestSetup::new(1, 1).unwrap();
    let cluster = setup.make_cluster().unwrap();
    let out = cluster
        .execute_commands([
            ("k", vec![rb::cmd("INCR").arg("k").into()]),
            ("k", vec![rb::cmd("INCR").arg("k").into()]),
        ])
        .unwrap();
    let got: Vec<Value> = out["k"].iter().map(|p| p.value().unwrap()).collect();
    assert_eq!(got, vec![Value::Int(1), Value::Int(2)]);
}

#[test]
fn extreme_durations_do_not_panic() {
    let setup = TestSetup::new(1, 1).unwrap();
    let cluster = rb::Cluster::builder()
        .host(
            0,
            setup
                .host_config(0, 0)
                .connect_timeout(Duration::MAX)
                .read_timeout(Some(Duration::MAX))
                .write_timeout(Some(Duration::MAX)),
        )
        .build()
        .unwrap();
    cluster.routing_client().set("k", 1).unwrap();
    let v = cluster
        .map_with(MapOptions::new().timeout(Duration::MAX), |c| c.get("k"))
        .unwrap();
    assert_eq!(v.value().unwrap(), Some(b"1".to_vec()));
    // Host ids at the end of the range.
    let c = rb::Cluster::builder()
        .router(rb::RouterKind::Partition)
        .host(u32::MAX, HostConfig::new())
        .build();
    assert!(
        matches!(c, Err(rb::Error::BadHostSetup { .. })),
        "ids must be 0..n"
    );
}

#[test]
fn connect_timeout_covers_the_handshake() {
    let setup = TestSetup::new(1, 2).unwrap();
    // Database 1 needs a SELECT in the handshake; the server is frozen, so
    // the socket connects (the kernel accepts) but the handshake never ends.
    setup.pause(0).unwrap();
    let cluster = rb::Cluster::builder()
        .host(
            0,
            setup
                .host_config(0, 1)
                .connect_timeout(Duration::from_millis(150)),
        )
        .build()
        .unwrap();
    let started = std::time::Instant::now();
    let e = cluster.routing_client().get("k").unwrap_err();
    let took = started.elapsed();
    setup.resume(0).unwrap();
    assert!(
        matches!(
            e,
            rb::Error::Timeout {
                phase: rb::Phase::Connect,
                ..
            }
        ),
        "{e}"
    );
    assert!(
        took >= Duration::from_millis(150) && took < Duration::from_secs(2),
        "{took:?}"
    );
}
