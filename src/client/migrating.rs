//! Commands of a migrating cluster (see
//! [`ClusterBuilder::migrating_from`](crate::ClusterBuilder::migrating_from)),
//! in maps and through them on the routing client.
//!
//! A key whose old and new owners are the same server is sent as usual.
//! For a key in transit, by what the command does ([`Access`]):
//! - a read goes to the new owner; a miss there is asked again of the old
//!   owner after the map's first join, all such reads batched per host
//!   (with copy-forward, a key found there is then moved to its new owner);
//! - an overwrite (`SET`, `SETEX`) goes to the new owner, and the old copy
//!   is deleted after the join (so a later fallback read cannot see it);
//! - a delete runs on the old owner first, then on the new one (so the
//!   mover, which undoes a copy whose source vanished, cannot bring the key
//!   back);
//! - a command that modifies the key runs on the new owner only if the key
//!   is there (one round trip, a Lua wrapper); otherwise the key is moved
//!   first, then the command runs.
//!
//! Multi-key `MGET`/`MSET`/`DEL`/`UNLINK`/`EXISTS`/`TOUCH` are taken apart
//! into single-key commands (runs of GETs and SETs still merge into
//! MGET/MSET per host).

use std::any::{Any, TypeId};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use crate::cluster::Cluster;
use crate::cmd::{cmd, Cmd};
use crate::convert::FromValue;
use crate::error::{Error, HostId, Result};
use crate::event_loop::Session;
use crate::keyspec;
use crate::migrate::{move_now, same_server, Access, MoveProgress};
use crate::multikey::MultiKey;
use crate::promise::{Promise, ReplyContext, ReplySink, Waiter};
use crate::resp::Value;
use crate::router::Router;

use super::{AsyncClient, Dispatch};

/// Where a migrating map's session reaches the old cluster's hosts: at
/// their id plus this.
pub(super) const OLD_HOSTS: HostId = 1 << 31;

/// Who gets a command's final reply.
pub(super) type Sink = Box<dyn FnOnce(Result<Value>)>;

/// Commands to run after the join on keys the new owner has: (host,
/// command, sink).
pub(super) type Runs = Rc<RefCell<Vec<(HostId, Cmd, Sink)>>>;

/// A read to ask of the key's old owner.
struct Fallback {
    old: HostId,
    new: HostId,
    cmd: Cmd,
    /// Whether the old owner's `EXISTS` decides if it had the key (else
    /// the reply's nil does: GET).
    by_existence: bool,
    sink: Sink,
}

/// A read asked of an old owner, until its answers are in.
struct Asked {
    old: HostId,
    new: HostId,
    cmd: Cmd,
    exists: Option<Promise<Value>>,
    reply: Promise<Value>,
    sink: Sink,
}

/// Work left for after a join.
#[derive(Default)]
struct Followups {
    /// Reads that missed on the new owner.
    fallbacks: Vec<Fallback>,
    /// Overwrites: (old host, key, the new owner's reply, sink). The old
    /// copy goes before the caller hears the write is done.
    stale: Vec<(HostId, Vec<u8>, Promise<Value>, Sink)>,
    /// Deletes: (old host, new host, command, sink).
    deletes: Vec<(HostId, HostId, Cmd, Sink)>,
    /// Modifications of keys the new owner lacks: (old host, new host,
    /// key, command, sink).
    moves: Vec<(HostId, HostId, Vec<u8>, Cmd, Sink)>,
}

impl Followups {
    fn is_empty(&self) -> bool {
        self.fallbacks.is_empty()
            && self.stale.is_empty()
            && self.deletes.is_empty()
            && self.moves.is_empty()
    }
}

/// A map's view of the migration: both clusters and the work pending.
pub(super) struct Migration {
    old: Cluster,
    new: Cluster,
    old_router: Arc<dyn Router>,
    /// Each host's server (address and db), old and new, looked up once.
    old_places: BTreeMap<HostId, Arc<str>>,
    new_places: BTreeMap<HostId, Arc<str>>,
    work: Rc<RefCell<Followups>>,
    /// Reads asked of the old owners, to settle after the next join.
    asking: RefCell<Vec<Asked>>,
    /// Reads the old owner missed too, asked of the new owner once more
    /// (the key may have moved there meanwhile).
    rechecks: RefCell<Vec<(Promise<Value>, Sink)>>,
    /// The map's first failure (follow-ups' failures are the map's too).
    pub(super) failures: super::Failures,
    /// The map's reads, one table per reply type (usually one or two).
    reads: RefCell<Vec<(TypeId, ReadTables)>>,
}

