//! Hash tags against real servers: commands whose keys share a tag run as
//! one command on the tag's host (counted in that server's `INFO
//! commandstats`, one host per server here), keys with different tags are
//! refused, and without tags rb's rules hold.

use rb::testing::TestSetup;
use rb::{cmd, Cluster, Commands, Error, HostId, Script};

mod common;
use common::command_calls;

const SERVERS: usize = 4;

/// Fresh servers and a cluster over them with `{}` tags.
fn tagged() -> (TestSetup, Cluster) {
    let setup = TestSetup::new(SERVERS, 1).expect("start redis-server");
    let cluster = setup
        .cluster_builder()
        .hash_tag(b"{}")
        .build()
        .expect("build the cluster");
    (setup, cluster)
}

/// Calls of `command` on every host.
fn calls(cluster: &Cluster, command: &str) -> Vec<u64> {
    (0..SERVERS as HostId)
        .map(|h| command_calls(cluster, h, command))
        .collect()
}

/// `before` with one more call on `host`.
fn one_more(before: &[u64], host: HostId) -> Vec<u64> {
    let mut want = before.to_vec();
    want[host as usize] += 1;
    want
}

/// A tag per host, so the tests cover every host.
fn tag_on(cluster: &Cluster, host: HostId) -> String {
    let router = cluster.router().unwrap();
    (0..)
        .map(|i| format!("user{i}"))
        .find(|t| router.host_for_key(t.as_bytes()).unwrap() == host)
        .unwrap()
}

#[test]
fn sunionstore_and_rename_on_one_tag_run_once_on_its_host() {
    let (_setup, cluster) = tagged();
    let client = cluster.routing_client();
    for host in 0..SERVERS as HostId {
        let t = tag_on(&cluster, host);
        let (a, b, d) = (
            format!("{{{t}}}:a"),
            format!("{{{t}}}:b"),
            format!("{{{t}}}:d"),
        );
        client.sadd(&a, &["1", "2"]).unwrap();
        client.sadd(&b, &["2", "3"]).unwrap();

        let before = calls(&cluster, "sunionstore");
        let n: i64 = client
            .cmd(cmd("SUNIONSTORE").arg(&d).arg(&a).arg(&b))
            .unwrap();
        assert_eq!(n, 3);
        assert_eq!(calls(&cluster, "sunionstore"), one_more(&before, host));
        assert_eq!(client.scard(&d).unwrap(), 3);

        let moved = format!("{{{t}}}:moved");
        let before = calls(&cluster, "rename");
        client.cmd::<()>(cmd("RENAME").arg(&d).arg(&moved)).unwrap();
        assert_eq!(calls(&cluster, "rename"), one_more(&before, host));
        assert_eq!(client.scard(&moved).unwrap(), 3);
        assert_eq!(client.exists(&[&d]).unwrap(), 0);
        // Every key of the tag lives on the tag's host.
        let local = cluster.local_client(host).unwrap();
        assert_eq!(local.exists(&[&a, &b, &moved]).unwrap(), 3);
    }
}

#[test]
fn different_or_missing_tags_are_refused() {
    let (_setup, cluster) = tagged();
    let client = cluster.routing_client();
    let before = calls(&cluster, "rename");
    for (c, why) in [
        (
            cmd("RENAME").arg("{u1}a").arg("{u2}b"),
            "different hash tags",
        ),
        (
            cmd("SUNIONSTORE").arg("{u1}d").arg("{u1}a").arg("plain"),
            "\"plain\" has none",
        ),
        (cmd("RENAME").arg("a").arg("b"), "multiple keys"),
    ] {
        let e = client.cmd::<()>(c.clone()).unwrap_err();
        assert!(matches!(e, Error::Unroutable { .. }), "{c:?}: {e:?}");
        assert!(e.to_string().contains(why), "{c:?}: {e}");
        // The same in a map and on the async client.
        let mut p = None;
        assert!(cluster.map(|m| p = Some(m.cmd::<()>(c.clone()))).is_err());
        assert!(p.unwrap().value().is_err());
        let e = cluster.async_client().cmd::<()>(c).wait().unwrap_err();
        assert!(matches!(e, Error::Unroutable { .. }), "{e:?}");
    }
    assert_eq!(calls(&cluster, "rename"), before, "nothing was sent");
}

