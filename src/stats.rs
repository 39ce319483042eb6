//! Per-host statistics: counters, a latency histogram, and an observer of
//! connection and health events.
//!
//! [`ClusterStats`] is a snapshot: every host's [`HostStats`], read from
//! counters that the engine bumps with relaxed atomics (no lock and no
//! allocation per command). Counters only grow (except `in_flight`, a
//! gauge); to get rates, take two snapshots and subtract. A snapshot is not
//! a consistent cut: counters read a moment apart may disagree by the
//! commands that ran in between.
//!
//! Latencies go into a log-linear histogram: 16 buckets per power of two
//! from 16 µs up (exact microsecond buckets below), to 2<sup>26</sup> µs
//! (about 67 s), plus one bucket for anything slower. A quantile is
//! therefore at most one bucket (6.25 %, or 1 µs below 16 µs) above the
//! true value, and never above the exact maximum.
//!
//! ```
//! # fn show(stats: &rb::ClusterStats) {
//! for (id, host) in &stats.hosts {
//!     println!(
//!         "{id}: {} commands, {} timeouts, p99 {:?}, {}",
//!         host.commands,
//!         host.timeouts,
//!         host.latency.p99,
//!         if host.health.is_up() { "up" } else { "DOWN" },
//!     );
//! }
//! let all = stats.totals();
//! println!("{} of {} hosts down", all.hosts_down, all.hosts);
//! # }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::error::{Error, HostId, HostName};
use crate::health::HostHealth;

/// Something that happened to a host, as an [`Observer`] receives it.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum HostEvent {
    /// A connection to the host was established (its handshake, if any,
    /// not yet answered).
    Connected {
        /// The host.
        host: HostName,
        /// True for every connection after the host's first one.
        reconnect: bool,
    },
    /// A failure that counts toward the host's health: a connect failed, a
    /// connection broke, or a deadline passed (once per failed attempt, not
    /// once per request it failed).
    Failed {
        /// The host.
        host: HostName,
        /// What went wrong.
        error: Error,
    },
    /// The host went Down: requests to it fail with
    /// [`Error::HostDown`] until a probe succeeds.
    Down {
        /// The host.
        host: HostName,
        /// When it is probed next, from now.
        retry_in: Duration,
        /// The failure that took it Down.
        error: Error,
        /// False when the host just went Down; true when it was Down
        /// already and a probe failed (the period doubled).
        after_probe: bool,
    },
    /// The host is Up again (a probe, or any reply, succeeded).
    Up {
        /// The host.
        host: HostName,
        /// How long it was Down.
        down_for: Duration,
    },
}

impl HostEvent {
    /// The host the event is about.
    pub fn host(&self) -> &HostName {
        match self {
            HostEvent::Connected { host, .. }
            | HostEvent::Failed { host, .. }
            | HostEvent::Down { host, .. }
            | HostEvent::Up { host, .. } => host,
        }
    }
}

/// Receives [`HostEvent`]s: connects, failures, hosts going Down and Up.
///
/// Called on whichever thread saw the event (a map's caller, the
/// background driver), after rb released its locks; it must be quick and
/// must not block (hand the event to a channel or a logger). A closure
/// `Fn(&HostEvent) + Send + Sync` is an observer.
///
/// ```
/// use rb::stats::{HostEvent, Observer};
/// let log = |event: &HostEvent| {
///     if let HostEvent::Down { host, error, .. } = event {
///         eprintln!("{host} is down: {error}");
///     }
/// };
/// let observer: &dyn Observer = &log;
/// # let _ = observer;
/// ```
pub trait Observer: Send + Sync {
    /// One event.
    fn on_event(&self, event: &HostEvent);
}

impl<F> Observer for F
where
    F: Fn(&HostEvent) + Send + Sync,
{
    fn on_event(&self, event: &HostEvent) {
        self(event)
    }
}

// ---------------------------------------------------------------------------
// The histogram's layout.

/// log2 of the sub-buckets per power of two.
const SUB_BITS: u32 = 4;
/// Sub-buckets per power of two; also the first value (µs) that is not
/// counted in an exact bucket.
const SUB: u64 = 1 << SUB_BITS;
/// Values from 2^TOP_EXP µs (~67 s) up share the last bucket.
const TOP_EXP: u32 = 26;
/// Exact buckets `0..SUB`, then `SUB` per power of two from 2^SUB_BITS to
/// 2^TOP_EXP, then the overflow bucket.
const BUCKETS: usize = (SUB + (TOP_EXP - SUB_BITS) as u64 * SUB + 1) as usize;

