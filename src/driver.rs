//! The cluster's background thread for async and concurrent callers
//! (DESIGN.md, "The driver").
//!
//! One thread per cluster, started by the first [`crate::AsyncClient`] and
//! stopped when the last client and the last outstanding reply are gone.
//! It runs one long-lived [`Session`]: one `mio::Poll`, one multiplexed
//! connection per host, kept between requests. Callers hand it requests
//! through a queue and the poll's waker; every request queued since the
//! last turn goes into its host's pipeline before anything is written, so
//! runs of GETs (SETs) from different callers become one MGET (MSET).
//!
//! Each request may carry a deadline. When it passes, the request's reply
//! is rejected with a timeout, but the request stays in its host's
//! pipeline: the connection is kept, and the late reply is read and
//! dropped when it comes, so no later reply lands on the wrong request.
//! Connect and connection failures reject what they affect, and the next
//! request to that host connects afresh.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant};

use mio::Waker;

use crate::error::{Error, HostId, HostName, Result};
use crate::event_loop::{HostMap, LoopOptions, Session};
use crate::pipeline::CmdName;
use crate::promise::{ReplyContext, ReplySink, ReplySource, Slot, Waiter};
use crate::resp::Value;
use crate::scripts::ScriptMemory;

/// A reply's receiver, shared with the task that awaits it.
pub(crate) type SharedSink = Arc<dyn ReplySink + Send + Sync>;

/// One request for the driver: its sink carries the command
/// ([`ReplySink::command`]).
pub(crate) struct Request {
    pub(crate) host: HostId,
    pub(crate) sink: SharedSink,
    /// The request's budget, and the deadline it gives (from when the
    /// request was made).
    pub(crate) budget: Option<Duration>,
    pub(crate) deadline: Option<Instant>,
    /// Whether a GET (SET) may be merged with its neighbours.
    pub(crate) auto_batch: bool,
}

/// What a caller hands the driver: one request, or a group that must reach
/// its host's pipeline together, with nothing in between (a transaction).
pub(crate) enum Message {
    One(Request),
    Group(Vec<Request>),
    /// A task to run on the driver thread (see [`Driver::spawn`]).
    Task(Task),
}

/// A future the driver thread polls to its end.
pub(crate) type Task = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// The driver thread's tasks: futures made of requests (a migrating
/// cluster's steps), polled when one of their replies wakes them, so that
/// they run to their end whether or not anyone awaits them.
#[derive(Default)]
struct Tasks {
    /// Each running task with its waker (made once, at its start).
    running: Vec<Option<(Task, std::task::Waker)>>,
    free: Vec<usize>,
    /// Tasks woken since they were last polled.
    woken: Arc<Mutex<Vec<usize>>>,
}

/// Wakes task `id`: marks it woken and wakes the driver.
struct TaskWaker {
    id: usize,
    woken: Arc<Mutex<Vec<usize>>>,
    shared: Arc<Shared>,
}

impl std::task::Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        lock(&self.woken).push(self.id);
        self.shared.wake();
    }
}

impl Tasks {
    fn add(&mut self, task: Task, shared: &Arc<Shared>) {
        let id = self.free.pop().unwrap_or(self.running.len());
        let waker = std::task::Waker::from(Arc::new(TaskWaker {
            id,
            woken: self.woken.clone(),
            shared: shared.clone(),
        }));
        match self.running.get_mut(id) {
            Some(slot) => *slot = Some((task, waker)),
            None => self.running.push(Some((task, waker))),
        }
        lock(&self.woken).push(id);
    }

    /// Whether no task runs (the common case: a plain cluster's driver).
    fn is_idle(&self) -> bool {
        self.running.len() == self.free.len()
    }

    /// Whether a task was woken since the last poll.
    fn any_woken(&self) -> bool {
        !self.is_idle() && !lock(&self.woken).is_empty()
    }

    /// Polls the tasks woken since their last poll (and those they wake).
    fn poll_woken(&mut self) {
        while !self.is_idle() {
            let woken = std::mem::take(&mut *lock(&self.woken));
            if woken.is_empty() {
                return;
            }
            for id in woken {
                let Some(Some((task, waker))) = self.running.get_mut(id) else {
                    continue;
                };
                let mut cx = std::task::Context::from_waker(waker);
                if task.as_mut().poll(&mut cx).is_ready() {
                    self.running[id] = None;
                    self.free.push(id);
                }
            }
        }
    }
}

/// The messages queued for the driver's next turn. A plain deque behind a
/// lock, which the driver swaps for its empty one once per turn: a send is
/// a push under an uncontended lock, a turn takes everything in one go (a
/// channel cost each request a node and an atomic handshake on both sides:
/// 160 of an async GET's 2,780 instructions).
#[derive(Default)]
struct Queue {
    messages: VecDeque<Message>,
    /// The driver thread has ended: what comes now is dropped, or, after a
    /// panic on it (`failing`), failed.
    closed: bool,
    /// The driver's loop panicked: the hosts (to name in the errors) of
    /// the requests that are failed from now on (see [`fail_everything`]).
    failing: Option<Arc<HostMap>>,
}

