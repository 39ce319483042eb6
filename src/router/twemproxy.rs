//! twemproxy's (nutcracker's) key distributions: a service that talks to
//! its Redis nodes through nutcracker can route with rb instead, straight
//! to the nodes, and find every key where the proxy put it.
//!
//! What nutcracker 0.5.0 does, and so what this does:
//!
//! - The pool's servers are sorted by name (`conf_validate_server` sorts
//!   them with `conf_server_name_cmp` to find duplicates, and the pool is
//!   built from the sorted array): shorter names first, then byte order.
//!   The order of the lines in nutcracker.yml does not matter; duplicate
//!   names are refused.
//! - A key's hash is 0 when the pool has one server or the key is empty
//!   (`server_pool_hash`), else the pool's hash function of the key (or of
//!   its hash tag, see [`crate::router::HashTag`]).
//! - `ketama` (`nc_ketama.c`): each server gets
//!   `floorf(pct * 160 / 4 * nservers + 1e-10) * 4` points, `pct` being its
//!   weight over the total weight, all in single-precision floats; point
//!   group `i` is the MD5 of `"{name}-{i}"` cut to 272 bytes (0.5.0 formats
//!   it into a 273-byte buffer, `KETAMA_MAX_HOSTLEN`, and clamps the length
//!   to 272), four little-endian 32-bit points per digest. The points are sorted (glibc's stable merge sort
//!   for arrays this size, so equal points keep server order); a key goes to
//!   the first point `>=` its hash, wrapping to the first point.
//! - `modula` (`nc_modula.c`): a table holding each server `weight` times,
//!   in pool order; a key goes to entry `hash % total weight`.
//! - `random` cannot be reproduced (it picks a server per request) and is
//!   refused.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use crate::config::HostInfo;
use crate::digest::md5;
use crate::error::{Error, HostId, Result};
use crate::hashkit;
use crate::router::Router;

/// How a twemproxy pool spreads keys over its servers (nutcracker.yml's
/// `distribution:`). Parses from and displays as nutcracker's names.
///
/// ```
/// use rb::router::Distribution;
/// assert_eq!("ketama".parse::<Distribution>().unwrap(), Distribution::Ketama);
/// assert_eq!(Distribution::Modula.to_string(), "modula");
/// assert!("random".parse::<Distribution>().is_err()); // not deterministic
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Distribution {
    /// `ketama`: consistent hashing, points in proportion to weight (nutcracker's default).
    #[default]
    Ketama,
    /// `modula`: hash modulo the total weight.
    Modula,
}

impl Distribution {
    /// nutcracker's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Distribution::Ketama => "ketama",
            Distribution::Modula => "modula",
        }
    }
}

impl fmt::Display for Distribution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Distribution {
    type Err = Error;

    /// # Errors
    ///
    /// [`Error::Config`] for `random` (nutcracker picks a random server per
    /// request, so no key has a home to route to) and for unknown names.
    fn from_str(s: &str) -> Result<Distribution> {
        match s {
            "ketama" => Ok(Distribution::Ketama),
            "modula" => Ok(Distribution::Modula),
            "random" => Err(Error::config(
                "twemproxy distribution \"random\" sends each request to a random server, \
                 so no router can find a key again; use ketama or modula",
            )),
            other => Err(Error::config(format!(
                "unknown twemproxy distribution {other:?} (want ketama or modula)"
            ))),
        }
    }
}

/// A twemproxy hash function (nutcracker.yml's `hash:`), computed exactly
/// as nutcracker 0.5.0 computes it on x86-64, quirks included: the "64-bit"
/// FNVs return the low 32 bits, bytes >= 0x80 are sign-extended where
/// nutcracker reads them through `char` (the FNVs, one-at-a-time, hsieh's
/// tail), `crc16` is not masked to 16 bits, `crc32` is libmemcached's 15-bit
/// variant and `crc32a` the real CRC-32. Parses from and displays as
/// nutcracker's names.
///
/// ```
/// use rb::router::TwemproxyHash;
/// let h: TwemproxyHash = "fnv1a_64".parse().unwrap();
/// assert_eq!(h, TwemproxyHash::Fnv1a64);
/// assert_eq!(h.to_string(), "fnv1a_64");
/// assert_eq!(TwemproxyHash::Crc32a.hash(b"123456789"), 0xcbf43926);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum TwemproxyHash {
    /// `fnv1a_64` (nutcracker's default).
    #[default]
    Fnv1a64,
    /// `md5`.
    Md5,
    /// `murmur` (MurmurHash2).
    Murmur,
    /// `crc32a` (CRC-32).
    Crc32a,
    /// `one_at_a_time` (Jenkins' one-at-a-time).
    OneAtATime,
    /// `jenkins` (Jenkins' lookup3).
    Jenkins,
    /// `hsieh` (SuperFastHash).
    Hsieh,
    /// `fnv1_64`.
    Fnv164,
    /// `fnv1_32`.
    Fnv132,
    /// `fnv1a_32`.
    Fnv1a32,
    /// `crc16` (XMODEM, unmasked).
    Crc16,
    /// `crc32` (libmemcached's).
    Crc32,
}

