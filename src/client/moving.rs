//! Moving a batch of keys now: copying them from their old owners to their
//! new ones (`PTTL` and `DUMP` on the old host, `RESTORE` on the new owner
//! where it neither has the key nor marked it deleted) and retiring the
//! old copies (each deleted where still as copied; a copy whose old copy
//! changed or went is taken back), counted in a [`MoveProgress`].
//!
//! The rules these steps follow (the scripts, the new owners' records of
//! copies and deletes) are [`crate::handoff`]'s, below; the steps
//! themselves talk to hosts through a [`Cluster`] and its
//! [`LocalClient`](crate::LocalClient)s, so they sit in the client/cluster
//! layer. A migrating cluster's clients ([`super::migrating`]) move keys on
//! write with [`move_now`]; the mover (`migrate`, the layer above) moves
//! whole pages with [`copy_keys`] and [`settle_copies`], and its own
//! `MIGRATE` transfer uses [`dumps`] and [`retire_found`].

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::cluster::Cluster;
use crate::cmd::{cmd, Cmd};
use crate::error::{Error, HostId, Result};
use crate::handoff::{copies, per_key_flags, DELETE_IF_UNCHANGED, UNCHANGED};
use crate::resp::Value;
use crate::scan::ScanCursor;

/// Where a move stands, after each batch: counts so far and the position
/// to resume from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MoveProgress {
    /// Keys seen on the old hosts (a key moved onto an old host that the
    /// walk reaches later is seen again there, and stays).
    pub scanned: u64,
    /// Keys copied to their new owner (their old copies go right after,
    /// or after [`MoveOptions::delete_delay`](crate::migrate::MoveOptions::delete_delay)).
    pub copied: u64,
    /// Keys copied to their new owner and deleted from the old host.
    pub moved: u64,
    /// Keys whose new owner already had them (a newer write): deleted from
    /// the old host, not copied.
    pub skipped: u64,
    /// Keys whose owner did not change (left where they are).
    pub stayed: u64,
    /// Keys that vanished (expired or deleted) while being moved.
    pub vanished: u64,
    /// Bytes of `DUMP` payload copied.
    pub bytes: u64,
    /// Where to resume: the next page of the old cluster's walk (`None`
    /// when every host is done).
    pub resume_at: Option<ScanCursor>,
}

/// One key on its way: where it goes and what was copied.
pub(crate) struct Moving {
    pub(crate) key: Vec<u8>,
    pub(crate) to: HostId,
    pub(crate) payload: Vec<u8>,
    /// Whether `RESTORE` created it (false: the new owner had it).
    pub(crate) restored: bool,
}

/// Whether host `old_host` of `old` and host `new_host` of `new` are the
/// same server and database (a key owned by both stays where it is).
///
/// # Errors
///
/// [`Error::NoSuchHost`] for an id either cluster lacks.
pub(crate) fn same_server(
    old: &Cluster,
    old_host: HostId,
    new: &Cluster,
    new_host: HostId,
) -> Result<bool> {
    Ok(old.host(old_host)?.name().addr == new.host(new_host)?.name().addr)
}

/// Moves keys from `host` of `old` to their owners in `new` now: copies
/// them, then deletes them from `host` where unchanged. Always through the
/// client (`DUMP`/`RESTORE`), never `MIGRATE`: a `MIGRATE` blocks its old
/// server until the new owner answers, so two of them crossing between
/// the same two servers (a client's move one way, the mover's the other)
/// would each wait out the other's timeout. The mover is the only one to
/// `MIGRATE`, one batch at a time.
pub(crate) fn move_now(
    old: &Cluster,
    new: &Cluster,
    host: HostId,
    leaving: Vec<(Vec<u8>, HostId)>,
    progress: &mut MoveProgress,
) -> Result<()> {
    let mut keeps = Keeps::new();
    let batch = copy_keys(old, new, host, leaving, &mut keeps, progress)?;
    settle_copies(old, new, host, batch, None, progress)
}

/// Keys one move copied (or found on their new owners), under the token
/// its copies are recorded with (see [`COPIES`](crate::handoff::COPIES)).
pub(crate) struct Batch {
    token: Arc<str>,
    keys: Vec<Moving>,
}

