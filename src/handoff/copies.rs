//! The new owner's records of the copies a move placed there and of the
//! keys deleted there, so that a move never brings a deleted key back and
//! takes back only its own copy.
//!
//! A `DUMP`/`RESTORE` move (the mover's, or a migrating client's on write
//! or copy-forward) copies a key to its new owner, then deletes the old
//! copy if it is unchanged. A delete made meanwhile runs on the old owner
//! first, then on the new one, so the copy may land after it and bring the
//! key back. Comparing bytes cannot tell such a copy from a write of the
//! same value, or from a copy that is the key's only home (another move
//! found it there and deleted the old copy). So each new host keeps two
//! reserved hashes (field: the key):
//!
//! - [`DELETED`]: a migrating cluster's delete (`DEL`, `UNLINK`, a
//!   command that may empty its key such as `GETDEL` or `LPOP`, a script;
//!   in a transaction, also a watched key) marks the key
//!   (`d:` and the deleter's token) just before it deletes it there; a
//!   move's `RESTORE` of a key so marked and missing does not happen. A
//!   mark is stale if the old copy is still there afterwards (a delete
//!   removes the old copy first): the move then drops it and copies the
//!   key again. Marks stay on keys written since (harmless: a `RESTORE`
//!   never lands on a key that exists); the hash expires an hour after the
//!   last delete, so it grows by one field per key deleted during the
//!   migration until deletes stop for an hour;
//! - [`COPIES`]: a move's `RESTORE` records the copy under the move's
//!   token, in the same script. A write to a key in transit (an
//!   overwrite, a command that modifies it where it is) drops the record
//!   before the key's old copy goes ([`forget`]): a written key is no
//!   move's copy. A move that finds the key on the new owner already
//!   (another party's copy or a newer write) drops the record before
//!   deleting the old copy, and only while the old copy is still there
//!   (that copy is then the key's only home, which nobody takes back). A
//!   move settles its own copies ([`settle`]): it drops its record of a
//!   copy whose old copy it deleted, and takes back a copy whose old copy
//!   was gone only while the record is still its own and the bytes are
//!   still what it copied. The hash holds moves half-way only (and what a
//!   crashed move left).
//!
//! Neither is ever moved: [`move_keys`](crate::migrate::move_keys) skips them. A
//! user whose ACL forbids them still writes and deletes (the drop and the
//! mark are refused, and then the races above are open again); its moves
//! fail with the server's refusal.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::cmd::{cmd, Cmd};
use crate::error::{Error, Result};
use crate::resp::Value;

/// The reserved hash, one per new host, of the copies moves placed there
/// and have not settled yet.
pub const COPIES: &str = "rb:migration:copies";

/// The reserved hash, one per new host, of the keys deleted there during
/// the migration.
pub const DELETED: &str = "rb:migration:deleted";

/// How long [`DELETED`] outlives the last delete that marked a key in it.
const MARKS_KEPT_MS: u64 = 3_600_000;

/// Drops the records of settled copies given first (`ARGV[2]`: how many;
/// then each one's field and token: dropped if still that token), then
/// restores each key of `KEYS[3..]` that neither exists nor is marked
/// deleted in the hash `KEYS[2]` (`ARGV[1]`: the move's token; then each
/// key's TTL and payload) and records it in the hash `KEYS[1]`. Per key: 1
/// (restored), 0 (the key exists), its mark (marked deleted), or
/// `RESTORE`'s error.
const RESTORE_COPIES: &str = "local drops = tonumber(ARGV[2]) \
for j = 1, drops do \
  local f = ARGV[1 + 2 * j] \
  if redis.call('HGET', KEYS[1], f) == ARGV[2 + 2 * j] then redis.call('HDEL', KEYS[1], f) end \
end \
local base = 2 + 2 * drops \
local out = {} \
for i = 3, #KEYS do \
  local k = KEYS[i] \
  if redis.call('EXISTS', k) == 1 then out[i - 2] = 0 else \
    local mark = redis.call('HGET', KEYS[2], k) \
    if mark then out[i - 2] = mark else \
      local at = base + 2 * (i - 2) \
      local r = redis.pcall('RESTORE', k, ARGV[at - 1], ARGV[at]) \
      if type(r) == 'table' and r.err then out[i - 2] = r else \
        redis.call('HSET', KEYS[1], k, ARGV[1]); out[i - 2] = 1 \
      end \
    end \
  end \
end \
return out";

