//! Per-host health: a circuit breaker that makes requests to a dead host
//! fail at once instead of each waiting for its own connect timeout.
//!
//! Every host has one health state, shared by maps, clients and the
//! background driver. It works like this (see [`HealthPolicy`] for the
//! numbers):
//!
//! - **Up**: requests go through. Connect failures, connection errors and
//!   timeouts are counted; a success resets the count, so a host that fails
//!   now and then (flaps) is never taken Down by failures spread over time.
//!   Server error replies (`-ERR`, `-WRONGTYPE`, ...) never count: the host
//!   answered.
//! - After [`failures`](HealthPolicy::failures) consecutive counted failures
//!   the host is **Down** for [`open_for`](HealthPolicy::open_for) (less up
//!   to 20 % jitter). While Down, requests to it fail at once with
//!   [`Error::HostDown`], which says since when the host is down, when it is
//!   tried again and what the last failure was. No connect is attempted.
//! - At the retry time exactly one request (or the background driver, with a
//!   `PING`) **probes** the host; everyone else keeps getting
//!   [`Error::HostDown`] until the probe reports. A successful probe makes
//!   the host Up; a failed one makes it Down again for twice as long, up to
//!   [`max_open_for`](HealthPolicy::max_open_for).
//!
//! Keys never move to another host while one is Down (as in Python rb):
//! requests for its keys fail fast until it is back.
//!
//! Times are [`Instant`]s (monotonic), so a Down host's `since` and
//! `retry_at` can be compared with `Instant::now()`; for a wall-clock time
//! use `SystemTime::now() - since.elapsed()`.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::{Error, HostName, Result};
use crate::stats::HostEvent;

/// When a host is taken Down and when it is tried again (the circuit
/// breaker's settings). Set with the cluster builder; the defaults suit
/// most fleets.
///
/// ```
/// use rb::HealthPolicy;
/// use std::time::Duration;
/// let policy = HealthPolicy::new()
///     .failures(5)
///     .open_for(Duration::from_millis(200))
///     .max_open_for(Duration::from_secs(10));
/// let off = HealthPolicy::disabled();
/// # let _ = (policy, off);
/// ```
///
/// **Jitter**: each Down period is shortened by a random 0 to 20 %, so that
/// many clients that saw the same outage do not probe in lock step. The
/// durations set here are therefore upper bounds: a host is first tried
/// again at most `open_for` after it went Down, and never waits more than
/// `max_open_for` between probes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthPolicy {
    pub(crate) enabled: bool,
    pub(crate) failures: u32,
    pub(crate) open_for: Duration,
    pub(crate) max_open_for: Duration,
}

impl Default for HealthPolicy {
    fn default() -> HealthPolicy {
        HealthPolicy {
            enabled: true,
            failures: 3,
            open_for: Duration::from_millis(500),
            max_open_for: Duration::from_secs(5),
        }
    }
}

impl HealthPolicy {
    /// The defaults: Down after 3 consecutive failures, for 500 ms,
    /// doubling with each failed probe up to 5 s.
    pub fn new() -> HealthPolicy {
        HealthPolicy::default()
    }

    /// No circuit breaker: every request is tried, whatever happened
    /// before, and every host always reports [`HostHealth::Up`]. The other
    /// settings are ignored.
    pub fn disabled() -> HealthPolicy {
        HealthPolicy {
            enabled: false,
            ..HealthPolicy::default()
        }
    }

    /// Consecutive counted failures (connect failures, connection errors,
    /// timeouts) that take a host Down. Default 3; must be at least 1.
    #[must_use]
    pub fn failures(mut self, failures: u32) -> HealthPolicy {
        self.failures = failures;
        self
    }

    /// How long a host stays Down before it is first probed. Default
    /// 500 ms; must be more than zero.
    #[must_use]
    pub fn open_for(mut self, open_for: Duration) -> HealthPolicy {
        self.open_for = open_for;
        self
    }

    /// The longest Down period: each failed probe doubles the period up to
    /// this. Default 5 s; must be at least `open_for`.
    #[must_use]
    pub fn max_open_for(mut self, max_open_for: Duration) -> HealthPolicy {
        self.max_open_for = max_open_for;
        self
    }

    /// False for [`HealthPolicy::disabled`].
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Checks the settings (a disabled policy is always fine).
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for `failures(0)`, a zero `open_for`, or a
    /// `max_open_for` shorter than `open_for`.
    pub(crate) fn validate(&self) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        if self.failures == 0 {
            return Err(Error::config(
                "health policy: failures must be at least 1 \
                 (HealthPolicy::disabled() turns health tracking off)",
            ));
        }
        if self.open_for.is_zero() {
            return Err(Error::config(
                "health policy: open_for must be more than zero",
            ));
        }
        if self.max_open_for < self.open_for {
            return Err(Error::config(format!(
                "health policy: max_open_for ({:?}) is shorter than open_for ({:?})",
                self.max_open_for, self.open_for
            )));
        }
        Ok(())
    }
}

