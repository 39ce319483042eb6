//! Host configuration: [`HostConfig`] (what the user sets, merged over the
//! cluster's defaults), [`HostInfo`] (the resolved host), URL parsing and
//! timeouts.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, HostId, HostName, Result};

/// Default connect timeout: 5 s.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Default bound on the bytes of one reply: 1 GiB, twice the largest bulk
/// string Redis accepts (`proto-max-bulk-len`, 512 MiB), so any real reply
/// fits while a peer that streams without end is refused.
pub const DEFAULT_MAX_REPLY_BYTES: usize = 1 << 30;

/// Default bound on the elements of one reply, nested ones included:
/// 32 Mi (an `HGETALL` of a 16-million-field hash).
pub const DEFAULT_MAX_REPLY_ELEMENTS: usize = 32 << 20;

/// The protocol spoken with a host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// RESP2, what every Redis speaks (the default).
    #[default]
    Resp2,
    /// RESP3, switched on with `HELLO 3` in the handshake (Redis 6+).
    Resp3,
}

/// TLS settings of a host (used with the `tls` feature).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
#[doc(alias = "ssl_options")]
pub struct TlsOptions {
    /// PEM file of the CA(s) to trust instead of the built-in web roots.
    pub ca_file: Option<PathBuf>,
    /// PEM certificate chain and private key for client authentication.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Name to verify the server's certificate against (default: the host).
    pub server_name: Option<String>,
    /// Accept any certificate. For tests only: it disables authentication.
    pub insecure_skip_verify: bool,
}

impl TlsOptions {
    fn is_default(&self) -> bool {
        *self == TlsOptions::default()
    }
}

/// Configuration of one host, as rb's `add_host` takes it; every setting is
/// optional and falls back to the cluster's `host_defaults`, then to rb's
/// defaults (`localhost:6379`, db 0, no password, no TLS).
///
/// ```
/// use rb::HostConfig;
/// use std::time::Duration;
/// let cfg = HostConfig::new().host("10.0.0.1").port(7000).db(2).password("s3cr3t")
///     .connect_timeout(Duration::from_millis(200));
/// ```
///
/// Its `Debug` shows `***` for the password (and for a user name set
/// without one: it may be a misplaced password).
#[derive(Clone, Default, PartialEq)]
#[doc(alias("add_host", "host_defaults"))]
pub struct HostConfig {
    host: Option<String>,
    port: Option<u16>,
    unix_socket_path: Option<String>,
    db: Option<i64>,
    username: Option<String>,
    password: Option<String>,
    tls: Option<bool>,
    tls_options: Option<TlsOptions>,
    protocol: Option<Protocol>,
    connect_timeout: Option<Duration>,
    read_timeout: Option<Option<Duration>>,
    write_timeout: Option<Option<Duration>>,
    pool_size: Option<usize>,
    max_reply_bytes: Option<usize>,
    max_reply_elements: Option<usize>,
    weight: Option<u32>,
    twemproxy_name: Option<String>,
}

impl HostConfig {
    /// Nothing set: every value comes from the defaults.
    #[must_use]
    pub fn new() -> HostConfig {
        HostConfig::default()
    }

    /// Host name or IP address. Default `localhost`.
    #[must_use]
    pub fn host(mut self, host: impl Into<String>) -> HostConfig {
        self.host = Some(host.into());
        self
    }

    /// TCP port. Default 6379.
    #[must_use]
    pub fn port(mut self, port: u16) -> HostConfig {
        self.port = Some(port);
        self
    }

    /// Connect over this unix socket instead of TCP. Default: none (TCP).
    #[must_use]
    pub fn unix_socket_path(mut self, path: impl Into<String>) -> HostConfig {
        self.unix_socket_path = Some(path.into());
        self
    }

    /// Database number, selected in the handshake. Default 0.
    #[must_use]
    pub fn db(mut self, db: i64) -> HostConfig {
        self.db = Some(db);
        self
    }

    /// ACL user name (Redis 6+), sent with the password, which it needs:
    /// a user name without a password is refused with [`Error::Config`]
    /// when the cluster is built (a `nopass` ACL user takes any password).
    /// Default: none.
    #[must_use]
    pub fn username(mut self, username: impl Into<String>) -> HostConfig {
        self.username = Some(username.into());
        self
    }

    /// Password, sent with `AUTH` in the handshake. Default: none.
    #[must_use]
    pub fn password(mut self, password: impl Into<String>) -> HostConfig {
        self.password = Some(password.into());
        self
    }

    /// Use TLS (needs the `tls` feature). Default false.
    #[must_use]
    #[doc(alias = "ssl")]
    pub fn tls(mut self, on: bool) -> HostConfig {
        self.tls = Some(on);
        self
    }

    /// TLS settings (CA file, client certificate, server name). Default: web roots.
    #[must_use]
    #[doc(alias = "ssl_options")]
    pub fn tls_options(mut self, options: TlsOptions) -> HostConfig {
        self.tls_options = Some(options);
        self
    }

    /// RESP version. Default [`Protocol::Resp2`].
    #[must_use]
    pub fn protocol(mut self, protocol: Protocol) -> HostConfig {
        self.protocol = Some(protocol);
        self
    }

    /// Budget for establishing a connection. Default 5 s.
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> HostConfig {
        self.connect_timeout = Some(timeout);
        self
    }

    /// Budget for a reply to an immediate command (routing and local
    /// clients; maps use their own `timeout`). Default: none (wait), as redis-py.
    #[must_use]
    pub fn read_timeout(mut self, timeout: Option<Duration>) -> HostConfig {
        self.read_timeout = Some(timeout);
        self
    }

    /// Budget for sending a request. Default: none (wait), as redis-py.
    #[must_use]
    pub fn write_timeout(mut self, timeout: Option<Duration>) -> HostConfig {
        self.write_timeout = Some(timeout);
        self
    }

    /// Idle connections kept per host; more are closed when returned. Default 16.
    #[must_use]
    pub fn pool_size(mut self, size: usize) -> HostConfig {
        self.pool_size = Some(size);
        self
    }