/// Settles the keys of `KEYS[3..]` on their new owner (`KEYS[1]`: the
/// copies, `KEYS[2]`: the marks; `ARGV[1]`: the move's token; then each
/// key's step and argument): `k` drops the key's record if it is the
/// token's; `b` also deletes the key if its record is the token's and its
/// `DUMP` is the argument (answer 1: taken back; 2: the key is gone or
/// marked deleted); `d` drops the record if it is the argument (a settled
/// copy of another batch); `f` drops the record whoever made it; `t` drops
/// the key's mark if it is the argument (a stale mark).
const SETTLE_COPIES: &str = "local out = {} \
for i = 3, #KEYS do \
  local k, step, arg = KEYS[i], ARGV[2 * i - 4], ARGV[2 * i - 3] \
  out[i - 2] = 0 \
  if step == 't' or step == 'd' then \
    local hash = KEYS[2] \
    if step == 'd' then hash = KEYS[1] end \
    if redis.call('HGET', hash, k) == arg then redis.call('HDEL', hash, k) end \
  else \
    local mine = redis.call('HGET', KEYS[1], k) == ARGV[1] \
    if mine or step == 'f' then redis.call('HDEL', KEYS[1], k) end \
    if step == 'b' then \
      if mine and redis.call('DUMP', k) == arg then redis.call('DEL', k); out[i - 2] = 1 \
      elseif redis.call('EXISTS', k) == 0 or redis.call('HEXISTS', KEYS[2], k) == 1 then out[i - 2] = 2 end \
    end \
  end \
end \
return out";

/// A token unique to one move (process, start time and a counter).
pub(crate) fn token() -> String {
    static STARTED: OnceLock<u128> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let started = STARTED.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    });
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{:x}.{started:x}.{n:x}", std::process::id())
}

/// A writer's step after it writes `key` on its new owner and before the
/// key's old copy goes: the key's record goes (a written key is no move's
/// copy to take back).
pub(crate) fn forget(key: &[u8]) -> Cmd {
    cmd("HDEL").arg(COPIES).arg(key)
}

/// A delete's steps before it deletes `keys` on their new owner: the keys
/// are marked deleted (no move's late copy lands there), and the hash kept
/// an hour from now.
pub(crate) fn mark_deleted<'a>(keys: impl IntoIterator<Item = &'a [u8]>) -> [Cmd; 2] {
    let mark = format!("d:{}", token());
    let mut hset = cmd("HSET").arg(DELETED);
    for key in keys {
        hset.push_arg(key);
        hset.push_arg(mark.as_str());
    }
    [hset, cmd("PEXPIRE").arg(DELETED).arg(MARKS_KEPT_MS)]
}

/// One key to restore on its new owner.
pub(crate) struct Restore<'a> {
    pub(crate) key: &'a [u8],
    /// Milliseconds to live (0: none).
    pub(crate) ttl: i64,
    pub(crate) payload: &'a [u8],
}

/// The script restoring `items` on one new owner, recorded under `token`,
/// after dropping the records of settled copies `drops` (key, token) there.
pub(crate) fn restore<'a>(
    token: &str,
    drops: &[(Vec<u8>, std::sync::Arc<str>)],
    items: impl IntoIterator<Item = Restore<'a>>,
) -> Cmd {
    let items: Vec<Restore<'a>> = items.into_iter().collect();
    let mut eval = cmd("EVAL")
        .arg(RESTORE_COPIES)
        .arg(items.len() + 2)
        .arg(COPIES)
        .arg(DELETED);
    for r in &items {
        eval.push_arg(r.key);
    }
    eval.push_arg(token);
    eval.push_arg(drops.len());
    for (key, token) in drops {
        eval.push_arg(key.as_slice());
        eval.push_arg(&**token);
    }
    for r in &items {
        eval.push_arg(r.ttl);
        eval.push_arg(r.payload);
    }
    eval
}

