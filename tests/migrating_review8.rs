//! Defects a review of 3daf395 (the new owner's record of copies and marks
//! of deletes, `rb::migrate::COPIES`) found; each test failed there except
//! the control, and passes since the fixes that followed (marks in their
//! own hash, `rb::migrate::DELETED`, which writes never drop; deletes in
//! transactions and command lists marked; progress counts; scripts and the
//! async `execute_commands` by the migration's rules; each key's order in
//! a map). Three were older than 3daf395 and say so (async
//! `execute_commands` and scripts ignored the migration; a migrating map
//! ran a `DEL` after a later `SET`). Deterministic: a proxy holds the
//! mover's traffic to the new owner (server 2) while the application runs;
//! every wait is on an event a server or the proxy shows (bytes received,
//! a key, a command count).

mod common;
use common::command_calls;
use common::proxy::Fault;
use rb::migrate::MoveProgress;
use rb::{Commands, Execute};

type Setup = common::MoveThroughProxy;

/// The mover DUMPs `k` (42) and its `RESTORE` is held at the proxy; the
/// application runs `act` (which deletes the key); then the mover's
/// `RESTORE` runs (its answer held), and the application INCRs the key.
/// Returns the INCR's answer (1 if the delete stands), what is left on
/// the new owner at the end, and the mover's report.
fn incr_after_a_late_copy(act: impl FnOnce(&Setup, &str)) -> (i64, Option<Vec<u8>>, MoveProgress) {
    let s = Setup::start();
    let k = s.key("late", 0);
    s.old.routing_client().set(&k, 42).expect("SET");
    let before = s.proxy.received_bytes();
    s.proxy.set_fault(Fault::Hold);
    let mover = s.spawn_mover();
    // The mover has DUMPed the key and sent its RESTORE (held).
    while s.proxy.received_bytes() == before {
        std::thread::yield_now();
    }
    act(&s, &k);
    let on_new = s.on_new();
    assert_eq!(
        on_new.get(&k).expect("GET"),
        None,
        "deleted on the new owner"
    );
    // The RESTORE runs now (copied, or refused for the key's mark); its
    // answer is held.
    let evals = command_calls(&s.direct, 2, "eval");
    s.proxy.set_fault(Fault::HoldReplies);
    while on_new.exists(&[k.as_str()]).expect("EXISTS") == 0
        && command_calls(&s.direct, 2, "eval") == evals
    {
        std::thread::yield_now();
    }
    let after = s.app.routing_client().incr(&k).expect("INCR");
    s.proxy.set_fault(Fault::None);
    let report = mover.join().expect("mover").expect("move");
    (after, on_new.get(&k).expect("GET"), report.progress)
}

/// A `DEL` in a routing client's transaction: `move_in_transit` moves the
/// key, then `MULTI DEL EXEC` runs on the new owner, with no mark. The
/// mover's copy (DUMPed before) lands after it, and the next INCR sees
/// the deleted value (43): the bug the marks fixed for a map's `DEL`.
#[test]
fn a_transaction_del_during_a_dump_restore_move_stays_deleted() {
    let (after, left, progress) = incr_after_a_late_copy(|s, k| {
        let (n,): (i64,) = s
            .app
            .routing_client()
            .transaction(&[k], |tx| {
                tx.del(&[k]);
                Ok(())
            })
            .expect("transaction");
        assert_eq!(n, 1);
    });
    assert_eq!(
        (after, left),
        (1, Some(b"1".to_vec())),
        "mover: {progress:?}"
    );
}

/// The same with `Cluster::execute_commands` (`DEL` sent as is to the new
/// owner after `move_in_transit`).
#[test]
fn an_execute_commands_del_during_a_dump_restore_move_stays_deleted() {
    let (after, left, progress) = incr_after_a_late_copy(|s, k| {
        let out = s
            .app
            .execute_commands([(k, vec![rb::cmd("DEL").arg(k).into()])])
            .expect("execute_commands");
        assert_eq!(out[k][0].value().expect("DEL"), rb::Value::Int(1));
    });
    assert_eq!(
        (after, left),
        (1, Some(b"1".to_vec())),
        "mover: {progress:?}"
    );
}

