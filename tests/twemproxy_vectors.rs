//! Every row of `tests/data/twemproxy-routing.tsv` (500 keys placed by the
//! real nutcracker 0.5.0 under each of the 1248 configurations of
//! `twemproxy-layouts.json`: ketama and modula, the twelve hashes, 2 to 8
//! servers plain, named, weighted and with names longer than nutcracker's
//! point-name buffer, hash tags off, `{}` and `::`) must route identically
//! through a cluster built from the same server lines.

use rb::{Cluster, Distribution, HashTag, HostConfig, RouterKind, TwemproxyHash, TwemproxyRing};
use serde_json::Value as Json;

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex in the vectors"))
        .collect()
}

/// The cluster nutcracker's layout describes: hosts in file order, ids 0..n.
fn cluster_for(layout: &Json) -> Cluster {
    let ring = TwemproxyRing {
        distribution: layout["distribution"]
            .as_str()
            .unwrap()
            .parse::<Distribution>()
            .unwrap(),
        hash: layout["hash"]
            .as_str()
            .unwrap()
            .parse::<TwemproxyHash>()
            .unwrap(),
    };
    let mut b = Cluster::builder().router(RouterKind::Twemproxy(ring));
    if let Some(tag) = layout["hash_tag"].as_str() {
        b = b.hash_tag(tag.parse::<HashTag>().unwrap());
    }
    let lines = layout["servers"].as_array().unwrap();
    b = b.hosts(
        lines
            .iter()
            .map(|l| HostConfig::from_twemproxy(l.as_str().unwrap()).unwrap()),
    );
    b.build().expect("layout builds")
}

#[test]
fn every_vector_routes_like_nutcracker() {
    let layouts: Json = serde_json::from_str(include_str!("data/twemproxy-layouts.json")).unwrap();
    let tsv = include_str!("data/twemproxy-routing.tsv");
    let mut lines = tsv.lines();
    let header: Vec<&str> = lines.next().unwrap().split('\t').collect();
    assert_eq!(header[0], "key_hex");
    let routers: Vec<_> = header[1..]
        .iter()
        .map(|name| {
            let layout = &layouts[*name];
            assert!(layout.is_object(), "no layout {name}");
            (*name, cluster_for(layout).router().unwrap())
        })
        .collect();
    assert_eq!(routers.len(), 1248);
    assert_eq!(layouts.as_object().unwrap().len(), 1248);

    let (mut rows, mut answers) = (0, 0);
    let mut wrong = Vec::new();
    for line in lines {
        let fields: Vec<&str> = line.split('\t').collect();
        assert_eq!(fields.len(), header.len());
        let key = unhex(fields[0]);
        for ((name, router), want) in routers.iter().zip(&fields[1..]) {
            let want: u32 = want.parse().unwrap();
            let got = router.host_for_key(&key).unwrap();
            if got != want {
                wrong.push(format!(
                    "{name} key {}: {got}, nutcracker {want}",
                    fields[0]
                ));
            }
            answers += 1;
        }
        rows += 1;
    }
    assert!(
        wrong.is_empty(),
        "{} of {answers} differ, e.g.\n{}",
        wrong.len(),
        wrong[..wrong.len().min(20)].join("\n")
    );
    assert_eq!(rows, 500);
    assert_eq!(answers, 500 * 1248);
}

/// The keys whose hash tag is the same route together, and (with `{}`) as
/// the tag alone would.
#[test]
fn tagged_keys_route_by_their_tag() {
    let layouts: Json = serde_json::from_str(include_str!("data/twemproxy-layouts.json")).unwrap();
    let layout = &layouts["ketama-fnv1a_64-k5-plain-braces"];
    let router = cluster_for(layout).router().unwrap();
    for user in 0..200 {
        let alone = router
            .host_for_key(format!("user{user}").as_bytes())
            .unwrap();
        for suffix in ["cart", "profile", "x"] {
            let key = format!("{{user{user}}}:{suffix}");
            assert_eq!(router.host_for_key(key.as_bytes()).unwrap(), alone, "{key}");
        }
    }
}
