//! Helpers shared by the integration tests (each test file that needs them
//! says `mod common;`; not every file uses every helper).
#![allow(dead_code)]

pub mod proxy;
pub mod watch;

use rb::testing::TestSetup;
use rb::{Cluster, Commands, HostConfig, HostId, RouterKind};

/// Fresh servers and the cluster over them: `servers * dbs` hosts.
pub fn cluster(servers: usize, dbs: usize) -> (TestSetup, Cluster) {
    let setup = TestSetup::new(servers, dbs).expect("start redis-server");
    let cluster = setup.make_cluster().expect("build the test cluster");
    (setup, cluster)
}

/// As [`cluster`], with health checks off: every request meets the
/// server as it is (a stopped server keeps timing out instead of being
/// marked Down), for tests of the engine itself.
pub fn cluster_without_health(servers: usize, dbs: usize) -> (TestSetup, Cluster) {
    let setup = TestSetup::new(servers, dbs).expect("start redis-server");
    let cluster = setup
        .cluster_builder()
        .health(rb::HealthPolicy::disabled())
        .build()
        .expect("build the test cluster");
    (setup, cluster)
}

/// The host the cluster's router gives `key`.
pub fn host_of(cluster: &Cluster, key: &str) -> HostId {
    cluster
        .router()
        .expect("router")
        .host_for_key(key.as_bytes())
        .expect("route")
}

/// Calls of `command` (lower case, `script|load` for subcommands) on the
/// server behind `host`, from `INFO commandstats`; 0 when never called.
/// The stats are per server, shared by all its databases.
pub fn command_calls(cluster: &Cluster, host: HostId, command: &str) -> u64 {
    let info = cluster
        .local_client(host)
        .expect("local client")
        .info(Some("commandstats"))
        .expect("INFO commandstats");
    match info.get(&format!("cmdstat_{command}")) {
        None => 0,
        Some(stats) => stats
            .split(',')
            .find_map(|f| f.strip_prefix("calls="))
            .expect("calls= field")
            .parse()
            .expect("calls is a number"),
    }
}

/// Server `i` of `setup` over TCP (a setup made `with_tcp`).
pub fn tcp(setup: &TestSetup, i: usize) -> HostConfig {
    let port = setup.tcp_port(i).expect("a TCP port");
    HostConfig::new().host("127.0.0.1").port(port)
}

/// A partition cluster over the TCP ports of servers `0..n` of `setup`
/// (host `i` on server `i`).
pub fn over_tcp(setup: &TestSetup, n: usize) -> Cluster {
    let mut b = Cluster::builder().router(RouterKind::Partition);
    for i in 0..n {
        b = b.host(i as u32, tcp(setup, i));
    }
    b.build().expect("cluster")
}

/// A partition cluster over the unix sockets of servers `0..n` of `setup`
/// (host `i` on server `i`), migrating from `from` if given.
pub fn over_unix(setup: &TestSetup, n: usize, from: Option<&Cluster>) -> Cluster {
    over_unix_speaking(setup, n, from, rb::Protocol::default())
}

/// [`over_unix`] speaking `protocol`.
pub fn over_unix_speaking(
    setup: &TestSetup,
    n: usize,
    from: Option<&Cluster>,
    protocol: rb::Protocol,
) -> Cluster {
    let mut b = Cluster::builder().router(RouterKind::Partition);
    for i in 0..n {
        let path = setup.socket(i).to_string_lossy().into_owned();
        b = b.host(
            i as u32,
            HostConfig::new().unix_socket_path(path).protocol(protocol),
        );
    }
    if let Some(old) = from {
        b = b.migrating_from(old);
    }
    b.build().expect("cluster")
}

/// Keys `prefix0..` whose owner changes from `old` to `new`, `n` of them.
pub fn moving_keys(old: &Cluster, new: &Cluster, prefix: &str, n: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .filter(|k| host_of(old, k) != host_of(new, k))
        .take(n)
        .collect()
}

/// Keys `prefix0..` whose owner stays the same, `n` of them.
pub fn staying_keys(old: &Cluster, new: &Cluster, prefix: &str, n: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .filter(|k| host_of(old, k) == host_of(new, k))
        .take(n)
        .collect()
}

