//! Auto-batching and reply demultiplexing, in memory (no I/O).
//!
//! - [`Batcher`] merges a run of plain `GET key` (or `SET key value`) to one
//!   host into one `MGET` (`MSET`), bounded by a maximum batch size, and
//!   records one [`Expect`] whose reply is split back to each waiter.
//! - [`split`] cuts the multi-key commands rb emulates across nodes (`MGET`,
//!   `MSET`, `DEL`, `UNLINK`, `EXISTS`, `TOUCH`) into one command per host,
//!   and [`Split::combine`] puts the per-host replies back together in the
//!   caller's key order (values) or summed (counts).

use std::fmt;

use crate::cmd::{cmd, Cmd, Common};
use crate::error::{Error, HostId, HostName, Result};
use crate::promise::ReplyContext;
pub(crate) use crate::promise::Waiter;
use crate::resp::{itoa, Value};
use crate::router::Router;
use std::cell::RefCell;

/// A command name kept inline for error messages (no allocation per command).
#[derive(Clone, Copy)]
pub(crate) struct CmdName {
    bytes: [u8; 23],
    len: u8,
}

impl CmdName {
    pub(crate) fn of(name: &[u8]) -> CmdName {
        let mut bytes = [0u8; 23];
        let len = name.len().min(bytes.len());
        for (dst, src) in bytes.iter_mut().zip(&name[..len]) {
            *dst = src.to_ascii_uppercase();
        }
        CmdName {
            bytes,
            len: len as u8,
        }
    }

    pub(crate) fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or("?")
    }
}

impl fmt::Display for CmdName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One element of a split `MGET` reply.
pub(crate) enum Element<'a> {
    /// Decoded whole (anything but a plain bulk string or nil).
    Value(Value),
    /// A plain bulk string (`None`: nil), as the bytes in the read buffer.
    Bulk(Option<&'a [u8]>),
}

/// What the next reply from a host answers.
pub(crate) enum Expect {
    /// One command, one waiter.
    One { name: CmdName, waiter: Waiter },
    /// A merged `MGET`/`MSET`: one waiter per original command.
    Batch {
        kind: BatchKind,
        waiters: Vec<Waiter>,
        /// Waiters already answered by elements of a reply that arrives
        /// element by element (see [`Expect::split_len`]).
        delivered: usize,
    },
}

impl Expect {
    /// For a merged `MGET` not yet answered: its number of keys, so the
    /// reader can hand over the reply's elements one by one.
    pub(crate) fn split_len(&self) -> Option<usize> {
        match self {
            Expect::Batch {
                kind: BatchKind::Get,
                waiters,
                delivered: 0,
            } => Some(waiters.len()),
            _ => None,
        }
    }

    /// Hands the next element of a split `MGET` reply to its waiter.
    #[inline]
    pub(crate) fn deliver_element(
        &mut self,
        element: Element<'_>,
        host: &HostName,
        failures: &RefCell<Option<Error>>,
    ) {
        if let Expect::Batch {
            kind,
            waiters,
            delivered,
        } = self
        {
            if let Some(waiter) = waiters.get(*delivered) {
                let ctx = ReplyContext {
                    host: Some(host),
                    command: kind.single_name(),
                    failures,
                };
                match element {
                    Element::Value(value) => waiter.accept(Ok(value), &ctx),
                    Element::Bulk(bytes) => waiter.accept_bulk(bytes, &ctx),
                }
                *delivered += 1;
            }
        }
    }

    /// The waiter list of an answered batch, for reuse.
    pub(crate) fn into_waiters(self) -> Option<Vec<Waiter>> {
        match self {
            Expect::Batch { waiters, .. } => Some(waiters),
            Expect::One { .. } => None,
        }
    }

