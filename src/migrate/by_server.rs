//! Moving a batch of keys with the old server's own `MIGRATE`.
//!
//! `MIGRATE host port "" db timeout KEYS ...` (no `COPY`, no `REPLACE`)
//! sends the keys server to server and deletes each one the new owner took,
//! all while the old server runs nothing else: the copy and the delete are
//! one step there. So a delete that reaches the old host before it is gone
//! from there, then the new owner (the order a migrating cluster deletes
//! in), cannot be undone by the move, and no record of the copy is needed
//! (with `DUMP`/`RESTORE` through the client, see [`super::COPIES`]). It is
//! also one round trip per batch instead of four, and the values never
//! pass through this process.
//!
//! `MIGRATE` reports only its first error, so the batch is wrapped in two
//! scripts on the old host, pipelined with it: one before (which keys
//! exist, and their `DUMP` sizes for the progress report) and one after
//! (which keys are still there). A key still there was not taken: the new
//! owner has another value (a newer write, which wins), or the same value
//! (another move's copy, or this `MIGRATE`'s when it timed out reading the
//! answers): either way the new owner's is the key's home and the old copy
//! is deleted (see [`super::COPIES`]); or nothing (the copy failed: the key
//! is handed back to be copied through the client, which reports that
//! key's own error).
//!
//! The old server resolves the new owner's address itself, so before a
//! pair of hosts first uses `MIGRATE`, a canary key is migrated and looked
//! for through this client: a tunnel, NAT or custom resolver that makes
//! the address lead elsewhere from the old server is caught there.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::client::moving::{dumps, retire_found, MoveProgress, Moving};
use crate::cluster::Cluster;
use crate::cmd::{cmd, Cmd};
use crate::commands::Commands;
use crate::config::HostInfo;
use crate::convert::FromValue;
use crate::error::{Error, HostId, Result};
use crate::server_facts::ServerFacts;
use crate::LocalClient;

/// The `DUMP` size of each key of `KEYS`, or -1 for a key that does not exist.
const DUMP_SIZES: &str = "local out = {} \
for i, k in ipairs(KEYS) do \
  local d = redis.call('DUMP', k) \
  if d then out[i] = #d else out[i] = -1 end \
end \
return out";

/// 1 for each key of `KEYS` that exists, else 0.
const PRESENT: &str = "local out = {} \
for i, k in ipairs(KEYS) do out[i] = redis.call('EXISTS', k) end \
return out";

/// How [`move_keys`](super::move_keys) copies a key to its new owner.
///
/// `MIGRATE` is the safer: the old server copies and deletes in one step,
/// so a delete made during the move can never be undone, which
/// `DUMP`/`RESTORE` promises only for deletes through a migrating cluster
/// (they mark the key deleted on the new owner, see [`super::COPIES`]; a
/// key that expires there while in flight is restored, with the TTL it
/// had, and then taken back). `DUMP`/`RESTORE` was the faster here (1.5x the
/// keys per second, `examples/resize.rs`): the old server reads
/// `MIGRATE`'s answers a byte at a time. Run one mover per fleet at a time: a `MIGRATE` blocks its
/// old server until the new owner answers, so two crossing between the
/// same two servers would each wait out the other's timeout (rb's own
/// moves on write never `MIGRATE`, for that reason).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Transfer {
    /// `MIGRATE` where it can work: the new owner is a TCP host without TLS,
    /// another server than the old host (`MIGRATE` to itself would wait on
    /// itself; told by `run_id`), and a canary key migrated from the old
    /// host arrives where this client reaches the new owner. A pair of
    /// hosts that fails any of these, or whose `MIGRATE` moves nothing and
    /// fails (the old server cannot reach the address, cannot log in, may
    /// not run `MIGRATE` or `INFO`), copies with `DUMP`/`RESTORE` for the
    /// life of the new cluster. With a
    /// [`delete_delay`](super::MoveOptions::delete_delay), always
    /// `DUMP`/`RESTORE`.
    #[default]
    Auto,
    /// `DUMP` and `PTTL` on the old host, `RESTORE` on the new owner, then a
    /// compare-and-delete on the old host: works over any connection
    /// (unix sockets, TLS, hosts that cannot reach each other).
    DumpRestore,
    /// `MIGRATE` only: a move fails where it cannot work.
    Migrate,
}

