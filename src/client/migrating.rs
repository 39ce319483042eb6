//! Commands of a migrating cluster (see
//! [`ClusterBuilder::migrating_from`](crate::ClusterBuilder::migrating_from)),
//! in maps and through them on the routing client.
//!
//! A key whose old and new owners are the same server is sent as usual.
//! For a key in transit, by what the command does ([`Access`]):
//! - a read goes to the new owner; a miss there is asked again of the old
//!   owner, all such reads batched per host: a GET's as soon as its nil
//!   comes in (while the join reads the rest), other reads' after the
//!   join (with copy-forward, a key found there is then moved to its new
//!   owner);
//! - an overwrite (`SET`, `SETEX`) goes to the new owner, and the old copy
//!   is deleted after the join (so a later fallback read cannot see it);
//! - a delete runs on the old owner first, then on the new one, where it
//!   marks the key deleted first (so a move half-way cannot bring the key
//!   back: see [`crate::handoff::COPIES`]);
//! - a command that modifies the key runs on the new owner if the key is
//!   there (an `EXISTS` first); otherwise the key is moved first, then the
//!   command runs.
//!
//! Writes on the new owner (overwrites, modifications) drop the key's
//! record as a move's copy first, on the same connection, so that no move
//! takes back what they wrote.
//!
//! Multi-key `MGET`/`MSET`/`DEL`/`UNLINK`/`EXISTS`/`TOUCH` are taken apart
//! into single-key commands (runs of GETs and SETs still merge into
//! MGET/MSET per host).

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::BuildHasherDefault;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use crate::cluster::Cluster;
use crate::cmd::{cmd, Call, Cmd};
use crate::convert::FromValue;
use crate::error::{Error, HostId, Result};
use crate::event_loop::Session;
use crate::handoff::copies::{self, Restored, Settle};
use crate::handoff::{Access, DELETE_IF_UNCHANGED, UNCHANGED};
use crate::keyspec;
use crate::multikey::MultiKey;
use crate::promise::{Promise, ReplyContext, ReplySink, Waiter};
use crate::resp::Value;
use crate::router::Router;
use crate::server_facts::write_epoch;

use super::moving::{move_now, same_server, MoveProgress};
use super::{AsyncClient, Dispatch};

/// Where a migrating map's session reaches the old cluster's hosts: at
/// their id plus this.
pub(super) const OLD_HOSTS: HostId = crate::event_loop::SECOND_BASE;

/// Who gets a command's final reply.
pub(super) type Sink = Box<dyn FnOnce(Result<Value>)>;

/// Commands to run after the join on keys the new owner has: (host,
/// command, sink).
pub(super) type Runs = Rc<RefCell<Vec<(HostId, Cmd, Sink)>>>;

/// An overwrite of a key in transit, sent to its new owner.
struct Overwrite {
    old: HostId,
    new: HostId,
    key: Vec<u8>,
    /// The new owner's reply.
    first: Promise<Value>,
    sink: Sink,
}

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
    /// Overwrites: the old copy goes before the caller hears the write is
    /// done.
    stale: Vec<Overwrite>,
    /// Deletes: (old host, new host, command, sink).
    deletes: Vec<(HostId, HostId, Cmd, Sink)>,
    /// Old copies to delete before a command that may empty its key runs
    /// on the new owner, which has it: (old host, key).
    clears: Vec<(HostId, Vec<u8>)>,
    /// Modifications of keys the new owner lacks: (old host, new host,
    /// key, command, sink).
    moves: Vec<(HostId, HostId, Vec<u8>, Cmd, Sink)>,
}

