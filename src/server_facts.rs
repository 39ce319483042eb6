//! What a cluster has learned about its servers while keys move between
//! them: which hosts are the same server and which pairs of hosts cannot
//! `MIGRATE` to each other. Looked up by a host's place (`host:port/db`), which
//! outlives host ids when hosts are added or replaced.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

/// Facts about servers, filled as they are learned.
#[derive(Default)]
pub(crate) struct ServerFacts {
    run_ids: Mutex<HashMap<Arc<str>, Arc<str>>>,
    no_migrate: Mutex<HashSet<(Arc<str>, Arc<str>)>>,
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
}

/// A field of an `INFO` reply (`name:value` lines).
pub(crate) fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(str::trim)
    })
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
}
