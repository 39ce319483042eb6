//! The new owner's record of the copies a move placed there and of the
//! keys deleted there, so that a move never brings a deleted key back and
//! takes back only its own copy.
//!
//! A `DUMP`/`RESTORE` move (the mover's, or a migrating client's on write
//! or copy-forward) copies a key to its new owner, then deletes the old
//! copy if it is unchanged. A delete made meanwhile runs on the old owner
//! first, then on the new one, so the copy may land after it and bring the
//! key back. Comparing bytes cannot tell such a copy from a write of the
//! same value, or from a copy that is the key's only home (another move
//! found it there and deleted the old copy). So the new owner keeps one
//! reserved hash ([`COPIES`], field: the key), written in the same script
//! as a move's `RESTORE` and by a migrating cluster's writes:
//!
//! - a delete (`DEL`, `UNLINK`) marks the key deleted (`d:` and the
//!   deleter's token) just before it deletes it there; a move's `RESTORE`
//!   of a key marked so does not happen. The mark is stale if the old copy
//!   is still there afterwards (a delete removes the old copy first): the
//!   move then drops that mark and copies the key again. The hash expires
//!   an hour after the last delete, so the marks of keys never written
//!   again go;
//! - a move's `RESTORE` records the copy under the move's token;
//! - a write to a key in transit (an overwrite, or a command that modifies
//!   it where it is) drops the key's field first ([`forget`]): a written
//!   key is no move's copy, and no longer deleted;
//! - a move that finds the key on the new owner already (another party's
//!   copy or a newer write) drops the field before deleting the old copy,
//!   and only while the old copy is still there (that copy is then the
//!   key's only home, which nobody takes back);
//! - a move settles its own copies ([`settle`]): it drops the record of a
//!   copy whose old copy it deleted, and takes back a copy whose old copy
//!   was gone only while the record is still its own and the bytes are
//!   still what it copied.
//!
//! It is never moved: [`move_keys`](super::move_keys) skips it. A user
//! whose ACL forbids it still writes and deletes (the drop and the mark
//! are refused, and then the races above are open again); its moves fail
//! with the server's refusal.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::cmd::{cmd, Cmd};
use crate::convert::FromValue;
use crate::error::{Error, Result};
use crate::resp::Value;

/// The reserved hash, one per new host, of the copies moves placed there
/// and have not settled yet, and of the keys deleted there during the
/// migration.
pub const COPIES: &str = "rb:migration:copies";

/// How long the hash outlives the last delete that marked a key in it.
const MARKS_KEPT_MS: u64 = 3_600_000;

/// Restores each key of `KEYS[2..]` that neither exists nor is marked
/// deleted (`ARGV[1]`: the move's token; then each key's TTL and payload)
/// and records it in the hash `KEYS[1]`. Per key: 1 (restored), 0 (the key
/// exists), its mark (marked deleted), or `RESTORE`'s error.
const RESTORE_COPIES: &str = "local out = {} \
for i = 2, #KEYS do \
  local k = KEYS[i] \
  local held = redis.call('HGET', KEYS[1], k) \
  if redis.call('EXISTS', k) == 1 then out[i - 1] = 0 \
  elseif held and string.sub(held, 1, 2) == 'd:' then out[i - 1] = held else \
    local r = redis.pcall('RESTORE', k, ARGV[2 * i - 2], ARGV[2 * i - 1]) \
    if type(r) == 'table' and r.err then out[i - 1] = r else \
      redis.call('HSET', KEYS[1], k, ARGV[1]); out[i - 1] = 1 \
    end \
  end \
end \
return out";

/// Settles the keys of `KEYS[2..]` on their new owner (`ARGV[1]`: the
/// move's token; then each key's step and argument): `k` drops the field
/// if it is the token; `b` also deletes the key if its field is the token
/// and its `DUMP` is the argument (1: taken back); `f` drops the field
/// whatever it holds; `t` drops it if it is the argument (a stale mark).
const SETTLE_COPIES: &str = "local out = {} \
for i = 2, #KEYS do \
  local k, step, arg = KEYS[i], ARGV[2 * i - 2], ARGV[2 * i - 1] \
  local held = redis.call('HGET', KEYS[1], k) \
  local mine = held == ARGV[1] \
  out[i - 1] = 0 \
  if step == 'f' or (step == 't' and held == arg) or (step ~= 't' and mine) then \
    redis.call('HDEL', KEYS[1], k) \
  end \
  if step == 'b' and mine and redis.call('DUMP', k) == arg then \
    redis.call('DEL', k); out[i - 1] = 1 \
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

/// A writer's step before it writes `key` on its new owner: the key's
/// field goes (a written key is no longer a move's copy to take back, nor
/// deleted).
pub(crate) fn forget(key: &[u8]) -> Cmd {
    cmd("HDEL").arg(COPIES).arg(key)
}

/// A delete's steps before it deletes `key` on its new owner: the key is
/// marked deleted (no move's late copy lands there), and the hash kept an
/// hour from now.
pub(crate) fn mark_deleted(key: &[u8]) -> [Cmd; 2] {
    [
        cmd("HSET")
            .arg(COPIES)
            .arg(key)
            .arg(format!("d:{}", token())),
        cmd("PEXPIRE").arg(COPIES).arg(MARKS_KEPT_MS),
    ]
}

/// One key to restore on its new owner.
pub(crate) struct Restore<'a> {
    pub(crate) key: &'a [u8],
    /// Milliseconds to live (0: none).
    pub(crate) ttl: i64,
    pub(crate) payload: &'a [u8],
}

/// The script restoring `items` on one new owner, recorded under `token`.
pub(crate) fn restore<'a>(token: &str, items: impl IntoIterator<Item = Restore<'a>>) -> Cmd {
    let items: Vec<Restore<'a>> = items.into_iter().collect();
    let mut eval = cmd("EVAL")
        .arg(RESTORE_COPIES)
        .arg(items.len() + 1)
        .arg(COPIES);
    for r in &items {
        eval.push_arg(r.key);
    }
    eval.push_arg(token);
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
}

/// The script settling `items` on one new owner for the move of `token`.
pub(crate) fn settle<'a>(
    token: &str,
    items: impl IntoIterator<Item = (&'a [u8], Settle<'a>)>,
) -> Cmd {
    let items: Vec<(&[u8], Settle<'a>)> = items.into_iter().collect();
    let mut eval = cmd("EVAL")
        .arg(SETTLE_COPIES)
        .arg(items.len() + 1)
        .arg(COPIES);
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
        };
        eval.push_arg(step);
        eval.push_arg(payload);
    }
    eval
}

/// [`settle`]'s answer: whether each key was taken back.
///
/// # Errors
///
/// A reply that is not one answer per key.
pub(crate) fn taken_back(reply: Value, keys: usize) -> Result<Vec<bool>> {
    let flags: Vec<i64> = FromValue::from_value(reply)?;
    if flags.len() != keys {
        return Err(Error::protocol(
            "the settle script answered for the wrong number of keys",
        ));
    }
    Ok(flags.into_iter().map(|f| f == 1).collect())
}