/// The bucket of a latency in whole microseconds.
fn bucket_of(us: u64) -> usize {
    if us < SUB {
        return us as usize;
    }
    let exp = 63 - us.leading_zeros(); // floor(log2(us)), >= SUB_BITS
    if exp >= TOP_EXP {
        return BUCKETS - 1;
    }
    let sub = (us >> (exp - SUB_BITS)) & (SUB - 1);
    (SUB + u64::from(exp - SUB_BITS) * SUB + sub) as usize
}

/// The first microsecond value of bucket `i`.
fn bucket_lower(i: usize) -> u64 {
    let i = i as u64;
    if i < SUB {
        return i;
    }
    let exp = (i - SUB) / SUB; // power of two above 2^SUB_BITS
    let sub = (i - SUB) % SUB;
    (SUB + sub) << exp
}

/// The first microsecond value past bucket `i` (`u64::MAX` for the last).
fn bucket_upper(i: usize) -> u64 {
    if i + 1 >= BUCKETS {
        u64::MAX
    } else {
        bucket_lower(i + 1)
    }
}

/// A latency histogram the engine records into from any thread (relaxed
/// atomics, fixed buckets: no lock, no allocation).
pub(crate) struct AtomicHistogram {
    buckets: [AtomicU64; BUCKETS],
    /// Sum of the recorded latencies in µs (for the mean).
    sum_us: AtomicU64,
    /// The largest latency in ns (exact).
    max_ns: AtomicU64,
}

impl AtomicHistogram {
    pub(crate) fn new() -> AtomicHistogram {
        AtomicHistogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_us: AtomicU64::new(0),
            max_ns: AtomicU64::new(0),
        }
    }

    #[cfg(test)]
    /// Records one latency.
    #[inline]
    pub(crate) fn record(&self, latency: Duration) {
        self.record_n(latency, 1);
    }

    /// Records `n` replies of the same latency (those that went out in one
    /// write and came back in one read).
    #[inline]
    pub(crate) fn record_n(&self, latency: Duration, n: u64) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        let us = ns / 1000;
        self.buckets[bucket_of(us)].fetch_add(n, Relaxed);
        self.sum_us.fetch_add(us.saturating_mul(n), Relaxed);
        self.max_ns.fetch_max(ns, Relaxed);
    }

    /// A copy of the counts, summarized.
    pub(crate) fn snapshot(&self) -> LatencySummary {
        let buckets: Box<[u64]> = self.buckets.iter().map(|b| b.load(Relaxed)).collect();
        LatencySummary::from_parts(
            buckets,
            self.sum_us.load(Relaxed),
            Duration::from_nanos(self.max_ns.load(Relaxed)),
        )
    }
}

impl fmt::Debug for AtomicHistogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.snapshot(), f)
    }
}

/// Latencies of a host's replies: count, quantiles, maximum, and the
/// histogram they were read from.
///
/// A latency runs from when a request was written to when its reply was
/// read; an auto-batched MGET/MSET is one latency.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LatencySummary {
    /// Latencies recorded.
    pub count: u64,
    /// Median (see [`LatencySummary::quantile`]).
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// The largest latency, exact.
    pub max: Duration,
    /// The mean, to the microsecond.
    pub mean: Duration,
    buckets: Box<[u64]>,
    sum_us: u64,
}

impl Default for LatencySummary {
    fn default() -> LatencySummary {
        LatencySummary::from_parts(vec![0; BUCKETS].into_boxed_slice(), 0, Duration::ZERO)
    }
}

impl fmt::Debug for LatencySummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LatencySummary")
            .field("count", &self.count)
            .field("p50", &self.p50)
            .field("p99", &self.p99)
            .field("max", &self.max)
            .field("mean", &self.mean)
            .finish_non_exhaustive()
    }
}

impl LatencySummary {
    fn from_parts(buckets: Box<[u64]>, sum_us: u64, max: Duration) -> LatencySummary {
        let count = buckets.iter().fold(0u64, |a, &b| a.saturating_add(b));
        let mut s = LatencySummary {
            count,
            p50: Duration::ZERO,
            p99: Duration::ZERO,
            max,
            mean: Duration::ZERO,
            buckets,
            sum_us,
        };
        s.p50 = s.quantile(0.5);
        s.p99 = s.quantile(0.99);
        s.mean = match count {
            0 => Duration::ZERO,
            n => Duration::from_micros(sum_us / n),
        };
        s
    }

