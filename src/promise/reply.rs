//! [`Reply<T>`]: the answer of an async request, a `Future + Send + 'static`
//! completed by the cluster's driver thread through the task's `Waker`.
//!
//! No runtime is assumed: a `Reply` is polled by whatever executor awaits
//! it (tokio, smol, a hand-written one), or blocked on with
//! [`Reply::wait`]. Dropping a `Reply` cancels nothing on the wire: its
//! request still runs and its reply is read and dropped, so the host's
//! pipeline stays in step.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use super::{ReplyContext, ReplySink};
use crate::convert::FromValue;
use crate::error::{Error, Result};
use crate::resp::Value;

/// Where the driver puts one request's converted reply, and where the task
/// awaiting it left its waker.
pub(crate) struct Slot<T> {
    state: Mutex<SlotState<T>>,
    /// Set once the state is `Ready`: what a spinning poller watches,
    /// without taking the lock.
    ready: AtomicBool,
    /// The request itself, for the driver to encode. Kept here so that its
    /// buffer is freed by the thread that made it (with the reply), not by
    /// the driver: a free from another thread costs an allocator lock.
    command: Option<crate::cmd::Cmd>,
}

enum SlotState<T> {
    Pending(Option<Waker>),
    Ready(Result<T>),
    /// A short bulk string as it came, for a type whose conversion of it
    /// cannot fail ([`FromValue::bulk_always_converts`]): the taker
    /// converts it (with the function here, `T`'s), so the value's
    /// allocation is made and freed on the caller's thread, not made on
    /// the driver's and freed on another.
    Bulk(ShortBulk, fn(&[u8]) -> Result<T>),
    Taken,
}

/// Bulk strings up to this long are copied into the slot as they come
/// (see [`SlotState::Bulk`]); longer ones are converted by the driver.
const SHORT_BULK: usize = 64;

/// A bulk string of at most [`SHORT_BULK`] bytes, held inline.
struct ShortBulk {
    len: u8,
    bytes: [u8; SHORT_BULK],
}

impl ShortBulk {
    /// A copy of `bytes`, if they are short enough.
    fn copy(bytes: &[u8]) -> Option<ShortBulk> {
        let len = u8::try_from(bytes.len())
            .ok()
            .filter(|&n| usize::from(n) <= SHORT_BULK)?;
        let mut inline = [0; SHORT_BULK];
        inline.get_mut(..bytes.len())?.copy_from_slice(bytes);
        Some(ShortBulk { len, bytes: inline })
    }

    fn bytes(&self) -> &[u8] {
        self.bytes.get(..usize::from(self.len)).unwrap_or_default()
    }
}

/// Converts a short bulk string taken from a slot (see [`SlotState::Bulk`]).
fn convert_bulk<T: FromValue>(bytes: &[u8]) -> Result<T> {
    let bytes = Some(bytes);
    T::from_bulk(bytes).unwrap_or_else(|| T::from_value(Value::from_bulk_bytes(bytes)))
}

impl<T> Slot<T> {
    pub(crate) fn new() -> Arc<Slot<T>> {
        Arc::new(Slot {
            state: Mutex::new(SlotState::Pending(None)),
            ready: AtomicBool::new(false),
            command: None,
        })
    }

    /// A slot for the reply to `command`, which it carries to the driver.
    pub(crate) fn for_command(command: crate::cmd::Cmd) -> Arc<Slot<T>> {
        Arc::new(Slot {
            state: Mutex::new(SlotState::Pending(None)),
            ready: AtomicBool::new(false),
            command: Some(command),
        })
    }

    fn lock(&self) -> MutexGuard<'_, SlotState<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Settles the slot and wakes its task; a second settle (a reply that
    /// came after its deadline) is ignored.
    pub(crate) fn settle(&self, result: Result<T>) {
        self.settle_with(SlotState::Ready(result));
    }

