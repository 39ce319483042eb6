//! One `mio::Poll` driving a connection per host until every request is
//! answered or a deadline passes. It only moves bytes and watches
//! deadlines: each host's [`Pipeline`] decides what to write and which
//! request each reply answers.
//!
//! The rules (from DESIGN.md "The event loop"):
//! - connects are non-blocking and start the moment a host gets its first
//!   request, so many hosts connect concurrently; a host name is resolved
//!   on a helper thread that wakes the poll ([`WAKE`]) when its addresses
//!   are in, so the names of many hosts resolve concurrently too, each
//!   within its host's connect deadline;
//! - requests are encoded straight into the host's write buffer; once a
//!   buffer passes [`WRITE_THRESHOLD`] it is written while the caller is
//!   still enqueuing, and replies are read whenever the socket is readable,
//!   so a huge map never deadlocks on full kernel buffers;
//! - at most `max_concurrency` hosts have requests in flight; a request for
//!   one more host first waits for one to finish (an implicit join);
//! - reads come in bounded steps, and deadlines are checked between them,
//!   so a peer sending at full speed cannot hold a caller past its deadline;
//! - join waits until nothing is outstanding or the deadline passes; then
//!   what is left is rejected with a timeout and those connections closed;
//!   a host with nothing outstanding gives its connection back to the pool
//!   at once, for other threads to use;
//! - a pooled connection that fails before any byte of a request went out is
//!   replaced once, transparently; after that, failures reject the affected
//!   requests (writes are not idempotent, so nothing is retried).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Events, Poll, Token, Waker};

use crate::cmd::Cmd;
use crate::conn::{closed_error, io_error, Connection, HostEntry, Pool};
use crate::error::{Error, HostId, HostName, Phase, Result};
use crate::health::HostWatch;
use crate::pipeline::{BatchKind, CmdName, ConnEffect, Pipeline, Waiter};
use crate::promise::Outcomes;
use crate::scripts::ScriptMemory;

/// Read steps one host gets per turn of the loop before the others (and
/// the deadlines) get theirs.
const READ_STEPS_PER_TURN: usize = 8;

/// The poll's token for its [`Waker`]: a name lookup finished. Slots use
/// their index as token, which never comes near it.
const WAKE: Token = Token(usize::MAX);

/// A poll, its event buffer, and its one waker (mio allows one per poll),
/// which the name lookups of the poll's connections wake.
struct Polling {
    poll: Poll,
    events: Events,
    waker: Arc<Waker>,
}

/// The hosts a session may reach, by id.
pub(crate) type HostMap = BTreeMap<HostId, HostEntry>;

/// How a session behaves.
#[derive(Clone, Debug)]
pub(crate) struct LoopOptions {
    /// Join gives up at this instant (a map's timeout).
    pub(crate) deadline: Option<Instant>,
    /// The budget the deadline came from, for timeout errors.
    pub(crate) budget: Option<Duration>,
    /// A budget per host that starts once its connection is ready (an
    /// immediate command's write and read timeouts), so a slow connect is
    /// charged to the connect budget alone.
    pub(crate) request_budget: Option<Duration>,
    pub(crate) auto_batch: bool,
    pub(crate) max_batch: usize,
    pub(crate) max_concurrency: usize,
    /// Keep idle hosts' connections instead of returning them to their
    /// pools between turns (the driver's multiplexed connections).
    pub(crate) keep_idle: bool,
}

/// How a request is queued.
#[derive(Clone, Copy, Default)]
struct How {
    /// May merge into an MGET/MSET.
    auto_batch: bool,
    /// A health probe: sent to a Down host.
    probe: bool,
    /// Part of a group that leaves the connection clean.
    clean: bool,
}

/// One host's part of a session.
struct Slot {
    pipeline: Pipeline,
    pool: Arc<Pool>,
    conn: Option<Connection>,
    /// The socket took everything last time (no `WouldBlock` since).
    writable: bool,
    /// The last read turn ended before the socket was drained.
    more_to_read: bool,
    /// The one transparent reconnect was used.
    retried: bool,
    /// Set once the host failed; later requests to it fail at once.
    failed: Option<Error>,
    connect_deadline: Option<Instant>,
    /// When the request budget runs out (see [`LoopOptions::request_budget`]).
    request_deadline: Option<Instant>,
    /// A command changed the connection's state: close it, never pool it.
    dirty: bool,
    /// The host's health and counters, shared with every other user.
    watch: Arc<HostWatch>,
    /// A new connection, to report as connected once it is ready.
    announce: bool,
    /// Some reply came on the current connection.
    heard: bool,
    /// The next failure is the map's deadline, not the host's fault (the
    /// host was answering): it does not count against its health.
    exempt: bool,
}

impl Slot {
    fn is_active(&self) -> bool {
        self.pipeline.is_active()
    }

    fn name(&self) -> &HostName {
        self.pipeline.name()
    }
}

