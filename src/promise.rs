//! [`Promise<T>`]: a reply that will arrive, as in rb (and ES6).
//!
//! Promises are single-threaded handles into a promise table: the event
//! loop settles them as replies arrive, and their callbacks (`then`,
//! `done`) run right there, on the thread that drives the map. After the
//! map returns, every promise it handed out is settled.
//!
//! The table hands out entries in blocks of 32 per type and thread (one
//! allocation per block, not per promise). A value is dropped with the
//! last handle to its promise; a promise kept long keeps its block's
//! memory (about a kilobyte for a GET's promise), never its neighbours'
//! values.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::rc::Rc;

use crate::convert::FromValue;
use crate::error::{Error, HostName, Result};
use crate::resp::Value;

mod block;
mod reply;
use block::Block;
pub use reply::{join_all, JoinAll, Reply};
pub(crate) use reply::{KeepAlive, ReplySource, Slot};

type Callback<T> = Box<dyn FnOnce(Result<&T, &Error>)>;
type Taker<T> = Box<dyn FnOnce(Result<T>)>;

/// Who waits on a pending promise; allocated on the first subscription, so
/// a promise nobody subscribes to (the common case in a map) stays small.
struct Waiting<T> {
    callbacks: Vec<Callback<T>>,
    /// At most one subscriber that moves the value out once callbacks ran.
    taker: Option<Taker<T>>,
}

enum State<T> {
    Pending(Option<Box<Waiting<T>>>),
    /// The error is boxed: a pending promise stays small (a map holds
    /// one per command), and errors are rare.
    Settled(Result<T, Box<Error>>),
    /// Resolved, and the value moved out with [`Promise::take`].
    Taken,
}

impl<T> State<T> {
    /// The subscriber list of a pending promise, made on first use; `None`
    /// once settled.
    fn waiting(&mut self) -> Option<&mut Waiting<T>> {
        match self {
            State::Pending(waiting) => Some(waiting.get_or_insert_with(|| {
                Box::new(Waiting {
                    callbacks: Vec::new(),
                    taker: None,
                })
            })),
            _ => None,
        }
    }
}

/// A value (or an error) that arrives later.
///
/// ```
/// use rb::Promise;
/// let p = Promise::new();
/// let doubled = p.then(|v: &i64| v * 2);
/// assert!(doubled.is_pending());
/// p.resolve(21);
/// assert_eq!(doubled.value().unwrap(), 42);
/// ```
pub struct Promise<T> {
    block: Rc<Block<T>>,
    index: u32,
}

impl<T> Clone for Promise<T> {
    /// Another handle to the same promise.
    fn clone(&self) -> Promise<T> {
        self.block.retain(self.index);
        Promise {
            block: self.block.clone(),
            index: self.index,
        }
    }
}

impl<T> Drop for Promise<T> {
    fn drop(&mut self) {
        self.block.release(self.index);
    }
}

impl<T: 'static> Default for Promise<T> {
    fn default() -> Self {
        Promise::new()
    }
}

impl<T> fmt::Debug for Promise<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state().try_borrow().as_deref() {
            Ok(State::Pending(_)) => "pending",
            Ok(State::Settled(Ok(_)) | State::Taken) => "resolved",
            Ok(State::Settled(Err(_))) => "rejected",
            Err(_) => "settling",
        };
        write!(f, "Promise({state})")
    }
}

fn pending_error() -> Error {
    Error::Pending {
        reason: "the promise is still pending".into(),
    }
}

/// A settled result as callbacks see it.
fn view<T>(result: &Result<T, Box<Error>>) -> Result<&T, &Error> {
    match result {
        Ok(v) => Ok(v),
        Err(e) => Err(e),
    }
}

fn taken_error() -> Error {
    Error::Pending {
        reason: "the promise's value was already taken".into(),
    }
}

impl<T: 'static> Promise<T> {
    fn placed(state: State<T>) -> Promise<T> {
        let (block, index) = block::place(state);
        Promise { block, index }
    }

    /// A pending promise.
    #[must_use]
    pub fn new() -> Promise<T> {
        Promise::placed(State::Pending(None))
    }

    /// A promise already resolved with `value`.
    #[must_use]
    pub fn resolved(value: T) -> Promise<T> {
        Promise::placed(State::Settled(Ok(value)))
    }

    /// A promise already rejected with `error`.
    #[must_use]
    pub fn rejected(error: Error) -> Promise<T> {
        Promise::placed(State::Settled(Err(Box::new(error))))
    }
}

