//! One non-blocking connection (TCP or unix socket) with its read buffer,
//! streaming decoder and handshake; and [`Pool`], the idle connections of
//! one host.
//!
//! A connection knows nothing of routing or promises: it writes bytes it is
//! given, and hands back decoded replies. The handshake (AUTH, HELLO, SELECT)
//! is queued ahead of the first request so it goes out in the same write,
//! and its replies are checked and dropped here.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};

use mio::net::{TcpStream, UnixStream};
use mio::{Interest, Registry, Token};

use crate::batch::Element;
use crate::cmd::{cmd, Cmd};
use crate::config::{HostInfo, Protocol};
use crate::error::{Error, HostName, Result};
use crate::resp::{Frame, ReplyStream, Value};

/// Bytes read per `read` call (and the read buffer's first size).
const READ_CHUNK: usize = 64 * 1024;
/// A read buffer grown past this for one huge reply is shrunk back after.
const KEEP_READ_BUFFER: usize = 1024 * 1024;

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

/// TLS settings built once per host pool.
#[cfg(feature = "tls")]
pub(crate) type TlsConfig = Arc<rustls::ClientConfig>;
/// Without the `tls` feature there is nothing to build.
#[cfg(not(feature = "tls"))]
pub(crate) type TlsConfig = ();

/// A connection to one host.
pub(crate) struct Connection {
    host: Arc<HostInfo>,
    stream: Stream,
    /// Connect finished (always true for unix sockets, which connect at once).
    connected: bool,
    /// The handshake bytes not yet written.
    handshake: Vec<u8>,
    handshake_written: usize,
    /// Handshake replies still to be checked and dropped.
    handshake_replies: usize,
    /// Commands of the handshake, for error messages.
    handshake_names: Vec<&'static str>,
    /// Read buffer: `rbuf[rstart..rend]` holds bytes not yet decoded.
    rbuf: Vec<u8>,
    rstart: usize,
    rend: usize,
    /// Decodes replies, splitting merged `MGET` replies (see
    /// [`ReplyTarget::split_next`]).
    replies: ReplyStream,
    /// Came from the pool (so a failure before sending anything may be a
    /// stale connection worth one transparent reconnect).
    pub(crate) reused: bool,
    /// Registered with a poll.
    registered: bool,
}

/// Where a connection's replies go: the session's queue of what each
/// reply answers.
pub(crate) trait ReplyTarget {
    /// `Some(n)` when the next reply answers a merged `MGET` of `n` keys:
    /// if it is an array of `n`, its elements are handed to
    /// [`ReplyTarget::element`] one by one as they arrive, instead of
    /// building the array first (one allocation and copy less per reply,
    /// and no half-built array when a read ends mid-reply).
    fn split_next(&self) -> Option<usize>;

    /// The next element of the array announced by `split_next`; `last`
    /// for its final element.
    fn element(&mut self, element: Element<'_>, last: bool);

    /// One whole reply.
    fn reply(&mut self, value: Value);
}

fn io_error(host: &HostName, e: &io::Error) -> Error {
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

impl Connection {
    /// Starts a non-blocking connect; the handshake is queued to go first.
    pub(crate) fn connect(host: Arc<HostInfo>, tls: Option<TlsConfig>) -> Result<Connection> {
        let name = host.name().clone();
        let (stream, connected) = match &host.unix_socket_path {
            Some(path) => (
                Stream::Unix(UnixStream::connect(path).map_err(|e| io_error(&name, &e))?),
                true,
            ),
            None => {
                let addr = resolve(&host)?;
                let stream = TcpStream::connect(addr).map_err(|e| io_error(&name, &e))?;
                // Latency matters more than packet count: requests are
                // already coalesced in our own buffer.
                let _ = stream.set_nodelay(true);
                match (host.tls, tls) {
                    (false, _) => (Stream::Tcp(stream), false),
                    #[cfg(feature = "tls")]
                    (true, Some(config)) => (
                        Stream::Tls(Box::new(crate::tls::TlsStream::new(&host, config, stream)?)),
                        false,
                    ),
                    (true, _) => {
                        return Err(Error::Tls {
                            host: name,
                            reason: "TLS needs rb built with the `tls` feature".into(),
                        })
                    }
                }
            }
        };
        let mut conn = Connection {
            host,
            stream,
            connected,
            handshake: Vec::new(),
            handshake_written: 0,
            handshake_replies: 0,
            handshake_names: Vec::new(),
            rbuf: Vec::new(),
            rstart: 0,
            rend: 0,
            replies: ReplyStream::new(),
            reused: false,
            registered: false,
        };
        conn.queue_handshake();
        Ok(conn)
    }

    fn queue_handshake(&mut self) {
        let host = self.host.clone();
        let mut push = |c: Cmd, name: &'static str| {
            c.write_packed(&mut self.handshake);
            self.handshake_replies += 1;
            self.handshake_names.push(name);
        };
        match host.protocol {
            Protocol::Resp3 => {
                let mut hello = cmd("HELLO").arg(3);
                if let Some(password) = &host.password {
                    let user = host.username.as_deref().unwrap_or("default");
                    hello = hello.arg("AUTH").arg(user).arg(password);
                }
                push(hello, "HELLO");
            }
            Protocol::Resp2 => {
                if let Some(password) = &host.password {
                    let auth = match &host.username {
                        Some(user) => cmd("AUTH").arg(user).arg(password),
                        None => cmd("AUTH").arg(password),
                    };
                    push(auth, "AUTH");
                }
            }
        }
        if host.db != 0 {
            push(cmd("SELECT").arg(host.db), "SELECT");
        }
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.connected
    }

    /// Whether the handshake is done (written and every reply checked).
    pub(crate) fn is_ready(&self) -> bool {
        self.connected && self.handshake_replies == 0 && !self.stream.is_handshaking()
    }

    pub(crate) fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        let interest = Interest::READABLE | Interest::WRITABLE;
        if self.registered {
            registry.reregister(self.stream.source(), token, interest)
        } else {
            registry.register(self.stream.source(), token, interest)?;
            self.registered = true;
            Ok(())
        }
    }

