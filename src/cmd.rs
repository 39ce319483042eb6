//! [`Cmd`]: a command's name and arguments in one buffer, and [`Script`].
//!
//! Arguments are written once, as bytes, into a single buffer with their end
//! offsets beside it; encoding to RESP then sizes the output exactly and
//! copies each argument once.

use std::fmt;
use std::sync::Arc;

use crate::args::ToArg;
use crate::digest;
use crate::resp::itoa;

/// A Redis command: its name and arguments, ready to encode.
///
/// Each part is stored already encoded as a RESP bulk string, back to
/// back in one buffer, so sending a command is one header and one copy.
///
/// ```
/// let c = rb::cmd("SET").arg("key").arg(42).arg("EX").arg(10);
/// assert_eq!(c.name(), b"SET");
/// assert_eq!(c.args().collect::<Vec<_>>(), [&b"key"[..], b"42", b"EX", b"10"]);
/// ```
#[derive(PartialEq, Eq)]
pub struct Cmd {
    /// `$<len>\r\n<bytes>\r\n` for the name, then for each argument.
    buf: Vec<u8>,
    /// Where the name's bytes start in `buf` (after its header).
    name_start: usize,
    /// Where the name's bulk string ends in `buf`.
    name_end: usize,
    /// Parts, the name included.
    parts: usize,
    /// The name when it is one of the everyday commands the map's hot
    /// path checks for, found once here instead of by each check.
    common: Common,
}

/// The everyday commands, told apart at construction (names ignore case).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Common {
    /// `GET`.
    Get,
    /// `SET`.
    Set,
    /// Any other name.
    Other,
}

impl Common {
    fn of(name: &[u8]) -> Common {
        if name.eq_ignore_ascii_case(b"GET") {
            Common::Get
        } else if name.eq_ignore_ascii_case(b"SET") {
            Common::Set
        } else {
            Common::Other
        }
    }
}

/// Appends the header of a bulk string of `len` bytes: `$<len>\r\n`.
/// Short lengths (most keys and names) are written as one small array.
#[inline]
fn push_bulk_head(buf: &mut Vec<u8>, len: usize) {
    if len < 10 {
        buf.extend_from_slice(&[b'$', b'0' + len as u8, b'\r', b'\n']);
    } else if len < 100 {
        let (tens, ones) = ((len / 10) as u8, (len % 10) as u8);
        buf.extend_from_slice(&[b'$', b'0' + tens, b'0' + ones, b'\r', b'\n']);
    } else {
        buf.push(b'$');
        buf.extend_from_slice(itoa(len as i64).as_bytes());
        buf.extend_from_slice(b"\r\n");
    }
}

/// Room for the longest bulk header, `$` + 20 digits + CRLF.
const MAX_HEAD: usize = 23;

/// Buffers of dropped commands, reused by the next ones on the same thread:
/// a map builds and drops one command per key, and this turns each
/// allocation and free into a push and a pop.
mod recycle {
    use std::cell::RefCell;
    use std::sync::Mutex;

    /// Buffers kept per thread.
    const KEEP: usize = 64;
    /// Buffers moved to or from the shared pool at a time.
    const BATCH: usize = KEEP / 2;
    /// Buffers the shared pool keeps.
    const SHARED_KEEP: usize = 2048;
    /// Larger buffers are freed, not kept.
    const MAX_CAPACITY: usize = 4096;

    thread_local! {
        static FREE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    }

    /// Buffers a thread had too many of, for threads that have none: the
    /// async client builds commands on its callers' threads and the driver
    /// drops them on its own, so without this every request allocated on
    /// one thread and freed on another (glibc's slow path: 13% of an async
    /// GET's instructions). Moved a batch at a time, one lock each.
    static SHARED: Shared = Shared(Mutex::new(Vec::new()));

    /// A pool of buffers shared by threads.
    pub(super) struct Shared(Mutex<Vec<Vec<u8>>>);

    pub(super) fn take(capacity: usize) -> Vec<u8> {
        let reused = FREE
            .try_with(|f| {
                let mut f = f.try_borrow_mut().ok()?;
                if f.is_empty() {
                    SHARED.refill(&mut f);
                }
                f.pop()
            })
            .ok()
            .flatten();
        match reused {
            Some(mut buf) => {
                buf.clear();
                buf.reserve(capacity);
                buf
            }
            None => Vec::with_capacity(capacity.max(128)),
        }
    }

