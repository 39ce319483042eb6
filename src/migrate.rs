//! Growing or shrinking a fleet: moving each key whose owner changes.
//!
//! [`move_keys`] walks every host of the old cluster (`SCAN`), and for each
//! key that the new cluster's router puts on another server, in batches:
//! the old server's own `MIGRATE` copies it and deletes it in one step
//! where the servers reach each other; elsewhere `DUMP` and `PTTL` on the
//! old host, `RESTORE` (value and TTL) on the new owner, then a delete from
//! the old host only if it still holds what was copied ([`Transfer`]). It
//! never overwrites a key the new owner already has (`RESTORE` without
//! `REPLACE`: a write made during the move wins; the old copy goes, or
//! after [`SAME_COPY_GRACE`] if the new owner holds the very same value),
//! and a key deleted from the old host while it was being copied is
//! deleted from the new owner too (if the copy is still what is there), so
//! a delete made during the move is not undone. Every batch's progress
//! carries the position to resume from after a crash
//! ([`MoveOptions::resume_from`]).

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cluster::Cluster;
use crate::cmd::{cmd, Cmd};
use crate::error::{Error, HostId, Result};
use crate::resp::Value;
use crate::scan::{ScanCursor, ScanOptions};

mod by_server;

pub use by_server::Transfer;

/// Deletes each key of `KEYS` whose `DUMP` is still the `ARGV` at the same
/// position; answers 1 (deleted) or 0 (changed or gone) per key.
pub(crate) const DELETE_IF_UNCHANGED: &str = "local out = {} \
for i, k in ipairs(KEYS) do \
  if redis.call('DUMP', k) == ARGV[i] then redis.call('DEL', k); out[i] = 1 else out[i] = 0 end \
end \
return out";

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

/// How long an old copy whose new owner holds the very same value is left
/// before the mover deletes it. Such a pair is usually another move's
/// half-way point: a client's move on write or copy-forward, which copied
/// the key and is about to delete the old copy itself, and which would
/// take its copy back (a delete made meanwhile, it would conclude) if the
/// old copy vanished first. Still there after this, it is a crashed
/// move's leftover.
pub const SAME_COPY_GRACE: Duration = Duration::from_secs(2);

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
    // Old copies to delete later (see SAME_COPY_GRACE), in walk order.
    let mut same_copies: VecDeque<Copied> = VecDeque::new();
    let mut pages = 0u64;
    let mut scan = old.scan_from(
        opts.from.unwrap_or_else(ScanCursor::start),
        ScanOptions::new().count(count).dedupe(false),
    );
    let mut progress = MoveProgress::default();
    let mut waiting: VecDeque<Copied> = VecDeque::new();
    while let Some(page_at) = scan.position() {
        let host = page_at.host();
        let keys = scan.next_page()?;
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
        pages += 1;
        let left = by_server::migrate_page(old, new, host, leaving, &routes, &mut progress)?;
        let leaving = left.to_copy;
        if !left.same_copies.is_empty() {
            same_copies.push_back(Copied::new(host, left.same_copies, page_at, pages));
        }
        if !leaving.is_empty() {
            let keys = copy_keys(old, new, host, leaving, &mut progress)?;
            waiting.push_back(Copied::new(host, keys, page_at, pages));
        }
        settle_due(
            old,
            new,
            &mut waiting,
            &mut same_copies,
            delay,
            &mut progress,
        )?;
        delete_due(old, &mut same_copies, SAME_COPY_GRACE)?;
        // Resume where no old copy still waits for its delete: a restart
        // scans those again, finds their copies there, and deletes them.
        let first_waiting = [waiting.front(), same_copies.front()]
            .into_iter()
            .flatten()
            .min_by_key(|c| c.page);
        progress.resume_at = first_waiting.map(|c| c.page_at).or(scan.position());
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
    wait_for_last(&waiting, delay);
    settle_due(
        old,
        new,
        &mut waiting,
        &mut same_copies,
        Duration::ZERO,
        &mut progress,
    )?;
    wait_for_last(&same_copies, SAME_COPY_GRACE);
    delete_due(old, &mut same_copies, Duration::ZERO)?;
    progress.resume_at = None;
    if let Some(report) = &opts.progress {
        report(&progress);
    }
    Ok(MoveReport {
        progress,
        elapsed: started.elapsed(),
    })
}

/// Sleeps until the last of `queue` has waited `wait`.
fn wait_for_last(queue: &VecDeque<Copied>, wait: Duration) {
    if let Some(left) = queue
        .back()
        .and_then(|last| wait.checked_sub(last.at.elapsed()))
    {
        std::thread::sleep(left);
    }
}