impl Followups {
    fn is_empty(&self) -> bool {
        self.fallbacks.is_empty()
            && self.stale.is_empty()
            && self.clears.is_empty()
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
    /// The (old host, new host) pairs that are one server.
    same_server: BTreeSet<(HostId, HostId)>,
    work: Rc<RefCell<Followups>>,
    /// Reads asked of the old owners, to settle after the next join.
    asking: RefCell<Vec<Asked>>,
    /// Reads the old owner missed too, asked of the new owner once more
    /// (the key may have moved there meanwhile).
    rechecks: RefCell<Vec<(Promise<Value>, Sink)>>,
    /// The old hosts' write epochs known before this map sent anything.
    epochs_before: HashMap<Arc<str>, u64>,
    /// Each old host's write epoch, read after its fallback reads.
    epoch_reads: RefCell<Vec<(HostId, Rc<EpochRead>)>>,
    /// The map's first failure (follow-ups' failures are the map's too).
    pub(super) failures: super::Failures,
    /// The new cluster's router (a GET that missed is routed again).
    new_router: Arc<dyn Router>,
    /// The new cluster's hosts' names, for the errors the map makes.
    new_names: BTreeMap<HostId, crate::error::HostName>,
    /// The map's GETs.
    reads: Rc<ReadTable>,
    /// Old hosts asked for GETs that missed, and how many GETs, since the
    /// last join's steps (see [`ask_old_owners`]).
    asked: RefCell<(BTreeSet<HostId>, u64)>,
    /// Keys with a step left for after this round's join (a delete, a
    /// move, a probe), by their CRC-32: later commands on them wait for the
    /// next round (another key with the same CRC waits too, harmlessly).
    pending: RefCell<KeyCrcs>,
    /// Those later commands, in order.
    queued: RefCell<Vec<(Cmd, Sink)>>,
    /// This round's GET keys by CRC-32, made at the round's first write of
    /// a key in transit (a write of a key a GET before it may read on its
    /// new owner once more after the join waits for the next round).
    read_keys: RefCell<Option<KeyCrcs>>,
}

/// Keys by CRC-32 (see [`KeyCrc`]).
type KeyCrcs = HashSet<u32, BuildHasherDefault<KeyCrc>>;

impl Migration {
    /// Whether a GET of `key` came earlier in this round.
    fn read_before(&self, key: &[u8]) -> bool {
        let mut read_keys = self.read_keys.borrow_mut();
        let set = read_keys.get_or_insert_with(|| {
            self.reads
                .keys
                .borrow()
                .keys()
                .map(crc32fast::hash)
                .collect()
        });
        set.contains(&crc32fast::hash(key))
    }
}

impl Migration {
    /// Rejects everything waiting for after a join (reads that missed,
    /// moves, deletes, overwrites, rechecks) with `error`: the map was
    /// cancelled or dropped. What already went to a server is the
    /// session's to cancel.
    pub(super) fn cancel(&self, session: &Session, runs: &Runs, error: &Error) {
        self.reads.cancel(session, error, &self.failures);
        *self.asked.borrow_mut() = Default::default();
        let work = std::mem::take(&mut *self.work.borrow_mut());
        for f in work.fallbacks {
            (f.sink)(Err(error.clone()));
        }
        for Overwrite { sink, .. } in work.stale {
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
        for (_, sink) in take_queued(self) {
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
        let (old_places, new_places) = (places(old), places(cluster));
        let same_server = old_places
            .iter()
            .flat_map(|(&o, op)| {
                new_places
                    .iter()
                    .filter(move |(_, np)| *np == op)
                    .map(move |(&n, _)| (o, n))
            })
            .collect();
        Ok(Some(Migration {
            epochs_before: cluster.server_facts().epochs(),
            epoch_reads: RefCell::default(),
            old_router: old.router()?,
            old_places,
            same_server,
            old: old.clone(),
            new: cluster.clone(),
            work: Rc::default(),
            asking: RefCell::default(),
            rechecks: RefCell::default(),
            failures: super::Failures::default(),
            new_router: cluster.router()?,
            new_names: cluster
                .hosts()
                .iter()
                .map(|h| (h.name().id, h.name().clone()))
                .collect(),
            reads: Rc::new(ReadTable::new()),
            asked: RefCell::default(),
            pending: RefCell::default(),
            queued: RefCell::default(),
            read_keys: RefCell::default(),
        }))
    }

    /// The old owner of `key` when it is another server than `new_host`.
    fn in_transit(&self, key: &[u8], new_host: HostId) -> Result<Option<HostId>> {
        let old_host = self.old_router.host_for_key(key)?;
        let same = self.same_server.contains(&(old_host, new_host));
        Ok((!same).then_some(old_host))
    }
}

/// Queues, after the map's overwrites of keys in transit and before the
/// join (so before their old copies are deleted, after it), the drop of
/// each key's record as a move's copy on its new owner, one `HDEL` per
/// host (see [`crate::handoff::COPIES`]): a move takes its copy back only
/// once the old copy is gone, and an overwrite's old copy goes only after
/// this, so no move takes back what the map wrote (the `SET`s stay merged
/// into `MSET`s). Its answer is not the map's: a user not allowed to write
/// the record still writes the keys.
pub(super) fn forget_overwritten(m: &Migration, session: &mut Session) {
    let work = m.work.borrow();
    let mut by_host: BTreeMap<HostId, Cmd> = BTreeMap::new();
    for Overwrite { new: host, key, .. } in &work.stale {
        by_host
            .entry(*host)
            .or_insert_with(|| cmd("HDEL").arg(crate::handoff::COPIES))
            .push_arg(key.as_slice());
    }
    drop(work);
    for (host, forget) in by_host {
        enqueue_ignored(session, host, &forget);
    }
}

/// Queues `cmd` to `host` in `session`; its answer is not the map's (the
/// records' steps: a user not allowed to write them still writes keys).
fn enqueue_ignored(session: &mut Session, host: HostId, cmd: &Cmd) {
    session.enqueue(host, cmd, Waiter::new(Rc::new(Ignored), 0));
}

/// A reply nobody waits for.
struct Ignored;

impl ReplySink for Ignored {
    fn accept(&self, _index: u32, _reply: Result<Value>, _ctx: &ReplyContext<'_>) {}

    fn release(&self, _index: u32) {}
}

/// The host and key of a single-key command; a script call (`EVAL` or
/// `EVALSHA`) of one key goes where its key lives, as scripts do.
fn route<'c>(router: &dyn Router, cmd: &'c Cmd) -> Result<(HostId, &'c [u8])> {
    if is_script(cmd) {
        let key = key_of(cmd)?;
        return Ok((router.host_for_key(key)?, key));
    }
    Ok((router.host_for_command(cmd)?, keyspec::single_key(cmd)?))
}

fn is_script(cmd: &Cmd) -> bool {
    cmd.is(b"EVAL") || cmd.is(b"EVALSHA")
}

/// The key of a single-key command or script call.
fn key_of(cmd: &Cmd) -> Result<&[u8]> {
    if !is_script(cmd) {
        return keyspec::single_key(cmd);
    }
    match keyspec::all_keys(cmd)?.as_slice() {
        [key] => Ok(key),
        _ => Err(Error::unroutable(
            cmd.name(),
            "a script on a migrating cluster takes exactly one key",
        )),
    }
}

/// A hasher for keys' CRC-32s (already spread: used as they are).
#[derive(Default)]
struct KeyCrc(u64);

impl std::hash::Hasher for KeyCrc {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n);
    }
}

/// A map's GET keys, one after another. A GET's waiter carries its key's
/// place here (see [`Waiter::for_migrating_get`]): a hit settles its
/// promise as a plain map's GET does, and only a miss looks its key up,
/// in the join. Keys are kept as the GET's encoded argument
/// (`$<len>\r\n<key>\r\n`, which says where it ends): a copy, where taking
/// the key out would cost every GET a parse that only misses need.
#[derive(Default)]
struct GetKeys {
    bytes: Vec<u8>,
}

impl GetKeys {
    /// Adds the encoded argument of a GET; its place, or `None` past 4 GiB
    /// of keys in one map.
    #[inline]
    fn push(&mut self, encoded: &[u8]) -> Option<u32> {
        let slot = u32::try_from(self.bytes.len()).ok()?;
        u32::try_from(self.bytes.len() + encoded.len()).ok()?;
        self.bytes.extend_from_slice(encoded);
        Some(slot)
    }

    /// Every key, in order.
    fn keys(&self) -> impl Iterator<Item = &[u8]> {
        let mut rest = self.bytes.as_slice();
        std::iter::from_fn(move || {
            let (key, after) = crate::cmd::split_first_encoded(rest)?;
            rest = after;
            Some(key)
        })
    }

    /// The key at `slot`.
    fn key(&self, slot: u32) -> &[u8] {
        self.at(slot).0
    }

