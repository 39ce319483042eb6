//! Scans on the clients: a key's elements page by page on the immediate
//! clients (`SSCAN`, `HSCAN`, `ZSCAN` as iterators), and the fleet-wide
//! scan a page at a time on the async client.

use crate::args::ToArg;
use crate::cmd::Cmd;
use crate::convert::FromValue;
use crate::error::Result;
use crate::promise::Reply;
use crate::scan::{KeyScan, ScanCursor, ScanOptions};

use super::{AsyncClient, Execute, LocalClient, RoutingClient};

/// One page of a fleet-wide scan (see [`AsyncClient::scan_page`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScanPage {
    /// The page's keys (a server may repeat a key across pages).
    pub keys: Vec<Vec<u8>>,
    /// Where the next page starts; `None` once every host is done.
    pub next: Option<ScanCursor>,
}

/// An iterator over a key's elements through an immediate client.
fn key_scan<C, T>(client: C, name: &'static str, key: Vec<u8>, opts: ScanOptions) -> KeyScan<T>
where
    C: Execute<Output<(u64, Vec<T>)> = Result<(u64, Vec<T>)>> + Send + 'static,
    T: FromValue + 'static,
{
    KeyScan::new(Box::new(move |cursor| {
        let command: Cmd = opts.key_scan_command(name, &key, cursor);
        client.execute::<(u64, Vec<T>)>(command)
    }))
}

macro_rules! key_scans {
    ($client:ty) => {
        impl $client {
            /// The members of the set at `key`, page by page (`SSCAN`).
            ///
            /// ```no_run
            /// # let cluster = rb::Cluster::from_urls(["redis://127.0.0.1:6379"])?;
            /// for member in cluster.routing_client().sscan_iter("tags", rb::ScanOptions::new()) {
            ///     let member: Vec<u8> = member?;
            /// }
            /// # Ok::<(), rb::Error>(())
            /// ```
            pub fn sscan_iter<K: ToArg>(&self, key: K, opts: ScanOptions) -> KeyScan<Vec<u8>> {
                key_scan(self.clone(), "SSCAN", crate::args::to_bytes(&key), opts)
            }

            /// The fields and values of the hash at `key`, page by page (`HSCAN`).
            pub fn hscan_iter<K: ToArg>(
                &self,
                key: K,
                opts: ScanOptions,
            ) -> KeyScan<(Vec<u8>, Vec<u8>)> {
                key_scan(self.clone(), "HSCAN", crate::args::to_bytes(&key), opts)
            }

            /// The members and scores of the sorted set at `key`, page by
            /// page (`ZSCAN`).
            pub fn zscan_iter<K: ToArg>(
                &self,
                key: K,
                opts: ScanOptions,
            ) -> KeyScan<(Vec<u8>, f64)> {
                key_scan(self.clone(), "ZSCAN", crate::args::to_bytes(&key), opts)
            }
        }
    };
}

key_scans!(RoutingClient);
key_scans!(LocalClient);

impl AsyncClient {
    /// One page of a fleet-wide scan from `at` ([`ScanCursor::start`] for
    /// the first), with the position of the next: the async form of
    /// [`Cluster::scan`](crate::Cluster::scan). Pages do not drop keys a
    /// server repeats.
    ///
    /// ```no_run
    /// # async fn walk(client: rb::AsyncClient) -> rb::Result<()> {
    /// let opts = rb::ScanOptions::new().count(1000);
    /// let mut at = Some(rb::ScanCursor::start());
    /// while let Some(cursor) = at {
    ///     let page = client.scan_page(cursor, &opts).await?;
    ///     for key in &page.keys { /* ... */ }
    ///     at = page.next;
    /// }
    /// # Ok(()) }
    /// ```
    pub fn scan_page(&self, at: ScanCursor, opts: &ScanOptions) -> Reply<ScanPage> {
        let hosts = self.cluster().host_ids();
        let mut ahead = hosts.iter().copied().filter(|&h| h >= at.host());
        let Some(host) = ahead.next() else {
            return Reply::ready(Ok(ScanPage {
                keys: Vec::new(),
                next: None,
            }));
        };
        let after = ahead.next();
        let cursor = if host == at.host() { at.cursor() } else { 0 };
        let page: Reply<(u64, Vec<Vec<u8>>)> = self.send(host, opts.scan_command(cursor));
        Reply::from_future(async move {
            let (next, keys) = page.await?;
            let next = match (next, after) {
                (0, Some(after)) => Some(ScanCursor::new(after, 0)),
                (0, None) => None,
                (next, _) => Some(ScanCursor::new(host, next)),
            };
            Ok(ScanPage { keys, next })
        })
    }
}
