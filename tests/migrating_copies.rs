//! The new owner's record of the copies moves placed there
//! (`rb::migrate::COPIES`, src/migrate/copies.rs): a move takes back only a
//! copy that is still its own, so a write of the very value a key had
//! stands through every client, the record is left empty once moves are
//! done, and it never moves itself. Deterministic: a proxy holds the
//! mover's replies while the application runs; every wait is on a key.

mod common;
use common::proxy::Fault;
use common::{migrating_over_tcp, moving_keys, over_tcp, to_host2};
use rb::migrate::{move_keys, MoveOptions, Transfer, COPIES, DELETED};
use rb::testing::TestSetup;
use rb::{Cluster, Commands};

/// Which client writes the key.
#[derive(Clone, Copy, Debug)]
enum Writer {
    Map,
    /// An MSET of two keys in a map (taken apart into SETs).
    MapMset,
    Async,
}

/// The mover is half-way through moving a key (its `RESTORE` done on the
/// new owner, its answer held) when the application writes the key with
/// the value it had; then the mover finds the old copy gone (the write
/// deleted it). Before the record, the mover took "its" copy back by
/// comparing bytes, deleting the acknowledged write (the routing client's
/// case is tests/migrating_review4.rs'). Returns the key's
/// value at the end and whether any record is left.
fn write_the_same_value_during_a_move(writer: Writer) -> (Option<Vec<u8>>, bool) {
    let s = common::MoveThroughProxy::start();
    let k = s.key("same", 0);
    s.old.routing_client().set(&k, "v").expect("SET");
    let mover = s.mover_half_way(&k);
    match writer {
        Writer::Map => s
            .app
            .map(|m| {
                m.set(&k, "v");
            })
            .expect("map"),
        Writer::MapMset => {
            // Two pairs: an MSET of one pair is a plain command.
            let other = s.key("other", 0);
            s.app
                .map(|m| {
                    m.mset(&[(k.as_str(), "v"), (other.as_str(), "w")]);
                })
                .expect("map")
        }
        Writer::Async => s.app.async_client().set(&k, "v").wait().expect("SET"),
    }
    s.proxy.set_fault(Fault::None);
    mover.join().expect("mover thread").expect("move");
    let got: Option<Vec<u8>> = s.app.routing_client().get(&k).expect("GET");
    (got, records_left(&s.direct))
}

/// Whether any server of `cluster` holds the record of copies.
fn records_left(cluster: &Cluster) -> bool {
    cluster.host_ids().into_iter().any(|h| {
        let n: i64 = cluster
            .local_client(h)
            .expect("local")
            .cmd(rb::cmd("EXISTS").arg(COPIES))
            .expect("EXISTS");
        n == 1
    })
}

#[test]
fn the_same_value_written_in_a_map_stands() {
    assert_eq!(
        write_the_same_value_during_a_move(Writer::Map),
        (Some(b"v".to_vec()), false)
    );
}

#[test]
fn the_same_value_written_by_an_mset_in_a_map_stands() {
    assert_eq!(
        write_the_same_value_during_a_move(Writer::MapMset),
        (Some(b"v".to_vec()), false)
    );
}

#[test]
fn the_same_value_written_by_the_async_client_stands() {
    assert_eq!(
        write_the_same_value_during_a_move(Writer::Async),
        (Some(b"v".to_vec()), false)
    );
}