impl TwemproxyHash {
    /// Every hash, in nutcracker's documentation order.
    pub const ALL: [TwemproxyHash; 12] = [
        TwemproxyHash::OneAtATime,
        TwemproxyHash::Md5,
        TwemproxyHash::Crc16,
        TwemproxyHash::Crc32,
        TwemproxyHash::Crc32a,
        TwemproxyHash::Fnv164,
        TwemproxyHash::Fnv1a64,
        TwemproxyHash::Fnv132,
        TwemproxyHash::Fnv1a32,
        TwemproxyHash::Hsieh,
        TwemproxyHash::Murmur,
        TwemproxyHash::Jenkins,
    ];

    /// nutcracker's name for it.
    pub fn name(self) -> &'static str {
        match self {
            TwemproxyHash::Fnv1a64 => "fnv1a_64",
            TwemproxyHash::Md5 => "md5",
            TwemproxyHash::Murmur => "murmur",
            TwemproxyHash::Crc32a => "crc32a",
            TwemproxyHash::OneAtATime => "one_at_a_time",
            TwemproxyHash::Jenkins => "jenkins",
            TwemproxyHash::Hsieh => "hsieh",
            TwemproxyHash::Fnv164 => "fnv1_64",
            TwemproxyHash::Fnv132 => "fnv1_32",
            TwemproxyHash::Fnv1a32 => "fnv1a_32",
            TwemproxyHash::Crc16 => "crc16",
            TwemproxyHash::Crc32 => "crc32",
        }
    }

    /// The 32-bit value nutcracker's hash function gives `key`.
    #[inline]
    pub fn hash(self, key: &[u8]) -> u32 {
        match self {
            TwemproxyHash::Fnv1a64 => hashkit::fnv1a_64(key),
            TwemproxyHash::Md5 => hashkit::md5_32(key),
            TwemproxyHash::Murmur => hashkit::murmur(key),
            TwemproxyHash::Crc32a => hashkit::crc32a(key),
            TwemproxyHash::OneAtATime => hashkit::one_at_a_time(key),
            TwemproxyHash::Jenkins => hashkit::jenkins(key),
            TwemproxyHash::Hsieh => hashkit::hsieh(key),
            TwemproxyHash::Fnv164 => hashkit::fnv1_64(key),
            TwemproxyHash::Fnv132 => hashkit::fnv1_32(key),
            TwemproxyHash::Fnv1a32 => hashkit::fnv1a_32(key),
            TwemproxyHash::Crc16 => hashkit::crc16(key),
            TwemproxyHash::Crc32 => hashkit::crc32(key),
        }
    }
}

impl fmt::Display for TwemproxyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for TwemproxyHash {
    type Err = Error;

    /// # Errors
    ///
    /// [`Error::Config`] for a name nutcracker does not know, listing those it does.
    fn from_str(s: &str) -> Result<TwemproxyHash> {
        TwemproxyHash::ALL
            .into_iter()
            .find(|h| h.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = TwemproxyHash::ALL.iter().map(|h| h.name()).collect();
                Error::config(format!(
                    "unknown twemproxy hash {s:?} (want one of {})",
                    names.join(", ")
                ))
            })
    }
}

/// A twemproxy pool's placement: nutcracker.yml's `distribution` and
/// `hash`. The default is nutcracker's (`ketama`, `fnv1a_64`). Its hash tag
/// is the cluster's ([`crate::ClusterBuilder::hash_tag`]).
///
/// ```
/// use rb::router::{Distribution, TwemproxyHash, TwemproxyRing};
/// use rb::{Cluster, HostConfig, RouterKind};
/// let cluster = Cluster::builder()
///     .router(RouterKind::Twemproxy(TwemproxyRing {
///         distribution: Distribution::Ketama,
///         hash: TwemproxyHash::Fnv1a64,
///     }))
///     .hash_tag(b"{}")
///     .host(0, HostConfig::from_twemproxy("127.0.0.1:6379:1 server0")?)
///     .host(1, HostConfig::from_twemproxy("127.0.0.1:6380:1 server1")?)
///     .build()?;
/// let router = cluster.router()?;
/// assert_eq!(router.host_for_key(b"{user1}:a")?, router.host_for_key(b"user1")?);
/// # Ok::<(), rb::Error>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TwemproxyRing {
    /// `distribution:`.
    pub distribution: Distribution,
    /// `hash:`.
    pub hash: TwemproxyHash,
}