/// Copies one page's leaving keys from `host` of `old` to their owners in
/// `new` (never over a key the new owner has, nor one deleted there: see
/// [`COPIES`](crate::handoff::COPIES)): what was copied (or found there).
pub(crate) fn copy_keys(
    old: &Cluster,
    new: &Cluster,
    host: HostId,
    mut leaving: Vec<(Vec<u8>, HostId)>,
    keeps: &mut Keeps,
    progress: &mut MoveProgress,
) -> Result<Batch> {
    let source = old.local_client(host)?;
    let token: Arc<str> = copies::token().into();
    let mut done = Vec::with_capacity(leaving.len());
    // A key marked deleted on its new owner while its old copy is still
    // there carries a mark older than this copy (a delete removes the old
    // copy first): the mark goes and the key is copied again. A mark that
    // keeps coming back (a delete each round) is left for the next walk.
    for _ in 0..3 {
        if leaving.is_empty() {
            break;
        }
        let mut moving = dump_keys(&source, leaving, progress)?;
        let marked = restore_keys(new, &token, &mut moving, keeps, progress)?;
        let (mut marked_keys, mut marks) = (Vec::new(), Vec::new());
        let mut marked = marked.into_iter().peekable();
        for (i, m) in moving.into_iter().enumerate() {
            match marked.next_if(|(at, _)| *at == i) {
                Some((_, mark)) => {
                    marked_keys.push(m.moving);
                    marks.push(mark);
                }
                None => done.push(m.moving),
            }
        }
        leaving = retry_stale_marks(&source, new, marked_keys, &marks, progress)?;
    }
    progress.skipped += leaving.len() as u64;
    Ok(Batch { token, keys: done })
}

/// A key dumped from its old host, and the TTL to restore it with.
struct Dumped {
    moving: Moving,
    ttl: i64,
}

/// `PTTL` and `DUMP` of `leaving` on `source`, in one pipeline; keys gone
/// since the scan are counted as vanished.
fn dump_keys(
    source: &crate::LocalClient,
    leaving: Vec<(Vec<u8>, HostId)>,
    progress: &mut MoveProgress,
) -> Result<Vec<Dumped>> {
    let dumps = source.pipeline(
        leaving
            .iter()
            .flat_map(|(k, _)| [cmd("PTTL").arg(k.as_slice()), cmd("DUMP").arg(k.as_slice())]),
    );
    let mut moving = Vec::with_capacity(leaving.len());
    let mut replies = dumps.into_iter();
    for (key, to) in leaving {
        let (ttl, payload) = (replies.next(), replies.next());
        let ttl = match ttl {
            Some(Ok(Value::Int(t))) => t,
            Some(Err(e)) => return Err(e),
            _ => -2,
        };
        match payload {
            Some(Ok(Value::BulkString(payload))) if ttl != -2 => {
                moving.push(Dumped {
                    moving: Moving {
                        key,
                        to,
                        payload,
                        restored: false,
                    },
                    // PTTL -1 is no expiry; RESTORE takes 0 for that.
                    ttl: ttl.max(0),
                });
            }
            Some(Err(e)) => return Err(e),
            // Gone since the scan (expired or deleted): nothing to move.
            _ => progress.vanished += 1,
        }
    }
    Ok(moving)
}

/// Restores `moving` on their new owners under `token`; the keys marked
/// deleted there (their positions, in order, and marks).
fn restore_keys(
    new: &Cluster,
    token: &str,
    moving: &mut [Dumped],
    keeps: &mut Keeps,
    progress: &mut MoveProgress,
) -> Result<Vec<(usize, Vec<u8>)>> {
    let mut marked = Vec::new();
    let owners = by_owner(moving.iter().map(|d| d.moving.to));
    let scripts = owners.iter().map(|(&to, indexes)| {
        let drops = keeps.remove(&to).unwrap_or_default();
        let script = copies::restore(
            token,
            &drops,
            indexes.iter().map(|&i| copies::Restore {
                key: &moving[i].moving.key,
                ttl: moving[i].ttl,
                payload: &moving[i].moving.payload,
            }),
        );
        (to, script)
    });
    let replies = on_each(new, scripts.collect())?;
    for ((to, indexes), reply) in owners.into_iter().zip(replies) {
        let answers = copies::restored(reply, indexes.len())?;
        for (&i, answer) in indexes.iter().zip(answers) {
            match answer {
                copies::Restored::Copied => {
                    moving[i].moving.restored = true;
                    progress.copied += 1;
                    progress.bytes += moving[i].moving.payload.len() as u64;
                }
                // The new owner has the key: a write made there wins.
                copies::Restored::Present => {}
                copies::Restored::Deleted(mark) => marked.push((i, mark)),
                copies::Restored::Refused(e) => {
                    return Err(e.with_context(new.host(to)?.name(), "RESTORE"))
                }
            }
        }
    }
    marked.sort_unstable_by_key(|(i, _)| *i);
    Ok(marked)
}