/// Keys moved every way (the mover with `DUMP`/`RESTORE` and with
/// `MIGRATE`, a move on write, copy-forward, a transaction's move) leave
/// no record behind, and every key ends on its new owner.
#[test]
fn moves_leave_no_record() {
    for transfer in [Transfer::DumpRestore, Transfer::Auto] {
        let setup = TestSetup::with_tcp(3, 1).expect("servers");
        let old = over_tcp(&setup, 2);
        let direct = over_tcp(&setup, 3);
        let app = {
            let mut b = Cluster::builder().router(rb::RouterKind::Partition);
            for i in 0..3 {
                b = b.host(i as u32, common::tcp(&setup, i));
            }
            b.migrating_from(&old)
                .copy_forward(true)
                .build()
                .expect("app")
        };
        let keys = moving_keys(&old, &direct, "rec", 200);
        let routing = old.routing_client();
        for k in &keys {
            routing.set(k, "1").expect("SET");
        }
        let r = app.routing_client();
        // A move on write, copy-forward, a transaction's move, the async
        // client's move on write.
        assert_eq!(r.incr(&keys[0]).expect("INCR"), 2);
        let read = r.get(&keys[1]).expect("GET");
        assert_eq!(read.as_deref(), Some(&b"1"[..]));
        let (n,): (i64,) = r
            .transaction(&[keys[2].as_str()], |tx| {
                tx.incr(keys[2].as_str());
                Ok(())
            })
            .expect("transaction");
        assert_eq!(n, 2);
        assert_eq!(
            app.async_client()
                .incr(&keys[3])
                .wait()
                .expect("async INCR"),
            2
        );
        let report = move_keys(&old, &direct, MoveOptions::new().transfer(transfer)).expect("move");
        assert!(
            !records_left(&direct),
            "{transfer:?}: {:?}",
            report.progress
        );
        let plain = direct.routing_client();
        for (i, k) in keys.iter().enumerate() {
            let want: &[u8] = if i == 0 || i == 2 || i == 3 {
                b"2"
            } else {
                b"1"
            };
            let got = plain.get(k).expect("GET");
            assert_eq!(got.as_deref(), Some(want), "{transfer:?}: {k}");
        }
    }
}

/// The records left on an old host (a crashed move's copies, marks of a
/// migration before) are not application keys: the mover neither moves
/// nor counts them. At its end it drops the copies' records whose old copy
/// is gone (a crashed move's leftovers: here `k`, which is nowhere) and
/// keeps the others (a move half-way: `rm0`, still on its old owner).
#[test]
fn the_record_itself_is_never_moved() {
    let setup = TestSetup::with_tcp(3, 1).expect("servers");
    let old = over_tcp(&setup, 2);
    let direct = over_tcp(&setup, 3);
    // Keys moving to host 2 only (a key moving to another old host would
    // be seen again there).
    let keys: Vec<String> = (0..20).map(|i| to_host2(&old, &direct, "rm", i)).collect();
    for k in &keys {
        old.routing_client().set(k, "1").expect("SET");
    }
    let field = |h: u32, record: &str, key: &str| -> Option<String> {
        old.local_client(h)
            .expect("local")
            .cmd(rb::cmd("HGET").arg(record).arg(key))
            .expect("HGET")
    };
    for h in old.host_ids() {
        for (record, key) in [(COPIES, "k"), (DELETED, "k"), (COPIES, keys[0].as_str())] {
            let _: i64 = old
                .local_client(h)
                .expect("local")
                .cmd(rb::cmd("HSET").arg(record).arg(key).arg("t"))
                .expect("HSET");
        }
    }
    // keys[0]'s record: the mover moves the key (its old copy goes), so
    // at its end the record is a leftover too.
    let report = move_keys(&old, &direct, MoveOptions::new()).expect("move");
    assert_eq!(report.progress.scanned, 20, "{:?}", report.progress);
    for h in old.host_ids() {
        assert_eq!(field(h, DELETED, "k").as_deref(), Some("t"), "host {h}");
        assert_eq!(field(h, COPIES, "k"), None, "host {h}: swept");
        assert_eq!(field(h, COPIES, &keys[0]), None, "host {h}: swept");
    }
    let on_new: i64 = direct
        .local_client(2)
        .expect("local")
        .cmd(rb::cmd("EXISTS").arg(COPIES).arg(DELETED))
        .expect("EXISTS");
    assert_eq!(on_new, 0, "nothing moved to the new host");
}

/// A record of a copy whose old copy is still there (a client's move
/// half-way) is not swept by the mover's end; a record of a key the mover
/// finds on its new owner is dropped before the old copy goes.
#[test]
fn a_record_of_a_move_half_way_is_kept() {
    let setup = TestSetup::with_tcp(3, 1).expect("servers");
    let old = over_tcp(&setup, 2);
    let direct = over_tcp(&setup, 3);
    let k = to_host2(&old, &direct, "half", 0);
    let on_new = direct.local_client(2).expect("local");
    // The new owner has a recorded copy, the old owner its own: the mover
    // finds the key there, drops the record, deletes the old copy.
    old.routing_client().set(&k, "1").expect("SET");
    on_new.set(&k, "1").expect("SET");
    let _: i64 = on_new
        .cmd(rb::cmd("HSET").arg(COPIES).arg(k.as_str()).arg("t"))
        .expect("HSET");
    // A record on a host of a key whose old copy is there (the key stays
    // on that server: as for a move half-way, the old copy exists).
    let stays = common::staying_keys(&old, &direct, "st", 1).remove(0);
    old.routing_client().set(&stays, "1").expect("SET");
    let host = common::host_of(&old, &stays);
    let _: i64 = old
        .local_client(host)
        .expect("local")
        .cmd(rb::cmd("HSET").arg(COPIES).arg(stays.as_str()).arg("t"))
        .expect("HSET");
    move_keys(&old, &direct, MoveOptions::new()).expect("move");
    let held: Option<String> = old
        .local_client(host)
        .expect("local")
        .cmd(rb::cmd("HGET").arg(COPIES).arg(stays.as_str()))
        .expect("HGET");
    assert_eq!(held.as_deref(), Some("t"), "its old copy is there");
    let found: Option<String> = on_new
        .cmd(rb::cmd("HGET").arg(COPIES).arg(k.as_str()))
        .expect("HGET");
    assert_eq!(found, None, "found by the mover: dropped");
}

