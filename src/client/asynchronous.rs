//! [`AsyncClient`]: the cluster's commands as [`Reply`] futures, for async
//! code on any runtime and for many threads sharing one client.
//!
//! Every request goes to the cluster's driver thread (see DESIGN.md, "The
//! driver"), which keeps one multiplexed connection per host and merges
//! GETs (SETs) queued by different callers at the same time into MGET
//! (MSET). Nothing blocks the caller: a slow or stopped node delays only
//! the replies that wait on it, each up to its deadline.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::args::ToArg;
use crate::cluster::{Cluster, Hosts};
use crate::cmd::{cmd, Call, Cmd, ScriptCall};
use crate::convert::FromValue;
use crate::driver::{Driver, DriverQueue, Request};
use crate::error::{Error, HostId, Result};
use crate::multikey::{self, MultiKey};
use crate::pipeline::{blocks, ConnEffect};
use crate::promise::{KeepAlive, Reply, Slot};
use crate::resp::Value;
use crate::scripts::is_noscript;

use super::{script_host, Execute};

/// Options of an [`AsyncClient`].
///
/// ```
/// use rb::AsyncOptions;
/// use std::time::Duration;
/// let opts = AsyncOptions::new().timeout(Duration::from_millis(50)).auto_batch(true);
/// ```
#[derive(Clone, Debug)]
pub struct AsyncOptions {
    timeout: Option<Duration>,
    auto_batch: bool,
    spin: Duration,
}

/// [`AsyncOptions::spin`]'s default: a loopback round trip and then some.
const DEFAULT_SPIN: Duration = Duration::from_micros(100);

impl Default for AsyncOptions {
    fn default() -> AsyncOptions {
        AsyncOptions {
            timeout: None,
            auto_batch: true,
            spin: DEFAULT_SPIN,
        }
    }
}

impl AsyncOptions {
    /// No timeout of its own (each request then has its host's read
    /// timeout, if any), auto-batching on, spinning for up to 100 µs.
    #[must_use]
    pub fn new() -> AsyncOptions {
        AsyncOptions::default()
    }

    /// Each request's deadline, from when it is made: past it, its reply
    /// fails with [`Error::Timeout`] (the connection is kept, the late
    /// reply dropped). Default: the host's read timeout.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> AsyncOptions {
        self.timeout = Some(timeout);
        self
    }

    /// Merge GETs (SETs) queued at the same time, by any caller, into MGET
    /// (MSET). Default true.
    #[must_use]
    pub fn auto_batch(mut self, on: bool) -> AsyncOptions {
        self.auto_batch = on;
        self
    }

    /// How long a lone caller's pending [`Reply`] spins, watching for its
    /// answer on the polling thread, before the task sleeps until the
    /// driver wakes it. Default 100 µs; `Duration::ZERO` turns it off.
    ///
    /// Waking a sleeping thread costs about as much as a loopback round
    /// trip (tens of microseconds on a busy or virtual machine), so a
    /// caller waiting alone on a nearby host gets its answer sooner by not
    /// sleeping: a single task's GET on loopback then takes about what the
    /// sync [`RoutingClient`](crate::RoutingClient) takes. A reply spins
    /// only when the driver has had at most one request in flight lately
    /// (the last 10 ms) and no other reply is spinning, so a runtime with
    /// many tasks waiting, or many threads, never spins; and a thread
    /// whose spins keep running out (a distant host) spins for one reply
    /// in 64. The spin holds the polling thread (a runtime worker) for at
    /// most this long, and after 32 replies in a row caught by spinning
    /// the next one sleeps, so the task yields to its runtime.
    #[must_use]
    pub fn spin(mut self, window: Duration) -> AsyncOptions {
        self.spin = window;
        self
    }
}