/// A map's `DEL` marks the key; then an `EXPIRE` of the (now absent) key,
/// a modify, drops the key's field before it runs (`forget`), although it
/// creates nothing: the mark is gone, the mover's late copy lands, and
/// the INCR sees 43.
#[test]
fn an_expire_of_a_deleted_key_does_not_drop_its_mark() {
    let (after, left, progress) = incr_after_a_late_copy(|s, k| {
        let r = s.app.routing_client();
        assert_eq!(r.del(&[k]).expect("DEL"), 1);
        assert!(!r.expire(k, 100).expect("EXPIRE"), "nothing to expire");
    });
    assert_eq!(
        (after, left),
        (1, Some(b"1".to_vec())),
        "mover: {progress:?}"
    );
}

/// The same with an `LPOP` of the deleted key in a map (a queue consumer
/// polling an emptied queue): every poll drops the delete's mark.
#[test]
fn an_lpop_of_a_deleted_key_does_not_drop_its_mark() {
    let (after, left, progress) = incr_after_a_late_copy(|s, k| {
        assert_eq!(s.app.routing_client().del(&[k]).expect("DEL"), 1);
        let popped = s
            .app
            .map(|m| m.cmd::<Option<Vec<u8>>>(rb::cmd("LPOP").arg(k)))
            .expect("map")
            .take()
            .expect("LPOP");
        assert_eq!(popped, None);
    });
    assert_eq!(
        (after, left),
        (1, Some(b"1".to_vec())),
        "mover: {progress:?}"
    );
}

/// The same with the async client's `EXPIRE`.
#[test]
fn an_async_expire_of_a_deleted_key_does_not_drop_its_mark() {
    let (after, left, progress) = incr_after_a_late_copy(|s, k| {
        let a = s.app.async_client();
        assert_eq!(a.del(&[k]).wait().expect("DEL"), 1);
        assert!(!a.expire(k, 100).wait().expect("EXPIRE"));
    });
    assert_eq!(
        (after, left),
        (1, Some(b"1".to_vec())),
        "mover: {progress:?}"
    );
}

/// A watched transaction that only reads the deleted key: its watched keys
/// are "taken to write", so their fields (the delete's mark) go before
/// `WATCH`: the mover's late copy lands, and the INCR sees 43.
#[test]
fn a_read_only_watched_transaction_does_not_drop_a_mark() {
    let (after, left, progress) = incr_after_a_late_copy(|s, k| {
        let r = s.app.routing_client();
        assert_eq!(r.del(&[k]).expect("DEL"), 1);
        let (got,): (Option<Vec<u8>>,) = r
            .transaction_watch(&[k], |tx| {
                tx.get(k);
                Ok(())
            })
            .expect("transaction");
        assert_eq!(got, None);
    });
    assert_eq!(
        (after, left),
        (1, Some(b"1".to_vec())),
        "mover: {progress:?}"
    );
}

/// The mover's `RESTORE` lands (its answer held), then a map's `DEL`
/// deletes the key on both owners (its mark replaces the mover's record).
/// The mover finds the old copy gone and its record not its own: it counts
/// the key as moved, though it was deleted (vanished, as before 3daf395).
#[test]
fn a_key_deleted_after_the_movers_copy_counts_as_vanished() {
    let s = Setup::start();
    let k = s.key("gone", 0);
    s.old.routing_client().set(&k, "v").expect("SET");
    s.proxy.set_fault(Fault::HoldReplies);
    let mover = s.spawn_mover();
    let on_new = s.on_new();
    while on_new.get(&k).expect("GET").is_none() {
        std::thread::yield_now();
    }
    assert_eq!(s.app.routing_client().del(&[k.as_str()]).expect("DEL"), 1);
    s.proxy.set_fault(Fault::None);
    let p = mover.join().expect("mover").expect("move").progress;
    assert_eq!(on_new.get(&k).expect("GET"), None);
    assert_eq!((p.moved, p.vanished), (0, 1), "{p:?}");
}

