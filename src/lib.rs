// The crate's front page is the README: its examples run as doctests.
#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![warn(missing_debug_implementations)]
#![forbid(unsafe_code)]

pub mod args;
pub mod client;
pub mod cluster;
pub mod cmd;
pub mod commands;
pub mod config;
mod conn;
pub mod convert;
mod digest;
mod driver;
pub mod error;
mod event_loop;
mod handoff;
mod hashkit;
// Until the engine calls them, the crate-internal halves (the per-host
// states it records into) are unused.
pub mod health;
pub mod keyspec;
pub mod migrate;
mod multikey;
mod pipeline;
pub mod promise;
pub mod resp;
pub mod router;
pub mod scan;
mod scripts;
mod server_facts;
pub mod stats;
pub mod testing;
#[cfg(feature = "tls")]
mod tls;
pub mod transaction;

/// Internals for the fuzz targets (`fuzz/`) and the internal benches, with
/// the `fuzzing` feature: the engine's reply stream and the hand-written
/// digests. Not part of the API: no semver promise.
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::digest::{md5, sha1};
    pub use crate::resp::split::{Frame, ReplyStream};

    use crate::health::{Admission, HealthPolicy, HostHealthState};
    use crate::stats::HostCounters;
    use crate::{Error, HostName};
    use std::time::{Duration, Instant};

    /// One host's stats counters and health state, driven through the
    /// calls the engine makes per command, for `tests/stats_alloc.rs` (which
    /// counts allocations with a global allocator, impossible in the
    /// library's own tests under `forbid(unsafe_code)`).
    #[derive(Debug)]
    pub struct RecordPaths {
        counters: HostCounters,
        up: HostHealthState,
        down: HostHealthState,
    }

    impl Default for RecordPaths {
        fn default() -> RecordPaths {
            RecordPaths::new()
        }
    }

    impl RecordPaths {
        /// Counters at zero, one healthy host and one that is Down.
        pub fn new() -> RecordPaths {
            let host = HostName {
                id: 0,
                addr: "127.0.0.1:6379/0".into(),
            };
            let policy = HealthPolicy::new().open_for(Duration::from_secs(3600));
            let down = HostHealthState::new(host.clone(), policy);
            let refused = Error::Connection {
                host: host.clone(),
                command: None,
                kind: std::io::ErrorKind::ConnectionRefused,
                reason: "refused".into(),
            };
            for _ in 0..3 {
                down.record_failure(&refused, Instant::now());
            }
            RecordPaths {
                counters: HostCounters::new(),
                up: HostHealthState::new(host, policy),
                down,
            }
        }

        /// `n` rounds of the per-command path on a healthy host (admit,
        /// every counter, a latency, a success) and of a refusal by the
        /// Down host. Returns how many requests were admitted, refused.
        pub fn run(&self, n: u32) -> (u32, u32) {
            let (mut admitted, mut refused) = (0, 0);
            let now = Instant::now();
            for i in 0..n {
                if matches!(self.up.admit(now), Admission::Go) {
                    admitted += 1;
                }
                self.counters.commands_sent(1);
                self.counters.bytes_written(40);
                self.counters.bytes_read(12);
                let latency = Duration::from_nanos(u64::from(i) * 7919);
                self.counters
                    .replies_received(latency, 1, u64::from(i % 7 == 0));
                self.counters.requests_timed_out(u64::from(i % 2));
                self.counters.requests_failed(0);
                let _ = self.up.record_success(now);
                if let Admission::Refuse(e) = self.down.admit(now) {
                    refused += u32::from(e.is_host_down());
                }
            }
            (admitted, refused)
        }
    }
}

// The fuzz targets' checks, replayed as a unit test, name the crate `rb`.
#[cfg(test)]
extern crate self as rb;
#[cfg(test)]
mod fuzz_replay;

pub use args::ToArg;
pub use client::{
    AsyncClient, AsyncFanout, AsyncOptions, Execute, FanoutClient, LocalClient, MappingClient,
    RoutingClient, ScanPage,
};
pub use cluster::{Cluster, ClusterBuilder, Hosts, MapOptions};
pub use cmd::{cmd, Call, Cmd, Script, ScriptCall};
pub use commands::{Commands, Condition, Expiry, InfoDict, SetOptions};
pub use config::{HostConfig, HostInfo, Protocol, TlsOptions};
pub use conn::{Resolve, SystemResolver};
pub use convert::FromValue;
pub use error::{Error, HostId, HostName, Phase, Result};
pub use health::{HealthPolicy, HostHealth};
pub use promise::{join_all, JoinAll, Promise, Reply};
pub use resp::Value;
pub use router::{
    ConsistentHashingRouter, Distribution, HashTag, HashTagRouter, PartitionRouter, Router,
    RouterKind, TwemproxyHash, TwemproxyRing, TwemproxyRouter,
};
pub use scan::{KeyScan, Scan, ScanCursor, ScanOptions};
pub use stats::{
    ClusterStats, HostEvent, HostStats, LatencySummary, MigrationStats, Observer, TotalStats,
};
pub use transaction::{Transaction, TransactionReader};