/// A read table, seen as its type (to add to it) and as its misses.
type ReadTables = (Rc<dyn Any>, Rc<dyn Misses>);

impl Migration {
    /// Rejects everything waiting for after a join (reads that missed,
    /// moves, deletes, overwrites, rechecks) with `error`: the map was
    /// cancelled or dropped. What already went to a server is the
    /// session's to cancel.
    pub(super) fn cancel(&self, runs: &Runs, error: &Error) {
        for (_, (_, table)) in self.reads.borrow().iter() {
            table.cancel(error);
        }
        let work = std::mem::take(&mut *self.work.borrow_mut());
        for f in work.fallbacks {
            (f.sink)(Err(error.clone()));
        }
        for (_, _, _, sink) in work.stale {
            sink(Err(error.clone()));
        }
        for (_, _, _, sink) in work.deletes {
            sink(Err(error.clone()));
        }
        for (_, _, _, _, sink) in work.moves {
            sink(Err(error.clone()));
        }
        for (_, _, sink) in std::mem::take(&mut *runs.borrow_mut()) {
            sink(Err(error.clone()));
        }
        for a in std::mem::take(&mut *self.asking.borrow_mut()) {
            (a.sink)(Err(error.clone()));
        }
        for (_, sink) in std::mem::take(&mut *self.rechecks.borrow_mut()) {
            sink(Err(error.clone()));
        }
    }

    /// The migration of `cluster`, if it is migrating.
    pub(super) fn of(cluster: &Cluster) -> Result<Option<Migration>> {
        let Some(old) = cluster.migrating_from() else {
            return Ok(None);
        };
        // The old hosts join a map's session at OLD_HOSTS + id: both id
        // sets must stay below it.
        if let Some(id) = cluster
            .host_ids()
            .into_iter()
            .chain(old.host_ids())
            .find(|&id| id >= OLD_HOSTS)
        {
            return Err(Error::config(format!(
                "a migrating cluster needs host ids below 2^31 in both clusters; host {id} is not"
            )));
        }
        let places = |c: &Cluster| -> BTreeMap<HostId, Arc<str>> {
            c.hosts()
                .iter()
                .map(|h| (h.name().id, h.name().addr.clone()))
                .collect()
        };
        Ok(Some(Migration {
            old_router: old.router()?,
            old_places: places(old),
            new_places: places(cluster),
            old: old.clone(),
            new: cluster.clone(),
            work: Rc::default(),
            asking: RefCell::default(),
            rechecks: RefCell::default(),
            failures: super::Failures::default(),
            reads: RefCell::default(),
        }))
    }

    /// The old owner of `key` when it is another server than `new_host`.
    fn in_transit(&self, key: &[u8], new_host: HostId) -> Result<Option<HostId>> {
        let old_host = self.old_router.host_for_key(key)?;
        let same = match (
            self.old_places.get(&old_host),
            self.new_places.get(&new_host),
        ) {
            (Some(o), Some(n)) => o == n,
            _ => false,
        };
        Ok((!same).then_some(old_host))
    }
}

/// A map's migrating GETs of one reply type: each entry is a GET sent to
/// its key's new owner. A hit settles the caller's promise at once (a
/// plain bulk straight into `T`, as a map's GET does); a miss is marked,
/// and after the join the GET is asked of the key's old owner. One table
/// per map and type, the keys in one buffer: a GET costs an entry, not an
/// allocation (its command goes back to the pool once encoded, as a plain
/// map's does).
struct ReadTable<T> {
    entries: RefCell<Vec<ReadEntry<T>>>,
    /// Every entry's key, one after another.
    keys: RefCell<Vec<u8>>,
}

struct ReadEntry<T> {
    out: Promise<T>,
    host: HostId,
    /// The key's place in [`ReadTable::keys`].
    key: std::ops::Range<usize>,
    /// The new owner answered nil.
    missed: std::cell::Cell<bool>,
}

/// The misses of a read table, whatever its type.
trait Misses {
    /// Empties the table: the reads to ask of the old owners; real misses
    /// (the old owner is the same server) are settled here.
    fn take(&self, m: &Migration) -> Vec<Fallback>;

    /// Empties the table, rejecting the misses still waiting with `error`.
    fn cancel(&self, error: &Error);
}

