//! Growing or shrinking a fleet: moving each key whose owner changes.
//!
//! [`move_keys`] walks every host of the old cluster (`SCAN`), and for each
//! key that the new cluster's router puts on another server, in batches:
//! the old server's own `MIGRATE` copies it and deletes it in one step
//! where the servers reach each other; elsewhere `DUMP` and `PTTL` on the
//! old host, `RESTORE` (value and TTL) on the new owner, then a delete from
//! the old host only if it still holds what was copied ([`Transfer`]). It
//! never overwrites a key the new owner already has (a write made during
//! the move wins, and the old copy goes), and a key deleted from the old
//! host while it was being copied is deleted from the new owner too (if
//! the copy is still this move's: see [`COPIES`]), so a delete made during
//! the move is not undone. Every batch's progress carries the position to
//! resume from after a crash ([`MoveOptions::resume_from`]).

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cluster::Cluster;
use crate::cmd::{cmd, Cmd};
use crate::error::{Error, HostId, Result};
use crate::resp::Value;
use crate::scan::{ScanCursor, ScanOptions};

use crate::handoff::{copies, per_key_flags, DELETE_IF_UNCHANGED, UNCHANGED};

mod by_server;

pub use crate::handoff::{COPIES, DELETED};
pub use by_server::Transfer;

/// Where a move stands, after each batch: counts so far and the position
/// to resume from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MoveProgress {
    /// Keys seen on the old hosts (a key moved onto an old host that the
    /// walk reaches later is seen again there, and stays).
    pub scanned: u64,
    /// Keys copied to their new owner (their old copies go right after,
    /// or after [`MoveOptions::delete_delay`]).
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

/// What a finished move did: the final [`MoveProgress`] and how long it took.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct MoveReport {
    /// The totals.
    pub progress: MoveProgress,
    /// The time it took.
    pub elapsed: Duration,
}

/// Options of [`move_keys`].
#[derive(Clone, Default)]
pub struct MoveOptions {
    batch: Option<u64>,
    keys_per_second: Option<u64>,
    from: Option<ScanCursor>,
    delete_delay: Option<Duration>,
    transfer: Transfer,
    progress: Option<ProgressFn>,
}

/// How long a copied key stays on its old host too (see
/// [`MoveOptions::delete_delay`]): none. A migrating cluster's read that
/// misses on both owners asks the new one again, which covers a key moved
/// between its two reads; an old copy kept longer would only be a stale
/// copy for a read to find after the key changed on its new owner.
pub const DELETE_DELAY: Duration = Duration::ZERO;

/// A progress callback.
type ProgressFn = Arc<dyn Fn(&MoveProgress) + Send + Sync>;

impl fmt::Debug for MoveOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MoveOptions")
            .field("batch", &self.batch)
            .field("keys_per_second", &self.keys_per_second)
            .field("from", &self.from)
            .field("delete_delay", &self.delete_delay)
            .field("transfer", &self.transfer)
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

impl MoveOptions {
    /// Batches of about 1,000 keys, no rate limit, from the beginning.
    #[must_use]
    pub fn new() -> MoveOptions {
        MoveOptions::default()
    }

    /// About how many keys each batch scans (`SCAN ... COUNT`).
    #[must_use]
    pub fn batch(mut self, keys: u64) -> MoveOptions {
        self.batch = Some(keys.max(1));
        self
    }

    /// At most this many keys scanned per second (the servers keep serving).
    #[must_use]
    pub fn keys_per_second(mut self, rate: u64) -> MoveOptions {
        self.keys_per_second = Some(rate.max(1));
        self
    }

    /// How long a copied key stays on its old host as well before it is
    /// deleted there (default [`DELETE_DELAY`]: none, deleted right after
    /// the copy). For clients that read the old owner without rechecking
    /// the new one; rb's migrating clusters do not need it, and a key that
    /// changes on its new owner meanwhile can be read stale from the old
    /// copy while it waits.
    #[must_use]
    pub fn delete_delay(mut self, delay: Duration) -> MoveOptions {
        self.delete_delay = Some(delay);
        self
    }

    /// How keys are copied (default [`Transfer::Auto`]: the servers'
    /// `MIGRATE` where it can work, else `DUMP`/`RESTORE`).
    #[must_use]
    pub fn transfer(mut self, transfer: Transfer) -> MoveOptions {
        self.transfer = transfer;
        self
    }

    /// Resumes a move from a position a progress report gave.
    #[must_use]
    pub fn resume_from(mut self, at: ScanCursor) -> MoveOptions {
        self.from = Some(at);
        self
    }

    /// Called after each batch with the totals so far and where to resume.
    #[must_use]
    pub fn progress(mut self, f: impl Fn(&MoveProgress) + Send + Sync + 'static) -> MoveOptions {
        self.progress = Some(Arc::new(f));
        self
    }
}