    /// Most bytes one reply may take; a longer reply is refused with
    /// [`Error::Protocol`] and the connection closed. Default
    /// [`DEFAULT_MAX_REPLY_BYTES`] (1 GiB).
    #[must_use]
    pub fn max_reply_bytes(mut self, bytes: usize) -> HostConfig {
        self.max_reply_bytes = Some(bytes);
        self
    }

    /// Most elements one reply may hold, counting nested ones; more is
    /// refused with [`Error::Protocol`] and the connection closed. Default
    /// [`DEFAULT_MAX_REPLY_ELEMENTS`] (32 Mi).
    #[must_use]
    pub fn max_reply_elements(mut self, elements: usize) -> HostConfig {
        self.max_reply_elements = Some(elements);
        self
    }

    /// The host's weight on a twemproxy ring (`host:port:weight` in
    /// nutcracker.yml): its share of the keys, relative to the other hosts'.
    /// Must be at least 1 there (and at most 2147483647, what nutcracker
    /// reads); rb's own routers ignore it. Default 1.
    #[must_use]
    pub fn weight(mut self, weight: u32) -> HostConfig {
        self.weight = Some(weight);
        self
    }

    /// The host's name on a twemproxy ring (the optional `name` of
    /// nutcracker.yml's `host:port:weight name`): the ring places the host
    /// by this name instead of by its address, so the host can move without
    /// moving its keys. rb's own routers ignore it. Default: none (the
    /// address, as nutcracker derives it: see [`HostInfo::twemproxy_node_name`]).
    #[must_use]
    pub fn name(mut self, name: impl Into<String>) -> HostConfig {
        self.twemproxy_name = Some(name.into());
        self
    }

    /// Parses one server line of a nutcracker.yml `servers:` list, as
    /// nutcracker 0.5.0 does: `host:port:weight [name]`, or
    /// `/path/to/unix.sock:weight [name]` (a path starting with `/`, with no
    /// `:` in it). Fields are split from the end (the name after the last
    /// space, the weight after the last `:` before it, the port after the
    /// `:` before that), so an IPv6 address needs no brackets
    /// (`::1:6379:1`). Surrounding whitespace is ignored, as YAML drops it.
    ///
    /// When the line has no name, nutcracker names the server by the text
    /// of its address (`host:port`, only `host` for port 11211, `path:` for
    /// a unix socket); that name is kept exactly when it differs from what
    /// the parsed host and port would give (a port written `06379`).
    ///
    /// ```
    /// let cfg = rb::HostConfig::from_twemproxy("127.0.0.1:6379:2 server1").unwrap();
    /// let info = cfg.resolve(0);
    /// assert_eq!((info.host.as_str(), info.port, info.weight), ("127.0.0.1", 6379, 2));
    /// assert_eq!(info.twemproxy_node_name(), "server1");
    /// assert!(rb::HostConfig::from_twemproxy("127.0.0.1:6379").is_err()); // no weight
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Config`] quoting the line and naming the bad part: no
    /// weight or port, a weight that is not a number from 1 to 2147483647,
    /// a port that is not a number from 1 to 65535, an empty host, a `:` in
    /// a unix socket path.
    pub fn from_twemproxy(line: &str) -> Result<HostConfig> {
        parse_twemproxy(line)
            .map_err(|reason| Error::config(format!("twemproxy server line {line:?}: {reason}")))
    }

    /// `self`, with every unset value taken from `defaults`.
    #[must_use]
    pub fn or(self, defaults: &HostConfig) -> HostConfig {
        fn pick<T: Clone>(a: Option<T>, b: &Option<T>) -> Option<T> {
            a.or_else(|| b.clone())
        }
        HostConfig {
            host: pick(self.host, &defaults.host),
            port: pick(self.port, &defaults.port),
            unix_socket_path: pick(self.unix_socket_path, &defaults.unix_socket_path),
            db: pick(self.db, &defaults.db),
            username: pick(self.username, &defaults.username),
            password: pick(self.password, &defaults.password),
            tls: pick(self.tls, &defaults.tls),
            tls_options: pick(self.tls_options, &defaults.tls_options),
            protocol: pick(self.protocol, &defaults.protocol),
            connect_timeout: pick(self.connect_timeout, &defaults.connect_timeout),
            read_timeout: pick(self.read_timeout, &defaults.read_timeout),
            write_timeout: pick(self.write_timeout, &defaults.write_timeout),
            pool_size: pick(self.pool_size, &defaults.pool_size),
            max_reply_bytes: pick(self.max_reply_bytes, &defaults.max_reply_bytes),
            max_reply_elements: pick(self.max_reply_elements, &defaults.max_reply_elements),
            weight: pick(self.weight, &defaults.weight),
            twemproxy_name: pick(self.twemproxy_name, &defaults.twemproxy_name),
        }
    }

    /// The resolved host, with rb's defaults for anything still unset.
    #[must_use]
    pub fn resolve(&self, host_id: HostId) -> HostInfo {
        let tls_options = self.tls_options.clone().unwrap_or_default();
        let info = HostInfo {
            host_id,
            host: self.host.clone().unwrap_or_else(|| "localhost".into()),
            port: self.port.unwrap_or(6379),
            unix_socket_path: self.unix_socket_path.clone(),
            db: self.db.unwrap_or(0),
            username: self.username.clone(),
            password: self.password.clone(),
            tls: self.tls.unwrap_or(false),
            tls_options,
            protocol: self.protocol.unwrap_or_default(),
            connect_timeout: self.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT),
            read_timeout: self.read_timeout.unwrap_or(None),
            write_timeout: self.write_timeout.unwrap_or(None),
            pool_size: self.pool_size.unwrap_or(16),
            max_reply_bytes: self.max_reply_bytes.unwrap_or(DEFAULT_MAX_REPLY_BYTES),
            max_reply_elements: self
                .max_reply_elements
                .unwrap_or(DEFAULT_MAX_REPLY_ELEMENTS),
            weight: self.weight.unwrap_or(1),
            twemproxy_name: self.twemproxy_name.clone(),
            name: HostName {
                id: host_id,
                addr: "".into(),
            },
        };
        let addr = info.addr_string();
        HostInfo {
            name: HostName {
                id: host_id,
                addr: addr.into(),
            },
            ..info
        }
    }

    /// [`HostConfig::resolve`], then the checks of [`HostInfo::validate`]:
    /// what the cluster builder and `add_host` call.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] naming the host when the settings cannot work
    /// (a user name without a password).
    pub(crate) fn resolve_checked(&self, host_id: HostId) -> Result<HostInfo> {
        let info = self.resolve(host_id);
        info.validate()?;
        Ok(info)
    }

    /// Parses a URL:
    /// `redis://[[user]:password@]host[:port][/db]`, `rediss://...` (TLS),
    /// `unix:///path/to/socket?db=N&password=...`. User, password and path
    /// are percent-decoded; query parameters `db`, `username`, `password` and
    /// `protocol` (`2`/`3`) work on every scheme.
    ///
    /// ```
    /// let cfg = rb::HostConfig::from_url("redis://:p%40ss@10.0.0.1:7000/3").unwrap();
    /// assert_eq!(cfg.resolve(0).port, 7000);
    /// assert!(rb::HostConfig::from_url("redis://host:notaport").is_err());
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Config`] naming the bad part (scheme, host, port, database,
    /// percent-escape, query parameter), with the URL shown with every
    /// credential replaced by `***`.
    pub fn from_url(url: &str) -> Result<HostConfig> {
        parse_url(url).map_err(|reason| Error::config(format!("URL {:?}: {reason}", redact(url))))
    }
}

/// Shows a credential as `***`.
struct Hidden;

impl fmt::Debug for Hidden {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// How `Debug` shows a user name: as it is when a password goes with it,
/// else hidden (`redis://s3cr3t@host` puts a password where the user name goes).
fn user_field<'a>(
    username: &'a Option<String>,
    password: &Option<String>,
) -> Option<&'a dyn fmt::Debug> {
    username.as_ref().map(|u| -> &dyn fmt::Debug {
        if password.is_some() {
            u
        } else {
            &Hidden
        }
    })
}

