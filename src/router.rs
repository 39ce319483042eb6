//! Routers: which host owns a key. rb's two routers place every key on the
//! same host as Python rb does, so Python and Rust services can share a
//! fleet; [`TwemproxyRouter`] places it where twemproxy (nutcracker) does,
//! so services behind a twemproxy can drop the proxy and keep their keys;
//! [`HashTagRouter`] adds hash tags to any of them.

use std::sync::Arc;

mod hash_tag;
mod twemproxy;

pub use hash_tag::{HashTag, HashTagRouter};
pub use twemproxy::{Distribution, TwemproxyHash, TwemproxyRing, TwemproxyRouter};

use crate::cmd::Cmd;
use crate::config::HostInfo;
use crate::digest::md5;
use crate::error::{Error, HostId, Result};
use crate::keyspec;

/// Decides which host a key (and so a single-key command) goes to.
///
/// With hash tags on ([`crate::ClusterBuilder::hash_tag`]) a cluster
/// routes through a [`HashTagRouter`] around its router, custom ones
/// included: it calls [`Router::host_for_key`] with a tagged key's tag, and
/// [`Router::host_for_command`] for commands with no tagged key, so a
/// custom router gets hash tags without doing anything.
#[doc(alias = "BaseRouter")]
pub trait Router: Send + Sync {
    /// The host that owns `key`.
    ///
    /// # Errors
    ///
    /// When the router cannot place the key. The built-in routers place
    /// every key once built; a ring made empty with
    /// [`ConsistentHashingRouter::from_node_names`] is [`Error::Unroutable`].
    #[doc(alias = "get_host_for_key")]
    fn host_for_key(&self, key: &[u8]) -> Result<HostId>;

    /// The host for a command: its one key by the key table, then
    /// [`Router::host_for_key`]. Commands with no key, several keys, movable
    /// keys, or unknown to the table are [`Error::Unroutable`].
    ///
    /// # Errors
    ///
    /// [`Error::Unroutable`] as said, else as [`Router::host_for_key`].
    #[doc(alias = "get_host_for_command")]
    fn host_for_command(&self, cmd: &Cmd) -> Result<HostId> {
        self.host_for_key(keyspec::single_key(cmd)?)
    }
}

/// Which built-in router a cluster uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[doc(alias = "router_cls")]
pub enum RouterKind {
    /// [`PartitionRouter`], the default.
    #[default]
    Partition,
    /// [`ConsistentHashingRouter`].
    ConsistentHashing,
    /// [`TwemproxyRouter`]: twemproxy's ketama or modula with one of its
    /// hash functions, hosts weighted ([`crate::HostConfig::weight`]) and
    /// named ([`crate::HostConfig::name`]) as in nutcracker.yml.
    Twemproxy(TwemproxyRing),
}

/// Checks that the ids are exactly `0..n`, as the built-in routers need.
fn check_gapless(ids: impl IntoIterator<Item = HostId>) -> Result<usize> {
    let mut ids: Vec<HostId> = ids.into_iter().collect();
    if ids.is_empty() {
        return Err(Error::BadHostSetup {
            reason: "no hosts were configured".into(),
        });
    }
    ids.sort_unstable();
    for (expected, id) in ids.iter().enumerate() {
        if *id as usize != expected {
            return Err(Error::BadHostSetup {
                reason: format!(
                    "expected host with id {expected} but no such host was found (ids must be 0..{})",
                    ids.len()
                )
                .into(),
            });
        }
    }
    Ok(ids.len())
}

/// rb's `PartitionRouter`: host = signed CRC-32 of the key modulo the number
/// of hosts, with Python's floor modulo (so the result is never negative).
/// Requires host ids `0..n`.
#[derive(Clone, Debug)]
pub struct PartitionRouter {
    hosts: i64,
}

impl PartitionRouter {
    /// A router over the given hosts (only their ids matter).
    ///
    /// # Errors
    ///
    /// [`Error::BadHostSetup`] when there are no hosts or their ids are not
    /// `0..n` (naming the first missing id).
    pub fn new(hosts: &[Arc<HostInfo>]) -> Result<PartitionRouter> {
        Self::with_ids(hosts.iter().map(|h| h.host_id))
    }

    /// A router over hosts with these ids, which must be `0..n`.
    ///
    /// # Errors
    ///
    /// As [`PartitionRouter::new`].
    pub fn with_ids(ids: impl IntoIterator<Item = HostId>) -> Result<PartitionRouter> {
        Ok(PartitionRouter {
            hosts: check_gapless(ids)? as i64,
        })
    }
}

/// Python 2's `binascii.crc32`: the CRC-32 read as a signed 32-bit integer.
pub fn signed_crc32(key: &[u8]) -> i32 {
    crc32fast::hash(key) as i32
}

impl Router for PartitionRouter {
    fn host_for_key(&self, key: &[u8]) -> Result<HostId> {
        Ok(i64::from(signed_crc32(key)).rem_euclid(self.hosts) as HostId)
    }
}