/// One key on its way: where it goes and what was copied.
struct Moving {
    key: Vec<u8>,
    to: HostId,
    payload: Vec<u8>,
    /// Whether `RESTORE` created it (false: the new owner had it).
    restored: bool,
}

/// Moves every key of `old` whose owner in `new` is another server (see
/// the module docs). Safe to run while clients write to the new cluster:
/// a key its new owner already has is never overwritten.
///
/// ```no_run
/// # let (old, new) = (rb::Cluster::from_urls(["redis://127.0.0.1:6379"])?, rb::Cluster::from_urls(["redis://127.0.0.1:6380"])?);
/// let report = rb::migrate::move_keys(&old, &new, rb::migrate::MoveOptions::new().progress(|p| {
///     eprintln!("{} scanned, {} moved; resume at {:?}", p.scanned, p.moved, p.resume_at);
/// }))?;
/// # Ok::<(), rb::Error>(())
/// ```
///
/// # Errors
///
/// The first failure of a host (the move stops there; the last progress
/// report says where to resume), or the new router's error;
/// [`Error::Config`] for [`Transfer::Migrate`] with a `delete_delay` (it
/// deletes at once) or a new owner `MIGRATE` cannot reach.
pub fn move_keys(old: &Cluster, new: &Cluster, opts: MoveOptions) -> Result<MoveReport> {
    let started = Instant::now();
    let router = new.router()?;
    let count = opts.batch.unwrap_or(1000);
    let delay = opts.delete_delay.unwrap_or(DELETE_DELAY);
    let transfer = match (opts.transfer, delay.is_zero()) {
        (Transfer::Migrate, false) => {
            return Err(Error::config(
                "Transfer::Migrate deletes each key as it copies it: a delete_delay needs Transfer::DumpRestore",
            ))
        }
        (Transfer::Auto, false) => Transfer::DumpRestore,
        (t, _) => t,
    };
    let routes = by_server::Routes::new(transfer);
    let mut scan = old.scan_from(
        opts.from.unwrap_or_else(ScanCursor::start),
        ScanOptions::new().count(count).dedupe(false),
    );
    let mut progress = MoveProgress::default();
    let mut waiting: VecDeque<Copied> = VecDeque::new();
    // Records of settled copies, dropped with the next restores there.
    let mut keeps = Keeps::new();
    while let Some(page_at) = scan.position() {
        let host = page_at.host();
        let mut keys = scan.next_page()?;
        // The records of copies and deletes are no keys of the application's.
        keys.retain(|k| k.as_slice() != COPIES.as_bytes() && k.as_slice() != DELETED.as_bytes());
        progress.scanned += keys.len() as u64;
        let mut leaving = Vec::new();
        for key in keys {
            let to = router.host_for_key(&key)?;
            if same_server(old, host, new, to)? {
                progress.stayed += 1;
            } else {
                leaving.push((key, to));
            }
        }
        let leaving = by_server::migrate_page(old, new, host, leaving, &routes, &mut progress)?;
        if !leaving.is_empty() {
            let batch = copy_keys(old, new, host, leaving, &mut keeps, &mut progress)?;
            waiting.push_back(Copied::new(host, batch, page_at));
        }
        settle_due(old, new, &mut waiting, delay, &mut keeps, &mut progress)?;
        // Resume where no old copy still waits for its delete: a restart
        // scans those again, finds their copies there, and deletes them.
        progress.resume_at = waiting.front().map(|c| c.page_at).or(scan.position());
        if let Some(report) = &opts.progress {
            report(&progress);
        }
        if let Some(rate) = opts.keys_per_second {
            let due = Duration::from_secs_f64(progress.scanned as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    if let Some(left) = waiting
        .back()
        .and_then(|last| delay.checked_sub(last.at.elapsed()))
    {
        std::thread::sleep(left);
    }
    settle_due(
        old,
        new,
        &mut waiting,
        Duration::ZERO,
        &mut keeps,
        &mut progress,
    )?;
    drop_settled(new, &mut keeps)?;
    sweep_leftovers(old, new)?;
    progress.resume_at = None;
    if let Some(report) = &opts.progress {
        report(&progress);
    }
    Ok(MoveReport {
        progress,
        elapsed: started.elapsed(),
    })
}

/// Deletes from the old hosts the copies that have waited `delay`.
fn settle_due(
    old: &Cluster,
    new: &Cluster,
    waiting: &mut VecDeque<Copied>,
    delay: Duration,
    keeps: &mut Keeps,
    progress: &mut MoveProgress,
) -> Result<()> {
    while waiting.front().is_some_and(|c| c.at.elapsed() >= delay) {
        if let Some(batch) = waiting.pop_front() {
            settle_copies(old, new, batch.host, batch.batch, Some(keeps), progress)?;
        }
    }
    Ok(())
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

/// One page's keys copied from one old host, to settle later.
struct Copied {
    host: HostId,
    batch: Batch,
    at: Instant,
    /// The walk's position before the page they came from.
    page_at: ScanCursor,
}

impl Copied {
    fn new(host: HostId, batch: Batch, page_at: ScanCursor) -> Copied {
        Copied {
            host,
            batch,
            at: Instant::now(),
            page_at,
        }
    }
}

/// Keys one move copied (or found on their new owners), under the token
/// its copies are recorded with (see [`COPIES`]).
struct Batch {
    token: Arc<str>,
    keys: Vec<Moving>,
}

/// Copies one page's leaving keys from `host` of `old` to their owners in
/// `new` (never over a key the new owner has, nor one deleted there: see
/// [`COPIES`]): what was copied (or found there).
fn copy_keys(
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
type Keeps = BTreeMap<HostId, Vec<(Vec<u8>, Arc<str>)>>;

/// Settles a batch [`copy_keys`] made from old host `host`, in three
/// steps (see [`COPIES`]): on the old host, deletes each copied key that
/// is still as copied and checks that each key found on its new owner is
/// still there as it was; on the new owners, takes back the copies whose
/// old copy was gone or changed (if still this move's copy), and drops
/// the records of the keys found there; then deletes those keys' old
/// copies (if still as they were): the new owner's copy is the key's only
/// home from then. The records of the copies whose old copy went are
/// dropped with them where that step runs anyway, else left in `keeps`
/// for the next restore there (a record whose old copy is gone matters
/// to nobody, it only takes room); without `keeps`, dropped now.
fn settle_copies(
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

/// A record of a copy: its key and the token of the move that made it.
type Record<'a> = (&'a [u8], &'a [u8]);

/// Drops the records of copies left on the new owners whose old copy is
/// gone: a crashed (killed) move's, which nobody else drops. A record
/// whose old copy is still there may be a move's half-way, and stays.
fn sweep_leftovers(old: &Cluster, new: &Cluster) -> Result<()> {
    let old_router = old.router()?;
    for to in new.host_ids() {
        let target = new.local_client(to)?;
        let mut cursor = String::from("0");
        loop {
            let page = cmd("HSCAN")
                .arg(COPIES)
                .arg(cursor.as_str())
                .arg("COUNT")
                .arg(1000);
            let (next, flat): (String, Vec<Vec<u8>>) =
                crate::convert::FromValue::from_value(one_reply(&target, page)?)?;
            let records: Vec<Record<'_>> = flat
                .chunks_exact(2)
                .map(|pair| (pair[0].as_slice(), pair[1].as_slice()))
                .collect();
            let mut by_old: BTreeMap<HostId, Vec<Record<'_>>> = BTreeMap::new();
            for &(key, token) in &records {
                by_old
                    .entry(old_router.host_for_key(key)?)
                    .or_default()
                    .push((key, token));
            }
            let mut gone = Vec::new();
            for (from, records) in by_old {
                let exists = old
                    .local_client(from)?
                    .pipeline(records.iter().map(|(k, _)| cmd("EXISTS").arg(*k)));
                for (record, there) in records.into_iter().zip(exists) {
                    if matches!(there?, Value::Int(0)) {
                        gone.push(record);
                    }
                }
            }
            if !gone.is_empty() {
                let n = gone.len();
                let items = gone
                    .into_iter()
                    .map(|(key, token)| (key, copies::Settle::Drop(token)));
                copies::settled(one_reply(&target, copies::settle("", items))?, n)?;
            }
            if next == "0" {
                break;
            }
            cursor = next;
        }
    }
    Ok(())
}

/// Drops the records `keeps` holds, on each new owner at once.
fn drop_settled(new: &Cluster, keeps: &mut Keeps) -> Result<()> {
    let scripts = std::mem::take(keeps)
        .into_iter()
        .map(|(to, drops)| {
            let items = drops
                .iter()
                .map(|(key, token)| (key.as_slice(), copies::Settle::Drop(token.as_bytes())));
            (to, copies::settle("", items))
        })
        .collect();
    on_each(new, scripts).map(drop)
}

/// Runs each host's command of `commands` (by host, in order) on `cluster`,
/// all at once; their replies in the same order.
///
/// # Errors
///
/// The first failure of a host (with its name), an error reply included.
fn on_each(cluster: &Cluster, commands: Vec<(HostId, Cmd)>) -> Result<Vec<Value>> {
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
fn one_reply(host: &crate::LocalClient, command: Cmd) -> Result<Value> {
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
fn dumps<'a>(
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
/// (see [`COPIES`]). The caller saw each old copy still there after it saw
/// the new owner's.
fn retire_found(
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