    /// The latency below which a fraction `q` (0.0 to 1.0) of the replies
    /// came: the upper bound of the bucket that holds the `ceil(q * count)`-th
    /// smallest latency, capped at the maximum. At most one bucket above
    /// the true value. Zero when nothing was recorded; `q` outside `0..=1`
    /// is clamped (NaN counts as 0).
    pub fn quantile(&self, q: f64) -> Duration {
        if self.count == 0 {
            return Duration::ZERO;
        }
        let q = if q.is_nan() { 0.0 } else { q.clamp(0.0, 1.0) };
        // `as` saturates; the rank is 1-based.
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0u64;
        for (i, &n) in self.buckets.iter().enumerate() {
            seen = seen.saturating_add(n);
            if seen >= rank {
                return Duration::from_micros(bucket_upper(i)).min(self.max);
            }
        }
        self.max
    }

    /// The histogram, for export: every bucket in order as `(upper bound,
    /// count)`, where the upper bound is exclusive and [`Duration::MAX`]
    /// for the last bucket. Counts are per bucket, not cumulative (for
    /// Prometheus' `le` buckets, add them up as you go).
    pub fn buckets(&self) -> impl Iterator<Item = (Duration, u64)> + '_ {
        self.buckets.iter().enumerate().map(|(i, &n)| {
            let upper = match bucket_upper(i) {
                u64::MAX => Duration::MAX,
                us => Duration::from_micros(us),
            };
            (upper, n)
        })
    }

    /// Adds another histogram's counts to this one (for totals).
    fn merge(&mut self, other: &LatencySummary) {
        let buckets: Box<[u64]> = self
            .buckets
            .iter()
            .zip(other.buckets.iter())
            .map(|(a, b)| a.saturating_add(*b))
            .collect();
        *self = LatencySummary::from_parts(
            buckets,
            self.sum_us.saturating_add(other.sum_us),
            self.max.max(other.max),
        );
    }
}

// ---------------------------------------------------------------------------
// Counters.

/// One host's live counters, shared (in an `Arc`) by everything that talks
/// to the host. Every method is a few relaxed atomic operations: no lock,
/// no allocation.
///
/// # Wiring (for the engine)
///
/// - `commands_sent(n)` when `n` commands are written to the host's
///   connection (wire commands: an auto-batched MGET is one; handshake
///   commands and the driver's health `PING`s are not counted). Also
///   raises `in_flight` by `n`.
/// - `reply_received(latency, server_error)` for each reply to a counted
///   command, `latency` from its write to its reply; `server_error` for
///   an error reply. Lowers `in_flight` by one.
/// - `requests_timed_out(n)` for counted commands rejected by a deadline,
///   `requests_failed(n)` for counted commands rejected otherwise without
///   a reply (connection lost, cancelled). Both lower `in_flight`.
/// - `connected()` for each connection established (returns whether it is
///   a reconnect, for [`HostEvent::Connected`]); `connection_failed()`
///   once per connect that failed or established connection that broke.
/// - `bytes_read(n)` / `bytes_written(n)` after each socket read/write.
/// - `snapshot(health)` for `cluster.stats()`.
pub(crate) struct HostCounters {
    commands: AtomicU64,
    replies: AtomicU64,
    server_errors: AtomicU64,
    timeouts: AtomicU64,
    connection_failures: AtomicU64,
    connections: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    /// Signed so that a stray extra decrement reads as 0, not 2^64 - 1.
    in_flight: AtomicI64,
    latency: AtomicHistogram,
}

impl Default for HostCounters {
    fn default() -> HostCounters {
        HostCounters::new()
    }
}

impl fmt::Debug for HostCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostCounters")
            .field("commands", &self.commands.load(Relaxed))
            .field("replies", &self.replies.load(Relaxed))
            .field("in_flight", &self.in_flight.load(Relaxed))
            .finish_non_exhaustive()
    }
}

