//! Which hosts are known to hold which Lua scripts.
//!
//! A cluster remembers every (host, script hash) pair it has seen loaded, so
//! running a script a second time costs no `SCRIPT EXISTS` round trip and no
//! reload. A `NOSCRIPT` reply (after `SCRIPT FLUSH` or a server restart)
//! makes it forget the pair, so the next use loads the script again.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use crate::error::HostId;

/// The cluster-wide memory of loaded scripts.
#[derive(Default)]
pub(crate) struct ScriptMemory {
    known: Mutex<HashSet<(HostId, Arc<str>)>>,
}

impl ScriptMemory {
    fn known(&self) -> std::sync::MutexGuard<'_, HashSet<(HostId, Arc<str>)>> {
        self.known
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether `host` is known to hold the script with hash `sha`.
    pub(crate) fn knows(&self, host: HostId, sha: &str) -> bool {
        self.known().contains(&(host, Arc::from(sha)))
    }

    /// `host` holds `sha` (it was loaded, or `SCRIPT EXISTS` said so).
    pub(crate) fn remember(&self, host: HostId, sha: &str) {
        self.known().insert((host, Arc::from(sha)));
    }

    /// `host` lost `sha` (it answered `NOSCRIPT`).
    pub(crate) fn forget(&self, host: HostId, sha: &str) {
        self.known().remove(&(host, Arc::from(sha)));
    }

    /// Forgets everything about `host` (it was removed or replaced).
    pub(crate) fn forget_host(&self, host: HostId) {
        self.known().retain(|(h, _)| *h != host);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_and_forgets() {
        let m = ScriptMemory::default();
        assert!(!m.knows(1, "abc"));
        m.remember(1, "abc");
        m.remember(2, "abc");
        assert!(m.knows(1, "abc") && !m.knows(1, "def"));
        m.forget(1, "abc");
        assert!(!m.knows(1, "abc") && m.knows(2, "abc"));
        m.forget_host(2);
        assert!(!m.knows(2, "abc"));
    }
}