    /// [`Slot::settle`] with the state to settle in.
    fn settle_with(&self, settled: SlotState<T>) {
        let waker = {
            let mut state = self.lock();
            match &mut *state {
                SlotState::Pending(waker) => {
                    let waker = waker.take();
                    *state = settled;
                    self.ready.store(true, Ordering::Release);
                    waker
                }
                _ => return,
            }
        };
        if let Some(w) = waker {
            // The waker is the caller's executor's, called on the settling
            // thread: usually the driver's, which serves every caller. One
            // that panics (the panic hook has reported it) must not end
            // that thread, after which no request would ever be answered
            // or time out. The slot is settled and unlocked by now.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.wake()));
        }
    }

    /// Whether the reply is in (taken or not), without locking.
    fn is_settled(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// The task awaiting the reply is gone: drop its waker, so settling
    /// the slot later calls nothing of it.
    fn forget_waker(&self) {
        if let SlotState::Pending(waker) = &mut *self.lock() {
            *waker = None;
        }
    }

    fn poll_take(&self, cx: &mut Context<'_>) -> Poll<Result<T>> {
        let mut state = self.lock();
        match &mut *state {
            SlotState::Pending(waker) => {
                match waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => *waker = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
            SlotState::Ready(_) | SlotState::Bulk(..) => {
                let taken = std::mem::replace(&mut *state, SlotState::Taken);
                drop(state);
                match taken {
                    SlotState::Ready(result) => Poll::Ready(result),
                    SlotState::Bulk(bulk, convert) => Poll::Ready(convert(bulk.bytes())),
                    _ => Poll::Pending,
                }
            }
            SlotState::Taken => Poll::Ready(Err(taken_error())),
        }
    }
}

/// Runs a conversion of the caller's type (`FromValue` is public) on the
/// settling thread, usually the driver's, which serves every caller: one
/// that panics (the panic hook has reported it) fails its own request
/// with [`Error::Type`], and the thread goes on.
fn guarded<R, T>(convert: impl FnOnce() -> R, failed: impl FnOnce(Error) -> R) -> R {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(convert))
        .unwrap_or_else(|_| failed(conversion_panicked::<T>()))
}

#[cold]
fn conversion_panicked<T>() -> Error {
    Error::type_mismatch(
        std::any::type_name::<T>(),
        "a reply whose conversion panicked",
    )
}

fn taken_error() -> Error {
    Error::Pending {
        reason: "the reply was already taken".into(),
    }
}

impl<T: FromValue> ReplySink for Slot<T> {
    fn accept(&self, _index: u32, reply: Result<Value>, ctx: &ReplyContext<'_>) {
        if !self.is_pending() {
            return;
        }
        let converted = guarded::<_, T>(|| reply.and_then(T::from_value), Err);
        self.settle(converted.map_err(|e| ctx.failed(e)));
    }

    fn accept_shared(&self, index: u32, reply: &Value, ctx: &ReplyContext<'_>) {
        match guarded::<_, T>(|| T::from_shared(reply), |e| Some(Err(e))) {
            Some(result) => self.settle(result.map_err(|e| ctx.failed(e))),
            None => self.accept(index, Ok(reply.clone()), ctx),
        }
    }

    fn accept_bulk(&self, index: u32, bytes: Option<&[u8]>, ctx: &ReplyContext<'_>) {
        if T::bulk_always_converts() {
            if let Some(bulk) = bytes.and_then(ShortBulk::copy) {
                return self.settle_with(SlotState::Bulk(bulk, convert_bulk::<T>));
            }
        }
        match guarded::<_, T>(|| T::from_bulk(bytes), |e| Some(Err(e))) {
            Some(result) => self.settle(result.map_err(|e| ctx.failed(e))),
            None => self.accept(index, Ok(Value::from_bulk_bytes(bytes)), ctx),
        }
    }

    fn release(&self, _index: u32) {}

    fn command(&self) -> Option<&crate::cmd::Cmd> {
        self.command.as_ref()
    }

    fn is_pending(&self) -> bool {
        matches!(*self.lock(), SlotState::Pending(_))
    }
}

/// The driver a reply waits on, as the reply sees it: kept running while
/// the reply is outstanding, and asked whether a pending reply may spin.
pub(crate) trait ReplySource: Send + Sync {
    /// Whether a pending reply may spin now: nobody else waits on the
    /// driver and no other reply spins. A `true` must be followed by
    /// [`ReplySource::end_spin`].
    fn try_start_spin(&self) -> bool;

