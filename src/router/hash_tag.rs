//! Hash tags: keys that must live together route by a common part.
//!
//! With a tag such as `{}`, a key routes by the bytes between the first `{`
//! and the next `}` after it, when there are any (`{user1}:cart` and
//! `{user1}:profile` both route as `user1`); a key with no `{`, no `}` after
//! it, or an empty `{}` routes whole. This is twemproxy's rule
//! (`server_pool_idx` in nutcracker's `nc_server.c`: `nc_strchr` for the
//! first byte, then for the second after it, used when the part is not
//! empty) and Redis Cluster's. Only the first opening byte counts: in
//! `a{}{b}` the tag is empty, so the whole key routes.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use crate::cmd::Cmd;
use crate::error::{Error, HostId, Result};
use crate::keyspec;
use crate::router::Router;

/// The two bytes that delimit a key's hash tag, e.g. `b"{}"` or `b"::"`
/// (nutcracker.yml's `hash_tag:`). See [`crate::ClusterBuilder::hash_tag`].
///
/// ```
/// use rb::router::HashTag;
/// let tag = HashTag::from(b"{}");
/// assert_eq!(tag.tag(b"{user1}:cart"), Some(&b"user1"[..]));
/// assert_eq!(tag.routing_key(b"{user1}:cart"), b"user1");
/// assert_eq!(tag.routing_key(b"plain"), b"plain");
/// assert_eq!(tag.routing_key(b"{}empty"), b"{}empty");
/// assert_eq!("::".parse::<HashTag>().unwrap().routing_key(b"a:b:c"), b"b");
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct HashTag {
    open: u8,
    close: u8,
}

impl HashTag {
    /// A tag opened by `open` and closed by `close` (they may be equal).
    #[must_use]
    pub const fn new(open: u8, close: u8) -> HashTag {
        HashTag { open, close }
    }

    /// The opening byte.
    pub fn open(self) -> u8 {
        self.open
    }

    /// The closing byte.
    pub fn close(self) -> u8 {
        self.close
    }

    /// The key's tag: the bytes between the first opening byte and the
    /// next closing byte after it, when there is at least one.
    #[inline]
    pub fn tag(self, key: &[u8]) -> Option<&[u8]> {
        let start = memchr(self.open, key)? + 1;
        let len = memchr(self.close, &key[start..])?;
        (len > 0).then(|| &key[start..start + len])
    }

    /// What routes the key: its [`HashTag::tag`] when it has one, else the
    /// whole key.
    #[inline]
    pub fn routing_key(self, key: &[u8]) -> &[u8] {
        self.tag(key).unwrap_or(key)
    }
}

#[inline]
fn memchr(byte: u8, haystack: &[u8]) -> Option<usize> {
    haystack.iter().position(|&b| b == byte)
}

impl From<&[u8; 2]> for HashTag {
    fn from(tag: &[u8; 2]) -> HashTag {
        HashTag::new(tag[0], tag[1])
    }
}

impl From<[u8; 2]> for HashTag {
    fn from(tag: [u8; 2]) -> HashTag {
        HashTag::new(tag[0], tag[1])
    }
}

impl FromStr for HashTag {
    type Err = Error;

    /// Two bytes, as nutcracker.yml's `hash_tag: "{}"`.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] unless the string is exactly two bytes long.
    fn from_str(s: &str) -> Result<HashTag> {
        match s.as_bytes() {
            &[open, close] => Ok(HashTag::new(open, close)),
            _ => Err(Error::config(format!(
                "hash tag {s:?} is not two bytes (want e.g. \"{{}}\")"
            ))),
        }
    }
}

impl fmt::Debug for HashTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text: String = [self.open, self.close]
            .iter()
            .flat_map(|b| std::ascii::escape_default(*b))
            .map(char::from)
            .collect();
        write!(f, "HashTag(b\"{text}\")")
    }
}

/// A router that applies a [`HashTag`] to another router: what a cluster
/// built with [`crate::ClusterBuilder::hash_tag`] routes with, whatever its
/// router (rb's, twemproxy's or a custom one).
///
/// - [`Router::host_for_key`]: the inner router's host for the key's
///   [`HashTag::routing_key`].
/// - [`Router::host_for_command`]: when the command's keys (movable ones
///   included: `EVAL`'s, `ZUNIONSTORE`'s, ...) all carry the same tag, the
///   inner router's host for that tag, whatever the number of keys. Else the
///   inner router decides as without tags, so a command with no tagged key
///   routes exactly as it would without this wrapper, and one whose keys
///   carry different tags (or not all a tag) is refused with
///   [`Error::Unroutable`] saying so.
///
/// ```
/// use rb::router::{HashTag, HashTagRouter, PartitionRouter};
/// use rb::{cmd, Router};
/// use std::sync::Arc;
/// let router = HashTagRouter::new(Arc::new(PartitionRouter::with_ids(0..8)?), HashTag::from(b"{}"));
/// let host = router.host_for_key(b"u1")?;
/// assert_eq!(router.host_for_command(&cmd("RENAME").arg("{u1}a").arg("{u1}b"))?, host);
/// assert!(router.host_for_command(&cmd("RENAME").arg("{u1}a").arg("{u2}b")).is_err());
/// # Ok::<(), rb::Error>(())
/// ```
#[derive(Clone)]
pub struct HashTagRouter {
    inner: Arc<dyn Router>,
    tag: HashTag,
}

