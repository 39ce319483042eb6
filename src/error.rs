//! The one error type of the crate.
//!
//! Every variant that concerns a node names it (id and address, see
//! [`HostName`]); every variant that concerns a command names the command.
//! Strings are reference counted so that rejecting ten thousand promises with
//! the same connection failure costs ten thousand pointer copies, not ten
//! thousand allocations.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// The id of a host in a cluster (rb's `host_id`).
pub type HostId = u32;

/// `Result` with [`Error`] as its error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A host as errors name it: its id and its address, e.g.
/// `host 3 (127.0.0.1:6379/0)`.
#[derive(Clone, PartialEq, Eq)]
pub struct HostName {
    /// The host's id in the cluster.
    pub id: HostId,
    /// Where it lives: `host:port/db`, or `unix:path/db`.
    pub addr: Arc<str>,
}

impl fmt::Display for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "host {} ({})", self.id, self.addr)
    }
}

impl fmt::Debug for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Which part of a request ran out of time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Establishing the connection (TCP/unix connect, TLS handshake).
    Connect,
    /// Sending the request.
    Write,
    /// Waiting for the reply (also: a map's join deadline).
    Read,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Connect => "connect",
            Phase::Write => "write",
            Phase::Read => "read",
        })
    }
}

/// Renders `Some(x)` as `"{prefix}{x}"` and `None` as nothing.
struct Opt<'a, T>(&'a str, &'a Option<T>);

impl<T: fmt::Display> fmt::Display for Opt<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.1 {
            Some(v) => write!(f, "{}{}", self.0, v),
            None => Ok(()),
        }
    }
}

/// Renders when a Down host is tried again.
struct RetryIn(Duration);

impl fmt::Display for RetryIn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_zero() {
            f.write_str("a probe is under way")
        } else {
            write!(f, "retried in {:?}", self.0)
        }
    }
}

/// Everything that can go wrong in rb.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The server answered with an error reply (`-ERR ...`, `-WRONGTYPE ...`).
    #[error("{}{command}: server error {code}: {message}", Opt("", host).to_string() + if host.is_some() { ": " } else { "" })]
    Server {
        /// The host that replied, when known.
        host: Option<HostName>,
        /// The command that was refused (its name).
        command: Arc<str>,
        /// The error code: the reply's first word (`ERR`, `WRONGTYPE`, `NOSCRIPT`, ...).
        code: Arc<str>,
        /// The rest of the reply.
        message: Arc<str>,
    },

    /// The peer broke the protocol (or a limit of it); the connection is closed.
    #[error("{}protocol error: {reason}", Opt("", host).to_string() + if host.is_some() { ": " } else { "" })]
    Protocol {
        /// The host whose bytes were bad, when known.
        host: Option<HostName>,
        /// What was wrong.
        reason: Arc<str>,
    },

    /// The connection failed (refused, reset, closed by the peer).
    #[error("{host}: connection error{}: {reason}", Opt(" during ", command))]
    Connection {
        /// The host the connection was to.
        host: HostName,
        /// The command whose reply was lost, when one was.
        command: Option<Arc<str>>,
        /// The kind of I/O error.
        kind: std::io::ErrorKind,
        /// The error as the OS (or rb) described it.
        reason: Arc<str>,
    },

    /// A deadline passed.
    #[error(
        "{host}: {phase} timed out after {budget:?}{}",
        Opt(" waiting for ", command)
    )]
    Timeout {
        /// The host that was too slow.
        host: HostName,
        /// What was under way.
        phase: Phase,
        /// The budget that ran out.
        budget: Duration,
        /// The command that did not complete, when one is known.
        command: Option<Arc<str>>,
    },

    /// The TLS layer failed (bad certificate, handshake failure).
    #[error("{host}: TLS error: {reason}")]
    Tls {
        /// The host the TLS session was with.
        host: HostName,
        /// What rustls said.
        reason: Arc<str>,
    },

    /// A command cannot be sent to exactly one host.
    #[error("command {command} cannot be routed: {reason}")]
    #[doc(alias = "UnroutableCommand")]
    Unroutable {
        /// The command's name.
        command: Arc<str>,
        /// Why (no key, several keys, movable keys, unknown command).
        reason: Arc<str>,
    },

    /// A command rb cannot pipeline (it switches the connection into a
    /// push mode: pub/sub, `MONITOR`).
    #[error("command {command} is not supported: {reason}")]
    Unsupported {
        /// The command's name.
        command: Arc<str>,
        /// Why.
        reason: Arc<str>,
    },

    /// The cluster's hosts do not fit the router (e.g. a gap in the ids).
    #[error("bad host setup: {reason}")]
    BadHostSetup {
        /// What is wrong, naming the missing host id.
        reason: Arc<str>,
    },

    /// A host id that the cluster does not have.
    #[error("no host with id {id} in the cluster")]
    NoSuchHost {
        /// The id asked for.
        id: HostId,
    },

    /// A reply could not be converted to the requested Rust type.
    #[error("{}{}cannot convert reply {got} to {expected}", Opt("", host).to_string() + if host.is_some() { ": " } else { "" }, Opt("", command).to_string() + if command.is_some() { ": " } else { "" })]
    Type {
        /// The host that replied, when known.
        host: Option<HostName>,
        /// The command whose reply it was, when known.
        command: Option<Arc<str>>,
        /// The Rust type asked for.
        expected: &'static str,
        /// A short description of the reply.
        got: Arc<str>,
    },

    /// A configuration value is invalid (bad URL, bad option).
    #[error("invalid configuration: {reason}")]
    Config {
        /// What is wrong and where.
        reason: Arc<str>,
    },

    /// The request was cancelled before its reply came ([`crate::MappingClient::cancel`],
    /// or a mapping client dropped without a join); its connection was closed.
    #[error("{host}: cancelled{}", Opt(" while waiting for ", command))]
    Cancelled {
        /// The host the request was for.
        host: HostName,
        /// The command, when one is known.
        command: Option<Arc<str>>,
    },

    /// The host is Down (its circuit breaker is open, see
    /// [`HealthPolicy`](crate::HealthPolicy)): the request failed at once,
    /// with no connect attempt and no waiting.
    #[error(
        "{host} has been down for {down_for:?} (last error: {last_error}); {}",
        RetryIn(*retry_in)
    )]
    HostDown {
        /// The host that is Down.
        host: HostName,
        /// How long it has been Down when this error was made (rounded to
        /// the millisecond): the whole outage, failed probes included.
        down_for: Duration,
        /// How long until it is tried again (rounded up to the millisecond);
        /// zero while a probe is under way.
        retry_in: Duration,
        /// The failure that took it Down (or made its last probe fail).
        /// Shown in the message; not a [`source`](std::error::Error::source),
        /// so that reports do not print it twice.
        last_error: Arc<Error>,
    },

    /// A watched transaction met a conflict (a watched key changed before
    /// `EXEC`) on every one of its tries.
    #[error("{host}: transaction aborted: a watched key changed on each of {tries} tries")]
    TransactionAborted {
        /// The host the transaction ran on.
        host: HostName,
        /// How many times it ran.
        tries: u32,
    },

    /// A promise's value was asked for while it is pending (or after it was
    /// taken); or an async request of several steps (a migrating cluster's)
    /// lost its driver before its steps ended.
    #[error("{reason}")]
    Pending {
        /// Which of the two.
        reason: Arc<str>,
    },
}

