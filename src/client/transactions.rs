//! Transactions on every client (see [`crate::transaction`]): on the
//! routing and local clients on a connection held for the transaction, in
//! a map queued with the map's other commands, and on the async client as
//! one uninterrupted block of the shared connection's pipeline.

use std::cell::RefCell;
use std::rc::Rc;

use crate::args::ToArg;
use crate::cluster::Cluster;
use crate::cmd::{cmd, Cmd};
use crate::convert::FromValue;
use crate::error::{Error, HostId, HostName, Result};
use crate::event_loop::Session;
use crate::promise::{Promise, Reply, Slot};
use crate::resp::Value;
use crate::router::Router;
use crate::transaction::{host_of_keys, outcome, pipeline, Transaction, WATCH_TRIES};

use super::{immediate_budget, AsyncClient, LocalClient, MappingClient, RoutingClient};

/// One host's connection, held across a transaction's round trips.
struct Held {
    host: HostId,
    name: HostName,
    session: RefCell<Session>,
}

impl Held {
    fn new(cluster: &Cluster, host: HostId) -> Result<Held> {
        let name = cluster.host(host)?.name().clone();
        let budget = immediate_budget(cluster, &[host]);
        Ok(Held {
            host,
            name,
            session: RefCell::new(cluster.held_session(budget)),
        })
    }

    /// Sends `cmds` as one pipeline and waits for every reply.
    fn round_trip(&self, cmds: &[Cmd]) -> Vec<Result<Value>> {
        let mut session = self.session.borrow_mut();
        session.restart_request_budgets();
        let promises: Vec<Promise<Value>> = cmds.iter().map(|_| Promise::new()).collect();
        session.enqueue_group(
            self.host,
            cmds.iter().zip(promises.iter().map(Promise::sink)),
        );
        session.join();
        let _ = session.take_failure();
        let replies: Vec<Result<Value>> = promises.iter().map(Promise::take).collect();
        // A group that did not run whole (refused, or its connection
        // failed) may have left MULTI or WATCH open: that connection must
        // not serve anyone else.
        if replies
            .iter()
            .any(|r| matches!(r, Err(e) if e.code().is_none()))
        {
            session.mark_dirty(self.host);
        }
        replies
    }

    /// One command, now.
    fn call(&self, c: Cmd) -> Result<Value> {
        self.round_trip(&[c])
            .pop()
            .unwrap_or_else(|| Err(Error::config("no reply")))
    }

    /// Gives the connection back (to its pool when it is clean).
    fn finish(self) {
        let _ = self.session.into_inner().finish();
    }
}

/// On a migrating cluster, moves every key `commands` touch to its new
/// owner first, so nothing in a transaction reads or changes a stale copy.
fn move_keys_of(cluster: &Cluster, commands: &[Cmd]) -> Result<()> {
    if cluster.migrating_from().is_none() {
        return Ok(());
    }
    let mut touched = Vec::new();
    for c in commands {
        let touch = super::migrating::Touch::of(c);
        touched.extend(
            crate::keyspec::all_keys(c)?
                .into_iter()
                .map(|k| (k.to_vec(), touch)),
        );
    }
    super::migrating::move_in_transit(cluster, touched.iter().map(|(k, w)| (k.as_slice(), *w)))
}

/// A transaction on a held connection.
fn run<T: FromValue + 'static>(
    cluster: &Cluster,
    host: HostId,
    router: Option<&dyn Router>,
    f: impl FnOnce(&Transaction<'_>) -> Result<()>,
) -> Result<T> {
    let tx = Transaction::new(host, router, None);
    f(&tx)?;
    let queued = tx.into_commands()?;
    move_keys_of(cluster, &queued)?;
    let commands = pipeline(queued);
    let held = Held::new(cluster, host)?;
    let replies = held.round_trip(&commands);
    let name = held.name.clone();
    held.finish();
    outcome(&name, replies)?.ok_or(Error::TransactionAborted {
        host: name,
        tries: 1,
    })
}