impl HashTagRouter {
    /// `inner`, with keys routed by their `tag`.
    #[must_use]
    pub fn new(inner: Arc<dyn Router>, tag: HashTag) -> HashTagRouter {
        HashTagRouter { inner, tag }
    }

    /// The tag applied.
    pub fn hash_tag(&self) -> HashTag {
        self.tag
    }

    /// The router the tagged keys go to.
    pub fn inner(&self) -> &Arc<dyn Router> {
        &self.inner
    }

    /// The tag every key of `keys` carries, or why there is none.
    fn common_tag<'k>(&self, keys: &[&'k [u8]]) -> std::result::Result<&'k [u8], String> {
        let mut common: Option<(&[u8], &[u8])> = None;
        for &key in keys {
            let Some(tag) = self.tag.tag(key) else {
                return Err(format!(
                    "its {} keys do not all carry a hash tag ({} has none), so they may live on different hosts",
                    keys.len(),
                    shown(key)
                ));
            };
            match common {
                None => common = Some((tag, key)),
                Some((first, first_key)) if first != tag => {
                    return Err(format!(
                        "its {} keys carry different hash tags ({} in {}, {} in {}), so they may live on different hosts",
                        keys.len(),
                        shown(first),
                        shown(first_key),
                        shown(tag),
                        shown(key)
                    ))
                }
                Some(_) => {}
            }
        }
        common
            .map(|(tag, _)| tag)
            .ok_or_else(|| "it operates on no key".to_owned())
    }
}

/// A key or tag for an error message: quoted, cut at 40 bytes.
fn shown(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(40)];
    let more = if bytes.len() > cut.len() { "..." } else { "" };
    format!("{:?}{more}", String::from_utf8_lossy(cut))
}

impl Router for HashTagRouter {
    #[inline]
    fn host_for_key(&self, key: &[u8]) -> Result<HostId> {
        self.inner.host_for_key(self.tag.routing_key(key))
    }

    fn host_for_command(&self, cmd: &Cmd) -> Result<HostId> {
        // The everyday case: one key by the table.
        if let Ok(key) = keyspec::single_key(cmd) {
            return match self.tag.tag(key) {
                Some(tag) => self.inner.host_for_key(tag),
                None => self.inner.host_for_command(cmd),
            };
        }
        // Several keys, or movable ones: one host when they share a tag.
        let keys = match keyspec::all_keys(cmd) {
            Ok(keys) if !keys.is_empty() => keys,
            // No key: as without tags.
            Ok(_) => return self.inner.host_for_command(cmd),
            // Keys not found (unknown command, bad numkeys): as without
            // tags, with the reason when the inner router refuses too.
            Err(e) => {
                return match self.inner.host_for_command(cmd) {
                    Err(Error::Unroutable { .. }) => Err(e),
                    other => other,
                }
            }
        };
        // No tagged key: exactly as without tags (rb's refusal, or a
        // custom router's own rule).
        if keys.iter().all(|k| self.tag.tag(k).is_none()) {
            return self.inner.host_for_command(cmd);
        }
        match self.common_tag(&keys) {
            Ok(tag) => self.inner.host_for_key(tag),
            Err(why) => match self.inner.host_for_command(cmd) {
                Err(Error::Unroutable { .. }) => Err(Error::unroutable(cmd.name(), why)),
                other => other,
            },
        }
    }
}

