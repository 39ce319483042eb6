//! Walking every key of the fleet: `SCAN` on each host in id order, with a
//! cursor ([`ScanCursor`]) that names the host and the server's cursor, so
//! a walk can be printed, saved and resumed.
//!
//! `SCAN` returns every key that exists for the whole walk at least once;
//! it may return a key twice (when the server resizes its table meanwhile).
//! [`Scan`] drops those repeats (it remembers the keys of the host being
//! walked: memory for one host's keys; turn it off with
//! [`ScanOptions::dedupe`]), so each key comes once. A key added or
//! removed during the walk may or may not come, as with `SCAN` itself.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::str::FromStr;

use crate::cluster::Cluster;
use crate::cmd::{cmd, Cmd};
use crate::commands::Commands;
use crate::error::{Error, HostId, Result};

/// What a scan walks: `MATCH`, `COUNT`, `TYPE`.
///
/// ```
/// let opts = rb::ScanOptions::new().pattern("user:*").count(1000).key_type("hash");
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScanOptions {
    pattern: Option<Vec<u8>>,
    count: Option<u64>,
    key_type: Option<String>,
    no_dedupe: bool,
}

impl ScanOptions {
    /// Every key, the server's default page size, repeats dropped.
    #[must_use]
    pub fn new() -> ScanOptions {
        ScanOptions::default()
    }

    /// Only keys matching a glob-style pattern (`MATCH`).
    #[must_use]
    pub fn pattern(mut self, pattern: impl AsRef<[u8]>) -> ScanOptions {
        self.pattern = Some(pattern.as_ref().to_vec());
        self
    }

    /// How much work each call does on the server (`COUNT`, a hint).
    #[must_use]
    pub fn count(mut self, count: u64) -> ScanOptions {
        self.count = Some(count);
        self
    }

    /// Only keys of this type (`TYPE`: `string`, `hash`, `list`, ...).
    #[must_use]
    #[doc(alias = "type")]
    pub fn key_type(mut self, key_type: impl Into<String>) -> ScanOptions {
        self.key_type = Some(key_type.into());
        self
    }

    /// Whether [`Scan`] drops keys a server returns twice (default true;
    /// it costs the memory of one host's keys).
    #[must_use]
    pub fn dedupe(mut self, on: bool) -> ScanOptions {
        self.no_dedupe = !on;
        self
    }

    /// `SCAN cursor [MATCH ..] [COUNT ..] [TYPE ..]`.
    pub(crate) fn scan_command(&self, cursor: u64) -> Cmd {
        let mut c = cmd("SCAN").arg(cursor);
        self.append(&mut c);
        if let Some(t) = &self.key_type {
            c = c.arg("TYPE").arg(t.as_str());
        }
        c
    }

    /// `<name> key cursor [MATCH ..] [COUNT ..]` (SSCAN, HSCAN, ZSCAN).
    pub(crate) fn key_scan_command(&self, name: &str, key: &[u8], cursor: u64) -> Cmd {
        let mut c = cmd(name).arg(key).arg(cursor);
        self.append(&mut c);
        c
    }

    fn append(&self, c: &mut Cmd) {
        if let Some(p) = &self.pattern {
            c.push_arg("MATCH");
            c.push_arg(p.as_slice());
        }
        if let Some(n) = self.count {
            c.push_arg("COUNT");
            c.push_arg(n);
        }
    }
}

/// Where a fleet-wide scan stands: a host and that host's `SCAN` cursor.
/// Printed as `host:cursor` (e.g. `3:1792`) and parsed back.
///
/// ```
/// let c: rb::ScanCursor = "3:1792".parse()?;
/// assert_eq!((c.host(), c.cursor()), (3, 1792));
/// assert_eq!(c.to_string(), "3:1792");
/// # Ok::<(), rb::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ScanCursor {
    host: HostId,
    cursor: u64,
}

impl ScanCursor {
    /// The start of a walk: the first host, from its beginning.
    pub fn start() -> ScanCursor {
        ScanCursor { host: 0, cursor: 0 }
    }

    /// A cursor at `cursor` of host `host` (hosts are walked in id order,
    /// from the first id at or after `host`).
    pub fn new(host: HostId, cursor: u64) -> ScanCursor {
        ScanCursor { host, cursor }
    }

    /// The host the walk is on.
    pub fn host(&self) -> HostId {
        self.host
    }

    /// That host's `SCAN` cursor (0: its beginning).
    pub fn cursor(&self) -> u64 {
        self.cursor
    }
}

impl fmt::Display for ScanCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.cursor)
    }
}

impl FromStr for ScanCursor {
    type Err = Error;

    /// Parses `host:cursor`.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for anything else.
    fn from_str(s: &str) -> Result<ScanCursor> {
        let bad = || {
            Error::config(format!(
                "{s:?} is not a scan cursor (host:cursor, e.g. 3:1792)"
            ))
        };
        let (host, cursor) = s.split_once(':').ok_or_else(bad)?;
        Ok(ScanCursor {
            host: host.parse().map_err(|_| bad())?,
            cursor: cursor.parse().map_err(|_| bad())?,
        })
    }
}

/// Every key of every host, host by host in id order: see
/// [`Cluster::scan`]. Each item is a key, or the error of a host that
/// failed (the walk then goes on with the next host; [`Scan::failed`]
/// says where to resume the failed one).
pub struct Scan {
    cluster: Cluster,
    opts: ScanOptions,
    /// The hosts still to walk, in id order, the current one first.
    hosts: VecDeque<HostId>,
    /// The current host's next cursor.
    cursor: u64,
    /// The page being handed out, and the cursor that fetched it.
    page: VecDeque<Vec<u8>>,
    page_at: Option<ScanCursor>,
    /// Keys of the current host handed out so far (for repeats).
    seen: HashSet<Vec<u8>>,
    failed: Vec<ScanCursor>,
}

