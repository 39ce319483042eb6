//! What a cluster has learned about its servers while keys move between
//! them: which hosts are the same server, which pairs of hosts cannot
//! `MIGRATE` to each other, and each old host's write epoch (see
//! [`write_epoch`]). Looked up by a host's place (`host:port/db`), which
//! outlives host ids when hosts are added or replaced.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

/// Facts about servers, filled as they are learned.
#[derive(Default)]
pub(crate) struct ServerFacts {
    run_ids: Mutex<HashMap<Arc<str>, Arc<str>>>,
    no_migrate: Mutex<HashSet<(Arc<str>, Arc<str>)>>,
    migrate_ok: Mutex<HashSet<(Arc<str>, Arc<str>)>>,
    epochs: Mutex<HashMap<Arc<str>, u64>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ServerFacts {
    /// The `run_id` of the server at `place`, if known.
    pub(crate) fn run_id(&self, place: &Arc<str>) -> Option<Arc<str>> {
        lock(&self.run_ids).get(place).cloned()
    }

    /// Remembers the `run_id` read from `INFO server` at `place`.
    pub(crate) fn learn_run_id(&self, place: &Arc<str>, info: &str) -> Arc<str> {
        let id: Arc<str> = info_field(info, "run_id").unwrap_or("").into();
        lock(&self.run_ids).insert(place.clone(), id.clone());
        id
    }

    /// Whether a `MIGRATE` from `from` to `to` failed outright before.
    pub(crate) fn cannot_migrate(&self, from: &Arc<str>, to: &Arc<str>) -> bool {
        lock(&self.no_migrate).contains(&(from.clone(), to.clone()))
    }

    /// Remembers that a `MIGRATE` from `from` to `to` failed outright.
    pub(crate) fn migrate_failed(&self, from: &Arc<str>, to: &Arc<str>) {
        lock(&self.no_migrate).insert((from.clone(), to.clone()));
    }

    /// Whether a canary showed that a `MIGRATE` from `from` lands on the
    /// server this client reaches as `to`.
    pub(crate) fn migrate_checked(&self, from: &Arc<str>, to: &Arc<str>) -> bool {
        lock(&self.migrate_ok).contains(&(from.clone(), to.clone()))
    }

    /// Remembers that a canary `MIGRATE` from `from` landed on `to`.
    pub(crate) fn migrate_works(&self, from: &Arc<str>, to: &Arc<str>) {
        lock(&self.migrate_ok).insert((from.clone(), to.clone()));
    }

    /// The write epochs known now, by place.
    pub(crate) fn epochs(&self) -> HashMap<Arc<str>, u64> {
        lock(&self.epochs).clone()
    }

    /// The write epoch known now of the server at `place`.
    pub(crate) fn epoch(&self, place: &Arc<str>) -> Option<u64> {
        lock(&self.epochs).get(place).copied()
    }

    /// Remembers the write epoch just read at `place`.
    pub(crate) fn learn_epoch(&self, place: &Arc<str>, epoch: u64) {
        lock(&self.epochs).insert(place.clone(), epoch);
    }
}

/// A field of an `INFO` reply (`name:value` lines).
pub(crate) fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(str::trim)
    })
}

/// A server's write epoch from its `INFO persistence`: it changes whenever
/// a key there changes (the server's count of changes since its last save,
/// with the save count and time so that a save's reset cannot repeat a
/// value). If two reads of it are equal, no key left that server between
/// them: a read that missed a key on its new owner before the first and
/// on this old owner after the second missed a key that was nowhere. `None`
/// when the reply lacks the count.
pub(crate) fn write_epoch(info: &str) -> Option<u64> {
    let changes = info_field(info, "rdb_changes_since_last_save")?;
    let mut hash = 0xcbf2_9ce4_8422_2325_u64;
    for field in [
        changes,
        info_field(info, "rdb_last_save_time").unwrap_or(""),
        info_field(info, "rdb_saves").unwrap_or(""),
        info_field(info, "rdb_bgsave_in_progress").unwrap_or(""),
    ] {
        for b in field.bytes().chain([b'|']) {
            hash = (hash ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    Some(hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_fields_are_found_by_their_whole_name() {
        let info = "# Server\r\nrun_id_x:no\r\nrun_id:abc123\r\n";
        assert_eq!(info_field(info, "run_id"), Some("abc123"));
        assert_eq!(info_field(info, "run"), None);
    }

    #[test]
    fn the_epoch_changes_with_the_count_and_the_saves() {
        let at = |changes: u32, saves: u32| {
            write_epoch(&format!(
                "# Persistence\r\nloading:0\r\nrdb_changes_since_last_save:{changes}\r\nrdb_last_save_time:1700000000\r\nrdb_saves:{saves}\r\n"
            ))
        };
        assert_eq!(at(5, 0), at(5, 0));
        assert_ne!(at(5, 0), at(6, 0));
        assert_ne!(at(5, 0), at(5, 1));
        assert_eq!(write_epoch("# Persistence\r\nloading:0\r\n"), None);
    }
}
