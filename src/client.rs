//! The clients: [`RoutingClient`] (immediate, routed), [`MappingClient`]
//! (inside a map: promises, pipelined and batched), [`FanoutClient`] (one
//! command to many hosts) and [`LocalClient`] (one host, immediate). They
//! all implement [`Execute`], so every helper of [`crate::Commands`] works
//! on each, returning what fits the client: a `Result<T>`, a `Promise<T>`,
//! or a `Promise<HashMap<HostId, T>>`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use crate::args::ToArg;
use crate::cluster::{Cluster, Hosts, MapOptions};
use crate::cmd::{Call, Cmd, ScriptCall};
use crate::convert::FromValue;
use crate::error::{Error, HostId, Result};
use crate::event_loop::Session;
use crate::multikey::{self, MultiKey};
use crate::promise::Promise;
use crate::resp::Value;
use crate::router::Router;
mod asynchronous;
mod migrating;
pub(crate) mod moving;
mod scans;
mod transactions;
pub use asynchronous::{AsyncClient, AsyncFanout, AsyncOptions};
pub use scans::ScanPage;

use crate::scripts::{is_noscript, retry_noscript, Enqueue, ScriptLoads, ScriptMemory};

/// Sends a command and hands back the client's kind of answer.
///
/// This is the one method every client implements; [`crate::Commands`]
/// builds every typed helper on it. Methods take `&self`, so a client can
/// be shared (the immediate ones between threads, in an `Arc`).
pub trait Execute {
    /// What a command returns on this client: `Result<T>` (immediate),
    /// `Promise<T>` (in a map), `Promise<HashMap<HostId, T>>` (fanout).
    type Output<T: FromValue + 'static>;

    /// Sends `cmd`, converting its reply to `T`.
    fn execute<T: FromValue + 'static>(&self, cmd: Cmd) -> Self::Output<T>;

    /// Runs a Lua script (`EVALSHA`, loading it first where the host may
    /// lack it), converting its reply to `T`.
    fn execute_script<T: FromValue + 'static>(&self, call: ScriptCall) -> Self::Output<T>;
}

/// Records the first failure of a session.
type Failures = Rc<RefCell<Option<Error>>>;

fn note_failure(failures: &Failures, e: &Error) {
    let mut first = failures.borrow_mut();
    if first.is_none() {
        *first = Some(e.clone());
    }
}

/// Routes and sends commands into a session; shared by the map and fanout clients.
struct Dispatch {
    session: Session,
    router: Arc<dyn Router>,
    failures: Failures,
    scripts: Arc<ScriptMemory>,
    /// The `SCRIPT LOAD`s this session already queued.
    loads: ScriptLoads,
    /// A migrating cluster's view of the move, and its work for after joins.
    migration: Option<migrating::Migration>,
    runs: migrating::Runs,
}

impl Enqueue for Dispatch {
    #[inline]
    fn enqueue<T: FromValue + 'static>(&mut self, host: HostId, cmd: &Cmd) -> Promise<T> {
        let promise = Promise::new();
        self.session.enqueue(host, cmd, promise.sink());
        promise
    }
}

impl Dispatch {
    fn new(session: Session, router: Arc<dyn Router>) -> Dispatch {
        Dispatch {
            failures: session.failures(),
            scripts: session.scripts().clone(),
            session,
            router,
            loads: ScriptLoads::default(),
            migration: None,
            runs: migrating::Runs::default(),
        }
    }

    /// Joins, then runs what a migrating cluster left for after the join
    /// (fallback reads, moves, deletes), and joins again.
    fn join(&mut self) {
        let deadline = self.session.deadline();
        self.join_then_steps(deadline, Session::join_with);
    }

    /// Rejects everything outstanding, in the session and (migrating)
    /// waiting for after a join, as cancelled.
    fn cancel(&mut self) {
        self.session.cancel(|host| Error::Cancelled {
            host: host.clone(),
            command: None,
        });
        if let Some(m) = &self.migration {
            let error = Error::Cancelled {
                host: crate::error::HostName {
                    id: HostId::MAX,
                    addr: "(a migrating map's step after its join)".into(),
                },
                command: None,
            };
            m.cancel(&self.session, &self.runs, &error);
        }
        self.loads = ScriptLoads::default();
    }