    pub(crate) fn deregister(&mut self, registry: &Registry) {
        if self.registered {
            let _ = registry.deregister(self.stream.source());
            self.registered = false;
        }
    }

    /// After a writable event on a connecting TCP socket: did it connect?
    pub(crate) fn finish_connect(&mut self) -> Result<bool> {
        if self.connected {
            return Ok(true);
        }
        let Some(stream) = self.stream.tcp() else {
            self.connected = true;
            return Ok(true);
        };
        if let Ok(Some(e)) | Err(e) = stream.take_error() {
            return Err(io_error(self.host.name(), &e));
        }
        match stream.peer_addr() {
            Ok(_) => {
                self.connected = true;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
            Err(e) if e.raw_os_error() == Some(115) => Ok(false), // EINPROGRESS
            Err(e) => Err(io_error(self.host.name(), &e)),
        }
    }

    /// Writes handshake bytes, then `out[*written..]`, until done or the
    /// socket would block. Returns whether everything went out.
    pub(crate) fn write_from(&mut self, out: &[u8], written: &mut usize) -> Result<bool> {
        if !self.connected {
            return Ok(false);
        }
        while self.handshake_written < self.handshake.len() {
            match self.stream.write(&self.handshake[self.handshake_written..]) {
                Ok(0) => return Err(self.closed_error()),
                Ok(n) => self.handshake_written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_error(self.host.name(), &e)),
            }
        }
        if self.handshake_written > 0 && self.handshake_written == self.handshake.len() {
            self.handshake = Vec::new();
            self.handshake_written = 0;
        }
        while *written < out.len() {
            match self.stream.write(&out[*written..]) {
                Ok(0) => return Err(self.closed_error()),
                Ok(n) => *written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_error(self.host.name(), &e)),
            }
        }
        self.stream
            .flush()
            .map_err(|e| io_error(self.host.name(), &e))
    }

    /// Bytes below us (TLS records) are waiting for the socket.
    pub(crate) fn wants_write(&self) -> bool {
        self.stream.wants_write()
    }

    fn closed_error(&self) -> Error {
        Error::Connection {
            host: self.host.name().clone(),
            command: None,
            kind: io::ErrorKind::UnexpectedEof,
            reason: "the server closed the connection".into(),
        }
    }

    /// Reads until the socket would block, handing each reply (handshake
    /// replies excluded) to `target`. Returns an error when the peer
    /// closed or broke the protocol; replies decoded before that were
    /// already delivered.
    pub(crate) fn read_replies(&mut self, target: &mut impl ReplyTarget) -> Result<()> {
        loop {
            if self.rend == self.rbuf.len() {
                if self.rstart > 0 {
                    self.rbuf.copy_within(self.rstart..self.rend, 0);
                    self.rend -= self.rstart;
                    self.rstart = 0;
                    // The decoder's place is relative to `rstart`: still valid.
                }
                if self.rend == self.rbuf.len() {
                    let grow = self.rbuf.len().max(READ_CHUNK);
                    self.rbuf.resize(self.rbuf.len() + grow, 0);
                }
            }
            match self.stream.read(&mut self.rbuf[self.rend..]) {
                Ok(0) => {
                    self.decode_available(target)?;
                    return Err(self.closed_error());
                }
                Ok(n) => {
                    self.rend += n;
                    self.decode_available(target)?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_error(self.host.name(), &e)),
            }
        }
    }

    fn decode_available(&mut self, target: &mut impl ReplyTarget) -> Result<()> {
        while self.rstart < self.rend {
            let split = if self.handshake_replies == 0 {
                target.split_next()
            } else {
                None
            };
            let next = self
                .replies
                .next(&self.rbuf[self.rstart..self.rend], split)
                .map_err(|e| e.with_context(self.host.name(), ""))?;
            let Some((frame, used)) = next else {
                break;
            };
            match frame {
                Frame::Split { .. } => {}
                Frame::Bulk { bytes, last } => target.element(Element::Bulk(bytes), last),
                Frame::Element { value, last } => target.element(Element::Value(value), last),
                Frame::Reply(value) => {
                    if self.handshake_replies > 0 {
                        self.check_handshake_reply(value)?;
                    } else if !matches!(value, Value::Push(_)) {
                        // RESP3 pushes are out of band: no request waits for them.
                        target.reply(value);
                    }
                }
            }
            self.rstart += used;
        }
        if self.rstart == self.rend {
            self.rstart = 0;
            self.rend = 0;
        }
        Ok(())
    }

    /// Gives back a read buffer that one huge reply grew, before the
    /// connection idles in the pool (not during a map, where it would only
    /// grow again).
    fn trim(&mut self) {
        if self.rstart == self.rend && self.rbuf.len() > KEEP_READ_BUFFER {
            self.rbuf = Vec::new();
            self.rstart = 0;
            self.rend = 0;
        }
    }

    fn check_handshake_reply(&mut self, value: Value) -> Result<()> {
        let index = self.handshake_names.len() - self.handshake_replies;
        let name = self
            .handshake_names
            .get(index)
            .copied()
            .unwrap_or("handshake");
        self.handshake_replies -= 1;
        if let Value::Error { code, message } = value {
            return Err(Error::Server {
                host: Some(self.host.name().clone()),
                command: name.into(),
                code: code.into(),
                message: message.into(),
            });
        }
        Ok(())
    }

    /// A pooled connection is alive when a read would block: 0 bytes means
    /// the server closed it (e.g. its idle `timeout`), and unexpected bytes
    /// mean its state is unknown.
    pub(crate) fn is_alive(&mut self) -> bool {
        if self.rstart != self.rend || self.replies.is_mid_reply() {
            return false;
        }
        let mut probe = [0u8; 1];
        matches!(self.stream.read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

fn resolve(host: &HostInfo) -> Result<SocketAddr> {
    let name = host.name();
    if let Ok(ip) = host.host.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, host.port));
    }
    let addrs: Vec<SocketAddr> = (host.host.as_str(), host.port)
        .to_socket_addrs()
        .map_err(|e| io_error(name, &e))?
        .collect();
    // Prefer IPv4 when a name has both: `localhost` often resolves to ::1
    // first, while many Redis servers listen on 127.0.0.1 only.
    let pick = addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied();
    pick.ok_or_else(|| Error::Connection {
        host: name.clone(),
        command: None,
        kind: io::ErrorKind::NotFound,
        reason: format!("{:?} resolved to no address", host.host).into(),
    })
}