/// A host's health, as [`Cluster::health`](crate::Cluster) and the stats
/// report it.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum HostHealth {
    /// Requests go through.
    Up,
    /// Requests fail at once with [`Error::HostDown`] until a probe
    /// succeeds.
    Down {
        /// When the outage began: when the host went Down, kept across
        /// failed probes.
        since: Instant,
        /// When the host is probed next (in the past while a probe is
        /// under way).
        retry_at: Instant,
        /// The failure that took the host Down, or that made its last
        /// probe fail.
        last_error: Error,
    },
}

impl HostHealth {
    /// True for [`HostHealth::Up`].
    pub fn is_up(&self) -> bool {
        matches!(self, HostHealth::Up)
    }
}

/// Whether a request may go to its host: what
/// [`HostHealthState::admit`] says.
#[derive(Debug)]
pub(crate) enum Admission {
    /// The host is Up: send it.
    Go,
    /// The host is Down and this request is its one probe: send it, and
    /// report the outcome (`record_success` / `record_failure`, or
    /// `release_probe` when it ends with neither).
    Probe,
    /// The host is Down: fail the request with this [`Error::HostDown`]
    /// without connecting.
    Refuse(Error),
}

/// Whether a failure counts toward taking its host Down.
///
/// Counted: [`Error::Connection`] (refused, reset, closed), [`Error::Timeout`]
/// (any phase) and [`Error::Tls`] (the host cannot be reached). Not counted:
/// server error replies (the host answered), protocol errors (one reply
/// that broke a limit, e.g. a value larger than `max_reply_bytes`, says
/// nothing about the host), and everything about the request itself
/// (`Unroutable`, `Unsupported`, `Type`, `Config`, ...), nor
/// [`Error::HostDown`] (a refusal must not prolong the outage).
pub(crate) fn counts(e: &Error) -> bool {
    matches!(
        e,
        Error::Connection { .. } | Error::Timeout { .. } | Error::Tls { .. }
    )
}

/// `mode`: Up with no failure counted; the fast path's only load.
const UP: u8 = 0;
/// `mode`: Up with failures counted (a success must reset them).
const SUSPECT: u8 = 1;
/// `mode`: Down (the mutex says since when, the retry time, the probe).
const DOWN: u8 = 2;

/// One host's health, shared (in an `Arc`) by every session, client and
/// the driver that talk to the host.
///
/// Sans-IO: it never reads the clock; every method that needs the time takes
/// `now`. Cheap on the hot path: while the host is Up, [`admit`](Self::admit)
/// is one atomic load and [`record_success`](Self::record_success) is one
/// atomic load (no write) unless failures were counted; the mutex is taken
/// only for failures, transitions, and requests to a Down host.
///
/// # Wiring (for the engine)
///
/// - Before a request is queued for the host (before a connection is checked
///   out or opened): `admit(now)`. `Go`: proceed. `Refuse(e)`: reject the
///   request with `e` and do nothing else for it (no connect, no stats
///   other than what the caller wants to count as refused). `Probe`: proceed
///   as `Go`, but remember that this request carries the probe.
/// - Once per *attempt* that failed, not once per request it took down:
///   `record_failure(&e, now)` when a connect fails or times out, when an
///   established connection breaks (reset, closed, TLS failure), and when a
///   request's read/write deadline passes. A connection lost with 100
///   requests on it is one failure. Errors that do not count
///   ([`counts`]) are ignored, so passing every error is safe.
/// - On evidence the host works: `record_success(now)` when a reply (any
///   reply, server error replies included) arrives, or when a connection's
///   handshake completes. Cheap enough to call on every reply.
/// - A probe that ends with neither (its map was cancelled, its `Reply`
///   dropped before the outcome): `release_probe()`, so the next request
///   probes. A probe that never reports is given up after `max_open_for`.
/// - The background driver: `next_probe_at()` for its poll timeout, then
///   `take_probe(now)`; when it returns true, send a `PING` and report
///   its outcome as above. Recovery then needs no user request.
/// - `record_failure` / `record_success` return the transition, if any
///   ([`HostEvent::Down`], [`HostEvent::Up`]), for the observer. Call the
///   observer after these methods return (they hold no lock then).
///
/// A failure reported while the host is Down and a probe is under way is
/// taken as the probe's failure, even when it came from a request admitted
/// before the outage (a connect started earlier that timed out now): the
/// period then doubles once too early. A late success makes the host Up,
/// which is right: the host answered.
#[derive(Debug)]
pub(crate) struct HostHealthState {
    host: HostName,
    policy: HealthPolicy,
    /// `UP`, `SUSPECT` or `DOWN`; written only under `inner`'s lock.
    mode: AtomicU8,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Consecutive counted failures while Up.
    consecutive: u32,
    /// Set while Down.
    outage: Option<Outage>,
    /// splitmix64 state for the jitter.
    rng: u64,
}

