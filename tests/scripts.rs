//! Scripts: execute_commands remembers which hosts hold a script, survives
//! SCRIPT FLUSH, and scripts run from maps, fanouts and the routing client.

use std::collections::HashMap;

use rb::testing::TestSetup;

mod common;
use rb::{Cluster, Commands, Value};

fn reset_stats(cluster: &Cluster) {
    cluster
        .all(|c| c.cmd::<()>(rb::cmd("CONFIG").arg("RESETSTAT")))
        .unwrap();
}

/// Calls summed over servers (stats are per server: 2 databases each here,
/// so hosts 0 and 2 stand for the two servers).
fn sum(cluster: &Cluster, name: &str) -> u64 {
    cluster
        .host_ids()
        .into_iter()
        .filter(|h| h % 2 == 0)
        .map(|h| common::command_calls(cluster, h, name))
        .sum()
}

/// Runs `script` on each key through `execute_commands`, followed by a
/// `GET` of the key when `then_get`.
fn run(
    cluster: &Cluster,
    script: &rb::Script,
    keys: &[&str],
    then_get: bool,
) -> HashMap<String, Vec<Value>> {
    let out = cluster
        .execute_commands(keys.iter().map(|k| {
            let mut calls: Vec<rb::Call> = vec![script.call(&[*k], &["arg"]).into()];
            if then_get {
                calls.push(rb::cmd("GET").arg(*k).into());
            }
            (k.to_string(), calls)
        }))
        .unwrap();
    out.into_iter()
        .map(|(k, ps)| (k, ps.iter().map(|p| p.value().unwrap()).collect()))
        .collect()
}

/// A script that is its host's last call costs no load once the cluster
/// knows the host holds it; after a `SCRIPT FLUSH` it answers NOSCRIPT and
/// is reloaded and retried once (nothing after it to reorder).
#[test]
fn known_scripts_cost_nothing_and_flush_is_survived() {
    let setup = TestSetup::new(2, 2).unwrap();
    let cluster = setup.make_cluster().unwrap();
    let script = rb::Script::new("redis.call('SET', KEYS[1], ARGV[1]) return KEYS[1]");
    let keys: Vec<String> = (0..40).map(|i| format!("k{i}")).collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();

    reset_stats(&cluster);
    let first = run(&cluster, &script, &keys, false);
    for k in &keys {
        assert_eq!(first[*k], vec![Value::BulkString(k.as_bytes().to_vec())]);
    }
    // No SCRIPT EXISTS round trip: a load pipelined ahead, once per host.
    assert_eq!(sum(&cluster, "script|exists"), 0);
    assert_eq!(
        sum(&cluster, "script|load"),
        4,
        "one load per host (4 hosts)"
    );
    assert_eq!(sum(&cluster, "evalsha"), 40);

    reset_stats(&cluster);
    run(&cluster, &script, &keys, false);
    assert_eq!(
        sum(&cluster, "script|load"),
        0,
        "the cluster remembers the script"
    );
    assert_eq!(sum(&cluster, "evalsha"), 40);

    // Flushed behind the cluster's back: NOSCRIPT, reload, retry once.
    cluster
        .all(|c| c.cmd::<()>(rb::cmd("SCRIPT").arg("FLUSH")))
        .unwrap();
    reset_stats(&cluster);
    let again = run(&cluster, &script, &keys, false);
    for k in &keys {
        assert_eq!(again[*k][0], Value::BulkString(k.as_bytes().to_vec()));
    }
    assert_eq!(sum(&cluster, "script|load"), 4, "reloaded after the flush");
    assert_eq!(sum(&cluster, "evalsha"), 80, "every call retried once");
}

/// A script followed by more calls keeps the list's order in every case:
/// its load goes ahead of it in the same pipeline (no extra round trip),
/// so no NOSCRIPT and no retry after the calls behind it ran.
#[test]
fn scripts_followed_by_calls_keep_order_after_a_flush() {
    let setup = TestSetup::new(2, 2).unwrap();
    let cluster = setup.make_cluster().unwrap();
    let script = rb::Script::new("redis.call('SET', KEYS[1], ARGV[1]) return KEYS[1]");
    let keys: Vec<String> = (0..40).map(|i| format!("k{i}")).collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    for round in 0..3 {
        if round == 2 {
            cluster
                .all(|c| c.cmd::<()>(rb::cmd("SCRIPT").arg("FLUSH")))
                .unwrap();
        }
        cluster.all(|c| c.flushdb()).unwrap();
        reset_stats(&cluster);
        let out = run(&cluster, &script, &keys, true);
        for k in &keys {
            assert_eq!(
                out[*k],
                vec![
                    Value::BulkString(k.as_bytes().to_vec()),
                    Value::BulkString(b"arg".to_vec())
                ],
                "round {round}: the GET sees the script's SET"
            );
        }
        assert_eq!(sum(&cluster, "script|exists"), 0);
        assert_eq!(
            sum(&cluster, "script|load"),
            4,
            "round {round}: one load per host (4 hosts)"
        );
        assert_eq!(sum(&cluster, "evalsha"), 40, "round {round}: no retry");
    }
}

#[test]
fn scripts_from_map_fanout_and_routing_client() {
    let setup = TestSetup::new(2, 2).unwrap();
    let cluster = setup.make_cluster().unwrap();
    let script = rb::Script::new("return redis.call('INCRBY', KEYS[1], ARGV[1])");

    let mut ps = Vec::new();
    cluster
        .map(|c| {
            for i in 0..20 {
                ps.push(c.eval_script(&script, &[format!("n{i}")], &[i]));
            }
        })
        .unwrap();
    for (i, p) in ps.iter().enumerate() {
        assert_eq!(p.value().unwrap(), Value::Int(i as i64));
    }

    let client = cluster.routing_client();
    assert_eq!(
        client.eval_script(&script, &["n5"], &[10]).unwrap(),
        Value::Int(15)
    );
    // After a flush the routing client reloads and retries.
    cluster
        .all(|c| c.cmd::<()>(rb::cmd("SCRIPT").arg("FLUSH")))
        .unwrap();
    assert_eq!(
        client.eval_script(&script, &["n5"], &[1]).unwrap(),
        Value::Int(16)
    );

    let per_host = cluster
        .all(|c| c.eval_script(&rb::Script::new("return 7"), &[] as &[&str], &[] as &[&str]))
        .unwrap();
    let per_host = per_host.value().unwrap();
    assert_eq!(per_host.len(), 4);
    assert!(per_host.values().all(|v| *v == Value::Int(7)));

    // Keyless script calls cannot be routed.
    let e = client
        .eval_script(&script, &[] as &[&str], &[1])
        .unwrap_err();
    assert!(matches!(e, rb::Error::Unroutable { .. }), "{e}");
}

#[test]
fn script_errors_are_server_errors_naming_the_host() {
    let setup = TestSetup::new(1, 1).unwrap();
    let cluster = setup.make_cluster().unwrap();
    let client = cluster.routing_client();
    let bad = rb::Script::new("return redis.call('NOSUCHCOMMAND')");
    let e = client
        .eval_script(&bad, &["k"], &[] as &[&str])
        .unwrap_err();
    assert!(e.to_string().contains("host 0"), "{e}");
    assert!(matches!(e, rb::Error::Server { .. }), "{e}");
}