    /// [`Dispatch::join`] with a deadline (the explicit clients' join).
    fn join_by(&mut self, deadline: Option<std::time::Instant>, budget: Option<Duration>) {
        let steps_deadline = match (deadline, self.session.deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.join_then_steps(steps_deadline, |s, between| {
            s.join_by(deadline, budget, between)
        });
    }

    /// Joins with `join`; on a migrating cluster, then runs the steps left
    /// for after it (fallback reads, moves, deletes; bounded by
    /// `steps_deadline`) and joins again for what they queued.
    fn join_then_steps(
        &mut self,
        steps_deadline: Option<std::time::Instant>,
        join: impl Fn(&mut Session, &mut dyn FnMut(&mut Session)),
    ) {
        let _bounded = StepsDeadline::set(steps_deadline);
        loop {
            let Some(m) = &self.migration else {
                return join(&mut self.session, &mut |_| {});
            };
            // GETs that missed are asked of their old owners as their
            // misses come in, while the map's other reads are on their way.
            let mut ask_early = |s: &mut Session| migrating::ask_old_owners(m, s);
            migrating::forget_overwritten(m, &mut self.session);
            join(&mut self.session, &mut ask_early);
            if migrating::run_followups(m, &self.runs, &mut self.session) {
                join(&mut self.session, &mut ask_early);
                if migrating::settle_fallbacks(m, &mut self.session) {
                    join(&mut self.session, &mut ask_early);
                    migrating::settle_rechecks(m);
                }
            }
            migrating::compact(m);
            // Commands that came after a step on their key (a delete, a
            // move, a probe) run now, in order, as a next round.
            let queued = migrating::take_queued(m);
            if queued.is_empty() {
                return;
            }
            for (cmd, sink) in queued {
                let p: Promise<Value> = self.migrating(cmd);
                p.on_result(sink);
            }
        }
    }

    /// Runs a script on `host` (see [`ScriptLoads::call`]); with `followed`,
    /// its `SCRIPT LOAD` goes ahead whatever the cluster remembers.
    fn script<T: FromValue + 'static>(
        &mut self,
        host: HostId,
        call: &ScriptCall,
        followed: bool,
    ) -> Promise<T> {
        let (mut loads, scripts) = (std::mem::take(&mut self.loads), self.scripts.clone());
        let p = loads.call(self, &scripts, host, call, followed);
        self.loads = loads;
        p
    }

    /// The host of a script call: that of its one key. As with commands, a
    /// script over several keys is refused whatever they hash to, and one
    /// with no key needs a fanout or a local client.
    fn script_host(&self, call: &ScriptCall) -> Result<HostId> {
        script_host(&*self.router, call)
    }

    #[inline]
    fn send<T: FromValue + 'static>(&mut self, host: HostId, cmd: &Cmd) -> Promise<T> {
        self.enqueue(host, cmd)
    }

    fn reject<T: 'static>(&self, e: Error) -> Promise<T> {
        note_failure(&self.failures, &e);
        Promise::rejected(e)
    }

    /// Routes `cmd` by its key, emulating the multi-key commands rb emulates.
    fn routed<T: FromValue + 'static>(&mut self, cmd: Cmd) -> Promise<T> {
        if self.migration.is_some() {
            return self.migrating(cmd);
        }
        if let Some(kind) = MultiKey::of(&cmd) {
            return self.split(kind, cmd);
        }
        match self.router.host_for_command(&cmd) {
            Ok(host) => self.send(host, &cmd),
            Err(e) => self.reject(e),
        }
    }

    fn split<T: FromValue + 'static>(&mut self, kind: MultiKey, cmd: Cmd) -> Promise<T> {
        let split = match multikey::split(kind, &cmd, &*self.router) {
            Ok(s) => s,
            Err(e) => return self.reject(e),
        };
        if let [(host, _, _)] = split.parts.as_slice() {
            let host = *host;
            return self.send(host, &cmd);
        }
        let parts: Vec<Promise<Value>> = split
            .parts
            .iter()
            .map(|(host, part, _)| self.send::<Value>(*host, part))
            .collect();
        let failures = self.failures.clone();
        let name = cmd.display_name();
        Promise::all_owned(parts).map_owned(move |replies| {
            let result = split
                .combine(replies)
                .and_then(T::from_value)
                .map_err(|e| e.with_context_command(&name));
            if let Err(e) = &result {
                note_failure(&failures, e);
            }
            result
        })
    }

    fn fan_script<T: FromValue + 'static>(
        &mut self,
        hosts: &[HostId],
        call: &ScriptCall,
    ) -> Promise<HashMap<HostId, T>> {
        let promises = hosts
            .iter()
            .map(|&h| self.script::<T>(h, call, false))
            .collect();
        by_host(hosts, promises)
    }

    fn fan<T: FromValue + 'static>(
        &mut self,
        hosts: &[HostId],
        cmd: &Cmd,
    ) -> Promise<HashMap<HostId, T>> {
        let promises = hosts.iter().map(|&h| self.send::<T>(h, cmd)).collect();
        by_host(hosts, promises)
    }
}

