//! No password ever appears in an error, a `Debug` or a `Display`.

use std::time::Duration;

mod common;
use common::watch::within;
use rb::testing::TestSetup;
use rb::{Cluster, Commands, HostConfig};

const SECRET: &str = "pa/ss-secret";
/// Fragments of [`SECRET`] that must not leak either (e.g. a URL split at
/// its `/`).
const FRAGMENTS: [&str; 3] = ["pa/ss-secret", "ss-secret", "pa/ss"];

fn leaks(text: &str) -> Vec<&'static str> {
    FRAGMENTS
        .iter()
        .copied()
        .filter(|f| text.contains(f))
        .collect()
}

fn assert_no_secret(what: &str, text: &str) {
    let found = leaks(text);
    assert!(found.is_empty(), "{what} shows {found:?}: {text}");
}

/// A port nothing listens on (bound, then released).
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// `Debug` of a `HostConfig` with a password does not show it.
#[test]
fn host_config_debug_redacts_the_password() {
    let cfg = HostConfig::new().password(SECRET);
    assert_no_secret("Debug of HostConfig", &format!("{cfg:?}"));
    let cfg = HostConfig::new().username("alice").password(SECRET);
    assert_no_secret("alternate Debug of HostConfig", &format!("{cfg:#?}"));
}

/// `Debug` of the resolved `HostInfo` of a host with a password does not
/// show it.
#[test]
fn host_info_debug_redacts_the_password() {
    let cluster = Cluster::builder()
        .host(0, HostConfig::new().password(SECRET))
        .build()
        .expect("cluster");
    let info = cluster.host(0).expect("host 0");
    assert_no_secret("Debug of HostInfo", &format!("{info:?}"));
}

/// A URL that does not parse (`redis://:pa/ss-secret@host:notaport`: the
/// `/` ends the authority early) is an error whose `Display` and `Debug`
/// show no part of the password.
#[test]
fn bad_url_error_shows_no_part_of_the_password() {
    let mut leaked = Vec::new();
    for url in [
        "redis://:pa/ss-secret@host:notaport",
        "redis://user:pa/ss-secret@host:notaport",
        "redis://:pa%2Fss-secret@host:notaport",
        "rediss://:pa/ss-secret@host:1/notadb",
        "unix:///tmp/x.sock?password=pa/ss-secret&db=x",
    ] {
        let texts = match HostConfig::from_url(url) {
            Err(e) => vec![
                ("Display of the error", e.to_string()),
                ("Debug of the error", format!("{e:?}")),
            ],
            Ok(cfg) => vec![("Debug of the parsed config", format!("{cfg:?}"))],
        };
        for (what, text) in texts {
            let found = leaks(&text);
            if !found.is_empty() {
                leaked.push(format!("{url}: {what} shows {found:?}: {text}"));
            }
        }
    }
    assert!(leaked.is_empty(), "{}", leaked.join("\n"));
}

/// `Debug` of a `Cluster` (and of its builder and clients) whose hosts
/// have passwords shows none of them.
#[test]
fn cluster_debug_redacts_passwords() {
    let cluster = Cluster::builder()
        .host_defaults(HostConfig::new().password(SECRET))
        .host(0, HostConfig::new().port(1))
        .host(1, HostConfig::new().port(2).password(SECRET))
        .build()
        .expect("cluster");
    assert_no_secret("Debug of Cluster", &format!("{cluster:?}"));
    assert_no_secret(
        "Debug of RoutingClient",
        &format!("{:?}", cluster.routing_client()),
    );
    let builder = Cluster::builder().host(0, HostConfig::new().password(SECRET));
    assert_no_secret("Debug of ClusterBuilder", &format!("{builder:#?}"));
}

/// A connection error (refused port) of a host with a password, from a
/// config and from a URL, shows no part of it.
#[test]
fn connection_error_of_a_host_with_a_password_shows_no_part_of_it() {
    let port = closed_port();
    let from_config = Cluster::builder()
        .host(
            0,
            HostConfig::new()
                .host("127.0.0.1")
                .port(port)
                .password(SECRET)
                .connect_timeout(Duration::from_secs(2)),
        )
        .build()
        .expect("cluster");
    let from_url = Cluster::from_urls([format!("redis://u:pa%2Fss-secret@127.0.0.1:{port}/0")])
        .expect("cluster from a URL");
    for (label, cluster) in [("config", from_config), ("URL", from_url)] {
        let result = within(Duration::from_secs(10), "GET to a closed port", move || {
            cluster.routing_client().get("k")
        })
        .expect("bounded");
        let e = result.expect_err("a closed port refuses");
        assert_no_secret(
            &format!("Display of the {label} host's error"),
            &e.to_string(),
        );
        assert_no_secret(
            &format!("Debug of the {label} host's error"),
            &format!("{e:?}"),
        );
    }
}

/// A failed `AUTH` (a server with `requirepass`, a wrong password that is
/// the secret) is an error that shows no part of the password sent.
#[test]
fn auth_failure_error_shows_no_part_of_the_password() {
    let setup = TestSetup::with_config(1, 1, |_| "requirepass right\n".into())
        .expect("start redis-server with a password");
    let cluster = Cluster::builder()
        .host(0, setup.host_config(0, 0).password(SECRET))
        .build()
        .expect("cluster");
    let result = within(
        Duration::from_secs(10),
        "GET with a wrong password",
        move || cluster.routing_client().get("k"),
    )
    .expect("bounded");
    let e = result.expect_err("a wrong password fails");
    assert_no_secret("Display of the AUTH error", &e.to_string());
    assert_no_secret("Debug of the AUTH error", &format!("{e:?}"));
}