    pub(super) fn give(buf: Vec<u8>) {
        if buf.capacity() == 0 || buf.capacity() > MAX_CAPACITY {
            return;
        }
        let _ = FREE.try_with(|f| {
            if let Ok(mut f) = f.try_borrow_mut() {
                if f.len() >= KEEP {
                    SHARED.spill(&mut f);
                }
                if f.len() < KEEP {
                    f.push(buf);
                }
            }
        });
    }

    impl Shared {
        /// An empty pool.
        #[cfg(test)]
        pub(super) const fn new() -> Shared {
            Shared(Mutex::new(Vec::new()))
        }

        /// Takes up to a batch of buffers into `local` (none while another
        /// thread holds the pool: the caller allocates instead).
        #[cold]
        pub(super) fn refill(&self, local: &mut Vec<Vec<u8>>) {
            if let Ok(mut shared) = self.0.try_lock() {
                let from = shared.len().saturating_sub(BATCH);
                local.extend(shared.drain(from..));
            }
        }

        /// Moves up to a batch of buffers out of `local` (while the pool
        /// has room).
        #[cold]
        pub(super) fn spill(&self, local: &mut Vec<Vec<u8>>) {
            if let Ok(mut shared) = self.0.try_lock() {
                let room = SHARED_KEEP.saturating_sub(shared.len()).min(BATCH);
                let from = local.len().saturating_sub(room);
                shared.extend(local.drain(from..));
            }
        }

        /// Buffers in the pool.
        #[cfg(test)]
        pub(super) fn len(&self) -> usize {
            self.0.lock().map_or(0, |s| s.len())
        }
    }
}

/// Starts a command: `rb::cmd("INCRBY").arg("counter").arg(2)`.
#[must_use]
pub fn cmd(name: &str) -> Cmd {
    Cmd::new(name)
}

/// Parses the bulk string at the front of `buf` (written by [`Cmd`] itself).
fn next_part(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let rest = buf.strip_prefix(b"$")?;
    let digits = rest.iter().position(|&b| b == b'\r')?;
    let mut len = 0usize;
    for &d in &rest[..digits] {
        len = len
            .checked_mul(10)?
            .checked_add(usize::from(d.wrapping_sub(b'0')))?;
    }
    let body = rest.get(digits + 2..)?;
    let bytes = body.get(..len)?;
    Some((bytes, body.get(len + 2..)?))
}

/// The first part of encoded parts (`$<len>\r\n<bytes>\r\n...`, as
/// [`Cmd::encoded_args`] gives them) and the rest after it.
pub(crate) fn split_first_encoded(encoded: &[u8]) -> Option<(&[u8], &[u8])> {
    next_part(encoded)
}

/// Iterates over the parts of an encoded buffer.
struct Parts<'a> {
    rest: &'a [u8],
    left: usize,
}

impl<'a> Iterator for Parts<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.left == 0 {
            return None;
        }
        let (part, rest) = next_part(self.rest)?;
        self.rest = rest;
        self.left -= 1;
        Some(part)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl ExactSizeIterator for Parts<'_> {}

impl Cmd {
    /// A command with no arguments yet.
    #[must_use]
    pub fn new(name: &str) -> Cmd {
        let mut c = Cmd {
            buf: recycle::take(name.len() + 32),
            name_start: 0,
            name_end: 0,
            parts: 0,
            common: Common::of(name.as_bytes()),
        };
        c.push_part(name);
        c.name_end = c.buf.len();
        c.name_start = c.name_end - 2 - name.len();
        c
    }

    /// `GET` with no arguments yet (the typed helpers' hot path).
    pub(crate) fn get_command() -> Cmd {
        Cmd::three_letter(b"$3\r\nGET\r\n", Common::Get)
    }

    /// `SET` with no arguments yet (the typed helpers' hot path).
    pub(crate) fn set_command() -> Cmd {
        Cmd::three_letter(b"$3\r\nSET\r\n", Common::Set)
    }

    /// A command whose three-letter name's encoding is copied in one piece.
    fn three_letter(encoded: &'static [u8; 9], common: Common) -> Cmd {
        let mut buf = recycle::take(64);
        buf.extend_from_slice(encoded);
        Cmd {
            buf,
            name_start: 4,
            name_end: 9,
            parts: 1,
            common,
        }
    }

