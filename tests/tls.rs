//! TLS against real redis-servers with a CA and certificates made here
//! (openssl), on a TLS-only port (`port 0`).
#![cfg(feature = "tls")]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use rb::testing::TestSetup;
use rb::{Cluster, Commands, HostConfig, TlsOptions};

/// A CA, a server certificate for 127.0.0.1 signed by it, and a second,
/// unrelated CA.
struct Certs {
    dir: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let status = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl runs");
    assert!(status.success(), "openssl {args:?}");
}

impl Certs {
    fn new() -> Certs {
        let dir = std::env::temp_dir().join(format!(
            "rb-tls-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for ca in ["ca", "other-ca"] {
            openssl(
                &dir,
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-days",
                    "2",
                    "-subj",
                    &format!("/CN=rb test {ca}"),
                    "-keyout",
                    &format!("{ca}.key"),
                    "-out",
                    &format!("{ca}.crt"),
                ],
            );
        }
        openssl(
            &dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=127.0.0.1",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
            ],
        );
        std::fs::write(
            dir.join("ext.cnf"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .unwrap();
        openssl(
            &dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
                "-out",
                "server.crt",
            ],
        );
        Certs { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A redis-server (rb::testing) whose only TCP listener is a TLS port.
struct TlsServer {
    _setup: TestSetup,
    port: u16,
}

impl TlsServer {
    fn start(certs: &Certs) -> TlsServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let setup = TestSetup::with_config(1, 4, |_| {
            format!(
                "tls-port {port}\nbind 127.0.0.1\ntls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\ntls-auth-clients no\n",
                certs.path("server.crt").display(),
                certs.path("server.key").display(),
                certs.path("ca.crt").display(),
            )
        })
        .expect("TLS redis-server starts");
        TlsServer {
            _setup: setup,
            port,
        }
    }
}

fn tls_cluster(server: &TlsServer, options: TlsOptions, hosts: u32) -> Cluster {
    Cluster::builder()
        .host_defaults(
            HostConfig::new()
                .host("127.0.0.1")
                .port(server.port)
                .tls(true)
                .tls_options(options),
        )
        .hosts((0..hosts).map(|db| HostConfig::new().db(i64::from(db))))
        .build()
        .unwrap()
}

#[test]
fn map_over_tls_hosts() {
    let certs = Certs::new();
    let server = TlsServer::start(&certs);
    let options = TlsOptions {
        ca_file: Some(certs.path("ca.crt")),
        ..TlsOptions::default()
    };
    let cluster = tls_cluster(&server, options, 4);
    let mut promises = Vec::new();
    cluster
        .map(|c| {
            for i in 0..2000 {
                c.set(format!("k{i}"), i);
            }
            for i in 0..2000 {
                promises.push(c.get(format!("k{i}")));
            }
        })
        .unwrap();
    for (i, p) in promises.iter().enumerate() {
        assert_eq!(p.value().unwrap(), Some(i.to_string().into_bytes()));
    }
    let sizes = cluster.all(|c| c.dbsize()).unwrap().value().unwrap();
    assert_eq!(sizes.values().sum::<i64>(), 2000);
    assert_eq!(sizes.len(), 4);
    // Pooled TLS connections are reused.
    let client = cluster.routing_client();
    assert_eq!(client.incr("counter").unwrap(), 1);
    assert_eq!(client.incr("counter").unwrap(), 2);

    // rediss:// URLs with a CA file given in code.
    let url = format!("rediss://127.0.0.1:{}/1", server.port);
    let cfg = HostConfig::from_url(&url).unwrap().tls_options(TlsOptions {
        ca_file: Some(certs.path("ca.crt")),
        ..TlsOptions::default()
    });
    let c = Cluster::builder().host(0, cfg).build().unwrap();
    assert_eq!(c.local_client(0).unwrap().ping().unwrap(), "PONG");
}

#[test]
fn wrong_ca_is_a_clear_tls_error_naming_the_host() {
    let certs = Certs::new();
    let server = TlsServer::start(&certs);
    let wrong = TlsOptions {
        ca_file: Some(certs.path("other-ca.crt")),
        ..TlsOptions::default()
    };
    let cluster = tls_cluster(&server, wrong, 1);
    let err = cluster.routing_client().set("k", 1).unwrap_err();
    assert!(matches!(err, rb::Error::Tls { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("host 0"), "{text}");
    assert!(
        text.contains("TLS error") && text.to_lowercase().contains("certificate"),
        "{text}"
    );

    // Skipping verification (tests only) gets through.
    let insecure = TlsOptions {
        insecure_skip_verify: true,
        ..TlsOptions::default()
    };
    let cluster = tls_cluster(&server, insecure, 1);
    assert_eq!(cluster.local_client(0).unwrap().ping().unwrap(), "PONG");
}

#[test]
fn missing_ca_file_is_a_tls_error() {
    let certs = Certs::new();
    let server = TlsServer::start(&certs);
    let options = TlsOptions {
        ca_file: Some(certs.path("does-not-exist.crt")),
        ..TlsOptions::default()
    };
    let err = tls_cluster(&server, options, 1)
        .local_client(0)
        .unwrap()
        .ping()
        .unwrap_err();
    assert!(matches!(err, rb::Error::Tls { .. }), "{err}");
    assert!(err.to_string().contains("does-not-exist.crt"), "{err}");
}

/// A host given by name: its lookup (here a resolver of our own) runs off
/// the session's thread, the TLS session starts once the address is in,
/// and the certificate is checked against the name (`DNS:localhost`).
#[test]
fn tls_to_a_named_host_after_its_lookup() {
    struct Loopback(u16);
    impl rb::Resolve for Loopback {
        fn resolve(&self, host: &str, _port: u16) -> std::io::Result<Vec<std::net::SocketAddr>> {
            assert_eq!(host, "localhost");
            Ok(vec![std::net::SocketAddr::from(([127, 0, 0, 1], self.0))])
        }
    }
    let certs = Certs::new();
    let server = TlsServer::start(&certs);
    let cluster = Cluster::builder()
        .host(
            0,
            HostConfig::new()
                .host("localhost")
                .port(server.port)
                .tls(true)
                .tls_options(TlsOptions {
                    ca_file: Some(certs.path("ca.crt")),
                    ..TlsOptions::default()
                }),
        )
        .resolver(std::sync::Arc::new(Loopback(server.port)))
        .build()
        .unwrap();
    let set = cluster.map(|c| c.set("named", 1)).unwrap();
    assert!(set.is_resolved());
    cluster.disconnect_pools();
    assert_eq!(cluster.local_client(0).unwrap().ping().unwrap(), "PONG");
}
