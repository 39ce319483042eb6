//! The fleet-wide scan against real servers: 100,000 keys over 8 hosts each
//! seen exactly once, a walk resumed from a printed cursor, pattern and type
//! filters, a host killed mid-walk, key scans and the async page form.

use std::collections::HashSet;

mod common;
use rb::testing::TestSetup;
use rb::{Commands, Error, ScanCursor, ScanOptions};

fn seeded(servers: usize, dbs: usize, keys: usize) -> (TestSetup, rb::Cluster) {
    let setup = TestSetup::new(servers, dbs).expect("start redis-server");
    let cluster = setup.make_cluster().expect("cluster");
    cluster
        .map(|c| {
            for i in 0..keys {
                c.set(format!("k:{i}"), i);
            }
        })
        .expect("seed");
    (setup, cluster)
}

#[test]
fn every_key_once_and_a_walk_resumes_from_a_printed_cursor() {
    let (_setup, cluster) = seeded(4, 2, 100_000);
    let keys: Vec<Vec<u8>> = cluster
        .scan(ScanOptions::new().count(1000))
        .collect::<Result<_, _>>()
        .expect("scan");
    let unique: HashSet<&Vec<u8>> = keys.iter().collect();
    assert_eq!(keys.len(), 100_000, "each key once");
    assert_eq!(unique.len(), 100_000);

    // Stop part-way, print the position, resume from the parsed text.
    let mut first = cluster.scan(ScanOptions::new().count(500));
    let mut seen: HashSet<Vec<u8>> = first
        .by_ref()
        .take(30_000)
        .map(|k| k.expect("key"))
        .collect();
    let printed = first.position().expect("not done").to_string();
    let at: ScanCursor = printed.parse().expect("parse the printed cursor");
    println!("resuming at {printed}");
    for key in cluster.scan_from(at, ScanOptions::new().count(500)) {
        seen.insert(key.expect("key"));
    }
    assert_eq!(seen.len(), 100_000, "the resumed walk finished it");
}

#[test]
fn pattern_and_type_filters() {
    let (_setup, cluster) = seeded(2, 2, 1000);
    cluster
        .map(|c| {
            for i in 0..100 {
                c.hset(format!("h:{i}"), "f", i);
            }
            for i in 0..50 {
                c.sadd(format!("s:{i}"), &["m"]);
            }
        })
        .expect("seed");
    let count = |opts: ScanOptions| {
        cluster
            .scan(opts)
            .collect::<Result<Vec<_>, _>>()
            .expect("scan")
            .len()
    };
    assert_eq!(count(ScanOptions::new().pattern("h:*")), 100);
    assert_eq!(count(ScanOptions::new().key_type("set")), 50);
    assert_eq!(count(ScanOptions::new().pattern("k:1??")), 100);
    assert_eq!(count(ScanOptions::new()), 1150);
}

/// A host killed before the walk reaches it gives one error naming it; the
/// walk goes on with the next host and says where the failed one stood.
#[test]
fn a_host_killed_mid_walk_is_one_error() {
    let (mut setup, cluster) = seeded(4, 1, 4000);
    let mut scan = cluster.scan(ScanOptions::new().count(100));
    let first = scan.next().expect("a key").expect("host 0 works");
    assert!(!first.is_empty());
    setup.kill(2).expect("kill host 2");
    let mut keys = 1;
    let mut errors = Vec::new();
    for item in scan.by_ref() {
        match item {
            Ok(_) => keys += 1,
            Err(e) => errors.push(e),
        }
    }
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].host().map(|h| h.id), Some(2), "{}", errors[0]);
    assert_eq!(scan.failed(), &[ScanCursor::new(2, 0)]);
    let on_host_2 = (0..4000)
        .filter(|i| common::host_of(&cluster, &format!("k:{i}")) == 2)
        .count();
    assert_eq!(keys, 4000 - on_host_2, "every other host's keys");
}

#[test]
fn key_scans_and_the_async_page_form() {
    let (_setup, cluster) = seeded(2, 1, 500);
    let client = cluster.routing_client();
    let members: Vec<String> = (0..300).map(|i| format!("m{i}")).collect();
    client.sadd("set", &members).expect("SADD");
    for i in 0..300 {
        client.hset("hash", format!("f{i}"), i).expect("HSET");
        client
            .zadd("zset", &[(i as f64, format!("z{i}"))])
            .expect("ZADD");
    }
    let opts = ScanOptions::new().count(50);
    let got: HashSet<Vec<u8>> = client
        .sscan_iter("set", opts.clone())
        .collect::<Result<_, _>>()
        .expect("SSCAN");
    assert_eq!(got.len(), 300);
    let fields: Vec<(Vec<u8>, Vec<u8>)> = client
        .hscan_iter("hash", opts.clone())
        .collect::<Result<_, _>>()
        .expect("HSCAN");
    assert_eq!(fields.len(), 300);
    let scores: f64 = client
        .zscan_iter("zset", opts.clone())
        .map(|r| r.expect("ZSCAN").1)
        .sum();
    assert_eq!(scores, (0..300).sum::<i32>() as f64);
    let err = client.sscan_iter("hash", opts).next().expect("an item");
    assert!(matches!(err, Err(Error::Server { .. })), "{err:?}");

    let async_client = cluster.async_client();
    let mut at = Some(ScanCursor::start());
    let mut keys = HashSet::new();
    while let Some(cursor) = at {
        let page = async_client
            .scan_page(cursor, &ScanOptions::new().count(100))
            .wait()
            .expect("page");
        keys.extend(page.keys);
        at = page.next;
    }
    assert_eq!(keys.len(), 503);
}