    /// `GET` of the key in `encoded`, the [`Cmd::encoded_args`] of a GET
    /// of one argument (a migrating map asks a key's old owner with the
    /// bytes it kept, encoding nothing again). The caller vouches for the
    /// one argument: the array's length counts one.
    pub(crate) fn get_encoded(encoded: &[u8]) -> Cmd {
        let mut c = Cmd::three_letter(b"$3\r\nGET\r\n", Common::Get);
        c.buf.extend_from_slice(encoded);
        c.parts = 2;
        c
    }

    /// Adds an argument (builder style).
    #[inline]
    #[must_use]
    pub fn arg<T: ToArg>(mut self, arg: T) -> Cmd {
        self.push_arg(arg);
        self
    }

    /// Adds an argument in place.
    #[inline]
    pub fn push_arg<T: ToArg>(&mut self, arg: T) -> &mut Cmd {
        self.push_part(&arg);
        self
    }

    /// Appends one bulk string. With an exact length (strings, bytes) the
    /// header goes first; otherwise the bytes are written after room for
    /// the longest header, then moved left behind the real one.
    fn push_part<T: ToArg + ?Sized>(&mut self, arg: &T) {
        let start = self.buf.len();
        if let Some(len) = arg.exact_len() {
            self.buf.reserve(MAX_HEAD + len + 2);
            push_bulk_head(&mut self.buf, len);
            let body = self.buf.len();
            arg.write_arg(&mut self.buf);
            if self.buf.len() - body == len {
                self.buf.extend_from_slice(b"\r\n");
                self.parts += 1;
                return;
            }
            // The length was not exact after all: redo it the slow way.
            self.buf.truncate(start);
        }
        self.buf.reserve(MAX_HEAD + arg.size_hint() + 2);
        self.buf.extend_from_slice(&[0; MAX_HEAD]);
        arg.write_arg(&mut self.buf);
        let len = self.buf.len() - start - MAX_HEAD;
        let digits = itoa(len as i64);
        let head = 1 + digits.as_bytes().len() + 2;
        self.buf.copy_within(start + MAX_HEAD.., start + head);
        self.buf.truncate(start + head + len);
        self.buf[start] = b'$';
        self.buf[start + 1..start + head - 2].copy_from_slice(digits.as_bytes());
        self.buf[start + head - 2..start + head].copy_from_slice(b"\r\n");
        self.buf.extend_from_slice(b"\r\n");
        self.parts += 1;
    }

    /// Adds every argument of an iterator.
    #[must_use]
    pub fn args_from<I>(mut self, args: I) -> Cmd
    where
        I: IntoIterator,
        I::Item: ToArg,
    {
        for a in args {
            self.push_arg(a);
        }
        self
    }

    /// The command's name, as given.
    pub fn name(&self) -> &[u8] {
        self.buf
            .get(self.name_start..self.name_end - 2)
            .unwrap_or_default()
    }

    /// The name in upper case, for messages and errors.
    pub fn display_name(&self) -> String {
        String::from_utf8_lossy(self.name()).to_ascii_uppercase()
    }

    /// Number of arguments (the name not counted).
    pub fn arg_count(&self) -> usize {
        self.parts - 1
    }

    /// Argument `i` (0 is the first after the name). Walks the arguments:
    /// iterate [`Cmd::args`] to visit many.
    pub fn arg_at(&self, i: usize) -> Option<&[u8]> {
        self.args().nth(i)
    }

    /// The arguments, the name not included.
    pub fn args(&self) -> impl ExactSizeIterator<Item = &[u8]> + '_ {
        Parts {
            rest: &self.buf[self.name_end..],
            left: self.parts - 1,
        }
    }

    /// The arguments exactly as they are sent: RESP bulk strings back to back.
    pub(crate) fn encoded_args(&self) -> &[u8] {
        &self.buf[self.name_end..]
    }

    /// Exact size of the RESP encoding.
    pub fn encoded_len(&self) -> usize {
        1 + itoa(self.parts as i64).as_bytes().len() + 2 + self.buf.len()
    }

    /// Appends the command as a RESP array of bulk strings, reserving once.
    pub fn write_packed(&self, out: &mut Vec<u8>) {
        out.reserve(self.encoded_len());
        out.push(b'*');
        out.extend_from_slice(itoa(self.parts as i64).as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.buf);
    }

    /// The command as RESP bytes.
    pub fn to_packed(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_packed(&mut out);
        out
    }

    /// Which everyday command this is, if any.
    pub(crate) fn common(&self) -> Common {
        self.common
    }

    /// Whether the name equals `upper` (given in upper case), ignoring case.
    pub(crate) fn is(&self, upper: &[u8]) -> bool {
        self.name().eq_ignore_ascii_case(upper)
    }
}

