//! Review of bf8151b/87f8de0 (a migrating map keeps each GET's encoded
//! argument, its slot is the byte offset of it, and the old owner's GET is
//! rebuilt from those bytes with `Cmd::get_encoded`; host names snapshot;
//! the GET check before the multi-key split). Scenarios against real
//! servers: odd keys whose encoding a wrong offset or a wrong part count
//! would show, GETs of other arities, typed final nils.

use std::time::Duration;

mod common;
use common::over_unix_speaking as over;
use rb::testing::TestSetup;
use rb::{Cluster, Commands, HostId, MapOptions, Protocol, Value};

fn host(c: &Cluster, key: &[u8]) -> HostId {
    c.router()
        .expect("router")
        .host_for_key(key)
        .expect("route")
}

/// Keys that move, built from `base` plus a counter (so each is unique and
/// in transit), with the counter placed after `base`.
fn odd_keys(old: &Cluster, new: &Cluster, tag: &str) -> Vec<Vec<u8>> {
    let bases: Vec<Vec<u8>> = vec![
        Vec::new(),                                 // (empty: only if it moves)
        b"a\r\nb".to_vec(),                         // CRLF inside
        b"$3\r\nGET\r\n".to_vec(),                  // looks like an encoded part
        b"*2\r\n$3\r\nGET\r\n$1\r\nx\r\n".to_vec(), // looks like a command
        vec![0, 0xff, b'\r', 0xfe, b'$'],
        b"\r\n".to_vec(),
        vec![b'k'; 8], // lengths around the 1/2/3 digit edges
        vec![b'k'; 9],
        vec![b'k'; 98],
        vec![b'k'; 99],
        vec![b'l'; 100_000],
    ];
    let mut out = Vec::new();
    for base in bases {
        let mut found = 0;
        for i in 0.. {
            let mut k = base.clone();
            k.extend_from_slice(format!("{tag}{i}").as_bytes());
            if host(old, &k) != host(new, &k) {
                out.push(k);
                found += 1;
                if found == 2 {
                    break;
                }
            }
        }
    }
    // The empty key itself, when it moves.
    if host(old, b"") != host(new, b"") {
        out.push(Vec::new());
    }
    out
}

/// Values: the key's own bytes reversed plus a marker, so another key's
/// reply shows.
fn value_of(k: &[u8]) -> Vec<u8> {
    let mut v: Vec<u8> = k.iter().rev().copied().collect();
    v.extend_from_slice(b"#v");
    v
}

fn odd_keys_rounds(protocol: Protocol, opts: MapOptions) {
    let setup = TestSetup::new(3, 1).expect("servers");
    let old = over(&setup, 2, None, protocol);
    let new = over(&setup, 3, Some(&old), protocol);
    let on_old = odd_keys(&old, &new, "o");
    let on_new = odd_keys(&old, &new, "n");
    let nowhere = odd_keys(&old, &new, "z");
    let oldc = old.routing_client();
    for k in &on_old {
        let _: Value = oldc
            .cmd(rb::cmd("SET").arg(k.as_slice()).arg(value_of(k)))
            .expect("SET old");
    }
    for k in &on_new {
        let _: Value = new
            .local_client(host(&new, k))
            .expect("local")
            .cmd(rb::cmd("SET").arg(k.as_slice()).arg(value_of(k)))
            .expect("SET new");
    }
    // One key staying on each new host, read after the GETs.
    let stay: Vec<String> = (0..3u32)
        .map(|h| {
            (0..)
                .map(|i| format!("st{i}"))
                .find(|k| host(&new, k.as_bytes()) == h)
                .expect("key")
        })
        .collect();
    for k in &stay {
        let _: Value = new
            .local_client(host(&new, k.as_bytes()))
            .expect("local")
            .cmd(rb::cmd("SET").arg(k.as_str()).arg(value_of(k.as_bytes())))
            .expect("SET stay");
    }
    let m = new.mapping_client(opts);
    for round in 0..4 {
        let mut expect = Vec::new();
        for (keys, present) in [(&on_old, true), (&nowhere, false), (&on_new, true)] {
            for k in keys.iter() {
                // Twice each, once through an MGET (taken apart per key).
                expect.push((k.clone(), present, m.get(k.as_slice())));
            }
        }
        let all: Vec<&[u8]> = on_old
            .iter()
            .chain(&nowhere)
            .chain(&on_new)
            .map(Vec::as_slice)
            .collect();
        let mget: rb::Promise<Vec<Option<Vec<u8>>>> =
            m.cmd(rb::cmd("MGET").args_from(all.iter().copied()));
        // A plain command after the GETs on every host (old and new): its
        // reply shows a connection whose stream got out of step.
        let pings: Vec<(String, rb::Promise<Option<Vec<u8>>>)> = stay
            .iter()
            .map(|k| (k.clone(), m.get(k.as_str())))
            .collect();
        let r = m.join(Some(Duration::from_secs(20)));
        assert!(r.is_ok(), "round {round}: join {r:?}");
        for (k, present, p) in &expect {
            let got = p.value().expect("GET");
            let want = present.then(|| value_of(k));
            assert_eq!(
                got,
                want,
                "round {round}: key {:?}",
                String::from_utf8_lossy(k)
            );
        }
        let got = mget.value().expect("MGET");
        for (k, v) in all.iter().zip(&got) {
            let present = !nowhere.iter().any(|n| n.as_slice() == *k);
            assert_eq!(
                v.clone(),
                present.then(|| value_of(k)),
                "round {round}: MGET"
            );
        }
        for (k, p) in pings {
            assert_eq!(
                p.value().expect("GET stay"),
                Some(value_of(k.as_bytes())),
                "{k}"
            );
        }
    }
    drop(m);
    // The old servers' connections are still in step.
    for i in 0..2u32 {
        let c = old.local_client(i).expect("local");
        let v: Value = c.cmd(rb::cmd("PING")).expect("PING");
        assert!(
            matches!(v, Value::SimpleString(ref s) if s == "PONG"),
            "{v:?}"
        );
    }
}