    /// Hands a reply to its waiter(s). An error reply becomes
    /// [`Error::Server`] naming the host and the command.
    ///
    /// Returns an error when the reply cannot be the answer (a merged MGET
    /// answered with the wrong shape): the stream is out of step, and the
    /// connection must be closed.
    pub(crate) fn deliver(
        self,
        reply: Value,
        host: &HostName,
        failures: &RefCell<Option<Error>>,
    ) -> Option<Error> {
        match self {
            Expect::One { name, waiter } => {
                let ctx = ReplyContext {
                    host: Some(host),
                    command: name.as_str(),
                    failures,
                };
                waiter.accept(
                    match reply {
                        Value::Error { code, message } => Err(Error::Server {
                            host: Some(host.clone()),
                            command: name.as_str().into(),
                            code: code.into(),
                            message: message.into(),
                        }),
                        v => Ok(v),
                    },
                    &ctx,
                );
                None
            }
            Expect::Batch {
                kind,
                waiters,
                delivered,
            } => {
                let ctx = ReplyContext {
                    host: Some(host),
                    command: kind.single_name(),
                    failures,
                };
                // Whole replies come only for batches not split (nothing
                // delivered yet); skip any answered waiters all the same.
                let waiters = waiters.into_iter().skip(delivered);
                match (kind, reply.strip_attributes()) {
                    (BatchKind::Get, Value::Array(items)) if items.len() == waiters.len() => {
                        for (waiter, item) in waiters.zip(items) {
                            waiter.accept(Ok(item), &ctx);
                        }
                    }
                    (_, Value::Error { code, message }) => {
                        let e = Error::Server {
                            host: Some(host.clone()),
                            command: kind.merged_name().into(),
                            code: code.into(),
                            message: message.into(),
                        };
                        for waiter in waiters {
                            waiter.accept(Err(e.clone()), &ctx);
                        }
                    }
                    (BatchKind::Set, ok) => {
                        for waiter in waiters {
                            waiter.accept_shared(&ok, &ctx);
                        }
                    }
                    (BatchKind::Get, other) => {
                        let e = Error::Protocol {
                            host: Some(host.clone()),
                            reason: format!(
                                "MGET of {} keys answered with {}",
                                waiters.len(),
                                other.describe()
                            )
                            .into(),
                        };
                        for waiter in waiters {
                            waiter.accept(Err(e.clone()), &ctx);
                        }
                        return Some(e);
                    }
                }
                None
            }
        }
    }

    /// Rejects the waiter(s) with `error`, naming the command.
    pub(crate) fn fail(
        self,
        error: &Error,
        host: Option<&HostName>,
        failures: &RefCell<Option<Error>>,
    ) {
        match self {
            Expect::One { name, waiter } => {
                let ctx = ReplyContext {
                    host,
                    command: name.as_str(),
                    failures,
                };
                waiter.accept(Err(error.clone()), &ctx)
            }
            Expect::Batch {
                kind,
                waiters,
                delivered,
            } => {
                let ctx = ReplyContext {
                    host,
                    command: kind.single_name(),
                    failures,
                };
                for waiter in waiters.into_iter().skip(delivered) {
                    waiter.accept(Err(error.clone()), &ctx);
                }
            }
        }
    }
}

/// What a command does to the connection it is sent on, beyond its reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ConnEffect {
    /// Nothing: the connection can go back to the pool.
    None,
    /// It changes the connection's state (database, transaction, reply
    /// mode, protocol, user): the connection is closed after the session,
    /// never pooled, so the next user gets a clean one.
    Dirty,
    /// It turns the connection into a push stream (pub/sub, `MONITOR`):
    /// replies would no longer match requests, so it is refused.
    Refused,
}

