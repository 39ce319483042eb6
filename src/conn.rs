//! Transport only: one non-blocking connection (TCP, unix socket or TLS)
//! that moves bytes, and [`Pool`], the idle connections of one host.
//!
//! A connection knows nothing of requests, replies or routing: the
//! [`crate::pipeline`] decides what to write and what each reply answers.
//! Host names are resolved on a helper thread, so a session resolves the
//! names of all its hosts at the same time: a connection starts out
//! resolving, the thread wakes the session's poll through its
//! [`mio::Waker`] when the addresses are in, and the session then starts
//! the non-blocking connect ([`Connection::resolved`]). The session's
//! connect deadline bounds the lookup. Every address is tried in turn
//! (IPv4 first) until one connects.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use mio::net::{TcpStream, UnixStream};
use mio::{Interest, Registry, Token, Waker};

use crate::config::HostInfo;
use crate::error::{Error, HostName, Result};

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    #[cfg(feature = "tls")]
    Tls(Box<crate::tls::TlsStream>),
}

impl Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.read(buf),
        }
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.write(buf),
        }
    }

    /// Sends bytes buffered below us (TLS records); true when none are left.
    fn flush(&mut self) -> io::Result<bool> {
        match self {
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.flush(),
            _ => Ok(true),
        }
    }

    /// A TLS handshake is still under way.
    fn is_handshaking(&self) -> bool {
        match self {
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.is_handshaking(),
            _ => false,
        }
    }

    fn wants_write(&self) -> bool {
        match self {
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.wants_write(),
            _ => false,
        }
    }

    fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Stream::Tcp(s) => Some(s),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => Some(s.socket_ref()),
            Stream::Unix(_) => None,
        }
    }

    fn source(&mut self) -> &mut dyn mio::event::Source {
        match self {
            Stream::Tcp(s) => s,
            Stream::Unix(s) => s,
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.socket(),
        }
    }
}

/// Turns a host name into socket addresses: the seam for a resolver of
/// your own (a cache, a service registry, a test double). Set it with
/// [`ClusterBuilder::resolver`](crate::ClusterBuilder::resolver); the
/// default is [`SystemResolver`].
///
/// rb calls it on a helper thread, once per new connection to a host whose
/// `host` is a name (IP literals and unix sockets skip it), and waits for
/// the answer no longer than the host's connect budget: a resolver that
/// blocks costs that host its connect timeout, and no other host anything
/// (the names of a map's hosts are resolved at the same time).
/// The addresses are tried IPv4 first, otherwise in the order returned,
/// until one connects.
///
/// ```
/// use std::net::SocketAddr;
/// use std::sync::Arc;
/// use rb::{Cluster, HostConfig, Resolve};
///
/// /// Every name is this machine.
/// struct Loopback;
///
/// impl Resolve for Loopback {
///     fn resolve(&self, _host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
///         Ok(vec![SocketAddr::from(([127, 0, 0, 1], port))])
///     }
/// }
///
/// let cluster = Cluster::builder()
///     .host(0, HostConfig::new().host("cache-a.internal").port(6379))
///     .resolver(Arc::new(Loopback))
///     .build()?;
/// # Ok::<(), rb::Error>(())
/// ```
pub trait Resolve: Send + Sync + 'static {
    /// Every address of `host` at `port`.
    ///
    /// # Errors
    ///
    /// The name cannot be resolved; the host's requests fail with an
    /// [`Error::Connection`] that names the host and carries this error's
    /// text. An empty list fails the same way.
    fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>>;
}

/// The default resolver: the system's (`getaddrinfo`, through
/// [`ToSocketAddrs`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        Ok((host, port).to_socket_addrs()?.collect())
    }
}

/// TLS settings built once per host pool.
#[cfg(feature = "tls")]
pub(crate) type TlsConfig = Arc<rustls::ClientConfig>;
/// Without the `tls` feature there is nothing to build.
#[cfg(not(feature = "tls"))]
pub(crate) type TlsConfig = ();

/// The answer of a lookup thread.
type Lookup = mpsc::Receiver<io::Result<Vec<SocketAddr>>>;