    /// The key at `slot` and its encoded argument.
    fn at(&self, slot: u32) -> (&[u8], &[u8]) {
        let from = self.bytes.get(slot as usize..).unwrap_or_default();
        match crate::cmd::split_first_encoded(from) {
            Some((key, rest)) => (key, &from[..from.len() - rest.len()]),
            None => (&[], &[]),
        }
    }
}

/// A map's migrating GETs: every GET's key, and those that missed on their
/// new owner. Each of these is asked of its old owner during the join
/// (see [`ask_old_owners`]), then (if that misses too and the old owner's
/// keys changed meanwhile) of the new owner once more, all answered into
/// this table, which hands the final reply to the GET's own waiter (so its
/// promise converts it as a plain GET's would). The buffers are kept
/// between maps on the thread (growing them anew for each map cost more
/// than all else a hit adds), up to [`KEEP_BYTES`] each.
#[derive(Default)]
struct ReadTable {
    keys: RefCell<GetKeys>,
    /// The GETs that missed. Entries change through `Cell`s, so a reply
    /// may arrive (the session reads while it sends) while they are read.
    missed: RefCell<Vec<ReadEntry>>,
    /// Entries before this one were asked of their old owners (or settled).
    asked_up_to: std::cell::Cell<usize>,
}

struct ReadEntry {
    /// The GET's waiter, until its final reply is handed over.
    waiter: std::cell::Cell<Option<Waiter>>,
    /// The key's place in [`ReadTable::keys`].
    slot: u32,
    /// The key's new owner.
    host: HostId,
    state: std::cell::Cell<ReadState>,
}

/// The room a buffer kept for the thread's next map may have: a thread
/// keeps at most about 3 MiB for maps (this, twice, and a session's
/// miss list), whatever the largest map it ran.
const KEEP_BYTES: usize = 1 << 20;

/// Buffers of a [`ReadTable`] kept for the thread's next map.
type SpareReads = (Vec<u8>, Vec<ReadEntry>);

thread_local! {
    /// The last map's emptied read table buffers.
    static SPARE_READS: RefCell<Option<SpareReads>> = const { RefCell::new(None) };
}

impl ReadTable {
    /// An empty table, on buffers kept from an earlier map when there are.
    fn new() -> ReadTable {
        let spare = SPARE_READS
            .try_with(|spare| spare.try_borrow_mut().ok().and_then(|mut s| s.take()))
            .ok()
            .flatten();
        let Some((bytes, missed)) = spare else {
            return ReadTable::default();
        };
        ReadTable {
            keys: RefCell::new(GetKeys { bytes }),
            missed: RefCell::new(missed),
            asked_up_to: std::cell::Cell::new(0),
        }
    }
}

impl Drop for ReadTable {
    fn drop(&mut self) {
        let keys = std::mem::take(self.keys.get_mut());
        let mut bytes = keys.bytes;
        let mut missed = std::mem::take(self.missed.get_mut());
        bytes.clear();
        missed.clear();
        bytes.shrink_to(KEEP_BYTES);
        missed.shrink_to(KEEP_BYTES / std::mem::size_of::<ReadEntry>());
        // Plain buffers: a pair that cannot be kept (a thread's exit, a
        // spare already there) just goes.
        let _ = SPARE_READS.try_with(|spare| {
            if let Ok(mut spare) = spare.try_borrow_mut() {
                spare.get_or_insert((bytes, missed));
            }
        });
    }
}

/// Where a migrating GET that missed stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReadState {
    /// The new owner answered nil.
    MissedNew,
    /// Asked of this old owner.
    AskingOld(HostId),
    /// This old owner answered nil too.
    MissedOld(HostId),
    /// This old owner had it (settled; copy-forward may move it).
    FoundOld(HostId),
    /// Asked of the new owner once more.
    Rechecking,
    /// Settled.
    Done,
}

/// The context of a reply the map settles itself (a final nil, a failure
/// found before asking a server).
fn own_context(failures: &RefCell<Option<Error>>) -> ReplyContext<'_> {
    ReplyContext {
        host: None,
        command: "GET",
        failures,
        misses: None,
    }
}

/// Settles `waiter` with the final nil of a GET whose key is nowhere,
/// naming the key's new owner `host` (where a conversion to a type nil
/// does not fit then fails).
fn settle_final_nil(m: &Migration, host: HostId, waiter: Waiter) {
    let ctx = ReplyContext {
        host: m.new_names.get(&host),
        command: "GET",
        failures: &m.failures,
        misses: None,
    };
    waiter.accept_bulk(None, &ctx);
}

impl ReadTable {
    /// Takes in the GETs that missed on their new owners (from `session`).
    fn absorb(&self, m: &Migration, session: &Session) {
        let ctx = own_context(&m.failures);
        let keys = self.keys.borrow();
        let mut missed = self.missed.borrow_mut();
        session.drain_misses(|(host, mut waiter)| {
            let Some(slot) = waiter.take_miss_slot() else {
                return waiter.accept_bulk(None, &ctx);
            };
            // The host that answered, when it is one of the new cluster's.
            let host = match host.filter(|&h| h < OLD_HOSTS) {
                Some(host) => Ok(host),
                None => m
                    .new_router
                    .host_for_command(&Cmd::get_command().arg(keys.key(slot))),
            };
            match host {
                Ok(host) => missed.push(ReadEntry {
                    waiter: std::cell::Cell::new(Some(waiter)),
                    slot,
                    host,
                    state: std::cell::Cell::new(ReadState::MissedNew),
                }),
                Err(e) => waiter.accept(Err(e), &ctx),
            }
        });
    }

    /// Entry `index`'s reply from the server it was asked of: an old
    /// owner's nil leaves it for the steps after the join; any other reply
    /// is the GET's own, handed to its waiter.
    fn answer(&self, index: u32, reply: Reply<'_>, ctx: &ReplyContext<'_>) {
        let missed = self.missed.borrow();
        let Some(entry) = missed.get(index as usize) else {
            return;
        };
        let next = match (entry.state.get(), &reply) {
            (ReadState::AskingOld(old), Reply::Bulk(None) | Reply::Whole(Ok(Value::Nil))) => {
                entry.state.set(ReadState::MissedOld(old));
                return;
            }
            (ReadState::AskingOld(old), Reply::Bulk(Some(_)) | Reply::Whole(Ok(_))) => {
                ReadState::FoundOld(old)
            }
            (ReadState::AskingOld(_) | ReadState::Rechecking, _) => ReadState::Done,
            // Not waiting for a reply: nothing to do.
            _ => return,
        };
        entry.state.set(next);
        if let Some(waiter) = entry.waiter.take() {
            match reply {
                Reply::Bulk(bytes) => waiter.accept_bulk(bytes, ctx),
                Reply::Whole(reply) => waiter.accept(reply, ctx),
            }
        }
    }

    /// Asks the old owners (in `session`, batched per host) for the reads
    /// the new owners missed, adding the hosts asked to `asked`; settles
    /// real misses (the old owner is the same server). How many it asked.
    fn ask_old(
        self: &Rc<Self>,
        m: &Migration,
        session: &mut Session,
        asked: &mut BTreeSet<HostId>,
    ) -> u64 {
        let ctx = own_context(&m.failures);
        let (missed, keys) = (self.missed.borrow(), self.keys.borrow());
        let mut count = 0;
        // The hosts asked, few: a list, not a set insert per read.
        let mut hosts: Vec<HostId> = Vec::new();
        let from = self.asked_up_to.replace(missed.len());
        for (index, entry) in missed.iter().enumerate().skip(from) {
            if entry.state.get() != ReadState::MissedNew {
                continue;
            }
            let (key, encoded) = keys.at(entry.slot);
            match m.in_transit(key, entry.host) {
                Ok(Some(old)) => {
                    entry.state.set(ReadState::AskingOld(old));
                    let sink: Rc<dyn ReplySink> = self.clone();
                    // Indexes fit in u32: there are fewer than GET slots.
                    let waiter = Waiter::new(sink, index as u32);
                    session.enqueue(OLD_HOSTS + old, &Cmd::get_encoded(encoded), waiter);
                    if !hosts.contains(&old) {
                        hosts.push(old);
                    }
                    count += 1;
                }
                // The key's owner did not change: a real miss.
                Ok(None) => {
                    entry.state.set(ReadState::Done);
                    if let Some(w) = entry.waiter.take() {
                        settle_final_nil(m, entry.host, w);
                    }
                }
                Err(e) => {
                    entry.state.set(ReadState::Done);
                    if let Some(w) = entry.waiter.take() {
                        w.accept(Err(e), &ctx);
                    }
                }
            }
        }
        asked.extend(hosts);
        count
    }

