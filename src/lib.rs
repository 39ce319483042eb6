//! # rb, the redis blaster
//!
//! Talk to many independent Redis nodes as one: rb routes single-key commands
//! to the node that owns the key, pipelines and auto-batches them per node,
//! and sends to every node at once from one `mio` event loop. It is the Rust
//! port of Sentry's Python [`rb`](https://github.com/getsentry/rb) and places
//! every key on the same node as Python rb does.
//!
//! ```
//! use rb::{Cluster, HostConfig};
//! let cluster = Cluster::builder()
//!     .host_defaults(HostConfig::new().host("127.0.0.1"))
//!     .host(0, HostConfig::new().port(6379))
//!     .host(1, HostConfig::new().port(6380))
//!     .build()?;
//! let owner = cluster.router()?.host_for_key(b"user:42")?;
//! # let _ = owner;
//! # Ok::<(), rb::Error>(())
//! ```
#![deny(missing_docs)]
#![warn(missing_debug_implementations)]
#![forbid(unsafe_code)]

pub mod args;
mod batch;
// The engine rewrite brings the clients' Debug impls.
#[allow(missing_debug_implementations)]
pub mod client;
#[allow(missing_debug_implementations)]
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
pub use convert::FromValue;
pub use error::{Error, HostId, HostName, Phase, Result};
pub use promise::Promise;
pub use resp::Value;
pub use router::{ConsistentHashingRouter, PartitionRouter, Router, RouterKind};

/// The README's examples, compiled (and run where no server is needed) as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