/// The async client: every command answers with a [`Reply<T>`], a
/// `Future + Send + 'static` that any runtime can await (or
/// [`Reply::wait`] blocks on, without one).
///
/// `Clone + Send + Sync + 'static`: keep one in your application state and
/// share it between tasks and threads. Commands are routed by key as on
/// the routing client; multi-key MGET/MSET/DEL/... are split per host and
/// joined in the caller's order. Commands that change connection state
/// (SELECT, MULTI, WATCH, CLIENT TRACKING, ...) or block it (BLPOP,
/// XREAD BLOCK, WAIT, ...) would disturb everyone sharing the connection,
/// and are refused with [`Error::Unsupported`].
///
/// ```no_run
/// use rb::{Cluster, Commands};
/// # async fn demo() -> rb::Result<()> {
/// let cluster = Cluster::from_urls(["redis://127.0.0.1:6379", "redis://127.0.0.1:6380"])?;
/// let client = cluster.async_client();
/// client.set("key", 42).await?;
/// let v: Option<Vec<u8>> = client.get("key").await?;
/// let n: i64 = client.cmd(rb::cmd("INCR").arg("c")).await?;
/// let all = client.mget(&["a", "b", "c"]).await?;      // split per host, in order
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct AsyncClient {
    cluster: Cluster,
    driver: std::result::Result<DriverRef, Error>,
    opts: AsyncOptions,
    /// The old cluster's async client, while the cluster is migrating.
    previous: Option<Box<AsyncClient>>,
}

/// How a client reaches its driver.
#[derive(Clone)]
enum DriverRef {
    /// A caller's client: it keeps the driver running.
    Owned(Arc<Driver>),
    /// A client inside a task on the driver thread (see
    /// [`AsyncClient::run_to_end`]): it does not keep the driver running
    /// (a stopping driver runs its tasks for as long as it flushes, then
    /// drops them), and its replies never spin (they are awaited on the
    /// driver thread).
    InTask(DriverQueue),
}

/// A client's way to its driver, for one request: where requests go, and
/// (a caller's client) the driver its replies keep running.
pub(super) struct DriverUse<'a> {
    pub(super) queue: &'a DriverQueue,
    owner: Option<&'a Arc<Driver>>,
}

impl DriverUse<'_> {
    /// What a reply holds on to: the driver (a caller's reply keeps it
    /// running and may spin), or, in a task, nothing.
    pub(super) fn keep_alive(&self) -> KeepAlive {
        match self.owner {
            Some(d) => Arc::clone(d) as KeepAlive,
            None => Arc::new(()),
        }
    }
}

impl std::fmt::Debug for AsyncClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncClient")
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

impl AsyncClient {
    pub(crate) fn new(
        cluster: Cluster,
        driver: std::result::Result<Arc<Driver>, Error>,
        opts: AsyncOptions,
    ) -> AsyncClient {
        let previous = cluster
            .migrating_from()
            .map(|old| Box::new(old.async_client_with(opts.clone())));
        AsyncClient {
            cluster,
            driver: driver.map(DriverRef::Owned),
            opts,
            previous,
        }
    }

    /// This client as a task on the driver thread holds it (see
    /// [`DriverRef::InTask`]), the old cluster's client too.
    pub(super) fn for_task(&self) -> AsyncClient {
        AsyncClient {
            cluster: self.cluster.clone(),
            driver: self.driver.clone().map(|d| match d {
                DriverRef::Owned(d) => DriverRef::InTask(d.queue().clone()),
                queue @ DriverRef::InTask(_) => queue,
            }),
            opts: self.opts.clone(),
            previous: self.previous.as_ref().map(|p| Box::new(p.for_task())),
        }
    }

    /// The old cluster's client, while migrating.
    pub(super) fn previous(&self) -> Option<&AsyncClient> {
        self.previous.as_deref()
    }

    /// The cluster this client sends through.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// A fanout: each command through the returned handle goes to every
    /// host of `hosts`, and answers with the replies by host id.
    ///
    /// ```no_run
    /// use rb::{Cluster, Commands, Hosts};
    /// # async fn demo(cluster: Cluster) -> rb::Result<()> {
    /// let client = cluster.async_client();
    /// let sizes = client.fanout(Hosts::All).cmd::<i64>(rb::cmd("DBSIZE")).await?;
    /// # Ok(()) }
    /// ```
    pub fn fanout(&self, hosts: Hosts) -> AsyncFanout {
        let targets = match hosts {
            Hosts::All => Ok(self.cluster.host_ids()),
            Hosts::Ids(ids) => ids
                .iter()
                .try_for_each(|&id| self.cluster.host(id).map(|_| ()))
                .map(|()| ids),
        };
        AsyncFanout {
            client: self.clone(),
            targets,
        }
    }