/// Not new in 3daf395, but against the README's rules ("a command that
/// modifies a key the new owner lacks moves it there first") and the
/// record's ("writes drop the key's record"): the async client's
/// `execute_commands` sends every call as is to the new owner, so an INCR
/// of a key still on its old owner (42) starts from nothing (1), and the
/// mover then deletes the old copy (the new owner "had" the key): the
/// value is lost. The sync `execute_commands` moves first (43).
#[test]
fn async_execute_commands_moves_a_key_before_modifying_it() {
    let s = Setup::start();
    let k = s.key("aec", 0);
    s.old.routing_client().set(&k, 42).expect("SET");
    let out = s
        .app
        .async_client()
        .execute_commands([(k.clone(), vec![rb::cmd("INCR").arg(&k).into()])])
        .wait()
        .expect("execute_commands");
    let n = out[&k][0].clone().expect("INCR");
    assert_eq!(n, rb::Value::Int(43));
}

/// The same for a script run through the migrating routing client
/// (`execute_script` goes to the new owner as is).
#[test]
fn a_script_on_a_migrating_cluster_moves_its_key_first() {
    let s = Setup::start();
    let k = s.key("scr", 0);
    s.old.routing_client().set(&k, 42).expect("SET");
    let script = rb::Script::new("return redis.call('INCR', KEYS[1])");
    let n: i64 = s
        .app
        .routing_client()
        .execute_script(script.call(&[k.as_str()], &[] as &[&str]))
        .expect("script");
    assert_eq!(n, 43);
}

/// Control for the tests above: a map's `DEL` (marked) keeps the late
/// copy out, so the harness itself sees 1.
#[test]
fn control_a_maps_del_during_a_dump_restore_move_stays_deleted() {
    let (after, left, progress) = incr_after_a_late_copy(|s, k| {
        assert_eq!(s.app.routing_client().del(&[k]).expect("DEL"), 1);
    });
    assert_eq!(
        (after, left),
        (1, Some(b"1".to_vec())),
        "mover: {progress:?}"
    );
}

/// Not new in 3daf395: a migrating map defers a `DEL` of a key in transit
/// to after its join, while a `SET` is sent at once, so `DEL k; SET k v`
/// in one map ends with the key deleted (a plain map keeps the order).
#[test]
fn a_del_then_set_in_one_migrating_map_keeps_the_set() {
    let s = Setup::start();
    let k = s.key("order", 0);
    s.old.routing_client().set(&k, "old").expect("SET");
    s.app
        .map(|m| {
            m.del(&[k.as_str()]);
            m.set(&k, "new");
        })
        .expect("map");
    let got = s.app.routing_client().get(&k).expect("GET");
    assert_eq!(got.as_deref(), Some(&b"new"[..]));
}

/// Added after the review (its "related, not tested" note): a `GETDEL`
/// moves the key on write, takes it, and empties it on the new owner while
/// the mover's late copy (DUMPed before) is in flight; the copy landed
/// and the next INCR saw the deleted value (43). A command that may empty
/// its key now marks it deleted first.
#[test]
fn a_getdel_during_a_dump_restore_move_stays_deleted() {
    let (after, left, progress) = incr_after_a_late_copy(|s, k| {
        let got: Option<String> = s
            .app
            .routing_client()
            .cmd(rb::cmd("GETDEL").arg(k))
            .expect("GETDEL");
        assert_eq!(got.as_deref(), Some("42"));
    });
    assert_eq!(
        (after, left),
        (1, Some(b"1".to_vec())),
        "mover: {progress:?}"
    );
}

/// The same through the async client.
#[test]
fn an_async_getdel_during_a_dump_restore_move_stays_deleted() {
    let (after, left, progress) = incr_after_a_late_copy(|s, k| {
        let got: Option<String> = s
            .app
            .async_client()
            .cmd(rb::cmd("GETDEL").arg(k))
            .wait()
            .expect("GETDEL");
        assert_eq!(got.as_deref(), Some("42"));
    });
    assert_eq!(
        (after, left),
        (1, Some(b"1".to_vec())),
        "mover: {progress:?}"
    );
}
