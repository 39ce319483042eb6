//! Local `redis-server` processes for tests, examples and benchmarks.
//!
//! [`TestSetup::new`] starts servers on unix sockets in a private temp dir
//! (`port 0`, `save ""`, no persistence), waits until each says it is ready
//! (by reading its log, not by sleeping), and [`TestSetup::make_cluster`]
//! returns a cluster with one host per server and database. Dropping the
//! setup kills and reaps the servers and removes the dir, also when a test
//! panics. Tests run in parallel: every setup has its own dir and sockets.
//!
//! The server binary is `redis-server` on `PATH`, or `$RB_REDIS_SERVER`.

use std::fmt;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::cluster::{Cluster, ClusterBuilder};
use crate::config::HostConfig;
use crate::error::{Error, HostId};

static SETUP_COUNTER: AtomicUsize = AtomicUsize::new(0);

type Result<T> = std::result::Result<T, SetupError>;

/// Why `rb::testing` could not start, reach or drive its servers: a missing
/// `redis-server` (the message says how to install it), a server that
/// exited before it was ready (the message carries its log), a failed
/// signal, or a cluster that could not be built over the servers.
///
/// It is not an [`rb::Error`](crate::Error): test scaffolding failing is no
/// outcome of talking to Redis. In a test returning
/// `Result<(), Box<dyn std::error::Error>>`, `?` takes both.
#[derive(Clone, Debug)]
pub struct SetupError {
    reason: Arc<str>,
    source: Option<Error>,
}

impl SetupError {
    fn new(reason: impl Into<String>) -> SetupError {
        SetupError {
            reason: reason.into().into(),
            source: None,
        }
    }

