//! Auto-batching and what each reply answers, in memory (no I/O).
//!
//! [`Batcher`] merges a run of plain `GET key` (or `SET key value`) to one
//! host into one `MGET` (`MSET`), bounded by a maximum batch size, and
//! records one [`Expect`] whose reply is split back to each waiter.

use std::fmt;

use crate::cmd::{Cmd, Common};
use crate::error::{Error, HostName};
use crate::promise::Outcomes;
pub(crate) use crate::promise::Waiter;
use crate::resp::{itoa, Value};

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
    /// Whether its reply may be dropped unconverted (a merged batch's may
    /// not).
    pub(crate) fn may_discard(&self) -> bool {
        match self {
            Expect::One { waiter, .. } => waiter.may_discard(),
            Expect::Batch { .. } => false,
        }
    }

    /// How many requests it still answers.
    pub(crate) fn requests(&self) -> usize {
        match self {
            Expect::One { .. } => 1,
            Expect::Batch {
                waiters, delivered, ..
            } => waiters.len().saturating_sub(*delivered),
        }
    }

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
        outcomes: &Outcomes,
    ) {
        if let Expect::Batch {
            kind,
            waiters,
            delivered,
        } = self
        {
            if let Some(waiter) = waiters.get(*delivered) {
                let ctx = outcomes.context(Some(host), kind.single_name());
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
        outcomes: &Outcomes,
    ) -> Option<Error> {
        match self {
            Expect::One { name, waiter } => {
                let ctx = outcomes.context(Some(host), name.as_str());
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
                let ctx = outcomes.context(Some(host), kind.single_name());
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
    pub(crate) fn fail(self, error: &Error, host: Option<&HostName>, outcomes: &Outcomes) {
        match self {
            Expect::One { name, waiter } => {
                let ctx = outcomes.context(host, name.as_str());
                waiter.accept(Err(error.clone()), &ctx)
            }
            Expect::Batch {
                kind,
                waiters,
                delivered,
            } => {
                let ctx = outcomes.context(host, kind.single_name());
                for waiter in waiters.into_iter().skip(delivered) {
                    waiter.accept(Err(error.clone()), &ctx);
                }
            }
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
    pub(crate) fn fail(&mut self, error: &Error, host: Option<&HostName>, outcomes: &Outcomes) {
        if let Some(kind) = self.kind.take() {
            self.body.clear();
            Expect::Batch {
                kind,
                waiters: std::mem::take(&mut self.waiters),
                delivered: 0,
            }
            .fail(error, host, outcomes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::cmd;
    use crate::error::Result;
    use crate::promise::{ReplyContext, ReplySink};
    use crate::resp::decode;
    use std::cell::RefCell;
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

    fn no_failures() -> Outcomes {
        Outcomes::default()
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
}