impl<T> Promise<T> {
    /// This promise's entry in the table.
    fn state(&self) -> &RefCell<State<T>> {
        &self.block.entry(self.index).state
    }

    /// Still waiting.
    pub fn is_pending(&self) -> bool {
        matches!(self.state().try_borrow().as_deref(), Ok(State::Pending(_)))
    }

    /// Settled with a value.
    pub fn is_resolved(&self) -> bool {
        matches!(
            self.state().try_borrow().as_deref(),
            Ok(State::Settled(Ok(_)) | State::Taken)
        )
    }

    /// Settled with an error.
    pub fn is_rejected(&self) -> bool {
        matches!(
            self.state().try_borrow().as_deref(),
            Ok(State::Settled(Err(_)))
        )
    }

    /// The error, if rejected.
    pub fn reason(&self) -> Option<Error> {
        match self.state().try_borrow().as_deref() {
            Ok(State::Settled(Err(e))) => Some((**e).clone()),
            _ => None,
        }
    }

    /// Settles with a value. A promise settles once: later calls are ignored.
    pub fn resolve(&self, value: T) {
        self.settle(Ok(value))
    }

    /// Settles with an error. A promise settles once: later calls are ignored.
    pub fn reject(&self, error: Error) {
        self.settle(Err(error))
    }

    /// Settles with a result and runs the callbacks waiting on it, in order.
    pub fn settle(&self, result: Result<T>) {
        settle_cell(self.state(), result)
    }

    /// Moves the value out (errors are cloned). Later `value()`/`take()`
    /// calls on a taken promise are errors.
    ///
    /// # Errors
    ///
    /// The promise's own error if it was rejected; [`Error::Pending`] if it
    /// is still pending or its value was already taken.
    pub fn take(&self) -> Result<T> {
        take_cell(self.state())
    }

    /// Runs `callback` with the result once settled (at once if it is).
    fn on_settle(&self, callback: impl FnOnce(Result<&T, &Error>) + 'static) {
        if let Ok(mut state) = self.state().try_borrow_mut() {
            if let Some(waiting) = state.waiting() {
                waiting.callbacks.push(Box::new(callback));
                return;
            }
        }
        match self.state().try_borrow().as_deref() {
            Ok(State::Settled(result)) => callback(view(result)),
            _ => callback(Err(&taken_error())),
        }
    }

    /// Moves the result into `taker` once settled (at once if it is). Only
    /// for promises nobody else reads: the value leaves this promise.
    fn on_take(&self, taker: impl FnOnce(Result<T>) + 'static) {
        if let Ok(mut state) = self.state().try_borrow_mut() {
            if let Some(waiting) = state.waiting() {
                if waiting.taker.is_none() {
                    waiting.taker = Some(Box::new(taker));
                    return;
                }
            }
        }
        taker(self.take())
    }

    /// A promise of `f(value)`; errors pass through.
    #[must_use = "it returns a new promise and leaves this one as it is; for a callback run only for its effect, use `done`"]
    pub fn then<U: 'static>(&self, f: impl FnOnce(&T) -> U + 'static) -> Promise<U>
    where
        T: 'static,
    {
        self.and_then(move |v| Ok(f(v)))
    }

    /// A promise of `f(value)` where `f` may fail; errors pass through.
    #[must_use = "it returns a new promise and leaves this one as it is; for a callback run only for its effect, use `done`"]
    pub fn and_then<U: 'static>(&self, f: impl FnOnce(&T) -> Result<U> + 'static) -> Promise<U>
    where
        T: 'static,
    {
        let next = Promise::new();
        let out = next.clone();
        self.on_settle(move |result| {
            out.settle(match result {
                Ok(v) => f(v),
                Err(e) => Err(e.clone()),
            })
        });
        next
    }

    /// A promise of `f(value)` that takes the value by move. Internal: the
    /// source promise is left taken.
    pub(crate) fn map_owned<U: 'static>(
        &self,
        f: impl FnOnce(T) -> Result<U> + 'static,
    ) -> Promise<U>
    where
        T: 'static,
    {
        let next = Promise::new();
        let out = next.clone();
        self.on_take(move |result| out.settle(result.and_then(f)));
        next
    }

    /// Moves the settled result into `f` (the value leaves this promise).
    pub(crate) fn on_result(&self, f: impl FnOnce(Result<T>) + 'static) {
        self.on_take(f)
    }

    /// Calls `on_ok` or `on_err` once settled (rb's `done`).
    pub fn done(&self, on_ok: impl FnOnce(&T) + 'static, on_err: impl FnOnce(&Error) + 'static)
    where
        T: 'static,
    {
        self.on_settle(move |result| match result {
            Ok(v) => on_ok(v),
            Err(e) => on_err(e),
        })
    }
}

