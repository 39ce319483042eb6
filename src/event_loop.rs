//! One `mio::Poll` driving a connection per host until every request is
//! answered or a deadline passes.
//!
//! The rules (from DESIGN.md "The event loop"):
//! - connects are non-blocking and start the moment a host gets its first
//!   request, so many hosts connect concurrently;
//! - requests are encoded straight into the host's write buffer; once a
//!   buffer passes [`WRITE_THRESHOLD`] it is written while the caller is
//!   still enqueuing, and replies are read whenever the socket is readable,
//!   so a huge map never deadlocks on full kernel buffers;
//! - at most `max_concurrency` hosts have requests in flight; a request for
//!   one more host first waits for one to finish (an implicit join);
//! - join waits until nothing is outstanding or the deadline passes; then
//!   what is left is rejected with a timeout and those connections closed;
//! - a pooled connection that fails before any byte of a request went out is
//!   replaced once, transparently; after that, failures reject the affected
//!   requests (writes are not idempotent, so nothing is retried).

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Events, Poll, Token};

use crate::batch::{BatchKind, Batcher, CmdName, ConnEffect, Element, Expect, Waiter};
use crate::cmd::Cmd;
use crate::config::HostInfo;
use crate::conn::{Connection, HostTable, ReplyTarget};
use crate::error::{Error, HostId, HostName, Phase, Result};
use crate::promise::ReplyContext;
use crate::resp::Value;
use crate::scripts::ScriptMemory;

/// A host's buffered bytes past which they are written while the caller
/// is still enqueuing.
pub(crate) const WRITE_THRESHOLD: usize = 64 * 1024;

/// How a session behaves.
#[derive(Clone, Debug)]
pub(crate) struct LoopOptions {
    /// Join gives up at this instant.
    pub(crate) deadline: Option<Instant>,
    /// The budget the deadline came from, for timeout errors.
    pub(crate) budget: Option<Duration>,
    pub(crate) auto_batch: bool,
    pub(crate) max_batch: usize,
    pub(crate) max_concurrency: usize,
}

/// One host's part of a session.
struct Slot {
    host: Arc<HostInfo>,
    pool: Arc<crate::conn::Pool>,
    conn: Option<Connection>,
    /// Encoded requests; `out[written..]` is not yet sent.
    out: Vec<u8>,
    written: usize,
    /// What each reply still to come answers, in order.
    expects: VecDeque<Expect>,
    batcher: Batcher,
    /// The socket took everything last time (no `WouldBlock` since).
    writable: bool,
    /// `out.len()` at which the next write-while-enqueuing happens.
    next_flush: usize,
    /// Some byte of a request went out on the current connection.
    sent: bool,
    /// The one transparent reconnect was used.
    retried: bool,
    /// Set once the host failed; later requests to it fail at once.
    failed: Option<Error>,
    connect_deadline: Option<Instant>,
    /// Counts the connections installed, to tell a replaced one apart.
    generation: u64,
    /// A command changed the connection's state: close it, never pool it.
    dirty: bool,
}

impl Slot {
    fn is_active(&self) -> bool {
        !self.expects.is_empty() || self.batcher.len() > 0 || self.written < self.out.len()
    }

    fn is_clean(&self) -> bool {
        self.failed.is_none() && !self.is_active()
    }
}

/// Finds slots by host id: a vector for the usual small ids, a map beyond.
#[derive(Default)]
struct SlotIndex {
    dense: Vec<usize>,
    sparse: HashMap<HostId, usize>,
}

const DENSE_IDS: usize = 1 << 16;

impl SlotIndex {
    fn get(&self, id: HostId) -> Option<usize> {
        let id = id as usize;
        if id < DENSE_IDS {
            self.dense.get(id).copied().filter(|&i| i != usize::MAX)
        } else {
            self.sparse.get(&(id as HostId)).copied()
        }
    }

    fn insert(&mut self, id: HostId, slot: usize) {
        let i = id as usize;
        if i < DENSE_IDS {
            if self.dense.len() <= i {
                self.dense.resize(i + 1, usize::MAX);
            }
            self.dense[i] = slot;
        } else {
            self.sparse.insert(id, slot);
        }
    }
}

/// Hands one host's replies to the requests waiting for them, in order.
///
/// A merged `MGET` reply is handed over element by element as it arrives,
/// so when the connection fails part-way through one (closed, timed out,
/// a malformed element), the keys already answered keep their values and
/// only the rest are rejected.
struct Delivery<'a> {
    expects: &'a mut VecDeque<Expect>,
    batcher: &'a mut Batcher,
    host: &'a HostName,
    failures: &'a RefCell<Option<Error>>,
    /// Set when a reply cannot be the answer: the stream is out of step.
    broken: Option<Error>,
}