impl<T: FromValue + 'static> ReplySink for ReadTable<T> {
    fn accept(&self, index: u32, reply: Result<Value>, ctx: &ReplyContext<'_>) {
        let entries = self.entries.borrow();
        let Some(entry) = entries.get(index as usize) else {
            return;
        };
        match reply {
            Ok(Value::Nil) => entry.missed.set(true),
            other => entry
                .out
                .settle(other.and_then(T::from_value).map_err(|e| ctx.failed(e))),
        }
    }

    fn accept_bulk(&self, index: u32, bytes: Option<&[u8]>, ctx: &ReplyContext<'_>) {
        match bytes.and_then(|b| T::from_bulk(Some(b))) {
            Some(result) => {
                if let Some(entry) = self.entries.borrow().get(index as usize) {
                    entry.out.settle(result.map_err(|e| ctx.failed(e)));
                }
            }
            None => self.accept(index, Ok(Value::from_bulk_bytes(bytes)), ctx),
        }
    }

    fn release(&self, _index: u32) {}
}

impl<T: FromValue + 'static> Misses for ReadTable<T> {
    fn cancel(&self, error: &Error) {
        self.keys.borrow_mut().clear();
        for entry in std::mem::take(&mut *self.entries.borrow_mut()) {
            if entry.missed.get() {
                entry.out.settle(Err(error.clone()));
            }
        }
    }

    fn take(&self, m: &Migration) -> Vec<Fallback> {
        let entries = std::mem::take(&mut *self.entries.borrow_mut());
        let keys = std::mem::take(&mut *self.keys.borrow_mut());
        let mut fallbacks = Vec::new();
        for entry in entries {
            if !entry.missed.get() {
                continue; // a hit: settled already
            }
            let key = keys.get(entry.key.clone()).unwrap_or_default();
            match m.in_transit(key, entry.host) {
                Ok(Some(old)) => fallbacks.push(Fallback {
                    old,
                    new: entry.host,
                    sink: settle_into(&entry.out, &m.failures),
                    cmd: cmd("GET").arg(key),
                    by_existence: false,
                }),
                // The key's owner did not change: a real miss.
                Ok(None) => entry.out.settle(T::from_value(Value::Nil)),
                Err(e) => entry.out.settle(Err(e)),
            }
        }
        fallbacks
    }
}

/// A sink settling `out` with the reply converted to `T`; a failure is
/// also the map's (its join reports the first).
fn settle_into<T: FromValue + 'static>(out: &Promise<T>, failures: &super::Failures) -> Sink {
    let (out, failures) = (out.clone(), failures.clone());
    Box::new(move |r: Result<Value>| {
        let r = r.and_then(T::from_value);
        if let Err(e) = &r {
            super::note_failure(&failures, e);
        }
        out.settle(r)
    })
}

