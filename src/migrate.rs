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
//!
//! Who owns what: a migrating cluster's clients move keys too (on write,
//! and on a read's copy-forward), and the layers keep each module to the
//! ones below it, so the parts they share sit below this one. The rules
//! for a key in transit (what each command does to its key, the new
//! owners' records of copies and deletes, [`COPIES`] and [`DELETED`], and
//! their scripts) are `handoff`'s, below the clients, with no I/O; the
//! steps that copy a batch of keys and retire their old copies, counted
//! in a [`MoveProgress`], are `client::moving`'s, in the client/cluster
//! layer. This module is the mover on top of them: the walk of the old
//! hosts, batches, the rate limit, the delayed deletes, progress reports,
//! the final sweep of leftover records, and the old server's own `MIGRATE`
//! ([`Transfer`], which only the mover uses: `by_server`).

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::client::moving::{
    copy_keys, on_each, one_reply, same_server, settle_copies, Batch, Keeps,
};
use crate::cluster::Cluster;
use crate::cmd::cmd;
use crate::error::{Error, HostId, Result};
use crate::handoff::copies;
use crate::resp::Value;
use crate::scan::{ScanCursor, ScanOptions};

mod by_server;

pub use crate::client::moving::MoveProgress;
pub use crate::handoff::{COPIES, DELETED};
pub use by_server::Transfer;

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