impl ReplyTarget for Delivery<'_> {
    fn split_next(&self) -> Option<usize> {
        if self.broken.is_some() {
            return None;
        }
        self.expects.front().and_then(Expect::split_len)
    }

    /// After the last element the batch is done and its waiter list goes
    /// back to the batcher.
    #[inline]
    fn element(&mut self, element: Element<'_>, last: bool) {
        if self.broken.is_some() {
            return;
        }
        if let Some(expect) = self.expects.front_mut() {
            expect.deliver_element(element, self.host, self.failures);
        }
        if last {
            if let Some(waiters) = self.expects.pop_front().and_then(Expect::into_waiters) {
                self.batcher.recycle(waiters);
            }
        }
    }

    fn reply(&mut self, value: Value) {
        if self.broken.is_some() {
            return;
        }
        match self.expects.pop_front() {
            Some(expect) => self.broken = expect.deliver(value, self.host, self.failures),
            None => {
                self.broken = Some(Error::Protocol {
                    host: Some(self.host.clone()),
                    reason: format!("the server sent {} when no reply was due", value.describe())
                        .into(),
                })
            }
        }
    }
}

/// A failure of the poll itself, which concerns no one host: it names the
/// pseudo-host `poll`.
fn poll_error(e: &std::io::Error, what: &str) -> Error {
    Error::Connection {
        host: crate::error::HostName {
            id: 0,
            addr: "poll".into(),
        },
        command: None,
        kind: e.kind(),
        reason: format!("{what}: {e}").into(),
    }
}

thread_local! {
    /// One poll per thread, reused by its sessions (an `epoll` instance
    /// costs two syscalls to make and drop).
    static IDLE_POLL: RefCell<Option<(Poll, Events)>> = const { RefCell::new(None) };
}

/// One map, fanout or immediate command in flight.
pub(crate) struct Session {
    poll: Option<(Poll, Events)>,
    hosts: Arc<HostTable>,
    slots: Vec<Slot>,
    index: SlotIndex,
    opts: LoopOptions,
    /// The first failure of any request, in the order failures happened.
    failures: Rc<RefCell<Option<Error>>>,
    ready: Vec<(usize, bool, bool)>,
    scripts: Arc<ScriptMemory>,
}

impl Session {
    pub(crate) fn new(
        hosts: Arc<HostTable>,
        scripts: Arc<ScriptMemory>,
        opts: LoopOptions,
    ) -> Result<Session> {
        let poll = match IDLE_POLL.with(|p| p.borrow_mut().take()) {
            Some(p) => p,
            None => (
                Poll::new().map_err(|e| poll_error(&e, "cannot create a poll instance"))?,
                Events::with_capacity(1024),
            ),
        };
        Ok(Session {
            poll: Some(poll),
            hosts,
            slots: Vec::new(),
            index: SlotIndex::default(),
            opts,
            failures: Rc::default(),
            ready: Vec::new(),
            scripts,
        })
    }

    /// The cluster's memory of loaded scripts.
    pub(crate) fn scripts(&self) -> &Arc<ScriptMemory> {
        &self.scripts
    }

    /// A shared record of the first failure; waiters write to it.
    pub(crate) fn failures(&self) -> Rc<RefCell<Option<Error>>> {
        self.failures.clone()
    }

    /// The slot of `id`, created (and its connection started) on first use.
    fn slot(&mut self, id: HostId) -> Result<usize> {
        if let Some(i) = self.index.get(id) {
            return Ok(i);
        }
        let entry = self.hosts.hosts.get(&id).ok_or(Error::NoSuchHost { id })?;
        let i = self.slots.len();
        self.slots.push(Slot {
            host: entry.info.clone(),
            pool: entry.pool.clone(),
            conn: None,
            out: Vec::new(),
            written: 0,
            expects: VecDeque::new(),
            batcher: Batcher::default(),
            writable: false,
            next_flush: WRITE_THRESHOLD,
            sent: false,
            retried: false,
            failed: None,
            connect_deadline: None,
            generation: 0,
            dirty: false,
        });
        self.index.insert(id, i);
        Ok(i)
    }

    /// Makes sure slot `i` has a connection (checked out or connecting).
    fn ensure_connection(&mut self, i: usize) {
        if self.slots[i].conn.is_some() || self.slots[i].failed.is_some() {
            return;
        }
        let slot = &mut self.slots[i];
        let conn = slot.pool.checkout(&slot.host);
        self.install(i, conn);
    }