#[derive(Debug)]
struct Outage {
    since: Instant,
    retry_at: Instant,
    /// The current Down period before jitter (doubles per failed probe).
    period: Duration,
    last_error: Arc<Error>,
    /// When the probe under way was handed out.
    probe: Option<Instant>,
}

impl HostHealthState {
    /// The state of a host that is Up, with jitter seeded from the host and
    /// the process's random hash keys.
    pub(crate) fn new(host: HostName, policy: HealthPolicy) -> HostHealthState {
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u32(host.id);
        hasher.write(host.addr.as_bytes());
        let seed = hasher.finish();
        HostHealthState::with_seed(host, policy, seed)
    }

    /// As `new`, with a chosen jitter seed (for tests).
    pub(crate) fn with_seed(host: HostName, policy: HealthPolicy, seed: u64) -> HostHealthState {
        HostHealthState {
            host,
            policy,
            mode: AtomicU8::new(UP),
            inner: Mutex::new(Inner {
                consecutive: 0,
                outage: None,
                rng: seed,
            }),
        }
    }

    /// The host this state is about.
    pub(crate) fn host(&self) -> &HostName {
        &self.host
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// How long a probe may stay out without reporting before another is
    /// handed out.
    fn probe_lease(&self) -> Duration {
        self.policy.max_open_for
    }

    /// Whether a request may go to the host now (see [`Admission`]).
    #[inline]
    pub(crate) fn admit(&self, now: Instant) -> Admission {
        if self.mode.load(Ordering::Acquire) != DOWN {
            return Admission::Go;
        }
        self.admit_down(now)
    }

    #[cold]
    fn admit_down(&self, now: Instant) -> Admission {
        let mut inner = self.lock();
        let lease = self.probe_lease();
        let Some(outage) = inner.outage.as_mut() else {
            // Went Up between the load and the lock.
            return Admission::Go;
        };
        if outage.take_probe(now, lease) {
            return Admission::Probe;
        }
        Admission::Refuse(self.refusal(outage, now))
    }

    fn refusal(&self, outage: &Outage, now: Instant) -> Error {
        let retry_in = if outage.probe.is_some() {
            Duration::ZERO
        } else {
            ceil_ms(outage.retry_at.saturating_duration_since(now))
        };
        Error::HostDown {
            host: self.host.clone(),
            down_for: floor_ms(now.saturating_duration_since(outage.since)),
            retry_in,
            last_error: outage.last_error.clone(),
        }
    }

    #[cfg(test)]
    /// True when the host is Down and a probe may be sent now (its retry
    /// time passed and no probe is under way). Takes nothing: see
    /// [`take_probe`](Self::take_probe).
    pub(crate) fn probe_due(&self, now: Instant) -> bool {
        if self.mode.load(Ordering::Acquire) != DOWN {
            return false;
        }
        let lease = self.probe_lease();
        self.lock()
            .outage
            .as_ref()
            .is_some_and(|o| o.probe_free(now, lease))
    }

    /// Takes the probe slot when a probe is due (the same slot
    /// [`admit`](Self::admit) hands out as [`Admission::Probe`]): true means
    /// the caller now owns the probe and must report its outcome.
    pub(crate) fn take_probe(&self, now: Instant) -> bool {
        if self.mode.load(Ordering::Acquire) != DOWN {
            return false;
        }
        let lease = self.probe_lease();
        self.lock()
            .outage
            .as_mut()
            .is_some_and(|o| o.take_probe(now, lease))
    }

    /// When a probe is due next: the retry time, or when the probe under way
    /// is given up; `None` while Up. For the driver's poll timeout.
    pub(crate) fn next_probe_at(&self) -> Option<Instant> {
        if self.mode.load(Ordering::Acquire) != DOWN {
            return None;
        }
        let lease = self.probe_lease();
        self.lock().outage.as_ref().map(|o| match o.probe {
            Some(started) => later(started, lease),
            None => o.retry_at,
        })
    }

    #[cfg(test)]
    /// The probe ended with no outcome (cancelled): the next request or
    /// `take_probe` probes again at once.
    pub(crate) fn release_probe(&self) {
        if self.mode.load(Ordering::Acquire) != DOWN {
            return;
        }
        if let Some(outage) = self.lock().outage.as_mut() {
            outage.probe = None;
        }
    }

    /// The host answered: it is Up, its failure count and back-off reset.
    /// Returns [`HostEvent::Up`] when it was Down.
    #[inline]
    pub(crate) fn record_success(&self, now: Instant) -> Option<HostEvent> {
        if self.mode.load(Ordering::Relaxed) == UP || !self.policy.enabled {
            return None;
        }
        self.record_success_slow(now)
    }

    #[cold]
    fn record_success_slow(&self, now: Instant) -> Option<HostEvent> {
        let mut inner = self.lock();
        inner.consecutive = 0;
        let outage = inner.outage.take();
        self.mode.store(UP, Ordering::Release);
        outage.map(|o| HostEvent::Up {
            host: self.host.clone(),
            down_for: now.saturating_duration_since(o.since),
        })
    }

    /// An attempt failed with `error`. Counted failures (see [`counts`])
    /// take the host Down after `failures` in a row, and a failed probe
    /// takes it Down again for twice as long. Returns [`HostEvent::Down`]
    /// when the host went (or went back) Down.
    pub(crate) fn record_failure(&self, error: &Error, now: Instant) -> Option<HostEvent> {
        if !self.policy.enabled || !counts(error) {
            return None;
        }
        let mut inner = self.lock();
        let Inner {
            consecutive,
            outage,
            rng,
        } = &mut *inner;
        match outage {
            None => {
                *consecutive = consecutive.saturating_add(1);
                if *consecutive < self.policy.failures {
                    self.mode.store(SUSPECT, Ordering::Release);
                    return None;
                }
                let period = self.policy.open_for;
                let retry_at = later(now, jitter(period, rng));
                *outage = Some(Outage {
                    since: now,
                    retry_at,
                    period,
                    last_error: Arc::new(error.clone()),
                    probe: None,
                });
                self.mode.store(DOWN, Ordering::Release);
                Some(HostEvent::Down {
                    host: self.host.clone(),
                    retry_in: retry_at.saturating_duration_since(now),
                    error: error.clone(),
                    after_probe: false,
                })
            }
            Some(o) => {
                o.last_error = Arc::new(error.clone());
                // No probe out: a request admitted before the outage
                // failed late, and the retry time stands.
                o.probe.take()?;
                o.period = o
                    .period
                    .saturating_mul(2)
                    .min(self.policy.max_open_for)
                    .max(self.policy.open_for);
                o.retry_at = later(now, jitter(o.period, rng));
                Some(HostEvent::Down {
                    host: self.host.clone(),
                    retry_in: o.retry_at.saturating_duration_since(now),
                    error: error.clone(),
                    after_probe: true,
                })
            }
        }
    }

    /// The host's health now.
    pub(crate) fn status(&self) -> HostHealth {
        if self.mode.load(Ordering::Acquire) != DOWN {
            return HostHealth::Up;
        }
        match self.lock().outage.as_ref() {
            None => HostHealth::Up,
            Some(o) => HostHealth::Down {
                since: o.since,
                retry_at: o.retry_at,
                last_error: Error::clone(&o.last_error),
            },
        }
    }
}

impl Outage {
    fn probe_free(&self, now: Instant, lease: Duration) -> bool {
        match self.probe {
            Some(started) => now >= later(started, lease),
            None => now >= self.retry_at,
        }
    }