/// A user whose ACL key patterns exclude the record: a migrating cluster's
/// writes still write (the record's drop is refused and ignored), and a
/// move fails with an error that names the refusal, the host and the
/// command.
#[test]
fn without_access_to_the_record_writes_still_write() {
    let setup = TestSetup::with_tcp(3, 1).expect("servers");
    let old = over_tcp(&setup, 2);
    let direct = over_tcp(&setup, 3);
    let app = migrating_over_tcp(&setup, &old);
    let keys = moving_keys(&old, &direct, "acl", 2);
    for k in &keys {
        old.routing_client().set(k, "1").expect("SET");
    }
    for i in direct.host_ids() {
        let _: String = direct
            .local_client(i)
            .expect("local")
            .cmd(
                rb::cmd("ACL")
                    .arg("SETUSER")
                    .arg("default")
                    .arg("resetkeys")
                    .arg("~acl*"),
            )
            .expect("ACL");
    }
    app.map(|m| {
        m.set(&keys[0], "2");
    })
    .expect("a map's SET");
    app.routing_client().set(&keys[0], "3").expect("SET");
    app.async_client()
        .set(&keys[0], "4")
        .wait()
        .expect("async SET");
    let got = app.routing_client().get(&keys[0]).expect("GET");
    assert_eq!(got.as_deref(), Some(&b"4"[..]));
    let e = app
        .routing_client()
        .incr(&keys[1])
        .expect_err("a move needs the record");
    let text = e.to_string();
    assert!(
        text.contains("NOPERM") && text.contains("EVAL") && text.contains("127.0.0.1"),
        "{text}"
    );
}

/// A mark of a delete older than the key's copy on its old host (a delete
/// made long before, the key written again there since, say by a client
/// that does not migrate) does not stop a move: the old copy is still
/// there, so the mark is stale; it goes and the key moves, through the
/// mover, a move on write and the async client's move on write.
#[test]
fn a_stale_mark_of_a_delete_does_not_stop_a_move() {
    let setup = TestSetup::with_tcp(3, 1).expect("servers");
    let old = over_tcp(&setup, 2);
    let direct = over_tcp(&setup, 3);
    let app = migrating_over_tcp(&setup, &old);
    let keys: Vec<String> = (0..3)
        .map(|i| to_host2(&old, &direct, "stale", i))
        .collect();
    let on_new = direct.local_client(2).expect("local");
    for k in &keys {
        old.routing_client().set(k, "5").expect("SET");
        let _: i64 = on_new
            .cmd(
                rb::cmd("HSET")
                    .arg(COPIES)
                    .arg(k.as_str())
                    .arg("d:long-ago"),
            )
            .expect("HSET");
    }
    assert_eq!(app.routing_client().incr(&keys[0]).expect("INCR"), 6);
    assert_eq!(
        app.async_client()
            .incr(&keys[1])
            .wait()
            .expect("async INCR"),
        6
    );
    let report = move_keys(
        &old,
        &direct,
        MoveOptions::new().transfer(Transfer::DumpRestore),
    )
    .expect("move");
    assert_eq!(report.progress.moved, 1, "{:?}", report.progress);
    let values: Vec<Option<Vec<u8>>> = keys.iter().map(|k| on_new.get(k).expect("GET")).collect();
    assert_eq!(
        values,
        [
            Some(b"6".to_vec()),
            Some(b"6".to_vec()),
            Some(b"5".to_vec())
        ]
    );
    assert!(!records_left(&direct));
    assert!(!records_left(&old));
}