/// The host of a script call with one key (see [`Dispatch::script_host`]),
/// or with several that the router places together (hash tags).
fn script_host(router: &dyn Router, call: &ScriptCall) -> Result<HostId> {
    match call.keys.as_slice() {
        [key] => router.host_for_key(key),
        [] => Err(Error::unroutable(
            b"EVALSHA",
            "the script call has no key; use a fanout or a local client",
        )),
        keys => router.host_for_command(&call.evalsha()).map_err(|e| match e {
            // rb's refusal, said for a script call.
            Error::Unroutable { reason, .. } if &*reason == crate::keyspec::MOVABLE => {
                Error::unroutable(
                    b"EVALSHA",
                    format!(
                        "the script call has {} keys, which cannot be routed to one host; use execute_commands with one routing key (or hash tags)",
                        keys.len()
                    ),
                )
            }
            e => e,
        }),
    }
}

/// One promise per host (in `hosts` order) joined into replies by host id.
fn by_host<T: 'static>(hosts: &[HostId], promises: Vec<Promise<T>>) -> Promise<HashMap<HostId, T>> {
    let ids = hosts.to_vec();
    Promise::all_owned(promises).map_owned(move |values| Ok(ids.into_iter().zip(values).collect()))
}

/// A session's dispatch behind `&self`: the map and fanout clients' shared
/// core, with `join` and `cancel` (rb's explicit mapping and fanout clients).
struct Batch {
    dispatch: RefCell<Option<Dispatch>>,
    /// Why no dispatch could be made (bad options, no router): every
    /// command and join answers with it.
    broken: Option<Error>,
}

impl Batch {
    fn new(session: Session, router: Arc<dyn Router>) -> Batch {
        Batch {
            dispatch: RefCell::new(Some(Dispatch::new(session, router))),
            broken: None,
        }
    }

    fn broken(e: Error) -> Batch {
        Batch {
            dispatch: RefCell::new(None),
            broken: Some(e),
        }
    }

    /// Runs `f` on the dispatch. A command issued from a promise callback
    /// while this client is sending (the callback runs inside it) cannot
    /// be queued, and is rejected instead of panicking.
    fn with<T: 'static>(&self, f: impl FnOnce(&mut Dispatch) -> Promise<T>) -> Promise<T> {
        match self.dispatch.try_borrow_mut() {
            Ok(mut guard) => match (guard.as_mut(), &self.broken) {
                (Some(d), _) => f(d),
                (None, Some(e)) => Promise::rejected(e.clone()),
                (None, None) => Promise::rejected(Error::config("the client was already finished")),
            },
            Err(_) => Promise::rejected(Error::Unsupported {
                command: "(a command)".into(),
                reason: "issued from a promise callback while the same client was sending; \
                         issue it after the join instead"
                    .into(),
            }),
        }
    }

    fn join(&self, timeout: Option<Duration>) -> Result<()> {
        let Ok(mut guard) = self.dispatch.try_borrow_mut() else {
            return Err(reentrant("join"));
        };
        let Some(d) = guard.as_mut() else {
            return self.broken.clone().map_or(Ok(()), Err);
        };
        let deadline = timeout.and_then(|t| std::time::Instant::now().checked_add(t));
        d.join_by(deadline, timeout);
        d.loads = ScriptLoads::default();
        d.session.take_failure().map_or(Ok(()), Err)
    }

    fn cancel(&self) {
        if let Ok(mut guard) = self.dispatch.try_borrow_mut() {
            if let Some(d) = guard.as_mut() {
                d.cancel();
            }
        }
    }

    /// Joins (the scoped forms) and ends the session: healthy connections go
    /// back to their pools. The first failure, if any.
    fn finish(&self) -> Option<Error> {
        let Ok(mut guard) = self.dispatch.try_borrow_mut() else {
            return Some(reentrant("finish"));
        };
        let Some(mut d) = guard.take() else {
            return self.broken.clone();
        };
        d.join();
        d.session.finish()
    }

    fn router(&self) -> Option<Arc<dyn Router>> {
        let guard = self.dispatch.try_borrow().ok()?;
        guard.as_ref().map(|d| d.router.clone())
    }
}