/// Which pairs of hosts move keys with `MIGRATE` (what is learned is kept
/// in the new cluster's [`ServerFacts`]).
pub(super) struct Routes {
    transfer: Transfer,
}

impl Routes {
    pub(super) fn new(transfer: Transfer) -> Routes {
        Routes { transfer }
    }

    /// The start of a `MIGRATE` from `from` of `old` to `to` of `new`, or
    /// `None` to copy through this process.
    ///
    /// # Errors
    ///
    /// With [`Transfer::Migrate`], [`Error::Config`] when `MIGRATE` cannot
    /// reach `to`; a host's failure to answer `INFO server`.
    fn start(&self, old: &Cluster, from: HostId, new: &Cluster, to: HostId) -> Result<Option<Cmd>> {
        if self.transfer == Transfer::DumpRestore {
            return Ok(None);
        }
        let (source, target) = (old.host(from)?, new.host(to)?);
        let facts = new.server_facts();
        let pair = (&source.name().addr, &target.name().addr);
        if self.transfer == Transfer::Auto && facts.cannot_migrate(pair.0, pair.1) {
            return Ok(None);
        }
        let unreachable = || {
            Error::config(format!(
                "{}: MIGRATE cannot reach it (a unix socket, TLS, or the old host's own server): use Transfer::DumpRestore",
                target.name()
            ))
        };
        let Some(start) = migrate_start(&target) else {
            return self.unusable(facts, pair, unreachable());
        };
        match (run_id(facts, old, from), run_id(facts, new, to)) {
            (Ok(a), Ok(b)) if a != b => {}
            (Ok(_), Ok(_)) => return self.unusable(facts, pair, unreachable()),
            // No INFO (an ACL without it): MIGRATE cannot be checked safe.
            (Err(e), _) | (_, Err(e)) => return self.unusable(facts, pair, e),
        }
        // The old server resolves the address itself: it must lead where
        // this client's does (no tunnel, NAT or resolver of the client's).
        if !facts.migrate_checked(pair.0, pair.1) {
            match canary(old, from, new, to, &start)? {
                Ok(true) => facts.migrate_works(pair.0, pair.1),
                Ok(false) => {
                    let elsewhere = Error::config(format!(
                        "{}: MIGRATE from {} does not reach it as this client does (another server at that address from there): use Transfer::DumpRestore",
                        target.name(),
                        source.name()
                    ));
                    return self.unusable(facts, pair, elsewhere);
                }
                Err(e) => return self.unusable(facts, pair, e),
            }
        }
        Ok(Some(start))
    }

    /// `MIGRATE` cannot serve the pair (old place, new place), for `why`:
    /// with [`Transfer::Migrate`] that is the move's error; `Auto`
    /// remembers the pair and copies through the client.
    fn unusable(
        &self,
        facts: &ServerFacts,
        (from, to): (&Arc<str>, &Arc<str>),
        why: Error,
    ) -> Result<Option<Cmd>> {
        if self.transfer == Transfer::Migrate {
            return Err(why);
        }
        facts.migrate_failed(from, to);
        Ok(None)
    }
}

/// Whether a `MIGRATE` from `from` of `old` lands on the server this
/// client reaches as `to` of `new` (`Err`: the `MIGRATE` failed): a canary
/// key (with a minute's TTL, in case it lands elsewhere) is migrated and
/// looked for through the client.
fn canary(
    old: &Cluster,
    from: HostId,
    new: &Cluster,
    to: HostId,
    start: &Cmd,
) -> Result<Result<bool>> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let canary = format!("rb:migrate-canary:{}:{nanos}", std::process::id());
    let mut migrate = start.clone();
    migrate.push_arg("KEYS");
    migrate.push_arg(canary.as_str());
    let source = old.local_client(from)?;
    let set = cmd("SET").arg(canary.as_str()).arg(1).arg("PX").arg(60_000);
    if let Some(Err(e)) = source
        .pipeline([set, migrate])
        .into_iter()
        .find(Result::is_err)
    {
        source.pipeline([cmd("DEL").arg(canary.as_str())]);
        return Ok(Err(e));
    }
    let found = new
        .local_client(to)?
        .pipeline([cmd("DEL").arg(canary.as_str())])
        .pop()
        .unwrap_or_else(|| Err(Error::protocol("a pipelined reply is missing")))?;
    Ok(Ok(found == crate::resp::Value::Int(1)))
}