impl fmt::Debug for HostConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("unix_socket_path", &self.unix_socket_path)
            .field("db", &self.db)
            .field("username", &user_field(&self.username, &self.password))
            .field("password", &self.password.as_ref().map(|_| Hidden))
            .field("tls", &self.tls)
            .field("tls_options", &self.tls_options)
            .field("protocol", &self.protocol)
            .field("connect_timeout", &self.connect_timeout)
            .field("read_timeout", &self.read_timeout)
            .field("write_timeout", &self.write_timeout)
            .field("pool_size", &self.pool_size)
            .field("max_reply_bytes", &self.max_reply_bytes)
            .field("max_reply_elements", &self.max_reply_elements)
            .field("weight", &self.weight)
            .field("name", &self.twemproxy_name)
            .finish()
    }
}

/// Query parameters a URL may carry.
const QUERY_KEYS: [&str; 5] = ["db", "password", "username", "user", "protocol"];

/// A URL cut into its parts, the same way for parsing and for error
/// messages, so that a message never shows a part the parser read as a
/// credential.
///
/// Credentials are read leniently: a password may hold raw `/`, `?`, `#`
/// and `@` (the userinfo runs to the last `@` before the query), and a
/// `password=` query value runs to the next `&` that starts a known
/// parameter, so a raw `&` stays in it.
struct UrlParts<'a> {
    /// The scheme before `://`, when there is a well-formed one.
    scheme: Option<&'a str>,
    /// Everything before the `@` of the authority.
    userinfo: Option<&'a str>,
    /// `host[:port][/db]`, or a unix socket path.
    rest: &'a str,
    /// After the `?`.
    query: Option<&'a str>,
}

fn is_scheme(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
}

/// True for a name safe to repeat in a message: a user name or a query
/// parameter's name that holds nothing a password could spill into.
fn is_plain_name(s: &str) -> bool {
    s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.~+".contains(c))
}

/// The byte index of the `?` that starts the query: the first `?` followed
/// by a known parameter, else `None` (a `?` elsewhere may be in a password).
fn known_query_start(s: &str) -> Option<usize> {
    s.match_indices('?').map(|(i, _)| i).find(|&i| {
        QUERY_KEYS.iter().any(|k| {
            s[i + 1..]
                .strip_prefix(k)
                .is_some_and(|r| r.starts_with('='))
        })
    })
}

fn split_url(url: &str) -> UrlParts<'_> {
    let (scheme, after) = match url.split_once("://") {
        Some((scheme, after)) if is_scheme(scheme) => (Some(scheme), after),
        _ => (None, url),
    };
    let (main, query) = match known_query_start(after) {
        Some(i) => (&after[..i], Some(&after[i + 1..])),
        None => (after, None),
    };
    // A unix socket path (absolute, as in unix:///run/redis@main.sock) may
    // hold an '@'; anywhere else the last '@' ends the credentials.
    let is_path = scheme.is_some_and(|s| s.eq_ignore_ascii_case("unix")) && main.starts_with('/');
    let (userinfo, rest) = match main.rfind('@') {
        Some(i) if !is_path => (Some(&main[..i]), &main[i + 1..]),
        _ => (None, main),
    };
    let (rest, query) = match query {
        Some(q) => (rest, Some(q)),
        None => match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        },
    };
    UrlParts {
        scheme,
        userinfo,
        rest,
        query,
    }
}

/// The `key=value` pairs of a query (see [`UrlParts`] for `password=`).
fn query_pairs(query: &str) -> Vec<(&str, &str)> {
    let mut pairs = Vec::new();
    let mut rest = query;
    while !rest.is_empty() {
        let end = if rest.starts_with("password=") {
            rest.match_indices('&')
                .map(|(i, _)| i)
                .find(|&i| {
                    QUERY_KEYS.iter().any(|k| {
                        rest[i + 1..]
                            .strip_prefix(k)
                            .is_some_and(|r| r.starts_with('='))
                    })
                })
                .unwrap_or(rest.len())
        } else {
            rest.find('&').unwrap_or(rest.len())
        };
        let pair = &rest[..end];
        rest = rest.get(end + 1..).unwrap_or("");
        if !pair.is_empty() {
            pairs.push(pair.split_once('=').unwrap_or((pair, "")));
        }
    }
    pairs
}