#[test]
fn mget_mset_del_of_one_tag_are_not_split() {
    let (_setup, cluster) = tagged();
    let client = cluster.routing_client();
    let host = 2;
    let t = tag_on(&cluster, host);
    let keys: Vec<String> = (0..50).map(|i| format!("{{{t}}}:k{i}")).collect();
    // Without the tag these keys would span every host.
    let plain = Cluster::builder()
        .hosts((0..SERVERS).map(|_| rb::HostConfig::new()))
        .build()
        .unwrap()
        .router()
        .unwrap();
    let mut spread: Vec<HostId> = keys
        .iter()
        .map(|k| plain.host_for_key(k.as_bytes()).unwrap())
        .collect();
    spread.sort_unstable();
    spread.dedup();
    assert_eq!(spread.len(), SERVERS);

    let pairs: Vec<(String, usize)> = keys.iter().cloned().zip(0..).collect();
    let before = calls(&cluster, "mset");
    client.mset(&pairs).unwrap();
    assert_eq!(calls(&cluster, "mset"), one_more(&before, host));

    let before = calls(&cluster, "mget");
    let values = client.mget(&keys).unwrap();
    assert_eq!(calls(&cluster, "mget"), one_more(&before, host));
    for (i, v) in values.iter().enumerate() {
        assert_eq!(v.as_deref(), Some(i.to_string().as_bytes()));
    }
    // In a map and on the async client too: one MGET each.
    let before = calls(&cluster, "mget");
    let mut p = None;
    cluster.map(|m| p = Some(m.mget(&keys))).unwrap();
    assert_eq!(p.unwrap().value().unwrap(), values);
    let async_values = cluster.async_client().mget(&keys).wait().unwrap();
    assert_eq!(async_values, values);
    let mut want = before.clone();
    want[host as usize] += 2;
    assert_eq!(calls(&cluster, "mget"), want);

    let before = calls(&cluster, "del");
    assert_eq!(client.del(&keys).unwrap(), 50);
    assert_eq!(calls(&cluster, "del"), one_more(&before, host));

    // Different tags still split, per host, as rb does.
    let mixed: Vec<String> = (0..SERVERS as HostId)
        .map(|h| format!("{{{}}}:x", tag_on(&cluster, h)))
        .collect();
    let before = calls(&cluster, "mget");
    assert_eq!(client.mget(&mixed).unwrap(), vec![None; SERVERS]);
    let after = calls(&cluster, "mget");
    assert!(
        after.iter().zip(&before).all(|(a, b)| a - b == 1),
        "{before:?} -> {after:?}"
    );
}

#[test]
fn scripts_over_several_keys_of_one_tag_run_on_its_host() {
    let (_setup, cluster) = tagged();
    let client = cluster.routing_client();
    let host = 1;
    let t = tag_on(&cluster, host);
    let (a, b) = (format!("{{{t}}}:a"), format!("{{{t}}}:b"));
    let script =
        Script::new("redis.call('SET', KEYS[1], ARGV[1]); return redis.call('INCR', KEYS[2])");
    let n = client.eval_script(&script, &[&a, &b], &["v"]).unwrap();
    assert_eq!(n, rb::Value::Int(1));
    let local = cluster.local_client(host).unwrap();
    assert_eq!(local.get(&a).unwrap().as_deref(), Some(&b"v"[..]));
    assert_eq!(local.get(&b).unwrap().as_deref(), Some(&b"1"[..]));
    // EVAL as a plain command, several keys of the tag.
    let before = calls(&cluster, "eval");
    let n: i64 = client
        .cmd(
            cmd("EVAL")
                .arg("return redis.call('INCR', KEYS[2])")
                .arg(2)
                .arg(&a)
                .arg(&b),
        )
        .unwrap();
    assert_eq!(n, 2);
    assert_eq!(calls(&cluster, "eval"), one_more(&before, host));
    // Different tags: refused, naming the script call.
    let e = client
        .eval_script(&script, &["{x}a", "{y}b"], &["v"])
        .unwrap_err();
    assert!(e.to_string().contains("different hash tags"), "{e}");
}

#[test]
fn without_tags_braces_mean_nothing() {
    let setup = TestSetup::new(SERVERS, 1).expect("start redis-server");
    let cluster = setup.make_cluster().unwrap();
    let e = cluster
        .routing_client()
        .cmd::<()>(cmd("RENAME").arg("{u1}a").arg("{u1}b"))
        .unwrap_err();
    assert!(e.to_string().contains("multiple keys"), "{e}");
    let router = cluster.router().unwrap();
    let tagged = Cluster::builder()
        .hosts((0..SERVERS).map(|_| rb::HostConfig::new()))
        .hash_tag(b"{}")
        .build()
        .unwrap()
        .router()
        .unwrap();
    // Same placement for untagged keys, tag placement for tagged ones.
    for i in 0..1000 {
        let key = format!("key{i}");
        assert_eq!(
            router.host_for_key(key.as_bytes()).unwrap(),
            tagged.host_for_key(key.as_bytes()).unwrap()
        );
        let with_tag = format!("{{key{i}}}:rest");
        assert_eq!(
            tagged.host_for_key(with_tag.as_bytes()).unwrap(),
            router.host_for_key(key.as_bytes()).unwrap()
        );
    }
}