impl<T: Clone> Promise<T> {
    /// A clone of the value; the error if rejected; an error if still pending.
    ///
    /// # Errors
    ///
    /// The promise's own error if it was rejected; [`Error::Pending`] if it
    /// is still pending or its value was taken.
    pub fn value(&self) -> Result<T> {
        match self.state().try_borrow().as_deref() {
            Ok(State::Settled(Ok(v))) => Ok(v.clone()),
            Ok(State::Settled(Err(e))) => Err((**e).clone()),
            Ok(State::Pending(_)) => Err(pending_error()),
            Ok(State::Taken) => Err(taken_error()),
            Err(_) => Err(pending_error()),
        }
    }
}

fn settle_cell<T>(cell: &RefCell<State<T>>, result: Result<T>) {
    let waiting = {
        // A promise being settled right now is borrowed by its callbacks:
        // it is settled already, so there is nothing to do.
        let Ok(mut state) = cell.try_borrow_mut() else {
            return;
        };
        if !matches!(&*state, State::Pending(_)) {
            return;
        }
        match std::mem::replace(&mut *state, State::Settled(result.map_err(Box::new))) {
            State::Pending(waiting) => waiting,
            _ => None,
        }
    };
    let Some(waiting) = waiting else {
        return;
    };
    let Waiting { callbacks, taker } = *waiting;
    if !callbacks.is_empty() {
        // Callbacks get a shared view; they may read this promise (and
        // subscribe to it) but not move its value out.
        let state = cell.borrow();
        if let State::Settled(result) = &*state {
            for callback in callbacks {
                callback(view(result));
            }
        }
    }
    if let Some(taker) = taker {
        taker(take_cell(cell));
    }
}

fn take_cell<T>(cell: &RefCell<State<T>>) -> Result<T> {
    let Ok(mut state) = cell.try_borrow_mut() else {
        return Err(Error::Pending {
            reason: "the promise is being settled; take its value after the callback".into(),
        });
    };
    match &*state {
        State::Pending(_) => return Err(pending_error()),
        State::Settled(Err(e)) => return Err((**e).clone()),
        State::Taken => return Err(taken_error()),
        State::Settled(Ok(_)) => {}
    }
    match std::mem::replace(&mut *state, State::Taken) {
        State::Settled(result) => result.map_err(|e| *e),
        _ => Err(pending_error()),
    }
}

/// Where a reply came from, for error messages, and where a session
/// records its first failure.
pub(crate) struct ReplyContext<'a> {
    /// The host that answered (none when the host id was unknown).
    pub(crate) host: Option<&'a HostName>,
    /// The command's name.
    pub(crate) command: &'a str,
    /// The session's first failure.
    pub(crate) failures: &'a RefCell<Option<Error>>,
    /// Where a migrating map's GETs that missed wait for their old owner
    /// (see [`Waiter::for_migrating_get`]); none outside a session.
    pub(crate) misses: Option<&'a RefCell<Vec<Miss>>>,
}

/// What a session's replies leave besides settled promises: the first
/// failure, and a migrating map's GETs that missed.
#[derive(Default)]
pub(crate) struct Outcomes {
    /// The first failure (shared with the client, whose join reports it).
    pub(crate) failures: std::rc::Rc<RefCell<Option<Error>>>,
    /// GETs whose nil is not final yet (see [`Waiter::for_migrating_get`]).
    pub(crate) misses: RefCell<Vec<Miss>>,
}