impl Drop for Batch {
    /// A client dropped without a join rejects what it left outstanding
    /// (as cancelled) rather than leaving promises pending forever.
    fn drop(&mut self) {
        if let Some(mut d) = self.dispatch.get_mut().take() {
            d.cancel();
            let _ = d.session.finish();
        }
    }
}

fn reentrant(what: &str) -> Error {
    Error::Unsupported {
        command: what.into(),
        reason: "called from a promise callback while the same client was sending".into(),
    }
}

/// The client of a map (rb's mapping client): commands are routed by key,
/// queued per host (plain GETs and SETs merged into MGET/MSET), sent to
/// every host at once, and answered through [`Promise`]s.
///
/// Inside [`Cluster::map`] every promise is settled when the map returns.
/// Made with [`Cluster::mapping_client`], it is joined (or cancelled) by
/// hand, as often as wanted; dropping it cancels what is outstanding.
///
/// ```no_run
/// use rb::{Cluster, Commands, MapOptions};
/// use std::time::Duration;
/// let cluster = Cluster::from_urls(["redis://127.0.0.1:6379", "redis://127.0.0.1:6380"])?;
/// let m = cluster.mapping_client(MapOptions::new());
/// let a = m.get("a");
/// let b = m.incr("b");
/// m.join(Some(Duration::from_millis(50)))?; // every promise is settled now
/// println!("{:?} {}", a.value()?, b.value()?);
/// # Ok::<(), rb::Error>(())
/// ```
pub struct MappingClient {
    batch: Batch,
}

impl MappingClient {
    /// A mapping client over `session`, for `cluster` (which may be
    /// migrating: then its commands follow [`migrating`]'s rules).
    pub(crate) fn new(
        cluster: &Cluster,
        session: Session,
        router: Arc<dyn Router>,
    ) -> MappingClient {
        let migration = match migrating::Migration::of(cluster) {
            Ok(m) => m,
            Err(e) => return MappingClient::broken(e),
        };
        let mut session = session;
        if let Some(old) = cluster.migrating_from() {
            session.add_hosts(&old.host_map(), migrating::OLD_HOSTS);
        }
        let batch = Batch::new(session, router);
        if let Some(d) = batch.dispatch.borrow_mut().as_mut() {
            d.migration = migration.map(|mut m| {
                m.failures = d.failures.clone();
                m
            });
        }
        MappingClient { batch }
    }

    /// A client that answers every command and join with `e`.
    pub(crate) fn broken(e: Error) -> MappingClient {
        MappingClient {
            batch: Batch::broken(e),
        }
    }

    /// Waits until every promise is settled, or `timeout` passes (then what
    /// is left is rejected with [`Error::Timeout`] and those connections
    /// closed). The client stays usable: send more, join again.
    ///
    /// # Errors
    ///
    /// The first failure since the last join (every promise is settled all
    /// the same, each with its own outcome).
    pub fn join(&self, timeout: Option<Duration>) -> Result<()> {
        self.batch.join(timeout)
    }

    /// Rejects every outstanding promise with [`Error::Cancelled`] and
    /// closes the connections that had requests in flight (rb's `cancel`).
    pub fn cancel(&self) {
        self.batch.cancel();
    }

    pub(crate) fn finish(self) -> Option<Error> {
        self.batch.finish()
    }
}

impl Execute for MappingClient {
    type Output<T: FromValue + 'static> = Promise<T>;

    fn execute<T: FromValue + 'static>(&self, cmd: Cmd) -> Promise<T> {
        self.batch.with(|d| d.routed(cmd))
    }

    fn execute_script<T: FromValue + 'static>(&self, call: ScriptCall) -> Promise<T> {
        self.batch.with(|d| {
            if d.migration.is_some() {
                // Its key moved first if need be, as for a command (EVAL:
                // the source, as the new owner may lack the script).
                return d.migrating(call.eval());
            }
            match d.script_host(&call) {
                Ok(host) => d.script(host, &call, false),
                Err(e) => d.reject(e),
            }
        })
    }
}