impl Dispatch {
    /// Routes `cmd` in a migrating cluster (see the module docs).
    pub(super) fn migrating<T: FromValue + 'static>(&mut self, cmd: Cmd) -> Promise<T> {
        if let Some(kind) = MultiKey::of(&cmd) {
            return self.migrating_multi(kind, &cmd);
        }
        if cmd.common() == crate::cmd::Common::Get {
            // GET's nil means exactly "no such key": its reply decides.
            return match self.router.host_for_command(&cmd) {
                Ok(host) => self.migrating_read(host, cmd),
                Err(e) => self.reject(e),
            };
        }
        let routed = self.router.host_for_command(&cmd).and_then(|host| {
            let key = keyspec::single_key(&cmd)?.to_vec();
            let old = match &self.migration {
                Some(m) => m.in_transit(&key, host)?,
                None => None,
            };
            Ok((host, key, old))
        });
        let (host, key, old) = match routed {
            Ok(r) => r,
            Err(e) => return self.reject(e),
        };
        let Some(old) = old else {
            return self.send(host, &cmd);
        };
        let Some(work) = self.migration.as_ref().map(|m| m.work.clone()) else {
            return self.send(host, &cmd);
        };
        let out = Promise::new();
        match Access::of(&cmd) {
            Access::Read => {
                // Other reads' replies cannot tell a missing key (ZRANK 0,
                // HGET nil on a hash that exists): the key's existence does.
                let probe = crate::cmd::cmd("EXISTS").arg(key.as_slice());
                let first: Promise<Value> = self.send(host, &probe);
                let (pending, sink) = (self.runs.clone(), settle_into(&out, &self.failures));
                first.on_result(move |r| match r {
                    Ok(Value::Int(1)) => pending.borrow_mut().push((host, cmd, sink)),
                    Ok(_) => work.borrow_mut().fallbacks.push(Fallback {
                        old,
                        new: host,
                        cmd,
                        by_existence: true,
                        sink,
                    }),
                    Err(e) => sink(Err(e)),
                });
            }
            Access::Overwrite => {
                let first: Promise<Value> = self.send(host, &cmd);
                work.borrow_mut()
                    .stale
                    .push((old, key, first, settle_into(&out, &self.failures)));
            }
            Access::Delete => {
                work.borrow_mut()
                    .deletes
                    .push((old, host, cmd, settle_into(&out, &self.failures)));
            }
            Access::Modify => self.modify(
                host,
                old,
                key,
                cmd,
                settle_into(&out, &self.failures),
                &work,
            ),
        }
        out
    }

    /// A read: to the new owner through the map's read table for `T`; the
    /// old owner is looked up only for a miss, after the join.
    fn migrating_read<T: FromValue + 'static>(&mut self, host: HostId, cmd: Cmd) -> Promise<T> {
        let table = self.migration.as_ref().and_then(|m| {
            let mut tables = m.reads.borrow_mut();
            let id = TypeId::of::<T>();
            let i = match tables.iter().position(|(t, _)| *t == id) {
                Some(i) => i,
                None => {
                    let table = Rc::new(ReadTable::<T> {
                        entries: RefCell::new(Vec::new()),
                        keys: RefCell::new(Vec::new()),
                    });
                    tables.push((id, (table.clone() as Rc<dyn Any>, table as Rc<dyn Misses>)));
                    tables.len() - 1
                }
            };
            tables[i].1 .0.clone().downcast::<ReadTable<T>>().ok()
        });
        let Some(table) = table else {
            return self.send(host, &cmd);
        };
        let key = match keyspec::single_key(&cmd) {
            Ok(key) => key,
            Err(e) => return self.reject(e),
        };
        let Ok(slot) = u32::try_from(table.entries.borrow().len()) else {
            return self.reject(Error::config("too many reads in one map"));
        };
        let out = Promise::new();
        let key = {
            let mut keys = table.keys.borrow_mut();
            let start = keys.len();
            keys.extend_from_slice(key);
            start..keys.len()
        };
        table.entries.borrow_mut().push(ReadEntry {
            out: out.clone(),
            host,
            key,
            missed: std::cell::Cell::new(false),
        });
        let waiter = Waiter::new(table.clone(), slot);
        self.session.enqueue(host, &cmd, waiter);
        out
    }

    /// A command that changes its key: on the new owner if the key is
    /// there, else after moving it.
    fn modify(
        &mut self,
        host: HostId,
        old: HostId,
        key: Vec<u8>,
        cmd: Cmd,
        sink: Sink,
        work: &Rc<RefCell<Followups>>,
    ) {
        // Whether the new owner has the key decides; the command itself
        // then runs as it is (no wrapper: replies and sizes stay exact).
        let probe = crate::cmd::cmd("EXISTS").arg(key.as_slice());
        let first: Promise<Value> = self.send(host, &probe);
        let work = work.clone();
        let pending = self.runs.clone();
        first.on_result(move |r| match r {
            Ok(Value::Int(1)) => pending.borrow_mut().push((host, cmd, sink)),
            Ok(_) => work.borrow_mut().moves.push((old, host, key, cmd, sink)),
            Err(e) => sink(Err(e)),
        });
    }

    /// MGET/MSET/DEL/UNLINK/EXISTS/TOUCH taken apart per key.
    fn migrating_multi<T: FromValue + 'static>(&mut self, kind: MultiKey, cmd: &Cmd) -> Promise<T> {
        let parts: Vec<Promise<Value>> = single_key_parts(kind, cmd)
            .into_iter()
            .map(|part| self.migrating::<Value>(part))
            .collect();
        Promise::all_owned(parts).map_owned(move |replies| T::from_value(join_parts(kind, replies)))
    }
}

