use rb::testing::TestSetup;
use rb::{Commands, Hosts};

#[test]
fn smoke() {
    let setup = TestSetup::new(2, 2).unwrap();
    let cluster = setup.make_cluster().unwrap();
    let client = cluster.routing_client();
    client.set("foo", 42).unwrap();
    assert_eq!(client.get("foo").unwrap(), Some(b"42".to_vec()));
    let mut ps = Vec::new();
    cluster
        .map(|c| {
            for i in 0..1000 {
                c.set(format!("k{i}"), i);
            }
            for i in 0..1000 {
                ps.push(c.get(format!("k{i}")));
            }
        })
        .unwrap();
    for (i, p) in ps.iter().enumerate() {
        assert_eq!(p.value().unwrap(), Some(i.to_string().into_bytes()));
    }
    let sizes = cluster.fanout(Hosts::All, |c| c.dbsize()).unwrap();
    let total: i64 = sizes.value().unwrap().values().sum();
    assert_eq!(total, 1001);
}