/// A URL with every credential replaced by `***`, for error messages: the
/// password, a lone user name (it may be a misplaced password), query
/// values other than `db`, `protocol` and the user name, and anything not
/// plainly a name where a name should be.
fn redact(url: &str) -> String {
    let parts = split_url(url);
    let mut out = String::with_capacity(url.len());
    if let Some(scheme) = parts.scheme {
        out.push_str(scheme);
        out.push_str("://");
    }
    if let Some(userinfo) = parts.userinfo {
        match userinfo.split_once(':') {
            Some((user, _)) if is_plain_name(user) => {
                out.push_str(user);
                out.push_str(":***@");
            }
            _ => out.push_str("***@"),
        }
    }
    out.push_str(parts.rest);
    if let Some(query) = parts.query {
        out.push('?');
        for (i, (key, value)) in query_pairs(query).into_iter().enumerate() {
            if i > 0 {
                out.push('&');
            }
            if !is_plain_name(key) {
                out.push_str("***");
                continue;
            }
            out.push_str(key);
            out.push('=');
            let shown = matches!(key, "db" | "protocol" | "username" | "user");
            out.push_str(if shown && is_plain_name(value) {
                value
            } else {
                "***"
            });
        }
    }
    out
}

fn percent_decode(s: &str, what: &str) -> std::result::Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent-escape in the {what}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("the {what} is not UTF-8 after percent-decoding"))
}

/// Parses a URL; the error text never repeats a credential (see [`redact`]).
fn parse_url(url: &str) -> std::result::Result<HostConfig, String> {
    let parts = split_url(url);
    let Some(scheme) = parts.scheme else {
        return Err(if url.contains("://") {
            "bad scheme (want redis://, rediss:// or unix://)".to_owned()
        } else {
            "missing scheme (redis://, rediss:// or unix://)".to_owned()
        });
    };
    let mut cfg = HostConfig::new();
    match scheme.to_ascii_lowercase().as_str() {
        "redis" | "rediss" => {
            if scheme.eq_ignore_ascii_case("rediss") {
                cfg = cfg.tls(true);
            }
            if let Some(userinfo) = parts.userinfo {
                let (user, password) = match userinfo.split_once(':') {
                    Some((u, p)) => (u, Some(p)),
                    None => (userinfo, None),
                };
                if user.contains(['/', '?', '#']) {
                    return Err(
                        "the user name holds '/', '?' or '#' (percent-encode them, and '@' and '&' in query values)"
                            .into(),
                    );
                }
                if !user.is_empty() {
                    cfg = cfg.username(percent_decode(user, "user name")?);
                }
                if let Some(p) = password {
                    cfg = cfg.password(percent_decode(p, "password")?);
                }
            }
            let (hostport, path) = match parts.rest.find('/') {
                Some(i) => (&parts.rest[..i], &parts.rest[i + 1..]),
                None => (parts.rest, ""),
            };
            let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
                let (host, after) = v6
                    .split_once(']')
                    .ok_or_else(|| "unclosed '[' in the host".to_owned())?;
                (host, after.strip_prefix(':'))
            } else {
                match hostport.rsplit_once(':') {
                    Some((h, p)) => (h, Some(p)),
                    None => (hostport, None),
                }
            };
            if host.is_empty() {
                return Err("missing host".into());
            }
            cfg = cfg.host(percent_decode(host, "host")?);
            if let Some(port) = port {
                let port: u16 = port
                    .parse()
                    .map_err(|_| format!("bad port {port:?} (want 0-65535)"))?;
                cfg = cfg.port(port);
            }
            let path = path.trim_end_matches('/');
            if !path.is_empty() {
                let db: i64 = path
                    .parse()
                    .map_err(|_| format!("bad database {path:?} in the path (want a number)"))?;
                cfg = cfg.db(db);
            }
        }
        "unix" => {
            if parts.userinfo.is_some() {
                return Err(
                    "a unix URL takes its credentials in the query (unix:///path?password=...)"
                        .into(),
                );
            }
            let path = percent_decode(parts.rest, "socket path")?;
            if path.is_empty() {
                return Err("missing socket path".into());
            }
            cfg = cfg.unix_socket_path(path);
        }
        other => {
            return Err(format!(
                "unknown scheme {other:?} (want redis, rediss or unix)"
            ))
        }
    }
    for (k, v) in query_pairs(parts.query.unwrap_or("")) {
        if !QUERY_KEYS.contains(&k) {
            return Err(if is_plain_name(k) {
                format!("unknown query parameter {k:?}")
            } else {
                "an unknown query parameter".to_owned()
            });
        }
        let v = percent_decode(v, k)?;
        cfg = match k {
            "db" => cfg.db(v
                .parse()
                .map_err(|_| format!("bad db {v:?} (want a number)"))?),
            "password" => cfg.password(v),
            "username" | "user" => cfg.username(v),
            _ => match v.as_str() {
                "2" | "resp2" => cfg.protocol(Protocol::Resp2),
                "3" | "resp3" => cfg.protocol(Protocol::Resp3),
                _ => return Err(format!("bad protocol {v:?} (want 2 or 3)")),
            },
        };
    }
    Ok(cfg)
}

/// nutcracker's `nc_atoi` over a whole field: digits only, at least one.
fn twemproxy_number(field: &str) -> Option<u64> {
    if field.is_empty() || field.len() > 10 || !field.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    field.parse().ok()
}

