//! A loopback TCP proxy that injects faults between rb and a redis-server.
//!
//! [`Proxy::start`] listens on `127.0.0.1:0` and forwards every accepted
//! connection to an upstream server (a unix socket, e.g.
//! `TestSetup::socket(i)`, or a TCP address), or to nothing at all
//! ([`Upstream::None`], for the fake-server faults). [`Proxy::set_fault`]
//! changes what happens to data from then on; [`Proxy::accepted`] and
//! [`Proxy::forwarded_bytes`] count what got through, so a test can prove
//! that nothing was retried once a request went out.
//!
//! Std only: one acceptor thread, one thread per client connection, blocking
//! sockets watched with `poll(2)`. Every loop wakes at least every
//! [`TICK`] to look at the stop flag, every write has a timeout, so
//! dropping the [`Proxy`] ends all of its threads within a bounded time.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often idle proxy threads look at the stop flag.
pub const TICK: Duration = Duration::from_millis(10);
/// Write timeout of the proxy's sockets (a blocked write rechecks the stop flag).
const WRITE_TICK: Duration = Duration::from_millis(20);
/// Bytes per write when streaming a fake reply.
const STREAM_CHUNK: usize = 1 << 20;

/// What the proxy does to the traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Pass everything through.
    None,
    /// Each chunk from the server to the client is held back this long
    /// (order is kept).
    Delay(Duration),
    /// Connections are accepted and client bytes are read and dropped;
    /// nothing is ever answered.
    Blackhole,
    /// Requests are forwarded; of the next reply chunk only the first half
    /// is forwarded, then both sides are closed.
    CutMidReply,
    /// Every request is answered with `hello world\r\n`, which is not RESP.
    Garbage,
    /// On the next client bytes the client connection is closed with
    /// `SO_LINGER` 0: the client sees `ECONNRESET`.
    Reset,
    /// The listener is closed (connects are refused) and open connections
    /// are shut down.
    Refuse,
    /// A fake server: any request is answered with `$<n>\r\n`, `n` bytes as
    /// fast as the client takes them, and `\r\n`.
    HugeBulk(usize),
    /// A fake server: each command of a request is answered with its own
    /// `$<n>\r\n`, `n` bytes as fast as the client takes them, and `\r\n`
    /// (commands are counted by the `*` that starts each; keep arguments
    /// free of a `*` after a line end).
    HugeBulkEach(usize),
    /// A fake server: any request is answered with
    /// `*9223372036854775807\r\n` and then `:1\r\n` forever, as fast as the
    /// client takes them, until the client closes (or the fault changes,
    /// which closes the connection).
    EndlessArray,
    /// Bytes both ways are held back (in order) until the fault changes.
    Hold,
    /// Requests are forwarded (first those held by [`Fault::Hold`]); replies
    /// are held back until the fault changes.
    HoldReplies,
    /// [`Fault::Hold`] for the connection with this id (the order the
    /// proxy accepted it in, from 0) only; the others pass.
    HoldConnection(u64),
}

/// Where the proxy forwards to.
#[derive(Clone, Debug)]
pub enum Upstream {
    /// A unix socket (a `TestSetup` server).
    Unix(PathBuf),
    /// A TCP address (loopback only).
    Tcp(SocketAddr),
    /// Nothing: only the fake-server faults answer.
    None,
}

impl Upstream {
    fn connect(&self) -> io::Result<Option<Up>> {
        match self {
            Upstream::Unix(path) => Ok(Some(Up::Unix(UnixStream::connect(path)?))),
            Upstream::Tcp(addr) => {
                assert!(addr.ip().is_loopback(), "the proxy only talks to loopback");
                let s = TcpStream::connect(addr)?;
                let _ = s.set_nodelay(true);
                Ok(Some(Up::Tcp(s)))
            }
            Upstream::None => Ok(None),
        }
    }
}

/// The proxy's connection to the upstream server.
enum Up {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Up {
    fn fd(&self) -> RawFd {
        match self {
            Up::Unix(s) => s.as_raw_fd(),
            Up::Tcp(s) => s.as_raw_fd(),
        }
    }

    fn set_write_timeout(&self, d: Duration) {
        let _ = match self {
            Up::Unix(s) => s.set_write_timeout(Some(d)),
            Up::Tcp(s) => s.set_write_timeout(Some(d)),
        };
    }

