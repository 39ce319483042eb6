//! Defects a review found in 522c5c7, which marked a migrating cluster's
//! deletes with `rb:deleted:<key>` keys so that a move would take its copy
//! back only after a marked delete (each test failed there): a delete after
//! a move on write (or a GETDEL) was undone by the mover's late copy, user
//! keys with the mark's prefix were never moved or were clobbered, deletes
//! failed under ACLs without EVAL or with key patterns. The marks were
//! reverted (a move takes its copy back whenever its old copy vanished, as
//! before); these tests keep them from coming back in that form. The last
//! one is older; it was open (ignored) until the new owner's record of
//! copies (`rb::migrate::COPIES`), where a `SET` drops the mover's record. Deterministic: a proxy holds the
//! mover's `RESTORE` (Fault::Hold) while the application runs; every wait
//! is on an event the proxy shows (bytes received).

mod common;
use common::{migrating_over_tcp, over_tcp, to_host2, with_host2_through};

use common::host_of;
use common::proxy::{Fault, Proxy};
use rb::migrate::{move_keys, MoveOptions, Transfer};

/// The prefix of the marks a reverted change set on deletes.
const DELETED_MARK_PREFIX: &str = "rb:deleted:";
use rb::testing::TestSetup;
use rb::Commands;

/// How the application makes the key go away after moving it.
#[derive(Clone, Copy)]
#[allow(clippy::enum_variant_names)]
enum Gone {
    /// `EXPIRE` (a move on write), then `DEL`, routing client.
    MoveThenDel,
    /// The same through the async client.
    AsyncMoveThenDel,
    /// `GETDEL` (a move on write, then the delete on the new owner).
    GetDel,
}

/// The mover DUMPs the key, its RESTORE is held at a proxy; meanwhile the
/// application moves the key itself (move on write) and deletes it. Then
/// the mover's RESTORE lands on the empty new owner, its compare-and-delete
/// finds the old copy gone without a mark (the application's delete found
/// nothing on the old host, or ran on the new owner only) and keeps its
/// copy. Returns what is left on the new owner, and the delete's count.
fn deleted_key_after_a_late_restore(how: Gone) -> (Option<Vec<u8>>, i64, String) {
    let setup = TestSetup::with_tcp(3, 1).expect("servers");
    let old = over_tcp(&setup, 2);
    let direct = over_tcp(&setup, 3);
    let pm = Proxy::to_unix(setup.socket(2));
    let mover_new = with_host2_through(&setup, &pm, None);
    let app = migrating_over_tcp(&setup, &old);
    let k = to_host2(&old, &direct, "late", 0);
    old.routing_client().set(&k, "v").expect("SET");
    // Warm the mover's connection to server 2, then hold everything.
    let _: String = mover_new
        .local_client(2)
        .expect("local")
        .cmd(rb::cmd("PING"))
        .expect("PING");
    let before = pm.received_bytes();
    pm.set_fault(Fault::Hold);
    let mover = {
        let (old, new) = (old.clone(), mover_new.clone());
        std::thread::spawn(move || {
            move_keys(
                &old,
                &new,
                MoveOptions::new().transfer(Transfer::DumpRestore),
            )
        })
    };
    // The mover has DUMPed the key and sent its RESTORE (held).
    while pm.received_bytes() == before {
        std::thread::yield_now();
    }
    let deleted = match how {
        Gone::MoveThenDel => {
            let r = app.routing_client();
            assert!(
                r.expire(k.as_str(), 1000).expect("EXPIRE"),
                "moved on write"
            );
            r.del(&[k.as_str()]).expect("DEL")
        }
        Gone::AsyncMoveThenDel => {
            let a = app.async_client();
            assert!(a.expire(k.as_str(), 1000).wait().expect("EXPIRE"));
            a.del(&[k.as_str()]).wait().expect("DEL")
        }
        Gone::GetDel => {
            let got = app.routing_client().getdel(k.as_str()).expect("GETDEL");
            assert_eq!(got.as_deref(), Some(&b"v"[..]));
            1
        }
    };
    let on_new = direct.local_client(2).expect("local");
    assert_eq!(
        on_new.get(&k).expect("GET"),
        None,
        "deleted on the new owner"
    );
    pm.set_fault(Fault::None);
    let report = mover.join().expect("mover thread").expect("move");
    let left = on_new.get(&k).expect("GET");
    (left, deleted, format!("{:?}", report.progress))
}

