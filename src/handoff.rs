//! A key in transit between two owners, sans I/O: what a command does to
//! its key ([`Access`]), which commands may leave their key gone
//! ([`may_empty`]), what a migrating cluster sends to a key's new owner
//! before a write there ([`before_write`]), the new owner's reserved
//! hashes of a move's copies and of deletes ([`COPIES`], [`DELETED`]: see
//! [`copies`]), and the Lua scripts that compare, delete, restore and
//! settle keys, with the parsing of their per-key answers.
//!
//! It builds commands and reads replies, and sends nothing: it uses only
//! `cmd`, `convert`, `resp` and `error`, so it sits below
//! `client`/`cluster` in the layers. Both a migrating cluster's clients
//! (`client::migrating`, which move keys on write) and the mover
//! ([`crate::migrate`]) follow these rules; the I/O steps of moving a
//! batch of keys, which both use too, are `client::moving`'s, and
//! `migrate` drives them for a whole fleet.

use crate::cmd::Cmd;
use crate::error::{Error, Result};
use crate::resp::Value;

pub(crate) mod copies;

pub(crate) use copies::forget as forget_copy;
pub use copies::{COPIES, DELETED};

/// Deletes each key of `KEYS` whose `DUMP` is still the `ARGV` at the same
/// position; answers 1 (deleted) or 0 (changed or gone) per key.
pub(crate) const DELETE_IF_UNCHANGED: &str = "local out = {} \
for i, k in ipairs(KEYS) do \
  if redis.call('DUMP', k) == ARGV[i] then redis.call('DEL', k); out[i] = 1 else out[i] = 0 end \
end \
return out";

/// 1 for each key of `KEYS` whose `DUMP` is still the `ARGV` at the same
/// position, else 0 (changed or gone).
pub(crate) const UNCHANGED: &str = "local out = {} \
for i, k in ipairs(KEYS) do \
  if redis.call('DUMP', k) == ARGV[i] then out[i] = 1 else out[i] = 0 end \
end \
return out";

/// A per-key script's answer: whether each of `keys` keys answered 1.
pub(crate) fn per_key_flags(reply: Value, keys: usize) -> Result<Vec<bool>> {
    Ok(per_key_answers(reply, keys)?
        .into_iter()
        .map(|f| f == 1)
        .collect())
}

/// A per-key script's answer: one integer for each of `keys` keys.
///
/// # Errors
///
/// A reply that is not one integer per key.
fn per_key_answers(reply: Value, keys: usize) -> Result<Vec<i64>> {
    let answers: Vec<i64> = crate::convert::FromValue::from_value(reply)?;
    if answers.len() != keys {
        return Err(Error::protocol(
            "a script answered for the wrong number of keys",
        ));
    }
    Ok(answers)
}

/// Commands that may leave their key empty, so gone (besides `DEL` and
/// `UNLINK`): a migrating cluster marks their key deleted before they run
/// on its new owner (see [`COPIES`]).
const MAY_EMPTY: &[&str] = &[
    "EVAL",
    "EVALSHA",
    "EXPIRE",
    "EXPIREAT",
    "GETDEL",
    "GETEX",
    "HDEL",
    "LPOP",
    "LREM",
    "LTRIM",
    "PEXPIRE",
    "PEXPIREAT",
    "RPOP",
    "SPOP",
    "SREM",
    "ZPOPMAX",
    "ZPOPMIN",
    "ZREM",
    "ZREMRANGEBYLEX",
    "ZREMRANGEBYRANK",
    "ZREMRANGEBYSCORE",
];

/// What a migrating cluster sends to a key's new owner just before a
/// command that modifies it there: the drop of the key's record as a
/// move's copy, and a mark of a delete if the command may leave the key
/// gone ([`MAY_EMPTY`]; a key that expires later is not marked).
pub(crate) fn before_write(cmd: &Cmd, key: &[u8]) -> Vec<Cmd> {
    let mut steps = vec![forget_copy(key)];
    if may_empty(cmd) {
        steps.extend(copies::mark_deleted([key]));
    }
    steps
}

/// Whether `cmd` may leave its key gone ([`MAY_EMPTY`]).
pub(crate) fn may_empty(cmd: &Cmd) -> bool {
    let name = cmd.name();
    MAY_EMPTY
        .iter()
        .any(|n| name.eq_ignore_ascii_case(n.as_bytes()))
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