    fn take_probe(&mut self, now: Instant, lease: Duration) -> bool {
        if self.probe_free(now, lease) {
            self.probe = Some(now);
            true
        } else {
            false
        }
    }
}

/// `now + d`, or as far ahead as an `Instant` goes (never panics on a huge
/// policy duration).
fn later(now: Instant, mut d: Duration) -> Instant {
    loop {
        if let Some(t) = now.checked_add(d) {
            return t;
        }
        d /= 2;
    }
}

/// `period` shortened by a random 0 to 20 %.
fn jitter(period: Duration, rng: &mut u64) -> Duration {
    let span = u64::try_from(period.as_nanos() / 5).unwrap_or(u64::MAX);
    if span == 0 {
        return period;
    }
    let cut = splitmix64(rng) % span;
    period.saturating_sub(Duration::from_nanos(cut))
}

/// One step of splitmix64 (Steele, Lea, Flood 2014): enough randomness for
/// jitter, with no dependency.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn floor_ms(d: Duration) -> Duration {
    Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn ceil_ms(d: Duration) -> Duration {
    let ms = d.as_nanos().div_ceil(1_000_000);
    Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX))
}

/// What rb tracks of one host, shared by every map, client and the driver:
/// its health, its counters, and who is told when it changes.
pub(crate) struct HostWatch {
    pub(crate) health: HostHealthState,
    pub(crate) counters: crate::stats::HostCounters,
    observer: Option<Arc<dyn crate::stats::Observer>>,
}