/// `n` as the signed gauge's step.
fn gauge(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl HostCounters {
    /// All zero.
    pub(crate) fn new() -> HostCounters {
        HostCounters {
            commands: AtomicU64::new(0),
            replies: AtomicU64::new(0),
            server_errors: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            connection_failures: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            in_flight: AtomicI64::new(0),
            latency: AtomicHistogram::new(),
        }
    }

    /// `n` commands were written; they are in flight until answered or
    /// given up.
    #[inline]
    pub(crate) fn commands_sent(&self, n: u64) {
        self.commands.fetch_add(n, Relaxed);
        self.in_flight.fetch_add(gauge(n), Relaxed);
    }

    #[cfg(test)]
    /// A reply to a sent command arrived after `latency`.
    #[inline]
    pub(crate) fn reply_received(&self, latency: Duration, server_error: bool) {
        self.replies.fetch_add(1, Relaxed);
        if server_error {
            self.server_errors.fetch_add(1, Relaxed);
        }
        self.in_flight.fetch_sub(1, Relaxed);
        self.latency.record(latency);
    }

    /// `n` replies arrived after `latency` (one write's worth, read in one
    /// turn), `server_errors` of them error replies.
    #[inline]
    pub(crate) fn replies_received(&self, latency: Duration, n: u64, server_errors: u64) {
        self.replies.fetch_add(n, Relaxed);
        if server_errors > 0 {
            self.server_errors.fetch_add(server_errors, Relaxed);
        }
        self.in_flight.fetch_sub(gauge(n), Relaxed);
        self.latency.record_n(latency, n);
    }

    /// `n` requests passed their own deadline while staying in the
    /// pipeline (the driver keeps the connection: their late replies still
    /// count as replies, so they stay in flight).
    #[inline]
    pub(crate) fn deadline_passed(&self, n: u64) {
        self.timeouts.fetch_add(n, Relaxed);
    }

    /// `n` sent commands were rejected by a deadline.
    #[inline]
    pub(crate) fn requests_timed_out(&self, n: u64) {
        self.timeouts.fetch_add(n, Relaxed);
        self.in_flight.fetch_sub(gauge(n), Relaxed);
    }

    /// `n` sent commands were rejected without a reply for another reason
    /// than a deadline (connection lost, cancelled).
    #[inline]
    pub(crate) fn requests_failed(&self, n: u64) {
        self.in_flight.fetch_sub(gauge(n), Relaxed);
    }

    /// A connection was established; true when it is not the host's first.
    #[inline]
    pub(crate) fn connected(&self) -> bool {
        self.connections.fetch_add(1, Relaxed) > 0
    }

    /// A connect failed, or an established connection broke.
    #[inline]
    pub(crate) fn connection_failed(&self) {
        self.connection_failures.fetch_add(1, Relaxed);
    }

    /// `n` bytes were read from the host.
    #[inline]
    pub(crate) fn bytes_read(&self, n: u64) {
        self.bytes_in.fetch_add(n, Relaxed);
    }

    /// `n` bytes were written to the host.
    #[inline]
    pub(crate) fn bytes_written(&self, n: u64) {
        self.bytes_out.fetch_add(n, Relaxed);
    }

    #[cfg(test)]
    /// Records a latency without counting a reply (`reply_received` does
    /// both).
    #[inline]
    pub(crate) fn record_latency(&self, latency: Duration) {
        self.latency.record(latency);
    }

    /// The counters now, with the host's name and health filled in.
    pub(crate) fn snapshot(&self, host: HostName, health: HostHealth) -> HostStats {
        let connections = self.connections.load(Relaxed);
        HostStats {
            host,
            commands: self.commands.load(Relaxed),
            replies: self.replies.load(Relaxed),
            server_errors: self.server_errors.load(Relaxed),
            timeouts: self.timeouts.load(Relaxed),
            connection_failures: self.connection_failures.load(Relaxed),
            connections,
            reconnects: connections.saturating_sub(1),
            bytes_in: self.bytes_in.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
            in_flight: u64::try_from(self.in_flight.load(Relaxed)).unwrap_or(0),
            latency: self.latency.snapshot(),
            health,
        }
    }
}

// ---------------------------------------------------------------------------
// Snapshots.

/// One host's statistics at the time of the snapshot. Counters count since
/// the host was added to the cluster.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct HostStats {
    /// The host (id and address).
    pub host: HostName,
    /// Commands written to the host (an auto-batched MGET/MSET counts once;
    /// connection handshakes and health probes do not count).
    pub commands: u64,
    /// Replies read, server error replies included.
    pub replies: u64,
    /// Error replies (`-ERR`, `-WRONGTYPE`, ...), a part of `replies`.
    pub server_errors: u64,
    /// Commands rejected because a deadline passed.
    pub timeouts: u64,
    /// Connects that failed and established connections that broke
    /// (refused, reset, closed, TLS failure).
    pub connection_failures: u64,
    /// Connections established.
    pub connections: u64,
    /// Connections established after the first (`connections - 1`).
    pub reconnects: u64,
    /// Bytes read from the host.
    pub bytes_in: u64,
    /// Bytes written to the host.
    pub bytes_out: u64,
    /// Commands written and neither answered nor given up yet (a gauge).
    pub in_flight: u64,
    /// Reply latencies.
    pub latency: LatencySummary,
    /// Up or Down.
    pub health: HostHealth,
}