/// The idle connections of one host, shared by every thread.
pub(crate) struct Pool {
    idle: Mutex<Vec<Connection>>,
    max_idle: usize,
    /// Built on the first TLS connect, then shared by every connection.
    #[cfg(feature = "tls")]
    tls: std::sync::OnceLock<std::result::Result<TlsConfig, Error>>,
}

impl Pool {
    pub(crate) fn new(max_idle: usize) -> Pool {
        Pool {
            idle: Mutex::new(Vec::new()),
            max_idle,
            #[cfg(feature = "tls")]
            tls: std::sync::OnceLock::new(),
        }
    }

    /// A new connection to `host` (its TLS settings built once).
    pub(crate) fn connect(&self, host: &Arc<HostInfo>) -> Result<Connection> {
        if !host.tls {
            return Connection::connect(host.clone(), None);
        }
        #[cfg(feature = "tls")]
        let config = self
            .tls
            .get_or_init(|| crate::tls::client_config(host))
            .clone()?;
        #[cfg(feature = "tls")]
        return Connection::connect(host.clone(), Some(config));
        // Without the feature, connect() refuses TLS hosts with a clear error.
        #[cfg(not(feature = "tls"))]
        Connection::connect(host.clone(), None)
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Connection>> {
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A live pooled connection, or a new one (connecting).
    pub(crate) fn checkout(&self, host: &Arc<HostInfo>) -> Result<Connection> {
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
                None => return self.connect(host),
            }
        }
    }

    /// Takes back a healthy connection; beyond the bound it is closed.
    pub(crate) fn checkin(&self, mut conn: Connection) {
        conn.trim();
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
pub(crate) struct HostEntry {
    pub(crate) info: Arc<HostInfo>,
    pub(crate) pool: Arc<Pool>,
}

/// The cluster's hosts at one moment: replaced whole when hosts change, so
/// a running map keeps a consistent view.
#[derive(Default)]
pub(crate) struct HostTable {
    pub(crate) hosts: std::collections::BTreeMap<crate::error::HostId, HostEntry>,
}
