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
use crate::cmd::{cmd, Call, Cmd, ScriptCall};
use crate::convert::FromValue;
use crate::error::{Error, HostId, Result};
use crate::event_loop::Session;
use crate::multikey::{self, MultiKey};
use crate::promise::Promise;
use crate::resp::Value;
use crate::router::Router;

/// Sends a command and hands back the client's kind of answer.
///
/// This is the one method every client implements; [`crate::Commands`]
/// builds every typed helper on it.
pub trait Execute {
    /// What a command returns on this client: `Result<T>` (immediate),
    /// `Promise<T>` (in a map), `Promise<HashMap<HostId, T>>` (fanout).
    type Output<T: FromValue + 'static>;

    /// Sends `cmd`, converting its reply to `T`.
    fn execute<T: FromValue + 'static>(&mut self, cmd: Cmd) -> Self::Output<T>;

    /// Runs a Lua script (`EVALSHA`, loading it first where the host may
    /// lack it), converting its reply to `T`.
    fn execute_script<T: FromValue + 'static>(&mut self, call: ScriptCall) -> Self::Output<T>;
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
struct Dispatch<'s> {
    session: &'s mut Session,
    router: Arc<dyn Router>,
    failures: Failures,
    /// Scripts whose `SCRIPT LOAD` this session already queued, per host.
    loading: HashMap<(HostId, Arc<str>), Promise<String>>,
}

impl<'s> Dispatch<'s> {
    fn new(session: &'s mut Session, router: Arc<dyn Router>) -> Dispatch<'s> {
        let failures = session.failures();
        Dispatch {
            session,
            router,
            failures,
            loading: HashMap::new(),
        }
    }

    /// Runs a script on `host`: `SCRIPT LOAD` first unless the host is known
    /// to hold it, then `EVALSHA`. A `NOSCRIPT` answer makes the cluster
    /// forget the pair, so the next call loads again.
    fn script<T: FromValue + 'static>(&mut self, host: HostId, call: &ScriptCall) -> Promise<T> {
        self.script_loading(host, call, false)
    }

    /// [`Dispatch::script`]; with `always_load`, `SCRIPT LOAD` goes ahead
    /// of the `EVALSHA` (once per host in this session) even where the
    /// host is known to hold the script, so a script flushed since cannot
    /// answer `NOSCRIPT` while the commands queued after it run.
    fn script_loading<T: FromValue + 'static>(
        &mut self,
        host: HostId,
        call: &ScriptCall,
        always_load: bool,
    ) -> Promise<T> {
        let memory = self.session.scripts().clone();
        let sha: Arc<str> = call.script.sha1().into();
        let key = (host, sha.clone());
        if (always_load || !memory.knows(host, &sha)) && !self.loading.contains_key(&key) {
            let load = cmd("SCRIPT").arg("LOAD").arg(call.script.source());
            let loaded: Promise<String> = self.send(host, &load);
            let (m, s) = (memory.clone(), sha.clone());
            loaded.done(
                move |got| {
                    if **got == *s {
                        m.remember(host, &s);
                    }
                },
                |_| {},
            );
            self.loading.insert(key.clone(), loaded);
        }
        let load = self.loading.get(&key).cloned();
        let evalsha: Promise<T> = self.send(host, &call.evalsha());
        let result = Promise::new();
        let out = result.clone();
        evalsha.on_result(move |r| {
            out.settle(match r {
                Err(e) if e.code() == Some("NOSCRIPT") => {
                    memory.forget(host, &sha);
                    // A script that failed to load (a Lua syntax error) is
                    // reported as that failure, not as the NOSCRIPT after it.
                    Err(load.and_then(|l| l.reason()).unwrap_or(e))
                }
                other => other,
            })
        });
        result
    }

    /// The host of a script call: that of its one key. As with commands, a
    /// script over several keys is refused whatever they hash to, and one
    /// with no key needs a fanout or a local client.
    fn script_host(&self, call: &ScriptCall) -> Result<HostId> {
        match call.keys.as_slice() {
            [key] => self.router.host_for_key(key),
            [] => Err(Error::unroutable(
                b"EVALSHA",
                "the script call has no key; use a fanout or a local client",
            )),
            keys => Err(Error::unroutable(
                b"EVALSHA",
                format!(
                    "the script call has {} keys, which cannot be routed to one host; use execute_commands with one routing key",
                    keys.len()
                ),
            )),
        }
    }

    #[inline]
    fn send<T: FromValue + 'static>(&mut self, host: HostId, cmd: &Cmd) -> Promise<T> {
        let promise = Promise::new();
        self.session.enqueue(host, cmd, promise.sink());
        promise
    }

    fn reject<T: 'static>(&self, e: Error) -> Promise<T> {
        note_failure(&self.failures, &e);
        Promise::rejected(e)
    }

    /// Routes `cmd` by its key, emulating the multi-key commands rb emulates.
    fn routed<T: FromValue + 'static>(&mut self, cmd: Cmd) -> Promise<T> {
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
        let promises = hosts.iter().map(|&h| self.script::<T>(h, call)).collect();
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

