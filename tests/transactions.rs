//! Transactions against real servers: MULTI/EXEC on the keys' one host,
//! WATCH with retries on conflict, per-command errors as Redis reports
//! them, keys on two hosts refused, and the connection clean afterwards.

use std::sync::Arc;

mod common;
use common::{cluster, command_calls, host_of};
use rb::{Cluster, Commands, Error, Value};

/// `n` keys that all live on `host`.
fn keys_on(cluster: &Cluster, host: u32, prefix: &str, n: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .filter(|k| host_of(cluster, k) == host)
        .take(n)
        .collect()
}

#[test]
fn a_transaction_runs_on_the_keys_host_and_converts_exec() {
    let (_setup, cluster) = cluster(2, 1);
    let k = keys_on(&cluster, 1, "t", 2);
    let client = cluster.routing_client();
    client.set(&k[1], "b").expect("SET");
    let multi_before = command_calls(&cluster, 1, "multi");
    let (n, b): (i64, Option<Vec<u8>>) = client
        .transaction(&[&k[0], &k[1]], |tx| {
            tx.incr(&k[0]);
            tx.get(&k[1]);
            Ok(())
        })
        .expect("transaction");
    assert_eq!((n, b), (1, Some(b"b".to_vec())));
    assert_eq!(command_calls(&cluster, 1, "multi") - multi_before, 1);
    assert_eq!(command_calls(&cluster, 1, "exec"), 1);
    // The connection went back to the pool clean, and serves plain commands.
    assert_eq!(cluster.idle_connections(1), 1);
    let v: Option<Vec<u8>> = client.get(&k[1]).expect("GET after");
    assert_eq!(v, Some(b"b".to_vec()));
    assert_eq!(cluster.idle_connections(1), 1, "the same connection reused");
}

#[test]
fn a_run_time_error_is_reported_per_command_while_the_others_apply() {
    let (_setup, cluster) = cluster(1, 1);
    let client = cluster.routing_client();
    let out: Vec<Value> = client
        .transaction(&["s"], |tx| {
            tx.set("s", "text");
            tx.incr("s"); // WRONGTYPE-like: not an integer
            tx.set("t", 1);
            Ok(())
        })
        .expect("EXEC ran");
    assert_eq!(out.len(), 3);
    assert!(matches!(&out[1], Value::Error { .. }), "{out:?}");
    assert_eq!(client.get("t").expect("GET"), Some(b"1".to_vec()));
    client.rpush("list", &["x"]).expect("RPUSH");
    let out: Vec<Value> = client
        .transaction(&["list"], |tx| {
            tx.get("list"); // WRONGTYPE
            tx.llen("list");
            Ok(())
        })
        .expect("EXEC ran");
    match &out[0] {
        Value::Error { code, .. } => assert_eq!(code, "WRONGTYPE"),
        other => panic!("{other:?}"),
    }
    assert_eq!(out[1], Value::Int(1));
    // A command refused while queuing discards the whole transaction.
    let err = client
        .transaction::<Vec<Value>, _, _>(&["s"], |tx| {
            tx.set("u", 1);
            tx.cmd::<()>(rb::cmd("SET").arg("u")); // wrong number of arguments
            Ok(())
        })
        .expect_err("EXECABORT");
    assert_eq!(err.code(), Some("EXECABORT"), "{err}");
    assert!(err.to_string().contains("command 2"), "{err}");
    assert_eq!(client.get("u").expect("GET"), None, "nothing ran");
}

#[test]
fn keys_on_two_hosts_are_refused() {
    let (_setup, cluster) = cluster(2, 1);
    let a = keys_on(&cluster, 0, "a", 1).remove(0);
    let b = keys_on(&cluster, 1, "b", 1).remove(0);
    let client = cluster.routing_client();
    let err = client
        .transaction::<Vec<Value>, _, _>(&[&a, &b], |tx| {
            tx.incr(&a);
            Ok(())
        })
        .expect_err("two hosts");
    assert!(matches!(err, Error::Unroutable { .. }), "{err}");
    assert!(
        err.to_string().contains(&a) && err.to_string().contains(&b),
        "{err}"
    );
    // A queued command for another host is refused too, nothing sent.
    let err = client
        .transaction::<Vec<Value>, _, _>(&[&a], |tx| {
            tx.incr(&b);
            Ok(())
        })
        .expect_err("queued key elsewhere");
    assert!(matches!(err, Error::Unroutable { .. }), "{err}");
}