impl Clone for Cmd {
    fn clone(&self) -> Cmd {
        let mut buf = recycle::take(self.buf.len());
        buf.extend_from_slice(&self.buf);
        Cmd {
            buf,
            name_start: self.name_start,
            name_end: self.name_end,
            parts: self.parts,
            common: self.common,
        }
    }
}

impl Drop for Cmd {
    fn drop(&mut self) {
        recycle::give(std::mem::take(&mut self.buf));
    }
}

/// Which arguments of `cmd` are passwords, for `Debug`: `AUTH`'s last,
/// the password after `HELLO ... AUTH user`, `MIGRATE ... AUTH pw` and
/// `AUTH2 user pw`, `CONFIG SET requirepass|masterauth pw`, and
/// `ACL SETUSER`'s `>pw` / `<pw` rules.
fn secret_args(cmd: &Cmd) -> Vec<bool> {
    let args: Vec<&[u8]> = cmd.args().collect();
    let mut secret = vec![false; args.len()];
    let upper = |a: &[u8]| a.to_ascii_uppercase();
    if cmd.is(b"AUTH") {
        if let Some(last) = secret.last_mut() {
            *last = true;
        }
    } else if cmd.is(b"HELLO") || cmd.is(b"MIGRATE") {
        let mut i = 0;
        while i < args.len() {
            match upper(args[i]).as_slice() {
                b"AUTH" if cmd.is(b"MIGRATE") => {
                    if let Some(s) = secret.get_mut(i + 1) {
                        *s = true;
                    }
                    i += 2;
                }
                b"AUTH" | b"AUTH2" => {
                    if let Some(s) = secret.get_mut(i + 2) {
                        *s = true;
                    }
                    i += 3;
                }
                _ => i += 1,
            }
        }
    } else if cmd.is(b"CONFIG") && args.first().is_some_and(|a| upper(a) == b"SET") {
        for i in (1..args.len()).step_by(2) {
            let name = upper(args[i]);
            if name == b"REQUIREPASS" || name == b"MASTERAUTH" {
                if let Some(s) = secret.get_mut(i + 1) {
                    *s = true;
                }
            }
        }
    } else if cmd.is(b"ACL") && args.first().is_some_and(|a| upper(a) == b"SETUSER") {
        for (i, a) in args.iter().enumerate().skip(2) {
            secret[i] = a.starts_with(b">") || a.starts_with(b"<");
        }
    }
    secret
}

/// The name and the arguments; passwords (of `AUTH`, `HELLO ... AUTH`,
/// `MIGRATE`, `CONFIG SET requirepass`, `ACL SETUSER`) show as `***`.
impl fmt::Debug for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.display_name())?;
        for (a, secret) in self.args().zip(secret_args(self)) {
            if secret {
                f.write_str(" ***")?;
            } else {
                write!(f, " {:?}", String::from_utf8_lossy(a))?;
            }
        }
        Ok(())
    }
}

/// A Lua script, named by the SHA-1 of its source as Redis names it.
///
/// ```
/// let s = rb::Script::new("return 1");
/// assert_eq!(s.sha1(), "e0e1f9fabfc9d4800c877a703b823ac0578ff8db");
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
#[doc(alias = "register_script")]
pub struct Script {
    source: Arc<str>,
    sha1: Arc<str>,
}

impl Script {
    /// Wraps a script's source and computes its hash.
    #[must_use]
    pub fn new(source: &str) -> Script {
        Script {
            sha1: digest::hex(&digest::sha1(source.as_bytes())).into(),
            source: source.into(),
        }
    }

    /// The lower-case hex SHA-1, as `SCRIPT LOAD` returns it.
    pub fn sha1(&self) -> &str {
        &self.sha1
    }

    /// The Lua source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// A call of this script with keys and arguments (sent as `EVALSHA`,
    /// loading the script first where a host lacks it).
    #[must_use]
    pub fn call<K: ToArg, A: ToArg>(&self, keys: &[K], args: &[A]) -> ScriptCall {
        ScriptCall {
            script: self.clone(),
            keys: keys.iter().map(crate::args::to_bytes).collect(),
            args: args.iter().map(crate::args::to_bytes).collect(),
        }
    }
}

impl fmt::Debug for Script {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Script({})", self.sha1)
    }
}