/// A migrating GET that missed: the host that answered nil (when known)
/// and a waiter for the GET's promise.
pub(crate) type Miss = (Option<crate::error::HostId>, Waiter);

thread_local! {
    /// The room of the last migrating session's miss list (a session is
    /// made per map: growing the list anew for each cost more than the
    /// misses' own work).
    static SPARE_MISSES: RefCell<Vec<Miss>> = const { RefCell::new(Vec::new()) };
}

impl Drop for Outcomes {
    fn drop(&mut self) {
        let mut misses = std::mem::take(self.misses.get_mut());
        if misses.capacity() == 0 {
            return;
        }
        misses.clear();
        // As much as a migrating map keeps for its other buffers.
        misses.shrink_to((1 << 20) / std::mem::size_of::<Miss>());
        // A thread's exit may find the spare gone: the list just goes.
        let _ = SPARE_MISSES.try_with(|spare| {
            if let Ok(mut spare) = spare.try_borrow_mut() {
                if spare.capacity() < misses.capacity() {
                    *spare = misses;
                }
            }
        });
    }
}

impl Outcomes {
    /// The context of a reply from `host` to `command`.
    pub(crate) fn context<'a>(
        &'a self,
        host: Option<&'a HostName>,
        command: &'a str,
    ) -> ReplyContext<'a> {
        ReplyContext {
            host,
            command,
            failures: &self.failures,
            misses: Some(&self.misses),
        }
    }

    /// Hands each GET that missed since the last call (each still holding
    /// its promise) to `f`; the list keeps its room for the next ones.
    pub(crate) fn drain_misses(&self, mut f: impl FnMut(Miss)) {
        if let Ok(mut misses) = self.misses.try_borrow_mut() {
            misses.drain(..).for_each(&mut f);
        }
    }
}

impl ReplyContext<'_> {
    /// Names host and command in `e`, and records it as a failure.
    pub(crate) fn failed(&self, e: Error) -> Error {
        let e = match self.host {
            Some(h) => e.with_context(h, self.command),
            None => e.with_context_command(self.command),
        };
        let mut first = self.failures.borrow_mut();
        if first.is_none() {
            *first = Some(e.clone());
        }
        e
    }
}

/// Takes replies (or failures) off the wire for the entries of one block:
/// the promise table seen from the event loop, which knows no types.
pub(crate) trait ReplySink {
    /// Settles entry `index` with the reply, converted.
    fn accept(&self, index: u32, reply: Result<Value>, ctx: &ReplyContext<'_>);

    /// Settles entry `index` with one reply shared by many (the `OK` of a
    /// merged `MSET`), cloning it only when the target type needs it.
    fn accept_shared(&self, index: u32, reply: &Value, ctx: &ReplyContext<'_>) {
        self.accept(index, Ok(reply.clone()), ctx)
    }

    /// Settles entry `index` with a plain bulk string (`None`: nil) read
    /// straight off the wire, converting without a [`Value`] where the
    /// target type can.
    fn accept_bulk(&self, index: u32, bytes: Option<&[u8]>, ctx: &ReplyContext<'_>) {
        self.accept(index, Ok(Value::from_bulk_bytes(bytes)), ctx)
    }

    /// The waiter for entry `index` is gone (each sink counts its own
    /// handles; one that forgot would keep values alive).
    fn release(&self, index: u32);

    /// One more waiter for entry `index` (a sink that counts handles
    /// counts it; [`ReplySink::release`] undoes it).
    fn retain(&self, _index: u32) {}

    /// The command this sink awaits the reply of, when it carries it (an
    /// async request's slot).
    fn command(&self) -> Option<&crate::cmd::Cmd> {
        None
    }

    /// Whether the reply is still awaited (an async reply settled by its
    /// deadline is not); the driver drops timers of settled replies.
    fn is_pending(&self) -> bool {
        true
    }

    /// Whether entry `index`'s reply may be dropped unconverted with no
    /// difference anyone could see: no promise handle besides the waiter's
    /// own, no callback, and a conversion that cannot fail (a failure
    /// would be the map's). A huge reply that may be is freed off the
    /// event loop's thread (freeing hundreds of megabytes takes tens of
    /// milliseconds).
    fn may_discard(&self, _index: u32) -> bool {
        false
    }
}

impl<T: FromValue + 'static> ReplySink for Block<T> {
    fn accept(&self, index: u32, reply: Result<Value>, ctx: &ReplyContext<'_>) {
        let result = reply.and_then(T::from_value).map_err(|e| ctx.failed(e));
        settle_cell(&self.entry(index).state, result)
    }