    /// The spin that [`ReplySource::try_start_spin`] allowed is over.
    fn end_spin(&self);
}

/// A source that never lets a reply spin (for replies settled by hand).
impl ReplySource for () {
    fn try_start_spin(&self) -> bool {
        false
    }

    fn end_spin(&self) {}
}

/// A task's reply (see [`Reply::from_task`]): settled with the task's
/// outcome, or, when the task is dropped before its end (its driver
/// stopped, or failed), with an error, so that nobody waits for it forever.
struct TaskReply<T>(Option<Arc<Slot<T>>>);

impl<T> TaskReply<T> {
    fn settle(mut self, result: Result<T>) {
        if let Some(slot) = self.0.take() {
            slot.settle(result);
        }
    }
}

impl<T> Drop for TaskReply<T> {
    fn drop(&mut self) {
        if let Some(slot) = self.0.take() {
            slot.settle(Err(Error::Pending {
                reason: "the driver ended (it stopped, or a panic on it failed what it held) before the request's steps did"
                    .into(),
            }));
        }
    }
}

/// What keeps the driver thread running while a reply is outstanding.
pub(crate) type KeepAlive = Arc<dyn ReplySource>;

/// The answer of an async request: a `Future<Output = Result<T>>`.
///
/// `Send + 'static` (for `T: Send`), so it can be spawned, held across
/// `.await`, and moved between threads. Await it on any runtime, or call
/// [`Reply::wait`] where there is none. Dropping it does not disturb the
/// host's pipeline: the request runs and its reply is discarded.
///
/// ```no_run
/// use rb::{Cluster, Commands};
/// # async fn demo(cluster: Cluster) -> rb::Result<()> {
/// let client = cluster.async_client();
/// let v: Option<Vec<u8>> = client.get("key").await?;
/// let n: i64 = client.incr("counter").await?;
/// # Ok(()) }
/// ```
#[must_use = "a Reply does nothing with its answer unless awaited or waited on"]
pub struct Reply<T> {
    inner: Inner<T>,
    source: Option<KeepAlive>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T>> + Send>>;

enum Inner<T> {
    Done(Option<Result<T>>),
    Slot(Arc<Slot<T>>, SpinWait),
    Future(BoxFuture<T>),
}

// A `Reply` never pins `T` (it only moves a finished value out), and its
// futures are boxed: moving a `Reply` is always fine.
impl<T> Unpin for Reply<T> {}

impl<T> fmt::Debug for Reply<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.inner {
            Inner::Done(Some(Ok(_))) => "ready",
            Inner::Done(Some(Err(_))) => "failed",
            Inner::Done(None) => "taken",
            Inner::Slot(..) | Inner::Future(_) => "waiting",
        };
        f.debug_struct("Reply").field("state", &state).finish()
    }
}

