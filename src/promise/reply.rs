//! [`Reply<T>`]: the answer of an async request, a `Future + Send + 'static`
//! completed by the cluster's driver thread through the task's `Waker`.
//!
//! No runtime is assumed: a `Reply` is polled by whatever executor awaits
//! it (tokio, smol, a hand-written one), or blocked on with
//! [`Reply::wait`]. Dropping a `Reply` cancels nothing on the wire: its
//! request still runs and its reply is read and dropped, so the host's
//! pipeline stays in step.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};

use super::{ReplyContext, ReplySink};
use crate::convert::FromValue;
use crate::error::{Error, Result};
use crate::resp::Value;

/// Where the driver puts one request's converted reply, and where the task
/// awaiting it left its waker.
pub(crate) struct Slot<T> {
    state: Mutex<SlotState<T>>,
    /// The request itself, for the driver to encode. Kept here so that its
    /// buffer is freed by the thread that made it (with the reply), not by
    /// the driver: a free from another thread costs an allocator lock.
    command: Option<crate::cmd::Cmd>,
}

enum SlotState<T> {
    Pending(Option<Waker>),
    Ready(Result<T>),
    Taken,
}

impl<T> Slot<T> {
    pub(crate) fn new() -> Arc<Slot<T>> {
        Arc::new(Slot {
            state: Mutex::new(SlotState::Pending(None)),
            command: None,
        })
    }

    /// A slot for the reply to `command`, which it carries to the driver.
    pub(crate) fn for_command(command: crate::cmd::Cmd) -> Arc<Slot<T>> {
        Arc::new(Slot {
            state: Mutex::new(SlotState::Pending(None)),
            command: Some(command),
        })
    }

    fn lock(&self) -> MutexGuard<'_, SlotState<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Settles the slot and wakes its task; a second settle (a reply that
    /// came after its deadline) is ignored.
    pub(crate) fn settle(&self, result: Result<T>) {
        let waker = {
            let mut state = self.lock();
            match &mut *state {
                SlotState::Pending(waker) => {
                    let waker = waker.take();
                    *state = SlotState::Ready(result);
                    waker
                }
                _ => return,
            }
        };
        if let Some(w) = waker {
            w.wake();
        }
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
            SlotState::Ready(_) => match std::mem::replace(&mut *state, SlotState::Taken) {
                SlotState::Ready(result) => Poll::Ready(result),
                _ => Poll::Pending,
            },
            SlotState::Taken => Poll::Ready(Err(taken_error())),
        }
    }
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
        self.settle(reply.and_then(T::from_value).map_err(|e| ctx.failed(e)));
    }

    fn accept_shared(&self, index: u32, reply: &Value, ctx: &ReplyContext<'_>) {
        match T::from_shared(reply) {
            Some(result) => self.settle(result.map_err(|e| ctx.failed(e))),
            None => self.accept(index, Ok(reply.clone()), ctx),
        }
    }

    fn accept_bulk(&self, index: u32, bytes: Option<&[u8]>, ctx: &ReplyContext<'_>) {
        match T::from_bulk(bytes) {
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

/// What keeps the driver thread running while a reply is outstanding.
pub(crate) type KeepAlive = Arc<dyn Any + Send + Sync>;

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
    _keep: Option<KeepAlive>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T>> + Send>>;

enum Inner<T> {
    Done(Option<Result<T>>),
    Slot(Arc<Slot<T>>),
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
            Inner::Slot(_) | Inner::Future(_) => "waiting",
        };
        f.debug_struct("Reply").field("state", &state).finish()
    }
}

impl<T: Send + 'static> Reply<T> {
    /// A reply that is already there.
    pub fn ready(result: Result<T>) -> Reply<T> {
        Reply {
            inner: Inner::Done(Some(result)),
            _keep: None,
        }
    }

    /// The reply the driver settles through `slot`.
    pub(crate) fn from_slot(slot: Arc<Slot<T>>, keep: KeepAlive) -> Reply<T> {
        Reply {
            inner: Inner::Slot(slot),
            _keep: Some(keep),
        }
    }

    /// A reply computed by a future (joins, retries).
    pub(crate) fn from_future(
        future: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Reply<T> {
        Reply {
            inner: Inner::Future(Box::pin(future)),
            _keep: None,
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
        if let Inner::Slot(slot) = &self.inner {
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
            Inner::Slot(slot) => slot.poll_take(cx),
            Inner::Future(f) => f.as_mut().poll(cx),
        }
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
    use std::cell::RefCell;

    fn ctx_failures() -> RefCell<Option<Error>> {
        RefCell::new(None)
    }

    #[test]
    fn a_slot_settles_once_and_wakes_its_waiter() {
        let slot = Slot::<i64>::new();
        let keep: KeepAlive = Arc::new(());
        let reply = Reply::from_slot(slot.clone(), keep);
        let waiter = std::thread::spawn(move || reply.wait());
        let failures = ctx_failures();
        let ctx = ReplyContext {
            host: None,
            command: "INCR",
            failures: &failures,
        };
        slot.accept(0, Ok(Value::Int(7)), &ctx);
        // A late second reply (after a timeout settled it) changes nothing.
        slot.accept(0, Ok(Value::Int(8)), &ctx);
        assert_eq!(waiter.join().expect("thread").expect("value"), 7);
    }

    #[test]
    fn conversion_errors_name_the_command() {
        let slot = Slot::<i64>::new();
        let failures = ctx_failures();
        let ctx = ReplyContext {
            host: None,
            command: "GET",
            failures: &failures,
        };
        slot.accept_bulk(0, Some(b"not a number"), &ctx);
        let err = Reply::from_slot(slot, Arc::new(()))
            .wait()
            .expect_err("type");
        assert!(err.to_string().contains("GET"), "{err}");
    }

    #[test]
    fn join_all_keeps_order_and_outcomes() {
        let slots: Vec<Arc<Slot<i64>>> = (0..100).map(|_| Slot::new()).collect();
        let replies: Vec<Reply<i64>> = slots
            .iter()
            .map(|s| Reply::from_slot(s.clone(), Arc::new(())))
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
}