/// A `DEL` of a key a client had already moved (move on write): the old
/// host has nothing to delete, so `DELETE_AND_MARK` leaves no mark, and
/// the mover's late copy (DUMPed before the move) stands: the deleted key
/// is back. Before 522c5c7 the mover took its copy back.
#[test]
fn a_delete_after_a_move_on_write_is_not_undone_by_the_movers_late_copy() {
    let (left, deleted, progress) = deleted_key_after_a_late_restore(Gone::MoveThenDel);
    assert_eq!(deleted, 1);
    assert_eq!(
        left, None,
        "DEL returned 1, the key is back; mover: {progress}"
    );
}

/// The same through the async client (`move_key`, then `Access::Delete`).
#[test]
fn an_async_delete_after_a_move_on_write_is_not_undone_by_the_movers_late_copy() {
    let (left, deleted, progress) = deleted_key_after_a_late_restore(Gone::AsyncMoveThenDel);
    assert_eq!(deleted, 1);
    assert_eq!(
        left, None,
        "DEL returned 1, the key is back; mover: {progress}"
    );
}

/// `GETDEL` (a modify: move on write, then the delete on the new owner,
/// which leaves no mark anywhere): the mover's late copy stands again.
/// The same holds for any modify that empties the key (LPOP/SREM/HDEL of
/// the last element, EXPIRE 0) and for a transaction's DEL after
/// `move_in_transit`.
#[test]
fn a_getdel_after_a_move_on_write_is_not_undone_by_the_movers_late_copy() {
    let (left, _, progress) = deleted_key_after_a_late_restore(Gone::GetDel);
    assert_eq!(
        left, None,
        "GETDEL took the key, it is back; mover: {progress}"
    );
}

/// A user key that happens to start with `rb:deleted:` is never moved:
/// the mover skips the prefix, so the key stays on its old host only and is
/// lost when the old cluster is retired.
#[test]
fn a_user_key_with_the_mark_prefix_is_moved() {
    let setup = TestSetup::with_tcp(3, 1).expect("servers");
    let old = over_tcp(&setup, 2);
    let new = over_tcp(&setup, 3);
    let k = to_host2(&old, &new, DELETED_MARK_PREFIX, 0);
    old.routing_client().set(&k, "data").expect("SET");
    let report = move_keys(&old, &new, MoveOptions::new()).expect("move");
    let on_new = new.local_client(2).expect("local").get(&k).expect("GET");
    let on_old: Option<Vec<u8>> = old.routing_client().get(&k).expect("GET");
    assert_eq!(
        (on_old, on_new),
        (None, Some(b"data".to_vec())),
        "{k} after the move: {:?}",
        report.progress
    );
}

/// A migrating `DEL foo` overwrites the user's own key `rb:deleted:foo`
/// (here on a server that is foo's old host and the key's owner in both
/// clusters) with "1" for a minute, after which it is gone.
#[test]
fn a_migrating_delete_does_not_clobber_a_user_key() {
    let setup = TestSetup::with_tcp(3, 1).expect("servers");
    let old = over_tcp(&setup, 2);
    let direct = over_tcp(&setup, 3);
    let app = migrating_over_tcp(&setup, &old);
    let k = (0..)
        .map(|i| format!("clob{i}"))
        .find(|k| {
            let mark = format!("{DELETED_MARK_PREFIX}{k}");
            host_of(&direct, k) == 2
                && host_of(&old, k) != 2
                && host_of(&old, &mark) == host_of(&old, k)
                && host_of(&direct, &mark) == host_of(&old, k)
        })
        .expect("a key");
    let user_key = format!("{DELETED_MARK_PREFIX}{k}");
    let r = app.routing_client();
    // The key on its old host (not moved yet); the user's key where both
    // clusters have it.
    old.routing_client().set(&k, "v").expect("SET");
    r.set(&user_key, "precious").expect("SET");
    assert_eq!(r.del(&[k.as_str()]).expect("DEL"), 1);
    let got: Option<Vec<u8>> = r.get(&user_key).expect("GET");
    let ttl = r.ttl(&user_key).expect("TTL");
    assert_eq!(
        (got, ttl),
        (Some(b"precious".to_vec()), -1),
        "the user's {user_key}"
    );
}