/// The `run_id` of a host's server, asked once.
fn run_id(facts: &ServerFacts, cluster: &Cluster, host: HostId) -> Result<Arc<str>> {
    let place = cluster.host(host)?.name().addr.clone();
    if let Some(id) = facts.run_id(&place) {
        return Ok(id);
    }
    let info: String = cluster.local_client(host)?.cmd(cmd("INFO").arg("server"))?;
    Ok(facts.learn_run_id(&place, &info))
}

/// `MIGRATE host port "" db timeout [AUTH ...]` for a new owner `MIGRATE`
/// can reach: `None` for a unix socket or TLS.
fn migrate_start(to: &HostInfo) -> Option<Cmd> {
    if to.unix_socket_path.is_some() || to.tls {
        return None;
    }
    // MIGRATE's timeout bounds each wait on the new owner, not the whole.
    let timeout_ms = to.connect_timeout.as_millis().clamp(1000, 60_000) as u64;
    let mut c = cmd("MIGRATE")
        .arg(to.host.as_str())
        .arg(to.port)
        .arg("")
        .arg(to.db)
        .arg(timeout_ms);
    match (&to.username, &to.password) {
        (Some(user), Some(password)) => {
            c.push_arg("AUTH2");
            c.push_arg(user.as_str());
            c.push_arg(password.as_str());
        }
        (None, Some(password)) => {
            c.push_arg("AUTH");
            c.push_arg(password.as_str());
        }
        _ => {}
    }
    Some(c)
}

/// Moves what it can of one page's leaving keys from `host` of `old` with
/// `MIGRATE` (counted in `progress`); the keys left to copy through this
/// process.
///
/// # Errors
///
/// A host's failure; with [`Transfer::Migrate`], a `MIGRATE` that left
/// keys the new owner lacks.
pub(super) fn migrate_page(
    old: &Cluster,
    new: &Cluster,
    host: HostId,
    leaving: Vec<(Vec<u8>, HostId)>,
    routes: &Routes,
    progress: &mut MoveProgress,
) -> Result<Vec<(Vec<u8>, HostId)>> {
    if routes.transfer == Transfer::DumpRestore {
        return Ok(leaving);
    }
    let mut by_owner: BTreeMap<HostId, Vec<Vec<u8>>> = BTreeMap::new();
    for (key, to) in leaving {
        by_owner.entry(to).or_default().push(key);
    }
    let source = old.local_client(host)?;
    let mut rest = Vec::new();
    for (to, keys) in by_owner {
        let Some(start) = routes.start(old, host, new, to)? else {
            rest.extend(keys.into_iter().map(|k| (k, to)));
            continue;
        };
        let target = new.local_client(to)?;
        let tried = keys.len();
        let BatchLeft {
            mut not_copied,
            mut failure,
        } = migrate_batch(&source, &target, start.clone(), to, keys, progress)?;
        if failure.as_ref().is_some_and(refused_as_busy) && !not_copied.is_empty() {
            // Refused because the new owner had them, and gone from it
            // since (a concurrent change): MIGRATE them once more.
            let again = migrate_batch(&source, &target, start, to, not_copied, progress)?;
            (not_copied, failure) = (again.not_copied, again.failure);
        }
        if not_copied.is_empty() {
            continue;
        }
        match failure {
            Some(e) if routes.transfer == Transfer::Migrate => return Err(e),
            None if routes.transfer == Transfer::Migrate => {
                return Err(Error::protocol(format!(
                    "MIGRATE answered OK and left {} keys the new owner lacks",
                    not_copied.len()
                )))
            }
            // Nothing got through (and not for a key the new owner had):
            // this pair copies through the client.
            Some(e) if not_copied.len() == tried && !refused_as_busy(&e) => {
                new.server_facts()
                    .migrate_failed(&old.host(host)?.name().addr, &new.host(to)?.name().addr);
            }
            _ => {}
        }
        rest.extend(not_copied.into_iter().map(|k| (k, to)));
    }
    Ok(rest)
}