/// Deletes from the old hosts the copies that have waited `delay`; old
/// copies the same as their new owner's go to `same_copies`.
fn settle_due(
    old: &Cluster,
    new: &Cluster,
    waiting: &mut VecDeque<Copied>,
    same_copies: &mut VecDeque<Copied>,
    delay: Duration,
    progress: &mut MoveProgress,
) -> Result<()> {
    while waiting.front().is_some_and(|c| c.at.elapsed() >= delay) {
        if let Some(batch) = waiting.pop_front() {
            let same = settle_copies(old, new, batch.host, batch.keys, progress)?;
            if !same.is_empty() {
                same_copies.push_back(Copied::new(batch.host, same, batch.page_at, batch.page));
            }
        }
    }
    Ok(())
}

/// Deletes the old copies that have waited `grace` (see
/// [`SAME_COPY_GRACE`]), each only if it is still as it was.
fn delete_due(old: &Cluster, same_copies: &mut VecDeque<Copied>, grace: Duration) -> Result<()> {
    while same_copies.front().is_some_and(|c| c.at.elapsed() >= grace) {
        if let Some(batch) = same_copies.pop_front() {
            let source = old.local_client(batch.host)?;
            delete_if_unchanged(&source, batch.keys.iter().map(|m| (&m.key, &m.payload)))?;
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
    let copied = copy_keys(old, new, host, leaving, progress)?;
    // Old copies the same as the new owner's are another move's to delete.
    settle_copies(old, new, host, copied, progress).map(drop)
}

/// Keys copied from one old host, to delete from it later.
struct Copied {
    host: HostId,
    keys: Vec<Moving>,
    at: Instant,
    /// The walk's position before the page they came from.
    page_at: ScanCursor,
    /// That page's number in the walk.
    page: u64,
}

impl Copied {
    fn new(host: HostId, keys: Vec<Moving>, page_at: ScanCursor, page: u64) -> Copied {
        Copied {
            host,
            keys,
            at: Instant::now(),
            page_at,
            page,
        }
    }
}

/// Copies one page's leaving keys from `host` of `old` to their owners in
/// `new` (`RESTORE` without `REPLACE`): what was copied (or found there).
fn copy_keys(
    old: &Cluster,
    new: &Cluster,
    host: HostId,
    leaving: Vec<(Vec<u8>, HostId)>,
    progress: &mut MoveProgress,
) -> Result<Vec<Moving>> {
    let source = old.local_client(host)?;
    let dumps = source.pipeline(
        leaving
            .iter()
            .flat_map(|(k, _)| [cmd("PTTL").arg(k.as_slice()), cmd("DUMP").arg(k.as_slice())]),
    );
    let mut moving = Vec::with_capacity(leaving.len());
    let mut ttls = Vec::with_capacity(leaving.len());
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
                progress.bytes += payload.len() as u64;
                moving.push(Moving {
                    key,
                    to,
                    payload,
                    restored: false,
                });
                // PTTL -1 is no expiry; RESTORE takes 0 for that.
                ttls.push(ttl.max(0));
            }
            Some(Err(e)) => return Err(e),
            // Gone since the scan (expired or deleted): nothing to move.
            _ => progress.vanished += 1,
        }
    }
    let mut by_owner: BTreeMap<HostId, Vec<usize>> = BTreeMap::new();
    for (i, m) in moving.iter().enumerate() {
        by_owner.entry(m.to).or_default().push(i);
    }
    for (&to, indexes) in &by_owner {
        let target = new.local_client(to)?;
        let restores: Vec<Cmd> = indexes
            .iter()
            .map(|&i| {
                let m = &moving[i];
                cmd("RESTORE")
                    .arg(m.key.as_slice())
                    .arg(ttls[i])
                    .arg(m.payload.as_slice())
            })
            .collect();
        for (&i, reply) in indexes.iter().zip(target.pipeline(restores)) {
            match reply {
                Ok(_) => {
                    moving[i].restored = true;
                    progress.copied += 1;
                }
                // The new owner has the key: a write made there wins.
                Err(e) if e.code() == Some("BUSYKEY") => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(moving)
}

/// Deletes copied keys from their old host where they are still as copied;
/// a copy of a key deleted there meanwhile is deleted from the new owner
/// too (if it is still the copy), so that delete stands. Of the keys the
/// new owner already had, the old copy goes if the new owner's differs (a
/// newer write); the old copies the same as the new owner's are returned
/// (see [`SAME_COPY_GRACE`]).
fn settle_copies(
    old: &Cluster,
    new: &Cluster,
    host: HostId,
    moving: Vec<Moving>,
    progress: &mut MoveProgress,
) -> Result<Vec<Moving>> {
    let source = old.local_client(host)?;
    let (copied, found): (Vec<Moving>, Vec<Moving>) = moving.into_iter().partition(|m| m.restored);
    let deleted = delete_if_unchanged(&source, copied.iter().map(|m| (&m.key, &m.payload)))?;
    let mut undo: BTreeMap<HostId, Vec<&Moving>> = BTreeMap::new();
    for (m, deleted) in copied.iter().zip(deleted) {
        if deleted {
            progress.moved += 1;
        } else {
            undo.entry(m.to).or_default().push(m);
        }
    }
    for (to, copies) in undo {
        let target = new.local_client(to)?;
        delete_if_unchanged(&target, copies.iter().map(|m| (&m.key, &m.payload)))?;
        progress.vanished += copies.len() as u64;
    }
    progress.skipped += found.len() as u64;
    let mut by_owner: BTreeMap<HostId, Vec<Moving>> = BTreeMap::new();
    for m in found {
        by_owner.entry(m.to).or_default().push(m);
    }
    let (mut stale, mut same) = (Vec::new(), Vec::new());
    for (to, found) in by_owner {
        let theirs = dumps(
            &new.local_client(to)?,
            found.iter().map(|m| m.key.as_slice()),
        )?;
        for (m, theirs) in found.into_iter().zip(theirs) {
            match theirs {
                Some(t) if t == m.payload => same.push(m),
                // Another value, or deleted there since (then by a delete
                // that reached the old host first): the old copy goes.
                _ => stale.push(m),
            }
        }
    }
    delete_if_unchanged(&source, stale.iter().map(|m| (&m.key, &m.payload)))?;
    Ok(same)
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

/// Runs [`DELETE_IF_UNCHANGED`] on one host for `(key, payload)` pairs;
/// whether each was deleted.
fn delete_if_unchanged<'a>(
    host: &crate::LocalClient,
    pairs: impl Iterator<Item = (&'a Vec<u8>, &'a Vec<u8>)>,
) -> Result<Vec<bool>> {
    let (keys, payloads): (Vec<&Vec<u8>>, Vec<&Vec<u8>>) = pairs.unzip();
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let mut eval = cmd("EVAL").arg(DELETE_IF_UNCHANGED).arg(keys.len());
    for k in &keys {
        eval.push_arg(k.as_slice());
    }
    for p in &payloads {
        eval.push_arg(p.as_slice());
    }
    let reply = host
        .pipeline([eval])
        .pop()
        .unwrap_or_else(|| Err(Error::config("no reply")))?;
    let flags: Vec<i64> = crate::convert::FromValue::from_value(reply)?;
    Ok(flags.into_iter().map(|f| f == 1).collect())
}

/// What a command does to its key, as a migrating cluster sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    /// Reads it: the new owner, then the old one on a miss.
    Read,
    /// Replaces it whatever it held: the new owner; the old copy goes.
    Overwrite,
    /// Deletes it: the old owner first, then the new one.
    Delete,
    /// Reads and changes it: where it is, moved to the new owner first.
    Modify,
}

/// Commands that only read their key.
const READS: &[&str] = &[
    "BITCOUNT",
    "BITPOS",
    "DUMP",
    "EXISTS",
    "EXPIRETIME",
    "GET",
    "GETBIT",
    "GETRANGE",
    "HEXISTS",
    "HGET",
    "HGETALL",
    "HKEYS",
    "HLEN",
    "HMGET",
    "HRANDFIELD",
    "HSTRLEN",
    "HVALS",
    "LINDEX",
    "LLEN",
    "LPOS",
    "LRANGE",
    "PEXPIRETIME",
    "PTTL",
    "SCARD",
    "SISMEMBER",
    "SMEMBERS",
    "SMISMEMBER",
    "SRANDMEMBER",
    "STRLEN",
    "SUBSTR",
    "TTL",
    "TYPE",
    "XLEN",
    "XRANGE",
    "XREVRANGE",
    "ZCARD",
    "ZCOUNT",
    "ZLEXCOUNT",
    "ZMSCORE",
    "ZRANDMEMBER",
    "ZRANGE",
    "ZRANGEBYLEX",
    "ZRANGEBYSCORE",
    "ZRANK",
    "ZREVRANGE",
    "ZREVRANGEBYLEX",
    "ZREVRANGEBYSCORE",
    "ZREVRANK",
    "ZSCORE",
];

impl Access {
    /// How `cmd` touches its key.
    pub(crate) fn of(cmd: &Cmd) -> Access {
        match cmd.common() {
            crate::cmd::Common::Get => return Access::Read,
            crate::cmd::Common::Set if cmd.arg_count() == 2 => return Access::Overwrite,
            _ => {}
        }
        let name = cmd.name();
        let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
        if READS.iter().any(|n| is(n)) {
            return Access::Read;
        }
        if is("DEL") || is("UNLINK") {
            return Access::Delete;
        }
        if is("SETEX") || is("PSETEX") {
            return Access::Overwrite;
        }
        if is("SET") {
            // NX, XX, GET and KEEPTTL depend on what the key holds.
            let conditional = cmd.args().skip(2).any(|a| {
                [&b"NX"[..], b"XX", b"GET", b"KEEPTTL"]
                    .iter()
                    .any(|o| a.eq_ignore_ascii_case(o))
            });
            if !conditional {
                return Access::Overwrite;
            }
        }
        Access::Modify
    }
}