/// A watched transaction on a held connection, retried on conflicts.
fn run_watched<T, K, F>(
    cluster: &Cluster,
    host: HostId,
    router: Option<&dyn Router>,
    keys: &[K],
    mut f: F,
) -> Result<T>
where
    T: FromValue + 'static,
    K: ToArg,
    F: FnMut(&Transaction<'_>) -> Result<()>,
{
    let watched: Vec<Vec<u8>> = keys.iter().map(crate::args::to_bytes).collect();
    // The transaction is built after the move: it may do anything.
    super::migrating::move_in_transit(
        cluster,
        watched
            .iter()
            .map(|k| (k.as_slice(), super::migrating::Touch::Delete)),
    )?;
    let held = Held::new(cluster, host)?;
    let result = watch_loop(cluster, &held, router, keys, &mut f);
    held.finish();
    result
}

fn watch_loop<T, K, F>(
    cluster: &Cluster,
    held: &Held,
    router: Option<&dyn Router>,
    keys: &[K],
    f: &mut F,
) -> Result<T>
where
    T: FromValue + 'static,
    K: ToArg,
    F: FnMut(&Transaction<'_>) -> Result<()>,
{
    let mut watch = cmd("WATCH");
    for k in keys {
        watch.push_arg(k);
    }
    for _ in 0..WATCH_TRIES {
        held.call(watch.clone())?;
        let reader = |c: Cmd| held.call(c);
        let tx = Transaction::new(held.host, router, Some(&reader));
        // On a migrating cluster, keys the queued commands touch besides the
        // watched ones move to their new owner before MULTI.
        let queued = f(&tx)
            .and_then(|()| tx.into_commands())
            .and_then(|queued| move_keys_of(cluster, &queued).map(|()| queued));
        let queued = match queued {
            Ok(queued) => queued,
            Err(e) => {
                // Leave the connection as it was: nothing watched.
                let _ = held.call(cmd("UNWATCH"));
                return Err(e);
            }
        };
        // EXEC (or a failed MULTI's DISCARD) unwatches every key.
        match outcome(&held.name, held.round_trip(&pipeline(queued)))? {
            Some(result) => return Ok(result),
            None => continue,
        }
    }
    Err(Error::TransactionAborted {
        host: held.name.clone(),
        tries: WATCH_TRIES,
    })
}

/// Why a map's or the async client's transaction is refused while the
/// cluster migrates.
fn migrating_transaction() -> Error {
    Error::Unsupported {
        command: "MULTI".into(),
        reason: "a transaction in a map or on the async client cannot move its keys first while the cluster migrates; use the routing client's transaction".into(),
    }
}

impl RoutingClient {
    /// Runs `MULTI`, the commands `f` queues, and `EXEC` on the one host
    /// that owns every key of `keys`, on a connection held for it; the
    /// result is `EXEC`'s reply converted to `T` (a tuple, or `Vec<Value>`
    /// to see each command's own outcome).
    ///
    /// ```no_run
    /// use rb::Commands;
    /// # let cluster = rb::Cluster::from_urls(["redis://127.0.0.1:6379"])?;
    /// let client = cluster.routing_client();
    /// let (a, b): (i64, Option<Vec<u8>>) = client.transaction(&["{u1}a", "{u1}b"], |tx| {
    ///     tx.incr("{u1}a");
    ///     tx.get("{u1}b");
    ///     Ok(())
    /// })?;
    /// # Ok::<(), rb::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Unroutable`] when the keys (or a queued command's keys) are
    /// on more than one host; a command refused while queuing
    /// (`EXECABORT`, naming it); the connection's errors; `f`'s error
    /// (nothing is sent then).
    pub fn transaction<T, K, F>(&self, keys: &[K], f: F) -> Result<T>
    where
        T: FromValue + 'static,
        K: ToArg,
        F: FnOnce(&Transaction<'_>) -> Result<()>,
    {
        let router = self.cluster().router()?;
        let host = host_of_keys(&*router, keys)?;
        run(self.cluster(), host, Some(&*router), f)
    }

    /// The check-and-set pattern: `WATCH` the keys, run `f` (its reads
    /// through [`Transaction::read`] happen at once; its writes are
    /// queued), then `MULTI` ... `EXEC`. When a watched key changed before
    /// `EXEC`, `f` runs again (up to [`WATCH_TRIES`] times).
    ///
    /// ```no_run
    /// use rb::Commands;
    /// # let cluster = rb::Cluster::from_urls(["redis://127.0.0.1:6379"])?;
    /// let client = cluster.routing_client();
    /// let ((),): ((),) = client.transaction_watch(&["counter"], |tx| {
    ///     let now: Option<i64> = tx.read().cmd(rb::cmd("GET").arg("counter"))?;
    ///     tx.set("counter", now.unwrap_or(1) * 2);
    ///     Ok(())
    /// })?;
    /// # Ok::<(), rb::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::TransactionAborted`] after [`WATCH_TRIES`] conflicts; as
    /// [`RoutingClient::transaction`] otherwise. The connection is left
    /// with nothing watched whatever happens.
    pub fn transaction_watch<T, K, F>(&self, keys: &[K], f: F) -> Result<T>
    where
        T: FromValue + 'static,
        K: ToArg,
        F: FnMut(&Transaction<'_>) -> Result<()>,
    {
        let router = self.cluster().router()?;
        let host = host_of_keys(&*router, keys)?;
        run_watched(self.cluster(), host, Some(&*router), keys, f)
    }
}

impl LocalClient {
    /// [`RoutingClient::transaction`] on this client's host (commands are
    /// not routed: all run there).
    ///
    /// # Errors
    ///
    /// As [`RoutingClient::transaction`], routing aside.
    pub fn transaction<T, F>(&self, f: F) -> Result<T>
    where
        T: FromValue + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<()>,
    {
        run(self.cluster(), self.host_id(), None, f)
    }

    /// [`RoutingClient::transaction_watch`] on this client's host.
    ///
    /// # Errors
    ///
    /// As [`RoutingClient::transaction_watch`], routing aside.
    pub fn transaction_watch<T, K, F>(&self, keys: &[K], f: F) -> Result<T>
    where
        T: FromValue + 'static,
        K: ToArg,
        F: FnMut(&Transaction<'_>) -> Result<()>,
    {
        run_watched(self.cluster(), self.host_id(), None, keys, f)
    }
}

impl MappingClient {
    /// A transaction queued in the map: `MULTI`, the commands `f` queues,
    /// `EXEC`, as one uninterrupted block on the keys' host; the promise
    /// holds `EXEC`'s reply converted to `T`.
    pub fn transaction<T, K, F>(&self, keys: &[K], f: F) -> Promise<T>
    where
        T: FromValue + 'static,
        K: ToArg,
        F: FnOnce(&Transaction<'_>) -> Result<()>,
    {
        self.batch.with(|d| {
            if d.migration.is_some() {
                return d.reject(migrating_transaction());
            }
            let router = d.router.clone();
            let prepared = host_of_keys(&*router, keys).and_then(|host| {
                let tx = Transaction::new(host, Some(&*router), None);
                f(&tx)?;
                Ok((host, pipeline(tx.into_commands()?)))
            });
            let (host, commands) = match prepared {
                Ok(p) => p,
                Err(e) => return d.reject(e),
            };
            let name = match d.session.hosts().get(&host) {
                Some(entry) => entry.info.name().clone(),
                None => return d.reject(Error::NoSuchHost { id: host }),
            };
            let result = Promise::new();
            let replies: Rc<RefCell<Vec<Result<Value>>>> = Rc::default();
            let last = commands.len() - 1;
            let promises: Vec<Promise<Value>> = commands.iter().map(|_| Promise::new()).collect();
            d.session.enqueue_group(
                host,
                commands.iter().zip(promises.iter().map(Promise::sink)),
            );
            for (i, p) in promises.into_iter().enumerate() {
                let (replies, result, name) = (replies.clone(), result.clone(), name.clone());
                p.on_result(move |r| {
                    replies.borrow_mut().push(r);
                    if i == last {
                        let all = std::mem::take(&mut *replies.borrow_mut());
                        result.settle(outcome(&name, all).and_then(|v| {
                            v.ok_or(Error::TransactionAborted {
                                host: name.clone(),
                                tries: 1,
                            })
                        }));
                    }
                });
            }
            result
        })
    }
}

impl AsyncClient {
    /// A transaction on the shared connection of the keys' host: `MULTI`,
    /// the commands `f` queues and `EXEC` go out as one uninterrupted block
    /// of its pipeline (no other caller's command between them, nothing
    /// merged into a batch). `WATCH` needs a connection of its own: use
    /// the routing client's `transaction_watch` for check-and-set.
    pub fn transaction<T, K, F>(&self, keys: &[K], f: F) -> Reply<T>
    where
        T: FromValue + 'static,
        K: ToArg,
        F: FnOnce(&Transaction<'_>) -> Result<()>,
    {
        if self.cluster().migrating_from().is_some() {
            return Reply::ready(Err(migrating_transaction()));
        }
        let prepared = self.cluster().router().and_then(|router| {
            let host = host_of_keys(&*router, keys)?;
            let tx = Transaction::new(host, Some(&*router), None);
            f(&tx)?;
            let name = self.cluster().host(host)?.name().clone();
            Ok((host, name, pipeline(tx.into_commands()?)))
        });
        let (host, name, commands) = match prepared {
            Ok(p) => p,
            Err(e) => return Reply::ready(Err(e)),
        };
        let driver = match self.driver() {
            Ok(d) => d,
            Err(e) => return Reply::ready(Err(e)),
        };
        let keep = driver.keep_alive();
        let mut requests = Vec::with_capacity(commands.len());
        let mut parts = Vec::with_capacity(commands.len());
        for c in commands {
            let (mut request, slot) = self.request::<Value>(host, c);
            request.auto_batch = false;
            requests.push(request);
            parts.push(Reply::from_slot(
                slot as std::sync::Arc<Slot<Value>>,
                keep.clone(),
                self.spin(),
            ));
        }
        driver.queue.submit_all(requests);
        Reply::join_results(parts, move |replies| {
            outcome(&name, replies)?.ok_or(Error::TransactionAborted {
                host: name,
                tries: 1,
            })
        })
    }
}