    fn install(&mut self, i: usize, conn: Result<Connection>) {
        let registry = self.poll.as_ref().map(|(p, _)| p.registry());
        let slot = &mut self.slots[i];
        let mut conn = match conn {
            Ok(c) => c,
            Err(e) => {
                Self::reject_slot(slot, e, &self.failures);
                return;
            }
        };
        if let Some(registry) = registry {
            if let Err(e) = conn.register(registry, Token(i)) {
                let e = Error::Connection {
                    host: slot.host.name().clone(),
                    command: None,
                    kind: e.kind(),
                    reason: format!("cannot register with the poll: {e}").into(),
                };
                Self::reject_slot(slot, e, &self.failures);
                return;
            }
        }
        slot.writable = conn.is_connected();
        slot.sent = false;
        slot.generation += 1;
        slot.connect_deadline = (!conn.is_ready())
            .then(|| Instant::now().checked_add(slot.host.connect_timeout))
            .flatten();
        slot.conn = Some(conn);
    }

    /// Queues `cmd` for host `id`; `waiter` gets its reply or failure.
    pub(crate) fn enqueue(&mut self, id: HostId, cmd: &Cmd, waiter: Waiter) {
        let effect = ConnEffect::of(cmd);
        if effect == ConnEffect::Refused {
            let e = Error::Unsupported {
                command: cmd.display_name().into(),
                reason: "it turns the connection into a push stream (pub/sub, MONITOR), which rb's pipelines do not support".into(),
            };
            return self.refuse(&waiter, cmd, None, e);
        }
        let i = match self.slot(id) {
            Ok(i) => i,
            Err(e) => return self.refuse(&waiter, cmd, None, e),
        };
        if let Some(e) = self.slots[i].failed.clone() {
            let host = self.slots[i].host.clone();
            return self.refuse(&waiter, cmd, Some(host.name()), e);
        }
        if !self.slots[i].is_active() {
            self.wait_for_capacity();
        }
        self.ensure_connection(i);
        if let Some(e) = self.slots[i].failed.clone() {
            let host = self.slots[i].host.clone();
            return self.refuse(&waiter, cmd, Some(host.name()), e);
        }
        let slot = &mut self.slots[i];
        if effect == ConnEffect::Dirty {
            slot.dirty = true;
        }
        match BatchKind::of(cmd).filter(|_| self.opts.auto_batch) {
            Some(kind) => {
                if !slot.batcher.accepts(kind) {
                    if let Some(expect) = slot.batcher.flush(&mut slot.out) {
                        slot.expects.push_back(expect);
                    }
                }
                slot.batcher.push(kind, cmd, waiter);
                if slot.batcher.len() >= self.opts.max_batch {
                    if let Some(expect) = slot.batcher.flush(&mut slot.out) {
                        slot.expects.push_back(expect);
                    }
                }
            }
            None => {
                if let Some(expect) = slot.batcher.flush(&mut slot.out) {
                    slot.expects.push_back(expect);
                }
                cmd.write_packed(&mut slot.out);
                slot.expects.push_back(Expect::One {
                    name: CmdName::of(cmd.name()),
                    waiter,
                });
            }
        }
        if slot.out.len() >= slot.next_flush {
            // Send while the caller is still enqueuing, and take in what
            // the servers have answered so far: once per threshold's worth
            // of new bytes, so a socket that is full costs no extra syscalls.
            if slot.writable {
                self.write_slot(i);
            }
            self.pump(Some(Duration::ZERO));
            let slot = &mut self.slots[i];
            slot.next_flush = slot.out.len() + WRITE_THRESHOLD;
        }
    }

    /// Rejects a request that cannot be queued.
    fn refuse(&self, waiter: &Waiter, cmd: &Cmd, host: Option<&crate::error::HostName>, e: Error) {
        let name = CmdName::of(cmd.name());
        let ctx = ReplyContext {
            host,
            command: name.as_str(),
            failures: &self.failures,
        };
        waiter.accept(Err(e), &ctx);
    }

    fn active_count(&self) -> usize {
        self.slots.iter().filter(|s| s.is_active()).count()
    }

    /// Past `max_concurrency` hosts in flight, waits for one to finish.
    fn wait_for_capacity(&mut self) {
        if self.active_count() < self.opts.max_concurrency {
            return;
        }
        self.drive(|s| s.active_count() < s.opts.max_concurrency);
    }