impl TwemproxyRing {
    /// A ring with this distribution and hash.
    #[must_use]
    pub fn new(distribution: Distribution, hash: TwemproxyHash) -> TwemproxyRing {
        TwemproxyRing { distribution, hash }
    }
}

/// Points per server at equal weights (`KETAMA_POINTS_PER_SERVER`).
const KETAMA_POINTS_PER_SERVER: f32 = 160.0;
/// The size of nutcracker 0.5.0's point-name buffer (`KETAMA_MAX_HOSTLEN`,
/// 86 before 0.5.0): a point name is cut to one byte less.
const KETAMA_MAX_HOSTLEN: usize = 273;

/// One server of a twemproxy pool.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Server {
    id: HostId,
    name: String,
    weight: u32,
}

/// Routes as a twemproxy (nutcracker 0.5.0) pool of these hosts does: see
/// [`TwemproxyRing`], [`HostConfig::weight`](crate::HostConfig::weight),
/// [`HostConfig::name`](crate::HostConfig::name) and the module docs for
/// what it reproduces. Host ids can be any; nutcracker orders its servers
/// by name, not by their place in the file.
#[derive(Clone)]
pub struct TwemproxyRouter {
    ring: TwemproxyRing,
    /// Host id of each server, in nutcracker's pool order (by name).
    ids: Vec<HostId>,
    /// Ketama: sorted points and the pool index of their server.
    points: Vec<(u32, u32)>,
    /// Modula: the end of each server's share of `0..total_weight`.
    ends: Vec<u64>,
    total_weight: u64,
}

impl TwemproxyRouter {
    /// A ring over the given hosts, each placed by its
    /// [`HostInfo::twemproxy_node_name`] with its [`HostInfo::weight`].
    ///
    /// # Errors
    ///
    /// [`Error::BadHostSetup`] when there are no hosts; [`Error::Config`]
    /// naming the host for a weight of 0 or above 2147483647 or two hosts
    /// with the same name (nutcracker refuses both), or a total weight above
    /// `u32::MAX`.
    pub fn new(ring: TwemproxyRing, hosts: &[Arc<HostInfo>]) -> Result<TwemproxyRouter> {
        Self::from_servers(
            ring,
            hosts
                .iter()
                .map(|h| (h.host_id, h.twemproxy_node_name(), h.weight)),
        )
    }

    /// A ring over explicit `(id, name, weight)` servers.
    ///
    /// # Errors
    ///
    /// As [`TwemproxyRouter::new`].
    pub fn from_servers(
        ring: TwemproxyRing,
        servers: impl IntoIterator<Item = (HostId, String, u32)>,
    ) -> Result<TwemproxyRouter> {
        let mut servers: Vec<Server> = servers
            .into_iter()
            .map(|(id, name, weight)| Server { id, name, weight })
            .collect();
        if servers.is_empty() {
            return Err(Error::BadHostSetup {
                reason: "no hosts were configured".into(),
            });
        }
        for s in &servers {
            if s.weight == 0 || s.weight > i32::MAX as u32 {
                return Err(Error::config(format!(
                    "host {} ({:?}): twemproxy weight {} (want 1 to 2147483647)",
                    s.id, s.name, s.weight
                )));
            }
        }
        // nutcracker's pool order: by name, shorter first (string_compare).
        servers.sort_by(|a, b| {
            (a.name.len(), a.name.as_bytes()).cmp(&(b.name.len(), b.name.as_bytes()))
        });
        if let Some(w) = servers.windows(2).find(|w| w[0].name == w[1].name) {
            return Err(Error::config(format!(
                "hosts {} and {} have the same twemproxy name {:?} (nutcracker refuses duplicate names)",
                w[0].id, w[1].id, w[0].name
            )));
        }
        let total_weight: u64 = servers.iter().map(|s| u64::from(s.weight)).sum();
        if total_weight > u64::from(u32::MAX) {
            return Err(Error::config(format!(
                "total twemproxy weight {total_weight} exceeds {} (nutcracker counts it in 32 bits)",
                u32::MAX
            )));
        }
        let mut router = TwemproxyRouter {
            ring,
            ids: servers.iter().map(|s| s.id).collect(),
            points: Vec::new(),
            ends: Vec::new(),
            total_weight,
        };
        match ring.distribution {
            Distribution::Ketama => router.points = ketama_points(&servers, total_weight as u32),
            Distribution::Modula => {
                let mut end = 0u64;
                router.ends = servers
                    .iter()
                    .map(|s| {
                        end += u64::from(s.weight);
                        end
                    })
                    .collect();
            }
        }
        Ok(router)
    }

