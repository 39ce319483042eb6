//! Lua scripts across many hosts: which hosts are known to hold which
//! scripts, and how a script call keeps its place in a pipeline.
//!
//! A cluster remembers every (host, script hash) pair it has seen loaded
//! ([`ScriptMemory`]), so running a script a second time costs no
//! `SCRIPT EXISTS` round trip and no reload. A `NOSCRIPT` reply (after
//! `SCRIPT FLUSH` or a server restart) makes it forget the pair, so the
//! next use loads the script again.
//!
//! Order ([`ScriptLoads`]): a script call that more calls to its host
//! follow gets `SCRIPT LOAD` pipelined ahead of its `EVALSHA`, whatever the
//! memory says, so a flushed script cannot answer `NOSCRIPT` while the
//! commands after it run; a script call with nothing after it loads only
//! where the host is not known to hold it, and a `NOSCRIPT` then is retried
//! once by the caller ([`retry_noscript`]), with nothing to reorder.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use crate::cmd::{cmd, Cmd, ScriptCall};
use crate::convert::FromValue;
use crate::error::{HostId, Result};
use crate::promise::Promise;

/// Whether an error is the server's "no such script" answer.
pub(crate) fn is_noscript(e: &crate::error::Error) -> bool {
    e.code() == Some("NOSCRIPT")
}

/// Sends one command to one host of a session, answering with a promise.
pub(crate) trait Enqueue {
    /// Queues `cmd` for `host`.
    fn enqueue<T: FromValue + 'static>(&mut self, host: HostId, cmd: &Cmd) -> Promise<T>;
}

/// The `SCRIPT LOAD`s one session queued, so each (host, script) is loaded
/// at most once per session.
#[derive(Default)]
pub(crate) struct ScriptLoads {
    queued: HashMap<(HostId, Arc<str>), Promise<String>>,
}

impl ScriptLoads {
    /// Queues `call` on `host` through `to`: `SCRIPT LOAD` first when the
    /// host may lack the script (or always, with `followed`: calls after
    /// this one depend on it running now), then `EVALSHA`. A `NOSCRIPT`
    /// answer makes `memory` forget the pair; a script that failed to load
    /// (a Lua syntax error) is reported as that failure.
    pub(crate) fn call<T: FromValue + 'static>(
        &mut self,
        to: &mut impl Enqueue,
        memory: &Arc<ScriptMemory>,
        host: HostId,
        call: &ScriptCall,
        followed: bool,
    ) -> Promise<T> {
        let sha: Arc<str> = call.script.sha1().into();
        let key = (host, sha.clone());
        if (followed || !memory.knows(host, &sha)) && !self.queued.contains_key(&key) {
            let load = cmd("SCRIPT").arg("LOAD").arg(call.script.source());
            let loaded: Promise<String> = to.enqueue(host, &load);
            let (m, s) = (memory.clone(), sha.clone());
            loaded.done(
                move |got| {
                    if **got == *s {
                        m.remember(host, &s);
                    }
                },
                |_| {},
            );
            self.queued.insert(key.clone(), loaded);
        }
        let load = self.queued.get(&key).cloned();
        let evalsha: Promise<T> = to.enqueue(host, &call.evalsha());
        let result = Promise::new();
        let out = result.clone();
        let memory = memory.clone();
        evalsha.on_result(move |r| {
            out.settle(match r {
                Err(e) if is_noscript(&e) => {
                    memory.forget(host, &sha);
                    Err(load.and_then(|l| l.reason()).unwrap_or(e))
                }
                other => other,
            })
        });
        result
    }
}

/// Runs an immediate script call, and once more if the script vanished
/// (`NOSCRIPT`: flushed or restarted since it was last seen; the failed
/// call forgot it, so the second run loads it).
///
/// # Errors
///
/// The second run's error, or the first's when it was not `NOSCRIPT`.
pub(crate) fn retry_noscript<T>(mut run: impl FnMut() -> Result<T>) -> Result<T> {
    match run() {
        Err(e) if is_noscript(&e) => run(),
        other => other,
    }
}

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