    /// What went wrong, with the server's log when there is one.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for SetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "test setup: {}", self.reason)?;
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SetupError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// A cluster that could not be built over the servers.
impl From<Error> for SetupError {
    fn from(e: Error) -> SetupError {
        SetupError {
            reason: "cannot build the cluster".into(),
            source: Some(e),
        }
    }
}

fn testing_error(reason: impl Into<String>) -> SetupError {
    SetupError::new(reason)
}

/// One spawned server.
struct Server {
    child: Option<Child>,
    socket: PathBuf,
    /// Also listening on 127.0.0.1 at this port (see [`TestSetup::with_tcp`]).
    tcp_port: Option<u16>,
    log: PathBuf,
    config: PathBuf,
}

/// Locally spawned `redis-server`s; see the module docs.
pub struct TestSetup {
    dir: PathBuf,
    servers: Vec<Server>,
    databases_each: usize,
}

/// The server binary to run.
fn server_binary() -> String {
    std::env::var("RB_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into())
}

impl TestSetup {
    /// Starts `servers` servers, each with `databases_each` databases used
    /// as separate hosts.
    ///
    /// # Errors
    ///
    /// [`SetupError`] when `redis-server` is missing (saying how to install
    /// it), a server exits before it is ready (with its log), or the temp
    /// dir or config files cannot be made. Servers already started are
    /// reaped.
    pub fn new(servers: usize, databases_each: usize) -> Result<TestSetup> {
        Self::start(servers, databases_each, false, &|_| String::new())
    }

    /// Like [`TestSetup::new`], and each server also listens on a free TCP
    /// port of 127.0.0.1 (for benchmarks that compare with TCP clients).
    ///
    /// # Errors
    ///
    /// As [`TestSetup::new`], and when no free port is found.
    pub fn with_tcp(servers: usize, databases_each: usize) -> Result<TestSetup> {
        Self::start(servers, databases_each, true, &|_| String::new())
    }

    /// Like [`TestSetup::new`], with `extra(i)` appended to server `i`'s
    /// config file (redis.conf lines; a later directive overrides an
    /// earlier one), e.g. a `tls-port` and certificates.
    ///
    /// # Errors
    ///
    /// As [`TestSetup::new`] (a bad directive makes the server exit: the
    /// error carries its log).
    pub fn with_config(
        servers: usize,
        databases_each: usize,
        extra: impl Fn(usize) -> String,
    ) -> Result<TestSetup> {
        Self::start(servers, databases_each, false, &extra)
    }

    /// [`TestSetup::with_tcp`] and [`TestSetup::with_config`] together.
    ///
    /// # Errors
    ///
    /// As [`TestSetup::with_config`], and when no free port is found.
    pub fn with_tcp_config(
        servers: usize,
        databases_each: usize,
        extra: impl Fn(usize) -> String,
    ) -> Result<TestSetup> {
        Self::start(servers, databases_each, true, &extra)
    }

    fn start(
        servers: usize,
        databases_each: usize,
        tcp: bool,
        extra: &dyn Fn(usize) -> String,
    ) -> Result<TestSetup> {
        let databases_each = databases_each.max(1);
        let dir = make_private_dir()?;
        let mut setup = TestSetup {
            dir,
            servers: Vec::new(),
            databases_each,
        };
        for i in 0..servers {
            let socket = setup.dir.join(format!("redis-{i}.sock"));
            let log = setup.dir.join(format!("redis-{i}.log"));
            let config = setup.dir.join(format!("redis-{i}.conf"));
            let tcp_port = if tcp { Some(free_port()?) } else { None };
            let listen = match tcp_port {
                Some(port) => format!("port {port}\nbind 127.0.0.1\n"),
                None => "port 0\n".to_owned(),
            };
            let text = format!(
                "{listen}unixsocket {}\nunixsocketperm 700\nsave \"\"\nappendonly no\ndir {}\ndatabases {}\nlogfile \"\"\ndaemonize no\n{}\n",
                socket.display(),
                setup.dir.display(),
                databases_each.max(16),
                extra(i),
            );
            std::fs::write(&config, text)
                .map_err(|e| testing_error(format!("cannot write {}: {e}", config.display())))?;
            setup.servers.push(Server {
                child: None,
                socket,
                tcp_port,
                log,
                config,
            });
        }
        // Start them all first, then wait: the servers boot in parallel.
        let mut readers = Vec::new();
        for i in 0..servers {
            readers.push(setup.spawn(i)?);
        }
        for (i, reader) in readers.into_iter().enumerate() {
            setup.wait_ready(i, reader)?;
        }
        Ok(setup)
    }

    fn spawn(&mut self, i: usize) -> Result<std::process::ChildStdout> {
        let server = &mut self.servers[i];
        let mut child = Command::new(server_binary())
            .arg(&server.config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    testing_error(format!(
                        "`{}` was not found: install it (Debian/Ubuntu: `apt-get update && apt-get install -y redis-server`) or set RB_REDIS_SERVER",
                        server_binary()
                    ))
                } else {
                    testing_error(format!("cannot start {}: {e}", server_binary()))
                }
            })?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| testing_error("redis-server has no stdout"))?;
        server.child = Some(child);
        Ok(stdout)
    }

    /// Reads the server's log until it is ready; if it exits first, the
    /// error carries its log.
    fn wait_ready(&mut self, i: usize, stdout: std::process::ChildStdout) -> Result<()> {
        let server = &mut self.servers[i];
        let mut log = String::new();
        let mut lines = BufReader::new(stdout).lines();
        let ready = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    log.push_str(&line);
                    log.push('\n');
                    if line
                        .to_ascii_lowercase()
                        .contains("ready to accept connections")
                    {
                        break true;
                    }
                }
                _ => break false,
            }
        };
        let _ = std::fs::write(&server.log, &log);
        if !ready {
            if let Some(mut child) = server.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            return Err(testing_error(format!(
                "redis-server {i} exited before it was ready; its log:\n{log}"
            )));
        }
        // Keep draining the log so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Ok(())
    }

    /// The private directory of this setup.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The unix socket of server `i`.
    ///
    /// # Panics
    ///
    /// If `i >= server_count()`, like slice indexing.
    pub fn socket(&self, i: usize) -> &Path {
        &self.servers[i].socket
    }

    /// Number of servers.
    pub fn server_count(&self) -> usize {
        self.servers.len()
    }

    /// The host config of server `i`, database `db`.
    ///
    /// # Panics
    ///
    /// If `i >= server_count()`, like slice indexing.
    pub fn host_config(&self, i: usize, db: usize) -> HostConfig {
        HostConfig::new()
            .unix_socket_path(self.servers[i].socket.to_string_lossy().into_owned())
            .db(db as i64)
    }

    /// The TCP port of server `i`, for a setup made with [`TestSetup::with_tcp`].
    pub fn tcp_port(&self, i: usize) -> Option<u16> {
        self.servers.get(i).and_then(|s| s.tcp_port)
    }

    /// A builder with one host per server and database: host
    /// `server * databases_each + db`.
    pub fn cluster_builder(&self) -> ClusterBuilder {
        let mut builder = Cluster::builder();
        for i in 0..self.servers.len() {
            for db in 0..self.databases_each {
                let id = (i * self.databases_each + db) as HostId;
                builder = builder.host(id, self.host_config(i, db));
            }
        }
        builder
    }

    /// A cluster of `servers * databases_each` hosts (partition router).
    ///
    /// # Errors
    ///
    /// [`SetupError`] with the [`rb::Error`](crate::Error) of the cluster
    /// builder as its source, should the builder refuse the hosts.
    pub fn make_cluster(&self) -> Result<Cluster> {
        Ok(self.cluster_builder().build()?)
    }

    /// The OS process id of server `i`, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.servers.get(i)?.child.as_ref().map(Child::id)
    }

    fn signal(&self, i: usize, signal: &str) -> Result<()> {
        let pid = self
            .pid(i)
            .ok_or_else(|| testing_error(format!("server {i} is not running")))?;
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .map_err(|e| testing_error(format!("cannot run kill: {e}")))?;
        if status.success() {
            Ok(())
        } else {
            Err(testing_error(format!("kill -{signal} {pid} failed")))
        }
    }

    /// Freezes server `i` (SIGSTOP): it accepts connections but answers nothing.
    ///
    /// # Errors
    ///
    /// [`SetupError`] when server `i` does not run or `kill` fails.
    pub fn pause(&self, i: usize) -> Result<()> {
        self.signal(i, "STOP")
    }

    /// Thaws a paused server (SIGCONT).
    ///
    /// # Errors
    ///
    /// [`SetupError`] when server `i` does not run or `kill` fails.
    pub fn resume(&self, i: usize) -> Result<()> {
        self.signal(i, "CONT")
    }

    /// Kills server `i` (SIGKILL) and reaps it.
    ///
    /// # Errors
    ///
    /// [`SetupError`] when there is no server `i`.
    pub fn kill(&mut self, i: usize) -> Result<()> {
        let count = self.servers.len();
        let server = self
            .servers
            .get_mut(i)
            .ok_or_else(|| testing_error(format!("no server {i} (there are {count})")))?;
        if let Some(mut child) = server.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&server.socket);
        Ok(())
    }

    /// Starts server `i` again on the same socket (after [`TestSetup::kill`]).
    ///
    /// # Errors
    ///
    /// [`SetupError`] when there is no server `i` or it does not come up
    /// (with its log).
    pub fn restart(&mut self, i: usize) -> Result<()> {
        self.kill(i)?;
        let stdout = self.spawn(i)?;
        self.wait_ready(i, stdout)
    }
}