/// Whether `MIGRATE` failed because the new owner already had a key
/// (`BUSYKEY`, which MIGRATE passes on in its error's text).
fn refused_as_busy(e: &Error) -> bool {
    e.code() == Some("BUSYKEY") || e.to_string().contains("BUSYKEY")
}

/// What one `MIGRATE` left: keys the new owner lacks, and `MIGRATE`'s
/// error.
struct BatchLeft {
    not_copied: Vec<Vec<u8>>,
    failure: Option<Error>,
}

/// One `MIGRATE` of `keys` from `source` to `target` (new host `to`),
/// between the two scripts: the keys neither moved nor found on `target`
/// (to copy another way) and `MIGRATE`'s error, if any. The old copies of
/// keys found on `target` are deleted.
fn migrate_batch(
    source: &LocalClient,
    target: &LocalClient,
    start: Cmd,
    to: HostId,
    keys: Vec<Vec<u8>>,
    progress: &mut MoveProgress,
) -> Result<BatchLeft> {
    let mut migrate = start;
    migrate.push_arg("KEYS");
    for k in &keys {
        migrate.push_arg(k.as_slice());
    }
    let mut replies = source
        .pipeline([script(DUMP_SIZES, &keys), migrate, script(PRESENT, &keys)])
        .into_iter();
    let mut next = || {
        replies
            .next()
            .unwrap_or_else(|| Err(Error::protocol("a pipelined reply is missing")))
    };
    let sizes: Vec<i64> = FromValue::from_value(next()?)?;
    let failure = next().err();
    let present: Vec<i64> = FromValue::from_value(next()?)?;
    if sizes.len() != keys.len() || present.len() != keys.len() {
        return Err(Error::protocol(
            "a script answered for the wrong number of keys",
        ));
    }
    let mut stayed = Vec::new();
    for ((key, size), present) in keys.into_iter().zip(sizes).zip(present) {
        if present == 1 {
            stayed.push(key);
        } else if size >= 0 {
            progress.copied += 1;
            progress.moved += 1;
            progress.bytes += size as u64;
        } else {
            progress.vanished += 1;
        }
    }
    if stayed.is_empty() {
        return Ok(BatchLeft {
            not_copied: stayed,
            failure,
        });
    }
    // Not taken: the new owner has its own (a newer write), or the same
    // (another move's copy, or this MIGRATE's when it timed out reading
    // the answers): the old copy goes; or nothing (another way). The new
    // owner's is read first: an old copy seen after it is still there.
    let theirs = dumps(target, stayed.iter().map(Vec::as_slice))?;
    let ours = dumps(source, stayed.iter().map(Vec::as_slice))?;
    let timed_out = failure.as_ref().is_some_and(|e| e.code() == Some("IOERR"));
    let (mut not_copied, mut found) = (Vec::new(), Vec::new());
    for ((key, theirs), ours) in stayed.into_iter().zip(theirs).zip(ours) {
        let (theirs, payload) = match (theirs, ours) {
            // Gone from the old host since: nothing to move.
            (_, None) => {
                progress.vanished += 1;
                continue;
            }
            (None, Some(_)) => {
                not_copied.push(key);
                continue;
            }
            (Some(theirs), Some(ours)) => (theirs, ours),
        };
        if timed_out && theirs == payload {
            progress.copied += 1;
            progress.moved += 1;
            progress.bytes += payload.len() as u64;
        } else {
            progress.skipped += 1;
        }
        found.push(Moving {
            key,
            to,
            payload,
            restored: false,
        });
    }
    retire_found(source, target, &found)?;
    Ok(BatchLeft {
        not_copied,
        failure,
    })
}

/// `EVAL source n keys...`.
fn script(source: &str, keys: &[Vec<u8>]) -> Cmd {
    let mut eval = cmd("EVAL").arg(source).arg(keys.len());
    for k in keys {
        eval.push_arg(k.as_slice());
    }
    eval
}