    /// Runs lists of commands and script calls, each list in order on the
    /// host that owns its key (rb's `execute_commands`, as on
    /// [`Cluster::execute_commands`]): a reply of every call's outcome by
    /// key, in each list's order.
    ///
    /// # Errors
    ///
    /// The reply fails at once when a key cannot be routed (nothing is
    /// sent then); each call's own failure is in its place in the lists.
    pub fn execute_commands<K, I>(&self, mapping: I) -> Reply<HashMap<K, Vec<Result<Value>>>>
    where
        I: IntoIterator<Item = (K, Vec<Call>)>,
        K: ToArg + Eq + std::hash::Hash + Send + 'static,
    {
        if self.previous.is_some() {
            return self.migrating_commands(mapping);
        }
        let router = match self.cluster.router() {
            Ok(r) => r,
            Err(e) => return Reply::ready(Err(e)),
        };
        let mut entries = Vec::new();
        let mut last_call: HashMap<Vec<u8>, (usize, usize)> = HashMap::new();
        for (e, (key, calls)) in mapping.into_iter().enumerate() {
            let key_bytes = crate::args::to_bytes(&key);
            let host = match router.host_for_key(&key_bytes) {
                Ok(h) => h,
                Err(err) => return Reply::ready(Err(err)),
            };
            if !calls.is_empty() {
                last_call.insert(key_bytes, (e, calls.len() - 1));
            }
            entries.push((key, host, calls));
        }
        let mut keys = Vec::with_capacity(entries.len());
        let mut parts: Vec<Reply<Value>> = Vec::new();
        for (e, (key, host, calls)) in entries.into_iter().enumerate() {
            let last = last_call.get(&crate::args::to_bytes(&key)).copied();
            keys.push((key, calls.len()));
            for (c, call) in calls.into_iter().enumerate() {
                parts.push(match call {
                    Call::Cmd(cmd) => self.send_checked(host, cmd),
                    // Calls after it depend on it running now: load it
                    // ahead whatever the cluster remembers.
                    Call::Script(sc) if last != Some((e, c)) => self.load_and_call(host, &sc),
                    Call::Script(sc) => self.script(host, sc),
                });
            }
        }
        Reply::join_results(parts, move |outcomes| {
            let mut outcomes = outcomes.into_iter();
            let mut out: HashMap<K, Vec<Result<Value>>> = HashMap::new();
            for (key, n) in keys {
                out.entry(key)
                    .or_default()
                    .extend(outcomes.by_ref().take(n));
            }
            Ok(out)
        })
    }

    /// How long a pending reply spins before it sleeps.
    pub(super) fn spin(&self) -> Duration {
        self.opts.spin
    }

