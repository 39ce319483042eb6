//! The multi-key commands rb emulates across hosts: [`split`] cuts `MGET`,
//! `MSET`, `DEL`, `UNLINK`, `EXISTS` and `TOUCH` into one command per host,
//! and [`Split::combine`] puts the per-host replies back together in the
//! caller's key order (values) or summed (counts).

use crate::cmd::{cmd, Cmd, Common};
use crate::error::{Error, HostId, Result};
use crate::resp::Value;
use crate::router::Router;

/// The multi-key commands rb emulates across hosts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MultiKey {
    /// `MGET`: values back in the caller's key order.
    Mget,
    /// `MSET`: `OK` once every host said `OK`.
    Mset,
    /// `DEL`, `UNLINK`, `EXISTS`, `TOUCH`: the hosts' counts summed.
    Count,
}

impl MultiKey {
    /// The emulated kind of `cmd`, when it has keys on more than one host
    /// potentially (more than one key).
    pub(crate) fn of(cmd: &Cmd) -> Option<MultiKey> {
        if cmd.arg_count() < 2 || cmd.common() != Common::Other {
            return None;
        }
        // Most commands are none of these: tell by the first letter.
        let kind = match cmd.name().first().map(u8::to_ascii_uppercase) {
            Some(b'M') if cmd.is(b"MGET") => MultiKey::Mget,
            Some(b'M') if cmd.is(b"MSET") => MultiKey::Mset,
            Some(b'D') if cmd.is(b"DEL") => MultiKey::Count,
            Some(b'U') if cmd.is(b"UNLINK") => MultiKey::Count,
            Some(b'E') if cmd.is(b"EXISTS") => MultiKey::Count,
            Some(b'T') if cmd.is(b"TOUCH") => MultiKey::Count,
            _ => return None,
        };
        let keys = match kind {
            MultiKey::Mset => cmd.arg_count() / 2,
            _ => cmd.arg_count(),
        };
        (keys > 1).then_some(kind)
    }
}

/// One multi-key command cut into one command per host.
pub(crate) struct Split {
    kind: MultiKey,
    keys: usize,
    /// Per host: its command and the caller's positions of its keys.
    pub(crate) parts: Vec<(HostId, Cmd, Vec<usize>)>,
}

/// Cuts `cmd` by the hosts of its keys (see [`MultiKey`]).
pub(crate) fn split(kind: MultiKey, command: &Cmd, router: &dyn Router) -> Result<Split> {
    let stride = if kind == MultiKey::Mset { 2 } else { 1 };
    if command.arg_count() % stride != 0 {
        return Err(Error::unroutable(
            command.name(),
            "MSET needs key value pairs (an odd number of arguments was given)",
        ));
    }
    let args: Vec<&[u8]> = command.args().collect();
    let keys = args.len() / stride;
    let mut parts: Vec<(HostId, Cmd, Vec<usize>)> = Vec::new();
    for (pos, chunk) in args.chunks(stride).enumerate() {
        let host = router.host_for_key(chunk[0])?;
        let part = match parts.iter_mut().position(|(h, _, _)| *h == host) {
            Some(i) => &mut parts[i],
            None => {
                let name = String::from_utf8_lossy(command.name()).into_owned();
                parts.push((host, cmd(&name), Vec::new()));
                let last = parts.len() - 1;
                &mut parts[last]
            }
        };
        for arg in chunk {
            part.1.push_arg(*arg);
        }
        part.2.push(pos);
    }
    Ok(Split { kind, keys, parts })
}

impl Split {
    /// Puts the per-host replies (in `parts` order) back together.
    pub(crate) fn combine(&self, replies: Vec<Value>) -> Result<Value> {
        match self.kind {
            MultiKey::Mset => Ok(Value::SimpleString("OK".into())),
            MultiKey::Count => {
                let mut sum: i64 = 0;
                for reply in replies {
                    match reply {
                        Value::Int(n) => sum = sum.saturating_add(n),
                        other => {
                            return Err(Error::type_mismatch("integer count", other.describe()))
                        }
                    }
                }
                Ok(Value::Int(sum))
            }
            MultiKey::Mget => {
                let mut out: Vec<Value> = vec![Value::Nil; self.keys];
                for ((_, _, positions), reply) in self.parts.iter().zip(replies) {
                    let Value::Array(items) = reply else {
                        return Err(Error::type_mismatch("MGET array", reply.describe()));
                    };
                    if items.len() != positions.len() {
                        return Err(Error::protocol(format!(
                            "MGET of {} keys answered with {} values",
                            positions.len(),
                            items.len()
                        )));
                    }
                    for (pos, item) in positions.iter().zip(items) {
                        if let Some(slot) = out.get_mut(*pos) {
                            *slot = item;
                        }
                    }
                }
                Ok(Value::Array(out))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::PartitionRouter;

    #[test]
    fn split_and_combine_keep_caller_order() {
        let router = PartitionRouter::with_ids(0..4).unwrap();
        let keys: Vec<String> = (0..20).map(|i| format!("key{i}")).collect();
        let mget = cmd("MGET").args_from(&keys);
        let split = split(MultiKey::of(&mget).unwrap(), &mget, &router).unwrap();
        assert!(split.parts.len() > 1);
        // Each host answers its keys' own names as values.
        let replies = split
            .parts
            .iter()
            .map(|(host, part, _)| {
                for k in part.args() {
                    assert_eq!(router.host_for_key(k).unwrap(), *host);
                }
                Value::Array(part.args().map(|k| Value::BulkString(k.to_vec())).collect())
            })
            .collect();
        let combined = split.combine(replies).unwrap();
        let want = Value::Array(
            keys.iter()
                .map(|k| Value::BulkString(k.clone().into_bytes()))
                .collect(),
        );
        assert_eq!(combined, want);

        let del = cmd("DEL").args_from(&keys);
        let split = super::split(MultiKey::of(&del).unwrap(), &del, &router).unwrap();
        let replies = split
            .parts
            .iter()
            .map(|(_, p, _)| Value::Int(p.arg_count() as i64))
            .collect();
        assert_eq!(split.combine(replies).unwrap(), Value::Int(20));

        let mset = cmd("MSET").arg("a").arg(1).arg("b").arg(2).arg("c").arg(3);
        let split = super::split(MultiKey::Mset, &mset, &router).unwrap();
        let pairs: usize = split.parts.iter().map(|(_, p, _)| p.arg_count()).sum();
        assert_eq!(pairs, 6);
        assert!(super::split(
            MultiKey::Mset,
            &cmd("MSET").arg("a").arg(1).arg("b"),
            &router
        )
        .is_err());
    }

    #[test]
    fn single_key_forms_are_not_emulated() {
        assert_eq!(MultiKey::of(&cmd("MGET").arg("a")), None);
        assert_eq!(MultiKey::of(&cmd("DEL").arg("a")), None);
        assert_eq!(MultiKey::of(&cmd("MSET").arg("a").arg(1)), None);
        assert_eq!(
            MultiKey::of(&cmd("EXISTS").arg("a").arg("b")),
            Some(MultiKey::Count)
        );
    }
}