/// A connection to one host.
pub(crate) struct Connection {
    host: Arc<HostInfo>,
    /// None while the host's name is being resolved.
    stream: Option<Stream>,
    /// The lookup under way (see [`Connection::resolved`]).
    lookup: Option<Lookup>,
    tls: Option<TlsConfig>,
    /// Connect finished (always true for unix sockets, which connect at once).
    connected: bool,
    /// Addresses still to try when the current connect fails.
    next_addrs: Vec<SocketAddr>,
    /// Its handshake was answered (AUTH, SELECT): it serves requests as is.
    pub(crate) ready: bool,
    /// Came from the pool (so a failure before sending anything may be a
    /// stale connection worth one transparent reconnect).
    pub(crate) reused: bool,
    /// Registered with a poll.
    registered: bool,
    /// A read buffer kept with the connection while it idles in the pool.
    pub(crate) spare: Vec<u8>,
}

pub(crate) fn io_error(host: &HostName, e: &io::Error) -> Error {
    #[cfg(feature = "tls")]
    if let Some(failure) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<crate::tls::TlsFailure>())
    {
        return Error::Tls {
            host: host.clone(),
            reason: failure.0.as_str().into(),
        };
    }
    Error::Connection {
        host: host.clone(),
        command: None,
        kind: e.kind(),
        reason: e.to_string().into(),
    }
}

/// The peer closed the connection (a read of 0 bytes).
pub(crate) fn closed_error(host: &HostName) -> Error {
    Error::Connection {
        host: host.clone(),
        command: None,
        kind: io::ErrorKind::UnexpectedEof,
        reason: "the server closed the connection".into(),
    }
}

fn connect_timeout(host: &HostInfo) -> Error {
    Error::Timeout {
        host: host.name().clone(),
        phase: crate::error::Phase::Connect,
        budget: host.connect_timeout,
        command: None,
    }
}

/// The resolver failed for the host's name.
fn resolve_error(host: &HostInfo, reason: &dyn std::fmt::Display, kind: io::ErrorKind) -> Error {
    Error::Connection {
        host: host.name().clone(),
        command: None,
        kind,
        reason: format!("cannot resolve {:?}: {reason}", host.host).into(),
    }
}

/// Connects a unix socket, retrying while the server's accept queue is
/// full (`EAGAIN`) until `deadline`.
fn connect_unix(host: &HostInfo, path: &str, deadline: Instant) -> Result<UnixStream> {
    let mut pause = Duration::from_micros(100);
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let now = Instant::now();
                if now >= deadline {
                    return Err(connect_timeout(host));
                }
                std::thread::sleep(pause.min(deadline - now));
                pause = (pause * 2).min(Duration::from_millis(10));
            }
            Err(e) => return Err(io_error(host.name(), &e)),
        }
    }
}