/// An ACL with key patterns (`~app:*`) on the old server: a migrating
/// `DEL app:x` deletes the key there, then the mark's `SET rb:deleted:app:x`
/// is refused, and the caller gets an error for a delete that happened.
/// Before 522c5c7 the same DEL answered 1.
#[test]
fn a_migrating_delete_under_a_key_pattern_acl_answers_its_count() {
    let setup = TestSetup::with_tcp(3, 1).expect("servers");
    let old = over_tcp(&setup, 2);
    let direct = over_tcp(&setup, 3);
    let app = migrating_over_tcp(&setup, &old);
    let k = to_host2(&old, &direct, "app:", 0);
    old.routing_client().set(&k, "v").expect("SET");
    for i in 0..3 {
        let _: String = direct
            .local_client(i)
            .expect("local")
            .cmd(
                rb::cmd("ACL")
                    .arg("SETUSER")
                    .arg("default")
                    .arg("resetkeys")
                    .arg("~app:*"),
            )
            .expect("ACL");
    }
    let deleted = app.routing_client().del(&[k.as_str()]);
    let on_old: Option<Vec<u8>> = old.routing_client().get(&k).expect("GET old");
    assert_eq!(
        (deleted.map_err(|e| e.to_string()), on_old),
        (Ok(1), None),
        "the key was deleted"
    );
}

/// An ACL without scripting (`-@scripting`) on the old server: a plain
/// migrating `DEL` (no move involved) failed nowhere before 522c5c7; now it
/// is an `EVAL` and is refused.
#[test]
fn a_migrating_delete_without_eval_still_deletes() {
    let setup = TestSetup::with_tcp(3, 1).expect("servers");
    let old = over_tcp(&setup, 2);
    let direct = over_tcp(&setup, 3);
    let app = migrating_over_tcp(&setup, &old);
    let k = to_host2(&old, &direct, "noeval", 0);
    old.routing_client().set(&k, "v").expect("SET");
    for i in 0..3 {
        let _: String = direct
            .local_client(i)
            .expect("local")
            .cmd(
                rb::cmd("ACL")
                    .arg("SETUSER")
                    .arg("default")
                    .arg("-@scripting"),
            )
            .expect("ACL");
    }
    let deleted = app.routing_client().del(&[k.as_str()]);
    assert_eq!(deleted.map_err(|e| e.to_string()), Ok(1));
}

/// Cache invalidation during a move: the mover is half-way (its `RESTORE`
/// done, its answer held), the application `DEL`s the key (old host first:
/// marked) and writes it again with the same bytes (`SET` on the new
/// owner, which the caller is told is done). The mover then finds the old
/// copy gone and marked, and takes "its" copy back by comparing bytes: it
/// deletes the acknowledged `SET`. The commit's "an overwrite with the
/// same value stands" holds only when no delete came first (this one
/// failed before 522c5c7 too).
#[test]
fn a_set_after_a_delete_with_the_same_value_stands() {
    let s = common::MoveThroughProxy::start();
    let k = s.key("inv", 0);
    s.old.routing_client().set(&k, "v").expect("SET");
    let mover = s.mover_half_way(&k);
    let r = s.app.routing_client();
    assert_eq!(r.del(&[k.as_str()]).expect("DEL"), 1);
    r.set(&k, "v").expect("SET");
    s.proxy.set_fault(Fault::None);
    let report = mover.join().expect("mover thread").expect("move");
    let got: Option<Vec<u8>> = r.get(&k).expect("GET");
    assert_eq!(
        got,
        Some(b"v".to_vec()),
        "SET acknowledged after the DEL; mover: {:?}",
        report.progress
    );
}