impl std::fmt::Debug for HostWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostWatch")
            .field("health", &self.health)
            .field("counters", &self.counters)
            .field("observer", &self.observer.is_some())
            .finish()
    }
}

impl HostWatch {
    pub(crate) fn new(
        host: HostName,
        policy: HealthPolicy,
        observer: Option<Arc<dyn crate::stats::Observer>>,
    ) -> HostWatch {
        HostWatch {
            health: HostHealthState::new(host, policy),
            counters: crate::stats::HostCounters::new(),
            observer,
        }
    }

    fn tell(&self, event: Option<HostEvent>) {
        if let (Some(observer), Some(event)) = (&self.observer, event) {
            observer.on_event(&event);
        }
    }

    /// Whether a request may go to the host now; the error to reject it
    /// with if not ([`Error::HostDown`]). One atomic load while Up.
    #[inline]
    pub(crate) fn admit(&self) -> Result<()> {
        if self.health.mode.load(Ordering::Acquire) != DOWN {
            return Ok(());
        }
        match self.health.admit(Instant::now()) {
            Admission::Refuse(e) => Err(e),
            Admission::Go | Admission::Probe => Ok(()),
        }
    }

    /// A connection was established and its handshake answered. Not yet
    /// evidence that the host works (a stopped server's kernel still
    /// accepts connections): its first reply is.
    pub(crate) fn connected(&self) {
        let reconnect = self.counters.connected();
        self.tell(Some(HostEvent::Connected {
            host: self.health.host().clone(),
            reconnect,
        }));
    }

    /// Replies came: the host works.
    #[inline]
    pub(crate) fn answered(&self, now: Instant) {
        self.tell(self.health.record_success(now));
    }

    /// An attempt failed with `error` (once per attempt, not per request).
    /// Only failures that say something about the host count ([`counts`]).
    pub(crate) fn failed(&self, error: &Error, now: Instant) {
        if !counts(error) {
            return;
        }
        if !error.is_timeout() {
            self.counters.connection_failed();
        }
        self.tell(Some(HostEvent::Failed {
            host: self.health.host().clone(),
            error: error.clone(),
        }));
        self.tell(self.health.record_failure(error, now));
    }