/// Finds slots by host id: a vector for small ids, a map beyond (a
/// sparse id costs no memory up to it).
#[derive(Default)]
struct SlotIndex {
    dense: Vec<usize>,
    /// Ids from [`SECOND_BASE`] on, by their distance from it (a migrating
    /// map's old hosts join its session there).
    second: Vec<usize>,
    sparse: HashMap<HostId, usize>,
}

/// Ids below this (from 0, and from [`SECOND_BASE`]) are found through a
/// vector.
const DENSE_IDS: usize = 1024;

/// Where a second cluster's ids start in a session that has two.
pub(crate) const SECOND_BASE: HostId = 1 << 31;

impl SlotIndex {
    /// The vector and place for `id`, when it has one.
    fn dense_place(id: HostId) -> Option<(bool, usize)> {
        let (second, offset) = match id.checked_sub(SECOND_BASE) {
            Some(offset) => (true, offset as usize),
            None => (false, id as usize),
        };
        (offset < DENSE_IDS).then_some((second, offset))
    }

    fn get(&self, id: HostId) -> Option<usize> {
        match Self::dense_place(id) {
            Some((second, i)) => {
                let dense = if second { &self.second } else { &self.dense };
                dense.get(i).copied().filter(|&i| i != usize::MAX)
            }
            None => self.sparse.get(&id).copied(),
        }
    }

    fn insert(&mut self, id: HostId, slot: usize) {
        match Self::dense_place(id) {
            Some((second, i)) => {
                let dense = if second {
                    &mut self.second
                } else {
                    &mut self.dense
                };
                if dense.len() <= i {
                    dense.resize(i + 1, usize::MAX);
                }
                dense[i] = slot;
            }
            None => {
                self.sparse.insert(id, slot);
            }
        }
    }
}

thread_local! {
    /// One poll per thread, reused by its sessions (an `epoll` instance
    /// costs two syscalls to make and drop).
    static IDLE_POLL: RefCell<Option<Polling>> = const { RefCell::new(None) };
}

/// One map, fanout or immediate command in flight.
pub(crate) struct Session {
    /// Made on the first host's first request (a failure to make it then
    /// names that host).
    poll: Option<Polling>,
    hosts: Arc<HostMap>,
    slots: Vec<Slot>,
    index: SlotIndex,
    opts: LoopOptions,
    /// The first failure of any request (in the order failures happened)
    /// and a migrating map's GETs that missed.
    outcomes: Outcomes,
    ready: Vec<(usize, bool, bool)>,
    scripts: Arc<ScriptMemory>,
}

impl Session {
    pub(crate) fn new(
        hosts: Arc<HostMap>,
        scripts: Arc<ScriptMemory>,
        opts: LoopOptions,
    ) -> Session {
        Session {
            poll: IDLE_POLL.with(|p| p.borrow_mut().take()),
            hosts,
            slots: Vec::new(),
            index: SlotIndex::default(),
            opts,
            outcomes: Outcomes::default(),
            ready: Vec::new(),
            scripts,
        }
    }

    /// The cluster's memory of loaded scripts.
    pub(crate) fn scripts(&self) -> &Arc<ScriptMemory> {
        &self.scripts
    }

    /// A shared record of the first failure; waiters write to it.
    pub(crate) fn failures(&self) -> Rc<RefCell<Option<Error>>> {
        self.outcomes.failures.clone()
    }

    /// A migrating map's GETs that missed since the last call (see
    /// [`Waiter::for_migrating_get`]).
    pub(crate) fn drain_misses(&self, f: impl FnMut(crate::promise::Miss)) {
        self.outcomes.drain_misses(f)
    }

    /// The poll, made on first use.
    fn poll(&mut self, host: &HostName) -> Result<&mut Polling> {
        match &mut self.poll {
            Some(poll) => Ok(poll),
            none => {
                let poll = Poll::new()
                    .map_err(|e| poll_error(host, &e, "cannot create a poll instance"))?;
                let waker = Waker::new(poll.registry(), WAKE)
                    .map_err(|e| poll_error(host, &e, "cannot create a waker"))?;
                Ok(none.insert(Polling {
                    poll,
                    events: Events::with_capacity(1024),
                    waker: Arc::new(waker),
                }))
            }
        }
    }

    /// The poll's waker (the poll made on first use), for name lookups.
    fn waker(&mut self, host: &HostName) -> Result<Arc<Waker>> {
        Ok(self.poll(host)?.waker.clone())
    }

    /// Registers `conn` (slot `i`'s new or replaced socket) with the poll.
    fn register(&mut self, i: usize, conn: &mut Connection) -> Result<()> {
        let name = self.slots[i].name().clone();
        let polling = self.poll(&name)?;
        conn.register(polling.poll.registry(), Token(i))
            .map_err(|e| poll_error(&name, &e, "cannot register with the poll"))
    }