    /// The driver, or the error that kept it from starting.
    pub(super) fn driver(&self) -> Result<DriverUse<'_>> {
        match &self.driver {
            Ok(DriverRef::Owned(d)) => Ok(DriverUse {
                queue: d.queue(),
                owner: Some(d),
            }),
            Ok(DriverRef::InTask(queue)) => Ok(DriverUse { queue, owner: None }),
            Err(e) => Err(e.clone()),
        }
    }

    /// A request's budget: the client's timeout, else the host's read timeout.
    fn budget(&self, host: HostId) -> Option<Duration> {
        self.opts.timeout.or_else(|| {
            self.cluster
                .with_routes(|r| r.read_timeouts.get(&host).copied().flatten())
                .ok()
                .flatten()
        })
    }

    /// [`AsyncClient::budget`] from routes already at hand.
    fn budget_in(&self, routes: &crate::cluster::Routes, host: HostId) -> Option<Duration> {
        self.opts
            .timeout
            .or_else(|| routes.read_timeouts.get(&host).copied().flatten())
    }

    pub(super) fn request<T: FromValue + 'static>(
        &self,
        host: HostId,
        cmd: Cmd,
    ) -> (Request, Arc<Slot<T>>) {
        self.request_within(host, cmd, self.budget(host))
    }

    /// A request with its budget given.
    fn request_within<T: FromValue + 'static>(
        &self,
        host: HostId,
        cmd: Cmd,
        budget: Option<Duration>,
    ) -> (Request, Arc<Slot<T>>) {
        let slot = Slot::<T>::for_command(cmd);
        let request = Request {
            host,
            sink: slot.clone(),
            budget,
            deadline: budget.and_then(|b| Instant::now().checked_add(b)),
            auto_batch: self.opts.auto_batch,
        };
        (request, slot)
    }

    /// Sends `cmd` to `host` as it is.
    pub(super) fn send<T: FromValue + 'static>(&self, host: HostId, cmd: Cmd) -> Reply<T> {
        self.send_within(host, cmd, self.budget(host))
    }

    /// [`AsyncClient::send`] with the request's budget given.
    fn send_within<T: FromValue + 'static>(
        &self,
        host: HostId,
        cmd: Cmd,
        budget: Option<Duration>,
    ) -> Reply<T> {
        let driver = match self.driver() {
            Ok(d) => d,
            Err(e) => return Reply::ready(Err(e)),
        };
        let (request, slot) = self.request_within(host, cmd, budget);
        driver.queue.submit(request);
        Reply::from_slot(slot, driver.keep_alive(), self.opts.spin)
    }

    /// The reply of `future` (of several requests), run on the driver
    /// thread to its end whether or not the reply is awaited.
    pub(super) fn run_to_end<V: Send + 'static>(
        &self,
        future: impl std::future::Future<Output = Result<V>> + Send + 'static,
    ) -> Reply<V> {
        let driver = match self.driver() {
            Ok(d) => d,
            Err(e) => return Reply::ready(Err(e)),
        };
        Reply::from_task(
            future,
            |task| driver.queue.spawn(task),
            driver.keep_alive(),
            self.opts.spin,
        )
    }

    /// Sends `cmd` to `host` unless it cannot share a connection.
    pub(super) fn send_checked<T: FromValue + 'static>(&self, host: HostId, cmd: Cmd) -> Reply<T> {
        match refuse_on_shared(&cmd) {
            Err(e) => Reply::ready(Err(e)),
            Ok(()) => self.send(host, cmd),
        }
    }

    /// `SCRIPT LOAD` then `EVALSHA`, queued together; a script that fails
    /// to load (a Lua syntax error) answers with that failure.
    pub(super) fn load_and_call<T: FromValue + 'static>(
        &self,
        host: HostId,
        call: &ScriptCall,
    ) -> Reply<T> {
        let driver = match self.driver() {
            Ok(d) => d,
            Err(e) => return Reply::ready(Err(e)),
        };
        let load = cmd("SCRIPT").arg("LOAD").arg(call.script.source());
        let (load, loaded) = self.request::<String>(host, load);
        let (eval, result) = self.request::<T>(host, call.evalsha());
        driver.queue.submit_all([load, eval]);
        let keep = driver.keep_alive();
        let (loaded, result) = (
            Reply::from_slot(loaded, keep.clone(), self.opts.spin),
            Reply::from_slot(result, keep, self.opts.spin),
        );
        let memory = self.cluster.script_memory();
        let sha = call.script.sha1().to_owned();
        Reply::from_future(async move {
            let loaded = loaded.await;
            let result = result.await;
            match (loaded, result) {
                (Ok(got), result) => {
                    if got == sha {
                        memory.remember(host, &sha);
                    }
                    result
                }
                (Err(load_error), Err(e)) if is_noscript(&e) => Err(load_error),
                (_, result) => result,
            }
        })
    }

    /// Runs a script on `host`: `EVALSHA` where the host is known to hold
    /// it (once more after a load if it answers `NOSCRIPT`), else load and
    /// call together.
    pub(super) fn script<T: FromValue + 'static>(
        &self,
        host: HostId,
        call: ScriptCall,
    ) -> Reply<T> {
        let memory = self.cluster.script_memory();
        if !memory.knows(host, call.script.sha1()) {
            return self.load_and_call(host, &call);
        }
        let first: Reply<T> = self.send(host, call.evalsha());
        let client = self.clone();
        Reply::from_future(async move {
            match first.await {
                Err(e) if is_noscript(&e) => {
                    memory.forget(host, call.script.sha1());
                    client.load_and_call(host, &call).await
                }
                other => other,
            }
        })
    }

    /// Sends the per-host parts of a multi-key command and joins them.
    fn send_split<T: FromValue + 'static>(&self, split: multikey::Split, cmd: Cmd) -> Reply<T> {
        if let [(host, _, _)] = split.parts.as_slice() {
            return self.send(*host, cmd);
        }
        let parts: Vec<Reply<Value>> = split
            .parts
            .iter()
            .map(|(host, part, _)| self.send(*host, part.clone()))
            .collect();
        let name = cmd.display_name();
        Reply::join(parts, move |replies| {
            split
                .combine(replies)
                .and_then(T::from_value)
                .map_err(|e| e.with_context_command(&name))
        })
    }
}