    fn accept_shared(&self, index: u32, reply: &Value, ctx: &ReplyContext<'_>) {
        match T::from_shared(reply) {
            Some(result) => {
                settle_cell(&self.entry(index).state, result.map_err(|e| ctx.failed(e)))
            }
            None => self.accept(index, Ok(reply.clone()), ctx),
        }
    }

    fn accept_bulk(&self, index: u32, bytes: Option<&[u8]>, ctx: &ReplyContext<'_>) {
        match T::from_bulk(bytes) {
            Some(result) => {
                settle_cell(&self.entry(index).state, result.map_err(|e| ctx.failed(e)))
            }
            None => self.accept(index, Ok(Value::from_bulk_bytes(bytes)), ctx),
        }
    }

    fn release(&self, index: u32) {
        Block::release(self, index)
    }

    fn retain(&self, index: u32) {
        Block::retain(self, index)
    }

    fn may_discard(&self, index: u32) -> bool {
        takes_any_bulk::<T>() && !self.is_watched(index)
    }
}

/// Whether every bulk string converts to `T` (the bytes as they are).
fn takes_any_bulk<T: 'static>() -> bool {
    use std::any::TypeId;
    let t = TypeId::of::<T>();
    t == TypeId::of::<Vec<u8>>()
        || t == TypeId::of::<Option<Vec<u8>>>()
        || t == TypeId::of::<Value>()
}

/// A request's claim on the promise (or async reply) its reply settles:
/// a handle queued with the request.
pub(crate) struct Waiter {
    sink: Sink,
    index: u32,
    /// A migrating map's GET: its place among the map's GET keys, plus
    /// one; 0 for every other request.
    miss_slot: u32,
}

/// Where a waiter's reply goes.
enum Sink {
    /// An entry of this thread's promise table (no allocation of its own).
    Local(Rc<dyn ReplySink>),
    /// An async reply, shared with the task awaiting it on another thread.
    Shared(std::sync::Arc<dyn ReplySink + Send + Sync>),
}

impl Waiter {
    /// A waiter handing replies to `sink`'s entry `index` (the sink's own
    /// handle counting is its business; see [`ReplySink::release`]).
    pub(crate) fn new(sink: Rc<dyn ReplySink>, index: u32) -> Waiter {
        Waiter {
            sink: Sink::Local(sink),
            index,
            miss_slot: 0,
        }
    }

    /// A waiter handing its reply to a thread-safe sink (an async reply).
    pub(crate) fn shared(sink: std::sync::Arc<dyn ReplySink + Send + Sync>) -> Waiter {
        Waiter {
            sink: Sink::Shared(sink),
            index: 0,
            miss_slot: 0,
        }
    }

    /// This waiter for a migrating map's GET, whose key the map keeps at
    /// `slot` (a place in its key bytes, below `u32::MAX`): a nil
    /// reply does not settle the promise but goes to the session's misses
    /// (the map then asks the key's old owner). A hit costs what a plain
    /// map's GET does: the migrating map needs no record of it.
    pub(crate) fn for_migrating_get(mut self, slot: u32) -> Waiter {
        self.miss_slot = slot.saturating_add(1);
        self
    }

    /// The slot given to [`Waiter::for_migrating_get`], taken off: the
    /// waiter's next reply settles its promise, nil or not.
    pub(crate) fn take_miss_slot(&mut self) -> Option<u32> {
        let slot = std::mem::take(&mut self.miss_slot);
        slot.checked_sub(1)
    }