#[test]
fn odd_keys_resp2_batched() {
    odd_keys_rounds(Protocol::Resp2, MapOptions::new());
}

#[test]
fn odd_keys_resp3_unbatched_one_host_at_a_time() {
    odd_keys_rounds(
        Protocol::Resp3,
        MapOptions::new().auto_batch(false).max_concurrency(1),
    );
}

/// GETs of 0 and 2 arguments among migrating GETs of keys in transit:
/// each gets the server's (or the router's) error, the others their own
/// values, and the connections stay in step.
#[test]
fn gets_of_other_arities_among_misses() {
    let setup = TestSetup::new(3, 1).expect("servers");
    let old = over(&setup, 2, None, Protocol::Resp2);
    let new = over(&setup, 3, Some(&old), Protocol::Resp2);
    let ks: Vec<String> = (0..)
        .map(|i| format!("ar{i}"))
        .filter(|k| host(&old, k.as_bytes()) != host(&new, k.as_bytes()))
        .take(20)
        .collect();
    for k in &ks[..10] {
        old.routing_client().set(k, k.as_str()).expect("SET");
    }
    for opts in [
        MapOptions::new(),
        MapOptions::new().auto_batch(false),
        MapOptions::new().max_batch_size(2).max_concurrency(1),
    ] {
        let m = new.mapping_client(opts);
        let mut ps = Vec::new();
        let mut odd = Vec::new();
        for (i, k) in ks.iter().enumerate() {
            ps.push((i, m.get(k.as_str())));
            let two: rb::Promise<Value> = m.cmd(
                rb::cmd("GET")
                    .arg(k.as_str())
                    .arg(ks[(i + 1) % 20].as_str()),
            );
            let none: rb::Promise<Value> = m.cmd(rb::cmd("GET"));
            let three: rb::Promise<Value> = m.cmd(rb::cmd("get").arg(k.as_str()).arg("").arg("x"));
            odd.push((two, none, three));
        }
        let r = m.join(Some(Duration::from_secs(10)));
        println!("join: {r:?}");
        for (i, p) in &ps {
            let want = (*i < 10).then(|| ks[*i].as_bytes().to_vec());
            assert_eq!(p.value().expect("GET"), want, "{}", ks[*i]);
        }
        for (two, none, three) in &odd {
            assert!(two.value().is_err(), "GET of two keys: {:?}", two.value());
            assert!(none.value().is_err(), "GET of none: {:?}", none.value());
            assert!(three.value().is_err(), "GET of three: {:?}", three.value());
        }
        // The same client, once more: in step.
        let again: Vec<_> = ks.iter().map(|k| m.get(k.as_str())).collect();
        m.join(Some(Duration::from_secs(10))).expect("join again");
        for (i, p) in again.iter().enumerate() {
            let want = (i < 10).then(|| ks[i].as_bytes().to_vec());
            assert_eq!(p.value().expect("GET again"), want);
        }
    }
}

/// `GET` into `i64` of keys that are nowhere (in transit, and staying):
/// the conversion's failure names the key's new owner and GET, as a
/// plain map's does.
#[test]
fn typed_final_nil_names_new_owner_and_get() {
    let setup = TestSetup::new(3, 1).expect("servers");
    let old = over(&setup, 2, None, Protocol::Resp2);
    let new = over(&setup, 3, Some(&old), Protocol::Resp2);
    let plain = over(&setup, 3, None, Protocol::Resp2);
    let moving: Vec<String> = (0..)
        .map(|i| format!("fn{i}"))
        .filter(|k| host(&old, k.as_bytes()) != host(&new, k.as_bytes()))
        .take(6)
        .collect();
    let staying: Vec<String> = (0..)
        .map(|i| format!("fs{i}"))
        .filter(|k| host(&old, k.as_bytes()) == host(&new, k.as_bytes()))
        .take(3)
        .collect();
    // Twice: the second map knows the old hosts' epochs (no recheck); the
    // first rechecks.
    for pass in 0..2 {
        let m = new.mapping_client(MapOptions::new());
        let ps: Vec<(String, rb::Promise<i64>)> = moving
            .iter()
            .chain(&staying)
            .map(|k| (k.clone(), m.cmd(rb::cmd("GET").arg(k.as_str()))))
            .collect();
        let r = m.join(Some(Duration::from_secs(5)));
        assert!(r.is_err(), "pass {pass}");
        for (k, p) in &ps {
            let e = p.reason().expect("an error");
            let pm = plain.mapping_client(MapOptions::new());
            let pp: rb::Promise<i64> = pm.cmd(rb::cmd("GET").arg(k.as_str()));
            let _ = pm.join(Some(Duration::from_secs(5)));
            let pe = pp.reason().expect("plain error");
            println!("pass {pass} {k}: {e} / plain: {pe}");
            let h = e
                .host()
                .unwrap_or_else(|| panic!("pass {pass}: {k}: no host in {e:?}"));
            assert_eq!(h.id, host(&new, k.as_bytes()), "{k}");
            assert_eq!(Some(h), pe.host(), "{k}");
            assert!(
                matches!(&e, rb::Error::Type { command: Some(c), .. } if &**c == "GET"),
                "{e:?}"
            );
        }
    }
}