impl<T: Send + 'static> Reply<T> {
    /// A reply that is already there.
    pub fn ready(result: Result<T>) -> Reply<T> {
        Reply {
            inner: Inner::Done(Some(result)),
            source: None,
        }
    }

    /// A reply settled by `future`, which `spawn` hands to what runs it to
    /// its end (the driver thread): unlike [`Reply::from_future`], it runs
    /// whether or not the reply is awaited, as a plain request does.
    pub(crate) fn from_task(
        future: impl Future<Output = Result<T>> + Send + 'static,
        spawn: impl FnOnce(Pin<Box<dyn Future<Output = ()> + Send>>),
        keep: KeepAlive,
        spin: Duration,
    ) -> Reply<T> {
        let slot = Slot::new();
        let settle = TaskReply(Some(slot.clone()));
        spawn(Box::pin(async move { settle.settle(future.await) }));
        Reply::from_slot(slot, keep, spin)
    }

    /// The reply the driver settles through `slot`; on its first pending
    /// poll the polling thread may watch the slot for up to `spin` before
    /// the task sleeps (see [`SpinWait`]).
    pub(crate) fn from_slot(slot: Arc<Slot<T>>, keep: KeepAlive, spin: Duration) -> Reply<T> {
        Reply {
            inner: Inner::Slot(slot, SpinWait::new(spin)),
            source: Some(keep),
        }
    }

    /// A reply computed by a future (joins, retries).
    pub(crate) fn from_future(
        future: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Reply<T> {
        Reply {
            inner: Inner::Future(Box::pin(future)),
            source: None,
        }
    }

    /// Waits for the reply on this thread, without a runtime.
    ///
    /// Do not call it from inside an async task (it blocks the worker) or
    /// from a waker.
    ///
    /// # Errors
    ///
    /// The request's error: the server's, a timeout, a connection failure.
    ///
    /// ```no_run
    /// use rb::{Cluster, Commands};
    /// # let cluster = Cluster::from_urls(["redis://127.0.0.1:6379"])?;
    /// let n: i64 = cluster.async_client().incr("c").wait()?;
    /// # Ok::<(), rb::Error>(())
    /// ```
    pub fn wait(self) -> Result<T> {
        block_on(self)
    }

    /// Joins `parts` into one reply: `combine` gets every part's outcome,
    /// in order, once all are in.
    pub(crate) fn join_results<P: Send + 'static>(
        parts: Vec<Reply<P>>,
        combine: impl FnOnce(Vec<Result<P>>) -> Result<T> + Send + 'static,
    ) -> Reply<T> {
        let all = join_all(parts);
        Reply::from_future(async move { combine(all.await) })
    }

    /// Joins `parts`: the first failure, else `combine` of the values.
    pub(crate) fn join<P: Send + 'static>(
        parts: Vec<Reply<P>>,
        combine: impl FnOnce(Vec<P>) -> Result<T> + Send + 'static,
    ) -> Reply<T> {
        Reply::join_results(parts, move |results| {
            combine(results.into_iter().collect::<Result<Vec<P>>>()?)
        })
    }
}

impl<T> Drop for Reply<T> {
    /// A dropped reply's request still runs (its reply is read and
    /// dropped); only the waker of the task that awaited it is forgotten.
    fn drop(&mut self) {
        if let Inner::Slot(slot, _) = &self.inner {
            slot.forget_waker();
        }
    }
}

impl<T> Future for Reply<T> {
    type Output = Result<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T>> {
        let this = self.get_mut();
        match &mut this.inner {
            Inner::Done(result) => Poll::Ready(result.take().unwrap_or_else(|| Err(taken_error()))),
            Inner::Slot(slot, spin) => {
                let mut taken = slot.poll_take(cx);
                if taken.is_pending() {
                    // The waker is registered: a reply that comes while we
                    // spin is taken here, or wakes the task if we gave up.
                    let source = this.source.as_deref();
                    if spin.until_settled(slot, source) {
                        taken = slot.poll_take(cx);
                    }
                }
                if taken.is_ready() {
                    // Done with the slot: let it go now (the drop of a
                    // reply still holding one locks it to forget a waker).
                    this.inner = Inner::Done(None);
                }
                taken
            }
            Inner::Future(f) => f.as_mut().poll(cx),
        }
    }
}

/// Spin-then-park for a pending reply: the polling thread watches the slot
/// for up to a short window before it lets the task sleep until the driver
/// wakes it.
///
/// Waking a sleeping thread costs tens of microseconds on a busy or virtual
/// machine, as much as a loopback round trip: a caller waiting alone on a
/// nearby host gets its reply sooner by not sleeping. Spinning holds the
/// thread, so it is for the lone caller only: a reply spins only when its
/// source allows it ([`ReplySource::try_start_spin`]: the driver has had
/// at most one request in flight lately, and no other reply spins). And
/// each thread learns whether it pays ([`SpinRecord`]).
struct SpinWait {
    /// How long to spin; zero once the reply has had its chance (a
    /// reply spins at most once, on its first pending poll).
    window: Duration,
}

/// A thread's record of its spins: after [`FREE_MISSES`] spins in a row
/// that ran out, each further one makes the thread let the next 1, 3, 7,
/// ... 63 pending replies sleep at once, so a distant host costs one spin
/// per 64 replies; a spin that catches its reply clears the misses. After
/// [`MAX_CATCHES`] catches in a row the next reply sleeps: a task whose
/// every reply is caught would otherwise never yield to its runtime (no
/// other task would run on a single-threaded one).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct SpinRecord {
    /// Spins in a row that ran out (at most `FREE_MISSES + MAX_BACKOFF`).
    misses: u32,
    /// Pending replies to let sleep before the next spin.
    skip: u32,
    /// Spins in a row that caught their reply.
    catches: u32,
}