/// One invocation of a [`Script`]: its keys and arguments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScriptCall {
    /// The script to run.
    pub script: Script,
    /// The `KEYS` it gets.
    pub keys: Vec<Vec<u8>>,
    /// The `ARGV` it gets.
    pub args: Vec<Vec<u8>>,
}

impl ScriptCall {
    /// `EVALSHA sha numkeys keys... args...`
    #[must_use]
    pub fn evalsha(&self) -> Cmd {
        self.with_head("EVALSHA", self.script.sha1())
    }

    /// `EVAL source numkeys keys... args...`
    #[must_use]
    pub fn eval(&self) -> Cmd {
        self.with_head("EVAL", self.script.source())
    }

    fn with_head(&self, name: &str, head: &str) -> Cmd {
        cmd(name)
            .arg(head)
            .arg(self.keys.len())
            .args_from(&self.keys)
            .args_from(&self.args)
    }
}

/// One entry of a command list: a plain command or a script call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    /// A command sent as is.
    Cmd(Cmd),
    /// A script, sent as `EVALSHA` and loaded first where missing.
    Script(ScriptCall),
}

impl From<Cmd> for Call {
    fn from(c: Cmd) -> Call {
        Call::Cmd(c)
    }
}

impl From<ScriptCall> for Call {
    fn from(c: ScriptCall) -> Call {
        Call::Script(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resp::{decode, Value};

    /// A GET of one argument rebuilt from its encoded arguments is that
    /// GET, byte for byte.
    #[test]
    fn a_get_from_encoded_arguments_is_the_same_get() {
        for original in [
            cmd("GET").arg("key"),
            cmd("GET").arg(""),
            cmd("get").arg("x"),
        ] {
            let again = Cmd::get_encoded(original.encoded_args());
            let (mut a, mut b) = (Vec::new(), Vec::new());
            Cmd::get_command()
                .args_from(original.args())
                .write_packed(&mut a);
            again.write_packed(&mut b);
            assert_eq!(a, b);
            assert_eq!(again.arg_count(), original.arg_count());
        }
    }

    /// A thread with too many buffers hands a batch to the shared pool, a
    /// thread with none takes a batch back (the async client's callers
    /// and its driver), and the pool stops growing at its limit.
    #[test]
    fn buffers_move_between_threads_a_batch_at_a_time() {
        let pool = recycle::Shared::new();
        let mut giver: Vec<Vec<u8>> = (0..64).map(|_| Vec::with_capacity(128)).collect();
        let spilled: Vec<usize> = giver[32..].iter().map(|b| b.as_ptr() as usize).collect();
        pool.spill(&mut giver);
        assert_eq!((giver.len(), pool.len()), (32, 32));
        let mut taker = Vec::new();
        pool.refill(&mut taker);
        assert_eq!((taker.len(), pool.len()), (32, 0));
        let taken: Vec<usize> = taker.iter().map(|b| b.as_ptr() as usize).collect();
        assert_eq!(taken, spilled, "the same buffers, no new ones");
        // Full: spilling moves nothing more.
        for _ in 0..100 {
            let mut more: Vec<Vec<u8>> = (0..32).map(|_| Vec::with_capacity(8)).collect();
            pool.spill(&mut more);
        }
        assert_eq!(pool.len(), 2048);
        let mut more: Vec<Vec<u8>> = (0..32).map(|_| Vec::with_capacity(8)).collect();
        pool.spill(&mut more);
        assert_eq!((more.len(), pool.len()), (32, 2048));
    }

    #[test]
    fn debug_hides_passwords() {
        let cases = [
            (cmd("AUTH").arg("S3cr3tQ"), "AUTH ***"),
            (cmd("auth").arg("ann").arg("S3cr3tQ"), "AUTH \"ann\" ***"),
            (
                cmd("HELLO")
                    .arg(3)
                    .arg("AUTH")
                    .arg("ann")
                    .arg("S3cr3tQ")
                    .arg("SETNAME")
                    .arg("x"),
                "HELLO \"3\" \"AUTH\" \"ann\" *** \"SETNAME\" \"x\"",
            ),
            (
                cmd("MIGRATE").args_from(["h", "1", "k", "0", "5", "AUTH", "S3cr3tQ", "KEYS", "a"]),
                "MIGRATE \"h\" \"1\" \"k\" \"0\" \"5\" \"AUTH\" *** \"KEYS\" \"a\"",
            ),
            (
                cmd("MIGRATE").args_from(["h", "1", "k", "0", "5", "AUTH2", "ann", "S3cr3tQ"]),
                "MIGRATE \"h\" \"1\" \"k\" \"0\" \"5\" \"AUTH2\" \"ann\" ***",
            ),
            (
                cmd("CONFIG").args_from(["SET", "maxmemory", "1mb", "requirepass", "S3cr3tQ"]),
                "CONFIG \"SET\" \"maxmemory\" \"1mb\" \"requirepass\" ***",
            ),
            (
                cmd("ACL").args_from(["SETUSER", "ann", "on", ">S3cr3tQ", "~*"]),
                "ACL \"SETUSER\" \"ann\" \"on\" *** \"~*\"",
            ),
            (cmd("GET").arg("k"), "GET \"k\""),
        ];
        for (c, want) in cases {
            assert_eq!(format!("{c:?}"), want);
        }
    }

    #[test]
    fn bulk_headers_at_every_digit_count() {
        for len in [0usize, 1, 9, 10, 11, 99, 100, 101, 999, 1000, 65_536] {
            let arg = vec![b'x'; len];
            let c = cmd("ECHO").arg(&arg);
            let packed = c.to_packed();
            assert_eq!(packed.len(), c.encoded_len(), "length {len}");
            let (v, used) = decode(&packed).unwrap().unwrap();
            assert_eq!(used, packed.len());
            assert_eq!(
                v,
                Value::Array(vec![
                    Value::BulkString(b"ECHO".to_vec()),
                    Value::BulkString(arg.clone())
                ]),
                "length {len}"
            );
            assert_eq!(c.args().next(), Some(&arg[..]));
        }
    }

    #[test]
    fn everyday_commands_equal_their_plain_builds() {
        for (fast, common, name) in [
            (Cmd::get_command(), Common::Get, "GET"),
            (Cmd::set_command(), Common::Set, "SET"),
        ] {
            let fast = fast.arg("k").arg("v");
            let plain = cmd(name).arg("k").arg("v");
            assert_eq!(fast, plain);
            assert_eq!(fast.name(), name.as_bytes());
            assert_eq!(fast.to_packed(), plain.to_packed());
            assert_eq!(fast.common(), common);
        }
    }

    #[test]
    fn everyday_names_are_recognised_in_any_case() {
        assert_eq!(cmd("get").common(), Common::Get);
        assert_eq!(cmd("GeT").common(), Common::Get);
        assert_eq!(cmd("SET").common(), Common::Set);
        assert_eq!(cmd("GETSET").common(), Common::Other);
        assert_eq!(cmd("MGET").common(), Common::Other);
        assert_eq!(cmd("").common(), Common::Other);
    }

    #[test]
    fn encodes_exactly_sized() {
        let c = cmd("SET")
            .arg("key")
            .arg(&b"\x00bin\r\n"[..])
            .arg(-1)
            .arg(1.5);
        let packed = c.to_packed();
        assert_eq!(packed.len(), c.encoded_len());
        assert_eq!(
            packed,
            b"*5\r\n$3\r\nSET\r\n$3\r\nkey\r\n$6\r\n\x00bin\r\n\r\n$2\r\n-1\r\n$3\r\n1.5\r\n"
        );
        let (v, _) = decode(&packed).unwrap().unwrap();
        assert_eq!(
            v,
            Value::Array(
                [&b"SET"[..], b"key", b"\x00bin\r\n", b"-1", b"1.5"]
                    .iter()
                    .map(|b| Value::BulkString(b.to_vec()))
                    .collect()
            )
        );
    }

    #[test]
    fn large_argument_counts_size_right() {
        let c = cmd("MGET").args_from((0..1234).map(|i| format!("key:{i}")));
        assert_eq!(c.arg_count(), 1234);
        assert_eq!(c.to_packed().len(), c.encoded_len());
        assert_eq!(c.arg_at(1233), Some(&b"key:1233"[..]));
        assert_eq!(c.arg_at(1234), None);
    }

    #[test]
    fn script_calls() {
        let s = Script::new("return {KEYS, ARGV}");
        let call = s.call(&["k1", "k2"], &["v"]);
        assert_eq!(
            call.evalsha().args().collect::<Vec<_>>(),
            [s.sha1().as_bytes(), b"2", b"k1", b"k2", b"v"]
        );
        assert_eq!(call.eval().arg_at(0), Some(s.source().as_bytes()));
        assert_eq!(format!("{:?}", cmd("get").arg("k")), "GET \"k\"");
    }
}