/// The client of a fanout (rb's fanout client): each command goes to every
/// target host, and its promise holds the replies by host id.
///
/// Inside [`Cluster::fanout`] every promise is settled when it returns.
/// Made with [`Cluster::fanout_client`], it is joined or cancelled by hand.
pub struct FanoutClient {
    batch: Batch,
    targets: Vec<HostId>,
}

impl FanoutClient {
    pub(crate) fn new(
        session: Session,
        router: Arc<dyn Router>,
        targets: Vec<HostId>,
    ) -> FanoutClient {
        FanoutClient {
            batch: Batch::new(session, router),
            targets,
        }
    }

    /// A client that answers every command and join with `e`.
    pub(crate) fn broken(e: Error) -> FanoutClient {
        FanoutClient {
            batch: Batch::broken(e),
            targets: Vec::new(),
        }
    }

    /// The hosts this fanout sends to.
    pub fn targets(&self) -> &[HostId] {
        &self.targets
    }

    /// The next command(s) through the returned handle go to these hosts
    /// only (rb's `target`).
    pub fn target(&self, hosts: &[HostId]) -> TargetedClient<'_> {
        TargetedClient {
            fanout: self,
            hosts: hosts.to_vec(),
        }
    }

    /// The next command(s) through the returned handle go to the host that
    /// owns `key`, and answer with a plain `Promise<T>` (rb's `target_key`).
    pub fn target_key<K: ToArg>(&self, key: K) -> KeyTargetedClient<'_> {
        let key = crate::args::to_bytes(&key);
        let host = match (self.batch.router(), &self.batch.broken) {
            (Some(router), _) => router.host_for_key(&key),
            (None, Some(e)) => Err(e.clone()),
            (None, None) => Err(reentrant("target_key")),
        };
        KeyTargetedClient { fanout: self, host }
    }

    /// As [`MappingClient::join`].
    ///
    /// # Errors
    ///
    /// The first failure since the last join.
    pub fn join(&self, timeout: Option<Duration>) -> Result<()> {
        self.batch.join(timeout)
    }

    /// As [`MappingClient::cancel`].
    pub fn cancel(&self) {
        self.batch.cancel();
    }

    pub(crate) fn finish(self) -> Option<Error> {
        self.batch.finish()
    }
}

impl Execute for FanoutClient {
    type Output<T: FromValue + 'static> = Promise<HashMap<HostId, T>>;

    fn execute<T: FromValue + 'static>(&self, cmd: Cmd) -> Promise<HashMap<HostId, T>> {
        self.batch.with(|d| d.fan(&self.targets, &cmd))
    }

    fn execute_script<T: FromValue + 'static>(
        &self,
        call: ScriptCall,
    ) -> Promise<HashMap<HostId, T>> {
        self.batch.with(|d| d.fan_script(&self.targets, &call))
    }
}

/// A fanout narrowed to some hosts: see [`FanoutClient::target`].
pub struct TargetedClient<'a> {
    fanout: &'a FanoutClient,
    hosts: Vec<HostId>,
}

impl Execute for TargetedClient<'_> {
    type Output<T: FromValue + 'static> = Promise<HashMap<HostId, T>>;

    fn execute<T: FromValue + 'static>(&self, cmd: Cmd) -> Promise<HashMap<HostId, T>> {
        self.fanout.batch.with(|d| d.fan(&self.hosts, &cmd))
    }

    fn execute_script<T: FromValue + 'static>(
        &self,
        call: ScriptCall,
    ) -> Promise<HashMap<HostId, T>> {
        self.fanout.batch.with(|d| d.fan_script(&self.hosts, &call))
    }
}

/// A fanout narrowed to one key's host: see [`FanoutClient::target_key`].
pub struct KeyTargetedClient<'a> {
    fanout: &'a FanoutClient,
    host: Result<HostId>,
}

impl Execute for KeyTargetedClient<'_> {
    type Output<T: FromValue + 'static> = Promise<T>;

    fn execute<T: FromValue + 'static>(&self, cmd: Cmd) -> Promise<T> {
        self.fanout.batch.with(|d| match &self.host {
            Ok(host) => d.send(*host, &cmd),
            Err(e) => d.reject(e.clone().with_context_command(&cmd.display_name())),
        })
    }

    fn execute_script<T: FromValue + 'static>(&self, call: ScriptCall) -> Promise<T> {
        self.fanout.batch.with(|d| match &self.host {
            Ok(host) => d.script(*host, &call, false),
            Err(e) => d.reject(e.clone().with_context_command("EVALSHA")),
        })
    }
}