/// What [`restore`] did with a key.
#[derive(Debug)]
pub(crate) enum Restored {
    /// Copied, and recorded.
    Copied,
    /// The new owner had the key.
    Present,
    /// The key is marked deleted there (the mark).
    Deleted(Vec<u8>),
    /// `RESTORE` refused it (its error).
    Refused(Error),
}

/// [`restore`]'s answer, one per key.
///
/// # Errors
///
/// A reply that is not one answer per key.
pub(crate) fn restored(reply: Value, keys: usize) -> Result<Vec<Restored>> {
    let Value::Array(items) = reply else {
        return Err(Error::protocol("the restore script answered a non-array"));
    };
    if items.len() != keys {
        return Err(Error::protocol(
            "the restore script answered for the wrong number of keys",
        ));
    }
    items
        .into_iter()
        .map(|item| match item {
            Value::Int(1) => Ok(Restored::Copied),
            Value::Int(0) => Ok(Restored::Present),
            Value::BulkString(mark) => Ok(Restored::Deleted(mark)),
            Value::Error { code, message } => Ok(Restored::Refused(Error::Server {
                host: None,
                command: "RESTORE".into(),
                code: code.as_str().into(),
                message: message.as_str().into(),
            })),
            other => Err(Error::protocol(format!(
                "the restore script answered {} for a key",
                other.describe()
            ))),
        })
        .collect()
}

/// How [`settle`] treats one key.
pub(crate) enum Settle<'a> {
    /// This move deleted the old copy: its record goes.
    Keep,
    /// The old copy was gone or changed: the copy goes if it is still this
    /// move's and these bytes.
    TakeBack(&'a [u8]),
    /// Another party's copy or write, whose old copy this move deletes
    /// next: the record goes, whoever made it.
    Found,
    /// A mark of a delete older than the move's copy (the old copy is
    /// still there): it goes if it is still this one.
    StaleMark(&'a [u8]),
    /// A copy settled earlier (its old copy went): its record goes if it
    /// is still that move's token.
    Drop(&'a [u8]),
}

/// The script settling `items` on one new owner for the move of `token`.
pub(crate) fn settle<'a>(
    token: &str,
    items: impl IntoIterator<Item = (&'a [u8], Settle<'a>)>,
) -> Cmd {
    let items: Vec<(&[u8], Settle<'a>)> = items.into_iter().collect();
    let mut eval = cmd("EVAL")
        .arg(SETTLE_COPIES)
        .arg(items.len() + 2)
        .arg(COPIES)
        .arg(DELETED);
    for (key, _) in &items {
        eval.push_arg(*key);
    }
    eval.push_arg(token);
    for (_, step) in &items {
        let (step, payload): (&str, &[u8]) = match step {
            Settle::Keep => ("k", b""),
            Settle::TakeBack(p) => ("b", p),
            Settle::Found => ("f", b""),
            Settle::StaleMark(mark) => ("t", mark),
            Settle::Drop(token) => ("d", token),
        };
        eval.push_arg(step);
        eval.push_arg(payload);
    }
    eval
}

/// What [`settle`] did with a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Settled {
    /// Nothing to take back, or not this move's copy: it stands.
    Stands,
    /// Taken back.
    TakenBack,
    /// Gone, or marked deleted: deleted meanwhile.
    Deleted,
}

/// [`settle`]'s answer, one per key.
///
/// # Errors
///
/// A reply that is not one answer per key.
pub(crate) fn settled(reply: Value, keys: usize) -> Result<Vec<Settled>> {
    Ok(super::per_key_answers(reply, keys)?
        .into_iter()
        .map(|f| match f {
            1 => Settled::TakenBack,
            2 => Settled::Deleted,
            _ => Settled::Stands,
        })
        .collect())
}