    /// The ring's distribution and hash.
    pub fn ring(&self) -> TwemproxyRing {
        self.ring
    }

    /// The value nutcracker dispatches `key` (already cut to its hash tag)
    /// by: 0 for a one-server pool or an empty key.
    #[inline]
    fn key_hash(&self, key: &[u8]) -> u32 {
        if self.ids.len() == 1 || key.is_empty() {
            0
        } else {
            self.ring.hash.hash(key)
        }
    }
}

/// nutcracker's points per server: `floorf((float)(pct * 160 / 4 *
/// (float)nservers + 0.0000000001)) * 4`, `pct` a float; the `1e-10` is a
/// double, so that one addition happens in double precision.
fn ketama_point_count(weight: u32, total_weight: u32, servers: usize) -> u32 {
    let pct = weight as f32 / total_weight as f32;
    let scaled = pct * KETAMA_POINTS_PER_SERVER / 4.0 * servers as f32;
    let nudged = (f64::from(scaled) + 0.000_000_000_1) as f32;
    (nudged.floor() * 4.0) as u32
}

/// The sorted continuum of nutcracker's `ketama_update`.
fn ketama_points(servers: &[Server], total_weight: u32) -> Vec<(u32, u32)> {
    let mut points = Vec::new();
    let mut label = Vec::with_capacity(KETAMA_MAX_HOSTLEN + 12);
    for (index, s) in servers.iter().enumerate() {
        let count = ketama_point_count(s.weight, total_weight, servers.len());
        for group in 0..count / 4 {
            label.clear();
            label.extend_from_slice(s.name.as_bytes());
            label.push(b'-');
            label.extend_from_slice(group.to_string().as_bytes());
            // snprintf(host, 273, ...) keeps 272 bytes, and 0.5.0 clamps
            // the length it hashes to 272: long names' groups 10.., 100..
            // share points with groups 1.., 10...
            label.truncate(KETAMA_MAX_HOSTLEN - 1);
            let digest = md5(&label);
            for chunk in digest.chunks_exact(4) {
                let point = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
                points.push((point, index as u32));
            }
        }
    }
    // Stable, like glibc's qsort (a merge sort for arrays this size):
    // equal points keep server order.
    points.sort_by_key(|&(point, _)| point);
    points
}

impl Router for TwemproxyRouter {
    fn host_for_key(&self, key: &[u8]) -> Result<HostId> {
        let hash = self.key_hash(key);
        let index = match self.ring.distribution {
            Distribution::Ketama => {
                // The first point >= hash, wrapping to the first point.
                let pos = self.points.partition_point(|&(p, _)| p < hash);
                match self.points.get(pos).or_else(|| self.points.first()) {
                    Some(&(_, index)) => index as usize,
                    None => 0,
                }
            }
            Distribution::Modula => {
                let slot = u64::from(hash) % self.total_weight.max(1);
                self.ends.partition_point(|&end| end <= slot)
            }
        };
        self.ids
            .get(index)
            .copied()
            .ok_or_else(|| Error::Unroutable {
                command: "".into(),
                reason: "the twemproxy ring has no server for the key".into(),
            })
    }
}

