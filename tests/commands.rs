//! The typed helpers of [`rb::Commands`] against real servers, through every
//! kind of client: routing, mapping (promises), fanout and local; the
//! multi-key emulation over 32 hosts; RESP3 against RESP2; URLs with
//! databases, passwords and ACL users; and how type mismatches read.
//!
//! Every test spawns its own servers with [`TestSetup`] (unix sockets in a
//! private dir), so the tests run in parallel and never share state.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{SystemTime, UNIX_EPOCH};

use rb::commands::{Condition, Expiry, SetOptions};
use rb::testing::TestSetup;

mod common;
use common::{cluster, host_of};
use rb::{Cluster, Commands, Error, HostConfig, HostId, Hosts, Promise, Protocol, Value};

type Bytes = Vec<u8>;

fn b(s: impl AsRef<str>) -> Bytes {
    s.as_ref().as_bytes().to_vec()
}

fn sb(s: impl AsRef<str>) -> Option<Bytes> {
    Some(b(s))
}

fn bulk(s: impl AsRef<str>) -> Value {
    Value::BulkString(b(s))
}

/// The first key `prefix:N` that the cluster's router puts on `host`.
fn key_on(cluster: &Cluster, host: HostId, prefix: &str) -> String {
    (0..100_000)
        .map(|n| format!("{prefix}:{n}"))
        .find(|k| host_of(cluster, k) == host)
        .expect("some key routes to every host")
}

/// Now, as (unix seconds, unix milliseconds).
fn unix_now() -> (i64, i64) {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    (d.as_secs() as i64, d.as_millis() as i64)
}

/// Every key of one host (`KEYS pattern` through a local client).
fn keys_of(cluster: &Cluster, host: HostId, pattern: &str) -> BTreeSet<String> {
    cluster
        .local_client(host)
        .expect("local client")
        .cmd::<Vec<String>>(rb::cmd("KEYS").arg(pattern))
        .expect("KEYS")
        .into_iter()
        .collect()
}

