//! Interleavings a review of 877c5b0 found still losing a key (each test
//! failed there): the async client's move on write deleting an old copy it
//! did not copy (fixed); a client's move stalled past the mover's grace
//! for same copies (then `SAME_COPY_GRACE`, 2 s) taking its copy back, and
//! the mover taking back an overwrite that wrote the same value (both were
//! open, ignored, until the new owner's record of copies,
//! `rb::migrate::COPIES`: a move takes back only a copy still recorded as
//! its own, which a write or another move's find drops). Each test is
//! deterministic: the proxies of tests/common/proxy.rs hold one party's
//! replies while another runs, and every wait is on an event a server
//! shows (a command count, a key).

mod common;
use common::{over_tcp, to_host2, with_host2_through};

use common::command_calls;
use common::proxy::{Fault, Proxy};
use rb::migrate::{move_keys, MoveOptions, Transfer};
use rb::testing::TestSetup;
use rb::Commands;

/// The async client's move on write (`move_key`, src/client/migrating.rs)
/// still deletes the old copy when its `RESTORE` finds the new owner
/// holding the key (BUSYKEY): "only the one who copied a key deletes its
/// old copy at once" was applied to `move_now` only. So the lost key of
/// tests/migrating_review3.rs is still lost, the other way round:
///
/// 1. the async client's `EXPIRE` asks the new owner `EXISTS`: 0;
/// 2. the mover `RESTORE`s the key there (its reply held: the mover is
///    now half-way, its compare-and-delete on the old host to come);
/// 3. the client's `DUMP`/`RESTORE`: BUSYKEY; it deletes the old copy
///    anyway, and runs `EXPIRE` on the new owner (the value is unchanged);
/// 4. the mover's compare-and-delete finds the old copy gone, takes that
///    for a delete made during its copy, and deletes its copy from the new
///    owner: the key, which nobody deleted, is nowhere.
#[test]
fn an_async_move_on_write_racing_the_mover_keeps_the_key() {
    let (on_old, left, progress) = move_on_write_racing_the_mover(true);
    assert_eq!(
        (on_old, left),
        (None, Some(b"v".to_vec())),
        "nobody deleted the key; the mover's report: {progress:?}"
    );
}

/// Control for the test above: the same interleaving with the routing
/// client (a map's `move_now`, fixed by 877c5b0) keeps the key.
#[test]
fn control_a_map_move_on_write_racing_the_mover_keeps_the_key() {
    let (on_old, left, progress) = move_on_write_racing_the_mover(false);
    assert_eq!(
        (on_old, left),
        (None, Some(b"v".to_vec())),
        "the mover's report: {progress:?}"
    );
}

/// The interleaving of [`an_async_move_on_write_racing_the_mover_keeps_the_key`]
/// with the async client (`use_async`) or the routing client; what is
/// left on the old owner, on the new one, and the mover's report.
fn move_on_write_racing_the_mover(
    use_async: bool,
) -> (Option<Vec<u8>>, Option<Vec<u8>>, rb::migrate::MoveProgress) {
    let setup = TestSetup::with_tcp(3, 1).expect("servers");
    let old = over_tcp(&setup, 2);
    let direct = over_tcp(&setup, 3);
    let (pc, pm) = (
        Proxy::to_unix(setup.socket(2)),
        Proxy::to_unix(setup.socket(2)),
    );
    // The application's migrating cluster, and the mover's new cluster,
    // each reach server 2 through its own proxy.
    let app = with_host2_through(&setup, &pc, Some(&old));
    let mover_new = with_host2_through(&setup, &pm, None);
    let k = to_host2(&old, &direct, "am", 0);
    old.routing_client().set(&k, "v").expect("SET");
    // Warm the connections to server 2.
    let a = app.async_client();
    let warm = to_host2(&old, &direct, "am", 1);
    assert_eq!(a.get(warm.as_str()).wait().expect("GET"), None);
    let none: Option<Vec<u8>> = app.routing_client().get(&warm).expect("GET");
    assert_eq!(none, None);
    let _: String = mover_new
        .local_client(2)
        .expect("local")
        .cmd(rb::cmd("PING"))
        .expect("PING");
    let on_new = direct.local_client(2).expect("local");
    let exists_before = command_calls(&direct, 2, "exists");
    // 1. The client's EXISTS runs on server 2; its answer (0) is held.
    pc.set_fault(Fault::HoldReplies);
    let client = {
        let (a, app, k) = (a.clone(), app.clone(), k.clone());
        std::thread::spawn(move || {
            if use_async {
                a.expire(k.as_str(), 1000).wait()
            } else {
                app.routing_client().expire(k.as_str(), 1000)
            }
        })
    };
    while command_calls(&direct, 2, "exists") == exists_before {
        std::thread::yield_now();
    }
    // 2. The mover's RESTORE runs on server 2; its answer is held.
    pm.set_fault(Fault::HoldReplies);
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
    while on_new.get(&k).expect("GET").is_none() {
        std::thread::yield_now();
    }
    // 3. The client goes on: BUSYKEY (the async client then deletes the
    // old copy), EXPIRE on the new owner.
    pc.set_fault(Fault::None);
    let expired = client.join().expect("client thread").expect("EXPIRE");
    assert!(expired, "the key existed when EXPIRE ran");
    // 4. The mover goes on.
    pm.set_fault(Fault::None);
    let report = mover.join().expect("mover thread").expect("move");
    let on_old: Option<Vec<u8>> = old.routing_client().get(&k).expect("GET old");
    let left = on_new.get(&k).expect("GET new");
    (on_old, left, report.progress)
}