/// A multi-key command taken apart per key: `SET key value` per pair of an
/// MSET, `GET key` per key of an MGET, the same command per key of a
/// DEL/UNLINK/EXISTS/TOUCH.
fn single_key_parts(kind: MultiKey, cmd: &Cmd) -> Vec<Cmd> {
    let args: Vec<&[u8]> = cmd.args().collect();
    match kind {
        MultiKey::Mset => args
            .chunks(2)
            .map(|pair| {
                let mut c = crate::cmd::cmd("SET");
                for a in pair {
                    c.push_arg(*a);
                }
                c
            })
            .collect(),
        MultiKey::Mget => args
            .iter()
            .map(|k| crate::cmd::cmd("GET").arg(*k))
            .collect(),
        MultiKey::Count => {
            let name = String::from_utf8_lossy(cmd.name()).into_owned();
            args.iter()
                .map(|k| crate::cmd::cmd(&name).arg(*k))
                .collect()
        }
    }
}

/// The reply of a multi-key command taken apart per key, from its parts'
/// replies: MGET's values in order, MSET's OK, or the counts summed.
fn join_parts(kind: MultiKey, replies: Vec<Value>) -> Value {
    match kind {
        MultiKey::Mget => Value::Array(replies),
        MultiKey::Mset => Value::SimpleString("OK".into()),
        MultiKey::Count => Value::Int(
            replies
                .iter()
                .map(|r| match r {
                    Value::Int(n) => *n,
                    _ => 0,
                })
                .sum(),
        ),
    }
}

/// Runs what a migrating map left for after its join; returns whether it
/// ran anything (then the map joins again: nothing here enqueues into it).
pub(super) fn run_followups(m: &Migration, runs: &Runs, session: &mut Session) -> bool {
    let tables: Vec<Rc<dyn Misses>> = m
        .reads
        .borrow()
        .iter()
        .map(|(_, (_, t))| t.clone())
        .collect();
    for table in tables {
        let misses = table.take(m);
        m.work.borrow_mut().fallbacks.extend(misses);
    }
    let work = std::mem::take(&mut *m.work.borrow_mut());
    let runs = std::mem::take(&mut *runs.borrow_mut());
    if work.is_empty() && runs.is_empty() {
        return false;
    }
    let counters = m.new.migration_counters().clone();
    // Deletes: the old owner first, then the new one.
    let mut old_side: BTreeMap<HostId, Vec<Cmd>> = BTreeMap::new();
    for (old, _, c, _) in &work.deletes {
        old_side.entry(*old).or_default().push(c.clone());
    }
    let old_counts = run_grouped(&m.old, old_side);
    let mut new_side: BTreeMap<HostId, Vec<Cmd>> = BTreeMap::new();
    for (_, new, c, _) in &work.deletes {
        new_side.entry(*new).or_default().push(c.clone());
    }
    let new_counts = run_grouped(&m.new, new_side);
    let (mut old_counts, mut new_counts) = (old_counts, new_counts);
    for (old, new, _, sink) in work.deletes {
        let a = take_next(&mut old_counts, old);
        let b = take_next(&mut new_counts, new);
        sink(match (a, b) {
            (Ok(Value::Int(x)), Ok(Value::Int(y))) => Ok(Value::Int((x + y).min(1))),
            (Err(e), _) | (_, Err(e)) => Err(e),
            (_, other) => other,
        });
    }
    // Old copies of overwritten keys.
    let mut stale: BTreeMap<HostId, Vec<Cmd>> = BTreeMap::new();
    for (old, key, _, _) in &work.stale {
        stale
            .entry(*old)
            .or_default()
            .push(cmd("DEL").arg(key.as_slice()));
    }
    let mut dels = run_grouped(&m.old, stale);
    for (old, _, first, sink) in work.stale {
        // The write is done when the old copy is gone too: a copy left
        // there could be read once the new value expires or is deleted.
        let del = take_next(&mut dels, old);
        sink(match (first.take(), del) {
            (Ok(v), Ok(_)) => Ok(v),
            (Ok(_), Err(e)) | (Err(e), _) => Err(e),
        });
    }
    // Reads that missed: asked of the old owners in this same session
    // (their hosts are in it at OLD_HOSTS + id), batched per host.
    let asked = !work.fallbacks.is_empty();
    if asked {
        counters
            .fallback_reads
            .fetch_add(work.fallbacks.len() as u64, Relaxed);
        let mut asking = m.asking.borrow_mut();
        for f in work.fallbacks {
            // The read first, then EXISTS: a key the mover takes between
            // them reads as missing and is rechecked on the new owner.
            let reply: Promise<Value> = Promise::new();
            session.enqueue(OLD_HOSTS + f.old, &f.cmd, reply.sink());
            let exists = f.by_existence.then(|| {
                let p: Promise<Value> = Promise::new();
                let probe = crate::cmd::cmd("EXISTS");
                let probe = match keyspec::single_key(&f.cmd) {
                    Ok(key) => probe.arg(key),
                    Err(_) => probe,
                };
                session.enqueue(OLD_HOSTS + f.old, &probe, p.sink());
                p
            });
            asking.push(Asked {
                old: f.old,
                new: f.new,
                cmd: f.cmd,
                exists,
                reply,
                sink: f.sink,
            });
        }
    }
    // Keys to move before their command runs.
    let mut by_old: BTreeMap<HostId, Vec<(Vec<u8>, HostId)>> = BTreeMap::new();
    for (old, new, key, _, _) in &work.moves {
        by_old.entry(*old).or_default().push((key.clone(), *new));
    }
    let mut moved: BTreeMap<HostId, Result<()>> = BTreeMap::new();
    for (old, keys) in by_old {
        let mut progress = MoveProgress::default();
        let n = keys.len() as u64;
        let r = move_now(&m.old, &m.new, old, keys, &mut progress);
        if r.is_ok() {
            counters
                .moved_on_write
                .fetch_add(progress.moved.min(n), Relaxed);
        }
        moved.insert(old, r);
    }
    let mut runs_by_host: BTreeMap<HostId, Vec<(Cmd, Sink)>> = BTreeMap::new();
    for (old, new, _, c, sink) in work.moves {
        match moved.get(&old) {
            Some(Err(e)) => sink(Err(e.clone())),
            _ => runs_by_host.entry(new).or_default().push((c, sink)),
        }
    }
    for (host, c, sink) in runs {
        runs_by_host.entry(host).or_default().push((c, sink));
    }
    for (host, items) in runs_by_host {
        let (cmds, sinks): (Vec<Cmd>, Vec<Sink>) = items.into_iter().unzip();
        let replies = match m.new.local_client(host) {
            Ok(local) => local.pipeline(cmds),
            Err(e) => sinks.iter().map(|_| Err(e.clone())).collect(),
        };
        for (r, sink) in replies.into_iter().zip(sinks) {
            sink(r);
        }
    }
    true
}