    /// After the old owners answered: a read the old owner had is a hit
    /// (its key goes to `forward` with copy-forward); one it missed is
    /// settled as nil if its old host is `unchanged`, else asked of the
    /// new owner once more. (hits, rechecks).
    fn after_old(
        self: &Rc<Self>,
        m: &Migration,
        unchanged: &BTreeSet<HostId>,
        session: &mut Session,
        forward: &mut BTreeMap<HostId, Vec<(Vec<u8>, HostId)>>,
    ) -> (u64, u64) {
        let copy_forward = m.new.copies_forward();
        let (missed, keys) = (self.missed.borrow(), self.keys.borrow());
        let (mut hits, mut rechecks) = (0, 0);
        for (index, entry) in missed.iter().enumerate() {
            match entry.state.get() {
                ReadState::FoundOld(old) => {
                    entry.state.set(ReadState::Done);
                    hits += 1;
                    if copy_forward {
                        let key = keys.key(entry.slot).to_vec();
                        forward.entry(old).or_default().push((key, entry.host));
                    }
                }
                ReadState::MissedOld(old) if unchanged.contains(&old) => {
                    entry.state.set(ReadState::Done);
                    if let Some(w) = entry.waiter.take() {
                        settle_final_nil(m, entry.host, w);
                    }
                }
                ReadState::MissedOld(_) => {
                    entry.state.set(ReadState::Rechecking);
                    let sink: Rc<dyn ReplySink> = self.clone();
                    let waiter = Waiter::new(sink, index as u32);
                    let get = Cmd::get_encoded(keys.at(entry.slot).1);
                    session.enqueue(entry.host, &get, waiter);
                    rechecks += 1;
                }
                _ => {}
            }
        }
        (hits, rechecks)
    }

    /// Rejects every read not yet settled with `error`, and with it the
    /// GETs that missed and were not taken in yet (from `session`).
    fn cancel(&self, session: &Session, error: &Error, failures: &RefCell<Option<Error>>) {
        let ctx = own_context(failures);
        session.drain_misses(|(_, w)| w.accept(Err(error.clone()), &ctx));
        for entry in self.missed.borrow().iter() {
            entry.state.set(ReadState::Done);
            if let Some(w) = entry.waiter.take() {
                w.accept(Err(error.clone()), &ctx);
            }
        }
        self.compact();
    }

    /// Empties the table once every read is settled (a long-lived mapping
    /// client keeps no entry or key past its join). Every GET sent before
    /// is answered by then: its key is not needed any more.
    fn compact(&self) {
        let mut missed = self.missed.borrow_mut();
        if missed.iter().all(|e| e.state.get() == ReadState::Done) {
            missed.clear();
            self.asked_up_to.set(0);
            let mut keys = self.keys.borrow_mut();
            keys.bytes.clear();
        }
    }
}

/// A reply on its way to a GET's waiter.
enum Reply<'a> {
    Bulk(Option<&'a [u8]>),
    Whole(Result<Value>),
}

impl ReplySink for ReadTable {
    fn accept(&self, index: u32, reply: Result<Value>, ctx: &ReplyContext<'_>) {
        self.answer(index, Reply::Whole(reply), ctx);
    }

    fn accept_bulk(&self, index: u32, bytes: Option<&[u8]>, ctx: &ReplyContext<'_>) {
        self.answer(index, Reply::Bulk(bytes), ctx);
    }

