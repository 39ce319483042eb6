//! Transactions: `MULTI` ... `EXEC` on the one host that owns every key.
//!
//! A [`Transaction`] collects the commands of a transaction (the
//! [`Commands`](crate::Commands) helpers queue on it and return nothing);
//! the client then sends `MULTI`, the commands and `EXEC` as one pipeline
//! on one connection, and converts `EXEC`'s array to the caller's type (a
//! tuple, or `Vec<Value>` to see each command's own outcome: Redis applies
//! the others when one fails at run time, e.g. `WRONGTYPE`).
//!
//! With `WATCH` (the clients' `transaction_watch`), the check-and-set
//! pattern of redis-py and redis-rs: the keys are watched, the closure
//! reads through [`Transaction::read`] (immediately, on the same
//! connection) and queues its writes, and `EXEC` answers nil when a watched
//! key changed meanwhile: the closure then runs again, up to
//! [`WATCH_TRIES`] times, before [`Error::TransactionAborted`].

use std::cell::RefCell;

use crate::args::ToArg;
use crate::client::Execute;
use crate::cmd::{cmd, Cmd, ScriptCall};
use crate::convert::FromValue;
use crate::error::{Error, HostId, HostName, Result};
use crate::pipeline::{blocks, ConnEffect};
use crate::resp::Value;
use crate::router::Router;

/// How many times a watched transaction runs before it gives up.
pub const WATCH_TRIES: u32 = 100;

/// The host that owns every one of `keys`.
///
/// # Errors
///
/// [`Error::Unroutable`] naming the keys and their hosts when they are on
/// more than one host, or when there is no key.
pub(crate) fn host_of_keys<K: ToArg>(router: &dyn Router, keys: &[K]) -> Result<HostId> {
    let mut owners: Vec<(Vec<u8>, HostId)> = Vec::with_capacity(keys.len());
    for key in keys {
        let key = crate::args::to_bytes(key);
        let host = router.host_for_key(&key)?;
        owners.push((key, host));
    }
    let Some(&(_, first)) = owners.first() else {
        return Err(Error::unroutable(
            b"MULTI",
            "a transaction needs at least one key to find its host",
        ));
    };
    if owners.iter().all(|(_, h)| *h == first) {
        return Ok(first);
    }
    let placed: Vec<String> = owners
        .iter()
        .map(|(k, h)| format!("{} on host {h}", String::from_utf8_lossy(k)))
        .collect();
    Err(Error::unroutable(
        b"MULTI",
        format!(
            "a transaction runs on one host, but its keys are on several: {} (hash tags put keys together)",
            placed.join(", ")
        ),
    ))
}

/// The commands of one transaction, queued by the closure: every
/// [`Commands`](crate::Commands) helper works on it, returning nothing
/// (the results come from `EXEC`).
pub struct Transaction<'a> {
    host: HostId,
    /// Routes each queued command, to refuse one for another host; `None`
    /// on a local client (everything goes to its host).
    router: Option<&'a dyn Router>,
    queued: RefCell<Vec<Cmd>>,
    /// The first command that cannot be part of this transaction.
    refused: RefCell<Option<Error>>,
    /// Runs a read now, on the transaction's connection (watched form).
    reader: Option<&'a dyn Fn(Cmd) -> Result<Value>>,
}

impl std::fmt::Debug for Transaction<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transaction")
            .field("host", &self.host)
            .field("queued", &self.queued.borrow().len())
            .finish_non_exhaustive()
    }
}

