//! Growing or shrinking a fleet: moving each key whose owner changes.
//!
//! [`move_keys`] walks every host of the old cluster (`SCAN`), and for each
//! key that the new cluster's router puts on another server, in batches:
//! `DUMP` and `PTTL` on the old host, `RESTORE` (value and TTL) on the new
//! owner, then deletes it from the old host only if it still holds what was
//! copied. It never overwrites a key the new owner already has (`RESTORE`
//! without `REPLACE`: a write made during the move wins), and a key deleted
//! from the old host while it was being copied is deleted from the new
//! owner too (if the copy is still what is there), so a delete made during
//! the move is not undone. Every batch's progress carries the position to
//! resume from after a crash ([`MoveOptions::resume_from`]).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cluster::Cluster;
use crate::cmd::{cmd, Cmd};
use crate::error::{Error, HostId, Result};
use crate::resp::Value;
use crate::scan::{ScanCursor, ScanOptions};

/// Deletes each key of `KEYS` whose `DUMP` is still the `ARGV` at the same
/// position; answers 1 (deleted) or 0 (changed or gone) per key.
const DELETE_IF_UNCHANGED: &str = "local out = {} \
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
    progress: Option<ProgressFn>,
}

/// A progress callback.
type ProgressFn = Arc<dyn Fn(&MoveProgress) + Send + Sync>;

impl fmt::Debug for MoveOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MoveOptions")
            .field("batch", &self.batch)
            .field("keys_per_second", &self.keys_per_second)
            .field("from", &self.from)
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
/// report says where to resume), or the new router's error.
pub fn move_keys(old: &Cluster, new: &Cluster, opts: MoveOptions) -> Result<MoveReport> {
    let started = Instant::now();
    let router = new.router()?;
    let count = opts.batch.unwrap_or(1000);
    let mut scan = old.scan_from(
        opts.from.unwrap_or_else(ScanCursor::start),
        ScanOptions::new().count(count).dedupe(false),
    );
    let mut progress = MoveProgress::default();
    while let Some(host) = scan.position().map(|p| p.host()) {
        let keys = scan.next_page()?;
        let from = old.host(host)?;
        progress.scanned += keys.len() as u64;
        let mut leaving = Vec::new();
        for key in keys {
            let to = router.host_for_key(&key)?;
            if new.host(to)?.name().addr == from.name().addr {
                progress.stayed += 1;
            } else {
                leaving.push((key, to));
            }
        }
        if !leaving.is_empty() {
            move_batch(old, new, host, leaving, &mut progress)?;
        }
        progress.resume_at = scan.position();
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
    Ok(MoveReport {
        progress,
        elapsed: started.elapsed(),
    })
}

/// Copies one page's leaving keys from `host` of `old` to their owners in
/// `new`, then deletes them from `host` where unchanged.
fn move_batch(
    old: &Cluster,
    new: &Cluster,
    host: HostId,
    leaving: Vec<(Vec<u8>, HostId)>,
    progress: &mut MoveProgress,
) -> Result<()> {
    let source = old.local_client(host)?;
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
                progress.bytes += payload.len() as u64;
                // PTTL -1 is no expiry; RESTORE takes 0 for that.
                moving.push((
                    Moving {
                        key,
                        to,
                        payload,
                        restored: false,
                    },
                    ttl.max(0),
                ));
            }
            Some(Err(e)) => return Err(e),
            // Gone since the scan (expired or deleted): nothing to move.
            _ => progress.vanished += 1,
        }
    }
    // RESTORE on each new owner, no REPLACE: a key written there meanwhile wins.
    let mut by_owner: BTreeMap<HostId, Vec<usize>> = BTreeMap::new();
    for (i, (m, _)) in moving.iter().enumerate() {
        by_owner.entry(m.to).or_default().push(i);
    }
    for (&to, indexes) in &by_owner {
        let target = new.local_client(to)?;
        let restores: Vec<Cmd> = indexes
            .iter()
            .map(|&i| {
                let (m, ttl) = &moving[i];
                cmd("RESTORE")
                    .arg(m.key.as_slice())
                    .arg(*ttl)
                    .arg(m.payload.as_slice())
            })
            .collect();
        for (&i, reply) in indexes.iter().zip(target.pipeline(restores)) {
            match reply {
                Ok(_) => moving[i].0.restored = true,
                Err(e) if e.code() == Some("BUSYKEY") => {}
                Err(e) => return Err(e),
            }
        }
    }
    // Delete from the old host what is still as copied.
    let moving: Vec<Moving> = moving.into_iter().map(|(m, _)| m).collect();
    let deleted = delete_if_unchanged(&source, moving.iter().map(|m| (&m.key, &m.payload)))?;
    let mut undo: BTreeMap<HostId, Vec<&Moving>> = BTreeMap::new();
    for (m, deleted) in moving.iter().zip(deleted) {
        match (deleted, m.restored) {
            (true, true) => progress.moved += 1,
            (true, false) => progress.skipped += 1,
            // Deleted from the old host while we copied it: the copy must
            // not bring it back.
            (false, true) => undo.entry(m.to).or_default().push(m),
            (false, false) => progress.skipped += 1,
        }
    }
    for (to, copies) in undo {
        let target = new.local_client(to)?;
        delete_if_unchanged(&target, copies.iter().map(|m| (&m.key, &m.payload)))?;
        progress.vanished += copies.len() as u64;
    }
    Ok(())
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