impl ConnEffect {
    pub(crate) fn of(cmd: &Cmd) -> ConnEffect {
        if cmd.common() != Common::Other {
            return ConnEffect::None;
        }
        let name = cmd.name();
        let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
        // This runs for every command: the first letter rules most out.
        let first = name.first().map_or(0, u8::to_ascii_uppercase);
        let refused = match first {
            b'S' => is(b"SUBSCRIBE") || is(b"SSUBSCRIBE"),
            b'P' => is(b"PSUBSCRIBE"),
            b'M' => is(b"MONITOR"),
            _ => false,
        };
        if refused {
            return ConnEffect::Refused;
        }
        let dirty = match first {
            b'A' => is(b"AUTH"),
            b'C' => {
                is(b"CLIENT")
                    && cmd.arg_at(0).is_some_and(|sub| {
                        [
                            &b"REPLY"[..],
                            b"TRACKING",
                            b"CACHING",
                            b"SETNAME",
                            b"NO-EVICT",
                            b"NO-TOUCH",
                        ]
                        .iter()
                        .any(|s| sub.eq_ignore_ascii_case(s))
                    })
            }
            b'H' => is(b"HELLO"),
            b'M' => is(b"MULTI"),
            b'P' => is(b"PUNSUBSCRIBE"),
            b'R' => is(b"RESET") || is(b"READONLY") || is(b"READWRITE"),
            b'S' => is(b"SELECT") || is(b"SUNSUBSCRIBE"),
            b'U' => is(b"UNSUBSCRIBE"),
            b'W' => is(b"WATCH"),
            _ => false,
        };
        if dirty {
            ConnEffect::Dirty
        } else {
            ConnEffect::None
        }
    }
}

/// Which commands merge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BatchKind {
    /// `GET key` runs become `MGET`.
    Get,
    /// `SET key value` runs become `MSET`.
    Set,
}

impl BatchKind {
    fn single_name(self) -> &'static str {
        match self {
            BatchKind::Get => "GET",
            BatchKind::Set => "SET",
        }
    }

    fn merged_name(self) -> &'static str {
        match self {
            BatchKind::Get => "MGET",
            BatchKind::Set => "MSET",
        }
    }

    /// The batchable kind of `cmd`: only the plain forms merge (a `SET`
    /// with options has its own semantics).
    pub(crate) fn of(cmd: &Cmd) -> Option<BatchKind> {
        match (cmd.common(), cmd.arg_count()) {
            (Common::Get, 1) => Some(BatchKind::Get),
            (Common::Set, 2) => Some(BatchKind::Set),
            _ => None,
        }
    }
}

/// Collects a run of batchable commands for one host.
#[derive(Default)]
pub(crate) struct Batcher {
    kind: Option<BatchKind>,
    /// The arguments, already RESP-encoded.
    body: Vec<u8>,
    waiters: Vec<Waiter>,
    /// Emptied waiter lists of answered batches, reused by the next runs.
    spare: Vec<Vec<Waiter>>,
}

fn write_bulk(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(b'$');
    out.extend_from_slice(itoa(bytes.len() as i64).as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\r\n");
}

impl Batcher {
    /// Commands waiting in the current run.
    pub(crate) fn len(&self) -> usize {
        self.waiters.len()
    }

    /// Whether a command of `kind` would join the current run.
    pub(crate) fn accepts(&self, kind: BatchKind) -> bool {
        self.kind.is_none() || self.kind == Some(kind)
    }

    /// Adds one command (a run of another kind must be flushed first).
    pub(crate) fn push(&mut self, kind: BatchKind, cmd: &Cmd, waiter: Waiter) {
        self.kind = Some(kind);
        self.body.extend_from_slice(cmd.encoded_args());
        self.waiters.push(waiter);
    }

    /// Writes the run to `out` (a lone command as itself, more as `MGET` or
    /// `MSET`) and returns what its reply answers.
    pub(crate) fn flush(&mut self, out: &mut Vec<u8>) -> Option<Expect> {
        let kind = self.kind.take()?;
        // The next run is likely as long as this one: reuse an answered
        // batch's list or size one once, instead of growing it step by step.
        let next = self
            .spare
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(self.waiters.len()));
        let waiters = std::mem::replace(&mut self.waiters, next);
        let args_per = match kind {
            BatchKind::Get => 1,
            BatchKind::Set => 2,
        };
        let single = waiters.len() == 1;
        let name = if single {
            kind.single_name()
        } else {
            kind.merged_name()
        };
        out.reserve(self.body.len() + 32);
        out.push(b'*');
        out.extend_from_slice(itoa((1 + waiters.len() * args_per) as i64).as_bytes());
        out.extend_from_slice(b"\r\n");
        write_bulk(out, name.as_bytes());
        out.extend_from_slice(&self.body);
        self.body.clear();
        Some(if single {
            let mut waiters = waiters;
            match waiters.pop() {
                Some(waiter) => Expect::One {
                    name: CmdName::of(name.as_bytes()),
                    waiter,
                },
                None => return None,
            }
        } else {
            Expect::Batch {
                kind,
                waiters,
                delivered: 0,
            }
        })
    }

    /// Takes back the waiter list of an answered batch for a later run.
    pub(crate) fn recycle(&mut self, mut waiters: Vec<Waiter>) {
        /// A few lists cover the batches in flight between two reads.
        const KEEP: usize = 8;
        waiters.clear();
        if self.spare.len() < KEEP && waiters.capacity() > 0 {
            self.spare.push(waiters);
        }
    }

    /// Rejects everything in the run.
    pub(crate) fn fail(
        &mut self,
        error: &Error,
        host: Option<&HostName>,
        failures: &RefCell<Option<Error>>,
    ) {
        if let Some(kind) = self.kind.take() {
            self.body.clear();
            Expect::Batch {
                kind,
                waiters: std::mem::take(&mut self.waiters),
                delivered: 0,
            }
            .fail(error, host, failures);
        }
    }
}