/// What the callers and the driver thread share.
struct Shared {
    queue: Mutex<Queue>,
    waker: Arc<Waker>,
    /// The waker fired and the driver has not taken the queue since: more
    /// requests need no further wake (one syscall per batch, not per request).
    woken: AtomicBool,
    stop: AtomicBool,
    /// A new host table to switch to.
    hosts: Mutex<Option<Arc<HostMap>>>,
    /// The driver's recent load ([`RecentLoad`], counted up to just past
    /// [`SPIN_GATE`]): whether a caller waits alone.
    recent_load: AtomicUsize,
    /// A reply is spinning (see [`ReplySource`]): one at a time.
    spinning: AtomicBool,
}

/// A pending reply may spin only while at most this many requests were in
/// flight lately (its own).
const SPIN_GATE: usize = 1;

/// How far back the driver's load counts for [`SPIN_GATE`]: a moment
/// with nothing in flight between two rounds of many callers' requests is
/// not a lone caller.
const LOAD_MEMORY: Duration = Duration::from_millis(10);

/// The most requests taken in one turn or in flight at the end of one,
/// over the last [`LOAD_MEMORY`] at least: the maxima of the current and
/// the previous window of that length.
struct RecentLoad {
    current: usize,
    previous: usize,
    since: Instant,
}

impl RecentLoad {
    fn new(now: Instant) -> RecentLoad {
        RecentLoad {
            current: 0,
            previous: 0,
            since: now,
        }
    }

    /// A turn ended at `now` with `load`; the recent peak.
    fn turn(&mut self, now: Instant, load: usize) -> usize {
        let age = now.saturating_duration_since(self.since);
        if age > LOAD_MEMORY {
            // A window passed: the last one becomes the previous (or, if
            // more than one passed, nothing was seen in between).
            self.previous = if age > 2 * LOAD_MEMORY {
                0
            } else {
                self.current
            };
            self.current = 0;
            self.since = now;
        }
        self.current = self.current.max(load);
        self.current.max(self.previous)
    }
}

impl Shared {
    /// Queues `message` and wakes the driver. While a handle exists the
    /// thread runs (it outlives every handle) unless a panic ended it:
    /// then the message's requests fail at once; from a [`DriverQueue`]
    /// after the thread ended normally, the message is dropped.
    #[inline]
    fn send(&self, message: Message) {
        let refused = {
            let mut queue = lock(&self.queue);
            if queue.closed {
                Some((message, queue.failing.clone()))
            } else {
                queue.messages.push_back(message);
                None
            }
        };
        // Outside the lock: failing calls wakers, and a task's drop may
        // queue in turn.
        match refused {
            None => self.wake(),
            Some((message, Some(hosts))) => fail(message, &hosts),
            Some((_dropped, None)) => {}
        }
    }

    /// Moves every queued message to the end of `into`. When `into` is
    /// empty the two queues change places: each keeps its room, and
    /// neither allocates again.
    fn take_all(&self, into: &mut VecDeque<Message>) {
        let mut queue = lock(&self.queue);
        if into.is_empty() {
            std::mem::swap(&mut queue.messages, into);
        } else {
            into.append(&mut queue.messages);
        }
    }

    /// The driver thread is ending: no more messages; those queued are
    /// dropped (outside the lock).
    fn close(&self) {
        let left = {
            let mut queue = lock(&self.queue);
            queue.closed = true;
            std::mem::take(&mut queue.messages)
        };
        drop(left);
    }

    /// The driver's loop panicked: no more messages, and what comes from
    /// now on fails (naming its host from `hosts`); what was queued is
    /// returned, to fail.
    fn close_failing(&self, hosts: Arc<HostMap>) -> VecDeque<Message> {
        let mut queue = lock(&self.queue);
        queue.closed = true;
        queue.failing = Some(hosts);
        std::mem::take(&mut queue.messages)
    }

    fn wake(&self) {
        if !self.woken.swap(true, Ordering::AcqRel) {
            // A failed wake leaves the driver to its next timer; nothing to
            // report to a caller who only queued a request.
            let _ = self.waker.wake();
        }
    }
}

/// Closes the queue when the driver thread ends, by returning or by
/// unwinding (see [`Shared::close`]): a channel's receiver went with the
/// thread either way; a queue left open would keep what is sent to a dead
/// driver for as long as any queue handle lives.
struct CloseOnExit<'a>(&'a Shared);

impl Drop for CloseOnExit<'_> {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// How callers and the driver's own tasks queue work for the driver. A
/// clone does not keep the driver running (its tasks hold one); work
/// queued once the thread has ended is dropped with its channel.
#[derive(Clone)]
pub(crate) struct DriverQueue {
    shared: Arc<Shared>,
}