/// Of keys whose new owner marked them deleted (`marks`): those whose old
/// copy is gone were deleted (vanished); those whose old copy is still as
/// dumped carry a stale mark, which goes: they are returned, to copy
/// again.
fn retry_stale_marks(
    source: &crate::LocalClient,
    new: &Cluster,
    marked: Vec<Moving>,
    marks: &[Vec<u8>],
    progress: &mut MoveProgress,
) -> Result<Vec<(Vec<u8>, HostId)>> {
    if marked.is_empty() {
        return Ok(Vec::new());
    }
    let there = per_key_flags(
        one_reply(source, per_key_script(UNCHANGED, &marked))?,
        marked.len(),
    )?;
    let mut stale: BTreeMap<HostId, Vec<(&[u8], copies::Settle<'_>)>> = BTreeMap::new();
    let mut again = Vec::new();
    for ((m, mark), there) in marked.iter().zip(marks).zip(there) {
        if there {
            stale
                .entry(m.to)
                .or_default()
                .push((&m.key, copies::Settle::StaleMark(mark)));
            again.push((m.key.clone(), m.to));
        } else {
            progress.vanished += 1;
        }
    }
    let counts: Vec<usize> = stale.values().map(Vec::len).collect();
    let scripts = stale
        .into_iter()
        .map(|(to, items)| (to, copies::settle("", items)))
        .collect();
    for (n, reply) in counts.into_iter().zip(on_each(new, scripts)?) {
        copies::settled(reply, n)?;
    }
    Ok(again)
}

/// The positions of each new owner's keys among `owners`.
fn by_owner(owners: impl Iterator<Item = HostId>) -> BTreeMap<HostId, Vec<usize>> {
    let mut by: BTreeMap<HostId, Vec<usize>> = BTreeMap::new();
    for (i, to) in owners.enumerate() {
        by.entry(to).or_default().push(i);
    }
    by
}

/// Records of copies settled (their old copies went), by new owner: (key,
/// the move's token), to drop there with the next restore or at the end.
pub(crate) type Keeps = BTreeMap<HostId, Vec<(Vec<u8>, Arc<str>)>>;

/// Settles a batch [`copy_keys`] made from old host `host`, in three
/// steps (see [`COPIES`](crate::handoff::COPIES)): on the old host, deletes each copied key that
/// is still as copied and checks that each key found on its new owner is
/// still there as it was; on the new owners, takes back the copies whose
/// old copy was gone or changed (if still this move's copy), and drops
/// the records of the keys found there; then deletes those keys' old
/// copies (if still as they were): the new owner's copy is the key's only
/// home from then. The records of the copies whose old copy went are
/// dropped with them where that step runs anyway, else left in `keeps`
/// for the next restore there (a record whose old copy is gone matters
/// to nobody, it only takes room); without `keeps`, dropped now.
pub(crate) fn settle_copies(
    old: &Cluster,
    new: &Cluster,
    host: HostId,
    batch: Batch,
    keeps: Option<&mut Keeps>,
    progress: &mut MoveProgress,
) -> Result<()> {
    let source = old.local_client(host)?;
    let (copied, found): (Vec<Moving>, Vec<Moving>) =
        batch.keys.into_iter().partition(|m| m.restored);
    let mut steps = Vec::with_capacity(2);
    if !copied.is_empty() {
        steps.push(per_key_script(DELETE_IF_UNCHANGED, &copied));
    }
    if !found.is_empty() {
        steps.push(per_key_script(UNCHANGED, &found));
    }
    let mut answers = source.pipeline(steps).into_iter();
    let mut flags = |keys: &[Moving]| -> Result<Vec<bool>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let reply = answers
            .next()
            .unwrap_or_else(|| Err(Error::protocol("a pipelined reply is missing")))?;
        per_key_flags(reply, keys.len())
    };
    let deleted = flags(&copied)?;
    let still_there = flags(&found)?;
    progress.skipped += found.len() as u64;
    let found: Vec<Moving> = found
        .into_iter()
        .zip(still_there)
        .filter_map(|(m, there)| there.then_some(m))
        .collect();
    let (mut settled, mut back) = (Vec::new(), Vec::new());
    for (m, deleted) in copied.into_iter().zip(deleted) {
        if deleted {
            progress.moved += 1;
            settled.push(m);
        } else {
            back.push(m);
        }
    }
    let mut steps: BTreeMap<HostId, Vec<(&[u8], copies::Settle<'_>)>> = BTreeMap::new();
    for m in &back {
        steps
            .entry(m.to)
            .or_default()
            .push((&m.key, copies::Settle::TakeBack(&m.payload)));
    }
    for m in &found {
        steps
            .entry(m.to)
            .or_default()
            .push((&m.key, copies::Settle::Found));
    }
    // Dropped now where a step runs anyway (or with no `keeps`), else later.
    let (now, later): (Vec<Moving>, Vec<Moving>) = settled
        .into_iter()
        .partition(|m| keeps.is_none() || steps.contains_key(&m.to));
    if let Some(keeps) = keeps {
        for m in later {
            keeps
                .entry(m.to)
                .or_default()
                .push((m.key, batch.token.clone()));
        }
    }
    for m in &now {
        steps
            .entry(m.to)
            .or_default()
            .push((&m.key, copies::Settle::Keep));
    }
    let kinds: Vec<Vec<bool>> = steps
        .values()
        .map(|items| {
            items
                .iter()
                .map(|(_, s)| matches!(s, copies::Settle::TakeBack(_)))
                .collect()
        })
        .collect();
    let scripts = steps
        .into_iter()
        .map(|(to, items)| (to, copies::settle(&batch.token, items)))
        .collect();
    for (kinds, reply) in kinds.into_iter().zip(on_each(new, scripts)?) {
        let settled = copies::settled(reply, kinds.len())?;
        for (asked, settled) in kinds.into_iter().zip(settled) {
            // A copy whose old copy was gone: taken back, or deleted
            // meanwhile, or the key's home now (another move deleted the
            // old copy, or a write replaced it).
            if asked {
                match settled {
                    copies::Settled::Stands => progress.moved += 1,
                    copies::Settled::TakenBack | copies::Settled::Deleted => progress.vanished += 1,
                }
            }
        }
    }
    delete_if_unchanged(&source, &found).map(drop)
}

/// Runs each host's command of `commands` (by host, in order) on `cluster`,
/// all at once; their replies in the same order.
///
/// # Errors
///
/// The first failure of a host (with its name), an error reply included.
pub(crate) fn on_each(cluster: &Cluster, commands: Vec<(HostId, Cmd)>) -> Result<Vec<Value>> {
    if commands.is_empty() {
        return Ok(Vec::new());
    }
    let hosts = commands.iter().map(|(h, _)| *h).collect();
    let replies = cluster.fanout(crate::cluster::Hosts::Ids(hosts), |fanout| {
        commands
            .into_iter()
            .map(|(h, c)| {
                (
                    h,
                    crate::client::Execute::execute::<Value>(&fanout.target(&[h]), c),
                )
            })
            .collect::<Vec<_>>()
    })?;
    replies
        .into_iter()
        .map(|(h, p)| {
            p.take()?
                .remove(&h)
                .ok_or_else(|| Error::protocol("a host's reply is missing"))
        })
        .collect()
}

/// The one reply of `command` on `host`.
pub(crate) fn one_reply(host: &crate::LocalClient, command: Cmd) -> Result<Value> {
    host.pipeline([command])
        .pop()
        .unwrap_or_else(|| Err(Error::protocol("a reply is missing")))
}

/// `EVAL script` over `keys`, each key's payload as its argument.
fn per_key_script(script: &str, keys: &[Moving]) -> Cmd {
    let mut eval = cmd("EVAL").arg(script).arg(keys.len());
    for m in keys {
        eval.push_arg(m.key.as_slice());
    }
    for m in keys {
        eval.push_arg(m.payload.as_slice());
    }
    eval
}

/// `DUMP` of each of `keys` on one host, in one pipeline (`None`: a key it
/// lacks).
pub(crate) fn dumps<'a>(
    host: &crate::LocalClient,
    keys: impl Iterator<Item = &'a [u8]>,
) -> Result<Vec<Option<Vec<u8>>>> {
    host.pipeline(keys.map(|k| cmd("DUMP").arg(k)))
        .into_iter()
        .map(|r| r.and_then(crate::convert::FromValue::from_value))
        .collect()
}

/// Runs [`DELETE_IF_UNCHANGED`] on one host for `keys`; whether each was
/// deleted.
fn delete_if_unchanged(host: &crate::LocalClient, keys: &[Moving]) -> Result<Vec<bool>> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let reply = one_reply(host, per_key_script(DELETE_IF_UNCHANGED, keys))?;
    per_key_flags(reply, keys.len())
}

/// Deletes the old copies (on `source`) of keys found on their new owner
/// (`target`), each only if still as it was: their records there go first
/// (see [`COPIES`](crate::handoff::COPIES)). The caller saw each old copy still there after it saw
/// the new owner's.
pub(crate) fn retire_found(
    source: &crate::LocalClient,
    target: &crate::LocalClient,
    found: &[Moving],
) -> Result<()> {
    if found.is_empty() {
        return Ok(());
    }
    let forget = copies::settle(
        "",
        found
            .iter()
            .map(|m| (m.key.as_slice(), copies::Settle::Found)),
    );
    copies::settled(one_reply(target, forget)?, found.len())?;
    delete_if_unchanged(source, found).map(drop)
}