/// The deadline of an immediate command to these hosts: their write and
/// read budgets added (the longest of them), none if any host waits forever.
fn immediate_budget(cluster: &Cluster, hosts: &[HostId]) -> Option<Duration> {
    let mut budget = Duration::ZERO;
    for &id in hosts {
        let info = cluster.host(id).ok()?;
        if info.read_timeout.is_none() && info.write_timeout.is_none() {
            return None;
        }
        // A budget too large to add up is no budget at all.
        let total = info
            .read_timeout
            .unwrap_or_default()
            .checked_add(info.write_timeout.unwrap_or_default())?;
        budget = budget.max(total);
    }
    Some(budget)
}

/// Runs one routed command to completion (the routing and local clients).
fn run_now<T: FromValue + 'static>(
    cluster: &Cluster,
    hosts_hint: &[HostId],
    auto_batch: bool,
    submit: impl FnOnce(&mut Dispatch) -> Promise<T>,
) -> Result<T> {
    let budget = immediate_budget(cluster, hosts_hint);
    let session = cluster.immediate_session(auto_batch, budget);
    let mut dispatch = Dispatch::new(session, cluster.router()?);
    let promise = submit(&mut dispatch);
    dispatch.session.join();
    let _ = dispatch.session.finish();
    promise.take()
}

thread_local! {
    /// The deadline of the map whose after-join steps this thread runs:
    /// their [`LocalClient::pipeline`]s (old-copy deletes, moves) give up
    /// then, so a map's timeout bounds them too.
    static STEPS_DEADLINE: std::cell::Cell<Option<std::time::Instant>> =
        const { std::cell::Cell::new(None) };
}

/// Sets [`STEPS_DEADLINE`] while it lives.
struct StepsDeadline(Option<std::time::Instant>);

impl StepsDeadline {
    fn set(deadline: Option<std::time::Instant>) -> StepsDeadline {
        StepsDeadline(STEPS_DEADLINE.with(|d| d.replace(deadline)))
    }
}

impl Drop for StepsDeadline {
    fn drop(&mut self) {
        STEPS_DEADLINE.with(|d| d.set(self.0));
    }
}

/// Sends each command to the host that owns its key, and waits for the
/// reply (rb's routing client). Multi-key MGET/MSET/DEL/UNLINK/EXISTS/TOUCH
/// are split per host and run on all of them in parallel.
///
/// Cheap to clone, `Send + Sync`: share it between threads freely.
///
/// ```no_run
/// use rb::{Cluster, Commands};
/// let cluster = Cluster::from_urls(["redis://127.0.0.1:6379", "redis://127.0.0.1:6380"])?;
/// let client = cluster.routing_client();
/// client.set("key", 42)?;
/// let v: Option<Vec<u8>> = client.get("key")?;
/// let n: i64 = client.cmd(rb::cmd("INCRBY").arg("counter").arg(2))?;
/// # Ok::<(), rb::Error>(())
/// ```
#[derive(Clone)]
pub struct RoutingClient {
    cluster: Cluster,
    auto_batch: bool,
}

impl RoutingClient {
    pub(crate) fn new(cluster: Cluster, auto_batch: bool) -> RoutingClient {
        RoutingClient {
            cluster,
            auto_batch,
        }
    }

    /// The cluster this client routes through.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// A map through this client's cluster (as rb's `client.map()`).
    ///
    /// # Errors
    ///
    /// As [`Cluster::map_with`].
    pub fn map<R>(&self, f: impl FnOnce(&MappingClient) -> R) -> Result<R> {
        let opts = MapOptions::new().auto_batch(self.auto_batch);
        self.cluster.map_with(opts, f)
    }

    /// A fanout through this client's cluster (as rb's `client.fanout()`).
    ///
    /// # Errors
    ///
    /// As [`Cluster::fanout_with`].
    pub fn fanout<R>(&self, hosts: Hosts, f: impl FnOnce(&FanoutClient) -> R) -> Result<R> {
        let opts = MapOptions::new().auto_batch(self.auto_batch);
        self.cluster.fanout_with(opts, hosts, f)
    }