/// Hands the old owners' answers (after the join that read them) to the
/// reads that missed. A read the old owner missed too is asked of the new
/// owner once more: a mover or a writer may have moved the key there
/// between the two reads. Returns whether such rechecks were queued (the
/// map then joins again and calls [`settle_rechecks`]).
pub(super) fn settle_fallbacks(m: &Migration, session: &mut Session) -> bool {
    let asking = std::mem::take(&mut *m.asking.borrow_mut());
    let counters = m.new.migration_counters();
    let mut hits = 0;
    let mut rechecks = m.rechecks.borrow_mut();
    // Keys found on their old owner, to move (copy-forward), by old host.
    let mut forward: BTreeMap<HostId, Vec<(Vec<u8>, HostId)>> = BTreeMap::new();
    let copy_forward = m.new.copies_forward();
    for a in asking {
        let r = a.reply.take();
        let missing = match &a.exists {
            Some(exists) => matches!(exists.take(), Ok(Value::Int(0))),
            None => matches!(&r, Ok(Value::Nil)),
        };
        if missing && r.is_ok() {
            let again: Promise<Value> = Promise::new();
            session.enqueue(a.new, &a.cmd, again.sink());
            rechecks.push((again, a.sink));
        } else {
            if r.is_ok() {
                hits += 1;
                if let (true, Ok(key)) = (copy_forward, keyspec::single_key(&a.cmd)) {
                    forward
                        .entry(a.old)
                        .or_default()
                        .push((key.to_vec(), a.new));
                }
            }
            (a.sink)(r);
        }
    }
    if hits > 0 {
        counters.fallback_hits.fetch_add(hits, Relaxed);
    }
    for (old, keys) in forward {
        let n = keys.len() as u64;
        let mut progress = MoveProgress::default();
        let failed = move_now(&m.old, &m.new, old, keys, &mut progress).is_err();
        // Keys copied before a failure count as copied (their old copies
        // stay for the mover to delete); the rest as failures.
        counters.copied_forward.fetch_add(progress.copied, Relaxed);
        if failed {
            counters
                .copy_forward_failures
                .fetch_add(n.saturating_sub(progress.copied), Relaxed);
        }
    }
    !rechecks.is_empty()
}