/// [`HostConfig::from_twemproxy`]'s parser (nutcracker's `conf_add_server`).
fn parse_twemproxy(line: &str) -> std::result::Result<HostConfig, String> {
    let line = line.trim();
    let (rest, name) = match line.rsplit_once(' ') {
        Some((rest, name)) => (rest, Some(name)),
        None => (line, None),
    };
    let want = "want host:port:weight [name] or /path/to/socket:weight [name]";
    let (addr_port, weight) = rest
        .rsplit_once(':')
        .ok_or_else(|| format!("no weight ({want})"))?;
    let weight = match twemproxy_number(weight) {
        Some(0) => return Err("zero weight (want at least 1)".into()),
        Some(w) if w <= i32::MAX as u64 => w as u32,
        _ => {
            return Err(format!(
                "bad weight {weight:?} (want a number from 1 to 2147483647)"
            ))
        }
    };
    let mut cfg = HostConfig::new().weight(weight);
    // The name nutcracker gives a server line without one.
    let derived;
    if addr_port.starts_with('/') {
        if addr_port.contains(':') {
            return Err(format!(
                "unix socket path {addr_port:?} contains ':' (nutcracker cannot parse it)"
            ));
        }
        cfg = cfg.unix_socket_path(addr_port);
        derived = format!("{addr_port}:");
    } else {
        let (host, port_text) = addr_port
            .rsplit_once(':')
            .ok_or_else(|| format!("no port ({want})"))?;
        let port = match twemproxy_number(port_text) {
            Some(p) if (1..=65535).contains(&p) => p as u16,
            _ => {
                return Err(format!(
                    "bad port {port_text:?} (want a number from 1 to 65535)"
                ))
            }
        };
        if host.is_empty() {
            return Err("empty host".into());
        }
        derived = if port == 11211 {
            host.to_owned()
        } else {
            format!("{host}:{port_text}")
        };
        // Brackets are for URLs; connect to the bare address.
        let bare = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        cfg = cfg.host(bare).port(port);
    }
    match name {
        Some(name) => cfg = cfg.name(name),
        None if cfg.resolve(0).twemproxy_node_name() != derived => cfg = cfg.name(derived),
        None => {}
    }
    Ok(cfg)
}

/// A resolved host: every setting known. Fields mirror rb's `HostInfo`.
#[derive(Clone, PartialEq)]
pub struct HostInfo {
    /// The host's id.
    pub host_id: HostId,
    /// Host name or address (unused when `unix_socket_path` is set).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Unix socket to connect to instead of TCP.
    pub unix_socket_path: Option<String>,
    /// Database selected in the handshake.
    pub db: i64,
    /// ACL user name.
    pub username: Option<String>,
    /// Password.
    pub password: Option<String>,
    /// TLS on or off.
    #[doc(alias = "ssl")]
    pub tls: bool,
    /// TLS settings.
    #[doc(alias = "ssl_options")]
    pub tls_options: TlsOptions,
    /// RESP version.
    pub protocol: Protocol,
    /// Connect budget.
    pub connect_timeout: Duration,
    /// Reply budget for immediate commands.
    pub read_timeout: Option<Duration>,
    /// Send budget for immediate commands.
    pub write_timeout: Option<Duration>,
    /// Idle connections kept in the pool.
    pub pool_size: usize,
    /// Most bytes of one reply.
    pub max_reply_bytes: usize,
    /// Most elements of one reply, nested ones included.
    pub max_reply_elements: usize,
    /// Weight on a twemproxy ring ([`HostConfig::weight`]; rb's routers ignore it).
    pub weight: u32,
    /// Name on a twemproxy ring ([`HostConfig::name`]; rb's routers ignore it).
    pub twemproxy_name: Option<String>,
    name: HostName,
}

impl HostInfo {
    /// Checks what the handshake needs: a user name without a password
    /// would send no `AUTH` at all, so it is refused rather than run as the
    /// default user.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] naming the host (never the credentials).
    pub(crate) fn validate(&self) -> Result<()> {
        if self.username.is_some() && self.password.is_none() {
            return Err(Error::config(format!(
                "{}: a user name is set without a password, so no AUTH would be sent; \
                 set the password too (a `nopass` ACL user takes any)",
                self.name
            )));
        }
        Ok(())
    }

    /// How errors name this host: `host 3 (127.0.0.1:6379/0)`.
    pub fn name(&self) -> &HostName {
        &self.name
    }

    /// The name a twemproxy ring places this host by: its
    /// [`HostConfig::name`] when set, else what nutcracker 0.5.0 derives
    /// from a server line without a name (`conf_add_server`):
    /// `host:port`, only `host` when the port is 11211 (libmemcached's
    /// default, kept for compatibility), and for a unix socket the path
    /// followed by `:` (nutcracker takes the address and the byte after
    /// it).
    pub fn twemproxy_node_name(&self) -> String {
        if let Some(name) = &self.twemproxy_name {
            return name.clone();
        }
        match &self.unix_socket_path {
            Some(path) => format!("{path}:"),
            None if self.port == 11211 => self.host.clone(),
            None => format!("{}:{}", self.host, self.port),
        }
    }

    fn addr_string(&self) -> String {
        match &self.unix_socket_path {
            Some(path) => format!("unix:{path}/{}", self.db),
            None if self.host.contains(':') => format!("[{}]:{}/{}", self.host, self.port, self.db),
            None => format!("{}:{}/{}", self.host, self.port, self.db),
        }
    }

    /// The node name of this host on rb's ketama ring: Python's `repr()` of
    /// rb's `HostInfo`, e.g.
    /// `<HostInfo db=0 host='localhost' host_id=0 password=None port=6379 ssl=False ssl_options=None unix_socket_path=None>`.
    ///
    /// It holds the password in clear, as Python's `repr()` does (the ring
    /// depends on it): never log it.
    ///
    /// rb has no ACL user name, RESP version or timeouts, so they do not
    /// appear; TLS options render as the redis-py `ssl_*` keyword dict a
    /// Python rb user would pass.
    pub fn ring_name(&self) -> String {
        let ssl_options = if self.tls_options.is_default() {
            "None".to_owned()
        } else {
            let o = &self.tls_options;
            let mut items = Vec::new();
            if let Some(ca) = &o.ca_file {
                items.push(format!("'ssl_ca_certs': {}", py_str(&ca.to_string_lossy())));
            }
            if let Some((cert, key)) = &o.client_cert {
                items.push(format!(
                    "'ssl_certfile': {}",
                    py_str(&cert.to_string_lossy())
                ));
                items.push(format!("'ssl_keyfile': {}", py_str(&key.to_string_lossy())));
            }
            if o.insecure_skip_verify {
                items.push("'ssl_cert_reqs': None".to_owned());
            }
            if let Some(name) = &o.server_name {
                items.push(format!("'server_hostname': {}", py_str(name)));
            }
            format!("{{{}}}", items.join(", "))
        };
        format!(
            "<HostInfo db={} host={} host_id={} password={} port={} ssl={} ssl_options={} unix_socket_path={}>",
            self.db,
            py_str(&self.host),
            self.host_id,
            self.password.as_deref().map_or("None".to_owned(), py_str),
            self.port,
            if self.tls { "True" } else { "False" },
            ssl_options,
            self.unix_socket_path.as_deref().map_or("None".to_owned(), py_str),
        )
    }
}