    /// Adds a pipeline's tally to the counters and clears it; commands it
    /// gave up count as timed out when `timed_out`.
    pub(crate) fn report(&self, tally: &mut crate::pipeline::Tally, timed_out: bool) {
        let c = &self.counters;
        if tally.commands > 0 {
            c.commands_sent(tally.commands);
        }
        let mut server_errors = tally.server_errors;
        for &(latency, n) in &tally.replies {
            c.replies_received(latency, n, std::mem::take(&mut server_errors));
        }
        if tally.abandoned > 0 {
            if timed_out {
                c.requests_timed_out(tally.abandoned);
            } else {
                c.requests_failed(tally.abandoned);
            }
        }
        if tally.bytes_in > 0 {
            c.bytes_read(tally.bytes_in);
        }
        if tally.bytes_out > 0 {
            c.bytes_written(tally.bytes_out);
        }
        tally.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Phase;
    use std::sync::Barrier;

    fn name() -> HostName {
        HostName {
            id: 1,
            addr: "127.0.0.1:6380/0".into(),
        }
    }

    fn refused() -> Error {
        Error::Connection {
            host: name(),
            command: None,
            kind: std::io::ErrorKind::ConnectionRefused,
            reason: "Connection refused (os error 111)".into(),
        }
    }

    fn timeout() -> Error {
        Error::Timeout {
            host: name(),
            phase: Phase::Read,
            budget: Duration::from_millis(50),
            command: Some("GET".into()),
        }
    }

    const MS: Duration = Duration::from_millis(1);

    fn policy() -> HealthPolicy {
        HealthPolicy::new()
            .failures(3)
            .open_for(100 * MS)
            .max_open_for(1000 * MS)
    }

    fn state(policy: HealthPolicy) -> HostHealthState {
        HostHealthState::with_seed(name(), policy, 7)
    }

    /// Fails `n` times at `now`; returns the last transition.
    fn fail(s: &HostHealthState, n: u32, now: Instant) -> Option<HostEvent> {
        (0..n).fold(None, |_, _| s.record_failure(&refused(), now))
    }

    fn retry_at(s: &HostHealthState) -> Instant {
        match s.status() {
            HostHealth::Down { retry_at, .. } => retry_at,
            HostHealth::Up => panic!("host is up"),
        }
    }

    fn assert_jittered(wait: Duration, period: Duration) {
        assert!(
            wait <= period && wait > period * 4 / 5,
            "wait {wait:?} for period {period:?}"
        );
    }

    #[test]
    fn policy_defaults_and_validation() {
        let p = HealthPolicy::new();
        assert_eq!(p, HealthPolicy::default());
        assert!(p.is_enabled());
        assert_eq!(
            (p.failures, p.open_for, p.max_open_for),
            (3, 500 * MS, 5000 * MS)
        );
        assert!(p.validate().is_ok());
        for (bad, what) in [
            (
                HealthPolicy::new().failures(0),
                "failures must be at least 1",
            ),
            (HealthPolicy::new().open_for(Duration::ZERO), "open_for"),
            (
                HealthPolicy::new()
                    .open_for(2000 * MS)
                    .max_open_for(1000 * MS),
                "max_open_for (1s) is shorter than open_for (2s)",
            ),
        ] {
            let e = bad.validate().unwrap_err();
            assert!(matches!(e, Error::Config { .. }), "{e:?}");
            assert!(e.to_string().contains(what), "{e}");
        }
        let off = HealthPolicy::disabled();
        assert!(!off.is_enabled());
        assert!(off.failures(0).validate().is_ok());
        // Huge durations are accepted and never overflow an Instant.
        let huge = HealthPolicy::new()
            .open_for(Duration::MAX)
            .max_open_for(Duration::MAX);
        assert!(huge.validate().is_ok());
        let s = state(huge);
        assert!(fail(&s, 3, Instant::now()).is_some());
        assert!(matches!(s.admit(Instant::now()), Admission::Refuse(_)));
    }

    #[test]
    fn down_after_threshold_of_consecutive_failures() {
        let s = state(policy());
        let t0 = Instant::now();
        assert!(fail(&s, 2, t0).is_none());
        assert!(matches!(s.admit(t0), Admission::Go));
        assert!(s.status().is_up());
        let Some(HostEvent::Down {
            host,
            retry_in,
            error,
            after_probe,
        }) = s.record_failure(&timeout(), t0)
        else {
            panic!("third failure must take the host down")
        };
        assert_eq!(host, name());
        assert_jittered(retry_in, 100 * MS);
        assert!(error.is_timeout());
        assert!(!after_probe);
        let HostHealth::Down {
            since,
            retry_at,
            last_error,
        } = s.status()
        else {
            panic!("down")
        };
        assert_eq!(since, t0);
        assert_eq!(retry_at, t0 + retry_in);
        assert!(last_error.is_timeout());
        // Until retry_at, everyone is refused at once.
        let later = t0 + 10 * MS;
        let Admission::Refuse(e) = s.admit(later) else {
            panic!("refuse")
        };
        let Error::HostDown {
            host,
            down_for,
            retry_in: left,
            last_error,
        } = &e
        else {
            panic!("{e:?}")
        };
        assert_eq!(host, &name());
        assert_eq!(*down_for, 10 * MS);
        assert_eq!(*left, ceil_ms(retry_at - later));
        assert!(last_error.is_timeout());
        assert!(!s.probe_due(later));
        assert_eq!(s.next_probe_at(), Some(retry_at));
    }

    #[test]
    fn only_health_failures_count() {
        let counted = [
            refused(),
            timeout(),
            Error::Tls {
                host: name(),
                reason: "bad certificate".into(),
            },
        ];
        let ignored = [
            Error::server(Some(name()), "GET", "WRONGTYPE Operation against a key"),
            Error::server(Some(name()), "GET", "LOADING Redis is loading"),
            Error::protocol("bulk length 600000000 is over the limit"),
            Error::unroutable(b"mget", "several keys"),
            Error::Unsupported {
                command: "SUBSCRIBE".into(),
                reason: "push mode".into(),
            },
            Error::type_mismatch("i64", "nil"),
            Error::config("bad"),
            Error::NoSuchHost { id: 9 },
            Error::BadHostSetup {
                reason: "gap".into(),
            },
            Error::Pending {
                reason: "pending".into(),
            },
            Error::HostDown {
                host: name(),
                down_for: MS,
                retry_in: MS,
                last_error: Arc::new(refused()),
            },
        ];
        for e in &counted {
            assert!(counts(e), "{e:?}");
        }
        let s = state(policy());
        let now = Instant::now();
        for e in &ignored {
            assert!(!counts(e), "{e:?}");
            for _ in 0..10 {
                assert!(s.record_failure(e, now).is_none());
            }
        }
        assert!(s.status().is_up());
        assert_eq!(s.mode.load(Ordering::Relaxed), UP);
        for e in &counted {
            s.record_failure(e, now);
        }
        assert!(!s.status().is_up());
    }

    #[test]
    fn flapping_never_pins_the_host_down() {
        let s = state(policy());
        let now = Instant::now();
        for _ in 0..1000 {
            assert!(fail(&s, 2, now).is_none());
            assert!(s.record_success(now).is_none());
            assert!(matches!(s.admit(now), Admission::Go));
        }
        assert_eq!(s.mode.load(Ordering::Relaxed), UP);
    }

    #[test]
    fn exactly_one_probe_at_retry_time() {
        let s = state(policy());
        let t0 = Instant::now();
        fail(&s, 3, t0);
        let due = retry_at(&s);
        assert!(!s.probe_due(due - MS));
        assert!(s.probe_due(due));
        assert!(matches!(s.admit(due), Admission::Probe));
        // Everyone else is refused until the probe reports, saying a probe
        // is under way.
        for later in [due, due + 50 * MS, due + 900 * MS] {
            let Admission::Refuse(e) = s.admit(later) else {
                panic!("second probe")
            };
            assert!(e.to_string().ends_with("a probe is under way"), "{e}");
        }
        assert!(!s.take_probe(due + 900 * MS));
        assert!(s.record_success(due + 5 * MS).is_some());
        assert!(matches!(s.admit(due + 6 * MS), Admission::Go));
    }

    #[test]
    fn exactly_one_probe_across_threads() {
        for round in 0..20 {
            let s = Arc::new(HostHealthState::with_seed(name(), policy(), round));
            let t0 = Instant::now();
            fail(&s, 3, t0);
            let due = retry_at(&s);
            let threads = 8;
            let barrier = Arc::new(Barrier::new(threads));
            let probes: usize = (0..threads)
                .map(|i| {
                    let s = s.clone();
                    let barrier = barrier.clone();
                    std::thread::spawn(move || {
                        barrier.wait();
                        (0..100)
                            .filter(|_| {
                                // Half the threads are users, half drivers.
                                if i % 2 == 0 {
                                    matches!(s.admit(due + MS), Admission::Probe)
                                } else {
                                    s.take_probe(due + MS)
                                }
                            })
                            .count()
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|t| t.join().unwrap())
                .sum();
            assert_eq!(probes, 1);
        }
    }

    #[test]
    fn failed_probes_double_the_period_up_to_max() {
        let s = state(policy());
        let mut now = Instant::now();
        fail(&s, 3, now);
        assert_jittered(retry_at(&s) - now, 100 * MS);
        for period in [200, 400, 800, 1000, 1000, 1000] {
            now = retry_at(&s);
            assert!(matches!(s.admit(now), Admission::Probe));
            now += 3 * MS; // the probe takes a while
            let Some(HostEvent::Down {
                retry_in,
                after_probe,
                ..
            }) = s.record_failure(&refused(), now)
            else {
                panic!("a failed probe takes the host down again")
            };
            assert!(after_probe);
            assert_jittered(retry_in, period * MS);
            assert_eq!(retry_at(&s), now + retry_in);
        }
    }

    #[test]
    fn success_makes_up_and_resets_back_off() {
        let s = state(policy());
        let t0 = Instant::now();
        fail(&s, 3, t0);
        for _ in 0..3 {
            let now = retry_at(&s);
            assert!(s.take_probe(now));
            s.record_failure(&refused(), now);
        }
        let mut now = retry_at(&s);
        assert!(matches!(s.admit(now), Admission::Probe));
        let Some(HostEvent::Up { host, down_for }) = s.record_success(now + MS) else {
            panic!("up")
        };
        assert_eq!(host, name());
        assert_eq!(down_for, now + MS - t0);
        assert!(s.status().is_up());
        assert_eq!(s.next_probe_at(), None);
        // The next outage starts again from open_for, and needs the full
        // count of failures.
        now += 10 * MS;
        assert!(fail(&s, 2, now).is_none());
        assert!(fail(&s, 1, now).is_some());
        assert_jittered(retry_at(&s) - now, 100 * MS);
    }

    #[test]
    fn jitter_stays_within_bounds_and_varies() {
        let t0 = Instant::now();
        let mut waits = std::collections::BTreeSet::new();
        for seed in 0..200 {
            let s = HostHealthState::with_seed(name(), policy(), seed);
            fail(&s, 3, t0);
            let wait = retry_at(&s) - t0;
            assert_jittered(wait, 100 * MS);
            waits.insert(wait);
        }
        assert!(waits.len() > 150, "{} distinct waits", waits.len());
        let min = *waits.first().unwrap();
        let max = *waits.last().unwrap();
        assert!(min < 84 * MS && max > 96 * MS, "{min:?}..{max:?}");
        // Seeded from random hash keys: two states of one host differ.
        let a = HostHealthState::new(name(), policy());
        let b = HostHealthState::new(name(), policy());
        assert_ne!(a.lock().rng, b.lock().rng);
    }

    #[test]
    fn disabled_policy_never_refuses() {
        let s = state(HealthPolicy::disabled());
        let now = Instant::now();
        for _ in 0..100 {
            assert!(s.record_failure(&refused(), now).is_none());
            assert!(s.record_failure(&timeout(), now).is_none());
        }
        assert!(matches!(s.admit(now), Admission::Go));
        assert!(s.status().is_up());
        assert!(!s.probe_due(now));
        assert!(!s.take_probe(now));
        assert!(s.record_success(now).is_none());
        assert_eq!(s.lock().consecutive, 0);
    }

    #[test]
    fn released_or_lost_probes_are_handed_out_again() {
        let s = state(policy());
        let t0 = Instant::now();
        fail(&s, 3, t0);
        let due = retry_at(&s);
        assert!(matches!(s.admit(due), Admission::Probe));
        s.release_probe();
        assert!(s.probe_due(due + MS));
        assert!(s.take_probe(due + MS));
        // This one never reports: after max_open_for, another goes.
        assert_eq!(s.next_probe_at(), Some(due + MS + 1000 * MS));
        assert!(!s.take_probe(due + 1000 * MS));
        assert!(matches!(s.admit(due + 1001 * MS), Admission::Probe));
    }

    #[test]
    fn late_failures_while_down_keep_the_retry_time() {
        let s = state(policy());
        let t0 = Instant::now();
        fail(&s, 3, t0);
        let due = retry_at(&s);
        // A request admitted before the outage times out now.
        assert!(s.record_failure(&timeout(), t0 + MS).is_none());
        assert_eq!(retry_at(&s), due);
        let HostHealth::Down {
            last_error, since, ..
        } = s.status()
        else {
            panic!("down")
        };
        assert!(last_error.is_timeout());
        assert_eq!(since, t0);
        // A late success is evidence enough: the host answered.
        assert!(matches!(
            s.record_success(t0 + 2 * MS),
            Some(HostEvent::Up { .. })
        ));
    }

    #[test]
    fn refusal_message_has_no_password() {
        let info = crate::HostConfig::new()
            .host("127.0.0.1")
            .port(6380)
            .password("hunter2-secret")
            .resolve(1);
        let host = info.name().clone();
        let s = HostHealthState::with_seed(host.clone(), HealthPolicy::new(), 1);
        let t0 = Instant::now();
        let e = Error::Connection {
            host,
            command: None,
            kind: std::io::ErrorKind::ConnectionRefused,
            reason: "Connection refused (os error 111)".into(),
        };
        for _ in 0..3 {
            s.record_failure(&e, t0);
        }
        let Admission::Refuse(refusal) = s.admit(t0 + 120 * MS) else {
            panic!("refuse")
        };
        let text = refusal.to_string();
        let debug = format!("{refusal:?} {:?}", s.status());
        assert!(!text.contains("hunter2") && !debug.contains("hunter2"));
        let retry = ceil_ms(retry_at(&s) - (t0 + 120 * MS));
        assert_eq!(
            text,
            format!(
                "host 1 (127.0.0.1:6380/0) has been down for 120ms (last error: host 1 \
                 (127.0.0.1:6380/0): connection error: Connection refused (os error 111)); \
                 retried in {retry:?}"
            )
        );
    }

    #[test]
    fn rounding() {
        assert_eq!(floor_ms(Duration::from_micros(1999)), MS);
        assert_eq!(ceil_ms(Duration::from_micros(1001)), 2 * MS);
        assert_eq!(ceil_ms(Duration::ZERO), Duration::ZERO);
        assert_eq!(ceil_ms(Duration::MAX), Duration::from_millis(u64::MAX));
        let now = Instant::now();
        assert!(later(now, Duration::MAX) > now);
        let mut rng = 0;
        assert_eq!(
            jitter(Duration::from_nanos(4), &mut rng),
            Duration::from_nanos(4)
        );
        assert!(jitter(Duration::MAX, &mut rng) > Duration::MAX / 5 * 4);
    }
}
