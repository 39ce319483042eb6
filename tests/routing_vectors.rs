//! Every row of `tests/data/routing.tsv` (3000 keys routed by the real
//! Python rb 1.11.0) must route identically here, for both routers, every
//! cluster size and every host layout of `routing-layouts.json`.

use rb::{Cluster, HostConfig, RouterKind};
use serde_json::Value as Json;

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex in the vectors"))
        .collect()
}

/// Column header like `ketama:tcp-ports(n=1,2,3)` -> ("ketama:tcp-ports", [1, 2, 3]).
fn column(header: &str) -> (String, Vec<usize>) {
    let (name, sizes) = header.split_once("(n=").expect("sizes in header");
    let sizes = sizes
        .trim_end_matches(')')
        .split(',')
        .map(|n| n.parse().unwrap())
        .collect();
    (name.to_owned(), sizes)
}

fn host_config(j: &Json) -> HostConfig {
    let mut cfg = HostConfig::new();
    let obj = j.as_object().expect("host config object");
    for (k, v) in obj {
        cfg = match k.as_str() {
            "host" => cfg.host(v.as_str().unwrap()),
            "port" => cfg.port(v.as_u64().unwrap() as u16),
            "db" => cfg.db(v.as_i64().unwrap()),
            "password" => cfg.password(v.as_str().unwrap()),
            "unix_socket_path" => cfg.unix_socket_path(v.as_str().unwrap()),
            other => panic!("layout field {other} not handled"),
        };
    }
    cfg
}

fn cluster_for(layout: &Json, kind: RouterKind) -> Cluster {
    let mut b = Cluster::builder()
        .host_defaults(host_config(&layout["host_defaults"]))
        .router(kind);
    for (id, cfg) in layout["hosts"].as_object().unwrap() {
        b = b.host(id.parse().unwrap(), host_config(cfg));
    }
    b.build().expect("layout builds")
}

#[test]
fn ring_node_names_match_python_repr() {
    let layouts: Json = serde_json::from_str(include_str!("data/routing-layouts.json")).unwrap();
    let mut checked = 0;
    for layout in layouts.as_array().unwrap() {
        let cluster = cluster_for(layout, RouterKind::ConsistentHashing);
        let names: Vec<String> = cluster.hosts().iter().map(|h| h.ring_name()).collect();
        let want: Vec<String> = layout["ring_node_names"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap().to_owned())
            .collect();
        assert_eq!(names, want, "layout {} n={}", layout["layout"], layout["n"]);
        checked += 1;
    }
    assert_eq!(checked, 48);
}

#[test]
fn every_vector_routes_like_python_rb() {
    let layouts: Json = serde_json::from_str(include_str!("data/routing-layouts.json")).unwrap();
    let tsv = include_str!("data/routing.tsv");
    let mut lines = tsv.lines();
    let header: Vec<&str> = lines.next().unwrap().split('\t').collect();
    assert_eq!(&header[..2], ["# kind", "key_hex"]);

    // One router per (column, n).
    let mut routers = Vec::new();
    for h in &header[2..] {
        let (name, sizes) = column(h);
        let mut per_size = Vec::new();
        for n in sizes {
            let cluster = if name == "partition" {
                let mut b = Cluster::builder();
                for id in 0..n as u32 {
                    b = b.host(id, HostConfig::new());
                }
                b.build().unwrap()
            } else {
                let layout_name = name.strip_prefix("ketama:").unwrap();
                let layout = layouts
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|l| l["layout"] == layout_name && l["n"] == n)
                    .unwrap_or_else(|| panic!("no layout {layout_name} n={n}"));
                cluster_for(layout, RouterKind::ConsistentHashing)
            };
            per_size.push((n, cluster.router().unwrap()));
        }
        routers.push((name, per_size));
    }

    let mut rows = 0;
    let mut answers = 0;
    for line in lines {
        let fields: Vec<&str> = line.split('\t').collect();
        let key = unhex(fields[1]);
        for ((name, per_size), expected) in routers.iter().zip(&fields[2..]) {
            let expected: Vec<u32> = expected.split(',').map(|x| x.parse().unwrap()).collect();
            assert_eq!(expected.len(), per_size.len());
            for ((n, router), want) in per_size.iter().zip(expected) {
                let got = router.host_for_key(&key).unwrap();
                assert_eq!(got, want, "{name} n={n} key {} ({})", fields[1], fields[0]);
                answers += 1;
            }
        }
        rows += 1;
    }
    assert_eq!(rows, 3000);
    assert_eq!(answers, 3000 * (14 + 4 * 12));
}

#[test]
fn integer_keys_route_as_their_decimal_text() {
    let cluster = Cluster::builder()
        .hosts((0..7).map(|_| HostConfig::new()))
        .build()
        .unwrap();
    let router = cluster.router().unwrap();
    let by_text = router.host_for_key(b"-859280659516").unwrap();
    let by_arg = router
        .host_for_key(&rb::args::to_bytes(&-859280659516i64))
        .unwrap();
    assert_eq!(by_text, by_arg);
}