/// The helpers of the `Commands` trait, read from its source, so that a
/// helper added later without a test here fails `every_typed_helper_once`.
fn trait_methods() -> BTreeSet<String> {
    let src = include_str!("../src/commands.rs");
    let start = src.find("pub trait Commands").expect("the Commands trait");
    let end = start
        + src[start..]
            .find("\nimpl<E: Execute")
            .expect("the blanket impl after the trait");
    src[start..end]
        .lines()
        .filter_map(|l| l.trim().strip_prefix("fn "))
        .map(|rest| {
            rest.chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

/// One `name=value` field of a `CLIENT INFO` line.
fn client_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.split_whitespace()
        .filter_map(|f| f.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn sorted(mut v: Vec<Bytes>) -> Vec<Bytes> {
    v.sort();
    v
}

// ---------------------------------------------------------------------------
// 1. every helper, once, with its real reply
// ---------------------------------------------------------------------------

/// Calls every method of `Commands` against real servers: the keyed ones
/// through the routing client with keys placed on each of the 4 hosts, the
/// keyless server helpers through a local client and `cluster.all`. Each
/// call goes through `call!`, which records the helper's name; at the end
/// the recorded names must be exactly the trait's methods (parsed from
/// `src/commands.rs`).
#[test]
fn every_typed_helper_once() {
    let (setup, cluster) = cluster(2, 2);
    let c = cluster.routing_client();
    let seen: RefCell<BTreeSet<&'static str>> = RefCell::default();
    macro_rules! call {
        ($client:ident . $method:ident $(::<$t:ty>)? ( $($arg:expr),* $(,)? )) => {{
            seen.borrow_mut().insert(stringify!($method));
            $client.$method $(::<$t>)? ( $($arg),* )
        }};
    }
    let on = |host: HostId, prefix: &str| key_on(&cluster, host, prefix);
    let missing = on(2, "missing");
    // (key, the host it must live on, its type), checked with local clients.
    let mut placed: Vec<(String, HostId, &str)> = Vec::new();

    // Strings (host 0).
    let s = on(0, "str");
    call!(c.set(&s, "hello")).unwrap();
    assert_eq!(call!(c.get(&s)).unwrap(), sb("hello"));
    assert_eq!(c.get(&missing).unwrap(), None);
    assert_eq!(call!(c.append(&s, " world")).unwrap(), 11);
    assert_eq!(call!(c.strlen(&s)).unwrap(), 11);
    assert_eq!(c.strlen(&missing).unwrap(), 0);
    assert_eq!(call!(c.getset(&s, "new")).unwrap(), sb("hello world"));
    assert_eq!(c.get(&s).unwrap(), sb("new"));
    assert_eq!(call!(c.getdel(&s)).unwrap(), sb("new"));
    assert_eq!(c.get(&s).unwrap(), None);
    assert_eq!(c.getdel(&s).unwrap(), None);
    assert_eq!(c.getset(&s, "fresh").unwrap(), None);
    c.del(&[&s]).unwrap();
    assert!(call!(c.setnx(&s, "first")).unwrap());
    assert!(!c.setnx(&s, "second").unwrap());
    assert_eq!(c.get(&s).unwrap(), sb("first"));
    placed.push((s.clone(), 0, "string"));

    let sx = on(1, "setex");
    call!(c.setex(&sx, 100, "temp")).unwrap();
    assert_eq!(c.get(&sx).unwrap(), sb("temp"));
    assert!((90..=100).contains(&c.ttl(&sx).unwrap()));
    placed.push((sx.clone(), 1, "string"));

    // SET with every expiry and condition (host 1).
    let sw = on(1, "setwith");
    let (now_s, now_ms) = unix_now();
    assert!(call!(c.set_with(&sw, "plain", SetOptions::new())).unwrap());
    assert_eq!(c.ttl(&sw).unwrap(), -1);
    let ex = SetOptions::new().expiry(Expiry::Seconds(100));
    assert!(c.set_with(&sw, "ex", ex).unwrap());
    assert!((90..=100).contains(&c.ttl(&sw).unwrap()));
    let px = SetOptions::new().expiry(Expiry::Millis(50_000));
    assert!(c.set_with(&sw, "px", px).unwrap());
    assert!((40_000..=50_000).contains(&c.pttl(&sw).unwrap()));
    let exat = SetOptions::new().expiry(Expiry::AtSeconds(now_s as u64 + 200));
    assert!(c.set_with(&sw, "exat", exat).unwrap());
    assert!((190..=200).contains(&c.ttl(&sw).unwrap()));
    let pxat = SetOptions::new().expiry(Expiry::AtMillis(now_ms as u64 + 300_000));
    assert!(c.set_with(&sw, "pxat", pxat).unwrap());
    assert!((290_000..=300_000).contains(&c.pttl(&sw).unwrap()));
    let keep = SetOptions::new().expiry(Expiry::KeepTtl);
    assert!(c.set_with(&sw, "kept", keep).unwrap());
    assert_eq!(c.get(&sw).unwrap(), sb("kept"));
    assert!(
        (290..=300).contains(&c.ttl(&sw).unwrap()),
        "KEEPTTL kept it"
    );
    let nx = SetOptions::new().condition(Condition::IfMissing);
    let xx = SetOptions::new().condition(Condition::IfExists);
    assert!(!c.set_with(&sw, "nx-refused", nx).unwrap());
    assert_eq!(c.get(&sw).unwrap(), sb("kept"));
    assert!(c.set_with(&sw, "xx-ok", xx).unwrap());
    assert_eq!(c.get(&sw).unwrap(), sb("xx-ok"));
    assert_eq!(
        c.ttl(&sw).unwrap(),
        -1,
        "a SET without KEEPTTL drops the TTL"
    );
    let sw2 = on(3, "setwith");
    assert!(!c.set_with(&sw2, "xx-refused", xx).unwrap());
    assert_eq!(c.get(&sw2).unwrap(), None);
    let nx_ex = nx.expiry(Expiry::Seconds(60));
    assert!(c.set_with(&sw2, "nx-ok", nx_ex).unwrap());
    assert_eq!(c.get(&sw2).unwrap(), sb("nx-ok"));
    assert!((50..=60).contains(&c.ttl(&sw2).unwrap()));
    let xx_px = xx.expiry(Expiry::Millis(70_000));
    assert!(c.set_with(&sw2, "xx-px", xx_px).unwrap());
    assert!((60_000..=70_000).contains(&c.pttl(&sw2).unwrap()));
    placed.push((sw.clone(), 1, "string"));
    placed.push((sw2.clone(), 3, "string"));

    // Counters (hosts 2 and 3) and the generic `cmd`.
    let n = on(2, "counter");
    assert_eq!(call!(c.incr(&n)).unwrap(), 1);
    assert_eq!(call!(c.incr_by(&n, 41)).unwrap(), 42);
    assert_eq!(call!(c.decr(&n)).unwrap(), 41);
    assert_eq!(call!(c.decr_by(&n, 50)).unwrap(), -9);
    let by_cmd = call!(c.cmd::<i64>(rb::cmd("INCRBY").arg(&n).arg(9))).unwrap();
    assert_eq!(by_cmd, 0);
    assert_eq!(c.get(&n).unwrap(), sb("0"));
    placed.push((n.clone(), 2, "string"));
    let f = on(3, "float");
    assert_eq!(call!(c.incr_by_float(&f, 1.5)).unwrap(), 1.5);
    assert_eq!(c.incr_by_float(&f, -0.25).unwrap(), 1.25);
    assert_eq!(c.get(&f).unwrap(), sb("1.25"));
    placed.push((f.clone(), 3, "string"));

    // MSET/MGET over all four hosts.
    let multi: Vec<String> = (0..4).map(|h| on(h, "multi")).collect();
    let pairs = [
        (&multi[0], "a"),
        (&multi[1], "b"),
        (&multi[2], "c"),
        (&multi[3], "d"),
    ];
    call!(c.mset(&pairs)).unwrap();
    let got = call!(c.mget(&[&multi[3], &missing, &multi[0], &multi[2], &multi[1]])).unwrap();
    assert_eq!(got, vec![sb("d"), None, sb("a"), sb("c"), sb("b")]);
    for (h, k) in multi.iter().enumerate() {
        assert_eq!(
            keys_of(&cluster, h as HostId, "multi:*"),
            BTreeSet::from([k.clone()])
        );
    }

    // Keys and expiry.
    let all_multi = [&multi[0], &multi[1], &multi[2], &multi[3], &missing];
    assert_eq!(call!(c.exists(&all_multi)).unwrap(), 4);
    assert_eq!(call!(c.touch(&all_multi)).unwrap(), 4);
    assert_eq!(call!(c.del(&[&multi[0], &multi[1], &missing])).unwrap(), 2);
    assert_eq!(c.exists(&all_multi).unwrap(), 2);
    assert_eq!(call!(c.unlink(&all_multi)).unwrap(), 2);
    assert_eq!(c.exists(&all_multi).unwrap(), 0);
    assert_eq!(c.touch(&all_multi).unwrap(), 0);

    let e = on(0, "expiring");
    c.set(&e, 1).unwrap();
    assert_eq!(call!(c.ttl(&e)).unwrap(), -1);
    assert_eq!(call!(c.pttl(&e)).unwrap(), -1);
    assert!(call!(c.expire(&e, 100)).unwrap());
    assert!((90..=100).contains(&c.ttl(&e).unwrap()));
    assert!(!c.expire(&missing, 100).unwrap());
    assert!(call!(c.pexpire(&e, 50_000)).unwrap());
    assert!((40_000..=50_000).contains(&c.pttl(&e).unwrap()));
    assert!(!c.pexpire(&missing, 50_000).unwrap());
    let (now_s, _) = unix_now();
    assert!(call!(c.expire_at(&e, now_s + 500)).unwrap());
    assert!((490..=500).contains(&c.ttl(&e).unwrap()));
    assert!(!c.expire_at(&missing, now_s + 500).unwrap());
    assert!(call!(c.persist(&e)).unwrap());
    assert!(!c.persist(&e).unwrap(), "nothing left to persist");
    assert_eq!(c.ttl(&e).unwrap(), -1);
    assert_eq!(c.ttl(&missing).unwrap(), -2);
    assert_eq!(c.pttl(&missing).unwrap(), -2);
    assert_eq!(call!(c.key_type(&e)).unwrap(), "string");
    assert_eq!(c.key_type(&missing).unwrap(), "none");
    placed.push((e.clone(), 0, "string"));

    // Hashes (host 1).
    let hk = on(1, "hash");
    assert_eq!(call!(c.hset(&hk, "f1", "v1")).unwrap(), 1);
    assert_eq!(
        c.hset(&hk, "f1", "v1b").unwrap(),
        0,
        "overwrite adds nothing"
    );
    let fields = [("f2", "v2"), ("f3", "v3")];
    assert_eq!(call!(c.hset_multiple(&hk, &fields)).unwrap(), 2);
    assert_eq!(call!(c.hget(&hk, "f1")).unwrap(), sb("v1b"));
    assert_eq!(c.hget(&hk, "nope").unwrap(), None);
    assert_eq!(
        call!(c.hmget(&hk, &["f3", "nope", "f1"])).unwrap(),
        vec![sb("v3"), None, sb("v1b")]
    );
    assert_eq!(
        call!(c.hgetall(&hk)).unwrap(),
        HashMap::from([(b("f1"), b("v1b")), (b("f2"), b("v2")), (b("f3"), b("v3"))])
    );
    assert_eq!(c.hgetall(&missing).unwrap(), HashMap::new());
    assert_eq!(call!(c.hincr_by(&hk, "n", 5)).unwrap(), 5);
    assert_eq!(c.hincr_by(&hk, "n", -2).unwrap(), 3);
    assert!(call!(c.hexists(&hk, "f2")).unwrap());
    assert!(!c.hexists(&hk, "nope").unwrap());
    assert_eq!(call!(c.hlen(&hk)).unwrap(), 4);
    assert_eq!(
        sorted(call!(c.hkeys(&hk)).unwrap()),
        vec![b("f1"), b("f2"), b("f3"), b("n")]
    );
    assert_eq!(
        sorted(call!(c.hvals(&hk)).unwrap()),
        vec![b("3"), b("v1b"), b("v2"), b("v3")]
    );
    assert_eq!(call!(c.hdel(&hk, &["f2", "nope"])).unwrap(), 1);
    assert_eq!(c.hlen(&hk).unwrap(), 3);
    assert_eq!(c.key_type(&hk).unwrap(), "hash");
    placed.push((hk.clone(), 1, "hash"));

    // Lists (host 2).
    let lk = on(2, "list");
    assert_eq!(call!(c.rpush(&lk, &["b", "c"])).unwrap(), 2);
    assert_eq!(call!(c.lpush(&lk, &["a"])).unwrap(), 3);
    assert_eq!(c.lpush(&lk, &["y", "x"]).unwrap(), 5);
    assert_eq!(
        call!(c.lrange(&lk, 0, -1)).unwrap(),
        vec![b("x"), b("y"), b("a"), b("b"), b("c")]
    );
    assert_eq!(call!(c.llen(&lk)).unwrap(), 5);
    assert_eq!(call!(c.lindex(&lk, 0)).unwrap(), sb("x"));
    assert_eq!(c.lindex(&lk, -1).unwrap(), sb("c"));
    assert_eq!(c.lindex(&lk, 10).unwrap(), None);
    assert_eq!(call!(c.lpop(&lk)).unwrap(), sb("x"));
    assert_eq!(call!(c.rpop(&lk)).unwrap(), sb("c"));
    call!(c.ltrim(&lk, 1, -1)).unwrap();
    assert_eq!(c.lrange(&lk, 0, -1).unwrap(), vec![b("a"), b("b")]);
    assert_eq!(c.lpop(&missing).unwrap(), None);
    assert_eq!(c.rpop(&missing).unwrap(), None);
    assert_eq!(c.key_type(&lk).unwrap(), "list");
    placed.push((lk.clone(), 2, "list"));

    // Sets (host 3).
    let sk = on(3, "set");
    assert_eq!(call!(c.sadd(&sk, &["a", "b", "c", "a"])).unwrap(), 3);
    assert_eq!(c.sadd(&sk, &["c", "d"]).unwrap(), 1);
    assert_eq!(call!(c.scard(&sk)).unwrap(), 4);
    assert!(call!(c.sismember(&sk, "a")).unwrap());
    assert!(!c.sismember(&sk, "z").unwrap());
    assert_eq!(call!(c.srem(&sk, &["a", "z"])).unwrap(), 1);
    assert_eq!(
        call!(c.smembers(&sk)).unwrap(),
        HashSet::from([b("b"), b("c"), b("d")])
    );
    assert_eq!(c.smembers(&missing).unwrap(), HashSet::new());
    assert_eq!(c.key_type(&sk).unwrap(), "set");
    placed.push((sk.clone(), 3, "set"));

    // Sorted sets (host 0).
    let zk = on(0, "zset");
    let members = [(1.0, "one"), (2.0, "two"), (3.5, "three")];
    assert_eq!(call!(c.zadd(&zk, &members)).unwrap(), 3);
    assert_eq!(
        c.zadd(&zk, &[(2.5, "two")]).unwrap(),
        0,
        "an update adds nothing"
    );
    assert_eq!(call!(c.zincr_by(&zk, 0.5, "one")).unwrap(), 1.5);
    assert_eq!(
        call!(c.zrange(&zk, 0, -1)).unwrap(),
        vec![b("one"), b("two"), b("three")]
    );
    let ascending = vec![(b("one"), 1.5), (b("two"), 2.5), (b("three"), 3.5)];
    assert_eq!(call!(c.zrange_withscores(&zk, 0, -1)).unwrap(), ascending);
    assert_eq!(
        call!(c.zrevrange(&zk, 0, 1)).unwrap(),
        vec![b("three"), b("two")]
    );
    let descending: Vec<(Bytes, f64)> = ascending.iter().rev().cloned().collect();
    assert_eq!(
        call!(c.zrevrange_withscores(&zk, 0, -1)).unwrap(),
        descending
    );
    assert_eq!(
        call!(c.zrangebyscore(&zk, "-inf", "+inf")).unwrap(),
        vec![b("one"), b("two"), b("three")]
    );
    assert_eq!(c.zrangebyscore(&zk, "(1.5", 3).unwrap(), vec![b("two")]);
    assert_eq!(
        c.zrangebyscore(&zk, 2.0, f64::INFINITY).unwrap(),
        vec![b("two"), b("three")]
    );
    assert_eq!(call!(c.zcount(&zk, "-inf", "+inf")).unwrap(), 3);
    assert_eq!(c.zcount(&zk, 2, 3).unwrap(), 1);
    assert_eq!(c.zcount(&zk, "(1.5", "(3.5").unwrap(), 1);
    assert_eq!(call!(c.zrank(&zk, "three")).unwrap(), Some(2));
    assert_eq!(c.zrank(&zk, "one").unwrap(), Some(0));
    assert_eq!(c.zrank(&zk, "nope").unwrap(), None);
    assert_eq!(call!(c.zscore(&zk, "two")).unwrap(), Some(2.5));
    assert_eq!(c.zscore(&zk, "nope").unwrap(), None);
    assert_eq!(call!(c.zcard(&zk)).unwrap(), 3);
    assert_eq!(call!(c.zrem(&zk, &["one", "nope"])).unwrap(), 1);
    assert_eq!(c.zcard(&zk).unwrap(), 2);
    assert_eq!(c.key_type(&zk).unwrap(), "zset");
    placed.push((zk.clone(), 0, "zset"));

    // Scripts, routed by their first key (host 3).
    let script = rb::Script::new(
        "redis.call('SET', KEYS[1], ARGV[1]); return {redis.call('GET', KEYS[1]), #KEYS, 7}",
    );
    let ek = on(3, "script");
    let out = call!(c.eval_script(&script, &[&ek], &["from-lua"])).unwrap();
    assert_eq!(
        out,
        Value::Array(vec![bulk("from-lua"), Value::Int(1), Value::Int(7)])
    );
    placed.push((ek.clone(), 3, "string"));

    // Every key lives on its host, and only there.
    for (key, host, ty) in &placed {
        assert_eq!(host_of(&cluster, key), *host, "{key}");
        let local = cluster.local_client(*host).unwrap();
        assert_eq!(local.key_type(key).unwrap(), *ty, "{key} on host {host}");
    }
    for host in 0..4 {
        let ours: BTreeSet<String> = placed
            .iter()
            .filter(|(_, h, _)| *h == host)
            .map(|(k, _, _)| k.clone())
            .collect();
        assert!(!ours.is_empty(), "the keys are spread over every host");
        assert_eq!(
            keys_of(&cluster, host, "*"),
            ours,
            "host {host} holds exactly its keys"
        );
    }

    // Server helpers: keyless, so the routing client refuses them...
    match c.ping() {
        Err(Error::Unroutable { command, .. }) => assert_eq!(&*command, "PING"),
        other => panic!("PING through the routing client: {other:?}"),
    }
    assert!(matches!(c.dbsize(), Err(Error::Unroutable { .. })));

    // ...and a local client or a fanout sends them.
    let local0 = cluster.local_client(0).unwrap();
    assert_eq!(call!(local0.ping()).unwrap(), "PONG");
    let info = call!(local0.info(Some("server"))).unwrap();
    assert_eq!(
        info.parse::<u32>("process_id"),
        setup.pid(0),
        "host 0 is server 0"
    );
    assert!(info.get("redis_version").unwrap().starts_with('7'));
    assert_eq!(info.get("used_memory"), None, "only the server section");
    let full = local0.info(None).unwrap();
    assert!(full.parse::<u64>("used_memory").unwrap() > 0);
    let keyspace = full.get("db0").expect("db0 holds keys");
    let on0 = keys_of(&cluster, 0, "*").len();
    assert!(keyspace.starts_with(&format!("keys={on0},")), "{keyspace}");
    assert_eq!(call!(local0.dbsize()).unwrap(), on0 as i64);
    let (secs, micros) = call!(local0.time()).unwrap();
    assert!((secs - unix_now().0).abs() <= 5, "server time {secs}");
    assert!((0..1_000_000).contains(&micros));
    assert_eq!(
        call!(local0.config_get("maxmemory-policy")).unwrap(),
        HashMap::from([("maxmemory-policy".to_owned(), "noeviction".to_owned())])
    );
    call!(local0.config_set("maxmemory-policy", "allkeys-lru")).unwrap();
    assert_eq!(
        local0.config_get("maxmemory-policy").unwrap()["maxmemory-policy"],
        "allkeys-lru"
    );

    // Through `cluster.all`: one reply per host. Hosts 0 and 1 are server
    // 0 (databases 0 and 1), so both see its new policy.
    let (pings, policies, sizes, times) = cluster
        .all(|a| {
            (
                call!(a.ping()),
                a.config_get("maxmemory-policy"),
                a.dbsize(),
                a.time(),
            )
        })
        .unwrap();
    let pings = pings.value().unwrap();
    assert_eq!(pings.len(), 4);
    assert!(pings.values().all(|p| p == "PONG"));
    let policies = policies.value().unwrap();
    for (host, want) in [
        (0, "allkeys-lru"),
        (1, "allkeys-lru"),
        (2, "noeviction"),
        (3, "noeviction"),
    ] {
        assert_eq!(policies[&host]["maxmemory-policy"], want, "host {host}");
    }
    let sizes = sizes.value().unwrap();
    for host in 0..4 {
        assert_eq!(sizes[&host], keys_of(&cluster, host, "*").len() as i64);
    }
    assert!(times
        .value()
        .unwrap()
        .values()
        .all(|(s, _)| (s - secs).abs() <= 5));

    // Scans, one page each (a big COUNT: small collections come whole).
    let opts = rb::ScanOptions::new().count(1000);
    let (next, keys) = call!(local0.scan(0, &opts)).unwrap();
    assert_eq!(next, 0);
    assert_eq!(keys.len() as i64, local0.dbsize().unwrap());
    let (_, members) = call!(c.sscan(&sk, 0, &opts)).unwrap();
    assert_eq!(members.len() as i64, c.scard(&sk).unwrap());
    let (_, fields) = call!(c.hscan(&hk, 0, &opts)).unwrap();
    assert_eq!(fields.len() as i64, c.hlen(&hk).unwrap());
    let (_, scored) = call!(c.zscan(&zk, 0, &opts)).unwrap();
    assert_eq!(scored.len() as i64, c.zcard(&zk).unwrap());

    // FLUSHDB on host 0 empties database 0 of server 0 only.
    call!(local0.flushdb()).unwrap();
    assert_eq!(local0.dbsize().unwrap(), 0);
    assert_eq!(c.get(&s).unwrap(), None);
    assert_eq!(
        c.get(&sx).unwrap(),
        sb("temp"),
        "host 1 (db 1) kept its keys"
    );

    // Coverage: every method of the trait was called above.
    let seen: BTreeSet<String> = seen.into_inner().into_iter().map(String::from).collect();
    let expected = trait_methods();
    assert!(expected.len() >= 70, "parsed the trait: {expected:?}");
    let not_called: Vec<&String> = expected.difference(&seen).collect();
    assert!(
        not_called.is_empty(),
        "helpers never called: {not_called:?}"
    );
    let unknown: Vec<&String> = seen.difference(&expected).collect();
    assert!(unknown.is_empty(), "not in the trait: {unknown:?}");
}

// ---------------------------------------------------------------------------
// 2. the same helpers as promises: map and fanout
// ---------------------------------------------------------------------------

/// Promises of the writes of the first map.
struct Writes {
    sets: Vec<Promise<()>>,
    hset: Promise<i64>,
    zadd: Promise<i64>,
    sadd: Promise<i64>,
    rpush: Promise<i64>,
    incr: Promise<i64>,
    float: Promise<f64>,
    mset: Promise<()>,
    set_nx: Promise<bool>,
}

#[test]
fn same_helpers_in_map_and_fanout() {
    let (_setup, cluster) = cluster(2, 2);
    let keys: Vec<String> = (0..4).map(|h| key_on(&cluster, h, "m")).collect();
    let other: Vec<String> = (0..4).map(|h| key_on(&cluster, h, "o")).collect();
    let hk = key_on(&cluster, 1, "mh");
    let zk = key_on(&cluster, 2, "mz");
    let sk = key_on(&cluster, 3, "ms");
    let lk = key_on(&cluster, 0, "ml");
    let nk = key_on(&cluster, 2, "mn");
    let fk = key_on(&cluster, 1, "mf");
    let missing = key_on(&cluster, 3, "none");

    let w = cluster
        .map(|c| Writes {
            sets: keys.iter().enumerate().map(|(i, k)| c.set(k, i)).collect(),
            hset: c.hset_multiple(&hk, &[("a", "1"), ("b", "2")]),
            zadd: c.zadd(&zk, &[(1.0, "x"), (2.0, "y"), (0.5, "w")]),
            sadd: c.sadd(&sk, &["p", "q", "p"]),
            rpush: c.rpush(&lk, &["1", "2", "3"]),
            incr: c.incr_by(&nk, 40),
            float: c.incr_by_float(&fk, 0.5),
            mset: c.mset(&[
                (&other[0], "o0"),
                (&other[1], "o1"),
                (&other[2], "o2"),
                (&other[3], "o3"),
            ]),
            set_nx: c.set_with(
                &keys[0],
                "refused",
                SetOptions::new().condition(Condition::IfMissing),
            ),
        })
        .unwrap();
    for p in &w.sets {
        assert!(p.is_resolved());
        p.value().unwrap();
    }
    assert_eq!(w.hset.value().unwrap(), 2);
    assert_eq!(w.zadd.value().unwrap(), 3);
    assert_eq!(w.sadd.value().unwrap(), 2);
    assert_eq!(w.rpush.value().unwrap(), 3);
    assert_eq!(w.incr.value().unwrap(), 40);
    assert_eq!(w.float.value().unwrap(), 0.5);
    w.mset.value().unwrap();
    assert!(!w.set_nx.value().unwrap());
    // Through local clients: each key landed on its host.
    for (h, k) in keys.iter().enumerate() {
        let local = cluster.local_client(h as HostId).unwrap();
        assert_eq!(local.get(k).unwrap(), sb(h.to_string()));
        assert_eq!(local.get(&other[h]).unwrap(), sb(format!("o{h}")));
    }

    let script = rb::Script::new("return {KEYS[1], ARGV[1]}");
    let (gets, mget, incr, hgetall, hget, zr, zrev, zby, zscore, zrank, smembers, lrange) = cluster
        .map(|c| {
            (
                keys.iter().map(|k| c.get(k)).collect::<Vec<_>>(),
                c.mget(&[&other[2], &missing, &keys[1], &other[2], &other[0]]),
                c.incr(&nk),
                c.hgetall(&hk),
                c.hget(&hk, "b"),
                c.zrange_withscores(&zk, 0, -1),
                c.zrevrange(&zk, 0, 0),
                c.zrangebyscore(&zk, "-inf", "(2"),
                c.zscore(&zk, "y"),
                c.zrank(&zk, "x"),
                c.smembers(&sk),
                c.lrange(&lk, 0, -1),
            )
        })
        .unwrap();
    let values: Vec<Option<Bytes>> = gets.iter().map(|p| p.value().unwrap()).collect();
    assert_eq!(values, vec![sb("0"), sb("1"), sb("2"), sb("3")]);
    assert_eq!(
        mget.value().unwrap(),
        vec![sb("o2"), None, sb("1"), sb("o2"), sb("o0")]
    );
    assert_eq!(incr.value().unwrap(), 41);
    assert_eq!(
        hgetall.value().unwrap(),
        HashMap::from([(b("a"), b("1")), (b("b"), b("2"))])
    );
    assert_eq!(hget.value().unwrap(), sb("2"));
    assert_eq!(
        zr.value().unwrap(),
        vec![(b("w"), 0.5), (b("x"), 1.0), (b("y"), 2.0)]
    );
    assert_eq!(zrev.value().unwrap(), vec![b("y")]);
    assert_eq!(zby.value().unwrap(), vec![b("w"), b("x")]);
    assert_eq!(zscore.value().unwrap(), Some(2.0));
    assert_eq!(zrank.value().unwrap(), Some(1));
    assert_eq!(smembers.value().unwrap(), HashSet::from([b("p"), b("q")]));
    assert_eq!(lrange.value().unwrap(), vec![b("1"), b("2"), b("3")]);

    // Keys, expiry, scripts and deletes in one map; per host, in order.
    let all: Vec<&String> = keys.iter().chain(&other).chain([&missing]).collect();
    let (exists, expire, ttl, ty, eval, del, exists_after, by_cmd) = cluster
        .map(|c| {
            (
                c.exists(&all),
                c.expire(&keys[2], 100),
                c.ttl(&keys[2]),
                c.key_type(&zk),
                c.eval_script(&script, &[&keys[3]], &["arg"]),
                c.del(&all),
                c.exists(&all),
                c.cmd::<Vec<Option<String>>>(rb::cmd("MGET").arg(&hk).arg(&missing)),
            )
        })
        .unwrap();
    assert_eq!(exists.value().unwrap(), 8);
    assert!(expire.value().unwrap());
    assert!((90..=100).contains(&ttl.value().unwrap()));
    assert_eq!(ty.value().unwrap(), "zset");
    assert_eq!(
        eval.value().unwrap(),
        Value::Array(vec![bulk(&keys[3]), bulk("arg")])
    );
    assert_eq!(del.value().unwrap(), 8);
    assert_eq!(exists_after.value().unwrap(), 0);
    // MGET of a hash key gives nil for it, as Redis does.
    assert_eq!(by_cmd.value().unwrap(), vec![None, None]);

    // Fanout to every host: one reply per host id.
    let before: Vec<i64> = (0..4)
        .map(|h| keys_of(&cluster, h, "*").len() as i64)
        .collect();
    let (ping, set, get, incr, sizes, cfg, owner, sub, info) = cluster
        .fanout(Hosts::All, |c| {
            (
                c.ping(),
                c.set("fan", "x"),
                c.get("fan"),
                c.incr("fan-counter"),
                c.dbsize(),
                c.config_get("databases"),
                c.target_key(&lk).lrange(&lk, 0, 0),
                c.target(&[1, 3]).incr("fan-counter"),
                c.info(Some("keyspace")),
            )
        })
        .unwrap();
    let ids: BTreeSet<HostId> = [0, 1, 2, 3].into();
    assert_eq!(
        ping.value()
            .unwrap()
            .keys()
            .copied()
            .collect::<BTreeSet<_>>(),
        ids
    );
    assert!(ping.value().unwrap().values().all(|p| p == "PONG"));
    assert_eq!(set.value().unwrap().len(), 4);
    let get = get.value().unwrap();
    assert_eq!(get.len(), 4);
    assert!(get.values().all(|v| *v == sb("x")));
    assert_eq!(
        incr.value().unwrap(),
        HashMap::from([(0, 1), (1, 1), (2, 1), (3, 1)])
    );
    let sizes = sizes.value().unwrap();
    for h in 0..4u32 {
        assert_eq!(sizes[&h], before[h as usize] + 2, "host {h}");
    }
    let cfg = cfg.value().unwrap();
    assert!(cfg
        .values()
        .all(|m| m == &HashMap::from([("databases".to_owned(), "16".to_owned())])));
    assert_eq!(owner.value().unwrap(), vec![b("1")]);
    assert_eq!(
        sub.value().unwrap(),
        HashMap::from([(1, 2), (3, 2)]),
        "only the targeted hosts"
    );
    let info = info.value().unwrap();
    for h in 0..4u32 {
        let db = format!("db{}", h % 2);
        let line = info[&h].get(&db).expect("keyspace line");
        assert!(line.starts_with(&format!("keys={},", before[h as usize] + 2)));
    }

    // A fanout to some hosts only.
    let (flushed, sizes) = cluster
        .fanout(Hosts::Ids(vec![0, 2]), |c| (c.flushdb(), c.dbsize()))
        .unwrap();
    assert_eq!(flushed.value().unwrap().len(), 2);
    assert_eq!(sizes.value().unwrap(), HashMap::from([(0, 0), (2, 0)]));
    for (h, want) in [(0, 0), (1, before[1] + 2), (2, 0), (3, before[3] + 2)] {
        assert_eq!(cluster.local_client(h).unwrap().dbsize().unwrap(), want);
    }
}

// ---------------------------------------------------------------------------
// 3. multi-key commands over 32 hosts
// ---------------------------------------------------------------------------

/// Every host holds exactly the `mk:*` keys its router assigns it.
fn check_placement(cluster: &Cluster, keys: &[String]) {
    let router = cluster.router().unwrap();
    let mut want: HashMap<HostId, BTreeSet<String>> = HashMap::new();
    for k in keys {
        let host = router.host_for_key(k.as_bytes()).unwrap();
        want.entry(host).or_default().insert(k.clone());
    }
    assert_eq!(want.len(), 32, "the keys cover every host");
    for host in cluster.host_ids() {
        assert_eq!(
            keys_of(cluster, host, "mk:*"),
            want[&host],
            "keys of host {host}"
        );
    }
}

fn assert_unroutable(result: rb::Result<impl std::fmt::Debug>, name: &str) {
    match result {
        Err(Error::Unroutable { command, reason }) => {
            assert_eq!(&*command, name, "{reason}");
            assert!(!reason.is_empty());
        }
        other => panic!("{name} was not refused: {other:?}"),
    }
}

#[test]
fn multi_key_commands_across_32_hosts() {
    let (_setup, cluster) = cluster(4, 8);
    assert_eq!(cluster.host_ids().len(), 32);
    let keys: Vec<String> = (0..200).map(|i| format!("mk:{i}")).collect();
    let absent: Vec<String> = (0..10).map(|i| format!("absent:{i}")).collect();
    let with_absent: Vec<&String> = keys.iter().chain(&absent).collect();
    let first_half: Vec<&String> = keys[..100].iter().chain(&absent).collect();
    // MGET order: scattered, with absent keys and duplicates.
    let mut query: Vec<&String> = vec![
        &keys[7], &absent[0], &keys[7], &keys[199], &keys[0], &absent[1], &keys[0], &keys[0],
    ];
    query.extend(keys.iter().rev());
    query.push(&absent[0]);
    let expect_mget = |prefix: &str| -> Vec<Option<Bytes>> {
        query
            .iter()
            .map(|k| {
                k.strip_prefix("mk:")
                    .map(|i| format!("{prefix}{i}").into_bytes())
            })
            .collect()
    };
    let dbsize_total = |cluster: &Cluster| -> i64 {
        cluster
            .all(|c| c.dbsize())
            .unwrap()
            .value()
            .unwrap()
            .values()
            .sum()
    };

    // The routing client.
    let c = cluster.routing_client();
    let pairs: Vec<(String, String)> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| (k.clone(), format!("r{i}")))
        .collect();
    c.mset(&pairs).unwrap();
    check_placement(&cluster, &keys);
    assert_eq!(dbsize_total(&cluster), 200);
    assert_eq!(c.mget(&query).unwrap(), expect_mget("r"));
    assert_eq!(c.exists(&with_absent).unwrap(), 200);
    assert_eq!(
        c.exists(&[&keys[3], &keys[3], &absent[2], &keys[150]])
            .unwrap(),
        3,
        "EXISTS counts a repeated key each time, as Redis does"
    );
    assert_eq!(c.touch(&with_absent).unwrap(), 200);
    assert_eq!(c.del(&first_half).unwrap(), 100);
    assert_eq!(c.exists(&with_absent).unwrap(), 100);
    assert_eq!(
        c.mget(&[&keys[0], &keys[100]]).unwrap(),
        vec![None, sb("r100")]
    );
    assert_eq!(c.unlink(&with_absent).unwrap(), 100);
    assert_eq!(c.exists(&with_absent).unwrap(), 0);
    assert_eq!(dbsize_total(&cluster), 0);

    // The mapping client.
    let pairs: Vec<(String, String)> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| (k.clone(), format!("m{i}")))
        .collect();
    let mset = cluster.map(|m| m.mset(&pairs)).unwrap();
    mset.value().unwrap();
    check_placement(&cluster, &keys);
    let (mget, exists, touch, del, exists_after, unlink, exists_end) = cluster
        .map(|m| {
            (
                m.mget(&query),
                m.exists(&with_absent),
                m.touch(&with_absent),
                m.del(&first_half),
                m.exists(&with_absent),
                m.unlink(&with_absent),
                m.exists(&with_absent),
            )
        })
        .unwrap();
    assert_eq!(mget.value().unwrap(), expect_mget("m"));
    assert_eq!(exists.value().unwrap(), 200);
    assert_eq!(touch.value().unwrap(), 200);
    assert_eq!(del.value().unwrap(), 100);
    assert_eq!(exists_after.value().unwrap(), 100);
    assert_eq!(unlink.value().unwrap(), 100);
    assert_eq!(exists_end.value().unwrap(), 0);
    assert_eq!(dbsize_total(&cluster), 0);

    // SUNIONSTORE and RENAME are refused whatever the keys hash to.
    let same: Vec<String> = (0..3)
        .map(|i| key_on(&cluster, 5, &format!("same{i}")))
        .collect();
    let diff: Vec<String> = (0..3)
        .map(|i| key_on(&cluster, 10 + i, &format!("diff{i}")))
        .collect();
    for set in [&same, &diff] {
        c.sadd(&set[1], &["a"]).unwrap();
        c.sadd(&set[2], &["b"]).unwrap();
    }
    let refused = |k: &[String]| {
        [
            (
                rb::cmd("SUNIONSTORE").arg(&k[0]).arg(&k[1]).arg(&k[2]),
                "SUNIONSTORE",
            ),
            (rb::cmd("RENAME").arg(&k[1]).arg(&k[0]), "RENAME"),
        ]
    };
    for k in [&same, &diff] {
        for (command, name) in refused(k) {
            assert_unroutable(c.cmd::<Value>(command), name);
        }
    }
    let mut promises = Vec::new();
    let mut after = Vec::new();
    let result = cluster.map(|m| {
        for k in [&same, &diff] {
            for (command, name) in refused(k) {
                promises.push((m.cmd::<Value>(command), name));
            }
            after.push(m.smembers(&k[1]));
        }
    });
    assert_unroutable(result, "SUNIONSTORE");
    for (p, name) in &promises {
        assert!(p.is_rejected());
        assert_unroutable(p.value(), name);
    }
    // Nothing moved: the sources are intact, no destination was written.
    for p in &after {
        assert_eq!(p.value().unwrap(), HashSet::from([b("a")]));
    }
    for k in [&same, &diff] {
        assert_eq!(c.exists(&[&k[0]]).unwrap(), 0);
        assert_eq!(c.scard(&k[2]).unwrap(), 1);
    }
}

// ---------------------------------------------------------------------------
// 4. RESP3 reads the same as RESP2
// ---------------------------------------------------------------------------

/// Everything one map reads back, typed.
#[derive(Debug, PartialEq)]
struct Snapshot {
    writes: (i64, i64, i64, i64, f64, f64, i64, bool, bool),
    get: Option<Bytes>,
    get_missing: Option<Bytes>,
    mget: Vec<Option<Bytes>>,
    hgetall: HashMap<Bytes, Bytes>,
    hgetall_missing: HashMap<Bytes, Bytes>,
    hmget: Vec<Option<Bytes>>,
    hexists: bool,
    hkeys: Vec<Bytes>,
    zrange: Vec<(Bytes, f64)>,
    zrevrange: Vec<(Bytes, f64)>,
    zrangebyscore: Vec<Bytes>,
    zscore: Option<f64>,
    zscore_missing: Option<f64>,
    zrank: Option<i64>,
    zrank_missing: Option<i64>,
    zcount: i64,
    smembers: HashSet<Bytes>,
    sismember: bool,
    lrange: Vec<Bytes>,
    exists: i64,
    key_type: String,
    ttl: i64,
    by_cmd: Vec<(String, f64)>,
    eval: Value,
    shared_hash: HashMap<String, String>,
    config: HashMap<HostId, HashMap<String, String>>,
    dbsize: HashMap<HostId, i64>,
    ping: HashMap<HostId, String>,
    version: HashMap<HostId, Option<String>>,
}

/// Writes keys tagged `tag` and reads them (and the shared `shared:hash`)
/// back through one cluster's maps and fanouts.
fn snapshot(cluster: &Cluster, tag: &str) -> Snapshot {
    let k = |name: &str| format!("{tag}:{name}");
    let (s, h, z, st, l, f, n) = (k("s"), k("h"), k("z"), k("set"), k("l"), k("f"), k("n"));
    let missing = k("missing");
    let script =
        rb::Script::new("return {tonumber(ARGV[1]) * 2, ARGV[2], redis.call('EXISTS', KEYS[1])}");
    let writes = cluster
        .map(|c| {
            c.set(&s, "value");
            c.set(&f, "10.5");
            (
                c.hset_multiple(&h, &[("a", "1"), ("b", "2"), ("c", "3")]),
                c.zadd(&z, &[(1.0, "one"), (2.5, "two"), (-3.0, "neg")]),
                c.sadd(&st, &["x", "y"]),
                c.rpush(&l, &["1", "2", "3"]),
                c.incr_by_float(&f, 0.25),
                c.zincr_by(&z, 0.5, "one"),
                c.incr_by(&n, 7),
                c.expire(&s, 1000),
                c.set_with(&s, "no", SetOptions::new().condition(Condition::IfMissing)),
            )
        })
        .unwrap();
    let writes = (
        writes.0.value().unwrap(),
        writes.1.value().unwrap(),
        writes.2.value().unwrap(),
        writes.3.value().unwrap(),
        writes.4.value().unwrap(),
        writes.5.value().unwrap(),
        writes.6.value().unwrap(),
        writes.7.value().unwrap(),
        writes.8.value().unwrap(),
    );
    let r = cluster
        .map(|c| {
            (
                c.get(&s),
                c.get(&missing),
                c.mget(&[&s, &missing, &f]),
                c.hgetall(&h),
                c.hgetall(&missing),
                c.hmget(&h, &["c", "nope", "a"]),
                c.hexists(&h, "b"),
                c.hkeys(&h),
                c.zrange_withscores(&z, 0, -1),
                c.zrevrange_withscores(&z, 0, -1),
                c.zrangebyscore(&z, "-inf", "+inf"),
                c.zscore(&z, "two"),
                c.zscore(&z, "nope"),
                c.zrank(&z, "two"),
                c.zrank(&z, "nope"),
                c.zcount(&z, "-inf", "+inf"),
                c.smembers(&st),
                c.sismember(&st, "y"),
                c.lrange(&l, 0, -1),
                c.exists(&[&s, &h, &z, &missing]),
                c.key_type(&z),
                c.ttl(&s),
                c.cmd::<Vec<(String, f64)>>(
                    rb::cmd("ZRANGE").arg(&z).arg(0).arg(-1).arg("WITHSCORES"),
                ),
                c.eval_script(&script, &[&s], &["21", "text"]),
                c.cmd::<HashMap<String, String>>(rb::cmd("HGETALL").arg("shared:hash")),
            )
        })
        .unwrap();
    let (config, dbsize, ping, info) = cluster
        .all(|c| {
            (
                c.config_get("maxmemory*"),
                c.dbsize(),
                c.ping(),
                c.info(Some("server")),
            )
        })
        .unwrap();
    let sorted_keys = sorted(r.7.value().unwrap());
    Snapshot {
        writes,
        get: r.0.value().unwrap(),
        get_missing: r.1.value().unwrap(),
        mget: r.2.value().unwrap(),
        hgetall: r.3.value().unwrap(),
        hgetall_missing: r.4.value().unwrap(),
        hmget: r.5.value().unwrap(),
        hexists: r.6.value().unwrap(),
        hkeys: sorted_keys,
        zrange: r.8.value().unwrap(),
        zrevrange: r.9.value().unwrap(),
        zrangebyscore: r.10.value().unwrap(),
        zscore: r.11.value().unwrap(),
        zscore_missing: r.12.value().unwrap(),
        zrank: r.13.value().unwrap(),
        zrank_missing: r.14.value().unwrap(),
        zcount: r.15.value().unwrap(),
        smembers: r.16.value().unwrap(),
        sismember: r.17.value().unwrap(),
        lrange: r.18.value().unwrap(),
        exists: r.19.value().unwrap(),
        key_type: r.20.value().unwrap(),
        ttl: r.21.value().unwrap(),
        by_cmd: r.22.value().unwrap(),
        eval: r.23.value().unwrap(),
        shared_hash: r.24.value().unwrap(),
        config: config.value().unwrap(),
        dbsize: dbsize.value().unwrap(),
        ping: ping.value().unwrap(),
        version: info
            .value()
            .unwrap()
            .into_iter()
            .map(|(h, i)| (h, i.get("redis_version").map(str::to_owned)))
            .collect(),
    }
}

#[test]
fn resp3_map_matches_resp2() {
    let setup = TestSetup::new(2, 2).expect("start redis-server");
    let resp2 = setup.make_cluster().unwrap();
    let mut builder = Cluster::builder().host_defaults(HostConfig::new().protocol(Protocol::Resp3));
    for i in 0..2 {
        for db in 0..2 {
            builder = builder.host((i * 2 + db) as HostId, setup.host_config(i, db));
        }
    }
    let resp3 = builder.build().unwrap();
    assert!(resp3.hosts().iter().all(|h| h.protocol == Protocol::Resp3));
    assert!(resp2.hosts().iter().all(|h| h.protocol == Protocol::Resp2));

    // The connections really speak what they were told to.
    let shared = "shared:hash";
    resp2
        .routing_client()
        .hset_multiple(shared, &[("k", "v"), ("k2", "v2")])
        .unwrap();
    let raw2 = resp2
        .routing_client()
        .cmd::<Value>(rb::cmd("HGETALL").arg(shared))
        .unwrap();
    let raw3 = resp3
        .routing_client()
        .cmd::<Value>(rb::cmd("HGETALL").arg(shared))
        .unwrap();
    assert!(
        matches!(&raw2, Value::Array(items) if items.len() == 4),
        "{raw2:?}"
    );
    assert!(
        matches!(&raw3, Value::Map(pairs) if pairs.len() == 2),
        "{raw3:?}"
    );
    let zk = key_on(&resp2, 3, "zs");
    resp2.routing_client().zadd(&zk, &[(2.5, "m")]).unwrap();
    let score = |cluster: &Cluster| {
        cluster
            .routing_client()
            .cmd::<Value>(rb::cmd("ZSCORE").arg(&zk).arg("m"))
            .unwrap()
    };
    assert_eq!(score(&resp2), bulk("2.5"));
    assert_eq!(score(&resp3), Value::Double(2.5));
    for (cluster, proto) in [(&resp2, "2"), (&resp3, "3")] {
        let infos = cluster
            .all(|c| c.cmd::<String>(rb::cmd("CLIENT").arg("INFO")))
            .unwrap()
            .value()
            .unwrap();
        assert_eq!(infos.len(), 4);
        for (host, info) in &infos {
            assert_eq!(client_field(info, "resp"), Some(proto), "host {host}");
            let db = (host % 2).to_string();
            assert_eq!(client_field(info, "db"), Some(db.as_str()), "host {host}");
        }
    }

    // The same maps over both give the same typed results, each from the
    // same starting point: empty but for the shared hash.
    let fresh = || {
        resp2.all(|c| c.flushdb()).unwrap();
        resp2
            .routing_client()
            .hset_multiple(shared, &[("k", "v"), ("k2", "v2")])
            .unwrap();
    };
    fresh();
    let two = snapshot(&resp2, "t");
    fresh();
    let three = snapshot(&resp3, "t");
    assert_eq!(two, three);
    // And they are the right results, not merely equal.
    assert_eq!(three.writes, (3, 3, 2, 3, 10.75, 1.5, 7, true, false));
    assert_eq!(three.get, sb("value"));
    assert_eq!(three.mget, vec![sb("value"), None, sb("10.75")]);
    assert_eq!(
        three.hgetall,
        HashMap::from([(b("a"), b("1")), (b("b"), b("2")), (b("c"), b("3"))])
    );
    assert!(three.hgetall_missing.is_empty());
    assert_eq!(three.hmget, vec![sb("3"), None, sb("1")]);
    assert_eq!(
        three.zrange,
        vec![(b("neg"), -3.0), (b("one"), 1.5), (b("two"), 2.5)]
    );
    assert_eq!(three.zrevrange[0], (b("two"), 2.5));
    assert_eq!(three.zscore, Some(2.5));
    assert_eq!(three.zscore_missing, None);
    assert_eq!(three.zrank, Some(2));
    assert_eq!(three.zrank_missing, None);
    assert_eq!(three.smembers, HashSet::from([b("x"), b("y")]));
    assert_eq!(three.exists, 3);
    assert_eq!(three.key_type, "zset");
    assert!((990..=1000).contains(&three.ttl));
    assert_eq!(three.by_cmd[0], ("neg".to_owned(), -3.0));
    assert_eq!(
        three.eval,
        Value::Array(vec![Value::Int(42), bulk("text"), Value::Int(1)])
    );
    assert_eq!(three.shared_hash["k2"], "v2");
    assert_eq!(three.config.len(), 4);
    assert_eq!(three.config[&0]["maxmemory-policy"], "noeviction");
    assert_eq!(three.dbsize.values().sum::<i64>(), 8);
    assert!(three.ping.values().all(|p| p == "PONG"));
    assert!(three
        .version
        .values()
        .all(|v| v.as_deref().is_some_and(|v| v.starts_with('7'))));

    // The routing client agrees too.
    let z = "t:z";
    assert_eq!(
        resp2.routing_client().zrange_withscores(z, 0, -1).unwrap(),
        resp3.routing_client().zrange_withscores(z, 0, -1).unwrap()
    );
    assert!(matches!(
        resp3.routing_client().config_get("maxmemory-policy"),
        Err(Error::Unroutable { .. })
    ));
    assert_eq!(
        resp2
            .local_client(1)
            .unwrap()
            .config_get("maxmemory-policy")
            .unwrap(),
        resp3
            .local_client(1)
            .unwrap()
            .config_get("maxmemory-policy")
            .unwrap()
    );
}

/// `ZRANGE ... WITHSCORES` read into a map. RESP2 sends a flat array
/// `[m1, s1, m2, s2]`, RESP3 an array of pairs `[[m1, s1], [m2, s2]]`.
/// `Vec<(K, V)>` and `HashMap<K, V>` must read both (this once failed on
/// RESP3 with "cannot convert reply array of 3 (odd length) to HashMap").
#[test]
fn resp3_withscores_into_a_map() {
    let setup = TestSetup::new(1, 1).expect("start redis-server");
    let resp2 = setup.make_cluster().unwrap();
    let resp3 = Cluster::builder()
        .host(0, setup.host_config(0, 0).protocol(Protocol::Resp3))
        .build()
        .unwrap();
    resp2
        .routing_client()
        .zadd("z", &[(1.0, "one"), (2.5, "two"), (-3.0, "neg")])
        .unwrap();
    let want = HashMap::from([
        ("neg".to_owned(), -3.0),
        ("one".to_owned(), 1.0),
        ("two".to_owned(), 2.5),
    ]);
    let withscores = || rb::cmd("ZRANGE").arg("z").arg(0).arg(-1).arg("WITHSCORES");
    let two: HashMap<String, f64> = resp2.routing_client().cmd(withscores()).unwrap();
    assert_eq!(two, want);
    let three: rb::Result<HashMap<String, f64>> = resp3.routing_client().cmd(withscores());
    assert_eq!(
        three.map_err(|e| e.to_string()),
        Ok(want),
        "RESP3 reads the same map as RESP2"
    );
}

// ---------------------------------------------------------------------------
// 5. URLs
// ---------------------------------------------------------------------------

/// The server error of `result`: (host id, host address, command, code).
fn server_error<T: std::fmt::Debug>(result: rb::Result<T>) -> (HostId, String, String, String) {
    match result {
        Err(e @ Error::Server { .. }) => {
            let text = e.to_string();
            let Error::Server {
                host,
                command,
                code,
                ..
            } = e
            else {
                unreachable!()
            };
            let host = host.expect("the error names the host");
            assert!(text.contains(&format!("host {}", host.id)), "{text}");
            assert!(text.contains(&*command), "{text}");
            (
                host.id,
                host.addr.to_string(),
                command.to_string(),
                code.to_string(),
            )
        }
        other => panic!("expected a server error, got {other:?}"),
    }
}

#[test]
fn urls_reach_real_servers() {
    let setup = TestSetup::new(2, 1).expect("start redis-server");
    let sock = |i: usize| setup.socket(i).display().to_string();
    let urls = [
        format!("unix://{}?db=3", sock(0)),
        format!("unix://{}?db=5&protocol=3", sock(1)),
    ];
    let cluster = Cluster::from_urls(&urls).unwrap();
    let hosts = cluster.hosts();
    assert_eq!((hosts[0].db, hosts[1].db), (3, 5));
    assert_eq!(hosts[0].unix_socket_path.as_deref(), Some(sock(0).as_str()));
    assert_eq!(hosts[1].protocol, Protocol::Resp3);
    let k0 = key_on(&cluster, 0, "url");
    let k1 = key_on(&cluster, 1, "url");
    let c = cluster.routing_client();
    c.mset(&[(&k0, "zero"), (&k1, "one")]).unwrap();
    assert_eq!(c.mget(&[&k1, &k0]).unwrap(), vec![sb("one"), sb("zero")]);

    // Read back on the matching databases through host_config.
    let check = Cluster::builder()
        .host(0, setup.host_config(0, 3))
        .host(1, setup.host_config(1, 5))
        .build()
        .unwrap();
    assert_eq!(check.local_client(0).unwrap().get(&k0).unwrap(), sb("zero"));
    assert_eq!(check.local_client(1).unwrap().get(&k1).unwrap(), sb("one"));
    let db0 = setup.make_cluster().unwrap();
    for h in 0..2 {
        assert_eq!(
            db0.local_client(h).unwrap().dbsize().unwrap(),
            0,
            "db 0 untouched"
        );
    }
    let info = cluster
        .local_client(1)
        .unwrap()
        .cmd::<String>(rb::cmd("CLIENT").arg("INFO"))
        .unwrap();
    assert_eq!(client_field(&info, "db"), Some("5"));
    assert_eq!(client_field(&info, "resp"), Some("3"));

    // A password-protected server.
    let pw = TestSetup::new(1, 1).expect("start redis-server");
    let path = pw.socket(0).display().to_string();
    pw.make_cluster()
        .unwrap()
        .local_client(0)
        .unwrap()
        .config_set("requirepass", "s3cret")
        .unwrap();
    let good = Cluster::from_urls([format!("unix://{path}?password=s3cret")]).unwrap();
    good.routing_client().set("guarded", "yes").unwrap();
    assert_eq!(good.routing_client().get("guarded").unwrap(), sb("yes"));
    let admin = good.local_client(0).unwrap();
    assert_eq!(
        admin.cmd::<String>(rb::cmd("ACL").arg("WHOAMI")).unwrap(),
        "default"
    );
    let good3 = Cluster::from_urls([format!("unix://{path}?password=s3cret&protocol=3")]).unwrap();
    assert_eq!(good3.routing_client().get("guarded").unwrap(), sb("yes"));

    let wrong = Cluster::from_urls([format!("unix://{path}?password=wrong")]).unwrap();
    let (id, addr, command, code) = server_error(wrong.routing_client().get("guarded"));
    assert_eq!(id, 0);
    assert!(addr.contains(&path), "{addr}");
    assert_eq!(command, "AUTH");
    assert_eq!(code, "WRONGPASS");
    let wrong3 = Cluster::from_urls([format!("unix://{path}?password=wrong&protocol=3")]).unwrap();
    let (_, _, command, code) = server_error(wrong3.routing_client().get("guarded"));
    assert_eq!((command.as_str(), code.as_str()), ("HELLO", "WRONGPASS"));
    let none = Cluster::from_urls([format!("unix://{path}")]).unwrap();
    let (_, _, command, code) = server_error(none.routing_client().get("guarded"));
    assert_eq!((command.as_str(), code.as_str()), ("GET", "NOAUTH"));

    // An ACL user.
    admin
        .cmd::<()>(
            rb::cmd("ACL")
                .arg("SETUSER")
                .arg("alice")
                .arg("on")
                .arg(">pw")
                .arg("~*")
                .arg("+@all"),
        )
        .unwrap();
    let alice = Cluster::from_urls([format!("unix://{path}?username=alice&password=pw")]).unwrap();
    assert_eq!(alice.hosts()[0].username.as_deref(), Some("alice"));
    let a = alice.routing_client();
    a.set("by-alice", 1).unwrap();
    assert_eq!(good.routing_client().get("by-alice").unwrap(), sb("1"));
    assert_eq!(
        alice
            .local_client(0)
            .unwrap()
            .cmd::<String>(rb::cmd("ACL").arg("WHOAMI"))
            .unwrap(),
        "alice"
    );
    let bad_alice =
        Cluster::from_urls([format!("unix://{path}?username=alice&password=nope")]).unwrap();
    let (_, _, command, code) = server_error(bad_alice.routing_client().get("by-alice"));
    assert_eq!((command.as_str(), code.as_str()), ("AUTH", "WRONGPASS"));
}

// ---------------------------------------------------------------------------
// 6. type mismatches
// ---------------------------------------------------------------------------

#[test]
fn type_mismatch_is_a_clear_error() {
    let (_setup, cluster) = cluster(2, 2);
    let c = cluster.routing_client();
    let text = key_on(&cluster, 1, "text");
    let near = key_on(&cluster, 1, "near");
    let nums: Vec<String> = (0..4).map(|h| key_on(&cluster, h, "num")).collect();
    c.set(&text, "not-a-number").unwrap();
    c.set(&near, 5).unwrap();
    for (i, k) in nums.iter().enumerate() {
        c.set(k, i * 10).unwrap();
    }

    // GET converted to i64: a type error naming host 1 and GET.
    let addr = cluster.host(1).unwrap().unix_socket_path.clone().unwrap();
    let check_type = |e: &Error| {
        let text_form = e.to_string();
        match e {
            Error::Type {
                host: Some(h),
                command: Some(command),
                expected,
                got,
            } => {
                assert_eq!(h.id, 1);
                assert!(h.addr.contains(&addr), "{}", h.addr);
                assert_eq!(&**command, "GET");
                assert_eq!(*expected, "i64");
                assert!(got.contains("not-a-number"), "{got}");
            }
            other => panic!("expected a type error, got {other:?}"),
        }
        assert!(text_form.contains("host 1"), "{text_form}");
        assert!(text_form.contains("GET"), "{text_form}");
    };
    let e = c.cmd::<i64>(rb::cmd("GET").arg(&text)).unwrap_err();
    check_type(&e);
    assert_eq!(e.code(), None);

    // HGETALL on a string: the server's WRONGTYPE.
    let (id, _, command, code) = server_error(c.hgetall(&text));
    assert_eq!(
        (id, command.as_str(), code.as_str()),
        (1, "HGETALL", "WRONGTYPE")
    );
    assert_eq!(c.hgetall(&text).unwrap_err().code(), Some("WRONGTYPE"));
    assert_eq!(c.incr(&text).unwrap_err().code(), Some("ERR"));

    // In a map: the failures stay with their promises; every other host's
    // (and host 1's later) commands still resolve.
    let mut kept = Vec::new();
    let result = cluster.map(|m| {
        // Two GETs in a row to host 1 are merged into one MGET.
        let near_get = m.get(&near);
        let bad_type = m.cmd::<i64>(rb::cmd("GET").arg(&text));
        let wrong = m.hgetall(&text);
        let after = m.incr(&near);
        let others: Vec<(Promise<Option<Bytes>>, Promise<i64>)> =
            nums.iter().map(|k| (m.get(k), m.incr_by(k, 1))).collect();
        kept.push((near_get, bad_type, wrong, after, others));
    });
    let first = result.unwrap_err();
    assert!(
        matches!(&first, Error::Type { .. }) || first.code() == Some("WRONGTYPE"),
        "{first:?}"
    );
    let (near_get, bad_type, wrong, after, others) = kept.pop().unwrap();
    assert_eq!(near_get.value().unwrap(), sb("5"));
    assert!(bad_type.is_rejected());
    check_type(&bad_type.reason().unwrap());
    assert!(wrong.is_rejected());
    let (id, _, command, code) = server_error(wrong.value());
    assert_eq!(
        (id, command.as_str(), code.as_str()),
        (1, "HGETALL", "WRONGTYPE")
    );
    assert_eq!(after.value().unwrap(), 6);
    for (i, (get, incr)) in others.iter().enumerate() {
        assert_eq!(get.value().unwrap(), sb((i * 10).to_string()));
        assert_eq!(incr.value().unwrap(), i as i64 * 10 + 1);
    }
    assert_eq!(
        c.get(&text).unwrap(),
        sb("not-a-number"),
        "nothing changed it"
    );
}
