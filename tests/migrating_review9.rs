//! Defects a review of 3daf395..c96375f (marks in `rb:migration:deleted`,
//! a migrating map's per-key order queue, scripts and the async
//! `execute_commands` by the migration's rules, `MAY_EMPTY` marks) found.
//! Each test fails on c96375f and passes since 9499659. Deterministic: a proxy holds the mover's
//! replies from the new owner (server 2) while the application runs, or
//! the state a crashed mover leaves is set up by hand; waits are on events
//! a server or the proxy shows, never sleeps.

mod common;
use common::proxy::Fault;
use rb::migrate::{move_keys, MoveOptions, Transfer};
use rb::Commands;

type Setup = common::MoveThroughProxy;

/// (1) The order queue leaves out GET's fast path: a GET that misses on
/// both owners is asked of the new owner once more after the join (the old
/// host's write epoch changed, or is not known yet), by which time a `SET`
/// issued after it in the same map has run. The GET answers the later
/// write ("v"); a plain map, and the order the map promises, answer nil.
/// (The same with `INCR`/`LPUSH` after the GET: "1" or a WRONGTYPE failure.)
#[test]
fn a_get_that_missed_does_not_see_a_later_set_in_its_map() {
    let s = Setup::start();
    let k = s.key("gs", 0);
    // Another key of the same old host, deleted in the map: that host's
    // write epoch changes during the map whatever the cluster knew.
    let j = (1..)
        .map(|n| s.key("gs", n))
        .find(|j| common::host_of(&s.old, j) == common::host_of(&s.old, &k))
        .expect("a key on the same old host");
    s.old.routing_client().set(&j, "x").expect("SET");
    let got = s
        .app
        .map(|m| {
            let got = m.get(&k);
            m.set(&k, "v");
            m.del(&[j.as_str()]);
            got
        })
        .expect("map")
        .take()
        .expect("GET");
    assert_eq!(got, None, "a GET issued before the SET saw the SET");
}

/// (4) A command that may empty its key (`GETDEL`) runs on the new owner
/// when the key is there, and marks it deleted there, but leaves the old
/// copy that a mover half-way (its `RESTORE` done, its delete of the old
/// copy not yet) still has. The next GET misses on the new owner and reads
/// the deleted value from the old copy.
#[test]
fn a_getdel_on_the_new_owner_is_not_undone_by_the_old_copy() {
    let s = Setup::start();
    let k = s.key("gd", 0);
    s.old.routing_client().set(&k, 42).expect("SET");
    s.proxy.set_fault(Fault::HoldReplies);
    let (old, new) = (s.old.clone(), s.mover_new.clone());
    let mover = std::thread::spawn(move || {
        move_keys(
            &old,
            &new,
            MoveOptions::new().transfer(Transfer::DumpRestore),
        )
    });
    let on_new = s.on_new();
    // The mover's RESTORE ran; its answer (and so its delete of the old
    // copy) is held.
    while on_new.get(&k).expect("GET").is_none() {
        std::thread::yield_now();
    }
    let r = s.app.routing_client();
    let taken: Option<String> = r.cmd(rb::cmd("GETDEL").arg(&k)).expect("GETDEL");
    assert_eq!(taken.as_deref(), Some("42"));
    let after: Option<Vec<u8>> = r.get(&k).expect("GET");
    s.proxy.set_fault(Fault::None);
    mover.join().expect("mover").expect("move");
    assert_eq!(after, None, "GET after GETDEL read the old copy");
}