impl fmt::Debug for HostInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostInfo")
            .field("host_id", &self.host_id)
            .field("addr", &self.name.addr)
            .field("username", &user_field(&self.username, &self.password))
            .field("password", &self.password.as_ref().map(|_| Hidden))
            .field("tls", &self.tls)
            .field("protocol", &self.protocol)
            .finish()
    }
}

/// Python 3's `repr()` of a `str`.
pub(crate) fn py_str(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            // Python prints non-printable code points escaped; the C1 controls
            // are the ones that plausibly appear.
            c if (0x80..0xa0).contains(&(c as u32)) => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_merge_like_rb() {
        let defaults = HostConfig::new().host("127.0.0.1").password("pw");
        let info = HostConfig::new().port(7000).or(&defaults).resolve(2);
        assert_eq!(info.host, "127.0.0.1");
        assert_eq!(info.port, 7000);
        assert_eq!(info.password.as_deref(), Some("pw"));
        assert_eq!(info.name().to_string(), "host 2 (127.0.0.1:7000/0)");
        assert_eq!(
            HostConfig::new().resolve(0).ring_name(),
            "<HostInfo db=0 host='localhost' host_id=0 password=None port=6379 ssl=False ssl_options=None unix_socket_path=None>"
        );
    }

    #[test]
    fn python_repr_of_strings() {
        assert_eq!(py_str("abc"), "'abc'");
        assert_eq!(py_str("it's"), "\"it's\"");
        assert_eq!(py_str("a'b\"c"), "'a\\'b\"c'");
        assert_eq!(py_str("back\\slash\n"), "'back\\\\slash\\n'");
        assert_eq!(py_str("\x01é"), "'\\x01é'");
    }

    #[test]
    fn urls() {
        let c = HostConfig::from_url("redis://user:p%40ss@10.0.0.1:7000/3")
            .unwrap()
            .resolve(0);
        assert_eq!((c.host.as_str(), c.port, c.db), ("10.0.0.1", 7000, 3));
        assert_eq!(
            (c.username.as_deref(), c.password.as_deref()),
            (Some("user"), Some("p@ss"))
        );
        assert!(!c.tls);

        let c = HostConfig::from_url("rediss://:secret@cache.example")
            .unwrap()
            .resolve(0);
        assert!(c.tls);
        assert_eq!(
            (c.port, c.username, c.password.as_deref()),
            (6379, None, Some("secret"))
        );

        let c = HostConfig::from_url("redis://[::1]:6380?protocol=3")
            .unwrap()
            .resolve(0);
        assert_eq!(
            (c.host.as_str(), c.port, c.protocol),
            ("::1", 6380, Protocol::Resp3)
        );

        let c = HostConfig::from_url("unix:///run/redis%20x.sock?db=2&password=a%26b")
            .unwrap()
            .resolve(0);
        assert_eq!(c.unix_socket_path.as_deref(), Some("/run/redis x.sock"));
        assert_eq!((c.db, c.password.as_deref()), (2, Some("a&b")));
    }

    #[test]
    fn bad_urls_name_the_part() {
        let cases = [
            ("localhost:6379", "missing scheme"),
            ("http://localhost", "unknown scheme \"http\""),
            ("redis://localhost:99999", "bad port \"99999\""),
            ("redis://localhost/abc", "bad database \"abc\""),
            ("redis://:pw@", "missing host"),
            ("redis://h?db=x", "bad db \"x\""),
            (
                "redis://h?colour=blue",
                "unknown query parameter \"colour\"",
            ),
            ("unix://", "missing socket path"),
            ("redis://u:%zz@h", "bad percent-escape in the password"),
            ("redis://[::1", "unclosed '['"),
        ];
        for (url, want) in cases {
            let e = HostConfig::from_url(url).unwrap_err().to_string();
            assert!(e.contains(want), "{url}: {e}");
        }
        let e = HostConfig::from_url("redis://u:topsecret@h:x")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("topsecret"), "{e}");
        assert!(e.contains("u:***@h:x"), "{e}");
    }

    #[test]
    fn twemproxy_server_lines() {
        let info = HostConfig::from_twemproxy("127.0.0.1:6379:1 server1")
            .unwrap()
            .resolve(3);
        assert_eq!(
            (info.host.as_str(), info.port, info.weight),
            ("127.0.0.1", 6379, 1)
        );
        assert_eq!(info.twemproxy_name.as_deref(), Some("server1"));
        assert_eq!(info.twemproxy_node_name(), "server1");
        // No name: nutcracker's "host:port", or "host" for port 11211.
        let info = HostConfig::from_twemproxy("  10.0.0.1:7000:25 ")
            .unwrap()
            .resolve(0);
        assert_eq!((info.weight, info.twemproxy_name.as_deref()), (25, None));
        assert_eq!(info.twemproxy_node_name(), "10.0.0.1:7000");
        let info = HostConfig::from_twemproxy("cache1:11211:1")
            .unwrap()
            .resolve(0);
        assert_eq!(info.twemproxy_node_name(), "cache1");
        // The name is the line's text, even where the parsed port is not.
        let info = HostConfig::from_twemproxy("10.0.0.1:06379:1")
            .unwrap()
            .resolve(0);
        assert_eq!(
            (info.port, info.twemproxy_node_name().as_str()),
            (6379, "10.0.0.1:06379")
        );
        // IPv6 without brackets (fields split from the end); brackets dropped to connect.
        let info = HostConfig::from_twemproxy("::1:6379:2").unwrap().resolve(0);
        assert_eq!((info.host.as_str(), info.port), ("::1", 6379));
        assert_eq!(info.twemproxy_node_name(), "::1:6379");
        let info = HostConfig::from_twemproxy("[::1]:6379:2")
            .unwrap()
            .resolve(0);
        assert_eq!(info.host, "::1");
        assert_eq!(info.twemproxy_node_name(), "[::1]:6379");
        // Unix sockets: "path:weight [name]"; unnamed, nutcracker names it "path:".
        let info = HostConfig::from_twemproxy("/run/redis/a.sock:3")
            .unwrap()
            .resolve(0);
        assert_eq!(info.unix_socket_path.as_deref(), Some("/run/redis/a.sock"));
        assert_eq!(info.weight, 3);
        assert_eq!(info.twemproxy_node_name(), "/run/redis/a.sock:");
        let info = HostConfig::from_twemproxy("/tmp/b.sock:1 b")
            .unwrap()
            .resolve(0);
        assert_eq!(info.twemproxy_node_name(), "b");
        // Built by hand, the same names.
        let by_hand = HostConfig::new().host("10.0.0.1").port(7000).resolve(0);
        assert_eq!(
            (by_hand.weight, by_hand.twemproxy_node_name().as_str()),
            (1, "10.0.0.1:7000")
        );
        // Weight and name merge from the defaults like every setting.
        let merged = HostConfig::new()
            .or(&HostConfig::new().weight(4).name("n"))
            .resolve(0);
        assert_eq!(
            (merged.weight, merged.twemproxy_node_name().as_str()),
            (4, "n")
        );
    }

    #[test]
    fn bad_twemproxy_lines_name_the_part() {
        for (line, part) in [
            ("127.0.0.1:6379", "no port"),
            ("127.0.0.1", "no weight"),
            ("127.0.0.1:6379:0", "zero weight"),
            ("127.0.0.1:6379:x", "bad weight \"x\""),
            ("127.0.0.1:6379:-1", "bad weight"),
            ("127.0.0.1:6379:2147483648", "bad weight"),
            ("127.0.0.1:6379:99999999999999999999", "bad weight"),
            ("127.0.0.1:6379:", "bad weight \"\""),
            ("127.0.0.1:0:1", "bad port \"0\""),
            ("127.0.0.1:65536:1", "bad port"),
            ("127.0.0.1:+80:1", "bad port"),
            (":6379:1", "empty host"),
            ("127.0.0.1:6379:1 my server", "bad weight \"1 my\""),
            ("127.0.0.1:6379:1  name", "bad weight \"1 \""),
            ("/tmp/a:b.sock:1", "contains ':'"),
            ("", "no weight"),
            ("6379:1", "no port"),
        ] {
            let e = HostConfig::from_twemproxy(line).unwrap_err();
            assert!(matches!(e, Error::Config { .. }), "{line:?}: {e:?}");
            let text = e.to_string();
            assert!(text.contains(part), "{line:?}: {text}");
            assert!(text.contains(&format!("{line:?}")), "{line:?}: {text}");
        }
        // The largest weight nutcracker reads.
        let info = HostConfig::from_twemproxy("h:1:2147483647")
            .unwrap()
            .resolve(0);
        assert_eq!(info.weight, 2147483647);
    }
}