    /// One request through a map, on a migrating cluster: its joins run
    /// the fallbacks and moves.
    fn through_map<T: FromValue + 'static>(
        &self,
        request: impl FnOnce(&MappingClient) -> Promise<T>,
    ) -> Result<T> {
        let hosts = self.cluster.host_ids();
        let mut opts = MapOptions::new().auto_batch(self.auto_batch);
        if let Some(budget) = immediate_budget(&self.cluster, &hosts) {
            opts = opts.timeout(budget);
        }
        self.cluster.map_with(opts, request).and_then(|p| p.take())
    }
}

impl Execute for RoutingClient {
    type Output<T: FromValue + 'static> = Result<T>;

    fn execute<T: FromValue + 'static>(&self, cmd: Cmd) -> Result<T> {
        if self.cluster.migrating_from().is_some() {
            return self.through_map(|c| c.execute::<T>(cmd));
        }
        if MultiKey::of(&cmd).is_some() {
            let hosts = self.cluster.host_ids();
            return run_now(&self.cluster, &hosts, self.auto_batch, |d| d.routed(cmd));
        }
        // Routed once, here: the host also decides the time budget.
        let host = self.cluster.router()?.host_for_command(&cmd)?;
        run_now(&self.cluster, &[host], self.auto_batch, |d| {
            d.send(host, &cmd)
        })
    }

    fn execute_script<T: FromValue + 'static>(&self, call: ScriptCall) -> Result<T> {
        if self.cluster.migrating_from().is_some() {
            return self.through_map(|c| c.execute_script::<T>(call));
        }
        let host = script_host(&*self.cluster.router()?, &call)?;
        script_now(&self.cluster, host, &call)
    }
}

/// Runs a script on one host now; a `NOSCRIPT` (the script was flushed
/// since it was last seen) reloads it and retries once.
fn script_now<T: FromValue + 'static>(
    cluster: &Cluster,
    host: HostId,
    call: &ScriptCall,
) -> Result<T> {
    retry_noscript(|| run_now(cluster, &[host], false, |d| d.script(host, call, false)))
}

/// A client for one host, immediate (rb's `get_local_client`). Commands are
/// not routed: they all go to this host, whatever their keys.
#[derive(Clone)]
pub struct LocalClient {
    cluster: Cluster,
    host: HostId,
}

impl LocalClient {
    pub(crate) fn new(cluster: Cluster, host: HostId) -> LocalClient {
        LocalClient { cluster, host }
    }

    /// The host this client talks to.
    pub fn host_id(&self) -> HostId {
        self.host
    }

    /// The cluster this client belongs to.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// Sends `commands` to this host as one pipeline, in order, and waits:
    /// each command's own outcome (a failed one does not stop the others).
    /// Nothing is routed, merged or refused for its keys: it is this host's.
    ///
    /// ```no_run
    /// # let cluster = rb::Cluster::from_urls(["redis://127.0.0.1:6379"])?;
    /// let local = cluster.local_client(0)?;
    /// let out = local.pipeline([rb::cmd("INCR").arg("a"), rb::cmd("GET").arg("a")]);
    /// assert_eq!(out.len(), 2);
    /// # Ok::<(), rb::Error>(())
    /// ```
    pub fn pipeline(&self, commands: impl IntoIterator<Item = Cmd>) -> Vec<Result<Value>> {
        let budget = immediate_budget(&self.cluster, &[self.host]);
        let mut session = self.cluster.immediate_session(false, budget);
        let promises: Vec<Promise<Value>> = commands
            .into_iter()
            .map(|c| {
                let p = Promise::new();
                session.enqueue(self.host, &c, p.sink());
                p
            })
            .collect();
        match STEPS_DEADLINE.with(std::cell::Cell::get) {
            // A migrating map's step after its join: bounded by the map.
            Some(d) => {
                let left = d.saturating_duration_since(std::time::Instant::now());
                session.join_by(Some(d), Some(left), &mut |_| {});
            }
            None => session.join(),
        }
        let _ = session.finish();
        promises.iter().map(Promise::take).collect()
    }
}

impl Execute for LocalClient {
    type Output<T: FromValue + 'static> = Result<T>;

    fn execute<T: FromValue + 'static>(&self, cmd: Cmd) -> Result<T> {
        let host = self.host;
        run_now(&self.cluster, &[host], false, |d| d.send(host, &cmd))
    }

    fn execute_script<T: FromValue + 'static>(&self, call: ScriptCall) -> Result<T> {
        script_now(&self.cluster, self.host, &call)
    }
}