/// Spins that may run out in a row before the thread lets any reply sleep
/// at once (a spin cut short by the scheduler is not a slow host).
const FREE_MISSES: u32 = 2;
/// The longest back-off: 2^6 - 1 = 63 replies sleep between two spins.
const MAX_BACKOFF: u32 = 6;
/// Spins in a row that catch their reply before one reply sleeps (its
/// task yields).
const MAX_CATCHES: u32 = 32;

impl SpinRecord {
    /// A reply is pending: whether it may spin (else it counts as skipped).
    fn may_spin(&mut self) -> bool {
        if self.skip > 0 {
            self.skip -= 1;
            return false;
        }
        if self.catches >= MAX_CATCHES {
            self.catches = 0;
            return false;
        }
        true
    }

    /// A spin ended: it caught its reply, or ran out.
    fn spun(&mut self, caught: bool) {
        *self = if caught {
            SpinRecord {
                catches: self.catches + 1,
                ..SpinRecord::default()
            }
        } else {
            let misses = (self.misses + 1).min(FREE_MISSES + MAX_BACKOFF);
            SpinRecord {
                misses,
                skip: (1 << misses.saturating_sub(FREE_MISSES)) - 1,
                catches: 0,
            }
        };
    }
}

thread_local! {
    static SPIN_RECORD: std::cell::Cell<SpinRecord> =
        const { std::cell::Cell::new(SpinRecord { misses: 0, skip: 0, catches: 0 }) };
}

fn with_record<R>(f: impl FnOnce(&mut SpinRecord) -> R) -> R {
    SPIN_RECORD.with(|cell| {
        let mut record = cell.get();
        let out = f(&mut record);
        cell.set(record);
        out
    })
}

impl SpinWait {
    fn new(window: Duration) -> SpinWait {
        SpinWait { window }
    }

    /// On the reply's first pending poll, if `source` allows it, spins
    /// until `slot` settles (true) or the window runs out (false); then
    /// lets the source's spin go and updates the thread's record.
    fn until_settled<T>(&mut self, slot: &Slot<T>, source: Option<&dyn ReplySource>) -> bool {
        let window = std::mem::take(&mut self.window);
        let Some(source) = source.filter(|_| !window.is_zero()) else {
            return false;
        };
        if !with_record(SpinRecord::may_spin) || !source.try_start_spin() {
            return false;
        }
        let Some(until) = Instant::now().checked_add(window) else {
            source.end_spin();
            return false;
        };
        let caught = loop {
            // A clock read per 64 looks at the slot (an atomic load each).
            for _ in 0..64 {
                if slot.is_settled() {
                    break;
                }
                std::hint::spin_loop();
            }
            if slot.is_settled() {
                break true;
            }
            if Instant::now() >= until {
                break false;
            }
        };
        source.end_spin();
        with_record(|r| r.spun(caught));
        caught
    }
}

/// Waits for every reply; a future of their outcomes, in order.
///
/// ```no_run
/// use rb::{Cluster, Commands};
/// # async fn demo(cluster: Cluster) {
/// let client = cluster.async_client();
/// let keys = ["a", "b", "c"];
/// let values = rb::join_all(keys.iter().map(|k| client.get(k))).await; // Vec<Result<_>>
/// # }
/// ```
pub fn join_all<T, I>(replies: I) -> JoinAll<T>
where
    I: IntoIterator<Item = Reply<T>>,
{
    let pending: Vec<Reply<T>> = replies.into_iter().collect();
    JoinAll {
        outcomes: Vec::with_capacity(pending.len()),
        pending: pending.into_iter(),
        current: None,
    }
}

/// The future of [`join_all`].
#[must_use = "futures do nothing unless awaited"]
pub struct JoinAll<T> {
    outcomes: Vec<Result<T>>,
    pending: std::vec::IntoIter<Reply<T>>,
    current: Option<Reply<T>>,
}

impl<T> Unpin for JoinAll<T> {}

