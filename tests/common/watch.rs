//! Bounded waits and process measurements for tests that may hang or
//! balloon on a defective engine: the work runs on a helper thread and the
//! test waits a bounded time for it, so a bug shows as a failing assertion,
//! not a stuck suite.
#![allow(dead_code)]

use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Runs `f` on a helper thread and waits up to `limit` for it. `Err` says
/// it did not finish in time (the thread is left behind; whatever it blocks
/// on is usually torn down by the caller's drops) or that it panicked.
pub fn within<T: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name(format!("bounded: {what}"))
        .spawn(move || {
            let _ = tx.send(f());
        })
        .expect("spawn a helper thread");
    match rx.recv_timeout(limit) {
        Ok(v) => Ok(v),
        Err(mpsc::RecvTimeoutError::Timeout) => {
            Err(format!("{what}: did not finish within {limit:?} (hung)"))
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => Err(format!("{what}: the helper panicked")),
    }
}

/// What [`watched`] saw.
pub struct Watched<T> {
    /// The work's result, if it returned in time.
    pub result: Option<T>,
    /// Why the watchdog stopped it, if it did.
    pub stopped: Option<String>,
    /// From the start to the result (or to giving up).
    pub elapsed: Duration,
    /// Largest `VmRSS` growth seen while it ran, in KiB.
    pub rss_growth_kib: u64,
}

/// Like [`within`], and also gives up when the process' resident memory
/// grows by more than `max_growth_kib` over what it was at the start
/// (sampled every 20 ms). On giving up, `stop` runs (it should make the
/// work end, e.g. by cutting its peer), and the work gets `grace` more to
/// return. Returns the work's result (if it returned), why it was stopped
/// (if it was), the time it took, and the largest RSS growth seen, in KiB.
pub fn watched<T: Send + 'static>(
    limit: Duration,
    max_growth_kib: u64,
    grace: Duration,
    stop: impl FnOnce(),
    f: impl FnOnce() -> T + Send + 'static,
) -> Watched<T> {
    let (rss0, _) = rss_kib();
    let start = Instant::now();
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("watched".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .expect("spawn a helper thread");
    let mut growth = 0;
    let stopped = loop {
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(v) => {
                return Watched {
                    result: Some(v),
                    stopped: None,
                    elapsed: start.elapsed(),
                    rss_growth_kib: growth.max(rss_kib().0.saturating_sub(rss0)),
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                break "the helper panicked".to_string();
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        growth = growth.max(rss_kib().0.saturating_sub(rss0));
        if growth > max_growth_kib {
            break format!(
                "resident memory grew by {} MiB (limit {} MiB) after {:?}",
                growth / 1024,
                max_growth_kib / 1024,
                start.elapsed()
            );
        }
        if start.elapsed() > limit {
            break format!("no result within {limit:?}");
        }
    };
    let elapsed = start.elapsed();
    stop();
    let result = rx.recv_timeout(grace).ok();
    Watched {
        result,
        stopped: Some(stopped),
        elapsed,
        rss_growth_kib: growth,
    }
}

/// `VmRSS` and `VmHWM` of this process, in KiB.
pub fn rss_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/self/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The median of some durations (the upper middle for an even count).
pub fn median(mut d: Vec<Duration>) -> Duration {
    assert!(!d.is_empty(), "median of nothing");
    d.sort();
    d[d.len() / 2]
}

/// Durations as `[312, 305, ...] ms` for printing.
pub fn ms_list(d: &[Duration]) -> String {
    let v: Vec<String> = d
        .iter()
        .map(|d| format!("{:.1}", d.as_secs_f64() * 1e3))
        .collect();
    format!("[{}] ms", v.join(", "))
}