    /// Waits until every request is settled or the deadline passed.
    pub(crate) fn join(&mut self) {
        self.drive(|s| s.active_count() == 0);
    }

    /// Runs the loop until `done` holds, rejecting on deadlines.
    fn drive(&mut self, done: impl Fn(&Session) -> bool) {
        loop {
            for i in 0..self.slots.len() {
                let slot = &mut self.slots[i];
                if let Some(expect) = slot.batcher.flush(&mut slot.out) {
                    slot.expects.push_back(expect);
                }
                if slot.written < slot.out.len() && slot.writable {
                    self.write_slot(i);
                }
            }
            if done(self) {
                return;
            }
            let now = Instant::now();
            if self.opts.deadline.is_some_and(|d| now >= d) {
                self.expire_all();
                continue;
            }
            let mut wake = self.opts.deadline;
            for slot in &self.slots {
                if let (Some(d), true) = (slot.connect_deadline, slot.conn.is_some()) {
                    wake = Some(wake.map_or(d, |w| w.min(d)));
                }
            }
            let timeout = wake.map(|w| w.saturating_duration_since(now));
            self.pump(timeout);
            self.expire_connects();
        }
    }

    /// Polls once (up to `timeout`) and handles what is ready.
    fn pump(&mut self, timeout: Option<Duration>) {
        let Some((poll, events)) = self.poll.as_mut() else {
            return;
        };
        if let Err(e) = poll.poll(events, timeout) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                // A broken poll leaves no way to make progress: fail all.
                let err = poll_error(&e, "poll failed");
                for i in 0..self.slots.len() {
                    self.fail_slot(i, err.clone());
                }
            }
            return;
        }
        self.ready.clear();
        for event in events.iter() {
            let readable = event.is_readable() || event.is_read_closed() || event.is_error();
            let writable = event.is_writable() || event.is_write_closed() || event.is_error();
            self.ready.push((event.token().0, readable, writable));
        }
        let ready = std::mem::take(&mut self.ready);
        for &(i, readable, writable) in &ready {
            if i >= self.slots.len() || self.slots[i].conn.is_none() {
                continue;
            }
            if writable {
                self.on_writable(i);
            }
            if readable {
                self.read_slot(i);
                let slot = &mut self.slots[i];
                if slot.conn.as_ref().is_some_and(|c| c.is_ready()) {
                    slot.connect_deadline = None;
                }
                // Reading TLS records can leave records to send (handshake
                // steps), and the socket may stay writable with no new event.
                let slot = &self.slots[i];
                if slot.conn.as_ref().is_some_and(|c| c.wants_write()) {
                    self.write_slot(i);
                }
            }
        }
        self.ready = ready;
    }

    fn on_writable(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        let Some(conn) = slot.conn.as_mut() else {
            return;
        };
        match conn.finish_connect() {
            Ok(true) => {
                // The connect budget also covers the TLS and Redis
                // handshakes: it ends once the connection is ready.
                if conn.is_ready() {
                    slot.connect_deadline = None;
                }
                slot.writable = true;
                self.write_slot(i);
            }
            Ok(false) => {}
            Err(e) => self.fail_slot(i, e),
        }
    }

    fn write_slot(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        let Some(conn) = slot.conn.as_mut() else {
            return;
        };
        if !conn.is_connected() {
            return;
        }
        let before = slot.written;
        let result = conn.write_from(&slot.out, &mut slot.written);
        if slot.written > before {
            slot.sent = true;
        }
        match result {
            Ok(true) => {
                slot.writable = true;
                if slot.written == slot.out.len() {
                    slot.written = 0;
                    slot.next_flush = WRITE_THRESHOLD;
                    // Kept for the rest of the session (it would only grow
                    // again); released with the session.
                    slot.out.clear();
                }
            }
            Ok(false) => slot.writable = false,
            Err(e) => {
                // Replies that arrived before the failure still count.
                let generation = self.slots[i].generation;
                self.read_slot(i);
                let slot = &self.slots[i];
                if slot.conn.is_some() && slot.generation == generation {
                    self.fail_slot(i, e);
                }
            }
        }
    }

    fn read_slot(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        let Slot {
            conn,
            expects,
            host,
            batcher,
            ..
        } = slot;
        let Some(conn) = conn.as_mut() else {
            return;
        };
        let mut delivery = Delivery {
            expects,
            batcher,
            host: host.name(),
            failures: &self.failures,
            broken: None,
        };
        let result = conn.read_replies(&mut delivery);
        if let Some(e) = delivery.broken {
            // The reply stream is out of step with the requests: nothing
            // after this point can be trusted, so the connection goes.
            self.slots[i].retried = true;
            return self.fail_slot(i, e);
        }
        if let Err(e) = result {
            self.fail_slot(i, e);
        }
    }

    /// Rejects everything outstanding on slot `i` and closes its
    /// connection, except for one transparent reconnect of a pooled
    /// connection that failed before sending anything.
    fn fail_slot(&mut self, i: usize, mut error: Error) {
        let registry = self.poll.as_ref().map(|(p, _)| p.registry());
        let slot = &mut self.slots[i];
        if let Some(mut conn) = slot.conn.take() {
            if let Some(registry) = registry {
                conn.deregister(registry);
            }
            let stale = conn.reused && !slot.sent && !slot.retried;
            let transport = matches!(error, Error::Connection { .. });
            drop(conn);
            if stale && transport {
                slot.retried = true;
                slot.written = 0;
                let fresh = slot.pool.connect(&slot.host);
                match fresh {
                    Ok(c) => return self.install(i, Ok(c)),
                    Err(e) => error = e,
                }
            }
        }
        Self::reject_slot(&mut self.slots[i], error, &self.failures);
    }

    fn reject_slot(slot: &mut Slot, error: Error, failures: &RefCell<Option<Error>>) {
        slot.conn = None;
        slot.connect_deadline = None;
        let host = slot.host.clone();
        slot.batcher.fail(&error, Some(host.name()), failures);
        for expect in slot.expects.drain(..) {
            expect.fail(&error, Some(host.name()), failures);
        }
        slot.out.clear();
        slot.written = 0;
        slot.failed = Some(error);
    }

    /// Fails hosts whose connect budget ran out.
    fn expire_connects(&mut self) {
        let now = Instant::now();
        for i in 0..self.slots.len() {
            let slot = &self.slots[i];
            let late = slot.connect_deadline.is_some_and(|d| now >= d)
                && slot.conn.as_ref().is_some_and(|c| !c.is_ready());
            if late {
                let e = Error::Timeout {
                    host: slot.host.name().clone(),
                    phase: Phase::Connect,
                    budget: slot.host.connect_timeout,
                    command: None,
                };
                self.slots[i].retried = true;
                self.fail_slot(i, e);
            }
        }
    }

    /// The deadline passed: reject what is left, naming the phase.
    fn expire_all(&mut self) {
        let budget = self.opts.budget.unwrap_or_default();
        for i in 0..self.slots.len() {
            let slot = &mut self.slots[i];
            if !slot.is_active() {
                continue;
            }
            let phase = match &slot.conn {
                Some(c) if !c.is_connected() => Phase::Connect,
                Some(_) if slot.written < slot.out.len() || slot.batcher.len() > 0 => Phase::Write,
                Some(_) => Phase::Read,
                None => Phase::Connect,
            };
            let e = Error::Timeout {
                host: slot.host.name().clone(),
                phase,
                budget,
                command: None,
            };
            slot.retried = true;
            self.fail_slot(i, e);
        }
    }

    /// Ends the session: healthy connections go back to their pools, the
    /// rest are closed. Returns the first failure.
    pub(crate) fn finish(mut self) -> Option<Error> {
        self.release();
        self.failures.borrow_mut().take()
    }

    fn release(&mut self) {
        let registry = self.poll.as_ref().map(|(p, _)| p.registry());
        for slot in &mut self.slots {
            let clean = slot.is_clean() && !slot.dirty;
            if let Some(mut conn) = slot.conn.take() {
                if let Some(registry) = registry {
                    conn.deregister(registry);
                }
                if clean && conn.is_ready() {
                    slot.pool.checkin(conn);
                }
            }
        }
        self.slots.clear();
        if let Some(poll) = self.poll.take() {
            IDLE_POLL.with(|p| {
                if let Ok(mut p) = p.try_borrow_mut() {
                    if p.is_none() {
                        *p = Some(poll);
                    }
                }
            });
        }
    }
}

impl Drop for Session {
    /// A session dropped without `finish` (the caller's closure panicked)
    /// closes its connections instead of pooling them: their state is
    /// unknown.
    fn drop(&mut self) {
        if self.slots.is_empty() {
            return;
        }
        let registry = self.poll.as_ref().map(|(p, _)| p.registry());
        for slot in &mut self.slots {
            if let Some(mut conn) = slot.conn.take() {
                if let Some(registry) = registry {
                    conn.deregister(registry);
                }
            }
        }
    }
}