impl<T> fmt::Debug for JoinAll<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinAll")
            .field("done", &self.outcomes.len())
            .field(
                "left",
                &(self.pending.len() + usize::from(self.current.is_some())),
            )
            .finish()
    }
}

impl<T> Future for JoinAll<T> {
    type Output = Vec<Result<T>>;

    /// Polls the replies in order and stops at the first pending one: only
    /// it holds the waker, so a join of n replies costs O(n) polls in all,
    /// not O(n) per wake.
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Vec<Result<T>>> {
        let this = self.get_mut();
        loop {
            let mut reply = match this.current.take() {
                Some(r) => r,
                None => match this.pending.next() {
                    Some(r) => r,
                    None => return Poll::Ready(std::mem::take(&mut this.outcomes)),
                },
            };
            match Pin::new(&mut reply).poll(cx) {
                Poll::Ready(outcome) => this.outcomes.push(outcome),
                Poll::Pending => {
                    this.current = Some(reply);
                    return Poll::Pending;
                }
            }
        }
    }
}

/// Unparks the thread blocked in [`block_on`].
struct ThreadWaker(std::thread::Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// Runs `future` to completion on this thread, parking between polls.
fn block_on<F: Future + Unpin>(mut future: F) -> F::Output {
    let waker = THREAD_WAKER.with(Clone::clone);
    let mut cx = Context::from_waker(&waker);
    loop {
        if let Poll::Ready(out) = Pin::new(&mut future).poll(&mut cx) {
            return out;
        }
        std::thread::park();
    }
}

thread_local! {
    /// This thread's waker for [`block_on`], made once.
    static THREAD_WAKER: Waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};

    /// Runs `f` with the context of a reply to `command` from no host.
    fn in_context<R>(command: &str, f: impl FnOnce(&ReplyContext<'_>) -> R) -> R {
        let failures = RefCell::new(None);
        f(&ReplyContext {
            host: None,
            command,
            failures: &failures,
            misses: None,
        })
    }

    #[test]
    fn a_slot_settles_once_and_wakes_its_waiter() {
        let slot = Slot::<i64>::new();
        let keep: KeepAlive = Arc::new(());
        let reply = Reply::from_slot(slot.clone(), keep, Duration::ZERO);
        let waiter = std::thread::spawn(move || reply.wait());
        in_context("INCR", |ctx| {
            slot.accept(0, Ok(Value::Int(7)), ctx);
            // A late second reply (after a timeout settled it) changes nothing.
            slot.accept(0, Ok(Value::Int(8)), ctx);
        });
        assert_eq!(waiter.join().expect("thread").expect("value"), 7);
    }

    #[test]
    fn conversion_errors_name_the_command() {
        let slot = Slot::<i64>::new();
        in_context("GET", |ctx| slot.accept_bulk(0, Some(b"not a number"), ctx));
        let err = Reply::from_slot(slot, Arc::new(()), Duration::ZERO)
            .wait()
            .expect_err("type");
        assert!(err.to_string().contains("GET"), "{err}");
    }

    /// The bytes' types take a short bulk string as it came and convert it
    /// when it is taken; longer ones, nil and other types are converted
    /// as they come. Either way the caller gets the same value.
    #[test]
    fn short_bulks_are_converted_by_the_taker() {
        fn settle<T: FromValue + 'static>(bytes: Option<&[u8]>) -> (bool, Result<T>) {
            let slot = Slot::<T>::new();
            in_context("GET", |ctx| slot.accept_bulk(0, bytes, ctx));
            let deferred = matches!(*slot.lock(), SlotState::Bulk(..));
            let got = Reply::from_slot(slot, Arc::new(()), Duration::ZERO).wait();
            (deferred, got)
        }
        let long = [b'x'; SHORT_BULK + 1];
        let longest = [b'y'; SHORT_BULK];
        for bytes in [&b""[..], b"abc", b"\xff\xfe", &longest[..], &long[..]] {
            let (deferred, got) = settle::<Option<Vec<u8>>>(Some(bytes));
            assert_eq!(deferred, bytes.len() <= SHORT_BULK, "{} bytes", bytes.len());
            assert_eq!(got.expect("bytes"), Some(bytes.to_vec()));
            let (deferred, got) = settle::<Vec<u8>>(Some(bytes));
            assert_eq!(deferred, bytes.len() <= SHORT_BULK);
            assert_eq!(got.expect("bytes"), bytes.to_vec());
            let (deferred, got) = settle::<Value>(Some(bytes));
            assert_eq!(deferred, bytes.len() <= SHORT_BULK);
            assert_eq!(got.expect("value"), Value::BulkString(bytes.to_vec()));
        }
        let (deferred, got) = settle::<Option<Vec<u8>>>(None);
        assert!(!deferred, "nil allocates nothing");
        assert_eq!(got.expect("nil"), None);
        // A conversion that may fail stays on the driver, with its context.
        let (deferred, got) = settle::<String>(Some(b"\xff"));
        assert!(!deferred);
        let err = got.expect_err("not UTF-8");
        assert!(err.to_string().contains("GET"), "{err}");
    }

    /// A task that ends settles its reply; one dropped before its end (its
    /// driver stopped or failed) fails it, so nobody waits forever.
    #[test]
    fn a_task_dropped_before_its_end_fails_its_reply() {
        let mut never =
            Reply::<i64>::from_task(std::future::pending(), drop, Arc::new(()), Duration::ZERO);
        // Settled as the task dropped: ready at the first poll.
        let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
        match Pin::new(&mut never).poll(&mut Context::from_waker(&waker)) {
            Poll::Ready(Err(Error::Pending { reason })) => {
                assert!(reason.contains("driver ended"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        let done = Reply::<i64>::from_task(async { Ok(7) }, block_on, Arc::new(()), Duration::ZERO);
        assert_eq!(done.wait().expect("value"), 7);
    }

    #[test]
    fn join_all_keeps_order_and_outcomes() {
        let slots: Vec<Arc<Slot<i64>>> = (0..100).map(|_| Slot::new()).collect();
        let replies: Vec<Reply<i64>> = slots
            .iter()
            .map(|s| Reply::from_slot(s.clone(), Arc::new(()), Duration::ZERO))
            .collect();
        let all = std::thread::spawn(move || block_on(join_all(replies)));
        // Settle in reverse: the join still answers in the callers' order.
        for (i, s) in slots.iter().enumerate().rev() {
            if i == 50 {
                s.settle(Err(Error::config("boom")));
            } else {
                s.settle(Ok(i as i64));
            }
        }
        let out = all.join().expect("thread");
        assert_eq!(out.len(), 100);
        for (i, o) in out.iter().enumerate() {
            match o {
                Ok(v) => assert_eq!(*v, i as i64),
                Err(_) => assert_eq!(i, 50),
            }
        }
    }

    #[test]
    fn join_reports_the_first_failure() {
        let parts = vec![
            Reply::ready(Ok(1)),
            Reply::ready(Err(Error::config("second"))),
            Reply::ready(Err(Error::config("third"))),
        ];
        let joined: Reply<i64> = Reply::join(parts, |v: Vec<i64>| Ok(v.iter().sum()));
        let err = joined.wait().expect_err("fails");
        assert!(err.to_string().contains("second"), "{err}");
    }

    #[test]
    fn replies_are_send_and_static() {
        fn check<T: Send + 'static>() {}
        check::<Reply<Option<Vec<u8>>>>();
        check::<JoinAll<i64>>();
    }

    /// A source that allows (or refuses) spins, counts them, and tells a
    /// test when one starts.
    struct TestSource {
        allow: bool,
        starts: std::sync::atomic::AtomicUsize,
        ends: std::sync::atomic::AtomicUsize,
        started: Mutex<Option<std::sync::mpsc::Sender<()>>>,
    }

    impl TestSource {
        fn new(allow: bool) -> (Arc<TestSource>, std::sync::mpsc::Receiver<()>) {
            let (tx, rx) = std::sync::mpsc::channel();
            let source = TestSource {
                allow,
                starts: Default::default(),
                ends: Default::default(),
                started: Mutex::new(Some(tx)),
            };
            (Arc::new(source), rx)
        }
        fn counts(&self) -> (usize, usize) {
            (
                self.starts.load(Ordering::SeqCst),
                self.ends.load(Ordering::SeqCst),
            )
        }
    }

    impl ReplySource for TestSource {
        fn try_start_spin(&self) -> bool {
            self.starts.fetch_add(1, Ordering::SeqCst);
            if let Some(tx) = self.started.lock().ok().and_then(|g| g.clone()) {
                let _ = tx.send(());
            }
            self.allow
        }
        fn end_spin(&self) {
            self.ends.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn noop_cx_poll<T>(reply: &mut Reply<T>) -> Poll<Result<T>> {
        let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
        Pin::new(reply).poll(&mut Context::from_waker(&waker))
    }

    #[test]
    fn the_spin_record_backs_off_after_free_misses_and_clears_on_a_catch() {
        let mut r = SpinRecord::default();
        let mut skips = Vec::new();
        for _ in 0..10 {
            r.spun(false);
            skips.push(r.skip);
        }
        assert_eq!(skips, [0, 0, 1, 3, 7, 15, 31, 63, 63, 63]);
        // Skipped replies do not spin, then one may.
        let allowed: Vec<bool> = (0..64).map(|_| r.may_spin()).collect();
        assert_eq!(allowed.iter().filter(|a| **a).count(), 1);
        assert!(allowed[63]);
        r.spun(true);
        assert_eq!((r.misses, r.skip), (0, 0));
        assert!(r.may_spin());
    }

    #[test]
    fn a_thread_whose_spins_all_catch_still_lets_one_reply_sleep_in_33() {
        // Found by review: a task whose replies are all caught never
        // yields to its runtime.
        let mut r = SpinRecord::default();
        let mut slept = Vec::new();
        for i in 0..100 {
            if r.may_spin() {
                r.spun(true);
            } else {
                slept.push(i);
            }
        }
        assert_eq!(slept, [32, 65, 98]);
    }

    #[test]
    fn a_lone_pending_reply_catches_its_answer_within_the_poll() {
        let slot = Slot::<i64>::new();
        let (source, started) = TestSource::new(true);
        let mut reply = Reply::from_slot(slot.clone(), source.clone(), Duration::from_secs(30));
        let settler = std::thread::spawn(move || {
            // Settles once the poll below has started spinning.
            if started.recv().is_ok() {
                slot.settle(Ok(5));
            }
        });
        // One poll: it spins until the other thread settles the slot.
        assert!(matches!(noop_cx_poll(&mut reply), Poll::Ready(Ok(5))));
        settler.join().expect("settler");
        assert_eq!(source.counts(), (1, 1));
        assert_eq!(SPIN_RECORD.with(Cell::get).catches, 1);
    }

    #[test]
    fn a_spin_that_runs_out_leaves_the_reply_pending_and_counts_a_miss() {
        let slot = Slot::<i64>::new();
        let (source, _started) = TestSource::new(true);
        let mut reply = Reply::from_slot(slot.clone(), source.clone(), Duration::from_millis(2));
        let before = SPIN_RECORD.with(Cell::get).misses;
        assert!(noop_cx_poll(&mut reply).is_pending());
        assert_eq!(source.counts(), (1, 1));
        assert_eq!(SPIN_RECORD.with(Cell::get).misses, before + 1);
        // A reply spins once, on its first pending poll only.
        assert!(noop_cx_poll(&mut reply).is_pending());
        assert_eq!(source.counts(), (1, 1));
        slot.settle(Ok(9));
        assert!(matches!(noop_cx_poll(&mut reply), Poll::Ready(Ok(9))));
    }

    #[test]
    fn a_reply_the_source_refuses_sleeps_at_once() {
        let slot = Slot::<i64>::new();
        let (source, _started) = TestSource::new(false);
        // Were it to spin, this poll would take an hour.
        let mut reply = Reply::from_slot(slot, source.clone(), Duration::from_secs(3600));
        assert!(noop_cx_poll(&mut reply).is_pending());
        assert_eq!(source.counts(), (1, 0));
        // And no window at all never asks.
        let (source, _started) = TestSource::new(true);
        let mut reply = Reply::from_slot(Slot::<i64>::new(), source.clone(), Duration::ZERO);
        assert!(noop_cx_poll(&mut reply).is_pending());
        assert_eq!(source.counts(), (0, 0));
    }
}