/// Settles the reads asked of the new owner once more.
pub(super) fn settle_rechecks(m: &Migration) {
    for (p, sink) in std::mem::take(&mut *m.rechecks.borrow_mut()) {
        sink(p.take());
    }
}

/// Runs each host's commands as one pipeline; the replies by host, in order.
fn run_grouped(
    cluster: &Cluster,
    groups: BTreeMap<HostId, Vec<Cmd>>,
) -> BTreeMap<HostId, std::vec::IntoIter<Result<Value>>> {
    groups
        .into_iter()
        .map(|(host, cmds)| {
            let n = cmds.len();
            let replies = match cluster.local_client(host) {
                Ok(local) => local.pipeline(cmds),
                Err(e) => (0..n).map(|_| Err(e.clone())).collect(),
            };
            (host, replies.into_iter())
        })
        .collect()
}

fn take_next(
    replies: &mut BTreeMap<HostId, std::vec::IntoIter<Result<Value>>>,
    host: HostId,
) -> Result<Value> {
    replies
        .get_mut(&host)
        .and_then(Iterator::next)
        .unwrap_or_else(|| Err(Error::config("a migration reply is missing")))
}

impl super::AsyncClient {
    /// [`Dispatch::migrating`]'s rules for the async client: each request
    /// a future that asks the old owner, moves or deletes as needed.
    pub(super) fn migrating<T: FromValue + 'static>(&self, cmd: Cmd) -> crate::Reply<T> {
        use crate::Reply;
        let Some(old_client) = self.previous().cloned() else {
            return Reply::ready(Err(Error::config("not migrating")));
        };
        if let Some(kind) = MultiKey::of(&cmd) {
            return self.migrating_multi(kind, &cmd);
        }
        let cluster = self.cluster().clone();
        let Some(old) = cluster.migrating_from().cloned() else {
            return Reply::ready(Err(Error::config("not migrating")));
        };
        let routed = (|| {
            let host = cluster.router()?.host_for_command(&cmd)?;
            let key = keyspec::single_key(&cmd)?.to_vec();
            let old_host = old.router()?.host_for_key(&key)?;
            let moving = !same_server(&old, old_host, &cluster, host)?;
            Ok::<_, Error>((host, key, old_host, moving))
        })();
        let (host, key, old_host, moving) = match routed {
            Ok(r) => r,
            Err(e) => return Reply::ready(Err(e)),
        };
        if !moving {
            return self.send(host, cmd);
        }
        let client = self.clone();
        let counters = cluster.migration_counters().clone();
        let access = Access::of(&cmd);
        Reply::from_future(async move {
            let reply: Value = match access {
                Access::Read => {
                    // GET's nil means "no such key"; for any other read the
                    // key's existence decides (ZRANK 0 is an answer).
                    let is_get = cmd.common() == crate::cmd::Common::Get;
                    let exists = |c: &AsyncClient, h: HostId| {
                        c.send::<i64>(h, crate::cmd::cmd("EXISTS").arg(key.as_slice()))
                    };
                    let (here, first) = if is_get {
                        let first: Value = client.send(host, cmd.clone()).await?;
                        (first != Value::Nil, Some(first))
                    } else {
                        (exists(&client, host).await? == 1, None)
                    };
                    if here {
                        match first {
                            Some(v) => v,
                            None => client.send(host, cmd).await?,
                        }
                    } else {
                        counters.fallback_reads.fetch_add(1, Relaxed);
                        // The read first, then EXISTS (see the map's form).
                        let second = old_client.send::<Value>(old_host, cmd.clone());
                        let there = if is_get {
                            None
                        } else {
                            Some(exists(&old_client, old_host))
                        };
                        let second: Value = second.await?;
                        let found = match there {
                            Some(e) => e.await? == 1,
                            None => second != Value::Nil,
                        };
                        if found {
                            counters.fallback_hits.fetch_add(1, Relaxed);
                            if cluster.copies_forward() {
                                // The read stands whatever the move does.
                                match move_key(&old_client, &client, old_host, host, &key).await {
                                    Ok(copied) => counters
                                        .copied_forward
                                        .fetch_add(u64::from(copied), Relaxed),
                                    Err(_) => counters.copy_forward_failures.fetch_add(1, Relaxed),
                                };
                            }
                            second
                        } else {
                            // Moved to the new owner between the two reads?
                            client.send(host, cmd).await?
                        }
                    }
                }
                Access::Overwrite => {
                    let r: Value = client.send(host, cmd).await?;
                    // Done when the old copy is gone too.
                    let _: Value = old_client
                        .send(old_host, crate::cmd::cmd("DEL").arg(key.as_slice()))
                        .await?;
                    r
                }
                Access::Delete => {
                    let a: Value = old_client.send(old_host, cmd.clone()).await?;
                    let b: Value = client.send(host, cmd).await?;
                    match (a, b) {
                        (Value::Int(x), Value::Int(y)) => Value::Int((x + y).min(1)),
                        (_, b) => b,
                    }
                }
                Access::Modify => {
                    let exists: i64 = client
                        .send(host, crate::cmd::cmd("EXISTS").arg(key.as_slice()))
                        .await?;
                    if exists == 0 && move_key(&old_client, &client, old_host, host, &key).await? {
                        counters.moved_on_write.fetch_add(1, Relaxed);
                    }
                    client.send(host, cmd).await?
                }
            };
            T::from_value(reply)
        })
    }

    fn migrating_multi<T: FromValue + 'static>(
        &self,
        kind: MultiKey,
        cmd: &Cmd,
    ) -> crate::Reply<T> {
        let parts: Vec<crate::Reply<Value>> = single_key_parts(kind, cmd)
            .into_iter()
            .map(|part| self.migrating::<Value>(part))
            .collect();
        crate::Reply::join(parts, move |replies| {
            T::from_value(join_parts(kind, replies))
        })
    }
}