/// Every host's statistics: what `cluster.stats()` returns.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct ClusterStats {
    /// Per host, by id.
    pub hosts: BTreeMap<HostId, HostStats>,
    /// What a migrating cluster did on behalf of the move (`None` for a
    /// cluster that is not migrating).
    pub migration: Option<MigrationStats>,
}

/// A migrating cluster's extra work (see
/// [`ClusterBuilder::migrating_from`](crate::ClusterBuilder::migrating_from)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MigrationStats {
    /// Reads that missed on the new owner and asked the old one.
    pub fallback_reads: u64,
    /// Of those, the ones the old owner answered (the key had not moved yet).
    pub fallback_hits: u64,
    /// Reads that missed on both owners and asked the new owner again (the
    /// key may have moved between the two reads): only while the old
    /// owner's keys change.
    pub rechecks: u64,
    /// Keys moved to their new owner before a command modified them.
    pub moved_on_write: u64,
    /// Keys copied to their new owner after a read found them on the old
    /// one ([`ClusterBuilder::copy_forward`](crate::ClusterBuilder::copy_forward)).
    pub copied_forward: u64,
    /// Copy-forward moves that failed (the reads still answered).
    pub copy_forward_failures: u64,
}

/// The counters behind [`MigrationStats`].
#[derive(Debug, Default)]
pub(crate) struct MigrationCounters {
    pub(crate) fallback_reads: AtomicU64,
    pub(crate) fallback_hits: AtomicU64,
    pub(crate) rechecks: AtomicU64,
    pub(crate) moved_on_write: AtomicU64,
    pub(crate) copied_forward: AtomicU64,
    pub(crate) copy_forward_failures: AtomicU64,
}

impl MigrationCounters {
    pub(crate) fn snapshot(&self) -> MigrationStats {
        MigrationStats {
            fallback_reads: self.fallback_reads.load(Relaxed),
            fallback_hits: self.fallback_hits.load(Relaxed),
            rechecks: self.rechecks.load(Relaxed),
            moved_on_write: self.moved_on_write.load(Relaxed),
            copied_forward: self.copied_forward.load(Relaxed),
            copy_forward_failures: self.copy_forward_failures.load(Relaxed),
        }
    }
}

impl FromIterator<HostStats> for ClusterStats {
    fn from_iter<I: IntoIterator<Item = HostStats>>(hosts: I) -> ClusterStats {
        ClusterStats {
            hosts: hosts.into_iter().map(|h| (h.host.id, h)).collect(),
            migration: None,
        }
    }
}

impl ClusterStats {
    /// One host's statistics.
    pub fn host(&self, id: HostId) -> Option<&HostStats> {
        self.hosts.get(&id)
    }

    /// The sums over every host, with their latencies merged into one
    /// histogram.
    pub fn totals(&self) -> TotalStats {
        let mut t = TotalStats::default();
        for h in self.hosts.values() {
            t.hosts += 1;
            t.hosts_down += usize::from(!h.health.is_up());
            t.commands = t.commands.saturating_add(h.commands);
            t.replies = t.replies.saturating_add(h.replies);
            t.server_errors = t.server_errors.saturating_add(h.server_errors);
            t.timeouts = t.timeouts.saturating_add(h.timeouts);
            t.connection_failures = t.connection_failures.saturating_add(h.connection_failures);
            t.connections = t.connections.saturating_add(h.connections);
            t.reconnects = t.reconnects.saturating_add(h.reconnects);
            t.bytes_in = t.bytes_in.saturating_add(h.bytes_in);
            t.bytes_out = t.bytes_out.saturating_add(h.bytes_out);
            t.in_flight = t.in_flight.saturating_add(h.in_flight);
            t.latency.merge(&h.latency);
        }
        t
    }
}