impl fmt::Debug for Scan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scan")
            .field("position", &self.position())
            .field("hosts_left", &self.hosts.len())
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl Scan {
    pub(crate) fn new(cluster: Cluster, from: ScanCursor, opts: ScanOptions) -> Scan {
        let hosts: VecDeque<HostId> = cluster
            .host_ids()
            .into_iter()
            .filter(|&h| h >= from.host)
            .collect();
        let cursor = if hosts.front() == Some(&from.host) {
            from.cursor
        } else {
            0
        };
        Scan {
            cluster,
            opts,
            hosts,
            cursor,
            page: VecDeque::new(),
            page_at: None,
            seen: HashSet::new(),
            failed: Vec::new(),
        }
    }

    /// Where to resume this walk so that no key is missed: the page being
    /// handed out (its keys may come again), else the next page; `None`
    /// once every host is done.
    pub fn position(&self) -> Option<ScanCursor> {
        if !self.page.is_empty() {
            return self.page_at;
        }
        self.hosts.front().map(|&host| ScanCursor {
            host,
            cursor: self.cursor,
        })
    }

    /// Where each host that failed stood when it did: resume one with
    /// [`Cluster::scan_from`] (that walk covers the hosts after it too).
    pub fn failed(&self) -> &[ScanCursor] {
        &self.failed
    }

    /// The current host's next page (its keys, repeats not dropped), for
    /// a walker that works a page at a time; an error stops at that page.
    pub(crate) fn next_page(&mut self) -> Result<Vec<Vec<u8>>> {
        self.fetch()?;
        Ok(self.page.drain(..).collect())
    }

    fn next_host(&mut self) {
        self.hosts.pop_front();
        self.cursor = 0;
        self.seen.clear();
    }

    /// Fetches the current host's next page.
    fn fetch(&mut self) -> Result<()> {
        let Some(&host) = self.hosts.front() else {
            return Ok(());
        };
        let at = ScanCursor {
            host,
            cursor: self.cursor,
        };
        let reply: Result<(u64, Vec<Vec<u8>>)> = self
            .cluster
            .local_client(host)
            .and_then(|c| c.cmd(self.opts.scan_command(self.cursor)));
        let (next, keys) = match reply {
            Ok(r) => r,
            Err(e) => {
                self.failed.push(at);
                self.next_host();
                return Err(e);
            }
        };
        self.page_at = Some(at);
        for key in keys {
            if self.opts.no_dedupe || self.seen.insert(key.clone()) {
                self.page.push_back(key);
            }
        }
        if next == 0 {
            self.next_host();
        } else {
            self.cursor = next;
        }
        Ok(())
    }
}

impl Iterator for Scan {
    type Item = Result<Vec<u8>>;

    fn next(&mut self) -> Option<Result<Vec<u8>>> {
        loop {
            if let Some(key) = self.page.pop_front() {
                return Some(Ok(key));
            }
            self.hosts.front()?;
            if let Err(e) = self.fetch() {
                return Some(Err(e));
            }
        }
    }
}

/// Fetches the page at a cursor: the next cursor and the page's elements.
pub(crate) type FetchPage<T> = Box<dyn FnMut(u64) -> Result<(u64, Vec<T>)> + Send>;

/// The elements of one key (a set, hash or sorted set) page by page:
/// `SSCAN` / `HSCAN` / `ZSCAN` on an immediate client. A failure is the
/// last item.
pub struct KeyScan<T> {
    fetch: FetchPage<T>,
    cursor: Option<u64>,
    page: VecDeque<T>,
}

impl<T> fmt::Debug for KeyScan<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyScan")
            .field("cursor", &self.cursor)
            .field("buffered", &self.page.len())
            .finish_non_exhaustive()
    }
}

impl<T> KeyScan<T> {
    pub(crate) fn new(fetch: FetchPage<T>) -> KeyScan<T> {
        KeyScan {
            fetch,
            cursor: Some(0),
            page: VecDeque::new(),
        }
    }
}

impl<T> Iterator for KeyScan<T> {
    type Item = Result<T>;

    fn next(&mut self) -> Option<Result<T>> {
        loop {
            if let Some(item) = self.page.pop_front() {
                return Some(Ok(item));
            }
            let cursor = self.cursor?;
            match (self.fetch)(cursor) {
                Ok((next, items)) => {
                    self.page.extend(items);
                    self.cursor = (next != 0).then_some(next);
                }
                Err(e) => {
                    self.cursor = None;
                    return Some(Err(e));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_print_and_parse() {
        let c = ScanCursor::new(7, 123_456);
        assert_eq!(c.to_string().parse::<ScanCursor>().expect("parse"), c);
        for bad in ["", "7", "7:", ":1", "x:1", "1:y", "-1:2", "1:2:3"] {
            assert!(bad.parse::<ScanCursor>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn commands_carry_the_options() {
        let opts = ScanOptions::new().pattern("u:*").count(10).key_type("set");
        let c = opts.scan_command(5);
        let args: Vec<&[u8]> = c.args().collect();
        assert_eq!(c.name(), b"SCAN");
        assert_eq!(
            args,
            [
                &b"5"[..],
                b"MATCH",
                b"u:*",
                b"COUNT",
                b"10",
                b"TYPE",
                b"set"
            ]
        );
        let c = opts.key_scan_command("HSCAN", b"h", 0);
        let args: Vec<&[u8]> = c.args().collect();
        assert_eq!(args, [&b"h"[..], b"0", b"MATCH", b"u:*", b"COUNT", b"10"]);
    }
}