impl Error {
    /// Builds a [`Error::Server`] from an error reply's text (`"CODE message"`).
    pub fn server(host: Option<HostName>, command: &str, text: &str) -> Error {
        let (code, message) = split_error_code(text);
        Error::Server {
            host,
            command: command.into(),
            code: code.into(),
            message: message.into(),
        }
    }

    pub(crate) fn protocol(reason: impl Into<Arc<str>>) -> Error {
        Error::Protocol {
            host: None,
            reason: reason.into(),
        }
    }

    pub(crate) fn unroutable(command: &[u8], reason: impl Into<Arc<str>>) -> Error {
        Error::Unroutable {
            command: String::from_utf8_lossy(command).to_ascii_uppercase().into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn config(reason: impl Into<Arc<str>>) -> Error {
        Error::Config {
            reason: reason.into(),
        }
    }

    pub(crate) fn type_mismatch(expected: &'static str, got: impl Into<Arc<str>>) -> Error {
        Error::Type {
            host: None,
            command: None,
            expected,
            got: got.into(),
        }
    }

    /// Fills in the host and command where the error does not name them yet.
    ///
    /// The codec and the conversions do not know which host or command they
    /// serve; the engine calls this before handing an error to the user.
    pub(crate) fn with_context(mut self, who: &HostName, what: &str) -> Error {
        match &mut self {
            Error::Server { host, command, .. } => {
                host.get_or_insert_with(|| who.clone());
                if command.is_empty() {
                    *command = what.into();
                }
            }
            Error::Protocol { host, .. } => {
                host.get_or_insert_with(|| who.clone());
            }
            Error::Type { host, command, .. } => {
                host.get_or_insert_with(|| who.clone());
                command.get_or_insert_with(|| what.into());
            }
            Error::Connection { command, .. }
            | Error::Timeout { command, .. }
            | Error::Cancelled { command, .. } => {
                command.get_or_insert_with(|| what.into());
            }
            _ => {}
        }
        self
    }

    /// Names the command where the error does not name one yet.
    pub(crate) fn with_context_command(mut self, what: &str) -> Error {
        match &mut self {
            Error::Server { command, .. } if command.is_empty() => *command = what.into(),
            Error::Connection { command, .. }
            | Error::Timeout { command, .. }
            | Error::Cancelled { command, .. }
            | Error::Type { command, .. } => {
                command.get_or_insert_with(|| what.into());
            }
            _ => {}
        }
        self
    }

    /// The host this error concerns, when it concerns one.
    pub fn host(&self) -> Option<&HostName> {
        match self {
            Error::Server { host, .. }
            | Error::Protocol { host, .. }
            | Error::Type { host, .. } => host.as_ref(),
            Error::Connection { host, .. }
            | Error::Timeout { host, .. }
            | Error::Tls { host, .. }
            | Error::Cancelled { host, .. }
            | Error::TransactionAborted { host, .. }
            | Error::HostDown { host, .. } => Some(host),
            _ => None,
        }
    }

    /// The server's error code (`ERR`, `WRONGTYPE`, ...) for a server error.
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Server { code, .. } => Some(code),
            _ => None,
        }
    }