    fn shutdown(&self) {
        let _ = match self {
            Up::Unix(s) => s.shutdown(Shutdown::Both),
            Up::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Up {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Up::Unix(s) => s.read(buf),
            Up::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Up {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Up::Unix(s) => s.write(buf),
            Up::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct Shared {
    fault: Mutex<Fault>,
    stop: AtomicBool,
    accepted: AtomicUsize,
    forwarded: AtomicU64,
    received: AtomicU64,
    /// Client bytes read, by connection id.
    received_on: Mutex<Vec<u64>>,
    /// `None` while refusing (closed).
    listener: Mutex<Option<TcpListener>>,
    /// A clone of every open client socket, to shut them down from outside.
    clients: Mutex<Vec<(u64, TcpStream)>>,
    next_id: AtomicU64,
    threads: Mutex<Vec<JoinHandle<()>>>,
    upstream: Upstream,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn fault(&self) -> Fault {
        *lock(&self.fault)
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn disconnect_all(&self) {
        for (_, s) in lock(&self.clients).iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn forget_client(&self, id: u64) {
        lock(&self.clients).retain(|(i, _)| *i != id);
    }
}

/// A running proxy; dropping it stops it (its threads end, its sockets close).
pub struct Proxy {
    shared: Arc<Shared>,
    addr: SocketAddr,
    acceptor: Option<JoinHandle<()>>,
}

impl Proxy {
    /// A proxy on `127.0.0.1:0` in front of `upstream`, passing everything through.
    pub fn start(upstream: Upstream) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy on 127.0.0.1:0");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared {
            fault: Mutex::new(Fault::None),
            stop: AtomicBool::new(false),
            accepted: AtomicUsize::new(0),
            forwarded: AtomicU64::new(0),
            received: AtomicU64::new(0),
            received_on: Mutex::new(Vec::new()),
            listener: Mutex::new(Some(listener)),
            clients: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(0),
            threads: Mutex::new(Vec::new()),
            upstream,
        });
        let s = shared.clone();
        let acceptor = std::thread::Builder::new()
            .name("proxy-accept".into())
            .spawn(move || accept_loop(&s))
            .expect("spawn the proxy's acceptor");
        Proxy {
            shared,
            addr,
            acceptor: Some(acceptor),
        }
    }

    /// A proxy in front of a unix socket (e.g. `TestSetup::socket(i)`).
    pub fn to_unix(path: &Path) -> Proxy {
        Proxy::start(Upstream::Unix(path.to_owned()))
    }

    /// A fake server with no upstream (for `HugeBulk`, `EndlessArray`, `Garbage`, ...).
    pub fn fake(fault: Fault) -> Proxy {
        let p = Proxy::start(Upstream::None);
        p.set_fault(fault);
        p
    }

    /// Where the proxy listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The listening port (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `HostConfig::new().host("127.0.0.1").port(self.port())`.
    pub fn host_config(&self) -> rb::HostConfig {
        rb::HostConfig::new().host("127.0.0.1").port(self.port())
    }

    /// Changes the fault for data that arrives from now on. `Refuse` closes
    /// the listener and shuts down open connections before returning; any
    /// other fault after `Refuse` listens again (same port) before returning.
    pub fn set_fault(&self, fault: Fault) {
        let previous = std::mem::replace(&mut *lock(&self.shared.fault), fault);
        if fault == Fault::Refuse {
            // Taking the lock waits for the acceptor's current poll (one tick).
            drop(lock(&self.shared.listener).take());
            self.shared.disconnect_all();
        } else if previous == Fault::Refuse {
            let deadline = Instant::now() + Duration::from_secs(2);
            let listener = loop {
                match TcpListener::bind(self.addr) {
                    Ok(l) => break l,
                    Err(e) if Instant::now() < deadline => {
                        let _ = e;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => panic!("the proxy cannot listen on {} again: {e}", self.addr),
                }
            };
            *lock(&self.shared.listener) = Some(listener);
        }
    }

    /// The current fault.
    pub fn fault(&self) -> Fault {
        self.shared.fault()
    }

    /// Shuts down every open client connection (the proxy keeps listening).
    pub fn disconnect_all(&self) {
        self.shared.disconnect_all();
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Client bytes the proxy has read so far (forwarded or not).
    pub fn received_bytes(&self) -> u64 {
        self.shared.received.load(Ordering::SeqCst)
    }

    /// Client bytes the proxy has read so far on connection `id` (ids in
    /// the order connections were accepted, from 0).
    pub fn received_bytes_on(&self, id: u64) -> u64 {
        let on = lock(&self.shared.received_on);
        on.get(id as usize).copied().unwrap_or(0)
    }

    /// Client bytes forwarded to the upstream server so far.
    pub fn forwarded_bytes(&self) -> u64 {
        self.shared.forwarded.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        drop(lock(&self.shared.listener).take());
        self.shared.disconnect_all();
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        // Every connection thread wakes within a tick (or a write timeout)
        // and sees the stop flag.
        let threads = std::mem::take(&mut *lock(&self.shared.threads));
        for t in threads {
            let _ = t.join();
        }
    }
}

/// `poll(2)` for readability on `fds`, up to `timeout`; which are readable
/// (or hung up / in error).
fn poll_readable(fds: &[RawFd], timeout: Duration) -> Vec<bool> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: `pfds` is a valid, initialised array of `pfds.len()` pollfds
    // that outlives the call; poll only writes their `revents`.
    let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    if n <= 0 {
        return vec![false; fds.len()];
    }
    pfds.iter().map(|p| p.revents != 0).collect()
}

/// Sets `SO_LINGER` to on/0, so closing the socket sends a reset.
fn set_linger_zero(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the fd is open (owned by `s`), and the option value is a
    // valid `linger` of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "setsockopt(SO_LINGER): {}",
        io::Error::last_os_error()
    );
}

fn accept_loop(shared: &Arc<Shared>) {
    while !shared.stopped() {
        let accepted = {
            let guard = lock(&shared.listener);
            match guard.as_ref() {
                None => None,
                Some(l) => {
                    if poll_readable(&[l.as_raw_fd()], TICK)[0] {
                        l.accept().ok()
                    } else {
                        None
                    }
                }
            }
        };
        let Some((client, _)) = accepted else {
            if lock(&shared.listener).is_none() {
                std::thread::sleep(TICK);
            }
            continue;
        };
        if shared.stopped() {
            return;
        }
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        let s = shared.clone();
        let handle = std::thread::Builder::new()
            .name("proxy-conn".into())
            .spawn(move || serve(&s, client))
            .expect("spawn a proxy connection thread");
        let mut threads = lock(&shared.threads);
        threads.retain(|t| !t.is_finished());
        threads.push(handle);
    }
}

/// Why a connection ends.
enum End {
    /// Close normally (FIN).
    Close,
    /// Close with a reset.
    Reset,
}

/// Writes all of `buf`, rechecking the stop flag on every write timeout.
/// `still` is asked between writes; false aborts.
fn write_all(
    w: &mut impl Write,
    mut buf: &[u8],
    shared: &Shared,
    still: &dyn Fn(&Shared) -> bool,
) -> io::Result<()> {
    while !buf.is_empty() {
        if shared.stopped() || !still(shared) {
            return Err(io::Error::other("proxy stopping"));
        }
        match w.write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn always(_: &Shared) -> bool {
    true
}

fn serve(shared: &Arc<Shared>, client: TcpStream) {
    let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
    if let Ok(clone) = client.try_clone() {
        lock(&shared.clients).push((id, clone));
    }
    let _ = client.set_nodelay(true);
    let _ = client.set_write_timeout(Some(WRITE_TICK));
    let end = match shared.upstream.connect() {
        Ok(up) => {
            if let Some(up) = &up {
                up.set_write_timeout(WRITE_TICK);
            }
            pump(shared, &client, up, id)
        }
        Err(_) => End::Close,
    };
    if let End::Reset = end {
        set_linger_zero(&client);
    }
    // Our clone in `clients` must go first: the socket is closed (and the
    // reset sent) when its last descriptor is.
    shared.forget_client(id);
    if let End::Close = end {
        let _ = client.shutdown(Shutdown::Both);
    }
    drop(client);
}

fn pump(shared: &Shared, client: &TcpStream, mut up: Option<Up>, id: u64) -> End {
    // The fault as this connection sees it.
    let fault_here = || match shared.fault() {
        Fault::HoldConnection(c) if c == id => Fault::Hold,
        Fault::HoldConnection(_) => Fault::None,
        f => f,
    };
    let mut client_r = client;
    let mut client_w = client;
    let mut buf = vec![0u8; 64 * 1024];
    // Server -> client chunks held back by `Delay`, with their due times.
    let mut delayed: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    // Bytes held back by `Hold` (both) and `HoldReplies` (replies).
    let (mut held_up, mut held_down) = (Vec::new(), Vec::new());
    let end = loop {
        if shared.stopped() {
            break End::Close;
        }
        let fault = fault_here();
        if fault != Fault::Hold && !held_up.is_empty() {
            if let Some(u) = up.as_mut() {
                if write_all(u, &held_up, shared, &always).is_err() {
                    break End::Close;
                }
                shared
                    .forwarded
                    .fetch_add(held_up.len() as u64, Ordering::SeqCst);
            }
            held_up.clear();
        }
        if !matches!(fault, Fault::Hold | Fault::HoldReplies) && !held_down.is_empty() {
            if write_all(&mut client_w, &held_down, shared, &always).is_err() {
                break End::Close;
            }
            held_down.clear();
        }
        let now = Instant::now();
        while delayed.front().is_some_and(|(due, _)| *due <= now) {
            let (_, chunk) = delayed.pop_front().expect("front exists");
            if write_all(&mut client_w, &chunk, shared, &always).is_err() {
                return End::Close;
            }
        }
        let wait = delayed.front().map_or(TICK, |(due, _)| {
            due.saturating_duration_since(now).min(TICK)
        });
        let mut fds = vec![client.as_raw_fd()];
        if let Some(u) = &up {
            fds.push(u.fd());
        }
        let ready = poll_readable(&fds, wait);

        if ready[0] {
            let n = match client_r.read(&mut buf) {
                Ok(0) | Err(_) => break End::Close,
                Ok(n) => n,
            };
            let data = &buf[..n];
            shared.received.fetch_add(n as u64, Ordering::SeqCst);
            {
                let mut on = lock(&shared.received_on);
                if on.len() <= id as usize {
                    on.resize(id as usize + 1, 0);
                }
                on[id as usize] += n as u64;
            }
            match fault_here() {
                Fault::Hold | Fault::HoldConnection(_) => held_up.extend_from_slice(data),
                Fault::None | Fault::Delay(_) | Fault::CutMidReply | Fault::HoldReplies => {
                    if let Some(u) = up.as_mut() {
                        if write_all(u, data, shared, &always).is_err() {
                            break End::Close;
                        }
                        shared.forwarded.fetch_add(n as u64, Ordering::SeqCst);
                    }
                }
                Fault::Blackhole => {}
                Fault::Garbage => {
                    if write_all(&mut client_w, b"hello world\r\n", shared, &always).is_err() {
                        break End::Close;
                    }
                }
                Fault::Reset => break End::Reset,
                Fault::Refuse => break End::Close,
                Fault::HugeBulk(len) => {
                    if stream_bulk(&mut client_w, len, shared).is_err() {
                        break End::Close;
                    }
                }
                Fault::HugeBulkEach(len) => {
                    let commands = data
                        .iter()
                        .enumerate()
                        .filter(|&(i, &b)| b == b'*' && (i == 0 || data[i - 1] == b'\n'))
                        .count();
                    if (0..commands).any(|_| stream_bulk(&mut client_w, len, shared).is_err()) {
                        break End::Close;
                    }
                }
                Fault::EndlessArray => {
                    let _ = stream_endless(&mut client_w, shared);
                    break End::Close;
                }
            }
        }

        if ready.get(1).copied().unwrap_or(false) {
            let Some(u) = up.as_mut() else {
                break End::Close;
            };
            let n = match u.read(&mut buf) {
                Ok(0) | Err(_) => break End::Close,
                Ok(n) => n,
            };
            let data = &buf[..n];
            match fault_here() {
                Fault::Delay(d) => {
                    let due = Instant::now() + d;
                    let due = delayed.back().map_or(due, |(last, _)| due.max(*last));
                    delayed.push_back((due, data.to_vec()));
                }
                Fault::CutMidReply => {
                    let _ = write_all(&mut client_w, &data[..n / 2], shared, &always);
                    break End::Close;
                }
                Fault::Blackhole => {}
                Fault::Hold | Fault::HoldReplies => held_down.extend_from_slice(data),
                _ if !delayed.is_empty() => {
                    // Keep the order behind chunks still held back.
                    let due = delayed.back().map_or_else(Instant::now, |(d, _)| *d);
                    delayed.push_back((due, data.to_vec()));
                }
                _ => {
                    if write_all(&mut client_w, data, shared, &always).is_err() {
                        break End::Close;
                    }
                }
            }
        }
    };
    if let Some(u) = &up {
        u.shutdown();
    }
    end
}

/// `$<len>\r\n`, `len` bytes, `\r\n`, as fast as the client reads.
fn stream_bulk(w: &mut impl Write, len: usize, shared: &Shared) -> io::Result<()> {
    let chunk = vec![b'x'; STREAM_CHUNK];
    write_all(w, format!("${len}\r\n").as_bytes(), shared, &always)?;
    let mut left = len;
    while left > 0 {
        let n = left.min(STREAM_CHUNK);
        write_all(w, &chunk[..n], shared, &always)?;
        left -= n;
    }
    write_all(w, b"\r\n", shared, &always)
}

/// `*9223372036854775807\r\n` and `:1\r\n` until the client closes, the
/// proxy stops or the fault changes.
fn stream_endless(w: &mut impl Write, shared: &Shared) -> io::Result<()> {
    let still = |s: &Shared| s.fault() == Fault::EndlessArray;
    let chunk = b":1\r\n".repeat(STREAM_CHUNK / 4);
    write_all(w, b"*9223372036854775807\r\n", shared, &still)?;
    loop {
        write_all(w, &chunk, shared, &still)?;
    }
}