/// The sums of every host's [`HostStats`] (see [`ClusterStats::totals`]).
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct TotalStats {
    /// Hosts in the snapshot.
    pub hosts: usize,
    /// Hosts that are Down.
    pub hosts_down: usize,
    /// As [`HostStats::commands`], summed.
    pub commands: u64,
    /// As [`HostStats::replies`], summed.
    pub replies: u64,
    /// As [`HostStats::server_errors`], summed.
    pub server_errors: u64,
    /// As [`HostStats::timeouts`], summed.
    pub timeouts: u64,
    /// As [`HostStats::connection_failures`], summed.
    pub connection_failures: u64,
    /// As [`HostStats::connections`], summed.
    pub connections: u64,
    /// As [`HostStats::reconnects`], summed.
    pub reconnects: u64,
    /// As [`HostStats::bytes_in`], summed.
    pub bytes_in: u64,
    /// As [`HostStats::bytes_out`], summed.
    pub bytes_out: u64,
    /// As [`HostStats::in_flight`], summed.
    pub in_flight: u64,
    /// Every host's latencies in one histogram.
    pub latency: LatencySummary,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn name(id: HostId) -> HostName {
        HostName {
            id,
            addr: format!("127.0.0.1:{}/0", 6379 + id).into(),
        }
    }

    /// xorshift64*: test data without a rand crate.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        /// Uniform in [0, 1).
        fn unit(&mut self) -> f64 {
            (self.next() >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    #[test]
    fn bucket_layout_is_contiguous_and_log_linear() {
        assert_eq!(BUCKETS, 369);
        assert_eq!(bucket_lower(0), 0);
        for i in 0..BUCKETS - 1 {
            let (lo, hi) = (bucket_lower(i), bucket_upper(i));
            assert!(lo < hi, "bucket {i}");
            assert_eq!(bucket_of(lo), i);
            assert_eq!(bucket_of(hi - 1), i);
            assert_eq!(bucket_of(hi), i + 1);
            // Width at most 1 µs or 1/16 of the bucket's values.
            assert!(
                hi - lo == 1 || (hi - lo) * SUB <= lo,
                "bucket {i}: {lo}..{hi}"
            );
        }
        assert_eq!(bucket_lower(BUCKETS - 1), 1 << TOP_EXP);
        assert_eq!(bucket_upper(BUCKETS - 1), u64::MAX);
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
        // ~67 s is the last finite bound.
        assert_eq!(
            Duration::from_micros(bucket_upper(BUCKETS - 2)).as_secs(),
            67
        );
    }

    /// Feeds `samples` (ns) and checks p50, p99, max and mean against the
    /// sorted truth.
    fn check_accuracy(what: &str, mut samples: Vec<u64>) {
        let h = AtomicHistogram::new();
        for &ns in &samples {
            h.record(Duration::from_nanos(ns));
        }
        let s = h.snapshot();
        samples.sort_unstable();
        let n = samples.len() as u64;
        assert_eq!(s.count, n, "{what}");
        assert_eq!(
            s.max,
            Duration::from_nanos(*samples.last().unwrap()),
            "{what}"
        );
        for q in [0.0, 0.01, 0.25, 0.5, 0.9, 0.99, 0.999, 1.0] {
            let rank = ((q * n as f64).ceil() as u64).clamp(1, n);
            let truth = samples[(rank - 1) as usize];
            let got = s.quantile(q);
            // Within the true value's bucket: not below the value, not
            // past the bucket's end.
            let b = bucket_of(truth / 1000);
            assert!(
                got >= Duration::from_nanos(truth) && got <= Duration::from_micros(bucket_upper(b)),
                "{what}: q {q}: got {got:?}, true {truth} ns (bucket {}..{} µs)",
                bucket_lower(b),
                bucket_upper(b)
            );
        }
        assert_eq!(s.p50, s.quantile(0.5));
        assert_eq!(s.p99, s.quantile(0.99));
        assert_eq!(s.quantile(1.0), s.max);
        let mean_us = samples.iter().map(|ns| ns / 1000).sum::<u64>() / n;
        assert_eq!(s.mean, Duration::from_micros(mean_us), "{what}");
    }

    #[test]
    fn quantiles_are_within_one_bucket() {
        let mut rng = Rng(0x1234_5678);
        let n = 100_000;
        check_accuracy("constant 250 µs", vec![250_000; 1000]);
        check_accuracy(
            "uniform 1 µs..10 ms",
            (0..n).map(|_| 1_000 + rng.next() % 10_000_000).collect(),
        );
        check_accuracy(
            "log-uniform 100 ns..100 s",
            (0..n)
                .map(|_| (100.0 * 1e9f64.powf(rng.unit())) as u64)
                .collect(),
        );
        check_accuracy(
            "exponential, mean 300 µs",
            (0..n)
                .map(|_| (-300_000.0 * (1.0 - rng.unit()).ln()) as u64)
                .collect(),
        );
        // Mostly fast, a slow tail of 2 %: p99 must land in the tail.
        check_accuracy(
            "bimodal",
            (0..n)
                .map(|i| {
                    if i % 50 == 0 {
                        40_000_000 + rng.next() % 1_000_000
                    } else {
                        50_000 + rng.next() % 5_000
                    }
                })
                .collect(),
        );
        check_accuracy("sub-microsecond", vec![1, 10, 999, 500]);
        check_accuracy("overflow", vec![1_000, 90_000_000_000, u64::MAX]);
        check_accuracy("one", vec![1_234_567]);
    }

    #[test]
    fn empty_and_odd_quantiles() {
        let s = AtomicHistogram::new().snapshot();
        assert_eq!(s, LatencySummary::default());
        assert_eq!(
            (s.count, s.p50, s.p99, s.max, s.mean),
            (
                0,
                Duration::ZERO,
                Duration::ZERO,
                Duration::ZERO,
                Duration::ZERO
            )
        );
        assert_eq!(s.quantile(0.5), Duration::ZERO);
        let h = AtomicHistogram::new();
        h.record(Duration::from_micros(100));
        h.record(Duration::from_micros(900));
        h.record(Duration::MAX);
        let s = h.snapshot();
        assert_eq!(s.quantile(f64::NAN), s.quantile(0.0));
        assert_eq!(s.quantile(-3.0), s.quantile(0.0));
        assert_eq!(s.quantile(7.0), s.max);
        assert_eq!(s.quantile(f64::INFINITY), s.max);
        assert_eq!(s.max, Duration::from_nanos(u64::MAX));
        assert!(format!("{s:?}").starts_with("LatencySummary { count: 3, p50: "));
    }

    #[test]
    fn buckets_export_every_count_in_order() {
        let h = AtomicHistogram::new();
        for us in [0, 3, 3, 17, 1_000, 1_000_000, 100_000_000] {
            h.record(Duration::from_micros(us));
        }
        let s = h.snapshot();
        let buckets: Vec<(Duration, u64)> = s.buckets().collect();
        assert_eq!(buckets.len(), BUCKETS);
        assert!(buckets.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(buckets.last().unwrap().0, Duration::MAX);
        assert_eq!(buckets.iter().map(|b| b.1).sum::<u64>(), s.count);
        assert_eq!(buckets[0], (Duration::from_micros(1), 1));
        assert_eq!(buckets[3], (Duration::from_micros(4), 2));
        assert_eq!(buckets[BUCKETS - 1].1, 1);
        let at = |us: u64| {
            buckets
                .iter()
                .find(|(upper, _)| *upper > Duration::from_micros(us))
                .unwrap()
                .1
        };
        assert_eq!(at(1_000), 1);
        assert_eq!(at(1_000_000), 1);
    }

    #[test]
    fn counters_track_a_host() {
        let c = HostCounters::new();
        assert!(!c.connected());
        c.commands_sent(5);
        c.bytes_written(120);
        c.reply_received(Duration::from_micros(80), false);
        c.reply_received(Duration::from_micros(120), true);
        c.requests_timed_out(2);
        c.bytes_read(64);
        c.connection_failed();
        assert!(c.connected());
        assert!(c.connected());
        c.record_latency(Duration::from_millis(3));
        let s = c.snapshot(name(4), HostHealth::Up);
        assert_eq!(s.host, name(4));
        assert_eq!(
            (
                s.commands,
                s.replies,
                s.server_errors,
                s.timeouts,
                s.connection_failures,
                s.connections,
                s.reconnects,
                s.bytes_in,
                s.bytes_out,
                s.in_flight,
            ),
            (5, 2, 1, 2, 1, 3, 2, 64, 120, 1)
        );
        assert_eq!(s.latency.count, 3);
        assert_eq!(s.latency.max, Duration::from_millis(3));
        assert!(s.health.is_up());
        c.requests_failed(1);
        assert_eq!(c.snapshot(name(4), HostHealth::Up).in_flight, 0);
        // A stray extra decrement reads as zero, not 2^64 - 1.
        c.requests_failed(1);
        assert_eq!(c.snapshot(name(4), HostHealth::Up).in_flight, 0);
        assert!(format!("{c:?}").starts_with("HostCounters { commands: 5, replies: 2"));
    }

    #[test]
    fn concurrent_updates_sum_exactly() {
        let c = Arc::new(HostCounters::new());
        let threads = 8u64;
        let per = 20_000u64;
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for i in 0..per {
                        c.commands_sent(1);
                        c.bytes_written(10);
                        c.bytes_read(7);
                        c.reply_received(Duration::from_micros(t * 1000 + i % 1000), i % 10 == 0);
                    }
                    c.connected();
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let s = c.snapshot(name(0), HostHealth::Up);
        let n = threads * per;
        assert_eq!(s.commands, n);
        assert_eq!(s.replies, n);
        assert_eq!(s.server_errors, n / 10);
        assert_eq!(s.bytes_out, 10 * n);
        assert_eq!(s.bytes_in, 7 * n);
        assert_eq!(s.in_flight, 0);
        assert_eq!(s.connections, threads);
        assert_eq!(s.reconnects, threads - 1);
        assert_eq!(s.latency.count, n);
        assert_eq!(
            s.latency.max,
            Duration::from_micros((threads - 1) * 1000 + 999)
        );
    }

    #[test]
    fn cluster_totals_merge_hosts() {
        let a = HostCounters::new();
        let b = HostCounters::new();
        for us in 1..=100 {
            a.commands_sent(1);
            a.reply_received(Duration::from_micros(us), false);
        }
        b.commands_sent(3);
        b.reply_received(Duration::from_millis(50), false);
        let down = HostHealth::Down {
            since: std::time::Instant::now(),
            retry_at: std::time::Instant::now(),
            last_error: Error::config("x"),
        };
        let stats: ClusterStats = [
            a.snapshot(name(0), HostHealth::Up),
            b.snapshot(name(1), down),
        ]
        .into_iter()
        .collect();
        assert_eq!(stats.hosts.keys().copied().collect::<Vec<_>>(), [0, 1]);
        assert_eq!(stats.host(1).unwrap().commands, 3);
        assert!(stats.host(2).is_none());
        let t = stats.totals();
        assert_eq!((t.hosts, t.hosts_down), (2, 1));
        assert_eq!((t.commands, t.replies, t.in_flight), (103, 101, 2));
        assert_eq!(t.latency.count, 101);
        assert_eq!(t.latency.max, Duration::from_millis(50));
        assert_eq!(t.latency.p50, Duration::from_micros(52)); // 51st of 101, bucket 51 µs..52 µs
        assert_eq!(t.latency.mean, Duration::from_micros((5050 + 50_000) / 101));
        let empty = ClusterStats::default().totals();
        assert_eq!((empty.hosts, empty.latency.count), (0, 0));
    }

    #[test]
    fn closures_observe_events() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let observer: Arc<dyn Observer> = Arc::new(move |e: &HostEvent| {
            sink.lock().unwrap().push(format!("{}", e.host()));
        });
        let events = [
            HostEvent::Connected {
                host: name(0),
                reconnect: false,
            },
            HostEvent::Failed {
                host: name(1),
                error: Error::config("x"),
            },
            HostEvent::Down {
                host: name(2),
                retry_in: Duration::from_millis(400),
                error: Error::config("x"),
                after_probe: false,
            },
            HostEvent::Up {
                host: name(3),
                down_for: Duration::from_secs(1),
            },
        ];
        for e in &events {
            observer.on_event(e);
        }
        assert_eq!(
            *seen.lock().unwrap(),
            [
                "host 0 (127.0.0.1:6379/0)",
                "host 1 (127.0.0.1:6380/0)",
                "host 2 (127.0.0.1:6381/0)",
                "host 3 (127.0.0.1:6382/0)"
            ]
        );
    }
}