/// Where a command goes: one host, or parts to several.
enum Route {
    /// One host, and the request's budget there.
    One(HostId, Option<Duration>),
    Split(multikey::Split),
}

/// Refuses what cannot run on a connection shared by many callers.
fn refuse_on_shared(cmd: &Cmd) -> Result<()> {
    let reason = match ConnEffect::of(cmd) {
        ConnEffect::Refused(reason) => reason,
        ConnEffect::Dirty => {
            "it changes the state of the connection, which the async client shares between callers; use a local client or a transaction"
        }
        ConnEffect::None if blocks(cmd) => {
            "it blocks the connection, which the async client shares between callers; use a local client"
        }
        ConnEffect::None => return Ok(()),
    };
    Err(Error::Unsupported {
        command: cmd.display_name().into(),
        reason: reason.into(),
    })
}

impl Execute for AsyncClient {
    type Output<T: FromValue + 'static> = Reply<T>;

    fn execute<T: FromValue + 'static>(&self, cmd: Cmd) -> Reply<T> {
        if let Err(e) = refuse_on_shared(&cmd) {
            return Reply::ready(Err(e));
        }
        if self.previous.is_some() {
            return self.migrating(cmd);
        }
        let route = self.cluster.with_routes(|routes| match MultiKey::of(&cmd) {
            Some(kind) => multikey::split(kind, &cmd, &*routes.router).map(Route::Split),
            // The budget looked up with the route: one lookup a request.
            None => routes
                .router
                .host_for_command(&cmd)
                .map(|host| Route::One(host, self.budget_in(routes, host))),
        });
        match route.and_then(|r| r) {
            Ok(Route::One(host, budget)) => self.send_within(host, cmd, budget),
            Ok(Route::Split(split)) => self.send_split(split, cmd),
            Err(e) => Reply::ready(Err(e)),
        }
    }

    fn execute_script<T: FromValue + 'static>(&self, call: ScriptCall) -> Reply<T> {
        if self.previous.is_some() {
            // Its key moved first if need be, as for a command (EVAL: the
            // source, as the new owner may lack the script).
            return self.migrating(call.eval());
        }
        let host = self
            .cluster
            .with_routes(|routes| script_host(&*routes.router, &call))
            .and_then(|h| h);
        match host {
            Ok(host) => self.script(host, call),
            Err(e) => Reply::ready(Err(e)),
        }
    }
}

/// The async client narrowed to a fanout: see [`AsyncClient::fanout`].
#[derive(Clone, Debug)]
pub struct AsyncFanout {
    client: AsyncClient,
    targets: Result<Vec<HostId>>,
}

impl AsyncFanout {
    /// The hosts this fanout sends to.
    ///
    /// # Errors
    ///
    /// [`Error::NoSuchHost`] when one of the hosts asked for is unknown.
    pub fn targets(&self) -> Result<&[HostId]> {
        self.targets.as_deref().map_err(Clone::clone)
    }
}

impl Execute for AsyncFanout {
    type Output<T: FromValue + 'static> = Reply<HashMap<HostId, T>>;

    fn execute<T: FromValue + 'static>(&self, cmd: Cmd) -> Reply<HashMap<HostId, T>> {
        let targets = match &self.targets {
            Ok(t) => t.clone(),
            Err(e) => return Reply::ready(Err(e.clone())),
        };
        if let Err(e) = refuse_on_shared(&cmd) {
            return Reply::ready(Err(e));
        }
        let parts: Vec<Reply<T>> = targets
            .iter()
            .map(|&h| self.client.send(h, cmd.clone()))
            .collect();
        Reply::join(parts, move |values| {
            Ok(targets.into_iter().zip(values).collect())
        })
    }

    fn execute_script<T: FromValue + 'static>(
        &self,
        call: ScriptCall,
    ) -> Reply<HashMap<HostId, T>> {
        let targets = match &self.targets {
            Ok(t) => t.clone(),
            Err(e) => return Reply::ready(Err(e.clone())),
        };
        let parts: Vec<Reply<T>> = targets
            .iter()
            .map(|&h| self.client.script(h, call.clone()))
            .collect();
        Reply::join(parts, move |values| {
            Ok(targets.into_iter().zip(values).collect())
        })
    }
}