/// `SAME_COPY_GRACE` was a fixed 2 s, but nothing bounds how long a
/// client's move stays half-way (its `RESTORE` done, its compare-and-delete
/// of the old copy not yet): a client whose connection stalls (here its
/// `RESTORE`'s answer is held) past the grace finds the old copy gone (the
/// mover deleted it as a crashed move's leftover), takes that for a delete
/// and deletes its copy: the key is lost. Here the client's move is a
/// transaction's (`move_in_transit` -> `move_now`), released once the
/// mover has finished (it waits out the grace before it returns).
#[test]
fn a_client_move_stalled_past_the_grace_keeps_the_key() {
    let setup = TestSetup::with_tcp(3, 1).expect("servers");
    let old = over_tcp(&setup, 2);
    let direct = over_tcp(&setup, 3);
    let pc = Proxy::to_unix(setup.socket(2));
    let app = with_host2_through(&setup, &pc, Some(&old));
    let k = to_host2(&old, &direct, "gr", 0);
    old.routing_client().set(&k, "v").expect("SET");
    let _: String = app
        .local_client(2)
        .expect("local")
        .cmd(rb::cmd("PING"))
        .expect("PING");
    pc.set_fault(Fault::HoldReplies);
    let tx = {
        let (app, k) = (app.clone(), k.clone());
        std::thread::spawn(move || {
            app.routing_client()
                .transaction::<(Option<Vec<u8>>,), _, _>(&[k.as_str()], |tx| {
                    tx.get(k.as_str());
                    Ok(())
                })
        })
    };
    // The client's RESTORE has run on server 2 (its answer is held).
    let on_new = direct.local_client(2).expect("local");
    while on_new.get(&k).expect("GET").is_none() {
        std::thread::yield_now();
    }
    // The mover finds the same value on both, waits SAME_COPY_GRACE and
    // deletes the old copy.
    let report = move_keys(
        &old,
        &direct,
        MoveOptions::new().transfer(Transfer::DumpRestore),
    )
    .expect("move");
    pc.set_fault(Fault::None);
    let got = tx.join().expect("thread").map(|(v,)| v);
    let left = on_new.get(&k).expect("GET");
    assert_eq!(
        (got.ok(), left),
        (Some(Some(b"v".to_vec())), Some(b"v".to_vec())),
        "the key existed throughout and was never deleted; mover: {:?}",
        report.progress
    );
}

/// A migrating overwrite (`SET` on the new owner, then `DEL` of the old
/// copy) that writes the value the key already had, while the mover is
/// half-way (its `RESTORE` done, its compare-and-delete to come): the
/// mover finds the old copy gone, takes it for a delete made during its
/// copy, and deletes "its" copy from the new owner, which is byte for byte
/// the caller's acknowledged write. (Older than 877c5b0: the undo cannot
/// tell its own copy from an equal write; `MIGRATE` has no undo.)
#[test]
fn an_overwrite_with_the_same_value_stands() {
    let s = common::MoveThroughProxy::start();
    let k = s.key("ow", 0);
    s.old.routing_client().set(&k, "v").expect("SET");
    let mover = s.mover_half_way(&k);
    // The application writes the key (the same value it had).
    s.app.routing_client().set(&k, "v").expect("SET");
    s.proxy.set_fault(Fault::None);
    let report = mover.join().expect("mover thread").expect("move");
    let got: Option<Vec<u8>> = s.app.routing_client().get(&k).expect("GET");
    assert_eq!(
        got,
        Some(b"v".to_vec()),
        "a SET acknowledged before the move ended; mover: {:?}",
        report.progress
    );
}