/// Eight threads double one counter 5 times each with check-and-set: the
/// result is exact (every conflict was retried).
#[test]
fn watched_transactions_retry_conflicts() {
    let (_setup, cluster) = cluster(2, 1);
    let client = Arc::new(cluster.routing_client());
    client.set("counter", 1).expect("SET");
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let client = client.clone();
            std::thread::spawn(move || {
                for _ in 0..5 {
                    let ((),): ((),) = client
                        .transaction_watch(&["counter"], |tx| {
                            let now: i64 = tx.read().cmd(rb::cmd("GET").arg("counter"))?;
                            tx.set("counter", now * 2);
                            Ok(())
                        })
                        .expect("doubled");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    let v: i64 = client.cmd(rb::cmd("GET").arg("counter")).expect("GET");
    assert_eq!(v, 1 << 40);
}

#[test]
fn a_conflict_on_every_try_aborts_and_leaves_the_connection_clean() {
    let (_setup, cluster) = cluster(1, 1);
    let client = cluster.routing_client();
    let other = cluster.routing_client();
    let mut tries = 0;
    let err = client
        .transaction_watch::<Vec<Value>, _, _>(&["w"], |tx| {
            tries += 1;
            let _: Option<Vec<u8>> = tx.read().get("w")?;
            other.incr("w")?; // someone else writes the watched key
            tx.set("w", 0);
            Ok(())
        })
        .expect_err("always conflicts");
    assert!(
        matches!(err, Error::TransactionAborted { tries: 100, .. }),
        "{err}"
    );
    assert_eq!(tries, 100);
    // A closure that fails: UNWATCH, nothing queued ran, connection clean.
    let err = client
        .transaction_watch::<Vec<Value>, _, _>(&["w"], |tx| {
            tx.set("w", "never");
            Err(Error::Config {
                reason: "changed my mind".into(),
            })
        })
        .expect_err("closure error");
    assert!(matches!(err, Error::Config { .. }));
    assert_eq!(other.get("w").expect("GET"), Some(b"100".to_vec()));
    // The pooled connection is not watching anything: a plain
    // transaction on it runs although "w" changes meanwhile.
    let (n,): (i64,) = client
        .transaction(&["w"], |tx| {
            tx.incr("w");
            Ok(())
        })
        .expect("clean connection");
    assert_eq!(n, 101);
    // Both connections pooled: the transaction's and the one `other` used
    // while it was held.
    assert_eq!(cluster.idle_connections(0), 2);
}

#[test]
fn transactions_in_maps_and_on_the_async_client() {
    let (_setup, cluster) = cluster(2, 1);
    let k = keys_on(&cluster, 0, "m", 2);
    let p = {
        let mut out = None;
        cluster
            .map(|c| {
                c.set(&k[0], 5);
                out = Some(c.transaction::<(i64, i64), _, _>(&[&k[0]], |tx| {
                    tx.incr(&k[0]);
                    tx.incr(&k[0]);
                    Ok(())
                }));
                c.get(&k[0]);
            })
            .expect("map");
        out.expect("promise")
    };
    assert_eq!(p.value().expect("EXEC"), (6, 7));
    let client = cluster.async_client();
    let (a, b): (i64, Option<Vec<u8>>) = client
        .transaction(&[&k[0], &k[1]], |tx| {
            tx.incr(&k[0]);
            tx.get(&k[1]);
            Ok(())
        })
        .wait()
        .expect("async EXEC");
    assert_eq!((a, b), (8, None));
    // Other callers' GETs around it are unaffected.
    let got: Vec<_> = (0..50).map(|_| client.get(&k[0])).collect();
    for g in got {
        assert_eq!(g.wait().expect("GET"), Some(b"8".to_vec()));
    }
}