    /// For a migrating GET's nil: a second waiter for the same promise
    /// goes to the session's misses. Whether it did (else the nil settles
    /// the promise as usual).
    #[cold]
    fn keep_miss(&self, ctx: &ReplyContext<'_>) -> bool {
        let (Sink::Local(sink), Some(misses)) = (&self.sink, ctx.misses) else {
            return false;
        };
        let Ok(mut misses) = misses.try_borrow_mut() else {
            return false;
        };
        if misses.capacity() == 0 {
            // The first miss of this session: the last one's room.
            let spare =
                SPARE_MISSES.try_with(|s| s.try_borrow_mut().map(|mut s| std::mem::take(&mut *s)));
            if let Ok(Ok(spare)) = spare {
                *misses = spare;
            }
        }
        sink.retain(self.index);
        let waiter = Waiter {
            sink: Sink::Local(sink.clone()),
            index: self.index,
            miss_slot: self.miss_slot,
        };
        misses.push((ctx.host.map(|h| h.id), waiter));
        true
    }

    #[inline]
    fn sink(&self) -> &dyn ReplySink {
        match &self.sink {
            Sink::Local(s) => &**s,
            Sink::Shared(s) => &**s,
        }
    }

    /// Settles the promise with the reply, converted.
    pub(crate) fn accept(&self, reply: Result<Value>, ctx: &ReplyContext<'_>) {
        if self.miss_slot != 0 && matches!(reply, Ok(Value::Nil)) && self.keep_miss(ctx) {
            return;
        }
        self.sink().accept(self.index, reply, ctx)
    }

    /// Settles the promise with a plain bulk string (`None`: nil).
    #[inline]
    pub(crate) fn accept_bulk(&self, bytes: Option<&[u8]>, ctx: &ReplyContext<'_>) {
        if self.miss_slot != 0 && bytes.is_none() && self.keep_miss(ctx) {
            return;
        }
        self.sink().accept_bulk(self.index, bytes, ctx)
    }

    /// Settles the promise with a reply shared by many.
    pub(crate) fn accept_shared(&self, reply: &Value, ctx: &ReplyContext<'_>) {
        self.sink().accept_shared(self.index, reply, ctx)
    }

    /// Whether the reply may be dropped unconverted (see
    /// [`ReplySink::may_discard`]); an async reply may once no other handle
    /// to its slot lives (its conversion's failure would reach nobody).
    pub(crate) fn may_discard(&self) -> bool {
        match &self.sink {
            Sink::Local(s) => s.may_discard(self.index),
            Sink::Shared(s) => std::sync::Arc::strong_count(s) == 1,
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.sink().release(self.index)
    }
}

impl<T: FromValue + 'static> Promise<T> {
    /// This promise as the receiver of a reply.
    pub(crate) fn sink(&self) -> Waiter {
        self.block.retain(self.index);
        Waiter::new(self.block.clone(), self.index)
    }
}

/// Collects results into slots and settles `out` when the last arrives.
struct Joiner<T> {
    slots: Vec<Option<T>>,
    missing: usize,
}

fn deliver<T: 'static>(
    joiner: &Rc<RefCell<Joiner<T>>>,
    out: &Promise<Vec<T>>,
    i: usize,
    result: Result<T>,
) {
    match result {
        Err(e) => out.reject(e),
        Ok(v) => {
            let done = {
                let mut j = joiner.borrow_mut();
                if let Some(slot) = j.slots.get_mut(i) {
                    if slot.replace(v).is_none() {
                        j.missing -= 1;
                    }
                }
                j.missing == 0
            };
            if done {
                let values = std::mem::take(&mut joiner.borrow_mut().slots);
                out.resolve(values.into_iter().flatten().collect());
            }
        }
    }
}

fn join<T: 'static>(
    count: usize,
    subscribe: impl Fn(usize, Box<dyn FnOnce(Result<T>)>),
) -> Promise<Vec<T>> {
    let out = Promise::new();
    if count == 0 {
        out.resolve(Vec::new());
        return out;
    }
    let joiner = Rc::new(RefCell::new(Joiner {
        slots: (0..count).map(|_| None).collect(),
        missing: count,
    }));
    for i in 0..count {
        let joiner = joiner.clone();
        let out2 = out.clone();
        subscribe(
            i,
            Box::new(move |result| deliver(&joiner, &out2, i, result)),
        );
    }
    out
}