impl<'a> Transaction<'a> {
    pub(crate) fn new(
        host: HostId,
        router: Option<&'a dyn Router>,
        reader: Option<&'a dyn Fn(Cmd) -> Result<Value>>,
    ) -> Transaction<'a> {
        Transaction {
            host,
            router,
            queued: RefCell::new(Vec::new()),
            refused: RefCell::new(None),
            reader,
        }
    }

    /// The host the transaction runs on.
    pub fn host_id(&self) -> HostId {
        self.host
    }

    /// Reads now, on the transaction's connection, after `WATCH`: the values
    /// the queued writes are based on (only in `transaction_watch`).
    ///
    /// ```no_run
    /// use rb::Commands;
    /// # let cluster = rb::Cluster::from_urls(["redis://127.0.0.1:6379"])?;
    /// let client = cluster.routing_client();
    /// let (n,): (i64,) = client.transaction_watch(&["counter"], |tx| {
    ///     let now: Option<i64> = tx.read().cmd(rb::cmd("GET").arg("counter"))?;
    ///     tx.set("counter", now.unwrap_or(1) * 2);
    ///     Ok(())
    /// }).map(|((),): ((),)| (0,))?;
    /// # Ok::<(), rb::Error>(())
    /// ```
    pub fn read(&self) -> TransactionReader<'_> {
        TransactionReader { tx: self }
    }

    /// Takes the queued commands, or the reason the transaction cannot run.
    pub(crate) fn into_commands(self) -> Result<Vec<Cmd>> {
        match self.refused.into_inner() {
            Some(e) => Err(e),
            None => Ok(self.queued.into_inner()),
        }
    }

    fn refuse(&self, e: Error) {
        self.refused.borrow_mut().get_or_insert(e);
    }

    fn queue(&self, cmd: Cmd) {
        if let Err(e) = self.check(&cmd) {
            return self.refuse(e);
        }
        self.queued.borrow_mut().push(cmd);
    }

    /// Whether `cmd` can run inside this transaction.
    fn check(&self, cmd: &Cmd) -> Result<()> {
        let reason = match ConnEffect::of(cmd) {
            ConnEffect::Refused(reason) => Some(reason),
            ConnEffect::Dirty => Some("it changes the connection's state; a transaction manages MULTI, EXEC and WATCH itself"),
            ConnEffect::None if blocks(cmd) => Some("a blocking command inside MULTI does not block; use its non-blocking form"),
            ConnEffect::None => None,
        };
        if let Some(reason) = reason {
            return Err(Error::Unsupported {
                command: cmd.display_name().into(),
                reason: reason.into(),
            });
        }
        if let Some(router) = self.router {
            let host = router.host_for_command(cmd)?;
            if host != self.host {
                return Err(Error::unroutable(
                    cmd.name(),
                    format!(
                        "its key is on host {host}, the transaction runs on host {}",
                        self.host
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl Execute for Transaction<'_> {
    /// Queued: the result comes from `EXEC`.
    type Output<T: FromValue + 'static> = ();

    fn execute<T: FromValue + 'static>(&self, cmd: Cmd) {
        self.queue(cmd);
    }

    fn execute_script<T: FromValue + 'static>(&self, call: ScriptCall) {
        // No SCRIPT LOAD inside MULTI: EVAL carries the source.
        let mut eval = cmd("EVAL").arg(call.script.source()).arg(call.keys.len());
        for k in &call.keys {
            eval = eval.arg(k.as_slice());
        }
        for a in &call.args {
            eval = eval.arg(a.as_slice());
        }
        self.queue(eval);
    }
}

/// Immediate reads inside a watched transaction: see [`Transaction::read`].
#[derive(Debug)]
pub struct TransactionReader<'t> {
    tx: &'t Transaction<'t>,
}

impl Execute for TransactionReader<'_> {
    type Output<T: FromValue + 'static> = Result<T>;

    fn execute<T: FromValue + 'static>(&self, cmd: Cmd) -> Result<T> {
        let Some(reader) = self.tx.reader else {
            return Err(Error::Unsupported {
                command: cmd.display_name().into(),
                reason: "reads inside a transaction need transaction_watch (a plain transaction sends everything at EXEC)".into(),
            });
        };
        self.tx.check(&cmd)?;
        T::from_value(reader(cmd)?)
    }

    fn execute_script<T: FromValue + 'static>(&self, call: ScriptCall) -> Result<T> {
        let mut eval = cmd("EVAL").arg(call.script.source()).arg(call.keys.len());
        for k in &call.keys {
            eval = eval.arg(k.as_slice());
        }
        for a in &call.args {
            eval = eval.arg(a.as_slice());
        }
        self.execute(eval)
    }
}

