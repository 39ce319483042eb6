//! The real twemproxy: nutcracker (Debian package `nutcracker`, 0.5.0) in
//! front of 3 local redis-servers places 1,000 keys per pool; with the
//! proxy stopped, rb's twemproxy router over the same servers finds every
//! one of them. Three pools in one nutcracker.yml: ketama + fnv1a_64 with
//! named, weighted servers listed out of name order; modula + murmur with
//! unnamed weighted servers (named by their address); ketama + md5 over the
//! servers' unix sockets (named `path:` by nutcracker). All with hash tag
//! `{}`; the keys include tagged ones and bytes >= 0x80.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rb::testing::TestSetup;
use rb::{Cluster, Commands, HostConfig, RouterKind, TwemproxyRing};

const KEYS: usize = 1000;

/// The nutcracker binary (`RB_NUTCRACKER` overrides).
fn binary() -> String {
    std::env::var("RB_NUTCRACKER").unwrap_or_else(|_| "nutcracker".into())
}

/// A running nutcracker, killed and reaped on drop.
struct Nutcracker {
    child: Child,
    log: PathBuf,
}

impl Drop for Nutcracker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Nutcracker {
    /// Kills it, waits for it to exit.
    fn stop(mut self) {
        self.child.kill().expect("kill nutcracker");
        self.child.wait().expect("reap nutcracker");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A port that was free a moment ago (nutcracker binds it; a race is retried).
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().unwrap().port()
}

/// One pool of the generated nutcracker.yml.
struct Pool {
    name: &'static str,
    ring: TwemproxyRing,
    servers: Vec<String>,
    port: u16,
}

/// Writes nutcracker.yml for `pools` and starts nutcracker, until it
/// accepts connections on every pool's port; on a port taken meanwhile
/// (nutcracker exits), tries new ports.
fn start(dir: &Path, pools: &mut [Pool]) -> Nutcracker {
    let conf = dir.join("nutcracker.yml");
    let log = dir.join("nutcracker.log");
    for attempt in 0..5 {
        for pool in pools.iter_mut() {
            pool.port = free_port();
        }
        let mut yml = String::new();
        for pool in pools.iter() {
            yml.push_str(&format!(
                "{}:\n  listen: 127.0.0.1:{}\n  redis: true\n  distribution: {}\n  hash: {}\n  hash_tag: \"{{}}\"\n  servers:\n",
                pool.name, pool.port, pool.ring.distribution, pool.ring.hash
            ));
            for line in &pool.servers {
                yml.push_str(&format!("   - {line}\n"));
            }
        }
        std::fs::write(&conf, yml).expect("write nutcracker.yml");
        let child = Command::new(binary())
            .arg("-c")
            .arg(&conf)
            .arg("-o")
            .arg(&log)
            .arg("-p")
            .arg(dir.join("nutcracker.pid"))
            .args(["-a", "127.0.0.1", "-s"])
            .arg(free_port().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "`{}` was not found: install twemproxy's nutcracker \
                 (Debian/Ubuntu: `apt-get update && apt-get install -y nutcracker`; \
                 .ci/run installs it) or set RB_NUTCRACKER to its path",
                binary()
            ),
            Err(e) => panic!("cannot start {}: {e}", binary()),
        };
        let mut nc = Nutcracker {
            child,
            log: log.clone(),
        };
        // Ready when every pool accepts a connection; bounded.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = nc.child.try_wait() {
                eprintln!(
                    "attempt {attempt}: nutcracker exited ({status}); its log:\n{}",
                    nc.log()
                );
                break;
            }
            if pools
                .iter()
                .all(|p| TcpStream::connect(("127.0.0.1", p.port)).is_ok())
            {
                return nc;
            }
            assert!(
                Instant::now() < deadline,
                "nutcracker did not accept connections within 10 s; its log:\n{}",
                nc.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    panic!("nutcracker did not start in 5 attempts");
}

/// The keys of a pool: plain, tagged (several per tag), and with bytes >= 0x80.
fn keys(pool: &str) -> Vec<Vec<u8>> {
    (0..KEYS)
        .map(|i| match i % 4 {
            0 => format!("{pool}:plain:{i}").into_bytes(),
            1 => format!("{{user{}}}:{pool}:{i}", i % 37).into_bytes(),
            2 => format!("{pool}:clé:{i}:日本").into_bytes(),
            _ => {
                let mut k = format!("{pool}:bin:{i}:").into_bytes();
                k.extend([0x80, 0xff, (i % 256) as u8, 0xe9]);
                k
            }
        })
        .collect()
}

/// SETs every key to its index through the proxy, pipelined, over plain RESP.
fn set_through(port: u16, keys: &[Vec<u8>]) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to nutcracker");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut out = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let value = i.to_string();
        out.extend(format!("*3\r\n$3\r\nSET\r\n${}\r\n", key.len()).as_bytes());
        out.extend(key);
        out.extend(format!("\r\n${}\r\n{value}\r\n", value.len()).as_bytes());
    }
    stream.write_all(&out).expect("send the SETs");
    let mut replies = BufReader::new(stream);
    for key in keys {
        let mut line = String::new();
        replies.read_line(&mut line).expect("read a reply");
        assert_eq!(line, "+OK\r\n", "SET {key:?} through nutcracker");
    }
}

