//! [`Commands`]: the everyday commands as typed helpers, written once for
//! every client through [`Execute`].
//!
//! Each helper builds a [`Cmd`] and returns the client's kind of answer for
//! a fixed, natural type (as redis-py does): `get` gives
//! `Option<Vec<u8>>`, `incr` gives `i64`, `hgetall` gives
//! `HashMap<Vec<u8>, Vec<u8>>`. Anything else goes through
//! [`Commands::cmd`], which converts to any [`FromValue`] type.

use std::collections::{HashMap, HashSet};

use crate::args::ToArg;
use crate::client::Execute;
use crate::cmd::{cmd, Cmd, Script};
use crate::convert::FromValue;
use crate::error::Result;
use crate::resp::Value;
use crate::scan::ScanOptions;

/// A value's bytes, or nil.
pub type Bytes = Vec<u8>;

/// `INFO`, parsed: section headers and blank lines dropped, `key:value`
/// lines kept.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InfoDict(pub HashMap<String, String>);

impl InfoDict {
    /// One field, e.g. `redis_version`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// One field parsed as a number or anything else `FromStr`.
    pub fn parse<T: std::str::FromStr>(&self, key: &str) -> Option<T> {
        self.get(key)?.parse().ok()
    }
}

impl FromValue for InfoDict {
    fn from_value(value: Value) -> Result<Self> {
        let text = String::from_value(value)?;
        let fields = text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Ok(InfoDict(fields))
    }
}

/// When a `SET` expires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// `EX seconds`
    Seconds(u64),
    /// `PX milliseconds`
    Millis(u64),
    /// `EXAT unix-seconds`
    AtSeconds(u64),
    /// `PXAT unix-milliseconds`
    AtMillis(u64),
    /// `KEEPTTL`
    KeepTtl,
}

/// Only set if the key does (not) exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Condition {
    /// `NX`: only if it does not exist.
    IfMissing,
    /// `XX`: only if it exists.
    IfExists,
}

/// Options of [`Commands::set_with`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SetOptions {
    /// Expiry, default none.
    pub expiry: Option<Expiry>,
    /// Condition, default none.
    pub condition: Option<Condition>,
}

impl SetOptions {
    /// No expiry, no condition.
    #[must_use]
    pub fn new() -> SetOptions {
        SetOptions::default()
    }

    /// Sets the expiry.
    #[must_use]
    pub fn expiry(mut self, expiry: Expiry) -> SetOptions {
        self.expiry = Some(expiry);
        self
    }

    /// Sets the condition.
    #[must_use]
    pub fn condition(mut self, condition: Condition) -> SetOptions {
        self.condition = Some(condition);
        self
    }
}

fn with_pairs<A: ToArg, B: ToArg>(mut c: Cmd, pairs: &[(A, B)]) -> Cmd {
    for (a, b) in pairs {
        c.push_arg(a);
        c.push_arg(b);
    }
    c
}