    /// The slot of `id`, created on first use.
    fn slot(&mut self, id: HostId) -> Result<usize> {
        if let Some(i) = self.index.get(id) {
            return Ok(i);
        }
        let entry = self.hosts.get(&id).ok_or(Error::NoSuchHost { id })?;
        let i = self.slots.len();
        self.slots.push(Slot {
            pipeline: Pipeline::new(entry.info.clone()),
            pool: entry.pool.clone(),
            conn: None,
            writable: false,
            more_to_read: false,
            retried: false,
            failed: None,
            connect_deadline: None,
            request_deadline: None,
            dirty: false,
            watch: entry.watch.clone(),
            announce: false,
            heard: false,
            exempt: false,
        });
        self.index.insert(id, i);
        Ok(i)
    }

    /// Makes sure slot `i` has a connection (checked out or connecting).
    fn ensure_connection(&mut self, i: usize) {
        if self.slots[i].conn.is_some() || self.slots[i].failed.is_some() {
            return;
        }
        let name = self.slots[i].name().clone();
        let conn = self.waker(&name).and_then(|waker| {
            let slot = &self.slots[i];
            slot.pool.checkout(slot.pipeline.host(), &waker)
        });
        self.install(i, conn);
    }

    fn install(&mut self, i: usize, conn: Result<Connection>) {
        let mut conn = match conn {
            Ok(c) => c,
            Err(e) => return self.reject_slot(i, e),
        };
        if let Err(e) = self.register(i, &mut conn) {
            return self.reject_slot(i, e);
        }
        let slot = &mut self.slots[i];
        let fresh = !conn.ready;
        slot.pipeline
            .connection_started(fresh, std::mem::take(&mut conn.spare));
        slot.writable = conn.is_connected();
        slot.more_to_read = false;
        slot.dirty = false;
        slot.announce = fresh;
        slot.heard = false;
        slot.connect_deadline = (!conn.ready)
            .then(|| Instant::now().checked_add(slot.pipeline.host().connect_timeout))
            .flatten();
        slot.request_deadline = None;
        slot.conn = Some(conn);
        self.start_request_budget(i);
    }

    /// Starts slot `i`'s request budget once its connection is ready.
    fn start_request_budget(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        let ready =
            slot.pipeline.is_ready() && slot.conn.as_ref().is_some_and(Connection::is_established);
        if ready {
            slot.connect_deadline = None;
            if let (None, Some(budget)) = (slot.request_deadline, self.opts.request_budget) {
                slot.request_deadline = Instant::now().checked_add(budget);
            }
            if std::mem::take(&mut slot.announce) {
                slot.watch.connected();
            }
        }
    }

    /// Adds what slot `i`'s pipeline did since last time to its host's
    /// stats; replies make the host count as working.
    fn report(&mut self, i: usize, timed_out: bool) {
        let slot = &mut self.slots[i];
        let tally = slot.pipeline.tally();
        if tally.is_empty() {
            return;
        }
        let answered = !tally.replies.is_empty();
        slot.watch.report(tally, timed_out);
        if answered {
            slot.heard = true;
            slot.watch.answered(Instant::now());
        }
    }

    /// Queues `cmd` for host `id`; `waiter` gets its reply or failure.
    pub(crate) fn enqueue(&mut self, id: HostId, cmd: &Cmd, waiter: Waiter) {
        self.enqueue_batching(id, cmd, waiter, self.opts.auto_batch);
    }

    /// [`Session::enqueue`], merging GETs (SETs) into MGET (MSET) only
    /// with `auto_batch`.
    pub(crate) fn enqueue_batching(
        &mut self,
        id: HostId,
        cmd: &Cmd,
        waiter: Waiter,
        auto_batch: bool,
    ) {
        let how = How {
            auto_batch,
            ..How::default()
        };
        self.enqueue_how(id, cmd, waiter, how);
    }

    /// Queues a probe of a Down host (its health already handed this
    /// request the probe): not refused as the host's other requests are.
    pub(crate) fn enqueue_probe(&mut self, id: HostId, cmd: &Cmd, waiter: Waiter) {
        let how = How {
            probe: true,
            ..How::default()
        };
        self.enqueue_how(id, cmd, waiter, how);
    }

    /// Queues a group for one host that leaves its connection clean only
    /// if it runs whole (`MULTI` ... `EXEC`, `WATCH` ... `UNWATCH`): the
    /// host's health admits the group once, so it is sent whole or not at
    /// all; never merged into batches.
    pub(crate) fn enqueue_group<'c>(
        &mut self,
        id: HostId,
        group: impl IntoIterator<Item = (&'c Cmd, Waiter)>,
    ) {
        let admitted = match self.slot(id) {
            Ok(i) => self.slots[i].watch.admit().map(|()| Some(i)),
            Err(e) => Err(e),
        };
        match admitted {
            Ok(_) => {
                let how = How {
                    clean: true,
                    probe: true,
                    ..How::default()
                };
                for (cmd, waiter) in group {
                    self.enqueue_how(id, cmd, waiter, how);
                }
            }
            Err(e) => {
                let name = self.index.get(id).map(|i| self.slots[i].name().clone());
                for (cmd, waiter) in group {
                    self.refuse(&waiter, cmd, name.as_ref(), e.clone());
                }
            }
        }
    }