/// The ring's shape, not its points.
impl fmt::Debug for TwemproxyRouter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TwemproxyRouter")
            .field("ring", &self.ring)
            .field("hosts", &self.ids.len())
            .field("total_weight", &self.total_weight)
            .field("points", &self.points.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn servers(n: u32) -> Vec<(HostId, String, u32)> {
        (0..n)
            .map(|i| (i, format!("127.0.0.1:{}", 7801 + i), 1))
            .collect()
    }

    #[test]
    fn names_parse_and_display_as_nutcracker_writes_them() {
        for h in TwemproxyHash::ALL {
            assert_eq!(h.name().parse::<TwemproxyHash>().unwrap(), h);
            assert_eq!(h.to_string(), h.name());
        }
        let e = "fnv1a64".parse::<TwemproxyHash>().unwrap_err();
        assert!(matches!(e, Error::Config { .. }));
        assert!(e.to_string().contains("\"fnv1a64\""), "{e}");
        assert!(e.to_string().contains("fnv1a_64"), "{e}");
        for d in [Distribution::Ketama, Distribution::Modula] {
            assert_eq!(d.name().parse::<Distribution>().unwrap(), d);
        }
        let e = "random".parse::<Distribution>().unwrap_err();
        assert!(e.to_string().contains("random"), "{e}");
        assert!("Ketama".parse::<Distribution>().is_err());
        assert_eq!(
            TwemproxyRing::default(),
            TwemproxyRing::new(Distribution::Ketama, TwemproxyHash::Fnv1a64)
        );
    }

    #[test]
    fn ketama_point_counts_use_single_precision() {
        // Equal weights: 160 each.
        assert_eq!(ketama_point_count(1, 3, 3), 160);
        // 7:3 over two servers: 0.7f * 40 * 2 = 56 groups, 0.3f -> 24.
        assert_eq!(ketama_point_count(7, 10, 2), 224);
        assert_eq!(ketama_point_count(3, 10, 2), 96);
        // A light server among heavy ones can get no point at all.
        assert_eq!(ketama_point_count(1, 1001, 2), 0);
        let r = TwemproxyRouter::from_servers(TwemproxyRing::default(), servers(3)).unwrap();
        assert_eq!(r.points.len(), 480);
        assert!(r.points.windows(2).all(|w| w[0].0 <= w[1].0));
    }

    #[test]
    fn one_server_or_empty_key_hash_to_zero() {
        let r = TwemproxyRouter::from_servers(TwemproxyRing::default(), servers(1)).unwrap();
        assert_eq!(r.key_hash(b"anything"), 0);
        assert_eq!(r.host_for_key(b"anything").unwrap(), 0);
        let r = TwemproxyRouter::from_servers(TwemproxyRing::default(), servers(3)).unwrap();
        assert_eq!(r.key_hash(b""), 0);
        // Hash 0 goes to the first point.
        let first = r.ids[r.points[0].1 as usize];
        assert_eq!(r.host_for_key(b"").unwrap(), first);
    }

    #[test]
    fn modula_is_hash_mod_total_weight_over_servers_by_name() {
        let ring = TwemproxyRing::new(Distribution::Modula, TwemproxyHash::Crc32a);
        // Listed out of name order, ids 0..3; pool order is b (id 1), c (id 2), aa (id 0).
        let r = TwemproxyRouter::from_servers(
            ring,
            [(0, "aa".into(), 1), (1, "b".into(), 2), (2, "c".into(), 3)],
        )
        .unwrap();
        assert_eq!(r.ids, [1, 2, 0]);
        for key in ["a", "b", "foo", "bar", "baz", "qux", "quux"] {
            let slot = crc32fast::hash(key.as_bytes()) % 6;
            let want = match slot {
                0 | 1 => 1,
                2..=4 => 2,
                _ => 0,
            };
            assert_eq!(r.host_for_key(key.as_bytes()).unwrap(), want, "{key}");
        }
    }

    #[test]
    fn bad_setups_are_config_errors_naming_the_host() {
        let ring = TwemproxyRing::default();
        let e = TwemproxyRouter::from_servers(ring, [(0, "a".into(), 1), (7, "b".into(), 0)])
            .unwrap_err();
        assert!(e.to_string().contains("host 7"), "{e}");
        let e = TwemproxyRouter::from_servers(ring, [(0, "a".into(), 1), (1, "a".into(), 1)])
            .unwrap_err();
        assert!(e.to_string().contains("same twemproxy name"), "{e}");
        let e = TwemproxyRouter::from_servers(
            ring,
            [
                (0, "a".into(), i32::MAX as u32),
                (1, "b".into(), i32::MAX as u32),
                (2, "c".into(), 2),
            ],
        )
        .unwrap_err();
        assert!(e.to_string().contains("total twemproxy weight"), "{e}");
        assert!(matches!(
            TwemproxyRouter::from_servers(ring, []),
            Err(Error::BadHostSetup { .. })
        ));
    }

    #[test]
    fn long_names_are_cut_to_272_bytes() {
        let ring = TwemproxyRing::default();
        let long = "x".repeat(271);
        let r = TwemproxyRouter::from_servers(ring, [(0, long.clone(), 1), (1, "b".into(), 1)])
            .unwrap();
        // "{271 x}-0" .. "-9" are 273 bytes cut to 272: all ten groups are
        // the same "{271 x}-", as are groups 10..79 ("-1", "-2", ...).
        let cut = format!("{long}-");
        let d = md5(cut.as_bytes());
        let first = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
        let copies = r
            .points
            .iter()
            .filter(|&&(p, i)| p == first && i == 1)
            .count();
        // Pool order: "b" (id 1) is index 0, the long name index 1.
        assert_eq!(r.ids, [1, 0]);
        assert_eq!(copies, 40);
        assert_eq!(r.points.len(), 320);
    }
}