/// The multi-key commands rb emulates across hosts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MultiKey {
    /// `MGET`: values back in the caller's key order.
    Mget,
    /// `MSET`: `OK` once every host said `OK`.
    Mset,
    /// `DEL`, `UNLINK`, `EXISTS`, `TOUCH`: the hosts' counts summed.
    Count,
}

impl MultiKey {
    /// The emulated kind of `cmd`, when it has keys on more than one host
    /// potentially (more than one key).
    pub(crate) fn of(cmd: &Cmd) -> Option<MultiKey> {
        if cmd.arg_count() < 2 || cmd.common() != Common::Other {
            return None;
        }
        // Most commands are none of these: tell by the first letter.
        let kind = match cmd.name().first().map(u8::to_ascii_uppercase) {
            Some(b'M') if cmd.is(b"MGET") => MultiKey::Mget,
            Some(b'M') if cmd.is(b"MSET") => MultiKey::Mset,
            Some(b'D') if cmd.is(b"DEL") => MultiKey::Count,
            Some(b'U') if cmd.is(b"UNLINK") => MultiKey::Count,
            Some(b'E') if cmd.is(b"EXISTS") => MultiKey::Count,
            Some(b'T') if cmd.is(b"TOUCH") => MultiKey::Count,
            _ => return None,
        };
        let keys = match kind {
            MultiKey::Mset => cmd.arg_count() / 2,
            _ => cmd.arg_count(),
        };
        (keys > 1).then_some(kind)
    }
}

/// One multi-key command cut into one command per host.
pub(crate) struct Split {
    kind: MultiKey,
    keys: usize,
    /// Per host: its command and the caller's positions of its keys.
    pub(crate) parts: Vec<(HostId, Cmd, Vec<usize>)>,
}

/// Cuts `cmd` by the hosts of its keys (see [`MultiKey`]).
pub(crate) fn split(kind: MultiKey, command: &Cmd, router: &dyn Router) -> Result<Split> {
    let stride = if kind == MultiKey::Mset { 2 } else { 1 };
    if command.arg_count() % stride != 0 {
        return Err(Error::unroutable(
            command.name(),
            "MSET needs key value pairs (an odd number of arguments was given)",
        ));
    }
    let args: Vec<&[u8]> = command.args().collect();
    let keys = args.len() / stride;
    let mut parts: Vec<(HostId, Cmd, Vec<usize>)> = Vec::new();
    for (pos, chunk) in args.chunks(stride).enumerate() {
        let host = router.host_for_key(chunk[0])?;
        let part = match parts.iter_mut().position(|(h, _, _)| *h == host) {
            Some(i) => &mut parts[i],
            None => {
                let name = String::from_utf8_lossy(command.name()).into_owned();
                parts.push((host, cmd(&name), Vec::new()));
                let last = parts.len() - 1;
                &mut parts[last]
            }
        };
        for arg in chunk {
            part.1.push_arg(*arg);
        }
        part.2.push(pos);
    }
    Ok(Split { kind, keys, parts })
}