    fn enqueue_how(&mut self, id: HostId, cmd: &Cmd, waiter: Waiter, how: How) {
        let effect = ConnEffect::of(cmd);
        if let ConnEffect::Refused(reason) = effect {
            let e = Error::Unsupported {
                command: cmd.display_name().into(),
                reason: reason.into(),
            };
            return self.refuse(&waiter, cmd, None, e);
        }
        let i = match self.slot(id) {
            Ok(i) => i,
            Err(e) => return self.refuse(&waiter, cmd, None, e),
        };
        let admission = if how.probe {
            Ok(())
        } else {
            self.slots[i].watch.admit()
        };
        if let Err(e) = admission {
            let name = self.slots[i].name().clone();
            return self.refuse(&waiter, cmd, Some(&name), e);
        }
        if !self.slots[i].is_active() {
            self.wait_for_capacity();
        }
        self.ensure_connection(i);
        if let Some(e) = self.slots[i].failed.clone() {
            let name = self.slots[i].name().clone();
            return self.refuse(&waiter, cmd, Some(&name), e);
        }
        self.start_request_budget(i);
        let max_batch = self.opts.max_batch;
        let slot = &mut self.slots[i];
        if effect == ConnEffect::Dirty && !how.clean {
            slot.dirty = true;
        }
        let batch = BatchKind::of(cmd).filter(|_| how.auto_batch);
        slot.pipeline.push(cmd, waiter, batch, max_batch);
        if slot.pipeline.wants_early_write() {
            // Send while the caller is still enqueuing, and take in what
            // the servers have answered so far: once per threshold's worth
            // of new bytes, so a socket that is full costs no extra syscalls.
            if slot.writable {
                self.write_slot(i);
            }
            self.pump(Some(Duration::ZERO));
            self.slots[i].pipeline.flushed_early();
        }
    }

    /// Rejects a request that cannot be queued.
    fn refuse(&self, waiter: &Waiter, cmd: &Cmd, host: Option<&HostName>, e: Error) {
        let name = CmdName::of(cmd.name());
        let ctx = self.outcomes.context(host, name.as_str());
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
        self.join_with(&mut |_| {});
    }

    /// [`Session::join`], calling `between` before each turn of the loop
    /// (a migrating map asks old owners for the misses so far while the
    /// rest of its reads are still on their way).
    pub(crate) fn join_with(&mut self, between: &mut dyn FnMut(&mut Session)) {
        self.drive_with(|s| s.active_count() == 0, between);
    }

    /// [`Session::join`] by `deadline` too (whichever comes first; `budget`
    /// is what a timeout error then reports), for a mapping client joined
    /// more than once. Afterwards a host that failed may be tried again.
    pub(crate) fn join_by(
        &mut self,
        deadline: Option<Instant>,
        budget: Option<Duration>,
        between: &mut dyn FnMut(&mut Session),
    ) {
        let own = (self.opts.deadline, self.opts.budget);
        if let Some(d) = deadline {
            if own.0.map_or(true, |o| d < o) {
                self.opts.deadline = Some(d);
                self.opts.budget = budget;
            }
        }
        self.join_with(between);
        (self.opts.deadline, self.opts.budget) = own;
        self.forget_failed_hosts();
    }

    /// Rejects everything outstanding with the error `why` gives for its
    /// host, and closes those connections (their replies can no longer be
    /// accounted for). Hosts with nothing outstanding keep theirs.
    pub(crate) fn cancel(&mut self, why: impl Fn(&HostName) -> Error) {
        for i in 0..self.slots.len() {
            let slot = &mut self.slots[i];
            slot.pipeline.flush_batch();
            if slot.is_active() {
                let e = why(slot.name());
                slot.retried = true;
                self.fail_slot(i, e);
            }
        }
        self.release_idle();
        self.forget_failed_hosts();
    }

    fn forget_failed_hosts(&mut self) {
        for slot in &mut self.slots {
            if !matches!(slot.failed, Some(Error::NoSuchHost { .. })) {
                slot.failed = None;
            }
        }
    }

    /// Keeps idle hosts' connections until the session finishes.
    pub(crate) fn keep_connections(&mut self) {
        self.opts.keep_idle = true;
    }

    /// Starts every host's request budget afresh (a held connection's next
    /// round trip gets the whole budget again).
    pub(crate) fn restart_request_budgets(&mut self) {
        for slot in &mut self.slots {
            slot.request_deadline = None;
        }
    }