#[cfg(test)]
mod secrets {
    //! No password, nor any piece of one, in a `Debug`, a `Display` or an error.
    use super::*;

    /// The first 3-character piece of `secret` (or all of a shorter one)
    /// that `text` holds.
    fn leak(text: &str, secret: &str) -> Option<String> {
        let chars: Vec<char> = secret.chars().collect();
        chars
            .windows(3.min(chars.len()))
            .map(|w| w.iter().collect::<String>())
            .find(|piece| text.contains(piece.as_str()))
    }

    #[track_caller]
    fn assert_hidden(text: &str, secret: &str) {
        if let Some(piece) = leak(text, secret) {
            panic!("{piece:?} (a piece of the password) leaked in: {text}");
        }
    }

    /// Every rendering of a URL's outcome: the error (Display and Debug), or
    /// the config and the resolved host (Debug), the host's name and the
    /// validation error. Returns what leaked.
    fn url_leaks(url: &str, secrets: &[&str]) -> Option<String> {
        let shown = match HostConfig::from_url(url) {
            Err(e) => format!("{e} | {e:?}"),
            Ok(cfg) => {
                let info = cfg.resolve(7);
                let checked = match info.validate() {
                    Ok(()) => String::new(),
                    Err(e) => format!("{e} | {e:?}"),
                };
                format!("{cfg:?} | {info:?} | {} | {checked}", info.name())
            }
        };
        secrets
            .iter()
            .find_map(|secret| leak(&shown, secret))
            .map(|piece| format!("{url}: {piece:?} leaked in: {shown}"))
    }

    #[test]
    fn raw_specials_in_passwords_parse() {
        let cases = [
            ("redis://:pa/ss@host:6380/2", Some("pa/ss"), None),
            ("redis://u:p@ss@host:6380/2", Some("p@ss"), Some("u")),
            ("redis://u:pa#ss@host:6380/2", Some("pa#ss"), Some("u")),
            (
                "redis://u:pa?ss@host:6380/2?protocol=3",
                Some("pa?ss"),
                Some("u"),
            ),
            ("redis://host:6380/2?password=p@ss&db=2", Some("p@ss"), None),
            ("redis://host:6380?password=a&b&db=2", Some("a&b"), None),
            ("redis://host:6380/2?password=a%26b", Some("a&b"), None),
        ];
        for (url, password, user) in cases {
            let c = HostConfig::from_url(url).unwrap().resolve(0);
            assert_eq!((c.host.as_str(), c.port, c.db), ("host", 6380, 2), "{url}");
            assert_eq!(c.password.as_deref(), password, "{url}");
            assert_eq!(c.username.as_deref(), user, "{url}");
        }
        // An '@' in an absolute socket path is part of the path.
        let c = HostConfig::from_url("unix:///run/redis@main.sock?password=a&b&db=1")
            .unwrap()
            .resolve(0);
        assert_eq!(c.unix_socket_path.as_deref(), Some("/run/redis@main.sock"));
        assert_eq!((c.db, c.password.as_deref()), (1, Some("a&b")));
    }