    fn release(&self, _index: u32) {}
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
        if let Some(m) = &self.migration {
            if !m.pending.borrow().is_empty() && self.waits_for_its_key(m, &cmd) {
                return self.queue(cmd);
            }
        }
        if cmd.common() == crate::cmd::Common::Get {
            // GET's nil means exactly "no such key": its reply decides.
            return match self.router.host_for_command(&cmd) {
                Ok(host) => self.migrating_read(host, &cmd),
                Err(e) => self.reject(e),
            };
        }
        if let Some(kind) = MultiKey::of(&cmd) {
            return self.migrating_multi(kind, &cmd);
        }
        let routed = route(&*self.router, &cmd).and_then(|(host, key)| {
            let key = key.to_vec();
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
        let access = Access::of(&cmd);
        if access != Access::Read && self.migration.as_ref().is_some_and(|m| m.read_before(&key)) {
            // A GET before it may read the key's new owner once more after
            // the join (see settle_fallbacks): the write waits for that.
            return self.queue(cmd);
        }
        let out = Promise::new();
        if access != Access::Overwrite {
            // Its step comes after the join: later commands on the key wait.
            if let Some(m) = &self.migration {
                m.pending.borrow_mut().insert(crc32fast::hash(&key));
            }
        }
        match access {
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
                work.borrow_mut().stale.push(Overwrite {
                    old,
                    new: host,
                    key,
                    first,
                    sink: settle_into(&out, &self.failures),
                });
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

    /// Queues `cmd` for the map's next round (see [`take_queued`]); later
    /// commands on its key wait behind it.
    fn queue<T: FromValue + 'static>(&mut self, cmd: Cmd) -> Promise<T> {
        let out = Promise::new();
        if let Some(m) = &self.migration {
            if let Ok(key) = key_of(&cmd) {
                m.pending.borrow_mut().insert(crc32fast::hash(key));
            }
            m.queued
                .borrow_mut()
                .push((cmd, settle_into(&out, &self.failures)));
        }
        out
    }

    /// Whether `cmd`'s key has a step left for after this round's join, or
    /// a command waiting for the next round: `cmd` then waits too, so the
    /// map keeps each key's order.
    fn waits_for_its_key(&self, m: &Migration, cmd: &Cmd) -> bool {
        match key_of(cmd) {
            Ok(key) => m.pending.borrow().contains(&crc32fast::hash(key)),
            // Multi-key commands are taken apart, each part asked again.
            Err(_) => false,
        }
    }

    /// A GET routed to `host`: to the new owner, its key noted in the
    /// map's read table; the old owner is looked up only for a miss.
    fn migrating_read<T: FromValue + 'static>(&mut self, host: HostId, cmd: &Cmd) -> Promise<T> {
        if cmd.arg_count() != 1 {
            // Not a GET the server takes: its error, as in a plain map (the
            // read table keeps one-argument GETs only: see Cmd::get_encoded).
            return self.send(host, cmd);
        }
        let slot = match &self.migration {
            Some(m) => {
                if let (Some(read_keys), Some(key)) =
                    (m.read_keys.borrow_mut().as_mut(), cmd.args().next())
                {
                    read_keys.insert(crc32fast::hash(key));
                }
                m.reads.keys.borrow_mut().push(cmd.encoded_args())
            }
            None => return self.send(host, cmd),
        };
        let Some(slot) = slot else {
            return self.reject(Error::config(
                "too many GETs in one map (4 GiB of keys): join in between",
            ));
        };
        let out = Promise::new();
        let waiter = out.sink().for_migrating_get(slot);
        self.session.enqueue(host, cmd, waiter);
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
        // A command that may empty the key drops the key's record as a
        // move's copy now, and its old copy goes before it runs (see
        // handoff::COPIES: a key marked deleted has no old copy).
        let empties = crate::handoff::may_empty(&cmd);
        if empties {
            enqueue_ignored(&mut self.session, host, &crate::handoff::forget_copy(&key));
        }
        let probe = crate::cmd::cmd("EXISTS").arg(key.as_slice());
        let first: Promise<Value> = self.send(host, &probe);
        let work = work.clone();
        let pending = self.runs.clone();
        first.on_result(move |r| match r {
            Ok(Value::Int(1)) => {
                if empties {
                    work.borrow_mut().clears.push((old, key.clone()));
                }
                let mut pending = pending.borrow_mut();
                for step in crate::handoff::before_write(&cmd, &key) {
                    pending.push((host, step, Box::new(drop)));
                }
                pending.push((host, cmd, sink));
            }
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

/// The commands that waited for a step on their key (see
/// [`Dispatch::waits_for_its_key`]), in order; the keys' steps are done.
pub(super) fn take_queued(m: &Migration) -> Vec<(Cmd, Sink)> {
    m.pending.borrow_mut().clear();
    *m.read_keys.borrow_mut() = None;
    std::mem::take(&mut *m.queued.borrow_mut())
}

/// Runs what a migrating map left for after its join; returns whether it
/// ran anything (then the map joins again: nothing here enqueues into it).
pub(super) fn run_followups(m: &Migration, runs: &Runs, session: &mut Session) -> bool {
    // GETs that missed and were not asked yet.
    ask_old_owners(m, session);
    let (mut asked_hosts, asked) = std::mem::take(&mut *m.asked.borrow_mut());
    let work = std::mem::take(&mut *m.work.borrow_mut());
    let runs = std::mem::take(&mut *runs.borrow_mut());
    if work.is_empty() && runs.is_empty() && asked == 0 {
        return false;
    }
    let counters = m.new.migration_counters().clone();
    counters.fallback_reads.fetch_add(asked, Relaxed);
    // Old copies of keys a command may empty on the new owner: gone first.
    let mut clears: BTreeMap<HostId, Vec<Cmd>> = BTreeMap::new();
    for (old, key) in &work.clears {
        clears
            .entry(*old)
            .or_default()
            .push(cmd("DEL").arg(key.as_slice()));
    }
    let mut cleared = run_grouped(&m.old, clears);
    // A command whose key's old copy could not go does not run.
    let mut not_cleared: HashMap<Vec<u8>, Error> = HashMap::new();
    for (old, key) in &work.clears {
        if let Err(e) = take_next(&mut cleared, *old) {
            not_cleared.insert(key.clone(), e);
        }
    }
    // Deletes: the old owner first, then the new one.
    let mut old_side: BTreeMap<HostId, Vec<Cmd>> = BTreeMap::new();
    for (old, _, c, _) in &work.deletes {
        old_side.entry(*old).or_default().push(c.clone());
    }
    let old_counts = run_grouped(&m.old, old_side);
    // On the new owner, the keys are marked deleted first, in one HSET
    // (see handoff::COPIES): a move's late copy does not land there.
    let mut new_side: BTreeMap<HostId, (Vec<&[u8]>, Vec<Cmd>)> = BTreeMap::new();
    for (_, new, c, _) in &work.deletes {
        let (keys, deletes) = new_side.entry(*new).or_default();
        if let Ok(key) = keyspec::single_key(c) {
            keys.push(key);
        }
        deletes.push(c.clone());
    }
    let mut marked = Vec::new();
    let new_side = new_side
        .into_iter()
        .map(|(host, (keys, deletes))| {
            let mut cmds = Vec::with_capacity(deletes.len() + 2);
            if !keys.is_empty() {
                marked.push(host);
                cmds.extend(crate::handoff::copies::mark_deleted(keys));
            }
            cmds.extend(deletes);
            (host, cmds)
        })
        .collect();
    let mut new_counts = run_grouped(&m.new, new_side);
    for host in marked {
        // The marks' answers: refused or not, the deletes run.
        take_next(&mut new_counts, host).ok();
        take_next(&mut new_counts, host).ok();
    }
    let mut old_counts = old_counts;
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
    for Overwrite { old, key, .. } in &work.stale {
        stale
            .entry(*old)
            .or_default()
            .push(cmd("DEL").arg(key.as_slice()));
    }
    let mut dels = run_grouped(&m.old, stale);
    for Overwrite {
        old, first, sink, ..
    } in work.stale
    {
        // The write is done when the old copy is gone too: a copy left
        // there could be read once the new value expires or is deleted.
        let del = take_next(&mut dels, old);
        sink(match (first.take(), del) {
            (Ok(v), Ok(_)) => Ok(v),
            (Ok(_), Err(e)) | (Err(e), _) => Err(e),
        });
    }
    // Other reads that missed: asked the same way.
    if !work.fallbacks.is_empty() {
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
        asked_hosts.extend(asking.iter().map(|a| a.old));
    }
    // Each old host's write epoch, after its reads (see settle_fallbacks).
    let mut epochs = m.epoch_reads.borrow_mut();
    for old in asked_hosts {
        let read = Rc::new(EpochRead::default());
        session.enqueue(
            OLD_HOSTS + old,
            &epoch_probe(),
            Waiter::new(read.clone(), 0),
        );
        epochs.push((old, read));
    }
    drop(epochs);
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
    for (old, new, key, c, sink) in work.moves {
        match moved.get(&old) {
            Some(Err(e)) => sink(Err(e.clone())),
            _ => {
                let runs = runs_by_host.entry(new).or_default();
                for step in crate::handoff::before_write(&c, &key) {
                    runs.push((step, Box::new(drop)));
                }
                runs.push((c, sink));
            }
        }
    }
    for (host, c, sink) in runs {
        let failed = match key_of(&c) {
            Ok(key) if !not_cleared.is_empty() && crate::handoff::may_empty(&c) => {
                not_cleared.get(key)
            }
            _ => None,
        };
        match failed {
            Some(e) => sink(Err(e.clone())),
            None => runs_by_host.entry(host).or_default().push((c, sink)),
        }
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

/// Asks the old owners of the GETs that missed so far (in `session`: the
/// old hosts are in it at OLD_HOSTS + id; batched per host), during the
/// join that reads the rest: a map of misses takes about one round trip
/// more than a plain one, not two. The old hosts' write epochs are read
/// after the join (see [`settle_fallbacks`]), after every such read.
pub(super) fn ask_old_owners(m: &Migration, session: &mut Session) {
    m.reads.absorb(m, session);
    let mut asked = m.asked.borrow_mut();
    let (hosts, count) = &mut *asked;
    *count += m.reads.ask_old(m, session, hosts);
}

/// Hands the old owners' answers (after the join that read them) to the
/// reads that missed. A read the old owner missed too is asked of the new
/// owner once more (a mover or a writer may have moved the key there
/// between the two reads), unless the old host's write epoch read after
/// the miss equals one read before the map sent its first read: then no
/// key left that host in between, and the key was nowhere. Returns whether
/// rechecks were queued (the map then joins again and calls
/// [`settle_rechecks`]).
pub(super) fn settle_fallbacks(m: &Migration, session: &mut Session) -> bool {
    let asking = std::mem::take(&mut *m.asking.borrow_mut());
    let counters = m.new.migration_counters();
    let unchanged = unchanged_hosts(m);
    // Keys found on their old owner, to move (copy-forward), by old host.
    let mut forward: BTreeMap<HostId, Vec<(Vec<u8>, HostId)>> = BTreeMap::new();
    let (mut hits, mut rechecked) = m.reads.after_old(m, &unchanged, session, &mut forward);
    let mut rechecks = m.rechecks.borrow_mut();
    let copy_forward = m.new.copies_forward();
    for a in asking {
        let r = a.reply.take();
        let missing = match &a.exists {
            Some(exists) => matches!(exists.take(), Ok(Value::Int(0))),
            None => matches!(&r, Ok(Value::Nil)),
        };
        if missing && r.is_ok() && !unchanged.contains(&a.old) {
            let again: Promise<Value> = Promise::new();
            session.enqueue(a.new, &a.cmd, again.sink());
            rechecks.push((again, a.sink));
        } else {
            if r.is_ok() && !missing {
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
    rechecked += rechecks.len() as u64;
    if rechecked > 0 {
        counters.rechecks.fetch_add(rechecked, Relaxed);
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
    rechecked > 0
}

/// An old host's write epoch as its `INFO persistence` gives it. A refusal
/// (an ACL without `INFO`) or a failure leaves it unknown (the misses are
/// then rechecked) and is not the map's failure: the reads are.
#[derive(Default)]
struct EpochRead(std::cell::Cell<Option<u64>>);

impl ReplySink for EpochRead {
    fn accept(&self, _index: u32, reply: Result<Value>, _ctx: &ReplyContext<'_>) {
        let info = reply.and_then(String::from_value).ok();
        self.0.set(info.as_deref().and_then(write_epoch));
    }

    fn release(&self, _index: u32) {}
}

/// `INFO persistence`: what a server's write epoch is read from.
fn epoch_probe() -> Cmd {
    cmd("INFO").arg("persistence")
}

/// The old hosts whose write epoch, read after this map's fallback reads,
/// equals the one known before the map began; every epoch read is
/// remembered for later maps.
fn unchanged_hosts(m: &Migration) -> BTreeSet<HostId> {
    let facts = m.new.server_facts();
    let mut unchanged = BTreeSet::new();
    for (old, read) in std::mem::take(&mut *m.epoch_reads.borrow_mut()) {
        let (Some(place), Some(epoch)) = (m.old_places.get(&old), read.0.get()) else {
            continue;
        };
        if m.epochs_before.get(place) == Some(&epoch) {
            unchanged.insert(old);
        }
        facts.learn_epoch(place, epoch);
    }
    unchanged
}

/// After a join and its steps: empties the read table if its reads are
/// all settled.
pub(super) fn compact(m: &Migration) {
    m.reads.compact();
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
            let router = cluster.router()?;
            let (host, key) = route(&*router, &cmd)?;
            let key = key.to_vec();
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
        // The task's clients do not keep the drivers running (see
        // AsyncClient::for_task).
        let (client, old_client) = (self.for_task(), old_client.for_task());
        let counters = cluster.migration_counters().clone();
        let access = Access::of(&cmd);
        // The old host's write epoch known before anything is sent (see
        // settle_fallbacks).
        let (old_place, epoch_before) = match (access, old.host(old_host)) {
            (Access::Read, Ok(info)) => {
                let place = info.name().addr.clone();
                let epoch = cluster.server_facts().epoch(&place);
                (Some(place), epoch)
            }
            _ => (None, None),
        };
        // Run on the driver thread to its end (its steps happen whether or
        // not the reply is awaited); converted when awaited.
        let runner = self.clone();
        let steps = runner.run_to_end(async move {
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
                        let epoch_after = old_client.send::<String>(old_host, epoch_probe());
                        let second: Value = second.await?;
                        let found = match there {
                            Some(e) => e.await? == 1,
                            None => second != Value::Nil,
                        };
                        let epoch_after = epoch_after.await.ok().as_deref().and_then(write_epoch);
                        if let (Some(place), Some(epoch)) = (&old_place, epoch_after) {
                            cluster.server_facts().learn_epoch(place, epoch);
                        }
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
                        } else if epoch_before.is_some() && epoch_before == epoch_after {
                            // No key left the old host since before the
                            // first read: the key is nowhere.
                            second
                        } else {
                            // Moved to the new owner between the two reads?
                            counters.rechecks.fetch_add(1, Relaxed);
                            client.send(host, cmd).await?
                        }
                    }
                }
                Access::Overwrite => {
                    // The key's record as a move's copy goes before its old
                    // copy does (see forget_overwritten); sent right after
                    // the write on the same connection, answered with it.
                    // Its answer is not the write's.
                    let written = client.send::<Value>(host, cmd);
                    let forget = client.send::<Value>(host, crate::handoff::forget_copy(&key));
                    let r = written.await?;
                    drop(forget.await);
                    // Done when the old copy is gone too.
                    let _: Value = old_client
                        .send(old_host, crate::cmd::cmd("DEL").arg(key.as_slice()))
                        .await?;
                    r
                }
                Access::Delete => {
                    let a: Value = old_client.send(old_host, cmd.clone()).await?;
                    // Marked deleted first on the new owner, on the same
                    // connection (see handoff::COPIES); refused or not,
                    // the delete runs.
                    for mark in copies::mark_deleted([key.as_slice()]) {
                        drop(client.send::<Value>(host, mark));
                    }
                    let b: Value = client.send(host, cmd).await?;
                    match (a, b) {
                        (Value::Int(x), Value::Int(y)) => Value::Int((x + y).min(1)),
                        (_, b) => b,
                    }
                }
                Access::Modify => {
                    // A command that may empty the key: its record as a
                    // move's copy goes now, its old copy before it runs
                    // (the map's rule, see Dispatch::modify).
                    let empties = crate::handoff::may_empty(&cmd);
                    if empties {
                        drop(client.send::<Value>(host, crate::handoff::forget_copy(&key)));
                    }
                    let exists: i64 = client
                        .send(host, crate::cmd::cmd("EXISTS").arg(key.as_slice()))
                        .await?;
                    if exists == 0 && move_key(&old_client, &client, old_host, host, &key).await? {
                        counters.moved_on_write.fetch_add(1, Relaxed);
                    }
                    if exists == 1 && empties {
                        let _: Value = old_client
                            .send(old_host, crate::cmd::cmd("DEL").arg(key.as_slice()))
                            .await?;
                    }
                    for step in crate::handoff::before_write(&cmd, &key) {
                        drop(client.send::<Value>(host, step));
                    }
                    client.send(host, cmd).await?
                }
            };
            Ok(reply)
        });
        Reply::from_future(async move { T::from_value(steps.await?) })
    }

    /// [`AsyncClient::execute_commands`] on a migrating cluster, as the
    /// sync form runs it: each list on its key's new owner, the key moved
    /// there first if it is still on its old owner (its record as a move's
    /// copy dropped if the list writes it, marked deleted, its old copy
    /// gone first, if the list may delete it: see [`move_in_transit`]);
    /// the lists of one key one after the other, keys side by side.
    pub(super) fn migrating_commands<K, I>(
        &self,
        mapping: I,
    ) -> crate::Reply<HashMap<K, Vec<Result<Value>>>>
    where
        I: IntoIterator<Item = (K, Vec<Call>)>,
        K: crate::args::ToArg + Eq + std::hash::Hash + Send + 'static,
    {
        use crate::Reply;
        let Some(old_client) = self.previous().cloned() else {
            return Reply::ready(Err(Error::config("not migrating")));
        };
        let cluster = self.cluster().clone();
        let Some(old) = cluster.migrating_from().cloned() else {
            return Reply::ready(Err(Error::config("not migrating")));
        };
        // The lists of each key, in order, as one sequence.
        let mut groups: Vec<(Vec<u8>, Vec<Call>)> = Vec::new();
        let mut group_of: HashMap<Vec<u8>, usize> = HashMap::new();
        let mut entries = Vec::new();
        for (key, calls) in mapping {
            let bytes = crate::args::to_bytes(&key);
            let next = groups.len();
            let g = *group_of.entry(bytes.clone()).or_insert(next);
            if g == next {
                groups.push((bytes, Vec::new()));
            }
            entries.push((key, g, calls.len()));
            groups[g].1.extend(calls);
        }
        let mut parts: Vec<Reply<Vec<Result<Value>>>> = Vec::with_capacity(groups.len());
        for (key, calls) in groups {
            let routed = (|| {
                let host = cluster.router()?.host_for_key(&key)?;
                let old_host = old.router()?.host_for_key(&key)?;
                let moving = !same_server(&old, old_host, &cluster, host)?;
                Ok::<_, Error>((host, old_host, moving))
            })();
            let (host, old_host, moving) = match routed {
                Ok(r) => r,
                Err(e) => return Reply::ready(Err(e)),
            };
            let touch = Touch::of_calls(&calls);
            let (client, old_client) = (self.for_task(), old_client.for_task());
            let counters = cluster.migration_counters().clone();
            let runner = self.clone();
            parts.push(runner.run_to_end(async move {
                if moving {
                    if touch != Touch::Read {
                        drop(client.send::<Value>(host, crate::handoff::forget_copy(&key)));
                    }
                    let exists: i64 = client.send(host, cmd("EXISTS").arg(key.as_slice())).await?;
                    if exists == 0 {
                        if move_key(&old_client, &client, old_host, host, &key).await? {
                            counters.moved_on_write.fetch_add(1, Relaxed);
                        }
                    } else if touch == Touch::Delete {
                        let _: Value = old_client
                            .send(old_host, cmd("DEL").arg(key.as_slice()))
                            .await?;
                    }
                    if touch == Touch::Delete {
                        for mark in copies::mark_deleted([key.as_slice()]) {
                            drop(client.send::<Value>(host, mark));
                        }
                    }
                }
                // The calls as the plain form sends them, pipelined.
                let last = calls.len().checked_sub(1);
                let replies: Vec<Reply<Value>> = calls
                    .into_iter()
                    .enumerate()
                    .map(|(i, call)| match call {
                        Call::Cmd(c) => client.send_checked(host, c),
                        Call::Script(sc) if Some(i) != last => client.load_and_call(host, &sc),
                        Call::Script(sc) => client.script(host, sc),
                    })
                    .collect();
                let mut outcomes = Vec::with_capacity(replies.len());
                for r in replies {
                    outcomes.push(r.await);
                }
                Ok(outcomes)
            }));
        }
        Reply::join(parts, move |groups| {
            let mut groups: Vec<std::vec::IntoIter<Result<Value>>> =
                groups.into_iter().map(Vec::into_iter).collect();
            let mut out: HashMap<K, Vec<Result<Value>>> = HashMap::new();
            for (key, g, n) in entries {
                if let Some(group) = groups.get_mut(g) {
                    out.entry(key).or_default().extend(group.by_ref().take(n));
                }
            }
            Ok(out)
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
    // The steps of moving::copy_keys and moving::settle_copies, for one
    // key: a stale mark of a delete (see handoff::COPIES) goes and the key
    // is copied again, a few rounds at most.
    let token = copies::token();
    for _ in 0..3 {
        let ttl = old.send::<i64>(old_host, cmd("PTTL").arg(key));
        let dump = old.send::<Option<Vec<u8>>>(old_host, cmd("DUMP").arg(key));
        let (ttl, dump) = (ttl.await?, dump.await?);
        let Some(payload) = dump else {
            return Ok(false);
        };
        if ttl == -2 {
            return Ok(false);
        }
        let restore = copies::restore(
            &token,
            &[],
            [copies::Restore {
                key,
                ttl: ttl.max(0),
                payload: &payload,
            }],
        );
        let restored = copies::restored(new.send(new_host, restore).await?, 1)?;
        let per_key = |script: &str| {
            cmd("EVAL")
                .arg(script)
                .arg(1)
                .arg(key)
                .arg(payload.as_slice())
        };
        let answered = |flags: Vec<i64>| flags.first() == Some(&1);
        let settle = |step: Settle<'_>| copies::settle(&token, [(key, step)]);
        match restored.into_iter().next() {
            Some(Restored::Copied) => {
                let deleted = answered(old.send(old_host, per_key(DELETE_IF_UNCHANGED)).await?);
                let step = if deleted {
                    Settle::Keep
                } else {
                    Settle::TakeBack(&payload)
                };
                let settled = copies::settled(new.send(new_host, settle(step)).await?, 1)?;
                // Moved, unless deleted meanwhile (or taken back for it).
                return Ok(deleted || settled.first() == Some(&copies::Settled::Stands));
            }
            Some(Restored::Present) => {
                // The new owner had it: its copy is the key's home once the
                // old copy, seen still there after it, goes.
                if answered(old.send(old_host, per_key(UNCHANGED)).await?) {
                    copies::settled(new.send(new_host, settle(Settle::Found)).await?, 1)?;
                    let _: Vec<i64> = old.send(old_host, per_key(DELETE_IF_UNCHANGED)).await?;
                }
                return Ok(false);
            }
            Some(Restored::Deleted(mark)) => {
                if !answered(old.send(old_host, per_key(UNCHANGED)).await?) {
                    // Deleted during the move: nothing to copy.
                    return Ok(false);
                }
                let stale = settle(Settle::StaleMark(&mark));
                copies::settled(new.send(new_host, stale).await?, 1)?;
            }
            Some(Restored::Refused(e)) => {
                return Err(match new.cluster().host(new_host) {
                    Ok(h) => e.with_context(h.name(), "RESTORE"),
                    Err(_) => e,
                })
            }
            None => return Err(Error::protocol("the restore script answered no key")),
        }
    }
    // Marked deleted again each round: left where it is for the mover.
    Ok(false)
}

/// What the commands to come may do to a key (see [`move_in_transit`]),
/// least to most.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Touch {
    /// Only read it.
    Read,
    /// Write it (no delete).
    Write,
    /// Delete it, or anything (a script, a transaction built later).
    Delete,
}

impl Touch {
    /// What `cmd` may do to its keys.
    pub(super) fn of(cmd: &Cmd) -> Touch {
        match Access::of(cmd) {
            Access::Read => Touch::Read,
            Access::Overwrite => Touch::Write,
            // Marked as in a map when it may empty the key (GETDEL, LPOP).
            Access::Modify if !crate::handoff::may_empty(cmd) => Touch::Write,
            Access::Modify | Access::Delete => Touch::Delete,
        }
    }

    /// What a list of calls may do to its key: the most any call may (a
    /// script anything).
    pub(super) fn of_calls(calls: &[Call]) -> Touch {
        calls
            .iter()
            .map(|c| match c {
                Call::Cmd(c) => Touch::of(c),
                Call::Script(_) => Touch::Delete,
            })
            .max()
            .unwrap_or(Touch::Read)
    }
}

/// On a migrating cluster, moves each of `keys` that is still on its old
/// owner to its new one now (a transaction or a command list then runs
/// where every key is). With each key, what runs next may do to it: a key
/// written drops its record as a move's copy, a key that may be deleted
/// is marked deleted (see [`crate::handoff::COPIES`]), before it runs.
/// Nothing to do on a cluster that is not migrating.
///
/// # Errors
///
/// A routing error or the move's.
pub(super) fn move_in_transit<'k>(
    cluster: &Cluster,
    keys: impl IntoIterator<Item = (&'k [u8], Touch)>,
) -> Result<()> {
    let Some(old) = cluster.migrating_from() else {
        return Ok(());
    };
    let (old_router, new_router) = (old.router()?, cluster.router()?);
    let mut leaving: BTreeMap<HostId, Vec<(Vec<u8>, HostId)>> = BTreeMap::new();
    // By new owner: keys written, keys that may be deleted.
    let mut touched: BTreeMap<HostId, (Cmd, Vec<&[u8]>)> = BTreeMap::new();
    for (key, touch) in keys {
        let (from, to) = (old_router.host_for_key(key)?, new_router.host_for_key(key)?);
        if same_server(old, from, cluster, to)? {
            continue;
        }
        leaving.entry(from).or_default().push((key.to_vec(), to));
        let (written, deleted) = touched
            .entry(to)
            .or_insert_with(|| (cmd("HDEL").arg(crate::handoff::COPIES), Vec::new()));
        match touch {
            Touch::Read => {}
            Touch::Write => {
                written.push_arg(key);
            }
            Touch::Delete => {
                written.push_arg(key);
                deleted.push(key);
            }
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
    // Not allowed to write the records, the commands still run.
    for (to, (written, deleted)) in touched {
        let mut steps = Vec::with_capacity(3);
        if written.arg_count() > 1 {
            steps.push(written);
        }
        if !deleted.is_empty() {
            steps.extend(crate::handoff::copies::mark_deleted(deleted));
        }
        if !steps.is_empty() {
            drop(cluster.local_client(to)?.pipeline(steps));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::ReadTable;

    /// Keys (pushed as a GET's encoded argument) come back by place, and
    /// two maps' tables dropped one after the other on a thread keep one
    /// set of buffers. (A first version kept the spare as a type with this
    /// `Drop`: the second set, refused, went through it again, which
    /// recursed until the stack overflowed; seen as a crash of an example
    /// and reproduced here.)
    #[test]
    fn get_keys_by_slot_and_buffers_kept_once() {
        let run = || {
            let (a, b) = (ReadTable::new(), ReadTable::new());
            {
                let mut keys = a.keys.borrow_mut();
                assert_eq!(keys.push(b"$5\r\nfirst\r\n"), Some(0));
                assert_eq!(keys.push(b"$0\r\n\r\n"), Some(11));
                assert_eq!(keys.push(b"$5\r\nthird\r\n"), Some(17));
                assert_eq!(
                    (keys.key(0), keys.key(11), keys.key(17), keys.key(28)),
                    (&b"first"[..], &b""[..], &b"third"[..], &b""[..])
                );
                assert_eq!(keys.at(11), (&b""[..], &b"$0\r\n\r\n"[..]));
                // A place inside a key is no key (never handed out).
                assert_eq!(keys.key(3), b"");
            }
            assert_eq!(b.keys.borrow_mut().push(b"$5\r\nother\r\n"), Some(0));
            drop(a);
            drop(b);
            let again = ReadTable::new();
            let keys = again.keys.borrow();
            assert!(keys.bytes.is_empty() && keys.bytes.capacity() > 0, "kept");
        };
        // A small stack, so a recursion fails fast.
        std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(run)
            .expect("thread")
            .join()
            .expect("no overflow");
    }
}