impl DriverQueue {
    /// Queues one request.
    pub(crate) fn submit(&self, request: Request) {
        self.shared.send(Message::One(request));
    }

    /// Queues requests that must reach their host's pipeline in this order
    /// and together: no other caller's request goes between them.
    pub(crate) fn submit_all(&self, requests: impl IntoIterator<Item = Request>) {
        self.shared
            .send(Message::Group(requests.into_iter().collect()));
    }

    /// Runs `task` on the driver thread to its end (a migrating cluster's
    /// request of several steps: it runs whether or not its reply is
    /// awaited, as a plain request does). The task must not block.
    pub(crate) fn spawn(&self, task: Task) {
        self.shared.send(Message::Task(task));
    }
}

/// A handle on the running driver thread; the thread stops when the last
/// handle drops.
pub(crate) struct Driver {
    queue: DriverQueue,
    thread: Option<JoinHandle<()>>,
    thread_id: ThreadId,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("thread", &self.thread_id)
            .finish_non_exhaustive()
    }
}

/// Batching limit per merged MGET/MSET on the driver (as a map's default).
const MAX_BATCH: usize = 256;

impl Driver {
    /// Starts the thread over `hosts`.
    ///
    /// # Errors
    ///
    /// The thread, poll or waker cannot be made.
    pub(crate) fn start(hosts: Arc<HostMap>, scripts: Arc<ScriptMemory>) -> Result<Driver> {
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("rb-driver".into())
            .spawn(move || {
                let opts = LoopOptions {
                    deadline: None,
                    budget: None,
                    request_budget: None,
                    auto_batch: true,
                    max_batch: MAX_BATCH,
                    max_concurrency: usize::MAX,
                    keep_idle: true,
                };
                let mut session = Session::new(hosts, scripts, opts);
                let name = HostName {
                    id: 0,
                    addr: "rb-driver".into(),
                };
                let waker = match session.shared_waker(&name) {
                    Ok(w) => w,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let shared = Arc::new(Shared {
                    queue: Mutex::new(Queue::default()),
                    waker,
                    woken: AtomicBool::new(false),
                    stop: AtomicBool::new(false),
                    hosts: Mutex::new(None),
                    recent_load: AtomicUsize::new(0),
                    spinning: AtomicBool::new(false),
                });
                if ready_tx.send(Ok(shared.clone())).is_err() {
                    return;
                }
                // However the thread ends, a panic included, what is sent
                // after is not kept.
                let _closed = CloseOnExit(&shared);
                let mut taken = VecDeque::new();
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run(&mut session, &mut taken, &shared);
                }));
                if ran.is_err() {
                    fail_everything(&mut session, taken, &shared);
                }
                let _ = session.finish();
            })
            .map_err(|e| Error::Config {
                reason: format!("cannot start the driver thread: {e}").into(),
            })?;
        let thread_id = thread.thread().id();
        let shared = match ready_rx.recv() {
            Ok(Ok(shared)) => shared,
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(Error::Config {
                    reason: "the driver thread ended while starting".into(),
                })
            }
        };
        Ok(Driver {
            queue: DriverQueue { shared },
            thread: Some(thread),
            thread_id,
        })
    }

    /// Where requests and tasks for the driver go (see [`DriverQueue`]).
    pub(crate) fn queue(&self) -> &DriverQueue {
        &self.queue
    }

    /// Whether the thread has ended while this handle lives: only a panic
    /// on it ends it so (see [`fail_everything`]); every request sent to
    /// it now fails at once.
    pub(crate) fn has_ended(&self) -> bool {
        lock(&self.queue.shared.queue).closed
    }

    /// The cluster's hosts changed.
    pub(crate) fn set_hosts(&self, hosts: Arc<HostMap>) {
        *lock(&self.queue.shared.hosts) = Some(hosts);
        self.queue.shared.wake();
    }
}

impl ReplySource for Driver {
    /// A lone caller may spin; never the driver thread itself (a waker
    /// that polls inline), which would wait on itself.
    fn try_start_spin(&self) -> bool {
        self.queue.shared.recent_load.load(Ordering::Relaxed) <= SPIN_GATE
            && std::thread::current().id() != self.thread_id
            && !self.queue.shared.spinning.swap(true, Ordering::Acquire)
    }