/// Moves one key from `old_host` (through `old`) to `new_host` (through
/// `new`) with `DUMP`/`RESTORE` (see [`move_now`] for why not `MIGRATE`):
/// whether this call copied it.
async fn move_key(
    old: &super::AsyncClient,
    new: &super::AsyncClient,
    old_host: HostId,
    new_host: HostId,
    key: &[u8],
) -> Result<bool> {
    let ttl = old.send::<i64>(old_host, cmd("PTTL").arg(key));
    let dump = old.send::<Option<Vec<u8>>>(old_host, cmd("DUMP").arg(key));
    let (ttl, dump) = (ttl.await?, dump.await?);
    let Some(payload) = dump else {
        return Ok(false);
    };
    if ttl == -2 {
        return Ok(false);
    }
    let restore = cmd("RESTORE")
        .arg(key)
        .arg(ttl.max(0))
        .arg(payload.as_slice());
    let restored = match new.send::<Value>(new_host, restore).await {
        Ok(_) => true,
        Err(e) if e.code() == Some("BUSYKEY") => false,
        Err(e) => return Err(e),
    };
    let cas = |k: &[u8], p: &[u8]| {
        cmd("EVAL")
            .arg(crate::migrate::DELETE_IF_UNCHANGED)
            .arg(1)
            .arg(k)
            .arg(p)
    };
    let deleted: Vec<i64> = old.send(old_host, cas(key, &payload)).await?;
    if deleted.first() != Some(&1) && restored {
        // Deleted from the old host meanwhile: the copy must not stand.
        let _: Vec<i64> = new.send(new_host, cas(key, &payload)).await?;
    }
    Ok(restored)
}

/// On a migrating cluster, moves each of `keys` that is still on its old
/// owner to its new one now (a transaction or a command list then runs
/// where every key is). Nothing to do on a cluster that is not migrating.
///
/// # Errors
///
/// A routing error or the move's.
pub(super) fn move_in_transit<'k>(
    cluster: &Cluster,
    keys: impl IntoIterator<Item = &'k [u8]>,
) -> Result<()> {
    let Some(old) = cluster.migrating_from() else {
        return Ok(());
    };
    let (old_router, new_router) = (old.router()?, cluster.router()?);
    let mut leaving: BTreeMap<HostId, Vec<(Vec<u8>, HostId)>> = BTreeMap::new();
    for key in keys {
        let (from, to) = (old_router.host_for_key(key)?, new_router.host_for_key(key)?);
        if !same_server(old, from, cluster, to)? {
            leaving.entry(from).or_default().push((key.to_vec(), to));
        }
    }
    for (from, keys) in leaving {
        let mut progress = MoveProgress::default();
        move_now(old, cluster, from, keys, &mut progress)?;
        cluster
            .migration_counters()
            .moved_on_write
            .fetch_add(progress.moved, Relaxed);
    }
    Ok(())
}