    /// True for a deadline that passed.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout { .. })
    }

    /// True when the request was refused because its host is Down
    /// ([`Error::HostDown`]).
    pub fn is_host_down(&self) -> bool {
        matches!(self, Error::HostDown { .. })
    }

    /// True when the connection failed or broke the protocol (its state is
    /// unknown, so it is closed rather than pooled).
    pub fn is_connection_error(&self) -> bool {
        matches!(
            self,
            Error::Connection { .. }
                | Error::Protocol { .. }
                | Error::Tls { .. }
                | Error::Timeout { .. }
        )
    }
}

/// Splits `"WRONGTYPE Operation against ..."` into `("WRONGTYPE", "Operation against ...")`.
///
/// Redis puts an upper-case code first by convention; a reply without one
/// (rare, from modules or scripts) gets the generic code `ERR`.
pub(crate) fn split_error_code(text: &str) -> (&str, &str) {
    let (first, rest) = match text.split_once(' ') {
        Some((first, rest)) => (first, rest),
        None => (text, ""),
    };
    let is_code = !first.is_empty()
        && first
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if is_code {
        (first, rest)
    } else {
        ("ERR", text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostName {
        HostName {
            id: 3,
            addr: "127.0.0.1:6379/0".into(),
        }
    }

    #[test]
    fn error_is_small() {
        assert!(
            std::mem::size_of::<Error>() <= 80,
            "{}",
            std::mem::size_of::<Error>()
        );
    }

    #[test]
    fn server_error_keeps_code_apart() {
        let e = Error::server(Some(host()), "GET", "WRONGTYPE Operation against a key");
        assert_eq!(e.code(), Some("WRONGTYPE"));
        assert_eq!(
            e.to_string(),
            "host 3 (127.0.0.1:6379/0): GET: server error WRONGTYPE: Operation against a key"
        );
        let e = Error::server(None, "EVAL", "user script failed");
        assert_eq!(e.code(), Some("ERR"));
        assert_eq!(e.to_string(), "EVAL: server error ERR: user script failed");
    }

    #[test]
    fn host_down_names_host_outage_and_retry() {
        let refused = Error::Connection {
            host: host(),
            command: None,
            kind: std::io::ErrorKind::ConnectionRefused,
            reason: "Connection refused (os error 111)".into(),
        };
        let e = Error::HostDown {
            host: host(),
            down_for: Duration::from_millis(1200),
            retry_in: Duration::from_millis(300),
            last_error: Arc::new(refused),
        };
        assert_eq!(
            e.to_string(),
            "host 3 (127.0.0.1:6379/0) has been down for 1.2s (last error: \
             host 3 (127.0.0.1:6379/0): connection error: Connection refused (os error 111)); \
             retried in 300ms"
        );
        assert_eq!(e.host(), Some(&host()));
        assert!(e.is_host_down());
        assert!(!e.is_connection_error());
        assert!(!e.is_timeout());
        assert_eq!(e.code(), None);
        // Context never changes it.
        let e = e.with_context(&host(), "GET").with_context_command("SET");
        let Error::HostDown { retry_in, .. } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(*retry_in, Duration::from_millis(300));

        let probing = Error::HostDown {
            host: host(),
            down_for: Duration::from_secs(2),
            retry_in: Duration::ZERO,
            last_error: Arc::new(Error::Timeout {
                host: host(),
                phase: Phase::Connect,
                budget: Duration::from_millis(100),
                command: None,
            }),
        };
        assert!(probing
            .to_string()
            .ends_with("connect timed out after 100ms); a probe is under way"));
    }

    #[test]
    fn context_fills_only_gaps() {
        let e = Error::type_mismatch("i64", "bulk string \"abc\"").with_context(&host(), "INCR");
        assert_eq!(
            e.to_string(),
            "host 3 (127.0.0.1:6379/0): INCR: cannot convert reply bulk string \"abc\" to i64"
        );
        let e = Error::Timeout {
            host: host(),
            phase: Phase::Read,
            budget: Duration::from_millis(200),
            command: None,
        }
        .with_context(&host(), "GET");
        assert_eq!(
            e.to_string(),
            "host 3 (127.0.0.1:6379/0): read timed out after 200ms waiting for GET"
        );
    }
}