impl Split {
    /// Puts the per-host replies (in `parts` order) back together.
    pub(crate) fn combine(&self, replies: Vec<Value>) -> Result<Value> {
        match self.kind {
            MultiKey::Mset => Ok(Value::SimpleString("OK".into())),
            MultiKey::Count => {
                let mut sum: i64 = 0;
                for reply in replies {
                    match reply {
                        Value::Int(n) => sum = sum.saturating_add(n),
                        other => {
                            return Err(Error::type_mismatch("integer count", other.describe()))
                        }
                    }
                }
                Ok(Value::Int(sum))
            }
            MultiKey::Mget => {
                let mut out: Vec<Value> = vec![Value::Nil; self.keys];
                for ((_, _, positions), reply) in self.parts.iter().zip(replies) {
                    let Value::Array(items) = reply else {
                        return Err(Error::type_mismatch("MGET array", reply.describe()));
                    };
                    if items.len() != positions.len() {
                        return Err(Error::protocol(format!(
                            "MGET of {} keys answered with {} values",
                            positions.len(),
                            items.len()
                        )));
                    }
                    for (pos, item) in positions.iter().zip(items) {
                        if let Some(slot) = out.get_mut(*pos) {
                            *slot = item;
                        }
                    }
                }
                Ok(Value::Array(out))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::promise::ReplySink;
    use crate::resp::decode;
    use crate::router::PartitionRouter;
    use std::rc::Rc;

    #[derive(Default)]
    struct Replies(RefCell<Vec<Result<Value>>>);

    impl ReplySink for Replies {
        fn accept(&self, _index: u32, reply: Result<Value>, _ctx: &ReplyContext<'_>) {
            self.0.borrow_mut().push(reply)
        }

        fn release(&self, _index: u32) {}
    }

    type Log = Rc<Replies>;

    fn waiter(log: &Log) -> Waiter {
        Waiter::new(log.clone(), 0)
    }

    fn no_failures() -> RefCell<Option<Error>> {
        RefCell::new(None)
    }

    fn host() -> HostName {
        HostName {
            id: 1,
            addr: "test".into(),
        }
    }

    #[test]
    fn get_runs_become_one_mget() {
        let log: Log = Rc::default();
        let mut b = Batcher::default();
        for k in ["a", "b", "c"] {
            assert!(b.accepts(BatchKind::Get));
            b.push(BatchKind::Get, &cmd("GET").arg(k), waiter(&log));
        }
        assert!(!b.accepts(BatchKind::Set));
        let mut out = Vec::new();
        let expect = b.flush(&mut out).unwrap();
        assert_eq!(out, cmd("MGET").arg("a").arg("b").arg("c").to_packed());
        assert_eq!(b.len(), 0);
        let reply = Value::Array(vec![
            Value::BulkString(b"1".to_vec()),
            Value::Nil,
            Value::Int(3),
        ]);
        expect.deliver(reply, &host(), &no_failures());
        let got: Vec<Value> = log.0.borrow_mut().drain(..).map(|r| r.unwrap()).collect();
        assert_eq!(
            got,
            vec![Value::BulkString(b"1".to_vec()), Value::Nil, Value::Int(3)]
        );
    }

    #[test]
    fn lone_get_stays_get_and_set_runs_become_mset() {
        let log: Log = Rc::default();
        let mut b = Batcher::default();
        b.push(BatchKind::Get, &cmd("GET").arg("a"), waiter(&log));
        let mut out = Vec::new();
        assert!(matches!(b.flush(&mut out), Some(Expect::One { .. })));
        assert_eq!(out, cmd("GET").arg("a").to_packed());

        out.clear();
        b.push(BatchKind::Set, &cmd("SET").arg("a").arg(1), waiter(&log));
        b.push(BatchKind::Set, &cmd("SET").arg("b").arg(2), waiter(&log));
        let expect = b.flush(&mut out).unwrap();
        assert_eq!(out, cmd("MSET").arg("a").arg(1).arg("b").arg(2).to_packed());
        assert!(decode(&out).unwrap().is_some());
        expect.deliver(Value::SimpleString("OK".into()), &host(), &no_failures());
        assert_eq!(log.0.borrow().len(), 2);
        assert!(b.flush(&mut out).is_none());
    }

    #[test]
    fn batch_errors_reach_every_waiter() {
        let log: Log = Rc::default();
        let mut b = Batcher::default();
        b.push(BatchKind::Get, &cmd("GET").arg("a"), waiter(&log));
        b.push(BatchKind::Get, &cmd("GET").arg("b"), waiter(&log));
        let expect = b.flush(&mut Vec::new()).unwrap();
        expect.deliver(
            Value::Error {
                code: "ERR".into(),
                message: "x".into(),
            },
            &host(),
            &no_failures(),
        );
        let log2: Log = Rc::default();
        b.push(BatchKind::Get, &cmd("GET").arg("a"), waiter(&log2));
        b.push(BatchKind::Get, &cmd("GET").arg("b"), waiter(&log2));
        b.flush(&mut Vec::new()).unwrap().deliver(
            Value::Array(vec![Value::Nil]),
            &host(),
            &no_failures(),
        );
        for r in log.0.borrow().iter().chain(log2.0.borrow().iter()) {
            assert!(r.is_err());
        }
        assert_eq!(log.0.borrow().len() + log2.0.borrow().len(), 4);
        assert!(log.0.borrow()[0]
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("MGET"));
    }

    #[test]
    fn only_plain_forms_batch() {
        assert_eq!(BatchKind::of(&cmd("get").arg("k")), Some(BatchKind::Get));
        assert_eq!(
            BatchKind::of(&cmd("SET").arg("k").arg("v")),
            Some(BatchKind::Set)
        );
        assert_eq!(BatchKind::of(&cmd("SET").arg("k").arg("v").arg("NX")), None);
        assert_eq!(BatchKind::of(&cmd("GETDEL").arg("k")), None);
    }

    #[test]
    fn split_and_combine_keep_caller_order() {
        let router = PartitionRouter::with_ids(0..4).unwrap();
        let keys: Vec<String> = (0..20).map(|i| format!("key{i}")).collect();
        let mget = cmd("MGET").args_from(&keys);
        let split = split(MultiKey::of(&mget).unwrap(), &mget, &router).unwrap();
        assert!(split.parts.len() > 1);
        // Each host answers its keys' own names as values.
        let replies = split
            .parts
            .iter()
            .map(|(host, part, _)| {
                for k in part.args() {
                    assert_eq!(router.host_for_key(k).unwrap(), *host);
                }
                Value::Array(part.args().map(|k| Value::BulkString(k.to_vec())).collect())
            })
            .collect();
        let combined = split.combine(replies).unwrap();
        let want = Value::Array(
            keys.iter()
                .map(|k| Value::BulkString(k.clone().into_bytes()))
                .collect(),
        );
        assert_eq!(combined, want);

        let del = cmd("DEL").args_from(&keys);
        let split = super::split(MultiKey::of(&del).unwrap(), &del, &router).unwrap();
        let replies = split
            .parts
            .iter()
            .map(|(_, p, _)| Value::Int(p.arg_count() as i64))
            .collect();
        assert_eq!(split.combine(replies).unwrap(), Value::Int(20));

        let mset = cmd("MSET").arg("a").arg(1).arg("b").arg(2).arg("c").arg(3);
        let split = super::split(MultiKey::Mset, &mset, &router).unwrap();
        let pairs: usize = split.parts.iter().map(|(_, p, _)| p.arg_count()).sum();
        assert_eq!(pairs, 6);
        assert!(super::split(
            MultiKey::Mset,
            &cmd("MSET").arg("a").arg(1).arg("b"),
            &router
        )
        .is_err());
    }

    #[test]
    fn single_key_forms_are_not_emulated() {
        assert_eq!(MultiKey::of(&cmd("MGET").arg("a")), None);
        assert_eq!(MultiKey::of(&cmd("DEL").arg("a")), None);
        assert_eq!(MultiKey::of(&cmd("MSET").arg("a").arg(1)), None);
        assert_eq!(
            MultiKey::of(&cmd("EXISTS").arg("a").arg("b")),
            Some(MultiKey::Count)
        );
    }
}