/// Hosts 0 and 1 on servers 0 and 1 of `setup` (over TCP), host 2 through
/// `proxy`; migrating from `from` if given.
pub fn with_host2_through(
    setup: &TestSetup,
    proxy: &proxy::Proxy,
    from: Option<&Cluster>,
) -> Cluster {
    let mut b = Cluster::builder().router(RouterKind::Partition);
    for i in 0..2 {
        b = b.host(i as u32, tcp(setup, i));
    }
    b = b.host(2, proxy.host_config());
    if let Some(old) = from {
        b = b.migrating_from(old);
    }
    b.build().expect("cluster")
}

/// The `n`th key (prefix `p`) that moves from `old` to host 2 of `new`.
pub fn to_host2(old: &Cluster, new: &Cluster, p: &str, n: usize) -> String {
    (0..)
        .map(|i| format!("{p}{i}"))
        .filter(|k| host_of(new, k) == 2 && host_of(old, k) != 2)
        .nth(n)
        .expect("a key moving to host 2")
}

/// [`over_tcp`] with 3 servers, migrating from `old`.
pub fn migrating_over_tcp(setup: &TestSetup, old: &Cluster) -> Cluster {
    let mut b = Cluster::builder().router(RouterKind::Partition);
    for i in 0..3 {
        b = b.host(i as u32, tcp(setup, i));
    }
    b.migrating_from(old).build().expect("migrating")
}

/// A move to watch half-way: the old cluster (servers 0 and 1 of 3), the
/// new one seen directly (servers 0, 1, 2), the mover's view of the new
/// one (server 2 through `proxy`, to hold its traffic there), and the
/// application's cluster migrating from the old one (fresh: it knows no
/// old host's write epoch). The mover's connection to server 2 is made.
pub struct MoveThroughProxy {
    pub servers: TestSetup,
    pub old: Cluster,
    pub direct: Cluster,
    pub proxy: proxy::Proxy,
    pub mover_new: Cluster,
    pub app: Cluster,
}

impl MoveThroughProxy {
    pub fn start() -> MoveThroughProxy {
        let servers = TestSetup::with_tcp(3, 1).expect("servers");
        let old = over_tcp(&servers, 2);
        let direct = over_tcp(&servers, 3);
        let proxy = proxy::Proxy::to_unix(servers.socket(2));
        let mover_new = with_host2_through(&servers, &proxy, None);
        let app = migrating_over_tcp(&servers, &old);
        let _: String = mover_new
            .local_client(2)
            .expect("local")
            .cmd(rb::cmd("PING"))
            .expect("PING");
        MoveThroughProxy {
            servers,
            old,
            direct,
            proxy,
            mover_new,
            app,
        }
    }

    /// The `n`th key (prefix `p`) moving from the old cluster to server 2.
    pub fn key(&self, p: &str, n: usize) -> String {
        to_host2(&self.old, &self.direct, p, n)
    }

    /// Server 2 (the new owner of [`MoveThroughProxy::key`]s), directly.
    pub fn on_new(&self) -> rb::LocalClient {
        self.direct.local_client(2).expect("local")
    }

    /// The old owner of `key`, directly.
    pub fn on_old(&self, key: &str) -> rb::LocalClient {
        self.old
            .local_client(host_of(&self.old, key))
            .expect("local")
    }

    /// `move_keys` from the old cluster to the mover's view of the new
    /// one with `DUMP`/`RESTORE`, in a thread.
    pub fn spawn_mover(&self) -> std::thread::JoinHandle<rb::Result<rb::migrate::MoveReport>> {
        let (old, new) = (self.old.clone(), self.mover_new.clone());
        std::thread::spawn(move || {
            rb::migrate::move_keys(
                &old,
                &new,
                rb::migrate::MoveOptions::new().transfer(rb::migrate::Transfer::DumpRestore),
            )
        })
    }

    /// Starts the mover with its replies from server 2 held, and returns
    /// once its copy of `key` is there (its `RESTORE` done, the rest of
    /// its move to come when the proxy lets go).
    pub fn mover_half_way(
        &self,
        key: &str,
    ) -> std::thread::JoinHandle<rb::Result<rb::migrate::MoveReport>> {
        self.proxy.set_fault(proxy::Fault::HoldReplies);
        let mover = self.spawn_mover();
        let on_new = self.on_new();
        while on_new.get(key).expect("GET").is_none() {
            std::thread::yield_now();
        }
        mover
    }
}