    /// The first failure since the last call, if any.
    pub(crate) fn take_failure(&self) -> Option<Error> {
        self.outcomes.failures.borrow_mut().take()
    }

    /// Runs the loop until `done` holds, rejecting on deadlines.
    fn drive(&mut self, done: impl Fn(&Session) -> bool) {
        self.drive_with(done, &mut |_| {});
    }

    /// [`Session::drive`], calling `between` at the top of each round.
    fn drive_with(
        &mut self,
        done: impl Fn(&Session) -> bool,
        between: &mut dyn FnMut(&mut Session),
    ) {
        loop {
            between(self);
            self.write_all();
            if !self.opts.keep_idle {
                self.release_idle();
            }
            if done(self) {
                return;
            }
            if self.opts.deadline.is_some_and(|d| Instant::now() >= d) {
                self.expire_all();
                continue;
            }
            self.turn(self.opts.deadline);
        }
    }

    /// Moves every host's queued requests to its socket, as far as it takes them.
    fn write_all(&mut self) {
        for i in 0..self.slots.len() {
            self.slots[i].pipeline.flush_batch();
            if self.slots[i].writable {
                self.write_slot(i);
            }
        }
    }

    /// One turn of the loop: waits for readiness until `until` (or a
    /// host's connect or request deadline, whichever is first), handles
    /// it, and fails the hosts whose budget ran out.
    fn turn(&mut self, until: Option<Instant>) -> usize {
        let now = Instant::now();
        let mut wake = until;
        let mut more_to_read = false;
        for slot in &self.slots {
            if slot.conn.is_some() {
                for d in [slot.connect_deadline, slot.request_deadline]
                    .into_iter()
                    .flatten()
                {
                    wake = Some(wake.map_or(d, |w| w.min(d)));
                }
                more_to_read |= slot.more_to_read;
            }
        }
        let timeout = if more_to_read {
            Some(Duration::ZERO)
        } else {
            wake.map(|w| w.saturating_duration_since(now))
        };
        let events = self.pump(timeout);
        self.expire_hosts();
        events
    }

    /// One turn for a long-lived session (the driver's): sends what is
    /// queued, waits until `until` at most (or the poll's waker fires),
    /// reads, sends again. A host that failed is tried afresh by its next
    /// request.
    ///
    /// Whether anything happened (a socket was ready).
    pub(crate) fn serve(&mut self, until: Option<Instant>) -> bool {
        self.write_all();
        let events = self.turn(until);
        self.write_all();
        self.forget_failed_hosts();
        // A connection kept across requests gets its one transparent
        // reconnect afresh whenever it is idle.
        for slot in &mut self.slots {
            if slot.conn.is_some() && slot.pipeline.is_idle() {
                slot.retried = false;
            }
        }
        if !self.opts.keep_idle {
            self.release_idle();
        }
        events > 0
    }

    /// Switches to a new host table (hosts were added or removed). A host
    /// whose entry changed fails what it has outstanding and starts over
    /// with the new entry; one that is gone answers `NoSuchHost`.
    pub(crate) fn set_hosts(&mut self, hosts: Arc<HostMap>) {
        for i in 0..self.slots.len() {
            let id = self.slots[i].pipeline.host().name().id;
            let same = hosts
                .get(&id)
                .is_some_and(|e| Arc::ptr_eq(&e.info, self.slots[i].pipeline.host()));
            if same {
                continue;
            }
            let e = Error::Cancelled {
                host: self.slots[i].name().clone(),
                command: None,
            };
            self.slots[i].retried = true;
            self.fail_slot(i, e);
            let slot = &mut self.slots[i];
            match hosts.get(&id) {
                Some(entry) => {
                    slot.pipeline = Pipeline::new(entry.info.clone());
                    slot.pool = entry.pool.clone();
                    slot.watch = entry.watch.clone();
                    // The old entry's end is not the new one's failure.
                    slot.failed = None;
                }
                None => slot.failed = Some(Error::NoSuchHost { id }),
            }
        }
        self.hosts = hosts;
        self.index = SlotIndex::default();
        for (i, slot) in self.slots.iter().enumerate() {
            self.index.insert(slot.pipeline.host().name().id, i);
        }
    }

    /// Lets this session reach `extra` hosts too, each at its id plus
    /// `offset` (a migrating map reaches the old cluster's hosts so).
    pub(crate) fn add_hosts(&mut self, extra: &HostMap, offset: HostId) {
        let mut hosts = HostMap::clone(&self.hosts);
        for (id, entry) in extra {
            if let Some(shifted) = id.checked_add(offset) {
                hosts.insert(shifted, entry.clone());
            }
        }
        self.hosts = Arc::new(hosts);
    }