impl<T: Clone + 'static> Promise<T> {
    /// Resolves with every value, in order, once all resolve; rejects with
    /// the first rejection. The given promises keep their values.
    #[must_use]
    pub fn all(promises: Vec<Promise<T>>) -> Promise<Vec<T>> {
        join(promises.len(), |i, deliver| {
            promises[i].on_settle(move |result| deliver(result.cloned().map_err(Clone::clone)))
        })
    }

    /// Like [`Promise::all`] for a map of promises.
    #[must_use]
    pub fn all_map<K: Eq + Hash + 'static>(
        promises: HashMap<K, Promise<T>>,
    ) -> Promise<HashMap<K, T>> {
        let (keys, values): (Vec<K>, Vec<Promise<T>>) = promises.into_iter().unzip();
        Promise::all(values).map_owned(move |values| Ok(keys.into_iter().zip(values).collect()))
    }
}

impl<T: 'static> Promise<T> {
    /// [`Promise::all`] for internal promises nobody else holds: values are
    /// moved, so `T` need not be `Clone`.
    pub(crate) fn all_owned(promises: Vec<Promise<T>>) -> Promise<Vec<T>> {
        join(promises.len(), |i, deliver| promises[i].on_take(deliver))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_reply_may_be_discarded_only_unseen_and_unfailing() {
        let p: Promise<Value> = Promise::new();
        let waiter = p.sink();
        assert!(!waiter.may_discard());
        drop(p);
        assert!(waiter.may_discard(), "only the waiter is left");

        let q: Promise<Value> = Promise::new();
        let waiter = q.sink();
        q.done(|_| {}, |_| {});
        drop(q);
        assert!(!waiter.may_discard(), "a callback waits for it");

        // Found by review: a conversion that can fail is the map's failure
        // (an i64 from a bulk, a String from bytes that are not UTF-8).
        let n: Promise<i64> = Promise::new();
        let waiter = n.sink();
        drop(n);
        assert!(!waiter.may_discard(), "its conversion may fail");
        let v: Promise<Option<Vec<u8>>> = Promise::new();
        let waiter = v.sink();
        drop(v);
        assert!(waiter.may_discard());
    }

    use super::*;
    use std::cell::Cell;

    fn err() -> Error {
        Error::protocol("boom")
    }

    #[test]
    fn lifecycle() {
        let p: Promise<i32> = Promise::new();
        assert!(p.is_pending() && !p.is_resolved() && !p.is_rejected());
        assert!(p.value().is_err());
        p.resolve(1);
        p.resolve(2);
        p.reject(err());
        assert!(p.is_resolved());
        assert_eq!(p.value().unwrap(), 1);
        assert_eq!(p.take().unwrap(), 1);
        assert!(p.is_resolved());
        assert!(p.take().is_err());

        let r: Promise<i32> = Promise::rejected(err());
        assert!(r.is_rejected());
        assert!(r.reason().unwrap().to_string().contains("boom"));
        assert!(Promise::resolved(3).is_resolved());
    }

    #[test]
    fn callbacks_run_in_order_once() {
        let p: Promise<i32> = Promise::new();
        let log = Rc::new(RefCell::new(Vec::new()));
        for i in 0..3 {
            let log = log.clone();
            p.done(
                move |v| log.borrow_mut().push((i, *v)),
                |_| panic!("not rejected"),
            );
        }
        let chained = p.then(|v| v + 1).then(|v| v * 10);
        p.resolve(4);
        assert_eq!(*log.borrow(), vec![(0, 4), (1, 4), (2, 4)]);
        assert_eq!(chained.value().unwrap(), 50);
        // Subscribing after settlement runs at once.
        let late = Rc::new(Cell::new(0));
        let l = late.clone();
        p.done(move |v| l.set(*v), |_| {});
        assert_eq!(late.get(), 4);
    }

    #[test]
    fn errors_pass_through_then() {
        let p: Promise<i32> = Promise::new();
        let seen = Rc::new(Cell::new(false));
        let s = seen.clone();
        let chained = p.then(|v| v + 1);
        chained.done(|_| panic!("not resolved"), move |_| s.set(true));
        p.reject(err());
        assert!(chained.is_rejected());
        assert!(seen.get());
        let failing = Promise::resolved(1).and_then(|_| Err::<i32, _>(err()));
        assert!(failing.is_rejected());
    }

    #[test]
    fn callbacks_may_touch_their_promise() {
        let p: Promise<i32> = Promise::new();
        let q = p.clone();
        let seen = Rc::new(Cell::new(0));
        let s = seen.clone();
        p.done(
            move |_| {
                q.resolve(99); // ignored, no panic
                let s2 = s.clone();
                q.done(move |v| s2.set(*v), |_| {});
                assert!(q.take().is_err());
            },
            |_| {},
        );
        p.resolve(7);
        assert_eq!(seen.get(), 7);
        assert_eq!(p.value().unwrap(), 7);
    }

    #[test]
    fn all_and_all_map() {
        let ps: Vec<Promise<i32>> = (0..3).map(|_| Promise::new()).collect();
        let all = Promise::all(ps.clone());
        ps[2].resolve(2);
        ps[0].resolve(0);
        assert!(all.is_pending());
        ps[1].resolve(1);
        assert_eq!(all.value().unwrap(), vec![0, 1, 2]);
        assert_eq!(ps[1].value().unwrap(), 1, "sub-promises keep their values");

        let ps: Vec<Promise<i32>> = (0..3).map(|_| Promise::new()).collect();
        let all = Promise::all(ps.clone());
        ps[1].reject(err());
        assert!(all.is_rejected());
        ps[0].resolve(0);
        ps[2].resolve(0);
        assert!(all.is_rejected());

        assert_eq!(
            Promise::<i32>::all(vec![]).value().unwrap(),
            Vec::<i32>::new()
        );

        let mut m = HashMap::new();
        m.insert("a", Promise::resolved(1));
        m.insert("b", Promise::new());
        let b = m["b"].clone();
        let joined = Promise::all_map(m);
        b.resolve(2);
        let got = joined.value().unwrap();
        assert_eq!((got["a"], got["b"]), (1, 2));
    }

    #[test]
    fn a_value_lives_as_long_as_its_promise_handles() {
        let value = Rc::new(());
        let p = Promise::resolved(value.clone());
        // Neighbours in the same block keep their own values only.
        let neighbours: Vec<Promise<Rc<()>>> = (0..100).map(|_| Promise::new()).collect();
        let waiter = p.clone();
        drop(p);
        assert_eq!(Rc::strong_count(&value), 2, "a handle is left");
        drop(waiter);
        assert_eq!(Rc::strong_count(&value), 1, "dropped with the last handle");
        assert!(neighbours.iter().all(Promise::is_pending));
    }

    /// A session's miss list gives its room to the next session on the
    /// thread, and its waiters' handles go with it (a map dropped before
    /// its misses were asked of the old owners leaks nothing).
    #[test]
    fn a_miss_list_is_reused_and_lets_its_promises_go() {
        let first = Outcomes::default();
        let promises: Vec<Promise<Value>> = (0..100).map(|_| Promise::new()).collect();
        for (slot, p) in promises.iter().enumerate() {
            let waiter = p.sink().for_migrating_get(slot as u32);
            waiter.accept_bulk(None, &first.context(None, "GET"));
        }
        assert_eq!(first.misses.borrow().len(), 100);
        assert!(promises.iter().all(Promise::is_pending));
        assert!(promises.iter().all(|p| p.block.is_watched(p.index)));
        drop(first);
        assert!(
            promises.iter().all(|p| !p.block.is_watched(p.index)),
            "only the caller's handle is left"
        );
        let next = Outcomes::default();
        let p: Promise<Value> = Promise::new();
        p.sink()
            .for_migrating_get(0)
            .accept(Ok(Value::Nil), &next.context(None, "GET"));
        assert!(next.misses.borrow().capacity() >= 100, "the room is reused");
    }

    #[test]
    fn all_owned_moves_values() {
        struct NoClone(i32);
        let ps: Vec<Promise<NoClone>> = (0..2).map(|_| Promise::new()).collect();
        let all = Promise::all_owned(ps.clone());
        ps[0].resolve(NoClone(1));
        ps[1].resolve(NoClone(2));
        let v = all.take().unwrap();
        assert_eq!(v.iter().map(|n| n.0).collect::<Vec<_>>(), vec![1, 2]);
    }
}