/// [`Cluster::execute_commands_with`]: see there.
pub(crate) fn execute_commands<K, I>(
    cluster: &Cluster,
    opts: MapOptions,
    mapping: I,
) -> Result<HashMap<K, Vec<Promise<Value>>>>
where
    I: IntoIterator<Item = (K, Vec<Call>)>,
    K: ToArg + Eq + std::hash::Hash,
{
    let started = std::time::Instant::now();
    let router = cluster.router()?;
    let mut entries = Vec::new();
    // The last call of each key's list(s): a script call before it keeps
    // the list's order only if its script is loaded ahead, whatever the
    // cluster remembers (a `SCRIPT FLUSH` or a restart since then would
    // answer NOSCRIPT while the calls after it run).
    let mut last_call: HashMap<Vec<u8>, (usize, usize)> = HashMap::new();
    for (e, (key, calls)) in mapping.into_iter().enumerate() {
        let key_bytes = crate::args::to_bytes(&key);
        let host = router.host_for_key(&key_bytes)?;
        if !calls.is_empty() {
            last_call.insert(key_bytes, (e, calls.len() - 1));
        }
        entries.push((key, host, calls));
    }

    // A migrating cluster runs each list where its key now belongs: keys
    // still on their old owner move there first.
    let keys: Vec<(Vec<u8>, migrating::Touch)> = entries
        .iter()
        .map(|(k, _, calls)| (crate::args::to_bytes(k), migrating::Touch::of_calls(calls)))
        .collect();
    migrating::move_in_transit(cluster, keys.iter().map(|(k, t)| (k.as_slice(), *t)))?;

    // Every list, in order, each on its key's host; scripts loaded first
    // where the host may lack them or where calls follow them. A script
    // call answered NOSCRIPT can only be its key's last call: it is kept
    // for a retry.
    type Retry = (HostId, ScriptCall, Promise<Value>);
    let retries: Rc<RefCell<Vec<Retry>>> = Rc::default();
    let mut out = HashMap::new();
    let mut d = Dispatch::new(cluster.session(&opts), router.clone());
    for (e, (key, host, calls)) in entries.into_iter().enumerate() {
        let last = last_call.get(&crate::args::to_bytes(&key)).copied();
        let mut results = Vec::with_capacity(calls.len());
        for (c, call) in calls.into_iter().enumerate() {
            let result = Promise::new();
            match call {
                Call::Cmd(cmd) => {
                    let p: Promise<Value> = d.send(host, &cmd);
                    let r = result.clone();
                    p.on_result(move |v| r.settle(v));
                }
                Call::Script(sc) => {
                    let followed = last != Some((e, c));
                    let p: Promise<Value> = d.script(host, &sc, followed);
                    let (r, retries) = (result.clone(), retries.clone());
                    p.on_result(move |v| match v {
                        Err(e) if is_noscript(&e) => retries.borrow_mut().push((host, sc, r)),
                        v => r.settle(v),
                    });
                }
            }
            results.push(result);
        }
        // A key given twice: both lists ran; keep both lists' results.
        out.entry(key).or_insert_with(Vec::new).extend(results);
    }
    d.session.join();
    let _ = d.session.finish();

    // Once more for the calls whose script vanished in between, within
    // what is left of the timeout.
    let retries = std::mem::take(&mut *retries.borrow_mut());
    if !retries.is_empty() {
        let mut opts = opts;
        if let Some(t) = opts.timeout {
            opts.timeout = Some(t.saturating_sub(started.elapsed()));
        }
        let mut d = Dispatch::new(cluster.session(&opts), router);
        for (host, sc, result) in retries {
            let p: Promise<Value> = d.script(host, &sc, false);
            p.on_result(move |v| result.settle(v));
        }
        d.session.join();
        let _ = d.session.finish();
    }
    Ok(out)
}

impl std::fmt::Debug for MappingClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappingClient").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for FanoutClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FanoutClient")
            .field("targets", &self.targets)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for TargetedClient<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetedClient")
            .field("hosts", &self.hosts)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for KeyTargetedClient<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyTargetedClient")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for RoutingClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoutingClient")
            .field("cluster", &self.cluster)
            .field("auto_batch", &self.auto_batch)
            .finish()
    }
}

impl std::fmt::Debug for LocalClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalClient")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}
