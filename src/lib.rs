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
pub mod error;
mod event_loop;
pub mod keyspec;
mod multikey;
mod pipeline;
pub mod promise;
pub mod resp;
pub mod router;
mod scripts;
pub mod testing;
#[cfg(feature = "tls")]
mod tls;

/// Internals for the fuzz targets (`fuzz/`) and the internal benches, with
/// the `fuzzing` feature: the engine's reply stream and the hand-written
/// digests. Not part of the API: no semver promise.
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::digest::{md5, sha1};
    pub use crate::resp::split::{Frame, ReplyStream};
}

// The fuzz targets' checks, replayed as a unit test, name the crate `rb`.
#[cfg(test)]
extern crate self as rb;
#[cfg(test)]
mod fuzz_replay;

pub use args::ToArg;
pub use client::{Execute, FanoutClient, LocalClient, MappingClient, RoutingClient};
pub use cluster::{Cluster, ClusterBuilder, Hosts, MapOptions};
pub use cmd::{cmd, Call, Cmd, Script, ScriptCall};
pub use commands::{Commands, Condition, Expiry, InfoDict, SetOptions};
pub use config::{HostConfig, HostInfo, Protocol, TlsOptions};
pub use conn::{Resolve, SystemResolver};
pub use convert::FromValue;
pub use error::{Error, HostId, HostName, Phase, Result};
pub use promise::Promise;
pub use resp::Value;
pub use router::{ConsistentHashingRouter, PartitionRouter, Router, RouterKind};