impl Connection {
    /// Starts a connection: a non-blocking connect to an IP address or a
    /// unix socket (retried while its accept queue is full, within the
    /// host's connect budget), or, for a host name, a lookup on a helper
    /// thread that wakes `waker` when it has an answer; the caller bounds
    /// it with the connect budget and calls [`Connection::resolved`] on
    /// each wake.
    pub(crate) fn connect(
        host: Arc<HostInfo>,
        tls: Option<TlsConfig>,
        resolver: &Arc<dyn Resolve>,
        waker: &Arc<Waker>,
    ) -> Result<Connection> {
        let deadline = Instant::now()
            .checked_add(host.connect_timeout)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400 * 365));
        let mut lookup = None;
        let (stream, connected, next_addrs) = match &host.unix_socket_path {
            Some(path) => (
                Some(Stream::Unix(connect_unix(&host, path, deadline)?)),
                true,
                Vec::new(),
            ),
            None => match host.host.parse::<std::net::IpAddr>() {
                Ok(ip) => {
                    let addrs = vec![SocketAddr::new(ip, host.port)];
                    let (stream, rest) = connect_first(&host, &tls, addrs)?;
                    (Some(stream), false, rest)
                }
                Err(_) => {
                    lookup = Some(start_lookup(&host, resolver, waker)?);
                    (None, false, Vec::new())
                }
            },
        };
        Ok(Connection {
            host,
            stream,
            lookup,
            tls,
            connected,
            next_addrs,
            ready: false,
            reused: false,
            registered: false,
            spare: Vec::new(),
        })
    }

    /// The transport connect finished: bytes can be written (TLS buffers
    /// them until its handshake is done).
    pub(crate) fn is_connected(&self) -> bool {
        self.connected
    }

    /// Connected, and any TLS handshake done.
    pub(crate) fn is_established(&self) -> bool {
        self.connected && self.stream.as_ref().is_some_and(|s| !s.is_handshaking())
    }

    /// Its host's name is still being resolved.
    pub(crate) fn is_resolving(&self) -> bool {
        self.lookup.is_some()
    }

    /// After a wake of the poll: takes the lookup's answer, if it is in,
    /// and starts the connect to the first address. `Ok(true)` when a
    /// socket now exists and must be registered; `Ok(false)` while the
    /// lookup is still under way (or none was).
    ///
    /// # Errors
    ///
    /// The resolver failed, gave no address, or its thread ended without
    /// an answer; or no address accepted a connect.
    pub(crate) fn resolved(&mut self) -> Result<bool> {
        let Some(lookup) = &self.lookup else {
            return Ok(false);
        };
        let answer = match lookup.try_recv() {
            Err(mpsc::TryRecvError::Empty) => return Ok(false),
            Err(mpsc::TryRecvError::Disconnected) => Err(resolve_error(
                &self.host,
                &"the resolver ended without an answer (it panicked)",
                io::ErrorKind::Other,
            )),
            Ok(Ok(addrs)) => Ok(addrs),
            Ok(Err(e)) => Err(resolve_error(&self.host, &e, e.kind())),
        };
        self.lookup = None;
        let mut addrs = answer?;
        sort_addrs(&mut addrs);
        let (stream, rest) = connect_first(&self.host, &self.tls, addrs)?;
        self.stream = Some(stream);
        self.next_addrs = rest;
        self.registered = false;
        Ok(true)
    }

    /// Registers the socket with a poll (nothing to register while the
    /// name resolves).
    pub(crate) fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        let Some(stream) = self.stream.as_mut() else {
            return Ok(());
        };
        let interest = Interest::READABLE | Interest::WRITABLE;
        if self.registered {
            registry.reregister(stream.source(), token, interest)
        } else {
            registry.register(stream.source(), token, interest)?;
            self.registered = true;
            Ok(())
        }
    }

    pub(crate) fn deregister(&mut self, registry: &Registry) {
        if let (true, Some(stream)) = (self.registered, self.stream.as_mut()) {
            let _ = registry.deregister(stream.source());
        }
        self.registered = false;
    }

    /// The socket, or `WouldBlock` while the name resolves.
    fn stream(&mut self) -> io::Result<&mut Stream> {
        self.stream
            .as_mut()
            .ok_or_else(|| io::ErrorKind::WouldBlock.into())
    }

    /// After a writable event on a connecting TCP socket: did it connect?
    ///
    /// # Errors
    ///
    /// The connect failed and no address is left to try. When another
    /// address is left, its connect starts instead (`Ok(false)`), and the
    /// connection must be registered again.
    pub(crate) fn finish_connect(&mut self) -> Result<bool> {
        if self.connected {
            return Ok(true);
        }
        let Some(stream) = self.stream.as_ref() else {
            // Still resolving: nothing to connect yet.
            return Ok(false);
        };
        let Some(stream) = stream.tcp() else {
            self.connected = true;
            return Ok(true);
        };
        let failure = match stream.take_error() {
            Ok(Some(e)) | Err(e) => Some(e),
            Ok(None) => match stream.peer_addr() {
                Ok(_) => None,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(false),
                Err(e) if e.raw_os_error() == Some(115) => return Ok(false), // EINPROGRESS
                Err(e) => Some(e),
            },
        };
        match failure {
            None => {
                self.connected = true;
                Ok(true)
            }
            Some(e) if self.next_addrs.is_empty() => Err(io_error(self.host.name(), &e)),
            Some(_) => {
                let addrs = std::mem::take(&mut self.next_addrs);
                let (stream, rest) = connect_first(&self.host, &self.tls, addrs)?;
                self.stream = Some(stream);
                self.next_addrs = rest;
                self.registered = false;
                Ok(false)
            }
        }
    }

    /// Whether a connect failed and the next address was started: the
    /// socket changed, and must be registered again.
    pub(crate) fn needs_register(&self) -> bool {
        !self.registered
    }

    /// Writes `buf`; the bytes taken (TLS: handed to the TLS layer, which
    /// counts as sent), or `WouldBlock`.
    pub(crate) fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match self.stream()?.write(buf) {
                Ok(0) if !buf.is_empty() => return Err(io::ErrorKind::WriteZero.into()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }

    /// Sends bytes buffered below us (TLS records); true when none are left.
    pub(crate) fn flush(&mut self) -> io::Result<bool> {
        self.stream()?.flush()
    }

    /// Reads into `buf`: the bytes read (0: the peer closed), or `WouldBlock`.
    pub(crate) fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.stream()?.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }

    /// Bytes below us (TLS records) are waiting for the socket.
    pub(crate) fn wants_write(&self) -> bool {
        self.stream.as_ref().is_some_and(Stream::wants_write)
    }

    /// A pooled connection is alive when a read would block: 0 bytes means
    /// the server closed it (e.g. its idle `timeout`), and unexpected bytes
    /// mean its state is unknown.
    pub(crate) fn is_alive(&mut self) -> bool {
        let mut probe = [0u8; 1];
        let Some(stream) = self.stream.as_mut() else {
            return false;
        };
        matches!(stream.read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

/// Starts a connect to the first address of `addrs`, in order, that
/// accepts one; returns the stream and the addresses left to try.
fn connect_first(
    host: &Arc<HostInfo>,
    tls: &Option<TlsConfig>,
    addrs: Vec<SocketAddr>,
) -> Result<(Stream, Vec<SocketAddr>)> {
    let name = host.name();
    let mut last = None;
    let mut addrs = addrs.into_iter();
    while let Some(addr) = addrs.next() {
        match TcpStream::connect(addr) {
            Ok(stream) => {
                // Latency matters more than packet count: requests are
                // already coalesced in the pipeline's buffer.
                let _ = stream.set_nodelay(true);
                return Ok((wrap(host, tls, stream)?, addrs.collect()));
            }
            Err(e) => last = Some(io_error(name, &e)),
        }
    }
    Err(last.unwrap_or_else(|| Error::Connection {
        host: name.clone(),
        command: None,
        kind: io::ErrorKind::NotFound,
        reason: format!("{:?} resolved to no address", host.host).into(),
    }))
}

fn wrap(host: &Arc<HostInfo>, tls: &Option<TlsConfig>, stream: TcpStream) -> Result<Stream> {
    match (host.tls, tls) {
        (false, _) => Ok(Stream::Tcp(stream)),
        #[cfg(feature = "tls")]
        (true, Some(config)) => Ok(Stream::Tls(Box::new(crate::tls::TlsStream::new(
            host,
            config.clone(),
            stream,
        )?))),
        (true, _) => Err(Error::Tls {
            host: host.name().clone(),
            reason: "TLS needs rb built with the `tls` feature".into(),
        }),
    }
}

/// Starts resolving the host's name on a helper thread, which sends its
/// answer and then wakes `waker` (a late answer, after the caller gave
/// up, goes nowhere and wakes the poll for nothing).
fn start_lookup(
    host: &HostInfo,
    resolver: &Arc<dyn Resolve>,
    waker: &Arc<Waker>,
) -> Result<Lookup> {
    let (tx, rx) = mpsc::channel();
    let (target, port) = (host.host.clone(), host.port);
    let resolver = resolver.clone();
    let mut answer = Answer {
        tx: Some(tx),
        waker: waker.clone(),
    };
    std::thread::Builder::new()
        .name("rb-resolve".into())
        .spawn(move || {
            let addrs = resolver.resolve(&target, port);
            if let Some(tx) = answer.tx.take() {
                let _ = tx.send(addrs);
            }
        })
        .map_err(|e| resolve_error(host, &e, e.kind()))?;
    Ok(rx)
}

/// A lookup thread's way back: dropped, it closes the channel, then wakes
/// the poll, also when the resolver panicked (the closed channel without
/// an answer then says so), so no session waits for a dead lookup.
struct Answer {
    tx: Option<mpsc::Sender<io::Result<Vec<SocketAddr>>>>,
    waker: Arc<Waker>,
}

impl Drop for Answer {
    fn drop(&mut self) {
        self.tx = None;
        let _ = self.waker.wake();
    }
}

/// IPv4 first, otherwise in the resolver's order (`localhost` often
/// resolves to ::1 first, while many Redis servers listen on 127.0.0.1
/// only).
fn sort_addrs(addrs: &mut [SocketAddr]) {
    addrs.sort_by_key(|a| !a.is_ipv4());
}

/// The idle connections of one host, shared by every thread.
pub(crate) struct Pool {
    idle: Mutex<Vec<Connection>>,
    max_idle: usize,
    /// Turns the host's name into addresses.
    resolver: Arc<dyn Resolve>,
    /// Built on the first TLS connect, then shared by every connection.
    #[cfg(feature = "tls")]
    tls: std::sync::OnceLock<std::result::Result<TlsConfig, Error>>,
}

impl Pool {
    pub(crate) fn new(max_idle: usize, resolver: Arc<dyn Resolve>) -> Pool {
        Pool {
            idle: Mutex::new(Vec::new()),
            max_idle,
            resolver,
            #[cfg(feature = "tls")]
            tls: std::sync::OnceLock::new(),
        }
    }

    /// A new connection to `host` (its TLS settings built once); a lookup
    /// of its name wakes `waker` when done.
    pub(crate) fn connect(&self, host: &Arc<HostInfo>, waker: &Arc<Waker>) -> Result<Connection> {
        if !host.tls {
            return Connection::connect(host.clone(), None, &self.resolver, waker);
        }
        #[cfg(feature = "tls")]
        let config = self
            .tls
            .get_or_init(|| crate::tls::client_config(host))
            .clone()?;
        #[cfg(feature = "tls")]
        return Connection::connect(host.clone(), Some(config), &self.resolver, waker);
        // Without the feature, connect() refuses TLS hosts with a clear error.
        #[cfg(not(feature = "tls"))]
        Connection::connect(host.clone(), None, &self.resolver, waker)
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Connection>> {
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A live pooled connection, or a new one (connecting).
    pub(crate) fn checkout(&self, host: &Arc<HostInfo>, waker: &Arc<Waker>) -> Result<Connection> {
        loop {
            let candidate = self.idle().pop();
            match candidate {
                Some(mut conn) => {
                    if conn.is_alive() {
                        conn.reused = true;
                        return Ok(conn);
                    }
                    // Stale: dropped (closed) here, try the next one.
                }
                None => return self.connect(host, waker),
            }
        }
    }

    /// Takes back a healthy connection; beyond the bound it is closed.
    pub(crate) fn checkin(&self, conn: Connection) {
        let mut idle = self.idle();
        if idle.len() < self.max_idle {
            idle.push(conn);
        }
    }

    /// Closes every idle connection.
    pub(crate) fn clear(&self) {
        self.idle().clear();
    }

    /// Idle connections now.
    pub(crate) fn idle_count(&self) -> usize {
        self.idle().len()
    }
}

/// A host and its pool, as sessions see them.
#[derive(Clone)]
pub(crate) struct HostEntry {
    pub(crate) info: Arc<HostInfo>,
    pub(crate) pool: Arc<Pool>,
    /// Its health, counters and observer, shared by every user.
    pub(crate) watch: Arc<crate::health::HostWatch>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// IPv4 first; otherwise the resolver's order is kept.
    #[test]
    fn addresses_are_sorted_ipv4_first() {
        let a: SocketAddr = "[::1]:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.2:2".parse().unwrap();
        let c: SocketAddr = "[::2]:3".parse().unwrap();
        let d: SocketAddr = "127.0.0.1:4".parse().unwrap();
        let mut addrs = vec![a, b, c, d];
        sort_addrs(&mut addrs);
        assert_eq!(addrs, vec![b, d, a, c]);
    }
}