/// One promise per host (in `hosts` order) joined into replies by host id.
fn by_host<T: 'static>(hosts: &[HostId], promises: Vec<Promise<T>>) -> Promise<HashMap<HostId, T>> {
    let ids = hosts.to_vec();
    Promise::all_owned(promises).map_owned(move |values| Ok(ids.into_iter().zip(values).collect()))
}

/// The client inside [`Cluster::map`]: commands are routed by key, queued
/// per host (plain GETs and SETs merged into MGET/MSET), sent to every host
/// at once, and answered through [`Promise`]s that are all settled when the
/// map returns.
pub struct MappingClient<'s> {
    dispatch: Dispatch<'s>,
}

impl<'s> MappingClient<'s> {
    pub(crate) fn new(session: &'s mut Session, router: Arc<dyn Router>) -> MappingClient<'s> {
        MappingClient {
            dispatch: Dispatch::new(session, router),
        }
    }
}

impl Execute for MappingClient<'_> {
    type Output<T: FromValue + 'static> = Promise<T>;

    fn execute<T: FromValue + 'static>(&mut self, cmd: Cmd) -> Promise<T> {
        self.dispatch.routed(cmd)
    }

    fn execute_script<T: FromValue + 'static>(&mut self, call: ScriptCall) -> Promise<T> {
        match self.dispatch.script_host(&call) {
            Ok(host) => self.dispatch.script(host, &call),
            Err(e) => self.dispatch.reject(e),
        }
    }
}

/// The client inside [`Cluster::fanout`]: each command goes to every
/// target host, and its promise holds the replies by host id.
pub struct FanoutClient<'s> {
    dispatch: Dispatch<'s>,
    targets: Vec<HostId>,
}

impl<'s> FanoutClient<'s> {
    pub(crate) fn new(
        session: &'s mut Session,
        router: Arc<dyn Router>,
        targets: Vec<HostId>,
    ) -> FanoutClient<'s> {
        FanoutClient {
            dispatch: Dispatch::new(session, router),
            targets,
        }
    }

    /// The hosts this fanout sends to.
    pub fn targets(&self) -> &[HostId] {
        &self.targets
    }

    /// The next command(s) through the returned handle go to these hosts
    /// only (rb's `target`).
    pub fn target(&mut self, hosts: &[HostId]) -> TargetedClient<'_, 's> {
        TargetedClient {
            dispatch: &mut self.dispatch,
            hosts: hosts.to_vec(),
        }
    }

    /// The next command(s) through the returned handle go to the host that
    /// owns `key`, and answer with a plain `Promise<T>` (rb's `target_key`).
    pub fn target_key<K: ToArg>(&mut self, key: K) -> KeyTargetedClient<'_, 's> {
        let key = crate::args::to_bytes(&key);
        let host = self.dispatch.router.host_for_key(&key);
        KeyTargetedClient {
            dispatch: &mut self.dispatch,
            host,
        }
    }
}

impl Execute for FanoutClient<'_> {
    type Output<T: FromValue + 'static> = Promise<HashMap<HostId, T>>;

    fn execute<T: FromValue + 'static>(&mut self, cmd: Cmd) -> Promise<HashMap<HostId, T>> {
        let targets = std::mem::take(&mut self.targets);
        let p = self.dispatch.fan(&targets, &cmd);
        self.targets = targets;
        p
    }

    fn execute_script<T: FromValue + 'static>(
        &mut self,
        call: ScriptCall,
    ) -> Promise<HashMap<HostId, T>> {
        let targets = self.targets.clone();
        self.dispatch.fan_script(&targets, &call)
    }
}

/// A fanout narrowed to some hosts: see [`FanoutClient::target`].
pub struct TargetedClient<'a, 's> {
    dispatch: &'a mut Dispatch<'s>,
    hosts: Vec<HostId>,
}

impl Execute for TargetedClient<'_, '_> {
    type Output<T: FromValue + 'static> = Promise<HashMap<HostId, T>>;

    fn execute<T: FromValue + 'static>(&mut self, cmd: Cmd) -> Promise<HashMap<HostId, T>> {
        self.dispatch.fan(&self.hosts, &cmd)
    }

    fn execute_script<T: FromValue + 'static>(
        &mut self,
        call: ScriptCall,
    ) -> Promise<HashMap<HostId, T>> {
        self.dispatch.fan_script(&self.hosts, &call)
    }
}

/// A fanout narrowed to one key's host: see [`FanoutClient::target_key`].
pub struct KeyTargetedClient<'a, 's> {
    dispatch: &'a mut Dispatch<'s>,
    host: Result<HostId>,
}

impl Execute for KeyTargetedClient<'_, '_> {
    type Output<T: FromValue + 'static> = Promise<T>;