impl fmt::Debug for TestSetup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Servers<'a>(&'a [Server]);
        impl fmt::Debug for Servers<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_list()
                    .entries(self.0.iter().map(|s| {
                        (
                            s.socket.display().to_string(),
                            s.child.as_ref().map(Child::id),
                            s.tcp_port,
                        )
                    }))
                    .finish()
            }
        }
        f.debug_struct("TestSetup")
            .field("dir", &self.dir)
            .field("databases_each", &self.databases_each)
            .field("servers (socket, pid, tcp port)", &Servers(&self.servers))
            .finish()
    }
}

impl Drop for TestSetup {
    fn drop(&mut self) {
        for server in &mut self.servers {
            if let Some(mut child) = server.child.take() {
                // A paused server still dies of SIGKILL.
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A port the OS considers free right now (bound, read, released).
fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| testing_error(format!("cannot find a free port: {e}")))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| testing_error(format!("cannot find a free port: {e}")))
}

fn make_private_dir() -> Result<PathBuf> {
    let base = std::env::temp_dir();
    for _ in 0..100 {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .subsec_nanos();
        let n = SETUP_COUNTER.fetch_add(1, Ordering::Relaxed);
        // Short names: unix socket paths are limited to ~107 bytes.
        let dir = base.join(format!("rb-{}-{n}-{nanos:x}", std::process::id()));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(testing_error(format!(
                    "cannot create {}: {e}",
                    dir.display()
                )))
            }
        }
    }
    Err(testing_error("cannot create a private temp dir"))
}

/// Runs `f` with a fresh test cluster and tears it down afterwards, as
/// rb's `make_test_cluster`: rb's default of 4 servers with 8 databases
/// each, 32 hosts.
///
/// ```no_run
/// use rb::Commands;
/// rb::testing::make_test_cluster(|cluster| cluster.routing_client().set("foo", 1))??;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
///
/// [`SetupError`] as [`TestSetup::new`] and [`TestSetup::make_cluster`];
/// what `f` returns is passed through untouched.
pub fn make_test_cluster<R>(f: impl FnOnce(&Cluster) -> R) -> Result<R> {
    make_test_cluster_with(4, 8, f)
}

/// [`make_test_cluster`] with a chosen number of servers and databases.
///
/// # Errors
///
/// As [`make_test_cluster`].
pub fn make_test_cluster_with<R>(
    servers: usize,
    databases_each: usize,
    f: impl FnOnce(&Cluster) -> R,
) -> Result<R> {
    let setup = TestSetup::new(servers, databases_each)?;
    let cluster = setup.make_cluster()?;
    Ok(f(&cluster))
}