/// The tag and the inner router's `Debug`.
impl fmt::Debug for HashTagRouter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HashTagRouter")
            .field("tag", &self.tag)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::cmd;
    use crate::router::PartitionRouter;

    fn tagged(n: u32) -> HashTagRouter {
        HashTagRouter::new(
            Arc::new(PartitionRouter::with_ids(0..n).unwrap()),
            HashTag::from(b"{}"),
        )
    }

    #[test]
    fn nutcrackers_rule() {
        let t = HashTag::from(b"{}");
        assert_eq!(t.tag(b"{a}b"), Some(&b"a"[..]));
        assert_eq!(t.tag(b"x{abc}y{z}"), Some(&b"abc"[..]));
        assert_eq!(t.tag(b"{}a"), None); // empty
        assert_eq!(t.tag(b"a{}{b}"), None); // only the first '{' counts
        assert_eq!(t.tag(b"a{b"), None); // no '}' after it
        assert_eq!(t.tag(b"a}b{"), None);
        assert_eq!(t.tag(b"}{x}"), Some(&b"x"[..]));
        assert_eq!(t.tag(b"{{x}}"), Some(&b"{x"[..]));
        assert_eq!(t.tag(b""), None);
        let c = HashTag::from(b"::");
        assert_eq!(c.tag(b"user:1:name"), Some(&b"1"[..]));
        assert_eq!(c.tag(b"user::name"), None);
        assert_eq!(c.tag(b"user:1"), None);
        assert_eq!(format!("{c:?}"), "HashTag(b\"::\")");
        assert!("{".parse::<HashTag>().is_err());
        assert!("{}}".parse::<HashTag>().is_err());
        assert_eq!("{}".parse::<HashTag>().unwrap(), t);
    }

    #[test]
    fn same_tag_commands_route_as_one() {
        let r = tagged(16);
        let host = r.host_for_key(b"user7").unwrap();
        for c in [
            cmd("GET").arg("{user7}:a"),
            cmd("RENAME").arg("{user7}:a").arg("{user7}:b"),
            cmd("SUNIONSTORE")
                .arg("{user7}d")
                .arg("{user7}a")
                .arg("{user7}b"),
            cmd("SMOVE").arg("{user7}a").arg("{user7}b").arg("m"),
            cmd("MGET").arg("{user7}a").arg("{user7}b"),
            cmd("MSET").arg("{user7}a").arg(1).arg("{user7}b").arg(2),
            cmd("DEL").arg("{user7}a").arg("{user7}b"),
            cmd("EVAL")
                .arg("return 1")
                .arg(2)
                .arg("{user7}a")
                .arg("{user7}b")
                .arg("x"),
            cmd("EVALSHA").arg("abc").arg(1).arg("{user7}a"),
            cmd("FCALL").arg("f").arg(2).arg("{user7}a").arg("{user7}b"),
            cmd("ZUNIONSTORE")
                .arg("{user7}d")
                .arg(2)
                .arg("{user7}a")
                .arg("{user7}b"),
            cmd("ZINTER").arg(2).arg("{user7}a").arg("{user7}b"),
            cmd("LMPOP")
                .arg(2)
                .arg("{user7}a")
                .arg("{user7}b")
                .arg("LEFT"),
            cmd("BLMPOP")
                .arg(0)
                .arg(2)
                .arg("{user7}a")
                .arg("{user7}b")
                .arg("LEFT"),
            cmd("XREAD")
                .arg("COUNT")
                .arg(2)
                .arg("STREAMS")
                .arg("{user7}a")
                .arg("{user7}b")
                .arg(0)
                .arg(0),
            cmd("XREADGROUP")
                .arg("GROUP")
                .arg("STREAMS")
                .arg("c")
                .arg("STREAMS")
                .arg("{user7}a")
                .arg(">"),
            cmd("SORT")
                .arg("{user7}a")
                .arg("BY")
                .arg("nosort")
                .arg("STORE")
                .arg("{user7}b"),
            cmd("GEORADIUS")
                .arg("{user7}a")
                .arg(0)
                .arg(0)
                .arg(1)
                .arg("km")
                .arg("STORE")
                .arg("{user7}b"),
        ] {
            assert_eq!(r.host_for_command(&c).unwrap(), host, "{c:?}");
        }
    }

    #[test]
    fn untagged_commands_route_as_without_tags() {
        let r = tagged(16);
        let plain = PartitionRouter::with_ids(0..16).unwrap();
        let get = cmd("GET").arg("foo");
        assert_eq!(
            r.host_for_command(&get).unwrap(),
            plain.host_for_command(&get).unwrap()
        );
        for c in [
            cmd("PING"),
            cmd("RENAME").arg("a").arg("b"),
            cmd("EVAL").arg("return 1").arg(2).arg("a").arg("b"),
            cmd("EVAL").arg("return 1").arg(0),
            cmd("NOSUCH").arg("{a}b"),
            cmd("MIGRATE").arg("h").arg(1).arg("{a}b").arg(0).arg(1),
        ] {
            let a = r.host_for_command(&c).unwrap_err().to_string();
            let b = plain.host_for_command(&c).unwrap_err().to_string();
            assert_eq!(a, b, "{c:?}");
        }
    }

    #[test]
    fn mixed_tags_are_refused_saying_why() {
        let r = tagged(16);
        let e = r
            .host_for_command(&cmd("RENAME").arg("{u1}a").arg("{u2}b"))
            .unwrap_err();
        assert!(matches!(e, Error::Unroutable { .. }));
        let text = e.to_string();
        assert!(
            text.contains("RENAME") && text.contains("different hash tags"),
            "{text}"
        );
        assert!(text.contains("\"u1\"") && text.contains("\"u2\""), "{text}");
        let e = r
            .host_for_command(&cmd("SUNIONSTORE").arg("{u1}d").arg("plain"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"plain\" has none"), "{e}");
        let e = r
            .host_for_command(&cmd("EVAL").arg("s").arg(3).arg("{u1}a"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("numkeys"), "{e}");
    }
}