/// (4) The stale-mark retry assumes a delete removes the old copy first;
/// a `MAY_EMPTY` command's mark (here `GETDEL`'s, on the new owner where a
/// crashed mover left its copy) does not. The resumed move finds the mark,
/// sees the old copy still there, drops the mark as stale and copies the
/// key again: the key `GETDEL` took is back (42).
#[test]
fn a_resumed_move_does_not_bring_back_a_key_emptied_on_its_new_owner() {
    let s = Setup::start();
    let k = s.key("rs", 0);
    s.old.routing_client().set(&k, 42).expect("SET");
    // What a mover that crashed after its RESTORE leaves: the copy on the
    // new owner, recorded as its own; the old copy still there.
    let dump: Vec<u8> = s.on_old(&k).cmd(rb::cmd("DUMP").arg(&k)).expect("DUMP");
    let on_new = s.on_new();
    let _: String = on_new
        .cmd(rb::cmd("RESTORE").arg(&k).arg(0).arg(dump))
        .expect("RESTORE");
    let _: i64 = on_new
        .cmd(
            rb::cmd("HSET")
                .arg(rb::migrate::COPIES)
                .arg(&k)
                .arg("crashed.0.0"),
        )
        .expect("HSET");
    let taken: Option<String> = s
        .app
        .routing_client()
        .cmd(rb::cmd("GETDEL").arg(&k))
        .expect("GETDEL");
    assert_eq!(taken.as_deref(), Some("42"));
    // The move resumed (no proxy fault).
    let report = move_keys(
        &s.old,
        &s.mover_new,
        MoveOptions::new().transfer(Transfer::DumpRestore),
    )
    .expect("move");
    let left: Option<Vec<u8>> = on_new.get(&k).expect("GET");
    assert_eq!(
        left, None,
        "deleted key brought back; {:?}",
        report.progress
    );
}

/// (3) The async `execute_commands` on a migrating cluster routes each
/// call by its own key, so a call without one (`PING`, a script of no
/// keys) that the plain async form and the sync migrating form run on the
/// list key's host is refused as unroutable.
#[test]
fn async_execute_commands_runs_keyless_calls_on_a_migrating_cluster() {
    let s = Setup::start();
    let k = s.key("kl", 0);
    let script = rb::Script::new("return ARGV[1]");
    let calls = || -> Vec<rb::Call> {
        vec![
            rb::cmd("PING").into(),
            script.call(&[] as &[&str], &["a"]).into(),
        ]
    };
    let want = vec![
        Ok(rb::Value::SimpleString("PONG".into())),
        Ok(rb::Value::BulkString(b"a".to_vec())),
    ];
    // The sync form on the same migrating cluster, and the plain async
    // form, run both.
    let sync = s
        .app
        .execute_commands([(k.clone(), calls())])
        .expect("sync execute_commands");
    let sync: Vec<_> = sync[&k]
        .iter()
        .map(|p| p.value().map_err(|e| e.to_string()))
        .collect();
    assert_eq!(sync, want, "sync, migrating");
    let plain = s
        .direct
        .async_client()
        .execute_commands([(k.clone(), calls())])
        .wait()
        .expect("plain async execute_commands");
    let plain: Vec<_> = plain[&k]
        .iter()
        .map(|r| r.clone().map_err(|e| e.to_string()))
        .collect();
    assert_eq!(plain, want, "async, not migrating");
    let out = s
        .app
        .async_client()
        .execute_commands([(k.clone(), calls())])
        .wait()
        .expect("execute_commands");
    let got: Vec<_> = out[&k]
        .iter()
        .map(|r| r.clone().map_err(|e| e.to_string()))
        .collect();
    assert_eq!(got, want, "async, migrating");
}

/// (3) A `Reply` dropped unawaited still runs its request (its docs; the
/// plain async `execute_commands` sends at once). On a migrating cluster
/// `execute_commands` is one lazy future: dropped, nothing is ever sent.
#[test]
fn a_dropped_async_execute_commands_still_runs_on_a_migrating_cluster() {
    let s = Setup::start();
    let on_new = s.on_new();
    // Polls the new owner for `key` up to a deadline (waits on the event).
    let written = |key: &str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut got: Option<Vec<u8>> = None;
        while got.is_none() && std::time::Instant::now() < deadline {
            got = on_new.get(key).expect("GET");
            std::thread::yield_now();
        }
        got
    };
    let set = |key: &str| vec![rb::Call::from(rb::cmd("SET").arg(key).arg("v"))];
    // Control: the plain async client.
    let c = s.key("dr", 1);
    drop(
        s.direct
            .async_client()
            .execute_commands([(c.clone(), set(&c))]),
    );
    assert_eq!(written(&c).as_deref(), Some(&b"v"[..]), "control");
    let k = s.key("dr", 0);
    drop(
        s.app
            .async_client()
            .execute_commands([(k.clone(), set(&k))]),
    );
    assert_eq!(
        written(&k).as_deref(),
        Some(&b"v"[..]),
        "the dropped request never ran"
    );
}