/// rb's `ConsistentHashingRouter`: the ketama ring of rb's `Ketama` class.
///
/// Each host gets 40 MD5 digests of `"{node}-{i}-salt"` (i in 0..40), each
/// digest four little-endian 32-bit points, where `node` is the Python
/// `repr()` of rb's `HostInfo` ([`HostInfo::ring_name`]): every field of the
/// host config shapes the ring. A key goes to the first point after the
/// first four bytes of its own MD5 (little-endian), wrapping to the start.
/// Requires host ids `0..n`.
#[derive(Clone)]
#[doc(alias = "Ketama")]
pub struct ConsistentHashingRouter {
    /// Sorted points and their hosts.
    ring: Vec<(u32, HostId)>,
}

impl ConsistentHashingRouter {
    /// A ring over the given hosts.
    ///
    /// # Errors
    ///
    /// [`Error::BadHostSetup`] when there are no hosts or their ids are not
    /// `0..n` (naming the first missing id).
    pub fn new(hosts: &[Arc<HostInfo>]) -> Result<ConsistentHashingRouter> {
        check_gapless(hosts.iter().map(|h| h.host_id))?;
        Ok(Self::from_node_names(
            hosts.iter().map(|h| (h.host_id, h.ring_name())),
        ))
    }

    /// A ring over explicit `(id, node name)` pairs, one point set per name.
    pub fn from_node_names(
        nodes: impl IntoIterator<Item = (HostId, String)>,
    ) -> ConsistentHashingRouter {
        let mut nodes: Vec<(HostId, String)> = nodes.into_iter().collect();
        // Python builds the ring iterating a set of HostInfo whose hash is the
        // id: ascending ids. When two nodes share a point, the later one wins
        // the dict slot; sorting by (point, id) and keeping the last of each
        // point reproduces that.
        nodes.sort_by_key(|(id, _)| *id);
        let per_node = if nodes.is_empty() { 0 } else { 40 };
        let mut ring = Vec::with_capacity(nodes.len() * per_node * 4);
        for (id, name) in &nodes {
            for i in 0..per_node {
                let digest = md5(format!("{name}-{i}-salt").as_bytes());
                for chunk in digest.chunks_exact(4) {
                    let point = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
                    ring.push((point, *id));
                }
            }
        }
        ring.sort_unstable();
        // Keep the highest id of each point: dict assignment order.
        let mut deduped: Vec<(u32, HostId)> = Vec::with_capacity(ring.len());
        for entry in ring {
            match deduped.last_mut() {
                Some(last) if last.0 == entry.0 => *last = entry,
                _ => deduped.push(entry),
            }
        }
        ConsistentHashingRouter { ring: deduped }
    }
}

/// The ring's size, not its thousands of points.
impl std::fmt::Debug for ConsistentHashingRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut hosts: Vec<HostId> = self.ring.iter().map(|(_, id)| *id).collect();
        hosts.sort_unstable();
        hosts.dedup();
        f.debug_struct("ConsistentHashingRouter")
            .field("hosts", &hosts.len())
            .field("points", &self.ring.len())
            .finish()
    }
}

impl Router for ConsistentHashingRouter {
    fn host_for_key(&self, key: &[u8]) -> Result<HostId> {
        let digest = md5(key);
        let point = u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]]);
        // Python's bisect_right: the first point strictly greater.
        let pos = self.ring.partition_point(|(p, _)| *p <= point);
        let entry = self.ring.get(pos).or_else(|| self.ring.first());
        match entry {
            Some((_, id)) => Ok(*id),
            None => Err(Error::Unroutable {
                command: "".into(),
                reason: "did not find a suitable host for the key (the ring is empty)".into(),
            }),
        }
    }
}

/// Builds the router of `kind` over `hosts`.
pub(crate) fn build(kind: RouterKind, hosts: &[Arc<HostInfo>]) -> Result<Arc<dyn Router>> {
    Ok(match kind {
        RouterKind::Partition => Arc::new(PartitionRouter::new(hosts)?),
        RouterKind::ConsistentHashing => Arc::new(ConsistentHashingRouter::new(hosts)?),
        RouterKind::Twemproxy(ring) => Arc::new(TwemproxyRouter::new(ring, hosts)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::cmd;

    #[test]
    fn crc32_is_signed_like_python2() {
        // Python 2: binascii.crc32(b"foo") == -1938594527
        assert_eq!(signed_crc32(b"foo"), -1938594527);
        assert_eq!(signed_crc32(b""), 0);
    }

    #[test]
    fn partition_uses_floor_modulo() {
        let r = PartitionRouter::with_ids(0..3).unwrap();
        // -1938594527 mod 3 (floor) == 1 in Python
        assert_eq!(r.host_for_key(b"foo").unwrap(), 1);
        assert_eq!(r.host_for_command(&cmd("GET").arg("foo")).unwrap(), 1);
        assert!(matches!(
            r.host_for_command(&cmd("MGET").arg("a").arg("b")),
            Err(Error::Unroutable { .. })
        ));
    }

    #[test]
    fn gaps_are_refused_naming_the_missing_id() {
        let e = PartitionRouter::with_ids([0, 1, 3]).unwrap_err();
        assert!(e.to_string().contains("expected host with id 2"), "{e}");
        assert!(matches!(
            PartitionRouter::with_ids([]),
            Err(Error::BadHostSetup { .. })
        ));
    }

    #[test]
    fn empty_ring_is_an_error_not_a_panic() {
        let r = ConsistentHashingRouter::from_node_names(Vec::new());
        assert!(r.host_for_key(b"k").is_err());
    }
}