    fn end_spin(&self) {
        self.queue.shared.spinning.store(false, Ordering::Release);
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.queue.shared.stop.store(true, Ordering::Release);
        let _ = self.queue.shared.waker.wake();
        if let Some(thread) = self.thread.take() {
            // The last handle can go on the driver thread itself (a waker
            // that runs a task inline drops its last reply there): it must
            // not wait for itself; the thread ends on its own.
            if std::thread::current().id() != self.thread_id {
                let _ = thread.join();
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A request's deadline, kept until it passes or its reply comes.
struct Timer {
    deadline: Instant,
    host: HostId,
    command: CmdName,
    /// Weak: the request's waiter and its `Reply` keep the slot; a slot
    /// only a timer would keep is done with (and a huge reply nobody holds
    /// any more can then be freed off this thread).
    sink: std::sync::Weak<dyn ReplySink + Send + Sync>,
    /// A Down host's probe: its outcome always reaches the health.
    probe: bool,
}

/// Deadlines in queues per budget: requests with one budget expire in the
/// order they were made, so each queue stays sorted with O(1) pushes.
#[derive(Default)]
struct Timers {
    queues: HashMap<Duration, VecDeque<Timer>>,
    /// Per host, when its health last heard of a timeout: requests made
    /// before then that time out too are no new evidence (they were in
    /// flight together), however the driver's turns group them.
    reported: HashMap<HostId, Instant>,
}

impl Timers {
    fn push(&mut self, budget: Duration, timer: Timer) {
        self.queues.entry(budget).or_default().push_back(timer);
    }

    /// Drops timers whose replies came, and rejects the requests whose
    /// deadline passed; the earliest deadline left, if any.
    fn expire(&mut self, now: Instant, session: &Session) -> Option<Instant> {
        let failures = std::cell::RefCell::new(None);
        let mut next: Option<Instant> = None;
        // Per host: how many expired, one of their errors, when the newest
        // of them was made, and whether one was a probe (whose outcome is
        // always evidence).
        let mut expired: Vec<(HostId, u64, Error, Instant, bool)> = Vec::new();
        for (budget, queue) in &mut self.queues {
            while let Some(t) = queue.front() {
                let live = t.sink.upgrade().filter(|s| s.is_pending());
                let Some(sink) = live else {
                    queue.pop_front();
                    continue;
                };
                if t.deadline <= now {
                    let e = session.request_timeout(t.host, *budget);
                    let ctx = ReplyContext {
                        host: e.host(),
                        command: t.command.as_str(),
                        failures: &failures,
                        misses: None,
                    };
                    sink.accept(0, Err(e.clone()), &ctx);
                    let made = t.deadline.checked_sub(*budget).unwrap_or(t.deadline);
                    match expired.iter_mut().find(|(h, ..)| *h == t.host) {
                        Some((_, n, _, newest, probe)) => {
                            *n += 1;
                            *newest = (*newest).max(made);
                            *probe |= t.probe;
                        }
                        None => expired.push((t.host, 1, e, made, t.probe)),
                    }
                    queue.pop_front();
                } else {
                    next = Some(next.map_or(t.deadline, |n| n.min(t.deadline)));
                    break;
                }
            }
        }
        self.queues.retain(|_, q| !q.is_empty());
        for (host, n, e, newest, probe) in expired {
            let evidence = probe || self.reported.get(&host).map_or(true, |&at| newest > at);
            if evidence {
                self.reported.insert(host, now);
            }
            session.requests_expired(host, n, &e, evidence);
        }
        next
    }
}

/// Sends a `PING` to each Down host whose probe is due, so a host comes
/// back Up without a user request failing on it first. The next time a
/// probe is due, if any.
fn probe_down_hosts(session: &mut Session, timers: &mut Timers, now: Instant) -> Option<Instant> {
    let mut due = Vec::new();
    let mut next: Option<Instant> = None;
    for (&id, entry) in session.hosts().iter() {
        let health = &entry.watch.health;
        if health.take_probe(now) {
            due.push((id, entry.info.connect_timeout));
        } else if let Some(at) = health.next_probe_at() {
            next = Some(next.map_or(at, |n| n.min(at)));
        }
    }
    for (id, budget) in due {
        let slot = Slot::<Value>::new();
        let sink: SharedSink = slot;
        if let Some(deadline) = now.checked_add(budget) {
            timers.push(
                budget,
                Timer {
                    deadline,
                    host: id,
                    command: CmdName::of(b"PING"),
                    sink: Arc::downgrade(&sink),
                    probe: true,
                },
            );
            next = Some(next.map_or(deadline, |n| n.min(deadline)));
        }
        session.enqueue_probe(id, &crate::cmd::cmd("PING"), Waiter::shared(sink));
    }
    next
}

/// How long a stopping driver keeps sending and reading what its callers
/// queued before it closes the connections.
const FLUSH_ON_STOP: Duration = Duration::from_millis(500);

/// Takes the turn's messages in order, leaving `taken` empty: requests
/// into their hosts' pipelines with their deadlines, tasks among the
/// running ones; then polls the tasks woken since (by replies, or new):
/// their next requests are queued for the next turn, which the wake they
/// make takes at once. Each message leaves `taken` just before it is
/// taken, so that after a panic in the middle, those not taken yet are
/// still there (to fail).
fn take_turn(
    taken: &mut VecDeque<Message>,
    session: &mut Session,
    timers: &mut Timers,
    next_deadline: &mut Option<Instant>,
    tasks: &mut Tasks,
    shared: &Arc<Shared>,
) {
    while let Some(message) = taken.pop_front() {
        match message {
            Message::One(r) => enqueue(session, timers, next_deadline, r),
            Message::Group(group) => enqueue_group(session, timers, next_deadline, group),
            Message::Task(task) => tasks.add(task, shared),
        }
    }
    tasks.poll_woken();
}

fn enqueue(
    session: &mut Session,
    timers: &mut Timers,
    next_deadline: &mut Option<Instant>,
    request: Request,
) {
    let Some(cmd) = request.sink.command() else {
        return;
    };
    arm_timer(timers, next_deadline, &request);
    let waiter = Waiter::shared(request.sink.clone());
    session.enqueue_batching(request.host, cmd, waiter, request.auto_batch);
}

/// Starts `request`'s deadline, if it has one.
fn arm_timer(timers: &mut Timers, next_deadline: &mut Option<Instant>, request: &Request) {
    if let (Some(budget), Some(deadline), Some(cmd)) =
        (request.budget, request.deadline, request.sink.command())
    {
        timers.push(
            budget,
            Timer {
                deadline,
                host: request.host,
                command: CmdName::of(cmd.name()),
                sink: Arc::downgrade(&request.sink),
                probe: false,
            },
        );
        *next_deadline = Some(next_deadline.map_or(deadline, |n: Instant| n.min(deadline)));
    }
}

/// Puts a group into its host's pipeline whole (see
/// [`Session::enqueue_group`]), with each request's deadline.
fn enqueue_group(
    session: &mut Session,
    timers: &mut Timers,
    next_deadline: &mut Option<Instant>,
    group: Vec<Request>,
) {
    let Some(host) = group.first().map(|r| r.host) else {
        return;
    };
    for request in &group {
        arm_timer(timers, next_deadline, request);
    }
    let items = group.iter().filter_map(|r| {
        let cmd = r.sink.command()?;
        Some((cmd, Waiter::shared(r.sink.clone())))
    });
    session.enqueue_group(host, items);
}

/// How long the driver keeps polling without sleeping after its last
/// work: a reply or the next request that comes within it costs no thread
/// wake-up (two context switches, tens of microseconds on a busy machine).
const SPIN: Duration = Duration::from_micros(50);

/// The driver thread's loop: take queued requests, enqueue them, serve one
/// turn, expire deadlines; until stopped. While work keeps coming it polls
/// without sleeping (see [`SPIN`]); then it sleeps until a socket, the
/// waker or a deadline wakes it.
///
/// `taken` holds the messages of the current turn until each is taken:
/// should the loop panic, those not taken yet are still there to fail.
fn run(session: &mut Session, taken: &mut VecDeque<Message>, shared: &Arc<Shared>) {
    let mut tasks = Tasks::default();
    let mut timers = Timers::default();
    let mut next_deadline = None;
    let mut last_work = Instant::now();
    let mut load = RecentLoad::new(Instant::now());
    loop {
        // Read before draining: whatever was queued before the last handle
        // dropped (and set it) is drained below, and flushed.
        let stopping = shared.stop.load(Ordering::Acquire);
        shared.take_all(taken);
        // A request made after a host change returned goes to the new host
        // table: take the change after the requests, apply it before them.
        if let Some(hosts) = lock(&shared.hosts).take() {
            session.set_hosts(hosts);
        }
        let taken_now = taken.len();
        let had_work = taken_now > 0;
        take_turn(
            taken,
            session,
            &mut timers,
            &mut next_deadline,
            &mut tasks,
            shared,
        );
        if stopping {
            break;
        }
        let now = Instant::now();
        if next_deadline.is_some_and(|d| d <= now) || !timers.queues.is_empty() {
            next_deadline = timers.expire(now, session);
        }
        let next_probe = probe_down_hosts(session, &mut timers, now);
        if had_work {
            last_work = now;
        }
        let busy = if now.saturating_duration_since(last_work) < SPIN {
            // Callers queue without waking us: we look again at once, after
            // letting any other thread that wants this core run.
            shared.woken.store(true, Ordering::SeqCst);
            let busy = session.serve(Some(now));
            if !busy {
                std::thread::yield_now();
            }
            busy
        } else {
            shared.woken.store(false, Ordering::SeqCst);
            // A request queued, or a task woken (a reply another thread
            // settled), before the flag dropped woke nobody.
            shared.take_all(taken);
            if !taken.is_empty() {
                continue;
            }
            if tasks.any_woken() {
                continue;
            }
            let wake = match (next_deadline, next_probe) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            session.serve(wake)
        };
        if busy {
            last_work = Instant::now();
        }
        let peak = load.turn(
            now,
            taken_now.max(session.requests_in_flight(SPIN_GATE + 1)),
        );
        shared.recent_load.store(peak, Ordering::Relaxed);
        // Nobody reads the driver's first failure; each reply has its own.
        let _ = session.take_failure();
    }
    // Stopped: the last handle is gone. What callers queued still goes out
    // (a dropped reply does not cancel its request), and tasks go on (their
    // requests too), for a short while.
    let until = Instant::now() + FLUSH_ON_STOP;
    loop {
        // Whatever is queued or woken after this wakes the poll below.
        shared.woken.store(false, Ordering::SeqCst);
        shared.take_all(taken);
        let queued = !taken.is_empty();
        take_turn(
            taken,
            session,
            &mut timers,
            &mut next_deadline,
            &mut tasks,
            shared,
        );
        let working = queued || session.is_busy() || !tasks.is_idle();
        if !working || Instant::now() >= until {
            break;
        }
        if !tasks.any_woken() {
            session.serve(Some(until));
        }
    }
    drop(tasks);
    // Stopped: nothing awaits the rest (the last handle is gone).
    session.cancel(|host| Error::Cancelled {
        host: host.clone(),
        command: None,
    });
}

/// The driver's loop panicked: a bug of rb's, which the panic hook has
/// reported. No deadline fires without the driver, so rather than leave
/// every caller waiting forever, what was queued and what is in flight
/// fail with [`Error::Cancelled`], and so does whatever is sent from now
/// on (the queue stays closed); the tasks went with the loop (their
/// replies fail as they drop, see [`crate::promise::Reply`]'s tasks). The
/// panic may have left the session half-changed: if this panics too, the
/// thread ends, and its queue is closed all the same.
fn fail_everything(session: &mut Session, taken: VecDeque<Message>, shared: &Shared) {
    let hosts = session.hosts().clone();
    for message in taken.into_iter().chain(shared.close_failing(hosts.clone())) {
        fail(message, &hosts);
    }
    session.cancel(|host| Error::Cancelled {
        host: host.clone(),
        command: None,
    });
}

/// Fails `message`'s requests with [`Error::Cancelled`], each naming its
/// host (from `hosts`) and command; a task is dropped (its reply fails as
/// it drops).
fn fail(message: Message, hosts: &HostMap) {
    let requests = match message {
        Message::One(request) => vec![request],
        Message::Group(group) => group,
        Message::Task(_) => return,
    };
    for request in requests {
        let host = hosts.get(&request.host).map(|e| e.info.name().clone());
        let e = match &host {
            Some(host) => Error::Cancelled {
                host: host.clone(),
                command: None,
            },
            None => Error::NoSuchHost { id: request.host },
        };
        let command = request.sink.command().map(|c| CmdName::of(c.name()));
        let failures = std::cell::RefCell::new(None);
        let ctx = ReplyContext {
            host: host.as_ref(),
            command: command.as_ref().map_or("", CmdName::as_str),
            failures: &failures,
            misses: None,
        };
        request.sink.accept(0, Err(e), &ctx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::promise::Reply;

    #[test]
    fn the_recent_load_remembers_a_peak_for_a_while() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut load = RecentLoad::new(t0);
        assert_eq!(load.turn(at(0), 1), 1);
        // Many callers' requests, then a moment with none in flight: not
        // a lone caller yet.
        assert_eq!(load.turn(at(1), 2), 2);
        assert_eq!(load.turn(at(2), 0), 2);
        assert_eq!(load.turn(at(11), 1), 2);
        assert_eq!(load.turn(at(20), 1), 2);
        // Quiet for longer than the memory: the peak falls to what is now.
        assert_eq!(load.turn(at(22), 1), 1);
        assert_eq!(load.turn(at(40), 0), 1);
        assert_eq!(load.turn(at(70), 0), 0);
    }

    /// Found by review: a host taken Down by another client sharing its health
    /// (a map's timeouts), with an async request in flight. In the turn in
    /// which that request's timeout is reported and the host's probe comes
    /// due, the probe's PING is "made" at the very instant recorded as the
    /// last report, so its own timeout is never evidence: the health does
    /// not hear the probe fail and keeps it out for `max_open_for`.
    #[test]
    fn a_probe_made_in_the_turn_of_a_report_is_heard() {
        use crate::health::HealthPolicy;
        let blackhole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = blackhole.local_addr().unwrap().port();
        let cluster = crate::Cluster::builder()
            .host(
                0,
                crate::HostConfig::new()
                    .host("127.0.0.1")
                    .port(port)
                    .connect_timeout(Duration::from_millis(50)),
            )
            .health(
                HealthPolicy::new()
                    .failures(3)
                    .open_for(Duration::from_millis(100))
                    .max_open_for(Duration::from_secs(10)),
            )
            .build()
            .unwrap();
        let mut session = cluster.immediate_session(false, None);
        let hosts = session.hosts().clone();
        let health = &hosts.get(&0).unwrap().watch.health;
        let now = Instant::now();
        // Down since a second ago (another client's failures): its probe
        // is due.
        let e = session.request_timeout(0, Duration::from_millis(50));
        for _ in 0..3 {
            health.record_failure(&e, now - Duration::from_secs(1));
        }
        let mut timers = Timers::default();
        // An async GET made 50 ms ago (before the outage began for this
        // driver) times out now.
        let get: SharedSink = Slot::<Value>::new();
        timers.push(
            Duration::from_millis(50),
            Timer {
                deadline: now,
                host: 0,
                command: CmdName::of(b"GET"),
                sink: Arc::downgrade(&get),
                probe: false,
            },
        );
        // One turn of the driver's loop: expire, then probe, same `now`.
        timers.expire(now, &session);
        probe_down_hosts(&mut session, &mut timers, now);
        assert!(health.next_probe_at().is_some(), "Down, probe out");
        // The PING gets no answer: its deadline passes.
        let later = now + Duration::from_millis(60);
        timers.expire(later, &session);
        let next = health.next_probe_at().expect("still Down");
        assert!(
            next < now + Duration::from_secs(1),
            "the failed probe was not heard: next probe in {:?} (the lease), \
             not after a doubled 100 ms period",
            next.saturating_duration_since(now)
        );
    }

    /// A dropped `Reply` whose request has a deadline: the driver's timer
    /// must not keep its slot wanted, or a huge reply nobody will read is
    /// freed on the driver's thread, holding every other caller up.
    #[test]
    fn a_timer_does_not_keep_a_dropped_replys_slot_wanted() {
        let reply: SharedSink = Slot::<Value>::new();
        let waiter = Waiter::shared(reply.clone());
        let mut timers = Timers::default();
        timers.push(
            Duration::from_millis(50),
            Timer {
                deadline: Instant::now() + Duration::from_millis(50),
                host: 0,
                command: CmdName::of(b"GET"),
                sink: Arc::downgrade(&reply),
                probe: false,
            },
        );
        assert!(!waiter.may_discard(), "the Reply holds it");
        drop(reply);
        assert!(waiter.may_discard(), "only the waiter and a timer are left");
    }

    /// A driver over one host nobody listens on, and a queue handle that
    /// outlives it; `before_end` gets the queue before the driver goes.
    fn queue_of_an_ended_driver(before_end: impl FnOnce(&DriverQueue)) -> DriverQueue {
        let cluster = crate::Cluster::builder()
            .host(0, crate::HostConfig::new().host("127.0.0.1").port(1))
            .build()
            .unwrap();
        let driver = Driver::start(cluster.host_map(), cluster.script_memory()).unwrap();
        let queue = driver.queue().clone();
        before_end(&queue);
        drop(driver); // joins the thread
        queue
    }

    /// Whether a GET submitted to `queue` was dropped at once (its slot
    /// has no other holder).
    fn a_get_is_dropped(queue: &DriverQueue) -> bool {
        let slot = Slot::<Value>::for_command(crate::cmd::cmd("GET").arg("k"));
        queue.submit(Request {
            host: 0,
            sink: slot.clone(),
            budget: None,
            deadline: None,
            auto_batch: true,
        });
        Arc::strong_count(&slot) == 1
    }

    /// Work queued once the driver thread has ended is dropped at once, as
    /// a send on a channel whose receiver is gone was: kept in the queue, it
    /// would keep its reply's slot (and a task's clients) alive for as long
    /// as a stray queue handle lives.
    #[test]
    fn work_queued_after_the_driver_ended_is_dropped() {
        let queue = queue_of_an_ended_driver(|_| {});
        assert!(a_get_is_dropped(&queue), "the request was dropped");
        let task_slot = Slot::<Value>::new();
        let held = task_slot.clone();
        queue.spawn(Box::pin(async move { drop(held) }));
        assert_eq!(Arc::strong_count(&task_slot), 1, "the task was dropped");
    }

    /// Found by review: when the driver thread died of a panic (a task's,
    /// or a user's waker called inline), the queue was never closed, so
    /// everything sent afterwards piled up in it for as long as any queue
    /// handle lived (a channel's receiver went with the unwinding thread).
    #[test]
    fn work_queued_after_the_driver_panicked_is_dropped() {
        let queue = queue_of_an_ended_driver(|queue| {
            queue.spawn(Box::pin(async { panic!("a task's bug") }));
        });
        assert!(a_get_is_dropped(&queue), "the request was dropped");
    }

    /// A panic on the driver's loop (a bug of rb's) used to end the thread
    /// with every reply it owed pending forever: no deadline fires without
    /// the driver. What was in flight, and whatever is sent afterwards,
    /// fail with `Cancelled` instead, naming host and command.
    #[test]
    fn a_panic_on_the_driver_fails_what_waits_on_it() {
        // A host that takes the connection and never answers: the GET
        // stays in flight (no deadline) until the panic.
        let blackhole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = blackhole.local_addr().unwrap().port();
        let cluster = crate::Cluster::builder()
            .host(0, crate::HostConfig::new().host("127.0.0.1").port(port))
            .build()
            .unwrap();
        let driver = Driver::start(cluster.host_map(), cluster.script_memory()).unwrap();
        let get = |key: &str| {
            let slot = Slot::<Value>::for_command(crate::cmd::cmd("GET").arg(key));
            driver.queue().submit(Request {
                host: 0,
                sink: slot.clone(),
                budget: None,
                deadline: None,
                auto_batch: true,
            });
            slot
        };
        let in_flight = get("a");
        // Taken in the same turn, after the GET: the panic comes with the
        // GET in its host's pipeline.
        driver
            .queue()
            .spawn(Box::pin(async { panic!("a bug on the driver") }));
        let deadline = Instant::now() + Duration::from_secs(10);
        while in_flight.is_pending() {
            assert!(Instant::now() < deadline, "the GET in flight still waits");
            std::thread::yield_now();
        }
        let after = get("b");
        assert!(
            !after.is_pending(),
            "a GET sent after the panic fails at once"
        );
        for slot in [in_flight, after] {
            let got = Reply::from_slot(slot, Arc::new(()), Duration::ZERO).wait();
            match got {
                Err(e @ Error::Cancelled { .. }) => {
                    let text = e.to_string();
                    assert!(text.contains(&port.to_string()), "{text}");
                    assert!(text.contains("GET"), "{text}");
                }
                other => panic!("{other:?}"),
            }
        }
        drop(driver);
    }

    /// Review: a panic on the driver while it puts one message into the
    /// session (any bug of rb's in `take`; `set_hosts` likewise) drops the
    /// other messages of the same turn, still in `run`'s `taken` vector:
    /// neither `close_failing` nor `session.cancel` sees them, and their
    /// replies wait forever.
    #[test]
    fn messages_taken_in_the_turn_of_a_panic_fail_too() {
        /// Stands for a bug in `take`: its `command()` panics.
        struct Boom;
        impl crate::promise::ReplySink for Boom {
            fn accept(&self, _: u32, _: Result<Value>, _: &ReplyContext<'_>) {}
            fn release(&self, _: u32) {}
            fn command(&self) -> Option<&crate::cmd::Cmd> {
                panic!("a bug in take (expected by this test)")
            }
        }
        let blackhole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = blackhole.local_addr().unwrap().port();
        let cluster = crate::Cluster::builder()
            .host(0, crate::HostConfig::new().host("127.0.0.1").port(port))
            .build()
            .unwrap();
        let driver = Driver::start(cluster.host_map(), cluster.script_memory()).unwrap();
        let request = |sink: SharedSink| Request {
            host: 0,
            sink,
            budget: None,
            deadline: None,
            auto_batch: true,
        };
        let get = Slot::<Value>::for_command(crate::cmd::cmd("GET").arg("a"));
        // Both in one turn, for certain: queued under one lock.
        {
            let shared = &driver.queue().shared;
            let mut queue = lock(&shared.queue);
            queue
                .messages
                .push_back(Message::One(request(Arc::new(Boom))));
            queue.messages.push_back(Message::One(request(get.clone())));
        }
        driver.queue().shared.wake();
        let deadline = Instant::now() + Duration::from_secs(5);
        while get.is_pending() {
            assert!(
                Instant::now() < deadline,
                "a GET taken in the turn of the panic waits forever"
            );
            std::thread::yield_now();
        }
        drop(driver);
    }

    /// After a panic ended a driver's thread, the cluster starts a new one
    /// for new clients (those holding the old one get `Cancelled` at once).
    #[test]
    fn a_cluster_replaces_a_driver_whose_thread_ended() {
        let cluster = crate::Cluster::builder()
            .host(0, crate::HostConfig::new().host("127.0.0.1").port(1))
            .build()
            .unwrap();
        let first = cluster.driver().unwrap();
        assert!(Arc::ptr_eq(&first, &cluster.driver().unwrap()), "shared");
        first
            .queue()
            .spawn(Box::pin(async { panic!("a bug on the driver") }));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !first.has_ended() {
            assert!(Instant::now() < deadline, "the thread did not end");
            std::thread::yield_now();
        }
        let second = cluster.driver().unwrap();
        assert!(!Arc::ptr_eq(&first, &second), "a new driver");
        assert!(!second.has_ended());
    }

    /// Found by review: a peak older than the memory was replaced by the
    /// current turn's load, forgetting the loads seen since.
    #[test]
    fn the_recent_load_keeps_loads_below_an_old_peak() {
        let t0 = Instant::now();
        let at = |us: u64| t0 + Duration::from_micros(us);
        let mut load = RecentLoad::new(t0);
        load.turn(at(0), 50);
        for us in (1_000..=10_000).step_by(100) {
            load.turn(at(us), 8);
        }
        let peak = load.turn(at(10_200), 1);
        assert!(peak >= 8, "recent peak {peak}: 8 were in flight 0.2 ms ago");
    }
}