/// Typed helpers for the everyday commands, on every client.
///
/// The output type follows the client: `Result<T>` on the routing and
/// local clients, `Promise<T>` in a map, `Promise<HashMap<HostId, T>>` in a
/// fanout.
pub trait Commands: Execute + Sized {
    /// Any command, its reply converted to `T`.
    fn cmd<T: FromValue + 'static>(&self, command: Cmd) -> Self::Output<T> {
        self.execute(command)
    }

    /// Runs a Lua script with keys and arguments (`EVALSHA`, after a
    /// `SCRIPT LOAD` where the host may lack it). Routed by its first key.
    fn eval_script<K: ToArg, A: ToArg>(
        &self,
        script: &Script,
        keys: &[K],
        args: &[A],
    ) -> Self::Output<Value> {
        self.execute_script(script.call(keys, args))
    }

    // Scans: one page each (the immediate clients also iterate:
    // `sscan_iter`, ...; the cluster walks every host: `Cluster::scan`).

    /// `SCAN cursor [MATCH ..] [COUNT ..] [TYPE ..]`: one page of one
    /// host's keys and the next cursor (0: done). No key to route by: on a
    /// local or fanout client.
    fn scan(&self, cursor: u64, opts: &ScanOptions) -> Self::Output<(u64, Vec<Bytes>)> {
        self.execute(opts.scan_command(cursor))
    }
    /// `SSCAN key cursor [MATCH ..] [COUNT ..]`: one page of a set's members.
    fn sscan<K: ToArg>(
        &self,
        key: K,
        cursor: u64,
        opts: &ScanOptions,
    ) -> Self::Output<(u64, Vec<Bytes>)> {
        self.execute(opts.key_scan_command("SSCAN", &crate::args::to_bytes(&key), cursor))
    }
    /// `HSCAN key cursor [MATCH ..] [COUNT ..]`: one page of a hash's fields and values.
    fn hscan<K: ToArg>(
        &self,
        key: K,
        cursor: u64,
        opts: &ScanOptions,
    ) -> Self::Output<(u64, Vec<(Bytes, Bytes)>)> {
        self.execute(opts.key_scan_command("HSCAN", &crate::args::to_bytes(&key), cursor))
    }
    /// `ZSCAN key cursor [MATCH ..] [COUNT ..]`: one page of a sorted set's members and scores.
    fn zscan<K: ToArg>(
        &self,
        key: K,
        cursor: u64,
        opts: &ScanOptions,
    ) -> Self::Output<(u64, Vec<(Bytes, f64)>)> {
        self.execute(opts.key_scan_command("ZSCAN", &crate::args::to_bytes(&key), cursor))
    }

    // Strings and counters.

    /// `GET key`
    fn get<K: ToArg>(&self, key: K) -> Self::Output<Option<Bytes>> {
        self.execute(Cmd::get_command().arg(key))
    }
    /// `SET key value`
    fn set<K: ToArg, V: ToArg>(&self, key: K, value: V) -> Self::Output<()> {
        self.execute(Cmd::set_command().arg(key).arg(value))
    }
    /// `SET key value [EX|PX|EXAT|PXAT|KEEPTTL] [NX|XX]`: true if it was set.
    fn set_with<K: ToArg, V: ToArg>(
        &self,
        key: K,
        value: V,
        options: SetOptions,
    ) -> Self::Output<bool> {
        let mut c = cmd("SET").arg(key).arg(value);
        match options.expiry {
            Some(Expiry::Seconds(n)) => c = c.arg("EX").arg(n),
            Some(Expiry::Millis(n)) => c = c.arg("PX").arg(n),
            Some(Expiry::AtSeconds(n)) => c = c.arg("EXAT").arg(n),
            Some(Expiry::AtMillis(n)) => c = c.arg("PXAT").arg(n),
            Some(Expiry::KeepTtl) => c = c.arg("KEEPTTL"),
            None => {}
        }
        match options.condition {
            Some(Condition::IfMissing) => c = c.arg("NX"),
            Some(Condition::IfExists) => c = c.arg("XX"),
            None => {}
        }
        self.execute(c)
    }
    /// `SETEX key seconds value`
    fn setex<K: ToArg, V: ToArg>(&self, key: K, seconds: u64, value: V) -> Self::Output<()> {
        self.execute(cmd("SETEX").arg(key).arg(seconds).arg(value))
    }
    /// `SETNX key value`: true if it was set.
    fn setnx<K: ToArg, V: ToArg>(&self, key: K, value: V) -> Self::Output<bool> {
        self.execute(cmd("SETNX").arg(key).arg(value))
    }
    /// `GETSET key value`: the old value.
    fn getset<K: ToArg, V: ToArg>(&self, key: K, value: V) -> Self::Output<Option<Bytes>> {
        self.execute(cmd("GETSET").arg(key).arg(value))
    }
    /// `GETDEL key`
    fn getdel<K: ToArg>(&self, key: K) -> Self::Output<Option<Bytes>> {
        self.execute(cmd("GETDEL").arg(key))
    }
    /// `MGET key...` (split across hosts; values in the given key order).
    fn mget<K: ToArg>(&self, keys: &[K]) -> Self::Output<Vec<Option<Bytes>>> {
        self.execute(cmd("MGET").args_from(keys))
    }
    /// `MSET key value...` (split across hosts).
    fn mset<K: ToArg, V: ToArg>(&self, pairs: &[(K, V)]) -> Self::Output<()> {
        self.execute(with_pairs(cmd("MSET"), pairs))
    }
    /// `INCR key`
    fn incr<K: ToArg>(&self, key: K) -> Self::Output<i64> {
        self.execute(cmd("INCR").arg(key))
    }
    /// `INCRBY key n`
    fn incr_by<K: ToArg>(&self, key: K, n: i64) -> Self::Output<i64> {
        self.execute(cmd("INCRBY").arg(key).arg(n))
    }
    /// `INCRBYFLOAT key n`
    fn incr_by_float<K: ToArg>(&self, key: K, n: f64) -> Self::Output<f64> {
        self.execute(cmd("INCRBYFLOAT").arg(key).arg(n))
    }
    /// `DECR key`
    fn decr<K: ToArg>(&self, key: K) -> Self::Output<i64> {
        self.execute(cmd("DECR").arg(key))
    }
    /// `DECRBY key n`
    fn decr_by<K: ToArg>(&self, key: K, n: i64) -> Self::Output<i64> {
        self.execute(cmd("DECRBY").arg(key).arg(n))
    }
    /// `APPEND key value`: the new length.
    fn append<K: ToArg, V: ToArg>(&self, key: K, value: V) -> Self::Output<i64> {
        self.execute(cmd("APPEND").arg(key).arg(value))
    }
    /// `STRLEN key`
    fn strlen<K: ToArg>(&self, key: K) -> Self::Output<i64> {
        self.execute(cmd("STRLEN").arg(key))
    }

    // Keys and expiry.

    /// `DEL key...`: how many existed (summed across hosts).
    fn del<K: ToArg>(&self, keys: &[K]) -> Self::Output<i64> {
        self.execute(cmd("DEL").args_from(keys))
    }
    /// `UNLINK key...`: how many existed (summed across hosts).
    fn unlink<K: ToArg>(&self, keys: &[K]) -> Self::Output<i64> {
        self.execute(cmd("UNLINK").args_from(keys))
    }
    /// `EXISTS key...`: how many exist (summed across hosts).
    fn exists<K: ToArg>(&self, keys: &[K]) -> Self::Output<i64> {
        self.execute(cmd("EXISTS").args_from(keys))
    }
    /// `TOUCH key...`: how many exist (summed across hosts).
    fn touch<K: ToArg>(&self, keys: &[K]) -> Self::Output<i64> {
        self.execute(cmd("TOUCH").args_from(keys))
    }
    /// `EXPIRE key seconds`: true if the key exists.
    fn expire<K: ToArg>(&self, key: K, seconds: i64) -> Self::Output<bool> {
        self.execute(cmd("EXPIRE").arg(key).arg(seconds))
    }
    /// `PEXPIRE key milliseconds`
    fn pexpire<K: ToArg>(&self, key: K, millis: i64) -> Self::Output<bool> {
        self.execute(cmd("PEXPIRE").arg(key).arg(millis))
    }
    /// `EXPIREAT key unix-seconds`
    fn expire_at<K: ToArg>(&self, key: K, unix_seconds: i64) -> Self::Output<bool> {
        self.execute(cmd("EXPIREAT").arg(key).arg(unix_seconds))
    }
    /// `TTL key`: seconds, -1 without expiry, -2 when missing.
    fn ttl<K: ToArg>(&self, key: K) -> Self::Output<i64> {
        self.execute(cmd("TTL").arg(key))
    }
    /// `PTTL key`: milliseconds, -1 without expiry, -2 when missing.
    fn pttl<K: ToArg>(&self, key: K) -> Self::Output<i64> {
        self.execute(cmd("PTTL").arg(key))
    }
    /// `PERSIST key`: true if an expiry was removed.
    fn persist<K: ToArg>(&self, key: K) -> Self::Output<bool> {
        self.execute(cmd("PERSIST").arg(key))
    }
    /// `TYPE key`: `string`, `list`, ..., `none`.
    fn key_type<K: ToArg>(&self, key: K) -> Self::Output<String> {
        self.execute(cmd("TYPE").arg(key))
    }

    // Hashes.

    /// `HGET key field`
    fn hget<K: ToArg, F: ToArg>(&self, key: K, field: F) -> Self::Output<Option<Bytes>> {
        self.execute(cmd("HGET").arg(key).arg(field))
    }
    /// `HSET key field value`: fields added.
    fn hset<K: ToArg, F: ToArg, V: ToArg>(&self, key: K, field: F, value: V) -> Self::Output<i64> {
        self.execute(cmd("HSET").arg(key).arg(field).arg(value))
    }
    /// `HSET key field value...`: fields added.
    fn hset_multiple<K: ToArg, F: ToArg, V: ToArg>(
        &self,
        key: K,
        pairs: &[(F, V)],
    ) -> Self::Output<i64> {
        self.execute(with_pairs(cmd("HSET").arg(key), pairs))
    }
    /// `HMGET key field...`
    fn hmget<K: ToArg, F: ToArg>(&self, key: K, fields: &[F]) -> Self::Output<Vec<Option<Bytes>>> {
        self.execute(cmd("HMGET").arg(key).args_from(fields))
    }
    /// `HGETALL key`
    fn hgetall<K: ToArg>(&self, key: K) -> Self::Output<HashMap<Bytes, Bytes>> {
        self.execute(cmd("HGETALL").arg(key))
    }
    /// `HDEL key field...`: fields removed.
    fn hdel<K: ToArg, F: ToArg>(&self, key: K, fields: &[F]) -> Self::Output<i64> {
        self.execute(cmd("HDEL").arg(key).args_from(fields))
    }
    /// `HINCRBY key field n`
    fn hincr_by<K: ToArg, F: ToArg>(&self, key: K, field: F, n: i64) -> Self::Output<i64> {
        self.execute(cmd("HINCRBY").arg(key).arg(field).arg(n))
    }
    /// `HEXISTS key field`
    fn hexists<K: ToArg, F: ToArg>(&self, key: K, field: F) -> Self::Output<bool> {
        self.execute(cmd("HEXISTS").arg(key).arg(field))
    }
    /// `HLEN key`
    fn hlen<K: ToArg>(&self, key: K) -> Self::Output<i64> {
        self.execute(cmd("HLEN").arg(key))
    }
    /// `HKEYS key`
    fn hkeys<K: ToArg>(&self, key: K) -> Self::Output<Vec<Bytes>> {
        self.execute(cmd("HKEYS").arg(key))
    }
    /// `HVALS key`
    fn hvals<K: ToArg>(&self, key: K) -> Self::Output<Vec<Bytes>> {
        self.execute(cmd("HVALS").arg(key))
    }

    // Lists.

    /// `LPUSH key value...`: the new length.
    fn lpush<K: ToArg, V: ToArg>(&self, key: K, values: &[V]) -> Self::Output<i64> {
        self.execute(cmd("LPUSH").arg(key).args_from(values))
    }
    /// `RPUSH key value...`: the new length.
    fn rpush<K: ToArg, V: ToArg>(&self, key: K, values: &[V]) -> Self::Output<i64> {
        self.execute(cmd("RPUSH").arg(key).args_from(values))
    }
    /// `LPOP key`
    fn lpop<K: ToArg>(&self, key: K) -> Self::Output<Option<Bytes>> {
        self.execute(cmd("LPOP").arg(key))
    }
    /// `RPOP key`
    fn rpop<K: ToArg>(&self, key: K) -> Self::Output<Option<Bytes>> {
        self.execute(cmd("RPOP").arg(key))
    }
    /// `LRANGE key start stop`
    fn lrange<K: ToArg>(&self, key: K, start: i64, stop: i64) -> Self::Output<Vec<Bytes>> {
        self.execute(cmd("LRANGE").arg(key).arg(start).arg(stop))
    }
    /// `LLEN key`
    fn llen<K: ToArg>(&self, key: K) -> Self::Output<i64> {
        self.execute(cmd("LLEN").arg(key))
    }
    /// `LTRIM key start stop`
    fn ltrim<K: ToArg>(&self, key: K, start: i64, stop: i64) -> Self::Output<()> {
        self.execute(cmd("LTRIM").arg(key).arg(start).arg(stop))
    }
    /// `LINDEX key index`
    fn lindex<K: ToArg>(&self, key: K, index: i64) -> Self::Output<Option<Bytes>> {
        self.execute(cmd("LINDEX").arg(key).arg(index))
    }

    // Sets.

    /// `SADD key member...`: members added.
    fn sadd<K: ToArg, M: ToArg>(&self, key: K, members: &[M]) -> Self::Output<i64> {
        self.execute(cmd("SADD").arg(key).args_from(members))
    }
    /// `SREM key member...`: members removed.
    fn srem<K: ToArg, M: ToArg>(&self, key: K, members: &[M]) -> Self::Output<i64> {
        self.execute(cmd("SREM").arg(key).args_from(members))
    }
    /// `SMEMBERS key`
    fn smembers<K: ToArg>(&self, key: K) -> Self::Output<HashSet<Bytes>> {
        self.execute(cmd("SMEMBERS").arg(key))
    }
    /// `SISMEMBER key member`
    fn sismember<K: ToArg, M: ToArg>(&self, key: K, member: M) -> Self::Output<bool> {
        self.execute(cmd("SISMEMBER").arg(key).arg(member))
    }
    /// `SCARD key`
    fn scard<K: ToArg>(&self, key: K) -> Self::Output<i64> {
        self.execute(cmd("SCARD").arg(key))
    }

    // Sorted sets.

    /// `ZADD key score member...`: members added.
    fn zadd<K: ToArg, M: ToArg>(&self, key: K, members: &[(f64, M)]) -> Self::Output<i64> {
        self.execute(with_pairs(cmd("ZADD").arg(key), members))
    }
    /// `ZINCRBY key increment member`: the new score.
    fn zincr_by<K: ToArg, M: ToArg>(&self, key: K, increment: f64, member: M) -> Self::Output<f64> {
        self.execute(cmd("ZINCRBY").arg(key).arg(increment).arg(member))
    }
    /// `ZRANGE key start stop`
    fn zrange<K: ToArg>(&self, key: K, start: i64, stop: i64) -> Self::Output<Vec<Bytes>> {
        self.execute(cmd("ZRANGE").arg(key).arg(start).arg(stop))
    }
    /// `ZRANGE key start stop WITHSCORES`
    fn zrange_withscores<K: ToArg>(
        &self,
        key: K,
        start: i64,
        stop: i64,
    ) -> Self::Output<Vec<(Bytes, f64)>> {
        self.execute(
            cmd("ZRANGE")
                .arg(key)
                .arg(start)
                .arg(stop)
                .arg("WITHSCORES"),
        )
    }
    /// `ZREVRANGE key start stop`
    fn zrevrange<K: ToArg>(&self, key: K, start: i64, stop: i64) -> Self::Output<Vec<Bytes>> {
        self.execute(cmd("ZREVRANGE").arg(key).arg(start).arg(stop))
    }
    /// `ZREVRANGE key start stop WITHSCORES`
    fn zrevrange_withscores<K: ToArg>(
        &self,
        key: K,
        start: i64,
        stop: i64,
    ) -> Self::Output<Vec<(Bytes, f64)>> {
        self.execute(
            cmd("ZREVRANGE")
                .arg(key)
                .arg(start)
                .arg(stop)
                .arg("WITHSCORES"),
        )
    }
    /// `ZRANGEBYSCORE key min max` (`min`/`max` may be `"-inf"`, `"(1.5"`, ...).
    fn zrangebyscore<K: ToArg, A: ToArg, B: ToArg>(
        &self,
        key: K,
        min: A,
        max: B,
    ) -> Self::Output<Vec<Bytes>> {
        self.execute(cmd("ZRANGEBYSCORE").arg(key).arg(min).arg(max))
    }
    /// `ZREM key member...`: members removed.
    fn zrem<K: ToArg, M: ToArg>(&self, key: K, members: &[M]) -> Self::Output<i64> {
        self.execute(cmd("ZREM").arg(key).args_from(members))
    }
    /// `ZSCORE key member`
    fn zscore<K: ToArg, M: ToArg>(&self, key: K, member: M) -> Self::Output<Option<f64>> {
        self.execute(cmd("ZSCORE").arg(key).arg(member))
    }
    /// `ZCARD key`
    fn zcard<K: ToArg>(&self, key: K) -> Self::Output<i64> {
        self.execute(cmd("ZCARD").arg(key))
    }
    /// `ZCOUNT key min max`
    fn zcount<K: ToArg, A: ToArg, B: ToArg>(&self, key: K, min: A, max: B) -> Self::Output<i64> {
        self.execute(cmd("ZCOUNT").arg(key).arg(min).arg(max))
    }
    /// `ZRANK key member`
    fn zrank<K: ToArg, M: ToArg>(&self, key: K, member: M) -> Self::Output<Option<i64>> {
        self.execute(cmd("ZRANK").arg(key).arg(member))
    }

    // Server (keyless: use a fanout or a local client).

    /// `PING`
    fn ping(&self) -> Self::Output<String> {
        self.execute(cmd("PING"))
    }
    /// `FLUSHDB`
    fn flushdb(&self) -> Self::Output<()> {
        self.execute(cmd("FLUSHDB"))
    }
    /// `INFO [section]`, parsed.
    fn info(&self, section: Option<&str>) -> Self::Output<InfoDict> {
        let mut c = cmd("INFO");
        if let Some(s) = section {
            c.push_arg(s);
        }
        self.execute(c)
    }
    /// `DBSIZE`
    fn dbsize(&self) -> Self::Output<i64> {
        self.execute(cmd("DBSIZE"))
    }
    /// `TIME`: (unix seconds, microseconds).
    fn time(&self) -> Self::Output<(i64, i64)> {
        self.execute(cmd("TIME"))
    }
    /// `CONFIG GET pattern`
    fn config_get<P: ToArg>(&self, pattern: P) -> Self::Output<HashMap<String, String>> {
        self.execute(cmd("CONFIG").arg("GET").arg(pattern))
    }
    /// `CONFIG SET parameter value`
    fn config_set<P: ToArg, V: ToArg>(&self, parameter: P, value: V) -> Self::Output<()> {
        self.execute(cmd("CONFIG").arg("SET").arg(parameter).arg(value))
    }
}

impl<E: Execute + Sized> Commands for E {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_parses() {
        let v = Value::Verbatim {
            format: "txt".into(),
            text: b"# Server\r\nredis_version:7.0.15\r\n\r\nuptime_in_seconds:12\r\n".to_vec(),
        };
        let info = InfoDict::from_value(v).unwrap();
        assert_eq!(info.get("redis_version"), Some("7.0.15"));
        assert_eq!(info.parse::<u64>("uptime_in_seconds"), Some(12));
        assert_eq!(info.get("# Server"), None);
    }
}