    /// When this session's join gives up (a map's timeout), if ever.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.opts.deadline
    }

    /// How many requests are queued, unsent or unanswered, on all hosts,
    /// counted up to `cap`.
    pub(crate) fn requests_in_flight(&self, cap: usize) -> usize {
        let mut n = 0;
        for slot in &self.slots {
            if n >= cap {
                break;
            }
            n += slot.pipeline.requests_in_flight(cap - n);
        }
        n
    }

    /// Whether any request is queued, unsent or unanswered.
    pub(crate) fn is_busy(&self) -> bool {
        self.active_count() > 0
    }

    /// Host `id`'s connection has been left in a state a later user must
    /// not see (a transaction cut short): it is closed, not pooled.
    pub(crate) fn mark_dirty(&mut self, id: HostId) {
        if let Some(i) = self.index.get(id) {
            self.slots[i].dirty = true;
        }
    }

    /// The hosts this session may reach.
    pub(crate) fn hosts(&self) -> &Arc<HostMap> {
        &self.hosts
    }

    /// Requests to `id` passed their own deadlines (`error` says which):
    /// `n` of them count as timed out, and, with `evidence`, the host's
    /// health hears of it once.
    pub(crate) fn requests_expired(&self, id: HostId, n: u64, error: &Error, evidence: bool) {
        if let Some(entry) = self.hosts.get(&id) {
            entry.watch.counters.deadline_passed(n);
            if evidence {
                entry.watch.failed(error, Instant::now());
            }
        }
    }

    /// The error for a request to `id` whose own deadline (`budget`)
    /// passed: a timeout in the phase its host is in.
    pub(crate) fn request_timeout(&self, id: HostId, budget: Duration) -> Error {
        let (host, phase) = match self.index.get(id).map(|i| &self.slots[i]) {
            Some(slot) => {
                let phase = match &slot.conn {
                    Some(c) if c.is_established() => slot.pipeline.phase(),
                    _ => Phase::Connect,
                };
                (slot.name().clone(), phase)
            }
            None => match self.hosts.get(&id) {
                Some(entry) => (entry.info.name().clone(), Phase::Connect),
                None => return Error::NoSuchHost { id },
            },
        };
        Error::Timeout {
            host,
            phase,
            budget,
            command: None,
        }
    }

    /// The poll's waker (made with the poll), for a thread that hands this
    /// session work.
    ///
    /// # Errors
    ///
    /// The poll or its waker cannot be made (named after `host`).
    pub(crate) fn shared_waker(&mut self, host: &HostName) -> Result<Arc<Waker>> {
        self.waker(host)
    }

    /// Polls once (up to `timeout`) and handles what is ready, and the
    /// hosts whose last read turn left bytes unread.
    /// Returns how many sockets were ready.
    fn pump(&mut self, timeout: Option<Duration>) -> usize {
        let Some(Polling { poll, events, .. }) = self.poll.as_mut() else {
            return 0;
        };
        if let Err(e) = poll.poll(events, timeout) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                // A broken poll leaves no way to make progress: fail every
                // host, each error naming its own.
                for i in 0..self.slots.len() {
                    let err = poll_error(self.slots[i].name(), &e, "poll failed");
                    self.fail_slot(i, err);
                }
            }
            return 0;
        }
        self.ready.clear();
        let mut woken = false;
        for event in events.iter() {
            if event.token() == WAKE {
                woken = true;
                continue;
            }
            let readable = event.is_readable() || event.is_read_closed() || event.is_error();
            let writable = event.is_writable() || event.is_write_closed() || event.is_error();
            self.ready.push((event.token().0, readable, writable));
        }
        for (i, slot) in self.slots.iter().enumerate() {
            if slot.more_to_read && !self.ready.iter().any(|r| r.0 == i) {
                self.ready.push((i, true, false));
            }
        }
        if woken {
            self.take_lookups();
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
                // Reading TLS records can leave records to send (handshake
                // steps), and a finished Redis handshake releases the held
                // requests: write while the socket may stay writable.
                let slot = &self.slots[i];
                let wants = slot.conn.as_ref().is_some_and(|c| c.wants_write())
                    || (slot.writable && !slot.pipeline.output().is_empty());
                if wants {
                    self.write_slot(i);
                }
            }
        }
        let handled = ready.len();
        self.ready = ready;
        handled
    }

    /// A lookup woke the poll: every slot whose lookup has its answer
    /// starts its connect (or fails).
    fn take_lookups(&mut self) {
        for i in 0..self.slots.len() {
            let Some(conn) = self.slots[i].conn.as_mut() else {
                continue;
            };
            if !conn.is_resolving() {
                continue;
            }
            match conn.resolved() {
                Ok(true) => self.reregister(i),
                Ok(false) => {}
                Err(e) => self.fail_slot(i, e),
            }
        }
    }

    /// Slot `i`'s connection has a new socket: registers it.
    fn reregister(&mut self, i: usize) {
        if let Some(mut conn) = self.slots[i].conn.take() {
            let registered = self.register(i, &mut conn);
            self.slots[i].conn = Some(conn);
            if let Err(e) = registered {
                self.fail_slot(i, e);
            }
        }
    }

    fn on_writable(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        let Some(conn) = slot.conn.as_mut() else {
            return;
        };
        match conn.finish_connect() {
            Ok(true) => {
                slot.writable = true;
                self.start_request_budget(i);
                self.write_slot(i);
            }
            // The next address's connect started on a new socket.
            Ok(false) if conn.needs_register() => self.reregister(i),
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
        let mut result = Ok(());
        let now = Instant::now();
        loop {
            let out = slot.pipeline.output();
            if out.is_empty() {
                break;
            }
            match conn.write(out) {
                Ok(n) => slot.pipeline.advance(n, now),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    slot.writable = false;
                    return;
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        let result = result.and_then(|()| conn.flush());
        match result {
            Ok(true) => slot.writable = true,
            Ok(false) => slot.writable = false,
            Err(e) => {
                // Replies that arrived before the failure still count; the
                // real cause is the write's, unless the read saw one.
                let e = io_error(slot.name(), &e);
                self.read_slot_then_fail(i, e);
            }
        }
    }

    /// Reads what arrived before a write failed, then fails the slot with
    /// the read's error when it saw one (a reset), else the write's.
    fn read_slot_then_fail(&mut self, i: usize, write_error: Error) {
        let error = match self.read_turn(i) {
            Err(e) if !matches!(&e, Error::Connection { kind, .. } if *kind == std::io::ErrorKind::UnexpectedEof) => {
                e
            }
            _ => write_error,
        };
        if self.slots[i].conn.is_some() {
            self.fail_slot(i, error);
        }
    }

    fn read_slot(&mut self, i: usize) {
        let result = self.read_turn(i);
        self.report(i, false);
        if let Err(e) = result {
            self.fail_slot(i, e);
        }
        self.start_request_budget(i);
    }

    /// Reads up to [`READ_STEPS_PER_TURN`] bounded steps from slot `i`,
    /// handing replies to their waiters as they complete.
    fn read_turn(&mut self, i: usize) -> Result<()> {
        let Slot {
            pipeline,
            conn,
            more_to_read,
            retried,
            ..
        } = &mut self.slots[i];
        let Some(conn) = conn.as_mut() else {
            return Ok(());
        };
        *more_to_read = false;
        // A stream out of step (or past a limit) cannot be trusted: no
        // transparent retry for it.
        let mut out_of_step = |e: Error| {
            *retried = true;
            e
        };
        for _ in 0..READ_STEPS_PER_TURN {
            let read = conn.read(pipeline.read_buffer());
            match read {
                Ok(0) => {
                    pipeline
                        .receive(&self.outcomes, Instant::now())
                        .map_err(&mut out_of_step)?;
                    return Err(closed_error(pipeline.name()));
                }
                Ok(n) => {
                    pipeline.filled(n);
                    pipeline
                        .receive(&self.outcomes, Instant::now())
                        .map_err(&mut out_of_step)?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(io_error(pipeline.name(), &e)),
            }
        }
        *more_to_read = true;
        Ok(())
    }

    /// Rejects everything outstanding on slot `i` and closes its
    /// connection, except for one transparent reconnect of a pooled
    /// connection that failed before sending any byte of a request.
    fn fail_slot(&mut self, i: usize, mut error: Error) {
        let slot = &mut self.slots[i];
        if let Some(mut conn) = slot.conn.take() {
            if let Some(polling) = self.poll.as_ref() {
                conn.deregister(polling.poll.registry());
            }
            let stale = conn.reused && !slot.pipeline.has_sent() && !slot.retried;
            let transport = matches!(error, Error::Connection { .. });
            drop(conn);
            // (The poll exists: the connection was registered with it.)
            if let (true, Some(polling)) = (stale && transport, self.poll.as_ref()) {
                slot.retried = true;
                match slot.pool.connect(slot.pipeline.host(), &polling.waker) {
                    Ok(c) => return self.install(i, Ok(c)),
                    Err(e) => error = e,
                }
            }
        }
        self.reject_slot(i, error);
    }

    fn reject_slot(&mut self, i: usize, error: Error) {
        let slot = &mut self.slots[i];
        slot.conn = None;
        slot.connect_deadline = None;
        slot.request_deadline = None;
        slot.more_to_read = false;
        slot.pipeline.fail(&error, &self.outcomes);
        if !std::mem::take(&mut slot.exempt) {
            slot.watch.failed(&error, Instant::now());
        }
        self.report(i, error.is_timeout());
        self.slots[i].failed = Some(error);
    }

    /// Fails hosts whose connect or request budget ran out.
    fn expire_hosts(&mut self) {
        let now = Instant::now();
        for i in 0..self.slots.len() {
            let slot = &self.slots[i];
            if slot.conn.is_none() {
                continue;
            }
            let host = slot.pipeline.host();
            let e = if slot.connect_deadline.is_some_and(|d| now >= d) {
                Error::Timeout {
                    host: host.name().clone(),
                    phase: Phase::Connect,
                    budget: host.connect_timeout,
                    command: None,
                }
            } else if slot.request_deadline.is_some_and(|d| now >= d) && slot.is_active() {
                Error::Timeout {
                    host: host.name().clone(),
                    phase: slot.pipeline.phase(),
                    budget: self.opts.request_budget.unwrap_or_default(),
                    command: None,
                }
            } else {
                continue;
            };
            self.slots[i].retried = true;
            self.fail_slot(i, e);
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
                Some(c) if c.is_established() => slot.pipeline.phase(),
                _ => Phase::Connect,
            };
            let e = Error::Timeout {
                host: slot.name().clone(),
                phase,
                budget,
                command: None,
            };
            slot.retried = true;
            // The map's own deadline says something about the host only
            // when the host answered nothing at all meanwhile.
            slot.exempt = slot.heard;
            self.fail_slot(i, e);
        }
    }

    /// Gives the connections of hosts with nothing outstanding back to
    /// their pools (as Python rb does), so other threads can use them; a
    /// later request to the host checks one out again.
    fn release_idle(&mut self) {
        for i in 0..self.slots.len() {
            let slot = &self.slots[i];
            if slot.conn.is_some() && !slot.dirty && slot.pipeline.is_idle() {
                self.release_slot(i);
            }
        }
    }

    /// Slot `i`'s connection goes back to its pool when it is clean, else
    /// it is closed.
    fn release_slot(&mut self, i: usize) {
        self.report(i, false);
        let slot = &mut self.slots[i];
        let Some(mut conn) = slot.conn.take() else {
            return;
        };
        if let Some(polling) = self.poll.as_ref() {
            conn.deregister(polling.poll.registry());
        }
        let clean = slot.failed.is_none()
            && !slot.dirty
            && slot.pipeline.is_idle()
            && conn.is_established();
        conn.spare = slot.pipeline.connection_ended();
        slot.connect_deadline = None;
        slot.request_deadline = None;
        slot.more_to_read = false;
        slot.retried = false;
        if clean {
            conn.ready = true;
            conn.reused = false;
            slot.pool.checkin(conn);
        }
    }

    /// Ends the session: healthy connections go back to their pools, the
    /// rest are closed. Returns the first failure.
    pub(crate) fn finish(mut self) -> Option<Error> {
        for i in 0..self.slots.len() {
            self.release_slot(i);
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
        self.outcomes.failures.borrow_mut().take()
    }
}

/// A failure of the poll itself, reported against each host it stops.
fn poll_error(host: &HostName, e: &std::io::Error, what: &str) -> Error {
    Error::Connection {
        host: host.clone(),
        command: None,
        kind: e.kind(),
        reason: format!("{what}: {e}").into(),
    }
}

impl Drop for Session {
    /// A session dropped without `finish` (the caller's closure panicked)
    /// closes its connections instead of pooling them: their state is
    /// unknown.
    fn drop(&mut self) {
        for slot in &mut self.slots {
            if let Some(mut conn) = slot.conn.take() {
                if let Some(polling) = self.poll.as_ref() {
                    conn.deregister(polling.poll.registry());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A large host id costs no dense vector up to it.
    #[test]
    fn sparse_ids_allocate_nothing_dense() {
        let mut index = SlotIndex::default();
        index.insert(65_535, 0);
        index.insert(u32::MAX, 1);
        index.insert(3, 2);
        assert_eq!(index.get(65_535), Some(0));
        assert_eq!(index.get(u32::MAX), Some(1));
        assert_eq!(index.get(3), Some(2));
        assert_eq!(index.get(4), None);
        assert!(index.dense.len() <= 4, "dense part: {}", index.dense.len());
    }

    /// A second cluster's ids (from `SECOND_BASE`) have a vector of their
    /// own, apart from the first's; past its range they go to the map.
    #[test]
    fn a_second_clusters_ids_are_dense_too() {
        let mut index = SlotIndex::default();
        index.insert(3, 0);
        index.insert(SECOND_BASE + 3, 1);
        index.insert(SECOND_BASE + 5_000, 2);
        index.insert(SECOND_BASE - 1, 3);
        assert_eq!(index.get(3), Some(0));
        assert_eq!(index.get(SECOND_BASE + 3), Some(1));
        assert_eq!(index.get(SECOND_BASE + 5_000), Some(2));
        assert_eq!(index.get(SECOND_BASE - 1), Some(3));
        assert_eq!(index.get(SECOND_BASE + 4), None);
        assert_eq!((index.dense.len(), index.second.len()), (4, 4));
        assert_eq!(index.sparse.len(), 2);
    }
}