    #[test]
    fn redacted_errors_still_name_the_bad_part() {
        let cases = [
            (
                "redis://:pa/ss@host:notaport",
                "URL \"redis://:***@host:notaport\": bad port \"notaport\"",
            ),
            (
                "redis://ann:pa?ss@host/x",
                "URL \"redis://ann:***@host/x\": bad database \"x\"",
            ),
            (
                "unix:///p?password=a&b&db=x",
                "URL \"unix:///p?password=***&db=x\": bad db \"x\"",
            ),
            (
                "redis://h?passwrd=s",
                "URL \"redis://h?passwrd=***\": unknown query parameter \"passwrd\"",
            ),
            ("redis:/:pw@host", "URL \"redis:***@host\": missing scheme"),
            (
                "unix://:pw@/run/r.sock",
                "takes its credentials in the query",
            ),
        ];
        for (url, want) in cases {
            let e = HostConfig::from_url(url).unwrap_err().to_string();
            assert!(e.contains(want), "{url}: {e}");
        }
    }

    #[test]
    fn a_user_name_needs_a_password() {
        let e = HostConfig::new()
            .host("10.0.0.9")
            .username("ann")
            .resolve_checked(4)
            .unwrap_err();
        assert!(matches!(e, Error::Config { .. }), "{e:?}");
        let text = e.to_string();
        assert!(text.contains("host 4 (10.0.0.9:6379/0)"), "{text}");
        assert!(text.contains("without a password"), "{text}");
        assert!(!text.contains("ann"), "{text}");
        // From the defaults, or with a password, it is fine.
        let defaults = HostConfig::new().password("pw");
        assert!(HostConfig::new()
            .username("ann")
            .or(&defaults)
            .resolve_checked(0)
            .is_ok());
        assert!(HostConfig::from_url("redis://ann:pw@h")
            .unwrap()
            .resolve_checked(0)
            .is_ok());
        assert!(HostConfig::from_url("redis://ann@h")
            .unwrap()
            .resolve_checked(0)
            .is_err());
        assert!(HostConfig::new().resolve_checked(0).is_ok());
    }

    #[test]
    fn debug_of_configs_hides_the_password() {
        let cfg = HostConfig::new()
            .host("host")
            .username("ann")
            .password("pa/ss-S3cr3tQ");
        let shown = format!("{cfg:?} {cfg:#?}");
        assert_hidden(&shown, "pa/ss-S3cr3tQ");
        assert!(shown.contains("ann"), "the user name is no secret: {shown}");
        let info = cfg.resolve(0);
        assert_hidden(
            &format!("{info:?} {info:#?} {}", info.name()),
            "pa/ss-S3cr3tQ",
        );
    }

    #[test]
    fn url_errors_hide_the_password() {
        let cases: &[(&str, &[&str])] = &[
            ("redis://:pa/ss-S3cr3tQ@host:notaport", &["pa/ss-S3cr3tQ"]),
            ("redis://:pa/ss-S3cr3tQ@host/notadb", &["pa/ss-S3cr3tQ"]),
            ("redis://u:p@ss-S3cr3tQ@host:notaport", &["p@ss-S3cr3tQ"]),
            ("redis://u:pa#ss-S3cr3tQ@host:notaport", &["pa#ss-S3cr3tQ"]),
            ("redis://u:pa?ss-S3cr3tQ@host:notaport", &["pa?ss-S3cr3tQ"]),
            (
                "redis://u:pa?ss-S3cr3tQ@host?colour=blue",
                &["pa?ss-S3cr3tQ"],
            ),
            (
                "redis://:pa%2Fss-S3cr3tQ@host:99999",
                &["pa%2Fss-S3cr3tQ", "pa/ss-S3cr3tQ"],
            ),
            ("redis://:pa%zzss-S3cr3tQ@host", &["pa%zzss-S3cr3tQ"]),
            ("redis://:pa%C3ss-S3cr3tQ@host", &["pa%C3ss-S3cr3tQ"]),
            ("redis://:pa-S3cr3tQ@", &["pa-S3cr3tQ"]),
            ("redis://:pa-S3cr3tQ@[::1", &["pa-S3cr3tQ"]),
            ("redis:/:pa-S3cr3tQ@host", &["pa-S3cr3tQ"]),
            ("redis//u:pa-S3cr3tQ@host", &["pa-S3cr3tQ"]),
            ("http://u:pa-S3cr3tQ@host", &["pa-S3cr3tQ"]),
            ("redis://host?passwrd=S3cr3tQ-pw", &["S3cr3tQ-pw"]),
            ("redis://host?password=p@ss-S3cr3tQ&db=x", &["p@ss-S3cr3tQ"]),
            (
                "redis://host?password=S3cr3tQ-pw&protocol=9",
                &["S3cr3tQ-pw"],
            ),
            ("unix:///p?password=S3cr3tQ-pw&db=x", &["S3cr3tQ-pw"]),
            ("unix:///p?password=S3c&r3tQ-pw&db=x", &["S3c&r3tQ-pw"]),
            ("unix:///p?password=S3cr3tQ%zz&db=1", &["S3cr3tQ%zz"]),
            ("unix://:pa-S3cr3tQ@/run/r.sock", &["pa-S3cr3tQ"]),
            // Parsed, not refused: the config and host must hide it.
            ("redis://u:p@ss-S3cr3tQ@host", &["p@ss-S3cr3tQ"]),
            ("redis://:pa/ss-S3cr3tQ@host:6380/2", &["pa/ss-S3cr3tQ"]),
            ("rediss://u:pa#ss-S3cr3tQ@host", &["pa#ss-S3cr3tQ"]),
            ("redis://host?password=p@ss-S3cr3tQ", &["p@ss-S3cr3tQ"]),
            ("unix:///p?password=S3c&r3tQ-pw&db=1", &["S3c&r3tQ-pw"]),
            // A lone user name may be a misplaced password: never shown.
            ("redis://S3cr3tQ-pw@host", &["S3cr3tQ-pw"]),
        ];
        let leaks: Vec<String> = cases
            .iter()
            .filter_map(|(url, secrets)| url_leaks(url, secrets))
            .collect();
        assert!(
            leaks.is_empty(),
            "{} of {} leak:\n{}",
            leaks.len(),
            cases.len(),
            leaks.join("\n")
        );
    }
}