#[test]
fn keys_set_through_nutcracker_are_found_by_rbs_router() {
    let setup = TestSetup::with_tcp(3, 1).expect("start redis-server");
    let port = |i| setup.tcp_port(i).unwrap();
    let socket = |i| setup.socket(i).display().to_string();
    let mut pools = vec![
        Pool {
            name: "ketama",
            ring: "ketama fnv1a_64".parse_ring(),
            // Out of name order: nutcracker orders them srv-a, srv-c, srv-bb.
            servers: vec![
                format!("127.0.0.1:{}:1 srv-c", port(0)),
                format!("127.0.0.1:{}:2 srv-a", port(1)),
                format!("127.0.0.1:{}:3 srv-bb", port(2)),
            ],
            port: 0,
        },
        Pool {
            name: "modula",
            ring: "modula murmur".parse_ring(),
            servers: vec![
                format!("127.0.0.1:{}:3", port(0)),
                format!("127.0.0.1:{}:1", port(1)),
                format!("127.0.0.1:{}:2", port(2)),
            ],
            port: 0,
        },
        Pool {
            name: "sockets",
            ring: "ketama md5".parse_ring(),
            servers: (0..3).map(|i| format!("{}:{}", socket(i), i + 1)).collect(),
            port: 0,
        },
    ];
    let nc = start(setup.dir(), &mut pools);
    for pool in &pools {
        set_through(pool.port, &keys(pool.name));
    }
    nc.stop();

    let mut total = 0;
    for pool in &pools {
        // The same server lines, straight to the servers.
        let cluster = Cluster::builder()
            .router(RouterKind::Twemproxy(pool.ring))
            .hash_tag(b"{}")
            .hosts(
                pool.servers
                    .iter()
                    .map(|l| HostConfig::from_twemproxy(l).unwrap()),
            )
            .build()
            .unwrap();
        let keys = keys(pool.name);
        let values = cluster.routing_client().mget(&keys).unwrap();
        let mut found = 0;
        for (i, (key, value)) in keys.iter().zip(&values).enumerate() {
            assert_eq!(
                value.as_deref(),
                Some(i.to_string().as_bytes()),
                "pool {}: key {:?} not where rb routes it",
                pool.name,
                String::from_utf8_lossy(key)
            );
            found += 1;
        }
        assert_eq!(found, KEYS, "pool {}", pool.name);
        // Every server holds some of them.
        let router = cluster.router().unwrap();
        let mut per_host = [0usize; 3];
        for key in &keys {
            per_host[router.host_for_key(key).unwrap() as usize] += 1;
        }
        assert!(
            per_host.iter().all(|&n| n > 50),
            "{}: {per_host:?}",
            pool.name
        );
        eprintln!(
            "pool {}: 1,000 of 1,000 found; per server {per_host:?}",
            pool.name
        );
        total += found;
    }
    // And nothing anywhere else: each key exists exactly once.
    let servers = Cluster::builder()
        .hosts((0..3).map(|i| setup.host_config(i, 0)))
        .build()
        .unwrap();
    let sizes = servers
        .all(|c| c.cmd::<i64>(rb::cmd("DBSIZE")))
        .unwrap()
        .value()
        .unwrap();
    assert_eq!(sizes.values().sum::<i64>(), total as i64);
}

/// "distribution hash" -> the ring, through the public parsers.
trait ParseRing {
    fn parse_ring(&self) -> TwemproxyRing;
}

impl ParseRing for str {
    fn parse_ring(&self) -> TwemproxyRing {
        let (distribution, hash) = self.split_once(' ').unwrap();
        TwemproxyRing::new(distribution.parse().unwrap(), hash.parse().unwrap())
    }
}