/// The pipeline of a transaction: `MULTI`, the commands, `EXEC`.
pub(crate) fn pipeline(commands: Vec<Cmd>) -> Vec<Cmd> {
    let mut all = Vec::with_capacity(commands.len() + 2);
    all.push(cmd("MULTI"));
    all.extend(commands);
    all.push(cmd("EXEC"));
    all
}

/// What `EXEC` said, given every reply of [`pipeline`] in order: the
/// converted results, or `None` when a watched key changed (nil).
///
/// # Errors
///
/// A command refused while queuing (Redis then discards the whole
/// transaction: `EXECABORT`), named with its position; a failed `MULTI`;
/// a conversion error.
pub(crate) fn outcome<T: FromValue>(
    host: &HostName,
    replies: Vec<Result<Value>>,
) -> Result<Option<T>> {
    let mut replies = replies;
    let exec = replies.pop().unwrap_or_else(|| Err(missing(host)));
    let mut replies = replies.into_iter();
    replies.next().unwrap_or_else(|| Err(missing(host)))?; // MULTI's +OK
                                                           // The replies between answer the queued commands: +QUEUED, or why not.
    let queue_error = replies
        .enumerate()
        .find_map(|(i, reply)| reply.err().map(|e| (i + 1, e)));
    match (exec, queue_error) {
        (Err(e), Some((n, first))) if e.code() == Some("EXECABORT") => Err(Error::Server {
            host: Some(host.clone()),
            command: "EXEC".into(),
            code: "EXECABORT".into(),
            message: format!("command {n} of the transaction was refused, so none ran: {first}")
                .into(),
        }),
        (Err(e), _) => Err(e),
        (Ok(Value::Nil), _) => Ok(None),
        (Ok(v), _) => T::from_value(v).map(Some),
    }
}

fn missing(host: &HostName) -> Error {
    Error::Protocol {
        host: Some(host.clone()),
        reason: "a transaction's reply is missing".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostName {
        HostName {
            id: 0,
            addr: "test".into(),
        }
    }

    #[test]
    fn exec_results_convert_and_nil_means_conflict() {
        let ok = |v: Value| Ok(v);
        let replies = vec![
            ok(Value::SimpleString("OK".into())),
            ok(Value::SimpleString("QUEUED".into())),
            ok(Value::SimpleString("QUEUED".into())),
            ok(Value::Array(vec![
                Value::Int(2),
                Value::BulkString(b"x".to_vec()),
            ])),
        ];
        let got: Option<(i64, String)> = outcome(&host(), replies).expect("exec");
        assert_eq!(got, Some((2, "x".into())));
        let replies = vec![
            ok(Value::SimpleString("OK".into())),
            ok(Value::SimpleString("QUEUED".into())),
            ok(Value::Nil),
        ];
        let got: Option<Vec<Value>> = outcome(&host(), replies).expect("nil");
        assert_eq!(got, None);
    }

    #[test]
    fn a_refused_command_names_its_position() {
        let replies = vec![
            Ok(Value::SimpleString("OK".into())),
            Ok(Value::SimpleString("QUEUED".into())),
            Err(Error::server(None, "NOPE", "ERR unknown command 'NOPE'")),
            Err(Error::server(
                None,
                "EXEC",
                "EXECABORT Transaction discarded",
            )),
        ];
        let err = outcome::<Vec<Value>>(&host(), replies).expect_err("aborted");
        assert_eq!(err.code(), Some("EXECABORT"));
        assert!(err.to_string().contains("command 2"), "{err}");
    }
}