    fn execute<T: FromValue + 'static>(&mut self, cmd: Cmd) -> Promise<T> {
        match &self.host {
            Ok(host) => self.dispatch.send(*host, &cmd),
            Err(e) => self
                .dispatch
                .reject(e.clone().with_context_command(&cmd.display_name())),
        }
    }

    fn execute_script<T: FromValue + 'static>(&mut self, call: ScriptCall) -> Promise<T> {
        match &self.host {
            Ok(host) => self.dispatch.script(*host, &call),
            Err(e) => self
                .dispatch
                .reject(e.clone().with_context_command("EVALSHA")),
        }
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
    submit: impl FnOnce(&mut Dispatch<'_>) -> Promise<T>,
) -> Result<T> {
    let budget = immediate_budget(cluster, hosts_hint);
    let mut session = cluster.immediate_session(auto_batch, budget);
    let promise = {
        let mut dispatch = Dispatch::new(&mut session, cluster.router()?);
        submit(&mut dispatch)
    };
    session.join();
    let _ = session.finish();
    promise.take()
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
/// let mut client = cluster.routing_client();
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
    pub fn map<R>(&self, f: impl FnOnce(&mut MappingClient<'_>) -> R) -> Result<R> {
        let opts = MapOptions::new().auto_batch(self.auto_batch);
        self.cluster.map_with(opts, f)
    }

    /// A fanout through this client's cluster (as rb's `client.fanout()`).
    ///
    /// # Errors
    ///
    /// As [`Cluster::fanout_with`].
    pub fn fanout<R>(&self, hosts: Hosts, f: impl FnOnce(&mut FanoutClient<'_>) -> R) -> Result<R> {
        let opts = MapOptions::new().auto_batch(self.auto_batch);
        self.cluster.fanout_with(opts, hosts, f)
    }
}

impl Execute for RoutingClient {
    type Output<T: FromValue + 'static> = Result<T>;

    fn execute<T: FromValue + 'static>(&mut self, cmd: Cmd) -> Result<T> {
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

    fn execute_script<T: FromValue + 'static>(&mut self, call: ScriptCall) -> Result<T> {
        let host = match call.keys.as_slice() {
            [key] => self.cluster.router()?.host_for_key(key)?,
            [] => {
                return Err(Error::unroutable(
                    b"EVALSHA",
                    "the script call has no key; use a fanout or a local client",
                ))
            }
            keys => {
                return Err(Error::unroutable(
                    b"EVALSHA",
                    format!(
                        "the script call has {} keys, which cannot be routed to one host; use execute_commands with one routing key",
                        keys.len()
                    ),
                ))
            }
        };
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
    match run_now(cluster, &[host], false, |d| d.script::<T>(host, call)) {
        Err(e) if e.code() == Some("NOSCRIPT") => {
            run_now(cluster, &[host], false, |d| d.script(host, call))
        }
        other => other,
    }
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
}

impl Execute for LocalClient {
    type Output<T: FromValue + 'static> = Result<T>;

    fn execute<T: FromValue + 'static>(&mut self, cmd: Cmd) -> Result<T> {
        let host = self.host;
        run_now(&self.cluster, &[host], false, |d| d.send(host, &cmd))
    }

    fn execute_script<T: FromValue + 'static>(&mut self, call: ScriptCall) -> Result<T> {
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

    // Every list, in order, each on its key's host; scripts loaded first
    // where the host may lack them or where calls follow them. A script
    // call answered NOSCRIPT can only be its key's last call: it is kept
    // for a retry.
    type Retry = (HostId, ScriptCall, Promise<Value>);
    let retries: Rc<RefCell<Vec<Retry>>> = Rc::default();
    let memory = cluster.script_memory();
    let mut out = HashMap::new();
    let mut session = cluster.session(&opts);
    {
        let mut d = Dispatch::new(&mut session, router.clone());
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
                        let p: Promise<Value> = d.script_loading(host, &sc, followed);
                        let (r, retries) = (result.clone(), retries.clone());
                        p.on_result(move |v| match v {
                            Err(e) if e.code() == Some("NOSCRIPT") => {
                                retries.borrow_mut().push((host, sc, r))
                            }
                            v => r.settle(v),
                        });
                    }
                }
                results.push(result);
            }
            // A key given twice: both lists ran; keep both lists' results.
            out.entry(key).or_insert_with(Vec::new).extend(results);
        }
    }
    session.join();
    let _ = session.finish();

    // Once more for the calls whose script vanished in between, within
    // what is left of the timeout.
    let retries = std::mem::take(&mut *retries.borrow_mut());
    if !retries.is_empty() {
        let mut opts = opts;
        if let Some(t) = opts.timeout {
            opts.timeout = Some(t.saturating_sub(started.elapsed()));
        }
        let mut session = cluster.session(&opts);
        {
            let mut d = Dispatch::new(&mut session, router);
            for (host, sc, result) in retries {
                memory.forget(host, sc.script.sha1());
                let p: Promise<Value> = d.script(host, &sc);
                p.on_result(move |v| result.settle(v));
            }
        }
        session.join();
        let _ = session.finish();
    }
    Ok(out)
}

impl std::fmt::Debug for MappingClient<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappingClient").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for FanoutClient<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FanoutClient")
            .field("targets", &self.targets)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for TargetedClient<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetedClient")
            .field("hosts", &self.hosts)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for KeyTargetedClient<'_, '_> {
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
